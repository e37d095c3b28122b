/*
 * sim_generic.c - --mode generic: the processor contract of docs/processor.md
 * (Create, Get, Cancel, Refund, List under /v1/payments, bearer token,
 * {"error":{"code":...}} bodies). The request machinery is psp_sim.c's.
 */
#include "sim_server.h"

#include <cjson/cJSON.h>
#include <event2/buffer.h>
#include <event2/keyvalq_struct.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define LIST_LIMIT_DEFAULT 100
#define LIST_LIMIT_MAX 1000

static void generic_reply_error(sim_server *s, struct evhttp_request *req, int code, const char *ecode,
                                const char *message)
{
    sim_error_body(s, ecode, message);
    sim_reply(s, req, code);
}

/* ---- processing ------------------------------------------------------- */

static void payment_body(sim_server *s, const sim_payment *p)
{
    sim_buf_reset(&s->body);
    sim_payment_json(p, &s->body);
}

static bool same_create(const sim_payment *p, const sim_call *c)
{
    return p->amount == c->amount && memcmp(p->currency, c->currency, 3) == 0 &&
           p->account_len == c->account_len && memcmp(p->account, c->account, c->account_len) == 0 &&
           p->has_reference == c->has_reference &&
           (!c->has_reference ||
            (p->reference_len == c->reference_len &&
             memcmp(p->reference, c->reference, c->reference_len) == 0));
}

static int process_create(sim_server *s, const sim_call *c)
{
    sim_counters *ctr = sim_store_counters(s->store);
    int64_t now = sim_now_ms();
    sim_payment *p = sim_store_find(s->store, c->key, c->key_len);

    if (p != NULL) {
        sim_store_touch(s->store, p, now);
        if (p->tombstone) {
            ctr->tombstone_hits++;
        } else if (!same_create(p, c)) {
            ctr->conflicts++;
            sim_error_body(s, "idempotency_conflict", NULL);
            return 409;
        } else {
            ctr->replays++;
        }
        payment_body(s, p);
        return 200;
    }

    sim_new_payment np = {
        .key = c->key,
        .key_len = c->key_len,
        .amount = c->amount,
        .currency = c->currency,
        .account = c->account,
        .account_len = c->account_len,
        .has_reference = c->has_reference,
        .reference = c->reference,
        .reference_len = c->reference_len,
    };
    if (sim_store_insert(s->store, &np, &p) != 0) {
        sim_error_body(s, "capacity", "psp-sim holds --max-payments records");
        return 503;
    }
    ctr->processed_creates++;

    const sim_faults *f = &s->faults;
    const char *dcode = c->has_decline_code ? c->decline_code : NULL;
    switch (sim_draw_outcome(s, c)) {
    case FORCE_DECLINE:
        sim_store_set_status(s->store, p, SIM_ST_DECLINED, dcode, "create");
        break;
    case FORCE_PENDING:
        sim_store_set_pending(s->store, p, now + f->settle_ms, f->settle_status, dcode);
        sim_settle_rearm(s);
        break;
    default:
        sim_store_set_status(s->store, p, SIM_ST_SUCCEEDED, NULL, "create");
        break;
    }
    payment_body(s, p);
    return 201;
}

static int process_get(sim_server *s, const sim_call *c)
{
    sim_payment *p = sim_store_find(s->store, c->key, c->key_len);
    if (p == NULL) {
        sim_error_body(s, "not_found", NULL);
        return 404;
    }
    sim_store_touch(s->store, p, sim_now_ms());
    payment_body(s, p);
    return 200;
}

static int process_cancel(sim_server *s, const sim_call *c)
{
    if (s->faults.cancel_unsupported) {
        sim_error_body(s, "cancel_unsupported", "this processor cannot cancel by idempotency key");
        return 501;
    }
    sim_payment *p = sim_store_find(s->store, c->key, c->key_len);
    if (p == NULL) {
        sim_new_payment np = {.key = c->key, .key_len = c->key_len, .tombstone = true};
        if (sim_store_insert(s->store, &np, &p) != 0) {
            sim_error_body(s, "capacity", "psp-sim holds --max-payments records");
            return 503;
        }
        sim_store_counters(s->store)->tombstones++;
        sim_store_set_status(s->store, p, SIM_ST_CANCELED, NULL, "cancel of an unknown key");
        payment_body(s, p);
        return 200;
    }
    sim_store_touch(s->store, p, sim_now_ms());
    switch ((sim_status)p->status) {
    case SIM_ST_PENDING:
        sim_store_set_status(s->store, p, SIM_ST_CANCELED, NULL, "cancel");
        break;
    case SIM_ST_SUCCEEDED: {
        sim_buf *b = &s->body;
        sim_buf_reset(b);
        sim_buf_adds(b, "{\"error\":{\"code\":\"already_succeeded\"},\"payment\":");
        sim_payment_json(p, b);
        sim_buf_addc(b, '}');
        return 409;
    }
    default:
        break; /* declined or canceled: unchanged */
    }
    payment_body(s, p);
    return 200;
}

