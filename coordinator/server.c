/*
 * server.c - the Unix-socket server: NDJSON framing, pipelining, per-client
 * limits, peer credentials, and the reply path (docs/protocol.md).
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
#include "server.h"
#include "access.h"
#include "ctx.h"
#include "list.h"
#include "log.h"
#include "loop.h"
#include "notify.h"
#include "ops.h"
#include "request.h"

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
    pc_list link;                  /* live_clients, then dead_clients */
    struct bufferevent *bev;
    struct event *partial_timer;
    pc_list requests;              /* pc_request.link: in progress */
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
static pc_list live_clients, dead_clients;
static struct event *reap_ev;
static uint64_t next_client_id = 1;
static bool socket_activated;

static void client_read_cb(struct bufferevent *bev, void *arg);
static void client_write_cb(struct bufferevent *bev, void *arg);
static void client_event_cb(struct bufferevent *bev, short what, void *arg);
static void deliver(pc_request *r, char *line, size_t len);

static const req_sink client_sink = { deliver };

static void reap_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    (void)arg;
    pc_list *n;
    while ((n = list_pop_head(&dead_clients))) {
        pc_client *c = list_entry(n, pc_client, link);
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
    /* Requests in progress go on (a payment is never stopped by a
     * disconnect); their answers are dropped. */
    pc_list *n;
    while ((n = list_pop_head(&c->requests)))
        list_entry(n, pc_request, link)->owner = NULL;
    c->nrequests = 0;
    bufferevent_disable(c->bev, EV_READ | EV_WRITE);
    bufferevent_setcb(c->bev, NULL, NULL, NULL, NULL);
    event_del(c->partial_timer);
    list_unlink(&c->link);
    list_push_tail(&dead_clients, &c->link);
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

/* The request is answered: it leaves its client's list; reading resumes or
 * a half-closed client closes. */
static void request_done(pc_client *c, pc_request *r)
{
    list_unlink(&r->link);
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

/* The sink of every request read here (request.h). */
static void deliver(pc_request *r, char *line, size_t len)
{
    pc_client *c = r->owner;
    if (c && !c->dead) {
        if (line)
            client_send(c, line, len);
        if (!c->dead)
            request_done(c, r);
    }
    free(line);
    req_free(r);
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

static void handle_line(pc_client *c, const char *line, size_t len)
{
    D->stats.requests++;
    proto_limits lim = { .max_amount = D->cfg.max_amount };
    pc_request *r = req_new(&client_sink, c);
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
        req_free(r);
        return;
    }
    r->uid = c->uid;
    r->gid = c->gid;
    r->started_us = loop_now_us();
    list_push_tail(&c->requests, &r->link);
    c->nrequests++;
    char why[200];
    if (!access_check(c->uid, c->gid, (int)c->pid, r->req.op, why, sizeof(why))) {
        req_reply_err(r, PROTO_ERR_FORBIDDEN, "%s", why);
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
    list_init(&c->link);
    list_init(&c->requests);
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
    c->bev = bufferevent_socket_new(loop_base(), fd, BEV_OPT_CLOSE_ON_FREE);
    c->partial_timer = evtimer_new(loop_base(), partial_timeout_cb, c);
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
    list_init(&c->requests);
    list_push_tail(&live_clients, &c->link);
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
    listener = evconnlistener_new(loop_base(), accept_cb, NULL, LEV_OPT_CLOSE_ON_FREE, -1, fd);
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
    list_init(&live_clients);
    list_init(&dead_clients);
    reap_ev = event_new(loop_base(), -1, 0, reap_cb, NULL);
    if (!reap_ev)
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
    listener = evconnlistener_new(loop_base(), accept_cb, NULL, LEV_OPT_CLOSE_ON_FREE, 1024, fd);
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

void server_close_all(void)
{
    pc_list *n;
    while ((n = list_first(&live_clients)))
        client_close(list_entry(n, pc_client, link), "shutdown");
    reap_cb(-1, 0, NULL);
    if (reap_ev)
        event_free(reap_ev);
    reap_ev = NULL;
}
