/*
 * pgtest_pgpool.c - pgpool against a real throwaway PostgreSQL (PG* env, see
 * test/pg.sh): results, multi-statement 2PC, errors and the ROLLBACK that
 * follows, parameters, FIFO under load, admission control, connect failures
 * and timeouts, backend and server loss with reconnect, teardown.
 * The restart test also needs PAYCOORD_SRC and PAYCOORD_TEST_PG_DIR.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <event2/event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "pgpool.h"

#define MAXRES 8

typedef struct rec {
    int idx;
    int calls;
    bool fired_in_submit;   /* the callback ran inside pgpool_query*(): contract broken */
    pgq_status status;
    bool sent;
    char sqlstate[6];
    char errmsg[256];
    int nres;
    ExecStatusType rstatus[MAXRES];
    int ncols;              /* row 0 of the last result with rows */
    char cell[MAXRES][64];
    bool isnull[MAXRES];
    double elapsed_ms;
    int order;              /* completion sequence number */
} rec;

static struct event_base *g_base;
static bool g_in_submit;
static int g_done;
static int g_order;

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static void record_cb(const pgpool_reply *r, void *arg)
{
    rec *x = arg;
    x->calls++;
    x->fired_in_submit |= g_in_submit;
    x->status = r->status;
    x->sent = r->sent;
    snprintf(x->sqlstate, sizeof(x->sqlstate), "%s", r->sqlstate ? r->sqlstate : "?");
    snprintf(x->errmsg, sizeof(x->errmsg), "%s", r->errmsg ? r->errmsg : "(null)");
    x->nres = r->nresults;
    x->elapsed_ms = r->elapsed_ms;
    x->order = g_order++;
    for (int i = 0; i < r->nresults && i < MAXRES; i++)
        x->rstatus[i] = PQresultStatus(r->results[i]);
    for (int i = r->nresults - 1; i >= 0; i--) {
        const PGresult *res = r->results[i];
        if (PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) < 1)
            continue;
        x->ncols = PQnfields(res) < MAXRES ? PQnfields(res) : MAXRES;
        for (int c = 0; c < x->ncols; c++) {
            x->isnull[c] = PQgetisnull(res, 0, c);
            snprintf(x->cell[c], sizeof(x->cell[c]), "%s", PQgetvalue(res, 0, c));
        }
        break;
    }
    g_done++;
}

static int submit(pgpool *p, const char *sql, rec *x)
{
    g_in_submit = true;
    int rc = pgpool_query(p, sql, record_cb, x);
    g_in_submit = false;
    return rc;
}

static int submit_params(pgpool *p, const char *sql, int n, const char *const *v, rec *x)
{
    g_in_submit = true;
    int rc = pgpool_query_params(p, sql, n, v, record_cb, x);
    g_in_submit = false;
    return rc;
}

/* ---- running the loop with a bound ---- */

enum { W_DONE, W_UP, W_DOWN, W_CONNECTED, W_BUSY };

static bool cond_met(pgpool *p, int what, int n)
{
    switch (what) {
    case W_DONE: return g_done >= n;
    case W_UP: return pgpool_is_up(p);
    case W_DOWN: return !pgpool_is_up(p);
    case W_CONNECTED: return pgpool_connected(p) >= n;
    case W_BUSY: return pgpool_busy(p) >= n;
    }
    return false;
}

static void tick_cb(evutil_socket_t fd, short what, void *arg) { }

/* Runs the loop until the condition holds or ms pass; p may be NULL for W_DONE. */
static bool wait_until(pgpool *p, int what, int n, int ms)
{
    struct timeval tv = { 0, 10 * 1000 };
    struct event *tick = event_new(g_base, -1, EV_PERSIST, tick_cb, NULL);
    double deadline = now_ms() + ms;
    bool ok;
    event_add(tick, &tv);
    while (!(ok = cond_met(p, what, n)) && now_ms() < deadline)
        event_base_loop(g_base, EVLOOP_ONCE);
    event_free(tick);
    return ok;
}

static void pump(int ms)
{
    (void)wait_until(NULL, W_DONE, 1 << 30, ms);
}

static pgpool_config cfg_default(int size)
{
    pgpool_config cfg = {
        .conninfo = "",   /* everything from PGHOST/PGDATABASE/PGUSER */
        .size = size,
        .max_queue = 1000,
        .connect_timeout_ms = 5000,
        .reconnect_min_ms = 50,
        .reconnect_max_ms = 400,
    };
    return cfg;
}

static pgpool *pool_up(pgpool_config cfg)
{
    pgpool *p = pgpool_new(g_base, &cfg);
    assert_non_null(p);
    assert_true(wait_until(p, W_CONNECTED, cfg.size, 10000));
    return p;
}

