/*
 * payment.c - the payment state machine: two-phase commit across PostgreSQL
 * and the payment processor (docs/architecture.md).
 *
 * Lifecycle of one payment, with its crash windows. "Told" is what its
 * clients may hear at that point; nothing is ever told before it is durable.
 *
 *  1. QUEUED    Waits for its account (account.c). Nothing written.
 *               Crash: nothing happened. Told: nothing (overloaded on timeout).
 *  2. PHASE1    One round trip: the intent row (asynchronous commit), then
 *               BEGIN; conditional debit + ledger row; PREPARE TRANSACTION gid
 *               (the 1st synchronous WAL flush, which also makes the intent
 *               durable). Insufficient funds: nothing prepared -> SETTLE.
 *               The key already stored -> LOOKUP. Crash before PREPARE: a
 *               'pending' row without a debit, settled by recovery as declined.
 *  3. FENCE     The connection broke with phase 1 in the air. Before reading
 *               what happened, the old session is made sure gone (terminated
 *               if needed), so a late PREPARE cannot land after the answer.
 *               No row: nothing durable, told `unavailable`. A row without a
 *               debit: debit again. Prepared: go on.
 *  4. CREATE    Durable from here: waiting clients' wait_ms timers run and may
 *               tell them 'pending'. The processor is asked to charge with the
 *               gid as idempotency key. Crash: the debit stays prepared;
 *               recovery asks the processor by gid.
 *  5. POLL /    Unknown or pending answers: ask by gid until final or the
 *     CANCEL    deadline, then cancel by gid (a tombstone: a late create with
 *               the gid charges nothing). An answer that is not proof (a 4xx
 *               after an unknown outcome, a 404 after a lost create) is never
 *               taken as a decline.
 *  6. COMMIT /  COMMIT PREPARED or ROLLBACK PREPARED (2nd and last synchronous
 *     ROLLBACK  flush of a successful payment). Succeeded is told as soon as
 *               COMMIT PREPARED returns: the committed ledger debit is what
 *               makes the status 'succeeded'. A declined payment's status is
 *               written (SETTLE, synchronously) before it is told.
 *               "Prepared transaction does not exist" -> CHECK.
 *  7. CHECK     Read the facts (row, committed debit) and compare them with
 *               the decision; a mismatch (someone else settled it the other
 *               way, or PostgreSQL lost the write) is alerted, flagged for
 *               review (FLAG) and the account released, never retried forever.
 *  8. SETTLE    The durable final status of a payment without a prepared
 *               debit (insufficient_funds, declined after ROLLBACK PREPARED,
 *               account_locked), written before it is told.
 *  9. RECORD    Succeeded: the row's status and processor_ref are written in
 *               a batch (asynchronously); until then replays are answered from
 *               memory, so a replay gets exactly the first answer.
 * 10. HANDOFF   A processor that cannot cancel by key (501), or a conflict
 *               (409, manual review: the flag is made durable first): the
 *               payment leaves memory with its debit prepared; recovery owns
 *               the gid from then on. Told: 'pending'.
 *
 * Files: this one has the lifecycle and the database side; payment_proc.c
 * the processor side (steps 4 and 5); answers.c what waiting clients are
 * told. payment_int.h is what they share.
 *
 * Failover: every database step that decides something (the debit, COMMIT
 * or ROLLBACK PREPARED) waits while the node lock is not held, e.g. after the
 * primary died and before the lock is taken again on the new one; taking the
 * lock then runs every payment waiting on the database at once
 * (pay_lock_changed) instead of after its backoff.
 *
 * Every state that waits for something has the payment's one timer armed or
 * a callback outstanding: no payment stays in memory without something that
 * moves it on. pm_set_state() is the only writer of a payment's state and of
 * every counter derived from states (one list per state).
 */
#include "payment.h"
#include "payment_int.h"
#include "account.h"
#include "backoff.h"
#include "circuit.h"
#include "ctx.h"
#include "dbsafety.h"
#include "failpoint.h"
#include "gid.h"
#include "log.h"
#include "loop.h"
#include "nodelock.h"
#include "owner.h"
#include "proc.h"
#include "recovery.h"
#include "strmap.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const pm_state_info pm_states[PS__COUNT] = {
    [PS_NEW] = { "new", false },       [PS_QUEUED] = { "queued", false },   [PS_PHASE1] = { "phase1", false },
    [PS_FENCE] = { "fence", false },   [PS_LOOKUP] = { "lookup", false },   [PS_CREATE] = { "create", true },
    [PS_POLL] = { "poll", true },      [PS_CANCEL] = { "cancel", true },    [PS_COMMIT] = { "commit", true },
    [PS_ROLLBACK] = { "rollback", true }, [PS_CHECK] = { "check", false }, [PS_SETTLE] = { "settle", false },
    [PS_RECORD] = { "record", false }, [PS_HANDOFF] = { "handoff", true }, [PS_FLAG] = { "flag", false },
    [PS_DONE] = { "done", false },
};


