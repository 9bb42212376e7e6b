#!/usr/bin/env bash
# Runs the convergence checker (tests/it/checker.rs) on one fresh seed after
# another for as long as asked: three regions, random operations in every
# region, faults while they run (kill -9 of a sidecar, a database crash, a
# cut link, a durable broker restart), each history checked against what
# last-writer-wins and the residency rules must produce.
#
#   bash scripts/soak.sh --minutes 60 [--seed S] [--ops N] [--upgrade [REF]]
#
#   --minutes N   how long to keep starting new histories (default 60)
#   --seed S      the first seed (default: the current time); each next
#                 history uses the next seed, so a failure names its seed
#   --ops N       transactions per region and history (default 300)
#   --upgrade     first the rolling upgrade from REF (default v0.1.0) to
#                 this tree, scripts/upgrade-test.sh; the soak stops if it fails
#
# Prints one line per history checked and a total at the end; stops at the
# first failing history with its report (seed, key, expected and found
# versions, the writes that touched the key). Rerun one seed with
# PGRELAY_CHECK_SEEDS=S cargo nextest run --test it checker:: --no-capture
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

MINUTES=60
SEED="$(date +%s)"
OPS=300
UPGRADE_FROM=
while [ $# -gt 0 ]; do
    case "$1" in
        --minutes) MINUTES="$2"; shift 2 ;;
        --seed) SEED="$2"; shift 2 ;;
        --ops) OPS="$2"; shift 2 ;;
        --upgrade)
            UPGRADE_FROM=v0.1.0
            if [ $# -gt 1 ] && [ "${2#--}" = "$2" ]; then UPGRADE_FROM="$2"; shift; fi
            shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
done

bash scripts/install-deps.sh
cargo nextest run --locked --no-run --test it >/dev/null 2>&1 || cargo nextest run --locked --no-run --test it

if [ -n "$UPGRADE_FROM" ]; then
    # like the histories below, without the test lock
    if ! PGRELAY_TESTS_LOCK= bash scripts/upgrade-test.sh "$UPGRADE_FROM"; then
        echo "soak: the rolling upgrade from $UPGRADE_FROM FAILED" >&2
        exit 1
    fi
    echo "[soak $((SECONDS / 60))m] rolling upgrade from $UPGRADE_FROM passed"
fi

end=$((SECONDS + MINUTES * 60))
seed="$SEED"
histories=0 ops=0 writes=0 faults=0 records=0
declare -A kinds=()
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
while [ "$SECONDS" -lt "$end" ]; do
    if ! PGRELAY_CHECK_SEEDS="$seed" PGRELAY_CHECK_OPS="$OPS" \
        cargo nextest run --locked --test it checker:: --no-capture >"$log" 2>&1; then
        mkdir -p target
        cp "$log" "target/soak-failure-$seed.log"
        tail -n 120 "$log"
        echo "soak: history with seed $seed FAILED after $histories histories passed (whole log: target/soak-failure-$seed.log)" >&2
        exit 1
    fi
    line="$(grep '^CHECKED seed' "$log" | tail -n 1)"
    echo "[soak $((SECONDS / 60))m] $line"
    read -r o w f r < <(echo "$line" | sed -E 's/.*: ([0-9]+) ops, ([0-9]+) row writes, ([0-9]+) faults, ([0-9]+) records read/\1 \2 \3 \4/')
    histories=$((histories + 1)) ops=$((ops + o)) writes=$((writes + w)) faults=$((faults + f)) records=$((records + r))
    for pair in $(grep '^CHECKED faults seed' "$log" | tail -n 1 | cut -d: -f2-); do
        kind="${pair%%=*}"
        kinds[$kind]=$(( ${kinds[$kind]:-0} + ${pair#*=} ))
    done
    seed=$((seed + 1))
done
echo "soak: $histories histories passed in $MINUTES min (seeds $SEED..$((seed - 1))): $ops operations, $writes row writes, $faults faults, $records records read"
by_kind=""
for kind in $(printf '%s\n' "${!kinds[@]}" | sort); do by_kind="$by_kind $kind=${kinds[$kind]}"; done
echo "soak: faults by kind:${by_kind:- none}"
