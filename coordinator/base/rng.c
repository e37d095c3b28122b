/* rng.c - xorshift64* (rng.h). */
#include "rng.h"

static uint64_t state = 0x9e3779b97f4a7c15ULL;

void rng_seed(uint64_t seed) { state = seed ? seed : 0x9e3779b97f4a7c15ULL; }

uint64_t rng_next(void)
{
    state ^= state >> 12;
    state ^= state << 25;
    state ^= state >> 27;
    return state * 2685821657736338717ULL;
}

uint64_t rng_below(uint64_t n) { return n ? rng_next() % n : 0; }
