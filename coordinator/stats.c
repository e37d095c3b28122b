/*
 * stats.c - every counter and gauge the daemon exposes, described once (one
 * table), rendered two ways: the `stats` op's JSON object and the Prometheus
 * text of GET /metrics. The node's prepared transactions in the database and
 * the oldest one's age are refreshed from pg_prepared_xacts every 5 s on
 * recovery's connections, so neither output ever waits on the database.
 */
#include "stats.h"
#include "access.h"
#include "circuit.h"
#include "ctx.h"
#include "dbsafety.h"
#include "loop.h"
#include "nodelock.h"
#include "payment.h"
#include "proc.h"
#include "recon.h"
#include "recovery.h"
#include "store.h"

#include <stddef.h>
#include <stdio.h>
#include <string.h>

#define REFRESH_MS 5000

static loop_timer refresh;
static bool refreshing;
static int64_t prepared_db = -1;
static double oldest_s;

/* ---------------------------------------------------------------- values */

static double v_in_flight(void) { return pay_in_flight(); }
static double v_prepared_live(void) { return pay_prepared(); }
static double v_orphans(void) { return rec_orphans(); }
static double v_prepared_db(void) { return (double)prepared_db; }
static double v_oldest(void) { return oldest_s; }
static double v_max_in_flight(void) { return D->cfg.max_in_flight; }
static double v_max_prepared(void) { return D->max_prepared_server; }
static double v_prepared_limit(void) { return D->prepared_limit; }
static double v_clients(void) { return D->nclients; }
static double v_proc_in_flight(void) { return proc_in_flight(); }
static double v_p50(void) { return circuit_latency_percentile(50); }
static double v_p99(void) { return circuit_latency_percentile(99); }
static double v_circuit(void) { return circuit_get() == CIRCUIT_OPEN ? 2 : circuit_get() == CIRCUIT_HALF_OPEN ? 1 : 0; }
static double v_lock(void) { return rec_node_locked(); }
static double v_running(void) { return rec_busy(); }
static double v_db_up(void) { return store_is_up(); }
static double v_db_stuck(void) { return store_is_stuck(NULL); }
static double v_repl_unsafe(void)
{
    return dbsafety_state() == REPL_ASYNCHRONOUS || dbsafety_state() == REPL_READ_ONLY;
}
static double v_standbys(void) { return dbsafety_standbys(); }
static double v_sync_standbys(void) { return dbsafety_sync_standbys(); }
static double v_pooled(void) { return nodelock_get_state() == NODELOCK_POOLED; }
static double v_recon_running(void) { return recon_running(); }
static double v_recon_run_id(void) { return (double)recon_run_id(); }
static double v_recon_pages(void) { return (double)recon_pages(); }
static double v_recon_seen(void) { return (double)recon_seen(); }
static double v_open_cnd(void) { return (double)recon_open("charged_not_debited"); }
static double v_open_dnc(void) { return (double)recon_open("debited_not_charged"); }
static double v_open_amt(void) { return (double)recon_open("amount_mismatch"); }
static double v_open_unk(void) { return (double)recon_open("unknown_gid"); }
static double v_open_rev(void) { return (double)recon_open("review"); }
static double v_uptime(void) { return (double)(loop_now_ms() - D->started_ms); }

static store_pool_stats pool_of(store_chan ch)
{
    store_pool_stats s;
    store_pool_stats_get(ch, &s);
    return s;
}
static double v_pool_size(void) { return pool_of(CH_PAY).size; }
static double v_pool_connected(void) { return pool_of(CH_PAY).connected; }
static double v_pool_busy(void) { return pool_of(CH_PAY).busy; }
static double v_pool_queued(void) { return pool_of(CH_PAY).queued; }
static double v_rpool_connected(void) { return pool_of(CH_REC).connected; }
static double v_rpool_busy(void) { return pool_of(CH_REC).busy; }

#define NO_OFF ((size_t)-1)
#define S(field) offsetof(pc_stats, field), NULL
#define F(fn) NO_OFF, fn

