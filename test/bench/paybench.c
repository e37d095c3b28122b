/*
 * paybench.c - load generator for paycoord: C pipelined connections to the
 * daemon's Unix socket, closed loop (each connection keeps --depth `pay`
 * requests outstanding), unique idempotency keys, a log-linear latency
 * histogram, answers counted by status and error code, results as JSON.
 *
 * Two modes:
 *
 *  - duration (default): --warmup seconds unmeasured, then --duration
 *    seconds measured. Only answers that arrive inside the measured window
 *    count towards throughput and latency. Afterwards nothing new is sent
 *    and the outstanding requests are drained (so the daemon is left idle).
 *
 *  - hold (--hold-steps 1000,10000): memory of in-flight payments. Each
 *    request slot sends at most one payment. For each step the total sent is
 *    raised to the step, then the daemon's `stats` op is polled until
 *    `prepared` (debits prepared and waiting on the processor) reaches it,
 *    and the daemon's VmRSS is sampled. Then every answer is awaited.
 *
 * Accounts: "random" picks uniformly from --accounts; "slot" gives request
 * slot k (of C*depth) the accounts congruent to k, so payments in flight at
 * the same time never share an account.
 *
 * One thread, nonblocking sockets, poll(2). No libraries beyond libc.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAX_LINE (1u << 20)          /* longest answer line we accept */
#define READ_CHUNK 65536
#define MAX_CODES 32
#define MAX_STEPS 16

/* ---------------------------------------------------------------- time */

static uint64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

/* ---------------------------------------------------------------- histogram
 *
 * Log-linear buckets over microseconds: values below 128 exactly, then 64
 * sub-buckets per power of two (relative error < 1.6%), up to 2^40 us. */

#define H_SUB_BITS 6
#define H_SUB (1u << H_SUB_BITS)
#define H_MAX_EXP 34
#define H_BUCKETS (2 * H_SUB + H_MAX_EXP * H_SUB)

typedef struct histo {
    uint64_t b[H_BUCKETS];
    uint64_t count, sum_us, max_us;
} histo;

static unsigned msb64(uint64_t v) { return 63u - (unsigned)__builtin_clzll(v); }

static size_t h_index(uint64_t v)
{
    if (v < 2 * H_SUB)
        return (size_t)v;
    unsigned e = msb64(v) - H_SUB_BITS;
    if (e > H_MAX_EXP) {
        e = H_MAX_EXP;
        v = ((uint64_t)(2 * H_SUB - 1)) << e;
    }
    return 2 * H_SUB + (size_t)(e - 1) * H_SUB + (size_t)((v >> e) - H_SUB);
}

/* Midpoint of bucket i. */
static double h_value(size_t i)
{
    if (i < 2 * H_SUB)
        return (double)i;
    unsigned e = (unsigned)((i - 2 * H_SUB) / H_SUB) + 1;
    uint64_t lo = ((uint64_t)((i - 2 * H_SUB) % H_SUB) + H_SUB) << e;
    return (double)lo + (double)((1ull << e) - 1) / 2.0;
}

static void h_add(histo *h, uint64_t us)
{
    h->b[h_index(us)]++;
    h->count++;
    h->sum_us += us;
    if (us > h->max_us)
        h->max_us = us;
}

/* Value at percentile p (0..100), in milliseconds. */
static double h_pct_ms(const histo *h, double p)
{
    if (!h->count)
        return 0;
    uint64_t want = (uint64_t)((double)h->count * p / 100.0 + 0.999999);
    if (want < 1)
        want = 1;
    uint64_t seen = 0;
    for (size_t i = 0; i < H_BUCKETS; i++) {
        seen += h->b[i];
        if (seen >= want) {
            double v = h_value(i);
            if (v > (double)h->max_us)
                v = (double)h->max_us;
            return v / 1000.0;
        }
    }
    return (double)h->max_us / 1000.0;
}

/* ---------------------------------------------------------------- counters */

typedef struct tally {
    char name[MAX_CODES][40];
    uint64_t n[MAX_CODES];
    int len;
} tally;

static void tally_add(tally *t, const char *name, size_t len)
{
    if (len >= sizeof(t->name[0]))
        len = sizeof(t->name[0]) - 1;
    for (int i = 0; i < t->len; i++)
        if (strlen(t->name[i]) == len && memcmp(t->name[i], name, len) == 0) {
            t->n[i]++;
            return;
        }
    int i = t->len < MAX_CODES ? t->len++ : MAX_CODES - 1;
    memcpy(t->name[i], name, len);
    t->name[i][len] = '\0';
    t->n[i]++;
}

