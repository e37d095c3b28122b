/*
 * paycoordctl.c - paycoordctl, the admin CLI: each command is one or two
 * requests on the daemon's NDJSON Unix socket (docs/protocol.md), printed as
 * psql-style tables for people or as the daemon's result object (--json) for
 * scripts. With --db, `prepared` reads pg_prepared_xacts straight from
 * PostgreSQL, so an operator can see what is in doubt while the daemon is
 * down. This file: the command line, the command table, help and dispatch
 * (ctl.h names the other files).
 */
#include "ctl.h"

#include "proto.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#define CTL_DEFAULT_SOCKET "/run/paycoord/paycoord.sock"
#define CTL_DEFAULT_TIMEOUT_MS INT64_C(30000)
#define CTL_TIMEOUT_MAX_MS INT64_C(86400000)     /* one day */

/* ------------------------------------------------------------------ values */

bool ctl_parse_nonneg_i64(const char *s, int64_t *out)
{
    if (!*s)
        return false;
    int64_t v = 0;
    for (const char *p = s; *p; p++) {
        if (*p < '0' || *p > '9')
            return false;
        int d = *p - '0';
        if (v > (INT64_MAX - d) / 10)
            return false;
        v = v * 10 + d;
    }
    *out = v;
    return true;
}

bool ctl_parse_pos_i64(const char *s, int64_t *out)
{
    return ctl_parse_nonneg_i64(s, out) && *out >= 1;
}

/* One or more <digits><unit> with unit ms, s, m or h. A bare number is
 * refused: its unit would be a guess. */
bool ctl_parse_duration(const char *s, int64_t max_ms, int64_t *out)
{
    int64_t total = 0;
    const char *p = s;
    if (!*p)
        return false;
    while (*p) {
        int64_t v = 0;
        const char *start = p;
        for (; *p >= '0' && *p <= '9'; p++) {
            if (v > (INT64_MAX - (*p - '0')) / 10)
                return false;
            v = v * 10 + (*p - '0');
        }
        if (p == start)
            return false;
        int64_t mult;
        if (p[0] == 'm' && p[1] == 's') {
            mult = 1;
            p += 2;
        } else if (*p == 's') {
            mult = 1000;
            p++;
        } else if (*p == 'm') {
            mult = 60000;
            p++;
        } else if (*p == 'h') {
            mult = 3600000;
            p++;
        } else {
            return false;
        }
        if (v > max_ms / mult || total > max_ms - v * mult)
            return false;
        total += v * mult;
    }
    *out = total;
    return true;
}

/* --timeout: seconds ("30", "2.5") or a duration ("500ms", "1m"); > 0. */
static bool parse_timeout(const char *s, int64_t *out)
{
    size_t n = strlen(s);
    if (n && s[n - 1] >= 'a' && s[n - 1] <= 'z')
        return ctl_parse_duration(s, CTL_TIMEOUT_MAX_MS, out) && *out > 0;
    int64_t whole = 0, frac = 0, scale = 1000;
    const char *p = s;
    if (*p < '0' || *p > '9')
        return false;
    for (; *p >= '0' && *p <= '9'; p++) {
        whole = whole * 10 + (*p - '0');
        if (whole > CTL_TIMEOUT_MAX_MS / 1000)
            return false;
    }
    if (*p == '.') {
        p++;
        if (*p < '0' || *p > '9')
            return false;
        for (; *p >= '0' && *p <= '9'; p++) {
            if (scale > 1) {
                scale /= 10;
                frac += (*p - '0') * scale;
            }
        }
    }
    if (*p)
        return false;
    *out = whole * 1000 + frac;
    return *out > 0 && *out <= CTL_TIMEOUT_MAX_MS;
}

/* ------------------------------------------------------------------ options and commands */

/* help: the line `help COMMAND` prints for an option of that command (the
 * global ones are in the overview). */
