/*
 * psp.c - the generic processor contract (docs/processor.md) spoken over the
 * adapters' HTTP client (http_client.c): request shapes, the gid rules,
 * logging of every call, and psp_classify.c's mapping of the answers.
 */
#include "psp.h"
#include "gid.h"
#include "http_client.h"
#include "log.h"
#include "proc_util.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef enum { CALL_CREATE, CALL_GET, CALL_CANCEL, CALL_REFUND } psp_call;

static const char *const call_names[] = { "create", "get", "cancel", "refund" };

struct psp_client {
    http_client *http;
    psp_stats stats;
};

/* One call in the air. */
typedef struct psp_req {
    psp_client *c;
    psp_call call;
    char *gid;
    int64_t amount;                    /* create only, for the log line */
    char currency[8];                  /* create only, for the log line */
    psp_cb cb;
    void *arg;
} psp_req;

/* A gid goes into a header, a URL and log lines: the one gid rule (gid.h):
 * printable ASCII, no control characters. */
static bool key_valid(const char *gid)
{
    return gid != NULL && gid_valid(gid, strlen(gid));
}

/* ---- logging ---------------------------------------------------------- */

static void log_result(const psp_req *r, const psp_result *res, bool new_conn)
{
    char gidv[300], what[160] = "", extra[512] = "";
    char curv[32], idv[160], declv[100], errv[300];

    if (r->call == CALL_CREATE)
        snprintf(what, sizeof(what), " amount=%" PRId64 " currency=%s", r->amount,
                 proc_log_value(curv, sizeof(curv), r->currency));
    if (res->outcome == PSP_PAYMENT || res->outcome == PSP_ALREADY_SUCCEEDED) {
        const psp_payment *p = &res->payment;
        snprintf(extra, sizeof(extra), " status=%s psp_id=%s%s%s%s", psp_status_name(p->status),
                 proc_log_value(idv, sizeof(idv), p->id), p->decline_code[0] ? " decline_code=" : "",
                 p->decline_code[0] ? proc_log_value(declv, sizeof(declv), p->decline_code) : "",
                 p->refunded ? " refunded=1" : "");
    }
    if (res->outcome == PSP_PAYMENT || res->outcome == PSP_ALREADY_SUCCEEDED || res->outcome == PSP_NOT_FOUND) {
        log_info("psp call=%s gid=%s%s http=%ld outcome=%s%s new_conn=%d ms=%.1f", call_names[r->call],
                 proc_log_value(gidv, sizeof(gidv), r->gid), what, res->http_status,
                 psp_outcome_name(res->outcome), extra, new_conn ? 1 : 0, res->elapsed_ms);
    } else {
        log_warn("psp call=%s gid=%s%s http=%ld outcome=%s error=%s new_conn=%d ms=%.1f", call_names[r->call],
                 proc_log_value(gidv, sizeof(gidv), r->gid), what, res->http_status,
                 psp_outcome_name(res->outcome), proc_log_value(errv, sizeof(errv), res->error), new_conn ? 1 : 0,
                 res->elapsed_ms);
    }
}

/* ---- calls ------------------------------------------------------------ */

static void done_cb(const http_answer *a, void *arg)
{
    psp_req *r = arg;
    psp_client *c = r->c;
    psp_result res;

    memset(&res, 0, sizeof(res));
    if (a->status == 0) {
        /* Connect error, reset, timeout, empty reply, oversized body,
         * shutdown: the request may or may not have been processed. Never a
         * decline. */
        res.outcome = PSP_UNKNOWN;
        snprintf(res.error, sizeof(res.error), "%s", a->error);
    } else {
        psp_classify(r->gid, a->status, a->body, a->len, &res);
        if (res.outcome == PSP_RATE_LIMITED)
            res.retry_after_ms = a->retry_after_ms;
    }
    res.elapsed_ms = a->elapsed_ms;
    log_result(r, &res, a->new_conn);
    c->stats.completed++;
    if (res.outcome == PSP_UNKNOWN)
        c->stats.unknown++;
    /* c is not touched after the callback: it may free the client. */
    r->cb(&res, r->arg);
    free(r->gid);
    free(r);
}

/*
 * Start one call. Returns 0 when the callback will fire, -1 (logged) when it
 * will not.
 */
