"""Recovery: every crash row of the failure-mode matrix (docs/failure-modes.md)
as a named, deterministic test (fail points compiled into test builds), node ownership
with two daemons, manual review and resolve, and idempotency of recovery.
Each test ends with the invariants against the database and the processor."""

import time

import pytest

from harness import DECLINE_CODE, NEVER_SENT, Client, check_invariants, only_processors, wait_for

FAST = {"recovery_interval_ms": 300, "processor_poll_ms": 50}


def crash_at(env, point, key, account="acct-r", balance=5000, amount=700, metadata=None, **settings):
    """Start a daemon armed to _exit at `point` for payment `key`, pay, and
    wait for it to die. Returns the daemon (stopped)."""
    d = env.daemon(env={"PAYCOORD_FAILPOINT": point, "PAYCOORD_FAILPOINT_KEY": key}, **dict(FAST, **settings))
    c = d.client()
    env.open_account(c, account, balance=balance)
    fields = dict(account=account, amount=amount, currency="EUR", idempotency_key=key)
    if metadata:
        fields["metadata"] = metadata
    c.send("pay", **fields)
    with pytest.raises((ConnectionError, OSError)):
        c.read_line()
    assert d.proc.wait(10) == 99, d.tail()
    assert f"event=failpoint name={point}" in d.log_text()
    return d


def restart(d, **settings):
    d.settings.update(settings)
    d.start()
    return d.client()


def gid_of(env, key):
    rows = env.pg.query("SELECT gid FROM payments WHERE idempotency_key = %s", (key,))
    return rows[0][0] if rows else None


def prepared_gids(env):
    return [g for (g,) in env.pg.query("SELECT gid FROM pg_prepared_xacts")]


def test_killed_before_prepare(env):
    d = crash_at(env, "before_debit", "k-before")
    assert prepared_gids(env) == []
    c = restart(d)
    r = c.call("status", idempotency_key="k-before")
    assert r["error"]["code"] == "not_found"            # nothing was written
    assert c.ok("balance", account="acct-r")["balance"] == 5000
    assert env.psp.counters()["requests"]["create"] == 0
    d.stop()
    check_invariants(env.pg, env.psp)


def test_killed_after_prepare_before_send(env):
    d = crash_at(env, "after_prepare", "k-prep")
    gid = gid_of(env, "k-prep")
    assert prepared_gids(env) == [gid]                   # funds held across the crash
    assert env.psp.counters()["requests"]["create"] == 0
    c = restart(d)
    if NEVER_SENT == "succeeded":
        # Stripe, Adyen: recovery replays the identical create with the same
        # key before the deadline; the processor performs it now and the
        # answer decides.
        wait_for(lambda: c.ok("status", idempotency_key="k-prep")["status"] == "succeeded", timeout=10)
        assert c.ok("balance", account="acct-r")["balance"] == 5000 - 700
        assert env.psp.counters()["processed_creates"] == 1
        d.stop()
        check_invariants(env.pg, env.psp, answers={"k-prep": "succeeded"})
        return
    wait_for(lambda: c.ok("status", idempotency_key="k-prep")["status"] == "declined", timeout=10)
    r = c.ok("status", idempotency_key="k-prep")
    assert r["decline_code"] == "canceled"
    assert c.ok("balance", account="acct-r")["balance"] == 5000
    # The tombstone refuses a late create with that gid: nothing charged.
    st, body = env.psp.create(gid, 700, "EUR", "acct-r")
    assert st == 200 and body["status"] == "canceled"
    d.stop()
    check_invariants(env.pg, env.psp, answers={"k-prep": "declined"})


