/*
 * ctl.h - paycoordctl's private interface, shared by its four files:
 * paycoordctl.c (command line, dispatch, help), ctl_conn.c (the daemon's
 * socket, and PostgreSQL for --db), ctl_output.c (tables, --json, messages)
 * and ctl_cmds.c (the commands).
 *
 * Exit status (docs/paycoordctl.md): 0 ok; 1 the daemon (or, with --db, the
 * database) answered an error; 2 usage error or confirmation refused; 3 the
 * daemon could not be reached or gave no usable answer.
 */
#ifndef PAYCOORD_CTL_H
#define PAYCOORD_CTL_H

#include "common.h"
#include "sbuf.h"

#include <stdarg.h>
#include <stdio.h>

#include <cjson/cJSON.h>
#include <libpq-fe.h>

#define CTL_EXIT_OK 0
#define CTL_EXIT_ERROR 1        /* the daemon or the database answered an error */
#define CTL_EXIT_USAGE 2        /* bad command line, or confirmation refused */
#define CTL_EXIT_UNREACHABLE 3  /* no usable answer: socket missing, refused, timeout, closed */

#define CTL_MAX_ARGS 8          /* positional arguments, command included */
#define CTL_STASH_MAX 4         /* answers read ahead while pipelining */

/* ------------------------------------------------------------------ options and commands */

enum {
    O_SOCKET, O_JSON, O_TIMEOUT, O_DB, O_HELP, O_VERSION,
    O_OLDER_THAN, O_REASON, O_YES, O_REFERENCE, O_WAIT_MS, O_PAYMENT_ID, O_NODE,
    O_FROM, O_TO, O_REPORT, O_WAIT, O_ALL, O_ACTION, O_ACCOUNT,
    O__COUNT
};
#define OB(o) (1u << (o))
#define O_GLOBALS (OB(O_SOCKET) | OB(O_JSON) | OB(O_TIMEOUT) | OB(O_DB) | OB(O_HELP) | OB(O_VERSION))

typedef struct ctl_conn {
    int fd;                       /* -1 until connected */
    const char *path;
    int64_t deadline;             /* monotonic ms: the whole command's budget */
    int64_t timeout_ms;
    char *buf;                    /* received bytes; [off, len) not consumed yet */
    size_t off, len, cap, scan;   /* scan: bytes from off known to hold no '\n' */
    int64_t next_id;
    bool sent;                    /* a request went out: it may have taken effect */
    cJSON *stash[CTL_STASH_MAX];  /* answers to other requests of ours, read early */
    size_t nstash;
} ctl_conn;

typedef struct ctl_ctx {
    const char *optval[O__COUNT];
    bool optset[O__COUNT];
    const char *args[CTL_MAX_ARGS]; /* args[0] is the command */
    int nargs;
    const char *socket_path;
    bool json;
    bool timeout_explicit;
    int64_t timeout_ms;
    ctl_conn conn;
} ctl_ctx;

typedef struct ctl_cmd {
    const char *name;
    const char *usage;            /* after "paycoordctl [OPTIONS] " */
    const char *summary;          /* one line for the overview */
    const char *description;      /* for `help COMMAND`, wrapped by hand */
    const char *example;
    int min_args, max_args;       /* positional arguments after the name */
    unsigned options;             /* OB() bits beyond the global ones */
    int (*run)(ctl_ctx *x);
} ctl_cmd;

/* One answer: root owns everything; exactly one of result / code is set. */
typedef struct ctl_reply {
    cJSON *root;
    const cJSON *result;
    const char *code;
    const char *message;
} ctl_reply;

/* ------------------------------------------------------------------ paycoordctl.c */

const ctl_cmd *ctl_find_cmd(const char *name);
/* Print the message and the command's usage (cmd may be NULL); returns CTL_EXIT_USAGE. */
int ctl_usage_error(const ctl_cmd *cmd, const char *fmt, ...) PC_PRINTF(2, 3);
/* Decimal digits only (no sign, no fraction), 0 <= value <= INT64_MAX. */
bool ctl_parse_nonneg_i64(const char *s, int64_t *out) PC_MUSTCHECK;
/* Like ctl_parse_nonneg_i64, and at least 1. */
bool ctl_parse_pos_i64(const char *s, int64_t *out) PC_MUSTCHECK;
/* "500ms", "30s", "5m", "2h", "1h30m", at most max_ms. */
bool ctl_parse_duration(const char *s, int64_t max_ms, int64_t *out) PC_MUSTCHECK;

