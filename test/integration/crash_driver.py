"""Randomized crash driver: rounds of concurrent payments and credits across a
few accounts (some too poor), each round with one fault -- a fail point, an
external kill -9 at a random moment, processor faults (timeouts, lost answers
after charging, 5xx after charging, pending), a PostgreSQL restart, retries
of keys whose payment is in doubt (after a kill -9, with the processor unable
to tell recovery anything, more keys retried at once than the pool has
connections), PostgreSQL killed while the daemon is down, or the database
connection dropped during phase 1 (pgproxy) -- and, in some rounds,
conflicting reuses of finished keys racing legitimate retries of them. Then
restart what died, wait for recovery to quiesce, and check the invariants
I1-I7 (harness.check_invariants), plus:

  I6   every client that got a final answer sees the same answer by key;
  told every payment_id/gid a client was told exists in the database under
       that key, and every answer for a key named the same payment_id/gid;
  hang no request went unanswered while the daemon was alive;
  race a legitimate retry is never refused idempotency_conflict, a
       conflicting reuse never accepted.

The daemon always talks to PostgreSQL through pgproxy.py (the phase-1 drop
needs it; the other kinds do not notice it).

Each round prints its seed; `--seed S --rounds 1` replays a round's choices
(workload, fault, timing offsets; thread interleaving stays the machine's).
`--faults a,b` restricts the rounds to those fault kinds. `--processor`
(default: $PC_PROCESSOR, else generic) picks the processor API: psp-sim's
mode and the daemon's processor_api. With adyen, a payment whose create never
reached the processor (a crash right after PREPARE) goes to manual review at
its deadline (Adyen cannot be asked about it); the driver then acts as the
operator, settling it by the processor's own list, and requires that the
processor holds no charge for it (a charge would mean a webhook was missed).

    /usr/bin/python3 test/integration/crash_driver.py --rounds 50 [--seed S] [--faults phase1_drop] [--processor adyen]
"""

import argparse
import os
import random
import signal
import socket
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import PROCESSOR, Daemon, Postgres, Processor, check_invariants, wait_for  # noqa: E402
from pgproxy import PgProxy  # noqa: E402

FAILPOINTS = ["before_debit", "after_prepare", "after_send", "after_answer", "after_phase2"]
FAULTS = ["failpoint", "kill9", "timeouts", "lost_after_charge", "5xx_after_charge", "pending", "pg_restart", "none",
          "indoubt_retries", "pg_kill_daemon_down", "phase1_drop"]
CRASHES = {"failpoint", "kill9", "pg_kill_daemon_down", "indoubt_retries"}
ACCOUNTS = {"cr-rich": 10**9, "cr-mid": 3000, "cr-poor": 250}
# indoubt_retries rounds pay on these: one prepared debit per account at a
# time, so more accounts than pool connections (pool_size 4) are needed for
# the retries to be able to park the whole pool
INDOUBT_ACCOUNTS = {f"cr-id{i}": 10**9 for i in range(7)}
SETTINGS = {"recovery_interval_ms": 200, "processor_poll_ms": 30, "processor_timeout_ms": 300,
            "processor_retries": 1, "processor_retry_base_ms": 20, "payment_deadline_ms": 1500,
            "pay_wait_ms": 4000, "queue_timeout_ms": 4000, "circuit_failures": 100000, "pool_size": 4,
            "drain_timeout_ms": 1000, "log_level": "notice",
            # stripe: a search finding nothing is conclusive 1 s + the timeout after the deadline;
            # adyen: a technical cancel not decided by a webhook within 1 s goes to review
            "stripe_search_lag_s": 1, "adyen_webhook_timeout_s": 1}
REUSE_RACE_P = 0.35
CLEAR = dict(latency_ms=0, jitter_ms=0, fail_after_rate=0.0, drop_after_rate=0.0, pending_rate=0.0,
             fail_before_rate=0.0, blackhole=False, fault_ops=["create"])


class RoundFailure(AssertionError):
    pass


