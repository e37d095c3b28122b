/*
 * pgpool.c - a pool of PostgreSQL connections on libpq's asynchronous API
 * under libevent: a FIFO query queue, queries run on idle connections,
 * ROLLBACK of transactions a caller left open, callbacks only from the loop,
 * the session settings (SETUP) before a new connection takes queries.
 * Nothing here blocks the loop thread (see pgpool.h). How one connection
 * comes up, fails and reconnects (with jittered backoff) is pgpool_conn.c;
 * pgpool_conn.h has the diagram of a slot's states.
 *
 * Re-entrancy: user callbacks run with p->depth > 0. A callback may queue
 * queries (that only appends and activates the kick event) or call
 * pgpool_free(), which then only marks the pool; the frame that ran the
 * callback sees finish_query() return true ("pool gone") and unwinds without
 * touching the pool again. Every function that can run a user callback
 * returns that flag (PC_MUSTCHECK), up to the libevent entry points.
 * Connection slots live as long as the pool; only their PGconn and events are
 * replaced, and never while a callback of theirs is on the stack.
 */
#include "pgpool.h"
#include "pgpool_conn.h"
#include "log.h"

#include <event2/event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PGPOOL_MAX_PARAMS 65535  /* protocol limit (16-bit count) */

/* One queued or running query; one allocation holding the copied sql and params. */
typedef struct pgq {
    struct pgq *next;
    pgpool_cb cb;
    void *arg;
    uint64_t id;
    double enqueued_ms;
    int nparams;          /* -1: simple protocol (pgpool_query) */
    const char **params;  /* nparams entries inside this allocation; NULL = SQL NULL */
    const char *sql;      /* inside this allocation */
} pgq;

struct pgpool {
    pgpool_connector cx;    /* how the slots connect, and how many are in each state */
    pgpool_config cfg;      /* conninfo and app_name not kept: see cx */
    pconn *conns;
    pgq *head, *tail;
    int nqueued;
    struct event *kick;     /* activated to dispatch queued queries from the loop */
    void (*state_cb)(bool up, void *arg);
    void *state_arg;
    bool notified_up;       /* the up/down state the state callback last saw */
    bool closing;           /* pgpool_free() called: refuse new queries */
    int depth;              /* user callbacks on the stack */
    uint64_t next_id;
    pgpool_counters st;     /* connect_failures and reconnects are cx's */
};

/* ---- small helpers ---- */

static bool pool_is_up(const pgpool *p)
{
    return !p->closing &&
           p->cx.nstate[CONN_IDLE] + p->cx.nstate[CONN_BUSY] + p->cx.nstate[CONN_ROLLBACK] > 0;
}

static void pool_kick(pgpool *p)
{
    if (!p->closing && p->head && p->cx.nstate[CONN_IDLE] > 0)
        event_active(p->kick, EV_TIMEOUT, 1);
}

static pgq *queue_pop(pgpool *p)
{
    pgq *q = p->head;
    if (q) {
        p->head = q->next;
        if (!p->head)
            p->tail = NULL;
        q->next = NULL;
        p->nqueued--;
    }
    return q;
}

/* ---- running callbacks ---- */

/* Tears the pool down: queued queries PGQ_SHUTDOWN, running ones
 * PGQ_CONN_LOST sent=true, then everything is closed and freed. */
static void pool_destroy(pgpool *p);

/* Frees the pool if pgpool_free() was called and no callback is on the stack.
 * True means the pool is gone: the caller returns without touching it. */
PC_MUSTCHECK static bool pool_reap(pgpool *p)
{
    if (p->closing && p->depth == 0) {
        pool_destroy(p);
        return true;
    }
    return false;
}

static const char *status_name(pgq_status s)
{
    switch (s) {
    case PGQ_OK: return "ok";
    case PGQ_SQL_ERROR: return "sql_error";
    case PGQ_CONN_LOST: return "conn_lost";
    case PGQ_SHUTDOWN: return "shutdown";
    }
    return "?";
}

