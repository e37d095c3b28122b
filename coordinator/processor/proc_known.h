/*
 * proc_known.h - what the adapters have learnt from webhooks, per gid: the
 * processor's id of the payment, the outcome of the authorisation, the
 * outcome of a cancel, and (the adapter's own note) when a cancel of ours was
 * received. get() and cancel() answer from it; the webhook listener fills it
 * (proc_event_record) once an event is durable, and again from the database
 * at start.
 *
 * Entries untouched for keep_ms are dropped (checked every minute), and at
 * most PROC_KNOWN_MAX are kept (the oldest go first): a payment still
 * unsettled by then is asked about as if nothing were known (safe: an adapter
 * never decides from the absence of an event).
 */
#ifndef PAYCOORD_PROC_KNOWN_H
#define PAYCOORD_PROC_KNOWN_H

#include "proc.h"

#include <stdint.h>

#define PROC_KNOWN_MAX 1000000

typedef struct proc_known {
    char ref[128];                 /* the processor's id of the payment ("" unknown) */
    proc_status auth;              /* SUCCEEDED / DECLINED once an authorisation outcome arrived; else NONE */
    char auth_reason[64];
    bool cancel_ok;                /* a cancel of the payment succeeded */
    char cancel_reason[64];        /* the last cancel outcome's reason */
    char cancel_fail_psp[64];      /* the id of the last cancel that failed */
    char cancel_psp[64];           /* the id of our cancel request (this process; not persisted) */
    uint64_t cancel_sent_ms;       /* when our cancel was received (loop clock; not persisted) */
    bool pending_answer;           /* the processor answered our create "pending" (not persisted) */
    uint64_t touched_ms;
} proc_known;

int proc_known_init(uint64_t keep_ms) PC_MUSTCHECK;
void proc_known_shutdown(void);
proc_known *proc_known_get(const char *gid);     /* NULL: nothing known */
proc_known *proc_known_put(const char *gid);     /* get or make (NULL: out of memory); touches it */
size_t proc_known_count(void);

#endif
