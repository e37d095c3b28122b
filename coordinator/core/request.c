/* request.c - answering requests through their creator's sink (request.h). */
#include "request.h"
#include "ctx.h"
#include "log.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

pc_request *req_new(const req_sink *sink, void *owner)
{
    pc_request *r = calloc(1, sizeof(*r));
    if (!r)
        return NULL;
    r->sink = sink;
    r->owner = owner;
    list_init(&r->link);
    return r;
}

void req_free(pc_request *r)
{
    proto_request_free(&r->req);
    free(r);
}

void req_reply_ok(pc_request *r, cJSON *result)
{
    size_t len = 0;
    char *line = proto_reply_ok(r->req.id, result, &len);
    if (!line)
        log_error("event=reply_lost reason=out_of_memory op=%s", proto_op_name(r->req.op));
    r->sink->deliver(r, line, len);
}

void req_reply_err(pc_request *r, proto_err code, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (code < PROTO_ERR__COUNT)
        D->stats.errors_by_code[code]++;
    size_t len = 0;
    char *line = proto_reply_err(r->req.id, code, msg, &len);
    if (!line)
        log_error("event=reply_lost reason=out_of_memory op=%s code=%s", proto_op_name(r->req.op), proto_err_name(code));
    r->sink->deliver(r, line, len);
}