def test_killed_after_send_processor_charged(env):
    env.psp.faults(latency_ms=400)               # the charge lands after the crash
    d = crash_at(env, "after_send", "k-sent")
    wait_for(lambda: env.psp.counters()["succeeded"] == 1, timeout=5, what="late charge")
    env.psp.faults(latency_ms=0)
    c = restart(d)
    wait_for(lambda: c.ok("status", idempotency_key="k-sent")["status"] == "succeeded", timeout=10)
    assert c.ok("balance", account="acct-r")["balance"] == 5000 - 700
    assert "recovery gid=" in d.log_text() and "event=committed" in d.log_text()
    d.stop()
    check_invariants(env.pg, env.psp, answers={"k-sent": "succeeded"})


def test_killed_after_processor_declined(env):
    d = crash_at(env, "after_answer", "k-dec", metadata={"sim": "decline"})
    assert prepared_gids(env) == [gid_of(env, "k-dec")]
    c = restart(d)
    wait_for(lambda: c.ok("status", idempotency_key="k-dec")["status"] == "declined", timeout=10)
    assert c.ok("status", idempotency_key="k-dec")["decline_code"] == DECLINE_CODE
    assert c.ok("balance", account="acct-r")["balance"] == 5000
    d.stop()
    check_invariants(env.pg, env.psp, answers={"k-dec": "declined"})


def test_killed_after_commit_before_reply(env):
    d = crash_at(env, "after_phase2", "k-done")
    assert prepared_gids(env) == []
    c = restart(d)
    r = c.ok("pay", account="acct-r", amount=700, currency="EUR", idempotency_key="k-done")
    assert r["status"] == "succeeded" and r["replayed"] is True
    assert env.psp.counters()["processed_creates"] == 1     # never a second charge
    assert c.ok("balance", account="acct-r")["balance"] == 4300
    d.stop()
    check_invariants(env.pg, env.psp, answers={"k-done": "succeeded"})


@only_processors("generic", why="the tombstone of a cancel by key is the generic contract's "
                 "(test_processors.py covers Stripe's conclusive search and Adyen's technical cancel)")
def test_processor_never_saw_it_tombstone_refuses_late_arrival(env):
    env.psp.faults(blackhole=True, fault_ops=["create"])
    d = env.daemon(processor_timeout_ms=300, processor_retries=0, payment_deadline_ms=1500, circuit_failures=1000,
                   **FAST)
    c = d.client()
    env.open_account(c, "acct-n", balance=1000)
    r = c.ok("pay", account="acct-n", amount=100, currency="EUR", idempotency_key="k-never")
    assert r["status"] == "declined" and r["decline_code"] == "canceled"
    env.psp.faults(blackhole=False)
    st, body = env.psp.create(r["gid"], 100, "EUR", "acct-n")
    assert st == 200 and body["status"] == "canceled"          # a late arrival is refused
    assert c.ok("balance", account="acct-n")["balance"] == 1000
    d.stop()
    check_invariants(env.pg, env.psp, answers={"k-never": "declined"})


def test_crash_during_recovery_commit_then_recovered(env):
    env.psp.faults(latency_ms=400)
    d = crash_at(env, "after_send", "k-rec")
    wait_for(lambda: env.psp.counters()["succeeded"] == 1, timeout=5)
    env.psp.faults(latency_ms=0)
    # Recovery itself dies right before COMMIT PREPARED ...
    d.start(wait_ready=False, env={"PAYCOORD_FAILPOINT": "recovery_before_commit"})
    assert d.proc.wait(15) == 99
    assert prepared_gids(env) == [gid_of(env, "k-rec")]
    # ... and the next start finishes the job.
    c = restart(d)
    wait_for(lambda: c.ok("status", idempotency_key="k-rec")["status"] == "succeeded", timeout=10)
    d.stop()
    check_invariants(env.pg, env.psp, answers={"k-rec": "succeeded"})


