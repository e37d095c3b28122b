/*
 * proc.h - the payment processor as the payment path and recovery see it:
 * one adapter, chosen at start, behind a table of functions. Each adapter
 * owns its request shapes, the classification of every answer into the
 * outcomes below, and the capabilities recovery may rely on. The generic
 * adapter (proc_generic.c) speaks the contract of docs/processor.md through
 * psp.c; the simulation installs an in-memory one.
 *
 * Callback contract: a call returns 0 and its callback fires exactly once,
 * later, from the loop; or it returns -1 and the callback never fires. The
 * result is valid only during the callback.
 *
 * An outcome that does not prove what happened to the money is PROC_UNKNOWN,
 * never a decline: a timeout, a reset, a 5xx, an unparsable body, a body for
 * another key, an unknown status.
 */
#ifndef PAYCOORD_PROC_H
#define PAYCOORD_PROC_H

#include "common.h"

#include <cjson/cJSON.h>
#include <stdint.h>

typedef enum {
    PROC_PAYMENT = 0,       /* an answer with the payment's state (status below) */
    PROC_NOT_FOUND,         /* the processor has no record of this key */
    PROC_ALREADY_SUCCEEDED, /* cancel refused: it was captured (status SUCCEEDED, id set) */
    PROC_CONFLICT,          /* the key was used with another body: a bug, never guess */
    PROC_INVALID,           /* the request was refused as invalid (4xx): see payment.c for when that is a decline */
    PROC_AUTH,              /* credentials refused (401/403) */
    PROC_UNSUPPORTED,       /* this processor cannot do that (cancel by key: 501) */
    PROC_RATE_LIMITED,      /* 429: not processed; retry_after_ms says when to try again */
    PROC_UNKNOWN            /* outcome unknown */
} proc_outcome;

typedef enum { PROC_ST_NONE = 0, PROC_ST_SUCCEEDED, PROC_ST_DECLINED, PROC_ST_PENDING, PROC_ST_CANCELED } proc_status;

typedef struct proc_result {
    proc_outcome outcome;
    proc_status status;            /* PROC_PAYMENT, PROC_ALREADY_SUCCEEDED */
    long http_status;              /* 0 when there was no HTTP answer */
    char id[128];                  /* the processor's own reference, "" if none */
    char decline_code[64];         /* declined/canceled: the reason, "" if none */
    int64_t amount;
    char currency[4];
    int retry_after_ms;            /* PROC_RATE_LIMITED: 0 if the processor gave none */
    char error[256];               /* for logs */
    double elapsed_ms;
} proc_result;

typedef void (*proc_cb)(const proc_result *res, void *arg);

typedef struct proc_req {
    const char *gid;               /* the idempotency key */
    const char *payment_id;
    const char *processor_ref;     /* the processor's own id when known, else NULL */
    int64_t amount;
    const char *currency;
    const char *account;
    const char *reference;         /* NULL: none */
    const cJSON *metadata;         /* NULL: none */
} proc_req;

typedef struct proc_adapter {
    const char *name;
    int (*create)(const proc_req *req, proc_cb cb, void *arg);
    int (*get)(const proc_req *req, proc_cb cb, void *arg);
    int (*cancel)(const proc_req *req, proc_cb cb, void *arg);
    int (*in_flight)(void);
    void (*shutdown)(void);
} proc_adapter;

void proc_use(const proc_adapter *a);
const proc_adapter *proc_current(void);

int proc_create(const proc_req *req, proc_cb cb, void *arg) PC_MUSTCHECK;
int proc_get(const proc_req *req, proc_cb cb, void *arg) PC_MUSTCHECK;
int proc_cancel(const proc_req *req, proc_cb cb, void *arg) PC_MUSTCHECK;
int proc_in_flight(void);
void proc_shutdown(void);

const char *proc_outcome_name(proc_outcome o);
const char *proc_status_name(proc_status s);

/* The generic adapter (docs/processor.md): starts its HTTP client from D->cfg. */
int proc_generic_start(void) PC_MUSTCHECK;

#endif
