/* ops.c - dispatch of parsed requests to their handlers (every op's handler
 * lives with the layer that owns its data), and the ops that only read the
 * daemon's own state: ping, health, stats. */
#include "ops.h"
#include "access.h"
#include "account.h"
#include "admin.h"
#include "circuit.h"
#include "ctx.h"
#include "dbsafety.h"
#include "nodelock.h"
#include "payment.h"
#include "reads.h"
#include "recon.h"
#include "recovery.h"
#include "stats.h"
#include "store.h"

static void op_ping(pc_request *r)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "version", PAYCOORD_VERSION);
    cJSON_AddNumberToObject(o, "protocol", PROTO_VERSION);
    cJSON_AddStringToObject(o, "node", D->cfg.node_id);
    req_reply_ok(r, o);
}

bool ops_ready(void)
{
    return store_is_up() && !store_is_stuck(NULL) && D->max_prepared_server > 0 && rec_node_locked() &&
           rec_first_pass_done() && dbsafety_payments_allowed(NULL) && !D->shutting_down;
}

static void op_health(pc_request *r)
{
    bool db = store_is_up();
    int oldest = 0;
    bool stuck = store_is_stuck(&oldest);
    cJSON *o = cJSON_CreateObject();
    cJSON_AddBoolToObject(o, "ready", ops_ready());
    cJSON_AddStringToObject(o, "database", !db ? "down" : stuck ? "stuck" : "up");
    if (stuck)
        cJSON_AddNumberToObject(o, "database_oldest_query_ms", oldest);
    cJSON_AddStringToObject(o, "processor", circuit_processor_state());
    cJSON_AddNumberToObject(o, "prepared", pay_prepared() + rec_orphans());
    cJSON_AddNumberToObject(o, "max_prepared", D->max_prepared_server);
    dbsafety_health(o);
    req_reply_ok(r, o);
}

static void op_stats(pc_request *r)
{
    cJSON *o = stats_json();
    if (!o)
        req_reply_err(r, PROTO_ERR_INTERNAL, "out of memory");
    else
        req_reply_ok(r, o);
}

void ops_dispatch(pc_request *r)
{
    switch (r->req.op) {
    case PROTO_OP_PAY: pay_handle_pay(r); return;
    case PROTO_OP_STATUS: reads_handle_status(r); return;
    case PROTO_OP_CREDIT: account_handle_credit(r); return;
    case PROTO_OP_BALANCE: reads_handle_balance(r); return;
    case PROTO_OP_PING: op_ping(r); return;
    case PROTO_OP_ACCOUNT_OPEN: reads_handle_account_open(r); return;
    case PROTO_OP_HEALTH: op_health(r); return;
    case PROTO_OP_STATS: op_stats(r); return;
    case PROTO_OP_PREPARED: admin_handle_prepared(r); return;
    case PROTO_OP_RESOLVE: admin_handle_resolve(r); return;
    case PROTO_OP_RECOVER: admin_handle_recover(r); return;
    case PROTO_OP_RECONCILE: recon_handle_reconcile(r); return;
    case PROTO_OP_RECONCILE_STATUS: recon_handle_status(r); return;
    case PROTO_OP_DISCREPANCIES: recon_handle_discrepancies(r); return;
    case PROTO_OP_SETTLE_DISCREPANCY: recon_handle_settle(r); return;
    case PROTO_OP_AUDIT: recon_handle_audit(r); return;
    case PROTO_OP__COUNT:
        break;
    }
    req_reply_err(r, PROTO_ERR_UNKNOWN_OP, "unknown op");
}
