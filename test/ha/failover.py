"""Failover rounds: the daemon under load on a primary with a streaming
standby, the primary killed (pg_ctl stop -m immediate) at a chosen moment,
the standby promoted, and the invariants I1-I7 checked against the new
primary and the processor's own list (test/integration/harness.py).

Kinds of round (where the kill lands):
  phase1    while a debit is being prepared (PREPARE TRANSACTION on the wire)
  phase2    between the processor's answer and phase 2 (COMMIT PREPARED on the wire)
  rollback  the same for a declined payment (ROLLBACK PREPARED on the wire)
  recovery  while recovery settles: the daemon is killed (-9) with debits
            prepared, restarted, and the primary dies under its first pass
  random    at a random moment of the load

The daemon reaches the two servers through one pgproxy each (Unix sockets,
test/integration/pgproxy.py), with a multi-host conninfo and
target_session_attrs=read-write; the proxies only watch the traffic for the
moment to kill (rules with action "call"). A dead server's proxy stops
listening, as the server's own socket disappears with it (libpq goes on to
the next host only when it cannot connect at all). Each round prints its seed and
its figures: death -> first payment answered, and promotion -> first payment
answered (the issue's target: within 1 s of the promotion).

    /usr/bin/python3 test/ha/failover.py --rounds 50 [--seed S] [--kinds phase2,recovery] [--async]
"""

import argparse
import datetime
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "integration"))
from cluster import Pair, wait_for  # noqa: E402
from harness import Client, Daemon, Processor, check_invariants  # noqa: E402
from pgproxy import PgProxy  # noqa: E402

KINDS = ["phase1", "phase2", "rollback", "recovery", "random"]
ACCOUNTS = [f"ha-{i}" for i in range(12)]
SETTINGS = {"pool_size": 4, "recovery_pool_size": 2, "recovery_interval_ms": 300, "processor_poll_ms": 30,
            "processor_timeout_ms": 1500, "processor_retry_base_ms": 20, "payment_deadline_ms": 3000,
            "pay_wait_ms": 10000, "queue_timeout_ms": 5000, "circuit_failures": 100000,
            "db_safety_check_interval_ms": 1000, "log_level": "info"}


def node_proxy(node, workdir, path=None):
    """A pgproxy in front of node's socket; path: reuse that directory."""
    p = PgProxy(node.sock, workdir=workdir)
    p.upstream = os.path.join(node.sock, f".s.PGSQL.{node.port}")
    if path:
        os.rmdir(p.dir)
        os.makedirs(path, exist_ok=True)
        os.chmod(path, 0o755)
        p.dir = path
        p.path = os.path.join(path, os.path.basename(p.path))
    return p.start()


class NodeDb:
    """What harness.Daemon wants of a database: a conninfo (overridden)."""
    conninfo = ""


