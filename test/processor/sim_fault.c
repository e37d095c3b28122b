/* sim_fault.c - the /control "faults" settings: one table drives parsing of
 * POST /control bodies and the JSON of GET /control; plus the PRNG. */
#include "sim_fault.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

typedef enum { F_MS, F_RATE, F_BOOL, F_STATUS, F_OPS, F_SEED } field_type;

#define DAY_MS 86400000LL

#define SEED_MAX 9007199254740991.0 /* 2^53 - 1: exact in a JSON number */

#define SETTLE_MAX_MS 86400000 /* a day: "pending for the whole test" */

/* max: the upper bound of an F_MS field (an integer, not always ms). */
static const struct {
    const char *name;
    field_type type;
    size_t off;
    int64_t max;
    unsigned modes; /* SIM_MODE_* bits where the field exists */
} fields[] = {
    {"latency_ms", F_MS, offsetof(sim_faults, latency_ms), SIM_LATENCY_MAX_MS, SIM_MODE_ALL},
    {"jitter_ms", F_MS, offsetof(sim_faults, jitter_ms), SIM_LATENCY_MAX_MS, SIM_MODE_ALL},
    {"decline_rate", F_RATE, offsetof(sim_faults, decline_rate), 0, SIM_MODE_ALL},
    {"pending_rate", F_RATE, offsetof(sim_faults, pending_rate), 0, SIM_MODE_ALL},
    {"settle_ms", F_MS, offsetof(sim_faults, settle_ms), SETTLE_MAX_MS, SIM_MODE_ALL},
    {"settle_status", F_STATUS, offsetof(sim_faults, settle_status), 0, SIM_MODE_ALL},
    {"fail_before_rate", F_RATE, offsetof(sim_faults, fail_before_rate), 0, SIM_MODE_ALL},
    {"fail_after_rate", F_RATE, offsetof(sim_faults, fail_after_rate), 0, SIM_MODE_ALL},
    {"drop_after_rate", F_RATE, offsetof(sim_faults, drop_after_rate), 0, SIM_MODE_ALL},
    {"blackhole", F_BOOL, offsetof(sim_faults, blackhole), 0, SIM_MODE_ALL},
    {"refuse_connections", F_BOOL, offsetof(sim_faults, refuse_connections), 0, SIM_MODE_ALL},
    {"cancel_unsupported", F_BOOL, offsetof(sim_faults, cancel_unsupported), 0, SIM_MODE_GENERIC},
    {"fault_ops", F_OPS, offsetof(sim_faults, fault_ops), 0, SIM_MODE_ALL},
    {"seed", F_SEED, offsetof(sim_faults, seed), 0, SIM_MODE_ALL},
    {"rate_limit_rate", F_RATE, offsetof(sim_faults, rate_limit_rate), 0, SIM_MODE_ALL},
    {"retry_after_s", F_MS, offsetof(sim_faults, retry_after_s), 3600, SIM_MODE_ALL},
    {"key_retention_ms", F_MS, offsetof(sim_faults, key_retention_ms), 400 * DAY_MS, SIM_MODE_PSPS},
    {"webhook_delay_ms", F_MS, offsetof(sim_faults, webhook_delay_ms), SETTLE_MAX_MS, SIM_MODE_PSPS},
    {"webhook_retry_ms", F_MS, offsetof(sim_faults, webhook_retry_ms), SETTLE_MAX_MS, SIM_MODE_PSPS},
    {"webhook_max_attempts", F_MS, offsetof(sim_faults, webhook_max_attempts), 1000, SIM_MODE_PSPS},
    {"webhook_drop_rate", F_RATE, offsetof(sim_faults, webhook_drop_rate), 0, SIM_MODE_PSPS},
    {"webhook_duplicate_rate", F_RATE, offsetof(sim_faults, webhook_duplicate_rate), 0, SIM_MODE_PSPS},
    {"webhook_bad_signature_rate", F_RATE, offsetof(sim_faults, webhook_bad_signature_rate), 0, SIM_MODE_PSPS},
    {"search_lag_ms", F_MS, offsetof(sim_faults, search_lag_ms), SETTLE_MAX_MS, SIM_MODE_STRIPE},
    {"stripe_cancel_processing", F_BOOL, offsetof(sim_faults, stripe_cancel_processing), 0, SIM_MODE_STRIPE},
    {"cancel_delay_ms", F_MS, offsetof(sim_faults, cancel_delay_ms), SETTLE_MAX_MS, SIM_MODE_ADYEN},
    {"adyen_autocapture", F_BOOL, offsetof(sim_faults, adyen_autocapture), 0, SIM_MODE_ADYEN},
    {"webhook_require_accepted", F_BOOL, offsetof(sim_faults, webhook_require_accepted), 0, SIM_MODE_ADYEN},
};

#define FIELD(f, i, type) ((type *)(void *)((char *)(f) + fields[i].off))

void sim_faults_defaults(sim_faults *f)
{
    uint64_t seed = f->seed;
    memset(f, 0, sizeof(*f));
    f->settle_ms = 1000;
    f->settle_status = SIM_ST_SUCCEEDED;
    f->fault_ops = 1u << SIM_OP_CREATE;
    f->seed = seed;
    f->retry_after_s = 1;
    f->key_retention_ms = DAY_MS;
    f->webhook_retry_ms = 1000;
    f->webhook_max_attempts = 10;
    f->cancel_delay_ms = 100;
    f->webhook_require_accepted = true;
}

