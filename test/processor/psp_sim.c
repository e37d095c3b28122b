/*
 * psp_sim.c - psp-sim, the test payment processor: the generic processor contract (docs/processor.md)
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
#include "sim_server.h"
#include "sim_webhook.h"


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
#define TOKEN_MAX 4096

/* ---- small helpers ---------------------------------------------------- */

void sim_call_init(sim_call *c)
{
    memset(c, 0, offsetof(sim_call, key));
    c->key[0] = '\0';
    c->limit = 100;
}

int sim_call_bad(sim_call *c, int status, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->bad_msg, sizeof(c->bad_msg), fmt, ap);
    va_end(ap);
    c->bad_status = status;
    return -1;
}

bool sim_printable_ascii(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (s[i] < 0x20 || s[i] > 0x7e)
            return false;
    return true;
}

int sim_hexval(char c)
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
int sim_decode_segment(const char *s, size_t n, char *out, size_t cap, size_t *out_len)
{
    size_t j = 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (c == '%') {
            int hi, lo;
            if (i + 2 >= n || (hi = sim_hexval(s[i + 1])) < 0 || (lo = sim_hexval(s[i + 2])) < 0)
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
    case 402: return "Payment Required";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 409: return "Conflict";
    case 413: return "Payload Too Large";
    case 422: return "Unprocessable Entity";
    case 429: return "Too Many Requests";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 503: return "Service Unavailable";
    default: return "Unknown";
    }
}

/* {"error":{"code":..., "message":...}} into s->body. */
void sim_error_body(sim_server *s, const char *code, const char *message)
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

void sim_add_header(sim_server *s, const char *name, const char *fmt, ...)
{
    if (s->nhdrs >= SIM_MAX_HDRS)
        return;
    sim_hdr *h = &s->hdrs[s->nhdrs++];
    va_list ap;
    h->name = name;
    va_start(ap, fmt);
    vsnprintf(h->value, sizeof(h->value), fmt, ap);
    va_end(ap);
}

void sim_reply(sim_server *s, struct evhttp_request *req, int code)
{
    struct evkeyvalq *out = evhttp_request_get_output_headers(req);
    evbuffer_add(s->out, s->body.data, s->body.len);
    if (s->content_type != NULL)
        evhttp_add_header(out, "Content-Type", s->content_type);
    for (int i = 0; i < s->nhdrs; i++)
        evhttp_add_header(out, s->hdrs[i].name, s->hdrs[i].value);
    s->nhdrs = 0;
    s->content_type = NULL;
    evhttp_send_reply(req, code, reason_phrase(code), s->out);
}

void sim_reply_now(sim_server *s, struct evhttp_request *req, int code)
{
    s->nhdrs = 0;
    s->content_type = NULL;
    sim_reply(s, req, code);
}

static void reply_error(sim_server *s, struct evhttp_request *req, int code, const char *ecode,
                        const char *message)
{
    sim_error_body(s, ecode, message);
    sim_reply_now(s, req, code);
}

bool sim_token_matches(const sim_server *s, const char *h, size_t n)
{
    unsigned char diff = n != s->token_len;
    for (size_t i = 0; i < s->token_len; i++)
        diff |= (unsigned char)(s->token[i] ^ (i < n ? h[i] : 0));
    return diff == 0;
}

/* ---- held requests ---------------------------------------------------- */

static int execute(sim_server *s, sim_call *c);

static void call_free(sim_call *c)
{
    if (c->mdata != NULL && c->mfree != NULL)
        c->mfree(c->mdata);
    c->mdata = NULL;
}

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
    call_free(&h->call);
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
        sim_call_init(&h->call);
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
            sim_reply(s, req, code);
        }
    }
    held_release(h);
}


/* Chooses the fate of a valid call: metadata.sim wins, then the rates of
 * the ops in fault_ops, in this order: blackhole, rate_limit, fail_before,
 * fail_after, drop_after (each drawn only if the previous did not hit). */
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
    if (sim_rng_hit(&s->rng, f->rate_limit_rate))
        return FATE_RATE_LIMIT;
    if (sim_rng_hit(&s->rng, f->fail_before_rate))
        return FATE_FAIL_BEFORE;
    if (sim_rng_hit(&s->rng, f->fail_after_rate))
        return FATE_FAIL_AFTER;
    if (sim_rng_hit(&s->rng, f->drop_after_rate))
        return FATE_DROP_AFTER;
    return FATE_NORMAL;
}

