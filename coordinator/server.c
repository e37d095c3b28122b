/*
 * server.c - the Unix-socket server: NDJSON framing, pipelining, per-client
 * limits, peer credentials, and the reply path (PROTOCOL.md).
 *
 * Client lifecycle: accept -> reading lines (each parsed and dispatched; the
 * op answers later, in any order) -> closed by EOF, error, a limit, or
 * shutdown. A closed client is only marked dead here and freed from a
 * zero-timeout event after the current callback returns (never free an object
 * inside its own callback). Requests still in progress when their client dies
 * keep running (a payment is never stopped or duplicated by a disconnect);
 * their answers are dropped.
 *
 * Limits against hostile clients: max_request_bytes per line (an oversized
 * line gets request_too_large and the connection closes), max_clients,
 * max_client_pipeline requests in progress (reading pauses beyond it),
 * client_output_limit bytes of unread answers (then disconnect), and
 * client_partial_timeout_ms for a line that never ends.
 */
#include "access.h"
#include "daemon.h"
#include "log.h"
#include "notify.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/listener.h>

typedef struct pc_client {
    struct bufferevent *bev;
    struct event *partial_timer;
    struct pc_client *next_dead;
    pc_request *requests;          /* in progress */
    int nrequests;
    uint64_t id;
    uid_t uid;
    gid_t gid;
    pid_t pid;
    bool dead;
    bool closing;                  /* flush output then close */
    bool half_closed;              /* EOF read: close once every answer is out */
    bool read_paused;
} pc_client;

static struct evconnlistener *listener;
static pc_client *dead_clients;
static struct event *reap_ev;
static uint64_t next_client_id = 1;
static bool socket_activated;

/* Every live client, for shutdown. */
typedef struct client_node { pc_client *c; struct client_node *next; } client_node;

static void client_read_cb(struct bufferevent *bev, void *arg);
static void client_write_cb(struct bufferevent *bev, void *arg);
static void client_event_cb(struct bufferevent *bev, short what, void *arg);

static strmap *live_clients;       /* id -> client */

static void reap_cb(evutil_socket_t fd, short what, void *arg)
{
    while (dead_clients) {
        pc_client *c = dead_clients;
        dead_clients = c->next_dead;
        bufferevent_free(c->bev);
        event_free(c->partial_timer);
        free(c);
    }
}

static void client_close(pc_client *c, const char *why)
{
    if (c->dead)
        return;
    c->dead = true;
    D->nclients--;
    log_info("event=client_close client=%llu uid=%u reason=%s in_progress=%d",
             (unsigned long long)c->id, (unsigned)c->uid, why, c->nrequests);
    for (pc_request *r = c->requests; r; r = r->next)
        r->client = NULL;
    c->requests = NULL;
    bufferevent_disable(c->bev, EV_READ | EV_WRITE);
    bufferevent_setcb(c->bev, NULL, NULL, NULL, NULL);
    event_del(c->partial_timer);
    char key[32];
    snprintf(key, sizeof(key), "%llu", (unsigned long long)c->id);
    strmap_del(live_clients, key);
    c->next_dead = dead_clients;
    dead_clients = c;
    event_active(reap_ev, EV_TIMEOUT, 0);
}

/* Queue one reply line; enforce the output limit. */
static void client_send(pc_client *c, const char *line, size_t len)
{
    struct evbuffer *out = bufferevent_get_output(c->bev);
    if (evbuffer_add(out, line, len) != 0) {
        client_close(c, "out_of_memory");
        return;
    }
    if (evbuffer_get_length(out) > (size_t)D->cfg.client_output_limit)
        client_close(c, "output_limit");
}

