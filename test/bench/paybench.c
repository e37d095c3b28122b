/*
 * paybench.c - load generator for paycoord (test/bench/run.sh,
 * docs/performance.md): C pipelined connections to the daemon's Unix socket,
 * closed loop (each connection keeps --depth `pay` requests outstanding),
 * unique idempotency keys, a log-linear latency histogram, answers counted by
 * status and error code, CPU and memory from /proc, results as JSON.
 *
 * Two modes:
 *
 *  - duration (default): --warmup seconds unmeasured, then --duration
 *    seconds measured. Only answers that arrive inside the measured window
 *    count towards throughput and latency. Afterwards nothing new is sent
 *    and the outstanding requests are drained (so the daemon is left idle).
 *    Answers of the whole run are counted too (answers_total,
 *    succeeded_total): run.sh divides PostgreSQL's WAL figures, taken around
 *    the whole run, by them.
 *
 *  - hold (--hold-steps 1000,10000): memory of in-flight payments. Each
 *    request slot sends at most one payment. For each step the total sent is
 *    raised to the step, then the daemon's `stats` op is polled until its own
 *    `in_flight` count reaches the step and, per --hold-mode, as many
 *    processor requests are open (`open`: a slow processor holds each one)
 *    or as many debits are prepared with the processor's answer in
 *    (`pending`). Then the daemon's counts and VmRSS are sampled together.
 *    Bytes per in-flight payment = VmRSS growth between the first and the
 *    last step / growth of `in_flight` between the two samples; a step not
 *    reached within --hold-timeout makes it "not measured", with the reason.
 *    Then every answer is awaited (--drain).
 *
 * Accounts: "random" picks uniformly from --accounts; "slot" gives request
 * slot k (of C*depth) the accounts congruent to k, so payments in flight at
 * the same time never share an account.
 *
 * Files: pb_load.c (connections, requests, answers), pb_sample.c (/proc, the
 * daemon's ops), pb_report.c (text and JSON output). libc only.
 */
#include "paybench.h"

#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t interrupted;
static void on_sigint(int sig) { (void)sig; interrupted = 1; }

/* ---------------------------------------------------------------- options */

static void usage(FILE *f)
{
    fprintf(f,
        "usage: paybench --socket PATH [options]\n"
        "  --connections N      client connections (16)\n"
        "  --depth N            outstanding pay requests per connection (1)\n"
        "  --duration S         measured seconds (10)\n"
        "  --warmup S           unmeasured seconds first (1)\n"
        "  --drain S            at most this long to collect outstanding answers at the end (60)\n"
        "  --accounts N         accounts <prefix><first>..<prefix><first+N-1> (10000)\n"
        "  --account-prefix P   (acct-)   --account-first K (1)\n"
        "  --account-mode M     random (default) | slot (payments in flight never share an account)\n"
        "  --amount N (1)  --currency C (USD)  --wait-ms N (not sent: daemon default)\n"
        "  --key-prefix P       idempotency key prefix (pb-<pid>-<time>)\n"
        "  --pid PID            daemon pid: CPU seconds and RSS from /proc\n"
        "  --sim-pid PID        processor pid: CPU seconds\n"
        "  --pg-pid PID         PostgreSQL postmaster pid: CPU seconds of it and its backends\n"
        "  --wait-ready S       poll the health op until ready, up to S seconds (0: don't)\n"
        "  --hold-steps A,B,..  hold mode: raise the payments in flight to A, B, ...; sample RSS at each\n"
        "  --hold-mode M        what a step waits for besides the daemon's in_flight: any (default) |\n"
        "                       open (as many processor requests open) | pending (as many debits\n"
        "                       prepared, the processor's answers in)\n"
        "  --hold-timeout S     per step (120)\n"
        "  --json FILE          write the results as JSON\n"
        "  --label NAME         name in the output\n"
        "  --quiet\n");
}

static bool parse_long(const char *s, long lo, long hi, long *out)
{
    char *e;
    errno = 0;
    long v = strtol(s, &e, 10);
    if (errno || e == s || *e || v < lo || v > hi)
        return false;
    *out = v;
    return true;
}

