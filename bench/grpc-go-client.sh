#!/usr/bin/env bash
# Bulk import with a grpc-go client (bench/peers/go-client, one DATA frame
# per message) against user-service and the grpc-go peer, alternating, in
# one run: users/s, and the server's CPU seconds per million users (its
# utime + stime from /proc over the import), which does not depend on how
# the two cores are shared with the client.
#
#   bench/peers/build.sh && bench/grpc-go-client.sh
#   ROUNDS=5 USERS=1000000 STREAMS=4 bench/grpc-go-client.sh
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
USERS=${USERS:-1000000}
STREAMS=${STREAMS:-4}
client=bench/peers/go/grpc-go-client
[ -x "$client" ] || { echo "build the peers first: bench/peers/build.sh" >&2; exit 1; }
cargo build --release --locked --quiet --bin user-service
SERVERS=${SERVERS:-"user-service=target/release/user-service+--store+memory grpc-go=bench/peers/go/grpc-go-server"}

ticks=$(getconf CLK_TCK)
cpu_seconds() { # utime + stime of a process, in seconds
    awk -v t="$ticks" '{ printf "%.3f", ($14 + $15) / t }' "/proc/$1/stat"
}
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
pid=""
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null' EXIT

results=$(mktemp)
for round in $(seq "$ROUNDS"); do
    for pair in $SERVERS; do
        name=${pair%%=*}
        command=${pair#*=}
        port=$(free_port)
        # shellcheck disable=SC2086 # the command is words
        ${command//+/ } --addr "127.0.0.1:$port" >/dev/null 2>&1 &
        pid=$!
        until python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 0.2)" 2>/dev/null; do
            sleep 0.1
        done
        before=$(cpu_seconds "$pid")
        line=$("$client" -addr "127.0.0.1:$port" -users "$USERS" -streams "$STREAMS")
        after=$(cpu_seconds "$pid")
        kill "$pid"
        wait "$pid" 2>/dev/null || true
        pid=""
        rate=$(awk '{ print $6 }' <<<"$line")
        cpu=$(awk -v a="$after" -v b="$before" -v u="$USERS" 'BEGIN { printf "%.2f", (a - b) * 1e6 / u }')
        echo "round $round $name: $rate users/s, server CPU $cpu s per million users"
        echo "$name $rate $cpu" >>"$results"
    done
done

python3 - "$results" "$ROUNDS" <<'PY'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1])]
print()
print(f"| server | users/s (median of {sys.argv[2]}) | server CPU s per million users (median) |")
print("| --- | ---: | ---: |")
for name in dict.fromkeys(row[0] for row in rows):
    rates = [float(r[1]) for r in rows if r[0] == name]
    cpus = [float(r[2]) for r in rows if r[0] == name]
    print(f"| {name} | {statistics.median(rates):,.0f} | {statistics.median(cpus):.2f} |")
PY
rm -f "$results"
