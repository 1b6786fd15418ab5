#!/usr/bin/env bash
# How closely user-load's open loop measures the server: the tables of
# BENCHMARKS.md's "Open loop at low rates" section, with the machine and
# the date. Run it alone on the machine: other builds distort it.
#   bench/pacing.sh
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked --quiet -p user-service -p user-load
echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "nproc: $(nproc)"
lscpu | head -n 15
echo
cargo bench --locked --quiet -p user-load --bench pacing
