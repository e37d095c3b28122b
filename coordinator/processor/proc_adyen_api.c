/*
 * proc_adyen_api.c - the Adyen adapter's pure parts (proc_adyen.h): request
 * bodies, what every answer means, notification signatures and events, and
 * the decision from what the webhooks said. Sources in docs/processors.md.
 */
#include "proc_adyen.h"
#include "proc_util.h"

#include <inttypes.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define META_MAX 20

/* ---------------------------------------------------------------- requests */

static bool add_str(cJSON *o, const char *k, const char *v)
{
    return cJSON_AddStringToObject(o, k, v) != NULL;
}

bool adyen_payment_body(const proc_req *req, const char *merchant, sbuf *out)
{
    if (!req || !req->gid || strlen(req->gid) > ADYEN_REFERENCE_MAX || strlen(req->gid) > ADYEN_KEY_MAX ||
        !req->currency || strlen(req->currency) != 3 || req->amount <= 0 || !req->account || !merchant ||
        !merchant[0])
        return false;
    bool ok = false;
    char amount[24];
    snprintf(amount, sizeof(amount), "%" PRId64, req->amount);
    cJSON *o = cJSON_CreateObject();
    cJSON *amt = cJSON_AddObjectToObject(o, "amount");
    cJSON *pm = cJSON_AddObjectToObject(o, "paymentMethod");
    if (!o || !amt || !pm || !add_str(amt, "currency", req->currency) || !cJSON_AddRawToObject(amt, "value", amount) ||
        !add_str(o, "reference", req->gid) || !add_str(o, "merchantAccount", merchant) ||
        !add_str(pm, "type", "scheme") || !add_str(o, "shopperReference", req->account))
        goto out;
    const char *stored = proc_json_str(req->metadata, "payment_method");
    if (stored && stored[0]) {
        if (!add_str(pm, "storedPaymentMethodId", stored) || !add_str(o, "shopperInteraction", "ContAuth") ||
            !add_str(o, "recurringProcessingModel", "UnscheduledCardOnFile"))
            goto out;
    }
    const char *keys[META_MAX], *values[META_MAX];
    int n = proc_meta_sorted(req->metadata, keys, values, META_MAX);
    if (n > 0) {
        cJSON *m = cJSON_AddObjectToObject(o, "metadata");
        if (!m)
            goto out;
        for (int i = 0; i < n; i++)
            if (!add_str(m, keys[i], values[i]))
                goto out;
    }
    char *text = cJSON_PrintUnformatted(o);
    if (!text)
        goto out;
    sbuf_reset(out);
    sbuf_puts(out, text);
    free(text);
    ok = sbuf_ok(out);
out:
    cJSON_Delete(o);
    return ok;
}

bool adyen_cancel_body(const char *gid, const char *merchant, sbuf *out)
{
    if (!gid || strlen(gid) > ADYEN_REFERENCE_MAX || !merchant || !merchant[0])
        return false;
    cJSON *o = cJSON_CreateObject();
    bool ok = o && add_str(o, "merchantAccount", merchant) && add_str(o, "paymentReference", gid);
    char *text = ok ? cJSON_PrintUnformatted(o) : NULL;
    cJSON_Delete(o);
    if (!text)
        return false;
    sbuf_reset(out);
    sbuf_puts(out, text);
    free(text);
    return sbuf_ok(out);
}

/* ---------------------------------------------------------------- answers */

static void reset(proc_result *res, long http)
{
    memset(res, 0, sizeof(*res));
    res->outcome = PROC_UNKNOWN;
    res->http_status = http;
}

static bool bad(proc_result *res, const char *fmt, ...) PC_PRINTF(2, 3);
static bool bad(proc_result *res, const char *fmt, ...)
{
    long http = res->http_status;
    reset(res, http);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(res->error, sizeof(res->error), fmt, ap);
    va_end(ap);
    return false;
}