static strmap *by_key;               /* idempotency key -> payment in memory */
static strmap *by_id;                /* payment_id -> payment in memory */
static pc_list by_state[PS__COUNT];
static int nstate[PS__COUNT];
static int in_flight, prepared;

static void start_phase1(payment *p);
void pm_start_finish(payment *p);
static void start_check(payment *p);
static void start_settle(payment *p, const char *status, const char *decline_code);
static void start_fence(payment *p);
static void start_lookup(payment *p);
void pm_start_handoff(payment *p, bool review, const char *why);
static void start_flag(payment *p, const char *why);
void pm_done(payment *p);

int pay_in_flight(void) { return in_flight; }
int pay_prepared(void) { return prepared; }

/* ---------------------------------------------------------------- state */

void pm_set_state(payment *p, pay_state s)
{
    if (p->state == s)
        return;
    log_debug("payment gid=%s key=%s state=%s->%s", p->gid, p->key, pm_states[p->state].name, pm_states[s].name);
    if (pm_states[p->state].debit)
        prepared--;
    if (pm_states[s].debit)
        prepared++;
    if (p->state == PS_NEW)
        in_flight++;
    if (s == PS_DONE)
        in_flight--;
    list_unlink(&p->state_link);
    nstate[p->state]--;
    p->state = s;
    list_push_tail(&by_state[s], &p->state_link);
    nstate[s]++;
}

static void timer_cb(void *arg)
{
    payment *p = arg;
    void (*fn)(payment *) = p->on_timer;
    p->on_timer = NULL;
    fn(p);
}

/* Run fn(p) after ms. The payment's one timer: whatever it waits for next. */
void pm_after(payment *p, int ms, void (*fn)(payment *))
{
    p->on_timer = fn;
    loop_timer_start(&p->timer, ms);
}

/* Try step fn again after a backoff: base doubles per attempt up to cap. */
void pm_retry(payment *p, int base, int cap, void (*fn)(payment *))
{
    pm_after(p, backoff_ms(base, p->attempts++, cap), fn);
}

/* The deadline counts from admission, so it is never later than the one
 * stored with the intent (which recovery goes by): no create is ever sent
 * after the stored deadline. */
bool pm_past_deadline(const payment *p)
{
    return loop_now_ms() >= p->started_ms + (uint64_t)D->cfg.payment_deadline_ms;
}

/* What is left of the deadline: the one stored with the intent (which
 * recovery and the adapters go by) then falls when this one does, not a
 * queue wait later; never earlier, since the database reads its clock after
 * this. (An asynchronous cancel sent at this deadline must not be overtaken
 * by a recovery that still thinks the payment is before it.) */
static int deadline_left_ms(const payment *p)
{
    uint64_t end = p->started_ms + (uint64_t)D->cfg.payment_deadline_ms, now = loop_now_ms();
    return now >= end ? 0 : (int)(end - now);
}

static void fill_store_pay(const payment *p, store_pay *sp)
{
    *sp = (store_pay){ .payment_id = p->payment_id, .gid = p->gid, .key = p->key, .account = p->account,
                       .currency = p->currency, .reference = p->reference, .metadata = p->metadata,
                       .node = D->cfg.node_id, .amount = p->amount, .deadline_ms = deadline_left_ms(p),
                       .created_ms = p->created_wall_ms, .updated_ms = p->updated_wall_ms };
}


cJSON *pay_memory_json(const char *key, const char *payment_id)
{
    payment *p = key ? strmap_get(by_key, key) : strmap_get(by_id, payment_id);
    return p && p->durable ? pm_json(p, false) : NULL;
}

/* The payment ends without its row being the key's stored payment. */
static void end_refused(payment *p, proto_err code, const char *msg)
{
    pm_refuse_waiters(p, code, msg);
    pm_done(p);
}

/* ---------------------------------------------------------------- lifecycle */

static void slot_start(acct_slot *s);