static uint64_t tally_get(const tally *t, const char *name)
{
    for (int i = 0; i < t->len; i++)
        if (!strcmp(t->name[i], name))
            return t->n[i];
    return 0;
}

/* ---------------------------------------------------------------- buffers */

typedef struct buf {
    char *d;
    size_t len, off, cap;          /* bytes [off, len) are pending */
} buf;

static void buf_need(buf *b, size_t extra)
{
    if (b->off && b->off == b->len)
        b->off = b->len = 0;
    if (b->len + extra <= b->cap)
        return;
    if (b->off) {
        memmove(b->d, b->d + b->off, b->len - b->off);
        b->len -= b->off;
        b->off = 0;
        if (b->len + extra <= b->cap)
            return;
    }
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + extra)
        cap *= 2;
    char *d = realloc(b->d, cap);
    if (!d) {
        fprintf(stderr, "paybench: out of memory\n");
        exit(1);
    }
    b->d = d;
    b->cap = cap;
}

static void buf_printf(buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void buf_printf(buf *b, const char *fmt, ...)
{
    va_list ap;
    buf_need(b, 256);
    for (;;) {
        va_start(ap, fmt);
        int n = vsnprintf(b->d + b->len, b->cap - b->len, fmt, ap);
        va_end(ap);
        if (n < 0) {
            fprintf(stderr, "paybench: formatting failed\n");
            exit(1);
        }
        if ((size_t)n < b->cap - b->len) {
            b->len += (size_t)n;
            return;
        }
        buf_need(b, (size_t)n + 1);
    }
}

/* ---------------------------------------------------------------- options */

typedef enum { ACCT_RANDOM, ACCT_SLOT } acct_mode;

typedef struct options {
    const char *socket_path;
    int connections, depth;
    double duration_s, warmup_s, drain_s;
    long accounts, account_first;
    const char *account_prefix;
    acct_mode mode;
    long long amount;
    const char *currency;
    long long wait_ms;              /* -1: not sent */
    char key_prefix[96];
    const char *json_path;
    const char *label;
    int daemon_pid, sim_pid, pg_pid;
    double ready_s;                 /* wait for health ready up to this */
    long hold_steps[MAX_STEPS];
    int nsteps;
    double hold_timeout_s;
    bool quiet;
} options;

/* ---------------------------------------------------------------- connections */

typedef struct slot {
    uint64_t sent_us;
    long acct_iter;                 /* slot mode: how many times this slot has sent */
    bool busy;
} slot;

typedef struct conn {
    int fd;
    int idx;
    buf out, in;
    slot *slots;
    int outstanding;
    uint64_t seq;
    bool dead;
} conn;

typedef struct run {
    options o;
    conn *c;
    uint64_t rng;
    /* measurement window */
    uint64_t t_measure, t_end;
    bool measuring, sending;
    histo lat;
    tally ok_status, err_code;
    uint64_t answers_total, answers_window, succeeded_window, sent_total;
    uint64_t bad_lines;
    /* hold mode */
    long hold_target;
    long hold_sent;
} run;

static volatile sig_atomic_t interrupted;
static void on_sigint(int sig) { (void)sig; interrupted = 1; }

static uint64_t rng_next(run *r)
{
    /* splitmix64 */
    uint64_t z = (r->rng += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static int connect_unix(const char *path)
{
    struct sockaddr_un sun;
    memset(&sun, 0, sizeof(sun));
    sun.sun_family = AF_UNIX;
    size_t n = strlen(path);
    if (n >= sizeof(sun.sun_path)) {
        fprintf(stderr, "paybench: socket path too long: %s\n", path);
        return -1;
    }
    memcpy(sun.sun_path, path, n + 1);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    if (connect(fd, (struct sockaddr *)&sun, sizeof(sun)) != 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static long pick_account(run *r, int ci, int si)
{
    const options *o = &r->o;
    if (o->mode == ACCT_RANDOM)
        return (long)(rng_next(r) % (uint64_t)o->accounts);
    long nslots = (long)o->connections * o->depth;
    long k = (long)ci * o->depth + si;
    slot *s = &r->c[ci].slots[si];
    long per = o->accounts / nslots;            /* accounts owned by each slot, >= 1 */
    long a = k + (s->acct_iter % per) * nslots;
    s->acct_iter++;
    return a;
}

static void send_pay(run *r, conn *c, int si)
{
    const options *o = &r->o;
    long a = pick_account(r, c->idx, si) + o->account_first;
    slot *s = &c->slots[si];
    buf_printf(&c->out,
               "{\"id\":%d,\"op\":\"pay\",\"idempotency_key\":\"%s-%d-%" PRIu64 "\",\"account\":\"%s%ld\","
               "\"amount\":%lld,\"currency\":\"%s\"",
               si, o->key_prefix, c->idx, c->seq++, o->account_prefix, a, o->amount, o->currency);
    if (o->wait_ms >= 0)
        buf_printf(&c->out, ",\"wait_ms\":%lld", o->wait_ms);
    buf_printf(&c->out, "}\n");
    s->busy = true;
    s->sent_us = now_us();
    c->outstanding++;
    r->sent_total++;
}

/* Copies the string value that follows `key` (e.g. "\"code\":\"") into out. */
static bool json_str_after(const char *line, size_t len, const char *key, const char **val, size_t *vlen)
{
    size_t kl = strlen(key);
    const char *end = line + len;
    const char *p = memmem(line, len, key, kl);
    if (!p)
        return false;
    p += kl;
    const char *q = memchr(p, '"', (size_t)(end - p));
    if (!q)
        return false;
    *val = p;
    *vlen = (size_t)(q - p);
    return true;
}

static bool json_int_after(const char *line, size_t len, const char *key, long long *out)
{
    size_t kl = strlen(key);
    const char *p = memmem(line, len, key, kl);
    if (!p)
        return false;
    p += kl;
    char tmp[32];
    size_t n = 0;
    while (p < line + len && n < sizeof(tmp) - 1 && ((*p >= '0' && *p <= '9') || *p == '-'))
        tmp[n++] = *p++;
    tmp[n] = '\0';
    if (!n)
        return false;
    char *e;
    errno = 0;
    long long v = strtoll(tmp, &e, 10);
    if (errno || *e)
        return false;
    *out = v;
    return true;
}

static void handle_answer(run *r, conn *c, const char *line, size_t len, uint64_t t)
{
    long long id;
    if (!json_int_after(line, len, "\"id\":", &id) || id < 0 || id >= r->o.depth || !c->slots[id].busy) {
        r->bad_lines++;
        if (r->bad_lines <= 3)
            fprintf(stderr, "paybench: unexpected answer: %.*s\n", (int)(len > 300 ? 300 : len), line);
        return;
    }
    slot *s = &c->slots[id];
    s->busy = false;
    c->outstanding--;
    r->answers_total++;
    bool in_window = r->measuring && t <= r->t_end;
    const char *v;
    size_t vl;
    bool ok = memmem(line, len, "\"ok\":true", 9) != NULL;
    if (in_window) {
        r->answers_window++;
        h_add(&r->lat, t - s->sent_us);
        if (ok) {
            if (json_str_after(line, len, "\"status\":\"", &v, &vl)) {
                tally_add(&r->ok_status, v, vl);
                if (vl == 9 && !memcmp(v, "succeeded", 9))
                    r->succeeded_window++;
            } else {
                tally_add(&r->ok_status, "?", 1);
            }
        } else if (json_str_after(line, len, "\"code\":\"", &v, &vl)) {
            tally_add(&r->err_code, v, vl);
        } else {
            tally_add(&r->err_code, "?", 1);
        }
    } else if (r->o.nsteps) {
        /* hold mode counts every answer */
        if (ok && json_str_after(line, len, "\"status\":\"", &v, &vl))
            tally_add(&r->ok_status, v, vl);
        else if (!ok && json_str_after(line, len, "\"code\":\"", &v, &vl))
            tally_add(&r->err_code, v, vl);
    }
    if (r->sending && !r->o.nsteps)
        send_pay(r, c, (int)id);
}

static void conn_fail(conn *c, const char *why)
{
    if (c->dead)
        return;
    fprintf(stderr, "paybench: connection %d: %s (%d outstanding)\n", c->idx, why, c->outstanding);
    c->dead = true;
    close(c->fd);
    c->fd = -1;
}

static void conn_read(run *r, conn *c)
{
    for (;;) {
        buf_need(&c->in, READ_CHUNK);
        ssize_t n = read(c->fd, c->in.d + c->in.len, c->in.cap - c->in.len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            conn_fail(c, strerror(errno));
            return;
        }
        if (n == 0) {
            conn_fail(c, "closed by the daemon");
            return;
        }
        c->in.len += (size_t)n;
        uint64_t t = now_us();
        for (;;) {
            char *start = c->in.d + c->in.off;
            size_t avail = c->in.len - c->in.off;
            char *nl = memchr(start, '\n', avail);
            if (!nl) {
                if (avail > MAX_LINE) {
                    conn_fail(c, "answer line too long");
                    return;
                }
                break;
            }
            handle_answer(r, c, start, (size_t)(nl - start), t);
            c->in.off += (size_t)(nl - start) + 1;
        }
        if ((size_t)n < READ_CHUNK)
            break;
    }
}

static void conn_write(conn *c)
{
    while (c->out.off < c->out.len) {
        ssize_t n = send(c->fd, c->out.d + c->out.off, c->out.len - c->out.off, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return;
            conn_fail(c, strerror(errno));
            return;
        }
        c->out.off += (size_t)n;
    }
    c->out.off = c->out.len = 0;
}

/* One poll pass over every connection, waiting at most timeout_ms. */
static void pump(run *r, struct pollfd *pfd, int timeout_ms)
{
    int n = r->o.connections;
    for (int i = 0; i < n; i++) {
        conn *c = &r->c[i];
        if (!c->dead && c->out.off < c->out.len)
            conn_write(c);
        pfd[i].fd = c->dead ? -1 : c->fd;
        pfd[i].events = POLLIN | (c->out.off < c->out.len ? POLLOUT : 0);
        pfd[i].revents = 0;
    }
    int rc = poll(pfd, (nfds_t)n, timeout_ms);
    if (rc < 0) {
        if (errno != EINTR) {
            perror("paybench: poll");
            exit(1);
        }
        return;
    }
    for (int i = 0; i < n && rc > 0; i++) {
        conn *c = &r->c[i];
        if (!pfd[i].revents || c->dead)
            continue;
        if (pfd[i].revents & (POLLIN | POLLHUP | POLLERR))
            conn_read(r, c);
        if (!c->dead && (pfd[i].revents & POLLOUT))
            conn_write(c);
    }
}

static int total_outstanding(const run *r)
{
    int n = 0;
    for (int i = 0; i < r->o.connections; i++)
        if (!r->c[i].dead)
            n += r->c[i].outstanding;
    return n;
}

static int live_connections(const run *r)
{
    int n = 0;
    for (int i = 0; i < r->o.connections; i++)
        n += !r->c[i].dead;
    return n;
}

/* ---------------------------------------------------------------- /proc */

typedef struct proc_sample {
    double cpu_s;                   /* utime + stime */
    long vmrss_kb, vmhwm_kb;
    bool ok;
} proc_sample;

/* Fields 3.. of /proc/PID/stat (after the command name) into v[0..n), as v[i] = field i+3. */
static int stat_fields(int pid, unsigned long long *v, int n)
{
    char path[64], stat[2048];
    snprintf(path, sizeof(path), "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    size_t len = fread(stat, 1, sizeof(stat) - 1, f);
    fclose(f);
    stat[len] = '\0';
    char *p = strrchr(stat, ')');
    if (!p)
        return -1;
    p += 2;
    int i = 0;
    if (i < n) {                    /* field 3: state, one character */
        v[i++] = (unsigned long long)(unsigned char)*p;
        p = strchr(p, ' ');
    }
    while (p && i < n) {
        char *e;
        v[i++] = strtoull(p + 1, &e, 10);
        p = e && *e == ' ' ? e : NULL;
    }
    return i;
}

/* CPU seconds of a process and all its children, live or reaped: the
 * PostgreSQL postmaster's utime+stime+cutime+cstime plus every live child's
 * utime+stime (backends that exited were reaped into the postmaster's cutime). */
static double tree_cpu_s(int pid)
{
    if (pid <= 0)
        return 0;
    unsigned long long v[15];
    if (stat_fields(pid, v, 15) < 15)
        return 0;
    unsigned long long ticks = v[11] + v[12] + v[13] + v[14];      /* fields 14..17 */
    DIR *d = opendir("/proc");
    if (d) {
        struct dirent *e;
        while ((e = readdir(d))) {
            if (e->d_name[0] < '1' || e->d_name[0] > '9')
                continue;
            int child = (int)strtol(e->d_name, NULL, 10);
            unsigned long long c[13];
            if (stat_fields(child, c, 13) == 13 && (int)c[1] == pid)   /* field 4: ppid */
                ticks += c[11] + c[12];
        }
        closedir(d);
    }
    long hz = sysconf(_SC_CLK_TCK);
    return (double)ticks / (double)(hz > 0 ? hz : 100);
}

static proc_sample proc_read(int pid)
{
    proc_sample s = { 0, 0, 0, false };
    if (pid <= 0)
        return s;
    char path[64], line[512];
    snprintf(path, sizeof(path), "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return s;
    char stat[2048];
    size_t n = fread(stat, 1, sizeof(stat) - 1, f);
    fclose(f);
    stat[n] = '\0';
    /* fields after the last ')': state is field 3; utime 14, stime 15 */
    char *p = strrchr(stat, ')');
    if (!p)
        return s;
    p += 2;
    int field = 3;
    unsigned long long ut = 0, st = 0;
    while (*p && field <= 15) {
        if (field == 14 || field == 15) {
            unsigned long long v = strtoull(p, NULL, 10);
            if (field == 14)
                ut = v;
            else
                st = v;
        }
        p = strchr(p, ' ');
        if (!p)
            break;
        p++;
        field++;
    }
    long hz = sysconf(_SC_CLK_TCK);
    s.cpu_s = (double)(ut + st) / (double)(hz > 0 ? hz : 100);
    snprintf(path, sizeof(path), "/proc/%d/status", pid);
    f = fopen(path, "r");
    if (!f)
        return s;
    while (fgets(line, sizeof(line), f)) {
        if (!strncmp(line, "VmRSS:", 6))
            s.vmrss_kb = strtol(line + 6, NULL, 10);
        else if (!strncmp(line, "VmHWM:", 6))
            s.vmhwm_kb = strtol(line + 6, NULL, 10);
    }
    fclose(f);
    s.ok = true;
    return s;
}

/* Busy and total jiffies of the whole machine (/proc/stat "cpu" line). */
static void sys_cpu(unsigned long long *busy, unsigned long long *total)
{
    *busy = *total = 0;
    FILE *f = fopen("/proc/stat", "r");
    if (!f)
        return;
    char line[512];
    if (fgets(line, sizeof(line), f) && !strncmp(line, "cpu ", 4)) {
        unsigned long long v[10] = { 0 };
        char *p = line + 4;
        for (int i = 0; i < 10; i++) {
            char *e;
            v[i] = strtoull(p, &e, 10);
            if (e == p)
                break;
            p = e;
        }
        for (int i = 0; i < 8; i++)        /* guest time is already in user */
            *total += v[i];
        *busy = *total - v[3] - v[4];      /* minus idle and iowait */
    }
    fclose(f);
}

static double self_cpu_s(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
           (double)ru.ru_stime.tv_usec / 1e6;
}

/* ---------------------------------------------------------------- admin queries */

/* Sends one request line on a fresh blocking connection and reads one answer line. */
static int admin_call(const char *path, const char *req, char *ans, size_t anslen)
{
    int fd = connect_unix(path);
    if (fd < 0)
        return -1;
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0)
        fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
    struct timeval tv = { 5, 0 };
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    size_t len = strlen(req), off = 0;
    int rc = -1;
    while (off < len) {
        ssize_t n = send(fd, req + off, len - off, MSG_NOSIGNAL);
        if (n <= 0)
            goto out;
        off += (size_t)n;
    }
    off = 0;
    while (off + 1 < anslen) {
        ssize_t n = read(fd, ans + off, anslen - 1 - off);
        if (n <= 0)
            goto out;
        off += (size_t)n;
        ans[off] = '\0';
        if (memchr(ans, '\n', off)) {
            rc = 0;
            goto out;
        }
    }
out:
    close(fd);
    return rc;
}

static bool wait_ready(const options *o)
{
    uint64_t deadline = now_us() + (uint64_t)(o->ready_s * 1e6);
    char ans[4096];
    do {
        if (admin_call(o->socket_path, "{\"id\":0,\"op\":\"health\"}\n", ans, sizeof(ans)) == 0 &&
            strstr(ans, "\"ready\":true"))
            return true;
        usleep(50000);
    } while (now_us() < deadline);
    return false;
}

static bool daemon_counts(const options *o, long long *in_flight, long long *prepared)
{
    char ans[16384];
    if (admin_call(o->socket_path, "{\"id\":0,\"op\":\"stats\"}\n", ans, sizeof(ans)) != 0)
        return false;
    size_t n = strlen(ans);
    return json_int_after(ans, n, "\"in_flight\":", in_flight) && json_int_after(ans, n, "\"prepared\":", prepared);
}

/* ---------------------------------------------------------------- report */

typedef struct step_result {
    long target;
    long long in_flight, prepared;
    long vmrss_kb;
    double wait_s;
    bool reached;
} step_result;

typedef struct report {
    double window_s;
    proc_sample d0, d1, s0, s1;
    double self0, self1;
    double pg0, pg1;
    unsigned long long sb0, st0, sb1, st1;
    long vmrss_idle_kb;
    step_result steps[MAX_STEPS];
    bool drained;
} report;

static void json_tally(FILE *f, const tally *t)
{
    fputc('{', f);
    for (int i = 0; i < t->len; i++)
        fprintf(f, "%s\"%s\":%" PRIu64, i ? "," : "", t->name[i], t->n[i]);
    fputc('}', f);
}

static void print_tally(const char *what, const tally *t)
{
    printf("  %s:", what);
    if (!t->len)
        printf(" none");
    for (int i = 0; i < t->len; i++)
        printf(" %s=%" PRIu64, t->name[i], t->n[i]);
    printf("\n");
}

static void write_report(const run *r, const report *rp)
{
    const options *o = &r->o;
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
    double machine_s = (double)(rp->sb1 - rp->sb0) / (double)(hz > 0 ? hz : 100);
    /* CPU of everything else on the machine in the window: other users' noise */
    double other_s = machine_s - dcpu - scpu - bcpu - pgcpu;
    double other_pct = rp->st1 > rp->st0 ? 100.0 * other_s * (double)(hz > 0 ? hz : 100) / (double)(rp->st1 - rp->st0) : 0;
    double cpu_per_k = r->answers_window ? dcpu * 1000.0 / (double)r->answers_window : 0;

    if (!o->quiet) {
        printf("paybench %s: %d connections x depth %d, %s accounts %ld, %.1fs measured\n", o->label,
               o->connections, o->depth, o->mode == ACCT_SLOT ? "slot" : "random", o->accounts, rp->window_s);
        printf("  payments/s (succeeded): %.1f   answers/s: %.1f\n", pps, aps);
        printf("  latency ms: p50 %.2f  p90 %.2f  p99 %.2f  p99.9 %.2f  max %.2f\n", h_pct_ms(&r->lat, 50),
               h_pct_ms(&r->lat, 90), h_pct_ms(&r->lat, 99), h_pct_ms(&r->lat, 99.9), (double)r->lat.max_us / 1000);
        print_tally("ok by status", &r->ok_status);
        print_tally("errors by code", &r->err_code);
        if (rp->d1.ok)
            printf("  daemon: cpu %.2fs (%.3f s per 1000 answers), VmHWM %ld KiB, VmRSS %ld KiB\n", dcpu,
                   cpu_per_k, rp->d1.vmhwm_kb, rp->d1.vmrss_kb);
        printf("  machine cpu busy %.0f%% of %ld cpus; paybench cpu %.2fs%s", sysbusy, ncpu, bcpu,
               rp->s1.ok ? "" : "\n");
        if (rp->s1.ok)
            printf("; psp-sim cpu %.2fs\n", scpu);
        if (o->pg_pid)
            printf("  postgres cpu %.2fs (%.3f s per 1000 answers); other processes %.0f%% of the machine\n", pgcpu,
                   r->answers_window ? pgcpu * 1000.0 / (double)r->answers_window : 0, other_pct);
        for (int i = 0; i < o->nsteps; i++)
            printf("  hold %ld: in_flight %lld prepared %lld VmRSS %ld KiB%s\n", rp->steps[i].target,
                   rp->steps[i].in_flight, rp->steps[i].prepared, rp->steps[i].vmrss_kb,
                   rp->steps[i].reached ? "" : " (target not reached)");
        if (r->bad_lines)
            printf("  unparsed answers: %" PRIu64 "\n", r->bad_lines);
    }
    if (!o->json_path)
        return;
    FILE *f = fopen(o->json_path, "w");
    if (!f) {
        fprintf(stderr, "paybench: %s: %s\n", o->json_path, strerror(errno));
        return;
    }
    fprintf(f, "{\"label\":\"%s\",\"connections\":%d,\"depth\":%d,\"accounts\":%ld,\"account_mode\":\"%s\",",
            o->label, o->connections, o->depth, o->accounts, o->mode == ACCT_SLOT ? "slot" : "random");
    fprintf(f, "\"window_s\":%.3f,\"answers\":%" PRIu64 ",\"succeeded\":%" PRIu64 ",", rp->window_s,
            r->answers_window, r->succeeded_window);
    fprintf(f, "\"payments_per_s\":%.1f,\"answers_per_s\":%.1f,", pps, aps);
    fprintf(f, "\"latency_ms\":{\"p50\":%.3f,\"p90\":%.3f,\"p99\":%.3f,\"p999\":%.3f,\"max\":%.3f,\"mean\":%.3f},",
            h_pct_ms(&r->lat, 50), h_pct_ms(&r->lat, 90), h_pct_ms(&r->lat, 99), h_pct_ms(&r->lat, 99.9),
            (double)r->lat.max_us / 1000, r->lat.count ? (double)r->lat.sum_us / (double)r->lat.count / 1000 : 0);
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
    if (o->nsteps) {
        fprintf(f, ",\"hold\":[");
        for (int i = 0; i < o->nsteps; i++)
            fprintf(f, "%s{\"target\":%ld,\"in_flight\":%lld,\"prepared\":%lld,\"vmrss_kb\":%ld,\"wait_s\":%.2f,"
                       "\"reached\":%s}",
                    i ? "," : "", rp->steps[i].target, rp->steps[i].in_flight, rp->steps[i].prepared,
                    rp->steps[i].vmrss_kb, rp->steps[i].wait_s, rp->steps[i].reached ? "true" : "false");
        fprintf(f, "]");
        if (o->nsteps >= 2) {
            const step_result *a = &rp->steps[0], *b = &rp->steps[o->nsteps - 1];
            long long dn = b->prepared - a->prepared;
            fprintf(f, ",\"bytes_per_in_flight\":%.0f",
                    dn > 0 ? (double)(b->vmrss_kb - a->vmrss_kb) * 1024.0 / (double)dn : 0.0);
        }
    }
    fprintf(f, "}\n");
    fclose(f);
}

/* ---------------------------------------------------------------- main */

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

static int parse_args(int argc, char **argv, options *o)
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
                o->mode = ACCT_RANDOM;
            else if (!strcmp(v, "slot"))
                o->mode = ACCT_SLOT;
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
        } else if (!strcmp(a, "--hold-timeout")) {
            ok = parse_double(v, 1, 3600, &o->hold_timeout_s);
        } else if (!strcmp(a, "--hold-steps")) {
            const char *p = v;
            while (*p && o->nsteps < MAX_STEPS) {
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
    if (o->mode == ACCT_SLOT && o->accounts < nslots) {
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

/* Hold mode: raise the number of payments sent to each step in turn. */
static void run_hold(run *r, struct pollfd *pfd, report *rp)
{
    const options *o = &r->o;
    long nslots = (long)o->connections * o->depth;
    r->measuring = false;
    for (int s = 0; s < o->nsteps; s++) {
        long target = o->hold_steps[s];
        /* spread new requests round-robin over the connections */
        for (long k = r->hold_sent; k < target && k < nslots; k++) {
            int ci = (int)(k % o->connections), si = (int)(k / o->connections);
            if (!r->c[ci].dead)
                send_pay(r, &r->c[ci], si);
        }
        r->hold_sent = target;
        step_result *st = &rp->steps[s];
        st->target = target;
        uint64_t t0 = now_us(), last_poll = 0;
        uint64_t deadline = t0 + (uint64_t)(o->hold_timeout_s * 1e6);
        while (!interrupted && now_us() < deadline && live_connections(r)) {
            pump(r, pfd, 20);
            if (now_us() - last_poll < 200000)
                continue;
            last_poll = now_us();
            if (daemon_counts(o, &st->in_flight, &st->prepared) && st->prepared >= target) {
                st->reached = true;
                break;
            }
        }
        /* settle for a moment, then sample */
        uint64_t settle = now_us() + 300000;
        while (now_us() < settle)
            pump(r, pfd, 20);
        daemon_counts(o, &st->in_flight, &st->prepared);
        st->vmrss_kb = proc_read(o->daemon_pid).vmrss_kb;
        st->wait_s = (double)(now_us() - t0) / 1e6;
        if (!o->quiet)
            fprintf(stderr, "paybench: hold step %ld: in_flight=%lld prepared=%lld VmRSS=%ld KiB (%.1fs)\n", target,
                    st->in_flight, st->prepared, st->vmrss_kb, st->wait_s);
    }
}

int main(int argc, char **argv)
{
    static run R;
    run *r = &R;
    if (parse_args(argc, argv, &r->o) != 0)
        return 2;
    const options *o = &r->o;
    signal(SIGPIPE, SIG_IGN);
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_sigint;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    r->rng = now_us() ^ ((uint64_t)getpid() << 32);

    if (o->ready_s > 0 && !wait_ready(o)) {
        fprintf(stderr, "paybench: the daemon did not become ready within %.0fs\n", o->ready_s);
        return 1;
    }
    report rp;
    memset(&rp, 0, sizeof(rp));
    rp.vmrss_idle_kb = proc_read(o->daemon_pid).vmrss_kb;

    r->c = calloc((size_t)o->connections, sizeof(conn));
    struct pollfd *pfd = calloc((size_t)o->connections, sizeof(*pfd));
    if (!r->c || !pfd) {
        fprintf(stderr, "paybench: out of memory\n");
        return 1;
    }
    for (int i = 0; i < o->connections; i++) {
        conn *c = &r->c[i];
        c->idx = i;
        c->fd = connect_unix(o->socket_path);
        c->slots = calloc((size_t)o->depth, sizeof(slot));
        if (c->fd < 0 || !c->slots) {
            fprintf(stderr, "paybench: connect %s: %s\n", o->socket_path, strerror(errno));
            return 1;
        }
    }

    if (o->nsteps) {
        rp.d0 = proc_read(o->daemon_pid);
        rp.s0 = proc_read(o->sim_pid);
        rp.self0 = self_cpu_s();
    rp.pg0 = tree_cpu_s(o->pg_pid);
        rp.pg0 = tree_cpu_s(o->pg_pid);
        sys_cpu(&rp.sb0, &rp.st0);
        uint64_t t0 = now_us();
        run_hold(r, pfd, &rp);
        /* collect every answer */
        uint64_t deadline = now_us() + (uint64_t)(o->drain_s * 1e6);
        while (!interrupted && total_outstanding(r) > 0 && now_us() < deadline)
            pump(r, pfd, 50);
        rp.drained = total_outstanding(r) == 0;
        rp.window_s = (double)(now_us() - t0) / 1e6;
        rp.d1 = proc_read(o->daemon_pid);
        rp.s1 = proc_read(o->sim_pid);
        rp.self1 = self_cpu_s();
    rp.pg1 = tree_cpu_s(o->pg_pid);
        rp.pg1 = tree_cpu_s(o->pg_pid);
        sys_cpu(&rp.sb1, &rp.st1);
        r->answers_window = r->answers_total;
        r->succeeded_window = tally_get(&r->ok_status, "succeeded");
        write_report(r, &rp);
        return rp.drained && !interrupted ? 0 : 1;
    }

    /* duration mode: fill every slot, warm up, measure, drain */
    r->sending = true;
    for (int i = 0; i < o->connections; i++)
        for (int s = 0; s < o->depth; s++)
            send_pay(r, &r->c[i], s);
    uint64_t start = now_us();
    uint64_t warm_end = start + (uint64_t)(o->warmup_s * 1e6);
    while (!interrupted && now_us() < warm_end && live_connections(r))
        pump(r, pfd, 10);
    r->t_measure = now_us();
    r->t_end = r->t_measure + (uint64_t)(o->duration_s * 1e6);
    rp.d0 = proc_read(o->daemon_pid);
    rp.s0 = proc_read(o->sim_pid);
    rp.self0 = self_cpu_s();
    rp.pg0 = tree_cpu_s(o->pg_pid);
    sys_cpu(&rp.sb0, &rp.st0);
    r->measuring = true;
    while (!interrupted && now_us() < r->t_end && live_connections(r))
        pump(r, pfd, 10);
    uint64_t t_stop = now_us();
    rp.d1 = proc_read(o->daemon_pid);
    rp.s1 = proc_read(o->sim_pid);
    rp.self1 = self_cpu_s();
    rp.pg1 = tree_cpu_s(o->pg_pid);
    sys_cpu(&rp.sb1, &rp.st1);
    rp.window_s = (double)((t_stop < r->t_end ? t_stop : r->t_end) - r->t_measure) / 1e6;
    r->sending = false;
    uint64_t deadline = now_us() + (uint64_t)(o->drain_s * 1e6);
    while (!interrupted && total_outstanding(r) > 0 && now_us() < deadline && live_connections(r))
        pump(r, pfd, 20);
    rp.drained = total_outstanding(r) == 0;
    rp.d1.vmhwm_kb = proc_read(o->daemon_pid).vmhwm_kb;
    if (!rp.drained)
        fprintf(stderr, "paybench: %d answers still outstanding after the drain\n", total_outstanding(r));
    write_report(r, &rp);
    for (int i = 0; i < o->connections; i++)
        if (!r->c[i].dead)
            close(r->c[i].fd);
    return live_connections(r) == o->connections && !interrupted ? 0 : 1;
}
