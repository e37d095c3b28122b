/*
 * recovery.c - settles every prepared transaction and every stale 'pending'
 * payment of this node that no live request drives, by asking the processor
 * (DESIGN.md "Recovery"); plus the admin ops prepared, resolve, recover.
 *
 * One pass, per item (all items of a pass run concurrently, at most
 * REC_CONCURRENCY at once):
 *
 *  1. GET /v1/payments/{gid}
 *       succeeded          -> COMMIT PREPARED            (the charge happened)
 *       declined/canceled  -> ROLLBACK PREPARED, row 'declined'
 *       pending            -> leave; past the deadline: cancel (2)
 *       not found          -> cancel (2): the tombstone makes a late create
 *                             charge nothing, so rolling back is then safe
 *       unknown/5xx/auth   -> leave (backoff; manual review after
 *                             max_recovery_attempts). Never guess.
 *  2. POST .../cancel
 *       canceled           -> ROLLBACK PREPARED, row 'declined' (canceled)
 *       already_succeeded  -> COMMIT PREPARED
 *       501 unsupported    -> leave until processor_idempotency_window has
 *                             passed since PREPARE, then roll back and flag
 *                             the payment for reconciliation (review)
 *  A stale 'pending' row (no prepared transaction: the daemon died before
 *  PREPARE, or after ROLLBACK PREPARED and before the row was updated) holds
 *  no debit: it settles as declined; if the processor says succeeded, money
 *  moved without a debit: it goes to manual review with an alert.
 *
 * Crash windows: every step re-derives its facts from PostgreSQL and the
 * processor, so a pass cut short anywhere is simply run again (I7). A COMMIT
 * or ROLLBACK PREPARED whose answer is lost is left; the next pass finds the
 * transaction gone and the row telling what happened.
 *
 * Ownership: the daemon holds pg_advisory_lock(7357002, hashtext(node)) on a
 * session of its own for its whole life. Only the holder settles the node's
 * gids; `recover` with "node" takes a free (dead) node's lock for one pass.
 */
#include "daemon.h"
#include "log.h"
#include "sbuf.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/event.h>

#define REC_CONCURRENCY 256
#define REC_LOCK_CLASS "7357002"

typedef struct rec_pass rec_pass;

typedef struct rec_item {
    rec_pass *pass;
    struct rec_item *next;
    char gid[PROTO_GID_MAX + 1];
    char payment_id[37];           /* "" when there is no payment row */
    bool prepared;
    bool past_deadline;
    int64_t age_ms;                /* since PREPARE (or the row's creation) */
    int attempts;
    char processor_ref[128];
    char decline_code[64];
} rec_item;

typedef struct rec_waiter {
    pc_request *r;
    struct rec_waiter *next;
} rec_waiter;

struct rec_pass {
    char node[PROTO_NODE_MAX + 1];
    bool foreign;                  /* a dead node's gids, its lock held for this pass */
    bool forced;                   /* admin recover: ignore per-gid backoff */
    rec_item *todo;
    int running;
    int checked, committed, rolled_back, left, prepared_left;
    rec_waiter *waiters;
    uint64_t started_ms;
};

typedef struct backoff_entry {
    int attempts;
    uint64_t next_ms;
} backoff_entry;

static rec_pass *current;
static bool locked;
static bool lock_pending;
static struct event *tick;
static strmap *backoff;

bool rec_node_locked(void) { return locked; }
bool rec_busy(void) { return current != NULL; }

static bool first_pass_done;
bool rec_first_pass_done(void) { return first_pass_done; }

static void schedule_tick(int ms);
static void item_start(rec_item *it);
static void item_done(rec_item *it);
static void pass_pump(rec_pass *ps);

/* ---------------------------------------------------------------- helpers */

static int backoff_ms(int attempt)
{
    int64_t d = D->cfg.recovery_interval_ms;
    for (int i = 0; i < attempt && d < 3600000; i++)
        d *= 2;
    if (d > 3600000)
        d = 3600000;
    return (int)(d / 2 + (random() % (d / 2 + 1)));
}

static void query_or_log(const char *what, const char *sql, pgpool_cb cb, void *arg)
{
    if (pgpool_query(D->pool, sql, cb, arg) != PGPOOL_QUEUED) {
        log_warn("recovery event=query_not_sent what=%s", what);
        if (cb) {
            pgpool_reply r = { .status = PGQ_CONN_LOST, .sqlstate = "", .errmsg = "not sent" };
            cb(&r, arg);
        }
    }
}

/* Send a built statement, or tell cb it was not sent (sbuf out of memory). */
static void query_built(const char *what, sbuf *q, pgpool_cb cb, void *arg)
{
    if (sbuf_ok(q)) {
        query_or_log(what, sbuf_str(q), cb, arg);
    } else {
        log_warn("recovery event=query_not_built what=%s", what);
        pgpool_reply r = { .status = PGQ_CONN_LOST, .sqlstate = "", .errmsg = "out of memory" };
        cb(&r, arg);
    }
    sbuf_free(q);
}

static void ignore_cb(const pgpool_reply *r, void *arg)
{
    if (r->status != PGQ_OK)
        log_warn("recovery event=write_failed what=%s error=\"%s\"", (const char *)arg, r->errmsg);
}

/* ---------------------------------------------------------------- leave */

