/*
 * ctl_output.c - what paycoordctl prints: psql-style tables and expanded
 * records for people, one JSON line for scripts (--json), and its messages.
 */
#include "ctl.h"

#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------ messages */

void ctl_verr(const char *fmt, va_list ap)
{
    fputs("paycoordctl: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
}

void ctl_err(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    ctl_verr(fmt, ap);
    va_end(ap);
}

_Noreturn void ctl_oom(void)
{
    fputs("paycoordctl: out of memory\n", stderr);
    exit(CTL_EXIT_ERROR);
}

char *ctl_take(sbuf *b)
{
    if (!sbuf_ok(b))
        ctl_oom();
    char *s = b->data ? b->data : strdup("");
    if (!s)
        ctl_oom();
    sbuf_init(b);
    return s;
}

/* Control characters become escapes, so a hostile last_error cannot move the
 * cursor or forge table lines. */
void ctl_add_printable(sbuf *b, const char *s)
{
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '\n')
            sbuf_add(b, "\\n", 2);
        else if (*p == '\t')
            sbuf_add(b, "\\t", 2);
        else if (*p == '\r')
            sbuf_add(b, "\\r", 2);
        else if (*p < 0x20 || *p == 0x7F)
            sbuf_printf(b, "\\x%02x", (unsigned)*p);
        else
            sbuf_add(b, (const char *)p, 1);
    }
}

int ctl_report_error(const char *code, const char *message)
{
    sbuf b;
    sbuf_init(&b);
    ctl_add_printable(&b, message);
    char *m = ctl_take(&b);
    ctl_err("%s: %s", code, m);
    free(m);
    return CTL_EXIT_ERROR;
}

int ctl_report_reply_error(const ctl_reply *r)
{
    return ctl_report_error(r->code, r->message);
}

/* ------------------------------------------------------------------ text */

/* Display width of UTF-8 text: code points (wide characters count as one). */
static size_t text_width(const char *s)
{
    size_t w = 0;
    for (const unsigned char *p = (const unsigned char *)s; *p; p++)
        if ((*p & 0xC0) != 0x80)
            w++;
    return w;
}

static void put_repeat(FILE *out, int ch, size_t n)
{
    for (size_t i = 0; i < n; i++)
        fputc(ch, out);
}

/* Text of a JSON value for people: null is empty (as psql prints NULL). */
static char *value_text(const cJSON *v)
{
    sbuf b;
    sbuf_init(&b);
    if (!v || cJSON_IsNull(v)) {
        /* empty */
    } else if (cJSON_IsString(v)) {
        ctl_add_printable(&b, v->valuestring);
    } else if (cJSON_IsBool(v)) {
        sbuf_puts(&b, cJSON_IsTrue(v) ? "true" : "false");
    } else if (cJSON_IsNumber(v)) {
        double d = v->valuedouble;
        if (d == floor(d) && fabs(d) < 9007199254740992.0)
            sbuf_printf(&b, "%.0f", d);
        else
            sbuf_printf(&b, "%.15g", d);
    } else {
        char *t = cJSON_PrintUnformatted(v);
        if (!t)
            ctl_oom();
        ctl_add_printable(&b, t);
        free(t);
    }
    return ctl_take(&b);
}

/* "850ms", "42s", "5m03s", "2h05m", "3d04h". */
static char *age_text(const cJSON *age_ms)
{
    sbuf b;
    sbuf_init(&b);
    if (cJSON_IsNumber(age_ms) && age_ms->valuedouble >= 0) {
        int64_t ms = (int64_t)age_ms->valuedouble, s = ms / 1000;
        if (ms < 1000)
            sbuf_printf(&b, "%" PRId64 "ms", ms);
        else if (s < 60)
            sbuf_printf(&b, "%" PRId64 "s", s);
        else if (s < 3600)
            sbuf_printf(&b, "%" PRId64 "m%02" PRId64 "s", s / 60, s % 60);
        else if (s < 86400)
            sbuf_printf(&b, "%" PRId64 "h%02" PRId64 "m", s / 3600, s % 3600 / 60);
        else
            sbuf_printf(&b, "%" PRId64 "d%02" PRId64 "h", s / 86400, s % 86400 / 3600);
    }
    return ctl_take(&b);
}

