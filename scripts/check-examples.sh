#!/usr/bin/env bash
# Runs every client example in examples/ against a real user-service on a
# free loopback port and checks what each prints, in the order a newcomer
# would run them: unary, server streaming, client streaming, bidirectional.
#
# With --plain-server, the same client examples and the same checks run
# against examples/plain_server.rs instead: the teaching server must keep
# the contract they show.
#
# Built with the debug profile, which `cargo test` has mostly built already:
# the README runs them with --release only to start fast, and the profile
# changes nothing they print (EXAMPLES_PROFILE=release checks that build
# instead). Every example runs with
# RUST_BACKTRACE=1, as many Rust developers have it set: a failure must
# still print as the one line checked here, with exit status 1 (the rule of
# every example, in examples/common/mod.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${EXAMPLES_PROFILE:=debug}"
: "${USER_SERVICE_BIN:=target/$EXAMPLES_PROFILE/user-service}"
source scripts/server.sh

# Seconds any one example may take before it counts as hung.
EXAMPLE_TIMEOUT=30
EXAMPLES=target/$EXAMPLES_PROFILE/examples

profile_flag=()
[ "$EXAMPLES_PROFILE" = release ] && profile_flag=(--release)
cargo build --locked --quiet "${profile_flag[@]}" --bin user-service --examples
if [ "${1:-}" = --plain-server ]; then
    start_command "$EXAMPLES/plain_server"
else
    start_server
fi
export USER_SERVICE_ADDR=$SERVER_ADDR
export RUST_BACKTRACE=1

checks=0
fail() {
    echo "FAIL: $*" >&2
    exit 1
}

# run NAME ARGS...: runs an example, expecting success; its stdout is left in
# $WORK/out and its stderr in $WORK/err.
run() {
    local name=$1
    shift
    echo "--- $name $*"
    if ! timeout "$EXAMPLE_TIMEOUT" "$EXAMPLES/$name" "$@" >"$WORK/out" 2>"$WORK/err"; then
        cat "$WORK/out" "$WORK/err" >&2
        fail "$name $* exited with an error"
    fi
    cat "$WORK/out"
}

# run_failing NAME ARGS...: the same, expecting exit status 1.
run_failing() {
    local name=$1 status=0
    shift
    echo "--- $name $* (expected to fail)"
    timeout "$EXAMPLE_TIMEOUT" "$EXAMPLES/$name" "$@" >"$WORK/out" 2>"$WORK/err" || status=$?
    cat "$WORK/out" "$WORK/err"
    checks=$((checks + 1))
    [ "$status" -eq 1 ] || fail "$name $*: exit status $status, expected 1"
}

# expect FILE REGEX: some line of FILE matches the extended regex.
expect() {
    checks=$((checks + 1))
    grep -Eq -- "$2" "$1" || {
        cat "$1" >&2
        fail "no line of $(basename "$1") matches: $2"
    }
}

# expect_all FILE REGEX: every line of FILE matches.
expect_all() {
    checks=$((checks + 1))
    ! grep -Evq -- "$2" "$1" || {
        cat "$1" >&2
        fail "a line of $(basename "$1") does not match: $2"
    }
}

# expect_same FILE: FILE holds exactly what is on stdin.
expect_same() {
    checks=$((checks + 1))
    diff -u - "$1" >&2 || fail "$(basename "$1") differs from the expected output"
}

# ids FILE: the ids of the users printed in FILE, one a line, in order.
ids() {
    sed -n 's/.* id: "\([^"]*\)".*/\1/p' "$1"
}

uuid7='[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}'

echo "== unary: add_user, get_user"
run add_user
expect "$WORK/out" '^200 user saved successfully$'
expect "$WORK/out" "^User \{ first_name: \"John\", last_name: \"Doe\", address: \"Somewhere\", verified: false, id: \"$uuid7\", version: 1 \}$"
john=$(ids "$WORK/out")

run add_user --addr "$SERVER_ADDR" --id ada --first-name Ada --last-name Lovelace --address London --verified
expect_same "$WORK/out" <<'EOF'
200 user saved successfully
User { first_name: "Ada", last_name: "Lovelace", address: "London", verified: true, id: "ada", version: 1 }
EOF

