/* backoff.c - exponential backoff with equal jitter (backoff.h). */
#include "backoff.h"
#include "rng.h"

int backoff_ms(int64_t base_ms, int attempt, int64_t cap_ms)
{
    if (base_ms < 1)
        base_ms = 1;
    if (cap_ms < base_ms)
        cap_ms = base_ms;
    int64_t d = base_ms;
    for (int i = 0; i < attempt && d < cap_ms; i++)
        d *= 2;
    if (d > cap_ms)
        d = cap_ms;
    return (int)(d / 2 + (int64_t)rng_below((uint64_t)(d / 2 + 1)));
}
