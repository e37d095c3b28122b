/*
 * store_pg.c - the store (store.h) on PostgreSQL: the pools, the payment
 * path's statements, reads and credits. Recovery's and the operators'
 * statements are in store_pg_rec.c, the batched success writes in
 * store_pg_batch.c. Every statement is sent through pgpool (libpq's
 * asynchronous API); every session runs with lock_timeout = db_lock_timeout_ms,
 * so no statement waits longer than that for a lock.
 *
 * Pools: the payment path's (pool_size connections), recovery's own
 * (recovery_pool_size; admin ops use it too), and one connection that holds
 * the node's advisory lock for the daemon's life.
 */
#include "store_pg.h"
#include "ctx.h"
#include "log.h"
#include "loop.h"
#include "sbuf.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static pgpool *pay_pool, *rec_pool, *lock_pool;
static bool closing;
static void (*state_cb)(bool up);
static void (*lock_cb)(bool up);

/* ---------------------------------------------------------------- helpers */

spg_call *spg_call_new(store_any_fn fn, void *arg)
{
    spg_call *c = calloc(1, sizeof(*c));
    if (c) {
        c->fn = fn;
        c->arg = arg;
    }
    return c;
}

pgpool *spg_pool(store_chan ch) { return ch == CH_REC ? rec_pool : pay_pool; }
pgpool *spg_lock_pool(void) { return lock_pool; }
bool spg_closing(void) { return closing; }

st_status spg_status(const pgpool_reply *r)
{
    switch (r->status) {
    case PGQ_OK: return ST_OK;
    case PGQ_SQL_ERROR: return ST_ERROR;
    case PGQ_SHUTDOWN: return ST_SHUTDOWN;
    case PGQ_CONN_LOST: return closing ? ST_SHUTDOWN : r->sent ? ST_LOST : ST_NOT_SENT;
    }
    return ST_ERROR;
}

static int refusal(int rc) { return rc == PGPOOL_UNAVAILABLE ? STORE_UNAVAILABLE : STORE_OVERLOADED; }

int spg_query(store_chan ch, const char *sql, pgpool_cb cb, spg_call *call)
{
    if (!call)
        return STORE_OVERLOADED;
    int rc = pgpool_query(spg_pool(ch), sql, cb, call);
    if (rc == PGPOOL_QUEUED)
        return STORE_QUEUED;
    free(call);
    return refusal(rc);
}

int spg_params(store_chan ch, const char *sql, int n, const char *const *values, pgpool_cb cb, spg_call *call)
{
    if (!call)
        return STORE_OVERLOADED;
    int rc = pgpool_query_params(spg_pool(ch), sql, n, values, cb, call);
    if (rc == PGPOOL_QUEUED)
        return STORE_QUEUED;
    free(call);
    return refusal(rc);
}

static void forget_cb(const pgpool_reply *r, void *arg)
{
    if (r->status != PGQ_OK && r->status != PGQ_SHUTDOWN && !closing)
        log_warn("store event=write_failed what=%s error=\"%s\"", (const char *)arg, r->errmsg);
}

void spg_forget(store_chan ch, const char *what, const char *sql, int n, const char *const *values)
{
    int rc = n > 0 ? pgpool_query_params(spg_pool(ch), sql, n, values, forget_cb, (void *)what)
                   : pgpool_query(spg_pool(ch), sql, forget_cb, (void *)what);
    if (rc != PGPOOL_QUEUED)
        log_warn("store event=write_skipped what=%s", what);
}

bool spg_bool(const PGresult *res, int row, int col) { return PQgetvalue(res, row, col)[0] == 't'; }
int64_t spg_int(const PGresult *res, int row, int col) { return strtoll(PQgetvalue(res, row, col), NULL, 10); }
const char *spg_text(const PGresult *res, int row, int col)
{
    return PQgetisnull(res, row, col) ? NULL : PQgetvalue(res, row, col);
}