/* The answers that are not a 2xx, alike for /payments and /cancels. */
static bool classify_error(long http, const cJSON *root, proc_result *res)
{
    const char *code = proc_json_str(root, "errorCode");
    if (http >= 500) {
        snprintf(res->error, sizeof(res->error), "http_%ld%s%.100s", http, code ? " " : "", code ? code : "");
        return true;
    }
    if (http == 429) {
        res->outcome = PROC_RATE_LIMITED;
        snprintf(res->error, sizeof(res->error), "%.100s", code ? code : "rate_limited");
        return true;
    }
    if (http == 401 || http == 403) {
        res->outcome = PROC_AUTH;
        snprintf(res->error, sizeof(res->error), "%.100s", code ? code : "unauthorized");
        return true;
    }
    if (!cJSON_IsObject(root) || !code)
        return bad(res, "bad_answer: http %ld without an Adyen error object", http);
    if (http == 400 || http == 422) {
        res->outcome = PROC_INVALID;
        snprintf(res->error, sizeof(res->error), "%.100s: %.100s", code,
                 proc_json_str(root, "message") ? proc_json_str(root, "message") : "");
        return true;
    }
    return bad(res, "bad_answer: http %ld %.100s", http, code);
}

bool adyen_classify_payment(const char *gid, int64_t amount, long http, const char *body, size_t len,
                            const char *echoed_key, proc_result *res)
{
    reset(res, http);
    cJSON *root = len ? cJSON_ParseWithLength(body, len) : NULL;
    bool ok = true;
    if (http != 200) {
        ok = classify_error(http, root, res);
        goto out;
    }
    if (!cJSON_IsObject(root)) {
        ok = bad(res, "bad_answer: http 200 with a body that is not a JSON object");
        goto out;
    }
    const char *rc = proc_json_str(root, "resultCode");
    const char *psp = proc_json_str(root, "pspReference");
    const char *ref = proc_json_str(root, "merchantReference");
    if (!rc) {
        ok = bad(res, "bad_answer: http 200 without a resultCode%s",
                 proc_json_str(root, "errorCode") ? " (an error object)" : "");
        goto out;
    }
    if (!ref || strcmp(ref, gid) != 0) {
        ok = bad(res, "bad_answer: the answer is another payment's (merchantReference %.100s)", ref ? ref : "none");
        goto out;
    }
    if (echoed_key && strcmp(echoed_key, gid) != 0) {
        ok = bad(res, "bad_answer: the answer is for another Idempotency-Key");
        goto out;
    }
    if (!psp || !psp[0] || strlen(psp) >= sizeof(res->id)) {
        ok = bad(res, "bad_answer: no pspReference");
        goto out;
    }
    const cJSON *amt = cJSON_GetObjectItemCaseSensitive(root, "amount");
    int64_t value = 0;
    if (amt && (!proc_json_int(cJSON_GetObjectItemCaseSensitive(amt, "value"), &value) ||
                (amount > 0 && value != amount))) {
        ok = bad(res, "bad_answer: the answer's amount is not ours");
        goto out;
    }
    static const struct { const char *code; proc_status st; } map[] = {
        { "Authorised", PROC_ST_SUCCEEDED }, { "Refused", PROC_ST_DECLINED }, { "Error", PROC_ST_DECLINED },
        { "Cancelled", PROC_ST_CANCELED }, { "Pending", PROC_ST_PENDING }, { "Received", PROC_ST_PENDING },
        /* the shopper would have to act: not charged; canceled at the deadline */
        { "RedirectShopper", PROC_ST_PENDING }, { "IdentifyShopper", PROC_ST_PENDING },
        { "ChallengeShopper", PROC_ST_PENDING }, { "PresentToShopper", PROC_ST_PENDING },
    };
    proc_status st = PROC_ST_NONE;
    for (size_t i = 0; i < PC_ARRAY_LEN(map); i++)
        if (!strcmp(rc, map[i].code))
            st = map[i].st;
    if (st == PROC_ST_NONE) {
        ok = bad(res, "bad_answer: unknown resultCode %.64s", rc);
        goto out;
    }
    res->outcome = PROC_PAYMENT;
    res->status = st;
    snprintf(res->id, sizeof(res->id), "%s", psp);
    res->amount = value ? value : amount;
    const char *cur = proc_json_str(amt, "currency");
    snprintf(res->currency, sizeof(res->currency), "%s", cur && strlen(cur) == 3 ? cur : "");
    if (st == PROC_ST_DECLINED) {
        const char *why = proc_json_str(root, "refusalReason");
        snprintf(res->decline_code, sizeof(res->decline_code), "%s", why && why[0] ? why : rc);
    } else if (st == PROC_ST_CANCELED) {
        snprintf(res->decline_code, sizeof(res->decline_code), "canceled");
    }
out:
    cJSON_Delete(root);
    return ok;
}