static payment *payment_new(const proto_request *q)
{
    payment *p = calloc(1, sizeof(*p));
    if (!p)
        return NULL;
    list_init(&p->state_link);
    list_init(&p->waiters);
    list_init(&p->slot.link);
    p->slot.start = slot_start;
    gid_new_uuid(p->payment_id);
    if (gid_make(D->cfg.node_id, p->payment_id, p->gid, sizeof(p->gid)) != 0)
        goto fail_early;
    memcpy(p->key, q->idempotency_key, sizeof(p->key));
    memcpy(p->account, q->account, sizeof(p->account));
    memcpy(p->currency, q->currency, sizeof(p->currency));
    p->amount = q->amount;
    p->status = "pending";
    p->created_wall_ms = p->updated_wall_ms = loop_wall_ms();
    p->started_ms = loop_now_ms();
    if ((q->reference && !(p->reference = strdup(q->reference))) ||
        (q->metadata && !(p->metadata = cJSON_Duplicate(q->metadata, true))))
        goto fail_early;
    /* Every timer the payment will ever need is allocated here, so that no
     * later step can find itself without one (arming an allocated timer
     * cannot fail short of a broken loop, which aborts: loop.h). */
    if (failpoint_armed("timer_alloc_fail", p->key) || loop_timer_init(&p->timer, timer_cb, p) != 0) {
        log_error("payment key=%s event=timer_alloc_failed note=\"refused; nothing was written\"", p->key);
        goto fail_early;
    }
    if (owner_claim(p->gid, OWNER_PAYMENT) != 0)
        goto fail_timer;
    if (strmap_put(by_key, p->key, p) != 0)
        goto fail_owner;
    if (strmap_put(by_id, p->payment_id, p) != 0) {
        strmap_del(by_key, p->key);
        goto fail_owner;
    }
    list_push_tail(&by_state[PS_NEW], &p->state_link);
    nstate[PS_NEW]++;
    return p;
fail_owner:
    owner_release(p->gid, OWNER_PAYMENT);
fail_timer:
    loop_timer_deinit(&p->timer);
fail_early:
    free(p->reference);
    cJSON_Delete(p->metadata);
    free(p);
    return NULL;
}

static void payment_free(payment *p)
{
    loop_timer_deinit(&p->timer);
    free(p->reference);
    cJSON_Delete(p->metadata);
    free(p);
}

/* The account's row is free of this payment's debit (committed, rolled back,
 * or never made): the next payment or credit on it may go. */
static void release_account(payment *p)
{
    if (p->acct) {
        account *a = p->acct;
        p->acct = NULL;
        account_leave(a, &p->slot);
    }
}

/* The payment leaves memory. Waiters left are told the payment as it stands
 * (only reached with waiters when it is durable). */
void pm_done(payment *p)
{
    if (!list_empty(&p->waiters))
        pm_answer_all(p);
    pm_set_state(p, PS_DONE);
    list_unlink(&p->state_link);
    nstate[PS_DONE]--;
    strmap_del(by_key, p->key);
    strmap_del(by_id, p->payment_id);
    owner_release(p->gid, OWNER_PAYMENT);
    release_account(p);
    payment_free(p);
}

/* ---------------------------------------------------------------- queue */

static void queue_timeout(payment *p)
{
    log_warn("payment gid=%s key=%s account=%s event=queue_timeout queued_ms=%d", p->gid, p->key, p->account,
             D->cfg.queue_timeout_ms);
    end_refused(p, PROTO_ERR_OVERLOADED,
                "account busy: the payment waited too long behind others on its account; nothing was charged");
}

/* The account is this payment's now. */
static void slot_start(acct_slot *s)
{
    payment *p = list_entry(s, payment, slot);
    loop_timer_stop(&p->timer);      /* the queue timeout no longer applies */
    p->on_timer = NULL;
    start_phase1(p);
}

/* ---------------------------------------------------------------- phase 1 */

static void phase1_cb(const store_p1 *res, void *arg);

static void start_phase1(payment *p)
{
    pm_set_state(p, PS_PHASE1);
    if (!rec_node_locked()) {
        /* Lost with the database (a failover?): debit again only under the
         * lock, which pay_lock_changed() says is back. */
        if (!p->intent_written) {
            end_refused(p, PROTO_ERR_UNAVAILABLE, "this daemon lost its node lock (database failover?); "
                                                  "nothing was charged");
            return;
        }
        pm_retry(p, 100, 1000, start_phase1);
        return;
    }
    FAILPOINT("before_debit", p->key);
    store_pay sp;
    fill_store_pay(p, &sp);
    int rc = store_phase1(&sp, !p->intent_written, phase1_cb, p);
    if (rc == STORE_QUEUED)
        return;
    if (!p->intent_written) {
        end_refused(p, rc == STORE_UNAVAILABLE ? PROTO_ERR_UNAVAILABLE : PROTO_ERR_OVERLOADED,
                    rc == STORE_UNAVAILABLE ? "database unavailable; nothing was charged"
                                            : "database queue full; nothing was charged");
        return;
    }
    pm_retry(p, 100, 2000, start_phase1);      /* the row exists without a debit: debit again shortly */
}

/* The debit could not be made for now. Retry until queue_timeout_ms, then
 * decline without ever contacting the processor. */
