/*
 * loop.h - the daemon's clock and its timers, on the one event loop.
 *
 * Everything in paycoord runs on a single libevent loop thread. Modules that
 * only need time and timers (the payment state machine, recovery) use this
 * interface instead of libevent, so that a deterministic simulation can run
 * them on virtual time with callbacks in an order it chooses
 * (loop_use_backend()). Modules that talk to sockets (server, pgpool, the
 * processor client, metrics) use loop_base() directly.
 *
 * Timer contract: a timer is initialised once, may be started (re-armed) and
 * stopped any number of times, and its callback runs from the loop, never
 * from inside loop_timer_start(). A timer that is started while pending is
 * re-armed. loop_timer_deinit() stops it; the callback never runs after.
 * A delay of 0 runs the callback on the loop's next turn: that is how code
 * defers work instead of calling back synchronously.
 *
 * Failure: the only way arming a timer can fail is a broken loop; that is not
 * survivable state, so it logs and aborts (recovery settles whatever was in
 * flight on the next start) rather than leaving a payment without a timer.
 */
#ifndef PAYCOORD_LOOP_H
#define PAYCOORD_LOOP_H

#include "common.h"

#include <stdint.h>

struct event_base;

typedef void (*loop_fn)(void *arg);

typedef struct loop_timer {
    loop_fn fn;
    void *arg;
    void *impl;                 /* the backend's */
} loop_timer;

int loop_timer_init(loop_timer *t, loop_fn fn, void *arg) PC_MUSTCHECK;
void loop_timer_start(loop_timer *t, int64_t ms);
void loop_timer_stop(loop_timer *t);
bool loop_timer_pending(const loop_timer *t);
void loop_timer_deinit(loop_timer *t);

/* The clock: monotonic milliseconds/microseconds since an arbitrary start,
 * and the wall clock in Unix milliseconds. */
uint64_t loop_now_ms(void);
uint64_t loop_now_us(void);
int64_t loop_wall_ms(void);
/* ISO-8601 UTC with milliseconds, "2026-11-22T10:15:02.125Z". */
void loop_format_time(int64_t wall_ms, char out[32]);

/* The real loop: timers are libevent events on base. */
void loop_init_libevent(struct event_base *base);
struct event_base *loop_base(void);

/* A replacement backend (the simulation). */
typedef struct loop_backend {
    int (*timer_init)(loop_timer *t);
    void (*timer_start)(loop_timer *t, int64_t ms);
    void (*timer_stop)(loop_timer *t);
    bool (*timer_pending)(const loop_timer *t);
    void (*timer_deinit)(loop_timer *t);
    uint64_t (*now_us)(void);
    int64_t (*wall_ms)(void);
} loop_backend;
void loop_use_backend(const loop_backend *b);

#endif
