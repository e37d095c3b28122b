/*
 * log.h - one line per event to stderr, "<N>" syslog priority prefix for
 * journald, then key=value pairs. Every line about a payment carries gid=.
 * Not thread-safe by design: everything runs on the single event-loop thread.
 */
#ifndef PAYCOORD_LOG_H
#define PAYCOORD_LOG_H

#include "common.h"

enum {
    PCLOG_ERR = 3,
    PCLOG_WARNING = 4,
    PCLOG_NOTICE = 5,
    PCLOG_INFO = 6,
    PCLOG_DEBUG = 7
};

void log_set_level(int level);
int log_get_level(void);
/* "error", "warning", "notice", "info", "debug" -> level; -1 if unknown. */
int log_level_parse(const char *name);
/* Add a " ts=<ISO-8601>" field to each line (off under journald, which stamps lines itself). */
void log_set_timestamps(bool on);

void log_msg(int level, const char *fmt, ...) PC_PRINTF(2, 3);

#define log_error(...) log_msg(PCLOG_ERR, __VA_ARGS__)
#define log_warn(...) log_msg(PCLOG_WARNING, __VA_ARGS__)
#define log_notice(...) log_msg(PCLOG_NOTICE, __VA_ARGS__)
#define log_info(...) log_msg(PCLOG_INFO, __VA_ARGS__)
#define log_debug(...) do { if (log_get_level() >= PCLOG_DEBUG) log_msg(PCLOG_DEBUG, __VA_ARGS__); } while (0)

#endif
