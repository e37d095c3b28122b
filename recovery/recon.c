/*
 * recon.c - reconciliation runs (docs/reconciliation.md).
 *
 * A run compares a window of the processor's own list (proc_list: the
 * generic list endpoint, Stripe's PaymentIntents list, or an Adyen
 * settlement report) with our payments, matched by gid, and stores every
 * difference (store_recon_*; the classification is pc_recon_page in
 * sql/006_reconciliation.sql).
 *
 * - One run at a time across all nodes: this daemon drives a run only while
 *   it holds the reconciliation advisory lock (on its lock session, so the
 *   lock goes with a dead daemon), and the database allows one 'running' run.
 * - Idempotent and resumable: each page's discrepancies, counts and the
 *   run's cursor commit in one transaction, moving the cursor only from the
 *   value the page was read at. A run that stops anywhere (crash, shutdown,
 *   lost database) stays 'running' and the next start (or the next minute's
 *   tick, on any node) resumes it from its cursor: no page is lost, none is
 *   counted twice.
 * - Never in the payment path's way: its SQL runs on a database connection
 *   of its own (store_recon_open), one statement at a time; its listing on
 *   an HTTP client of its own with one connection; pages are small and spaced, and while the payment pool has
 *   queued queries the next page waits (up to a second).
 * - Scheduled daily at recon_schedule (UTC) over [T - lag - window, T - lag),
 *   once per window; on demand with `reconcile` (admin).
 * - The end of a run logs one line with alert=reconciliation when
 *   discrepancies are open, and refreshes the open counts behind the metrics.
 */
#include "recon.h"
#include "ctx.h"
#include "log.h"
#include "loop.h"
#include "nodelock.h"
#include "proc.h"
#include "recovery.h"
#include "sbuf.h"
#include "store.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define TICK_MS 60000
#define FIRST_TICK_MS 1000
#define EARLY_TICK_MS 2000             /* until the first check ran (a run to resume is not left waiting a minute) */
#define LIST_ATTEMPTS 6
#define YIELD_MAX_MS 1000
#define RUNS_SHOWN 10
#define DISCREPANCIES_SHOWN 1000

static const char *const kinds[] = { "charged_not_debited", "debited_not_charged", "amount_mismatch", "unknown_gid",
                                     "review" };

static struct {
    bool ready, stopping;
    bool starting;                 /* lock / start query in flight */
    bool active;                   /* driving a run */
    bool in_call;                  /* a list or page call is in flight */
    bool checked;                  /* a start query has been answered since this daemon started */
    loop_timer tick, step;
    pc_request *waiter;            /* the reconcile request waiting for its run to start */
    /* the run */
    int64_t run_id, from_s, to_s;
    char source[16];
    char path[PROTO_PATH_MAX + 1];
    char cursor[200];
    int64_t pages, seen, differences;
    int failures;                  /* consecutive failed list or page calls */
    bool finishing;                /* the last step is due (retried until it is written) */
    bool finish_failed;            /* ... as a failed run, with finish_error */
    char finish_error[300];
    int64_t yielded_ms;            /* waited for the payment pool before this page */
    /* metrics */
    int64_t open[PC_ARRAY_LEN(kinds)];
    bool counting;
} R;

static void step_later(int64_t ms);

/* ---------------------------------------------------------------- gauges */

bool recon_running(void) { return R.active; }
int64_t recon_run_id(void) { return R.active ? R.run_id : 0; }
int64_t recon_seen(void) { return R.active ? R.seen : 0; }
int64_t recon_pages(void) { return R.active ? R.pages : 0; }

int64_t recon_open(const char *kind)
{
    for (size_t i = 0; i < PC_ARRAY_LEN(kinds); i++)
        if (!strcmp(kinds[i], kind))
            return R.open[i];
    return -1;
}

static void counts_cb(st_status st, const char *sqlstate, const char *errmsg, const char *json, void *arg)
{
    (void)sqlstate;
    (void)errmsg;
    (void)arg;
    R.counting = false;
    if (st != ST_OK || R.stopping)
        return;
    cJSON *o = cJSON_Parse(json);
    for (size_t i = 0; o && i < PC_ARRAY_LEN(kinds); i++) {
        const cJSON *n = cJSON_GetObjectItemCaseSensitive(o, kinds[i]);
        R.open[i] = cJSON_IsNumber(n) ? (int64_t)n->valuedouble : 0;
    }
    cJSON_Delete(o);
}