/* Processes a call whose time has come: the mode's answer, or a 429. */
static int execute(sim_server *s, sim_call *c)
{
    s->nhdrs = 0;
    s->content_type = NULL;
    if (c->fate == FATE_RATE_LIMIT && c->bad_status == 0) {
        sim_store_counters(s->store)->rate_limited++;
        sim_log(SIM_LOG_DEBUG, "fault rate_limit op=%s key=\"%s\"", sim_op_name(c->op), c->key);
        sim_buf_reset(&s->body);
        s->ops->rate_limited(s);
        sim_add_header(s, "Retry-After", "%lld", (long long)s->faults.retry_after_s);
        return 429;
    }
    return s->ops->execute(s, c);
}

/* ---- shared by the modes ---------------------------------------------- */

int sim_count_request(sim_server *s, struct evhttp_request *req, sim_op op)
{
    sim_counters *ctr = sim_store_counters(s->store);
    ctr->requests[op]++;
    if (s->faults.refuse_connections) {
        /* The listener is closed; this connection was opened before. */
        ctr->refused++;
        hold(s, req, NULL, HOLD_DROP, 0);
        return 1;
    }
    return 0;
}

int sim_parse_sim_value(sim_call *c, const char *v)
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
        {"rate_limit", FATE_RATE_LIMIT, FORCE_SUCCEED},
        {"requires_action", FATE_NORMAL, FORCE_ACTION},
        {"received", FATE_NORMAL, FORCE_RECEIVED},
        {"error", FATE_NORMAL, FORCE_ERROR},
    };
    for (size_t i = 0; i < SIM_ARRAY_LEN(sims); i++) {
        if (strcmp(v, sims[i].name) == 0) {
            c->has_sim_fate = true;
            c->fate = sims[i].fate;
            c->force = sims[i].force;
            return 0;
        }
    }
    return -1;
}

int sim_parse_sim_latency(sim_call *c, const char *v)
{
    int64_t ms;
    if (sim_parse_i64(v, strlen(v), false, &ms) != 0 || ms > SIM_LATENCY_MAX_MS)
        return sim_call_bad(c, 400, "metadata sim_latency_ms must be digits, at most %d", SIM_LATENCY_MAX_MS);
    c->has_latency = true;
    c->latency_ms = ms;
    return 0;
}

int sim_parse_sim_decline_code(sim_call *c, const char *v)
{
    size_t n = strlen(v);
    if (n == 0 || n > SIM_DECLINE_CODE_MAX || !sim_printable_ascii(v, n))
        return sim_call_bad(c, 400, "metadata sim_decline_code must be 1..%d printable characters",
                            SIM_DECLINE_CODE_MAX);
    memcpy(c->decline_code, v, n + 1);
    c->has_decline_code = true;
    return 0;
}

sim_force sim_draw_outcome(sim_server *s, const sim_call *c)
{
    if (c->force != FORCE_NONE || c->has_sim_fate)
        return c->force == FORCE_NONE ? FORCE_SUCCEED : c->force;
    if (sim_rng_hit(&s->rng, s->faults.decline_rate))
        return FORCE_DECLINE;
    if (sim_rng_hit(&s->rng, s->faults.pending_rate))
        return FORCE_PENDING;
    return FORCE_SUCCEED;
}

void sim_forget_payments(sim_server *s)
{
    if (s->ops->reset != NULL)
        s->ops->reset(s);
    sim_store_clear(s->store);
    sim_settle_rearm(s);
}

/* A request outside /control: the mode routes and parses it, then the
 * fault table decides its fate and timing. */
