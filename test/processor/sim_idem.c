/* sim_idem.c - idempotency records with retention (see sim_idem.h). */
#include "sim_idem.h"

#include <stdlib.h>
#include <string.h>

static void idem_free(void *v)
{
    sim_idem *r = v;
    free(r->body);
    free(r);
}

sim_map *sim_idem_table(void)
{
    return sim_map_new(idem_free);
}

sim_idem *sim_idem_get(sim_server *s, sim_map *t, const char *key, size_t len)
{
    sim_idem *r = sim_map_get(t, key, len);
    if (r != NULL && r->owner == 0 && sim_now_ms() - r->created_ms >= s->faults.key_retention_ms) {
        sim_store_counters(s->store)->keys_pruned++;
        sim_log(SIM_LOG_DEBUG, "idempotency key \"%.*s\" pruned", (int)len, key);
        sim_map_del(t, key, len);
        r = NULL;
    }
    return r;
}

sim_idem *sim_idem_begin(sim_map *t, const char *key, size_t len, uint64_t fp, uint64_t token)
{
    sim_idem *r = sim_xcalloc(1, sizeof(*r));
    r->fp = fp;
    r->created_ms = sim_now_ms();
    r->owner = token;
    sim_map_put(t, key, len, r);
    return r;
}

void sim_idem_save(sim_idem *r, int status, const sim_buf *body)
{
    free(r->body);
    r->body = sim_xmalloc(body->len + 1);
    memcpy(r->body, body->data != NULL ? body->data : "", body->len);
    r->body[body->len] = '\0';
    r->len = body->len;
    r->status = status;
    r->owner = 0;
}
