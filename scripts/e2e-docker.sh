#!/usr/bin/env bash
# End-to-end test of the container image and the three-region compose stack
# (docker/compose.yml), on a machine with a Docker engine but no image
# registry: every image is built here.
#
#   bash scripts/e2e-docker.sh
#
# Prints a skip message and exits 0 where Docker (engine + compose) is not
# usable. Otherwise:
#
#  1. images, built locally and reused by later runs while their inputs are
#     unchanged (docker's own cache; nothing is kept outside the repository
#     but docker's images):
#       pgrelay-base:bookworm   Debian bookworm, debootstrap --variant=minbase,
#                               trimmed like debian:bookworm-slim, docker import
#       pgrelay-postgres:15     + postgresql-15 from Debian (docker/local/)
#       pgrelay-tansu:local     + .tools/bin/tansu, the Kafka-protocol broker
#       pgrelay:e2e             docker/Dockerfile on pgrelay-base: by default
#                               target `prebuilt` around `cargo build --release
#                               --locked` from the host; PGRELAY_E2E_BUILD=source
#                               builds with the Dockerfile's cargo stage instead
#                               (Rust from Debian's rustc-web/cargo-web packages,
#                               crates vendored on the host: slower)
#  2. docker/compose.yml + docker/compose.tansu.yml up (Tansu for Kafka);
#  3. a mixed workload in every region, then convergence and residency checks
#     (global and owned tables identical everywhere, stamps included; every
#     partitioned row exactly where the policy allows it, hashed and masked
#     columns without their originals; local rows nowhere else);
#  4. `docker kill` of a sidecar while every region writes, restart, checks;
#  5. a sidecar cut off the shared network while every region writes,
#     reconnect, checks;
#  6. `pgrelay check` and `pgrelay status` inside the containers;
#  7. `docker compose down -v`, also on failure.
#
# Environment:
#   PGRELAY_E2E_BUILD=host|source      how pgrelay:e2e gets its binary (host)
#   PGRELAY_E2E_REBUILD=1              rebuild the base images from scratch
#   PGRELAY_E2E_MIRROR=URL             Debian mirror (http://deb.debian.org/debian)
#   PGRELAY_E2E_APT_IN_CONTAINERS=0|1  skip the probe: can containers reach the
#                                      mirror? (0: install PostgreSQL with chroot)
#   PGRELAY_E2E_CUT_SECONDS=25         how long pgrelay-cn stays cut off
#   PGRELAY_E2E_KEEP=1                 leave the stack running at the end
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SECONDS=0

log() { printf '[e2e-docker %4ss] %s\n' "$SECONDS" "$*" >&2; }
skip() {
    echo "e2e-docker: SKIPPED: $* (nothing was run)"
    exit 0
}

# ------------------------------------------------------------------ can we run?
command -v docker >/dev/null 2>&1 || skip "the docker CLI is not installed"
docker info >/dev/null 2>&1 || skip "'docker info' failed: no usable Docker engine"
if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null 2>&1 && docker-compose version >/dev/null 2>&1; then
    COMPOSE=(docker-compose)
else
    skip "neither 'docker compose' nor 'docker-compose' is installed"
fi

WORK="$ROOT/target/docker-e2e"
BASE_IMAGE=pgrelay-base:bookworm
PG_IMAGE=pgrelay-postgres:15
TANSU_IMAGE=pgrelay-tansu:local
RUST_IMAGE=pgrelay-rust:bookworm
RELAY_IMAGE=pgrelay:e2e
BUILD_MODE="${PGRELAY_E2E_BUILD:-host}"
MIRROR="${PGRELAY_E2E_MIRROR:-http://deb.debian.org/debian}"
PROJECT="pgrelay-e2e-$$"
LOGS="$WORK/logs-$PROJECT"
REGIONS=(us eu cn)
declare -A RID=([us]=1 [eu]=2 [cn]=3)
declare -A CID=()
FAILED=1
STACK_UP=0
WRITERS=()
CHROOT_PROC=""

mkdir -p "$WORK" "$LOGS"
case "$BUILD_MODE" in host | source) ;; *) echo "PGRELAY_E2E_BUILD must be host or source" >&2; exit 2 ;; esac

PASSES=0
pass() {
    PASSES=$((PASSES + 1))
    log "PASS: $*"
}
fail() {
    log "FAIL: $*"
    exit 1
}

COMPOSE_CMD=("${COMPOSE[@]}" -p "$PROJECT" -f "$ROOT/docker/compose.yml" -f "$ROOT/docker/compose.tansu.yml")
compose() { "${COMPOSE_CMD[@]}" "$@"; }

