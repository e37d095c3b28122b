/*
 * sim.h - the deterministic simulation of paycoord's money path
 * (docs/simulation.md). The real payment state machine, account queue,
 * circuit, reads, recovery and admin ops run on a virtual clock, with the
 * event loop (base/loop.h), the store (db/store.h) and the processor adapter
 * (processor/proc.h) replaced by in-process models. Every choice (latencies,
 * faults, the order of callbacks, crashes) comes from the seed, so a failing
 * seed reproduces exactly.
 */
#ifndef PAYCOORD_SIM_H
#define PAYCOORD_SIM_H

#include <stdbool.h>
#include <stdint.h>

/* ---------------------------------------------------------------- loop */

typedef void (*sim_fn)(void *arg);

void sim_loop_reset(void);
/* Schedule fn(arg) at now + delay_us (virtual). epoch 0: survives daemon
 * crashes (the database's and the processor's own events); otherwise the
 * event is dropped when the daemon epoch changes. */
void sim_at(int64_t delay_us, sim_fn fn, void *arg, uint64_t epoch);
/* Run events until virtual time reaches until_us or nothing is left. Returns
 * the number of events run. */
uint64_t sim_run_until(int64_t until_us);
int64_t sim_now_us(void);
uint64_t sim_events(void);
/* Timers of the loop backend still armed (the daemon's). */
int sim_timers_armed(void);

/* The daemon's current epoch: bumped by a crash. */
extern uint64_t sim_epoch;

/* Uniform random helpers on the one rng (base/rng.h). */
uint64_t sim_rand(uint64_t n);            /* [0, n) */
bool sim_chance(double p);
int64_t sim_between(int64_t lo, int64_t hi);  /* [lo, hi] */

/* ---------------------------------------------------------------- database */

typedef struct sim_db_faults {
    double lost_before;       /* a call's connection breaks before it runs: nothing happens */
    double lost_after;        /* ... after it ran: its answer is lost */
    double zombie;            /* ... and it runs later, unless its session is fenced first */
    double phase1_partial;    /* phase 1: the intent commits, the connection breaks before the debit */
} sim_db_faults;

void sim_db_reset(void);
void sim_db_set_faults(const sim_db_faults *f);
/* Crash PostgreSQL now (asynchronous commits not yet flushed are lost,
 * prepared transactions survive); it is back after down_us. */
void sim_db_crash(int64_t down_us);
bool sim_db_up(void);
/* An asynchronous standby: snapshot what it has now; a failover later
 * promotes it, losing everything flushed since (prepared transactions too). */
void sim_db_standby_snapshot(void);
void sim_db_failover(int64_t down_us);
/* Was gid's prepared transaction settled while it was not flagged for review? */
bool sim_db_settled_unflagged(const char *gid);
bool sim_db_flagged(const char *gid);
/* The daemon died: every call in the air loses its answer (it may still run). */
void sim_db_daemon_died(void);
int sim_db_in_flight(void);

void sim_db_add_account(const char *id, const char *currency, int64_t balance);

/* Facts for the checker (committed state). */
typedef struct sim_payment_view {
    const char *payment_id, *key, *gid, *account, *currency, *status /* derived */, *row_status;
    int64_t amount;
    bool debited;
} sim_payment_view;
int sim_db_payments(sim_payment_view *out, int max);
int sim_db_prepared_count(void);
bool sim_db_is_prepared(const char *gid);
int sim_db_review_count(void);
/* The gids flagged for review that still hold a prepared transaction or a
 * 'pending' row (an operator must settle them). */
int sim_db_review_open(char gids[][80], int max);
int64_t sim_db_account_balance(const char *id, bool *found);
int64_t sim_db_ledger_sum(const char *account);
int64_t sim_db_credits_applied(const char *account);
int64_t sim_db_debits(const char *account);
int sim_db_accepted_credits(void);
int64_t sim_db_ledger_debits_of(const char *payment_id);
bool sim_db_row_exists(const char *payment_id);
/* The stored deadline of gid's payment row (virtual us; 0: no row). */
int64_t sim_db_deadline_us(const char *gid);
/* A fingerprint of the whole committed state (I7: recovery changes nothing). */
uint64_t sim_db_fingerprint(void);

/* ---------------------------------------------------------------- processor */

typedef struct sim_psp_faults {
    double decline;           /* a new charge is declined */
    double pending;           /* a new charge is pending, and settles later */
    double fail_before;       /* 5xx, not processed */
    double fail_after;        /* processed, 5xx */
    double drop_after;        /* processed, the answer is lost (timeout) */
    double late;              /* a create times out and arrives later (unless canceled first) */
    double rate_limited;      /* 429 */
    double invalid_retry;     /* a retried create of a known key answers 4xx (not proof of anything) */
    double conflict;          /* 409 idempotency_conflict (manual review) */
    bool no_cancel;           /* cancel by key is unsupported (501) */
    bool down;                /* unreachable: every call fails */
    double webhook_lost;      /* adyen: a webhook is never delivered */
    bool autocapture;         /* adyen: authorised charges are captured: a technical cancel fails */
} sim_psp_faults;

/* What the processor's adapter answers (sim_proc.c's header comment). */
typedef enum { SIM_PROFILE_GENERIC = 0, SIM_PROFILE_STRIPE, SIM_PROFILE_ADYEN, SIM_PROFILE__COUNT } sim_profile;
void sim_psp_set_profile(sim_profile p);   /* before sim_psp_install() */
sim_profile sim_psp_profile(void);
const char *sim_profile_name(sim_profile p);

/* sim_main.c: is the daemon up (its webhook listener with it)? */
bool sim_daemon_running(void);

void sim_psp_reset(void);
void sim_psp_set_faults(const sim_psp_faults *f);
void sim_psp_install(void);           /* proc_use() the model */
void sim_psp_daemon_died(void);
int sim_psp_in_flight(void);

typedef struct sim_charge_view {
    const char *key;          /* our gid */
    const char *status;       /* succeeded | declined | pending | canceled */
    int64_t amount;
} sim_charge_view;
int sim_psp_payments(sim_charge_view *out, int max);
/* The processor's truth for a gid: "succeeded", "declined", "canceled", "pending" or NULL. */
const char *sim_psp_status(const char *gid);
/* The first gid whose create was sent after its stored deadline (NULL: none). */
const char *sim_psp_late_create(void);
/* The daemon epoch that heard the processor answer 409 for gid (0: none did). */
uint64_t sim_psp_conflicted(const char *gid);

#endif
