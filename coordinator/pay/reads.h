/* reads.h - the ops that read money: status, balance; and account_open. */
#ifndef PAYCOORD_READS_H
#define PAYCOORD_READS_H

#include "request.h"

void reads_handle_status(pc_request *r);
void reads_handle_balance(pc_request *r);
void reads_handle_account_open(pc_request *r);

#endif
