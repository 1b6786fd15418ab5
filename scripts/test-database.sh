# Sourced by scripts/test.sh: a fresh PostgreSQL database for one test run.
#
# The server is, in order: the one USER_SERVICE_TEST_DATABASE_URL names;
# the one on 127.0.0.1:5432 (USER_SERVICE_TEST_LOCAL_PG to look elsewhere)
# if it answers; otherwise a throwaway cluster made here (initdb into a
# temporary directory, its own port), from Debian's postgresql package,
# which scripts/install-test-tools.sh installs. A database is created there
# for the run, USER_SERVICE_TEST_DATABASE_URL is pointed at it for the
# tests, and stop_test_database drops it (and stops the throwaway cluster).
# That variable set also makes the PostgreSQL tests required: where a plain
# `cargo test` skips them for want of a server, here they fail (see
# test-support/src/postgres.rs).

test_db_admin=
test_db_name=
test_db_cluster=

# The newest server programs of Debian's postgresql package.
pg_bin_dir() {
    ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

# As the postgres user when root: the server refuses to run as root.
as_postgres() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

# $1 with its database replaced by $2.
with_database() {
    python3 - "$1" "$2" <<'PY'
import sys, urllib.parse
url = urllib.parse.urlsplit(sys.argv[1])
print(urllib.parse.urlunsplit(url._replace(path="/" + sys.argv[2])))
PY
}

start_throwaway_cluster() {
    local bin port
    bin=$(pg_bin_dir)
    if [ -z "$bin" ]; then
        echo "no PostgreSQL server programs: run scripts/install-test-tools.sh" >&2
        return 1
    fi
    test_db_cluster=$(mktemp -d /tmp/user-service-pg.XXXXXX)
    [ "$(id -u)" -ne 0 ] || chown postgres:postgres "$test_db_cluster"
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    as_postgres "$bin/initdb" --pgdata "$test_db_cluster/data" --username=postgres \
        --auth=trust --no-sync --encoding=UTF8 --locale=C >/dev/null
    as_postgres "$bin/pg_ctl" start --pgdata "$test_db_cluster/data" --log "$test_db_cluster/log" \
        --wait -o "-p $port -k $test_db_cluster -c listen_addresses=127.0.0.1" >/dev/null
    test_db_admin="postgres://postgres@127.0.0.1:$port/postgres"
    echo "==> PostgreSQL: a throwaway cluster on 127.0.0.1:$port"
}

start_test_database() {
    local local_pg=${USER_SERVICE_TEST_LOCAL_PG:-127.0.0.1:5432}
    if [ -n "${USER_SERVICE_TEST_DATABASE_URL:-}" ]; then
        test_db_admin=$USER_SERVICE_TEST_DATABASE_URL
        echo "==> PostgreSQL: USER_SERVICE_TEST_DATABASE_URL"
    elif pg_isready -q -h "${local_pg%:*}" -p "${local_pg##*:}" -t 3 &&
        psql -q -X "postgres://postgres@$local_pg/postgres" -c 'SELECT 1' >/dev/null 2>&1; then
        test_db_admin="postgres://postgres@$local_pg/postgres"
        echo "==> PostgreSQL: the server on $local_pg"
    else
        start_throwaway_cluster || return 1
    fi
    test_db_name="user_service_test_$$_$RANDOM"
    psql -q -X "$test_db_admin" -c "CREATE DATABASE $test_db_name" >/dev/null
    USER_SERVICE_TEST_DATABASE_URL=$(with_database "$test_db_admin" "$test_db_name")
    export USER_SERVICE_TEST_DATABASE_URL
}

stop_test_database() {
    if [ -n "$test_db_name" ]; then
        psql -q -X "$test_db_admin" \
            -c "DROP DATABASE IF EXISTS $test_db_name WITH (FORCE)" >/dev/null || true
        test_db_name=
    fi
    if [ -n "$test_db_cluster" ]; then
        as_postgres "$(pg_bin_dir)/pg_ctl" stop --pgdata "$test_db_cluster/data" \
            --mode=immediate --wait >/dev/null || true
        rm -rf "$test_db_cluster"
        test_db_cluster=
    fi
}