class Load:
    """Client threads paying continuously; every answer recorded. A request
    refused (unavailable, overloaded, ...) is retried with the same key
    half of the time, as a client would."""

    def __init__(self, rig, rng, nclients=6, decline_p=0.15):
        self.rig, self.rng = rig, rng
        self.nclients = nclients
        self.decline_p = decline_p
        self.stop_ev = threading.Event()
        self.threads = []
        self.lock = threading.Lock()
        self.ok_times = []          # (first sent, answered) of every ok answer: when its key was first sent
        self.errors = {}            # code -> count
        self.hangs = []
        self.n = 0

    def start(self, tag):
        self.stop_ev.clear()
        self.threads = [threading.Thread(target=self._run, args=(f"{tag}-{i}", random.Random(self.rng.random())),
                                         daemon=True) for i in range(self.nclients)]
        for t in self.threads:
            t.start()

    def stop(self):
        self.stop_ev.set()
        for t in self.threads:
            t.join(30)
        assert not any(t.is_alive() for t in self.threads), "load threads did not stop"

    def _run(self, tag, rng):
        c = None
        seq = 0
        key = None
        while not self.stop_ev.is_set():
            if c is None:
                try:
                    c = self.rig.daemon.client(timeout=20)
                except OSError:
                    time.sleep(0.05)
                    continue
            if key is None:
                seq += 1
                key = f"{tag}-{seq}"
                fields = dict(account=rng.choice(ACCOUNTS), amount=rng.randint(1, 500), currency="EUR",
                              idempotency_key=key)
                if rng.random() < self.decline_p:
                    fields["metadata"] = {"sim": "decline"}
                first_sent = time.monotonic()
            sent = time.monotonic()
            try:
                r = c.call("pay", **fields)
            except (ConnectionError, OSError) as e:
                # the daemon died (recovery rounds) or timed out
                if "timed out" in str(e):
                    self.hangs.append((key, round(time.monotonic() - sent, 1)))
                c = None
                key = None
                continue
            now = time.monotonic()
            if r.get("ok"):
                self.rig.record(key, fields, r["result"])
                with self.lock:
                    self.ok_times.append((first_sent, now))
                    self.n += 1
                key = None
                time.sleep(rng.uniform(0, 0.01))
            else:
                code = r["error"]["code"]
                with self.lock:
                    self.errors[code] = self.errors.get(code, 0) + 1
                if code == "internal":
                    self.rig.problems.append(f"internal error for {key}: {r['error']}")
                if rng.random() < 0.5:
                    key = None
                time.sleep(0.02)
        if c:
            c.close()

    def first_ok_sent_after(self, t):
        """When the first payment whose key was first sent at or after t was
        answered: a new payment, not a replay answered from memory."""
        with self.lock:
            answered = [a for s, a in self.ok_times if s >= t]
        return min(answered) if answered else None


