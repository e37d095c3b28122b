/*
 * test_proc_adyen.c - the Adyen adapter's pure parts (proc_adyen_api.c):
 * every kind of /payments and /cancels answer mapped to an outcome, as a
 * table; notification signatures against vectors computed with Python's
 * hmac (Adyen's documented signing string, hex key, Base64); events; and the
 * decision from what the webhooks said (adyen_decide), including the race of
 * an AUTHORISATION with a technical cancel.
 */
#include "proc_adyen.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <stdio.h>
#include <string.h>

#define GID "pc:n1:abc"
#define KEYHEX "44782DEF547AAA06C910C43932B1EB0C71FC68D9D0C057550C48EC2ACF6BA056"
#define SIG_AUTH "TfoKmnOozhkepfWb5ry3UgYnJMTpDhIkw7ELUoBrYOs="
#define SIG_TC_FAIL "69D7+DeZX3wKvVYsvlwVTXYNNrFxt5fjzVE2OuHLo+k="

#define PAY(rc, extra)                                                                                         \
    "{\"additionalData\":{},\"amount\":{\"currency\":\"EUR\",\"value\":1250},\"merchantReference\":\"" GID "\"," \
    "\"pspReference\":\"8800000000000001\",\"resultCode\":\"" rc "\"" extra "}"

static void test_payment_table(void **state)
{
    (void)state;
    static const struct {
        long http;
        const char *body;
        const char *echo;
        proc_outcome outcome;
        proc_status status;
        const char *decline;
        bool ok;
    } t[] = {
        { 200, PAY("Authorised", ""), GID, PROC_PAYMENT, PROC_ST_SUCCEEDED, "", true },
        { 200, PAY("Authorised", ""), NULL, PROC_PAYMENT, PROC_ST_SUCCEEDED, "", true },
        { 200, PAY("Refused", ",\"refusalReason\":\"Not enough balance\",\"refusalReasonCode\":\"12\""), GID,
          PROC_PAYMENT, PROC_ST_DECLINED, "Not enough balance", true },
        { 200, PAY("Refused", ""), GID, PROC_PAYMENT, PROC_ST_DECLINED, "Refused", true },
        { 200, PAY("Error", ",\"refusalReason\":\"Acquirer Error\""), GID, PROC_PAYMENT, PROC_ST_DECLINED,
          "Acquirer Error", true },
        { 200, PAY("Cancelled", ""), GID, PROC_PAYMENT, PROC_ST_CANCELED, "canceled", true },
        { 200, PAY("Pending", ""), GID, PROC_PAYMENT, PROC_ST_PENDING, "", true },
        { 200, PAY("Received", ""), GID, PROC_PAYMENT, PROC_ST_PENDING, "", true },
        { 200, PAY("RedirectShopper", ""), GID, PROC_PAYMENT, PROC_ST_PENDING, "", true },
        /* bad answers: unknown, never a decline */
        { 200, PAY("Teleported", ""), GID, PROC_UNKNOWN, PROC_ST_NONE, "", false },
        { 200, PAY("Refused", ""), "pc:n1:other", PROC_UNKNOWN, PROC_ST_NONE, "", false },
        { 200,
          "{\"amount\":{\"currency\":\"EUR\",\"value\":1250},\"merchantReference\":\"pc:n1:other\","
          "\"pspReference\":\"1\",\"resultCode\":\"Refused\"}",
          NULL, PROC_UNKNOWN, PROC_ST_NONE, "", false },
        { 200,
          "{\"amount\":{\"currency\":\"EUR\",\"value\":999},\"merchantReference\":\"" GID "\","
          "\"pspReference\":\"1\",\"resultCode\":\"Authorised\"}",
          NULL, PROC_UNKNOWN, PROC_ST_NONE, "", false },
        { 200, "{\"status\":422,\"errorCode\":\"101\",\"message\":\"Invalid card\",\"errorType\":\"validation\"}",
          NULL, PROC_UNKNOWN, PROC_ST_NONE, "", false },
        { 200, "{\"resultCode\":", NULL, PROC_UNKNOWN, PROC_ST_NONE, "", false },
        { 200, "", NULL, PROC_UNKNOWN, PROC_ST_NONE, "", false },
        { 200, "{\"merchantReference\":\"" GID "\",\"resultCode\":\"Authorised\"}", NULL, PROC_UNKNOWN, PROC_ST_NONE,
          "", false },
        { 422, "<html>", NULL, PROC_UNKNOWN, PROC_ST_NONE, "", false },
        { 404, "{\"status\":404,\"errorCode\":\"x\",\"message\":\"m\",\"errorType\":\"validation\"}", NULL,
          PROC_UNKNOWN, PROC_ST_NONE, "", false },
        /* errors */
        { 422, "{\"status\":422,\"errorCode\":\"101\",\"message\":\"Invalid card number\",\"errorType\":\"validation\"}",
          NULL, PROC_INVALID, PROC_ST_NONE, "", true },
        { 400, "{\"status\":400,\"errorCode\":\"702\",\"message\":\"Unable to parse\",\"errorType\":\"validation\"}",
          NULL, PROC_INVALID, PROC_ST_NONE, "", true },
        { 401, "{\"status\":401,\"errorCode\":\"000\",\"message\":\"Unauthorized\",\"errorType\":\"security\"}",
          NULL, PROC_AUTH, PROC_ST_NONE, "", true },
        { 429, "", NULL, PROC_RATE_LIMITED, PROC_ST_NONE, "", true },
        { 500, "{\"status\":500,\"errorCode\":\"905\",\"message\":\"x\",\"errorType\":\"internal\"}", NULL,
          PROC_UNKNOWN, PROC_ST_NONE, "", true },
        { 503, "", NULL, PROC_UNKNOWN, PROC_ST_NONE, "", true },
    };
    for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++) {
        proc_result r;
        bool ok = adyen_classify_payment(GID, 1250, t[i].http, t[i].body, strlen(t[i].body), t[i].echo, &r);
        if (ok != t[i].ok || r.outcome != t[i].outcome || r.status != t[i].status ||
            strcmp(r.decline_code, t[i].decline) != 0)
            fail_msg("case %zu: ok=%d outcome=%s status=%s decline=%s error=%s", i, ok, proc_outcome_name(r.outcome),
                     proc_status_name(r.status), r.decline_code, r.error);
        if (r.outcome == PROC_PAYMENT)
            assert_string_equal(r.id, "8800000000000001");
        else
            assert_string_equal(r.id, "");
    }
}

