/* proc_start.c - the adapter processor_api names (proc.h), started from the
 * configuration; not part of the simulation, which installs its own model. */
#include "proc.h"
#include "ctx.h"
#include "log.h"

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
