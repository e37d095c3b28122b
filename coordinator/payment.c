/*
 * payment.c - the payment state machine: two-phase commit across PostgreSQL
 * and the payment processor (DESIGN.md), per-account queueing, idempotency,
 * credits, and the client ops that read money (status, balance).
 *
 * Lifecycle of one payment, with its crash windows:
 *
 *  1. QUEUED      waits in memory behind the payment holding its account.
 *                 Nothing written. Crash: nothing happened.
 *  2. PHASE1      one round trip: "BEGIN; SET LOCAL synchronous_commit TO off;
 *                 pc_pay_intent(); COMMIT; BEGIN; SET LOCAL lock_timeout ...;
 *                 pc_pay_debit(); PREPARE TRANSACTION gid". A row locked by
 *                 another node's prepared debit makes the debit retry later
 *                 instead of parking a connection. The intent row commits asynchronously; the
 *                 PREPARE flush (1st synchronous WAL flush) makes it durable too.
 *                 Crash before PREPARE: a 'pending' row with no debit; recovery
 *                 settles it as declined (nothing charged).
 *  3. CREATE      the processor is asked to charge, Idempotency-Key = gid.
 *                 Crash here: the debit stays prepared; recovery asks the
 *                 processor by gid (not found -> cancel tombstone -> rollback).
 *  4. POLL/CANCEL the answer was pending or unknown: poll by gid until final
 *                 or the deadline, then cancel by gid (tombstone).
 *  5. PHASE2      "COMMIT PREPARED gid" or "ROLLBACK PREPARED gid" (2nd and last
 *                 synchronous flush). status = 'succeeded' was written inside
 *                 the prepared transaction, so it commits with the debit.
 *                 Crash: recovery repeats the decision from the processor.
 *                 A dropped connection: resend; "does not exist" means it was
 *                 settled: read the row to learn how.
 *  6. SETTLE      after a rollback (or with no debit) the row becomes
 *                 'declined' / 'insufficient_funds' via pc_pay_settle. Declined
 *                 after rollback is written asynchronously (the processor can
 *                 rebuild it); insufficient_funds and account_locked synchronously
 *                 before the answer, because nothing else could rebuild them.
 *
 * Unknown outcomes never become declines: a payment whose processor answer is
 * unknown stays prepared (funds held) and is polled; its clients get status
 * 'pending' when their wait_ms runs out.
 *
 * One function, pay_set_state(), changes a payment's state and logs old -> new.
 */
#include "daemon.h"
#include "log.h"
#include "sbuf.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <uuid/uuid.h>

#include <event2/event.h>

typedef enum {
    PS_QUEUED = 0,
    PS_PHASE1,
    PS_DEBIT_WAIT,
    PS_DBCHECK,
    PS_DBCHECK_WAIT,
    PS_LOOKUP,
    PS_CREATE,
    PS_CREATE_WAIT,
    PS_POLL,
    PS_POLL_WAIT,
    PS_CANCEL,
    PS_CANCEL_WAIT,
    PS_PHASE2,
    PS_PHASE2_WAIT,
    PS_PHASE2_CHECK,
    PS_SETTLE,
    PS_SETTLE_WAIT,
    PS_DONE
} pay_state;

static const char *const state_names[] = {
    "queued", "phase1", "debit_wait", "dbcheck", "dbcheck_wait", "lookup", "create", "create_wait",
    "poll", "poll_wait", "cancel", "cancel_wait", "phase2", "phase2_wait", "phase2_check", "settle",
    "settle_wait", "done",
};

typedef enum { DEC_NONE = 0, DEC_COMMIT, DEC_ROLLBACK } decision;

struct account;
struct payment;

typedef struct waiter {
    pc_request *r;
    struct payment *p;
    struct event *timer;
    struct waiter *next;
    int64_t wait_ms;
    bool replayed;
} waiter;

typedef struct payment {
    char payment_id[37];
    char gid[80];
    char key[PROTO_KEY_MAX + 1];
    char account[PROTO_ACCOUNT_MAX + 1];
    char currency[4];
    int64_t amount;
    char *reference;
    cJSON *metadata;

    pay_state state;
    const char *status;              /* "pending" until final */
    char processor_ref[128];
    char decline_code[64];
    int64_t created_wall_ms, updated_wall_ms;
    uint64_t started_ms;             /* monotonic: admission */
    uint64_t prepared_ms;            /* monotonic: PREPARE confirmed */

    bool intent_committed;
    bool prepared;                   /* we hold its prepared transaction */
    bool waits_armed;                /* waiters' wait_ms timers run */
    bool final;
    decision dec;
    char settle_status[24];          /* status pc_pay_settle writes */
    bool settle_sync;

    int attempts;                    /* of the current step */
    struct event *timer;
    waiter *waiters;
    struct account *acct;
    struct payment *next_in_queue;
} payment;

typedef struct account {
    char id[PROTO_ACCOUNT_MAX + 1];
    payment *active;                 /* holds the row lock (or is about to) */
    payment *head, *tail;            /* queued */
    int nqueued;
    bool credits_pending;            /* accepted credits to apply when free */
    bool applying;                   /* pc_apply_credits in progress */
} account;

static strmap *by_key;               /* idempotency key -> payment in memory */
static strmap *by_id;                /* payment_id -> payment in memory */
static strmap *accounts;             /* account id -> account with work */
static int in_flight;

static void start_phase1(payment *p);
static void start_create(payment *p);
static void start_poll(payment *p, int delay_ms);
static void start_cancel(payment *p);
static void start_phase2(payment *p);
static void start_settle(payment *p, const char *status, const char *decline_code, bool sync);
static void start_dbcheck(payment *p);
static void payment_done(payment *p);
static void account_next(account *a);
static void account_release(account *a);

int pay_in_flight(void) { return in_flight; }

/* Is this gid driven by a live payment of this daemon? gid = pc:<node>:<32 hex
 * of the payment uuid>, so the uuid is recovered from it. */
bool pay_gid_is_live(const char *gid)
{
    const char *hex = strrchr(gid, ':');
    if (!hex || strlen(hex + 1) != 32 || !by_id)
        return false;
    hex++;
    char id[37];
    size_t j = 0;
    for (size_t i = 0; i < 32; i++) {
        if (i == 8 || i == 12 || i == 16 || i == 20)
            id[j++] = '-';
        id[j++] = hex[i];
    }
    id[j] = '\0';
    return strmap_get(by_id, id) != NULL;
}

/* ---------------------------------------------------------------- helpers */

static void pay_set_state(payment *p, pay_state s)
{
    if (p->state == s)
        return;
    log_debug("payment gid=%s key=%s state=%s->%s", p->gid, p->key, state_names[p->state], state_names[s]);
    p->state = s;
}

static int backoff_ms(int base, int attempt, int cap)
{
    int64_t d = base;
    for (int i = 0; i < attempt && d < cap; i++)
        d *= 2;
    if (d > cap)
        d = cap;
    /* equal jitter: half fixed, half random */
    return (int)(d / 2 + (random() % (d / 2 + 1)));
}

static void arm_timer(payment *p, int ms, event_callback_fn cb)
{
    if (p->timer)
        event_free(p->timer);
    p->timer = evtimer_new(D->base, cb, p);
    struct timeval tv = { ms / 1000, (ms % 1000) * 1000 };
    if (p->timer)
        evtimer_add(p->timer, &tv);
}

static bool past_deadline(const payment *p)
{
    uint64_t since = p->prepared_ms ? p->prepared_ms : p->started_ms;
    return pc_now_ms() >= since + (uint64_t)D->cfg.payment_deadline_ms;
}

static void new_uuid(char out[37])
{
    uuid_t u;
    uuid_generate_random(u);
    uuid_unparse_lower(u, out);
}

static const char *psp_status_or_code(const psp_payment *pp)
{
    if (pp->decline_code[0])
        return pp->decline_code;
    return pp->status == PSP_ST_CANCELED ? "canceled" : "declined";
}

