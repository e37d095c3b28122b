/* log.c - journald-friendly single-line logging to stderr (see log.h). */
#include "log.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <sys/time.h>
#include <time.h>

static int current_level = PCLOG_INFO;
static bool with_timestamps = true;

void log_set_level(int level) { current_level = level; }
int log_get_level(void) { return current_level; }
void log_set_timestamps(bool on) { with_timestamps = on; }

int log_level_parse(const char *name)
{
    static const struct { const char *name; int level; } names[] = {
        { "error", PCLOG_ERR }, { "warning", PCLOG_WARNING }, { "notice", PCLOG_NOTICE },
        { "info", PCLOG_INFO }, { "debug", PCLOG_DEBUG },
    };
    for (size_t i = 0; i < PC_ARRAY_LEN(names); i++)
        if (strcasecmp(name, names[i].name) == 0)
            return names[i].level;
    return -1;
}

void log_msg(int level, const char *fmt, ...)
{
    if (level > current_level)
        return;
    char line[4096];
    size_t n = (size_t)snprintf(line, sizeof(line), "<%d>", level);
    if (with_timestamps) {
        struct timeval tv;
        struct tm tm;
        gettimeofday(&tv, NULL);
        gmtime_r(&tv.tv_sec, &tm);
        n += strftime(line + n, sizeof(line) - n, "ts=%Y-%m-%dT%H:%M:%S", &tm);
        n += (size_t)snprintf(line + n, sizeof(line) - n, ".%03dZ ", (int)(tv.tv_usec / 1000));
    }
    va_list ap;
    va_start(ap, fmt);
    int w = vsnprintf(line + n, sizeof(line) - n, fmt, ap);
    va_end(ap);
    if (w < 0)
        return;
    n += (size_t)w;
    if (n >= sizeof(line) - 1)
        n = sizeof(line) - 2;       /* truncated: still one line */
    /* A value must never break the one-line rule. */
    for (size_t i = 0; i < n; i++)
        if (line[i] == '\n' || line[i] == '\r')
            line[i] = ' ';
    line[n++] = '\n';
    fwrite(line, 1, n, stderr);
}