static void refresh_counts(void)
{
    if (R.counting || R.stopping)
        return;
    if (store_recon_open_counts(counts_cb, NULL) == STORE_QUEUED)
        R.counting = true;
}

/* ---------------------------------------------------------------- helpers */

static int64_t json_i64(const cJSON *o, const char *name)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, name);
    return cJSON_IsNumber(v) ? (int64_t)v->valuedouble : 0;
}

static const char *json_s(const cJSON *o, const char *name)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, name);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

static const char *our_source(void)
{
    const char *api = D->cfg.processor_api;
    return !strcmp(api, "stripe") ? "stripe" : !strcmp(api, "adyen") ? "adyen_csv" : "generic";
}

/* The run stops being driven here (it may still be 'running' in the database). */
static void release(void)
{
    R.active = false;
    R.starting = false;
    R.finishing = false;
    loop_timer_stop(&R.step);
    if (!R.stopping)
        (void)store_recon_unlock();
}

static void answer_waiter(const cJSON *run, bool resumed, proto_err code, const char *msg)
{
    pc_request *r = R.waiter;
    R.waiter = NULL;
    if (!r)
        return;
    if (code != PROTO_ERR_NONE) {
        req_reply_err(r, code, "%s", msg);
        return;
    }
    cJSON *o = cJSON_Duplicate(run, true);
    if (!o) {
        req_reply_err(r, PROTO_ERR_INTERNAL, "out of memory (the run started: see reconcile_status)");
        return;
    }
    cJSON_AddBoolToObject(o, "resumed", resumed);
    req_reply_ok(r, o);
}

/* ---------------------------------------------------------------- the end of a run */

static void finish_cb(st_status st, const char *sqlstate, const char *errmsg, const char *json, void *arg)
{
    bool failed = arg != NULL;
    R.in_call = false;
    if (R.stopping)
        return;
    if (st == ST_ERROR && sqlstate && !strcmp(sqlstate, "PCRCS")) {
        /* Finished already (an earlier attempt whose answer was lost, or another driver). */
        log_notice("recon run=%lld event=finished_already", (long long)R.run_id);
        release();
        refresh_counts();
        return;
    }
    if (st != ST_OK) {
        log_warn("recon run=%lld event=finish_failed error=\"%s\" note=\"retried\"", (long long)R.run_id,
                 errmsg ? errmsg : "");
        R.failures++;
        step_later(1000LL << (R.failures < 5 ? R.failures : 5));
        return;
    }
    cJSON *a = cJSON_Parse(json);
    int64_t missing = 0, reviews = 0, open = 0;
    if (cJSON_GetArraySize(a) == 3) {
        missing = (int64_t)cJSON_GetArrayItem(a, 0)->valuedouble;
        reviews = (int64_t)cJSON_GetArrayItem(a, 1)->valuedouble;
        open = (int64_t)cJSON_GetArrayItem(a, 2)->valuedouble;
    }
    cJSON_Delete(a);
    D->stats.recon_runs++;
    if (failed) {
        log_error("recon run=%lld event=failed pages=%lld seen=%lld alert=reconciliation note=\"the processor's "
                  "list could not be read; run it again with paycoordctl reconcile\"",
                  (long long)R.run_id, (long long)R.pages, (long long)R.seen);
        D->stats.alerts++;
    } else {
        log_notice("recon run=%lld event=done pages=%lld seen=%lld differences=%lld missing_there=%lld reviews=%lld "
                   "open=%lld", (long long)R.run_id, (long long)R.pages, (long long)R.seen,
                   (long long)R.differences, (long long)missing, (long long)reviews, (long long)open);
        if (open > 0) {
            log_error("recon run=%lld event=discrepancies open=%lld alert=reconciliation note=\"our books and the "
                     "processor's differ: paycoordctl discrepancies\"", (long long)R.run_id, (long long)open);
            D->stats.alerts++;
        }
    }
    release();
    refresh_counts();
}

