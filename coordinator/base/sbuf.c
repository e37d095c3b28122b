/* sbuf.c - growable string buffer and SQL literal encoding (see sbuf.h). */
#include "sbuf.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void sbuf_init(sbuf *b) { memset(b, 0, sizeof(*b)); }
void sbuf_free(sbuf *b) { free(b->data); sbuf_init(b); }
void sbuf_reset(sbuf *b) { b->len = 0; if (b->data) b->data[0] = '\0'; b->failed = false; }
bool sbuf_ok(const sbuf *b) { return !b->failed; }
const char *sbuf_str(const sbuf *b) { return b->data ? b->data : ""; }

static bool reserve(sbuf *b, size_t extra)
{
    if (b->failed)
        return false;
    if (b->len + extra + 1 <= b->cap)
        return true;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra + 1)
        cap *= 2;
    char *d = realloc(b->data, cap);
    if (!d) {
        b->failed = true;
        return false;
    }
    b->data = d;
    b->cap = cap;
    return true;
}

void sbuf_add(sbuf *b, const char *s, size_t n)
{
    if (!reserve(b, n))
        return;
    memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = '\0';
}

void sbuf_puts(sbuf *b, const char *s) { sbuf_add(b, s, strlen(s)); }

void sbuf_printf(sbuf *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0 || !reserve(b, (size_t)n)) {
        b->failed = true;
        return;
    }
    va_start(ap, fmt);
    vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

void sbuf_literal(sbuf *b, const char *s)
{
    if (!s) {
        sbuf_puts(b, "NULL");
        return;
    }
    sbuf_add(b, "'", 1);
    for (const char *p = s; *p; ) {
        const char *q = strchr(p, '\'');
        if (!q) {
            sbuf_puts(b, p);
            break;
        }
        sbuf_add(b, p, (size_t)(q - p));
        sbuf_add(b, "''", 2);
        p = q + 1;
    }
    sbuf_add(b, "'", 1);
}
