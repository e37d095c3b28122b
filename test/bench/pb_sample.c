/*
 * pb_sample.c - what paybench reads besides the answers: CPU seconds and
 * memory of processes from /proc (the daemon, the processor, PostgreSQL's
 * postmaster with its backends), the machine's busy time, and the daemon's
 * own view through its health and stats ops (one short blocking connection
 * per call, outside the measured window's hot path).
 */
#include "paybench.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

/* ---------------------------------------------------------------- /proc */

static double ticks_to_s(unsigned long long ticks)
{
    long hz = sysconf(_SC_CLK_TCK);
    return (double)ticks / (double)(hz > 0 ? hz : 100);
}

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
    if (!p || !p[1])
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
double pb_tree_cpu_s(int pid)
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
    return ticks_to_s(ticks);
}

pb_proc pb_proc_read(int pid)
{
    pb_proc s = { 0, 0, 0, false };
    if (pid <= 0)
        return s;
    unsigned long long v[13];
    if (stat_fields(pid, v, 13) < 13)
        return s;
    s.cpu_s = ticks_to_s(v[11] + v[12]);                           /* utime 14, stime 15 */
    char path[64], line[512];
    snprintf(path, sizeof(path), "/proc/%d/status", pid);
    FILE *f = fopen(path, "r");
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

void pb_sys_cpu(unsigned long long *busy, unsigned long long *total)
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

double pb_self_cpu_s(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
           (double)ru.ru_stime.tv_usec / 1e6;
}

/* ---------------------------------------------------------------- JSON values by path */

static const char *skip_ws(const char *p, const char *end)
{
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
        p++;
    return p;
}

/* p at a '"': the position after the closing quote, or NULL. */
static const char *skip_string(const char *p, const char *end)
{
    for (p++; p < end; p++) {
        if (*p == '\\')
            p++;
        else if (*p == '"')
            return p + 1;
    }
    return NULL;
}

/* p at a value: the position after it, or NULL. */
static const char *skip_value(const char *p, const char *end)
{
    if (p >= end)
        return NULL;
    if (*p == '"')
        return skip_string(p, end);
    if (*p != '{' && *p != '[') {
        while (p < end && *p != ',' && *p != '}' && *p != ']')
            p++;
        return p;
    }
    int depth = 0;
    while (p < end) {
        if (*p == '"') {
            p = skip_string(p, end);
            if (!p)
                return NULL;
            continue;
        }
        if (*p == '{' || *p == '[')
            depth++;
        else if ((*p == '}' || *p == ']') && --depth == 0)
            return p + 1;
        p++;
    }
    return NULL;
}

/* p at a '{': the value of member `key` (klen bytes), or NULL. */
static const char *member(const char *p, const char *end, const char *key, size_t klen)
{
    p = skip_ws(p, end);
    if (p >= end || *p != '{')
        return NULL;
    p++;
    for (;;) {
        p = skip_ws(p, end);
        if (p >= end || *p != '"')
            return NULL;
        const char *k = p + 1, *ke = skip_string(p, end);
        if (!ke)
            return NULL;
        p = skip_ws(ke, end);
        if (p >= end || *p != ':')
            return NULL;
        p = skip_ws(p + 1, end);
        if ((size_t)(ke - 1 - k) == klen && !memcmp(k, key, klen))
            return p;
        p = skip_value(p, end);
        if (!p)
            return NULL;
        p = skip_ws(p, end);
        if (p >= end || *p != ',')
            return NULL;
        p++;
    }
}

bool pb_json_int(const char *json, size_t len, const char *path, long long *out)
{
    const char *p = json, *end = json + len;
    while (*path) {
        const char *dot = strchr(path, '.');
        size_t klen = dot ? (size_t)(dot - path) : strlen(path);
        p = member(p, end, path, klen);
        if (!p)
            return false;
        path += klen + (dot ? 1 : 0);
    }
    char tmp[40];
    size_t n = 0;
    while (p < end && n < sizeof(tmp) - 1 && *p && strchr("-+.0123456789eE", *p))
        tmp[n++] = *p++;
    tmp[n] = '\0';
    if (!n)
        return false;
    char *e;
    errno = 0;
    double v = strtod(tmp, &e);
    if (errno || *e)
        return false;
    *out = (long long)v;
    return true;
}

/* ---------------------------------------------------------------- the daemon's ops */

/* Sends one request line on a fresh blocking connection and reads one answer line. */
static int admin_call(const char *path, const char *req, char *ans, size_t anslen)
{
    int fd = pb_connect_unix(path);
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

bool pb_wait_ready(const pb_options *o)
{
    uint64_t deadline = pb_now_us() + (uint64_t)(o->ready_s * 1e6);
    char ans[4096];
    do {
        if (admin_call(o->socket_path, "{\"id\":0,\"op\":\"health\"}\n", ans, sizeof(ans)) == 0 &&
            strstr(ans, "\"ready\":true"))
            return true;
        usleep(50000);
    } while (pb_now_us() < deadline);
    return false;
}

/* The stats op's counts (the same names in paycoord 0.1 and now). */
pb_dstats pb_daemon_stats(const char *socket_path)
{
    pb_dstats s = { 0, 0, 0, false };
    char ans[32768];
    if (admin_call(socket_path, "{\"id\":0,\"op\":\"stats\"}\n", ans, sizeof(ans)) != 0)
        return s;
    size_t n = strlen(ans);
    s.ok = pb_json_int(ans, n, "result.in_flight", &s.in_flight) &&
           pb_json_int(ans, n, "result.prepared", &s.prepared) &&
           pb_json_int(ans, n, "result.processor.in_flight", &s.proc_in_flight);
    return s;
}
