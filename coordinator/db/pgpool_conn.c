/* pgpool_conn.c - one slot of the pool (pgpool_conn.h): nonblocking connect
 * with a timeout, socket watch, server notices, jittered reconnect; and the
 * conninfo as libpq keyword arrays with the settings every session needs. */
#include "pgpool_conn.h"
#include "backoff.h"
#include "log.h"
#include "loop.h"
#include "rng.h"

#include <event2/event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* With a multi-host conninfo, the host (and port) that attempts list first,
 * any pool's: the one that last took a connection, or, once a connection to
 * it broke, the next one in the list (a standby that refuses a read-write
 * session costs one quick round trip; a host that vanished would cost every
 * attempt its tcp_user_timeout). After a failover the first connection that
 * reaches the new primary makes every later attempt go there directly. */
static char first_host[256], first_port[32];

static const char *const conn_state_names[CONN_NSTATES] = {
    [CONN_WAITING] = "waiting",
    [CONN_CONNECTING] = "connecting",
    [CONN_SETUP] = "setup",
    [CONN_IDLE] = "idle",
    [CONN_BUSY] = "busy",
    [CONN_ROLLBACK] = "rollback",
};

const char *pgpool_conn_state_name(conn_state s) { return conn_state_names[s]; }

/* ---- small helpers ---- */

double pgpool_now_ms(void)
{
    return (double)loop_now_us() / 1e3;
}

static struct timeval ms_to_tv(int ms)
{
    struct timeval tv = { .tv_sec = ms / 1000, .tv_usec = (ms % 1000) * 1000 };
    return tv;
}

const char *pgpool_squash(const char *in, char *out, size_t outlen)
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
static int reconnect_delay_ms(const pgpool_connector *cx, int failures)
{
    int delay = backoff_ms((int64_t)cx->reconnect_min_ms * 2, failures, cx->reconnect_max_ms);
    return delay < cx->reconnect_min_ms ? cx->reconnect_min_ms : delay;
}

/* ---- connection state ---- */

void pgpool_conn_set_state(pconn *c, conn_state to)
{
    pgpool_connector *cx = c->cx;
    if (c->state == to)
        return;
    log_debug("pgpool event=state conn=%d from=%s to=%s", c->id, conn_state_names[c->state],
              conn_state_names[to]);
    cx->nstate[c->state]--;
    cx->nstate[to]++;
    c->state = to;
}

void pgpool_conn_clear_results(pconn *c)
{
    for (int i = 0; i < c->nres; i++)
        PQclear(c->res[i]);
    c->nres = 0;
    c->err_state = NULL;
    c->err_msg = NULL;
}

/* Drops the PGconn and its socket event (the event first: libpq closes the fd). */
void pgpool_conn_close(pconn *c)
{
    if (c->io) {
        event_free(c->io);
        c->io = NULL;
    }
    if (c->timer)
        evtimer_del(c->timer);
    pgpool_conn_clear_results(c);
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
bool pgpool_conn_watch(pconn *c, short what)
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
    c->io = event_new(c->cx->base, fd, (short)(what | EV_PERSIST), c->cx->io_cb, c);
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

void pgpool_conn_schedule_reconnect(pconn *c)
{
    int delay = reconnect_delay_ms(c->cx, c->failures);
    struct timeval tv = ms_to_tv(delay);
    pgpool_conn_set_state(c, CONN_WAITING);
    evtimer_add(c->timer, &tv);
    log_info("pgpool event=reconnect_scheduled conn=%d delay_ms=%d failures=%d", c->id, delay,
             c->failures);
}

void pgpool_conn_attempt_failed(pconn *c, const char *why)
{
    char buf[PGPOOL_ERRBUF_LEN];
    c->cx->connect_failures++;
    c->failures++;
    log_warn("pgpool event=connect_failed conn=%d failures=%d elapsed_ms=%.0f error=\"%s\"", c->id,
             c->failures, pgpool_now_ms() - c->attempt_ms, pgpool_squash(why, buf, sizeof(buf)));
    pgpool_conn_close(c);
    pgpool_conn_schedule_reconnect(c);
}

/* Forwards server notices and warnings to our log instead of libpq's stderr. */
static void conn_notice(void *arg, const PGresult *res)
{
    const pconn *c = arg;
    const char *sev = PQresultErrorField(res, PG_DIAG_SEVERITY_NONLOCALIZED);
    const char *code = PQresultErrorField(res, PG_DIAG_SQLSTATE);
    char buf[PGPOOL_ERRBUF_LEN];
    pgpool_squash(PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY), buf, sizeof(buf));
    /* An ERROR or FATAL here is the server saying why it closes an idle session. */
    if (sev && (strcmp(sev, "WARNING") == 0 || strcmp(sev, "ERROR") == 0 ||
                strcmp(sev, "FATAL") == 0 || strcmp(sev, "PANIC") == 0))
        log_warn("pgpool event=server_notice conn=%d severity=%s sqlstate=%s msg=\"%s\"", c->id,
                 sev, code ? code : "", buf);
    else
        log_debug("pgpool event=server_notice conn=%d severity=%s sqlstate=%s msg=\"%s\"", c->id,
                  sev ? sev : "", code ? code : "", buf);
}

