/*
 * proc_adyen.h - the Adyen adapter's pure parts (proc_adyen_api.c): the
 * /payments and /cancels bodies, the classification of their answers, and
 * notifications (HMAC-SHA256 as Adyen documents, parsed into events), plus
 * the rule that turns what the webhooks said into an answer (adyen_decide).
 * No I/O, no clock: test/unit/test_proc_adyen.c tests them as tables. The
 * adapter itself (proc_adyen.c) is behind proc.h; docs/processors.md has the
 * mapping and its sources.
 */
#ifndef PAYCOORD_PROC_ADYEN_H
#define PAYCOORD_PROC_ADYEN_H

#include "proc.h"
#include "proc_known.h"
#include "sbuf.h"

#define ADYEN_KEY_MAX 64            /* Idempotency-Key (Adyen: at most 64 characters) */
#define ADYEN_REFERENCE_MAX 80
#define ADYEN_HMAC_KEY_MAX 128      /* bytes */

/* The /payments body: amount, reference = gid, merchantAccount,
 * paymentMethod (scheme; the pay request's metadata payment_method as
 * storedPaymentMethodId), shopperReference = account, and the pay request's
 * metadata (keys in byte order). False when a field is missing or the gid
 * is too long for a reference. */
bool adyen_payment_body(const proc_req *req, const char *merchant, sbuf *out);
/* The /cancels body: merchantAccount, paymentReference = gid. */
bool adyen_cancel_body(const char *gid, const char *merchant, sbuf *out);

/* Classify a /payments answer. gid must be its merchantReference, amount
 * (> 0) its amount, echoed_key (when not NULL) equal to gid. Returns false
 * for a bad answer (res is then PROC_UNKNOWN). */
bool adyen_classify_payment(const char *gid, int64_t amount, long http, const char *body, size_t len,
                            const char *echoed_key, proc_result *res);
/* Classify a /cancels answer: "received" is PROC_PAYMENT with status
 * PENDING (the outcome comes by webhook), cancel_psp[64] its pspReference. */
bool adyen_classify_cancel(const char *gid, long http, const char *body, size_t len, proc_result *res,
                           char *cancel_psp);

/* The HMAC key from its hex form; false if not even-length hex of 1..128 bytes. */
bool adyen_hmac_key(const char *hex, unsigned char *key, size_t *klen);

/* A notification: every NotificationRequestItem must carry a valid
 * additionalData.hmacSignature (else PROC_WH_UNSIGNED, nothing taken).
 * AUTHORISATION, TECHNICAL_CANCEL, CANCELLATION and CANCEL_OR_REFUND items
 * of our merchant account become events; others are acknowledged only. */
proc_wh_status adyen_parse_notification(const unsigned char *key, size_t klen, const char *merchant,
                                        const char *body, size_t len, proc_event *events, int max, int *n, char *err,
                                        size_t errlen);

/* Note one event in what is known of its gid. */
void adyen_note_event(proc_known *k, const proc_event *ev);

/*
 * What the webhooks received say about a payment (res filled, local):
 *  - a cancel that succeeded: canceled;
 *  - more than ADYEN_AUTH_MARGIN_MS before the deadline (no technical cancel
 *    can have been sent yet): the AUTHORISATION decides; none yet: pending;
 *  - later, a technical cancel may be on its way and only its outcome
 *    decides: a refused AUTHORISATION is declined; our cancel failed and the
 *    AUTHORISATION succeeded: succeeded (the charge stands); otherwise
 *    pending, and PROC_STUCK once our cancel was received timeout_ms ago
 *    without a deciding webhook. Except: when no debit was ever made
 *    (never_debited: a payment row whose create was never sent, as none is
 *    sent before PREPARE), our cancel finding no payment and no
 *    AUTHORISATION is conclusive: canceled.
 * k may be NULL (nothing known). now_ms is the loop clock.
 */
#define ADYEN_AUTH_MARGIN_MS 1000
void adyen_decide(const proc_known *k, int64_t since_deadline_ms, uint64_t now_ms, int64_t timeout_ms,
                  bool never_debited, proc_result *res);

#endif
