/*
 * sim_db.c - the store (db/store.h) on a model of PostgreSQL, for the
 * simulation. It keeps the rules the daemon relies on:
 *
 *  - rows, the ledger, credits, recovery_state, prepared transactions;
 *  - a prepared debit holds its account row: another debit of that account
 *    waits lock_timeout and fails; applying credits finds it locked;
 *  - durability: the state is two copies, "now" and "flushed". An
 *    asynchronous commit changes "now" only; PREPARE, COMMIT/ROLLBACK
 *    PREPARED and every synchronous commit flush all of it (WAL order), and
 *    so does a background flush every 200 ms. A crash of PostgreSQL goes
 *    back to "flushed": asynchronous commits since are lost, prepared
 *    transactions survive;
 *  - connections break: before a call runs (nothing happens), after it ran
 *    (its answer is lost), or while it still runs and goes on running
 *    later ("zombie") unless its session is fenced (store_get_facts with
 *    the token terminates it first: it either completes right then or not
 *    at all); phase 1 may break between the intent's commit and the debit.
 *
 * Latencies and fates come from the seed. Callbacks of a daemon that died
 * are never delivered; its calls may still run.
 */
#include "sim.h"
#include "store.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAXA 16
#define MAXP 256
#define MAXL 512
#define MAXC 128
#define MAXR 256
#define MAXX 256

typedef struct prow {
    char payment_id[37], key[48], gid[72], account[24], currency[4], node[16];
    char status[24], decline_code[48], processor_ref[48];
    int64_t amount, created_ms, updated_ms, deadline_us, created_us;
} prow;

typedef struct acct {
    char id[24], currency[4];
    int64_t balance;                 /* with prepared debits already taken off */
} acct;

typedef struct lent {
    char payment_id[37], credit_id[37], account[24];
    int64_t amount;
} lent;

typedef struct cred {
    char credit_id[37], key[48], account[24], currency[4];
    int64_t amount;
    bool applied;
} cred;

typedef struct rst {
    char gid[72], payment_id[37], last_error[96];
    int attempts;
    bool review;
} rst;

typedef struct xact {
    char gid[72], payment_id[37], account[24];
    int64_t amount, prepared_us;
} xact;

typedef struct dbstate {
    int na, np, nl, nc, nr, nx;
    acct a[MAXA];
    prow p[MAXP];
    lent l[MAXL];
    cred c[MAXC];
    rst r[MAXR];
    xact x[MAXX];
    int64_t audits;
} dbstate;

static dbstate cur, flushed, standby;
static bool have_standby;
static bool dirty;
static bool up = true;
static int64_t up_at_us;             /* when a crashed server is back */
static sim_db_faults faults;
static void (*state_cb)(bool);
static void (*lock_cb)(bool);
static bool closing;
static bool daemon_up;               /* store_init'd, not shut down */
static int in_flight;
static uint64_t next_session = 1;
static uint64_t db_gen;              /* bumped by a crash: calls of an older server are void */

#define FLUSH_US 200000
#define LOCK_TIMEOUT_US 200000

/* ---------------------------------------------------------------- state helpers */

/* Gids whose prepared transaction was settled while not flagged for review. */
static char settled_unflagged[512][72];
static int nsettled_unflagged;

bool sim_db_settled_unflagged(const char *gid)
{
    for (int i = 0; i < nsettled_unflagged; i++)
        if (!strcmp(settled_unflagged[i], gid))
            return true;
    return false;
}

bool sim_db_flagged(const char *gid)
{
    for (int i = 0; i < cur.nr; i++)
        if (!strcmp(cur.r[i].gid, gid))
            return cur.r[i].review;
    return false;
}

static void flush(void)
{
    if (dirty) {
        flushed = cur;
        dirty = false;
    }
}

static void wal_writer(void *arg)
{
    (void)arg;
    flush();
    sim_at(FLUSH_US, wal_writer, NULL, 0);
}

static acct *acct_of(const char *id)
{
    for (int i = 0; i < cur.na; i++)
        if (!strcmp(cur.a[i].id, id))
            return &cur.a[i];
    return NULL;
}

static prow *row_by_id(const char *id)
{
    for (int i = 0; i < cur.np; i++)
        if (!strcmp(cur.p[i].payment_id, id))
            return &cur.p[i];
    return NULL;
}

static prow *row_by_key(const char *key)
{
    for (int i = 0; i < cur.np; i++)
        if (!strcmp(cur.p[i].key, key))
            return &cur.p[i];
    return NULL;
}

static prow *row_by_gid(const char *gid)
{
    for (int i = 0; i < cur.np; i++)
        if (!strcmp(cur.p[i].gid, gid))
            return &cur.p[i];
    return NULL;
}

static xact *xact_of(const char *gid)
{
    for (int i = 0; i < cur.nx; i++)
        if (!strcmp(cur.x[i].gid, gid))
            return &cur.x[i];
    return NULL;
}

static xact *xact_on(const char *account)
{
    for (int i = 0; i < cur.nx; i++)
        if (!strcmp(cur.x[i].account, account))
            return &cur.x[i];
    return NULL;
}

static bool debited(const char *payment_id)
{
    for (int i = 0; i < cur.nl; i++)
        if (!strcmp(cur.l[i].payment_id, payment_id))
            return true;
    return false;
}

static rst *rst_of(const char *gid)
{
    for (int i = 0; i < cur.nr; i++)
        if (!strcmp(cur.r[i].gid, gid))
            return &cur.r[i];
    return NULL;
}

static const char *derived(const prow *r)
{
    if (debited(r->payment_id))
        return "succeeded";
    if (!strcmp(r->status, "succeeded"))
        return "pending";
    return r->status;
}

static void cpy(char *dst, size_t n, const char *src)
{
    size_t len = strlen(src ? src : "");
    if (len >= n) {
        fprintf(stderr, "sim_db: value too long for the model: %s\n", src);
        abort();
    }
    memmove(dst, src ? src : "", len + 1);
}
#define CPY(dst, src) cpy(dst, sizeof(dst), src)