static int submit(psp_client *c, psp_call call, const char *gid, const psp_create_req *creq, const char *body,
                  psp_cb cb, void *arg)
{
    psp_req *r = NULL;
    char gidv[300];
    const char *why = "out of memory";
    sbuf path, idem;

    sbuf_init(&path);
    sbuf_init(&idem);
    if (c == NULL || cb == NULL) {
        why = "no client or no callback";
        goto fail;
    }
    if (http_closing(c->http)) {
        why = "client shutting down";
        goto fail;
    }
    if (!key_valid(gid)) {
        why = "gid must be 1..200 printable characters";
        goto fail;
    }
    r = calloc(1, sizeof(*r));
    if (r == NULL || (r->gid = strdup(gid)) == NULL)
        goto fail;
    r->c = c;
    r->call = call;
    r->cb = cb;
    r->arg = arg;
    if (creq != NULL) {
        r->amount = creq->amount;
        snprintf(r->currency, sizeof(r->currency), "%s", creq->currency);
    }

    sbuf_puts(&path, "/v1/payments");
    if (call != CALL_CREATE) {
        sbuf_puts(&path, "/");
        proc_path_escape(&path, gid);
        if (call == CALL_CANCEL)
            sbuf_puts(&path, "/cancel");
        else if (call == CALL_REFUND)
            sbuf_puts(&path, "/refund");
    }
    if (call == CALL_CREATE || call == CALL_REFUND)
        sbuf_printf(&idem, "%s%s", call == CALL_REFUND ? "refund:" : "", gid);
    if (!sbuf_ok(&path) || !sbuf_ok(&idem))
        goto fail;
    http_request rq = { .post = call != CALL_GET, .path = sbuf_str(&path), .content_type = "application/json",
                        .body = body, .idempotency_key = idem.len ? sbuf_str(&idem) : NULL };
    if (http_send(c->http, &rq, done_cb, r) != 0) {
        why = "the HTTP client refused the request";
        goto fail;
    }
    c->stats.started++;
    log_debug("psp call=%s gid=%s start in_flight=%d", call_names[call], proc_log_value(gidv, sizeof(gidv), gid),
              http_in_flight(c->http));
    sbuf_free(&path);
    sbuf_free(&idem);
    return 0;

fail:
    log_msg(c != NULL && http_closing(c->http) ? PCLOG_WARNING : PCLOG_ERR, "psp call=%s gid=%s rejected: %s",
            call_names[call], proc_log_value(gidv, sizeof(gidv), gid ? gid : ""), why);
    if (r != NULL)
        free(r->gid);
    free(r);
    sbuf_free(&path);
    sbuf_free(&idem);
    return -1;
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
    int rc = submit(c, CALL_CREATE, req->gid, req, body, cb, arg);
    free(body);
    return rc;
}

int psp_get(psp_client *c, const char *gid, psp_cb cb, void *arg)
{
    return submit(c, CALL_GET, gid, NULL, "", cb, arg);
}

/* Body-less POSTs still send "{}" so every request is valid JSON. */
int psp_cancel(psp_client *c, const char *gid, psp_cb cb, void *arg)
{
    return submit(c, CALL_CANCEL, gid, NULL, "{}", cb, arg);
}

int psp_refund(psp_client *c, const char *gid, psp_cb cb, void *arg)
{
    return submit(c, CALL_REFUND, gid, NULL, "{}", cb, arg);
}

/* ---- client ----------------------------------------------------------- */

psp_client *psp_new(struct event_base *base, const psp_config *cfg)
{
    const char *why = NULL;
    if (base == NULL || cfg == NULL || cfg->base_url == NULL || cfg->token == NULL)
        why = "missing base, config, base_url or token";
    else if (cfg->token[0] == '\0')
        why = "empty processor token";
    else
        for (const char *p = cfg->token; *p && !why; p++)
            if (*p < ' ' || *p == 0x7f)
                why = "processor token contains control characters";
    if (why) {
        log_error("psp_new failed: %s", why);
        return NULL;
    }
    psp_client *c = calloc(1, sizeof(*c));
    sbuf auth;
    sbuf_init(&auth);
    sbuf_printf(&auth, "Authorization: Bearer %s", cfg->token);
    if (c == NULL || !sbuf_ok(&auth)) {
        log_error("psp_new failed: out of memory");
        free(c);
        sbuf_free(&auth);
        return NULL;
    }
    http_config hc = { .name = "psp", .base_url = cfg->base_url, .auth_header = sbuf_str(&auth),
                       .connect_timeout_ms = cfg->connect_timeout_ms, .request_timeout_ms = cfg->request_timeout_ms,
                       .max_connections = cfg->max_connections, .verify_peer = cfg->verify_peer };
    c->http = http_new(base, &hc);
    sbuf_free(&auth);
    if (c->http == NULL) {
        log_error("psp_new failed: the HTTP client did not start");
        free(c);
        return NULL;
    }
    return c;
}

void psp_free(psp_client *c)
{
    if (c == NULL || http_closing(c->http))
        return;
    /* Fires every pending callback (they still see c), then releases the
     * transport (deferred when called from one of its callbacks). */
    http_free(c->http);
    free(c);
}

int psp_in_flight(const psp_client *c)
{
    return c ? http_in_flight(c->http) : 0;
}

void psp_get_stats(const psp_client *c, psp_stats *out)
{
    http_stats hs;
    http_get_stats(c->http, &hs);
    *out = c->stats;
    out->connects = hs.connects;
}
