/*
 * proto.c - paycoord wire protocol v1: strict validation of one NDJSON request
 * line (UTF-8, JSON grammar, field rules of PROTOCOL.md) and reply encoding.
 */
#include "proto.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/*
 * How a line is checked, in order; the first failure decides the error:
 *
 *  1. No NUL byte, strict UTF-8.                           (error id: null)
 *  2. A strict JSON scanner walks the line: RFC 8259 grammar and whitespace
 *     only, no raw control characters or "\u0000" or lone surrogate escapes in
 *     strings, nesting <= PROTO_MAX_DEPTH, exactly one object and nothing
 *     after it but whitespace. It records the raw text of every top-level
 *     member's value, because cJSON turns numbers into doubles and integers
 *     must be judged on what the client wrote.             (error id: null)
 *  3. cJSON builds the tree (it accepts a superset of step 2, so this only
 *     fails when out of memory).
 *  4. "id": present once, a string <= 255 bytes or an integer.
 *                                                          (error id: null)
 *  5. No duplicate top-level keys (compared after unescaping); "op" a known
 *     name; then the op's fields in a fixed order.         (error id: echoed)
 *
 * Choices where PROTOCOL.md is silent:
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

static const struct {
    const char *name;
    const char *default_message;
} err_table[PROTO_ERR__COUNT] = {
    [PROTO_ERR_NONE] = { "none", "no error" },
    [PROTO_ERR_INVALID_REQUEST] = { "invalid_request", "the request is not valid" },
    [PROTO_ERR_REQUEST_TOO_LARGE] = { "request_too_large", "the request line is too long" },
    [PROTO_ERR_UNKNOWN_OP] = { "unknown_op", "unknown op" },
    [PROTO_ERR_UNKNOWN_ACCOUNT] = { "unknown_account", "no such account" },
    [PROTO_ERR_ACCOUNT_EXISTS] = { "account_exists", "the account already exists" },
    [PROTO_ERR_CURRENCY_MISMATCH] = { "currency_mismatch",
                                      "the currency differs from the account's currency" },
    [PROTO_ERR_IDEMPOTENCY_CONFLICT] = { "idempotency_conflict",
                                         "the idempotency_key was used with different details" },
    [PROTO_ERR_NOT_FOUND] = { "not_found", "not found" },
    [PROTO_ERR_FORBIDDEN] = { "forbidden", "this peer lacks the permission class of this op" },
    [PROTO_ERR_OVERLOADED] = { "overloaded", "overloaded, retry later" },
    [PROTO_ERR_UNAVAILABLE] = { "unavailable", "the database is unreachable; nothing was charged" },
    [PROTO_ERR_SHUTTING_DOWN] = { "shutting_down", "the daemon is shutting down" },
    [PROTO_ERR_INTERNAL] = { "internal", "internal error" },
};

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
};

#define OP_LIST "pay, status, credit, balance, ping, account_open, prepared, " \
                "resolve, recover, stats, health"

const char *proto_err_name(proto_err code)
{
    if ((unsigned)code >= PROTO_ERR__COUNT)
        return err_table[PROTO_ERR_INTERNAL].name;
    return err_table[code].name;
}

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
        return true;
    default:
        return false;
    }
}

/* ---------------------------------------------------------- field rules -- */

/* Length of the well-formed UTF-8 sequence at s (1-4), or 0 if the bytes there
 * are not one (overlong, surrogate, above U+10FFFF, truncated, stray byte). */
static size_t utf8_seq(const unsigned char *s, size_t avail)
{
    unsigned char c = s[0];
    unsigned char lo = 0x80, hi = 0xBF;
    size_t n;

    if (c < 0x80)
        return 1;
    if (c >= 0xC2 && c <= 0xDF)
        n = 2;
    else if (c >= 0xE0 && c <= 0xEF) {
        n = 3;
        if (c == 0xE0)
            lo = 0xA0;          /* overlong below U+0800 */
        else if (c == 0xED)
            hi = 0x9F;          /* U+D800..U+DFFF surrogates */
    } else if (c >= 0xF0 && c <= 0xF4) {
        n = 4;
        if (c == 0xF0)
            lo = 0x90;          /* overlong below U+10000 */
        else if (c == 0xF4)
            hi = 0x8F;          /* above U+10FFFF */
    } else
        return 0;               /* continuation byte, C0/C1, F5..FF */
    if (avail < n || s[1] < lo || s[1] > hi)
        return 0;
    for (size_t i = 2; i < n; i++)
        if (s[i] < 0x80 || s[i] > 0xBF)
            return 0;
    return n;
}

