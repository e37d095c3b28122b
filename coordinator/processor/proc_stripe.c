/*
 * proc_stripe.c - the Stripe adapter (proc.h): PaymentIntents created and
 * confirmed in one call with our gid as Idempotency-Key and in metadata.
 *
 *  create   POST /v1/payment_intents (form body, proc_stripe_api.c).
 *  get      1. by the pi_ id when it is known (an earlier answer, a webhook):
 *              GET /v1/payment_intents/{id}, the current status;
 *           2. else, before the payment's deadline (and so inside the key
 *              window: config requires the deadline to be shorter), and
 *              only while a prepared debit holds the money, replay the
 *              identical create with the same key: Stripe answers the
 *              stored result, or performs it now; either way the answer
 *              decides. A replayed 5xx (stored after execution began) stays
 *              unknown, so:
 *           3. search metadata['gid']; one intent found: retrieve it by id.
 *              None found is conclusive (PROC_NOT_FOUND) only once the
 *              deadline is stripe_search_lag_s + processor_timeout_ms behind
 *              us: no create is sent after the deadline, so by then anything
 *              Stripe made of ours is searchable. Earlier: unknown. Two
 *              intents with one gid: PROC_STUCK (manual review).
 *  cancel   by the pi_ id (known, or found as in 3): POST .../cancel; a
 *           status that cannot be canceled answers what it is (succeeded:
 *           PROC_ALREADY_SUCCEEDED; processing: still pending). No intent
 *           and a conclusive search: nothing was charged and nothing can be
 *           any more: canceled.
 *
 * Webhooks (optional): verified with stripe_webhook_secret_file; a
 * payment_intent.* event tells the intent's id for our gid, which get() and
 * cancel() then use. The status always comes from Stripe's API.
 */
#include "proc_stripe.h"
#include "ctx.h"
#include "http_client.h"
#include "log.h"
#include "loop.h"
#include "proc_known.h"
#include "proc_util.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SECRET_MAX 512

typedef enum { OP_CREATE = 0, OP_GET, OP_CANCEL } op_kind;
typedef enum { STEP_CREATE = 0, STEP_RETRIEVE, STEP_REPLAY, STEP_SEARCH, STEP_CANCEL } step_kind;

static const char *const op_names[] = { "create", "get", "cancel" };
static const char *const step_names[] = { "create", "retrieve", "replay", "search", "cancel" };

typedef struct sop {
    op_kind op;
    step_kind step;
    proc_cb cb;
    void *arg;
    char gid[208];
    int64_t amount;
    int64_t since_deadline_ms;
    char *body;                    /* the create's form (create, replay) */
    char pi[128];                  /* the intent's id, once known */
    double elapsed_ms;
} sop;

static http_client *client;
static char webhook_secret[SECRET_MAX];
static proc_caps caps = { .get = PROC_GET_BY_ID | PROC_GET_BY_REPLAY | PROC_GET_BY_SEARCH,
                          .cancel = PROC_CANCEL_BY_ID, .key_max = 255 };

static void done_cb(const http_answer *a, void *arg);

/* ---------------------------------------------------------------- helpers */

static void sop_free(sop *o)
{
    free(o->body);
    free(o);
}

static void bad_answer(const sop *o, const proc_result *res)
{
    char gv[260], ev[300];
    D->stats.processor_bad_answers++;
    log_warn("stripe call=%s gid=%s event=bad_answer http=%ld error=%s", step_names[o->step],
             proc_log_value(gv, sizeof(gv), o->gid), res->http_status, proc_log_value(ev, sizeof(ev), res->error));
}

static void log_step(const sop *o, const proc_result *res, const http_answer *a)
{
    char gv[260], ev[300], iv[160];
    int level = res->outcome == PROC_PAYMENT || res->outcome == PROC_ALREADY_SUCCEEDED ||
                        res->outcome == PROC_NOT_FOUND
                    ? PCLOG_INFO
                    : PCLOG_WARNING;
    log_msg(level, "stripe call=%s op=%s gid=%s http=%ld outcome=%s status=%s pi=%s%s error=%s new_conn=%d ms=%.1f",
            step_names[o->step], op_names[o->op], proc_log_value(gv, sizeof(gv), o->gid), res->http_status,
            proc_outcome_name(res->outcome), proc_status_name(res->status),
            proc_log_value(iv, sizeof(iv), res->id[0] ? res->id : "-"), a && a->replayed ? " replayed=1" : "",
            proc_log_value(ev, sizeof(ev), res->error[0] ? res->error : "-"), a && a->new_conn ? 1 : 0,
            a ? a->elapsed_ms : 0.0);
}

