/* psp_classify.c - what one processor answer means (docs/processor.md): HTTP
 * status and body mapped to a psp_outcome and, when there is one, the payment
 * object. Pure (no I/O, no clock): psp.c and the unit tests share it. */
#include "psp.h"
#include "proc_util.h"

#include <stdio.h>
#include <string.h>

const char *psp_outcome_name(psp_outcome o)
{
    switch (o) {
    case PSP_PAYMENT: return "payment";
    case PSP_NOT_FOUND: return "not_found";
    case PSP_ALREADY_SUCCEEDED: return "already_succeeded";
    case PSP_CONFLICT: return "conflict";
    case PSP_INVALID: return "invalid";
    case PSP_AUTH: return "auth";
    case PSP_UNSUPPORTED: return "unsupported";
    case PSP_RATE_LIMITED: return "rate_limited";
    case PSP_UNKNOWN: return "unknown";
    }
    return "?";
}

const char *psp_status_name(psp_status s)
{
    switch (s) {
    case PSP_ST_NONE: return "none";
    case PSP_ST_SUCCEEDED: return "succeeded";
    case PSP_ST_DECLINED: return "declined";
    case PSP_ST_PENDING: return "pending";
    case PSP_ST_CANCELED: return "canceled";
    }
    return "?";
}

static bool parse_status(const char *s, psp_status *out)
{
    static const struct { const char *name; psp_status st; } names[] = {
        { "succeeded", PSP_ST_SUCCEEDED }, { "declined", PSP_ST_DECLINED },
        { "pending", PSP_ST_PENDING }, { "canceled", PSP_ST_CANCELED },
    };
    for (size_t i = 0; i < PC_ARRAY_LEN(names); i++)
        if (strcmp(s, names[i].name) == 0) {
            *out = names[i].st;
            return true;
        }
    return false;
}

/*
 * Fill p from a payment object. Required: id, idempotency_key (== gid when
 * gid is given), status (one of the four), amount, currency (3 letters; both
 * may be null when canceled), created. Optional: decline_code (string or
 * null; truncated to fit), refunded (bool). Anything else is ignored. On
 * failure why says what.
 */
static bool parse_payment(const cJSON *o, const char *gid, psp_payment *p, const char **why)
{
    memset(p, 0, sizeof(*p));
    if (!cJSON_IsObject(o)) {
        *why = "payment_not_an_object";
        return false;
    }
    const cJSON *id = cJSON_GetObjectItemCaseSensitive(o, "id");
    const cJSON *key = cJSON_GetObjectItemCaseSensitive(o, "idempotency_key");
    const cJSON *status = cJSON_GetObjectItemCaseSensitive(o, "status");
    const cJSON *amount = cJSON_GetObjectItemCaseSensitive(o, "amount");
    const cJSON *currency = cJSON_GetObjectItemCaseSensitive(o, "currency");
    const cJSON *created = cJSON_GetObjectItemCaseSensitive(o, "created");
    const cJSON *decline = cJSON_GetObjectItemCaseSensitive(o, "decline_code");
    const cJSON *refunded = cJSON_GetObjectItemCaseSensitive(o, "refunded");

    if (!cJSON_IsString(id) || id->valuestring[0] == '\0' ||
        !proc_copy(p->id, sizeof(p->id), id->valuestring)) {
        *why = "payment_bad_id";
        return false;
    }
    if (!cJSON_IsString(key) || !proc_copy(p->idempotency_key, sizeof(p->idempotency_key),
                                          key->valuestring)) {
        *why = "payment_bad_idempotency_key";
        return false;
    }
    if (gid != NULL && strcmp(gid, p->idempotency_key) != 0) {
        *why = "payment_key_mismatch";
        return false;
    }
    if (!cJSON_IsString(status) || !parse_status(status->valuestring, &p->status)) {
        *why = "payment_bad_status";
        return false;
    }
    /* A canceled tombstone (cancel of an unknown key) has no amount or
     * currency: null or absent is accepted there, and only there. */
    bool tombstone_ok = p->status == PSP_ST_CANCELED;
    if (tombstone_ok && (amount == NULL || cJSON_IsNull(amount))) {
        p->amount = 0;
    } else if (!proc_json_int(amount, &p->amount)) {
        *why = "payment_bad_amount";
        return false;
    }
    if (tombstone_ok && (currency == NULL || cJSON_IsNull(currency))) {
        p->currency[0] = '\0';
    } else if (!cJSON_IsString(currency) || strlen(currency->valuestring) != 3 ||
               !proc_copy(p->currency, sizeof(p->currency), currency->valuestring)) {
        *why = "payment_bad_currency";
        return false;
    }
    if (!proc_json_int(created, &p->created)) {
        *why = "payment_bad_created";
        return false;
    }
    if (cJSON_IsString(decline)) {
        snprintf(p->decline_code, sizeof(p->decline_code), "%s", decline->valuestring);
    } else if (decline != NULL && !cJSON_IsNull(decline)) {
        *why = "payment_bad_decline_code";
        return false;
    }
    if (cJSON_IsBool(refunded)) {
        p->refunded = cJSON_IsTrue(refunded);
    } else if (refunded != NULL && !cJSON_IsNull(refunded)) {
        *why = "payment_bad_refunded";
        return false;
    }
    return true;
}