/* The payment object of PROTOCOL.md. */
static cJSON *payment_json(const payment *p, bool replayed)
{
    cJSON *o = cJSON_CreateObject();
    char t1[32], t2[32];
    pc_format_time(p->created_wall_ms, t1);
    pc_format_time(p->updated_wall_ms, t2);
    cJSON_AddStringToObject(o, "payment_id", p->payment_id);
    cJSON_AddStringToObject(o, "idempotency_key", p->key);
    cJSON_AddStringToObject(o, "gid", p->gid);
    cJSON_AddStringToObject(o, "account", p->account);
    cJSON_AddNumberToObject(o, "amount", (double)p->amount);
    cJSON_AddStringToObject(o, "currency", p->currency);
    if (p->reference)
        cJSON_AddStringToObject(o, "reference", p->reference);
    else
        cJSON_AddNullToObject(o, "reference");
    cJSON_AddStringToObject(o, "status", p->status);
    if (p->processor_ref[0])
        cJSON_AddStringToObject(o, "processor_ref", p->processor_ref);
    else
        cJSON_AddNullToObject(o, "processor_ref");
    if (p->decline_code[0] && strcmp(p->status, "declined") == 0)
        cJSON_AddStringToObject(o, "decline_code", p->decline_code);
    else
        cJSON_AddNullToObject(o, "decline_code");
    cJSON_AddStringToObject(o, "created_at", t1);
    cJSON_AddStringToObject(o, "updated_at", t2);
    if (replayed)
        cJSON_AddBoolToObject(o, "replayed", true);
    return o;
}

/* Columns every payment lookup selects, in this order (row_json reads them). */
#define PAYMENT_COLUMNS \
    "payment_id::text, idempotency_key, gid, account_id, amount::text, currency, reference, status, " \
    "processor_ref, decline_code, " \
    "to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), " \
    "to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"

static cJSON *row_json(const PGresult *res, int row, bool replayed)
{
    cJSON *o = cJSON_CreateObject();
    static const char *const names[] = { "payment_id", "idempotency_key", "gid", "account", "amount",
                                         "currency", "reference", "status", "processor_ref",
                                         "decline_code", "created_at", "updated_at" };
    for (int i = 0; i < 12; i++) {
        if (PQgetisnull(res, row, i))
            cJSON_AddNullToObject(o, names[i]);
        else if (i == 4)
            cJSON_AddNumberToObject(o, names[i], (double)strtoll(PQgetvalue(res, row, i), NULL, 10));
        else
            cJSON_AddStringToObject(o, names[i], PQgetvalue(res, row, i));
    }
    if (replayed)
        cJSON_AddBoolToObject(o, "replayed", true);
    return o;
}

static bool same_request(const payment *p, const proto_request *q)
{
    return strcmp(p->account, q->account) == 0 && p->amount == q->amount && strcmp(p->currency, q->currency) == 0;
}

/* ---------------------------------------------------------------- waiters */

static void waiter_free(waiter *w)
{
    if (w->timer)
        event_free(w->timer);
    free(w);
}

static void waiter_unlink(payment *p, waiter *w)
{
    for (waiter **pp = &p->waiters; *pp; pp = &(*pp)->next)
        if (*pp == w) {
            *pp = w->next;
            return;
        }
}

/* wait_ms ran out: answer with the payment as it stands (pending); it goes on. */
static void waiter_timeout_cb(evutil_socket_t fd, short what, void *arg)
{
    waiter *w = arg;
    payment *p = w->p;
    waiter_unlink(p, w);
    D->stats.payments_left_pending++;
    log_info("payment gid=%s key=%s event=answered_pending wait_ms=%lld state=%s", p->gid, p->key,
             (long long)w->wait_ms, state_names[p->state]);
    server_reply_ok(w->r, payment_json(p, w->replayed));
    waiter_free(w);
}

static void arm_waiter(waiter *w)
{
    if (w->timer)
        return;
    w->timer = evtimer_new(D->base, waiter_timeout_cb, w);
    struct timeval tv = { w->wait_ms / 1000, (w->wait_ms % 1000) * 1000 };
    if (w->timer)
        evtimer_add(w->timer, &tv);
}

/* From here on the debit may be prepared: clients may be told 'pending'. */
static void arm_waiters(payment *p)
{
    p->waits_armed = true;
    for (waiter *w = p->waiters; w; w = w->next)
        arm_waiter(w);
}

static int add_waiter(payment *p, pc_request *r, bool replayed)
{
    waiter *w = calloc(1, sizeof(*w));
    if (!w)
        return -1;
    w->r = r;
    w->p = p;
    w->replayed = replayed;
    w->wait_ms = r->req.has_wait_ms ? r->req.wait_ms : D->cfg.pay_wait_ms;
    w->next = p->waiters;
    p->waiters = w;
    if (p->waits_armed)
        arm_waiter(w);
    return 0;
}

/* Answer every waiter with the final payment object. */
static void answer_final(payment *p)
{
    while (p->waiters) {
        waiter *w = p->waiters;
        p->waiters = w->next;
        server_reply_ok(w->r, payment_json(p, w->replayed));
        waiter_free(w);
    }
}

/* Answer every waiter with an error (only where nothing was charged, or with
 * a code that says the outcome is not known). */
static void answer_error(payment *p, proto_err code, const char *msg)
{
    while (p->waiters) {
        waiter *w = p->waiters;
        p->waiters = w->next;
        server_reply_err(w->r, code, "%s", msg);
        waiter_free(w);
    }
}

/* ---------------------------------------------------------------- lifecycle */

static payment *payment_new(const proto_request *q)
{
    payment *p = calloc(1, sizeof(*p));
    if (!p)
        return NULL;
    new_uuid(p->payment_id);
    char hex[33];
    size_t j = 0;
    for (size_t i = 0; p->payment_id[i] && j < 32; i++)
        if (p->payment_id[i] != '-')
            hex[j++] = p->payment_id[i];
    hex[j] = '\0';
    snprintf(p->gid, sizeof(p->gid), "pc:%s:%s", D->cfg.node_id, hex);
    memcpy(p->key, q->idempotency_key, sizeof(p->key));
    memcpy(p->account, q->account, sizeof(p->account));
    memcpy(p->currency, q->currency, sizeof(p->currency));
    p->amount = q->amount;
    if (q->reference && !(p->reference = strdup(q->reference)))
        goto fail;
    if (q->metadata && !(p->metadata = cJSON_Duplicate(q->metadata, true)))
        goto fail;
    p->status = "pending";
    p->created_wall_ms = p->updated_wall_ms = pc_wall_ms();
    p->started_ms = pc_now_ms();
    if (strmap_put(by_key, p->key, p) != 0)
        goto fail;
    if (strmap_put(by_id, p->payment_id, p) != 0) {
        strmap_del(by_key, p->key);
        goto fail;
    }
    in_flight++;
    return p;
fail:
    free(p->reference);
    cJSON_Delete(p->metadata);
    free(p);
    return NULL;
}

static void payment_free(payment *p)
{
    if (p->timer)
        event_free(p->timer);
    free(p->reference);
    cJSON_Delete(p->metadata);
    free(p);
}

/* The payment leaves memory: its answer is final (or it was refused before
 * anything was written, or it is left prepared for recovery). */
static void payment_done(payment *p)
{
    pay_set_state(p, PS_DONE);
    if (p->waiters)
        answer_final(p);
    strmap_del(by_key, p->key);
    strmap_del(by_id, p->payment_id);
    in_flight--;
    account *a = p->acct;
    if (a && a->active == p)
        account_release(a);
    payment_free(p);
}

/* Final outcome known and durable (or rebuildable): answer clients. */
static void payment_final(payment *p, const char *status)
{
    p->status = status;
    p->final = true;
    p->updated_wall_ms = pc_wall_ms();
    if (!strcmp(status, "succeeded"))
        D->stats.payments_succeeded++;
    else if (!strcmp(status, "declined"))
        D->stats.payments_declined++;
    else if (!strcmp(status, "insufficient_funds"))
        D->stats.payments_insufficient++;
    log_info("payment gid=%s key=%s account=%s amount=%lld currency=%s event=final status=%s processor_ref=%s decline_code=%s ms=%llu",
             p->gid, p->key, p->account, (long long)p->amount, p->currency, status,
             p->processor_ref[0] ? p->processor_ref : "-", p->decline_code[0] ? p->decline_code : "-",
             (unsigned long long)(pc_now_ms() - p->started_ms));
    answer_final(p);
}

/* ---------------------------------------------------------------- accounts */

static account *account_get(const char *id)
{
    account *a = strmap_get(accounts, id);
    if (a)
        return a;
    a = calloc(1, sizeof(*a));
    if (!a)
        return NULL;
    memcpy(a->id, id, strlen(id) + 1);
    if (strmap_put(accounts, a->id, a) != 0) {
        free(a);
        return NULL;
    }
    return a;
}

static void account_maybe_free(account *a)
{
    if (!a->active && !a->head && !a->credits_pending && !a->applying) {
        strmap_del(accounts, a->id);
        free(a);
    }
}

