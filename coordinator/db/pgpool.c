/*
 * pgpool.c - a pool of PostgreSQL connections on libpq's asynchronous API
 * under libevent: nonblocking connect with a timeout and jittered backoff, a
 * FIFO query queue, ROLLBACK of transactions a caller left open, callbacks
 * only from the loop. Nothing here blocks the loop thread (see pgpool.h).
 *
 * Connection lifecycle (conn_set_state() is the only writer of c->state):
 *
 *   WAITING --timer--> CONNECTING --PQconnectPoll OK--> IDLE <--> BUSY
 *      ^                   |                              ^        |
 *      |  failure/timeout  |                              |        | left in a transaction
 *      +-------------------+                              +-- ROLLBACK
 *      +--------- lost (EOF, send/recv error) from IDLE, BUSY, ROLLBACK
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
#include "backoff.h"
#include "log.h"
#include "rng.h"

#include <event2/event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define PGPOOL_MAX_PARAMS 65535  /* protocol limit (16-bit count) */
#define ERRBUF_LEN 512

typedef enum {
    CONN_WAITING,    /* no PGconn; the reconnect timer is pending */
    CONN_CONNECTING, /* PQconnectPoll in progress; the connect timeout is armed */
    CONN_IDLE,       /* up, ready for a query */
    CONN_BUSY,       /* running a caller's query (c->q) */
    CONN_ROLLBACK,   /* running our own ROLLBACK after a caller left a transaction open */
    CONN_NSTATES
} conn_state;

static const char *const conn_state_names[CONN_NSTATES] = {
    [CONN_WAITING] = "waiting",
    [CONN_CONNECTING] = "connecting",
    [CONN_IDLE] = "idle",
    [CONN_BUSY] = "busy",
    [CONN_ROLLBACK] = "rollback",
};

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

typedef struct pconn {
    pgpool *pool;
    int id;
    conn_state state;
    PGconn *pg;
    struct event *io;       /* socket event; re-created whenever the fd or the interest changes */
    evutil_socket_t io_fd;
    short io_what;
    struct event *timer;    /* connect timeout (CONNECTING) or reconnect delay (WAITING) */
    pgq *q;                 /* the caller's query while BUSY */
    bool flushing;          /* PQflush returned 1: also waiting for EV_WRITE */
    PGresult **res;         /* results of the running query, in order */
    int nres, res_cap;
    const char *err_state;  /* first error's SQLSTATE and message; point into res[] */
    const char *err_msg;
    const char *lost_why;   /* set when we give up on the connection ourselves */
    int failures;           /* consecutive failed attempts: the backoff exponent */
    bool ever_up;
    double attempt_ms;      /* when the current connect attempt started */
    double busy_since_ms;   /* when the running query was handed to libpq */
    char fence[96];         /* application_name of the current session ("" before any) */
} pconn;

struct pgpool {
    struct event_base *base;
    pgpool_config cfg;      /* conninfo not kept: see kw/val */
    const char **kw;        /* PQconnectStartParams arrays, NULL-terminated, owned */
    const char **val;
    int app_idx;            /* index of application_name in kw/val (-1: none); its value is set per attempt */
    char *app_name;         /* the prefix of fence tokens */
    pconn *conns;
    int nstate[CONN_NSTATES];
    pgq *head, *tail;
    int nqueued;
    struct event *kick;     /* activated to dispatch queued queries from the loop */
    void (*state_cb)(bool up, void *arg);
    void *state_arg;
    bool notified_up;       /* the up/down state the state callback last saw */
    bool closing;           /* pgpool_free() called: refuse new queries */
    int depth;              /* user callbacks on the stack */
    uint64_t next_id;
    pgpool_counters st;
};

static void conn_io_cb(evutil_socket_t fd, short what, void *arg);

/* ---- small helpers ---- */

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static struct timeval ms_to_tv(int ms)
{
    struct timeval tv = { .tv_sec = ms / 1000, .tv_usec = (ms % 1000) * 1000 };
    return tv;
}

