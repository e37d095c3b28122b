/* circuit.c - processor circuit breaker and latency histogram (circuit.h). */
#include "circuit.h"
#include "ctx.h"
#include "log.h"
#include "loop.h"

#include <string.h>

static circuit_state state;
static int consecutive_failures;
static uint64_t until_ms;              /* open: refuse until; half-open: next probe not before */
static uint64_t rate_limited_until_ms;
static bool processor_ok = true;

void circuit_reset(void)
{
    state = CIRCUIT_CLOSED;
    consecutive_failures = 0;
    until_ms = rate_limited_until_ms = 0;
    processor_ok = true;
}

circuit_state circuit_get(void) { return state; }

const char *circuit_name(circuit_state s)
{
    return s == CIRCUIT_OPEN ? "open" : s == CIRCUIT_HALF_OPEN ? "half_open" : "closed";
}

const char *circuit_processor_state(void)
{
    if (state == CIRCUIT_OPEN)
        return "circuit_open";
    return processor_ok ? "up" : "down";
}

bool circuit_allows(void)
{
    uint64_t now = loop_now_ms();
    if (now < rate_limited_until_ms)
        return false;
    if (state == CIRCUIT_CLOSED)
        return true;
    if (now < until_ms)
        return false;
    if (state == CIRCUIT_OPEN)
        log_notice("event=circuit state=half_open");
    state = CIRCUIT_HALF_OPEN;
    until_ms = now + (uint64_t)D->cfg.circuit_open_ms;
    return true;
}

static void record_latency(double ms)
{
    D->stats.processor_calls++;
    D->stats.lat_sum_ms += ms;
    int b = 0;
    double lim = 1.0;
    while (b < PC_LAT_BUCKETS - 1 && ms > lim) {
        lim *= 2;
        b++;
    }
    D->stats.lat_buckets[b]++;
}

static void open_now(const char *why)
{
    if (state != CIRCUIT_OPEN)
        log_error("event=circuit state=open reason=%s failures=%d open_ms=%d alert=%s", why, consecutive_failures,
                  D->cfg.circuit_open_ms, !strcmp(why, "processor_auth") ? "credentials" : "processor_unreachable");
    state = CIRCUIT_OPEN;
    until_ms = loop_now_ms() + (uint64_t)D->cfg.circuit_open_ms;
}

void circuit_account(const proc_result *res)
{
    if (res->local)                 /* answered from webhooks already received: no call was made */
        return;
    record_latency(res->elapsed_ms);
    switch (res->outcome) {
    case PROC_UNKNOWN:
        break;
    case PROC_AUTH:
        processor_ok = false;
        D->stats.processor_failures++;
        consecutive_failures++;
        open_now("processor_auth");
        return;
    case PROC_RATE_LIMITED: {
        D->stats.processor_rate_limited++;
        int ms = res->retry_after_ms > 0 ? res->retry_after_ms : 1000;
        uint64_t until = loop_now_ms() + (uint64_t)ms;
        if (until > rate_limited_until_ms)
            rate_limited_until_ms = until;
        log_warn("event=processor_rate_limited retry_after_ms=%d", ms);
        return;
    }
    default:                        /* an answer that says what happened */
        if (state != CIRCUIT_CLOSED)
            log_notice("event=circuit state=closed");
        state = CIRCUIT_CLOSED;
        consecutive_failures = 0;
        processor_ok = true;
        return;
    }
    processor_ok = false;
    D->stats.processor_failures++;
    consecutive_failures++;
    if ((state == CIRCUIT_HALF_OPEN && consecutive_failures >= 1) ||
        (state == CIRCUIT_CLOSED && consecutive_failures >= D->cfg.circuit_failures))
        open_now("failures");
}

double circuit_latency_percentile(double pct)
{
    uint64_t total = 0;
    for (int i = 0; i < PC_LAT_BUCKETS; i++)
        total += D->stats.lat_buckets[i];
    if (!total)
        return 0;
    uint64_t want = (uint64_t)((double)total * pct / 100.0 + 0.5), seen = 0;
    double lim = 1.0;
    for (int i = 0; i < PC_LAT_BUCKETS; i++, lim *= 2) {
        seen += D->stats.lat_buckets[i];
        if (seen >= want)
            return lim;
    }
    return lim;
}
