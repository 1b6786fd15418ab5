#!/usr/bin/env bash
# The playground's cost and its feed's latency (see BENCHMARKS.md):
#
# 1. gRPC throughput with the playground on (the default: every plaintext
#    connection's first bytes are read to tell HTTP/2 from HTTP/1.1) and
#    off, alternating in one run: user-load bulk (1 M users) and add, each
#    on a fresh memory-store server, ROUNDS times each.
# 2. The time from an upsert's commit to its Change on the page, through
#    the WebSocket bridge, at RATE changes per second
#    (benches/playground_feed.rs).
#
#   bench/playground.sh            # ROUNDS=3 USERS=1000000 UNARY_FOR=5s RATE=1000
#
# Everything runs on loopback and is bounded by --total or --duration.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
USERS=${USERS:-1000000}
UNARY_FOR=${UNARY_FOR:-5s}
RATE=${RATE:-1000}
FEED_FOR=${FEED_FOR:-10}

cargo build --release --locked --quiet -p user-service -p user-load
load=target/release/user-load
out=bench/results/playground-$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$out"

source bench/lib.sh
trap stop_server EXIT

# start PLAYGROUND: a fresh memory-store server; sets $addr.
start() {
    start_server "$out/server.log" target/release/user-service --store memory --playground "$1"
}

echo "results in $out"
for round in $(seq "$ROUNDS"); do
    # Alternate which goes first, so that neither always runs warmer.
    order="true false"
    [ $((round % 2)) -eq 0 ] && order="false true"
    for playground in $order; do
        echo "== round $round, playground $playground"
        start "$playground"
        timeout 300 "$load" bulk --total "$USERS" --concurrency 4 --timeout 120s --addr "$addr" --json \
            >"$out/bulk.$playground.$round.json"
        stop_server
        start "$playground"
        timeout 300 "$load" add --duration "$UNARY_FOR" --concurrency 64 --addr "$addr" --json \
            >"$out/add.$playground.$round.json"
        stop_server
    done
done

python3 - "$out" <<'PY' | tee "$out/summary.md"
import json, pathlib, statistics, sys

out = pathlib.Path(sys.argv[1])

def throughput(path):
    def find(node):
        if isinstance(node, dict):
            if isinstance(node.get("throughput"), (int, float)):
                return node["throughput"]
            for value in node.values():
                found = find(value)
                if found is not None:
                    return found
        if isinstance(node, list):
            for value in node:
                found = find(value)
                if found is not None:
                    return found
        return None
    return find(json.loads(path.read_text()))

print("| workload | playground on | playground off | on / off |")
print("| --- | --- | --- | --- |")
for workload in ["bulk", "add"]:
    runs = {mode: [throughput(p) for p in sorted(out.glob(f"{workload}.{mode}.*.json"))] for mode in ["true", "false"]}
    on, off = statistics.median(runs["true"]), statistics.median(runs["false"])
    each = lambda mode: ", ".join(f"{r:,.0f}" for r in runs[mode])
    print(f"| {workload} | {on:,.0f}/s ({each('true')}) | {off:,.0f}/s ({each('false')}) | {on / off:.3f} |")
PY

echo "== the feed through the bridge, $RATE changes/s for ${FEED_FOR}s"
start true
PLAYGROUND_ADDR=$addr FEED_RATE=$RATE FEED_SECONDS=$FEED_FOR \
    cargo bench --locked --quiet --bench playground_feed | tee "$out/feed.txt"
stop_server
