/*
 * http_client.c - the processor adapters' HTTP client (http_client.h): a
 * libcurl multi handle driven by libevent, one easy handle per request. It
 * carries requests and raw answers; the adapters build the one and classify
 * the other.
 */
#include "http_client.h"
#include "list.h"
#include "log.h"
#include "loop.h"

#include <arpa/inet.h>
#include <curl/curl.h>
#include <event2/event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#ifndef PAYCOORD_VERSION
#define PAYCOORD_VERSION "dev"
#endif

/*
 * Request lifecycle (each http_req is on exactly one of the client's lists
 * from submission until its callback has run):
 *
 *   1. http_send builds the easy handle and adds it to the multi handle:
 *      ACTIVE list. If curl_multi_add_handle fails the request goes straight
 *      to DONE without an answer and the zero-timeout done_ev is armed, so
 *      the callback still fires from the loop, never inside the call.
 *   2. A socket or timer event runs curl_multi_socket_action; once it has
 *      returned, curl_multi_info_read hands back finished transfers. Each is
 *      removed from the multi handle and its answer filled: DONE list.
 *   3. run_completions() pops DONE requests one at a time, fires the callback
 *      and only then releases the request (its easy handle goes back to a
 *      small free list). Callbacks therefore run outside every curl call: they
 *      may start new requests, and may even call http_free() (the client
 *      struct itself is then freed when the outermost dispatch unwinds).
 *   4. http_free() moves every ACTIVE request to DONE with "shutdown", fires
 *      all DONE callbacks, then tears down curl and the events. New calls made
 *      from those callbacks return -1.
 */

#define EASY_CACHE_MAX 32              /* idle easy handles kept for reuse */
#define DEFAULT_CONNECT_TIMEOUT_MS 2000L
#define DEFAULT_REQUEST_TIMEOUT_MS 10000L
#define ECHO_KEY_MAX 255

typedef struct http_req http_req;
typedef struct http_sock http_sock;

struct http_req {
    http_client *c;
    pc_list link;                      /* on c->active or c->done */
    CURL *easy;
    bool in_multi;
    struct curl_slist *headers;
    char *body;                        /* request body; curl does not copy it */
    char *resp;                        /* response body, NUL-terminated */
    size_t resp_len, resp_cap;
    bool resp_too_big;
    bool new_conn;
    double start_ms;
    http_cb cb;
    void *arg;
    long status;
    char error[CURL_ERROR_SIZE + 64];
    int retry_after_ms;                /* from a Retry-After header (delta-seconds) */
    bool replayed;                     /* Idempotent-Replayed: true */
    bool has_echo;
    char echo_key[ECHO_KEY_MAX + 1];   /* Idempotency-Key of the answer */
    char errbuf[CURL_ERROR_SIZE];
};

/* One per socket curl asked us to watch (CURLMOPT_SOCKETFUNCTION). */
struct http_sock {
    http_client *c;
    pc_list link;                      /* on c->socks */
    curl_socket_t fd;
    struct event *ev;
};

struct http_client {
    struct event_base *base;
    CURLM *multi;
    struct event *timer;               /* curl's single timeout */
    struct event *done_ev;             /* zero-timeout: deferred completions */
    char name[32];
    char *base_url;                    /* without trailing '/' */
    char *auth_header;                 /* never logged */
    long connect_timeout_ms;
    long request_timeout_ms;
    bool verify_peer;
    pc_list active, done;              /* http_req.link */
    pc_list socks;                     /* http_sock.link */
    CURL *easy_cache[EASY_CACHE_MAX];
    int n_easy_cache;
    int in_flight;
    int dispatch_depth;                /* nesting of run_completions */
    bool closing;                      /* http_free started: refuse new calls */
    bool free_deferred;                /* http_free ran inside a callback */
    bool curl_global;                  /* we hold a curl_global_init reference */
    http_stats stats;
};