static void request_unlink(pc_request *r)
{
    pc_client *c = r->client;
    if (!c)
        return;
    if (r->prev)
        r->prev->next = r->next;
    else
        c->requests = r->next;
    if (r->next)
        r->next->prev = r->prev;
    c->nrequests--;
    if (c->half_closed && c->nrequests == 0 && evbuffer_get_length(bufferevent_get_output(c->bev)) == 0) {
        client_close(c, "eof");
        return;
    }
    if (c->read_paused && c->nrequests < D->cfg.max_client_pipeline && !c->closing && !c->half_closed) {
        c->read_paused = false;
        bufferevent_enable(c->bev, EV_READ);
        client_read_cb(c->bev, c);        /* lines may already be buffered */
    }
}

static void request_free(pc_request *r)
{
    proto_request_free(&r->req);
    free(r);
}

void server_reply_ok(pc_request *r, cJSON *result)
{
    pc_client *c = r->client;
    if (c && !c->dead) {
        size_t len;
        char *line = proto_reply_ok(r->req.id, result, &len);
        if (line) {
            client_send(c, line, len);
            free(line);
        }
        request_unlink(r);      /* no-op if the send closed the client */
    } else {
        cJSON_Delete(result);
    }
    request_free(r);
}

static void reply_err_raw(pc_client *c, const cJSON *id, proto_err code, const char *msg)
{
    size_t len;
    char *line = proto_reply_err(id, code, msg, &len);
    if (line) {
        client_send(c, line, len);
        free(line);
    }
}

void server_reply_err(pc_request *r, proto_err code, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (code < PROTO_ERR__COUNT)
        D->stats.errors_by_code[code]++;
    pc_client *c = r->client;
    if (c && !c->dead) {
        reply_err_raw(c, r->req.id, code, msg);
        request_unlink(r);
    }
    request_free(r);
}

static void handle_line(pc_client *c, const char *line, size_t len)
{
    D->stats.requests++;
    proto_limits lim = { .max_amount = D->cfg.max_amount };
    pc_request *r = calloc(1, sizeof(*r));
    if (!r) {
        reply_err_raw(c, NULL, PROTO_ERR_INTERNAL, "out of memory");
        return;
    }
    proto_error perr;
    memset(&perr, 0, sizeof(perr));
    if (proto_parse(line, len, &lim, &r->req, &perr) != 0) {
        D->stats.errors_by_code[perr.code]++;
        log_info("event=bad_request client=%llu code=%s message=\"%s\"", (unsigned long long)c->id,
                 proto_err_name(perr.code), perr.message);
        reply_err_raw(c, perr.id, perr.code, perr.message);
        proto_error_free(&perr);
        free(r);
        return;
    }
    r->uid = c->uid;
    r->gid = c->gid;
    r->started_us = pc_now_us();
    r->client = c;
    r->next = c->requests;
    if (c->requests)
        c->requests->prev = r;
    c->requests = r;
    c->nrequests++;
    char why[200];
    if (!access_check(c->uid, c->gid, (int)c->pid, r->req.op, why, sizeof(why))) {
        server_reply_err(r, PROTO_ERR_FORBIDDEN, "%s", why);
        return;
    }
    ops_dispatch(r);
}

static void partial_timeout_cb(evutil_socket_t fd, short what, void *arg)
{
    pc_client *c = arg;
    log_warn("event=client_stalled client=%llu buffered=%zu", (unsigned long long)c->id,
             evbuffer_get_length(bufferevent_get_input(c->bev)));
    client_close(c, "partial_line_timeout");
}

static void too_large(pc_client *c)
{
    log_warn("event=request_too_large client=%llu limit=%d", (unsigned long long)c->id,
             D->cfg.max_request_bytes);
    D->stats.errors_by_code[PROTO_ERR_REQUEST_TOO_LARGE]++;
    char msg[96];
    snprintf(msg, sizeof(msg), "request line longer than %d bytes", D->cfg.max_request_bytes);
    reply_err_raw(c, NULL, PROTO_ERR_REQUEST_TOO_LARGE, msg);
    if (c->dead)
        return;
    c->closing = true;
    bufferevent_disable(c->bev, EV_READ);
    event_del(c->partial_timer);
    if (evbuffer_get_length(bufferevent_get_output(c->bev)) == 0)
        client_close(c, "request_too_large");
}

