/*
 * ctl_conn.c - paycoordctl's two connections: NDJSON requests on the daemon's
 * Unix socket (docs/protocol.md), with one deadline for the whole command,
 * and, for `--db CONNINFO prepared`, pg_prepared_xacts read through libpq.
 */
#include "ctl.h"

#include "proto.h"

#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <libpq-fe.h>

#define CTL_LINE_MAX ((size_t)16 << 20)          /* longest answer line we accept */
#define CTL_READ_CHUNK ((size_t)64 << 10)

/* ------------------------------------------------------------------ the daemon connection */

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void ctl_reply_free(ctl_reply *r)
{
    cJSON_Delete(r->root);
    memset(r, 0, sizeof(*r));
}

void ctl_conn_init(ctl_conn *c, const char *path, int64_t timeout_ms)
{
    memset(c, 0, sizeof(*c));
    c->fd = -1;
    c->path = path;
    c->timeout_ms = timeout_ms;
    c->next_id = 1;
}

void ctl_conn_close(ctl_conn *c)
{
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
    free(c->buf);
    c->buf = NULL;
    for (size_t i = 0; i < c->nstash; i++)
        cJSON_Delete(c->stash[i]);
    c->nstash = 0;
}

static int conn_timed_out(const ctl_conn *c)
{
    ctl_err("no answer from the daemon at %s within %" PRId64 " ms (--timeout)", c->path, c->timeout_ms);
    return CTL_EXIT_UNREACHABLE;
}

/* Wait until fd is ready for events or the deadline passes: 1 ready, 0 timed
 * out, -1 error (errno set). */
static int wait_fd(int fd, short events, int64_t deadline)
{
    for (;;) {
        int64_t left = deadline - mono_ms();
        if (left <= 0)
            return 0;
        struct pollfd pfd = { .fd = fd, .events = events };
        int n = poll(&pfd, 1, left > 1000000 ? 1000000 : (int)left);
        if (n > 0)
            return 1;
        if (n < 0 && errno != EINTR)
            return -1;
    }
}

static int conn_open(ctl_conn *c) PC_MUSTCHECK;
static int conn_open(ctl_conn *c)
{
    struct sockaddr_un sa;
    memset(&sa, 0, sizeof(sa));
    sa.sun_family = AF_UNIX;
    size_t n = strlen(c->path);
    if (n == 0 || n >= sizeof(sa.sun_path)) {
        ctl_err("socket path must be 1-%zu bytes: %s", sizeof(sa.sun_path) - 1, c->path);
        return CTL_EXIT_USAGE;
    }
    memcpy(sa.sun_path, c->path, n + 1);
    c->deadline = mono_ms() + c->timeout_ms;
    c->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (c->fd < 0) {
        ctl_err("socket: %s", strerror(errno));
        return CTL_EXIT_UNREACHABLE;
    }
    for (;;) {
        if (connect(c->fd, (const struct sockaddr *)&sa, sizeof(sa)) == 0)
            return 0;
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN) {
            /* The listen backlog is full: the daemon is busy. Retry until the deadline. */
            if (mono_ms() >= c->deadline)
                return conn_timed_out(c);
            (void)poll(NULL, 0, 10);
            continue;
        }
        if (errno == EINPROGRESS) {
            int w = wait_fd(c->fd, POLLOUT, c->deadline);
            if (w == 0)
                return conn_timed_out(c);
            int soerr = 0;
            socklen_t sl = sizeof(soerr);
            if (w < 0 || getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) != 0)
                soerr = errno;
            if (soerr == 0)
                return 0;
            errno = soerr;
        }
        ctl_err("cannot connect to %s: %s (is paycoord running? --socket PATH or $PAYCOORD_SOCKET "
                "picks the socket)", c->path, strerror(errno));
        return CTL_EXIT_UNREACHABLE;
    }
}

/* req is an object holding "op" and the fields. */
int ctl_conn_send(ctl_conn *c, cJSON *req, int64_t *id_out)
{
    int64_t id = c->next_id++;
    if (!cJSON_AddNumberToObject(req, "id", (double)id))
        ctl_oom();
    char *text = cJSON_PrintUnformatted(req);
    cJSON_Delete(req);
    if (!text)
        ctl_oom();
    size_t n = strlen(text);
    char *line = realloc(text, n + 2);
    if (!line) {
        free(text);
        ctl_oom();
    }
    line[n++] = '\n';
    line[n] = '\0';
    int rc = 0;
    for (size_t sent = 0; sent < n;) {
        ssize_t w = send(c->fd, line + sent, n - sent, MSG_NOSIGNAL);
        if (w > 0) {
            sent += (size_t)w;
            c->sent = true;
            continue;
        }
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            int r = wait_fd(c->fd, POLLOUT, c->deadline);
            if (r > 0)
                continue;
            rc = r == 0 ? conn_timed_out(c) : CTL_EXIT_UNREACHABLE;
            if (r < 0)
                ctl_err("cannot send to %s: %s", c->path, strerror(errno));
            break;
        }
        ctl_err("cannot send to %s: %s", c->path, w < 0 ? strerror(errno) : "connection closed");
        rc = CTL_EXIT_UNREACHABLE;
        break;
    }
    free(line);
    *id_out = id;
    return rc;
}