static int setup(void **state)
{
    g_base = event_base_new();
    g_done = 0;
    g_order = 0;
    g_in_submit = false;
    return g_base ? 0 : -1;
}

static int teardown(void **state)
{
    event_base_free(g_base);
    g_base = NULL;
    return 0;
}

/* ---- state callback recorder ---- */

typedef struct updown { int ups, downs; bool last; } updown;

static void state_cb(bool up, void *arg)
{
    updown *u = arg;
    if (up)
        u->ups++;
    else
        u->downs++;
    u->last = up;
}

/* ---- tests ---- */

static void test_simple_query(void **state)
{
    pgpool_config cfg = cfg_default(2);
    updown u = { 0 };
    rec a = { 0 }, b = { 0 };
    pgpool *p = pgpool_new(g_base, &cfg);
    assert_non_null(p);
    pgpool_set_state_cb(p, state_cb, &u);
    /* Connecting needs the loop: nothing is up yet, so queries are refused at once. */
    assert_false(pgpool_is_up(p));
    assert_int_equal(submit(p, "SELECT 1", &a), PGPOOL_UNAVAILABLE);
    assert_int_equal(pgpool_size(p), 2);

    assert_true(wait_until(p, W_CONNECTED, 2, 10000));
    assert_int_equal(u.ups, 1);
    assert_int_equal(u.downs, 0);

    assert_int_equal(submit(p, "SELECT 1 AS a, 'x'::text AS b, NULL::int AS c", &a), PGPOOL_QUEUED);
    assert_int_equal(submit(p, "SELECT current_setting('standard_conforming_strings'), "
                               "current_setting('client_encoding'), "
                               "current_setting('application_name'), 'it''s é'", &b),
                     PGPOOL_QUEUED);
    assert_int_equal(a.calls, 0);    /* never from inside pgpool_query */
    assert_true(wait_until(p, W_DONE, 2, 5000));
    assert_int_equal(a.calls, 1);
    assert_false(a.fired_in_submit);
    assert_int_equal(a.status, PGQ_OK);
    assert_true(a.sent);
    assert_string_equal(a.sqlstate, "");
    assert_string_equal(a.errmsg, "");
    assert_int_equal(a.nres, 1);
    assert_int_equal(a.rstatus[0], PGRES_TUPLES_OK);
    assert_int_equal(a.ncols, 3);
    assert_string_equal(a.cell[0], "1");
    assert_string_equal(a.cell[1], "x");
    assert_true(a.isnull[2]);
    assert_true(a.elapsed_ms >= 0);
    assert_int_equal(b.status, PGQ_OK);
    assert_string_equal(b.cell[0], "on");
    assert_string_equal(b.cell[1], "UTF8");
    assert_string_equal(b.cell[2], "paycoord");
    assert_string_equal(b.cell[3], "it's é");

    pgpool_counters st;
    pgpool_stats(p, &st);
    assert_int_equal(st.queries, 2);
    assert_int_equal(st.rejected, 1);
    assert_int_equal(st.errors, 0);
    assert_int_equal(pgpool_busy(p), 0);
    assert_int_equal(pgpool_queued(p), 0);
    pgpool_free(p);
    assert_int_equal(u.downs, 0);    /* no state callback from pgpool_free */
}

/* The conninfo's own settings win, except the two the daemon's SQL relies on. */
static void test_conninfo_overrides(void **state)
{
    pgpool_config cfg = cfg_default(1);
    rec a = { 0 };
    cfg.conninfo = "application_name=other client_encoding=LATIN1 "
                   "options='-c statement_timeout=1234'";
    pgpool *p = pool_up(cfg);
    assert_int_equal(submit(p, "SELECT current_setting('application_name'), "
                               "current_setting('client_encoding'), "
                               "current_setting('statement_timeout'), "
                               "current_setting('standard_conforming_strings')", &a),
                     PGPOOL_QUEUED);
    assert_true(wait_until(p, W_DONE, 1, 5000));
    assert_int_equal(a.status, PGQ_OK);
    assert_string_equal(a.cell[0], "other");
    assert_string_equal(a.cell[1], "UTF8");
    assert_string_equal(a.cell[2], "1234ms");
    assert_string_equal(a.cell[3], "on");
    pgpool_free(p);
}

/* The session settings are a statement run before the first query
 * (pgbouncer refuses startup options): lock_timeout holds on every
 * connection, and a user's own options still reach the server. */
