/*
 * ctl_cmds.c - paycoordctl's commands: each checks its arguments with the
 * protocol's own rules (proto.h, gid.h), sends one or two requests and prints
 * the answer.
 */
#include "ctl.h"

#include "gid.h"
#include "proto.h"

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define CTL_PAY_WAIT_MARGIN_MS INT64_C(5000)     /* pay's default timeout: its wait + this */
#define CTL_DAEMON_PAY_WAIT_MS INT64_C(30000)    /* the daemon's default pay_wait_ms (docs/config.md) */

/* ------------------------------------------------------------------ argument checks */

/* 8-4-4-4-12 hex digits (the one codec, gid.h). */
static bool valid_uuid(const char *s)
{
    unsigned char b[16];
    return gid_uuid_parse(s, b);
}

/* Any gid an operator may name (the one validator, gid.h). */
static bool valid_gid(const char *s) { return gid_valid(s, strlen(s)); }

/* Our gids name their payment (gid.h); false for any other shape. */
static bool gid_payment_id(const char *gid, char out[37]) { return gid_parse(gid, NULL, out); }

static int check_account(const char *cmd, const char *s)
{
    if (proto_valid_account(s, strlen(s)))
        return 0;
    return ctl_usage_error(ctl_find_cmd(cmd), "ACCOUNT must be 1-64 characters of A-Z a-z 0-9 . _ : - (got '%s')", s);
}

static int check_currency(const char *cmd, const char *s)
{
    if (proto_valid_currency(s, strlen(s)))
        return 0;
    return ctl_usage_error(ctl_find_cmd(cmd), "CURRENCY must be three upper-case letters such as EUR (got '%s')", s);
}

static int check_key(const char *cmd, const char *s)
{
    if (proto_valid_key(s, strlen(s)))
        return 0;
    return ctl_usage_error(ctl_find_cmd(cmd), "KEY must be 1-255 printable ASCII characters without spaces");
}

static int check_amount(const char *cmd, const char *s, int64_t *out)
{
    if (ctl_parse_pos_i64(s, out))
        return 0;
    return ctl_usage_error(ctl_find_cmd(cmd), "AMOUNT must be a positive integer in minor units, "
                           "e.g. 1250 for 12.50 (got '%s')", s);
}

static int check_reference(const char *cmd, const char *s)
{
    size_t n = strlen(s);
    if (n <= PROTO_REFERENCE_MAX && proto_valid_utf8(s, n))
        return 0;
    return ctl_usage_error(ctl_find_cmd(cmd), "--reference must be valid UTF-8 of at most %d bytes",
                           PROTO_REFERENCE_MAX);
}

int ctl_call_print(ctl_ctx *x, cJSON *req, void (*table)(const cJSON *result))
{
    ctl_reply r;
    int rc = ctl_call(x, req, &r);
    if (!rc) {
        if (r.code)
            rc = ctl_report_reply_error(&r);
        else if (x->json || !table)
            rc = ctl_print_result(x, r.result);
        else
            table(r.result);
    }
    ctl_reply_free(&r);
    return rc;
}

/* Call and print: the common shape of most commands. */
static int simple_call(ctl_ctx *x, cJSON *req) { return ctl_call_print(x, req, NULL); }

/* ------------------------------------------------------------------ prepared */

int ctl_cmd_prepared(ctl_ctx *x)
{
    int64_t older = 0;
    bool has_older = x->optset[O_OLDER_THAN];
    if (has_older && !ctl_parse_duration(x->optval[O_OLDER_THAN], PROTO_OLDER_THAN_MS_MAX, &older))
        return ctl_usage_error(ctl_find_cmd("prepared"), "--older-than needs a duration such as 500ms, 30s, "
                               "5m, 2h or 1h30m (got '%s')", x->optval[O_OLDER_THAN]);
    if (x->optset[O_DB]) {
        cJSON *result = NULL;
        int rc = ctl_db_prepared(x, has_older, older, &result);
        if (!rc) {
            if (x->json)
                ctl_print_json(result);
            else
                ctl_print_prepared_table(result);
        }
        cJSON_Delete(result);
        return rc;
    }
    cJSON *req = ctl_req_new("prepared");
    if (has_older)
        ctl_req_int(req, "older_than_ms", older);
    ctl_reply r;
    int rc = ctl_call(x, req, &r);
    if (rc == CTL_EXIT_UNREACHABLE)
        fputs("paycoordctl: with the daemon down, 'paycoordctl --db CONNINFO prepared' reads the list "
              "from PostgreSQL\n", stderr);
    if (!rc) {
        if (r.code)
            rc = ctl_report_reply_error(&r);
        else if (!cJSON_IsArray(cJSON_GetObjectItemCaseSensitive(r.result, "transactions")))
            rc = ctl_report_error("internal", "the daemon's prepared result has no transactions array");
        else if (x->json)
            ctl_print_json(r.result);
        else
            ctl_print_prepared_table(r.result);
    }
    ctl_reply_free(&r);
    return rc;
}

