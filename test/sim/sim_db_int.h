/*
 * sim_db_int.h - what the model of PostgreSQL (sim_db.c) and the store on
 * top of it (sim_store.c) share: the model's tables and one call to the
 * store, its parameters, its fate and its results.
 */
#ifndef PAYCOORD_SIM_DB_INT_H
#define PAYCOORD_SIM_DB_INT_H

#include "sim.h"
#include "store.h"

#include <stddef.h>

#define MAXA 16
#define MAXP 256
#define MAXL 512
#define MAXC 128
#define MAXR 256
#define MAXX 256

typedef struct prow {
    char payment_id[37], key[48], gid[72], account[24], currency[4], node[16];
    char status[24], decline_code[48], processor_ref[48];
    int64_t amount, created_ms, updated_ms, deadline_us, created_us;
} prow;

typedef struct acct {
    char id[24], currency[4];
    int64_t balance;                 /* with prepared debits already taken off */
} acct;

typedef struct lent {
    char payment_id[37], credit_id[37], account[24];
    int64_t amount;
} lent;

typedef struct cred {
    char credit_id[37], key[48], account[24], currency[4];
    int64_t amount;
    bool applied;
} cred;

typedef struct rst {
    char gid[72], payment_id[37], last_error[96];
    int attempts;
    bool review;
} rst;

typedef struct xact {
    char gid[72], payment_id[37], account[24];
    int64_t amount, prepared_us;
} xact;

typedef struct dbstate {
    int na, np, nl, nc, nr, nx;
    acct a[MAXA];
    prow p[MAXP];
    lent l[MAXL];
    cred c[MAXC];
    rst r[MAXR];
    xact x[MAXX];
    int64_t audits;
} dbstate;

/* ---------------------------------------------------------------- one call */

typedef enum {
    K_PHASE1, K_FACTS, K_FINISH, K_SETTLE, K_RECORD, K_FLAG, K_NOTE, K_FORGET, K_REF, K_BY_KEY, K_BY_ID,
    K_BALANCE, K_OPEN, K_CREDIT, K_CREDIT_BY_KEY, K_APPLY, K_APPLY_ALL, K_MAXPREP, K_COUNT, K_LOCK, K_UNLOCK,
    K_ALIVE, K_LIST, K_MARK, K_PLIST, K_RBEGIN, K_REND, K_LOCKCHK, K_HOLDER, K_EVICT, K_REPL
} kind;

typedef enum { F_OK = 0, F_LOST_BEFORE, F_LOST_AFTER, F_ZOMBIE, F_PARTIAL } fate;

typedef void (*store_any_fn_sim)(void);

typedef struct call {
    struct call *prev, *next;         /* every call alive (sim_db_reset frees what is left) */
    kind k;
    store_any_fn_sim cb;
    void *arg;
    uint64_t epoch, gen, session;
    fate fate;
    bool done;                        /* ran (effects applied) */
    bool killed;                      /* fenced (or the server died) before it ran */
    bool exec_pending;                /* its run is still scheduled */
    bool shutdown;                    /* answered "shutdown" (the daemon died) */
    bool answered;                    /* its answer was delivered (or dropped) */
    bool reply_scheduled;
    /* parameters */
    char s1[72], s2[72], s3[72], s4[72];
    int64_t n1, n2;
    bool b1;
    prow row;                         /* a read's row, as the statement saw it */
    store_pay pay;
    char pay_strs[7][72];
    /* results (filled when it runs) */
    int r_i;
    int64_t r_l;
    bool r_b, r_b2;
    char r_s[48];
    p1_outcome p1;
    p2_outcome p2;
    bool intent_written;
} call;

/* ---------------------------------------------------------------- the model (sim_db.c) */

/* Copy a string into a fixed field of the model; too long aborts the run. */
void sim_cpy(char *dst, size_t n, const char *src);
#define CPY(dst, src) sim_cpy(dst, sizeof(dst), src)

extern dbstate cur;                   /* the server's state as of now */
acct *acct_of(const char *id);
prow *row_by_id(const char *id);
prow *row_by_key(const char *key);
prow *row_by_gid(const char *gid);
xact *xact_of(const char *gid);
rst *rst_of(const char *gid);
bool debited(const char *payment_id);
const char *derived(const prow *r);
const char *read_status(const prow *r);

/* Run c's statements at the server (its effects, its results in c). */
void sim_db_run(call *c);
/* The server's generation: a crash bumps it, and calls of an older one are void. */
uint64_t sim_db_gen(void);
const sim_db_faults *sim_db_faults_get(void);
/* Whether the primary has a standby now (an asynchronous one, in failover seeds). */
bool sim_db_has_standby(void);

/* ---------------------------------------------------------------- the store (sim_store.c) */

/* Tell the daemon the database is up (true) or down (false). */
void sim_store_announce(bool on);
void sim_store_reset(void);

#endif
