/*
 * owner.h - who drives a gid right now, in this daemon: a live payment, a
 * recovery item, or an operator's resolve. Every driver claims the gid before
 * it touches the gid's prepared transaction or the processor, and releases it
 * when done; a claim on a gid someone else holds is refused. This is how the
 * payment path, recovery and resolve keep out of each other's way without
 * calling each other.
 */
#ifndef PAYCOORD_OWNER_H
#define PAYCOORD_OWNER_H

#include "common.h"

typedef enum { OWNER_NONE = 0, OWNER_PAYMENT, OWNER_RECOVERY, OWNER_RESOLVE } owner_kind;

int owner_init(void) PC_MUSTCHECK;
void owner_shutdown(void);
/* 0 claimed; -1 held by someone (owner_of tells who); -2 out of memory. */
int owner_claim(const char *gid, owner_kind kind) PC_MUSTCHECK;
/* Releases a claim of this kind (a no-op when the gid is held by another kind). */
void owner_release(const char *gid, owner_kind kind);
owner_kind owner_of(const char *gid);
const char *owner_kind_name(owner_kind kind);

#endif
