/*
 * sim_stripe.c - --mode stripe: the PaymentIntents API as paycoord uses it
 * (docs/processors.md has the sources): form-encoded bodies with bracketed
 * keys, Stripe's error object, Idempotency-Key with replays marked
 * Idempotent-Replayed, 400 idempotency_error for other parameters, 409
 * idempotency_key_in_use while the first request executes, keys pruned after
 * key_retention_ms, a 500 after execution began saved and replayed; 402
 * card_error declines, cancel by pi_ id with the documented status rules,
 * search by metadata with search_lag_ms, list with created bounds, and signed
 * payment_intent.* webhooks.
 */
#include "sim_form.h"
#include "sim_idem.h"
#include "sim_server.h"
#include "sim_webhook.h"

#include <event2/buffer.h>
#include <event2/keyvalq_struct.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define PI_PATH "/v1/payment_intents"
#define LIST_LIMIT_MAX 100
#define META_KEYS_MAX 50
#define META_KEY_MAX 40
#define META_VALUE_MAX 500
#define SEARCH_CLAUSES_MAX 8

typedef struct stripe_state {
    sim_map *keys;
    uint64_t next_event;
} stripe_state;

typedef struct clause {
    bool status; /* status:'x', else metadata['k']:'v' */
    char k[META_KEY_MAX + 1];
    char v[META_VALUE_MAX + 1];
} clause;

/* What a Stripe call needs beyond sim_call. */
typedef struct stripe_req {
    uint64_t fp;      /* the request's parameters and endpoint */
    bool has_key;     /* an Idempotency-Key header was given (in call->key) */
    bool manual;      /* capture_method=manual */
    char *meta;       /* metadata as "k\0v\0" pairs */
    size_t meta_len;
    char err_code[48];
    char err_param[64];
    /* list and search */
    bool has_gt, has_lte;
    int64_t gt, lte;
    uint64_t page_seq; /* search: continue below this seq */
    bool has_page;
    int nclauses;
    clause clauses[SEARCH_CLAUSES_MAX];
    bool search;
    bool expand_charge; /* list: expand[]=data.latest_charge */
    char pi_id[32];
} stripe_req;

static stripe_state *st_of(sim_server *s)
{
    return s->mstate;
}

static void req_free(void *p)
{
    stripe_req *r = p;
    free(r->meta);
    free(r);
}

static stripe_req *req_of(sim_call *c)
{
    if (c->mdata == NULL) {
        c->mdata = sim_xcalloc(1, sizeof(stripe_req));
        c->mfree = req_free;
    }
    return c->mdata;
}

static uint64_t str_hash(const char *s)
{
    uint64_t h = 1469598103934665603ULL;
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ULL;
    return h;
}

/* ---- JSON of the API ---------------------------------------------------- */

static void error_json(sim_buf *b, const char *type, const char *code, const char *param, const char *msg)
{
    sim_buf_reset(b);
    sim_buf_adds(b, "{\"error\":{");
    if (code != NULL && *code) {
        sim_buf_adds(b, "\"code\":");
        sim_buf_add_jstr(b, code, strlen(code));
        sim_buf_addc(b, ',');
    }
    sim_buf_adds(b, "\"message\":");
    sim_buf_add_jstr(b, msg, strlen(msg));
    if (param != NULL && *param) {
        sim_buf_adds(b, ",\"param\":");
        sim_buf_add_jstr(b, param, strlen(param));
    }
    sim_buf_adds(b, ",\"type\":");
    sim_buf_add_jstr(b, type, strlen(type));
    sim_buf_adds(b, "}}");
}

static const char *pi_status(int status, uint8_t flags)
{
    switch (status) {
    case SIM_ST_SUCCEEDED: return (flags & SIM_PF_UNCAPTURED) ? "requires_capture" : "succeeded";
    case SIM_ST_DECLINED: return "requires_payment_method";
    case SIM_ST_PENDING: return (flags & SIM_PF_ACTION) ? "requires_action" : "processing";
    case SIM_ST_CANCELED: return "canceled";
    default: return "requires_confirmation";
    }
}

static void card_error_json(sim_buf *b, const sim_payment *p)
{
    sim_buf_adds(b, "{\"code\":\"card_declined\",\"decline_code\":");
    sim_buf_add_jstr(b, p->decline_code, strlen(p->decline_code));
    sim_buf_adds(b, ",\"message\":\"Your card was declined.\",\"type\":\"card_error\"}");
}

/* The PaymentIntent object; status is the one to show (search lag). With
 * expand, latest_charge is the Charge object (id, amount, amount_refunded,
 * refunded), as expand[]=data.latest_charge gives it on a list. */