bool adyen_classify_cancel(const char *gid, long http, const char *body, size_t len, proc_result *res,
                           char *cancel_psp)
{
    reset(res, http);
    cancel_psp[0] = '\0';
    cJSON *root = len ? cJSON_ParseWithLength(body, len) : NULL;
    bool ok = true;
    if (http != 200 && http != 201) {
        ok = classify_error(http, root, res);
        goto out;
    }
    const char *status = proc_json_str(root, "status");
    const char *ref = proc_json_str(root, "paymentReference");
    const char *psp = proc_json_str(root, "pspReference");
    if (!status || strcmp(status, "received") != 0) {
        ok = bad(res, "bad_answer: a cancel answer without status received");
        goto out;
    }
    if (!ref || strcmp(ref, gid) != 0) {
        ok = bad(res, "bad_answer: the cancel answer is another payment's");
        goto out;
    }
    if (!psp || !psp[0] || strlen(psp) >= 64) {
        ok = bad(res, "bad_answer: a cancel answer without its pspReference");
        goto out;
    }
    snprintf(cancel_psp, 64, "%s", psp);
    res->outcome = PROC_PAYMENT;
    res->status = PROC_ST_PENDING;
    snprintf(res->error, sizeof(res->error), "technical cancel received; its outcome comes by webhook");
out:
    cJSON_Delete(root);
    return ok;
}

/* ---------------------------------------------------------------- notifications */

static int hexval(char c)
{
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

bool adyen_hmac_key(const char *hex, unsigned char *key, size_t *klen)
{
    size_t n = hex ? strlen(hex) : 0;
    if (n == 0 || n % 2 || n / 2 > ADYEN_HMAC_KEY_MAX)
        return false;
    for (size_t i = 0; i < n / 2; i++) {
        int hi = hexval(hex[2 * i]), lo = hexval(hex[2 * i + 1]);
        if (hi < 0 || lo < 0)
            return false;
        key[i] = (unsigned char)(hi << 4 | lo);
    }
    *klen = n / 2;
    return true;
}

/* A string field of the item, "" when absent. */
static const char *field(const cJSON *item, const char *name)
{
    const char *v = proc_json_str(item, name);
    return v ? v : "";
}

static bool signature_ok(const unsigned char *key, size_t klen, const cJSON *item)
{
    const cJSON *amt = cJSON_GetObjectItemCaseSensitive(item, "amount");
    int64_t value = 0;
    const cJSON *sig = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(item, "additionalData"),
                                                        "hmacSignature");
    if (!cJSON_IsString(sig) || !proc_json_int(cJSON_GetObjectItemCaseSensitive(amt, "value"), &value))
        return false;
    /* pspReference:originalReference:merchantAccountCode:merchantReference:
     * value:currency:eventCode:success, no escaping (Adyen's webhook HMAC). */
    sbuf s;
    sbuf_init(&s);
    sbuf_printf(&s, "%s:%s:%s:%s:%" PRId64 ":%s:%s:%s", field(item, "pspReference"), field(item, "originalReference"),
                field(item, "merchantAccountCode"), field(item, "merchantReference"), value,
                field(amt, "currency"), field(item, "eventCode"), field(item, "success"));
    unsigned char mac[32], given[64];
    bool ok = sbuf_ok(&s) && proc_hmac_sha256(key, klen, s.data, s.len, mac);
    sbuf_free(&s);
    size_t slen = strlen(sig->valuestring);
    if (!ok || slen != 44)                /* Base64 of 32 bytes */
        return false;
    int got = EVP_DecodeBlock(given, (const unsigned char *)sig->valuestring, (int)slen);
    return got == 33 && CRYPTO_memcmp(mac, given, 32) == 0;   /* 33: one '=' of padding decodes as a zero byte */
}

