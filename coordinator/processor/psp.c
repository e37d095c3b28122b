/*
 * psp.c - the payment-processor client (docs/processor.md): libcurl multi
 * handle driven by libevent, one easy handle per call; psp_classify.c maps
 * the answers to psp_outcome.
 */
#include "psp.h"
#include "gid.h"
#include "list.h"
#include "log.h"
#include "loop.h"

#include <arpa/inet.h>
#include <curl/curl.h>
#include <event2/event.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#ifndef PAYCOORD_VERSION
#define PAYCOORD_VERSION "dev"
#endif

/*
 * Request lifecycle (each psp_req is on exactly one of the client's lists
 * from submission until its callback has run):
 *
 *   1. psp_create/get/cancel/refund builds the easy handle and adds it to the
 *      multi handle: ACTIVE list. If curl_multi_add_handle fails the request
 *      goes straight to DONE with PSP_UNKNOWN and the zero-timeout done_ev is
 *      armed, so the callback still fires from the loop, never inside the call.
 *   2. A socket or timer event runs curl_multi_socket_action; once it has
 *      returned, curl_multi_info_read hands back finished transfers. Each is
 *      removed from the multi handle, classified and logged: DONE list.
 *   3. run_completions() pops DONE requests one at a time, fires the callback
 *      and only then releases the request (its easy handle goes back to a
 *      small free list). Callbacks therefore run outside every curl call: they
 *      may start new requests, and may even call psp_free() (the client
 *      struct itself is then freed when the outermost dispatch unwinds).
 *   4. psp_free() moves every ACTIVE request to DONE with "shutdown", fires
 *      all DONE callbacks, then tears down curl and the events. New calls made
 *      from those callbacks return -1.
 */

#define EASY_CACHE_MAX 32              /* idle easy handles kept for reuse */
#define DEFAULT_CONNECT_TIMEOUT_MS 2000L
#define DEFAULT_REQUEST_TIMEOUT_MS 10000L

typedef enum { CALL_CREATE, CALL_GET, CALL_CANCEL, CALL_REFUND } psp_call;

static const char *const call_names[] = { "create", "get", "cancel", "refund" };

typedef struct psp_req psp_req;
typedef struct psp_sock psp_sock;

struct psp_req {
    psp_client *c;
    pc_list link;                      /* on c->active or c->done */
    psp_call call;
    CURL *easy;
    bool in_multi;
    char *gid;
    int64_t amount;                    /* create only, for the log line */
    char currency[8];                  /* create only, for the log line */
    struct curl_slist *headers;
    char *body;                        /* request body; curl does not copy it */
    char *resp;                        /* response body, NUL-terminated */
    size_t resp_len, resp_cap;
    bool resp_too_big;
    bool new_conn;
    double start_ms;
    psp_cb cb;
    void *arg;
    psp_result res;
    int retry_after_ms;                /* from a Retry-After header (delta-seconds) */
    char errbuf[CURL_ERROR_SIZE];
};

/* One per socket curl asked us to watch (CURLMOPT_SOCKETFUNCTION). */
struct psp_sock {
    psp_client *c;
    pc_list link;                      /* on c->socks */
    curl_socket_t fd;
    struct event *ev;
};

struct psp_client {
    struct event_base *base;
    CURLM *multi;
    struct event *timer;               /* curl's single timeout */
    struct event *done_ev;             /* zero-timeout: deferred completions */
    char *base_url;                    /* without trailing '/' */
    char *auth_header;                 /* "Authorization: Bearer ..."; never logged */
    long connect_timeout_ms;
    long request_timeout_ms;
    bool verify_peer;
    pc_list active, done;              /* psp_req.link */
    pc_list socks;                     /* psp_sock.link */
    CURL *easy_cache[EASY_CACHE_MAX];
    int n_easy_cache;
    int in_flight;
    int dispatch_depth;                /* nesting of run_completions */
    bool closing;                      /* psp_free started: refuse new calls */
    bool free_deferred;                /* psp_free ran inside a callback */
    bool curl_global;                  /* we hold a curl_global_init reference */
    psp_stats stats;
};

/* ---- small helpers ---------------------------------------------------- */

/* The daemon's clock (loop.h), in fractional milliseconds for latencies. */
static double now_ms(void)
{
    return (double)loop_now_us() / 1000.0;
}

