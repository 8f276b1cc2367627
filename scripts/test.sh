#!/usr/bin/env bash
# Runs the whole test suite: unit, integration, end-to-end (real processes
# on 127.0.0.1) and doc tests. Everything is built once with the release
# profile, the same one the demo and benchmarks use, so RocksDB's C++ is
# compiled once (about half an hour on two cores, the first time only).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

# The end-to-end tests start the real binaries: build them first.
cargo build --release --workspace --bins
# Doc tests first (nextest does not run them), so that the suite's summary
# line is the last thing printed.
cargo test --release --workspace --doc
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --release --workspace --no-fail-fast "$@"
else
  cargo test --release --workspace --no-fail-fast "$@"
fi