/* Runs q's callback once and frees q. */
static void run_callback(pgpool *p, pgq *q, pgpool_reply *r)
{
    r->elapsed_ms = pgpool_now_ms() - q->enqueued_ms;
    if (!r->fence)
        r->fence = "";
    if (r->status == PGQ_SQL_ERROR)
        p->st.errors++;
    else if (r->status == PGQ_CONN_LOST)
        p->st.conn_lost++;
    log_debug("pgpool event=query_done query=%llu status=%s sent=%d nresults=%d sqlstate=%s "
              "elapsed_ms=%.2f", (unsigned long long)q->id, status_name(r->status), (int)r->sent,
              r->nresults, r->sqlstate, r->elapsed_ms);
    p->depth++;
    q->cb(r, q->arg);
    p->depth--;
    free(q);
}

/* run_callback(), then true if the callback freed the pool. */
PC_MUSTCHECK static bool finish_query(pgpool *p, pgq *q, pgpool_reply *r)
{
    run_callback(p, q, r);
    return pool_reap(p);
}

static void pool_wake_waiting(pgpool *p)
{
    for (int i = 0; i < p->cfg.size; i++)
        pgpool_conn_wake(&p->conns[i]);
}

/* Notices an up <-> down change: on down, fails every queued query, then
 * tells the state callback. On up, the slots still waiting for their
 * reconnect backoff try at once: the server is back (after a restart or a
 * failover), so the pool fills now rather than one slot at a time. */
PC_MUSTCHECK static bool pool_updown(pgpool *p)
{
    bool up = pool_is_up(p);
    if (p->closing || up == p->notified_up)
        return false;
    p->notified_up = up;
    if (up) {
        log_notice("pgpool event=pool_up connected=%d size=%d", pgpool_connected(p), p->cfg.size);
        pool_wake_waiting(p);
    } else {
        log_warn("pgpool event=pool_down size=%d failed_queued=%d", p->cfg.size, p->nqueued);
        pgq *q;
        while ((q = queue_pop(p))) {
            pgpool_reply r = { .status = PGQ_CONN_LOST, .sqlstate = "",
                               .errmsg = "no database connection is up", .sent = false };
            if (finish_query(p, q, &r))
                return true;
        }
    }
    if (p->state_cb) {
        p->depth++;
        p->state_cb(up, p->state_arg);
        p->depth--;
        if (pool_reap(p))
            return true;
    }
    return false;
}

/* The connection broke (or we gave up on it): the running query, if any, gets
 * PGQ_CONN_LOST with sent=true, the slot waits for its reconnect. */
PC_MUSTCHECK static bool conn_lost(pconn *c)
{
    pgpool *p = c->pool;
    char why[PGPOOL_ERRBUF_LEN];
    char sqlstate[6] = "";
    pgq *q = c->q;
    if (c->state == CONN_SETUP) {
        /* Not up yet: a failed connect attempt, not a disconnect. */
        snprintf(why, sizeof(why), "%s", c->err_msg ? c->err_msg : c->pg ? PQerrorMessage(c->pg) : "connection lost");
        pgpool_conn_attempt_failed(c, why);
        return false;
    }
    if (c->lost_why)
        pgpool_squash(c->lost_why, why, sizeof(why));
    else if (c->err_msg)    /* e.g. "terminating connection due to administrator command" */
        pgpool_squash(c->err_msg, why, sizeof(why));
    else
        pgpool_squash(c->pg ? PQerrorMessage(c->pg) : "no connection", why, sizeof(why));
    if (!why[0])
        pgpool_squash("connection lost", why, sizeof(why));
    if (c->err_state)
        snprintf(sqlstate, sizeof(sqlstate), "%s", c->err_state);
    log_warn("pgpool event=conn_lost conn=%d state=%s query=%llu error=\"%s\"", c->id,
             pgpool_conn_state_name(c->state), q ? (unsigned long long)q->id : 0ULL, why);
    p->st.disconnects++;
    c->q = NULL;
    pgpool_conn_host_lost(c);
    pgpool_conn_close(c);
    c->failures = 0;
    pgpool_conn_schedule_reconnect(c);
    if (q) {
        pgpool_reply r = { .status = PGQ_CONN_LOST, .sqlstate = sqlstate, .errmsg = why,
                           .sent = true, .fence = c->fence };
        if (finish_query(p, q, &r))
            return true;
    }
    return pool_updown(p);
}

/* ---- queries ---- */

