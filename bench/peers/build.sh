#!/usr/bin/env bash
# Builds the peer servers that bench/run.sh compares user-service with.
# Each takes --addr HOST:PORT and serves proto/user.proto.
#
# - go/: a grpc-go server (and go-client/: a grpc-go load client, for
#   bench/grpc-go-client.sh), built offline in GOPATH mode from Debian's
#   packaged sources, with the generators and packages the grpc-go client
#   suite uses (scripts/install-test-tools.sh installs them, see
#   scripts/interop-go.sh): Debian's protoc with protoc-gen-go (the
#   "APIv2" one) and protoc-gen-go-grpc. Our own build never needs protoc.
# - python/: a grpcio (asyncio) server; grpcio and grpcio-tools come from
#   PyPI into a virtualenv, and grpcio-tools' bundled protoc generates the
#   code.
#
#   bench/peers/build.sh        # both
#   bench/peers/build.sh go     # the grpc-go ones only
set -euo pipefail
cd "$(dirname "$0")"
proto=../../proto/user.proto

# grpc-go
../../scripts/install-test-tools.sh
build=$PWD/go/build
rm -rf "$build"
mkdir -p "$build/proto" "$build/src/grpc-go-server" "$build/src/grpc-go-client"
cp "$proto" "$build/proto/user.proto"
# The peer's types embed nothing: its server implements every method.
protoc -I "$build/proto" \
    --plugin=protoc-gen-go=/usr/bin/protoc-gen-go \
    --plugin=protoc-gen-go-grpc=/usr/bin/protoc-gen-go-grpc \
    --go_out="$build/src" --go_opt=Muser.proto=peer/usergrpc \
    --go-grpc_out="$build/src" --go-grpc_opt=Muser.proto=peer/usergrpc \
    --go-grpc_opt=require_unimplemented_servers=false \
    user.proto
cp go/main.go "$build/src/grpc-go-server/"
cp go-client/main.go "$build/src/grpc-go-client/"
(cd "$build" && GO111MODULE=off GOPATH="$build:/usr/share/gocode" GOCACHE="$build/cache" \
    go build -o ../grpc-go-server grpc-go-server &&
    GO111MODULE=off GOPATH="$build:/usr/share/gocode" GOCACHE="$build/cache" \
        go build -o ../grpc-go-client grpc-go-client)
echo "built: go/grpc-go-server, go/grpc-go-client"
[ "${1:-}" = go ] && exit 0

# Python grpcio
python3 -m venv python/.venv
python/.venv/bin/pip install --quiet grpcio grpcio-tools
mkdir -p python/gen
python/.venv/bin/python -m grpc_tools.protoc -I ../../proto \
    --python_out=python/gen --grpc_python_out=python/gen user.proto
chmod +x python/run-server
echo "built: python/run-server"
