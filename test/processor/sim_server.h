/*
 * sim_server.h - what psp-sim's request machinery (psp_sim.c) shares with
 * the modes that speak an API over it (sim_generic.c, sim_stripe.c,
 * sim_adyen.c): the parsed request (sim_call), the server, and the mode
 * table through which psp_sim.c dispatches.
 *
 * A request's life: the mode's route() parses it into a sim_call (or answers
 * 401/404/405 itself); psp_sim.c chooses its fate from the fault table, waits
 * out the latency, then calls the mode's execute(), which leaves the answer
 * in s->body (plus s->hdrs) and returns the HTTP status (0: close without one).
 */
#ifndef PSP_SIM_SERVER_H
#define PSP_SIM_SERVER_H

#include "sim_fault.h"
#include "sim_store.h"
#include "sim_util.h"

#include <sys/queue.h> /* before event2: TAILQ_* for evkeyvalq */

#include <event2/event.h>
#include <event2/http.h>

/* What happens to a request besides its normal processing. */
typedef enum {
    FATE_NORMAL = 0,
    FATE_FAIL_BEFORE, /* 5xx, not processed */
    FATE_FAIL_AFTER,  /* processed, 500 */
    FATE_DROP_AFTER,  /* processed, connection closed without an answer */
    FATE_BLACKHOLE,   /* held, never processed nor answered */
    FATE_RATE_LIMIT   /* 429 with Retry-After, not processed */
} sim_fate;

/* metadata sim on a create: the outcome of a new payment. */
typedef enum {
    FORCE_NONE = 0,
    FORCE_SUCCEED,
    FORCE_DECLINE,
    FORCE_PENDING,
    FORCE_ACTION,   /* stripe: requires_action */
    FORCE_RECEIVED, /* adyen: resultCode Received (pending) */
    FORCE_ERROR     /* adyen: resultCode Error (not charged) */
} sim_force;

/* One parsed request: everything needed to process it later, copied out of
 * the evhttp request (which may be gone by then). */
typedef struct sim_call {
    /* scalars first: sim_call_init() clears up to `key` */
    sim_op op;
    sim_fate fate;
    sim_force force;
    int bad_status;      /* 0, or the 4xx to answer with bad_msg */
    bool has_sim_fate;
    bool has_latency;
    int64_t latency_ms;  /* metadata sim_latency_ms */
    size_t key_len;
    int64_t amount;
    size_t account_len;
    bool has_reference;
    size_t reference_len;
    bool has_decline_code;
    bool has_gte;
    bool has_lt;
    bool has_after;
    int64_t gte;
    int64_t lt;
    uint64_t after_seq;
    int limit;
    uint64_t token;        /* unique per call: owner of an in-flight key */
    void *mdata;           /* the mode's parsed request, freed with mfree */
    void (*mfree)(void *);
    char key[SIM_KEY_MAX + 1];
    char currency[4];
    char account[SIM_ACCOUNT_MAX + 1];
    char reference[SIM_REFERENCE_MAX + 1];
    char decline_code[SIM_DECLINE_CODE_MAX + 1];
    char bad_msg[160];
} sim_call;

typedef enum {
    HOLD_DELAY,     /* latency: the timer processes the call, then answers */
    HOLD_BLACKHOLE, /* until the client goes away */
    HOLD_DROP       /* close the connection on the next loop turn */
} hold_kind;

typedef struct sim_server sim_server;
typedef struct sim_webhooks sim_webhooks;

/* A request we answer later (or never). Owned by the server's held list.
 * req and evcon are NULL once the connection is gone; a HOLD_DELAY call is
 * still processed when its timer fires, with nobody to answer. */
typedef struct sim_held {
    struct sim_held *prev;
    struct sim_held *next;
    sim_server *srv;
    struct evhttp_request *req;
    struct evhttp_connection *evcon;
    struct event *timer;
    struct event *watch;
    hold_kind kind;
    sim_call call;
} sim_held;

typedef struct sim_mode_ops {
    sim_mode mode;
    /* Routes a request outside /control: sets call->op (and counts
     * requests.<op>), checks auth and parses. Returns 0 to go on (a parse
     * error sets call->bad_status), or 1 when it has answered already. */
    int (*route)(sim_server *s, struct evhttp_request *req, const char *path, size_t path_len,
                 const char *query, sim_call *call);
    /* Processes a call whose time has come into s->body/s->hdrs, fault fate
     * included (fail_before, fail_after, drop_after). Returns the HTTP status,
     * or 0 to close the connection without an answer. */
    int (*execute)(sim_server *s, sim_call *call);
    /* The body of a 429 (the status, Retry-After and counter are done). */
    void (*rate_limited)(sim_server *s);
    /* A call is held for its latency: e.g. its idempotency key is now in flight. */
    void (*held)(sim_server *s, sim_call *call);
    /* Every payment is being forgotten (reset?payments=1): drop the mode's
     * references to them. */
    void (*reset)(sim_server *s);
    void (*destroy)(sim_server *s);
} sim_mode_ops;

