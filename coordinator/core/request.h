/*
 * request.h - one client request in progress, and the way it is answered.
 *
 * Whoever creates a request (the socket server, or the simulation) gives it a
 * sink; the op handler that receives it owns it and answers it exactly once
 * with req_reply_ok() or req_reply_err(), which hand the answer to the sink
 * and free the request. Handlers never call the server: the answer travels
 * down-to-up through the sink that the creator installed.
 */
#ifndef PAYCOORD_REQUEST_H
#define PAYCOORD_REQUEST_H

#include "common.h"
#include "list.h"

#include <proto.h>
#include <sys/types.h>

typedef struct pc_request pc_request;

typedef struct req_sink {
    /* Deliver the encoded line (or drop it when the client is gone), then free r with req_free(). */
    void (*deliver)(pc_request *r, char *line, size_t len);
} req_sink;

struct pc_request {
    const req_sink *sink;
    void *owner;                   /* the creator's (the client); NULL once the client is gone */
    pc_list link;                  /* the creator's list of requests in progress */
    proto_request req;
    uid_t uid;
    gid_t gid;
    uint64_t started_us;
};

pc_request *req_new(const req_sink *sink, void *owner);
void req_free(pc_request *r);

/* Answer and free r. result is taken over (a NULL result is encoded as {}). */
void req_reply_ok(pc_request *r, cJSON *result);
void req_reply_err(pc_request *r, proto_err code, const char *fmt, ...) PC_PRINTF(3, 4);

#endif