static void apply_credits_of(const char *account, int *n)
{
    acct *a = acct_of(account);
    for (int i = 0; i < cur.nc && a; i++) {
        cred *c = &cur.c[i];
        if (!c->applied && !strcmp(c->account, account)) {
            c->applied = true;
            a->balance += c->amount;
            lent *e = &cur.l[cur.nl++];
            memset(e, 0, sizeof(*e));
            CPY(e->credit_id, c->credit_id);
            CPY(e->account, account);
            e->amount = c->amount;
            (*n)++;
        }
    }
    dirty = true;
}

/* ---------------------------------------------------------------- calls */

typedef enum {
    K_PHASE1, K_FACTS, K_FINISH, K_SETTLE, K_RECORD, K_FLAG, K_NOTE, K_FORGET, K_REF, K_BY_KEY, K_BY_ID,
    K_BALANCE, K_OPEN, K_CREDIT, K_CREDIT_BY_KEY, K_APPLY, K_APPLY_ALL, K_MAXPREP, K_COUNT, K_LOCK, K_UNLOCK,
    K_ALIVE, K_LIST, K_MARK, K_PLIST, K_RBEGIN, K_REND
} kind;

typedef enum { F_OK = 0, F_LOST_BEFORE, F_LOST_AFTER, F_ZOMBIE, F_PARTIAL } fate;

typedef void (*store_any_fn_sim)(void);

typedef struct call {
    struct call *prev, *next;         /* every call alive (sim_db_reset frees what is left) */
    kind k;
    store_any_fn_sim cb;
    void *arg;
    uint64_t epoch, gen, session;
    fate fate;
    bool done;                        /* ran (effects applied) */
    bool killed;                      /* fenced (or the server died) before it ran */
    bool exec_pending;                /* its run is still scheduled */
    bool shutdown;                    /* answered "shutdown" (the daemon died) */
    bool answered;                    /* its answer was delivered (or dropped) */
    bool reply_scheduled;
    /* parameters */
    char s1[72], s2[72], s3[72], s4[72];
    int64_t n1, n2;
    bool b1;
    store_pay pay;
    char pay_strs[7][72];
    /* results (filled when it runs) */
    int r_i;
    int64_t r_l;
    bool r_b, r_b2;
    char r_s[48];
    p1_outcome p1;
    p2_outcome p2;
    bool intent_written;
} call;

static void run_call(call *c);
static void reply_call(call *c);

static call *all_calls;

static call *new_call(kind k, void (*cb)(void), void *arg)
{
    call *c = calloc(1, sizeof(*c));
    if (!c)
        abort();
    c->next = all_calls;
    if (all_calls)
        all_calls->prev = c;
    all_calls = c;
    c->k = k;
    c->cb = cb;
    c->arg = arg;
    c->epoch = sim_epoch;
    c->gen = db_gen;
    c->session = next_session++;
    return c;
}

static call *zombies[256];
static int nzombies;

static void unlink_call(call *c)
{
    if (c->prev)
        c->prev->next = c->next;
    else
        all_calls = c->next;
    if (c->next)
        c->next->prev = c->prev;
}

static void free_call(call *c)
{
    unlink_call(c);
    for (int i = 0; i < nzombies; i++)
        if (zombies[i] == c) {
            zombies[i] = zombies[--nzombies];
            break;
        }
    in_flight--;
    free(c);
}

static void maybe_free(call *c)
{
    if (c->answered && !c->exec_pending)
        free_call(c);
}

static void exec_cb(void *arg)
{
    call *c = arg;
    c->exec_pending = false;
    if (c->gen != db_gen)
        c->killed = true;              /* the server crashed before it ran */
    if (!c->killed && !c->done) {
        run_call(c);
        c->done = true;
    }
    if (!c->reply_scheduled) {
        c->reply_scheduled = true;
        sim_at(sim_between(20, 400), (sim_fn)reply_call, c, 0);
    } else {
        maybe_free(c);
    }
}

/* Send: the call runs after a latency, then its answer comes back. */
static int submit(call *c)
{
    if (closing || !daemon_up) {
        unlink_call(c);
        free(c);
        return STORE_OVERLOADED;
    }
    if (!up) {
        unlink_call(c);
        free(c);
        return STORE_UNAVAILABLE;
    }
    in_flight++;
    bool lossy = c->k != K_LOCK && c->k != K_UNLOCK;
    if (lossy && sim_chance(faults.lost_before))
        c->fate = F_LOST_BEFORE;
    else if (lossy && sim_chance(faults.lost_after))
        c->fate = F_LOST_AFTER;
    else if (lossy && nzombies < 256 && sim_chance(faults.zombie))
        c->fate = F_ZOMBIE;
    else if (c->k == K_PHASE1 && c->b1 && sim_chance(faults.phase1_partial))
        c->fate = F_PARTIAL;
    if (c->fate == F_LOST_BEFORE) {
        c->killed = true;
        c->reply_scheduled = true;
        sim_at(sim_between(20, 300), (sim_fn)reply_call, c, 0);
        return STORE_QUEUED;
    }
    c->exec_pending = true;
    if (c->fate == F_ZOMBIE) {
        /* The daemon hears "connection lost" first; the server still runs it later. */
        zombies[nzombies++] = c;
        c->reply_scheduled = true;
        sim_at(sim_between(50, 500), (sim_fn)reply_call, c, 0);
        sim_at(sim_between(300, 400000), exec_cb, c, 0);
        return STORE_QUEUED;
    }
    sim_at(sim_between(20, 500), exec_cb, c, 0);
    return STORE_QUEUED;
}

/* ---------------------------------------------------------------- the statements */

