/* sbuf.h - a growable string buffer for building SQL and log text, with an
 * explicit SQL-literal encoder (standard_conforming_strings is on; pgpool
 * sets it on every connection). Allocation failure is sticky: sbuf_ok()
 * tells, and the text is then unusable. */
#ifndef PAYCOORD_SBUF_H
#define PAYCOORD_SBUF_H

#include "common.h"

typedef struct sbuf {
    char *data;
    size_t len;
    size_t cap;
    bool failed;
} sbuf;

void sbuf_init(sbuf *b);
void sbuf_free(sbuf *b);
void sbuf_reset(sbuf *b);
bool sbuf_ok(const sbuf *b);
void sbuf_add(sbuf *b, const char *s, size_t n);
void sbuf_puts(sbuf *b, const char *s);
void sbuf_printf(sbuf *b, const char *fmt, ...) PC_PRINTF(2, 3);
/* 'text' with every ' doubled; NULL becomes NULL. A NUL inside cannot occur
 * (C strings). */
void sbuf_literal(sbuf *b, const char *s);
const char *sbuf_str(const sbuf *b);          /* "" when empty */

#endif
