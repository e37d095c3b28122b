/* sim_util.c - allocation, the growable buffer and JSON writer, logging and
 * number parsing shared by the psp-sim modules. */
#include "sim_util.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

int sim_log_level = 1;

static const char *const op_names[SIM_OP__COUNT] = {
    [SIM_OP_CREATE] = "create",
    [SIM_OP_GET] = "get",
    [SIM_OP_CANCEL] = "cancel",
    [SIM_OP_REFUND] = "refund",
    [SIM_OP_LIST] = "list",
};

const char *sim_mode_name(sim_mode m)
{
    switch (m) {
    case SIM_MODE_GENERIC: return "generic";
    case SIM_MODE_STRIPE: return "stripe";
    case SIM_MODE_ADYEN: return "adyen";
    }
    return "?";
}

const char *sim_op_name(sim_op op)
{
    return (unsigned)op < SIM_OP__COUNT ? op_names[op] : "?";
}

int sim_op_from_name(const char *name)
{
    for (int i = 0; i < SIM_OP__COUNT; i++)
        if (strcmp(name, op_names[i]) == 0)
            return i;
    return -1;
}

static void oom(size_t n)
{
    fprintf(stderr, "<2>psp-sim: out of memory allocating %zu bytes\n", n);
    abort();
}

void *sim_xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (p == NULL)
        oom(n);
    return p;
}

void *sim_xcalloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (p == NULL)
        oom(n * size);
    return p;
}

void *sim_xrealloc(void *p, size_t n)
{
    void *q = realloc(p, n ? n : 1);
    if (q == NULL)
        oom(n);
    return q;
}

void sim_buf_init(sim_buf *b)
{
    b->data = NULL;
    b->len = 0;
    b->cap = 0;
}

void sim_buf_free(sim_buf *b)
{
    free(b->data);
    sim_buf_init(b);
}

void sim_buf_reset(sim_buf *b)
{
    b->len = 0;
    if (b->data != NULL)
        b->data[0] = '\0';
}

/* Makes room for n more bytes plus the terminating NUL. */
static void reserve(sim_buf *b, size_t n)
{
    if (b->len + n + 1 <= b->cap)
        return;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + n + 1)
        cap *= 2;
    b->data = sim_xrealloc(b->data, cap);
    b->cap = cap;
}

void sim_buf_add(sim_buf *b, const void *p, size_t n)
{
    reserve(b, n);
    memcpy(b->data + b->len, p, n);
    b->len += n;
    b->data[b->len] = '\0';
}

void sim_buf_adds(sim_buf *b, const char *s)
{
    sim_buf_add(b, s, strlen(s));
}

void sim_buf_addc(sim_buf *b, char c)
{
    reserve(b, 1);
    b->data[b->len++] = c;
    b->data[b->len] = '\0';
}

void sim_buf_addf(sim_buf *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n <= 0)
        return;
    reserve(b, (size_t)n);
    va_start(ap, fmt);
    vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

void sim_buf_add_u64(sim_buf *b, uint64_t v)
{
    char tmp[24];
    size_t i = sizeof(tmp);
    do {
        tmp[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v != 0);
    sim_buf_add(b, tmp + i, sizeof(tmp) - i);
}

void sim_buf_add_i64(sim_buf *b, int64_t v)
{
    if (v < 0) {
        sim_buf_addc(b, '-');
        sim_buf_add_u64(b, (uint64_t)0 - (uint64_t)v);
    } else {
        sim_buf_add_u64(b, (uint64_t)v);
    }
}

void sim_buf_add_jstr(sim_buf *b, const char *s, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    reserve(b, n + 2);
    b->data[b->len++] = '"';
    size_t run = 0; /* start of the current run of bytes needing no escape */
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c != '"' && c != '\\')
            continue;
        sim_buf_add(b, s + run, i - run);
        run = i + 1;
        switch (c) {
        case '"': sim_buf_add(b, "\\\"", 2); break;
        case '\\': sim_buf_add(b, "\\\\", 2); break;
        case '\n': sim_buf_add(b, "\\n", 2); break;
        case '\r': sim_buf_add(b, "\\r", 2); break;
        case '\t': sim_buf_add(b, "\\t", 2); break;
        default: {
            char esc[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15]};
            sim_buf_add(b, esc, sizeof(esc));
        }
        }
    }
    sim_buf_add(b, s + run, n - run);
    sim_buf_addc(b, '"');
}

void sim_buf_add_double(sim_buf *b, double v)
{
    /* The shortest representation that reads back the same (17 always does). */
    for (int prec = 1; prec <= 17; prec++) {
        char tmp[40];
        int m = snprintf(tmp, sizeof(tmp), "%.*g", prec, v);
        if (m > 0 && (prec == 17 || strtod(tmp, NULL) == v)) {
            sim_buf_add(b, tmp, (size_t)m);
            return;
        }
    }
}

void sim_log(int prio, const char *fmt, ...)
{
    int need = prio <= SIM_LOG_WARNING ? 0 : prio == SIM_LOG_INFO ? 1 : 2;
    if (sim_log_level < need)
        return;
    char line[1024];
    int off = snprintf(line, sizeof(line), "<%d>psp-sim: ", prio);
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line + off, sizeof(line) - (size_t)off - 1, fmt, ap);
    va_end(ap);
    size_t len = (size_t)off + (n < 0 ? 0 : (size_t)n);
    if (len > sizeof(line) - 2)
        len = sizeof(line) - 2;
    line[len++] = '\n';
    fwrite(line, 1, len, stderr);
}

int64_t sim_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int sim_parse_i64(const char *s, size_t n, bool allow_negative, int64_t *out)
{
    size_t i = 0;
    bool neg = false;
    if (n > 0 && s[0] == '-' && allow_negative) {
        neg = true;
        i = 1;
    }
    if (i == n)
        return -1;
    uint64_t v = 0;
    for (; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        unsigned d = (unsigned)(s[i] - '0');
        if (v > ((uint64_t)INT64_MAX - d) / 10)
            return -1;
        v = v * 10 + d;
    }
    *out = neg ? -(int64_t)v : (int64_t)v;
    return 0;
}
