/*
 * main.c - paycoord: command line, configuration, the event loop, signals
 * (SIGTERM/SIGINT drain and exit, SIGHUP reload) and the time helpers.
 *
 * Shutdown: stop accepting, answer new requests `shutting_down`, let payments
 * in flight finish for up to drain_timeout_ms, then exit 0. Whatever is still
 * prepared stays prepared: recovery settles it on the next start.
 */
#include "daemon.h"
#include "log.h"
#include "metrics.h"
#include "notify.h"

#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <curl/curl.h>
#include <event2/event.h>

pc_daemon *D;
static pc_daemon daemon_state;
static struct event *drain_timer;
static struct event *startup_timer;
static uint64_t drain_started_ms;
static bool ready_sent;

void pc_readiness_changed(void)
{
    if (ready_sent || D->shutting_down)
        return;
    if (!pgpool_is_up(D->pool) || D->max_prepared_server <= 0 || !rec_node_locked() || !rec_first_pass_done())
        return;
    ready_sent = true;
    notify_send("READY=1\nSTATUS=serving: node %s", D->cfg.node_id);
    log_notice("event=ready node=%s startup_ms=%llu", D->cfg.node_id,
               (unsigned long long)(pc_now_ms() - D->started_ms));
}

/* Until READY=1: tell systemd what we wait for, and extend the start timeout
 * while the startup recovery pass runs (it may be long after a crash). */
static void startup_cb(evutil_socket_t fd, short what, void *arg)
{
    if (ready_sent) {
        event_del(startup_timer);
        return;
    }
    if (rec_busy())
        notify_send("EXTEND_TIMEOUT_USEC=20000000\nSTATUS=recovering in-doubt payments");
    else if (!pgpool_is_up(D->pool))
        notify_send("STATUS=waiting for the database");
    else if (!rec_node_locked())
        notify_send("STATUS=waiting for the node lock of %s", D->cfg.node_id);
}

uint64_t pc_now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

uint64_t pc_now_ms(void) { return pc_now_us() / 1000u; }

