/*
 * proc_list.c - the processor's own list of payments, for reconciliation
 * (proc.h, "Listing"): the generic contract's GET /v1/payments and Stripe's
 * GET /v1/payment_intents, each on an HTTP client of its own with a single
 * connection, so a long listing never takes a connection the payment path
 * could use. (Adyen has no listing API: proc_list_adyen.c reads its
 * settlement report.)
 *
 * generic (docs/processor.md): ?created_gte=&created_lt=&limit=&starting_after=,
 *   ordered by (created, id); the cursor is the last id of a page.
 * stripe (https://docs.stripe.com/api/payment_intents/list): ?created[gte]=
 *   &created[lt]=&limit= (1..100)&starting_after=pi_..., newest first, with
 *   expand[]=data.latest_charge so that a refund shows (the charge's
 *   `refunded` / `amount_refunded`); our gid is metadata[gid], the account
 *   metadata[account]. The cursor is the last intent's id of a page.
 */
#include "proc.h"
#include "ctx.h"
#include "http_client.h"
#include "log.h"
#include "loop.h"
#include "proc_stripe.h"
#include "proc_util.h"
#include "sbuf.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static http_client *clients[2];       /* [0] generic, [1] stripe */

typedef struct list_call {
    proc_list_cb cb;
    void *arg;
    bool stripe;
    int limit;
    proc_list_item *items;
} list_call;

static http_client *client_for(bool stripe)
{
    http_client **c = &clients[stripe ? 1 : 0];
    if (*c)
        return *c;
    const pc_config *cfg = &D->cfg;
    sbuf auth;
    sbuf_init(&auth);
    sbuf_printf(&auth, "Authorization: Bearer %s", D->token ? D->token : "");
    http_config hc = { .name = stripe ? "stripe-list" : "psp-list", .base_url = cfg->processor_url,
                       .auth_header = sbuf_str(&auth), .connect_timeout_ms = cfg->processor_connect_timeout_ms,
                       .request_timeout_ms = cfg->recon_request_timeout_ms, .max_connections = 1,
                       .verify_peer = cfg->processor_verify_peer };
    *c = sbuf_ok(&auth) ? http_new(loop_base(), &hc) : NULL;
    sbuf_free(&auth);
    return *c;
}

void proc_list_shutdown(void)
{
    for (size_t i = 0; i < PC_ARRAY_LEN(clients); i++) {
        http_client *c = clients[i];
        clients[i] = NULL;
        http_free(c);            /* fires what is pending with "shutdown" */
    }
    proc_list_adyen_stop();
}

int proc_list(const proc_list_req *req, proc_list_cb cb, void *arg)
{
    const proc_adapter *a = proc_current();
    if (!a || !a->list || req->limit < 1 || req->limit > PROC_LIST_MAX)
        return -1;
    return a->list(req, cb, arg);
}

static void page_fail(proc_list_page *pg, proc_outcome o, const char *fmt, ...) PC_PRINTF(3, 4);

static void page_fail(proc_list_page *pg, proc_outcome o, const char *fmt, ...)
{
    va_list ap;
    pg->outcome = o;
    pg->n = 0;
    pg->more = false;
    va_start(ap, fmt);
    vsnprintf(pg->error, sizeof(pg->error), fmt, ap);
    va_end(ap);
}

static bool copy_str(char *dst, size_t size, const char *src)
{
    return src && proc_copy(dst, size, src);
}

/* One generic payment object -> item; false when it is malformed. */
static bool generic_item(const cJSON *o, proc_list_item *it)
{
    const char *st = proc_json_str(o, "status");
    if (!copy_str(it->id, sizeof(it->id), proc_json_str(o, "id")) || !st)
        return false;
    (void)copy_str(it->gid, sizeof(it->gid), proc_json_str(o, "idempotency_key"));
    it->status = proc_status_parse(st);
    if (it->status == PROC_ST_NONE)
        return false;
    it->refunded = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(o, "refunded"));
    const cJSON *amount = cJSON_GetObjectItemCaseSensitive(o, "amount");
    if (!cJSON_IsNull(amount) && !proc_json_int(amount, &it->amount))
        return false;
    (void)copy_str(it->currency, sizeof(it->currency), proc_json_str(o, "currency"));
    (void)copy_str(it->account, sizeof(it->account), proc_json_str(o, "account"));
    return true;
}

/* One PaymentIntent -> item. */
static bool stripe_item(const cJSON *pi, proc_list_item *it)
{
    const char *st = proc_json_str(pi, "status");
    if (!copy_str(it->id, sizeof(it->id), proc_json_str(pi, "id")) || !st)
        return false;
    const cJSON *meta = cJSON_GetObjectItemCaseSensitive(pi, "metadata");
    (void)copy_str(it->gid, sizeof(it->gid), proc_json_str(meta, "gid"));
    (void)copy_str(it->account, sizeof(it->account), proc_json_str(meta, "account"));
    it->status = stripe_status(st);
    if (it->status == PROC_ST_NONE)
        return false;
    if (!proc_json_int(cJSON_GetObjectItemCaseSensitive(pi, "amount"), &it->amount))
        return false;
    const char *cur = proc_json_str(pi, "currency");
    if (cur && strlen(cur) == 3) {
        for (int i = 0; i < 3; i++)
            it->currency[i] = (char)(cur[i] >= 'a' && cur[i] <= 'z' ? cur[i] - 'a' + 'A' : cur[i]);
        it->currency[3] = '\0';
    }
    /* A refund (or a dispute lost) shows on the charge, when expanded. */
    const cJSON *ch = cJSON_GetObjectItemCaseSensitive(pi, "latest_charge");
    int64_t refunded = 0;
    if (cJSON_IsObject(ch) && (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(ch, "refunded")) ||
                               (proc_json_int(cJSON_GetObjectItemCaseSensitive(ch, "amount_refunded"), &refunded) &&
                                refunded > 0))) {
        it->refunded = true;
        /* A partial refund: what it kept is amount - amount_refunded. */
        if (proc_json_int(cJSON_GetObjectItemCaseSensitive(ch, "amount_refunded"), &refunded) && refunded > 0 &&
            refunded < it->amount)
            it->refunded_amount = refunded;
    }
    return true;
}

