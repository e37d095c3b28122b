/*
 * store_pg_rec.c - the store's statements for recovery, the node lock and the
 * operators' ops (store.h), on PostgreSQL. They run on recovery's own pool
 * (CH_REC) or the lock session, never on the payment path's connections.
 */
#include "store_pg.h"
#include "ctx.h"
#include "log.h"
#include "sbuf.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LOCK_CLASS "7357002"

typedef void (*lock_fn)(st_status, bool, void *);

/* ---------------------------------------------------------------- node lock */

static pgpool *lock_pool(void) { return spg_lock_pool(); }

static void bool_cb(const pgpool_reply *r, void *arg)
{
    spg_call *c = arg;
    st_status st = spg_status(r);
    bool v = st == ST_OK && PQntuples(r->results[0]) == 1 && spg_bool(r->results[0], 0, 0);
    ((lock_fn)c->fn)(st, v, c->arg);
    free(c);
}

typedef void (*got_fn)(st_status, bool, int, void *);

static void got_cb(const pgpool_reply *r, void *arg)
{
    spg_call *c = arg;
    st_status st = spg_status(r);
    bool ok = st == ST_OK && PQntuples(r->results[0]) == 1;
    ((got_fn)c->fn)(st, ok && spg_bool(r->results[0], 0, 0), ok ? (int)spg_int(r->results[0], 0, 1) : 0, c->arg);
    free(c);
}

int store_node_lock(const char *node, void (*cb)(st_status st, bool got, int pid, void *), void *arg)
{
    const char *params[1] = { node };
    spg_call *c = spg_call_new((store_any_fn)cb, arg);
    if (!c)
        return STORE_OVERLOADED;
    int rc = pgpool_query_params(lock_pool(), "SELECT pg_try_advisory_lock(" LOCK_CLASS ", hashtext($1)), pg_backend_pid()",
                                 1, params, got_cb, c);
    if (rc == PGPOOL_QUEUED)
        return STORE_QUEUED;
    free(c);
    return rc == PGPOOL_UNAVAILABLE ? STORE_UNAVAILABLE : STORE_OVERLOADED;
}

static void unlock_cb(const pgpool_reply *r, void *arg)
{
    if (r->status != PGQ_OK && r->status != PGQ_SHUTDOWN)
        log_warn("store event=unlock_failed node=%s", (const char *)arg);
    free(arg);
}

int store_node_unlock(const char *node)
{
    char *copy = strdup(node);
    const char *params[1] = { node };
    if (!copy || pgpool_query_params(lock_pool(), "SELECT pg_advisory_unlock(" LOCK_CLASS ", hashtext($1))", 1,
                                     params, unlock_cb, copy) != PGPOOL_QUEUED) {
        free(copy);
        return STORE_UNAVAILABLE;
    }
    return STORE_QUEUED;
}

int store_node_alive(store_chan ch, const char *node, void (*cb)(st_status st, bool alive, void *), void *arg)
{
    const char *params[1] = { node };
    return spg_params(ch,
                      "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND classid = " LOCK_CLASS
                      " AND objsubid = 2 AND granted AND objid = (hashtext($1)::bigint & 4294967295)::oid)",
                      1, params, bool_cb, spg_call_new((store_any_fn)cb, arg));
}

#define LOCK_MATCH \
    "locktype = 'advisory' AND classid = " LOCK_CLASS " AND objsubid = 2 AND granted " \
    "AND objid = (hashtext($1)::bigint & 4294967295)::oid AND database = (SELECT oid FROM pg_database " \
    "WHERE datname = current_database())"

typedef void (*check_fn)(st_status, int, bool, void *);

static void lock_check_cb(const pgpool_reply *r, void *arg)
{
    spg_call *c = arg;
    st_status st = spg_status(r);
    bool ok = st == ST_OK && PQntuples(r->results[0]) == 1;
    ((check_fn)c->fn)(st, ok ? (int)spg_int(r->results[0], 0, 0) : 0, ok && spg_bool(r->results[0], 0, 1), c->arg);
    free(c);
}

int store_node_lock_check(const char *node, void (*cb)(st_status st, int my_pid, bool held_by_me, void *), void *arg)
{
    const char *params[1] = { node };
    spg_call *c = spg_call_new((store_any_fn)cb, arg);
    if (!c)
        return STORE_OVERLOADED;
    int rc = pgpool_query_params(lock_pool(),
                                 "SELECT pg_backend_pid(), EXISTS (SELECT 1 FROM pg_locks WHERE " LOCK_MATCH
                                 " AND pid = pg_backend_pid())", 1, params, lock_check_cb, c);
    if (rc == PGPOOL_QUEUED)
        return STORE_QUEUED;
    free(c);
    return rc == PGPOOL_UNAVAILABLE ? STORE_UNAVAILABLE : STORE_OVERLOADED;
}