/* Starts flushing what libpq holds; false if the connection broke. */
static bool conn_flush(pconn *c)
{
    int r = PQflush(c->pg);
    if (r < 0)
        return false;
    c->flushing = r == 1;
    return pgpool_conn_watch(c, c->flushing ? (short)(EV_READ | EV_WRITE) : EV_READ);
}

/* Hands q (NULL: our own statement, ROLLBACK or the SETUP settings) to libpq;
 * false if the connection broke. */
static bool conn_submit(pconn *c, const pgq *q)
{
    int ok;
    if (!q)
        ok = PQsendQuery(c->pg, c->state == CONN_SETUP ? c->cx->setup_sql : "ROLLBACK");
    else if (q->nparams < 0)
        ok = PQsendQuery(c->pg, q->sql);
    else
        ok = PQsendQueryParams(c->pg, q->sql, q->nparams, NULL, q->params, NULL, NULL, 0);
    return ok && conn_flush(c);
}

/* Keeps one result; records the first error. False: give up on the connection. */
static bool conn_take_result(pconn *c, PGresult *r)
{
    switch (PQresultStatus(r)) {
    case PGRES_COPY_IN:
    case PGRES_COPY_OUT:
    case PGRES_COPY_BOTH:
        PQclear(r);
        c->lost_why = "COPY is not supported through pgpool; connection dropped";
        return false;
    case PGRES_FATAL_ERROR:
    case PGRES_NONFATAL_ERROR:
    case PGRES_BAD_RESPONSE:
        if (!c->err_msg) {
            const char *code = PQresultErrorField(r, PG_DIAG_SQLSTATE);
            const char *msg = PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY);
            c->err_state = code ? code : "";
            c->err_msg = msg ? msg : PQresultErrorMessage(r);
            if (!c->err_msg[0])
                c->err_msg = "unknown error";
        }
        break;
    default:
        break;
    }
    if (c->nres == c->res_cap) {
        int cap = c->res_cap ? c->res_cap * 2 : 8;
        PGresult **res = realloc(c->res, (size_t)cap * sizeof(*res));
        if (!res) {
            PQclear(r);
            c->lost_why = "out of memory collecting results; connection dropped";
            return false;
        }
        c->res = res;
        c->res_cap = cap;
    }
    c->res[c->nres++] = r;
    return true;
}

/* The caller's query finished (every result read, ReadyForQuery seen). */
PC_MUSTCHECK static bool conn_query_done(pconn *c)
{
    pgpool *p = c->pool;
    pgq *q = c->q;
    pgpool_reply r = {
        .status = c->err_msg ? PGQ_SQL_ERROR : PGQ_OK,
        .results = c->res,
        .nresults = c->nres,
        .sqlstate = c->err_state ? c->err_state : "",
        .errmsg = c->err_msg ? c->err_msg : "",
        .sent = true,
        .fence = c->fence,
    };
    c->q = NULL;
    if (finish_query(p, q, &r))
        return true;
    pgpool_conn_clear_results(c);  /* the results lived only through the callback */

    switch (PQtransactionStatus(c->pg)) {
    case PQTRANS_IDLE:
        pgpool_conn_set_state(c, CONN_IDLE);
        pool_kick(p);
        return false;
    case PQTRANS_INTRANS:
    case PQTRANS_INERROR:
        log_debug("pgpool event=rollback conn=%d", c->id);
        pgpool_conn_set_state(c, CONN_ROLLBACK);
        if (!conn_submit(c, NULL))
            return conn_lost(c);
        return false;
    default:
        c->lost_why = "connection in an unexpected transaction state after a query";
        return conn_lost(c);
    }
}

PC_MUSTCHECK static bool conn_rollback_done(pconn *c)
{
    pgpool *p = c->pool;
    if (c->err_msg || PQtransactionStatus(c->pg) != PQTRANS_IDLE) {
        char buf[PGPOOL_ERRBUF_LEN];
        log_warn("pgpool event=rollback_failed conn=%d sqlstate=%s error=\"%s\"", c->id,
                 c->err_state ? c->err_state : "", pgpool_squash(c->err_msg, buf, sizeof(buf)));
        c->lost_why = "ROLLBACK after a query failed; connection dropped";
        return conn_lost(c);
    }
    pgpool_conn_clear_results(c);
    pgpool_conn_set_state(c, CONN_IDLE);
    pool_kick(p);
    return false;
}

