/*
 * sim_store.c - psp-sim's payment records (see sim_store.h for the record
 * lifecycle): an open-addressing hash index by key, an array in creation
 * order, a min-heap of pending settlements, counters, and the state file.
 */
#include "sim_store.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define STATE_VERSION 1
#define STATE_LINE_MAX (64 * 1024)

typedef struct settle_entry {
    int64_t at_ms;
    sim_payment *p;
} settle_entry;

struct sim_store {
    size_t max_payments;
    /* hash index: slots[hash & mask], linear probing, no deletions */
    sim_payment **slots;
    size_t mask;
    /* creation order */
    sim_payment **order;
    size_t count;
    size_t order_cap;
    /* pending settlements, earliest first */
    settle_entry *heap;
    size_t heap_len;
    size_t heap_cap;
    uint64_t next_seq;
    int64_t last_created;
    sim_counters counters;
    uint64_t status_counts[SIM_ST__COUNT];
    sim_status_hook hook;
    void *hook_arg;
};

static const char *const status_names[SIM_ST__COUNT] = {
    [SIM_ST_NONE] = "none",
    [SIM_ST_SUCCEEDED] = "succeeded",
    [SIM_ST_DECLINED] = "declined",
    [SIM_ST_PENDING] = "pending",
    [SIM_ST_CANCELED] = "canceled",
};

const char *sim_status_name(sim_status st)
{
    return (unsigned)st < SIM_ST__COUNT ? status_names[st] : "?";
}

static int status_from_name(const char *s)
{
    for (int i = SIM_ST_SUCCEEDED; i < SIM_ST__COUNT; i++)
        if (strcmp(s, status_names[i]) == 0)
            return i;
    return -1;
}

/* Every scalar counter by name: drives the JSON output and the state file. */
static const struct {
    const char *name;
    size_t off;
} counter_fields[] = {
    {"processed_creates", offsetof(sim_counters, processed_creates)},
    {"succeeded", offsetof(sim_counters, succeeded)},
    {"declined", offsetof(sim_counters, declined)},
    {"pending", offsetof(sim_counters, pending)},
    {"canceled", offsetof(sim_counters, canceled)},
    {"failed_before", offsetof(sim_counters, failed_before)},
    {"failed_after", offsetof(sim_counters, failed_after)},
    {"dropped_after", offsetof(sim_counters, dropped_after)},
    {"blackholed", offsetof(sim_counters, blackholed)},
    {"refused", offsetof(sim_counters, refused)},
    {"replays", offsetof(sim_counters, replays)},
    {"conflicts", offsetof(sim_counters, conflicts)},
    {"tombstones", offsetof(sim_counters, tombstones)},
    {"tombstone_hits", offsetof(sim_counters, tombstone_hits)},
    {"refunds", offsetof(sim_counters, refunds)},
    {"rate_limited", offsetof(sim_counters, rate_limited)},
    {"keys_in_use", offsetof(sim_counters, keys_in_use)},
    {"keys_pruned", offsetof(sim_counters, keys_pruned)},
    {"cancels_received", offsetof(sim_counters, cancels_received)},
    {"webhooks_queued", offsetof(sim_counters, webhooks_queued)},
    {"webhooks_delivered", offsetof(sim_counters, webhooks_delivered)},
    {"webhooks_failed", offsetof(sim_counters, webhooks_failed)},
    {"webhooks_given_up", offsetof(sim_counters, webhooks_given_up)},
    {"webhooks_dropped", offsetof(sim_counters, webhooks_dropped)},
    {"webhooks_forged", offsetof(sim_counters, webhooks_forged)},
};

static uint64_t *counter_at(sim_counters *c, size_t off)
{
    return (uint64_t *)(void *)((char *)c + off);
}

static uint64_t hash_key(const char *k, size_t n)
{
    uint64_t h = 1469598103934665603ULL; /* FNV-1a */
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)k[i];
        h *= 1099511628211ULL;
    }
    return h ^ (h >> 29);
}

