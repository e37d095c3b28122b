/*
 * proc_stripe_api.c - the Stripe adapter's pure parts (proc_stripe.h):
 * the create's form body, what every answer means, webhook signatures and
 * events. Sources for each rule are in docs/processors.md.
 */
#include "proc_stripe.h"
#include "proc_util.h"

#include <inttypes.h>
#include <stdarg.h>
#include <openssl/crypto.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define META_MAX 24                 /* 20 of the pay request's (protocol limit) + ours */

/* ---------------------------------------------------------------- requests */

static bool reserved_key(const char *k)
{
    return !strcmp(k, "gid") || !strcmp(k, "payment_id") || !strcmp(k, "account") || !strcmp(k, "reference");
}

bool stripe_create_body(const proc_req *req, const char *default_pm, sbuf *out)
{
    if (!req || !req->gid || !req->currency || strlen(req->currency) != 3 || req->amount <= 0 || !req->account)
        return false;
    char amount[24], cur[4];
    snprintf(amount, sizeof(amount), "%" PRId64, req->amount);
    for (int i = 0; i < 3; i++)
        cur[i] = (char)(req->currency[i] >= 'A' && req->currency[i] <= 'Z' ? req->currency[i] + 32
                                                                             : req->currency[i]);
    cur[3] = '\0';
    const char *pm = proc_json_str(req->metadata, "payment_method");
    if (!pm || !pm[0])
        pm = default_pm;
    if (!pm || !pm[0])
        return false;
    sbuf_reset(out);
    proc_form_add(out, "amount", amount);
    proc_form_add(out, "currency", cur);
    proc_form_add(out, "confirm", "true");
    proc_form_add(out, "payment_method", pm);
    const char *keys[META_MAX], *values[META_MAX];
    int n = proc_meta_sorted(req->metadata, keys, values, META_MAX);
    for (int i = 0; i < n; i++) {
        if (reserved_key(keys[i]))
            continue;                      /* ours win */
        sbuf m;
        sbuf_init(&m);
        sbuf_printf(&m, "metadata[%s]", keys[i]);
        proc_form_add(out, sbuf_str(&m), values[i]);
        sbuf_free(&m);
    }
    proc_form_add(out, "metadata[gid]", req->gid);
    if (req->payment_id && req->payment_id[0])
        proc_form_add(out, "metadata[payment_id]", req->payment_id);
    proc_form_add(out, "metadata[account]", req->account);
    if (req->reference)
        proc_form_add(out, "metadata[reference]", req->reference);
    return sbuf_ok(out);
}

/* ---------------------------------------------------------------- answers */

proc_status stripe_status(const char *s)
{
    static const struct { const char *name; proc_status st; } map[] = {
        { "succeeded", PROC_ST_SUCCEEDED },
        { "requires_payment_method", PROC_ST_DECLINED },   /* the attempt failed (a decline) */
        { "canceled", PROC_ST_CANCELED },
        { "processing", PROC_ST_PENDING },
        { "requires_action", PROC_ST_PENDING },            /* 3DS etc.: not charged; cancel allowed */
        { "requires_capture", PROC_ST_PENDING },           /* held, not captured (we never ask for it) */
        { "requires_confirmation", PROC_ST_PENDING },      /* never with confirm=true */
    };
    for (size_t i = 0; s && i < PC_ARRAY_LEN(map); i++)
        if (!strcmp(s, map[i].name))
            return map[i].st;
    return PROC_ST_NONE;
}

static void set_error(proc_result *res, const char *fmt, ...) PC_PRINTF(2, 3);
static void set_error(proc_result *res, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(res->error, sizeof(res->error), fmt, ap);
    va_end(ap);
}

/* Fill res from a PaymentIntent object. false (res->error says why) when it
 * is not one of ours or not understood. */
