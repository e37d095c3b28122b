/*
 * ctl.c - paycoordctl, the admin CLI: each command is one or two requests on
 * the daemon's NDJSON Unix socket (PROTOCOL.md), printed as psql-style tables
 * for people or as the daemon's result object (--json) for scripts. With
 * --db, `prepared` reads pg_prepared_xacts straight from PostgreSQL, so an
 * operator can see what is in doubt while the daemon is down.
 *
 * Exit status (docs/paycoordctl.md): 0 ok; 1 the daemon (or, with --db, the
 * database) answered an error; 2 usage error or confirmation refused; 3 the
 * daemon could not be reached or gave no usable answer.
 */
#include "sbuf.h"

#include "gid.h"
#include "proto.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <libpq-fe.h>

#define CTL_EXIT_OK 0
#define CTL_EXIT_ERROR 1        /* the daemon or the database answered an error */
#define CTL_EXIT_USAGE 2        /* bad command line, or confirmation refused */
#define CTL_EXIT_UNREACHABLE 3  /* no usable answer: socket missing, refused, timeout, closed */

#define CTL_DEFAULT_SOCKET "/run/paycoord/paycoord.sock"
#define CTL_DEFAULT_TIMEOUT_MS INT64_C(30000)
#define CTL_TIMEOUT_MAX_MS INT64_C(86400000)     /* one day */
#define CTL_PAY_WAIT_MARGIN_MS INT64_C(5000)     /* pay's default timeout: its wait + this */
#define CTL_DAEMON_PAY_WAIT_MS INT64_C(30000)    /* the daemon's default pay_wait_ms (docs/config.md) */
#define CTL_NODE_MAX 32
#define CTL_LINE_MAX ((size_t)16 << 20)          /* longest answer line we accept */
#define CTL_READ_CHUNK ((size_t)64 << 10)
#define CTL_MAX_ARGS 8                           /* positional arguments, command included */
#define CTL_STASH_MAX 4                          /* answers read ahead while pipelining */

/* ------------------------------------------------------------------ basics */

static void ctl_err(const char *fmt, ...) PC_PRINTF(1, 2);
static void ctl_err(const char *fmt, ...)
{
    va_list ap;
    fputs("paycoordctl: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

/* Allocation failure in a short-lived CLI: say so and stop. */
static _Noreturn void oom(void)
{
    fputs("paycoordctl: out of memory\n", stderr);
    exit(CTL_EXIT_ERROR);
}

static char *sbuf_take(sbuf *b)
{
    if (!sbuf_ok(b))
        oom();
    char *s = b->data ? b->data : strdup("");
    if (!s)
        oom();
    sbuf_init(b);
    return s;
}

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Display width of UTF-8 text: code points (wide characters count as one). */
static size_t text_width(const char *s)
{
    size_t w = 0;
    for (const unsigned char *p = (const unsigned char *)s; *p; p++)
        if ((*p & 0xC0) != 0x80)
            w++;
    return w;
}

static void put_repeat(FILE *out, int ch, size_t n)
{
    for (size_t i = 0; i < n; i++)
        fputc(ch, out);
}

/* Printable text for a terminal: control characters become escapes, so a
 * hostile last_error cannot move the cursor or forge table lines. */
static void sbuf_add_printable(sbuf *b, const char *s)
{
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '\n')
            sbuf_add(b, "\\n", 2);
        else if (*p == '\t')
            sbuf_add(b, "\\t", 2);
        else if (*p == '\r')
            sbuf_add(b, "\\r", 2);
        else if (*p < 0x20 || *p == 0x7F)
            sbuf_printf(b, "\\x%02x", (unsigned)*p);
        else
            sbuf_add(b, (const char *)p, 1);
    }
}

/* ------------------------------------------------------------------ parsing */

/* Decimal digits only (no sign, no fraction), 0 <= value <= INT64_MAX. */
static bool parse_nonneg_i64(const char *s, int64_t *out)
{
    if (!*s)
        return false;
    int64_t v = 0;
    for (const char *p = s; *p; p++) {
        if (*p < '0' || *p > '9')
            return false;
        int d = *p - '0';
        if (v > (INT64_MAX - d) / 10)
            return false;
        v = v * 10 + d;
    }
    *out = v;
    return true;
}

/* Like parse_nonneg_i64, and at least 1. */
static bool parse_pos_i64(const char *s, int64_t *out)
{
    return parse_nonneg_i64(s, out) && *out >= 1;
}

/* "500ms", "30s", "5m", "2h", "1h30m": one or more <digits><unit> with unit
 * ms, s, m or h. A bare number is refused: its unit would be a guess. */
static bool parse_duration(const char *s, int64_t max_ms, int64_t *out)
{
    int64_t total = 0;
    const char *p = s;
    if (!*p)
        return false;
    while (*p) {
        int64_t v = 0;
        const char *start = p;
        for (; *p >= '0' && *p <= '9'; p++) {
            if (v > (INT64_MAX - (*p - '0')) / 10)
                return false;
            v = v * 10 + (*p - '0');
        }
        if (p == start)
            return false;
        int64_t mult;
        if (p[0] == 'm' && p[1] == 's') {
            mult = 1;
            p += 2;
        } else if (*p == 's') {
            mult = 1000;
            p++;
        } else if (*p == 'm') {
            mult = 60000;
            p++;
        } else if (*p == 'h') {
            mult = 3600000;
            p++;
        } else {
            return false;
        }
        if (v > max_ms / mult || total > max_ms - v * mult)
            return false;
        total += v * mult;
    }
    *out = total;
    return true;
}

/* --timeout: seconds ("30", "2.5") or a duration ("500ms", "1m"); > 0. */
static bool parse_timeout(const char *s, int64_t *out)
{
    size_t n = strlen(s);
    if (n && s[n - 1] >= 'a' && s[n - 1] <= 'z')
        return parse_duration(s, CTL_TIMEOUT_MAX_MS, out) && *out > 0;
    int64_t whole = 0, frac = 0, scale = 1000;
    const char *p = s;
    if (*p < '0' || *p > '9')
        return false;
    for (; *p >= '0' && *p <= '9'; p++) {
        whole = whole * 10 + (*p - '0');
        if (whole > CTL_TIMEOUT_MAX_MS / 1000)
            return false;
    }
    if (*p == '.') {
        p++;
        if (*p < '0' || *p > '9')
            return false;
        for (; *p >= '0' && *p <= '9'; p++) {
            if (scale > 1) {
                scale /= 10;
                frac += (*p - '0') * scale;
            }
        }
    }
    if (*p)
        return false;
    *out = whole * 1000 + frac;
    return *out > 0 && *out <= CTL_TIMEOUT_MAX_MS;
}

/* 8-4-4-4-12 hex digits (the one codec, gid.h). */
static bool valid_uuid(const char *s)
{
    unsigned char b[16];
    return gid_uuid_parse(s, b);
}

/* Any gid an operator may name (the one validator, gid.h). */
static bool valid_gid(const char *s) { return gid_valid(s, strlen(s)); }

/* Our gids name their payment (gid.h); false for any other shape. */
static bool gid_payment_id(const char *gid, char out[37]) { return gid_parse(gid, NULL, out); }

/* ------------------------------------------------------------------ commands and options */

