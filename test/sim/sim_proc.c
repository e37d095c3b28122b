/*
 * sim_proc.c - the processor adapter (processor/proc.h) on a model of a
 * payment processor with idempotency keys, for the simulation, in one of
 * three profiles: what each adapter's create, get and cancel answer
 * (docs/processors.md).
 *
 *  generic  one charge per key, replays answer the stored state; get by key;
 *           cancel by key leaves a tombstone that a late create can no
 *           longer charge through (or 501: no cancel by key).
 *  stripe   replays answer the FIRST answer (stale), a 500 after execution
 *           is stored and replayed, a replay while the first create is in
 *           the air is 409 key-in-use (unknown); get retrieves by the
 *           processor's id when the daemon knows it, else replays the create
 *           before the deadline, else searches: a charge shows in the search
 *           up to 1 s after it is made, and a search that finds nothing is
 *           conclusive only stripe_search_lag_s + the timeout after the
 *           deadline; cancel by id, refused for a 'processing' charge (and
 *           allowed for one awaiting action); no tombstones.
 *  adyen    replays answer the first answer (stale); no read-back: get and
 *           cancel decide from the webhooks delivered, with the adapter's own
 *           rule (adyen_decide, proc_adyen_api.c), and get replays the create
 *           until Adyen answered "pending" (before the deadline's margin,
 *           with a debit held); AUTHORISATION webhooks go
 *           out when an outcome is known, TECHNICAL_CANCEL ones when a
 *           technical cancel is processed (it cancels a pending or authorised
 *           charge, fails for an unknown reference or a captured charge);
 *           webhooks are late (up to 2 s, redelivered while the daemon is
 *           down) or lost. The daemon's note of its own cancels dies with it.
 *
 * Faults from the seed, in every profile: declines, pending charges that
 * settle later, 5xx before or after taking effect, lost answers, creates
 * that arrive late (up to 2 s after they were sent), 429, a 4xx to a retried
 * create (proof of nothing), 409, unreachable.
 */
#include "sim.h"
#include "ctx.h"
#include "log.h"
#include "loop.h"
#include "proc.h"
#include "proc_adyen.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAXK 512
#define TIMEOUT_US 500000          /* the daemon's processor_timeout_ms in the simulation */
#define INDEX_LAG_MAX_US 1000000   /* stripe: a charge is searchable at most this long after it is made */

typedef struct charge {
    char key[72];
    proc_status status;
    int64_t amount;
    char currency[4];
    char id[24];
    proc_status settle_to;         /* pending: what it becomes */
    proc_status first;             /* stripe, adyen: what the first create answered (replays answer it) */
    bool first_500;                /* stripe: the first create answered 500 after executing (stored) */
    bool cancelable;               /* stripe: a pending charge that can be canceled (awaiting action) */
    int64_t searchable_us;         /* stripe: when it shows in a search */
    int cancels_in_air;            /* adyen: technical cancels received, not yet processed */
} charge;

static sim_profile profile;
static charge charges[MAXK];
static char conflicted[64][72];
static uint64_t conflicted_epoch[64];
static int nconflicted;
static int ncharges;
static sim_psp_faults faults;
static int next_id;

typedef enum { OP_CREATE, OP_GET, OP_CANCEL, OP_LOCAL } op;

typedef struct preq {
    struct preq *prev, *next;
    op o;
    proc_cb cb;
    void *arg;
    uint64_t epoch;
    char key[72];
    char ref[24];
    int64_t amount;
    int64_t since_deadline_ms;
    bool debit_held;
    bool never_debited;
    char currency[4];
    proc_result res;
    bool answered;
    bool adyen_cancel;             /* an Adyen technical cancel was received: note it when answered */
    char cancel_psp[24];
} preq;

static preq *all;
static int in_flight;

/* ---------------------------------------------------------------- charges */

