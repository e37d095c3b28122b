/*
 * store_pg_batch.c - store_record_success: after COMMIT PREPARED, the row's
 * status 'succeeded', processor_ref and updated_at, written (synchronous
 * commit) before the success is told, for many payments in one UPDATE.
 * Self-clocking, like a group commit: a write goes out at once when none is
 * in flight; while one is, the payments that succeed meanwhile collect and
 * go out together when it returns (or when BATCH_MAX have collected). So a
 * lone payment waits one round trip, and under load one flush serves many.
 * Each caller hears when the write holding its payment is done (or failed).
 */
#include "store_pg.h"
#include "list.h"
#include "log.h"
#include "loop.h"
#include "sbuf.h"

#include <stdlib.h>

#define BATCH_MAX 64

typedef void (*done_fn)(bool ok, void *);

typedef struct batch_entry {
    done_fn cb;
    void *arg;
} batch_entry;

typedef struct batch {
    pc_list link;                     /* in_flight */
    int n;
    batch_entry e[BATCH_MAX];
} batch;

static sbuf values;                   /* the VALUES list being collected */
static batch *collecting;
static pc_list in_flight;
static loop_timer timer;
static bool ready;

static void batch_done(batch *b, bool ok)
{
    list_unlink(&b->link);
    for (int i = 0; i < b->n; i++)
        b->e[i].cb(ok, b->e[i].arg);
    free(b);
}

static void flush_now(void);

static void written_cb(const pgpool_reply *r, void *arg)
{
    batch *b = arg;
    bool ok = r->status == PGQ_OK;
    if (!ok && r->status != PGQ_SHUTDOWN && !spg_closing())
        log_warn("store event=record_success_failed count=%d error=\"%s\"", b->n, r->errmsg);
    batch_done(b, ok);
    if (ready && collecting && list_empty(&in_flight))
        flush_now();
}

static void flush_now(void)
{
    batch *b = collecting;
    if (!b)
        return;
    collecting = NULL;
    loop_timer_stop(&timer);
    list_push_tail(&in_flight, &b->link);
    sbuf q;
    sbuf_init(&q);
    sbuf_puts(&q, "UPDATE payments p SET status = 'succeeded', "
                  "processor_ref = coalesce(v.ref, p.processor_ref), "
                  "updated_at = 'epoch'::timestamptz + v.at * interval '1 millisecond' FROM (VALUES ");
    sbuf_add(&q, values.data, values.len);
    sbuf_puts(&q, ") v(id, ref, at) WHERE p.payment_id = v.id::uuid AND p.status = 'pending'");
    sbuf_reset(&values);
    if (!sbuf_ok(&q) || pgpool_query(spg_pool(CH_PAY), sbuf_str(&q), written_cb, b) != PGPOOL_QUEUED) {
        log_warn("store event=record_success_skipped count=%d", b->n);
        batch_done(b, false);
    }
    sbuf_free(&q);
}

static void timer_cb(void *arg)
{
    (void)arg;
    flush_now();
}

int store_record_success(const char *payment_id, const char *processor_ref, int64_t updated_ms,
                         void (*cb)(bool ok, void *), void *arg)
{
    if (!ready || !spg_pool(CH_PAY) || !pgpool_is_up(spg_pool(CH_PAY)))
        return STORE_UNAVAILABLE;
    if (!collecting) {
        collecting = calloc(1, sizeof(*collecting));
        if (!collecting)
            return STORE_OVERLOADED;
        list_init(&collecting->link);
        /* Nothing in flight: go at the end of this turn of the loop (the
         * payments that succeed in the same turn join). */
        if (list_empty(&in_flight))
            loop_timer_start(&timer, 0);
    }
    batch *b = collecting;
    if (b->n)
        sbuf_puts(&values, ", ");
    sbuf_puts(&values, "(");
    sbuf_literal(&values, payment_id);
    sbuf_puts(&values, ", ");
    sbuf_literal(&values, processor_ref);
    sbuf_printf(&values, ", %lld)", (long long)updated_ms);
    b->e[b->n].cb = cb;
    b->e[b->n].arg = arg;
    if (++b->n >= BATCH_MAX)
        flush_now();
    return STORE_QUEUED;
}

void store_flush(void) { flush_now(); }

int spg_batch_init(void)
{
    sbuf_init(&values);
    list_init(&in_flight);
    collecting = NULL;
    if (loop_timer_init(&timer, timer_cb, NULL) != 0)
        return -1;
    ready = true;
    return 0;
}

void spg_batch_shutdown(void)
{
    if (!ready)
        return;
    ready = false;
    /* Unsent entries: their payments hear "not written" (recovery repairs rows). */
    if (collecting) {
        batch *b = collecting;
        collecting = NULL;
        list_push_tail(&in_flight, &b->link);
        batch_done(b, false);
    }
    sbuf_free(&values);
    loop_timer_deinit(&timer);
    /* Batches in flight get their answer when the pool is freed (PGQ_SHUTDOWN). */
}