static bool drain_multi(http_client *c);
static bool run_completions(http_client *c);
static void sock_free(http_sock *s);
static void timer_event_cb(evutil_socket_t fd, short what, void *arg);
static void done_event_cb(evutil_socket_t fd, short what, void *arg);
static int curl_timer_cb(CURLM *multi, long timeout_ms, void *userp);
static int curl_socket_cb(CURL *easy, curl_socket_t fd, int what, void *userp, void *socketp);

/* ---- small helpers ---------------------------------------------------- */

/* The daemon's clock (loop.h), in fractional milliseconds for latencies. */
static double now_ms(void)
{
    return (double)loop_now_us() / 1000.0;
}

/* Move r from c->active to the end of c->done. */
static void req_to_done(http_client *c, http_req *r)
{
    list_unlink(&r->link);
    list_push_tail(&c->done, &r->link);
}

/* ---- request objects -------------------------------------------------- */

static CURL *easy_get(http_client *c)
{
    if (c->n_easy_cache > 0) {
        CURL *e = c->easy_cache[--c->n_easy_cache];
        curl_easy_reset(e);
        return e;
    }
    return curl_easy_init();
}

static void easy_put(http_client *c, CURL *e)
{
    if (e == NULL)
        return;
    if (!c->closing && c->n_easy_cache < EASY_CACHE_MAX)
        c->easy_cache[c->n_easy_cache++] = e;
    else
        curl_easy_cleanup(e);
}

/* Free a request that is on no list and not in the multi handle. */
static void req_release(http_client *c, http_req *r)
{
    easy_put(c, r->easy);
    curl_slist_free_all(r->headers);
    free(r->body);
    free(r->resp);
    free(r);
}

/* The value of header line buf[len] if its name is name (case-insensitive),
 * trimmed, into v[vsize]; false otherwise. */
static bool header_value(const char *buf, size_t len, const char *name, char *v, size_t vsize)
{
    size_t nl = strlen(name);
    if (len <= nl || strncasecmp(buf, name, nl) != 0 || buf[nl] != ':')
        return false;
    const char *p = buf + nl + 1;
    const char *end = buf + len;
    while (p < end && (*p == ' ' || *p == '\t'))
        p++;
    while (end > p && (end[-1] == '\r' || end[-1] == '\n' || end[-1] == ' ' || end[-1] == '\t'))
        end--;
    size_t vl = (size_t)(end - p);
    if (vl >= vsize)
        vl = vsize - 1;
    memcpy(v, p, vl);
    v[vl] = '\0';
    return true;
}

/* Retry-After (its delta-seconds form; an HTTP date is ignored),
 * Idempotent-Replayed and the echoed Idempotency-Key. */
static size_t header_cb(char *buf, size_t size, size_t n, void *arg)
{
    http_req *r = arg;
    size_t len = size * n;
    char v[ECHO_KEY_MAX + 1];
    if (header_value(buf, len, "retry-after", v, sizeof(v))) {
        char *end;
        long secs = strtol(v, &end, 10);
        if (end != v && *end == '\0' && secs >= 0 && secs <= 3600)
            r->retry_after_ms = (int)secs * 1000;
    } else if (header_value(buf, len, "idempotent-replayed", v, sizeof(v))) {
        r->replayed = strcasecmp(v, "true") == 0;
    } else if (header_value(buf, len, "idempotency-key", v, sizeof(v))) {
        memcpy(r->echo_key, v, strlen(v) + 1);
        r->has_echo = true;
    } else if (len >= 5 && strncmp(buf, "HTTP/", 5) == 0) {
        /* A new status line (after a 1xx): forget the headers so far. */
        r->retry_after_ms = 0;
        r->replayed = false;
        r->has_echo = false;
    }
    return len;
}

