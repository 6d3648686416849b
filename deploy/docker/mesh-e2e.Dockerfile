# syntax=docker/dockerfile:1
# mesh-e2e-load: the e2e scenarios' load generator, for the kind suite's client pods.
# Built from the workspace root (docker build -f deploy/docker/mesh-e2e.Dockerfile .).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --profile dist --locked -p mesh-e2e --bin mesh-e2e-load \
 && cp target/dist/mesh-e2e-load /mesh-e2e-load

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /mesh-e2e-load /usr/local/bin/mesh-e2e-load
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/mesh-e2e-load"]
