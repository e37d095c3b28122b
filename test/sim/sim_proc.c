/*
 * sim_proc.c - the processor adapter (processor/proc.h) on a model of a
 * payment processor with idempotency keys, for the simulation: one charge per
 * key, replays answer the stored state, cancel by key leaves a tombstone that
 * a late create can no longer charge through. Faults from the seed: declines,
 * pending charges that settle later, 5xx before or after taking effect, lost
 * answers, creates that arrive late, 429, a 4xx to a retried create (proof of
 * nothing), 409, no cancel by key (501), unreachable.
 */
#include "sim.h"
#include "proc.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAXK 512
#define TIMEOUT_US 500000          /* the daemon's processor_timeout_ms in the simulation */

typedef struct charge {
    char key[72];
    proc_status status;
    int64_t amount;
    char currency[4];
    char id[24];
    proc_status settle_to;         /* pending: what it becomes */
} charge;

static charge charges[MAXK];
static char conflicted[64][72];
static uint64_t conflicted_epoch[64];
static int nconflicted;
static int ncharges;
static sim_psp_faults faults;
static int next_id;

typedef enum { OP_CREATE, OP_GET, OP_CANCEL } op;

typedef struct preq {
    struct preq *prev, *next;
    op o;
    proc_cb cb;
    void *arg;
    uint64_t epoch;
    char key[72];
    int64_t amount;
    char currency[4];
    proc_result res;
    bool answered;
} preq;

static preq *all;
static int in_flight;

static charge *find(const char *key)
{
    for (int i = 0; i < ncharges; i++)
        if (!strcmp(charges[i].key, key))
            return &charges[i];
    return NULL;
}

static charge *add(const char *key, proc_status st, int64_t amount, const char *currency)
{
    if (ncharges >= MAXK)
        abort();
    charge *c = &charges[ncharges++];
    memset(c, 0, sizeof(*c));
    snprintf(c->key, sizeof(c->key), "%s", key);
    snprintf(c->currency, sizeof(c->currency), "%s", currency);
    snprintf(c->id, sizeof(c->id), "psp_%06d", ++next_id);
    c->status = st;
    c->amount = amount;
    return c;
}

static void payment_res(proc_result *r, const charge *c)
{
    r->outcome = PROC_PAYMENT;
    r->status = c->status;
    snprintf(r->id, sizeof(r->id), "%s", c->id);
    if (c->status == PROC_ST_DECLINED)
        snprintf(r->decline_code, sizeof(r->decline_code), "card_declined");
    r->amount = c->amount;
    snprintf(r->currency, sizeof(r->currency), "%s", c->currency);
}

static void unknown(proc_result *r, const char *why)
{
    r->outcome = PROC_UNKNOWN;
    snprintf(r->error, sizeof(r->error), "%s", why);
}

/* Events carry an index: charges are never removed during a run. */
static void settle_cb(void *arg)
{
    charge *c = &charges[(intptr_t)arg];
    if (c->status == PROC_ST_PENDING)
        c->status = c->settle_to;
}

/* A new charge for key, as the processor decides it. */
static charge *new_charge(const char *key, int64_t amount, const char *currency)
{
    if (sim_chance(faults.decline))
        return add(key, PROC_ST_DECLINED, amount, currency);
    if (sim_chance(faults.pending)) {
        charge *c = add(key, PROC_ST_PENDING, amount, currency);
        c->settle_to = sim_chance(0.7) ? PROC_ST_SUCCEEDED : PROC_ST_DECLINED;
        sim_at(sim_between(10000, 3000000), settle_cb, (void *)(intptr_t)(c - charges), 0);
        return c;
    }
    return add(key, PROC_ST_SUCCEEDED, amount, currency);
}

typedef struct late_ev {
    char key[72];
    int64_t amount;
    char currency[4];
} late_ev;

static late_ev lates[MAXK];
static int nlates;

static void late_cb(void *arg)
{
    late_ev *e = &lates[(intptr_t)arg];
    if (!find(e->key))                 /* a tombstone (cancel) got there first: nothing */
        new_charge(e->key, e->amount, e->currency);
}

static void answer(void *arg);

static void unlink_req(preq *q)
{
    if (q->prev)
        q->prev->next = q->next;
    else
        all = q->next;
    if (q->next)
        q->next->prev = q->prev;
    in_flight--;
}