static void review_flag_cb(const pgpool_reply *r, void *arg)
{
    if (r->status != PGQ_OK)
        log_error("event=review_flag_not_written error=\"%s\" alert=review "
                  "note=\"a gid meant for manual review is not flagged: check `prepared`\"", r->errmsg);
}

/* Record attempts / last error / review for a gid in recovery_state (also
 * used by the payment path to hand a gid to manual review). Attempts never
 * go down; review, once set, stays until a person resolves the gid. */
void rec_save_state(const char *gid, const char *payment_id, int attempts, const char *why, bool review)
{
    sbuf q;
    sbuf_init(&q);
    sbuf_puts(&q, "INSERT INTO recovery_state (gid, payment_id, attempts, last_error, review) VALUES (");
    sbuf_literal(&q, gid);
    sbuf_puts(&q, ", ");
    sbuf_literal(&q, payment_id && payment_id[0] ? payment_id : NULL);
    sbuf_printf(&q, "::uuid, %d, ", attempts);
    sbuf_literal(&q, why);
    sbuf_printf(&q, ", %s) ON CONFLICT (gid) DO UPDATE SET "
                    "attempts = greatest(recovery_state.attempts, EXCLUDED.attempts), "
                    "last_error = EXCLUDED.last_error, review = recovery_state.review OR EXCLUDED.review, "
                    "updated_at = now()", review ? "true" : "false");
    if (!sbuf_ok(&q) || pgpool_query(D->pool, sbuf_str(&q), review ? review_flag_cb : ignore_cb,
                                     (void *)"recovery_state") != PGPOOL_QUEUED)
        log_error("recovery gid=%s event=state_not_written review=%d%s", gid, review, review ? " alert=review" : "");
    sbuf_free(&q);
}

/* Leave the item for a later pass: count the attempt; after
 * max_recovery_attempts the payment goes to manual review. */
static void item_leave(rec_item *it, const char *why)
{
    rec_pass *ps = it->pass;
    ps->left++;
    if (it->prepared)
        ps->prepared_left++;
    D->stats.recoveries_left++;
    backoff_entry *b = strmap_get(backoff, it->gid);
    if (!b && (b = calloc(1, sizeof(*b))) && strmap_put(backoff, it->gid, b) != 0) {
        free(b);
        b = NULL;
    }
    int attempts = it->attempts + 1;
    if (b) {
        b->attempts = attempts;
        b->next_ms = pc_now_ms() + (uint64_t)backoff_ms(attempts);
    }
    bool review = attempts >= D->cfg.max_recovery_attempts;
    if (review)
        log_error("recovery gid=%s event=manual_review attempts=%d last_error=\"%s\" alert=review", it->gid, attempts, why);
    else
        log_warn("recovery gid=%s event=left attempts=%d reason=\"%s\"", it->gid, attempts, why);
    rec_save_state(it->gid, it->payment_id, attempts, why, review);
    item_done(it);
}

static void mark_review(rec_item *it, const char *why)
{
    log_error("recovery gid=%s event=manual_review reason=\"%s\" alert=review", it->gid, why);
    rec_save_state(it->gid, it->payment_id, it->attempts, why, true);
}

/* ---------------------------------------------------------------- commit */

/* Settled: drop the gid's backoff and bookkeeping. */
static void forget(const rec_item *it)
{
    free(strmap_del(backoff, it->gid));
    if (it->attempts > 0) {             /* a recovery_state row exists only then */
        sbuf q;
        sbuf_init(&q);
        sbuf_puts(&q, "DELETE FROM recovery_state WHERE gid = ");
        sbuf_literal(&q, it->gid);
        sbuf_puts(&q, " AND NOT review");
        query_built("recovery_state", &q, ignore_cb, "recovery_state");
    }
}

/* "prepared transaction does not exist": a live payment or another pass
 * settled it after the listing; the next pass sees the truth. */
static bool settled_elsewhere(rec_item *it, const pgpool_reply *r)
{
    if (r->status != PGQ_SQL_ERROR || strcmp(r->sqlstate, "42704") != 0)
        return false;
    log_info("recovery gid=%s event=settled_elsewhere", it->gid);
    item_done(it);
    return true;
}

static void commit_cb(const pgpool_reply *r, void *arg)
{
    rec_item *it = arg;
    if (settled_elsewhere(it, r))
        return;
    if (r->status != PGQ_OK) {
        item_leave(it, r->status == PGQ_SQL_ERROR ? r->errmsg : "database unavailable during COMMIT PREPARED");
        return;
    }
    it->pass->committed++;
    D->stats.recoveries_committed++;
    log_notice("recovery gid=%s event=committed processor_ref=%s", it->gid, it->processor_ref[0] ? it->processor_ref : "-");
    if (it->payment_id[0]) {
        sbuf q;
        sbuf_init(&q);
        sbuf_puts(&q, "UPDATE payments SET processor_ref = coalesce(");
        sbuf_literal(&q, it->processor_ref[0] ? it->processor_ref : NULL);
        sbuf_puts(&q, ", processor_ref), updated_at = now() WHERE payment_id = ");
        sbuf_literal(&q, it->payment_id);
        query_built("processor_ref", &q, ignore_cb, "processor_ref");
    }
    forget(it);
    item_done(it);
}

static void rollback_cb(const pgpool_reply *r, void *arg);

