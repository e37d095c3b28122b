/* proc.c - dispatch to the processor adapter in use (proc.h). */
#include "proc.h"

#include <stddef.h>
#include <string.h>

static const proc_adapter *adapter;

void proc_use(const proc_adapter *a) { adapter = a; }
const proc_adapter *proc_current(void) { return adapter; }

int proc_create(const proc_req *req, proc_cb cb, void *arg) { return adapter ? adapter->create(req, cb, arg) : -1; }
int proc_get(const proc_req *req, proc_cb cb, void *arg) { return adapter ? adapter->get(req, cb, arg) : -1; }
int proc_cancel(const proc_req *req, proc_cb cb, void *arg) { return adapter ? adapter->cancel(req, cb, arg) : -1; }
int proc_in_flight(void) { return adapter ? adapter->in_flight() : 0; }
const proc_caps *proc_caps_get(void) { return adapter ? adapter->caps : NULL; }
const char *proc_webhook_header(void) { return adapter ? adapter->webhook_header : NULL; }
bool proc_ready(void) { return !adapter || !adapter->ready || adapter->ready(); }

void proc_shutdown(void)
{
    if (adapter)
        adapter->shutdown();
    adapter = NULL;
}

proc_wh_status proc_webhook(const proc_webhook_in *in, proc_event *events, int max, int *n, char *err,
                            size_t errlen)
{
    *n = 0;
    if (!adapter || !adapter->webhook) {
        if (errlen)
            err[0] = '\0';
        return PROC_WH_UNSUPPORTED;
    }
    return adapter->webhook(in, events, max, n, err, errlen);
}

void proc_event_record(const proc_event *ev)
{
    if (adapter && adapter->event)
        adapter->event(ev);
}

void proc_events_loaded(void)
{
    if (adapter && adapter->events_loaded)
        adapter->events_loaded();
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
    case PROC_STUCK: return "stuck";
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

proc_status proc_status_parse(const char *s)
{
    static const proc_status all[] = { PROC_ST_SUCCEEDED, PROC_ST_DECLINED, PROC_ST_PENDING, PROC_ST_CANCELED };
    for (size_t i = 0; i < PC_ARRAY_LEN(all); i++)
        if (s && !strcmp(s, proc_status_name(all[i])))
            return all[i];
    return PROC_ST_NONE;
}