void spg_row(const PGresult *res, int row, store_payment_row *out)
{
    *out = (store_payment_row){
        .payment_id = PQgetvalue(res, row, 0), .key = PQgetvalue(res, row, 1), .gid = PQgetvalue(res, row, 2),
        .account = PQgetvalue(res, row, 3), .amount = spg_int(res, row, 4), .currency = PQgetvalue(res, row, 5),
        .reference = spg_text(res, row, 6), .status = PQgetvalue(res, row, 7),
        .processor_ref = spg_text(res, row, 8), .decline_code = spg_text(res, row, 9),
        .created_at = PQgetvalue(res, row, 10), .updated_at = PQgetvalue(res, row, 11),
    };
}

/* ---------------------------------------------------------------- lifecycle */

/* One pool just connected: the server (after a restart) or a new primary
 * (after a failover) takes connections again, so the other pools stop
 * waiting out their reconnect backoff. The node lock's session matters most:
 * payments wait for the lock, so it must not come back a backoff later than
 * the payment pool. */
static void wake_others(const pgpool *up)
{
    pgpool *pools[] = { pay_pool, rec_pool, lock_pool };
    for (size_t i = 0; i < PC_ARRAY_LEN(pools); i++)
        if (pools[i] && pools[i] != up)
            pgpool_wake(pools[i]);
}

static void pay_state_cb(bool up, void *arg)
{
    (void)arg;
    if (up)
        wake_others(pay_pool);
    if (state_cb)
        state_cb(up);
}

static void rec_state_cb(bool up, void *arg)
{
    (void)arg;
    if (up)
        wake_others(rec_pool);
}

static void lock_state_cb(bool up, void *arg)
{
    (void)arg;
    if (up)
        wake_others(lock_pool);
    if (lock_cb)
        lock_cb(up);
}

void store_set_state_cb(void (*cb)(bool up)) { state_cb = cb; }
void store_set_lock_cb(void (*cb)(bool up)) { lock_cb = cb; }

pgpool_config spg_pool_config(const char *app_name, int size, int max_queue)
{
    const pc_config *cfg = &D->cfg;
    return (pgpool_config){ .conninfo = cfg->db_conninfo, .size = size, .max_queue = max_queue,
                            .connect_timeout_ms = cfg->db_connect_timeout_ms, .reconnect_min_ms = 100,
                            .reconnect_max_ms = cfg->db_reconnect_max_ms, .lock_timeout_ms = cfg->db_lock_timeout_ms,
                            .app_name = app_name, .keepalives_idle_s = cfg->db_keepalives_idle_s,
                            .keepalives_interval_s = cfg->db_keepalives_interval_s,
                            .keepalives_count = cfg->db_keepalives_count,
                            .tcp_user_timeout_ms = cfg->db_tcp_user_timeout_ms };
}

int store_init(void)
{
    const pc_config *cfg = &D->cfg;
    char app[64];
    snprintf(app, sizeof(app), "paycoord/%s", cfg->node_id);
    closing = false;
    pgpool_config pc = spg_pool_config(app, cfg->pool_size, cfg->max_in_flight * 4 + 1024);
    pay_pool = pgpool_new(loop_base(), &pc);
    pgpool_config rc = pc;
    rc.size = cfg->recovery_pool_size;
    rc.max_queue = 4096;
    rec_pool = pgpool_new(loop_base(), &rc);
    pgpool_config lc = pc;
    lc.size = 1;
    lc.max_queue = 64;
    lock_pool = pgpool_new(loop_base(), &lc);
    if (!pay_pool || !rec_pool || !lock_pool || spg_batch_init() != 0) {
        store_shutdown();
        return -1;
    }
    pgpool_set_state_cb(pay_pool, pay_state_cb, NULL);
    pgpool_set_state_cb(rec_pool, rec_state_cb, NULL);
    pgpool_set_state_cb(lock_pool, lock_state_cb, NULL);
    return 0;
}

void store_shutdown(void)
{
    closing = true;
    spg_batch_shutdown();
    if (lock_pool)
        pgpool_free(lock_pool);
    if (rec_pool)
        pgpool_free(rec_pool);
    if (pay_pool)
        pgpool_free(pay_pool);
    pay_pool = rec_pool = lock_pool = NULL;
}