sim_store *sim_store_new(size_t max_payments)
{
    sim_store *st = sim_xcalloc(1, sizeof(*st));
    st->max_payments = max_payments;
    st->mask = 1024 - 1;
    st->slots = sim_xcalloc(st->mask + 1, sizeof(*st->slots));
    st->next_seq = 1;
    return st;
}

static void free_records(sim_store *st)
{
    for (size_t i = 0; i < st->count; i++)
        free(st->order[i]);
    st->count = 0;
    memset(st->slots, 0, (st->mask + 1) * sizeof(*st->slots));
    st->heap_len = 0;
}

void sim_store_free(sim_store *st)
{
    if (st == NULL)
        return;
    free_records(st);
    free(st->slots);
    free(st->order);
    free(st->heap);
    free(st);
}

void sim_store_clear(sim_store *st)
{
    free_records(st);
    memset(&st->counters, 0, sizeof(st->counters));
    memset(st->status_counts, 0, sizeof(st->status_counts));
}

size_t sim_store_count(const sim_store *st)
{
    return st->count;
}

sim_counters *sim_store_counters(sim_store *st)
{
    return &st->counters;
}

const uint64_t *sim_store_status_counts(const sim_store *st)
{
    return st->status_counts;
}

void sim_store_set_hook(sim_store *st, sim_status_hook hook, void *arg)
{
    st->hook = hook;
    st->hook_arg = arg;
}

sim_payment *sim_store_find_seq(sim_store *st, uint64_t seq)
{
    size_t lo = 0, hi = st->count;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (st->order[mid]->seq < seq)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < st->count && st->order[lo]->seq == seq ? st->order[lo] : NULL;
}

sim_payment *sim_store_find(sim_store *st, const char *key, size_t key_len)
{
    uint64_t h = hash_key(key, key_len);
    for (size_t i = h & st->mask;; i = (i + 1) & st->mask) {
        sim_payment *p = st->slots[i];
        if (p == NULL)
            return NULL;
        if (p->hash == h && p->key_len == key_len && memcmp(p->key, key, key_len) == 0)
            return p;
    }
}

static void index_put(sim_payment **slots, size_t mask, sim_payment *p)
{
    size_t i = p->hash & mask;
    while (slots[i] != NULL)
        i = (i + 1) & mask;
    slots[i] = p;
}

/* Keeps the hash table at most half full. */
static void index_grow(sim_store *st)
{
    if ((st->count + 1) * 2 <= st->mask + 1)
        return;
    size_t nmask = (st->mask + 1) * 2 - 1;
    sim_payment **ns = sim_xcalloc(nmask + 1, sizeof(*ns));
    for (size_t i = 0; i <= st->mask; i++)
        if (st->slots[i] != NULL)
            index_put(ns, nmask, st->slots[i]);
    free(st->slots);
    st->slots = ns;
    st->mask = nmask;
}

