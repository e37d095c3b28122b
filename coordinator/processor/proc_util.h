/*
 * proc_util.h - small pieces the processor adapters share: log values,
 * strict JSON field readers, form encoding (Stripe), and our metadata in a
 * canonical order (a replay must send exactly the first request's
 * parameters, and metadata read back from the database has lost its order).
 */
#ifndef PAYCOORD_PROC_UTIL_H
#define PAYCOORD_PROC_UTIL_H

#include "common.h"
#include "sbuf.h"

#include <cjson/cJSON.h>
#include <stddef.h>
#include <stdint.h>

/* s as a log value: bare when it is a plain token, else quoted with '"' and
 * '\' escaped and control characters replaced. Truncates to fit. */
const char *proc_log_value(char *buf, size_t size, const char *s);

/* Copy src into dst[size]; false (dst = "") when it does not fit. */
bool proc_copy(char *dst, size_t size, const char *src);

/* An integral JSON number that a double holds exactly (|x| <= 2^53). */
bool proc_json_int(const cJSON *item, int64_t *out);
/* A JSON string member of o, or NULL. */
const char *proc_json_str(const cJSON *o, const char *name);

/* Append "key=value" to a form body (application/x-www-form-urlencoded),
 * '&'-separated, both percent-encoded (RFC 3986 unreserved kept). */
void proc_form_add(sbuf *b, const char *key, const char *value);
/* Percent-encode s for one path segment into b. */
void proc_path_escape(sbuf *b, const char *s);

/* HMAC-SHA256 (OpenSSL libcrypto) of msg[len] with key[klen] into out[32]. */
bool proc_hmac_sha256(const unsigned char *key, size_t klen, const void *msg, size_t len, unsigned char out[32]);

/* Read a secret file (one line; trailing whitespace dropped) into out[size].
 * Refused (err says why) when it is missing, empty, longer than size - 1, or
 * readable or writable by others. Startup only: it blocks. */
int proc_read_secret(const char *what, const char *path, char *out, size_t size, char *err, size_t errlen)
    PC_MUSTCHECK;

/* The string members of a metadata object in byte order of their keys:
 * fills keys[]/values[] (at most max), returns how many. Non-string members
 * and empty keys are skipped. */
int proc_meta_sorted(const cJSON *meta, const char **keys, const char **values, int max);

#endif
