/*
 * sim_store.c - the store (db/store.h) on the model of PostgreSQL in
 * sim_db.c: every store call becomes a call to the model that runs after a
 * latency and answers after another, and the seed picks its fate: its
 * connection breaks before it runs, after it ran, or while it runs and it
 * goes on running later ("zombie") unless its session is fenced first.
 * Callbacks of a daemon that died are never delivered; its calls may still
 * run.
 */
#include "sim_db_int.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void (*state_cb)(bool);
static void (*lock_cb)(bool);
static bool closing;
static bool daemon_up;               /* store_init'd, not shut down */
static int in_flight;
static uint64_t next_session = 1;

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
    c->gen = sim_db_gen();
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
    if (c->gen != sim_db_gen())
        c->killed = true;              /* the server crashed before it ran */
    if (!c->killed && !c->done) {
        sim_db_run(c);
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
    if (!sim_db_up()) {
        unlink_call(c);
        free(c);
        return STORE_UNAVAILABLE;
    }
    in_flight++;
    const sim_db_faults *faults = sim_db_faults_get();
    bool lossy = c->k != K_LOCK && c->k != K_UNLOCK && c->k != K_LOCKCHK;
    if (lossy && sim_chance(faults->lost_before))
        c->fate = F_LOST_BEFORE;
    else if (lossy && sim_chance(faults->lost_after))
        c->fate = F_LOST_AFTER;
    else if (lossy && nzombies < 256 && sim_chance(faults->zombie))
        c->fate = F_ZOMBIE;
    else if (c->k == K_PHASE1 && c->b1 && sim_chance(faults->phase1_partial))
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
            const prow *p = c->r_b ? &c->row : NULL;
            if (p) {
                r.found = true;
                snprintf(created, sizeof(created), "%lld", (long long)p->created_ms);
                snprintf(updated, sizeof(updated), "%lld", (long long)p->updated_ms);
                r.row = (store_payment_row){ .payment_id = p->payment_id, .key = p->key, .gid = p->gid,
                                             .account = p->account, .currency = p->currency,
                                             .status = p->status,
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
        CB(void (*)(st_status, bool, int, void *), c)(st, c->r_b, c->r_i, c->arg);
        break;
    case K_ALIVE:
        CB(void (*)(st_status, bool, void *), c)(st, c->r_b, c->arg);
        break;
    case K_LOCKCHK:
        CB(void (*)(st_status, int, bool, void *), c)(st, c->r_i, c->r_b, c->arg);
        break;
    case K_HOLDER:
        CB(void (*)(st_status, int, int, void *), c)(st, c->r_i, (int)c->r_l, c->arg);
        break;
    case K_EVICT:
        break;
    case K_REPL: {
        /* The model's primary has a standby only in the seeds that fail over
         * to an asynchronous one, from its snapshot to the failover. */
        store_replication f = { .st = st, .errmsg = "", .sync_names = "", .sync_commit = "on",
                                .standby_list = "" };
        if (st == ST_OK && sim_db_has_standby()) {
            f.standbys = 1;
            f.sync_standbys = 0;
            f.standby_list = "standby:streaming:async";
        }
        CB(void (*)(const store_replication *, void *), c)(&f, c->arg);
        break;
    }
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
    if (sim_db_up())
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

bool store_is_up(void) { return sim_db_up() && daemon_up; }
bool store_is_stuck(int *oldest_ms)
{
    if (oldest_ms)
        *oldest_ms = 0;
    return false;
}
void store_set_state_cb(void (*cb)(bool up)) { state_cb = cb; }
void store_set_lock_cb(void (*cb)(bool up)) { lock_cb = cb; }
bool store_lock_session_up(void) { return sim_db_up() && daemon_up; }
void store_flush(void) {}
int store_busy(void) { return in_flight; }
void store_pool_stats_get(store_chan ch, store_pool_stats *out)
{
    (void)ch;
    *out = (store_pool_stats){ 8, sim_db_up() ? 8 : 0, 0, 0 };
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
        if (z->gen == sim_db_gen() && sim_chance(0.5)) {
            sim_db_run(z);               /* it got through before it was terminated */
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

int store_node_lock(const char *node, void (*cb)(st_status st, bool got, int pid, void *), void *arg)
{
    call *c = new_call(K_LOCK, FN(cb), arg);
    CPY(c->s1, node);
    return submit(c);
}

int store_node_lock_check(const char *node, void (*cb)(st_status st, int my_pid, bool held_by_me, void *), void *arg)
{
    call *c = new_call(K_LOCKCHK, FN(cb), arg);
    CPY(c->s1, node);
    return submit(c);
}

int store_node_lock_holder(store_chan ch, const char *node,
                           void (*cb)(st_status st, int my_pid, int holder_pid, void *), void *arg)
{
    (void)ch;
    call *c = new_call(K_HOLDER, FN(cb), arg);
    CPY(c->s1, node);
    return submit(c);
}

void store_node_lock_evict(const char *node, int holder_pid)
{
    call *c = new_call(K_EVICT, NULL, NULL);
    CPY(c->s1, node);
    c->n1 = holder_pid;
    (void)submit(c);
}

int store_replication_facts(void (*cb)(const store_replication *, void *), void *arg)
{
    return submit(new_call(K_REPL, FN(cb), arg));
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

void sim_store_announce(bool on) { announce(on ? (void *)1 : NULL); }

void sim_store_reset(void)
{
    while (all_calls) {
        call *c = all_calls;
        all_calls = c->next;
        free(c);
    }
    closing = false;
    daemon_up = false;
    in_flight = 0;
    nzombies = 0;
    state_cb = lock_cb = NULL;
}

int sim_db_in_flight(void) { return in_flight; }

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
    daemon_up = false;
    state_cb = lock_cb = NULL;
}