/* Makes the record without checking the cap; seq and created are given. */
static sim_payment *insert_raw(sim_store *st, const sim_new_payment *np, uint64_t seq, int64_t created)
{
    size_t acc_len = np->tombstone ? 0 : np->account_len;
    size_t ref_len = np->has_reference ? np->reference_len : 0;
    sim_payment *p = sim_xmalloc(sizeof(*p) + np->key_len + 1 + acc_len + 1 + ref_len + 1);
    memset(p, 0, sizeof(*p));
    p->seq = seq;
    p->created = created;
    p->hash = hash_key(np->key, np->key_len);
    p->status = SIM_ST_NONE;
    p->tombstone = np->tombstone;
    p->key = p->data;
    memcpy(p->key, np->key, np->key_len);
    p->key[np->key_len] = '\0';
    p->key_len = (uint16_t)np->key_len;
    p->account = p->key + np->key_len + 1;
    p->account_len = (uint16_t)acc_len;
    if (acc_len > 0)
        memcpy(p->account, np->account, acc_len);
    p->account[acc_len] = '\0';
    p->reference = p->account + acc_len + 1;
    p->reference_len = (uint16_t)ref_len;
    if (ref_len > 0)
        memcpy(p->reference, np->reference, ref_len);
    p->reference[ref_len] = '\0';
    p->has_reference = np->has_reference && !np->tombstone;
    if (!np->tombstone) {
        p->amount = np->amount;
        memcpy(p->currency, np->currency, 3);
        p->currency[3] = '\0';
    }

    index_grow(st);
    index_put(st->slots, st->mask, p);
    if (st->count == st->order_cap) {
        st->order_cap = st->order_cap ? st->order_cap * 2 : 1024;
        st->order = sim_xrealloc(st->order, st->order_cap * sizeof(*st->order));
    }
    st->order[st->count++] = p;
    if (seq >= st->next_seq)
        st->next_seq = seq + 1;
    if (created > st->last_created)
        st->last_created = created;
    st->status_counts[SIM_ST_NONE]++;
    return p;
}

int sim_store_insert(sim_store *st, const sim_new_payment *np, sim_payment **out)
{
    if (st->count >= st->max_payments)
        return -1;
    int64_t now = sim_now_ms();
    int64_t created = now / 1000;
    if (created < st->last_created)
        created = st->last_created; /* the wall clock stepped back: keep the order */
    *out = insert_raw(st, np, st->next_seq, created);
    (*out)->created_ms = now;
    (*out)->changed_ms = now;
    return 0;
}

void sim_store_set_status(sim_store *st, sim_payment *p, sim_status to, const char *decline_code,
                          const char *why)
{
    sim_status from = (sim_status)p->status;
    if (to == SIM_ST_DECLINED && decline_code != p->decline_code) {
        const char *code = decline_code != NULL ? decline_code : "card_declined";
        snprintf(p->decline_code, sizeof(p->decline_code), "%s", code);
    }
    st->status_counts[from]--;
    st->status_counts[to]++;
    p->prev_status = (uint8_t)from;
    p->status = (uint8_t)to;
    if (st->hook != NULL) {
        p->changed_ms = sim_now_ms();
        st->hook(st->hook_arg, p, (int)from, why);
    }
    switch (to) {
    case SIM_ST_SUCCEEDED: st->counters.succeeded++; break;
    case SIM_ST_DECLINED: st->counters.declined++; break;
    case SIM_ST_PENDING: st->counters.pending++; break;
    case SIM_ST_CANCELED: st->counters.canceled++; break;
    case SIM_ST_NONE:
    case SIM_ST__COUNT: break;
    }
    if (sim_log_level >= 2)
        sim_log(SIM_LOG_DEBUG, "payment id=psp_%0*llu key=\"%s\" %s -> %s why=%s", SIM_ID_DIGITS,
                (unsigned long long)p->seq, p->key, sim_status_name(from), sim_status_name(to), why);
}

static void heap_push(sim_store *st, int64_t at_ms, sim_payment *p)
{
    if (st->heap_len == st->heap_cap) {
        st->heap_cap = st->heap_cap ? st->heap_cap * 2 : 64;
        st->heap = sim_xrealloc(st->heap, st->heap_cap * sizeof(*st->heap));
    }
    size_t i = st->heap_len++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (st->heap[parent].at_ms <= at_ms)
            break;
        st->heap[i] = st->heap[parent];
        i = parent;
    }
    st->heap[i].at_ms = at_ms;
    st->heap[i].p = p;
}

static void heap_pop(sim_store *st)
{
    settle_entry last = st->heap[--st->heap_len];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= st->heap_len)
            break;
        if (c + 1 < st->heap_len && st->heap[c + 1].at_ms < st->heap[c].at_ms)
            c++;
        if (last.at_ms <= st->heap[c].at_ms)
            break;
        st->heap[i] = st->heap[c];
        i = c;
    }
    if (st->heap_len > 0)
        st->heap[i] = last;
}

