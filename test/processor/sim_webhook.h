/*
 * sim_webhook.h - webhook deliveries of the Stripe and Adyen modes: POSTs to
 * one configured loopback URL with evhttp's client (non-blocking), retried
 * with a doubling delay until the receiver accepts or webhook_max_attempts
 * is reached. The faults webhook_delay_ms, webhook_drop_rate,
 * webhook_duplicate_rate and webhook_bad_signature_rate apply to each event.
 *
 * Stripe events are signed per attempt (Stripe-Signature: t=...,v1=hex
 * HMAC-SHA256(secret, "t.body")); Adyen events carry their signature in the
 * body, computed by the caller (sim_adyen.c) with sim_webhooks_hmac().
 */
#ifndef PSP_SIM_WEBHOOK_H
#define PSP_SIM_WEBHOOK_H

#include "sim_server.h"

#define SIM_WEBHOOK_URL_MAX 512
#define SIM_WEBHOOK_SECRET_MAX 256
#define SIM_WEBHOOK_INFLIGHT_MAX 16

sim_webhooks *sim_webhooks_new(sim_server *s);
/* Drops every queued and in-flight delivery. */
void sim_webhooks_free(sim_webhooks *w);

/* url: http://<numeric loopback>:<port>/<path>; secret: Stripe's signing
 * secret as given, Adyen's HMAC key as hex. Either may be NULL (unchanged).
 * Returns -1 with a message on a bad value. */
int sim_webhooks_configure(sim_webhooks *w, const char *url, const char *secret, char *err,
                           size_t errlen) SIM_MUSTCHECK;
/* POST /control/webhook body: {"url": "...", "secret": "..."} (either). */
int sim_webhooks_configure_json(sim_webhooks *w, const char *json, size_t len, char *err,
                                size_t errlen) SIM_MUSTCHECK;
void sim_webhooks_config_json(const sim_webhooks *w, sim_buf *b);
bool sim_webhooks_enabled(const sim_webhooks *w);

/* The raw secret (Stripe: the string; Adyen: the decoded hex bytes). */
const unsigned char *sim_webhooks_key(const sim_webhooks *w, size_t *len);

/* HMAC-SHA256(key, msg) into out[32]. */
void sim_webhooks_hmac(const unsigned char *key, size_t key_len, const void *msg, size_t len,
                       unsigned char out[32]);

/* Queues an event (the faults decide drops, duplicates and forged copies).
 * stripe_sign: add a Stripe-Signature header per attempt. forged_body: the
 * Adyen body with a wrong signature, for the forged copy (NULL for Stripe,
 * whose forged copy has a wrong header instead). Nothing is queued while no
 * URL is configured. */
void sim_webhooks_emit(sim_webhooks *w, const char *body, size_t len, bool stripe_sign,
                       const char *forged_body, size_t forged_len);

/* Events queued, waiting for a retry, or in flight. */
size_t sim_webhooks_pending(const sim_webhooks *w);

#endif