static void run_phase1(call *c)
{
    const store_pay *p = &c->pay;
    if (c->b1) {                       /* the intent */
        acct *a = acct_of(p->account);
        if (!a) {
            c->p1 = P1_UNKNOWN_ACCOUNT;
            return;
        }
        if (strcmp(a->currency, p->currency)) {
            c->p1 = P1_CURRENCY_MISMATCH;
            return;
        }
        if (row_by_key(p->key)) {
            c->p1 = P1_DUPLICATE_KEY;
            return;
        }
        if (cur.np >= MAXP)
            abort();
        prow *r = &cur.p[cur.np++];
        memset(r, 0, sizeof(*r));
        CPY(r->payment_id, p->payment_id);
        CPY(r->key, p->key);
        CPY(r->gid, p->gid);
        CPY(r->account, p->account);
        CPY(r->currency, p->currency);
        CPY(r->node, p->node);
        CPY(r->status, "pending");
        r->amount = p->amount;
        r->created_ms = r->updated_ms = p->created_ms;
        r->created_us = sim_now_us();
        r->deadline_us = sim_now_us() + (int64_t)p->deadline_ms * 1000;
        dirty = true;                  /* asynchronous commit */
        c->intent_written = true;
        if (c->fate == F_PARTIAL)
            return;                    /* the connection broke before the debit */
    }
    if (!row_by_id(p->payment_id)) {   /* the debit's foreign key */
        c->p1 = c->b1 ? P1_FAILED : P1_RETRY;
        return;
    }
    xact *other = xact_on(p->account);
    if (other) {
        c->p1 = P1_RETRY;              /* lock_timeout on the account row */
        return;
    }
    acct *a = acct_of(p->account);
    if (!a || a->balance < p->amount) {
        c->p1 = P1_NSF;
        return;
    }
    if (xact_of(p->gid)) {
        c->p1 = P1_RETRY;              /* "transaction identifier is already in use" */
        return;
    }
    a->balance -= p->amount;
    xact *x = &cur.x[cur.nx++];
    memset(x, 0, sizeof(*x));
    CPY(x->gid, p->gid);
    CPY(x->payment_id, p->payment_id);
    CPY(x->account, p->account);
    x->amount = p->amount;
    x->prepared_us = sim_now_us();
    dirty = true;
    flush();                           /* PREPARE TRANSACTION */
    c->p1 = P1_PREPARED;
}

static void run_finish(call *c)
{
    xact *x = xact_of(c->s1);
    if (!x) {
        c->p2 = P2_GONE;
        return;
    }
    rst *flag = rst_of(c->s1);
    if ((!flag || !flag->review) && nsettled_unflagged < 512)
        snprintf(settled_unflagged[nsettled_unflagged++], 72, "%s", c->s1);
    if (c->b1) {
        lent *e = &cur.l[cur.nl++];
        memset(e, 0, sizeof(*e));
        CPY(e->payment_id, x->payment_id);
        CPY(e->account, x->account);
        e->amount = -x->amount;
    } else {
        acct *a = acct_of(x->account);
        if (a)
            a->balance += x->amount;
    }
    *x = cur.x[--cur.nx];
    dirty = true;
    flush();
    c->p2 = P2_DONE;
}

/* pc_pay_settle2 */
static void run_settle(call *c)
{
    const store_pay *p = &c->pay;
    prow *r = row_by_id(p->payment_id);
    if (r && !strcmp(r->status, "pending") && !debited(r->payment_id)) {
        CPY(r->status, c->s1);
        CPY(r->decline_code, c->s2);
        if (c->s3[0])
            CPY(r->processor_ref, c->s3);
        if (p->updated_ms)
            r->updated_ms = p->updated_ms;
    } else if (!r) {
        if (!p->account) {
            CPY(c->r_s, "");
            return;
        }
        if (row_by_key(p->key) || row_by_gid(p->gid)) {
            CPY(c->r_s, "conflict");
            return;
        }
        r = &cur.p[cur.np++];
        memset(r, 0, sizeof(*r));
        CPY(r->payment_id, p->payment_id);
        CPY(r->key, p->key);
        CPY(r->gid, p->gid);
        CPY(r->account, p->account);
        CPY(r->currency, p->currency);
        CPY(r->node, p->node);
        CPY(r->status, c->s1);
        CPY(r->decline_code, c->s2);
        CPY(r->processor_ref, c->s3);
        r->amount = p->amount;
        r->created_ms = p->created_ms;
        r->updated_ms = p->updated_ms;
        r->created_us = sim_now_us();
        r->deadline_us = sim_now_us() + (int64_t)p->deadline_ms * 1000;
    }
    dirty = true;
    flush();
    CPY(c->r_s, derived(r));
}

static void upsert_rst(const char *gid, const char *payment_id, int attempts, const char *why, bool review)
{
    rst *s = rst_of(gid);
    if (!s) {
        s = &cur.r[cur.nr++];
        memset(s, 0, sizeof(*s));
        CPY(s->gid, gid);
    }
    if (payment_id && payment_id[0] && !s->payment_id[0])
        CPY(s->payment_id, payment_id);
    if (attempts > s->attempts)
        s->attempts = attempts;
    snprintf(s->last_error, sizeof(s->last_error), "%.95s", why ? why : "");
    s->review = s->review || review;
    dirty = true;
}

