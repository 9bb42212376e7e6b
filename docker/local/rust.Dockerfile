# A Rust build image for machines that cannot pull rust:1-bookworm: Debian
# bookworm's own Rust 1.9x toolchain (the `rustc-web` and `cargo-web` packages,
# which bookworm keeps current for its browsers) plus what the bundled
# librdkafka needs (gcc, g++ for its configure, make, zlib). Debian's `rustc` package (1.63) is older
# than pgrelay's rust-version, which is why the -web packages are used.
#
#   docker build -f docker/local/rust.Dockerfile --build-arg BASE_IMAGE=pgrelay-base:bookworm \
#       -t pgrelay-rust:bookworm docker/local
#
# Only `scripts/e2e-docker.sh` with PGRELAY_E2E_BUILD=source uses it, to build
# pgrelay with docker/Dockerfile's cargo stage (RUST_IMAGE=pgrelay-rust:bookworm).
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN set -eux; \
    apt-get update; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        rustc-web cargo-web gcc g++ libc6-dev make pkg-config zlib1g-dev ca-certificates; \
    rm -rf /var/lib/apt/lists/*; \
    cargo --version; rustc --version
ENV CARGO_HOME=/usr/local/cargo
