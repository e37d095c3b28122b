/*
 * proto_reply.c - the replies of wire protocol v1 (docs/protocol.md,
 * "Envelope" and "Error codes"): one line per answer, integers exact, error
 * messages cut to whole UTF-8 characters.
 */
#include "proto.h"
#include "proto_text.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------- error codes -- */

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

const char *proto_err_name(proto_err code)
{
    if ((unsigned)code >= PROTO_ERR__COUNT)
        return err_table[PROTO_ERR_INTERNAL].name;
    return err_table[code].name;
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
        size_t n = proto_utf8_seq(u + i, mlen - i);
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
