/*
 * pgpool_conn.h - the connection half of pgpool, private to pgpool.c and
 * pgpool_conn.c: how one slot of the pool connects (PQconnectStartParams /
 * PQconnectPoll with a timeout), is watched on the loop, fails, and waits to
 * reconnect with backoff. It knows nothing of queries or of the pool: the
 * pool hears that a slot came up from pgpool_conn_step()'s answer and of
 * socket activity through the io callback it registers in the connector.
 *
 * Slot lifecycle (pgpool_conn_set_state() is the only writer of c->state):
 *
 *   WAITING --timer/wake--> CONNECTING --PQconnectPoll OK--> SETUP --> IDLE <--> BUSY
 *      ^                        |                             |         ^        |
 *      |  failure/timeout       |                             |         |        | left in a transaction
 *      +------------------------+-----------------------------+         +-- ROLLBACK
 *      +--------- lost (EOF, send/recv error) from IDLE, BUSY, ROLLBACK
 *
 * SETUP runs the session settings every connection needs (standard_conforming_strings,
 * lock_timeout) as a statement rather than as startup `options`, which
 * pgbouncer refuses; the connect timeout covers it. IDLE, BUSY and ROLLBACK
 * are the pool's to set (pgpool.c), and so is the SETUP statement; this half
 * moves a slot from WAITING to CONNECTING to SETUP, from SETUP to IDLE
 * (pgpool_conn_setup_ok), and back to WAITING.
 */
#ifndef PAYCOORD_PGPOOL_CONN_H
#define PAYCOORD_PGPOOL_CONN_H

#include "common.h"

#include <event2/util.h>
#include <libpq-fe.h>

#define PGPOOL_MAX_HOSTS 16      /* hosts of a multi-host conninfo that attempts are rotated over */
#define PGPOOL_LIST_LEN 1024     /* longest host, hostaddr or port list rotated */

enum { PGPOOL_L_HOST, PGPOOL_L_HOSTADDR, PGPOOL_L_PORT, PGPOOL_NLISTS };

struct event;
struct event_base;
struct pgpool;
struct pgq;

typedef enum {
    CONN_WAITING,    /* no PGconn; the reconnect timer is pending */
    CONN_CONNECTING, /* PQconnectPoll in progress; the connect timeout is armed */
    CONN_SETUP,      /* connected; running the session settings (connect timeout still armed) */
    CONN_IDLE,       /* up, ready for a query */
    CONN_BUSY,       /* running a caller's query (c->q) */
    CONN_ROLLBACK,   /* running our own ROLLBACK after a caller left a transaction open */
    CONN_NSTATES
} conn_state;

/* What every slot of one pool shares: how to connect, and the counts. */
typedef struct pgpool_connector {
    struct event_base *base;
    const char **kw;        /* PQconnectStartParams arrays, NULL-terminated, owned */
    const char **val;
    int app_idx;            /* index of application_name in kw/val (-1: none); its value is set per attempt */
    char *app_name;         /* the prefix of fence tokens (NULL: none); owned */
    int connect_timeout_ms; /* per attempt and host (a multi-host conninfo gets this per host) */
    int nhosts;             /* hosts in the conninfo (>= 1) */
    /* A multi-host conninfo: the kw/val index of its host, hostaddr and port
     * lists (-1: absent) and their items; each attempt lists the host that
     * last took a connection first (pgpool_conn_start). */
    int list_idx[PGPOOL_NLISTS];
    int list_n[PGPOOL_NLISTS];
    char *list_item[PGPOOL_NLISTS][PGPOOL_MAX_HOSTS];   /* owned */
    char *setup_sql;        /* the SETUP statement; owned */
    int reconnect_min_ms;   /* backoff start */
    int reconnect_max_ms;   /* backoff cap */
    int lock_timeout_ms;    /* every session's lock_timeout (0: the server's) */
    /* Socket activity of a slot, in every state (the pool's dispatcher; arg is the pconn). */
    void (*io_cb)(evutil_socket_t fd, short what, void *arg);
    int nstate[CONN_NSTATES];    /* slots per state */
    uint64_t connect_failures;   /* attempts that failed or timed out */
    uint64_t reconnects;         /* successful connects of a slot that had been up before */
} pgpool_connector;

/* One slot. The query fields are the pool's; pgpool_conn_close() drops the
 * results with the connection they came from. */