static void pi_json_ex(sim_server *s, const sim_payment *p, int status, sim_buf *b, bool expand)
{
    char id[48], cur[4];
    sim_processor_id(s, p, id, sizeof(id));
    for (int i = 0; i < 3; i++)
        cur[i] = (char)(p->currency[i] | 0x20);
    cur[3] = '\0';
    bool charged = status == SIM_ST_SUCCEEDED;
    bool uncaptured = charged && (p->flags & SIM_PF_UNCAPTURED);
    sim_buf_addf(b, "{\"id\":\"%s\",\"object\":\"payment_intent\",\"amount\":", id);
    sim_buf_add_i64(b, p->amount);
    sim_buf_adds(b, ",\"amount_capturable\":");
    sim_buf_add_i64(b, uncaptured ? p->amount : 0);
    sim_buf_adds(b, ",\"amount_received\":");
    sim_buf_add_i64(b, charged && !uncaptured ? p->amount : 0);
    sim_buf_addf(b, ",\"canceled_at\":");
    if (status == SIM_ST_CANCELED)
        sim_buf_add_i64(b, p->changed_ms / 1000);
    else
        sim_buf_adds(b, "null");
    sim_buf_addf(b, ",\"cancellation_reason\":%s,\"capture_method\":\"%s\",\"client_secret\":\"%s_secret_psp_sim\","
                    "\"confirmation_method\":\"automatic\",\"created\":",
                 status == SIM_ST_CANCELED ? "\"requested_by_customer\"" : "null",
                 (p->flags & SIM_PF_UNCAPTURED) ? "manual" : "automatic", id);
    sim_buf_add_i64(b, p->created);
    sim_buf_addf(b, ",\"currency\":\"%s\",\"last_payment_error\":", cur);
    if (status == SIM_ST_DECLINED)
        card_error_json(b, p);
    else
        sim_buf_adds(b, "null");
    sim_buf_adds(b, ",\"latest_charge\":");
    if (expand && (status == SIM_ST_SUCCEEDED || status == SIM_ST_DECLINED)) {
        bool refunded = status == SIM_ST_SUCCEEDED && p->refunded;
        sim_buf_addf(b, "{\"id\":\"ch_%024llu\",\"object\":\"charge\",\"amount\":", (unsigned long long)p->seq);
        sim_buf_add_i64(b, p->amount);
        sim_buf_adds(b, ",\"amount_refunded\":");
        sim_buf_add_i64(b, refunded ? p->amount : 0);
        sim_buf_addf(b, ",\"refunded\":%s}", refunded ? "true" : "false");
    } else if (status == SIM_ST_SUCCEEDED || status == SIM_ST_DECLINED)
        sim_buf_addf(b, "\"ch_%024llu\"", (unsigned long long)p->seq);
    else
        sim_buf_adds(b, "null");
    sim_buf_adds(b, ",\"livemode\":false,\"metadata\":{");
    const char *m = p->reference, *end = p->reference + (p->has_reference ? p->reference_len : 0);
    bool first = true;
    while (m < end) {
        size_t kl = strlen(m);
        const char *v = m + kl + 1;
        size_t vl = strlen(v);
        if (!first)
            sim_buf_addc(b, ',');
        first = false;
        sim_buf_add_jstr(b, m, kl);
        sim_buf_addc(b, ':');
        sim_buf_add_jstr(b, v, vl);
        m = v + vl + 1;
    }
    sim_buf_adds(b, "},\"payment_method\":");
    sim_buf_add_jstr(b, p->account, p->account_len);
    sim_buf_addf(b, ",\"status\":\"%s\"}", pi_status(status, p->flags));
}

static void pi_json(sim_server *s, const sim_payment *p, int status, sim_buf *b)
{
    pi_json_ex(s, p, status, b, false);
}

/* ---- webhooks ----------------------------------------------------------- */

static void emit_event(sim_server *s, const sim_payment *p, const char *type)
{
    stripe_state *st = st_of(s);
    sim_buf b;
    if (!sim_webhooks_enabled(s->webhooks))
        return;
    sim_buf_init(&b);
    sim_buf_addf(&b, "{\"id\":\"evt_%024llu\",\"object\":\"event\",\"api_version\":\"2024-06-20\",\"created\":",
                 (unsigned long long)++st->next_event);
    sim_buf_add_i64(&b, sim_now_ms() / 1000);
    sim_buf_adds(&b, ",\"data\":{\"object\":");
    pi_json(s, p, p->status, &b);
    sim_buf_adds(&b, "},\"livemode\":false,\"pending_webhooks\":1,\"request\":{\"id\":null,\"idempotency_key\":");
    if (p->key_len > 0 && !(p->flags & SIM_PF_NO_KEY))
        sim_buf_add_jstr(&b, p->key, p->key_len);
    else
        sim_buf_adds(&b, "null");
    sim_buf_addf(&b, "},\"type\":\"%s\"}", type);
    sim_webhooks_emit(s->webhooks, b.data, b.len, true, NULL, 0);
    sim_buf_free(&b);
}

static void status_hook(void *arg, sim_payment *p, int from, const char *why)
{
    sim_server *s = arg;
    (void)why;
    if (from == SIM_ST_NONE)
        emit_event(s, p, "payment_intent.created");
    switch (p->status) {
    case SIM_ST_SUCCEEDED:
        emit_event(s, p, (p->flags & SIM_PF_UNCAPTURED) ? "payment_intent.amount_capturable_updated"
                                                        : "payment_intent.succeeded");
        break;
    case SIM_ST_DECLINED: emit_event(s, p, "payment_intent.payment_failed"); break;
    case SIM_ST_PENDING:
        emit_event(s, p, (p->flags & SIM_PF_ACTION) ? "payment_intent.requires_action" : "payment_intent.processing");
        break;
    case SIM_ST_CANCELED: emit_event(s, p, "payment_intent.canceled"); break;
    default: break;
    }
}

/* ---- parsing ------------------------------------------------------------ */

static int bad(sim_call *c, int status, const char *code, const char *param, const char *msg)
{
    stripe_req *r = req_of(c);
    snprintf(r->err_code, sizeof(r->err_code), "%s", code != NULL ? code : "");
    snprintf(r->err_param, sizeof(r->err_param), "%s", param != NULL ? param : "");
    return sim_call_bad(c, status, "%s", msg);
}

