# shellcheck shell=bash
# Starts and stops a real user-service for the checks that drive it from
# outside. Source it, then call `start_server [FLAGS...]`: it sets
# SERVER_ADDR (host:port), SERVER_PID and WORK (a scratch directory holding
# the store and the log). `start_command COMMAND...` does the same for any
# server that takes --addr and --addr-file (the plain example server).
# `stop_server` stops it and removes WORK; when the calling script exits,
# whether it passes, fails or is interrupted, the server still running is
# stopped.
#
# The server binds port 0, so the kernel picks a free port and there is no
# race with other processes; it writes the address it got to a file
# (--addr-file) once it listens. USER_SERVICE_BIN names the binary
# (default: the debug build).

SERVER_BIN=${USER_SERVICE_BIN:-target/debug/user-service}
WORK=
SERVER_LOG=
SERVER_PID=
SERVER_ADDR=

# Seconds to wait for the server to start, and for it to stop.
SERVER_PATIENCE=20

start_server() {
    WORK=$(mktemp -d)
    start_command "$SERVER_BIN" --store "sqlite:$WORK/users.db" "$@"
}

start_command() {
    [ -n "$WORK" ] || WORK=$(mktemp -d)
    SERVER_LOG=$WORK/server.log
    trap stop_server EXIT
    trap 'exit 130' INT TERM
    # Logs go to stderr; stdout is kept apart, so a log line there fails.
    RUST_LOG=info "$@" --addr 127.0.0.1:0 --addr-file "$WORK/addr" \
        >"$WORK/server.stdout" 2>"$SERVER_LOG" &
    SERVER_PID=$!
    local waited=0
    until [ -s "$WORK/addr" ]; do
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            echo "$1 did not start:" >&2
            cat "$SERVER_LOG" >&2
            return 1
        fi
        if [ "$waited" -ge $((SERVER_PATIENCE * 10)) ]; then
            echo "$1 did not write its address within ${SERVER_PATIENCE}s" >&2
            cat "$WORK/server.stdout" "$SERVER_LOG" >&2
            return 1
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    SERVER_ADDR=$(cat "$WORK/addr")
    if grep -q listening "$WORK/server.stdout"; then
        echo "$1 logs to stdout; logs belong on stderr" >&2
        return 1
    fi
    echo "$(basename "$1") listening on $SERVER_ADDR (pid $SERVER_PID)"
}

# SIGTERM, then wait for the graceful shutdown; SIGKILL if it takes too long.
# Removes the server's scratch directory.
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
    if [ -n "$WORK" ]; then
        rm -rf "$WORK"
        WORK=
    fi
}