/* Move r from c->active to the end of c->done. */
static void req_to_done(psp_client *c, psp_req *r)
{
    list_unlink(&r->link);
    list_push_tail(&c->done, &r->link);
}

/*
 * Render s as a log value: bare when it is a plain token, otherwise quoted
 * with '"' and '\' escaped and control characters replaced. Truncates.
 */
static const char *kv(char *buf, size_t size, const char *s)
{
    bool plain = *s != '\0';
    for (const char *p = s; *p && plain; p++)
        if (*p <= ' ' || *p == '"' || *p == '=' || *p == '\\' || *p == 0x7f)
            plain = false;
    if (plain && strlen(s) < size) {
        memcpy(buf, s, strlen(s) + 1);
        return buf;
    }
    size_t n = 0;
    buf[n++] = '"';
    for (const char *p = s; *p && n + 4 < size; p++) {
        unsigned char ch = (unsigned char)*p;
        if (ch == '"' || ch == '\\')
            buf[n++] = '\\';
        buf[n++] = (ch < ' ' || ch == 0x7f) ? '?' : (char)ch;
    }
    buf[n++] = '"';
    buf[n] = '\0';
    return buf;
}

/* A gid goes into a header, a URL and log lines: the one gid rule (gid.h):
 * printable ASCII, no control characters. */
static bool key_valid(const char *gid)
{
    return gid != NULL && gid_valid(gid, strlen(gid));
}

/* ---- logging ---------------------------------------------------------- */

static void log_result(const psp_req *r)
{
    const psp_result *res = &r->res;
    char gidv[300], what[160] = "", extra[512] = "";
    char curv[32], idv[160], declv[100], errv[300];

    if (r->call == CALL_CREATE)
        snprintf(what, sizeof(what), " amount=%" PRId64 " currency=%s", r->amount,
                 kv(curv, sizeof(curv), r->currency));
    if (res->outcome == PSP_PAYMENT || res->outcome == PSP_ALREADY_SUCCEEDED) {
        const psp_payment *p = &res->payment;
        snprintf(extra, sizeof(extra), " status=%s psp_id=%s%s%s%s", psp_status_name(p->status),
                 kv(idv, sizeof(idv), p->id), p->decline_code[0] ? " decline_code=" : "",
                 p->decline_code[0] ? kv(declv, sizeof(declv), p->decline_code) : "",
                 p->refunded ? " refunded=1" : "");
    }
    if (res->outcome == PSP_PAYMENT || res->outcome == PSP_ALREADY_SUCCEEDED ||
        res->outcome == PSP_NOT_FOUND) {
        log_info("psp call=%s gid=%s%s http=%ld outcome=%s%s new_conn=%d ms=%.1f",
                 call_names[r->call], kv(gidv, sizeof(gidv), r->gid), what, res->http_status,
                 psp_outcome_name(res->outcome), extra, r->new_conn ? 1 : 0, res->elapsed_ms);
    } else {
        log_warn("psp call=%s gid=%s%s http=%ld outcome=%s error=%s new_conn=%d ms=%.1f",
                 call_names[r->call], kv(gidv, sizeof(gidv), r->gid), what, res->http_status,
                 psp_outcome_name(res->outcome), kv(errv, sizeof(errv), res->error),
                 r->new_conn ? 1 : 0, res->elapsed_ms);
    }
}

/* ---- request objects -------------------------------------------------- */

static CURL *easy_get(psp_client *c)
{
    if (c->n_easy_cache > 0) {
        CURL *e = c->easy_cache[--c->n_easy_cache];
        curl_easy_reset(e);
        return e;
    }
    return curl_easy_init();
}

static void easy_put(psp_client *c, CURL *e)
{
    if (e == NULL)
        return;
    if (!c->closing && c->n_easy_cache < EASY_CACHE_MAX)
        c->easy_cache[c->n_easy_cache++] = e;
    else
        curl_easy_cleanup(e);
}

/* Free a request that is on no list and not in the multi handle. */
static void req_release(psp_client *c, psp_req *r)
{
    easy_put(c, r->easy);
    curl_slist_free_all(r->headers);
    free(r->body);
    free(r->resp);
    free(r->gid);
    free(r);
}