static void run_call(call *c)
{
    switch (c->k) {
    case K_PHASE1:
        run_phase1(c);
        break;
    case K_FACTS: {
        /* the fence ran first (see store_get_facts); now the facts */
        prow *r = c->s1[0] ? row_by_id(c->s1) : NULL;
        c->r_b = r != NULL;
        CPY(c->r_s, r ? r->status : "");
        c->r_b2 = xact_of(c->s2) != NULL;
        c->r_i = r && debited(r->payment_id);
        rst *s = rst_of(c->s2);
        c->r_l = s && s->review;
        break;
    }
    case K_FINISH:
        run_finish(c);
        break;
    case K_SETTLE:
        run_settle(c);
        break;
    case K_RECORD: {
        prow *r = row_by_id(c->s1);
        if (r && !strcmp(r->status, "pending")) {
            CPY(r->status, "succeeded");
            if (c->s2[0])
                CPY(r->processor_ref, c->s2);
            r->updated_ms = c->n1;
            dirty = true;          /* asynchronous */
        }
        break;
    }
    case K_FLAG:
        upsert_rst(c->s1, c->s2, 0, c->s3, true);
        flush();
        break;
    case K_NOTE:
        upsert_rst(c->s1, c->s2, (int)c->n1, c->s3, false);
        break;
    case K_FORGET: {
        rst *s = rst_of(c->s1);
        if (s && !s->review) {
            *s = cur.r[--cur.nr];
            dirty = true;
        }
        break;
    }
    case K_REF: {
        prow *r = row_by_id(c->s1);
        if (r) {
            CPY(r->processor_ref, c->s2);
            dirty = true;
        }
        break;
    }
    case K_BY_KEY:
    case K_BY_ID: {
        prow *r = c->k == K_BY_KEY ? row_by_key(c->s1) : row_by_id(c->s1);
        c->r_b = r != NULL;
        if (r)
            c->r_i = (int)(r - cur.p);
        if (r && !strcmp(derived(r), "pending"))
            flush();                   /* the reader's xid: its commit flushes the WAL */
        break;
    }
    case K_BALANCE: {
        acct *a = acct_of(c->s1);
        c->r_b = a != NULL;
        if (a) {
            xact *x = xact_on(a->id);
            c->r_l = a->balance + (x ? x->amount : 0);
            c->n2 = x ? x->amount : 0;
        }
        break;
    }
    case K_OPEN:
        c->r_b = !acct_of(c->s1);
        break;
    case K_CREDIT: {
        acct *a = acct_of(c->s3);
        for (int i = 0; i < cur.nc; i++)
            if (!strcmp(cur.c[i].key, c->s2)) {
                c->r_i = CR_DUPLICATE_KEY;
                return;
            }
        if (!a) {
            c->r_i = CR_UNKNOWN_ACCOUNT;
            return;
        }
        if (strcmp(a->currency, c->s4)) {
            c->r_i = CR_CURRENCY_MISMATCH;
            return;
        }
        cred *cr = &cur.c[cur.nc++];
        memset(cr, 0, sizeof(*cr));
        CPY(cr->credit_id, c->s1);
        CPY(cr->key, c->s2);
        CPY(cr->account, c->s3);
        CPY(cr->currency, c->s4);
        cr->amount = c->n1;
        int n = 0;
        bool apply = c->b1 && !xact_on(c->s3);
        if (apply)
            apply_credits_of(c->s3, &n);
        c->r_i = apply ? CR_APPLIED : CR_ACCEPTED;
        dirty = true;
        flush();
        break;
    }
    case K_CREDIT_BY_KEY:
        c->r_i = -1;
        for (int i = 0; i < cur.nc; i++)
            if (!strcmp(cur.c[i].key, c->s1))
                c->r_i = i;
        break;
    case K_APPLY: {
        int n = 0;
        if (xact_on(c->s1))
            n = -1;
        else
            apply_credits_of(c->s1, &n);
        c->r_i = n;
        flush();
        break;
    }
    case K_APPLY_ALL:
        for (int i = 0; i < cur.na; i++) {
            int n = 0;
            if (!xact_on(cur.a[i].id))
                apply_credits_of(cur.a[i].id, &n);
        }
        flush();
        break;
    case K_MAXPREP:
        c->r_i = 64;
        break;
    case K_COUNT:
        c->r_i = cur.nx;
        break;
    case K_LOCK:
        c->r_b = true;                 /* one node in the model: its lock is free */
        break;
    case K_UNLOCK:
        break;
    case K_ALIVE:
        c->r_b = false;
        break;
    case K_LIST:
    case K_PLIST:
        break;                         /* built at reply time from the state then */
    case K_MARK: {
        prow *r = row_by_id(c->s1);
        if (r && !strcmp(r->status, "pending") && debited(r->payment_id)) {
            CPY(r->status, "succeeded");
            if (c->s2[0])
                CPY(r->processor_ref, c->s2);
            dirty = true;
            flush();
        }
        break;
    }
    case K_RBEGIN:
        cur.audits++;
        c->r_l = cur.audits;
        dirty = true;
        flush();
        break;
    case K_REND: {
        prow *r = row_by_gid(c->s1);
        if (c->b1 && r) {
            if (c->n1 && !strcmp(r->status, "pending") && !debited(r->payment_id)) {
                CPY(r->status, "declined");
                CPY(r->decline_code, "resolved_manually");
            } else if (!c->n1 && !strcmp(r->status, "pending") && debited(r->payment_id)) {
                CPY(r->status, "succeeded");
            }
        }
        if (c->b1) {
            rst *s = rst_of(c->s1);
            if (s)
                s->review = false;
        }
        dirty = true;
        flush();
        break;
    }
    }
}

/* ---------------------------------------------------------------- answers */

static st_status status_of(const call *c)
{
    if (c->shutdown)
        return ST_SHUTDOWN;
    if (!c->done || c->fate != F_OK)
        return ST_LOST;
    return ST_OK;
}

#define CB(type, c) ((type)(void (*)(void))(c)->cb)

static void deliver_answer(call *c);

/* Answer c now but keep it (the caller iterates over the calls). */
static void reply_call_keep(call *c)
{
    c->answered = true;
    deliver_answer(c);
}

static void reply_call(call *c)
{
    c->answered = true;
    if (c->epoch != sim_epoch || !c->cb) {   /* the daemon that asked died, or nobody listens */
        maybe_free(c);
        return;
    }
    deliver_answer(c);
    maybe_free(c);
}