bool store_is_up(void) { return pay_pool && pgpool_is_up(pay_pool); }
bool store_lock_session_up(void) { return lock_pool && pgpool_is_up(lock_pool); }

bool store_is_stuck(int *oldest_ms)
{
    int ms = pay_pool ? pgpool_oldest_busy_ms(pay_pool) : 0;
    if (oldest_ms)
        *oldest_ms = ms;
    return ms > D->cfg.db_stuck_ms;
}

int store_busy(void)
{
    int n = 0;
    pgpool *pools[] = { pay_pool, rec_pool };
    for (size_t i = 0; i < PC_ARRAY_LEN(pools); i++)
        if (pools[i])
            n += pgpool_busy(pools[i]) + pgpool_queued(pools[i]);
    return n;
}

void store_pool_stats_get(store_chan ch, store_pool_stats *out)
{
    pgpool *p = spg_pool(ch);
    *out = (store_pool_stats){ 0 };
    if (!p)
        return;
    out->size = pgpool_size(p);
    out->connected = pgpool_connected(p);
    out->busy = pgpool_busy(p);
    out->queued = pgpool_queued(p);
}

/* ---------------------------------------------------------------- phase 1 */

typedef void (*p1_fn)(const store_p1 *, void *);

/* Whether the intent's COMMIT (result 3 of the string with the intent) ran. */
static bool intent_committed(const pgpool_reply *r)
{
    return r->nresults > 3 && PQresultStatus(r->results[3]) == PGRES_COMMAND_OK &&
           !strcmp(PQcmdStatus(r->results[3]), "COMMIT");
}

static void phase1_cb(const pgpool_reply *r, void *arg)
{
    spg_call *c = arg;
    bool with_intent = c->n != 0;
    store_p1 res = { .sqlstate = r->sqlstate, .errmsg = r->errmsg, .elapsed_ms = r->elapsed_ms };
    res.intent_written = with_intent ? intent_committed(r) : true;
    switch (spg_status(r)) {
    case ST_OK:
        res.outcome = P1_PREPARED;
        break;
    case ST_NOT_SENT:
        res.outcome = P1_NOT_SENT;
        res.intent_written = !with_intent;
        break;
    case ST_LOST:
        res.outcome = P1_LOST;
        res.intent_written = !with_intent;      /* unknown: the fence check tells */
        snprintf(c->buf, sizeof(c->buf), "%s", r->fence);
        res.fence = c->buf;
        break;
    case ST_SHUTDOWN:
        res.outcome = P1_SHUTDOWN;
        res.intent_written = !with_intent;
        break;
    case ST_ERROR: {
        const char *st = r->sqlstate;
        if (!strcmp(st, "PCUA1"))
            res.outcome = P1_UNKNOWN_ACCOUNT;
        else if (!strcmp(st, "PCCM1"))
            res.outcome = P1_CURRENCY_MISMATCH;
        else if (!strcmp(st, "PCDUP"))
            res.outcome = P1_DUPLICATE_KEY;
        else if (!strcmp(st, "PCNSF"))
            res.outcome = P1_NSF;
        else if (!strcmp(st, "55P03") || !strcmp(st, "40001") || !strcmp(st, "40P01") || res.intent_written)
            res.outcome = P1_RETRY;  /* a lock timeout or a failure of the debit: again later */
        else
            res.outcome = P1_FAILED;
        break;
    }
    }
    ((p1_fn)c->fn)(&res, c->arg);
    free(c);
}

