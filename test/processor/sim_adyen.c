/*
 * sim_adyen.c - --mode adyen: the Checkout API as paycoord uses it
 * (docs/processors.md has the sources): POST /v{N}/payments with JSON
 * bodies, resultCode/refusalReason/pspReference, the Idempotency-Key header
 * (at most 64 characters), Adyen's error object; POST /v{N}/cancels, the
 * technical cancel by merchant reference, answering 201 "received" and
 * reporting the outcome only by a TECHNICAL_CANCEL webhook; pending payments
 * reported only by an AUTHORISATION webhook; webhooks HMAC-signed as Adyen
 * documents. Adyen has no call to read a payment back.
 */
#include "sim_idem.h"
#include "sim_server.h"
#include "sim_webhook.h"

#include <cjson/cJSON.h>
#include <event2/buffer.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define ADYEN_KEY_MAX 64
#define ADYEN_REFERENCE_MAX 80

typedef struct cancel_job {
    struct cancel_job *next;
    sim_server *s;
    struct event *timer;
    uint64_t psp; /* the cancel request's own pspReference number */
    char merchant[SIM_ACCOUNT_MAX + 1];
    char reference[ADYEN_REFERENCE_MAX + 1];
} cancel_job;

typedef struct adyen_state {
    sim_map *keys;
    sim_map *refs; /* merchant reference -> latest payment */
    cancel_job *cancels;
    uint64_t next_mod; /* pspReferences of cancel requests */
} adyen_state;

typedef struct adyen_req {
    uint64_t fp;
    bool has_key;
} adyen_req;

static adyen_state *st_of(sim_server *s)
{
    return s->mstate;
}

static adyen_req *req_of(sim_call *c)
{
    if (c->mdata == NULL) {
        c->mdata = sim_xcalloc(1, sizeof(adyen_req));
        c->mfree = free;
    }
    return c->mdata;
}

static void error_json(sim_buf *b, int status, const char *code, const char *msg, const char *type)
{
    sim_buf_reset(b);
    sim_buf_addf(b, "{\"status\":%d,\"errorCode\":", status);
    sim_buf_add_jstr(b, code, strlen(code));
    sim_buf_adds(b, ",\"message\":");
    sim_buf_add_jstr(b, msg, strlen(msg));
    sim_buf_adds(b, ",\"errorType\":");
    sim_buf_add_jstr(b, type, strlen(type));
    sim_buf_addc(b, '}');
}

/* refusalReason and refusalReasonCode for a decline code. */
static void refusal(const sim_payment *p, const char **reason, const char **code)
{
    if (p->flags & SIM_PF_ERROR) {
        *reason = "Acquirer Error";
        *code = "4";
    } else if (strcmp(p->decline_code, "insufficient_funds") == 0) {
        *reason = "Not enough balance";
        *code = "12";
    } else if (strcmp(p->decline_code, "card_declined") == 0 || strcmp(p->decline_code, "Refused") == 0) {
        *reason = "Refused";
        *code = "2";
    } else {
        *reason = p->decline_code;
        *code = "2";
    }
}

static const char *result_code(const sim_payment *p)
{
    switch (p->status) {
    case SIM_ST_SUCCEEDED: return "Authorised";
    case SIM_ST_DECLINED: return (p->flags & SIM_PF_ERROR) ? "Error" : "Refused";
    case SIM_ST_PENDING: return (p->flags & SIM_PF_RECEIVED) ? "Received" : "Pending";
    case SIM_ST_CANCELED: return "Cancelled";
    default: return "Error";
    }
}

static void payment_response(sim_server *s, const sim_payment *p)
{
    char psp[32];
    sim_buf *b = &s->body;
    sim_processor_id(s, p, psp, sizeof(psp));
    sim_buf_reset(b);
    sim_buf_adds(b, "{\"additionalData\":{},\"amount\":{\"currency\":");
    sim_buf_add_jstr(b, p->currency, 3);
    sim_buf_adds(b, ",\"value\":");
    sim_buf_add_i64(b, p->amount);
    sim_buf_adds(b, "},\"merchantReference\":");
    sim_buf_add_jstr(b, p->reference, p->reference_len);
    sim_buf_addf(b, ",\"pspReference\":\"%s\"", psp);
    if (p->status == SIM_ST_DECLINED) {
        const char *reason, *code;
        refusal(p, &reason, &code);
        sim_buf_adds(b, ",\"refusalReason\":");
        sim_buf_add_jstr(b, reason, strlen(reason));
        sim_buf_addf(b, ",\"refusalReasonCode\":\"%s\"", code);
    }
    sim_buf_addf(b, ",\"resultCode\":\"%s\"}", result_code(p));
}

