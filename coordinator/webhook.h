/*
 * webhook.h - the processor webhook listener (webhook.c): verifies each
 * delivery through the adapter, stores its events durably and once, then
 * hands them to the adapter; loads the stored events at start.
 */
#ifndef PAYCOORD_WEBHOOK_H
#define PAYCOORD_WEBHOOK_H

#include "common.h"

/* After proc_start() and store_init(): listen on webhook_listen when the
 * adapter takes webhooks, and load the stored events. 0 or -1 (logged). */
int webhook_start(void) PC_MUSTCHECK;
void webhook_stop(void);

#endif
