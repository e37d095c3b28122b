"""Randomized crash driver: rounds of concurrent payments and credits across a
few accounts (some too poor), each round with one fault -- a fail point, an
external kill -9 at a random moment, processor faults (timeouts, lost answers
after charging, 5xx after charging, pending), or a PostgreSQL restart -- then
restart, wait for recovery to quiesce, and check DESIGN.md's invariants I1-I7
(including: every client that got a final answer sees the same answer by key).

Each round prints its seed; `--seed S --rounds 1` replays a round's choices
(workload, fault, timing offsets; thread interleaving stays the machine's).

    /usr/bin/python3 test/integration/crash_driver.py --rounds 50 [--seed S]
"""

import argparse
import os
import random
import signal
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Daemon, Postgres, Processor, check_invariants, wait_for  # noqa: E402

FAILPOINTS = ["before_debit", "after_prepare", "after_send", "after_answer", "after_phase2"]
FAULTS = ["failpoint", "kill9", "timeouts", "lost_after_charge", "5xx_after_charge", "pending", "pg_restart", "none"]
ACCOUNTS = {"cr-rich": 10**9, "cr-mid": 3000, "cr-poor": 250}
SETTINGS = {"recovery_interval_ms": 200, "processor_poll_ms": 30, "processor_timeout_ms": 300,
            "processor_retries": 1, "processor_retry_base_ms": 20, "payment_deadline_ms": 1500,
            "pay_wait_ms": 4000, "queue_timeout_ms": 4000, "circuit_failures": 100000, "pool_size": 4,
            "drain_timeout_ms": 1000, "log_level": "notice"}