int store_phase1(const store_pay *p, bool with_intent, void (*cb)(const store_p1 *, void *), void *arg)
{
    spg_call *c = spg_call_new((store_any_fn)cb, arg);
    if (!c)
        return STORE_OVERLOADED;
    c->n = with_intent;
    sbuf q;
    sbuf_init(&q);
    if (with_intent) {
        char *meta = p->metadata ? cJSON_PrintUnformatted(p->metadata) : NULL;
        sbuf_puts(&q, "BEGIN; SET LOCAL synchronous_commit TO off; SELECT pc_pay_intent2(");
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
        sbuf_literal(&q, p->node);
        sbuf_printf(&q, ", %d, %lld); COMMIT; ", p->deadline_ms, (long long)p->created_ms);
        if (p->metadata && !meta)
            sbuf_printf(&q, "%s", "");          /* cJSON could not print: the sbuf stays usable, meta NULL */
        free(meta);
    }
    sbuf_puts(&q, "BEGIN; SELECT pc_pay_debit2(");
    sbuf_literal(&q, p->payment_id);
    sbuf_puts(&q, ", ");
    sbuf_literal(&q, p->account);
    sbuf_printf(&q, ", %lld); PREPARE TRANSACTION ", (long long)p->amount);
    sbuf_literal(&q, p->gid);
    int rc = sbuf_ok(&q) ? spg_query(CH_PAY, sbuf_str(&q), phase1_cb, c) : (free(c), STORE_OVERLOADED);
    sbuf_free(&q);
    return rc;
}

/* ---------------------------------------------------------------- facts */

typedef void (*facts_fn)(const store_facts *, void *);

static void facts_cb(const pgpool_reply *r, void *arg)
{
    spg_call *c = arg;
    store_facts f = { .st = spg_status(r), .errmsg = r->errmsg, .status = "" };
    if (f.st == ST_OK) {
        const PGresult *res = r->results[r->nresults - 1];
        if (PQntuples(res) != 1) {
            f.st = ST_ERROR;
            f.errmsg = "facts query returned no row";
        } else {
            f.fenced = spg_bool(res, 0, 0);
            f.row = spg_bool(res, 0, 1);
            f.status = PQgetvalue(res, 0, 2);
            f.prepared = spg_bool(res, 0, 3);
            f.debited = spg_bool(res, 0, 4);
            f.review = spg_bool(res, 0, 5);
            f.processor_ref = spg_text(res, 0, 6);
        }
    }
    ((facts_fn)c->fn)(&f, c->arg);
    free(c);
}

int store_get_facts(store_chan ch, const char *payment_id, const char *gid, const char *fence,
                void (*cb)(const store_facts *, void *), void *arg)
{
    /* The fence runs first in the same statement: pc_fence() returns only
     * once the lost session is gone (or says it is not), and the facts are
     * read after that. */
    static const char sql[] =
        "SELECT pc_fence($3), p.payment_id IS NOT NULL, coalesce(p.status, ''), "
        "       EXISTS (SELECT 1 FROM pg_prepared_xacts x WHERE x.gid = $2), "
        "       EXISTS (SELECT 1 FROM ledger l WHERE l.payment_id = p.payment_id), "
        "       coalesce((SELECT s.review FROM recovery_state s WHERE s.gid = $2), false), p.processor_ref "
        "  FROM (SELECT 1) one LEFT JOIN payments p ON p.payment_id = nullif($1, '')::uuid";
    const char *params[3] = { payment_id, gid, fence ? fence : "" };
    return spg_params(ch, sql, 3, params, facts_cb, spg_call_new((store_any_fn)cb, arg));
}

/* ---------------------------------------------------------------- phase 2 */

typedef void (*p2_fn)(const store_p2 *, void *);

static void finish_cb(const pgpool_reply *r, void *arg)
{
    spg_call *c = arg;
    store_p2 res = { .sqlstate = r->sqlstate, .errmsg = r->errmsg, .elapsed_ms = r->elapsed_ms };
    st_status st = spg_status(r);
    if (st == ST_OK)
        res.outcome = P2_DONE;
    else if (st == ST_SHUTDOWN)
        res.outcome = P2_SHUTDOWN;
    else if (st == ST_ERROR && !strcmp(r->sqlstate, "42704"))
        res.outcome = P2_GONE;
    else
        res.outcome = P2_RETRY;
    ((p2_fn)c->fn)(&res, c->arg);
    free(c);
}

