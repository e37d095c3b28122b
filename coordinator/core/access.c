/* access.c - permission classes per op, their grants, the check and the
 * refusal log (access.h). Runs on the event loop: no blocking, no allocation
 * per request. */
#include "access.h"
#include "log.h"
#include "loop.h"

#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static const char *const class_names[ACCESS__COUNT] = {
    [ACCESS_READ] = "read",
    [ACCESS_PAY] = "pay",
    [ACCESS_CREDIT] = "credit",
    [ACCESS_ADMIN] = "admin",
};

const char *access_class_name(access_class c)
{
    return (unsigned)c < ACCESS__COUNT ? class_names[c] : "admin";
}

/* The admin ops are proto's list (proto_op_is_admin), kept in one place; the
 * others are named here, and anything else (a new op) is admin until it is. */
access_class access_op_class(proto_op op)
{
    if (proto_op_is_admin(op))
        return ACCESS_ADMIN;
    switch (op) {
    case PROTO_OP_PING:
    case PROTO_OP_STATUS:
    case PROTO_OP_BALANCE:
        return ACCESS_READ;
    case PROTO_OP_PAY:
        return ACCESS_PAY;
    case PROTO_OP_CREDIT:
        return ACCESS_CREDIT;
    default:
        return ACCESS_ADMIN;
    }
}

/* Append the ids of a comma-separated list to *ids (the list rule is
 * config.c's, so --check-config sees the same errors). */
static int parse_ids(access_ids *ids, const char *key, const char *list, char *err, size_t errlen)
{
    return config_parse_ids(key, list, ids->id, &ids->n, ACCESS_MAX_IDS, err, errlen);
}

int access_policy_build(access_policy *p, const pc_config *cfg, uint32_t self_uid, char *err, size_t errlen)
{
    memset(p, 0, sizeof(*p));
    p->self_uid = self_uid;
    /* client_uids/client_gids are the 0.1 names: they grant pay (and so read). */
    const struct { access_class c; bool gid; const char *key; const char *list; } src[] = {
        { ACCESS_ADMIN, false, "admin_uids", cfg->admin_uids },
        { ACCESS_ADMIN, true, "admin_gids", cfg->admin_gids },
        { ACCESS_CREDIT, false, "credit_uids", cfg->credit_uids },
        { ACCESS_CREDIT, true, "credit_gids", cfg->credit_gids },
        { ACCESS_PAY, false, "pay_uids", cfg->pay_uids },
        { ACCESS_PAY, true, "pay_gids", cfg->pay_gids },
        { ACCESS_PAY, false, "client_uids", cfg->client_uids },
        { ACCESS_PAY, true, "client_gids", cfg->client_gids },
        { ACCESS_READ, false, "read_uids", cfg->read_uids },
        { ACCESS_READ, true, "read_gids", cfg->read_gids },
    };
    for (size_t i = 0; i < PC_ARRAY_LEN(src); i++) {
        access_ids *ids = src[i].gid ? &p->gids[src[i].c] : &p->uids[src[i].c];
        if (parse_ids(ids, src[i].key, src[i].list ? src[i].list : "", err, errlen) != 0)
            return -1;
    }
    bool lists = p->uids[ACCESS_READ].n || p->gids[ACCESS_READ].n || p->uids[ACCESS_PAY].n || p->gids[ACCESS_PAY].n;
    p->open[ACCESS_READ] = p->open[ACCESS_PAY] = !lists;
    return 0;
}

static bool has(const access_ids *ids, uint32_t id)
{
    for (unsigned i = 0; i < ids->n; i++)
        if (ids->id[i] == id)
            return true;
    return false;
}

static bool granted(const access_policy *p, uint32_t uid, uint32_t gid, access_class c)
{
    return p->open[c] || has(&p->uids[c], uid) || has(&p->gids[c], gid);
}

bool access_policy_allows(const access_policy *p, uint32_t uid, uint32_t gid, access_class c)
{
    if (uid == ACCESS_NO_ID)
        return false;                   /* no credentials: nothing */
    if (uid == 0 || uid == p->self_uid || granted(p, uid, gid, ACCESS_ADMIN))
        return true;
    switch (c) {
    case ACCESS_READ:
        return granted(p, uid, gid, ACCESS_READ) || granted(p, uid, gid, ACCESS_PAY) ||
               granted(p, uid, gid, ACCESS_CREDIT);
    case ACCESS_PAY:
    case ACCESS_CREDIT:
        return granted(p, uid, gid, c);
    case ACCESS_ADMIN:
    case ACCESS__COUNT:
        break;
    }
    return false;
}

/* ------------------------------------------------------------ the daemon -- */

static access_policy active;            /* zero: only root until configured */
static uint64_t refused[PROTO_OP__COUNT];
static uint64_t window_start_ms;
static unsigned window_logged;
static uint64_t window_suppressed;

void access_configure(const pc_config *cfg)
{
    static access_policy next;
    char err[256];
    if (access_policy_build(&next, cfg, (uint32_t)geteuid(), err, sizeof(err)) != 0) {
        log_error("event=access_config_failed error=\"%s\" note=\"keeping the previous permissions\"", err);
        return;
    }
    active = next;
}


static void log_refusal(uint32_t uid, uint32_t gid, int pid, proto_op op, access_class c)
{
    uint64_t now = loop_now_ms();
    if (window_start_ms == 0 || now - window_start_ms >= ACCESS_LOG_WINDOW_MS) {
        if (window_suppressed)
            log_warn("event=forbidden_suppressed count=%llu window_ms=%d",
                     (unsigned long long)window_suppressed, ACCESS_LOG_WINDOW_MS);
        window_start_ms = now;
        window_logged = 0;
        window_suppressed = 0;
    }
    if (window_logged < ACCESS_LOG_BURST) {
        window_logged++;
        log_warn("event=forbidden uid=%lu gid=%lu pid=%d op=%s missing=%s", (unsigned long)uid,
                 (unsigned long)gid, pid, proto_op_name(op), access_class_name(c));
        return;
    }
    if (window_suppressed++ == 0)
        log_warn("event=forbidden_rate_limited limit=%d window_ms=%d "
                 "note=\"further refusals in this window are counted (paycoord_forbidden_total), not logged\"",
                 ACCESS_LOG_BURST, ACCESS_LOG_WINDOW_MS);
}

bool access_check(uint32_t uid, uint32_t gid, int pid, proto_op op, char *why, size_t whylen)
{
    access_class c = access_op_class(op);
    if (access_policy_allows(&active, uid, gid, c))
        return true;
    if ((unsigned)op < PROTO_OP__COUNT)
        refused[op]++;
    log_refusal(uid, gid, pid, op, c);
    if (uid == ACCESS_NO_ID)
        snprintf(why, whylen, "op %s needs the %s permission; the peer's credentials are unknown",
                 proto_op_name(op), access_class_name(c));
    else
        snprintf(why, whylen, "op %s needs the %s permission, which uid %lu (gid %lu) does not hold",
                 proto_op_name(op), access_class_name(c), (unsigned long)uid, (unsigned long)gid);
    return false;
}

uint64_t access_refused(proto_op op)
{
    return (unsigned)op < PROTO_OP__COUNT ? refused[op] : 0;
}

cJSON *access_refused_json(void)
{
    cJSON *o = cJSON_CreateObject();
    for (int i = 0; o && i < PROTO_OP__COUNT; i++)
        if (!cJSON_AddNumberToObject(o, proto_op_name((proto_op)i), (double)refused[i])) {
            cJSON_Delete(o);
            o = NULL;
        }
    return o;
}