static bool parse_double(const char *s, double lo, double hi, double *out)
{
    char *e;
    errno = 0;
    double v = strtod(s, &e);
    if (errno || e == s || *e || v < lo || v > hi)
        return false;
    *out = v;
    return true;
}

static int parse_args(int argc, char **argv, pb_options *o)
{
    memset(o, 0, sizeof(*o));
    o->connections = 16;
    o->depth = 1;
    o->duration_s = 10;
    o->warmup_s = 1;
    o->drain_s = 60;
    o->accounts = 10000;
    o->account_first = 1;
    o->account_prefix = "acct-";
    o->amount = 1;
    o->currency = "USD";
    o->wait_ms = -1;
    o->label = "run";
    o->hold_timeout_s = 120;
    snprintf(o->key_prefix, sizeof(o->key_prefix), "pb-%d-%lld", (int)getpid(), (long long)time(NULL));
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        long l;
        bool ok = true, takes = true;
        if (!strcmp(a, "--quiet")) {
            o->quiet = true;
            takes = false;
        } else if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            exit(0);
        } else if (!v) {
            ok = false;
        } else if (!strcmp(a, "--socket")) {
            o->socket_path = v;
        } else if (!strcmp(a, "--connections")) {
            ok = parse_long(v, 1, 20000, &l);
            o->connections = (int)l;
        } else if (!strcmp(a, "--depth")) {
            ok = parse_long(v, 1, 100000, &l);
            o->depth = (int)l;
        } else if (!strcmp(a, "--duration")) {
            ok = parse_double(v, 0.1, 86400, &o->duration_s);
        } else if (!strcmp(a, "--warmup")) {
            ok = parse_double(v, 0, 3600, &o->warmup_s);
        } else if (!strcmp(a, "--drain")) {
            ok = parse_double(v, 0, 3600, &o->drain_s);
        } else if (!strcmp(a, "--accounts")) {
            ok = parse_long(v, 1, 1000000000, &o->accounts);
        } else if (!strcmp(a, "--account-first")) {
            ok = parse_long(v, 0, 1000000000, &o->account_first);
        } else if (!strcmp(a, "--account-prefix")) {
            o->account_prefix = v;
        } else if (!strcmp(a, "--account-mode")) {
            if (!strcmp(v, "random"))
                o->mode = PB_ACCT_RANDOM;
            else if (!strcmp(v, "slot"))
                o->mode = PB_ACCT_SLOT;
            else
                ok = false;
        } else if (!strcmp(a, "--amount")) {
            ok = parse_long(v, 1, 1000000000, &l);
            o->amount = l;
        } else if (!strcmp(a, "--currency")) {
            o->currency = v;
        } else if (!strcmp(a, "--wait-ms")) {
            ok = parse_long(v, 0, 86400000, &l);
            o->wait_ms = l;
        } else if (!strcmp(a, "--key-prefix")) {
            ok = strlen(v) < sizeof(o->key_prefix);
            if (ok)
                snprintf(o->key_prefix, sizeof(o->key_prefix), "%s", v);
        } else if (!strcmp(a, "--pid")) {
            ok = parse_long(v, 1, 1L << 30, &l);
            o->daemon_pid = (int)l;
        } else if (!strcmp(a, "--pg-pid")) {
            ok = parse_long(v, 1, 1L << 30, &l);
            o->pg_pid = (int)l;
        } else if (!strcmp(a, "--sim-pid")) {
            ok = parse_long(v, 1, 1L << 30, &l);
            o->sim_pid = (int)l;
        } else if (!strcmp(a, "--wait-ready")) {
            ok = parse_double(v, 0, 3600, &o->ready_s);
        } else if (!strcmp(a, "--hold-mode")) {
            if (!strcmp(v, "any"))
                o->hold_mode = PB_HOLD_ANY;
            else if (!strcmp(v, "open"))
                o->hold_mode = PB_HOLD_OPEN;
            else if (!strcmp(v, "pending"))
                o->hold_mode = PB_HOLD_PENDING;
            else
                ok = false;
        } else if (!strcmp(a, "--hold-timeout")) {
            ok = parse_double(v, 1, 3600, &o->hold_timeout_s);
        } else if (!strcmp(a, "--hold-steps")) {
            const char *p = v;
            while (*p && o->nsteps < PB_MAX_STEPS) {
                char *e;
                errno = 0;
                long s = strtol(p, &e, 10);
                if (errno || e == p || s < 1 || (o->nsteps && s <= o->hold_steps[o->nsteps - 1])) {
                    ok = false;
                    break;
                }
                o->hold_steps[o->nsteps++] = s;
                p = *e == ',' ? e + 1 : e;
                if (*e && *e != ',') {
                    ok = false;
                    break;
                }
            }
        } else if (!strcmp(a, "--json")) {
            o->json_path = v;
        } else if (!strcmp(a, "--label")) {
            o->label = v;
        } else {
            fprintf(stderr, "paybench: unknown option %s\n", a);
            usage(stderr);
            return -1;
        }
        if (!ok) {
            fprintf(stderr, "paybench: bad or missing value for %s\n", a);
            return -1;
        }
        if (takes)
            i++;
    }
    if (!o->socket_path) {
        usage(stderr);
        return -1;
    }
    long nslots = (long)o->connections * o->depth;
    if (o->mode == PB_ACCT_SLOT && o->accounts < nslots) {
        fprintf(stderr, "paybench: --account-mode slot needs --accounts >= connections*depth (%ld)\n", nslots);
        return -1;
    }
    if (o->nsteps && o->hold_steps[o->nsteps - 1] > nslots) {
        fprintf(stderr, "paybench: the last hold step needs connections*depth >= %ld\n",
                o->hold_steps[o->nsteps - 1]);
        return -1;
    }
    return 0;
}

