/*
 * main.c - paycoord: command line, configuration, the event loop, signals
 * (SIGTERM/SIGINT drain and exit, SIGHUP reload), start-up in layer order and
 * readiness.
 *
 * Shutdown: stop accepting, answer new requests `shutting_down`, let payments
 * in flight finish for up to drain_timeout_ms, then exit 0. Whatever is still
 * prepared stays prepared: recovery settles it on the next start.
 */
#include "access.h"
#include "account.h"
#include "config.h"
#include "ctx.h"
#include "failpoint.h"
#include "log.h"
#include "loop.h"
#include "metrics.h"
#include "nodelock.h"
#include "notify.h"
#include "ops.h"
#include "owner.h"
#include "payment.h"
#include "proc.h"
#include "recon.h"
#include "recovery.h"
#include "rng.h"
#include "server.h"
#include "stats.h"
#include "store.h"
#include "webhook.h"

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

static struct event_base *base;
static struct event *drain_timer;
static struct event *startup_timer;
static uint64_t drain_started_ms;
static bool ready_sent;

/* Something readiness depends on changed (registered with ctx at start):
 * READY=1 once the daemon listens, has its database, its node lock and a
 * finished first recovery pass. */
static void readiness_changed(void)
{
    if (ready_sent || D->shutting_down || !ops_ready())
        return;
    ready_sent = true;
    notify_send("READY=1\nSTATUS=serving: node %s", D->cfg.node_id);
    log_notice("event=ready node=%s startup_ms=%llu", D->cfg.node_id,
               (unsigned long long)(loop_now_ms() - D->started_ms));
}

/* Until READY=1: tell systemd what we wait for, and extend the start timeout
 * while the startup recovery pass runs (it may be long after a crash). */
static void startup_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    (void)arg;
    if (ready_sent) {
        event_del(startup_timer);
        return;
    }
    if (rec_busy())
        notify_send("EXTEND_TIMEOUT_USEC=20000000\nSTATUS=recovering in-doubt payments");
    else if (!store_is_up())
        notify_send("STATUS=waiting for the database");
    else if (!rec_node_locked())
        notify_send("STATUS=waiting for the node lock of %s", D->cfg.node_id);
}

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
    (void)fd;
    (void)what;
    (void)arg;
    int left = pay_in_flight();
    uint64_t elapsed = loop_now_ms() - drain_started_ms;
    if (left == 0)
        store_flush();          /* the last batched row writes; then wait for the pools */
    if ((left == 0 && store_busy() == 0) || elapsed >= (uint64_t)D->cfg.drain_timeout_ms) {
        if (left)
            log_warn("event=drain_timeout left_in_flight=%d note=\"prepared debits stay for recovery\"", left);
        event_base_loopbreak(base);
        return;
    }
    struct timeval tv = { 0, 20000 };
    evtimer_add(drain_timer, &tv);
}

static void on_terminate(evutil_socket_t sig, short what, void *arg)
{
    (void)what;
    (void)arg;
    if (D->shutting_down)
        return;
    D->shutting_down = true;
    notify_send("STOPPING=1\nSTATUS=draining %d payments", pay_in_flight());
    log_notice("event=shutdown signal=%d in_flight=%d drain_timeout_ms=%d", (int)sig, pay_in_flight(),
               D->cfg.drain_timeout_ms);
    server_stop_listening();
    drain_started_ms = loop_now_ms();
    drain_timer = evtimer_new(base, drain_cb, NULL);
    drain_cb(-1, 0, NULL);
}

static void on_reload(evutil_socket_t sig, short what, void *arg)
{
    (void)sig;
    (void)what;
    (void)arg;
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
    access_configure(&D->cfg);
    ctx_update_prepared_limit();
    log_set_level(log_level_parse(D->cfg.log_level));
    log_set_timestamps(D->cfg.log_timestamps);
    config_free(&n);
    log_notice("event=reloaded path=%s", D->config_path);
    if (ready_sent)
        notify_send("READY=1\nSTATUS=serving: node %s (configuration reloaded)", D->cfg.node_id);
    else
        notify_send("STATUS=configuration reloaded; still starting");
}

static void max_prepared_cb(st_status st, int value, void *arg)
{
    (void)arg;
    if (st != ST_OK) {
        log_warn("event=max_prepared_unknown");
        return;
    }
    D->max_prepared_server = value;
    ctx_update_prepared_limit();
    if (value == 0) {
        log_error("event=two_phase_disabled alert=config hint=\"set max_prepared_transactions in postgresql.conf\"");
        D->stats.alerts++;
    } else {
        log_notice("event=max_prepared server=%d our_limit=%d", value, D->prepared_limit);
    }
    ctx_readiness_changed();
}

