#!/usr/bin/env bash
# run.sh - paycoord's benchmark in one go (docs/performance.md): builds a
# Release daemon into build-bench, starts a throwaway PostgreSQL (fsync on),
# the test processor (psp-sim), opens accounts, then measures
#
#   pgbench ceilings  2PC (begin, conditional debit, payment row, ledger row,
#                     PREPARE TRANSACTION / COMMIT PREPARED: 2 round trips),
#                     single phase (same, COMMIT: 1 round trip), and the
#                     daemon's current statements replayed by pgbench
#                     (pgbench-daemonsql: store_pg.c, store_pg_batch.c)
#   S1  processor latency 0, random accounts of N, concurrency 16 and 64,
#       pool sizes; throughput, latency, daemon CPU per 1000 payments, RSS
#   S2  processor latency 200 ms, 1000 in flight on distinct accounts
#   S3  hot accounts: every payment on 10 accounts (S3b, run last: with a
#       200 ms processor, so that queues outlast queue_timeout_ms)
#   S4  memory: the daemon's VmRSS and its own in-flight count with 1000 and
#       10000 payments in flight, each with its request open at a slow
#       processor (S4) or answered 'pending' and polled (S4b)
#   profile  perf record of the daemon under S1 (BENCH_PROFILE=0 skips it)
#
# The machine may be shared: pgbench and the daemon run interleaved, ratios
# are taken within a round, and every run reports the CPU used by processes
# that are not part of the benchmark ("others' cpu %"). Every run, pgbench's
# and the daemon's, also reports PostgreSQL's CPU and its WAL flushes and WAL
# bytes per payment (pg_stat_wal around the run: see wal_counters below).
#
# and prints one table; the same figures go to $BENCH_OUT/bench-results.json.
# Every server it starts is stopped on exit. Run as root or as a user that
# can run PostgreSQL (see test/pg.sh).
#
# Environment (defaults in brackets):
#   BENCH_SECONDS [10]      measured seconds per run (S1, S2, S3, pgbench)
#   BENCH_ROUNDS [3]        rounds of (pgbench 2PC, 1PC, daemon SQL, daemon S1) per
#                           concurrency, interleaved so that noise from other
#                           users of the machine hits both sides; medians reported
#   BENCH_WARMUP [2]        unmeasured seconds before each daemon run
#   BENCH_ACCOUNTS [10000]  accounts opened (S1 picks among all of them)
#   BENCH_CONCURRENCY ["16 64"]   S1 and pgbench concurrencies
#   BENCH_POOL [16]         daemon pool_size for S1..S4
#   BENCH_POOLS ["8 32"]    extra pool sizes tried at the highest concurrency
#   BENCH_LOG_LEVEL [info]  daemon log_level (a run at notice is added too)
#   BENCH_S4_LATENCY_MS [60000]   how long S4 holds each payment: the processor's
#                           latency (S4), its poll interval (S4b); each step must fill within it
#   BENCH_S4_STEPS [1000,10000]   payments in flight at which S4 samples memory
#   BENCH_PROFILE [1]       perf profile run (BENCH_PROFILE_SECONDS [10])
#   BENCH_OUT [build-bench/bench-out]  results directory
#   BENCH_BUILD [build-bench]          build directory (Release, no fail points)
#   BENCH_KEEP [0]          keep the work directory (logs, pgbench logs)
#   BENCH_ALT_DAEMON []     a second paycoord binary (a patched build, or an older
#                           version such as 0.1 against today's schema) run
#                           interleaved with the first in S1 (taking turns at
#                           going first), S3b and S4 as "s1alt-...", "s4alt-...";
#                           settings it does not know are left out (and said)
#   BENCH_SCENARIOS ["pgbench s1 pools s2 s3 s4 profile"]  which parts to run; also
#                           "sqlvariants": pgbench prices of parts of the daemon's SQL,
#                           "s2x": where S2's throughput goes, "pgprofile": perf of
#                           PostgreSQL's processes under S1 and S2
set -Eeuo pipefail