static void test_session_settings(void **state)
{
    pgpool_config cfg = cfg_default(2);
    rec a = { 0 }, b = { 0 };
    cfg.lock_timeout_ms = 321;
    cfg.conninfo = "options='-c statement_timeout=4321'";
    cfg.keepalives_idle_s = 3;          /* ignored on a Unix socket: must not break it */
    cfg.tcp_user_timeout_ms = 4000;
    pgpool *p = pool_up(cfg);
    for (int i = 0; i < 2; i++)
        assert_int_equal(submit(p, "SELECT current_setting('lock_timeout'), current_setting('statement_timeout'), "
                                   "current_setting('standard_conforming_strings'), pg_sleep(0.05)",
                                i ? &b : &a), PGPOOL_QUEUED);
    assert_true(wait_until(p, W_DONE, 2, 5000));
    for (int i = 0; i < 2; i++) {
        rec *x = i ? &b : &a;
        assert_int_equal(x->status, PGQ_OK);
        assert_string_equal(x->cell[0], "321ms");
        assert_string_equal(x->cell[1], "4321ms");
        assert_string_equal(x->cell[2], "on");
    }
    pgpool_free(p);
}

/* A multi-host conninfo: the first host is dead, libpq goes on to the next. */
static void test_multi_host(void **state)
{
    const char *pghost = getenv("PGHOST");
    char conninfo[512];
    rec a = { 0 };
    if (!pghost || pghost[0] != '/') {
        print_message("PGHOST is not a socket directory: skipping\n");
        skip();
    }
    snprintf(conninfo, sizeof(conninfo), "host=/nonexistent/pgpool-test,%s target_session_attrs=read-write", pghost);
    pgpool_config cfg = cfg_default(1);
    cfg.conninfo = conninfo;
    pgpool *p = pool_up(cfg);
    assert_int_equal(submit(p, "SELECT pg_is_in_recovery()", &a), PGPOOL_QUEUED);
    assert_true(wait_until(p, W_DONE, 1, 5000));
    assert_int_equal(a.status, PGQ_OK);
    assert_string_equal(a.cell[0], "f");
    pgpool_free(p);
}

/* pgpool_wake: slots waiting out a long backoff try at once. */
static void test_wake(void **state)
{
    char dir[] = "/tmp/pgpool-wk-XXXXXX";
    char conninfo[128];
    assert_non_null(mkdtemp(dir));
    pgpool_config cfg = cfg_default(2);
    snprintf(conninfo, sizeof(conninfo), "host=%s dbname=x user=x", dir);
    cfg.conninfo = conninfo;
    cfg.reconnect_min_ms = 5000;
    cfg.reconnect_max_ms = 10000;
    pgpool *p = pgpool_new(g_base, &cfg);
    assert_non_null(p);
    pump(100);
    pgpool_counters st;
    pgpool_stats(p, &st);
    assert_int_equal(st.connect_failures, 2);    /* one each, then a backoff of >= 5 s */
    pgpool_wake(p);
    pump(100);
    pgpool_stats(p, &st);
    assert_int_equal(st.connect_failures, 4);
    pgpool_free(p);
    rmdir(dir);
}

static void test_multi_statement_2pc(void **state)
{
    pgpool *p = pool_up(cfg_default(1));
    rec prep = { 0 }, commit = { 0 }, check = { 0 };
    char gid[64], sql[256];
    snprintf(gid, sizeof(gid), "pgpool-test-%ld", (long)getpid());

    snprintf(sql, sizeof(sql), "BEGIN; SELECT 1; PREPARE TRANSACTION '%s'", gid);
    assert_int_equal(submit(p, sql, &prep), PGPOOL_QUEUED);
    snprintf(sql, sizeof(sql), "COMMIT PREPARED '%s'", gid);
    assert_int_equal(submit(p, sql, &commit), PGPOOL_QUEUED);
    snprintf(sql, sizeof(sql), "SELECT count(*) FROM pg_prepared_xacts WHERE gid = '%s'", gid);
    assert_int_equal(submit(p, sql, &check), PGPOOL_QUEUED);
    assert_true(wait_until(p, W_DONE, 3, 5000));

    assert_int_equal(prep.status, PGQ_OK);
    assert_int_equal(prep.nres, 3);
    assert_int_equal(prep.rstatus[0], PGRES_COMMAND_OK);
    assert_int_equal(prep.rstatus[1], PGRES_TUPLES_OK);
    assert_int_equal(prep.rstatus[2], PGRES_COMMAND_OK);
    assert_string_equal(prep.cell[0], "1");
    assert_int_equal(commit.status, PGQ_OK);
    assert_int_equal(commit.nres, 1);
    assert_int_equal(check.status, PGQ_OK);
    assert_string_equal(check.cell[0], "0");
    assert_true(prep.order < commit.order && commit.order < check.order);
    pgpool_free(p);
}

