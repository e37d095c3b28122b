/* strmap.h - a string-keyed hash map (open chaining) for in-memory indexes:
 * payments in flight by idempotency key, accounts by id. Keys are copied. */
#ifndef PAYCOORD_STRMAP_H
#define PAYCOORD_STRMAP_H

#include "common.h"

typedef struct strmap strmap;

strmap *strmap_new(void);
void strmap_free(strmap *m);                 /* frees keys, not values */
void strmap_free_all(strmap *m);             /* frees keys and free()s every value */
void *strmap_get(const strmap *m, const char *key);
int strmap_put(strmap *m, const char *key, void *value) PC_MUSTCHECK;  /* 0, or -1 on OOM; replaces */
void *strmap_del(strmap *m, const char *key);   /* returns the removed value or NULL */
size_t strmap_count(const strmap *m);
/* Calls fn for every entry; fn must not modify the map. */
void strmap_each(const strmap *m, void (*fn)(const char *key, void *value, void *arg), void *arg);

#endif
