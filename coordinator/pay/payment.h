/*
 * payment.h - the payment state machine: two-phase commit across PostgreSQL
 * and the payment processor, for the `pay` op (payment.c has the lifecycle).
 */
#ifndef PAYCOORD_PAYMENT_H
#define PAYCOORD_PAYMENT_H

#include "common.h"
#include "request.h"
#include "store.h"

int pay_init(void) PC_MUSTCHECK;
/* Frees every payment in memory. With answer, their waiting clients are told
 * `shutting_down` (the payments are left for recovery); without (a simulated
 * crash), their requests are dropped unanswered. Prepared debits stay. */
void pay_shutdown(bool answer);

void pay_handle_pay(pc_request *r);

/* Payments in memory (any state), and those holding a prepared debit. */
int pay_in_flight(void);
int pay_prepared(void);

/* The payment object of a payment in memory whose row is known to be its
 * own (by key, or by payment_id when key is NULL); NULL otherwise. */
cJSON *pay_memory_json(const char *key, const char *payment_id);

/* The payment object of a stored row (docs/protocol.md). */
cJSON *pay_row_json(const store_payment_row *row, bool replayed);

#endif
