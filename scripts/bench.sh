#!/usr/bin/env bash
# pgrelay against PostgreSQL's native logical replication, same machine, same
# workloads, same PostgreSQL settings. Two PostgreSQL 15 clusters ("us" is
# the source, "eu" the target), all on loopback, started and removed by this
# script; a fresh pair (and, for pgrelay, a fresh Tansu broker) per run.
#
#   native   publication on us, subscription on eu (copy_data = false)
#   pgrelay  regions us and eu, tables declared global, `pgrelay run` in each
#            region: us -> Kafka topic pgrelay.us.eu -> eu
#
# Workloads
#   bulk   BULK_INSERTS inserts, then BULK_UPDATES updates, on an 8-column
#          table with a primary key, in transactions of BULK_TX_ROWS rows.
#   small  pgbench, TPC-B-like custom script (3 updates + 1 insert per
#          transaction) from SMALL_CLIENTS clients for SMALL_SECONDS.
#   write  the cost to the source primary: pgbench (the TPC-B-like script of
#          `small`, and an insert-only script) against us for WRITE_SECONDS in
#          three states, each on fresh clusters: (a) no replication, (b) a
#          native publication with a streaming subscriber in eu, (c) pgrelay
#          set up in us and eu with both sidecars streaming. Prints tps and the
#          ratios b/a and c/a (target: c/a >= 0.95 and >= b/a - 0.03).
#          PGRELAY_BENCH_PIN=0:1 pins the source cluster and pgbench to CPU 0
#          and everything else (target, broker, sidecars) to CPU 1, as on
#          separate hosts: the source pays only for what runs in it (its
#          walsender's decoding, the stamp triggers).
#   lag    (with PGRELAY_BENCH_RTT_MS: across that round trip, through
#          delay lines, see start_broker and native_pair)
#          a fixed write rate (LAG_RATE rows/s, LAG_ROWS_PER_TX rows per
#          transaction) for LAG_SECONDS while replication runs; per row the
#          end-to-end lag: clock_timestamp() at insert in us -> the moment the
#          row is written in eu (an ENABLE ALWAYS trigger stamps it).
#   outage catch-up after a region was away: the rows of `lag` at OUTAGE_RATE
#          rows/s (OUTAGE_ROWS_PER_TX per transaction) from start to end;
#          after OUTAGE_WARMUP seconds the target is cut off for
#          OUTAGE_SECONDS, then resumed. States (PGRELAY_BENCH_OUTAGE_STATES):
#            native         subscription disabled (the walsender re-decodes
#                           the backlog from the slot on resume)
#            pgrelay        eu's sidecar stopped (us's keeps publishing to
#                           Kafka; eu consumes the backlog from there)
#            pgrelay-kafka  the broker unreachable, both sidecars running:
#                           us's slot holds the backlog and us's sidecar
#                           must recover on its own. By default the
#                           in-memory broker is frozen (SIGSTOP, SIGCONT to
#                           resume: requests time out, the records are kept;
#                           restarting it would lose them and its topics).
#                           PGRELAY_BENCH_BROKER_OUTAGE=restart uses the
#                           durable broker (TANSU_DURABLE, libsql storage),
#                           killed and started again on its port; that
#                           build does not keep up with OUTAGE_RATE = 5000
#                           (BENCHMARKS.md). The results say which.
#          Printed: the time from the resume (ALTER SUBSCRIPTION ENABLE, the
#          sidecar or the broker started again) until the lag is under 1 s,
#          i.e. the first moment T at which every row inserted in us before
#          T - 1 s had been written in eu -- from the rows' own timestamps
#          (src_ts in us, seen_at in eu), computed after the run -- and the
#          same seen from outside ("polled": every 0.5 s, eu holds every id
#          us's sequence had handed out 1 s or more before), the backlog
#          (rows inserted in us before the resume and written in eu after
#          it), and when eu wrote its first row after the resume. Runs once.
#   scale  pgrelay only: the `small` backlog catch-up (and its CPU
#          accounting) with [relay.apply] sessions_per_source = each of
#          SCALE_SESSIONS, side by side.
#   resync pgrelay only: `pgrelay resync` of a RESYNC_ROWS-row table (the
#          bulk table's shape) from us to eu, until Kafka acknowledged every
#          record, against PostgreSQL's own `COPY … TO STDOUT` of the same
#          table to a client in the same run; rows/s of each, the ratio, CPU
#          per process and the resync's peak memory.
#
# Throughput (bulk, small) is measured from a backlog: replication is paused
# (pgrelay not running in us / subscription disabled) while the workload
# runs, then resumed; the clock runs from the moment the source's slot
# becomes active until the target has applied everything:
#   native   the subscription slot's confirmed_flush_lsn >= the source's WAL end
#   pgrelay  sum(pgrelay.offsets.next_offset) for pgrelay.us.eu in eu = the
#            number of row changes written (one record per change; offsets are
#            committed in the same transaction as the rows)
# and the tables are compared afterwards. Each workload is repeated
# PGRELAY_BENCH_REPEAT times; the median is printed with the ratio
# pgrelay/native.
#
#   bash scripts/bench.sh                                # everything
#   PGRELAY_BENCH_ONLY=bulk,small PGRELAY_BENCH_REPEAT=1 bash scripts/bench.sh
#   PGRELAY_BENCH_ONLY=outage OUTAGE_SECONDS=300 bash scripts/bench.sh   # ~17 min
#   PGRELAY_BENCH_ONLY=scale PGRELAY_BENCH_REPEAT=3 bash scripts/bench.sh
#   PGRELAY_BENCH_ONLY=resync bash scripts/bench.sh                      # ~10 min
#
# Environment (defaults in brackets):
#   PGRELAY_BENCH_ONLY       workloads: bulk,small,lag,write,outage,scale,resync
#                            [bulk,small,lag,write]
#   PGRELAY_BENCH_SYSTEMS    native,pgrelay [both]
#   PGRELAY_BENCH_REPEAT     repetitions of bulk, small, write and scale [3]
#   BULK_INSERTS [1000000]  BULK_UPDATES [500000]  BULK_TX_ROWS [10000]
#   SMALL_SECONDS [30]  SMALL_CLIENTS [8]  SMALL_SCALE [4] (100k accounts each)
#   LAG_SECONDS [60]  LAG_RATE [5000]  LAG_ROWS_PER_TX [10]
#   PGRELAY_BENCH_RTT_MS     distance between us and eu for `lag`, e.g. 120 [0]
#   WRITE_SECONDS [20]  WRITE_CLIENTS [4]  PGRELAY_BENCH_PIN (e.g. 0:1) [no pinning]
#   PGRELAY_BENCH_WRITE_STATES [none native pgrelay pgrelay-plpgsql]: `pgrelay`
#            uses the stamp trigger setup picks (C where the extension is
#            installed), `pgrelay-plpgsql` the PL/pgSQL one
#   PGRELAY_BENCH_NICE       e.g. -10: run at that niceness (shared machines)
#   OUTAGE_SECONDS [300]  OUTAGE_WARMUP [10]  OUTAGE_RATE [5000]  OUTAGE_ROWS_PER_TX [10]
#   OUTAGE_TAIL [5]          seconds the load goes on after the catch-up was seen
#   PGRELAY_BENCH_OUTAGE_STATES [native pgrelay pgrelay-kafka]
#   PGRELAY_BENCH_BROKER_OUTAGE freeze|restart, for pgrelay-kafka [freeze]
#   PGRELAY_TANSU_DURABLE    the libsql Tansu build [.tools/tansu-libsql/bin/tansu]
#   SCALE_SESSIONS [1 2 4]   sessions_per_source values for `scale`
#   RESYNC_ROWS [10000000]   rows of the table `resync` sends
#   PGRELAY_BENCH_RESYNC_JOBS  its --jobs [the command's default]
#   PGRELAY_BENCH_EXTRA_TOML appended to pgrelay's config (tuning experiments);
#            `scale` adds its sessions_per_source to a [relay.apply] table in it
#   PGRELAY_BIN              use this binary instead of building target/release/pgrelay
#   PGRELAY_BENCH_TIMEOUT    seconds to wait for a catch-up [900]
#   PGRELAY_BENCH_KEEP=1     keep the work directory (logs)
#   PGRELAY_BENCH_STATEMENTS=1  load pg_stat_statements into the target (eu) of
#            bulk and small and, after each catch-up, write what eu ran per
#            statement (calls, rows, time, share) to statements-*.txt in the
#            work directory (and the log); it costs the target some CPU, so
#            take CPU figures from runs without it
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

