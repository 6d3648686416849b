# syntax=docker/dockerfile:1
# mesh-proxy, the sidecar. Its init container's image (`mesh-proxy init` and iptables) is
# mesh-proxy-init.Dockerfile: every node pulls this one, so it carries the binary alone.
# Built from the workspace root (docker build -f deploy/docker/mesh-proxy.Dockerfile .).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --profile dist --locked -p mesh-proxy --bin mesh-proxy \
 && cp target/dist/mesh-proxy /mesh-proxy

# Distroless with glibc and libgcc (what a Rust binary links): no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /mesh-proxy /usr/local/bin/mesh-proxy
# The proxy runs as 1337, which the interception rules exempt.
USER 1337:1337
ENTRYPOINT ["/usr/local/bin/mesh-proxy"]
