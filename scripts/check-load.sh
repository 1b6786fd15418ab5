#!/usr/bin/env bash
# Smoke test of the load generator: a few seconds of every user-load mode
# against the real user-service binary on a free loopback port. It checks
# correctness only (counts, status codes, exit status, --verify), never
# speed. The failing runs (refused connections, TLS mismatches, aborted
# streams, thresholds) are tested in user-load/tests/user_load.rs.
set -euo pipefail
cd "$(dirname "$0")/.."

# Bounds every step, so that a broken server fails the check instead of
# hanging it.
STEP_TIMEOUT=60

cargo build --locked --quiet -p user-service -p user-load
bin=target/debug
work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT

# start NAME COMMAND...: starts a server (user-service or user-load sink,
# given --addr 127.0.0.1:0) logging to $work/NAME.log; sets $addr to the
# address it writes to its --addr-file once listening.
start() {
    local name=$1
    shift
    rm -f "$work/$name.addr"
    "$@" --addr-file "$work/$name.addr" >"$work/$name.log" 2>&1 &
    pids+=("$!")
    for _ in $(seq 200); do
        if [ -s "$work/$name.addr" ]; then
            addr=$(cat "$work/$name.addr")
            return 0
        fi
        sleep 0.1
    done
    echo "$name did not start:" >&2
    cat "$work/$name.log" >&2
    return 1
}

# check NAME [EXIT] PYTHON-EXPR -- user-load ARGS: runs user-load with
# --json against $addr (unless ARGS give --addr), expects exit status EXIT
# (0 when not given) and asserts the expression over the report `r`.
check() {
    local name=$1 expected=0
    if [ "$3" != -- ]; then
        expected=$2
        shift
    fi
    local expr=$2
    shift 3
    local out="$work/$name.json" status=0
    # --addr "$addr" unless the step names its own targets.
    case " $* " in
    *" --addr "*) ;;
    *) set -- "$@" --addr "$addr" ;;
    esac
    timeout "$STEP_TIMEOUT" "$bin/user-load" "$@" --json >"$out" || status=$?
    if [ "$status" -ne "$expected" ]; then
        echo "FAIL $name: user-load exited $status, expected $expected" >&2
        cat "$out" >&2
        return 1
    fi
    if ! python3 - "$out" "$expr" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
ok = lambda: set(r["codes"]) == {"OK"} and r["codes"]["OK"] == r["calls"] == r["ok_calls"] \
    and r["exit_code"] == 0 and not r["failures"] and r["series"]
verified = lambda: r["verify"] is not None and r["verify"]["ok"]
if not eval(sys.argv[2]):
    print(json.dumps(r, indent=1), file=sys.stderr)
    sys.exit(1)
EOF
    then
        echo "FAIL $name: expected $expr" >&2
        return 1
    fi
    echo "ok   $name"
}

start server env RUST_LOG=warn,user_service=info "$bin/user-service" --addr 127.0.0.1:0 \
    --store "sqlite:$work/users.db"
addr_of_server=$addr

check bulk 'r["users"] == 20000 and r["rows_added"] == 20000 and r["rows_failed"] == 0 and ok() and not r["errors"] and verified()' \
    -- bulk --total 20000 --concurrency 4 --per-stream 3000 --verify
check add 'r["calls"] == 2000 and r["users"] == 2000 and ok() and not r["errors"] and verified()' \
    -- add --total 2000 --concurrency 16 --connections 2 --verify
check add-thresholds 'ok() and [t["failed"] for t in r["thresholds"]] == [False, False]' \
    -- add --total 500 --fail-if 'errors>0' --fail-if 'p99>60s'
check add-hostname 'r["calls"] == 300 and ok() and r["addr"].startswith("localhost:")' \
    -- add --total 300 --addr "localhost:${addr##*:}"
check add-open-loop 'r["calls"] == 200 and ok() and not r["errors"] and verified()' \
    -- add --rps 200 --total 200 --concurrency 8 --verify
check add-ramp 'r["calls"] > 0 and ok() and r["warmup_s"] == 0.5 and r["series"][0]["warmup"] and verified()' \
    -- add --rps 100 --schedule ramp --rps-end 400 --warmup 500ms --duration 1s --verify
