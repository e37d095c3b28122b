"""Processor and database faults during live payments (the rows of
docs/failure-modes.md that need no daemon crash). Each ends with the invariants."""

import threading
import time

from harness import check_invariants, wait_for


def test_timeout_then_late_success(env):
    d = env.daemon(processor_timeout_ms=300, processor_retries=1)
    c = d.client()
    env.open_account(c, "late", balance=1000)
    r = c.ok("pay", account="late", amount=100, currency="EUR", idempotency_key="late-1",
             metadata={"sim_latency_ms": "800"})
    # The create timed out (unknown, never a decline), the retry too; polling by
    # gid found the late charge and the debit was committed.
    assert r["status"] == "succeeded"
    assert env.psp.counters()["processed_creates"] >= 1
    assert "outcome=unknown" in d.log_text() or "in_doubt" in d.log_text()
    d.stop()
    check_invariants(env.pg, env.psp, answers={"late-1": "succeeded"})


def test_5xx_before_processing_then_recovers(env):
    d = env.daemon(processor_retries=2, circuit_failures=1000)
    c = d.client()
    env.open_account(c, "f5", balance=1000)
    env.psp.faults(fail_before_rate=1.0)
    r = c.ok("pay", account="f5", amount=100, currency="EUR", idempotency_key="f5-1", wait_ms=500)
    assert r["status"] == "pending"
    assert c.ok("balance", account="f5")["held"] == 100
    env.psp.faults(fail_before_rate=0.0)
    wait_for(lambda: c.ok("status", idempotency_key="f5-1")["status"] == "succeeded", timeout=10)
    assert env.psp.counters()["succeeded"] == 1
    d.stop()
    check_invariants(env.pg, env.psp, answers={"f5-1": "succeeded"})


def test_5xx_after_processing_is_committed_once(env):
    d = env.daemon(processor_retries=2, circuit_failures=1000)
    c = d.client()
    env.open_account(c, "fa", balance=1000)
    env.psp.faults(fail_after_rate=1.0)
    r = c.ok("pay", account="fa", amount=100, currency="EUR", idempotency_key="fa-1")
    assert r["status"] == "succeeded"          # found by polling: the charge happened
    assert env.psp.counters()["succeeded"] == 1
    env.psp.faults(fail_after_rate=0.0, drop_after_rate=1.0)
    r = c.ok("pay", account="fa", amount=200, currency="EUR", idempotency_key="fa-2")
    assert r["status"] == "succeeded"
    assert env.psp.counters()["succeeded"] == 2
    assert c.ok("balance", account="fa")["balance"] == 700
    d.stop()
    check_invariants(env.pg, env.psp, answers={"fa-1": "succeeded", "fa-2": "succeeded"})


def test_processor_down_opens_circuit_then_closes(env):
    d = env.daemon(processor_retries=0, circuit_failures=3, circuit_open_ms=500, processor_poll_ms=50,
                   processor_connect_timeout_ms=200, payment_deadline_ms=20000)
    c = d.client()
    env.open_account(c, "cb", balance=10000)
    env.psp.faults(refuse_connections=True)
    first = c.ok("pay", account="cb", amount=10, currency="EUR", idempotency_key="cb-0", wait_ms=300)
    assert first["status"] == "pending"
    wait_for(lambda: c.ok("health")["processor"] == "circuit_open", timeout=10, what="circuit open")
    r = c.call("pay", account="cb", amount=10, currency="EUR", idempotency_key="cb-x")
    assert r["error"]["code"] == "overloaded" and "circuit" in r["error"]["message"]
    env.psp.faults(refuse_connections=False)
    wait_for(lambda: c.ok("status", idempotency_key="cb-0")["status"] == "succeeded", timeout=15)
    wait_for(lambda: c.ok("health")["processor"] == "up", timeout=10, what="circuit closed")
    r = c.ok("pay", account="cb", amount=10, currency="EUR", idempotency_key="cb-1")
    assert r["status"] == "succeeded"
    d.stop()
    check_invariants(env.pg, env.psp, answers={"cb-0": "succeeded", "cb-1": "succeeded"})


def test_postgres_restart_under_load(env):
    d = env.daemon(pool_size=4)
    c = d.client()
    for i in range(8):
        env.open_account(c, f"pr-{i}", balance=100000)
    env.psp.faults(latency_ms=150)
    answers, errors = {}, {}
    lock = threading.Lock()

    def worker(w):
        cl = d.client(timeout=60)
        for j in range(15):
            key = f"pr-{w}-{j}"
            r = cl.call("pay", account=f"pr-{w}", amount=100, currency="EUR", idempotency_key=key)
            with lock:
                if r["ok"]:
                    answers[key] = r["result"]["status"]
                else:
                    errors[key] = r["error"]["code"]
        cl.close()

    ts = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for t in ts:
        t.start()
    time.sleep(0.6)
    env.pg.restart()                   # immediate stop (a crash), then start
    for t in ts:
        t.join(120)
    assert set(errors.values()) <= {"unavailable"}, errors
    # Everything in doubt settles once the database is back.
    wait_for(lambda: env.pg.query("SELECT count(*) FROM payments WHERE status='pending'")[0][0] == 0,
             timeout=30, what="pending payments settled")
    final = {k: s for k, s in answers.items() if s != "pending"}
    assert len(final) > 0
    d.stop()
    check_invariants(env.pg, env.psp, answers=final)
