/*
 * reads.c - status, balance and account_open. Reads never wait on a prepared
 * transaction (they read committed rows; the payment status is derived from
 * the committed ledger, store.h), and a payment still in memory is answered
 * from memory once its row is known to be its own.
 */
#include "reads.h"
#include "ctx.h"
#include "log.h"
#include "payment.h"
#include "store.h"

#include <string.h>

static void status_cb(const store_lookup *res, void *arg)
{
    pc_request *r = arg;
    if (res->st != ST_OK) {
        req_reply_err(r, PROTO_ERR_UNAVAILABLE, "database unavailable");
        return;
    }
    if (!res->found) {
        req_reply_err(r, PROTO_ERR_NOT_FOUND, "no payment with that %s",
                      r->req.idempotency_key[0] ? "idempotency_key" : "payment_id");
        return;
    }
    req_reply_ok(r, pay_row_json(&res->row, false));
}

void reads_handle_status(pc_request *r)
{
    const proto_request *q = &r->req;
    bool by_key = q->idempotency_key[0] != '\0';
    cJSON *mem = pay_memory_json(by_key ? q->idempotency_key : NULL, by_key ? NULL : q->payment_id);
    if (mem) {
        req_reply_ok(r, mem);
        return;
    }
    int rc = by_key ? store_payment_by_key(q->idempotency_key, status_cb, r)
                    : store_payment_by_id(q->payment_id, status_cb, r);
    if (rc != STORE_QUEUED)
        req_reply_err(r, PROTO_ERR_UNAVAILABLE, "database unavailable");
}

static void balance_cb(const store_balance_row *b, void *arg)
{
    pc_request *r = arg;
    if (b->st != ST_OK) {
        req_reply_err(r, PROTO_ERR_UNAVAILABLE, "database unavailable");
        return;
    }
    if (!b->found) {
        req_reply_err(r, PROTO_ERR_UNKNOWN_ACCOUNT, "unknown account %s", r->req.account);
        return;
    }
    cJSON *o = cJSON_CreateObject();
    if (!o) {
        req_reply_err(r, PROTO_ERR_INTERNAL, "out of memory");
        return;
    }
    cJSON_AddStringToObject(o, "account", r->req.account);
    cJSON_AddStringToObject(o, "currency", b->currency);
    cJSON_AddItemToObject(o, "balance", proto_json_int(b->balance));
    cJSON_AddItemToObject(o, "held", proto_json_int(b->held));
    cJSON_AddItemToObject(o, "pending_credits", proto_json_int(b->pending_credits));
    req_reply_ok(r, o);
}

void reads_handle_balance(pc_request *r)
{
    if (store_balance(r->req.account, balance_cb, r) != STORE_QUEUED)
        req_reply_err(r, PROTO_ERR_UNAVAILABLE, "database unavailable");
}

static void opened_cb(const store_opened *o, void *arg)
{
    pc_request *r = arg;
    if (o->st != ST_OK) {
        req_reply_err(r, PROTO_ERR_UNAVAILABLE, "database unavailable; nothing was created");
        return;
    }
    if (!o->created) {
        req_reply_err(r, PROTO_ERR_ACCOUNT_EXISTS, "account %s exists", r->req.account);
        return;
    }
    log_notice("event=account_open account=%s currency=%s uid=%u", r->req.account, r->req.currency, (unsigned)r->uid);
    cJSON *j = cJSON_CreateObject();
    if (!j) {
        req_reply_err(r, PROTO_ERR_INTERNAL, "out of memory (the account was created)");
        return;
    }
    cJSON_AddStringToObject(j, "account", r->req.account);
    cJSON_AddStringToObject(j, "currency", r->req.currency);
    cJSON_AddNumberToObject(j, "balance", 0);
    req_reply_ok(r, j);
}

void reads_handle_account_open(pc_request *r)
{
    if (store_account_open(r->req.account, r->req.currency, opened_cb, r) != STORE_QUEUED)
        req_reply_err(r, PROTO_ERR_UNAVAILABLE, "database unavailable; nothing was created");
}