/* COMMIT PREPARED or ROLLBACK PREPARED of the item's gid. */
static void second_phase(rec_item *it, bool commit)
{
    sbuf q;
    sbuf_init(&q);
    sbuf_puts(&q, commit ? "COMMIT PREPARED " : "ROLLBACK PREPARED ");
    sbuf_literal(&q, it->gid);
    query_built(commit ? "commit" : "rollback", &q, commit ? commit_cb : rollback_cb, it);
}

static void recheck_cb(const pgpool_reply *r, void *arg)
{
    rec_item *it = arg;
    if (r->status != PGQ_OK) {
        item_leave(it, "database unavailable during recheck");
        return;
    }
    if (PQntuples(r->results[0]) == 1 && !strcmp(PQgetvalue(r->results[0], 0, 0), "pending") &&
        PQgetvalue(r->results[0], 0, 1)[0] == 'f') {
        /* The processor charged but no debit exists: never guess. */
        mark_review(it, "processor charged a payment that holds no debit (refund or re-debit by hand)");
        item_leave(it, "charged_without_debit");
        return;
    }
    log_info("recovery gid=%s event=settled_elsewhere", it->gid);
    item_done(it);
}

static void item_commit(rec_item *it, const char *psp_ref)
{
    if (psp_ref && psp_ref[0])
        snprintf(it->processor_ref, sizeof(it->processor_ref), "%s", psp_ref);
    if (!it->prepared) {
        /* A pending row with no prepared debit, yet charged: the listing may
         * predate a live commit. Read the row again before alarming anyone. */
        const char *params[1] = { it->payment_id };
        if (pgpool_query_params(D->pool,
                "SELECT p.status, EXISTS (SELECT 1 FROM pg_prepared_xacts x WHERE x.gid = p.gid) "
                "FROM payments p WHERE p.payment_id = $1::uuid", 1, params, recheck_cb, it) != PGPOOL_QUEUED)
            item_leave(it, "recheck not sent");
        return;
    }
    FAILPOINT("recovery_before_commit", NULL);
    second_phase(it, true);
}

/* ---------------------------------------------------------------- rollback */

static void settle_cb(const pgpool_reply *r, void *arg)
{
    rec_item *it = arg;
    if (r->status != PGQ_OK) {
        /* The debit is gone already; the row stays 'pending' and the next
         * pass settles it (stale pending). */
        item_leave(it, "database unavailable while recording the decline");
        return;
    }
    it->pass->rolled_back++;
    D->stats.recoveries_rolled_back++;
    log_notice("recovery gid=%s event=rolled_back decline_code=%s", it->gid, it->decline_code);
    forget(it);
    item_done(it);
}

static void item_settle(rec_item *it)
{
    if (!it->payment_id[0]) {
        it->pass->rolled_back++;
        D->stats.recoveries_rolled_back++;
        item_done(it);
        return;
    }
    sbuf q;
    sbuf_init(&q);
    sbuf_puts(&q, "SELECT pc_pay_settle(");
    sbuf_literal(&q, it->payment_id);
    sbuf_puts(&q, ", 'declined', ");
    sbuf_literal(&q, it->decline_code);
    sbuf_puts(&q, ", ");
    sbuf_literal(&q, it->processor_ref[0] ? it->processor_ref : NULL);
    sbuf_puts(&q, ")");
    query_built("settle", &q, settle_cb, it);
}

static void rollback_cb(const pgpool_reply *r, void *arg)
{
    rec_item *it = arg;
    if (settled_elsewhere(it, r))
        return;
    if (r->status != PGQ_OK) {
        item_leave(it, r->status == PGQ_SQL_ERROR ? r->errmsg : "database unavailable during ROLLBACK PREPARED");
        return;
    }
    it->prepared = false;
    item_settle(it);
}

static void item_rollback(rec_item *it, const char *code, const char *psp_ref)
{
    snprintf(it->decline_code, sizeof(it->decline_code), "%s", code);
    if (psp_ref && psp_ref[0])
        snprintf(it->processor_ref, sizeof(it->processor_ref), "%s", psp_ref);
    if (!it->prepared) {
        item_settle(it);
        return;
    }
    second_phase(it, false);
}

/* ---------------------------------------------------------------- processor */

static void cancel_cb(const psp_result *res, void *arg)
{
    rec_item *it = arg;
    switch (res->outcome) {
    case PSP_PAYMENT:
        if (res->payment.status == PSP_ST_SUCCEEDED)
            item_commit(it, res->payment.id);
        else if (res->payment.status == PSP_ST_PENDING)
            item_leave(it, "cancel answered pending");
        else
            item_rollback(it, res->payment.decline_code[0] ? res->payment.decline_code : "canceled", res->payment.id);
        return;
    case PSP_ALREADY_SUCCEEDED:
        item_commit(it, res->payment.id);
        return;
    case PSP_UNSUPPORTED:
        if (it->age_ms >= (int64_t)D->cfg.processor_idempotency_window_s * 1000) {
            /* The key can no longer charge: roll back, and have a person
             * reconcile it against the processor's records. */
            mark_review(it, "rolled back after the idempotency window without cancel-by-key: reconcile");
            item_rollback(it, "expired_unconfirmed", NULL);
        } else {
            item_leave(it, "processor cannot cancel by key; waiting out its idempotency window");
        }
        return;
    default:
        item_leave(it, res->error[0] ? res->error : psp_outcome_name(res->outcome));
        return;
    }
}

