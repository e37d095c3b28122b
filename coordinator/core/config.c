/* config.c - the settings table and the `key = value` file parser (config.h). */
#include "config.h"
#include "log.h"

#include <errno.h>
#include <limits.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

typedef enum { T_STR, T_INT, T_INT64, T_BOOL, T_MODE } ctype;

typedef struct setting {
    const char *name;
    ctype type;
    size_t offset;
    const char *def;
    int64_t min, max;
    bool reloadable;
    const char *doc;
} setting;

#define OFF(f) offsetof(pc_config, f)

static const setting settings[] = {
    { "listen_socket", T_STR, OFF(listen_socket), "/run/paycoord/paycoord.sock", 0, 0, false,
      "Path of the Unix socket clients connect to (not used when systemd passes the socket: paycoord.socket's ListenStream= applies)." },
    { "listen_mode", T_MODE, OFF(listen_mode), "0660", 0, 0777, false,
      "File mode of the socket (octal; not used under socket activation)." },
    { "listen_group", T_STR, OFF(listen_group), "", 0, 0, false,
      "Group that owns the socket; empty keeps the daemon's group (not used under socket activation)." },
    { "max_clients", T_INT, OFF(max_clients), "1024", 1, 100000, true,
      "Connected clients beyond which a new connection gets `overloaded` and is closed." },
    { "max_request_bytes", T_INT, OFF(max_request_bytes), "65536", 256, 16777216, true,
      "Longest request line; longer gets `request_too_large` and the connection is closed." },
    { "max_client_pipeline", T_INT, OFF(max_client_pipeline), "1024", 1, 1000000, true,
      "Requests of one client in progress at once; beyond it the daemon stops reading that client." },
    { "client_output_limit", T_INT, OFF(client_output_limit), "4194304", 4096, 1073741824, true,
      "Bytes of unread replies a client may accumulate before it is disconnected." },
    { "client_partial_timeout_ms", T_INT, OFF(client_partial_timeout_ms), "10000", 100, 3600000, true,
      "A client that sends part of a line and then nothing for this long is disconnected." },
    { "admin_uids", T_STR, OFF(admin_uids), "", 0, 0, true,
      "Comma-separated uids granted the admin class (`account_open`, `prepared`, `resolve`, `recover`, `stats`, `health`, and the reconciliation ops `reconcile`, `reconcile_status`, `discrepancies`, `settle_discrepancy`, `audit`) and with it every other class. Root and the daemon's own uid always hold every class." },
    { "admin_gids", T_STR, OFF(admin_gids), "", 0, 0, true,
      "Comma-separated gids granted the admin class (and every other); matched against the peer's effective gid only." },
    { "credit_uids", T_STR, OFF(credit_uids), "", 0, 0, true,
      "Comma-separated uids granted the credit class (`credit`, plus read). Empty: only admins may credit. New after 0.1, where every peer allowed client ops could credit." },
    { "credit_gids", T_STR, OFF(credit_gids), "", 0, 0, true,
      "Comma-separated gids granted the credit class (plus read)." },
    { "pay_uids", T_STR, OFF(pay_uids), "", 0, 0, true,
      "Comma-separated uids granted the pay class (`pay`, plus read). While every `read_*`, `pay_*` and `client_*` list is empty, every peer that can open the socket holds pay and read." },
    { "pay_gids", T_STR, OFF(pay_gids), "", 0, 0, true,
      "Comma-separated gids granted the pay class (plus read)." },
    { "read_uids", T_STR, OFF(read_uids), "", 0, 0, true,
      "Comma-separated uids granted the read class (`ping`, `status`, `balance`); holders of pay, credit or admin have it too." },
    { "read_gids", T_STR, OFF(read_gids), "", 0, 0, true,
      "Comma-separated gids granted the read class." },
    { "client_uids", T_STR, OFF(client_uids), "", 0, 0, true,
      "The 0.1 name, still accepted: same as `pay_uids` (the lists add up). It no longer grants `credit`: put a depositing service in `credit_uids`." },
    { "client_gids", T_STR, OFF(client_gids), "", 0, 0, true,
      "The 0.1 name, still accepted: same as `pay_gids`; no longer grants `credit`." },
    { "db_conninfo", T_STR, OFF(db_conninfo), "dbname=paycoord", 0, 0, false,
      "libpq connection string of the database." },
    { "pool_size", T_INT, OFF(pool_size), "8", 1, 256, false,
      "PostgreSQL connections in the pool." },
    { "db_reconnect_max_ms", T_INT, OFF(db_reconnect_max_ms), "1000", 100, 600000, false,
      "Cap of the exponential reconnect backoff (with jitter). After a failover the first connection that reaches the new primary makes every other one try at once, so this bounds how long after the promotion payments resume (docs/ha.md)." },
    { "db_lock_timeout_ms", T_INT, OFF(db_lock_timeout_ms), "200", 1, 60000, false,
      "lock_timeout of every database session: no statement waits longer for a row lock (a debit on an account that another node's prepared transaction holds is retried later; nothing ever waits on a prepared transaction otherwise)." },
    { "db_stuck_ms", T_INT, OFF(db_stuck_ms), "10000", 100, 3600000, true,
      "A query of the payment pool running longer than this makes `health` report the database `stuck` (not ready)." },
    { "recovery_pool_size", T_INT, OFF(recovery_pool_size), "2", 1, 64, false,
      "PostgreSQL connections of recovery and the admin ops, apart from the payment path's pool, so that client traffic can never take them." },
    { "db_connect_timeout_ms", T_INT, OFF(db_connect_timeout_ms), "5000", 100, 600000, false,
      "Time a connection attempt may take, per host of a multi-host `db_conninfo` (`host=a,b target_session_attrs=read-write`: libpq tries the hosts in turn; docs/ha.md)." },
    { "db_keepalives_idle_s", T_INT, OFF(db_keepalives_idle_s), "3", 0, 86400, false,
      "TCP keepalives_idle of every database connection unless `db_conninfo` sets it (0: the system's). With the next three settings a server host that died without closing its connections is noticed within seconds over TCP; no effect on Unix sockets." },
    { "db_keepalives_interval_s", T_INT, OFF(db_keepalives_interval_s), "1", 0, 86400, false,
      "TCP keepalives_interval unless `db_conninfo` sets it (0: the system's)." },
    { "db_keepalives_count", T_INT, OFF(db_keepalives_count), "3", 0, 1000, false,
      "TCP keepalives_count unless `db_conninfo` sets it (0: the system's)." },
    { "db_tcp_user_timeout_ms", T_INT, OFF(db_tcp_user_timeout_ms), "4000", 0, 3600000, false,
      "TCP tcp_user_timeout unless `db_conninfo` sets it (0: the system's): how long sent data may stay unacknowledged, and a connect to a host that does not answer may take, before the connection is given up. Keep it below `db_connect_timeout_ms`." },
    { "db_safety_check_interval_ms", T_INT, OFF(db_safety_check_interval_ms), "10000", 1000, 3600000, true,
      "Interval of the replication safety check (also run whenever the database comes back): standbys that are not synchronous for paycoord's commits are logged, shown in `health` and the metrics (docs/ha.md)." },
    { "require_synchronous_standby", T_BOOL, OFF(require_synchronous_standby), "false", 0, 1, true,
      "Refuse payments (`unavailable`) while the primary has standbys that are not synchronous for paycoord's commits (`synchronous_standby_names` empty or `synchronous_commit` below `on`), or while that cannot be checked: a failover to such a standby can lose payments that were charged. A primary without any standby is allowed." },
    { "node_id", T_STR, OFF(node_id), "n1", 0, 0, false,
      "This daemon's node id (1-32 of A-Z a-z 0-9 _ -); part of every gid `pc:<node>:<payment>`." },
    { "processor_url", T_STR, OFF(processor_url), "http://127.0.0.1:8081", 0, 0, false,
      "Base URL of the payment processor (host names go through curl's threaded resolver, off the loop)." },
    { "processor_token_file", T_STR, OFF(processor_token_file), "/etc/paycoord/processor.token", 0, 0, false,
      "File holding the processor bearer token (one line); must not be readable by others." },
    { "processor_connect_timeout_ms", T_INT, OFF(processor_connect_timeout_ms), "1000", 10, 60000, false,
      "Processor connect timeout." },
    { "processor_timeout_ms", T_INT, OFF(processor_timeout_ms), "5000", 10, 600000, false,
      "Processor total request timeout; a timeout is an unknown outcome, never a decline." },
    { "processor_max_connections", T_INT, OFF(processor_max_connections), "0", 0, 100000, false,
      "Connections to the processor at most; 0 = max_in_flight. HTTP/1.1 carries one request per connection, so payments/s is capped at this divided by the processor's latency." },
    { "processor_verify_peer", T_BOOL, OFF(processor_verify_peer), "true", 0, 1, false,
      "Verify the processor's TLS certificate and host name." },
    { "processor_retries", T_INT, OFF(processor_retries), "3", 0, 100, true,
      "Retries of a create whose outcome is unknown (same key) before the payment is left in doubt." },
    { "processor_retry_base_ms", T_INT, OFF(processor_retry_base_ms), "100", 1, 60000, true,
      "First retry delay; doubles each attempt, with jitter." },
    { "processor_poll_ms", T_INT, OFF(processor_poll_ms), "500", 10, 600000, true,
      "Interval between status polls of a pending or in-doubt payment." },
    { "circuit_failures", T_INT, OFF(circuit_failures), "20", 1, 100000, true,
      "Consecutive processor failures that open the circuit." },
    { "circuit_open_ms", T_INT, OFF(circuit_open_ms), "5000", 100, 3600000, true,
      "How long the circuit stays open before a probe payment is let through." },
    /* processor adapters (docs/processors.md) */
    { "processor_api", T_STR, OFF(processor_api), "generic", 0, 0, false,
      "The processor's API: `generic` (the contract of docs/processor.md), `stripe` (PaymentIntents; processor_url e.g. https://api.stripe.com, token = the secret key) or `adyen` (Checkout; processor_url with the version, e.g. https://checkout-test.adyen.com/v71, token = the API key)." },
    { "webhook_listen", T_STR, OFF(webhook_listen), "127.0.0.1:8082", 0, 0, false,
      "HOST:PORT (numeric) where processor webhooks are received (stripe, adyen; required for adyen). Loopback by default: expose it through a TLS-terminating proxy. Empty: no listener." },
    { "webhook_max_bytes", T_INT, OFF(webhook_max_bytes), "262144", 4096, 16777216, false,
      "Largest webhook delivery accepted; a longer one is refused (413, by the HTTP layer: not counted in the webhook metrics)." },
    { "stripe_payment_method", T_STR, OFF(stripe_payment_method), "pm_card_visa", 0, 0, false,
      "stripe: the `payment_method` of a create when the pay request's metadata has no `payment_method` (the default is Stripe's test card). A replayed create must carry the first one's parameters: change it only with no payment in doubt." },
    { "stripe_webhook_secret_file", T_STR, OFF(stripe_webhook_secret_file), "", 0, 0, false,
      "stripe: file holding the webhook endpoint's signing secret (`whsec_...`); empty: Stripe webhooks are refused (the adapter works without them)." },
    { "stripe_key_window_s", T_INT, OFF(stripe_key_window_s), "86400", 60, 31536000, false,
      "stripe: how long Stripe keeps an idempotency key at least (it may prune keys 24 hours old); a create is replayed only inside it, and payment_deadline_ms must be shorter." },
    { "stripe_search_lag_s", T_INT, OFF(stripe_search_lag_s), "3600", 0, 86400, true,
      "stripe: how far behind Stripe's search may be (under a minute normally, up to an hour during outages). A search that finds no payment is conclusive only this long (plus processor_timeout_ms) after the payment's deadline." },
    { "stripe_webhook_tolerance_s", T_INT, OFF(stripe_webhook_tolerance_s), "300", 1, 86400, true,
      "stripe: webhooks whose signature timestamp is further than this from the clock are refused (Stripe's libraries use 300)." },
    { "adyen_merchant_account", T_STR, OFF(adyen_merchant_account), "", 0, 0, false,
      "adyen: the merchant account of every payment and cancel (required for adyen)." },
    { "adyen_hmac_key_file", T_STR, OFF(adyen_hmac_key_file), "", 0, 0, false,
      "adyen: file holding the webhook HMAC key in hex (required for adyen); notifications not signed with it are refused." },
    { "adyen_webhook_timeout_s", T_INT, OFF(adyen_webhook_timeout_s), "3600", 1, 2592000, true,
      "adyen: how long after a technical cancel was received the webhook deciding the payment may take; after that the payment goes to manual review." },
    { "pay_wait_ms", T_INT, OFF(pay_wait_ms), "30000", 0, 86400000, true,
      "Default time a `pay` waits for a final outcome after the debit is prepared." },
    { "payment_deadline_ms", T_INT, OFF(payment_deadline_ms), "60000", 1000, 86400000, true,
      "After this, an unsettled payment is canceled at the processor by its gid." },
    { "queue_timeout_ms", T_INT, OFF(queue_timeout_ms), "10000", 10, 3600000, true,
      "How long a payment may wait behind others on its account before it is refused with `overloaded` (nothing written)." },
    { "max_in_flight", T_INT, OFF(max_in_flight), "2000", 1, 1000000, true,
      "Payments in progress at once; beyond it `pay` answers `overloaded`. (The database queue is sized from the value at start.)" },
    { "max_account_queue", T_INT, OFF(max_account_queue), "1000", 1, 1000000, true,
      "Payments queued on one account at most." },
    { "prepared_share_percent", T_INT, OFF(prepared_share_percent), "80", 1, 100, true,
      "Share of the server's max_prepared_transactions this node may hold." },
    { "max_amount", T_INT64, OFF(max_amount), "1000000000000", 1, 1000000000000000LL, true,
      "Largest amount accepted, in minor units." },
    { "drain_timeout_ms", T_INT, OFF(drain_timeout_ms), "10000", 0, 3600000, true,
      "On SIGTERM, how long in-flight payments may finish before the daemon exits (the rest stay prepared for recovery)." },
    { "recovery_interval_ms", T_INT, OFF(recovery_interval_ms), "10000", 100, 86400000, true,
      "Interval of the periodic recovery pass." },
    { "max_recovery_attempts", T_INT, OFF(max_recovery_attempts), "50", 1, 1000000, true,
      "Recovery attempts on one payment before it goes to manual review." },
    { "processor_idempotency_window_s", T_INT, OFF(processor_idempotency_window_s), "86400", 1, 31536000, true,
      "For a processor without cancel-by-key: how long a key may still charge; recovery waits this out before rolling back." },
    { "recon_schedule", T_STR, OFF(recon_schedule), "03:00", 0, 0, true,
      "Time of day (HH:MM, UTC) of the daily reconciliation run; empty: no scheduled run (`paycoordctl reconcile` still works). See docs/reconciliation.md." },
    { "recon_window_s", T_INT, OFF(recon_window_s), "86400", 60, 2678400, true,
      "Length of the window a scheduled reconciliation run compares (it ends recon_lag_s before the scheduled time)." },
    { "recon_lag_s", T_INT, OFF(recon_lag_s), "3600", 0, 2678400, true,
      "How long before the scheduled time the window of a scheduled run ends, so that payments still in progress have settled (Adyen settlement reports lag by days: raise it there)." },
    { "recon_slack_s", T_INT, OFF(recon_slack_s), "600", 0, 86400, true,
      "The processor is listed this much beyond each end of the window, so that a payment whose clocks straddle an end is still matched." },
    { "recon_page_size", T_INT, OFF(recon_page_size), "500", 1, 1000, true,
      "Processor records per page of a reconciliation run (Stripe pages hold at most 100); each page is one transaction." },
    { "recon_page_pause_ms", T_INT, OFF(recon_page_pause_ms), "5", 0, 60000, true,
      "Pause between two pages of a reconciliation run; while the payment pool has queued queries the run waits longer (it yields to payments)." },
    { "recon_request_timeout_ms", T_INT, OFF(recon_request_timeout_ms), "30000", 100, 600000, true,
      "Timeout of one list request to the processor during reconciliation." },
    { "recon_adyen_report", T_STR, OFF(recon_adyen_report), "", 0, 0, true,
      "processor_api = adyen: path of the settlement details report (CSV) a scheduled run reads; empty: scheduled runs are skipped (run `paycoordctl reconcile --report FILE`)." },
    { "allow_root", T_BOOL, OFF(allow_root), "false", 0, 1, false,
      "Allow running as root (refused otherwise; run as a dedicated user)." },
    { "metrics_listen", T_STR, OFF(metrics_listen), "", 0, 0, false,
      "Loopback HOST:PORT for Prometheus metrics (GET /metrics); empty disables." },
    { "log_level", T_STR, OFF(log_level), "info", 0, 0, true,
      "error, warning, notice, info or debug." },
    { "log_timestamps", T_BOOL, OFF(log_timestamps), "true", 0, 1, true,
      "Add ts= to each line (journald stamps lines itself; set false under systemd)." },
};

