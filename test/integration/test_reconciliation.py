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

    # The next run counts the compensating debit: both sides agree, nothing new.
    run = run_reconcile(c, **window())
    assert run["state"] == "done" and run["matched"] == 3 and open_discrepancies(c) == [], run
    # The processor refunds it later: a new difference (we hold a compensating debit of it).
    env.psp.refund(gid)
    run_reconcile(c, **window())
    ds = open_discrepancies(c)
    assert [(x["kind"], x["gid"]) for x in ds] == [("debited_not_charged", gid)], ds
    assert ds[0]["ours"]["compensated"] == 1001 and ds[0]["detail"] == "debited here; the processor says refunded"
    r = settle(c, ds[0], "credit", reason="refunded at the processor after the compensating debit")
    assert r["result"]["outcome"] == "settled" and r["result"]["amount"] == 1001, r
    assert c.ok("balance", account="acct-1")["balance"] == 10000 - 1000 - 1002
    run = run_reconcile(c, **window())
    assert run["matched"] == 3 and open_discrepancies(c) == [], run
    audit_ok(c)
    check_invariants(env.pg, env.psp)


@pytest.mark.skipif(PROCESSOR != "generic", reason="generic list endpoint")
def test_refund_at_the_processor_is_settled_by_a_credit(env):
    d = env.daemon()
    c = d.client()
    env.open_account(c, "acct-1", balance=5000)
    pay(c, "acct-1", 1200, "r1")
    pay(c, "acct-1", 300, "r2")
    gid = gid_of(env, "r1")
    st, body = env.psp.refund(gid)
    assert st == 200 and body["refunded"], body

    run = run_reconcile(c, **window())
    ds = open_discrepancies(c)
    assert [(x["kind"], x["gid"]) for x in ds] == [("debited_not_charged", gid)], ds
    assert ds[0]["theirs"]["refunded"] is True and ds[0]["ours"]["amount"] == 1200
    assert "refunded" in ds[0]["detail"]
    assert run["differences"] == 1 and run["matched"] == 1
    r = settle(c, ds[0], "credit")
    assert r["result"]["outcome"] == "settled" and r["result"]["amount"] == 1200, r
    assert c.ok("balance", account="acct-1")["balance"] == 5000 - 300
    audit_ok(c)
    check_invariants(env.pg, env.psp)


@pytest.mark.skipif(PROCESSOR != "generic", reason="generic list endpoint")
def test_amount_changed_at_the_processor_and_a_debit_the_balance_cannot_cover(env):
    d = env.daemon()
    c = d.client()
    env.open_account(c, "acct-1", balance=1000)
    pay(c, "acct-1", 900, "a1")
    gid = gid_of(env, "a1")
    st, _ = env.psp._req("POST", "/control/amend", {"key": gid, "amount": 1500})
    assert st == 200

    run_reconcile(c, **window())
    ds = open_discrepancies(c)
    assert [(x["kind"], x["gid"]) for x in ds] == [("amount_mismatch", gid)], ds
    assert ds[0]["ours"]["amount"] == 900 and ds[0]["theirs"]["amount"] == 1500
    # I4: a compensating debit of 600 on a balance of 100 is refused, clearly.
    r = settle(c, ds[0], "debit")
    assert r["error"]["code"] == "invalid_request", r
    assert "holds 100 EUR, less than the compensating debit of 600" in r["error"]["message"], r
    assert c.ok("balance", account="acct-1")["balance"] == 100
    assert len(open_discrepancies(c)) == 1
    c.ok("credit", account="acct-1", amount=1000, currency="EUR", idempotency_key="topup")
    r = settle(c, ds[0], "debit")
    assert r["result"]["outcome"] == "settled" and r["result"]["amount"] == 600, r
    assert c.ok("balance", account="acct-1")["balance"] == 500
    audit_ok(c)
    check_invariants(env.pg, env.psp)