ONLY="${PGRELAY_BENCH_ONLY:-bulk,small,lag,write}"
SYSTEMS="${PGRELAY_BENCH_SYSTEMS:-native,pgrelay}"
WRITE_STATES="${PGRELAY_BENCH_WRITE_STATES:-none native pgrelay pgrelay-plpgsql}"
STAMP_TRIGGER=""
REPEAT="${PGRELAY_BENCH_REPEAT:-3}"
BULK_INSERTS="${BULK_INSERTS:-1000000}"
BULK_UPDATES="${BULK_UPDATES:-500000}"
BULK_TX_ROWS="${BULK_TX_ROWS:-10000}"
SMALL_SECONDS="${SMALL_SECONDS:-30}"
SMALL_CLIENTS="${SMALL_CLIENTS:-8}"
SMALL_SCALE="${SMALL_SCALE:-4}"
LAG_SECONDS="${LAG_SECONDS:-60}"
LAG_RATE="${LAG_RATE:-5000}"
LAG_ROWS_PER_TX="${LAG_ROWS_PER_TX:-10}"
OUTAGE_STATES="${PGRELAY_BENCH_OUTAGE_STATES:-native pgrelay pgrelay-kafka}"
OUTAGE_WARMUP="${OUTAGE_WARMUP:-10}"
OUTAGE_SECONDS="${OUTAGE_SECONDS:-300}"
OUTAGE_RATE="${OUTAGE_RATE:-5000}"
OUTAGE_ROWS_PER_TX="${OUTAGE_ROWS_PER_TX:-10}"
OUTAGE_TAIL="${OUTAGE_TAIL:-5}"
BROKER_OUTAGE="${PGRELAY_BENCH_BROKER_OUTAGE:-freeze}"
SCALE_SESSIONS="${SCALE_SESSIONS:-1 2 4}"
RESYNC_ROWS="${RESYNC_ROWS:-10000000}"
RESYNC_JOBS="${PGRELAY_BENCH_RESYNC_JOBS:-}"
APPLY_SESSIONS=""
TIMEOUT="${PGRELAY_BENCH_TIMEOUT:-900}"
WRITE_SECONDS="${WRITE_SECONDS:-20}"
WRITE_CLIENTS="${WRITE_CLIENTS:-4}"
PIN="${PGRELAY_BENCH_PIN:-}"
RTT_MS="${PGRELAY_BENCH_RTT_MS:-0}"
PGBIN="${PGRELAY_PG_BIN:-/usr/lib/postgresql/15/bin}"
TANSU="${PGRELAY_TANSU:-$ROOT/.tools/bin/tansu}"
# Tansu with durable (libsql) storage, built by install-deps.sh: a broker that
# can be killed and restarted with its data (outage, pgrelay-kafka)
TANSU_DURABLE="${PGRELAY_TANSU_DURABLE:-$ROOT/.tools/tansu-libsql/bin/tansu}"

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
has() { [[ ",$1," == *",$2,"* ]]; }

if [ ! -x "$PGBIN/initdb" ] || [ ! -x "$TANSU" ] || ! command -v pgbench >/dev/null; then
    bash scripts/install-deps.sh
fi
if [ -n "${PGRELAY_BIN:-}" ]; then
    BIN="$PGRELAY_BIN"
else
    log "building pgrelay (release)..."
    cargo build --release --locked --quiet
    BIN="$ROOT/target/release/pgrelay"
fi

WORK="$(mktemp -d /tmp/pgrelay-bench.XXXXXX)"
chmod 755 "$WORK"
chown postgres "$WORK"
PASSWORD="bench-$(date +%s)-$RANDOM"
echo "$PASSWORD" > "$WORK/pw"; chown postgres "$WORK/pw"
RESULTS="$WORK/results.tsv"
: > "$RESULTS"
declare -A PORT=()
declare -A RELAY_PID=()
BROKER_PID=""
BROKER_PORT=""
LOAD_PID=""
PROXY_PIDS=()

# `pinned source|rest PROGRAM...`: runs PROGRAM (a binary, not a shell
# function) on the CPUs PGRELAY_BENCH_PIN gives that group (source = us's
# cluster and the load generator), or unpinned.
pinned() {
    local group="$1"; shift
    if [ -z "$PIN" ]; then "$@"; return; fi
    if [ "$group" = source ]; then taskset -c "${PIN%%:*}" "$@"; else taskset -c "${PIN##*:}" "$@"; fi
}
sql() { PGOPTIONS="-c client_min_messages=warning" psql -X -q -At -v ON_ERROR_STOP=1 -h "$WORK" -p "${PORT[$1]}" -U postgres -d postgres -c "$2"; }
calc() { python3 -c "print($1)"; }

postmaster() { head -n1 "$WORK/$1/postmaster.pid"; }


stop_all() {
    local r
    for r in "${!RELAY_PID[@]}"; do stop_pid "${RELAY_PID[$r]}"; done
    RELAY_PID=()
    if [ -n "$LOAD_PID" ]; then stop_pid "$LOAD_PID"; LOAD_PID=""; fi
    if [ -n "$BROKER_PID" ]; then
        kill -CONT "$BROKER_PID" 2>/dev/null || true   # frozen by outage, pgrelay-kafka
        stop_pid "$BROKER_PID"; BROKER_PID=""
    fi
    for r in "${PROXY_PIDS[@]}"; do stop_pid "$r"; done
    PROXY_PIDS=()
    for r in "${!PORT[@]}"; do
        as_pg "$PGBIN/pg_ctl" -D "$WORK/$r" -m immediate -w stop >/dev/null 2>&1 || true
        rm -rf "${WORK:?}/$r"
    done
    PORT=()
}