typedef struct stat_def {
    const char *json;                /* dotted path in the stats object, or NULL */
    bool json_bool;
    const char *prom;                /* metric name, or NULL; HELP/TYPE from its first entry */
    const char *labels;
    const char *type;
    const char *help;
    size_t off;                      /* into pc_stats (uint64_t), or NO_OFF */
    double (*fn)(void);
} stat_def;

static const stat_def defs[] = {
    { "payments.succeeded", false, "paycoord_payments_total", "status=\"succeeded\"", "counter",
      "Payments that reached a final status, by status.", S(payments_succeeded) },
    { "payments.declined", false, "paycoord_payments_total", "status=\"declined\"", "counter", NULL,
      S(payments_declined) },
    { "payments.insufficient_funds", false, "paycoord_payments_total", "status=\"insufficient_funds\"", "counter",
      NULL, S(payments_insufficient) },
    { "payments.answered_pending", false, "paycoord_payments_answered_pending_total", "", "counter",
      "Pay requests answered 'pending' because wait_ms ran out.", S(payments_left_pending) },
    { "payments.replays", false, "paycoord_replays_total", "", "counter",
      "Requests answered from an earlier payment or credit with the same key and parameters.", S(replays) },
    { "in_flight", false, "paycoord_payments_in_flight", "", "gauge", "Payments in progress in this daemon.",
      F(v_in_flight) },
    { "max_in_flight", false, NULL, NULL, NULL, NULL, F(v_max_in_flight) },
    { "prepared", false, "paycoord_prepared_live", "", "gauge",
      "Prepared debits driven by live payments of this daemon.", F(v_prepared_live) },
    { "orphans", false, "paycoord_prepared_orphans", "", "gauge",
      "Prepared transactions of this node that no live payment drives (recovery's, review ones included).",
      F(v_orphans) },
    { "prepared_in_database", false, "paycoord_prepared_transactions", "", "gauge",
      "Prepared transactions of this node in the database (refreshed every 5 s; -1 unknown).", F(v_prepared_db) },
    { "prepared_oldest_age_s", false, "paycoord_prepared_oldest_age_seconds", "", "gauge",
      "Age of this node's oldest prepared transaction.", F(v_oldest) },
    { "max_prepared_transactions", false, NULL, NULL, NULL, NULL, F(v_max_prepared) },
    { "prepared_limit", false, "paycoord_prepared_limit", "", "gauge",
      "Share of max_prepared_transactions this node may use.", F(v_prepared_limit) },
    { "credits.applied", false, "paycoord_credits_total", "status=\"applied\"", "counter",
      "Credits applied to a balance, and accepted to be applied later.", S(credits_applied) },
    { "credits.accepted", false, "paycoord_credits_total", "status=\"accepted\"", "counter", NULL,
      S(credits_accepted) },
    { "pool.size", false, "paycoord_pool_connections", "state=\"size\"", "gauge",
      "Payment path's database pool connections by state.", F(v_pool_size) },
    { "pool.connected", false, "paycoord_pool_connections", "state=\"connected\"", "gauge", NULL,
      F(v_pool_connected) },
    { "pool.busy", false, "paycoord_pool_connections", "state=\"busy\"", "gauge", NULL, F(v_pool_busy) },
    { "pool.queued", false, "paycoord_pool_queued", "", "gauge", "Queries waiting for a pool connection.",
      F(v_pool_queued) },
    { "pool.stuck", true, "paycoord_database_stuck", "", "gauge",
      "1 when a query of the payment pool has run longer than db_stuck_ms.", F(v_db_stuck) },
    { "recovery_pool.connected", false, "paycoord_recovery_pool_connections", "state=\"connected\"", "gauge",
      "Recovery's own database connections by state.", F(v_rpool_connected) },
    { "recovery_pool.busy", false, "paycoord_recovery_pool_connections", "state=\"busy\"", "gauge", NULL,
      F(v_rpool_busy) },
    { NULL, false, "paycoord_database_up", "", "gauge", "1 when at least one pool connection is up.", F(v_db_up) },
    { "database.replication_unsafe", true, "paycoord_database_replication_unsafe", "", "gauge",
      "1 when the primary has standbys that are not synchronous for paycoord's commits (a failover can lose "
      "payments), or paycoord is connected to a standby (docs/ha.md).", F(v_repl_unsafe) },
    { "database.standbys", false, "paycoord_database_standbys", "", "gauge",
      "Standbys connected to the primary at the last safety check (-1 unknown).", F(v_standbys) },
    { "database.sync_standbys", false, "paycoord_database_sync_standbys", "", "gauge",
      "Of those, synchronous ones (-1 unknown, or not visible without pg_monitor).", F(v_sync_standbys) },
    { "database.transaction_pooling", true, "paycoord_database_transaction_pooling", "", "gauge",
      "1 when the node lock was found not to hold through the connection (a pooler in transaction mode): "
      "no payments are taken.", F(v_pooled) },
    { "processor.calls", false, "paycoord_processor_calls_total", "", "counter",
      "Processor calls answered (any outcome).", S(processor_calls) },
    { "processor.failures", false, "paycoord_processor_failures_total", "", "counter",
      "Processor calls that failed: unknown outcome (timeout, 5xx, reset), 401/403, failed polls and cancels.",
      S(processor_failures) },
    { "processor.rate_limited", false, "paycoord_processor_rate_limited_total", "", "counter",
      "Processor answers 429 (counted apart from failures; they do not open the circuit).",
      S(processor_rate_limited) },
    { "processor.bad_answers", false, "paycoord_processor_bad_answers_total", "", "counter",
      "Processor answers that could not be read as its API (malformed, for another key, an unknown status, an error "
      "in a 200, oversized): unknown outcomes, never declines.", S(processor_bad_answers) },
    { "processor.in_flight", false, "paycoord_processor_in_flight", "", "gauge", "Processor requests open.",
      F(v_proc_in_flight) },
    { "webhooks.accepted", false, "paycoord_webhooks_total", "result=\"accepted\"", "counter",
      "Webhook events by result: accepted (new, stored), duplicate (stored before), rejected (unsigned or wrongly "
      "signed: nothing changed), malformed, failed (not stored: the processor retries).", S(webhooks_accepted) },
    { "webhooks.duplicates", false, "paycoord_webhooks_total", "result=\"duplicate\"", "counter", NULL,
      S(webhooks_duplicates) },
    { "webhooks.rejected", false, "paycoord_webhooks_total", "result=\"rejected\"", "counter", NULL,
      S(webhooks_rejected) },
    { "webhooks.malformed", false, "paycoord_webhooks_total", "result=\"malformed\"", "counter", NULL,
      S(webhooks_malformed) },
    { "webhooks.failed", false, "paycoord_webhooks_total", "result=\"failed\"", "counter", NULL,
      S(webhooks_failed) },
    { "webhooks.deliveries", false, "paycoord_webhook_deliveries_total", "", "counter",
      "Webhook deliveries (HTTP requests) received.", S(webhooks_received) },
    { "processor.latency_p50_ms_le", false, NULL, NULL, NULL, NULL, F(v_p50) },
    { "processor.latency_p99_ms_le", false, NULL, NULL, NULL, NULL, F(v_p99) },
    { NULL, false, "paycoord_circuit_state", "", "gauge", "Processor circuit: 0 closed, 1 half-open, 2 open.",
      F(v_circuit) },
    { "recovery.runs", false, "paycoord_recovery_runs_total", "", "counter", "Recovery passes finished.",
      S(recovery_runs) },
    { "recovery.node_lock", true, "paycoord_node_lock_held", "", "gauge",
      "1 while this daemon holds its node's advisory lock.", F(v_lock) },
    { "recovery.running", true, NULL, NULL, NULL, NULL, F(v_running) },
    { "recovery.committed", false, "paycoord_recoveries_total", "outcome=\"committed\"", "counter",
      "Recovery outcomes per payment.", S(recoveries_committed) },
    { "recovery.rolled_back", false, "paycoord_recoveries_total", "outcome=\"rolled_back\"", "counter", NULL,
      S(recoveries_rolled_back) },
    { "recovery.left", false, "paycoord_recoveries_total", "outcome=\"left\"", "counter", NULL,
      S(recoveries_left) },
    { "reconciliation.running", true, "paycoord_reconciliation_running", "", "gauge",
      "1 while this daemon drives a reconciliation run.", F(v_recon_running) },
    { "reconciliation.run_id", false, NULL, NULL, NULL, NULL, F(v_recon_run_id) },
    { "reconciliation.pages", false, NULL, NULL, NULL, NULL, F(v_recon_pages) },
    { "reconciliation.seen", false, "paycoord_reconciliation_records_read", "", "gauge",
      "Processor records the running reconciliation run has read so far.", F(v_recon_seen) },
    { "reconciliation.runs", false, "paycoord_reconciliation_runs_total", "", "counter",
      "Reconciliation runs this daemon finished (done or failed).", S(recon_runs) },
    { "reconciliation.open.charged_not_debited", false, "paycoord_discrepancies_open",
      "kind=\"charged_not_debited\"", "gauge",
      "Open discrepancies by kind (docs/reconciliation.md); -1 until first counted.", F(v_open_cnd) },
    { "reconciliation.open.debited_not_charged", false, "paycoord_discrepancies_open",
      "kind=\"debited_not_charged\"", "gauge", NULL, F(v_open_dnc) },
    { "reconciliation.open.amount_mismatch", false, "paycoord_discrepancies_open", "kind=\"amount_mismatch\"",
      "gauge", NULL, F(v_open_amt) },
    { "reconciliation.open.unknown_gid", false, "paycoord_discrepancies_open", "kind=\"unknown_gid\"", "gauge",
      NULL, F(v_open_unk) },
    { "reconciliation.open.review", false, "paycoord_discrepancies_open", "kind=\"review\"", "gauge", NULL,
      F(v_open_rev) },
    { "alerts", false, "paycoord_alerts_total", "", "counter",
      "Log lines with alert= from the payment path and recovery (each needs a person: see docs/operations.md).",
      S(alerts) },
    { "anomalies", false, "paycoord_anomalies_total", "", "counter",
      "The database and the processor disagreed (money may have moved without a matching debit, or the reverse); "
      "each gid is flagged for review.", S(anomalies) },
    { "clients.connected", false, "paycoord_clients_connected", "", "gauge", "Connected socket clients.",
      F(v_clients) },
    { "clients.accepted", false, "paycoord_clients_total", "result=\"accepted\"", "counter",
      "Client connections accepted and refused.", S(clients_accepted) },
    { "clients.refused", false, "paycoord_clients_total", "result=\"refused\"", "counter", NULL,
      S(clients_refused) },
    { "requests", false, "paycoord_requests_total", "", "counter", "Request lines received.", S(requests) },
    { "uptime_ms", false, NULL, NULL, NULL, NULL, F(v_uptime) },
};

