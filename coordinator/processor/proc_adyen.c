/*
 * proc_adyen.c - the Adyen adapter (proc.h): Checkout API payments with our
 * gid as Idempotency-Key (at most 64 characters: our gids are at most 62)
 * and as merchant reference.
 *
 *  create   POST {processor_url}/payments. A retry with the same key gets
 *           Adyen's first answer (keys are kept at least 31 days), so the
 *           payment path's retries of an unknown outcome are replays.
 *  get      Adyen has no call to read a payment back: the answer comes from
 *           the webhooks received (adyen_decide): the AUTHORISATION decides
 *           until shortly before the deadline; after it only the outcome of
 *           a technical cancel does, because one may be on its way. Until
 *           Adyen has answered "pending" (then only a webhook can tell more),
 *           before that margin and with a prepared debit, get replays the
 *           create with the same key: Adyen answers the stored result (or
 *           performs it now, if it never reached Adyen), and a stored
 *           Authorised or Refused decides, as the payment path's own retries
 *           do.
 *  cancel   the technical cancel by our reference (POST /cancels), answered
 *           "received"; its outcome is a TECHNICAL_CANCEL webhook. While it
 *           is awaited, cancel() answers pending without sending again; no
 *           deciding webhook within adyen_webhook_timeout_s: PROC_STUCK, and
 *           a person checks the payment at Adyen (manual review).
 *
 * Until the stored webhook events are loaded after a start, get() and
 * cancel() answer unknown: nothing is decided from a partial picture.
 */
#include "proc_adyen.h"
#include "ctx.h"
#include "http_client.h"
#include "list.h"
#include "log.h"
#include "loop.h"
#include "proc_util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SECRET_MAX 300

typedef enum { OP_CREATE = 0, OP_GET, OP_CANCEL } op_kind;
static const char *const op_names[] = { "create", "get", "cancel" };

typedef struct aop {
    pc_list link;                  /* on deferred while its local answer waits for the loop */
    op_kind op;
    bool replay;                   /* a get that replays the create */
    proc_cb cb;
    void *arg;
    char gid[208];
    int64_t amount;
    int64_t since_deadline_ms;
    bool never_debited;
    loop_timer timer;
    bool timer_up;
    proc_result res;               /* a local answer */
} aop;

static http_client *client;
static unsigned char hmac_key[ADYEN_HMAC_KEY_MAX];
static size_t hmac_len;
static bool events_loaded;
static pc_list deferred;
static proc_caps caps = { .get = PROC_GET_BY_WEBHOOK, .cancel = PROC_CANCEL_BY_REFERENCE_ASYNC,
                          .key_window_ms = INT64_C(31) * 86400 * 1000, .key_max = ADYEN_KEY_MAX, .webhooks = true };

static void aop_free(aop *o)
{
    if (o->timer_up)
        loop_timer_deinit(&o->timer);
    free(o);
}

static void log_answer(const aop *o, const char *call, const proc_result *res, const http_answer *a)
{
    char gv[260], ev[300], iv[160];
    int level = res->outcome == PROC_PAYMENT ? PCLOG_INFO : PCLOG_WARNING;
    log_msg(level, "adyen call=%s op=%s gid=%s http=%ld outcome=%s status=%s psp=%s%s error=%s ms=%.1f", call,
            op_names[o->op], proc_log_value(gv, sizeof(gv), o->gid), res->http_status,
            proc_outcome_name(res->outcome), proc_status_name(res->status),
            proc_log_value(iv, sizeof(iv), res->id[0] ? res->id : "-"), res->local ? " local=1" : "",
            proc_log_value(ev, sizeof(ev), res->error[0] ? res->error : "-"), a ? a->elapsed_ms : 0.0);
}

/* ---------------------------------------------------------------- local answers */

static void deferred_cb(void *arg)
{
    aop *o = arg;
    list_unlink(&o->link);
    o->cb(&o->res, o->arg);
    aop_free(o);
}

/* Answer o from the loop (never inside the call that asked). */
static int answer_later(aop *o)
{
    if (loop_timer_init(&o->timer, deferred_cb, o) != 0) {
        free(o);
        return -1;
    }
    o->timer_up = true;
    list_push_tail(&deferred, &o->link);
    loop_timer_start(&o->timer, 0);
    return 0;
}

/* ---------------------------------------------------------------- requests */

static void done_cb(const http_answer *a, void *arg);

static int send_json(aop *o, const char *path, const sbuf *body, bool keyed)
{
    http_request rq = { .post = true, .path = path, .content_type = "application/json", .body = sbuf_str(body),
                        .idempotency_key = keyed ? o->gid : NULL };
    return http_send(client, &rq, done_cb, o);
}

