/*
 * store_pg_events.c - the processor's webhook events (store.h,
 * sql/005_processor_events.sql): written durably and only once, read back at
 * start for the payments that may still need them.
 */
#include "store_pg.h"
#include "log.h"
#include "sbuf.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define EVENT_COLS 11
#define EVENTS_MAX 64

typedef void (*save_fn)(st_status, int, void *);

static void save_cb(const pgpool_reply *r, void *arg)
{
    spg_call *c = arg;
    st_status st = spg_status(r);
    int fresh = st == ST_OK ? PQntuples(r->results[0]) : 0;
    ((save_fn)c->fn)(st, fresh, c->arg);
    free(c);
}

int store_save_events(const store_event *ev, int n, void (*cb)(st_status st, int fresh, void *), void *arg)
{
    if (n < 1 || n > EVENTS_MAX || !cb)
        return STORE_UNAVAILABLE;
    const char *params[EVENTS_MAX * EVENT_COLS];
    char amounts[EVENTS_MAX][24];
    sbuf q;
    sbuf_init(&q);
    /* synchronous_commit stays on: the events are flushed before cb hears ST_OK. */
    sbuf_puts(&q, "INSERT INTO processor_events (event_id, processor, gid, processor_ref, kind, status, success, "
                  "is_cancel, reason, amount, currency) VALUES ");
    for (int i = 0; i < n; i++) {
        const store_event *e = &ev[i];
        const char **p = &params[i * EVENT_COLS];
        snprintf(amounts[i], sizeof(amounts[i]), "%" PRId64, e->amount);
        p[0] = e->event_id;
        p[1] = e->processor;
        p[2] = e->gid && e->gid[0] ? e->gid : NULL;
        p[3] = e->processor_ref && e->processor_ref[0] ? e->processor_ref : NULL;
        p[4] = e->kind;
        p[5] = e->status;
        p[6] = e->success ? "true" : "false";
        p[7] = e->is_cancel ? "true" : "false";
        p[8] = e->reason && e->reason[0] ? e->reason : NULL;
        p[9] = e->has_amount ? amounts[i] : NULL;
        p[10] = e->currency && e->currency[0] ? e->currency : NULL;
        int b = i * EVENT_COLS;
        sbuf_printf(&q, "%s($%d, $%d, $%d, $%d, $%d, $%d, $%d::boolean, $%d::boolean, $%d, $%d::bigint, $%d)",
                    i ? ", " : "", b + 1, b + 2, b + 3, b + 4, b + 5, b + 6, b + 7, b + 8, b + 9, b + 10, b + 11);
    }
    sbuf_puts(&q, " ON CONFLICT (event_id) DO NOTHING RETURNING event_id");
    if (!sbuf_ok(&q)) {
        sbuf_free(&q);
        return STORE_OVERLOADED;
    }
    int rc = spg_params(CH_PAY, sbuf_str(&q), n * EVENT_COLS, params, save_cb, spg_call_new((store_any_fn)cb, arg));
    sbuf_free(&q);
    return rc;
}

typedef void (*load_fn)(const store_event_list *, void *);

static void load_cb(const pgpool_reply *r, void *arg)
{
    spg_call *c = arg;
    store_event_list l = { .st = spg_status(r), .errmsg = r->errmsg };
    store_event *evs = NULL;
    if (l.st == ST_OK) {
        const PGresult *res = r->results[0];
        int n = PQntuples(res);
        evs = n ? calloc((size_t)n, sizeof(*evs)) : NULL;
        if (n && !evs) {
            l.st = ST_ERROR;
            l.errmsg = "out of memory";
        } else {
            for (int i = 0; i < n; i++)
                evs[i] = (store_event){
                    .event_id = PQgetvalue(res, i, 0), .processor = PQgetvalue(res, i, 1),
                    .gid = spg_text(res, i, 2), .processor_ref = spg_text(res, i, 3), .kind = PQgetvalue(res, i, 4),
                    .status = PQgetvalue(res, i, 5), .success = spg_bool(res, i, 6),
                    .is_cancel = spg_bool(res, i, 7), .reason = spg_text(res, i, 8),
                    .has_amount = !PQgetisnull(res, i, 9), .amount = spg_int(res, i, 9),
                    .currency = spg_text(res, i, 10),
                };
            l.n = n;
            l.events = evs;
        }
    }
    ((load_fn)c->fn)(&l, c->arg);
    free(evs);
    free(c);
}

int store_load_events(void (*cb)(const store_event_list *, void *), void *arg)
{
    static const char sql[] =
        "SELECT e.event_id, e.processor, e.gid, e.processor_ref, e.kind, e.status, e.success, e.is_cancel, "
        "       e.reason, e.amount, e.currency "
        "  FROM processor_events e "
        " WHERE e.gid IN (SELECT gid FROM pg_prepared_xacts WHERE database = current_database() "
        "                 UNION SELECT gid FROM payments WHERE status = 'pending') "
        " ORDER BY e.received_at, e.event_id";
    return spg_query(CH_REC, sql, load_cb, spg_call_new((store_any_fn)cb, arg));
}