enum {
    O_SOCKET, O_JSON, O_TIMEOUT, O_DB, O_HELP, O_VERSION,
    O_OLDER_THAN, O_REASON, O_YES, O_REFERENCE, O_WAIT_MS, O_PAYMENT_ID, O_NODE,
    O__COUNT
};
#define OB(o) (1u << (o))
#define O_GLOBALS (OB(O_SOCKET) | OB(O_JSON) | OB(O_TIMEOUT) | OB(O_DB) | OB(O_HELP) | OB(O_VERSION))

static const struct {
    const char *name;
    bool takes_value;
} OPTIONS[O__COUNT] = {
    [O_SOCKET] = { "socket", true },         [O_JSON] = { "json", false },
    [O_TIMEOUT] = { "timeout", true },       [O_DB] = { "db", true },
    [O_HELP] = { "help", false },            [O_VERSION] = { "version", false },
    [O_OLDER_THAN] = { "older-than", true }, [O_REASON] = { "reason", true },
    [O_YES] = { "yes", false },              [O_REFERENCE] = { "reference", true },
    [O_WAIT_MS] = { "wait-ms", true },       [O_PAYMENT_ID] = { "payment-id", true },
    [O_NODE] = { "node", true },
};

typedef struct ctl_conn {
    int fd;                       /* -1 until connected */
    const char *path;
    int64_t deadline;             /* monotonic ms: the whole command's budget */
    int64_t timeout_ms;
    char *buf;                    /* received bytes; [off, len) not consumed yet */
    size_t off, len, cap, scan;   /* scan: bytes from off known to hold no '\n' */
    int64_t next_id;
    bool sent;                    /* a request went out: it may have taken effect */
    cJSON *stash[CTL_STASH_MAX];  /* answers to other requests of ours, read early */
    size_t nstash;
} ctl_conn;

typedef struct ctl_ctx {
    const char *optval[O__COUNT];
    bool optset[O__COUNT];
    const char *args[CTL_MAX_ARGS]; /* args[0] is the command */
    int nargs;
    const char *socket_path;
    bool json;
    bool timeout_explicit;
    int64_t timeout_ms;
    ctl_conn conn;
} ctl_ctx;

typedef struct ctl_cmd {
    const char *name;
    const char *usage;            /* after "paycoordctl [OPTIONS] " */
    const char *summary;          /* one line for the overview */
    const char *description;      /* for `help COMMAND`, wrapped by hand */
    const char *example;
    int min_args, max_args;       /* positional arguments after the name */
    unsigned options;             /* OB() bits beyond the global ones */
    int (*run)(ctl_ctx *x);
} ctl_cmd;

/* ------------------------------------------------------------------ the daemon connection */

/* One answer: root owns everything; exactly one of result / code is set. */
typedef struct ctl_reply {
    cJSON *root;
    const cJSON *result;
    const char *code;
    const char *message;
} ctl_reply;

static void reply_free(ctl_reply *r)
{
    cJSON_Delete(r->root);
    memset(r, 0, sizeof(*r));
}

static void conn_init(ctl_conn *c, const char *path, int64_t timeout_ms)
{
    memset(c, 0, sizeof(*c));
    c->fd = -1;
    c->path = path;
    c->timeout_ms = timeout_ms;
    c->next_id = 1;
}

static void conn_close(ctl_conn *c)
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

/* Send one request; takes ownership of req (an object holding "op" and the
 * fields) and gives it the next id. */