/* ------------------------------------------------------------------ records */

/* Key/value pairs for the vertical layout; nested objects are flattened to
 * "outer.inner" keys. */
typedef struct kv_list {
    char **keys;
    char **vals;
    size_t n, cap;
} kv_list;

static void kv_push(kv_list *l, char *key, char *val)
{
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 16;
        char **k = realloc(l->keys, cap * sizeof(*k));
        if (!k)
            ctl_oom();
        l->keys = k;
        char **v = realloc(l->vals, cap * sizeof(*v));
        if (!v)
            ctl_oom();
        l->vals = v;
        l->cap = cap;
    }
    l->keys[l->n] = key;
    l->vals[l->n] = val;
    l->n++;
}

static void kv_free(kv_list *l)
{
    for (size_t i = 0; i < l->n; i++) {
        free(l->keys[i]);
        free(l->vals[i]);
    }
    free(l->keys);
    free(l->vals);
    memset(l, 0, sizeof(*l));
}

static void kv_flatten(kv_list *l, const cJSON *obj, const char *prefix)
{
    const cJSON *it;
    cJSON_ArrayForEach(it, obj) {
        sbuf k;
        sbuf_init(&k);
        if (prefix) {
            sbuf_puts(&k, prefix);
            sbuf_add(&k, ".", 1);
        }
        ctl_add_printable(&k, it->string ? it->string : "?");
        char *key = ctl_take(&k);
        if (cJSON_IsObject(it) && it->child) {
            kv_flatten(l, it, key);
            free(key);
        } else {
            kv_push(l, key, value_text(it));
        }
    }
}

/* psql's expanded layout: "key | value", keys padded to one width. A title
 * gives the "-[ title ]---+----" header line psql prints per record. */
static void print_kv(FILE *out, const kv_list *l, const char *title)
{
    size_t kw = 0, vw = 0;
    for (size_t i = 0; i < l->n; i++) {
        size_t w = text_width(l->keys[i]);
        kw = w > kw ? w : kw;
        w = text_width(l->vals[i]);
        vw = w > vw ? w : vw;
    }
    if (title) {
        size_t tw = text_width(title) + 4;   /* "-[ " title " ]" */
        fprintf(out, "-[ %s ]", title);
        put_repeat(out, '-', tw < kw + 1 ? kw + 1 - tw : 0);
        fputc('+', out);
        put_repeat(out, '-', vw + 1);
        fputc('\n', out);
    }
    for (size_t i = 0; i < l->n; i++) {
        fputs(l->keys[i], out);
        put_repeat(out, ' ', kw - text_width(l->keys[i]));
        fputs(l->vals[i][0] ? " | " : " |", out);
        fputs(l->vals[i], out);
        fputc('\n', out);
    }
}

void ctl_print_object(FILE *out, const cJSON *obj, const char *title)
{
    kv_list l = { 0 };
    kv_flatten(&l, obj, NULL);
    print_kv(out, &l, title);
    kv_free(&l);
}

void ctl_print_json(const cJSON *v)
{
    char *t = cJSON_PrintUnformatted(v);
    if (!t)
        ctl_oom();
    fputs(t, stdout);
    fputc('\n', stdout);
    free(t);
}

int ctl_print_result(const ctl_ctx *x, const cJSON *result)
{
    if (x->json)
        ctl_print_json(result);
    else
        ctl_print_object(stdout, result, NULL);
    return CTL_EXIT_OK;
}

/* ------------------------------------------------------------------ tables */

/* psql's aligned table: centred headers, a "---+---" rule, text left and
 * numbers right, the last column unpadded, then "(N rows)". */