static void done_cb(const http_answer *a, void *arg)
{
    aop *o = arg;
    proc_result res;
    char cancel_psp[64] = "";
    bool ok = true;
    if (a->status == 0) {
        memset(&res, 0, sizeof(res));
        res.outcome = PROC_UNKNOWN;
        snprintf(res.error, sizeof(res.error), "%s", a->error);
        ok = !a->too_big;
    } else if (o->op == OP_CREATE || o->replay) {
        ok = adyen_classify_payment(o->gid, o->amount, a->status, a->body, a->len, a->idempotency_key, &res);
        if (o->replay && res.outcome == PROC_INVALID) {
            /* e.g. the first request with the key still in flight: proves nothing */
            res.outcome = PROC_UNKNOWN;
        }
    } else {
        ok = adyen_classify_cancel(o->gid, a->status, a->body, a->len, &res, cancel_psp);
    }
    res.elapsed_ms = a->elapsed_ms;
    if (res.outcome == PROC_RATE_LIMITED)
        res.retry_after_ms = a->retry_after_ms;
    log_answer(o, o->op == OP_CANCEL ? "cancels" : o->replay ? "payments_replay" : "payments", &res, a);
    if (!ok) {
        char gv[260];
        D->stats.processor_bad_answers++;
        log_warn("adyen op=%s gid=%s event=bad_answer http=%ld", op_names[o->op],
                 proc_log_value(gv, sizeof(gv), o->gid), a->status);
    }
    proc_known *k = NULL;
    if (res.outcome == PROC_PAYMENT && (k = proc_known_put(o->gid)) != NULL) {
        if (o->op != OP_CANCEL && res.id[0])
            snprintf(k->ref, sizeof(k->ref), "%s", res.id);
        if (o->op != OP_CANCEL && res.status == PROC_ST_PENDING)
            k->pending_answer = true;         /* only a webhook can tell more: no more replays */
        if (o->op == OP_CANCEL) {
            /* received: from now on cancel() waits for its webhook */
            snprintf(k->cancel_psp, sizeof(k->cancel_psp), "%s", cancel_psp);
            k->cancel_sent_ms = loop_now_ms();
        }
    }
    if (o->op == OP_CANCEL && res.outcome == PROC_PAYMENT) {
        /* What the webhooks say now (they may have arrived before this answer). */
        proc_result now;
        adyen_decide(proc_known_get(o->gid), o->since_deadline_ms, loop_now_ms(),
                     (int64_t)D->cfg.adyen_webhook_timeout_s * 1000, o->never_debited, &now);
        now.local = false;
        now.http_status = res.http_status;
        now.elapsed_ms = res.elapsed_ms;
        if (now.status == PROC_ST_PENDING && now.outcome == PROC_PAYMENT)
            snprintf(now.error, sizeof(now.error), "%s", res.error);
        res = now;
    }
    o->cb(&res, o->arg);
    aop_free(o);
}

/* ---------------------------------------------------------------- adapter */

static aop *aop_new(op_kind op, const proc_req *req, proc_cb cb, void *arg)
{
    if (!client || !req || !req->gid || strlen(req->gid) > ADYEN_REFERENCE_MAX || !cb)
        return NULL;
    aop *o = calloc(1, sizeof(*o));
    if (!o)
        return NULL;
    list_init(&o->link);
    o->op = op;
    o->cb = cb;
    o->arg = arg;
    snprintf(o->gid, sizeof(o->gid), "%s", req->gid);
    o->amount = req->amount;
    o->since_deadline_ms = req->since_deadline_ms;
    o->never_debited = req->never_debited;
    return o;
}

static int ad_create(const proc_req *req, proc_cb cb, void *arg)
{
    aop *o = aop_new(OP_CREATE, req, cb, arg);
    sbuf body;
    sbuf_init(&body);
    if (!o || !adyen_payment_body(req, D->cfg.adyen_merchant_account, &body) ||
        send_json(o, "/payments", &body, true) != 0) {
        if (o) {
            char gv[260];
            log_error("adyen call=payments gid=%s rejected: the request could not be built or sent",
                      proc_log_value(gv, sizeof(gv), req->gid));
        }
        free(o);
        sbuf_free(&body);
        return -1;
    }
    sbuf_free(&body);
    return 0;
}

/* The answer from what is known, or why there is none yet. */
static void decide_now(aop *o)
{
    if (!events_loaded) {
        memset(&o->res, 0, sizeof(o->res));
        o->res.outcome = PROC_UNKNOWN;
        o->res.local = true;
        snprintf(o->res.error, sizeof(o->res.error), "the stored webhook events are not loaded yet");
        return;
    }
    adyen_decide(proc_known_get(o->gid), o->since_deadline_ms, loop_now_ms(),
                 (int64_t)D->cfg.adyen_webhook_timeout_s * 1000, o->never_debited, &o->res);
}