/* ---- webhooks ----------------------------------------------------------- */

/* One NotificationRequestItem, signed with key (HMAC-SHA256, Base64) over
 * pspReference:originalReference:merchantAccountCode:merchantReference:
 * value:currency:eventCode:success. */
static void notification(sim_buf *b, const unsigned char *key, size_t key_len, const char *psp,
                         const char *original, const char *merchant, const char *reference, int64_t value,
                         const char *currency, const char *event, bool success, const char *reason)
{
    sim_buf sign;
    unsigned char mac[32];
    char b64[48], date[40];
    time_t now = time(NULL);
    struct tm tm;

    sim_buf_init(&sign);
    sim_buf_addf(&sign, "%s:%s:%s:%s:%lld:%s:%s:%s", psp, original, merchant, reference, (long long)value, currency,
                 event, success ? "true" : "false");
    sim_webhooks_hmac(key, key_len, sign.data, sign.len, mac);
    sim_buf_free(&sign);
    EVP_EncodeBlock((unsigned char *)b64, mac, 32);
    gmtime_r(&now, &tm);
    strftime(date, sizeof(date), "%Y-%m-%dT%H:%M:%S+00:00", &tm);

    sim_buf_reset(b);
    sim_buf_addf(b, "{\"live\":\"false\",\"notificationItems\":[{\"NotificationRequestItem\":{\"additionalData\":"
                    "{\"hmacSignature\":\"%s\"},\"amount\":{\"currency\":\"%s\",\"value\":%lld},\"eventCode\":\"%s\","
                    "\"eventDate\":\"%s\",\"merchantAccountCode\":",
                 b64, currency, (long long)value, event, date);
    sim_buf_add_jstr(b, merchant, strlen(merchant));
    sim_buf_adds(b, ",\"merchantReference\":");
    sim_buf_add_jstr(b, reference, strlen(reference));
    if (original[0] != '\0')
        sim_buf_addf(b, ",\"originalReference\":\"%s\"", original);
    sim_buf_addf(b, ",\"paymentMethod\":\"visa\",\"pspReference\":\"%s\",\"reason\":", psp);
    sim_buf_add_jstr(b, reason, strlen(reason));
    sim_buf_addf(b, ",\"success\":\"%s\"}}]}", success ? "true" : "false");
}

static void emit(sim_server *s, const char *psp, const char *original, const char *merchant, const char *reference,
                 int64_t value, const char *currency, const char *event, bool success, const char *reason)
{
    size_t klen;
    const unsigned char *key = sim_webhooks_key(s->webhooks, &klen);
    unsigned char wrong[SIM_WEBHOOK_SECRET_MAX + 1];
    sim_buf good, forged;
    if (!sim_webhooks_enabled(s->webhooks))
        return;
    sim_buf_init(&good);
    sim_buf_init(&forged);
    notification(&good, key, klen, psp, original, merchant, reference, value, currency, event, success, reason);
    memcpy(wrong, key, klen);
    wrong[klen] = 0x5a;
    notification(&forged, wrong, klen + 1, psp, original, merchant, reference, value, currency, event, success,
                 reason);
    sim_webhooks_emit(s->webhooks, good.data, good.len, false, forged.data, forged.len);
    sim_buf_free(&good);
    sim_buf_free(&forged);
}

/* AUTHORISATION once a payment's outcome is known (at once, or when a
 * pending one settles). Cancels report themselves (TECHNICAL_CANCEL). */