/* Host i of the lists: its name (or address) and port (NULL: the default). */
static void host_of(const pgpool_connector *cx, int i, const char **h, const char **p)
{
    const int nh = cx->list_n[PGPOOL_L_HOST], na = cx->list_n[PGPOOL_L_HOSTADDR], np = cx->list_n[PGPOOL_L_PORT];
    /* PQhost() answers the host name when one is given, else the address. */
    *h = nh == cx->nhosts ? cx->list_item[PGPOOL_L_HOST][i] : na == cx->nhosts ? cx->list_item[PGPOOL_L_HOSTADDR][i]
                                                                               : NULL;
    *p = np == cx->nhosts ? cx->list_item[PGPOOL_L_PORT][i] : np == 1 ? cx->list_item[PGPOOL_L_PORT][0] : NULL;
}

/* Which host of the lists comes first (-1: none known, or no lists). */
static int first_index(const pgpool_connector *cx)
{
    if (!first_host[0] || cx->nhosts < 2)
        return -1;
    for (int i = 0; i < cx->nhosts; i++) {
        const char *h, *p;
        host_of(cx, i, &h, &p);
        if (h && !strcmp(h, first_host) && (!p || !strcmp(p, first_port)))
            return i;
    }
    return -1;
}

void pgpool_conn_host_lost(const pconn *c)
{
    const pgpool_connector *cx = c->cx;
    int i = first_index(cx);
    const char *h = c->pg ? PQhost(c->pg) : NULL, *p = c->pg ? PQport(c->pg) : NULL;
    if (i < 0 || !h || !p || strcmp(h, first_host) != 0 || strcmp(p, first_port) != 0)
        return;
    const char *nh, *np;
    host_of(cx, (i + 1) % cx->nhosts, &nh, &np);
    if (!nh)
        return;
    snprintf(first_host, sizeof(first_host), "%s", nh);
    snprintf(first_port, sizeof(first_port), "%s", np ? np : p);
}

/* The conninfo's lists rotated to start at host k, into the slot's buffers
 * and cx->val (restored by the caller). False: leave them as they are. */
static bool rotate_lists(pconn *c, int k, const char *saved[PGPOOL_NLISTS])
{
    pgpool_connector *cx = c->cx;
    for (int l = 0; l < PGPOOL_NLISTS; l++) {
        int n = cx->list_n[l];
        saved[l] = NULL;
        if (cx->list_idx[l] < 0 || n != cx->nhosts)
            continue;            /* absent, or one value for every host */
        size_t used = 0;
        c->lists[l][0] = '\0';
        for (int j = 0; j < n; j++) {
            int w = snprintf(c->lists[l] + used, sizeof(c->lists[l]) - used, "%s%s", j ? "," : "",
                             cx->list_item[l][(k + j) % n]);
            if (w < 0 || (size_t)w >= sizeof(c->lists[l]) - used) {
                for (int r = 0; r < l; r++)         /* too long: no rotation at all */
                    if (saved[r])
                        cx->val[cx->list_idx[r]] = saved[r];
                return false;
            }
            used += (size_t)w;
        }
        saved[l] = cx->val[cx->list_idx[l]];
        cx->val[cx->list_idx[l]] = c->lists[l];
    }
    return true;
}

