/*
 * sim_idem.h - idempotency records of the Stripe and Adyen modes: per key,
 * the fingerprint of the first request, its saved answer, its age (keys are
 * forgotten after key_retention_ms) and whether a request holding it is
 * still executing.
 */
#ifndef PSP_SIM_IDEM_H
#define PSP_SIM_IDEM_H

#include "sim_map.h"
#include "sim_server.h"

typedef struct sim_idem {
    uint64_t fp;        /* fingerprint of the first request */
    int64_t created_ms;
    uint64_t owner;     /* token of the call executing it, 0 when done */
    int status;         /* saved answer */
    char *body;
    size_t len;
} sim_idem;

sim_map *sim_idem_table(void);
/* The record of key, or NULL; a record older than key_retention_ms is
 * forgotten first (counted in keys_pruned). */
sim_idem *sim_idem_get(sim_server *s, sim_map *t, const char *key, size_t len);
/* A new in-flight record owned by token. */
sim_idem *sim_idem_begin(sim_map *t, const char *key, size_t len, uint64_t fp, uint64_t token);
/* Saves the answer (s->body) and marks the record done. */
void sim_idem_save(sim_idem *r, int status, const sim_buf *body);

#endif
