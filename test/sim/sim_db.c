/*
 * sim_db.c - a model of PostgreSQL for the simulation; sim_store.c is the
 * store (db/store.h) on top of it. The model keeps the rules the daemon
 * relies on:
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
 *  - a call's statements run all at once (sim_db_run), except a phase 1
 *    whose connection breaks between the intent's commit and the debit.
 *
 * Connections, latencies and the fate of each call are sim_store.c's.
 */
#include "sim_db_int.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

dbstate cur;
static dbstate flushed, standby;
static bool have_standby;
static bool dirty;
static bool up = true;
static int64_t up_at_us;             /* when a crashed server is back */
static sim_db_faults faults;
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

acct *acct_of(const char *id)
{
    for (int i = 0; i < cur.na; i++)
        if (!strcmp(cur.a[i].id, id))
            return &cur.a[i];
    return NULL;
}

prow *row_by_id(const char *id)
{
    for (int i = 0; i < cur.np; i++)
        if (!strcmp(cur.p[i].payment_id, id))
            return &cur.p[i];
    return NULL;
}

prow *row_by_key(const char *key)
{
    for (int i = 0; i < cur.np; i++)
        if (!strcmp(cur.p[i].key, key))
            return &cur.p[i];
    return NULL;
}

prow *row_by_gid(const char *gid)
{
    for (int i = 0; i < cur.np; i++)
        if (!strcmp(cur.p[i].gid, gid))
            return &cur.p[i];
    return NULL;
}

xact *xact_of(const char *gid)
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

bool debited(const char *payment_id)
{
    for (int i = 0; i < cur.nl; i++)
        if (!strcmp(cur.l[i].payment_id, payment_id))
            return true;
    return false;
}

rst *rst_of(const char *gid)
{
    for (int i = 0; i < cur.nr; i++)
        if (!strcmp(cur.r[i].gid, gid))
            return &cur.r[i];
    return NULL;
}

/* What a client is told from a row (store.h, "Statuses"): a committed
 * debit whose row still says pending reads pending. */
const char *read_status(const prow *r)
{
    if (debited(r->payment_id) && !strcmp(r->status, "pending"))
        return "pending";
    return derived(r);
}

const char *derived(const prow *r)
{
    if (debited(r->payment_id))
        return "succeeded";
    if (!strcmp(r->status, "succeeded"))
        return "pending";
    return r->status;
}

void sim_cpy(char *dst, size_t n, const char *src)
{
    size_t len = strlen(src ? src : "");
    if (len >= n) {
        fprintf(stderr, "sim_db: value too long for the model: %s\n", src);
        abort();
    }
    memmove(dst, src ? src : "", len + 1);
}

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

void sim_db_run(call *c)
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
        }
        dirty = true;
        flush();                   /* synchronous: the success is told after it */
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
        if (r) {
            c->r_i = (int)(r - cur.p);
            c->row = *r;               /* what the statement read */
            CPY(c->row.status, read_status(r));
        }
        if (r && !strcmp(read_status(r), "pending"))
            flush();                   /* the reader's logical message: its commit flushes the WAL */
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
        c->r_i = 1;                    /* the lock session's backend */
        break;
    case K_LOCKCHK:
        c->r_b = true;                 /* held by the lock session's own backend (no pooler) */
        c->r_i = 1;
        break;
    case K_HOLDER:
        c->r_i = 2;                    /* another connection's backend */
        c->r_l = 1;                    /* the holder: the lock session's */
        break;
    case K_EVICT:
    case K_REPL:
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

/* ---------------------------------------------------------------- the simulation's side */

void sim_db_reset(void)
{
    sim_store_reset();
    memset(&cur, 0, sizeof(cur));
    flushed = cur;
    have_standby = false;
    nsettled_unflagged = 0;
    dirty = false;
    up = true;
    memset(&faults, 0, sizeof(faults));
    db_gen = 1;
    sim_at(FLUSH_US, wal_writer, NULL, 0);
}

void sim_db_set_faults(const sim_db_faults *f) { faults = *f; }
bool sim_db_up(void) { return up; }
uint64_t sim_db_gen(void) { return db_gen; }
bool sim_db_has_standby(void) { return have_standby; }
const sim_db_faults *sim_db_faults_get(void) { return &faults; }

static void db_back(void *arg)
{
    (void)arg;
    if (sim_now_us() < up_at_us)
        return;
    up = true;
    sim_store_announce(true);
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
    have_standby = false;              /* the promoted standby has none of its own */
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
        sim_store_announce(false);
    sim_at(down_us, db_back, NULL, 0);
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

int64_t sim_db_deadline_us(const char *gid)
{
    const prow *r = row_by_gid(gid);
    return r ? r->deadline_us : 0;
}

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
