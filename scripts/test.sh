#!/usr/bin/env bash
# Runs the whole test suite: the Rust tests, then every check that drives the
# real binaries from outside. Installs the test tools it needs (PyPI and
# Debian packages, see scripts/install-test-tools.sh) when they are missing,
# and gives the tests a fresh PostgreSQL database (see
# scripts/test-database.sh), which also makes the PostgreSQL tests
# required: none of them is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

passed=0
failed=0
failures=()

stage() {
    local name=$1
    shift
    echo "==> $name"
    if "$@"; then
        passed=$((passed + 1))
    else
        failed=$((failed + 1))
        failures+=("$name")
    fi
}

scripts/install-test-tools.sh

# A fresh PostgreSQL database for the run, dropped at exit.
source scripts/test-database.sh
start_test_database
trap stop_test_database EXIT

stage "lock check" scripts/check-lock.sh
stage "documentation links" scripts/check-links.py
stage "cargo test" cargo test --workspace --all-targets --locked
stage "examples against a live server" scripts/check-examples.sh
stage "examples against the plain example server" scripts/check-examples.sh --plain-server
stage "README grpcurl walkthrough" scripts/check-grpcurl.sh
stage "grpcio client" scripts/python-tests.sh
stage "grpc-go client" scripts/interop-go.sh
stage "playground in headless Chromium" scripts/browser-tests.sh
stage "load generator smoke" scripts/check-load.sh
stage "soak (30 s)" env SOAK_SECS=30 cargo test --locked --test soak -- --ignored --nocapture

echo
if [ "$failed" -ne 0 ]; then
    printf 'failed: %s\n' "${failures[@]}"
fi
echo "suite: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