void pgpool_conn_start(pconn *c)
{
    pgpool_connector *cx = c->cx;
    const char *saved[PGPOOL_NLISTS] = { NULL, NULL, NULL };
    int k = first_index(cx);
    bool rotated = k > 0 && rotate_lists(c, k, saved);
    /* libpq tries the hosts of a multi-host conninfo in turn within one
     * attempt (a dead host over TCP fails after tcp_user_timeout), so each
     * host gets the connect timeout. */
    struct timeval tv = ms_to_tv(cx->connect_timeout_ms * cx->nhosts);
    c->attempt_ms = pgpool_now_ms();
    if (cx->app_idx >= 0) {
        /* A fresh token per session: a lost session can be found (and
         * terminated) by it, and no later session shares it. */
        snprintf(c->fence, sizeof(c->fence), "%s/%016llx", cx->app_name, (unsigned long long)rng_next());
        cx->val[cx->app_idx] = c->fence;
    }
    c->pg = PQconnectStartParams(cx->kw, cx->val, 0);
    if (cx->app_idx >= 0)
        cx->val[cx->app_idx] = NULL;
    for (int l = 0; rotated && l < PGPOOL_NLISTS; l++)
        if (saved[l])
            cx->val[cx->list_idx[l]] = saved[l];
    if (!c->pg) {
        pgpool_conn_attempt_failed(c, "out of memory");
        return;
    }
    PQsetNoticeReceiver(c->pg, conn_notice, c);
    if (PQstatus(c->pg) == CONNECTION_BAD) {
        pgpool_conn_attempt_failed(c, PQerrorMessage(c->pg));
        return;
    }
    pgpool_conn_set_state(c, CONN_CONNECTING);
    evtimer_add(c->timer, &tv);
    /* Before the first PQconnectPoll, behave as if it had said WRITING. */
    if (!pgpool_conn_watch(c, EV_WRITE))
        pgpool_conn_attempt_failed(c, "cannot watch the socket");
}

/* ---- connecting ---- */

/* PQconnectPoll said OK: the session settings come next (SETUP). True when
 * the slot is in SETUP. */
static bool conn_established(pconn *c)
{
    if (PQsetnonblocking(c->pg, 1) != 0) {
        pgpool_conn_attempt_failed(c, PQerrorMessage(c->pg));
        return false;
    }
    if (!pgpool_conn_watch(c, EV_READ)) {
        pgpool_conn_attempt_failed(c, "cannot watch the socket");
        return false;
    }
    pgpool_conn_set_state(c, CONN_SETUP);
    return true;
}

bool pgpool_conn_setup_ok(pconn *c)
{
    const char *scs = PQparameterStatus(c->pg, "standard_conforming_strings");
    const char *enc = PQparameterStatus(c->pg, "client_encoding");
    char buf[PGPOOL_ERRBUF_LEN];

    if (!scs || strcmp(scs, "on") != 0 || !enc || strcmp(enc, "UTF8") != 0) {
        snprintf(buf, sizeof(buf), "server runs standard_conforming_strings=%s client_encoding=%s; "
                 "need on and UTF8", scs ? scs : "?", enc ? enc : "?");
        pgpool_conn_attempt_failed(c, buf);
        return false;
    }
    evtimer_del(c->timer);
    if (c->cx->nhosts > 1) {
        snprintf(first_host, sizeof(first_host), "%s", PQhost(c->pg) ? PQhost(c->pg) : "");
        snprintf(first_port, sizeof(first_port), "%s", PQport(c->pg) ? PQport(c->pg) : "");
    }
    if (c->ever_up)
        c->cx->reconnects++;
    c->ever_up = true;
    c->failures = 0;
    log_info("pgpool event=connect_ok conn=%d backend_pid=%d server_version=%d host=%s port=%s "
             "elapsed_ms=%.1f", c->id, PQbackendPID(c->pg), PQserverVersion(c->pg),
             pgpool_squash(PQhost(c->pg), buf, sizeof(buf)), PQport(c->pg) ? PQport(c->pg) : "",
             pgpool_now_ms() - c->attempt_ms);
    pgpool_conn_set_state(c, CONN_IDLE);
    return true;
}

/* The socket may be a new one after each step. */
bool pgpool_conn_step(pconn *c)
{
    switch (PQconnectPoll(c->pg)) {
    case PGRES_POLLING_READING:
        if (!pgpool_conn_watch(c, EV_READ))
            pgpool_conn_attempt_failed(c, "cannot watch the socket");
        return false;
    case PGRES_POLLING_WRITING:
    case PGRES_POLLING_ACTIVE:  /* unused by libpq; "call again" */
        if (!pgpool_conn_watch(c, EV_WRITE))
            pgpool_conn_attempt_failed(c, "cannot watch the socket");
        return false;
    case PGRES_POLLING_OK:
        return conn_established(c);
    case PGRES_POLLING_FAILED:
        break;
    }
    pgpool_conn_attempt_failed(c, PQerrorMessage(c->pg));
    return false;
}

