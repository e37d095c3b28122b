/*
 * pgpool.h - a small pool of PostgreSQL connections driven only through
 * libpq's asynchronous API under libevent. Nothing here ever blocks the loop:
 * PQconnectStart/PQconnectPoll, PQsendQuery*, PQflush, PQconsumeInput,
 * PQisBusy, PQgetResult.
 *
 * Queries are queued FIFO and run on the first idle connection. A broken
 * connection is reconnected with exponential backoff (jitter); while no
 * connection is up, pgpool_query() refuses at once (PGPOOL_UNAVAILABLE) so
 * callers can answer `unavailable` without charging anything.
 *
 * Callback contract: when pgpool_query*() returns 0 the callback fires exactly
 * once, never from inside pgpool_query*() itself (always from the loop), with
 * every PGresult of the query string in order. The results are valid only
 * during the callback (the pool clears them afterwards). When it returns an
 * error the callback never fires. After the callback, if the connection is
 * left inside a transaction (e.g. an error in the middle of "BEGIN; ...;
 * PREPARE TRANSACTION"), the pool sends ROLLBACK before reusing it.
 */
#ifndef PAYCOORD_PGPOOL_H
#define PAYCOORD_PGPOOL_H

#include "common.h"
#include <libpq-fe.h>

struct event_base;
typedef struct pgpool pgpool;

typedef struct pgpool_config {
    const char *conninfo;         /* libpq conninfo string */
    int size;                     /* connections, >= 1 */
    int max_queue;                /* queued queries beyond which pgpool_query returns PGPOOL_OVERLOADED */
    int connect_timeout_ms;       /* per connection attempt */
    int reconnect_min_ms;         /* backoff start */
    int reconnect_max_ms;         /* backoff cap */
    /* Optional (zero/NULL: off). */
    int lock_timeout_ms;          /* every session runs with lock_timeout = this */
    const char *app_name;         /* application_name prefix; each connection attempt gets
                                     "<app_name>/<16 hex>", its fence token (see below) */
    /* TCP (ignored on Unix sockets), each added to the conninfo unless it
     * sets it; 0 leaves libpq's default: keepalives_idle, _interval (s),
     * _count, tcp_user_timeout (ms). */
    int keepalives_idle_s, keepalives_interval_s, keepalives_count;
    int tcp_user_timeout_ms;
} pgpool_config;

typedef enum {
    PGQ_OK = 0,        /* every statement ran; results[] holds them */
    PGQ_SQL_ERROR,     /* a statement failed: results[] up to and including the error; sqlstate/errmsg set */
    PGQ_CONN_LOST,     /* the connection broke; if sent is true the server may have run part or all of it */
    PGQ_SHUTDOWN       /* the pool was freed before the query ran (sent is false) */
} pgq_status;

typedef struct pgpool_reply {
    pgq_status status;
    PGresult **results;           /* nresults entries, in statement order */
    int nresults;
    const char *sqlstate;         /* 5-char SQLSTATE of the first error, or "" */
    const char *errmsg;           /* primary message of the first error, or "" */
    bool sent;                    /* whether any of it may have reached the server */
    double elapsed_ms;            /* queue + execution time */
    /* The connection's fence token (its application_name; "" if it never ran on
     * one): after PGQ_CONN_LOST with sent=true, the server session that may
     * still be running the query is the one whose application_name is this. */
    const char *fence;
} pgpool_reply;

typedef void (*pgpool_cb)(const pgpool_reply *reply, void *arg);

enum { PGPOOL_QUEUED = 0, PGPOOL_UNAVAILABLE = -1, PGPOOL_OVERLOADED = -2 };

pgpool *pgpool_new(struct event_base *base, const pgpool_config *cfg) PC_MUSTCHECK;
/* Frees the pool; queued queries get PGQ_SHUTDOWN, running ones PGQ_CONN_LOST with sent=true. */
void pgpool_free(pgpool *p);

/* Simple-query protocol: sql may hold several ';'-separated statements. */
int pgpool_query(pgpool *p, const char *sql, pgpool_cb cb, void *arg) PC_MUSTCHECK;
/* Extended protocol, one statement, text parameters (NULL value = SQL NULL). */
int pgpool_query_params(pgpool *p, const char *sql, int nparams, const char *const *values,
                        pgpool_cb cb, void *arg) PC_MUSTCHECK;