class Driver:
    def __init__(self, pg, psp, workdir, log=print, faults=None, reuse_race_p=REUSE_RACE_P):
        self.pg, self.psp, self.workdir, self.log = pg, psp, workdir, log
        self.faults = faults or FAULTS
        self.reuse_race_p = reuse_race_p
        self.daemon = None
        self.proxy = None
        self.answers = {}        # key -> final status a client was told (I6)
        self.finished = {}       # key -> (account, amount, payment_id, status): finished pays, for reuse races
        self.round_no = 0
        self.lock = threading.Lock()
        self.problems = []       # this round's violations of the checks above
        self.told = {}           # this round's key -> (payment_id, gid) told to a client
        self.reviews = 0         # gids the operator settled (adyen: never reached the processor)
        self.timings = {}        # fault kind -> round durations (s)

    def start_daemon(self, env=None):
        if self.daemon is None:
            self.proxy = PgProxy(self.pg.sock, workdir=self.workdir).start()
            self.daemon = Daemon(self.workdir, self.pg, self.psp, db_conninfo=self.proxy.conninfo, **SETTINGS)
        self.daemon.start(env=env)

    def setup(self):
        self.start_daemon()
        c = self.daemon.client()
        for acct, bal in {**ACCOUNTS, **INDOUBT_ACCOUNTS}.items():
            r = c.call("account_open", account=acct, currency="EUR")
            if r["ok"]:
                c.ok("credit", account=acct, amount=bal, currency="EUR", idempotency_key=f"seed-{acct}")
        c.close()

    # -- bookkeeping of what clients were told
    def _record(self, key, fields, r):
        """Every answer to a pay: I6, one payment_id/gid per key, the told set."""
        if not r.get("ok"):
            if r.get("error", {}).get("code") == "internal":
                self.problems.append(f"internal error for {key}: {r['error']}")
            return
        res = r["result"]
        with self.lock:
            ids = (res["payment_id"], res["gid"])
            prev = self.told.setdefault(key, ids)
            if prev != ids:
                self.problems.append(f"told: {key} answered payment {prev} and later {ids}")
            if res["status"] != "pending":
                first = self.answers.setdefault(key, res["status"])
                if first != res["status"]:
                    self.problems.append(f"I6: {key} answered {first} then {res['status']}")
                self.finished[key] = (fields["account"], fields["amount"], res["payment_id"], res["status"])

    def _hang(self, what, seconds=15):
        d = self.daemon
        if d.proc.poll() is None:
            self.problems.append(f"hang: {what} unanswered for {seconds} s while the daemon was alive")

    def _workload(self, rng, tag, nclients=4, per_client=4, accounts=ACCOUNTS):
        """Concurrent clients; returns the threads and the pay plans."""
        plans = []
        for ci in range(nclients):
            reqs = []
            for j in range(per_client):
                acct = rng.choice(list(accounts))
                if accounts is INDOUBT_ACCOUNTS:        # every account gets one: more debits in doubt than connections
                    acct = list(accounts)[(ci * per_client + j) % len(accounts)]
                key = f"{tag}-{ci}-{j}"
                if rng.random() < 0.2:
                    reqs.append(("credit", dict(account=acct, amount=rng.randint(1, 200), currency="EUR",
                                                idempotency_key=key)))
                else:
                    meta = {}
                    if rng.random() < 0.15:
                        meta["sim"] = "decline"
                    reqs.append(("pay", dict(account=acct, amount=rng.randint(1, 400), currency="EUR",
                                             idempotency_key=key, **({"metadata": meta} if meta else {}))))
            plans.append(reqs)

        def run(reqs):
            try:
                c = self.daemon.client(timeout=15)
                rids = [(op, f, c.send(op, **f)) for op, f in reqs]
                for op, f, rid in rids:
                    try:
                        r = c.wait(rid)
                    except socket.timeout:
                        self._hang(f"{op} {f['idempotency_key']}")
                        break
                    if op == "pay":
                        self._record(f["idempotency_key"], f, r)
                c.close()
            except (ConnectionError, OSError):
                pass            # the daemon died under us: expected in crash rounds

        ts = [threading.Thread(target=run, args=(p,)) for p in plans]
        for t in ts:
            t.start()
        pays = [f for p in plans for op, f in p if op == "pay"]
        return ts, pays

    def _reuse_race(self, rng):
        """Conflicting reuses of finished keys pipelined with legitimate
        retries, on one connection and on several."""
        with self.lock:
            keys = list(self.finished)
        if not keys:
            return []
        picked = rng.sample(keys, min(3, len(keys)))

        def run():
            try:
                plan = []
                for key in picked:
                    acct, amount, pid, status = self.finished[key]
                    legit = dict(account=acct, amount=amount, currency="EUR", idempotency_key=key)
                    bad = dict(legit, amount=amount + rng.randint(1, 50))
                    seq = [("bad", bad), ("legit", legit), ("legit", legit), ("bad", bad)]
                    rng.shuffle(seq)
                    plan += [(kind, key, f) for kind, f in seq]
                one = self.daemon.client(timeout=15)
                many = [self.daemon.client(timeout=15) for _ in plan]
                sent = [(kind, key, one, one.send("pay", **f)) for kind, key, f in plan]
                sent += [(kind, key, cl, cl.send("pay", **f)) for (kind, key, f), cl in zip(plan, many)]
                for kind, key, cl, rid in sent:
                    try:
                        r = cl.wait(rid)
                    except socket.timeout:
                        self._hang(f"reuse {kind} {key}")
                        continue
                    if r.get("ok"):
                        if kind == "bad":
                            self.problems.append(f"race: conflicting reuse of {key} accepted: {r['result']}")
                        elif r["result"]["payment_id"] != self.finished[key][2]:
                            self.problems.append(f"race: retry of {key} answered another payment {r['result']}")
                        elif r["result"]["status"] != self.finished[key][3]:
                            self.problems.append(f"I6: retry of {key} answered {r['result']['status']}, "
                                                 f"first {self.finished[key][3]}")
                    else:
                        code = r["error"]["code"]
                        if kind == "legit" and code == "idempotency_conflict":
                            self.problems.append(f"race: legitimate retry of {key} refused idempotency_conflict")
                        elif kind == "bad" and code not in ("idempotency_conflict", "unavailable", "overloaded",
                                                            "shutting_down"):
                            self.problems.append(f"race: conflicting reuse of {key} answered {code}")
                        elif code == "internal":
                            self.problems.append(f"race: {kind} retry of {key} answered internal")
                for cl in [one] + many:
                    cl.close()
            except (ConnectionError, OSError):
                pass

        t = threading.Thread(target=run)
        t.start()
        return [t]

    def _retry_in_doubt(self, pays):
        """After the restart: retry every pay of the round at once, one
        connection per key (more keys than pool connections), wait_ms 0.
        Each must be answered within 10 s."""
        def run(f):
            try:
                c = self.daemon.client(timeout=10)
                try:
                    r = c.call("pay", **dict(f, wait_ms=0))
                except socket.timeout:
                    self._hang(f"retry of in-doubt key {f['idempotency_key']}", 10)
                    return
                self._record(f["idempotency_key"], f, r)
                c.close()
            except (ConnectionError, OSError):
                pass

        ts = [threading.Thread(target=run, args=(f,)) for f in pays]
        for t in ts:
            t.start()
        for t in ts:
            t.join(30)

    def operator(self):
        """Settle what went to manual review by the processor's own list."""
        c = self.daemon.client(timeout=10)
        try:
            for t in c.ok("prepared")["transactions"]:
                if t["state"] != "review":
                    continue
                st = self.psp.status(t["gid"])
                if st == "succeeded" and self.psp.mode == "adyen":
                    self.problems.append(f"review: {t['gid']} went to review although the processor charged it "
                                         f"(its AUTHORISATION webhook was missed): {t.get('last_error')}")
                r = c.call("resolve", gid=t["gid"], action="commit" if st == "succeeded" else "rollback",
                           reason=f"crash driver as operator: processor says {st}")
                if r.get("ok"):
                    self.reviews += 1
        finally:
            c.close()

    def quiesce(self, timeout=30):
        last_op = [0.0]

        def settled():
            if self.psp.mode != "generic" and self.daemon.proc.poll() is None and time.monotonic() > last_op[0] + 0.25:
                last_op[0] = time.monotonic()
                try:
                    self.operator()
                except (OSError, ConnectionError, AssertionError):
                    pass
            n = self.pg.query("SELECT (SELECT count(*) FROM payments WHERE status = 'pending') + "
                              "(SELECT count(*) FROM pg_prepared_xacts) + "
                              "(SELECT count(*) FROM credits WHERE status = 'accepted')")[0][0]
            return n == 0
        wait_for(settled, timeout=timeout, interval=0.05, what="recovery to quiesce")

    def _check_told(self, keys):
        """Every payment_id/gid told to a client exists, under its key."""
        if not keys:
            return
        rows = {k: (p, g) for k, p, g in self.pg.query(
            "SELECT idempotency_key, payment_id::text, gid FROM payments WHERE idempotency_key = ANY(%s)",
            (list(keys),))}
        for key, ids in keys.items():
            if rows.get(key) != ids:
                self.problems.append(f"told: {key} was told payment {ids}; the database has {rows.get(key)}")

    def round(self, seed):
        t0 = time.monotonic()
        rng = random.Random(seed)
        self.round_no += 1
        tag = f"r{self.round_no}s{seed}"
        fault = rng.choice(self.faults)
        race = rng.random() < self.reuse_race_p
        detail = ""
        d = self.daemon
        self.problems = []
        self.told = {}
        self.psp.faults(**CLEAR, seed=seed % 2**31)
        self.proxy.clear_rules()
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
        elif fault == "indoubt_retries":
            # creates never answered: every debit stays prepared, in doubt
            self.psp.faults(blackhole=True, fault_ops=["create"])
        elif fault == "phase1_drop":
            action = rng.choice(["cut_before", "lose_answer", "cut_after"])
            count = rng.randint(1, 3)
            slow_check = rng.random() < 0.5
            detail = f"{action} x{count}{' slow_check' if slow_check else ''}"
            if slow_check:
                self.proxy.add_rule("EXISTS (SELECT 1 FROM pg_prepared_xacts x WHERE x.gid = p.gid) FROM payments p",
                                    "delay", count=None, delay_s=0.5)
            self.proxy.add_rule("PREPARE TRANSACTION", action, count=count)
        threads, pays = self._workload(rng, tag, accounts=INDOUBT_ACCOUNTS if fault == "indoubt_retries" else ACCOUNTS)
        if race:
            threads += self._reuse_race(rng)
            detail += " +reuse_race"
        if fault == "kill9":
            delay = rng.uniform(0.0, 0.15)
            detail = f"after {delay * 1000:.0f}ms" + detail
            time.sleep(delay)
            d.kill9()
        elif fault == "pg_restart":
            delay = rng.uniform(0.0, 0.15)
            detail = f"after {delay * 1000:.0f}ms" + detail
            time.sleep(delay)
            self.pg.restart()
        elif fault == "pg_kill_daemon_down":
            delay = rng.uniform(0.0, 0.3)
            detail = f"after {delay * 1000:.0f}ms" + detail
            time.sleep(delay)
            d.kill9()
            self.pg.kill()                        # immediate stop while the daemon is down
            time.sleep(rng.uniform(0.0, 0.3))
            self.pg.start()
        elif fault == "indoubt_retries":
            # kill once more debits are in doubt than the pool has connections
            want = SETTINGS["pool_size"] + 1
            try:
                wait_for(lambda: self.pg.query("SELECT count(*) FROM pg_prepared_xacts")[0][0] >= want,
                         timeout=5, interval=0.02)
            except AssertionError:
                pass
            delay = rng.uniform(0.0, 0.3)
            n = self.pg.query("SELECT count(*) FROM pg_prepared_xacts")[0][0]
            detail = f"kill {delay * 1000:.0f}ms after {n} prepared" + detail
            time.sleep(delay)
            d.kill9()
        for t in threads:
            t.join(60)
        self.log(f"round {self.round_no} seed={seed} fault={fault} {detail}".rstrip())
        if fault == "indoubt_retries":
            # The processor can tell recovery nothing; the clients retry every key.
            self.psp.faults(blackhole=False, fail_before_rate=1.0, fault_ops=["create", "get", "cancel", "list"])
            d.start()
            self._retry_in_doubt(pays)
        self.proxy.clear_rules()
        # Restart what died, clear faults, let recovery settle everything.
        self.psp.faults(**CLEAR)
        if d.proc.poll() is not None or fault == "failpoint":
            if d.proc.poll() is None:
                # Its sockets close before a process dying at a fail point can
                # be reaped: it may exit 99 under our SIGTERM.
                d.proc.send_signal(signal.SIGTERM)
                rc = d.proc.wait(30)
                assert rc in (0, 99), f"daemon exit code {rc}: {d.tail()}"
            d.start()
        try:
            self.quiesce()
        except AssertionError as e:
            self.problems.append(str(e))
        self._check_told(self.told)
        if self.problems:
            raise RoundFailure(f"round {self.round_no} seed={seed} fault={fault}: " + "; ".join(self.problems[:8]))
        check_invariants(self.pg, self.psp, answers=self.answers, node="t1")
        self.timings.setdefault(fault, []).append(time.monotonic() - t0)

    def close(self):
        if self.daemon:
            self.daemon.kill9()
        if self.proxy:
            self.proxy.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--seed", type=int, default=None, help="first seed (default: random)")
    ap.add_argument("--faults", default=None, help=f"comma-separated subset of: {', '.join(FAULTS)}")
    ap.add_argument("--reuse-race-p", type=float, default=REUSE_RACE_P,
                    help=f"probability of a reuse race in a round (default {REUSE_RACE_P})")
    ap.add_argument("--processor", default=PROCESSOR, choices=["generic", "stripe", "adyen"],
                    help="the processor API (psp-sim --mode and processor_api); default $PC_PROCESSOR or generic")
    ap.add_argument("--keep-going", action="store_true",
                    help="after a failed round, restart everything and go on (prints every failing seed)")
    args = ap.parse_args()
    faults = args.faults.split(",") if args.faults else None
    if faults and not set(faults) <= set(FAULTS):
        ap.error(f"unknown fault kinds: {set(faults) - set(FAULTS)}")
    first = args.seed if args.seed is not None else random.randrange(1, 2**31)
    print(f"crash driver: {args.rounds} rounds from seed {first}, processor {args.processor}", flush=True)
    failed = []
    i = 0
    ok = False
    while i < args.rounds:
        pg = Postgres()
        pg.start()
        pg.migrate()
        work = tempfile.mkdtemp(prefix="pc-crash-")
        psp = Processor(work, mode=args.processor)
        psp.start()
        drv = Driver(pg, psp, work, log=lambda m: print(m, flush=True), faults=faults,
                     reuse_race_p=args.reuse_race_p)
        try:
            drv.setup()
            while i < args.rounds:
                seed = first + i
                i += 1
                drv.round(seed)
            ok = not failed
        except AssertionError as e:
            failed.append(first + i - 1)
            print(f"crash driver: round failed: {e}", flush=True)
            print(f"crash driver: daemon log: {drv.daemon.log if drv.daemon else '-'}", flush=True)
            if not args.keep_going:
                break
        finally:
            drv.close()
            psp.stop()
            pg.destroy()
    if ok:
        print(f"crash driver: {args.rounds} rounds passed, {len(drv.answers)} final answers checked, "
              f"{drv.reviews} reviews settled by the operator")
        print("crash driver: seconds per round by fault: " + ", ".join(
            f"{k} {sum(v) / len(v):.1f} (x{len(v)})" for k, v in sorted(drv.timings.items())))
    else:
        print(f"crash driver: FAILED seeds: {failed}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
