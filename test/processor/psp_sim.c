/*
 * psp_sim.c - psp-sim, the test payment processor: the PROCESSOR.md contract
 * over loopback HTTP (libevent evhttp, one thread) with fault injection on
 * /control. Users' guide: docs/processor.md.
 *
 * A /v1 request goes through these steps:
 *   1. route, count requests.<op>; while refuse_connections is on, a request
 *      on a kept-alive connection is answered by closing that connection
 *   2. auth: 401 at once
 *   3. parse into a sim_call; an invalid request is answered 400 like any
 *      other result (after the latency)
 *   4. fate: metadata.sim on a create, else the fault rates (fault_ops)
 *   5. blackhole: hold until the client goes away, never process
 *      latency > 0: hold; the timer processes, then answers (or not)
 *      otherwise: process and answer inside the evhttp callback
 *
 * Held requests and libevent 2.1 lifetimes. evhttp stops reading a
 * connection once it hands a request to us (for POST; for GET it may keep
 * reading), so on its own it may or may not notice a client that goes away
 * while we hold the request, and if it does it frees the connection under us.
 * So for every held request we: disable reading on the connection (evhttp
 * re-enables it after the reply), watch the fd ourselves (EV_READ, then
 * recv(MSG_PEEK) tells EOF/RST from pipelined bytes), and set a close
 * callback that catches any other path by which libevent frees the
 * connection. When the client is gone we free the connection ourselves,
 * which frees the request with it. Connections are only freed from our own
 * timer/watch callbacks, never from inside an evhttp request callback
 * (evhttp still uses the connection after that callback returns).
 */
#include "sim_fault.h"
#include "sim_store.h"
#include "sim_util.h"

#include <sys/queue.h> /* before event2: TAILQ_* for evkeyvalq */

#include <arpa/inet.h>
#include <cjson/cJSON.h>
#include <errno.h>
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <getopt.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_MAX_PAYMENTS 1000000
#define LIST_LIMIT_DEFAULT 100
#define LIST_LIMIT_MAX 1000
#define TOKEN_MAX 4096

/* What happens to a request besides its normal processing. */
typedef enum {
    FATE_NORMAL = 0,
    FATE_FAIL_BEFORE, /* 503, not processed */
    FATE_FAIL_AFTER,  /* processed, 500 */
    FATE_DROP_AFTER,  /* processed, connection closed without an answer */
    FATE_BLACKHOLE    /* held, never processed nor answered */
} sim_fate;

/* metadata.sim on a create: the outcome of a new payment. */
typedef enum { FORCE_NONE = 0, FORCE_SUCCEED, FORCE_DECLINE, FORCE_PENDING } sim_force;

/* One parsed /v1 request: everything needed to process it later, copied
 * out of the evhttp request (which may be gone by then). */
typedef struct sim_call {
    /* scalars first: call_init() clears up to `key` */
    sim_op op;
    sim_fate fate;
    sim_force force;
    int bad_status;      /* 0, or 400 with bad_msg */
    bool has_sim_fate;
    bool has_latency;
    int64_t latency_ms;  /* metadata.sim_latency_ms */
    size_t key_len;
    int64_t amount;
    size_t account_len;
    bool has_reference;
    size_t reference_len;
    bool has_decline_code;
    bool has_gte;
    bool has_lt;
    bool has_after;
    int64_t gte;
    int64_t lt;
    uint64_t after_seq;
    int limit;
    char key[SIM_KEY_MAX + 1];
    char currency[4];
    char account[SIM_ACCOUNT_MAX + 1];
    char reference[SIM_REFERENCE_MAX + 1];
    char decline_code[SIM_DECLINE_CODE_MAX + 1];
    char bad_msg[160];
} sim_call;

typedef enum {
    HOLD_DELAY,     /* latency: the timer processes the call, then answers */
    HOLD_BLACKHOLE, /* until the client goes away */
    HOLD_DROP       /* close the connection on the next loop turn */
} hold_kind;

typedef struct sim_server sim_server;

/* A request we answer later (or never). Owned by the server's held list.
 * req and evcon are NULL once the connection is gone; a HOLD_DELAY call is
 * still processed when its timer fires, with nobody to answer. */
typedef struct sim_held {
    struct sim_held *prev;
    struct sim_held *next;
    sim_server *srv;
    struct evhttp_request *req;
    struct evhttp_connection *evcon;
    struct event *timer;
    struct event *watch;
    hold_kind kind;
    sim_call call;
} sim_held;

struct sim_server {
    struct event_base *base;
    struct evhttp *http_main;
    struct evhttp *http_ctl;
    struct evhttp_bound_socket *main_sock; /* NULL while refusing connections */
    char bind_addr[64];
    uint16_t port;
    uint16_t ctl_port;
    char *token;
    size_t token_len;
    const char *state_path;
    sim_store *store;
    sim_faults faults;
    sim_rng rng;
    struct event *settle_ev;
    int64_t settle_armed_ms;
    sim_held *held;
    size_t held_count;
    struct evbuffer *out; /* reply body, reused */
    sim_buf body;         /* JSON being built, reused */
};

static void settle_rearm(sim_server *s);

/* ---- small helpers ---------------------------------------------------- */

static void call_init(sim_call *c)
{
    memset(c, 0, offsetof(sim_call, key));
    c->key[0] = '\0';
    c->limit = LIST_LIMIT_DEFAULT;
}

static int SIM_PRINTF(3, 4) call_bad(sim_call *c, int status, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->bad_msg, sizeof(c->bad_msg), fmt, ap);
    va_end(ap);
    c->bad_status = status;
    return -1;
}

static bool printable_ascii(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (s[i] < 0x20 || s[i] > 0x7e)
            return false;
    return true;
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Percent-decodes one path segment into out (cap bytes incl. NUL). */
static int decode_segment(const char *s, size_t n, char *out, size_t cap, size_t *out_len)
{
    size_t j = 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (c == '%') {
            int hi, lo;
            if (i + 2 >= n || (hi = hexval(s[i + 1])) < 0 || (lo = hexval(s[i + 2])) < 0)
                return -1;
            c = (char)(hi * 16 + lo);
            i += 2;
        }
        if (j + 1 >= cap)
            return -1;
        out[j++] = c;
    }
    out[j] = '\0';
    *out_len = j;
    return 0;
}

static const char *reason_phrase(int code)
{
    switch (code) {
    case 200: return "OK";
    case 201: return "Created";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 409: return "Conflict";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 503: return "Service Unavailable";
    default: return "Unknown";
    }
}

