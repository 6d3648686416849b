# syntax=docker/dockerfile:1
# mesh-ca: built from the workspace root (docker build -f deploy/docker/mesh-ca.Dockerfile .).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --profile dist --locked -p mesh-ca --bin mesh-ca \
 && cp target/dist/mesh-ca /mesh-ca

# Distroless: no shell, no package manager; runs as the unprivileged user 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /mesh-ca /usr/local/bin/mesh-ca
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/mesh-ca"]
