/*
 * test_proc_stripe.c - the Stripe adapter's pure parts (proc_stripe_api.c):
 * every kind of answer mapped to an outcome, as a table; the create's form
 * body (the same payment gives the same body); webhook signatures against a
 * vector computed with Python's hmac; event parsing.
 */
#include "proc_stripe.h"
#include "proc_util.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <stdio.h>
#include <string.h>

#define GID "pc:n1:abcdefghijklmnopqrstuvwxyz"

#define PI(status, extra)                                                                                   \
    "{\"id\":\"pi_000000000000000000000001\",\"object\":\"payment_intent\",\"amount\":500,\"currency\":\"eur\"," \
    "\"status\":\"" status "\",\"metadata\":{\"gid\":\"" GID "\"}" extra "}"
#define PI_OTHER "{\"id\":\"pi_2\",\"object\":\"payment_intent\",\"amount\":500,\"currency\":\"eur\"," \
                 "\"status\":\"succeeded\",\"metadata\":{\"gid\":\"pc:n1:other\"}}"
#define LPE ",\"last_payment_error\":{\"code\":\"card_declined\",\"decline_code\":\"insufficient_funds\"}"

static void test_classify_table(void **state)
{
    (void)state;
    static const struct {
        stripe_call call;
        long http;
        const char *body;
        bool replayed;
        proc_outcome outcome;
        proc_status status;
        const char *decline;
        bool ok;                    /* a well-formed answer */
        bool r5;
    } t[] = {
        /* 200: the intent's status decides */
        { STRIPE_CREATE, 200, PI("succeeded", ""), false, PROC_PAYMENT, PROC_ST_SUCCEEDED, "", true, false },
        { STRIPE_CREATE, 200, PI("succeeded", ""), true, PROC_PAYMENT, PROC_ST_SUCCEEDED, "", true, false },
        { STRIPE_RETRIEVE, 200, PI("processing", ""), false, PROC_PAYMENT, PROC_ST_PENDING, "", true, false },
        { STRIPE_RETRIEVE, 200, PI("requires_action", ""), false, PROC_PAYMENT, PROC_ST_PENDING, "", true, false },
        { STRIPE_RETRIEVE, 200, PI("requires_capture", ""), false, PROC_PAYMENT, PROC_ST_PENDING, "", true, false },
        { STRIPE_RETRIEVE, 200, PI("requires_payment_method", LPE), false, PROC_PAYMENT, PROC_ST_DECLINED,
          "insufficient_funds", true, false },
        { STRIPE_RETRIEVE, 200, PI("requires_payment_method", ""), false, PROC_PAYMENT, PROC_ST_DECLINED, "declined",
          true, false },
        { STRIPE_CANCEL, 200, PI("canceled", ""), false, PROC_PAYMENT, PROC_ST_CANCELED, "canceled", true, false },
        /* 402 card_error: declined, with the intent */
        { STRIPE_CREATE, 402,
          "{\"error\":{\"type\":\"card_error\",\"code\":\"card_declined\",\"decline_code\":\"generic_decline\","
          "\"payment_intent\":" PI("requires_payment_method", LPE) "}}",
          false, PROC_PAYMENT, PROC_ST_DECLINED, "generic_decline", true, false },
        /* bad answers: unknown, never a decline */
        { STRIPE_CREATE, 402, "{\"error\":{\"type\":\"card_error\",\"code\":\"card_declined\"}}", false, PROC_UNKNOWN,
          PROC_ST_NONE, "", false, false },
        { STRIPE_CREATE, 200, "{\"id\":\"pi_1\",", false, PROC_UNKNOWN, PROC_ST_NONE, "", false, false },
        { STRIPE_CREATE, 200, "", false, PROC_UNKNOWN, PROC_ST_NONE, "", false, false },
        { STRIPE_CREATE, 200, "{\"error\":{\"type\":\"api_error\",\"message\":\"x\"}}", false, PROC_UNKNOWN,
          PROC_ST_NONE, "", false, false },
        { STRIPE_CREATE, 200, PI_OTHER, false, PROC_UNKNOWN, PROC_ST_NONE, "", false, false },
        { STRIPE_CREATE, 200, PI("teleported", ""), false, PROC_UNKNOWN, PROC_ST_NONE, "", false, false },
        { STRIPE_CREATE, 200,
          "{\"id\":\"pi_1\",\"object\":\"payment_intent\",\"amount\":999,\"currency\":\"eur\",\"status\":\"succeeded\","
          "\"metadata\":{\"gid\":\"" GID "\"}}",
          false, PROC_UNKNOWN, PROC_ST_NONE, "", false, false },
        { STRIPE_CREATE, 402, "not json", false, PROC_UNKNOWN, PROC_ST_NONE, "", false, false },
        { STRIPE_RETRIEVE, 404, "{\"error\":{\"type\":\"invalid_request_error\",\"code\":\"resource_missing\"}}", false,
          PROC_UNKNOWN, PROC_ST_NONE, "", false, false },
        /* idempotency */
        { STRIPE_CREATE, 400, "{\"error\":{\"type\":\"idempotency_error\",\"message\":\"Keys for...\"}}", false,
          PROC_CONFLICT, PROC_ST_NONE, "", true, false },
        { STRIPE_CREATE, 409,
          "{\"error\":{\"type\":\"invalid_request_error\",\"code\":\"idempotency_key_in_use\"}}", false, PROC_UNKNOWN,
          PROC_ST_NONE, "", true, false },
        /* validation */
        { STRIPE_CREATE, 400,
          "{\"error\":{\"type\":\"invalid_request_error\",\"code\":\"parameter_invalid_integer\"}}", false,
          PROC_INVALID, PROC_ST_NONE, "", true, false },
        /* 5xx: unknown; replayed: stored after execution began */
        { STRIPE_CREATE, 500, "{\"error\":{\"type\":\"api_error\"}}", false, PROC_UNKNOWN, PROC_ST_NONE, "", true,
          false },
        { STRIPE_CREATE, 500, "{\"error\":{\"type\":\"api_error\"}}", true, PROC_UNKNOWN, PROC_ST_NONE, "", true,
          true },
        { STRIPE_CREATE, 503, "<html>", false, PROC_UNKNOWN, PROC_ST_NONE, "", true, false },
        /* 429 and credentials */
        { STRIPE_CREATE, 429, "{\"error\":{\"type\":\"invalid_request_error\",\"code\":\"rate_limit\"}}", false,
          PROC_RATE_LIMITED, PROC_ST_NONE, "", true, false },
        { STRIPE_CREATE, 429, "", false, PROC_RATE_LIMITED, PROC_ST_NONE, "", true, false },
        { STRIPE_RETRIEVE, 401, "{\"error\":{\"type\":\"invalid_request_error\"}}", false, PROC_AUTH, PROC_ST_NONE,
          "", true, false },
        /* cancel in a status that does not allow it */
        { STRIPE_CANCEL, 400,
          "{\"error\":{\"type\":\"invalid_request_error\",\"code\":\"payment_intent_unexpected_state\","
          "\"payment_intent\":" PI("succeeded", "") "}}",
          false, PROC_ALREADY_SUCCEEDED, PROC_ST_SUCCEEDED, "", true, false },
        { STRIPE_CANCEL, 400,
          "{\"error\":{\"type\":\"invalid_request_error\",\"code\":\"payment_intent_unexpected_state\","
          "\"payment_intent\":" PI("processing", "") "}}",
          false, PROC_PAYMENT, PROC_ST_PENDING, "", true, false },
        { STRIPE_CANCEL, 400,
          "{\"error\":{\"type\":\"invalid_request_error\",\"code\":\"payment_intent_unexpected_state\","
          "\"payment_intent\":" PI("canceled", "") "}}",
          false, PROC_PAYMENT, PROC_ST_CANCELED, "canceled", true, false },
        { STRIPE_CANCEL, 400,
          "{\"error\":{\"type\":\"invalid_request_error\",\"code\":\"payment_intent_unexpected_state\"}}", false,
          PROC_UNKNOWN, PROC_ST_NONE, "", false, false },
        /* anything else unnamed */
        { STRIPE_CREATE, 302, "", false, PROC_UNKNOWN, PROC_ST_NONE, "", false, false },
    };
    for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++) {
        proc_result r;
        bool r5 = false;
        bool ok = stripe_classify(t[i].call, GID, 500, t[i].http, t[i].body, strlen(t[i].body), t[i].replayed, &r,
                                  &r5);
        if (ok != t[i].ok || r.outcome != t[i].outcome || r.status != t[i].status ||
            strcmp(r.decline_code, t[i].decline) != 0 || r5 != t[i].r5)
            fail_msg("case %zu: ok=%d outcome=%s status=%s decline=%s r5=%d error=%s", i, ok,
                     proc_outcome_name(r.outcome), proc_status_name(r.status), r.decline_code, r5, r.error);
        if (r.outcome == PROC_PAYMENT || r.outcome == PROC_ALREADY_SUCCEEDED) {
            assert_string_equal(r.id, "pi_000000000000000000000001");
            assert_string_equal(r.currency, "EUR");
            assert_int_equal(r.amount, 500);
        } else {
            assert_string_equal(r.id, "");
        }
        assert_int_equal(r.http_status, t[i].http);
    }
}