static void conn_timer_cb(evutil_socket_t fd, short what, void *arg)
{
    pconn *c = arg;
    char buf[96];
    (void)fd;
    (void)what;
    if (c->state == CONN_WAITING) {
        pgpool_conn_start(c);
    } else if (c->state == CONN_CONNECTING || c->state == CONN_SETUP) {
        snprintf(buf, sizeof(buf), "timeout after %d ms%s", c->cx->connect_timeout_ms * c->cx->nhosts,
                 c->state == CONN_SETUP ? " (session settings)" : "");
        pgpool_conn_attempt_failed(c, buf);
    }
}

void pgpool_conn_wake(pconn *c)
{
    if (c->state == CONN_CONNECTING && first_host[0] && c->pg) {
        const char *h = PQhost(c->pg), *p = PQport(c->pg);
        if (h && p && (strcmp(h, first_host) != 0 || strcmp(p, first_port) != 0)) {
            log_info("pgpool event=reconnect_now conn=%d was_trying=%s:%s now_first=%s:%s", c->id, h, p, first_host,
                     first_port);
            pgpool_conn_close(c);
            pgpool_conn_set_state(c, CONN_WAITING);
            pgpool_conn_start(c);
        }
        return;
    }
    if (c->state != CONN_WAITING)
        return;
    evtimer_del(c->timer);
    pgpool_conn_start(c);
}

/* ---- setup ---- */

static bool kw_add(pgpool_connector *cx, int *n, const char *k, const char *v)
{
    char *kc = strdup(k), *vc = strdup(v);
    if (!kc || !vc) {
        free(kc);
        free(vc);
        return false;
    }
    cx->kw[*n] = kc;
    cx->val[*n] = vc;
    (*n)++;
    return true;
}

/* Hosts of a conninfo: the longer of its host and hostaddr lists (libpq's rule). */
static int count_list(const char *v)
{
    int n = 1;
    for (; v && *v; v++)
        n += *v == ',';
    return n;
}

/* Keep the items of a comma-separated list (host, hostaddr, port). */
static bool split_list(pgpool_connector *cx, int l, int idx, const char *v)
{
    cx->list_idx[l] = idx;
    cx->list_n[l] = 0;
    while (cx->list_n[l] < PGPOOL_MAX_HOSTS) {
        const char *end = strchr(v, ',');
        size_t len = end ? (size_t)(end - v) : strlen(v);
        char *item = strndup(v, len);
        if (!item)
            return false;
        cx->list_item[l][cx->list_n[l]++] = item;
        if (!end)
            return true;
        v = end + 1;
    }
    /* More hosts than we rotate over: leave the list alone. */
    for (int i = 0; i < cx->list_n[l]; i++)
        free(cx->list_item[l][i]);
    cx->list_n[l] = 0;
    return true;
}

