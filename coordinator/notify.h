/* notify.h - the systemd notify protocol (a datagram to $NOTIFY_SOCKET; no
 * libsystemd) and socket activation ($LISTEN_FDS). All no-ops outside systemd. */
#ifndef PAYCOORD_NOTIFY_H
#define PAYCOORD_NOTIFY_H

#include "common.h"

struct event_base;

/* Reads NOTIFY_SOCKET and WATCHDOG_USEC; starts the watchdog timer (WATCHDOG=1
 * every half interval) when systemd asks for one. */
void notify_init(struct event_base *base);
void notify_free(void);
/* Sends one message, e.g. "READY=1\nSTATUS=serving". Returns 0 or -1. */
int notify_send(const char *fmt, ...) PC_PRINTF(1, 2);
/* "RELOADING=1" with MONOTONIC_USEC, as systemd expects for Type=notify-reload (paycoord.service uses Type=notify + ExecReload). */
void notify_reloading(void);
bool notify_enabled(void);
/* The first socket passed by systemd (LISTEN_PID/LISTEN_FDS), or -1. */
int notify_listen_fd(void);

#endif
