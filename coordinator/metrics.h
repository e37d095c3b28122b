/* metrics.h - GET /metrics (Prometheus text, stats.c) on a loopback HTTP port
 * (libevent's HTTP server), when metrics_listen is set. */
#ifndef PAYCOORD_METRICS_H
#define PAYCOORD_METRICS_H

#include "common.h"

int metrics_start(void) PC_MUSTCHECK;   /* 0 (also when disabled) or -1 */
void metrics_stop(void);

#endif
