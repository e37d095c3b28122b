/*
 * store.h - every statement paycoord runs against PostgreSQL, behind one
 * interface: the payment rows, the debits and their prepared transactions,
 * credits, recovery's bookkeeping, the node lock and the admin reads. The
 * payment path (pay/) and recovery (recovery/) share the database only
 * through here; neither builds SQL. store_pg.c implements it on pgpool; the
 * simulation (test/sim/) implements it on an in-memory model of the same
 * rules.
 *
 * Callback contract (every store_* call that takes a callback): the call
 * returns STORE_QUEUED and the callback fires exactly once, later, from the
 * loop; or it returns STORE_UNAVAILABLE / STORE_OVERLOADED and the callback
 * never fires (nothing was sent). Pointers inside a result are valid only
 * during the callback.
 *
 * Durability: a call documented "durable" answers only after its commit has
 * been flushed (a synchronous commit, or an asynchronous one that a later
 * flush in the same call covers). Everything else may be lost in a crash of
 * PostgreSQL, and is written only where recovery can rebuild it.
 *
 * Statuses. The row's status column is final only together with the money:
 * 'succeeded' is written (store_record_success, durable) after COMMIT
 * PREPARED and before the success is told; 'declined' and
 * 'insufficient_funds' by store_settle, only for a row without a committed
 * debit. A row read for a client (store_payment_by_*) says 'succeeded' only
 * when both its column and a committed ledger debit say so: a committed
 * debit whose row still says 'pending' (the daemon died between the two
 * writes) reads 'pending' until recovery brings the row up to date, so no
 * success is ever told without the processor_ref and updated_at it will
 * keep. payments_view.derived_status (operators, recovery) says
 * 'succeeded' as soon as the debit is committed.
 *
 * Locks. The prepared debit holds the account row (FOR NO KEY UPDATE) and,
 * through the ledger's foreign key, a KEY SHARE lock on the payment row: so
 * nothing here ever waits on a prepared transaction except a second debit of
 * the same account, and every session runs with lock_timeout set, so no
 * statement waits longer than that for anything.
 */
#ifndef PAYCOORD_STORE_H
#define PAYCOORD_STORE_H

#include "common.h"

#include <cjson/cJSON.h>
#include <stdint.h>

enum { STORE_QUEUED = 0, STORE_UNAVAILABLE = -1, STORE_OVERLOADED = -2 };

typedef enum {
    ST_OK = 0,        /* it ran */
    ST_NOT_SENT,      /* nothing reached the database: nothing happened */
    ST_LOST,          /* the connection broke after sending: it may or may not have happened */
    ST_ERROR,         /* the database refused it (sqlstate, errmsg) */
    ST_SHUTDOWN       /* the store shut down first: it may or may not have happened */
} st_status;

/* Which connections a call uses: the payment path's pool, or recovery's own
 * (which client traffic can never take; admin ops use it too). */
typedef enum { CH_PAY = 0, CH_REC } store_chan;

/* A payment's facts, as the store needs them. */
typedef struct store_pay {
    const char *payment_id;        /* canonical uuid text */
    const char *gid;
    const char *key;
    const char *account;
    const char *currency;
    const char *reference;         /* NULL: none */
    const cJSON *metadata;         /* NULL: none */
    const char *node;
    int64_t amount;
    int deadline_ms;
    /* The times a client is told (created_at, updated_at), written as they
     * were told, so that the row reads back exactly as the first answer. */
    int64_t created_ms, updated_ms;
} store_pay;

/* ------------------------------------------------------------ lifecycle */

int store_init(void) PC_MUSTCHECK;      /* pools from D->cfg; 0 or -1 */
void store_shutdown(void);              /* pending callbacks fire with ST_SHUTDOWN */
bool store_is_up(void);                 /* the payment pool has a connection */
/* A query of the payment pool has run longer than stuck_ms: the pool is stuck. */
bool store_is_stuck(int *oldest_ms);
/* Up/down changes of the payment pool (the top layer registers it). */
void store_set_state_cb(void (*cb)(bool up));
/* Write whatever is batched now (on SIGTERM, before the pools go). */
void store_flush(void);
/* Queries in progress or queued on every pool: 0 when idle. */
int store_busy(void);

