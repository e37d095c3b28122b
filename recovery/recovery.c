/*
 * recovery.c - settles every prepared transaction and every stale payment row
 * of this node that no live request drives, by asking the processor. Runs at
 * startup (readiness waits for the first pass), every recovery_interval_ms,
 * when the node lock is taken, and on `recover`.
 *
 * The processor is the source of truth for what happened to money; the
 * database for what we promised. Per item of a pass (at most REC_CONCURRENCY
 * at once), after claiming its gid (owner.h: a live payment or a resolve that
 * holds it is left alone):
 *
 *  prepared transaction, GET by gid:
 *    succeeded          -> COMMIT PREPARED, row recorded 'succeeded'
 *    declined/canceled  -> ROLLBACK PREPARED, row 'declined'
 *    pending            -> leave; past the deadline: cancel
 *    not found          -> cancel: the tombstone makes a late create charge
 *                          nothing, so rolling back is then safe
 *    unknown/5xx/auth   -> leave (backoff); never guess
 *    stuck, conflict    -> the adapter can learn nothing more by asking
 *                          (e.g. no deciding webhook in time), or the key
 *                          was used with other parameters: manual review
 *  (What "GET" means is the adapter's: by gid, by the processor's id, by
 *  replaying the identical create before the deadline, by a lagging search,
 *  or from the webhooks received; proc.h. Each item carries the payment as it
 *  was sent, so that a replay is identical.)
 *  cancel:
 *    canceled           -> ROLLBACK PREPARED, row 'declined'
 *    already_succeeded  -> COMMIT PREPARED
 *    501 unsupported    -> leave until processor_idempotency_window_s has
 *                          passed since PREPARE, then roll back and flag the
 *                          payment for reconciliation (review)
 *    pending            -> leave (an asynchronous cancel: its outcome comes
 *                          by webhook); stuck -> manual review
 *  'pending' row without a prepared transaction (the daemon died before
 *  PREPARE, or between ROLLBACK PREPARED and the row's update): it holds no
 *  debit. Read again (the listing is a snapshot), then GET: declined, canceled
 *  or not found (then cancel) -> 'declined'; succeeded -> money moved without
 *  a debit: review, alert. Never settled while the processor may still say
 *  otherwise.
 *  committed debit whose row still says 'pending' (the asynchronous row write
 *  was lost): record 'succeeded', with the processor's reference when it
 *  gives one.
 *
 *  COMMIT/ROLLBACK PREPARED answering "does not exist": the facts are read
 *  again and compared with the processor's answer; a mismatch is alerted and
 *  flagged for review.
 *
 * Attempts: an item left undecided counts one attempt when it was due (its
 * backoff had passed), so a forced `recover` can ask early without pushing a
 * gid towards review; after max_recovery_attempts it is flagged for review.
 *
 * Crash windows: every step re-derives its facts from PostgreSQL and the
 * processor, so a pass cut short anywhere is simply run again (I7).
 *
 * Failover: a pass settles nothing (COMMIT/ROLLBACK PREPARED, a decline)
 * unless the node lock it started under is still held (nodelock_epoch()):
 * after the lock session went down, e.g. with a primary that died, its items
 * are left uncounted, and a new pass starts as soon as the lock is taken
 * again on the new primary.
 *
 * Re-entrancy: item steps only continue from store and processor callbacks
 * (which never fire inside the call); an item that ends at once only counts
 * down, and the pump that starts items runs from its own timer, so the stack
 * never grows with the number of items and nothing touches a pass after
 * pass_finish() freed it.
 */
#include "recovery.h"
#include "backoff.h"
#include "ctx.h"
#include "dbsafety.h"
#include "failpoint.h"
#include "gid.h"
#include "list.h"
#include "log.h"
#include "loop.h"
#include "nodelock.h"
#include "owner.h"
#include "proc.h"
#include "store.h"
#include "strmap.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define REC_CONCURRENCY 256
#define REC_BACKOFF_CAP_MS 3600000

typedef struct rec_pass rec_pass;