static bool read_intent(const cJSON *pi, const char *gid, int64_t amount, proc_result *res)
{
    const char *id = proc_json_str(pi, "id");
    const char *status = proc_json_str(pi, "status");
    const char *cur = proc_json_str(pi, "currency");
    int64_t amt = 0;
    if (!cJSON_IsObject(pi)) {
        set_error(res, "bad_answer: not a PaymentIntent");
        return false;
    }
    if (!id || strncmp(id, "pi_", 3) || strlen(id) >= sizeof(res->id)) {
        set_error(res, "bad_answer: PaymentIntent without a pi_ id");
        return false;
    }
    const cJSON *meta = cJSON_GetObjectItemCaseSensitive(pi, "metadata");
    const char *theirs = proc_json_str(meta, "gid");
    if (gid && (!theirs || strcmp(theirs, gid))) {
        set_error(res, "bad_answer: the PaymentIntent is another payment's (metadata gid %.200s)",
                  theirs ? theirs : "none");
        return false;
    }
    if (!proc_json_int(cJSON_GetObjectItemCaseSensitive(pi, "amount"), &amt) || amt <= 0 ||
        (amount > 0 && amt != amount)) {
        set_error(res, "bad_answer: the PaymentIntent's amount is not ours");
        return false;
    }
    if (!cur || strlen(cur) != 3) {
        set_error(res, "bad_answer: the PaymentIntent has no currency");
        return false;
    }
    proc_status st = stripe_status(status);
    if (st == PROC_ST_NONE) {
        set_error(res, "bad_answer: unknown PaymentIntent status %.64s", status ? status : "(none)");
        return false;
    }
    res->status = st;
    snprintf(res->id, sizeof(res->id), "%s", id);
    res->amount = amt;
    for (int i = 0; i < 3; i++)
        res->currency[i] = (char)(cur[i] >= 'a' && cur[i] <= 'z' ? cur[i] - 32 : cur[i]);
    res->currency[3] = '\0';
    if (st == PROC_ST_DECLINED) {
        const cJSON *lpe = cJSON_GetObjectItemCaseSensitive(pi, "last_payment_error");
        const char *code = proc_json_str(lpe, "decline_code");
        if (!code)
            code = proc_json_str(lpe, "code");
        snprintf(res->decline_code, sizeof(res->decline_code), "%s", code && code[0] ? code : "declined");
    } else if (st == PROC_ST_CANCELED) {
        snprintf(res->decline_code, sizeof(res->decline_code), "canceled");
    }
    res->outcome = PROC_PAYMENT;
    return true;
}

static void reset(proc_result *res, long http)
{
    memset(res, 0, sizeof(*res));
    res->outcome = PROC_UNKNOWN;
    res->http_status = http;
}

