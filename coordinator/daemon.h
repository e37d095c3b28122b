/*
 * daemon.h - the one daemon context every module shares. paycoord is a single
 * event loop (libevent) on one thread: client sockets, the libpq pool and the
 * libcurl multi handle all run on it, so nothing here needs locking, and no
 * code on it may block.
 */
#ifndef PAYCOORD_DAEMON_H
#define PAYCOORD_DAEMON_H

#include "common.h"
#include "config.h"
#include "pgpool.h"
#include "psp.h"
#include "strmap.h"

#include <proto.h>
#include <sys/types.h>

struct event_base;
struct pc_client;

/* One request in progress. The op handler that receives it owns it and must
 * answer it exactly once with server_reply_ok/err, which frees it. If the
 * client goes away first, client becomes NULL and the answer is dropped. */
typedef struct pc_request {
    struct pc_client *client;
    struct pc_request *prev, *next;      /* the client's list of requests in progress */
    proto_request req;
    uid_t uid;
    gid_t gid;
    uint64_t started_us;
} pc_request;

typedef enum { CIRCUIT_CLOSED = 0, CIRCUIT_OPEN, CIRCUIT_HALF_OPEN } circuit_state;

#define PC_LAT_BUCKETS 16

typedef struct pc_stats {
    uint64_t requests;
    uint64_t errors_by_code[PROTO_ERR__COUNT];
    uint64_t payments_succeeded, payments_declined, payments_insufficient, payments_left_pending;
    uint64_t replays, credits_applied, credits_accepted;
    uint64_t processor_calls, processor_failures;
    uint64_t lat_buckets[PC_LAT_BUCKETS];    /* processor latency histogram, ms: <=1,2,4..., +Inf */
    double lat_sum_ms;
    uint64_t recoveries_committed, recoveries_rolled_back, recoveries_left, recovery_runs;
    uint64_t clients_accepted, clients_refused;
} pc_stats;

typedef struct pc_daemon {
    struct event_base *base;
    pc_config cfg;
    const char *config_path;
    char *token;
    pgpool *pool;
    pgpool *lockpool;              /* one session holding the node's advisory lock */
    psp_client *psp;

    bool shutting_down;
    int max_prepared_server;       /* SHOW max_prepared_transactions; -1 until known */
    int prepared_limit;            /* our share of it */
    int prepared;                  /* prepared transactions this daemon holds live */
    int orphans;                   /* prepared of ours not driven live (last recovery count) */

    circuit_state circuit;
    int consecutive_failures;
    uint64_t circuit_until_ms;
    bool processor_ok;

    int nclients;
    uint64_t started_ms;
    pc_stats stats;
} pc_daemon;

extern pc_daemon *D;

uint64_t pc_now_ms(void);              /* monotonic */
/* Called whenever something readiness depends on changes: sends READY=1
 * (systemd) once the daemon listens, has its database, its node lock and a
 * finished first recovery pass. */
void pc_readiness_changed(void);
uint64_t pc_now_us(void);              /* monotonic */
int64_t pc_wall_ms(void);              /* unix epoch ms */
void pc_format_time(int64_t wall_ms, char out[32]);   /* ISO-8601 UTC with ms */

/* server.c */
int server_start(void) PC_MUSTCHECK;
void server_stop_listening(void);
void server_close_all(void);
void server_reply_ok(pc_request *r, cJSON *result);
void server_reply_err(pc_request *r, proto_err code, const char *fmt, ...) PC_PRINTF(3, 4);

/* ops.c: dispatch of one parsed request */
void ops_dispatch(pc_request *r);

/* payment.c */
int pay_init(void) PC_MUSTCHECK;
void pay_shutdown(void);
void pay_flush(void);                /* write batched processor_refs now */
int pay_in_flight(void);
void pay_handle_pay(pc_request *r);
void pay_handle_status(pc_request *r);
void pay_handle_credit(pc_request *r);
void pay_handle_balance(pc_request *r);
void pay_handle_account_open(pc_request *r);
void pay_db_state_changed(bool up);
bool pay_gid_is_live(const char *gid);

/* recovery/recovery.c */
int rec_init(void) PC_MUSTCHECK;
void rec_shutdown(void);
bool rec_node_locked(void);          /* we hold our node's advisory lock */
bool rec_busy(void);                 /* a recovery pass is running */
bool rec_first_pass_done(void);      /* the startup pass has finished */
void rec_handle_prepared(pc_request *r);
void rec_handle_resolve(pc_request *r);
void rec_handle_recover(pc_request *r);
void rec_save_state(const char *gid, const char *payment_id, int attempts, const char *why, bool review);

/* Test-build crash points (docs/failure-modes.md): PAYCOORD_FAILPOINT=name
 * makes the daemon _exit(99) on reaching that point, for any payment or only
 * for the payment whose idempotency key is PAYCOORD_FAILPOINT_KEY. */
#ifdef PAYCOORD_FAILPOINTS
void failpoint(const char *name, const char *key);
bool failpoint_armed(const char *name, const char *key);
#define FAILPOINT(name, key) failpoint(name, key)
#else
#define FAILPOINT(name, key) ((void)0)
#endif

#endif
