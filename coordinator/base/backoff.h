/* backoff.h - the one retry delay rule: exponential from `base_ms`, doubled per
 * attempt up to `cap_ms`, with equal jitter (half fixed, half random), so
 * that things that failed together do not come back together. */
#ifndef PAYCOORD_BACKOFF_H
#define PAYCOORD_BACKOFF_H

#include <stdint.h>

/* attempt 0 -> about base_ms; the result is in [d/2, d] for d = min(base * 2^attempt, cap). */
int backoff_ms(int64_t base_ms, int attempt, int64_t cap_ms);

#endif
