/*
 * nodelock.h - node ownership. Each daemon holds a session-level advisory
 * lock on its node id for its whole life, on a connection of its own; only
 * the holder settles the node's gids and takes payments. When that session
 * breaks the lock is gone with it, and is taken again as soon as a session is
 * back (the node keeps refusing payments meanwhile).
 */
#ifndef PAYCOORD_NODELOCK_H
#define PAYCOORD_NODELOCK_H

#include "common.h"

int nodelock_init(void) PC_MUSTCHECK;
void nodelock_shutdown(void);
/* Try to take the lock now if we do not hold it (no-op otherwise). */
void nodelock_try(void);
bool rec_node_locked(void);
/* Called with true when the lock is taken, false when it is lost. */
void nodelock_set_cb(void (*cb)(bool locked));

#endif
