/*
 * proto.h - the paycoord wire protocol v1 (docs/protocol.md): NDJSON request
 * parsing and validation, and reply encoding. Pure functions, no I/O.
 *
 * Contract: proto_parse() never trusts its input. It validates UTF-8, the JSON
 * shape, every field rule of docs/protocol.md ("Field rules"), and rejects
 * duplicate top-level keys. On failure it fills *err with a protocol error
 * code and a message naming the field, and still extracts the request "id"
 * when one could be read (else err->id is NULL, i.e. JSON null).
 */
#ifndef PAYCOORD_PROTO_H
#define PAYCOORD_PROTO_H

#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>
#include <cjson/cJSON.h>

#define PROTO_VERSION 1

#define PROTO_ACCOUNT_MAX 64
#define PROTO_KEY_MAX 255
#define PROTO_REFERENCE_MAX 255
#define PROTO_REASON_MAX 500
#define PROTO_META_KEYS_MAX 20
#define PROTO_META_KEY_MAX 40
#define PROTO_META_VALUE_MAX 500
#define PROTO_GID_MAX 200
#define PROTO_NODE_MAX 32
#define PROTO_PATH_MAX 1024                     /* reconcile: a settlement report's path */

/* Additional limits (added with the implementation). */
#define PROTO_ID_MAX 255                        /* bytes of a string id */
#define PROTO_MAX_DEPTH 32                      /* JSON nesting levels, top object = 1 */
#define PROTO_MAX_AMOUNT_DEFAULT INT64_C(1000000000000)
#define PROTO_WAIT_MS_MAX INT64_C(86400000)
#define PROTO_OLDER_THAN_MS_MAX INT64_C(10000000000000)
#define PROTO_MESSAGE_MAX 1024                  /* error messages are cut here when encoded */

typedef enum {
    PROTO_OP_PAY = 0,
    PROTO_OP_STATUS,
    PROTO_OP_CREDIT,
    PROTO_OP_BALANCE,
    PROTO_OP_PING,
    PROTO_OP_ACCOUNT_OPEN,
    PROTO_OP_PREPARED,
    PROTO_OP_RESOLVE,
    PROTO_OP_RECOVER,
    PROTO_OP_STATS,
    PROTO_OP_HEALTH,
    PROTO_OP_RECONCILE,                         /* reconciliation (docs/reconciliation.md) */
    PROTO_OP_RECONCILE_STATUS,
    PROTO_OP_DISCREPANCIES,
    PROTO_OP_SETTLE_DISCREPANCY,
    PROTO_OP_AUDIT,
    PROTO_OP__COUNT
} proto_op;

/* The error codes of docs/protocol.md, "Error codes". */
typedef enum {
    PROTO_ERR_NONE = 0,
    PROTO_ERR_INVALID_REQUEST,
    PROTO_ERR_REQUEST_TOO_LARGE,
    PROTO_ERR_UNKNOWN_OP,
    PROTO_ERR_UNKNOWN_ACCOUNT,
    PROTO_ERR_ACCOUNT_EXISTS,
    PROTO_ERR_CURRENCY_MISMATCH,
    PROTO_ERR_IDEMPOTENCY_CONFLICT,
    PROTO_ERR_NOT_FOUND,
    PROTO_ERR_FORBIDDEN,
    PROTO_ERR_OVERLOADED,
    PROTO_ERR_UNAVAILABLE,
    PROTO_ERR_SHUTTING_DOWN,
    PROTO_ERR_INTERNAL,
    PROTO_ERR__COUNT
} proto_err;

typedef struct proto_limits {
    int64_t max_amount;           /* default 1000000000000 (10^12) */
} proto_limits;

typedef struct proto_error {
    proto_err code;
    char message[256];
    cJSON *id;                    /* owned; NULL means JSON null */
} proto_error;

typedef enum { PROTO_ACTION_NONE = 0, PROTO_ACTION_COMMIT, PROTO_ACTION_ROLLBACK } proto_action;

/*
 * A validated request. Strings are NUL-terminated copies; pointer fields are
 * owned by the request and released by proto_request_free(). Only the fields
 * of the request's op are set; has_* flags tell optional fields apart.
 */