/* Read the next line (without '\n' or a trailing '\r'). The line lives in
 * the connection's buffer until the next call. */
static int conn_read_line(ctl_conn *c, char **line, size_t *len) PC_MUSTCHECK;
static int conn_read_line(ctl_conn *c, char **line, size_t *len)
{
    for (;;) {
        char *start = c->buf + c->off;
        size_t have = c->len - c->off;
        char *nl = have > c->scan ? memchr(start + c->scan, '\n', have - c->scan) : NULL;
        if (nl) {
            size_t n = (size_t)(nl - start);
            *nl = '\0';
            if (n && start[n - 1] == '\r')
                start[--n] = '\0';
            *line = start;
            *len = n;
            c->off += (size_t)(nl - start) + 1;
            c->scan = 0;
            return 0;
        }
        c->scan = have;
        if (have > CTL_LINE_MAX) {
            ctl_err("answer from the daemon is longer than %zu bytes; giving up", CTL_LINE_MAX);
            return CTL_EXIT_UNREACHABLE;
        }
        if (c->off) {
            memmove(c->buf, c->buf + c->off, have);
            c->len = have;
            c->off = 0;
        }
        if (c->cap - c->len < CTL_READ_CHUNK + 1) {
            size_t cap = c->cap ? c->cap * 2 : CTL_READ_CHUNK * 2;
            while (cap - c->len < CTL_READ_CHUNK + 1)
                cap *= 2;
            char *nb = realloc(c->buf, cap);
            if (!nb)
                ctl_oom();
            c->buf = nb;
            c->cap = cap;
        }
        int w = wait_fd(c->fd, POLLIN, c->deadline);
        if (w == 0)
            return conn_timed_out(c);
        if (w < 0) {
            ctl_err("poll: %s", strerror(errno));
            return CTL_EXIT_UNREACHABLE;
        }
        ssize_t r = recv(c->fd, c->buf + c->len, c->cap - c->len - 1, 0);
        if (r > 0) {
            c->len += (size_t)r;
            continue;
        }
        if (r < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK))
            continue;
        ctl_err("the daemon closed the connection without answering%s%s",
                r < 0 ? ": " : "", r < 0 ? strerror(errno) : "");
        return CTL_EXIT_UNREACHABLE;
    }
}

/* Split a parsed answer into result or error; false when it breaks the
 * protocol's reply shape. Takes ownership of root. */
static bool reply_decode(cJSON *root, ctl_reply *out)
{
    memset(out, 0, sizeof(*out));
    out->root = root;
    const cJSON *ok = cJSON_GetObjectItemCaseSensitive(root, "ok");
    if (cJSON_IsTrue(ok)) {
        out->result = cJSON_GetObjectItemCaseSensitive(root, "result");
        return cJSON_IsObject(out->result);
    }
    if (!cJSON_IsFalse(ok))
        return false;
    const cJSON *e = cJSON_GetObjectItemCaseSensitive(root, "error");
    const cJSON *code = cJSON_GetObjectItemCaseSensitive(e, "code");
    const cJSON *msg = cJSON_GetObjectItemCaseSensitive(e, "message");
    if (!cJSON_IsString(code))
        return false;
    out->code = code->valuestring;
    out->message = cJSON_IsString(msg) ? msg->valuestring : "";
    return true;
}

static bool reply_id_is(const cJSON *root, int64_t id)
{
    const cJSON *rid = cJSON_GetObjectItemCaseSensitive(root, "id");
    return cJSON_IsNumber(rid) && rid->valuedouble == (double)id;
}

/* Answers carry the request's id and may come in any order; an answer with
 * id null (the daemon could not read our line) is taken as ours, since
 * nothing else is outstanding that it could belong to more than us. */