void sim_store_set_pending(sim_store *st, sim_payment *p, int64_t settle_at_ms,
                           sim_status settle_status, const char *decline_code)
{
    p->settle_at_ms = settle_at_ms;
    p->settle_status = (uint8_t)settle_status;
    snprintf(p->decline_code, sizeof(p->decline_code), "%s",
             decline_code != NULL ? decline_code : "card_declined");
    heap_push(st, settle_at_ms, p);
    sim_store_set_status(st, p, SIM_ST_PENDING, NULL, "create");
}

void sim_store_refund(sim_store *st, sim_payment *p)
{
    if (p->refunded)
        return;
    p->refunded = true;
    st->counters.refunds++;
}

static void settle(sim_store *st, sim_payment *p)
{
    /* decline_code already holds the code set by sim_store_set_pending */
    sim_store_set_status(st, p, (sim_status)p->settle_status, p->decline_code, "settled");
}

void sim_store_touch(sim_store *st, sim_payment *p, int64_t now_ms)
{
    if (p->status == SIM_ST_PENDING && p->settle_at_ms <= now_ms)
        settle(st, p);
}

void sim_store_settle_due(sim_store *st, int64_t now_ms)
{
    while (st->heap_len > 0 && st->heap[0].at_ms <= now_ms) {
        sim_payment *p = st->heap[0].p;
        heap_pop(st);
        /* Canceled or settled lazily meanwhile: nothing left to do. */
        sim_store_touch(st, p, now_ms);
    }
}

int64_t sim_store_next_settle_ms(const sim_store *st)
{
    return st->heap_len > 0 ? st->heap[0].at_ms : -1;
}

size_t sim_store_list_start(const sim_store *st, bool have_gte, int64_t created_gte, bool have_after,
                            uint64_t after_seq)
{
    size_t start = 0;
    if (have_gte) {
        size_t lo = 0, hi = st->count;
        while (lo < hi) {
            size_t mid = lo + (hi - lo) / 2;
            if (st->order[mid]->created < created_gte)
                lo = mid + 1;
            else
                hi = mid;
        }
        start = lo;
    }
    if (have_after) {
        size_t lo = 0, hi = st->count;
        while (lo < hi) {
            size_t mid = lo + (hi - lo) / 2;
            if (st->order[mid]->seq <= after_seq)
                lo = mid + 1;
            else
                hi = mid;
        }
        if (lo > start)
            start = lo;
    }
    return start;
}

sim_payment *sim_store_at(const sim_store *st, size_t i)
{
    return i < st->count ? st->order[i] : NULL;
}

int sim_parse_id(const char *s, size_t n, uint64_t *seq)
{
    int64_t v;
    if (n <= 4 || memcmp(s, "psp_", 4) != 0 || sim_parse_i64(s + 4, n - 4, false, &v) != 0)
        return -1;
    *seq = (uint64_t)v;
    return 0;
}

static void add_id(sim_buf *b, uint64_t seq)
{
    char id[32];
    int n = snprintf(id, sizeof(id), "\"psp_%0*llu\"", SIM_ID_DIGITS, (unsigned long long)seq);
    sim_buf_add(b, id, (size_t)n);
}