/* The SETUP statement finished: the slot is up, or the attempt failed. */
PC_MUSTCHECK static bool conn_setup_done(pconn *c)
{
    pgpool *p = c->pool;
    if (c->err_msg || PQtransactionStatus(c->pg) != PQTRANS_IDLE) {
        char why[PGPOOL_ERRBUF_LEN];
        snprintf(why, sizeof(why), "session settings failed: %s", c->err_msg ? c->err_msg : "left in a transaction");
        pgpool_conn_attempt_failed(c, why);
        return false;
    }
    pgpool_conn_clear_results(c);
    if (!pgpool_conn_setup_ok(c))
        return false;
    /* Up: it takes a queued query, and the pool may be up again. */
    pool_kick(p);
    return pool_updown(p);
}

/* Socket activity on a connection past PQconnectPoll. */
PC_MUSTCHECK static bool conn_io(pconn *c, short what)
{
    PGconn *pg = c->pg;
    PGnotify *n;
    bool done = false;

    if (what & EV_READ) {
        if (!PQconsumeInput(pg))
            return conn_lost(c);
        while ((n = PQnotifies(pg)))
            PQfreemem(n);
    }
    /* While output is pending, read-ready also calls for another flush. */
    if (c->flushing && !conn_flush(c))
        return conn_lost(c);
    if (PQstatus(pg) == CONNECTION_BAD)
        return conn_lost(c);
    if (c->state == CONN_IDLE)
        return false;

    while (!PQisBusy(pg)) {
        PGresult *r = PQgetResult(pg);
        if (!r) {
            done = true;
            break;
        }
        if (!conn_take_result(c, r))
            return conn_lost(c);
    }
    /* A dead connection also ends the result stream (libpq makes up an error). */
    if (PQstatus(pg) == CONNECTION_BAD)
        return conn_lost(c);
    if (!done)
        return false;
    switch (c->state) {
    case CONN_BUSY: return conn_query_done(c);
    case CONN_ROLLBACK: return conn_rollback_done(c);
    case CONN_SETUP: return conn_setup_done(c);
    default: return false;
    }
}

/* The socket event of every slot (pgpool_connector.io_cb). */
static void conn_io_cb(evutil_socket_t fd, short what, void *arg)
{
    pconn *c = arg;
    (void)fd;
    switch (c->state) {
    case CONN_CONNECTING:
        /* Connected: the session settings go first (conn_setup_done). */
        if (pgpool_conn_step(c) && !conn_submit(c, NULL))
            pgpool_conn_attempt_failed(c, PQerrorMessage(c->pg));
        break;
    case CONN_SETUP:
    case CONN_IDLE:
    case CONN_BUSY:
    case CONN_ROLLBACK:
        if (conn_io(c, what))
            return;    /* the pool is gone */
        break;
    default:
        break;
    }
}

static pconn *pool_idle_conn(pgpool *p)
{
    for (int i = 0; i < p->cfg.size; i++)
        if (p->conns[i].state == CONN_IDLE)
            return &p->conns[i];
    return NULL;
}

/* Starts queued queries on idle connections, oldest first. */
PC_MUSTCHECK static bool pool_dispatch(pgpool *p)
{
    pconn *c;
    while (!p->closing && p->head && (c = pool_idle_conn(p))) {
        /* A cheap probe: a connection whose server already went away must not
         * take a query it would then report as possibly sent. */
        if (!PQconsumeInput(c->pg) || PQstatus(c->pg) == CONNECTION_BAD) {
            if (conn_lost(c))
                return true;
            continue;
        }
        pgq *q = queue_pop(p);
        c->q = q;
        c->busy_since_ms = pgpool_now_ms();
        pgpool_conn_set_state(c, CONN_BUSY);
        log_debug("pgpool event=query_start conn=%d query=%llu nparams=%d queued_ms=%.2f", c->id,
                  (unsigned long long)q->id, q->nparams < 0 ? 0 : q->nparams,
                  pgpool_now_ms() - q->enqueued_ms);
        if (!conn_submit(c, q) && conn_lost(c))
            return true;
    }
    return false;
}

static void kick_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    if (pool_dispatch(arg))
        return;    /* the pool is gone */
}

/* ---- teardown ---- */

