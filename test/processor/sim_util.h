/*
 * sim_util.h - shared vocabulary of psp-sim: operations, allocation that
 * aborts on exhaustion, a growable byte buffer with a JSON writer, logging.
 */
#ifndef PSP_SIM_UTIL_H
#define PSP_SIM_UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define SIM_MUSTCHECK __attribute__((warn_unused_result))
#define SIM_PRINTF(fmt, args) __attribute__((format(printf, fmt, args)))
#define SIM_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

/* Input caps (generic keys are printable ASCII up to 255 chars). */
#define SIM_KEY_MAX 255
#define SIM_ACCOUNT_MAX 255
#define SIM_REFERENCE_MAX 1024
#define SIM_DECLINE_CODE_MAX 64
#define SIM_BODY_MAX (64 * 1024)
#define SIM_HEADERS_MAX (16 * 1024)
#define SIM_LATENCY_MAX_MS 600000

/* The five processor calls; also the names accepted in fault_ops. */
typedef enum {
    SIM_OP_CREATE = 0,
    SIM_OP_GET,
    SIM_OP_CANCEL,
    SIM_OP_REFUND,
    SIM_OP_LIST,
    SIM_OP__COUNT
} sim_op;

/* The API psp-sim speaks (--mode); also bit masks in the faults table. */
typedef enum {
    SIM_MODE_GENERIC = 1,
    SIM_MODE_STRIPE = 2,
    SIM_MODE_ADYEN = 4
} sim_mode;
#define SIM_MODE_ALL (SIM_MODE_GENERIC | SIM_MODE_STRIPE | SIM_MODE_ADYEN)
#define SIM_MODE_PSPS (SIM_MODE_STRIPE | SIM_MODE_ADYEN)

const char *sim_mode_name(sim_mode m);

const char *sim_op_name(sim_op op);
/* Returns the op for a name, or -1. */
int sim_op_from_name(const char *name);

/* Allocation: a test server has nothing sensible to do on exhaustion, so
 * these log and abort instead of returning NULL. */
void *sim_xmalloc(size_t n);
void *sim_xcalloc(size_t n, size_t size);
void *sim_xrealloc(void *p, size_t n);

/* Growable byte buffer; data is always NUL-terminated once anything was
 * added. */
typedef struct sim_buf {
    char *data;
    size_t len;
    size_t cap;
} sim_buf;

void sim_buf_init(sim_buf *b);
void sim_buf_free(sim_buf *b);
void sim_buf_reset(sim_buf *b);
void sim_buf_add(sim_buf *b, const void *p, size_t n);
void sim_buf_adds(sim_buf *b, const char *s);
void sim_buf_addc(sim_buf *b, char c);
void sim_buf_addf(sim_buf *b, const char *fmt, ...) SIM_PRINTF(2, 3);
void sim_buf_add_i64(sim_buf *b, int64_t v);
void sim_buf_add_u64(sim_buf *b, uint64_t v);
/* A JSON string literal: quotes plus escapes for '"', '\\' and bytes < 0x20. */
void sim_buf_add_jstr(sim_buf *b, const char *s, size_t n);
/* A JSON number for a rate in [0,1] with enough digits to round-trip. */
void sim_buf_add_double(sim_buf *b, double v);

/* Logging to stderr with journald "<N>" priority prefixes, one line per
 * event. Level 0 = errors only (--quiet), 1 = normal, 2 = per request. */
extern int sim_log_level;
void sim_log(int prio, const char *fmt, ...) SIM_PRINTF(2, 3);
#define SIM_LOG_ERR 3
#define SIM_LOG_WARNING 4
#define SIM_LOG_INFO 6
#define SIM_LOG_DEBUG 7

/* Clocks: wall-clock milliseconds (persisted settle times, "created"). */
int64_t sim_now_ms(void);

/* Parses a decimal integer that spans all of s[0..n) into *out, accepting
 * only digits with an optional leading '-' when allow_negative. Returns 0, or
 * -1 on an empty string, a stray character or overflow. */
int sim_parse_i64(const char *s, size_t n, bool allow_negative, int64_t *out) SIM_MUSTCHECK;

#endif