static int ad_get(const proc_req *req, proc_cb cb, void *arg)
{
    aop *o = aop_new(OP_GET, req, cb, arg);
    if (!o)
        return -1;
    decide_now(o);
    const proc_known *k = proc_known_get(o->gid);
    if (events_loaded && o->res.outcome == PROC_PAYMENT && o->res.status == PROC_ST_PENDING &&
        !(k && k->pending_answer) && req->debit_held && o->since_deadline_ms < -ADYEN_AUTH_MARGIN_MS) {
        /* No answer of Adyen's that says "pending" is known: replay the
         * create (same key); a stored Authorised or Refused decides. */
        sbuf body;
        sbuf_init(&body);
        o->replay = true;
        if (adyen_payment_body(req, D->cfg.adyen_merchant_account, &body) &&
            send_json(o, "/payments", &body, true) == 0) {
            sbuf_free(&body);
            return 0;
        }
        sbuf_free(&body);
        o->replay = false;
    }
    log_answer(o, "webhooks", &o->res, NULL);
    return answer_later(o);
}

static int ad_cancel(const proc_req *req, proc_cb cb, void *arg)
{
    aop *o = aop_new(OP_CANCEL, req, cb, arg);
    if (!o)
        return -1;
    decide_now(o);
    const proc_known *k = proc_known_get(o->gid);
    bool undecided = events_loaded && o->res.outcome == PROC_PAYMENT && o->res.status == PROC_ST_PENDING;
    if (undecided && !(k && k->cancel_sent_ms)) {
        /* Nothing decides it and no cancel of ours is under way: send one. */
        sbuf body;
        sbuf_init(&body);
        int rc = adyen_cancel_body(o->gid, D->cfg.adyen_merchant_account, &body) ? send_json(o, "/cancels", &body,
                                                                                            false)
                                                                                  : -1;
        sbuf_free(&body);
        if (rc != 0)
            free(o);
        return rc;
    }
    if (o->res.outcome == PROC_PAYMENT && o->res.status == PROC_ST_SUCCEEDED) {
        /* cancel refused in effect: the charge stands */
        o->res.outcome = PROC_ALREADY_SUCCEEDED;
    }
    log_answer(o, "webhooks", &o->res, NULL);
    return answer_later(o);
}

static int ad_in_flight(void)
{
    int n = http_in_flight(client);
    for (pc_list *p = deferred.next; p != &deferred; p = p->next)
        n++;
    return n;
}

static void ad_shutdown(void)
{
    http_free(client);                    /* fires pending callbacks with "shutdown" */
    client = NULL;
    pc_list *n;
    while ((n = list_pop_head(&deferred)) != NULL) {
        aop *o = list_entry(n, aop, link);
        proc_result r = { .outcome = PROC_UNKNOWN, .local = true };
        snprintf(r.error, sizeof(r.error), "shutdown");
        o->cb(&r, o->arg);
        aop_free(o);
    }
    proc_known_shutdown();
    memset(hmac_key, 0, sizeof(hmac_key));
    events_loaded = false;
}

static proc_wh_status ad_webhook(const proc_webhook_in *in, proc_event *events, int max, int *n, char *err,
                                 size_t errlen)
{
    return adyen_parse_notification(hmac_key, hmac_len, D->cfg.adyen_merchant_account, in->body, in->len, events,
                                    max, n, err, errlen);
}

static void ad_event(const proc_event *ev)
{
    if (!ev->gid[0])
        return;
    proc_known *k = proc_known_put(ev->gid);
    if (k)
        adyen_note_event(k, ev);
}

static void ad_events_loaded(void)
{
    if (!events_loaded)
        log_notice("adyen event=stored_webhooks_loaded known=%zu", proc_known_count());
    events_loaded = true;
}

static bool ad_ready(void) { return events_loaded; }

static const proc_adapter adyen = {
    .name = "adyen", .create = ad_create, .get = ad_get, .cancel = ad_cancel, .in_flight = ad_in_flight,
    .shutdown = ad_shutdown, .caps = &caps, .webhook = ad_webhook, .event = ad_event,
    .events_loaded = ad_events_loaded, .webhook_header = NULL, .ready = ad_ready, .list = proc_list_adyen_csv,
};

int proc_adyen_start(void)
{
    const pc_config *cfg = &D->cfg;
    char err[400], hex[SECRET_MAX];
    if (proc_read_secret("adyen_hmac_key_file", cfg->adyen_hmac_key_file, hex, sizeof(hex), err, sizeof(err)) != 0) {
        log_error("adyen event=start_failed error=\"%s\"", err);
        return -1;
    }
    bool key_ok = adyen_hmac_key(hex, hmac_key, &hmac_len);
    memset(hex, 0, sizeof(hex));
    if (!key_ok) {
        log_error("adyen event=start_failed error=\"adyen_hmac_key_file: not an HMAC key in hex\"");
        return -1;
    }
    list_init(&deferred);
    events_loaded = false;
    uint64_t keep = 2 * (uint64_t)cfg->payment_deadline_ms + 2 * (uint64_t)cfg->adyen_webhook_timeout_s * 1000 +
                    3600000;
    return proc_adapter_start(&adyen, &client, "X-API-Key: ", keep);
}
