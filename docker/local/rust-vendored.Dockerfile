# The Rust build image plus pgrelay's dependencies, vendored on the host
# (`cargo vendor --locked`): for builders whose containers cannot download from
# crates.io (here: HTTPS from containers does not pass the machine's egress
# proxy). cargo inside reads $CARGO_HOME/config.toml and never goes online.
#
#   cargo vendor --locked --versioned-dirs DIR/vendor
#   docker build -f docker/local/rust-vendored.Dockerfile \
#       --build-arg RUST_IMAGE=pgrelay-rust:bookworm -t pgrelay-rust-vendored:e2e DIR
ARG RUST_IMAGE=pgrelay-rust:bookworm
FROM ${RUST_IMAGE}
ENV CARGO_HOME=/usr/local/cargo
COPY vendor /usr/local/cargo/vendor
RUN printf '%s\n' '[source.crates-io]' 'replace-with = "vendored"' '' \
        '[source.vendored]' 'directory = "/usr/local/cargo/vendor"' > "$CARGO_HOME/config.toml"