typedef struct proto_request {
    proto_op op;
    cJSON *id;                                  /* owned; string or number (raw if |id| >= 10^15) */
    char account[PROTO_ACCOUNT_MAX + 1];
    char currency[4];
    char idempotency_key[PROTO_KEY_MAX + 1];
    int64_t amount;
    char *reference;                            /* NULL when absent */
    cJSON *metadata;                            /* NULL when absent; object of strings */
    bool has_wait_ms;
    int64_t wait_ms;                            /* >= 0 */
    char payment_id[37];                        /* status: canonical lower-case uuid */
    bool has_older_than_ms;
    int64_t older_than_ms;                      /* prepared */
    char gid[PROTO_GID_MAX + 1];                /* resolve */
    proto_action action;                        /* resolve */
    char *reason;                               /* resolve */
    char node[PROTO_NODE_MAX + 1];              /* recover (extension): "" = this daemon's node */
    bool has_window;                            /* reconcile: from and to given (both or neither) */
    int64_t from_s, to_s;                       /* reconcile: the window, unix seconds, from < to */
    char *report;                               /* reconcile: a settlement report's path (NULL: none) */
    int64_t discrepancy_id;                     /* settle_discrepancy */
    char settle_action[8];                      /* settle_discrepancy: credit | debit | accept */
    bool all;                                   /* discrepancies: resolved ones too */
    bool has_account;                           /* audit: one account (else all); settle_discrepancy: the account */
} proto_request;

/* Parse and validate one request line (without its '\n'). Returns 0 and fills
 * *req, or -1 and fills *err. Exactly one of req/err owns memory afterwards.
 * Both structs are zeroed first, so proto_request_free() and proto_error_free()
 * are safe on either whatever the outcome. lim may be NULL (defaults).
 *
 * Details the protocol leaves open (see proto.c for the full list):
 * - "id" is required. A string id is a cJSON string. An integer id is a cJSON
 *   number when |id| < 10^15 (exact in a double and printed without exponent)
 *   and a cJSON raw item holding its decimal text otherwise (any int64), so
 *   every id is echoed exactly.
 * - An optional field given as JSON null counts as absent; a required field
 *   given as null is reported as missing.
 * - "\u0000" escapes are rejected anywhere in the request, like raw NULs. */
int proto_parse(const char *line, size_t len, const proto_limits *lim,
                proto_request *req, proto_error *err) __attribute__((warn_unused_result));

void proto_request_free(proto_request *req);
void proto_error_free(proto_error *err);

const char *proto_err_name(proto_err code);     /* "invalid_request", ... */
const char *proto_op_name(proto_op op);         /* "pay", ... */
bool proto_op_is_admin(proto_op op);

/* Reply encoders: return a malloc'd NUL-terminated line ending in '\n'
 * (caller frees); *len_out gets its length without the NUL. id may be NULL
 * (encoded as null). proto_reply_ok takes ownership of result, even when it
 * fails; a NULL result is encoded as {}. Both return NULL only when out of
 * memory. A NULL or empty message gets a default text for the code; a message
 * is cut at PROTO_MESSAGE_MAX bytes and invalid UTF-8 in it becomes '?'. */
char *proto_reply_ok(const cJSON *id, cJSON *result, size_t *len_out);
char *proto_reply_err(const cJSON *id, proto_err code, const char *message, size_t *len_out);

/* An exact JSON integer for replies: a cJSON number when |v| < 10^15, else a
 * raw item with the decimal text (cJSON would print 1e+15 or lose digits).
 * NULL on allocation failure. The encoders also print integral numbers of
 * 10^15 and more without exponent, but a double cannot hold every int64. */
cJSON *proto_json_int(int64_t v);

/* Field-rule checks, exposed for reuse and unit tests. proto_valid_utf8 is
 * strict (no overlongs, surrogates or code points above U+10FFFF); it does
 * not reject NUL, which proto_parse() rejects separately. */
bool proto_valid_account(const char *s, size_t len);
bool proto_valid_currency(const char *s, size_t len);
bool proto_valid_key(const char *s, size_t len);
bool proto_valid_utf8(const char *s, size_t len);

#endif