/* The payment object; with for_state, also what a restart needs. */
static void payment_json(const sim_payment *p, sim_buf *b, bool for_state)
{
    sim_buf_adds(b, "{\"id\":");
    add_id(b, p->seq);
    sim_buf_adds(b, ",\"idempotency_key\":");
    sim_buf_add_jstr(b, p->key, p->key_len);
    if (p->tombstone) {
        sim_buf_adds(b, ",\"amount\":null,\"currency\":null,\"account\":null");
    } else {
        sim_buf_adds(b, ",\"amount\":");
        sim_buf_add_i64(b, p->amount);
        sim_buf_adds(b, ",\"currency\":");
        sim_buf_add_jstr(b, p->currency, 3);
        sim_buf_adds(b, ",\"account\":");
        sim_buf_add_jstr(b, p->account, p->account_len);
    }
    sim_buf_adds(b, ",\"reference\":");
    if (p->has_reference)
        sim_buf_add_jstr(b, p->reference, p->reference_len);
    else
        sim_buf_adds(b, "null");
    sim_buf_adds(b, ",\"status\":\"");
    sim_buf_adds(b, status_names[p->status]);
    sim_buf_addc(b, '"');
    if (p->status == SIM_ST_DECLINED) {
        sim_buf_adds(b, ",\"decline_code\":");
        sim_buf_add_jstr(b, p->decline_code, strlen(p->decline_code));
    }
    sim_buf_adds(b, ",\"created\":");
    sim_buf_add_i64(b, p->created);
    if (p->refunded)
        sim_buf_adds(b, ",\"refunded\":true");
    if (for_state) {
        if (p->tombstone)
            sim_buf_adds(b, ",\"tombstone\":true");
        if (p->status == SIM_ST_PENDING) {
            sim_buf_adds(b, ",\"settle_at_ms\":");
            sim_buf_add_i64(b, p->settle_at_ms);
            sim_buf_adds(b, ",\"settle_status\":\"");
            sim_buf_adds(b, status_names[p->settle_status]);
            sim_buf_adds(b, "\",\"settle_decline_code\":");
            sim_buf_add_jstr(b, p->decline_code, strlen(p->decline_code));
        }
    }
    sim_buf_addc(b, '}');
}

void sim_payment_json(const sim_payment *p, sim_buf *b)
{
    payment_json(p, b, false);
}

void sim_counters_json(const sim_counters *c, sim_buf *b)
{
    sim_buf_adds(b, "{\"requests\":{");
    for (int i = 0; i < SIM_OP__COUNT; i++) {
        sim_buf_addf(b, "%s\"%s\":", i ? "," : "", sim_op_name((sim_op)i));
        sim_buf_add_u64(b, c->requests[i]);
    }
    sim_buf_addc(b, '}');
    for (size_t i = 0; i < SIM_ARRAY_LEN(counter_fields); i++) {
        sim_buf_addf(b, ",\"%s\":", counter_fields[i].name);
        sim_buf_add_u64(b, *counter_at((sim_counters *)c, counter_fields[i].off));
    }
    sim_buf_addc(b, '}');
}

int sim_store_save(sim_store *st, const char *path, char *err, size_t errlen)
{
    int rc = -1;
    char tmp[4096];
    FILE *f = NULL;
    sim_buf b;
    sim_buf_init(&b);

    if ((size_t)snprintf(tmp, sizeof(tmp), "%s.tmp", path) >= sizeof(tmp)) {
        snprintf(err, errlen, "state path too long");
        goto out;
    }
    f = fopen(tmp, "w");
    if (f == NULL) {
        snprintf(err, errlen, "open %s: %s", tmp, strerror(errno));
        goto out;
    }
    sim_buf_addf(&b, "{\"psp_sim_state\":%d,\"next_seq\":", STATE_VERSION);
    sim_buf_add_u64(&b, st->next_seq);
    sim_buf_adds(&b, ",\"last_created\":");
    sim_buf_add_i64(&b, st->last_created);
    sim_buf_adds(&b, ",\"counters\":");
    sim_counters_json(&st->counters, &b);
    sim_buf_adds(&b, "}\n");
    for (size_t i = 0; i <= st->count; i++) {
        if (i < st->count) {
            payment_json(st->order[i], &b, true);
            sim_buf_addc(&b, '\n');
        }
        if (b.len >= (1u << 20) || (i == st->count && b.len > 0)) {
            if (fwrite(b.data, 1, b.len, f) != b.len) {
                snprintf(err, errlen, "write %s: %s", tmp, strerror(errno));
                goto out;
            }
            sim_buf_reset(&b);
        }
    }
    if (fflush(f) != 0 || fsync(fileno(f)) != 0) {
        snprintf(err, errlen, "write %s: %s", tmp, strerror(errno));
        goto out;
    }
    if (fclose(f) != 0) {
        f = NULL;
        snprintf(err, errlen, "close %s: %s", tmp, strerror(errno));
        goto out;
    }
    f = NULL;
    if (rename(tmp, path) != 0) {
        snprintf(err, errlen, "rename %s: %s", tmp, strerror(errno));
        goto out;
    }
    /* Make the rename itself durable. */
    char dir[4096];
    snprintf(dir, sizeof(dir), "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash == NULL)
        snprintf(dir, sizeof(dir), ".");
    else if (slash == dir)
        dir[1] = '\0';
    else
        *slash = '\0';
    int dfd = open(dir, O_RDONLY | O_DIRECTORY);
    if (dfd >= 0) {
        (void)fsync(dfd);
        close(dfd);
    }
    rc = 0;
out:
    if (f != NULL) {
        fclose(f);
        unlink(tmp);
    }
    sim_buf_free(&b);
    return rc;
}

/* Field helpers for loading: return NULL/false when absent or mistyped. */
static const char *jstr(const cJSON *o, const char *name)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, name);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