static void deliver_answer(call *c)
{
    st_status st = status_of(c);
    switch (c->k) {
    case K_PHASE1: {
        store_p1 r = { .sqlstate = "", .errmsg = "" };
        if (st == ST_OK) {
            r.outcome = c->p1;
            r.intent_written = c->b1 ? c->intent_written : true;
        } else if (st == ST_SHUTDOWN) {
            r.outcome = P1_SHUTDOWN;
            r.intent_written = !c->b1;
        } else {
            r.outcome = P1_LOST;
            r.intent_written = !c->b1;
            static char fence[32];
            snprintf(fence, sizeof(fence), "s%llu", (unsigned long long)c->session);
            r.fence = fence;
        }
        CB(void (*)(const store_p1 *, void *), c)(&r, c->arg);
        break;
    }
    case K_FACTS: {
        store_facts f = { .st = st, .errmsg = "", .status = "" };
        if (st == ST_OK) {
            f.fenced = c->n2 == 0;
            f.row = c->r_b;
            f.status = c->r_s;
            f.prepared = c->r_b2;
            f.debited = c->r_i != 0;
            f.review = c->r_l != 0;
        }
        CB(void (*)(const store_facts *, void *), c)(&f, c->arg);
        break;
    }
    case K_FINISH: {
        store_p2 r = { .sqlstate = "", .errmsg = "" };
        r.outcome = st == ST_OK ? c->p2 : st == ST_SHUTDOWN ? P2_SHUTDOWN : P2_RETRY;
        CB(void (*)(const store_p2 *, void *), c)(&r, c->arg);
        break;
    }
    case K_SETTLE: {
        store_settled r = { .st = st, .errmsg = "", .status = "" };
        if (st == ST_OK) {
            if (!strcmp(c->r_s, "conflict"))
                r.conflict = true;
            else
                r.status = c->r_s;
        }
        CB(void (*)(const store_settled *, void *), c)(&r, c->arg);
        break;
    }
    case K_RECORD:
        CB(void (*)(bool, void *), c)(st == ST_OK, c->arg);
        break;
    case K_FLAG:
    case K_MARK:
        CB(void (*)(st_status, void *), c)(st, c->arg);
        break;
    case K_NOTE:
    case K_FORGET:
    case K_REF:
    case K_APPLY_ALL:
    case K_UNLOCK:
        break;
    case K_BY_KEY:
    case K_BY_ID: {
        store_lookup r = { .st = st, .errmsg = "" };
        static char created[32], updated[32];
        if (st == ST_OK && c->r_b) {
            /* read it now: the row as it stands when the answer arrives */
            const prow *p = c->k == K_BY_KEY ? row_by_key(c->s1) : row_by_id(c->s1);
            if (p) {
                r.found = true;
                snprintf(created, sizeof(created), "%lld", (long long)p->created_ms);
                snprintf(updated, sizeof(updated), "%lld", (long long)p->updated_ms);
                r.row = (store_payment_row){ .payment_id = p->payment_id, .key = p->key, .gid = p->gid,
                                             .account = p->account, .currency = p->currency,
                                             .status = derived(p),
                                             .processor_ref = p->processor_ref[0] ? p->processor_ref : NULL,
                                             .decline_code = p->decline_code[0] ? p->decline_code : NULL,
                                             .created_at = created, .updated_at = updated, .amount = p->amount };
            }
        }
        CB(void (*)(const store_lookup *, void *), c)(&r, c->arg);
        break;
    }
    case K_BALANCE: {
        store_balance_row b = { .st = st, .errmsg = "" };
        if (st == ST_OK && c->r_b) {
            acct *a = acct_of(c->s1);
            b.found = a != NULL;
            b.currency = a ? a->currency : "";
            b.balance = c->r_l;
            b.held = c->n2;
        }
        CB(void (*)(const store_balance_row *, void *), c)(&b, c->arg);
        break;
    }
    case K_OPEN: {
        store_opened o = { .st = st, .errmsg = "", .created = c->r_b };
        CB(void (*)(const store_opened *, void *), c)(&o, c->arg);
        break;
    }
    case K_CREDIT: {
        store_credit_res r = { .errmsg = "", .created_at = "0" };
        r.outcome = st == ST_OK ? (cr_outcome)c->r_i : st == ST_SHUTDOWN ? CR_SHUTDOWN : CR_LOST;
        CB(void (*)(const store_credit_res *, void *), c)(&r, c->arg);
        break;
    }
    case K_CREDIT_BY_KEY: {
        store_credit_row r = { .st = st, .errmsg = "" };
        if (st == ST_OK && c->r_i >= 0 && c->r_i < cur.nc) {
            const cred *cr = &cur.c[c->r_i];
            r.found = true;
            r.credit_id = cr->credit_id;
            r.account = cr->account;
            r.currency = cr->currency;
            r.status = cr->applied ? "applied" : "accepted";
            r.created_at = "0";
            r.amount = cr->amount;
        }
        CB(void (*)(const store_credit_row *, void *), c)(&r, c->arg);
        break;
    }
    case K_APPLY:
        CB(void (*)(st_status, int, void *), c)(st, c->r_i, c->arg);
        break;
    case K_MAXPREP:
        CB(void (*)(st_status, int, void *), c)(st, c->r_i, c->arg);
        break;
    case K_COUNT:
        CB(void (*)(st_status, int, double, void *), c)(st, c->r_i, 0.0, c->arg);
        break;
    case K_LOCK:
    case K_ALIVE:
        CB(void (*)(st_status, bool, void *), c)(st, c->r_b, c->arg);
        break;
    case K_LIST: {
        store_rec_list l = { .st = st, .errmsg = "" };
        store_rec_item items[MAXX + MAXP];
        int n = 0;
        if (st == ST_OK) {
            char prefix[80];
            snprintf(prefix, sizeof(prefix), "pc:%.40s:", c->s1);
            for (int i = 0; i < cur.nx; i++) {
                const xact *x = &cur.x[i];
                if (strncmp(x->gid, prefix, strlen(prefix)))
                    continue;
                const prow *r = row_by_gid(x->gid);
                const rst *s = rst_of(x->gid);
                items[n++] = (store_rec_item){ .gid = x->gid, .payment_id = r ? r->payment_id : "",
                                               .row_status = r ? r->status : "", .prepared = true,
                                               .review = s && s->review,
                                               .past_deadline = !r || sim_now_us() >= r->deadline_us,
                                               .age_ms = (sim_now_us() - x->prepared_us) / 1000,
                                               .since_deadline_ms = (sim_now_us() - (r ? r->deadline_us
                                                                                   : x->prepared_us)) / 1000,
                                               .attempts = s ? s->attempts : 0,
                                               .processor_ref = r && r->processor_ref[0] ? r->processor_ref : NULL,
                                               .account = r ? r->account : "", .currency = r ? r->currency : "",
                                               .amount = r ? r->amount : 0 };
            }
            for (int i = 0; i < cur.np; i++) {
                const prow *r = &cur.p[i];
                if (strcmp(r->node, c->s1) || strcmp(r->status, "pending") || xact_of(r->gid))
                    continue;
                const rst *s = rst_of(r->gid);
                items[n++] = (store_rec_item){ .gid = r->gid, .payment_id = r->payment_id, .row_status = r->status,
                                               .debited = debited(r->payment_id), .review = s && s->review,
                                               .past_deadline = sim_now_us() >= r->deadline_us,
                                               .age_ms = (sim_now_us() - r->created_us) / 1000,
                                               .since_deadline_ms = (sim_now_us() - r->deadline_us) / 1000,
                                               .attempts = s ? s->attempts : 0,
                                               .processor_ref = r->processor_ref[0] ? r->processor_ref : NULL,
                                               .account = r->account, .currency = r->currency,
                                               .amount = r->amount };
            }
            l.n = n;
            l.items = items;
        }
        CB(void (*)(const store_rec_list *, void *), c)(&l, c->arg);
        break;
    }
    case K_PLIST: {
        store_prepared_list l = { .st = st, .errmsg = "" };
        CB(void (*)(const store_prepared_list *, void *), c)(&l, c->arg);
        break;
    }
    case K_RBEGIN:
        CB(void (*)(st_status, int64_t, void *), c)(st, c->r_l, c->arg);
        break;
    case K_REND:
        CB(void (*)(st_status, void *), c)(st, c->arg);
        break;
    }
}