/* Only Retry-After is read (its delta-seconds form; an HTTP date is ignored). */
static size_t header_cb(char *buf, size_t size, size_t n, void *arg)
{
    psp_req *r = arg;
    size_t len = size * n;
    static const char name[] = "retry-after:";
    if (len > sizeof(name) - 1 && strncasecmp(buf, name, sizeof(name) - 1) == 0) {
        char v[32];
        size_t vl = len - (sizeof(name) - 1);
        if (vl >= sizeof(v))
            vl = sizeof(v) - 1;
        memcpy(v, buf + sizeof(name) - 1, vl);
        v[vl] = '\0';
        char *end;
        long secs = strtol(v, &end, 10);
        while (*end == ' ' || *end == '\r' || *end == '\n' || *end == '\t')
            end++;
        if (end != v && *end == '\0' && secs >= 0 && secs <= 3600)
            r->retry_after_ms = (int)secs * 1000;
    }
    return len;
}

static size_t write_cb(char *ptr, size_t size, size_t nmemb, void *userdata)
{
    psp_req *r = userdata;
    size_t n = size * nmemb;

    if (n > PSP_MAX_RESPONSE_BODY - r->resp_len) {
        r->resp_too_big = true;
        return 0;                       /* != n: curl fails with CURLE_WRITE_ERROR */
    }
    if (r->resp_len + n + 1 > r->resp_cap) {
        size_t cap = r->resp_cap ? r->resp_cap : 1024;
        while (cap < r->resp_len + n + 1)
            cap *= 2;
        char *p = realloc(r->resp, cap);
        if (p == NULL)
            return 0;
        r->resp = p;
        r->resp_cap = cap;
    }
    memcpy(r->resp + r->resp_len, ptr, n);
    r->resp_len += n;
    r->resp[r->resp_len] = '\0';
    return n;
}

/* Fill r->res from a finished transfer and log it. */
static void req_finish(psp_req *r, CURLcode code)
{
    long http = 0;
    long connects = 0;

    curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &http);
    if (curl_easy_getinfo(r->easy, CURLINFO_NUM_CONNECTS, &connects) == CURLE_OK && connects > 0) {
        r->new_conn = true;
        r->c->stats.connects += (uint64_t)connects;
    }
    if (code != CURLE_OK) {
        /* Connect error, reset, timeout, empty reply, oversized body: the
         * request may or may not have been processed. Never a decline. */
        memset(&r->res, 0, sizeof(r->res));
        r->res.outcome = PSP_UNKNOWN;
        r->res.http_status = http;
        if (r->resp_too_big)
            snprintf(r->res.error, sizeof(r->res.error), "response body over %d bytes",
                     PSP_MAX_RESPONSE_BODY);
        else
            snprintf(r->res.error, sizeof(r->res.error), "%s: %.200s", curl_easy_strerror(code),
                     r->errbuf[0] ? r->errbuf : "-");
    } else {
        psp_classify(r->gid, http, r->resp, r->resp_len, &r->res);
        if (r->res.outcome == PSP_RATE_LIMITED)
            r->res.retry_after_ms = r->retry_after_ms;
    }
    r->res.elapsed_ms = now_ms() - r->start_ms;
    log_result(r);
}

/* Complete r without an HTTP answer (add failure, shutdown). */
static void req_fail(psp_req *r, const char *error)
{
    memset(&r->res, 0, sizeof(r->res));
    r->res.outcome = PSP_UNKNOWN;
    snprintf(r->res.error, sizeof(r->res.error), "%s", error);
    r->res.elapsed_ms = now_ms() - r->start_ms;
    log_result(r);
}

/*
 * Fire the callbacks of every DONE request, one at a time, outside any curl
 * call. Returns true if the client was freed meanwhile (psp_free from a
 * callback): the caller must not touch it again.
 */
static bool run_completions(psp_client *c)
{
    pc_list *n;

    c->dispatch_depth++;
    while ((n = list_pop_head(&c->done)) != NULL) {
        psp_req *r = list_entry(n, psp_req, link);
        c->in_flight--;
        c->stats.completed++;
        if (r->res.outcome == PSP_UNKNOWN)
            c->stats.unknown++;
        r->cb(&r->res, r->arg);
        req_release(c, r);
    }
    c->dispatch_depth--;
    if (c->dispatch_depth == 0 && c->free_deferred) {
        free(c);
        return true;
    }
    return false;
}

