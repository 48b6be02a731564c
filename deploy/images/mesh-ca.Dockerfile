# syntax=docker/dockerfile:1
# The CA (mesh-ca cluster in the Deployment). Runs as an unprivileged user.
# Multi-stage: a static musl build, then the binary alone on an empty base.
# `./x image` builds the same image as an OCI archive without a Docker daemon.
#   docker build -f deploy/images/mesh-ca.Dockerfile -t localhost/sockmesh/mesh-ca:0.1.0 .
FROM docker.io/library/rust:1.98-bookworm AS build
RUN apt-get update -q && apt-get install -y -q --no-install-recommends musl-tools \
    && rm -rf /var/lib/apt/lists/* \
    && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY . .
RUN cargo build --release --locked --target x86_64-unknown-linux-musl -p mesh-ca --bin mesh-ca \
    && cp target/x86_64-unknown-linux-musl/release/mesh-ca /mesh-ca

FROM scratch
COPY --from=build /mesh-ca /mesh-ca
USER 10001
ENTRYPOINT ["/mesh-ca"]