/* {"error":{"code":..., "message":...}} into s->body. */
static void error_body(sim_server *s, const char *code, const char *message)
{
    sim_buf *b = &s->body;
    sim_buf_reset(b);
    sim_buf_adds(b, "{\"error\":{\"code\":");
    sim_buf_add_jstr(b, code, strlen(code));
    if (message != NULL) {
        sim_buf_adds(b, ",\"message\":");
        sim_buf_add_jstr(b, message, strlen(message));
    }
    sim_buf_adds(b, "}}");
}

static void reply(sim_server *s, struct evhttp_request *req, int code)
{
    evbuffer_add(s->out, s->body.data, s->body.len);
    if (code == 401)
        evhttp_add_header(evhttp_request_get_output_headers(req), "WWW-Authenticate", "Bearer");
    evhttp_send_reply(req, code, reason_phrase(code), s->out);
}

static void reply_error(sim_server *s, struct evhttp_request *req, int code, const char *ecode,
                        const char *message)
{
    error_body(s, ecode, message);
    reply(s, req, code);
}

/* ---- held requests ---------------------------------------------------- */

static void held_release(sim_held *h)
{
    sim_server *s = h->srv;
    if (h->prev != NULL)
        h->prev->next = h->next;
    else
        s->held = h->next;
    if (h->next != NULL)
        h->next->prev = h->prev;
    s->held_count--;
    if (h->timer != NULL)
        event_free(h->timer);
    if (h->watch != NULL)
        event_free(h->watch);
    if (h->evcon != NULL)
        evhttp_connection_set_closecb(h->evcon, NULL, NULL);
    free(h);
}

/* Closes the connection without an answer; frees the request with it. Only
 * from our own timer/watch callbacks. */
static void held_close_connection(sim_held *h)
{
    struct evhttp_connection *evcon = h->evcon;
    if (h->watch != NULL) {
        event_free(h->watch); /* before libevent closes the fd */
        h->watch = NULL;
    }
    h->evcon = NULL;
    h->req = NULL;
    if (evcon != NULL) {
        evhttp_connection_set_closecb(evcon, NULL, NULL);
        evhttp_connection_free(evcon);
    }
}

/* libevent is freeing the connection while we hold its request (only on
 * paths we do not expect, since reading is off; see the file comment). If
 * libevent detached the request from the connection, nobody else will free
 * it; otherwise it goes with the connection. */
static void held_conn_closed(struct evhttp_connection *evcon, void *arg)
{
    sim_held *h = arg;
    (void)evcon;
    if (h->watch != NULL) {
        event_free(h->watch);
        h->watch = NULL;
    }
    if (h->req != NULL && evhttp_request_get_connection(h->req) == NULL)
        evhttp_request_free(h->req);
    h->req = NULL;
    h->evcon = NULL;
    sim_log(SIM_LOG_DEBUG, "held request: connection freed by libevent");
    if (h->kind != HOLD_DELAY)
        held_release(h);
}

/* EV_READ on a held request's socket: EOF or an error means the client is
 * gone; bytes mean a pipelined request, which evhttp reads after our answer. */
static void held_watch_cb(evutil_socket_t fd, short what, void *arg)
{
    sim_held *h = arg;
    char c;
    (void)what;
    ssize_t n = recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n > 0) {
        event_del(h->watch);
        return;
    }
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        return;
    sim_log(SIM_LOG_DEBUG, "held request: client went away op=%s key=\"%s\"",
            sim_op_name(h->call.op), h->call.key);
    held_close_connection(h);
    if (h->kind != HOLD_DELAY)
        held_release(h);
}

static void held_timer_cb(evutil_socket_t fd, short what, void *arg);

/* Takes over req: it will be answered, or its connection closed, later.
 * call may be NULL except for HOLD_DELAY. */
static void hold(sim_server *s, struct evhttp_request *req, const sim_call *call, hold_kind kind,
                 int64_t delay_ms)
{
    sim_held *h = sim_xcalloc(1, sizeof(*h));
    struct bufferevent *bev;

    h->srv = s;
    h->kind = kind;
    h->req = req;
    h->evcon = evhttp_request_get_connection(req);
    if (call != NULL)
        h->call = *call;
    else
        call_init(&h->call);
    h->next = s->held;
    if (s->held != NULL)
        s->held->prev = h;
    s->held = h;
    s->held_count++;

    bev = evhttp_connection_get_bufferevent(h->evcon);
    bufferevent_disable(bev, EV_READ);
    evhttp_connection_set_closecb(h->evcon, held_conn_closed, h);
    if (kind != HOLD_DROP) {
        h->watch = event_new(s->base, bufferevent_getfd(bev), EV_READ | EV_PERSIST, held_watch_cb, h);
        if (h->watch == NULL || event_add(h->watch, NULL) != 0)
            sim_log(SIM_LOG_ERR, "cannot watch a held connection: disconnects go unnoticed");
    }
    if (kind != HOLD_BLACKHOLE) {
        struct timeval tv = {(time_t)(delay_ms / 1000), (suseconds_t)(delay_ms % 1000) * 1000};
        h->timer = evtimer_new(s->base, held_timer_cb, h);
        if (h->timer == NULL || evtimer_add(h->timer, &tv) != 0) {
            sim_log(SIM_LOG_ERR, "cannot arm a timer: out of memory?");
            abort();
        }
    }
}

/* ---- processing ------------------------------------------------------- */

static void payment_body(sim_server *s, const sim_payment *p)
{
    sim_buf_reset(&s->body);
    sim_payment_json(p, &s->body);
}

static bool same_create(const sim_payment *p, const sim_call *c)
{
    return p->amount == c->amount && memcmp(p->currency, c->currency, 3) == 0 &&
           p->account_len == c->account_len && memcmp(p->account, c->account, c->account_len) == 0 &&
           p->has_reference == c->has_reference &&
           (!c->has_reference ||
            (p->reference_len == c->reference_len &&
             memcmp(p->reference, c->reference, c->reference_len) == 0));
}