@pytest.mark.skipif(PROCESSOR != "generic", reason="generic list endpoint")
def test_charges_made_directly_at_the_processor_under_our_prefix(env):
    d = env.daemon()
    c = d.client()
    env.open_account(c, "acct-1", balance=3000)
    pay(c, "acct-1", 100, "d1")
    # Not a gid paycoord makes (wrong shape), and one that has our shape but no row.
    st, _ = env.psp.create("pc:t1:manual-charge-1", 700, "EUR", "acct-1")
    assert st == 201
    shaped = "pc:t1:" + "a" * 26
    st, _ = env.psp.create(shaped, 250, "EUR", "acct-1")
    assert st == 201
    # Someone else's payment at the same processor: not ours, not compared.
    st, _ = env.psp.create("shop-42-order-7", 999, "EUR", "elsewhere")
    assert st == 201

    run = run_reconcile(c, **window())
    assert run["not_ours"] == 1 and run["seen"] == 4, run
    ds = by_gid(open_discrepancies(c))
    assert ds["pc:t1:manual-charge-1"]["kind"] == "unknown_gid"
    assert ds[shaped]["kind"] == "charged_not_debited"
    assert set(ds) == {"pc:t1:manual-charge-1", shaped}
    # The stray charge is refunded at the processor by the operator, then accepted;
    # the other one is the customer's (their account): debited.
    env.psp.refund("pc:t1:manual-charge-1")
    r = settle(c, ds["pc:t1:manual-charge-1"], "accept", reason="refunded at the processor, ticket OPS-7")
    assert r["result"]["outcome"] == "settled" and r["result"].get("entry_id") is None, r
    r = settle(c, ds[shaped], "debit")
    assert r["result"]["outcome"] == "settled" and r["result"]["amount"] == 250, r
    assert open_discrepancies(c) == []
    audit_ok(c)
    check_invariants(env.pg, env.psp)


@pytest.mark.skipif(PROCESSOR != "generic", reason="generic list endpoint and cancel by key")
def test_wrong_manual_resolve_is_found(env):
    """An operator rolls back an in-doubt debit that the processor had in fact
    charged: the payment is declined here, charged there."""
    env.psp.faults(fail_before_rate=1.0, fault_ops=["get", "cancel"])
    d = env.daemon(recovery_interval_ms=200, max_recovery_attempts=100000)
    c = d.client()
    env.open_account(c, "acct-1", balance=2000)
    d.kill9()
    pid, gid = prepare_debit(env.pg, "wrong-1", "acct-1", 800)
    st, _ = env.psp.create(gid, 800, "EUR", "acct-1")
    assert st == 201
    d.start()
    c = d.client()

    def resolved():
        r = c.call("resolve", gid=gid, action="rollback", reason="operator misread the dashboard")
        return "result" in r and r["result"]["outcome"] == "rolled_back"

    wait_for(resolved, timeout=20, interval=0.2, what="the wrong resolve")
    env.psp.faults(fail_before_rate=0.0)
    assert env.pg.query("SELECT derived_status FROM payments_view WHERE gid = %s", (gid,))[0][0] == "declined"

    run_reconcile(c, **window())
    ds = open_discrepancies(c)
    assert [(x["kind"], x["gid"]) for x in ds] == [("charged_not_debited", gid)], ds
    assert ds[0]["ours"]["status"] == "declined"
    r = settle(c, ds[0], "debit", reason="the resolve of ticket OPS-9 was wrong: the processor charged it")
    assert r["result"]["outcome"] == "settled" and r["result"]["amount"] == 800, r
    assert c.ok("balance", account="acct-1")["balance"] == 1200
    audit_ok(c)
    check_invariants(env.pg, env.psp)