int store_finish(store_chan ch, const char *gid, bool commit, void (*cb)(const store_p2 *, void *), void *arg)
{
    sbuf q;
    sbuf_init(&q);
    sbuf_puts(&q, commit ? "COMMIT PREPARED " : "ROLLBACK PREPARED ");
    sbuf_literal(&q, gid);
    int rc = sbuf_ok(&q) ? spg_query(ch, sbuf_str(&q), finish_cb, spg_call_new((store_any_fn)cb, arg))
                         : STORE_OVERLOADED;
    sbuf_free(&q);
    return rc;
}

/* ---------------------------------------------------------------- settle */

typedef void (*settled_fn)(const store_settled *, void *);

static void settle_cb(const pgpool_reply *r, void *arg)
{
    spg_call *c = arg;
    store_settled res = { .st = spg_status(r), .errmsg = r->errmsg, .status = "" };
    if (res.st == ST_OK) {
        const PGresult *pr = r->results[0];
        const char *v = PQntuples(pr) == 1 && !PQgetisnull(pr, 0, 0) ? PQgetvalue(pr, 0, 0) : "";
        if (!strcmp(v, "conflict"))
            res.conflict = true;
        else
            res.status = v;
    }
    ((settled_fn)c->fn)(&res, c->arg);
    free(c);
}

int store_settle(store_chan ch, const store_pay *p, const char *status, const char *decline_code,
                 const char *processor_ref, void (*cb)(const store_settled *, void *), void *arg)
{
    char amount[24], deadline[16], created[24], updated[24];
    snprintf(amount, sizeof(amount), "%lld", (long long)p->amount);
    snprintf(deadline, sizeof(deadline), "%d", p->deadline_ms);
    snprintf(created, sizeof(created), "%lld", (long long)p->created_ms);
    snprintf(updated, sizeof(updated), "%lld", (long long)p->updated_ms);
    const char *params[14] = { p->payment_id, status, decline_code, processor_ref, p->key, p->account,
                               p->account ? amount : NULL, p->currency, p->reference, p->gid, p->node,
                               deadline, p->created_ms ? created : NULL, p->updated_ms ? updated : NULL };
    return spg_params(ch,
                      "SELECT pc_pay_settle2($1::uuid, $2, $3, $4, $5, $6, $7::bigint, $8, $9, $10, $11, $12::bigint, "
                      "$13::bigint, $14::bigint)",
                      14, params, settle_cb, spg_call_new((store_any_fn)cb, arg));
}

/* ---------------------------------------------------------------- review, notes, refs */

typedef void (*st_fn)(st_status, void *);

static void st_cb(const pgpool_reply *r, void *arg)
{
    spg_call *c = arg;
    ((st_fn)c->fn)(spg_status(r), c->arg);
    free(c);
}

int store_flag_review(store_chan ch, const char *gid, const char *payment_id, const char *why,
                      void (*cb)(st_status st, void *), void *arg)
{
    /* synchronous_commit stays on: the flag is flushed before cb hears ST_OK. */
    const char *params[3] = { gid, payment_id && payment_id[0] ? payment_id : NULL, why };
    return spg_params(ch,
                      "INSERT INTO recovery_state (gid, payment_id, last_error, review) VALUES ($1, $2::uuid, $3, true) "
                      "ON CONFLICT (gid) DO UPDATE SET review = true, last_error = EXCLUDED.last_error, "
                      "payment_id = coalesce(recovery_state.payment_id, EXCLUDED.payment_id), updated_at = now()",
                      3, params, st_cb, spg_call_new((store_any_fn)cb, arg));
}

void store_note_attempt(const char *gid, const char *payment_id, int attempts, const char *why)
{
    char n[16];
    snprintf(n, sizeof(n), "%d", attempts);
    const char *params[4] = { gid, payment_id && payment_id[0] ? payment_id : NULL, n, why };
    spg_forget(CH_REC, "recovery_state",
               "INSERT INTO recovery_state (gid, payment_id, attempts, last_error) VALUES ($1, $2::uuid, $3::integer, $4) "
               "ON CONFLICT (gid) DO UPDATE SET attempts = greatest(recovery_state.attempts, EXCLUDED.attempts), "
               "last_error = EXCLUDED.last_error, updated_at = now()", 4, params);
}