static bool allowed_extra(const char *k)
{
    static const char *const ok[] = {"description", "customer", "off_session", "error_on_requires_action",
                                     "return_url", "statement_descriptor", "receipt_email",
                                     "automatic_payment_methods[enabled]",
                                     "automatic_payment_methods[allow_redirects]", "payment_method_types[]",
                                     "expand[]", "cancellation_reason"};
    for (size_t i = 0; i < SIM_ARRAY_LEN(ok); i++)
        if (strcmp(k, ok[i]) == 0)
            return true;
    return false;
}

static int parse_body(sim_call *c, struct evhttp_request *req, sim_form *f)
{
    char err[128];
    const char *ct = evhttp_find_header(evhttp_request_get_input_headers(req), "Content-Type");
    struct evbuffer *in = evhttp_request_get_input_buffer(req);
    size_t len = evbuffer_get_length(in);
    if (len > 0 && ct != NULL && strncasecmp(ct, "application/x-www-form-urlencoded", 33) != 0)
        return bad(c, 400, NULL, NULL,
                   "Invalid request (check that your POST content type is application/x-www-form-urlencoded).");
    if (sim_form_parse((const char *)evbuffer_pullup(in, -1), len, f, err, sizeof(err)) != 0) {
        char msg[200];
        snprintf(msg, sizeof(msg), "Invalid request body: %s.", err);
        return bad(c, 400, "parameter_invalid", NULL, msg);
    }
    return 0;
}

static int parse_idempotency_key(sim_call *c, struct evhttp_request *req)
{
    const char *k = evhttp_find_header(evhttp_request_get_input_headers(req), "Idempotency-Key");
    if (k == NULL)
        return 0;
    size_t n = strlen(k);
    if (n == 0 || n > SIM_KEY_MAX || !sim_printable_ascii(k, n))
        return bad(c, 400, NULL, NULL, "Idempotency keys must be 1 to 255 printable characters long.");
    memcpy(c->key, k, n + 1);
    c->key_len = n;
    req_of(c)->has_key = true;
    return 0;
}

static int parse_create(sim_call *c, struct evhttp_request *req)
{
    stripe_req *r = req_of(c);
    sim_form f;
    sim_buf meta;
    char gid[SIM_KEY_MAX + 1] = "";
    int nmeta = 0, rc = -1;
    const sim_form_pair *v;

    sim_buf_init(&meta);
    if (parse_idempotency_key(c, req) != 0 || parse_body(c, req, &f) != 0) {
        sim_buf_free(&meta);
        return -1;
    }
    r->fp = sim_form_fingerprint(&f) ^ str_hash("POST " PI_PATH);
    for (size_t i = 0; i < f.n; i++) {
        const sim_form_pair *p = &f.pairs[i];
        if (strncmp(p->key, "metadata[", 9) == 0) {
            size_t kl = p->key_len - 10;
            if (p->key[p->key_len - 1] != ']' || kl == 0 || kl > META_KEY_MAX ||
                memchr(p->key + 9, '[', kl) != NULL) {
                bad(c, 400, "parameter_invalid", p->key, "Invalid metadata key.");
                goto out;
            }
            if (p->val_len > META_VALUE_MAX || ++nmeta > META_KEYS_MAX) {
                bad(c, 400, "parameter_invalid", p->key,
                    "Metadata values can have up to 500 characters, and up to 50 keys.");
                goto out;
            }
            sim_buf_add(&meta, p->key + 9, kl);
            sim_buf_addc(&meta, '\0');
            sim_buf_add(&meta, p->val, p->val_len);
            sim_buf_addc(&meta, '\0');
            char key[META_KEY_MAX + 1];
            memcpy(key, p->key + 9, kl);
            key[kl] = '\0';
            if (strcmp(key, "sim") == 0) {
                if (sim_parse_sim_value(c, p->val) != 0 || c->force == FORCE_RECEIVED || c->force == FORCE_ERROR) {
                    bad(c, 400, "parameter_invalid", p->key, "metadata[sim]: unknown psp-sim outcome.");
                    goto out;
                }
            } else if (strcmp(key, "sim_latency_ms") == 0) {
                if (sim_parse_sim_latency(c, p->val) != 0)
                    goto out;
            } else if (strcmp(key, "sim_decline_code") == 0) {
                if (sim_parse_sim_decline_code(c, p->val) != 0)
                    goto out;
            } else if (strcmp(key, "gid") == 0 && p->val_len <= SIM_KEY_MAX) {
                memcpy(gid, p->val, p->val_len + 1);
            }
        } else if (strcmp(p->key, "amount") != 0 && strcmp(p->key, "currency") != 0 &&
                   strcmp(p->key, "confirm") != 0 && strcmp(p->key, "payment_method") != 0 &&
                   strcmp(p->key, "capture_method") != 0 && !allowed_extra(p->key)) {
            char msg[SIM_FORM_KEY_MAX + 64];
            snprintf(msg, sizeof(msg), "Received unknown parameter: %s", p->key);
            bad(c, 400, "parameter_unknown", p->key, msg);
            goto out;
        }
    }
    if ((v = sim_form_get(&f, "amount")) == NULL) {
        bad(c, 400, "parameter_missing", "amount", "Missing required param: amount.");
        goto out;
    }
    if (sim_parse_i64(v->val, v->val_len, false, &c->amount) != 0 || c->amount < 1 || c->amount > 99999999) {
        bad(c, 400, "parameter_invalid_integer", "amount", "Invalid integer: amount (1..99999999).");
        goto out;
    }
    if ((v = sim_form_get(&f, "currency")) == NULL) {
        bad(c, 400, "parameter_missing", "currency", "Missing required param: currency.");
        goto out;
    }
    for (size_t i = 0; i < 3 && v->val_len == 3; i++)
        c->currency[i] = (char)(v->val[i] & ~0x20);
    if (v->val_len != 3 || c->currency[0] < 'A' || c->currency[0] > 'Z' || c->currency[1] < 'A' ||
        c->currency[1] > 'Z' || c->currency[2] < 'A' || c->currency[2] > 'Z') {
        bad(c, 400, "parameter_invalid", "currency", "Invalid currency: must be a three-letter ISO code.");
        goto out;
    }
    c->currency[3] = '\0';
    if ((v = sim_form_get(&f, "confirm")) == NULL || strcmp(v->val, "true") != 0) {
        bad(c, 400, "parameter_invalid", "confirm", "psp-sim supports confirm=true creates only.");
        goto out;
    }
    if ((v = sim_form_get(&f, "payment_method")) == NULL || v->val_len == 0 || v->val_len > SIM_ACCOUNT_MAX ||
        !sim_printable_ascii(v->val, v->val_len)) {
        bad(c, 400, "parameter_missing", "payment_method",
            "You cannot confirm this PaymentIntent because it's missing a payment method.");
        goto out;
    }
    memcpy(c->account, v->val, v->val_len + 1);
    c->account_len = v->val_len;
    if (!c->has_sim_fate) {
        if (strcmp(c->account, "pm_card_chargeDeclined") == 0) {
            c->force = FORCE_DECLINE;
        } else if (strcmp(c->account, "pm_card_chargeDeclinedInsufficientFunds") == 0) {
            c->force = FORCE_DECLINE;
            if (!c->has_decline_code)
                (void)sim_parse_sim_decline_code(c, "insufficient_funds");
        }
    }
    if ((v = sim_form_get(&f, "capture_method")) != NULL) {
        if (strcmp(v->val, "manual") == 0) {
            r->manual = true;
        } else if (strcmp(v->val, "automatic") != 0 && strcmp(v->val, "automatic_async") != 0) {
            bad(c, 400, "parameter_invalid", "capture_method", "Invalid capture_method.");
            goto out;
        }
    }
    if (!r->has_key && gid[0] != '\0') {
        c->key_len = strlen(gid);
        memcpy(c->key, gid, c->key_len + 1);
    }
    if (meta.len > 0) {
        r->meta = sim_xmalloc(meta.len);
        memcpy(r->meta, meta.data, meta.len);
        r->meta_len = meta.len;
    }
    rc = 0;
out:
    sim_form_free(&f);
    sim_buf_free(&meta);
    return rc;
}

