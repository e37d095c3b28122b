/*
 * payment_proc.c - the processor side of the payment state machine (steps 4
 * and 5 of payment.c's lifecycle): create with the gid as idempotency key,
 * poll an unknown or pending outcome, cancel at the deadline, and the
 * decision that phase 2 carries out. An answer that does not prove what
 * happened to the money is never a decline. No create is sent once the
 * deadline has passed (adapters rely on it: proc.h). An adapter that can
 * learn nothing more (PROC_STUCK) hands the payment to manual review.
 */
#include "payment.h"
#include "payment_int.h"
#include "backoff.h"
#include "circuit.h"
#include "ctx.h"
#include "failpoint.h"
#include "log.h"
#include "store.h"

#include <stdio.h>
#include <string.h>

static void start_cancel(payment *p);

static void fill_proc_req(const payment *p, proc_req *pr)
{
    uint64_t deadline = p->started_ms + (uint64_t)D->cfg.payment_deadline_ms;
    *pr = (proc_req){ .gid = p->gid, .payment_id = p->payment_id,
                      .processor_ref = p->processor_ref[0] ? p->processor_ref : NULL, .amount = p->amount,
                      .currency = p->currency, .account = p->account, .reference = p->reference,
                      .metadata = p->metadata, .since_deadline_ms = (int64_t)loop_now_ms() - (int64_t)deadline,
                      .debit_held = true };
}

/* The adapter can learn nothing more by asking: a person decides. The debit
 * stays prepared, flagged for review (durably, before anyone is told). */
static void stuck(payment *p, const proc_result *res)
{
    log_error("payment gid=%s key=%s event=processor_stuck error=\"%s\" alert=review", p->gid, p->key, res->error);
    D->stats.alerts++;
    pm_start_handoff(p, true, res->error[0] ? res->error : "the processor adapter can make no more progress");
}


static void create_cb(const proc_result *res, void *arg);
static void poll_cb(const proc_result *res, void *arg);
static void cancel_cb(const proc_result *res, void *arg);

/* Keep the processor's id for later calls; store it now only when the
 * payment stays open at the processor (a final answer writes it with the
 * outcome, and a success's batched write carries it). */
static void note_ref(payment *p, const proc_result *res)
{
    if (res->id[0] && strcmp(res->id, p->processor_ref) != 0) {
        snprintf(p->processor_ref, sizeof(p->processor_ref), "%s", res->id);
        if (res->outcome == PROC_PAYMENT && res->status == PROC_ST_PENDING)
            store_save_processor_ref(p->payment_id, p->processor_ref);
    }
}

static void decide(payment *p, decision dec, const char *decline_code)
{
    p->dec = dec;
    p->attempts = 0;
    if (decline_code && decline_code[0])
        snprintf(p->decline_code, sizeof(p->decline_code), "%s", decline_code);
    log_debug("payment gid=%s key=%s event=decision action=%s decline_code=%s processor_ref=%s", p->gid, p->key,
              dec == DEC_COMMIT ? "commit" : "rollback", p->decline_code[0] ? p->decline_code : "-",
              p->processor_ref[0] ? p->processor_ref : "-");
    FAILPOINT("after_answer", p->key);
    pm_start_finish(p);
}

/* The processor's payment state decides, or says to keep polling. */
static bool decide_from(payment *p, const proc_result *res)
{
    switch (res->status) {
    case PROC_ST_SUCCEEDED:
        decide(p, DEC_COMMIT, NULL);
        return true;
    case PROC_ST_DECLINED:
    case PROC_ST_CANCELED:
        decide(p, DEC_ROLLBACK, res->decline_code[0] ? res->decline_code
                                : res->status == PROC_ST_CANCELED ? "canceled" : "declined");
        return true;
    default:
        return false;
    }
}

static void failpoint_after_send(payment *p)
{
    FAILPOINT("after_send", p->key);
    (void)p;
}

void pm_start_create(payment *p)
{
    if (!p->create_sent && pm_past_deadline(p)) {
        /* Phase 1 took the whole deadline (a locked account, a slow
         * database): the processor was never asked, and is not asked now
         * (its idempotency window counts from the deadline). */
        log_warn("payment gid=%s key=%s event=deadline_before_create", p->gid, p->key);
        decide(p, DEC_ROLLBACK, "deadline_exceeded");
        return;
    }
    if (pm_past_deadline(p)) {
        /* A retry that comes due after the deadline is never sent: stop
         * the payment instead (cancel, or what the adapter can do). */
        log_info("payment gid=%s key=%s event=create_retry_past_deadline", p->gid, p->key);
        p->attempts = 0;
        start_cancel(p);
        return;
    }
    p->create_sent = true;
    pm_set_state(p, PS_CREATE);
    proc_req pr;
    fill_proc_req(p, &pr);
    if (proc_create(&pr, create_cb, p) != 0) {
        log_error("payment gid=%s key=%s event=create_not_started", p->gid, p->key);
        pm_retry(p, D->cfg.processor_retry_base_ms, 5000, pm_start_create);
        return;
    }
    /* "after the request was sent, before its answer": 100 ms after the send
     * (tests give the test processor more latency than that). */
    if (failpoint_armed("after_send", p->key))
        pm_after(p, 100, failpoint_after_send);
}

static void poll_now(payment *p);