static size_t write_cb(char *ptr, size_t size, size_t nmemb, void *userdata)
{
    http_req *r = userdata;
    size_t n = size * nmemb;

    if (n > HTTP_MAX_RESPONSE_BODY - r->resp_len) {
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

/* Fill r's answer from a finished transfer. */
static void req_finish(http_req *r, CURLcode code)
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
         * request may or may not have been processed. */
        r->status = 0;
        if (r->resp_too_big)
            snprintf(r->error, sizeof(r->error), "response body over %d bytes", HTTP_MAX_RESPONSE_BODY);
        else
            snprintf(r->error, sizeof(r->error), "%s: %.200s", curl_easy_strerror(code),
                     r->errbuf[0] ? r->errbuf : "-");
    } else {
        r->status = http;
        r->error[0] = '\0';
    }
}

/* Complete r without an HTTP answer (add failure, shutdown). */
static void req_fail(http_req *r, const char *error)
{
    r->status = 0;
    snprintf(r->error, sizeof(r->error), "%s", error);
}

static void fire(http_req *r)
{
    http_answer a = {
        .status = r->status,
        .body = r->status != 0 && r->resp ? r->resp : "",
        .len = r->status != 0 ? r->resp_len : 0,
        .error = r->error,
        .too_big = r->resp_too_big,
        .retry_after_ms = r->status != 0 ? r->retry_after_ms : 0,
        .replayed = r->status != 0 && r->replayed,
        .idempotency_key = r->status != 0 && r->has_echo ? r->echo_key : NULL,
        .new_conn = r->new_conn,
        .elapsed_ms = now_ms() - r->start_ms,
    };
    r->cb(&a, r->arg);
}

/*
 * Fire the callbacks of every DONE request, one at a time, outside any curl
 * call. Returns true if the client was freed meanwhile (http_free from a
 * callback): the caller must not touch it again.
 */
static bool run_completions(http_client *c)
{
    pc_list *n;

    c->dispatch_depth++;
    while ((n = list_pop_head(&c->done)) != NULL) {
        http_req *r = list_entry(n, http_req, link);
        c->in_flight--;
        c->stats.completed++;
        if (r->status == 0)
            c->stats.no_answer++;
        fire(r);
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
static bool drain_multi(http_client *c)
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
        http_req *r = (http_req *)priv;
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
    http_client *c = ((http_sock *)arg)->c;      /* the http_sock may go away below */
    int action = ((what & EV_READ) ? CURL_CSELECT_IN : 0) |
                 ((what & EV_WRITE) ? CURL_CSELECT_OUT : 0);
    int running = 0;

    CURLMcode mc = curl_multi_socket_action(c->multi, fd, action, &running);
    if (mc != CURLM_OK)
        log_error("%s curl_multi_socket_action fd=%d error=\"%s\"", c->name, (int)fd,
                  curl_multi_strerror(mc));
    (void)drain_multi(c);
}

static void timer_event_cb(evutil_socket_t fd, short what, void *arg)
{
    http_client *c = arg;
    int running = 0;

    CURLMcode mc = curl_multi_socket_action(c->multi, CURL_SOCKET_TIMEOUT, 0, &running);
    if (mc != CURLM_OK)
        log_error("%s curl_multi_socket_action timeout error=\"%s\"", c->name, curl_multi_strerror(mc));
    (void)drain_multi(c);
}

static void done_event_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)run_completions(arg);
}

/* CURLMOPT_TIMERFUNCTION: (re)arm or cancel the single timeout. No curl calls here. */
static int curl_timer_cb(CURLM *multi, long timeout_ms, void *userp)
{
    http_client *c = userp;

    if (timeout_ms < 0) {
        evtimer_del(c->timer);
        return 0;
    }
    struct timeval tv = { .tv_sec = timeout_ms / 1000, .tv_usec = (timeout_ms % 1000) * 1000 };
    return evtimer_add(c->timer, &tv) == 0 ? 0 : -1;
}

static void sock_free(http_sock *s)
{
    list_unlink(&s->link);
    event_free(s->ev);
    free(s);
}