static int process_create(sim_server *s, const sim_call *c)
{
    sim_counters *ctr = sim_store_counters(s->store);
    int64_t now = sim_now_ms();
    sim_payment *p = sim_store_find(s->store, c->key, c->key_len);

    if (p != NULL) {
        sim_store_touch(s->store, p, now);
        if (p->tombstone) {
            ctr->tombstone_hits++;
        } else if (!same_create(p, c)) {
            ctr->conflicts++;
            error_body(s, "idempotency_conflict", NULL);
            return 409;
        } else {
            ctr->replays++;
        }
        payment_body(s, p);
        return 200;
    }

    sim_new_payment np = {
        .key = c->key,
        .key_len = c->key_len,
        .amount = c->amount,
        .currency = c->currency,
        .account = c->account,
        .account_len = c->account_len,
        .has_reference = c->has_reference,
        .reference = c->reference,
        .reference_len = c->reference_len,
    };
    if (sim_store_insert(s->store, &np, &p) != 0) {
        error_body(s, "capacity", "psp-sim holds --max-payments records");
        return 503;
    }
    ctr->processed_creates++;

    const sim_faults *f = &s->faults;
    const char *dcode = c->has_decline_code ? c->decline_code : NULL;
    sim_force force = c->force;
    if (force == FORCE_NONE && !c->has_sim_fate) {
        if (sim_rng_hit(&s->rng, f->decline_rate))
            force = FORCE_DECLINE;
        else if (sim_rng_hit(&s->rng, f->pending_rate))
            force = FORCE_PENDING;
    }
    switch (force) {
    case FORCE_DECLINE:
        sim_store_set_status(s->store, p, SIM_ST_DECLINED, dcode, "create");
        break;
    case FORCE_PENDING:
        sim_store_set_pending(s->store, p, now + f->settle_ms, f->settle_status, dcode);
        settle_rearm(s);
        break;
    case FORCE_NONE:
    case FORCE_SUCCEED:
        sim_store_set_status(s->store, p, SIM_ST_SUCCEEDED, NULL, "create");
        break;
    }
    payment_body(s, p);
    return 201;
}

static int process_get(sim_server *s, const sim_call *c)
{
    sim_payment *p = sim_store_find(s->store, c->key, c->key_len);
    if (p == NULL) {
        error_body(s, "not_found", NULL);
        return 404;
    }
    sim_store_touch(s->store, p, sim_now_ms());
    payment_body(s, p);
    return 200;
}

static int process_cancel(sim_server *s, const sim_call *c)
{
    if (s->faults.cancel_unsupported) {
        error_body(s, "cancel_unsupported", "this processor cannot cancel by idempotency key");
        return 501;
    }
    sim_payment *p = sim_store_find(s->store, c->key, c->key_len);
    if (p == NULL) {
        sim_new_payment np = {.key = c->key, .key_len = c->key_len, .tombstone = true};
        if (sim_store_insert(s->store, &np, &p) != 0) {
            error_body(s, "capacity", "psp-sim holds --max-payments records");
            return 503;
        }
        sim_store_counters(s->store)->tombstones++;
        sim_store_set_status(s->store, p, SIM_ST_CANCELED, NULL, "cancel of an unknown key");
        payment_body(s, p);
        return 200;
    }
    sim_store_touch(s->store, p, sim_now_ms());
    switch ((sim_status)p->status) {
    case SIM_ST_PENDING:
        sim_store_set_status(s->store, p, SIM_ST_CANCELED, NULL, "cancel");
        break;
    case SIM_ST_SUCCEEDED: {
        sim_buf *b = &s->body;
        sim_buf_reset(b);
        sim_buf_adds(b, "{\"error\":{\"code\":\"already_succeeded\"},\"payment\":");
        sim_payment_json(p, b);
        sim_buf_addc(b, '}');
        return 409;
    }
    default:
        break; /* declined or canceled: unchanged */
    }
    payment_body(s, p);
    return 200;
}

static int process_refund(sim_server *s, const sim_call *c)
{
    sim_payment *p = sim_store_find(s->store, c->key, c->key_len);
    if (p == NULL) {
        error_body(s, "not_found", NULL);
        return 404;
    }
    sim_store_touch(s->store, p, sim_now_ms());
    if (p->status != SIM_ST_SUCCEEDED) {
        error_body(s, "not_succeeded", NULL);
        return 409;
    }
    sim_store_refund(s->store, p);
    payment_body(s, p);
    return 200;
}

static int process_list(sim_server *s, const sim_call *c)
{
    sim_buf *b = &s->body;
    size_t i = sim_store_list_start(s->store, c->has_gte, c->gte, c->has_after, c->after_seq);
    int n = 0;
    bool more = false;

    sim_store_settle_due(s->store, sim_now_ms());
    settle_rearm(s);
    sim_buf_reset(b);
    sim_buf_adds(b, "{\"data\":[");
    for (sim_payment *p; (p = sim_store_at(s->store, i)) != NULL; i++) {
        if (c->has_lt && p->created >= c->lt)
            break;
        if (n == c->limit) {
            more = true;
            break;
        }
        if (n++ > 0)
            sim_buf_addc(b, ',');
        sim_payment_json(p, b);
    }
    sim_buf_adds(b, more ? "],\"has_more\":true}" : "],\"has_more\":false}");
    return 200;
}

/* Processes a call whose time has come, into s->body. Returns the HTTP
 * status to answer, or 0 to close the connection without an answer. */
static int execute(sim_server *s, const sim_call *c)
{
    sim_counters *ctr = sim_store_counters(s->store);
    int code;

    if (c->bad_status != 0) {
        error_body(s, "invalid_request", c->bad_msg);
        return c->bad_status;
    }
    if (c->fate == FATE_FAIL_BEFORE) {
        ctr->failed_before++;
        sim_log(SIM_LOG_DEBUG, "fault fail_before op=%s key=\"%s\"", sim_op_name(c->op), c->key);
        error_body(s, "simulated_failure", "psp-sim fail_before: nothing was processed");
        return 503;
    }
    switch (c->op) {
    case SIM_OP_CREATE: code = process_create(s, c); break;
    case SIM_OP_GET: code = process_get(s, c); break;
    case SIM_OP_CANCEL: code = process_cancel(s, c); break;
    case SIM_OP_REFUND: code = process_refund(s, c); break;
    case SIM_OP_LIST: code = process_list(s, c); break;
    default: code = 500; break;
    }
    sim_log(SIM_LOG_DEBUG, "request op=%s key=\"%s\" status=%d", sim_op_name(c->op), c->key, code);
    if (c->fate == FATE_FAIL_AFTER) {
        ctr->failed_after++;
        sim_log(SIM_LOG_DEBUG, "fault fail_after op=%s key=\"%s\"", sim_op_name(c->op), c->key);
        error_body(s, "simulated_failure", "psp-sim fail_after: the request was processed");
        return 500;
    }
    if (c->fate == FATE_DROP_AFTER) {
        ctr->dropped_after++;
        sim_log(SIM_LOG_DEBUG, "fault drop_after op=%s key=\"%s\"", sim_op_name(c->op), c->key);
        return 0;
    }
    return code;
}

static void held_timer_cb(evutil_socket_t fd, short what, void *arg)
{
    sim_held *h = arg;
    sim_server *s = h->srv;
    (void)fd;
    (void)what;

    if (h->watch != NULL) {
        event_free(h->watch);
        h->watch = NULL;
    }
    if (h->kind == HOLD_DROP) {
        held_close_connection(h);
    } else {
        int code = execute(s, &h->call);
        if (h->req == NULL) {
            sim_log(SIM_LOG_DEBUG, "processed op=%s key=\"%s\" for a client that went away",
                    sim_op_name(h->call.op), h->call.key);
        } else if (code == 0) {
            held_close_connection(h);
        } else {
            struct evhttp_request *req = h->req;
            evhttp_connection_set_closecb(h->evcon, NULL, NULL);
            h->evcon = NULL;
            h->req = NULL;
            reply(s, req, code);
        }
    }
    held_release(h);
}

