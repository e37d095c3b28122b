/*
 * proto_text.h - byte-level text rules shared inside proto/ (not part of the
 * public API): strict UTF-8 sequences and hex digits, used by the request
 * parser, the JSON scanner, the reply encoders and the gid codec.
 */
#ifndef PAYCOORD_PROTO_TEXT_H
#define PAYCOORD_PROTO_TEXT_H

#include <stddef.h>

/* Length of the well-formed UTF-8 sequence at s (1-4), or 0 if the bytes there
 * are not one (overlong, surrogate, above U+10FFFF, truncated, stray byte).
 * avail >= 1 bytes are readable at s. */
size_t proto_utf8_seq(const unsigned char *s, size_t avail);
/* Offset of the first byte of s[0..len) that is not well-formed UTF-8, or len. */
size_t proto_utf8_first_bad(const char *s, size_t len);
/* The value of one hex digit (either case), or -1. */
int proto_hex_value(unsigned char c);

#endif