static void apply_credits_cb(const pgpool_reply *r, void *arg)
{
    account *a = arg;
    a->applying = false;
    if (r->status == PGQ_OK && r->nresults > 0 && PQntuples(r->results[0]) == 1) {
        long applied = strtol(PQgetvalue(r->results[0], 0, 0), NULL, 10);
        if (applied >= 0) {
            a->credits_pending = false;
            D->stats.credits_applied += (uint64_t)applied;
            log_info("event=credits_applied account=%s count=%ld", a->id, applied);
        } else {
            /* Locked by a prepared debit this daemon does not drive: the
             * periodic recovery pass applies them once it is settled. */
            a->credits_pending = false;
            log_info("event=credits_deferred account=%s reason=row_locked", a->id);
        }
    } else if (r->status != PGQ_SHUTDOWN) {
        a->credits_pending = false;     /* the periodic pass retries */
        log_warn("event=credits_apply_failed account=%s error=\"%s\"", a->id, r->errmsg);
    }
    account_next(a);
}

/* Start the next piece of work on an account whose row lock is free. */
static void account_next(account *a)
{
    if (a->active || a->applying)
        return;
    if (a->credits_pending && !D->shutting_down) {
        sbuf q;
        sbuf_init(&q);
        sbuf_puts(&q, "SELECT pc_apply_credits(");
        sbuf_literal(&q, a->id);
        sbuf_puts(&q, ")");
        a->applying = true;
        if (!sbuf_ok(&q) || pgpool_query(D->pool, sbuf_str(&q), apply_credits_cb, a) != PGPOOL_QUEUED)
            a->applying = false;            /* the periodic sweep applies them later */
        sbuf_free(&q);
        if (a->applying)
            return;
        a->credits_pending = false;
    }
    payment *p = a->head;
    if (!p) {
        account_maybe_free(a);
        return;
    }
    a->head = p->next_in_queue;
    if (!a->head)
        a->tail = NULL;
    a->nqueued--;
    p->next_in_queue = NULL;
    if (p->timer) {                 /* the queue timeout no longer applies */
        event_free(p->timer);
        p->timer = NULL;
    }
    a->active = p;
    start_phase1(p);
}

static void account_release(account *a)
{
    a->active = NULL;
    account_next(a);
}

static void queue_timeout_cb(evutil_socket_t fd, short what, void *arg)
{
    payment *p = arg;
    account *a = p->acct;
    for (payment **pp = &a->head; *pp; pp = &(*pp)->next_in_queue)
        if (*pp == p) {
            *pp = p->next_in_queue;
            break;
        }
    a->tail = NULL;
    for (payment *q = a->head; q; q = q->next_in_queue)
        a->tail = q;
    a->nqueued--;
    log_warn("payment gid=%s key=%s account=%s event=queue_timeout queued_ms=%d", p->gid, p->key, p->account,
             D->cfg.queue_timeout_ms);
    answer_error(p, PROTO_ERR_OVERLOADED,
                 "account busy: the payment waited too long behind others on its account; nothing was charged");
    p->acct = NULL;
    payment_done(p);
    account_maybe_free(a);
}

/* ---------------------------------------------------------------- circuit */

/* Closed: everything passes. Open: nothing, until circuit_open_ms has passed;
 * then one payment goes through as the probe (half-open) and the next is let
 * through only after another circuit_open_ms, unless a success closes it. */
static bool circuit_allows(void)
{
    if (D->circuit == CIRCUIT_CLOSED)
        return true;
    uint64_t now = pc_now_ms();
    if (now < D->circuit_until_ms)
        return false;
    if (D->circuit == CIRCUIT_OPEN)
        log_notice("event=circuit state=half_open");
    D->circuit = CIRCUIT_HALF_OPEN;
    D->circuit_until_ms = now + (uint64_t)D->cfg.circuit_open_ms;
    return true;
}

static void circuit_record(bool ok);

/* 401/403: the credentials are wrong; no point in trying more payments. */
static void circuit_open_now(void)
{
    if (D->circuit != CIRCUIT_OPEN)
        log_error("event=circuit state=open reason=processor_auth alert=credentials");
    D->circuit = CIRCUIT_OPEN;
    D->circuit_until_ms = pc_now_ms() + (uint64_t)D->cfg.circuit_open_ms;
    D->processor_ok = false;
    D->stats.processor_failures++;
}

static void circuit_record(bool ok)
{
    if (ok) {
        if (D->circuit != CIRCUIT_CLOSED)
            log_notice("event=circuit state=closed");
        D->circuit = CIRCUIT_CLOSED;
        D->consecutive_failures = 0;
        D->processor_ok = true;
        return;
    }
    D->processor_ok = false;
    D->stats.processor_failures++;
    D->consecutive_failures++;
    if ((D->circuit == CIRCUIT_HALF_OPEN && D->consecutive_failures >= 1) ||
        (D->circuit == CIRCUIT_CLOSED && D->consecutive_failures >= D->cfg.circuit_failures)) {
        D->circuit = CIRCUIT_OPEN;
        D->circuit_until_ms = pc_now_ms() + (uint64_t)D->cfg.circuit_open_ms;
        log_error("event=circuit state=open failures=%d open_ms=%d alert=processor_unreachable",
                  D->consecutive_failures, D->cfg.circuit_open_ms);
    }
}

static void record_latency(double ms)
{
    D->stats.processor_calls++;
    D->stats.lat_sum_ms += ms;
    int b = 0;
    double lim = 1.0;
    while (b < PC_LAT_BUCKETS - 1 && ms > lim) {
        lim *= 2;
        b++;
    }
    D->stats.lat_buckets[b]++;
}

/* ---------------------------------------------------------------- phase 1 */

static void phase1_cb(const pgpool_reply *r, void *arg);

static void debit_retry_cb(evutil_socket_t fd, short what, void *arg)
{
    start_phase1(arg);
}

static void start_phase1(payment *p)
{
    pay_set_state(p, PS_PHASE1);
    FAILPOINT("before_debit", p->key);
    sbuf q;
    sbuf_init(&q);
    if (!p->intent_committed) {
        char *meta = p->metadata ? cJSON_PrintUnformatted(p->metadata) : NULL;
        sbuf_puts(&q, "BEGIN; SET LOCAL synchronous_commit TO off; SELECT pc_pay_intent(");
        sbuf_literal(&q, p->payment_id);
        sbuf_puts(&q, ", ");
        sbuf_literal(&q, p->key);
        sbuf_puts(&q, ", ");
        sbuf_literal(&q, p->account);
        sbuf_printf(&q, ", %lld, ", (long long)p->amount);
        sbuf_literal(&q, p->currency);
        sbuf_puts(&q, ", ");
        sbuf_literal(&q, p->reference);
        sbuf_puts(&q, ", ");
        sbuf_literal(&q, meta);
        sbuf_puts(&q, "::jsonb, ");
        sbuf_literal(&q, p->gid);
        sbuf_puts(&q, ", ");
        sbuf_literal(&q, D->cfg.node_id);
        sbuf_printf(&q, ", %d); COMMIT; ", D->cfg.payment_deadline_ms);
        free(meta);
    }
    sbuf_printf(&q, "BEGIN; SET LOCAL lock_timeout TO '%dms'; SELECT pc_pay_debit(", D->cfg.db_lock_timeout_ms);
    sbuf_literal(&q, p->payment_id);
    sbuf_puts(&q, ", ");
    sbuf_literal(&q, p->account);
    sbuf_printf(&q, ", %lld); PREPARE TRANSACTION ", (long long)p->amount);
    sbuf_literal(&q, p->gid);
    int rc = sbuf_ok(&q) ? pgpool_query(D->pool, sbuf_str(&q), phase1_cb, p) : PGPOOL_OVERLOADED;
    sbuf_free(&q);
    if (rc == PGPOOL_QUEUED)
        return;
    if (!p->intent_committed) {
        /* Nothing was written: refuse cleanly. */
        answer_error(p, rc == PGPOOL_UNAVAILABLE ? PROTO_ERR_UNAVAILABLE : PROTO_ERR_OVERLOADED,
                     rc == PGPOOL_UNAVAILABLE ? "database unavailable; nothing was charged"
                                              : "database queue full; nothing was charged");
        payment_done(p);
        return;
    }
    /* The intent row exists but no debit: try again shortly. */
    pay_set_state(p, PS_DEBIT_WAIT);
    arm_timer(p, backoff_ms(100, p->attempts++, 2000), debit_retry_cb);
}