/* The answer to the caller; o is freed. */
static void finish(sop *o, proc_result *res)
{
    res->elapsed_ms = o->elapsed_ms;
    if (res->id[0]) {
        proc_known *k = proc_known_put(o->gid);
        if (k)
            snprintf(k->ref, sizeof(k->ref), "%s", res->id);
    }
    o->cb(res, o->arg);
    sop_free(o);
}

static void finish_with(sop *o, proc_outcome outcome, proc_status st, const char *error)
{
    proc_result r = { .outcome = outcome, .status = st };
    snprintf(r.error, sizeof(r.error), "%s", error);
    if (st == PROC_ST_CANCELED)
        snprintf(r.decline_code, sizeof(r.decline_code), "canceled");
    finish(o, &r);
}

/* A search that finds nothing proves nothing was made of our create once
 * the lag has passed since the last moment a create could have been sent. */
static bool search_conclusive(const sop *o)
{
    int64_t need = (int64_t)D->cfg.stripe_search_lag_s * 1000 + D->cfg.processor_timeout_ms;
    return o->since_deadline_ms >= need;
}

/* Start step s. -1 when nothing was sent (then the callback will not fire). */
static int send_step(sop *o, step_kind s)
{
    sbuf path, form;
    sbuf_init(&path);
    sbuf_init(&form);
    http_request rq = { .content_type = "application/x-www-form-urlencoded" };
    o->step = s;
    switch (s) {
    case STEP_CREATE:
    case STEP_REPLAY:
        sbuf_puts(&path, "/v1/payment_intents");
        rq.post = true;
        rq.body = o->body;
        rq.idempotency_key = o->gid;
        break;
    case STEP_RETRIEVE:
        sbuf_puts(&path, "/v1/payment_intents/");
        proc_path_escape(&path, o->pi);
        break;
    case STEP_CANCEL:
        /* No Idempotency-Key: a stored answer would hide a later status
         * (a processing intent may become cancelable or settle). Canceling
         * twice is harmless: the second answer says canceled. */
        sbuf_puts(&path, "/v1/payment_intents/");
        proc_path_escape(&path, o->pi);
        sbuf_puts(&path, "/cancel");
        rq.post = true;
        rq.body = "";
        break;
    case STEP_SEARCH: {
        if (strpbrk(o->gid, "'\\")) {
            sbuf_free(&path);
            return -1;                    /* not one of ours: cannot be quoted in a query */
        }
        sbuf q;
        sbuf_init(&q);
        sbuf_printf(&q, "metadata['gid']:'%s'", o->gid);
        proc_form_add(&form, "query", sbuf_str(&q));
        proc_form_add(&form, "limit", "10");
        sbuf_free(&q);
        sbuf_printf(&path, "/v1/payment_intents/search?%s", sbuf_str(&form));
        break;
    }
    }
    rq.path = sbuf_str(&path);
    int rc = sbuf_ok(&path) && sbuf_ok(&form) ? http_send(client, &rq, done_cb, o) : -1;
    sbuf_free(&path);
    sbuf_free(&form);
    return rc;
}

/* Continue with step s from a callback: a refusal ends the op as unknown. */
static void next_step(sop *o, step_kind s)
{
    if (send_step(o, s) != 0)
        finish_with(o, PROC_UNKNOWN, PROC_ST_NONE, "request not sent");
}

/* ---------------------------------------------------------------- answers */

