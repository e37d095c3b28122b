/*
 * ctl_recon.c - paycoordctl's reconciliation commands (docs/reconciliation.md):
 * reconcile (start a run, or `reconcile status`), discrepancies,
 * settle-discrepancy and audit (also straight from PostgreSQL with --db).
 */
#include "ctl.h"

#include "proto.h"

#include <inttypes.h>
#include <libpq-fe.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* ------------------------------------------------------------------ times */

/* Days since 1970-01-01 of a civil date (proleptic Gregorian). */
static int64_t days_from_civil(int64_t y, int64_t m, int64_t d)
{
    y -= m <= 2;
    int64_t era = (y >= 0 ? y : y - 399) / 400;
    int64_t yoe = y - era * 400;
    int64_t doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

static bool digits(const char *s, int n, int64_t *out)
{
    int64_t v = 0;
    for (int i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return false;
        v = v * 10 + (s[i] - '0');
    }
    *out = v;
    return true;
}

/* Unix seconds, "YYYY-MM-DD" (midnight UTC) or "YYYY-MM-DDTHH:MM[:SS][Z]" (UTC). */
static bool parse_time(const char *s, int64_t *out)
{
    size_t n = strlen(s);
    if (n && strspn(s, "0123456789") == n)
        return ctl_parse_nonneg_i64(s, out);
    int64_t y, mo, d, h = 0, mi = 0, se = 0;
    if (n < 10 || !digits(s, 4, &y) || s[4] != '-' || !digits(s + 5, 2, &mo) || s[7] != '-' ||
        !digits(s + 8, 2, &d) || mo < 1 || mo > 12 || d < 1 || d > 31)
        return false;
    const char *p = s + 10;
    if (*p == 'T' || *p == ' ') {
        if (strlen(p) < 6 || !digits(p + 1, 2, &h) || p[3] != ':' || !digits(p + 4, 2, &mi) || h > 23 || mi > 59)
            return false;
        p += 6;
        if (*p == ':') {
            if (!digits(p + 1, 2, &se) || se > 59)
                return false;
            p += 3;
        }
        if (*p == 'Z')
            p++;
    }
    if (*p)
        return false;
    *out = days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + se;
    return *out >= 0;
}

/* Call; on a transport failure or an error answer, report it, free r and
 * return the exit code (0: r holds a result the caller frees). */
static int call_ok(ctl_ctx *x, cJSON *req, ctl_reply *r)
{
    int rc = ctl_call(x, req, r);
    if (!rc && r->code)
        rc = ctl_report_reply_error(r);
    if (rc)
        ctl_reply_free(r);
    return rc;
}

/* ------------------------------------------------------------------ reconcile */

static void print_runs(const cJSON *result)
{
    static const char *const headers[] = { "run", "state", "trigger", "from", "to", "pages", "seen", "matched",
                                           "in_progress", "differences", "missing_there", "not_ours", "error" };
    static const char *const keys[] = { "run_id", "state", "trigger", "from", "to", "pages", "seen", "matched",
                                        "in_progress", "differences", "missing_there", "not_ours", "error" };
    static const bool right[] = { true, false, false, true, true, true, true, true, true, true, true, true, false };
    ctl_print_rows(cJSON_GetObjectItemCaseSensitive(result, "runs"), PC_ARRAY_LEN(headers), headers, keys, right);
}

int ctl_cmd_reconcile(ctl_ctx *x)
{
    const ctl_cmd *cmd = ctl_find_cmd("reconcile");
    if (x->nargs == 2) {
        if (strcmp(x->args[1], "status") != 0)
            return ctl_usage_error(cmd, "the only argument is 'status' (got '%s')", x->args[1]);
        if (x->optset[O_FROM] || x->optset[O_TO] || x->optset[O_REPORT])
            return ctl_usage_error(cmd, "'reconcile status' takes no --from, --to or --report");
        return ctl_call_print(x, ctl_req_new("reconcile_status"), print_runs);
    }
    cJSON *req = ctl_req_new("reconcile");
    if (x->optset[O_FROM] != x->optset[O_TO]) {
        cJSON_Delete(req);
        return ctl_usage_error(cmd, "--from and --to go together");
    }
    if (x->optset[O_FROM]) {
        int64_t from, to;
        if (!parse_time(x->optval[O_FROM], &from) || !parse_time(x->optval[O_TO], &to)) {
            cJSON_Delete(req);
            return ctl_usage_error(cmd, "--from/--to take unix seconds, YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS]Z (UTC)");
        }
        if (to <= from) {
            cJSON_Delete(req);
            return ctl_usage_error(cmd, "--to must be after --from");
        }
        ctl_req_int(req, "from", from);
        ctl_req_int(req, "to", to);
    }
    if (x->optset[O_REPORT]) {
        const char *p = x->optval[O_REPORT];
        char *abs = p[0] == '/' ? strdup(p) : realpath(p, NULL);
        if (!abs) {
            cJSON_Delete(req);
            return ctl_usage_error(cmd, "--report: cannot find '%s'", p);
        }
        ctl_req_str(req, "report", abs);
        free(abs);
    }
    ctl_reply r;
    int rc = call_ok(x, req, &r);
    if (rc)
        return rc;
    int64_t run_id = (int64_t)cJSON_GetNumberValue(cJSON_GetObjectItemCaseSensitive(r.result, "run_id"));
    if (!x->optset[O_WAIT]) {
        rc = ctl_print_result(x, r.result);
        ctl_reply_free(&r);
        return rc;
    }
    if (!x->json)
        fprintf(stderr, "paycoordctl: run %" PRId64 " started; waiting for it to end\n", run_id);
    ctl_reply_free(&r);
    /* --wait: poll reconcile_status until the run is no longer running. */
    for (;;) {
        struct timespec ts = { 0, 500 * 1000 * 1000 };
        nanosleep(&ts, NULL);
        ctl_conn_close(&x->conn);                       /* a fresh deadline per poll */
        ctl_conn_init(&x->conn, x->socket_path, x->timeout_ms);
        rc = call_ok(x, ctl_req_new("reconcile_status"), &r);
        if (rc)
            return rc;
        const cJSON *run = NULL, *it;
        cJSON_ArrayForEach(it, cJSON_GetObjectItemCaseSensitive(r.result, "runs")) {
            if ((int64_t)cJSON_GetNumberValue(cJSON_GetObjectItemCaseSensitive(it, "run_id")) == run_id)
                run = it;
        }
        const char *state = run ? cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(run, "state")) : NULL;
        if (!state || strcmp(state, "running") != 0) {
            rc = run ? ctl_print_result(x, run) : CTL_EXIT_ERROR;
            if (state && !strcmp(state, "failed"))
                rc = CTL_EXIT_ERROR;
            ctl_reply_free(&r);
            return rc;
        }
        ctl_reply_free(&r);
    }
}