static void test_cancel_answer(void **state)
{
    (void)state;
    proc_result r;
    char psp[64];
    const char *ok = "{\"merchantAccount\":\"M\",\"paymentReference\":\"" GID "\",\"pspReference\":\"8900000000000007\","
                     "\"status\":\"received\"}";
    assert_true(adyen_classify_cancel(GID, 201, ok, strlen(ok), &r, psp));
    assert_int_equal(r.outcome, PROC_PAYMENT);
    assert_int_equal(r.status, PROC_ST_PENDING);
    assert_string_equal(psp, "8900000000000007");
    const char *other = "{\"paymentReference\":\"x\",\"pspReference\":\"1\",\"status\":\"received\"}";
    assert_false(adyen_classify_cancel(GID, 201, other, strlen(other), &r, psp));
    assert_int_equal(r.outcome, PROC_UNKNOWN);
    const char *nostatus = "{\"paymentReference\":\"" GID "\",\"pspReference\":\"1\"}";
    assert_false(adyen_classify_cancel(GID, 201, nostatus, strlen(nostatus), &r, psp));
    assert_true(adyen_classify_cancel(GID, 500, "", 0, &r, psp));
    assert_int_equal(r.outcome, PROC_UNKNOWN);
}

static void test_bodies(void **state)
{
    (void)state;
    cJSON *m = cJSON_Parse("{\"zeta\":\"1\",\"alpha\":\"2\"}");
    proc_req req = { .gid = GID, .amount = 1250, .currency = "EUR", .account = "acct-1", .metadata = m };
    sbuf b;
    sbuf_init(&b);
    assert_true(adyen_payment_body(&req, "PspSimMerchant", &b));
    assert_string_equal(sbuf_str(&b),
                        "{\"amount\":{\"currency\":\"EUR\",\"value\":1250},\"paymentMethod\":{\"type\":\"scheme\"},"
                        "\"reference\":\"" GID "\",\"merchantAccount\":\"PspSimMerchant\",\"shopperReference\":"
                        "\"acct-1\",\"metadata\":{\"alpha\":\"2\",\"zeta\":\"1\"}}");
    assert_false(adyen_payment_body(&req, "", &b));               /* no merchant account */
    char longgid[80];
    memset(longgid, 'g', 65);
    longgid[65] = '\0';
    req.gid = longgid;
    assert_false(adyen_payment_body(&req, "M", &b));              /* over Adyen's 64-character key */
    assert_true(adyen_cancel_body(GID, "M", &b));
    assert_string_equal(sbuf_str(&b), "{\"merchantAccount\":\"M\",\"paymentReference\":\"" GID "\"}");
    sbuf_free(&b);
    cJSON_Delete(m);
}

