#!/usr/bin/env bash
# A local three-region demo: three PostgreSQL 15 clusters (us, eu, cn), one
# Kafka-protocol broker and three pgrelay sidecars, a small workload in each
# data class, then what arrived where. Ctrl-C (or the end) tears it all down.
#
#   bash scripts/demo.sh            # run, print, tear down
#   PGRELAY_DEMO_KEEP=1 bash scripts/demo.sh   # keep running until Ctrl-C
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# the demo runs the in-memory broker: the durable one (a long build, for
# the broker-restart tests) is left to the test command, and so are the
# test tools (chromium, cargo-nextest)
PGRELAY_SKIP_DURABLE_BROKER=1 PGRELAY_SKIP_TEST_TOOLS=1 bash scripts/install-deps.sh
# a debug build: it compiles in about half the time of an optimised one,
# is fast enough for the demo's few rows, and its dependencies are the ones
# the test suite builds next. PGRELAY_DEMO_RELEASE=1 builds optimised.
if [ -n "${PGRELAY_DEMO_RELEASE:-}" ]; then
    echo "building pgrelay (release)..."
    cargo build --release --locked --quiet
    BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/pgrelay"
else
    echo "building pgrelay (debug)..."
    cargo build --locked --quiet
    BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug/pgrelay"
fi
PGBIN=/usr/lib/postgresql/15/bin
WORK="$(mktemp -d /tmp/pgrelay-demo.XXXXXX)"
chown postgres "$WORK"
export PGRELAY_DEMO_PASSWORD="demo-$(date +%s)"
export PGRELAY_US_HASH_KEY="us-demo-hash-key-$(date +%s)-0123456789"
export PGRELAY_EU_HASH_KEY="eu-demo-hash-key-$(date +%s)-0123456789"
export PGRELAY_CN_HASH_KEY="cn-demo-hash-key-$(date +%s)-0123456789"
REGIONS=(us eu cn)
PIDS=()
declare -A PORT HTTP

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