class Rig:
    def __init__(self, workdir, sync=True, log=print, lag_ms=0):
        self.workdir = workdir
        self.log = log
        self.sync = sync
        self.lag_ms = lag_ms
        self.answers = {}            # key -> final status told (I6)
        self.told = {}               # key -> (payment_id, gid)
        self.problems = []
        self.lock = threading.Lock()
        self.repl_proxy = None
        upstream = None
        if lag_ms:
            # The standby streams through a proxy that holds the primary's
            # bytes lag_ms: an asynchronous standby that lags.
            def upstream(primary):
                if self.repl_proxy:
                    self.repl_proxy.stop()
                self.repl_proxy = PgProxy(primary.sock, workdir=workdir)
                self.repl_proxy.upstream = os.path.join(primary.sock, f".s.PGSQL.{primary.port}")
                self.repl_proxy.delay_answers(lag_ms)
                self.repl_proxy.start()
                return (self.repl_proxy.dir, 5432)
        self.pair = Pair(os.path.join(workdir, "pg"), sync=sync, upstream_of=upstream)
        self.proxies = {}
        self.psp = Processor(workdir)
        self.daemon = None
        self.figures = []            # (kind, death->first, promote->first, lock gap)

    # -- setup
    def start(self, **settings):
        os.makedirs(self.pair.workdir, exist_ok=True)
        self.pair.start()
        for n in self.pair.nodes:
            self.proxies[n.name] = node_proxy(n, self.workdir)
        conninfo = (f"host={self.proxies['a'].dir},{self.proxies['b'].dir} dbname=paycoord user=postgres "
                    "target_session_attrs=read-write")
        self.psp.start()
        s = dict(SETTINGS)
        s.update(settings)
        self.daemon = Daemon(self.workdir, NodeDb(), self.psp, db_conninfo=conninfo, **s)
        self.daemon.start()
        c = self.daemon.client()
        for a in ACCOUNTS:
            c.ok("account_open", account=a, currency="EUR")
            c.ok("credit", account=a, amount=10**9, currency="EUR", idempotency_key=f"seed-{a}")
        c.close()

    def stop(self):
        if self.daemon:
            self.daemon.kill9()
        for p in self.proxies.values():
            p.stop()
        if self.repl_proxy:
            self.repl_proxy.stop()
        self.psp.stop()
        self.pair.destroy()

    def proxy_dark(self, node):
        """node died: its proxy stops listening (its socket file is gone)."""
        self.proxies[node.name].stop()

    def proxy_back(self, node):
        old = self.proxies[node.name]
        self.proxies[node.name] = node_proxy(node, self.workdir, path=old.dir)

    def health(self):
        c = self.daemon.client(timeout=5)
        try:
            return c.call("health")["result"]
        finally:
            c.close()

    # -- bookkeeping
    def record(self, key, fields, res):
        with self.lock:
            ids = (res["payment_id"], res["gid"])
            prev = self.told.setdefault(key, ids)
            if prev != ids:
                self.problems.append(f"told: {key} answered payment {prev} and later {ids}")
            if res["status"] != "pending":
                first = self.answers.setdefault(key, res["status"])
                if first != res["status"]:
                    self.problems.append(f"I6: {key} answered {first} then {res['status']}")

    def quiesce(self, timeout=60):
        """Nothing prepared, nothing pending, nothing in flight."""
        p = self.pair.primary

        def quiet():
            n_prep = p.query("SELECT count(*) FROM pg_prepared_xacts")[0][0]
            n_pend = p.query("SELECT count(*) FROM payments_view WHERE derived_status = 'pending'")[0][0]
            h = self.health()
            return n_prep == 0 and n_pend == 0 and h.get("prepared", 1) == 0
        wait_for(quiet, timeout, "quiescence (no prepared, no pending)", interval=0.1)

    # -- one round
    def round(self, seed, kind=None):
        rng = random.Random(seed)
        kind = kind or rng.choice(KINDS)
        self.problems = []
        primary, standby = self.pair.primary, self.pair.standby
        proxy = self.proxies[primary.name]
        load = Load(self, rng)
        killed = threading.Event()
        t = {}
        want = "synchronous" if self.sync else "asynchronous"
        wait_for(lambda: self.health().get("replication") == want, 10, f"health replication={want}")

        def kill(_text=None):
            if killed.is_set():
                return
            t["kill"] = time.monotonic()
            t["log_from"] = os.path.getsize(self.daemon.log)
            primary.kill()
            t["dead"] = time.monotonic()
            killed.set()

        skip = [rng.randint(0, 3)]

        def kill_after_skips(text):
            if skip[0] > 0:
                skip[0] -= 1
                return
            kill(text)

        if kind == "recovery":
            self._orphans(rng)
        else:
            load.start(f"r{seed}")
        if kind in ("phase1", "phase2", "rollback", "recovery"):
            stmt = {"phase1": "PREPARE TRANSACTION", "phase2": "COMMIT PREPARED",
                    "rollback": "ROLLBACK PREPARED"}.get(kind)
            time.sleep(rng.uniform(0.3, 1.2) if kind != "recovery" else 0)
            if kind == "recovery":
                for s in ("COMMIT PREPARED", "ROLLBACK PREPARED"):
                    proxy.add_rule(s, "call", count=None, callback=kill_after_skips)
                self.daemon.start(wait_ready=False)
                load.start(f"r{seed}")
            else:
                proxy.add_rule(stmt, "call", count=None, callback=kill_after_skips)
            assert killed.wait(20), f"round {seed} {kind}: the kill never triggered"
            proxy.clear_rules()
        else:
            time.sleep(rng.uniform(0.3, 1.5))
            kill()
        self.proxy_dark(primary)
        delay = rng.uniform(0, 0.4)
        time.sleep(delay)
        # The promotion takes effect somewhere inside pg_ctl promote -w; the
        # figure counts from when it was issued (an upper bound).
        t["promote"] = time.monotonic()
        standby.promote()
        t["promoted"] = time.monotonic()
        self.pair.primary, self.pair.standby = standby, primary
        survivors = standby.query("SELECT count(*) FROM pg_prepared_xacts")[0][0]
        first = wait_for(lambda: load.first_ok_sent_after(t["dead"]), 30, "a payment answered after the failover")
        death_to_first = first - t["dead"]
        promote_to_first = first - t["promote"]
        time.sleep(0.5)
        load.stop()
        self.quiesce()
        h = self.health()
        summary = check_invariants(self.pair.primary, self.psp, answers=self.answers)
        if load.hangs:
            self.problems.append(f"requests unanswered: {load.hangs[:5]}")
        with open(self.daemon.log, errors="replace") as f:
            f.seek(t["log_from"])
            gap, log_problems = check_log_after_kill(f.read())
        self.problems += log_problems
        self.figures.append((kind, death_to_first, promote_to_first, gap))
        self.log(f"round seed={seed} kind={kind} promote_delay_ms={delay * 1000:.0f} "
                 f"death_to_first_ms={death_to_first * 1000:.0f} promotion_to_first_ms={promote_to_first * 1000:.0f} "
                 f"promote_ms={(t['promoted'] - t['promote']) * 1000:.0f} "
                 f"prepared_at_promotion={survivors} lock_after_pool_ms={'-' if gap is None else f'{gap:.0f}'} "
                 f"answered={load.n} refused={sum(load.errors.values())} ({','.join(sorted(load.errors)) or '-'}) "
                 f"payments={summary['payments']} replication={h.get('replication')}")
        assert not self.problems, f"round seed={seed} kind={kind}: {self.problems[:5]}"
        self.pair.rebuild_standby()
        self.proxy_back(primary)
        return death_to_first, promote_to_first

    def lossy_failover(self, seed):
        """With the standby lagging (lag_ms, asynchronous): load, then the
        standby's stream is cut and the primary killed, and the standby is
        promoted without what it had not received. Returns the processor's
        charges that have no committed debit in the new primary, and the
        keys told a final answer whose payment the new primary has not."""
        assert self.repl_proxy and not self.sync
        rng = random.Random(seed)
        primary, standby = self.pair.primary, self.pair.standby
        load = Load(self, rng)
        load.start(f"a{seed}")
        time.sleep(rng.uniform(1.0, 2.0))
        lag = primary.query("SELECT coalesce(extract(epoch FROM write_lag) * 1000, -1)::int, "
                            "pg_wal_lsn_diff(pg_current_wal_lsn(), write_lsn)::bigint FROM pg_stat_replication",
                            dbname="postgres")
        self.repl_proxy.refuse(3600)         # the standby never hears from this primary again
        self.repl_proxy.cut_all()
        t_dead = time.monotonic()
        primary.kill()
        self.proxy_dark(primary)
        standby.promote()
        self.pair.primary, self.pair.standby = standby, primary
        wait_for(lambda: load.first_ok_sent_after(t_dead), 30, "a payment answered after the failover")
        time.sleep(0.5)
        load.stop()
        p = self.pair.primary
        # Settled what can be settled; the rest is flagged for review.
        wait_for(lambda: p.query("SELECT count(*) FROM pg_prepared_xacts")[0][0] == 0 and
                 self.health().get("prepared", 1) == 0, 60, "no prepared debit left")
        debited = {g for (g,) in p.query("SELECT gid FROM payments_view WHERE derived_status = 'succeeded'")}
        charged = [x for x in self.psp.all_payments() if x["status"] == "succeeded"]
        lost = [x["idempotency_key"] for x in charged if x["idempotency_key"] not in debited]
        stored = {k: st for k, st in p.query("SELECT idempotency_key, derived_status FROM payments_view")}
        told_lost = [k for k, st in self.answers.items() if stored.get(k) != st]
        self.log(f"lossy failover seed={seed}: answered={load.n} charged={len(charged)} "
                 f"charged_without_debit={len(lost)} told_final_then_lost={len(told_lost)} "
                 f"standby_write_lag_ms,bytes_behind={lag}")
        return lost, told_lost

    def _orphans(self, rng):
        """Debits prepared by a daemon that then dies: the processor is slow,
        a burst of payments reaches PREPARE, the daemon is killed -9."""
        self.psp.faults(latency_ms=2500, jitter_ms=0, fault_ops=["create"])
        n = rng.randint(6, len(ACCOUNTS))        # one prepared debit per account at a time
        accounts = rng.sample(ACCOUNTS, n)
        p = self.pair.primary
        box = []

        def burst():
            try:
                c = self.daemon.client(timeout=30)
                box.append(c)
                for i in range(n):
                    c.send("pay", account=accounts[i], amount=rng.randint(1, 500), currency="EUR",
                           idempotency_key=f"orphan-{rng.random():.12f}-{i}",
                           **({"metadata": {"sim": "decline"}} if i % 4 == 0 else {}))
            except OSError:
                pass
        burst()
        wait_for(lambda: p.query("SELECT count(*) FROM pg_prepared_xacts")[0][0] >= n, 20,
                 "debits prepared before the kill")
        self.daemon.kill9()
        for c in box:
            c.close()
        self.psp.faults(latency_ms=0, jitter_ms=0)


