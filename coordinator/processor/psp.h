/*
 * psp.h - the generic payment-processor contract (docs/processor.md), spoken
 * over the adapters' HTTP client (http_client.h: libcurl's multi interface
 * driven by libevent). Keep-alive connections are reused; nothing blocks the
 * loop (no curl_easy_perform; the base URL must be an IP literal or be
 * resolved by curl's threaded resolver).
 *
 * Callback contract: when psp_create/get/cancel/refund returns 0, the callback
 * fires exactly once, from the loop, never inside the call itself. The
 * psp_result is valid only during the callback. When the call returns -1 the
 * callback never fires. psp_free() fires pending callbacks with PSP_UNKNOWN
 * ("shutdown").
 *
 * Every call is logged (gid, what was sent minus secrets, what came back,
 * latency). The bearer token is never logged.
 */
#ifndef PAYCOORD_PSP_H
#define PAYCOORD_PSP_H

#include "common.h"
#include "http_client.h"
#include <cjson/cJSON.h>

struct event_base;
typedef struct psp_client psp_client;

typedef struct psp_config {
    const char *base_url;          /* e.g. "http://127.0.0.1:8081" (no trailing slash needed) */
    const char *token;             /* bearer token */
    long connect_timeout_ms;
    long request_timeout_ms;       /* total per request */
    long max_connections;          /* CURLMOPT_MAX_TOTAL_CONNECTIONS; 0 = unlimited */
    bool verify_peer;              /* HTTPS peer/host verification (default true) */
} psp_config;

typedef enum {
    PSP_PAYMENT = 0,        /* 200/201 with a payment object (create, get, cancel 200, refund) */
    PSP_NOT_FOUND,          /* 404: no record of this key */
    PSP_ALREADY_SUCCEEDED,  /* cancel: 409 already_succeeded; payment filled from "payment" */
    PSP_CONFLICT,           /* 409 idempotency_conflict: same key, other body */
    PSP_INVALID,            /* 400 / 422 */
    PSP_AUTH,               /* 401 / 403 */
    PSP_UNSUPPORTED,        /* 501 (cancel by key unsupported) */
    PSP_RATE_LIMITED,       /* 429: try again later (retry_after_ms from Retry-After, 0 if none) */
    PSP_UNKNOWN             /* other 5xx, connect error, reset, timeout, unparsable body: outcome unknown */
} psp_outcome;

typedef enum {
    PSP_ST_NONE = 0,
    PSP_ST_SUCCEEDED,
    PSP_ST_DECLINED,
    PSP_ST_PENDING,
    PSP_ST_CANCELED
} psp_status;

typedef struct psp_payment {
    char id[128];                  /* processor's id, "psp_..." */
    char idempotency_key[256];
    psp_status status;
    char decline_code[64];         /* "" unless declined */
    int64_t amount;
    char currency[4];
    bool refunded;
    int64_t created;               /* unix seconds */
} psp_payment;

typedef struct psp_result {
    psp_outcome outcome;
    long http_status;              /* 0 when no HTTP answer */
    psp_payment payment;           /* set for PSP_PAYMENT and PSP_ALREADY_SUCCEEDED */
    char error[256];               /* curl error or processor error code, for logs */
    double elapsed_ms;
    int retry_after_ms;            /* PSP_RATE_LIMITED: Retry-After in ms (delta-seconds form), else 0 */
} psp_result;

typedef void (*psp_cb)(const psp_result *res, void *arg);

typedef struct psp_create_req {
    const char *gid;               /* idempotency key */
    int64_t amount;
    const char *currency;
    const char *account;
    const char *reference;         /* may be NULL */
    const cJSON *metadata;         /* may be NULL */
} psp_create_req;

psp_client *psp_new(struct event_base *base, const psp_config *cfg) PC_MUSTCHECK;
void psp_free(psp_client *c);

int psp_create(psp_client *c, const psp_create_req *req, psp_cb cb, void *arg) PC_MUSTCHECK;
int psp_get(psp_client *c, const char *gid, psp_cb cb, void *arg) PC_MUSTCHECK;
int psp_cancel(psp_client *c, const char *gid, psp_cb cb, void *arg) PC_MUSTCHECK;
int psp_refund(psp_client *c, const char *gid, psp_cb cb, void *arg) PC_MUSTCHECK;

int psp_in_flight(const psp_client *c);
const char *psp_outcome_name(psp_outcome o);
const char *psp_status_name(psp_status s);

/*
 * Additions (psp.c owner).
 *
 * Contract details of psp.c: psp_new returns NULL (logged) for a URL that is
 * not http(s), an empty token or one with control characters; connect or
 * request timeouts <= 0 fall back to 2000 / 10000 ms. A gid must pass
 * gid_valid() (1..200 printable ASCII characters), else the call returns -1.
 * During psp_free(), calls made from the fired callbacks return -1; psp_free
 * may itself be called from a psp callback (the client is then released when
 * that callback returns). Requests that already had their answer when
 * psp_free ran get that answer, not "shutdown". A canceled tombstone may
 * carry amount 0 and currency "" (the test processor, docs/processor.md, sends
 * null).
 *
 * psp_stats: counters since psp_new, for stats output and tests. "connects"
 * counts new TCP connections (CURLINFO_NUM_CONNECTS): with keep-alive working
 * it stays near the peak number of concurrent requests, not the number of
 * requests.
 */
typedef struct psp_stats {
    uint64_t started;              /* calls that returned 0 */
    uint64_t completed;            /* callbacks fired */
    uint64_t unknown;              /* ... of which with PSP_UNKNOWN */
    uint64_t connects;             /* new connections opened */
} psp_stats;

void psp_get_stats(const psp_client *c, psp_stats *out);

/*
 * Map one processor answer to a result, exactly as the client does (pure,
 * psp_classify.c; exposed for table-driven tests and adapters). Sets outcome, http_status,
 * payment and error; leaves elapsed_ms alone. gid, when not NULL, must equal
 * the payment's idempotency_key, else the answer is PSP_UNKNOWN.
 */
void psp_classify(const char *gid, long http_status, const char *body, size_t len,
                  psp_result *res);

/* Largest response body accepted; a longer one is PSP_UNKNOWN. */
#define PSP_MAX_RESPONSE_BODY HTTP_MAX_RESPONSE_BODY

#endif