void store_forget(const char *gid)
{
    const char *params[1] = { gid };
    spg_forget(CH_REC, "recovery_state", "DELETE FROM recovery_state WHERE gid = $1 AND NOT review", 1, params);
}

/* A hint for later polls, committed asynchronously: losing it in a crash
 * loses nothing (the processor is asked by gid), and a final answer carries
 * its processor_ref in its own write. */
void store_save_processor_ref(const char *payment_id, const char *processor_ref)
{
    sbuf q;
    sbuf_init(&q);
    sbuf_puts(&q, "BEGIN; SET LOCAL synchronous_commit TO off; UPDATE payments SET processor_ref = ");
    sbuf_literal(&q, processor_ref);
    sbuf_puts(&q, " WHERE payment_id = ");
    sbuf_literal(&q, payment_id);
    sbuf_puts(&q, "::uuid AND processor_ref IS DISTINCT FROM ");
    sbuf_literal(&q, processor_ref);
    sbuf_puts(&q, "; COMMIT");
    if (sbuf_ok(&q))
        spg_forget(CH_PAY, "processor_ref", sbuf_str(&q), 0, NULL);
    else
        log_warn("store event=write_skipped what=processor_ref");
    sbuf_free(&q);
}

/* ---------------------------------------------------------------- reads */

/* A 'pending' row may be an intent committed asynchronously and not yet
 * flushed: visible, but lost if PostgreSQL crashed now. Before such a row is
 * shown to anyone, the reading transaction writes a WAL record of its own (a
 * transactional logical message, which takes an xid), so that its commit,
 * synchronous, flushes the WAL up to itself and with it the intent before
 * the answer arrives: a client is never told a payment that is not durable.
 * (An xid alone is not enough: PostgreSQL commits a transaction that wrote
 * no WAL asynchronously.) */
#define SPG_FLUSH_PENDING                                                                                   \
    "CASE WHEN " SPG_READ_STATUS " = 'pending' THEN pg_logical_emit_message(true, 'paycoord', 'flush') IS NOT NULL END"

typedef void (*lookup_fn)(const store_lookup *, void *);

static void lookup_cb(const pgpool_reply *r, void *arg)
{
    spg_call *c = arg;
    store_lookup res = { .st = spg_status(r), .errmsg = r->errmsg };
    if (res.st == ST_OK && PQntuples(r->results[0]) == 1) {
        res.found = true;
        spg_row(r->results[0], 0, &res.row);
    }
    ((lookup_fn)c->fn)(&res, c->arg);
    free(c);
}

int store_payment_by_key(const char *key, void (*cb)(const store_lookup *, void *), void *arg)
{
    const char *params[1] = { key };
    return spg_params(CH_PAY, "SELECT " SPG_PAYMENT_COLUMNS ", " SPG_FLUSH_PENDING
                      " FROM payments_view WHERE idempotency_key = $1", 1,
                      params, lookup_cb, spg_call_new((store_any_fn)cb, arg));
}

int store_payment_by_id(const char *payment_id, void (*cb)(const store_lookup *, void *), void *arg)
{
    const char *params[1] = { payment_id };
    return spg_params(CH_PAY, "SELECT " SPG_PAYMENT_COLUMNS ", " SPG_FLUSH_PENDING
                      " FROM payments_view WHERE payment_id = $1::uuid", 1,
                      params, lookup_cb, spg_call_new((store_any_fn)cb, arg));
}

typedef void (*balance_fn)(const store_balance_row *, void *);

static void balance_cb(const pgpool_reply *r, void *arg)
{
    spg_call *c = arg;
    store_balance_row b = { .st = spg_status(r), .errmsg = r->errmsg };
    if (b.st == ST_OK && PQntuples(r->results[0]) == 1) {
        const PGresult *res = r->results[0];
        b.found = true;
        b.currency = PQgetvalue(res, 0, 0);
        b.balance = spg_int(res, 0, 1);
        b.held = spg_int(res, 0, 2);
        b.pending_credits = spg_int(res, 0, 3);
    }
    ((balance_fn)c->fn)(&b, c->arg);
    free(c);
}

