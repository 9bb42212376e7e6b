#!/usr/bin/env bash
# The rolling-upgrade test: three regions set up and run by an older pgrelay,
# every region writing, then each region upgraded in turn to the binary of
# this work tree by the procedure of docs/operations.md#upgrades (stop,
# setup, check, start, wait until active) while the others still run the old
# one. Passes when changes flowed both ways between old and new sidecars and,
# once the writers stop, every region holds the same rows, merge counters
# equal the increments committed, nothing was parked and `pgrelay verify`
# finds no difference (tests/it/upgrade.rs).
#
#   bash scripts/upgrade-test.sh [FROM_REF]     (default v0.1.0)
#
# FROM_REF is any git revision (tag, branch, commit) of this repository. Its
# binary is built once, in a git worktree and target directory of its own
# under $PGRELAY_UPGRADE_DIR (default /tmp/pgrelay-upgrade-from), and kept
# there as pgrelay-<commit>: a rerun for the same commit does not build again.
#
# The test runs under the lock the integration tests share,
# $PGRELAY_TESTS_LOCK (default /tmp/pgrelay-tests.lock; empty: no lock,
# for a caller that holds it already).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"

case "${1:-}" in
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
esac
FROM_REF="${1:-v0.1.0}"
WORK="${PGRELAY_UPGRADE_DIR:-/tmp/pgrelay-upgrade-from}"
LOCK="${PGRELAY_TESTS_LOCK-/tmp/pgrelay-tests.lock}"

log() { printf '[upgrade-test] %s\n' "$*" >&2; }

if ! commit="$(git rev-parse --verify --quiet "${FROM_REF}^{commit}")"; then
    log "no such revision: $FROM_REF (a tag, branch or commit of this repository; git tag lists the releases)"
    exit 2
fi
old_bin="$WORK/pgrelay-$commit"

bash scripts/install-deps.sh

if [ -x "$old_bin" ]; then
    log "$FROM_REF ($commit): using the binary built before, $old_bin"
else
    mkdir -p "$WORK"
    tree="$WORK/tree-$commit"
    target="$WORK/target"
    if [ ! -d "$tree" ]; then
        git worktree prune
        git worktree add --detach "$tree" "$commit" >/dev/null
    fi
    # the first build reuses this tree's compiled dependencies where the
    # lock file agrees (cargo rebuilds whatever differs)
    if [ ! -d "$target/debug" ] && [ -d "$ROOT/target/debug/deps" ]; then
        mkdir -p "$target/debug"
        cp -a "$ROOT/target/debug/build" "$ROOT/target/debug/deps" "$ROOT/target/debug/.fingerprint" "$target/debug/"
    fi
    log "building $FROM_REF ($commit) in $tree"
    SECONDS=0
    (cd "$tree" && CARGO_TARGET_DIR="$target" cargo build --locked --bin pgrelay)
    log "built $FROM_REF in ${SECONDS}s"
    cp "$target/debug/pgrelay" "$old_bin.tmp"
    mv "$old_bin.tmp" "$old_bin"
    git worktree remove --force "$tree"
fi
"$old_bin" --version >&2 || true

# -o: the lock is the flock process's alone, so no sidecar or server the
# test leaves behind after a crash keeps holding it
locked=()
[ -z "$LOCK" ] || locked=(flock -o "$LOCK")
log "running the upgrade test from $FROM_REF${LOCK:+ under $LOCK}"
SECONDS=0
rc=0
PGRELAY_UPGRADE_FROM_BIN="$old_bin" "${locked[@]}" \
    cargo nextest run --locked --test-threads 2 -E 'test(/upgrade::/)' --no-capture || rc=$?
log "upgrade test from $FROM_REF: exit $rc after ${SECONDS}s (waiting for the lock and the test build included)"
exit "$rc"