static charge *find(const char *key)
{
    for (int i = 0; i < ncharges; i++)
        if (!strcmp(charges[i].key, key))
            return &charges[i];
    return NULL;
}

static charge *find_id(const char *id)
{
    for (int i = 0; i < ncharges && id && id[0]; i++)
        if (!strcmp(charges[i].id, id))
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
    snprintf(c->id, sizeof(c->id), "%s%06d", profile == SIM_PROFILE_STRIPE ? "pi_" : "psp_", ++next_id);
    c->status = c->first = st;
    c->amount = amount;
    c->searchable_us = sim_now_us() + sim_between(0, INDEX_LAG_MAX_US);
    return c;
}

static void payment_res_as(proc_result *r, const charge *c, proc_status st)
{
    r->outcome = PROC_PAYMENT;
    r->status = st;
    snprintf(r->id, sizeof(r->id), "%s", c->id);
    if (st == PROC_ST_DECLINED)
        snprintf(r->decline_code, sizeof(r->decline_code), "card_declined");
    r->amount = c->amount;
    snprintf(r->currency, sizeof(r->currency), "%s", c->currency);
}

static void payment_res(proc_result *r, const charge *c) { payment_res_as(r, c, c->status); }

static void unknown(proc_result *r, const char *why)
{
    r->outcome = PROC_UNKNOWN;
    snprintf(r->error, sizeof(r->error), "%s", why);
}

/* ---------------------------------------------------------------- adyen webhooks */

typedef struct known_ent {
    char gid[72];
    proc_known k;                  /* what the delivered webhooks said (persisted: survives crashes) */
} known_ent;

static known_ent known[MAXK];
static int nknown;
static int next_mod;               /* pspReferences of technical cancels */

/* Webhooks and technical cancels in the air live in fixed pools, reset
 * per seed (the loop drops a seed's events without running them). */
#define MAXHOOKS (4 * MAXK)

typedef struct hook {
    proc_event ev;
    int tries;
} hook;

static hook hooks[MAXHOOKS];
static int nhooks;

static known_ent *known_of(const char *gid, bool make)
{
    for (int i = 0; i < nknown; i++)
        if (!strcmp(known[i].gid, gid))
            return &known[i];
    if (!make || nknown >= MAXK)
        return NULL;
    known_ent *e = &known[nknown++];
    memset(e, 0, sizeof(*e));
    snprintf(e->gid, sizeof(e->gid), "%s", gid);
    return e;
}

static void hook_cb(void *arg)
{
    hook *h = &hooks[(intptr_t)arg];
    if (!sim_daemon_running()) {
        /* the listener is down: the processor delivers again later */
        if (++h->tries < 50)
            sim_at(1000000, hook_cb, arg, 0);
        return;
    }
    known_ent *e = known_of(h->ev.gid, true);
    if (e)
        adyen_note_event(&e->k, &h->ev);
}

/* A webhook about charge c (Adyen profile): late, sometimes lost. */
static void emit(const charge *c, const char *kind, bool success, const char *cancel_psp)
{
    if (profile != SIM_PROFILE_ADYEN || sim_chance(faults.webhook_lost))
        return;
    if (nhooks >= MAXHOOKS)
        abort();
    intptr_t idx = nhooks++;
    hook *h = &hooks[idx];
    memset(h, 0, sizeof(*h));
    bool cancel = strcmp(kind, "AUTHORISATION") != 0;
    proc_event *ev = &h->ev;
    snprintf(ev->id, sizeof(ev->id), "%s:%s:%s", cancel ? cancel_psp : c->id, kind, success ? "true" : "false");
    snprintf(ev->gid, sizeof(ev->gid), "%s", c->key);
    snprintf(ev->processor_ref, sizeof(ev->processor_ref), "%s", c->id[0] ? c->id : "");
    snprintf(ev->kind, sizeof(ev->kind), "%s", kind);
    ev->success = success;
    ev->cancel = cancel;
    ev->status = cancel ? (success ? PROC_ST_CANCELED : PROC_ST_NONE)
                        : (success ? PROC_ST_SUCCEEDED : PROC_ST_DECLINED);
    sim_at(sim_between(1000, 2000000), hook_cb, (void *)idx, 0);
}