static void *field(pc_config *cfg, const setting *s) { return (char *)cfg + s->offset; }

static int set_value(pc_config *cfg, const setting *s, const char *v, char *err, size_t errlen)
{
    char *end;
    switch (s->type) {
    case T_STR: {
        char **p = field(cfg, s);
        char *copy = strdup(v);
        if (!copy) {
            snprintf(err, errlen, "out of memory");
            return -1;
        }
        free(*p);
        *p = copy;
        return 0;
    }
    case T_INT:
    case T_INT64:
    case T_MODE: {
        errno = 0;
        long long n = strtoll(v, &end, s->type == T_MODE ? 8 : 10);
        if (errno || end == v || *end || n < s->min || n > s->max) {
            if (s->type == T_MODE)
                snprintf(err, errlen, "must be an octal mode from 0 to 0777");
            else
                snprintf(err, errlen, "must be an integer from %lld to %lld",
                         (long long)s->min, (long long)s->max);
            return -1;
        }
        if (s->type == T_INT64)
            *(int64_t *)field(cfg, s) = n;
        else
            *(int *)field(cfg, s) = (int)n;
        return 0;
    }
    case T_BOOL:
        if (!strcmp(v, "true") || !strcmp(v, "yes") || !strcmp(v, "on") || !strcmp(v, "1"))
            *(bool *)field(cfg, s) = true;
        else if (!strcmp(v, "false") || !strcmp(v, "no") || !strcmp(v, "off") || !strcmp(v, "0"))
            *(bool *)field(cfg, s) = false;
        else {
            snprintf(err, errlen, "must be true or false");
            return -1;
        }
        return 0;
    }
    return -1;
}