static void test_error_mid_transaction(void **state)
{
    pgpool *p = pool_up(cfg_default(1));   /* one connection: every query reuses it */
    rec err = { 0 }, after = { 0 }, open = { 0 }, gone = { 0 };

    assert_int_equal(submit(p, "BEGIN; SELECT 1/0; SELECT 2", &err), PGPOOL_QUEUED);
    /* Would fail with 25P02 if the pool did not roll the aborted transaction back. */
    assert_int_equal(submit(p, "SELECT 3", &after), PGPOOL_QUEUED);
    /* A transaction left open without an error is rolled back as well. */
    assert_int_equal(submit(p, "BEGIN; CREATE TEMP TABLE pgpool_tx(x int)", &open), PGPOOL_QUEUED);
    assert_int_equal(submit(p, "SELECT to_regclass('pg_temp.pgpool_tx') IS NULL, "
                               "now() = statement_timestamp()", &gone), PGPOOL_QUEUED);
    assert_true(wait_until(p, W_DONE, 4, 5000));

    assert_int_equal(err.status, PGQ_SQL_ERROR);
    assert_string_equal(err.sqlstate, "22012");
    assert_non_null(strstr(err.errmsg, "division by zero"));
    assert_int_equal(err.nres, 2);    /* BEGIN, then the error; SELECT 2 never ran */
    assert_int_equal(err.rstatus[0], PGRES_COMMAND_OK);
    assert_int_equal(err.rstatus[1], PGRES_FATAL_ERROR);
    assert_true(err.sent);
    assert_int_equal(after.status, PGQ_OK);
    assert_string_equal(after.cell[0], "3");
    assert_int_equal(open.status, PGQ_OK);
    assert_int_equal(gone.status, PGQ_OK);
    assert_string_equal(gone.cell[0], "t");
    assert_string_equal(gone.cell[1], "t");

    pgpool_counters st;
    pgpool_stats(p, &st);
    assert_int_equal(st.errors, 1);
    assert_int_equal(st.disconnects, 0);
    pgpool_free(p);
}

static void test_query_params(void **state)
{
    pgpool *p = pool_up(cfg_default(1));
    rec a = { 0 }, b = { 0 }, c = { 0 };
    const char *v[] = { NULL, "41", "h\xc3\xa9llo", "it's; DROP TABLE x --" };
    const char *bad[] = { "abc" };

    assert_int_equal(submit_params(p, "SELECT $1::text IS NULL, $2::int + 1, $3::text, $4::text, "
                                      "$1::text", 4, v, &a), PGPOOL_QUEUED);
    assert_int_equal(submit_params(p, "SELECT $1::int", 1, bad, &b), PGPOOL_QUEUED);
    assert_int_equal(submit_params(p, "SELECT 'no params'", 0, NULL, &c), PGPOOL_QUEUED);
    assert_int_equal(pgpool_query_params(p, "SELECT 1", -1, NULL, record_cb, &a), PGPOOL_INVALID);
    assert_int_equal(pgpool_query_params(p, "SELECT 1", 70000, v, record_cb, &a), PGPOOL_INVALID);
    assert_int_equal(pgpool_query(p, NULL, record_cb, &a), PGPOOL_INVALID);
    assert_true(wait_until(p, W_DONE, 3, 5000));

    assert_int_equal(a.calls, 1);
    assert_int_equal(a.status, PGQ_OK);
    assert_string_equal(a.cell[0], "t");
    assert_string_equal(a.cell[1], "42");
    assert_string_equal(a.cell[2], "h\xc3\xa9llo");
    assert_string_equal(a.cell[3], "it's; DROP TABLE x --");
    assert_true(a.isnull[4]);
    assert_int_equal(b.status, PGQ_SQL_ERROR);
    assert_string_equal(b.sqlstate, "22P02");
    assert_int_equal(c.status, PGQ_OK);
    assert_string_equal(c.cell[0], "no params");
    pgpool_free(p);
}

/* Queries bigger than the socket buffer (PQflush returns 1: EV_WRITE path),
 * and a string of many statements (every result, in order). */
static void test_big_and_many(void **state)
{
    enum { BIG = 4 << 20, NSTMT = 50 };
    pgpool *p = pool_up(cfg_default(2));
    rec lit = { 0 }, par = { 0 }, many = { 0 }, small = { 0 };
    char *sql = malloc(BIG + 64), *val = malloc(BIG + 1), *multi = malloc(NSTMT * 32);
    assert_non_null(sql);
    assert_non_null(val);
    assert_non_null(multi);
    memset(val, 'x', BIG);
    val[BIG] = '\0';
    snprintf(sql, BIG + 64, "SELECT length('%s')", val);
    size_t n = 0;
    for (int i = 0; i < NSTMT; i++)
        n += (size_t)snprintf(multi + n, NSTMT * 32 - n, "SELECT %d;", i);
    const char *v[1] = { val };

    assert_int_equal(submit(p, sql, &lit), PGPOOL_QUEUED);
    assert_int_equal(submit_params(p, "SELECT length($1)", 1, v, &par), PGPOOL_QUEUED);
    assert_int_equal(submit(p, multi, &many), PGPOOL_QUEUED);
    assert_int_equal(submit(p, "SELECT 'small'", &small), PGPOOL_QUEUED);
    free(sql);    /* the pool keeps its own copies */
    free(val);
    free(multi);
    assert_true(wait_until(p, W_DONE, 4, 20000));
    assert_int_equal(lit.status, PGQ_OK);
    assert_string_equal(lit.cell[0], "4194304");
    assert_int_equal(par.status, PGQ_OK);
    assert_string_equal(par.cell[0], "4194304");
    assert_int_equal(many.status, PGQ_OK);
    assert_int_equal(many.nres, NSTMT);
    assert_string_equal(many.cell[0], "49");    /* row 0 of the last result */
    assert_int_equal(small.status, PGQ_OK);
    pgpool_free(p);
}

