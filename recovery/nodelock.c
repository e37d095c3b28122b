/* nodelock.c - the node's advisory lock on a session of its own (nodelock.h).
 *
 * Taking it: pg_try_advisory_lock on the lock session, then two checks before
 * the lock counts as held. A session lock only means something if every
 * statement of that session runs on the same server backend, which a pooler
 * in transaction mode (pgbouncer pool_mode = transaction) does not give:
 *   1. on the lock session, a second statement finds the lock held by its own
 *      backend (under transaction pooling it often runs on another one);
 *   2. from another connection, the lock's holder is a backend other than
 *      the one that statement runs on (under transaction pooling the other
 *      connection's statement often lands on the holder's backend).
 * Either failing means the lock cannot hold: the daemon refuses payments and
 * settles nothing (NODELOCK_POOLED), ends the stray holder and tries again
 * every recovery_interval_ms. The checks run again every
 * db_safety_check_interval_ms while the lock is held.
 *
 * Every acquisition bumps the epoch: whoever started work under the lock
 * (a recovery pass) can tell whether the lock it started under is still the
 * one held, after a failover took the lock session down and up again.
 */
#include "nodelock.h"
#include "ctx.h"
#include "log.h"
#include "loop.h"
#include "store.h"

#include <stdint.h>
#include <stdio.h>

#define MAX_WATCHERS 4

static bool locked, pending;
static nodelock_state state;
static uint64_t epoch;
/* Bumped whenever the lock session goes down or up: an answer to a request
 * of an earlier session (arg) is stale and ignored; pending is only ever
 * about requests of the current one. */
static uintptr_t gen;
static int holder_pid;               /* backend of the lock session that took the lock */
static loop_timer retry_timer, verify_timer;
static void (*lock_cb)(bool locked);
static void (*watchers[MAX_WATCHERS])(bool locked);

bool rec_node_locked(void) { return locked; }
nodelock_state nodelock_get_state(void) { return state; }
uint64_t nodelock_epoch(void) { return epoch; }
void nodelock_set_cb(void (*cb)(bool)) { lock_cb = cb; }

int nodelock_watch(void (*cb)(bool locked))
{
    for (int i = 0; i < MAX_WATCHERS; i++)
        if (!watchers[i] || watchers[i] == cb) {
            watchers[i] = cb;
            return 0;
        }
    return -1;
}

const char *nodelock_state_name(nodelock_state s)
{
    switch (s) {
    case NODELOCK_WAITING: return "waiting";
    case NODELOCK_HELD: return "held";
    case NODELOCK_BUSY: return "busy";
    case NODELOCK_POOLED: return "transaction_pooling";
    }
    return "?";
}

static void set_locked(bool on)
{
    state = on ? NODELOCK_HELD : state == NODELOCK_HELD ? NODELOCK_WAITING : state;
    if (locked == on)
        return;
    locked = on;
    if (on) {
        epoch++;
        loop_timer_start(&verify_timer, D->cfg.db_safety_check_interval_ms);
    } else {
        loop_timer_stop(&verify_timer);
    }
    ctx_readiness_changed();
    if (lock_cb)
        lock_cb(on);
    for (int i = 0; i < MAX_WATCHERS; i++)
        if (watchers[i])
            watchers[i](on);
}

static void retry_in(int ms)
{
    loop_timer_start(&retry_timer, ms);
}

/* The lock cannot hold through this connection path. */
static void pooled(const char *why, int stray_pid)
{
    if (state != NODELOCK_POOLED) {
        log_error("recovery event=node_lock_unreliable node=%s alert=config reason=\"%s\" "
                  "note=\"the database connection runs statements of one session on different server sessions "
                  "(a pooler in transaction mode, e.g. pgbouncer pool_mode = transaction): the node lock cannot "
                  "hold; not settling, not taking payments. Use session pooling or connect directly (docs/ha.md)\"",
                  D->cfg.node_id, why);
        D->stats.alerts++;
    }
    set_locked(false);
    state = NODELOCK_POOLED;
    ctx_readiness_changed();
    if (stray_pid > 0)
        store_node_lock_evict(D->cfg.node_id, stray_pid);
    (void)store_node_unlock(D->cfg.node_id);
    retry_in(D->cfg.recovery_interval_ms);
}

/* ---------------------------------------------------------------- checks */

#define GEN ((void *)gen)
#define STALE(arg) ((uintptr_t)(arg) != gen)

/* A check that could not be made: held, verify again shortly; not held,
 * try to take it again. */
static void check_again_soon(void)
{
    if (locked)
        loop_timer_start(&verify_timer, 200);
    else
        retry_in(100);
}

