/*
 * proc.h - the payment processor as the payment path and recovery see it:
 * one adapter, chosen at start, behind a table of functions. Each adapter
 * owns its request shapes, the classification of every answer into the
 * outcomes below, and the capabilities recovery may rely on. The generic
 * adapter (proc_generic.c) speaks the contract of docs/processor.md through
 * psp.c; the simulation installs an in-memory one.
 *
 * Callback contract: a call returns 0 and its callback fires exactly once,
 * later, from the loop; or it returns -1 and the callback never fires. The
 * result is valid only during the callback.
 *
 * An outcome that does not prove what happened to the money is PROC_UNKNOWN,
 * never a decline: a timeout, a reset, a 5xx, an unparsable body, a body for
 * another key, an unknown status, a 200 with an error's shape, an oversized
 * body. Answers of that kind are logged and counted
 * (D->stats.processor_bad_answers).
 *
 * Adapters (chosen by processor_api, docs/processors.md):
 *   generic  proc_generic.c  the contract of docs/processor.md: get and cancel
 *                            by our gid, cancel leaves a tombstone.
 *   stripe   proc_stripe.c   PaymentIntents: get by the pi_ id, else by
 *                            replaying the identical create before the
 *                            deadline, else by a metadata search that is
 *                            conclusive only after the search lag; cancel by
 *                            the pi_ id where the status allows.
 *   adyen    proc_adyen.c    Checkout: no read-back; get answers from the
 *                            webhooks received; cancel is the technical
 *                            cancel by our reference, its outcome a webhook;
 *                            no deciding webhook within the bound: STUCK.
 * What an adapter can do is declared in its proc_caps. Where nothing more can
 * be learnt by asking, an adapter answers PROC_STUCK, and the payment path
 * and recovery hand the gid to a person (manual review); they have no
 * per-adapter branches.
 */
#ifndef PAYCOORD_PROC_H
#define PAYCOORD_PROC_H

#include "common.h"

#include <cjson/cJSON.h>
#include <stdint.h>

typedef enum {
    PROC_PAYMENT = 0,       /* an answer with the payment's state (status below) */
    PROC_NOT_FOUND,         /* the processor has no record of this key */
    PROC_ALREADY_SUCCEEDED, /* cancel refused: it was captured (status SUCCEEDED, id set) */
    PROC_CONFLICT,          /* the key was used with another body: a bug, never guess */
    PROC_INVALID,           /* the request was refused as invalid (4xx): see payment.c for when that is a decline */
    PROC_AUTH,              /* credentials refused (401/403) */
    PROC_UNSUPPORTED,       /* this processor cannot do that (cancel by key: 501) */
    PROC_RATE_LIMITED,      /* 429: not processed; retry_after_ms says when to try again */
    PROC_UNKNOWN,           /* outcome unknown */
    PROC_STUCK              /* no progress possible by asking again: manual review (error says why) */
} proc_outcome;

typedef enum { PROC_ST_NONE = 0, PROC_ST_SUCCEEDED, PROC_ST_DECLINED, PROC_ST_PENDING, PROC_ST_CANCELED } proc_status;

typedef struct proc_result {
    proc_outcome outcome;
    proc_status status;            /* PROC_PAYMENT, PROC_ALREADY_SUCCEEDED */
    long http_status;              /* 0 when there was no HTTP answer */
    char id[128];                  /* the processor's own reference, "" if none */
    char decline_code[64];         /* declined/canceled: the reason, "" if none */
    int64_t amount;
    char currency[4];
    int retry_after_ms;            /* PROC_RATE_LIMITED: 0 if the processor gave none */
    char error[256];               /* for logs */
    double elapsed_ms;
    bool local;                    /* answered from what the adapter already knew (webhooks), no request made */
} proc_result;

typedef void (*proc_cb)(const proc_result *res, void *arg);

typedef struct proc_req {
    const char *gid;               /* the idempotency key */
    const char *payment_id;
    const char *processor_ref;     /* the processor's own id when known, else NULL */
    int64_t amount;
    const char *currency;
    const char *account;
    const char *reference;         /* NULL: none */
    const cJSON *metadata;         /* NULL: none */
    /* Time since the payment's deadline, negative before it. No create of a
     * payment is ever sent once its deadline has passed (the payment path
     * and recovery keep to it; adapters rely on it: a replayed create is
     * only sent before the deadline, a search that finds nothing is
     * conclusive only long enough after it). 0 (the default) counts as past. */
    int64_t since_deadline_ms;
    /* A prepared debit holds the money for this payment, so a get() that
     * replays the create (and so may perform it now) is allowed. False for a
     * payment row without a debit: its create must never be sent. */
    bool debit_held;
    /* No debit was ever made for this payment (no prepared transaction, no
     * committed ledger debit): no create of it can have been sent, since
     * none is sent before PREPARE. */
    bool never_debited;
} proc_req;