check get 'r["calls"] == 2000 and ok() and verified()' \
    -- get --total 2000 --prefill 1000 --concurrency 16 --verify
check list 'r["calls"] == 2 and r["users"] >= 2 * 23000 and ok() and verified()' \
    -- list --total 2 --verify
check list-limit 'r["calls"] == 3 and r["users"] == 300 and ok() and verified()' \
    -- list --total 3 --limit 100 --verify
check sync 'r["calls"] == 2000 and r["users"] == 2000 and ok() and not r["errors"] and r["propagation"]["count"] == 4 * 2000 and verified()' \
    -- sync --total 2000 --in-flight 32 --watchers 4 --verify
check sync-open-loop 'r["calls"] == 300 and ok() and r["propagation"]["count"] == 2 * 300 and verified()' \
    -- sync --rps 300 --total 300 --watchers 2 --verify

# Users from a file: 1000 rows with ids, of which 10 are invalid, and one
# line that is not JSON.
users_file() {
    python3 - "$1" "$2" <<'EOF'
import json, sys
with open(sys.argv[1], "w") as f:
    for i in range(1000):
        first = "" if i % 100 == 7 else f"Name{i}"
        f.write(json.dumps({"id": f"{sys.argv[2]}-{i:04}", "first_name": first, "last_name": "Doe",
                            "address": f"{i} Main Street, Springfield", "verified": i % 2 == 0}) + "\n")
        if i == 500:
            f.write("not json\n")
EOF
}
users_file "$work/users.jsonl" smoke
users_file "$work/users-2.jsonl" smoke2
# Rows are bulk's unit: the 10 invalid ones fail the run, unless --fail-if
# says how many may fail.
rows_ok='r["rows_added"] == 990 and r["rows_failed"] == 10 and r["calls"] == 1000 and r["ok_calls"] == 990 and r["codes"] == {"OK": 990, "INVALID_ARGUMENT": 10} and any("unreadable data line" in e for e in r["errors"])'
check data "$rows_ok"' and not r["failures"] and verified()' \
    -- bulk --data "$work/users.jsonl" --concurrency 2 --verify --fail-if 'errors>1%'
check data-failed-rows 1 "$rows_ok"' and any(f.startswith("10 of 1000 rows failed (10× INVALID_ARGUMENT: ") for f in r["failures"]) and verified()' \
    -- bulk --data "$work/users-2.jsonl" --concurrency 2 --verify
# Every row refused: the run could not do its work.
check data-again 1 'r["rows_added"] == 0 and r["rows_failed"] == 1000 and any(e.startswith("ALREADY_EXISTS: ") for e in r["errors"]) and r["failures"]' \
    -- bulk --data "$work/users.jsonl" --concurrency 2
check data-add 1 'r["calls"] == 1000 and r["codes"] == {"ALREADY_EXISTS": 990, "INVALID_ARGUMENT": 10} and any(k["count"] == 990 for k in r["error_kinds"])' \
    -- add --data "$work/users.jsonl" --concurrency 4

# Sample users from `user-load gen`, a tenth of them invalid.
"$bin/user-load" gen --count 2000 --invalid 10 --id-prefix gen- --seed 5 >"$work/gen.jsonl"
check gen-bulk 'r["rows_added"] + r["rows_failed"] == 2000 and 100 < r["rows_failed"] < 300 and r["calls"] == 2000 and verified()' \
    -- bulk --data "$work/gen.jsonl" --verify --fail-if 'errors>20%'

# Two targets: the connections are spread over both, each reports its part.
start second "$bin/user-service" --addr 127.0.0.1:0 --store memory
first=$addr_of_server
second=$addr
addr=$first
check two-targets 'r["calls"] == 1000 and ok() and verified() and [t["calls"] > 0 for t in r["targets"]] == [True, True] and sum(t["calls"] for t in r["targets"]) == 1000' \
    -- add --total 1000 --addr "$first,$second" --verify
check get-two-targets 'r["calls"] == 500 and ok() and verified() and all(t["ok_calls"] > 0 for t in r["targets"])' \
    -- get --total 500 --prefill 100 --addr "$first,$second" --verify
# One store behind both addresses, as replicas share one: the second import
# finds the users there already.
check get-one-store 'r["calls"] == 500 and ok() and verified() and len(r["targets"]) == 2' \
    -- get --total 500 --prefill 100 --addr "$first,$first" --verify