static int parse_cancel(sim_call *c, struct evhttp_request *req)
{
    stripe_req *r = req_of(c);
    sim_form f;
    if (parse_idempotency_key(c, req) != 0 || parse_body(c, req, &f) != 0)
        return -1;
    for (size_t i = 0; i < f.n; i++) {
        if (strcmp(f.pairs[i].key, "cancellation_reason") != 0 && strcmp(f.pairs[i].key, "expand[]") != 0) {
            char msg[SIM_FORM_KEY_MAX + 64];
            snprintf(msg, sizeof(msg), "Received unknown parameter: %s", f.pairs[i].key);
            sim_form_free(&f);
            return bad(c, 400, "parameter_unknown", f.pairs[i].key, msg);
        }
    }
    char path[64];
    snprintf(path, sizeof(path), "POST cancel %s", r->pi_id);
    r->fp = sim_form_fingerprint(&f) ^ str_hash(path);
    sim_form_free(&f);
    return 0;
}

static int parse_time(sim_call *c, const sim_form_pair *p, int64_t *out)
{
    if (sim_parse_i64(p->val, p->val_len, false, out) != 0)
        return bad(c, 400, "parameter_invalid_integer", p->key, "Invalid timestamp: must be an integer.");
    return 0;
}

static int parse_list(sim_call *c, const char *query)
{
    stripe_req *r = req_of(c);
    sim_form f;
    char err[128];
    int rc = -1;
    c->limit = 10;
    if (query == NULL)
        return 0;
    if (sim_form_parse(query, strlen(query), &f, err, sizeof(err)) != 0)
        return bad(c, 400, "parameter_invalid", NULL, err);
    for (size_t i = 0; i < f.n; i++) {
        const sim_form_pair *p = &f.pairs[i];
        int64_t v;
        if (strcmp(p->key, "limit") == 0) {
            if (sim_parse_i64(p->val, p->val_len, false, &v) != 0 || v < 1 || v > LIST_LIMIT_MAX) {
                bad(c, 400, "parameter_invalid_integer", "limit", "limit must be an integer in 1..100.");
                goto out;
            }
            c->limit = (int)v;
        } else if (r->search && strcmp(p->key, "query") == 0) {
            /* metadata['k']:'v' and status:'v' clauses joined by " AND " */
            const char *q = p->val;
            while (*q) {
                if (r->nclauses == SEARCH_CLAUSES_MAX)
                    goto badq;
                clause *cl = &r->clauses[r->nclauses++];
                const char *vstart;
                if (strncmp(q, "status:", 7) == 0) {
                    cl->status = true;
                    vstart = q + 7;
                } else if (strncmp(q, "metadata[", 9) == 0 && (q[9] == '\'' || q[9] == '"')) {
                    char qc = q[9];
                    const char *ke = strchr(q + 10, qc);
                    if (ke == NULL || ke - (q + 10) == 0 || ke - (q + 10) > META_KEY_MAX || ke[1] != ']' ||
                        ke[2] != ':')
                        goto badq;
                    memcpy(cl->k, q + 10, (size_t)(ke - (q + 10)));
                    cl->k[ke - (q + 10)] = '\0';
                    vstart = ke + 3;
                } else {
                    goto badq;
                }
                if (*vstart != '\'' && *vstart != '"')
                    goto badq;
                const char *ve = strchr(vstart + 1, *vstart);
                if (ve == NULL || ve - (vstart + 1) > META_VALUE_MAX)
                    goto badq;
                memcpy(cl->v, vstart + 1, (size_t)(ve - (vstart + 1)));
                cl->v[ve - (vstart + 1)] = '\0';
                q = ve + 1;
                if (*q == '\0')
                    break;
                if (strncmp(q, " AND ", 5) != 0)
                    goto badq;
                q += 5;
            }
        } else if (r->search && strcmp(p->key, "page") == 0) {
            if (p->val_len < 5 || strncmp(p->val, "page_", 5) != 0 ||
                sim_parse_i64(p->val + 5, p->val_len - 5, false, &v) != 0) {
                bad(c, 400, "parameter_invalid", "page", "Invalid page cursor.");
                goto out;
            }
            r->has_page = true;
            r->page_seq = (uint64_t)v;
        } else if (!r->search && strcmp(p->key, "created") == 0) {
            if (parse_time(c, p, &v) != 0)
                goto out;
            c->has_gte = r->has_lte = true;
            c->gte = r->lte = v;
        } else if (!r->search && strncmp(p->key, "created[", 8) == 0) {
            if (parse_time(c, p, &v) != 0)
                goto out;
            if (strcmp(p->key, "created[gte]") == 0) {
                c->has_gte = true;
                c->gte = v;
            } else if (strcmp(p->key, "created[gt]") == 0) {
                r->has_gt = true;
                r->gt = v;
            } else if (strcmp(p->key, "created[lt]") == 0) {
                c->has_lt = true;
                c->lt = v;
            } else if (strcmp(p->key, "created[lte]") == 0) {
                r->has_lte = true;
                r->lte = v;
            } else {
                bad(c, 400, "parameter_unknown", p->key, "Received unknown parameter.");
                goto out;
            }
        } else if (!r->search && strcmp(p->key, "starting_after") == 0) {
            if (p->val_len != 27 || strncmp(p->val, "pi_", 3) != 0 ||
                sim_parse_i64(p->val + 3, 24, false, &v) != 0) {
                bad(c, 400, "resource_missing", "starting_after", "No such payment_intent.");
                goto out;
            }
            c->has_after = true;
            c->after_seq = (uint64_t)v;
        } else if (!r->search && strcmp(p->key, "expand[]") == 0) {
            r->expand_charge = r->expand_charge || (p->val_len == 18 && memcmp(p->val, "data.latest_charge", 18) == 0);
        } else if (strcmp(p->key, "expand[]") != 0) {
            char msg[SIM_FORM_KEY_MAX + 64];
            snprintf(msg, sizeof(msg), "Received unknown parameter: %s (psp-sim)", p->key);
            bad(c, 400, "parameter_unknown", p->key, msg);
            goto out;
        }
    }
    if (r->search && r->nclauses == 0) {
        bad(c, 400, "parameter_missing", "query", "Missing required param: query.");
        goto out;
    }
    rc = 0;
    goto out;
badq:
    bad(c, 400, "parameter_invalid", "query",
        "psp-sim search supports metadata['key']:'value' and status:'value' clauses joined by AND.");
out:
    sim_form_free(&f);
    return rc;
}