static void dispatch(sim_server *s, struct evhttp_request *req, const char *path, size_t path_len,
                     const char *query)
{
    sim_call call;
    sim_call_init(&call);
    s->nhdrs = 0;
    s->content_type = NULL;
    if (s->ops->route(s, req, path, path_len, query, &call) != 0) {
        call_free(&call);
        return;
    }
    call.token = ++s->next_token;
    call.fate = decide_fate(s, &call);

    int64_t delay = call.has_latency
                        ? call.latency_ms
                        : s->faults.latency_ms + (int64_t)sim_rng_upto(&s->rng, (uint64_t)s->faults.jitter_ms);
    if (call.fate == FATE_BLACKHOLE) {
        sim_store_counters(s->store)->blackholed++;
        sim_log(SIM_LOG_DEBUG, "fault blackhole op=%s key=\"%s\"", sim_op_name(call.op), call.key);
        hold(s, req, &call, HOLD_BLACKHOLE, 0);
        return;
    }
    if (delay > 0) {
        if (s->ops->held != NULL && call.bad_status == 0 && call.fate != FATE_RATE_LIMIT &&
            call.fate != FATE_FAIL_BEFORE)
            s->ops->held(s, &call);
        hold(s, req, &call, HOLD_DELAY, delay);
        return;
    }
    int code = execute(s, &call);
    call_free(&call);
    if (code == 0)
        hold(s, req, NULL, HOLD_DROP, 0); /* closing inside this callback is not safe */
    else
        sim_reply(s, req, code);
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
    sim_settle_rearm(s);
    sim_buf_reset(b);
    sim_buf_adds(b, "{\"faults\":");
    sim_faults_json(&s->faults, s->mode, b);
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
    sim_buf_addf(b, ",\"port\":%u,\"control_port\":%u,\"accepting\":%s", s->port, s->ctl_port,
                 s->main_sock != NULL ? "true" : "false");
    if (s->mode != SIM_MODE_GENERIC) {
        sim_buf_addf(b, ",\"mode\":\"%s\",\"webhooks_pending\":%zu", sim_mode_name(s->mode),
                     sim_webhooks_pending(s->webhooks));
    }
    sim_buf_addc(b, '}');
}

/* The processor's own id of a payment, as its mode shows it. */
void sim_processor_id(const sim_server *s, const sim_payment *p, char *out, size_t cap)
{
    switch (s->mode) {
    case SIM_MODE_STRIPE: snprintf(out, cap, "pi_%024llu", (unsigned long long)p->seq); break;
    case SIM_MODE_ADYEN: snprintf(out, cap, "%016llu", 8800000000000000ULL + (unsigned long long)p->seq); break;
    case SIM_MODE_GENERIC: snprintf(out, cap, "psp_%0*llu", SIM_ID_DIGITS, (unsigned long long)p->seq); break;
    }
}

int sim_parse_processor_id(const sim_server *s, const char *id, size_t n, uint64_t *seq)
{
    int64_t v;
    switch (s->mode) {
    case SIM_MODE_STRIPE:
        if (n != 27 || memcmp(id, "pi_", 3) != 0 || sim_parse_i64(id + 3, n - 3, false, &v) != 0)
            return -1;
        *seq = (uint64_t)v;
        return 0;
    case SIM_MODE_ADYEN:
        if (n != 16 || sim_parse_i64(id, n, false, &v) != 0 || v <= 8800000000000000LL)
            return -1;
        *seq = (uint64_t)(v - 8800000000000000LL);
        return 0;
    case SIM_MODE_GENERIC:
        return sim_parse_id(id, n, seq);
    }
    return -1;
}

/* The payment's key in the mode-independent list: the generic idempotency
 * key, Stripe's Idempotency-Key (or metadata[gid] without one), Adyen's
 * merchant reference. NULL for none. */
static const char *list_key(const sim_server *s, const sim_payment *p, size_t *len)
{
    if (s->mode == SIM_MODE_ADYEN) {
        *len = p->reference_len;
        return p->has_reference ? p->reference : NULL;
    }
    *len = p->key_len;
    return p->key_len > 0 ? p->key : NULL;
}

static void list_entry_json(sim_server *s, const sim_payment *p, sim_buf *b)
{
    char id[48];
    size_t klen;
    const char *key = list_key(s, p, &klen);
    sim_processor_id(s, p, id, sizeof(id));
    sim_buf_adds(b, "{\"key\":");
    if (key != NULL)
        sim_buf_add_jstr(b, key, klen);
    else
        sim_buf_adds(b, "null");
    sim_buf_addf(b, ",\"processor_id\":\"%s\"", id);
    if (p->tombstone) {
        sim_buf_adds(b, ",\"amount\":null,\"currency\":null");
    } else {
        sim_buf_adds(b, ",\"amount\":");
        sim_buf_add_i64(b, p->amount);
        sim_buf_adds(b, ",\"currency\":");
        sim_buf_add_jstr(b, p->currency, 3);
    }
    sim_buf_addf(b, ",\"status\":\"%s\"", sim_status_name((sim_status)p->status));
    if (p->status == SIM_ST_DECLINED) {
        sim_buf_adds(b, ",\"decline_code\":");
        sim_buf_add_jstr(b, p->decline_code, strlen(p->decline_code));
    }
    sim_buf_addf(b, ",\"refunded\":%s,\"created\":", p->refunded ? "true" : "false");
    sim_buf_add_i64(b, p->created);
    sim_buf_addc(b, '}');
}

