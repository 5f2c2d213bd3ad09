#!/usr/bin/env bash
# Runs the loom models of monte-rpc's src/sync, from any directory:
#   bash loom-tests/run.sh [test-name-filter]
# LOOM_MAX_PREEMPTIONS bounds the search (default 3). A broken invariant
# shows as a failed assertion or a loom deadlock report; loom can hang after
# reporting a deadlock in a multi-thread model, so the run is also bounded by
# LOOM_TIMEOUT seconds (default 600), and running out of it fails too.
set -euo pipefail
cd "$(dirname "$0")"
export LOOM_MAX_PREEMPTIONS="${LOOM_MAX_PREEMPTIONS:-3}"
RUSTFLAGS="--cfg loom ${RUSTFLAGS:-}" cargo test --release --target-dir target --no-run
RUSTFLAGS="--cfg loom ${RUSTFLAGS:-}" exec timeout "${LOOM_TIMEOUT:-600}" \
  cargo test --release --target-dir target "$@"