bool pgpool_is_up(const pgpool *p);    /* at least one connection usable */
int pgpool_size(const pgpool *p);
int pgpool_connected(const pgpool *p); /* connections up (idle or busy) */
int pgpool_busy(const pgpool *p);      /* connections running a query */
int pgpool_queued(const pgpool *p);    /* queries waiting for a connection */
/* Called whenever the pool goes from up to down or back (may be NULL). */
void pgpool_set_state_cb(pgpool *p, void (*cb)(bool up, void *arg), void *arg);
/* Connections waiting out their reconnect backoff try now (another pool on
 * the same database just connected: the server, or a new primary, is up). */
void pgpool_wake(pgpool *p);

/*
 * Additions (implementation notes that callers rely on):
 *
 * pgpool_new() returns NULL, after logging why, on an invalid config (size < 1,
 * max_queue < 0, connect_timeout_ms < 1, reconnect_min_ms < 1 or
 * reconnect_max_ms < reconnect_min_ms), a conninfo libpq cannot parse, or out
 * of memory. Any other trouble (server down, bad socket path, wrong password)
 * is not an error of pgpool_new(): the pool stays down and keeps retrying.
 *
 * Every connection runs with client_encoding=UTF8 and
 * standard_conforming_strings=on whatever the conninfo says (a server that
 * refuses them is a connect failure), and with application_name=paycoord
 * unless the conninfo or PGAPPNAME names one. standard_conforming_strings and
 * lock_timeout are set by a statement right after the connection is made,
 * before it takes queries (not as startup options, which pgbouncer refuses).
 * With a multi-host conninfo (host=a,b; libpq tries them in turn, e.g. with
 * target_session_attrs=read-write) connect_timeout_ms applies per host, and
 * each attempt lists first the host that last took a connection (any pool's),
 * or the next one once a connection to it broke (pgpool_conn.c).
 * conninfo is copied; the caller may free it after pgpool_new(). sql and
 * parameter values are copied too.
 *
 * max_queue bounds the queries that must wait for a busy connection: a query
 * is refused with PGPOOL_OVERLOADED when pgpool_queued() minus the idle
 * connections (which take queued queries on the next loop pass) has reached
 * max_queue. max_queue = 0 therefore means "never wait".
 *
 * PGQ_CONN_LOST replies carry no results (nresults 0); errmsg says why, and
 * sqlstate is the server's if it sent an error before closing (57P01 for
 * pg_terminate_backend or a fast shutdown; an immediate shutdown only sends a
 * warning, which is logged), "" otherwise. When the last connection goes,
 * every queued query gets PGQ_CONN_LOST with sent=false, then the state
 * callback fires with up=false. pgpool_free() fires no state callback.
 * COPY is not supported: a query that starts one loses its connection
 * (PGQ_CONN_LOST, sent=true).
 *
 * A callback may call pgpool_query*() (queued behind what is already waiting)
 * and pgpool_free(); after pgpool_free() inside a callback the pool is torn
 * down once that callback returns, and pgpool_query*() refuses meanwhile.
 */

/* Bad arguments: NULL pool, sql or cb, or nparams outside 0..65535. The callback never fires. */
enum { PGPOOL_INVALID = -3 };

typedef struct pgpool_counters {
    uint64_t queries;          /* accepted by pgpool_query*() */
    uint64_t rejected;         /* refused: PGPOOL_UNAVAILABLE or PGPOOL_OVERLOADED */
    uint64_t errors;           /* callbacks with PGQ_SQL_ERROR */
    uint64_t conn_lost;        /* callbacks with PGQ_CONN_LOST (sent or not) */
    uint64_t disconnects;      /* established connections that broke */
    uint64_t connect_failures; /* connection attempts that failed or timed out */
    uint64_t reconnects;       /* successful connects of a connection that had been up before */
    int max_queued;            /* high-water mark of pgpool_queued() */
} pgpool_counters;

/* How long the oldest query still running on a connection has run, in ms (0: none). */
int pgpool_oldest_busy_ms(const pgpool *p);

/* Copies the counters accumulated since pgpool_new(); cheap, no locking (one loop thread). */
void pgpool_stats(const pgpool *p, pgpool_counters *out);

#endif