static void item_cancel(rec_item *it)
{
    log_info("recovery gid=%s event=cancel", it->gid);
    if (psp_cancel(D->psp, it->gid, cancel_cb, it) != 0)
        item_leave(it, "cancel not sent");
}

static void get_cb(const psp_result *res, void *arg)
{
    rec_item *it = arg;
    switch (res->outcome) {
    case PSP_PAYMENT:
        switch (res->payment.status) {
        case PSP_ST_SUCCEEDED:
            item_commit(it, res->payment.id);
            return;
        case PSP_ST_DECLINED:
        case PSP_ST_CANCELED:
            item_rollback(it, res->payment.decline_code[0] ? res->payment.decline_code
                              : res->payment.status == PSP_ST_CANCELED ? "canceled" : "declined",
                          res->payment.id);
            return;
        default:
            if (it->past_deadline)
                item_cancel(it);
            else
                item_leave(it, "processor says pending");
            return;
        }
    case PSP_NOT_FOUND:
        item_cancel(it);
        return;
    default:
        item_leave(it, res->error[0] ? res->error : psp_outcome_name(res->outcome));
        return;
    }
}

static void item_ask(rec_item *it)
{
    log_info("recovery gid=%s event=check prepared=%d age_ms=%lld attempts=%d", it->gid, it->prepared,
             (long long)it->age_ms, it->attempts);
    if (psp_get(D->psp, it->gid, get_cb, it) != 0)
        item_leave(it, "status request not sent");
}

static void still_pending_cb(const pgpool_reply *r, void *arg)
{
    rec_item *it = arg;
    if (r->status != PGQ_OK) {
        item_leave(it, "database unavailable during recheck");
        return;
    }
    if (PQntuples(r->results[0]) == 0 || (!it->pass->foreign && pay_gid_is_live(it->gid))) {
        it->pass->checked--;
        log_info("recovery gid=%s event=settled_elsewhere", it->gid);
        item_done(it);
        return;
    }
    item_ask(it);
}

static void item_start(rec_item *it)
{
    it->pass->running++;
    it->pass->checked++;
    /* The listing is a snapshot: a live payment may have settled the row
     * since. Prepared items find out from the database's own answers (42704);
     * a stale pending row is read again before anything touches the processor. */
    if (!it->pass->foreign && pay_gid_is_live(it->gid)) {
        it->pass->checked--;
        item_done(it);
        return;
    }
    if (it->prepared) {
        item_ask(it);
        return;
    }
    const char *params[1] = { it->payment_id };
    if (pgpool_query_params(D->pool,
            "SELECT 1 FROM payments p WHERE p.payment_id = $1::uuid AND p.status = 'pending' "
            "AND NOT EXISTS (SELECT 1 FROM pg_prepared_xacts x WHERE x.gid = p.gid)",
            1, params, still_pending_cb, it) != PGPOOL_QUEUED)
        item_leave(it, "recheck not sent");
}

/* ---------------------------------------------------------------- pass */

static void pass_finish(rec_pass *ps);

static void item_done(rec_item *it)
{
    rec_pass *ps = it->pass;
    free(it);
    ps->running--;
    pass_pump(ps);
}

static void pass_pump(rec_pass *ps)
{
    while (ps->todo && ps->running < REC_CONCURRENCY) {
        rec_item *it = ps->todo;
        ps->todo = it->next;
        item_start(it);
    }
    if (!ps->todo && ps->running == 0)
        pass_finish(ps);
}

static void unlock_cb(const pgpool_reply *r, void *arg)
{
    if (r->status != PGQ_OK)
        log_warn("recovery event=unlock_failed node=%s", (const char *)arg);
    free(arg);
}

static void pass_finish(rec_pass *ps)
{
    if (ps != current)
        return;
    current = NULL;
    D->stats.recovery_runs++;
    if (!ps->foreign)
        D->orphans = ps->prepared_left;
    log_notice("recovery event=pass_done node=%s checked=%d committed=%d rolled_back=%d left=%d ms=%llu", ps->node,
               ps->checked, ps->committed, ps->rolled_back, ps->left,
               (unsigned long long)(pc_now_ms() - ps->started_ms));
    while (ps->waiters) {
        rec_waiter *w = ps->waiters;
        ps->waiters = w->next;
        cJSON *o = cJSON_CreateObject();
        cJSON_AddNumberToObject(o, "checked", ps->checked);
        cJSON_AddNumberToObject(o, "committed", ps->committed);
        cJSON_AddNumberToObject(o, "rolled_back", ps->rolled_back);
        cJSON_AddNumberToObject(o, "left", ps->left);
        if (ps->foreign)
            cJSON_AddStringToObject(o, "node", ps->node);
        server_reply_ok(w->r, o);
        free(w);
    }
    if (ps->foreign) {
        char *node = strdup(ps->node);
        const char *params[1] = { ps->node };
        if (!node || pgpool_query_params(D->lockpool, "SELECT pg_advisory_unlock(" REC_LOCK_CLASS ", hashtext($1))",
                                         1, params, unlock_cb, node) != PGPOOL_QUEUED)
            free(node);
    }
    /* Credits accepted while their account was locked: apply those now free. */
    query_or_log("apply_credits",
                 "SELECT pc_apply_credits(account_id) FROM (SELECT DISTINCT account_id FROM credits "
                 "WHERE status = 'accepted') a", ignore_cb, "apply_credits");
    if (!ps->foreign && !first_pass_done) {
        first_pass_done = true;
        pc_readiness_changed();
    }
    free(ps);
    schedule_tick(D->cfg.recovery_interval_ms);
}