src=$(cd "$(dirname "$0")/../.." && pwd)
build=${BENCH_BUILD:-$src/build-bench}
secs=${BENCH_SECONDS:-10}
rounds=${BENCH_ROUNDS:-3}
warm=${BENCH_WARMUP:-2}
naccts=${BENCH_ACCOUNTS:-10000}
concs=${BENCH_CONCURRENCY:-"16 64"}
pool=${BENCH_POOL:-16}
pools=${BENCH_POOLS:-"8 32"}
loglevel=${BENCH_LOG_LEVEL:-info}
s4lat=${BENCH_S4_LATENCY_MS:-60000}
s4steps=${BENCH_S4_STEPS:-1000,10000}
profile=${BENCH_PROFILE:-1}
profsecs=${BENCH_PROFILE_SECONDS:-10}
out=${BENCH_OUT:-$build/bench-out}
keep=${BENCH_KEEP:-0}
alt=${BENCH_ALT_DAEMON:-}
scenarios=" ${BENCH_SCENARIOS:-pgbench s1 pools s2 s3 s4 profile} "
want() { case "$scenarios" in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
pgbin=${PC_PG_BIN:-/usr/lib/postgresql/15/bin}
py=/usr/bin/python3
maxc=$(echo $concs | tr ' ' '\n' | sort -n | tail -1)
opening=1000000000000          # opening balance of every account (minor units)

say() { printf '== %s\n' "$*" >&2; }
die() { printf 'run.sh: %s\n' "$*" >&2; exit 1; }

for t in "$pgbin/pgbench" "$pgbin/psql" cmake curl "$py"; do
    command -v "$t" >/dev/null || die "$t not found (apt-get install postgresql-15 postgresql-contrib-15 cmake curl python3)"
done

# ------------------------------------------------------------------ build
say "build (Release, PAYCOORD_FAILPOINTS=OFF) in $build"
cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release -DPAYCOORD_FAILPOINTS=OFF >/dev/null
# paybench is a target of the project (test/bench/CMakeLists.txt, from test/CMakeLists.txt).
cmake --build "$build" -j"$(nproc)" --target paycoord psp-sim paybench -- --no-print-directory >/dev/null
paybench=$build/test/bench/paybench
daemon=$build/coordinator/paycoord
build_commit=$(git -C "$src" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git -C "$src" status --porcelain -- coordinator proto sql recovery 2>/dev/null)" ]; then
    build_commit="$build_commit+uncommitted daemon changes"
fi
sim=$build/test/processor/psp-sim
# the pool's lock_timeout (db_lock_timeout_ms), for pgbench running the daemon's SQL
db_lock_ms=$("$daemon" --config-reference | sed -n 's/^| `db_lock_timeout_ms` | `\([0-9]*\)`.*/\1/p')
db_lock_ms=${db_lock_ms:-200}
allow_root=
if [ "$(id -u)" -eq 0 ] && "$daemon" --config-reference | grep -q '`allow_root`'; then
    allow_root="allow_root = true"      # the daemon refuses root otherwise
fi

# ------------------------------------------------------------------ work dir, cleanup
mkdir -p "$out"
out=$(cd "$out" && pwd)
rm -f "$out"/*.json "$out"/*.txt "$out"/*.svg
alt_version=
if [ -n "$alt" ]; then
    [ -x "$alt" ] || die "BENCH_ALT_DAEMON=$alt is not an executable"
    alt_version=$("$alt" --version 2>&1 | head -n 1 | tr -d '"\\')
fi
echo "{\"commit\": \"$build_commit\", \"built\": \"$(date -u +%Y-%m-%dT%H:%M:%SZ)\", \"alt_daemon\": \"$alt\", \"alt_daemon_version\": \"$alt_version\"}" >"$out/build-info.json"
work=$(mktemp -d /tmp/paycoord-bench.XXXXXX)
chmod 755 "$work"
mkdir -p "$work/runs"
sim_pid=
daemon_pid=
perf_pid=
cleanup() {
    set +e
    [ -n "$perf_pid" ] && kill -INT "$perf_pid" 2>/dev/null && wait "$perf_pid" 2>/dev/null
    [ -n "$daemon_pid" ] && kill -TERM "$daemon_pid" 2>/dev/null && wait "$daemon_pid" 2>/dev/null
    [ -n "$sim_pid" ] && kill -TERM "$sim_pid" 2>/dev/null && wait "$sim_pid" 2>/dev/null
    PC_PG_BIN=$pgbin "$src/test/pg.sh" stop "$work/pg" >/dev/null 2>&1
    if [ "$keep" = 1 ]; then
        echo "run.sh: work directory kept: $work" >&2
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT
trap 'echo "run.sh: failed at line $LINENO: $BASH_COMMAND" >&2' ERR
trap 'exit 130' INT TERM

# Enough descriptors for S4 (one processor connection per payment in flight).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# ------------------------------------------------------------------ PostgreSQL
say "PostgreSQL 15 (fsync on, max_prepared_transactions 12000) in $work/pg"
export PC_PG_MAX_PREPARED=12000 PC_PG_MAX_CONNECTIONS=200 PC_PG_FSYNC=on PC_PG_BIN=$pgbin
"$src/test/pg.sh" start "$work/pg" >/dev/null
"$src/test/pg.sh" migrate "$work/pg" >/dev/null
conninfo=$("$src/test/pg.sh" conninfo "$work/pg")
pgsock=$work/pg/sock
pgpm=$(head -n 1 "$work/pg/data/postmaster.pid")
# CPU ticks of the postmaster, its reaped children and its live backends
pg_ticks() {
    { cat /proc/[0-9]*/stat 2>/dev/null || true; } |      # processes come and go meanwhile
        awk -v pm="$pgpm" '$1 == pm { t += $14 + $15 + $16 + $17 } $4 == pm { t += $14 + $15 } END { print t + 0 }'
}
as_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
psqlq() { as_pg "$pgbin/psql" -X -q -v ON_ERROR_STOP=1 -h "$pgsock" -U postgres -d paycoord "$@"; }

say "open $naccts accounts (balance $opening each: opening credit + ledger row)"
psqlq <<SQL
BEGIN;
INSERT INTO accounts (id, currency, balance)
  SELECT 'acct-' || g, 'USD', $opening FROM generate_series(1, $naccts) g;
INSERT INTO credits (credit_id, idempotency_key, account_id, amount, currency, status, applied_at)
  SELECT md5('bench-open-' || g)::uuid, 'bench-open-' || g, 'acct-' || g, $opening, 'USD', 'applied', now()
  FROM generate_series(1, $naccts) g;
INSERT INTO ledger (account_id, amount, balance_after, credit_id)
  SELECT 'acct-' || g, $opening, $opening, md5('bench-open-' || g)::uuid FROM generate_series(1, $naccts) g;
COMMIT;
VACUUM ANALYZE accounts;
VACUUM ANALYZE credits;
VACUUM ANALYZE ledger;
SQL

# ------------------------------------------------------------------ processor
say "test processor"
umask 077
echo "bench-token-$(date +%s%N)" >"$work/token"
umask 022
"$sim" --port 0 --control-port 0 --token-file "$work/token" --max-payments 20000000 --quiet \
    >"$work/sim.out" 2>"$work/sim.log" &
sim_pid=$!
for _ in $(seq 100); do grep -q listening "$work/sim.out" 2>/dev/null && break; sleep 0.05; done
grep -q listening "$work/sim.out" || die "psp-sim did not start: $(cat "$work/sim.log")"
simport=$(sed -n 's/.* port=\([0-9]*\) .*/\1/p' "$work/sim.out")
simctl=$(sed -n 's/.*control_port=\([0-9]*\).*/\1/p' "$work/sim.out")
sim_control() {   # sim_control '{"latency_ms":200}'
    curl -fsS -X POST -H 'Content-Type: application/json' -d "$1" "http://127.0.0.1:$simctl/control" >/dev/null
}
sim_reset() {
    curl -fsS -X POST "http://127.0.0.1:$simctl/control/reset" >/dev/null
    sim_control '{"latency_ms":0,"jitter_ms":0,"pending_rate":0,"decline_rate":0}'
}