static void lookup_cb(const pgpool_reply *r, void *arg);

/* The key is already in the database (an earlier run, or another node):
 * answer from the stored row. */
static void start_lookup(payment *p)
{
    pay_set_state(p, PS_LOOKUP);
    const char *params[1] = { p->key };
    int rc = pgpool_query_params(D->pool, "SELECT " PAYMENT_COLUMNS " FROM payments WHERE idempotency_key = $1",
                                 1, params, lookup_cb, p);
    if (rc != PGPOOL_QUEUED) {
        answer_error(p, PROTO_ERR_UNAVAILABLE, "database unavailable; nothing was charged");
        payment_done(p);
    }
}

static void lookup_cb(const pgpool_reply *r, void *arg)
{
    payment *p = arg;
    if (r->status != PGQ_OK || r->nresults < 1 || PQntuples(r->results[0]) != 1) {
        answer_error(p, r->status == PGQ_OK ? PROTO_ERR_INTERNAL : PROTO_ERR_UNAVAILABLE,
                     "could not read the stored payment for this key; nothing new was charged");
        payment_done(p);
        return;
    }
    const PGresult *res = r->results[0];
    bool same = strcmp(PQgetvalue(res, 0, 3), p->account) == 0 &&
                strtoll(PQgetvalue(res, 0, 4), NULL, 10) == p->amount &&
                strcmp(PQgetvalue(res, 0, 5), p->currency) == 0;
    if (same)
        D->stats.replays++;
    while (p->waiters) {
        waiter *w = p->waiters;
        p->waiters = w->next;
        if (same)
            server_reply_ok(w->r, row_json(res, 0, true));
        else
            server_reply_err(w->r, PROTO_ERR_IDEMPOTENCY_CONFLICT,
                             "idempotency key %s was used with another account, amount or currency", p->key);
        waiter_free(w);
    }
    payment_done(p);
}

static void phase1_cb(const pgpool_reply *r, void *arg)
{
    payment *p = arg;
    if (r->status == PGQ_OK) {
        p->intent_committed = true;
        p->prepared = true;
        p->prepared_ms = pc_now_ms();
        p->attempts = 0;
        D->prepared++;
        log_info("payment gid=%s key=%s account=%s amount=%lld currency=%s event=prepared db_ms=%.1f",
                 p->gid, p->key, p->account, (long long)p->amount, p->currency, r->elapsed_ms);
        FAILPOINT("after_prepare", p->key);
        arm_waiters(p);
        start_create(p);
        return;
    }
    if (r->status == PGQ_SHUTDOWN) {
        answer_error(p, PROTO_ERR_SHUTTING_DOWN, "the daemon is shutting down; nothing was charged");
        payment_done(p);
        return;
    }
    if (r->status == PGQ_CONN_LOST) {
        if (!r->sent && !p->intent_committed) {
            answer_error(p, PROTO_ERR_UNAVAILABLE, "database connection lost; nothing was charged");
            payment_done(p);
        } else {
            start_dbcheck(p);       /* did the intent commit? did PREPARE happen? */
        }
        return;
    }
    /* PGQ_SQL_ERROR: everything after the failing statement was skipped. With
     * the intent in the string, results 0..3 are its BEGIN/SET/SELECT/COMMIT. */
    if (!p->intent_committed && r->nresults >= 5)
        p->intent_committed = true;
    const char *st = r->sqlstate;
    if (!strcmp(st, "PCUA1")) {
        answer_error(p, PROTO_ERR_UNKNOWN_ACCOUNT, "unknown account");
        payment_done(p);
    } else if (!strcmp(st, "PCCM1")) {
        char msg[160];
        snprintf(msg, sizeof(msg), "%s", r->errmsg);
        answer_error(p, PROTO_ERR_CURRENCY_MISMATCH, msg);
        payment_done(p);
    } else if (!strcmp(st, "PCDUP")) {
        start_lookup(p);
    } else if (!strcmp(st, "PCNSF")) {
        log_info("payment gid=%s key=%s account=%s amount=%lld event=insufficient_funds", p->gid, p->key,
                 p->account, (long long)p->amount);
        start_settle(p, "insufficient_funds", NULL, true);
    } else if (p->intent_committed) {
        /* lock_not_available (another node's prepared transaction holds the
         * row), serialization failures, ...: retry the debit until the queue
         * timeout, then decline without ever contacting the processor. */
        if (pc_now_ms() - p->started_ms >= (uint64_t)D->cfg.queue_timeout_ms) {
            log_warn("payment gid=%s key=%s account=%s event=debit_gave_up sqlstate=%s error=\"%s\"", p->gid,
                     p->key, p->account, st, r->errmsg);
            start_settle(p, "declined", "account_locked", true);
            return;
        }
        log_info("payment gid=%s key=%s event=debit_retry sqlstate=%s error=\"%s\"", p->gid, p->key, st, r->errmsg);
        pay_set_state(p, PS_DEBIT_WAIT);
        arm_timer(p, backoff_ms(50, p->attempts++, 1000), debit_retry_cb);
    } else {
        log_error("payment gid=%s key=%s event=intent_failed sqlstate=%s error=\"%s\"", p->gid, p->key, st,
                  r->errmsg);
        answer_error(p, PROTO_ERR_INTERNAL, "the payment could not be recorded; nothing was charged");
        payment_done(p);
    }
}

/* ---------------------------------------------------------------- dbcheck */

static void dbcheck_cb(const pgpool_reply *r, void *arg);

static void dbcheck_retry_cb(evutil_socket_t fd, short what, void *arg)
{
    start_dbcheck(arg);
}

/* The connection broke while phase 1 was in the air: find out what happened. */
static void start_dbcheck(payment *p)
{
    pay_set_state(p, PS_DBCHECK);
    arm_waiters(p);             /* a debit may exist: from now on clients may be told 'pending' */
    const char *params[1] = { p->payment_id };
    int rc = pgpool_query_params(D->pool,
        "SELECT p.status, EXISTS (SELECT 1 FROM pg_prepared_xacts x WHERE x.gid = p.gid) "
        "FROM payments p WHERE p.payment_id = $1", 1, params, dbcheck_cb, p);
    if (rc != PGPOOL_QUEUED) {
        pay_set_state(p, PS_DBCHECK_WAIT);
        arm_timer(p, backoff_ms(200, p->attempts++, 5000), dbcheck_retry_cb);
    }
}

static void dbcheck_cb(const pgpool_reply *r, void *arg)
{
    payment *p = arg;
    if (r->status != PGQ_OK) {
        pay_set_state(p, PS_DBCHECK_WAIT);
        arm_timer(p, backoff_ms(200, p->attempts++, 5000), dbcheck_retry_cb);
        return;
    }
    p->attempts = 0;
    const PGresult *res = r->results[0];
    if (PQntuples(res) == 0) {
        log_info("payment gid=%s key=%s event=dbcheck result=nothing_written", p->gid, p->key);
        answer_error(p, PROTO_ERR_UNAVAILABLE, "database connection lost; nothing was charged");
        payment_done(p);
        return;
    }
    p->intent_committed = true;
    const char *status = PQgetvalue(res, 0, 0);
    bool prepared = PQgetvalue(res, 0, 1)[0] == 't';
    log_info("payment gid=%s key=%s event=dbcheck status=%s prepared=%d", p->gid, p->key, status, prepared);
    if (prepared) {
        p->prepared = true;
        p->prepared_ms = pc_now_ms();
        D->prepared++;
        start_create(p);
    } else if (!strcmp(status, "pending")) {
        start_phase1(p);        /* intent only: debit again */
    } else {
        /* Settled already (cannot happen for our own live payment; be safe). */
        payment_final(p, !strcmp(status, "succeeded") ? "succeeded"
                         : !strcmp(status, "insufficient_funds") ? "insufficient_funds" : "declined");
        payment_done(p);
    }
}

/* ---------------------------------------------------------------- processor */

static void create_cb(const psp_result *res, void *arg);
static void processor_ref_cb(const pgpool_reply *r, void *arg);
static void poll_cb(const psp_result *res, void *arg);
static void cancel_cb(const psp_result *res, void *arg);