typedef struct rec_item {
    pc_list link;
    rec_pass *pass;
    char gid[GID_MAX + 1];
    char payment_id[UUID_TEXT_LEN + 1];
    bool prepared, debited, past_deadline;
    bool due;                        /* its backoff had passed: an undecided answer counts */
    bool claimed;
    int64_t age_ms;
    int64_t since_deadline_ms;
    int attempts;
    char processor_ref[128];
    char decline_code[64];
    /* the payment as sent to the processor (empty without a row) */
    char account[72];
    char currency[4];
    char *reference;
    cJSON *metadata;
    int64_t amount;
} rec_item;

typedef struct rec_waiter {
    pc_list link;
    void (*cb)(const rec_counts *c, const char *err, void *arg);
    void *arg;
} rec_waiter;

struct rec_pass {
    char node[GID_NODE_MAX + 1];
    bool foreign;                    /* a dead node's gids, its lock held for this pass */
    bool forced;
    pc_list todo;
    pc_list active;                  /* items started and not done */
    int running;
    rec_counts counts;
    pc_list waiters;
    uint64_t started_ms;
    uint64_t lock_epoch;             /* nodelock_epoch() when it started */
    loop_timer pump;
};

typedef struct backoff_entry {
    uint64_t next_ms;
} backoff_entry;

static rec_pass *current;
static loop_timer tick;
static strmap *backoffs;             /* gid -> when it is due again */
static bool first_pass_done;
static bool rerun;                   /* the node lock was taken again during a pass */
static int orphans;

static void item_done(rec_item *it);
static void item_free(rec_item *it);
static void pass_pump_soon(rec_pass *ps);
static void schedule_tick(int ms);

bool rec_busy(void) { return current != NULL; }
bool rec_first_pass_done(void) { return first_pass_done; }
int rec_orphans(void) { return orphans; }
void rec_adopt(const char *gid)
{
    (void)gid;
    orphans++;
}

void rec_forgotten(const char *gid)
{
    free(strmap_del(backoffs, gid));
    if (orphans > 0)
        orphans--;
}

static void alert(void) { D->stats.alerts++; }

/* flag_review() counts an alert; an anomaly counts once more. */
static void anomaly(void) { D->stats.anomalies++; }

/* ---------------------------------------------------------------- leave / review */

static void review_cb(st_status st, void *arg)
{
    char *gid = arg;
    if (st != ST_OK && st != ST_SHUTDOWN) {
        log_error("recovery gid=%s event=review_flag_not_written alert=review "
                  "note=\"a gid meant for manual review is not flagged; the next pass flags it again\"", gid);
        alert();
    }
    free(gid);
}

/* Flag gid for manual review (durably; recovery skips it from then on). */
static void flag_review(const rec_item *it, const char *why)
{
    log_error("recovery gid=%s event=manual_review reason=\"%s\" alert=review", it->gid, why);
    alert();
    char *gid = strdup(it->gid);
    if (!gid || store_flag_review(CH_REC, it->gid, it->payment_id, why, review_cb, gid) != STORE_QUEUED) {
        log_error("recovery gid=%s event=review_flag_not_written alert=review", it->gid);
        free(gid);
    }
}

/* Leave the item for a later pass. */
static void item_leave(rec_item *it, const char *why)
{
    rec_pass *ps = it->pass;
    ps->counts.left++;
    D->stats.recoveries_left++;
    if (!it->due) {
        log_info("recovery gid=%s event=left_early reason=\"%s\" note=\"asked before it was due: not counted\"",
                 it->gid, why);
        item_done(it);
        return;
    }
    int attempts = it->attempts + 1;
    backoff_entry *b = strmap_get(backoffs, it->gid);
    if (!b && (b = calloc(1, sizeof(*b))) && strmap_put(backoffs, it->gid, b) != 0) {
        free(b);
        b = NULL;
    }
    if (b)
        b->next_ms = loop_now_ms() + (uint64_t)backoff_ms(D->cfg.recovery_interval_ms, attempts, REC_BACKOFF_CAP_MS);
    store_note_attempt(it->gid, it->payment_id, attempts, why);
    if (attempts >= D->cfg.max_recovery_attempts) {
        char msg[300];
        snprintf(msg, sizeof(msg), "gave up after %d attempts: %s", attempts, why);
        flag_review(it, msg);
    } else {
        log_warn("recovery gid=%s event=left attempts=%d reason=\"%s\"", it->gid, attempts, why);
    }
    item_done(it);
}