/* Copies in to out as one line for a quoted log value: whitespace runs become
 * one space, double quotes become single ones, trimmed. Returns out. */
static const char *squash(const char *in, char *out, size_t outlen)
{
    size_t n = 0;
    bool space = false;
    if (!in)
        in = "";
    for (; *in && n + 1 < outlen; in++) {
        char ch = *in;
        if (ch == '\n' || ch == '\r' || ch == '\t' || ch == ' ') {
            space = n > 0;
            continue;
        }
        if (space && n + 2 < outlen)
            out[n++] = ' ';
        space = false;
        out[n++] = ch == '"' ? '\'' : ch;
    }
    out[n] = '\0';
    return out;
}

/* Reconnect delay after `failures` consecutive failed attempts: the one
 * backoff rule (base/backoff.h) from 2 * reconnect_min_ms up to
 * reconnect_max_ms, so connections dropped together do not come back
 * together; never below reconnect_min_ms. */
static int reconnect_delay_ms(pgpool *p, int failures)
{
    int delay = backoff_ms((int64_t)p->cfg.reconnect_min_ms * 2, failures, p->cfg.reconnect_max_ms);
    return delay < p->cfg.reconnect_min_ms ? p->cfg.reconnect_min_ms : delay;
}

static bool pool_is_up(const pgpool *p)
{
    return !p->closing &&
           p->nstate[CONN_IDLE] + p->nstate[CONN_BUSY] + p->nstate[CONN_ROLLBACK] > 0;
}

static void pool_kick(pgpool *p)
{
    if (!p->closing && p->head && p->nstate[CONN_IDLE] > 0)
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

/* ---- connection state ---- */

static void conn_set_state(pconn *c, conn_state to)
{
    pgpool *p = c->pool;
    if (c->state == to)
        return;
    log_debug("pgpool event=state conn=%d from=%s to=%s", c->id, conn_state_names[c->state],
              conn_state_names[to]);
    p->nstate[c->state]--;
    p->nstate[to]++;
    c->state = to;
}

static void conn_clear_results(pconn *c)
{
    for (int i = 0; i < c->nres; i++)
        PQclear(c->res[i]);
    c->nres = 0;
    c->err_state = NULL;
    c->err_msg = NULL;
}

/* Drops the PGconn and its socket event (the event first: libpq closes the fd). */
static void conn_close(pconn *c)
{
    if (c->io) {
        event_free(c->io);
        c->io = NULL;
    }
    if (c->timer)
        evtimer_del(c->timer);
    conn_clear_results(c);
    c->flushing = false;
    c->lost_why = NULL;
    if (c->pg) {
        PQfinish(c->pg);
        c->pg = NULL;
    }
}

/* Watches the connection's socket for `what` (plus EV_PERSIST). While
 * connecting, libpq may have switched to a new socket that got the old fd
 * number, so the event is re-created at every step there. */
static bool conn_watch(pconn *c, short what)
{
    evutil_socket_t fd = PQsocket(c->pg);
    if (c->io && c->io_fd == fd && c->io_what == what && c->state != CONN_CONNECTING)
        return true;
    if (c->io) {
        event_free(c->io);
        c->io = NULL;
    }
    if (fd < 0)
        return false;
    c->io = event_new(c->pool->base, fd, (short)(what | EV_PERSIST), conn_io_cb, c);
    if (!c->io)
        return false;
    if (event_add(c->io, NULL) != 0) {
        event_free(c->io);
        c->io = NULL;
        return false;
    }
    c->io_fd = fd;
    c->io_what = what;
    return true;
}

static void conn_schedule_reconnect(pconn *c)
{
    pgpool *p = c->pool;
    int delay = reconnect_delay_ms(p, c->failures);
    struct timeval tv = ms_to_tv(delay);
    conn_set_state(c, CONN_WAITING);
    evtimer_add(c->timer, &tv);
    log_info("pgpool event=reconnect_scheduled conn=%d delay_ms=%d failures=%d", c->id, delay,
             c->failures);
}

static void conn_attempt_failed(pconn *c, const char *why)
{
    pgpool *p = c->pool;
    char buf[ERRBUF_LEN];
    p->st.connect_failures++;
    c->failures++;
    log_warn("pgpool event=connect_failed conn=%d failures=%d elapsed_ms=%.0f error=\"%s\"", c->id,
             c->failures, now_ms() - c->attempt_ms, squash(why, buf, sizeof(buf)));
    conn_close(c);
    conn_schedule_reconnect(c);
}

/* Forwards server notices and warnings to our log instead of libpq's stderr. */
static void conn_notice(void *arg, const PGresult *res)
{
    const pconn *c = arg;
    const char *sev = PQresultErrorField(res, PG_DIAG_SEVERITY_NONLOCALIZED);
    const char *code = PQresultErrorField(res, PG_DIAG_SQLSTATE);
    char buf[ERRBUF_LEN];
    squash(PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY), buf, sizeof(buf));
    /* An ERROR or FATAL here is the server saying why it closes an idle session. */
    if (sev && (strcmp(sev, "WARNING") == 0 || strcmp(sev, "ERROR") == 0 ||
                strcmp(sev, "FATAL") == 0 || strcmp(sev, "PANIC") == 0))
        log_warn("pgpool event=server_notice conn=%d severity=%s sqlstate=%s msg=\"%s\"", c->id,
                 sev, code ? code : "", buf);
    else
        log_debug("pgpool event=server_notice conn=%d severity=%s sqlstate=%s msg=\"%s\"", c->id,
                  sev ? sev : "", code ? code : "", buf);
}