static void create_cb(const proc_result *res, void *arg)
{
    payment *p = arg;
    circuit_account(res);
    note_ref(p, res);
    switch (res->outcome) {
    case PROC_PAYMENT:
        if (!decide_from(p, res))
            pm_start_poll(p, D->cfg.processor_poll_ms);       /* pending */
        return;
    case PROC_INVALID:
        if (p->unknown_seen) {
            /* An earlier attempt may have reached the processor: a 4xx now
             * proves nothing about it. Ask by gid, as for any unknown. */
            log_warn("payment gid=%s key=%s event=invalid_after_unknown http=%ld", p->gid, p->key, res->http_status);
            pm_start_poll(p, D->cfg.processor_poll_ms);
            return;
        }
        decide(p, DEC_ROLLBACK, "invalid_request");
        return;
    case PROC_CONFLICT:
        log_error("payment gid=%s key=%s event=processor_conflict alert=review", p->gid, p->key);
        D->stats.alerts++;
        pm_start_handoff(p, true, "processor answered idempotency_conflict for our gid");
        return;
    case PROC_AUTH:
        log_error("payment gid=%s key=%s event=processor_auth_failed http=%ld alert=credentials", p->gid, p->key,
                  res->http_status);
        D->stats.alerts++;
        pm_start_poll(p, D->cfg.processor_poll_ms);
        return;
    case PROC_RATE_LIMITED:
        /* Refused for now: send it again (same key) when the processor
         * allows. Never proof that nothing was charged, though. */
        p->unknown_seen = true;
        pm_after(p, res->retry_after_ms > 0 ? (res->retry_after_ms < 30000 ? res->retry_after_ms : 30000)
                                            : backoff_ms(1000, p->attempts++, 30000),
                 pm_start_create);
        return;
    default:
        p->unknown_seen = true;
        if (p->attempts < D->cfg.processor_retries && !pm_past_deadline(p)) {
            int ms = backoff_ms(D->cfg.processor_retry_base_ms, p->attempts++, 10000);
            log_info("payment gid=%s key=%s event=create_retry attempt=%d delay_ms=%d error=\"%s\"", p->gid, p->key,
                     p->attempts, ms, res->error);
            pm_after(p, ms, pm_start_create);
        } else {
            log_warn("payment gid=%s key=%s event=in_doubt error=\"%s\"", p->gid, p->key, res->error);
            p->attempts = 0;
            pm_start_poll(p, D->cfg.processor_poll_ms);
        }
        return;
    }
}

void pm_start_poll(payment *p, int delay_ms)
{
    pm_set_state(p, PS_POLL);
    pm_after(p, delay_ms, poll_now);
}

static void poll_now(payment *p)
{
    if (pm_past_deadline(p)) {
        start_cancel(p);
        return;
    }
    proc_req pr;
    fill_proc_req(p, &pr);
    if (proc_get(&pr, poll_cb, p) != 0)
        pm_start_poll(p, backoff_ms(D->cfg.processor_poll_ms, p->attempts++, 30000));
}

static void poll_cb(const proc_result *res, void *arg)
{
    payment *p = arg;
    circuit_account(res);
    note_ref(p, res);
    switch (res->outcome) {
    case PROC_PAYMENT:
        p->attempts = 0;
        if (!decide_from(p, res))
            pm_start_poll(p, D->cfg.processor_poll_ms);
        return;
    case PROC_NOT_FOUND:
        /* The processor never saw a create: send it again (same key) while
         * there is time; past the deadline, cancel (tombstone) instead. */
        p->unknown_seen = true;
        if (pm_past_deadline(p))
            start_cancel(p);
        else
            pm_start_create(p);
        return;
    case PROC_RATE_LIMITED:
        pm_start_poll(p, res->retry_after_ms > 0 ? res->retry_after_ms : D->cfg.processor_poll_ms);
        return;
    case PROC_CONFLICT:             /* a get that replays the create (proc.h) */
    case PROC_STUCK:
        stuck(p, res);
        return;
    default:
        pm_start_poll(p, backoff_ms(D->cfg.processor_poll_ms, p->attempts++, 30000));
        return;
    }
}

static void start_cancel(payment *p)
{
    pm_set_state(p, PS_CANCEL);
    log_info("payment gid=%s key=%s event=cancel reason=deadline", p->gid, p->key);
    proc_req pr;
    fill_proc_req(p, &pr);
    if (proc_cancel(&pr, cancel_cb, p) != 0)
        pm_retry(p, D->cfg.processor_poll_ms, 30000, start_cancel);
}

static void cancel_cb(const proc_result *res, void *arg)
{
    payment *p = arg;
    circuit_account(res);
    note_ref(p, res);
    switch (res->outcome) {
    case PROC_PAYMENT:
        /* Still pending: the cancel was refused for now (a processor that
         * cannot cancel in this status) or is asynchronous (its outcome comes
         * by webhook): ask again, less and less often. */
        if (!decide_from(p, res))
            pm_start_poll(p, backoff_ms(D->cfg.processor_poll_ms, p->attempts++, 30000));
        return;
    case PROC_ALREADY_SUCCEEDED:
        decide(p, DEC_COMMIT, NULL);
        return;
    case PROC_UNSUPPORTED:
        /* No cancel by key: recovery waits out the idempotency window. */
        log_warn("payment gid=%s key=%s event=left_for_recovery reason=cancel_unsupported", p->gid, p->key);
        pm_start_handoff(p, false, "processor cannot cancel by key");
        return;
    case PROC_RATE_LIMITED:
        pm_after(p, res->retry_after_ms > 0 ? res->retry_after_ms : D->cfg.processor_poll_ms, start_cancel);
        return;
    case PROC_STUCK:
        stuck(p, res);
        return;
    default:
        pm_retry(p, D->cfg.processor_poll_ms, 30000, start_cancel);
        return;
    }
}