# ------------------------------------------------------------------ daemon
# start_daemon NAME POOL PROC_CONNS [extra config lines...]
start_daemon() {
    local name=$1 psize=$2 pconns=$3
    shift 3
    local conf=$work/$name.conf
    {
        echo "listen_socket = $work/paycoord.sock"
        echo "db_conninfo = $conninfo"
        echo "pool_size = $psize"
        echo "node_id = bench"
        echo "processor_url = http://127.0.0.1:$simport"
        echo "processor_token_file = $work/token"
        echo "processor_max_connections = $pconns"
        echo "max_in_flight = 20000"
        echo "max_clients = 4096"
        echo "max_client_pipeline = 100000"
        echo "prepared_share_percent = 95"
        echo "log_level = $loglevel"
        [ -n "$allow_root" ] && echo "$allow_root"
        for l in "$@"; do echo "$l"; done
    } >"$conf.all"
    # Only the settings this binary knows (its --config-reference): another
    # version given as BENCH_ALT_DAEMON may lack some, and refuses to start on
    # an unknown one. What is left out is said once per binary and setting.
    local bin=${daemon_bin:-$daemon} key line
    local known=$work/known-$(echo "$bin" | md5sum | cut -c1-8)
    [ -f "$known" ] || "$bin" --config-reference | sed -n 's/^| `\([a-z_0-9]*\)` |.*/\1/p' >"$known"
    : >"$conf"
    while IFS= read -r line; do
        key=${line%%=*}
        key=${key// /}
        if [ ! -s "$known" ] || grep -qx "$key" "$known"; then
            echo "$line" >>"$conf"
        elif ! grep -qx "$key" "$known.skipped" 2>/dev/null; then
            echo "$key" >>"$known.skipped"
            echo "run.sh: $bin does not know the setting $key: left out of its configuration" >&2
        fi
    done <"$conf.all"
    "$bin" --config "$conf" 2>"$work/runs/$name.daemon.log" &
    daemon_pid=$!
}

stop_daemon() {
    if [ -n "$daemon_pid" ]; then
        kill -TERM "$daemon_pid" 2>/dev/null || true
        wait "$daemon_pid" 2>/dev/null || true
        daemon_pid=
    fi
}

# bench NAME [paybench options...]: one paybench run against the running daemon.
bench() {
    local name=$1
    shift
    "$paybench" --socket "$work/paycoord.sock" --pid "$daemon_pid" --sim-pid "$sim_pid" --pg-pid "$pgpm" --wait-ready 30 \
        --label "$name" --key-prefix "$name-$$" --json "$out/run-$name.json" "$@" \
        | tee "$out/run-$name.txt" >&2 || echo "run.sh: paybench $name failed" >&2
}

# daemon_run NAME POOL PROC_CONNS "CONFIG LINES" [paybench options]
daemon_run() {
    local name=$1 psize=$2 pconns=$3 extra=$4 w0
    shift 4
    local lines=()
    if [ -n "$extra" ]; then IFS=';' read -r -a lines <<<"$extra"; fi
    w0=$(wal_counters)
    start_daemon "$name" "$psize" "$pconns" "${lines[@]}"
    bench "$name" "$@"
    stop_daemon
    [ -f "$out/run-$name.json" ] && wal_attach "$name" "$w0"
    summarize_log "$name"
}

# Keep the warnings and the last lines of a daemon log; the rest is large.
summarize_log() {
    local log=$work/runs/$1.daemon.log
    [ -f "$log" ] || return 0
    {
        echo "lines: $(wc -l <"$log"); warnings and errors: $(grep -c '^<[0-4]>' "$log" || true)"
        { grep '^<[0-4]>' "$log" || true; } | sed 's/ts=[^ ]* //; s/gid=[^ ]* //; s/key=[^ ]* //; s/account=[^ ]* //' \
            | cut -c1-200 | sort | uniq -c | sort -rn | head -n 10 || true
        echo "--- last lines"
        tail -n 5 "$log" | cut -c1-400
    } >"$out/log-$1.txt" 2>/dev/null
    [ "$keep" = 1 ] || rm -f "$log"
}

# ------------------------------------------------------------------ pgbench
cat >"$work/pgb-2pc.sql" <<'SQL'
\set aid random(1, :naccounts)
\set r random(1, 999999999999999)
BEGIN \; UPDATE accounts SET balance = balance - 1, updated_at = now() WHERE id = 'acct-:aid' AND balance >= 1 \; INSERT INTO payments (payment_id, idempotency_key, account_id, amount, currency, gid, node, status, deadline) VALUES (md5('pgb2-:tag-:client_id-:r')::uuid, 'pgb2-:tag-:client_id-:r', 'acct-:aid', 1, 'USD', 'pgb:2:' || md5('pgb2-:tag-:client_id-:r'), 'pgb', 'succeeded', now() + interval '60 s') \; INSERT INTO ledger (account_id, amount, balance_after, payment_id) SELECT id, -1, balance, md5('pgb2-:tag-:client_id-:r')::uuid FROM accounts WHERE id = 'acct-:aid' \; PREPARE TRANSACTION 'pgb2-:tag-:client_id-:r';
COMMIT PREPARED 'pgb2-:tag-:client_id-:r';
SQL
cat >"$work/pgb-1pc.sql" <<'SQL'
\set aid random(1, :naccounts)
\set r random(1, 999999999999999)
BEGIN \; UPDATE accounts SET balance = balance - 1, updated_at = now() WHERE id = 'acct-:aid' AND balance >= 1 \; INSERT INTO payments (payment_id, idempotency_key, account_id, amount, currency, gid, node, status, deadline) VALUES (md5('pgb1-:tag-:client_id-:r')::uuid, 'pgb1-:tag-:client_id-:r', 'acct-:aid', 1, 'USD', 'pgb:1:' || md5('pgb1-:tag-:client_id-:r'), 'pgb', 'succeeded', now() + interval '60 s') \; INSERT INTO ledger (account_id, amount, balance_after, payment_id) SELECT id, -1, balance, md5('pgb1-:tag-:client_id-:r')::uuid FROM accounts WHERE id = 'acct-:aid' \; COMMIT;
SQL
# The daemon's statements for one successful payment, replayed by pgbench
# (pgbench-daemonsql and the sqlvariants). Each line says which function of
# coordinator/ it mirrors; the text is the daemon's own, with pgbench
# variables where the daemon puts its values:
#   payment_id  :run-:cid-4000-8000-:s  (a uuid written in digits: 8-4-4-4-12)
#   key, gid    pgbd-:tag-:client_id-:seq      node 'pgb', deadline 60000 ms
#   created_at / updated_at: :now_ms (the daemon sends its clock, in ms)
# The sessions get lock_timeout from the connection options, as the pool's
# do (pgpool_conn.c: "-c lock_timeout=<db_lock_timeout_ms>ms"). Difference
# that pgbench forces: the daemon batches the success writes of all payments
# (those committed while the previous batch was in flight, at most 64), each
# pgbench client its own 64.
#
# daemonsql_script FILE PREFIX INTENT REF BATCH
#   INTENT  async  store_phase1 as the daemon sends it: the intent in its own
#                  transaction with asynchronous commit, then the debit
#           inside the intent and the debit in the one prepared transaction
#   REF     note   store_finish's commit note as the daemon sends it: the
#                  answer's processor_ref and updated_at, own transaction,
#                  asynchronous commit, one round trip before COMMIT PREPARED
#           sync   the processor_ref UPDATE of paycoord before the commit note
#                  (store_save_processor_ref on every answer, synchronous)
#           none   not sent (the batched success write carries the ref)
#   BATCH   sync   store_record_success's batched UPDATE as the daemon sends it,
#                  synchronous commit (before the success is told)
#           async  the same with asynchronous commit (paycoord before RECORD
#                  became synchronous)
#           no     not sent
daemonsql_script() {
    local file=$1 p=$2 intent=$3 ref=$4 batch=$5 k
    local id="':run-:cid-4000-8000-:s'" key="'$p-:tag-:client_id-:seq'"
    local intent_sql="SELECT pc_pay_intent2($id, $key, 'acct-:aid', 1, 'USD', NULL, NULL::jsonb, $key, 'pgb', 60000, :now_ms)"
    local debit_sql="SELECT pc_pay_debit2($id, 'acct-:aid', 1) \\; PREPARE TRANSACTION $key"
    {
        echo '\set aid random(1, :naccounts)'
        echo '\set seq :seq + 1'
        echo '\set cid 1000 + :client_id'
        echo '\set s 100000000000 + :seq'
        if [ "$intent" = async ]; then
            echo "-- store_pg.c store_phase1(with_intent): pc_pay_intent2 committed asynchronously, then pc_pay_debit2 + PREPARE TRANSACTION: one round trip"
            echo "BEGIN \\; SET LOCAL synchronous_commit TO off \\; $intent_sql \\; COMMIT \\; BEGIN \\; $debit_sql;"
        else
            echo "-- variant: pc_pay_intent2 and pc_pay_debit2 in one prepared transaction (no asynchronous intent transaction)"
            echo "BEGIN \\; $intent_sql \\; $debit_sql;"
        fi
        local ref_sql="UPDATE payments SET processor_ref = 'psp_:s' WHERE payment_id = $id::uuid AND processor_ref IS DISTINCT FROM 'psp_:s'"
        case $ref in
            note)
                echo "-- store_pg.c store_finish(commit, note): processor_ref and updated_at, asynchronous commit, before COMMIT PREPARED"
                echo "BEGIN \\; SET LOCAL synchronous_commit TO off \\; UPDATE payments SET updated_at = pc_ms(:now_ms), processor_ref = 'psp_:s' WHERE payment_id = $id::uuid AND status = 'pending' \\; COMMIT;" ;;
            sync)
                echo "-- payment_proc.c note_ref -> store_pg.c store_save_processor_ref: the processor's id, own transaction, synchronous commit"
                echo "$ref_sql;" ;;
        esac
        echo "-- store_pg.c store_finish(commit): payment.c pm_start_finish"
        echo "COMMIT PREPARED $key;"
        if [ "$batch" != no ]; then
            local sc="" ec=""
            if [ "$batch" = async ]; then sc="BEGIN \\; SET LOCAL synchronous_commit TO off \\; "; ec=" \\; COMMIT"; fi
            echo "-- store_pg_batch.c flush_now (store_record_success): status, processor_ref, updated_at of the last 64 payments ($batch commit)"
            echo '\if :seq % 64 = 0'
            local values="(':run-:cid-4000-8000-:s', 'psp_:s', :now_ms)"
            for k in $(seq 1 63); do
                echo "\\set k$k :s - $k"
                values="$values, (':run-:cid-4000-8000-:k$k', 'psp_:k$k', :now_ms)"
            done
            echo "${sc}UPDATE payments p SET status = 'succeeded', processor_ref = coalesce(v.ref, p.processor_ref), updated_at = 'epoch'::timestamptz + v.at * interval '1 millisecond' FROM (VALUES $values) v(id, ref, at) WHERE p.payment_id = v.id::uuid AND p.status = 'pending'${ec};"
            echo '\endif'
        fi
    } >"$file"
}
# What the daemon sends now (coordinator/db/store_pg.c, store_pg_batch.c, with
# sql/003_derived_status.sql): phase 1 and COMMIT PREPARED (2 synchronous WAL
# flushes), and one synchronous batched UPDATE per 64 payments (the daemon's
# batches are self-clocking: their size follows the load).
daemonsql_script "$work/pgb-d-daemonsql.sql" pgbd async none sync
# Variants (BENCH_SCENARIOS=sqlvariants), each differing from it by its name:
daemonsql_script "$work/pgb-d-refsync.sql" pgbe async sync async   # before: a synchronous processor_ref UPDATE per payment, the batch asynchronous
daemonsql_script "$work/pgb-d-note.sql" pgbf async note async      # an asynchronous note before COMMIT PREPARED, the batch asynchronous
daemonsql_script "$work/pgb-d-batchasync.sql" pgbi async none async  # the batch asynchronous (a crash could lose a told processor_ref)
daemonsql_script "$work/pgb-d-nobatch.sql" pgbg async none no      # no row write after the commit (derived status only)
daemonsql_script "$work/pgb-d-onetx.sql" pgbh inside none sync     # the intent inside the prepared transaction
# Dropped since sql/003_derived_status.sql: "nostatus" (no status UPDATE in the
# prepared transaction) is what pc_pay_debit2 does now, so it is daemonsql;
# "refeach" (a processor_ref transaction per payment) is refsync.
chmod 644 "$work"/pgb-*.sql