static int process_refund(sim_server *s, const sim_call *c)
{
    sim_payment *p = sim_store_find(s->store, c->key, c->key_len);
    if (p == NULL) {
        sim_error_body(s, "not_found", NULL);
        return 404;
    }
    sim_store_touch(s->store, p, sim_now_ms());
    if (p->status != SIM_ST_SUCCEEDED) {
        sim_error_body(s, "not_succeeded", NULL);
        return 409;
    }
    sim_store_refund(s->store, p);
    payment_body(s, p);
    return 200;
}

static int process_list(sim_server *s, const sim_call *c)
{
    sim_buf *b = &s->body;
    size_t i = sim_store_list_start(s->store, c->has_gte, c->gte, c->has_after, c->after_seq);
    int n = 0;
    bool more = false;

    sim_store_settle_due(s->store, sim_now_ms());
    sim_settle_rearm(s);
    sim_buf_reset(b);
    sim_buf_adds(b, "{\"data\":[");
    for (sim_payment *p; (p = sim_store_at(s->store, i)) != NULL; i++) {
        if (c->has_lt && p->created >= c->lt)
            break;
        if (n == c->limit) {
            more = true;
            break;
        }
        if (n++ > 0)
            sim_buf_addc(b, ',');
        sim_payment_json(p, b);
    }
    sim_buf_adds(b, more ? "],\"has_more\":true}" : "],\"has_more\":false}");
    return 200;
}

/* Processes a call whose time has come, into s->body. Returns the HTTP
 * status to answer, or 0 to close the connection without an answer. */
static int generic_execute(sim_server *s, sim_call *c)
{
    sim_counters *ctr = sim_store_counters(s->store);
    int code;

    if (c->bad_status != 0) {
        sim_error_body(s, "invalid_request", c->bad_msg);
        return c->bad_status;
    }
    if (c->fate == FATE_FAIL_BEFORE) {
        ctr->failed_before++;
        sim_log(SIM_LOG_DEBUG, "fault fail_before op=%s key=\"%s\"", sim_op_name(c->op), c->key);
        sim_error_body(s, "simulated_failure", "psp-sim fail_before: nothing was processed");
        return 503;
    }
    switch (c->op) {
    case SIM_OP_CREATE: code = process_create(s, c); break;
    case SIM_OP_GET: code = process_get(s, c); break;
    case SIM_OP_CANCEL: code = process_cancel(s, c); break;
    case SIM_OP_REFUND: code = process_refund(s, c); break;
    case SIM_OP_LIST: code = process_list(s, c); break;
    default: code = 500; break;
    }
    sim_log(SIM_LOG_DEBUG, "request op=%s key=\"%s\" status=%d", sim_op_name(c->op), c->key, code);
    if (c->fate == FATE_FAIL_AFTER) {
        ctr->failed_after++;
        sim_log(SIM_LOG_DEBUG, "fault fail_after op=%s key=\"%s\"", sim_op_name(c->op), c->key);
        sim_error_body(s, "simulated_failure", "psp-sim fail_after: the request was processed");
        return 500;
    }
    if (c->fate == FATE_DROP_AFTER) {
        ctr->dropped_after++;
        sim_log(SIM_LOG_DEBUG, "fault drop_after op=%s key=\"%s\"", sim_op_name(c->op), c->key);
        return 0;
    }
    return code;
}

static void generic_rate_limited(sim_server *s)
{
    sim_error_body(s, "rate_limited", "psp-sim rate_limit: nothing was processed");
}

/* ---- parsing ---------------------------------------------------------- */

static const cJSON *jget(const cJSON *o, const char *name)
{
    return cJSON_GetObjectItemCaseSensitive(o, name);
}

static bool jabsent(const cJSON *v)
{
    return v == NULL || cJSON_IsNull(v);
}