#define NFIFO 500

static void test_fifo_500(void **state)
{
    pgpool *p = pool_up(cfg_default(4));
    static rec r[NFIFO];
    static char idx[NFIFO][12];
    memset(r, 0, sizeof(r));
    for (int i = 0; i < NFIFO; i++) {
        const char *v[1] = { idx[i] };
        snprintf(idx[i], sizeof(idx[i]), "%d", i);
        r[i].idx = i;
        assert_int_equal(submit_params(p, "SELECT $1::int, pg_backend_pid()", 1, v, &r[i]),
                         PGPOOL_QUEUED);
    }
    assert_true(pgpool_queued(p) == NFIFO);
    assert_true(wait_until(p, W_DONE, NFIFO, 30000));
    pump(20);
    assert_int_equal(g_done, NFIFO);

    /* Exactly once each; on every backend the queries ran in submission
     * order (a connection takes them oldest first), and all four served. */
    int pids[NFIFO], npids = 0, last_on_pid[NFIFO];
    for (int i = 0; i < NFIFO; i++) {
        assert_int_equal(r[i].calls, 1);
        assert_false(r[i].fired_in_submit);
        assert_int_equal(r[i].status, PGQ_OK);
        assert_int_equal(strtol(r[i].cell[0], NULL, 10), i);
        int pid = (int)strtol(r[i].cell[1], NULL, 10), k;
        for (k = 0; k < npids && pids[k] != pid; k++)
            ;
        if (k == npids) {
            pids[npids++] = pid;
            last_on_pid[k] = -1;
        }
        if (last_on_pid[k] >= 0)
            assert_true(r[last_on_pid[k]].order < r[i].order);
        last_on_pid[k] = i;
    }
    assert_int_equal(npids, 4);

    pgpool_counters st;
    pgpool_stats(p, &st);
    assert_int_equal(st.queries, NFIFO);
    assert_int_equal(st.max_queued, NFIFO);
    assert_int_equal(pgpool_queued(p), 0);
    assert_int_equal(pgpool_busy(p), 0);
    pgpool_free(p);
}

/* A callback that submits the next query: re-entrancy and "never synchronous". */
typedef struct chain { pgpool *p; int left; int calls; bool sync; bool failed; } chain;

static void chain_cb(const pgpool_reply *r, void *arg)
{
    chain *ch = arg;
    ch->calls++;
    ch->sync |= g_in_submit;
    if (r->status != PGQ_OK)
        ch->failed = true;
    if (--ch->left > 0) {
        g_in_submit = true;
        if (pgpool_query(ch->p, "SELECT 1", chain_cb, ch) != PGPOOL_QUEUED)
            ch->failed = true;
        g_in_submit = false;
    } else {
        g_done++;
    }
}

static void test_reentrant_chain(void **state)
{
    pgpool *p = pool_up(cfg_default(2));
    chain ch = { .p = p, .left = 50 };
    g_in_submit = true;
    assert_int_equal(pgpool_query(p, "SELECT 1", chain_cb, &ch), PGPOOL_QUEUED);
    g_in_submit = false;
    assert_true(wait_until(p, W_DONE, 1, 10000));
    assert_int_equal(ch.calls, 50);
    assert_false(ch.sync);
    assert_false(ch.failed);
    pgpool_free(p);
}

static void test_overloaded(void **state)
{
    pgpool_config cfg = cfg_default(1);
    cfg.max_queue = 3;
    pgpool *p = pool_up(cfg);
    rec r[6] = { { 0 } };
    /* The idle connection takes one on the next loop pass; three may wait. */
    for (int i = 0; i < 4; i++)
        assert_int_equal(submit(p, "SELECT pg_sleep(0.01)", &r[i]), PGPOOL_QUEUED);
    assert_int_equal(submit(p, "SELECT 1", &r[4]), PGPOOL_OVERLOADED);
    assert_int_equal(pgpool_queued(p), 4);
    assert_true(wait_until(p, W_BUSY, 1, 5000));
    assert_int_equal(pgpool_queued(p), 3);
    assert_int_equal(submit(p, "SELECT 1", &r[4]), PGPOOL_OVERLOADED);
    assert_true(wait_until(p, W_DONE, 4, 5000));
    assert_int_equal(submit(p, "SELECT 1", &r[5]), PGPOOL_QUEUED);
    assert_true(wait_until(p, W_DONE, 5, 5000));
    for (int i = 0; i < 6; i++)
        if (i != 4) {
            assert_int_equal(r[i].calls, 1);
            assert_int_equal(r[i].status, PGQ_OK);
        }
    assert_int_equal(r[4].calls, 0);   /* refused: the callback never fires */

    pgpool_counters st;
    pgpool_stats(p, &st);
    assert_int_equal(st.rejected, 2);
    assert_int_equal(st.queries, 5);
    pgpool_free(p);
}

