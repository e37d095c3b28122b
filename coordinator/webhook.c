/*
 * webhook.c - the processor webhook listener (libevent evhttp) on
 * webhook_listen, loopback by default: a TLS-terminating proxy exposes it.
 *
 * A delivery (POST, any path) goes:
 *   1. The adapter verifies it (Adyen: every item's HMAC-SHA256; Stripe:
 *      Stripe-Signature) and parses it into events. Unsigned or wrongly
 *      signed: 401, nothing changed, counted (webhooks.rejected). Not a
 *      delivery of this processor: 400 (webhooks.malformed).
 *   2. The events are written durably, each once (store_save_events,
 *      deduplicated on the event id): a redelivery changes nothing
 *      (webhooks.duplicates). The database unavailable: 503, and the
 *      processor delivers again later (webhooks.failed).
 *   3. Only then the adapter notes each event (proc_event_record), and the
 *      processor gets 200 "[accepted]" (what Adyen expects; Stripe takes any
 *      2xx).
 * A webhook never settles a payment itself: it is an answer that the
 * payment's next get() or cancel() finds, by the same rules as a poll.
 *
 * At start the stored events of every payment still unsettled are loaded
 * into the adapter (retried until the database answers); the Adyen adapter
 * decides nothing before that.
 */
#include "webhook.h"
#include "ctx.h"
#include "list.h"
#include "log.h"
#include "loop.h"
#include "proc.h"
#include "store.h"

#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <event2/buffer.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>

#define LOAD_RETRY_MS 200

/* One delivery waiting for its events to be stored. */
typedef struct pending {
    pc_list link;                  /* on waiting */
    struct evhttp_request *req;    /* NULL once its connection closed */
    struct evhttp_connection *conn;
    proc_event events[PROC_EVENTS_MAX];
    int n;
} pending;

static struct evhttp *http;
static pc_list waiting = { &waiting, &waiting };   /* deliveries whose events are being stored */
static loop_timer load_timer;
static bool load_timer_up;
static const char *api;

static void reply(struct evhttp_request *req, int code, const char *reason, const char *body)
{
    struct evbuffer *out = evbuffer_new();
    if (out && body)
        evbuffer_add(out, body, strlen(body));
    evhttp_add_header(evhttp_request_get_output_headers(req), "Content-Type", "text/plain");
    evhttp_send_reply(req, code, reason, out);
    if (out)
        evbuffer_free(out);
}

/* The connection went away before the events were stored: nobody to answer. */
static void conn_closed(struct evhttp_connection *conn, void *arg)
{
    pending *p = arg;
    (void)conn;
    p->req = NULL;
    p->conn = NULL;
}

static const char *status_text(proc_status s)
{
    return s == PROC_ST_NONE ? "none" : proc_status_name(s);
}

static void saved_cb(st_status st, int fresh, void *arg)
{
    pending *p = arg;
    list_unlink(&p->link);
    if (st == ST_OK) {
        for (int i = 0; i < p->n; i++)
            proc_event_record(&p->events[i]);
        D->stats.webhooks_accepted += (uint64_t)fresh;
        D->stats.webhooks_duplicates += (uint64_t)(p->n - fresh);
        for (int i = 0; i < p->n; i++)
            log_info("webhook event=stored id=%s gid=%s kind=%s status=%s success=%d", p->events[i].id,
                     p->events[i].gid[0] ? p->events[i].gid : "-", p->events[i].kind,
                     status_text(p->events[i].status), p->events[i].success ? 1 : 0);
        if (fresh < p->n)
            log_info("webhook event=duplicates count=%d", p->n - fresh);
    } else {
        D->stats.webhooks_failed++;
        log_warn("webhook event=not_stored events=%d note=\"answered 503: the processor delivers again\"", p->n);
    }
    if (p->req) {
        evhttp_connection_set_closecb(p->conn, NULL, NULL);
        if (st == ST_OK)
            reply(p->req, 200, "OK", "[accepted]");
        else
            reply(p->req, 503, "Service Unavailable", "not stored; deliver again");
    }
    free(p);
}