/* ---- parsing ---------------------------------------------------------- */

static const cJSON *jget(const cJSON *o, const char *name)
{
    return cJSON_GetObjectItemCaseSensitive(o, name);
}

static bool jabsent(const cJSON *v)
{
    return v == NULL || cJSON_IsNull(v);
}

static int parse_metadata(sim_call *c, const cJSON *md)
{
    static const struct {
        const char *name;
        sim_fate fate;
        sim_force force;
    } sims[] = {
        {"succeed", FATE_NORMAL, FORCE_SUCCEED},
        {"decline", FATE_NORMAL, FORCE_DECLINE},
        {"pending", FATE_NORMAL, FORCE_PENDING},
        {"fail_before", FATE_FAIL_BEFORE, FORCE_SUCCEED},
        {"fail_after", FATE_FAIL_AFTER, FORCE_SUCCEED},
        {"drop_after", FATE_DROP_AFTER, FORCE_SUCCEED},
        {"blackhole", FATE_BLACKHOLE, FORCE_SUCCEED},
    };
    const cJSON *v;

    if (jabsent(md))
        return 0;
    if (!cJSON_IsObject(md))
        return call_bad(c, 400, "metadata must be an object");
    v = jget(md, "sim");
    if (!jabsent(v)) {
        size_t i;
        for (i = 0; i < SIM_ARRAY_LEN(sims); i++)
            if (cJSON_IsString(v) && strcmp(v->valuestring, sims[i].name) == 0)
                break;
        if (i == SIM_ARRAY_LEN(sims))
            return call_bad(c, 400, "metadata.sim must be one of succeed, decline, pending, "
                                    "fail_before, fail_after, drop_after, blackhole");
        c->has_sim_fate = true;
        c->fate = sims[i].fate;
        c->force = sims[i].force;
    }
    v = jget(md, "sim_latency_ms");
    if (!jabsent(v)) {
        int64_t ms;
        if (cJSON_IsString(v)) {
            if (sim_parse_i64(v->valuestring, strlen(v->valuestring), false, &ms) != 0)
                ms = -1;
        } else if (cJSON_IsNumber(v) && v->valuedouble == (double)(int64_t)v->valuedouble) {
            ms = (int64_t)v->valuedouble;
        } else {
            ms = -1;
        }
        if (ms < 0 || ms > SIM_LATENCY_MAX_MS)
            return call_bad(c, 400, "metadata.sim_latency_ms must be digits, at most %d",
                            SIM_LATENCY_MAX_MS);
        c->has_latency = true;
        c->latency_ms = ms;
    }
    v = jget(md, "sim_decline_code");
    if (!jabsent(v)) {
        size_t n = cJSON_IsString(v) ? strlen(v->valuestring) : 0;
        if (n == 0 || n > SIM_DECLINE_CODE_MAX || !printable_ascii(v->valuestring, n))
            return call_bad(c, 400, "metadata.sim_decline_code must be 1..%d printable characters",
                            SIM_DECLINE_CODE_MAX);
        memcpy(c->decline_code, v->valuestring, n + 1);
        c->has_decline_code = true;
    }
    return 0;
}

static int parse_create(sim_call *c, struct evhttp_request *req)
{
    int rc = -1;
    const char *hkey = evhttp_find_header(evhttp_request_get_input_headers(req), "Idempotency-Key");
    struct evbuffer *in = evhttp_request_get_input_buffer(req);
    size_t len = evbuffer_get_length(in);
    cJSON *root = NULL;
    const cJSON *v;

    if (hkey == NULL)
        return call_bad(c, 400, "missing Idempotency-Key header");
    root = cJSON_ParseWithLength((const char *)evbuffer_pullup(in, -1), len);
    if (!cJSON_IsObject(root)) {
        call_bad(c, 400, "body must be a JSON object");
        goto out;
    }
    v = jget(root, "idempotency_key");
    if (!cJSON_IsString(v) || strcmp(v->valuestring, hkey) != 0) {
        call_bad(c, 400, "idempotency_key must be a string equal to the Idempotency-Key header");
        goto out;
    }
    c->key_len = strlen(hkey);
    if (c->key_len == 0 || c->key_len > SIM_KEY_MAX || !printable_ascii(hkey, c->key_len)) {
        call_bad(c, 400, "idempotency key must be 1..%d printable ASCII characters", SIM_KEY_MAX);
        goto out;
    }
    memcpy(c->key, hkey, c->key_len + 1);
    v = jget(root, "amount");
    if (!cJSON_IsNumber(v) || v->valuedouble != (double)(int64_t)v->valuedouble ||
        v->valuedouble < 1 || v->valuedouble > 9007199254740991.0) {
        call_bad(c, 400, "amount must be a positive integer (minor units)");
        goto out;
    }
    c->amount = (int64_t)v->valuedouble;
    v = jget(root, "currency");
    if (!cJSON_IsString(v) || strlen(v->valuestring) != 3 || v->valuestring[0] < 'A' ||
        v->valuestring[0] > 'Z' || v->valuestring[1] < 'A' || v->valuestring[1] > 'Z' ||
        v->valuestring[2] < 'A' || v->valuestring[2] > 'Z') {
        call_bad(c, 400, "currency must be three capital letters");
        goto out;
    }
    memcpy(c->currency, v->valuestring, 4);
    v = jget(root, "account");
    c->account_len = cJSON_IsString(v) ? strlen(v->valuestring) : 0;
    if (c->account_len == 0 || c->account_len > SIM_ACCOUNT_MAX) {
        call_bad(c, 400, "account must be a string of 1..%d bytes", SIM_ACCOUNT_MAX);
        goto out;
    }
    memcpy(c->account, v->valuestring, c->account_len + 1);
    v = jget(root, "reference");
    if (!jabsent(v)) {
        c->reference_len = cJSON_IsString(v) ? strlen(v->valuestring) : SIM_REFERENCE_MAX + 1;
        if (c->reference_len > SIM_REFERENCE_MAX) {
            call_bad(c, 400, "reference must be null or a string of at most %d bytes",
                     SIM_REFERENCE_MAX);
            goto out;
        }
        memcpy(c->reference, v->valuestring, c->reference_len + 1);
        c->has_reference = true;
    }
    if (parse_metadata(c, jget(root, "metadata")) != 0)
        goto out;
    rc = 0;
out:
    cJSON_Delete(root);
    return rc;
}