typedef struct store_pool_stats {
    int size, connected, busy, queued;
} store_pool_stats;
void store_pool_stats_get(store_chan ch, store_pool_stats *out);

/* ------------------------------------------------------------ payment path */

typedef enum {
    P1_PREPARED = 0,      /* the debit is prepared under the gid (durable: PREPARE flushed) */
    P1_NSF,               /* balance < amount: nothing prepared; the intent row is written */
    P1_UNKNOWN_ACCOUNT,   /* nothing written */
    P1_CURRENCY_MISMATCH, /* nothing written; errmsg says which */
    P1_DUPLICATE_KEY,     /* the key has a row already (another payment): nothing written */
    P1_RETRY,             /* the debit failed for now (row lock timeout, serialization, ...):
                             try the debit again; intent_written tells whether the row exists */
    P1_FAILED,            /* an error before the intent was written: nothing written */
    P1_LOST,              /* the connection broke after sending: anything may have happened;
                             ask store_get_facts() with fence */
    P1_NOT_SENT,          /* nothing happened */
    P1_SHUTDOWN
} p1_outcome;

typedef struct store_p1 {
    p1_outcome outcome;
    bool intent_written;           /* the intent row is committed (asynchronously) */
    const char *fence;             /* P1_LOST: the lost session's fence token */
    const char *sqlstate, *errmsg;
    double elapsed_ms;
} store_p1;

/* One round trip: the intent row (with_intent; committed asynchronously),
 * then BEGIN, the conditional debit and its ledger row, PREPARE TRANSACTION
 * gid. */
int store_phase1(const store_pay *p, bool with_intent, void (*cb)(const store_p1 *, void *), void *arg)
    PC_MUSTCHECK;

/* What the database holds for one payment. */
typedef struct store_facts {
    st_status st;
    const char *errmsg;
    bool fenced;                   /* with a fence: the old session is gone (else ask again later) */
    bool row;                      /* the payment row exists */
    const char *status;            /* its status column ("" without a row) */
    bool prepared;                 /* its prepared transaction exists */
    bool debited;                  /* a committed ledger debit exists: it succeeded */
    bool review;                   /* recovery_state flags it for review */
    const char *processor_ref;     /* NULL: none */
} store_facts;

/* Read the facts; with a fence token, first make sure the session that token
 * names is gone (terminating it if needed), so that nothing it was running can
 * still land after the answer. payment_id may be "" (a gid without a row). */
int store_get_facts(store_chan ch, const char *payment_id, const char *gid, const char *fence,
                void (*cb)(const store_facts *, void *), void *arg) PC_MUSTCHECK;

typedef enum {
    P2_DONE = 0,          /* committed / rolled back (durable) */
    P2_GONE,              /* no such prepared transaction (someone settled it, or it was lost) */
    P2_RETRY,             /* not sent, connection lost, error: the decision stands, try again */
    P2_SHUTDOWN
} p2_outcome;

typedef struct store_p2 {
    p2_outcome outcome;
    const char *sqlstate, *errmsg;
    double elapsed_ms;
} store_p2;

/* COMMIT PREPARED or ROLLBACK PREPARED gid. */
int store_finish(store_chan ch, const char *gid, bool commit, void (*cb)(const store_p2 *, void *), void *arg)
    PC_MUSTCHECK;

typedef struct store_settled {
    st_status st;
    const char *errmsg;
    bool conflict;                 /* no row, and the key belongs to another payment now */
    const char *status;            /* the derived status afterwards */
} store_settled;

/* Durable: the final status of a payment that holds no prepared debit
 * (insufficient_funds, a decline after ROLLBACK PREPARED, ...). Only a
 * 'pending' row without a committed debit changes; a missing row is written
 * anew from p (a write lost by PostgreSQL). Answers the derived status. */