static void debit_later(payment *p, const store_p1 *res)
{
    if (loop_now_ms() - p->started_ms >= (uint64_t)D->cfg.queue_timeout_ms || pm_past_deadline(p)) {
        log_warn("payment gid=%s key=%s account=%s event=debit_gave_up sqlstate=%s error=\"%s\"", p->gid, p->key,
                 p->account, res->sqlstate, res->errmsg);
        if (p->intent_written)
            start_settle(p, "declined", "account_locked");
        else
            end_refused(p, PROTO_ERR_OVERLOADED, "the payment could not be recorded in time; nothing was charged");
        return;
    }
    log_info("payment gid=%s key=%s event=debit_retry sqlstate=%s error=\"%s\"", p->gid, p->key, res->sqlstate,
             res->errmsg);
    pm_retry(p, 50, 1000, start_phase1);
}

static void prepared_now(payment *p)
{
    p->intent_written = true;
    p->prepared_ms = loop_now_ms();
    p->attempts = 0;
    pm_became_durable(p);
    log_info("payment gid=%s key=%s account=%s amount=%lld currency=%s event=prepared", p->gid, p->key, p->account,
             (long long)p->amount, p->currency);
    FAILPOINT("after_prepare", p->key);
    pm_start_create(p);
}

static void phase1_cb(const store_p1 *res, void *arg)
{
    payment *p = arg;
    if (res->intent_written)
        p->intent_written = true;
    switch (res->outcome) {
    case P1_PREPARED:
        prepared_now(p);
        return;
    case P1_NSF:
        log_info("payment gid=%s key=%s account=%s amount=%lld event=insufficient_funds", p->gid, p->key,
                 p->account, (long long)p->amount);
        /* The intent is committed but not flushed: nothing may be told
         * before the settle (synchronous) has made it durable. */
        start_settle(p, "insufficient_funds", NULL);
        return;
    case P1_UNKNOWN_ACCOUNT:
        end_refused(p, PROTO_ERR_UNKNOWN_ACCOUNT, "unknown account");
        return;
    case P1_CURRENCY_MISMATCH:
        end_refused(p, PROTO_ERR_CURRENCY_MISMATCH, res->errmsg);
        return;
    case P1_DUPLICATE_KEY:
        start_lookup(p);
        return;
    case P1_RETRY:
        debit_later(p, res);
        return;
    case P1_FAILED:
        log_error("payment gid=%s key=%s event=intent_failed sqlstate=%s error=\"%s\"", p->gid, p->key, res->sqlstate,
                  res->errmsg);
        end_refused(p, PROTO_ERR_INTERNAL, "the payment could not be recorded; nothing was charged");
        return;
    case P1_NOT_SENT:
        if (!p->intent_written)
            end_refused(p, PROTO_ERR_UNAVAILABLE, "database unavailable; nothing was charged");
        else
            pm_retry(p, 100, 2000, start_phase1);
        return;
    case P1_LOST:
        snprintf(p->fence, sizeof(p->fence), "%s", res->fence ? res->fence : "");
        p->attempts = 0;
        start_fence(p);
        return;
    case P1_SHUTDOWN:
        /* Whatever happened, the processor was never asked: recovery settles
         * a prepared debit as declined. */
        end_refused(p, PROTO_ERR_SHUTTING_DOWN, "the daemon is shutting down; nothing was charged");
        return;
    }
}

/* ---------------------------------------------------------------- fence */

static void fence_cb(const store_facts *f, void *arg);

static void start_fence(payment *p)
{
    pm_set_state(p, PS_FENCE);
    if (store_get_facts(CH_PAY, p->payment_id, p->gid, p->fence[0] ? p->fence : NULL, fence_cb, p) != STORE_QUEUED)
        pm_retry(p, 200, 5000, start_fence);
}

static void fence_cb(const store_facts *f, void *arg)
{
    payment *p = arg;
    if (f->st != ST_OK || !f->fenced) {
        if (f->st == ST_SHUTDOWN) {
            end_refused(p, PROTO_ERR_SHUTTING_DOWN, "the daemon is shutting down; nothing was charged");
            return;
        }
        log_info("payment gid=%s key=%s event=fence_wait fenced=%d error=\"%s\"", p->gid, p->key, f->fenced,
                 f->errmsg ? f->errmsg : "");
        pm_retry(p, 200, 5000, start_fence);
        return;
    }
    p->attempts = 0;
    log_info("payment gid=%s key=%s event=fence row=%d status=%s prepared=%d debited=%d", p->gid, p->key, f->row,
             f->status, f->prepared, f->debited);
    if (!f->row) {
        /* The old session is gone and left no row: nothing is durable, and
         * the processor was never asked. */
        end_refused(p, PROTO_ERR_UNAVAILABLE, "database connection lost; nothing was charged");
        return;
    }
    p->intent_written = true;
    if (f->prepared) {
        prepared_now(p);
        return;
    }
    /* The row is ours but maybe not flushed yet: tell nothing until a
     * synchronous write (PREPARE, a settle, a flag) has made it durable. */
    if (f->debited || strcmp(f->status, "pending") != 0) {
        /* Settled already, which no one but this payment could have done
         * before the processor was asked: an anomaly. Never guess. */
        log_error("payment gid=%s key=%s event=fence_anomaly status=%s debited=%d alert=review", p->gid, p->key,
                  f->status, f->debited);
        ctx_anomaly();
        start_flag(p, "phase 1 found settled before the processor was asked");
        return;
    }
    start_phase1(p);                 /* the row without a debit: debit again */
}