static int parse_list(sim_call *c, const char *query)
{
    int rc = -1;
    struct evkeyvalq params;
    struct evkeyval *kv;

    TAILQ_INIT(&params);
    if (query == NULL)
        return 0;
    if (evhttp_parse_query_str(query, &params) != 0) {
        call_bad(c, 400, "malformed query string");
        goto out;
    }
    TAILQ_FOREACH(kv, &params, next) {
        size_t n = strlen(kv->value);
        int64_t v;
        if (strcmp(kv->key, "created_gte") == 0 || strcmp(kv->key, "created_lt") == 0) {
            bool gte = kv->key[8] == 'g';
            if (sim_parse_i64(kv->value, n, true, &v) != 0) {
                call_bad(c, 400, "%s must be an integer (unix seconds)", kv->key);
                goto out;
            }
            if (gte) {
                c->has_gte = true;
                c->gte = v;
            } else {
                c->has_lt = true;
                c->lt = v;
            }
        } else if (strcmp(kv->key, "limit") == 0) {
            if (sim_parse_i64(kv->value, n, false, &v) != 0 || v < 1 || v > LIST_LIMIT_MAX) {
                call_bad(c, 400, "limit must be an integer in 1..%d", LIST_LIMIT_MAX);
                goto out;
            }
            c->limit = (int)v;
        } else if (strcmp(kv->key, "starting_after") == 0) {
            if (sim_parse_id(kv->value, n, &c->after_seq) != 0) {
                call_bad(c, 400, "starting_after must be a payment id (psp_...)");
                goto out;
            }
            c->has_after = true;
        }
    }
    rc = 0;
out:
    evhttp_clear_headers(&params);
    return rc;
}

/* Chooses the fate of a valid call: metadata.sim wins, then the rates of
 * the ops in fault_ops, in this order: blackhole, fail_before, fail_after,
 * drop_after (each drawn only if the previous did not hit). */
static sim_fate decide_fate(sim_server *s, const sim_call *c)
{
    const sim_faults *f = &s->faults;
    if (c->bad_status != 0)
        return FATE_NORMAL;
    if (c->has_sim_fate)
        return c->fate;
    if (!sim_faults_applies(f, c->op))
        return FATE_NORMAL;
    if (f->blackhole)
        return FATE_BLACKHOLE;
    if (sim_rng_hit(&s->rng, f->fail_before_rate))
        return FATE_FAIL_BEFORE;
    if (sim_rng_hit(&s->rng, f->fail_after_rate))
        return FATE_FAIL_AFTER;
    if (sim_rng_hit(&s->rng, f->drop_after_rate))
        return FATE_DROP_AFTER;
    return FATE_NORMAL;
}

static bool authorized(const sim_server *s, struct evhttp_request *req)
{
    if (s->token == NULL)
        return true;
    const char *h = evhttp_find_header(evhttp_request_get_input_headers(req), "Authorization");
    if (h == NULL || strncasecmp(h, "Bearer ", 7) != 0)
        return false;
    h += 7;
    size_t n = strlen(h);
    unsigned char diff = n != s->token_len;
    for (size_t i = 0; i < s->token_len; i++)
        diff |= (unsigned char)(s->token[i] ^ (i < n ? h[i] : 0));
    return diff == 0;
}

/* ---- /v1 -------------------------------------------------------------- */

#define PAYMENTS_PATH "/v1/payments"

static void handle_v1(sim_server *s, struct evhttp_request *req, const char *path, size_t path_len,
                      const char *query)
{
    enum evhttp_cmd_type method = evhttp_request_get_command(req);
    const size_t plen = sizeof(PAYMENTS_PATH) - 1;
    sim_call call;
    enum evhttp_cmd_type want;

    call_init(&call);
    if (path_len < plen || memcmp(path, PAYMENTS_PATH, plen) != 0) {
        reply_error(s, req, 404, "not_found", "no such endpoint");
        return;
    }
    if (path_len == plen) {
        call.op = method == EVHTTP_REQ_GET ? SIM_OP_LIST : SIM_OP_CREATE;
        want = method == EVHTTP_REQ_GET ? EVHTTP_REQ_GET : EVHTTP_REQ_POST;
    } else if (path[plen] == '/') {
        const char *seg = path + plen + 1;
        const char *end = path + path_len;
        const char *slash = memchr(seg, '/', (size_t)(end - seg));
        const char *tail = slash != NULL ? slash : end;
        size_t tail_len = (size_t)(end - tail);
        if (tail_len == 0) {
            call.op = SIM_OP_GET;
            want = EVHTTP_REQ_GET;
        } else if (tail_len == 7 && memcmp(tail, "/cancel", 7) == 0) {
            call.op = SIM_OP_CANCEL;
            want = EVHTTP_REQ_POST;
        } else if (tail_len == 7 && memcmp(tail, "/refund", 7) == 0) {
            call.op = SIM_OP_REFUND;
            want = EVHTTP_REQ_POST;
        } else {
            reply_error(s, req, 404, "not_found", "no such endpoint");
            return;
        }
        if (decode_segment(seg, (size_t)(tail - seg), call.key, sizeof(call.key), &call.key_len) != 0 ||
            call.key_len == 0 || !printable_ascii(call.key, call.key_len))
            call_bad(&call, 400, "the key in the path must be 1..%d printable ASCII characters "
                                 "(percent-encoded)", SIM_KEY_MAX);
    } else {
        reply_error(s, req, 404, "not_found", "no such endpoint");
        return;
    }
    if (method != want) {
        reply_error(s, req, 405, "method_not_allowed", NULL);
        return;
    }

    sim_counters *ctr = sim_store_counters(s->store);
    ctr->requests[call.op]++;
    if (s->faults.refuse_connections) {
        /* The listener is closed; this connection was opened before. */
        ctr->refused++;
        hold(s, req, NULL, HOLD_DROP, 0);
        return;
    }
    if (!authorized(s, req)) {
        reply_error(s, req, 401, "unauthorized", "missing or wrong bearer token");
        return;
    }
    if (call.bad_status == 0) {
        if (call.op == SIM_OP_CREATE)
            (void)parse_create(&call, req);
        else if (call.op == SIM_OP_LIST)
            (void)parse_list(&call, query);
    }
    call.fate = decide_fate(s, &call);

    int64_t delay = call.has_latency
                        ? call.latency_ms
                        : s->faults.latency_ms + (int64_t)sim_rng_upto(&s->rng, (uint64_t)s->faults.jitter_ms);
    if (call.fate == FATE_BLACKHOLE) {
        ctr->blackholed++;
        sim_log(SIM_LOG_DEBUG, "fault blackhole op=%s key=\"%s\"", sim_op_name(call.op), call.key);
        hold(s, req, &call, HOLD_BLACKHOLE, 0);
        return;
    }
    if (delay > 0) {
        hold(s, req, &call, HOLD_DELAY, delay);
        return;
    }
    int code = execute(s, &call);
    if (code == 0)
        hold(s, req, NULL, HOLD_DROP, 0); /* closing inside this callback is not safe */
    else
        reply(s, req, code);
}

