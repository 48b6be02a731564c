# syntax=docker/dockerfile:1
# The CNI plugin and its installer (the node DaemonSet's mesh-cni sidecar). Root: it writes the host's CNI dirs.
# Multi-stage: a static musl build, then the binary alone on an empty base.
# `./x image` builds the same image as an OCI archive without a Docker daemon.
#   docker build -f deploy/images/mesh-cni.Dockerfile -t localhost/sockmesh/mesh-cni:0.1.0 .
FROM docker.io/library/rust:1.98-bookworm AS build
RUN apt-get update -q && apt-get install -y -q --no-install-recommends musl-tools \
    && rm -rf /var/lib/apt/lists/* \
    && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY . .
RUN cargo build --release --locked --target x86_64-unknown-linux-musl -p mesh-cni --bin mesh-cni \
    && cp target/x86_64-unknown-linux-musl/release/mesh-cni /mesh-cni

FROM scratch
COPY --from=build /mesh-cni /mesh-cni
USER 0
ENTRYPOINT ["/mesh-cni"]