cleanup() {
    local rc=$?
    set +e
    for pid in "${WRITERS[@]}"; do kill "$pid" 2>/dev/null; done
    if [ -n "$CHROOT_PROC" ]; then umount "$CHROOT_PROC" 2>/dev/null; fi
    if [ "$STACK_UP" = 1 ]; then
        if [ "$FAILED" = 1 ] || [ "$rc" != 0 ]; then
            log "logs of every service: $LOGS/"
            for svc in kafka postgres-us postgres-eu postgres-cn pgrelay-us-setup pgrelay-eu-setup \
                pgrelay-cn-setup pgrelay-us pgrelay-eu pgrelay-cn; do
                timeout 60 "${COMPOSE_CMD[@]}" logs --no-color "$svc" >"$LOGS/$svc.log" 2>&1
            done
            for svc in pgrelay-us pgrelay-eu pgrelay-cn; do
                echo "---- last lines of $svc ----" >&2
                tail -n 25 "$LOGS/$svc.log" >&2
            done
        fi
        if [ -n "${PGRELAY_E2E_KEEP:-}" ]; then
            log "PGRELAY_E2E_KEEP is set: the stack is still up; remove it with:"
            log "  ${COMPOSE[*]} -p $PROJECT -f docker/compose.yml -f docker/compose.tansu.yml down -v"
        else
            log "tearing down (compose down -v)"
            timeout 180 "${COMPOSE_CMD[@]}" down -v --remove-orphans --timeout 5 >"$LOGS/down.log" 2>&1 ||
                log "compose down failed: see $LOGS/down.log"
        fi
    fi
    if [ "$FAILED" = 1 ] || [ "$rc" != 0 ]; then
        log "e2e-docker: FAILED after ${SECONDS}s"
        echo "e2e-docker: $PASSES passed, 1 failed"
        [ "$rc" = 0 ] && rc=1
    else
        rm -rf "$LOGS"
        echo "e2e-docker: $PASSES passed, 0 failed"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }
image_label() { docker image inspect -f "{{index .Config.Labels \"$2\"}}" "$1" 2>/dev/null || true; }
image_id() { docker image inspect -f '{{.Id}}' "$1"; }
inputs_key() { cat "$@" | sha256sum | cut -c1-16; }
need_root() {
    [ "$(id -u)" = 0 ] || fail "building $1 needs root (debootstrap/chroot); run as root, or build it once as root"
}