static void to_store(const proc_event *e, store_event *s)
{
    *s = (store_event){ .event_id = e->id, .processor = api, .gid = e->gid, .processor_ref = e->processor_ref,
                        .kind = e->kind, .status = status_text(e->status), .success = e->success,
                        .is_cancel = e->cancel, .reason = e->reason, .currency = e->currency,
                        .amount = e->amount, .has_amount = e->amount != 0 };
}

static void handle(struct evhttp_request *req, void *arg)
{
    (void)arg;
    D->stats.webhooks_received++;
    if (evhttp_request_get_command(req) != EVHTTP_REQ_POST) {
        reply(req, 405, "Method Not Allowed", "POST only");
        return;
    }
    struct evbuffer *in = evhttp_request_get_input_buffer(req);
    size_t len = evbuffer_get_length(in);
    const char *body = len ? (const char *)evbuffer_pullup(in, -1) : "";
    const char *hname = proc_webhook_header();
    proc_webhook_in wi = { .body = body, .len = len, .now_s = (int64_t)time(NULL),
                           .signature = hname ? evhttp_find_header(evhttp_request_get_input_headers(req), hname)
                                              : NULL };
    pending *p = calloc(1, sizeof(*p));
    if (!p) {
        reply(req, 503, "Service Unavailable", "out of memory");
        return;
    }
    char err[256] = "";
    proc_wh_status st = proc_webhook(&wi, p->events, PROC_EVENTS_MAX, &p->n, err, sizeof(err));
    if (st != PROC_WH_OK) {
        free(p);
        if (st == PROC_WH_UNSIGNED) {
            D->stats.webhooks_rejected++;
            log_warn("webhook event=rejected reason=\"%s\" bytes=%zu alert=webhook_signature", err, len);
            reply(req, 401, "Unauthorized", "signature missing or wrong");
        } else if (st == PROC_WH_MALFORMED) {
            D->stats.webhooks_malformed++;
            log_warn("webhook event=malformed reason=\"%s\" bytes=%zu", err, len);
            reply(req, 400, "Bad Request", "not a webhook of this processor");
        } else {
            reply(req, 404, "Not Found", "this processor sends no webhooks");
        }
        return;
    }
    if (p->n == 0) {                       /* authentic, nothing we keep */
        free(p);
        reply(req, 200, "OK", "[accepted]");
        return;
    }
    store_event se[PROC_EVENTS_MAX];
    for (int i = 0; i < p->n; i++)
        to_store(&p->events[i], &se[i]);
    p->req = req;
    p->conn = evhttp_request_get_connection(req);
    list_init(&p->link);
    if (store_save_events(se, p->n, saved_cb, p) != STORE_QUEUED) {
        D->stats.webhooks_failed++;
        log_warn("webhook event=not_stored events=%d reason=database_unavailable", p->n);
        free(p);
        reply(req, 503, "Service Unavailable", "not stored; deliver again");
        return;
    }
    list_push_tail(&waiting, &p->link);
    if (p->conn)
        evhttp_connection_set_closecb(p->conn, conn_closed, p);
}

/* ---------------------------------------------------------------- loading */

static void load_now(void *arg);

static void loaded_cb(const store_event_list *l, void *arg)
{
    (void)arg;
    if (l->st != ST_OK) {
        if (l->st != ST_SHUTDOWN) {
            log_warn("webhook event=load_failed error=\"%s\" retry_ms=%d", l->errmsg ? l->errmsg : "", LOAD_RETRY_MS);
            loop_timer_start(&load_timer, LOAD_RETRY_MS);
        }
        return;
    }
    for (int i = 0; i < l->n; i++) {
        const store_event *s = &l->events[i];
        proc_event e = { .success = s->success, .cancel = s->is_cancel, .amount = s->amount,
                         .status = proc_status_parse(s->status) };
        snprintf(e.id, sizeof(e.id), "%s", s->event_id);
        snprintf(e.gid, sizeof(e.gid), "%s", s->gid ? s->gid : "");
        snprintf(e.processor_ref, sizeof(e.processor_ref), "%s", s->processor_ref ? s->processor_ref : "");
        snprintf(e.kind, sizeof(e.kind), "%s", s->kind);
        snprintf(e.reason, sizeof(e.reason), "%s", s->reason ? s->reason : "");
        snprintf(e.currency, sizeof(e.currency), "%s", s->currency ? s->currency : "");
        proc_event_record(&e);
    }
    log_notice("webhook event=stored_events_loaded count=%d", l->n);
    proc_events_loaded();
}