cleanup() {
    set +e
    stop_all
    if [ -n "${PGRELAY_BENCH_KEEP:-}" ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start_pg() { # region
    local r="$1" port
    as_pg "$PGBIN/initdb" -D "$WORK/$r" --no-sync -U postgres --auth-local=trust \
        --auth-host=scram-sha-256 --pwfile="$WORK/pw" >/dev/null
    port="$(free_port)"
    # identical settings for both systems: fsync off (loopback benchmark), synchronous_commit on
    cat >> "$WORK/$r/postgresql.auto.conf" <<CONF
port = $port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$WORK'
wal_level = logical
track_commit_timestamp = on
max_replication_slots = 10
max_wal_senders = 10
max_worker_processes = 16
fsync = off
synchronous_commit = on
full_page_writes = off
shared_buffers = 256MB
max_wal_size = 8GB
checkpoint_timeout = 30min
wal_sender_timeout = 300s
wal_receiver_timeout = 300s
max_connections = 100
CONF
    if [ -n "${PGRELAY_BENCH_STATEMENTS:-}" ] && [ "$r" = eu ]; then
        printf "shared_preload_libraries = 'pg_stat_statements'\npg_stat_statements.track = all\npg_stat_statements.max = 1000\n" \
            >> "$WORK/$r/postgresql.auto.conf"
    fi
    local pre=()
    if [ -n "$PIN" ]; then
        if [ "$r" = us ]; then pre=(taskset -c "${PIN%%:*}"); else pre=(taskset -c "${PIN##*:}"); fi
    fi
    as_pg "${pre[@]}" "$PGBIN/pg_ctl" -D "$WORK/$r" -l "$WORK/$r.log" -w start >/dev/null
    PORT[$r]="$port"
}

# `delay_line ONE_WAY_MS TARGET_PORT`: starts a delay proxy to TARGET_PORT and
# sets DELAY_PORT to its port (scripts/lib/delay_proxy.py: every chunk
# arrives ONE_WAY_MS later, throughput unlimited).
delay_line() {
    DELAY_PORT="$(free_port)"
    python3 "$ROOT/scripts/lib/delay_proxy.py" "$DELAY_PORT" "127.0.0.1:$2" "$1" >>"$WORK/proxy.log" 2>&1 &
    PROXY_PIDS+=("$!")
    for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/"$DELAY_PORT") 2>/dev/null && break; sleep 0.05; done
}

# With PGRELAY_BENCH_RTT_MS, the broker stands between the regions: every
# client reaches it through a delay line of RTT/4 each way, so a record goes
# us -> broker -> eu in RTT/2, as native's stream goes us -> eu through RTT/2.
# `start_broker durable`: the libsql build (TANSU_DURABLE), its log in
# $WORK/broker/broker.db, so that launch_broker can bring it back, killed, on
# the same port with its topics and records.
BROKER_LISTEN=""
BROKER_DURABLE=""
start_broker() {
    local advertised
    BROKER_DURABLE="${1:-}"
    BROKER_LISTEN="$(free_port)"
    advertised="$BROKER_LISTEN"
    if [ "$RTT_MS" -gt 0 ]; then
        delay_line "$(calc "$RTT_MS / 4")" "$BROKER_LISTEN"
        advertised="$DELAY_PORT"
    fi
    BROKER_ADVERTISED="$advertised"
    launch_broker
    BROKER_PORT="$advertised"
}

launch_broker() { # (re)starts the broker on BROKER_LISTEN
    local bin="$TANSU" storage="memory://tansu/"
    if [ -n "$BROKER_DURABLE" ]; then bin="$TANSU_DURABLE"; storage="sqlite://broker.db"; fi
    mkdir -p "$WORK/broker"
    local pre=()
    [ -z "$PIN" ] || pre=(taskset -c "${PIN##*:}")
    (cd "$WORK/broker" && exec "${pre[@]}" "$bin" broker --listener-url "tcp://127.0.0.1:$BROKER_LISTEN" \
        --advertised-listener-url "tcp://127.0.0.1:$BROKER_ADVERTISED" --storage-engine "$storage" \
        >>"$WORK/broker.log" 2>&1) &
    BROKER_PID=$!
    for _ in $(seq 150); do (echo >/dev/tcp/127.0.0.1/"$BROKER_LISTEN") 2>/dev/null && return 0; sleep 0.1; done
    log "broker did not listen on $BROKER_LISTEN"; tail -n 20 "$WORK/broker.log" >&2; return 1
}

# --- schemas and workloads ---------------------------------------------------

TABLES_bulk="bulk_items"
TABLES_small="bench_branches bench_tellers bench_accounts bench_history"
TABLES_lag="lag_probe"
TABLES_outage="lag_probe"
TABLES_resync="bulk_items"

schema() { # region workload role(source|target)
    local r="$1" w="$2" role="$3"
    case "$w" in
        bulk|resync) sql "$r" "CREATE TABLE bulk_items (id bigint PRIMARY KEY, name text, email text,
                price numeric(12,2), active boolean, created_at timestamptz, doc jsonb, qty int)" ;;
        small)
            sql "$r" "CREATE TABLE bench_branches (bid int PRIMARY KEY, bbalance int, filler char(88));
                CREATE TABLE bench_tellers (tid int PRIMARY KEY, bid int, tbalance int, filler char(84));
                CREATE TABLE bench_accounts (aid int PRIMARY KEY, bid int, abalance int, filler char(84));
                CREATE TABLE bench_history (hid bigserial PRIMARY KEY, tid int, bid int, aid int,
                    delta int, mtime timestamp, filler char(22))"
            # the same initial data on both sides (not replicated, not timed)
            sql "$r" "INSERT INTO bench_branches SELECT b, 0, '' FROM generate_series(1, $SMALL_SCALE) b;
                INSERT INTO bench_tellers SELECT t, (t - 1) / 10 + 1, 0, '' FROM generate_series(1, 10 * $SMALL_SCALE) t;
                INSERT INTO bench_accounts SELECT a, (a - 1) / 100000 + 1, 0, '' FROM generate_series(1, 100000 * $SMALL_SCALE) a"
            sql "$r" "VACUUM ANALYZE" ;;
        lag|outage)
            sql "$r" "CREATE TABLE lag_probe (id bigint PRIMARY KEY, src_ts timestamptz NOT NULL, payload text)"
            if [ "$role" = target ]; then
                # first-seen time in the target: a trigger that fires for replicated rows too
                sql "$r" "ALTER TABLE lag_probe ADD COLUMN seen_at timestamptz;
                    CREATE FUNCTION lag_seen() RETURNS trigger LANGUAGE plpgsql AS
                        \$\$BEGIN NEW.seen_at := clock_timestamp(); RETURN NEW; END\$\$;
                    CREATE TRIGGER zz_lag_seen BEFORE INSERT ON lag_probe FOR EACH ROW EXECUTE FUNCTION lag_seen();
                    ALTER TABLE lag_probe ENABLE ALWAYS TRIGGER zz_lag_seen"
            fi ;;
    esac
}

# Runs the bulk workload on us; prints the number of row changes.
workload_bulk() {
    local tx=$BULK_TX_ROWS
    sql us "DO \$\$ DECLARE lo bigint; BEGIN
        FOR i IN 0 .. ceil($BULK_INSERTS::numeric / $tx) - 1 LOOP
            lo := i::bigint * $tx + 1;
            INSERT INTO bulk_items
            SELECT g, 'item ' || g, 'user' || g || '@example.com', (g % 100000) / 100.0,
                   g % 2 = 0, now(), jsonb_build_object('n', g, 'tag', 'bench'), (g % 1000)::int
            FROM generate_series(lo, least(lo + $tx - 1, $BULK_INSERTS)) AS g;
            COMMIT;
        END LOOP;
        FOR i IN 0 .. ceil($BULK_UPDATES::numeric / $tx) - 1 LOOP
            lo := i::bigint * $tx + 1;
            UPDATE bulk_items SET qty = qty + 1, name = name || ' v2'
            WHERE id BETWEEN lo AND least(lo + $tx - 1, $BULK_UPDATES);
            COMMIT;
        END LOOP; END \$\$" >&2
    echo $((BULK_INSERTS + BULK_UPDATES))
}

# The TPC-B-like transaction of `small` and `write`, as a pgbench script.
write_tpcb_script() {
    cat > "$WORK/tpcb.sql" <<'SQL'
\set aid random(1, 100000 * :scale)
\set bid random(1, 1 * :scale)
\set tid random(1, 10 * :scale)
\set delta random(-5000, 5000)
BEGIN;
UPDATE bench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT abalance FROM bench_accounts WHERE aid = :aid;
UPDATE bench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid;
UPDATE bench_branches SET bbalance = bbalance + :delta WHERE bid = :bid;
INSERT INTO bench_history (tid, bid, aid, delta, mtime) VALUES (:tid, :bid, :aid, :delta, CURRENT_TIMESTAMP);
END;
SQL
}

# Runs pgbench on us; prints the number of row changes (4 per transaction).
workload_small() {
    write_tpcb_script
    pgbench -n -h "$WORK" -p "${PORT[us]}" -U postgres -c "$SMALL_CLIENTS" -j 2 \
        -T "$SMALL_SECONDS" -D scale="$SMALL_SCALE" -f "$WORK/tpcb.sql" postgres > "$WORK/pgbench.out" 2>&1 \
        || { cat "$WORK/pgbench.out" >&2; return 1; }
    local tx tps
    tx="$(awk -F': ' '/number of transactions actually processed/ { split($2, a, "/"); print a[1] }' "$WORK/pgbench.out")"
    tps="$(awk '/^tps/ { print $3; exit }' "$WORK/pgbench.out")"
    log "pgbench: $tx transactions ($tps tps on the source)"
    echo $((tx * 4))
}