# A failed call prints its status as one line on stderr (no backtrace),
# nothing on stdout.
run_failing add_user --id ada --first-name Ada
expect_same "$WORK/err" <<'EOF'
AddUser failed: AlreadyExists: user "ada" already exists
EOF
expect_same "$WORK/out" </dev/null
run_failing add_user --first-name "  "
expect_same "$WORK/err" <<'EOF'
AddUser failed: InvalidArgument: first_name: must not be empty
EOF

run get_user ada
expect_same "$WORK/out" <<'EOF'
User { first_name: "Ada", last_name: "Lovelace", address: "London", verified: true, id: "ada", version: 1 }
EOF
run get_user "$john"
expect "$WORK/out" "id: \"$john\", version: 1 \}$"
run_failing get_user nobody
expect_same "$WORK/err" <<'EOF'
GetUser failed: NotFound: user "nobody" not found
EOF
expect_same "$WORK/out" </dev/null
run_failing get_user ""
expect_same "$WORK/err" <<'EOF'
GetUser failed: InvalidArgument: id: must not be empty
EOF

echo "== client streaming: bulk_add_users"
run bulk_add_users --count 4
expect_same "$WORK/out" <<'EOF'
added 4, failed 0
EOF

# Good rows, an invalid row, a duplicate of a stored id and a duplicate
# within the stream: the server reports the bad rows, by the file's line,
# and stores the rest. The call did what it was asked: exit status 0.
users=$WORK/users.jsonl
cat >"$users" <<'EOF'
{"id": "grace", "first_name": "Grace", "last_name": "Hopper", "address": "Arlington", "verified": true}
{"id": "nameless", "first_name": "", "last_name": "Nobody"}
{"id": "ada", "first_name": "Ada", "last_name": "Again"}
{"id": "grace", "first_name": "Grace", "last_name": "Again"}
{"id": "alan", "first_name": "Alan", "last_name": "Turing", "address": "Wilmslow"}
EOF
run bulk_add_users "$users"
expect_same "$WORK/out" <<EOF
added 2, failed 3
$users:2: code 3: first_name: must not be empty
$users:3: code 6: user "ada" already exists
$users:4: code 6: user "grace" already exists
EOF

# Lines as grpcurl prints a User (JSON names, the uint64 version as a
# string) and a blank line: proto3 JSON, accepted as it is.
printf '%s\n' '{"id": "edsger", "firstName": "Edsger", "lastName": "Dijkstra", "verified": true, "version": "3"}' '' \
    '{"id": "barbara", "firstName": "Barbara", "last_name": "Liskov", "address": null}' >"$WORK/camel.jsonl"
run bulk_add_users "$WORK/camel.jsonl"
expect_same "$WORK/out" <<'EOF'
added 2, failed 0
EOF
expect_same "$WORK/err" </dev/null

# Lines that are not users (not JSON, a misspelt field) are reported by
# file and line and not sent; the lines around them are. The summary says
# so, and the exit status is 1.
broken=$WORK/broken.jsonl
printf '%s\n' '{"id": "ken", "first_name": "Ken"}' 'not json' '{"id": "typo", "fristName": "Typo"}' \
    '{"id": "ada", "first_name": "Ada", "last_name": "Again"}' '{"id": "dennis", "first_name": "Dennis"}' >"$broken"
run_failing bulk_add_users "$broken"
expect_same "$WORK/err" <<EOF
$broken:2: not sent: expected ident (column 2)
$broken:3: not sent: unrecognized field name 'fristName' (column 26)
EOF
expect_same "$WORK/out" <<EOF
added 2, failed 1, not sent 2
$broken:4: code 6: user "ada" already exists
EOF

# A file that is not there: named, and nothing is sent.
run_failing bulk_add_users "$WORK/missing.jsonl"
expect_same "$WORK/err" <<EOF
cannot open $WORK/missing.jsonl: No such file or directory (os error 2)
EOF
expect_same "$WORK/out" </dev/null

