/* sim_webhook.c - signed webhook deliveries with retries (see sim_webhook.h). */
#include "sim_webhook.h"

#include <arpa/inet.h>
#include <cjson/cJSON.h>
#include <event2/buffer.h>
#include <event2/http.h>
#include <netinet/in.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define RETRY_CAP_MS (3600 * 1000)
#define TIMEOUT_S 10

typedef struct delivery {
    struct delivery *prev;
    struct delivery *next;
    sim_webhooks *w;
    struct event *timer;
    struct evhttp_connection *conn; /* while in flight */
    char *body;
    size_t len;
    bool stripe_sign;
    bool forged;   /* sent once with a wrong signature, never retried */
    bool queued;   /* waiting for an in-flight slot */
    int attempts;
} delivery;

struct sim_webhooks {
    sim_server *s;
    char url[SIM_WEBHOOK_URL_MAX];
    char host[64];
    uint16_t port;
    char path[SIM_WEBHOOK_URL_MAX];
    char secret_text[SIM_WEBHOOK_SECRET_MAX + 1];
    unsigned char key[SIM_WEBHOOK_SECRET_MAX];
    size_t key_len;
    delivery *all; /* every delivery */
    size_t count;
    size_t inflight;
    /* Connections whose request completed: freed on the next loop turn,
     * since libevent still uses them when the request callback returns. */
    struct evhttp_connection **done;
    size_t ndone;
    size_t done_cap;
    struct event *reap;
};

static void attempt(delivery *d);

static void reap_cb(evutil_socket_t fd, short what, void *arg)
{
    sim_webhooks *w = arg;
    (void)fd;
    (void)what;
    while (w->ndone > 0)
        evhttp_connection_free(w->done[--w->ndone]);
}

sim_webhooks *sim_webhooks_new(sim_server *s)
{
    sim_webhooks *w = sim_xcalloc(1, sizeof(*w));
    w->s = s;
    w->reap = evtimer_new(s->base, reap_cb, w);
    if (w->reap == NULL) {
        sim_log(SIM_LOG_ERR, "cannot create the webhook reaper: out of memory?");
        abort();
    }
    return w;
}

static void unlink_free(delivery *d)
{
    sim_webhooks *w = d->w;
    if (d->prev != NULL)
        d->prev->next = d->next;
    else
        w->all = d->next;
    if (d->next != NULL)
        d->next->prev = d->prev;
    w->count--;
    if (d->timer != NULL)
        event_free(d->timer);
    free(d->body);
    free(d);
}

void sim_webhooks_free(sim_webhooks *w)
{
    if (w == NULL)
        return;
    while (w->all != NULL) {
        delivery *d = w->all;
        if (d->conn != NULL)
            evhttp_connection_free(d->conn); /* frees its request without a callback */
        unlink_free(d);
    }
    reap_cb(-1, 0, w);
    event_free(w->reap);
    free(w->done);
    free(w);
}

static bool numeric_loopback(const char *host)
{
    struct in_addr a4;
    struct in6_addr a6;
    if (inet_pton(AF_INET, host, &a4) == 1)
        return (ntohl(a4.s_addr) >> 24) == 127;
    if (inet_pton(AF_INET6, host, &a6) == 1)
        return IN6_IS_ADDR_LOOPBACK(&a6);
    return false;
}

static int parse_url(sim_webhooks *w, const char *url, char *err, size_t errlen)
{
    char host[64];
    size_t n = strlen(url);
    if (n == 0) { /* "" turns webhooks off */
        w->url[0] = '\0';
        return 0;
    }
    if (n >= SIM_WEBHOOK_URL_MAX || strncmp(url, "http://", 7) != 0) {
        snprintf(err, errlen, "url must be http://<loopback address>:<port>/<path>");
        return -1;
    }
    const char *h = url + 7, *end;
    if (*h == '[') { /* [::1] */
        end = strchr(h, ']');
        if (end == NULL || (size_t)(end - h - 1) >= sizeof(host)) {
            snprintf(err, errlen, "bad IPv6 address in url");
            return -1;
        }
        memcpy(host, h + 1, (size_t)(end - h - 1));
        host[end - h - 1] = '\0';
        end++;
    } else {
        end = h + strcspn(h, ":/");
        if ((size_t)(end - h) >= sizeof(host)) {
            snprintf(err, errlen, "bad host in url");
            return -1;
        }
        memcpy(host, h, (size_t)(end - h));
        host[end - h] = '\0';
    }
    if (!numeric_loopback(host)) {
        snprintf(err, errlen, "the webhook url must name a numeric loopback address (127.0.0.0/8 or ::1)");
        return -1;
    }
    if (*end != ':') {
        snprintf(err, errlen, "the webhook url needs a port");
        return -1;
    }
    const char *port = end + 1;
    size_t plen = strcspn(port, "/");
    int64_t pv;
    if (sim_parse_i64(port, plen, false, &pv) != 0 || pv < 1 || pv > 65535) {
        snprintf(err, errlen, "bad port in url");
        return -1;
    }
    const char *path = port + plen;
    if (!sim_printable_ascii(path, strlen(path)) || strchr(path, ' ') != NULL) {
        snprintf(err, errlen, "bad path in url");
        return -1;
    }
    snprintf(w->url, sizeof(w->url), "%s", url);
    snprintf(w->host, sizeof(w->host), "%s", host);
    w->port = (uint16_t)pv;
    snprintf(w->path, sizeof(w->path), "%s", *path ? path : "/");
    return 0;
}