static void pool_destroy(pgpool *p)
{
    pgq *q;
    p->closing = true;
    p->depth++;    /* pgpool_free() from the callbacks below is a no-op */
    while ((q = queue_pop(p))) {
        pgpool_reply r = { .status = PGQ_SHUTDOWN, .sqlstate = "", .errmsg = "pool shut down",
                           .sent = false };
        run_callback(p, q, &r);
    }
    for (int i = 0; p->conns && i < p->cfg.size; i++) {
        pconn *c = &p->conns[i];
        if (!c->q)
            continue;
        q = c->q;
        c->q = NULL;
        pgpool_conn_clear_results(c);
        pgpool_reply r = { .status = PGQ_CONN_LOST, .sqlstate = "", .errmsg = "pool shut down",
                           .sent = true };
        run_callback(p, q, &r);
    }
    for (int i = 0; p->conns && i < p->cfg.size; i++)
        pgpool_conn_deinit(&p->conns[i]);
    if (p->kick)
        event_free(p->kick);
    pgpool_conn_params_free(&p->cx);
    free(p->conns);
    free(p);
}

/* ---- setup ---- */

static bool config_valid(const pgpool_config *cfg)
{
    const char *bad = NULL;
    if (cfg->size < 1)
        bad = "size";
    else if (cfg->max_queue < 0)
        bad = "max_queue";
    else if (cfg->connect_timeout_ms < 1)
        bad = "connect_timeout_ms";
    else if (cfg->reconnect_min_ms < 1)
        bad = "reconnect_min_ms";
    else if (cfg->reconnect_max_ms < cfg->reconnect_min_ms)
        bad = "reconnect_max_ms";
    if (bad)
        log_error("pgpool event=bad_config key=%s", bad);
    return !bad;
}

pgpool *pgpool_new(struct event_base *base, const pgpool_config *cfg)
{
    if (!base || !cfg || !config_valid(cfg))
        return NULL;
    pgpool *p = calloc(1, sizeof(*p));
    if (!p)
        return NULL;
    p->cfg = *cfg;
    p->cfg.conninfo = NULL;
    p->cfg.app_name = NULL;
    p->cx.base = base;
    p->cx.app_idx = -1;
    p->cx.connect_timeout_ms = cfg->connect_timeout_ms;
    p->cx.reconnect_min_ms = cfg->reconnect_min_ms;
    p->cx.reconnect_max_ms = cfg->reconnect_max_ms;
    p->cx.lock_timeout_ms = cfg->lock_timeout_ms;
    p->cx.io_cb = conn_io_cb;
    if (cfg->app_name && !(p->cx.app_name = strdup(cfg->app_name)))
        goto fail;
    p->conns = calloc((size_t)cfg->size, sizeof(*p->conns));
    p->kick = event_new(base, -1, 0, kick_cb, p);
    if (!p->conns || !p->kick)
        goto fail;
    for (int i = 0; i < cfg->size; i++)
        if (!pgpool_conn_init(&p->conns[i], &p->cx, p, i))
            goto fail;
    pgpool_tcp tcp = { .keepalives_idle_s = cfg->keepalives_idle_s, .keepalives_interval_s = cfg->keepalives_interval_s,
                       .keepalives_count = cfg->keepalives_count, .user_timeout_ms = cfg->tcp_user_timeout_ms };
    if (!pgpool_conn_params(&p->cx, cfg->conninfo, &tcp))
        goto fail;
    for (int i = 0; i < cfg->size; i++)
        pgpool_conn_start(&p->conns[i]);
    return p;
fail:
    log_error("pgpool event=setup_failed size=%d", cfg->size);
    p->closing = true;
    pool_destroy(p);
    return NULL;
}

void pgpool_free(pgpool *p)
{
    if (!p || p->closing)
        return;
    p->closing = true;
    if (p->depth > 0)
        return;    /* inside our callback: the frame that ran it reaps the pool */
    pool_destroy(p);
}

/* ---- submitting ---- */