#define SIM_MAX_HDRS 6

typedef struct sim_hdr {
    const char *name;
    char value[96];
} sim_hdr;

struct sim_server {
    struct event_base *base;
    struct evhttp *http_main;
    struct evhttp *http_ctl;
    struct evhttp_bound_socket *main_sock; /* NULL while refusing connections */
    char bind_addr[64];
    uint16_t port;
    uint16_t ctl_port;
    char *token;
    size_t token_len;
    const char *state_path;
    sim_mode mode;
    const sim_mode_ops *ops;
    void *mstate; /* the mode's own state */
    sim_webhooks *webhooks;
    sim_store *store;
    sim_faults faults;
    sim_rng rng;
    struct event *settle_ev;
    int64_t settle_armed_ms;
    sim_held *held;
    size_t held_count;
    uint64_t next_token;
    struct evbuffer *out; /* reply body, reused */
    sim_buf body;         /* the answer being built, reused */
    const char *content_type; /* NULL: application/json */
    sim_hdr hdrs[SIM_MAX_HDRS]; /* extra headers of the answer being built */
    int nhdrs;
};

extern const sim_mode_ops sim_generic_ops;
extern const sim_mode_ops sim_stripe_ops;
extern const sim_mode_ops sim_adyen_ops;

/* Set up the mode's state (after the store exists). */
void sim_stripe_init(sim_server *s);
void sim_adyen_init(sim_server *s);

/* Helpers psp_sim.c offers the modes. */
/* {"error":{"code":...,"message":...}} (the generic and /control shape) into s->body. */
void sim_error_body(sim_server *s, const char *code, const char *message);
/* Constant-time comparison with --token. */
bool sim_token_matches(const sim_server *s, const char *presented, size_t n);
/* The processor's own id of a payment in this mode (psp_..., pi_..., pspReference). */
void sim_processor_id(const sim_server *s, const sim_payment *p, char *out, size_t cap);
int sim_parse_processor_id(const sim_server *s, const char *id, size_t n, uint64_t *seq) SIM_MUSTCHECK;
void sim_call_init(sim_call *c);
int sim_call_bad(sim_call *c, int status, const char *fmt, ...) SIM_PRINTF(3, 4);
bool sim_printable_ascii(const char *s, size_t n);
int sim_hexval(char c);
/* Percent-decodes one path segment into out (cap bytes incl. NUL). */
int sim_decode_segment(const char *s, size_t n, char *out, size_t cap, size_t *out_len) SIM_MUSTCHECK;
/* Adds a header to the answer being built (dropped past SIM_MAX_HDRS). */
void sim_add_header(sim_server *s, const char *name, const char *fmt, ...) SIM_PRINTF(3, 4);
/* Sends s->body (and s->hdrs) now. */
void sim_reply(sim_server *s, struct evhttp_request *req, int code);
/* Answers at once with a body already in s->body, dropping extra headers. */
void sim_reply_now(sim_server *s, struct evhttp_request *req, int code);
/* Counts requests.<op> and, while refuse_connections is on, closes the
 * connection unanswered (returns 1 then). */
int sim_count_request(sim_server *s, struct evhttp_request *req, sim_op op);
/* Arms the settle timer for the earliest pending settlement. */
void sim_settle_rearm(sim_server *s);
/* metadata.sim values shared by every mode; returns -1 for an unknown value. */
int sim_parse_sim_value(sim_call *c, const char *v);
/* metadata.sim_latency_ms and sim_decline_code from strings; -1 on a bad value
 * (call->bad_status is set). */
int sim_parse_sim_latency(sim_call *c, const char *v);
int sim_parse_sim_decline_code(sim_call *c, const char *v);
/* Decides the outcome of a new payment: metadata sim, else decline_rate then
 * pending_rate. */
sim_force sim_draw_outcome(sim_server *s, const sim_call *c);
/* Forgets every payment and the mode's references to them. */
void sim_forget_payments(sim_server *s);

#endif