/* ---------------------------------------------------------------- lookup */

static void lookup_cb(const store_lookup *res, void *arg);

static void start_lookup(payment *p)
{
    pm_set_state(p, PS_LOOKUP);
    if (store_payment_by_key(p->key, lookup_cb, p) != STORE_QUEUED)
        end_refused(p, PROTO_ERR_UNAVAILABLE, "database unavailable; nothing new was charged");
}

/* The key belongs to a stored payment: every client is answered from that
 * row, each judged by its own parameters. This payment was never stored. */
static void lookup_cb(const store_lookup *res, void *arg)
{
    payment *p = arg;
    if (res->st != ST_OK || !res->found) {
        end_refused(p, PROTO_ERR_UNAVAILABLE,
                    "could not read the stored payment for this key; nothing new was charged: retry");
        return;
    }
    pm_answer_from_row(p, &res->row);
    pm_done(p);
}

/* ---------------------------------------------------------------- phase 2 */

static void finish_cb(const store_p2 *res, void *arg);
static void record_cb(bool ok, void *arg);

void pm_start_finish(payment *p)
{
    pm_set_state(p, p->dec == DEC_COMMIT ? PS_COMMIT : PS_ROLLBACK);
    if (!rec_node_locked()) {        /* settle only under the node lock (see the header) */
        pm_retry(p, 100, 1000, pm_start_finish);
        return;
    }
    if (store_finish(CH_PAY, p->gid, p->dec == DEC_COMMIT, finish_cb, p) != STORE_QUEUED)
        pm_retry(p, 100, 5000, pm_start_finish);
}

/* The debit is committed. The success is told only once the row says so
 * durably, with the processor_ref and updated_at of the answer, so that
 * every later read (after any crash) returns the same answer; until then
 * the payment stays in memory and its clients wait (or hear `pending` at
 * their wait_ms). */
static void start_record(payment *p)
{
    if (store_record_success(p->payment_id, p->processor_ref[0] ? p->processor_ref : NULL, p->updated_wall_ms,
                             record_cb, p) != STORE_QUEUED)
        pm_retry(p, 100, 5000, start_record);
}

static void succeeded(payment *p)
{
    p->updated_wall_ms = loop_wall_ms();
    p->attempts = 0;
    pm_set_state(p, PS_RECORD);
    start_record(p);
}

static void record_cb(bool ok, void *arg)
{
    payment *p = arg;
    if (!ok) {
        log_warn("payment gid=%s key=%s event=record_failed note=\"written again shortly\"", p->gid, p->key);
        pm_retry(p, 100, 5000, start_record);
        return;
    }
    pm_final(p, "succeeded");
    pm_done(p);
}

static void finish_cb(const store_p2 *res, void *arg)
{
    payment *p = arg;
    switch (res->outcome) {
    case P2_DONE:
        p->attempts = 0;
        FAILPOINT("after_phase2", p->key);
        release_account(p);
        if (p->dec == DEC_COMMIT) {
            succeeded(p);
        } else {
            if (!p->decline_code[0])
                snprintf(p->decline_code, sizeof(p->decline_code), "declined");
            start_settle(p, "declined", p->decline_code);
        }
        return;
    case P2_GONE:
        p->attempts = 0;
        release_account(p);
        start_check(p);
        return;
    case P2_RETRY:
        log_warn("payment gid=%s key=%s event=phase2_retry sqlstate=%s error=\"%s\"", p->gid, p->key, res->sqlstate,
                 res->errmsg);
        pm_retry(p, 100, 5000, pm_start_finish);
        return;
    case P2_SHUTDOWN:
        pm_done(p);             /* the decision is the processor's: recovery repeats it */
        return;
    }
}

/* ---------------------------------------------------------------- check */

static void check_cb(const store_facts *f, void *arg);

static void lost_row_flag_cb(st_status st, void *arg)
{
    (void)arg;
    if (st != ST_OK && st != ST_SHUTDOWN)
        log_error("event=review_flag_not_written alert=review note=\"a lost payment row was not flagged\"");
}