# A fixed write rate on us for LAG_SECONDS (pgbench --rate).
workload_lag() {
    local tps=$((LAG_RATE / LAG_ROWS_PER_TX))
    cat > "$WORK/lag.sql" <<SQL
INSERT INTO lag_probe SELECT nextval('lag_ids'), clock_timestamp(), 'probe payload 0123456789'
FROM generate_series(1, $LAG_ROWS_PER_TX);
SQL
    sql us "CREATE SEQUENCE IF NOT EXISTS lag_ids"
    pgbench -n -h "$WORK" -p "${PORT[us]}" -U postgres -c 4 -j 2 -R "$tps" -T "$LAG_SECONDS" \
        -f "$WORK/lag.sql" postgres > "$WORK/pgbench-lag.out" 2>&1 \
        || { cat "$WORK/pgbench-lag.out" >&2; return 1; }
    log "pgbench (rate $tps tx/s x $LAG_ROWS_PER_TX rows): $(grep -E '^tps|processed' "$WORK/pgbench-lag.out" | tr '\n' ' ')"
}

# Compares the replicated tables of us and eu (user columns only).
verify() { # workload
    local q a b
    case "$1" in
        bulk) q="SELECT count(*), sum(qty), sum(length(name)), sum(price) FROM bulk_items" ;;
        small) q="SELECT (SELECT sum(abalance) FROM bench_accounts), (SELECT sum(tbalance) FROM bench_tellers),
                         (SELECT sum(bbalance) FROM bench_branches), (SELECT count(*) || '/' || sum(delta) FROM bench_history)" ;;
        lag|outage) q="SELECT count(*), max(id) FROM lag_probe" ;;
    esac
    a="$(sql us "$q")"; b="$(sql eu "$q")"
    if [ "$a" = "$b" ]; then echo "match"; else log "MISMATCH us=[$a] eu=[$b]"; echo "MISMATCH"; fi
}

wait_active() { # slot; prints the time it became active
    for _ in $(seq 3000); do
        [ "$(sql us "SELECT active FROM pg_replication_slots WHERE slot_name = '$1'")" = t ] && break
        sleep 0.02
    done
    now
}

# --- native logical replication ----------------------------------------------

native_pair() { # workload
    start_pg us; start_pg eu
    schema us "$1" source; schema eu "$1" target
    local tables="TABLES_$1"
    sql us "CREATE PUBLICATION bench_pub FOR TABLE $(echo "${!tables}" | sed 's/ /, /g')"
    # with PGRELAY_BENCH_RTT_MS, the subscriber reaches us through RTT/2 each way
    local src_port="${PORT[us]}"
    if [ "$RTT_MS" -gt 0 ]; then delay_line "$(calc "$RTT_MS / 2")" "${PORT[us]}"; src_port="$DELAY_PORT"; fi
    sql eu "CREATE SUBSCRIPTION bench_sub CONNECTION 'host=127.0.0.1 port=$src_port user=postgres password=$PASSWORD dbname=postgres'
        PUBLICATION bench_pub WITH (copy_data = false, enabled = false)"
}

native_throughput() { # workload
    local w="$1" changes end t0 ta t1
    native_pair "$w"
    log "native $w: workload (subscription disabled)"
    local w0; w0="$(now)"
    changes="$(workload_"$w")"
    local w1; w1="$(now)"
    end="$(sql us "SELECT pg_current_wal_insert_lsn()")"
    statements_reset
    cpu_snap "$WORK/cpu0" us="$(postmaster us)" eu="$(postmaster eu)"
    t0="$(now)"
    sql eu "ALTER SUBSCRIPTION bench_sub ENABLE"
    ta="$(wait_active bench_sub)"
    local deadline=$(( $(date +%s) + TIMEOUT ))
    until [ "$(sql us "SELECT confirmed_flush_lsn >= '$end' FROM pg_replication_slots WHERE slot_name = 'bench_sub'")" = t ]; do
        [ "$(date +%s)" -lt "$deadline" ] || { log "native $w: timed out"; return 1; }
        sleep 0.1
    done
    t1="$(now)"
    cpu_snap "$WORK/cpu1" us="$(postmaster us)" eu="$(postmaster eu)"
    record native "$w" "$changes" "$w0" "$w1" "$t0" "$ta" "$t1" "$(verify "$w")" \
        "$(cpu_used "$WORK/cpu0" "$WORK/cpu1" "$WORK/cpu-native-$w-$(date +%s).txt")"
    statements_report "native-$w"
    stop_all
}

# --- pgrelay -----------------------------------------------------------------

relay_config() { # workload
    local tables="TABLES_$1" t
    cat > "$WORK/relay.toml" <<TOML
[relay]
prefix = "pgrelay"

[kafka]
brokers = "127.0.0.1:$BROKER_PORT"

[regions.us]
id = 1
dsn = "host=127.0.0.1 port=${PORT[us]} user=postgres password=$PASSWORD dbname=postgres"

[regions.eu]
id = 2
dsn = "host=127.0.0.1 port=${PORT[eu]} user=postgres password=$PASSWORD dbname=postgres"
TOML
    for t in ${!tables}; do
        printf '\n[[tables]]\nname = "public.%s"\nclass = "global"\n' "$t" >> "$WORK/relay.toml"
    done
    if [ -n "$STAMP_TRIGGER" ]; then
        printf '\n[relay.capture]\nstamp_trigger = "%s"\n' "$STAMP_TRIGGER" >> "$WORK/relay.toml"
    fi
    # e.g. PGRELAY_BENCH_EXTRA_TOML=$'[relay.apply]\nbatch_max_wait = "10ms"'
    local extra="${PGRELAY_BENCH_EXTRA_TOML:-}"
    # `scale`: sessions_per_source, into the extra TOML's [relay.apply] table
    # when it has one (a TOML table may not be declared twice)
    if [ -n "$APPLY_SESSIONS" ]; then
        if grep -q '^[[:space:]]*sessions_per_source' <<<"$extra"; then
            log "PGRELAY_BENCH_EXTRA_TOML sets sessions_per_source, which scale varies"; return 1
        elif grep -q '^[[:space:]]*\[relay\.apply\][[:space:]]*$' <<<"$extra"; then
            extra="$(sed "/^[[:space:]]*\[relay\.apply\][[:space:]]*\$/a sessions_per_source = $APPLY_SESSIONS" <<<"$extra")"
        else
            extra="$(printf '%s\n\n[relay.apply]\nsessions_per_source = %s' "$extra" "$APPLY_SESSIONS")"
        fi
    fi
    if [ -n "$extra" ]; then
        printf '\n%s\n' "$extra" >> "$WORK/relay.toml"
    fi
}

start_relay() { # region
    local pre=()
    [ -z "$PIN" ] || pre=(taskset -c "${PIN##*:}")
    PGRELAY_LOG=info "${pre[@]}" "$BIN" run --config "$WORK/relay.toml" --region "$1" \
        >>"$WORK/relay-$1.log" 2>&1 &
    RELAY_PID[$1]=$!
}

relay_pair() { # workload [durable]
    start_pg us; start_pg eu
    schema us "$1" source; schema eu "$1" target
    start_broker "${2:-}"
    relay_config "$1"
    local r
    for r in us eu; do
        PGRELAY_LOG=warn "$BIN" setup --config "$WORK/relay.toml" --region "$r" >"$WORK/setup-$r.log" 2>&1 \
            || { cat "$WORK/setup-$r.log" >&2; return 1; }
    done
}

relay_cpu_snap() { # file
    cpu_snap "$1" us="$(postmaster us)" eu="$(postmaster eu)" broker="$BROKER_PID" \
        relay_us="${RELAY_PID[us]:-none}" relay_eu="${RELAY_PID[eu]:-none}"
}

applied() { sql eu "SELECT coalesce(sum(next_offset), 0) FROM pgrelay.offsets WHERE topic = 'pgrelay.us.eu'"; }