static int parse_metadata(sim_call *c, const cJSON *md)
{
    const cJSON *v;

    if (jabsent(md))
        return 0;
    if (!cJSON_IsObject(md))
        return sim_call_bad(c, 400, "metadata must be an object");
    v = jget(md, "sim");
    if (!jabsent(v) && (!cJSON_IsString(v) || sim_parse_sim_value(c, v->valuestring) != 0 ||
                        c->force == FORCE_ACTION || c->force == FORCE_RECEIVED || c->force == FORCE_ERROR))
        return sim_call_bad(c, 400, "metadata.sim must be one of succeed, decline, pending, "
                                    "fail_before, fail_after, drop_after, blackhole, rate_limit");
    v = jget(md, "sim_latency_ms");
    if (!jabsent(v)) {
        char num[32];
        if (cJSON_IsNumber(v) && v->valuedouble == (double)(int64_t)v->valuedouble)
            snprintf(num, sizeof(num), "%lld", (long long)v->valuedouble);
        else
            snprintf(num, sizeof(num), "%s", cJSON_IsString(v) && strlen(v->valuestring) < 20 ? v->valuestring : "x");
        if (sim_parse_sim_latency(c, num) != 0)
            return -1;
    }
    v = jget(md, "sim_decline_code");
    if (!jabsent(v) && sim_parse_sim_decline_code(c, cJSON_IsString(v) ? v->valuestring : "") != 0)
        return -1;
    return 0;
}

static int parse_create(sim_call *c, struct evhttp_request *req)
{
    int rc = -1;
    const char *hkey = evhttp_find_header(evhttp_request_get_input_headers(req), "Idempotency-Key");
    struct evbuffer *in = evhttp_request_get_input_buffer(req);
    size_t len = evbuffer_get_length(in);
    cJSON *root = NULL;
    const cJSON *v;

    if (hkey == NULL)
        return sim_call_bad(c, 400, "missing Idempotency-Key header");
    root = cJSON_ParseWithLength((const char *)evbuffer_pullup(in, -1), len);
    if (!cJSON_IsObject(root)) {
        sim_call_bad(c, 400, "body must be a JSON object");
        goto out;
    }
    v = jget(root, "idempotency_key");
    if (!cJSON_IsString(v) || strcmp(v->valuestring, hkey) != 0) {
        sim_call_bad(c, 400, "idempotency_key must be a string equal to the Idempotency-Key header");
        goto out;
    }
    c->key_len = strlen(hkey);
    if (c->key_len == 0 || c->key_len > SIM_KEY_MAX || !sim_printable_ascii(hkey, c->key_len)) {
        sim_call_bad(c, 400, "idempotency key must be 1..%d printable ASCII characters", SIM_KEY_MAX);
        goto out;
    }
    memcpy(c->key, hkey, c->key_len + 1);
    v = jget(root, "amount");
    if (!cJSON_IsNumber(v) || v->valuedouble != (double)(int64_t)v->valuedouble ||
        v->valuedouble < 1 || v->valuedouble > 9007199254740991.0) {
        sim_call_bad(c, 400, "amount must be a positive integer (minor units)");
        goto out;
    }
    c->amount = (int64_t)v->valuedouble;
    v = jget(root, "currency");
    if (!cJSON_IsString(v) || strlen(v->valuestring) != 3 || v->valuestring[0] < 'A' ||
        v->valuestring[0] > 'Z' || v->valuestring[1] < 'A' || v->valuestring[1] > 'Z' ||
        v->valuestring[2] < 'A' || v->valuestring[2] > 'Z') {
        sim_call_bad(c, 400, "currency must be three capital letters");
        goto out;
    }
    memcpy(c->currency, v->valuestring, 4);
    v = jget(root, "account");
    c->account_len = cJSON_IsString(v) ? strlen(v->valuestring) : 0;
    if (c->account_len == 0 || c->account_len > SIM_ACCOUNT_MAX) {
        sim_call_bad(c, 400, "account must be a string of 1..%d bytes", SIM_ACCOUNT_MAX);
        goto out;
    }
    memcpy(c->account, v->valuestring, c->account_len + 1);
    v = jget(root, "reference");
    if (!jabsent(v)) {
        c->reference_len = cJSON_IsString(v) ? strlen(v->valuestring) : SIM_REFERENCE_MAX + 1;
        if (c->reference_len > SIM_REFERENCE_MAX) {
            sim_call_bad(c, 400, "reference must be null or a string of at most %d bytes",
                     SIM_REFERENCE_MAX);
            goto out;
        }
        memcpy(c->reference, v->valuestring, c->reference_len + 1);
        c->has_reference = true;
    }
    if (parse_metadata(c, jget(root, "metadata")) != 0)
        goto out;
    rc = 0;
out:
    cJSON_Delete(root);
    return rc;
}