/* ------------------------------------------------------------------ discrepancies */

static void print_discrepancies(const cJSON *result)
{
    static const char *const headers[] = { "id", "kind", "state", "gid", "account", "ours", "theirs", "last_seen",
                                           "detail" };
    static const char *const keys[] = { "id", "kind", "state", "gid", "account", "ours.amount", "theirs.amount",
                                        "last_seen", "detail" };
    static const bool right[] = { true, false, false, false, false, true, true, false, false };
    ctl_print_rows(cJSON_GetObjectItemCaseSensitive(result, "discrepancies"), PC_ARRAY_LEN(headers), headers, keys,
                   right);
}

int ctl_cmd_discrepancies(ctl_ctx *x)
{
    cJSON *req = ctl_req_new("discrepancies");
    if (x->optset[O_ALL])
        cJSON_AddBoolToObject(req, "all", true);
    return ctl_call_print(x, req, print_discrepancies);
}

int ctl_cmd_settle_discrepancy(ctl_ctx *x)
{
    const ctl_cmd *cmd = ctl_find_cmd("settle-discrepancy");
    int64_t id;
    const char *action = x->optval[O_ACTION], *reason = x->optval[O_REASON];
    if (!ctl_parse_pos_i64(x->args[1], &id))
        return ctl_usage_error(cmd, "ID must be a discrepancy id (a positive integer; see 'discrepancies')");
    if (!action || (strcmp(action, "credit") && strcmp(action, "debit") && strcmp(action, "accept")))
        return ctl_usage_error(cmd, "--action must be credit, debit or accept");
    if (!reason || !reason[0])
        return ctl_usage_error(cmd, "--reason TEXT is required: it is recorded with the settlement");
    if (strlen(reason) > PROTO_REASON_MAX || !proto_valid_utf8(reason, strlen(reason)))
        return ctl_usage_error(cmd, "--reason must be valid UTF-8 of at most %d bytes", PROTO_REASON_MAX);
    if (!x->optset[O_YES]) {
        if (!isatty(STDIN_FILENO)) {
            ctl_err("refusing to settle without confirmation: stdin is not a terminal; add --yes");
            return CTL_EXIT_USAGE;
        }
        char line[64];
        fprintf(stderr, "About to settle discrepancy %" PRId64 " with %s (%s).\nType yes to confirm: ", id, action,
                !strcmp(action, "accept") ? "no ledger entry" : "a compensating ledger entry");
        fflush(stderr);
        if (!fgets(line, sizeof(line), stdin) || strncmp(line, "yes", 3) != 0 ||
            (line[3] && line[3] != '\n' && line[3] != '\r')) {
            ctl_err("not confirmed; nothing was changed");
            return CTL_EXIT_USAGE;
        }
    }
    cJSON *req = ctl_req_new("settle_discrepancy");
    ctl_req_int(req, "discrepancy_id", id);
    ctl_req_str(req, "action", action);
    ctl_req_str(req, "reason", reason);
    if (x->optset[O_ACCOUNT]) {
        if (!proto_valid_account(x->optval[O_ACCOUNT], strlen(x->optval[O_ACCOUNT]))) {
            cJSON_Delete(req);
            return ctl_usage_error(cmd, "--account must be 1-64 characters of A-Z a-z 0-9 . _ : -");
        }
        ctl_req_str(req, "account", x->optval[O_ACCOUNT]);
    }
    return ctl_call_print(x, req, NULL);
}