static void finish(const char *error)
{
    if (!R.finishing) {
        R.finishing = true;
        R.finish_failed = error != NULL;
        snprintf(R.finish_error, sizeof(R.finish_error), "%s", error ? error : "");
    }
    /* A payment's create is sent before its deadline: older ones are at the processor if anywhere. */
    int64_t settle_ms = (int64_t)D->cfg.payment_deadline_ms + 1000;
    if (store_recon_finish(R.run_id, R.finish_failed ? R.finish_error : NULL, settle_ms, finish_cb,
                           R.finish_failed ? (void *)1 : NULL) == STORE_QUEUED)
        R.in_call = true;
    else
        step_later(1000);       /* step() retries the last step */
}

/* ---------------------------------------------------------------- pages */

typedef struct page_ctx {
    bool more;
    char next[200];
} page_ctx;

/* After PCRCS (the page was applied already: our own earlier attempt whose
 * answer was lost, or another driver): carry on from the run's stored cursor
 * and counts, unless it is no longer running. */
static void reread_cb(st_status st, const char *sqlstate, const char *errmsg, const char *json, void *arg)
{
    (void)sqlstate;
    (void)arg;
    R.in_call = false;
    if (R.stopping)
        return;
    cJSON *run = st == ST_OK ? cJSON_Parse(json) : NULL;
    const char *state = json_s(run, "state");
    if (st != ST_OK) {
        log_warn("recon run=%lld event=reread_failed error=\"%s\"", (long long)R.run_id, errmsg ? errmsg : "");
        R.failures++;
        step_later(1000);
    } else if (!state || strcmp(state, "running") != 0) {
        log_notice("recon run=%lld event=ended_elsewhere state=%s", (long long)R.run_id, state ? state : "gone");
        release();
        refresh_counts();
    } else {
        snprintf(R.cursor, sizeof(R.cursor), "%s", json_s(run, "cursor") ? json_s(run, "cursor") : "");
        R.pages = json_i64(run, "pages");
        R.seen = json_i64(run, "seen");
        R.differences = json_i64(run, "differences");
        log_info("recon run=%lld event=cursor_reread cursor=\"%s\" pages=%lld", (long long)R.run_id, R.cursor,
                 (long long)R.pages);
        step_later(0);
    }
    cJSON_Delete(run);
}

static void page_cb(st_status st, const char *sqlstate, const char *errmsg, const char *json, void *arg)
{
    page_ctx *pc = arg;
    R.in_call = false;
    if (R.stopping) {
        free(pc);
        return;
    }
    if (st != ST_OK) {
        if (st == ST_ERROR && sqlstate && !strcmp(sqlstate, "PCRCS")) {
            free(pc);
            if (store_recon_run(R.run_id, reread_cb, NULL) == STORE_QUEUED)
                R.in_call = true;
            else
                step_later(1000);
            return;
        }
        R.failures++;
        log_warn("recon run=%lld event=page_failed attempt=%d error=\"%s\"", (long long)R.run_id, R.failures,
                 errmsg ? errmsg : "");
        free(pc);
        step_later(1000LL << (R.failures < 5 ? R.failures : 5));     /* the same page again */
        return;
    }
    R.failures = 0;
    cJSON *a = cJSON_Parse(json);
    if (cJSON_GetArraySize(a) == 5) {
        R.seen += (int64_t)cJSON_GetArrayItem(a, 0)->valuedouble;
        R.differences += (int64_t)cJSON_GetArrayItem(a, 3)->valuedouble;
    }
    cJSON_Delete(a);
    R.pages++;
    snprintf(R.cursor, sizeof(R.cursor), "%s", pc->next);
    bool more = pc->more;
    free(pc);
    if (R.pages % 20 == 0)
        log_info("recon run=%lld event=progress pages=%lld seen=%lld differences=%lld", (long long)R.run_id,
                 (long long)R.pages, (long long)R.seen, (long long)R.differences);
    if (more)
        step_later(D->cfg.recon_page_pause_ms);
    else
        finish(NULL);
}

static const char *status_text(proc_status s)
{
    switch (s) {
    case PROC_ST_SUCCEEDED: return "succeeded";
    case PROC_ST_DECLINED: return "declined";
    case PROC_ST_CANCELED: return "canceled";
    default: return "pending";
    }
}

