"""Recovery benchmark (a program that prints figures, not a timed test):
N orphaned prepared transactions (default 10,000) on distinct accounts, half
already charged at the processor, half unknown to it; the processor answers
every call after LATENCY ms (default 5). Starts the daemon and prints the time
until every one is settled (no prepared transaction, no pending row), then
checks the invariants.

    /usr/bin/python3 test/bench/recovery_bench.py [--orphans 10000] [--latency-ms 5]
Environment: PAYCOORD_BUILD (default ./build-bench or ./build).
"""

import argparse
import os
import sys
import tempfile
import threading
import time
import uuid

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "..", "integration"))
from harness import Daemon, Postgres, Processor, check_invariants  # noqa: E402


def make_orphans(pg, psp, n, node, threads=8):
    """Each orphan: an account with money, an intent row, and a prepared debit,
    exactly as the daemon leaves them when it dies after PREPARE."""
    with pg.connect() as c:
        c.execute("INSERT INTO accounts (id, currency, balance) SELECT 'rb-' || i, 'EUR', 0 "
                  "FROM generate_series(1, %s) i", (n,))
        c.execute("INSERT INTO credits (credit_id, idempotency_key, account_id, amount, currency, status, applied_at) "
                  "SELECT gen_random_uuid(), 'rb-open-' || i, 'rb-' || i, 1000, 'EUR', 'applied', now() "
                  "FROM generate_series(1, %s) i", (n,))
        c.execute("INSERT INTO ledger (account_id, amount, balance_after, credit_id) "
                  "SELECT account_id, amount, amount, credit_id FROM credits WHERE idempotency_key LIKE 'rb-open-%%'")
        c.execute("UPDATE accounts SET balance = 1000 WHERE id LIKE 'rb-%%'")
    gids = [None] * n

    def work(lo, hi):
        with pg.connect() as c:
            for i in range(lo, hi):
                pid = uuid.uuid4()
                gid = f"pc:{node}:{pid.hex}"
                acct = f"rb-{i + 1}"
                c.execute("SELECT pc_pay_intent(%s, %s, %s, 100, 'EUR', NULL, NULL, %s, %s, 600000)",
                          (pid, f"rb-key-{i}", acct, gid, node))
                c.execute("BEGIN")
                c.execute("SELECT pc_pay_debit(%s, %s, 100)", (pid, acct))
                c.execute(f"PREPARE TRANSACTION '{gid}'")
                gids[i] = gid

    step = (n + threads - 1) // threads
    ts = [threading.Thread(target=work, args=(k, min(n, k + step))) for k in range(0, n, step)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    charged = 0
    for i, gid in enumerate(gids):
        if i % 2 == 0:
            st, body = psp.create(gid, 100, "EUR", f"rb-{i + 1}")
            assert st in (200, 201) and body["status"] == "succeeded", body
            charged += 1
    return charged


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--orphans", type=int, default=10000)
    ap.add_argument("--latency-ms", type=int, default=5)
    ap.add_argument("--pool-size", type=int, default=8)
    args = ap.parse_args()
    src = os.path.abspath(os.path.join(here, "..", ".."))
    if "PAYCOORD_BUILD" not in os.environ:
        for b in ("build-bench", "build"):
            if os.path.exists(os.path.join(src, b, "coordinator", "paycoord")):
                os.environ["PAYCOORD_BUILD"] = os.path.join(src, b)
                break
    import harness
    harness.PAYCOORD_BIN = os.path.join(os.environ["PAYCOORD_BUILD"], "coordinator", "paycoord")
    harness.PSP_SIM = os.path.join(os.environ["PAYCOORD_BUILD"], "test", "processor", "psp-sim")

    pg = Postgres(max_prepared=args.orphans + 2000)
    pg.env["PC_PG_FSYNC"] = "on"            # realistic: every COMMIT/ROLLBACK PREPARED flushes
    pg.start()
    pg.migrate()
    work = tempfile.mkdtemp(prefix="pc-recbench-")
    psp = Processor(work)
    psp.start()
    d = None
    try:
        t0 = time.monotonic()
        charged = make_orphans(pg, psp, args.orphans, "rb")
        print(f"setup: {args.orphans} orphans ({charged} charged at the processor) in "
              f"{time.monotonic() - t0:.1f}s", flush=True)
        psp.faults(latency_ms=args.latency_ms)
        d = Daemon(work, pg, psp, node_id="rb", pool_size=args.pool_size, processor_max_connections=64,
                   recovery_interval_ms=1000, processor_timeout_ms=5000, log_level="warning",
                   max_in_flight=100)
        t0 = time.monotonic()
        d.start(wait_ready=False)
        with pg.connect() as c:
            while True:
                left = c.execute("SELECT (SELECT count(*) FROM pg_prepared_xacts) + "
                                 "(SELECT count(*) FROM payments WHERE status = 'pending')").fetchone()[0]
                if left == 0:
                    break
                if time.monotonic() - t0 > 600:
                    raise SystemExit(f"not settled after 600 s: {left} left")
                time.sleep(0.05)
        took = time.monotonic() - t0
        print(f"recovery: {args.orphans} orphans settled in {took:.2f} s "
              f"({args.orphans / took:.0f}/s; processor latency {args.latency_ms} ms, pool {args.pool_size})")
        stats = d.client().ok("stats")["recovery"]
        print(f"recovery counters: {stats}")
        d.stop()
        check_invariants(pg, psp, node="rb")
        rows = dict(pg.query("SELECT status, count(*) FROM payments GROUP BY status"))
        print(f"payments: {rows}; invariants I1-I5 hold")
    finally:
        if d:
            d.kill9()
        psp.stop()
        pg.destroy()


if __name__ == "__main__":
    main()