static void client_read_cb(struct bufferevent *bev, void *arg)
{
    pc_client *c = arg;
    struct evbuffer *in = bufferevent_get_input(bev);
    size_t max = (size_t)D->cfg.max_request_bytes;
    while (!c->dead && !c->closing) {
        if (c->nrequests >= D->cfg.max_client_pipeline) {
            c->read_paused = true;
            bufferevent_disable(bev, EV_READ);
            break;
        }
        size_t eol_len;
        struct evbuffer_ptr pos = evbuffer_search_eol(in, NULL, &eol_len, EVBUFFER_EOL_LF);
        if (pos.pos < 0) {
            if (evbuffer_get_length(in) > max) {
                too_large(c);
                return;
            }
            break;
        }
        size_t len = (size_t)pos.pos;
        if (len > max) {
            too_large(c);
            return;
        }
        unsigned char *p = evbuffer_pullup(in, (ssize_t)(len + 1));
        if (!p) {
            client_close(c, "out_of_memory");
            return;
        }
        /* Tolerate CRLF: the '\r' is not part of the JSON text. */
        size_t jl = (len && p[len - 1] == '\r') ? len - 1 : len;
        bool blank = true;
        for (size_t i = 0; i < jl && blank; i++)
            blank = (p[i] == ' ' || p[i] == '\t');
        if (!blank)
            handle_line(c, (const char *)p, jl);
        evbuffer_drain(in, len + 1);
    }
    if (c->dead || c->closing)
        return;
    if (evbuffer_get_length(in) > 0) {
        if (!evtimer_pending(c->partial_timer, NULL)) {
            struct timeval tv = { D->cfg.client_partial_timeout_ms / 1000,
                                  (D->cfg.client_partial_timeout_ms % 1000) * 1000 };
            evtimer_add(c->partial_timer, &tv);
        }
    } else {
        event_del(c->partial_timer);
    }
}

static void client_write_cb(struct bufferevent *bev, void *arg)
{
    pc_client *c = arg;
    if (evbuffer_get_length(bufferevent_get_output(bev)) != 0)
        return;
    if (c->closing)
        client_close(c, "request_too_large");
    else if (c->half_closed && c->nrequests == 0)
        client_close(c, "eof");
}

static void client_event_cb(struct bufferevent *bev, short what, void *arg)
{
    pc_client *c = arg;
    if (what & BEV_EVENT_EOF) {
        /* A client may shut down its sending side and still wait for its
         * answers (echo ... | socat): keep writing until they are out. */
        if (c->nrequests > 0 || evbuffer_get_length(bufferevent_get_output(bev)) > 0) {
            c->half_closed = true;
            bufferevent_disable(bev, EV_READ);
            event_del(c->partial_timer);
            return;
        }
        client_close(c, "eof");
    }
    else if (what & BEV_EVENT_ERROR)
        client_close(c, strerror(EVUTIL_SOCKET_ERROR()));
}

