# A Rust build image for machines that cannot pull rust:1-bookworm: Debian
# bookworm's own current Rust toolchain (the `rustc-web` and `cargo-web`
# packages, which bookworm keeps up to date for its browsers; its `rustc`
# package, 1.63, is older than pgrelay's rust-version) plus what the bundled
# librdkafka needs (gcc, g++ for its configure script, make, zlib) and
# OpenSSL's headers (libssl-dev: pgrelay's TLS, librdkafka's ssl/SASL).
#
#   docker build -f docker/local/rust.Dockerfile --build-arg BASE_IMAGE=pgrelay-base:bookworm \
#       -t pgrelay-rust:bookworm docker/local
#
# scripts/e2e-docker.sh with PGRELAY_E2E_BUILD=source puts the vendored crates
# on top (rust-vendored.Dockerfile) and builds docker/Dockerfile's cargo stage
# on the result (RUST_IMAGE=pgrelay-rust:bookworm-vendored).
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN set -eux; \
    apt-get update; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        rustc-web cargo-web gcc g++ libc6-dev make pkg-config zlib1g-dev libssl-dev ca-certificates; \
    rm -rf /var/lib/apt/lists/*; \
    cargo --version; rustc --version
ENV CARGO_HOME=/usr/local/cargo
