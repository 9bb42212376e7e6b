#!/usr/bin/env bash
# Peak memory of pgrelay's capture side while one huge transaction streams
# through it (brief §5.5: "a single transaction of millions of rows passes
# through with flat memory").
#
# For each size: a fresh Kafka-protocol broker (Tansu, in memory), `pgrelay
# setup`, `pgrelay run --role capture` for region us (one `global` table of
# 8 columns, destination eu), then ONE transaction
#     INSERT INTO bench_items SELECT ... FROM generate_series(1, N)
# and the time until the slot's confirmed_flush_lsn reaches the WAL end of
# that transaction. Prints pgrelay's peak RSS (VmHWM from /proc/PID/status,
# and the max of VmRSS polled every 100 ms) per size, and the CPU seconds
# pgrelay, PostgreSQL (its walsender) and the broker used during the catch-up
# (CPU us per row: independent of what else runs on the machine). Target:
# peak RSS under 150 MB and flat across sizes.
#
# Then the apply side: `pgrelay run --role apply` for region eu (a second
# database of the same cluster) starts with all of those records waiting in
# the topic, and its peak RSS and the time until every row is in eu's table
# are printed: the consumer's prefetch and the batches must keep it bounded
# too.
#
#   bash scripts/bench-memory.sh                      # 100k and 1M rows
#   bash scripts/bench-memory.sh --sizes 100k,1M,5M   # or PGRELAY_BENCH_SIZES=...
#
# Environment:
#   PGRELAY_BENCH_SIZES        sizes (k/M suffixes), default 100k,1M
#   PGRELAY_BIN                use this binary instead of building target/release/pgrelay
#   PGRELAY_BENCH_MAX_IN_FLIGHT  relay.capture.max_in_flight (default: pgrelay's default)
#   PGRELAY_BENCH_KAFKA_PROPERTIES  lines for [kafka.properties], e.g.
#                              '"queued.min.messages" = "20000"' (keys quoted)

#   PGRELAY_BENCH_TIMEOUT      seconds to wait for one size to be confirmed (default 1800)
#   PGRELAY_BENCH_KEEP=1       keep the work directory (logs) after the run
#   PGRELAY_BENCH_NICE         e.g. -10: run at that niceness (shared machines)
#
# Everything (PostgreSQL 15 cluster, broker, pgrelay) runs on loopback on free
# ports under a temporary directory, and is stopped and removed on exit.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shared helpers: as_pg, free_port, now, stop_pid, cpu_snap, cpu_used
# shellcheck source=lib/common.sh
source "$ROOT/scripts/lib/common.sh"
cd "$ROOT"
# PGRELAY_BENCH_NICE=-10: run everything (servers included) at that niceness,
# to be less disturbed by other work on a shared machine
if [ -n "${PGRELAY_BENCH_NICE:-}" ] && [ -z "${_PGRELAY_BENCH_NICED:-}" ]; then
    exec env _PGRELAY_BENCH_NICED=1 nice -n "$PGRELAY_BENCH_NICE" bash "${BASH_SOURCE[0]}" "$@"
fi

SIZES="${PGRELAY_BENCH_SIZES:-100k,1M}"
while [ $# -gt 0 ]; do
    case "$1" in
        --sizes) SIZES="$2"; shift 2 ;;
        --sizes=*) SIZES="${1#--sizes=}"; shift ;;
        -h|--help) sed -n '2,37p' "$0"; exit 0 ;;
        *) echo "unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
done
TIMEOUT="${PGRELAY_BENCH_TIMEOUT:-1800}"
PGBIN="${PGRELAY_PG_BIN:-/usr/lib/postgresql/15/bin}"
TANSU="${PGRELAY_TANSU:-$ROOT/.tools/bin/tansu}"

log() { printf '[bench-memory] %s\n' "$*" >&2; }

if [ ! -x "$PGBIN/initdb" ] || [ ! -x "$TANSU" ] || ! command -v psql >/dev/null; then
    bash scripts/install-deps.sh
fi
if [ -n "${PGRELAY_BIN:-}" ]; then
    BIN="$PGRELAY_BIN"
else
    log "building pgrelay (release)..."
    cargo build --release --locked --quiet
    BIN="$ROOT/target/release/pgrelay"
fi

WORK="$(mktemp -d /tmp/pgrelay-bench-memory.XXXXXX)"
chmod 755 "$WORK"
chown postgres "$WORK"
PASSWORD="bench-$(date +%s)-$RANDOM"
RELAY_PID=""
BROKER_PID=""