typedef void (*holder_fn)(st_status, int, int, void *);

static void holder_cb(const pgpool_reply *r, void *arg)
{
    spg_call *c = arg;
    st_status st = spg_status(r);
    bool ok = st == ST_OK && PQntuples(r->results[0]) == 1;
    ((holder_fn)c->fn)(st, ok ? (int)spg_int(r->results[0], 0, 0) : 0, ok ? (int)spg_int(r->results[0], 0, 1) : 0,
                       c->arg);
    free(c);
}

int store_node_lock_holder(store_chan ch, const char *node,
                           void (*cb)(st_status st, int my_pid, int holder_pid, void *), void *arg)
{
    const char *params[1] = { node };
    return spg_params(ch,
                      "SELECT pg_backend_pid(), coalesce((SELECT max(pid) FROM pg_locks WHERE " LOCK_MATCH "), 0)",
                      1, params, holder_cb, spg_call_new((store_any_fn)cb, arg));
}

static void evict_cb(const pgpool_reply *r, void *arg)
{
    (void)arg;
    /* Under transaction pooling the statement may run on the very backend
     * it ends (57P01): that is the eviction too. */
    if (r->status != PGQ_OK && r->status != PGQ_SHUTDOWN && strcmp(r->sqlstate, "57P01") != 0 && !spg_closing())
        log_warn("store event=node_lock_evict_failed error=\"%s\"", r->errmsg);
}

void store_node_lock_evict(const char *node, int holder_pid)
{
    char pid[16];
    snprintf(pid, sizeof(pid), "%d", holder_pid);
    const char *params[2] = { node, pid };
    if (pgpool_query_params(spg_pool(CH_REC),
                            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE " LOCK_MATCH " AND pid = $2::integer",
                            2, params, evict_cb, NULL) != PGPOOL_QUEUED)
        log_warn("store event=node_lock_evict_failed error=\"not sent\"");
}

/* ---------------------------------------------------------------- replication safety */

typedef void (*repl_fn)(const store_replication *, void *);

static void replication_cb(const pgpool_reply *r, void *arg)
{
    spg_call *c = arg;
    store_replication f = { .st = spg_status(r), .errmsg = r->errmsg, .sync_names = "", .sync_commit = "",
                            .standby_list = "" };
    if (f.st == ST_OK && PQntuples(r->results[0]) == 1) {
        const PGresult *res = r->results[0];
        f.in_recovery = spg_bool(res, 0, 0);
        f.sync_names = PQgetvalue(res, 0, 1);
        f.sync_commit = PQgetvalue(res, 0, 2);
        f.standbys = (int)spg_int(res, 0, 3);
        f.sync_standbys = PQgetisnull(res, 0, 4) ? -1 : (int)spg_int(res, 0, 4);
        f.standby_list = PQgetvalue(res, 0, 5);
    } else if (f.st == ST_OK) {
        f.st = ST_ERROR;
        f.errmsg = "replication query returned no row";
    }
    ((repl_fn)c->fn)(&f, c->arg);
    free(c);
}

int store_replication_facts(void (*cb)(const store_replication *, void *), void *arg)
{
    /* pg_stat_replication shows every walsender to anyone, but its state
     * columns only to roles with pg_read_all_stats (pg_monitor): without,
     * sync_state is NULL and sync_standbys comes back NULL. A base backup's
     * walsenders (pg_basebackup) are not standbys. */
    static const char sql[] =
        "WITH s AS (SELECT * FROM pg_stat_replication WHERE coalesce(state, '') <> 'backup' "
        "             AND application_name IS DISTINCT FROM 'pg_basebackup') "
        "SELECT pg_is_in_recovery(), current_setting('synchronous_standby_names'), "
        "       current_setting('synchronous_commit'), "
        "       (SELECT count(*) FROM s), "
        "       (SELECT CASE WHEN count(*) > 0 AND count(sync_state) = 0 THEN NULL "
        "               ELSE count(*) FILTER (WHERE sync_state IN ('sync', 'quorum')) END FROM s), "
        "       coalesce((SELECT string_agg(coalesce(nullif(application_name, ''), '?') || ':' || "
        "                  coalesce(state, '?') || ':' || coalesce(sync_state, '?'), ',' ORDER BY application_name) "
        "                  FROM s), '')";
    return spg_query(CH_REC, sql, replication_cb, spg_call_new((store_any_fn)cb, arg));
}

/* ---------------------------------------------------------------- recovery list */

typedef void (*list_fn)(const store_rec_list *, void *);