/* How an adapter can learn a payment's outcome (bits of proc_caps.get). */
enum {
    PROC_GET_BY_KEY = 1,            /* ask by our gid */
    PROC_GET_BY_ID = 2,             /* ask by the processor's own id (when known) */
    PROC_GET_BY_REPLAY = 4,         /* replay the identical create with the same key (inside the key window) */
    PROC_GET_BY_SEARCH = 8,         /* search by our gid in metadata; results lag */
    PROC_GET_BY_WEBHOOK = 16        /* outcomes arrive only as webhooks */
};

typedef enum {
    PROC_CANCEL_BY_KEY = 0,         /* by our gid, answered at once; leaves a tombstone */
    PROC_CANCEL_BY_ID,              /* by the processor's id, where the payment's status allows */
    PROC_CANCEL_BY_REFERENCE_ASYNC, /* by our reference; the outcome arrives as a webhook */
    PROC_CANCEL_NONE
} proc_cancel_how;

typedef struct proc_caps {
    unsigned get;                   /* PROC_GET_* bits */
    proc_cancel_how cancel;
    int64_t key_window_ms;          /* the processor keeps our idempotency key at least this long */
    int key_max;                    /* longest idempotency key it accepts */
    bool webhooks;                  /* it reports outcomes by webhook (the listener is started) */
} proc_caps;

/*
 * Webhook events. The listener (coordinator/webhook.c) has the adapter
 * verify and parse a delivery, stores the events durably (deduplicated on
 * id), and only then hands each to proc_event_record(): the adapter keeps
 * what its get() and cancel() need. A webhook never settles a payment by
 * itself; it is an answer the next get() or cancel() finds.
 */
#define PROC_EVENTS_MAX 32          /* events in one delivery */

typedef struct proc_event {
    char id[160];                  /* deduplication key (Stripe: evt_ id; Adyen: pspReference:eventCode:success) */
    char gid[208];                 /* our gid (metadata gid / merchant reference); "" if none */
    char processor_ref[128];       /* the payment's id at the processor ("" if none) */
    char kind[64];                 /* event type or eventCode */
    proc_status status;            /* what it says the payment is; NONE: nothing final (e.g. a failed cancel) */
    bool success;
    bool cancel;                   /* it reports the outcome of a cancel */
    char reason[128];
    int64_t amount;
    char currency[4];
} proc_event;

typedef enum {
    PROC_WH_OK = 0,                /* events parsed and authentic */
    PROC_WH_UNSIGNED,              /* no signature, or a wrong one: rejected, nothing changed */
    PROC_WH_MALFORMED,             /* not a delivery of this processor */
    PROC_WH_UNSUPPORTED            /* this adapter takes no webhooks */
} proc_wh_status;

typedef struct proc_webhook_in {
    const char *body;
    size_t len;
    const char *signature;         /* the signature header (Stripe-Signature), NULL if absent */
    int64_t now_s;                 /* wall clock, for signature timestamps */
} proc_webhook_in;

/*
 * Listing (reconciliation, recovery/recon.c): the processor's own records of
 * a window, a page at a time, in a stable order, resumable from a cursor the
 * adapter makes. generic: GET /v1/payments with created bounds and
 * starting_after; stripe: GET /v1/payment_intents with created[gte]/[lt] and
 * starting_after; adyen: no listing API, so a settlement details report (CSV)
 * read from a file (req->path), the cursor being a byte offset in it.
 * Listing runs on a client of its own (one connection), never on the
 * payment path's.
 */
#define PROC_LIST_MAX 1000          /* records in one page at most */

typedef struct proc_list_item {
    char gid[208];                 /* our gid (key, metadata gid, merchant reference); "" if none */
    char id[128];                  /* the processor's own id */
    proc_status status;            /* SUCCEEDED, DECLINED, PENDING, CANCELED */
    bool refunded;                 /* refunded (or charged back) afterwards */
    int64_t refunded_amount;       /* how much of it, when the processor says (0: all of it, or unknown) */
    int64_t amount;
    char currency[4];
    char account[72];              /* the account it names, "" if none */
} proc_list_item;

