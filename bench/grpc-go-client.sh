#!/usr/bin/env bash
# The same grpc-go client (bench/peers/go-client: one connection, one DATA
# frame per message) against user-service and the grpc-go peer, alternating
# which goes first, a fresh memory-store server for every run: for each
# work, the rate and the server's CPU µs per operation (its utime + stime
# from /proc over the measured part of the run, which does not depend on
# how the two cores are shared with the client), and the ratio of the two
# servers' CPU per operation.
#
#   add:  AddUser, WORKERS concurrent callers, for FOR
#   get:  GetUser of 10,000 users added first (not measured), WORKERS, FOR
#   bulk: BulkAddUsers, STREAMS streams sharing USERS users
#   sync: SyncUsers upserts, one stream, WINDOW in flight, for FOR
#
#   bench/peers/build.sh go && bench/grpc-go-client.sh
#   ROUNDS=5 WORKS="get add" bench/grpc-go-client.sh
#   USER_SERVICE=/path/to/other/user-service bench/grpc-go-client.sh
#   SERVERS="after=target/release/user-service+--store+memory \
#            before=old/user-service+--store+memory \
#            grpc-go=bench/peers/go/grpc-go-server" bench/grpc-go-client.sh
#
# SERVERS is NAME=COMMAND pairs, `+` for spaces; the last is the one the
# others' CPU is compared with.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
WORKS=${WORKS:-"add get bulk sync"}
WORKERS=${WORKERS:-64}
FOR=${FOR:-5s}
USERS=${USERS:-400000}
STREAMS=${STREAMS:-4}
WINDOW=${WINDOW:-64}
client=bench/peers/go/grpc-go-client
[ -x "$client" ] || { echo "build the peers first: bench/peers/build.sh go" >&2; exit 1; }
if [ -z "${USER_SERVICE:-}" ]; then
    cargo build --release --locked --quiet --bin user-service
    USER_SERVICE=target/release/user-service
fi
SERVERS=${SERVERS:-"user-service=$USER_SERVICE+--store+memory grpc-go=bench/peers/go/grpc-go-server"}

ticks=$(getconf CLK_TCK)
source bench/lib.sh
trap stop_server EXIT
log=$(mktemp)

results=$(mktemp)
for work in $WORKS; do
    for round in $(seq "$ROUNDS"); do
        servers=$SERVERS
        # Every other round the other server goes first.
        [ $((round % 2)) -eq 0 ] && servers=$(tr ' ' '\n' <<<"$SERVERS" | tac | tr '\n' ' ')
        for pair in $servers; do
            name=${pair%%=*}
            command=${pair#*=}
            : >"$log"
            # shellcheck disable=SC2086 # the command is words
            start_server "$log" ${command//+/ }
            line=$("$client" -addr "$addr" -pid "$server_pid" -ticks "$ticks" -work "$work" \
                -workers "$WORKERS" -for "$FOR" -users "$USERS" -streams "$STREAMS" -window "$WINDOW")
            stop_server
            rate=$(awk '{ print $8 }' <<<"$line")
            cpu=$(awk '{ print $10 }' <<<"$line")
            echo "$work round $round $name: $rate ops/s, server CPU $cpu µs per op"
            echo "$work $name $rate $cpu" >>"$results"
        done
    done
done

python3 - "$results" "$ROUNDS" <<'PY'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1])]
names = list(dict.fromkeys(row[1] for row in rows))
last = names[-1]
print()
print(f"medians of {sys.argv[2]} rounds; CPU is the server's, µs per operation;")
print(f"CPU ratios to {last}'s are per round, lowest–highest")
header = " | ".join(f"{n} ops/s | {n} CPU" for n in names)
ratios = " | ".join(f"CPU {n} / {last}" for n in names[:-1])
print(f"| work | {header} | {ratios} |")
print("|---" * (1 + 2 * len(names) + len(names) - 1) + "|")
for work in dict.fromkeys(row[0] for row in rows):
    cells, cpus = [], {}
    for name in names:
        mine = [r for r in rows if r[0] == work and r[1] == name]
        cpus[name] = [float(r[3]) for r in mine]
        cells.append(f"{statistics.median(float(r[2]) for r in mine):,.0f}")
        cells.append(f"{statistics.median(cpus[name]):.2f}")
    for name in names[:-1]:
        each = [a / b for a, b in zip(cpus[name], cpus[last])]
        cells.append(f"{min(each):.2f}–{max(each):.2f}")
    print(f"| {work} | {' | '.join(cells)} |")
PY
rm -f "$results" "$log"