/* Collect finished transfers (after socket_action returned), then complete them. */
static bool drain_multi(psp_client *c)
{
    CURLMsg *msg;
    int left;

    while ((msg = curl_multi_info_read(c->multi, &left)) != NULL) {
        if (msg->msg != CURLMSG_DONE)
            continue;
        CURL *e = msg->easy_handle;           /* msg is invalid after remove */
        CURLcode code = msg->data.result;
        char *priv = NULL;
        curl_easy_getinfo(e, CURLINFO_PRIVATE, &priv);
        psp_req *r = (psp_req *)priv;
        curl_multi_remove_handle(c->multi, e);
        r->in_multi = false;
        req_finish(r, code);
        req_to_done(c, r);
    }
    return run_completions(c);
}

/* ---- libevent <-> curl glue ------------------------------------------- */

static void sock_event_cb(evutil_socket_t fd, short what, void *arg)
{
    psp_client *c = ((psp_sock *)arg)->c;      /* the psp_sock may go away below */
    int action = ((what & EV_READ) ? CURL_CSELECT_IN : 0) |
                 ((what & EV_WRITE) ? CURL_CSELECT_OUT : 0);
    int running = 0;

    CURLMcode mc = curl_multi_socket_action(c->multi, fd, action, &running);
    if (mc != CURLM_OK)
        log_error("psp curl_multi_socket_action fd=%d error=\"%s\"", (int)fd,
                  curl_multi_strerror(mc));
    (void)drain_multi(c);
}

static void timer_event_cb(evutil_socket_t fd, short what, void *arg)
{
    psp_client *c = arg;
    int running = 0;

    CURLMcode mc = curl_multi_socket_action(c->multi, CURL_SOCKET_TIMEOUT, 0, &running);
    if (mc != CURLM_OK)
        log_error("psp curl_multi_socket_action timeout error=\"%s\"", curl_multi_strerror(mc));
    (void)drain_multi(c);
}

static void done_event_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)run_completions(arg);
}

/* CURLMOPT_TIMERFUNCTION: (re)arm or cancel the single timeout. No curl calls here. */
static int curl_timer_cb(CURLM *multi, long timeout_ms, void *userp)
{
    psp_client *c = userp;

    if (timeout_ms < 0) {
        evtimer_del(c->timer);
        return 0;
    }
    struct timeval tv = { .tv_sec = timeout_ms / 1000, .tv_usec = (timeout_ms % 1000) * 1000 };
    return evtimer_add(c->timer, &tv) == 0 ? 0 : -1;
}

static void sock_free(psp_sock *s)
{
    list_unlink(&s->link);
    event_free(s->ev);
    free(s);
}

/* CURLMOPT_SOCKETFUNCTION: create, update or free the event for one socket. */
static int curl_socket_cb(CURL *easy, curl_socket_t fd, int what, void *userp, void *socketp)
{
    psp_client *c = userp;
    psp_sock *s = socketp;

    if (what == CURL_POLL_REMOVE) {
        if (s != NULL)
            sock_free(s);
        return 0;
    }
    short kind = EV_PERSIST | ((what & CURL_POLL_IN) ? EV_READ : 0) |
                 ((what & CURL_POLL_OUT) ? EV_WRITE : 0);
    if (s == NULL) {
        s = calloc(1, sizeof(*s));
        if (s == NULL)
            goto fail;
        s->c = c;
        s->fd = fd;
        s->ev = event_new(c->base, fd, kind, sock_event_cb, s);
        if (s->ev == NULL) {
            free(s);
            goto fail;
        }
        list_push_head(&c->socks, &s->link);
        curl_multi_assign(c->multi, fd, s);
    } else {
        event_del(s->ev);
        if (event_assign(s->ev, c->base, fd, kind, sock_event_cb, s) != 0)
            goto fail;
    }
    if (event_add(s->ev, NULL) != 0)
        goto fail;
    return 0;
fail:
    log_error("psp cannot watch socket fd=%d", (int)fd);
    return -1;
}

/* ---- client ----------------------------------------------------------- */

/* Host of a URL is an IPv4/IPv6 literal (no resolver needed). */
static bool host_is_ip_literal(const char *host)
{
    unsigned char buf[sizeof(struct in6_addr)];
    char tmp[64];
    size_t n = strlen(host);

    if (inet_pton(AF_INET, host, buf) == 1)
        return true;
    if (n >= 2 && n < sizeof(tmp) && host[0] == '[' && host[n - 1] == ']') {
        memcpy(tmp, host + 1, n - 2);
        tmp[n - 2] = '\0';
        char *pct = strchr(tmp, '%');         /* zone id */
        if (pct)
            *pct = '\0';
        return inet_pton(AF_INET6, tmp, buf) == 1;
    }
    return false;
}