@pytest.mark.skipif(PROCESSOR != "generic", reason="generic list endpoint")
def test_restore_from_a_dump_taken_before_a_batch(env):
    """The real restore-from-backup case: pg_dump, a batch of payments the
    processor charges, pg_restore of the dump. The batch's rows and debits
    are gone here; the processor kept every charge."""
    d = env.daemon()
    c = d.client()
    env.open_account(c, "acct-1", balance=20000)
    env.open_account(c, "acct-2", balance=20000)
    pay(c, "acct-1", 500, "before-1")
    dump = os.path.join(env.workdir, "before.dump")
    subprocess.run([os.path.join(PG_BIN, "pg_dump"), "-h", env.pg.sock, "-U", "postgres", "-Fc", "-f", dump,
                    "paycoord"], check=True)
    batch = {}
    for i in range(6):
        acct = "acct-1" if i % 2 else "acct-2"
        pay(c, acct, 100 * (i + 1), f"batch-{i}")
        batch[gid_of(env, f"batch-{i}")] = (acct, 100 * (i + 1))
    d.stop()
    subprocess.run([os.path.join(PG_BIN, "pg_restore"), "-h", env.pg.sock, "-U", "postgres", "--clean",
                    "--if-exists", "--single-transaction", "-d", "paycoord", dump], check=True)
    assert env.pg.query("SELECT count(*) FROM payments")[0][0] == 1
    d.start()
    c = d.client()
    audit_ok(c)

    run = run_reconcile(c, **window())
    assert run["seen"] == 7 and run["matched"] == 1, run
    ds = by_gid(open_discrepancies(c))
    assert set(ds) == set(batch), ds
    for gid, (acct, amount) in batch.items():
        assert ds[gid]["kind"] == "charged_not_debited" and ds[gid]["ours"] is None
        assert ds[gid]["theirs"]["amount"] == amount and ds[gid]["account"] == acct
        r = settle(c, ds[gid], "debit", reason="lost in the restore of the 16:00 backup")
        assert r["result"]["outcome"] == "settled", r
    assert c.ok("balance", account="acct-1")["balance"] == 20000 - 500 - (200 + 400 + 600)
    assert c.ok("balance", account="acct-2")["balance"] == 20000 - (100 + 300 + 500)
    audit_ok(c)
    check_invariants(env.pg, env.psp)


@pytest.mark.skipif(PROCESSOR != "generic", reason="generic list endpoint")
def test_review_flags_without_a_prepared_transaction_are_discrepancies(env):
    """A review flag recovery left on a gid with no prepared transaction (e.g.
    the processor charged a payment that holds no debit) shows up in the same
    list; settling it clears the flag."""
    d = env.daemon()
    c = d.client()
    env.open_account(c, "acct-1", balance=1000)
    pay(c, "acct-1", 400, "v1")
    gid = gid_of(env, "v1")
    env.pg.query("INSERT INTO recovery_state (gid, payment_id, attempts, last_error, review) "
                 "SELECT gid, payment_id, 3, 'expired_unconfirmed', true FROM payments WHERE gid = %s "
                 "RETURNING gid", (gid,))
    run_reconcile(c, **window())
    ds = open_discrepancies(c)
    assert [(x["kind"], x["gid"]) for x in ds] == [("review", gid)], ds
    assert "expired_unconfirmed" in ds[0]["detail"]
    r = settle(c, ds[0], "accept", reason="checked: charged once, debited once")
    assert r["result"]["outcome"] == "settled", r
    assert env.pg.query("SELECT review FROM recovery_state WHERE gid = %s", (gid,))[0][0] is False
    audit_ok(c)
    check_invariants(env.pg, env.psp)


def bulk_create(psp, n, prefix, amount=100, account="bulk"):
    """n charges straight at psp-sim on one keep-alive connection."""
    conn = http.client.HTTPConnection("127.0.0.1", psp.port, timeout=30)
    from harness import TOKEN
    for i in range(n):
        key = f"{prefix}{i}"
        body = json.dumps({"idempotency_key": key, "amount": amount, "currency": "EUR", "account": account})
        conn.request("POST", "/v1/payments", body, {"Content-Type": "application/json", "Idempotency-Key": key,
                                                    "Authorization": f"Bearer {TOKEN}"})
        r = conn.getresponse()
        r.read()
        assert r.status == 201, r.status
    conn.close()