static void list_cb(const pgpool_reply *r, void *arg)
{
    rec_pass *ps = arg;
    if (r->status != PGQ_OK) {
        log_warn("recovery event=list_failed node=%s error=\"%s\"", ps->node, r->errmsg);
        pass_finish(ps);
        return;
    }
    const PGresult *res = r->results[0];
    uint64_t now = pc_now_ms();
    rec_item **tail = &ps->todo;
    int skipped_live = 0, skipped_backoff = 0;
    for (int i = 0; i < PQntuples(res); i++) {
        const char *gid = PQgetvalue(res, i, 0);
        if (!ps->foreign && pay_gid_is_live(gid)) {
            skipped_live++;
            continue;
        }
        backoff_entry *b = strmap_get(backoff, gid);
        if (b && !ps->forced && now < b->next_ms) {
            skipped_backoff++;
            if (PQgetvalue(res, i, 2)[0] == 't')
                ps->prepared_left++;
            continue;
        }
        rec_item *it = calloc(1, sizeof(*it));
        if (!it)
            break;
        it->pass = ps;
        snprintf(it->gid, sizeof(it->gid), "%s", gid);
        snprintf(it->payment_id, sizeof(it->payment_id), "%s", PQgetvalue(res, i, 1));
        it->prepared = PQgetvalue(res, i, 2)[0] == 't';
        it->past_deadline = PQgetvalue(res, i, 3)[0] == 't';
        it->age_ms = strtoll(PQgetvalue(res, i, 4), NULL, 10);
        it->attempts = (int)strtol(PQgetvalue(res, i, 5), NULL, 10);
        *tail = it;
        tail = &it->next;
    }
    log_info("recovery event=pass_start node=%s candidates=%d skipped_live=%d skipped_backoff=%d", ps->node,
             PQntuples(res), skipped_live, skipped_backoff);
    pass_pump(ps);
}

/* Start a pass over node's gids; NULL when one is running already. */
static rec_pass *pass_start(const char *node, bool foreign, bool forced)
{
    if (current)
        return NULL;
    rec_pass *ps = calloc(1, sizeof(*ps));
    if (!ps)
        return NULL;
    snprintf(ps->node, sizeof(ps->node), "%s", node);
    ps->foreign = foreign;
    ps->forced = forced;
    ps->started_ms = pc_now_ms();
    current = ps;
    char prefix[48];
    snprintf(prefix, sizeof(prefix), "pc:%s:", node);
    const char *params[2] = { prefix, node };
    /* Prepared transactions of the node (review ones excluded: a person
     * settles those), and pending rows without a prepared transaction. */
    static const char sql[] =
        "SELECT x.gid, coalesce(p.payment_id::text, ''), true, coalesce(p.deadline < now(), true), "
        "       (extract(epoch FROM now() - x.prepared) * 1000)::bigint, coalesce(s.attempts, 0) "
        "  FROM pg_prepared_xacts x LEFT JOIN payments p ON p.gid = x.gid "
        "  LEFT JOIN recovery_state s ON s.gid = x.gid "
        " WHERE x.database = current_database() AND left(x.gid, length($1)) = $1 "
        "   AND NOT coalesce(s.review, false) "
        "UNION ALL "
        "SELECT p.gid, p.payment_id::text, false, p.deadline < now(), "
        "       (extract(epoch FROM now() - p.created_at) * 1000)::bigint, coalesce(s.attempts, 0) "
        "  FROM payments p LEFT JOIN recovery_state s ON s.gid = p.gid "
        " WHERE p.node = $2 AND p.status = 'pending' AND NOT coalesce(s.review, false) "
        "   AND NOT EXISTS (SELECT 1 FROM pg_prepared_xacts x WHERE x.gid = p.gid)";
    if (pgpool_query_params(D->pool, sql, 2, params, list_cb, ps) != PGPOOL_QUEUED) {
        current = NULL;
        free(ps);
        return NULL;
    }
    return ps;
}

/* ---------------------------------------------------------------- lock, timer */

static void lock_cb(const pgpool_reply *r, void *arg)
{
    lock_pending = false;
    if (r->status == PGQ_OK && PQgetvalue(r->results[0], 0, 0)[0] == 't') {
        if (!locked)
            log_notice("recovery event=node_lock_acquired node=%s", D->cfg.node_id);
        locked = true;
        schedule_tick(0);           /* recover at once */
        return;
    }
    if (r->status == PGQ_OK)
        log_error("recovery event=node_lock_busy node=%s alert=config "
                  "note=\"another live daemon holds this node id; not settling its gids, not taking payments\"",
                  D->cfg.node_id);
    schedule_tick(D->cfg.recovery_interval_ms);
}

static void try_lock(void)
{
    if (locked || lock_pending || !pgpool_is_up(D->lockpool))
        return;
    const char *params[1] = { D->cfg.node_id };
    if (pgpool_query_params(D->lockpool, "SELECT pg_try_advisory_lock(" REC_LOCK_CLASS ", hashtext($1))", 1, params,
                            lock_cb, NULL) == PGPOOL_QUEUED)
        lock_pending = true;
}

static void lock_state_cb(bool up, void *arg)
{
    if (!up) {
        if (locked)
            log_warn("recovery event=node_lock_lost node=%s note=\"session ended; reacquiring\"", D->cfg.node_id);
        locked = false;
        return;
    }
    try_lock();
}

