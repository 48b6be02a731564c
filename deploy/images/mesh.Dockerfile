# syntax=docker/dockerfile:1
# The mesh CLI (mesh install, mesh check) for running in a Job or CI.
# Multi-stage: a static musl build, then the binary alone on an empty base.
# `./x image` builds the same image as an OCI archive without a Docker daemon.
#   docker build -f deploy/images/mesh.Dockerfile -t localhost/sockmesh/mesh:0.1.0 .
FROM docker.io/library/rust:1.98-bookworm AS build
RUN apt-get update -q && apt-get install -y -q --no-install-recommends musl-tools \
    && rm -rf /var/lib/apt/lists/* \
    && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY . .
RUN cargo build --release --locked --target x86_64-unknown-linux-musl -p mesh-cli --bin mesh \
    && cp target/x86_64-unknown-linux-musl/release/mesh /mesh

FROM scratch
COPY --from=build /mesh /mesh
USER 65534
ENTRYPOINT ["/mesh"]