static void list_cb(const proc_list_page *pg, void *arg)
{
    (void)arg;
    R.in_call = false;
    if (R.stopping)
        return;
    if (pg->outcome != PROC_PAYMENT) {
        R.failures++;
        if (R.failures >= LIST_ATTEMPTS || pg->outcome == PROC_AUTH || pg->outcome == PROC_INVALID) {
            char why[300];
            snprintf(why, sizeof(why), "%s: %s", proc_outcome_name(pg->outcome), pg->error);
            finish(why);
            return;
        }
        int64_t wait = pg->retry_after_ms > 0 ? pg->retry_after_ms : 1000LL << R.failures;
        step_later(wait);
        return;
    }
    sbuf b;
    sbuf_init(&b);
    cJSON *arr = cJSON_CreateArray();
    for (int i = 0; arr && i < pg->n; i++) {
        const proc_list_item *it = &pg->items[i];
        cJSON *o = cJSON_CreateObject();
        if (!o || !cJSON_AddItemToArray(arr, o)) {
            cJSON_Delete(o);
            cJSON_Delete(arr);
            arr = NULL;
            break;
        }
        if (it->gid[0])
            cJSON_AddStringToObject(o, "gid", it->gid);
        cJSON_AddStringToObject(o, "id", it->id);
        cJSON_AddStringToObject(o, "status", status_text(it->status));
        cJSON_AddBoolToObject(o, "refunded", it->refunded);
        if (it->refunded_amount > 0)
            cJSON_AddItemToObject(o, "refunded_amount", proto_json_int(it->refunded_amount));
        cJSON_AddItemToObject(o, "amount", proto_json_int(it->amount));
        if (it->currency[0])
            cJSON_AddStringToObject(o, "currency", it->currency);
        if (it->account[0])
            cJSON_AddStringToObject(o, "account", it->account);
    }
    char *items = arr ? cJSON_PrintUnformatted(arr) : NULL;
    cJSON_Delete(arr);
    page_ctx *pc = calloc(1, sizeof(*pc));
    if (!items || !pc) {
        free(items);
        free(pc);
        sbuf_free(&b);
        R.failures++;
        step_later(1000);
        return;
    }
    pc->more = pg->more;
    snprintf(pc->next, sizeof(pc->next), "%s", pg->n > 0 || pg->cursor[0] ? pg->cursor : R.cursor);
    if (store_recon_page(R.run_id, R.cursor, pc->next, items, page_cb, pc) == STORE_QUEUED) {
        R.in_call = true;
    } else {
        free(pc);
        R.failures++;
        step_later(1000);
    }
    free(items);
    sbuf_free(&b);
}

static void step(void *arg)
{
    (void)arg;
    if (!R.active || R.in_call || R.stopping)
        return;
    if (R.finishing) {
        finish(NULL);
        return;
    }
    /* Yield to payments: while the payment pool has queries waiting, wait
     * (at most YIELD_MAX_MS per page). */
    store_pool_stats ps;
    store_pool_stats_get(CH_PAY, &ps);
    if (ps.queued > 0 && R.yielded_ms < YIELD_MAX_MS) {
        R.yielded_ms += 50;
        step_later(50);
        return;
    }
    R.yielded_ms = 0;
    if (R.failures >= LIST_ATTEMPTS * 3) {
        finish("the database kept refusing the run's pages");
        return;
    }
    int64_t slack = D->cfg.recon_slack_s;
    proc_list_req q = { .from_s = R.from_s - slack, .to_s = R.to_s + slack, .cursor = R.cursor,
                        .limit = D->cfg.recon_page_size, .path = R.path[0] ? R.path : NULL };
    if (proc_list(&q, list_cb, NULL) == 0) {
        R.in_call = true;
        return;
    }
    R.failures++;
    if (R.failures >= LIST_ATTEMPTS) {
        finish("the processor adapter cannot list payments (for Adyen: give the settlement report)");
        return;
    }
    step_later(1000);
}

static void step_later(int64_t ms)
{
    if (!R.stopping)
        loop_timer_start(&R.step, ms < 0 ? 0 : ms);
}

/* ---------------------------------------------------------------- starting a run */

typedef struct start_ctx {
    store_recon_start_req q;
    char path[PROTO_PATH_MAX + 1];
} start_ctx;

