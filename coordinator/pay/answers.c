/*
 * answers.c - what the clients waiting on a payment are told, and when:
 * 'pending' only once the payment is durable (its wait_ms timers start then),
 * the final status once it is durable, each client judged by its own
 * parameters (idempotency_conflict when they are not the stored payment's),
 * and the payment object rendered one way for memory and for stored rows.
 */
#include "payment_int.h"
#include "payment.h"
#include "ctx.h"
#include "log.h"

#include <stdlib.h>
#include <string.h>


/* The payment object of a payment in memory: the same renderer as a stored
 * row's, so an answer from memory and one from the row are alike. */
cJSON *pm_json(const payment *p, bool replayed)
{
    char t1[32], t2[32];
    loop_format_time(p->created_wall_ms, t1);
    loop_format_time(p->updated_wall_ms, t2);
    store_payment_row row = {
        .payment_id = p->payment_id, .key = p->key, .gid = p->gid, .account = p->account,
        .currency = p->currency, .reference = p->reference, .status = p->status,
        .processor_ref = p->processor_ref[0] ? p->processor_ref : NULL,
        .decline_code = p->decline_code[0] ? p->decline_code : NULL,
        .created_at = t1, .updated_at = t2, .amount = p->amount,
    };
    return pay_row_json(&row, replayed);
}

cJSON *pay_row_json(const store_payment_row *row, bool replayed)
{
    cJSON *o = cJSON_CreateObject();
    if (!o)
        return NULL;
    cJSON_AddStringToObject(o, "payment_id", row->payment_id);
    cJSON_AddStringToObject(o, "idempotency_key", row->key);
    cJSON_AddStringToObject(o, "gid", row->gid);
    cJSON_AddStringToObject(o, "account", row->account);
    cJSON_AddItemToObject(o, "amount", proto_json_int(row->amount));
    cJSON_AddStringToObject(o, "currency", row->currency);
    if (row->reference)
        cJSON_AddStringToObject(o, "reference", row->reference);
    else
        cJSON_AddNullToObject(o, "reference");
    cJSON_AddStringToObject(o, "status", row->status);
    if (row->processor_ref)
        cJSON_AddStringToObject(o, "processor_ref", row->processor_ref);
    else
        cJSON_AddNullToObject(o, "processor_ref");
    if (row->decline_code && !strcmp(row->status, "declined"))
        cJSON_AddStringToObject(o, "decline_code", row->decline_code);
    else
        cJSON_AddNullToObject(o, "decline_code");
    cJSON_AddStringToObject(o, "created_at", row->created_at);
    cJSON_AddStringToObject(o, "updated_at", row->updated_at);
    if (replayed)
        cJSON_AddBoolToObject(o, "replayed", true);
    return o;
}

bool pm_same_request(const payment *p, const proto_request *q)
{
    return !strcmp(p->account, q->account) && p->amount == q->amount && !strcmp(p->currency, q->currency);
}

static void waiter_free(waiter *w)
{
    list_unlink(&w->link);
    loop_timer_deinit(&w->timer);
    free(w);
}

/* wait_ms ran out: tell this client 'pending'; the payment goes on. */
static void waiter_timeout_cb(void *arg)
{
    waiter *w = arg;
    payment *p = w->p;
    D->stats.payments_left_pending++;
    log_info("payment gid=%s key=%s event=answered_pending state=%s", p->gid, p->key, pm_states[p->state].name);
    pc_request *r = w->r;
    bool replayed = w->replayed;
    waiter_free(w);
    req_reply_ok(r, pm_json(p, replayed));
}

static void waiter_arm(waiter *w)
{
    int64_t ms = w->r->req.has_wait_ms ? w->r->req.wait_ms : D->cfg.pay_wait_ms;
    if (!loop_timer_pending(&w->timer))
        loop_timer_start(&w->timer, ms);
}

int pm_waiter_add(payment *p, pc_request *r, bool replayed)
{
    waiter *w = calloc(1, sizeof(*w));
    if (!w || loop_timer_init(&w->timer, waiter_timeout_cb, w) != 0) {
        free(w);
        return -1;
    }
    w->p = p;
    w->r = r;
    w->replayed = replayed;
    list_push_tail(&p->waiters, &w->link);
    if (p->durable)
        waiter_arm(w);
    return 0;
}

/* The payment is durable: its clients may be told 'pending' from now on, and
 * requests that reused its key with other parameters are refused (each is
 * judged by its own parameters against this, the stored payment). */
void pm_became_durable(payment *p)
{
    p->durable = true;
    pc_list *it, *tmp;
    list_each_safe(&p->waiters, it, tmp) {
        waiter *w = list_entry(it, waiter, link);
        if (!pm_same_request(p, &w->r->req)) {
            pc_request *r = w->r;
            waiter_free(w);
            req_reply_err(r, PROTO_ERR_IDEMPOTENCY_CONFLICT,
                          "idempotency key %s is in use with another account, amount or currency", p->key);
            continue;
        }
        waiter_arm(w);
    }
}

/* Tell every waiting client the payment as it stands (its row is this
 * payment's, and durable): each judged by its own parameters. */