/* ------------------------------------------------------------------ show */

static const cJSON *find_tx(const cJSON *prepared_result, const char *gid)
{
    const cJSON *tx;
    cJSON_ArrayForEach(tx, cJSON_GetObjectItemCaseSensitive(prepared_result, "transactions")) {
        const cJSON *g = cJSON_GetObjectItemCaseSensitive(tx, "gid");
        if (cJSON_IsString(g) && strcmp(g->valuestring, gid) == 0)
            return tx;
    }
    return NULL;
}

static bool is_not_found(const ctl_reply *r) { return r->code && strcmp(r->code, "not_found") == 0; }

/* The prepared list may be missing for reasons that do not make `show` fail:
 * a daemon without the op yet, or a peer that is not an admin. */
static bool prepared_optional_error(const ctl_reply *r)
{
    return r->code && (strcmp(r->code, "unknown_op") == 0 || strcmp(r->code, "forbidden") == 0);
}

static void print_show(const ctl_ctx *x, const cJSON *payment, const cJSON *tx)
{
    if (x->json) {
        cJSON *o = cJSON_CreateObject();
        if (!o)
            ctl_oom();
        cJSON *p = payment ? cJSON_Duplicate(payment, true) : cJSON_CreateNull();
        cJSON *t = tx ? cJSON_Duplicate(tx, true) : cJSON_CreateNull();
        if (!p || !cJSON_AddItemToObject(o, "payment", p) || !t || !cJSON_AddItemToObject(o, "prepared", t))
            ctl_oom();
        ctl_print_json(o);
        cJSON_Delete(o);
        return;
    }
    if (payment)
        ctl_print_object(stdout, payment, "payment");
    if (tx)
        ctl_print_object(stdout, tx, "prepared transaction");
}

int ctl_cmd_show(ctl_ctx *x)
{
    const char *arg = x->args[1];
    ctl_reply rs = { 0 }, rp = { 0 };
    const cJSON *payment = NULL, *tx = NULL;
    int rc;

    if (strncmp(arg, "pc:", 3) != 0) {
        /* An idempotency key: the payment, and its prepared transaction while pending. */
        if ((rc = check_key("show", arg)) != 0)
            return rc;
        cJSON *req = ctl_req_new("status");
        ctl_req_str(req, "idempotency_key", arg);
        if ((rc = ctl_call(x, req, &rs)) != 0)
            goto out;
        if (rs.code) {
            rc = ctl_report_reply_error(&rs);
            goto out;
        }
        payment = rs.result;
        const cJSON *st = cJSON_GetObjectItemCaseSensitive(payment, "status");
        const cJSON *gid = cJSON_GetObjectItemCaseSensitive(payment, "gid");
        if (cJSON_IsString(st) && strcmp(st->valuestring, "pending") == 0 && cJSON_IsString(gid)) {
            if ((rc = ctl_call(x, ctl_req_new("prepared"), &rp)) != 0)
                goto out;
            if (rp.result)
                tx = find_tx(rp.result, gid->valuestring);
        }
        print_show(x, payment, tx);
        goto out;
    }

    /* A gid: ask for the prepared list and the payment named inside the gid at once. */
    if (!valid_gid(arg))
        return ctl_usage_error(ctl_find_cmd("show"), "GID must be 1-%d printable ASCII characters", PROTO_GID_MAX);
    char uuid[37];
    bool has_uuid = gid_payment_id(arg, uuid);
    int64_t pid, sid = 0;
    if ((rc = ctl_connect(x)) != 0 || (rc = ctl_conn_send(&x->conn, ctl_req_new("prepared"), &pid)) != 0)
        goto out;
    if (has_uuid) {
        cJSON *req = ctl_req_new("status");
        ctl_req_str(req, "payment_id", uuid);
        if ((rc = ctl_conn_send(&x->conn, req, &sid)) != 0)
            goto out;
    }
    if ((rc = ctl_conn_wait(&x->conn, pid, &rp)) != 0 ||
        (has_uuid && (rc = ctl_conn_wait(&x->conn, sid, &rs)) != 0))
        goto out;
    if (rs.result) {
        const cJSON *g = cJSON_GetObjectItemCaseSensitive(rs.result, "gid");
        if (cJSON_IsString(g) && strcmp(g->valuestring, arg) == 0)
            payment = rs.result;
    }
    if (rp.result)
        tx = find_tx(rp.result, arg);
    if (payment || tx) {
        print_show(x, payment, tx);
        goto out;
    }
    if (rs.code && !is_not_found(&rs)) {
        rc = ctl_report_reply_error(&rs);
        goto out;
    }
    if (rp.code && !prepared_optional_error(&rp)) {
        rc = ctl_report_reply_error(&rp);
        goto out;
    }
    rc = ctl_report_error("not_found", rp.code ? "no payment has this gid (the prepared list was not available)"
                                               : "no payment or prepared transaction has this gid");
    if (rp.code)
        (void)ctl_report_reply_error(&rp);
out:
    ctl_reply_free(&rs);
    ctl_reply_free(&rp);
    return rc;
}