/* ------------------------------------------------------------------ ctl_output.c */

void ctl_err(const char *fmt, ...) PC_PRINTF(1, 2);
void ctl_verr(const char *fmt, va_list ap) PC_PRINTF(1, 0);
/* Allocation failure in a short-lived CLI: say so and stop. */
_Noreturn void ctl_oom(void);
/* The buffer's text (malloc'd, "" when empty); the buffer is left empty. */
char *ctl_take(sbuf *b);
/* Printable text for a terminal: control characters become escapes. */
void ctl_add_printable(sbuf *b, const char *s);
void ctl_print_json(const cJSON *v);
void ctl_print_object(FILE *out, const cJSON *obj, const char *title);
void ctl_print_prepared_table(const cJSON *result);
/* An array of objects as a table, one column per key ("a.b": member b of member a). */
void ctl_print_rows(const cJSON *rows, size_t ncols, const char *const *headers, const char *const *keys,
                    const bool *right);
/* A successful result: --json as one line, else the vertical layout. */
int ctl_print_result(const ctl_ctx *x, const cJSON *result);
int ctl_report_error(const char *code, const char *message);
int ctl_report_reply_error(const ctl_reply *r);

/* ------------------------------------------------------------------ ctl_conn.c */

void ctl_conn_init(ctl_conn *c, const char *path, int64_t timeout_ms);
void ctl_conn_close(ctl_conn *c);
/* Send one request; takes ownership of req and gives it the next id. */
int ctl_conn_send(ctl_conn *c, cJSON *req, int64_t *id_out) PC_MUSTCHECK;
/* Wait for the answer to request id (answers may come in any order). */
int ctl_conn_wait(ctl_conn *c, int64_t id, ctl_reply *out) PC_MUSTCHECK;
void ctl_reply_free(ctl_reply *r);
int ctl_connect(ctl_ctx *x) PC_MUSTCHECK;
/* Connect if needed, send req (owned) and wait for its answer. */
int ctl_call(ctl_ctx *x, cJSON *req, ctl_reply *out) PC_MUSTCHECK;
cJSON *ctl_req_new(const char *op);
void ctl_req_str(cJSON *o, const char *key, const char *val);
void ctl_req_int(cJSON *o, const char *key, int64_t val);
/* Send req, then print the result (table(), unless --json or table is NULL)
 * or report the error answer; returns the exit code. */
int ctl_call_print(ctl_ctx *x, cJSON *req, void (*table)(const cJSON *result)) PC_MUSTCHECK;
/* The prepared list straight from PostgreSQL (--db); *result gets the
 * daemon's result shape. */
int ctl_db_prepared(const ctl_ctx *x, bool has_older, int64_t older_ms, cJSON **result) PC_MUSTCHECK;
/* A connection to --db CONNINFO (connect_timeout and statement_timeout from
 * --timeout), or NULL after printing why. */
PGconn *ctl_db_connect(const ctl_ctx *x) PC_MUSTCHECK;
/* libpq's multi-line message as one printable line (malloc'd). */
char *ctl_pq_message(const char *m);

/* ------------------------------------------------------------------ ctl_cmds.c */

int ctl_cmd_ping(ctl_ctx *x);
int ctl_cmd_health(ctl_ctx *x);
int ctl_cmd_stats(ctl_ctx *x);
int ctl_cmd_prepared(ctl_ctx *x);
int ctl_cmd_show(ctl_ctx *x);
int ctl_cmd_resolve(ctl_ctx *x);
int ctl_cmd_recover(ctl_ctx *x);
int ctl_cmd_account(ctl_ctx *x);
int ctl_cmd_balance(ctl_ctx *x);
int ctl_cmd_pay(ctl_ctx *x);
int ctl_cmd_credit(ctl_ctx *x);
int ctl_cmd_status(ctl_ctx *x);

/* ------------------------------------------------------------------ ctl_recon.c */

int ctl_cmd_reconcile(ctl_ctx *x);
int ctl_cmd_discrepancies(ctl_ctx *x);
int ctl_cmd_settle_discrepancy(ctl_ctx *x);
int ctl_cmd_audit(ctl_ctx *x);

#endif
