#!/usr/bin/env bash
# The longer randomized equivalence run, separate from the quick suite: ROUNDS random ranges (each
# over a random supported query form) on freshly seeded data, each checked direct, cold and warm.
# SEED replays a run. Example: ROUNDS=300 scripts/long-equivalence.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PREAGG_TEST_PYTHON=$(scripts/python-env.sh)
export PREAGG_TEST_PYTHON
export PREAGG_EQUIVALENCE_ROUNDS=${ROUNDS:-200}
if [ -n "${SEED:-}" ]; then export PREAGG_TEST_SEED=$SEED; fi
cargo test --release --locked --test equivalence randomized_ranges_match_direct -- --nocapture
