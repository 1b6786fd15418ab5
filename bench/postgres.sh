#!/usr/bin/env bash
# The PostgreSQL store's figures, each next to its yardstick in the same run
# (see BENCHMARKS.md, "PostgreSQL store"):
#
#   bench/postgres.sh bulk     # psql \copy of USERS users (into a bare table, then one
#                              # defined as users), then BulkAddUsers of as many
#   bench/postgres.sh add      # AddUser, 64 workers: memory store, then PostgreSQL
#   bench/postgres.sh feed     # change committed on B to a subscriber on A, at 2,000/s,
#                              # with NOTIFY, then polling only
#   bench/postgres.sh scale    # AddUser and bulk through one replica, then two
#
# ROUNDS (default 2) repeats each pair, alternating. PG names the server
# (default postgres://postgres@127.0.0.1:5432); a database is created for
# the run and dropped at the end. SERVICE names another user-service binary
# to measure (an older build, say; default: this tree's release build).
# Everything runs on loopback and every run is bounded.
set -euo pipefail
cd "$(dirname "$0")/.."

PG=${PG:-postgres://postgres@127.0.0.1:5432}
USERS=${USERS:-1000000}
ROUNDS=${ROUNDS:-2}
FOR=${FOR:-5s}

cargo build --release --locked --quiet -p user-service -p user-load
service=${SERVICE:-target/release/user-service}
load=target/release/user-load
work=$(mktemp -d)
db=user_service_bench_$$
psql -q -X "$PG/postgres" -c "CREATE DATABASE $db"
url=$PG/$db
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    psql -q -X "$PG/postgres" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" || true
    rm -rf "$work"
}
trap cleanup EXIT

# fresh: an empty public schema in the run's database.
fresh() {
    psql -q -X "$url" -c "DROP SCHEMA IF EXISTS public CASCADE; CREATE SCHEMA public" 2>/dev/null
}

# start STORE [ARGS...]: a server; sets $addr and $pid.
start() {
    rm -f "$work/addr"
    "$service" --addr 127.0.0.1:0 --addr-file "$work/addr" --store "$@" \
        >>"$work/server.log" 2>&1 &
    pid=$!
    pids+=("$pid")
    for _ in $(seq 200); do
        [ -s "$work/addr" ] && break
        sleep 0.05
    done
    addr=$(cat "$work/addr")
}

stop_all() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    pids=()
}

# cpu PID: its CPU seconds so far (user + system).
cpu() {
    awk -v tck="$(getconf CLK_TCK)" '{ split($0, a, ") "); split(a[2], f, " "); printf "%.2f", (f[12] + f[13]) / tck }' "/proc/$1/stat"
}

# servers_cpu: the CPU seconds so far of every server started.
servers_cpu() {
    local total=0 server
    for server in "${pids[@]}"; do
        total=$(python3 -c "print($total + $(cpu "$server"))")
    done
    echo "$total"
}

# pg_cpu: the CPU seconds so far of the database's backends serving the
# run's servers (those alive now).
pg_cpu() {
    local total=0 backend
    for backend in $(psql -X -At "$url" -c "SELECT pid FROM pg_stat_activity WHERE application_name = 'user-service'"); do
        total=$(python3 -c "print($total + $(cpu "$backend" 2>/dev/null || echo 0))")
    done
    echo "$total"
}

# figure JSON FIELD...: fields of a user-load --json report.
figure() {
    python3 - "$@" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
out = []
for path in sys.argv[2:]:
    value = report
    for key in path.split("."):
        value = value[int(key)] if key.isdigit() else value[key]
    out.append(f"{value:.1f}" if isinstance(value, float) else str(value))
print(" ".join(out))
PY
}

bulk() {
    # Time-ordered text ids, as the server assigns them: a CSV for \copy.
    psql -q -X "$url" -c "\\copy (SELECT lpad(i::text, 12, '0'), 'First' || i, 'Last', i || ' Long Street, Springfield', i % 2 = 0, 1 FROM generate_series(1, $USERS) i) TO '$work/users.csv' CSV"
    for round in $(seq "$ROUNDS"); do
        fresh
        psql -q -X "$url" -c 'CREATE TABLE copied (id text COLLATE "C" PRIMARY KEY, first_name text NOT NULL, last_name text NOT NULL, address text NOT NULL, verified boolean NOT NULL, version bigint NOT NULL)'
        local started ended
        started=$(date +%s.%N)
        psql -q -X "$url" -c "\\copy copied FROM '$work/users.csv' CSV"
        ended=$(date +%s.%N)
        echo "round $round: psql \\copy: $(python3 -c "print(f'{$USERS / ($ended - $started):.0f}')") rows/s"
        fresh
        start "$url"
        # The same \copy into a table defined as the store's users (its
        # CHECK constraints, the API's limits, included): the yardstick
        # like for like.
        psql -q -X "$url" -c 'CREATE TABLE copied (LIKE users INCLUDING ALL)'
        started=$(date +%s.%N)
        psql -q -X "$url" -c "\\copy copied FROM '$work/users.csv' CSV"
        ended=$(date +%s.%N)
        psql -q -X "$url" -c 'DROP TABLE copied'
        echo "round $round: psql \\copy into a table defined as users: $(python3 -c "print(f'{$USERS / ($ended - $started):.0f}')") rows/s"
        local before pg_before
        before=$(cpu "$pid")
        pg_before=$(pg_cpu)
        "$load" bulk --addr "$addr" --total "$USERS" --concurrency 4 --json >"$work/bulk.json"
        echo "round $round: BulkAddUsers into PostgreSQL, 4 streams: $(figure "$work/bulk.json" throughput) rows/s, CPU per row: server $(python3 -c "print(f'{($(cpu "$pid") - $before) / $USERS * 1e6:.1f}')") us, database $(python3 -c "print(f'{($(pg_cpu) - $pg_before) / $USERS * 1e6:.1f}')") us"
        stop_all
    done
}

