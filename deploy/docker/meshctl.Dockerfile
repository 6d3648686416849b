# syntax=docker/dockerfile:1
# meshctl, also the demo workload of the kind suite (`meshctl demo-service`).
# Built from the workspace root (docker build -f deploy/docker/meshctl.Dockerfile .).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --profile dist --locked -p meshctl --bin meshctl \
 && cp target/dist/meshctl /meshctl

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /meshctl /usr/local/bin/meshctl
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/meshctl"]
