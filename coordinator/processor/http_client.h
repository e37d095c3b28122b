/*
 * http_client.h - the processor adapters' HTTP client: libcurl's multi
 * interface driven by the daemon's libevent loop (CURLMOPT_SOCKETFUNCTION /
 * TIMERFUNCTION with curl_multi_socket_action). Keep-alive connections are
 * reused; nothing blocks the loop (no curl_easy_perform; the base URL must be
 * an IP literal or be resolved by curl's threaded resolver).
 *
 * It knows nothing of any processor's API: each adapter builds its requests
 * (method, path, body, content type, idempotency key) and classifies the raw
 * answer itself (psp.c for the generic contract, proc_stripe.c,
 * proc_adyen.c).
 *
 * Callback contract: when http_send returns 0, the callback fires exactly
 * once, from the loop, never inside http_send itself; when it returns -1 the
 * callback never fires. The answer is valid only during the callback.
 * http_free() fires the callbacks of requests still without an answer with
 * error "shutdown"; requests that already had their answer get it. During
 * http_free, calls made from the fired callbacks return -1; http_free may
 * itself be called from a callback (the client is released when that
 * callback returns).
 *
 * Secrets: the auth header is never logged; the URL is logged as
 * scheme://host:port only.
 */
#ifndef PAYCOORD_HTTP_CLIENT_H
#define PAYCOORD_HTTP_CLIENT_H

#include "common.h"

#include <stddef.h>
#include <stdint.h>

struct event_base;
typedef struct http_client http_client;

typedef struct http_config {
    const char *name;              /* log prefix and what the URL setting is called in errors */
    const char *base_url;          /* http(s)://host[:port][/path]; no query or fragment */
    const char *auth_header;       /* one full header line ("Authorization: Bearer ..."); never logged */
    long connect_timeout_ms;       /* <= 0: 2000 */
    long request_timeout_ms;       /* total per request; <= 0: 10000 */
    long max_connections;          /* CURLMOPT_MAX_TOTAL_CONNECTIONS; 0 = unlimited */
    bool verify_peer;              /* HTTPS peer/host verification */
} http_config;

typedef struct http_request {
    bool post;                     /* POST with body, else GET */
    const char *path;              /* appended to base_url, already escaped ("/v1/payments/..") */
    const char *content_type;      /* POST: the body's type */
    const char *body;              /* POST: copied */
    const char *idempotency_key;   /* NULL: no Idempotency-Key header */
} http_request;

/* Largest response body accepted; a longer one is a transport failure. */
#define HTTP_MAX_RESPONSE_BODY (1024 * 1024)

typedef struct http_answer {
    long status;                   /* 0 when no HTTP answer came */
    const char *body;              /* NUL-terminated ("" without one) */
    size_t len;
    const char *error;             /* no answer: why (curl error, oversized body, "shutdown"); else "" */
    bool too_big;                  /* the body was over HTTP_MAX_RESPONSE_BODY */
    int retry_after_ms;            /* Retry-After in its delta-seconds form (<= 1 h), else 0 */
    bool replayed;                 /* Idempotent-Replayed: true */
    const char *idempotency_key;   /* the Idempotency-Key the answer echoed, NULL if none */
    bool new_conn;                 /* a new connection was opened for it */
    double elapsed_ms;
} http_answer;

typedef void (*http_cb)(const http_answer *a, void *arg);

/* NULL (logged) for a URL that is not http(s) or has a query or fragment,
 * or an auth header with control characters. */
http_client *http_new(struct event_base *base, const http_config *cfg) PC_MUSTCHECK;

/* The client of an adapter (proc_start.c): the processor_* settings of the
 * configuration, the header auth_prefix followed by the token. NULL when
 * there is no token or it cannot be made. */
http_client *proc_http_client(const char *name, const char *auth_prefix) PC_MUSTCHECK;
/* Start an adapter that talks HTTP and learns from webhooks (Stripe,
 * Adyen): its client (proc_http_client, named after the adapter), the
 * webhook memory kept keep_known_ms, then proc_use(adapter). -1, nothing
 * left behind, when either cannot be made. */
struct proc_adapter;
int proc_adapter_start(const struct proc_adapter *adapter, http_client **client, const char *auth_prefix,
                       uint64_t keep_known_ms) PC_MUSTCHECK;
void http_free(http_client *c);

int http_send(http_client *c, const http_request *rq, http_cb cb, void *arg) PC_MUSTCHECK;
int http_in_flight(const http_client *c);
bool http_closing(const http_client *c);

typedef struct http_stats {
    uint64_t started;              /* sends that returned 0 */
    uint64_t completed;            /* callbacks fired */
    uint64_t no_answer;            /* ... of which without an HTTP answer */
    uint64_t connects;             /* new connections opened (CURLINFO_NUM_CONNECTS) */
} http_stats;
void http_get_stats(const http_client *c, http_stats *out);

#endif