bool stripe_classify(stripe_call call, const char *gid, int64_t amount, long http, const char *body, size_t len,
                     bool replayed, proc_result *res, bool *replayed_5xx)
{
    reset(res, http);
    *replayed_5xx = false;
    cJSON *root = len > 0 ? cJSON_ParseWithLength(body, len) : NULL;
    const cJSON *err = cJSON_GetObjectItemCaseSensitive(root, "error");
    const char *type = proc_json_str(err, "type");
    const char *code = proc_json_str(err, "code");
    bool ok = true;

    if (http >= 500) {
        /* Stripe stores and replays a 5xx that happened after the create
         * began to execute: then the answer is never going to change. */
        *replayed_5xx = replayed;
        snprintf(res->error, sizeof(res->error), "http_%ld%s%s%s", http, code ? " " : "", code ? code : "",
                 replayed ? " (replayed)" : "");
        goto out;
    }
    if (http == 429) {
        res->outcome = PROC_RATE_LIMITED;
        snprintf(res->error, sizeof(res->error), "%s", code ? code : "rate_limit");
        goto out;
    }
    if (http == 401 || http == 403) {
        res->outcome = PROC_AUTH;
        snprintf(res->error, sizeof(res->error), "%s", code ? code : "unauthorized");
        goto out;
    }
    if (!cJSON_IsObject(root)) {
        snprintf(res->error, sizeof(res->error), "bad_answer: http %ld with a body that is not a JSON object", http);
        ok = false;
        goto out;
    }
    if (http == 200) {
        if (err) {
            snprintf(res->error, sizeof(res->error), "bad_answer: http 200 with an error object");
            ok = false;
        } else if (!(ok = read_intent(root, gid, amount, res))) {
            res->outcome = PROC_UNKNOWN;
        }
        goto out;
    }
    if (!cJSON_IsObject(err) || !type) {
        snprintf(res->error, sizeof(res->error), "bad_answer: http %ld without a Stripe error object", http);
        ok = false;
        goto out;
    }
    const cJSON *pi = cJSON_GetObjectItemCaseSensitive(err, "payment_intent");
    switch (http) {
    case 402:
        /* A card decline on a confirm=true create: the intent, in
         * requires_payment_method, comes with the error. Without it the
         * answer cannot be tied to our payment. */
        if (!pi || !(ok = read_intent(pi, gid, amount, res))) {
            if (!pi)
                snprintf(res->error, sizeof(res->error), "bad_answer: 402 without its PaymentIntent");
            res->outcome = PROC_UNKNOWN;
            ok = false;
            break;
        }
        if (res->status == PROC_ST_DECLINED) {
            const char *dc = proc_json_str(err, "decline_code");
            if (dc && dc[0])
                snprintf(res->decline_code, sizeof(res->decline_code), "%s", dc);
        }
        break;
    case 400:
        if (!strcmp(type, "idempotency_error")) {
            /* The key was used with other parameters: a bug of ours. */
            res->outcome = PROC_CONFLICT;
            snprintf(res->error, sizeof(res->error), "idempotency_error");
        } else if (call == STRIPE_CANCEL && code && !strcmp(code, "payment_intent_unexpected_state")) {
            /* Not cancelable in its status: the intent says which. */
            if (!pi || !(ok = read_intent(pi, gid, amount, res))) {
                if (!pi)
                    snprintf(res->error, sizeof(res->error), "bad_answer: unexpected_state without its PaymentIntent");
                res->outcome = PROC_UNKNOWN;
                ok = false;
                break;
            }
            if (res->status == PROC_ST_SUCCEEDED) {
                res->outcome = PROC_ALREADY_SUCCEEDED;
                snprintf(res->error, sizeof(res->error), "already_succeeded");
            } else {
                snprintf(res->error, sizeof(res->error), "payment_intent_unexpected_state");
            }
        } else {
            res->outcome = PROC_INVALID;
            snprintf(res->error, sizeof(res->error), "%s", code ? code : type);
        }
        break;
    case 409:
        /* idempotency_key_in_use: the first request with this key is
         * still executing; its answer comes to a later try. */
        snprintf(res->error, sizeof(res->error), "%s", code ? code : "conflict_409");
        break;
    case 404:
        /* A retrieve or cancel of an id Stripe gave us: it cannot vanish. */
        snprintf(res->error, sizeof(res->error), "bad_answer: 404 %s", code ? code : type);
        ok = false;
        break;
    default:
        snprintf(res->error, sizeof(res->error), "http_%ld %s", http, code ? code : type);
        break;
    }
out:
    cJSON_Delete(root);
    if (!ok) {
        res->outcome = PROC_UNKNOWN;
        res->status = PROC_ST_NONE;
        res->id[0] = res->decline_code[0] = '\0';
    }
    return ok;
}