/* Query of /control/payments and /control/settlement.csv. */
typedef struct ctl_range {
    bool has_gte, has_lt, has_after;
    int64_t gte, lt;
    uint64_t after_seq;
    int64_t limit;
} ctl_range;

static int parse_ctl_range(sim_server *s, const char *query, ctl_range *r, int64_t limit_max, char *err,
                           size_t errlen)
{
    struct evkeyvalq params;
    struct evkeyval *kv;
    int rc = -1;
    memset(r, 0, sizeof(*r));
    r->limit = limit_max < 100 ? limit_max : 100;
    TAILQ_INIT(&params);
    if (query == NULL)
        return 0;
    if (evhttp_parse_query_str(query, &params) != 0) {
        snprintf(err, errlen, "malformed query string");
        goto out;
    }
    TAILQ_FOREACH(kv, &params, next) {
        size_t n = strlen(kv->value);
        if (strcmp(kv->key, "created_gte") == 0 || strcmp(kv->key, "created_lt") == 0) {
            int64_t v;
            if (sim_parse_i64(kv->value, n, true, &v) != 0) {
                snprintf(err, errlen, "%s must be an integer (unix seconds)", kv->key);
                goto out;
            }
            if (kv->key[8] == 'g') {
                r->has_gte = true;
                r->gte = v;
            } else {
                r->has_lt = true;
                r->lt = v;
            }
        } else if (strcmp(kv->key, "limit") == 0) {
            if (sim_parse_i64(kv->value, n, false, &r->limit) != 0 || r->limit < 1 || r->limit > limit_max) {
                snprintf(err, errlen, "limit must be an integer in 1..%lld", (long long)limit_max);
                goto out;
            }
        } else if (strcmp(kv->key, "starting_after") == 0) {
            if (sim_parse_processor_id(s, kv->value, n, &r->after_seq) != 0) {
                snprintf(err, errlen, "starting_after must be a processor_id of this mode");
                goto out;
            }
            r->has_after = true;
        } else {
            snprintf(err, errlen, "unknown parameter %.40s", kv->key);
            goto out;
        }
    }
    rc = 0;
out:
    evhttp_clear_headers(&params);
    return rc;
}

/* GET /control/payments: every payment in creation order, in one shape for
 * every mode, for the invariant checker. */
static int control_payments(sim_server *s, const char *query, char *err, size_t errlen)
{
    ctl_range r;
    sim_buf *b = &s->body;
    if (parse_ctl_range(s, query, &r, 1000, err, errlen) != 0)
        return 400;
    sim_store_settle_due(s->store, sim_now_ms());
    sim_settle_rearm(s);
    size_t i = sim_store_list_start(s->store, r.has_gte, r.gte, r.has_after, r.after_seq);
    int64_t n = 0;
    bool more = false;
    sim_buf_reset(b);
    sim_buf_addf(b, "{\"mode\":\"%s\",\"data\":[", sim_mode_name(s->mode));
    for (sim_payment *p; (p = sim_store_at(s->store, i)) != NULL; i++) {
        if (r.has_lt && p->created >= r.lt)
            break;
        if (n == r.limit) {
            more = true;
            break;
        }
        if (n++ > 0)
            sim_buf_addc(b, ',');
        list_entry_json(s, p, b);
    }
    sim_buf_adds(b, more ? "],\"has_more\":true}" : "],\"has_more\":false}");
    return 200;
}

/* Minor units per major unit (ISO 4217 exponent) for the CSV amounts. */
static int currency_exponent(const char *cur)
{
    static const char *const zero[] = {"BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG",
                                       "RWF", "UGX", "VND", "VUV", "XAF", "XOF", "XPF"};
    static const char *const three[] = {"BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"};
    for (size_t i = 0; i < SIM_ARRAY_LEN(zero); i++)
        if (strcmp(cur, zero[i]) == 0)
            return 0;
    for (size_t i = 0; i < SIM_ARRAY_LEN(three); i++)
        if (strcmp(cur, three[i]) == 0)
            return 3;
    return 2;
}