static void accept_cb(struct evconnlistener *l, evutil_socket_t fd, struct sockaddr *sa, int salen, void *arg)
{
    if (D->nclients >= D->cfg.max_clients || D->shutting_down) {
        D->stats.clients_refused++;
        static const char busy[] = "{\"id\":null,\"ok\":false,\"error\":{\"code\":\"overloaded\",\"message\":\"too many clients; try again later\"}}\n";
        static const char down[] = "{\"id\":null,\"ok\":false,\"error\":{\"code\":\"shutting_down\",\"message\":\"the daemon is shutting down\"}}\n";
        const char *m = D->shutting_down ? down : busy;
        ssize_t w = send(fd, m, strlen(m), MSG_DONTWAIT | MSG_NOSIGNAL);
        (void)w;
        log_warn("event=client_refused clients=%d max_clients=%d", D->nclients, D->cfg.max_clients);
        close(fd);
        return;
    }
    pc_client *c = calloc(1, sizeof(*c));
    if (!c) {
        close(fd);
        return;
    }
    struct ucred cred;
    socklen_t cl = sizeof(cred);
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &cl) == 0) {
        c->uid = cred.uid;
        c->gid = cred.gid;
        c->pid = cred.pid;
    } else {
        c->uid = (uid_t)-1;
        c->gid = (gid_t)-1;
    }
    evutil_make_socket_nonblocking(fd);
    c->bev = bufferevent_socket_new(D->base, fd, BEV_OPT_CLOSE_ON_FREE);
    c->partial_timer = evtimer_new(D->base, partial_timeout_cb, c);
    if (!c->bev || !c->partial_timer) {
        if (c->bev)
            bufferevent_free(c->bev);
        else
            close(fd);
        if (c->partial_timer)
            event_free(c->partial_timer);
        free(c);
        return;
    }
    c->id = next_client_id++;
    char key[32];
    snprintf(key, sizeof(key), "%llu", (unsigned long long)c->id);
    if (strmap_put(live_clients, key, c) != 0) {
        bufferevent_free(c->bev);
        event_free(c->partial_timer);
        free(c);
        return;
    }
    D->nclients++;
    D->stats.clients_accepted++;
    bufferevent_setcb(c->bev, client_read_cb, client_write_cb, client_event_cb, c);
    bufferevent_enable(c->bev, EV_READ | EV_WRITE);
    log_debug("event=client_accept client=%llu uid=%u gid=%u pid=%d", (unsigned long long)c->id,
              (unsigned)c->uid, (unsigned)c->gid, (int)c->pid);
}

static void listener_error_cb(struct evconnlistener *l, void *arg)
{
    int err = EVUTIL_SOCKET_ERROR();
    log_error("event=accept_error error=\"%s\"", evutil_socket_error_to_string(err));
}

/* A listening Unix stream socket handed over by systemd (paycoord.socket). */
static int adopt_listen_fd(int fd)
{
    int type = 0, acc = 0;
    socklen_t l1 = sizeof(type), l2 = sizeof(acc);
    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &l1) != 0 || type != SOCK_STREAM ||
        getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &acc, &l2) != 0 || !acc) {
        log_error("event=listen_failed source=systemd fd=%d error=\"not a listening stream socket\"", fd);
        return -1;
    }
    evutil_make_socket_nonblocking(fd);
    evutil_make_socket_closeonexec(fd);
    listener = evconnlistener_new(D->base, accept_cb, NULL, LEV_OPT_CLOSE_ON_FREE, -1, fd);
    if (!listener)
        return -1;
    evconnlistener_set_error_cb(listener, listener_error_cb);
    socket_activated = true;
    log_notice("event=listening source=systemd fd=%d", fd);
    return 0;
}

/* Others must not be able to replace our socket: refuse a directory that
 * anyone may write to. */
static int check_socket_dir(const char *path)
{
    char dir[128];
    const char *slash = strrchr(path, '/');
    size_t n = slash ? (size_t)(slash - path) : 0;
    if (n == 0)
        memcpy(dir, slash ? "/" : ".", 2);
    else if (n < sizeof(dir)) {
        memcpy(dir, path, n);
        dir[n] = '\0';
    } else
        return -1;
    struct stat st;
    if (stat(dir, &st) != 0) {
        log_error("event=listen_failed dir=%s error=\"%s\"", dir, strerror(errno));
        return -1;
    }
    if (st.st_mode & S_IWOTH) {
        log_error("event=listen_failed dir=%s error=\"directory is writable by others; use a private directory such as /run/paycoord\"",
                  dir);
        return -1;
    }
    return 0;
}

