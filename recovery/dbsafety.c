/* dbsafety.c - the replication safety check (dbsafety.h); its SQL is
 * store_replication_facts() in db/. */
#include "dbsafety.h"
#include "ctx.h"
#include "log.h"
#include "loop.h"
#include "nodelock.h"
#include "store.h"

#include <stdint.h>
#include <stdio.h>
#include <string.h>

static repl_state state;
static int standbys = -1, sync_standbys = -1;
static bool checking;
/* Bumped when the node lock is lost: a check answered by the server we had
 * before (maybe the old primary) says nothing about the next one. */
static uintptr_t gen;
static loop_timer timer;
static char refusal[256];

repl_state dbsafety_state(void) { return state; }
int dbsafety_standbys(void) { return standbys; }
int dbsafety_sync_standbys(void) { return sync_standbys; }

const char *dbsafety_state_name(repl_state s)
{
    switch (s) {
    case REPL_UNKNOWN: return "unknown";
    case REPL_NONE: return "none";
    case REPL_SYNCHRONOUS: return "synchronous";
    case REPL_WAITING: return "waiting";
    case REPL_ASYNCHRONOUS: return "asynchronous";
    case REPL_READ_ONLY: return "read_only";
    }
    return "?";
}

bool dbsafety_payments_allowed(const char **why)
{
    if (!D->cfg.require_synchronous_standby)
        return true;
    if (state == REPL_NONE || state == REPL_SYNCHRONOUS || state == REPL_WAITING)
        return true;
    if (why)
        *why = refusal;
    return false;
}

/* synchronous_commit at or above `on`: a commit returns only once every
 * synchronous standby has flushed it. */
static bool commit_waits(const char *sc)
{
    return !strcmp(sc, "on") || !strcmp(sc, "remote_apply");
}

static repl_state classify(const store_replication *f)
{
    if (f->in_recovery)
        return REPL_READ_ONLY;
    if (f->standbys == 0)
        return REPL_NONE;
    if (!f->sync_names[0] || !commit_waits(f->sync_commit))
        return REPL_ASYNCHRONOUS;
    /* Synchronous for our commits; when the standbys' states are visible,
     * a synchronous one must be among them or commits wait. */
    return f->sync_standbys == 0 ? REPL_WAITING : REPL_SYNCHRONOUS;
}

static void facts_cb(const store_replication *f, void *arg)
{
    if ((uintptr_t)arg != gen)
        return;                      /* stale: see gen */
    checking = false;
    if (f->st == ST_SHUTDOWN)
        return;
    repl_state was = state;
    if (f->st != ST_OK) {
        log_warn("dbsafety event=check_failed error=\"%s\"", f->errmsg ? f->errmsg : "");
        state = REPL_UNKNOWN;
        standbys = sync_standbys = -1;
        snprintf(refusal, sizeof(refusal), "the database's replication could not be checked "
                 "(require_synchronous_standby = true); nothing was charged");
    } else {
        state = classify(f);
        standbys = f->standbys;
        sync_standbys = f->sync_standbys;
        snprintf(refusal, sizeof(refusal),
                 state == REPL_READ_ONLY
                     ? "connected to a standby, not the primary; nothing was charged"
                     : "the database has a standby that is not synchronous for paycoord's commits "
                       "(synchronous_standby_names '%.40s', synchronous_commit %.16s): a failover could lose "
                       "payments (require_synchronous_standby = true); nothing was charged",
                 f->sync_names, f->sync_commit);
        if (state != was) {
            switch (state) {
            case REPL_ASYNCHRONOUS:
                log_warn("dbsafety event=replication_unsafe state=asynchronous standbys=%d sync_names=\"%s\" "
                         "synchronous_commit=%s detail=\"%s\" alert=config note=\"a failover to one of these standbys "
                         "can lose prepared debits and payments clients were told about; %s (docs/ha.md)\"",
                         f->standbys, f->sync_names, f->sync_commit, f->standby_list,
                         D->cfg.require_synchronous_standby ? "refusing payments (require_synchronous_standby)"
                                                            : "set synchronous_standby_names and "
                                                              "synchronous_commit = on");
                D->stats.alerts++;
                break;
            case REPL_READ_ONLY:
                log_warn("dbsafety event=replication_unsafe state=read_only alert=config note=\"connected to a standby: "
                         "add target_session_attrs=read-write to db_conninfo\"");
                D->stats.alerts++;
                break;
            case REPL_WAITING:
                log_warn("dbsafety event=replication_waiting standbys=%d sync_names=\"%s\" detail=\"%s\" "
                         "note=\"no synchronous standby connected: commits wait for one\"",
                         f->standbys, f->sync_names, f->standby_list);
                break;
            default:
                log_notice("dbsafety event=replication state=%s standbys=%d sync_standbys=%d sync_names=\"%s\" "
                           "synchronous_commit=%s detail=\"%s\"", dbsafety_state_name(state), f->standbys,
                           f->sync_standbys, f->sync_names, f->sync_commit, f->standby_list);
                break;
            }
        }
    }
    if (state != was)
        ctx_readiness_changed();
}

void dbsafety_check(void)
{
    if (checking)
        return;
    if (store_replication_facts(facts_cb, (void *)gen) == STORE_QUEUED)
        checking = true;
}

static void timer_cb(void *arg)
{
    (void)arg;
    dbsafety_check();
    loop_timer_start(&timer, D->cfg.db_safety_check_interval_ms);
}

/* The node lock was just taken: maybe on a new primary after a failover.
 * Lost: whatever the last check said was about that server; until the next
 * one is checked the state is unknown (require_synchronous_standby refuses). */
static void lock_cb(bool locked)
{
    if (locked) {
        dbsafety_check();
        return;
    }
    gen++;
    checking = false;
    if (state != REPL_UNKNOWN) {
        state = REPL_UNKNOWN;
        standbys = sync_standbys = -1;
        snprintf(refusal, sizeof(refusal), "the database's replication is being checked again after the node lock "
                 "was lost (require_synchronous_standby = true); nothing was charged");
        ctx_readiness_changed();
    }
}

int dbsafety_init(void)
{
    state = REPL_UNKNOWN;
    standbys = sync_standbys = -1;
    checking = false;
    snprintf(refusal, sizeof(refusal), "the database's replication has not been checked yet "
             "(require_synchronous_standby = true); nothing was charged");
    if (loop_timer_init(&timer, timer_cb, NULL) != 0 || nodelock_watch(lock_cb) != 0)
        return -1;
    loop_timer_start(&timer, D->cfg.db_safety_check_interval_ms);
    return 0;
}

void dbsafety_shutdown(void)
{
    loop_timer_deinit(&timer);
}

void dbsafety_health(cJSON *o)
{
    cJSON_AddStringToObject(o, "replication", dbsafety_state_name(state));
    if (standbys >= 0)
        cJSON_AddNumberToObject(o, "standbys", standbys);
    cJSON_AddBoolToObject(o, "replication_safe", state == REPL_NONE || state == REPL_SYNCHRONOUS ||
                                                     state == REPL_WAITING);
    cJSON_AddStringToObject(o, "node_lock", nodelock_state_name(nodelock_get_state()));
}
