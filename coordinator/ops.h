/* ops.h - dispatch of one parsed, admitted request to its handler. */
#ifndef PAYCOORD_OPS_H
#define PAYCOORD_OPS_H

#include "request.h"

void ops_dispatch(pc_request *r);
/* The daemon is ready to take payments (health's "ready", systemd's READY=1). */
bool ops_ready(void);

#endif