static void tick_cb(evutil_socket_t fd, short what, void *arg)
{
    if (D->shutting_down)
        return;
    if (!locked) {
        try_lock();
        if (!lock_pending)
            schedule_tick(D->cfg.recovery_interval_ms);
        return;
    }
    if (!current && !pass_start(D->cfg.node_id, false, false))
        schedule_tick(D->cfg.recovery_interval_ms);
}

static void schedule_tick(int ms)
{
    struct timeval tv = { ms / 1000, (ms % 1000) * 1000 };
    evtimer_add(tick, &tv);
}

int rec_init(void)
{
    backoff = strmap_new();
    tick = evtimer_new(D->base, tick_cb, NULL);
    pgpool_config lc = { .conninfo = D->cfg.db_conninfo, .size = 1, .max_queue = 64, .connect_timeout_ms = 5000,
                         .reconnect_min_ms = 100, .reconnect_max_ms = D->cfg.db_reconnect_max_ms };
    D->lockpool = pgpool_new(D->base, &lc);
    if (!backoff || !tick || !D->lockpool)
        return -1;
    pgpool_set_state_cb(D->lockpool, lock_state_cb, NULL);
    return 0;
}

void rec_shutdown(void)
{
    if (tick)
        event_free(tick);
    tick = NULL;
    if (D->lockpool)
        pgpool_free(D->lockpool);
    D->lockpool = NULL;
    strmap_free_all(backoff);
    backoff = NULL;
}

/* ---------------------------------------------------------------- admin: recover */

static void foreign_lock_cb(const pgpool_reply *r, void *arg)
{
    pc_request *req = arg;
    if (r->status != PGQ_OK) {
        server_reply_err(req, PROTO_ERR_UNAVAILABLE, "database unavailable");
        return;
    }
    if (PQgetvalue(r->results[0], 0, 0)[0] != 't') {
        server_reply_err(req, PROTO_ERR_FORBIDDEN,
                         "node %s is alive (its lock is held); only it settles its gids", req->req.node);
        return;
    }
    log_notice("recovery event=takeover node=%s uid=%u", req->req.node, (unsigned)req->uid);
    rec_pass *ps = pass_start(req->req.node, true, true);
    rec_waiter *w = ps ? calloc(1, sizeof(*w)) : NULL;
    if (!w) {
        const char *params[1] = { req->req.node };
        char *node = strdup(req->req.node);
        if (!node || pgpool_query_params(D->lockpool, "SELECT pg_advisory_unlock(" REC_LOCK_CLASS ", hashtext($1))",
                                         1, params, unlock_cb, node) != PGPOOL_QUEUED)
            free(node);
        server_reply_err(req, PROTO_ERR_OVERLOADED, "a recovery pass is running; retry shortly");
        return;
    }
    w->r = req;
    ps->waiters = w;
}

void rec_handle_recover(pc_request *r)
{
    if (r->req.node[0] && strcmp(r->req.node, D->cfg.node_id) != 0) {
        if (current) {
            server_reply_err(r, PROTO_ERR_OVERLOADED, "a recovery pass is running; retry shortly");
            return;
        }
        const char *params[1] = { r->req.node };
        if (pgpool_query_params(D->lockpool, "SELECT pg_try_advisory_lock(" REC_LOCK_CLASS ", hashtext($1))", 1,
                                params, foreign_lock_cb, r) != PGPOOL_QUEUED)
            server_reply_err(r, PROTO_ERR_UNAVAILABLE, "database unavailable");
        return;
    }
    if (!locked) {
        server_reply_err(r, PROTO_ERR_UNAVAILABLE, "this daemon does not hold its node lock yet");
        return;
    }
    rec_pass *ps = current;
    if (!ps) {
        event_del(tick);
        ps = pass_start(D->cfg.node_id, false, true);
    }
    rec_waiter *w = ps ? calloc(1, sizeof(*w)) : NULL;
    if (!w) {
        server_reply_err(r, PROTO_ERR_UNAVAILABLE, "recovery could not start: database unavailable");
        if (!current)
            schedule_tick(D->cfg.recovery_interval_ms);
        return;
    }
    w->r = r;
    w->next = ps->waiters;
    ps->waiters = w;
}

/* ---------------------------------------------------------------- admin: prepared */

static void prepared_cb(const pgpool_reply *r, void *arg)
{
    pc_request *req = arg;
    if (r->status != PGQ_OK) {
        server_reply_err(req, PROTO_ERR_UNAVAILABLE, "database unavailable");
        return;
    }
    const PGresult *res = r->results[0];
    cJSON *o = cJSON_CreateObject();
    cJSON *arr = cJSON_AddArrayToObject(o, "transactions");
    for (int i = 0; i < PQntuples(res); i++) {
        cJSON *t = cJSON_CreateObject();
        const char *gid = PQgetvalue(res, i, 0);
        bool has_row = !PQgetisnull(res, i, 1);
        cJSON_AddStringToObject(t, "gid", gid);
        static const char *const names[] = { NULL, "payment_id", "account", "amount", "currency", "prepared_at",
                                             "age_ms", "node", "attempts", "last_error" };
        for (int c = 1; c <= 9; c++) {
            if (PQgetisnull(res, i, c))
                cJSON_AddNullToObject(t, names[c]);
            else if (c == 3 || c == 6 || c == 8)
                cJSON_AddNumberToObject(t, names[c], (double)strtoll(PQgetvalue(res, i, c), NULL, 10));
            else
                cJSON_AddStringToObject(t, names[c], PQgetvalue(res, i, c));
        }
        const char *state = "unknown";
        char ours[48];
        snprintf(ours, sizeof(ours), "pc:%s:", D->cfg.node_id);
        if (has_row && strncmp(gid, ours, strlen(ours)) == 0) {
            if (pay_gid_is_live(gid))
                state = "in_flight";
            else if (PQgetvalue(res, i, 10)[0] == 't')
                state = "review";
            else
                state = "in_doubt";
        }
        cJSON_AddStringToObject(t, "state", state);
        cJSON_AddItemToArray(arr, t);
    }
    server_reply_ok(req, o);
}

