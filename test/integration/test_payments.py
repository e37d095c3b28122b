"""Each payment outcome end to end: succeeded, declined, insufficient_funds,
pending then settled; replays, status lookups, credits and balances."""

import re
import time

from harness import ID_PATTERN, check_invariants, wait_for


def test_succeeded_and_replayed(env):
    d = env.daemon()
    c = d.client()
    env.open_account(c, "acct-1", balance=10000)
    r = c.ok("pay", account="acct-1", amount=1250, currency="EUR", idempotency_key="order-1",
             reference="order 1", metadata={"cart": "42"})
    assert r["status"] == "succeeded"
    assert r["amount"] == 1250 and r["currency"] == "EUR" and r["account"] == "acct-1"
    # pc:<node>:<payment uuid in 26 lower-case base32 characters> (docs/architecture.md)
    assert re.fullmatch(r"pc:t1:[a-z2-7]{26}", r["gid"]), r["gid"]
    assert len(r["gid"]) <= 64
    assert re.fullmatch(ID_PATTERN, r["processor_ref"]), r["processor_ref"]
    assert r["decline_code"] is None
    assert "replayed" not in r
    assert c.ok("balance", account="acct-1") == {"account": "acct-1", "currency": "EUR", "balance": 8750,
                                                 "held": 0, "pending_credits": 0}
    again = c.ok("pay", account="acct-1", amount=1250, currency="EUR", idempotency_key="order-1")
    assert again["replayed"] is True and again["payment_id"] == r["payment_id"] and again["status"] == "succeeded"
    assert c.ok("status", idempotency_key="order-1")["status"] == "succeeded"
    assert c.ok("status", payment_id=r["payment_id"])["idempotency_key"] == "order-1"
    # The same answer after a restart (I6), from the database.
    d.stop()
    d.start()
    c = d.client()
    after = c.ok("pay", account="acct-1", amount=1250, currency="EUR", idempotency_key="order-1")
    assert after["replayed"] is True and after["status"] == "succeeded" and after["payment_id"] == r["payment_id"]
    assert after["processor_ref"] == r["processor_ref"]
    assert env.psp.counters()["processed_creates"] == 1
    d.stop()
    check_invariants(env.pg, env.psp, answers={"order-1": "succeeded"})


def test_declined_restores_funds(env):
    d = env.daemon()
    c = d.client()
    env.open_account(c, "acct-d", balance=5000)
    r = c.ok("pay", account="acct-d", amount=700, currency="EUR", idempotency_key="dec-1",
             metadata={"sim": "decline", "sim_decline_code": "do_not_honor"})
    assert r["status"] == "declined" and r["decline_code"] == "do_not_honor"
    assert c.ok("balance", account="acct-d")["balance"] == 5000
    replay = c.ok("pay", account="acct-d", amount=700, currency="EUR", idempotency_key="dec-1")
    assert replay["status"] == "declined" and replay["replayed"] is True
    # The declined row is written asynchronously; it lands.
    wait_for(lambda: env.pg.query("SELECT status FROM payments WHERE idempotency_key='dec-1'")[0][0] == "declined")
    d.stop()
    check_invariants(env.pg, env.psp, answers={"dec-1": "declined"})


def test_insufficient_funds_never_contacts_processor(env):
    d = env.daemon()
    c = d.client()
    env.open_account(c, "acct-poor", balance=100)
    before = env.psp.counters()["requests"]["create"]
    r = c.ok("pay", account="acct-poor", amount=500, currency="EUR", idempotency_key="poor-1")
    assert r["status"] == "insufficient_funds" and r["processor_ref"] is None
    assert env.psp.counters()["requests"]["create"] == before
    assert c.ok("balance", account="acct-poor")["balance"] == 100
    # Final forever: even after the account is topped up.
    c.ok("credit", account="acct-poor", amount=1000, currency="EUR", idempotency_key="topup")
    again = c.ok("pay", account="acct-poor", amount=500, currency="EUR", idempotency_key="poor-1")
    assert again["status"] == "insufficient_funds" and again["replayed"] is True
    d.stop()
    check_invariants(env.pg, env.psp, answers={"poor-1": "insufficient_funds"})


def test_pending_then_settled(env):
    d = env.daemon()
    c = d.client()
    env.open_account(c, "acct-p", balance=3000)
    env.psp.faults(settle_ms=400)
    r = c.ok("pay", account="acct-p", amount=1000, currency="EUR", idempotency_key="pend-1", wait_ms=0,
             metadata={"sim": "pending"})
    assert r["status"] == "pending"
    bal = c.ok("balance", account="acct-p")
    assert bal["balance"] == 3000 and bal["held"] == 1000
    wait_for(lambda: c.ok("status", idempotency_key="pend-1")["status"] == "succeeded", timeout=10)
    assert c.ok("balance", account="acct-p") == {"account": "acct-p", "currency": "EUR", "balance": 2000,
                                                 "held": 0, "pending_credits": 0}
    d.stop()
    check_invariants(env.pg, env.psp, answers={"pend-1": "succeeded"})


def test_pending_settles_declined(env):
    d = env.daemon()
    c = d.client()
    env.open_account(c, "acct-pd", balance=3000)
    env.psp.faults(settle_ms=300, settle_status="declined")
    r = c.ok("pay", account="acct-pd", amount=1000, currency="EUR", idempotency_key="pend-d",
             metadata={"sim": "pending"})
    assert r["status"] == "declined"     # waited through the pending phase
    assert c.ok("balance", account="acct-pd")["balance"] == 3000
    d.stop()
    check_invariants(env.pg, env.psp, answers={"pend-d": "declined"})


def test_credit_replay_and_conflict(env):
    d = env.daemon()
    c = d.client()
    c.ok("account_open", account="acct-c", currency="USD")
    r = c.ok("credit", account="acct-c", amount=500, currency="USD", idempotency_key="dep-1", reference="wire")
    assert r["status"] == "applied" and r["amount"] == 500 and r["credit_id"]
    again = c.ok("credit", account="acct-c", amount=500, currency="USD", idempotency_key="dep-1")
    assert again["replayed"] is True and again["credit_id"] == r["credit_id"]
    bad = c.call("credit", account="acct-c", amount=501, currency="USD", idempotency_key="dep-1")
    assert bad["error"]["code"] == "idempotency_conflict"
    assert c.ok("balance", account="acct-c")["balance"] == 500
    d.stop()
    check_invariants(env.pg, env.psp)


def test_many_payments_pipelined(env):
    d = env.daemon()
    c = d.client()
    for i in range(5):
        env.open_account(c, f"m-{i}", balance=100000)
    rids = [c.send("pay", account=f"m-{i % 5}", amount=10 + i, currency="EUR", idempotency_key=f"m-{i}")
            for i in range(200)]
    answers = {}
    for i, rid in enumerate(rids):
        r = c.wait(rid)
        assert r["ok"], r
        answers[f"m-{i}"] = r["result"]["status"]
    assert set(answers.values()) == {"succeeded"}
    d.stop()
    check_invariants(env.pg, env.psp, answers=answers)