static const struct {
    const char *name;
    bool takes_value;
    const char *help;
} OPTIONS[O__COUNT] = {
    [O_SOCKET] = { "socket", true, NULL },
    [O_JSON] = { "json", false, NULL },
    [O_TIMEOUT] = { "timeout", true, NULL },
    [O_DB] = { "db", true, NULL },
    [O_HELP] = { "help", false, NULL },
    [O_VERSION] = { "version", false, NULL },
    [O_OLDER_THAN] = { "older-than", true, "--older-than DURATION  only those prepared at least this long ago" },
    [O_REASON] = { "reason", true, "--reason TEXT          why (required; recorded with your uid)" },
    [O_YES] = { "yes", false, "--yes                  do not ask for confirmation" },
    [O_REFERENCE] = { "reference", true, "--reference R          free text stored with it (at most 255 bytes)" },
    [O_WAIT_MS] = { "wait-ms", true, "--wait-ms N            how long the daemon waits for a final outcome" },
    [O_PAYMENT_ID] = { "payment-id", true, "--payment-id UUID      look up by payment id instead of KEY" },
    [O_NODE] = { "node", true, "--node NODE            settle a dead node's gids" },
    [O_FROM] = { "from", true, "--from TIME            start of the window (unix seconds, YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS]Z, UTC)" },
    [O_TO] = { "to", true, "--to TIME              end of the window (excluded), same forms" },
    [O_REPORT] = { "report", true, "--report FILE          Adyen: the settlement details report (CSV) to compare" },
    [O_WAIT] = { "wait", false, "--wait                 wait for the run to end and print its counts" },
    [O_ALL] = { "all", false, "--all                  resolved ones too" },
    [O_ACTION] = { "action", true, "--action A             credit, debit (a compensating ledger entry) or accept (none)" },
    [O_ACCOUNT] = { "account", true, "--account ACCOUNT      this account only" },
};

static int cmd_help(ctl_ctx *x);

