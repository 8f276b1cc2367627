#!/usr/bin/env bash
# Runs the demo: the coordinator and three example services as separate
# processes, a few hundred concurrent atomic orders across them, a summary
# and an all-or-nothing check. Extra arguments go to the demo (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --workspace --bins
exec "${CARGO_TARGET_DIR:-target}/release/demo" "$@"
