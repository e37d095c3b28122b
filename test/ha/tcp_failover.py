"""A primary that dies without closing its connections, over TCP: run inside
a private network namespace (`unshare -n`, made by test_tcp.py), where the
primary is 127.0.0.1:5432 and a synchronous standby 127.0.0.2:5432 on the
namespace's own loopback. The daemon connects with
host=127.0.0.1,127.0.0.2 target_session_attrs=read-write over TCP.

Under load, every packet to and from the primary's address is dropped
(nftables), as when its host loses power or its network; then PostgreSQL
there is stopped (its resets are dropped too) and the standby promoted.
Without keepalives and tcp_user_timeout the daemon's idle connections would
wait for the kernel's defaults (hours), and a connect to the dead address
would hang until the attempt's timeout; with the daemon's settings
(db_keepalives_*, db_tcp_user_timeout_ms) it notices within seconds, and
libpq goes on to the next host. Prints one JSON line with the figures;
exit 0 when the invariants hold.

    unshare -n /usr/bin/python3 test/ha/tcp_failover.py [--seed S]
"""

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "integration"))
from cluster import Pair, wait_for  # noqa: E402
from failover import ACCOUNTS, SETTINGS, Load, NodeDb  # noqa: E402
from harness import Daemon, Processor, check_invariants  # noqa: E402

NFT_TABLE = "pc_ha_blackhole"


def sh(cmd):
    subprocess.run(cmd, shell=True, check=True)


def blackhole(addr, port):
    """Drop every packet to and from addr:port (both directions: no reset
    or FIN gets through either)."""
    rules = (f"table inet {NFT_TABLE} {{\n chain in {{\n  type filter hook input priority 0;\n"
             f"  ip daddr {addr} tcp dport {port} drop\n  ip saddr {addr} tcp sport {port} drop\n }}\n}}\n")
    subprocess.run(["nft", "-f", "-"], input=rules, text=True, check=True)   # one transaction


def keepalive_timers(port):
    """The keepalive timer of each of the daemon's established connections
    to the servers, in seconds (ss -o), None where there is none."""
    out = subprocess.run(["ss", "-tnoH", "state", "established", f"( dport = :{port} )"],
                         capture_output=True, text=True).stdout
    unit = {"ms": 0.001, "sec": 1, "min": 60}
    timers = []
    for ln in out.splitlines():
        if not ln.strip():
            continue
        m = re.search(r"timer:\(keepalive,([\d.]+)(ms|sec|min)", ln)
        timers.append(float(m.group(1)) * unit[m.group(2)] if m else None)
    return timers


class TcpRig:
    def __init__(self, workdir, log):
        self.workdir = workdir
        self.log = log
        self.pair = Pair(os.path.join(workdir, "pg"), sync=True, tcp_hosts=("127.0.0.1", "127.0.0.2"))
        self.psp = Processor(workdir)
        self.daemon = None
        self.answers, self.told, self.problems = {}, {}, []
        self.lock = threading.Lock()

    record = __import__("failover").Rig.record
    health = __import__("failover").Rig.health

    def start(self, settings):
        os.makedirs(self.pair.workdir, exist_ok=True)
        self.pair.start()
        self.psp.start()
        s = dict(SETTINGS)
        s.update(settings)
        self.daemon = Daemon(self.workdir, NodeDb(), self.psp, db_conninfo=self.pair.conninfo(), **s)
        self.daemon.start()
        c = self.daemon.client()
        for a in ACCOUNTS:
            c.ok("account_open", account=a, currency="EUR")
            c.ok("credit", account=a, amount=10**9, currency="EUR", idempotency_key=f"seed-{a}")
        c.close()

    def stop(self):
        if self.daemon:
            self.daemon.kill9()
        self.psp.stop()
        self.pair.destroy()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--no-keepalives", action="store_true",
                    help="the control: keepalives and tcp_user_timeout off; expect no payment answered for 15 s")
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1, 2**31)
    rng = random.Random(seed)
    sh("ip link set lo up")
    sh("ip addr add 127.0.0.2/8 dev lo 2>/dev/null || true")
    workdir = tempfile.mkdtemp(prefix="pc-ha-tcp-")
    os.chmod(workdir, 0o755)
    rig = TcpRig(workdir, print)
    result = {"seed": seed}
    try:
        off = {"db_keepalives_idle_s": 0, "db_keepalives_interval_s": 0, "db_keepalives_count": 0,
               "db_tcp_user_timeout_ms": 0}
        rig.start(off if args.no_keepalives else {})
        timers = keepalive_timers(5432)
        result["connections"] = len(timers)
        result["longest_keepalive_timer_s"] = max((t for t in timers if t is not None), default=None)
        assert result["connections"] >= 7, timers
        if not args.no_keepalives:
            # db_keepalives_idle_s = 3: every connection probes within seconds
            assert all(t is not None and t <= 3.5 for t in timers), timers
        load = Load(rig, rng, nclients=4)
        load.start(f"t{seed}")
        time.sleep(rng.uniform(1.0, 2.0))
        old, new = rig.pair.primary, rig.pair.standby
        blackhole(old.tcp_host, old.port)
        t_dead = time.monotonic()
        old.kill()                      # over the Unix socket; its TCP resets are dropped
        new.promote()
        t_promoted = time.monotonic()
        rig.pair.primary, rig.pair.standby = new, old
        if args.no_keepalives:
            time.sleep(15)
            first = load.first_ok_sent_after(t_dead)
            result.update(no_keepalives=True, answered_within_15s=first is not None,
                          hung=len(load.hangs), ok=first is None)
            assert first is None, "answered without keepalives: the control proves nothing"
            load.stop_ev.set()          # its threads hang on the daemon: kill it below
            return
        first = wait_for(lambda: load.first_ok_sent_after(t_dead), 60, "a payment answered after the failover")
        time.sleep(0.5)
        load.stop()
        p = rig.pair.primary
        wait_for(lambda: p.query("SELECT count(*) FROM pg_prepared_xacts")[0][0] == 0 and
                 p.query("SELECT count(*) FROM payments_view WHERE derived_status = 'pending'")[0][0] == 0, 60,
                 "quiescence")
        summary = check_invariants(p, rig.psp, answers=rig.answers)
        assert not rig.problems, rig.problems
        assert not load.hangs, f"unanswered: {load.hangs[:5]}"
        text = rig.daemon.log_text()
        result.update(death_to_first_ms=round((first - t_dead) * 1000), promote_ms=round((t_promoted - t_dead) * 1000),
                      promotion_to_first_ms=round((first - t_promoted) * 1000), answered=load.n,
                      refused=sum(load.errors.values()), payments=summary["payments"],
                      timeouts_logged=text.count("Connection timed out") + text.count("timeout after"),
                      ok=True)
    except BaseException as e:
        result.update(ok=False, error=repr(e)[:500], daemon_log_tail=rig.daemon.tail(40) if rig.daemon else "")
        raise
    finally:
        print(json.dumps(result), flush=True)
        rig.stop()
        if result.get("ok"):
            shutil.rmtree(workdir, ignore_errors=True)
        subprocess.run(f"nft delete table inet {NFT_TABLE}", shell=True, stderr=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
