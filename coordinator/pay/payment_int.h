/*
 * payment_int.h - what the payment state machine's files share (payment.c:
 * the lifecycle and the database side; payment_proc.c: the processor side;
 * answers.c: waiting clients and what they are told). Not for use outside
 * pay/.
 */
#ifndef PAYCOORD_PAYMENT_INT_H
#define PAYCOORD_PAYMENT_INT_H

#include "account.h"
#include "gid.h"
#include "list.h"
#include "loop.h"
#include "proc.h"
#include "request.h"
#include "store.h"

typedef enum {
    PS_NEW = 0, PS_QUEUED, PS_PHASE1, PS_FENCE, PS_LOOKUP, PS_CREATE, PS_POLL, PS_CANCEL, PS_COMMIT,
    PS_ROLLBACK, PS_CHECK, PS_SETTLE, PS_RECORD, PS_HANDOFF, PS_FLAG, PS_DONE, PS__COUNT
} pay_state;

typedef enum { DEC_NONE = 0, DEC_COMMIT, DEC_ROLLBACK } decision;

typedef struct payment payment;

/* One client request waiting for this payment's answer. */
typedef struct waiter {
    pc_list link;
    payment *p;
    pc_request *r;
    loop_timer timer;                /* wait_ms; armed once the payment is durable */
    bool replayed;
} waiter;

struct payment {
    pc_list state_link;              /* by_state[state] */
    acct_slot slot;
    account *acct;
    char payment_id[UUID_TEXT_LEN + 1];
    char gid[GID_OURS_MAX + 1];
    char key[PROTO_KEY_MAX + 1];
    char account[PROTO_ACCOUNT_MAX + 1];
    char currency[4];
    int64_t amount;
    char *reference;
    cJSON *metadata;

    pay_state state;
    const char *status;              /* as told: "pending" until final */
    char processor_ref[128];
    char decline_code[64];
    char settle_status[24];          /* SETTLE: what is being written */
    char why[160];                   /* HANDOFF/FLAG: the reason recorded */
    char fence[64];                  /* FENCE: the lost session's token */
    int64_t created_wall_ms, updated_wall_ms;
    uint64_t started_ms, prepared_ms;

    bool intent_written;             /* the intent row is committed (maybe asynchronously) */
    bool durable;                    /* the row is known to be this payment's, and durable */
    bool final;                      /* the final status is durable and told */
    bool unknown_seen;               /* some processor answer left the outcome unknown */
    bool create_sent;                /* a create was sent to the processor at least once */
    bool review;                     /* HANDOFF: flag for review first */
    decision dec;
    int attempts;                    /* of the current step */
    loop_timer timer;
    void (*on_timer)(payment *p);
    pc_list waiters;
};

typedef struct pm_state_info {
    const char *name;
    bool debit;                      /* a prepared debit is held in this state */
} pm_state_info;
extern const pm_state_info pm_states[PS__COUNT];

/* payment.c */
void pm_set_state(payment *p, pay_state s);
void pm_after(payment *p, int ms, void (*fn)(payment *));
void pm_retry(payment *p, int base, int cap, void (*fn)(payment *));
bool pm_past_deadline(const payment *p);
void pm_start_finish(payment *p);
void pm_start_handoff(payment *p, bool review, const char *why);
void pm_done(payment *p);

/* payment_proc.c */
void pm_start_create(payment *p);
void pm_start_poll(payment *p, int delay_ms);

/* answers.c */
cJSON *pm_json(const payment *p, bool replayed);
bool pm_same_request(const payment *p, const proto_request *q);
int pm_waiter_add(payment *p, pc_request *r, bool replayed) PC_MUSTCHECK;
void pm_waiter_drop_all(payment *p, bool answer);
void pm_became_durable(payment *p);
void pm_answer_all(payment *p);
void pm_final(payment *p, const char *status);
/* Answer the waiters of a payment that ends without its row: same
 * parameters get code/msg, others are dispatched again from the loop. */
void pm_refuse_waiters(payment *p, proto_err code, const char *msg);
void pm_answer_from_row(payment *p, const store_payment_row *row);
void pm_answer_error(payment *p, proto_err code, const char *msg);
void pm_answers_init(void);
void pm_answers_shutdown(bool answer);

#endif
