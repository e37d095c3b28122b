"""paycoord on a Patroni cluster: Debian's patroni with a single-node etcd,
two PostgreSQL 15 members on this machine (loopback TCP), synchronous_mode
and max_prepared_transactions in the DCS configuration. The daemon connects
with host=127.0.0.1,127.0.0.1 port=P1,P2 target_session_attrs=read-write.

Under load: a planned `patronictl switchover`, then a hard kill of the leader
(kill -9 of its Patroni, immediate stop of its PostgreSQL): the replica is
promoted once the leader key expires (ttl). After each, the invariants I1-I7
are checked against the processor's own list, and the time from the event
to the first payment answered is printed. Too slow for CI (the leader key's
ttl alone is 10 s); docs/ha.md has its measured results.

    /usr/bin/python3 test/ha/patroni.py [--seed S] [--keep]

Needs root (or the postgres user) and the Debian packages patroni,
python3-etcd and etcd-server (.ci/packages).
"""

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "integration"))
from cluster import PG_BIN, SRC, chown_pg, wait_for  # noqa: E402
from failover import ACCOUNTS, SETTINGS, Load, NodeDb, Rig  # noqa: E402
from harness import Daemon, Processor, check_invariants  # noqa: E402


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def pg_cmd(cmd):
    return ["runuser", "-u", "postgres", "--"] + cmd if os.geteuid() == 0 else cmd