static int conn_send(ctl_conn *c, cJSON *req, int64_t *id_out) PC_MUSTCHECK;
static int conn_send(ctl_conn *c, cJSON *req, int64_t *id_out)
{
    int64_t id = c->next_id++;
    if (!cJSON_AddNumberToObject(req, "id", (double)id))
        oom();
    char *text = cJSON_PrintUnformatted(req);
    cJSON_Delete(req);
    if (!text)
        oom();
    size_t n = strlen(text);
    char *line = realloc(text, n + 2);
    if (!line) {
        free(text);
        oom();
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
                oom();
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

/* Wait for the answer to request id. Answers carry the request's id and may
 * come in any order; an answer with id null (the daemon could not read our
 * line) is taken as ours, since nothing else is outstanding that it could
 * belong to more than us. */
static int conn_wait(ctl_conn *c, int64_t id, ctl_reply *out) PC_MUSTCHECK;
static int conn_wait(ctl_conn *c, int64_t id, ctl_reply *out)
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

static int ctl_connect(ctl_ctx *x) PC_MUSTCHECK;
static int ctl_connect(ctl_ctx *x)
{
    if (x->conn.fd >= 0)
        return 0;
    return conn_open(&x->conn);
}

/* Connect if needed, send req (owned) and wait for its answer. */
static int ctl_call(ctl_ctx *x, cJSON *req, ctl_reply *out) PC_MUSTCHECK;
static int ctl_call(ctl_ctx *x, cJSON *req, ctl_reply *out)
{
    memset(out, 0, sizeof(*out));
    int rc = ctl_connect(x);
    int64_t id;
    if (rc) {
        cJSON_Delete(req);
        return rc;
    }
    rc = conn_send(&x->conn, req, &id);
    return rc ? rc : conn_wait(&x->conn, id, out);
}

static int report_error(const char *code, const char *message)
{
    sbuf b;
    sbuf_init(&b);
    sbuf_add_printable(&b, message);
    char *m = sbuf_take(&b);
    ctl_err("%s: %s", code, m);
    free(m);
    return CTL_EXIT_ERROR;
}

static int report_reply_error(const ctl_reply *r)
{
    return report_error(r->code, r->message);
}

/* ------------------------------------------------------------------ requests */

static cJSON *req_new(const char *op)
{
    cJSON *o = cJSON_CreateObject();
    if (!o || !cJSON_AddStringToObject(o, "op", op))
        oom();
    return o;
}

static void req_str(cJSON *o, const char *key, const char *val)
{
    if (!cJSON_AddStringToObject(o, key, val))
        oom();
}

static void req_int(cJSON *o, const char *key, int64_t val)
{
    cJSON *n = proto_json_int(val);
    if (!n || !cJSON_AddItemToObject(o, key, n))
        oom();
}

/* ------------------------------------------------------------------ output */

/* Text of a JSON value for people: null is empty (as psql prints NULL). */
static char *value_text(const cJSON *v)
{
    sbuf b;
    sbuf_init(&b);
    if (!v || cJSON_IsNull(v)) {
        /* empty */
    } else if (cJSON_IsString(v)) {
        sbuf_add_printable(&b, v->valuestring);
    } else if (cJSON_IsBool(v)) {
        sbuf_puts(&b, cJSON_IsTrue(v) ? "true" : "false");
    } else if (cJSON_IsNumber(v)) {
        double d = v->valuedouble;
        if (d == floor(d) && fabs(d) < 9007199254740992.0)
            sbuf_printf(&b, "%.0f", d);
        else
            sbuf_printf(&b, "%.15g", d);
    } else {
        char *t = cJSON_PrintUnformatted(v);
        if (!t)
            oom();
        sbuf_add_printable(&b, t);
        free(t);
    }
    return sbuf_take(&b);
}

/* "850ms", "42s", "5m03s", "2h05m", "3d04h". */
static char *age_text(const cJSON *age_ms)
{
    sbuf b;
    sbuf_init(&b);
    if (cJSON_IsNumber(age_ms) && age_ms->valuedouble >= 0) {
        int64_t ms = (int64_t)age_ms->valuedouble, s = ms / 1000;
        if (ms < 1000)
            sbuf_printf(&b, "%" PRId64 "ms", ms);
        else if (s < 60)
            sbuf_printf(&b, "%" PRId64 "s", s);
        else if (s < 3600)
            sbuf_printf(&b, "%" PRId64 "m%02" PRId64 "s", s / 60, s % 60);
        else if (s < 86400)
            sbuf_printf(&b, "%" PRId64 "h%02" PRId64 "m", s / 3600, s % 3600 / 60);
        else
            sbuf_printf(&b, "%" PRId64 "d%02" PRId64 "h", s / 86400, s % 86400 / 3600);
    }
    return sbuf_take(&b);
}

/* Key/value pairs for the vertical layout; nested objects are flattened to
 * "outer.inner" keys. */
typedef struct kv_list {
    char **keys;
    char **vals;
    size_t n, cap;
} kv_list;

static void kv_push(kv_list *l, char *key, char *val)
{
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 16;
        char **k = realloc(l->keys, cap * sizeof(*k));
        if (!k)
            oom();
        l->keys = k;
        char **v = realloc(l->vals, cap * sizeof(*v));
        if (!v)
            oom();
        l->vals = v;
        l->cap = cap;
    }
    l->keys[l->n] = key;
    l->vals[l->n] = val;
    l->n++;
}

static void kv_free(kv_list *l)
{
    for (size_t i = 0; i < l->n; i++) {
        free(l->keys[i]);
        free(l->vals[i]);
    }
    free(l->keys);
    free(l->vals);
    memset(l, 0, sizeof(*l));
}

static void kv_flatten(kv_list *l, const cJSON *obj, const char *prefix)
{
    const cJSON *it;
    cJSON_ArrayForEach(it, obj) {
        sbuf k;
        sbuf_init(&k);
        if (prefix) {
            sbuf_puts(&k, prefix);
            sbuf_add(&k, ".", 1);
        }
        sbuf_add_printable(&k, it->string ? it->string : "?");
        char *key = sbuf_take(&k);
        if (cJSON_IsObject(it) && it->child) {
            kv_flatten(l, it, key);
            free(key);
        } else {
            kv_push(l, key, value_text(it));
        }
    }
}

/* psql's expanded layout: "key | value", keys padded to one width. A title
 * gives the "-[ title ]---+----" header line psql prints per record. */
static void print_kv(FILE *out, const kv_list *l, const char *title)
{
    size_t kw = 0, vw = 0;
    for (size_t i = 0; i < l->n; i++) {
        size_t w = text_width(l->keys[i]);
        kw = w > kw ? w : kw;
        w = text_width(l->vals[i]);
        vw = w > vw ? w : vw;
    }
    if (title) {
        size_t tw = text_width(title) + 4;   /* "-[ " title " ]" */
        fprintf(out, "-[ %s ]", title);
        put_repeat(out, '-', tw < kw + 1 ? kw + 1 - tw : 0);
        fputc('+', out);
        put_repeat(out, '-', vw + 1);
        fputc('\n', out);
    }
    for (size_t i = 0; i < l->n; i++) {
        fputs(l->keys[i], out);
        put_repeat(out, ' ', kw - text_width(l->keys[i]));
        fputs(l->vals[i][0] ? " | " : " |", out);
        fputs(l->vals[i], out);
        fputc('\n', out);
    }
}

static void print_object(FILE *out, const cJSON *obj, const char *title)
{
    kv_list l = { 0 };
    kv_flatten(&l, obj, NULL);
    print_kv(out, &l, title);
    kv_free(&l);
}

static void print_json(const cJSON *v)
{
    char *t = cJSON_PrintUnformatted(v);
    if (!t)
        oom();
    fputs(t, stdout);
    fputc('\n', stdout);
    free(t);
}

/* psql's aligned table: centred headers, a "---+---" rule, text left and
 * numbers right, the last column unpadded, then "(N rows)". */
static void print_table(FILE *out, size_t ncols, const char *const *headers, const bool *right,
                        char **cells, size_t nrows)
{
    size_t *w = calloc(ncols, sizeof(*w));
    if (!w)
        oom();
    for (size_t c = 0; c < ncols; c++) {
        w[c] = text_width(headers[c]);
        for (size_t r = 0; r < nrows; r++) {
            size_t cw = text_width(cells[r * ncols + c]);
            w[c] = cw > w[c] ? cw : w[c];
        }
    }
    for (size_t c = 0; c < ncols; c++) {
        size_t pad = w[c] - text_width(headers[c]);
        fputs(c ? "|" : "", out);
        put_repeat(out, ' ', 1 + pad / 2);
        fputs(headers[c], out);
        put_repeat(out, ' ', c + 1 < ncols ? 1 + pad - pad / 2 : 0);
    }
    fputc('\n', out);
    for (size_t c = 0; c < ncols; c++) {
        fputs(c ? "+" : "", out);
        put_repeat(out, '-', w[c] + 2);
    }
    fputc('\n', out);
    for (size_t r = 0; r < nrows; r++) {
        for (size_t c = 0; c < ncols; c++) {
            const char *cell = cells[r * ncols + c];
            size_t pad = w[c] - text_width(cell);
            fputs(c ? "| " : " ", out);
            if (right[c])
                put_repeat(out, ' ', pad);
            fputs(cell, out);
            if (c + 1 < ncols)
                put_repeat(out, ' ', (right[c] ? 0 : pad) + 1);
        }
        fputc('\n', out);
    }
    fprintf(out, "(%zu %s)\n", nrows, nrows == 1 ? "row" : "rows");
    free(w);
}

/* The prepared list for people. The payment id and node are inside our
 * gids; --json and `show GID` give every field. */
static void print_prepared_table(const cJSON *result)
{
    static const char *const headers[] = { "gid", "state", "account", "amount", "currency",
                                            "prepared_at", "age", "attempts", "last_error" };
    static const char *const keys[] = { "gid", "state", "account", "amount", "currency",
                                        "prepared_at", "age_ms", "attempts", "last_error" };
    static const bool right[] = { false, false, false, true, false, false, true, true, false };
    enum { NCOLS = PC_ARRAY_LEN(headers) };
    const cJSON *txs = cJSON_GetObjectItemCaseSensitive(result, "transactions");
    size_t nrows = (size_t)cJSON_GetArraySize(txs);
    char **cells = calloc(nrows * NCOLS + 1, sizeof(*cells));
    if (!cells)
        oom();
    size_t r = 0;
    const cJSON *tx;
    cJSON_ArrayForEach(tx, txs) {
        for (size_t c = 0; c < NCOLS; c++) {
            const cJSON *v = cJSON_GetObjectItemCaseSensitive(tx, keys[c]);
            cells[r * NCOLS + c] = strcmp(keys[c], "age_ms") == 0 ? age_text(v) : value_text(v);
        }
        r++;
    }
    print_table(stdout, NCOLS, headers, right, cells, nrows);
    for (size_t i = 0; i < nrows * NCOLS; i++)
        free(cells[i]);
    free(cells);
}

/* Print a successful result: --json as one line, else the vertical layout. */
static int print_result(const ctl_ctx *x, const cJSON *result)
{
    if (x->json)
        print_json(result);
    else
        print_object(stdout, result, NULL);
    return CTL_EXIT_OK;
}

/* Call and print: the common shape of most commands. */
static int simple_call(ctl_ctx *x, cJSON *req)
{
    ctl_reply r;
    int rc = ctl_call(x, req, &r);
    if (!rc)
        rc = r.code ? report_reply_error(&r) : print_result(x, r.result);
    reply_free(&r);
    return rc;
}

/* ------------------------------------------------------------------ argument checks */

static int usage_error(const ctl_cmd *cmd, const char *fmt, ...) PC_PRINTF(2, 3);
static int usage_error(const ctl_cmd *cmd, const char *fmt, ...)
{
    va_list ap;
    fputs("paycoordctl: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    if (cmd)
        fprintf(stderr, "usage: paycoordctl [OPTIONS] %s\n       (paycoordctl help %s)\n",
                cmd->usage, cmd->name);
    else
        fputs("usage: paycoordctl [OPTIONS] COMMAND [ARGS]  (paycoordctl help)\n", stderr);
    return CTL_EXIT_USAGE;
}

static const ctl_cmd *find_cmd(const char *name);

static int check_account(const char *cmd, const char *s)
{
    if (proto_valid_account(s, strlen(s)))
        return 0;
    return usage_error(find_cmd(cmd), "ACCOUNT must be 1-64 characters of A-Z a-z 0-9 . _ : - (got '%s')", s);
}

static int check_currency(const char *cmd, const char *s)
{
    if (proto_valid_currency(s, strlen(s)))
        return 0;
    return usage_error(find_cmd(cmd), "CURRENCY must be three upper-case letters such as EUR (got '%s')", s);
}

static int check_key(const char *cmd, const char *s)
{
    if (proto_valid_key(s, strlen(s)))
        return 0;
    return usage_error(find_cmd(cmd), "KEY must be 1-255 printable ASCII characters without spaces");
}

static int check_amount(const char *cmd, const char *s, int64_t *out)
{
    if (parse_pos_i64(s, out))
        return 0;
    return usage_error(find_cmd(cmd), "AMOUNT must be a positive integer in minor units, "
                       "e.g. 1250 for 12.50 (got '%s')", s);
}

static int check_reference(const char *cmd, const char *s)
{
    size_t n = strlen(s);
    if (n <= PROTO_REFERENCE_MAX && proto_valid_utf8(s, n))
        return 0;
    return usage_error(find_cmd(cmd), "--reference must be valid UTF-8 of at most %d bytes",
                       PROTO_REFERENCE_MAX);
}

/* ------------------------------------------------------------------ prepared */

/* The prepared list straight from PostgreSQL, with the contract's field names
 * and the daemon's rules (recovery/recovery.c): recovery's attempts,
 * last_error and review flag live in recovery_state (0 attempts without a
 * row); state is unknown for a foreign gid or one without a payment row,
 * review when recovery gave up, else in_doubt (with the daemon down nothing
 * is in_flight). $1: older_than_ms or NULL. */
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
static char *one_line_pq_message(const char *m)
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
        sbuf_add_printable(&b, one);
    }
    return sbuf_take(&b);
}

