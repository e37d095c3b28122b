/* failpoint.c - test-build crash points (failpoint.h). */
#include "failpoint.h"

#ifdef PAYCOORD_FAILPOINTS
#include "log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char *fp_name, *fp_key;

void failpoint_init_from_env(void)
{
    fp_name = getenv("PAYCOORD_FAILPOINT");
    if (fp_name && !fp_name[0])
        fp_name = NULL;
    fp_key = getenv("PAYCOORD_FAILPOINT_KEY");
    if (fp_key && !fp_key[0])
        fp_key = NULL;
    if (fp_name)
        log_warn("event=failpoint_armed name=%s", fp_name);
}

bool failpoint_armed(const char *name, const char *key)
{
    return fp_name && strcmp(fp_name, name) == 0 && (!fp_key || (key && strcmp(fp_key, key) == 0));
}

void failpoint(const char *name, const char *key)
{
    if (failpoint_armed(name, key)) {
        log_error("event=failpoint name=%s key=%s action=_exit", name, key ? key : "-");
        fflush(stderr);
        _exit(99);
    }
}
#else
typedef int failpoint_unused;   /* ISO C wants a non-empty translation unit */
#endif