/* The request reaches the processor: effects and the answer it will give. */
static void process(void *arg)
{
    preq *q = arg;
    proc_result *r = &q->res;
    int64_t back = sim_between(200, 20000);
    if (faults.down) {
        unknown(r, "connect refused");
        sim_at(back, answer, q, 0);
        return;
    }
    if (sim_chance(faults.rate_limited)) {
        r->outcome = PROC_RATE_LIMITED;
        r->retry_after_ms = (int)sim_between(0, 2) * 100;
        snprintf(r->error, sizeof(r->error), "rate_limited");
        sim_at(back, answer, q, 0);
        return;
    }
    if (sim_chance(faults.fail_before)) {
        unknown(r, "http_503");
        sim_at(back, answer, q, 0);
        return;
    }
    charge *c = find(q->key);
    switch (q->o) {
    case OP_CREATE:
        if (c) {
            if (sim_chance(faults.invalid_retry)) {
                r->outcome = PROC_INVALID;      /* not proof of anything */
                snprintf(r->error, sizeof(r->error), "invalid_request");
                break;
            }
            payment_res(r, c);                  /* a replay: the stored state */
            break;
        }
        if (nlates < MAXK && sim_chance(faults.late)) {
            late_ev *e = &lates[nlates];
            snprintf(e->key, sizeof(e->key), "%s", q->key);
            e->amount = q->amount;
            snprintf(e->currency, sizeof(e->currency), "%s", q->currency);
            sim_at(sim_between(1000, 2000000), late_cb, (void *)(intptr_t)nlates++, 0);
            unknown(r, "timeout");
            back = TIMEOUT_US;
            break;
        }
        c = new_charge(q->key, q->amount, q->currency);
        if (sim_chance(faults.conflict)) {
            r->outcome = PROC_CONFLICT;
            snprintf(r->error, sizeof(r->error), "idempotency_conflict");
            break;
        }
        payment_res(r, c);
        break;
    case OP_GET:
        if (!c) {
            r->outcome = PROC_NOT_FOUND;
            snprintf(r->error, sizeof(r->error), "not_found");
        } else {
            payment_res(r, c);
        }
        break;
    case OP_CANCEL:
        if (faults.no_cancel) {
            r->outcome = PROC_UNSUPPORTED;
            snprintf(r->error, sizeof(r->error), "not_implemented");
            break;
        }
        if (!c) {
            c = add(q->key, PROC_ST_CANCELED, 0, "");   /* a tombstone */
        } else if (c->status == PROC_ST_PENDING) {
            c->status = PROC_ST_CANCELED;
        } else if (c->status == PROC_ST_SUCCEEDED) {
            r->outcome = PROC_ALREADY_SUCCEEDED;
            r->status = PROC_ST_SUCCEEDED;
            snprintf(r->id, sizeof(r->id), "%s", c->id);
            break;
        }
        payment_res(r, c);
        break;
    }
    /* Faults after the effect: the answer is lost or a 5xx. */
    if (r->outcome == PROC_PAYMENT || r->outcome == PROC_CONFLICT || r->outcome == PROC_ALREADY_SUCCEEDED) {
        if (sim_chance(faults.fail_after)) {
            memset(r, 0, sizeof(*r));
            unknown(r, "http_500");
        } else if (sim_chance(faults.drop_after)) {
            memset(r, 0, sizeof(*r));
            unknown(r, "timeout");
            back = TIMEOUT_US;
        }
    }
    sim_at(back, answer, q, 0);
}

static void deliver(preq *q)
{
    q->answered = true;
    if (q->res.outcome == PROC_CONFLICT && nconflicted < 64) {
        conflicted_epoch[nconflicted] = sim_epoch;
        snprintf(conflicted[nconflicted++], 72, "%s", q->key);   /* the daemon saw a 409 */
    }
    q->cb(&q->res, q->arg);
}

static void answer(void *arg)
{
    preq *q = arg;
    if (!q->answered && q->epoch == sim_epoch)
        deliver(q);
    unlink_req(q);
    free(q);
}

static int submit(op o, const proc_req *req, proc_cb cb, void *arg)
{
    preq *q = calloc(1, sizeof(*q));
    if (!q)
        return -1;
    q->o = o;
    q->cb = cb;
    q->arg = arg;
    q->epoch = sim_epoch;
    snprintf(q->key, sizeof(q->key), "%s", req->gid);
    q->amount = req->amount;
    snprintf(q->currency, sizeof(q->currency), "%s", req->currency ? req->currency : "");
    q->next = all;
    if (all)
        all->prev = q;
    all = q;
    in_flight++;
    sim_at(sim_between(100, 20000), process, q, 0);
    return 0;
}

static int m_create(const proc_req *req, proc_cb cb, void *arg) { return submit(OP_CREATE, req, cb, arg); }
static int m_get(const proc_req *req, proc_cb cb, void *arg) { return submit(OP_GET, req, cb, arg); }
static int m_cancel(const proc_req *req, proc_cb cb, void *arg) { return submit(OP_CANCEL, req, cb, arg); }
static int m_in_flight(void) { return in_flight; }
static void m_shutdown(void) {}

static const proc_caps model_caps = { .get = PROC_GET_BY_KEY, .cancel = PROC_CANCEL_BY_KEY, .key_max = 255 };
static const proc_adapter model = { .name = "simulation", .create = m_create, .get = m_get, .cancel = m_cancel,
                                    .in_flight = m_in_flight, .shutdown = m_shutdown, .caps = &model_caps };

void sim_psp_install(void) { proc_use(&model); }
int sim_psp_in_flight(void) { return in_flight; }
void sim_psp_set_faults(const sim_psp_faults *f) { faults = *f; }

void sim_psp_daemon_died(void)
{
    /* Like the real client's shutdown: every request of the dying daemon is
     * answered "unknown" now (it may still take effect at the processor). */
    for (preq *q = all; q; q = q->next) {
        if (q->answered || q->epoch != sim_epoch)
            continue;
        proc_result r = { .outcome = PROC_UNKNOWN };
        snprintf(r.error, sizeof(r.error), "shutdown");
        q->answered = true;
        q->cb(&r, q->arg);
    }
}

void sim_psp_reset(void)
{
    while (all) {
        preq *q = all;
        all = q->next;
        free(q);
    }
    in_flight = 0;
    ncharges = 0;
    nlates = 0;
    nconflicted = 0;
    next_id = 0;
    memset(&faults, 0, sizeof(faults));
}

int sim_psp_payments(sim_charge_view *out, int max)
{
    int n = 0;
    for (int i = 0; i < ncharges && n < max; i++)
        out[n++] = (sim_charge_view){ .key = charges[i].key, .status = proc_status_name(charges[i].status),
                                      .amount = charges[i].amount };
    return n;
}

const char *sim_psp_status(const char *gid)
{
    const charge *c = find(gid);
    return c ? proc_status_name(c->status) : NULL;
}

uint64_t sim_psp_conflicted(const char *gid)
{
    for (int i = 0; i < nconflicted; i++)
        if (!strcmp(conflicted[i], gid))
            return conflicted_epoch[i];
    return 0;
}