bool pgpool_conn_params(pgpool_connector *cx, const char *conninfo, const pgpool_tcp *tcp)
{
    static const char *const tcp_kw[4] = { "keepalives_idle", "keepalives_interval", "keepalives_count",
                                           "tcp_user_timeout" };
    int tcp_val[4] = { tcp ? tcp->keepalives_idle_s : 0, tcp ? tcp->keepalives_interval_s : 0,
                       tcp ? tcp->keepalives_count : 0, tcp ? tcp->user_timeout_ms : 0 };
    bool tcp_set[4] = { false, false, false, false };
    char *err = NULL;
    char buf[PGPOOL_ERRBUF_LEN];
    bool ok = false, have_fallback = false;
    size_t nopts = 0;
    int n = 0;

    cx->nhosts = 1;
    for (int l = 0; l < PGPOOL_NLISTS; l++) {
        cx->list_idx[l] = -1;
        cx->list_n[l] = 0;
    }
    PQconninfoOption *opts = PQconninfoParse(conninfo ? conninfo : "", &err);
    if (!opts) {
        log_error("pgpool event=bad_conninfo error=\"%s\"",
                  pgpool_squash(err ? err : "out of memory", buf, sizeof(buf)));
        goto out;
    }
    for (PQconninfoOption *o = opts; o->keyword; o++)
        nopts++;
    cx->kw = calloc(nopts + 10, sizeof(*cx->kw));
    cx->val = calloc(nopts + 10, sizeof(*cx->val));
    if (!cx->kw || !cx->val)
        goto oom;
    for (PQconninfoOption *o = opts; o->keyword; o++) {
        if (!o->val || !o->val[0])
            continue;    /* libpq ignores empty values too */
        if (strcmp(o->keyword, "client_encoding") == 0)
            continue;    /* forced below */
        if (strcmp(o->keyword, "fallback_application_name") == 0)
            have_fallback = true;
        if ((strcmp(o->keyword, "host") == 0 || strcmp(o->keyword, "hostaddr") == 0) &&
            count_list(o->val) > cx->nhosts)
            cx->nhosts = count_list(o->val);
        for (int i = 0; i < 4; i++)
            if (strcmp(o->keyword, tcp_kw[i]) == 0)
                tcp_set[i] = true;
        if (cx->app_name && strcmp(o->keyword, "application_name") == 0)
            continue;    /* the fence token takes its place */
        if (!kw_add(cx, &n, o->keyword, o->val))
            goto oom;
        int l = !strcmp(o->keyword, "host") ? PGPOOL_L_HOST : !strcmp(o->keyword, "hostaddr") ? PGPOOL_L_HOSTADDR
                : !strcmp(o->keyword, "port") ? PGPOOL_L_PORT : -1;
        if (l >= 0 && !split_list(cx, l, n - 1, o->val))
            goto oom;
    }
    /* Keepalives and tcp_user_timeout, so that a host that died without
     * closing its connections (power, network) is noticed within seconds
     * over TCP; ignored on Unix sockets. The conninfo's own values win. */
    for (int i = 0; i < 4; i++) {
        char v[16];
        if (tcp_set[i] || tcp_val[i] <= 0)
            continue;
        snprintf(v, sizeof(v), "%d", tcp_val[i]);
        if (!kw_add(cx, &n, tcp_kw[i], v))
            goto oom;
    }
    if (!kw_add(cx, &n, "client_encoding", "UTF8"))
        goto oom;
    if (!have_fallback && !kw_add(cx, &n, "fallback_application_name", "paycoord"))
        goto oom;
    if (cx->app_name) {
        /* The value is filled in per connection attempt (pgpool_conn_start). */
        if (!kw_add(cx, &n, "application_name", ""))
            goto oom;
        cx->app_idx = n - 1;
        free((char *)cx->val[cx->app_idx]);
        cx->val[cx->app_idx] = NULL;
    }
    /* Session settings as a statement, not as startup `options`: pgbouncer
     * refuses startup options, and a SET holds for the whole session in
     * its session pooling mode (the only one paycoord supports). */
    snprintf(buf, sizeof(buf), "SET standard_conforming_strings = on");
    if (cx->lock_timeout_ms > 0)
        snprintf(buf + strlen(buf), sizeof(buf) - strlen(buf), "; SET lock_timeout = '%dms'", cx->lock_timeout_ms);
    if (!(cx->setup_sql = strdup(buf)))
        goto oom;
    ok = true;
    goto out;
oom:
    log_error("pgpool event=setup_failed error=\"out of memory\"");
out:
    if (opts)
        PQconninfoFree(opts);
    if (err)
        PQfreemem(err);
    return ok;
}

void pgpool_conn_params_free(pgpool_connector *cx)
{
    if (cx->kw) {
        for (int i = 0; cx->kw[i]; i++) {
            free((char *)cx->kw[i]);
            if (i != cx->app_idx)
                free((char *)cx->val[i]);
        }
    }
    for (int l = 0; l < PGPOOL_NLISTS; l++) {
        for (int i = 0; i < cx->list_n[l]; i++)
            free(cx->list_item[l][i]);
        cx->list_n[l] = 0;
    }
    free(cx->app_name);
    free(cx->setup_sql);
    cx->setup_sql = NULL;
    free(cx->kw);
    free(cx->val);
    cx->app_name = NULL;
    cx->kw = cx->val = NULL;
}

/* ---- a slot's life ---- */

bool pgpool_conn_init(pconn *c, pgpool_connector *cx, struct pgpool *pool, int id)
{
    c->cx = cx;
    c->pool = pool;
    c->id = id;
    c->state = CONN_WAITING;
    cx->nstate[CONN_WAITING]++;
    c->timer = evtimer_new(cx->base, conn_timer_cb, c);
    return c->timer != NULL;
}

void pgpool_conn_deinit(pconn *c)
{
    pgpool_conn_close(c);
    if (c->timer)
        event_free(c->timer);
    c->timer = NULL;
    free(c->res);
    c->res = NULL;
}