static const ctl_cmd COMMANDS[] = {
    { "ping", "ping", "check that the daemon answers",
      "Ask the daemon for its version, protocol version and node id. A quick\n"
      "check that the socket is the right one and the daemon is alive.",
      "paycoordctl ping", 0, 0, 0, ctl_cmd_ping },
    { "health", "health", "readiness: database, processor, prepared slots (admin)",
      "Print readiness: ready (true when the daemon takes payments), database\n"
      "(up or down), processor (up, down or circuit_open), prepared (transactions\n"
      "now prepared) and max_prepared (the server's max_prepared_transactions).\n"
      "The exit status is 0 whenever the daemon answers; read 'ready' (with --json\n"
      "in scripts) to decide.",
      "paycoordctl --json health", 0, 0, 0, ctl_cmd_health },
    { "stats", "stats", "counters and gauges (admin)",
      "Print the daemon's counters and gauges: payments by outcome, in flight,\n"
      "prepared against max_prepared_transactions, pool use, processor latency and\n"
      "circuit state, recovery runs, clients and errors by code. Nested groups are\n"
      "shown as group.name.",
      "paycoordctl stats", 0, 0, 0, ctl_cmd_stats },
    { "prepared", "prepared [--older-than DURATION]", "list prepared transactions (admin)",
      "List every prepared transaction in the database, ours or foreign, oldest\n"
      "first, with its state:\n"
      "  in_flight  a request of the daemon is still driving it\n"
      "  in_doubt   the outcome is not known yet; recovery will settle it\n"
      "  review     recovery gave up: settle it by hand with 'resolve'\n"
      "  unknown    not a paycoord gid, or no payment row for it\n"
      "--older-than keeps those prepared at least DURATION ago (units ms, s, m, h;\n"
      "e.g. 500ms, 30s, 5m, 1h30m). With --db CONNINFO the list is read straight from\n"
      "PostgreSQL (pg_prepared_xacts joined with payments), so it works while the\n"
      "daemon is down; nothing is in_flight then.",
      "paycoordctl prepared --older-than 5m\n"
      "  paycoordctl --db 'host=/run/postgresql dbname=paycoord' prepared",
      0, 0, OB(O_OLDER_THAN), ctl_cmd_prepared },
    { "show", "show GID|KEY", "one payment and its prepared transaction",
      "Show one payment and, while it is still prepared, its prepared transaction.\n"
      "An argument starting with 'pc:' is a gid: it is looked up in the prepared\n"
      "list, and its payment through the payment id the gid holds. Anything else is\n"
      "an idempotency key. --json prints {\"payment\": ..., \"prepared\": ...}, either\n"
      "of which may be null.",
      "paycoordctl show pc:n1:3f2a1c9e0b7d4e8a9c1f2d3e4f5a6b7c\n"
      "  paycoordctl show order-123",
      1, 1, 0, ctl_cmd_show },
    { "resolve", "resolve GID commit|rollback --reason TEXT [--yes]", "settle a prepared transaction by hand (admin)",
      "Settle an in-doubt or review transaction by hand: commit (COMMIT PREPARED:\n"
      "the processor charged, keep the debit) or rollback (ROLLBACK PREPARED: the\n"
      "processor did not charge, release the funds). Check the processor first: the\n"
      "wrong choice loses money or leaves a charge without a debit. The reason\n"
      "(required, at most 500 bytes) is recorded with your uid. On a terminal it\n"
      "shows the transaction and asks you to type yes; without a terminal it refuses\n"
      "unless --yes is given.",
      "paycoordctl resolve pc:n1:3f2a1c9e0b7d4e8a9c1f2d3e4f5a6b7c commit \\\n"
      "      --reason 'PSP dashboard shows psp_8c1 succeeded (ticket OPS-12)'",
      2, 2, OB(O_REASON) | OB(O_YES), ctl_cmd_resolve },
    { "recover", "recover [--node NODE]", "run one recovery pass now (admin)",
      "Run one recovery pass now and print what it did: checked, committed,\n"
      "rolled_back and left (still undecided, retried later). --node settles the\n"
      "gids of another node whose daemon is dead (its lock is free); while that\n"
      "daemon lives the answer is forbidden.",
      "paycoordctl recover\n"
      "  paycoordctl recover --node n2", 0, 0, OB(O_NODE), ctl_cmd_recover },
    { "account", "account open ACCOUNT CURRENCY", "open an account (admin)",
      "Open ACCOUNT (1-64 characters of A-Z a-z 0-9 . _ : -) in CURRENCY (three\n"
      "upper-case letters) with balance 0. Fails with account_exists if it exists.",
      "paycoordctl account open acct-42 EUR", 3, 3, 0, ctl_cmd_account },
    { "balance", "balance ACCOUNT", "balance, held funds and pending credits",
      "Print the committed balance, the funds held by payments in flight and the\n"
      "credits accepted but not yet applied. Amounts are in minor units.",
      "paycoordctl balance acct-42", 1, 1, 0, ctl_cmd_balance },
    { "pay", "pay ACCOUNT AMOUNT CURRENCY KEY [--reference R] [--wait-ms N]", "debit and charge a payment",
      "Debit ACCOUNT by AMOUNT minor units (an integer: 1250 is 12.50 EUR) and charge\n"
      "it through the processor under idempotency KEY: running it again with the\n"
      "same KEY never charges twice, it returns the stored payment. --wait-ms: how\n"
      "long the daemon waits for a final outcome (0: answer once the funds are held;\n"
      "default from the daemon's configuration). Status pending means the outcome\n"
      "is not known yet; recovery settles it: check with 'status KEY'. Without\n"
      "--timeout, paycoordctl waits the wait (30 s, the daemon's default, without\n"
      "--wait-ms) plus 5 s. If the answer is lost, the payment may still happen:\n"
      "'status KEY' tells, and running the same command again is safe.",
      "paycoordctl pay acct-42 1250 EUR order-123 --reference 'order 123'",
      4, 4, OB(O_REFERENCE) | OB(O_WAIT_MS), ctl_cmd_pay },
    { "credit", "credit ACCOUNT AMOUNT CURRENCY KEY [--reference R]", "add funds to an account",
      "Add AMOUNT minor units to ACCOUNT under idempotency KEY. Status applied: in\n"
      "the balance now; accepted: durable and queued behind a payment in flight on\n"
      "the account, applied when that payment resolves.",
      "paycoordctl credit acct-42 10000 EUR topup-2026-11-22", 4, 4, OB(O_REFERENCE), ctl_cmd_credit },
    { "status", "status KEY | status --payment-id UUID", "look a payment up",
      "Print the payment stored under idempotency KEY, or with --payment-id the one\n"
      "with that payment id. Fails with not_found when there is none.",
      "paycoordctl status order-123\n"
      "  paycoordctl status --payment-id 3f2a1c9e-0b7d-4e8a-9c1f-2d3e4f5a6b7c",
      0, 1, OB(O_PAYMENT_ID), ctl_cmd_status },
    { "reconcile", "reconcile [--from TIME --to TIME] [--report FILE] [--wait] | reconcile status",
      "compare our books with the processor's (admin)",
      "Start a reconciliation run over a window (default: the last recon_window_s,\n"
      "24 h): the processor's own list of payments is compared with ours, matched by\n"
      "gid, and every difference is stored as a discrepancy ('discrepancies'). One\n"
      "run at a time across all nodes; a run that was interrupted is resumed first\n"
      "(the answer says resumed). With processor_api = adyen, --report names the\n"
      "settlement details report (CSV) to compare. --wait polls until the run ends and\n"
      "prints its counts (exit 1 if it failed). 'reconcile status' lists the latest\n"
      "runs with their progress. See docs/reconciliation.md.",
      "paycoordctl reconcile --from 2026-11-25 --to 2026-11-26 --wait\n"
      "  paycoordctl reconcile status",
      0, 1, OB(O_FROM) | OB(O_TO) | OB(O_REPORT) | OB(O_WAIT), ctl_cmd_reconcile },
    { "discrepancies", "discrepancies [--all]", "differences found by reconciliation (admin)",
      "List the open discrepancies (--all: resolved ones too): id, kind\n"
      "(charged_not_debited, debited_not_charged, amount_mismatch, unknown_gid,\n"
      "review), the gid, the account, our amount and the processor's, when last seen\n"
      "and what differs. --json gives both sides' evidence in full. What to do about\n"
      "each kind: docs/reconciliation.md.",
      "paycoordctl discrepancies", 0, 0, OB(O_ALL), ctl_cmd_discrepancies },
    { "settle-discrepancy", "settle-discrepancy ID --action credit|debit|accept --reason TEXT [--account A] [--yes]",
      "settle a discrepancy by hand (admin)",
      "Settle discrepancy ID: debit or credit posts a compensating ledger entry (a\n"
      "new entry with its own reason, never an edit) of the amount the discrepancy\n"
      "calls for, on its account; accept records that it needs no entry (e.g. it was\n"
      "refunded at the processor). A debit the balance cannot cover is refused, as is\n"
      "an action the wrong way round. --account names the account when neither side\n"
      "does (an Adyen settlement report names none). The audit row (your uid, the\n"
      "reason) is written before the action. Without a terminal it refuses unless\n"
      "--yes is given.",
      "paycoordctl settle-discrepancy 12 --action debit \\\n"
      "      --reason 'charge psp_8c1 lost in the restore of 26 Nov (ticket OPS-12)' --yes",
      1, 1, OB(O_ACTION) | OB(O_REASON) | OB(O_YES) | OB(O_ACCOUNT), ctl_cmd_settle_discrepancy },
    { "audit", "audit [--account ACCOUNT]", "check the ledger's invariants (admin)",
      "Check I1 (every balance is the sum of its ledger entries), I4 (no balance and\n"
      "no entry's balance_after is negative) and that every succeeded payment has\n"
      "exactly one debit entry (declined ones none, every applied credit one entry),\n"
      "for every account or one. Exit status 1 with the list of offenders. With --db\n"
      "CONNINFO it reads PostgreSQL directly (daemon not needed).",
      "paycoordctl audit\n"
      "  paycoordctl --db 'host=/run/postgresql dbname=paycoord' audit --account acct-42",
      0, 0, OB(O_ACCOUNT), ctl_cmd_audit },
    { "help", "help [COMMAND]", "this overview, or one command's help",
      "Print the overview of every command, or the usage, description and an\n"
      "example of COMMAND.",
      "paycoordctl help resolve", 0, 2, 0, cmd_help },
};