/* Not settleable before a known time (a processor without cancel by key:
 * the end of its idempotency window). Waiting is the plan, not a failed
 * attempt: nothing is counted, and the gid is looked at again then (or at
 * the recovery interval, if that comes first). */
static void item_wait(rec_item *it, const char *why, int64_t due_in_ms)
{
    it->pass->counts.left++;
    D->stats.recoveries_left++;
    backoff_entry *b = strmap_get(backoffs, it->gid);
    if (!b && (b = calloc(1, sizeof(*b))) && strmap_put(backoffs, it->gid, b) != 0) {
        free(b);
        b = NULL;
    }
    if (due_in_ms < 0)
        due_in_ms = 0;
    if (due_in_ms > D->cfg.recovery_interval_ms)
        due_in_ms = D->cfg.recovery_interval_ms;
    if (b)
        b->next_ms = loop_now_ms() + (uint64_t)due_in_ms;
    log_info("recovery gid=%s event=waiting reason=\"%s\" next_check_ms=%lld", it->gid, why, (long long)due_in_ms);
    item_done(it);
}

/* Settled: drop the gid's backoff and bookkeeping. */
static void forget(rec_item *it)
{
    free(strmap_del(backoffs, it->gid));
    if (it->attempts > 0)
        store_forget(it->gid);
}

/* ---------------------------------------------------------------- phase 2 */

static void check_cb(const store_facts *f, void *arg);
static void finish_cb(const store_p2 *res, void *arg);
static void settle_cb(const store_settled *res, void *arg);
static void marked_cb(st_status st, void *arg);

static bool want_commit_of(const rec_item *it) { return it->decline_code[0] == '\0'; }

/* Still under the node lock the pass started with? Otherwise leave the item
 * (not counted as an attempt) for the pass that runs once the lock is back. */
static bool lock_lost(rec_item *it)
{
    if (rec_node_locked() && nodelock_epoch() == it->pass->lock_epoch)
        return false;
    it->due = false;
    item_leave(it, "node lock lost during the pass (a failover?)");
    return true;
}

static void item_finish(rec_item *it)
{
    if (lock_lost(it))
        return;
    if (store_finish(CH_REC, it->gid, want_commit_of(it), finish_cb, it) != STORE_QUEUED)
        item_leave(it, "database unavailable for the second phase");
}

static void item_commit(rec_item *it, const char *ref)
{
    if (ref && ref[0])
        snprintf(it->processor_ref, sizeof(it->processor_ref), "%s", ref);
    it->decline_code[0] = '\0';
    if (!it->prepared) {
        /* The processor charged and no debit exists. The listing may predate
         * a live commit: check_cb reads the facts again before alarming. */
        if (store_get_facts(CH_REC, it->payment_id, it->gid, NULL, check_cb, it) != STORE_QUEUED)
            item_leave(it, "database unavailable for the recheck");
        return;
    }
    FAILPOINT("recovery_before_commit", NULL);
    item_finish(it);
}

static void item_settle_declined(rec_item *it)
{
    if (!it->payment_id[0]) {            /* a gid without a row: nothing to record */
        it->pass->counts.rolled_back++;
        D->stats.recoveries_rolled_back++;
        forget(it);
        orphans -= orphans > 0;
        item_done(it);
        return;
    }
    if (lock_lost(it))
        return;
    store_pay sp = { .payment_id = it->payment_id, .gid = it->gid };
    if (store_settle(CH_REC, &sp, "declined", it->decline_code, it->processor_ref[0] ? it->processor_ref : NULL,
                     settle_cb, it) != STORE_QUEUED)
        item_leave(it, "database unavailable while recording the decline");
}