int store_settle(store_chan ch, const store_pay *p, const char *status, const char *decline_code,
                 const char *processor_ref, void (*cb)(const store_settled *, void *), void *arg) PC_MUSTCHECK;

/* Durable: after COMMIT PREPARED, the row's status 'succeeded', the
 * processor's reference and the answer's updated_at, for many payments in one
 * statement (self-clocking batches). cb fires once the write holding it is
 * flushed (ok) or has failed. */
int store_record_success(const char *payment_id, const char *processor_ref, int64_t updated_ms,
                         void (*cb)(bool ok, void *), void *arg) PC_MUSTCHECK;

/* Durable: flag gid for manual review in recovery_state (recovery never
 * settles a flagged gid by itself). cb gets ST_OK once it is flushed. */
int store_flag_review(store_chan ch, const char *gid, const char *payment_id, const char *why,
                      void (*cb)(st_status st, void *), void *arg) PC_MUSTCHECK;

/* Recovery's bookkeeping (asynchronous, best effort): attempts and last
 * error of a gid; forget drops it unless it is flagged for review. */
void store_note_attempt(const char *gid, const char *payment_id, int attempts, const char *why);
void store_forget(const char *gid);

/* The processor's own reference of a payment, as soon as any answer carries
 * it (asynchronous; not blocked by the prepared debit). */
void store_save_processor_ref(const char *payment_id, const char *processor_ref);

/* ------------------------------------------------------------ reads */

typedef struct store_payment_row {
    const char *payment_id, *key, *gid, *account, *currency;
    const char *reference;         /* NULL: none */
    const char *status;            /* derived */
    const char *processor_ref;     /* NULL: none */
    const char *decline_code;      /* NULL: none */
    const char *created_at, *updated_at;    /* ISO-8601 UTC */
    int64_t amount;
} store_payment_row;

typedef struct store_lookup {
    st_status st;
    const char *errmsg;
    bool found;
    store_payment_row row;
} store_lookup;

/* Durable answers only: a 'pending' row is flushed before it is returned. */
int store_payment_by_key(const char *key, void (*cb)(const store_lookup *, void *), void *arg) PC_MUSTCHECK;
int store_payment_by_id(const char *payment_id, void (*cb)(const store_lookup *, void *), void *arg) PC_MUSTCHECK;

typedef struct store_balance_row {
    st_status st;
    const char *errmsg;
    bool found;
    const char *currency;
    int64_t balance, held, pending_credits;
} store_balance_row;

int store_balance(const char *account, void (*cb)(const store_balance_row *, void *), void *arg) PC_MUSTCHECK;

typedef struct store_opened {
    st_status st;
    const char *errmsg;
    bool created;                  /* false: the account exists */
} store_opened;

int store_account_open(const char *account, const char *currency, void (*cb)(const store_opened *, void *), void *arg)
    PC_MUSTCHECK;

/* ------------------------------------------------------------ credits */

typedef enum {
    CR_APPLIED = 0, CR_ACCEPTED, CR_DUPLICATE_KEY, CR_UNKNOWN_ACCOUNT, CR_CURRENCY_MISMATCH,
    CR_ERROR, CR_LOST, CR_NOT_SENT, CR_SHUTDOWN
} cr_outcome;

typedef struct store_credit_res {
    cr_outcome outcome;
    const char *created_at;
    const char *errmsg;
} store_credit_res;

typedef struct store_credit_req {
    const char *credit_id, *key, *account, *currency, *reference;
    int64_t amount;
    bool apply;                    /* apply at once if the account row is free */
} store_credit_req;

/* Durable: the credit row, applied in the same transaction when asked and the account row is free. */
int store_credit(const store_credit_req *c, void (*cb)(const store_credit_res *, void *), void *arg) PC_MUSTCHECK;

typedef struct store_credit_row {
    st_status st;
    const char *errmsg;
    bool found;
    const char *credit_id, *account, *currency, *status, *created_at;
    int64_t amount;
} store_credit_row;