#define ITEM(psp, orig, ev, success, sig)                                                                        \
    "{\"NotificationRequestItem\":{\"additionalData\":{\"hmacSignature\":\"" sig "\"},\"amount\":{\"currency\":"  \
    "\"EUR\",\"value\":1250},\"eventCode\":\"" ev "\",\"eventDate\":\"2026-01-01T00:00:00+00:00\","               \
    "\"merchantAccountCode\":\"PspSimMerchant\",\"merchantReference\":\"" GID "\"" orig ",\"pspReference\":\"" psp \
    "\",\"reason\":\"\",\"success\":\"" success "\"}}"

static void test_notifications(void **state)
{
    (void)state;
    unsigned char key[ADYEN_HMAC_KEY_MAX];
    size_t klen;
    assert_true(adyen_hmac_key(KEYHEX, key, &klen));
    assert_int_equal(klen, 32);
    assert_false(adyen_hmac_key("abc", key, &klen));
    assert_false(adyen_hmac_key("zz", key, &klen));
    proc_event ev[4];
    int n;
    char err[200];
    const char *two = "{\"live\":\"false\",\"notificationItems\":[" ITEM("8800000000000001", "", "AUTHORISATION",
                                                                           "true", SIG_AUTH) ","
                      ITEM("8900000000000007", ",\"originalReference\":\"8800000000000001\"", "TECHNICAL_CANCEL",
                           "false", SIG_TC_FAIL) "]}";
    assert_int_equal(adyen_parse_notification(key, klen, "PspSimMerchant", two, strlen(two), ev, 4, &n, err,
                                              sizeof(err)), PROC_WH_OK);
    assert_int_equal(n, 2);
    assert_string_equal(ev[0].id, "8800000000000001:AUTHORISATION:true");
    assert_string_equal(ev[0].gid, GID);
    assert_string_equal(ev[0].processor_ref, "8800000000000001");
    assert_int_equal(ev[0].status, PROC_ST_SUCCEEDED);
    assert_string_equal(ev[1].id, "8900000000000007:TECHNICAL_CANCEL:false");
    assert_string_equal(ev[1].processor_ref, "8800000000000001");
    assert_true(ev[1].cancel && !ev[1].success && ev[1].status == PROC_ST_NONE);
    /* one item wrongly signed: the whole delivery is refused */
    const char *forged = "{\"live\":\"false\",\"notificationItems\":[" ITEM("8800000000000001", "", "AUTHORISATION",
                                                                              "true", SIG_AUTH) ","
                         ITEM("8800000000000002", "", "AUTHORISATION", "true", SIG_AUTH) "]}";
    assert_int_equal(adyen_parse_notification(key, klen, "PspSimMerchant", forged, strlen(forged), ev, 4, &n, err,
                                              sizeof(err)), PROC_WH_UNSIGNED);
    assert_int_equal(n, 0);
    /* changed outcome, same signature */
    const char *flipped = "{\"notificationItems\":[" ITEM("8800000000000001", "", "AUTHORISATION", "false", SIG_AUTH)
                          "]}";
    assert_int_equal(adyen_parse_notification(key, klen, "PspSimMerchant", flipped, strlen(flipped), ev, 4, &n, err,
                                              sizeof(err)), PROC_WH_UNSIGNED);
    /* unsigned */
    const char *bare = "{\"notificationItems\":[{\"NotificationRequestItem\":{\"amount\":{\"currency\":\"EUR\","
                       "\"value\":1},\"eventCode\":\"AUTHORISATION\",\"pspReference\":\"1\",\"success\":\"true\"}}]}";
    assert_int_equal(adyen_parse_notification(key, klen, "PspSimMerchant", bare, strlen(bare), ev, 4, &n, err,
                                              sizeof(err)), PROC_WH_UNSIGNED);
    /* another merchant account's: authentic, not ours to keep */
    assert_int_equal(adyen_parse_notification(key, klen, "OtherMerchant", two, strlen(two), ev, 4, &n, err,
                                              sizeof(err)), PROC_WH_OK);
    assert_int_equal(n, 0);
    assert_int_equal(adyen_parse_notification(key, klen, "M", "[]", 2, ev, 4, &n, err, sizeof(err)),
                     PROC_WH_MALFORMED);
}

static proc_event event(const char *id, const char *kind, bool success, bool cancel)
{
    proc_event e = { .success = success, .cancel = cancel };
    snprintf(e.id, sizeof(e.id), "%s", id);
    snprintf(e.kind, sizeof(e.kind), "%s", kind);
    snprintf(e.gid, sizeof(e.gid), "%s", GID);
    snprintf(e.processor_ref, sizeof(e.processor_ref), "8800000000000001");
    e.status = !strcmp(kind, "AUTHORISATION") ? (success ? PROC_ST_SUCCEEDED : PROC_ST_DECLINED)
                                             : (success ? PROC_ST_CANCELED : PROC_ST_NONE);
    return e;
}