/* ---------------------------------------------------------------- store.h */

#define FN(cb) ((void (*)(void))(cb))

static void copy_pay(call *c, const store_pay *p)
{
    c->pay = *p;
    const char *src[7] = { p->payment_id, p->gid, p->key, p->account, p->currency, p->reference, p->node };
    const char **dst[7] = { &c->pay.payment_id, &c->pay.gid, &c->pay.key, &c->pay.account, &c->pay.currency,
                            &c->pay.reference, &c->pay.node };
    for (int i = 0; i < 7; i++) {
        if (src[i]) {
            CPY(c->pay_strs[i], src[i]);
            *dst[i] = c->pay_strs[i];
        } else {
            *dst[i] = NULL;
        }
    }
    c->pay.metadata = NULL;
}

static void announce(void *arg);

int store_init(void)
{
    closing = false;
    daemon_up = true;
    if (up)
        sim_at(10, announce, (void *)1, sim_epoch);
    return 0;
}

static void announce(void *arg)
{
    bool on = arg != NULL;
    if (daemon_up && !closing) {
        if (state_cb)
            state_cb(on);
        if (lock_cb)
            lock_cb(on);
    }
}

void store_shutdown(void)
{
    closing = true;
    daemon_up = false;
    state_cb = NULL;
    lock_cb = NULL;
}

bool store_is_up(void) { return up && daemon_up; }
bool store_is_stuck(int *oldest_ms)
{
    if (oldest_ms)
        *oldest_ms = 0;
    return false;
}
void store_set_state_cb(void (*cb)(bool up)) { state_cb = cb; }
void store_set_lock_cb(void (*cb)(bool up)) { lock_cb = cb; }
bool store_lock_session_up(void) { return up && daemon_up; }
void store_flush(void) {}
int store_busy(void) { return in_flight; }
void store_pool_stats_get(store_chan ch, store_pool_stats *out)
{
    (void)ch;
    *out = (store_pool_stats){ 8, up ? 8 : 0, 0, 0 };
}

int store_phase1(const store_pay *p, bool with_intent, void (*cb)(const store_p1 *, void *), void *arg)
{
    call *c = new_call(K_PHASE1, FN(cb), arg);
    copy_pay(c, p);
    c->b1 = with_intent;
    return submit(c);
}

/* The fence: if the session still runs a call, terminate it: it either
 * completes right now or never. */
static bool fence(const char *token)
{
    if (!token || !token[0])
        return true;
    if (sim_chance(0.05))
        return false;                  /* pg_terminate_backend timed out: ask again later */
    for (int i = 0; i < nzombies; i++) {
        call *z = zombies[i];
        char t[32];
        snprintf(t, sizeof(t), "s%llu", (unsigned long long)z->session);
        if (strcmp(t, token) != 0 || z->done || z->killed)
            continue;
        if (z->gen == db_gen && sim_chance(0.5)) {
            run_call(z);               /* it got through before it was terminated */
            z->done = true;
        } else {
            z->killed = true;
        }
    }
    return true;
}

int store_get_facts(store_chan ch, const char *payment_id, const char *gid, const char *fence_token,
                    void (*cb)(const store_facts *, void *), void *arg)
{
    (void)ch;
    call *c = new_call(K_FACTS, FN(cb), arg);
    CPY(c->s1, payment_id);
    CPY(c->s2, gid);
    CPY(c->s3, fence_token ? fence_token : "");
    c->n2 = !fence(fence_token);       /* 1: not fenced yet */
    return submit(c);
}

int store_finish(store_chan ch, const char *gid, bool commit, void (*cb)(const store_p2 *, void *), void *arg)
{
    (void)ch;
    call *c = new_call(K_FINISH, FN(cb), arg);
    CPY(c->s1, gid);
    c->b1 = commit;
    return submit(c);
}

int store_settle(store_chan ch, const store_pay *p, const char *status, const char *decline_code,
                 const char *processor_ref, void (*cb)(const store_settled *, void *), void *arg)
{
    (void)ch;
    call *c = new_call(K_SETTLE, FN(cb), arg);
    copy_pay(c, p);
    CPY(c->s1, status);
    CPY(c->s2, decline_code);
    CPY(c->s3, processor_ref);
    return submit(c);
}

int store_record_success(const char *payment_id, const char *processor_ref, int64_t updated_ms,
                         void (*cb)(bool ok, void *), void *arg)
{
    call *c = new_call(K_RECORD, FN(cb), arg);
    CPY(c->s1, payment_id);
    CPY(c->s2, processor_ref);
    c->n1 = updated_ms;
    return submit(c);
}

int store_flag_review(store_chan ch, const char *gid, const char *payment_id, const char *why,
                      void (*cb)(st_status st, void *), void *arg)
{
    (void)ch;
    call *c = new_call(K_FLAG, FN(cb), arg);
    CPY(c->s1, gid);
    CPY(c->s2, payment_id);
    snprintf(c->s3, sizeof(c->s3), "%.71s", why ? why : "");
    return submit(c);
}

