/*
 * sim_map.h - a string-keyed hash map (separate chaining, so entries can be
 * removed): the idempotency-key table and the merchant-reference index of
 * the Stripe and Adyen modes. Keys are copied; values are owned by the
 * caller unless a free function is given.
 */
#ifndef PSP_SIM_MAP_H
#define PSP_SIM_MAP_H

#include "sim_util.h"

typedef struct sim_map sim_map;

/* free_value (may be NULL) is called on values removed or cleared. */
sim_map *sim_map_new(void (*free_value)(void *));
void sim_map_free(sim_map *m);
void sim_map_clear(sim_map *m);
size_t sim_map_count(const sim_map *m);

void *sim_map_get(const sim_map *m, const char *key, size_t len);
/* Sets key to value, freeing a value it replaces. */
void sim_map_put(sim_map *m, const char *key, size_t len, void *value);
/* Removes key (and frees its value); no-op when absent. */
void sim_map_del(sim_map *m, const char *key, size_t len);

#endif