echo "== server streaming: list_users"
# Stored so far: John, Ada, 4 generated users (2 and 4 verified), Grace,
# Alan, Edsger (verified), Barbara, Ken, Dennis.
run list_users
expect "$WORK/out" '^listed 12 users$'
ids "$WORK/out" >"$WORK/ids"
LC_ALL=C sort -c "$WORK/ids" || fail "ListUsers ids are not in ascending order"
checks=$((checks + 1))
expect "$WORK/out" 'first_name: "User 3", last_name: "Generated", address: "", verified: false'

run list_users --verified true
sed '$d' "$WORK/out" >"$WORK/users"
expect_all "$WORK/users" 'verified: true'
expect "$WORK/out" '^listed 5 users$'

run list_users --verified false --limit 2
expect "$WORK/out" '^listed 2 users$'

run list_users --after-id ada
ids "$WORK/out" >"$WORK/after"
expect_same "$WORK/after" <<'EOF'
alan
barbara
dennis
edsger
grace
ken
EOF

run_failing list_users --after-id "no spaces"
expect_same "$WORK/err" <<'EOF'
ListUsers failed: InvalidArgument: after_id: may only contain A-Z, a-z, 0-9, '-' and '_', found ' '
EOF

echo "== bidirectional: sync_users"
run sync_users --name solo --interval 0 --listen 0
# With no other writer, the server's order is fixed: each op's Ack, then the
# Change it committed. Seqs continue from the changes made above.
s=$(sed -n 's/^ack #1 OK seq=\([0-9]*\) .*/\1/p' "$WORK/out")
[ -n "$s" ] || fail "no OK Ack for request 1"
expect_same "$WORK/out" <<EOF
ack #1 OK seq=$s solo-1 v1
change seq=$s CREATED solo-1 v1 Ann
ack #2 OK seq=$((s + 1)) solo-2 v1
change seq=$((s + 1)) CREATED solo-2 v1 Bob
ack #3 OK seq=$((s + 2)) solo-1 v2
change seq=$((s + 2)) UPDATED solo-1 v2 Anna
ack #4 FailedPrecondition: expected version 1, stored version is 2
ack #5 OK seq=$((s + 3)) solo-2 v1
change seq=$((s + 3)) DELETED solo-2 v1 Bob
call ended: OK
EOF

# Two clients at once, as in two terminals: each prints the other's
# changes, and each sees one gapless sequence of seqs.
timeout "$EXAMPLE_TIMEOUT" "$EXAMPLES/sync_users" --name alice --interval 0.5 --listen 1.5 \
    >"$WORK/alice" 2>&1 &
alice=$!
for _ in $(seq 100); do
    grep -q '^ack #1 ' "$WORK/alice" && break
    sleep 0.1
done
run sync_users --name bob --interval 0.5 --listen 1.5
cp "$WORK/out" "$WORK/bob"
wait "$alice" || fail "sync_users --name alice exited with an error: $(cat "$WORK/alice")"
echo "--- sync_users --name alice (at the same time)"
cat "$WORK/alice"
for change in "CREATED bob-1 v1" "CREATED bob-2 v1" "UPDATED bob-1 v2" "DELETED bob-2 v1"; do
    expect "$WORK/alice" "^change seq=[0-9]+ $change "
done
expect "$WORK/bob" '^change seq=[0-9]+ DELETED alice-2 v1 '
for who in alice bob; do
    expect "$WORK/$who" '^call ended: OK$'
    checks=$((checks + 1))
    sed -n 's/^change seq=\([0-9]*\) .*/\1/p' "$WORK/$who" |
        awk 'NR > 1 && $1 != prev + 1 { exit 1 } { prev = $1 }' ||
        fail "$who: change seqs are not gapless"
done

echo "== client-side balancing: replicas"
# One server given twice: every call of the balanced channel succeeds.
run replicas --addr "$SERVER_ADDR,$SERVER_ADDR" --count 6
expect_same "$WORK/out" <<'EOF'
added and read back 6 users through 2 replicas
EOF

echo "== no server"
# Where the server was: the example says it cannot connect, and exits 1.
addr=$SERVER_ADDR
stop_server
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
run_failing get_user --addr "$addr" ada
expect_same "$WORK/err" <<EOF
cannot connect to $addr: transport error: tcp connect error: Connection refused (os error 111) (is the server running? \`cargo run --release\` starts one on 127.0.0.1:8080)
EOF

echo "examples: $checks checks passed"
