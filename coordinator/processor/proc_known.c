/* proc_known.c - what the adapters have learnt from webhooks, per gid (proc_known.h). */
#include "proc_known.h"
#include "list.h"
#include "log.h"
#include "loop.h"
#include "strmap.h"

#include <stdlib.h>
#include <string.h>

#define SWEEP_MS 60000

typedef struct entry {
    proc_known k;
    pc_list link;                  /* in creation order */
    char gid[];
} entry;

static strmap *map;
static pc_list order;
static loop_timer sweep;
static uint64_t keep;
static bool up;

static void drop(entry *e)
{
    (void)strmap_del(map, e->gid);
    list_unlink(&e->link);
    free(e);
}

/* Drop the oldest entries while they are too old or too many. The list is in
 * the order of the last touch, oldest first. */
static void sweep_cb(void *arg)
{
    (void)arg;
    uint64_t now = loop_now_ms();
    pc_list *n;
    int dropped = 0;
    while ((n = list_first(&order)) != NULL) {
        entry *e = list_entry(n, entry, link);
        /* too old, or over the cap (then the oldest goes) */
        if (now < e->k.touched_ms + keep && strmap_count(map) <= PROC_KNOWN_MAX)
            break;
        drop(e);
        dropped++;
    }
    if (dropped)
        log_debug("processor event=known_swept dropped=%d kept=%zu", dropped, strmap_count(map));
    loop_timer_start(&sweep, SWEEP_MS);
}

int proc_known_init(uint64_t keep_ms)
{
    if (up)
        return 0;
    map = strmap_new();
    list_init(&order);
    keep = keep_ms;
    if (!map || loop_timer_init(&sweep, sweep_cb, NULL) != 0) {
        strmap_free(map);
        map = NULL;
        return -1;
    }
    loop_timer_start(&sweep, SWEEP_MS);
    up = true;
    return 0;
}

void proc_known_shutdown(void)
{
    if (!up)
        return;
    pc_list *n;
    while ((n = list_pop_head(&order)) != NULL)
        free(list_entry(n, entry, link));
    strmap_free(map);
    map = NULL;
    loop_timer_deinit(&sweep);
    up = false;
}

proc_known *proc_known_get(const char *gid)
{
    entry *e = up && gid ? strmap_get(map, gid) : NULL;
    return e ? &e->k : NULL;
}

proc_known *proc_known_put(const char *gid)
{
    if (!up || !gid || !gid[0])
        return NULL;
    entry *e = strmap_get(map, gid);
    if (!e) {
        size_t n = strlen(gid);
        e = calloc(1, sizeof(*e) + n + 1);
        if (!e)
            return NULL;
        memcpy(e->gid, gid, n + 1);
        if (strmap_put(map, e->gid, e) != 0) {
            free(e);
            return NULL;
        }
        list_push_tail(&order, &e->link);
    } else {
        /* touched: to the back of the line */
        list_unlink(&e->link);
        list_push_tail(&order, &e->link);
    }
    e->k.touched_ms = loop_now_ms();
    return &e->k;
}

size_t proc_known_count(void)
{
    return up ? strmap_count(map) : 0;
}
