/*
 * dbsafety.h - is the database set up so that a failover cannot lose what
 * paycoord was told is durable? A prepared debit survives a promotion only
 * if the standby had it: with asynchronous replication a failover can lose a
 * PREPARE after the processor charged (money moved, no debit) and payments a
 * client was told about. The check runs when the node lock is taken (so also
 * on a new primary after a failover) and every db_safety_check_interval_ms:
 * standbys that are not synchronous for our commits are logged (an alert),
 * shown in `health` and the metrics, and with require_synchronous_standby =
 * true payments are refused (docs/ha.md).
 */
#ifndef PAYCOORD_DBSAFETY_H
#define PAYCOORD_DBSAFETY_H

#include "common.h"

#include <cjson/cJSON.h>

typedef enum {
    REPL_UNKNOWN = 0,     /* not checked yet, or the check failed */
    REPL_NONE,            /* no standby connected: nothing a failover could lose to */
    REPL_SYNCHRONOUS,     /* standbys, and our commits wait for a synchronous one */
    REPL_WAITING,         /* synchronous_standby_names set, but no synchronous standby connected:
                             commits wait (the database is stuck, nothing is lost) */
    REPL_ASYNCHRONOUS,    /* standbys, not synchronous for our commits: a failover can lose them */
    REPL_READ_ONLY        /* connected to a standby (no target_session_attrs=read-write?) */
} repl_state;

int dbsafety_init(void) PC_MUSTCHECK;
void dbsafety_shutdown(void);
/* Run the check now (it also runs by itself). */
void dbsafety_check(void);

repl_state dbsafety_state(void);
const char *dbsafety_state_name(repl_state s);
/* False while require_synchronous_standby refuses payments; *why (may be
 * NULL) gets the reason a client is told. */
bool dbsafety_payments_allowed(const char **why);
/* Connected standbys as of the last check (-1 unknown), and how many of them are synchronous
 * (-1: not visible to our role). */
int dbsafety_standbys(void);
int dbsafety_sync_standbys(void);
/* Adds the replication and node-lock fields to a `health` answer. */
void dbsafety_health(cJSON *o);

#endif
