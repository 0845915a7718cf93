#!/usr/bin/env bash
# Runs every test on this machine, installing or starting what they need first:
# the project's Python environment (chdb-core, the real ClickHouse engine), PostgreSQL, then the
# Rust tests (unit, golden, property, fuzz, integration against the chdb-backed ClickHouse and
# PostgreSQL) and the chdb server's own tests. Nothing is skipped: a missing dependency fails.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PREAGG_TEST_PYTHON=$(scripts/python-env.sh)
export PREAGG_TEST_PYTHON
scripts/ensure-postgres.sh
export PREAGG_TEST_POSTGRES_URL=${PREAGG_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/test}

cargo test --locked --all-targets "$@"
"$PREAGG_TEST_PYTHON" -m pytest -q tests/chdb_server