static void status_hook(void *arg, sim_payment *p, int from, const char *why)
{
    sim_server *s = arg;
    (void)from;
    (void)why;
    if (p->status != SIM_ST_SUCCEEDED && p->status != SIM_ST_DECLINED)
        return;
    char psp[32];
    const char *reason = "", *code;
    sim_processor_id(s, p, psp, sizeof(psp));
    if (p->status == SIM_ST_DECLINED)
        refusal(p, &reason, &code);
    emit(s, psp, "", p->account, p->reference, p->amount, p->currency, "AUTHORISATION", p->status == SIM_ST_SUCCEEDED,
         reason);
}

/* ---- parsing ------------------------------------------------------------ */

static const cJSON *jget(const cJSON *o, const char *name)
{
    return cJSON_GetObjectItemCaseSensitive(o, name);
}

static int bad(sim_call *c, const char *msg)
{
    return sim_call_bad(c, 422, "%s", msg);
}

static uint64_t body_hash(const char *b, size_t n)
{
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++)
        h = (h ^ (unsigned char)b[i]) * 1099511628211ULL;
    return h;
}

static bool string_field(const cJSON *v, size_t max, char *out, size_t *len)
{
    if (!cJSON_IsString(v))
        return false;
    size_t n = strlen(v->valuestring);
    if (n == 0 || n > max)
        return false;
    memcpy(out, v->valuestring, n + 1);
    *len = n;
    return true;
}

static int parse_payment(sim_call *c, cJSON *root)
{
    const cJSON *v = jget(root, "amount"), *x;
    x = jget(v, "value");
    if (!cJSON_IsObject(v) || !cJSON_IsNumber(x) || x->valuedouble != (double)(int64_t)x->valuedouble ||
        x->valuedouble < 1 || x->valuedouble > 9007199254740991.0)
        return bad(c, "amount.value must be a positive integer (minor units)");
    c->amount = (int64_t)x->valuedouble;
    x = jget(v, "currency");
    if (!cJSON_IsString(x) || strlen(x->valuestring) != 3 || x->valuestring[0] < 'A' || x->valuestring[0] > 'Z' ||
        x->valuestring[1] < 'A' || x->valuestring[1] > 'Z' || x->valuestring[2] < 'A' || x->valuestring[2] > 'Z')
        return bad(c, "amount.currency must be a three-letter ISO 4217 code");
    memcpy(c->currency, x->valuestring, 4);
    if (!string_field(jget(root, "reference"), ADYEN_REFERENCE_MAX, c->reference, &c->reference_len) ||
        !sim_printable_ascii(c->reference, c->reference_len))
        return bad(c, "Required field 'reference' is not provided (1..80 characters)");
    c->has_reference = true;
    if (!string_field(jget(root, "merchantAccount"), SIM_ACCOUNT_MAX, c->account, &c->account_len))
        return bad(c, "Required field 'merchantAccount' is not provided");
    v = jget(root, "paymentMethod");
    if (!cJSON_IsObject(v) || !cJSON_IsString(jget(v, "type")))
        return bad(c, "Required field 'paymentMethod' (with a type) is not provided");
    v = jget(root, "metadata");
    if (v != NULL && !cJSON_IsNull(v)) {
        if (!cJSON_IsObject(v))
            return bad(c, "metadata must be an object");
        x = jget(v, "sim");
        if (x != NULL && (!cJSON_IsString(x) || sim_parse_sim_value(c, x->valuestring) != 0 ||
                          c->force == FORCE_ACTION))
            return bad(c, "metadata.sim: unknown psp-sim outcome");
        x = jget(v, "sim_latency_ms");
        if (x != NULL && sim_parse_sim_latency(c, cJSON_IsString(x) ? x->valuestring : "x") != 0)
            return -1;
        x = jget(v, "sim_decline_code");
        if (x != NULL && sim_parse_sim_decline_code(c, cJSON_IsString(x) ? x->valuestring : "") != 0)
            return -1;
    }
    return 0;
}

static int parse_cancel(sim_call *c, cJSON *root)
{
    if (!string_field(jget(root, "merchantAccount"), SIM_ACCOUNT_MAX, c->account, &c->account_len))
        return bad(c, "Required field 'merchantAccount' is not provided");
    if (!string_field(jget(root, "paymentReference"), ADYEN_REFERENCE_MAX, c->reference, &c->reference_len))
        return bad(c, "Required field 'paymentReference' is not provided");
    c->has_reference = true;
    const cJSON *r = jget(root, "reference");
    if (r != NULL && !cJSON_IsNull(r) && (!cJSON_IsString(r) || strlen(r->valuestring) > ADYEN_REFERENCE_MAX))
        return bad(c, "reference must be a string of at most 80 characters");
    return 0;
}

