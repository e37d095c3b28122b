/*
 * proto.c - paycoord wire protocol v1: strict validation of one NDJSON request
 * line (UTF-8, JSON grammar, the field rules of docs/protocol.md). The JSON
 * scanner is json_scan.c, the reply encoders proto_reply.c.
 */
#include "proto.h"
#include "gid.h"
#include "json_scan.h"
#include "proto_text.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/*
 * How a line is checked, in order; the first failure decides the error:
 *
 *  1. No NUL byte, strict UTF-8.                           (error id: null)
 *  2. A strict JSON scanner (json_scan.c) walks the line: RFC 8259 grammar
 *     and whitespace only, no raw control characters or "\u0000" or lone
 *     surrogate escapes in strings, nesting <= PROTO_MAX_DEPTH, exactly one
 *     object and nothing after it but whitespace. It records the raw text of
 *     every top-level member's value, because cJSON turns numbers into
 *     doubles and integers must be judged on what the client wrote.
 *                                                          (error id: null)
 *  3. cJSON builds the tree (it accepts a superset of step 2, so this only
 *     fails when out of memory).
 *  4. "id": present once, a string <= 255 bytes or an integer.
 *                                                          (error id: null)
 *  5. No duplicate top-level keys (compared after unescaping); "op" a known
 *     name; then the op's fields in a fixed order.         (error id: echoed)
 *
 * Choices where the protocol is silent:
 *  - "id" is required; null, fractions, exponents and integers outside int64
 *    are rejected. Integer ids are echoed exactly (see proto_json_int()).
 *  - null means absent: optional fields given as null are ignored, required
 *    ones given as null are "missing".
 *  - Fields not used by the op are ignored unchecked, like unknown fields.
 *  - metadata: keys may be empty (the rule is only "<= 40 bytes"); duplicate
 *    keys inside metadata are rejected; an empty object is kept as {}.
 *  - reference may be the empty string; reason must be non-empty.
 *  - gid: 1..PROTO_GID_MAX bytes of 0x20-0x7E (space allowed, since foreign
 *    PostgreSQL gids may contain it).
 *  - payment_id: any 8-4-4-4-12 hex uuid (version not checked), either case.
 */

/* ---------------------------------------------------------------- names -- */

static const char *const op_names[PROTO_OP__COUNT] = {
    [PROTO_OP_PAY] = "pay",
    [PROTO_OP_STATUS] = "status",
    [PROTO_OP_CREDIT] = "credit",
    [PROTO_OP_BALANCE] = "balance",
    [PROTO_OP_PING] = "ping",
    [PROTO_OP_ACCOUNT_OPEN] = "account_open",
    [PROTO_OP_PREPARED] = "prepared",
    [PROTO_OP_RESOLVE] = "resolve",
    [PROTO_OP_RECOVER] = "recover",
    [PROTO_OP_STATS] = "stats",
    [PROTO_OP_HEALTH] = "health",
    [PROTO_OP_RECONCILE] = "reconcile",
    [PROTO_OP_RECONCILE_STATUS] = "reconcile_status",
    [PROTO_OP_DISCREPANCIES] = "discrepancies",
    [PROTO_OP_SETTLE_DISCREPANCY] = "settle_discrepancy",
    [PROTO_OP_AUDIT] = "audit",
};

#define OP_LIST "pay, status, credit, balance, ping, account_open, prepared, " \
                "resolve, recover, stats, health, reconcile, reconcile_status, discrepancies, " \
                "settle_discrepancy, audit"

const char *proto_op_name(proto_op op)
{
    if ((unsigned)op >= PROTO_OP__COUNT)
        return "unknown";
    return op_names[op];
}

bool proto_op_is_admin(proto_op op)
{
    switch (op) {
    case PROTO_OP_ACCOUNT_OPEN:
    case PROTO_OP_PREPARED:
    case PROTO_OP_RESOLVE:
    case PROTO_OP_RECOVER:
    case PROTO_OP_STATS:
    case PROTO_OP_HEALTH:
    case PROTO_OP_RECONCILE:
    case PROTO_OP_RECONCILE_STATUS:
    case PROTO_OP_DISCREPANCIES:
    case PROTO_OP_SETTLE_DISCREPANCY:
    case PROTO_OP_AUDIT:
        return true;
    default:
        return false;
    }
}