int64_t pc_wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void pc_format_time(int64_t wall_ms, char out[32])
{
    time_t s = (time_t)(wall_ms / 1000);
    struct tm tm;
    gmtime_r(&s, &tm);
    size_t n = strftime(out, 32, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(out + n, 32 - n, ".%03dZ", (int)(wall_ms % 1000));
}

#ifdef PAYCOORD_FAILPOINTS
static const char *failpoint_name, *failpoint_key;
bool failpoint_armed(const char *name, const char *key)
{
    return failpoint_name && strcmp(failpoint_name, name) == 0 &&
           (!failpoint_key || (key && strcmp(failpoint_key, key) == 0));
}

void failpoint(const char *name, const char *key)
{
    if (failpoint_armed(name, key)) {
        log_error("event=failpoint name=%s key=%s action=_exit", name, key ? key : "-");
        fflush(stderr);
        _exit(99);
    }
}
#endif

static void usage(FILE *out)
{
    fprintf(out, "usage: paycoord --config FILE [--check-config]\n"
                 "       paycoord --version | --config-reference | --config-sample\n");
}

/* The token file must exist and be readable by nobody but its owner/group. */
static int read_token(const char *path, char **out, char *err, size_t errlen)
{
    *out = NULL;
    if (!path[0]) {
        *out = strdup("");
        return *out ? 0 : -1;
    }
    FILE *f = fopen(path, "r");
    if (!f) {
        snprintf(err, errlen, "processor_token_file: %s: %s", path, strerror(errno));
        return -1;
    }
    struct stat st;
    if (fstat(fileno(f), &st) != 0 || (st.st_mode & S_IROTH) || (st.st_mode & S_IWOTH)) {
        snprintf(err, errlen, "processor_token_file: %s is readable or writable by others; chmod o-rw it", path);
        fclose(f);
        return -1;
    }
    char buf[4096];
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    while (n && (buf[n - 1] == '\n' || buf[n - 1] == '\r' || buf[n - 1] == ' '))
        buf[--n] = '\0';
    if (!n || strpbrk(buf, "\r\n")) {
        snprintf(err, errlen, "processor_token_file: %s must hold one non-empty line", path);
        return -1;
    }
    *out = strdup(buf);
    return *out ? 0 : -1;
}

static void drain_cb(evutil_socket_t fd, short what, void *arg)
{
    int left = pay_in_flight();
    uint64_t elapsed = pc_now_ms() - drain_started_ms;
    if (left == 0)
        pay_flush();            /* the last processor_refs; then wait for the pool */
    bool db_idle = pgpool_busy(D->pool) == 0 && pgpool_queued(D->pool) == 0;
    if ((left == 0 && db_idle) || elapsed >= (uint64_t)D->cfg.drain_timeout_ms) {
        if (left)
            log_warn("event=drain_timeout left_in_flight=%d note=\"prepared debits stay for recovery\"", left);
        event_base_loopbreak(D->base);
        return;
    }
    struct timeval tv = { 0, 20000 };
    evtimer_add(drain_timer, &tv);
}

static void on_terminate(evutil_socket_t sig, short what, void *arg)
{
    if (D->shutting_down)
        return;
    D->shutting_down = true;
    notify_send("STOPPING=1\nSTATUS=draining %d payments", pay_in_flight());
    log_notice("event=shutdown signal=%d in_flight=%d drain_timeout_ms=%d", (int)sig, pay_in_flight(),
               D->cfg.drain_timeout_ms);
    server_stop_listening();
    drain_started_ms = pc_now_ms();
    drain_timer = evtimer_new(D->base, drain_cb, NULL);
    drain_cb(-1, 0, NULL);
}

static void on_reload(evutil_socket_t sig, short what, void *arg)
{
    pc_config n;
    char err[512];
    notify_reloading();
    config_defaults(&n);
    if (config_load(&n, D->config_path, err, sizeof(err)) != 0 || config_validate(&n, err, sizeof(err)) != 0) {
        log_error("event=reload_failed error=\"%s\" note=\"keeping the running configuration\"", err);
        if (ready_sent)
            notify_send("READY=1\nSTATUS=reload failed, running the previous configuration: %.200s", err);
        config_free(&n);
        return;
    }
    config_apply_reloadable(&D->cfg, &n);
    if (D->max_prepared_server > 0)
        D->prepared_limit = (int)((int64_t)D->max_prepared_server * D->cfg.prepared_share_percent / 100);
    log_set_level(log_level_parse(D->cfg.log_level));
    log_set_timestamps(D->cfg.log_timestamps);
    config_free(&n);
    log_notice("event=reloaded path=%s", D->config_path);
    if (ready_sent)
        notify_send("READY=1\nSTATUS=serving: node %s (configuration reloaded)", D->cfg.node_id);
    else
        notify_send("STATUS=configuration reloaded; still starting");
}

static void on_db_state(bool up, void *arg)
{
    pay_db_state_changed(up);
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        { "config", required_argument, NULL, 'c' },
        { "check-config", no_argument, NULL, 'k' },
        { "version", no_argument, NULL, 'V' },
        { "config-reference", no_argument, NULL, 'R' },
        { "config-sample", no_argument, NULL, 'S' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    const char *config_path = NULL;
    bool check_only = false;
    int c;
    while ((c = getopt_long(argc, argv, "c:h", opts, NULL)) != -1) {
        switch (c) {
        case 'c': config_path = optarg; break;
        case 'k': check_only = true; break;
        case 'V': printf("paycoord %s (protocol %d)\n", PAYCOORD_VERSION, PROTO_VERSION); return 0;
        case 'R': config_print_reference(stdout); return 0;
        case 'S': config_print_sample(stdout); return 0;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (!config_path || optind != argc) {
        usage(stderr);
        return 2;
    }

    D = &daemon_state;
    D->config_path = config_path;
    D->max_prepared_server = -1;
    D->processor_ok = true;
    D->started_ms = pc_now_ms();
    char err[512];
    config_defaults(&D->cfg);
    if (config_load(&D->cfg, config_path, err, sizeof(err)) != 0 ||
        config_validate(&D->cfg, err, sizeof(err)) != 0 ||
        read_token(D->cfg.processor_token_file, &D->token, err, sizeof(err)) != 0) {
        fprintf(stderr, "paycoord: %s\n", err);
        return 1;
    }
    if (geteuid() == 0 && !D->cfg.allow_root) {
        fprintf(stderr, "paycoord: refusing to run as root; run it as a dedicated user "
                        "(or set allow_root = true in %s)\n", config_path);
        return 1;
    }
    if (check_only) {
        printf("paycoord: configuration %s is valid\n", config_path);
        return 0;
    }
    log_set_level(log_level_parse(D->cfg.log_level));
    log_set_timestamps(D->cfg.log_timestamps);
#ifdef PAYCOORD_FAILPOINTS
    failpoint_name = getenv("PAYCOORD_FAILPOINT");
    if (failpoint_name && !failpoint_name[0])
        failpoint_name = NULL;
    failpoint_key = getenv("PAYCOORD_FAILPOINT_KEY");
    if (failpoint_key && !failpoint_key[0])
        failpoint_key = NULL;
    if (failpoint_name)
        log_warn("event=failpoint_armed name=%s", failpoint_name);
#endif
    srandom((unsigned)(pc_now_us() ^ (uint64_t)getpid()));
    signal(SIGPIPE, SIG_IGN);
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != 0) {
        fprintf(stderr, "paycoord: curl_global_init failed\n");
        return 1;
    }

    int rc = 1;
    D->base = event_base_new();
    if (!D->base)
        goto out;
    notify_init(D->base);
    pgpool_config pc = { .conninfo = D->cfg.db_conninfo, .size = D->cfg.pool_size,
                         .max_queue = D->cfg.max_in_flight * 4 + 1024, .connect_timeout_ms = 5000,
                         .reconnect_min_ms = 100, .reconnect_max_ms = D->cfg.db_reconnect_max_ms };
    psp_config sc = { .base_url = D->cfg.processor_url, .token = D->token,
                      .connect_timeout_ms = D->cfg.processor_connect_timeout_ms,
                      .request_timeout_ms = D->cfg.processor_timeout_ms,
                      .max_connections = D->cfg.processor_max_connections ? D->cfg.processor_max_connections
                                                                          : D->cfg.max_in_flight,
                      .verify_peer = D->cfg.processor_verify_peer };
    if (D->cfg.processor_max_connections && D->cfg.processor_max_connections < D->cfg.max_in_flight)
        log_warn("event=config_warning key=processor_max_connections value=%d max_in_flight=%d "
                 "note=\"throughput is capped at processor_max_connections / processor latency\"",
                 D->cfg.processor_max_connections, D->cfg.max_in_flight);
    if (pay_init() != 0)
        goto out;
    D->pool = pgpool_new(D->base, &pc);
    D->psp = psp_new(D->base, &sc);
    if (!D->pool || !D->psp) {
        log_error("event=startup_failed what=%s", D->pool ? "processor client" : "database pool");
        goto out;
    }
    pgpool_set_state_cb(D->pool, on_db_state, NULL);
    if (rec_init() != 0) {
        log_error("event=startup_failed what=recovery");
        goto out;
    }
    if (server_start() != 0 || metrics_start() != 0)
        goto out;
    startup_timer = event_new(D->base, -1, EV_PERSIST, startup_cb, NULL);
    if (startup_timer) {
        struct timeval st = { 5, 0 };
        event_add(startup_timer, &st);
    }
    notify_send("STATUS=starting");
    struct event *sigterm = evsignal_new(D->base, SIGTERM, on_terminate, NULL);
    struct event *sigint = evsignal_new(D->base, SIGINT, on_terminate, NULL);
    struct event *sighup = evsignal_new(D->base, SIGHUP, on_reload, NULL);
    if (!sigterm || !sigint || !sighup)
        goto out;
    event_add(sigterm, NULL);
    event_add(sigint, NULL);
    event_add(sighup, NULL);
    log_notice("event=started version=%s node=%s pid=%d pool_size=%d processor=%s", PAYCOORD_VERSION,
               D->cfg.node_id, (int)getpid(), D->cfg.pool_size, D->cfg.processor_url);

    event_base_dispatch(D->base);

    int left = pay_in_flight();
    server_close_all();
    if (left == 0 && !rec_busy()) {
        /* Nothing in flight: tear down in dependency order. (Otherwise the
         * process exit releases memory; prepared debits stay for recovery.) */
        metrics_stop();
        rec_shutdown();
        psp_free(D->psp);
        pgpool_free(D->pool);
        pay_shutdown();
        event_free(sigterm);
        event_free(sigint);
        event_free(sighup);
        if (drain_timer)
            event_free(drain_timer);
        if (startup_timer)
            event_free(startup_timer);
        notify_free();
        event_base_free(D->base);
        D->base = NULL;
    }
    log_notice("event=stopped left_in_flight=%d", left);
    rc = 0;
out:
    if (rc != 0)
        log_error("event=startup_failed");
    free(D->token);
    config_free(&D->cfg);
    curl_global_cleanup();
    return rc;
}