/* CURLMOPT_SOCKETFUNCTION: create, update or free the event for one socket. */
static int curl_socket_cb(CURL *easy, curl_socket_t fd, int what, void *userp, void *socketp)
{
    http_client *c = userp;
    http_sock *s = socketp;

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
    log_error("%s cannot watch socket fd=%d", c->name, (int)fd);
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

http_client *http_new(struct event_base *base, const http_config *cfg)
{
    http_client *c = NULL;
    CURLU *u = NULL;
    char *scheme = NULL, *host = NULL, *port = NULL;
    bool ok = false;
    const char *name = cfg && cfg->name ? cfg->name : "http";
    const char *why = "out of memory";

    if (base == NULL || cfg == NULL || cfg->base_url == NULL || cfg->auth_header == NULL) {
        why = "missing base, config, base_url or auth header";
        goto out;
    }
    for (const char *p = cfg->auth_header; *p; p++)
        if (*p < ' ' || *p == 0x7f) {
            why = "processor credentials contain control characters";
            goto out;
        }

    c = calloc(1, sizeof(*c));
    if (c == NULL)
        goto out;
    snprintf(c->name, sizeof(c->name), "%s", name);
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
    c->connect_timeout_ms = cfg->connect_timeout_ms > 0 ? cfg->connect_timeout_ms : DEFAULT_CONNECT_TIMEOUT_MS;
    c->request_timeout_ms = cfg->request_timeout_ms > 0 ? cfg->request_timeout_ms : DEFAULT_REQUEST_TIMEOUT_MS;
    if (cfg->connect_timeout_ms <= 0 || cfg->request_timeout_ms <= 0)
        log_warn("%s timeouts not set, using connect_timeout_ms=%ld request_timeout_ms=%ld", c->name,
                 c->connect_timeout_ms, c->request_timeout_ms);

    size_t ulen = strlen(cfg->base_url);
    while (ulen > 0 && cfg->base_url[ulen - 1] == '/')
        ulen--;
    c->base_url = strndup(cfg->base_url, ulen);
    c->auth_header = strdup(cfg->auth_header);
    if (c->base_url == NULL || c->auth_header == NULL)
        goto out;

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
        if (curl_multi_setopt(c->multi, CURLMOPT_MAX_TOTAL_CONNECTIONS, cfg->max_connections) != CURLM_OK ||
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
        log_warn("%s libcurl resolver is synchronous (no CURL_VERSION_ASYNCHDNS): "
                 "processor_url should be an IP literal%s",
                 c->name, ip_literal ? "" : "; DNS lookups will block the event loop");
    if (strcasecmp(scheme, "http") == 0 && !ip_literal && strcasecmp(host, "localhost") != 0)
        log_warn("%s processor_url uses plain http to a non-literal host=%s", c->name, host);
    else if (strcasecmp(scheme, "http") == 0 && ip_literal && strncmp(host, "127.", 4) != 0 &&
             strcmp(host, "[::1]") != 0)
        log_warn("%s processor_url uses plain http to a non-loopback host=%s", c->name, host);
    if (!cfg->verify_peer && strcasecmp(scheme, "https") == 0)
        log_warn("%s TLS peer verification is OFF for host=%s", c->name, host);

    /* scheme://host:port only: never log userinfo, the path or the credentials. */
    log_info("%s client scheme=%s host=%s port=%s connect_timeout_ms=%ld request_timeout_ms=%ld "
             "max_connections=%ld verify_peer=%d async_dns=%d curl=%s",
             c->name, scheme, host, port ? port : "-", c->connect_timeout_ms, c->request_timeout_ms,
             cfg->max_connections, cfg->verify_peer ? 1 : 0, async_dns ? 1 : 0, vi->version);
    ok = true;
out:
    curl_free(scheme);
    curl_free(host);
    curl_free(port);
    curl_url_cleanup(u);
    if (!ok) {
        log_error("%s client not started: %s", name, why);
        http_free(c);
        c = NULL;
    }
    return c;
}

void http_free(http_client *c)
{
    pc_list *n;

    if (c == NULL || c->closing)
        return;
    c->closing = true;

    /* Abort every transfer; its callback fires now with "shutdown". */
    while ((n = list_first(&c->active)) != NULL) {
        http_req *r = list_entry(n, http_req, link);
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
        sock_free(list_entry(n, http_sock, link));
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

int http_in_flight(const http_client *c)
{
    return c ? c->in_flight : 0;
}

bool http_closing(const http_client *c)
{
    return c == NULL || c->closing;
}

void http_get_stats(const http_client *c, http_stats *out)
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

/* A value that goes into a header line: printable ASCII only. */
static bool header_safe(const char *s)
{
    for (; *s; s++)
        if (*s < ' ' || *s == 0x7f)
            return false;
    return true;
}

int http_send(http_client *c, const http_request *rq, http_cb cb, void *arg)
{
    http_req *r = NULL;
    char *url = NULL, *idem = NULL, *ctype = NULL;
    int rc = -1;
    CURLcode cc = CURLE_OK;
    const char *why = "out of memory";

    if (c == NULL || cb == NULL || rq == NULL || rq->path == NULL) {
        why = "no client, request or callback";
        goto out;
    }
    if (c->closing) {
        why = "client shutting down";
        goto out;
    }
    if (!header_safe(rq->path) || (rq->idempotency_key && !header_safe(rq->idempotency_key)) ||
        (rq->content_type && !header_safe(rq->content_type))) {
        why = "control characters in the path or a header";
        goto out;
    }

    r = calloc(1, sizeof(*r));
    if (r == NULL)
        goto out;
    r->c = c;
    list_init(&r->link);
    r->cb = cb;
    r->arg = arg;
    r->body = strdup(rq->post && rq->body ? rq->body : "");
    r->easy = easy_get(c);
    if (r->body == NULL || r->easy == NULL)
        goto out;

    size_t ulen = strlen(c->base_url) + strlen(rq->path) + 1;
    url = malloc(ulen);
    if (url == NULL)
        goto out;
    snprintf(url, ulen, "%s%s", c->base_url, rq->path);

    if (rq->idempotency_key != NULL) {
        size_t ilen = strlen("Idempotency-Key: ") + strlen(rq->idempotency_key) + 1;
        idem = malloc(ilen);
        if (idem == NULL)
            goto out;
        snprintf(idem, ilen, "Idempotency-Key: %s", rq->idempotency_key);
    }
    if (rq->post) {
        const char *ct = rq->content_type ? rq->content_type : "application/json";
        size_t clen = strlen("Content-Type: ") + strlen(ct) + 1;
        ctype = malloc(clen);
        if (ctype == NULL)
            goto out;
        snprintf(ctype, clen, "Content-Type: %s", ct);
    }
    if (!add_header(&r->headers, c->auth_header) || (ctype != NULL && !add_header(&r->headers, ctype)) ||
        !add_header(&r->headers, "Accept: application/json") || !add_header(&r->headers, "Expect:") ||
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
    /* Answers are a few hundred bytes to a few KB: a 1 KiB receive buffer
     * (libcurl's minimum; default 16 KiB) saves about 3 KB per request in
     * the air (docs/performance.md, S4); a longer answer is read in pieces. */
    SETOPT(CURLOPT_BUFFERSIZE, 1024L);
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
    if (!rq->post) {
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
        log_msg(c != NULL && c->closing ? PCLOG_WARNING : PCLOG_ERR, "%s request %s rejected: %s",
                c ? c->name : "http", rq && rq->post ? "POST" : "GET", why);
    if (r != NULL)
        req_release(c, r);
    free(idem);
    free(ctype);
    free(url);
    return rc;
}
