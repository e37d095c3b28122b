/* admin.h - the operator's ops on prepared transactions: prepared, resolve,
 * recover (docs/protocol.md, docs/recovery.md). */
#ifndef PAYCOORD_ADMIN_H
#define PAYCOORD_ADMIN_H

#include "request.h"

void admin_handle_prepared(pc_request *r);
void admin_handle_resolve(pc_request *r);
void admin_handle_recover(pc_request *r);

#endif