static void after_search(sop *o, const proc_result *res, const stripe_found *found)
{
    if (res->outcome != PROC_PAYMENT) {
        proc_result r = *res;
        if (r.outcome == PROC_INVALID || r.outcome == PROC_NOT_FOUND) {
            /* A search refused as invalid (e.g. search not offered to this
             * account) proves nothing about the payment. */
            r.outcome = PROC_UNKNOWN;
            snprintf(r.error, sizeof(r.error), "search refused: %.200s", res->error);
        }
        finish(o, &r);
        return;
    }
    if (found->n > 1) {
        finish_with(o, PROC_STUCK, PROC_ST_NONE,
                    "more than one PaymentIntent carries this gid: reconcile them at Stripe by hand");
        return;
    }
    if (found->n == 1) {
        snprintf(o->pi, sizeof(o->pi), "%s", found->id);
        next_step(o, o->op == OP_CANCEL ? STEP_CANCEL : STEP_RETRIEVE);
        return;
    }
    char gv[260];
    if (!search_conclusive(o)) {
        char why[200];
        snprintf(why, sizeof(why), "no PaymentIntent found yet; a search is conclusive %d s after the deadline",
                 D->cfg.stripe_search_lag_s + D->cfg.processor_timeout_ms / 1000);
        log_info("stripe op=%s gid=%s event=search_inconclusive since_deadline_ms=%lld note=\"%s\"", op_names[o->op],
                 proc_log_value(gv, sizeof(gv), o->gid), (long long)o->since_deadline_ms, why);
        finish_with(o, PROC_UNKNOWN, PROC_ST_NONE, why);
        return;
    }
    log_notice("stripe op=%s gid=%s event=search_conclusive since_deadline_ms=%lld note=\"no PaymentIntent carries "
               "this gid, and no create is sent after the deadline\"", op_names[o->op],
               proc_log_value(gv, sizeof(gv), o->gid), (long long)o->since_deadline_ms);
    if (o->op == OP_CANCEL)
        /* Nothing was made of our create, and no create is sent any more:
         * the payment is over, nothing charged. */
        finish_with(o, PROC_PAYMENT, PROC_ST_CANCELED, "no PaymentIntent carries this gid, long after the deadline");
    else
        finish_with(o, PROC_NOT_FOUND, PROC_ST_NONE, "no PaymentIntent carries this gid, long after the deadline");
}

static void done_cb(const http_answer *a, void *arg)
{
    sop *o = arg;
    proc_result res;
    stripe_found found = { 0 };
    bool r5 = false, ok = true;

    o->elapsed_ms += a->elapsed_ms;
    if (a->status == 0) {
        memset(&res, 0, sizeof(res));
        res.outcome = PROC_UNKNOWN;
        snprintf(res.error, sizeof(res.error), "%s", a->error);
        ok = !a->too_big;
    } else if (o->step == STEP_SEARCH) {
        ok = stripe_classify_search(o->gid, a->status, a->body, a->len, &found, &res);
    } else {
        stripe_call call = o->step == STEP_RETRIEVE ? STRIPE_RETRIEVE
                           : o->step == STEP_CANCEL ? STRIPE_CANCEL : STRIPE_CREATE;
        ok = stripe_classify(call, o->gid, o->amount, a->status, a->body, a->len, a->replayed, &res, &r5);
        if (ok && a->idempotency_key && (o->step == STEP_CREATE || o->step == STEP_REPLAY) &&
            strcmp(a->idempotency_key, o->gid) != 0) {
            memset(&res, 0, sizeof(res));
            res.outcome = PROC_UNKNOWN;
            res.http_status = a->status;
            snprintf(res.error, sizeof(res.error), "bad_answer: the answer is for another Idempotency-Key");
            ok = false;
        }
    }
    if (res.outcome == PROC_RATE_LIMITED)
        res.retry_after_ms = a->retry_after_ms;
    log_step(o, &res, a);
    if (!ok)
        bad_answer(o, &res);

    switch (o->step) {
    case STEP_CREATE:
    case STEP_RETRIEVE:
    case STEP_CANCEL:
        finish(o, &res);
        return;
    case STEP_REPLAY:
        if (res.outcome == PROC_UNKNOWN && res.http_status >= 500) {
            /* Stored after execution began (or failing now): only the
             * search can tell what it made. */
            (void)r5;
            next_step(o, STEP_SEARCH);
            return;
        }
        if (res.outcome == PROC_INVALID) {
            res.outcome = PROC_UNKNOWN;
            snprintf(res.error, sizeof(res.error), "a replayed create was refused as invalid: proves nothing");
        }
        finish(o, &res);
        return;
    case STEP_SEARCH:
        after_search(o, &res, &found);
        return;
    }
}

/* ---------------------------------------------------------------- adapter */

static sop *sop_new(op_kind op, const proc_req *req, proc_cb cb, void *arg)
{
    if (!client || !req || !req->gid || strlen(req->gid) >= sizeof(((sop *)0)->gid) || !cb)
        return NULL;
    sop *o = calloc(1, sizeof(*o));
    if (!o)
        return NULL;
    o->op = op;
    o->cb = cb;
    o->arg = arg;
    snprintf(o->gid, sizeof(o->gid), "%s", req->gid);
    o->amount = req->amount;
    o->since_deadline_ms = req->since_deadline_ms;
    const char *ref = req->processor_ref;
    if (!ref || strncmp(ref, "pi_", 3)) {
        const proc_known *k = proc_known_get(req->gid);
        ref = k && !strncmp(k->ref, "pi_", 3) ? k->ref : NULL;
    }
    if (ref)
        snprintf(o->pi, sizeof(o->pi), "%s", ref);
    return o;
}