/* ---------------------------------------------------------------- processing */

/* Events carry an index: charges are never removed during a run. */
static void settle_cb(void *arg)
{
    charge *c = &charges[(intptr_t)arg];
    if (c->status == PROC_ST_PENDING) {
        c->status = c->settle_to;
        emit(c, "AUTHORISATION", c->status == PROC_ST_SUCCEEDED, NULL);
    }
}

/* A new charge for key, as the processor decides it. */
static charge *new_charge(const char *key, int64_t amount, const char *currency)
{
    charge *c;
    if (sim_chance(faults.decline)) {
        c = add(key, PROC_ST_DECLINED, amount, currency);
        emit(c, "AUTHORISATION", false, NULL);
        return c;
    }
    if (sim_chance(faults.pending)) {
        c = add(key, PROC_ST_PENDING, amount, currency);
        c->settle_to = sim_chance(0.7) ? PROC_ST_SUCCEEDED : PROC_ST_DECLINED;
        c->cancelable = sim_chance(0.5);
        sim_at(sim_between(10000, 3000000), settle_cb, (void *)(intptr_t)(c - charges), 0);
        return c;
    }
    c = add(key, PROC_ST_SUCCEEDED, amount, currency);
    emit(c, "AUTHORISATION", true, NULL);
    return c;
}

typedef struct late_ev {
    char key[72];
    int64_t amount;
    char currency[4];
    bool landed;
} late_ev;

static late_ev lates[MAXK];
static int nlates;

static void late_cb(void *arg)
{
    late_ev *e = &lates[(intptr_t)arg];
    e->landed = true;
    if (!find(e->key))                 /* generic: a tombstone (cancel) got there first: nothing */
        new_charge(e->key, e->amount, e->currency);
}

