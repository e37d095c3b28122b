/* json_scan.c - the strict JSON scanner of one request line (json_scan.h):
 * it decides what is well-formed before cJSON builds the tree, and records
 * where each top-level value's raw text is. */
#include "json_scan.h"

#include "proto_text.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int scan_fail(json_scan *sc, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static int scan_fail(json_scan *sc, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(sc->msg, sizeof(sc->msg), fmt, ap);
    va_end(ap);
    return -1;
}

static int scan_unexpected(json_scan *sc, const char *wanted)
{
    if (sc->pos >= sc->len)
        return scan_fail(sc, "malformed JSON: unexpected end of line, expected %s", wanted);
    unsigned char c = sc->s[sc->pos];
    if (c >= 0x21 && c <= 0x7E)
        return scan_fail(sc, "malformed JSON at byte %zu: expected %s, found '%c'", sc->pos, wanted, c);
    return scan_fail(sc, "malformed JSON at byte %zu: expected %s, found byte 0x%02X",
                     sc->pos, wanted, c);
}

static void scan_ws(json_scan *sc)
{
    while (sc->pos < sc->len) {
        unsigned char c = sc->s[sc->pos];
        if (c != ' ' && c != '\t' && c != '\n' && c != '\r')
            break;
        sc->pos++;
    }
}

/* The 4 hex digits at sc->s[at..at+3] as a code unit, or -1. */
static long scan_hex4(const json_scan *sc, size_t at)
{
    if (at + 4 > sc->len)
        return -1;
    long v = 0;
    for (size_t i = 0; i < 4; i++) {
        int h = proto_hex_value(sc->s[at + i]);
        if (h < 0)
            return -1;
        v = v * 16 + h;
    }
    return v;
}

static int scan_string(json_scan *sc)
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

static int scan_number_body(json_scan *sc);

static bool scan_digit(const json_scan *sc)
{
    return sc->pos < sc->len && sc->s[sc->pos] >= '0' && sc->s[sc->pos] <= '9';
}

/* The longest number accepted anywhere in a request. cJSON up to 1.7.18
 * parses a number through a 64-byte buffer and fails on longer ones (which it
 * reports like running out of memory); no field of ours needs more than 20
 * characters, so longer numbers are refused here as invalid_request. */
#define JSON_SCAN_NUMBER_MAX 63

static int scan_number(json_scan *sc)
{
    size_t start = sc->pos;
    int rc = scan_number_body(sc);
    if (rc == 0 && sc->pos - start > JSON_SCAN_NUMBER_MAX)
        return scan_fail(sc, "number longer than %d characters at byte %zu", JSON_SCAN_NUMBER_MAX, start);
    return rc;
}

static int scan_number_body(json_scan *sc)
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

static int scan_literal(json_scan *sc, const char *word)
{
    size_t n = strlen(word);
    if (sc->len - sc->pos < n || memcmp(sc->s + sc->pos, word, n) != 0)
        return scan_unexpected(sc, "a JSON value");
    sc->pos += n;
    return 0;
}

static int scan_object(json_scan *sc, int depth, bool top);
static int scan_array(json_scan *sc, int depth);

static int scan_value(json_scan *sc, int depth)
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

static int scan_depth_ok(json_scan *sc, int depth)
{
    if (depth > sc->max_depth)
        return scan_fail(sc, "JSON nesting deeper than %d levels (at byte %zu)", sc->max_depth,
                         sc->pos);
    return 0;
}

static int scan_record(json_scan *sc, size_t off, size_t len)
{
    if (sc->count == sc->cap) {
        size_t cap = sc->cap ? sc->cap * 2 : 16;
        json_scan_member *m = realloc(sc->members, cap * sizeof(*m));
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

static int scan_object(json_scan *sc, int depth, bool top)
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

static int scan_array(json_scan *sc, int depth)
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
static int scan_request(json_scan *sc)
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

int json_scan_request(json_scan *sc, const char *line, size_t len, int max_depth)
{
    memset(sc, 0, sizeof(*sc));
    sc->s = (const unsigned char *)line;
    sc->len = len;
    sc->max_depth = max_depth;
    return scan_request(sc);
}

void json_scan_free(json_scan *sc)
{
    free(sc->members);
    sc->members = NULL;
    sc->count = sc->cap = 0;
}