static void start_cb(st_status st, const char *sqlstate, const char *errmsg, const char *json, void *arg)
{
    start_ctx *x = arg;
    (void)sqlstate;
    if (R.stopping) {
        answer_waiter(NULL, false, PROTO_ERR_SHUTTING_DOWN, "shutting down");
        free(x);
        return;
    }
    if (st == ST_OK)
        R.checked = true;
    cJSON *run = st == ST_OK ? cJSON_Parse(json) : NULL;
    if (st != ST_OK || !cJSON_IsObject(run)) {
        if (st != ST_OK)
            log_warn("recon event=start_failed error=\"%s\"", errmsg ? errmsg : "");
        answer_waiter(NULL, false, st != ST_OK ? PROTO_ERR_UNAVAILABLE : PROTO_ERR_NOT_FOUND,
                      st != ST_OK ? "database unavailable; no run started" : "nothing to run");
        cJSON_Delete(run);
        free(x);
        release();
        return;
    }
    R.run_id = json_i64(run, "run_id");
    R.from_s = json_i64(run, "from");
    R.to_s = json_i64(run, "to");
    snprintf(R.source, sizeof(R.source), "%s", json_s(run, "source") ? json_s(run, "source") : "");
    snprintf(R.path, sizeof(R.path), "%s", json_s(run, "path") ? json_s(run, "path") : "");
    snprintf(R.cursor, sizeof(R.cursor), "%s", json_s(run, "cursor") ? json_s(run, "cursor") : "");
    R.pages = json_i64(run, "pages");
    R.seen = json_i64(run, "seen");
    R.differences = json_i64(run, "differences");
    R.failures = 0;
    R.yielded_ms = 0;
    R.finishing = false;
    bool resumed = R.pages > 0 || R.from_s != x->q.from_s || R.to_s != x->q.to_s ||
                   strcmp(json_s(run, "trigger") ? json_s(run, "trigger") : "", x->q.trigger) != 0;
    R.starting = false;
    R.active = true;
    log_notice("recon run=%lld event=%s from=%lld to=%lld source=%s cursor=\"%s\" pages=%lld", (long long)R.run_id,
               resumed ? "resumed" : "started", (long long)R.from_s, (long long)R.to_s, R.source, R.cursor,
               (long long)R.pages);
    if (strcmp(R.source, our_source()) != 0) {
        /* A run of another processor API (the configuration changed): it cannot be resumed here. */
        answer_waiter(run, resumed, PROTO_ERR_NONE, NULL);
        cJSON_Delete(run);
        free(x);
        finish("processor_api changed since the run started; run it again");
        return;
    }
    answer_waiter(run, resumed, PROTO_ERR_NONE, NULL);
    cJSON_Delete(run);
    free(x);
    step_later(0);
}

static void lock_cb(st_status st, bool got, void *arg)
{
    start_ctx *x = arg;
    if (R.stopping) {
        answer_waiter(NULL, false, PROTO_ERR_SHUTTING_DOWN, "shutting down");
        free(x);
        return;
    }
    if (st != ST_OK || !got) {
        R.starting = false;
        if (st == ST_OK)
            R.checked = true;      /* another node holds it: that node drives the run */
        log_debug("recon event=lock_%s", st == ST_OK ? "busy" : "failed");
        answer_waiter(NULL, false, st != ST_OK ? PROTO_ERR_UNAVAILABLE : PROTO_ERR_OVERLOADED,
                      st != ST_OK ? "database unavailable; no run started"
                                  : "another node holds the reconciliation lock (it runs, or checks for, a run); "
                                    "see reconcile_status and retry");
        free(x);
        return;
    }
    if (store_recon_start(&x->q, start_cb, x) != STORE_QUEUED) {
        answer_waiter(NULL, false, PROTO_ERR_UNAVAILABLE, "database unavailable; no run started");
        free(x);
        release();
    }
}

/* Take the lock, then start or resume. -1: nothing sent (the waiter is not answered). */
static int start(const store_recon_start_req *q)
{
    start_ctx *x = calloc(1, sizeof(*x));
    if (!x)
        return -1;
    x->q = *q;
    if (q->path) {
        snprintf(x->path, sizeof(x->path), "%s", q->path);
        x->q.path = x->path;
    }
    R.starting = true;
    if (store_recon_lock(lock_cb, x) != STORE_QUEUED) {
        R.starting = false;
        free(x);
        return -1;
    }
    return 0;
}