relay_throughput() { # workload [name in the results, default the workload]
    local w="$1" name="${2:-$1}" changes t0 ta t1
    relay_pair "$w"
    start_relay eu   # idle until us publishes; its startup is not timed
    log "pgrelay $w: workload (us sidecar not running)"
    local w0; w0="$(now)"
    changes="$(workload_"$w")"
    local w1; w1="$(now)"
    local end n=0 done_applied=0 captured=""
    end="$(sql us "SELECT pg_current_wal_insert_lsn()")"
    statements_reset
    relay_cpu_snap "$WORK/cpu0"
    t0="$(now)"
    start_relay us
    ta="$(wait_active pgrelay_us)"
    # progress once a second: which side is behind (capture = the slot's
    # confirmed LSN vs the WAL end; apply = records applied in eu)
    local timeline="$WORK/timeline-pgrelay-$w-$(date +%s).tsv"
    echo -e "seconds\tcapture_bytes_behind\tapplied" > "$timeline"
    local deadline=$(( $(date +%s) + TIMEOUT ))
    while :; do
        done_applied="$(applied)"
        [ "$done_applied" -ge "$changes" ] && break
        [ "$(date +%s)" -lt "$deadline" ] || { log "pgrelay $w: timed out at $done_applied/$changes"; tail -n 20 "$WORK"/relay-*.log >&2; return 1; }
        kill -0 "${RELAY_PID[us]}" 2>/dev/null || { log "pgrelay us exited"; tail -n 20 "$WORK/relay-us.log" >&2; return 1; }
        if [ $((n % 10)) -eq 0 ] || [ -z "$captured" ]; then
            local behind
            behind="$(sql us "SELECT greatest(pg_wal_lsn_diff('$end', confirmed_flush_lsn), 0)::bigint FROM pg_replication_slots WHERE slot_name = 'pgrelay_us'")"
            [ $((n % 10)) -eq 0 ] && echo -e "$(calc "round($(now) - $ta, 1)")\t$behind\t$done_applied" >> "$timeline"
            if [ -z "$captured" ] && [ "$behind" = 0 ]; then
                captured="$(calc "round($(now) - $ta, 2)")"
            fi
        fi
        n=$((n + 1))
        sleep 0.1
    done
    t1="$(now)"
    log "pgrelay $w: capture side confirmed everything after ${captured:-?}s, apply side done after $(calc "round($t1 - $ta, 2)")s (timeline: $timeline)"
    relay_cpu_snap "$WORK/cpu1"
    record pgrelay "$name" "$changes" "$w0" "$w1" "$t0" "$ta" "$t1" "$(verify "$w")" \
        "$(cpu_used "$WORK/cpu0" "$WORK/cpu1" "$WORK/cpu-pgrelay-$name-$(date +%s).txt")"
    statements_report "pgrelay-$name"
    stop_all
}

# With PGRELAY_BENCH_STATEMENTS: what the target ran, per statement, from the
# reset (after the workload) to the catch-up. Our own polling shows up as
# the few statements on pgrelay.offsets/pg_stat_user_tables with calls ~ 10/s.
statements_reset() {
    [ -n "${PGRELAY_BENCH_STATEMENTS:-}" ] || return 0
    sql eu "CREATE EXTENSION IF NOT EXISTS pg_stat_statements; SELECT pg_stat_statements_reset()" >/dev/null
}
statements_report() { # name
    [ -n "${PGRELAY_BENCH_STATEMENTS:-}" ] || return 0
    local out="$WORK/statements-$1-$(date +%s).txt"
    sql eu "SELECT rpad(calls::text, 8) || rpad(rows::text, 10) || rpad(round(total_exec_time)::text || ' ms', 11)
            || rpad(round(100 * total_exec_time / sum(total_exec_time) OVER ())::text || ' %', 6)
            || left(regexp_replace(query, '\s+', ' ', 'g'), 150)
        FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 25" > "$out"
    log "$1: target statements (calls, rows, exec time, share, query) in $out:"
    sed 's/^/    /' "$out" >&2
}

# system workload changes w0 w1 t0 t_active t_done verdict cpu
record() {
    local line
    line="$(python3 - "$@" <<'PY'
import sys
system, w, changes, w0, w1, t0, ta, t1, verdict, cpu = sys.argv[1:]
changes = int(changes); w0, w1, t0, ta, t1 = map(float, (w0, w1, t0, ta, t1))
rate = changes / max(t1 - ta, 1e-3)
total = sum(float(x.split("=")[1]) for x in cpu.split())
print(f"{system}\t{w}\t{changes}\t{w1 - w0:.2f}\t{ta - t0:.2f}\t{t1 - ta:.2f}\t{rate:.0f}\t{verdict}"
      f"\t{total:.2f}\t{1e6 * total / changes:.1f}\t{cpu}")
PY
)"
    echo "$line" >> "$RESULTS"
    IFS=$'\t' read -r s wl ch ws st cs rt v cpu us_per cpus <<<"$line"
    log "$s $wl: $ch row changes; source workload ${ws}s; startup ${st}s; catch-up ${cs}s = $rt changes/s; tables $v"
    log "$s $wl: CPU ${cpu}s = ${us_per} us per change ($cpus)"
}

# --- lag ---------------------------------------------------------------------

lag_run() { # system
    local s="$1"
    if [ "$s" = native ]; then
        native_pair lag
        sql eu "ALTER SUBSCRIPTION bench_sub ENABLE"
        wait_active bench_sub >/dev/null
    else
        relay_pair lag
        start_relay eu; start_relay us
        wait_active pgrelay_us >/dev/null
        sleep 2   # both sides streaming/consuming
    fi
    log "$s lag: $LAG_RATE rows/s for ${LAG_SECONDS}s"
    workload_lag
    local total deadline=$(( $(date +%s) + TIMEOUT ))
    total="$(sql us "SELECT count(*) FROM lag_probe")"
    until [ "$(sql eu "SELECT count(*) FROM lag_probe")" -ge "$total" ]; do
        [ "$(date +%s)" -lt "$deadline" ] || { log "$s lag: timed out"; return 1; }
        sleep 0.5
    done
    local stats
    stats="$(sql eu "SELECT count(*),
            round((1000 * percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM seen_at - src_ts)))::numeric, 1),
            round((1000 * percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM seen_at - src_ts)))::numeric, 1),
            round((1000 * max(extract(epoch FROM seen_at - src_ts)))::numeric, 1)
        FROM lag_probe" | tr '|' '\t')"
    printf '%s\tlag\t%s\t%s\n' "$s" "$stats" "$(verify lag)" >> "$RESULTS"
    log "$s lag (ms): rows p50 p99 max = $(echo "$stats" | tr '\t' ' ')"
    stop_all
}

# --- outage: catch-up after a region was away -----------------------------------

# `outage` runs OUTAGE_RATE rows/s (the lag_probe rows of `lag`, each with its
# insert time) against us from start to end; eu stamps each row when it is
# written (the ENABLE ALWAYS trigger of `lag`).
start_outage_load() {
    local tps=$((OUTAGE_RATE / OUTAGE_ROWS_PER_TX))
    cat > "$WORK/outage.sql" <<SQL
INSERT INTO lag_probe SELECT nextval('lag_ids'), clock_timestamp(), 'probe payload 0123456789'
FROM generate_series(1, $OUTAGE_ROWS_PER_TX);
SQL
    sql us "CREATE SEQUENCE IF NOT EXISTS lag_ids"
    pgbench -n -h "$WORK" -p "${PORT[us]}" -U postgres -c 4 -j 2 -R "$tps" -T 86400 \
        -f "$WORK/outage.sql" postgres > "$WORK/pgbench-outage.out" 2>&1 &
    LOAD_PID=$!
}