/* ---- routing ------------------------------------------------------------ */

static bool base64_decode_token(const char *in, char *out, size_t cap, size_t *outlen)
{
    size_t n = strlen(in);
    if (n == 0 || n % 4 != 0 || n / 4 * 3 + 1 > cap)
        return false;
    int got = EVP_DecodeBlock((unsigned char *)out, (const unsigned char *)in, (int)n);
    if (got < 0)
        return false;
    size_t m = (size_t)got;
    if (in[n - 1] == '=')
        m--;
    if (in[n - 2] == '=')
        m--;
    out[m] = '\0';
    *outlen = m;
    return true;
}

/* Authorization: Bearer <key>, or Basic base64("<key>:"), as Stripe takes it. */
static bool authorized(sim_server *s, struct evhttp_request *req)
{
    if (s->token == NULL)
        return true;
    const char *h = evhttp_find_header(evhttp_request_get_input_headers(req), "Authorization");
    if (h == NULL)
        return false;
    if (strncasecmp(h, "Bearer ", 7) == 0)
        return sim_token_matches(s, h + 7, strlen(h + 7));
    if (strncasecmp(h, "Basic ", 6) == 0) {
        char dec[4200];
        size_t n;
        if (!base64_decode_token(h + 6, dec, sizeof(dec), &n) || n == 0 || dec[n - 1] != ':')
            return false;
        return sim_token_matches(s, dec, n - 1);
    }
    return false;
}