static void load_now(void *arg)
{
    (void)arg;
    if (D->shutting_down)
        return;
    if (store_load_events(loaded_cb, NULL) != STORE_QUEUED)
        loop_timer_start(&load_timer, LOAD_RETRY_MS);
}

/* ---------------------------------------------------------------- start / stop */

static bool is_loopback(const char *host)
{
    struct in_addr a;
    struct in6_addr a6;
    if (inet_pton(AF_INET, host, &a) == 1)
        return (ntohl(a.s_addr) >> 24) == 127;
    return inet_pton(AF_INET6, host, &a6) == 1 && IN6_IS_ADDR_LOOPBACK(&a6);
}

int webhook_start(void)
{
    const proc_caps *caps = proc_caps_get();
    const char *spec = D->cfg.webhook_listen;
    api = D->cfg.processor_api;
    if (!caps || !caps->webhooks) {
        proc_events_loaded();                /* nothing to wait for */
        return 0;
    }
    list_init(&waiting);
    if (loop_timer_init(&load_timer, load_now, NULL) != 0)
        return -1;
    load_timer_up = true;
    loop_timer_start(&load_timer, 0);
    if (!spec[0]) {
        log_warn("event=webhooks_off note=\"webhook_listen is empty: processor webhooks are not received\"");
        return 0;
    }
    char host[64];
    const char *colon = strrchr(spec, ':');
    size_t hl = colon ? (size_t)(colon - spec) : 0;
    const char *h = spec;
    if (hl >= 2 && spec[0] == '[' && spec[hl - 1] == ']') {       /* [::1]:8082 */
        h = spec + 1;
        hl -= 2;
    }
    char *end = NULL;
    long port = colon ? strtol(colon + 1, &end, 10) : 0;
    if (!colon || hl == 0 || hl >= sizeof(host) || !end || *end || port < 1 || port > 65535) {
        log_error("event=webhook_failed error=\"webhook_listen must be HOST:PORT with a numeric address\"");
        return -1;
    }
    memcpy(host, h, hl);
    host[hl] = '\0';
    struct in_addr a;
    struct in6_addr a6;
    if (inet_pton(AF_INET, host, &a) != 1 && inet_pton(AF_INET6, host, &a6) != 1) {
        log_error("event=webhook_failed error=\"webhook_listen must be a numeric address (no name lookups)\"");
        return -1;
    }
    http = evhttp_new(loop_base());
    if (!http || evhttp_bind_socket(http, host, (ev_uint16_t)port) != 0) {
        log_error("event=webhook_failed listen=%s error=\"cannot bind\"", spec);
        return -1;
    }
    evhttp_set_allowed_methods(http, EVHTTP_REQ_POST | EVHTTP_REQ_GET);
    evhttp_set_max_body_size(http, (ev_ssize_t)D->cfg.webhook_max_bytes);
    evhttp_set_max_headers_size(http, 16384);
    evhttp_set_timeout(http, 10);
    evhttp_set_gencb(http, handle, NULL);
    if (!is_loopback(host))
        log_warn("event=webhook_listen_not_loopback listen=%s note=\"terminate TLS in front of it\"", spec);
    log_notice("event=webhook_listening listen=%s processor=%s", spec, api);
    return 0;
}

void webhook_stop(void)
{
    /* Deliveries still being stored lose their request here; the store
     * answers them later (with a shutdown) and nobody is told anything: the
     * processor delivers again. */
    if (http) {
        for (pc_list *n = waiting.next; n != &waiting; n = n->next) {
            pending *p = list_entry(n, pending, link);
            if (p->conn)
                evhttp_connection_set_closecb(p->conn, NULL, NULL);
            p->req = NULL;
            p->conn = NULL;
        }
        evhttp_free(http);
    }
    http = NULL;
    if (load_timer_up)
        loop_timer_deinit(&load_timer);
    load_timer_up = false;
}