static void test_decide(void **state)
{
    (void)state;
    proc_result r;
    proc_known k;
    const int64_t T = 5000;           /* webhook timeout */

    /* nothing known: pending before and after the deadline */
    adyen_decide(NULL, -10000, 1000, T, false, &r);
    assert_true(r.outcome == PROC_PAYMENT && r.status == PROC_ST_PENDING && r.local);
    adyen_decide(NULL, 10, 1000, T, false, &r);
    assert_true(r.outcome == PROC_PAYMENT && r.status == PROC_ST_PENDING);

    /* AUTHORISATION success decides well before the deadline only */
    memset(&k, 0, sizeof(k));
    proc_event a = event("8800000000000001:AUTHORISATION:true", "AUTHORISATION", true, false);
    adyen_note_event(&k, &a);
    adyen_decide(&k, -10000, 1000, T, false, &r);
    assert_int_equal(r.status, PROC_ST_SUCCEEDED);
    assert_string_equal(r.id, "8800000000000001");
    adyen_decide(&k, -500, 1000, T, false, &r);          /* a technical cancel may be under way */
    assert_int_equal(r.status, PROC_ST_PENDING);

    /* our cancel failed: the charge stands */
    snprintf(k.cancel_psp, sizeof(k.cancel_psp), "8900000000000007");
    k.cancel_sent_ms = 1000;
    proc_event f = event("8900000000000007:TECHNICAL_CANCEL:false", "TECHNICAL_CANCEL", false, true);
    adyen_note_event(&k, &f);
    adyen_decide(&k, 10, 1200, T, false, &r);
    assert_int_equal(r.status, PROC_ST_SUCCEEDED);
    /* an older cancel's failure does not count for ours */
    snprintf(k.cancel_psp, sizeof(k.cancel_psp), "8900000000000009");
    adyen_decide(&k, 10, 1200, T, false, &r);
    assert_true(r.outcome == PROC_PAYMENT && r.status == PROC_ST_PENDING);
    /* ... and without a deciding webhook within the bound: stuck */
    adyen_decide(&k, 10, 1000 + T, T, false, &r);
    assert_int_equal(r.outcome, PROC_STUCK);

    /* a cancel that succeeded wins over an AUTHORISATION, in either order */
    proc_event ok = event("8900000000000009:TECHNICAL_CANCEL:true", "TECHNICAL_CANCEL", true, true);
    adyen_note_event(&k, &ok);
    adyen_decide(&k, 10, 1200, T, false, &r);
    assert_int_equal(r.status, PROC_ST_CANCELED);
    memset(&k, 0, sizeof(k));
    adyen_note_event(&k, &ok);
    adyen_note_event(&k, &a);
    adyen_decide(&k, -10000, 1200, T, false, &r);
    assert_int_equal(r.status, PROC_ST_CANCELED);

    /* a refused AUTHORISATION decides at any time */
    memset(&k, 0, sizeof(k));
    proc_event no = event("8800000000000001:AUTHORISATION:false", "AUTHORISATION", false, false);
    snprintf(no.reason, sizeof(no.reason), "Not enough balance");
    adyen_note_event(&k, &no);
    adyen_decide(&k, 10, 1200, T, false, &r);
    assert_int_equal(r.status, PROC_ST_DECLINED);
    assert_string_equal(r.decline_code, "Not enough balance");

    /* our cancel failed, no AUTHORISATION: wait, then stuck */
    memset(&k, 0, sizeof(k));
    snprintf(k.cancel_psp, sizeof(k.cancel_psp), "8900000000000007");
    k.cancel_sent_ms = 1000;
    adyen_note_event(&k, &f);
    adyen_decide(&k, 10, 2000, T, false, &r);
    assert_true(r.outcome == PROC_PAYMENT && r.status == PROC_ST_PENDING);
    adyen_decide(&k, 10, 1000 + T, T, false, &r);
    assert_int_equal(r.outcome, PROC_STUCK);
    /* ... but with no debit ever made, no create was sent: conclusive */
    adyen_decide(&k, 10, 2000, T, true, &r);
    assert_true(r.outcome == PROC_PAYMENT && r.status == PROC_ST_CANCELED);
    /* (an AUTHORISATION would still say otherwise: a charge without a debit) */
    proc_event a2 = event("8800000000000001:AUTHORISATION:true", "AUTHORISATION", true, false);
    adyen_note_event(&k, &a2);
    adyen_decide(&k, 10, 2000, T, true, &r);
    assert_int_equal(r.status, PROC_ST_SUCCEEDED);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_payment_table), cmocka_unit_test(test_cancel_answer), cmocka_unit_test(test_bodies),
        cmocka_unit_test(test_notifications), cmocka_unit_test(test_decide),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