const ctl_cmd *ctl_find_cmd(const char *name)
{
    for (size_t i = 0; i < PC_ARRAY_LEN(COMMANDS); i++)
        if (strcmp(COMMANDS[i].name, name) == 0)
            return &COMMANDS[i];
    return NULL;
}

int ctl_usage_error(const ctl_cmd *cmd, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    ctl_verr(fmt, ap);
    va_end(ap);
    if (cmd)
        fprintf(stderr, "usage: paycoordctl [OPTIONS] %s\n       (paycoordctl help %s)\n",
                cmd->usage, cmd->name);
    else
        fputs("usage: paycoordctl [OPTIONS] COMMAND [ARGS]  (paycoordctl help)\n", stderr);
    return CTL_EXIT_USAGE;
}

/* ------------------------------------------------------------------ help */

static void print_overview(FILE *out)
{
    fputs("paycoordctl - admin CLI of paycoord, the two-phase-commit payment coordinator\n\n"
          "usage: paycoordctl [--socket PATH] [--json] [--timeout SEC] COMMAND [ARGS]\n"
          "       paycoordctl --db CONNINFO prepared [--older-than DURATION] | audit [--account A]\n"
          "       paycoordctl help [COMMAND] | --version\n\n"
          "commands:\n", out);
    for (size_t i = 0; i < PC_ARRAY_LEN(COMMANDS); i++)
        fprintf(out, "  %-9s %s\n", COMMANDS[i].name, COMMANDS[i].summary);
    fputs("\noptions (anywhere on the line; '--' ends options):\n"
          "  --socket PATH   the daemon's socket (default $PAYCOORD_SOCKET, else\n"
          "                  " CTL_DEFAULT_SOCKET ")\n"
          "  --json          print the daemon's result object as one JSON line\n"
          "  --timeout SEC   give up after SEC seconds (default 30, pay: its wait + 5;\n"
          "                  2.5, 500ms, 1m also)\n"
          "  --db CONNINFO   'prepared' and 'audit' straight from PostgreSQL (daemon not needed)\n"
          "  -h, --help      help; 'paycoordctl help COMMAND' for one command\n"
          "  --version       print the version\n\n"
          "exit status: 0 ok, 1 the daemon answered an error, 2 usage error,\n"
          "3 daemon unreachable (socket missing, connection refused, timeout)\n", out);
}