static void item_rollback(rec_item *it, const char *code, const char *ref)
{
    snprintf(it->decline_code, sizeof(it->decline_code), "%s", code && code[0] ? code : "declined");
    if (ref && ref[0])
        snprintf(it->processor_ref, sizeof(it->processor_ref), "%s", ref);
    if (it->prepared)
        item_finish(it);
    else
        item_settle_declined(it);
}

static void finish_cb(const store_p2 *res, void *arg)
{
    rec_item *it = arg;
    bool commit = want_commit_of(it);
    switch (res->outcome) {
    case P2_DONE:
        it->prepared = false;
        orphans -= orphans > 0;
        if (commit) {
            it->pass->counts.committed++;
            D->stats.recoveries_committed++;
            log_notice("recovery gid=%s event=committed processor_ref=%s", it->gid,
                       it->processor_ref[0] ? it->processor_ref : "-");
            if (!it->payment_id[0] ||
                store_rec_mark_succeeded(it->payment_id, it->processor_ref[0] ? it->processor_ref : NULL, marked_cb,
                                         it) != STORE_QUEUED) {
                forget(it);
                item_done(it);
            }
            return;
        }
        item_settle_declined(it);
        return;
    case P2_GONE:
        /* Someone else settled it after the listing (or it was lost): read
         * the facts and compare them with the processor's answer. */
        it->prepared = false;
        if (store_get_facts(CH_REC, it->payment_id, it->gid, NULL, check_cb, it) != STORE_QUEUED)
            item_leave(it, "database unavailable for the recheck");
        return;
    case P2_RETRY:
        item_leave(it, res->errmsg && res->errmsg[0] ? res->errmsg : "second phase failed");
        return;
    case P2_SHUTDOWN:
        item_done(it);
        return;
    }
}

static void marked_cb(st_status st, void *arg)
{
    rec_item *it = arg;
    if (st != ST_OK && st != ST_SHUTDOWN)
        log_warn("recovery gid=%s event=record_failed note=\"the next pass records it\"", it->gid);
    forget(it);
    item_done(it);
}

static void settle_cb(const store_settled *res, void *arg)
{
    rec_item *it = arg;
    if (res->st != ST_OK) {
        if (res->st == ST_SHUTDOWN) {
            item_done(it);
            return;
        }
        /* The debit is gone already; the row stays 'pending' and a later
         * pass settles it (a stale row). */
        item_leave(it, "database unavailable while recording the decline");
        return;
    }
    if (!strcmp(res->status, "succeeded")) {
        log_error("recovery gid=%s event=settled_against_decision wanted=rollback found=committed alert=reconcile",
                  it->gid);
        anomaly();
        flag_review(it, "debit committed although the processor declined: refund the account by hand");
        item_done(it);
        return;
    }
    it->pass->counts.rolled_back++;
    D->stats.recoveries_rolled_back++;
    log_notice("recovery gid=%s event=rolled_back decline_code=%s", it->gid, it->decline_code);
    forget(it);
    item_done(it);
}

/* The facts after "does not exist" or before calling a charge without debit. */
static void check_cb(const store_facts *f, void *arg)
{
    rec_item *it = arg;
    if (f->st != ST_OK) {
        item_leave(it, "database unavailable for the recheck");
        return;
    }
    bool commit = want_commit_of(it);
    if (f->prepared) {               /* the listing was stale the other way round: next pass */
        item_leave(it, "prepared transaction reappeared");
        return;
    }
    if (commit && f->debited) {
        log_info("recovery gid=%s event=settled_elsewhere found=committed", it->gid);
        forget(it);
        item_done(it);
        return;
    }
    if (!commit && !f->debited) {
        if (f->row && !strcmp(f->status, "pending")) {
            item_settle_declined(it);
            return;
        }
        log_info("recovery gid=%s event=settled_elsewhere found=rolled_back", it->gid);
        forget(it);
        item_done(it);
        return;
    }
    if (f->review) {                 /* already in a person's hands */
        item_done(it);
        return;
    }
    log_error("recovery gid=%s event=settled_against_decision wanted=%s found=%s alert=reconcile", it->gid,
              commit ? "commit" : "rollback", f->debited ? "committed" : f->row ? "no_debit" : "no_row");
    anomaly();
    flag_review(it, commit ? "processor charged a payment that holds no debit: re-debit or refund by hand"
                           : "debit committed although the processor declined: refund the account by hand");
    item_done(it);
}