static void decide(payment *p, decision dec, const char *decline_code, const char *psp_ref)
{
    p->dec = dec;
    if (decline_code)
        snprintf(p->decline_code, sizeof(p->decline_code), "%s", decline_code);
    if (psp_ref && psp_ref[0])
        snprintf(p->processor_ref, sizeof(p->processor_ref), "%s", psp_ref);
    log_debug("payment gid=%s key=%s event=decision action=%s decline_code=%s processor_ref=%s", p->gid, p->key,
             dec == DEC_COMMIT ? "commit" : "rollback", p->decline_code[0] ? p->decline_code : "-",
             p->processor_ref[0] ? p->processor_ref : "-");
    FAILPOINT("after_answer", p->key);
    start_phase2(p);
}

/* The processor's payment object decides, or says to keep polling. */
static bool decide_from_payment(payment *p, const psp_payment *pp)
{
    switch (pp->status) {
    case PSP_ST_SUCCEEDED:
        decide(p, DEC_COMMIT, NULL, pp->id);
        return true;
    case PSP_ST_DECLINED:
    case PSP_ST_CANCELED:
        decide(p, DEC_ROLLBACK, psp_status_or_code(pp), pp->id);
        return true;
    default:
        if (pp->id[0])
            snprintf(p->processor_ref, sizeof(p->processor_ref), "%s", pp->id);
        return false;
    }
}

static void create_retry_cb(evutil_socket_t fd, short what, void *arg)
{
    start_create(arg);
}

#ifdef PAYCOORD_FAILPOINTS
static void after_send_cb(evutil_socket_t fd, short what, void *arg)
{
    /* Armed only for a matching payment (start_create checked). */
    log_error("event=failpoint name=after_send action=_exit");
    fflush(stderr);
    _exit(99);
}
#endif

static void start_create(payment *p)
{
    pay_set_state(p, PS_CREATE);
    psp_create_req req = { .gid = p->gid, .amount = p->amount, .currency = p->currency,
                           .account = p->account, .reference = p->reference, .metadata = p->metadata };
    if (psp_create(D->psp, &req, create_cb, p) != 0) {
        log_error("payment gid=%s key=%s event=create_not_started", p->gid, p->key);
        pay_set_state(p, PS_CREATE_WAIT);
        arm_timer(p, backoff_ms(D->cfg.processor_retry_base_ms, p->attempts++, 5000), create_retry_cb);
        return;
    }
#ifdef PAYCOORD_FAILPOINTS
    /* "after the HTTP request was sent, before its answer": 100 ms after the
     * send; tests give the test processor more latency than that. */
    if (failpoint_armed("after_send", p->key)) {
        struct timeval tv = { 0, 100000 };
        event_base_once(D->base, -1, EV_TIMEOUT, after_send_cb, p->key, &tv);
    }
#endif
}

static void create_cb(const psp_result *res, void *arg)
{
    payment *p = arg;
    record_latency(res->elapsed_ms);
    switch (res->outcome) {
    case PSP_PAYMENT:
        circuit_record(true);
        if (!decide_from_payment(p, &res->payment))
            start_poll(p, D->cfg.processor_poll_ms);       /* pending */
        return;
    case PSP_INVALID:
        circuit_record(true);
        decide(p, DEC_ROLLBACK, "invalid_request", NULL);
        return;
    case PSP_CONFLICT: {
        /* Same gid, other body: a bug somewhere. Never guess: the debit stays
         * prepared, the gid goes to manual review, clients are told pending. */
        circuit_record(true);
        log_error("payment gid=%s key=%s event=processor_conflict alert=review", p->gid, p->key);
        rec_save_state(p->gid, p->payment_id, 0, "processor answered idempotency_conflict", true);
        p->prepared = false;
        D->prepared--;
        D->orphans++;
        payment_done(p);
        return;
    }
    case PSP_AUTH:
        log_error("payment gid=%s key=%s event=processor_auth_failed http=%ld alert=credentials", p->gid, p->key,
                  res->http_status);
        circuit_open_now();
        start_poll(p, D->cfg.processor_poll_ms);
        return;
    default:
        circuit_record(false);
        if (p->attempts < D->cfg.processor_retries && !past_deadline(p)) {
            int ms = backoff_ms(D->cfg.processor_retry_base_ms, p->attempts++, 10000);
            log_info("payment gid=%s key=%s event=create_retry attempt=%d delay_ms=%d error=\"%s\"", p->gid,
                     p->key, p->attempts, ms, res->error);
            pay_set_state(p, PS_CREATE_WAIT);
            arm_timer(p, ms, create_retry_cb);
        } else {
            log_warn("payment gid=%s key=%s event=in_doubt error=\"%s\"", p->gid, p->key, res->error);
            p->attempts = 0;
            start_poll(p, D->cfg.processor_poll_ms);
        }
        return;
    }
}

static void poll_timer_cb(evutil_socket_t fd, short what, void *arg)
{
    payment *p = arg;
    if (past_deadline(p)) {
        start_cancel(p);
        return;
    }
    pay_set_state(p, PS_POLL);
    if (psp_get(D->psp, p->gid, poll_cb, p) != 0)
        start_poll(p, backoff_ms(D->cfg.processor_poll_ms, p->attempts++, 30000));
}

static void start_poll(payment *p, int delay_ms)
{
    pay_set_state(p, PS_POLL_WAIT);
    arm_timer(p, delay_ms, poll_timer_cb);
}

static void poll_cb(const psp_result *res, void *arg)
{
    payment *p = arg;
    record_latency(res->elapsed_ms);
    if (res->outcome == PSP_PAYMENT) {
        circuit_record(true);
        p->attempts = 0;
        if (!decide_from_payment(p, &res->payment))
            start_poll(p, D->cfg.processor_poll_ms);
        return;
    }
    if (res->outcome == PSP_NOT_FOUND) {
        /* The processor never saw the create: send it again (same key) while
         * there is time; past the deadline, cancel (tombstone) instead. */
        circuit_record(true);
        if (past_deadline(p))
            start_cancel(p);
        else
            start_create(p);
        return;
    }
    circuit_record(false);
    start_poll(p, backoff_ms(D->cfg.processor_poll_ms, p->attempts++, 30000));
}

static void cancel_retry_cb(evutil_socket_t fd, short what, void *arg)
{
    start_cancel(arg);
}

static void start_cancel(payment *p)
{
    pay_set_state(p, PS_CANCEL);
    log_info("payment gid=%s key=%s event=cancel reason=deadline", p->gid, p->key);
    if (psp_cancel(D->psp, p->gid, cancel_cb, p) != 0) {
        pay_set_state(p, PS_CANCEL_WAIT);
        arm_timer(p, backoff_ms(D->cfg.processor_poll_ms, p->attempts++, 30000), cancel_retry_cb);
    }
}

static void cancel_cb(const psp_result *res, void *arg)
{
    payment *p = arg;
    record_latency(res->elapsed_ms);
    switch (res->outcome) {
    case PSP_PAYMENT:
        circuit_record(true);
        if (!decide_from_payment(p, &res->payment))
            start_poll(p, D->cfg.processor_poll_ms);
        return;
    case PSP_ALREADY_SUCCEEDED:
        circuit_record(true);
        decide(p, DEC_COMMIT, NULL, res->payment.id);
        return;
    case PSP_UNSUPPORTED:
        /* No cancel by key: recovery waits out the idempotency window. The
         * debit stays prepared; this payment leaves memory. */
        circuit_record(true);
        log_warn("payment gid=%s key=%s event=left_for_recovery reason=cancel_unsupported", p->gid, p->key);
        p->prepared = false;
        D->prepared--;
        D->orphans++;
        payment_done(p);
        return;
    default:
        circuit_record(false);
        pay_set_state(p, PS_CANCEL_WAIT);
        arm_timer(p, backoff_ms(D->cfg.processor_poll_ms, p->attempts++, 30000), cancel_retry_cb);
        return;
    }
}

/* ---------------------------------------------------------------- phase 2 */

static void phase2_cb(const pgpool_reply *r, void *arg);
static void phase2_check_cb(const pgpool_reply *r, void *arg);

static void phase2_retry_cb(evutil_socket_t fd, short what, void *arg)
{
    start_phase2(arg);
}

static void start_phase2(payment *p)
{
    pay_set_state(p, PS_PHASE2);
    sbuf q;
    sbuf_init(&q);
    sbuf_puts(&q, p->dec == DEC_COMMIT ? "COMMIT PREPARED " : "ROLLBACK PREPARED ");
    sbuf_literal(&q, p->gid);
    int rc = sbuf_ok(&q) ? pgpool_query(D->pool, sbuf_str(&q), phase2_cb, p) : PGPOOL_OVERLOADED;
    sbuf_free(&q);
    if (rc != PGPOOL_QUEUED) {
        /* Keep the decision; retry until the database is back. */
        pay_set_state(p, PS_PHASE2_WAIT);
        arm_timer(p, backoff_ms(100, p->attempts++, 5000), phase2_retry_cb);
    }
}