@pytest.mark.skipif(PROCESSOR != "generic", reason="generic list endpoint")
def test_crash_mid_run_resumes_without_losing_or_repeating_a_page(env):
    n_other, n_ours = 2000, 30
    bulk_create(env.psp, n_other, "other-shop-")
    d = env.daemon(recon_page_size=50, recon_page_pause_ms=60)
    c = d.client()
    env.open_account(c, "acct-1", balance=100000)
    bulk_create(env.psp, n_ours, "pc:t1:stray-", amount=10, account="acct-1")    # 30 unknown_gid
    for i in range(5):
        pay(c, "acct-1", 10 + i, f"m{i}")
    total = n_other + n_ours + 5
    started = c.ok("reconcile", **window())
    run_id = started["run_id"]
    wait_for(lambda: env.pg.query("SELECT pages FROM recon_runs WHERE run_id = %s", (run_id,))[0][0] >= 8,
             timeout=30, what="some pages")
    d.kill9()
    state, pages, seen = env.pg.query("SELECT state, pages, seen FROM recon_runs WHERE run_id = %s", (run_id,))[0]
    assert state == "running" and 0 < seen < total, (state, pages, seen)
    # Restarted, the daemon resumes the run on its own (from its cursor).
    d.start()
    c = d.client()
    wait_for(lambda: env.pg.query("SELECT state FROM recon_runs WHERE run_id = %s", (run_id,))[0][0] == "done",
             timeout=60, what="the resumed run")
    row = env.pg.query("SELECT seen, not_ours, matched, differences, pages FROM recon_runs WHERE run_id = %s",
                       (run_id,))[0]
    assert row[:4] == (total, n_other, 5, n_ours), row
    assert row[4] == -(-total // 50), row           # every page exactly once
    assert "event=resumed" in d.log_text()
    ds = open_discrepancies(c)
    assert len(ds) == n_ours and {x["kind"] for x in ds} == {"unknown_gid"}
    assert env.pg.query("SELECT count(*) FROM recon_runs")[0][0] == 1
    for x in ds:
        env.psp.refund(x["gid"])
        r = settle(c, x, "accept", reason="stray test charges, refunded at the processor")
        assert r["result"]["outcome"] == "settled", r
    audit_ok(c)
    check_invariants(env.pg, env.psp)


CTL = os.path.join(os.environ.get("PAYCOORD_BUILD") or os.path.join(os.path.dirname(__file__), "..", "..", "build"),
                   "coordinator", "ctl", "paycoordctl")


def ctl(d, *args):
    return subprocess.run([CTL, "--socket", d.socket, *[str(a) for a in args]], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=60)


@pytest.mark.skipif(PROCESSOR != "generic", reason="generic list endpoint")
def test_paycoordctl_reconcile_discrepancies_settle_and_audit(env):
    d = env.daemon()
    c = d.client()
    env.open_account(c, "acct-1", balance=4000)
    pay(c, "acct-1", 1000, "c1")
    pay(c, "acct-1", 700, "c2")
    forget_payment(env, "c2")
    r = ctl(d, "audit")
    assert r.returncode == 0 and "audit ok" in r.stdout, r

    w = window()
    r = ctl(d, "--json", "reconcile", "--from", w["from"], "--to", w["to"], "--wait")
    assert r.returncode == 0, r
    run = json.loads(r.stdout)
    assert run["state"] == "done" and run["seen"] == 2 and run["differences"] == 1, run
    r = ctl(d, "reconcile", "status")
    assert r.returncode == 0 and "done" in r.stdout and "(1 row)" in r.stdout, r
    r = ctl(d, "discrepancies")
    assert r.returncode == 0 and "charged_not_debited" in r.stdout and "(1 row)" in r.stdout, r
    disc = json.loads(ctl(d, "--json", "discrepancies").stdout)["discrepancies"][0]

    r = ctl(d, "settle-discrepancy", disc["id"], "--action", "debit", "--reason", "lost commit")
    assert r.returncode == 2 and "--yes" in r.stderr, r          # no terminal, no --yes: refused
    r = ctl(d, "settle-discrepancy", disc["id"], "--action", "credit", "--reason", "lost commit", "--yes")
    assert r.returncode == 1 and "calls for a debit of 700" in r.stderr, r
    r = ctl(d, "--json", "settle-discrepancy", disc["id"], "--action", "debit", "--reason", "lost commit", "--yes")
    assert r.returncode == 0 and json.loads(r.stdout)["outcome"] == "settled", r
    r = ctl(d, "discrepancies", "--all")
    assert r.returncode == 0 and "resolved" in r.stdout, r
    # Dates (UTC) work as well as unix seconds; half a window is a usage error.
    today = time.strftime("%Y-%m-%d", time.gmtime())
    r = ctl(d, "--json", "reconcile", "--from", today, "--to", today + "T23:59:59Z", "--wait")
    assert r.returncode == 0 and json.loads(r.stdout)["matched"] == 2, r
    r = ctl(d, "reconcile", "--from", today)
    assert r.returncode == 2 and "go together" in r.stderr, r
    r = ctl(d, "reconcile", "--from", "yesterday", "--to", today)
    assert r.returncode == 2, r

    # The audit finds a balance that is not the sum of its ledger (exit 1, the offender listed),
    # through the daemon and straight from PostgreSQL.
    env.pg.query("UPDATE accounts SET balance = balance + 5 WHERE id = 'acct-1' RETURNING id")
    r = ctl(d, "audit")
    assert r.returncode == 1 and "I1" in r.stdout and "acct-1" in r.stdout, r
    r = subprocess.run([CTL, "--db", env.pg.conninfo, "--json", "audit", "--account", "acct-1"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and json.loads(r.stdout)["offenders"][0]["check"] == "I1", r
    env.pg.query("UPDATE accounts SET balance = balance - 5 WHERE id = 'acct-1' RETURNING id")
    r = subprocess.run([CTL, "--db", env.pg.conninfo, "audit"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r
    check_invariants(env.pg, env.psp)


def other_processor(env, mode):
    """A processor of another API than the suite's, and a daemon speaking it."""
    psp = Processor(env.workdir, mode=mode)
    psp.start()
    env.proxies.append(psp)           # stopped with the env (it has stop())
    d = Daemon(env.workdir, env.pg, psp)
    env.daemons.append(d)
    d.start()
    return psp, d


def test_stripe_list_finds_a_lost_row_a_changed_amount_and_a_refund(env):
    psp, d = other_processor(env, "stripe")
    c = d.client()
    env.open_account(c, "acct-s", balance=10000)
    for i in range(4):
        pay(c, "acct-s", 500 + i, f"s{i}")
    lost, changed, refunded = gid_of(env, "s1"), gid_of(env, "s2"), gid_of(env, "s3")
    forget_payment(env, "s1")
    st, _ = psp._req("POST", "/control/amend", {"key": changed, "amount": 900})
    assert st == 200
    st, _ = psp._req("POST", "/control/amend", {"key": refunded, "refunded": True})
    assert st == 200

    run = run_reconcile(c, **window())
    assert run["state"] == "done" and run["seen"] == 4 and run["matched"] == 1, run
    assert run["source"] == "stripe"
    ds = by_gid(open_discrepancies(c))
    assert set(ds) == {lost, changed, refunded}, ds
    assert ds[refunded]["kind"] == "debited_not_charged" and ds[refunded]["theirs"]["refunded"] is True
    assert settle(c, ds[refunded], "credit")["result"]["amount"] == 503
    assert ds[lost]["kind"] == "charged_not_debited" and ds[lost]["theirs"]["id"].startswith("pi_")
    assert ds[lost]["theirs"]["account"] == "acct-s" and ds[lost]["theirs"]["currency"] == "EUR"
    assert ds[changed]["kind"] == "amount_mismatch" and ds[changed]["theirs"]["amount"] == 900
    assert settle(c, ds[lost], "debit")["result"]["amount"] == 501
    assert settle(c, ds[changed], "debit")["result"]["amount"] == 900 - 502
    audit_ok(c)
    check_invariants(env.pg, psp)


def test_adyen_settlement_report_finds_a_refund_and_a_lost_row(env):
    import urllib.request
    psp, d = other_processor(env, "adyen")
    c = d.client()
    env.open_account(c, "acct-a", balance=10000)
    for i in range(3):
        pay(c, "acct-a", 1000 + i, f"y{i}")
    refunded, lost = gid_of(env, "y0"), gid_of(env, "y2")
    st, _ = psp._req("POST", "/control/amend", {"key": refunded, "refunded": True})
    assert st == 200
    forget_payment(env, "y2")
    report = os.path.join(env.workdir, "settlement_detail_report_batch_1.csv")
    with urllib.request.urlopen(f"http://127.0.0.1:{psp.control_port}/control/settlement.csv", timeout=10) as r:
        body = r.read()
    with open(report, "wb") as f:
        f.write(body)
    assert body.count(b"\r\n") == 5            # header, 3 Settled, 1 Refunded

    r = c.call("reconcile", **window())
    assert r["error"]["code"] == "invalid_request" and "settlement details report" in r["error"]["message"], r
    run = run_reconcile(c, report=report, **window())
    assert run["state"] == "done" and run["source"] == "adyen_csv" and run["seen"] == 4, run
    ds = by_gid(open_discrepancies(c))
    assert set(ds) == {refunded, lost}, ds
    assert ds[refunded]["kind"] == "debited_not_charged" and ds[refunded]["theirs"]["refunded"] is True
    assert ds[lost]["kind"] == "charged_not_debited" and ds[lost]["theirs"]["amount"] == 1002
    assert settle(c, ds[refunded], "credit")["result"]["amount"] == 1000
    # A settlement report names no account: the operator names it.
    r = settle(c, ds[lost], "debit")
    assert r["error"]["code"] == "invalid_request" and "neither side names an account" in r["error"]["message"], r
    r = c.call("settle_discrepancy", discrepancy_id=ds[lost]["id"], action="debit", reason=REASON, account="acct-a")
    assert r["result"]["amount"] == 1002, r
    audit_ok(c)
    check_invariants(env.pg, psp)


@pytest.mark.skipif(PROCESSOR != "generic", reason="generic list endpoint")
def test_scheduled_run_metrics_alert_and_missing_at_the_processor(env):
    """The daily run starts by itself once its time has passed, once per
    window; the open discrepancies are counted by kind in stats and
    /metrics, and the run logs an alert line. A payment debited here that the
    processor has no record of is found (debited_not_charged)."""
    now = time.gmtime()
    d = env.daemon(start=False)
    c = None
    d.start()
    c = d.client()
    env.open_account(c, "acct-1", balance=5000)
    pay(c, "acct-1", 300, "sch-1")
    gid = gid_of(env, "sch-1")
    # The processor forgets it (as if the charge had been made against another account of ours),
    # and it was made 10 minutes ago (inside the scheduled window, which ends at this minute).
    env.psp.reset(payments=True)
    env.pg.query("UPDATE payments SET created_at = created_at - interval '10 minutes' WHERE gid = %s "
                 "RETURNING gid", (gid,))
    d.stop()
    d.settings.update(recon_schedule=time.strftime("%H:%M", now), recon_window_s=7200, recon_lag_s=0,
                      recon_slack_s=600, metrics_listen=f"127.0.0.1:{__import__('harness').free_port()}")
    d.start()
    c = d.client()
    wait_for(lambda: env.pg.query("SELECT count(*) FROM recon_runs WHERE state = 'done'")[0][0] == 1, timeout=30,
             what="the scheduled run")
    trig, = env.pg.query("SELECT trigger FROM recon_runs")[0]
    assert trig == "schedule"
    ds = open_discrepancies(c)
    assert [(x["kind"], x["gid"]) for x in ds] == [("debited_not_charged", gid)], ds
    assert "no record" in ds[0]["detail"]
    assert "event=discrepancies open=1 alert=reconciliation" in d.log_text()
    wait_for(lambda: c.ok("stats")["reconciliation"]["open"]["debited_not_charged"] == 1, timeout=10,
             what="the open count")
    import urllib.request
    with urllib.request.urlopen(f"http://{d.settings['metrics_listen']}/metrics", timeout=10) as r:
        text = r.read().decode()
    assert 'paycoord_discrepancies_open{kind="debited_not_charged"} 1' in text, text
    # A restart does not run the same window again.
    d.stop()
    d.start()
    time.sleep(3)
    assert env.pg.query("SELECT count(*) FROM recon_runs")[0][0] == 1
    c = d.client()
    r = settle(c, ds[0], "credit", reason="never charged: the customer's money goes back")
    assert r["result"]["outcome"] == "settled" and r["result"]["amount"] == 300, r
    assert c.ok("balance", account="acct-1")["balance"] == 5000
    audit_ok(c)
    check_invariants(env.pg, env.psp)


@pytest.mark.skipif(PROCESSOR != "generic", reason="generic list endpoint")
def test_one_run_at_a_time_across_nodes(env):
    bulk_create(env.psp, 300, "elsewhere-")
    d1 = env.daemon(recon_page_size=10, recon_page_pause_ms=100)
    w2 = os.path.join(env.workdir, "n2")
    os.makedirs(w2)
    d2 = Daemon(w2, env.pg, env.psp, node_id="t2")
    env.daemons.append(d2)
    d2.start()
    c1, c2 = d1.client(), d2.client()
    env.open_account(c1, "acct-1", balance=1000)
    pay(c1, "acct-1", 100, "n1")
    run = c1.ok("reconcile", **window())
    r = c2.call("reconcile", **window())
    assert r["error"]["code"] == "overloaded" and "another node" in r["error"]["message"], r
    wait_for(lambda: env.pg.query("SELECT state FROM recon_runs WHERE run_id = %s", (run["run_id"],))[0][0] == "done",
             timeout=60, what="node 1's run")
    assert env.pg.query("SELECT count(*), max(seen) FROM recon_runs")[0] == (1, 301)
    done = run_reconcile(c2, **window())     # now node 2 may
    assert done["node"] == "t2" and done["seen"] == 301 and done["matched"] == 1, done
    check_invariants(env.pg, env.psp)


@pytest.mark.skipif(PROCESSOR != "generic", reason="generic list endpoint")
def test_a_page_applied_already_is_not_applied_twice(env):
    """When the cursor moved on under the daemon (its own write whose answer
    was lost, or another driver), the page is refused (PCRCS), the daemon
    re-reads the run's cursor and carries on from there."""
    bulk_create(env.psp, 400, "elsewhere-")
    d = env.daemon(recon_page_size=20, recon_page_pause_ms=150)
    c = d.client()
    run_id = c.ok("reconcile", **window())["run_id"]
    wait_for(lambda: env.pg.query("SELECT pages FROM recon_runs WHERE run_id = %s", (run_id,))[0][0] >= 3,
             timeout=30, what="three pages")
    # "Another driver" applies the next page (20 records) behind the daemon's back.
    with env.pg.connect() as conn:
        while True:                       # as pc_recon_page does: only from the cursor it read
            cur, = conn.execute("SELECT cursor FROM recon_runs WHERE run_id = %s", (run_id,)).fetchone()
            nxt = f"psp_{int(cur[4:]) + 20:012d}"
            if conn.execute("UPDATE recon_runs SET cursor = %s, pages = pages + 1, seen = seen + 20, "
                            "not_ours = not_ours + 20 WHERE run_id = %s AND cursor = %s",
                            (nxt, run_id, cur)).rowcount == 1:
                break
    wait_for(lambda: env.pg.query("SELECT state FROM recon_runs WHERE run_id = %s", (run_id,))[0][0] == "done",
             timeout=60, what="the run")
    seen, pages = env.pg.query("SELECT seen, pages FROM recon_runs WHERE run_id = %s", (run_id,))[0]
    assert (seen, pages) == (400, 20), (seen, pages)
    assert "event=cursor_reread" in d.log_text()
    check_invariants(env.pg, env.psp)


@pytest.mark.skipif(PROCESSOR != "generic", reason="generic list endpoint")
def test_list_failures_are_retried_and_a_refusal_fails_the_run(env):
    pp = env.pspproxy()
    d = env.daemon(processor_url=pp.url)
    c = d.client()
    env.open_account(c, "acct-1", balance=1000)
    pay(c, "acct-1", 100, "f1")
    pp.add_rule("GET", "/v1/payments?", "answer", status=503, count=2)
    run = run_reconcile(c, timeout=60, **window())
    assert run["state"] == "done" and run["seen"] == 1 and run["matched"] == 1, run
    assert d.log_text().count("event=list_failed") == 2
    pp.add_rule("GET", "/v1/payments?", "answer", status=401, count=1)
    run = run_reconcile(c, timeout=30, **window())
    assert run["state"] == "failed" and "auth" in run["error"], run
    assert "event=failed" in d.log_text() and "alert=reconciliation" in d.log_text()
    run = run_reconcile(c, timeout=30, **window())     # the same window again: done
    assert run["state"] == "done", run
    check_invariants(env.pg, env.psp)


@pytest.mark.skipif(PROCESSOR != "generic", reason="generic list endpoint")
def test_sigterm_mid_run_stops_cleanly_and_the_run_resumes(env):
    bulk_create(env.psp, 600, "elsewhere-")
    d = env.daemon(recon_page_size=20, recon_page_pause_ms=100)
    c = d.client()
    run_id = c.ok("reconcile", **window())["run_id"]
    wait_for(lambda: env.pg.query("SELECT pages FROM recon_runs WHERE run_id = %s", (run_id,))[0][0] >= 3,
             timeout=30, what="three pages")
    d.stop()                              # exit code 0 (under ASan: no leak either)
    assert "event=stopped" in d.log_text()
    assert env.pg.query("SELECT state FROM recon_runs WHERE run_id = %s", (run_id,))[0][0] == "running"
    d.start()
    wait_for(lambda: env.pg.query("SELECT state FROM recon_runs WHERE run_id = %s", (run_id,))[0][0] == "done",
             timeout=60, what="the resumed run")
    assert env.pg.query("SELECT seen, pages FROM recon_runs WHERE run_id = %s", (run_id,))[0] == (600, 30)
    check_invariants(env.pg, env.psp)
