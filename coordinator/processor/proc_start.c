/* proc_start.c - the adapter processor_api names (proc.h), started from the
 * configuration; not part of the simulation, which installs its own model. */
#include "proc.h"
#include "ctx.h"
#include "log.h"
#include "http_client.h"
#include "proc_known.h"
#include "loop.h"
#include "sbuf.h"

#include <string.h>

int proc_start(void)
{
    const char *api = D->cfg.processor_api;
    int rc;
    if (!strcmp(api, "stripe"))
        rc = proc_stripe_start();
    else if (!strcmp(api, "adyen"))
        rc = proc_adyen_start();
    else
        rc = proc_generic_start();
    const proc_adapter *adapter = proc_current();
    if (rc == 0 && adapter)
        log_notice("event=processor api=%s key_window_s=%lld cancel=%s webhooks=%d", adapter->name,
                   (long long)(adapter->caps->key_window_ms / 1000),
                   adapter->caps->cancel == PROC_CANCEL_BY_KEY ? "by_key"
                   : adapter->caps->cancel == PROC_CANCEL_BY_ID ? "by_id"
                   : adapter->caps->cancel == PROC_CANCEL_BY_REFERENCE_ASYNC ? "by_reference_async" : "none",
                   adapter->caps->webhooks ? 1 : 0);
    return rc;
}

http_client *proc_http_client(const char *name, const char *auth_prefix)
{
    const pc_config *cfg = &D->cfg;
    if (!D->token || !D->token[0])
        return NULL;
    sbuf auth;
    sbuf_init(&auth);
    sbuf_printf(&auth, "%s%s", auth_prefix, D->token);
    http_config hc = { .name = name, .base_url = cfg->processor_url, .auth_header = sbuf_str(&auth),
                       .connect_timeout_ms = cfg->processor_connect_timeout_ms,
                       .request_timeout_ms = cfg->processor_timeout_ms,
                       .max_connections = cfg->processor_max_connections ? cfg->processor_max_connections
                                                                          : cfg->max_in_flight,
                       .verify_peer = cfg->processor_verify_peer };
    http_client *client = sbuf_ok(&auth) ? http_new(loop_base(), &hc) : NULL;
    sbuf_free(&auth);
    return client;
}

int proc_adapter_start(const proc_adapter *adapter, http_client **client, const char *auth_prefix,
                       uint64_t keep_known_ms)
{
    *client = proc_http_client(adapter->name, auth_prefix);
    if (!*client || proc_known_init(keep_known_ms) != 0) {
        http_free(*client);
        *client = NULL;
        return -1;
    }
    proc_use(adapter);
    return 0;
}