static void test_search(void **state)
{
    (void)state;
    proc_result r;
    stripe_found f;
    const char *one = "{\"object\":\"search_result\",\"data\":[" PI("succeeded", "") "],\"has_more\":false}";
    assert_true(stripe_classify_search(GID, 200, one, strlen(one), &f, &r));
    assert_int_equal(r.outcome, PROC_PAYMENT);
    assert_int_equal(f.n, 1);
    assert_string_equal(f.id, "pi_000000000000000000000001");

    const char *none = "{\"object\":\"search_result\",\"data\":[],\"has_more\":false,\"next_page\":null}";
    assert_true(stripe_classify_search(GID, 200, none, strlen(none), &f, &r));
    assert_int_equal(r.outcome, PROC_PAYMENT);
    assert_int_equal(f.n, 0);

    /* another payment's intent in the results is not ours */
    const char *other = "{\"object\":\"search_result\",\"data\":[" PI_OTHER "],\"has_more\":false}";
    assert_true(stripe_classify_search(GID, 200, other, strlen(other), &f, &r));
    assert_int_equal(f.n, 0);

    const char *two = "{\"object\":\"search_result\",\"data\":[" PI("succeeded", "") "," PI("canceled", "")
                      "],\"has_more\":false}";
    assert_true(stripe_classify_search(GID, 200, two, strlen(two), &f, &r));
    assert_int_equal(f.n, 2);

    const char *list = "{\"object\":\"list\",\"data\":[]}";          /* not a search result */
    assert_false(stripe_classify_search(GID, 200, list, strlen(list), &f, &r));
    assert_int_equal(r.outcome, PROC_UNKNOWN);
    assert_false(stripe_classify_search(GID, 200, "{", 1, &f, &r));
    assert_int_equal(r.outcome, PROC_UNKNOWN);

    const char *e429 = "{\"error\":{\"type\":\"invalid_request_error\",\"code\":\"rate_limit\"}}";
    assert_true(stripe_classify_search(GID, 429, e429, strlen(e429), &f, &r));
    assert_int_equal(r.outcome, PROC_RATE_LIMITED);
    assert_true(stripe_classify_search(GID, 500, "", 0, &f, &r));
    assert_int_equal(r.outcome, PROC_UNKNOWN);
}