/* ------------------------------------------------------------------ resolve */

/* Ask on the terminal; true only for an answer of exactly "yes". */
static bool confirm(const char *action, const char *gid)
{
    char line[64];
    bool commit = strcmp(action, "commit") == 0;
    fprintf(stderr, "About to %s %s (%s).\nType yes to confirm: ",
            commit ? "COMMIT PREPARED" : "ROLLBACK PREPARED", gid,
            commit ? "the debit stays" : "the held funds are released");
    fflush(stderr);
    if (!fgets(line, sizeof(line), stdin))
        return false;
    size_t n = strlen(line);
    while (n && (line[n - 1] == '\n' || line[n - 1] == '\r' || line[n - 1] == ' '))
        line[--n] = '\0';
    return strcmp(line, "yes") == 0;
}

int ctl_cmd_resolve(ctl_ctx *x)
{
    const ctl_cmd *cmd = ctl_find_cmd("resolve");
    const char *gid = x->args[1], *action = x->args[2], *reason = x->optval[O_REASON];
    if (!valid_gid(gid))
        return ctl_usage_error(cmd, "GID must be 1-%d printable ASCII characters", PROTO_GID_MAX);
    if (strcmp(action, "commit") != 0 && strcmp(action, "rollback") != 0)
        return ctl_usage_error(cmd, "the action must be commit or rollback (got '%s')", action);
    if (!reason || !reason[0])
        return ctl_usage_error(cmd, "--reason TEXT is required: it is recorded with the resolution");
    if (strlen(reason) > PROTO_REASON_MAX || !proto_valid_utf8(reason, strlen(reason)))
        return ctl_usage_error(cmd, "--reason must be valid UTF-8 of at most %d bytes", PROTO_REASON_MAX);

    if (!x->optset[O_YES]) {
        if (!isatty(STDIN_FILENO)) {
            ctl_err("refusing to resolve without confirmation: stdin is not a terminal; "
                    "add --yes to resolve non-interactively");
            return CTL_EXIT_USAGE;
        }
        /* Show what is about to be settled, when the daemon can tell. */
        ctl_reply rp;
        int rc = ctl_call(x, ctl_req_new("prepared"), &rp);
        if (rc) {
            ctl_reply_free(&rp);
            return rc;
        }
        const cJSON *tx = rp.result ? find_tx(rp.result, gid) : NULL;
        if (tx)
            ctl_print_object(stderr, tx, "prepared transaction");
        else if (rp.result)
            fprintf(stderr, "paycoordctl: note: %s is not in the prepared list\n", gid);
        ctl_reply_free(&rp);
        if (!confirm(action, gid)) {
            ctl_err("not confirmed; nothing was changed");
            return CTL_EXIT_USAGE;
        }
    }
    cJSON *req = ctl_req_new("resolve");
    ctl_req_str(req, "gid", gid);
    ctl_req_str(req, "action", action);
    ctl_req_str(req, "reason", reason);
    return simple_call(x, req);
}

/* ------------------------------------------------------------------ the other commands */

int ctl_cmd_recover(ctl_ctx *x)
{
    cJSON *req = ctl_req_new("recover");
    if (x->optset[O_NODE]) {
        const char *n = x->optval[O_NODE];
        if (!gid_valid_node(n)) {
            cJSON_Delete(req);
            return ctl_usage_error(ctl_find_cmd("recover"), "--node must be 1-%d of A-Z a-z 0-9 _ - (got '%s')",
                                   GID_NODE_MAX, n);
        }
        ctl_req_str(req, "node", n);
    }
    return simple_call(x, req);
}

int ctl_cmd_stats(ctl_ctx *x) { return simple_call(x, ctl_req_new("stats")); }
int ctl_cmd_health(ctl_ctx *x) { return simple_call(x, ctl_req_new("health")); }
int ctl_cmd_ping(ctl_ctx *x) { return simple_call(x, ctl_req_new("ping")); }

