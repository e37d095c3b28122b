/*
 * proc_list_adyen.c - Adyen's side of reconciliation. Adyen publishes no API
 * that lists payments; what it gives a merchant is the settlement details
 * report, a CSV file (https://docs.adyen.com/reporting/settlement-detail-report,
 * columns in docs/processors.md). This reads one such file, given by path, a
 * page at a time: the cursor is the byte offset after the last line read, so
 * a run resumes exactly where it stopped.
 *
 * Rows used (by the header's column names, so a report with extra or
 * reordered columns reads the same): Type Settled / SettledBulk -> a
 * succeeded payment of Gross Credit; Refunded / RefundedBulk / Chargeback ->
 * the payment refunded (amount Gross Debit). Every other type (fees,
 * payouts, corrections) is not a payment and is skipped. Merchant Reference
 * is our gid. Amounts are major units (ISO 4217 exponent per currency).
 *
 * The file is local and each page is at most PROC_LIST_MAX rows, read with
 * plain stdio on the loop (a bounded local read, like the configuration);
 * the answer is delivered from a zero timer, never inside the call.
 */
#include "proc.h"
#include "log.h"
#include "loop.h"
#include "proc_util.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LINE_MAX_BYTES 8192
#define FIELDS_MAX 64

enum { C_PSP, C_MREF, C_TYPE, C_CUR, C_DEBIT, C_CREDIT, C__COUNT };
static const char *const column_names[C__COUNT] = {
    [C_PSP] = "Psp Reference", [C_MREF] = "Merchant Reference", [C_TYPE] = "Type",
    [C_CUR] = "Gross Currency", [C_DEBIT] = "Gross Debit (GC)", [C_CREDIT] = "Gross Credit (GC)",
};

static struct {
    bool timer_ready, busy;
    loop_timer timer;
    proc_list_cb cb;
    void *arg;
    proc_list_page page;
    proc_list_item *items;
} st;

/* Split one CSV line (RFC 4180 quoting) into at most FIELDS_MAX fields, in place. */
static int split_csv(char *line, char **fields)
{
    int n = 0;
    char *p = line;
    for (;;) {
        if (n == FIELDS_MAX)
            return -1;
        char *out = p;
        fields[n++] = out;
        if (*p == '"') {
            p++;
            for (;;) {
                if (*p == '\0')
                    return -1;              /* unterminated quote */
                if (*p == '"' && p[1] == '"') {
                    *out++ = '"';
                    p += 2;
                } else if (*p == '"') {
                    p++;
                    break;
                } else {
                    *out++ = *p++;
                }
            }
            if (*p != ',' && *p != '\0')
                return -1;
        } else {
            while (*p && *p != ',')
                *out++ = *p++;
        }
        bool last = *p == '\0';
        *out = '\0';
        if (last)
            return n;
        p++;
    }
}

static int currency_exponent(const char *cur)
{
    static const char *const zero[] = { "BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG",
                                        "RWF", "UGX", "VND", "VUV", "XAF", "XOF", "XPF" };
    static const char *const three[] = { "BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND" };
    for (size_t i = 0; i < PC_ARRAY_LEN(zero); i++)
        if (!strcmp(cur, zero[i]))
            return 0;
    for (size_t i = 0; i < PC_ARRAY_LEN(three); i++)
        if (!strcmp(cur, three[i]))
            return 3;
    return 2;
}

/* "12.5" / "12.50" / "12" in major units -> minor units; false if malformed. */
static bool parse_major(const char *s, const char *cur, int64_t *out)
{
    int e = currency_exponent(cur);
    int64_t v = 0;
    int frac = -1;
    if (!*s)
        return false;
    for (const char *p = s; *p; p++) {
        if (*p == '.' && frac < 0) {
            frac = 0;
            continue;
        }
        if (*p < '0' || *p > '9' || v > INT64_MAX / 10 - 9)
            return false;
        if (frac >= 0 && ++frac > e)
            return false;
        v = v * 10 + (*p - '0');
    }
    for (int i = frac < 0 ? 0 : frac; i < e; i++) {
        if (v > INT64_MAX / 10)
            return false;
        v *= 10;
    }
    *out = v;
    return true;
}

static void chomp(char *line)
{
    size_t n = strlen(line);
    while (n && (line[n - 1] == '\n' || line[n - 1] == '\r'))
        line[--n] = '\0';
}

static void fire(void *arg)
{
    (void)arg;
    proc_list_cb cb = st.cb;
    void *cb_arg = st.arg;
    st.busy = false;
    cb(&st.page, cb_arg);
    free(st.items);
    st.items = NULL;
}

static void fail(const char *fmt, ...) PC_PRINTF(1, 2);

static void fail(const char *fmt, ...)
{
    va_list ap;
    st.page.outcome = PROC_INVALID;
    st.page.n = 0;
    st.page.more = false;
    va_start(ap, fmt);
    vsnprintf(st.page.error, sizeof(st.page.error), fmt, ap);
    va_end(ap);
}