int store_balance(const char *account, void (*cb)(const store_balance_row *, void *), void *arg)
{
    /* held: debits prepared and not yet resolved (a prepared transaction of
     * ours is always a real debit: insufficient funds is never prepared). */
    static const char sql[] =
        "SELECT a.currency, a.balance::text, "
        "  (SELECT coalesce(sum(p.amount), 0)::text FROM pg_prepared_xacts x JOIN payments p ON p.gid = x.gid "
        "    WHERE p.account_id = a.id AND p.status = 'pending'), "
        "  (SELECT coalesce(sum(c.amount), 0)::text FROM credits c "
        "    WHERE c.account_id = a.id AND c.status = 'accepted') "
        "FROM accounts a WHERE a.id = $1";
    const char *params[1] = { account };
    return spg_params(CH_PAY, sql, 1, params, balance_cb, spg_call_new((store_any_fn)cb, arg));
}

typedef void (*opened_fn)(const store_opened *, void *);

static void opened_cb(const pgpool_reply *r, void *arg)
{
    spg_call *c = arg;
    store_opened o = { .st = spg_status(r), .errmsg = r->errmsg };
    if (o.st == ST_OK)
        o.created = spg_bool(r->results[0], 0, 0);
    ((opened_fn)c->fn)(&o, c->arg);
    free(c);
}

int store_account_open(const char *account, const char *currency, void (*cb)(const store_opened *, void *), void *arg)
{
    const char *params[2] = { account, currency };
    return spg_params(CH_PAY, "SELECT pc_account_open($1, $2)", 2, params, opened_cb,
                      spg_call_new((store_any_fn)cb, arg));
}

/* ---------------------------------------------------------------- credits */

typedef void (*credit_fn)(const store_credit_res *, void *);

static void credit_cb(const pgpool_reply *r, void *arg)
{
    spg_call *c = arg;
    store_credit_res res = { .errmsg = r->errmsg, .created_at = "" };
    switch (spg_status(r)) {
    case ST_OK:
        res.outcome = !strcmp(PQgetvalue(r->results[0], 0, 0), "applied") ? CR_APPLIED : CR_ACCEPTED;
        res.created_at = PQgetvalue(r->results[0], 0, 1);
        break;
    case ST_ERROR:
        res.outcome = !strcmp(r->sqlstate, "PCDUP")   ? CR_DUPLICATE_KEY
                      : !strcmp(r->sqlstate, "PCUA1") ? CR_UNKNOWN_ACCOUNT
                      : !strcmp(r->sqlstate, "PCCM1") ? CR_CURRENCY_MISMATCH
                                                      : CR_ERROR;
        break;
    case ST_LOST:
        res.outcome = CR_LOST;
        break;
    case ST_NOT_SENT:
        res.outcome = CR_NOT_SENT;
        break;
    case ST_SHUTDOWN:
        res.outcome = CR_SHUTDOWN;
        break;
    }
    ((credit_fn)c->fn)(&res, c->arg);
    free(c);
}

int store_credit(const store_credit_req *cr, void (*cb)(const store_credit_res *, void *), void *arg)
{
    char amount[24];
    snprintf(amount, sizeof(amount), "%lld", (long long)cr->amount);
    const char *params[7] = { cr->credit_id, cr->key, cr->account, amount, cr->currency, cr->reference,
                              cr->apply ? "true" : "false" };
    /* now() is the transaction's start: the row's created_at. */
    return spg_params(CH_PAY,
                      "SELECT pc_credit($1::uuid, $2, $3, $4::bigint, $5, $6, $7::boolean), "
                      "to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')",
                      7, params, credit_cb, spg_call_new((store_any_fn)cb, arg));
}

typedef void (*credit_row_fn)(const store_credit_row *, void *);