static int set_field(sim_faults *f, size_t i, const cJSON *v, char *err, size_t errlen)
{
    const char *name = fields[i].name;
    switch (fields[i].type) {
    case F_MS:
        if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble) || v->valuedouble < 0 ||
            v->valuedouble > (double)fields[i].max) {
            snprintf(err, errlen, "%s must be an integer in 0..%lld", name, (long long)fields[i].max);
            return -1;
        }
        *FIELD(f, i, int64_t) = (int64_t)v->valuedouble;
        return 0;
    case F_RATE:
        if (!cJSON_IsNumber(v) || !(v->valuedouble >= 0.0 && v->valuedouble <= 1.0)) {
            snprintf(err, errlen, "%s must be a number in 0..1", name);
            return -1;
        }
        *FIELD(f, i, double) = v->valuedouble;
        return 0;
    case F_BOOL:
        if (!cJSON_IsBool(v)) {
            snprintf(err, errlen, "%s must be true or false", name);
            return -1;
        }
        *FIELD(f, i, bool) = cJSON_IsTrue(v);
        return 0;
    case F_STATUS:
        if (cJSON_IsString(v) && strcmp(v->valuestring, "succeeded") == 0) {
            *FIELD(f, i, sim_status) = SIM_ST_SUCCEEDED;
        } else if (cJSON_IsString(v) && strcmp(v->valuestring, "declined") == 0) {
            *FIELD(f, i, sim_status) = SIM_ST_DECLINED;
        } else {
            snprintf(err, errlen, "%s must be \"succeeded\" or \"declined\"", name);
            return -1;
        }
        return 0;
    case F_OPS: {
        unsigned ops = 0;
        const cJSON *e;
        if (!cJSON_IsArray(v)) {
            snprintf(err, errlen, "%s must be an array of operation names", name);
            return -1;
        }
        cJSON_ArrayForEach(e, v) {
            int op = cJSON_IsString(e) ? sim_op_from_name(e->valuestring) : -1;
            if (op < 0) {
                snprintf(err, errlen, "%s: unknown operation (create, get, cancel, refund, list)", name);
                return -1;
            }
            ops |= 1u << op;
        }
        *FIELD(f, i, unsigned) = ops;
        return 0;
    }
    case F_SEED:
        if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble) || v->valuedouble < 0 ||
            v->valuedouble > SEED_MAX) {
            snprintf(err, errlen, "%s must be an integer in 0..2^53-1", name);
            return -1;
        }
        *FIELD(f, i, uint64_t) = (uint64_t)v->valuedouble;
        return 0;
    }
    return -1;
}

int sim_faults_update(sim_faults *f, sim_mode mode, const char *json, size_t len, bool *reseed,
                      char *err, size_t errlen)
{
    int rc = -1;
    sim_faults next = *f;
    const cJSON *item;
    cJSON *root = cJSON_ParseWithLength(json, len);

    *reseed = false;
    if (!cJSON_IsObject(root)) {
        snprintf(err, errlen, "body must be a JSON object");
        goto out;
    }
    cJSON_ArrayForEach(item, root) {
        size_t i;
        for (i = 0; i < SIM_ARRAY_LEN(fields); i++)
            if (strcmp(item->string, fields[i].name) == 0)
                break;
        if (i == SIM_ARRAY_LEN(fields)) {
            snprintf(err, errlen, "unknown field \"%.64s\"", item->string);
            goto out;
        }
        if (!(fields[i].modes & mode)) {
            snprintf(err, errlen, "field \"%s\" does not apply to --mode %s", fields[i].name,
                     sim_mode_name(mode));
            goto out;
        }
        if (set_field(&next, i, item, err, errlen) != 0)
            goto out;
        if (fields[i].type == F_SEED)
            *reseed = true;
    }
    *f = next;
    rc = 0;
out:
    cJSON_Delete(root);
    return rc;
}

void sim_faults_json(const sim_faults *f, sim_mode mode, sim_buf *b)
{
    bool first_field = true;
    sim_buf_addc(b, '{');
    for (size_t i = 0; i < SIM_ARRAY_LEN(fields); i++) {
        if (!(fields[i].modes & mode))
            continue;
        sim_buf_addf(b, "%s\"%s\":", first_field ? "" : ",", fields[i].name);
        first_field = false;
        switch (fields[i].type) {
        case F_MS: sim_buf_add_i64(b, *FIELD(f, i, int64_t)); break;
        case F_RATE: sim_buf_add_double(b, *FIELD(f, i, double)); break;
        case F_BOOL: sim_buf_adds(b, *FIELD(f, i, bool) ? "true" : "false"); break;
        case F_STATUS:
            sim_buf_addf(b, "\"%s\"", sim_status_name(*FIELD(f, i, sim_status)));
            break;
        case F_OPS: {
            bool first = true;
            sim_buf_addc(b, '[');
            for (int op = 0; op < SIM_OP__COUNT; op++) {
                if (!(*FIELD(f, i, unsigned) & (1u << op)))
                    continue;
                sim_buf_addf(b, "%s\"%s\"", first ? "" : ",", sim_op_name((sim_op)op));
                first = false;
            }
            sim_buf_addc(b, ']');
            break;
        }
        case F_SEED: sim_buf_add_u64(b, *FIELD(f, i, uint64_t)); break;
        }
    }
    sim_buf_addc(b, '}');
}

void sim_rng_seed(sim_rng *r, uint64_t seed)
{
    r->state = seed;
}

uint64_t sim_rng_next(sim_rng *r)
{
    uint64_t z = (r->state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

uint64_t sim_rng_upto(sim_rng *r, uint64_t n)
{
    return n == 0 ? 0 : sim_rng_next(r) % (n + 1); /* bias is irrelevant at these ranges */
}

bool sim_rng_hit(sim_rng *r, double rate)
{
    if (rate <= 0.0)
        return false;
    if (rate >= 1.0)
        return true;
    return (double)(sim_rng_next(r) >> 11) * 0x1.0p-53 < rate;
}