/* ---------------------------------------------------------- field rules -- */

bool proto_valid_utf8(const char *s, size_t len)
{
    if (s == NULL)
        return len == 0;
    return proto_utf8_first_bad(s, len) == len;
}

bool proto_valid_account(const char *s, size_t len)
{
    if (s == NULL || len < 1 || len > PROTO_ACCOUNT_MAX)
        return false;
    for (size_t i = 0; i < len; i++) {
        char c = s[i];
        bool ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
                  c == '.' || c == '_' || c == ':' || c == '-';
        if (!ok)
            return false;
    }
    return true;
}

bool proto_valid_currency(const char *s, size_t len)
{
    if (s == NULL || len != 3)
        return false;
    for (size_t i = 0; i < 3; i++)
        if (s[i] < 'A' || s[i] > 'Z')
            return false;
    return true;
}

/* 1..max bytes, each within [lo, hi]. */
static bool ascii_range(const char *s, size_t len, size_t max, unsigned char lo, unsigned char hi)
{
    if (s == NULL || len < 1 || len > max)
        return false;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c < lo || c > hi)
            return false;
    }
    return true;
}

bool proto_valid_key(const char *s, size_t len)
{
    return ascii_range(s, len, PROTO_KEY_MAX, 0x21, 0x7E);
}

/* Raw JSON integer text -?(0|[1-9][0-9]*), nothing else, into int64 exactly. */
static bool raw_int64(const char *s, size_t n, int64_t *out)
{
    size_t i = 0;
    bool neg = false;
    if (i < n && s[i] == '-') {
        neg = true;
        i++;
    }
    if (i >= n || (s[i] == '0' && i + 1 != n))
        return false;
    uint64_t limit = neg ? (uint64_t)INT64_MAX + 1 : (uint64_t)INT64_MAX;
    uint64_t acc = 0;
    for (; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return false;
        unsigned d = (unsigned)(s[i] - '0');
        if (acc > (limit - d) / 10)
            return false;
        acc = acc * 10 + d;
    }
    if (!neg)
        *out = (int64_t)acc;
    else if (acc == (uint64_t)INT64_MAX + 1)
        *out = INT64_MIN;
    else
        *out = -(int64_t)acc;
    return true;
}

/* ------------------------------------------------------------- messages -- */

#define ECHO_MAX 40             /* bytes of client input quoted in a message */
#define ECHO_BUF (ECHO_MAX + 4)

/* Quote client input in a message without trusting it: at most ECHO_MAX bytes
 * of whole UTF-8 characters, control characters and invalid bytes as '?',
 * "..." when cut. dst holds ECHO_BUF bytes. */
static void echo_input(char *dst, const char *s, size_t len)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0, o = 0;
    while (i < len) {
        size_t n = proto_utf8_seq(u + i, len - i);
        if (o + (n ? n : 1) > ECHO_MAX)
            break;
        if (n == 0 || (n == 1 && (u[i] < 0x20 || u[i] == 0x7F))) {
            dst[o++] = '?';
            i++;
            continue;
        }
        memcpy(dst + o, u + i, n);
        o += n;
        i += n;
    }
    if (i < len) {
        memcpy(dst + o, "...", 3);
        o += 3;
    }
    dst[o] = '\0';
}

static int fail(proto_error *err, proto_err code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int fail(proto_error *err, proto_err code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->message, sizeof(err->message), fmt, ap);
    va_end(ap);
    err->code = code;
    return -1;
}

static int fail_oom(proto_error *err)
{
    return fail(err, PROTO_ERR_INTERNAL, "out of memory while parsing the request");
}

/* ---------------------------------------------------------------- fields -- */

/* One top-level member: decoded key, value in the cJSON tree, raw value text. */
typedef struct field {
    const char *name;
    cJSON *item;
    const char *raw;
    size_t raw_len;
} field;

typedef struct view {
    cJSON *root;
    field *fields;
    size_t count;
} view;

/* The member called name, or NULL when absent or null. */
static const field *lookup(const view *v, const char *name)
{
    for (size_t i = 0; i < v->count; i++)
        if (strcmp(v->fields[i].name, name) == 0)
            return cJSON_IsNull(v->fields[i].item) ? NULL : &v->fields[i];
    return NULL;
}