int ctl_conn_wait(ctl_conn *c, int64_t id, ctl_reply *out)
{
    for (size_t i = 0; i < c->nstash; i++) {
        if (reply_id_is(c->stash[i], id)) {
            cJSON *root = c->stash[i];
            c->stash[i] = c->stash[--c->nstash];
            (void)reply_decode(root, out);  /* checked when stashed */
            return 0;
        }
    }
    for (;;) {
        char *line;
        size_t len;
        int rc = conn_read_line(c, &line, &len);
        if (rc)
            return rc;
        if (len == 0)
            continue;
        cJSON *root = cJSON_ParseWithLength(line, len);
        if (!cJSON_IsObject(root)) {
            cJSON_Delete(root);
            ctl_err("unreadable answer from the daemon at %s (not a JSON object)", c->path);
            return CTL_EXIT_UNREACHABLE;
        }
        const cJSON *rid = cJSON_GetObjectItemCaseSensitive(root, "id");
        bool ours = !rid || cJSON_IsNull(rid) || reply_id_is(root, id);
        bool other = !ours && cJSON_IsNumber(rid) && rid->valuedouble >= 1 &&
                     rid->valuedouble < (double)c->next_id;
        ctl_reply tmp;
        if ((ours || other) && !reply_decode(root, &tmp)) {
            cJSON_Delete(root);
            ctl_err("malformed answer from the daemon at %s (no ok/result/error)", c->path);
            return CTL_EXIT_UNREACHABLE;
        }
        if (ours) {
            *out = tmp;
            return 0;
        }
        if (other && c->nstash < CTL_STASH_MAX)
            c->stash[c->nstash++] = root;
        else
            cJSON_Delete(root);          /* not one of ours: ignore */
    }
}

int ctl_connect(ctl_ctx *x)
{
    if (x->conn.fd >= 0)
        return 0;
    return conn_open(&x->conn);
}

int ctl_call(ctl_ctx *x, cJSON *req, ctl_reply *out)
{
    memset(out, 0, sizeof(*out));
    int rc = ctl_connect(x);
    int64_t id;
    if (rc) {
        cJSON_Delete(req);
        return rc;
    }
    rc = ctl_conn_send(&x->conn, req, &id);
    return rc ? rc : ctl_conn_wait(&x->conn, id, out);
}

/* ------------------------------------------------------------------ requests */

cJSON *ctl_req_new(const char *op)
{
    cJSON *o = cJSON_CreateObject();
    if (!o || !cJSON_AddStringToObject(o, "op", op))
        ctl_oom();
    return o;
}

void ctl_req_str(cJSON *o, const char *key, const char *val)
{
    if (!cJSON_AddStringToObject(o, key, val))
        ctl_oom();
}

void ctl_req_int(cJSON *o, const char *key, int64_t val)
{
    cJSON *n = proto_json_int(val);
    if (!n || !cJSON_AddItemToObject(o, key, n))
        ctl_oom();
}

/* ------------------------------------------------------------------ PostgreSQL (--db) */

/* The prepared list straight from PostgreSQL, with the contract's field names
 * and the daemon's rules (docs/recovery.md): recovery's attempts, last_error
 * and review flag live in recovery_state (0 attempts without a row); state
 * is unknown for a foreign gid or one without a payment row, review when
 * recovery gave up, else in_doubt (with the daemon down nothing is
 * in_flight). $1: older_than_ms or NULL. */
static const char DB_PREPARED_SQL[] =
    "SELECT x.gid,"
    " p.payment_id::text,"
    " p.account_id,"
    " p.amount,"
    " p.currency,"
    " to_char(x.prepared AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),"
    " greatest(0, floor(extract(epoch FROM (now() - x.prepared)) * 1000))::bigint,"
    " CASE WHEN x.gid NOT LIKE 'pc:%' OR p.payment_id IS NULL THEN 'unknown'"
    "      WHEN coalesce(s.review, false) THEN 'review' ELSE 'in_doubt' END,"
    " coalesce(p.node, CASE WHEN x.gid LIKE 'pc:%' THEN split_part(x.gid, ':', 2) END),"
    " coalesce(s.attempts, 0),"
    " s.last_error"
    " FROM pg_prepared_xacts x LEFT JOIN payments p ON p.gid = x.gid"
    " LEFT JOIN recovery_state s ON s.gid = x.gid"
    " WHERE x.database = current_database()"
    "   AND ($1::bigint IS NULL OR x.prepared <= now() - $1::bigint * interval '1 millisecond')"
    " ORDER BY x.prepared, x.gid";

static const char *const DB_FIELDS[] = { "gid", "payment_id", "account", "amount", "currency",
                                         "prepared_at", "age_ms", "state", "node", "attempts",
                                         "last_error" };