cleanup() {
    set +e
    echo
    echo "tearing down..."
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
    for r in "${REGIONS[@]}"; do
        [ -d "$WORK/$r" ] && runuser -u postgres -- "$PGBIN/pg_ctl" -D "$WORK/$r" -m fast -w stop >/dev/null 2>&1
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "$PGRELAY_DEMO_PASSWORD" > "$WORK/pw"; chown postgres "$WORK/pw"
for r in "${REGIONS[@]}"; do
    PORT[$r]="$(free_port)"
    runuser -u postgres -- "$PGBIN/initdb" -D "$WORK/$r" --no-sync -U postgres \
        --auth-local=trust --auth-host=scram-sha-256 --pwfile="$WORK/pw" >/dev/null
    cat >> "$WORK/$r/postgresql.auto.conf" <<CONF
port = ${PORT[$r]}
listen_addresses = '127.0.0.1'
unix_socket_directories = '$WORK'
wal_level = logical
track_commit_timestamp = on
max_replication_slots = 10
max_wal_senders = 10
fsync = off
CONF
    runuser -u postgres -- "$PGBIN/pg_ctl" -D "$WORK/$r" -l "$WORK/$r.log" -w start >/dev/null
    psql -X -q -h "$WORK" -p "${PORT[$r]}" -U postgres -f demo/schema.sql >/dev/null
    echo "region $r: PostgreSQL on 127.0.0.1:${PORT[$r]}"
done

BROKER_PORT="$(free_port)"
"$ROOT/.tools/bin/tansu" broker --listener-url "tcp://127.0.0.1:$BROKER_PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$BROKER_PORT" --storage-engine memory://tansu/ \
    >"$WORK/broker.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/$BROKER_PORT) 2>/dev/null && break; sleep 0.1; done
echo "broker on 127.0.0.1:$BROKER_PORT"

for r in "${REGIONS[@]}"; do
    HTTP[$r]="$(free_port)"
    sed -e "s/@PORT_us@/${PORT[us]}/; s/@PORT_eu@/${PORT[eu]}/; s/@PORT_cn@/${PORT[cn]}/" \
        -e "s/@BROKERS@/127.0.0.1:$BROKER_PORT/" -e "s/@HTTP_PORT@/${HTTP[$r]}/" \
        demo/relay.toml.in > "$WORK/relay-$r.toml"
    "$BIN" setup --config "$WORK/relay-$r.toml" --region "$r" | sed "s/^/  /"
done
for r in "${REGIONS[@]}"; do
    PGRELAY_LOG=warn "$BIN" run --config "$WORK/relay-$r.toml" --region "$r" 2>"$WORK/relay-$r.log" &
    PIDS+=($!)
done
sleep 2

sql() { psql -X -q -At -h "$WORK" -p "${PORT[$1]}" -U postgres -c "$2"; }
# waits (up to 60 s) until a count query in region $1 returns $3
wait_for() {
    for _ in $(seq 600); do
        [ "$(sql "$1" "$2" 2>/dev/null)" = "$3" ] && return 0
        sleep 0.1
    done
    echo "  (region $1: still waiting for: $2 = $3)"
}

echo
echo "workload:"
sql us "INSERT INTO users VALUES (1, 'alice@example.com', 'US')"
sql eu "INSERT INTO users VALUES (2, 'bernd@example.de', 'DE')"
sql cn "INSERT INTO users VALUES (3, 'li@example.cn', 'CN')"
sql us "INSERT INTO products VALUES (1, 'tea', 3.50), (2, 'cup', 9.90)"
sql eu "INSERT INTO products VALUES (3, 'teapot', 25.00)"
sql us "INSERT INTO currencies VALUES ('EUR', 1.08), ('CNY', 0.14)"
sql us "INSERT INTO orders VALUES (100, 'US', 'alice@example.com', '4111111111111111', 12.00)"
sql eu "INSERT INTO orders VALUES (200, 'DE', 'bernd@example.de', '5500000000000004', 30.00)"
sql cn "INSERT INTO orders VALUES (300, 'CN', 'li@example.cn', '340000000000009', 99.00)"
echo "  users (local), products (global), currencies (owned by us), orders (partitioned) written in every region"
if sql eu "INSERT INTO currencies VALUES ('GBP', 1.27)" 2>"$WORK/refused"; then
    echo "  eu wrote an owned table (unexpected)"
else
    echo "  eu was refused a write to currencies: $(sed -n 's/^ERROR: *//p' "$WORK/refused" | head -n1)"
fi
# cn updates a row us wrote, once it has arrived; then every region gets the update
wait_for cn "SELECT count(*) FROM products WHERE id = 1" 1
sql cn "UPDATE products SET price = 3.75 WHERE id = 1"
for r in "${REGIONS[@]}"; do
    wait_for "$r" "SELECT count(*) FROM products WHERE price = 3.75 OR id = 3" 2
    wait_for "$r" "SELECT count(*) FROM currencies" 2
    wait_for "$r" "SELECT count(*) FROM orders WHERE id = 100" 1
done

for r in "${REGIONS[@]}"; do
    echo
    echo "== region $r =="
    echo "users:      $(sql "$r" "SELECT coalesce(string_agg(id || ' ' || email, ', ' ORDER BY id), '-') FROM users")"
    echo "products:   $(sql "$r" "SELECT coalesce(string_agg(id || ' ' || name || ' ' || price, ', ' ORDER BY id), '-') FROM products")"
    echo "currencies: $(sql "$r" "SELECT coalesce(string_agg(code || ' ' || rate, ', ' ORDER BY code), '-') FROM currencies")"
    echo "orders:     $(sql "$r" "SELECT coalesce(string_agg(id || ' ' || country || ' ' || coalesce(left(email, 16), 'null') || ' ' || coalesce(card, 'null'), ', ' ORDER BY id), '-') FROM orders")"
done
echo
"$BIN" status --config "$WORK/relay-us.toml" 2>/dev/null || true

if [ -n "${PGRELAY_DEMO_KEEP:-}" ]; then
    echo
    for r in "${REGIONS[@]}"; do
        echo "status page of $r's sidecar: http://127.0.0.1:${HTTP[$r]}/"
    done
    echo "running; Ctrl-C to stop (configs and logs in $WORK)"
    wait
fi