typedef struct pconn {
    pgpool_connector *cx;
    struct pgpool *pool;    /* the owner, for the pool's callbacks */
    int id;
    conn_state state;
    PGconn *pg;
    struct event *io;       /* socket event; re-created whenever the fd or the interest changes */
    evutil_socket_t io_fd;
    short io_what;
    struct event *timer;    /* connect timeout (CONNECTING) or reconnect delay (WAITING) */
    struct pgq *q;          /* the caller's query while BUSY */
    bool flushing;          /* PQflush returned 1: also waiting for EV_WRITE */
    PGresult **res;         /* results of the running query, in order */
    int nres, res_cap;
    const char *err_state;  /* first error's SQLSTATE and message; point into res[] */
    const char *err_msg;
    const char *lost_why;   /* set when we give up on the connection ourselves */
    int failures;           /* consecutive failed attempts: the backoff exponent */
    bool ever_up;
    double attempt_ms;      /* when the current connect attempt started */
    double busy_since_ms;   /* when the running query was handed to libpq */
    char fence[96];         /* application_name of the current session ("" before any) */
    char lists[PGPOOL_NLISTS][PGPOOL_LIST_LEN];    /* this attempt's rotated host lists */
} pconn;

/* TCP settings added to the conninfo unless it sets them (0: leave libpq's). */
typedef struct pgpool_tcp {
    int keepalives_idle_s, keepalives_interval_s, keepalives_count;
    int user_timeout_ms;
} pgpool_tcp;

/* Turn conninfo into cx->kw/val with our forced settings (client_encoding
 * UTF8, the fence token when cx->app_name is set, the TCP settings of tcp the
 * conninfo does not set) and cx->setup_sql (standard_conforming_strings on,
 * cx->lock_timeout_ms); count its hosts. False, logged, on a conninfo libpq
 * cannot parse or out of memory. */
bool pgpool_conn_params(pgpool_connector *cx, const char *conninfo, const pgpool_tcp *tcp) PC_MUSTCHECK;
/* Free what pgpool_conn_params() and the caller put in cx (kw, val, app_name). */
void pgpool_conn_params_free(pgpool_connector *cx);

/* A fresh slot, WAITING, with its timer; false when out of memory. */
bool pgpool_conn_init(pconn *c, pgpool_connector *cx, struct pgpool *pool, int id) PC_MUSTCHECK;
/* Close the slot for good: its connection, timer and result buffer. */
void pgpool_conn_deinit(pconn *c);

/* Start a connect attempt now (WAITING -> CONNECTING, or back to WAITING). */
void pgpool_conn_start(pconn *c);
/* One PQconnectPoll step of a CONNECTING slot; true when it is now SETUP
 * (the pool sends cx->setup_sql next). */
bool pgpool_conn_step(pconn *c) PC_MUSTCHECK;
/* The SETUP statement succeeded: check the session and go IDLE. True when
 * the slot is up; false when it failed (then WAITING, logged). */
bool pgpool_conn_setup_ok(pconn *c) PC_MUSTCHECK;
/* A connect attempt (CONNECTING or SETUP) failed: close, count, WAITING. */
void pgpool_conn_attempt_failed(pconn *c, const char *why);
/* A WAITING slot starts its next attempt now instead of after its backoff;
 * a CONNECTING one that is trying another host than the one that last took
 * a connection (a dead one, maybe: a SYN to a vanished host waits out
 * tcp_user_timeout) starts again with that host first. */
void pgpool_conn_wake(pconn *c);
/* An established connection broke: if its host was the one attempts list
 * first, the next host of the conninfo is listed first from now on. */
void pgpool_conn_host_lost(const pconn *c);
/* Drop the PGconn, its socket event and its results; the state is unchanged. */
void pgpool_conn_close(pconn *c);
/* After pgpool_conn_close(): WAITING, reconnect after the backoff delay. */
void pgpool_conn_schedule_reconnect(pconn *c);
/* Watch the slot's socket for what (plus EV_PERSIST); false on failure. */
bool pgpool_conn_watch(pconn *c, short what) PC_MUSTCHECK;
void pgpool_conn_set_state(pconn *c, conn_state to);
void pgpool_conn_clear_results(pconn *c);
const char *pgpool_conn_state_name(conn_state s);

/* in as one line for a quoted log value: whitespace runs become one space,
 * double quotes single ones, trimmed. Returns out. */
const char *pgpool_squash(const char *in, char *out, size_t outlen);
/* The loop's clock in fractional milliseconds. */
double pgpool_now_ms(void);

#define PGPOOL_ERRBUF_LEN 512

#endif