/* Offset of the first byte that is not well-formed UTF-8, or len. */
static size_t utf8_first_bad(const char *s, size_t len)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0;
    while (i < len) {
        size_t n = utf8_seq(u + i, len - i);
        if (n == 0)
            return i;
        i += n;
    }
    return len;
}

bool proto_valid_utf8(const char *s, size_t len)
{
    if (s == NULL)
        return len == 0;
    return utf8_first_bad(s, len) == len;
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

static bool valid_gid(const char *s, size_t len)
{
    return ascii_range(s, len, PROTO_GID_MAX, 0x20, 0x7E);
}

static int hex_value(unsigned char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Canonical 8-4-4-4-12 uuid in either case; out (37 bytes) gets lower case. */
static bool parse_uuid(const char *s, size_t len, char out[37])
{
    if (len != 36)
        return false;
    for (size_t i = 0; i < 36; i++) {
        unsigned char c = (unsigned char)s[i];
        if (i == 8 || i == 13 || i == 18 || i == 23) {
            if (c != '-')
                return false;
            out[i] = '-';
        } else {
            if (hex_value(c) < 0)
                return false;
            out[i] = (char)((c >= 'A' && c <= 'F') ? c - 'A' + 'a' : c);
        }
    }
    out[36] = '\0';
    return true;
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
        size_t n = utf8_seq(u + i, len - i);
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

/* -------------------------------------------------------------- scanner -- */

typedef struct scan_member {
    size_t val_off;             /* raw value token in the line */
    size_t val_len;
} scan_member;

typedef struct scanner {
    const unsigned char *s;
    size_t len;
    size_t pos;
    scan_member *members;       /* top-level members, in order */
    size_t count;
    size_t cap;
    bool oom;
    char msg[160];              /* set by the first failure */
} scanner;

static int scan_fail(scanner *sc, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static int scan_fail(scanner *sc, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(sc->msg, sizeof(sc->msg), fmt, ap);
    va_end(ap);
    return -1;
}

static int scan_unexpected(scanner *sc, const char *wanted)
{
    if (sc->pos >= sc->len)
        return scan_fail(sc, "malformed JSON: unexpected end of line, expected %s", wanted);
    unsigned char c = sc->s[sc->pos];
    if (c >= 0x21 && c <= 0x7E)
        return scan_fail(sc, "malformed JSON at byte %zu: expected %s, found '%c'", sc->pos, wanted, c);
    return scan_fail(sc, "malformed JSON at byte %zu: expected %s, found byte 0x%02X",
                     sc->pos, wanted, c);
}

static void scan_ws(scanner *sc)
{
    while (sc->pos < sc->len) {
        unsigned char c = sc->s[sc->pos];
        if (c != ' ' && c != '\t' && c != '\n' && c != '\r')
            break;
        sc->pos++;
    }
}

/* The 4 hex digits at sc->s[at..at+3] as a code unit, or -1. */
static long scan_hex4(const scanner *sc, size_t at)
{
    if (at + 4 > sc->len)
        return -1;
    long v = 0;
    for (size_t i = 0; i < 4; i++) {
        int h = hex_value(sc->s[at + i]);
        if (h < 0)
            return -1;
        v = v * 16 + h;
    }
    return v;
}

static int scan_string(scanner *sc)
{
    size_t start = sc->pos++;           /* opening quote */
    for (;;) {
        if (sc->pos >= sc->len)
            return scan_fail(sc, "malformed JSON: string starting at byte %zu is not closed", start);
        unsigned char c = sc->s[sc->pos];
        if (c == '"') {
            sc->pos++;
            return 0;
        }
        if (c < 0x20)
            return scan_fail(sc, "malformed JSON at byte %zu: control character 0x%02X in a "
                             "string must be escaped", sc->pos, c);
        if (c != '\\') {
            sc->pos++;
            continue;
        }
        size_t esc = sc->pos++;
        if (sc->pos >= sc->len)
            return scan_unexpected(sc, "an escape character");
        c = sc->s[sc->pos];
        if (strchr("\"\\/bfnrt", c) != NULL && c != '\0') {
            sc->pos++;
            continue;
        }
        if (c != 'u')
            return scan_fail(sc, "malformed JSON at byte %zu: invalid escape in a string", esc);
        long cu = scan_hex4(sc, sc->pos + 1);
        if (cu < 0)
            return scan_fail(sc, "malformed JSON at byte %zu: \\u needs four hex digits", esc);
        sc->pos += 5;
        if (cu == 0)
            return scan_fail(sc, "\\u0000 (NUL) at byte %zu: NUL is not allowed in strings", esc);
        if (cu >= 0xDC00 && cu <= 0xDFFF)
            return scan_fail(sc, "malformed JSON at byte %zu: unpaired UTF-16 surrogate escape", esc);
        if (cu >= 0xD800 && cu <= 0xDBFF) {
            long lo = -1;
            if (sc->pos + 1 < sc->len && sc->s[sc->pos] == '\\' && sc->s[sc->pos + 1] == 'u')
                lo = scan_hex4(sc, sc->pos + 2);
            if (lo < 0xDC00 || lo > 0xDFFF)
                return scan_fail(sc, "malformed JSON at byte %zu: unpaired UTF-16 surrogate escape",
                                 esc);
            sc->pos += 6;
        }
    }
}

static int scan_number_body(scanner *sc);

static bool scan_digit(const scanner *sc)
{
    return sc->pos < sc->len && sc->s[sc->pos] >= '0' && sc->s[sc->pos] <= '9';
}

/* The longest number accepted anywhere in a request. cJSON up to 1.7.18
 * parses a number through a 64-byte buffer and fails on longer ones (which it
 * reports like running out of memory); no field of ours needs more than 20
 * characters, so longer numbers are refused here as invalid_request. */
#define PROTO_NUMBER_MAX 63

static int scan_number(scanner *sc)
{
    size_t start = sc->pos;
    int rc = scan_number_body(sc);
    if (rc == 0 && sc->pos - start > PROTO_NUMBER_MAX)
        return scan_fail(sc, "number longer than %d characters at byte %zu", PROTO_NUMBER_MAX, start);
    return rc;
}

static int scan_number_body(scanner *sc)
{
    if (sc->s[sc->pos] == '-')
        sc->pos++;
    if (!scan_digit(sc))
        return scan_unexpected(sc, "a digit");
    if (sc->s[sc->pos] == '0')
        sc->pos++;
    else
        while (scan_digit(sc))
            sc->pos++;
    if (sc->pos < sc->len && sc->s[sc->pos] == '.') {
        sc->pos++;
        if (!scan_digit(sc))
            return scan_unexpected(sc, "a digit after '.'");
        while (scan_digit(sc))
            sc->pos++;
    }
    if (sc->pos < sc->len && (sc->s[sc->pos] == 'e' || sc->s[sc->pos] == 'E')) {
        sc->pos++;
        if (sc->pos < sc->len && (sc->s[sc->pos] == '+' || sc->s[sc->pos] == '-'))
            sc->pos++;
        if (!scan_digit(sc))
            return scan_unexpected(sc, "a digit in the exponent");
        while (scan_digit(sc))
            sc->pos++;
    }
    return 0;
}

static int scan_literal(scanner *sc, const char *word)
{
    size_t n = strlen(word);
    if (sc->len - sc->pos < n || memcmp(sc->s + sc->pos, word, n) != 0)
        return scan_unexpected(sc, "a JSON value");
    sc->pos += n;
    return 0;
}

static int scan_object(scanner *sc, int depth, bool top);
static int scan_array(scanner *sc, int depth);

static int scan_value(scanner *sc, int depth)
{
    if (sc->pos >= sc->len)
        return scan_unexpected(sc, "a JSON value");
    switch (sc->s[sc->pos]) {
    case '{':
        return scan_object(sc, depth + 1, false);
    case '[':
        return scan_array(sc, depth + 1);
    case '"':
        return scan_string(sc);
    case 't':
        return scan_literal(sc, "true");
    case 'f':
        return scan_literal(sc, "false");
    case 'n':
        return scan_literal(sc, "null");
    default:
        if (sc->s[sc->pos] == '-' || scan_digit(sc))
            return scan_number(sc);
        return scan_unexpected(sc, "a JSON value");
    }
}

static int scan_depth_ok(scanner *sc, int depth)
{
    if (depth > PROTO_MAX_DEPTH)
        return scan_fail(sc, "JSON nesting deeper than %d levels (at byte %zu)", PROTO_MAX_DEPTH,
                         sc->pos);
    return 0;
}

static int scan_record(scanner *sc, size_t off, size_t len)
{
    if (sc->count == sc->cap) {
        size_t cap = sc->cap ? sc->cap * 2 : 16;
        scan_member *m = realloc(sc->members, cap * sizeof(*m));
        if (m == NULL) {
            sc->oom = true;
            return scan_fail(sc, "out of memory");
        }
        sc->members = m;
        sc->cap = cap;
    }
    sc->members[sc->count].val_off = off;
    sc->members[sc->count].val_len = len;
    sc->count++;
    return 0;
}

static int scan_object(scanner *sc, int depth, bool top)
{
    if (scan_depth_ok(sc, depth) != 0)
        return -1;
    sc->pos++;                          /* '{' */
    scan_ws(sc);
    if (sc->pos < sc->len && sc->s[sc->pos] == '}') {
        sc->pos++;
        return 0;
    }
    for (;;) {
        scan_ws(sc);
        if (sc->pos >= sc->len || sc->s[sc->pos] != '"')
            return scan_unexpected(sc, "a string key");
        if (scan_string(sc) != 0)
            return -1;
        scan_ws(sc);
        if (sc->pos >= sc->len || sc->s[sc->pos] != ':')
            return scan_unexpected(sc, "':'");
        sc->pos++;
        scan_ws(sc);
        size_t off = sc->pos;
        if (scan_value(sc, depth) != 0)
            return -1;
        if (top && scan_record(sc, off, sc->pos - off) != 0)
            return -1;
        scan_ws(sc);
        if (sc->pos < sc->len && sc->s[sc->pos] == ',') {
            sc->pos++;
            continue;
        }
        if (sc->pos < sc->len && sc->s[sc->pos] == '}') {
            sc->pos++;
            return 0;
        }
        return scan_unexpected(sc, "',' or '}'");
    }
}

static int scan_array(scanner *sc, int depth)
{
    if (scan_depth_ok(sc, depth) != 0)
        return -1;
    sc->pos++;                          /* '[' */
    scan_ws(sc);
    if (sc->pos < sc->len && sc->s[sc->pos] == ']') {
        sc->pos++;
        return 0;
    }
    for (;;) {
        scan_ws(sc);
        if (scan_value(sc, depth) != 0)
            return -1;
        scan_ws(sc);
        if (sc->pos < sc->len && sc->s[sc->pos] == ',') {
            sc->pos++;
            continue;
        }
        if (sc->pos < sc->len && sc->s[sc->pos] == ']') {
            sc->pos++;
            return 0;
        }
        return scan_unexpected(sc, "',' or ']'");
    }
}

/* The whole line: optional whitespace, one object, optional whitespace. */
static int scan_request(scanner *sc)
{
    scan_ws(sc);
    if (sc->pos >= sc->len)
        return scan_fail(sc, "empty request: expected a JSON object");
    if (sc->s[sc->pos] != '{')
        return scan_fail(sc, "the request must be a JSON object {...}");
    if (scan_object(sc, 1, true) != 0)
        return -1;
    scan_ws(sc);
    if (sc->pos != sc->len)
        return scan_fail(sc, "unexpected data after the JSON object at byte %zu", sc->pos);
    return 0;
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

static int field_account(const view *v, proto_request *req, proto_error *err)
{
    const char *s;
    size_t n;
    if (need_string(v, "account", ACCOUNT_RULE, &s, &n, err) != 0)
        return -1;
    if (!proto_valid_account(s, n))
        return fail(err, PROTO_ERR_INVALID_REQUEST, "account " ACCOUNT_RULE);
    memcpy(req->account, s, n + 1);
    return 0;
}

static int field_currency(const view *v, proto_request *req, proto_error *err)
{
    const char *s;
    size_t n;
    if (need_string(v, "currency", CURRENCY_RULE, &s, &n, err) != 0)
        return -1;
    if (!proto_valid_currency(s, n))
        return fail(err, PROTO_ERR_INVALID_REQUEST, "currency " CURRENCY_RULE);
    memcpy(req->currency, s, n + 1);
    return 0;
}

static int check_key(const char *s, size_t n, proto_request *req, proto_error *err)
{
    if (!proto_valid_key(s, n))
        return fail(err, PROTO_ERR_INVALID_REQUEST, "idempotency_key " KEY_RULE);
    memcpy(req->idempotency_key, s, n + 1);
    return 0;
}

static int field_key(const view *v, proto_request *req, proto_error *err)
{
    const char *s;
    size_t n;
    if (need_string(v, "idempotency_key", KEY_RULE, &s, &n, err) != 0)
        return -1;
    return check_key(s, n, req, err);
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
    if (!cJSON_IsString(pid->item) || pid->item->valuestring == NULL ||
        !parse_uuid(pid->item->valuestring, strlen(pid->item->valuestring), req->payment_id))
        return fail(err, PROTO_ERR_INVALID_REQUEST, "payment_id " UUID_RULE);
    return 0;
}

static int op_resolve(const view *v, proto_request *req, proto_error *err)
{
    const char *s;
    size_t n;
    if (need_string(v, "gid", GID_RULE, &s, &n, err) != 0)
        return -1;
    if (!valid_gid(s, n))
        return fail(err, PROTO_ERR_INVALID_REQUEST, "gid " GID_RULE);
    memcpy(req->gid, s, n + 1);

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
        size_t n = cJSON_IsString(f->item) ? strlen(f->item->valuestring) : 0;
        if (n == 0 || n > PROTO_NODE_MAX ||
            strspn(f->item->valuestring, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-") != n)
            return fail(err, PROTO_ERR_INVALID_REQUEST, "node must be 1-32 characters of A-Z a-z 0-9 _ -");
        memcpy(req->node, f->item->valuestring, n + 1);
        return 0;
    }
    default:
        return 0;               /* ping, stats, health: no fields */
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
    scanner sc = { 0 };
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
    size_t bad = utf8_first_bad(line, len);
    if (bad != len) {
        fail(err, PROTO_ERR_INVALID_REQUEST, "the request is not valid UTF-8 (byte 0x%02X at "
             "offset %zu)", (unsigned char)line[bad], bad);
        goto out;
    }

    /* 2. strict grammar, raw spans of the top-level values */
    sc.s = (const unsigned char *)line;
    sc.len = len;
    if (scan_request(&sc) != 0) {
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
    free(sc.members);
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
}

void proto_error_free(proto_error *err)
{
    if (err == NULL)
        return;
    cJSON_Delete(err->id);
    err->id = NULL;
}

/* ------------------------------------------------------------- encoders -- */

#define EXACT_DOUBLE_LIMIT 1e15     /* below this cJSON prints integers exactly */

cJSON *proto_json_int(int64_t v)
{
    if (v > -INT64_C(1000000000000000) && v < INT64_C(1000000000000000))
        return cJSON_CreateNumber((double)v);
    char text[24];
    snprintf(text, sizeof(text), "%" PRId64, v);
    return cJSON_CreateRaw(text);
}

/* cJSON prints integral doubles of 10^15 and more as 1e+15: turn such numbers
 * (within int64) into raw items with their exact decimal text. */
static int normalize_numbers(cJSON *node)
{
    cJSON *c = node->child;
    while (c != NULL) {
        cJSON *next = c->next;
        if (cJSON_IsArray(c) || cJSON_IsObject(c)) {
            if (normalize_numbers(c) != 0)
                return -1;
        } else if (cJSON_IsNumber(c)) {
            double d = c->valuedouble;
            bool big = d >= EXACT_DOUBLE_LIMIT || d <= -EXACT_DOUBLE_LIMIT;
            if (big && d < 9223372036854775807.0 && d >= -9223372036854775808.0 &&
                (double)(int64_t)d == d) {
                char text[24];
                snprintf(text, sizeof(text), "%" PRId64, (int64_t)d);
                cJSON *raw = cJSON_CreateRaw(text);
                if (raw == NULL)
                    return -1;
                /* move the key over; ReplaceItemViaPointer keeps the slot */
                raw->string = c->string;
                raw->type |= c->type & cJSON_StringIsConst;
                c->string = NULL;
                cJSON_ReplaceItemViaPointer(node, c, raw);
            }
        }
        c = next;
    }
    return 0;
}

/* Print root (consumed) as one line with '\n'. */
static char *encode_line(cJSON *root, size_t *len_out)
{
    char *out = NULL;
    char *text = NULL;
    if (normalize_numbers(root) != 0)
        goto out;
    text = cJSON_PrintUnformatted(root);
    if (text == NULL)
        goto out;
    size_t n = strlen(text);
    out = malloc(n + 2);
    if (out == NULL)
        goto out;
    memcpy(out, text, n);
    out[n] = '\n';
    out[n + 1] = '\0';
    if (len_out != NULL)
        *len_out = n + 1;
out:
    cJSON_free(text);
    cJSON_Delete(root);
    return out;
}

/* {"id":...,"ok":ok} with the id copied; NULL when out of memory. */
static cJSON *reply_head(const cJSON *id, bool ok)
{
    cJSON *root = cJSON_CreateObject();
    cJSON *idc = id != NULL ? cJSON_Duplicate(id, 1) : cJSON_CreateNull();
    if (root == NULL || idc == NULL || !cJSON_AddItemToObject(root, "id", idc)) {
        cJSON_Delete(idc);
        cJSON_Delete(root);
        return NULL;
    }
    if (cJSON_AddBoolToObject(root, "ok", ok) == NULL) {
        cJSON_Delete(root);
        return NULL;
    }
    return root;
}

char *proto_reply_ok(const cJSON *id, cJSON *result, size_t *len_out)
{
    cJSON *root = reply_head(id, true);
    if (result == NULL)
        result = cJSON_CreateObject();
    if (root == NULL || result == NULL || !cJSON_AddItemToObject(root, "result", result)) {
        cJSON_Delete(result);
        cJSON_Delete(root);
        return NULL;
    }
    return encode_line(root, len_out);
}

char *proto_reply_err(const cJSON *id, proto_err code, const char *message, size_t *len_out)
{
    if ((unsigned)code >= PROTO_ERR__COUNT)
        code = PROTO_ERR_INTERNAL;
    if (message == NULL || message[0] == '\0')
        message = err_table[code].default_message;

    /* whole UTF-8 characters up to PROTO_MESSAGE_MAX bytes, bad bytes as '?' */
    char text[PROTO_MESSAGE_MAX + 1];
    const unsigned char *u = (const unsigned char *)message;
    size_t mlen = strlen(message), i = 0, o = 0;
    while (i < mlen) {
        size_t n = utf8_seq(u + i, mlen - i);
        if (o + (n ? n : 1) > PROTO_MESSAGE_MAX)
            break;
        if (n == 0) {
            text[o++] = '?';
            i++;
        } else {
            memcpy(text + o, u + i, n);
            o += n;
            i += n;
        }
    }
    text[o] = '\0';

    cJSON *root = reply_head(id, false);
    cJSON *error = cJSON_CreateObject();
    if (root == NULL || error == NULL || !cJSON_AddItemToObject(root, "error", error)) {
        cJSON_Delete(error);
        cJSON_Delete(root);
        return NULL;
    }
    if (cJSON_AddStringToObject(error, "code", err_table[code].name) == NULL ||
        cJSON_AddStringToObject(error, "message", text) == NULL) {
        cJSON_Delete(root);
        return NULL;
    }
    return encode_line(root, len_out);
}
