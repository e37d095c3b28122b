/*
 * sim_fault.h - psp-sim's fault-injection settings (the "faults" object of
 * /control, documented in docs/processor.md) and its seedable PRNG.
 */
#ifndef PSP_SIM_FAULT_H
#define PSP_SIM_FAULT_H

#include "sim_store.h"
#include "sim_util.h"

typedef struct sim_faults {
    int64_t latency_ms;       /* every /v1 request waits latency + U[0,jitter] */
    int64_t jitter_ms;
    double decline_rate;      /* new creates declined "card_declined" */
    double pending_rate;      /* new creates answered pending ... */
    int64_t settle_ms;        /* ... that settle after settle_ms ... */
    sim_status settle_status; /* ... into this (succeeded or declined) */
    double fail_before_rate;  /* 503, nothing processed */
    double fail_after_rate;   /* processed, then 500 */
    double drop_after_rate;   /* processed, then the connection closed */
    bool blackhole;           /* never processed nor answered */
    bool refuse_connections;  /* the /v1 listener is closed */
    bool cancel_unsupported;  /* cancel answers 501 */
    unsigned fault_ops;       /* bit (1u << sim_op): where rates and blackhole apply */
    uint64_t seed;            /* last PRNG seed */
    double rate_limit_rate;   /* 429 with Retry-After, nothing processed */
    int64_t retry_after_s;    /* the Retry-After value of those 429s */
    /* stripe and adyen */
    int64_t key_retention_ms; /* idempotency keys are forgotten after this */
    int64_t webhook_delay_ms; /* before the first delivery attempt of an event */
    int64_t webhook_retry_ms; /* first retry delay; doubles per attempt */
    int64_t webhook_max_attempts;
    double webhook_drop_rate;          /* event never sent */
    double webhook_duplicate_rate;     /* event sent twice */
    double webhook_bad_signature_rate; /* an extra copy with a wrong signature */
    /* stripe */
    int64_t search_lag_ms;        /* search sees creates and changes this late */
    bool stripe_cancel_processing; /* cancel allowed in "processing" (the rare case) */
    /* adyen */
    int64_t cancel_delay_ms;      /* /cancels: time until the outcome and its webhook */
    bool adyen_autocapture;       /* Authorised payments are captured at once */
    bool webhook_require_accepted; /* only a 2xx with "[accepted]" counts as delivered */
} sim_faults;

/* Everything off; settle_ms 1000 into succeeded; fault_ops ["create"]. The
 * seed is left as it was. */
void sim_faults_defaults(sim_faults *f);

/* Merges the fields of a JSON object into *f. Unknown fields, wrong types
 * and out-of-range values fail the whole update: returns -1 with a message
 * in err and leaves *f unchanged. *reseed is set when "seed" was given. */
int sim_faults_update(sim_faults *f, sim_mode mode, const char *json, size_t len, bool *reseed,
                      char *err, size_t errlen) SIM_MUSTCHECK;

/* Only the fields that apply to mode. */
void sim_faults_json(const sim_faults *f, sim_mode mode, sim_buf *b);

static inline bool sim_faults_applies(const sim_faults *f, sim_op op)
{
    return (f->fault_ops & (1u << op)) != 0;
}

/* splitmix64: small, fast, and any 64-bit seed is a good seed. */
typedef struct sim_rng {
    uint64_t state;
} sim_rng;

void sim_rng_seed(sim_rng *r, uint64_t seed);
uint64_t sim_rng_next(sim_rng *r);
/* Uniform in [0, n]. */
uint64_t sim_rng_upto(sim_rng *r, uint64_t n);
/* true with probability rate; rates of 0 and 1 draw nothing, so turning a
 * fault fully on or off does not shift the sequence other faults see. */
bool sim_rng_hit(sim_rng *r, double rate);

#endif