static double value_of(const stat_def *d)
{
    if (d->off != NO_OFF)
        return (double)*(const uint64_t *)(const void *)((const char *)&D->stats + d->off);
    return d->fn();
}

/* ---------------------------------------------------------------- JSON */

/* The object at the dotted path's parent, made on the way; *leaf gets the last part. */
static cJSON *parent_of(cJSON *root, const char *path, char *leaf, size_t leaflen)
{
    cJSON *o = root;
    const char *dot;
    while ((dot = strchr(path, '.'))) {
        char part[64];
        size_t n = (size_t)(dot - path);
        if (n >= sizeof(part))
            n = sizeof(part) - 1;
        memcpy(part, path, n);
        part[n] = '\0';
        cJSON *next = cJSON_GetObjectItemCaseSensitive(o, part);
        if (!next)
            next = cJSON_AddObjectToObject(o, part);
        if (!next)
            return NULL;
        o = next;
        path = dot + 1;
    }
    snprintf(leaf, leaflen, "%s", path);
    return o;
}

cJSON *stats_json(void)
{
    cJSON *o = cJSON_CreateObject();
    if (!o)
        return NULL;
    for (size_t i = 0; i < PC_ARRAY_LEN(defs); i++) {
        const stat_def *d = &defs[i];
        if (!d->json)
            continue;
        char leaf[64];
        cJSON *parent = parent_of(o, d->json, leaf, sizeof(leaf));
        if (!parent)
            continue;
        double v = value_of(d);
        if (d->json_bool)
            cJSON_AddBoolToObject(parent, leaf, v != 0);
        else
            cJSON_AddItemToObject(parent, leaf, proto_json_int((int64_t)v));
    }
    cJSON *proc = cJSON_GetObjectItemCaseSensitive(o, "processor");
    if (proc) {
        cJSON_AddStringToObject(proc, "state", circuit_processor_state());
        cJSON_AddStringToObject(proc, "circuit", circuit_name(circuit_get()));
    }
    cJSON *errs = cJSON_AddObjectToObject(o, "errors");
    for (int i = 1; errs && i < PROTO_ERR__COUNT; i++)
        cJSON_AddItemToObject(errs, proto_err_name((proto_err)i), proto_json_int((int64_t)D->stats.errors_by_code[i]));
    cJSON_AddItemToObject(o, "forbidden_by_op", access_refused_json());
    return o;
}