static int parse_secret(sim_webhooks *w, const char *secret, char *err, size_t errlen)
{
    size_t n = strlen(secret);
    if (n > SIM_WEBHOOK_SECRET_MAX || !sim_printable_ascii(secret, n)) {
        snprintf(err, errlen, "secret must be at most %d printable characters", SIM_WEBHOOK_SECRET_MAX);
        return -1;
    }
    if (w->s->mode == SIM_MODE_ADYEN) {
        /* Adyen's HMAC key is hex; the signature uses its bytes. */
        if (n % 2 != 0) {
            snprintf(err, errlen, "the Adyen HMAC key must be hex (an even number of digits)");
            return -1;
        }
        for (size_t i = 0; i < n; i += 2) {
            int hi = sim_hexval(secret[i]), lo = sim_hexval(secret[i + 1]);
            if (hi < 0 || lo < 0) {
                snprintf(err, errlen, "the Adyen HMAC key must be hex");
                return -1;
            }
            w->key[i / 2] = (unsigned char)(hi * 16 + lo);
        }
        w->key_len = n / 2;
    } else {
        memcpy(w->key, secret, n);
        w->key_len = n;
    }
    memcpy(w->secret_text, secret, n + 1);
    return 0;
}

int sim_webhooks_configure(sim_webhooks *w, const char *url, const char *secret, char *err, size_t errlen)
{
    sim_webhooks next = *w;
    if (url != NULL && parse_url(&next, url, err, errlen) != 0)
        return -1;
    if (secret != NULL && parse_secret(&next, secret, err, errlen) != 0)
        return -1;
    memcpy(w->url, next.url, sizeof(w->url));
    memcpy(w->host, next.host, sizeof(w->host));
    w->port = next.port;
    memcpy(w->path, next.path, sizeof(w->path));
    memcpy(w->secret_text, next.secret_text, sizeof(w->secret_text));
    memcpy(w->key, next.key, sizeof(w->key));
    w->key_len = next.key_len;
    return 0;
}

int sim_webhooks_configure_json(sim_webhooks *w, const char *json, size_t len, char *err, size_t errlen)
{
    int rc = -1;
    cJSON *root = cJSON_ParseWithLength(json, len);
    const cJSON *item;
    const char *url = NULL, *secret = NULL;
    if (!cJSON_IsObject(root)) {
        snprintf(err, errlen, "body must be a JSON object");
        goto out;
    }
    cJSON_ArrayForEach(item, root) {
        if (strcmp(item->string, "url") == 0 && cJSON_IsString(item)) {
            url = item->valuestring;
        } else if (strcmp(item->string, "secret") == 0 && cJSON_IsString(item)) {
            secret = item->valuestring;
        } else {
            snprintf(err, errlen, "fields: url and secret (strings)");
            goto out;
        }
    }
    rc = sim_webhooks_configure(w, url, secret, err, errlen);
out:
    cJSON_Delete(root);
    return rc;
}

void sim_webhooks_config_json(const sim_webhooks *w, sim_buf *b)
{
    sim_buf_adds(b, "{\"url\":");
    sim_buf_add_jstr(b, w->url, strlen(w->url));
    sim_buf_addf(b, ",\"secret_set\":%s,\"pending\":%zu}", w->key_len > 0 ? "true" : "false", w->count);
}

bool sim_webhooks_enabled(const sim_webhooks *w)
{
    return w->url[0] != '\0';
}

const unsigned char *sim_webhooks_key(const sim_webhooks *w, size_t *len)
{
    *len = w->key_len;
    return w->key;
}