/* DB_FIELDS that are integers. */
static bool db_field_is_int(size_t i) { return i == 3 || i == 6 || i == 9; }

/* libpq's multi-line message as one line: each run of newlines and tabs
 * becomes one space; other control characters are escaped. */
char *ctl_pq_message(const char *m)
{
    sbuf b;
    sbuf_init(&b);
    bool gap = false;
    for (const char *p = m; *p; p++) {
        if (*p == '\n' || *p == '\t' || *p == '\r') {
            gap = true;
            continue;
        }
        if (gap && b.len)
            sbuf_add(&b, " ", 1);
        gap = false;
        char one[2] = { *p, '\0' };
        ctl_add_printable(&b, one);
    }
    return ctl_take(&b);
}

PGconn *ctl_db_connect(const ctl_ctx *x)
{
    char timeout_s[24], stmt_ms[24];
    int64_t connect_s = (x->timeout_ms + 999) / 1000;
    snprintf(timeout_s, sizeof(timeout_s), "%" PRId64, connect_s < 2 ? 2 : connect_s); /* libpq's minimum */
    snprintf(stmt_ms, sizeof(stmt_ms), "%" PRId64, x->timeout_ms);
    /* Later entries win, so a connect_timeout inside CONNINFO beats ours. */
    const char *const keys[] = { "connect_timeout", "fallback_application_name", "dbname", NULL };
    const char *const vals[] = { timeout_s, "paycoordctl", x->optval[O_DB], NULL };
    PGconn *db = PQconnectdbParams(keys, vals, 1);
    if (!db)
        ctl_oom();
    if (PQstatus(db) != CONNECTION_OK) {
        char *m = ctl_pq_message(PQerrorMessage(db));
        ctl_err("cannot connect to the database: %s", m);
        free(m);
        PQfinish(db);
        return NULL;
    }
    const char *set_params[] = { stmt_ms };
    PGresult *res = PQexecParams(db, "SELECT set_config('statement_timeout', $1, false)", 1, NULL, set_params,
                                 NULL, NULL, 0);
    bool ok = PQresultStatus(res) == PGRES_TUPLES_OK;
    PQclear(res);
    if (!ok) {
        char *m = ctl_pq_message(PQerrorMessage(db));
        ctl_err("database: %s", m);
        free(m);
        PQfinish(db);
        return NULL;
    }
    return db;
}

int ctl_db_prepared(const ctl_ctx *x, bool has_older, int64_t older_ms, cJSON **result)
{
    int rc = CTL_EXIT_ERROR;
    PGresult *res = NULL;
    char older_s[24];
    snprintf(older_s, sizeof(older_s), "%" PRId64, older_ms);
    PGconn *db = ctl_db_connect(x);
    if (!db)
        return CTL_EXIT_UNREACHABLE;
    const char *params[] = { has_older ? older_s : NULL };
    res = PQexecParams(db, DB_PREPARED_SQL, 1, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK || PQnfields(res) != (int)PC_ARRAY_LEN(DB_FIELDS))
        goto db_error;
    cJSON *root = cJSON_CreateObject();
    cJSON *arr = cJSON_AddArrayToObject(root, "transactions");
    if (!root || !arr)
        ctl_oom();
    for (int r = 0; r < PQntuples(res); r++) {
        cJSON *tx = cJSON_CreateObject();
        if (!tx || !cJSON_AddItemToArray(arr, tx))
            ctl_oom();
        for (size_t f = 0; f < PC_ARRAY_LEN(DB_FIELDS); f++) {
            cJSON *v;
            const char *s = PQgetvalue(res, r, (int)f);
            int64_t n;
            if (PQgetisnull(res, r, (int)f))
                v = cJSON_CreateNull();
            else if (db_field_is_int(f) && ctl_parse_nonneg_i64(s, &n))
                v = proto_json_int(n);
            else
                v = cJSON_CreateString(s);
            if (!v || !cJSON_AddItemToObject(tx, DB_FIELDS[f], v))
                ctl_oom();
        }
    }
    *result = root;
    rc = CTL_EXIT_OK;
    goto out;
db_error: {
        char *m = ctl_pq_message(PQerrorMessage(db));
        const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
        ctl_err("database: %s%s%s%s", m, state ? " (SQLSTATE " : "", state ? state : "", state ? ")" : "");
        free(m);
        rc = CTL_EXIT_ERROR;
    }
out:
    PQclear(res);
    PQfinish(db);
    return rc;
}