static void print_cmd_help(FILE *out, const ctl_cmd *c)
{
    fprintf(out, "usage: paycoordctl [OPTIONS] %s\n\n%s\n\nexample:\n  %s\n", c->usage, c->description, c->example);
    if (c->options & ~O_GLOBALS)
        fputs("\noptions:\n", out);
    for (int o = 0; o < O__COUNT; o++)
        if (c->options & ~O_GLOBALS & OB(o))
            fprintf(out, "  %s\n", OPTIONS[o].help);
    fputs("\nglobal options: --socket PATH, --json, --timeout SEC (paycoordctl help)\n", out);
}

static int cmd_help(ctl_ctx *x)
{
    if (x->nargs == 1) {
        print_overview(stdout);
        return CTL_EXIT_OK;
    }
    const ctl_cmd *c = ctl_find_cmd(x->args[1]);
    if (!c)
        return ctl_usage_error(NULL, "no command '%s'; 'paycoordctl help' lists them", x->args[1]);
    print_cmd_help(stdout, c);
    return CTL_EXIT_OK;
}

/* ------------------------------------------------------------------ main */

/* Options may come anywhere; "-h" is the one short option; other words that
 * start with '-' (a negative amount, say) stay arguments and meet their own
 * check; "--" ends options. Returns -1 to go on, else an exit status. */