class Member:
    def __init__(self, workdir, name, etcd_port):
        self.name = name
        self.dir = os.path.join(workdir, name)
        self.data = os.path.join(self.dir, "data")
        self.sock = os.path.join(self.dir, "sock")
        self.port = free_port()
        self.rest = free_port()
        self.conf = os.path.join(self.dir, "patroni.yml")
        self.log = os.path.join(self.dir, "patroni.log")
        self.proc = None
        os.makedirs(self.sock, exist_ok=True)
        for p in (self.dir, self.sock):
            chown_pg(p)
        conf = {
            "scope": "paycoord-ha",
            "name": name,
            "log": {"level": "WARNING"},
            "restapi": {"listen": f"127.0.0.1:{self.rest}", "connect_address": f"127.0.0.1:{self.rest}"},
            "etcd3": {"hosts": f"127.0.0.1:{etcd_port}"},
            "bootstrap": {
                "dcs": {
                    "ttl": 10, "loop_wait": 1, "retry_timeout": 4,
                    "maximum_lag_on_failover": 1048576,
                    "synchronous_mode": True,
                    "postgresql": {
                        "use_pg_rewind": False,
                        "parameters": {
                            "max_prepared_transactions": 200, "max_connections": 60, "shared_buffers": "32MB",
                            "wal_level": "replica", "max_wal_senders": 6, "max_replication_slots": 6,
                            "hot_standby": "on", "fsync": "off", "wal_keep_size": "256MB",
                        },
                    },
                },
                "initdb": [{"encoding": "UTF8"}, {"locale": "C.UTF-8"}],
                "pg_hba": ["local all all trust", "local replication all trust",
                           "host all all 127.0.0.1/32 trust", "host replication all 127.0.0.1/32 trust"],
            },
            "postgresql": {
                "listen": f"127.0.0.1:{self.port}",
                "connect_address": f"127.0.0.1:{self.port}",
                "data_dir": self.data,
                "bin_dir": PG_BIN,
                "pgpass": os.path.join(self.dir, "pgpass"),
                "authentication": {"superuser": {"username": "postgres"},
                                   "replication": {"username": "postgres"}},
                "parameters": {"unix_socket_directories": self.sock},
                "basebackup": [{"checkpoint": "fast"}],
            },
            "tags": {"nofailover": False, "noloadbalance": False, "clonefrom": False, "nosync": False},
        }
        with open(self.conf, "w") as f:
            json.dump(conf, f, indent=1)     # YAML is a superset of JSON
        chown_pg(self.conf)

    def start(self):
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(pg_cmd(["patroni", self.conf]), stdout=logf, stderr=logf,
                                     start_new_session=True)

    def role(self):
        """'primary', 'replica' or None, from the member's REST API."""
        import urllib.request
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.rest}/patroni", timeout=2) as r:
                return json.loads(r.read()).get("role")
        except OSError:
            return None

    def hard_kill(self):
        """kill -9 of Patroni, then PostgreSQL stopped the hard way: the
        leader dies without handing anything over."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        subprocess.run(pg_cmd([f"{PG_BIN}/pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop"]),
                       capture_output=True)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        subprocess.run(pg_cmd([f"{PG_BIN}/pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop"]),
                       capture_output=True)

    def query(self, sql, params=None, dbname="paycoord"):
        import psycopg
        with psycopg.connect(f"host={self.sock} port={self.port} dbname={dbname} user=postgres",
                             autocommit=True, connect_timeout=5) as c:
            cur = c.execute(sql, params)
            return cur.fetchall() if cur.description is not None else []

    # what check_invariants needs of a database
    def connect(self):
        import psycopg
        return psycopg.connect(f"host={self.sock} port={self.port} dbname=paycoord user=postgres", autocommit=True)


class PatroniRig:
    def __init__(self, workdir, log=print):
        self.workdir = workdir
        self.log = log
        self.etcd_port, self.etcd_peer = free_port(), free_port()
        self.etcd = None
        self.members = [Member(workdir, "m1", self.etcd_port), Member(workdir, "m2", self.etcd_port)]
        self.psp = Processor(workdir)
        self.daemon = None
        self.answers, self.told, self.problems = {}, {}, []
        self.lock = threading.Lock()

    record = Rig.record
    health = Rig.health

    def patronictl(self, *args):
        r = subprocess.run(pg_cmd(["patronictl", "-c", self.members[0].conf, *args]), capture_output=True, text=True,
                           timeout=120)
        return r

    def leader(self):
        for m in self.members:
            if m.role() in ("primary", "master"):
                return m
        return None

    def start(self):
        d = os.path.join(self.workdir, "etcd")
        os.makedirs(d)
        self.etcd = subprocess.Popen(
            ["etcd", "--name", "e1", "--data-dir", d,
             "--listen-client-urls", f"http://127.0.0.1:{self.etcd_port}",
             "--advertise-client-urls", f"http://127.0.0.1:{self.etcd_port}",
             "--listen-peer-urls", f"http://127.0.0.1:{self.etcd_peer}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.etcd_peer}",
             "--initial-cluster", f"e1=http://127.0.0.1:{self.etcd_peer}", "--log-level", "warn"],
            stdout=open(os.path.join(self.workdir, "etcd.log"), "ab"), stderr=subprocess.STDOUT)
        m1, m2 = self.members
        m1.start()
        wait_for(lambda: m1.role() in ("primary", "master"), 90, "m1 leader")
        m1.query("CREATE DATABASE paycoord", dbname="postgres")
        env = dict(os.environ, PGHOST=m1.sock, PGPORT=str(m1.port), PGUSER="postgres", PGDATABASE="paycoord")
        r = subprocess.run([os.path.join(SRC, "sql", "migrate.sh")], env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        m2.start()
        self.wait_sync()
        self.psp.start()
        conninfo = (f"host=127.0.0.1,127.0.0.1 port={m1.port},{m2.port} dbname=paycoord user=postgres "
                    "target_session_attrs=read-write")
        self.daemon = Daemon(self.workdir, NodeDb(), self.psp, db_conninfo=conninfo, **SETTINGS)
        self.daemon.start()
        c = self.daemon.client()
        for a in ACCOUNTS:
            c.ok("account_open", account=a, currency="EUR")
            c.ok("credit", account=a, amount=10**9, currency="EUR", idempotency_key=f"seed-{a}")
        c.close()

    def wait_sync(self, timeout=120):
        """Until Patroni lists a synchronous standby (its /sync key: only
        that member may be switched over or failed over to)."""
        def synced():
            r = self.patronictl("list", "-f", "json")
            try:
                members = json.loads(r.stdout) if r.returncode == 0 else []
            except ValueError:
                return False
            return any(m.get("Role") == "Sync Standby" and m.get("State") in ("running", "streaming")
                       for m in members)
        wait_for(synced, timeout, "a synchronous replica", interval=0.5)

    def stop(self):
        if self.daemon:
            self.daemon.kill9()
        self.psp.stop()
        for m in self.members:
            m.stop()
        if self.etcd:
            self.etcd.terminate()
            self.etcd.wait(10)

    def quiesce_and_check(self, what):
        ldr = wait_for(self.leader, 60, "a leader")
        wait_for(lambda: ldr.query("SELECT count(*) FROM pg_prepared_xacts")[0][0] == 0 and
                 ldr.query("SELECT count(*) FROM payments_view WHERE derived_status = 'pending'")[0][0] == 0,
                 60, f"quiescence after the {what}", interval=0.2)
        summary = check_invariants(ldr, self.psp, answers=self.answers)
        assert not self.problems, self.problems
        return summary

    def event(self, what, rng, action):
        """action(old leader) returns when it started (t0: the switchover
        command, the kill); figures: t0 -> the first payment first sent after
        t0 answered, and the longest time between two answered payments
        (what clients saw of the outage)."""
        load = Load(self, rng, nclients=4)
        load.start(f"{what.replace(' ', '_')}-{rng.randrange(10**9)}")
        time.sleep(rng.uniform(1.0, 2.0))
        old = self.leader()
        t0 = action(old)
        first = wait_for(lambda: load.first_ok_sent_after(t0), 120, f"a payment answered after the {what}")
        new = wait_for(lambda: (lambda m: m if m is not old else None)(self.leader()), 60, "the new leader")
        time.sleep(1.0)
        load.stop()
        with load.lock:
            answered = sorted(a for _, a in load.ok_times)
        gap = max((b - a for a, b in zip(answered, answered[1:])), default=0)
        summary = self.quiesce_and_check(what)
        assert not load.hangs, load.hangs[:5]
        h = self.health()
        self.log(f"patroni {what}: leader {old.name} -> {new.name}; event -> first payment answered "
                 f"{(first - t0) * 1000:.0f} ms; longest gap between answered payments {gap * 1000:.0f} ms; "
                 f"answered={load.n} refused={sum(load.errors.values())} "
                 f"({','.join(sorted(load.errors)) or '-'}); payments={summary['payments']}; "
                 f"replication={h.get('replication')}; invariants I1-I7 hold")
        return first - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    for tool in ("patroni", "patronictl", "etcd"):
        if not shutil.which(tool):
            sys.exit(f"patroni.py: {tool} not found: apt-get install patroni python3-etcd etcd-server")
    seed = args.seed if args.seed is not None else random.randrange(1, 2**31)
    rng = random.Random(seed)
    workdir = tempfile.mkdtemp(prefix="pc-ha-patroni-")
    os.chmod(workdir, 0o755)
    rig = PatroniRig(workdir)
    print(f"patroni: seed {seed}, work directory {workdir}", flush=True)
    ok = False
    try:
        rig.start()
        h = rig.health()
        print(f"patroni: cluster up, leader {rig.leader().name}; daemon health replication={h['replication']}",
              flush=True)
        assert h["replication"] == "synchronous", h

        def switchover(old):
            new = [m for m in rig.members if m is not old][0]
            t0 = time.monotonic()
            r = rig.patronictl("switchover", "--leader", old.name, "--candidate", new.name, "--force")
            assert r.returncode == 0 and "Successfully" in r.stdout, r.stdout + r.stderr
            wait_for(lambda: old.role() not in ("primary", "master"), 60, "the old leader demoted", interval=0.02)
            return t0

        def hard_kill(old):
            old.hard_kill()
            return time.monotonic()

        rig.event("switchover", rng, switchover)
        old_leader = rig.leader()
        rig.wait_sync()
        rig.event("hard kill of the leader", rng, hard_kill)
        old_leader.start()                   # it rejoins as a replica (a fresh clone if it must)
        print("patroni: all checks passed", flush=True)
        ok = True
    finally:
        rig.stop()
        if ok and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"patroni: logs kept in {workdir}", flush=True)


if __name__ == "__main__":
    main()