static void processor_ref_cb(const pgpool_reply *r, void *arg)
{
    if (r->status != PGQ_OK)
        log_warn("event=processor_ref_write_failed error=\"%s\"", r->errmsg);
}

/* processor_ref of committed payments, written in batches with asynchronous
 * commit: one UPDATE for up to REF_BATCH payments or every 20 ms, instead of
 * a transaction per payment. Lost in a crash, the column stays NULL. */
#define REF_BATCH 64
static sbuf ref_values;
static int ref_count;
static struct event *ref_timer;

static void ref_batch_flush(evutil_socket_t fd, short what, void *arg)
{
    if (ref_count == 0)
        return;
    sbuf q;
    sbuf_init(&q);
    sbuf_puts(&q, "BEGIN; SET LOCAL synchronous_commit TO off; UPDATE payments p SET processor_ref = v.ref, "
                  "updated_at = now() FROM (VALUES ");
    sbuf_add(&q, ref_values.data, ref_values.len);
    sbuf_puts(&q, ") v(id, ref) WHERE p.payment_id = v.id::uuid; COMMIT");
    if (!sbuf_ok(&q) || pgpool_query(D->pool, sbuf_str(&q), processor_ref_cb, NULL) != PGPOOL_QUEUED)
        log_warn("event=processor_ref_write_skipped count=%d", ref_count);
    sbuf_free(&q);
    sbuf_reset(&ref_values);
    ref_count = 0;
}

static void ref_batch_add(const payment *p)
{
    if (ref_count)
        sbuf_puts(&ref_values, ", ");
    sbuf_puts(&ref_values, "(");
    sbuf_literal(&ref_values, p->payment_id);
    sbuf_puts(&ref_values, ", ");
    sbuf_literal(&ref_values, p->processor_ref);
    sbuf_puts(&ref_values, ")");
    if (++ref_count >= REF_BATCH || !ref_timer) {
        ref_batch_flush(-1, 0, NULL);
    } else if (ref_count == 1) {
        struct timeval tv = { 0, 20000 };
        evtimer_add(ref_timer, &tv);
    }
}

static void phase2_done(payment *p)
{
    p->prepared = false;
    D->prepared--;
    p->attempts = 0;
    FAILPOINT("after_phase2", p->key);
    if (p->dec == DEC_COMMIT) {
        /* status 'succeeded' committed with the debit; processor_ref is
         * written asynchronously: lost in a crash, it stays NULL (the
         * processor still has it under the gid; see docs/recovery.md). */
        payment_final(p, "succeeded");
        if (p->processor_ref[0])
            ref_batch_add(p);
        payment_done(p);
    } else {
        /* Rolled back: answer now, write 'declined' asynchronously. */
        if (!p->decline_code[0])
            snprintf(p->decline_code, sizeof(p->decline_code), "declined");
        payment_final(p, "declined");
        start_settle(p, "declined", p->decline_code, false);
    }
}

static void phase2_cb(const pgpool_reply *r, void *arg)
{
    payment *p = arg;
    if (r->status == PGQ_OK) {
        log_debug("payment gid=%s key=%s event=%s db_ms=%.1f", p->gid, p->key,
                  p->dec == DEC_COMMIT ? "committed" : "rolled_back", r->elapsed_ms);
        phase2_done(p);
        return;
    }
    if (r->status == PGQ_SQL_ERROR && !strcmp(r->sqlstate, "42704")) {
        /* "prepared transaction does not exist": settled by someone else (or
         * by our own earlier attempt whose answer was lost). Read the row. */
        pay_set_state(p, PS_PHASE2_CHECK);
        const char *params[1] = { p->payment_id };
        if (pgpool_query_params(D->pool, "SELECT status FROM payments WHERE payment_id = $1", 1, params,
                                phase2_check_cb, p) == PGPOOL_QUEUED)
            return;
    }
    log_warn("payment gid=%s key=%s event=phase2_retry status=%d sqlstate=%s error=\"%s\"", p->gid, p->key,
             (int)r->status, r->sqlstate, r->errmsg);
    pay_set_state(p, PS_PHASE2_WAIT);
    arm_timer(p, backoff_ms(100, p->attempts++, 5000), phase2_retry_cb);
}

static void phase2_check_cb(const pgpool_reply *r, void *arg)
{
    payment *p = arg;
    if (r->status != PGQ_OK || PQntuples(r->results[0]) != 1) {
        pay_set_state(p, PS_PHASE2_WAIT);
        arm_timer(p, backoff_ms(100, p->attempts++, 5000), phase2_retry_cb);
        return;
    }
    bool committed = strcmp(PQgetvalue(r->results[0], 0, 0), "succeeded") == 0;
    if (committed != (p->dec == DEC_COMMIT))
        log_error("payment gid=%s key=%s event=settled_elsewhere wanted=%s found=%s alert=review", p->gid, p->key,
                  p->dec == DEC_COMMIT ? "commit" : "rollback", committed ? "committed" : "rolled_back");
    else
        log_info("payment gid=%s key=%s event=settled_elsewhere found=%s", p->gid, p->key,
                 committed ? "committed" : "rolled_back");
    p->dec = committed ? DEC_COMMIT : DEC_ROLLBACK;
    phase2_done(p);
}

/* ---------------------------------------------------------------- settle */

static void settle_cb(const pgpool_reply *r, void *arg);

static void settle_retry_cb(evutil_socket_t fd, short what, void *arg)
{
    payment *p = arg;
    start_settle(p, p->settle_status, p->decline_code[0] ? p->decline_code : NULL, p->settle_sync);
}

static void start_settle(payment *p, const char *status, const char *decline_code, bool sync)
{
    pay_set_state(p, PS_SETTLE);
    if (status != p->settle_status)         /* a retry passes the field itself */
        snprintf(p->settle_status, sizeof(p->settle_status), "%s", status);
    if (decline_code && decline_code != p->decline_code)
        snprintf(p->decline_code, sizeof(p->decline_code), "%s", decline_code);
    p->settle_sync = sync;
    sbuf q;
    sbuf_init(&q);
    if (!sync)
        sbuf_puts(&q, "BEGIN; SET LOCAL synchronous_commit TO off; ");
    sbuf_puts(&q, "SELECT pc_pay_settle(");
    sbuf_literal(&q, p->payment_id);
    sbuf_puts(&q, ", ");
    sbuf_literal(&q, status);
    sbuf_puts(&q, ", ");
    sbuf_literal(&q, decline_code ? p->decline_code : NULL);
    sbuf_puts(&q, ", ");
    sbuf_literal(&q, p->processor_ref[0] ? p->processor_ref : NULL);
    sbuf_puts(&q, sync ? ")" : "); COMMIT");
    int rc;
#ifdef PAYCOORD_FAILPOINTS
    /* Non-fatal test point: the first settle attempt finds the database gone. */
    if (p->attempts == 0 && failpoint_armed("settle_unavailable", p->key))
        rc = PGPOOL_UNAVAILABLE;
    else
#endif
        rc = sbuf_ok(&q) ? pgpool_query(D->pool, sbuf_str(&q), settle_cb, p) : PGPOOL_OVERLOADED;
    sbuf_free(&q);
    if (rc != PGPOOL_QUEUED) {
        pay_set_state(p, PS_SETTLE_WAIT);
        arm_timer(p, backoff_ms(100, p->attempts++, 5000), settle_retry_cb);
    }
}

static void settle_cb(const pgpool_reply *r, void *arg)
{
    payment *p = arg;
    if (r->status != PGQ_OK) {
        if (r->status == PGQ_SHUTDOWN) {
            payment_done(p);
            return;
        }
        log_warn("payment gid=%s key=%s event=settle_retry error=\"%s\"", p->gid, p->key, r->errmsg);
        pay_set_state(p, PS_SETTLE_WAIT);
        arm_timer(p, backoff_ms(100, p->attempts++, 5000), settle_retry_cb);
        return;
    }
    if (!p->final) {
        const PGresult *res = r->results[r->nresults > 1 ? 1 : 0];
        const char *stored = PQntuples(res) == 1 ? PQgetvalue(res, 0, 0) : p->settle_status;
        payment_final(p, !strcmp(stored, "insufficient_funds") ? "insufficient_funds"
                         : !strcmp(stored, "succeeded") ? "succeeded" : "declined");
    }
    payment_done(p);
}