TS = re.compile(r"ts=(\S+)Z ")


def ts_of(line):
    m = TS.search(line)
    return datetime.datetime.fromisoformat(m.group(1)) if m else None


def check_log_after_kill(text):
    """What the daemon logged from the kill on: the node lock is taken on the
    new primary before recovery settles anything, and within a second of the
    payment pool being back. Returns (lock gap in ms or None, problems)."""
    problems = []
    lines = text.splitlines()
    lock_at = next((i for i, ln in enumerate(lines) if "event=node_lock_acquired" in ln), None)
    settled = [i for i, ln in enumerate(lines)
               if ln.split(" ", 2)[1:2] == ["recovery"] and re.search(r"event=(committed|rolled_back) ", ln)]
    if settled and (lock_at is None or settled[0] < lock_at):
        problems.append(f"recovery settled before the node lock was taken again: {lines[settled[0]][:200]}")
    up_at = next((i for i, ln in enumerate(lines) if "event=database state=up" in ln), None)
    gap = None
    if up_at is not None and lock_at is not None:
        gap = (ts_of(lines[lock_at]) - ts_of(lines[up_at])).total_seconds() * 1000
        if gap > 1000:
            problems.append(f"node lock taken {gap:.0f} ms after the payment pool was back")
    return gap, problems