static void done_cb(const http_answer *a, void *arg)
{
    list_call *c = arg;
    proc_list_page pg = { .outcome = PROC_PAYMENT };
    cJSON *root = NULL;
    if (a->status == 0) {
        page_fail(&pg, PROC_UNKNOWN, "no answer: %s", a->error);
    } else if (a->status == 429) {
        page_fail(&pg, PROC_RATE_LIMITED, "%s", "rate limited");
        pg.retry_after_ms = a->retry_after_ms;
    } else if (a->status == 401 || a->status == 403) {
        page_fail(&pg, PROC_AUTH, "%s", "credentials refused");
    } else if (a->status != 200) {
        char st[16];
        snprintf(st, sizeof(st), "%ld", a->status);
        page_fail(&pg, a->status >= 400 && a->status < 500 ? PROC_INVALID : PROC_UNKNOWN, "HTTP %s", st);
    } else if (!(root = cJSON_ParseWithLength(a->body, a->len)) ||
               !cJSON_IsArray(cJSON_GetObjectItemCaseSensitive(root, "data"))) {
        page_fail(&pg, PROC_UNKNOWN, "%s", "unparsable list answer");
    } else {
        const cJSON *data = cJSON_GetObjectItemCaseSensitive(root, "data");
        int n = cJSON_GetArraySize(data);
        if (n > c->limit) {
            page_fail(&pg, PROC_UNKNOWN, "%s", "more records than asked for");
        } else {
            const cJSON *o;
            int i = 0;
            cJSON_ArrayForEach(o, data) {
                memset(&c->items[i], 0, sizeof(c->items[i]));
                if (!(c->stripe ? stripe_item(o, &c->items[i]) : generic_item(o, &c->items[i]))) {
                    page_fail(&pg, PROC_UNKNOWN, "%s", "a malformed record in the list");
                    break;
                }
                i++;
            }
            if (pg.outcome == PROC_PAYMENT) {
                pg.n = n;
                pg.items = c->items;
                pg.more = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(root, "has_more")) && n > 0;
                if (n > 0)
                    snprintf(pg.cursor, sizeof(pg.cursor), "%s", c->items[n - 1].id);
            }
        }
    }
    if (pg.outcome != PROC_PAYMENT)
        log_warn("proc event=list_failed processor=%s outcome=%s error=\"%s\"", c->stripe ? "stripe" : "generic",
                 proc_outcome_name(pg.outcome), pg.error);
    c->cb(&pg, c->arg);
    cJSON_Delete(root);
    free(c->items);
    free(c);
}

static int list_http(const proc_list_req *req, proc_list_cb cb, void *arg, bool stripe)
{
    http_client *hc = client_for(stripe);
    if (!hc)
        return -1;
    int limit = stripe && req->limit > 100 ? 100 : req->limit;    /* Stripe's maximum */
    list_call *c = calloc(1, sizeof(*c));
    if (!c)
        return -1;
    c->items = calloc((size_t)limit, sizeof(*c->items));
    if (!c->items) {
        free(c);
        return -1;
    }
    c->cb = cb;
    c->arg = arg;
    c->stripe = stripe;
    c->limit = limit;
    sbuf path;
    sbuf_init(&path);
    if (stripe)
        sbuf_printf(&path, "/v1/payment_intents?created%%5Bgte%%5D=%lld&created%%5Blt%%5D=%lld&limit=%d"
                    "&expand%%5B%%5D=data.latest_charge", (long long)req->from_s, (long long)req->to_s, limit);
    else
        sbuf_printf(&path, "/v1/payments?created_gte=%lld&created_lt=%lld&limit=%d", (long long)req->from_s,
                    (long long)req->to_s, limit);
    if (req->cursor && req->cursor[0]) {
        sbuf_puts(&path, "&starting_after=");
        proc_path_escape(&path, req->cursor);
    }
    http_request rq = { .post = false, .path = sbuf_str(&path) };
    int rc = sbuf_ok(&path) ? http_send(hc, &rq, done_cb, c) : -1;
    sbuf_free(&path);
    if (rc != 0) {
        free(c->items);
        free(c);
        return -1;
    }
    return 0;
}

int proc_list_generic(const proc_list_req *req, proc_list_cb cb, void *arg)
{
    return list_http(req, cb, arg, false);
}

int proc_list_stripe(const proc_list_req *req, proc_list_cb cb, void *arg)
{
    return list_http(req, cb, arg, true);
}