void sim_webhooks_hmac(const unsigned char *key, size_t key_len, const void *msg, size_t len,
                       unsigned char out[32])
{
    unsigned int outlen = 32;
    static const unsigned char empty = 0;
    if (HMAC(EVP_sha256(), key_len > 0 ? key : &empty, (int)key_len, msg, len, out, &outlen) == NULL) {
        sim_log(SIM_LOG_ERR, "HMAC-SHA256 failed");
        memset(out, 0, 32);
    }
}

size_t sim_webhooks_pending(const sim_webhooks *w)
{
    return w != NULL ? w->count : 0;
}

static sim_counters *counters(sim_webhooks *w)
{
    return sim_store_counters(w->s->store);
}

static void timer_cb(evutil_socket_t fd, short what, void *arg)
{
    delivery *d = arg;
    (void)fd;
    (void)what;
    attempt(d);
}

static void schedule(delivery *d, int64_t delay_ms)
{
    struct timeval tv = {(time_t)(delay_ms / 1000), (suseconds_t)(delay_ms % 1000) * 1000};
    if (d->timer == NULL)
        d->timer = evtimer_new(d->w->s->base, timer_cb, d);
    if (d->timer == NULL || evtimer_add(d->timer, &tv) != 0) {
        sim_log(SIM_LOG_ERR, "cannot arm a webhook timer: out of memory?");
        abort();
    }
}

/* A slot in flight was freed: start the oldest queued delivery. */
static void start_queued(sim_webhooks *w)
{
    /* The list is newest first; the oldest queued one is the last. */
    delivery *last = NULL;
    for (delivery *d = w->all; d != NULL; d = d->next)
        if (d->queued)
            last = d;
    if (last != NULL) {
        last->queued = false;
        schedule(last, 0);
    }
}

static void finished(delivery *d, bool ok, int code)
{
    sim_webhooks *w = d->w;
    sim_faults *f = &w->s->faults;
    if (d->conn != NULL) {
        if (w->ndone == w->done_cap) {
            w->done_cap = w->done_cap ? w->done_cap * 2 : SIM_WEBHOOK_INFLIGHT_MAX;
            w->done = sim_xrealloc(w->done, w->done_cap * sizeof(*w->done));
        }
        w->done[w->ndone++] = d->conn;
        d->conn = NULL;
        struct timeval zero = {0, 0};
        evtimer_add(w->reap, &zero);
    }
    w->inflight--;
    if (ok) {
        counters(w)->webhooks_delivered++;
        sim_log(SIM_LOG_DEBUG, "webhook delivered attempt=%d status=%d", d->attempts, code);
        unlink_free(d);
    } else if (d->forged) {
        sim_log(SIM_LOG_DEBUG, "forged webhook refused status=%d", code);
        unlink_free(d);
    } else {
        counters(w)->webhooks_failed++;
        int64_t max = f->webhook_max_attempts > 0 ? f->webhook_max_attempts : 1;
        if (d->attempts >= max) {
            counters(w)->webhooks_given_up++;
            sim_log(SIM_LOG_WARNING, "webhook given up after %d attempts (last status %d)", d->attempts, code);
            unlink_free(d);
        } else {
            int64_t delay = f->webhook_retry_ms;
            for (int i = 1; i < d->attempts && delay < RETRY_CAP_MS; i++)
                delay *= 2;
            if (delay > RETRY_CAP_MS)
                delay = RETRY_CAP_MS;
            sim_log(SIM_LOG_DEBUG, "webhook attempt %d failed (status %d), retry in %lld ms", d->attempts, code,
                    (long long)delay);
            schedule(d, delay);
        }
    }
    start_queued(w);
}

static void response_cb(struct evhttp_request *req, void *arg)
{
    delivery *d = arg;
    int code = req != NULL ? evhttp_request_get_response_code(req) : 0;
    bool ok = code >= 200 && code < 300;
    if (ok && d->w->s->mode == SIM_MODE_ADYEN && d->w->s->faults.webhook_require_accepted) {
        struct evbuffer *in = evhttp_request_get_input_buffer(req);
        size_t n = evbuffer_get_length(in);
        if (n > 4096)
            n = 4096;
        char buf[4097];
        ev_ssize_t got = evbuffer_copyout(in, buf, n);
        buf[got > 0 ? got : 0] = '\0';
        ok = strstr(buf, "[accepted]") != NULL;
    }
    finished(d, ok, code);
}