/* ---- /control --------------------------------------------------------- */

static int set_refusing(sim_server *s, bool refuse)
{
    if (refuse && s->main_sock != NULL) {
        evhttp_del_accept_socket(s->http_main, s->main_sock);
        s->main_sock = NULL;
        sim_log(SIM_LOG_INFO, "refusing connections on port=%u", s->port);
    } else if (!refuse && s->main_sock == NULL) {
        s->main_sock = evhttp_bind_socket_with_handle(s->http_main, s->bind_addr, s->port);
        if (s->main_sock == NULL) {
            sim_log(SIM_LOG_ERR, "cannot listen again on %s port=%u: %s", s->bind_addr, s->port,
                    strerror(errno));
            return -1;
        }
        sim_log(SIM_LOG_INFO, "accepting connections again on port=%u", s->port);
    }
    return 0;
}

/* Applies new faults; the listener follows refuse_connections. */
static int apply_faults(sim_server *s, const sim_faults *next, bool reseed)
{
    sim_faults f = *next;
    int rc = 0;
    if (set_refusing(s, f.refuse_connections) != 0) {
        f.refuse_connections = true;
        rc = -1;
    }
    if (reseed)
        sim_rng_seed(&s->rng, f.seed);
    s->faults = f;
    return rc;
}

static void control_status_body(sim_server *s)
{
    sim_buf *b = &s->body;
    const uint64_t *sc = sim_store_status_counts(s->store);

    sim_store_settle_due(s->store, sim_now_ms());
    settle_rearm(s);
    sim_buf_reset(b);
    sim_buf_adds(b, "{\"faults\":");
    sim_faults_json(&s->faults, b);
    sim_buf_adds(b, ",\"counters\":");
    sim_counters_json(sim_store_counters(s->store), b);
    sim_buf_adds(b, ",\"payments\":");
    sim_buf_add_u64(b, sim_store_count(s->store));
    sim_buf_adds(b, ",\"statuses\":{");
    for (int st = SIM_ST_SUCCEEDED; st < SIM_ST__COUNT; st++) {
        sim_buf_addf(b, "%s\"%s\":", st == SIM_ST_SUCCEEDED ? "" : ",", sim_status_name((sim_status)st));
        sim_buf_add_u64(b, sc[st]);
    }
    sim_buf_adds(b, "},\"held_requests\":");
    sim_buf_add_u64(b, s->held_count);
    sim_buf_addf(b, ",\"port\":%u,\"control_port\":%u,\"accepting\":%s}", s->port, s->ctl_port,
                 s->main_sock != NULL ? "true" : "false");
}

static void faults_log(sim_server *s, const char *what)
{
    sim_buf b;
    sim_buf_init(&b);
    sim_faults_json(&s->faults, &b);
    sim_log(SIM_LOG_INFO, "control %s faults=%s", what, b.data);
    sim_buf_free(&b);
}

static bool query_flag(const char *query, const char *name)
{
    struct evkeyvalq params;
    bool on = false;
    TAILQ_INIT(&params);
    if (query != NULL && evhttp_parse_query_str(query, &params) == 0) {
        const char *v = evhttp_find_header(&params, name);
        on = v != NULL && (strcmp(v, "1") == 0 || strcmp(v, "true") == 0);
    }
    evhttp_clear_headers(&params);
    return on;
}

static void handle_control(sim_server *s, struct evhttp_request *req, const char *path, size_t path_len,
                           const char *query)
{
    enum evhttp_cmd_type method = evhttp_request_get_command(req);
    char err[256];

#define PATH_IS(lit) (path_len == sizeof(lit) - 1 && memcmp(path, lit, sizeof(lit) - 1) == 0)
    if (PATH_IS("/control")) {
        if (method == EVHTTP_REQ_GET) {
            control_status_body(s);
            reply(s, req, 200);
        } else if (method == EVHTTP_REQ_POST) {
            struct evbuffer *in = evhttp_request_get_input_buffer(req);
            size_t len = evbuffer_get_length(in);
            sim_faults next = s->faults;
            bool reseed;
            if (sim_faults_update(&next, (const char *)evbuffer_pullup(in, -1), len, &reseed, err,
                                  sizeof(err)) != 0) {
                reply_error(s, req, 400, "invalid_request", err);
                return;
            }
            int rc = apply_faults(s, &next, reseed);
            faults_log(s, "update");
            if (rc != 0) {
                reply_error(s, req, 500, "listen_failed", "cannot listen again on the /v1 port");
                return;
            }
            control_status_body(s);
            reply(s, req, 200);
        } else {
            reply_error(s, req, 405, "method_not_allowed", NULL);
        }
    } else if (PATH_IS("/control/reset")) {
        if (method != EVHTTP_REQ_POST) {
            reply_error(s, req, 405, "method_not_allowed", NULL);
            return;
        }
        sim_faults next = s->faults;
        sim_faults_defaults(&next);
        int rc = apply_faults(s, &next, false);
        if (query_flag(query, "payments")) {
            sim_store_clear(s->store);
            settle_rearm(s);
            sim_log(SIM_LOG_INFO, "control reset: payments and counters forgotten");
        }
        faults_log(s, "reset");
        if (rc != 0) {
            reply_error(s, req, 500, "listen_failed", "cannot listen again on the /v1 port");
            return;
        }
        control_status_body(s);
        reply(s, req, 200);
    } else if (PATH_IS("/control/save")) {
        if (method != EVHTTP_REQ_POST) {
            reply_error(s, req, 405, "method_not_allowed", NULL);
            return;
        }
        if (s->state_path == NULL) {
            reply_error(s, req, 409, "no_state_file", "psp-sim was started without --state");
            return;
        }
        if (sim_store_save(s->store, s->state_path, err, sizeof(err)) != 0) {
            sim_log(SIM_LOG_ERR, "save state: %s", err);
            reply_error(s, req, 500, "save_failed", err);
            return;
        }
        sim_log(SIM_LOG_INFO, "state saved path=%s payments=%zu", s->state_path, sim_store_count(s->store));
        sim_buf_reset(&s->body);
        sim_buf_addf(&s->body, "{\"saved\":true,\"payments\":%zu}", sim_store_count(s->store));
        reply(s, req, 200);
    } else {
        reply_error(s, req, 404, "not_found", "no such endpoint");
    }
#undef PATH_IS
}

