#!/usr/bin/env bash
# The whole test suite: unit tests and the integration tests against real
# PostgreSQL 15 clusters and a Kafka-protocol broker that the tests start
# themselves on free ports.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/install-deps.sh
# one build for every test binary; two test threads on two cores
cargo nextest run --locked --no-fail-fast --test-threads "${PGRELAY_TEST_THREADS:-2}" "$@"