int server_start(void)
{
    const pc_config *cfg = &D->cfg;
    live_clients = strmap_new();
    reap_ev = event_new(D->base, -1, 0, reap_cb, NULL);
    if (!live_clients || !reap_ev)
        return -1;
    int passed = notify_listen_fd();
    if (passed >= 0)
        return adopt_listen_fd(passed);
    if (check_socket_dir(cfg->listen_socket) != 0)
        return -1;

    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        log_error("event=listen_failed error=\"socket: %s\"", strerror(errno));
        return -1;
    }
    struct sockaddr_un sun;
    memset(&sun, 0, sizeof(sun));
    sun.sun_family = AF_UNIX;
    size_t plen = strlen(cfg->listen_socket);
    memcpy(sun.sun_path, cfg->listen_socket, plen + 1);
    /* A stale socket file from a crashed run: remove it only if nobody answers on it. */
    struct stat st;
    if (lstat(cfg->listen_socket, &st) == 0) {
        if (!S_ISSOCK(st.st_mode)) {
            log_error("event=listen_failed path=%s error=\"exists and is not a socket\"", cfg->listen_socket);
            close(fd);
            return -1;
        }
        int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (probe >= 0 && connect(probe, (struct sockaddr *)&sun, sizeof(sun)) == 0) {
            log_error("event=listen_failed path=%s error=\"another daemon is listening\"", cfg->listen_socket);
            close(probe);
            close(fd);
            return -1;
        }
        if (probe >= 0)
            close(probe);
        unlink(cfg->listen_socket);
    }
    mode_t old = umask(0177);
    int rc = bind(fd, (struct sockaddr *)&sun, sizeof(sun));
    umask(old);
    if (rc != 0) {
        log_error("event=listen_failed path=%s error=\"bind: %s\"", cfg->listen_socket, strerror(errno));
        close(fd);
        return -1;
    }
    if (cfg->listen_group[0]) {
        struct group *g = getgrnam(cfg->listen_group);
        if (!g || chown(cfg->listen_socket, (uid_t)-1, g->gr_gid) != 0) {
            log_error("event=listen_failed path=%s error=\"cannot give the socket to group %s\"",
                      cfg->listen_socket, cfg->listen_group);
            close(fd);
            return -1;
        }
    }
    if (chmod(cfg->listen_socket, (mode_t)cfg->listen_mode) != 0) {
        log_error("event=listen_failed path=%s error=\"chmod: %s\"", cfg->listen_socket, strerror(errno));
        close(fd);
        return -1;
    }
    listener = evconnlistener_new(D->base, accept_cb, NULL, LEV_OPT_CLOSE_ON_FREE, 1024, fd);
    if (!listener) {
        log_error("event=listen_failed path=%s", cfg->listen_socket);
        close(fd);
        return -1;
    }
    evconnlistener_set_error_cb(listener, listener_error_cb);
    log_notice("event=listening path=%s mode=%04o", cfg->listen_socket, (unsigned)cfg->listen_mode);
    return 0;
}

void server_stop_listening(void)
{
    if (listener) {
        evconnlistener_free(listener);
        listener = NULL;
        if (!socket_activated)      /* systemd owns a passed-in socket's file */
            unlink(D->cfg.listen_socket);
        log_notice("event=listener_closed");
    }
}

static void close_one(const char *key, void *value, void *arg)
{
    client_node **list = arg;
    client_node *n = malloc(sizeof(*n));
    if (n) {
        n->c = value;
        n->next = *list;
        *list = n;
    }
}

void server_close_all(void)
{
    client_node *list = NULL;
    if (live_clients)
        strmap_each(live_clients, close_one, &list);
    while (list) {
        client_node *n = list;
        list = n->next;
        client_close(n->c, "shutdown");
        free(n);
    }
    reap_cb(-1, 0, NULL);
    strmap_free(live_clients);
    live_clients = NULL;
    if (reap_ev)
        event_free(reap_ev);
    reap_ev = NULL;
}
