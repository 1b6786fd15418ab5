#!/usr/bin/env bash
# Builds the peer servers that bench/run.sh compares user-service with.
#
# - python/: a grpcio (asyncio) server; grpcio and grpcio-tools come from
#   PyPI into a virtualenv, and grpcio-tools' bundled protoc generates the
#   code from proto/user.proto. Our own build never needs protoc.
# - A grpc-go peer is not written yet.
set -euo pipefail
cd "$(dirname "$0")"

python3 -m venv python/.venv
python/.venv/bin/pip install --quiet grpcio grpcio-tools
mkdir -p python/gen
python/.venv/bin/python -m grpc_tools.protoc -I ../../proto \
    --python_out=python/gen --grpc_python_out=python/gen user.proto
chmod +x python/run-server
echo "built: python/run-server"
