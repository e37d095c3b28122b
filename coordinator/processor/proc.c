/* proc.c - dispatch to the processor adapter in use (proc.h). */
#include "proc.h"

#include <stddef.h>

static const proc_adapter *adapter;

void proc_use(const proc_adapter *a) { adapter = a; }
const proc_adapter *proc_current(void) { return adapter; }

int proc_create(const proc_req *req, proc_cb cb, void *arg) { return adapter ? adapter->create(req, cb, arg) : -1; }
int proc_get(const proc_req *req, proc_cb cb, void *arg) { return adapter ? adapter->get(req, cb, arg) : -1; }
int proc_cancel(const proc_req *req, proc_cb cb, void *arg) { return adapter ? adapter->cancel(req, cb, arg) : -1; }
int proc_in_flight(void) { return adapter ? adapter->in_flight() : 0; }

void proc_shutdown(void)
{
    if (adapter)
        adapter->shutdown();
    adapter = NULL;
}

const char *proc_outcome_name(proc_outcome o)
{
    switch (o) {
    case PROC_PAYMENT: return "payment";
    case PROC_NOT_FOUND: return "not_found";
    case PROC_ALREADY_SUCCEEDED: return "already_succeeded";
    case PROC_CONFLICT: return "conflict";
    case PROC_INVALID: return "invalid";
    case PROC_AUTH: return "auth";
    case PROC_UNSUPPORTED: return "unsupported";
    case PROC_RATE_LIMITED: return "rate_limited";
    case PROC_UNKNOWN: return "unknown";
    }
    return "?";
}

const char *proc_status_name(proc_status s)
{
    switch (s) {
    case PROC_ST_SUCCEEDED: return "succeeded";
    case PROC_ST_DECLINED: return "declined";
    case PROC_ST_PENDING: return "pending";
    case PROC_ST_CANCELED: return "canceled";
    case PROC_ST_NONE: break;
    }
    return "none";
}
