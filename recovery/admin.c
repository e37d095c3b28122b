/*
 * admin.c - prepared, resolve and recover. They run on recovery's own
 * connections (store CH_REC), so they work even when client traffic fills the
 * payment pool.
 *
 * resolve: (1) the gid is claimed (owner.h): a live payment, a recovery item
 * or another resolve that holds it makes this one refuse, so a settlement by
 * hand never races one by the daemon; (2) another node's gid only while that
 * node is dead (its lock free); (3) the audit row is written first, durably,
 * with outcome 'requested', so no settlement by hand ever goes unrecorded;
 * (4) COMMIT or ROLLBACK PREPARED; (5) in one transaction: the audit row's
 * outcome, the payment's row ('declined' with resolved_manually, or
 * 'succeeded'), the review flag cleared.
 */
#include "admin.h"
#include "ctx.h"
#include "gid.h"
#include "log.h"
#include "nodelock.h"
#include "owner.h"
#include "recovery.h"
#include "store.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------- prepared */

static void prepared_cb(const store_prepared_list *l, void *arg)
{
    pc_request *r = arg;
    if (l->st != ST_OK) {
        req_reply_err(r, PROTO_ERR_UNAVAILABLE, "database unavailable");
        return;
    }
    cJSON *o = cJSON_CreateObject();
    cJSON *arr = o ? cJSON_AddArrayToObject(o, "transactions") : NULL;
    if (!arr) {
        cJSON_Delete(o);
        req_reply_err(r, PROTO_ERR_INTERNAL, "out of memory");
        return;
    }
    char ours[GID_NODE_MAX + 8];
    size_t ours_len = gid_prefix(D->cfg.node_id, ours, sizeof(ours));
    for (int i = 0; i < l->n; i++) {
        const store_prepared_row *row = &l->rows[i];
        cJSON *t = cJSON_CreateObject();
        if (!t)
            break;
        cJSON_AddStringToObject(t, "gid", row->gid);
#define STR_OR_NULL(name, v) ((v) ? cJSON_AddStringToObject(t, name, v) : cJSON_AddNullToObject(t, name))
        STR_OR_NULL("payment_id", row->payment_id);
        STR_OR_NULL("account", row->account);
        if (row->has_amount)
            cJSON_AddItemToObject(t, "amount", proto_json_int(row->amount));
        else
            cJSON_AddNullToObject(t, "amount");
        STR_OR_NULL("currency", row->currency);
        STR_OR_NULL("prepared_at", row->prepared_at);
        cJSON_AddItemToObject(t, "age_ms", proto_json_int(row->age_ms));
        STR_OR_NULL("node", row->node);
        cJSON_AddNumberToObject(t, "attempts", row->attempts);
        STR_OR_NULL("last_error", row->last_error);
#undef STR_OR_NULL
        const char *state = "unknown";
        if (row->payment_id && ours_len && !strncmp(row->gid, ours, ours_len)) {
            if (owner_of(row->gid) == OWNER_PAYMENT)
                state = "in_flight";
            else if (row->review)
                state = "review";
            else
                state = "in_doubt";
        }
        cJSON_AddStringToObject(t, "state", state);
        cJSON_AddItemToArray(arr, t);
    }
    req_reply_ok(r, o);
}

void admin_handle_prepared(pc_request *r)
{
    int64_t older = r->req.has_older_than_ms ? r->req.older_than_ms : 0;
    if (store_prepared_list_all(older, prepared_cb, r) != STORE_QUEUED)
        req_reply_err(r, PROTO_ERR_UNAVAILABLE, "database unavailable");
}

/* ---------------------------------------------------------------- resolve */

typedef struct resolve_ctx {
    pc_request *r;
    int64_t resolution_id;
    bool claimed;
    bool already;                    /* it was settled as asked before this resolve acted */
    const char *outcome;
} resolve_ctx;

/* Release the gid, before the request is answered (answering frees it). */
static void resolve_release(resolve_ctx *x)
{
    if (x->claimed)
        owner_release(x->r->req.gid, OWNER_RESOLVE);
    x->claimed = false;
}

static void resolve_fail(resolve_ctx *x, proto_err code, const char *msg)
{
    resolve_release(x);
    req_reply_err(x->r, code, "%s", msg);
    free(x);
}