cleanup() {
    set +e
    [ -n "$RELAY_PID" ] && kill -TERM "$RELAY_PID" 2>/dev/null && wait "$RELAY_PID" 2>/dev/null
    [ -n "$BROKER_PID" ] && kill -TERM "$BROKER_PID" 2>/dev/null && wait "$BROKER_PID" 2>/dev/null
    [ -d "$WORK/pg" ] && as_pg "$PGBIN/pg_ctl" -D "$WORK/pg" -m immediate -w stop >/dev/null 2>&1
    if [ -n "${PGRELAY_BENCH_KEEP:-}" ]; then
        log "kept $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

sql() { psql -X -q -At -v ON_ERROR_STOP=1 -h "$WORK" -p "$PG_PORT" -U postgres -d postgres -c "$1"; }
elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$1" "$2"; }
to_rows() {
    case "$1" in
        *[kK]) echo $(( ${1%[kK]} * 1000 )) ;;
        *[mM]) echo $(( ${1%[mM]} * 1000000 )) ;;
        *) echo "$1" ;;
    esac
}
kb_field() { awk -v f="$1:" '$1 == f { print $2 }' "/proc/$2/status" 2>/dev/null || true; }

# --- PostgreSQL 15 -----------------------------------------------------------
echo "$PASSWORD" > "$WORK/pw"; chown postgres "$WORK/pw"
as_pg "$PGBIN/initdb" -D "$WORK/pg" --no-sync -U postgres --auth-local=trust \
    --auth-host=scram-sha-256 --pwfile="$WORK/pw" >/dev/null
PG_PORT="$(free_port)"
cat >> "$WORK/pg/postgresql.auto.conf" <<CONF
port = $PG_PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$WORK'
wal_level = logical
track_commit_timestamp = on
max_replication_slots = 10
max_wal_senders = 10
fsync = off
synchronous_commit = off
full_page_writes = off
shared_buffers = 256MB
max_wal_size = 8GB
checkpoint_timeout = 30min
wal_sender_timeout = 300s
CONF
as_pg "$PGBIN/pg_ctl" -D "$WORK/pg" -l "$WORK/pg.log" -w start >/dev/null
sql "CREATE DATABASE eu" >/dev/null
TABLE_SQL="CREATE TABLE bench_items (
        id bigint PRIMARY KEY, name text, email text, price numeric(12,2),
        active boolean, created_at timestamptz, doc jsonb, country text)"
sql "$TABLE_SQL"
sql_eu() { psql -X -q -At -v ON_ERROR_STOP=1 -h "$WORK" -p "$PG_PORT" -U postgres -d eu -c "$1"; }
sql_eu "$TABLE_SQL"
log "PostgreSQL 15 on 127.0.0.1:$PG_PORT"

# --- one size ----------------------------------------------------------------
CONFIG="$WORK/relay.toml"
write_config() { # $1 broker port, $2 http port
    cat > "$CONFIG" <<TOML
[relay]
prefix = "pgrelay"

[relay.capture]
status_interval = "200ms"
${PGRELAY_BENCH_MAX_IN_FLIGHT:+max_in_flight = $PGRELAY_BENCH_MAX_IN_FLIGHT}
topic_partitions = 6

[http]
listen = "127.0.0.1:$2"

[kafka]
brokers = "127.0.0.1:$1"
${PGRELAY_BENCH_KAFKA_PROPERTIES:+[kafka.properties]
$PGRELAY_BENCH_KAFKA_PROPERTIES}

[regions.us]
id = 1
dsn = "host=127.0.0.1 port=$PG_PORT user=postgres password=$PASSWORD dbname=postgres"

[regions.eu]
id = 2
dsn = "host=127.0.0.1 port=$PG_PORT user=postgres password=$PASSWORD dbname=eu"

[[tables]]
name = "public.bench_items"
class = "global"
TOML
}

start_broker() {
    local port
    port="$(free_port)"
    mkdir -p "$WORK/broker"
    (cd "$WORK/broker" && exec "$TANSU" broker --listener-url "tcp://127.0.0.1:$port" \
        --advertised-listener-url "tcp://127.0.0.1:$port" --storage-engine memory://tansu/ \
        >>"$WORK/broker.log" 2>&1) &
    BROKER_PID=$!
    for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break; sleep 0.1; done
    BROKER_PORT="$port"
}


