/*
 * sim_store.h - psp-sim's payment records: lookup by idempotency key,
 * creation order for List, pending settlement, counters, and the state file.
 *
 * A record's lifecycle (each step goes through sim_store_set_status, which
 * keeps the counters and logs "old -> new"):
 *
 *   create  -> succeeded | declined | pending
 *   pending -> succeeded | declined   (settle time reached; checked lazily on
 *                                      every access and by the settle timer)
 *   pending -> canceled               (cancel before the settle time)
 *   (none)  -> canceled tombstone     (cancel of an unknown key; a later create
 *                                      with that key charges nothing)
 *
 * Records are never deleted, except all at once by sim_store_clear(). Ids are
 * "psp_" + a zero-padded counter, and "created" never decreases along that
 * counter, so creation order is both (created, id) order and id order.
 */
#ifndef PSP_SIM_STORE_H
#define PSP_SIM_STORE_H

#include "sim_util.h"

typedef enum {
    SIM_ST_NONE = 0, /* only between sim_store_insert() and the first set_status */
    SIM_ST_SUCCEEDED,
    SIM_ST_DECLINED,
    SIM_ST_PENDING,
    SIM_ST_CANCELED,
    SIM_ST__COUNT
} sim_status;

const char *sim_status_name(sim_status st);

/* Monotonic event counters, reported by GET /control and kept in the state
 * file. The status counters count transitions into that status. */
typedef struct sim_counters {
    uint64_t requests[SIM_OP__COUNT]; /* /v1 requests received, per op */
    uint64_t processed_creates;       /* creates that made a new record */
    uint64_t succeeded;
    uint64_t declined;
    uint64_t pending;
    uint64_t canceled;
    uint64_t failed_before; /* 503 without processing */
    uint64_t failed_after;  /* processed, then 500 */
    uint64_t dropped_after; /* processed, then closed without an answer */
    uint64_t blackholed;    /* held, never processed nor answered */
    uint64_t refused;       /* requests on a kept-alive connection while refusing */
    uint64_t replays;       /* creates answered from an existing record */
    uint64_t conflicts;     /* creates answered 409 idempotency_conflict */
    uint64_t tombstones;    /* cancels of unknown keys */
    uint64_t tombstone_hits; /* creates answered by a tombstone */
    uint64_t refunds;       /* payments marked refunded */
    uint64_t rate_limited;  /* 429 answers (rate_limit fault) */
    uint64_t keys_in_use;   /* stripe 409 idempotency_key_in_use, adyen 422 in progress */
    uint64_t keys_pruned;   /* idempotency keys forgotten after key_retention_ms */
    uint64_t cancels_received; /* adyen /cancels accepted ("received") */
    uint64_t webhooks_queued;    /* events queued for delivery (copies included) */
    uint64_t webhooks_delivered; /* deliveries the receiver accepted */
    uint64_t webhooks_failed;    /* delivery attempts that failed (retried or not) */
    uint64_t webhooks_given_up;  /* events dropped after webhook_max_attempts */
    uint64_t webhooks_dropped;   /* events never sent (webhook_drop_rate) */
    uint64_t webhooks_forged;    /* extra copies sent with a wrong signature */
} sim_counters;

/* sim_payment.flags: details the Stripe and Adyen modes keep per payment. */
#define SIM_PF_UNCAPTURED 0x01 /* stripe capture_method=manual: authorised, requires_capture */
#define SIM_PF_ACTION 0x02     /* stripe: pending as requires_action (not processing) */
#define SIM_PF_RECEIVED 0x04   /* adyen: pending answered "Received" (not "Pending") */
#define SIM_PF_ERROR 0x08      /* adyen: declined with resultCode "Error" */
#define SIM_PF_NO_KEY 0x10     /* stripe: created without an Idempotency-Key header */


#define SIM_ID_DIGITS 12
#define SIM_ID_LEN (4 + SIM_ID_DIGITS) /* "psp_" + digits */

typedef struct sim_payment {
    uint64_t seq;          /* the id's counter */
    int64_t amount;
    int64_t created;       /* unix seconds */
    int64_t settle_at_ms;  /* pending: wall-clock ms at which it settles */
    int64_t created_ms;    /* wall-clock ms of the create */
    int64_t changed_ms;    /* wall-clock ms of the last status change */
    uint64_t hash;
    uint8_t status;        /* sim_status */
    uint8_t settle_status; /* pending: SIM_ST_SUCCEEDED or SIM_ST_DECLINED */
    uint8_t prev_status;   /* the status before the last change (search lag) */
    uint8_t flags;         /* SIM_PF_*: mode-specific details */
    bool refunded;
    bool tombstone;        /* canceled before any create: amount/currency/account are null */
    bool has_reference;
    char currency[4];
    char decline_code[SIM_DECLINE_CODE_MAX + 1]; /* declined, or a pending one's settle code */
    uint16_t key_len;
    uint16_t account_len;
    uint16_t reference_len;
    char *key;             /* these point into data[], NUL-terminated */
    char *account;
    char *reference;
    char data[];
} sim_payment;

