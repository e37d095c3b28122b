/*
 * metrics.c - GET /metrics in Prometheus text format on metrics_listen
 * ("127.0.0.1:PORT"; loopback only). Everything is served from in-memory
 * counters; the node's prepared-transaction count and oldest age come from a
 * query refreshed every 5 s, so a scrape never waits on the database.
 */
#include "access.h"
#include "daemon.h"
#include "log.h"
#include "metrics.h"
#include "sbuf.h"

#include <arpa/inet.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>

static struct evhttp *http;
static struct event *refresh;
static int64_t prepared_db = -1;
static double oldest_s;
static bool refreshing;

int64_t metrics_prepared_db(void) { return prepared_db; }
double metrics_oldest_prepared_s(void) { return oldest_s; }

static void refresh_cb_db(const pgpool_reply *r, void *arg)
{
    refreshing = false;
    if (r->status == PGQ_OK && PQntuples(r->results[0]) == 1) {
        prepared_db = strtoll(PQgetvalue(r->results[0], 0, 0), NULL, 10);
        oldest_s = strtod(PQgetvalue(r->results[0], 0, 1), NULL);
    }
}

static void refresh_tick(evutil_socket_t fd, short what, void *arg)
{
    if (refreshing || !pgpool_is_up(D->pool))
        return;
    char prefix[48];
    snprintf(prefix, sizeof(prefix), "pc:%s:", D->cfg.node_id);
    const char *params[1] = { prefix };
    if (pgpool_query_params(D->pool,
            "SELECT count(*), coalesce(extract(epoch FROM now() - min(prepared)), 0) FROM pg_prepared_xacts "
            "WHERE database = current_database() AND left(gid, length($1)) = $1", 1, params, refresh_cb_db, NULL)
        == PGPOOL_QUEUED)
        refreshing = true;
}