static void end_cb(st_status st, void *arg)
{
    resolve_ctx *x = arg;
    const proto_request *q = &x->r->req;
    if (st != ST_OK) {
        log_error("resolve gid=%s event=outcome_write_failed resolution_id=%lld alert=audit", q->gid,
                  (long long)x->resolution_id);
        D->stats.alerts++;
    }
    resolve_release(x);
    if (!strcmp(x->outcome, "committed") || !strcmp(x->outcome, "rolled_back")) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "gid", q->gid);
        cJSON_AddStringToObject(o, "outcome", x->outcome);
        if (x->already)
            cJSON_AddBoolToObject(o, "already", true);
        req_reply_ok(x->r, o);
    } else if (!strcmp(x->outcome, "not_found")) {
        req_reply_err(x->r, PROTO_ERR_NOT_FOUND, "no prepared transaction %s (settled already?)", q->gid);
    } else {
        req_reply_err(x->r, PROTO_ERR_UNAVAILABLE,
                      "%s PREPARED failed (outcome unknown); check `prepared` before retrying",
                      q->action == PROTO_ACTION_COMMIT ? "COMMIT" : "ROLLBACK");
    }
    free(x);
}

static void record_end(resolve_ctx *x, bool settled)
{
    const proto_request *q = &x->r->req;
    if (settled) {
        log_notice("resolve gid=%s event=%s uid=%u resolution_id=%lld reason=\"%s\"", q->gid, x->outcome,
                   (unsigned)x->r->uid, (long long)x->resolution_id, q->reason);
        rec_forgotten(q->gid);
    }
    if (store_resolve_end(x->resolution_id, q->gid, x->outcome, settled,
                          settled && q->action == PROTO_ACTION_ROLLBACK, end_cb, x) != STORE_QUEUED)
        end_cb(ST_NOT_SENT, x);
}

/* "No such prepared transaction": settled already, maybe by this very
 * resolve whose answer was lost. When the facts are what was asked for, the
 * request is done (the audit row, review flag and payment row are brought up
 * to date); otherwise it is not_found. */
static void gone_cb(const store_facts *f, void *arg)
{
    resolve_ctx *x = arg;
    bool commit = x->r->req.action == PROTO_ACTION_COMMIT;
    bool as_asked = f->st == ST_OK && !f->prepared && (commit ? f->debited : (f->row && !f->debited));
    x->outcome = as_asked ? (commit ? "committed" : "rolled_back") : "not_found";
    x->already = as_asked;
    record_end(x, as_asked);
}

static void finish_cb(const store_p2 *res, void *arg)
{
    resolve_ctx *x = arg;
    const proto_request *q = &x->r->req;
    bool commit = q->action == PROTO_ACTION_COMMIT;
    bool settled = res->outcome == P2_DONE;
    if (res->outcome == P2_GONE) {
        char pid[UUID_TEXT_LEN + 1] = "";
        (void)gid_parse(q->gid, NULL, pid);
        if (store_get_facts(CH_REC, pid, q->gid, NULL, gone_cb, x) == STORE_QUEUED)
            return;
    }
    x->outcome = settled ? (commit ? "committed" : "rolled_back") : res->outcome == P2_GONE ? "not_found" : "unknown";
    record_end(x, settled);
}

static void begin_cb(st_status st, int64_t resolution_id, void *arg)
{
    resolve_ctx *x = arg;
    const proto_request *q = &x->r->req;
    if (st != ST_OK) {
        resolve_fail(x, PROTO_ERR_UNAVAILABLE, "could not record the resolution; nothing was changed");
        return;
    }
    x->resolution_id = resolution_id;
    if (store_finish(CH_REC, q->gid, q->action == PROTO_ACTION_COMMIT, finish_cb, x) != STORE_QUEUED) {
        x->outcome = "not_sent";
        if (store_resolve_end(x->resolution_id, q->gid, x->outcome, false, false, end_cb, x) != STORE_QUEUED)
            end_cb(ST_NOT_SENT, x);
    }
}

static void resolve_begin(resolve_ctx *x)
{
    pc_request *r = x->r;
    const proto_request *q = &r->req;
    if (owner_claim(q->gid, OWNER_RESOLVE) != 0) {
        resolve_fail(x, PROTO_ERR_OVERLOADED, "the gid is being settled by this daemon right now; retry shortly");
        return;
    }
    x->claimed = true;
    log_notice("resolve gid=%s event=requested action=%s uid=%u reason=\"%s\"", q->gid,
               q->action == PROTO_ACTION_COMMIT ? "commit" : "rollback", (unsigned)r->uid, q->reason);
    if (store_resolve_begin(q->gid, q->action == PROTO_ACTION_COMMIT, q->reason, (unsigned)r->uid, D->cfg.node_id,
                            begin_cb, x) != STORE_QUEUED)
        resolve_fail(x, PROTO_ERR_UNAVAILABLE, "database unavailable; nothing was changed");
}