static void list_cb(const pgpool_reply *r, void *arg)
{
    spg_call *c = arg;
    store_rec_list l = { .st = spg_status(r), .errmsg = r->errmsg };
    store_rec_item *items = NULL;
    if (l.st == ST_OK) {
        const PGresult *res = r->results[0];
        int n = PQntuples(res);
        items = n ? calloc((size_t)n, sizeof(*items)) : NULL;
        if (n && !items) {
            l.st = ST_ERROR;
            l.errmsg = "out of memory";
        } else {
            for (int i = 0; i < n; i++) {
                items[i] = (store_rec_item){
                    .gid = PQgetvalue(res, i, 0), .payment_id = PQgetvalue(res, i, 1),
                    .row_status = PQgetvalue(res, i, 2), .prepared = spg_bool(res, i, 3),
                    .debited = spg_bool(res, i, 4), .review = spg_bool(res, i, 5),
                    .past_deadline = spg_bool(res, i, 6), .age_ms = spg_int(res, i, 7),
                    .attempts = (int)spg_int(res, i, 8), .since_deadline_ms = spg_int(res, i, 9),
                    .processor_ref = spg_text(res, i, 10), .account = PQgetvalue(res, i, 11),
                    .currency = PQgetvalue(res, i, 12), .reference = spg_text(res, i, 13),
                    .amount = spg_int(res, i, 15),
                };
                /* metadata is jsonb: parsed here, freed after the callback */
                const char *m = spg_text(res, i, 14);
                items[i].metadata = m ? cJSON_Parse(m) : NULL;
            }
            l.n = n;
            l.items = items;
        }
    }
    ((list_fn)c->fn)(&l, c->arg);
    for (int i = 0; items && i < l.n; i++)
        cJSON_Delete((cJSON *)items[i].metadata);
    free(items);
    free(c);
}

int store_rec_list_node(const char *node, void (*cb)(const store_rec_list *, void *), void *arg)
{
    char prefix[48];
    snprintf(prefix, sizeof(prefix), "pc:%s:", node);
    const char *params[2] = { prefix, node };
    /* Every prepared transaction of the node (review ones included: they hold
     * slots), and rows still 'pending' without one: stale intents, declines
     * whose row write was lost, and committed debits whose row was not
     * brought up to date. */
    static const char sql[] =
        "SELECT x.gid, coalesce(p.payment_id::text, ''), coalesce(p.status, ''), true, false, "
        "       coalesce(s.review, false), coalesce(p.deadline < now(), true), "
        "       (extract(epoch FROM now() - x.prepared) * 1000)::bigint, coalesce(s.attempts, 0), "
        "       (extract(epoch FROM now() - coalesce(p.deadline, x.prepared)) * 1000)::bigint, "
        "       p.processor_ref, coalesce(p.account_id, ''), coalesce(p.currency, ''), p.reference, "
        "       p.metadata::text, coalesce(p.amount, 0) "
        "  FROM pg_prepared_xacts x LEFT JOIN payments p ON p.gid = x.gid "
        "  LEFT JOIN recovery_state s ON s.gid = x.gid "
        " WHERE x.database = current_database() AND left(x.gid, length($1)) = $1 "
        "UNION ALL "
        "SELECT p.gid, p.payment_id::text, p.status, false, "
        "       EXISTS (SELECT 1 FROM ledger l WHERE l.payment_id = p.payment_id), "
        "       coalesce(s.review, false), p.deadline < now(), "
        "       (extract(epoch FROM now() - p.created_at) * 1000)::bigint, coalesce(s.attempts, 0), "
        "       (extract(epoch FROM now() - p.deadline) * 1000)::bigint, "
        "       p.processor_ref, p.account_id, p.currency, p.reference, p.metadata::text, p.amount "
        "  FROM payments p LEFT JOIN recovery_state s ON s.gid = p.gid "
        " WHERE p.node = $2 AND p.status = 'pending' "
        "   AND NOT EXISTS (SELECT 1 FROM pg_prepared_xacts x WHERE x.gid = p.gid)";
    return spg_params(CH_REC, sql, 2, params, list_cb, spg_call_new((store_any_fn)cb, arg));
}

typedef void (*st_fn)(st_status, void *);

static void st_cb(const pgpool_reply *r, void *arg)
{
    spg_call *c = arg;
    ((st_fn)c->fn)(spg_status(r), c->arg);
    free(c);
}

int store_rec_mark_succeeded(const char *payment_id, const char *processor_ref, void (*cb)(st_status st, void *),
                             void *arg)
{
    const char *params[2] = { payment_id, processor_ref };
    return spg_params(CH_REC,
                      "UPDATE payments SET status = 'succeeded', processor_ref = coalesce($2, processor_ref), "
                      "updated_at = now() WHERE payment_id = $1::uuid AND status = 'pending' "
                      "AND EXISTS (SELECT 1 FROM ledger l WHERE l.payment_id = $1::uuid)",
                      2, params, st_cb, spg_call_new((store_any_fn)cb, arg));
}

/* ---------------------------------------------------------------- admin */

typedef void (*plist_fn)(const store_prepared_list *, void *);