static int parse(sim_call *c, struct evhttp_request *req)
{
    adyen_req *r = req_of(c);
    struct evbuffer *in = evhttp_request_get_input_buffer(req);
    size_t len = evbuffer_get_length(in);
    const char *body = (const char *)evbuffer_pullup(in, -1);
    const char *k = evhttp_find_header(evhttp_request_get_input_headers(req), "Idempotency-Key");
    int rc;

    if (k != NULL) {
        size_t n = strlen(k);
        if (n == 0 || n > ADYEN_KEY_MAX || !sim_printable_ascii(k, n))
            return sim_call_bad(c, 400, "Idempotency-Key must be 1..%d printable characters", ADYEN_KEY_MAX);
        memcpy(c->key, k, n + 1);
        c->key_len = n;
        r->has_key = true;
    }
    r->fp = body_hash(body != NULL ? body : "", len) ^ (uint64_t)c->op;
    cJSON *root = cJSON_ParseWithLength(body != NULL ? body : "", len);
    if (!cJSON_IsObject(root))
        rc = sim_call_bad(c, 400, "Unable to parse the request body as a JSON object");
    else
        rc = c->op == SIM_OP_CREATE ? parse_payment(c, root) : parse_cancel(c, root);
    cJSON_Delete(root);
    return rc;
}

/* ---- routing ------------------------------------------------------------ */

static int adyen_route(sim_server *s, struct evhttp_request *req, const char *path, size_t path_len,
                       const char *query, sim_call *c)
{
    enum evhttp_cmd_type method = evhttp_request_get_command(req);
    size_t i = 2;
    (void)query;
    /* /v<digits>/payments or /v<digits>/cancels */
    if (path_len > 2 && path[0] == '/' && path[1] == 'v') {
        while (i < path_len && i < 6 && path[i] >= '0' && path[i] <= '9')
            i++;
    }
    const char *rest = path + i;
    size_t rlen = path_len - i;
    if (i > 2 && rlen == 9 && memcmp(rest, "/payments", 9) == 0) {
        c->op = SIM_OP_CREATE;
    } else if (i > 2 && rlen == 8 && memcmp(rest, "/cancels", 8) == 0) {
        c->op = SIM_OP_CANCEL;
    } else {
        error_json(&s->body, 404, "psp_sim_not_found", "psp-sim (adyen) serves POST /v{N}/payments and /v{N}/cancels",
                   "validation");
        sim_reply_now(s, req, 404);
        return 1;
    }
    if (method != EVHTTP_REQ_POST) {
        error_json(&s->body, 405, "psp_sim_method", "Method not allowed", "validation");
        sim_reply_now(s, req, 405);
        return 1;
    }
    if (sim_count_request(s, req, c->op))
        return 1;
    if (s->token != NULL) {
        const char *k = evhttp_find_header(evhttp_request_get_input_headers(req), "X-API-Key");
        if (k == NULL || !sim_token_matches(s, k, strlen(k))) {
            error_json(&s->body, 401, "000", "HTTP Status Response - Unauthorized", "security");
            sim_reply_now(s, req, 401);
            return 1;
        }
    }
    (void)parse(c, req);
    return 0;
}

/* ---- processing --------------------------------------------------------- */

