/*
 * access.h - least privilege on the socket: which peer may call which op.
 *
 * Every op belongs to one permission class:
 *   read    ping, status, balance
 *   pay     pay
 *   credit  credit
 *   admin   account_open, prepared, resolve, recover, stats, health
 * A class is granted by uid and gid lists of the configuration (docs/config.md).
 * Root and the daemon's own uid hold every class; admin holds every class;
 * pay and credit include read. read and pay are open to every peer that can
 * open the socket while no read_*, pay_* or client_* list is set; credit and
 * admin are never open. The gid matched is the peer's effective gid from
 * SO_PEERCRED (supplementary groups are not seen).
 *
 * The lists are parsed once, at start and on SIGHUP (access_configure), into
 * an access_policy; a request is checked once, when its line is read
 * (access_check), and keeps that decision while it runs.
 */
#ifndef PAYCOORD_ACCESS_H
#define PAYCOORD_ACCESS_H

#include "common.h"
#include "config.h"

#include <cjson/cJSON.h>
#include <proto.h>

typedef enum {
    ACCESS_READ = 0,
    ACCESS_PAY,
    ACCESS_CREDIT,
    ACCESS_ADMIN,
    ACCESS__COUNT
} access_class;

#define ACCESS_MAX_IDS CONFIG_MAX_IDS       /* ids per class and kind (uids or gids) */
#define ACCESS_NO_ID CONFIG_NO_ID           /* (uid_t)-1: credentials unknown */
#define ACCESS_LOG_BURST 10                 /* refusal lines logged per window ... */
#define ACCESS_LOG_WINDOW_MS 10000          /* ... then only counted until it ends */

typedef struct access_ids {
    unsigned n;
    uint32_t id[ACCESS_MAX_IDS];
} access_ids;

typedef struct access_policy {
    access_ids uids[ACCESS__COUNT];
    access_ids gids[ACCESS__COUNT];
    bool open[ACCESS__COUNT];               /* held by every peer */
    uint32_t self_uid;                      /* the daemon's own uid */
} access_policy;

const char *access_class_name(access_class c);   /* "read", "pay", "credit", "admin" */
access_class access_op_class(proto_op op);       /* unknown ops are admin */

/* Build a policy from the settings; self_uid holds every class. On a bad list
 * returns -1 with "key: problem" in err. Pure: no logging, no globals. */
int access_policy_build(access_policy *p, const pc_config *cfg, uint32_t self_uid, char *err, size_t errlen)
    PC_MUSTCHECK;
bool access_policy_allows(const access_policy *p, uint32_t uid, uint32_t gid, access_class c);

/* Install the policy of cfg (already accepted by config_validate) for every
 * request read from now on. Should building fail anyway, the previous policy
 * stays and an error is logged. */
void access_configure(const pc_config *cfg);

/* May this peer run op? On refusal: counts it, logs it at warning level (at
 * most ACCESS_LOG_BURST lines per ACCESS_LOG_WINDOW_MS), and writes the
 * message for the `forbidden` answer (naming the op and the missing class)
 * into why. */
bool access_check(uint32_t uid, uint32_t gid, int pid, proto_op op, char *why, size_t whylen);

/* Refusals since start, by op (metrics, stats). */
uint64_t access_refused(proto_op op);
/* {"<op>": refusals, ...} for every op; NULL when out of memory. */
cJSON *access_refused_json(void);

#endif
