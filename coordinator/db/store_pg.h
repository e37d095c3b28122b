/*
 * store_pg.h - what the PostgreSQL implementation of the store (store.h)
 * shares between its files: the pools, and a small call record that carries a
 * typed callback through pgpool's untyped one. Not for use outside db/.
 */
#ifndef PAYCOORD_STORE_PG_H
#define PAYCOORD_STORE_PG_H

#include "pgpool.h"
#include "store.h"

/* Any callback, stored untyped; each wrapper casts it back to its own type. */
typedef void (*store_any_fn)(void);

typedef struct spg_call {
    store_any_fn fn;
    void *arg;
    char buf[64];                  /* small per-call data (a fence token, a gid) */
    int64_t n;
} spg_call;

spg_call *spg_call_new(store_any_fn fn, void *arg);

pgpool *spg_pool(store_chan ch);
/* The settings every pool of the daemon connects with (db_conninfo, timeouts,
 * lock_timeout, keepalives, tcp_user_timeout), for app_name, size, max_queue. */
pgpool_config spg_pool_config(const char *app_name, int size, int max_queue);
pgpool *spg_lock_pool(void);
bool spg_closing(void);
/* pgpool status -> store status (a connection lost while closing is a shutdown). */
st_status spg_status(const pgpool_reply *r);

/* Send, or free call and return the refusal (the callback never fires). */
int spg_query(store_chan ch, const char *sql, pgpool_cb cb, spg_call *call);
int spg_params(store_chan ch, const char *sql, int n, const char *const *values, pgpool_cb cb, spg_call *call);
/* Fire-and-forget statements: failures are logged under what. */
void spg_forget(store_chan ch, const char *what, const char *sql, int n, const char *const *values);

/* "t" -> true */
bool spg_bool(const PGresult *res, int row, int col);
int64_t spg_int(const PGresult *res, int row, int col);
/* NULL for SQL NULL, else the text */
const char *spg_text(const PGresult *res, int row, int col);

/* Columns of payments_view that a payment lookup reads (store_payment_row). */
/* The status a client is told from a row (see store.h, "Statuses"). */
#define SPG_READ_STATUS "CASE WHEN derived_status = 'succeeded' AND status = 'pending' THEN 'pending' ELSE derived_status END"

#define SPG_PAYMENT_COLUMNS \
    "payment_id::text, idempotency_key, gid, account_id, amount::text, currency, reference, " SPG_READ_STATUS ", " \
    "processor_ref, decline_code, " \
    "to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), " \
    "to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"

void spg_row(const PGresult *res, int row, store_payment_row *out);

/* store_pg_batch.c */
int spg_batch_init(void);
void spg_batch_shutdown(void);

#endif
