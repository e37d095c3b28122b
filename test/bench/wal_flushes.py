"""Measures synchronous WAL flushes per successful payment without group
commit (docs/architecture.md, "Durability budget and round trips"): N sequential
payments through the daemon on an fsync-on cluster, pg_stat_wal.wal_sync
before and after. Prints the figures. (test/bench/run.sh reports the same
counter for every run, under concurrency, where one flush serves many
commits.)

    /usr/bin/python3 test/bench/wal_flushes.py [--payments 300]
"""
import argparse
import os
import sys
import tempfile
import time

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "..", "integration"))
import harness  # noqa: E402
from harness import Daemon, Postgres, Processor, check_invariants  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--payments", type=int, default=300)
    args = ap.parse_args()
    pg = Postgres()
    pg.env["PC_PG_FSYNC"] = "on"
    pg.start()
    pg.migrate()
    work = tempfile.mkdtemp(prefix="pc-wal-")
    psp = Processor(work)
    psp.start()
    d = Daemon(work, pg, psp, log_level="warning")
    try:
        d.start()
        c = d.client()
        c.ok("account_open", account="w", currency="EUR")
        c.ok("credit", account="w", amount=10**9, currency="EUR", idempotency_key="w-open")
        assert pg.query("SHOW fsync")[0][0] == "on"
        # PostgreSQL 15 flushes backends' statistics lazily (up to ~10 s idle).
        time.sleep(11)

        def wal():
            return pg.query("SELECT wal_sync, wal_write FROM pg_stat_wal")[0]

        s0 = wal()
        t0 = time.monotonic()
        for i in range(args.payments):
            assert c.ok("pay", account="w", amount=1, currency="EUR", idempotency_key=f"w-{i}")["status"] == "succeeded"
        took = time.monotonic() - t0
        time.sleep(11)                      # statistics flushed; includes the WAL writer's
        s1 = wal()
        n = args.payments
        print(f"{n} sequential payments in {took:.2f} s ({n / took:.0f}/s, {took / n * 1000:.2f} ms each)")
        print(f"WAL syncs: {s1[0] - s0[0]} for {n} payments = {(s1[0] - s0[0]) / n:.2f} per payment "
              f"(includes the WAL writer's background flushes of the asynchronous commits)")
        d.stop()
        check_invariants(pg, psp, node="t1")
    finally:
        d.kill9()
        psp.stop()
        pg.destroy()


if __name__ == "__main__":
    main()