/* Read one page from the report into st.page. */
static void read_page(const proc_list_req *req)
{
    char line[LINE_MAX_BYTES];
    char *f[FIELDS_MAX];
    int col[C__COUNT];
    long offset = 0;
    if (req->cursor && req->cursor[0]) {
        char *end;
        errno = 0;
        offset = strtol(req->cursor, &end, 10);
        if (errno || *end || offset < 0) {
            fail("bad cursor %s", req->cursor);
            return;
        }
    }
    FILE *in = fopen(req->path, "r");
    if (!in) {
        fail("cannot open the settlement report %s: %s", req->path, strerror(errno));
        return;
    }
    if (!fgets(line, sizeof(line), in)) {
        fail("the settlement report %s is empty", req->path);
        goto out;
    }
    chomp(line);
    if (line[0] == '\xef' && line[1] == '\xbb' && line[2] == '\xbf')
        memmove(line, line + 3, strlen(line + 3) + 1);    /* a UTF-8 byte order mark */
    int nf = split_csv(line, f);
    for (int c = 0; c < C__COUNT; c++) {
        col[c] = -1;
        for (int i = 0; i < nf; i++)
            if (!strcmp(f[i], column_names[c]))
                col[c] = i;
        if (col[c] < 0) {
            fail("the settlement report has no column \"%s\"", column_names[c]);
            goto out;
        }
    }
    if (offset > 0 && fseek(in, offset, SEEK_SET) != 0) {
        fail("cannot seek in the settlement report: %s", strerror(errno));
        goto out;
    }
    int n = 0;
    while (n < req->limit && fgets(line, sizeof(line), in)) {
        size_t len = strlen(line);
        if (len == sizeof(line) - 1 && line[len - 1] != '\n') {
            fail("a line of the settlement report is longer than %d bytes", LINE_MAX_BYTES - 1);
            goto out;
        }
        chomp(line);
        if (!line[0])
            continue;
        nf = split_csv(line, f);
        if (nf < 0) {
            fail("malformed CSV line in the settlement report");
            goto out;
        }
        bool short_line = false;
        for (int c = 0; c < C__COUNT; c++)
            if (col[c] >= nf)
                short_line = true;
        if (short_line)
            continue;
        const char *type = f[col[C_TYPE]];
        bool settled = !strcmp(type, "Settled") || !strcmp(type, "SettledBulk");
        bool refund = !strcmp(type, "Refunded") || !strcmp(type, "RefundedBulk") || !strcmp(type, "Chargeback");
        if (!settled && !refund)
            continue;
        proc_list_item *it = &st.items[n];
        memset(it, 0, sizeof(*it));
        const char *cur = f[col[C_CUR]];
        if (!proc_copy(it->gid, sizeof(it->gid), f[col[C_MREF]]) ||
            !proc_copy(it->id, sizeof(it->id), f[col[C_PSP]]) || strlen(cur) != 3 ||
            !proc_copy(it->currency, sizeof(it->currency), cur) ||
            !parse_major(f[col[settled ? C_CREDIT : C_DEBIT]], cur, &it->amount)) {
            fail("malformed %s row in the settlement report (psp reference %s)", type, f[col[C_PSP]]);
            goto out;
        }
        it->status = PROC_ST_SUCCEEDED;
        it->refunded = refund;
        n++;
    }
    long pos = ftell(in);
    st.page.outcome = PROC_PAYMENT;
    st.page.n = n;
    st.page.items = st.items;
    st.page.more = !feof(in) && n == req->limit;
    if (!st.page.more) {
        /* Another line after a full page? Then say so; else the file is done. */
        int ch = fgetc(in);
        st.page.more = ch != EOF;
    }
    snprintf(st.page.cursor, sizeof(st.page.cursor), "%ld", pos);
out:
    fclose(in);
}

int proc_list_adyen_csv(const proc_list_req *req, proc_list_cb cb, void *arg)
{
    if (st.busy || !req->path || !req->path[0])
        return -1;
    if (!st.timer_ready) {
        if (loop_timer_init(&st.timer, fire, NULL) != 0)
            return -1;
        st.timer_ready = true;
    }
    st.items = calloc((size_t)req->limit, sizeof(*st.items));
    if (!st.items)
        return -1;
    memset(&st.page, 0, sizeof(st.page));
    read_page(req);
    if (st.page.outcome != PROC_PAYMENT)
        log_warn("proc event=list_failed processor=adyen error=\"%s\"", st.page.error);
    st.cb = cb;
    st.arg = arg;
    st.busy = true;
    loop_timer_start(&st.timer, 0);
    return 0;
}

void proc_list_adyen_stop(void)
{
    if (st.timer_ready)
        loop_timer_deinit(&st.timer);
    st.timer_ready = false;
    st.busy = false;
    free(st.items);
    st.items = NULL;
}