bool stripe_classify_search(const char *gid, long http, const char *body, size_t len, stripe_found *found,
                            proc_result *res)
{
    memset(found, 0, sizeof(*found));
    if (http != 200) {
        bool r5;
        bool ok = stripe_classify(STRIPE_RETRIEVE, NULL, 0, http, body, len, false, res, &r5);
        if (res->outcome == PROC_PAYMENT || res->outcome == PROC_ALREADY_SUCCEEDED) {
            res->outcome = PROC_UNKNOWN;
            snprintf(res->error, sizeof(res->error), "bad_answer: search answered http %ld", http);
            ok = false;
        }
        return ok;
    }
    reset(res, http);
    cJSON *root = cJSON_ParseWithLength(body, len);
    const cJSON *data = cJSON_GetObjectItemCaseSensitive(root, "data");
    const char *obj = proc_json_str(root, "object");
    bool ok = cJSON_IsArray(data) && obj && !strcmp(obj, "search_result");
    if (!ok) {
        snprintf(res->error, sizeof(res->error), "bad_answer: not a search result");
    } else {
        const cJSON *pi;
        cJSON_ArrayForEach(pi, data) {
            const char *id = proc_json_str(pi, "id");
            const char *theirs = proc_json_str(cJSON_GetObjectItemCaseSensitive(pi, "metadata"), "gid");
            if (!id || strncmp(id, "pi_", 3) || strlen(id) >= sizeof(found->id)) {
                snprintf(res->error, sizeof(res->error), "bad_answer: a search result without a pi_ id");
                ok = false;
                break;
            }
            if (!theirs || strcmp(theirs, gid))
                continue;                  /* the query asked for ours: ignore anything else */
            if (found->n++ == 0)
                snprintf(found->id, sizeof(found->id), "%s", id);
        }
        if (ok && cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(root, "has_more")) && found->n < 2)
            found->n = 2;                  /* more pages for one gid: more than one intent */
    }
    if (ok)
        res->outcome = PROC_PAYMENT;
    else
        memset(found, 0, sizeof(*found));
    cJSON_Delete(root);
    return ok;
}

/* ---------------------------------------------------------------- webhooks */

