/* ctx.c - the shared daemon context (ctx.h). */
#include "ctx.h"

static pc_daemon daemon_state;
pc_daemon *D = &daemon_state;

static void (*readiness_cb)(void);

void ctx_update_prepared_limit(void)
{
    if (D->max_prepared_server > 0)
        D->prepared_limit = (int)((int64_t)D->max_prepared_server * D->cfg.prepared_share_percent / 100);
}

void ctx_anomaly(void)
{
    D->stats.alerts++;
    D->stats.anomalies++;
}

void ctx_set_readiness_cb(void (*cb)(void)) { readiness_cb = cb; }

void ctx_readiness_changed(void)
{
    if (readiness_cb)
        readiness_cb();
}
