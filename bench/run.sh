#!/usr/bin/env bash
# Reruns the benchmark record: every server under the same user-load
# workloads, one server after another in one run, then a table with each
# server's figures and their ratio to the first one's.
#
#   bench/run.sh                  # user-service, the discarding sink, and the
#                                 # peers that bench/peers/build.sh has built
#   SERVERS="a=/path/a b=/path/b" bench/run.sh   # these server binaries
#                                 # (each takes --addr HOST:PORT)
#   QUICK=1 bench/run.sh          # smaller workloads, for a quick look
#
# Everything runs on loopback; every run is bounded by --total or --duration.
set -euo pipefail
cd "$(dirname "$0")/.."

USERS=${USERS:-1000000}        # bulk import size, then the store ListUsers scans
UNARY_FOR=${UNARY_FOR:-5s}     # length of each unary run
SYNC_UPSERTS=${SYNC_UPSERTS:-100000}
# Slow servers stop at a time limit instead of a count: bulk and sync after
# CAP, list starts no scan after CAP (the one under way finishes).
CAP=${CAP:-30s}
if [ -n "${QUICK:-}" ]; then
    USERS=200000 UNARY_FOR=2s SYNC_UPSERTS=20000 CAP=10s
fi

cargo build --release --locked --quiet -p user-service -p user-load
load=target/release/user-load
out=bench/results/$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$out"

# name=command pairs; a command gets --addr 127.0.0.1:PORT appended.
if [ -z "${SERVERS:-}" ]; then
    SERVERS="user-service=target/release/user-service+--store+memory sink=$load+sink"
    [ -x bench/peers/go/grpc-go-server ] && SERVERS+=" grpc-go=bench/peers/go/grpc-go-server"
    [ -x bench/peers/python/.venv/bin/python ] && SERVERS+=" grpcio=bench/peers/python/run-server"
fi

source bench/lib.sh
trap stop_server EXIT

# start NAME COMMAND: a fresh server (empty store), its log in
# $out/NAME.server.log; sets $addr.
start() {
    local name=$1 command=${2//+/ }
    : >"$out/$name.server.log"
    # shellcheck disable=SC2086 # the command is words
    start_server "$out/$name.server.log" $command
}

rss_mib() {
    awk '/VmRSS/ { printf "%.0f", $2 / 1024 }' "/proc/$server_pid/status"
}

# load NAME WORKLOAD ARGS...: one user-load run, its report kept as JSON.
# A run that could not do its work (exit status 1) still leaves its report,
# whose statuses the summary shows; anything else stops the benchmark.
load() {
    local name=$1 workload=$2 status=0
    shift 2
    timeout 300 "$load" "$@" --addr "$addr" --json >"$out/$name.$workload.json" || status=$?
    if [ "$status" -ne 0 ] && [ "$status" -ne 1 ]; then
        echo "user-load $* exited $status" >&2
        return 1
    fi
}

echo "results in $out"
for pair in $SERVERS; do
    name=${pair%%=*}
    command=${pair#*=}
    echo "== $name"
    start "$name" "$command"
    # A slow server may still be working through rows already sent at CAP.
    load "$name" bulk bulk --total "$USERS" --duration "$CAP" --timeout 120s --concurrency 4
    echo "{\"rss_mib\": $(rss_mib)}" >"$out/$name.rss.json"
    load "$name" list list --total 3 --duration "$CAP" --timeout 300s
    load "$name" get get --duration "$UNARY_FOR" --concurrency 64 --prefill 10000
    stop_server
    start "$name" "$command"
    load "$name" add add --duration "$UNARY_FOR" --concurrency 64
    stop_server
    start "$name" "$command"
    # The sink publishes no Changes, so nothing would reach its watchers.
    watchers=8
    [ "$name" = sink ] && watchers=0
    load "$name" sync sync --total "$SYNC_UPSERTS" --duration "$CAP" --in-flight 64 --watchers "$watchers"
    stop_server
done

python3 bench/summary.py "$out" | tee "$out/summary.md"