static int cmp_field_name(const void *a, const void *b)
{
    return strcmp(((const field *)a)->name, ((const field *)b)->name);
}

/* A required string field; "missing field: X" or "X <rule>" on failure. */
static int need_string(const view *v, const char *name, const char *rule, const char **s,
                       size_t *n, proto_error *err)
{
    const field *f = lookup(v, name);
    if (f == NULL)
        return fail(err, PROTO_ERR_INVALID_REQUEST, "missing field: %s", name);
    if (!cJSON_IsString(f->item) || f->item->valuestring == NULL)
        return fail(err, PROTO_ERR_INVALID_REQUEST, "%s %s", name, rule);
    *s = f->item->valuestring;
    *n = strlen(*s);
    return 0;
}

/* An integer field in [lo, hi], judged on its raw text. *present tells an
 * absent optional field apart; pass present == NULL for a required one. */
static int need_int(const view *v, const char *name, int64_t lo, int64_t hi, const char *unit,
                    bool *present, int64_t *out, proto_error *err)
{
    const field *f = lookup(v, name);
    if (f == NULL) {
        if (present != NULL) {
            *present = false;
            return 0;
        }
        return fail(err, PROTO_ERR_INVALID_REQUEST, "missing field: %s", name);
    }
    int64_t val;
    if (!cJSON_IsNumber(f->item) || !raw_int64(f->raw, f->raw_len, &val) || val < lo || val > hi)
        return fail(err, PROTO_ERR_INVALID_REQUEST, "%s must be an integer from %" PRId64 " to %"
                    PRId64 "%s", name, lo, hi, unit);
    *out = val;
    if (present != NULL)
        *present = true;
    return 0;
}

static char *dup_string(const char *s, size_t n)
{
    char *d = malloc(n + 1);
    if (d != NULL) {
        memcpy(d, s, n);
        d[n] = '\0';
    }
    return d;
}

#define ACCOUNT_RULE "must be 1-64 characters of A-Z a-z 0-9 . _ : -"
#define CURRENCY_RULE "must be three upper-case letters (ISO 4217 shape, e.g. \"EUR\")"
#define KEY_RULE "must be 1-255 printable ASCII characters (0x21-0x7E, no spaces)"
#define UUID_RULE "must be a UUID in canonical 8-4-4-4-12 hex form"
#define REFERENCE_RULE "must be a string of at most 255 bytes (or null)"
#define GID_RULE "must be 1-200 printable ASCII characters"
#define REASON_RULE "must be a non-empty string of at most 500 bytes"

/* A required string field that valid() accepts (which bounds its length to
 * dst's size), copied into dst. "missing field: X" or "X <rule>" on failure. */
static int field_text(const view *v, const char *name, const char *rule,
                      bool (*valid)(const char *, size_t), char *dst, proto_error *err)
{
    const char *s;
    size_t n;
    if (need_string(v, name, rule, &s, &n, err) != 0)
        return -1;
    if (!valid(s, n))
        return fail(err, PROTO_ERR_INVALID_REQUEST, "%s %s", name, rule);
    memcpy(dst, s, n + 1);
    return 0;
}

static int field_account(const view *v, proto_request *req, proto_error *err)
{
    return field_text(v, "account", ACCOUNT_RULE, proto_valid_account, req->account, err);
}

static int field_currency(const view *v, proto_request *req, proto_error *err)
{
    return field_text(v, "currency", CURRENCY_RULE, proto_valid_currency, req->currency, err);
}

static int field_key(const view *v, proto_request *req, proto_error *err)
{
    return field_text(v, "idempotency_key", KEY_RULE, proto_valid_key, req->idempotency_key, err);
}

static int field_amount(const view *v, int64_t max_amount, proto_request *req, proto_error *err)
{
    return need_int(v, "amount", 1, max_amount, "", NULL, &req->amount, err);
}

static int field_reference(const view *v, proto_request *req, proto_error *err)
{
    const field *f = lookup(v, "reference");
    if (f == NULL)
        return 0;
    if (!cJSON_IsString(f->item) || f->item->valuestring == NULL)
        return fail(err, PROTO_ERR_INVALID_REQUEST, "reference " REFERENCE_RULE);
    size_t n = strlen(f->item->valuestring);
    if (n > PROTO_REFERENCE_MAX)
        return fail(err, PROTO_ERR_INVALID_REQUEST, "reference is %zu bytes long; it " REFERENCE_RULE,
                    n);
    req->reference = dup_string(f->item->valuestring, n);
    return req->reference != NULL ? 0 : fail_oom(err);
}

