# syntax=docker/dockerfile:1
# mesh-proxy: the sidecar and its init container (`mesh-proxy init`, which needs iptables).
# Built from the workspace root (docker build -f deploy/docker/mesh-proxy.Dockerfile .).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p mesh-proxy --bin mesh-proxy \
 && cp target/release/mesh-proxy /mesh-proxy

FROM debian:12-slim
# iptables with both backends (iptables-nft and iptables-legacy); `mesh-proxy init` picks one.
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /mesh-proxy /usr/local/bin/mesh-proxy
# The proxy runs as 1337, which the interception rules exempt. Only the init container runs as
# root (the injected pod spec says so), for NET_ADMIN.
USER 1337:1337
ENTRYPOINT ["/usr/local/bin/mesh-proxy"]