static int payment_new(sim_server *s, sim_call *c)
{
    sim_counters *ctr = sim_store_counters(s->store);
    sim_payment *p;
    sim_new_payment np = {
        .key = c->key_len > 0 ? c->key : c->reference,
        .key_len = c->key_len > 0 ? c->key_len : c->reference_len,
        .amount = c->amount,
        .currency = c->currency,
        .account = c->account,
        .account_len = c->account_len,
        .has_reference = true,
        .reference = c->reference,
        .reference_len = c->reference_len,
    };
    if (sim_store_insert(s->store, &np, &p) != 0) {
        error_json(&s->body, 503, "psp_sim_capacity", "psp-sim holds --max-payments records", "internal");
        return 503;
    }
    ctr->processed_creates++;
    sim_map_put(st_of(s)->refs, c->reference, c->reference_len, p);
    const char *dcode = c->has_decline_code ? c->decline_code : NULL;
    switch (sim_draw_outcome(s, c)) {
    case FORCE_ERROR:
        p->flags |= SIM_PF_ERROR;
        /* fall through */
    case FORCE_DECLINE:
        sim_store_set_status(s->store, p, SIM_ST_DECLINED, dcode, "create");
        break;
    case FORCE_RECEIVED:
        p->flags |= SIM_PF_RECEIVED;
        /* fall through */
    case FORCE_PENDING:
        sim_store_set_pending(s->store, p, sim_now_ms() + s->faults.settle_ms, s->faults.settle_status, dcode);
        sim_settle_rearm(s);
        break;
    default:
        sim_store_set_status(s->store, p, SIM_ST_SUCCEEDED, NULL, "create");
        break;
    }
    payment_response(s, p);
    return 200;
}

static void cancel_cb(evutil_socket_t fd, short what, void *arg);

static int cancel_received(sim_server *s, sim_call *c)
{
    adyen_state *st = st_of(s);
    cancel_job *j = sim_xcalloc(1, sizeof(*j));
    j->s = s;
    j->psp = ++st->next_mod;
    memcpy(j->merchant, c->account, c->account_len + 1);
    memcpy(j->reference, c->reference, c->reference_len + 1);
    j->timer = evtimer_new(s->base, cancel_cb, j);
    int64_t ms = s->faults.cancel_delay_ms;
    struct timeval tv = {(time_t)(ms / 1000), (suseconds_t)(ms % 1000) * 1000};
    if (j->timer == NULL || evtimer_add(j->timer, &tv) != 0) {
        sim_log(SIM_LOG_ERR, "cannot arm a cancel timer: out of memory?");
        abort();
    }
    j->next = st->cancels;
    st->cancels = j;
    sim_store_counters(s->store)->cancels_received++;

    sim_buf *b = &s->body;
    sim_buf_reset(b);
    sim_buf_adds(b, "{\"merchantAccount\":");
    sim_buf_add_jstr(b, c->account, c->account_len);
    sim_buf_adds(b, ",\"paymentReference\":");
    sim_buf_add_jstr(b, c->reference, c->reference_len);
    sim_buf_addf(b, ",\"pspReference\":\"%016llu\",\"status\":\"received\"}",
                 8900000000000000ULL + (unsigned long long)j->psp);
    return 201;
}

/* The technical cancel's outcome, reported only by webhook. */
static void cancel_cb(evutil_socket_t fd, short what, void *arg)
{
    cancel_job *j = arg;
    sim_server *s = j->s;
    adyen_state *st = st_of(s);
    (void)fd;
    (void)what;
    for (cancel_job **pj = &st->cancels; *pj != NULL; pj = &(*pj)->next) {
        if (*pj == j) {
            *pj = j->next;
            break;
        }
    }
    sim_payment *p = sim_map_get(st->refs, j->reference, strlen(j->reference));
    char psp[32], original[32] = "";
    bool success = false;
    const char *reason = "";
    snprintf(psp, sizeof(psp), "%016llu", 8900000000000000ULL + (unsigned long long)j->psp);
    if (p == NULL) {
        reason = "Original transaction not found (psp-sim)";
    } else {
        sim_store_touch(s->store, p, sim_now_ms());
        sim_processor_id(s, p, original, sizeof(original));
        if (p->status == SIM_ST_SUCCEEDED && s->faults.adyen_autocapture) {
            reason = "Transaction already captured (psp-sim adyen_autocapture)";
        } else {
            success = true;
            if (p->status == SIM_ST_SUCCEEDED || p->status == SIM_ST_PENDING)
                sim_store_set_status(s->store, p, SIM_ST_CANCELED, NULL, "technical cancel");
        }
    }
    emit(s, psp, original, j->merchant, j->reference, p != NULL ? p->amount : 0, p != NULL ? p->currency : "EUR",
         "TECHNICAL_CANCEL", success, reason);
    event_free(j->timer);
    free(j);
}