static bool make_body(sop *o, const proc_req *req)
{
    sbuf b;
    sbuf_init(&b);
    if (!stripe_create_body(req, D->cfg.stripe_payment_method, &b)) {
        sbuf_free(&b);
        return false;
    }
    o->body = strdup(sbuf_str(&b));
    sbuf_free(&b);
    return o->body != NULL;
}

static int start(sop *o, step_kind s)
{
    if (send_step(o, s) != 0) {
        sop_free(o);
        return -1;
    }
    return 0;
}

static int st_create(const proc_req *req, proc_cb cb, void *arg)
{
    sop *o = sop_new(OP_CREATE, req, cb, arg);
    if (!o)
        return -1;
    if (!make_body(o, req)) {
        char gv[260];
        log_error("stripe call=create gid=%s rejected: the payment lacks a field the create needs",
                  proc_log_value(gv, sizeof(gv), req->gid));
        sop_free(o);
        return -1;
    }
    return start(o, STEP_CREATE);
}

static int st_get(const proc_req *req, proc_cb cb, void *arg)
{
    sop *o = sop_new(OP_GET, req, cb, arg);
    if (!o)
        return -1;
    if (o->pi[0])
        return start(o, STEP_RETRIEVE);
    if (req->debit_held && o->since_deadline_ms < 0 && make_body(o, req))
        return start(o, STEP_REPLAY);
    return start(o, STEP_SEARCH);
}

static int st_cancel(const proc_req *req, proc_cb cb, void *arg)
{
    sop *o = sop_new(OP_CANCEL, req, cb, arg);
    if (!o)
        return -1;
    return start(o, o->pi[0] ? STEP_CANCEL : STEP_SEARCH);
}

static int st_in_flight(void) { return http_in_flight(client); }

static void st_shutdown(void)
{
    http_free(client);              /* fires pending callbacks with "shutdown" */
    client = NULL;
    proc_known_shutdown();
    memset(webhook_secret, 0, sizeof(webhook_secret));
}

static proc_wh_status st_webhook(const proc_webhook_in *in, proc_event *events, int max, int *n, char *err,
                                 size_t errlen)
{
    *n = 0;
    proc_wh_status st = stripe_verify_signature(webhook_secret, in->signature, in->body, in->len, in->now_s,
                                                D->cfg.stripe_webhook_tolerance_s, err, errlen);
    if (st != PROC_WH_OK)
        return st;
    if (max < 1)
        return PROC_WH_MALFORMED;
    return stripe_parse_event(in->body, in->len, &events[0], n, err, errlen);
}

static void st_event(const proc_event *ev)
{
    if (!ev->gid[0] || strncmp(ev->processor_ref, "pi_", 3))
        return;
    proc_known *k = proc_known_put(ev->gid);
    if (k)
        snprintf(k->ref, sizeof(k->ref), "%s", ev->processor_ref);
}

static const proc_adapter stripe = {
    .name = "stripe", .create = st_create, .get = st_get, .cancel = st_cancel, .in_flight = st_in_flight,
    .shutdown = st_shutdown, .caps = &caps, .webhook = st_webhook, .event = st_event,
    .webhook_header = "Stripe-Signature", .list = proc_list_stripe,
};

int proc_stripe_start(void)
{
    const pc_config *cfg = &D->cfg;
    char err[300];
    if (cfg->stripe_webhook_secret_file[0]) {
        if (proc_read_secret("stripe_webhook_secret_file", cfg->stripe_webhook_secret_file, webhook_secret,
                             sizeof(webhook_secret), err, sizeof(err)) != 0) {
            log_error("stripe event=start_failed error=\"%s\"", err);
            return -1;
        }
        caps.webhooks = true;
    }
    caps.key_window_ms = (int64_t)cfg->stripe_key_window_s * 1000;
    uint64_t keep = 2 * (uint64_t)cfg->payment_deadline_ms + 3600000;
    return proc_adapter_start(&stripe, &client, "Authorization: Bearer ", keep);
}