static int field_metadata(const view *v, proto_request *req, proto_error *err)
{
    const field *f = lookup(v, "metadata");
    char e[ECHO_BUF];
    if (f == NULL)
        return 0;
    if (!cJSON_IsObject(f->item))
        return fail(err, PROTO_ERR_INVALID_REQUEST,
                    "metadata must be an object of string values (or null)");
    size_t nkeys = 0;
    for (const cJSON *c = f->item->child; c != NULL; c = c->next) {
        if (++nkeys > PROTO_META_KEYS_MAX)
            return fail(err, PROTO_ERR_INVALID_REQUEST, "metadata has more than %d keys",
                        PROTO_META_KEYS_MAX);
        size_t klen = strlen(c->string);
        echo_input(e, c->string, klen);
        if (klen > PROTO_META_KEY_MAX)
            return fail(err, PROTO_ERR_INVALID_REQUEST,
                        "metadata key \"%s\" is %zu bytes long; keys may have at most %d bytes", e,
                        klen, PROTO_META_KEY_MAX);
        if (!cJSON_IsString(c) || c->valuestring == NULL)
            return fail(err, PROTO_ERR_INVALID_REQUEST,
                        "metadata value for key \"%s\" must be a string", e);
        size_t vlen = strlen(c->valuestring);
        if (vlen > PROTO_META_VALUE_MAX)
            return fail(err, PROTO_ERR_INVALID_REQUEST, "metadata value for key \"%s\" is %zu "
                        "bytes long; values may have at most %d bytes", e, vlen,
                        PROTO_META_VALUE_MAX);
        for (const cJSON *d = f->item->child; d != c; d = d->next)
            if (strcmp(d->string, c->string) == 0)
                return fail(err, PROTO_ERR_INVALID_REQUEST, "metadata has duplicate key \"%s\"", e);
    }
    req->metadata = cJSON_DetachItemViaPointer(v->root, f->item);
    return 0;
}

static int op_pay_credit(const view *v, int64_t max_amount, bool pay, proto_request *req,
                         proto_error *err)
{
    if (field_account(v, req, err) != 0 || field_amount(v, max_amount, req, err) != 0 ||
        field_currency(v, req, err) != 0 || field_key(v, req, err) != 0 ||
        field_reference(v, req, err) != 0)
        return -1;
    if (!pay)
        return 0;
    if (field_metadata(v, req, err) != 0)
        return -1;
    return need_int(v, "wait_ms", 0, PROTO_WAIT_MS_MAX, " (milliseconds)", &req->has_wait_ms,
                    &req->wait_ms, err);
}

static int op_status(const view *v, proto_request *req, proto_error *err)
{
    const field *key = lookup(v, "idempotency_key");
    const field *pid = lookup(v, "payment_id");
    if (key != NULL && pid != NULL)
        return fail(err, PROTO_ERR_INVALID_REQUEST,
                    "status takes exactly one of idempotency_key or payment_id, not both");
    if (key == NULL && pid == NULL)
        return fail(err, PROTO_ERR_INVALID_REQUEST, "missing field: idempotency_key or payment_id");
    if (key != NULL)
        return field_key(v, req, err);
    unsigned char uuid[16];
    if (!cJSON_IsString(pid->item) || pid->item->valuestring == NULL ||
        !gid_uuid_parse(pid->item->valuestring, uuid))
        return fail(err, PROTO_ERR_INVALID_REQUEST, "payment_id " UUID_RULE);
    gid_uuid_format(uuid, req->payment_id);     /* canonical lower case */
    return 0;
}

static int op_resolve(const view *v, proto_request *req, proto_error *err)
{
    const char *s;
    size_t n;
    if (field_text(v, "gid", GID_RULE, gid_valid, req->gid, err) != 0)
        return -1;

    if (need_string(v, "action", "must be \"commit\" or \"rollback\"", &s, &n, err) != 0)
        return -1;
    if (strcmp(s, "commit") == 0)
        req->action = PROTO_ACTION_COMMIT;
    else if (strcmp(s, "rollback") == 0)
        req->action = PROTO_ACTION_ROLLBACK;
    else
        return fail(err, PROTO_ERR_INVALID_REQUEST, "action must be \"commit\" or \"rollback\"");

    if (need_string(v, "reason", REASON_RULE, &s, &n, err) != 0)
        return -1;
    if (n == 0 || n > PROTO_REASON_MAX)
        return fail(err, PROTO_ERR_INVALID_REQUEST, "reason " REASON_RULE);
    req->reason = dup_string(s, n);
    return req->reason != NULL ? 0 : fail_oom(err);
}