static void test_create_body(void **state)
{
    (void)state;
    cJSON *m1 = cJSON_Parse("{\"zeta\":\"1\",\"alpha\":\"x y&z\",\"gid\":\"forged\",\"sim\":\"decline\"}");
    cJSON *m2 = cJSON_Parse("{\"sim\":\"decline\",\"gid\":\"forged\",\"alpha\":\"x y&z\",\"zeta\":\"1\"}");
    proc_req a = { .gid = GID, .payment_id = "11111111-2222-3333-4444-555555555555", .amount = 1250,
                   .currency = "EUR", .account = "acct-1", .reference = "order 7", .metadata = m1 };
    proc_req b = a;
    b.metadata = m2;
    sbuf x, y;
    sbuf_init(&x);
    sbuf_init(&y);
    assert_true(stripe_create_body(&a, "pm_card_visa", &x));
    assert_true(stripe_create_body(&b, "pm_card_visa", &y));
    assert_string_equal(sbuf_str(&x), sbuf_str(&y));     /* metadata order does not matter */
    assert_string_equal(sbuf_str(&x),
                        "amount=1250&currency=eur&confirm=true&payment_method=pm_card_visa"
                        "&metadata%5Balpha%5D=x%20y%26z&metadata%5Bsim%5D=decline&metadata%5Bzeta%5D=1"
                        "&metadata%5Bgid%5D=pc%3An1%3Aabcdefghijklmnopqrstuvwxyz"
                        "&metadata%5Bpayment_id%5D=11111111-2222-3333-4444-555555555555"
                        "&metadata%5Baccount%5D=acct-1&metadata%5Breference%5D=order%207");
    /* the payment method from metadata wins */
    cJSON *m3 = cJSON_Parse("{\"payment_method\":\"pm_card_chargeDeclined\"}");
    a.metadata = m3;
    assert_true(stripe_create_body(&a, "pm_card_visa", &x));
    assert_non_null(strstr(sbuf_str(&x), "payment_method=pm_card_chargeDeclined&"));
    /* nothing to send without currency or amount */
    a.currency = NULL;
    assert_false(stripe_create_body(&a, "pm_card_visa", &x));
    sbuf_free(&x);
    sbuf_free(&y);
    cJSON_Delete(m1);
    cJSON_Delete(m2);
    cJSON_Delete(m3);
}