static bool late_in_air(const char *key)
{
    for (int i = 0; i < nlates; i++)
        if (!lates[i].landed && !strcmp(lates[i].key, key))
            return true;
    return false;
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

/* A create reaching the processor (also a Stripe replay made by get()).
 * back: when its answer arrives. */
static void do_create(preq *q, int64_t *back)
{
    proc_result *r = &q->res;
    charge *c = find(q->key);
    if (c) {
        if (sim_chance(faults.invalid_retry)) {
            r->outcome = PROC_INVALID;          /* not proof of anything */
            snprintf(r->error, sizeof(r->error), "invalid_request");
            return;
        }
        if (profile == SIM_PROFILE_STRIPE && c->first_500) {
            unknown(r, "http_500 (replayed)");  /* stored after execution began */
            return;
        }
        /* a replay: generic answers the state now; Stripe and Adyen the
         * first answer, stale */
        payment_res_as(r, c, profile == SIM_PROFILE_GENERIC ? c->status : c->first);
        return;
    }
    if (profile != SIM_PROFILE_GENERIC && late_in_air(q->key)) {
        /* the first request with the key is still executing */
        if (profile == SIM_PROFILE_STRIPE) {
            unknown(r, "idempotency_key_in_use");
        } else {
            r->outcome = PROC_INVALID;
            snprintf(r->error, sizeof(r->error), "psp_sim_idempotency_in_progress");
        }
        return;
    }
    if (nlates < MAXK && sim_chance(faults.late)) {
        late_ev *e = &lates[nlates];
        e->landed = false;
        snprintf(e->key, sizeof(e->key), "%s", q->key);
        e->amount = q->amount;
        snprintf(e->currency, sizeof(e->currency), "%s", q->currency);
        sim_at(sim_between(1000, 2000000), late_cb, (void *)(intptr_t)nlates++, 0);
        unknown(r, "timeout");
        *back = TIMEOUT_US;
        return;
    }
    c = new_charge(q->key, q->amount, q->currency);
    if (profile != SIM_PROFILE_ADYEN && sim_chance(faults.conflict)) {
        r->outcome = PROC_CONFLICT;             /* generic 409, Stripe 400 idempotency_error */
        snprintf(r->error, sizeof(r->error), "idempotency_conflict");
        return;
    }
    payment_res(r, c);
}

/* Stripe: a search for the key, then what the adapter makes of it. Returns
 * the charge found, or NULL with r set (not found yet / conclusive). */
static charge *stripe_search(preq *q)
{
    proc_result *r = &q->res;
    charge *c = find(q->key);
    if (c && sim_now_us() >= c->searchable_us)
        return c;
    int64_t need = (int64_t)D->cfg.stripe_search_lag_s * 1000 + TIMEOUT_US / 1000;
    if (q->since_deadline_ms >= need) {
        r->outcome = PROC_NOT_FOUND;
        snprintf(r->error, sizeof(r->error), "no PaymentIntent carries this gid, long after the deadline");
    } else {
        unknown(r, "no PaymentIntent found yet");
    }
    return NULL;
}

static void stripe_get(preq *q, int64_t *back)
{
    proc_result *r = &q->res;
    charge *c = find_id(q->ref);
    if (q->ref[0]) {
        if (c)
            payment_res(r, c);
        else
            unknown(r, "bad_answer: 404 for a known id");
        return;
    }
    if (q->debit_held && q->since_deadline_ms < 0) {
        do_create(q, back);
        if (!(r->outcome == PROC_UNKNOWN && !strncmp(r->error, "http_500", 8)))
            return;
        memset(r, 0, sizeof(*r));               /* a replayed 500: search */
    }
    if ((c = stripe_search(q)) != NULL)
        payment_res(r, c);
}

static void stripe_cancel(preq *q)
{
    proc_result *r = &q->res;
    charge *c = q->ref[0] ? find_id(q->ref) : stripe_search(q);
    if (!c) {
        if (r->outcome == PROC_NOT_FOUND) {
            /* nothing was made of our create, and none is sent any more */
            memset(r, 0, sizeof(*r));
            r->outcome = PROC_PAYMENT;
            r->status = PROC_ST_CANCELED;
            snprintf(r->decline_code, sizeof(r->decline_code), "canceled");
        } else if (q->ref[0]) {
            unknown(r, "bad_answer: 404 for a known id");
        }
        return;
    }
    switch (c->status) {
    case PROC_ST_SUCCEEDED:
        r->outcome = PROC_ALREADY_SUCCEEDED;
        r->status = PROC_ST_SUCCEEDED;
        snprintf(r->id, sizeof(r->id), "%s", c->id);
        return;
    case PROC_ST_PENDING:
        if (!c->cancelable) {
            payment_res(r, c);                  /* processing: cannot be canceled now */
            return;
        }
        /* fall through */
    case PROC_ST_DECLINED:
        c->status = PROC_ST_CANCELED;
        /* fall through */
    default:
        payment_res(r, c);
        return;
    }
}

/* Adyen: the technical cancel's outcome, reported only by webhook. */
typedef struct tcancel {
    char key[72];
    char psp[24];
} tcancel;

static tcancel tcancels[MAXK];
static int ntcancels;

static void tcancel_cb(void *arg)
{
    tcancel *t = &tcancels[(intptr_t)arg];
    charge *c = find(t->key);
    charge none;
    if (c && c->cancels_in_air > 0)
        c->cancels_in_air--;
    bool success = false;
    if (!c) {
        memset(&none, 0, sizeof(none));
        snprintf(none.key, sizeof(none.key), "%s", t->key);
        c = &none;                              /* "original transaction not found" */
    } else if (c->status == PROC_ST_SUCCEEDED && faults.autocapture) {
        success = false;                        /* captured: the charge stands */
    } else {
        success = true;
        if (c->status == PROC_ST_SUCCEEDED || c->status == PROC_ST_PENDING)
            c->status = PROC_ST_CANCELED;
    }
    emit(c, "TECHNICAL_CANCEL", success, t->psp);
}

static void adyen_cancel_received(preq *q)
{
    if (ntcancels >= MAXK)
        abort();
    intptr_t idx = ntcancels++;
    tcancel *t = &tcancels[idx];
    memset(t, 0, sizeof(*t));
    snprintf(t->key, sizeof(t->key), "%s", q->key);
    snprintf(t->psp, sizeof(t->psp), "89%014d", ++next_mod);
    charge *c = find(q->key);
    if (c)
        c->cancels_in_air++;
    snprintf(q->cancel_psp, sizeof(q->cancel_psp), "%s", t->psp);
    q->adyen_cancel = true;
    q->res.outcome = PROC_PAYMENT;
    q->res.status = PROC_ST_PENDING;
    sim_at(sim_between(50000, 1000000), tcancel_cb, (void *)idx, 0);
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
        do_create(q, &back);
        break;
    case OP_GET:
        if (profile == SIM_PROFILE_STRIPE) {
            stripe_get(q, &back);
            break;
        }
        if (profile == SIM_PROFILE_ADYEN) {
            /* get replays the create while nothing of Adyen's was heard */
            do_create(q, &back);
            if (r->outcome == PROC_INVALID)
                unknown(r, "a replayed create refused: proves nothing");
            break;
        }
        if (!c) {
            r->outcome = PROC_NOT_FOUND;
            snprintf(r->error, sizeof(r->error), "not_found");
        } else {
            payment_res(r, c);
        }
        break;
    case OP_CANCEL:
        if (profile == SIM_PROFILE_STRIPE) {
            stripe_cancel(q);
            break;
        }
        if (profile == SIM_PROFILE_ADYEN) {
            adyen_cancel_received(q);
            break;
        }
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
    case OP_LOCAL:
        break;
    }
    /* Faults after the effect: the answer is lost or a 5xx. */
    if (r->outcome == PROC_PAYMENT || r->outcome == PROC_CONFLICT || r->outcome == PROC_ALREADY_SUCCEEDED) {
        bool fresh_create = (q->o == OP_CREATE || (q->o == OP_GET && profile == SIM_PROFILE_STRIPE)) && c == NULL &&
                            find(q->key) != NULL;
        if (sim_chance(faults.fail_after)) {
            if (profile == SIM_PROFILE_STRIPE && fresh_create)
                find(q->key)->first_500 = true;     /* Stripe stores it: every replay answers it */
            memset(r, 0, sizeof(*r));
            unknown(r, "http_500");
            q->adyen_cancel = false;
        } else if (sim_chance(faults.drop_after)) {
            memset(r, 0, sizeof(*r));
            unknown(r, "timeout");
            q->adyen_cancel = false;
            back = TIMEOUT_US;
        }
    }
    sim_at(back, answer, q, 0);
}

