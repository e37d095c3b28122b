/*
 * metrics.c - GET /metrics in Prometheus text format on metrics_listen
 * ("127.0.0.1:PORT"; loopback only). The text is stats.c's; a scrape never
 * waits on the database.
 */
#include "metrics.h"
#include "ctx.h"
#include "log.h"
#include "loop.h"
#include "sbuf.h"
#include "stats.h"

#include <arpa/inet.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>
#include <event2/http.h>

static struct evhttp *http;

static void handle(struct evhttp_request *req, void *arg)
{
    (void)arg;
    const char *uri = evhttp_request_get_uri(req);
    if (evhttp_request_get_command(req) != EVHTTP_REQ_GET || !uri || strncmp(uri, "/metrics", 8) != 0 ||
        (uri[8] != '\0' && uri[8] != '?')) {
        evhttp_send_error(req, HTTP_NOTFOUND, "only GET /metrics");
        return;
    }
    sbuf b;
    sbuf_init(&b);
    stats_prometheus(&b);
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
    http = evhttp_new(loop_base());
    if (!http || evhttp_bind_socket(http, host, (ev_uint16_t)port) != 0) {
        log_error("event=metrics_failed listen=%s error=\"cannot bind\"", spec);
        return -1;
    }
    evhttp_set_allowed_methods(http, EVHTTP_REQ_GET);
    evhttp_set_max_body_size(http, 0);
    evhttp_set_timeout(http, 10);
    evhttp_set_gencb(http, handle, NULL);
    log_notice("event=metrics_listening listen=%s", spec);
    return 0;
}

void metrics_stop(void)
{
    if (http)
        evhttp_free(http);
    http = NULL;
}