static int stripe_route(sim_server *s, struct evhttp_request *req, const char *path, size_t path_len,
                        const char *query, sim_call *c)
{
    enum evhttp_cmd_type method = evhttp_request_get_command(req);
    const size_t plen = sizeof(PI_PATH) - 1;
    stripe_req *r;
    bool ok = false;

    if (path_len >= plen && memcmp(path, PI_PATH, plen) == 0) {
        const char *rest = path + plen;
        size_t rlen = path_len - plen;
        r = req_of(c);
        if (rlen == 0) {
            c->op = method == EVHTTP_REQ_POST ? SIM_OP_CREATE : SIM_OP_LIST;
            ok = method == EVHTTP_REQ_POST || method == EVHTTP_REQ_GET;
        } else if (rlen == 7 && memcmp(rest, "/search", 7) == 0) {
            c->op = SIM_OP_LIST;
            r->search = true;
            ok = method == EVHTTP_REQ_GET;
        } else if (rest[0] == '/' && rlen > 1) {
            const char *slash = memchr(rest + 1, '/', rlen - 1);
            size_t idlen = slash != NULL ? (size_t)(slash - rest - 1) : rlen - 1;
            if (idlen < sizeof(r->pi_id)) {
                memcpy(r->pi_id, rest + 1, idlen);
                r->pi_id[idlen] = '\0';
                if (slash == NULL) {
                    c->op = SIM_OP_GET;
                    ok = method == EVHTTP_REQ_GET;
                } else {
                    c->op = SIM_OP_CANCEL;
                    ok = (size_t)(path + path_len - slash) == 7 && memcmp(slash, "/cancel", 7) == 0 &&
                         method == EVHTTP_REQ_POST;
                }
            }
        }
    }
    if (!ok) {
        char msg[200];
        snprintf(msg, sizeof(msg), "Unrecognized request URL (%s: %.*s).",
                 method == EVHTTP_REQ_GET ? "GET" : method == EVHTTP_REQ_POST ? "POST" : "other",
                 (int)(path_len > 100 ? 100 : path_len), path);
        error_json(&s->body, "invalid_request_error", NULL, NULL, msg);
        sim_reply_now(s, req, 404);
        return 1;
    }
    if (sim_count_request(s, req, c->op))
        return 1;
    if (!authorized(s, req)) {
        error_json(&s->body, "invalid_request_error", NULL, NULL,
                   "Invalid API Key provided (psp-sim: Authorization: Bearer <key> or Basic).");
        sim_reply_now(s, req, 401);
        return 1;
    }
    switch (c->op) {
    case SIM_OP_CREATE: (void)parse_create(c, req); break;
    case SIM_OP_CANCEL: (void)parse_cancel(c, req); break;
    case SIM_OP_LIST: (void)parse_list(c, query); break;
    default: break;
    }
    return 0;
}

/* ---- processing --------------------------------------------------------- */

static sim_payment *find_pi(sim_server *s, const char *id)
{
    uint64_t seq;
    if (sim_parse_processor_id(s, id, strlen(id), &seq) != 0)
        return NULL;
    return sim_store_find_seq(s->store, seq);
}

static int no_such(sim_server *s, const char *id)
{
    char msg[96];
    snprintf(msg, sizeof(msg), "No such payment_intent: '%.40s'", id);
    error_json(&s->body, "invalid_request_error", "resource_missing", "intent", msg);
    return 404;
}

/* The answer of a create or cancel for p as it is now: 200 + PI, or 402
 * card_error with the PI for a decline. */
static int pi_answer(sim_server *s, sim_payment *p)
{
    sim_buf *b = &s->body;
    sim_buf_reset(b);
    if (p->status == SIM_ST_DECLINED) {
        sim_buf_adds(b, "{\"error\":{\"code\":\"card_declined\",\"decline_code\":");
        sim_buf_add_jstr(b, p->decline_code, strlen(p->decline_code));
        sim_buf_adds(b, ",\"message\":\"Your card was declined.\",\"payment_intent\":");
        pi_json(s, p, p->status, b);
        sim_buf_adds(b, ",\"type\":\"card_error\"}}");
        return 402;
    }
    pi_json(s, p, p->status, b);
    return 200;
}

static int create_new(sim_server *s, sim_call *c)
{
    stripe_req *r = c->mdata;
    sim_counters *ctr = sim_store_counters(s->store);
    sim_payment *p;
    sim_new_payment np = {
        .key = c->key,
        .key_len = c->key_len,
        .amount = c->amount,
        .currency = c->currency,
        .account = c->account,
        .account_len = c->account_len,
        .has_reference = r->meta_len > 0,
        .reference = r->meta,
        .reference_len = r->meta_len,
    };
    if (sim_store_insert(s->store, &np, &p) != 0) {
        error_json(&s->body, "api_error", NULL, NULL, "psp-sim holds --max-payments records");
        return 503;
    }
    ctr->processed_creates++;
    if (!r->has_key)
        p->flags |= SIM_PF_NO_KEY;
    const char *dcode = c->has_decline_code ? c->decline_code : "generic_decline";
    switch (sim_draw_outcome(s, c)) {
    case FORCE_DECLINE:
        sim_store_set_status(s->store, p, SIM_ST_DECLINED, dcode, "create");
        break;
    case FORCE_ACTION:
        p->flags |= SIM_PF_ACTION;
        /* fall through */
    case FORCE_PENDING:
        sim_store_set_pending(s->store, p, sim_now_ms() + s->faults.settle_ms, s->faults.settle_status, dcode);
        sim_settle_rearm(s);
        break;
    default:
        if (r->manual)
            p->flags |= SIM_PF_UNCAPTURED;
        sim_store_set_status(s->store, p, SIM_ST_SUCCEEDED, NULL, "create");
        break;
    }
    return pi_answer(s, p);
}

static int api_error_500(sim_server *s, const char *what)
{
    error_json(&s->body, "api_error", NULL, NULL, what);
    return 500;
}