static pgq *query_new(pgpool *p, const char *sql, int nparams, const char *const *values,
                      pgpool_cb cb, void *arg)
{
    size_t sql_len = strlen(sql) + 1;
    size_t size = sizeof(pgq) + sql_len;
    int np = nparams < 0 ? 0 : nparams;
    size += (size_t)np * sizeof(char *);
    for (int i = 0; i < np; i++)
        if (values && values[i])
            size += strlen(values[i]) + 1;
    pgq *q = malloc(size);
    if (!q)
        return NULL;
    const char **params = (const char **)(q + 1);
    char *s = (char *)(params + np);
    memset(q, 0, sizeof(*q));
    q->cb = cb;
    q->arg = arg;
    q->id = ++p->next_id;
    q->enqueued_ms = pgpool_now_ms();
    q->nparams = nparams;
    q->params = nparams < 0 ? NULL : params;
    for (int i = 0; i < np; i++) {
        if (!values || !values[i]) {
            params[i] = NULL;
            continue;
        }
        size_t l = strlen(values[i]) + 1;
        memcpy(s, values[i], l);
        params[i] = s;
        s += l;
    }
    memcpy(s, sql, sql_len);
    q->sql = s;
    return q;
}

static int pool_submit(pgpool *p, const char *sql, int nparams, const char *const *values,
                       pgpool_cb cb, void *arg)
{
    if (!p || !sql || !cb || nparams > PGPOOL_MAX_PARAMS)
        return PGPOOL_INVALID;
    if (!pool_is_up(p)) {
        p->st.rejected++;
        return PGPOOL_UNAVAILABLE;
    }
    if (p->nqueued - p->cx.nstate[CONN_IDLE] >= p->cfg.max_queue) {
        p->st.rejected++;
        log_debug("pgpool event=overloaded queued=%d max_queue=%d", p->nqueued, p->cfg.max_queue);
        return PGPOOL_OVERLOADED;
    }
    pgq *q = query_new(p, sql, nparams, values, cb, arg);
    if (!q) {
        log_error("pgpool event=query_rejected error=\"out of memory\"");
        p->st.rejected++;
        return PGPOOL_OVERLOADED;
    }
    if (p->tail)
        p->tail->next = q;
    else
        p->head = q;
    p->tail = q;
    p->nqueued++;
    if (p->nqueued > p->st.max_queued)
        p->st.max_queued = p->nqueued;
    p->st.queries++;
    pool_kick(p);    /* dispatch from the loop: never a callback from in here */
    return PGPOOL_QUEUED;
}

int pgpool_query(pgpool *p, const char *sql, pgpool_cb cb, void *arg)
{
    return pool_submit(p, sql, -1, NULL, cb, arg);
}

int pgpool_query_params(pgpool *p, const char *sql, int nparams, const char *const *values,
                        pgpool_cb cb, void *arg)
{
    if (nparams < 0 || (nparams > 0 && !values))
        return PGPOOL_INVALID;
    return pool_submit(p, sql, nparams, values, cb, arg);
}

/* ---- introspection ---- */

bool pgpool_is_up(const pgpool *p) { return p && pool_is_up(p); }
int pgpool_size(const pgpool *p) { return p->cfg.size; }
int pgpool_connected(const pgpool *p)
{
    return p->cx.nstate[CONN_IDLE] + p->cx.nstate[CONN_BUSY] + p->cx.nstate[CONN_ROLLBACK];
}
int pgpool_busy(const pgpool *p) { return p->cx.nstate[CONN_BUSY] + p->cx.nstate[CONN_ROLLBACK]; }
int pgpool_queued(const pgpool *p) { return p->nqueued; }

int pgpool_oldest_busy_ms(const pgpool *p)
{
    double now = pgpool_now_ms(), oldest = 0;
    for (int i = 0; i < p->cfg.size; i++)
        if (p->conns[i].state == CONN_BUSY && now - p->conns[i].busy_since_ms > oldest)
            oldest = now - p->conns[i].busy_since_ms;
    return (int)oldest;
}

void pgpool_wake(pgpool *p)
{
    if (p && !p->closing)
        pool_wake_waiting(p);
}

void pgpool_set_state_cb(pgpool *p, void (*cb)(bool up, void *arg), void *arg)
{
    p->state_cb = cb;
    p->state_arg = arg;
}

void pgpool_stats(const pgpool *p, pgpool_counters *out)
{
    *out = p->st;
    out->connect_failures = p->cx.connect_failures;
    out->reconnects = p->cx.reconnects;
}
