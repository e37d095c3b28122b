/*
 * ctx.h - the daemon context every layer shares: the configuration, the
 * counters, and a few facts about the database. paycoord is one event loop on
 * one thread (base/loop.h), so nothing here needs locking.
 *
 * Upward notifications go through callbacks registered at start: a lower
 * layer that changes something readiness depends on calls
 * ctx_readiness_changed(), which calls whatever the top layer registered.
 */
#ifndef PAYCOORD_CTX_H
#define PAYCOORD_CTX_H

#include "common.h"
#include "config.h"

#include <proto.h>

#define PC_LAT_BUCKETS 16

typedef struct pc_stats {
    uint64_t requests;
    uint64_t errors_by_code[PROTO_ERR__COUNT];
    uint64_t payments_succeeded, payments_declined, payments_insufficient, payments_left_pending;
    uint64_t replays, credits_applied, credits_accepted;
    uint64_t processor_calls, processor_failures, processor_rate_limited;
    uint64_t processor_bad_answers;          /* unreadable answers (proc.h): unknown, never a decline */
    uint64_t webhooks_received, webhooks_accepted, webhooks_duplicates, webhooks_rejected, webhooks_malformed,
        webhooks_failed;
    uint64_t lat_buckets[PC_LAT_BUCKETS];    /* processor latency histogram, ms: <=1,2,4..., +Inf */
    double lat_sum_ms;
    uint64_t recoveries_committed, recoveries_rolled_back, recoveries_left, recovery_runs;
    uint64_t recon_runs;                     /* reconciliation runs finished (done or failed) */
    uint64_t alerts;                         /* log lines carrying alert=, by the money path and recovery */
    uint64_t anomalies;                      /* the database and the processor disagree (ctx_anomaly) */
    uint64_t clients_accepted, clients_refused;
} pc_stats;

typedef struct pc_daemon {
    pc_config cfg;
    const char *config_path;
    char *token;                   /* processor token (never logged) */
    bool shutting_down;
    int max_prepared_server;       /* SHOW max_prepared_transactions; -1 until known */
    int prepared_limit;            /* our share of it */
    int nclients;
    uint64_t started_ms;
    pc_stats stats;
} pc_daemon;

extern pc_daemon *D;

/* Recompute prepared_limit from max_prepared_server and the configuration. */
void ctx_update_prepared_limit(void);

/* The database and the processor (or the payment's own record) disagree:
 * money may have moved without a matching debit, or the reverse. Counted
 * (an alert too); the caller flags the gid for review. */
void ctx_anomaly(void);

void ctx_set_readiness_cb(void (*cb)(void));
void ctx_readiness_changed(void);

#endif
