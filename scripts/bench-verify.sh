#!/usr/bin/env bash
# The cost of `pgrelay verify`: three PostgreSQL clusters (us, eu, cn) on
# this machine, each holding the same ROWS rows of an 6-column table (a
# global table: every pair compares every row), started and removed by
# this script.
#
# Per size in SIZES (default "100000 1000000"):
#   copy    the three regions' `COPY items TO '/dev/null'` at once (wall
#           time): what PostgreSQL itself takes to read the table
#   verify  `pgrelay verify` over the three regions (wall time, peak RSS),
#           with bucket sums of the fast seeded hash (the default) and of
#           keyed SHA-256 (`--digest sha256`)
#   ratio   verify / copy (target: <= 3)
# Each is run once to warm the caches, then timed.
#
#   PGRELAY_BENCH_SIZES="100000 1000000 10000000" bash scripts/bench-verify.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=lib/common.sh
. "$ROOT/scripts/lib/common.sh"

PGBIN="${PGRELAY_PG_BIN:-/usr/lib/postgresql/15/bin}"
SIZES="${PGRELAY_BENCH_SIZES:-100000 1000000}"
# the work is PostgreSQL's (hashing in each database); PGRELAY_BIN may name
# another build of the binary (e.g. target/debug/pgrelay)
BIN="${PGRELAY_BIN:-$ROOT/target/release/pgrelay}"
REGIONS=(us eu cn)
declare -A PORT=()

log() { echo "[bench-verify] $*" >&2; }

if [ -z "${PGRELAY_BIN:-}" ] && { [ ! -x "$BIN" ] || [ -n "$(find "$ROOT/src" -newer "$BIN" -name '*.rs' | head -1)" ]; }; then
    (cd "$ROOT" && cargo build --release --locked --bin pgrelay)
fi

WORK="$(mktemp -d /tmp/pgrelay-bench-verify.XXXXXX)"
chmod 755 "$WORK"
if [ "$(id -u)" = 0 ]; then chown postgres "$WORK"; fi

cleanup() {
    set +e
    for r in "${!PORT[@]}"; do
        as_pg "$PGBIN/pg_ctl" -D "$WORK/$r" -m immediate -w stop >/dev/null 2>&1
    done
    if [ -n "${PGRELAY_BENCH_KEEP:-}" ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

psql_in() { # region sql
    PGOPTIONS="-c client_min_messages=warning" as_pg "$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$WORK" -p "${PORT[$1]}" -U postgres -d postgres -Atc "$2"
}

for r in "${REGIONS[@]}"; do
    as_pg "$PGBIN/initdb" -D "$WORK/$r" --no-sync -U postgres --auth-local=trust >/dev/null 2>&1
    PORT[$r]="$(free_port)"
    cat >> "$WORK/$r/postgresql.auto.conf" <<CONF
port = ${PORT[$r]}
listen_addresses = ''
unix_socket_directories = '$WORK'
fsync = off
shared_buffers = 256MB
max_wal_size = 8GB
log_min_duration_statement = ${PGRELAY_BENCH_LOG_MS:--1}
CONF
    as_pg "$PGBIN/pg_ctl" -D "$WORK/$r" -l "$WORK/$r.log" -w start >/dev/null
done

# verify reads the databases only: no Kafka is contacted
{
    id=1
    for r in "${REGIONS[@]}"; do
        printf '[regions.%s]\nid = %d\ndsn = "host=%s port=%s user=postgres dbname=postgres"\n[regions.%s.kafka]\nbrokers = "127.0.0.1:9"\n\n' \
            "$r" "$id" "$WORK" "${PORT[$r]}" "$r"
        id=$((id + 1))
    done
    printf '[[tables]]\nname = "public.items"\nclass = "global"\n'
} > "$WORK/relay.toml"

printf '%-10s %-7s %10s %10s %8s %12s\n' ROWS DIGEST COPY_S VERIFY_S RATIO VERIFY_RSS_MB
for rows in $SIZES; do
    for r in "${REGIONS[@]}"; do
        psql_in "$r" "DROP TABLE IF EXISTS items; \
            CREATE TABLE items (id bigint PRIMARY KEY, name text NOT NULL, price numeric(10,2) NOT NULL, \
              note text, updated timestamptz NOT NULL, _pgrelay_hlc bigint); \
            INSERT INTO items SELECT g, 'item ' || g, (g % 1000) / 10.0, repeat('x', 20 + g % 40), \
              timestamptz '2026-01-01' + g * interval '1 second', 7400000000000000000 + g * 64 + 1 \
              FROM generate_series(1, $rows) g"
        psql_in "$r" "VACUUM ANALYZE items"
    done
    copy_all() {
        local pids=()
        for r in "${REGIONS[@]}"; do
            psql_in "$r" "COPY items TO '/dev/null'" & pids+=("$!")
        done
        wait "${pids[@]}"
    }
    copy_all
    t0="$(now)"; copy_all; t1="$(now)"
    copy_s="$(echo "$t1 - $t0" | bc -l)"
    "$BIN" verify --config "$WORK/relay.toml" >/dev/null
    for digest in fast sha256; do
        /usr/bin/time -f '%e %M' -o "$WORK/time" "$BIN" verify --config "$WORK/relay.toml" \
            --digest "$digest" >"$WORK/out" || { cat "$WORK/out"; exit 1; }
        read -r verify_s rss_kb < "$WORK/time"
        printf '%-10s %-7s %10.2f %10.2f %8.2f %12.1f\n' "$rows" "$digest" "$copy_s" "$verify_s" \
            "$(echo "$verify_s / $copy_s" | bc -l)" "$(echo "$rss_kb / 1024" | bc -l)"
    done
done