int store_credit_by_key(const char *key, void (*cb)(const store_credit_row *, void *), void *arg) PC_MUSTCHECK;

/* Apply an account's accepted credits if its row lock is free. applied: how
 * many; -1 when the row is locked (a prepared debit holds it). */
int store_apply_credits(store_chan ch, const char *account, void (*cb)(st_status st, int applied, void *), void *arg)
    PC_MUSTCHECK;
/* Every account with accepted credits (recovery, after a pass). Best effort. */
void store_apply_all_credits(void);

/* ------------------------------------------------------------ server facts */

int store_max_prepared(void (*cb)(st_status st, int value, void *), void *arg) PC_MUSTCHECK;

/* Prepared transactions of a node in the database and the oldest one's age. */
int store_prepared_count(const char *node, void (*cb)(st_status st, int count, double oldest_s, void *), void *arg)
    PC_MUSTCHECK;

/* ------------------------------------------------------------ node lock */

/* The node lock lives on a session of its own for the daemon's whole life.
 * lost_cb fires when that session breaks (the lock is gone with it). */
void store_set_lock_cb(void (*up_cb)(bool up));
bool store_lock_session_up(void);
/* pg_try_advisory_lock on the lock session; pid: the backend that ran it. */
int store_node_lock(const char *node, void (*cb)(st_status st, bool got, int pid, void *), void *arg) PC_MUSTCHECK;
int store_node_unlock(const char *node);
/* Is node's lock held by a live session (anyone's)? */
int store_node_alive(store_chan ch, const char *node, void (*cb)(st_status st, bool alive, void *), void *arg)
    PC_MUSTCHECK;

/* Is the lock still there, held by the lock session's own backend? On the
 * lock session, after taking it: my_pid is that statement's backend. A pooler
 * in transaction mode (pgbouncer pool_mode = transaction) runs each statement
 * on whichever server session is free, so a session lock cannot be relied on
 * there; these two checks catch it (docs/ha.md). */
int store_node_lock_check(const char *node, void (*cb)(st_status st, int my_pid, bool held_by_me, void *), void *arg)
    PC_MUSTCHECK;
/* Seen from another connection (ch): this statement's backend, and the
 * backend that holds node's lock (0: nobody). */
int store_node_lock_holder(store_chan ch, const char *node,
                           void (*cb)(st_status st, int my_pid, int holder_pid, void *), void *arg) PC_MUSTCHECK;
/* Best effort: end backend holder_pid if it still holds node's lock (a lock
 * left on a pooled server session that paycoord can no longer reach). */
void store_node_lock_evict(const char *node, int holder_pid);

/* ------------------------------------------------------------ replication safety */

typedef struct store_replication {
    st_status st;
    const char *errmsg;
    bool in_recovery;              /* the server is a standby (read-only) */
    int standbys;                  /* connected walsenders (pg_stat_replication rows) */
    int sync_standbys;             /* of which sync or quorum (-1: not visible to our role) */
    const char *sync_names;        /* synchronous_standby_names ("" when empty) */
    const char *sync_commit;       /* synchronous_commit of our sessions */
    const char *standby_list;      /* "name:state:sync_state,..." for the log ("" none) */
} store_replication;

/* The primary's replication facts for the safety check (recovery/dbsafety.c). */
int store_replication_facts(void (*cb)(const store_replication *, void *), void *arg) PC_MUSTCHECK;

/* ------------------------------------------------------------ recovery */

typedef struct store_rec_item {
    const char *gid;
    const char *payment_id;        /* "" when there is no row */
    const char *row_status;        /* "" when there is no row */
    bool prepared;                 /* a prepared transaction exists */
    bool debited;                  /* a committed ledger debit exists */
    bool review;                   /* flagged for review */
    bool past_deadline;
    int64_t age_ms;                /* since PREPARE (or the row's creation) */
    int64_t since_deadline_ms;     /* since the payment's deadline (negative before it; age_ms without a row):
                                      no create of it is sent after its deadline */
    int attempts;                  /* recorded attempts */
    /* The payment as it was sent to the processor (a replay must send the
     * same): empty / 0 / NULL without a row. */
    const char *processor_ref;     /* NULL: none known */
    const char *account;
    const char *currency;
    const char *reference;         /* NULL: none */
    const cJSON *metadata;         /* NULL: none */
    int64_t amount;
} store_rec_item;