static void metric(sbuf *b, const char *name, const char *type, const char *help)
{
    sbuf_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void render(sbuf *b)
{
    const pc_stats *s = &D->stats;
    metric(b, "paycoord_payments_total", "counter", "Payments that reached a final status, by status.");
    sbuf_printf(b, "paycoord_payments_total{status=\"succeeded\"} %llu\n", (unsigned long long)s->payments_succeeded);
    sbuf_printf(b, "paycoord_payments_total{status=\"declined\"} %llu\n", (unsigned long long)s->payments_declined);
    sbuf_printf(b, "paycoord_payments_total{status=\"insufficient_funds\"} %llu\n",
                (unsigned long long)s->payments_insufficient);
    metric(b, "paycoord_payments_answered_pending_total", "counter",
           "Pay requests answered 'pending' because wait_ms ran out.");
    sbuf_printf(b, "paycoord_payments_answered_pending_total %llu\n", (unsigned long long)s->payments_left_pending);
    metric(b, "paycoord_payments_in_flight", "gauge", "Payments in progress in this daemon.");
    sbuf_printf(b, "paycoord_payments_in_flight %d\n", pay_in_flight());
    metric(b, "paycoord_prepared_live", "gauge", "Prepared debits driven by live payments of this daemon.");
    sbuf_printf(b, "paycoord_prepared_live %d\n", D->prepared);
    metric(b, "paycoord_prepared_transactions", "gauge",
           "Prepared transactions of this node in the database (refreshed every 5 s; -1 unknown).");
    sbuf_printf(b, "paycoord_prepared_transactions %lld\n", (long long)prepared_db);
    metric(b, "paycoord_prepared_oldest_age_seconds", "gauge", "Age of this node's oldest prepared transaction.");
    sbuf_printf(b, "paycoord_prepared_oldest_age_seconds %.3f\n", oldest_s);
    metric(b, "paycoord_prepared_limit", "gauge", "Share of max_prepared_transactions this node may use.");
    sbuf_printf(b, "paycoord_prepared_limit %d\n", D->prepared_limit);
    metric(b, "paycoord_pool_connections", "gauge", "Database pool connections by state.");
    sbuf_printf(b, "paycoord_pool_connections{state=\"size\"} %d\n", pgpool_size(D->pool));
    sbuf_printf(b, "paycoord_pool_connections{state=\"connected\"} %d\n", pgpool_connected(D->pool));
    sbuf_printf(b, "paycoord_pool_connections{state=\"busy\"} %d\n", pgpool_busy(D->pool));
    metric(b, "paycoord_pool_queued", "gauge", "Queries waiting for a pool connection.");
    sbuf_printf(b, "paycoord_pool_queued %d\n", pgpool_queued(D->pool));
    metric(b, "paycoord_database_up", "gauge", "1 when at least one pool connection is up.");
    sbuf_printf(b, "paycoord_database_up %d\n", pgpool_is_up(D->pool) ? 1 : 0);
    metric(b, "paycoord_processor_latency_ms", "histogram", "Processor call latency.");
    uint64_t cum = 0;
    double le = 1.0;
    for (int i = 0; i < PC_LAT_BUCKETS - 1; i++, le *= 2) {
        cum += s->lat_buckets[i];
        sbuf_printf(b, "paycoord_processor_latency_ms_bucket{le=\"%g\"} %llu\n", le, (unsigned long long)cum);
    }
    cum += s->lat_buckets[PC_LAT_BUCKETS - 1];
    sbuf_printf(b, "paycoord_processor_latency_ms_bucket{le=\"+Inf\"} %llu\n", (unsigned long long)cum);
    sbuf_printf(b, "paycoord_processor_latency_ms_sum %.3f\n", s->lat_sum_ms);
    sbuf_printf(b, "paycoord_processor_latency_ms_count %llu\n", (unsigned long long)cum);
    metric(b, "paycoord_processor_failures_total", "counter", "Processor calls that failed: unknown outcome (timeout, 5xx, reset), 401/403, failed polls and cancels.");
    sbuf_printf(b, "paycoord_processor_failures_total %llu\n", (unsigned long long)s->processor_failures);
    metric(b, "paycoord_circuit_state", "gauge", "Processor circuit: 0 closed, 1 half-open, 2 open.");
    sbuf_printf(b, "paycoord_circuit_state %d\n", D->circuit == CIRCUIT_OPEN ? 2 : D->circuit == CIRCUIT_HALF_OPEN ? 1 : 0);
    metric(b, "paycoord_recoveries_total", "counter", "Recovery outcomes per payment.");
    sbuf_printf(b, "paycoord_recoveries_total{outcome=\"committed\"} %llu\n", (unsigned long long)s->recoveries_committed);
    sbuf_printf(b, "paycoord_recoveries_total{outcome=\"rolled_back\"} %llu\n", (unsigned long long)s->recoveries_rolled_back);
    sbuf_printf(b, "paycoord_recoveries_total{outcome=\"left\"} %llu\n", (unsigned long long)s->recoveries_left);
    metric(b, "paycoord_recovery_runs_total", "counter", "Recovery passes finished.");
    sbuf_printf(b, "paycoord_recovery_runs_total %llu\n", (unsigned long long)s->recovery_runs);
    metric(b, "paycoord_node_lock_held", "gauge", "1 while this daemon holds its node's advisory lock.");
    sbuf_printf(b, "paycoord_node_lock_held %d\n", rec_node_locked() ? 1 : 0);
    metric(b, "paycoord_clients_connected", "gauge", "Connected socket clients.");
    sbuf_printf(b, "paycoord_clients_connected %d\n", D->nclients);
    metric(b, "paycoord_requests_total", "counter", "Request lines received.");
    sbuf_printf(b, "paycoord_requests_total %llu\n", (unsigned long long)s->requests);
    metric(b, "paycoord_errors_total", "counter", "Error replies by code.");
    for (int i = 1; i < PROTO_ERR__COUNT; i++)
        sbuf_printf(b, "paycoord_errors_total{code=\"%s\"} %llu\n", proto_err_name((proto_err)i),
                    (unsigned long long)s->errors_by_code[i]);
    metric(b, "paycoord_forbidden_total", "counter",
           "Requests refused for want of a permission class (answered forbidden), by op.");
    for (int i = 0; i < PROTO_OP__COUNT; i++)
        sbuf_printf(b, "paycoord_forbidden_total{op=\"%s\"} %llu\n", proto_op_name((proto_op)i),
                    (unsigned long long)access_refused((proto_op)i));
}

static void handle(struct evhttp_request *req, void *arg)
{
    const char *uri = evhttp_request_get_uri(req);
    if (evhttp_request_get_command(req) != EVHTTP_REQ_GET || !uri || strncmp(uri, "/metrics", 8) != 0 ||
        (uri[8] != '\0' && uri[8] != '?')) {
        evhttp_send_error(req, HTTP_NOTFOUND, "only GET /metrics");
        return;
    }
    sbuf b;
    sbuf_init(&b);
    render(&b);
    struct evbuffer *out = evbuffer_new();
    if (!out || !sbuf_ok(&b)) {
        evhttp_send_error(req, HTTP_INTERNAL, "out of memory");
    } else {
        evbuffer_add(out, b.data, b.len);
        evhttp_add_header(evhttp_request_get_output_headers(req), "Content-Type", "text/plain; version=0.0.4");
        evhttp_send_reply(req, HTTP_OK, "OK", out);
    }
    if (out)
        evbuffer_free(out);
    sbuf_free(&b);
}

int metrics_start(void)
{
    refresh = event_new(D->base, -1, EV_PERSIST, refresh_tick, NULL);
    struct timeval tv = { 5, 0 };
    if (!refresh || event_add(refresh, &tv) != 0)
        return -1;
    const char *spec = D->cfg.metrics_listen;
    if (!spec[0])
        return 0;
    char host[64];
    const char *colon = strrchr(spec, ':');
    if (!colon || (size_t)(colon - spec) >= sizeof(host)) {
        log_error("event=metrics_failed error=\"metrics_listen must be HOST:PORT\"");
        return -1;
    }
    memcpy(host, spec, (size_t)(colon - spec));
    host[colon - spec] = '\0';
    long port = strtol(colon + 1, NULL, 10);
    struct in_addr a;
    if (inet_pton(AF_INET, host, &a) != 1 || (ntohl(a.s_addr) >> 24) != 127 || port < 1 || port > 65535) {
        log_error("event=metrics_failed error=\"metrics_listen must be a loopback IPv4 address and port, e.g. 127.0.0.1:9187\"");
        return -1;
    }
    http = evhttp_new(D->base);
    if (!http || evhttp_bind_socket(http, host, (ev_uint16_t)port) != 0) {
        log_error("event=metrics_failed listen=%s error=\"cannot bind\"", spec);
        return -1;
    }
    evhttp_set_allowed_methods(http, EVHTTP_REQ_GET);
    evhttp_set_max_body_size(http, 0);
    evhttp_set_timeout(http, 10);
    evhttp_set_gencb(http, handle, NULL);
    log_notice("event=metrics_listening listen=%s", spec);
    refresh_tick(-1, 0, NULL);
    return 0;
}

void metrics_stop(void)
{
    if (http)
        evhttp_free(http);
    http = NULL;
    if (refresh)
        event_free(refresh);
    refresh = NULL;
}