sys_jiffies() { awk '/^cpu /{t=0; for(i=2;i<=9;i++) t+=$i; print t-$5-$6, t}' /proc/stat; }

# WAL per payment: PostgreSQL 15's pg_stat_wal, sampled before and after each
# run (pgbench's or the daemon's). wal_sync counts the WAL fsyncs
# (fdatasync here: issue_xlog_fsync, with fsync on) with or without
# track_wal_io_timing, which only adds the *_time columns; it is left off.
# wal_bytes is the WAL generated. A session's counts reach pg_stat_wal when it
# exits (while it runs, at most once a second), the WAL writer's after each
# of its rounds (wal_writer_delay, 200 ms): so the second sample is taken once
# every client session of the run is gone, and a round later. The deltas cover
# everything PostgreSQL did meanwhile (the WAL writer's flushes of
# asynchronous commits, the daemon's recovery pool, autovacuum) and are
# divided by the run's successful payments (the daemon's: warm-up and drain
# included, paybench's succeeded_total; pgbench's: its transactions).
wal_counters() {
    psqlq -tA -F ' ' -c "SELECT wal_sync, wal_bytes, wal_records, wal_write FROM pg_stat_wal"
}
wal_settle() {
    local n=
    for _ in $(seq 100); do
        n=$(psqlq -tAc "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()")
        [ "$n" = 0 ] && break
        sleep 0.1
    done
    [ "$n" = 0 ] || echo "run.sh: $n client sessions still open: their WAL counts may be missing" >&2
    sleep 0.5
}
# wal_attach NAME W0 [N]: add the WAL deltas since W0 to $out/run-NAME.json
# (N: payments made in the same span besides the run's own)
wal_attach() {
    wal_settle
    "$py" "$src/test/bench/report.py" wal "$out/run-$1.json" "$2" "$(wal_counters)" "${3:-0}"
}

