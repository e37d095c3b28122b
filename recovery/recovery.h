/*
 * recovery.h - settling what no live payment drives: prepared transactions of
 * this node whose payment left memory (the daemon died, or handed it over),
 * 'pending' rows without a prepared transaction, and committed debits whose
 * row was not brought up to date. recovery.c has the decision table.
 */
#ifndef PAYCOORD_RECOVERY_H
#define PAYCOORD_RECOVERY_H

#include "common.h"

int rec_init(void) PC_MUSTCHECK;
void rec_shutdown(void);

bool rec_busy(void);                  /* a pass is running */
bool rec_first_pass_done(void);       /* the startup pass has finished */

/* Prepared transactions of this node that no live payment drives (review
 * ones included: they hold slots too), as of the last pass plus hand-overs
 * since. Admission control counts them. */
int rec_orphans(void);
/* The payment path hands a gid with a prepared debit over to recovery. */
void rec_adopt(const char *gid);

/* Start a pass now (admin `recover`, or a node lock just taken). forced: ignore
 * per-gid backoff (processor answers inside the backoff are not counted as
 * attempts). cb (may be NULL) gets the pass's counts when it ends; returns -1
 * when a pass of another node is running or nothing could start. */
typedef struct rec_counts {
    int checked, committed, rolled_back, left;
} rec_counts;
int rec_run(const char *node, bool foreign, bool forced, void (*cb)(const rec_counts *c, const char *err, void *arg),
            void *arg) PC_MUSTCHECK;

/* After an operator settled gid by hand. */
void rec_forgotten(const char *gid);

#endif