static int db_prepared(const ctl_ctx *x, bool has_older, int64_t older_ms, cJSON **result)
{
    int rc = CTL_EXIT_ERROR;
    PGresult *res = NULL;
    char timeout_s[24], older_s[24], stmt_ms[24];
    int64_t connect_s = (x->timeout_ms + 999) / 1000;
    snprintf(timeout_s, sizeof(timeout_s), "%" PRId64, connect_s < 2 ? 2 : connect_s); /* libpq's minimum */
    snprintf(older_s, sizeof(older_s), "%" PRId64, older_ms);
    snprintf(stmt_ms, sizeof(stmt_ms), "%" PRId64, x->timeout_ms);
    /* Later entries win, so a connect_timeout inside CONNINFO beats ours. */
    const char *const keys[] = { "connect_timeout", "fallback_application_name", "dbname", NULL };
    const char *const vals[] = { timeout_s, "paycoordctl", x->optval[O_DB], NULL };
    PGconn *db = PQconnectdbParams(keys, vals, 1);
    if (!db)
        oom();
    if (PQstatus(db) != CONNECTION_OK) {
        char *m = one_line_pq_message(PQerrorMessage(db));
        ctl_err("cannot connect to the database: %s", m);
        free(m);
        rc = CTL_EXIT_UNREACHABLE;
        goto out;
    }
    const char *set_params[] = { stmt_ms };
    res = PQexecParams(db, "SELECT set_config('statement_timeout', $1, false)", 1, NULL, set_params,
                       NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK)
        goto db_error;
    PQclear(res);
    const char *params[] = { has_older ? older_s : NULL };
    res = PQexecParams(db, DB_PREPARED_SQL, 1, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK || PQnfields(res) != (int)PC_ARRAY_LEN(DB_FIELDS))
        goto db_error;
    cJSON *root = cJSON_CreateObject();
    cJSON *arr = cJSON_AddArrayToObject(root, "transactions");
    if (!root || !arr)
        oom();
    for (int r = 0; r < PQntuples(res); r++) {
        cJSON *tx = cJSON_CreateObject();
        if (!tx || !cJSON_AddItemToArray(arr, tx))
            oom();
        for (size_t f = 0; f < PC_ARRAY_LEN(DB_FIELDS); f++) {
            cJSON *v;
            const char *s = PQgetvalue(res, r, (int)f);
            int64_t n;
            if (PQgetisnull(res, r, (int)f))
                v = cJSON_CreateNull();
            else if (db_field_is_int(f) && parse_nonneg_i64(s, &n))
                v = proto_json_int(n);
            else
                v = cJSON_CreateString(s);
            if (!v || !cJSON_AddItemToObject(tx, DB_FIELDS[f], v))
                oom();
        }
    }
    *result = root;
    rc = CTL_EXIT_OK;
    goto out;
db_error: {
        char *m = one_line_pq_message(PQerrorMessage(db));
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

static int cmd_prepared(ctl_ctx *x)
{
    int64_t older = 0;
    bool has_older = x->optset[O_OLDER_THAN];
    if (has_older && !parse_duration(x->optval[O_OLDER_THAN], PROTO_OLDER_THAN_MS_MAX, &older))
        return usage_error(find_cmd("prepared"), "--older-than needs a duration such as 500ms, 30s, 5m, 2h "
                           "or 1h30m (got '%s')", x->optval[O_OLDER_THAN]);
    if (x->optset[O_DB]) {
        cJSON *result = NULL;
        int rc = db_prepared(x, has_older, older, &result);
        if (!rc) {
            if (x->json)
                print_json(result);
            else
                print_prepared_table(result);
        }
        cJSON_Delete(result);
        return rc;
    }
    cJSON *req = req_new("prepared");
    if (has_older)
        req_int(req, "older_than_ms", older);
    ctl_reply r;
    int rc = ctl_call(x, req, &r);
    if (rc == CTL_EXIT_UNREACHABLE)
        fputs("paycoordctl: with the daemon down, 'paycoordctl --db CONNINFO prepared' reads the list "
              "from PostgreSQL\n", stderr);
    if (!rc) {
        if (r.code)
            rc = report_reply_error(&r);
        else if (!cJSON_IsArray(cJSON_GetObjectItemCaseSensitive(r.result, "transactions")))
            rc = report_error("internal", "the daemon's prepared result has no transactions array");
        else if (x->json)
            print_json(r.result);
        else
            print_prepared_table(r.result);
    }
    reply_free(&r);
    return rc;
}

/* ------------------------------------------------------------------ show */

static const cJSON *find_tx(const cJSON *prepared_result, const char *gid)
{
    const cJSON *tx;
    cJSON_ArrayForEach(tx, cJSON_GetObjectItemCaseSensitive(prepared_result, "transactions")) {
        const cJSON *g = cJSON_GetObjectItemCaseSensitive(tx, "gid");
        if (cJSON_IsString(g) && strcmp(g->valuestring, gid) == 0)
            return tx;
    }
    return NULL;
}

static bool is_not_found(const ctl_reply *r) { return r->code && strcmp(r->code, "not_found") == 0; }

/* The prepared list may be missing for reasons that do not make `show` fail:
 * a daemon without the op yet, or a peer that is not an admin. */
static bool prepared_optional_error(const ctl_reply *r)
{
    return r->code && (strcmp(r->code, "unknown_op") == 0 || strcmp(r->code, "forbidden") == 0);
}

static void print_show(const ctl_ctx *x, const cJSON *payment, const cJSON *tx)
{
    if (x->json) {
        cJSON *o = cJSON_CreateObject();
        if (!o)
            oom();
        cJSON *p = payment ? cJSON_Duplicate(payment, true) : cJSON_CreateNull();
        cJSON *t = tx ? cJSON_Duplicate(tx, true) : cJSON_CreateNull();
        if (!p || !cJSON_AddItemToObject(o, "payment", p) || !t || !cJSON_AddItemToObject(o, "prepared", t))
            oom();
        print_json(o);
        cJSON_Delete(o);
        return;
    }
    if (payment)
        print_object(stdout, payment, "payment");
    if (tx)
        print_object(stdout, tx, "prepared transaction");
}

static int cmd_show(ctl_ctx *x)
{
    const char *arg = x->args[1];
    ctl_reply rs = { 0 }, rp = { 0 };
    const cJSON *payment = NULL, *tx = NULL;
    int rc;

    if (strncmp(arg, "pc:", 3) != 0) {
        /* An idempotency key: the payment, and its prepared transaction while pending. */
        if ((rc = check_key("show", arg)) != 0)
            return rc;
        cJSON *req = req_new("status");
        req_str(req, "idempotency_key", arg);
        if ((rc = ctl_call(x, req, &rs)) != 0)
            goto out;
        if (rs.code) {
            rc = report_reply_error(&rs);
            goto out;
        }
        payment = rs.result;
        const cJSON *st = cJSON_GetObjectItemCaseSensitive(payment, "status");
        const cJSON *gid = cJSON_GetObjectItemCaseSensitive(payment, "gid");
        if (cJSON_IsString(st) && strcmp(st->valuestring, "pending") == 0 && cJSON_IsString(gid)) {
            if ((rc = ctl_call(x, req_new("prepared"), &rp)) != 0)
                goto out;
            if (rp.result)
                tx = find_tx(rp.result, gid->valuestring);
        }
        print_show(x, payment, tx);
        goto out;
    }

    /* A gid: ask for the prepared list and the payment named inside the gid at once. */
    if (!valid_gid(arg))
        return usage_error(find_cmd("show"), "GID must be 1-%d printable ASCII characters", PROTO_GID_MAX);
    char uuid[37];
    bool has_uuid = gid_payment_id(arg, uuid);
    int64_t pid, sid = 0;
    if ((rc = ctl_connect(x)) != 0 || (rc = conn_send(&x->conn, req_new("prepared"), &pid)) != 0)
        goto out;
    if (has_uuid) {
        cJSON *req = req_new("status");
        req_str(req, "payment_id", uuid);
        if ((rc = conn_send(&x->conn, req, &sid)) != 0)
            goto out;
    }
    if ((rc = conn_wait(&x->conn, pid, &rp)) != 0 || (has_uuid && (rc = conn_wait(&x->conn, sid, &rs)) != 0))
        goto out;
    if (rs.result) {
        const cJSON *g = cJSON_GetObjectItemCaseSensitive(rs.result, "gid");
        if (cJSON_IsString(g) && strcmp(g->valuestring, arg) == 0)
            payment = rs.result;
    }
    if (rp.result)
        tx = find_tx(rp.result, arg);
    if (payment || tx) {
        print_show(x, payment, tx);
        goto out;
    }
    if (rs.code && !is_not_found(&rs)) {
        rc = report_reply_error(&rs);
        goto out;
    }
    if (rp.code && !prepared_optional_error(&rp)) {
        rc = report_reply_error(&rp);
        goto out;
    }
    rc = report_error("not_found", rp.code ? "no payment has this gid (the prepared list was not available)"
                                           : "no payment or prepared transaction has this gid");
    if (rp.code)
        (void)report_reply_error(&rp);
out:
    reply_free(&rs);
    reply_free(&rp);
    return rc;
}

/* ------------------------------------------------------------------ resolve */

/* Ask on the terminal; true only for an answer of exactly "yes". */
static bool confirm(const char *action, const char *gid)
{
    char line[64];
    bool commit = strcmp(action, "commit") == 0;
    fprintf(stderr, "About to %s %s (%s).\nType yes to confirm: ",
            commit ? "COMMIT PREPARED" : "ROLLBACK PREPARED", gid,
            commit ? "the debit stays" : "the held funds are released");
    fflush(stderr);
    if (!fgets(line, sizeof(line), stdin))
        return false;
    size_t n = strlen(line);
    while (n && (line[n - 1] == '\n' || line[n - 1] == '\r' || line[n - 1] == ' '))
        line[--n] = '\0';
    return strcmp(line, "yes") == 0;
}

static int cmd_resolve(ctl_ctx *x)
{
    const ctl_cmd *cmd = find_cmd("resolve");
    const char *gid = x->args[1], *action = x->args[2], *reason = x->optval[O_REASON];
    if (!valid_gid(gid))
        return usage_error(cmd, "GID must be 1-%d printable ASCII characters", PROTO_GID_MAX);
    if (strcmp(action, "commit") != 0 && strcmp(action, "rollback") != 0)
        return usage_error(cmd, "the action must be commit or rollback (got '%s')", action);
    if (!reason || !reason[0])
        return usage_error(cmd, "--reason TEXT is required: it is recorded with the resolution");
    if (strlen(reason) > PROTO_REASON_MAX || !proto_valid_utf8(reason, strlen(reason)))
        return usage_error(cmd, "--reason must be valid UTF-8 of at most %d bytes", PROTO_REASON_MAX);

    if (!x->optset[O_YES]) {
        if (!isatty(STDIN_FILENO)) {
            ctl_err("refusing to resolve without confirmation: stdin is not a terminal; "
                    "add --yes to resolve non-interactively");
            return CTL_EXIT_USAGE;
        }
        /* Show what is about to be settled, when the daemon can tell. */
        ctl_reply rp;
        int rc = ctl_call(x, req_new("prepared"), &rp);
        if (rc) {
            reply_free(&rp);
            return rc;
        }
        const cJSON *tx = rp.result ? find_tx(rp.result, gid) : NULL;
        if (tx)
            print_object(stderr, tx, "prepared transaction");
        else if (rp.result)
            fprintf(stderr, "paycoordctl: note: %s is not in the prepared list\n", gid);
        reply_free(&rp);
        if (!confirm(action, gid)) {
            ctl_err("not confirmed; nothing was changed");
            return CTL_EXIT_USAGE;
        }
    }
    cJSON *req = req_new("resolve");
    req_str(req, "gid", gid);
    req_str(req, "action", action);
    req_str(req, "reason", reason);
    return simple_call(x, req);
}

/* ------------------------------------------------------------------ the other commands */

static int cmd_recover(ctl_ctx *x)
{
    cJSON *req = req_new("recover");
    if (x->optset[O_NODE]) {
        const char *n = x->optval[O_NODE];
        size_t len = strlen(n);
        if (len < 1 || len > CTL_NODE_MAX ||
            strspn(n, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-") != len) {
            cJSON_Delete(req);
            return usage_error(find_cmd("recover"), "--node must be 1-%d of A-Z a-z 0-9 _ - (got '%s')",
                               CTL_NODE_MAX, n);
        }
        req_str(req, "node", n);
    }
    return simple_call(x, req);
}
static int cmd_stats(ctl_ctx *x) { return simple_call(x, req_new("stats")); }
static int cmd_health(ctl_ctx *x) { return simple_call(x, req_new("health")); }
static int cmd_ping(ctl_ctx *x) { return simple_call(x, req_new("ping")); }

static int cmd_account(ctl_ctx *x)
{
    int rc;
    if (strcmp(x->args[1], "open") != 0)
        return usage_error(find_cmd("account"), "unknown account subcommand '%s'", x->args[1]);
    if ((rc = check_account("account", x->args[2])) != 0 || (rc = check_currency("account", x->args[3])) != 0)
        return rc;
    cJSON *req = req_new("account_open");
    req_str(req, "account", x->args[2]);
    req_str(req, "currency", x->args[3]);
    return simple_call(x, req);
}

static int cmd_balance(ctl_ctx *x)
{
    int rc = check_account("balance", x->args[1]);
    if (rc)
        return rc;
    cJSON *req = req_new("balance");
    req_str(req, "account", x->args[1]);
    return simple_call(x, req);
}

/* pay and credit share their arguments: ACCOUNT AMOUNT CURRENCY KEY [--reference R]. */
static int money_request(ctl_ctx *x, const char *op, cJSON **out)
{
    int64_t amount = 0;
    int rc;
    if ((rc = check_account(op, x->args[1])) != 0 || (rc = check_amount(op, x->args[2], &amount)) != 0 ||
        (rc = check_currency(op, x->args[3])) != 0 || (rc = check_key(op, x->args[4])) != 0)
        return rc;
    if (x->optset[O_REFERENCE] && (rc = check_reference(op, x->optval[O_REFERENCE])) != 0)
        return rc;
    cJSON *req = req_new(op);
    req_str(req, "account", x->args[1]);
    req_int(req, "amount", amount);
    req_str(req, "currency", x->args[3]);
    req_str(req, "idempotency_key", x->args[4]);
    if (x->optset[O_REFERENCE])
        req_str(req, "reference", x->optval[O_REFERENCE]);
    *out = req;
    return 0;
}

/* A pay or credit whose answer was lost may still have happened. */
static int money_call(ctl_ctx *x, cJSON *req, const char *key)
{
    int rc = simple_call(x, req);
    if (rc == CTL_EXIT_UNREACHABLE && x->conn.sent)
        fprintf(stderr, "paycoordctl: the request was sent and may still take effect: check with "
                "'paycoordctl status %s' (or run the same command again: the key makes it safe)\n", key);
    return rc;
}

static int cmd_pay(ctl_ctx *x)
{
    cJSON *req;
    int64_t wait_ms = CTL_DAEMON_PAY_WAIT_MS;
    if (x->optset[O_WAIT_MS] && (!parse_nonneg_i64(x->optval[O_WAIT_MS], &wait_ms) || wait_ms > PROTO_WAIT_MS_MAX))
        return usage_error(find_cmd("pay"), "--wait-ms must be an integer from 0 to %" PRId64 " (got '%s')",
                           PROTO_WAIT_MS_MAX, x->optval[O_WAIT_MS]);
    int rc = money_request(x, "pay", &req);
    if (rc)
        return rc;
    if (x->optset[O_WAIT_MS])
        req_int(req, "wait_ms", wait_ms);
    /* The daemon may hold the answer for the whole wait (its default unless
     * --wait-ms): outwait it unless --timeout says otherwise. */
    if (!x->timeout_explicit && wait_ms + CTL_PAY_WAIT_MARGIN_MS > x->timeout_ms)
        x->conn.timeout_ms = x->timeout_ms = wait_ms + CTL_PAY_WAIT_MARGIN_MS;
    return money_call(x, req, x->args[4]);
}

static int cmd_credit(ctl_ctx *x)
{
    cJSON *req;
    int rc = money_request(x, "credit", &req);
    return rc ? rc : money_call(x, req, x->args[4]);
}

static int cmd_status(ctl_ctx *x)
{
    const ctl_cmd *cmd = find_cmd("status");
    bool by_id = x->optset[O_PAYMENT_ID];
    if (by_id == (x->nargs == 2))
        return usage_error(cmd, "give either KEY or --payment-id UUID");
    cJSON *req = req_new("status");
    if (by_id) {
        if (!valid_uuid(x->optval[O_PAYMENT_ID])) {
            cJSON_Delete(req);
            return usage_error(cmd, "--payment-id needs a UUID like 3f2a1c9e-0b7d-4e8a-9c1f-2d3e4f5a6b7c");
        }
        req_str(req, "payment_id", x->optval[O_PAYMENT_ID]);
    } else {
        int rc = check_key("status", x->args[1]);
        if (rc) {
            cJSON_Delete(req);
            return rc;
        }
        req_str(req, "idempotency_key", x->args[1]);
    }
    return simple_call(x, req);
}

static int cmd_help(ctl_ctx *x);

/* ------------------------------------------------------------------ the command table */

static const ctl_cmd COMMANDS[] = {
    { "ping", "ping", "check that the daemon answers",
      "Ask the daemon for its version, protocol version and node id. A quick\n"
      "check that the socket is the right one and the daemon is alive.",
      "paycoordctl ping", 0, 0, 0, cmd_ping },
    { "health", "health", "readiness: database, processor, prepared slots (admin)",
      "Print readiness: ready (true when the daemon takes payments), database\n"
      "(up or down), processor (up, down or circuit_open), prepared (transactions\n"
      "now prepared) and max_prepared (the server's max_prepared_transactions).\n"
      "The exit status is 0 whenever the daemon answers; read 'ready' (with --json\n"
      "in scripts) to decide.",
      "paycoordctl --json health", 0, 0, 0, cmd_health },
    { "stats", "stats", "counters and gauges (admin)",
      "Print the daemon's counters and gauges: payments by outcome, in flight,\n"
      "prepared against max_prepared_transactions, pool use, processor latency and\n"
      "circuit state, recovery runs, clients and errors by code. Nested groups are\n"
      "shown as group.name.",
      "paycoordctl stats", 0, 0, 0, cmd_stats },
    { "prepared", "prepared [--older-than DURATION]", "list prepared transactions (admin)",
      "List every prepared transaction in the database, ours or foreign, oldest\n"
      "first, with its state:\n"
      "  in_flight  a request of the daemon is still driving it\n"
      "  in_doubt   the outcome is not known yet; recovery will settle it\n"
      "  review     recovery gave up: settle it by hand with 'resolve'\n"
      "  unknown    not a paycoord gid, or no payment row for it\n"
      "--older-than keeps those prepared at least DURATION ago (units ms, s, m, h;\n"
      "e.g. 500ms, 30s, 5m, 1h30m). With --db CONNINFO the list is read straight from\n"
      "PostgreSQL (pg_prepared_xacts joined with payments), so it works while the\n"
      "daemon is down; nothing is in_flight then.",
      "paycoordctl prepared --older-than 5m\n"
      "  paycoordctl --db 'host=/run/postgresql dbname=paycoord' prepared",
      0, 0, OB(O_OLDER_THAN), cmd_prepared },
    { "show", "show GID|KEY", "one payment and its prepared transaction",
      "Show one payment and, while it is still prepared, its prepared transaction.\n"
      "An argument starting with 'pc:' is a gid: it is looked up in the prepared\n"
      "list, and its payment through the payment id the gid holds. Anything else is\n"
      "an idempotency key. --json prints {\"payment\": ..., \"prepared\": ...}, either\n"
      "of which may be null.",
      "paycoordctl show pc:n1:3f2a1c9e0b7d4e8a9c1f2d3e4f5a6b7c\n"
      "  paycoordctl show order-123",
      1, 1, 0, cmd_show },
    { "resolve", "resolve GID commit|rollback --reason TEXT [--yes]", "settle a prepared transaction by hand (admin)",
      "Settle an in-doubt or review transaction by hand: commit (COMMIT PREPARED:\n"
      "the processor charged, keep the debit) or rollback (ROLLBACK PREPARED: the\n"
      "processor did not charge, release the funds). Check the processor first: the\n"
      "wrong choice loses money or leaves a charge without a debit. The reason\n"
      "(required, at most 500 bytes) is recorded with your uid. On a terminal it\n"
      "shows the transaction and asks you to type yes; without a terminal it refuses\n"
      "unless --yes is given.",
      "paycoordctl resolve pc:n1:3f2a1c9e0b7d4e8a9c1f2d3e4f5a6b7c commit \\\n"
      "      --reason 'PSP dashboard shows psp_8c1 succeeded (ticket OPS-12)'",
      2, 2, OB(O_REASON) | OB(O_YES), cmd_resolve },
    { "recover", "recover [--node NODE]", "run one recovery pass now (admin)",
      "Run one recovery pass now and print what it did: checked, committed,\n"
      "rolled_back and left (still undecided, retried later). --node settles the\n"
      "gids of another node whose daemon is dead (its lock is free); while that\n"
      "daemon lives the answer is forbidden.",
      "paycoordctl recover\n"
      "  paycoordctl recover --node n2", 0, 0, OB(O_NODE), cmd_recover },
    { "account", "account open ACCOUNT CURRENCY", "open an account (admin)",
      "Open ACCOUNT (1-64 characters of A-Z a-z 0-9 . _ : -) in CURRENCY (three\n"
      "upper-case letters) with balance 0. Fails with account_exists if it exists.",
      "paycoordctl account open acct-42 EUR", 3, 3, 0, cmd_account },
    { "balance", "balance ACCOUNT", "balance, held funds and pending credits",
      "Print the committed balance, the funds held by payments in flight and the\n"
      "credits accepted but not yet applied. Amounts are in minor units.",
      "paycoordctl balance acct-42", 1, 1, 0, cmd_balance },
    { "pay", "pay ACCOUNT AMOUNT CURRENCY KEY [--reference R] [--wait-ms N]", "debit and charge a payment",
      "Debit ACCOUNT by AMOUNT minor units (an integer: 1250 is 12.50 EUR) and charge\n"
      "it through the processor under idempotency KEY: running it again with the\n"
      "same KEY never charges twice, it returns the stored payment. --wait-ms: how\n"
      "long the daemon waits for a final outcome (0: answer once the funds are held;\n"
      "default from the daemon's configuration). Status pending means the outcome\n"
      "is not known yet; recovery settles it: check with 'status KEY'. Without\n"
      "--timeout, paycoordctl waits the wait (30 s, the daemon's default, without\n"
      "--wait-ms) plus 5 s. If the answer is lost, the payment may still happen:\n"
      "'status KEY' tells, and running the same command again is safe.",
      "paycoordctl pay acct-42 1250 EUR order-123 --reference 'order 123'",
      4, 4, OB(O_REFERENCE) | OB(O_WAIT_MS), cmd_pay },
    { "credit", "credit ACCOUNT AMOUNT CURRENCY KEY [--reference R]", "add funds to an account",
      "Add AMOUNT minor units to ACCOUNT under idempotency KEY. Status applied: in\n"
      "the balance now; accepted: durable and queued behind a payment in flight on\n"
      "the account, applied when that payment resolves.",
      "paycoordctl credit acct-42 10000 EUR topup-2026-11-22", 4, 4, OB(O_REFERENCE), cmd_credit },
    { "status", "status KEY | status --payment-id UUID", "look a payment up",
      "Print the payment stored under idempotency KEY, or with --payment-id the one\n"
      "with that payment id. Fails with not_found when there is none.",
      "paycoordctl status order-123\n"
      "  paycoordctl status --payment-id 3f2a1c9e-0b7d-4e8a-9c1f-2d3e4f5a6b7c",
      0, 1, OB(O_PAYMENT_ID), cmd_status },
    { "help", "help [COMMAND]", "this overview, or one command's help",
      "Print the overview of every command, or the usage, description and an\n"
      "example of COMMAND.",
      "paycoordctl help resolve", 0, 2, 0, cmd_help },
};

static const ctl_cmd *find_cmd(const char *name)
{
    for (size_t i = 0; i < PC_ARRAY_LEN(COMMANDS); i++)
        if (strcmp(COMMANDS[i].name, name) == 0)
            return &COMMANDS[i];
    return NULL;
}

static void print_overview(FILE *out)
{
    fputs("paycoordctl - admin CLI of paycoord, the two-phase-commit payment coordinator\n\n"
          "usage: paycoordctl [--socket PATH] [--json] [--timeout SEC] COMMAND [ARGS]\n"
          "       paycoordctl --db CONNINFO prepared [--older-than DURATION]\n"
          "       paycoordctl help [COMMAND] | --version\n\n"
          "commands:\n", out);
    for (size_t i = 0; i < PC_ARRAY_LEN(COMMANDS); i++)
        fprintf(out, "  %-9s %s\n", COMMANDS[i].name, COMMANDS[i].summary);
    fputs("\noptions (anywhere on the line; '--' ends options):\n"
          "  --socket PATH   the daemon's socket (default $PAYCOORD_SOCKET, else\n"
          "                  " CTL_DEFAULT_SOCKET ")\n"
          "  --json          print the daemon's result object as one JSON line\n"
          "  --timeout SEC   give up after SEC seconds (default 30, pay: its wait + 5;\n"
          "                  2.5, 500ms, 1m also)\n"
          "  --db CONNINFO   'prepared' straight from PostgreSQL (daemon not needed)\n"
          "  -h, --help      help; 'paycoordctl help COMMAND' for one command\n"
          "  --version       print the version\n\n"
          "exit status: 0 ok, 1 the daemon answered an error, 2 usage error,\n"
          "3 daemon unreachable (socket missing, connection refused, timeout)\n", out);
}

static void print_cmd_help(FILE *out, const ctl_cmd *c)
{
    fprintf(out, "usage: paycoordctl [OPTIONS] %s\n\n%s\n\nexample:\n  %s\n", c->usage, c->description, c->example);
    if (c->options & ~O_GLOBALS)
        fputs("\noptions:\n", out);
    if (c->options & OB(O_OLDER_THAN))
        fputs("  --older-than DURATION  only those prepared at least this long ago\n", out);
    if (c->options & OB(O_REASON))
        fputs("  --reason TEXT          why (required; recorded with your uid)\n", out);
    if (c->options & OB(O_YES))
        fputs("  --yes                  do not ask for confirmation\n", out);
    if (c->options & OB(O_REFERENCE))
        fputs("  --reference R          free text stored with it (at most 255 bytes)\n", out);
    if (c->options & OB(O_WAIT_MS))
        fputs("  --wait-ms N            how long the daemon waits for a final outcome\n", out);
    if (c->options & OB(O_PAYMENT_ID))
        fputs("  --payment-id UUID      look up by payment id instead of KEY\n", out);
    if (c->options & OB(O_NODE))
        fputs("  --node NODE            settle a dead node's gids\n", out);
    fputs("\nglobal options: --socket PATH, --json, --timeout SEC (paycoordctl help)\n", out);
}

static int cmd_help(ctl_ctx *x)
{
    if (x->nargs == 1) {
        print_overview(stdout);
        return CTL_EXIT_OK;
    }
    const ctl_cmd *c = find_cmd(x->args[1]);
    if (!c)
        return usage_error(NULL, "no command '%s'; 'paycoordctl help' lists them", x->args[1]);
    print_cmd_help(stdout, c);
    return CTL_EXIT_OK;
}

/* ------------------------------------------------------------------ main */

/* Options may come anywhere; "-h" is the one short option; other words that
 * start with '-' (a negative amount, say) stay arguments and meet their own
 * check; "--" ends options. Returns -1 to go on, else an exit status. */
static int parse_args(int argc, char **argv, ctl_ctx *x)
{
    bool options_done = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!options_done && strcmp(a, "--") == 0) {
            options_done = true;
            continue;
        }
        if (!options_done && strcmp(a, "-h") == 0) {
            x->optset[O_HELP] = true;
            continue;
        }
        if (!options_done && a[0] == '-' && a[1] == '-') {
            const char *name = a + 2, *eq = strchr(name, '=');
            size_t n = eq ? (size_t)(eq - name) : strlen(name);
            int o;
            for (o = 0; o < O__COUNT; o++)
                if (strlen(OPTIONS[o].name) == n && strncmp(OPTIONS[o].name, name, n) == 0)
                    break;
            if (o == O__COUNT)
                return usage_error(NULL, "unknown option '%s'", a);
            if (OPTIONS[o].takes_value) {
                if (eq)
                    x->optval[o] = eq + 1;
                else if (i + 1 < argc)
                    x->optval[o] = argv[++i];
                else
                    return usage_error(NULL, "option --%s needs a value", OPTIONS[o].name);
            } else if (eq) {
                return usage_error(NULL, "option --%s takes no value", OPTIONS[o].name);
            }
            x->optset[o] = true;
            continue;
        }
        if (!options_done && a[0] == '-' && a[1] && (a[1] < '0' || a[1] > '9'))
            return usage_error(NULL, "unknown option '%s'", a);
        if (x->nargs == CTL_MAX_ARGS)
            return usage_error(NULL, "too many arguments");
        x->args[x->nargs++] = a;
    }
    return -1;
}

int main(int argc, char **argv)
{
    ctl_ctx x;
    memset(&x, 0, sizeof(x));
    int rc = parse_args(argc, argv, &x);
    if (rc >= 0)
        return rc;
    if (x.optset[O_VERSION]) {
        printf("paycoordctl %s (protocol %d)\n", PAYCOORD_VERSION, PROTO_VERSION);
        return CTL_EXIT_OK;
    }
    const ctl_cmd *cmd = x.nargs ? find_cmd(x.args[0]) : NULL;
    if (x.optset[O_HELP]) {
        /* "pay --help", "-h pay", "help pay --help" and "help --help" alike. */
        const ctl_cmd *about = cmd && cmd->run == cmd_help && x.nargs > 1 ? find_cmd(x.args[1]) : cmd;
        if (about)
            print_cmd_help(stdout, about);
        else
            print_overview(stdout);
        return CTL_EXIT_OK;
    }
    if (!x.nargs) {
        print_overview(stderr);
        return CTL_EXIT_USAGE;
    }
    if (!cmd)
        return usage_error(NULL, "unknown command '%s'", x.args[0]);
    for (int o = 0; o < O__COUNT; o++)
        if (x.optset[o] && !(OB(o) & (O_GLOBALS | cmd->options)))
            return usage_error(cmd, "option --%s does not apply to '%s'", OPTIONS[o].name, cmd->name);
    int n = x.nargs - 1;
    if (n < cmd->min_args || n > cmd->max_args)
        return usage_error(cmd, "'%s' takes %s arguments", cmd->name,
                           n < cmd->min_args ? "more" : "fewer");
    if (x.optset[O_DB] && cmd->run != cmd_prepared)
        return usage_error(cmd, "--db works only with 'prepared'");

    const char *env_sock = getenv("PAYCOORD_SOCKET");
    x.socket_path = x.optset[O_SOCKET] ? x.optval[O_SOCKET]
                    : (env_sock && env_sock[0]) ? env_sock : CTL_DEFAULT_SOCKET;
    x.json = x.optset[O_JSON];
    x.timeout_ms = CTL_DEFAULT_TIMEOUT_MS;
    if (x.optset[O_TIMEOUT]) {
        if (!parse_timeout(x.optval[O_TIMEOUT], &x.timeout_ms))
            return usage_error(cmd, "--timeout needs seconds > 0 such as 30, 2.5 or 500ms (got '%s')",
                               x.optval[O_TIMEOUT]);
        x.timeout_explicit = true;
    }
    conn_init(&x.conn, x.socket_path, x.timeout_ms);

    rc = cmd->run(&x);
    conn_close(&x.conn);
    if (fflush(stdout) != 0 || ferror(stdout)) {
        ctl_err("cannot write the output: %s", strerror(errno));
        if (rc == CTL_EXIT_OK)
            rc = CTL_EXIT_ERROR;
    }
    return rc;
}
