/*
 * config.h - paycoord's settings. One table (config.c) describes every key:
 * name, type, default, bounds, whether SIGHUP reloads it, and its docs line.
 * It drives parsing, reload, `stats` output and docs/config.md
 * (`paycoord --config-reference` prints that page).
 */
#ifndef PAYCOORD_CONFIG_H
#define PAYCOORD_CONFIG_H

#include "common.h"
#include <stdio.h>

typedef struct pc_config {
    /* socket */
    char *listen_socket;
    int listen_mode;
    char *listen_group;
    int max_clients;
    int max_request_bytes;
    int max_client_pipeline;
    int client_output_limit;
    int client_partial_timeout_ms;
    /* permission classes (access.h): comma-separated numeric ids */
    char *admin_uids;
    char *admin_gids;
    char *credit_uids;
    char *credit_gids;
    char *pay_uids;
    char *pay_gids;
    char *read_uids;
    char *read_gids;
    char *client_uids;             /* 0.1 name: grants pay (and read) */
    char *client_gids;
    /* database */
    char *db_conninfo;
    int pool_size;
    int db_reconnect_max_ms;
    int db_lock_timeout_ms;
    int db_stuck_ms;
    int recovery_pool_size;
    int db_connect_timeout_ms;
    int db_keepalives_idle_s;
    int db_keepalives_interval_s;
    int db_keepalives_count;
    int db_tcp_user_timeout_ms;
    int db_safety_check_interval_ms;
    bool require_synchronous_standby;
    /* node */
    char *node_id;
    /* processor */
    char *processor_url;
    char *processor_token_file;
    int processor_connect_timeout_ms;
    int processor_timeout_ms;
    int processor_max_connections;
    bool processor_verify_peer;
    int processor_retries;
    int processor_retry_base_ms;
    int processor_poll_ms;
    int circuit_failures;
    int circuit_open_ms;
    /* processor adapters (docs/processors.md) */
    char *processor_api;           /* generic | stripe | adyen */
    char *webhook_listen;          /* HOST:PORT of the webhook listener */
    int webhook_max_bytes;
    char *stripe_payment_method;
    char *stripe_webhook_secret_file;
    int stripe_key_window_s;
    int stripe_search_lag_s;
    int stripe_webhook_tolerance_s;
    char *adyen_merchant_account;
    char *adyen_hmac_key_file;
    int adyen_webhook_timeout_s;
    /* payments */
    int pay_wait_ms;
    int payment_deadline_ms;
    int queue_timeout_ms;
    int max_in_flight;
    int max_account_queue;
    int prepared_share_percent;
    int64_t max_amount;
    int drain_timeout_ms;
    /* recovery */
    int recovery_interval_ms;
    int max_recovery_attempts;
    int processor_idempotency_window_s;
    /* reconciliation */
    char *recon_schedule;
    int recon_window_s;
    int recon_lag_s;
    int recon_slack_s;
    int recon_page_size;
    int recon_page_pause_ms;
    int recon_request_timeout_ms;
    char *recon_adyen_report;
    /* operations */
    bool allow_root;
    char *metrics_listen;
    /* logging */
    char *log_level;
    bool log_timestamps;
} pc_config;

#define CONFIG_MAX_IDS 256                  /* ids in one uid or gid list (per permission class) */
#define CONFIG_NO_ID UINT32_C(4294967295)   /* (uid_t)-1: never a valid id */

/* Append the numeric ids of a comma-separated list ("1001, 1002"; empty items
 * skipped) to ids[*n], at most max in all. -1 with "key: problem" in err. */
int config_parse_ids(const char *key, const char *list, uint32_t *ids, unsigned *n, unsigned max, char *err,
                     size_t errlen) PC_MUSTCHECK;

/* Fill *cfg with every default. */
void config_defaults(pc_config *cfg);
/* Parse FILE into *cfg (on top of defaults). On error returns -1 and writes
 * "FILE:LINE: key: problem" into err. */
int config_load(pc_config *cfg, const char *path, char *err, size_t errlen) PC_MUSTCHECK;
/* Cross-field checks (node_id shape, URL scheme, permission id lists, ...). */
int config_validate(const pc_config *cfg, char *err, size_t errlen) PC_MUSTCHECK;
void config_free(pc_config *cfg);
/* Copy the reloadable settings of src into dst; logs each change. */
void config_apply_reloadable(pc_config *dst, const pc_config *src);
/* The reference page (markdown) for docs/config.md. */
void config_print_reference(FILE *out);
/* The shipped configuration file: every setting commented out, with its
 * meaning and default (`paycoord --config-sample`, installed as paycoord.conf). */
void config_print_sample(FILE *out);

#endif