static int hexval(char c)
{
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

proc_wh_status stripe_verify_signature(const char *secret, const char *header, const char *body, size_t len,
                                       int64_t now_s, int tolerance_s, char *err, size_t errlen)
{
    if (!secret || !secret[0]) {
        snprintf(err, errlen, "no Stripe webhook secret configured (stripe_webhook_secret_file)");
        return PROC_WH_UNSIGNED;
    }
    if (!header || !header[0]) {
        snprintf(err, errlen, "no Stripe-Signature header");
        return PROC_WH_UNSIGNED;
    }
    /* t=<digits> and every v1=<64 hex> */
    int64_t t = -1;
    unsigned char sigs[8][32];
    int nsig = 0;
    const char *p = header;
    while (*p) {
        const char *end = strchr(p, ',');
        size_t n = end ? (size_t)(end - p) : strlen(p);
        while (n && *p == ' ') {
            p++;
            n--;
        }
        if (n > 2 && p[0] == 't' && p[1] == '=') {
            int64_t v = 0;
            size_t i = 2;
            for (; i < n && p[i] >= '0' && p[i] <= '9' && v < INT64_C(100000000000); i++)
                v = v * 10 + (p[i] - '0');
            if (i == n)
                t = v;
        } else if (n == 3 + 64 && !strncmp(p, "v1=", 3) && nsig < 8) {
            bool good = true;
            for (int i = 0; i < 32 && good; i++) {
                int hi = hexval(p[3 + 2 * i]), lo = hexval(p[4 + 2 * i]);
                good = hi >= 0 && lo >= 0;
                sigs[nsig][i] = (unsigned char)(hi << 4 | lo);
            }
            if (good)
                nsig++;
        }
        p += n;
        if (*p == ',')
            p++;
    }
    if (t < 0 || nsig == 0) {
        snprintf(err, errlen, "Stripe-Signature without a timestamp or a v1 signature");
        return PROC_WH_UNSIGNED;
    }
    if (t < now_s - tolerance_s || t > now_s + tolerance_s) {
        snprintf(err, errlen, "Stripe-Signature timestamp %lld is outside the tolerance of %d s", (long long)t,
                 tolerance_s);
        return PROC_WH_UNSIGNED;
    }
    unsigned char mac[32];
    sbuf msg;
    sbuf_init(&msg);
    sbuf_printf(&msg, "%lld.", (long long)t);
    sbuf_add(&msg, body, len);
    bool ok = sbuf_ok(&msg) && proc_hmac_sha256((const unsigned char *)secret, strlen(secret), msg.data, msg.len, mac);
    sbuf_free(&msg);
    if (!ok) {
        snprintf(err, errlen, "HMAC failed");
        return PROC_WH_UNSIGNED;
    }
    for (int i = 0; i < nsig; i++)
        if (CRYPTO_memcmp(mac, sigs[i], 32) == 0)
            return PROC_WH_OK;
    snprintf(err, errlen, "no v1 signature matches");
    return PROC_WH_UNSIGNED;
}

proc_wh_status stripe_parse_event(const char *body, size_t len, proc_event *ev, int *n, char *err, size_t errlen)
{
    *n = 0;
    proc_wh_status rc = PROC_WH_MALFORMED;
    cJSON *root = cJSON_ParseWithLength(body, len);
    const char *id = proc_json_str(root, "id");
    const char *type = proc_json_str(root, "type");
    const char *object = proc_json_str(root, "object");
    if (!cJSON_IsObject(root) || !id || !type || !object || strcmp(object, "event") || !id[0] ||
        strlen(id) >= sizeof(ev->id) || strlen(type) >= sizeof(ev->kind)) {
        snprintf(err, errlen, "not a Stripe event");
        goto out;
    }
    if (strncmp(type, "payment_intent.", 15) != 0) {
        rc = PROC_WH_OK;                    /* not about a PaymentIntent: acknowledged, nothing kept */
        goto out;
    }
    const cJSON *pi = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(root, "data"), "object");
    const char *pid = proc_json_str(pi, "id");
    const char *gid = proc_json_str(cJSON_GetObjectItemCaseSensitive(pi, "metadata"), "gid");
    const char *status = proc_json_str(pi, "status");
    int64_t amount = 0;
    if (!pid || strncmp(pid, "pi_", 3) || strlen(pid) >= sizeof(ev->processor_ref) || !status) {
        snprintf(err, errlen, "a payment_intent event without its intent");
        goto out;
    }
    memset(ev, 0, sizeof(*ev));
    snprintf(ev->id, sizeof(ev->id), "%s", id);
    snprintf(ev->kind, sizeof(ev->kind), "%s", type);
    snprintf(ev->processor_ref, sizeof(ev->processor_ref), "%s", pid);
    if (gid && strlen(gid) < sizeof(ev->gid))
        snprintf(ev->gid, sizeof(ev->gid), "%s", gid);
    ev->status = stripe_status(status);
    ev->success = ev->status == PROC_ST_SUCCEEDED;
    ev->cancel = ev->status == PROC_ST_CANCELED;
    if (proc_json_int(cJSON_GetObjectItemCaseSensitive(pi, "amount"), &amount))
        ev->amount = amount;
    const char *cur = proc_json_str(pi, "currency");
    if (cur && strlen(cur) == 3)
        for (int i = 0; i < 4; i++)
            ev->currency[i] = (char)(cur[i] >= 'a' && cur[i] <= 'z' ? cur[i] - 32 : cur[i]);
    if (ev->status == PROC_ST_DECLINED) {
        const cJSON *lpe = cJSON_GetObjectItemCaseSensitive(pi, "last_payment_error");
        const char *code = proc_json_str(lpe, "decline_code");
        snprintf(ev->reason, sizeof(ev->reason), "%s", code ? code : "declined");
    }
    *n = 1;
    rc = PROC_WH_OK;
out:
    cJSON_Delete(root);
    return rc;
}
