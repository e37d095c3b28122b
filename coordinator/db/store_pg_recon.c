/*
 * store_pg_recon.c - the store's statements for reconciliation (store.h,
 * "reconciliation"), on PostgreSQL: thin calls of the functions of
 * sql/006_reconciliation.sql, each answering one JSON text. A run's own
 * statements (start, pages, finish, counts) go to a pool of their own with
 * one connection (its connection budget: neither the payment path's nor
 * recovery's connections); the operators' reads and settlements run on
 * recovery's pool (CH_REC) like the other admin ops. The run lock is a
 * session advisory lock on the lock session, so it goes with the daemon.
 */
#include "store_pg.h"
#include "ctx.h"
#include "log.h"
#include "loop.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define RECON_LOCK "7357003, 1"

/* ---------------------------------------------------------------- JSON answers */

static void json_cb(const pgpool_reply *r, void *arg)
{
    spg_call *c = arg;
    st_status st = spg_status(r);
    const char *json = NULL;
    if (st == ST_OK) {
        const PGresult *res = r->results[r->nresults - 1];
        json = PQntuples(res) >= 1 && PQnfields(res) >= 1 && !PQgetisnull(res, 0, 0) ? PQgetvalue(res, 0, 0) : "null";
    }
    ((store_json_fn)c->fn)(st, r->sqlstate, r->errmsg, json, c->arg);
    free(c);
}

static int json_call(const char *sql, int n, const char *const *params, store_json_fn cb, void *arg)
{
    return spg_params(CH_REC, sql, n, params, json_cb, spg_call_new((store_any_fn)cb, arg));
}

/* ---------------------------------------------------------------- the run's own pool */

static pgpool *run_pool;

int store_recon_open(void)
{
    const pc_config *cfg = &D->cfg;
    char app[64];
    snprintf(app, sizeof(app), "paycoord/%s/recon", cfg->node_id);
    /* The same connection settings as the other pools (keepalives and
     * tcp_user_timeout included: a run must notice a dead host too). */
    pgpool_config pc = spg_pool_config(app, 1, 64);
    run_pool = pgpool_new(loop_base(), &pc);
    return run_pool ? 0 : -1;
}

void store_recon_close(void)
{
    pgpool *p = run_pool;
    run_pool = NULL;
    if (p)
        pgpool_free(p);          /* what is pending is answered with ST_SHUTDOWN */
}

static int run_call(const char *sql, int n, const char *const *params, store_json_fn cb, void *arg)
{
    spg_call *c = spg_call_new((store_any_fn)cb, arg);
    if (!c)
        return STORE_OVERLOADED;
    if (!run_pool) {
        free(c);
        return STORE_UNAVAILABLE;
    }
    int rc = pgpool_query_params(run_pool, sql, n, params, json_cb, c);
    if (rc == PGPOOL_QUEUED)
        return STORE_QUEUED;
    free(c);
    return rc == PGPOOL_UNAVAILABLE ? STORE_UNAVAILABLE : STORE_OVERLOADED;
}

/* ---------------------------------------------------------------- the run lock */

typedef void (*lock_fn)(st_status, bool, void *);

static void lock_cb(const pgpool_reply *r, void *arg)
{
    spg_call *c = arg;
    st_status st = spg_status(r);
    bool got = st == ST_OK && PQntuples(r->results[0]) == 1 && spg_bool(r->results[0], 0, 0);
    ((lock_fn)c->fn)(st, got, c->arg);
    free(c);
}

int store_recon_lock(void (*cb)(st_status st, bool got, void *), void *arg)
{
    spg_call *c = spg_call_new((store_any_fn)cb, arg);
    if (!c)
        return STORE_OVERLOADED;
    int rc = pgpool_query(spg_lock_pool(), "SELECT pg_try_advisory_lock(" RECON_LOCK ")", lock_cb, c);
    if (rc == PGPOOL_QUEUED)
        return STORE_QUEUED;
    free(c);
    return rc == PGPOOL_UNAVAILABLE ? STORE_UNAVAILABLE : STORE_OVERLOADED;
}

static void unlock_cb(const pgpool_reply *r, void *arg)
{
    (void)arg;
    if (r->status != PGQ_OK && r->status != PGQ_SHUTDOWN)
        log_warn("store event=recon_unlock_failed error=\"%s\"", r->errmsg);
}

int store_recon_unlock(void)
{
    return pgpool_query(spg_lock_pool(), "SELECT pg_advisory_unlock(" RECON_LOCK ")", unlock_cb, NULL) == PGPOOL_QUEUED
               ? STORE_QUEUED
               : STORE_UNAVAILABLE;
}

/* ---------------------------------------------------------------- runs */

#define RUN_JSON                                                                                                     \
    "json_build_object('run_id', r.run_id, 'from', extract(epoch FROM r.window_from)::bigint, "                      \
    "'to', extract(epoch FROM r.window_to)::bigint, 'source', r.source, 'path', r.source_path, "                     \
    "'trigger', r.trigger, 'state', r.state, 'cursor', r.cursor, 'pages', r.pages, 'seen', r.seen, "                 \
    "'matched', r.matched, 'in_progress', r.in_progress, 'differences', r.differences, 'not_ours', r.not_ours, "     \
    "'missing_there', r.missing_there, 'node', r.node, 'error', r.error, "                                           \
    "'started_at', to_char(r.started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), "                      \
    "'finished_at', to_char(r.finished_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'))"

