/* account.c - per-account queueing and credits (account.h). */
#include "account.h"
#include "ctx.h"
#include "gid.h"
#include "log.h"
#include "loop.h"
#include "store.h"
#include "strmap.h"

#include <stdlib.h>
#include <string.h>

struct account {
    char id[PROTO_ACCOUNT_MAX + 1];
    acct_slot *active;                 /* holds the row (or is about to) */
    pc_list queue;                     /* acct_slot.link, in arrival order */
    int nqueued;
    bool credits_pending;              /* accepted credits to apply when free */
    bool applying;                     /* store_apply_credits in progress */
    loop_timer kick;                   /* starts the next piece of work from the loop */
};

static strmap *accounts;               /* id -> account with work */

int account_init(void)
{
    accounts = strmap_new();
    return accounts ? 0 : -1;
}

static void account_free(account *a)
{
    loop_timer_deinit(&a->kick);
    free(a);
}

static void free_entry(const char *key, void *value, void *arg)
{
    (void)key;
    (void)arg;
    account_free(value);
}

void account_shutdown(void)
{
    if (accounts)
        strmap_each(accounts, free_entry, NULL);
    strmap_free(accounts);
    accounts = NULL;
}

static void kick_cb(void *arg);

account *account_get(const char *id)
{
    account *a = strmap_get(accounts, id);
    if (a)
        return a;
    a = calloc(1, sizeof(*a));
    if (!a)
        return NULL;
    memcpy(a->id, id, strlen(id) + 1);
    list_init(&a->queue);
    if (loop_timer_init(&a->kick, kick_cb, a) != 0 || strmap_put(accounts, a->id, a) != 0) {
        loop_timer_deinit(&a->kick);
        free(a);
        return NULL;
    }
    return a;
}

static bool account_idle(const account *a)
{
    return !a->active && list_empty(&a->queue) && !a->credits_pending && !a->applying && !loop_timer_pending(&a->kick);
}

static void account_maybe_free(account *a)
{
    if (account_idle(a)) {
        strmap_del(accounts, a->id);
        account_free(a);
    }
}

int account_nqueued(const account *a) { return a->nqueued; }

void account_put(account *a) { account_maybe_free(a); }

int account_enter(account *a, acct_slot *s)
{
    if (!a->active && !a->applying && list_empty(&a->queue) && !a->credits_pending) {
        a->active = s;
        return 1;
    }
    if (a->nqueued >= D->cfg.max_account_queue)
        return -1;
    list_push_tail(&a->queue, &s->link);
    a->nqueued++;
    if (!a->active && !a->applying)
        loop_timer_start(&a->kick, 0);
    return 0;
}

void account_leave(account *a, acct_slot *s)
{
    if (a->active == s) {
        a->active = NULL;
        loop_timer_start(&a->kick, 0);
    } else if (list_linked(&s->link)) {
        list_unlink(&s->link);
        a->nqueued--;
    }
    account_maybe_free(a);
}

static void applied_cb(st_status st, int applied, void *arg)
{
    account *a = arg;
    a->applying = false;
    if (st == ST_SHUTDOWN)
        return;
    a->credits_pending = false;         /* on failure or a locked row, recovery's sweep applies them */
    if (st != ST_OK)
        log_warn("event=credits_apply_failed account=%s", a->id);
    else if (applied < 0)
        log_info("event=credits_deferred account=%s reason=row_locked", a->id);
    else if (applied > 0) {
        D->stats.credits_applied += (uint64_t)applied;
        log_info("event=credits_applied account=%s count=%d", a->id, applied);
    }
    loop_timer_start(&a->kick, 0);
}

/* The account's row is free: apply credits, else start the next payment. */
static void kick_cb(void *arg)
{
    account *a = arg;
    if (a->active || a->applying)
        return;
    if (a->credits_pending && !D->shutting_down) {
        if (store_apply_credits(CH_PAY, a->id, applied_cb, a) == STORE_QUEUED) {
            a->applying = true;
            return;
        }
        a->credits_pending = false;     /* recovery's sweep applies them */
    }
    pc_list *n = list_pop_head(&a->queue);
    if (!n) {
        account_maybe_free(a);
        return;
    }
    a->nqueued--;
    acct_slot *s = list_entry(n, acct_slot, link);
    a->active = s;
    s->start(s);
}

/* ---------------------------------------------------------------- credit op */

typedef struct credit_ctx {
    pc_request *r;
    char credit_id[UUID_TEXT_LEN + 1];
} credit_ctx;