/* reconcile: optional from/to (unix seconds, both or neither, from < to,
 * at most 31 days apart) and an optional settlement report path. */
static int op_reconcile(const view *v, proto_request *req, proto_error *err)
{
    bool has_from, has_to;
    if (need_int(v, "from", 0, INT64_C(32503680000), " (unix seconds)", &has_from, &req->from_s, err) != 0 ||
        need_int(v, "to", 0, INT64_C(32503680000), " (unix seconds)", &has_to, &req->to_s, err) != 0)
        return -1;
    if (has_from != has_to)
        return fail(err, PROTO_ERR_INVALID_REQUEST, "from and to go together (a window), or neither");
    if (has_from && (req->to_s <= req->from_s || req->to_s - req->from_s > INT64_C(2678400)))
        return fail(err, PROTO_ERR_INVALID_REQUEST, "to must be after from, by at most 31 days");
    req->has_window = has_from;
    const field *f = lookup(v, "report");
    if (f == NULL)
        return 0;
    if (!cJSON_IsString(f->item) || f->item->valuestring == NULL || f->item->valuestring[0] != '/' ||
        strlen(f->item->valuestring) > PROTO_PATH_MAX)
        return fail(err, PROTO_ERR_INVALID_REQUEST, "report must be an absolute path of at most %d bytes",
                    PROTO_PATH_MAX);
    req->report = dup_string(f->item->valuestring, strlen(f->item->valuestring));
    return req->report != NULL ? 0 : fail_oom(err);
}

static int op_settle_discrepancy(const view *v, proto_request *req, proto_error *err)
{
    const char *s;
    size_t n;
    if (need_int(v, "discrepancy_id", 1, INT64_MAX, "", NULL, &req->discrepancy_id, err) != 0)
        return -1;
    if (need_string(v, "action", "must be \"credit\", \"debit\" or \"accept\"", &s, &n, err) != 0)
        return -1;
    if (strcmp(s, "credit") != 0 && strcmp(s, "debit") != 0 && strcmp(s, "accept") != 0)
        return fail(err, PROTO_ERR_INVALID_REQUEST, "action must be \"credit\", \"debit\" or \"accept\"");
    memcpy(req->settle_action, s, n + 1);
    if (need_string(v, "reason", REASON_RULE, &s, &n, err) != 0)
        return -1;
    if (n == 0 || n > PROTO_REASON_MAX)
        return fail(err, PROTO_ERR_INVALID_REQUEST, "reason " REASON_RULE);
    if (lookup(v, "account") != NULL) {
        req->has_account = true;
        if (field_account(v, req, err) != 0)
            return -1;
    }
    req->reason = dup_string(s, n);
    return req->reason != NULL ? 0 : fail_oom(err);
}

