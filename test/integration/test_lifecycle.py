"""Daemon lifecycle and foundations: migrations (twice = no-op; a failing one
leaves nothing), SIGTERM drain (finish in flight, `shutting_down` for new
work, the rest left prepared for recovery), EXTEND_TIMEOUT_USEC during a long
startup recovery, a client that never reads its answers, uid allow-lists,
and the processor token never leaking. Each ends with the invariants."""

import os
import shutil
import signal
import subprocess
import time

import pytest

from harness import NEVER_SENT, PG_SH, SRC, TOKEN, Client, check_invariants, wait_for
from test_operations import FakeNotify


def test_migrations_twice_and_atomic(env, tmp_path):
    env_pg = dict(os.environ, PGHOST=env.pg.sock, PGDATABASE="paycoord", PGUSER="postgres")
    r = subprocess.run([os.path.join(SRC, "sql", "migrate.sh")], env=env_pg, capture_output=True, text=True)
    assert r.returncode == 0 and "done (0 applied)" in r.stdout, r.stdout + r.stderr
    # A broken migration: its first statement must not survive its failure.
    sql = tmp_path / "sql"
    shutil.copytree(os.path.join(SRC, "sql"), sql)
    (sql / "099_broken.sql").write_text("CREATE TABLE half_applied (x int);\nSELECT 1/0;\n")
    r = subprocess.run([str(sql / "migrate.sh")], env=env_pg, capture_output=True, text=True)
    assert r.returncode != 0 and "099_broken FAILED" in r.stderr
    assert env.pg.query("SELECT to_regclass('half_applied') IS NULL")[0][0] is True
    assert env.pg.query("SELECT count(*) FROM schema_migrations WHERE version = '099_broken'")[0][0] == 0
    check_invariants(env.pg, env.psp)


def test_sigterm_drains_then_leaves_rest_for_recovery(env):
    env.psp.faults(latency_ms=400)
    d = env.daemon(drain_timeout_ms=1500, recovery_interval_ms=300)
    c = d.client()
    env.open_account(c, "acct-t", balance=1000)
    quick = c.send("pay", account="acct-t", amount=10, currency="EUR", idempotency_key="t-quick")
    slow = c.send("pay", account="acct-s", amount=10, currency="EUR", idempotency_key="t-none")  # unknown account
    wait_for(lambda: env.pg.query("SELECT count(*) FROM pg_prepared_xacts")[0][0] == 1, what="prepared")
    d.proc.send_signal(signal.SIGTERM)
    time.sleep(0.1)
    late = c.call("pay", account="acct-t", amount=10, currency="EUR", idempotency_key="t-late")
    assert late["error"]["code"] == "shutting_down"
    assert c.wait(quick)["result"]["status"] == "succeeded"          # finished within the drain
    assert c.wait(slow)["error"]["code"] == "unknown_account"
    assert d.proc.wait(10) == 0
    # A payment that cannot finish within the drain stays prepared; the next start settles it.
    env.psp.faults(latency_ms=5000)
    d.start()
    c = d.client()
    rid = c.send("pay", account="acct-t", amount=20, currency="EUR", idempotency_key="t-slow")
    wait_for(lambda: env.pg.query("SELECT count(*) FROM pg_prepared_xacts")[0][0] == 1, what="prepared")
    t0 = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(10) == 0 and time.monotonic() - t0 < 5
    assert "event=drain_timeout left_in_flight=1" in d.log_text()
    assert env.pg.query("SELECT count(*) FROM pg_prepared_xacts")[0][0] == 1
    env.psp.faults(latency_ms=0)
    d.start()
    c = d.client()
    wait_for(lambda: c.ok("status", idempotency_key="t-slow")["status"] in ("succeeded", "declined"), timeout=15)
    d.stop()
    check_invariants(env.pg, env.psp, answers={"t-quick": "succeeded"})


def test_extend_timeout_during_long_startup_recovery(env):
    # An orphan whose status the processor takes 7 s to give: the first pass lasts > 5 s.
    d = env.daemon(env={"PAYCOORD_FAILPOINT": "after_prepare", "PAYCOORD_FAILPOINT_KEY": "x-1"})
    c = d.client()
    env.open_account(c, "acct-x", balance=100)
    c.send("pay", account="acct-x", amount=10, currency="EUR", idempotency_key="x-1")
    assert d.proc.wait(10) == 99
    env.psp.faults(latency_ms=7000)
    n = FakeNotify(env.workdir)
    d.settings["processor_timeout_ms"] = 10000
    d.start(wait_ready=False, env={"NOTIFY_SOCKET": n.path})
    n.wait_for("EXTEND_TIMEOUT_USEC=", timeout=10)
    assert not any(m.startswith("READY=1") for m in n.messages)       # not ready before recovery is done
    n.wait_for("READY=1", timeout=15)
    c = d.client()
    assert c.ok("status", idempotency_key="x-1")["status"] == NEVER_SENT
    env.psp.faults(latency_ms=0)
    d.stop()
    check_invariants(env.pg, env.psp)


def test_client_that_never_reads_is_disconnected(env):
    d = env.daemon(client_output_limit=4096, max_client_pipeline=100000)
    c = d.client()
    c.sock.setblocking(False)
    line = b'{"id":1,"op":"ping","pad":"' + b"x" * 200 + b'"}\n'
    sent, deadline = 0, time.monotonic() + 10
    while sent < 20000 and time.monotonic() < deadline:   # ~5 MB of requests, never reading an answer
        try:
            c.sock.send(line)
            sent += 1
        except BlockingIOError:
            time.sleep(0.005)
        except (BrokenPipeError, ConnectionResetError):
            break
    wait_for(lambda: "reason=output_limit" in d.log_text(), timeout=15, what="output limit disconnect")
    assert Client(d.socket).call("ping")["ok"]              # the daemon is fine
    d.stop()
    check_invariants(env.pg, env.psp)


def test_uid_allow_lists(env):
    os.chmod(env.workdir, 0o755)
    d = env.daemon(listen_mode="0666", client_uids="12345", admin_uids="65534")

    def as_nobody(op, **fields):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.setgid(65534)
                os.setuid(65534)
                res = Client(d.socket, timeout=5).call(op, **fields)
                os.write(w, (res["error"]["code"] if not res["ok"] else "ok").encode())
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        os.close(w)
        return os.read(r, 100).decode()

    # 65534 is an admin here (admin_uids), so client ops are allowed to it too.
    assert as_nobody("account_open", account="acct-nb", currency="EUR") == "ok"
    assert as_nobody("ping") == "ok"
    d.stop()
    d.settings.update(client_uids="12345", admin_uids="")
    d.start()
    assert as_nobody("ping") == "forbidden"                  # not in client_uids
    assert as_nobody("stats") == "forbidden"
    d.stop()
    check_invariants(env.pg, env.psp)


def test_token_never_leaks(env):
    d = env.daemon(log_level="debug")
    c = d.client()
    env.open_account(c, "acct-k", balance=100)
    c.ok("pay", account="acct-k", amount=10, currency="EUR", idempotency_key="k-1")
    env.psp.faults(fail_before_rate=1.0)
    c.ok("pay", account="acct-k", amount=10, currency="EUR", idempotency_key="k-2", wait_ms=200)
    env.psp.faults(fail_before_rate=0.0)
    stats = str(c.ok("stats"))
    wait_for(lambda: c.ok("status", idempotency_key="k-2")["status"] == "succeeded", timeout=10)
    d.stop()
    assert TOKEN not in d.log_text() and TOKEN not in stats
    check_invariants(env.pg, env.psp, answers={"k-1": "succeeded", "k-2": "succeeded"})
