#!/usr/bin/env bash
# pg.sh - a throwaway PostgreSQL 15 cluster in a directory of your choice,
# Unix socket only (no TCP), with max_prepared_transactions set for 2PC.
# Used by the tests, the demo and the benchmarks. Works as root (runs the
# server as the `postgres` OS user, which must exist: postgresql-15 creates it)
# and as an ordinary user.
#
#   pg.sh start DIR      create the cluster if DIR has none, start it, wait, create db
#   pg.sh stop DIR       stop it cleanly (fast shutdown)
#   pg.sh kill DIR       stop it the hard way (immediate: a crash, WAL replay on start)
#   pg.sh restart DIR    immediate stop, then start (prepared transactions must survive)
#   pg.sh migrate DIR    apply sql/ migrations to the cluster's database
#   pg.sh status DIR     exit 0 if running
#   pg.sh env DIR        print PGHOST/PGDATABASE/PGUSER export lines
#   pg.sh conninfo DIR   print a libpq conninfo string
#
# Environment: PC_PG_MAX_PREPARED (default 1000), PC_PG_MAX_CONNECTIONS (200),
# PC_PG_FSYNC (on|off, default on), PC_PG_BIN (default /usr/lib/postgresql/15/bin),
# PC_PG_DB (default paycoord).
set -euo pipefail

cmd=${1:-}
dir=${2:-}
if [ -z "$cmd" ] || [ -z "$dir" ]; then
    sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
bin=${PC_PG_BIN:-/usr/lib/postgresql/15/bin}
db=${PC_PG_DB:-paycoord}
data="$dir/data"
sock="$dir/sock"
log="$dir/postgres.log"
here=$(cd "$(dirname "$0")" && pwd)

if [ ! -x "$bin/pg_ctl" ]; then
    echo "pg.sh: $bin/pg_ctl not found: apt-get install postgresql-15 (or .ci/install-deps)" >&2
    exit 1
fi

# As root, the server runs as `postgres`; everything it touches must be its own
# and every parent directory must be traversable by it.
as_pg() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

check_traverse() {
    [ "$(id -u)" -eq 0 ] || return 0
    local p="$dir"
    while [ "$p" != "/" ]; do
        p=$(dirname "$p")
        if ! runuser -u postgres -- test -x "$p"; then
            echo "pg.sh: user postgres cannot enter $p; choose a directory under a traversable path (e.g. /tmp)" >&2
            exit 1
        fi
    done
}

psql_cmd() {
    as_pg "$bin/psql" -X -q -v ON_ERROR_STOP=1 -h "$sock" -U postgres "$@"
}

is_running() {
    [ -f "$data/postmaster.pid" ] && as_pg "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1
}

do_init() {
    check_traverse
    [ "$(id -u)" -eq 0 ] && chown postgres: "$dir"
    mkdir -p "$sock"
    [ "$(id -u)" -eq 0 ] && chown postgres: "$sock"
    as_pg "$bin/initdb" -D "$data" -U postgres -A trust -E UTF8 --locale=C.UTF-8 --no-sync >"$dir/initdb.log" 2>&1 || {
        cat "$dir/initdb.log" >&2; exit 1; }
    cat >>"$data/postgresql.conf" <<CONF
# paycoord throwaway cluster (test/pg.sh)
listen_addresses = ''
unix_socket_directories = '$sock'
max_prepared_transactions = ${PC_PG_MAX_PREPARED:-1000}
max_connections = ${PC_PG_MAX_CONNECTIONS:-200}
max_locks_per_transaction = 128
fsync = ${PC_PG_FSYNC:-on}
shared_buffers = 256MB
wal_level = minimal
max_wal_senders = 0
max_wal_size = 4GB
checkpoint_timeout = 30min
log_min_messages = warning
log_line_prefix = '%m [%p] '
CONF
}

do_start() {
    if is_running; then
        echo "pg.sh: already running in $dir"
    else
        [ -f "$data/PG_VERSION" ] || do_init
        as_pg "$bin/pg_ctl" -D "$data" -l "$log" -w -t 60 -o "-k $sock" start >/dev/null || {
            echo "pg.sh: start failed; log follows" >&2; tail -n 30 "$log" >&2; exit 1; }
    fi
    for _ in $(seq 1 100); do
        as_pg "$bin/pg_isready" -q -h "$sock" -U postgres && break
        sleep 0.1
    done
    if ! psql_cmd -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1; then
        psql_cmd -d postgres -c "CREATE DATABASE \"$db\""
    fi
    echo "pg.sh: running; connect with: psql -h $sock -U postgres $db"
}

case "$cmd" in
    start) do_start ;;
    stop)
        if is_running; then as_pg "$bin/pg_ctl" -D "$data" -m fast -w -t 60 stop >/dev/null; fi
        echo "pg.sh: stopped" ;;
    kill)
        if is_running; then as_pg "$bin/pg_ctl" -D "$data" -m immediate -w -t 60 stop >/dev/null; fi
        echo "pg.sh: killed (immediate)" ;;
    restart)
        if is_running; then as_pg "$bin/pg_ctl" -D "$data" -m immediate -w -t 60 stop >/dev/null; fi
        do_start ;;
    migrate)
        PGHOST="$sock" PGUSER=postgres PGDATABASE="$db" "$here/../sql/migrate.sh" ;;
    status) is_running ;;
    env) printf 'export PGHOST=%q PGDATABASE=%q PGUSER=postgres\n' "$sock" "$db" ;;
    conninfo) printf 'host=%s dbname=%s user=postgres\n' "$sock" "$db" ;;
    *) echo "pg.sh: unknown command $cmd" >&2; exit 2 ;;
esac