class Driver:
    def __init__(self, pg, psp, workdir, log=print):
        self.pg, self.psp, self.workdir, self.log = pg, psp, workdir, log
        self.daemon = None
        self.answers = {}        # key -> final status a client was told (I6)
        self.round_no = 0

    def start_daemon(self, env=None):
        if self.daemon is None:
            self.daemon = Daemon(self.workdir, self.pg, self.psp, **SETTINGS)
        self.daemon.start(env=env)

    def setup(self):
        self.start_daemon()
        c = self.daemon.client()
        for acct, bal in ACCOUNTS.items():
            r = c.call("account_open", account=acct, currency="EUR")
            if r["ok"]:
                c.ok("credit", account=acct, amount=bal, currency="EUR", idempotency_key=f"seed-{acct}")
        c.close()

    def _workload(self, rng, tag, nclients=4, per_client=4):
        """Concurrent clients; returns when all answered or their daemon died."""
        plans = []
        for ci in range(nclients):
            reqs = []
            for j in range(per_client):
                acct = rng.choice(list(ACCOUNTS))
                key = f"{tag}-{ci}-{j}"
                if rng.random() < 0.2:
                    reqs.append(("credit", dict(account=acct, amount=rng.randint(1, 200), currency="EUR",
                                                idempotency_key=key)))
                else:
                    meta = {}
                    x = rng.random()
                    if x < 0.15:
                        meta["sim"] = "decline"
                    reqs.append(("pay", dict(account=acct, amount=rng.randint(1, 400), currency="EUR",
                                             idempotency_key=key, **({"metadata": meta} if meta else {}))))
            plans.append(reqs)
        lock = threading.Lock()

        def run(reqs):
            try:
                c = self.daemon.client(timeout=15)
                rids = [(op, f["idempotency_key"], c.send(op, **f)) for op, f in reqs]
                for op, key, rid in rids:
                    r = c.wait(rid)
                    if op == "pay" and r.get("ok") and r["result"]["status"] != "pending":
                        with lock:
                            prev = self.answers.setdefault(key, r["result"]["status"])
                            assert prev == r["result"]["status"], f"I6: {key} answered {prev} then {r}"
                c.close()
            except (ConnectionError, OSError):
                pass            # the daemon died under us: expected in crash rounds

        ts = [threading.Thread(target=run, args=(p,)) for p in plans]
        for t in ts:
            t.start()
        return ts

    def quiesce(self, timeout=30):
        def settled():
            n = self.pg.query("SELECT (SELECT count(*) FROM payments WHERE status = 'pending') + "
                              "(SELECT count(*) FROM pg_prepared_xacts) + "
                              "(SELECT count(*) FROM credits WHERE status = 'accepted')")[0][0]
            return n == 0
        wait_for(settled, timeout=timeout, interval=0.05, what="recovery to quiesce")

    def round(self, seed):
        rng = random.Random(seed)
        self.round_no += 1
        tag = f"r{self.round_no}s{seed}"
        fault = rng.choice(FAULTS)
        detail = ""
        d = self.daemon
        self.psp.faults(latency_ms=0, jitter_ms=0, fail_after_rate=0.0, drop_after_rate=0.0, pending_rate=0.0,
                        fail_before_rate=0.0, blackhole=False, fault_ops=["create"], seed=seed % 2**31)
        if fault == "failpoint":
            point = rng.choice(FAILPOINTS)
            victim = f"{tag}-{rng.randrange(4)}-{rng.randrange(4)}"
            detail = f"{point}@{victim}"
            if point == "after_send":
                self.psp.faults(latency_ms=300)
            d.stop()
            d.start(env={"PAYCOORD_FAILPOINT": point, "PAYCOORD_FAILPOINT_KEY": victim})
        elif fault == "timeouts":
            self.psp.faults(latency_ms=rng.choice([250, 400]), jitter_ms=200)
        elif fault == "lost_after_charge":
            self.psp.faults(drop_after_rate=0.5)
        elif fault == "5xx_after_charge":
            self.psp.faults(fail_after_rate=0.5)
        elif fault == "pending":
            self.psp.faults(pending_rate=0.6, settle_ms=rng.choice([100, 300, 2500]),
                            settle_status=rng.choice(["succeeded", "declined"]))
        threads = self._workload(rng, tag)
        if fault == "kill9":
            delay = rng.uniform(0.0, 0.15)
            detail = f"after {delay * 1000:.0f}ms"
            time.sleep(delay)
            d.kill9()
        elif fault == "pg_restart":
            delay = rng.uniform(0.0, 0.15)
            detail = f"after {delay * 1000:.0f}ms"
            time.sleep(delay)
            self.pg.restart()
        for t in threads:
            t.join(60)
        self.log(f"round {self.round_no} seed={seed} fault={fault} {detail}".rstrip())
        # Restart what died, clear faults, let recovery settle everything.
        self.psp.faults(latency_ms=0, jitter_ms=0, fail_after_rate=0.0, drop_after_rate=0.0, pending_rate=0.0,
                        blackhole=False)
        if d.proc.poll() is not None or fault == "failpoint":
            if d.proc.poll() is None:
                # Its sockets close before a process dying at a fail point can
                # be reaped: it may exit 99 under our SIGTERM.
                d.proc.send_signal(signal.SIGTERM)
                rc = d.proc.wait(30)
                assert rc in (0, 99), f"daemon exit code {rc}: {d.tail()}"
            d.start()
        self.quiesce()
        check_invariants(self.pg, self.psp, answers=self.answers, node="t1")

    def close(self):
        if self.daemon:
            self.daemon.kill9()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--seed", type=int, default=None, help="first seed (default: random)")
    args = ap.parse_args()
    first = args.seed if args.seed is not None else random.randrange(1, 2**31)
    print(f"crash driver: {args.rounds} rounds from seed {first}", flush=True)
    pg = Postgres()
    pg.start()
    pg.migrate()
    work = tempfile.mkdtemp(prefix="pc-crash-")
    psp = Processor(work)
    psp.start()
    drv = Driver(pg, psp, work, log=lambda m: print(m, flush=True))
    ok = False
    try:
        drv.setup()
        for i in range(args.rounds):
            drv.round(first + i)
        ok = True
        print(f"crash driver: {args.rounds} rounds passed, {len(drv.answers)} final answers checked")
    finally:
        drv.close()
        psp.stop()
        pg.destroy()
        if not ok:
            print(f"crash driver: FAILED; daemon log: {drv.daemon.log if drv.daemon else '-'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
