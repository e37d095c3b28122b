/* metrics.h - Prometheus text exposition on a loopback HTTP port
 * (libevent's HTTP server), when metrics_listen is set. */
#ifndef PAYCOORD_METRICS_H
#define PAYCOORD_METRICS_H

#include "common.h"

int metrics_start(void) PC_MUSTCHECK;   /* 0 (also when disabled) or -1 */
void metrics_stop(void);
/* Prepared transactions of this node and the oldest one's age, refreshed by a
 * timer from pg_prepared_xacts (also used by stats). */
int64_t metrics_prepared_db(void);
double metrics_oldest_prepared_s(void);

#endif