# pgbench_run NAME SCRIPT CLIENTS [DATABASE]
pgb_run_no=0
pgbench_run() {
    local name=$1 script=$2 clients=$3 db=${4:-paycoord} tag opts=
    tag=$(date +%s%N)
    pgb_run_no=$((pgb_run_no + 1))
    local threads=2
    [ "$clients" -lt 2 ] && threads=1
    # the daemon's SQL runs with the pool's session settings
    case $(basename "$script") in pgb-d-*) opts="-c lock_timeout=${db_lock_ms}ms" ;; esac
    mkdir -p "$work/pgblog-$name"
    chown postgres: "$work/pgblog-$name" 2>/dev/null || true
    local w0
    w0=$(wal_counters)
    read -r b0 t0 < <(sys_jiffies)
    local p0 p1 tf=$work/runs/$name.time
    p0=$(pg_ticks)
    { TIMEFORMAT='%U %S'; time PGOPTIONS="$opts" as_pg "$pgbin/pgbench" -n -M simple -h "$pgsock" -U postgres \
        -c "$clients" -j "$threads" -T "$secs" -D naccounts="$naccts" -D tag="$tag" -D seq=0 \
        -D run=$((10000000 + pgb_run_no)) -D now_ms="$(date +%s%3N)" -f "$script" -l \
        --log-prefix="$work/pgblog-$name/tx" "$db" >"$work/runs/$name.pgbench.out" 2>&1 \
        || { echo "run.sh: pgbench $name failed:" >&2; tail -n 5 "$work/runs/$name.pgbench.out" >&2; }; } 2>"$tf"
    sleep 0.2                   # let the postmaster reap the backends
    p1=$(pg_ticks)
    read -r b1 t1 < <(sys_jiffies)
    # a client stopped by -T between PREPARE and COMMIT PREPARED: finish it
    local g
    for g in $(psqlq -tAc "SELECT gid FROM pg_prepared_xacts WHERE gid LIKE 'pgb%' AND database = '$db'"); do
        psqlq -d "$db" -c "COMMIT PREPARED '$g'" || true
    done
    "$py" "$src/test/bench/report.py" pgbench "$name" "$clients" "$secs" "$b0" "$t0" "$b1" "$t1" \
        "$work/runs/$name.pgbench.out" "$work/pgblog-$name" "$p0" "$p1" "$(cat "$tf")" "$(getconf CLK_TCK)" \
        >"$out/run-$name.json"
    wal_attach "$name" "$w0"
    "$py" -c 'import json,sys; r=json.load(open(sys.argv[1])); w=r.get("wal") or {}; print("%-26s c=%-3d %8.1f tps  p50 %.2f  p99 %.2f  p99.9 %.2f ms  machine cpu %.0f%%  postgres %.3f s/1000  WAL %s flushes, %s bytes per payment  other %.0f%%" % (r["label"], r["connections"], r["payments_per_s"], r["latency_ms"]["p50"], r["latency_ms"]["p99"], r["latency_ms"]["p999"], r["machine_cpu_busy_pct"], r["pg_cpu_s_per_1000"], w.get("syncs_per_payment"), w.get("bytes_per_payment"), r["other_cpu_pct"]))' "$out/run-$name.json" >&2
    rm -rf "$work/pgblog-$name"
}

t_start=$(date +%s)