static int parse_args(int argc, char **argv, ctl_ctx *x)
{
    bool options_done = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!options_done && strcmp(a, "--") == 0) {
            options_done = true;
            continue;
        }
        if (!options_done && strcmp(a, "-h") == 0) {
            x->optset[O_HELP] = true;
            continue;
        }
        if (!options_done && a[0] == '-' && a[1] == '-') {
            const char *name = a + 2, *eq = strchr(name, '=');
            size_t n = eq ? (size_t)(eq - name) : strlen(name);
            int o;
            for (o = 0; o < O__COUNT; o++)
                if (strlen(OPTIONS[o].name) == n && strncmp(OPTIONS[o].name, name, n) == 0)
                    break;
            if (o == O__COUNT)
                return ctl_usage_error(NULL, "unknown option '%s'", a);
            if (OPTIONS[o].takes_value) {
                if (eq)
                    x->optval[o] = eq + 1;
                else if (i + 1 < argc)
                    x->optval[o] = argv[++i];
                else
                    return ctl_usage_error(NULL, "option --%s needs a value", OPTIONS[o].name);
            } else if (eq) {
                return ctl_usage_error(NULL, "option --%s takes no value", OPTIONS[o].name);
            }
            x->optset[o] = true;
            continue;
        }
        if (!options_done && a[0] == '-' && a[1] && (a[1] < '0' || a[1] > '9'))
            return ctl_usage_error(NULL, "unknown option '%s'", a);
        if (x->nargs == CTL_MAX_ARGS)
            return ctl_usage_error(NULL, "too many arguments");
        x->args[x->nargs++] = a;
    }
    return -1;
}

int main(int argc, char **argv)
{
    ctl_ctx x;
    memset(&x, 0, sizeof(x));
    int rc = parse_args(argc, argv, &x);
    if (rc >= 0)
        return rc;
    if (x.optset[O_VERSION]) {
        printf("paycoordctl %s (protocol %d)\n", PAYCOORD_VERSION, PROTO_VERSION);
        return CTL_EXIT_OK;
    }
    const ctl_cmd *cmd = x.nargs ? ctl_find_cmd(x.args[0]) : NULL;
    if (x.optset[O_HELP]) {
        /* "pay --help", "-h pay", "help pay --help" and "help --help" alike. */
        const ctl_cmd *about = cmd && cmd->run == cmd_help && x.nargs > 1 ? ctl_find_cmd(x.args[1]) : cmd;
        if (about)
            print_cmd_help(stdout, about);
        else
            print_overview(stdout);
        return CTL_EXIT_OK;
    }
    if (!x.nargs) {
        print_overview(stderr);
        return CTL_EXIT_USAGE;
    }
    if (!cmd)
        return ctl_usage_error(NULL, "unknown command '%s'", x.args[0]);
    for (int o = 0; o < O__COUNT; o++)
        if (x.optset[o] && !(OB(o) & (O_GLOBALS | cmd->options)))
            return ctl_usage_error(cmd, "option --%s does not apply to '%s'", OPTIONS[o].name, cmd->name);
    int n = x.nargs - 1;
    if (n < cmd->min_args || n > cmd->max_args)
        return ctl_usage_error(cmd, "'%s' takes %s arguments", cmd->name,
                               n < cmd->min_args ? "more" : "fewer");
    if (x.optset[O_DB] && cmd->run != ctl_cmd_prepared && cmd->run != ctl_cmd_audit)
        return ctl_usage_error(cmd, "--db works only with 'prepared' and 'audit'");

    const char *env_sock = getenv("PAYCOORD_SOCKET");
    x.socket_path = x.optset[O_SOCKET] ? x.optval[O_SOCKET]
                    : (env_sock && env_sock[0]) ? env_sock : CTL_DEFAULT_SOCKET;
    x.json = x.optset[O_JSON];
    x.timeout_ms = CTL_DEFAULT_TIMEOUT_MS;
    if (x.optset[O_TIMEOUT]) {
        if (!parse_timeout(x.optval[O_TIMEOUT], &x.timeout_ms))
            return ctl_usage_error(cmd, "--timeout needs seconds > 0 such as 30, 2.5 or 500ms (got '%s')",
                                   x.optval[O_TIMEOUT]);
        x.timeout_explicit = true;
    }
    ctl_conn_init(&x.conn, x.socket_path, x.timeout_ms);

    rc = cmd->run(&x);
    ctl_conn_close(&x.conn);
    if (fflush(stdout) != 0 || ferror(stdout)) {
        ctl_err("cannot write the output: %s", strerror(errno));
        if (rc == CTL_EXIT_OK)
            rc = CTL_EXIT_ERROR;
    }
    return rc;
}