static void start_check(payment *p)
{
    pm_set_state(p, PS_CHECK);
    if (store_get_facts(CH_PAY, p->payment_id, p->gid, NULL, check_cb, p) != STORE_QUEUED)
        pm_retry(p, 100, 5000, start_check);
}

/* COMMIT/ROLLBACK PREPARED found no prepared transaction: our own earlier
 * attempt whose answer was lost, someone else (an operator's resolve), or a
 * write PostgreSQL lost (a failover). The facts decide; the processor's
 * answer (our decision) is compared with them. */
static void check_cb(const store_facts *f, void *arg)
{
    payment *p = arg;
    if (f->st != ST_OK) {
        pm_retry(p, 100, 5000, start_check);
        return;
    }
    if (f->prepared) {               /* cannot be after "does not exist"; do not guess */
        pm_retry(p, 100, 5000, pm_start_finish);
        return;
    }
    bool want_commit = p->dec == DEC_COMMIT;
    log_info("payment gid=%s key=%s event=settled_elsewhere wanted=%s row=%d debited=%d", p->gid, p->key,
             want_commit ? "commit" : "rollback", f->row, f->debited);
    if (f->debited) {
        if (want_commit) {
            succeeded(p);
            return;
        }
        log_error("payment gid=%s key=%s event=settled_against_decision wanted=rollback found=committed "
                  "alert=reconcile", p->gid, p->key);
        ctx_anomaly();
        start_flag(p, "debit committed although the processor declined: refund the account by hand");
        return;
    }
    if (!want_commit) {
        if (!f->row) {
            /* Consistent (no debit, no charge), but PostgreSQL lost a write
             * it had confirmed: the row is written anew as declined, and the
             * gid is flagged so that someone looks for other lost writes. */
            log_error("payment gid=%s key=%s event=row_lost decision=rollback alert=reconcile "
                      "note=\"the database lost this payment's row (a failover?); it is written again\"",
                      p->gid, p->key);
            D->stats.alerts++;
            if (store_flag_review(CH_PAY, p->gid, p->payment_id,
                                  "the database lost this payment's row (written again as declined): "
                                  "check for other lost writes", lost_row_flag_cb, NULL) != STORE_QUEUED)
                log_error("payment gid=%s event=review_flag_not_written alert=review", p->gid);
        }
        start_settle(p, "declined", p->decline_code[0] ? p->decline_code : "declined");
        return;
    }
    log_error("payment gid=%s key=%s event=settled_against_decision wanted=commit found=%s alert=reconcile", p->gid,
              p->key, f->row ? "rolled_back" : "no_row");
    ctx_anomaly();
    start_flag(p, f->row ? "processor charged but the debit was rolled back: re-debit or refund by hand"
                         : "processor charged but the database lost the payment: re-debit or refund by hand");
}

/* ---------------------------------------------------------------- settle */

static void settle_cb(const store_settled *res, void *arg);

static void settle_now(payment *p)
{
    pm_set_state(p, PS_SETTLE);
    store_pay sp;
    fill_store_pay(p, &sp);
    int rc;
#ifdef PAYCOORD_FAILPOINTS
    /* Non-fatal test point: the first settle attempt finds the database gone. */
    if (p->attempts == 0 && failpoint_armed("settle_unavailable", p->key))
        rc = STORE_UNAVAILABLE;
    else
#endif
        rc = store_settle(CH_PAY, &sp, p->settle_status, p->decline_code[0] ? p->decline_code : NULL,
                          p->processor_ref[0] ? p->processor_ref : NULL, settle_cb, p);
    if (rc != STORE_QUEUED)
        pm_retry(p, 100, 5000, settle_now);
}

static void start_settle(payment *p, const char *status, const char *decline_code)
{
    snprintf(p->settle_status, sizeof(p->settle_status), "%s", status);
    if (decline_code && decline_code != p->decline_code)
        snprintf(p->decline_code, sizeof(p->decline_code), "%s", decline_code);
    p->updated_wall_ms = loop_wall_ms();
    p->attempts = 0;
    settle_now(p);
}

