"""paycoord behind pgbouncer (pgbouncer.py): session pooling carries the
payment path -- the integration suite's payment tests run with every daemon
connected through it (PC_TEST_PGBOUNCER=session, test/integration/harness.py)
-- and transaction pooling, where a session advisory lock cannot hold, is
detected and refused with a clear error (docs/ha.md)."""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from harness import Daemon, Postgres, Processor, check_invariants, prepare_debit, wait_for
from pgbouncer import PgBouncer

HERE = os.path.dirname(os.path.abspath(__file__))
INTEGRATION = os.path.join(HERE, "..", "integration")
# The payment path of the integration suite; PC_HA_PGBOUNCER_TESTS overrides.
PAYMENT_PATH = ["test_payments.py", "test_concurrency.py", "test_errors.py"]


@pytest.fixture
def setup():
    if not shutil.which("pgbouncer"):
        pytest.skip("pgbouncer not installed (.ci/packages)")
    workdir = tempfile.mkdtemp(prefix="pc-ha-pgb-")
    os.chmod(workdir, 0o755)
    pg = Postgres()
    pg.start()
    pg.migrate()
    psp = Processor(workdir)
    psp.start()
    things = {"workdir": workdir, "pg": pg, "psp": psp, "daemons": [], "bouncers": []}
    yield things
    for d in things["daemons"]:
        d.kill9()
    for b in things["bouncers"]:
        b.stop()
    psp.stop()
    pg.destroy()
    shutil.rmtree(workdir, ignore_errors=True)


def start_daemon(t, mode, **settings):
    b = PgBouncer(t["pg"].sock, mode=mode, workdir=t["workdir"]).start()
    t["bouncers"].append(b)
    d = Daemon(t["workdir"], t["pg"], t["psp"], db_conninfo=b.conninfo, recovery_interval_ms=300,
               db_safety_check_interval_ms=1000, **settings)
    t["daemons"].append(d)
    return d, b


def health(d):
    c = d.client(timeout=5)
    try:
        return c.call("health")["result"]
    finally:
        c.close()


def test_session_pooling_payment_and_fence(setup):
    """Session mode: the lock, lock_timeout and the fence token hold."""
    d, b = start_daemon(setup, "session")
    d.start()
    h = health(d)
    assert h["ready"] and h["node_lock"] == "held", h
    assert re.search(rf"connect_ok .* host={re.escape(b.dir)} port=6432", d.log_text()), "not through pgbouncer?"
    c = d.client()
    c.ok("account_open", account="pb", currency="EUR")
    c.ok("credit", account="pb", amount=1000, currency="EUR", idempotency_key="pb-credit")
    r = c.ok("pay", account="pb", amount=100, currency="EUR", idempotency_key="pb-1")
    assert r["status"] == "succeeded", r
    c.close()
    # Each session keeps what the daemon set: lock_timeout, and the fence
    # token as application_name on the server (pc_fence finds a lost session by it).
    rows = setup["pg"].query("SELECT application_name, "
                             "(SELECT setting FROM pg_settings WHERE name = 'lock_timeout') FROM pg_stat_activity "
                             "WHERE application_name LIKE 'paycoord/t1/%'")
    assert len(rows) >= 7, rows
    check_invariants(setup["pg"], setup["psp"], answers={"pb-1": "succeeded"})


def test_session_pooling_carries_the_integration_payment_path():
    """The integration suite's payment tests, every daemon through pgbouncer
    in session mode."""
    if not shutil.which("pgbouncer"):
        pytest.skip("pgbouncer not installed (.ci/packages)")
    files = os.environ.get("PC_HA_PGBOUNCER_TESTS", ",".join(PAYMENT_PATH)).split(",")
    env = dict(os.environ, PC_TEST_PGBOUNCER="session")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        *[os.path.join(INTEGRATION, f) for f in files]],
                       env=env, capture_output=True, text=True, timeout=900)
    tail = r.stdout[-4000:]
    print(tail)
    assert r.returncode == 0, tail + r.stderr[-2000:]
    assert re.search(r"\d+ passed", tail), tail


def test_transaction_pooling_refused(setup):
    """Transaction mode: the node lock cannot hold; the daemon says so and
    neither takes payments nor settles anything."""
    pg = setup["pg"]
    import uuid
    pg.query("SELECT pc_account_open('pt', 'EUR')")
    pg.query("SELECT pc_credit(%s, 'pt-seed', 'pt', 1000, 'EUR', NULL, true)", (uuid.uuid4(),))
    # A debit a crashed daemon of this node left prepared: only the holder of
    # the node lock may settle it, so it must stay as it is.
    _, gid = prepare_debit(pg, "pt-orphan", "pt", 100, node="t1")
    d, b = start_daemon(setup, "transaction")
    d.start(wait_ready=False)
    h = wait_for(lambda: (lambda h: h if h.get("node_lock") == "transaction_pooling" else None)(health(d)), 15,
                 what="node_lock=transaction_pooling")
    assert h["ready"] is False, h
    assert "event=node_lock_unreliable" in d.log_text()
    c = d.client()
    r = c.call("pay", account="pt", amount=10, currency="EUR", idempotency_key="pt-1")
    assert not r["ok"] and r["error"]["code"] == "unavailable", r
    assert "transaction" in r["error"]["message"] and "nothing was charged" in r["error"]["message"], r
    st = c.ok("stats")
    assert st["database"]["transaction_pooling"] is True and st["recovery"]["node_lock"] is False, st
    c.close()
    # It stays refused (the check runs again every recovery_interval_ms).
    time.sleep(1.5)
    assert health(d)["node_lock"] == "transaction_pooling"
    assert pg.query("SELECT count(*) FROM pg_prepared_xacts WHERE gid = %s", (gid,))[0][0] == 1, \
        "a prepared debit was settled without the node lock"
    assert "recovery event=pass_start" not in d.log_text()
    check_invariants(pg, setup["psp"], allow_pending=True)
