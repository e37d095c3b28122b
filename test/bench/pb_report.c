/*
 * pb_report.c - paybench's results: a short text summary on stdout and the
 * JSON that test/bench/report.py reads (throughput and latency in the window,
 * answers by status and code, CPU of the daemon, the processor, PostgreSQL,
 * paybench and everyone else, and in hold mode the memory steps).
 */
#include "paybench.h"

#include <errno.h>
#include <inttypes.h>
#include <string.h>
#include <unistd.h>

static void json_tally(FILE *f, const pb_tally *t)
{
    fputc('{', f);
    for (int i = 0; i < t->len; i++)
        fprintf(f, "%s\"%s\":%" PRIu64, i ? "," : "", t->name[i], t->n[i]);
    fputc('}', f);
}

static void print_tally(const char *what, const pb_tally *t)
{
    printf("  %s:", what);
    if (!t->len)
        printf(" none");
    for (int i = 0; i < t->len; i++)
        printf(" %s=%" PRIu64, t->name[i], t->n[i]);
    printf("\n");
}

/* A JSON string of s (labels and reasons: printable ASCII; anything else is replaced). */
static void json_str(FILE *f, const char *s)
{
    fputc('"', f);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            fprintf(f, "\\%c", c);
        else if (c < 0x20 || c > 0x7e)
            fputc('?', f);
        else
            fputc(c, f);
    }
    fputc('"', f);
}

typedef struct memfig {
    bool measured;
    double bytes;                   /* per in-flight payment, between the first and the last step */
    double bytes_from_idle;         /* (first step - idle) / its in_flight: a cross-check, with start-up growth */
    char why[256];                  /* not measured: why */
} memfig;

/* Bytes per in-flight payment: the growth of VmRSS between the first and the
 * last hold step over the growth of the daemon's own in_flight count at the
 * two samples. Only when every step was reached. */
static memfig memory_figure(const pb_options *o, const pb_report *rp)
{
    memfig m = { false, 0, 0, "" };
    if (o->nsteps < 2) {
        snprintf(m.why, sizeof(m.why), "needs two hold steps");
        return m;
    }
    for (int i = 0; i < o->nsteps; i++)
        if (!rp->steps[i].reached) {
            snprintf(m.why, sizeof(m.why), "step %ld not reached (%s)", rp->steps[i].target, rp->steps[i].why);
            return m;
        }
    const pb_step *a = &rp->steps[0], *b = &rp->steps[o->nsteps - 1];
    long long dn = b->at_sample.in_flight - a->at_sample.in_flight;
    if (!a->at_sample.ok || !b->at_sample.ok || dn <= 0) {
        snprintf(m.why, sizeof(m.why), "the daemon's in_flight did not grow between steps %ld and %ld (%lld, %lld)",
                 a->target, b->target, a->at_sample.in_flight, b->at_sample.in_flight);
        return m;
    }
    m.measured = true;
    m.bytes = (double)(b->vmrss_kb - a->vmrss_kb) * 1024.0 / (double)dn;
    if (a->at_sample.in_flight > 0)
        m.bytes_from_idle = (double)(a->vmrss_kb - rp->vmrss_idle_kb) * 1024.0 / (double)a->at_sample.in_flight;
    return m;
}