static void settle_cb(const store_settled *res, void *arg)
{
    payment *p = arg;
    if (res->st == ST_SHUTDOWN) {
        pm_done(p);
        return;
    }
    if (res->st != ST_OK) {
        log_warn("payment gid=%s key=%s event=settle_retry error=\"%s\"", p->gid, p->key, res->errmsg);
        pm_retry(p, 100, 5000, settle_now);
        return;
    }
    if (res->conflict) {
        /* PostgreSQL lost our row and the key was stored again by another
         * request meanwhile: ours cannot be recorded. Nothing was charged. */
        log_error("payment gid=%s key=%s event=settle_conflict status=%s alert=reconcile", p->gid, p->key,
                  p->settle_status);
        ctx_anomaly();
        p->final = true;
        pm_answer_error(p, PROTO_ERR_UNAVAILABLE, "the payment could not be recorded; nothing was charged");
        pm_done(p);
        return;
    }
    if (!strcmp(res->status, "pending")) {   /* not settled yet (a prepared debit is back?): try again */
        pm_retry(p, 100, 5000, settle_now);
        return;
    }
    if (strcmp(res->status, p->settle_status) != 0) {
        log_error("payment gid=%s key=%s event=settled_otherwise wanted=%s found=%s alert=review", p->gid, p->key,
                  p->settle_status, res->status);
        ctx_anomaly();
    }
    p->durable = true;
    pm_final(p, !strcmp(res->status, "succeeded") ? "succeeded"
                     : !strcmp(res->status, "insufficient_funds") ? "insufficient_funds" : "declined");
    pm_done(p);
}

/* ---------------------------------------------------------------- hand-off */

static void handoff_flag_cb(st_status st, void *arg);

static void handoff_now(payment *p)
{
    if (p->review &&
        store_flag_review(CH_PAY, p->gid, p->payment_id, p->why, handoff_flag_cb, p) != STORE_QUEUED) {
        pm_retry(p, 200, 5000, handoff_now);
        return;
    }
    if (!p->review)
        handoff_flag_cb(ST_OK, p);
}

/* Hand the prepared debit over to recovery. With review, the flag is durable
 * before the payment leaves memory (until then the gid is owned here, so
 * recovery cannot touch it). */
void pm_start_handoff(payment *p, bool review, const char *why)
{
    pm_set_state(p, PS_HANDOFF);
    p->review = review;
    snprintf(p->why, sizeof(p->why), "%s", why);
    p->attempts = 0;
    handoff_now(p);
}

static void handoff_flag_cb(st_status st, void *arg)
{
    payment *p = arg;
    if (st != ST_OK && st != ST_SHUTDOWN) {
        log_error("payment gid=%s key=%s event=review_flag_retry alert=review", p->gid, p->key);
        pm_retry(p, 200, 5000, handoff_now);
        return;
    }
    rec_adopt(p->gid);
    pm_done(p);                 /* clients: 'pending' */
}

static void flag_cb(st_status st, void *arg);

static void flag_now(payment *p)
{
    if (store_flag_review(CH_PAY, p->gid, p->payment_id, p->why, flag_cb, p) != STORE_QUEUED)
        pm_retry(p, 200, 5000, flag_now);
}

/* No prepared debit, and the facts contradict the processor: flag it for a
 * person (durably), release the account, tell clients 'pending'. */
static void start_flag(payment *p, const char *why)
{
    pm_set_state(p, PS_FLAG);
    snprintf(p->why, sizeof(p->why), "%s", why);
    p->attempts = 0;
    flag_now(p);
}

static void flag_cb(st_status st, void *arg)
{
    payment *p = arg;
    if (st != ST_OK && st != ST_SHUTDOWN) {
        pm_retry(p, 200, 5000, flag_now);
        return;
    }
    pm_done(p);
}

/* ---------------------------------------------------------------- pay op */