/* ---------------------------------------------------------------- processor */

static void fill_req(const rec_item *it, proc_req *pr)
{
    *pr = (proc_req){ .gid = it->gid, .payment_id = it->payment_id,
                      .processor_ref = it->processor_ref[0] ? it->processor_ref : NULL, .amount = it->amount,
                      .currency = it->currency[0] ? it->currency : NULL, .account = it->account[0] ? it->account : NULL,
                      .reference = it->reference, .metadata = it->metadata,
                      .since_deadline_ms = it->since_deadline_ms, .debit_held = it->prepared,
                      .never_debited = !it->prepared && !it->debited };
}

/* The processor's id of the payment, as soon as an answer carries it. */
static void note_ref(rec_item *it, const proc_result *res)
{
    if (!res->id[0] || !strcmp(res->id, it->processor_ref))
        return;
    if (it->payment_id[0])
        store_save_processor_ref(it->payment_id, res->id);
    snprintf(it->processor_ref, sizeof(it->processor_ref), "%s", res->id);
}

/* The adapter can learn nothing more by asking: a person decides. */
static void item_stuck(rec_item *it, const proc_result *res)
{
    flag_review(it, res->error[0] ? res->error : "the processor adapter can make no more progress");
    item_done(it);
}

static void cancel_cb(const proc_result *res, void *arg)
{
    rec_item *it = arg;
    note_ref(it, res);
    switch (res->outcome) {
    case PROC_PAYMENT:
        if (res->status == PROC_ST_SUCCEEDED)
            item_commit(it, res->id);
        else if (res->status == PROC_ST_PENDING)
            item_leave(it, "cancel answered pending");
        else
            item_rollback(it, res->decline_code[0] ? res->decline_code : "canceled", res->id);
        return;
    case PROC_ALREADY_SUCCEEDED:
        item_commit(it, res->id);
        return;
    case PROC_UNSUPPORTED:
        /* No create of this payment is sent after its deadline; past the
         * window after that, the key can no longer charge. */
        if (it->since_deadline_ms >= (int64_t)D->cfg.processor_idempotency_window_s * 1000) {
            /* The key can no longer charge: roll back, and have a person
             * reconcile it against the processor's records. */
            flag_review(it, "rolled back after the idempotency window without cancel-by-key: reconcile");
            item_rollback(it, "expired_unconfirmed", NULL);
        } else {
            item_wait(it, "processor cannot cancel by key; waiting out its idempotency window",
                      (int64_t)D->cfg.processor_idempotency_window_s * 1000 - it->since_deadline_ms);
        }
        return;
    case PROC_STUCK:
        item_stuck(it, res);
        return;
    default:
        item_leave(it, res->error[0] ? res->error : proc_outcome_name(res->outcome));
        return;
    }
}

static void item_cancel(rec_item *it)
{
    log_info("recovery gid=%s event=cancel", it->gid);
    proc_req pr;
    fill_req(it, &pr);
    if (proc_cancel(&pr, cancel_cb, it) != 0)
        item_leave(it, "cancel not sent");
}

static void get_cb(const proc_result *res, void *arg)
{
    rec_item *it = arg;
    note_ref(it, res);
    switch (res->outcome) {
    case PROC_PAYMENT:
        switch (res->status) {
        case PROC_ST_SUCCEEDED:
            item_commit(it, res->id);
            return;
        case PROC_ST_DECLINED:
        case PROC_ST_CANCELED:
            item_rollback(it, res->decline_code[0] ? res->decline_code
                              : res->status == PROC_ST_CANCELED ? "canceled" : "declined", res->id);
            return;
        default:
            if (it->past_deadline)
                item_cancel(it);
            else
                item_leave(it, "processor says pending");
            return;
        }
    case PROC_NOT_FOUND:
        item_cancel(it);
        return;
    case PROC_CONFLICT:             /* a get that replays the create: our key, other parameters */
    case PROC_STUCK:
        item_stuck(it, res);
        return;
    default:
        item_leave(it, res->error[0] ? res->error : proc_outcome_name(res->outcome));
        return;
    }
}