# ------------------------------------------------------------------ S1 with pgbench ceilings
for r in $(seq 1 "$rounds"); do
    for c in $concs; do
        say "round $r/$rounds, concurrency $c: pgbench ceilings, then the daemon (S1, pool $pool)"
        if want pgbench; then
            pgbench_run "pgbench-2pc-c$c-r$r" "$work/pgb-2pc.sql" "$c"
            pgbench_run "pgbench-1pc-c$c-r$r" "$work/pgb-1pc.sql" "$c"
            pgbench_run "pgbench-daemonsql-c$c-r$r" "$work/pgb-d-daemonsql.sql" "$c"
        fi
        want s1 || continue
        sim_reset
        # With BENCH_ALT_DAEMON the two builds take turns going first, so that
        # neither always meets the bigger tables (or the warmer caches).
        if [ -n "$alt" ] && [ $((r % 2)) = 0 ]; then
            daemon_bin=$alt daemon_run "s1alt-c$c-pool$pool-r$r" "$pool" 64 "" --connections "$c" --depth 1 \
                --accounts "$naccts" --duration "$secs" --warmup "$warm"
        fi
        daemon_run "s1-c$c-pool$pool-r$r" "$pool" 64 "" --connections "$c" --depth 1 --accounts "$naccts" \
            --duration "$secs" --warmup "$warm"
        if [ -n "$alt" ] && [ $((r % 2)) = 1 ]; then
            daemon_bin=$alt daemon_run "s1alt-c$c-pool$pool-r$r" "$pool" 64 "" --connections "$c" --depth 1 \
                --accounts "$naccts" --duration "$secs" --warmup "$warm"
        fi
    done
done
# Later runs meet bigger tables (and autovacuum): each block below starts
# with its own reference run of S1 (c$maxc, pool $pool) to compare with.
vacuum_tables() { psqlq -c "VACUUM ANALYZE accounts" -c "VACUUM ANALYZE payments" -c "VACUUM ANALYZE ledger" >/dev/null; }
if want pools; then
    vacuum_tables
    say "S1 reference run, then pool sizes $pools at concurrency $maxc"
    sim_reset
    daemon_run "s1ref-pools" "$pool" 64 "" --connections "$maxc" --depth 1 --accounts "$naccts" \
        --duration "$secs" --warmup "$warm"
    for p in $pools; do
        daemon_run "s1-c$maxc-pool$p" "$p" 64 "" --connections "$maxc" --depth 1 --accounts "$naccts" \
            --duration "$secs" --warmup "$warm"
    done
    if [ "$loglevel" != notice ]; then
        say "S1 at concurrency $maxc with log_level notice (no per-payment info lines)"
        daemon_run "s1-c$maxc-pool$pool-lognotice" "$pool" 64 "log_level = notice" --connections "$maxc" \
            --depth 1 --accounts "$naccts" --duration "$secs" --warmup "$warm"
    fi
fi

# ------------------------------------------------------------------ S2
if want s2; then
    vacuum_tables
    say "S2 reference: S1 at concurrency $maxc, processor latency 0 (the ceiling S2 is compared with)"
    sim_reset
    daemon_run "s1ref-s2" "$pool" 64 "" --connections "$maxc" --depth 1 --accounts "$naccts" \
        --duration "$secs" --warmup "$warm"
    say "S2: processor latency 200 ms, 1000 in flight on distinct accounts, pool $pool"
    sim_control '{"latency_ms":200}'
    daemon_run "s2-pc1100" "$pool" 1100 "" --connections 10 --depth 100 --account-mode slot --accounts "$naccts" \
        --duration "$secs" --warmup 3
    say "S2 again with the default processor_max_connections (64)"
    daemon_run "s2-pc64" "$pool" 64 "" --connections 10 --depth 100 --account-mode slot --accounts "$naccts" \
        --duration "$secs" --warmup 3
fi

# ------------------------------------------------------------------ S2 diagnostics (optional)
# Which of "1000 in flight" and "200 ms at the processor" costs the throughput
# (BENCH_SCENARIOS=s2x): postgres cpu s/1000 per run tells where it goes.
if want s2x; then
    vacuum_tables
    sim_reset
    say "S2x: reference S1, then 1000 in flight at latency 0, 300 at 200 ms, 1000 at 200 ms with pool 32"
    daemon_run "s2x-ref" "$pool" 64 "" --connections "$maxc" --depth 1 --accounts "$naccts" \
        --duration "$secs" --warmup "$warm"
    daemon_run "s2x-lat0-1000" "$pool" 1100 "" --connections 10 --depth 100 --account-mode slot \
        --accounts "$naccts" --duration "$secs" --warmup 3
    sim_control '{"latency_ms":200}'
    daemon_run "s2x-lat200-300" "$pool" 1100 "" --connections 10 --depth 30 --account-mode slot \
        --accounts "$naccts" --duration "$secs" --warmup 3
    daemon_run "s2x-lat200-1000-pool32" 32 1100 "" --connections 10 --depth 100 --account-mode slot \
        --accounts "$naccts" --duration "$secs" --warmup 3
    daemon_run "s2x-lat200-1000" "$pool" 1100 "" --connections 10 --depth 100 --account-mode slot \
        --accounts "$naccts" --duration "$secs" --warmup 3
    sim_reset
fi

# ------------------------------------------------------------------ S3
if want s3; then
    vacuum_tables
    say "S3: hot accounts: 64 clients, every payment on 10 accounts (processor latency 0)"
    sim_reset
    daemon_run "s3-hot10" "$pool" 64 "" --connections 64 --depth 1 --accounts 10 --duration "$secs" --warmup "$warm"
fi

# ------------------------------------------------------------------ S4
if want s4; then
    # A step counts only when every payment of it is held at once: the hold
    # lasts s4lat (the processor's latency in S4, the poll interval in S4b),
    # so a step not filled within s4lat cannot be reached any more.
    s4conf="processor_timeout_ms = $((s4lat + 60000));payment_deadline_ms = $((s4lat + 600000));pay_wait_ms = $((s4lat + 120000));log_level = notice"
    s4args=(--connections 20 --depth 500 --account-mode slot --accounts "$naccts" --hold-steps "$s4steps"
            --hold-timeout $((s4lat / 1000)) --drain $((s4lat / 1000 + 120)))
    say "S4: memory: payments held in flight at a slow processor (latency ${s4lat} ms), steps $s4steps"
    sim_reset
    sim_control "{\"latency_ms\":$s4lat}"
    daemon_run "s4-hold" "$pool" 10000 "$s4conf" "${s4args[@]}" --hold-mode open
    if [ -n "$alt" ]; then
        sim_reset
        sim_control "{\"latency_ms\":$s4lat}"
        daemon_bin=$alt daemon_run "s4alt-hold" "$pool" 10000 "$s4conf" "${s4args[@]}" --hold-mode open
    fi
    say "S4b: memory: payments pending at the processor (answered 'pending' at once, polled every ${s4lat} ms), steps $s4steps"
    sim_reset
    sim_control '{"pending_rate":1,"settle_ms":10000,"settle_status":"succeeded"}'
    daemon_run "s4-pending" "$pool" 64 "$s4conf;processor_poll_ms = $s4lat" "${s4args[@]}" --hold-mode pending
    sim_reset