/* The schedule: today's run time, the window it covers, and whether it is due. */
static bool schedule_due(int64_t *from_s, int64_t *to_s)
{
    const char *t = D->cfg.recon_schedule;
    if (!t[0])
        return false;
    int64_t now = loop_wall_ms() / 1000;
    int64_t day = now - now % 86400;
    int64_t at = day + ((t[0] - '0') * 10 + (t[1] - '0')) * 3600 + ((t[3] - '0') * 10 + (t[4] - '0')) * 60;
    if (now < at)
        return false;
    *to_s = at - D->cfg.recon_lag_s;
    *from_s = *to_s - D->cfg.recon_window_s;
    return true;
}

static void tick(void *arg)
{
    (void)arg;
    loop_timer_start(&R.tick, R.checked ? TICK_MS : EARLY_TICK_MS);
    refresh_counts();
    if (R.active || R.starting || R.stopping || !rec_node_locked() || !rec_first_pass_done() || !store_is_up())
        return;
    int64_t from = 0, to = 0;
    bool due = schedule_due(&from, &to);
    const char *source = our_source();
    const char *path = NULL;
    if (!strcmp(source, "adyen_csv")) {
        path = D->cfg.recon_adyen_report[0] ? D->cfg.recon_adyen_report : NULL;
        if (!path)
            due = false;              /* nothing to read: only resume */
    }
    store_recon_start_req q = { .from_s = from, .to_s = to > from ? to : from + 1, .source = source, .path = path,
                                .trigger = "schedule", .node = D->cfg.node_id, .only_if_new = true,
                                .resume_only = !due };
    (void)start(&q);
}

/* ---------------------------------------------------------------- ops */

void recon_handle_reconcile(pc_request *r)
{
    const proto_request *q = &r->req;
    if (R.active) {
        req_reply_err(r, PROTO_ERR_OVERLOADED, "run %lld is in progress (%lld records read); see reconcile_status",
                      (long long)R.run_id, (long long)R.seen);
        return;
    }
    if (R.starting || R.waiter) {
        req_reply_err(r, PROTO_ERR_OVERLOADED, "a reconciliation run is being started or resumed; retry shortly");
        return;
    }
    if (!rec_node_locked()) {
        req_reply_err(r, PROTO_ERR_UNAVAILABLE, "this daemon does not hold its node lock yet");
        return;
    }
    const char *source = our_source();
    if (!strcmp(source, "adyen_csv") && !q->report) {
        req_reply_err(r, PROTO_ERR_INVALID_REQUEST, "Adyen has no listing API: give its settlement details "
                      "report (report, paycoordctl reconcile --report FILE)");
        return;
    }
    if (strcmp(source, "adyen_csv") != 0 && q->report) {
        req_reply_err(r, PROTO_ERR_INVALID_REQUEST, "report applies to processor_api = adyen only");
        return;
    }
    int64_t now = loop_wall_ms() / 1000;
    store_recon_start_req sq = { .from_s = q->has_window ? q->from_s : now - D->cfg.recon_window_s,
                                 .to_s = q->has_window ? q->to_s : now, .source = source, .path = q->report,
                                 .trigger = "manual", .node = D->cfg.node_id, .uid = (unsigned)r->uid };
    R.waiter = r;
    log_notice("recon event=requested uid=%u from=%lld to=%lld", (unsigned)r->uid, (long long)sq.from_s,
               (long long)sq.to_s);
    if (start(&sq) != 0) {
        R.waiter = NULL;
        req_reply_err(r, PROTO_ERR_UNAVAILABLE, "database unavailable; no run started");
    }
}

/* Reads answered with the store's JSON under one key. */
typedef struct read_ctx {
    pc_request *r;
    const char *key;
    bool audit;
} read_ctx;