void config_defaults(pc_config *cfg)
{
    memset(cfg, 0, sizeof(*cfg));
    char err[128];
    for (size_t i = 0; i < PC_ARRAY_LEN(settings); i++)
        if (set_value(cfg, &settings[i], settings[i].def, err, sizeof(err)) != 0)
            abort();            /* a bad default is a programming error */
}

void config_free(pc_config *cfg)
{
    for (size_t i = 0; i < PC_ARRAY_LEN(settings); i++)
        if (settings[i].type == T_STR) {
            char **p = field(cfg, &settings[i]);
            free(*p);
            *p = NULL;
        }
}

static char *trim(char *s)
{
    while (*s == ' ' || *s == '\t')
        s++;
    size_t n = strlen(s);
    while (n && (s[n - 1] == ' ' || s[n - 1] == '\t' || s[n - 1] == '\r' || s[n - 1] == '\n'))
        s[--n] = '\0';
    return s;
}

int config_load(pc_config *cfg, const char *path, char *err, size_t errlen)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        return -1;
    }
    char line[4096];
    int lineno = 0, rc = 0;
    while (fgets(line, sizeof(line), f)) {
        lineno++;
        if (!strchr(line, '\n') && !feof(f)) {
            snprintf(err, errlen, "%s:%d: line too long", path, lineno);
            rc = -1;
            goto out;
        }
        char *s = trim(line);
        if (*s == '\0' || *s == '#')
            continue;
        char *eq = strchr(s, '=');
        if (!eq) {
            snprintf(err, errlen, "%s:%d: expected `key = value`", path, lineno);
            rc = -1;
            goto out;
        }
        *eq = '\0';
        char *key = trim(s), *val = trim(eq + 1);
        size_t vl = strlen(val);
        if (vl >= 2 && val[0] == '"' && val[vl - 1] == '"') {
            val[vl - 1] = '\0';
            val++;
        }
        const setting *st = NULL;
        for (size_t i = 0; i < PC_ARRAY_LEN(settings); i++)
            if (!strcmp(settings[i].name, key))
                st = &settings[i];
        if (!st) {
            snprintf(err, errlen, "%s:%d: unknown key '%.64s'", path, lineno, key);
            rc = -1;
            goto out;
        }
        char why[160];
        if (set_value(cfg, st, val, why, sizeof(why)) != 0) {
            snprintf(err, errlen, "%s:%d: %s: %s", path, lineno, key, why);
            rc = -1;
            goto out;
        }
    }