static cJSON *credit_json(const char *id, const proto_request *q, const char *status, const char *created,
                          bool replayed)
{
    cJSON *o = cJSON_CreateObject();
    if (!o)
        return NULL;
    cJSON_AddStringToObject(o, "credit_id", id);
    cJSON_AddStringToObject(o, "idempotency_key", q->idempotency_key);
    cJSON_AddStringToObject(o, "account", q->account);
    cJSON_AddItemToObject(o, "amount", proto_json_int(q->amount));
    cJSON_AddStringToObject(o, "currency", q->currency);
    cJSON_AddStringToObject(o, "status", status);
    cJSON_AddStringToObject(o, "created_at", created);
    if (replayed)
        cJSON_AddBoolToObject(o, "replayed", true);
    return o;
}

static void credit_row_cb(const store_credit_row *row, void *arg)
{
    credit_ctx *c = arg;
    pc_request *r = c->r;
    const proto_request *q = &r->req;
    if (row->st != ST_OK || !row->found) {
        req_reply_err(r, PROTO_ERR_UNAVAILABLE, "could not read the stored credit; retry with the same key");
    } else if (strcmp(row->account, q->account) || row->amount != q->amount || strcmp(row->currency, q->currency)) {
        req_reply_err(r, PROTO_ERR_IDEMPOTENCY_CONFLICT,
                      "idempotency key %s was used with another account, amount or currency", q->idempotency_key);
    } else {
        D->stats.replays++;
        req_reply_ok(r, credit_json(row->credit_id, q, row->status, row->created_at, true));
    }
    free(c);
}

static void credit_cb(const store_credit_res *res, void *arg)
{
    credit_ctx *c = arg;
    pc_request *r = c->r;
    const proto_request *q = &r->req;
    switch (res->outcome) {
    case CR_APPLIED:
    case CR_ACCEPTED: {
        bool applied = res->outcome == CR_APPLIED;
        if (applied) {
            D->stats.credits_applied++;
        } else {
            D->stats.credits_accepted++;
            account *a = account_get(q->account);
            if (a) {
                a->credits_pending = true;
                if (!a->active && !a->applying)
                    loop_timer_start(&a->kick, 0);
            }
        }
        log_info("event=credit credit_id=%s key=%s account=%s amount=%lld currency=%s status=%s", c->credit_id,
                 q->idempotency_key, q->account, (long long)q->amount, q->currency, applied ? "applied" : "accepted");
        req_reply_ok(r, credit_json(c->credit_id, q, applied ? "applied" : "accepted", res->created_at, false));
        break;
    }
    case CR_DUPLICATE_KEY:
        if (store_credit_by_key(q->idempotency_key, credit_row_cb, c) == STORE_QUEUED)
            return;
        req_reply_err(r, PROTO_ERR_UNAVAILABLE, "database unavailable; retry with the same key");
        break;
    case CR_UNKNOWN_ACCOUNT:
        req_reply_err(r, PROTO_ERR_UNKNOWN_ACCOUNT, "unknown account %s", q->account);
        break;
    case CR_CURRENCY_MISMATCH:
        req_reply_err(r, PROTO_ERR_CURRENCY_MISMATCH, "%s", res->errmsg);
        break;
    case CR_ERROR:
        log_error("event=credit_failed key=%s error=\"%s\"", q->idempotency_key, res->errmsg);
        req_reply_err(r, PROTO_ERR_INTERNAL, "the credit could not be recorded; nothing was recorded");
        break;
    case CR_LOST:
    case CR_SHUTDOWN:
        req_reply_err(r, PROTO_ERR_UNAVAILABLE,
                      "database connection lost; the credit may or may not be recorded: retry with the same key");
        break;
    case CR_NOT_SENT:
        req_reply_err(r, PROTO_ERR_UNAVAILABLE, "database unavailable; nothing was recorded");
        break;
    }
    free(c);
}

void account_handle_credit(pc_request *r)
{
    const proto_request *q = &r->req;
    if (D->shutting_down) {
        req_reply_err(r, PROTO_ERR_SHUTTING_DOWN, "the daemon is shutting down; nothing was recorded");
        return;
    }
    credit_ctx *c = calloc(1, sizeof(*c));
    if (!c) {
        req_reply_err(r, PROTO_ERR_INTERNAL, "out of memory; nothing was recorded");
        return;
    }
    c->r = r;
    gid_new_uuid(c->credit_id);
    const account *a = strmap_get(accounts, q->account);
    store_credit_req cr = { .credit_id = c->credit_id, .key = q->idempotency_key, .account = q->account,
                            .currency = q->currency, .reference = q->reference, .amount = q->amount,
                            .apply = !(a && (a->active || a->applying || !list_empty(&a->queue))) };
    int rc = store_credit(&cr, credit_cb, c);
    if (rc != STORE_QUEUED) {
        req_reply_err(r, rc == STORE_UNAVAILABLE ? PROTO_ERR_UNAVAILABLE : PROTO_ERR_OVERLOADED,
                      "database %s; nothing was recorded", rc == STORE_UNAVAILABLE ? "unavailable" : "queue full");
        free(c);
    }
}
