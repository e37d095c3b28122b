/* recon.h - reconciliation: runs that compare our books with the
 * processor's own list, the discrepancies they find, settling them by hand,
 * and the ledger audit (docs/reconciliation.md). */
#ifndef PAYCOORD_RECON_H
#define PAYCOORD_RECON_H

#include "request.h"

int recon_init(void) PC_MUSTCHECK;
/* Stop driving a run (it stays 'running' in the database and resumes at the next start). */
void recon_shutdown(void);

void recon_handle_reconcile(pc_request *r);
void recon_handle_status(pc_request *r);
void recon_handle_discrepancies(pc_request *r);
void recon_handle_settle(pc_request *r);
void recon_handle_audit(pc_request *r);

/* For stats: a run is being driven by this daemon, and its progress. */
bool recon_running(void);
int64_t recon_run_id(void);
int64_t recon_seen(void);
int64_t recon_pages(void);
/* Open discrepancies of one kind (as of the last refresh, every minute and after each run or settlement);
 * kind: charged_not_debited, debited_not_charged, amount_mismatch, unknown_gid, review. -1: not known yet. */
int64_t recon_open(const char *kind);

#endif