/* error.code of an error body, or NULL. */
static const char *error_code(const cJSON *root)
{
    const cJSON *err = cJSON_GetObjectItemCaseSensitive(root, "error");
    const cJSON *code = cJSON_GetObjectItemCaseSensitive(err, "code");
    return cJSON_IsString(code) ? code->valuestring : NULL;
}

void psp_classify(const char *gid, long http_status, const char *body, size_t len,
                  psp_result *res)
{
    cJSON *root = NULL;
    const char *code = NULL;
    const char *why = NULL;

    res->outcome = PSP_UNKNOWN;
    res->http_status = http_status;
    memset(&res->payment, 0, sizeof(res->payment));
    res->error[0] = '\0';

    if (body != NULL && len > 0)
        root = cJSON_ParseWithLength(body, len);
    code = error_code(root);

    switch (http_status) {
    case 200:
    case 201:
        if (root == NULL) {
            snprintf(res->error, sizeof(res->error), "unparsable_body");
        } else if (!parse_payment(root, gid, &res->payment, &why)) {
            memset(&res->payment, 0, sizeof(res->payment));
            snprintf(res->error, sizeof(res->error), "%s", why);
        } else {
            res->outcome = PSP_PAYMENT;
        }
        break;
    case 404:
        res->outcome = PSP_NOT_FOUND;
        snprintf(res->error, sizeof(res->error), "%s", code ? code : "not_found");
        break;
    case 409:
        if (code != NULL && strcmp(code, "already_succeeded") == 0) {
            /* The answer is only useful with the payment it names. */
            if (parse_payment(cJSON_GetObjectItemCaseSensitive(root, "payment"), gid,
                              &res->payment, &why)) {
                res->outcome = PSP_ALREADY_SUCCEEDED;
                snprintf(res->error, sizeof(res->error), "already_succeeded");
            } else {
                memset(&res->payment, 0, sizeof(res->payment));
                snprintf(res->error, sizeof(res->error), "already_succeeded_%s", why);
            }
        } else {
            res->outcome = PSP_CONFLICT;
            snprintf(res->error, sizeof(res->error), "%s", code ? code : "conflict");
        }
        break;
    case 400:
    case 422:
        res->outcome = PSP_INVALID;
        snprintf(res->error, sizeof(res->error), "%s", code ? code : "invalid_request");
        break;
    case 401:
    case 403:
        res->outcome = PSP_AUTH;
        snprintf(res->error, sizeof(res->error), "%s", code ? code : "unauthorized");
        break;
    case 429:
        res->outcome = PSP_RATE_LIMITED;
        snprintf(res->error, sizeof(res->error), "%s", code ? code : "rate_limited");
        break;
    case 501:
        res->outcome = PSP_UNSUPPORTED;
        snprintf(res->error, sizeof(res->error), "%s", code ? code : "not_implemented");
        break;
    default:
        /* 5xx, and anything the contract does not name (3xx: redirects
         * are off): the outcome is unknown. */
        if (code != NULL)
            snprintf(res->error, sizeof(res->error), "http_%ld %s", http_status, code);
        else
            snprintf(res->error, sizeof(res->error), "http_%ld", http_status);
        break;
    }
    cJSON_Delete(root);
}
