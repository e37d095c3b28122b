/*
 * circuit.h - the processor circuit breaker and the processor latency
 * histogram. Closed: every payment may go to the processor. After
 * circuit_failures consecutive failed calls (or at once on 401/403) it opens:
 * new payments are refused `overloaded` until circuit_open_ms has passed; then
 * one payment goes through as a probe (half-open) and the next only after
 * another circuit_open_ms, unless a success closes it. Rate limiting (429) is
 * counted apart: it is the processor asking us to slow down, not failing, so
 * it does not open the circuit; new payments wait out its Retry-After.
 * Recovery keeps polling whatever the circuit says.
 */
#ifndef PAYCOORD_CIRCUIT_H
#define PAYCOORD_CIRCUIT_H

#include "common.h"
#include "proc.h"

typedef enum { CIRCUIT_CLOSED = 0, CIRCUIT_OPEN, CIRCUIT_HALF_OPEN } circuit_state;

void circuit_reset(void);
/* May a new payment go to the processor now? (Half-open: one probe.) */
bool circuit_allows(void);
/* Account for one answer of the processor to the payment path: latency, and
 * success / failure / rate limit / credentials by its outcome. */
void circuit_account(const proc_result *res);
circuit_state circuit_get(void);
const char *circuit_name(circuit_state s);
/* "up", "down" or "circuit_open" for health and stats. */
const char *circuit_processor_state(void);
/* Latency percentile (upper bound of its power-of-two bucket), ms. */
double circuit_latency_percentile(double pct);

#endif
