/*
 * proc_stripe.h - the Stripe adapter's pure parts (proc_stripe_api.c):
 * request bodies, the classification of every answer, and webhook
 * signatures and events. No I/O and no clock, so that a table of answers
 * can test them (test/unit/test_proc_stripe.c). The adapter itself
 * (proc_stripe.c) is behind proc.h. docs/processors.md has the mapping and
 * its sources.
 */
#ifndef PAYCOORD_PROC_STRIPE_H
#define PAYCOORD_PROC_STRIPE_H

#include "proc.h"
#include "sbuf.h"

typedef enum { STRIPE_CREATE = 0, STRIPE_RETRIEVE, STRIPE_CANCEL } stripe_call;

/*
 * The form body of a create: amount, currency (lower case), confirm=true,
 * payment_method (metadata "payment_method", else default_pm), and metadata:
 * the pay request's (keys in byte order) with ours on top (gid, payment_id,
 * account, reference). The same payment always gives the same body, so a
 * replay carries exactly the first request's parameters. False when a
 * required field is missing (nothing to replay).
 */
bool stripe_create_body(const proc_req *req, const char *default_pm, sbuf *out);

/*
 * Classify one answer to a create, a retrieve or a cancel of a
 * PaymentIntent (docs/processors.md, "The Stripe adapter"). gid, when not
 * NULL, must be the intent's metadata gid; amount, when > 0, its amount;
 * else the answer is about another payment. Fills res (outcome, status, id,
 * decline code, error). Returns false for a bad answer (malformed JSON, an
 * unknown status, a 200 with an error, an intent of another payment, a 402
 * without its intent): res is then PROC_UNKNOWN, and the caller logs and
 * counts it. A 5xx is PROC_UNKNOWN either way; *replayed_5xx tells that
 * Stripe answered it from its idempotency store (the create had begun: only
 * a search can tell what it did).
 */
bool stripe_classify(stripe_call call, const char *gid, int64_t amount, long http, const char *body, size_t len,
                     bool replayed, proc_result *res, bool *replayed_5xx);

typedef struct stripe_found {
    int n;                          /* intents whose metadata gid is ours */
    char id[128];                   /* the first one's id */
} stripe_found;

/* A search answer: res->outcome PROC_PAYMENT means found is filled;
 * otherwise res says why not (unknown, rate limited, auth, invalid).
 * Returns false for a bad answer. */
bool stripe_classify_search(const char *gid, long http, const char *body, size_t len, stripe_found *found,
                            proc_result *res);

/* Stripe-Signature: "t=<unix>,v1=<hex>[,v1=...]", v1 = hex HMAC-SHA256 with
 * the endpoint secret over "<t>.<raw body>", compared in constant time; t
 * within tolerance_s of now_s. PROC_WH_OK or PROC_WH_UNSIGNED (err says why). */
proc_wh_status stripe_verify_signature(const char *secret, const char *header, const char *body, size_t len,
                                       int64_t now_s, int tolerance_s, char *err, size_t errlen);

/* One event: payment_intent.* types give an event (the intent's id, our gid
 * from its metadata, its status); other types give none (*n = 0) and are
 * acknowledged. PROC_WH_MALFORMED for anything that is not an event. */
proc_wh_status stripe_parse_event(const char *body, size_t len, proc_event *ev, int *n, char *err, size_t errlen);

/* A PaymentIntent status -> ours (PROC_ST_NONE: not a status we know). */
proc_status stripe_status(const char *status);

#endif