static int adyen_execute(sim_server *s, sim_call *c)
{
    adyen_req *r = c->mdata;
    sim_counters *ctr = sim_store_counters(s->store);
    sim_idem *rec = NULL;
    int code;

    if (c->bad_status != 0) {
        error_json(&s->body, c->bad_status, c->bad_status == 422 ? "psp_sim_validation" : "psp_sim_bad_request",
                   c->bad_msg, "validation");
        return c->bad_status;
    }
    if (c->fate == FATE_FAIL_BEFORE) {
        ctr->failed_before++;
        error_json(&s->body, 503, "psp_sim_fail_before", "psp-sim fail_before: nothing was processed", "internal");
        return 503;
    }
    if (r->has_key) {
        sim_add_header(s, "Idempotency-Key", "%s", c->key);
        rec = sim_idem_get(s, st_of(s)->keys, c->key, c->key_len);
        if (rec != NULL && rec->owner != 0 && rec->owner != c->token) {
            ctr->keys_in_use++;
            error_json(&s->body, 422, "psp_sim_idempotency_in_progress",
                       "A request with this Idempotency-Key is still being processed", "validation");
            return 422;
        }
        if (rec != NULL && rec->owner == 0) {
            if (rec->fp != r->fp) {
                ctr->conflicts++;
                error_json(&s->body, 422, "psp_sim_idempotency_conflict",
                           "This Idempotency-Key was used with another request", "validation");
                return 422;
            }
            ctr->replays++;
            sim_buf_reset(&s->body);
            sim_buf_add(&s->body, rec->body, rec->len);
            code = rec->status;
            goto fate;
        }
        if (rec == NULL)
            rec = sim_idem_begin(st_of(s)->keys, c->key, c->key_len, r->fp, c->token);
    }
    code = c->op == SIM_OP_CREATE ? payment_new(s, c) : cancel_received(s, c);
    if (rec != NULL)
        sim_idem_save(rec, code, &s->body);
fate:
    if (c->fate == FATE_FAIL_AFTER) {
        ctr->failed_after++;
        error_json(&s->body, 500, "psp_sim_fail_after", "psp-sim fail_after: the request was processed", "internal");
        return 500;
    }
    if (c->fate == FATE_DROP_AFTER) {
        ctr->dropped_after++;
        return 0;
    }
    return code;
}

static void adyen_rate_limited(sim_server *s)
{
    error_json(&s->body, 429, "psp_sim_rate_limit", "Too many requests", "validation");
}

static void adyen_held(sim_server *s, sim_call *c)
{
    adyen_req *r = c->mdata;
    if (r == NULL || !r->has_key)
        return;
    if (sim_idem_get(s, st_of(s)->keys, c->key, c->key_len) == NULL)
        (void)sim_idem_begin(st_of(s)->keys, c->key, c->key_len, r->fp, c->token);
}

static void drop_cancels(adyen_state *st)
{
    while (st->cancels != NULL) {
        cancel_job *j = st->cancels;
        st->cancels = j->next;
        event_free(j->timer);
        free(j);
    }
}

static void adyen_reset(sim_server *s)
{
    adyen_state *st = st_of(s);
    sim_map_clear(st->keys);
    sim_map_clear(st->refs);
    drop_cancels(st);
}

static void adyen_destroy(sim_server *s)
{
    adyen_state *st = st_of(s);
    if (st == NULL)
        return;
    drop_cancels(st);
    sim_map_free(st->keys);
    sim_map_free(st->refs);
    free(st);
    s->mstate = NULL;
}

void sim_adyen_init(sim_server *s)
{
    adyen_state *st = sim_xcalloc(1, sizeof(*st));
    st->keys = sim_idem_table();
    st->refs = sim_map_new(NULL);
    s->mstate = st;
    sim_store_set_hook(s->store, status_hook, s);
}

const sim_mode_ops sim_adyen_ops = {
    .mode = SIM_MODE_ADYEN,
    .route = adyen_route,
    .execute = adyen_execute,
    .rate_limited = adyen_rate_limited,
    .held = adyen_held,
    .reset = adyen_reset,
    .destroy = adyen_destroy,
};