proc_wh_status adyen_parse_notification(const unsigned char *key, size_t klen, const char *merchant,
                                        const char *body, size_t len, proc_event *events, int max, int *n, char *err,
                                        size_t errlen)
{
    *n = 0;
    proc_wh_status rc = PROC_WH_MALFORMED;
    cJSON *root = cJSON_ParseWithLength(body, len);
    const cJSON *items = cJSON_GetObjectItemCaseSensitive(root, "notificationItems");
    const cJSON *w;
    if (!cJSON_IsArray(items) || cJSON_GetArraySize(items) == 0) {
        snprintf(err, errlen, "not an Adyen notification (no notificationItems)");
        goto out;
    }
    if (cJSON_GetArraySize(items) > max) {
        snprintf(err, errlen, "more than %d notification items", max);
        goto out;
    }
    /* Every item is verified before anything is taken. */
    cJSON_ArrayForEach(w, items) {
        const cJSON *item = cJSON_GetObjectItemCaseSensitive(w, "NotificationRequestItem");
        if (!cJSON_IsObject(item) || !proc_json_str(item, "pspReference") || !proc_json_str(item, "eventCode") ||
            !proc_json_str(item, "success")) {
            snprintf(err, errlen, "a notification item without pspReference, eventCode or success");
            goto out;
        }
        if (!signature_ok(key, klen, item)) {
            snprintf(err, errlen, "notification item %.40s: missing or wrong hmacSignature",
                     proc_json_str(item, "pspReference"));
            rc = PROC_WH_UNSIGNED;
            goto out;
        }
    }
    cJSON_ArrayForEach(w, items) {
        const cJSON *item = cJSON_GetObjectItemCaseSensitive(w, "NotificationRequestItem");
        const char *code = field(item, "eventCode");
        bool auth = !strcmp(code, "AUTHORISATION");
        bool cancel = !strcmp(code, "TECHNICAL_CANCEL") || !strcmp(code, "CANCELLATION") ||
                      !strcmp(code, "CANCEL_OR_REFUND");
        if (!auth && !cancel)
            continue;                       /* acknowledged, not ours to keep */
        if (merchant && strcmp(field(item, "merchantAccountCode"), merchant) != 0)
            continue;                       /* another merchant account's */
        const char *psp = field(item, "pspReference");
        const char *success = field(item, "success");
        proc_event *ev = &events[*n];
        memset(ev, 0, sizeof(*ev));
        if (strlen(psp) >= 64 || strlen(field(item, "merchantReference")) >= sizeof(ev->gid) ||
            strlen(field(item, "originalReference")) >= sizeof(ev->processor_ref)) {
            snprintf(err, errlen, "a notification item with an oversized reference");
            goto out;
        }
        snprintf(ev->id, sizeof(ev->id), "%s:%s:%s", psp, code, success);
        snprintf(ev->gid, sizeof(ev->gid), "%s", field(item, "merchantReference"));
        snprintf(ev->processor_ref, sizeof(ev->processor_ref), "%s",
                 auth ? psp : field(item, "originalReference"));
        snprintf(ev->kind, sizeof(ev->kind), "%s", code);
        ev->success = !strcmp(success, "true");
        ev->cancel = cancel;
        ev->status = auth ? (ev->success ? PROC_ST_SUCCEEDED : PROC_ST_DECLINED)
                          : (ev->success ? PROC_ST_CANCELED : PROC_ST_NONE);
        snprintf(ev->reason, sizeof(ev->reason), "%s", field(item, "reason"));
        const cJSON *amt = cJSON_GetObjectItemCaseSensitive(item, "amount");
        (void)proc_json_int(cJSON_GetObjectItemCaseSensitive(amt, "value"), &ev->amount);
        const char *cur = field(amt, "currency");
        if (strlen(cur) == 3)
            memcpy(ev->currency, cur, 4);
        /* For a cancel, its own pspReference (the id's first part) says
         * which cancel request it answers; the payment's is originalReference. */
        (*n)++;
    }
    rc = PROC_WH_OK;
out:
    cJSON_Delete(root);
    return rc;
}

/* ---------------------------------------------------------------- decisions */