static void prepared_cb(const pgpool_reply *r, void *arg)
{
    spg_call *c = arg;
    store_prepared_list l = { .st = spg_status(r), .errmsg = r->errmsg };
    store_prepared_row *rows = NULL;
    if (l.st == ST_OK) {
        const PGresult *res = r->results[0];
        int n = PQntuples(res);
        rows = n ? calloc((size_t)n, sizeof(*rows)) : NULL;
        if (n && !rows) {
            l.st = ST_ERROR;
            l.errmsg = "out of memory";
        } else {
            for (int i = 0; i < n; i++) {
                rows[i] = (store_prepared_row){
                    .gid = PQgetvalue(res, i, 0), .payment_id = spg_text(res, i, 1), .account = spg_text(res, i, 2),
                    .has_amount = !PQgetisnull(res, i, 3), .amount = spg_int(res, i, 3),
                    .currency = spg_text(res, i, 4), .prepared_at = spg_text(res, i, 5), .age_ms = spg_int(res, i, 6),
                    .node = spg_text(res, i, 7), .attempts = (int)spg_int(res, i, 8), .last_error = spg_text(res, i, 9),
                    .review = spg_bool(res, i, 10),
                };
            }
            l.n = n;
            l.rows = rows;
        }
    }
    ((plist_fn)c->fn)(&l, c->arg);
    free(rows);
    free(c);
}

int store_prepared_list_all(int64_t older_than_ms, void (*cb)(const store_prepared_list *, void *), void *arg)
{
    char older[32];
    snprintf(older, sizeof(older), "%lld", (long long)older_than_ms);
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
    return spg_params(CH_REC, sql, 1, params, prepared_cb, spg_call_new((store_any_fn)cb, arg));
}

typedef void (*begin_fn)(st_status, int64_t, void *);

static void begin_cb(const pgpool_reply *r, void *arg)
{
    spg_call *c = arg;
    st_status st = spg_status(r);
    int64_t id = -1;
    if (st == ST_OK && PQntuples(r->results[0]) == 1)
        id = spg_int(r->results[0], 0, 0);
    else if (st == ST_OK)
        st = ST_ERROR;
    ((begin_fn)c->fn)(st, id, c->arg);
    free(c);
}

int store_resolve_begin(const char *gid, bool commit, const char *reason, unsigned uid, const char *node,
                        void (*cb)(st_status st, int64_t resolution_id, void *), void *arg)
{
    char u[16];
    snprintf(u, sizeof(u), "%u", uid);
    const char *params[5] = { gid, commit ? "commit" : "rollback", reason, u, node };
    return spg_params(CH_REC,
                      "INSERT INTO resolutions (gid, payment_id, action, outcome, reason, actor_uid, node) "
                      "SELECT $1, (SELECT payment_id FROM payments WHERE gid = $1), $2, 'requested', $3, "
                      "$4::integer, $5 RETURNING resolution_id",
                      5, params, begin_cb, spg_call_new((store_any_fn)cb, arg));
}

int store_resolve_end(int64_t resolution_id, const char *gid, const char *outcome, bool settled, bool rolled_back,
                      void (*cb)(st_status st, void *), void *arg)
{
    sbuf s;
    sbuf_init(&s);
    sbuf_printf(&s, "BEGIN; UPDATE resolutions SET outcome = ");
    sbuf_literal(&s, outcome);
    sbuf_printf(&s, " WHERE resolution_id = %lld; ", (long long)resolution_id);
    if (settled && rolled_back) {
        sbuf_puts(&s, "SELECT pc_pay_settle2(payment_id, 'declined', 'resolved_manually', NULL, NULL, NULL, NULL, "
                      "NULL, NULL, NULL, NULL, NULL, NULL, NULL) FROM payments WHERE gid = ");
        sbuf_literal(&s, gid);
        sbuf_puts(&s, "; ");
    } else if (settled) {
        sbuf_puts(&s, "UPDATE payments p SET status = 'succeeded', updated_at = now() WHERE p.gid = ");
        sbuf_literal(&s, gid);
        sbuf_puts(&s, " AND p.status = 'pending' AND EXISTS (SELECT 1 FROM ledger l WHERE l.payment_id = p.payment_id); ");
    }
    if (settled) {
        sbuf_puts(&s, "UPDATE recovery_state SET review = false, last_error = 'resolved by hand', updated_at = now() "
                      "WHERE gid = ");
        sbuf_literal(&s, gid);
        sbuf_puts(&s, "; ");
    }
    sbuf_puts(&s, "COMMIT");
    int rc = sbuf_ok(&s) ? spg_query(CH_REC, sbuf_str(&s), st_cb, spg_call_new((store_any_fn)cb, arg))
                         : STORE_OVERLOADED;
    sbuf_free(&s);
    return rc;
}
