/* loop.c - the clock and timers (loop.h): libevent by default, or a backend
 * installed by a simulation. */
#include "loop.h"
#include "log.h"

#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include <event2/event.h>

static struct event_base *ev_base;

static void ev_timer_cb(evutil_socket_t fd, short what, void *arg)
{
    loop_timer *t = arg;
    (void)fd;
    (void)what;
    t->fn(t->arg);
}

static int ev_timer_init(loop_timer *t)
{
    t->impl = evtimer_new(ev_base, ev_timer_cb, t);
    return t->impl ? 0 : -1;
}

static void ev_timer_start(loop_timer *t, int64_t ms)
{
    if (ms < 0)
        ms = 0;
    struct timeval tv = { (time_t)(ms / 1000), (suseconds_t)((ms % 1000) * 1000) };
    if (evtimer_add((struct event *)t->impl, &tv) != 0) {
        log_error("event=timer_failed alert=bug note=\"the event loop refused a timer; exiting so that recovery takes over\"");
        abort();
    }
}

static void ev_timer_stop(loop_timer *t) { evtimer_del((struct event *)t->impl); }

static bool ev_timer_pending(const loop_timer *t)
{
    return evtimer_pending((struct event *)t->impl, NULL) != 0;
}

static void ev_timer_deinit(loop_timer *t) { event_free((struct event *)t->impl); }

static uint64_t mono_now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static int64_t real_wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static const loop_backend libevent_backend = {
    ev_timer_init, ev_timer_start, ev_timer_stop, ev_timer_pending, ev_timer_deinit, mono_now_us, real_wall_ms,
};

static const loop_backend *be = &libevent_backend;

void loop_init_libevent(struct event_base *base)
{
    ev_base = base;
    be = &libevent_backend;
}

struct event_base *loop_base(void) { return ev_base; }

void loop_use_backend(const loop_backend *b) { be = b; }

int loop_timer_init(loop_timer *t, loop_fn fn, void *arg)
{
    t->fn = fn;
    t->arg = arg;
    t->impl = NULL;
    return be->timer_init(t);
}

void loop_timer_start(loop_timer *t, int64_t ms) { be->timer_start(t, ms); }

void loop_timer_stop(loop_timer *t)
{
    if (t->impl)
        be->timer_stop(t);
}

bool loop_timer_pending(const loop_timer *t) { return t->impl && be->timer_pending(t); }

void loop_timer_deinit(loop_timer *t)
{
    if (t->impl)
        be->timer_deinit(t);
    t->impl = NULL;
}

uint64_t loop_now_us(void) { return be->now_us(); }
uint64_t loop_now_ms(void) { return be->now_us() / 1000u; }
int64_t loop_wall_ms(void) { return be->wall_ms(); }

void loop_format_time(int64_t wall_ms, char out[32])
{
    time_t s = (time_t)(wall_ms / 1000);
    struct tm tm;
    gmtime_r(&s, &tm);
    size_t n = strftime(out, 32, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(out + n, 32 - n, ".%03dZ", (int)(wall_ms % 1000));
}