static void print_table(FILE *out, size_t ncols, const char *const *headers, const bool *right,
                        char **cells, size_t nrows)
{
    size_t *w = calloc(ncols, sizeof(*w));
    if (!w)
        ctl_oom();
    for (size_t c = 0; c < ncols; c++) {
        w[c] = text_width(headers[c]);
        for (size_t r = 0; r < nrows; r++) {
            size_t cw = text_width(cells[r * ncols + c]);
            w[c] = cw > w[c] ? cw : w[c];
        }
    }
    for (size_t c = 0; c < ncols; c++) {
        size_t pad = w[c] - text_width(headers[c]);
        fputs(c ? "|" : "", out);
        put_repeat(out, ' ', 1 + pad / 2);
        fputs(headers[c], out);
        put_repeat(out, ' ', c + 1 < ncols ? 1 + pad - pad / 2 : 0);
    }
    fputc('\n', out);
    for (size_t c = 0; c < ncols; c++) {
        fputs(c ? "+" : "", out);
        put_repeat(out, '-', w[c] + 2);
    }
    fputc('\n', out);
    for (size_t r = 0; r < nrows; r++) {
        for (size_t c = 0; c < ncols; c++) {
            const char *cell = cells[r * ncols + c];
            size_t pad = w[c] - text_width(cell);
            fputs(c ? "| " : " ", out);
            if (right[c])
                put_repeat(out, ' ', pad);
            fputs(cell, out);
            if (c + 1 < ncols)
                put_repeat(out, ' ', (right[c] ? 0 : pad) + 1);
        }
        fputc('\n', out);
    }
    fprintf(out, "(%zu %s)\n", nrows, nrows == 1 ? "row" : "rows");
    free(w);
}

/* The prepared list for people. The payment id and node are inside our
 * gids; --json and `show GID` give every field. */
void ctl_print_prepared_table(const cJSON *result)
{
    static const char *const headers[] = { "gid", "state", "account", "amount", "currency",
                                            "prepared_at", "age", "attempts", "last_error" };
    static const char *const keys[] = { "gid", "state", "account", "amount", "currency",
                                        "prepared_at", "age_ms", "attempts", "last_error" };
    static const bool right[] = { false, false, false, true, false, false, true, true, false };
    enum { NCOLS = PC_ARRAY_LEN(headers) };
    const cJSON *txs = cJSON_GetObjectItemCaseSensitive(result, "transactions");
    size_t nrows = (size_t)cJSON_GetArraySize(txs);
    char **cells = calloc(nrows * NCOLS + 1, sizeof(*cells));
    if (!cells)
        ctl_oom();
    size_t r = 0;
    const cJSON *tx;
    cJSON_ArrayForEach(tx, txs) {
        for (size_t c = 0; c < NCOLS; c++) {
            const cJSON *v = cJSON_GetObjectItemCaseSensitive(tx, keys[c]);
            cells[r * NCOLS + c] = strcmp(keys[c], "age_ms") == 0 ? age_text(v) : value_text(v);
        }
        r++;
    }
    print_table(stdout, NCOLS, headers, right, cells, nrows);
    for (size_t i = 0; i < nrows * NCOLS; i++)
        free(cells[i]);
    free(cells);
}

/* An array of objects as a table: one column per key (a dotted key "a.b"
 * reads a member of a nested object). */
void ctl_print_rows(const cJSON *rows, size_t ncols, const char *const *headers, const char *const *keys,
                    const bool *right)
{
    size_t nrows = (size_t)cJSON_GetArraySize(rows);
    char **cells = calloc(nrows * ncols + 1, sizeof(*cells));
    if (!cells)
        ctl_oom();
    size_t r = 0;
    const cJSON *row;
    cJSON_ArrayForEach(row, rows) {
        for (size_t c = 0; c < ncols; c++) {
            const cJSON *v = row;
            char part[64];
            const char *k = keys[c], *dot;
            while (v && (dot = strchr(k, '.')) && (size_t)(dot - k) < sizeof(part)) {
                memcpy(part, k, (size_t)(dot - k));
                part[dot - k] = '\0';
                v = cJSON_GetObjectItemCaseSensitive(v, part);
                k = dot + 1;
            }
            v = v ? cJSON_GetObjectItemCaseSensitive(v, k) : NULL;
            cells[r * ncols + c] = value_text(v);
        }
        r++;
    }
    print_table(stdout, ncols, headers, right, cells, nrows);
    for (size_t i = 0; i < nrows * ncols; i++)
        free(cells[i]);
    free(cells);
}