def test_recovery_is_idempotent(env):
    # An orphan recovery settles by itself in every mode: crashed right after
    # the processor declined it (Adyen: its AUTHORISATION webhook says so).
    d = crash_at(env, "after_answer", "k-idem", metadata={"sim": "decline"})
    c = restart(d)
    wait_for(lambda: c.ok("status", idempotency_key="k-idem")["status"] == "declined", timeout=10)

    def snapshot():
        return (env.pg.query("SELECT payment_id, status, decline_code, processor_ref FROM payments ORDER BY 1"),
                env.pg.query("SELECT gid, attempts, review FROM recovery_state ORDER BY 1"),
                env.pg.query("SELECT id, balance FROM accounts ORDER BY 1"),
                env.pg.query("SELECT count(*) FROM ledger"), prepared_gids(env),
                sorted((p["idempotency_key"], p["status"]) for p in env.psp.all_payments()))

    before = snapshot()
    for _ in range(2):
        r = c.ok("recover")
        assert r == {"checked": 0, "committed": 0, "rolled_back": 0, "left": 0}
    assert snapshot() == before
    d.stop()
    check_invariants(env.pg, env.psp, answers={"k-idem": "declined"})


def test_manual_review_then_resolve(env):
    d = crash_at(env, "after_prepare", "k-rev")
    gid = gid_of(env, "k-rev")
    # the processor cannot tell us (Stripe's get replays a create and
    # searches: every op fails)
    env.psp.faults(fail_before_rate=1.0, fault_ops=["create", "get", "cancel", "list"])
    c = restart(d, max_recovery_attempts=2, recovery_interval_ms=2000)
    # Forced passes ask early, but only answers that were due count as
    # attempts: a burst of `recover` does not push a gid to review.
    for _ in range(5):
        c.ok("recover")
    assert env.pg.query("SELECT coalesce(max(attempts), 0) FROM recovery_state")[0][0] <= 1

    def in_review():
        txs = c.ok("prepared")["transactions"]
        return [t for t in txs if t["gid"] == gid and t["state"] == "review"]
    t = wait_for(in_review, timeout=15, what="manual review after 2 due attempts")[0]
    assert t["attempts"] >= 2 and t["account"] == "acct-r" and t["amount"] == 700
    assert t["last_error"]
    # Recovery leaves it alone now; a person settles it, with a reason.
    assert c.ok("recover")["checked"] == 0
    r = c.call("resolve", gid=gid, action="rollback")
    assert r["error"]["code"] == "invalid_request"                          # reason is required
    r = c.ok("resolve", gid=gid, action="rollback", reason="processor confirms no charge (ticket 42)")
    assert r == {"gid": gid, "outcome": "rolled_back"}
    audit = env.pg.query("SELECT action, outcome, reason, actor_uid, node FROM resolutions WHERE gid = %s", (gid,))
    assert audit == [("rollback", "rolled_back", "processor confirms no charge (ticket 42)", 0, "t1")]
    assert c.ok("status", idempotency_key="k-rev")["status"] == "declined"
    assert c.call("resolve", gid=gid, action="commit", reason="again")["error"]["code"] == "not_found"
    env.psp.faults(fail_before_rate=0.0)
    d.stop()
    check_invariants(env.pg, env.psp, answers={"k-rev": "declined"})


@only_processors("generic", why="a 501 to cancel by key is the generic contract's; Stripe cancels by id, "
                 "Adyen by reference")
def test_cancel_unsupported_waits_out_window(env):
    d = crash_at(env, "after_prepare", "k-501")
    env.psp.faults(cancel_unsupported=True)
    c = restart(d, processor_idempotency_window_s=2)
    r = c.ok("recover")
    assert r["left"] == 1 and r["rolled_back"] == 0                        # inside the window: wait
    wait_for(lambda: c.ok("status", idempotency_key="k-501")["status"] == "declined", timeout=15)
    row = env.pg.query("SELECT p.decline_code, s.review FROM payments p JOIN recovery_state s USING (gid) "
                       "WHERE p.idempotency_key = 'k-501'")[0]
    assert row == ("expired_unconfirmed", True)                               # flagged for reconciliation
    d.stop()
    check_invariants(env.pg, env.psp, answers={"k-501": "declined"})