void store_note_attempt(const char *gid, const char *payment_id, int attempts, const char *why)
{
    call *c = new_call(K_NOTE, NULL, NULL);
    CPY(c->s1, gid);
    CPY(c->s2, payment_id);
    snprintf(c->s3, sizeof(c->s3), "%.71s", why ? why : "");
    c->n1 = attempts;
    (void)submit(c);
}

void store_forget(const char *gid)
{
    call *c = new_call(K_FORGET, NULL, NULL);
    CPY(c->s1, gid);
    (void)submit(c);
}

void store_save_processor_ref(const char *payment_id, const char *processor_ref)
{
    call *c = new_call(K_REF, NULL, NULL);
    CPY(c->s1, payment_id);
    CPY(c->s2, processor_ref);
    (void)submit(c);
}

int store_payment_by_key(const char *key, void (*cb)(const store_lookup *, void *), void *arg)
{
    call *c = new_call(K_BY_KEY, FN(cb), arg);
    CPY(c->s1, key);
    return submit(c);
}

int store_payment_by_id(const char *payment_id, void (*cb)(const store_lookup *, void *), void *arg)
{
    call *c = new_call(K_BY_ID, FN(cb), arg);
    CPY(c->s1, payment_id);
    return submit(c);
}

int store_balance(const char *account, void (*cb)(const store_balance_row *, void *), void *arg)
{
    call *c = new_call(K_BALANCE, FN(cb), arg);
    CPY(c->s1, account);
    return submit(c);
}

int store_account_open(const char *account, const char *currency, void (*cb)(const store_opened *, void *), void *arg)
{
    call *c = new_call(K_OPEN, FN(cb), arg);
    CPY(c->s1, account);
    CPY(c->s2, currency);
    return submit(c);
}

int store_credit(const store_credit_req *cr, void (*cb)(const store_credit_res *, void *), void *arg)
{
    call *c = new_call(K_CREDIT, FN(cb), arg);
    CPY(c->s1, cr->credit_id);
    CPY(c->s2, cr->key);
    CPY(c->s3, cr->account);
    CPY(c->s4, cr->currency);
    c->n1 = cr->amount;
    c->b1 = cr->apply;
    return submit(c);
}

int store_credit_by_key(const char *key, void (*cb)(const store_credit_row *, void *), void *arg)
{
    call *c = new_call(K_CREDIT_BY_KEY, FN(cb), arg);
    CPY(c->s1, key);
    return submit(c);
}

int store_apply_credits(store_chan ch, const char *account, void (*cb)(st_status st, int applied, void *), void *arg)
{
    (void)ch;
    call *c = new_call(K_APPLY, FN(cb), arg);
    CPY(c->s1, account);
    return submit(c);
}

void store_apply_all_credits(void) { (void)submit(new_call(K_APPLY_ALL, NULL, NULL)); }

int store_max_prepared(void (*cb)(st_status st, int value, void *), void *arg)
{
    return submit(new_call(K_MAXPREP, FN(cb), arg));
}

int store_prepared_count(const char *node, void (*cb)(st_status st, int count, double oldest_s, void *), void *arg)
{
    (void)node;
    return submit(new_call(K_COUNT, FN(cb), arg));
}

int store_node_lock(const char *node, void (*cb)(st_status st, bool got, void *), void *arg)
{
    call *c = new_call(K_LOCK, FN(cb), arg);
    CPY(c->s1, node);
    return submit(c);
}

int store_node_unlock(const char *node)
{
    call *c = new_call(K_UNLOCK, NULL, NULL);
    CPY(c->s1, node);
    return submit(c);
}

int store_node_alive(store_chan ch, const char *node, void (*cb)(st_status st, bool alive, void *), void *arg)
{
    (void)ch;
    call *c = new_call(K_ALIVE, FN(cb), arg);
    CPY(c->s1, node);
    return submit(c);
}

int store_rec_list_node(const char *node, void (*cb)(const store_rec_list *, void *), void *arg)
{
    call *c = new_call(K_LIST, FN(cb), arg);
    CPY(c->s1, node);
    return submit(c);
}

int store_rec_mark_succeeded(const char *payment_id, const char *processor_ref, void (*cb)(st_status st, void *),
                             void *arg)
{
    call *c = new_call(K_MARK, FN(cb), arg);
    CPY(c->s1, payment_id);
    CPY(c->s2, processor_ref);
    return submit(c);
}

int store_prepared_list_all(int64_t older_than_ms, void (*cb)(const store_prepared_list *, void *), void *arg)
{
    (void)older_than_ms;
    return submit(new_call(K_PLIST, FN(cb), arg));
}

int store_resolve_begin(const char *gid, bool commit, const char *reason, unsigned uid, const char *node,
                        void (*cb)(st_status st, int64_t resolution_id, void *), void *arg)
{
    (void)commit;
    (void)reason;
    (void)uid;
    (void)node;
    call *c = new_call(K_RBEGIN, FN(cb), arg);
    CPY(c->s1, gid);
    return submit(c);
}

int store_resolve_end(int64_t resolution_id, const char *gid, const char *outcome, bool settled, bool rolled_back,
                      void (*cb)(st_status st, void *), void *arg)
{
    (void)resolution_id;
    (void)outcome;
    call *c = new_call(K_REND, FN(cb), arg);
    CPY(c->s1, gid);
    c->b1 = settled;
    c->n1 = rolled_back;
    return submit(c);
}

/* ---------------------------------------------------------------- the simulation's side */

void sim_db_reset(void)
{
    while (all_calls) {
        call *c = all_calls;
        all_calls = c->next;
        free(c);
    }
    memset(&cur, 0, sizeof(cur));
    flushed = cur;
    have_standby = false;
    nsettled_unflagged = 0;
    dirty = false;
    up = true;
    closing = false;
    daemon_up = false;
    in_flight = 0;
    nzombies = 0;
    state_cb = lock_cb = NULL;
    memset(&faults, 0, sizeof(faults));
    db_gen = 1;
    sim_at(FLUSH_US, wal_writer, NULL, 0);
}

void sim_db_set_faults(const sim_db_faults *f) { faults = *f; }
bool sim_db_up(void) { return up; }
int sim_db_in_flight(void) { return in_flight; }

static void db_back(void *arg)
{
    (void)arg;
    if (sim_now_us() < up_at_us)
        return;
    up = true;
    announce((void *)1);
}