/* ---------------------------------------------------------------- pay op */

void pay_handle_pay(pc_request *r)
{
    const proto_request *q = &r->req;
    payment *p = strmap_get(by_key, q->idempotency_key);
    if (p) {
        /* Same key in flight here: never a second charge; wait for its answer. */
        if (!same_request(p, q)) {
            server_reply_err(r, PROTO_ERR_IDEMPOTENCY_CONFLICT,
                             "idempotency key %s is in use with another account, amount or currency", q->idempotency_key);
            return;
        }
        D->stats.replays++;
        if (p->final) {
            server_reply_ok(r, payment_json(p, true));
            return;
        }
        if (add_waiter(p, r, true) != 0)
            server_reply_err(r, PROTO_ERR_INTERNAL, "out of memory");
        return;
    }
    if (D->shutting_down) {
        server_reply_err(r, PROTO_ERR_SHUTTING_DOWN, "the daemon is shutting down; nothing was charged");
        return;
    }
    if (!pgpool_is_up(D->pool)) {
        server_reply_err(r, PROTO_ERR_UNAVAILABLE, "database unavailable; nothing was charged");
        return;
    }
    if (!rec_node_locked()) {
        server_reply_err(r, PROTO_ERR_UNAVAILABLE,
                         "this daemon does not hold its node lock (starting, or another daemon runs with node_id %s); nothing was charged",
                         D->cfg.node_id);
        return;
    }
    if (D->max_prepared_server <= 0) {
        server_reply_err(r, PROTO_ERR_UNAVAILABLE, D->max_prepared_server == 0
                         ? "the database has max_prepared_transactions = 0 (two-phase commit disabled); nothing was charged"
                         : "starting up; nothing was charged");
        return;
    }
    if (in_flight >= D->cfg.max_in_flight || in_flight + D->orphans >= D->prepared_limit) {
        server_reply_err(r, PROTO_ERR_OVERLOADED, "too many payments in flight (%d); nothing was charged", in_flight);
        return;
    }
    if (!circuit_allows()) {
        server_reply_err(r, PROTO_ERR_OVERLOADED, "processor circuit open after repeated failures; nothing was charged");
        return;
    }
    account *a = account_get(q->account);
    if (!a) {
        server_reply_err(r, PROTO_ERR_INTERNAL, "out of memory");
        return;
    }
    if (a->nqueued >= D->cfg.max_account_queue) {
        server_reply_err(r, PROTO_ERR_OVERLOADED, "too many payments queued on account %s; nothing was charged", a->id);
        return;
    }
    p = payment_new(q);
    if (!p || add_waiter(p, r, false) != 0) {
        if (p) {
            p->acct = NULL;
            payment_done(p);
        }
        server_reply_err(r, PROTO_ERR_INTERNAL, "out of memory");
        account_maybe_free(a);
        return;
    }
    p->acct = a;
    log_debug("payment gid=%s key=%s account=%s amount=%lld currency=%s event=received", p->gid, p->key, p->account,
              (long long)p->amount, p->currency);
    if (!a->active && !a->applying && !a->head) {
        a->active = p;
        start_phase1(p);
        return;
    }
    pay_set_state(p, PS_QUEUED);
    if (a->tail)
        a->tail->next_in_queue = p;
    else
        a->head = p;
    a->tail = p;
    a->nqueued++;
    arm_timer(p, D->cfg.queue_timeout_ms, queue_timeout_cb);
    account_next(a);
}

/* ---------------------------------------------------------------- status */

static void status_cb(const pgpool_reply *r, void *arg)
{
    pc_request *req = arg;
    if (r->status != PGQ_OK) {
        server_reply_err(req, PROTO_ERR_UNAVAILABLE, "database unavailable");
        return;
    }
    if (PQntuples(r->results[0]) == 0) {
        server_reply_err(req, PROTO_ERR_NOT_FOUND, "no payment with that %s",
                         req->req.idempotency_key[0] ? "idempotency_key" : "payment_id");
        return;
    }
    server_reply_ok(req, row_json(r->results[0], 0, false));
}

void pay_handle_status(pc_request *r)
{
    const proto_request *q = &r->req;
    payment *p = q->idempotency_key[0] ? strmap_get(by_key, q->idempotency_key) : strmap_get(by_id, q->payment_id);
    /* From memory only once the row is known to be this payment's (a replay
     * of a settled key looks like a new payment until its lookup answers). */
    if (p && p->intent_committed && p->state != PS_LOOKUP) {
        server_reply_ok(r, payment_json(p, false));
        return;
    }
    const char *params[1] = { q->idempotency_key[0] ? q->idempotency_key : q->payment_id };
    const char *sql = q->idempotency_key[0]
        ? "SELECT " PAYMENT_COLUMNS " FROM payments WHERE idempotency_key = $1"
        : "SELECT " PAYMENT_COLUMNS " FROM payments WHERE payment_id = $1::uuid";
    if (pgpool_query_params(D->pool, sql, 1, params, status_cb, r) != PGPOOL_QUEUED)
        server_reply_err(r, PROTO_ERR_UNAVAILABLE, "database unavailable");
}

/* ---------------------------------------------------------------- credit */

typedef struct credit_ctx {
    pc_request *r;
    char credit_id[37];
    bool apply;
} credit_ctx;

static void credit_lookup_cb(const pgpool_reply *r, void *arg);

static cJSON *credit_json(const char *id, const proto_request *q, const char *status, const char *created,
                          bool replayed)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "credit_id", id);
    cJSON_AddStringToObject(o, "idempotency_key", q->idempotency_key);
    cJSON_AddStringToObject(o, "account", q->account);
    cJSON_AddNumberToObject(o, "amount", (double)q->amount);
    cJSON_AddStringToObject(o, "currency", q->currency);
    cJSON_AddStringToObject(o, "status", status);
    cJSON_AddStringToObject(o, "created_at", created);
    if (replayed)
        cJSON_AddBoolToObject(o, "replayed", true);
    return o;
}

static void credit_cb(const pgpool_reply *r, void *arg)
{
    credit_ctx *c = arg;
    pc_request *req = c->r;
    const proto_request *q = &req->req;
    if (r->status == PGQ_OK) {
        const char *status = PQgetvalue(r->results[0], 0, 0);
        bool applied = !strcmp(status, "applied");
        if (applied) {
            D->stats.credits_applied++;
        } else {
            D->stats.credits_accepted++;
            account *a = account_get(q->account);
            if (a) {
                a->credits_pending = true;
                account_next(a);          /* applies them now if the account is free */
            }
        }
        const char *created = PQgetvalue(r->results[0], 0, 1);
        log_info("event=credit credit_id=%s key=%s account=%s amount=%lld currency=%s status=%s", c->credit_id,
                 q->idempotency_key, q->account, (long long)q->amount, q->currency, status);
        server_reply_ok(req, credit_json(c->credit_id, q, applied ? "applied" : "accepted", created, false));
        free(c);
        return;
    }
    if (r->status == PGQ_SQL_ERROR && !strcmp(r->sqlstate, "PCDUP")) {
        const char *params[1] = { q->idempotency_key };
        if (pgpool_query_params(D->pool,
                "SELECT credit_id::text, account_id, amount::text, currency, status, "
                "to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') "
                "FROM credits WHERE idempotency_key = $1", 1, params, credit_lookup_cb, c) == PGPOOL_QUEUED)
            return;
    }
    if (r->status == PGQ_SQL_ERROR && !strcmp(r->sqlstate, "PCUA1"))
        server_reply_err(req, PROTO_ERR_UNKNOWN_ACCOUNT, "unknown account %s", q->account);
    else if (r->status == PGQ_SQL_ERROR && !strcmp(r->sqlstate, "PCCM1"))
        server_reply_err(req, PROTO_ERR_CURRENCY_MISMATCH, "%s", r->errmsg);
    else if (r->status == PGQ_SQL_ERROR)
        server_reply_err(req, PROTO_ERR_INTERNAL, "the credit could not be recorded");
    else if (r->sent)
        server_reply_err(req, PROTO_ERR_UNAVAILABLE,
                         "database connection lost; the credit may or may not be recorded: retry with the same key");
    else
        server_reply_err(req, PROTO_ERR_UNAVAILABLE, "database unavailable; nothing was recorded");
    free(c);
}