typedef struct store_rec_list {
    st_status st;
    const char *errmsg;
    int n;
    const store_rec_item *items;
} store_rec_list;

/* Everything of node's that may need settling: every prepared transaction
 * (review ones included, for counting), 'pending' rows without one, and rows
 * whose committed debit has not been recorded as 'succeeded'. */
int store_rec_list_node(const char *node, void (*cb)(const store_rec_list *, void *), void *arg) PC_MUSTCHECK;

/* A committed debit whose row still says pending: record 'succeeded' (durable). */
int store_rec_mark_succeeded(const char *payment_id, const char *processor_ref, void (*cb)(st_status st, void *),
                             void *arg) PC_MUSTCHECK;

/* ------------------------------------------------------------ processor events */

/* One webhook event (proc.h's proc_event, as stored: NULL for none). */
typedef struct store_event {
    const char *event_id;          /* the deduplication key */
    const char *processor;         /* "stripe" | "adyen" */
    const char *gid, *processor_ref;
    const char *kind;
    const char *status;            /* succeeded | declined | pending | canceled | none */
    bool success, is_cancel;
    const char *reason;
    const char *currency;
    int64_t amount;
    bool has_amount;
} store_event;

/* Durable: insert the events of one delivery (at most 64), each only once
 * (an event_id already stored is a duplicate: nothing changes). cb gets ST_OK
 * once they are flushed, with how many were new. */
int store_save_events(const store_event *ev, int n, void (*cb)(st_status st, int fresh, void *), void *arg)
    PC_MUSTCHECK;

typedef struct store_event_list {
    st_status st;
    const char *errmsg;
    int n;
    const store_event *events;
} store_event_list;

/* The stored events of payments that may still need them: every gid with a
 * prepared transaction or a 'pending' row, oldest first. */
int store_load_events(void (*cb)(const store_event_list *, void *), void *arg) PC_MUSTCHECK;

/* ------------------------------------------------------------ admin */

typedef struct store_prepared_row {
    const char *gid, *payment_id, *account, *currency, *prepared_at, *node, *last_error;  /* NULL: none */
    int64_t amount, age_ms;
    bool has_amount;
    int attempts;
    bool review;
} store_prepared_row;

typedef struct store_prepared_list {
    st_status st;
    const char *errmsg;
    int n;
    const store_prepared_row *rows;
} store_prepared_list;

int store_prepared_list_all(int64_t older_than_ms, void (*cb)(const store_prepared_list *, void *), void *arg)
    PC_MUSTCHECK;

/* Durable: the audit row of a resolve, written before the action (outcome 'requested'). */
int store_resolve_begin(const char *gid, bool commit, const char *reason, unsigned uid, const char *node,
                        void (*cb)(st_status st, int64_t resolution_id, void *), void *arg) PC_MUSTCHECK;
/* Durable: the audit row's outcome; when settled, the review flag cleared and
 * (rollback) the payment recorded 'declined' with decline_code resolved_manually. */
int store_resolve_end(int64_t resolution_id, const char *gid, const char *outcome, bool settled, bool rolled_back,
                      void (*cb)(st_status st, void *), void *arg) PC_MUSTCHECK;

/* ------------------------------------------------------------ reconciliation */

/* Reconciliation (recovery/recon.c, docs/reconciliation.md): a run's own
 * statements (start, run, page, finish, open counts) go to a pool of one
 * connection of its own, opened by store_recon_open() (after store_init)
 * and closed by store_recon_close() (before store_shutdown); the operators'
 * reads and settlements run on recovery's pool (CH_REC). Never on the
 * payment path's connections. Each call answers one JSON text (NULL unless ST_OK);
 * errors carry the SQLSTATE (PCRCS: a page or settlement that was applied
 * already, nothing changed). */