/* Create and cancel: the idempotency layer around do_op. */
static int idempotent(sim_server *s, sim_call *c, int (*do_op)(sim_server *, sim_call *))
{
    stripe_req *r = c->mdata;
    sim_counters *ctr = sim_store_counters(s->store);
    sim_idem *rec = NULL;
    int code;

    if (r->has_key) {
        rec = sim_idem_get(s, st_of(s)->keys, c->key, c->key_len);
        if (rec != NULL && rec->owner != 0 && rec->owner != c->token) {
            ctr->keys_in_use++;
            error_json(&s->body, "invalid_request_error", "idempotency_key_in_use", NULL,
                       "There is currently another in-progress request using this Idempotent Key (that probably "
                       "means you submitted twice, and the other request is still going through).");
            return 409;
        }
        if (rec != NULL && rec->owner == 0) {
            if (rec->fp != r->fp) {
                ctr->conflicts++;
                char msg[400];
                snprintf(msg, sizeof(msg),
                         "Keys for idempotent requests can only be used with the same parameters they were first "
                         "used with. Try using a key other than '%.200s' if you meant to execute a different "
                         "request.",
                         c->key);
                error_json(&s->body, "idempotency_error", NULL, NULL, msg);
                return 400;
            }
            ctr->replays++;
            sim_buf_reset(&s->body);
            sim_buf_add(&s->body, rec->body, rec->len);
            sim_add_header(s, "Idempotent-Replayed", "true");
            sim_add_header(s, "Idempotency-Key", "%.90s", c->key);
            if (c->fate == FATE_FAIL_AFTER) {
                ctr->failed_after++;
                return api_error_500(s, "psp-sim fail_after: an error on the retry itself");
            }
            if (c->fate == FATE_DROP_AFTER) {
                ctr->dropped_after++;
                return 0;
            }
            return rec->status;
        }
        if (rec == NULL)
            rec = sim_idem_begin(st_of(s)->keys, c->key, c->key_len, r->fp, c->token);
        sim_add_header(s, "Idempotency-Key", "%.90s", c->key);
    }
    code = do_op(s, c);
    if (c->fate == FATE_FAIL_AFTER) {
        /* Execution began: Stripe saves this 500 and replays it. */
        ctr->failed_after++;
        code = api_error_500(s, "An unknown error occurred (psp-sim fail_after: the request was processed).");
    }
    if (rec != NULL)
        sim_idem_save(rec, code, &s->body);
    if (c->fate == FATE_DROP_AFTER) {
        ctr->dropped_after++;
        return 0;
    }
    return code;
}

static int do_cancel(sim_server *s, sim_call *c)
{
    stripe_req *r = c->mdata;
    sim_payment *p = find_pi(s, r->pi_id);
    if (p == NULL)
        return no_such(s, r->pi_id);
    sim_store_touch(s->store, p, sim_now_ms());
    bool ok = p->status == SIM_ST_DECLINED || (p->status == SIM_ST_SUCCEEDED && (p->flags & SIM_PF_UNCAPTURED)) ||
              (p->status == SIM_ST_PENDING && ((p->flags & SIM_PF_ACTION) || s->faults.stripe_cancel_processing));
    if (!ok) {
        char msg[400];
        sim_buf *b = &s->body;
        snprintf(msg, sizeof(msg),
                 "You cannot cancel this PaymentIntent because it has a status of %s. Only a PaymentIntent with "
                 "one of the following statuses may be canceled: requires_payment_method, requires_capture, "
                 "requires_confirmation, requires_action, processing.",
                 pi_status(p->status, p->flags));
        sim_buf_reset(b);
        sim_buf_adds(b, "{\"error\":{\"code\":\"payment_intent_unexpected_state\",\"message\":");
        sim_buf_add_jstr(b, msg, strlen(msg));
        sim_buf_adds(b, ",\"payment_intent\":");
        pi_json(s, p, p->status, b);
        sim_buf_adds(b, ",\"type\":\"invalid_request_error\"}}");
        return 400;
    }
    p->flags &= (uint8_t)~SIM_PF_UNCAPTURED;
    sim_store_set_status(s->store, p, SIM_ST_CANCELED, NULL, "cancel");
    sim_buf_reset(&s->body);
    pi_json(s, p, p->status, &s->body);
    return 200;
}

static bool meta_match(const sim_payment *p, const char *k, const char *v)
{
    const char *m = p->reference, *end = p->reference + (p->has_reference ? p->reference_len : 0);
    while (m < end) {
        const char *mv = m + strlen(m) + 1;
        if (strcmp(m, k) == 0)
            return strcmp(mv, v) == 0;
        m = mv + strlen(mv) + 1;
    }
    return false;
}