static const char *const op_names[] = { "create", "get", "cancel", "local" };

static void deliver(preq *q)
{
    q->answered = true;
    log_debug("sim-processor profile=%s op=%s gid=%s outcome=%s status=%s id=%s error=\"%s\" truth=%s",
              sim_profile_name(profile), op_names[q->o], q->key, proc_outcome_name(q->res.outcome),
              proc_status_name(q->res.status), q->res.id[0] ? q->res.id : "-", q->res.error,
              find(q->key) ? proc_status_name(find(q->key)->status) : "none");
    if (q->res.outcome == PROC_CONFLICT && nconflicted < 64) {
        conflicted_epoch[nconflicted] = sim_epoch;
        snprintf(conflicted[nconflicted++], 72, "%s", q->key);   /* the daemon saw a 409 */
    }
    if (profile == SIM_PROFILE_ADYEN && (q->o == OP_CREATE || q->o == OP_GET) && q->res.outcome == PROC_PAYMENT &&
        q->res.status == PROC_ST_PENDING) {
        known_ent *e = known_of(q->key, true);      /* the adapter's memory: no more replays */
        if (e)
            e->k.pending_answer = true;
    }
    if (q->adyen_cancel) {
        /* the adapter notes its cancel, then answers what the webhooks say */
        known_ent *e = known_of(q->key, true);
        if (e) {
            snprintf(e->k.cancel_psp, sizeof(e->k.cancel_psp), "%s", q->cancel_psp);
            e->k.cancel_sent_ms = loop_now_ms();
            proc_result now;
            adyen_decide(&e->k, q->since_deadline_ms, loop_now_ms(), (int64_t)D->cfg.adyen_webhook_timeout_s * 1000,
                         q->never_debited, &now);
            now.local = false;
            if (now.outcome == PROC_PAYMENT && now.status == PROC_ST_SUCCEEDED)
                now.outcome = PROC_ALREADY_SUCCEEDED;
            q->res = now;
        }
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

static preq *req_new(op o, const proc_req *req, proc_cb cb, void *arg)
{
    preq *q = calloc(1, sizeof(*q));
    if (!q)
        return NULL;
    q->o = o;
    q->cb = cb;
    q->arg = arg;
    q->epoch = sim_epoch;
    snprintf(q->key, sizeof(q->key), "%s", req->gid);
    snprintf(q->ref, sizeof(q->ref), "%s", req->processor_ref ? req->processor_ref : "");
    q->amount = req->amount;
    q->since_deadline_ms = req->since_deadline_ms;
    q->debit_held = req->debit_held;
    q->never_debited = req->never_debited;
    snprintf(q->currency, sizeof(q->currency), "%s", req->currency ? req->currency : "");
    q->next = all;
    if (all)
        all->prev = q;
    all = q;
    in_flight++;
    return q;
}

static char late_create[80];          /* the first gid created after its stored deadline */

/* The processor's idempotency window is counted from the stored deadline: no
 * create may be sent after it, neither a create nor a get that replays one
 * (Stripe without the intent's id, Adyen: submitted only to replay). */
static void check_create_time(op o, const proc_req *req)
{
    bool creates = o == OP_CREATE ||
                   (o == OP_GET && profile == SIM_PROFILE_ADYEN) ||
                   (o == OP_GET && profile == SIM_PROFILE_STRIPE && !req->processor_ref && req->debit_held &&
                    req->since_deadline_ms < 0);
    int64_t deadline = creates ? sim_db_deadline_us(req->gid) : 0;
    if (deadline && sim_now_us() > deadline && !late_create[0])
        snprintf(late_create, sizeof(late_create), "%s", req->gid);
}

static int submit(op o, const proc_req *req, proc_cb cb, void *arg)
{
    check_create_time(o, req);
    preq *q = req_new(o, req, cb, arg);
    if (!q)
        return -1;
    sim_at(sim_between(100, 20000), process, q, 0);
    return 0;
}

/* Adyen: get and cancel answer from the webhooks delivered, without a
 * request (a cancel goes out only when nothing decides and none of ours is
 * under way). */
static int adyen_local(op o, const proc_req *req, proc_cb cb, void *arg)
{
    known_ent *e = known_of(req->gid, false);
    proc_result now;
    adyen_decide(e ? &e->k : NULL, req->since_deadline_ms, loop_now_ms(),
                 (int64_t)D->cfg.adyen_webhook_timeout_s * 1000, req->never_debited, &now);
    if (o == OP_CANCEL && now.outcome == PROC_PAYMENT && now.status == PROC_ST_PENDING &&
        !(e && e->k.cancel_sent_ms))
        return submit(OP_CANCEL, req, cb, arg);
    if (o == OP_GET && now.outcome == PROC_PAYMENT && now.status == PROC_ST_PENDING && !(e && e->k.pending_answer) &&
        req->debit_held && req->since_deadline_ms < -ADYEN_AUTH_MARGIN_MS)
        return submit(OP_GET, req, cb, arg);
    if (o == OP_CANCEL && now.outcome == PROC_PAYMENT && now.status == PROC_ST_SUCCEEDED)
        now.outcome = PROC_ALREADY_SUCCEEDED;
    preq *q = req_new(OP_LOCAL, req, cb, arg);
    if (!q)
        return -1;
    q->res = now;
    sim_at(sim_between(1, 100), answer, q, 0);
    return 0;
}

static int m_create(const proc_req *req, proc_cb cb, void *arg) { return submit(OP_CREATE, req, cb, arg); }
const char *sim_psp_late_create(void) { return late_create[0] ? late_create : NULL; }
static int m_get(const proc_req *req, proc_cb cb, void *arg)
{
    return profile == SIM_PROFILE_ADYEN ? adyen_local(OP_GET, req, cb, arg) : submit(OP_GET, req, cb, arg);
}
static int m_cancel(const proc_req *req, proc_cb cb, void *arg)
{
    return profile == SIM_PROFILE_ADYEN ? adyen_local(OP_CANCEL, req, cb, arg) : submit(OP_CANCEL, req, cb, arg);
}
static int m_in_flight(void) { return in_flight; }
static void m_shutdown(void) {}

static const proc_caps model_caps[] = {
    [SIM_PROFILE_GENERIC] = { .get = PROC_GET_BY_KEY, .cancel = PROC_CANCEL_BY_KEY, .key_max = 255 },
    [SIM_PROFILE_STRIPE] = { .get = PROC_GET_BY_ID | PROC_GET_BY_REPLAY | PROC_GET_BY_SEARCH,
                             .cancel = PROC_CANCEL_BY_ID, .key_max = 255 },
    [SIM_PROFILE_ADYEN] = { .get = PROC_GET_BY_WEBHOOK, .cancel = PROC_CANCEL_BY_REFERENCE_ASYNC, .key_max = 64,
                            .webhooks = true },
};
static proc_adapter model = { .name = "simulation", .create = m_create, .get = m_get, .cancel = m_cancel,
                              .in_flight = m_in_flight, .shutdown = m_shutdown };

void sim_psp_install(void)
{
    model.caps = &model_caps[profile];
    proc_use(&model);
}
int sim_psp_in_flight(void) { return in_flight; }
void sim_psp_set_faults(const sim_psp_faults *f) { faults = *f; }
void sim_psp_set_profile(sim_profile p) { profile = p; }
sim_profile sim_psp_profile(void) { return profile; }

const char *sim_profile_name(sim_profile p)
{
    return p == SIM_PROFILE_STRIPE ? "stripe" : p == SIM_PROFILE_ADYEN ? "adyen" : "generic";
}

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
    /* The Adyen adapter's notes of its own cancels and answers live in its memory. */
    for (int i = 0; i < nknown; i++) {
        known[i].k.cancel_sent_ms = 0;
        known[i].k.cancel_psp[0] = '\0';
        known[i].k.pending_answer = false;
    }
}

void sim_psp_reset(void)
{
    late_create[0] = '\0';
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
    nknown = 0;
    next_mod = 0;
    nhooks = 0;
    ntcancels = 0;
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
    /* An Adyen authorisation with a technical cancel under way is not final:
     * the operator's record shows the cancel pending. */
    if (c && c->cancels_in_air > 0 && (c->status == PROC_ST_SUCCEEDED || c->status == PROC_ST_PENDING))
        return "pending";
    return c ? proc_status_name(c->status) : NULL;
}

uint64_t sim_psp_conflicted(const char *gid)
{
    for (int i = 0; i < nconflicted; i++)
        if (!strcmp(conflicted[i], gid))
            return conflicted_epoch[i];
    return 0;
}
