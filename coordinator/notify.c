/* notify.c - systemd's notify protocol and socket activation, spoken directly
 * (see notify.h). The datagram goes to $NOTIFY_SOCKET (a path, or an abstract
 * name starting with '@'); failures are logged once and otherwise ignored. */
#include "notify.h"
#include "log.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <event2/event.h>

static struct sockaddr_un addr;
static socklen_t addr_len;
static int fd = -1;
static struct event *watchdog;
static bool warned;

bool notify_enabled(void) { return fd >= 0; }

static void watchdog_cb(evutil_socket_t s, short what, void *arg)
{
    notify_send("WATCHDOG=1");
}

void notify_init(struct event_base *base)
{
    const char *path = getenv("NOTIFY_SOCKET");
    if (!path || !path[0])
        return;
    size_t n = strlen(path);
    if (n >= sizeof(addr.sun_path) || (path[0] != '/' && path[0] != '@')) {
        log_warn("event=notify_socket_ignored path=\"%s\"", path);
        return;
    }
    memset(&addr, 0, sizeof(addr));
    addr.sun_family = AF_UNIX;
    memcpy(addr.sun_path, path, n);
    if (path[0] == '@')
        addr.sun_path[0] = '\0';            /* abstract namespace */
    addr_len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n);
    fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) {
        log_warn("event=notify_socket_failed error=\"%s\"", strerror(errno));
        return;
    }
    const char *wd = getenv("WATCHDOG_USEC");
    const char *wpid = getenv("WATCHDOG_PID");
    if (wd && (!wpid || strtol(wpid, NULL, 10) == (long)getpid())) {
        long long usec = strtoll(wd, NULL, 10);
        if (usec > 0) {
            watchdog = event_new(base, -1, EV_PERSIST, watchdog_cb, NULL);
            struct timeval tv = { (time_t)(usec / 2 / 1000000), (suseconds_t)(usec / 2 % 1000000) };
            if (watchdog)
                event_add(watchdog, &tv);
            log_notice("event=watchdog interval_usec=%lld", usec);
        }
    }
}

void notify_free(void)
{
    if (watchdog)
        event_free(watchdog);
    watchdog = NULL;
    if (fd >= 0)
        close(fd);
    fd = -1;
}

int notify_send(const char *fmt, ...)
{
    if (fd < 0)
        return 0;
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof(msg))
        return -1;
    if (sendto(fd, msg, (size_t)n, MSG_NOSIGNAL, (struct sockaddr *)&addr, addr_len) < 0) {
        if (!warned)
            log_warn("event=notify_failed error=\"%s\"", strerror(errno));
        warned = true;
        return -1;
    }
    return 0;
}

void notify_reloading(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    notify_send("RELOADING=1\nMONOTONIC_USEC=%llu",
                (unsigned long long)ts.tv_sec * 1000000ULL + (unsigned long long)ts.tv_nsec / 1000ULL);
}

int notify_listen_fd(void)
{
    const char *pid = getenv("LISTEN_PID");
    const char *fds = getenv("LISTEN_FDS");
    if (!pid || !fds || strtol(pid, NULL, 10) != (long)getpid() || strtol(fds, NULL, 10) < 1)
        return -1;
    unsetenv("LISTEN_PID");
    unsetenv("LISTEN_FDS");
    unsetenv("LISTEN_FDNAMES");
    return 3;                               /* SD_LISTEN_FDS_START */
}