/* ---------------------------------------------------------------- hold mode */

static bool step_reached(const pb_options *o, const pb_dstats *d, long target)
{
    if (!d->ok || d->in_flight < target)
        return false;
    switch (o->hold_mode) {
    case PB_HOLD_OPEN:
        return d->proc_in_flight >= target;
    case PB_HOLD_PENDING:
        return d->prepared >= target && d->proc_in_flight <= target / 100;
    case PB_HOLD_ANY:
        break;
    }
    return true;
}

static void keep_highest(pb_dstats *best, const pb_dstats *d)
{
    if (!d->ok)
        return;
    best->ok = true;
    if (d->in_flight > best->in_flight)
        best->in_flight = d->in_flight;
    if (d->prepared > best->prepared)
        best->prepared = d->prepared;
    if (d->proc_in_flight > best->proc_in_flight)
        best->proc_in_flight = d->proc_in_flight;
}

/* Why a step was not reached, from what was seen while waiting. */
static void step_why(const pb_run *r, pb_step *st, const pb_dstats *last, double waited_s)
{
    const pb_options *o = &r->o;
    char *w = st->why;
    size_t n = sizeof(st->why);
    if (interrupted) {
        snprintf(w, n, "interrupted");
        return;
    }
    if (pb_live_connections(r) < o->connections) {
        snprintf(w, n, "connections to the daemon lost");
        return;
    }
    if (!last->ok) {
        snprintf(w, n, "the daemon's stats op did not answer");
        return;
    }
    int k = snprintf(w, n, "not filled within %.0fs (--hold-timeout): in_flight %lld (highest %lld), prepared %lld, "
                     "processor requests open %lld (highest %lld)", waited_s, last->in_flight, st->best.in_flight,
                     last->prepared, last->proc_in_flight, st->best.proc_in_flight);
    if (k > 0 && (size_t)k < n && r->answers_total > 0)
        snprintf(w + k, n - (size_t)k, "; %llu payments already answered: they finished before the step filled",
                 (unsigned long long)r->answers_total);
}