static void csv_amount(sim_buf *b, int64_t minor, const char *cur)
{
    int e = currency_exponent(cur);
    int64_t div = e == 0 ? 1 : e == 2 ? 100 : 1000;
    sim_buf_add_i64(b, minor / div);
    if (e > 0)
        sim_buf_addf(b, ".%0*lld", e, (long long)(minor % div));
}

/* A CSV field: quoted when it holds a comma, a quote or a line break. */
static void csv_field(sim_buf *b, const char *v, size_t n)
{
    if (memchr(v, ',', n) == NULL && memchr(v, '"', n) == NULL && memchr(v, '\n', n) == NULL &&
        memchr(v, '\r', n) == NULL) {
        sim_buf_add(b, v, n);
        return;
    }
    sim_buf_addc(b, '"');
    for (size_t i = 0; i < n; i++) {
        if (v[i] == '"')
            sim_buf_addc(b, '"');
        sim_buf_addc(b, v[i]);
    }
    sim_buf_addc(b, '"');
}

static void csv_row(sim_server *s, sim_buf *b, const sim_payment *p, const char *type, bool debit)
{
    char id[48], when[32];
    size_t klen;
    const char *key = list_key(s, p, &klen);
    time_t t = (time_t)p->created;
    struct tm tm;
    gmtime_r(&t, &tm);
    strftime(when, sizeof(when), "%Y-%m-%d %H:%M:%S", &tm);
    sim_processor_id(s, p, id, sizeof(id));
    sim_buf_adds(b, "PspSimCompany,PspSimMerchant,");
    sim_buf_adds(b, id);
    sim_buf_addc(b, ',');
    if (key != NULL)
        csv_field(b, key, klen);
    sim_buf_addf(b, ",visa,%s,UTC,%s,%s,%s,", when, type, id, p->currency);
    if (debit)
        csv_amount(b, p->amount, p->currency);
    sim_buf_addc(b, ',');
    if (!debit)
        csv_amount(b, p->amount, p->currency);
    sim_buf_addf(b, ",1,%s,", p->currency);
    if (debit)
        csv_amount(b, p->amount, p->currency);
    sim_buf_addc(b, ',');
    if (!debit)
        csv_amount(b, p->amount, p->currency);
    sim_buf_adds(b, ",0.00,,,,visa,,1\r\n");
}

/* GET /control/settlement.csv: an Adyen settlement-details-style report of
 * the succeeded payments (Settled) and refunds (Refunded); fees are zero. */
static int control_settlement(sim_server *s, const char *query, char *err, size_t errlen)
{
    ctl_range r;
    sim_buf *b = &s->body;
    if (parse_ctl_range(s, query, &r, 1, err, errlen) != 0 || r.has_after) {
        if (r.has_after)
            snprintf(err, errlen, "settlement.csv takes created_gte and created_lt only");
        return 400;
    }
    sim_store_settle_due(s->store, sim_now_ms());
    sim_settle_rearm(s);
    sim_buf_reset(b);
    sim_buf_adds(b, "Company Account,Merchant Account,Psp Reference,Merchant Reference,Payment Method,"
                    "Creation Date,TimeZone,Type,Modification Reference,Gross Currency,Gross Debit (GC),"
                    "Gross Credit (GC),Exchange Rate,Net Currency,Net Debit (NC),Net Credit (NC),"
                    "Commission (NC),Markup (NC),Scheme Fees (NC),Interchange (NC),Payment Method Variant,"
                    "Modification Merchant Reference,Batch Number\r\n");
    size_t i = sim_store_list_start(s->store, r.has_gte, r.gte, false, 0);
    for (sim_payment *p; (p = sim_store_at(s->store, i)) != NULL; i++) {
        if (r.has_lt && p->created >= r.lt)
            break;
        if (p->status != SIM_ST_SUCCEEDED || p->tombstone || (p->flags & SIM_PF_UNCAPTURED))
            continue;
        csv_row(s, b, p, "Settled", false);
        if (p->refunded)
            csv_row(s, b, p, "Refunded", true);
    }
    s->content_type = "text/csv";
    return 200;
}

