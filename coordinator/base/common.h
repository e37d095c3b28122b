/* common.h - attributes and small helpers shared by every paycoord module. */
#ifndef PAYCOORD_COMMON_H
#define PAYCOORD_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>

#define PC_MUSTCHECK __attribute__((warn_unused_result))
#define PC_PRINTF(fmt, args) __attribute__((format(printf, fmt, args)))
#define PC_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

#endif