/* Raise the number of payments sent to each step in turn; sample at each. */
static void run_hold(pb_run *r, struct pollfd *pfd, pb_report *rp)
{
    const pb_options *o = &r->o;
    long nslots = (long)o->connections * o->depth;
    r->measuring = false;
    for (int s = 0; s < o->nsteps; s++) {
        long target = o->hold_steps[s];
        /* spread new requests round-robin over the connections */
        for (long k = r->hold_sent; k < target && k < nslots; k++) {
            int ci = (int)(k % o->connections), si = (int)(k / o->connections);
            if (!r->c[ci].dead)
                pb_send_pay(r, &r->c[ci], si);
        }
        r->hold_sent = target;
        pb_step *st = &rp->steps[s];
        st->target = target;
        pb_dstats last = { 0, 0, 0, false };
        uint64_t t0 = pb_now_us(), last_poll = 0;
        uint64_t deadline = t0 + (uint64_t)(o->hold_timeout_s * 1e6);
        while (!interrupted && pb_now_us() < deadline && pb_live_connections(r) == o->connections) {
            pb_pump(r, pfd, 20);
            if (pb_now_us() - last_poll < 200000)
                continue;
            last_poll = pb_now_us();
            last = pb_daemon_stats(o->socket_path);
            keep_highest(&st->best, &last);
            if (step_reached(o, &last, target)) {
                st->reached = true;
                break;
            }
        }
        if (!st->reached)
            step_why(r, st, &last, (double)(pb_now_us() - t0) / 1e6);
        /* settle for a moment, then read the daemon's counts and its VmRSS together */
        uint64_t settle = pb_now_us() + 300000;
        while (pb_now_us() < settle)
            pb_pump(r, pfd, 20);
        st->at_sample = pb_daemon_stats(o->socket_path);
        st->vmrss_kb = pb_proc_read(o->daemon_pid).vmrss_kb;
        st->answers_before = r->answers_total;
        st->wait_s = (double)(pb_now_us() - t0) / 1e6;
        if (!o->quiet)
            fprintf(stderr, "paybench: hold step %ld: in_flight=%lld prepared=%lld processor_open=%lld "
                            "VmRSS=%ld KiB answers=%llu (%.1fs)%s%s\n",
                    target, st->at_sample.in_flight, st->at_sample.prepared, st->at_sample.proc_in_flight,
                    st->vmrss_kb, (unsigned long long)st->answers_before, st->wait_s,
                    st->reached ? "" : " NOT REACHED: ", st->reached ? "" : st->why);
    }
}

static int main_hold(pb_run *r, struct pollfd *pfd, pb_report *rp)
{
    const pb_options *o = &r->o;
    rp->d0 = pb_proc_read(o->daemon_pid);
    rp->s0 = pb_proc_read(o->sim_pid);
    rp->self0 = pb_self_cpu_s();
    rp->pg0 = pb_tree_cpu_s(o->pg_pid);
    pb_sys_cpu(&rp->sb0, &rp->st0);
    uint64_t t0 = pb_now_us();
    run_hold(r, pfd, rp);
    /* collect every answer */
    uint64_t deadline = pb_now_us() + (uint64_t)(o->drain_s * 1e6);
    while (!interrupted && pb_total_outstanding(r) > 0 && pb_now_us() < deadline)
        pb_pump(r, pfd, 50);
    rp->drained = pb_total_outstanding(r) == 0;
    rp->window_s = (double)(pb_now_us() - t0) / 1e6;
    rp->d1 = pb_proc_read(o->daemon_pid);
    rp->s1 = pb_proc_read(o->sim_pid);
    rp->self1 = pb_self_cpu_s();
    rp->pg1 = pb_tree_cpu_s(o->pg_pid);
    pb_sys_cpu(&rp->sb1, &rp->st1);
    r->answers_window = r->answers_total;
    r->succeeded_window = r->succeeded_total;
    pb_write_report(r, rp);
    return rp->drained && !interrupted ? 0 : 1;
}

/* ---------------------------------------------------------------- duration mode */