static void alive_cb(st_status st, bool alive, void *arg)
{
    resolve_ctx *x = arg;
    if (st != ST_OK) {
        resolve_fail(x, PROTO_ERR_UNAVAILABLE, "database unavailable; nothing was changed");
        return;
    }
    if (alive) {
        char node[GID_NODE_MAX + 1];
        char msg[320];
        if (!gid_parse(x->r->req.gid, node, NULL))
            node[0] = '\0';
        snprintf(msg, sizeof(msg), "gid %s belongs to node %s, which is alive: resolve it there", x->r->req.gid, node);
        resolve_fail(x, PROTO_ERR_FORBIDDEN, msg);
        return;
    }
    resolve_begin(x);
}

void admin_handle_resolve(pc_request *r)
{
    const proto_request *q = &r->req;
    owner_kind k = owner_of(q->gid);
    if (k != OWNER_NONE) {
        req_reply_err(r, k == OWNER_PAYMENT ? PROTO_ERR_INVALID_REQUEST : PROTO_ERR_OVERLOADED,
                      "gid %s is being settled by this daemon right now (%s); retry when `prepared` shows it in_doubt",
                      q->gid, owner_kind_name(k));
        return;
    }
    resolve_ctx *x = calloc(1, sizeof(*x));
    if (!x) {
        req_reply_err(r, PROTO_ERR_INTERNAL, "out of memory; nothing was changed");
        return;
    }
    x->r = r;
    char node[GID_NODE_MAX + 1];
    if (gid_parse(q->gid, node, NULL) && strcmp(node, D->cfg.node_id) != 0) {
        /* Another paycoord node's gid: only while that node is dead. */
        if (store_node_alive(CH_REC, node, alive_cb, x) != STORE_QUEUED)
            resolve_fail(x, PROTO_ERR_UNAVAILABLE, "database unavailable; nothing was changed");
        return;
    }
    resolve_begin(x);
}

/* ---------------------------------------------------------------- recover */

typedef struct recover_ctx {
    pc_request *r;
    char node[GID_NODE_MAX + 1];
    bool foreign;
} recover_ctx;

static void recovered_cb(const rec_counts *c, const char *err, void *arg)
{
    recover_ctx *x = arg;
    if (!c) {
        req_reply_err(x->r, PROTO_ERR_SHUTTING_DOWN, "%s", err ? err : "recovery stopped");
        free(x);
        return;
    }
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "checked", c->checked);
    cJSON_AddNumberToObject(o, "committed", c->committed);
    cJSON_AddNumberToObject(o, "rolled_back", c->rolled_back);
    cJSON_AddNumberToObject(o, "left", c->left);
    if (x->foreign)
        cJSON_AddStringToObject(o, "node", x->node);
    req_reply_ok(x->r, o);
    free(x);
}

static void foreign_lock_cb(st_status st, bool got, int pid, void *arg)
{
    recover_ctx *x = arg;
    (void)pid;
    if (st != ST_OK) {
        req_reply_err(x->r, PROTO_ERR_UNAVAILABLE, "database unavailable");
        free(x);
        return;
    }
    if (!got) {
        req_reply_err(x->r, PROTO_ERR_FORBIDDEN, "node %s is alive (its lock is held); only it settles its gids",
                      x->node);
        free(x);
        return;
    }
    log_notice("recovery event=takeover node=%s uid=%u", x->node, (unsigned)x->r->uid);
    if (rec_run(x->node, true, true, recovered_cb, x) != 0) {
        (void)store_node_unlock(x->node);
        req_reply_err(x->r, PROTO_ERR_OVERLOADED, "a recovery pass is running; retry shortly");
        free(x);
    }
}

void admin_handle_recover(pc_request *r)
{
    recover_ctx *x = calloc(1, sizeof(*x));
    if (!x) {
        req_reply_err(r, PROTO_ERR_INTERNAL, "out of memory");
        return;
    }
    x->r = r;
    if (r->req.node[0] && strcmp(r->req.node, D->cfg.node_id) != 0) {
        x->foreign = true;
        snprintf(x->node, sizeof(x->node), "%s", r->req.node);
        if (rec_busy()) {
            req_reply_err(r, PROTO_ERR_OVERLOADED, "a recovery pass is running; retry shortly");
            free(x);
            return;
        }
        if (store_node_lock(x->node, foreign_lock_cb, x) != STORE_QUEUED) {
            req_reply_err(r, PROTO_ERR_UNAVAILABLE, "database unavailable");
            free(x);
        }
        return;
    }
    snprintf(x->node, sizeof(x->node), "%s", D->cfg.node_id);
    if (!rec_node_locked()) {
        req_reply_err(r, PROTO_ERR_UNAVAILABLE, "this daemon does not hold its node lock yet");
        free(x);
        return;
    }
    if (rec_run(x->node, false, true, recovered_cb, x) != 0) {
        req_reply_err(r, PROTO_ERR_UNAVAILABLE, "recovery could not start (another node's pass runs, or the "
                      "database is unavailable); retry shortly");
        free(x);
    }
}
