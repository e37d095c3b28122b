/* ops.c - dispatch of parsed requests to their handlers, and the ops that
 * only read the daemon's own state: ping, health, stats. */
#include "access.h"
#include "daemon.h"
#include "log.h"

#include <string.h>

static void op_ping(pc_request *r)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "version", PAYCOORD_VERSION);
    cJSON_AddNumberToObject(o, "protocol", PROTO_VERSION);
    cJSON_AddStringToObject(o, "node", D->cfg.node_id);
    server_reply_ok(r, o);
}

static const char *processor_state(void)
{
    if (D->circuit == CIRCUIT_OPEN)
        return "circuit_open";
    return D->processor_ok ? "up" : "down";
}

static void op_health(pc_request *r)
{
    bool db = pgpool_is_up(D->pool);
    cJSON *o = cJSON_CreateObject();
    cJSON_AddBoolToObject(o, "ready", db && D->max_prepared_server > 0 && rec_node_locked() && !D->shutting_down);
    cJSON_AddStringToObject(o, "database", db ? "up" : "down");
    cJSON_AddStringToObject(o, "processor", processor_state());
    cJSON_AddNumberToObject(o, "prepared", D->prepared + D->orphans);
    cJSON_AddNumberToObject(o, "max_prepared", D->max_prepared_server);
    server_reply_ok(r, o);
}

/* Latency percentile from the power-of-two histogram (upper bound of the bucket). */
static double lat_percentile(double pct)
{
    uint64_t total = 0;
    for (int i = 0; i < PC_LAT_BUCKETS; i++)
        total += D->stats.lat_buckets[i];
    if (!total)
        return 0;
    uint64_t want = (uint64_t)((double)total * pct / 100.0 + 0.5), seen = 0;
    double lim = 1.0;
    for (int i = 0; i < PC_LAT_BUCKETS; i++, lim *= 2) {
        seen += D->stats.lat_buckets[i];
        if (seen >= want)
            return lim;
    }
    return lim;
}

static void op_stats(pc_request *r)
{
    const pc_stats *s = &D->stats;
    cJSON *o = cJSON_CreateObject();
    cJSON *pay = cJSON_AddObjectToObject(o, "payments");
    cJSON_AddNumberToObject(pay, "succeeded", (double)s->payments_succeeded);
    cJSON_AddNumberToObject(pay, "declined", (double)s->payments_declined);
    cJSON_AddNumberToObject(pay, "insufficient_funds", (double)s->payments_insufficient);
    cJSON_AddNumberToObject(pay, "answered_pending", (double)s->payments_left_pending);
    cJSON_AddNumberToObject(pay, "replays", (double)s->replays);
    cJSON_AddNumberToObject(o, "in_flight", pay_in_flight());
    cJSON_AddNumberToObject(o, "max_in_flight", D->cfg.max_in_flight);
    cJSON_AddNumberToObject(o, "prepared", D->prepared);
    cJSON_AddNumberToObject(o, "orphans", D->orphans);
    cJSON_AddNumberToObject(o, "max_prepared_transactions", D->max_prepared_server);
    cJSON_AddNumberToObject(o, "prepared_limit", D->prepared_limit);
    cJSON *credits = cJSON_AddObjectToObject(o, "credits");
    cJSON_AddNumberToObject(credits, "applied", (double)s->credits_applied);
    cJSON_AddNumberToObject(credits, "accepted", (double)s->credits_accepted);
    cJSON *pool = cJSON_AddObjectToObject(o, "pool");
    cJSON_AddNumberToObject(pool, "size", pgpool_size(D->pool));
    cJSON_AddNumberToObject(pool, "connected", pgpool_connected(D->pool));
    cJSON_AddNumberToObject(pool, "busy", pgpool_busy(D->pool));
    cJSON_AddNumberToObject(pool, "queued", pgpool_queued(D->pool));
    cJSON *proc = cJSON_AddObjectToObject(o, "processor");
    cJSON_AddStringToObject(proc, "state", processor_state());
    cJSON_AddStringToObject(proc, "circuit", D->circuit == CIRCUIT_OPEN ? "open"
                                             : D->circuit == CIRCUIT_HALF_OPEN ? "half_open" : "closed");
    cJSON_AddNumberToObject(proc, "calls", (double)s->processor_calls);
    cJSON_AddNumberToObject(proc, "failures", (double)s->processor_failures);
    cJSON_AddNumberToObject(proc, "in_flight", psp_in_flight(D->psp));
    cJSON_AddNumberToObject(proc, "latency_p50_ms_le", lat_percentile(50));
    cJSON_AddNumberToObject(proc, "latency_p99_ms_le", lat_percentile(99));
    cJSON *rec = cJSON_AddObjectToObject(o, "recovery");
    cJSON_AddNumberToObject(rec, "runs", (double)s->recovery_runs);
    cJSON_AddBoolToObject(rec, "node_lock", rec_node_locked());
    cJSON_AddBoolToObject(rec, "running", rec_busy());
    cJSON_AddNumberToObject(rec, "committed", (double)s->recoveries_committed);
    cJSON_AddNumberToObject(rec, "rolled_back", (double)s->recoveries_rolled_back);
    cJSON_AddNumberToObject(rec, "left", (double)s->recoveries_left);
    cJSON *cl = cJSON_AddObjectToObject(o, "clients");
    cJSON_AddNumberToObject(cl, "connected", D->nclients);
    cJSON_AddNumberToObject(cl, "accepted", (double)s->clients_accepted);
    cJSON_AddNumberToObject(cl, "refused", (double)s->clients_refused);
    cJSON_AddNumberToObject(o, "requests", (double)s->requests);
    cJSON *errs = cJSON_AddObjectToObject(o, "errors");
    for (int i = 1; i < PROTO_ERR__COUNT; i++)
        cJSON_AddNumberToObject(errs, proto_err_name((proto_err)i), (double)s->errors_by_code[i]);
    cJSON_AddItemToObject(o, "forbidden_by_op", access_refused_json());
    cJSON_AddNumberToObject(o, "uptime_ms", (double)(pc_now_ms() - D->started_ms));
    server_reply_ok(r, o);
}

void ops_dispatch(pc_request *r)
{
    switch (r->req.op) {
    case PROTO_OP_PAY: pay_handle_pay(r); return;
    case PROTO_OP_STATUS: pay_handle_status(r); return;
    case PROTO_OP_CREDIT: pay_handle_credit(r); return;
    case PROTO_OP_BALANCE: pay_handle_balance(r); return;
    case PROTO_OP_PING: op_ping(r); return;
    case PROTO_OP_ACCOUNT_OPEN: pay_handle_account_open(r); return;
    case PROTO_OP_HEALTH: op_health(r); return;
    case PROTO_OP_STATS: op_stats(r); return;
    case PROTO_OP_PREPARED: rec_handle_prepared(r); return;
    case PROTO_OP_RESOLVE: rec_handle_resolve(r); return;
    case PROTO_OP_RECOVER: rec_handle_recover(r); return;
    case PROTO_OP__COUNT:
        break;
    }
    server_reply_err(r, PROTO_ERR_UNKNOWN_OP, "unknown op");
}
