# syntax=docker/dockerfile:1
# mesh-proxy-init: the injected init container, `mesh-proxy init`, which writes the pod's
# interception rules with iptables. Only this image carries iptables; it runs once per pod start
# as root with NET_ADMIN (the injected pod spec says so).
# Built from the workspace root (docker build -f deploy/docker/mesh-proxy-init.Dockerfile .).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --profile dist --locked -p mesh-proxy --bin mesh-proxy \
 && cp target/dist/mesh-proxy /mesh-proxy

FROM debian:12-slim
# iptables with both backends (iptables-nft and iptables-legacy); `mesh-proxy init` picks one.
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /mesh-proxy /usr/local/bin/mesh-proxy
ENTRYPOINT ["/usr/local/bin/mesh-proxy"]