void pay_handle_pay(pc_request *r)
{
    const proto_request *q = &r->req;
    payment *p = strmap_get(by_key, q->idempotency_key);
    if (p) {
        /* The key is in flight here: never a second charge. Judged against
         * this payment once its row is known to be the key's. */
        if (p->durable && !pm_same_request(p, q)) {
            req_reply_err(r, PROTO_ERR_IDEMPOTENCY_CONFLICT,
                          "idempotency key %s is in use with another account, amount or currency", q->idempotency_key);
            return;
        }
        if (p->final) {
            D->stats.replays++;
            req_reply_ok(r, pm_json(p, true));
            return;
        }
        if (p->durable)
            D->stats.replays++;
        if (pm_waiter_add(p, r, true) != 0)
            req_reply_err(r, PROTO_ERR_INTERNAL, "out of memory; nothing new was charged");
        return;
    }
    if (D->shutting_down) {
        req_reply_err(r, PROTO_ERR_SHUTTING_DOWN, "the daemon is shutting down; nothing was charged");
        return;
    }
    if (!store_is_up()) {
        req_reply_err(r, PROTO_ERR_UNAVAILABLE, "database unavailable; nothing was charged");
        return;
    }
    if (!rec_node_locked()) {
        if (nodelock_get_state() == NODELOCK_POOLED)
            req_reply_err(r, PROTO_ERR_UNAVAILABLE,
                          "the database connection goes through a pooler in transaction mode (pgbouncer pool_mode = "
                          "transaction?): the node lock cannot hold there; use session pooling; nothing was charged");
        else
            req_reply_err(r, PROTO_ERR_UNAVAILABLE,
                          "this daemon does not hold its node lock (starting, a database failover, or another daemon "
                          "runs with node_id %s); nothing was charged", D->cfg.node_id);
        return;
    }
    const char *unsafe = NULL;
    if (!dbsafety_payments_allowed(&unsafe)) {
        req_reply_err(r, PROTO_ERR_UNAVAILABLE, "%s", unsafe);
        return;
    }
    if (D->max_prepared_server <= 0) {
        req_reply_err(r, PROTO_ERR_UNAVAILABLE, D->max_prepared_server == 0
                      ? "the database has max_prepared_transactions = 0 (two-phase commit disabled); nothing was charged"
                      : "starting up; nothing was charged");
        return;
    }
    if (in_flight >= D->cfg.max_in_flight || in_flight + rec_orphans() >= D->prepared_limit) {
        req_reply_err(r, PROTO_ERR_OVERLOADED, "too many payments in flight (%d, %d more prepared and left to "
                      "recovery); nothing was charged", in_flight, rec_orphans());
        return;
    }
    if (!circuit_allows()) {
        req_reply_err(r, PROTO_ERR_OVERLOADED,
                      "processor circuit open after repeated failures (or rate limited); nothing was charged");
        return;
    }
    account *a = account_get(q->account);
    if (!a) {
        req_reply_err(r, PROTO_ERR_INTERNAL, "out of memory; nothing was charged");
        return;
    }
    p = payment_new(q);
    if (!p) {
        account_put(a);
        req_reply_err(r, PROTO_ERR_INTERNAL, "out of memory; nothing was charged");
        return;
    }
    if (pm_waiter_add(p, r, false) != 0) {
        pm_done(p);
        account_put(a);
        req_reply_err(r, PROTO_ERR_INTERNAL, "out of memory; nothing was charged");
        return;
    }
    log_debug("payment gid=%s key=%s account=%s amount=%lld currency=%s event=received", p->gid, p->key, p->account,
              (long long)p->amount, p->currency);
    int got = account_enter(a, &p->slot);
    if (got < 0) {
        end_refused(p, PROTO_ERR_OVERLOADED, "too many payments queued on this account; nothing was charged");
        account_put(a);
        return;
    }
    p->acct = a;
    if (got == 1) {
        start_phase1(p);
        return;
    }
    pm_set_state(p, PS_QUEUED);
    pm_after(p, D->cfg.queue_timeout_ms, queue_timeout);
}

/* ---------------------------------------------------------------- failover */

/* The node lock was taken (again): payments whose database step waits out a
 * backoff (phase 1 or 2, a fence, a check, a settle, a flag) go now. */
static void pay_lock_changed(bool locked)
{
    static const pay_state waiting_on_db[] = { PS_PHASE1, PS_FENCE, PS_COMMIT, PS_ROLLBACK,
                                               PS_CHECK, PS_SETTLE, PS_FLAG, PS_HANDOFF };
    if (!locked)
        return;
    int kicked = 0;
    for (size_t i = 0; i < PC_ARRAY_LEN(waiting_on_db); i++) {
        pc_list *n, *tmp;
        list_each_safe(&by_state[waiting_on_db[i]], n, tmp) {
            payment *p = list_entry(n, payment, state_link);
            if (p->on_timer && loop_timer_pending(&p->timer)) {
                loop_timer_start(&p->timer, 0);
                kicked++;
            }
        }
    }
    if (kicked)
        log_info("payment event=resumed_after_node_lock count=%d", kicked);
}

/* ---------------------------------------------------------------- init */

int pay_init(void)
{
    by_key = strmap_new();
    by_id = strmap_new();
    for (int i = 0; i < PS__COUNT; i++) {
        list_init(&by_state[i]);
        nstate[i] = 0;
    }
    in_flight = prepared = 0;
    pm_answers_init();
    circuit_reset();
    return (by_key && by_id && nodelock_watch(pay_lock_changed) == 0) ? 0 : -1;
}

void pay_shutdown(bool answer)
{
    for (int s = 0; s < PS__COUNT; s++) {
        pc_list *n;
        while ((n = list_pop_head(&by_state[s]))) {
            payment *p = list_entry(n, payment, state_link);
            pm_waiter_drop_all(p, answer);
            owner_release(p->gid, OWNER_PAYMENT);
            payment_free(p);
        }
        nstate[s] = 0;
    }
    pm_answers_shutdown(answer);
    in_flight = prepared = 0;
    strmap_free(by_key);
    strmap_free(by_id);
    by_key = by_id = NULL;
}
