#!/usr/bin/env bash
# Two builds of the server side by side: bulk import and AddUser with the
# same user-load, alternating which goes first, a fresh memory-store server
# for every run, and each server's CPU (utime + stime from /proc) over its
# run, which does not depend on how the two cores are shared with the
# generator.
#
#   bench/ab.sh BEFORE_BINARY AFTER_BINARY
#   ROUNDS=5 USERS=1000000 UNARY_FOR=5s bench/ab.sh old/user-service target/release/user-service
#
# Extra server flags for both sides: SERVER_FLAGS="--playground false".
# Everything runs on loopback and is bounded by --total or --duration.
set -euo pipefail
cd "$(dirname "$0")/.."

[ $# -eq 2 ] || { echo "usage: bench/ab.sh BEFORE_BINARY AFTER_BINARY" >&2; exit 2; }
before=$1
after=$2
ROUNDS=${ROUNDS:-5}
USERS=${USERS:-1000000}
UNARY_FOR=${UNARY_FOR:-5s}
SERVER_FLAGS=${SERVER_FLAGS:-}

cargo build --release --locked --quiet -p user-load
load=target/release/user-load
out=bench/results/ab-$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$out"
ticks=$(getconf CLK_TCK)

source bench/lib.sh
trap stop_server EXIT

# start BINARY: a fresh memory-store server; sets $addr.
start() {
    # shellcheck disable=SC2086 # the flags are words
    start_server "$out/server.log" "$1" --store memory $SERVER_FLAGS
}

# run SIDE BINARY WORKLOAD ROUND ARGS...: one load run on a fresh server,
# its report in $out/WORKLOAD.SIDE.ROUND.json and the server's CPU seconds
# in $out/WORKLOAD.SIDE.ROUND.cpu.
run() {
    local side=$1 binary=$2 workload=$3 round=$4
    shift 4
    start "$binary"
    local cpu_before
    cpu_before=$(cpu_ticks "$server_pid")
    timeout 300 "$load" "$workload" "$@" --addr "$addr" --json >"$out/$workload.$side.$round.json"
    echo "$(( $(cpu_ticks "$server_pid") - cpu_before )) $ticks" >"$out/$workload.$side.$round.cpu"
    stop_server
}

echo "results in $out"
for round in $(seq "$ROUNDS"); do
    order="before after"
    [ $((round % 2)) -eq 0 ] && order="after before"
    for side in $order; do
        binary=$before
        [ "$side" = after ] && binary=$after
        echo "== round $round, $side"
        run "$side" "$binary" bulk "$round" --total "$USERS" --concurrency 4 --timeout 120s
        run "$side" "$binary" add "$round" --duration "$UNARY_FOR" --concurrency 64
    done
done

python3 - "$out" <<'PY' | tee "$out/summary.md"
import json, pathlib, statistics, sys

out = pathlib.Path(sys.argv[1])

def report(path):
    """The run's rate, and how many units it did (rows stored for bulk,
    calls answered OK for add)."""
    data = json.loads(path.read_text())
    done = data["rows_added"] if data["mode"] == "bulk" else data["ok_calls"]
    return data["throughput"], done

def cpu(path):
    ticks, per_second = path.read_text().split()
    return int(ticks) / int(per_second)

unit = {"bulk": "users/s", "add": "calls/s"}
print("| workload | before: runs | median | after: runs | median | after / before | server CPU µs per unit, medians before / after |")
print("| --- | --- | ---: | --- | ---: | ---: | --- |")
for workload in ["bulk", "add"]:
    rates, cpus = {}, {}
    for side in ["before", "after"]:
        rates[side], cpus[side] = [], []
        for path in sorted(out.glob(f"{workload}.{side}.*.json")):
            rate, done = report(path)
            rates[side].append(rate)
            seconds = cpu(path.with_suffix(".cpu"))
            cpus[side].append(seconds / done * 1e6 if done else float("nan"))
    b, a = statistics.median(rates["before"]), statistics.median(rates["after"])
    each = lambda side: " ".join(f"{r:,.0f}" for r in rates[side])
    cb, ca = statistics.median(cpus["before"]), statistics.median(cpus["after"])
    print(f"| {workload}, {unit[workload]} | {each('before')} | {b:,.0f} | {each('after')} | {a:,.0f} | {a / b:.3f} | {cb:.2f} / {ca:.2f} |")
PY
