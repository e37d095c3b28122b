"""Reconciliation benchmark (a program that prints figures, not a timed test):
one run over N processor payments (default 100,000) that match N payments of
ours, except DIFF of them (amount changed at the processor), while a light
payment load runs alongside. Prints the run's time, the daemon's peak
memory (VmHWM) and how the payment path answered meanwhile; checks that the
run found exactly the DIFF differences and that the invariants hold.
Targets (issue 12): under 60 s and under 64 MiB, payments still answering.

    /usr/bin/python3 test/bench/recon_bench.py [--payments 100000] [--diff 10] [--pay-interval-ms 20]
Environment: PAYCOORD_BUILD (default ./build-bench or ./build).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "..", "integration"))
import harness  # noqa: E402
from harness import Daemon, Postgres, Processor, check_invariants  # noqa: E402

ACCOUNTS = 1000


def make_ours(pg, n, diff, now):
    """n succeeded payments of node 'rc' spread over the last hour, with their
    debits; ACCOUNTS accounts credited enough. Returns [(gid, amount, created)]."""
    with pg.connect() as c:
        c.execute("INSERT INTO accounts (id, currency, balance) SELECT 'rc-' || i, 'EUR', 0 "
                  "FROM generate_series(1, %s) i", (ACCOUNTS,))
        c.execute("INSERT INTO credits (credit_id, idempotency_key, account_id, amount, currency, status, applied_at) "
                  "SELECT gen_random_uuid(), 'rc-open-' || i, 'rc-' || i, 100000000, 'EUR', 'applied', now() "
                  "FROM generate_series(1, %s) i", (ACCOUNTS,))
        c.execute("INSERT INTO ledger (account_id, amount, balance_after, credit_id) "
                  "SELECT account_id, amount, amount, credit_id FROM credits WHERE idempotency_key LIKE 'rc-open-%%'")
        c.execute("CREATE TEMP TABLE bench AS SELECT i, md5('rc' || i)::uuid AS pid, "
                  "'pc:rc:' || md5('rc' || i) AS gid, 'rc-' || (1 + i %% %s) AS acct, 100 + i %% 900 AS amount, "
                  "to_timestamp(%s - 3000 + (i * 3000.0 / %s)) AS created FROM generate_series(1, %s) i",
                  (ACCOUNTS, now, n, n))
        c.execute("INSERT INTO payments (payment_id, idempotency_key, account_id, amount, currency, gid, node, "
                  "status, processor_ref, deadline, created_at, updated_at) "
                  "SELECT pid, 'rc-key-' || i, acct, amount, 'EUR', gid, 'rc', 'succeeded', 'psp_' || lpad(i::text, 12, '0'), "
                  "created + interval '1 minute', created, created FROM bench")
        c.execute("INSERT INTO ledger (account_id, amount, balance_after, payment_id, created_at) "
                  "SELECT acct, -amount, 0, pid, created FROM bench")
        c.execute("UPDATE accounts a SET balance = (SELECT sum(amount) FROM ledger l WHERE l.account_id = a.id) "
                  "WHERE a.id LIKE 'rc-%%'")
        c.execute("ANALYZE")
        return c.execute("SELECT gid, amount, extract(epoch FROM created)::bigint, acct FROM bench ORDER BY i").fetchall()


def write_state(path, rows, diff):
    """psp-sim's state file (generic mode): the same payments, charged; the
    first `diff` of them with another amount."""
    last = max(r[2] for r in rows)
    with open(path, "w") as f:
        f.write(json.dumps({"psp_sim_state": 1, "next_seq": len(rows) + 1, "last_created": last}) + "\n")
        for seq, (gid, amount, created, acct) in enumerate(rows, 1):
            f.write(json.dumps({"id": f"psp_{seq:012d}", "idempotency_key": gid,
                                "amount": amount + (7 if seq <= diff else 0), "currency": "EUR", "account": acct,
                                "reference": None, "status": "succeeded", "created": created}) + "\n")


class StateProcessor(Processor):
    """psp-sim loading a state file."""

    def __init__(self, workdir, state):
        super().__init__(workdir, mode="generic")
        self.state = state

    def start(self, port=0):
        real = harness.PSP_SIM
        wrapper = os.path.join(self.workdir, "psp-sim-state.sh")
        with open(wrapper, "w") as f:
            f.write(f"#!/bin/sh\nexec {real} --state {self.state} \"$@\"\n")
        os.chmod(wrapper, 0o755)
        harness.PSP_SIM = wrapper
        try:
            super().start(port)
        finally:
            harness.PSP_SIM = real


def vm_hwm_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return -1


def pay_load(d, interval_ms, stop, out):
    """One payment every interval_ms on its own connection; counts answers and their latency."""
    c = d.client(timeout=30)
    i = 0
    while not stop.is_set():
        t0 = time.monotonic()
        try:
            r = c.call("pay", account="load-1", amount=1, currency="EUR", idempotency_key=f"load-{i}", wait_ms=5000)
            out["lat"].append((time.monotonic() - t0) * 1000)
            out["ok" if "result" in r else "err"] += 1
        except Exception as e:  # noqa: BLE001 - counted, the benchmark goes on
            out["err"] += 1
            out["last_error"] = repr(e)
            c = d.client(timeout=30)
        i += 1
        left = interval_ms / 1000 - (time.monotonic() - t0)
        if left > 0:
            time.sleep(left)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--payments", type=int, default=100000)
    ap.add_argument("--diff", type=int, default=10)
    ap.add_argument("--pay-interval-ms", type=int, default=20)
    ap.add_argument("--page-size", type=int, default=500)
    args = ap.parse_args()
    src = os.path.abspath(os.path.join(here, "..", ".."))
    if "PAYCOORD_BUILD" not in os.environ:
        for b in ("build-bench", "build"):
            if os.path.exists(os.path.join(src, b, "coordinator", "paycoord")):
                os.environ["PAYCOORD_BUILD"] = os.path.join(src, b)
                break
    harness.PAYCOORD_BIN = os.path.join(os.environ["PAYCOORD_BUILD"], "coordinator", "paycoord")
    harness.PSP_SIM = os.path.join(os.environ["PAYCOORD_BUILD"], "test", "processor", "psp-sim")

    pg = Postgres()
    pg.env["PC_PG_FSYNC"] = "on"
    pg.start()
    pg.migrate()
    work = tempfile.mkdtemp(prefix="pc-reconbench-")
    psp = d = None
    try:
        now = int(time.time())
        t0 = time.monotonic()
        rows = make_ours(pg, args.payments, args.diff, now)
        state = os.path.join(work, "psp-state.json")
        write_state(state, rows, args.diff)
        psp = StateProcessor(work, state)
        psp.start()
        print(f"setup: {args.payments} payments here and at the processor ({args.diff} with another amount "
              f"there) in {time.monotonic() - t0:.1f}s", flush=True)
        d = Daemon(work, pg, psp, node_id="rc", pool_size=4, log_level="notice", recon_page_size=args.page_size)
        d.start()
        c = d.client(timeout=60)
        c.ok("account_open", account="load-1", currency="EUR")
        c.ok("credit", account="load-1", amount=10 ** 9, currency="EUR", idempotency_key="load-open")
        hwm_before = vm_hwm_kib(d.proc.pid)

        load = {"ok": 0, "err": 0, "lat": []}
        stop = threading.Event()
        th = threading.Thread(target=pay_load, args=(d, args.pay_interval_ms, stop, load), daemon=True)
        th.start()
        time.sleep(1.0)
        base_ok = load["ok"]
        t0 = time.monotonic()
        started = c.ok("reconcile", **{"from": now - 3600, "to": now + 60})
        run_id = started["run_id"]
        while True:
            runs = c.ok("reconcile_status")["runs"]
            run = [r for r in runs if r["run_id"] == run_id][0]
            if run["state"] != "running":
                break
            if time.monotonic() - t0 > 600:
                raise SystemExit("the run did not end within 600 s")
            time.sleep(0.05)
        took = time.monotonic() - t0
        during_ok = load["ok"] - base_ok
        stop.set()
        th.join(10)
        hwm = vm_hwm_kib(d.proc.pid)
        lat = sorted(load["lat"])
        p50 = lat[len(lat) // 2] if lat else float("nan")
        p99 = lat[int(len(lat) * 0.99)] if lat else float("nan")
        print(f"reconciliation: {run['seen']} processor payments in {took:.2f} s ({run['seen'] / took:.0f}/s), "
              f"{run['pages']} pages, state {run['state']}, matched {run['matched']}, differences "
              f"{run['differences']}, missing_there {run['missing_there']}")
        print(f"daemon memory: VmHWM {hwm / 1024:.1f} MiB (before the run {hwm_before / 1024:.1f} MiB)")
        print(f"payment path meanwhile: {during_ok} payments answered during the run "
              f"({load['ok']} in all, {load['err']} errors), latency p50 {p50:.1f} ms p99 {p99:.1f} ms"
              + (f"; last error {load.get('last_error')}" if load.get("last_error") else ""))
        ds = c.ok("discrepancies")["discrepancies"]
        # The processor also lists the load's payments (made during the run, inside the window).
        assert run["state"] == "done" and run["seen"] >= args.payments and run["missing_there"] == 0, run
        assert len(ds) == args.diff and {x["kind"] for x in ds} == {"amount_mismatch"}, ds[:3]
        verdict = "MET" if took < 60 and hwm / 1024 < 64 and during_ok > 0 and load["err"] == 0 else "NOT MET"
        print(f"targets (< 60 s, < 64 MiB, payments answering): {verdict}")
        r = c.ok("audit")
        print(f"audit: {'ok' if r['ok'] else r['offenders'][:5]}")
        d.stop()
        d = None
        for x in ds:
            # make the processor agree again so that the invariants can be checked
            psp._req("POST", "/control/amend", {"key": x["gid"], "amount": x["ours"]["amount"]})
        check_invariants(pg, psp, node="rc")
        print("invariants I1-I6 hold")
    finally:
        if d:
            d.kill9()
        if psp:
            psp.stop()
        pg.destroy()
        subprocess.run(["rm", "-rf", work])


if __name__ == "__main__":
    main()