static int op_fields(const view *v, int64_t max_amount, proto_request *req, proto_error *err)
{
    switch (req->op) {
    case PROTO_OP_PAY:
        return op_pay_credit(v, max_amount, true, req, err);
    case PROTO_OP_CREDIT:
        return op_pay_credit(v, max_amount, false, req, err);
    case PROTO_OP_STATUS:
        return op_status(v, req, err);
    case PROTO_OP_BALANCE:
        return field_account(v, req, err);
    case PROTO_OP_ACCOUNT_OPEN:
        if (field_account(v, req, err) != 0)
            return -1;
        return field_currency(v, req, err);
    case PROTO_OP_PREPARED:
        return need_int(v, "older_than_ms", 0, PROTO_OLDER_THAN_MS_MAX, " (milliseconds)",
                        &req->has_older_than_ms, &req->older_than_ms, err);
    case PROTO_OP_RESOLVE:
        return op_resolve(v, req, err);
    case PROTO_OP_RECOVER: {
        /* Extension: optional "node" names a dead node whose gids to settle. */
        const field *f = lookup(v, "node");
        if (f == NULL)
            return 0;
        if (!cJSON_IsString(f->item) || f->item->valuestring == NULL || !gid_valid_node(f->item->valuestring))
            return fail(err, PROTO_ERR_INVALID_REQUEST, "node must be 1-32 characters of A-Z a-z 0-9 _ -");
        memcpy(req->node, f->item->valuestring, strlen(f->item->valuestring) + 1);
        return 0;
    }
    case PROTO_OP_RECONCILE:
        return op_reconcile(v, req, err);
    case PROTO_OP_SETTLE_DISCREPANCY:
        return op_settle_discrepancy(v, req, err);
    case PROTO_OP_DISCREPANCIES: {
        const field *f = lookup(v, "all");
        if (f != NULL && !cJSON_IsBool(f->item))
            return fail(err, PROTO_ERR_INVALID_REQUEST, "all must be true or false");
        req->all = f != NULL && cJSON_IsTrue(f->item);
        return 0;
    }
    case PROTO_OP_AUDIT:
        if (lookup(v, "account") == NULL)
            return 0;
        req->has_account = true;
        return field_account(v, req, err);
    default:
        return 0;               /* ping, stats, health, reconcile_status: no fields */
    }
}

#define ID_RULE "id must be a string of at most 255 bytes or an integer without fraction " \
                "or exponent (64-bit range)"

/* Step 4: the request id, or NULL with *err set. */
static cJSON *parse_id(const view *v, proto_error *err)
{
    const field *f = NULL;
    size_t seen = 0;
    for (size_t i = 0; i < v->count; i++)
        if (strcmp(v->fields[i].name, "id") == 0 && seen++ == 0)
            f = &v->fields[i];
    if (seen > 1) {
        fail(err, PROTO_ERR_INVALID_REQUEST, "duplicate field id; each field may appear only once");
        return NULL;
    }
    if (f == NULL || cJSON_IsNull(f->item)) {
        fail(err, PROTO_ERR_INVALID_REQUEST, "missing field: id (a string or an integer)");
        return NULL;
    }
    cJSON *id = NULL;
    int64_t n;
    if (cJSON_IsString(f->item) && f->item->valuestring != NULL) {
        if (strlen(f->item->valuestring) > PROTO_ID_MAX) {
            fail(err, PROTO_ERR_INVALID_REQUEST, ID_RULE);
            return NULL;
        }
        id = cJSON_CreateString(f->item->valuestring);
    } else if (cJSON_IsNumber(f->item) && raw_int64(f->raw, f->raw_len, &n)) {
        id = proto_json_int(n);
    } else {
        fail(err, PROTO_ERR_INVALID_REQUEST, ID_RULE);
        return NULL;
    }
    if (id == NULL)
        fail_oom(err);
    return id;
}

/* Step 5, first half: no key twice. Sorts v->fields by name. */
static int check_duplicates(view *v, proto_error *err)
{
    char e[ECHO_BUF];
    if (v->count > 1)
        qsort(v->fields, v->count, sizeof(v->fields[0]), cmp_field_name);
    for (size_t i = 1; i < v->count; i++)
        if (strcmp(v->fields[i - 1].name, v->fields[i].name) == 0) {
            echo_input(e, v->fields[i].name, strlen(v->fields[i].name));
            return fail(err, PROTO_ERR_INVALID_REQUEST,
                        "duplicate field %s; each field may appear only once", e);
        }
    return 0;
}

static int parse_op(const view *v, proto_request *req, proto_error *err)
{
    const field *f = lookup(v, "op");
    char e[ECHO_BUF];
    if (f == NULL)
        return fail(err, PROTO_ERR_INVALID_REQUEST, "missing field: op (one of " OP_LIST ")");
    if (!cJSON_IsString(f->item) || f->item->valuestring == NULL)
        return fail(err, PROTO_ERR_INVALID_REQUEST, "op must be a string, one of " OP_LIST);
    for (int i = 0; i < PROTO_OP__COUNT; i++)
        if (strcmp(f->item->valuestring, op_names[i]) == 0) {
            req->op = (proto_op)i;
            return 0;
        }
    echo_input(e, f->item->valuestring, strlen(f->item->valuestring));
    return fail(err, PROTO_ERR_UNKNOWN_OP, "unknown op \"%s\"; known ops: " OP_LIST, e);
}