static void test_bad_conninfo(void **state)
{
    pgpool_config cfg = cfg_default(2);
    updown u = { 0 };
    rec a = { 0 };

    cfg.conninfo = "host=/nonexistent/pgpool-test dbname=x user=x";
    cfg.reconnect_min_ms = 20;
    cfg.reconnect_max_ms = 80;
    pgpool *p = pgpool_new(g_base, &cfg);
    assert_non_null(p);
    pgpool_set_state_cb(p, state_cb, &u);
    pump(400);
    assert_false(pgpool_is_up(p));
    assert_int_equal(pgpool_connected(p), 0);
    assert_int_equal(submit(p, "SELECT 1", &a), PGPOOL_UNAVAILABLE);
    assert_int_equal(u.ups + u.downs, 0);
    pgpool_counters st;
    pgpool_stats(p, &st);
    assert_true(st.connect_failures >= 6);   /* 2 connections, retrying every 20..80 ms */
    pgpool_free(p);
    assert_int_equal(a.calls, 0);

    /* Unparseable conninfo and nonsense settings fail at once. */
    cfg = cfg_default(1);
    cfg.conninfo = "host";
    assert_null(pgpool_new(g_base, &cfg));
    cfg = cfg_default(0);
    assert_null(pgpool_new(g_base, &cfg));
    cfg = cfg_default(1);
    cfg.reconnect_max_ms = 10;
    assert_null(pgpool_new(g_base, &cfg));
}