int store_recon_start(const store_recon_start_req *q, store_json_fn cb, void *arg)
{
    char from[24], to[24], uid[16];
    snprintf(from, sizeof(from), "%lld", (long long)q->from_s);
    snprintf(to, sizeof(to), "%lld", (long long)q->to_s);
    snprintf(uid, sizeof(uid), "%u", q->uid);
    const char *params[9] = { from, to, q->source, q->path, q->trigger, q->node, uid,
                              q->only_if_new ? "t" : "f", q->resume_only ? "t" : "f" };
    return run_call("SELECT " RUN_JSON " FROM pc_recon_start(to_timestamp($1::bigint), to_timestamp($2::bigint), "
                     "$3, $4, $5, $6, $7::integer, $8::boolean, $9::boolean) r",
                     9, params, cb, arg);
}

int store_recon_run(int64_t run_id, store_json_fn cb, void *arg)
{
    char id[24];
    snprintf(id, sizeof(id), "%lld", (long long)run_id);
    const char *params[1] = { id };
    return run_call("SELECT " RUN_JSON " FROM recon_runs r WHERE r.run_id = $1::bigint", 1, params, cb, arg);
}

int store_recon_page(int64_t run_id, const char *prev, const char *next, const char *items_json, store_json_fn cb,
                     void *arg)
{
    char id[24];
    snprintf(id, sizeof(id), "%lld", (long long)run_id);
    const char *params[4] = { id, prev, next, items_json };
    return run_call("SELECT array_to_json(pc_recon_page($1::bigint, $2, $3, $4::jsonb))", 4, params, cb, arg);
}

int store_recon_finish(int64_t run_id, const char *error, int64_t settle_ms, store_json_fn cb, void *arg)
{
    char id[24], ms[24];
    snprintf(id, sizeof(id), "%lld", (long long)run_id);
    snprintf(ms, sizeof(ms), "%lld", (long long)settle_ms);
    const char *params[3] = { id, error, ms };
    return run_call("SELECT array_to_json(pc_recon_finish($1::bigint, $2, $3::bigint))", 3, params, cb, arg);
}

int store_recon_open_counts(store_json_fn cb, void *arg)
{
    return run_call("SELECT coalesce(json_object_agg(kind, n), '{}') FROM "
                     "(SELECT kind, count(*) AS n FROM discrepancies WHERE state = 'open' GROUP BY kind) k",
                     0, NULL, cb, arg);
}

int store_recon_runs(int limit, store_json_fn cb, void *arg)
{
    char lim[16];
    snprintf(lim, sizeof(lim), "%d", limit);
    const char *params[1] = { lim };
    return json_call("SELECT coalesce(json_agg(" RUN_JSON " ORDER BY r.run_id DESC), '[]') FROM "
                     "(SELECT * FROM recon_runs ORDER BY run_id DESC LIMIT $1::integer) r",
                     1, params, cb, arg);
}

/* ---------------------------------------------------------------- discrepancies */

int store_discrepancies(bool all, int limit, store_json_fn cb, void *arg)
{
    char lim[16];
    snprintf(lim, sizeof(lim), "%d", limit);
    const char *params[2] = { all ? "t" : "f", lim };
    return json_call(
        "SELECT coalesce(json_agg(json_build_object('id', d.discrepancy_id, 'kind', d.kind, 'gid', d.gid, "
        "'payment_id', d.payment_id, 'account', d.account_id, 'state', d.state, 'detail', d.detail, "
        "'ours', d.ours, 'theirs', d.theirs, 'resolution', d.resolution, "
        "'first_seen', to_char(d.first_seen AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), "
        "'last_seen', to_char(d.last_seen AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), "
        "'first_run', d.first_run, 'last_run', d.last_run) ORDER BY d.discrepancy_id), '[]') "
        "FROM (SELECT * FROM discrepancies WHERE $1::boolean OR state = 'open' ORDER BY discrepancy_id "
        "LIMIT $2::integer) d",
        2, params, cb, arg);
}

int store_settle_begin(int64_t discrepancy_id, const char *action, const char *account, const char *reason,
                       unsigned uid, const char *node, store_json_fn cb, void *arg)
{
    char id[24], u[16];
    snprintf(id, sizeof(id), "%lld", (long long)discrepancy_id);
    snprintf(u, sizeof(u), "%u", uid);
    const char *params[6] = { id, action, reason, u, node, account };
    return json_call("WITH s AS (INSERT INTO discrepancy_settlements (discrepancy_id, action, outcome, reason, "
                     "actor_uid, node, account_id) SELECT discrepancy_id, $2, 'requested', $3, $4::integer, $5, $6 "
                     "FROM discrepancies WHERE discrepancy_id = $1::bigint RETURNING settlement_id) "
                     "SELECT (SELECT json_build_object('settlement_id', settlement_id) FROM s)",
                     6, params, cb, arg);
}

int store_settle_do(int64_t settlement_id, store_json_fn cb, void *arg)
{
    char id[24];
    snprintf(id, sizeof(id), "%lld", (long long)settlement_id);
    const char *params[1] = { id };
    return json_call("SELECT pc_discrepancy_settle($1::bigint)", 1, params, cb, arg);
}

int store_settle_failed(int64_t settlement_id, const char *why, store_json_fn cb, void *arg)
{
    char id[24];
    snprintf(id, sizeof(id), "%lld", (long long)settlement_id);
    const char *params[2] = { id, why };
    return json_call("UPDATE discrepancy_settlements SET outcome = 'failed: ' || left($2, 400), finished_at = now() "
                     "WHERE settlement_id = $1::bigint AND outcome = 'requested' RETURNING true",
                     2, params, cb, arg);
}

/* ---------------------------------------------------------------- audit */

int store_audit(const char *account, store_json_fn cb, void *arg)
{
    const char *params[1] = { account };
    return json_call("SELECT coalesce(json_agg(json_build_object('check', check_name, 'account', account_id, "
                     "'subject', subject, 'detail', detail)), '[]') FROM pc_audit($1)",
                     1, params, cb, arg);
}
