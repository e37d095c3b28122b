/*
 * paybench.h - the parts of paybench (the load generator of test/bench/run.sh)
 * and what they share: pb_load.c (connections, requests, answers, latency
 * histogram), pb_sample.c (/proc CPU and memory, the daemon's health and
 * stats ops), pb_report.c (the text summary and the JSON) and paybench.c
 * (options, the duration and hold modes, main).
 */
#ifndef PAYBENCH_H
#define PAYBENCH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <poll.h>

#define PB_MAX_CODES 32
#define PB_MAX_STEPS 16

#define PB_PRINTF(f, a) __attribute__((format(printf, f, a)))

/* ---------------------------------------------------------------- time, histogram (pb_load.c) */

uint64_t pb_now_us(void);

/* Log-linear buckets over microseconds: values below 128 exactly, then 64
 * sub-buckets per power of two (relative error < 1.6%), up to 2^40 us. */
#define PB_H_SUB_BITS 6
#define PB_H_SUB (1u << PB_H_SUB_BITS)
#define PB_H_MAX_EXP 34
#define PB_H_BUCKETS (2 * PB_H_SUB + PB_H_MAX_EXP * PB_H_SUB)

typedef struct pb_histo {
    uint64_t b[PB_H_BUCKETS];
    uint64_t count, sum_us, max_us;
} pb_histo;

void pb_h_add(pb_histo *h, uint64_t us);
double pb_h_pct_ms(const pb_histo *h, double p);      /* value at percentile p (0..100), ms */

/* Answers counted by a name (status or error code). */
typedef struct pb_tally {
    char name[PB_MAX_CODES][40];
    uint64_t n[PB_MAX_CODES];
    int len;
} pb_tally;

void pb_tally_add(pb_tally *t, const char *name, size_t len);
uint64_t pb_tally_get(const pb_tally *t, const char *name);

/* ---------------------------------------------------------------- options (paybench.c) */

typedef enum { PB_ACCT_RANDOM, PB_ACCT_SLOT } pb_acct_mode;

/* What a hold step waits for before it samples memory. */
typedef enum {
    PB_HOLD_ANY,          /* the daemon's in_flight reaches the step */
    PB_HOLD_OPEN,         /* ... and as many processor requests are open (S4) */
    PB_HOLD_PENDING,      /* ... with their debits prepared and the processor's answer in ('pending', S4b) */
} pb_hold_mode;

typedef struct pb_options {
    const char *socket_path;
    int connections, depth;
    double duration_s, warmup_s, drain_s;
    long accounts, account_first;
    const char *account_prefix;
    pb_acct_mode mode;
    long long amount;
    const char *currency;
    long long wait_ms;              /* -1: not sent */
    char key_prefix[96];
    const char *json_path;
    const char *label;
    int daemon_pid, sim_pid, pg_pid;
    double ready_s;                 /* wait for health ready up to this */
    long hold_steps[PB_MAX_STEPS];
    int nsteps;
    pb_hold_mode hold_mode;
    double hold_timeout_s;
    bool quiet;
} pb_options;

/* ---------------------------------------------------------------- connections (pb_load.c) */

typedef struct pb_buf {
    char *d;
    size_t len, off, cap;          /* bytes [off, len) are pending */
} pb_buf;

typedef struct pb_slot {
    uint64_t sent_us;
    long acct_iter;                 /* slot mode: how many times this slot has sent */
    bool busy;
} pb_slot;

typedef struct pb_conn {
    int fd;
    int idx;
    pb_buf out, in;
    pb_slot *slots;
    int outstanding;
    uint64_t seq;
    bool dead;
} pb_conn;

typedef struct pb_run {
    pb_options o;
    pb_conn *c;
    uint64_t rng;
    /* measurement window */
    uint64_t t_measure, t_end;
    bool measuring, sending;
    pb_histo lat;
    pb_tally ok_status, err_code;           /* answers in the window (hold mode: all) */
    uint64_t answers_window, succeeded_window;
    /* every answer of the run, warm-up and drain included (the WAL figures' denominator) */
    uint64_t answers_total, succeeded_total, sent_total;
    uint64_t bad_lines;
    long hold_sent;
} pb_run;

int pb_connect_unix(const char *path);
void pb_send_pay(pb_run *r, pb_conn *c, int si);
void pb_pump(pb_run *r, struct pollfd *pfd, int timeout_ms);     /* one poll pass over every connection */
int pb_total_outstanding(const pb_run *r);
int pb_live_connections(const pb_run *r);

/* ---------------------------------------------------------------- sampling (pb_sample.c) */

typedef struct pb_proc {
    double cpu_s;                   /* utime + stime */
    long vmrss_kb, vmhwm_kb;
    bool ok;
} pb_proc;

pb_proc pb_proc_read(int pid);
double pb_tree_cpu_s(int pid);      /* a process and its children, live or reaped */
void pb_sys_cpu(unsigned long long *busy, unsigned long long *total);
double pb_self_cpu_s(void);

/* The daemon's own counts, from its stats op. */
typedef struct pb_dstats {
    long long in_flight;            /* payments in progress */
    long long prepared;             /* debits prepared by live payments */
    long long proc_in_flight;       /* processor requests open */
    bool ok;
} pb_dstats;

bool pb_wait_ready(const pb_options *o);
pb_dstats pb_daemon_stats(const char *socket_path);
bool pb_json_int(const char *json, size_t len, const char *path, long long *out);   /* "a.b": nested key */

/* ---------------------------------------------------------------- report (pb_report.c) */

typedef struct pb_step {
    long target;
    pb_dstats at_sample;            /* the daemon's counts when VmRSS was read */
    pb_dstats best;                 /* the highest counts seen while waiting */
    long vmrss_kb;
    uint64_t answers_before;        /* answers the clients had already received */
    double wait_s;
    bool reached;
    char why[200];                  /* not reached: why */
} pb_step;

typedef struct pb_report {
    double window_s;
    pb_proc d0, d1, s0, s1;
    double self0, self1;
    double pg0, pg1;
    unsigned long long sb0, st0, sb1, st1;
    long vmrss_idle_kb;
    pb_step steps[PB_MAX_STEPS];
    bool drained;
} pb_report;

void pb_write_report(const pb_run *r, const pb_report *rp);

#endif