static void print_summary(const pb_run *r, const pb_report *rp, const memfig *m)
{
    const pb_options *o = &r->o;
    double win = rp->window_s > 0 ? rp->window_s : 1;
    double dcpu = rp->d1.cpu_s - rp->d0.cpu_s;
    double pgcpu = rp->pg1 - rp->pg0;
    printf("paybench %s: %d connections x depth %d, %s accounts %ld, %.1fs measured\n", o->label, o->connections,
           o->depth, o->mode == PB_ACCT_SLOT ? "slot" : "random", o->accounts, rp->window_s);
    printf("  payments/s (succeeded): %.1f   answers/s: %.1f   (whole run: %" PRIu64 " answers, %" PRIu64
           " succeeded)\n", (double)r->succeeded_window / win, (double)r->answers_window / win, r->answers_total,
           r->succeeded_total);
    printf("  latency ms: p50 %.2f  p90 %.2f  p99 %.2f  p99.9 %.2f  max %.2f\n", pb_h_pct_ms(&r->lat, 50),
           pb_h_pct_ms(&r->lat, 90), pb_h_pct_ms(&r->lat, 99), pb_h_pct_ms(&r->lat, 99.9),
           (double)r->lat.max_us / 1000);
    print_tally("ok by status", &r->ok_status);
    print_tally("errors by code", &r->err_code);
    if (rp->d1.ok)
        printf("  daemon: cpu %.2fs (%.3f s per 1000 answers), VmHWM %ld KiB, VmRSS %ld KiB\n", dcpu,
               r->answers_window ? dcpu * 1000.0 / (double)r->answers_window : 0, rp->d1.vmhwm_kb,
               rp->d1.vmrss_kb);
    printf("  paybench cpu %.2fs", rp->self1 - rp->self0);
    if (rp->s1.ok)
        printf("; psp-sim cpu %.2fs", rp->s1.cpu_s - rp->s0.cpu_s);
    printf("\n");
    if (o->pg_pid)
        printf("  postgres cpu %.2fs (%.3f s per 1000 answers)\n", pgcpu,
               r->answers_window ? pgcpu * 1000.0 / (double)r->answers_window : 0);
    for (int i = 0; i < o->nsteps; i++) {
        const pb_step *s = &rp->steps[i];
        printf("  hold %ld: in_flight %lld prepared %lld processor requests open %lld; VmRSS %ld KiB%s%s%s\n",
               s->target, s->at_sample.in_flight, s->at_sample.prepared, s->at_sample.proc_in_flight, s->vmrss_kb,
               s->reached ? "" : " (not reached: ", s->reached ? "" : s->why, s->reached ? "" : ")");
    }
    if (o->nsteps) {
        if (m->measured)
            printf("  bytes per in-flight payment: %.0f (from idle to the first step: %.0f)\n", m->bytes,
                   m->bytes_from_idle);
        else
            printf("  bytes per in-flight payment: not measured: %s\n", m->why);
    }
    if (r->bad_lines)
        printf("  unparsed answers: %" PRIu64 "\n", r->bad_lines);
}

static void json_dstats(FILE *f, const char *name, const pb_dstats *d)
{
    fprintf(f, "\"%s\":{\"in_flight\":%lld,\"prepared\":%lld,\"processor_in_flight\":%lld,\"ok\":%s}", name,
            d->in_flight, d->prepared, d->proc_in_flight, d->ok ? "true" : "false");
}

static void json_hold(FILE *f, const pb_options *o, const pb_report *rp, const memfig *m)
{
    static const char *const modes[] = { "any", "open", "pending" };
    fprintf(f, ",\"hold_mode\":\"%s\",\"hold\":[", modes[o->hold_mode]);
    for (int i = 0; i < o->nsteps; i++) {
        const pb_step *s = &rp->steps[i];
        fprintf(f, "%s{\"target\":%ld,", i ? "," : "", s->target);
        /* the counts at the sample, flat (what report.py prints), then in full */
        fprintf(f, "\"in_flight\":%lld,\"prepared\":%lld,\"processor_in_flight\":%lld,", s->at_sample.in_flight,
                s->at_sample.prepared, s->at_sample.proc_in_flight);
        json_dstats(f, "at_sample", &s->at_sample);
        fputc(',', f);
        json_dstats(f, "highest_seen", &s->best);
        fprintf(f, ",\"vmrss_kb\":%ld,\"answers_before\":%" PRIu64 ",\"wait_s\":%.2f,\"reached\":%s", s->vmrss_kb,
                s->answers_before, s->wait_s, s->reached ? "true" : "false");
        if (!s->reached) {
            fprintf(f, ",\"why\":");
            json_str(f, s->why);
        }
        fputc('}', f);
    }
    fprintf(f, "]");
    if (m->measured)
        fprintf(f, ",\"bytes_per_in_flight\":%.0f,\"bytes_per_in_flight_from_idle\":%.0f", m->bytes,
                m->bytes_from_idle);
    else {
        fprintf(f, ",\"bytes_per_in_flight\":null,\"not_measured\":");
        json_str(f, m->why);
    }
}

