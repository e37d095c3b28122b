/* server.h - the Unix-socket server (server.c). */
#ifndef PAYCOORD_SERVER_H
#define PAYCOORD_SERVER_H

#include "common.h"

int server_start(void) PC_MUSTCHECK;
void server_stop_listening(void);
void server_close_all(void);

#endif