/* A server that accepts the connection and never answers: the connect timeout fires. */
static void test_connect_timeout(void **state)
{
    char dir[] = "/tmp/pgpool-ct-XXXXXX";
    char conninfo[128];
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    assert_non_null(mkdtemp(dir));
    snprintf(sa.sun_path, sizeof(sa.sun_path), "%s/.s.PGSQL.5432", dir);
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    assert_true(fd >= 0);
    assert_int_equal(bind(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    assert_int_equal(listen(fd, 64), 0);

    pgpool_config cfg = cfg_default(1);
    snprintf(conninfo, sizeof(conninfo), "host=%s dbname=x user=x", dir);
    cfg.conninfo = conninfo;
    cfg.connect_timeout_ms = 150;
    cfg.reconnect_min_ms = 20;
    cfg.reconnect_max_ms = 40;
    pgpool *p = pgpool_new(g_base, &cfg);
    assert_non_null(p);
    double t0 = now_ms();
    pump(100);
    pgpool_counters st;
    pgpool_stats(p, &st);
    assert_int_equal(st.connect_failures, 0);   /* still waiting for the server */
    pump(600);
    pgpool_stats(p, &st);
    assert_true(st.connect_failures >= 2);
    assert_true(st.connect_failures <= (uint64_t)((now_ms() - t0) / 150.0) + 1);
    assert_false(pgpool_is_up(p));
    pgpool_free(p);
    close(fd);
    unlink(sa.sun_path);
    rmdir(dir);
}

/* One backend terminated mid-query: that query is lost (sent), the other
 * connection keeps serving the queue, and the slot reconnects. */
static void test_backend_terminated(void **state)
{
    pgpool *p = pool_up(cfg_default(2));
    updown u = { 0 };
    rec victim = { 0 }, killer = { 0 }, q[3] = { { 0 } }, after = { 0 };
    char vsql[128], ksql[1024];
    pgpool_set_state_cb(p, state_cb, &u);

    snprintf(vsql, sizeof(vsql), "SELECT pg_sleep(30) -- pgpool-victim-%ld", (long)getpid());
    snprintf(ksql, sizeof(ksql),
             "DO $$ BEGIN FOR i IN 1..1000 LOOP "
             "  PERFORM pg_stat_clear_snapshot(); "
             "  IF EXISTS (SELECT FROM pg_stat_activity WHERE query = '%s' AND state = 'active') THEN "
             "    PERFORM pg_terminate_backend(pid) FROM pg_stat_activity WHERE query = '%s'; "
             "    RETURN; "
             "  END IF; "
             "  PERFORM pg_sleep(0.01); "
             "END LOOP; RAISE EXCEPTION 'victim not found'; END $$", vsql, vsql);
    assert_int_equal(submit(p, vsql, &victim), PGPOOL_QUEUED);
    assert_true(wait_until(p, W_BUSY, 1, 5000));
    /* The killer waits (server side) until the victim shows up, then ends it;
     * the three queued behind it must survive the victim's loss. */
    assert_int_equal(submit(p, ksql, &killer), PGPOOL_QUEUED);
    for (int i = 0; i < 3; i++)
        assert_int_equal(submit(p, "SELECT 7", &q[i]), PGPOOL_QUEUED);
    assert_true(wait_until(p, W_DONE, 5, 10000));

    assert_int_equal(killer.status, PGQ_OK);
    assert_int_equal(victim.calls, 1);
    assert_int_equal(victim.status, PGQ_CONN_LOST);
    assert_true(victim.sent);
    assert_string_equal(victim.sqlstate, "57P01");
    assert_int_equal(victim.nres, 0);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(q[i].status, PGQ_OK);
        assert_string_equal(q[i].cell[0], "7");
    }
    assert_int_equal(u.downs, 0);    /* the pool never went down */
    assert_true(wait_until(p, W_CONNECTED, 2, 5000));
    assert_int_equal(submit(p, "SELECT 8", &after), PGPOOL_QUEUED);
    assert_true(wait_until(p, W_DONE, 6, 5000));
    assert_int_equal(after.status, PGQ_OK);

    pgpool_counters st;
    pgpool_stats(p, &st);
    assert_int_equal(st.disconnects, 1);
    assert_int_equal(st.conn_lost, 1);
    assert_int_equal(st.reconnects, 1);
    pgpool_free(p);
}

static int pg_ctl(const char *cmd)
{
    const char *src = getenv("PAYCOORD_SRC"), *dir = getenv("PAYCOORD_TEST_PG_DIR");
    char line[1024];
    snprintf(line, sizeof(line), "'%s/test/pg.sh' %s '%s' >/dev/null", src, cmd, dir);
    return system(line);
}

/* The whole server dies under running and queued queries, then comes back. */
static void test_server_restart(void **state)
{
    if (!getenv("PAYCOORD_SRC") || !getenv("PAYCOORD_TEST_PG_DIR")) {
        print_message("PAYCOORD_SRC / PAYCOORD_TEST_PG_DIR not set: skipping\n");
        skip();
    }
    pgpool *p = pool_up(cfg_default(2));
    updown u = { 0 };
    rec run[2] = { { 0 } }, queued[3] = { { 0 } }, refused = { 0 }, after = { 0 };
    pgpool_set_state_cb(p, state_cb, &u);

    for (int i = 0; i < 2; i++)
        assert_int_equal(submit(p, "SELECT pg_sleep(30)", &run[i]), PGPOOL_QUEUED);
    for (int i = 0; i < 3; i++)
        assert_int_equal(submit(p, "SELECT 1", &queued[i]), PGPOOL_QUEUED);
    assert_true(wait_until(p, W_BUSY, 2, 5000));
    pump(200);

    assert_int_equal(pg_ctl("kill"), 0);
    assert_true(wait_until(p, W_DONE, 5, 10000));
    for (int i = 0; i < 2; i++) {
        assert_int_equal(run[i].status, PGQ_CONN_LOST);
        assert_true(run[i].sent);
    }
    for (int i = 0; i < 3; i++) {
        assert_int_equal(queued[i].calls, 1);
        assert_int_equal(queued[i].status, PGQ_CONN_LOST);
        assert_false(queued[i].sent);
    }
    assert_false(pgpool_is_up(p));
    assert_int_equal(u.downs, 1);
    assert_false(u.last);
    assert_int_equal(submit(p, "SELECT 1", &refused), PGPOOL_UNAVAILABLE);
    pump(500);    /* reconnect attempts fail against the dead server */

    assert_int_equal(pg_ctl("start"), 0);
    assert_true(wait_until(p, W_CONNECTED, 2, 20000));
    assert_int_equal(u.ups, 1);
    assert_true(u.last);
    assert_int_equal(submit(p, "SELECT 42", &after), PGPOOL_QUEUED);
    assert_true(wait_until(p, W_DONE, 6, 5000));
    assert_int_equal(after.status, PGQ_OK);
    assert_string_equal(after.cell[0], "42");
    assert_int_equal(refused.calls, 0);

    pgpool_counters st;
    pgpool_stats(p, &st);
    assert_int_equal(st.disconnects, 2);
    assert_int_equal(st.reconnects, 2);
    assert_true(st.connect_failures >= 2);
    assert_int_equal(st.conn_lost, 5);
    pgpool_free(p);
}

/* Callbacks that try to use the pool while it is being freed. */
static pgpool *g_freeing;
static int g_refused_during_free;

static void free_time_cb(const pgpool_reply *r, void *arg)
{
    record_cb(r, arg);
    if (pgpool_query(g_freeing, "SELECT 1", record_cb, arg) == PGPOOL_UNAVAILABLE)
        g_refused_during_free++;
    pgpool_free(g_freeing);   /* a no-op while already freeing */
}

static void test_free_with_queued(void **state)
{
    pgpool *p = pool_up(cfg_default(1));
    rec run = { 0 }, q[4] = { { 0 } };
    g_freeing = p;
    g_refused_during_free = 0;
    assert_int_equal(pgpool_query(p, "SELECT pg_sleep(2)", free_time_cb, &run), PGPOOL_QUEUED);
    for (int i = 0; i < 4; i++)
        assert_int_equal(pgpool_query(p, "SELECT 1", free_time_cb, &q[i]), PGPOOL_QUEUED);
    assert_true(wait_until(p, W_BUSY, 1, 5000));
    pump(50);
    assert_int_equal(g_done, 0);
    pgpool_free(p);
    assert_int_equal(g_done, 5);
    assert_int_equal(run.calls, 1);
    assert_int_equal(run.status, PGQ_CONN_LOST);
    assert_true(run.sent);
    for (int i = 0; i < 4; i++) {
        assert_int_equal(q[i].calls, 1);
        assert_int_equal(q[i].status, PGQ_SHUTDOWN);
        assert_false(q[i].sent);
    }
    assert_int_equal(g_refused_during_free, 5);
    pump(50);    /* nothing of the pool may fire any more */
    assert_int_equal(g_done, 5);
}

/* pgpool_free() from inside a query callback: the pool dies when it returns. */
static void free_inside_cb(const pgpool_reply *r, void *arg)
{
    record_cb(r, arg);
    pgpool_free(g_freeing);
    if (pgpool_query(g_freeing, "SELECT 1", record_cb, arg) == PGPOOL_UNAVAILABLE)
        g_refused_during_free++;
}

static void test_free_inside_callback(void **state)
{
    pgpool *p = pool_up(cfg_default(2));
    rec a = { 0 }, slow = { 0 }, q[2] = { { 0 } };
    g_freeing = p;
    g_refused_during_free = 0;
    assert_int_equal(pgpool_query(p, "SELECT 1", free_inside_cb, &a), PGPOOL_QUEUED);
    assert_int_equal(submit(p, "SELECT pg_sleep(2)", &slow), PGPOOL_QUEUED);
    for (int i = 0; i < 2; i++)
        assert_int_equal(submit(p, "SELECT 2", &q[i]), PGPOOL_QUEUED);
    assert_true(wait_until(NULL, W_DONE, 4, 5000));
    assert_int_equal(a.status, PGQ_OK);
    assert_int_equal(g_refused_during_free, 1);
    assert_int_equal(slow.status, PGQ_CONN_LOST);
    assert_true(slow.sent);
    for (int i = 0; i < 2; i++)
        assert_int_equal(q[i].status, PGQ_SHUTDOWN);
    pump(100);
    assert_int_equal(g_done, 4);
}

int main(void)
{
    const char *lvl = getenv("PGPOOL_TEST_LOG");
    log_set_level(lvl && log_level_parse(lvl) >= 0 ? log_level_parse(lvl) : PCLOG_WARNING);
    log_set_timestamps(false);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_simple_query, setup, teardown),
        cmocka_unit_test_setup_teardown(test_conninfo_overrides, setup, teardown),
        cmocka_unit_test_setup_teardown(test_session_settings, setup, teardown),
        cmocka_unit_test_setup_teardown(test_multi_host, setup, teardown),
        cmocka_unit_test_setup_teardown(test_wake, setup, teardown),
        cmocka_unit_test_setup_teardown(test_multi_statement_2pc, setup, teardown),
        cmocka_unit_test_setup_teardown(test_error_mid_transaction, setup, teardown),
        cmocka_unit_test_setup_teardown(test_query_params, setup, teardown),
        cmocka_unit_test_setup_teardown(test_big_and_many, setup, teardown),
        cmocka_unit_test_setup_teardown(test_fifo_500, setup, teardown),
        cmocka_unit_test_setup_teardown(test_reentrant_chain, setup, teardown),
        cmocka_unit_test_setup_teardown(test_overloaded, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bad_conninfo, setup, teardown),
        cmocka_unit_test_setup_teardown(test_connect_timeout, setup, teardown),
        cmocka_unit_test_setup_teardown(test_backend_terminated, setup, teardown),
        cmocka_unit_test_setup_teardown(test_free_with_queued, setup, teardown),
        cmocka_unit_test_setup_teardown(test_free_inside_callback, setup, teardown),
        cmocka_unit_test_setup_teardown(test_server_restart, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