void pb_write_report(const pb_run *r, const pb_report *rp)
{
    const pb_options *o = &r->o;
    memfig m = memory_figure(o, rp);
    double win = rp->window_s > 0 ? rp->window_s : 1;
    double pps = (double)r->succeeded_window / win;
    double aps = (double)r->answers_window / win;
    double dcpu = rp->d1.cpu_s - rp->d0.cpu_s;
    double scpu = rp->s1.cpu_s - rp->s0.cpu_s;
    double bcpu = rp->self1 - rp->self0;
    double sysbusy = rp->st1 > rp->st0 ? 100.0 * (double)(rp->sb1 - rp->sb0) / (double)(rp->st1 - rp->st0) : 0;
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    double pgcpu = rp->pg1 - rp->pg0;
    long hz = sysconf(_SC_CLK_TCK);
    if (hz <= 0)
        hz = 100;
    double machine_s = (double)(rp->sb1 - rp->sb0) / (double)hz;
    /* CPU of everything else on the machine in the window: other users' noise */
    double other_s = machine_s - dcpu - scpu - bcpu - pgcpu;
    double other_pct = rp->st1 > rp->st0 ? 100.0 * other_s * (double)hz / (double)(rp->st1 - rp->st0) : 0;
    double cpu_per_k = r->answers_window ? dcpu * 1000.0 / (double)r->answers_window : 0;

    if (!o->quiet) {
        print_summary(r, rp, &m);
        printf("  machine cpu busy %.0f%% of %ld cpus; other processes %.0f%% of the machine\n", sysbusy, ncpu,
               other_pct);
    }
    if (!o->json_path)
        return;
    FILE *f = fopen(o->json_path, "w");
    if (!f) {
        fprintf(stderr, "paybench: %s: %s\n", o->json_path, strerror(errno));
        return;
    }
    fprintf(f, "{\"label\":");
    json_str(f, o->label);
    fprintf(f, ",\"connections\":%d,\"depth\":%d,\"accounts\":%ld,\"account_mode\":\"%s\",", o->connections,
            o->depth, o->accounts, o->mode == PB_ACCT_SLOT ? "slot" : "random");
    fprintf(f, "\"window_s\":%.3f,\"answers\":%" PRIu64 ",\"succeeded\":%" PRIu64 ",", rp->window_s,
            r->answers_window, r->succeeded_window);
    fprintf(f, "\"answers_total\":%" PRIu64 ",\"succeeded_total\":%" PRIu64 ",\"sent_total\":%" PRIu64 ",",
            r->answers_total, r->succeeded_total, r->sent_total);
    fprintf(f, "\"payments_per_s\":%.1f,\"answers_per_s\":%.1f,", pps, aps);
    fprintf(f, "\"latency_ms\":{\"p50\":%.3f,\"p90\":%.3f,\"p99\":%.3f,\"p999\":%.3f,\"max\":%.3f,\"mean\":%.3f},",
            pb_h_pct_ms(&r->lat, 50), pb_h_pct_ms(&r->lat, 90), pb_h_pct_ms(&r->lat, 99),
            pb_h_pct_ms(&r->lat, 99.9), (double)r->lat.max_us / 1000,
            r->lat.count ? (double)r->lat.sum_us / (double)r->lat.count / 1000 : 0);
    fprintf(f, "\"ok_by_status\":");
    json_tally(f, &r->ok_status);
    fprintf(f, ",\"errors_by_code\":");
    json_tally(f, &r->err_code);
    if (rp->d1.ok)
        fprintf(f, ",\"daemon\":{\"cpu_s\":%.3f,\"cpu_s_per_1000\":%.4f,\"vmhwm_kb\":%ld,\"vmrss_kb\":%ld,"
                   "\"vmrss_idle_kb\":%ld}",
                dcpu, cpu_per_k, rp->d1.vmhwm_kb, rp->d1.vmrss_kb, rp->vmrss_idle_kb);
    if (rp->s1.ok)
        fprintf(f, ",\"sim_cpu_s\":%.3f", scpu);
    if (o->pg_pid)
        fprintf(f, ",\"pg_cpu_s\":%.3f,\"pg_cpu_s_per_1000\":%.4f,\"other_cpu_pct\":%.1f", pgcpu,
                r->answers_window ? pgcpu * 1000.0 / (double)r->answers_window : 0, other_pct);
    fprintf(f, ",\"bench_cpu_s\":%.3f,\"machine_cpu_busy_pct\":%.1f,\"ncpu\":%ld,\"drained\":%s", bcpu, sysbusy,
            ncpu, rp->drained ? "true" : "false");
    if (o->nsteps)
        json_hold(f, o, rp, &m);
    fprintf(f, "}\n");
    if (fclose(f) != 0)
        fprintf(stderr, "paybench: %s: %s\n", o->json_path, strerror(errno));
}