fi

# ------------------------------------------------------------------ SQL variants (optional)
if want sqlvariants; then
    # hold_prepared N: N prepared transactions, each holding the row lock of one
    # of the last N accounts (pgbench is then told to use only the others)
    hold_prepared() {
        local i
        for i in $(seq 1 "$1"); do
            echo "BEGIN; UPDATE accounts SET updated_at = now() WHERE id = 'acct-$((naccts - i + 1))'; PREPARE TRANSACTION 'hold-$i';"
        done | psqlq >/dev/null
    }
    release_prepared() {
        local g
        for g in $(psqlq -tAc "SELECT gid FROM pg_prepared_xacts WHERE gid LIKE 'hold-%'"); do
            echo "COMMIT PREPARED '$g';"
        done | psqlq >/dev/null
    }
    # A copy of the database without the two partial indexes on payments.status
    # (every intent adds an entry to each, and while they exist the batched
    # status UPDATE can never be HOT: it adds an entry to every index).
    psqlq -d postgres -c "CREATE DATABASE paycoord_nopartial TEMPLATE paycoord" >/dev/null
    psqlq -d paycoord_nopartial -c "DROP INDEX IF EXISTS payments_pending; DROP INDEX payments_node_pending" >/dev/null
    # Copies with room on each payments page (fillfactor 80), so that the
    # processor_ref UPDATE can be HOT (no new index entries); with the
    # partial indexes dropped too, the batched status UPDATE as well.
    psqlq -d postgres -c "CREATE DATABASE paycoord_ff80 TEMPLATE paycoord" >/dev/null
    psqlq -d paycoord_ff80 -c "ALTER TABLE payments SET (fillfactor = 80)" >/dev/null
    psqlq -d postgres -c "CREATE DATABASE paycoord_ff80_nopartial TEMPLATE paycoord_nopartial" >/dev/null
    psqlq -d paycoord_ff80_nopartial -c "ALTER TABLE payments SET (fillfactor = 80)" >/dev/null
    for r in $(seq 1 "$rounds"); do
        for c in $concs; do
            say "round $r/$rounds, concurrency $c: the daemon's SQL, priced part by part (pgbench)"
            pgbench_run "sqlv-2pc-c$c-r$r" "$work/pgb-2pc.sql" "$c"
            pgbench_run "sqlv-daemonsql-c$c-r$r" "$work/pgb-d-daemonsql.sql" "$c"
            pgbench_run "sqlv-refsync-c$c-r$r" "$work/pgb-d-refsync.sql" "$c"
            pgbench_run "sqlv-note-c$c-r$r" "$work/pgb-d-note.sql" "$c"
            pgbench_run "sqlv-batchasync-c$c-r$r" "$work/pgb-d-batchasync.sql" "$c"
            pgbench_run "sqlv-nobatch-c$c-r$r" "$work/pgb-d-nobatch.sql" "$c"
            pgbench_run "sqlv-onetx-c$c-r$r" "$work/pgb-d-onetx.sql" "$c"
            pgbench_run "sqlv-daemonsql-nopartial-c$c-r$r" "$work/pgb-d-daemonsql.sql" "$c" paycoord_nopartial
            pgbench_run "sqlv-daemonsql-ff80-c$c-r$r" "$work/pgb-d-daemonsql.sql" "$c" paycoord_ff80
            pgbench_run "sqlv-daemonsql-ff80-nopartial-c$c-r$r" "$work/pgb-d-daemonsql.sql" "$c" paycoord_ff80_nopartial
            # With 300 other prepared transactions open (as with S2's 1000 in
            # flight at 200 ms): what they cost every other transaction.
            hold_prepared 300
            naccts_saved=$naccts
            naccts=$((naccts - 300))
            pgbench_run "sqlv-2pc-held300-c$c-r$r" "$work/pgb-2pc.sql" "$c"
            pgbench_run "sqlv-daemonsql-held300-c$c-r$r" "$work/pgb-d-daemonsql.sql" "$c"
            naccts=$naccts_saved
            release_prepared
        done
    done
fi

# ------------------------------------------------------------------ profile
if want profile && [ "$profile" = 1 ] && command -v perf >/dev/null; then
    say "profile: perf record (cpu-clock, dwarf call graphs) of the daemon under S1, c$maxc pool $pool"
    w0=$(wal_counters)
    start_daemon "profile" "$pool" 64
    "$paybench" --socket "$work/paycoord.sock" --wait-ready 30 --connections 1 --duration 0.5 --warmup 0 \
        --quiet --key-prefix "profwarm-$$" --json "$work/profwarm.json" >/dev/null 2>&1 || true
    perf record -e cpu-clock -F 997 --call-graph dwarf,16384 -p "$daemon_pid" -o "$work/perf.data" \
        >"$work/perf.log" 2>&1 &
    perf_pid=$!
    sleep 0.5
    bench "profile" --connections "$maxc" --depth 1 --accounts "$naccts" --duration "$profsecs" --warmup 0
    kill -INT "$perf_pid" 2>/dev/null || true
    wait "$perf_pid" 2>/dev/null || true
    perf_pid=
    stop_daemon
    # the warm-up's payments are in the WAL deltas too
    [ -f "$out/run-profile.json" ] && wal_attach profile "$w0" \
        "$("$py" -c 'import json,sys; print(json.load(open(sys.argv[1])).get("succeeded_total", 0))' "$work/profwarm.json" 2>/dev/null || echo 0)"
    summarize_log profile
    # self time by library and symbol; by library; inclusive time of named functions
    perf report -i "$work/perf.data" --stdio --no-children --sort dso,symbol -g none --percent-limit 0.5 \
        2>/dev/null | grep '%' | sed 's/ *- *- *$//' >"$out/profile-self.txt" || true
    perf report -i "$work/perf.data" --stdio --no-children --sort dso -g none 2>/dev/null \
        | grep '%' >"$out/profile-dso.txt" || true
    perf report -i "$work/perf.data" --stdio --children --sort symbol -g none --percent-limit 1.5 2>/dev/null \
        | grep '%' | grep -v '\] 0x0000' | sed 's/ *- *- *$//' | head -n 70 >"$out/profile-children.txt" || true
    echo "profile: $out/profile-self.txt, profile-dso.txt, profile-children.txt" >&2