static void stripe_signature(sim_webhooks *w, const delivery *d, char *out, size_t cap)
{
    int64_t t = sim_now_ms() / 1000;
    char prefix[32];
    int plen = snprintf(prefix, sizeof(prefix), "%lld.", (long long)t);
    unsigned char mac[32];
    sim_buf msg;
    sim_buf_init(&msg);
    sim_buf_add(&msg, prefix, (size_t)plen);
    sim_buf_add(&msg, d->body, d->len);
    if (d->forged) {
        unsigned char wrong[SIM_WEBHOOK_SECRET_MAX + 1];
        memcpy(wrong, w->key, w->key_len);
        wrong[w->key_len] = 'x';
        sim_webhooks_hmac(wrong, w->key_len + 1, msg.data, msg.len, mac);
    } else {
        sim_webhooks_hmac(w->key, w->key_len, msg.data, msg.len, mac);
    }
    sim_buf_free(&msg);
    int n = snprintf(out, cap, "t=%lld,v1=", (long long)t);
    for (int i = 0; i < 32 && (size_t)n + 2 < cap; i++)
        n += snprintf(out + n, cap - (size_t)n, "%02x", mac[i]);
}

static void attempt(delivery *d)
{
    sim_webhooks *w = d->w;
    if (!sim_webhooks_enabled(w)) {
        counters(w)->webhooks_given_up++;
        unlink_free(d);
        return;
    }
    if (w->inflight >= SIM_WEBHOOK_INFLIGHT_MAX) {
        d->queued = true;
        return;
    }
    d->attempts++;
    struct evhttp_connection *conn = evhttp_connection_base_new(w->s->base, NULL, w->host, w->port);
    struct evhttp_request *req = conn != NULL ? evhttp_request_new(response_cb, d) : NULL;
    if (req == NULL) {
        d->conn = conn;
        w->inflight++;
        finished(d, false, 0);
        return;
    }
    evhttp_connection_set_timeout(conn, TIMEOUT_S);
    struct evkeyvalq *h = evhttp_request_get_output_headers(req);
    char hostport[96];
    snprintf(hostport, sizeof(hostport), strchr(w->host, ':') ? "[%s]:%u" : "%s:%u", w->host, w->port);
    evhttp_add_header(h, "Host", hostport);
    evhttp_add_header(h, "Content-Type", "application/json; charset=utf-8");
    evhttp_add_header(h, "User-Agent", w->s->mode == SIM_MODE_STRIPE ? "Stripe/1.0 (psp-sim)" : "Adyen (psp-sim)");
    if (d->stripe_sign) {
        char sig[160];
        stripe_signature(w, d, sig, sizeof(sig));
        evhttp_add_header(h, "Stripe-Signature", sig);
    }
    evbuffer_add(evhttp_request_get_output_buffer(req), d->body, d->len);
    d->conn = conn;
    w->inflight++;
    if (evhttp_make_request(conn, req, EVHTTP_REQ_POST, w->path) != 0) {
        /* libevent freed the request; finished() frees the connection */
        finished(d, false, 0);
        return;
    }
}

static void queue(sim_webhooks *w, const char *body, size_t len, bool stripe_sign, bool forged)
{
    delivery *d = sim_xcalloc(1, sizeof(*d));
    d->w = w;
    d->body = sim_xmalloc(len + 1);
    memcpy(d->body, body, len);
    d->body[len] = '\0';
    d->len = len;
    d->stripe_sign = stripe_sign;
    d->forged = forged;
    d->next = w->all;
    if (w->all != NULL)
        w->all->prev = d;
    w->all = d;
    w->count++;
    counters(w)->webhooks_queued++;
    schedule(d, w->s->faults.webhook_delay_ms);
}

void sim_webhooks_emit(sim_webhooks *w, const char *body, size_t len, bool stripe_sign,
                       const char *forged_body, size_t forged_len)
{
    sim_server *s = w->s;
    if (!sim_webhooks_enabled(w))
        return;
    if (sim_rng_hit(&s->rng, s->faults.webhook_drop_rate)) {
        counters(w)->webhooks_dropped++;
        return;
    }
    if (sim_rng_hit(&s->rng, s->faults.webhook_bad_signature_rate)) {
        counters(w)->webhooks_forged++;
        if (forged_body != NULL)
            queue(w, forged_body, forged_len, false, true);
        else
            queue(w, body, len, stripe_sign, true);
    }
    queue(w, body, len, stripe_sign, false);
    if (sim_rng_hit(&s->rng, s->faults.webhook_duplicate_rate))
        queue(w, body, len, stripe_sign, false);
}
