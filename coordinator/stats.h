/* stats.h - the daemon's counters and gauges, described once, rendered as the
 * `stats` op's object and as Prometheus text (GET /metrics). */
#ifndef PAYCOORD_STATS_H
#define PAYCOORD_STATS_H

#include "common.h"
#include "sbuf.h"

#include <cjson/cJSON.h>

int stats_start(void) PC_MUSTCHECK;
void stats_stop(void);
cJSON *stats_json(void);
void stats_prometheus(sbuf *b);

#endif