psp_client *psp_new(struct event_base *base, const psp_config *cfg)
{
    psp_client *c = NULL;
    CURLU *u = NULL;
    char *scheme = NULL, *host = NULL, *port = NULL;
    bool ok = false;
    const char *why = "out of memory";

    if (base == NULL || cfg == NULL || cfg->base_url == NULL || cfg->token == NULL) {
        why = "missing base, config, base_url or token";
        goto out;
    }
    if (cfg->token[0] == '\0') {
        why = "empty processor token";
        goto out;
    }
    for (const char *p = cfg->token; *p; p++)
        if (*p < ' ' || *p == 0x7f) {
            why = "processor token contains control characters";
            goto out;
        }

    c = calloc(1, sizeof(*c));
    if (c == NULL)
        goto out;
    list_init(&c->active);
    list_init(&c->done);
    list_init(&c->socks);
    /* Reference-counted: harmless when main() already did it. */
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
        why = "curl_global_init failed";
        goto out;
    }
    c->curl_global = true;

    u = curl_url();
    if (u == NULL || curl_url_set(u, CURLUPART_URL, cfg->base_url, 0) != CURLUE_OK ||
        curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) != CURLUE_OK ||
        curl_url_get(u, CURLUPART_HOST, &host, 0) != CURLUE_OK) {
        why = "processor_url is not a valid URL";
        goto out;
    }
    if (curl_url_get(u, CURLUPART_PORT, &port, CURLU_DEFAULT_PORT) != CURLUE_OK)
        port = NULL;
    if (strcasecmp(scheme, "http") != 0 && strcasecmp(scheme, "https") != 0) {
        why = "processor_url scheme is not http or https";
        goto out;
    }
    if (strpbrk(cfg->base_url, "?#") != NULL) {
        why = "processor_url must not have a query or fragment";
        goto out;
    }

    c->base = base;
    c->verify_peer = cfg->verify_peer;
    c->connect_timeout_ms = cfg->connect_timeout_ms > 0 ? cfg->connect_timeout_ms
                                                        : DEFAULT_CONNECT_TIMEOUT_MS;
    c->request_timeout_ms = cfg->request_timeout_ms > 0 ? cfg->request_timeout_ms
                                                        : DEFAULT_REQUEST_TIMEOUT_MS;
    if (cfg->connect_timeout_ms <= 0 || cfg->request_timeout_ms <= 0)
        log_warn("psp timeouts not set, using connect_timeout_ms=%ld request_timeout_ms=%ld",
                 c->connect_timeout_ms, c->request_timeout_ms);

    size_t ulen = strlen(cfg->base_url);
    while (ulen > 0 && cfg->base_url[ulen - 1] == '/')
        ulen--;
    c->base_url = strndup(cfg->base_url, ulen);
    size_t alen = strlen("Authorization: Bearer ") + strlen(cfg->token) + 1;
    c->auth_header = malloc(alen);
    if (c->base_url == NULL || c->auth_header == NULL)
        goto out;
    snprintf(c->auth_header, alen, "Authorization: Bearer %s", cfg->token);

    c->timer = evtimer_new(base, timer_event_cb, c);
    c->done_ev = evtimer_new(base, done_event_cb, c);
    c->multi = curl_multi_init();
    if (c->timer == NULL || c->done_ev == NULL || c->multi == NULL)
        goto out;
    if (curl_multi_setopt(c->multi, CURLMOPT_SOCKETFUNCTION, curl_socket_cb) != CURLM_OK ||
        curl_multi_setopt(c->multi, CURLMOPT_SOCKETDATA, c) != CURLM_OK ||
        curl_multi_setopt(c->multi, CURLMOPT_TIMERFUNCTION, curl_timer_cb) != CURLM_OK ||
        curl_multi_setopt(c->multi, CURLMOPT_TIMERDATA, c) != CURLM_OK)
        goto out;
    if (cfg->max_connections > 0) {
        /* Transfers beyond the limit queue inside curl (their timeout runs);
         * the cache keeps every allowed connection alive for reuse. */
        if (curl_multi_setopt(c->multi, CURLMOPT_MAX_TOTAL_CONNECTIONS,
                              cfg->max_connections) != CURLM_OK ||
            curl_multi_setopt(c->multi, CURLMOPT_MAXCONNECTS, cfg->max_connections) != CURLM_OK)
            goto out;
    }

    /*
     * Name resolution must not block the loop. Debian's libcurl uses the
     * threaded resolver (CURL_VERSION_ASYNCHDNS); a build without it resolves
     * inside curl_multi_socket_action, blocking the loop for the length of a
     * DNS lookup, so processor_url must then be an IP literal.
     */
    curl_version_info_data *vi = curl_version_info(CURLVERSION_NOW);
    bool async_dns = (vi->features & CURL_VERSION_ASYNCHDNS) != 0;
    bool ip_literal = host_is_ip_literal(host);
    if (!async_dns)
        log_warn("psp libcurl resolver is synchronous (no CURL_VERSION_ASYNCHDNS): "
                 "processor_url should be an IP literal%s",
                 ip_literal ? "" : "; DNS lookups will block the event loop");
    if (strcasecmp(scheme, "http") == 0 && !ip_literal && strcasecmp(host, "localhost") != 0)
        log_warn("psp processor_url uses plain http to a non-literal host=%s", host);
    else if (strcasecmp(scheme, "http") == 0 && ip_literal && strncmp(host, "127.", 4) != 0 &&
             strcmp(host, "[::1]") != 0)
        log_warn("psp processor_url uses plain http to a non-loopback host=%s", host);
    if (!cfg->verify_peer && strcasecmp(scheme, "https") == 0)
        log_warn("psp TLS peer verification is OFF for host=%s", host);

    /* scheme://host:port only: never log userinfo or the token. */
    log_info("psp client scheme=%s host=%s port=%s connect_timeout_ms=%ld request_timeout_ms=%ld "
             "max_connections=%ld verify_peer=%d async_dns=%d curl=%s",
             scheme, host, port ? port : "-", c->connect_timeout_ms, c->request_timeout_ms,
             cfg->max_connections, cfg->verify_peer ? 1 : 0, async_dns ? 1 : 0, vi->version);
    ok = true;