void rec_handle_prepared(pc_request *r)
{
    char older[32];
    snprintf(older, sizeof(older), "%lld", (long long)(r->req.has_older_than_ms ? r->req.older_than_ms : 0));
    const char *params[1] = { older };
    static const char sql[] =
        "SELECT x.gid, p.payment_id::text, p.account_id, p.amount::text, p.currency, "
        "       to_char(x.prepared AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), "
        "       (extract(epoch FROM now() - x.prepared) * 1000)::bigint::text, "
        "       coalesce(p.node, split_part(x.gid, ':', 2)), coalesce(s.attempts, 0)::text, s.last_error, "
        "       coalesce(s.review, false) "
        "  FROM pg_prepared_xacts x LEFT JOIN payments p ON p.gid = x.gid "
        "  LEFT JOIN recovery_state s ON s.gid = x.gid "
        " WHERE x.database = current_database() AND x.prepared <= now() - $1::bigint * interval '1 millisecond' "
        " ORDER BY x.prepared";
    if (pgpool_query_params(D->pool, sql, 1, params, prepared_cb, r) != PGPOOL_QUEUED)
        server_reply_err(r, PROTO_ERR_UNAVAILABLE, "database unavailable");
}

/* ---------------------------------------------------------------- admin: resolve */

/*
 * resolve: (1) the audit row is written first, synchronously, with outcome
 * 'requested', so no settlement by hand ever goes unrecorded; (2) COMMIT or
 * ROLLBACK PREPARED; (3) in one transaction: the audit row's outcome, the
 * decline of a rolled-back payment, and the cleared review flag.
 */
typedef struct resolve_ctx {
    pc_request *r;
    char resolution_id[24];
} resolve_ctx;

static void resolve_reply(resolve_ctx *x, const char *outcome)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "gid", x->r->req.gid);
    cJSON_AddStringToObject(o, "outcome", outcome);
    server_reply_ok(x->r, o);
    free(x);
}

static void resolve_done_cb(const pgpool_reply *r, void *arg)
{
    resolve_ctx *x = arg;
    bool commit = x->r->req.action == PROTO_ACTION_COMMIT;
    if (r->status != PGQ_OK)
        log_error("resolve gid=%s event=outcome_write_failed resolution_id=%s error=\"%s\" alert=audit",
                  x->r->req.gid, x->resolution_id, r->errmsg);
    resolve_reply(x, commit ? "committed" : "rolled_back");
}

/* Record what became of the request in its audit row (one transaction). */
static void resolve_finish(resolve_ctx *x, const char *outcome, bool settled)
{
    const proto_request *q = &x->r->req;
    sbuf s;
    sbuf_init(&s);
    sbuf_puts(&s, "BEGIN; UPDATE resolutions SET outcome = ");
    sbuf_literal(&s, outcome);
    sbuf_printf(&s, " WHERE resolution_id = %s; ", x->resolution_id);
    if (settled && q->action == PROTO_ACTION_ROLLBACK) {
        sbuf_puts(&s, "SELECT pc_pay_settle(payment_id, 'declined', 'resolved_manually', NULL) FROM payments WHERE gid = ");
        sbuf_literal(&s, q->gid);
        sbuf_puts(&s, "; ");
    }
    if (settled) {
        sbuf_puts(&s, "UPDATE recovery_state SET review = false, last_error = 'resolved by hand', updated_at = now() "
                      "WHERE gid = ");
        sbuf_literal(&s, q->gid);
        sbuf_puts(&s, "; ");
    }
    sbuf_puts(&s, "COMMIT");
    if (!sbuf_ok(&s) || pgpool_query(D->pool, sbuf_str(&s), settled ? resolve_done_cb : ignore_cb,
                                     settled ? (void *)x : (void *)"resolution outcome") != PGPOOL_QUEUED) {
        log_error("resolve gid=%s event=outcome_write_failed resolution_id=%s alert=audit", q->gid, x->resolution_id);
        if (settled)
            resolve_reply(x, q->action == PROTO_ACTION_COMMIT ? "committed" : "rolled_back");
    }
    sbuf_free(&s);
}