/* POST /control/amend {"key": K, "amount": N, "refunded": true}: change a
 * recorded payment behind the merchant's back, as a processor that later
 * corrects an amount or reverses a charge does (reconciliation tests). K is
 * the key /control/payments shows. */
static int control_amend(sim_server *s, const char *body, size_t len, char *err, size_t errlen)
{
    cJSON *o = cJSON_ParseWithLength(body, len);
    int code = 400;
    const cJSON *key = cJSON_GetObjectItemCaseSensitive(o, "key");
    const cJSON *amount = cJSON_GetObjectItemCaseSensitive(o, "amount");
    const cJSON *refunded = cJSON_GetObjectItemCaseSensitive(o, "refunded");
    if (!cJSON_IsObject(o) || !cJSON_IsString(key) || (amount && !cJSON_IsNumber(amount)) ||
        (refunded && !cJSON_IsBool(refunded))) {
        snprintf(err, errlen, "amend takes {\"key\": string, \"amount\": integer, \"refunded\": bool}");
        goto out;
    }
    if (amount && (amount->valuedouble < 1 || amount->valuedouble > 9007199254740991.0 ||
                   amount->valuedouble != (double)(int64_t)amount->valuedouble)) {
        snprintf(err, errlen, "amount must be an integer in 1..2^53-1");
        goto out;
    }
    size_t klen = strlen(key->valuestring);
    sim_payment *p = NULL;
    for (size_t i = 0; (p = sim_store_at(s->store, i)) != NULL; i++) {
        size_t n;
        const char *k = list_key(s, p, &n);
        if (k != NULL && n == klen && memcmp(k, key->valuestring, n) == 0)
            break;
    }
    if (p == NULL || p->tombstone) {
        snprintf(err, errlen, "no payment with that key");
        code = 404;
        goto out;
    }
    if (amount)
        p->amount = (int64_t)amount->valuedouble;
    if (refunded && cJSON_IsTrue(refunded)) {
        if (p->status != SIM_ST_SUCCEEDED) {
            snprintf(err, errlen, "only a succeeded payment can be refunded");
            code = 409;
            goto out;
        }
        sim_store_refund(s->store, p);
    }
    sim_log(SIM_LOG_INFO, "control amend key=%s amount=%lld refunded=%d", key->valuestring, (long long)p->amount,
            (int)p->refunded);
    sim_buf_reset(&s->body);
    list_entry_json(s, p, &s->body);
    code = 200;
out:
    cJSON_Delete(o);
    return code;
}