static void read_cb(st_status st, const char *sqlstate, const char *errmsg, const char *json, void *arg)
{
    read_ctx *x = arg;
    (void)sqlstate;
    cJSON *v = st == ST_OK ? cJSON_Parse(json) : NULL;
    if (!v) {
        req_reply_err(x->r, st == ST_OK ? PROTO_ERR_INTERNAL : PROTO_ERR_UNAVAILABLE, "%s",
                      st == ST_OK ? "unreadable answer" : errmsg && errmsg[0] ? errmsg : "database unavailable");
        free(x);
        return;
    }
    cJSON *o = cJSON_CreateObject();
    if (x->audit)
        cJSON_AddBoolToObject(o, "ok", cJSON_GetArraySize(v) == 0);
    else if (!strcmp(x->key, "runs")) {
        cJSON_AddBoolToObject(o, "running_here", R.active);
        if (R.active) {
            cJSON_AddItemToObject(o, "run_id", proto_json_int(R.run_id));
            cJSON_AddItemToObject(o, "pages", proto_json_int(R.pages));
            cJSON_AddItemToObject(o, "seen", proto_json_int(R.seen));
        }
    }
    cJSON_AddItemToObject(o, x->key, v);
    req_reply_ok(x->r, o);
    free(x);
}

static void read_call(pc_request *r, const char *key, bool audit, int rc_of_call(read_ctx *))
{
    read_ctx *x = calloc(1, sizeof(*x));
    if (!x) {
        req_reply_err(r, PROTO_ERR_INTERNAL, "out of memory");
        return;
    }
    x->r = r;
    x->key = key;
    x->audit = audit;
    if (rc_of_call(x) != STORE_QUEUED) {
        req_reply_err(r, PROTO_ERR_UNAVAILABLE, "database unavailable");
        free(x);
    }
}

static int call_runs(read_ctx *x) { return store_recon_runs(RUNS_SHOWN, read_cb, x); }
static int call_discrepancies(read_ctx *x)
{
    return store_discrepancies(x->r->req.all, DISCREPANCIES_SHOWN, read_cb, x);
}
static int call_audit(read_ctx *x)
{
    return store_audit(x->r->req.has_account ? x->r->req.account : NULL, read_cb, x);
}

void recon_handle_status(pc_request *r) { read_call(r, "runs", false, call_runs); }
void recon_handle_discrepancies(pc_request *r) { read_call(r, "discrepancies", false, call_discrepancies); }
void recon_handle_audit(pc_request *r) { read_call(r, "offenders", true, call_audit); }

/* settle_discrepancy: (1) the audit row, durably, before anything; (2) the
 * action and the row's outcome in one transaction (pc_discrepancy_settle);
 * (3) a failure of (2) is written to the audit row too. */
typedef struct settle_ctx {
    pc_request *r;
    int64_t settlement_id;
} settle_ctx;

static void failed_cb(st_status st, const char *sqlstate, const char *errmsg, const char *json, void *arg)
{
    settle_ctx *x = arg;
    (void)sqlstate;
    (void)errmsg;
    (void)json;
    if (st != ST_OK) {
        log_error("recon discrepancy=%lld settlement=%lld event=outcome_write_failed alert=audit",
                  (long long)x->r->req.discrepancy_id, (long long)x->settlement_id);
        D->stats.alerts++;
    }
    free(x);
}

static void do_cb(st_status st, const char *sqlstate, const char *errmsg, const char *json, void *arg)
{
    settle_ctx *x = arg;
    const proto_request *q = &x->r->req;
    (void)sqlstate;
    if (st != ST_OK) {
        bool unknown = st == ST_LOST || st == ST_SHUTDOWN;
        char why[320];
        snprintf(why, sizeof(why), "%s", errmsg && errmsg[0] ? errmsg : "database unavailable");
        log_warn("recon discrepancy=%lld settlement=%lld event=settle_failed error=\"%s\"",
                 (long long)q->discrepancy_id, (long long)x->settlement_id, why);
        if (unknown)
            req_reply_err(x->r, PROTO_ERR_UNAVAILABLE, "the outcome is unknown (connection lost); check "
                          "`discrepancies --all` before settling again");
        else
            req_reply_err(x->r, PROTO_ERR_UNAVAILABLE, "%s; nothing was changed", why);
        x->r = NULL;
        if (unknown || store_settle_failed(x->settlement_id, why, failed_cb, x) != STORE_QUEUED)
            free(x);
        return;
    }
    cJSON *o = cJSON_Parse(json);
    const char *outcome = json_s(o, "outcome");
    if (outcome && !strcmp(outcome, "settled")) {
        log_notice("recon discrepancy=%lld settlement=%lld event=settled action=%s uid=%u amount=%lld account=%s "
                   "reason=\"%s\"", (long long)q->discrepancy_id, (long long)x->settlement_id, q->settle_action,
                   (unsigned)x->r->uid, (long long)json_i64(o, "amount"),
                   json_s(o, "account") ? json_s(o, "account") : "-", q->reason);
        cJSON_AddItemToObject(o, "discrepancy_id", proto_json_int(q->discrepancy_id));
        cJSON_AddItemToObject(o, "settlement_id", proto_json_int(x->settlement_id));
        req_reply_ok(x->r, o);
        refresh_counts();
    } else {
        const char *msg = json_s(o, "message");
        log_notice("recon discrepancy=%lld settlement=%lld event=refused action=%s uid=%u why=\"%s\"",
                   (long long)q->discrepancy_id, (long long)x->settlement_id, q->settle_action,
                   (unsigned)x->r->uid, msg ? msg : "");
        req_reply_err(x->r, PROTO_ERR_INVALID_REQUEST, "refused, nothing was changed: %s", msg ? msg : "?");
        cJSON_Delete(o);
    }
    free(x);
}

