# shellcheck shell=bash
# Starts and stops a real user-service for the checks that drive it from
# outside. Source it, then call `start_server`: it sets SERVER_ADDR
# (host:port) and WORK (a scratch directory), and when the calling script
# exits, whether it passes, fails or is interrupted, it stops the server and
# removes WORK.
#
# The server binds port 0, so the kernel picks a free port and there is no
# race with other processes; its first log line names the address it got.

WORK=
SERVER_LOG=
SERVER_PID=
SERVER_ADDR=

# Seconds to wait for the server to start, and for it to stop.
SERVER_PATIENCE=20

start_server() {
    WORK=$(mktemp -d)
    SERVER_LOG=$WORK/server.log
    trap 'stop_server; rm -rf "$WORK"' EXIT
    trap 'exit 130' INT TERM
    # Logs go to stderr; stdout is kept apart, so a log line there fails.
    NO_COLOR=1 RUST_LOG=info target/debug/user-service --addr 127.0.0.1:0 --store "sqlite:$WORK/users.db" \
        >"$WORK/server.stdout" 2>"$SERVER_LOG" &
    SERVER_PID=$!
    local waited=0
    # The log may be coloured: drop the escape sequences before matching.
    until SERVER_ADDR=$(sed -e 's/\x1b\[[0-9;]*m//g' "$SERVER_LOG" |
        sed -n 's/.*listening addr=\([0-9.]*:[0-9]*\).*/\1/p' | head -n 1) &&
        [ -n "$SERVER_ADDR" ]; do
        if grep -q listening "$WORK/server.stdout"; then
            echo "user-service logs to stdout; logs belong on stderr" >&2
            return 1
        fi
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            echo "user-service did not start:" >&2
            cat "$SERVER_LOG" >&2
            return 1
        fi
        if [ "$waited" -ge $((SERVER_PATIENCE * 10)) ]; then
            echo "user-service did not log its address on stderr within ${SERVER_PATIENCE}s" >&2
            cat "$WORK/server.stdout" "$SERVER_LOG" >&2
            return 1
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    echo "user-service listening on $SERVER_ADDR (pid $SERVER_PID)"
}

# SIGTERM, then wait for the graceful shutdown; SIGKILL if it takes too long.
stop_server() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        local waited=0
        while kill -0 "$SERVER_PID" 2>/dev/null && [ "$waited" -lt $((SERVER_PATIENCE * 10)) ]; do
            sleep 0.1
            waited=$((waited + 1))
        done
        if kill -0 "$SERVER_PID" 2>/dev/null; then
            echo "user-service did not stop; killing it" >&2
            kill -KILL "$SERVER_PID" 2>/dev/null || true
        fi
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=
}