# freeze: the in-memory broker stopped (SIGSTOP) and continued, its data
# kept (a restart would lose the topics and eu's offsets would point past
# their end); restart: the durable broker killed and started again on its
# port (PGRELAY_BENCH_BROKER_OUTAGE=restart).
broker_outage_mode() {
    case "$BROKER_OUTAGE" in
        freeze) echo freeze ;;
        restart)
            [ -x "$TANSU_DURABLE" ] || { log "no durable broker at $TANSU_DURABLE (scripts/install-deps.sh builds it)"; return 1; }
            echo restart ;;
        *) log "PGRELAY_BENCH_BROKER_OUTAGE: freeze or restart, not $BROKER_OUTAGE"; return 1 ;;
    esac
}

outage_begin() { # state
    case "$1" in
        native)
            sql eu "ALTER SUBSCRIPTION bench_sub DISABLE"
            # the apply worker leaves, and with it the walsender
            for _ in $(seq 300); do
                [ "$(sql us "SELECT active FROM pg_replication_slots WHERE slot_name = 'bench_sub'")" = f ] && break
                sleep 0.1
            done ;;
        pgrelay) stop_pid "${RELAY_PID[eu]}"; unset 'RELAY_PID[eu]' ;;
        pgrelay-kafka)
            if [ "$BROKER_DURABLE" ]; then
                kill -KILL "$BROKER_PID"; wait "$BROKER_PID" 2>/dev/null || true; BROKER_PID=""
            else
                kill -STOP "$BROKER_PID"
            fi ;;
    esac
}

outage_end() { # state
    case "$1" in
        native) sql eu "ALTER SUBSCRIPTION bench_sub ENABLE" ;;
        pgrelay) start_relay eu ;;
        pgrelay-kafka) if [ "$BROKER_DURABLE" ]; then launch_broker; else kill -CONT "$BROKER_PID"; fi ;;
    esac
}

# Whether eu holds every row us had inserted one second or more before:
# compares the rows with id <= the sequence value us showed then (the cheap
# pg_stat count first, the exact one only when that passes). Sets CAUGHT.
POLL_T=(); POLL_V=(); POLL_J=-1; CAUGHT=""
poll_caught() {
    local t v n
    POLL_T+=("$(now)"); POLL_V+=("$(sql us "SELECT last_value FROM lag_ids")")
    t="${POLL_T[-1]}"
    # POLL_J: the latest poll at least 1 s before this one
    while [ $((POLL_J + 1)) -lt ${#POLL_T[@]} ] \
        && awk -v a="${POLL_T[$((POLL_J + 1))]}" -v b="$t" 'BEGIN { exit !(a <= b - 1) }'; do
        POLL_J=$((POLL_J + 1))
    done
    CAUGHT=""
    [ "$POLL_J" -ge 0 ] || return 0
    v="${POLL_V[$POLL_J]}"
    n="$(sql eu "SELECT n_tup_ins FROM pg_stat_user_tables WHERE relname = 'lag_probe'")"
    [ "$n" -ge "$v" ] || return 0
    [ "$(sql eu "SELECT count(*) FROM lag_probe WHERE id <= $v")" = "$(sql us "SELECT count(*) FROM lag_probe WHERE id <= $v")" ] \
        && CAUGHT="$t"
    return 0
}

outage_run() { # state: native | pgrelay (eu's sidecar down) | pgrelay-kafka (the broker down)
    local s="$1" mode=""
    case "$s" in
        native)
            native_pair outage
            sql eu "ALTER SUBSCRIPTION bench_sub ENABLE"
            wait_active bench_sub >/dev/null ;;
        pgrelay*)
            if [ "$s" = pgrelay-kafka ]; then
                mode="$(broker_outage_mode)"
                if [ "$mode" = restart ]; then relay_pair outage durable; else relay_pair outage; fi
            else
                relay_pair outage
            fi
            start_relay eu; start_relay us
            wait_active pgrelay_us >/dev/null
            sleep 2 ;;
    esac
    local what="${s}${mode:+ (broker $mode)}"
    log "$what outage: $OUTAGE_RATE rows/s throughout; ${OUTAGE_WARMUP}s running, then ${OUTAGE_SECONDS}s away"
    start_outage_load
    sleep "$OUTAGE_WARMUP"
    local t_out t_resume t_polled t_stop
    t_out="$(now)"
    outage_begin "$s"
    sleep "$(calc "max($t_out + $OUTAGE_SECONDS - $(now), 0)")"
    kill -0 "$LOAD_PID" 2>/dev/null || { log "$what outage: the load stopped"; cat "$WORK/pgbench-outage.out" >&2; return 1; }
    local failed=""
    if [[ "$s" == pgrelay* ]]; then
        kill -0 "${RELAY_PID[us]}" 2>/dev/null || failed="us sidecar exited during the outage"
    fi
    t_resume="$(now)"
    outage_end "$s"
    log "$what outage: resumed ($(calc "round($(now) - $t_resume, 2)")s to resume)"
    POLL_T=(); POLL_V=(); POLL_J=-1; CAUGHT=""
    local deadline=$(( $(date +%s) + TIMEOUT ))
    while [ -z "$failed" ]; do
        poll_caught
        [ -z "$CAUGHT" ] || break
        [ "$(date +%s)" -lt "$deadline" ] || { failed="not caught up after ${TIMEOUT}s"; break; }
        if [[ "$s" == pgrelay* ]]; then
            kill -0 "${RELAY_PID[us]}" 2>/dev/null || { failed="us sidecar exited"; break; }
            kill -0 "${RELAY_PID[eu]}" 2>/dev/null || { failed="eu sidecar exited"; break; }
        fi
        sleep 0.5
    done
    if [ -n "$failed" ]; then
        log "$what outage: $failed"; tail -n 20 "$WORK"/relay-*.log >&2 2>/dev/null || true
        printf '%s\toutage\t%s\t%s\t\t\t\t\tFAILED: %s\n' "$s" "$mode" "$OUTAGE_SECONDS" "$failed" >> "$RESULTS"
        stop_all
        return 0
    fi
    t_polled="$(calc "round($CAUGHT - $t_resume, 2)")"
    # the load goes on a little past the catch-up, then eu gets the rest
    sleep "$OUTAGE_TAIL"
    t_stop="$(now)"
    stop_pid "$LOAD_PID"; LOAD_PID=""
    local total
    total="$(sql us "SELECT count(*) FROM lag_probe")"
    until [ "$(sql eu "SELECT count(*) FROM lag_probe")" -ge "$total" ]; do
        [ "$(date +%s)" -lt "$deadline" ] || { log "$what outage: eu did not get the last rows"; return 1; }
        sleep 0.5
    done
    # From the rows' own times: the first moment T after the resume at which
    # every row inserted in us before T - 1 s had been written in eu. Rows in
    # src_ts order; after row i (until the next row's src_ts + 1 s) that holds
    # from max(the latest seen_at so far, src_ts + 1 s) on.
    local stats
    stats="$(sql eu "WITH r AS (
            SELECT src_ts, seen_at,
                   max(seen_at) OVER (ORDER BY src_ts, id ROWS UNBOUNDED PRECEDING) AS m,
                   lead(src_ts) OVER (ORDER BY src_ts, id) AS nxt
            FROM lag_probe),
        c AS (SELECT greatest(m, src_ts + interval '1 s', to_timestamp($t_resume)) AS t, nxt FROM r)
        SELECT (SELECT count(*) FROM r WHERE src_ts < to_timestamp($t_resume) AND seen_at >= to_timestamp($t_resume)),
               round(extract(epoch FROM (SELECT min(t) FROM c WHERE t <= coalesce(nxt + interval '1 s', 'infinity'))
                                        - to_timestamp($t_resume))::numeric, 2),
               (SELECT count(*) FROM r),
               round(extract(epoch FROM (SELECT min(seen_at) FROM r WHERE seen_at >= to_timestamp($t_resume))
                                        - to_timestamp($t_resume))::numeric, 2)" | tr '|' '\t')"
    local backlog caught rows first
    IFS=$'\t' read -r backlog caught rows first <<<"$stats"
    local verdict; verdict="$(verify outage)"
    if awk -v c="$caught" -v r="$t_resume" -v e="$t_stop" 'BEGIN { exit !(r + c > e - 1) }'; then
        verdict="$verdict, caught up only as the load stopped"
    fi
    printf '%s\toutage\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$s" "$mode" "$OUTAGE_SECONDS" "$backlog" "$caught" "$t_polled" \
        "$(calc "round($backlog / max($caught, 0.01))")" "$verdict" "$first" >> "$RESULTS"
    log "$what outage: backlog $backlog rows at resume; first row written ${first}s after the resume;" \
        "lag < 1 s after ${caught}s (polled: ${t_polled}s); $rows rows in all; tables $verdict"
    stop_all
}