def test_database_down_between_phases(env):
    env.psp.faults(latency_ms=600)
    d = env.daemon(**FAST)
    c = d.client()
    env.open_account(c, "acct-db", balance=1000)
    rid = c.send("pay", account="acct-db", amount=100, currency="EUR", idempotency_key="k-dbdown")
    wait_for(lambda: prepared_gids(env), timeout=5, what="prepared")
    env.pg.stop()                           # the processor answers while the database is down
    time.sleep(1.2)
    env.pg.start()
    r = c.wait(rid)
    assert r["ok"] and r["result"]["status"] == "succeeded", r
    d.stop()
    check_invariants(env.pg, env.psp, answers={"k-dbdown": "succeeded"})


def test_two_daemons_own_their_nodes(env):
    a = env.daemon(node_id="t1", **FAST)
    ca = a.client()
    env.open_account(ca, "acct-a", balance=5000)
    env.open_account(ca, "acct-b", balance=5000)
    # Node t2 dies holding a prepared debit.
    import os
    bdir = os.path.join(env.workdir, "b")
    os.mkdir(bdir)
    from harness import Daemon
    b = Daemon(bdir, env.pg, env.psp, node_id="t2", **FAST)
    env.daemons.append(b)
    b.start(env={"PAYCOORD_FAILPOINT": "after_prepare", "PAYCOORD_FAILPOINT_KEY": "k-b"})
    cb = b.client()
    # While t2 lives, t1 may not settle t2's gids.
    assert ca.call("recover", node="t2")["error"]["code"] == "forbidden"
    assert cb.ok("pay", account="acct-b", amount=10, currency="EUR", idempotency_key="k-b0")["status"] == "succeeded"
    cb.send("pay", account="acct-b", amount=300, currency="EUR", idempotency_key="k-b")
    assert b.proc.wait(10) == 99
    gid_b = gid_of(env, "k-b")
    assert gid_b.startswith("pc:t2:")
    # To t1, t2's gid is foreign: state unknown in `prepared`.
    states = {t["gid"]: t["state"] for t in ca.ok("prepared")["transactions"]}
    assert states[gid_b] == "unknown"
    # t1 keeps serving and its recovery never touches t2's gids.
    assert ca.ok("pay", account="acct-a", amount=100, currency="EUR", idempotency_key="k-a")["status"] == "succeeded"
    r = ca.ok("recover")
    assert r["checked"] == 0 and gid_b in prepared_gids(env)
    # A second daemon with node id t1 cannot take t1's lock: not ready, takes no payments.
    cdir = os.path.join(env.workdir, "c")
    os.mkdir(cdir)
    dup = Daemon(cdir, env.pg, env.psp, node_id="t1", **FAST)
    env.daemons.append(dup)
    dup.start(wait_ready=False)
    cd = wait_for(lambda: _try_client(dup), what="dup socket")
    wait_for(lambda: cd.ok("stats")["recovery"]["node_lock"] is False and "node_lock_busy" in dup.log_text(),
             timeout=10, what="dup refused the lock")
    assert cd.ok("health")["ready"] is False
    assert cd.call("pay", account="acct-a", amount=1, currency="EUR", idempotency_key="k-dup")["error"]["code"] == "unavailable"
    assert cd.call("recover")["error"]["code"] == "unavailable"
    dup.stop()
    # t2 is dead: its lock is free, so an operator lets t1 settle t2's gids.
    r = ca.ok("recover", node="t2")
    # k-b is settled (generic: rolled back by its tombstone; Stripe: the
    # replayed create charges it); k-b0's row may also be brought up to date
    # (t2 died before its batched 'succeeded' write), which counts as checked.
    done = "rolled_back" if NEVER_SENT == "declined" else "committed"
    assert r["checked"] in (1, 2) and r[done] == 1 and r["node"] == "t2", r
    assert gid_b not in prepared_gids(env)
    assert ca.ok("status", idempotency_key="k-b")["status"] == NEVER_SENT
    a.stop()
    check_invariants(env.pg, env.psp, answers={"k-a": "succeeded", "k-b0": "succeeded", "k-b": NEVER_SENT})