out:
    curl_free(scheme);
    curl_free(host);
    curl_free(port);
    curl_url_cleanup(u);
    if (!ok) {
        log_error("psp_new failed: %s", why);
        psp_free(c);
        c = NULL;
    }
    return c;
}

void psp_free(psp_client *c)
{
    pc_list *n;

    if (c == NULL || c->closing)
        return;
    c->closing = true;

    /* Abort every transfer; its callback fires now with "shutdown". */
    while ((n = list_first(&c->active)) != NULL) {
        psp_req *r = list_entry(n, psp_req, link);
        if (r->in_multi) {
            curl_multi_remove_handle(c->multi, r->easy);
            r->in_multi = false;
        }
        req_fail(r, "shutdown");
        req_to_done(c, r);
    }
    /* Requests already DONE keep the answer they got. */
    c->dispatch_depth++;                /* keep c alive across these callbacks */
    (void)run_completions(c);
    c->dispatch_depth--;

    for (int i = 0; i < c->n_easy_cache; i++)
        curl_easy_cleanup(c->easy_cache[i]);
    c->n_easy_cache = 0;
    if (c->multi != NULL)
        curl_multi_cleanup(c->multi);  /* may report CURL_POLL_REMOVE for cached connections */
    c->multi = NULL;
    while ((n = list_first(&c->socks)) != NULL)
        sock_free(list_entry(n, psp_sock, link));
    if (c->timer)
        event_free(c->timer);
    if (c->done_ev)
        event_free(c->done_ev);
    c->timer = c->done_ev = NULL;
    free(c->base_url);
    free(c->auth_header);
    c->base_url = c->auth_header = NULL;
    if (c->curl_global)
        curl_global_cleanup();
    c->curl_global = false;

    if (c->dispatch_depth > 0)
        c->free_deferred = true;        /* called from a callback: freed on unwind */
    else
        free(c);
}

int psp_in_flight(const psp_client *c)
{
    return c->in_flight;
}

void psp_get_stats(const psp_client *c, psp_stats *out)
{
    *out = c->stats;
}

/* Append "name: value" to the header list; false on allocation failure. */
static bool add_header(struct curl_slist **list, const char *line)
{
    struct curl_slist *n = curl_slist_append(*list, line);
    if (n == NULL)
        return false;
    *list = n;
    return true;
}

