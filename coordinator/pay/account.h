/*
 * account.h - one payment at a time per account, and credits.
 *
 * A prepared debit holds its account's row lock until it is settled, so two
 * payments on one account cannot both be in the database at once. Instead of
 * parking a pool connection on the row lock, payments queue here: one holds
 * the account (the "active" slot), the rest wait in order. When the account is
 * given back, credits accepted meanwhile are applied first, then the next
 * slot's start() runs (always from the loop, never inside account_leave()).
 *
 * Credits (the `credit` op) are durable at once: applied in the same
 * transaction when the account is free, else stored 'accepted' and applied
 * when it frees (or by recovery's sweep if a prepared debit of another daemon
 * holds the row).
 */
#ifndef PAYCOORD_ACCOUNT_H
#define PAYCOORD_ACCOUNT_H

#include "common.h"
#include "list.h"
#include "request.h"

typedef struct acct_slot {
    pc_list link;
    void (*start)(struct acct_slot *s);     /* the account is this slot's now */
} acct_slot;

typedef struct account account;

int account_init(void) PC_MUSTCHECK;
void account_shutdown(void);

/* The account's in-memory record, made on first use; NULL when out of memory. */
account *account_get(const char *id);
/* 1: s holds the account now (no start() call follows); 0: queued; -1: queue full (s untouched). */
int account_enter(account *a, acct_slot *s);
/* s leaves the queue, or gives the account back. a may be freed afterwards. */
void account_leave(account *a, acct_slot *s);
int account_nqueued(const account *a);
/* Done with a that was got but never entered (frees it if it has no work). */
void account_put(account *a);

void account_handle_credit(pc_request *r);

#endif
