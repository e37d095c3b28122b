/* nodelock.c - the node's advisory lock on a session of its own (nodelock.h). */
#include "nodelock.h"
#include "ctx.h"
#include "log.h"
#include "loop.h"
#include "store.h"

static bool locked, pending;
static loop_timer retry_timer;
static void (*lock_cb)(bool locked);

bool rec_node_locked(void) { return locked; }
void nodelock_set_cb(void (*cb)(bool)) { lock_cb = cb; }

static void set_locked(bool on)
{
    if (locked == on)
        return;
    locked = on;
    ctx_readiness_changed();
    if (lock_cb)
        lock_cb(on);
}

static void got_cb(st_status st, bool got, void *arg)
{
    (void)arg;
    pending = false;
    if (st == ST_SHUTDOWN)
        return;
    if (st == ST_OK && got) {
        log_notice("recovery event=node_lock_acquired node=%s", D->cfg.node_id);
        set_locked(true);
        return;
    }
    if (st == ST_OK) {
        log_error("recovery event=node_lock_busy node=%s alert=config "
                  "note=\"another live daemon holds this node id; not settling its gids, not taking payments\"",
                  D->cfg.node_id);
        D->stats.alerts++;
    }
    loop_timer_start(&retry_timer, D->cfg.recovery_interval_ms);
}

void nodelock_try(void)
{
    if (locked || pending || !store_lock_session_up())
        return;
    if (store_node_lock(D->cfg.node_id, got_cb, NULL) == STORE_QUEUED)
        pending = true;
    else
        loop_timer_start(&retry_timer, 100);
}

static void retry_cb(void *arg)
{
    (void)arg;
    nodelock_try();
}

static void session_cb(bool up)
{
    if (!up) {
        if (locked)
            log_warn("recovery event=node_lock_lost node=%s note=\"session ended; taking it again\"", D->cfg.node_id);
        set_locked(false);
        return;
    }
    nodelock_try();
}

int nodelock_init(void)
{
    locked = pending = false;
    if (loop_timer_init(&retry_timer, retry_cb, NULL) != 0)
        return -1;
    store_set_lock_cb(session_cb);
    return 0;
}

void nodelock_shutdown(void)
{
    loop_timer_deinit(&retry_timer);
    store_set_lock_cb(NULL);
    locked = pending = false;
}
