/*
 * failpoint.h - crash points for tests (test builds only, PAYCOORD_FAILPOINTS).
 * PAYCOORD_FAILPOINT=name makes the daemon _exit(99) on reaching that point,
 * for any payment or only for the one whose idempotency key is
 * PAYCOORD_FAILPOINT_KEY (docs/failure-modes.md lists the points).
 */
#ifndef PAYCOORD_FAILPOINT_H
#define PAYCOORD_FAILPOINT_H

#include "common.h"

#ifdef PAYCOORD_FAILPOINTS
void failpoint_init_from_env(void);
bool failpoint_armed(const char *name, const char *key);
void failpoint(const char *name, const char *key);
#define FAILPOINT(name, key) failpoint(name, key)
#else
static inline void failpoint_init_from_env(void) {}
static inline bool failpoint_armed(const char *name, const char *key) { (void)name; (void)key; return false; }
#define FAILPOINT(name, key) ((void)0)
#endif

#endif
