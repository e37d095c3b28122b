/*
 * proc_generic.c - the generic processor adapter: the contract of
 * docs/processor.md (create, get and cancel by our gid), spoken by psp.c.
 */
#include "proc.h"
#include "ctx.h"
#include "log.h"
#include "loop.h"
#include "psp.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static psp_client *client;

typedef struct gen_call {
    proc_cb cb;
    void *arg;
} gen_call;

static proc_outcome outcome_of(psp_outcome o)
{
    switch (o) {
    case PSP_PAYMENT: return PROC_PAYMENT;
    case PSP_NOT_FOUND: return PROC_NOT_FOUND;
    case PSP_ALREADY_SUCCEEDED: return PROC_ALREADY_SUCCEEDED;
    case PSP_CONFLICT: return PROC_CONFLICT;
    case PSP_INVALID: return PROC_INVALID;
    case PSP_AUTH: return PROC_AUTH;
    case PSP_UNSUPPORTED: return PROC_UNSUPPORTED;
    case PSP_RATE_LIMITED: return PROC_RATE_LIMITED;
    case PSP_UNKNOWN: break;
    }
    return PROC_UNKNOWN;
}

static proc_status status_of(psp_status s)
{
    switch (s) {
    case PSP_ST_SUCCEEDED: return PROC_ST_SUCCEEDED;
    case PSP_ST_DECLINED: return PROC_ST_DECLINED;
    case PSP_ST_PENDING: return PROC_ST_PENDING;
    case PSP_ST_CANCELED: return PROC_ST_CANCELED;
    case PSP_ST_NONE: break;
    }
    return PROC_ST_NONE;
}

static void done_cb(const psp_result *res, void *arg)
{
    gen_call *c = arg;
    proc_result r = { .outcome = outcome_of(res->outcome), .http_status = res->http_status,
                      .elapsed_ms = res->elapsed_ms, .retry_after_ms = res->retry_after_ms };
    if (res->outcome == PSP_PAYMENT || res->outcome == PSP_ALREADY_SUCCEEDED) {
        r.status = res->outcome == PSP_ALREADY_SUCCEEDED ? PROC_ST_SUCCEEDED : status_of(res->payment.status);
        snprintf(r.id, sizeof(r.id), "%s", res->payment.id);
        snprintf(r.decline_code, sizeof(r.decline_code), "%s", res->payment.decline_code);
        r.amount = res->payment.amount;
        snprintf(r.currency, sizeof(r.currency), "%s", res->payment.currency);
    }
    snprintf(r.error, sizeof(r.error), "%s", res->error);
    c->cb(&r, c->arg);
    free(c);
}

static gen_call *call_new(proc_cb cb, void *arg)
{
    gen_call *c = malloc(sizeof(*c));
    if (c) {
        c->cb = cb;
        c->arg = arg;
    }
    return c;
}

static int gen_create(const proc_req *req, proc_cb cb, void *arg)
{
    gen_call *c = call_new(cb, arg);
    if (!c)
        return -1;
    psp_create_req pr = { .gid = req->gid, .amount = req->amount, .currency = req->currency, .account = req->account,
                          .reference = req->reference, .metadata = req->metadata };
    if (psp_create(client, &pr, done_cb, c) != 0) {
        free(c);
        return -1;
    }
    return 0;
}

static int gen_get(const proc_req *req, proc_cb cb, void *arg)
{
    gen_call *c = call_new(cb, arg);
    if (!c)
        return -1;
    if (psp_get(client, req->gid, done_cb, c) != 0) {
        free(c);
        return -1;
    }
    return 0;
}

static int gen_cancel(const proc_req *req, proc_cb cb, void *arg)
{
    gen_call *c = call_new(cb, arg);
    if (!c)
        return -1;
    if (psp_cancel(client, req->gid, done_cb, c) != 0) {
        free(c);
        return -1;
    }
    return 0;
}

static int gen_in_flight(void) { return client ? psp_in_flight(client) : 0; }

static void gen_shutdown(void)
{
    psp_free(client);          /* fires pending callbacks with "shutdown" */
    client = NULL;
}

/* Get and cancel by our gid; the key window is the operator's
 * processor_idempotency_window_s (recovery waits it out when cancel by key
 * is unsupported). */
static proc_caps caps = { .get = PROC_GET_BY_KEY, .cancel = PROC_CANCEL_BY_KEY, .key_max = 255 };

static const proc_adapter generic = { .name = "generic", .create = gen_create, .get = gen_get, .cancel = gen_cancel,
                                      .in_flight = gen_in_flight, .shutdown = gen_shutdown, .caps = &caps,
                                      .list = proc_list_generic };

int proc_generic_start(void)
{
    const pc_config *cfg = &D->cfg;
    psp_config sc = { .base_url = cfg->processor_url, .token = D->token,
                      .connect_timeout_ms = cfg->processor_connect_timeout_ms,
                      .request_timeout_ms = cfg->processor_timeout_ms,
                      .max_connections = cfg->processor_max_connections ? cfg->processor_max_connections
                                                                         : cfg->max_in_flight,
                      .verify_peer = cfg->processor_verify_peer };
    caps.key_window_ms = (int64_t)cfg->processor_idempotency_window_s * 1000;
    client = psp_new(loop_base(), &sc);
    if (!client)
        return -1;
    proc_use(&generic);
    return 0;
}
