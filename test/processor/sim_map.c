/* sim_map.c - string-keyed hash map with removal (see sim_map.h). */
#include "sim_map.h"

#include <stdlib.h>
#include <string.h>

typedef struct entry {
    struct entry *next;
    void *value;
    uint64_t hash;
    size_t len;
    char key[];
} entry;

struct sim_map {
    entry **buckets;
    size_t nbuckets; /* a power of two */
    size_t count;
    void (*free_value)(void *);
};

static uint64_t hash_bytes(const char *k, size_t n)
{
    uint64_t h = 1469598103934665603ULL; /* FNV-1a */
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)k[i];
        h *= 1099511628211ULL;
    }
    return h ^ (h >> 31);
}

sim_map *sim_map_new(void (*free_value)(void *))
{
    sim_map *m = sim_xcalloc(1, sizeof(*m));
    m->nbuckets = 256;
    m->buckets = sim_xcalloc(m->nbuckets, sizeof(*m->buckets));
    m->free_value = free_value;
    return m;
}

void sim_map_clear(sim_map *m)
{
    for (size_t i = 0; i < m->nbuckets; i++) {
        entry *e = m->buckets[i];
        while (e != NULL) {
            entry *next = e->next;
            if (m->free_value != NULL)
                m->free_value(e->value);
            free(e);
            e = next;
        }
        m->buckets[i] = NULL;
    }
    m->count = 0;
}

void sim_map_free(sim_map *m)
{
    if (m == NULL)
        return;
    sim_map_clear(m);
    free(m->buckets);
    free(m);
}

size_t sim_map_count(const sim_map *m)
{
    return m->count;
}

static entry **slot(const sim_map *m, const char *key, size_t len, uint64_t h)
{
    entry **pe = &m->buckets[h & (m->nbuckets - 1)];
    while (*pe != NULL && !((*pe)->hash == h && (*pe)->len == len && memcmp((*pe)->key, key, len) == 0))
        pe = &(*pe)->next;
    return pe;
}

void *sim_map_get(const sim_map *m, const char *key, size_t len)
{
    entry *e = *slot(m, key, len, hash_bytes(key, len));
    return e != NULL ? e->value : NULL;
}

static void grow(sim_map *m)
{
    size_t nb = m->nbuckets * 2;
    entry **b = sim_xcalloc(nb, sizeof(*b));
    for (size_t i = 0; i < m->nbuckets; i++) {
        entry *e = m->buckets[i];
        while (e != NULL) {
            entry *next = e->next;
            e->next = b[e->hash & (nb - 1)];
            b[e->hash & (nb - 1)] = e;
            e = next;
        }
    }
    free(m->buckets);
    m->buckets = b;
    m->nbuckets = nb;
}

void sim_map_put(sim_map *m, const char *key, size_t len, void *value)
{
    uint64_t h = hash_bytes(key, len);
    entry **pe = slot(m, key, len, h);
    if (*pe != NULL) {
        if (m->free_value != NULL && (*pe)->value != value)
            m->free_value((*pe)->value);
        (*pe)->value = value;
        return;
    }
    if (m->count + 1 > m->nbuckets) {
        grow(m);
        pe = slot(m, key, len, h);
    }
    entry *e = sim_xmalloc(sizeof(*e) + len + 1);
    e->next = NULL;
    e->value = value;
    e->hash = h;
    e->len = len;
    memcpy(e->key, key, len);
    e->key[len] = '\0';
    *pe = e;
    m->count++;
}

void sim_map_del(sim_map *m, const char *key, size_t len)
{
    entry **pe = slot(m, key, len, hash_bytes(key, len));
    entry *e = *pe;
    if (e == NULL)
        return;
    *pe = e->next;
    if (m->free_value != NULL)
        m->free_value(e->value);
    free(e);
    m->count--;
}
