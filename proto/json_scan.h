/*
 * json_scan.h - the strict JSON scanner of a request line (proto/ internal):
 * RFC 8259 grammar and whitespace only, no raw control characters, "\u0000"
 * or lone surrogate escapes in strings, nesting up to max_depth, numbers of
 * at most 63 characters, exactly one object and nothing after it but
 * whitespace. It records the raw text of every top-level member's value,
 * because cJSON turns numbers into doubles and integers must be judged on
 * what the client wrote.
 */
#ifndef PAYCOORD_JSON_SCAN_H
#define PAYCOORD_JSON_SCAN_H

#include <stdbool.h>
#include <stddef.h>

typedef struct json_scan_member {
    size_t val_off;             /* raw value token in the line */
    size_t val_len;
} json_scan_member;

typedef struct json_scan {
    const unsigned char *s;
    size_t len;
    size_t pos;
    int max_depth;              /* nesting levels, top object = 1 */
    json_scan_member *members;  /* top-level members, in order */
    size_t count;
    size_t cap;
    bool oom;
    char msg[160];              /* set by the first failure */
} json_scan;

/* Scan line[0..len) (checked to be UTF-8 without NUL already) as one request
 * object, at most max_depth levels deep. 0 on success; -1 with sc->msg set
 * (and sc->oom when out of memory). Either way json_scan_free() releases
 * sc->members. */
int json_scan_request(json_scan *sc, const char *line, size_t len, int max_depth)
    __attribute__((warn_unused_result));
void json_scan_free(json_scan *sc);

#endif