/* ------------------------------------------------------------------ audit */

static void print_offenders(const cJSON *offenders)
{
    static const char *const headers[] = { "check", "account", "subject", "detail" };
    static const char *const keys[] = { "check", "account", "subject", "detail" };
    static const bool right[] = { false, false, false, false };
    ctl_print_rows(offenders, PC_ARRAY_LEN(headers), headers, keys, right);
}

/* The audit straight from PostgreSQL (pc_audit, sql/006_reconciliation.sql). */
static int audit_db(const ctl_ctx *x, const char *account, cJSON **out)
{
    PGconn *db = ctl_db_connect(x);
    if (!db)
        return CTL_EXIT_UNREACHABLE;
    const char *params[1] = { account };
    PGresult *res = PQexecParams(db, "SELECT check_name, account_id, subject, detail FROM pc_audit($1)", 1, NULL,
                                 params, NULL, NULL, 0);
    int rc = CTL_EXIT_OK;
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        char *m = ctl_pq_message(PQerrorMessage(db));
        ctl_err("database: %s", m);
        free(m);
        rc = CTL_EXIT_ERROR;
    } else {
        cJSON *arr = cJSON_CreateArray();
        static const char *const names[] = { "check", "account", "subject", "detail" };
        for (int i = 0; arr && i < PQntuples(res); i++) {
            cJSON *o = cJSON_CreateObject();
            if (!o || !cJSON_AddItemToArray(arr, o))
                ctl_oom();
            for (int f = 0; f < 4; f++)
                cJSON_AddStringToObject(o, names[f], PQgetvalue(res, i, f));
        }
        if (!arr)
            ctl_oom();
        *out = arr;
    }
    PQclear(res);
    PQfinish(db);
    return rc;
}

int ctl_cmd_audit(ctl_ctx *x)
{
    const char *account = x->optset[O_ACCOUNT] ? x->optval[O_ACCOUNT] : NULL;
    if (account && !proto_valid_account(account, strlen(account)))
        return ctl_usage_error(ctl_find_cmd("audit"), "--account must be 1-64 characters of A-Z a-z 0-9 . _ : -");
    cJSON *offenders = NULL;
    cJSON *owned = NULL;
    ctl_reply r = { 0 };
    int rc;
    if (x->optset[O_DB]) {
        rc = audit_db(x, account, &owned);
        offenders = owned;
    } else {
        cJSON *req = ctl_req_new("audit");
        if (account)
            ctl_req_str(req, "account", account);
        rc = call_ok(x, req, &r);
        if (!rc)
            offenders = cJSON_GetObjectItemCaseSensitive(r.result, "offenders");
    }
    if (!rc) {
        int n = cJSON_GetArraySize(offenders);
        if (x->json) {
            cJSON *o = cJSON_CreateObject();
            cJSON_AddBoolToObject(o, "ok", n == 0);
            cJSON_AddItemToObject(o, "offenders", cJSON_Duplicate(offenders, true));
            ctl_print_json(o);
            cJSON_Delete(o);
        } else if (n == 0) {
            printf("audit ok: every balance is the sum of its ledger entries, none is negative, and every "
                   "succeeded payment has exactly one debit entry\n");
        } else {
            print_offenders(offenders);
        }
        if (n > 0)
            rc = CTL_EXIT_ERROR;
    }
    cJSON_Delete(owned);
    ctl_reply_free(&r);
    return rc;
}