/*
 * Start one call. body is owned by the request from here on (freed on every
 * path). Returns 0 when the callback will fire, -1 (logged) when it will not.
 */
static int submit(psp_client *c, psp_call call, const char *gid, const psp_create_req *creq,
                  char *body, psp_cb cb, void *arg)
{
    psp_req *r = NULL;
    char *esc = NULL, *url = NULL, *idem = NULL;
    char gidv[300];
    int rc = -1;
    CURLcode cc = CURLE_OK;
    const char *why = "out of memory";

    if (c == NULL || cb == NULL) {
        why = "no client or no callback";
        goto out;
    }
    if (c->closing) {
        why = "client shutting down";
        goto out;
    }
    if (!key_valid(gid)) {
        why = "gid must be 1..200 printable characters";
        goto out;
    }

    r = calloc(1, sizeof(*r));
    if (r == NULL)
        goto out;
    r->c = c;
    list_init(&r->link);
    r->call = call;
    r->cb = cb;
    r->arg = arg;
    r->body = body;
    body = NULL;
    r->gid = strdup(gid);
    r->easy = easy_get(c);
    if (r->gid == NULL || r->easy == NULL)
        goto out;
    if (creq != NULL) {
        r->amount = creq->amount;
        snprintf(r->currency, sizeof(r->currency), "%s", creq->currency);
    }

    esc = curl_easy_escape(r->easy, gid, 0);
    if (esc == NULL)
        goto out;
    size_t ulen = strlen(c->base_url) + strlen(esc) + 64;
    url = malloc(ulen);
    if (url == NULL)
        goto out;
    switch (call) {
    case CALL_CREATE: snprintf(url, ulen, "%s/v1/payments", c->base_url); break;
    case CALL_GET: snprintf(url, ulen, "%s/v1/payments/%s", c->base_url, esc); break;
    case CALL_CANCEL: snprintf(url, ulen, "%s/v1/payments/%s/cancel", c->base_url, esc); break;
    case CALL_REFUND: snprintf(url, ulen, "%s/v1/payments/%s/refund", c->base_url, esc); break;
    }

    if (call == CALL_CREATE || call == CALL_REFUND) {
        size_t ilen = strlen("Idempotency-Key: refund:") + strlen(gid) + 1;
        idem = malloc(ilen);
        if (idem == NULL)
            goto out;
        snprintf(idem, ilen, "Idempotency-Key: %s%s", call == CALL_REFUND ? "refund:" : "", gid);
    }
    if (!add_header(&r->headers, c->auth_header) ||
        !add_header(&r->headers, "Content-Type: application/json") ||
        !add_header(&r->headers, "Accept: application/json") ||
        !add_header(&r->headers, "Expect:") ||
        (idem != NULL && !add_header(&r->headers, idem)))
        goto out;

#define SETOPT(opt, val) \
    do { if ((cc = curl_easy_setopt(r->easy, opt, val)) != CURLE_OK) goto setopt_failed; } while (0)
    SETOPT(CURLOPT_URL, url);
    SETOPT(CURLOPT_PRIVATE, (void *)r);
    SETOPT(CURLOPT_ERRORBUFFER, r->errbuf);
    SETOPT(CURLOPT_NOSIGNAL, 1L);
    SETOPT(CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_1_1);
    SETOPT(CURLOPT_TCP_NODELAY, 1L);
    SETOPT(CURLOPT_FOLLOWLOCATION, 0L);
#if LIBCURL_VERSION_NUM >= 0x075500
    SETOPT(CURLOPT_PROTOCOLS_STR, "http,https");
#else
    SETOPT(CURLOPT_PROTOCOLS, (long)(CURLPROTO_HTTP | CURLPROTO_HTTPS));
#endif
    SETOPT(CURLOPT_CONNECTTIMEOUT_MS, c->connect_timeout_ms);
    SETOPT(CURLOPT_TIMEOUT_MS, c->request_timeout_ms);
    SETOPT(CURLOPT_SSL_VERIFYPEER, c->verify_peer ? 1L : 0L);
    SETOPT(CURLOPT_SSL_VERIFYHOST, c->verify_peer ? 2L : 0L);
    SETOPT(CURLOPT_HTTPHEADER, r->headers);
    SETOPT(CURLOPT_USERAGENT, "paycoord/" PAYCOORD_VERSION);
    SETOPT(CURLOPT_WRITEFUNCTION, write_cb);
    SETOPT(CURLOPT_WRITEDATA, (void *)r);
    SETOPT(CURLOPT_HEADERFUNCTION, header_cb);
    SETOPT(CURLOPT_HEADERDATA, (void *)r);
    if (call == CALL_GET) {
        SETOPT(CURLOPT_HTTPGET, 1L);
    } else {
        SETOPT(CURLOPT_POST, 1L);
        SETOPT(CURLOPT_POSTFIELDS, r->body);
        SETOPT(CURLOPT_POSTFIELDSIZE, (long)strlen(r->body));
    }
#undef SETOPT

    r->start_ms = now_ms();
    list_push_tail(&c->active, &r->link);
    c->in_flight++;
    c->stats.started++;
    log_debug("psp call=%s gid=%s start in_flight=%d", call_names[call],
              kv(gidv, sizeof(gidv), gid), c->in_flight);

    CURLMcode mc = curl_multi_add_handle(c->multi, r->easy);
    if (mc == CURLM_OK) {
        r->in_multi = true;
    } else {
        /* The callback must not fire inside this call: defer it. */
        char err[128];
        snprintf(err, sizeof(err), "curl_multi_add_handle: %s", curl_multi_strerror(mc));
        req_fail(r, err);
        req_to_done(c, r);
        static const struct timeval zero = { 0, 0 };
        evtimer_add(c->done_ev, &zero);
    }
    r = NULL;                           /* owned by the client now */
    rc = 0;
    goto out;

setopt_failed:
    why = curl_easy_strerror(cc);
out:
    if (rc != 0)
        log_msg(c != NULL && c->closing ? PCLOG_WARNING : PCLOG_ERR,
                "psp call=%s gid=%s rejected: %s", call_names[call],
                kv(gidv, sizeof(gidv), gid ? gid : ""), why);
    if (r != NULL)
        req_release(c, r);
    free(body);
    free(idem);
    free(url);
    curl_free(esc);
    return rc;
}