static int main_duration(pb_run *r, struct pollfd *pfd, pb_report *rp)
{
    const pb_options *o = &r->o;
    /* fill every slot, warm up, measure, drain */
    r->sending = true;
    for (int i = 0; i < o->connections; i++)
        for (int s = 0; s < o->depth; s++)
            pb_send_pay(r, &r->c[i], s);
    uint64_t start = pb_now_us();
    uint64_t warm_end = start + (uint64_t)(o->warmup_s * 1e6);
    while (!interrupted && pb_now_us() < warm_end && pb_live_connections(r))
        pb_pump(r, pfd, 10);
    r->t_measure = pb_now_us();
    r->t_end = r->t_measure + (uint64_t)(o->duration_s * 1e6);
    rp->d0 = pb_proc_read(o->daemon_pid);
    rp->s0 = pb_proc_read(o->sim_pid);
    rp->self0 = pb_self_cpu_s();
    rp->pg0 = pb_tree_cpu_s(o->pg_pid);
    pb_sys_cpu(&rp->sb0, &rp->st0);
    r->measuring = true;
    while (!interrupted && pb_now_us() < r->t_end && pb_live_connections(r))
        pb_pump(r, pfd, 10);
    uint64_t t_stop = pb_now_us();
    rp->d1 = pb_proc_read(o->daemon_pid);
    rp->s1 = pb_proc_read(o->sim_pid);
    rp->self1 = pb_self_cpu_s();
    rp->pg1 = pb_tree_cpu_s(o->pg_pid);
    pb_sys_cpu(&rp->sb1, &rp->st1);
    rp->window_s = (double)((t_stop < r->t_end ? t_stop : r->t_end) - r->t_measure) / 1e6;
    r->sending = false;
    uint64_t deadline = pb_now_us() + (uint64_t)(o->drain_s * 1e6);
    while (!interrupted && pb_total_outstanding(r) > 0 && pb_now_us() < deadline && pb_live_connections(r))
        pb_pump(r, pfd, 20);
    rp->drained = pb_total_outstanding(r) == 0;
    rp->d1.vmhwm_kb = pb_proc_read(o->daemon_pid).vmhwm_kb;
    if (!rp->drained)
        fprintf(stderr, "paybench: %d answers still outstanding after the drain\n", pb_total_outstanding(r));
    pb_write_report(r, rp);
    return pb_live_connections(r) == o->connections && !interrupted ? 0 : 1;
}

/* ---------------------------------------------------------------- main */

int main(int argc, char **argv)
{
    static pb_run R;
    static pb_report rp;
    pb_run *r = &R;
    if (parse_args(argc, argv, &r->o) != 0)
        return 2;
    const pb_options *o = &r->o;
    signal(SIGPIPE, SIG_IGN);
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_sigint;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    r->rng = pb_now_us() ^ ((uint64_t)getpid() << 32);

    if (o->ready_s > 0 && !pb_wait_ready(o)) {
        fprintf(stderr, "paybench: the daemon did not become ready within %.0fs\n", o->ready_s);
        return 1;
    }
    rp.vmrss_idle_kb = pb_proc_read(o->daemon_pid).vmrss_kb;

    r->c = calloc((size_t)o->connections, sizeof(pb_conn));
    struct pollfd *pfd = calloc((size_t)o->connections, sizeof(*pfd));
    if (!r->c || !pfd) {
        fprintf(stderr, "paybench: out of memory\n");
        return 1;
    }
    for (int i = 0; i < o->connections; i++) {
        pb_conn *c = &r->c[i];
        c->idx = i;
        c->fd = pb_connect_unix(o->socket_path);
        c->slots = calloc((size_t)o->depth, sizeof(pb_slot));
        if (c->fd < 0 || !c->slots) {
            fprintf(stderr, "paybench: connect %s: %s\n", o->socket_path, strerror(errno));
            return 1;
        }
    }
    int rc = o->nsteps ? main_hold(r, pfd, &rp) : main_duration(r, pfd, &rp);
    for (int i = 0; i < o->connections; i++)
        if (!r->c[i].dead)
            close(r->c[i].fd);
    return rc;
}