int ctl_cmd_account(ctl_ctx *x)
{
    int rc;
    if (strcmp(x->args[1], "open") != 0)
        return ctl_usage_error(ctl_find_cmd("account"), "unknown account subcommand '%s'", x->args[1]);
    if ((rc = check_account("account", x->args[2])) != 0 || (rc = check_currency("account", x->args[3])) != 0)
        return rc;
    cJSON *req = ctl_req_new("account_open");
    ctl_req_str(req, "account", x->args[2]);
    ctl_req_str(req, "currency", x->args[3]);
    return simple_call(x, req);
}

int ctl_cmd_balance(ctl_ctx *x)
{
    int rc = check_account("balance", x->args[1]);
    if (rc)
        return rc;
    cJSON *req = ctl_req_new("balance");
    ctl_req_str(req, "account", x->args[1]);
    return simple_call(x, req);
}

/* pay and credit share their arguments: ACCOUNT AMOUNT CURRENCY KEY [--reference R]. */
static int money_request(ctl_ctx *x, const char *op, cJSON **out)
{
    int64_t amount = 0;
    int rc;
    if ((rc = check_account(op, x->args[1])) != 0 || (rc = check_amount(op, x->args[2], &amount)) != 0 ||
        (rc = check_currency(op, x->args[3])) != 0 || (rc = check_key(op, x->args[4])) != 0)
        return rc;
    if (x->optset[O_REFERENCE] && (rc = check_reference(op, x->optval[O_REFERENCE])) != 0)
        return rc;
    cJSON *req = ctl_req_new(op);
    ctl_req_str(req, "account", x->args[1]);
    ctl_req_int(req, "amount", amount);
    ctl_req_str(req, "currency", x->args[3]);
    ctl_req_str(req, "idempotency_key", x->args[4]);
    if (x->optset[O_REFERENCE])
        ctl_req_str(req, "reference", x->optval[O_REFERENCE]);
    *out = req;
    return 0;
}

/* A pay or credit whose answer was lost may still have happened. */
static int money_call(ctl_ctx *x, cJSON *req, const char *key)
{
    int rc = simple_call(x, req);
    if (rc == CTL_EXIT_UNREACHABLE && x->conn.sent)
        fprintf(stderr, "paycoordctl: the request was sent and may still take effect: check with "
                "'paycoordctl status %s' (or run the same command again: the key makes it safe)\n", key);
    return rc;
}

int ctl_cmd_pay(ctl_ctx *x)
{
    cJSON *req;
    int64_t wait_ms = CTL_DAEMON_PAY_WAIT_MS;
    if (x->optset[O_WAIT_MS] &&
        (!ctl_parse_nonneg_i64(x->optval[O_WAIT_MS], &wait_ms) || wait_ms > PROTO_WAIT_MS_MAX))
        return ctl_usage_error(ctl_find_cmd("pay"), "--wait-ms must be an integer from 0 to %" PRId64
                               " (got '%s')", PROTO_WAIT_MS_MAX, x->optval[O_WAIT_MS]);
    int rc = money_request(x, "pay", &req);
    if (rc)
        return rc;
    if (x->optset[O_WAIT_MS])
        ctl_req_int(req, "wait_ms", wait_ms);
    /* The daemon may hold the answer for the whole wait (its default unless
     * --wait-ms): outwait it unless --timeout says otherwise. */
    if (!x->timeout_explicit && wait_ms + CTL_PAY_WAIT_MARGIN_MS > x->timeout_ms)
        x->conn.timeout_ms = x->timeout_ms = wait_ms + CTL_PAY_WAIT_MARGIN_MS;
    return money_call(x, req, x->args[4]);
}

int ctl_cmd_credit(ctl_ctx *x)
{
    cJSON *req;
    int rc = money_request(x, "credit", &req);
    return rc ? rc : money_call(x, req, x->args[4]);
}

int ctl_cmd_status(ctl_ctx *x)
{
    const ctl_cmd *cmd = ctl_find_cmd("status");
    bool by_id = x->optset[O_PAYMENT_ID];
    if (by_id == (x->nargs == 2))
        return ctl_usage_error(cmd, "give either KEY or --payment-id UUID");
    cJSON *req = ctl_req_new("status");
    if (by_id) {
        if (!valid_uuid(x->optval[O_PAYMENT_ID])) {
            cJSON_Delete(req);
            return ctl_usage_error(cmd, "--payment-id needs a UUID like 3f2a1c9e-0b7d-4e8a-9c1f-2d3e4f5a6b7c");
        }
        ctl_req_str(req, "payment_id", x->optval[O_PAYMENT_ID]);
    } else {
        int rc = check_key("status", x->args[1]);
        if (rc) {
            cJSON_Delete(req);
            return rc;
        }
        ctl_req_str(req, "idempotency_key", x->args[1]);
    }
    return simple_call(x, req);
}