def summarize(figures):
    """Median and max of both figures, in ms."""
    if not figures:
        return "no rounds"
    d = [f[1] * 1000 for f in figures]
    p = [f[2] * 1000 for f in figures]
    g = [f[3] for f in figures if f[3] is not None]
    return (f"death->first answered: median {statistics.median(d):.0f} ms, max {max(d):.0f} ms; "
            f"promotion issued->first answered: median {statistics.median(p):.0f} ms, max {max(p):.0f} ms; "
            f"node lock after pool: max {max(g) if g else 0:.0f} ms ({len(figures)} rounds)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--kinds", default=",".join(KINDS))
    args = ap.parse_args()
    first = args.seed if args.seed is not None else random.randrange(1, 2**31)
    kinds = args.kinds.split(",")
    workdir = tempfile.mkdtemp(prefix="pc-ha-")
    os.chmod(workdir, 0o755)
    rig = Rig(workdir)
    print(f"failover soak: {args.rounds} rounds from seed {first} in {workdir}", flush=True)
    try:
        rig.start()
        for i in range(args.rounds):
            seed = first + i
            rig.round(seed, kinds[random.Random(seed).randrange(len(kinds))])
        print(f"failover soak: {args.rounds} rounds passed; {summarize(rig.figures)}; "
              f"{len(rig.answers)} final answers checked", flush=True)
        ok = True
    except BaseException:
        ok = False
        print(f"failover soak: FAILED; daemon log kept: {rig.daemon.log if rig.daemon else '-'}", flush=True)
        raise
    finally:
        rig.stop()
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