def _try_client(d):
    try:
        return Client(d.socket, timeout=5)
    except OSError:
        return None


def test_orphans_settled_at_startup_under_load(env):
    """Many orphans at once (daemon killed -9 with payments in flight), then a
    restart: recovery settles every one, concurrently, and the invariants hold."""
    env.psp.faults(latency_ms=300)
    d = env.daemon(**FAST)
    c = d.client()
    for i in range(4):
        env.open_account(c, f"o-{i}", balance=100000)
    for i in range(40):
        c.send("pay", account=f"o-{i % 4}", amount=10, currency="EUR", idempotency_key=f"o-{i}")
    wait_for(lambda: len(prepared_gids(env)) >= 4, timeout=5)
    d.kill9()
    env.psp.faults(latency_ms=0)
    c = restart(d)
    wait_for(lambda: env.pg.query("SELECT count(*) FROM payments WHERE status = 'pending'")[0][0] == 0
             and not prepared_gids(env), timeout=20, what="all settled")
    d.stop()
    check_invariants(env.pg, env.psp)


def test_settle_retry_keeps_the_status(env):
    """A settle write that fails once is retried with the same status (the
    crash driver once caught a retry clobbering it after a PostgreSQL restart)."""
    d = env.daemon(env={"PAYCOORD_FAILPOINT": "settle_unavailable", "PAYCOORD_FAILPOINT_KEY": "sr-1"}, **FAST)
    c = d.client()
    env.open_account(c, "acct-sr", balance=10)
    r = c.ok("pay", account="acct-sr", amount=500, currency="EUR", idempotency_key="sr-1")
    assert r["status"] == "insufficient_funds"
    assert env.pg.query("SELECT status FROM payments WHERE idempotency_key = 'sr-1'")[0][0] == "insufficient_funds"
    assert "event=settle_retry" not in d.log_text() or "check constraint" not in d.log_text()
    d.stop()
    check_invariants(env.pg, env.psp, answers={"sr-1": "insufficient_funds"})


def test_resolve_refuses_a_live_foreign_nodes_gid(env):
    import os
    import uuid
    from harness import Daemon
    a = env.daemon(node_id="t1", recovery_interval_ms=600000)
    ca = a.client()
    env.open_account(ca, "acct-f", balance=100)
    # A prepared debit of node t1, made by hand (t1's next pass is far away).
    pid = uuid.uuid4()
    gid = f"pc:t1:{pid.hex}"
    with env.pg.connect() as c:
        c.execute("SELECT pc_pay_intent(%s, 'f-1', 'acct-f', 10, 'EUR', NULL, NULL, %s, 't1', 60000)", (pid, gid))
        c.execute("BEGIN")
        c.execute("SELECT pc_pay_debit(%s, 'acct-f', 10)", (pid,))
        c.execute(f"PREPARE TRANSACTION '{gid}'")
    bdir = os.path.join(env.workdir, "b")
    os.mkdir(bdir)
    b = Daemon(bdir, env.pg, env.psp, node_id="t3")
    env.daemons.append(b)
    b.start()
    cb = b.client()
    r = cb.call("resolve", gid=gid, action="rollback", reason="wrong node")
    assert r["error"]["code"] == "forbidden" and "t1" in r["error"]["message"]
    assert {t["gid"]: t["state"] for t in cb.ok("prepared")["transactions"]}[gid] == "unknown"
    assert {t["gid"]: t["state"] for t in ca.ok("prepared")["transactions"]}[gid] == "in_doubt"
    # Its own node may resolve it; the request is audited.
    assert ca.ok("resolve", gid=gid, action="rollback", reason="test: never sent")["outcome"] == "rolled_back"
    assert env.pg.query("SELECT outcome FROM resolutions WHERE gid = %s", (gid,)) == [("rolled_back",)]
    b.stop()
    a.stop()
    check_invariants(env.pg, env.psp)