void adyen_note_event(proc_known *k, const proc_event *ev)
{
    if (!strcmp(ev->kind, "AUTHORISATION")) {
        /* A later AUTHORISATION does not undo a refusal or a success already
         * noted: Adyen sends one per payment (duplicates are the same). */
        if (k->auth == PROC_ST_NONE) {
            k->auth = ev->status;
            snprintf(k->auth_reason, sizeof(k->auth_reason), "%.63s", ev->reason[0] ? ev->reason : "Refused");
        }
        if (ev->processor_ref[0])
            snprintf(k->ref, sizeof(k->ref), "%s", ev->processor_ref);
        return;
    }
    if (!ev->cancel)
        return;
    snprintf(k->cancel_reason, sizeof(k->cancel_reason), "%.63s", ev->reason);
    if (ev->success) {
        k->cancel_ok = true;
    } else {
        /* the cancel's own pspReference is the id's first part */
        size_t n = strcspn(ev->id, ":");
        if (n < sizeof(k->cancel_fail_psp)) {
            memcpy(k->cancel_fail_psp, ev->id, n);
            k->cancel_fail_psp[n] = '\0';
        }
    }
    if (!k->ref[0] && ev->processor_ref[0])
        snprintf(k->ref, sizeof(k->ref), "%s", ev->processor_ref);
}

void adyen_decide(const proc_known *k, int64_t since_deadline_ms, uint64_t now_ms, int64_t timeout_ms,
                  bool never_debited, proc_result *res)
{
    memset(res, 0, sizeof(*res));
    res->outcome = PROC_PAYMENT;
    res->local = true;
    if (k && k->ref[0])
        snprintf(res->id, sizeof(res->id), "%s", k->ref);
    if (k && k->cancel_ok) {
        res->status = PROC_ST_CANCELED;
        snprintf(res->decline_code, sizeof(res->decline_code), "canceled");
        snprintf(res->error, sizeof(res->error), "a cancel succeeded (webhook)");
        return;
    }
    proc_status auth = k ? k->auth : PROC_ST_NONE;
    if (auth == PROC_ST_DECLINED) {
        /* refused: nothing was ever charged, cancel or not */
        res->status = PROC_ST_DECLINED;
        snprintf(res->decline_code, sizeof(res->decline_code), "%s", k->auth_reason[0] ? k->auth_reason : "Refused");
        return;
    }
    if (since_deadline_ms < -ADYEN_AUTH_MARGIN_MS) {
        res->status = auth == PROC_ST_SUCCEEDED ? PROC_ST_SUCCEEDED : PROC_ST_PENDING;
        if (res->status == PROC_ST_PENDING)
            snprintf(res->error, sizeof(res->error), "no AUTHORISATION webhook yet");
        return;
    }
    bool sent = k && k->cancel_sent_ms;
    bool ours_failed = sent && k->cancel_psp[0] && !strcmp(k->cancel_psp, k->cancel_fail_psp);
    if (ours_failed && auth == PROC_ST_SUCCEEDED) {
        /* the technical cancel failed: captured, the charge stands */
        res->status = PROC_ST_SUCCEEDED;
        snprintf(res->error, sizeof(res->error), "the technical cancel failed (%.100s): the charge stands",
                 k->cancel_reason);
        return;
    }
    if (ours_failed && auth == PROC_ST_NONE && never_debited) {
        /* No debit was ever made, so no create was ever sent (none is
         * before PREPARE), and Adyen has no payment with our reference. */
        res->status = PROC_ST_CANCELED;
        snprintf(res->decline_code, sizeof(res->decline_code), "canceled");
        snprintf(res->error, sizeof(res->error), "no debit was ever made and the technical cancel found no payment");
        return;
    }
    res->status = PROC_ST_PENDING;
    if (sent && now_ms >= k->cancel_sent_ms + (uint64_t)timeout_ms) {
        res->outcome = PROC_STUCK;
        if (ours_failed)
            snprintf(res->error, sizeof(res->error),
                     "the technical cancel failed (%.60s) and no AUTHORISATION webhook came within %lld s: "
                     "check the payment at Adyen",
                     k->cancel_reason, (long long)(timeout_ms / 1000));
        else
            snprintf(res->error, sizeof(res->error),
                     "no webhook decided the technical cancel within %lld s: check the payment at Adyen",
                     (long long)(timeout_ms / 1000));
        return;
    }
    snprintf(res->error, sizeof(res->error), sent ? "waiting for the technical cancel's webhook"
                                                  : "no deciding webhook yet");
}