static void begin_cb(st_status st, const char *sqlstate, const char *errmsg, const char *json, void *arg)
{
    settle_ctx *x = arg;
    (void)sqlstate;
    (void)errmsg;
    cJSON *o = st == ST_OK ? cJSON_Parse(json) : NULL;
    if (st != ST_OK) {
        req_reply_err(x->r, PROTO_ERR_UNAVAILABLE, "could not record the settlement; nothing was changed");
    } else if (!cJSON_IsObject(o)) {
        req_reply_err(x->r, PROTO_ERR_NOT_FOUND, "no discrepancy %lld", (long long)x->r->req.discrepancy_id);
    } else {
        x->settlement_id = json_i64(o, "settlement_id");
        cJSON_Delete(o);
        if (store_settle_do(x->settlement_id, do_cb, x) == STORE_QUEUED)
            return;
        req_reply_err(x->r, PROTO_ERR_UNAVAILABLE, "database unavailable; nothing was changed");
        x->r = NULL;
        if (store_settle_failed(x->settlement_id, "not sent", failed_cb, x) != STORE_QUEUED)
            free(x);
        return;
    }
    cJSON_Delete(o);
    free(x);
}

void recon_handle_settle(pc_request *r)
{
    const proto_request *q = &r->req;
    settle_ctx *x = calloc(1, sizeof(*x));
    if (!x) {
        req_reply_err(r, PROTO_ERR_INTERNAL, "out of memory; nothing was changed");
        return;
    }
    x->r = r;
    log_notice("recon discrepancy=%lld event=settle_requested action=%s uid=%u reason=\"%s\"",
               (long long)q->discrepancy_id, q->settle_action, (unsigned)r->uid, q->reason);
    if (store_settle_begin(q->discrepancy_id, q->settle_action, q->has_account ? q->account : NULL, q->reason,
                           (unsigned)r->uid, D->cfg.node_id, begin_cb, x) != STORE_QUEUED) {
        req_reply_err(r, PROTO_ERR_UNAVAILABLE, "database unavailable; nothing was changed");
        free(x);
    }
}

/* ---------------------------------------------------------------- life */

int recon_init(void)
{
    memset(&R, 0, sizeof(R));
    for (size_t i = 0; i < PC_ARRAY_LEN(kinds); i++)
        R.open[i] = -1;
    if (loop_timer_init(&R.tick, tick, NULL) != 0 || loop_timer_init(&R.step, step, NULL) != 0 ||
        store_recon_open() != 0)
        return -1;
    R.ready = true;
    loop_timer_start(&R.tick, FIRST_TICK_MS);
    return 0;
}

void recon_shutdown(void)
{
    if (!R.ready)
        return;
    R.stopping = true;
    if (R.active)
        log_notice("recon run=%lld event=stopped pages=%lld note=\"resumes at the next start\"",
                   (long long)R.run_id, (long long)R.pages);
    loop_timer_deinit(&R.tick);
    loop_timer_deinit(&R.step);
    proc_list_shutdown();
    store_recon_close();
    R.active = false;
    R.ready = false;
}
