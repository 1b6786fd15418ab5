#!/usr/bin/env bash
# Runs the whole test suite: the Rust tests, then every check that drives the
# real binaries from outside. Installs the test tools it needs (from PyPI)
# when they are missing.
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

stage "lock check" scripts/check-lock.sh
stage "cargo test" cargo test --all-targets --locked
stage "grpcio client" scripts/python-tests.sh
stage "soak (30 s)" env SOAK_SECS=30 cargo test --locked --test soak -- --ignored --nocapture

echo
if [ "$failed" -ne 0 ]; then
    printf 'failed: %s\n' "${failures[@]}"
fi
echo "suite: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
