/* owner.c - the gid ownership registry (owner.h). */
#include "owner.h"
#include "strmap.h"

#include <stdint.h>

static strmap *owners;          /* gid -> (void *)(uintptr_t)kind */

int owner_init(void)
{
    owners = strmap_new();
    return owners ? 0 : -1;
}

void owner_shutdown(void)
{
    strmap_free(owners);
    owners = NULL;
}

int owner_claim(const char *gid, owner_kind kind)
{
    if (owner_of(gid) != OWNER_NONE)
        return -1;
    return strmap_put(owners, gid, (void *)(uintptr_t)kind) == 0 ? 0 : -2;
}

void owner_release(const char *gid, owner_kind kind)
{
    if (owner_of(gid) == kind)
        strmap_del(owners, gid);
}

owner_kind owner_of(const char *gid)
{
    return owners ? (owner_kind)(uintptr_t)strmap_get(owners, gid) : OWNER_NONE;
}

const char *owner_kind_name(owner_kind kind)
{
    switch (kind) {
    case OWNER_PAYMENT: return "payment";
    case OWNER_RECOVERY: return "recovery";
    case OWNER_RESOLVE: return "resolve";
    case OWNER_NONE: break;
    }
    return "none";
}