static void holder_cb(st_status st, int my_pid, int holder, void *arg)
{
    if (STALE(arg))
        return;
    pending = false;
    if (st == ST_SHUTDOWN)
        return;
    if (st != ST_OK) {
        /* Cannot tell now: keep what we have (the lock session itself still
         * reports the lock as its own) and look again shortly. */
        log_info("recovery event=node_lock_check_deferred node=%s status=%d", D->cfg.node_id, (int)st);
        check_again_soon();
        return;
    }
    if (holder == 0 || holder != holder_pid || my_pid == holder) {
        char why[200];
        if (my_pid == holder)
            snprintf(why, sizeof(why), "a statement of another connection ran on backend %d, which holds the lock "
                     "taken by the lock session", holder);
        else
            snprintf(why, sizeof(why), "seen from another connection, the lock is held by backend %d, not by the "
                     "lock session's backend %d", holder, holder_pid);
        pooled(why, my_pid == holder ? holder : 0);
        return;
    }
    if (!locked)
        log_notice("recovery event=node_lock_acquired node=%s backend_pid=%d", D->cfg.node_id, holder_pid);
    set_locked(true);
}

static void check_from_elsewhere(void)
{
    int rc = store_node_lock_holder(CH_REC, D->cfg.node_id, holder_cb, GEN);
    if (rc == STORE_UNAVAILABLE)
        rc = store_node_lock_holder(CH_PAY, D->cfg.node_id, holder_cb, GEN);
    if (rc == STORE_QUEUED) {
        pending = true;
        return;
    }
    check_again_soon();
}

static void own_check_cb(st_status st, int my_pid, bool held_by_me, void *arg)
{
    if (STALE(arg))
        return;
    pending = false;
    if (st == ST_SHUTDOWN)
        return;
    if (st != ST_OK) {
        /* The session broke (its state callback takes the lock away) or the
         * statement failed: take it again later. */
        if (!locked)
            retry_in(100);
        return;
    }
    if (!held_by_me || my_pid != holder_pid) {
        char why[160];
        snprintf(why, sizeof(why), "the lock session's statements ran on backends %d and %d; held there: %s",
                 holder_pid, my_pid, held_by_me ? "yes" : "no");
        pooled(why, 0);
        return;
    }
    check_from_elsewhere();
}

static void verify(void)
{
    if (pending)
        return;
    if (store_node_lock_check(D->cfg.node_id, own_check_cb, GEN) == STORE_QUEUED)
        pending = true;
    else if (!locked)
        retry_in(100);
}

static void verify_cb(void *arg)
{
    (void)arg;
    if (locked) {
        verify();
        loop_timer_start(&verify_timer, D->cfg.db_safety_check_interval_ms);
    }
}

/* ---------------------------------------------------------------- taking it */

static void got_cb(st_status st, bool got, int pid, void *arg)
{
    if (STALE(arg))
        return;
    pending = false;
    if (st == ST_SHUTDOWN)
        return;
    if (st == ST_OK && got) {
        holder_pid = pid;
        verify();
        return;
    }
    if (st == ST_OK && state == NODELOCK_POOLED) {
        /* The stray lock of the last try may not be gone yet: still pooled. */
    } else if (st == ST_OK) {
        if (state != NODELOCK_BUSY)
            log_error("recovery event=node_lock_busy node=%s alert=config "
                      "note=\"another live daemon holds this node id; not settling its gids, not taking payments\"",
                      D->cfg.node_id);
        state = NODELOCK_BUSY;
        D->stats.alerts++;
    }
    retry_in(D->cfg.recovery_interval_ms);
}

void nodelock_try(void)
{
    if (locked || pending || !store_lock_session_up() || loop_timer_pending(&retry_timer))
        return;
    if (store_node_lock(D->cfg.node_id, got_cb, GEN) == STORE_QUEUED)
        pending = true;
    else
        retry_in(100);
}

static void retry_cb(void *arg)
{
    (void)arg;
    nodelock_try();
}

static void session_cb(bool up)
{
    gen++;
    pending = false;
    if (!up) {
        if (locked)
            log_warn("recovery event=node_lock_lost node=%s note=\"session ended; taking it again\"", D->cfg.node_id);
        set_locked(false);
        if (state == NODELOCK_BUSY)
            state = NODELOCK_WAITING;
        return;
    }
    /* A new session (a restart or a failover: maybe a new primary): take the
     * lock at once, whatever backoff an earlier refusal left. */
    loop_timer_stop(&retry_timer);
    nodelock_try();
}

int nodelock_init(void)
{
    locked = pending = false;
    state = NODELOCK_WAITING;
    holder_pid = 0;
    if (loop_timer_init(&retry_timer, retry_cb, NULL) != 0 || loop_timer_init(&verify_timer, verify_cb, NULL) != 0)
        return -1;
    store_set_lock_cb(session_cb);
    return 0;
}

void nodelock_shutdown(void)
{
    loop_timer_deinit(&retry_timer);
    loop_timer_deinit(&verify_timer);
    store_set_lock_cb(NULL);
    locked = pending = false;
    state = NODELOCK_WAITING;
    for (int i = 0; i < MAX_WATCHERS; i++)
        watchers[i] = NULL;
}