typedef void (*store_json_fn)(st_status st, const char *sqlstate, const char *errmsg, const char *json, void *arg);

int store_recon_open(void) PC_MUSTCHECK;
void store_recon_close(void);

/* One run at a time across nodes: a session advisory lock on the lock
 * session (released with it if the daemon dies). cb(got). */
int store_recon_lock(void (*cb)(st_status st, bool got, void *), void *arg) PC_MUSTCHECK;
int store_recon_unlock(void);

typedef struct store_recon_start_req {
    int64_t from_s, to_s;          /* the window (unix seconds) */
    const char *source;            /* generic | stripe | adyen_csv */
    const char *path;              /* adyen_csv: the report; else NULL */
    const char *trigger;           /* schedule | manual */
    const char *node;
    unsigned uid;                  /* the operator's uid (manual) */
    bool only_if_new;              /* nothing when a run of this window is done */
    bool resume_only;              /* only hand back a run still running */
} store_recon_start_req;

/* Durable: the running run (resumed) or a new one, as the JSON of its
 * recon_runs row; "null" when there is none to run. */
int store_recon_start(const store_recon_start_req *q, store_json_fn cb, void *arg) PC_MUSTCHECK;
/* Durable: one page (items_json: [{gid,id,status,refunded,amount,currency,account}]) applied and the
 * cursor moved prev -> next in one transaction; answers [seen, matched, in_progress, differences, not_ours]. */
int store_recon_page(int64_t run_id, const char *prev, const char *next, const char *items_json, store_json_fn cb,
                     void *arg) PC_MUSTCHECK;
/* Durable: the run's last step (error NULL) or its failure; answers [missing_there, reviews, open].
 * settle_ms: our payments created less than this before the run started are not looked for. */
int store_recon_finish(int64_t run_id, const char *error, int64_t settle_ms, store_json_fn cb, void *arg)
    PC_MUSTCHECK;
/* One run's row (JSON as above), or "null". */
int store_recon_run(int64_t run_id, store_json_fn cb, void *arg) PC_MUSTCHECK;
/* Open discrepancies by kind: {"kind": n, ...}. */
int store_recon_open_counts(store_json_fn cb, void *arg) PC_MUSTCHECK;
/* The latest runs (newest first, at most limit): [row, ...]. */
int store_recon_runs(int limit, store_json_fn cb, void *arg) PC_MUSTCHECK;
/* Discrepancies (open ones, or all): [row, ...], at most limit, oldest first. */
int store_discrepancies(bool all, int limit, store_json_fn cb, void *arg) PC_MUSTCHECK;
/* Durable: the audit row of a settlement, written before the action ('requested');
 * answers {"settlement_id": n} or null when the discrepancy does not exist. account (NULL: none): the
 * account the operator names, for a discrepancy whose sides name none. */
int store_settle_begin(int64_t discrepancy_id, const char *action, const char *account, const char *reason,
                       unsigned uid, const char *node, store_json_fn cb, void *arg) PC_MUSTCHECK;
/* Durable: the action and the audit row's outcome in one transaction; answers
 * {"outcome": "settled"|"refused", "message", "amount", "account", "entry_id", "balance"}. */
int store_settle_do(int64_t settlement_id, store_json_fn cb, void *arg) PC_MUSTCHECK;
/* Durable: the audit row's outcome after a failed action (nothing else changed). */
int store_settle_failed(int64_t settlement_id, const char *why, store_json_fn cb, void *arg) PC_MUSTCHECK;
/* The ledger audit (I1, I4, one debit per succeeded payment) of one account or all (NULL):
 * [{"check", "account", "subject", "detail"}, ...] (empty: no offender). */
int store_audit(const char *account, store_json_fn cb, void *arg) PC_MUSTCHECK;

#endif