int proto_parse(const char *line, size_t len, const proto_limits *lim, proto_request *req,
                proto_error *err)
{
    int rc = -1;
    char *copy = NULL;
    cJSON *id = NULL;
    json_scan sc = { 0 };
    view v = { 0 };

    memset(req, 0, sizeof(*req));
    memset(err, 0, sizeof(*err));
    int64_t max_amount = (lim != NULL && lim->max_amount > 0) ? lim->max_amount
                                                              : PROTO_MAX_AMOUNT_DEFAULT;
    if (line == NULL)
        line = "";

    /* 1. bytes */
    const char *nul = memchr(line, '\0', len);
    if (nul != NULL) {
        fail(err, PROTO_ERR_INVALID_REQUEST, "the request contains a NUL byte at offset %zu; "
             "requests are UTF-8 JSON text", (size_t)(nul - line));
        goto out;
    }
    size_t bad = proto_utf8_first_bad(line, len);
    if (bad != len) {
        fail(err, PROTO_ERR_INVALID_REQUEST, "the request is not valid UTF-8 (byte 0x%02X at "
             "offset %zu)", (unsigned char)line[bad], bad);
        goto out;
    }

    /* 2. strict grammar, raw spans of the top-level values */
    if (json_scan_request(&sc, line, len, PROTO_MAX_DEPTH) != 0) {
        if (sc.oom)
            fail_oom(err);
        else
            fail(err, PROTO_ERR_INVALID_REQUEST, "%s", sc.msg);
        goto out;
    }

    /* 3. the tree; cJSON wants the terminating NUL inside the length */
    copy = malloc(len + 1);
    if (copy == NULL) {
        fail_oom(err);
        goto out;
    }
    memcpy(copy, line, len);
    copy[len] = '\0';
    const char *end = NULL;
    v.root = cJSON_ParseWithLengthOpts(copy, len + 1, &end, 1);
    if (v.root == NULL || !cJSON_IsObject(v.root)) {
        /* The scanner accepted it, so cJSON can only have run out of memory. */
        fail_oom(err);
        goto out;
    }
    if (sc.count > 0) {
        v.fields = calloc(sc.count, sizeof(*v.fields));
        if (v.fields == NULL) {
            fail_oom(err);
            goto out;
        }
    }
    for (cJSON *c = v.root->child; c != NULL; c = c->next) {
        if (v.count == sc.count || c->string == NULL) {
            fail(err, PROTO_ERR_INTERNAL, "the request scanner and cJSON disagree");
            goto out;
        }
        field *f = &v.fields[v.count];
        f->name = c->string;
        f->item = c;
        f->raw = line + sc.members[v.count].val_off;
        f->raw_len = sc.members[v.count].val_len;
        v.count++;
    }
    if (v.count != sc.count) {
        fail(err, PROTO_ERR_INTERNAL, "the request scanner and cJSON disagree");
        goto out;
    }

    /* 4. id */
    id = parse_id(&v, err);
    if (id == NULL)
        goto out;

    /* 5. duplicates, op, the op's fields */
    if (check_duplicates(&v, err) != 0 || parse_op(&v, req, err) != 0 ||
        op_fields(&v, max_amount, req, err) != 0)
        goto out;

    req->id = id;
    id = NULL;
    rc = 0;
out:
    if (rc != 0) {
        proto_request_free(req);
        memset(req, 0, sizeof(*req));
        err->id = id;           /* NULL when it could not be read */
        id = NULL;
        if (err->code == PROTO_ERR_NONE)
            fail(err, PROTO_ERR_INTERNAL, "internal error while parsing the request");
    }
    cJSON_Delete(v.root);
    free(v.fields);
    json_scan_free(&sc);
    free(copy);
    return rc;
}

void proto_request_free(proto_request *req)
{
    if (req == NULL)
        return;
    cJSON_Delete(req->id);
    req->id = NULL;
    free(req->reference);
    req->reference = NULL;
    cJSON_Delete(req->metadata);
    req->metadata = NULL;
    free(req->reason);
    req->reason = NULL;
    free(req->report);
    req->report = NULL;
}

void proto_error_free(proto_error *err)
{
    if (err == NULL)
        return;
    cJSON_Delete(err->id);
    err->id = NULL;
}
