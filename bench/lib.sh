# Shell helpers the benchmark scripts share. Sourced (from the repository
# root) by bench/ab.sh, bench/playground.sh, bench/run.sh and
# bench/grpc-go-client.sh; not a script of its own.

# A TCP port on 127.0.0.1 that nothing listens on now.
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# cpu_ticks PID: the process's utime + stime so far, in clock ticks
# (getconf CLK_TCK per second).
cpu_ticks() {
    awk '{ print $14 + $15 }' "/proc/$1/stat"
}

# The server start_server started, until stop_server.
server_pid=""

# stop_server: stops that server (SIGTERM) and waits for it; nothing when
# none runs. Scripts trap it on EXIT.
stop_server() {
    if [ -n "$server_pid" ]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
        server_pid=""
    fi
}

# start_server LOG COMMAND [ARGS...]: runs `COMMAND ARGS... --addr
# 127.0.0.1:PORT` on a free port in the background, its output appended to
# LOG, and waits until it accepts connections; sets $addr and $server_pid.
# Fails, showing the end of LOG, when it does not within 10 s.
start_server() {
    local log=$1 port
    shift
    port=$(free_port)
    addr=127.0.0.1:$port
    "$@" --addr "$addr" >>"$log" 2>&1 &
    server_pid=$!
    for _ in $(seq 100); do
        if python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 0.2)" 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    echo "$1 did not start; the end of $log:" >&2
    tail -n 20 "$log" >&2
    return 1
}