static void resolve_action_cb(const pgpool_reply *r, void *arg)
{
    resolve_ctx *x = arg;
    const proto_request *q = &x->r->req;
    bool commit = q->action == PROTO_ACTION_COMMIT;
    if (r->status == PGQ_OK) {
        log_notice("resolve gid=%s event=%s uid=%u resolution_id=%s reason=\"%s\"", q->gid,
                   commit ? "committed" : "rolled_back", (unsigned)x->r->uid, x->resolution_id, q->reason);
        resolve_finish(x, commit ? "committed" : "rolled_back", true);
        return;
    }
    bool missing = r->status == PGQ_SQL_ERROR && !strcmp(r->sqlstate, "42704");
    resolve_finish(x, missing ? "not_found" : r->status == PGQ_SQL_ERROR ? "failed" : "unknown", false);
    if (missing)
        server_reply_err(x->r, PROTO_ERR_NOT_FOUND, "no prepared transaction %s (settled already?)", q->gid);
    else
        server_reply_err(x->r, r->status == PGQ_SQL_ERROR ? PROTO_ERR_INTERNAL : PROTO_ERR_UNAVAILABLE,
                         "%s PREPARED failed: %s; check `prepared` before retrying", commit ? "COMMIT" : "ROLLBACK",
                         r->status == PGQ_SQL_ERROR ? r->errmsg : "database connection lost (outcome unknown)");
    free(x);
}

static void resolve_audit_start(resolve_ctx *x);

static void resolve_owner_cb(const pgpool_reply *r, void *arg)
{
    resolve_ctx *x = arg;
    const proto_request *q = &x->r->req;
    if (r->status != PGQ_OK) {
        server_reply_err(x->r, PROTO_ERR_UNAVAILABLE, "database unavailable; nothing was changed");
        free(x);
        return;
    }
    const char *node = PQgetvalue(r->results[0], 0, 0);
    bool alive = PQgetvalue(r->results[0], 0, 1)[0] == 't';
    if (strncmp(q->gid, "pc:", 3) == 0 && strcmp(node, D->cfg.node_id) != 0 && alive) {
        server_reply_err(x->r, PROTO_ERR_FORBIDDEN, "gid %s belongs to node %s, which is alive: resolve it there",
                         q->gid, node);
        free(x);
        return;
    }
    resolve_audit_start(x);
}

static void resolve_audit_cb(const pgpool_reply *r, void *arg)
{
    resolve_ctx *x = arg;
    const proto_request *q = &x->r->req;
    if (r->status != PGQ_OK || PQntuples(r->results[0]) != 1) {
        server_reply_err(x->r, PROTO_ERR_UNAVAILABLE, "could not record the resolution; nothing was changed");
        free(x);
        return;
    }
    snprintf(x->resolution_id, sizeof(x->resolution_id), "%s", PQgetvalue(r->results[0], 0, 0));
    sbuf s;
    sbuf_init(&s);
    sbuf_puts(&s, q->action == PROTO_ACTION_COMMIT ? "COMMIT PREPARED " : "ROLLBACK PREPARED ");
    sbuf_literal(&s, q->gid);
    if (!sbuf_ok(&s) || pgpool_query(D->pool, sbuf_str(&s), resolve_action_cb, x) != PGPOOL_QUEUED) {
        pgpool_reply fake = { .status = PGQ_CONN_LOST, .sqlstate = "", .errmsg = "not sent" };
        resolve_action_cb(&fake, x);
    }
    sbuf_free(&s);
}

void rec_handle_resolve(pc_request *r)
{
    const proto_request *q = &r->req;
    if (pay_gid_is_live(q->gid)) {
        server_reply_err(r, PROTO_ERR_INVALID_REQUEST,
                         "gid %s is being settled by this daemon right now; retry when `prepared` shows it in_doubt", q->gid);
        return;
    }
    resolve_ctx *x = calloc(1, sizeof(*x));
    if (!x) {
        server_reply_err(r, PROTO_ERR_INTERNAL, "out of memory");
        return;
    }
    x->r = r;
    /* Another paycoord node's gid: only while that node is dead (its lock free). */
    const char *params[1] = { q->gid };
    if (pgpool_query_params(D->pool,
            "SELECT split_part($1, ':', 2), EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' "
            "  AND classid = " REC_LOCK_CLASS " AND objsubid = 2 AND granted "
            "  AND objid = (hashtext(split_part($1, ':', 2))::bigint & 4294967295)::oid)",
            1, params, resolve_owner_cb, x) != PGPOOL_QUEUED) {
        server_reply_err(r, PROTO_ERR_UNAVAILABLE, "database unavailable; nothing was changed");
        free(x);
    }
}

static void resolve_audit_start(resolve_ctx *x)
{
    pc_request *r = x->r;
    const proto_request *q = &r->req;
    log_notice("resolve gid=%s event=requested action=%s uid=%u reason=\"%s\"", q->gid,
               q->action == PROTO_ACTION_COMMIT ? "commit" : "rollback", (unsigned)r->uid, q->reason);
    char uid[16];
    snprintf(uid, sizeof(uid), "%u", (unsigned)r->uid);
    const char *params[5] = { q->gid, q->action == PROTO_ACTION_COMMIT ? "commit" : "rollback", q->reason, uid,
                              D->cfg.node_id };
    if (pgpool_query_params(D->pool,
            "INSERT INTO resolutions (gid, payment_id, action, outcome, reason, actor_uid, node) "
            "SELECT $1, (SELECT payment_id FROM payments WHERE gid = $1), $2, 'requested', $3, $4::integer, $5 "
            "RETURNING resolution_id", 5, params, resolve_audit_cb, x) != PGPOOL_QUEUED) {
        server_reply_err(r, PROTO_ERR_UNAVAILABLE, "database unavailable; nothing was changed");
        free(x);
    }
}