/* ---------------------------------------------------------------- Prometheus */

static void header(sbuf *b, const char *name, const char *type, const char *help)
{
    sbuf_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

void stats_prometheus(sbuf *b)
{
    for (size_t i = 0; i < PC_ARRAY_LEN(defs); i++) {
        const stat_def *d = &defs[i];
        if (!d->prom)
            continue;
        if (d->help)
            header(b, d->prom, d->type, d->help);
        double v = value_of(d);
        if (d->labels[0])
            sbuf_printf(b, "%s{%s} %.17g\n", d->prom, d->labels, v);
        else
            sbuf_printf(b, "%s %.17g\n", d->prom, v);
    }
    const pc_stats *s = &D->stats;
    header(b, "paycoord_processor_latency_ms", "histogram", "Processor call latency.");
    uint64_t cum = 0;
    double le = 1.0;
    for (int i = 0; i < PC_LAT_BUCKETS - 1; i++, le *= 2) {
        cum += s->lat_buckets[i];
        sbuf_printf(b, "paycoord_processor_latency_ms_bucket{le=\"%g\"} %llu\n", le, (unsigned long long)cum);
    }
    cum += s->lat_buckets[PC_LAT_BUCKETS - 1];
    sbuf_printf(b, "paycoord_processor_latency_ms_bucket{le=\"+Inf\"} %llu\n", (unsigned long long)cum);
    sbuf_printf(b, "paycoord_processor_latency_ms_sum %.3f\n", s->lat_sum_ms);
    sbuf_printf(b, "paycoord_processor_latency_ms_count %llu\n", (unsigned long long)cum);
    header(b, "paycoord_errors_total", "counter", "Error replies by code.");
    for (int i = 1; i < PROTO_ERR__COUNT; i++)
        sbuf_printf(b, "paycoord_errors_total{code=\"%s\"} %llu\n", proto_err_name((proto_err)i),
                    (unsigned long long)s->errors_by_code[i]);
    header(b, "paycoord_forbidden_total", "counter",
           "Requests refused for want of a permission class (answered forbidden), by op.");
    for (int i = 0; i < PROTO_OP__COUNT; i++)
        sbuf_printf(b, "paycoord_forbidden_total{op=\"%s\"} %llu\n", proto_op_name((proto_op)i),
                    (unsigned long long)access_refused((proto_op)i));
}

/* ---------------------------------------------------------------- refresh */

static void counted_cb(st_status st, int count, double oldest, void *arg)
{
    (void)arg;
    refreshing = false;
    if (st == ST_OK) {
        prepared_db = count;
        oldest_s = oldest;
    }
}

static void refresh_cb(void *arg)
{
    (void)arg;
    if (!refreshing && store_prepared_count(D->cfg.node_id, counted_cb, NULL) == STORE_QUEUED)
        refreshing = true;
    loop_timer_start(&refresh, REFRESH_MS);
}

int stats_start(void)
{
    if (loop_timer_init(&refresh, refresh_cb, NULL) != 0)
        return -1;
    loop_timer_start(&refresh, 0);
    return 0;
}

void stats_stop(void) { loop_timer_deinit(&refresh); }