add() {
    local before pg_before calls
    for round in $(seq "$ROUNDS"); do
        start memory
        before=$(cpu "$pid")
        "$load" add --addr "$addr" --duration "$FOR" --concurrency 64 --json >"$work/add.json"
        calls=$(figure "$work/add.json" ok_calls)
        echo "round $round: AddUser, memory: $(figure "$work/add.json" throughput latency.p50_ms latency.p99_ms) (calls/s, p50 ms, p99 ms), server CPU $(python3 -c "print(f'{($(cpu "$pid") - $before) / $calls * 1e6:.0f}')") us/call"
        stop_all
        fresh
        start "$url"
        before=$(cpu "$pid")
        pg_before=$(pg_cpu)
        "$load" add --addr "$addr" --duration "$FOR" --concurrency 64 --json >"$work/add.json"
        calls=$(figure "$work/add.json" ok_calls)
        echo "round $round: AddUser, PostgreSQL: $(figure "$work/add.json" throughput latency.p50_ms latency.p99_ms) (calls/s, p50 ms, p99 ms), server CPU $(python3 -c "print(f'{($(cpu "$pid") - $before) / $calls * 1e6:.0f}')") us/call, database CPU $(python3 -c "print(f'{($(pg_cpu) - $pg_before) / $calls * 1e6:.0f}')") us/call"
        stop_all
    done
}

# feed ARGS...: a writer on replica B at 2,000 upserts/s, 8 watchers spread
# over B and A; the watchers on A time delivery across replicas.
feed_pair() {
    fresh
    start "$url" "$@"
    local b=$addr
    start "$url" "$@"
    local a=$addr
    "$load" sync --addr "$b,$a" --rps 2000 --duration 10s --warmup 1s --watchers 8 --json >"$work/sync.json"
    echo "  same replica (B): $(figure "$work/sync.json" targets.0.propagation.p50_ms targets.0.propagation.p99_ms) ms (p50 p99); across (A): $(figure "$work/sync.json" targets.1.propagation.p50_ms targets.1.propagation.p99_ms) ms; Acks/s $(figure "$work/sync.json" throughput)"
    stop_all
}

feed() {
    for round in $(seq "$ROUNDS"); do
        echo "round $round: NOTIFY"
        feed_pair
        echo "round $round: polling only (--changelog-notify false, poll 200 ms)"
        feed_pair --changelog-notify false
    done
}

scale() {
    for round in $(seq "$ROUNDS"); do
        for replicas in 1 2; do
            fresh
            local addrs=()
            for _ in $(seq "$replicas"); do
                start "$url"
                addrs+=("$addr")
            done
            local joined
            joined=$(IFS=,; echo "${addrs[*]}")
            local before pg_before calls
            before=$(servers_cpu)
            pg_before=$(pg_cpu)
            "$load" add --addr "$joined" --duration "$FOR" --concurrency 64 --json >"$work/add.json"
            calls=$(figure "$work/add.json" ok_calls)
            echo "round $round: $replicas replica(s): AddUser $(figure "$work/add.json" throughput) calls/s, CPU per call: servers $(python3 -c "print(f'{($(servers_cpu) - $before) / $calls * 1e6:.0f}')") us, database $(python3 -c "print(f'{($(pg_cpu) - $pg_before) / $calls * 1e6:.0f}')") us"
            "$load" bulk --addr "$joined" --total "$((USERS / 2))" --concurrency 4 --json >"$work/bulk.json"
            echo "round $round: $replicas replica(s): bulk $(figure "$work/bulk.json" throughput) rows/s"
            stop_all
        done
    done
}

echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
for part in "${@:-bulk add feed scale}"; do
    for p in $part; do
        echo "== $p"
        "$p"
    done
done
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