# --- write overhead on the source ------------------------------------------------

# pgbench SCRIPT against us for WRITE_SECONDS; prints its tps.
write_tps() { # script
    pinned source pgbench -n -h "$WORK" -p "${PORT[us]}" -U postgres -c "$WRITE_CLIENTS" -j 2 \
        -T "$WRITE_SECONDS" -D scale="$SMALL_SCALE" -f "$1" postgres > "$WORK/pgbench-write.out" 2>&1 \
        || { cat "$WORK/pgbench-write.out" >&2; return 1; }
    awk '/^tps/ { print $3; exit }' "$WORK/pgbench-write.out"
}

write_run() { # state: none|native|pgrelay|pgrelay-plpgsql
    local state="$1" tpcb ins
    STAMP_TRIGGER=""
    [ "$state" != pgrelay-plpgsql ] || STAMP_TRIGGER=plpgsql
    case "$state" in
        none) start_pg us; start_pg eu; schema us small source; schema eu small target ;;
        native)
            native_pair small
            sql eu "ALTER SUBSCRIPTION bench_sub ENABLE"
            wait_active bench_sub >/dev/null ;;
        pgrelay*)
            relay_pair small
            log "write, $state: $(grep -h 'stamp trigger' "$WORK/setup-us.log" || echo 'stamp trigger unknown')"
            start_relay eu; start_relay us
            wait_active pgrelay_us >/dev/null ;;
    esac
    write_tpcb_script
    cat > "$WORK/inserts.sql" <<'SQL'
\set aid random(1, 100000 * :scale)
INSERT INTO bench_history (tid, bid, aid, delta, mtime)
SELECT 1, 1, :aid, g, CURRENT_TIMESTAMP FROM generate_series(1, 10) g;
SQL
    # where the source's CPU goes during the TPC-B run (its postmaster's tree:
    # backends, walsenders, background writers), per process kind
    cpu_snap "$WORK/wcpu0" us="$(postmaster us)"
    tpcb="$(write_tps "$WORK/tpcb.sql")"
    cpu_snap "$WORK/wcpu1" us="$(postmaster us)"
    log "write, $state: source CPU during tpcb: $(cpu_used "$WORK/wcpu0" "$WORK/wcpu1" "$WORK/cpu-write-$state.txt")"
    head -n 6 "$WORK/cpu-write-$state.txt" | sed 's/^/    /' >&2
    ins="$(write_tps "$WORK/inserts.sql")"
    local caught="n/a"
    if [ "$state" != none ]; then
        # replication kept up: eu ends with every row us wrote
        local total deadline=$(( $(date +%s) + TIMEOUT ))
        total="$(sql us "SELECT count(*) FROM bench_history")"
        until [ "$(sql eu "SELECT count(*) FROM bench_history")" -ge "$total" ]; do
            [ "$(date +%s)" -lt "$deadline" ] || { log "$state write: eu did not catch up"; return 1; }
            sleep 0.5
        done
        caught="replicated"
    fi
    printf '%s\twrite\t%s\t%s\t%s\n' "$state" "$tpcb" "$ins" "$caught" >> "$RESULTS"
    log "write, $state: tpcb $tpcb tps, inserts $ins tps (x10 rows) ($caught)"
    stop_all
}

# `resync`: us holds RESYNC_ROWS rows (stamped by setup's trigger, written
# with no sidecar running); PostgreSQL's own COPY of the table to a client
# (psql, output discarded) is the baseline, timed on its second run so both
# read a warm cache; then `pgrelay resync --to eu` of the same table, timed
# until it exits (every record acknowledged by Kafka).
resync_run() {
    local c0 c1 copy_s t0 t1 i
    relay_pair resync
    log "resync: loading $RESYNC_ROWS rows into us"
    sql us "INSERT INTO bulk_items
        SELECT g, 'item ' || g, 'user' || g || '@example.com', (g % 100000) / 100.0,
               g % 2 = 0, now(), jsonb_build_object('n', g, 'tag', 'bench'), (g % 1000)::int
        FROM generate_series(1, $RESYNC_ROWS) AS g" >&2
    sql us "VACUUM ANALYZE bulk_items"
    local size; size="$(sql us "SELECT pg_size_pretty(pg_table_size('bulk_items'))")"
    for i in 1 2; do
        c0="$(now)"
        PGPASSWORD="$PASSWORD" pinned rest psql -X -q -h 127.0.0.1 -p "${PORT[us]}" -U postgres -d postgres \
            -c "COPY bulk_items TO STDOUT" > /dev/null
        c1="$(now)"
    done
    copy_s="$(calc "round($c1 - $c0, 2)")"
    log "resync: COPY bulk_items TO STDOUT ($size): ${copy_s}s"
    cpu_snap "$WORK/cpu0" us="$(postmaster us)" broker="$BROKER_PID"
    t0="$(now)"
    # the resync's own CPU and peak memory: its rusage, from a parent
    pinned rest python3 -c '
import resource, subprocess, sys
r = subprocess.run(sys.argv[2:])
u = resource.getrusage(resource.RUSAGE_CHILDREN)
open(sys.argv[1], "w").write(f"{u.ru_utime + u.ru_stime:.2f} {u.ru_maxrss // 1024}\n")
sys.exit(r.returncode)' "$WORK/resync.rusage" \
        "$BIN" resync --config "$WORK/relay.toml" --region us --to eu --table public.bulk_items \
        ${RESYNC_JOBS:+--jobs "$RESYNC_JOBS"} \
        > "$WORK/resync.out" 2> "$WORK/resync.err" \
        || { log "resync failed"; tail -n 20 "$WORK/resync.err" >&2; return 1; }
    t1="$(now)"
    cpu_snap "$WORK/cpu1" us="$(postmaster us)" broker="$BROKER_PID"
    local sent cpu rusage
    sent="$(awk '$1 == "public.bulk_items" && $2 == "eu" { print $3 }' "$WORK/resync.out")"
    if [ "$sent" != "$RESYNC_ROWS" ]; then
        log "resync sent ${sent:-?} rows of $RESYNC_ROWS"; cat "$WORK/resync.out" >&2; return 1
    fi
    cpu="$(cpu_used "$WORK/cpu0" "$WORK/cpu1")"
    read -r -a rusage < "$WORK/resync.rusage"
    printf 'pgrelay\tresync\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$RESYNC_ROWS" "$copy_s" \
        "$(calc "round($t1 - $t0, 2)")" "$cpu" "${rusage[0]}" "${rusage[1]}" "$size" >> "$RESULTS"
    log "resync: $RESYNC_ROWS rows in $(calc "round($t1 - $t0, 2)")s; CPU $cpu resync=${rusage[0]}; peak ${rusage[1]} MiB"
    stop_all
}

# --- main ----------------------------------------------------------------------

log "work directory $WORK; results in $RESULTS"
for w in bulk small; do
    has "$ONLY" "$w" || continue
    for i in $(seq "$REPEAT"); do
        for s in native pgrelay; do
            has "$SYSTEMS" "$s" || continue
            log "== $w, run $i/$REPEAT, $s =="
            if [ "$s" = native ]; then native_throughput "$w"; else relay_throughput "$w"; fi
        done
    done