static bool is_control_path(const char *path, size_t n)
{
    return n >= 8 && memcmp(path, "/control", 8) == 0 && (n == 8 || path[8] == '/');
}

static void split_uri(struct evhttp_request *req, const char **path, size_t *path_len, const char **query)
{
    const char *uri = evhttp_request_get_uri(req);
    const char *q = strchr(uri, '?');
    *path = uri;
    *path_len = q != NULL ? (size_t)(q - uri) : strlen(uri);
    *query = q != NULL ? q + 1 : NULL;
}

/* evhttp callback of the /v1 listener: /v1/... and /control... */
static void main_request_cb(struct evhttp_request *req, void *arg)
{
    sim_server *s = arg;
    const char *path, *query;
    size_t path_len;
    split_uri(req, &path, &path_len, &query);
    if (is_control_path(path, path_len))
        handle_control(s, req, path, path_len, query);
    else
        handle_v1(s, req, path, path_len, query);
}

/* evhttp callback of the control listener: /control... only. */
static void control_request_cb(struct evhttp_request *req, void *arg)
{
    sim_server *s = arg;
    const char *path, *query;
    size_t path_len;
    split_uri(req, &path, &path_len, &query);
    if (is_control_path(path, path_len))
        handle_control(s, req, path, path_len, query);
    else
        reply_error(s, req, 404, "not_found", "the control port serves /control only");
}

/* ---- settlement timer, signals, setup --------------------------------- */

static void settle_cb(evutil_socket_t fd, short what, void *arg)
{
    sim_server *s = arg;
    (void)fd;
    (void)what;
    s->settle_armed_ms = -1;
    sim_store_settle_due(s->store, sim_now_ms());
    settle_rearm(s);
}

/* Arms the settlement timer for the earliest queued settlement. */
static void settle_rearm(sim_server *s)
{
    int64_t next = sim_store_next_settle_ms(s->store);
    if (next < 0) {
        evtimer_del(s->settle_ev);
        s->settle_armed_ms = -1;
        return;
    }
    if (next == s->settle_armed_ms)
        return;
    int64_t delay = next - sim_now_ms();
    if (delay < 0)
        delay = 0;
    struct timeval tv = {(time_t)(delay / 1000), (suseconds_t)(delay % 1000) * 1000};
    evtimer_add(s->settle_ev, &tv);
    s->settle_armed_ms = next;
}

static void signal_cb(evutil_socket_t sig, short what, void *arg)
{
    sim_server *s = arg;
    (void)what;
    sim_log(SIM_LOG_INFO, "signal %d: shutting down", (int)sig);
    event_base_loopbreak(s->base);
}

static bool loopback_address(const char *addr)
{
    struct in_addr a4;
    struct in6_addr a6;
    if (inet_pton(AF_INET, addr, &a4) == 1)
        return (ntohl(a4.s_addr) >> 24) == 127;
    if (inet_pton(AF_INET6, addr, &a6) == 1)
        return IN6_IS_ADDR_LOOPBACK(&a6);
    return false;
}

static uint16_t bound_port(struct evhttp_bound_socket *sock)
{
    struct sockaddr_storage ss;
    socklen_t len = sizeof(ss);
    if (getsockname(evhttp_bound_socket_get_fd(sock), (struct sockaddr *)&ss, &len) != 0)
        return 0;
    if (ss.ss_family == AF_INET)
        return ntohs(((struct sockaddr_in *)&ss)->sin_port);
    return ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
}

static struct evhttp *new_http(sim_server *s, void (*cb)(struct evhttp_request *, void *))
{
    struct evhttp *http = evhttp_new(s->base);
    if (http == NULL)
        return NULL;
    evhttp_set_max_body_size(http, SIM_BODY_MAX);
    evhttp_set_max_headers_size(http, SIM_HEADERS_MAX);
    evhttp_set_default_content_type(http, "application/json");
    evhttp_set_allowed_methods(http, EVHTTP_REQ_GET | EVHTTP_REQ_POST | EVHTTP_REQ_PUT |
                                         EVHTTP_REQ_DELETE | EVHTTP_REQ_PATCH | EVHTTP_REQ_HEAD);
    if (evhttp_set_flags(http, EVHTTP_SERVER_LINGERING_CLOSE) != 0)
        sim_log(SIM_LOG_WARNING, "lingering close unsupported");
    evhttp_set_gencb(http, cb, s);
    return http;
}

static int read_token_file(const char *path, char **out)
{
    int rc = -1;
    char buf[TOKEN_MAX + 1];
    size_t n;
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        fprintf(stderr, "psp-sim: --token-file %s: %s\n", path, strerror(errno));
        return -1;
    }
    n = fread(buf, 1, sizeof(buf), f);
    if (ferror(f) || n > TOKEN_MAX) {
        fprintf(stderr, "psp-sim: --token-file %s: unreadable or longer than %d bytes\n", path, TOKEN_MAX);
        goto out;
    }
    while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == '\r' || buf[n - 1] == ' ' || buf[n - 1] == '\t'))
        n--;
    buf[n] = '\0';
    if (n == 0 || !printable_ascii(buf, n)) {
        fprintf(stderr, "psp-sim: --token-file %s: empty or not printable ASCII\n", path);
        goto out;
    }
    *out = sim_xmalloc(n + 1);
    memcpy(*out, buf, n + 1);
    rc = 0;
out:
    fclose(f);
    return rc;
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: psp-sim --port P [--control-port C] [--bind 127.0.0.1]\n"
            "               [--token T | --token-file F] [--state FILE]\n"
            "               [--max-payments N] [--quiet | --verbose]\n"
            "The test payment processor of PROCESSOR.md; see docs/processor.md.\n");
}

