/* rng.h - the daemon's one pseudo-random source (jitter, sampling; never
 * secrets): xorshift64*, seeded at start, reseedable so that a simulation
 * reproduces a run from its seed. */
#ifndef PAYCOORD_RNG_H
#define PAYCOORD_RNG_H

#include <stdint.h>

void rng_seed(uint64_t seed);
uint64_t rng_next(void);
/* Uniform in [0, n); 0 when n is 0. */
uint64_t rng_below(uint64_t n);

#endif
