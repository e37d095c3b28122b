/*
 * sim_loop.c - virtual time for the simulation: a binary heap of events, and
 * the loop backend (base/loop.h) that the daemon's timers run on. Events at
 * the same virtual time run in an order drawn from the seed.
 */
#include "sim.h"
#include "loop.h"
#include "rng.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct ev {
    int64_t at;
    uint64_t tie;                 /* random: the order of events at the same time */
    sim_fn fn;
    void *arg;
    uint64_t epoch;
    uint64_t timer_gen;           /* for daemon timers: the arming it belongs to (0: not a timer) */
} ev;

static ev *heap;
static size_t nheap, capheap;
static int64_t now_us;
static uint64_t nevents;
uint64_t sim_epoch = 1;

uint64_t sim_rand(uint64_t n) { return rng_below(n); }
bool sim_chance(double p) { return p > 0 && (double)(rng_next() >> 11) * (1.0 / 9007199254740992.0) < p; }
int64_t sim_between(int64_t lo, int64_t hi) { return hi <= lo ? lo : lo + (int64_t)rng_below((uint64_t)(hi - lo + 1)); }

static bool before(const ev *a, const ev *b) { return a->at < b->at || (a->at == b->at && a->tie < b->tie); }

static void push(ev e)
{
    if (nheap == capheap) {
        capheap = capheap ? capheap * 2 : 1024;
        heap = realloc(heap, capheap * sizeof(*heap));
        if (!heap)
            abort();
    }
    size_t i = nheap++;
    heap[i] = e;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!before(&heap[i], &heap[p]))
            break;
        ev t = heap[i];
        heap[i] = heap[p];
        heap[p] = t;
        i = p;
    }
}

static ev pop(void)
{
    ev top = heap[0];
    heap[0] = heap[--nheap];
    size_t i = 0;
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < nheap && before(&heap[l], &heap[m]))
            m = l;
        if (r < nheap && before(&heap[r], &heap[m]))
            m = r;
        if (m == i)
            break;
        ev t = heap[i];
        heap[i] = heap[m];
        heap[m] = t;
        i = m;
    }
    return top;
}

void sim_at(int64_t delay_us, sim_fn fn, void *arg, uint64_t epoch)
{
    if (delay_us < 0)
        delay_us = 0;
    push((ev){ .at = now_us + delay_us, .tie = rng_next(), .fn = fn, .arg = arg, .epoch = epoch });
}

int64_t sim_now_us(void) { return now_us; }
uint64_t sim_events(void) { return nevents; }

/* ---------------------------------------------------------------- timers */

typedef struct sim_timer {
    loop_timer *t;
    uint64_t gen;                 /* bumped by every start/stop: older heap entries are stale */
    bool armed;
    uint64_t epoch;
} sim_timer;

static int armed_timers;

static void timer_fire(void *arg)
{
    sim_timer *st = arg;
    st->armed = false;
    armed_timers--;
    st->t->fn(st->t->arg);
}

static int t_init(loop_timer *t)
{
    sim_timer *st = calloc(1, sizeof(*st));
    if (!st)
        return -1;
    st->t = t;
    t->impl = st;
    return 0;
}

static void t_start(loop_timer *t, int64_t ms)
{
    sim_timer *st = t->impl;
    if (!st->armed)
        armed_timers++;
    st->armed = true;
    st->gen++;
    st->epoch = sim_epoch;
    if (ms < 0)
        ms = 0;
    push((ev){ .at = now_us + ms * 1000, .tie = rng_next(), .fn = timer_fire, .arg = st, .epoch = sim_epoch,
               .timer_gen = st->gen });
}

static void t_stop(loop_timer *t)
{
    sim_timer *st = t->impl;
    if (st->armed)
        armed_timers--;
    st->armed = false;
    st->gen++;
}

static bool t_pending(const loop_timer *t) { return ((const sim_timer *)t->impl)->armed; }

/* A freed timer may still have entries in the heap: they are recognised by
 * their generation, so the record stays until the heap is reset. */
typedef struct dead_timer { struct dead_timer *next; } dead_timer;
static sim_timer **graveyard;
static size_t ngrave, capgrave;

static void t_deinit(loop_timer *t)
{
    sim_timer *st = t->impl;
    if (st->armed)
        armed_timers--;
    st->armed = false;
    st->gen++;
    st->t = NULL;
    if (ngrave == capgrave) {
        capgrave = capgrave ? capgrave * 2 : 1024;
        graveyard = realloc(graveyard, capgrave * sizeof(*graveyard));
        if (!graveyard)
            abort();
    }
    graveyard[ngrave++] = st;
}

static uint64_t b_now_us(void) { return (uint64_t)now_us + 1000000000ULL; }       /* never 0 */
static int64_t b_wall_ms(void) { return INT64_C(1790000000000) + now_us / 1000; }  /* 2026-09 */

static const loop_backend sim_backend = { t_init, t_start, t_stop, t_pending, t_deinit, b_now_us, b_wall_ms };

int sim_timers_armed(void) { return armed_timers; }

void sim_loop_reset(void)
{
    nheap = 0;
    now_us = 0;
    nevents = 0;
    armed_timers = 0;
    for (size_t i = 0; i < ngrave; i++)
        free(graveyard[i]);
    ngrave = 0;
    loop_use_backend(&sim_backend);
}

uint64_t sim_run_until(int64_t until_us)
{
    uint64_t n = 0;
    while (nheap > 0 && heap[0].at <= until_us) {
        ev e = pop();
        now_us = e.at;
        if (e.epoch && e.epoch != sim_epoch)
            continue;                        /* the daemon that armed it died */
        if (e.timer_gen) {
            sim_timer *st = e.arg;
            if (!st->t || !st->armed || st->gen != e.timer_gen)
                continue;                    /* re-armed, stopped or freed since */
        }
        e.fn(e.arg);
        n++;
        nevents++;
    }
    if (until_us > now_us)
        now_us = until_us;
    return n;
}
