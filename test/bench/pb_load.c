/*
 * pb_load.c - paybench's load: C pipelined connections to the daemon's Unix
 * socket, each keeping up to --depth `pay` requests outstanding (one per
 * slot), unique idempotency keys, answers matched to their slot by id,
 * counted by status and error code, and their latency in a log-linear
 * histogram. One thread, nonblocking sockets, poll(2).
 */
#include "paybench.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAX_LINE (1u << 20)          /* longest answer line we accept */
#define READ_CHUNK 65536

/* ---------------------------------------------------------------- time */

uint64_t pb_now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

/* ---------------------------------------------------------------- histogram */

static unsigned msb64(uint64_t v) { return 63u - (unsigned)__builtin_clzll(v); }

static size_t h_index(uint64_t v)
{
    if (v < 2 * PB_H_SUB)
        return (size_t)v;
    unsigned e = msb64(v) - PB_H_SUB_BITS;
    if (e > PB_H_MAX_EXP) {
        e = PB_H_MAX_EXP;
        v = ((uint64_t)(2 * PB_H_SUB - 1)) << e;
    }
    return 2 * PB_H_SUB + (size_t)(e - 1) * PB_H_SUB + (size_t)((v >> e) - PB_H_SUB);
}

/* Midpoint of bucket i. */
static double h_value(size_t i)
{
    if (i < 2 * PB_H_SUB)
        return (double)i;
    unsigned e = (unsigned)((i - 2 * PB_H_SUB) / PB_H_SUB) + 1;
    uint64_t lo = ((uint64_t)((i - 2 * PB_H_SUB) % PB_H_SUB) + PB_H_SUB) << e;
    return (double)lo + (double)((1ull << e) - 1) / 2.0;
}

void pb_h_add(pb_histo *h, uint64_t us)
{
    h->b[h_index(us)]++;
    h->count++;
    h->sum_us += us;
    if (us > h->max_us)
        h->max_us = us;
}

