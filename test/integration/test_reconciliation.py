"""Reconciliation (docs/reconciliation.md): every kind of difference between
our books and the processor's own list is injected, found by a run, and
settled by hand; a run killed mid-way resumes without losing or repeating a
page; Stripe's list and Adyen's settlement report are each read once. Every
test ends with check_invariants (which counts compensating entries in I1)."""

import http.client
import json
import os
import subprocess
import time

import pytest

from harness import (PROCESSOR, Daemon, Processor, check_invariants, prepare_debit, wait_for)

PG_BIN = "/usr/lib/postgresql/15/bin"
REASON = "checked against the processor's dashboard (test operator)"


def window():
    now = int(time.time())
    return {"from": now - 3600, "to": now + 3600}


def run_reconcile(c, timeout=60, **kw):
    """Start a run and wait for it to end; the run's row."""
    started = c.ok("reconcile", **kw)
    run_id = started["run_id"]

    def done():
        runs = c.ok("reconcile_status")["runs"]
        mine = [r for r in runs if r["run_id"] == run_id]
        return mine and mine[0]["state"] != "running" and mine[0]

    return wait_for(done, timeout=timeout, interval=0.1, what=f"run {run_id}")


def open_discrepancies(c):
    return c.ok("discrepancies")["discrepancies"]


def by_gid(ds):
    return {d["gid"]: d for d in ds}


def pay(c, account, amount, key):
    r = c.ok("pay", account=account, amount=amount, currency="EUR", idempotency_key=key)
    assert r["status"] == "succeeded", r
    return r


def gid_of(env, key):
    return env.pg.query("SELECT gid FROM payments WHERE idempotency_key = %s", (key,))[0][0]


def settle(c, d, action, reason=REASON):
    return c.call("settle_discrepancy", discrepancy_id=d["id"], action=action, reason=reason)


def forget_payment(env, key):
    """As if PostgreSQL lost a committed payment (a failover that lost recent
    commits): the payment row and its debit vanish, and the balance is what
    it was before it."""
    with env.pg.connect() as conn:
        pid, acct, amount = conn.execute(
            "SELECT payment_id, account_id, amount FROM payments WHERE idempotency_key = %s", (key,)).fetchone()
        conn.execute("DELETE FROM ledger WHERE payment_id = %s", (pid,))
        conn.execute("DELETE FROM payments WHERE payment_id = %s", (pid,))
        conn.execute("UPDATE accounts SET balance = balance + %s WHERE id = %s", (amount, acct))


def audit_ok(c):
    r = c.ok("audit")
    assert r["ok"], r["offenders"]


@pytest.mark.skipif(PROCESSOR != "generic", reason="generic list endpoint (Stripe and Adyen have their own tests)")
def test_payment_row_deleted_is_found_and_settled_by_a_debit(env):
    d = env.daemon()
    c = d.client()
    env.open_account(c, "acct-1", balance=10000)
    for i in range(3):
        pay(c, "acct-1", 1000 + i, f"k{i}")
    gid = gid_of(env, "k1")
    forget_payment(env, "k1")
    audit_ok(c)                           # the books are consistent, just incomplete

    run = run_reconcile(c, **window())
    assert run["state"] == "done" and run["seen"] == 3, run
    ds = open_discrepancies(c)
    assert [x["kind"] for x in ds] == ["charged_not_debited"], ds
    disc = ds[0]
    assert disc["gid"] == gid and disc["ours"] is None and disc["theirs"]["amount"] == 1001
    assert disc["theirs"]["account"] == "acct-1"

    # A credit is the wrong way round: refused, nothing written but the audit row.
    r = settle(c, disc, "credit")
    assert r["error"]["code"] == "invalid_request" and "calls for a debit of 1001" in r["error"]["message"], r
    r = settle(c, disc, "debit")
    assert r["result"]["outcome"] == "settled" and r["result"]["amount"] == 1001, r
    assert c.ok("balance", account="acct-1")["balance"] == 10000 - 1000 - 1001 - 1002
    assert open_discrepancies(c) == []
    rows = env.pg.query("SELECT action, outcome FROM discrepancy_settlements ORDER BY settlement_id")
    assert rows[0][0] == "credit" and rows[0][1].startswith("refused") and rows[1] == ("debit", "settled")
    # Settled once only.
    r = settle(c, disc, "debit")
    assert r["error"]["code"] == "invalid_request" and "resolved already" in r["error"]["message"], r

    # The next run finds it again but it stays settled: nothing new, nothing reopened.
    run = run_reconcile(c, **window())
    assert run["state"] == "done" and open_discrepancies(c) == []
    audit_ok(c)
    check_invariants(env.pg, env.psp)