done
if has "$ONLY" scale && has "$SYSTEMS" pgrelay; then
    for i in $(seq "$REPEAT"); do
        for n in $SCALE_SESSIONS; do
            log "== scale, run $i/$REPEAT, pgrelay, sessions_per_source = $n =="
            APPLY_SESSIONS="$n"
            relay_throughput small "scale-$n"
        done
    done
    APPLY_SESSIONS=""
fi
if has "$ONLY" resync && has "$SYSTEMS" pgrelay; then
    log "== resync, pgrelay =="
    resync_run
fi
if has "$ONLY" write; then
    for i in $(seq "$REPEAT"); do
        for s in $WRITE_STATES; do
            [ "$s" = none ] || has "$SYSTEMS" "${s%%-*}" || continue
            log "== write, run $i/$REPEAT, $s =="
            write_run "$s"
        done
    done
fi
if has "$ONLY" lag; then
    for s in native pgrelay; do
        has "$SYSTEMS" "$s" || continue
        lag_run "$s"
    done
fi
if has "$ONLY" outage; then
    for s in $OUTAGE_STATES; do
        has "$SYSTEMS" "${s%%-*}" || continue
        log "== outage, $s =="
        outage_run "$s"
    done
fi

echo
python3 - "$RESULTS" "$REPEAT" "${WRITE_CLIENTS} clients, ${WRITE_SECONDS}s${PIN:+, pinned $PIN}" \
    "$OUTAGE_RATE rows/s in transactions of $OUTAGE_ROWS_PER_TX" \
    "$("$PGBIN/postgres" --version | sed 's/^postgres (PostgreSQL) /PostgreSQL /')" <<'PY'
import sys, statistics
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
print(f"pgrelay vs native logical replication ({sys.argv[5]}, loopback, same settings)")
for w in ("bulk", "small"):
    runs = {s: [r for r in rows if r[0] == s and r[1] == w] for s in ("native", "pgrelay")}
    if not any(runs.values()):
        continue
    print(f"\n{w}: row changes replicated per second, catch-up from a backlog (median of runs)")
    med, med_cpu = {}, {}
    for s, rs in runs.items():
        if not rs:
            continue
        rates = [int(r[6]) for r in rs]
        med[s] = statistics.median(rates)
        catch = statistics.median(float(r[5]) for r in rs)
        src = statistics.median(float(r[3]) for r in rs)
        bad = [r[7] for r in rs if r[7] != "match"]
        cpu = statistics.median(float(r[9]) for r in rs)
        med_cpu[s] = cpu
        print(f"  {s:8s} {med[s]:>10,.0f} changes/s   (runs: {', '.join(f'{x:,}' for x in rates)}; "
              f"{rs[0][2]} changes; catch-up {catch:.1f}s; source workload {src:.1f}s)"
              + (f"  TABLE MISMATCH in {len(bad)} run(s)" if bad else ""))
        print(f"  {'':8s} {cpu:>10.1f} CPU us per change, all processes involved "
              f"(last run: {rs[-1][10]})")
    if "native" in med and "pgrelay" in med:
        print(f"  ratio pgrelay/native: throughput {med['pgrelay'] / med['native']:.2f}, "
              f"CPU per change {med_cpu['pgrelay'] / med_cpu['native']:.2f}")
scale = {}
for r in rows:
    if r[0] == "pgrelay" and r[1].startswith("scale-"):
        scale.setdefault(int(r[1][6:]), []).append(r)
if scale:
    print("\nscale: pgrelay, the small workload's backlog, by [relay.apply] sessions_per_source (median of runs)")
    base = None
    for n in sorted(scale):
        rs = scale[n]
        rates = [int(r[6]) for r in rs]
        rate = statistics.median(rates)
        cpu = statistics.median(float(r[9]) for r in rs)
        base = base or rate
        bad = [r[7] for r in rs if r[7] != "match"]
        print(f"  sessions {n:<2d} {rate:>10,.0f} changes/s  x{rate / base:.2f}   {cpu:>6.1f} CPU us per change   "
              f"(runs: {', '.join(f'{x:,}' for x in rates)}; {rs[0][2]} changes)"
              + (f"  TABLE MISMATCH in {len(bad)} run(s)" if bad else ""))
        print(f"  {'':11s} CPU by process, last run: {rs[-1][10]}")
write = [r for r in rows if r[1] == "write"]
if write:
    print(f"\nwrite: source tps with pgbench ({sys.argv[3]}), median of runs")
    med = {}
    for s in ("none", "native", "pgrelay", "pgrelay-plpgsql"):
        rs = [r for r in write if r[0] == s]
        if not rs:
            continue
        med[s] = (statistics.median(float(r[2]) for r in rs), statistics.median(float(r[3]) for r in rs))
        print(f"  {s:8s} tpcb {med[s][0]:>9,.0f} tps   inserts {med[s][1]:>9,.0f} tps (10 rows each)   (runs: "
              + ", ".join(f"{float(r[2]):,.0f}/{float(r[3]):,.0f}" for r in rs) + ")")
    if "none" in med:
        for i, name in ((0, "tpcb"), (1, "inserts")):
            b = med["native"][i] / med["none"][i] if "native" in med else None
            for s in ("pgrelay", "pgrelay-plpgsql"):
                if s not in med:
                    continue
                c = med[s][i] / med["none"][i]
                verdict = ""
                if b is not None:
                    verdict = "  target met" if c >= 0.95 and c >= b - 0.03 else "  target NOT met (c/a >= 0.95 and >= b/a - 0.03)"
                print(f"  {name:8s} b/a (native) {b if b is None else f'{b:.3f}'}   c/a ({s}) {c:.3f}{verdict}")
for r in rows:
    if r[1] != "resync":
        continue
    n, copy_s, took = int(r[2]), float(r[3]), float(r[4])
    print(f"\nresync: {n:,} rows ({r[8]}), `pgrelay resync --to eu` until Kafka acknowledged every record")
    print(f"  COPY TO STDOUT {n / copy_s:>10,.0f} rows/s   ({copy_s:.2f} s)")
    print(f"  pgrelay resync {n / took:>10,.0f} rows/s   ({took:.2f} s; peak memory {r[7]} MiB)")
    print(f"  CPU seconds: resync {r[6]}, {r[5]}; CPU us per row: resync {float(r[6]) * 1e6 / n:.2f}")
    print(f"  ratio resync/COPY: {copy_s / took:.3f} (target >= 0.5)")
lag = [r for r in rows if r[1] == "lag"]
if lag:
    rtt = int(__import__("os").environ.get("PGRELAY_BENCH_RTT_MS", "0") or 0)
    print("\nlag: end-to-end, commit in us -> row written in eu (ms)"
          + (f", us-eu round trip {rtt} ms (target p99 <= {rtt + 250} ms)" if rtt else ""))
    for r in lag:
        print(f"  {r[0]:8s} rows {r[2]:>8}  p50 {r[3]:>8}  p99 {r[4]:>8}  max {r[5]:>8}  ({r[6]})")
outage = [r for r in rows if r[1] == "outage"]
if outage:
    print(f"\noutage: the target away for {outage[0][3]}s under {sys.argv[4]}; from the resume until the lag is under 1 s")
    print("  (every row inserted in us more than 1 s earlier is written in eu; `polled`: the same seen from outside, every 0.5 s)")
    took = {}
    for r in outage:
        name = r[0] + (f" (broker {r[2]})" if r[2] else "")
        if r[8].startswith("FAILED"):
            print(f"  {name:30s} {r[8]}")
            continue
        took[r[0]] = float(r[5])
        print(f"  {name:30s} lag < 1 s after {float(r[5]):>6.2f} s (polled {float(r[6]):.1f} s)   "
              f"backlog {int(r[4]):>9,} rows = {int(r[7]):>7,} rows/s   first row {float(r[9]):.2f} s   ({r[8]})")
    if "native" in took and "pgrelay" in took:
        print(f"  ratio pgrelay/native, time to catch up: {took['pgrelay'] / max(took['native'], 0.01):.2f}")
PY