published() { # records pgrelay handed to the producer (its metric)
    curl -fsS "http://127.0.0.1:$HTTP_PORT/metrics" > "$WORK/metrics-$1.txt" 2>/dev/null || true
    awk '/^pgrelay_capture_published_total/ { s += $NF } END { printf "%d", s }' "$WORK/metrics-$1.txt"
}

RESULTS=()
APPLY_RESULTS=()
NEXT_ID=1
IFS=',' read -r -a SIZE_LIST <<<"$SIZES"
for size in "${SIZE_LIST[@]}"; do
    rows="$(to_rows "$size")"
    log "== $size ($rows rows in one transaction) =="
    start_broker
    HTTP_PORT="$(free_port)"
    write_config "$BROKER_PORT" "$HTTP_PORT"
    PGRELAY_LOG=warn "$BIN" setup --config "$CONFIG" --region us >"$WORK/setup.log" 2>&1 \
        || { cat "$WORK/setup.log" >&2; exit 1; }
    PGRELAY_LOG=info "$BIN" run --config "$CONFIG" --region us --role capture \
        >>"$WORK/relay.log" 2>&1 &
    RELAY_PID=$!
    # streaming once the slot is active
    for _ in $(seq 300); do
        [ "$(sql "SELECT active FROM pg_replication_slots WHERE slot_name = 'pgrelay_us'")" = t ] && break
        kill -0 "$RELAY_PID" 2>/dev/null || { tail -n 20 "$WORK/relay.log" >&2; exit 1; }
        sleep 0.1
    done
    sleep 1
    base_rss="$(kb_field VmRSS "$RELAY_PID")"

    # sample VmRSS every 100 ms in the background
    : > "$WORK/rss.samples"
    ( while kill -0 "$RELAY_PID" 2>/dev/null; do
          kb_field VmRSS "$RELAY_PID" >> "$WORK/rss.samples"; sleep 0.1
      done ) &
    SAMPLER=$!

    cpu_snap "$WORK/cpu0" pgrelay="$RELAY_PID" postgres="$(head -n1 "$WORK/pg/postmaster.pid")" broker="$BROKER_PID"
    t0="$(now)"
    # two -c: the LSN is read after the INSERT's own transaction committed;
    # the insert position (pg_current_wal_lsn is the *write* position, which
    # lags behind an asynchronous commit)
    end_lsn="$(psql -X -q -At -v ON_ERROR_STOP=1 -h "$WORK" -p "$PG_PORT" -U postgres -d postgres \
        -c "INSERT INTO bench_items
            SELECT g, 'item ' || g, 'user' || g || '@example.com', (g % 100000) / 100.0,
                   g % 2 = 0, now(), jsonb_build_object('n', g, 'tag', 'bench'), 'US'
            FROM generate_series($NEXT_ID, $((NEXT_ID + rows - 1))) AS g" \
        -c "SELECT pg_current_wal_insert_lsn()")"
    t1="$(now)"
    cpu_snap "$WORK/cpu1" pgrelay="$RELAY_PID" postgres="$(head -n1 "$WORK/pg/postmaster.pid")" broker="$BROKER_PID"
    NEXT_ID=$((NEXT_ID + rows))
    ok=""
    deadline=$(( $(date +%s) + TIMEOUT ))
    while [ "$(date +%s)" -lt "$deadline" ]; do
        if [ "$(sql "SELECT confirmed_flush_lsn >= '$end_lsn' FROM pg_replication_slots WHERE slot_name = 'pgrelay_us'")" = t ]; then
            ok=1; break
        fi
        kill -0 "$RELAY_PID" 2>/dev/null || break
        sleep 0.1
    done
    t2="$(now)"
    cpu_snap "$WORK/cpu2" pgrelay="$RELAY_PID" postgres="$(head -n1 "$WORK/pg/postmaster.pid")" broker="$BROKER_PID"
    hwm="$(kb_field VmHWM "$RELAY_PID")"
    kill "$SAMPLER" 2>/dev/null || true; wait "$SAMPLER" 2>/dev/null || true
    max_rss="$(sort -n "$WORK/rss.samples" | tail -n1)"
    pub="$(published "$size")"
    stop_pid "$RELAY_PID"; RELAY_PID=""
    [ -n "$ok" ] || { log "confirmed_flush_lsn did not reach $end_lsn"; tail -n 20 "$WORK/relay.log" >&2; exit 1; }

    # the apply side catching up the whole backlog: region eu consumes the
    # records now in the topic (a fresh target table each size)
    sql_eu "TRUNCATE bench_items" >/dev/null 2>&1 || true
    sql_eu "DELETE FROM pgrelay.tombstones; DELETE FROM pgrelay.offsets" >/dev/null 2>&1 || true
    PGRELAY_LOG=warn "$BIN" setup --config "$CONFIG" --region eu >"$WORK/setup-eu.log" 2>&1 \
        || { cat "$WORK/setup-eu.log" >&2; exit 1; }
    PGRELAY_LOG=info "$BIN" run --config "$CONFIG" --region eu --role apply \
        >>"$WORK/relay-eu.log" 2>&1 &
    RELAY_PID=$!
    : > "$WORK/rss-apply.samples"
    ( while kill -0 "$RELAY_PID" 2>/dev/null; do
          kb_field VmRSS "$RELAY_PID" >> "$WORK/rss-apply.samples"; sleep 0.1
      done ) &
    SAMPLER=$!
    a0="$(now)"
    applied=""
    deadline=$(( $(date +%s) + TIMEOUT ))
    while [ "$(date +%s)" -lt "$deadline" ]; do
        [ "$(sql_eu "SELECT count(*) FROM bench_items")" = "$rows" ] && { applied=1; break; }
        kill -0 "$RELAY_PID" 2>/dev/null || break
        sleep 0.5
    done
    a1="$(now)"
    apply_hwm="$(kb_field VmHWM "$RELAY_PID")"
    kill "$SAMPLER" 2>/dev/null || true; wait "$SAMPLER" 2>/dev/null || true
    stop_pid "$RELAY_PID"; RELAY_PID=""
    stop_pid "$BROKER_PID"; BROKER_PID=""
    [ -n "$applied" ] || { log "region eu did not apply the $rows rows"; tail -n 20 "$WORK/relay-eu.log" >&2; exit 1; }
    apply_s="$(elapsed "$a0" "$a1")"
    apply_line="$(printf '%-6s rows=%-8s apply catch-up: peak_rss(VmHWM)=%6.1f MB  max_polled_rss=%6.1f MB  start->all applied=%7.2fs (%s rows/s)' \
        "$size" "$rows" "$(python3 -c "print(${apply_hwm:-0}/1024)")" \
        "$(python3 -c "print($(sort -n "$WORK/rss-apply.samples" | tail -n1)/1024)")" "$apply_s" \
        "$(python3 -c "print(f'{$rows / max($apply_s, 0.01):,.0f}')")")"
    log "$apply_line"
    APPLY_RESULTS+=("$apply_line")
    insert_s="$(elapsed "$t0" "$t1")"
    catchup_s="$(elapsed "$t1" "$t2")"
    total_s="$(elapsed "$t0" "$t2")"
    rate="$(python3 -c "print(f'{$rows / max($catchup_s, 0.01):,.0f}')")"
    line="$(printf '%-6s rows=%-8s baseline_rss=%5.1f MB  peak_rss(VmHWM)=%6.1f MB  max_polled_rss=%6.1f MB  insert=%7.2fs  commit->confirmed=%7.2fs (%s rows/s)  total=%7.2fs  published=%s' \
        "$size" "$rows" "$(python3 -c "print(${base_rss:-0}/1024)")" "$(python3 -c "print(${hwm:-0}/1024)")" \
        "$(python3 -c "print(${max_rss:-0}/1024)")" "$insert_s" "$catchup_s" "$rate" "$total_s" "$pub")"
    # CPU during the catch-up (commit -> confirmed): pgrelay, the cluster (its
    # walsender decoding the transaction), the broker
    cpu="$(cpu_used "$WORK/cpu1" "$WORK/cpu2")"
    pg_cpu="$(sed -n 's/.*pgrelay=\([0-9.]*\).*/\1/p' <<<"$cpu")"
    line="$line
         catch-up CPU seconds: $cpu; pgrelay $(python3 -c "print(f'{1e6 * ${pg_cpu:-0} / $rows:.2f}')") CPU us/row = $(python3 -c "print(f'{$rows / max(${pg_cpu:-0}, 1e-3):,.0f}')") rows per pgrelay CPU-second"
    log "$line"
    RESULTS+=("$line")
done

echo
echo "pgrelay capture side, one transaction per size (target: peak RSS < 150 MB, flat):"
for r in "${RESULTS[@]}"; do echo "  $r"; done
echo "pgrelay apply side, the same records as one backlog (a sidecar started after they were all in Kafka):"
for r in "${APPLY_RESULTS[@]}"; do echo "  $r"; done