fi

# ------------------------------------------------------------------ PostgreSQL's profile (optional)
# Where PostgreSQL's CPU goes with 1000 payments in flight at a 200 ms
# processor (S2) against the same daemon at latency 0 (S1): perf record of
# the whole machine, PostgreSQL's processes only in the report, self time by
# symbol (BENCH_SCENARIOS=pgprofile).
pg_profile() {   # pg_profile NAME [daemon_run arguments...]
    local name=$1
    shift
    (sleep 4; perf record -e cpu-clock -F 499 -a -g -o "$work/perf-$name.data" -- sleep 5 \
        >"$work/perf-$name.log" 2>&1) &
    local rec=$!
    daemon_run "$name" "$@"
    wait "$rec" 2>/dev/null || true
    perf report -i "$work/perf-$name.data" --stdio --no-children --comm postgres --sort symbol -g none \
        --percent-limit 0.7 2>/dev/null | grep '%' | sed 's/ *- *- *$//' >"$out/pgprofile-$name.txt" || true
    perf report -i "$work/perf-$name.data" --stdio --no-children --sort comm -g none 2>/dev/null \
        | grep '%' >"$out/pgprofile-$name-comm.txt" || true
}
if want pgprofile && command -v perf >/dev/null; then
    vacuum_tables
    sim_reset
    say "pgprofile: PostgreSQL under S1 (latency 0, c$maxc), then under S2 (200 ms, 1000 in flight)"
    pg_profile "pgprof-s1" "$pool" 64 "" --connections "$maxc" --depth 1 --accounts "$naccts" \
        --duration 10 --warmup 2
    sim_control '{"latency_ms":200}'
    pg_profile "pgprof-s2" "$pool" 1100 "" --connections 10 --depth 100 --account-mode slot \
        --accounts "$naccts" --duration 10 --warmup 3
    sim_reset
    echo "pgprofile: $out/pgprofile-*.txt" >&2
fi

# ------------------------------------------------------------------ S3b (last)
# Queues that outlast queue_timeout_ms: the payments that waited too long are
# answered `overloaded` (nothing charged). It ran last when 0.1 could crash
# here (a queue timer left armed after the payment left the queue); it stays
# last so that anything it leaves prepared cannot lock other scenarios'
# accounts.
if want s3; then
    say "S3b: hot accounts, processor latency 200 ms, 640 clients on 10 accounts (queues exceed queue_timeout_ms)"
    sim_control '{"latency_ms":200}'
    daemon_run "s3-hot10-lat200" "$pool" 64 "" --connections 64 --depth 10 --accounts 10 --duration "$secs" \
        --warmup "$warm" --drain 30
    if [ -n "$alt" ]; then
        daemon_bin=$alt daemon_run "s3alt-hot10-lat200" "$pool" 64 "" --connections 64 --depth 10 --accounts 10 \
            --duration "$secs" --warmup "$warm" --drain 30
    fi
fi

# ------------------------------------------------------------------ invariants
# A payment's status is the derived one (sql/003_derived_status.sql: 'succeeded'
# iff its ledger debit committed); the row's own column may lag behind it.
say "invariants (I1 ledger sums to balance; I4 no negative balance; no prepared left)"
inv=$(psqlq -tA <<'SQL'
SELECT (SELECT count(*) FROM accounts a
         WHERE a.balance <> (SELECT coalesce(sum(l.amount), 0) FROM ledger l WHERE l.account_id = a.id))
       || ' ' || (SELECT count(*) FROM accounts WHERE balance < 0)
       || ' ' || (SELECT count(*) FROM pg_prepared_xacts)
       || ' ' || (SELECT count(*) FROM payments_view WHERE node = 'bench' AND derived_status = 'succeeded')
       || ' ' || (SELECT count(*) FROM payments_view WHERE node = 'bench' AND derived_status <> 'succeeded')
       -- pgbench-daemonsql wrote what the daemon writes: every row its processor_ref and
       -- a committed debit; the row's own status 'succeeded' but for the last batch of
       -- each client (fewer than 64 per pgbench client and run)
       || ' ' || (SELECT count(*) || ' ' || count(processor_ref) || ' '
                         || count(*) FILTER (WHERE derived_status = 'succeeded') || ' '
                         || count(*) FILTER (WHERE status = 'succeeded')
                    FROM payments_view WHERE node = 'pgb' AND idempotency_key LIKE 'pgbd-%');
SQL
)
read -r inv_bad inv_neg inv_prep inv_ok inv_other rp_n rp_ref rp_debited rp_row <<<"$inv"
echo "{\"ledger_mismatch_accounts\":$inv_bad,\"negative_balances\":$inv_neg,\"prepared_left\":$inv_prep,\"daemon_payments_succeeded\":$inv_ok,\"daemon_payments_other\":$inv_other,\"daemonsql_replay\":{\"payments\":$rp_n,\"with_processor_ref\":$rp_ref,\"debit_committed\":$rp_debited,\"row_succeeded\":$rp_row}}" \
    >"$out/run-invariants.json"
echo "accounts whose ledger != balance: $inv_bad; negative: $inv_neg; prepared left: $inv_prep; daemon payments succeeded: $inv_ok, other: $inv_other" >&2
echo "pgbench-daemonsql payments: $rp_n; with processor_ref $rp_ref, debit committed $rp_debited, row status succeeded $rp_row (the rest: last batches)" >&2

# ------------------------------------------------------------------ table + JSON
t_end=$(date +%s)
"$py" "$src/test/bench/report.py" table "$out" "$secs" "$naccts" "$pool" "$maxc" "$((t_end - t_start))" "$s4lat" "$concs" "$rounds"