static int parse_list(sim_call *c, const char *query)
{
    int rc = -1;
    struct evkeyvalq params;
    struct evkeyval *kv;

    TAILQ_INIT(&params);
    if (query == NULL)
        return 0;
    if (evhttp_parse_query_str(query, &params) != 0) {
        sim_call_bad(c, 400, "malformed query string");
        goto out;
    }
    TAILQ_FOREACH(kv, &params, next) {
        size_t n = strlen(kv->value);
        int64_t v;
        if (strcmp(kv->key, "created_gte") == 0 || strcmp(kv->key, "created_lt") == 0) {
            bool gte = kv->key[8] == 'g';
            if (sim_parse_i64(kv->value, n, true, &v) != 0) {
                sim_call_bad(c, 400, "%s must be an integer (unix seconds)", kv->key);
                goto out;
            }
            if (gte) {
                c->has_gte = true;
                c->gte = v;
            } else {
                c->has_lt = true;
                c->lt = v;
            }
        } else if (strcmp(kv->key, "limit") == 0) {
            if (sim_parse_i64(kv->value, n, false, &v) != 0 || v < 1 || v > LIST_LIMIT_MAX) {
                sim_call_bad(c, 400, "limit must be an integer in 1..%d", LIST_LIMIT_MAX);
                goto out;
            }
            c->limit = (int)v;
        } else if (strcmp(kv->key, "starting_after") == 0) {
            if (sim_parse_id(kv->value, n, &c->after_seq) != 0) {
                sim_call_bad(c, 400, "starting_after must be a payment id (psp_...)");
                goto out;
            }
            c->has_after = true;
        }
    }
    rc = 0;
out:
    evhttp_clear_headers(&params);
    return rc;
}

static bool generic_authorized(const sim_server *s, struct evhttp_request *req)
{
    if (s->token == NULL)
        return true;
    const char *h = evhttp_find_header(evhttp_request_get_input_headers(req), "Authorization");
    if (h == NULL || strncasecmp(h, "Bearer ", 7) != 0)
        return false;
    return sim_token_matches(s, h + 7, strlen(h + 7));
}

/* ---- /v1 -------------------------------------------------------------- */

#define PAYMENTS_PATH "/v1/payments"

static int generic_route(sim_server *s, struct evhttp_request *req, const char *path, size_t path_len,
                         const char *query, sim_call *cp)
{
    enum evhttp_cmd_type method = evhttp_request_get_command(req);
    const size_t plen = sizeof(PAYMENTS_PATH) - 1;
    sim_call call;
    enum evhttp_cmd_type want;

    sim_call_init(&call);
    if (path_len < plen || memcmp(path, PAYMENTS_PATH, plen) != 0) {
        generic_reply_error(s, req, 404, "not_found", "no such endpoint");
        return 1;
    }
    if (path_len == plen) {
        call.op = method == EVHTTP_REQ_GET ? SIM_OP_LIST : SIM_OP_CREATE;
        want = method == EVHTTP_REQ_GET ? EVHTTP_REQ_GET : EVHTTP_REQ_POST;
    } else if (path[plen] == '/') {
        const char *seg = path + plen + 1;
        const char *end = path + path_len;
        const char *slash = memchr(seg, '/', (size_t)(end - seg));
        const char *tail = slash != NULL ? slash : end;
        size_t tail_len = (size_t)(end - tail);
        if (tail_len == 0) {
            call.op = SIM_OP_GET;
            want = EVHTTP_REQ_GET;
        } else if (tail_len == 7 && memcmp(tail, "/cancel", 7) == 0) {
            call.op = SIM_OP_CANCEL;
            want = EVHTTP_REQ_POST;
        } else if (tail_len == 7 && memcmp(tail, "/refund", 7) == 0) {
            call.op = SIM_OP_REFUND;
            want = EVHTTP_REQ_POST;
        } else {
            generic_reply_error(s, req, 404, "not_found", "no such endpoint");
            return 1;
        }
        if (sim_decode_segment(seg, (size_t)(tail - seg), call.key, sizeof(call.key), &call.key_len) != 0 ||
            call.key_len == 0 || !sim_printable_ascii(call.key, call.key_len))
            sim_call_bad(&call, 400, "the key in the path must be 1..%d printable ASCII characters "
                                 "(percent-encoded)", SIM_KEY_MAX);
    } else {
        generic_reply_error(s, req, 404, "not_found", "no such endpoint");
        return 1;
    }
    if (method != want) {
        generic_reply_error(s, req, 405, "method_not_allowed", NULL);
        return 1;
    }

    if (sim_count_request(s, req, call.op))
        return 1;
    if (!generic_authorized(s, req)) {
        sim_error_body(s, "unauthorized", "missing or wrong bearer token");
        sim_add_header(s, "WWW-Authenticate", "Bearer");
        sim_reply(s, req, 401);
        return 1;
    }
    if (call.bad_status == 0) {
        if (call.op == SIM_OP_CREATE)
            (void)parse_create(&call, req);
        else if (call.op == SIM_OP_LIST)
            (void)parse_list(&call, query);
    }
    *cp = call;
    return 0;
}


const sim_mode_ops sim_generic_ops = {
    .mode = SIM_MODE_GENERIC,
    .route = generic_route,
    .execute = generic_execute,
    .rate_limited = generic_rate_limited,
};