static void conn_start(pconn *c)
{
    pgpool *p = c->pool;
    struct timeval tv = ms_to_tv(p->cfg.connect_timeout_ms);
    c->attempt_ms = now_ms();
    if (p->app_idx >= 0) {
        /* A fresh token per session: a lost session can be found (and
         * terminated) by it, and no later session shares it. */
        snprintf(c->fence, sizeof(c->fence), "%s/%016llx", p->app_name, (unsigned long long)rng_next());
        p->val[p->app_idx] = c->fence;
    }
    c->pg = PQconnectStartParams(p->kw, p->val, 0);
    if (p->app_idx >= 0)
        p->val[p->app_idx] = NULL;
    if (!c->pg) {
        conn_attempt_failed(c, "out of memory");
        return;
    }
    PQsetNoticeReceiver(c->pg, conn_notice, c);
    if (PQstatus(c->pg) == CONNECTION_BAD) {
        conn_attempt_failed(c, PQerrorMessage(c->pg));
        return;
    }
    conn_set_state(c, CONN_CONNECTING);
    evtimer_add(c->timer, &tv);
    /* Before the first PQconnectPoll, behave as if it had said WRITING. */
    if (!conn_watch(c, EV_WRITE))
        conn_attempt_failed(c, "cannot watch the socket");
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
    r->elapsed_ms = now_ms() - q->enqueued_ms;
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

/* Notices an up <-> down change: on down, fails every queued query, then
 * tells the state callback. */
PC_MUSTCHECK static bool pool_updown(pgpool *p)
{
    bool up = pool_is_up(p);
    if (p->closing || up == p->notified_up)
        return false;
    p->notified_up = up;
    if (up) {
        log_notice("pgpool event=pool_up connected=%d size=%d", pgpool_connected(p), p->cfg.size);
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
    char why[ERRBUF_LEN];
    char sqlstate[6] = "";
    pgq *q = c->q;
    if (c->lost_why)
        squash(c->lost_why, why, sizeof(why));
    else if (c->err_msg)    /* e.g. "terminating connection due to administrator command" */
        squash(c->err_msg, why, sizeof(why));
    else
        squash(c->pg ? PQerrorMessage(c->pg) : "no connection", why, sizeof(why));
    if (!why[0])
        squash("connection lost", why, sizeof(why));
    if (c->err_state)
        snprintf(sqlstate, sizeof(sqlstate), "%s", c->err_state);
    log_warn("pgpool event=conn_lost conn=%d state=%s query=%llu error=\"%s\"", c->id,
             conn_state_names[c->state], q ? (unsigned long long)q->id : 0ULL, why);
    p->st.disconnects++;
    c->q = NULL;
    conn_close(c);
    c->failures = 0;
    conn_schedule_reconnect(c);
    if (q) {
        pgpool_reply r = { .status = PGQ_CONN_LOST, .sqlstate = sqlstate, .errmsg = why,
                           .sent = true, .fence = c->fence };
        if (finish_query(p, q, &r))
            return true;
    }
    return pool_updown(p);
}

/* ---- connecting ---- */

PC_MUSTCHECK static bool conn_established(pconn *c)
{
    pgpool *p = c->pool;
    const char *scs = PQparameterStatus(c->pg, "standard_conforming_strings");
    const char *enc = PQparameterStatus(c->pg, "client_encoding");
    char buf[ERRBUF_LEN];

    evtimer_del(c->timer);
    if (!scs || strcmp(scs, "on") != 0 || !enc || strcmp(enc, "UTF8") != 0) {
        snprintf(buf, sizeof(buf), "server runs standard_conforming_strings=%s client_encoding=%s; "
                 "need on and UTF8", scs ? scs : "?", enc ? enc : "?");
        conn_attempt_failed(c, buf);
        return false;
    }
    if (PQsetnonblocking(c->pg, 1) != 0) {
        conn_attempt_failed(c, PQerrorMessage(c->pg));
        return false;
    }
    if (!conn_watch(c, EV_READ)) {
        conn_attempt_failed(c, "cannot watch the socket");
        return false;
    }
    if (c->ever_up)
        p->st.reconnects++;
    c->ever_up = true;
    c->failures = 0;
    log_info("pgpool event=connect_ok conn=%d backend_pid=%d server_version=%d host=%s "
             "elapsed_ms=%.1f", c->id, PQbackendPID(c->pg), PQserverVersion(c->pg),
             squash(PQhost(c->pg), buf, sizeof(buf)), now_ms() - c->attempt_ms);
    conn_set_state(c, CONN_IDLE);
    pool_kick(p);
    return pool_updown(p);
}

/* One PQconnectPoll step; the socket may be a new one after each. */
PC_MUSTCHECK static bool conn_connect_step(pconn *c)
{
    switch (PQconnectPoll(c->pg)) {
    case PGRES_POLLING_READING:
        if (!conn_watch(c, EV_READ))
            conn_attempt_failed(c, "cannot watch the socket");
        return false;
    case PGRES_POLLING_WRITING:
    case PGRES_POLLING_ACTIVE:  /* unused by libpq; "call again" */
        if (!conn_watch(c, EV_WRITE))
            conn_attempt_failed(c, "cannot watch the socket");
        return false;
    case PGRES_POLLING_OK:
        return conn_established(c);
    case PGRES_POLLING_FAILED:
        break;
    }
    conn_attempt_failed(c, PQerrorMessage(c->pg));
    return false;
}

static void conn_timer_cb(evutil_socket_t fd, short what, void *arg)
{
    pconn *c = arg;
    char buf[96];
    (void)fd;
    (void)what;
    if (c->state == CONN_WAITING) {
        conn_start(c);
    } else if (c->state == CONN_CONNECTING) {
        snprintf(buf, sizeof(buf), "timeout after %d ms", c->pool->cfg.connect_timeout_ms);
        conn_attempt_failed(c, buf);
    }
}

/* ---- queries ---- */

/* Starts flushing what libpq holds; false if the connection broke. */
static bool conn_flush(pconn *c)
{
    int r = PQflush(c->pg);
    if (r < 0)
        return false;
    c->flushing = r == 1;
    return conn_watch(c, c->flushing ? (short)(EV_READ | EV_WRITE) : EV_READ);
}

/* Hands q (NULL: our ROLLBACK) to libpq; false if the connection broke. */
static bool conn_submit(pconn *c, const pgq *q)
{
    int ok;
    if (!q)
        ok = PQsendQuery(c->pg, "ROLLBACK");
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
    conn_clear_results(c);  /* the results lived only through the callback */

    switch (PQtransactionStatus(c->pg)) {
    case PQTRANS_IDLE:
        conn_set_state(c, CONN_IDLE);
        pool_kick(p);
        return false;
    case PQTRANS_INTRANS:
    case PQTRANS_INERROR:
        log_debug("pgpool event=rollback conn=%d", c->id);
        conn_set_state(c, CONN_ROLLBACK);
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
        char buf[ERRBUF_LEN];
        log_warn("pgpool event=rollback_failed conn=%d sqlstate=%s error=\"%s\"", c->id,
                 c->err_state ? c->err_state : "", squash(c->err_msg, buf, sizeof(buf)));
        c->lost_why = "ROLLBACK after a query failed; connection dropped";
        return conn_lost(c);
    }
    conn_clear_results(c);
    conn_set_state(c, CONN_IDLE);
    pool_kick(p);
    return false;
}

/* Socket activity on an up connection. */
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
    return c->state == CONN_BUSY ? conn_query_done(c) : conn_rollback_done(c);
}

static void conn_io_cb(evutil_socket_t fd, short what, void *arg)
{
    pconn *c = arg;
    (void)fd;
    switch (c->state) {
    case CONN_CONNECTING:
        if (conn_connect_step(c))
            return;    /* the pool is gone */
        break;
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
        c->busy_since_ms = now_ms();
        conn_set_state(c, CONN_BUSY);
        log_debug("pgpool event=query_start conn=%d query=%llu nparams=%d queued_ms=%.2f", c->id,
                  (unsigned long long)q->id, q->nparams < 0 ? 0 : q->nparams,
                  now_ms() - q->enqueued_ms);
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
        conn_clear_results(c);
        pgpool_reply r = { .status = PGQ_CONN_LOST, .sqlstate = "", .errmsg = "pool shut down",
                           .sent = true };
        run_callback(p, q, &r);
    }
    for (int i = 0; p->conns && i < p->cfg.size; i++) {
        pconn *c = &p->conns[i];
        conn_close(c);
        if (c->timer)
            event_free(c->timer);
        free(c->res);
    }
    if (p->kick)
        event_free(p->kick);
    if (p->kw) {
        for (int i = 0; p->kw[i]; i++) {
            free((char *)p->kw[i]);
            if (i != p->app_idx)
                free((char *)p->val[i]);
        }
    }
    free(p->app_name);
    free(p->kw);
    free(p->val);
    free(p->conns);
    free(p);
}

/* ---- setup ---- */

static bool kw_add(pgpool *p, int *n, const char *k, const char *v)
{
    char *kc = strdup(k), *vc = strdup(v);
    if (!kc || !vc) {
        free(kc);
        free(vc);
        return false;
    }
    p->kw[*n] = kc;
    p->val[*n] = vc;
    (*n)++;
    return true;
}

/* Turns the conninfo into PQconnectStartParams arrays with our forced settings. */
static bool pool_build_params(pgpool *p, const char *conninfo)
{
    static const char scs_opt[] = "-c standard_conforming_strings=on";
    char lt_opt[48] = "";
    char *err = NULL, *options = NULL;
    char buf[ERRBUF_LEN];
    bool ok = false, have_fallback = false;
    const char *user_options = NULL;
    size_t nopts = 0;
    int n = 0;

    PQconninfoOption *opts = PQconninfoParse(conninfo ? conninfo : "", &err);
    if (!opts) {
        log_error("pgpool event=bad_conninfo error=\"%s\"",
                  squash(err ? err : "out of memory", buf, sizeof(buf)));
        goto out;
    }
    for (PQconninfoOption *o = opts; o->keyword; o++)
        nopts++;
    p->kw = calloc(nopts + 6, sizeof(*p->kw));
    p->val = calloc(nopts + 6, sizeof(*p->val));
    if (!p->kw || !p->val)
        goto oom;
    for (PQconninfoOption *o = opts; o->keyword; o++) {
        if (!o->val || !o->val[0])
            continue;    /* libpq ignores empty values too */
        if (strcmp(o->keyword, "options") == 0) {
            user_options = o->val;
            continue;
        }
        if (strcmp(o->keyword, "client_encoding") == 0)
            continue;    /* forced below */
        if (strcmp(o->keyword, "fallback_application_name") == 0)
            have_fallback = true;
        if (p->cfg.app_name && strcmp(o->keyword, "application_name") == 0)
            continue;    /* the fence token takes its place */
        if (!kw_add(p, &n, o->keyword, o->val))
            goto oom;
    }
    /* An explicit "options" hides PGOPTIONS, so carry it over. */
    if (!user_options)
        user_options = getenv("PGOPTIONS");
    if (!user_options)
        user_options = "";
    if (p->cfg.lock_timeout_ms > 0)
        snprintf(lt_opt, sizeof(lt_opt), " -c lock_timeout=%dms", p->cfg.lock_timeout_ms);
    size_t len = strlen(user_options) + sizeof(scs_opt) + strlen(lt_opt) + 1;
    options = malloc(len);
    if (!options)
        goto oom;
    snprintf(options, len, "%s%s%s%s", user_options, user_options[0] ? " " : "", scs_opt, lt_opt);
    if (!kw_add(p, &n, "options", options) || !kw_add(p, &n, "client_encoding", "UTF8"))
        goto oom;
    if (!have_fallback && !kw_add(p, &n, "fallback_application_name", "paycoord"))
        goto oom;
    if (p->cfg.app_name) {
        /* The value is filled in per connection attempt (conn_start). */
        if (!kw_add(p, &n, "application_name", ""))
            goto oom;
        p->app_idx = n - 1;
        free((char *)p->val[p->app_idx]);
        p->val[p->app_idx] = NULL;
    }
    ok = true;
    goto out;
oom:
    log_error("pgpool event=setup_failed error=\"out of memory\"");
out:
    free(options);
    if (opts)
        PQconninfoFree(opts);
    if (err)
        PQfreemem(err);
    return ok;
}

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
    p->base = base;
    p->cfg = *cfg;
    p->cfg.conninfo = NULL;
    p->app_idx = -1;
    if (cfg->app_name && !(p->app_name = strdup(cfg->app_name)))
        goto fail;
    p->cfg.app_name = p->app_name;
    p->conns = calloc((size_t)cfg->size, sizeof(*p->conns));
    p->kick = event_new(base, -1, 0, kick_cb, p);
    if (!p->conns || !p->kick)
        goto fail;
    for (int i = 0; i < cfg->size; i++) {
        pconn *c = &p->conns[i];
        c->pool = p;
        c->id = i;
        c->state = CONN_WAITING;
        p->nstate[CONN_WAITING]++;
        c->timer = evtimer_new(base, conn_timer_cb, c);
        if (!c->timer)
            goto fail;
    }
    if (!pool_build_params(p, cfg->conninfo))
        goto fail;
    for (int i = 0; i < cfg->size; i++)
        conn_start(&p->conns[i]);
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
    q->enqueued_ms = now_ms();
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
    if (p->nqueued - p->nstate[CONN_IDLE] >= p->cfg.max_queue) {
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
    return p->nstate[CONN_IDLE] + p->nstate[CONN_BUSY] + p->nstate[CONN_ROLLBACK];
}
int pgpool_busy(const pgpool *p) { return p->nstate[CONN_BUSY] + p->nstate[CONN_ROLLBACK]; }
int pgpool_queued(const pgpool *p) { return p->nqueued; }

int pgpool_oldest_busy_ms(const pgpool *p)
{
    double now = now_ms(), oldest = 0;
    for (int i = 0; i < p->cfg.size; i++)
        if (p->conns[i].state == CONN_BUSY && now - p->conns[i].busy_since_ms > oldest)
            oldest = now - p->conns[i].busy_since_ms;
    return (int)oldest;
}

void pgpool_set_state_cb(pgpool *p, void (*cb)(bool up, void *arg), void *arg)
{
    p->state_cb = cb;
    p->state_arg = arg;
}

void pgpool_stats(const pgpool *p, pgpool_counters *out)
{
    *out = p->st;
}