typedef struct proc_list_req {
    int64_t from_s, to_s;          /* created in [from_s, to_s) (unix seconds) */
    const char *cursor;            /* "" : from the start; else a cursor of a page of this adapter */
    int limit;                     /* 1..PROC_LIST_MAX */
    const char *path;              /* adyen: the settlement report file */
} proc_list_req;

typedef struct proc_list_page {
    proc_outcome outcome;          /* PROC_PAYMENT: a page; else why not (RATE_LIMITED, AUTH, UNKNOWN, INVALID) */
    int n;
    const proc_list_item *items;
    char cursor[200];              /* where the next page starts */
    bool more;                     /* false: the window is done */
    int retry_after_ms;
    char error[256];
} proc_list_page;

typedef void (*proc_list_cb)(const proc_list_page *page, void *arg);

typedef struct proc_adapter {
    const char *name;
    int (*create)(const proc_req *req, proc_cb cb, void *arg);
    int (*get)(const proc_req *req, proc_cb cb, void *arg);
    int (*cancel)(const proc_req *req, proc_cb cb, void *arg);
    int (*in_flight)(void);
    void (*shutdown)(void);
    const proc_caps *caps;
    /* Verify and parse one webhook delivery into events[max] (*n set); NULL: no webhooks. */
    proc_wh_status (*webhook)(const proc_webhook_in *in, proc_event *events, int max, int *n, char *err,
                              size_t errlen);
    /* Note one durable event (called again for the same event: no change). NULL: nothing kept. */
    void (*event)(const proc_event *ev);
    /* The stored events have all been handed over (after a start). */
    void (*events_loaded)(void);
    /* The signature header the webhook carries, or NULL. */
    const char *webhook_header;
    /* Can it answer yet (Adyen: its stored webhook events are loaded)? NULL: always. */
    bool (*ready)(void);
    /* One page of the processor's own list (above); NULL: cannot list. */
    int (*list)(const proc_list_req *req, proc_list_cb cb, void *arg);
} proc_adapter;

void proc_use(const proc_adapter *a);
const proc_adapter *proc_current(void);

int proc_create(const proc_req *req, proc_cb cb, void *arg) PC_MUSTCHECK;
int proc_get(const proc_req *req, proc_cb cb, void *arg) PC_MUSTCHECK;
int proc_cancel(const proc_req *req, proc_cb cb, void *arg) PC_MUSTCHECK;
int proc_in_flight(void);
void proc_shutdown(void);
const proc_caps *proc_caps_get(void);   /* NULL before an adapter is in use */

proc_wh_status proc_webhook(const proc_webhook_in *in, proc_event *events, int max, int *n, char *err,
                            size_t errlen);
void proc_event_record(const proc_event *ev);
void proc_events_loaded(void);
const char *proc_webhook_header(void);  /* NULL: none */
/* The adapter can answer: recovery's passes wait for it (so the first pass,
 * and readiness with it, never runs on a partial picture). */
bool proc_ready(void);

/* One page of the adapter's list (proc_list.c); -1 (no callback) when it cannot list. */
int proc_list(const proc_list_req *req, proc_list_cb cb, void *arg) PC_MUSTCHECK;
/* The listing clients' shutdown (pending callbacks fire with PROC_UNKNOWN "shutdown"). */
void proc_list_shutdown(void);
/* The adapters' list implementations (proc_list.c, proc_list_adyen.c). */
int proc_list_generic(const proc_list_req *req, proc_list_cb cb, void *arg);
int proc_list_stripe(const proc_list_req *req, proc_list_cb cb, void *arg);
int proc_list_adyen_csv(const proc_list_req *req, proc_list_cb cb, void *arg);
void proc_list_adyen_stop(void);

const char *proc_outcome_name(proc_outcome o);
const char *proc_status_name(proc_status s);
/* "succeeded" ... -> status; PROC_ST_NONE when unknown. */
proc_status proc_status_parse(const char *s);

/* The adapter processor_api names, its HTTP client started from D->cfg. */
int proc_start(void) PC_MUSTCHECK;
int proc_generic_start(void) PC_MUSTCHECK;
int proc_stripe_start(void) PC_MUSTCHECK;
int proc_adyen_start(void) PC_MUSTCHECK;

#endif