out:
    fclose(f);
    return rc;
}

int config_validate(const pc_config *cfg, char *err, size_t errlen)
{
    size_t n = strlen(cfg->node_id);
    if (n < 1 || n > 32 || strspn(cfg->node_id, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-") != n) {
        snprintf(err, errlen, "node_id: must be 1-32 of A-Z a-z 0-9 _ -");
        return -1;
    }
    if (log_level_parse(cfg->log_level) < 0) {
        snprintf(err, errlen, "log_level: must be error, warning, notice, info or debug");
        return -1;
    }
    if (strncmp(cfg->processor_url, "http://", 7) && strncmp(cfg->processor_url, "https://", 8)) {
        snprintf(err, errlen, "processor_url: must start with http:// or https://");
        return -1;
    }
    if (strcmp(cfg->processor_api, "generic") && strcmp(cfg->processor_api, "stripe") &&
        strcmp(cfg->processor_api, "adyen")) {
        snprintf(err, errlen, "processor_api: must be generic, stripe or adyen");
        return -1;
    }
    if (!strcmp(cfg->processor_api, "stripe") &&
        (int64_t)cfg->payment_deadline_ms >= (int64_t)cfg->stripe_key_window_s * 1000) {
        snprintf(err, errlen, "payment_deadline_ms: must be shorter than stripe_key_window_s (a create is "
                              "replayed only while Stripe keeps its key)");
        return -1;
    }
    if (cfg->recon_schedule[0]) {
        const char *t = cfg->recon_schedule;
        bool ok = strlen(t) == 5 && t[0] >= '0' && t[0] <= '2' && t[1] >= '0' && t[1] <= '9' && t[2] == ':' &&
                  t[3] >= '0' && t[3] <= '5' && t[4] >= '0' && t[4] <= '9' && (t[0] - '0') * 10 + (t[1] - '0') < 24;
        if (!ok) {
            snprintf(err, errlen, "recon_schedule: must be HH:MM (UTC, 00:00-23:59) or empty");
            return -1;
        }
    }
    if (!strcmp(cfg->processor_api, "adyen")) {
        if (!cfg->adyen_merchant_account[0]) {
            snprintf(err, errlen, "adyen_merchant_account: required with processor_api = adyen");
            return -1;
        }
        if (!cfg->adyen_hmac_key_file[0] || !cfg->webhook_listen[0]) {
            snprintf(err, errlen, "adyen_hmac_key_file, webhook_listen: required with processor_api = adyen "
                                  "(Adyen reports pending payments and cancels only by webhook)");
            return -1;
        }
    }
    if (!cfg->processor_token_file[0]) {
        snprintf(err, errlen, "processor_token_file: required (a file holding the processor's bearer token)");
        return -1;
    }
    if (cfg->db_tcp_user_timeout_ms > 0 && cfg->db_tcp_user_timeout_ms >= cfg->db_connect_timeout_ms) {
        snprintf(err, errlen, "db_tcp_user_timeout_ms: must be below db_connect_timeout_ms (%d), or a dead first "
                 "host of a multi-host db_conninfo would use up the whole attempt", cfg->db_connect_timeout_ms);
        return -1;
    }
    if (strlen(cfg->listen_socket) >= 108) {
        snprintf(err, errlen, "listen_socket: path longer than 107 bytes");
        return -1;
    }
    /* Id lists: numbers only; a class's lists add up (pay: pay_* and the 0.1
     * names client_*) and hold at most CONFIG_MAX_IDS each. */
    const struct { const char *key; const char *list; int group; } lists[] = {
        { "admin_uids", cfg->admin_uids, 0 }, { "admin_gids", cfg->admin_gids, 1 },
        { "credit_uids", cfg->credit_uids, 2 }, { "credit_gids", cfg->credit_gids, 3 },
        { "pay_uids", cfg->pay_uids, 4 }, { "client_uids", cfg->client_uids, 4 },
        { "pay_gids", cfg->pay_gids, 5 }, { "client_gids", cfg->client_gids, 5 },
        { "read_uids", cfg->read_uids, 6 }, { "read_gids", cfg->read_gids, 7 },
    };
    static uint32_t ids[8][CONFIG_MAX_IDS];
    unsigned count[8] = { 0 };
    for (size_t i = 0; i < PC_ARRAY_LEN(lists); i++)
        if (config_parse_ids(lists[i].key, lists[i].list ? lists[i].list : "", ids[lists[i].group],
                             &count[lists[i].group], CONFIG_MAX_IDS, err, errlen) != 0)
            return -1;
    return 0;
}

int config_parse_ids(const char *key, const char *list, uint32_t *ids, unsigned *n, unsigned max, char *err,
                     size_t errlen)
{
    const char *p = list;
    for (;;) {
        while (*p == ' ' || *p == '\t' || *p == ',')
            p++;
        if (!*p)
            return 0;
        const char *start = p;
        uint64_t v = 0;
        while (*p >= '0' && *p <= '9' && v < CONFIG_NO_ID) {
            v = v * 10 + (uint64_t)(*p - '0');
            p++;
        }
        if (p == start || v >= CONFIG_NO_ID || (*p && *p != ',' && *p != ' ' && *p != '\t')) {
            size_t len = strcspn(start, ", \t");
            snprintf(err, errlen, "%s: '%.*s' is not a number from 0 to %lu (names are not accepted)", key,
                     (int)(len > 32 ? 32 : len), start, (unsigned long)(CONFIG_NO_ID - 1));
            return -1;
        }
        if (*n >= max) {
            snprintf(err, errlen, "%s: more than %u ids in this class; grant a group instead", key, max);
            return -1;
        }
        ids[(*n)++] = (uint32_t)v;
    }
}

void config_apply_reloadable(pc_config *dst, const pc_config *src)
{
    for (size_t i = 0; i < PC_ARRAY_LEN(settings); i++) {
        const setting *s = &settings[i];
        if (!s->reloadable)
            continue;
        void *d = field(dst, s);
        const void *v = (const char *)src + s->offset;
        switch (s->type) {
        case T_STR:
            if (strcmp(*(char **)d, *(char *const *)v)) {
                log_notice("event=config_reload key=%s", s->name);
                char *copy = strdup(*(char *const *)v);
                if (copy) {
                    free(*(char **)d);
                    *(char **)d = copy;
                }
            }
            break;
        case T_INT:
        case T_MODE:
            if (*(int *)d != *(const int *)v) {
                log_notice("event=config_reload key=%s old=%d new=%d", s->name, *(int *)d, *(const int *)v);
                *(int *)d = *(const int *)v;
            }
            break;
        case T_INT64:
            if (*(int64_t *)d != *(const int64_t *)v) {
                log_notice("event=config_reload key=%s", s->name);
                *(int64_t *)d = *(const int64_t *)v;
            }
            break;
        case T_BOOL:
            if (*(bool *)d != *(const bool *)v) {
                log_notice("event=config_reload key=%s", s->name);
                *(bool *)d = *(const bool *)v;
            }
            break;
        }
    }
}

void config_print_reference(FILE *out)
{
    fprintf(out, "# Configuration reference\n\n"
                 "Generated by `paycoord --config-reference` from the settings table in\n"
                 "coordinator/config.c; a test keeps this page equal to its output.\n\n"
                 "The file holds `key = value` lines; `#` starts a comment line; a value may be\n"
                 "wrapped in double quotes. An unknown key or a bad value stops the daemon with\n"
                 "the file, line and key. Reloadable keys take effect on SIGHUP.\n\n"
                 "| key | default | reloadable | meaning |\n|---|---|---|---|\n");
    for (size_t i = 0; i < PC_ARRAY_LEN(settings); i++) {
        const setting *s = &settings[i];
        fprintf(out, "| `%s` | `%s` | %s | %s |\n", s->name, s->def[0] ? s->def : "(empty)",
                s->reloadable ? "yes" : "no", s->doc);
    }
    fprintf(out, "\n## Permission classes\n\n"
                 "Every op needs one class: **read** (`ping`, `status`, `balance`), **pay** (`pay`),\n"
                 "**credit** (`credit`), **admin** (`account_open`, `prepared`, `resolve`, `recover`,\n"
                 "`stats`, `health`). The `*_uids` and `*_gids` keys above grant them. Ids are\n"
                 "numbers (names are refused), at most %d uids and %d gids per class (`pay_*` and\n"
                 "`client_*` count together). The gid matched is the peer's effective gid from\n"
                 "`SO_PEERCRED` (supplementary groups do not count).\n\n"
                 "- root and the daemon's own uid hold every class; admin holds every class;\n"
                 "  pay and credit include read.\n"
                 "- read and pay are open to every peer that can open the socket while all of\n"
                 "  `read_*`, `pay_*` and `client_*` are empty; setting any of them makes both\n"
                 "  allow-lists. credit and admin are never open.\n"
                 "- A refused request gets `forbidden` naming the op and the missing class, and\n"
                 "  writes nothing. A reload applies to requests read after it; requests already\n"
                 "  running keep the permission they were admitted with.\n"
                 "- Upgrading from 0.1: `credit` is no longer allowed to every client peer; see\n"
                 "  docs/operations.md, \"Upgrading from 0.1\".\n",
            CONFIG_MAX_IDS, CONFIG_MAX_IDS);
}

/* One comment paragraph: "# " lines of at most 78 columns. */
static void print_comment(FILE *out, const char *text)
{
    const char *p = text;
    while (*p) {
        size_t len = strlen(p), cut = len;
        if (len > 76) {
            cut = 76;
            while (cut > 0 && p[cut] != ' ')
                cut--;
            if (cut == 0)               /* one word longer than a line */
                cut = strcspn(p, " ");
        }
        fprintf(out, "# %.*s\n", (int)cut, p);
        p += cut;
        while (*p == ' ')
            p++;
    }
}

void config_print_sample(FILE *out)
{
    fputs("# paycoord configuration: paycoord.conf(5).\n"
          "#\n"
          "# Generated by `paycoord --config-sample` from the daemon's settings table:\n"
          "# every setting, its meaning and its default, commented out. Uncomment a line\n"
          "# and change its value to override the default. `key = value`; `#` starts a\n"
          "# comment line; a value may be wrapped in double quotes. An unknown key or a\n"
          "# bad value stops the daemon with the file, line and key: check a change with\n"
          "#   sudo -u paycoord paycoord --config FILE --check-config\n"
          "# Reloadable settings take effect on SIGHUP (systemctl reload paycoord); the\n"
          "# others need a restart.\n"
          "#\n"
          "# The defaults fit a local PostgreSQL reached over its Unix socket as the\n"
          "# role named like the daemon's user (database paycoord, migrated with\n"
          "# paycoord-migrate). Before the first start, put the processor's bearer token\n"
          "# in processor_token_file (not shipped; mode 0600 owned by paycoord, or 0640\n"
          "# root:paycoord) and set processor_url.\n",
          out);
    for (size_t i = 0; i < PC_ARRAY_LEN(settings); i++) {
        const setting *s = &settings[i];
        char doc[512];
        snprintf(doc, sizeof(doc), "%s (%s)", s->doc, s->reloadable ? "reloadable" : "needs a restart");
        fputc('\n', out);
        print_comment(out, doc);
        fprintf(out, "#%s =%s%s\n", s->name, s->def[0] ? " " : "", s->def);
    }
}