# ------------------------------------------------------------- base image (debootstrap)
trim_rootfs() {
    local r="$1"
    # what debian:bookworm-slim does: no services started by dpkg, no docs,
    # man pages or translations, no apt caches
    printf '#!/bin/sh\nexit 101\n' >"$r/usr/sbin/policy-rc.d"
    chmod 755 "$r/usr/sbin/policy-rc.d"
    cat >"$r/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
EOF
    cat >"$r/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
    echo 'Acquire::Languages "none";' >"$r/etc/apt/apt.conf.d/docker-no-languages"
    printf 'Acquire::GzipIndexes "true";\nAcquire::CompressionTypes::Order:: "gz";\n' \
        >"$r/etc/apt/apt.conf.d/docker-gzip-indexes"
    rm -f "$r/etc/apt/sources.list"
    cat >"$r/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${MIRROR%/debian}/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    rm -rf "$r"/var/cache/apt/archives/*.deb "$r"/var/cache/apt/*.bin "$r"/var/lib/apt/lists/*
    find "$r/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete
    find "$r/usr/share/doc" -mindepth 1 -type d -empty -delete
    rm -rf "$r"/usr/share/man/* "$r"/usr/share/info/* "$r"/usr/share/locale/* "$r"/usr/share/lintian "$r"/usr/share/groff
    find "$r/var/log" -type f -delete
    rm -rf "$r"/tmp/* "$r"/var/tmp/*
    : >"$r/etc/resolv.conf"
    echo localhost >"$r/etc/hostname"
}

import_rootfs() { # DIR IMAGE
    tar --numeric-owner -C "$1" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["bash"]' - "$2" >/dev/null
}

build_base() {
    # pgrelay links libssl3: a base made before it did lacks it
    if image_exists "$BASE_IMAGE" && [ -z "${PGRELAY_E2E_REBUILD:-}" ] &&
        docker run --rm "$BASE_IMAGE" dpkg -s libssl3 ca-certificates >/dev/null 2>&1; then
        log "base image $BASE_IMAGE: present, reused"
        return
    fi
    need_root "$BASE_IMAGE"
    if ! command -v debootstrap >/dev/null 2>&1; then
        log "installing debootstrap (apt)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -qq debootstrap >/dev/null 2>&1 ||
            { apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null; } ||
            fail "cannot install debootstrap"
    fi
    local r="$WORK/rootfs" t0=$SECONDS
    rm -rf "$r"
    log "debootstrap: Debian bookworm (minbase) from $MIRROR"
    timeout 1200 debootstrap --variant=minbase --components=main --include=libssl3,ca-certificates bookworm "$r" "$MIRROR" >"$LOGS/debootstrap.log" 2>&1 ||
        fail "debootstrap failed: see $LOGS/debootstrap.log"
    trim_rootfs "$r"
    import_rootfs "$r" "$BASE_IMAGE"
    rm -rf "$r"
    log "base image $BASE_IMAGE: built in $((SECONDS - t0))s ($(image_mb "$BASE_IMAGE") MB)"
}

image_mb() { docker image inspect -f '{{.Size}}' "$1" | awk '{printf "%.1f", $1 / 1000000}'; }

# --------------------------------------------------------- PostgreSQL 15 image
apt_reachable_from_containers() {
    case "${PGRELAY_E2E_APT_IN_CONTAINERS:-}" in 0) return 1 ;; 1) return 0 ;; esac
    timeout 120 docker run --rm "$BASE_IMAGE" apt-get -q -o Acquire::http::Timeout=15 -o Acquire::Retries=1 \
        update --error-on=any >"$LOGS/apt-probe.log" 2>&1
}

build_postgres() {
    local key
    key="$(inputs_key docker/local/postgres.Dockerfile docker/local/postgres-entrypoint.sh)-$(image_id "$BASE_IMAGE" | cut -c8-19)"
    if [ "$(image_label "$PG_IMAGE" pgrelay.e2e.key)" = "$key" ] && [ -z "${PGRELAY_E2E_REBUILD:-}" ]; then
        log "postgres image $PG_IMAGE: up to date, reused"
        return
    fi
    local t0=$SECONDS base="$BASE_IMAGE"
    if apt_reachable_from_containers; then
        log "containers reach the Debian mirror: installing postgresql-15 in a docker build"
    else
        log "containers cannot reach the Debian mirror (see $LOGS/apt-probe.log):" \
            "installing postgresql-15 into the debootstrap root with chroot"
        need_root "$PG_IMAGE"
        local r="$WORK/rootfs-pg" cid
        rm -rf "$r"
        mkdir -p "$r"
        cid="$(docker create "$BASE_IMAGE" true)"
        docker export "$cid" | tar -C "$r" -xf -
        docker rm "$cid" >/dev/null
        cp /etc/resolv.conf "$r/etc/resolv.conf"
        mount -t proc proc "$r/proc"
        CHROOT_PROC="$r/proc"
        mkdir -p "$r/etc/postgresql-common/createcluster.d"
        echo 'create_main_cluster = false' >"$r/etc/postgresql-common/createcluster.d/no-main-cluster.conf"
        { chroot "$r" apt-get update -q &&
            chroot "$r" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql-15; } \
            >"$LOGS/chroot-apt.log" 2>&1 || fail "apt-get in the chroot failed: see $LOGS/chroot-apt.log"
        umount "$r/proc"
        CHROOT_PROC=""
        rm -rf "$r"/var/lib/apt/lists/* "$r"/var/cache/apt/archives/*.deb
        : >"$r/etc/resolv.conf"
        base=pgrelay-base-postgres:bookworm
        import_rootfs "$r" "$base"
        rm -rf "$r"
    fi
    docker build --force-rm -q -f docker/local/postgres.Dockerfile --build-arg BASE_IMAGE="$base" \
        --label pgrelay.e2e.key="$key" -t "$PG_IMAGE" docker/local >"$LOGS/build-postgres.log" 2>&1 ||
        { tail -n 30 "$LOGS/build-postgres.log" >&2; fail "building $PG_IMAGE failed"; }
    log "postgres image $PG_IMAGE: built in $((SECONDS - t0))s ($(image_mb "$PG_IMAGE") MB)"
}

# ------------------------------------------------------------------ broker image
build_tansu() {
    local tansu="$ROOT/.tools/bin/tansu"
    if [ ! -x "$tansu" ]; then
        log "no $tansu: running scripts/install-deps.sh"
        bash scripts/install-deps.sh
    fi
    local ctx="$WORK/ctx-tansu"
    rm -rf "$ctx"
    mkdir -p "$ctx"
    cp "$tansu" "$ctx/tansu"
    docker build --force-rm -q -f docker/local/tansu.Dockerfile --build-arg BASE_IMAGE="$BASE_IMAGE" \
        -t "$TANSU_IMAGE" "$ctx" >"$LOGS/build-tansu.log" 2>&1 ||
        { tail -n 30 "$LOGS/build-tansu.log" >&2; fail "building $TANSU_IMAGE failed"; }
    rm -rf "$ctx"
    log "broker image $TANSU_IMAGE: ready ($("$tansu" --version 2>/dev/null | head -n1))"
}

# ----------------------------------------------------------------- pgrelay image
build_relay() {
    local ctx="$WORK/ctx-relay" t0=$SECONDS previous=""
    image_exists "$RELAY_IMAGE" && previous="$(image_id "$RELAY_IMAGE")"
    rm -rf "$ctx"
    mkdir -p "$ctx/target/release" "$ctx/docker"
    cp -p docker/pgrelay-healthcheck "$ctx/docker/"
    if [ "$BUILD_MODE" = host ]; then
        log "building pgrelay on the host: cargo build --release --locked"
        cargo build --release --locked >"$LOGS/cargo.log" 2>&1 ||
            { tail -n 40 "$LOGS/cargo.log" >&2; fail "cargo build --release --locked failed"; }
        local bin="${CARGO_TARGET_DIR:-$ROOT/target}/release/pgrelay"
        # the repository's release profile keeps debug info: not in the image
        if command -v strip >/dev/null 2>&1; then
            strip --strip-debug -o "$ctx/target/release/pgrelay" "$bin"
        else
            cp "$bin" "$ctx/target/release/pgrelay"
        fi
        log "host binary built in $((SECONDS - t0))s; image from docker/Dockerfile --target prebuilt"
        docker build --force-rm -f docker/Dockerfile --target prebuilt --build-arg RUNTIME_IMAGE="$BASE_IMAGE" \
            -t "$RELAY_IMAGE" "$ctx" >"$LOGS/build-relay.log" 2>&1 ||
            { tail -n 40 "$LOGS/build-relay.log" >&2; fail "building $RELAY_IMAGE failed"; }
    else
        local key
        key="$(inputs_key docker/local/rust.Dockerfile)-$(image_id "$BASE_IMAGE" | cut -c8-19)"
        if [ "$(image_label "$RUST_IMAGE" pgrelay.e2e.key)" != "$key" ] || [ -n "${PGRELAY_E2E_REBUILD:-}" ]; then
            log "building $RUST_IMAGE (Debian's rustc-web and cargo-web)"
            docker build --force-rm -q -f docker/local/rust.Dockerfile --build-arg BASE_IMAGE="$BASE_IMAGE" \
                --label pgrelay.e2e.key="$key" -t "$RUST_IMAGE" docker/local >"$LOGS/build-rust.log" 2>&1 ||
                { tail -n 30 "$LOGS/build-rust.log" >&2; fail "building $RUST_IMAGE failed"; }
        fi
        # crates: vendored on the host (containers here cannot fetch from
        # crates.io over HTTPS), baked into a builder image on top
        local vctx="$WORK/ctx-vendor"
        rm -rf "$vctx"
        mkdir -p "$vctx"
        cargo vendor --locked --versioned-dirs -q "$vctx/vendor" >/dev/null 2>"$LOGS/vendor.log" ||
            { cat "$LOGS/vendor.log" >&2; fail "cargo vendor failed"; }
        docker build --force-rm -q -f docker/local/rust-vendored.Dockerfile --build-arg RUST_IMAGE="$RUST_IMAGE" \
            -t "$RUST_IMAGE-vendored" "$vctx" >"$LOGS/build-rust-vendored.log" 2>&1 ||
            { tail -n 30 "$LOGS/build-rust-vendored.log" >&2; fail "building $RUST_IMAGE-vendored failed"; }
        rm -rf "$vctx"
        cp -pr Cargo.toml Cargo.lock src tests benches "$ctx/"
        # the classic builder builds every stage before the target, `prebuilt`
        # included: give it a placeholder (the runtime stage copies from `build`)
        : >"$ctx/target/release/pgrelay"
        log "building pgrelay in docker: docker/Dockerfile (cargo stage on $RUST_IMAGE-vendored)"
        docker build --force-rm -f docker/Dockerfile --build-arg RUST_IMAGE="$RUST_IMAGE-vendored" \
            --build-arg RUNTIME_IMAGE="$BASE_IMAGE" -t "$RELAY_IMAGE" "$ctx" >"$LOGS/build-relay.log" 2>&1 ||
            { tail -n 40 "$LOGS/build-relay.log" >&2; fail "building $RELAY_IMAGE failed"; }
    fi
    rm -rf "$ctx"
    if [ -n "$previous" ] && [ "$previous" != "$(image_id "$RELAY_IMAGE")" ]; then
        docker rmi "$previous" >/dev/null 2>&1 || true # the image this one replaces
    fi
    local version user
    version="$(docker run --rm "$RELAY_IMAGE" --version)" || fail "$RELAY_IMAGE does not run"
    user="$(docker run --rm --entrypoint id "$RELAY_IMAGE" -u)"
    [ "$user" != 0 ] || fail "$RELAY_IMAGE runs as root"
    log "pgrelay image $RELAY_IMAGE: $version, uid $user, $(image_mb "$RELAY_IMAGE") MB, built in $((SECONDS - t0))s"
}

# ------------------------------------------------------------------ stack helpers
psql_in() { # REGION [psql args...]: runs psql in that region's primary, SQL on stdin or -c
    local r="$1"
    shift
    timeout "${PSQL_TIMEOUT:-60}" docker exec -i "${CID[postgres-$r]}" \
        psql -X -q -At -v ON_ERROR_STOP=1 -U postgres -d app "$@"
}

# polls CMD... every second until it succeeds; false after TIMEOUT seconds
wait_for() { # TIMEOUT CMD...
    local deadline=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 1
    done
}

ready() { timeout 20 docker exec "${CID[pgrelay-$1]}" pgrelay-healthcheck /readyz; }
healthy() { [ "$(docker inspect -f '{{.State.Health.Status}}' "${CID[pgrelay-$1]}")" = healthy ]; }
running() { [ "$(docker inspect -f '{{.State.Running}}' "$1")" = true ]; }

lo() { echo $((RID[$1] * 1000000)); }
hi() { echo $((RID[$1] * 1000000 + 999999)); }

# countries whose rows may reach region R from elsewhere (demo policy: a home
# region receives its own rows; us allows eu and cn; eu and cn allow nobody;
# BR has no home and never leaves)
allowed_countries() {
    case "$1" in
        us) echo "'US','CA'" ;;
        eu) echo "'US','CA','DE','FR'" ;;
        cn) echo "'US','CA','CN'" ;;
    esac
}

# The state of one region as key=value lines:
#   products / currencies        fingerprint of the whole table, stamps included
#   orders.from.S                fingerprint of the rows of S's id range found here
#   orders.for.D                 fingerprint of what D must hold of this region's
#                                rows: allowed homes only, email hashed for cn,
#                                card masked
#   users.foreign                users rows of other regions' id ranges
snapshot_sql() {
    local r="$1" s d email
    local fp_cols="concat_ws('|', id, country, amount, coalesce(email, '<null>'), coalesce(card, '<null>'))"
    echo "SELECT 'products=' || count(*) || ' ' || coalesce(md5(string_agg(concat_ws('|', id, name, price, _pgrelay_hlc), ',' ORDER BY id)), '-') FROM products;"
    echo "SELECT 'currencies=' || count(*) || ' ' || coalesce(md5(string_agg(concat_ws('|', code, rate, _pgrelay_hlc), ',' ORDER BY code)), '-') FROM currencies;"
    echo "SELECT 'users.foreign=' || count(*) FROM users WHERE id NOT BETWEEN $(lo "$r") AND $(hi "$r");"
    for s in "${REGIONS[@]}"; do
        [ "$s" = "$r" ] && continue
        echo "SELECT 'orders.from.$s=' || count(*) || ' ' || coalesce(md5(string_agg($fp_cols, ',' ORDER BY id)), '-') FROM orders WHERE id BETWEEN $(lo "$s") AND $(hi "$s");"
    done
    for d in "${REGIONS[@]}"; do
        [ "$d" = "$r" ] && continue
        email=email
        if [ "$d" = cn ]; then
            # k1: and HMAC-SHA-256 (RFC 2104) keyed by the sending region's key, in SQL
            local key_var="PGRELAY_${r^^}_HASH_KEY"
            local k="decode(rpad(encode(convert_to('${!key_var}', 'UTF8'), 'hex'), 128, '0'), 'hex')"
            local ipad="substring(varbit_send(('x' || encode($k, 'hex'))::bit(512) # ('x' || repeat('36', 64))::bit(512)) from 5)"
            local opad="substring(varbit_send(('x' || encode($k, 'hex'))::bit(512) # ('x' || repeat('5c', 64))::bit(512)) from 5)"
            email="CASE WHEN email IS NULL THEN NULL ELSE 'k1:' || encode(sha256($opad || sha256($ipad || convert_to(email, 'UTF8'))), 'hex') END"
        fi
        echo "SELECT 'orders.for.$d=' || count(*) || ' ' || coalesce(md5(string_agg(concat_ws('|', id, country, amount, coalesce($email, '<null>'), coalesce(CASE WHEN card IS NULL THEN NULL ELSE '****' END, '<null>')), ',' ORDER BY id)), '-') FROM orders WHERE id BETWEEN $(lo "$r") AND $(hi "$r") AND country IN ($(allowed_countries "$d"));"
    done
}

declare -A SNAP=()
take_snapshot() {
    local r line out
    SNAP=()
    for r in "${REGIONS[@]}"; do
        out="$(snapshot_sql "$r" | PSQL_TIMEOUT=30 psql_in "$r")" || return 1
        while IFS= read -r line; do
            SNAP["$r.${line%%=*}"]="${line#*=}"
        done <<<"$out"
    done
}

# Compares the snapshot: prints one line per mismatch, false if any.
converged() {
    local verbose="${1:-}" ok=0 r s
    take_snapshot || { [ -n "$verbose" ] && echo "  cannot read every region"; return 1; }
    for table in products currencies; do
        if [ "${SNAP[us.$table]}" != "${SNAP[eu.$table]}" ] || [ "${SNAP[us.$table]}" != "${SNAP[cn.$table]}" ]; then
            ok=1
            [ -n "$verbose" ] && echo "  $table differs: us ${SNAP[us.$table]} / eu ${SNAP[eu.$table]} / cn ${SNAP[cn.$table]}"
        fi
    done
    for r in "${REGIONS[@]}"; do
        if [ "${SNAP[$r.users.foreign]}" != 0 ]; then
            ok=1
            [ -n "$verbose" ] && echo "  RESIDENCY: $r holds ${SNAP[$r.users.foreign]} users rows of other regions"
        fi
        for s in "${REGIONS[@]}"; do
            [ "$s" = "$r" ] && continue
            if [ "${SNAP[$r.orders.from.$s]}" != "${SNAP[$s.orders.for.$r]}" ]; then
                ok=1
                [ -n "$verbose" ] && echo "  orders written in $s: $r holds ${SNAP[$r.orders.from.$s]}, policy says ${SNAP[$s.orders.for.$r]} (count md5)"
            fi
        done
    done
    return $ok
}

wait_converged() { # TIMEOUT WHAT
    local t0=$SECONDS
    if ! wait_for "$1" converged; then
        echo "regions did not converge within $1s after $2:" >&2
        converged verbose >&2 || true
        dump_tables
        fail "no convergence after $2"
    fi
    pass "converged after $2 in $((SECONDS - t0))s (products, currencies identical; orders exactly per policy)"
}

# On failure: every region's replicated tables and pgrelay's bookkeeping, to
# $LOGS/dump-REGION.txt, and the products rows that differ.
dump_tables() {
    local r
    for r in "${REGIONS[@]}"; do
        psql_in "$r" -P pager=off >"$LOGS/dump-$r.txt" 2>&1 <<'EOF'
SELECT 'products', id, name, price, _pgrelay_hlc FROM products ORDER BY id;
SELECT 'currencies', code, rate, _pgrelay_hlc FROM currencies ORDER BY code;
SELECT 'orders', id, country, email, card, amount, _pgrelay_hlc FROM orders ORDER BY id;
SELECT 'tombstones', table_name, pk, hlc, deleted_at FROM pgrelay.tombstones ORDER BY table_name, pk::text;
SELECT 'watermarks', * FROM pgrelay.watermarks ORDER BY source_region;
SELECT 'offsets', * FROM pgrelay.offsets ORDER BY topic, kafka_partition;
EOF
    done
    echo "products rows that differ between regions (region|products|id|name|price|stamp):" >&2
    for r in "${REGIONS[@]}"; do
        grep '^products|' "$LOGS/dump-$r.txt" | sed "s/^/$r|/"
    done | sort -t'|' -k3,3n -k1,1 | awk -F'|' '
        { key = $3; rows[key] = rows[key] "\n  " $0; vals[key, $1] = $4 "|" $5 "|" $6; seen[key]++ }
        END { for (k in seen) if (seen[k] != 3 || vals[k, "us"] != vals[k, "eu"] || vals[k, "us"] != vals[k, "cn"]) print "id " k ":" rows[k] }
    ' | head -n 60 >&2
    echo "(full dumps: $LOGS/dump-*.txt)" >&2
}

# Explicit residency assertions, each with its own message.
assert_residency() {
    local r n
    for r in "${REGIONS[@]}"; do
        n="$(psql_in "$r" -c "SELECT count(*) FROM users WHERE id NOT BETWEEN $(lo "$r") AND $(hi "$r")")"
        [ "$n" = 0 ] || fail "RESIDENCY: $r holds $n users rows written in other regions (users is local)"
        n="$(psql_in "$r" -c "SELECT count(*) FROM orders WHERE id NOT BETWEEN $(lo "$r") AND $(hi "$r") AND country NOT IN ($(allowed_countries "$r"))")"
        [ "$n" = 0 ] || fail "RESIDENCY: $r holds $n orders of other regions whose home does not allow $r"
        n="$(psql_in "$r" -c "SELECT count(*) FROM orders WHERE id NOT BETWEEN $(lo "$r") AND $(hi "$r") AND card IS NOT NULL AND card <> '****'")"
        [ "$n" = 0 ] || fail "RESIDENCY: $r holds $n card numbers of other regions' orders (card is masked)"
    done
    n="$(psql_in cn -c "SELECT count(*) FROM orders WHERE id NOT BETWEEN $(lo cn) AND $(hi cn) AND country IN ('DE','FR')")"
    [ "$n" = 0 ] || fail "RESIDENCY: cn holds $n EU-homed orders"
    n="$(psql_in cn -c "SELECT count(*) FROM orders WHERE id NOT BETWEEN $(lo cn) AND $(hi cn) AND (email LIKE '%@%' OR email !~ '^[^:@]+:[0-9a-f]{64}$')")"
    [ "$n" = 0 ] || fail "RESIDENCY: cn holds $n e-mail addresses of other regions' orders that are not hashes"
    n="$(psql_in cn -c "SELECT count(*) FROM orders WHERE id NOT BETWEEN $(lo cn) AND $(hi cn)")"
    [ "$n" -gt 0 ] || fail "cn received no order at all from the other regions"
    pass "residency: users local, EU-homed orders never in cn, no order where its home forbids it, emails hashed in cn, cards masked outside their home"
}

# ---------------------------------------------------------------------- workload
# Phase 1: every table and class, concurrently in the three regions. Ids:
# region k writes orders/users/own products in [k*1e6, k*1e6+999999];
# products 1..30 are written by every region (conflicts, last writer wins).
phase1_sql() {
    local r="$1" k="${RID[$1]}" b
    b="$(lo "$1")"
    cat <<EOF
INSERT INTO users SELECT $b + g, 'person' || g || '@$r.example', upper('$r') FROM generate_series(1, 20) g;
INSERT INTO products SELECT g, '$r-p' || g, g * 1.5 FROM generate_series(1, 30) g
    ON CONFLICT (id) DO UPDATE SET name = excluded.name, price = excluded.price;
INSERT INTO products SELECT $b + g, '$r-own' || g, g FROM generate_series(1, 20) g;
UPDATE products SET price = price + 1 WHERE id BETWEEN $b + 1 AND $b + 10;
DELETE FROM products WHERE id BETWEEN $b + 16 AND $b + 20;
UPDATE products SET name = name || '-x' WHERE id BETWEEN 1 AND 10;
DELETE FROM products WHERE id = 25 + $k;
INSERT INTO orders SELECT $b + g, (ARRAY['US','CA','DE','FR','CN','BR'])[1 + g % 6],
    CASE WHEN g % 10 = 0 THEN NULL ELSE 'buyer' || g || '@$r.example' END,
    '4000-$k-' || g, g + 0.25 FROM generate_series(1, 60) g;
UPDATE orders SET amount = amount + 100 WHERE id BETWEEN $b + 1 AND $b + 20;
-- home moves: US -> DE (must leave cn), CN -> US (arrives in us and eu)
UPDATE orders SET country = 'DE' WHERE id IN ($b + 6, $b + 12);
UPDATE orders SET country = 'US' WHERE id IN ($b + 4, $b + 10);
DELETE FROM orders WHERE id IN ($b + 30, $b + 31);
EOF
    if [ "$r" = us ]; then
        cat <<'EOF'
INSERT INTO currencies VALUES ('EUR', 1.08), ('CNY', 0.14), ('GBP', 1.27);
UPDATE currencies SET rate = 1.09 WHERE code = 'EUR';
EOF
    fi
}

# A stream of small transactions (one row per table and commit, 20 per second)
# for about SECONDS_ seconds: ids [k*1e6 + BASE + 1, ...].
stream_sql() { # REGION BASE COUNT
    local r="$1" k="${RID[$1]}" base=$(($(lo "$1") + $2)) n="$3"
    cat <<EOF
DO \$\$
BEGIN
    FOR i IN 1..$n LOOP
        INSERT INTO orders VALUES ($base + i, (ARRAY['US','CA','DE','FR','CN','BR'])[1 + i % 6],
            'stream' || i || '@$r.example', '5000-$k-' || i, i);
        INSERT INTO products VALUES ($base + i, '$r-s' || i, i);
        IF i % 10 = 0 THEN
            UPDATE products SET name = '$r-shared' || i WHERE id = 1 + (i / 10) % 30;
        END IF;
        COMMIT;
        PERFORM pg_sleep(0.05);
    END LOOP;
END
\$\$;
EOF
}

start_writers() { # BASE COUNT
    local r
    WRITERS=()
    for r in "${REGIONS[@]}"; do
        stream_sql "$r" "$1" "$2" | PSQL_TIMEOUT=300 psql_in "$r" >"$LOGS/writer-$r-$1.log" 2>&1 &
        WRITERS+=($!)
    done
}

wait_writers() {
    local pid rc=0
    for pid in "${WRITERS[@]}"; do wait "$pid" || rc=1; done
    WRITERS=()
    [ "$rc" = 0 ] || fail "a writer failed: see $LOGS/writer-*.log"
}

count_in() { psql_in "$1" -c "$2"; }
has_product() { [ "$(count_in "$1" "SELECT count(*) FROM products WHERE id = $2")" = 1 ]; }

# ====================================================================== main
log "e2e-docker: compose ${COMPOSE[*]}, project $PROJECT, build mode $BUILD_MODE"
exec 9>"$WORK/.build.lock"
flock -w 1800 9 || fail "another e2e-docker run holds $WORK/.build.lock"
build_base
build_postgres
build_tansu
build_relay
flock -u 9
BUILD_DONE=$SECONDS

export PGRELAY_IMAGE="$RELAY_IMAGE" POSTGRES_IMAGE="$PG_IMAGE" KAFKA_IMAGE="$TANSU_IMAGE"
export PG_US_PASSWORD="us-$RANDOM$RANDOM" PG_EU_PASSWORD="eu-$RANDOM$RANDOM" PG_CN_PASSWORD="cn-$RANDOM$RANDOM"
export PGRELAY_US_HASH_KEY="us-key-$RANDOM$RANDOM-0123456789abcdef0123"
export PGRELAY_EU_HASH_KEY="eu-key-$RANDOM$RANDOM-0123456789abcdef0123"
export PGRELAY_CN_HASH_KEY="cn-key-$RANDOM$RANDOM-0123456789abcdef0123"
export PGRELAY_LOG=info

log "compose up (postgres x3 + broker -> setup x3 -> sidecars x3)"
STACK_UP=1
timeout 300 "${COMPOSE_CMD[@]}" up -d --no-build >"$LOGS/up.log" 2>&1 ||
    { tail -n 30 "$LOGS/up.log" >&2; fail "docker compose up failed (or took over 300s)"; }
for svc in postgres-us postgres-eu postgres-cn kafka pgrelay-us pgrelay-eu pgrelay-cn; do
    CID[$svc]="$(compose ps -q "$svc")"
    [ -n "${CID[$svc]}" ] || fail "no container for $svc"
done
for r in "${REGIONS[@]}"; do
    wait_for 120 ready "$r" || fail "pgrelay-$r is not ready (/readyz) after 120s"
done
pass "stack up in order (databases and broker healthy, setup done in every region), every sidecar ready (/readyz)"
for r in "${REGIONS[@]}"; do
    timeout 120 docker exec "${CID[pgrelay-$r]}" pgrelay check --config /etc/pgrelay/relay.toml --region "$r" \
        >"$LOGS/check-$r.log" 2>&1 || { cat "$LOGS/check-$r.log" >&2; fail "pgrelay check --region $r failed inside pgrelay-$r"; }
done
pass "pgrelay check passes inside every sidecar"

# ---- phase 1: mixed workload everywhere at once
log "phase 1: mixed workload in us, eu and cn at the same time"
pids=()
for r in "${REGIONS[@]}"; do
    phase1_sql "$r" | psql_in "$r" >"$LOGS/phase1-$r.log" 2>&1 &
    pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || fail "phase 1 workload failed: see $LOGS/phase1-*.log"; done
if psql_in eu -c "INSERT INTO currencies VALUES ('JPY', 0.0067)" >"$LOGS/owned-refused.log" 2>&1; then
    fail "eu could write currencies, a table owned by us"
fi
pass "eu was refused a write to currencies (owned by us): $(grep -m1 -o 'ERROR:.*' "$LOGS/owned-refused.log" | cut -c1-100)"
wait_converged 120 "phase 1"
assert_residency
[ "$(count_in eu "SELECT count(*) FROM currencies")" = 3 ] || fail "currencies (owned by us) did not reach eu whole"

# ---- phase 2: kill -9 a sidecar while every region writes
log "phase 2: streams of small transactions in every region; docker kill pgrelay-eu mid-stream"
start_writers 100000 200
sleep 2
timeout 60 docker kill "${CID[pgrelay-eu]}" >/dev/null
KILLED_AT=$SECONDS
sleep 1
if running "${CID[pgrelay-eu]}"; then fail "pgrelay-eu is running again right after docker kill"; fi
sleep 4
# eu's own writes since the kill cannot have left eu
eu_rows="$(count_in eu "SELECT count(*) FROM products WHERE id > $(lo eu) + 100000 AND id <= $(hi eu)")"
us_rows="$(count_in us "SELECT count(*) FROM products WHERE id > $(lo eu) + 100000 AND id <= $(hi eu)")"
[ "$us_rows" -lt "$eu_rows" ] || fail "with pgrelay-eu killed, us already holds all $eu_rows stream rows of eu"
timeout 60 docker start "${CID[pgrelay-eu]}" >/dev/null
pass "pgrelay-eu killed for $((SECONDS - KILLED_AT))s: eu's writes stayed queued (eu had $eu_rows stream rows, us $us_rows of them); restarted"
wait_writers
wait_for 120 ready eu || fail "pgrelay-eu not ready after its restart"
wait_converged 180 "the kill and restart of pgrelay-eu"
assert_residency
n="$(count_in cn "SELECT count(*) FROM products WHERE id BETWEEN $(lo eu) + 100001 AND $(lo eu) + 100200")"
[ "$n" = 200 ] || fail "cn holds $n of the 200 products eu wrote around the kill"
n="$(count_in us "SELECT count(*) FROM orders WHERE id BETWEEN $(lo eu) + 100001 AND $(lo eu) + 100200")"
m="$(count_in eu "SELECT count(*) FROM orders WHERE id BETWEEN $(lo eu) + 100001 AND $(lo eu) + 100200 AND country IN ('US','CA')")"
[ "$n" = "$m" ] && [ "$n" -gt 0 ] || fail "us holds $n of the $m US-homed orders eu wrote around the kill"
pass "nothing lost: every row written during the outage is in every region allowed to hold it"

# ---- phase 3: a sidecar cut off the shared network
WAN="$(docker network ls -q --filter "label=com.docker.compose.project=$PROJECT" --filter label=com.docker.compose.network=wan)"
[ -n "$WAN" ] || WAN="$(docker network ls -q --filter "name=${PROJECT}_wan")"
[ -n "$WAN" ] || fail "cannot find the wan network of $PROJECT"
log "phase 3: pgrelay-cn disconnected from the shared network while every region writes"
timeout 60 docker network disconnect "$WAN" "${CID[pgrelay-cn]}"
CUT_AT=$SECONDS
start_writers 200000 200
us_marker=$(($(lo us) + 200001))
cn_marker=$(($(lo cn) + 200001))
wait_for 60 has_product eu "$us_marker" ||
    fail "during the cut, eu did not receive us's writes within 60s: us -> eu must not depend on cn"
wait_for 60 has_product cn "$cn_marker" || fail "cn's writer did not start"
n="$(count_in cn "SELECT count(*) FROM products WHERE id = $us_marker")"
[ "$n" = 0 ] || fail "cn received us's writes while its sidecar was cut off: the cut did not work"
n="$(count_in us "SELECT count(*) FROM products WHERE id = $cn_marker")"
[ "$n" = 0 ] || fail "us received cn's writes while pgrelay-cn was cut off: the cut did not work"
wait_writers
while [ $((SECONDS - CUT_AT)) -lt "${PGRELAY_E2E_CUT_SECONDS:-25}" ]; do sleep 1; done
n="$(count_in cn "SELECT count(*) FROM products WHERE id BETWEEN $(lo us) + 200001 AND $(lo eu) + 200200 AND id % 1000000 > 200000")"
[ "$n" = 0 ] || fail "cn received $n products of us/eu while its sidecar was cut off"
n="$(count_in us "SELECT count(*) FROM products WHERE id BETWEEN $(lo cn) + 200001 AND $(lo cn) + 200200")"
[ "$n" = 0 ] || fail "us received $n products of cn while pgrelay-cn was cut off"
timeout 60 docker network connect "$WAN" "${CID[pgrelay-cn]}"
pass "pgrelay-cn cut off for $((SECONDS - CUT_AT))s: us and eu kept replicating, nothing crossed to or from cn; reconnected"
wait_converged 240 "the network cut of pgrelay-cn"
assert_residency
running "${CID[pgrelay-cn]}" || fail "pgrelay-cn exited during the cut"

# ---- the tools inside the containers
wait_for 60 healthy us || fail "pgrelay-us is not healthy (image HEALTHCHECK on /healthz)"
set +e
timeout 120 docker exec "${CID[pgrelay-us]}" pgrelay status --config /etc/pgrelay/relay.toml >"$LOGS/status.log" 2>&1
status_rc=$?
set -e
sed 's/^/  /' "$LOGS/status.log" >&2
[ "$status_rc" = 0 ] || fail "pgrelay status exited with $status_rc (2: a region pair is failed)"
pass "image HEALTHCHECK healthy; pgrelay status: no failed region pair"
for r in "${REGIONS[@]}"; do
    running "${CID[pgrelay-$r]}" || fail "pgrelay-$r is not running at the end"
done

FAILED=0
echo
echo "e2e-docker: PASSED"
echo "  total run time: ${SECONDS}s (images ${BUILD_DONE}s, scenario $((SECONDS - BUILD_DONE))s)"
echo "  runtime image $RELAY_IMAGE: $(image_mb "$RELAY_IMAGE") MB (base $BASE_IMAGE $(image_mb "$BASE_IMAGE") MB)"