static void credit_row_cb(const pgpool_reply *r, void *arg)
{
    spg_call *c = arg;
    store_credit_row row = { .st = spg_status(r), .errmsg = r->errmsg };
    if (row.st == ST_OK && PQntuples(r->results[0]) == 1) {
        const PGresult *res = r->results[0];
        row.found = true;
        row.credit_id = PQgetvalue(res, 0, 0);
        row.account = PQgetvalue(res, 0, 1);
        row.amount = spg_int(res, 0, 2);
        row.currency = PQgetvalue(res, 0, 3);
        row.status = PQgetvalue(res, 0, 4);
        row.created_at = PQgetvalue(res, 0, 5);
    }
    ((credit_row_fn)c->fn)(&row, c->arg);
    free(c);
}

int store_credit_by_key(const char *key, void (*cb)(const store_credit_row *, void *), void *arg)
{
    const char *params[1] = { key };
    return spg_params(CH_PAY,
                      "SELECT credit_id::text, account_id, amount::text, currency, status, "
                      "to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') "
                      "FROM credits WHERE idempotency_key = $1", 1, params, credit_row_cb,
                      spg_call_new((store_any_fn)cb, arg));
}

typedef void (*applied_fn)(st_status, int, void *);

static void applied_cb(const pgpool_reply *r, void *arg)
{
    spg_call *c = arg;
    st_status st = spg_status(r);
    int n = st == ST_OK && PQntuples(r->results[0]) == 1 ? (int)spg_int(r->results[0], 0, 0) : 0;
    ((applied_fn)c->fn)(st, n, c->arg);
    free(c);
}

int store_apply_credits(store_chan ch, const char *account, void (*cb)(st_status st, int applied, void *), void *arg)
{
    const char *params[1] = { account };
    return spg_params(ch, "SELECT pc_apply_credits($1)", 1, params, applied_cb, spg_call_new((store_any_fn)cb, arg));
}

void store_apply_all_credits(void)
{
    spg_forget(CH_REC, "apply_credits",
               "SELECT pc_apply_credits(account_id) FROM (SELECT DISTINCT account_id FROM credits "
               "WHERE status = 'accepted') a", 0, NULL);
}

/* ---------------------------------------------------------------- server facts */

typedef void (*int_fn)(st_status, int, void *);

static void max_prepared_cb(const pgpool_reply *r, void *arg)
{
    spg_call *c = arg;
    st_status st = spg_status(r);
    int v = st == ST_OK && PQntuples(r->results[0]) == 1 ? (int)spg_int(r->results[0], 0, 0) : -1;
    ((int_fn)c->fn)(st, v, c->arg);
    free(c);
}

int store_max_prepared(void (*cb)(st_status st, int value, void *), void *arg)
{
    return spg_query(CH_PAY, "SHOW max_prepared_transactions", max_prepared_cb, spg_call_new((store_any_fn)cb, arg));
}

typedef void (*count_fn)(st_status, int, double, void *);

static void count_cb(const pgpool_reply *r, void *arg)
{
    spg_call *c = arg;
    st_status st = spg_status(r);
    int n = 0;
    double oldest = 0;
    if (st == ST_OK && PQntuples(r->results[0]) == 1) {
        n = (int)spg_int(r->results[0], 0, 0);
        oldest = strtod(PQgetvalue(r->results[0], 0, 1), NULL);
    }
    ((count_fn)c->fn)(st, n, oldest, c->arg);
    free(c);
}

int store_prepared_count(const char *node, void (*cb)(st_status st, int count, double oldest_s, void *), void *arg)
{
    char prefix[48];
    snprintf(prefix, sizeof(prefix), "pc:%s:", node);
    const char *params[1] = { prefix };
    return spg_params(CH_REC,
                      "SELECT count(*), coalesce(extract(epoch FROM now() - min(prepared)), 0) FROM pg_prepared_xacts "
                      "WHERE database = current_database() AND left(gid, length($1)) = $1", 1, params, count_cb,
                      spg_call_new((store_any_fn)cb, arg));
}