static bool jint(const cJSON *o, const char *name, int64_t *out)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, name);
    if (!cJSON_IsNumber(v) || v->valuedouble != (double)(int64_t)v->valuedouble)
        return false;
    *out = (int64_t)v->valuedouble;
    return true;
}

static int load_header(sim_store *st, const cJSON *h, char *err, size_t errlen)
{
    int64_t version, next_seq, last_created;
    if (!jint(h, "psp_sim_state", &version) || version != STATE_VERSION ||
        !jint(h, "next_seq", &next_seq) || next_seq < 1 || !jint(h, "last_created", &last_created)) {
        snprintf(err, errlen, "line 1: not a psp-sim state header (version %d)", STATE_VERSION);
        return -1;
    }
    st->next_seq = (uint64_t)next_seq;
    st->last_created = last_created;
    const cJSON *c = cJSON_GetObjectItemCaseSensitive(h, "counters");
    const cJSON *req = cJSON_GetObjectItemCaseSensitive(c, "requests");
    int64_t v;
    for (int i = 0; i < SIM_OP__COUNT; i++)
        if (jint(req, sim_op_name((sim_op)i), &v) && v >= 0)
            st->counters.requests[i] = (uint64_t)v;
    for (size_t i = 0; i < SIM_ARRAY_LEN(counter_fields); i++)
        if (jint(c, counter_fields[i].name, &v) && v >= 0)
            *counter_at(&st->counters, counter_fields[i].off) = (uint64_t)v;
    return 0;
}

