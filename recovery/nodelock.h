/*
 * nodelock.h - node ownership. Each daemon holds a session-level advisory
 * lock on its node id for its whole life, on a connection of its own; only
 * the holder settles the node's gids and takes payments. When that session
 * breaks the lock is gone with it, and is taken again as soon as a session is
 * back (the node keeps refusing payments meanwhile). Before the lock counts
 * as held, it is checked to be held by the lock session's own server backend
 * (nodelock.c): a pooler in transaction mode cannot keep a session lock.
 */
#ifndef PAYCOORD_NODELOCK_H
#define PAYCOORD_NODELOCK_H

#include "common.h"

#include <stdint.h>

typedef enum {
    NODELOCK_WAITING = 0,    /* no lock session, or taking it */
    NODELOCK_HELD,
    NODELOCK_BUSY,           /* another live session holds this node's lock */
    NODELOCK_POOLED          /* the connection path cannot hold a session lock (transaction pooling) */
} nodelock_state;

int nodelock_init(void) PC_MUSTCHECK;
void nodelock_shutdown(void);
/* Try to take the lock now if we do not hold it (no-op otherwise). */
void nodelock_try(void);
bool rec_node_locked(void);
nodelock_state nodelock_get_state(void);
const char *nodelock_state_name(nodelock_state s);
/* Incremented each time the lock is taken: work started under one epoch
 * must not settle anything once the epoch has changed (the lock was lost,
 * maybe to a failover, and taken again). */
uint64_t nodelock_epoch(void);
/* Called with true when the lock is taken, false when it is lost (recovery's). */
void nodelock_set_cb(void (*cb)(bool locked));
/* More listeners of the same (the payment path): -1 when there is no room. */
int nodelock_watch(void (*cb)(bool locked)) PC_MUSTCHECK;

#endif