static void item_ask(rec_item *it)
{
    log_info("recovery gid=%s event=check prepared=%d age_ms=%lld attempts=%d", it->gid, it->prepared,
             (long long)it->age_ms, it->attempts);
    proc_req pr;
    fill_req(it, &pr);
    if (proc_get(&pr, get_cb, it) != 0)
        item_leave(it, "status request not sent");
}

/* A committed debit whose row was not recorded: record it, with the
 * processor's reference when it gives one. */
static void ref_cb(const proc_result *res, void *arg)
{
    rec_item *it = arg;
    if (res->outcome == PROC_PAYMENT && res->status != PROC_ST_SUCCEEDED && res->status != PROC_ST_PENDING) {
        log_error("recovery gid=%s event=debit_without_charge processor=%s alert=reconcile", it->gid,
                  proc_status_name(res->status));
        anomaly();
        flag_review(it, "committed debit but the processor says it did not charge: refund the account by hand");
    }
    const char *ref = (res->outcome == PROC_PAYMENT || res->outcome == PROC_ALREADY_SUCCEEDED) ? res->id : NULL;
    if (store_rec_mark_succeeded(it->payment_id, ref && ref[0] ? ref : NULL, marked_cb, it) != STORE_QUEUED)
        item_leave(it, "database unavailable while recording success");
}

static void recheck_cb(const store_facts *f, void *arg)
{
    rec_item *it = arg;
    if (f->st != ST_OK) {
        item_leave(it, "database unavailable for the recheck");
        return;
    }
    if (!f->row || f->prepared || strcmp(f->status, "pending") != 0 || (f->review && !f->debited)) {
        log_info("recovery gid=%s event=settled_elsewhere", it->gid);
        it->pass->counts.checked--;
        item_done(it);
        return;
    }
    it->debited = f->debited;
    proc_req pr;
    fill_req(it, &pr);
    if (it->debited) {
        if (proc_get(&pr, ref_cb, it) != 0)
            item_leave(it, "status request not sent");
        return;
    }
    item_ask(it);
}

static void item_start(rec_item *it)
{
    rec_pass *ps = it->pass;
    list_push_tail(&ps->active, &it->link);
    ps->running++;
    ps->counts.checked++;
    if (owner_claim(it->gid, OWNER_RECOVERY) != 0) {
        /* A live payment or an operator's resolve drives it right now. */
        ps->counts.checked--;
        item_done(it);
        return;
    }
    it->claimed = true;
    if (it->prepared) {
        item_ask(it);
        return;
    }
    /* A row without a prepared transaction: the listing is a snapshot, a
     * live payment may have settled it since. Read it again first. */
    if (store_get_facts(CH_REC, it->payment_id, it->gid, NULL, recheck_cb, it) != STORE_QUEUED)
        item_leave(it, "database unavailable for the recheck");
}

/* ---------------------------------------------------------------- pass */

static void pass_finish(rec_pass *ps);

static void item_free(rec_item *it)
{
    free(it->reference);
    cJSON_Delete(it->metadata);
    free(it);
}

static void item_done(rec_item *it)
{
    rec_pass *ps = it->pass;
    if (it->claimed)
        owner_release(it->gid, OWNER_RECOVERY);
    list_unlink(&it->link);
    item_free(it);
    ps->running--;
    pass_pump_soon(ps);
}

static void pass_pump(void *arg)
{
    rec_pass *ps = arg;
    pc_list *n;
    while (ps->running < REC_CONCURRENCY && (n = list_pop_head(&ps->todo)))
        item_start(list_entry(n, rec_item, link));
    if (list_empty(&ps->todo) && ps->running == 0)
        pass_finish(ps);
}

static void pass_pump_soon(rec_pass *ps)
{
    if (!loop_timer_pending(&ps->pump))
        loop_timer_start(&ps->pump, 0);
}