static void faults_log(sim_server *s, const char *what)
{
    sim_buf b;
    sim_buf_init(&b);
    sim_faults_json(&s->faults, s->mode, &b);
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
            sim_reply_now(s, req, 200);
        } else if (method == EVHTTP_REQ_POST) {
            struct evbuffer *in = evhttp_request_get_input_buffer(req);
            size_t len = evbuffer_get_length(in);
            sim_faults next = s->faults;
            bool reseed;
            if (sim_faults_update(&next, s->mode, (const char *)evbuffer_pullup(in, -1), len, &reseed, err,
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
            sim_reply_now(s, req, 200);
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
            sim_forget_payments(s);
            sim_log(SIM_LOG_INFO, "control reset: payments and counters forgotten");
        }
        faults_log(s, "reset");
        if (rc != 0) {
            reply_error(s, req, 500, "listen_failed", "cannot listen again on the /v1 port");
            return;
        }
        control_status_body(s);
        sim_reply_now(s, req, 200);
    } else if (PATH_IS("/control/payments") || PATH_IS("/control/settlement.csv")) {
        if (method != EVHTTP_REQ_GET) {
            reply_error(s, req, 405, "method_not_allowed", NULL);
            return;
        }
        s->nhdrs = 0;
        s->content_type = NULL;
        int code = PATH_IS("/control/payments") ? control_payments(s, query, err, sizeof(err))
                                                : control_settlement(s, query, err, sizeof(err));
        if (code != 200) {
            reply_error(s, req, code, "invalid_request", err);
            return;
        }
        sim_reply(s, req, 200);
    } else if (PATH_IS("/control/webhook")) {
        if (s->mode == SIM_MODE_GENERIC) {
            reply_error(s, req, 404, "not_found", "webhooks exist in --mode stripe and adyen only");
            return;
        }
        if (method == EVHTTP_REQ_POST) {
            struct evbuffer *in = evhttp_request_get_input_buffer(req);
            size_t len = evbuffer_get_length(in);
            if (sim_webhooks_configure_json(s->webhooks, (const char *)evbuffer_pullup(in, -1), len, err,
                                            sizeof(err)) != 0) {
                reply_error(s, req, 400, "invalid_request", err);
                return;
            }
        } else if (method != EVHTTP_REQ_GET) {
            reply_error(s, req, 405, "method_not_allowed", NULL);
            return;
        }
        sim_buf_reset(&s->body);
        sim_webhooks_config_json(s->webhooks, &s->body);
        sim_reply_now(s, req, 200);
    } else if (PATH_IS("/control/amend")) {
        if (method != EVHTTP_REQ_POST) {
            reply_error(s, req, 405, "method_not_allowed", NULL);
            return;
        }
        struct evbuffer *in = evhttp_request_get_input_buffer(req);
        size_t len = evbuffer_get_length(in);
        int code = control_amend(s, (const char *)evbuffer_pullup(in, -1), len, err, sizeof(err));
        if (code != 200) {
            reply_error(s, req, code, code == 404 ? "not_found" : code == 409 ? "not_succeeded" : "invalid_request",
                        err);
            return;
        }
        sim_reply_now(s, req, 200);
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
        sim_reply_now(s, req, 200);
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
        dispatch(s, req, path, path_len, query);
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
    sim_settle_rearm(s);
}

/* Arms the settlement timer for the earliest queued settlement. */
void sim_settle_rearm(sim_server *s)
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
    if (n == 0 || !sim_printable_ascii(buf, n)) {
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
            "               [--mode generic|stripe|adyen] [--webhook-url URL] [--webhook-secret S]\n"
            "The test payment processor; see docs/processor.md.\n");
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
        {"mode", required_argument, NULL, 'M'},
        {"webhook-url", required_argument, NULL, 'W'},
        {"webhook-secret", required_argument, NULL, 'S'},
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
    const char *webhook_url = NULL, *webhook_secret = NULL;
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
        case 'M':
            if (strcmp(optarg, "generic") == 0) {
                s->mode = SIM_MODE_GENERIC;
            } else if (strcmp(optarg, "stripe") == 0) {
                s->mode = SIM_MODE_STRIPE;
            } else if (strcmp(optarg, "adyen") == 0) {
                s->mode = SIM_MODE_ADYEN;
            } else {
                fprintf(stderr, "psp-sim: --mode must be generic, stripe or adyen\n");
                return 2;
            }
            break;
        case 'W': webhook_url = optarg; break;
        case 'S': webhook_secret = optarg; break;
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
    if (s->mode == 0)
        s->mode = SIM_MODE_GENERIC;
    s->ops = s->mode == SIM_MODE_STRIPE ? &sim_stripe_ops : s->mode == SIM_MODE_ADYEN ? &sim_adyen_ops : &sim_generic_ops;
    if (s->mode != SIM_MODE_GENERIC && s->state_path != NULL) {
        fprintf(stderr, "psp-sim: --state is supported in --mode generic only\n");
        return 2;
    }
    if (s->mode == SIM_MODE_GENERIC && (webhook_url != NULL || webhook_secret != NULL)) {
        fprintf(stderr, "psp-sim: --webhook-url and --webhook-secret need --mode stripe or adyen\n");
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
        if (n == 0 || n > TOKEN_MAX || !sim_printable_ascii(token, n)) {
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
    if (s->mode != SIM_MODE_GENERIC) {
        s->webhooks = sim_webhooks_new(s);
        if (sim_webhooks_configure(s->webhooks, webhook_url, webhook_secret, err, sizeof(err)) != 0) {
            fprintf(stderr, "psp-sim: %s\n", err);
            rc = 2;
            goto out;
        }
        if (s->mode == SIM_MODE_STRIPE)
            sim_stripe_init(s);
        else
            sim_adyen_init(s);
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
    sim_settle_rearm(s);

    sim_log(SIM_LOG_INFO, "listening mode=%s bind=%s port=%u control_port=%u auth=%s state=%s payments=%zu",
            sim_mode_name(s->mode), s->bind_addr, s->port, s->ctl_port, s->token != NULL ? "bearer" : "none",
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
    sim_webhooks_free(s->webhooks);
    if (s->ops != NULL && s->ops->destroy != NULL)
        s->ops->destroy(s);
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