static int load_record(sim_store *st, const cJSON *o, char *err, size_t errlen)
{
    const char *id = jstr(o, "id");
    const char *key = jstr(o, "idempotency_key");
    const char *status = jstr(o, "status");
    const cJSON *tomb = cJSON_GetObjectItemCaseSensitive(o, "tombstone");
    sim_new_payment np = {0};
    uint64_t seq;
    int64_t created;
    int st_code;

    np.tombstone = cJSON_IsTrue(tomb);
    if (id == NULL || sim_parse_id(id, strlen(id), &seq) != 0 || key == NULL || key[0] == '\0' ||
        strlen(key) > SIM_KEY_MAX || status == NULL || (st_code = status_from_name(status)) < 0 ||
        !jint(o, "created", &created) || (!np.tombstone && !jint(o, "amount", &np.amount))) {
        snprintf(err, errlen, "bad record");
        return -1;
    }
    np.key = key;
    np.key_len = strlen(key);
    if (!np.tombstone) {
        np.currency = jstr(o, "currency");
        np.account = jstr(o, "account");
        if (np.currency == NULL || strlen(np.currency) != 3 || np.account == NULL ||
            strlen(np.account) > SIM_ACCOUNT_MAX) {
            snprintf(err, errlen, "bad record %s", id);
            return -1;
        }
        np.account_len = strlen(np.account);
        np.reference = jstr(o, "reference");
        np.has_reference = np.reference != NULL;
        np.reference_len = np.has_reference ? strlen(np.reference) : 0;
        if (np.reference_len > SIM_REFERENCE_MAX) {
            snprintf(err, errlen, "bad record %s", id);
            return -1;
        }
    }
    if (sim_store_find(st, np.key, np.key_len) != NULL) {
        snprintf(err, errlen, "duplicate key in record %s", id);
        return -1;
    }
    if (st->count > 0 && (seq <= st->order[st->count - 1]->seq || created < st->order[st->count - 1]->created)) {
        snprintf(err, errlen, "record %s out of creation order", id);
        return -1;
    }
    if (st->count >= st->max_payments) {
        snprintf(err, errlen, "more records than --max-payments");
        return -1;
    }
    sim_payment *p = insert_raw(st, &np, seq, created);
    /* Restoring, not changing, a status: the counters come from the header. */
    st->status_counts[SIM_ST_NONE]--;
    st->status_counts[st_code]++;
    p->status = (uint8_t)st_code;
    p->prev_status = (uint8_t)st_code;
    p->created_ms = created * 1000;
    p->changed_ms = created * 1000;
    p->refunded = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(o, "refunded"));
    const char *dc = jstr(o, st_code == SIM_ST_PENDING ? "settle_decline_code" : "decline_code");
    if (dc != NULL)
        snprintf(p->decline_code, sizeof(p->decline_code), "%s", dc);
    if (st_code == SIM_ST_PENDING) {
        const char *ss = jstr(o, "settle_status");
        int settle_to = ss != NULL ? status_from_name(ss) : -1;
        if (!jint(o, "settle_at_ms", &p->settle_at_ms) ||
            (settle_to != SIM_ST_SUCCEEDED && settle_to != SIM_ST_DECLINED)) {
            snprintf(err, errlen, "bad pending record %s", id);
            return -1;
        }
        p->settle_status = (uint8_t)settle_to;
        heap_push(st, p->settle_at_ms, p);
    }
    return 0;
}

int sim_store_load(sim_store *st, const char *path, char *err, size_t errlen)
{
    int rc = -1;
    char *line = NULL;
    size_t cap = 0;
    unsigned long lineno = 0;
    char msg[256];
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        if (errno == ENOENT)
            return 0;
        snprintf(err, errlen, "open %s: %s", path, strerror(errno));
        return -1;
    }
    for (;;) {
        errno = 0;
        ssize_t n = getline(&line, &cap, f);
        if (n < 0) {
            if (errno != 0) {
                snprintf(err, errlen, "read %s: %s", path, strerror(errno));
                goto out;
            }
            break;
        }
        lineno++;
        if (n > STATE_LINE_MAX) {
            snprintf(err, errlen, "%s:%lu: line too long", path, lineno);
            goto out;
        }
        cJSON *o = cJSON_ParseWithLength(line, (size_t)n);
        if (!cJSON_IsObject(o)) {
            cJSON_Delete(o);
            snprintf(err, errlen, "%s:%lu: not a JSON object", path, lineno);
            goto out;
        }
        int r = lineno == 1 ? load_header(st, o, msg, sizeof(msg)) : load_record(st, o, msg, sizeof(msg));
        cJSON_Delete(o);
        if (r != 0) {
            snprintf(err, errlen, "%s:%lu: %s", path, lineno, msg);
            goto out;
        }
    }
    if (lineno == 0) {
        snprintf(err, errlen, "%s: empty state file", path);
        goto out;
    }
    rc = 0;
out:
    free(line);
    fclose(f);
    if (rc != 0)
        sim_store_clear(st);
    return rc;
}