static void pass_free(rec_pass *ps)
{
    pc_list *n;
    while ((n = list_pop_head(&ps->todo)))
        item_free(list_entry(n, rec_item, link));
    while ((n = list_pop_head(&ps->waiters))) {
        rec_waiter *w = list_entry(n, rec_waiter, link);
        w->cb(NULL, "recovery stopped: the daemon is shutting down", w->arg);
        free(w);
    }
    loop_timer_deinit(&ps->pump);
    free(ps);
}

static void pass_finish(rec_pass *ps)
{
    if (ps != current)
        return;
    current = NULL;
    D->stats.recovery_runs++;
    log_notice("recovery event=pass_done node=%s checked=%d committed=%d rolled_back=%d left=%d ms=%llu", ps->node,
               ps->counts.checked, ps->counts.committed, ps->counts.rolled_back, ps->counts.left,
               (unsigned long long)(loop_now_ms() - ps->started_ms));
    pc_list *n;
    while ((n = list_pop_head(&ps->waiters))) {
        rec_waiter *w = list_entry(n, rec_waiter, link);
        w->cb(&ps->counts, NULL, w->arg);
        free(w);
    }
    if (ps->foreign)
        (void)store_node_unlock(ps->node);
    /* Credits accepted while their account was locked: apply those now free. */
    store_apply_all_credits();
    bool was_first = !ps->foreign && !first_pass_done;
    pass_free(ps);
    if (was_first) {
        first_pass_done = true;
        ctx_readiness_changed();
    }
    schedule_tick(rerun ? 0 : D->cfg.recovery_interval_ms);
    rerun = false;
}

static void list_cb(const store_rec_list *res, void *arg)
{
    rec_pass *ps = arg;
    if (res->st != ST_OK) {
        log_warn("recovery event=list_failed node=%s error=\"%s\"", ps->node, res->errmsg ? res->errmsg : "");
        pass_finish(ps);
        return;
    }
    uint64_t now = loop_now_ms();
    int skipped_live = 0, skipped_backoff = 0, review = 0, prepared_here = 0;
    for (int i = 0; i < res->n; i++) {
        const store_rec_item *src = &res->items[i];
        bool live = !ps->foreign && owner_of(src->gid) == OWNER_PAYMENT;
        if (src->prepared && !live)
            prepared_here++;
        if (live) {
            skipped_live++;
            continue;
        }
        /* Flagged for review: a person decides about the money. Only the
         * bookkeeping repair of a committed debit's row goes on (it decides
         * nothing). */
        if (src->review && (src->prepared || !src->debited)) {
            review++;
            continue;
        }
        backoff_entry *b = strmap_get(backoffs, src->gid);
        bool due = !b || now >= b->next_ms;
        if (!due && !ps->forced) {
            skipped_backoff++;
            continue;
        }
        rec_item *it = calloc(1, sizeof(*it));
        if (!it)
            break;
        list_init(&it->link);
        it->pass = ps;
        snprintf(it->gid, sizeof(it->gid), "%s", src->gid);
        snprintf(it->payment_id, sizeof(it->payment_id), "%s", src->payment_id);
        it->prepared = src->prepared;
        it->debited = src->debited;
        it->past_deadline = src->past_deadline;
        it->age_ms = src->age_ms;
        it->since_deadline_ms = src->since_deadline_ms;
        it->attempts = src->attempts;
        it->due = due;
        snprintf(it->processor_ref, sizeof(it->processor_ref), "%s", src->processor_ref ? src->processor_ref : "");
        snprintf(it->account, sizeof(it->account), "%s", src->account ? src->account : "");
        snprintf(it->currency, sizeof(it->currency), "%s", src->currency ? src->currency : "");
        it->amount = src->amount;
        it->reference = src->reference ? strdup(src->reference) : NULL;
        it->metadata = src->metadata ? cJSON_Duplicate(src->metadata, true) : NULL;
        if ((src->reference && !it->reference) || (src->metadata && !it->metadata)) {
            item_free(it);
            break;
        }
        list_push_tail(&ps->todo, &it->link);
    }
    if (!ps->foreign)
        orphans = prepared_here;
    log_info("recovery event=pass_start node=%s candidates=%d skipped_live=%d skipped_backoff=%d review=%d "
             "prepared=%d", ps->node, res->n, skipped_live, skipped_backoff, review, prepared_here);
    pass_pump_soon(ps);
}

