#!/usr/bin/env bash
# migrate.sh - apply sql/NNN_*.sql in order to the database named by the
# libpq environment (PGHOST, PGDATABASE, PGUSER, ...) or by $1 (a conninfo).
# Each migration runs in one transaction together with its record in
# schema_migrations, under an advisory lock, so a failed migration leaves
# nothing half-applied, concurrent runs serialise, and a second run is a no-op.
# Installed as paycoord-migrate(1), reading DATADIR/paycoord/sql; the
# environment variable PAYCOORD_SQL_DIR names another directory.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# The one line the installed copy differs in (dist/CMakeLists.txt rewrites it):
sql_dir=${PAYCOORD_SQL_DIR:-$here}
case ${1:-} in
    -h|--help) echo "usage: ${0##*/} [CONNINFO]   (default: the libpq environment, PGHOST, PGDATABASE, ...)"
               echo "applies $sql_dir/NNN_*.sql that the database has not recorded in schema_migrations"
               exit 0 ;;
esac
shopt -s nullglob
files=("$sql_dir"/[0-9][0-9][0-9]_*.sql)
[ ${#files[@]} -gt 0 ] || { echo "migrate: no NNN_*.sql files in $sql_dir" >&2; exit 1; }
conn=${1:-}
psql_bin=$(command -v psql || echo /usr/lib/postgresql/15/bin/psql)
run_psql() {
    if [ -n "$conn" ]; then "$psql_bin" -X -q -v ON_ERROR_STOP=1 "$conn" "$@"
    else "$psql_bin" -X -q -v ON_ERROR_STOP=1 "$@"; fi
}
run_psql -c "CREATE TABLE IF NOT EXISTS schema_migrations (
    version text PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now())" 2>&1 | grep -v 'already exists' || true
applied=0
for f in "${files[@]}"; do
    v=$(basename "$f" .sql)
    out=$(run_psql --single-transaction -tA <<SQL
SELECT pg_advisory_xact_lock(7357001);
SELECT NOT EXISTS (SELECT 1 FROM schema_migrations WHERE version = '$v') AS todo \gset
\if :todo
\i $f
INSERT INTO schema_migrations (version) VALUES ('$v');
SELECT 'applied';
\endif
SQL
) || { echo "migrate: $v FAILED; nothing of it was applied" >&2; exit 1; }
    if printf '%s\n' "$out" | grep -qx applied; then
        echo "migrate: applied $v"
        applied=$((applied + 1))
    fi
done
echo "migrate: done ($applied applied)"