static void credit_lookup_cb(const pgpool_reply *r, void *arg)
{
    credit_ctx *c = arg;
    pc_request *req = c->r;
    const proto_request *q = &req->req;
    if (r->status != PGQ_OK || PQntuples(r->results[0]) != 1) {
        server_reply_err(req, PROTO_ERR_UNAVAILABLE, "could not read the stored credit");
        free(c);
        return;
    }
    const PGresult *res = r->results[0];
    if (strcmp(PQgetvalue(res, 0, 1), q->account) || strtoll(PQgetvalue(res, 0, 2), NULL, 10) != q->amount ||
        strcmp(PQgetvalue(res, 0, 3), q->currency)) {
        server_reply_err(req, PROTO_ERR_IDEMPOTENCY_CONFLICT,
                         "idempotency key %s was used with another account, amount or currency", q->idempotency_key);
    } else {
        D->stats.replays++;
        server_reply_ok(req, credit_json(PQgetvalue(res, 0, 0), q, PQgetvalue(res, 0, 4), PQgetvalue(res, 0, 5), true));
    }
    free(c);
}

void pay_handle_credit(pc_request *r)
{
    const proto_request *q = &r->req;
    if (D->shutting_down) {
        server_reply_err(r, PROTO_ERR_SHUTTING_DOWN, "the daemon is shutting down; nothing was recorded");
        return;
    }
    credit_ctx *c = calloc(1, sizeof(*c));
    if (!c) {
        server_reply_err(r, PROTO_ERR_INTERNAL, "out of memory");
        return;
    }
    c->r = r;
    new_uuid(c->credit_id);
    account *a = strmap_get(accounts, q->account);
    c->apply = !(a && (a->active || a->applying || a->head));
    sbuf s;
    sbuf_init(&s);
    sbuf_puts(&s, "SELECT pc_credit(");
    sbuf_literal(&s, c->credit_id);
    sbuf_puts(&s, ", ");
    sbuf_literal(&s, q->idempotency_key);
    sbuf_puts(&s, ", ");
    sbuf_literal(&s, q->account);
    sbuf_printf(&s, ", %lld, ", (long long)q->amount);
    sbuf_literal(&s, q->currency);
    sbuf_puts(&s, ", ");
    sbuf_literal(&s, q->reference);
    sbuf_puts(&s, c->apply ? ", true)" : ", false)");
    /* now() is the transaction's start: the row's created_at. */
    sbuf_puts(&s, ", to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')");
    int rc = sbuf_ok(&s) ? pgpool_query(D->pool, sbuf_str(&s), credit_cb, c) : PGPOOL_OVERLOADED;
    sbuf_free(&s);
    if (rc != PGPOOL_QUEUED) {
        server_reply_err(r, rc == PGPOOL_UNAVAILABLE ? PROTO_ERR_UNAVAILABLE : PROTO_ERR_OVERLOADED,
                         "database %s; nothing was recorded", rc == PGPOOL_UNAVAILABLE ? "unavailable" : "queue full");
        free(c);
    }
}

/* ---------------------------------------------------------------- balance */

static void balance_cb(const pgpool_reply *r, void *arg)
{
    pc_request *req = arg;
    if (r->status != PGQ_OK) {
        server_reply_err(req, PROTO_ERR_UNAVAILABLE, "database unavailable");
        return;
    }
    const PGresult *res = r->results[0];
    if (PQntuples(res) == 0) {
        server_reply_err(req, PROTO_ERR_UNKNOWN_ACCOUNT, "unknown account %s", req->req.account);
        return;
    }
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "account", req->req.account);
    cJSON_AddStringToObject(o, "currency", PQgetvalue(res, 0, 0));
    cJSON_AddNumberToObject(o, "balance", (double)strtoll(PQgetvalue(res, 0, 1), NULL, 10));
    cJSON_AddNumberToObject(o, "held", (double)strtoll(PQgetvalue(res, 0, 2), NULL, 10));
    cJSON_AddNumberToObject(o, "pending_credits", (double)strtoll(PQgetvalue(res, 0, 3), NULL, 10));
    server_reply_ok(req, o);
}

void pay_handle_balance(pc_request *r)
{
    const char *params[1] = { r->req.account };
    /* held: debits prepared and not yet resolved (our prepared transactions
     * are always real debits: insufficient funds is never prepared). */
    static const char sql[] =
        "SELECT a.currency, a.balance::text, "
        "  (SELECT coalesce(sum(p.amount), 0)::text FROM payments p JOIN pg_prepared_xacts x ON x.gid = p.gid "
        "    WHERE p.account_id = a.id AND p.status = 'pending'), "
        "  (SELECT coalesce(sum(c.amount), 0)::text FROM credits c "
        "    WHERE c.account_id = a.id AND c.status = 'accepted') "
        "FROM accounts a WHERE a.id = $1";
    if (pgpool_query_params(D->pool, sql, 1, params, balance_cb, r) != PGPOOL_QUEUED)
        server_reply_err(r, PROTO_ERR_UNAVAILABLE, "database unavailable");
}

/* ---------------------------------------------------------------- account_open */

static void account_open_cb(const pgpool_reply *r, void *arg)
{
    pc_request *req = arg;
    if (r->status != PGQ_OK) {
        server_reply_err(req, PROTO_ERR_UNAVAILABLE, "database unavailable; nothing was created");
        return;
    }
    if (PQntuples(r->results[0]) == 0) {
        server_reply_err(req, PROTO_ERR_ACCOUNT_EXISTS, "account %s exists", req->req.account);
        return;
    }
    log_notice("event=account_open account=%s currency=%s uid=%u", req->req.account, req->req.currency,
               (unsigned)req->uid);
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "account", req->req.account);
    cJSON_AddStringToObject(o, "currency", req->req.currency);
    cJSON_AddNumberToObject(o, "balance", 0);
    server_reply_ok(req, o);
}

void pay_handle_account_open(pc_request *r)
{
    const char *params[2] = { r->req.account, r->req.currency };
    if (pgpool_query_params(D->pool,
            "INSERT INTO accounts (id, currency) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING RETURNING id",
            2, params, account_open_cb, r) != PGPOOL_QUEUED)
        server_reply_err(r, PROTO_ERR_UNAVAILABLE, "database unavailable; nothing was created");
}

/* ---------------------------------------------------------------- init */

static void max_prepared_cb(const pgpool_reply *r, void *arg)
{
    if (r->status != PGQ_OK || PQntuples(r->results[0]) != 1) {
        log_warn("event=max_prepared_unknown error=\"%s\"", r->errmsg);
        return;
    }
    D->max_prepared_server = (int)strtol(PQgetvalue(r->results[0], 0, 0), NULL, 10);
    D->prepared_limit = (int)((int64_t)D->max_prepared_server * D->cfg.prepared_share_percent / 100);
    if (D->max_prepared_server == 0)
        log_error("event=two_phase_disabled alert=config hint=\"set max_prepared_transactions in postgresql.conf\"");
    else
        log_notice("event=max_prepared server=%d our_limit=%d", D->max_prepared_server, D->prepared_limit);
    pc_readiness_changed();
}

void pay_db_state_changed(bool up)
{
    log_notice("event=database state=%s", up ? "up" : "down");
    pc_readiness_changed();
    if (up && pgpool_query(D->pool, "SHOW max_prepared_transactions", max_prepared_cb, NULL) != PGPOOL_QUEUED)
        log_warn("event=max_prepared_query_failed");
}

int pay_init(void)
{
    by_key = strmap_new();
    by_id = strmap_new();
    accounts = strmap_new();
    sbuf_init(&ref_values);
    ref_timer = evtimer_new(D->base, ref_batch_flush, NULL);
    return (by_key && by_id && accounts && ref_timer) ? 0 : -1;
}

/* On SIGTERM, before the pool goes: write the last batch. */
void pay_flush(void)
{
    ref_batch_flush(-1, 0, NULL);
}

static void free_payment_entry(const char *key, void *value, void *arg)
{
    payment *p = value;
    /* Answers already dropped by server_close_all; prepared debits stay for recovery. */
    while (p->waiters) {
        waiter *w = p->waiters;
        p->waiters = w->next;
        server_reply_err(w->r, PROTO_ERR_SHUTTING_DOWN, "the daemon stopped; the payment is left for recovery");
        waiter_free(w);
    }
    payment_free(p);
}

void pay_shutdown(void)
{
    if (ref_timer)
        event_free(ref_timer);
    ref_timer = NULL;
    sbuf_free(&ref_values);
    if (by_key)
        strmap_each(by_key, free_payment_entry, NULL);
    strmap_free(by_key);
    strmap_free(by_id);
    strmap_free_all(accounts);
    by_key = by_id = accounts = NULL;
}