void sim_db_standby_snapshot(void)
{
    standby = flushed;
    have_standby = true;
}

/* The primary dies and an asynchronous standby is promoted: everything
 * flushed since the snapshot is lost too (prepared transactions included). */
void sim_db_failover(int64_t down_us)
{
    if (have_standby)
        flushed = standby;
    sim_db_crash(down_us);
}

void sim_db_crash(int64_t down_us)
{
    cur = flushed;                     /* unflushed asynchronous commits are lost */
    dirty = false;
    db_gen++;                          /* calls in the air die with the server */
    bool was_up = up;
    up = false;
    up_at_us = sim_now_us() + down_us;
    if (was_up)
        announce(NULL);
    sim_at(down_us, db_back, NULL, 0);
}

void sim_db_daemon_died(void)
{
    /* Like the real store's shutdown: every call of the dying daemon is
     * answered "shutdown" now (it may still run at the server); nothing new
     * is accepted from here on. */
    closing = true;
    for (call *c = all_calls; c; c = c->next) {
        if (c->answered || c->epoch != sim_epoch || !c->cb)
            continue;
        c->shutdown = true;
        reply_call_keep(c);
    }
    closing = true;
    daemon_up = false;
    state_cb = lock_cb = NULL;
}

void sim_db_add_account(const char *id, const char *currency, int64_t balance)
{
    acct *a = &cur.a[cur.na++];
    memset(a, 0, sizeof(*a));
    CPY(a->id, id);
    CPY(a->currency, currency);
    a->balance = balance;
    if (balance) {
        cred *c = &cur.c[cur.nc++];
        memset(c, 0, sizeof(*c));
        snprintf(c->credit_id, sizeof(c->credit_id), "00000000-0000-4000-8000-%012d", cur.nc);
        snprintf(c->key, sizeof(c->key), "open-%s", id);
        CPY(c->account, id);
        CPY(c->currency, currency);
        c->amount = balance;
        c->applied = true;
        lent *e = &cur.l[cur.nl++];
        memset(e, 0, sizeof(*e));
        CPY(e->credit_id, c->credit_id);
        CPY(e->account, id);
        e->amount = balance;
    }
    dirty = true;
    flush();
}

int sim_db_payments(sim_payment_view *out, int max)
{
    int n = 0;
    for (int i = 0; i < cur.np && n < max; i++) {
        const prow *r = &cur.p[i];
        out[n++] = (sim_payment_view){ .payment_id = r->payment_id, .key = r->key, .gid = r->gid,
                                       .account = r->account, .currency = r->currency, .status = derived(r),
                                       .row_status = r->status, .amount = r->amount,
                                       .debited = debited(r->payment_id) };
    }
    return n;
}

int sim_db_prepared_count(void) { return cur.nx; }
bool sim_db_is_prepared(const char *gid) { return xact_of(gid) != NULL; }

int sim_db_review_count(void)
{
    int n = 0;
    for (int i = 0; i < cur.nr; i++)
        n += cur.r[i].review;
    return n;
}

int sim_db_review_open(char gids[][80], int max)
{
    int n = 0;
    for (int i = 0; i < cur.nr && n < max; i++) {
        const prow *r = row_by_gid(cur.r[i].gid);
        if (cur.r[i].review && (xact_of(cur.r[i].gid) || (r && !strcmp(r->status, "pending"))))
            snprintf(gids[n++], 80, "%s", cur.r[i].gid);
    }
    return n;
}

int64_t sim_db_account_balance(const char *id, bool *found)
{
    acct *a = acct_of(id);
    *found = a != NULL;
    return a ? a->balance : 0;
}

int64_t sim_db_ledger_sum(const char *account)
{
    int64_t s = 0;
    for (int i = 0; i < cur.nl; i++)
        if (!strcmp(cur.l[i].account, account))
            s += cur.l[i].amount;
    return s;
}

int64_t sim_db_credits_applied(const char *account)
{
    int64_t s = 0;
    for (int i = 0; i < cur.nc; i++)
        if (cur.c[i].applied && !strcmp(cur.c[i].account, account))
            s += cur.c[i].amount;
    return s;
}

int64_t sim_db_debits(const char *account)
{
    int64_t s = 0;
    for (int i = 0; i < cur.np; i++)
        if (!strcmp(cur.p[i].account, account) && debited(cur.p[i].payment_id))
            s += cur.p[i].amount;
    return s;
}

int sim_db_accepted_credits(void)
{
    int n = 0;
    for (int i = 0; i < cur.nc; i++)
        n += !cur.c[i].applied;
    return n;
}

int64_t sim_db_ledger_debits_of(const char *payment_id)
{
    int64_t n = 0;
    for (int i = 0; i < cur.nl; i++)
        n += !strcmp(cur.l[i].payment_id, payment_id);
    return n;
}

bool sim_db_row_exists(const char *payment_id) { return row_by_id(payment_id) != NULL; }

uint64_t sim_db_fingerprint(void)
{
    /* FNV-1a over the committed state that money and answers depend on. */
    uint64_t h = 1469598103934665603ULL;
#define MIX(ptr, len)                                                   \
    do {                                                                \
        const unsigned char *b_ = (const unsigned char *)(ptr);         \
        for (size_t i_ = 0; i_ < (size_t)(len); i_++)                   \
            h = (h ^ b_[i_]) * 1099511628211ULL;                        \
    } while (0)
    for (int i = 0; i < cur.na; i++)
        MIX(&cur.a[i], sizeof(cur.a[i]));
    for (int i = 0; i < cur.np; i++) {
        MIX(cur.p[i].payment_id, 37);
        MIX(cur.p[i].status, sizeof(cur.p[i].status));
        MIX(cur.p[i].decline_code, sizeof(cur.p[i].decline_code));
    }
    MIX(&cur.nl, sizeof(cur.nl));
    MIX(&cur.nx, sizeof(cur.nx));
    MIX(&cur.nc, sizeof(cur.nc));
    for (int i = 0; i < cur.nc; i++)
        MIX(&cur.c[i].applied, sizeof(cur.c[i].applied));
#undef MIX
    return h;
}