static int parse_port(const char *s, uint16_t *out)
{
    int64_t v;
    if (sim_parse_i64(s, strlen(s), false, &v) != 0 || v > 65535)
        return -1;
    *out = (uint16_t)v;
    return 0;
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"port", required_argument, NULL, 'p'},
        {"control-port", required_argument, NULL, 'c'},
        {"bind", required_argument, NULL, 'b'},
        {"token", required_argument, NULL, 't'},
        {"token-file", required_argument, NULL, 'T'},
        {"state", required_argument, NULL, 's'},
        {"max-payments", required_argument, NULL, 'm'},
        {"quiet", no_argument, NULL, 'q'},
        {"verbose", no_argument, NULL, 'v'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    static sim_server srv;
    sim_server *s = &srv;
    bool have_port = false;
    uint16_t ctl_port = 0;
    const char *token = NULL, *token_file = NULL;
    int64_t max_payments = DEFAULT_MAX_PAYMENTS;
    struct event *sig_term = NULL, *sig_int = NULL;
    struct evhttp_bound_socket *ctl_sock;
    char err[512];
    int rc = 1;
    int opt;

    snprintf(s->bind_addr, sizeof(s->bind_addr), "127.0.0.1");
    while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (opt) {
        case 'p':
            if (parse_port(optarg, &s->port) != 0) {
                fprintf(stderr, "psp-sim: bad --port %s\n", optarg);
                return 2;
            }
            have_port = true;
            break;
        case 'c':
            if (parse_port(optarg, &ctl_port) != 0) {
                fprintf(stderr, "psp-sim: bad --control-port %s\n", optarg);
                return 2;
            }
            break;
        case 'b':
            if ((size_t)snprintf(s->bind_addr, sizeof(s->bind_addr), "%s", optarg) >= sizeof(s->bind_addr)) {
                fprintf(stderr, "psp-sim: bad --bind %s\n", optarg);
                return 2;
            }
            break;
        case 't': token = optarg; break;
        case 'T': token_file = optarg; break;
        case 's': s->state_path = optarg; break;
        case 'm':
            if (sim_parse_i64(optarg, strlen(optarg), false, &max_payments) != 0 || max_payments < 1) {
                fprintf(stderr, "psp-sim: bad --max-payments %s\n", optarg);
                return 2;
            }
            break;
        case 'q': sim_log_level = 0; break;
        case 'v': sim_log_level = 2; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (!have_port || optind != argc) {
        usage(stderr);
        return 2;
    }
    if (!loopback_address(s->bind_addr)) {
        fprintf(stderr, "psp-sim: refusing to bind %s: only loopback addresses (127.0.0.0/8, ::1)\n",
                s->bind_addr);
        return 2;
    }
    if (token != NULL && token_file != NULL) {
        fprintf(stderr, "psp-sim: give --token or --token-file, not both\n");
        return 2;
    }
    if (token != NULL) {
        size_t n = strlen(token);
        if (n == 0 || n > TOKEN_MAX || !printable_ascii(token, n)) {
            fprintf(stderr, "psp-sim: --token must be 1..%d printable ASCII characters\n", TOKEN_MAX);
            return 2;
        }
        s->token = sim_xmalloc(n + 1);
        memcpy(s->token, token, n + 1);
    } else if (token_file != NULL && read_token_file(token_file, &s->token) != 0) {
        return 2;
    }
    s->token_len = s->token != NULL ? strlen(s->token) : 0;

    signal(SIGPIPE, SIG_IGN);
    s->store = sim_store_new((size_t)max_payments);
    sim_buf_init(&s->body);
    s->settle_armed_ms = -1;
    if (s->state_path != NULL) {
        if (sim_store_load(s->store, s->state_path, err, sizeof(err)) != 0) {
            fprintf(stderr, "psp-sim: load state: %s\n", err);
            goto out;
        }
        sim_log(SIM_LOG_INFO, "state loaded path=%s payments=%zu", s->state_path, sim_store_count(s->store));
    }
    s->faults.seed = ((uint64_t)time(NULL) << 20) ^ (uint64_t)getpid();
    sim_faults_defaults(&s->faults);
    sim_rng_seed(&s->rng, s->faults.seed);

    s->base = event_base_new();
    s->out = evbuffer_new();
    if (s->base == NULL || s->out == NULL) {
        fprintf(stderr, "psp-sim: cannot create the event loop\n");
        goto out;
    }
    s->settle_ev = evtimer_new(s->base, settle_cb, s);
    sig_term = evsignal_new(s->base, SIGTERM, signal_cb, s);
    sig_int = evsignal_new(s->base, SIGINT, signal_cb, s);
    if (s->settle_ev == NULL || sig_term == NULL || sig_int == NULL || evsignal_add(sig_term, NULL) != 0 ||
        evsignal_add(sig_int, NULL) != 0) {
        fprintf(stderr, "psp-sim: cannot set up timers and signals\n");
        goto out;
    }
    s->http_main = new_http(s, main_request_cb);
    s->http_ctl = new_http(s, control_request_cb);
    if (s->http_main == NULL || s->http_ctl == NULL) {
        fprintf(stderr, "psp-sim: cannot create the HTTP servers\n");
        goto out;
    }
    s->main_sock = evhttp_bind_socket_with_handle(s->http_main, s->bind_addr, s->port);
    if (s->main_sock == NULL) {
        fprintf(stderr, "psp-sim: cannot listen on %s port %u: %s\n", s->bind_addr, s->port, strerror(errno));
        goto out;
    }
    s->port = bound_port(s->main_sock);
    ctl_sock = evhttp_bind_socket_with_handle(s->http_ctl, s->bind_addr, ctl_port);
    if (ctl_sock == NULL) {
        fprintf(stderr, "psp-sim: cannot listen on %s control port %u: %s\n", s->bind_addr, ctl_port,
                strerror(errno));
        goto out;
    }
    s->ctl_port = bound_port(ctl_sock);
    settle_rearm(s);

    sim_log(SIM_LOG_INFO, "listening bind=%s port=%u control_port=%u auth=%s state=%s payments=%zu",
            s->bind_addr, s->port, s->ctl_port, s->token != NULL ? "bearer" : "none",
            s->state_path != NULL ? s->state_path : "-", sim_store_count(s->store));
    printf("psp-sim listening port=%u control_port=%u\n", s->port, s->ctl_port);
    fflush(stdout);

    if (event_base_dispatch(s->base) < 0) {
        fprintf(stderr, "psp-sim: event loop failed\n");
        goto out;
    }
    rc = 0;
    if (s->state_path != NULL) {
        if (sim_store_save(s->store, s->state_path, err, sizeof(err)) != 0) {
            sim_log(SIM_LOG_ERR, "save state: %s", err);
            rc = 1;
        } else {
            sim_log(SIM_LOG_INFO, "state saved path=%s payments=%zu", s->state_path,
                    sim_store_count(s->store));
        }
    }
out:
    /* Held requests first (without touching their requests), then the
     * servers, which free every connection and the requests on them. */
    while (s->held != NULL)
        held_release(s->held);
    if (s->http_main != NULL)
        evhttp_free(s->http_main);
    if (s->http_ctl != NULL)
        evhttp_free(s->http_ctl);
    if (sig_term != NULL)
        event_free(sig_term);
    if (sig_int != NULL)
        event_free(sig_int);
    if (s->settle_ev != NULL)
        event_free(s->settle_ev);
    if (s->out != NULL)
        evbuffer_free(s->out);
    if (s->base != NULL)
        event_base_free(s->base);
    sim_store_free(s->store);
    sim_buf_free(&s->body);
    free(s->token);
    return rc;
}