void pm_answer_all(payment *p)
{
    pc_list *n;
    while ((n = list_pop_head(&p->waiters))) {
        waiter *w = list_entry(n, waiter, link);
        pc_request *r = w->r;
        bool replayed = w->replayed;
        list_init(&w->link);
        waiter_free(w);
        if (pm_same_request(p, &r->req))
            req_reply_ok(r, pm_json(p, replayed));
        else
            req_reply_err(r, PROTO_ERR_IDEMPOTENCY_CONFLICT,
                          "idempotency key %s is in use with another account, amount or currency", p->key);
    }
}

/* The final status is durable: tell every client. */
void pm_final(payment *p, const char *status)
{
    p->status = status;
    p->final = true;
    if (!strcmp(status, "succeeded"))
        D->stats.payments_succeeded++;
    else if (!strcmp(status, "declined"))
        D->stats.payments_declined++;
    else if (!strcmp(status, "insufficient_funds"))
        D->stats.payments_insufficient++;
    log_info("payment gid=%s key=%s account=%s amount=%lld currency=%s event=final status=%s processor_ref=%s "
             "decline_code=%s ms=%llu", p->gid, p->key, p->account, (long long)p->amount, p->currency, status,
             p->processor_ref[0] ? p->processor_ref : "-", p->decline_code[0] ? p->decline_code : "-",
             (unsigned long long)(loop_now_ms() - p->started_ms));
    pm_answer_all(p);
}

/* A request to dispatch again from the loop (see end_refused). */
typedef struct redispatch {
    pc_list link;                    /* redispatches */
    loop_timer t;
    pc_request *r;
} redispatch;

static pc_list redispatches;

static void redispatch_cb(void *arg);

/* The payment ends without its row being the key's stored payment (nothing
 * was written, or the key belongs to an earlier payment): clients that asked
 * with this payment's parameters get code/msg; clients that reused the key
 * with other parameters were never judged, and are dispatched again as new
 * requests, from the loop, once this payment has left memory. */
void pm_refuse_waiters(payment *p, proto_err code, const char *msg)
{
    pc_list *it, *tmp;
    list_each_safe(&p->waiters, it, tmp) {
        waiter *w = list_entry(it, waiter, link);
        pc_request *r = w->r;
        bool same = pm_same_request(p, &r->req);
        waiter_free(w);
        if (same) {
            req_reply_err(r, code, "%s", msg);
        } else {
            /* Dispatch from the loop, after this payment has left the maps. */
            redispatch *rd = calloc(1, sizeof(*rd));
            if (!rd || loop_timer_init(&rd->t, redispatch_cb, rd) != 0) {
                free(rd);
                req_reply_err(r, PROTO_ERR_INTERNAL, "out of memory; nothing was charged");
                continue;
            }
            rd->r = r;
            list_push_tail(&redispatches, &rd->link);
            loop_timer_start(&rd->t, 0);
        }
    }
}

static void redispatch_cb(void *arg)
{
    redispatch *rd = arg;
    pc_request *r = rd->r;
    list_unlink(&rd->link);
    loop_timer_deinit(&rd->t);
    free(rd);
    pay_handle_pay(r);
}


/* Free the waiters of a payment leaving memory without an answer to give
 * (shutdown: they are told shutting_down; a simulated crash: dropped). */
void pm_waiter_drop_all(payment *p, bool answer)
{
    pc_list *n;
    while ((n = list_pop_head(&p->waiters))) {
        waiter *w = list_entry(n, waiter, link);
        pc_request *r = w->r;
        list_init(&w->link);
        waiter_free(w);
        if (answer)
            req_reply_err(r, PROTO_ERR_SHUTTING_DOWN, "the daemon stopped; the payment is left for recovery");
        else
            req_free(r);
    }
}

void pm_answers_init(void) { list_init(&redispatches); }

void pm_answers_shutdown(bool answer)
{
    pc_list *n;
    while ((n = list_pop_head(&redispatches))) {
        redispatch *rd = list_entry(n, redispatch, link);
        loop_timer_deinit(&rd->t);
        if (answer)
            req_reply_err(rd->r, PROTO_ERR_SHUTTING_DOWN, "the daemon is shutting down; nothing was charged");
        else
            req_free(rd->r);
        free(rd);
    }
}

/* The key belongs to a stored payment: every client is answered from that
 * row, each judged by its own parameters (this payment was never stored). */
void pm_answer_from_row(payment *p, const store_payment_row *row)
{
    pc_list *n;
    while ((n = list_pop_head(&p->waiters))) {
        waiter *w = list_entry(n, waiter, link);
        pc_request *r = w->r;
        list_init(&w->link);
        waiter_free(w);
        const proto_request *q = &r->req;
        if (!strcmp(row->account, q->account) && row->amount == q->amount && !strcmp(row->currency, q->currency)) {
            D->stats.replays++;
            req_reply_ok(r, pay_row_json(row, true));
        } else {
            req_reply_err(r, PROTO_ERR_IDEMPOTENCY_CONFLICT,
                          "idempotency key %s was used with another account, amount or currency", p->key);
        }
    }
}

/* Every waiting client gets the same error (only where nothing was charged). */
void pm_answer_error(payment *p, proto_err code, const char *msg)
{
    pc_list *n;
    while ((n = list_pop_head(&p->waiters))) {
        waiter *w = list_entry(n, waiter, link);
        pc_request *r = w->r;
        list_init(&w->link);
        waiter_free(w);
        req_reply_err(r, code, "%s", msg);
    }
}