#define EV_BODY                                                                                                    \
    "{\"id\":\"evt_1\",\"object\":\"event\",\"type\":\"payment_intent.succeeded\",\"data\":{\"object\":{\"id\":" \
    "\"pi_123\",\"object\":\"payment_intent\",\"amount\":500,\"currency\":\"eur\",\"status\":\"succeeded\","       \
    "\"metadata\":{\"gid\":\"pc:n1:abc\"}}}}"
/* hmac.new(b"whsec_test_secret", b"1700000000." + body, sha256).hexdigest() in Python */
#define EV_SIG "5f7ed658e17963011b64123b0c664896304b1327400a2d8bd35594d825cd1ef6"

static void test_signature(void **state)
{
    (void)state;
    char err[200];
    const char *body = EV_BODY;
    size_t len = strlen(body);
    const char *sec = "whsec_test_secret";
    assert_int_equal(stripe_verify_signature(sec, "t=1700000000,v1=" EV_SIG, body, len, 1700000100, 300, err,
                                             sizeof(err)), PROC_WH_OK);
    /* rotation: one of several v1 matches; v0 is ignored */
    assert_int_equal(stripe_verify_signature(sec, "t=1700000000,v1=" "0000000000000000000000000000000000000000000000000000000000000000" ",v0=ab,v1=" EV_SIG, body,
                                             len, 1700000000, 300, err, sizeof(err)), PROC_WH_OK);
    /* outside the tolerance */
    assert_int_equal(stripe_verify_signature(sec, "t=1700000000,v1=" EV_SIG, body, len, 1700000301, 300, err,
                                             sizeof(err)), PROC_WH_UNSIGNED);
    /* a changed body, another secret, no signature, no header, no secret */
    char changed[sizeof(EV_BODY)];
    memcpy(changed, body, len + 1);
    changed[len - 5] = 'X';
    assert_int_equal(stripe_verify_signature(sec, "t=1700000000,v1=" EV_SIG, changed, len, 1700000000, 300, err,
                                             sizeof(err)), PROC_WH_UNSIGNED);
    assert_int_equal(stripe_verify_signature("whsec_other", "t=1700000000,v1=" EV_SIG, body, len, 1700000000, 300,
                                             err, sizeof(err)), PROC_WH_UNSIGNED);
    assert_int_equal(stripe_verify_signature(sec, "t=1700000000", body, len, 1700000000, 300, err, sizeof(err)),
                     PROC_WH_UNSIGNED);
    assert_int_equal(stripe_verify_signature(sec, NULL, body, len, 1700000000, 300, err, sizeof(err)),
                     PROC_WH_UNSIGNED);
    assert_int_equal(stripe_verify_signature("", "t=1700000000,v1=" EV_SIG, body, len, 1700000000, 300, err,
                                             sizeof(err)), PROC_WH_UNSIGNED);
}

static void test_event(void **state)
{
    (void)state;
    proc_event ev;
    int n;
    char err[200];
    assert_int_equal(stripe_parse_event(EV_BODY, strlen(EV_BODY), &ev, &n, err, sizeof(err)), PROC_WH_OK);
    assert_int_equal(n, 1);
    assert_string_equal(ev.id, "evt_1");
    assert_string_equal(ev.gid, "pc:n1:abc");
    assert_string_equal(ev.processor_ref, "pi_123");
    assert_string_equal(ev.kind, "payment_intent.succeeded");
    assert_int_equal(ev.status, PROC_ST_SUCCEEDED);
    assert_string_equal(ev.currency, "EUR");
    const char *other = "{\"id\":\"evt_2\",\"object\":\"event\",\"type\":\"charge.succeeded\",\"data\":{}}";
    assert_int_equal(stripe_parse_event(other, strlen(other), &ev, &n, err, sizeof(err)), PROC_WH_OK);
    assert_int_equal(n, 0);
    assert_int_equal(stripe_parse_event("[]", 2, &ev, &n, err, sizeof(err)), PROC_WH_MALFORMED);
    const char *nopi = "{\"id\":\"evt_3\",\"object\":\"event\",\"type\":\"payment_intent.created\",\"data\":{}}";
    assert_int_equal(stripe_parse_event(nopi, strlen(nopi), &ev, &n, err, sizeof(err)), PROC_WH_MALFORMED);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_classify_table), cmocka_unit_test(test_search), cmocka_unit_test(test_create_body),
        cmocka_unit_test(test_signature),      cmocka_unit_test(test_event),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