static void on_db_state(bool up)
{
    log_notice("event=database state=%s", up ? "up" : "down");
    ctx_readiness_changed();
    if (up && store_max_prepared(max_prepared_cb, NULL) != STORE_QUEUED)
        log_warn("event=max_prepared_query_failed");
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

    D->config_path = config_path;
    D->max_prepared_server = -1;
    D->started_ms = loop_now_ms();
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
    access_configure(&D->cfg);
    failpoint_init_from_env();
    rng_seed(loop_now_us() ^ ((uint64_t)getpid() << 32) ^ (uint64_t)time(NULL));
    signal(SIGPIPE, SIG_IGN);
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != 0) {
        fprintf(stderr, "paycoord: curl_global_init failed\n");
        return 1;
    }

    int rc = 1;
    struct event *sigterm = NULL, *sigint = NULL, *sighup = NULL;
    base = event_base_new();
    if (!base)
        goto out;
    loop_init_libevent(base);
    notify_init(base);
    ctx_set_readiness_cb(readiness_changed);
    if (D->cfg.processor_max_connections && D->cfg.processor_max_connections < D->cfg.max_in_flight)
        log_warn("event=config_warning key=processor_max_connections value=%d max_in_flight=%d "
                 "note=\"throughput is capped at processor_max_connections / processor latency\"",
                 D->cfg.processor_max_connections, D->cfg.max_in_flight);
    /* Bottom up: the registry and in-memory modules, the two outside systems,
     * recovery, then the socket. */
    if (owner_init() != 0 || account_init() != 0 || pay_init() != 0) {
        log_error("event=startup_failed what=memory");
        goto out;
    }
    if (store_init() != 0) {
        log_error("event=startup_failed what=\"database pools\"");
        goto out;
    }
    store_set_state_cb(on_db_state);
    if (proc_start() != 0) {
        log_error("event=startup_failed what=\"processor client\"");
        goto out;
    }
    if (webhook_start() != 0)
        goto out;
    if (rec_init() != 0) {
        log_error("event=startup_failed what=recovery");
        goto out;
    }
    if (recon_init() != 0) {
        log_error("event=startup_failed what=reconciliation");
        goto out;
    }
    if (server_start() != 0 || metrics_start() != 0 || stats_start() != 0)
        goto out;
    startup_timer = event_new(base, -1, EV_PERSIST, startup_cb, NULL);
    if (startup_timer) {
        struct timeval st = { 5, 0 };
        event_add(startup_timer, &st);
    }
    notify_send("STATUS=starting");
    sigterm = evsignal_new(base, SIGTERM, on_terminate, NULL);
    sigint = evsignal_new(base, SIGINT, on_terminate, NULL);
    sighup = evsignal_new(base, SIGHUP, on_reload, NULL);
    if (!sigterm || !sigint || !sighup)
        goto out;
    event_add(sigterm, NULL);
    event_add(sigint, NULL);
    event_add(sighup, NULL);
    log_notice("event=started version=%s node=%s pid=%d pool_size=%d processor=%s", PAYCOORD_VERSION,
               D->cfg.node_id, (int)getpid(), D->cfg.pool_size, D->cfg.processor_url);

    event_base_dispatch(base);

    rc = 0;
    log_notice("event=stopped left_in_flight=%d", pay_in_flight());
out:
    if (rc != 0)
        log_error("event=startup_failed");
    /* Top down. The store and the processor client go first and fire every
     * outstanding callback (with "shutdown"), so that nothing below is
     * called back after it is freed; prepared debits stay for recovery. */
    server_close_all();
    metrics_stop();
    webhook_stop();
    stats_stop();
    recon_shutdown();
    store_shutdown();
    proc_shutdown();
    pay_shutdown(true);
    rec_shutdown();
    account_shutdown();
    owner_shutdown();
    if (sigterm)
        event_free(sigterm);
    if (sigint)
        event_free(sigint);
    if (sighup)
        event_free(sighup);
    if (drain_timer)
        event_free(drain_timer);
    if (startup_timer)
        event_free(startup_timer);
    notify_free();
    if (base)
        event_base_free(base);
    free(D->token);
    config_free(&D->cfg);
    curl_global_cleanup();
    return rc;
}