# USER_SERVICE_ADDR, as the examples read it, names the targets too.
USER_SERVICE_ADDR="$second" "$bin/user-load" add --total 10 --json >"$work/env.json"
python3 -c 'import json, sys; r = json.load(open(sys.argv[1])); assert r["addr"] == sys.argv[2] and r["ok_calls"] == 10, r' \
    "$work/env.json" "$second"
echo "ok   env-addr"

# TLS, mutual TLS and a bearer token, with the certificates the recipe of
# docs/security.md makes: the recipe and the grpcurl commands after it are
# run as written (the address aside), so that both stay true.
recipe_doc=docs/security.md
recipe_block() {
    # The fenced block after the line `<!-- recipe: $1 -->` of $recipe_doc.
    awk -v marker="<!-- recipe: $1 -->" '
        $0 == marker { found = 1; next }
        found && /^```/ { if (inside) exit; inside = 1; next }
        inside { print }
    ' "$recipe_doc"
}
tls_dir="$work/tls"
mkdir -p "$tls_dir"
recipe=$(recipe_block tls)
grpcurl_commands=$(recipe_block grpcurl-tls)
[ -n "$recipe" ] && [ -n "$grpcurl_commands" ] || { echo "FAIL no recipe blocks in $recipe_doc" >&2; exit 1; }
(cd "$tls_dir" && bash -euo pipefail -c "$recipe") >"$work/openssl.log" 2>&1 ||
    { echo "FAIL the certificate recipe of $recipe_doc:" >&2; cat "$work/openssl.log" >&2; exit 1; }
echo "ok   $recipe_doc certificate recipe"
start tls "$bin/user-service" --addr 127.0.0.1:0 --store memory \
    --tls-cert "$tls_dir/server.pem" --tls-key "$tls_dir/server.key" \
    --tls-client-ca "$tls_dir/ca.pem" --auth-token-file "$tls_dir/token"
if command -v grpcurl >/dev/null; then
    (cd "$tls_dir" && bash -euo pipefail -c "${grpcurl_commands//localhost:8080/$addr}") \
        >"$work/grpcurl-tls.log" 2>&1 ||
        { echo "FAIL the grpcurl commands over TLS of $recipe_doc:" >&2; cat "$work/grpcurl-tls.log" >&2; exit 1; }
    grep -q SERVING "$work/grpcurl-tls.log" && grep -q '"firstName": "Ada"' "$work/grpcurl-tls.log" ||
        { echo "FAIL the grpcurl commands over TLS of $recipe_doc printed:" >&2; cat "$work/grpcurl-tls.log" >&2; exit 1; }
    echo "ok   $recipe_doc grpcurl commands over TLS"
else
    echo "FAIL grpcurl not found; scripts/test.sh installs it" >&2
    exit 1
fi
client=(--cert "$tls_dir/client.pem" --key "$tls_dir/client.key")
check tls-add 'r["calls"] == 500 and ok() and verified()' \
    -- add --total 500 --concurrency 8 --cacert "$tls_dir/ca.pem" "${client[@]}" \
    --auth-token-file "$tls_dir/token" --verify
check tls-bulk 'r["rows_added"] == 2000 and ok()' \
    -- bulk --total 2000 --cacert "$tls_dir/ca.pem" --cname localhost "${client[@]}" \
    --auth-token-file "$tls_dir/token"
check tls-skip-verify 'r["calls"] == 100 and ok()' \
    -- add --total 100 --skipTLS "${client[@]}" -H "authorization: Bearer $(cat "$tls_dir/token")"
check tls-metadata 'r["calls"] == 100 and ok()' \
    -- add --total 100 --cacert "$tls_dir/ca.pem" "${client[@]}" \
    -m "{\"authorization\": \"Bearer $(cat "$tls_dir/token")\"}"

# The discarding sink.
start sink "$bin/user-load" sink --addr 127.0.0.1:0
check sink-bulk 'r["rows_added"] == 20000 and ok()' -- bulk --total 20000
check sink-list 'r["users"] == 2000 and ok()' -- list --total 2 --limit 1000
check sink-sync 'r["calls"] == 500 and ok()' -- sync --total 500 --watchers 0

echo "load smoke: all modes passed"