double pb_h_pct_ms(const pb_histo *h, double p)
{
    if (!h->count)
        return 0;
    uint64_t want = (uint64_t)((double)h->count * p / 100.0 + 0.999999);
    if (want < 1)
        want = 1;
    uint64_t seen = 0;
    for (size_t i = 0; i < PB_H_BUCKETS; i++) {
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

void pb_tally_add(pb_tally *t, const char *name, size_t len)
{
    if (len >= sizeof(t->name[0]))
        len = sizeof(t->name[0]) - 1;
    for (int i = 0; i < t->len; i++)
        if (strlen(t->name[i]) == len && memcmp(t->name[i], name, len) == 0) {
            t->n[i]++;
            return;
        }
    int i = t->len < PB_MAX_CODES ? t->len++ : PB_MAX_CODES - 1;
    memcpy(t->name[i], name, len);
    t->name[i][len] = '\0';
    t->n[i]++;
}

uint64_t pb_tally_get(const pb_tally *t, const char *name)
{
    for (int i = 0; i < t->len; i++)
        if (!strcmp(t->name[i], name))
            return t->n[i];
    return 0;
}

/* ---------------------------------------------------------------- buffers */

static void buf_need(pb_buf *b, size_t extra)
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

static void buf_printf(pb_buf *b, const char *fmt, ...) PB_PRINTF(2, 3);
static void buf_printf(pb_buf *b, const char *fmt, ...)
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

/* ---------------------------------------------------------------- requests */

static uint64_t rng_next(pb_run *r)
{
    /* splitmix64 */
    uint64_t z = (r->rng += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

int pb_connect_unix(const char *path)
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

static long pick_account(pb_run *r, int ci, int si)
{
    const pb_options *o = &r->o;
    if (o->mode == PB_ACCT_RANDOM)
        return (long)(rng_next(r) % (uint64_t)o->accounts);
    long nslots = (long)o->connections * o->depth;
    long k = (long)ci * o->depth + si;
    pb_slot *s = &r->c[ci].slots[si];
    long per = o->accounts / nslots;            /* accounts owned by each slot, >= 1 */
    long a = k + (s->acct_iter % per) * nslots;
    s->acct_iter++;
    return a;
}

void pb_send_pay(pb_run *r, pb_conn *c, int si)
{
    const pb_options *o = &r->o;
    long a = pick_account(r, c->idx, si) + o->account_first;
    pb_slot *s = &c->slots[si];
    buf_printf(&c->out,
               "{\"id\":%d,\"op\":\"pay\",\"idempotency_key\":\"%s-%d-%" PRIu64 "\",\"account\":\"%s%ld\","
               "\"amount\":%lld,\"currency\":\"%s\"",
               si, o->key_prefix, c->idx, c->seq++, o->account_prefix, a, o->amount, o->currency);
    if (o->wait_ms >= 0)
        buf_printf(&c->out, ",\"wait_ms\":%lld", o->wait_ms);
    buf_printf(&c->out, "}\n");
    s->busy = true;
    s->sent_us = pb_now_us();
    c->outstanding++;
    r->sent_total++;
}

/* ---------------------------------------------------------------- answers */

/* The string value that follows `key` (e.g. "\"code\":\""), up to its closing quote. */
static bool str_after(const char *line, size_t len, const char *key, const char **val, size_t *vlen)
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

/* The answer's "id" (the slot). Answers start with it; anything else is rejected. */
static bool answer_id(const char *line, size_t len, long long *out)
{
    const char *p = memmem(line, len, "\"id\":", 5);
    if (!p)
        return false;
    p += 5;
    const char *end = line + len;
    long long v = 0;
    int n = 0;
    while (p < end && *p >= '0' && *p <= '9' && n < 12) {
        v = v * 10 + (*p++ - '0');
        n++;
    }
    if (!n)
        return false;
    *out = v;
    return true;
}

static void handle_answer(pb_run *r, pb_conn *c, const char *line, size_t len, uint64_t t)
{
    long long id;
    if (!answer_id(line, len, &id) || id >= r->o.depth || !c->slots[id].busy) {
        r->bad_lines++;
        if (r->bad_lines <= 3)
            fprintf(stderr, "paybench: unexpected answer: %.*s\n", (int)(len > 300 ? 300 : len), line);
        return;
    }
    pb_slot *s = &c->slots[id];
    s->busy = false;
    c->outstanding--;
    r->answers_total++;
    bool in_window = r->measuring && t <= r->t_end;
    const char *v;
    size_t vl;
    bool ok = memmem(line, len, "\"ok\":true", 9) != NULL;
    bool has_status = ok && str_after(line, len, "\"status\":\"", &v, &vl);
    bool succeeded = has_status && vl == 9 && !memcmp(v, "succeeded", 9);
    if (succeeded)
        r->succeeded_total++;
    if (in_window || r->o.nsteps) {         /* hold mode counts every answer */
        if (in_window) {
            r->answers_window++;
            pb_h_add(&r->lat, t - s->sent_us);
            if (succeeded)
                r->succeeded_window++;
        }
        if (has_status)
            pb_tally_add(&r->ok_status, v, vl);
        else if (ok)
            pb_tally_add(&r->ok_status, "?", 1);
        else if (str_after(line, len, "\"code\":\"", &v, &vl))
            pb_tally_add(&r->err_code, v, vl);
        else
            pb_tally_add(&r->err_code, "?", 1);
    }
    if (r->sending && !r->o.nsteps)
        pb_send_pay(r, c, (int)id);
}

/* ---------------------------------------------------------------- I/O */

static void conn_fail(pb_conn *c, const char *why)
{
    if (c->dead)
        return;
    fprintf(stderr, "paybench: connection %d: %s (%d outstanding)\n", c->idx, why, c->outstanding);
    c->dead = true;
    close(c->fd);
    c->fd = -1;
}

static void conn_read(pb_run *r, pb_conn *c)
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
        uint64_t t = pb_now_us();
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

static void conn_write(pb_conn *c)
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

void pb_pump(pb_run *r, struct pollfd *pfd, int timeout_ms)
{
    int n = r->o.connections;
    for (int i = 0; i < n; i++) {
        pb_conn *c = &r->c[i];
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
        pb_conn *c = &r->c[i];
        if (!pfd[i].revents || c->dead)
            continue;
        if (pfd[i].revents & (POLLIN | POLLHUP | POLLERR))
            conn_read(r, c);
        if (!c->dead && (pfd[i].revents & POLLOUT))
            conn_write(c);
    }
}

int pb_total_outstanding(const pb_run *r)
{
    int n = 0;
    for (int i = 0; i < r->o.connections; i++)
        if (!r->c[i].dead)
            n += r->c[i].outstanding;
    return n;
}

int pb_live_connections(const pb_run *r)
{
    int n = 0;
    for (int i = 0; i < r->o.connections; i++)
        n += !r->c[i].dead;
    return n;
}