int psp_create(psp_client *c, const psp_create_req *req, psp_cb cb, void *arg)
{
    cJSON *o = NULL;
    char *body = NULL;
    char amount[32];

    if (req == NULL || req->currency == NULL || req->account == NULL) {
        log_error("psp call=create rejected: missing request, currency or account");
        return -1;
    }
    o = cJSON_CreateObject();
    if (o == NULL)
        goto out;
    /* Amount as raw digits: cJSON numbers are doubles and print large
     * integers in exponent form. */
    snprintf(amount, sizeof(amount), "%" PRId64, req->amount);
    if (cJSON_AddStringToObject(o, "idempotency_key", req->gid ? req->gid : "") == NULL ||
        cJSON_AddRawToObject(o, "amount", amount) == NULL ||
        cJSON_AddStringToObject(o, "currency", req->currency) == NULL ||
        cJSON_AddStringToObject(o, "account", req->account) == NULL)
        goto out;
    if (req->reference != NULL && cJSON_AddStringToObject(o, "reference", req->reference) == NULL)
        goto out;
    if (req->metadata != NULL) {
        cJSON *m = cJSON_Duplicate(req->metadata, true);
        if (m == NULL)
            goto out;
        if (!cJSON_AddItemToObject(o, "metadata", m)) {
            cJSON_Delete(m);
            goto out;
        }
    }
    body = cJSON_PrintUnformatted(o);
out:
    cJSON_Delete(o);
    if (body == NULL) {
        log_error("psp call=create rejected: cannot build the request body");
        return -1;
    }
    return submit(c, CALL_CREATE, req->gid, req, body, cb, arg);
}

/* Body-less POSTs still send "{}" so every request is valid JSON. */
static int submit_simple(psp_client *c, psp_call call, const char *gid, psp_cb cb, void *arg)
{
    char *body = strdup(call == CALL_GET ? "" : "{}");
    if (body == NULL)
        return -1;
    return submit(c, call, gid, NULL, body, cb, arg);
}

int psp_get(psp_client *c, const char *gid, psp_cb cb, void *arg)
{
    return submit_simple(c, CALL_GET, gid, cb, arg);
}

int psp_cancel(psp_client *c, const char *gid, psp_cb cb, void *arg)
{
    return submit_simple(c, CALL_CANCEL, gid, cb, arg);
}

int psp_refund(psp_client *c, const char *gid, psp_cb cb, void *arg)
{
    return submit_simple(c, CALL_REFUND, gid, cb, arg);
}
