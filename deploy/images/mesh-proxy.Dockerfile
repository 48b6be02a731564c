# syntax=docker/dockerfile:1
# The node proxy (the node DaemonSet's main container). Root with the
# capabilities the DaemonSet grants (see deploy/sockmesh.yaml).
# Multi-stage: the eBPF programs need the pinned nightly with rust-src and
# bpf-linker (LLVM 22), as `./x setup` installs them; then a static musl
# build, then the binary alone on an empty base.
# `./x image` builds the same image as an OCI archive without a Docker daemon.
#   docker build -f deploy/images/mesh-proxy.Dockerfile -t localhost/sockmesh/mesh-proxy:0.1.0 .
FROM docker.io/library/rust:1.98-bookworm AS build
# LLVM 22 comes from Debian bookworm-security, as on the build machines.
RUN apt-get update -q \
    && apt-get install -y -q --no-install-recommends musl-tools \
        llvm-22-dev libpolly-22-dev zlib1g-dev libzstd-dev \
    && rm -rf /var/lib/apt/lists/* \
    && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY . .
RUN rustup toolchain install "$(sed -n 's/^channel = "\(.*\)"/\1/p' mesh-ebpf/kernel/rust-toolchain.toml)" \
        --profile minimal --component rust-src \
    && PATH=/usr/lib/llvm-22/bin:$PATH cargo install bpf-linker@0.13.0 --locked \
        --no-default-features --features llvm-22
RUN cargo build --release --locked --target x86_64-unknown-linux-musl -p mesh-proxy --bin mesh-proxy \
    && cp target/x86_64-unknown-linux-musl/release/mesh-proxy /mesh-proxy

FROM scratch
COPY --from=build /mesh-proxy /mesh-proxy
ENTRYPOINT ["/mesh-proxy"]