/* What a new record is made of; strings need not be NUL-terminated. */
typedef struct sim_new_payment {
    const char *key;
    size_t key_len;
    bool tombstone;
    int64_t amount;
    const char *currency; /* 3 letters */
    const char *account;
    size_t account_len;
    bool has_reference;
    const char *reference;
    size_t reference_len;
} sim_new_payment;

typedef struct sim_store sim_store;

/* Called after every status change (not for the restore of a state file). */
typedef void (*sim_status_hook)(void *arg, sim_payment *p, int from, const char *why);

sim_store *sim_store_new(size_t max_payments);
void sim_store_free(sim_store *st);

/* Forgets every record, the settlement queue and the counters. The id
 * counter keeps going, so an id is never handed out twice by one process. */
void sim_store_clear(sim_store *st);

size_t sim_store_count(const sim_store *st);
sim_counters *sim_store_counters(sim_store *st);
/* Current number of records in each status, indexed by sim_status. */
const uint64_t *sim_store_status_counts(const sim_store *st);

sim_payment *sim_store_find(sim_store *st, const char *key, size_t key_len);
/* The record with this id counter, or NULL (binary search over creation order). */
sim_payment *sim_store_find_seq(sim_store *st, uint64_t seq);

/* Installs the status-change hook (NULL to remove). */
void sim_store_set_hook(sim_store *st, sim_status_hook hook, void *arg);

/* Appends a record in SIM_ST_NONE with the next id; the caller must give it a
 * status right away. Returns -1 (and makes nothing) when the store holds
 * max_payments records. */
int sim_store_insert(sim_store *st, const sim_new_payment *np, sim_payment **out) SIM_MUSTCHECK;

/* The one place a record's status changes: updates the counters, logs
 * "old -> new" at debug level with the key and why. decline_code is used
 * when the new status is declined (NULL means "card_declined"). */
void sim_store_set_status(sim_store *st, sim_payment *p, sim_status to, const char *decline_code,
                          const char *why);

/* Makes a record pending until settle_at_ms, then settle_status
 * (succeeded or declined, the latter with decline_code). */
void sim_store_set_pending(sim_store *st, sim_payment *p, int64_t settle_at_ms,
                           sim_status settle_status, const char *decline_code);

/* Marks a succeeded record refunded (idempotent). */
void sim_store_refund(sim_store *st, sim_payment *p);

/* Settles p now if it is pending and its time has come. */
void sim_store_touch(sim_store *st, sim_payment *p, int64_t now_ms);
/* Settles every pending record whose time has come. */
void sim_store_settle_due(sim_store *st, int64_t now_ms);
/* Wall-clock ms of the earliest queued settlement, or -1. */
int64_t sim_store_next_settle_ms(const sim_store *st);

/* List support. Records are indexed 0..count-1 in creation order. Returns
 * the first index whose record has created >= created_gte (when have_gte)
 * and seq > after_seq (when have_after). */
size_t sim_store_list_start(const sim_store *st, bool have_gte, int64_t created_gte, bool have_after,
                            uint64_t after_seq);
sim_payment *sim_store_at(const sim_store *st, size_t i);

/* Parses "psp_" + digits into its counter; returns -1 when malformed. */
int sim_parse_id(const char *s, size_t n, uint64_t *seq) SIM_MUSTCHECK;

/* The payment object of the generic contract (docs/processor.md). */
void sim_payment_json(const sim_payment *p, sim_buf *b);
void sim_counters_json(const sim_counters *c, sim_buf *b);

/* State file: one header line then one JSON object per record. Save writes
 * path + ".tmp", fsyncs it and renames it over path. Load fills an empty
 * store; a missing file is not an error (returns 0 and loads nothing). Both
 * return -1 with a message in err on failure. */
int sim_store_save(sim_store *st, const char *path, char *err, size_t errlen) SIM_MUSTCHECK;
int sim_store_load(sim_store *st, const char *path, char *err, size_t errlen) SIM_MUSTCHECK;

#endif