int rec_run(const char *node, bool foreign, bool forced, void (*cb)(const rec_counts *c, const char *err, void *arg),
            void *arg)
{
    rec_pass *ps = current;
    if (ps && (foreign || ps->foreign || strcmp(ps->node, node) != 0))
        return -1;
    if (!ps) {
        ps = calloc(1, sizeof(*ps));
        if (!ps)
            return -1;
        list_init(&ps->todo);
        list_init(&ps->active);
        list_init(&ps->waiters);
        if (loop_timer_init(&ps->pump, pass_pump, ps) != 0) {
            free(ps);
            return -1;
        }
        snprintf(ps->node, sizeof(ps->node), "%s", node);
        ps->foreign = foreign;
        ps->forced = forced;
        ps->started_ms = loop_now_ms();
        ps->lock_epoch = nodelock_epoch();
        if (store_rec_list_node(node, list_cb, ps) != STORE_QUEUED) {
            pass_free(ps);
            return -1;
        }
        current = ps;
        loop_timer_stop(&tick);
    }
    if (cb) {
        rec_waiter *w = calloc(1, sizeof(*w));
        if (!w)
            return 0;                /* the pass runs; this caller just is not told */
        w->cb = cb;
        w->arg = arg;
        list_push_tail(&ps->waiters, &w->link);
    }
    return 0;
}

/* ---------------------------------------------------------------- timer */

static int retry_ms;                 /* the next retry of a pass that could not start */

static void tick_cb(void *arg)
{
    (void)arg;
    if (D->shutting_down)
        return;
    if (!rec_node_locked()) {
        nodelock_try();
        schedule_tick(D->cfg.recovery_interval_ms);
        return;
    }
    if (!proc_ready()) {             /* e.g. the stored webhook events not loaded yet */
        schedule_tick(100);
        return;
    }
    if (current)
        return;
    if (rec_run(D->cfg.node_id, false, false, NULL, NULL) == 0) {
        retry_ms = 0;
        return;
    }
    /* Not started: recovery's pool is not up (yet: the node lock's session
     * may connect first at start). Try again soon, backing off to the
     * interval, so that readiness does not wait a whole interval. */
    retry_ms = retry_ms ? retry_ms * 2 : 100;
    if (retry_ms > D->cfg.recovery_interval_ms)
        retry_ms = D->cfg.recovery_interval_ms;
    schedule_tick(retry_ms);
}

static void schedule_tick(int ms)
{
    if (!current)
        loop_timer_start(&tick, ms);
}

static void lock_changed(bool locked)
{
    if (locked && current)
        rerun = true;                /* once the pass under the old lock ends */
    else if (locked)
        schedule_tick(0);            /* recover at once */
}

int rec_init(void)
{
    current = NULL;
    retry_ms = 0;
    first_pass_done = false;
    rerun = false;
    orphans = 0;
    backoffs = strmap_new();
    if (!backoffs || loop_timer_init(&tick, tick_cb, NULL) != 0 || nodelock_init() != 0 || dbsafety_init() != 0)
        return -1;
    nodelock_set_cb(lock_changed);
    nodelock_try();
    schedule_tick(D->cfg.recovery_interval_ms);
    return 0;
}

void rec_shutdown(void)
{
    if (current) {
        /* The store and the processor client shut down first and fired every
         * callback, so no item is in the air any more. */
        if (!list_empty(&current->active))
            log_error("recovery event=shutdown_with_items_in_flight running=%d", current->running);
        else
            pass_free(current);
        current = NULL;
    }
    loop_timer_deinit(&tick);
    dbsafety_shutdown();
    nodelock_shutdown();
    strmap_free_all(backoffs);
    backoffs = NULL;
}