static int do_list(sim_server *s, sim_call *c)
{
    stripe_req *r = c->mdata;
    sim_buf *b = &s->body;
    int64_t now = sim_now_ms(), lag = s->faults.search_lag_ms;
    size_t lo = 0, hi;
    int n = 0;
    bool more = false;

    sim_store_settle_due(s->store, now);
    sim_settle_rearm(s);
    /* Newest first: walk [lo, hi) backwards. */
    if (c->has_gte)
        lo = sim_store_list_start(s->store, true, c->gte, false, 0);
    if (r->has_gt) {
        size_t g = sim_store_list_start(s->store, true, r->gt + 1, false, 0);
        if (g > lo)
            lo = g;
    }
    hi = sim_store_count(s->store);
    if (c->has_lt) {
        size_t l = sim_store_list_start(s->store, true, c->lt, false, 0);
        if (l < hi)
            hi = l;
    }
    if (r->has_lte) {
        size_t l = sim_store_list_start(s->store, true, r->lte + 1, false, 0);
        if (l < hi)
            hi = l;
    }
    uint64_t below = c->has_after ? c->after_seq : r->has_page ? r->page_seq : 0;
    if (c->has_after || r->has_page) {
        size_t l = sim_store_list_start(s->store, false, 0, true, below - (below > 0 ? 1 : 0));
        if (l < hi)
            hi = l;
    }
    sim_buf_reset(b);
    sim_buf_addf(b, "{\"object\":\"%s\",\"url\":\"%s\",\"data\":[", r->search ? "search_result" : "list",
                 r->search ? PI_PATH "/search" : PI_PATH);
    uint64_t last_seq = 0;
    for (size_t i = hi; i > lo; i--) {
        sim_payment *p = sim_store_at(s->store, i - 1);
        int status = p->status;
        if (r->search) {
            if (now < p->created_ms + lag)
                continue; /* not indexed yet */
            if (now < p->changed_ms + lag && p->prev_status != SIM_ST_NONE)
                status = p->prev_status; /* the index still shows the status before */
            bool match = true;
            for (int k = 0; k < r->nclauses && match; k++)
                match = r->clauses[k].status ? strcmp(pi_status(status, p->flags), r->clauses[k].v) == 0
                                             : meta_match(p, r->clauses[k].k, r->clauses[k].v);
            if (!match)
                continue;
        }
        if (n == c->limit) {
            more = true;
            break;
        }
        if (n++ > 0)
            sim_buf_addc(b, ',');
        pi_json_ex(s, p, status, b, r->expand_charge);
        last_seq = p->seq;
    }
    sim_buf_addf(b, "],\"has_more\":%s", more ? "true" : "false");
    if (r->search) {
        if (more)
            sim_buf_addf(b, ",\"next_page\":\"page_%llu\"", (unsigned long long)last_seq);
        else
            sim_buf_adds(b, ",\"next_page\":null");
    }
    sim_buf_addc(b, '}');
    return 200;
}

static int stripe_execute(sim_server *s, sim_call *c)
{
    stripe_req *r = c->mdata;
    sim_counters *ctr = sim_store_counters(s->store);
    int code;

    sim_add_header(s, "Request-Id", "req_psp_sim_%llu", (unsigned long long)c->token);
    if (c->bad_status != 0) {
        error_json(&s->body, "invalid_request_error", r != NULL ? r->err_code : NULL,
                   r != NULL ? r->err_param : NULL, c->bad_msg);
        return c->bad_status;
    }
    if (c->fate == FATE_FAIL_BEFORE) {
        ctr->failed_before++;
        error_json(&s->body, "api_error", NULL, NULL, "psp-sim fail_before: nothing was processed.");
        return 503;
    }
    switch (c->op) {
    case SIM_OP_CREATE: return idempotent(s, c, create_new);
    case SIM_OP_CANCEL: return idempotent(s, c, do_cancel);
    case SIM_OP_GET: {
        sim_payment *p = find_pi(s, r->pi_id);
        if (p == NULL) {
            code = no_such(s, r->pi_id);
        } else {
            sim_store_touch(s->store, p, sim_now_ms());
            sim_buf_reset(&s->body);
            pi_json(s, p, p->status, &s->body);
            code = 200;
        }
        break;
    }
    case SIM_OP_LIST: code = do_list(s, c); break;
    default: code = 404; break;
    }
    if (c->fate == FATE_FAIL_AFTER) {
        ctr->failed_after++;
        return api_error_500(s, "psp-sim fail_after: the request was processed.");
    }
    if (c->fate == FATE_DROP_AFTER) {
        ctr->dropped_after++;
        return 0;
    }
    return code;
}

static void stripe_rate_limited(sim_server *s)
{
    error_json(&s->body, "invalid_request_error", "rate_limit", NULL,
               "Request rate limit exceeded. Learn more about rate limits here https://stripe.com/docs/rate-limits.");
}

/* A create or cancel with a key is held for its latency: the key is now in
 * flight, so a concurrent request with it gets 409 idempotency_key_in_use. */
static void stripe_held(sim_server *s, sim_call *c)
{
    stripe_req *r = c->mdata;
    if (r == NULL || !r->has_key || (c->op != SIM_OP_CREATE && c->op != SIM_OP_CANCEL))
        return;
    if (sim_idem_get(s, st_of(s)->keys, c->key, c->key_len) == NULL)
        (void)sim_idem_begin(st_of(s)->keys, c->key, c->key_len, r->fp, c->token);
}

static void stripe_reset(sim_server *s)
{
    sim_map_clear(st_of(s)->keys);
}

static void stripe_destroy(sim_server *s)
{
    if (s->mstate == NULL)
        return;
    sim_map_free(st_of(s)->keys);
    free(s->mstate);
    s->mstate = NULL;
}

void sim_stripe_init(sim_server *s)
{
    stripe_state *st = sim_xcalloc(1, sizeof(*st));
    st->keys = sim_idem_table();
    s->mstate = st;
    sim_store_set_hook(s->store, status_hook, s);
}

const sim_mode_ops sim_stripe_ops = {
    .mode = SIM_MODE_STRIPE,
    .route = stripe_route,
    .execute = stripe_execute,
    .rate_limited = stripe_rate_limited,
    .held = stripe_held,
    .reset = stripe_reset,
    .destroy = stripe_destroy,
};
