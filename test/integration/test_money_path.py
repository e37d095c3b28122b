"""Money-path regression tests (issue 9): one or more black-box tests per
defect found by the independent review and crash campaign. Each test says
what correct behaviour is; against the daemon before the fixes they fail for
the reason named in their docstring. Tests that need a daemon hook that does
not exist yet are skipped with the hook's name in the reason.

Tools: pgproxy.py (cuts, delays and loses PostgreSQL traffic on chosen
statements), pspproxy.py (answers chosen processor calls with a 4xx/409/5xx),
harness.prepare_debit (an in-doubt prepared debit made by hand, as a daemon
killed after PREPARE leaves it). Every test that moves money ends with
check_invariants (I1-I7)."""

import os
import re
import time

import pytest

from harness import (CONFLICT, CREATE_PATH, NEVER_SENT, PAYCOORD_BIN, PROCESSOR, Daemon, Postgres,
                     check_invariants, only_processors, prepare_debit, resolve_reviews, timed_call, wait_for)

FAST = {"recovery_interval_ms": 300, "processor_poll_ms": 50}


def row(env, key):
    r = env.pg.query("SELECT payment_id::text, gid, status FROM payments WHERE idempotency_key = %s", (key,))
    return r[0] if r else None


def prepared_gids(env):
    return [g for (g,) in env.pg.query("SELECT gid FROM pg_prepared_xacts")]


def settled(env):
    return env.pg.query("SELECT (SELECT count(*) FROM payments WHERE status = 'pending') + "
                        "(SELECT count(*) FROM pg_prepared_xacts)")[0][0] == 0


# ------------------------------------------------------------------ item 1

@pytest.mark.parametrize("legacy", [False, True], ids=["prepared_now", "prepared_by_0.1"])
def test_replays_of_in_doubt_keys_never_park_the_pool(env, legacy):
    """Item 1. More in-doubt keys retried than the pool has connections (the
    processor cannot tell recovery anything meanwhile). Each retry runs
    pc_pay_intent's INSERT ... ON CONFLICT, which waits on the prepared
    debit's row with no lock timeout: every pool connection parks, so
    balance/status/new payments/account_open hang, recovery (same pool) can
    never run even once the processor is back, and health still says ready.
    Correct: a replay never waits on a prepared transaction (answered from a
    read that cannot block: the stored row, pending, replayed); every other
    op answers within a bound; recovery settles the gids once the processor
    answers; health reports a stuck pool if it ever is."""
    # Recovery learns nothing: every way of asking fails. The debits are past
    # their deadline, so no adapter sends a create for them (Stripe would
    # replay one), while new payments' creates go through.
    env.psp.faults(fail_before_rate=1.0, fault_ops=["get", "cancel", "list"])
    d = env.daemon(max_recovery_attempts=100000, adyen_webhook_timeout_s=2, **FAST)
    c = d.client()
    n = d.settings["pool_size"] + 2
    keys = {}
    for i in range(n):
        env.open_account(c, f"ind-{i}", balance=5000)
        # prepared_by_0.1: debits a 0.1 daemon left behind (they also hold
        # the payment row's lock) are still answered without waiting.
        keys[f"k-ind-{i}"] = prepare_debit(env.pg, f"k-ind-{i}", f"ind-{i}", 700, legacy=legacy, deadline_ms=1)
    env.open_account(c, "free", balance=5000)
    retry_clients = []
    for i, key in enumerate(keys):
        rc = d.client(timeout=60)
        retry_clients.append((key, rc, rc.send("pay", account=f"ind-{i}", amount=700, currency="EUR",
                                               idempotency_key=key, wait_ms=0)))
    time.sleep(1.0)
    seen = {
        "health": timed_call(d, 3, "health"),
        "balance(free)": timed_call(d, 3, "balance", account="free"),
        "status(k-ind-0)": timed_call(d, 3, "status", idempotency_key="k-ind-0"),
        "pay(free)": timed_call(d, 8, "pay", account="free", amount=10, currency="EUR", idempotency_key="k-free"),
        "account_open(new)": timed_call(d, 3, "account_open", account="brand-new", currency="EUR"),
        "account_open(ind-0)": timed_call(d, 3, "account_open", account="ind-0", currency="EUR"),
    }
    stats1 = timed_call(d, 3, "stats")
    time.sleep(2.0)
    stats2 = timed_call(d, 3, "stats")
    health = timed_call(d, 3, "health")
    stuck = all(s and s["result"]["pool"]["busy"] == s["result"]["pool"]["size"] and s["result"]["pool"]["queued"] > 0
                for s in (stats1, stats2))
    hung = [k for k, v in seen.items() if v is None]
    assert not hung, (f"with {n} in-doubt keys retried (pool_size {d.settings['pool_size']}) these ops got no "
                      f"answer within their bound: {hung}; pool {stats2 and stats2['result']['pool']}")
    assert seen["pay(free)"]["ok"] and seen["pay(free)"]["result"]["status"] == "succeeded", seen["pay(free)"]
    assert seen["account_open(ind-0)"]["error"]["code"] == "account_exists", seen["account_open(ind-0)"]
    if stuck:
        assert health["result"]["ready"] is False or health["result"].get("pool") == "stuck", \
            f"pool stuck for 2 s (busy=size, queued>0) but health says {health['result']}"
    # Every retry is answered without waiting on the prepared debit: the
    # stored payment, pending, replayed.
    for key, rc, rid in retry_clients:
        rc.sock.settimeout(5)
        r = rc.wait(rid)
        assert r["ok"] and r["result"]["payment_id"] == keys[key][0] and r["result"]["replayed"] is True, (key, r)
        rc.close()
    # The processor answers again: recovery settles every in-doubt gid.
    env.psp.faults(fail_before_rate=0.0)
    if PROCESSOR == "adyen":
        # Adyen: each technical cancel finds nothing and no AUTHORISATION
        # comes: manual review; the operator checks the processor's list.
        wait_for(lambda: len([t for t in c.ok("prepared")["transactions"] if t["state"] == "review"]) == n,
                 timeout=30, what="every in-doubt gid in review")
        assert all(st is None for st, _ in resolve_reviews(c, env.psp).values())
    wait_for(lambda: settled(env), timeout=30, what="recovery settled the in-doubt gids")
    for key in keys:
        assert row(env, key)[2] == "declined"
    d.stop()
    check_invariants(env.pg, env.psp, answers={"k-free": "succeeded", **{k: "declined" for k in keys}})


@only_processors("generic", why="a 501 to cancel by key is the generic contract's")
def test_replay_of_key_left_prepared_by_cancel_unsupported(env):
    """Item 1 (the idempotency-window case). A key whose debit recovery must
    leave prepared for the whole idempotency window (the processor has no
    cancel by key) is retried: the retry's INSERT waits on the prepared row,
    without a lock timeout, for that whole window. account_open of its
    account waits the same way. Correct: the retry answers the stored payment
    (pending, replayed) at once; account_open answers account_exists."""
    env.psp.faults(cancel_unsupported=True)
    d = env.daemon(**FAST)
    c = d.client()
    env.open_account(c, "win", balance=5000)
    pid, gid = prepare_debit(env.pg, "k-win", "win", 300)
    wait_for(lambda: "reason=\"processor cannot cancel by key" in d.log_text() or
             "waiting out its idempotency window" in d.log_text(), timeout=10, what="recovery left the gid")
    r = timed_call(d, 4, "pay", account="win", amount=300, currency="EUR", idempotency_key="k-win", wait_ms=0)
    assert r is not None, "a retry of a key whose debit stays prepared got no answer in 4 s (blocked on the row)"
    assert r["ok"] and r["result"]["payment_id"] == pid and r["result"]["status"] == "pending" \
        and r["result"]["replayed"] is True, r
    r = timed_call(d, 4, "account_open", account="win", currency="EUR")
    assert r is not None, "account_open of an account with an in-doubt debit got no answer in 4 s"
    assert r["error"]["code"] == "account_exists", r
    assert timed_call(d, 4, "balance", account="win")["result"]["held"] == 300
    # Settle it by hand (the window is a day) and check the books.
    env.psp.faults(cancel_unsupported=False)
    wait_for(lambda: settled(env), timeout=20, what="gid settled once cancel works")
    d.stop()
    check_invariants(env.pg, env.psp, answers={"k-win": "declined"})


# ------------------------------------------------------------------ item 2

@pytest.mark.parametrize("order", ["conflict_first", "legit_first"])
def test_conflicting_reuse_racing_legit_retries(env, order):
    """Item 2. A finished key reused with another amount, pipelined with
    legitimate retries of it. The conflicting request creates an in-memory
    placeholder before its database lookup; a legitimate retry arriving
    meanwhile is compared with the placeholder and refused
    idempotency_conflict. Correct: every request is judged by its own
    parameters against the stored payment: legitimate ones get the stored
    result with replayed:true, conflicting ones idempotency_conflict."""
    d = env.daemon()
    c = d.client()
    env.open_account(c, "reuse", balance=10000)
    first = c.ok("pay", account="reuse", amount=100, currency="EUR", idempotency_key="k-reuse")
    assert first["status"] == "succeeded"
    legit = dict(account="reuse", amount=100, currency="EUR", idempotency_key="k-reuse")
    bad1 = dict(legit, amount=999)
    bad2 = dict(legit, amount=998)
    plan = [("bad", bad1), ("legit", legit), ("legit", legit), ("bad", bad2), ("legit", legit)]
    if order == "legit_first":
        plan = [plan[1], plan[0], plan[2], plan[3], plan[4]]
    wrong = []
    for rnd in range(3):
        # all on one connection, pipelined ...
        rids = [(kind, c.send("pay", **f)) for kind, f in plan]
        # ... and the same plan spread over several connections at once
        conns = [d.client() for _ in plan]
        crids = [(kind, cl, cl.send("pay", **f)) for (kind, f), cl in zip(plan, conns)]
        answers = [(kind, c.wait(rid)) for kind, rid in rids] + [(kind, cl.wait(rid)) for kind, cl, rid in crids]
        for cl in conns:
            cl.close()
        for kind, r in answers:
            if kind == "legit":
                ok = r.get("ok") and r["result"]["payment_id"] == first["payment_id"] and \
                    r["result"]["status"] == "succeeded" and r["result"].get("replayed") is True
            else:
                ok = not r.get("ok") and r["error"]["code"] == "idempotency_conflict"
            if not ok:
                wrong.append((rnd, kind, r.get("result") or r.get("error")))
    assert not wrong, f"{len(wrong)} answers judged by another request's parameters, e.g. {wrong[:3]}"
    d.stop()
    check_invariants(env.pg, env.psp, answers={"k-reuse": "succeeded"})


# ------------------------------------------------------------------ item 4

LONG_NUMBERS = [
    "1" + "0" * 70,
    "0." + "0" * 70 + "1",
    "-" + "1" * 70,
    "1" + "0" * 63,
    "1" * 64,
    "123456789012345678901234567890123456789012345678901234567890.5e10",
]


def test_long_numbers_are_invalid_request_never_internal(env):
    """Item 4. A number of 64 characters or more: with upstream cJSON up to
    1.7.18 (it parses numbers through a 64-byte buffer) the tree cannot be
    built and the answer is `internal` "out of memory". Debian's patched
    1.7.15 parses them, so this shows only with another cJSON build.
    Correct: the scanner rejects such numbers as invalid_request, in every
    field; never internal; nothing written."""
    d = env.daemon()
    c = d.client()
    env.open_account(c, "num", balance=1000)
    bad = []
    for num in LONG_NUMBERS:
        for field, tmpl in [("amount", '{"id":1,"op":"pay","account":"num","amount":%s,"currency":"EUR",'
                                        '"idempotency_key":"k-num"}'),
                            ("wait_ms", '{"id":2,"op":"pay","account":"num","amount":5,"currency":"EUR",'
                                        '"idempotency_key":"k-num2","wait_ms":%s}'),
                            ("credit amount", '{"id":3,"op":"credit","account":"num","amount":%s,'
                                              '"currency":"EUR","idempotency_key":"c-num"}'),
                            ("id", '{"id":%s,"op":"ping"}'),
                            ("unknown field", '{"id":5,"op":"ping","pad":%s}')]:
            c.send_raw((tmpl % num).encode() + b"\n")
            r = c.read_line()
            code = None if r.get("ok") else r["error"]["code"]
            if code == "internal" or (field != "unknown field" and code != "invalid_request"):
                bad.append((field, num[:20] + "...", code, r.get("error", {}).get("message")))
    assert not bad, f"long numbers not answered invalid_request: {bad[:4]}"
    assert env.pg.query("SELECT count(*) FROM payments")[0][0] == 0
    assert env.pg.query("SELECT count(*) FROM credits WHERE idempotency_key = 'c-num'")[0][0] == 0
    assert c.call("ping")["ok"]
    d.stop()
    check_invariants(env.pg, env.psp)


# ------------------------------------------------------------------ item 13

def test_replay_returns_the_first_answer(env):
    """Item 13. A replay of a succeeded payment must return the same result
    object as the first answer (plus replayed:true): processor_ref not null,
    same created_at and updated_at. Today a replay right after the answer
    reads the row before the batched processor_ref write (null), and the
    row's times come from the database's clock while the first answer's came
    from the daemon's."""
    d = env.daemon()
    c = d.client()
    env.open_account(c, "rep", balance=1000)
    a = c.ok("pay", account="rep", amount=100, currency="EUR", idempotency_key="k-rep")
    assert a["status"] == "succeeded" and a["processor_ref"]
    replays = {"at once": c.ok("pay", account="rep", amount=100, currency="EUR", idempotency_key="k-rep")}
    time.sleep(0.5)
    replays["after 0.5 s"] = c.ok("pay", account="rep", amount=100, currency="EUR", idempotency_key="k-rep")
    st = c.ok("status", idempotency_key="k-rep")
    d.stop()
    d.start()
    c = d.client()
    replays["after restart"] = c.ok("pay", account="rep", amount=100, currency="EUR", idempotency_key="k-rep")
    diffs = []
    for when, r in replays.items():
        assert r.get("replayed") is True
        body = {k: v for k, v in r.items() if k != "replayed"}
        for k in a:
            if body.get(k) != a[k]:
                diffs.append(f"{when}: {k} {body.get(k)!r} != first {a[k]!r}")
    for k in a:
        if st.get(k) != a[k]:
            diffs.append(f"status: {k} {st.get(k)!r} != first {a[k]!r}")
    assert not diffs, "replay differs from the first answer:\n  " + "\n  ".join(diffs)
    d.stop()
    check_invariants(env.pg, env.psp, answers={"k-rep": "succeeded"})


# ------------------------------------------------------------------ item 14

@only_processors("generic", "adyen", why="Stripe takes amounts of at most 8 digits (psp-sim enforces it): "
                 "amounts near 2^53 cannot reach it")
def test_amounts_and_balances_are_exact_integers(env):
    """Item 14. Balances and amounts in replies go through doubles today
    (cJSON_AddNumberToObject((double)...)): a balance of 2^53 + 1 is answered
    2^53. max_amount cannot exceed 10^15 (< 2^53), so a single amount above
    2^53 cannot be paid or credited; a balance reaches it with a few credits.
    Correct: every amount and balance in pay/status/credit/balance/prepared
    answers is the exact integer."""
    big = 9007199254740993                      # 2^53 + 1: not a double
    d = env.daemon(max_amount=10**15)
    c = d.client()
    c.ok("account_open", account="big", currency="EUR")
    parts = [10**15] * 9 + [big - 9 * 10**15]
    for i, amt in enumerate(parts):
        r = c.ok("credit", account="big", amount=amt, currency="EUR", idempotency_key=f"c-big-{i}")
        assert r["amount"] == amt and r["status"] == "applied"
    assert env.pg.query("SELECT balance FROM accounts WHERE id = 'big'")[0][0] == big
    got = {"balance after credits": (c.ok("balance", account="big")["balance"], big)}
    p = c.ok("pay", account="big", amount=10**15, currency="EUR", idempotency_key="k-big")
    got["pay amount"] = (p["amount"], 10**15)
    assert p["status"] == "succeeded", p
    got["status amount"] = (c.ok("status", idempotency_key="k-big")["amount"], 10**15)
    p2 = c.ok("pay", account="big", amount=1, currency="EUR", idempotency_key="k-big-1")
    assert p2["status"] == "succeeded"
    got["balance after pays"] = (c.ok("balance", account="big")["balance"], big - 10**15 - 1)
    # a pending debit: 'held' and the prepared listing
    env.psp.faults(latency_ms=1500)
    rid = c.send("pay", account="big", amount=999999999999999, currency="EUR", idempotency_key="k-big-held",
                 wait_ms=0)
    assert c.wait(rid)["result"]["status"] == "pending"
    got["held"] = (c.ok("balance", account="big")["held"], 999999999999999)
    txs = [t for t in c.ok("prepared")["transactions"] if t["account"] == "big"]
    got["prepared amount"] = (txs[0]["amount"] if txs else None, 999999999999999)
    env.psp.faults(latency_ms=0)
    wait_for(lambda: c.ok("status", idempotency_key="k-big-held")["status"] == "succeeded", timeout=10)
    got["balance at end"] = (c.ok("balance", account="big")["balance"], big - 10**15 - 1 - 999999999999999)
    wrong = {k: v for k, v in got.items() if v[0] != v[1] or type(v[0]) is not int}
    assert not wrong, f"inexact integers in replies (got, want): {wrong}"
    d.stop()
    check_invariants(env.pg, env.psp, answers={"k-big": "succeeded", "k-big-1": "succeeded",
                                               "k-big-held": "succeeded"})


# ------------------------------------------------------------------ item 3 / 16

def _terminate_all_backends(env):
    def cb(_text):
        env.pg.query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'paycoord' "
                     "AND backend_type = 'client backend' AND pid <> pg_backend_pid()")
    return cb


@pytest.mark.parametrize("how,wait_ms", [("cut_before", 0), ("cut_before", 200), ("lose_answer", 0),
                                         ("cut_after", 0), ("terminate", 200)])
def test_connection_dropped_during_phase1(env, how, wait_ms):
    """Items 3 and 16. The connection breaks during phase 1: before the
    phase-1 string reached the server (`cut_before`: nothing written), after
    it ran with its answer lost (`lose_answer`), while it still runs
    (`cut_after`), or every backend terminated as in a failover. Today the
    database check arms the clients' wait_ms timers before it knows whether
    anything was written: a client is told `pending` with a gid and
    payment_id, then the check finds nothing and the payment silently leaves
    memory (`status` of that payment_id: not_found; a retry of the key gets
    another gid). Correct: a client told `pending` names a payment that
    exists: `status` of its payment_id finds it (now and later), a retry of
    the key returns the same payment_id and gid; everything settles."""
    proxy = env.pgproxy()
    d = env.daemon(db_conninfo=proxy.conninfo, **FAST)
    c = d.client()
    env.open_account(c, "p1", balance=5000)
    # The database check is slow (as after a failover): the wait_ms timer runs first.
    proxy.add_rule("EXISTS (SELECT 1 FROM pg_prepared_xacts x WHERE x.gid = p.gid) FROM payments p", "delay",
                   count=None, delay_s=0.6)
    if how == "terminate":
        rule = proxy.add_rule("PREPARE TRANSACTION", "call", callback=_terminate_all_backends(env))
    else:
        rule = proxy.add_rule("PREPARE TRANSACTION", how)
    r = c.call("pay", account="p1", amount=100, currency="EUR", idempotency_key="k-p1", wait_ms=wait_ms)
    assert rule.fired.is_set()
    answers = {}
    if r["ok"]:
        res = r["result"]
        if res["status"] != "pending":
            answers["k-p1"] = res["status"]
        told = (res["payment_id"], res["gid"])
        st = c.call("status", payment_id=told[0])
        assert st["ok"], f"told {res['status']} for payment {told[0]}, but status says {st['error']}"
        rr = c.call("pay", account="p1", amount=100, currency="EUR", idempotency_key="k-p1", wait_ms=0)
        assert rr["ok"] and (rr["result"]["payment_id"], rr["result"]["gid"]) == told, \
            f"told {told} ({res['status']}); a retry of the key answered {rr.get('result') or rr.get('error')}"
    else:
        assert r["error"]["code"] == "unavailable", r
        told = None
    proxy.clear_rules()
    wait_for(lambda: settled(env), timeout=30, what="everything settled")
    if told:
        st = c.call("status", payment_id=told[0])
        assert st["ok"], f"told pending for payment {told[0]}; after settling, status says {st['error']}"
        answers["k-p1"] = st["result"]["status"]
    d.stop()
    check_invariants(env.pg, env.psp, answers=answers)


# ------------------------------------------------------------------ item 8 / 16

def test_final_answer_only_with_a_row_behind_it(env):
    """Items 8 and 16. The intent row is lost after phase 1 (a failover
    losing the intent's asynchronous commit, simulated by deleting the row
    just before the insufficient-funds settle reaches the server).
    pc_pay_settle then returns NULL and settle_cb maps that to a final
    `declined`: the client is told a final answer (not even the right one)
    with no row behind it; `status` says not_found. Correct: a missing row is
    an error (no final answer; unavailable or pending), never a final status
    that `status` cannot find afterwards."""
    proxy = env.pgproxy()
    d = env.daemon(db_conninfo=proxy.conninfo, **FAST)
    c = d.client()
    env.open_account(c, "lw", balance=10)

    def lose_intent(_text):
        env.pg.query("DELETE FROM payments WHERE idempotency_key = 'k-lw'")

    rule = proxy.add_rule("pc_pay_settle", "call", callback=lose_intent)
    r = c.call("pay", account="lw", amount=500, currency="EUR", idempotency_key="k-lw")
    assert rule.fired.is_set()
    answers = {}
    if r["ok"] and r["result"]["status"] != "pending":
        told = r["result"]["status"]
        st = c.call("status", idempotency_key="k-lw")
        st2 = c.call("status", payment_id=r["result"]["payment_id"])
        assert st["ok"] and st["result"]["status"] == told and st2["ok"], \
            f"client told final {told!r}; status by key: {st.get('error') or st['result']['status']}, " \
            f"by payment_id: {st2.get('error') or st2['result']['status']}"
        answers["k-lw"] = told
    d.stop()
    check_invariants(env.pg, env.psp, answers=answers)


def test_declined_answer_survives_lost_settle_and_crash(env):
    """Items 8 and 16, rollback path. The processor declines and the rollback
    commits, but the settle that records 'declined' never reaches the server,
    and the daemon dies. A decline is told only once it is durable: the client
    hears 'pending' meanwhile (never a 'declined' that could be lost); after
    the restart recovery asks the processor and records 'declined', and
    `status` says so from then on."""
    proxy = env.pgproxy()
    d = env.daemon(db_conninfo=proxy.conninfo, pay_wait_ms=1500, **FAST)
    c = d.client()
    env.open_account(c, "dl", balance=1000)
    proxy.add_rule("pc_pay_settle", "cut_before", count=None)
    r = c.ok("pay", account="dl", amount=100, currency="EUR", idempotency_key="k-dl", metadata={"sim": "decline"})
    assert r["status"] == "pending", r
    d.kill9()
    proxy.clear_rules()
    d.start()
    c = d.client()
    wait_for(lambda: settled(env), timeout=20, what="settled")
    st = c.call("status", idempotency_key="k-dl")
    assert st["ok"] and st["result"]["status"] == "declined", st
    d.stop()
    check_invariants(env.pg, env.psp, answers={"k-dl": "declined"})


# ------------------------------------------------------------------ item 10

def test_redebit_while_first_prepare_still_runs(env):
    """Item 10. Phase 1's connection breaks while its debit still waits for
    the account row (held by another session); the daemon's database check
    sees "pending, not prepared" and debits again; then the first backend
    gets the row and prepares the gid. The second debit times out on the
    prepared row, retries until queue_timeout_ms, then settles
    `account_locked` with pc_pay_settle, which has no lock timeout and waits
    forever behind the late prepared transaction: the payment stays in
    memory with funds held and recovery skips it as live. Correct: every
    statement on the payment path has a lock timeout, a payment never stays
    in memory without a timer that moves it on: it settles (either way) and
    the books balance."""
    proxy = env.pgproxy()
    d = env.daemon(db_conninfo=proxy.conninfo, db_lock_timeout_ms=3000, queue_timeout_ms=4000, **FAST)
    c = d.client()
    env.open_account(c, "rd", balance=5000)
    holder = env.pg.connect()
    try:
        holder.execute("BEGIN")
        holder.execute("UPDATE accounts SET updated_at = now() WHERE id = 'rd'")   # NO KEY UPDATE: the FK check passes
        # The cut may also come before the old backend ran the intent: the
        # fence then finds nothing written and the client is told
        # `unavailable`, nothing charged. Try again with a new key then.
        for attempt in range(4):
            key = f"k-rd{attempt}"
            rule = proxy.add_rule("PREPARE TRANSACTION", "cut_after")
            rid = c.send("pay", account="rd", amount=100, currency="EUR", idempotency_key=key, wait_ms=1000)
            assert rule.fired.wait(5)
            # The daemon fences the lost session first (terminates the backend
            # still waiting for the row), then reads: the intent without a debit.
            seen = wait_for(lambda: re.search(rf"key={key} event=fence row=(\d) status=(\w*) prepared=0",
                                              d.log_text()), timeout=10, what="the database check")
            if seen.group(1) == "1":
                assert seen.group(2) == "pending", seen.group(0)
                break
            r = c.wait(rid)
            assert r["ok"] is False and r["error"]["code"] == "unavailable", r
            assert "nothing was charged" in r["error"]["message"]
        else:
            pytest.fail("the cut never came after the intent")
        time.sleep(0.3)
        holder.execute("ROLLBACK")             # the first backend's debit would go first, and prepare
    finally:
        holder.close()                         # never leave a transaction open for the next test
    r = c.wait(rid)
    assert r["ok"], r
    answers = {}
    try:
        wait_for(lambda: settled(env), timeout=40, what="the payment settled")
    finally:
        st = timed_call(d, 5, "status", idempotency_key=key)
        stats = timed_call(d, 5, "stats")
    assert st and st["ok"] and st["result"]["status"] != "pending", st
    assert stats["result"]["in_flight"] == 0, stats["result"]
    answers[key] = st["result"]["status"]
    d.stop()
    check_invariants(env.pg, env.psp, answers=answers)


# ------------------------------------------------------------------ item 15

@pytest.mark.parametrize("outcome", ["declined", pytest.param("charged", marks=only_processors(
    "generic", why="the operator's refund at the end is the generic contract's call"))])
def test_phase2_finds_neither_transaction_nor_row(env, outcome):
    """Item 15. While the processor decides, the prepared debit and its row
    vanish (a lost write: a failover that lost them, simulated by ROLLBACK
    PREPARED and DELETE from outside). COMMIT/ROLLBACK PREPARED answers 42704
    and the phase-2 check's SELECT finds no row: today phase2_check_cb retries
    forever without a log line, the payment never leaves memory, its account
    stays held (every later pay on it waits, then `overloaded`) until a
    restart. Correct: decide from the processor's answer, log an alert, flag
    the gid for reconciliation (recovery_state.review), release the account:
    a later payment on it succeeds."""
    d = env.daemon(queue_timeout_ms=3000, **FAST)
    c = d.client()
    env.open_account(c, "lost", balance=5000)
    meta = {"sim": "decline" if outcome == "declined" else "succeed", "sim_latency_ms": "1500"}
    rid = c.send("pay", account="lost", amount=100, currency="EUR", idempotency_key="k-lost", wait_ms=500,
                 metadata=meta)
    wait_for(lambda: prepared_gids(env), timeout=5, what="prepared")
    gid = prepared_gids(env)[0]
    with env.pg.connect() as x:
        x.execute(f"ROLLBACK PREPARED '{gid}'")
        x.execute("DELETE FROM payments WHERE gid = %s", (gid,))
    first = c.wait(rid)
    assert first["ok"] and first["result"]["status"] == "pending"
    time.sleep(2.0)                             # the processor has answered; phase 2 hits 42704
    later = timed_call(d, 8, "pay", account="lost", amount=50, currency="EUR", idempotency_key="k-after")
    flag = env.pg.query("SELECT review FROM recovery_state WHERE gid = %s", (gid,))
    alert = [ln for ln in d.log_text().splitlines() if gid in ln and "alert=" in ln]
    # Both payments leave memory once their last row write lands (a
    # succeeded one right after its batched status write).
    deadline = time.monotonic() + 3
    while True:
        stats = timed_call(d, 3, "stats")
        if stats["result"]["in_flight"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    problems = []
    if not (later and later["ok"] and later["result"]["status"] == "succeeded"):
        problems.append(f"a later pay on the account: {later and (later.get('error') or later['result']['status'])}")
    if flag != [(True,)]:
        problems.append(f"gid not flagged for reconciliation (recovery_state: {flag})")
    if not alert:
        problems.append("no alert log line names the gid")
    if stats["result"]["in_flight"] != 0:
        problems.append(f"payment still in memory (in_flight={stats['result']['in_flight']})")
    assert not problems, "; ".join(problems)
    if outcome == "charged":
        st, _ = env.psp.refund(gid)                   # the operator reconciles: refund the charge
        assert st == 200
    d.stop()
    check_invariants(env.pg, env.psp, answers={"k-after": "succeeded"})


# ------------------------------------------------------------------ item 5

def test_forced_recover_does_not_count_as_an_attempt(env):
    """Item 5. `recover` run 60 times in a row against an in-doubt gid whose
    processor is unreachable (connections refused: no answer at all). Today
    every forced pass counts an attempt, so the gid reaches manual review
    after max_recovery_attempts passes, in seconds. Correct: attempts count
    processor answers (or at most one per backoff period), not passes: the
    gid stays in_doubt; once the processor is back recovery settles it."""
    d = env.daemon(max_recovery_attempts=20, recovery_interval_ms=60000, processor_connect_timeout_ms=200)
    c = d.client()
    env.open_account(c, "rc", balance=1000)
    env.psp.faults(refuse_connections=True)
    pid, gid = prepare_debit(env.pg, "k-rc", "rc", 100)
    for _ in range(60):
        c.ok("recover")
    t = [t for t in c.ok("prepared")["transactions"] if t["gid"] == gid][0]
    assert t["state"] == "in_doubt", \
        f"after 60 forced passes with no processor answer the gid is {t['state']} (attempts={t['attempts']})"
    env.psp.faults(refuse_connections=False)
    wait_for(lambda: c.ok("recover") and settled(env), timeout=20, what="settled once the processor answers")
    d.stop()
    check_invariants(env.pg, env.psp, answers={"k-rc": NEVER_SENT})


# ------------------------------------------------------------------ item 6

def _asan_bin():
    """An ASan build of the daemon: PAYCOORD_BIN itself when PAYCOORD_BUILD is
    a sanitizer build (run-tests.sh), else PAYCOORD_ASAN_BIN or
    $PAYCOORD_SRC/build-asan; None when there is none."""
    import harness
    try:
        with open(os.path.join(harness.BUILD, "CMakeCache.txt")) as f:
            if "PAYCOORD_SANITIZE:BOOL=ON" in f.read():
                return harness.PAYCOORD_BIN
    except OSError:
        pass
    cand = os.environ.get("PAYCOORD_ASAN_BIN") or os.path.join(harness.SRC, "build-asan", "coordinator", "paycoord")
    return cand if os.path.exists(cand) else None


ASAN_BIN = _asan_bin()


@pytest.mark.parametrize("build,n_prep,n_pend", [
    ("daemon", 1500, 500),
    pytest.param("asan", 1500, 500, marks=pytest.mark.skipif(
        ASAN_BIN is None or os.path.realpath(ASAN_BIN) == os.path.realpath(PAYCOORD_BIN),
        reason="no separate ASan build (PAYCOORD_ASAN_BIN or build-asan), or PAYCOORD_BIN is it")),
    pytest.param("asan", 300, 40000, marks=pytest.mark.skipif(ASAN_BIN is None, reason="no ASan build")),
])
@only_processors("generic", "stripe", why="its 'pending' rows without a debit never reached the processor: past "
                 "their deadline Adyen's technical cancel finds nothing and each goes to manual review")
def test_recovery_pass_database_killed_mid_pass(env, build, n_prep, n_pend):
    """Item 6. A recovery pass over many items (prepared debits plus pending
    rows without a debit), the processor slow, PostgreSQL killed (immediate
    stop) mid-pass. Recovery fires callbacks synchronously when a query
    cannot be sent (query_or_log, item_start's failure paths) and item_done
    -> pass_pump re-enters itself once per item: with the pool down the stack
    grows with the number of items left (item_start -> item_leave ->
    item_done -> pass_pump -> item_start ...), and outer pass_pump frames may
    read the pass after pass_finish freed it. Correct: the daemon survives
    (ASan clean on the ASan build: PAYCOORD_ASAN_BIN or build-asan) and once
    the database is back every item settles. 2,000 items (the issue's size)
    do not overflow today; 40,000 pending rows overflow the stack of the ASan
    build."""
    binpath = ASAN_BIN if build == "asan" else PAYCOORD_BIN
    pg2 = Postgres(max_prepared=n_prep + 100)
    pg2.start()
    try:
        pg2.migrate()
        with pg2.connect() as x:
            x.execute("INSERT INTO accounts (id, currency) SELECT 'm-' || i, 'EUR' FROM generate_series(1, %s) i",
                      (n_prep,))
            x.execute("SELECT pc_credit(gen_random_uuid(), 'c-m-' || i, 'm-' || i, 1000, 'EUR', NULL, true) "
                      "FROM generate_series(1, %s) i", (n_prep,))
            x.execute("SELECT pc_pay_intent(u, 'k-mp-' || i, 'm-' || (1 + i %% %s), 10, 'EUR', NULL, NULL, "
                      "'pc:t1:' || replace(u::text, '-', ''), 't1', 60000) "
                      "FROM (SELECT gen_random_uuid() u, i FROM generate_series(1, %s) i) s", (n_prep, n_pend))
        for i in range(1, n_prep + 1):
            prepare_debit(pg2, f"k-m-{i}", f"m-{i}", 10)
        env.psp.faults(latency_ms=300)
        d = Daemon(env.workdir, pg2, env.psp, recovery_interval_ms=600000, processor_timeout_ms=5000,
                   pool_size=8, log_level="notice")
        if binpath:
            d.bin = binpath
        env.daemons.append(d)
        d.start(wait_ready=False)
        wait_for(lambda: sum(env.psp.counters()["requests"].values()) > 0, timeout=60, what="recovery pass started")
        time.sleep(0.5)
        pg2.kill()
        time.sleep(3.0)
        assert d.proc.poll() is None, \
            f"daemon died with the database down mid-pass: rc={d.proc.returncode}\n{_asan_summary(d)}"
        env.psp.faults(latency_ms=0)
        pg2.start()
        c = wait_for(lambda: _client_or_none(d), timeout=10, what="daemon socket")

        def all_settled():
            assert d.proc.poll() is None, f"daemon died: rc={d.proc.returncode}\n{_asan_summary(d)}"
            r = c.call("recover")
            return r.get("ok") and pg2.query(
                "SELECT (SELECT count(*) FROM payments WHERE status = 'pending') + "
                "(SELECT count(*) FROM pg_prepared_xacts)")[0][0] == 0
        wait_for(all_settled, timeout=600, interval=0.5, what=f"all {n_prep + n_pend} items settled")
        assert "ERROR: AddressSanitizer" not in d.log_text() and "runtime error:" not in d.log_text(), d.tail(40)
        d.stop()
        check_invariants(pg2, env.psp)
    finally:
        pg2.destroy()


def _asan_summary(d):
    lines = d.log_text().splitlines()
    keep = [ln for ln in lines if "AddressSanitizer" in ln or "SUMMARY" in ln or "runtime error" in ln]
    return "\n".join(keep[:6]) or d.tail(20)


def _client_or_none(d):
    try:
        return d.client(timeout=30)
    except OSError:
        return None


# ------------------------------------------------------------------ item 7

def test_review_gids_count_against_admission(env):
    """Item 7. Manual-review gids still hold prepared-transaction slots, but
    recovery's listing excludes them and D->orphans is overwritten from it:
    health/stats `prepared` forget them and admission lets new payments take
    their slots, beyond our share of max_prepared_transactions. Correct:
    count this node's prepared transactions from the database: `prepared`
    includes the review gids and new payments beyond the share are refused
    `overloaded` (nothing charged)."""
    # share = 1% of the session cluster's 1000 = 10 prepared transactions
    d = env.daemon(prepared_share_percent=1, **FAST)
    c = d.client()
    n_review, n_new = 6, 8
    review = []
    import uuid
    for i in range(n_review):
        env.open_account(c, f"rv-{i}", balance=1000)
        # flagged before it is prepared: a recovery pass in between must not
        # settle it (recovery runs every 300 ms here)
        pid = uuid.uuid4()
        gid = f"pc:t1:{pid.hex}"
        with env.pg.connect() as x:
            x.execute("INSERT INTO recovery_state (gid, payment_id, attempts, last_error, review) "
                      "VALUES (%s, %s, 1, 'test: left for a person', true)", (gid, pid))
        assert prepare_debit(env.pg, f"k-rv-{i}", f"rv-{i}", 10, payment_id=str(pid)) == (str(pid), gid)
        review.append(gid)
    for i in range(n_new):
        env.open_account(c, f"nw-{i}", balance=1000)
    c.ok("recover")
    h = c.ok("health")
    stats = c.ok("stats")
    env.psp.faults(latency_ms=2000)
    conns = [d.client() for _ in range(n_new)]
    rids = [(cl, cl.send("pay", account=f"nw-{i}", amount=10, currency="EUR", idempotency_key=f"k-nw-{i}",
                         wait_ms=0)) for i, cl in enumerate(conns)]
    answers = [cl.wait(rid) for cl, rid in rids]
    over = [a for a in answers if not a["ok"] and a["error"]["code"] == "overloaded"]
    ours = len([g for g in prepared_gids(env) if g.startswith("pc:t1:")])
    env.psp.faults(latency_ms=0)
    limit = stats["prepared_limit"]
    problems = []
    if h["prepared"] < n_review:
        problems.append(f"health.prepared={h['prepared']} with {n_review} review gids prepared")
    if ours > limit:
        problems.append(f"{ours} prepared transactions of this node at once, share is {limit}")
    if len(over) < n_review + n_new - limit:
        problems.append(f"only {len(over)} of {n_new} new payments refused overloaded "
                        f"({n_review} review gids, share {limit})")
    # Settle everything: the new payments finish; a person resolves the review gids.
    wait_for(lambda: env.pg.query("SELECT count(*) FROM payments WHERE status = 'pending' "
                                  "AND idempotency_key LIKE 'k-nw-%'")[0][0] == 0, timeout=30)
    for gid in review:
        c.ok("resolve", gid=gid, action="rollback", reason="test: never sent to the processor")
    for cl in conns:
        cl.close()
    assert not problems, "; ".join(problems)
    d.stop()
    check_invariants(env.pg, env.psp)


# ------------------------------------------------------------------ item 9

@pytest.mark.parametrize("first", ["5xx_after_charge", "lost_after_charge"])
@pytest.mark.parametrize("status", [400, 422])
def test_4xx_after_unknown_outcome_is_not_a_decline(env, first, status):
    """Item 9. The first create charged but its outcome was unknown to us (a
    500 after processing, or the answer lost); the retried create (same
    gid) is answered 400/422. Today `invalid` is taken as a decline: ROLLBACK
    PREPARED, the client told `declined`, while the processor holds the
    charge (money lost, I2). Correct: after an unknown outcome an `invalid`
    answer is no proof: ask by gid; the end state matches the processor."""
    pp = env.pspproxy()
    if first == "5xx_after_charge":
        pp.add_rule("POST", CREATE_PATH, "forward_then", status=500)
    else:
        pp.add_rule("POST", CREATE_PATH, "forward_drop")
    pp.add_rule("POST", CREATE_PATH, "answer", status=status)
    d = env.daemon(processor_url=pp.url, processor_retries=2, circuit_failures=1000, **FAST)
    c = d.client()
    env.open_account(c, "u4", balance=1000)
    r = c.ok("pay", account="u4", amount=100, currency="EUR", idempotency_key="k-u4")
    assert env.psp.counters()["succeeded"] == 1            # the processor charged it
    wait_for(lambda: settled(env), timeout=20)
    st = c.ok("status", idempotency_key="k-u4")
    assert r["status"] != "declined" and st["status"] == "succeeded", \
        f"processor charged {r['gid']}; after a {status} to the retry the client was told {r['status']}, " \
        f"the row says {st['status']}"
    d.stop()
    check_invariants(env.pg, env.psp, answers={"k-u4": r["status"]} if r["status"] != "pending" else None)


# ------------------------------------------------------------------ items 11 / 12

@only_processors("generic", "stripe", why="Adyen documents no idempotency-conflict answer: its adapter never "
                 "answers a conflict")
def test_review_flag_durable_before_payment_leaves_memory(env):
    """Item 12. The processor answers the daemon's create with 409
    idempotency_conflict: the gid goes to manual review and the payment leaves
    memory, its clients told `pending`. The review flag is written
    asynchronously (here: slowly), so a recovery pass that starts meanwhile
    treats the gid as an ordinary in-doubt one and settles it by itself.
    Correct: the flag is durable before the payment leaves memory (and
    before its clients are answered); recovery never settles a gid flagged or
    being flagged: it stays prepared until a person resolves it."""
    proxy = env.pgproxy()
    pp = env.pspproxy()
    pp.add_rule("POST", CREATE_PATH, "forward_then", status=CONFLICT[0], body=CONFLICT[1])
    d = env.daemon(db_conninfo=proxy.conninfo, processor_url=pp.url, **FAST)
    c = d.client()
    env.open_account(c, "cf", balance=1000)
    proxy.add_rule("INSERT INTO recovery_state", "delay", delay_s=2.0)
    r = c.ok("pay", account="cf", amount=100, currency="EUR", idempotency_key="k-cf")
    gid = r["gid"]
    flag_at_answer = env.pg.query("SELECT review FROM recovery_state WHERE gid = %s", (gid,))
    rec = c.ok("recover")                       # a pass right after the payment left memory
    time.sleep(2.5)
    state = env.pg.query("SELECT status FROM payments WHERE gid = %s", (gid,))[0][0]
    still_prepared = gid in prepared_gids(env)
    flag = env.pg.query("SELECT review FROM recovery_state WHERE gid = %s", (gid,))
    problems = []
    if r["status"] != "pending":
        problems.append(f"client told {r['status']}")
    if flag_at_answer != [(True,)]:
        problems.append(f"review flag not durable when the client was answered ({flag_at_answer})")
    if not still_prepared:
        problems.append(f"recovery settled the gid meant for review (recover: {rec}; row now {state})")
    if flag != [(True,)]:
        problems.append(f"review flag at the end: {flag}")
    # A person resolves it from the processor's record (it charged).
    if still_prepared:
        c.ok("resolve", gid=gid, action="commit", reason="test: processor shows the charge")
    assert not problems, "; ".join(problems)
    d.stop()
    check_invariants(env.pg, env.psp)


@only_processors("generic", why="the charge is made by hand with the generic contract's create")
def test_resolve_racing_recovery_on_the_same_gid(env):
    """Item 11. Recovery is asking the processor about an in-doubt gid (slow
    answer) when a person runs `resolve rollback` on it. The resolve wins
    the race; recovery then gets `succeeded`, COMMIT PREPARED answers 42704
    and recovery's "does not exist" path only logs: the processor holds a
    charge whose debit was rolled back, and no alert says so. Correct: a
    resolve does not race recovery on the same gid (refused while recovery
    drives it, or serialized behind it), and recovery's 42704 path re-reads
    the row, compares it with the processor's answer and alerts on a
    mismatch."""
    d = env.daemon(recovery_interval_ms=600000, processor_poll_ms=50)
    c = d.client()
    env.open_account(c, "rs", balance=1000)
    pid, gid = prepare_debit(env.pg, "k-rs", "rs", 100)
    st, body = env.psp.create(gid, 100, "EUR", "rs")            # the processor charged it
    assert st in (200, 201) and body["status"] == "succeeded", body
    env.psp.faults(latency_ms=1500, fault_ops=["get"])
    c2 = d.client()
    rid = c.send("recover")
    time.sleep(0.5)
    res = c2.call("resolve", gid=gid, action="rollback", reason="test: racing recovery")
    rec = c.wait(rid)
    env.psp.faults(latency_ms=0)
    wait_for(lambda: gid not in prepared_gids(env), timeout=10)
    status = env.pg.query("SELECT status FROM payments WHERE gid = %s", (gid,))[0][0]
    alert = [ln for ln in d.log_text().splitlines() if gid in ln and "alert=" in ln]
    assert res.get("ok") is not True or res["result"]["outcome"] != "rolled_back" or alert, \
        f"resolve rolled back {gid} while recovery was settling it (recover: {rec}); the processor charged it, " \
        f"the row is {status}, and no alert names the gid"
    assert status == "succeeded", f"processor charged {gid}, row {status} (resolve: {res})"
    d.stop()
    check_invariants(env.pg, env.psp, answers={"k-rs": "succeeded"})


# ------------------------------------------------------------------ item 14 (timers)

def test_failed_timer_never_strands_a_payment(env):
    """Item 14 (second half). A payment must never sit in memory without a
    timer that moves it on. The daemon allocates every timer a payment will
    need when it admits it, so the one place an allocation can fail is
    admission: the pay is refused `internal` with nothing written, and the
    account takes the next payment at once. (Arming an allocated timer cannot
    fail short of a broken event loop, which aborts the daemon: recovery then
    settles whatever was in flight.)"""
    d = env.daemon(env={"PAYCOORD_FAILPOINT": "timer_alloc_fail", "PAYCOORD_FAILPOINT_KEY": "k-tm"}, **FAST)
    c = d.client()
    env.open_account(c, "tm", balance=1000)
    r = c.call("pay", account="tm", amount=100, currency="EUR", idempotency_key="k-tm")
    assert r["ok"] is False and r["error"]["code"] == "internal" and "nothing was charged" in r["error"]["message"], r
    assert "event=timer_alloc_failed" in d.log_text()
    assert env.pg.query("SELECT count(*) FROM payments WHERE idempotency_key = 'k-tm'")[0][0] == 0
    assert c.ok("stats")["in_flight"] == 0
    assert c.ok("pay", account="tm", amount=10, currency="EUR", idempotency_key="k-tm2")["status"] == "succeeded"
    assert c.ok("balance", account="tm")["balance"] == 990
    d.stop()
    check_invariants(env.pg, env.psp, answers={"k-tm2": "succeeded"})


# ------------------------------------------------------------------ found by the documentation review

def test_rate_limited_create_is_not_resent_after_the_deadline(env):
    """A create answered 429 again and again was retried without bound, past
    the payment deadline (the processor's idempotency window and recovery's
    cancel-by-key rules count from it). Now the retries stop at the
    deadline: the daemon cancels instead of sending the create again. The
    generic contract's cancel by key (and Stripe, once its search is
    conclusive) ends it declined `canceled`, nothing charged. Adyen's
    technical cancel finds nothing and no webhook decides: a 429 proves
    nothing, so the gid goes to manual review with its debit held, and a
    person rolls it back."""
    env.psp.faults(rate_limit_rate=1.0, retry_after_s=1, fault_ops=["create"])
    d = env.daemon(payment_deadline_ms=3000, pay_wait_ms=500, **FAST)
    c = d.client()
    env.open_account(c, "rl", balance=1000)
    r = c.call("pay", account="rl", amount=100, currency="EUR", idempotency_key="k-rl")
    assert r["ok"] and r["result"]["status"] == "pending", r
    if PROCESSOR == "adyen":
        wait_for(lambda: "event=processor_stuck" in d.log_text(), timeout=30,
                 what="the Adyen payment handed to review")
    else:
        wait_for(lambda: c.ok("status", idempotency_key="k-rl")["status"] != "pending", timeout=30,
                 what="the payment settled after its deadline")
    assert "event=create_retry_past_deadline" in d.log_text()
    limited = env.psp.counters()["rate_limited"]
    assert limited <= 5, limited                       # about one create a second until the deadline
    time.sleep(2)
    assert env.psp.counters()["rate_limited"] == limited   # and none after
    if PROCESSOR == "adyen":
        gid = env.pg.query("SELECT gid FROM payments WHERE idempotency_key = 'k-rl'")[0][0]
        assert c.ok("status", idempotency_key="k-rl")["status"] == "pending"
        c.ok("resolve", gid=gid, action="rollback", reason="test: Adyen shows no payment under this reference")
    st = c.ok("status", idempotency_key="k-rl")
    code = "resolved_manually" if PROCESSOR == "adyen" else "canceled"
    assert (st["status"], st["decline_code"]) == ("declined", code), st
    assert c.ok("balance", account="rl")["balance"] == 1000
    d.stop()
    env.psp.faults(rate_limit_rate=0)
    check_invariants(env.pg, env.psp, answers={"k-rl": "declined"})


def test_debit_taken_after_the_deadline_never_reaches_the_processor(env):
    """Phase 1 waited for a locked account row until past the payment
    deadline; the debit was then prepared and the first create sent after
    the deadline. Now a debit prepared after the deadline is rolled back
    without asking the processor: declined `deadline_exceeded`."""
    d = env.daemon(payment_deadline_ms=2000, db_lock_timeout_ms=6000, queue_timeout_ms=20000, **FAST)
    c = d.client()
    env.open_account(c, "dl", balance=1000)
    holder = env.pg.connect()
    try:
        holder.execute("BEGIN")
        holder.execute("UPDATE accounts SET updated_at = now() WHERE id = 'dl'")
        rid = c.send("pay", account="dl", amount=100, currency="EUR", idempotency_key="k-dl", wait_ms=8000)
        time.sleep(2.8)                  # the debit waits on the row past the deadline
        holder.execute("ROLLBACK")
    finally:
        holder.close()
    r = c.wait(rid)
    assert r["ok"] and (r["result"]["status"], r["result"]["decline_code"]) == ("declined", "deadline_exceeded"), r
    assert "event=deadline_before_create" in d.log_text()
    gid = row(env, "k-dl")[1]
    assert env.psp.get(gid)[0] == 404                  # the processor was never asked
    assert c.ok("balance", account="dl")["balance"] == 1000
    d.stop()
    check_invariants(env.pg, env.psp, answers={"k-dl": "declined"})


def test_first_recovery_pass_runs_even_if_the_pool_is_late(env):
    """The first recovery pass (which readiness waits for) failed to start
    when the node lock's session connected before recovery's own pool, and
    was tried again only one recovery_interval_ms later: with a long
    interval the daemon stayed not ready. Now a pass that cannot start is
    retried within 100 ms, backing off to the interval. (The race showed in
    about 1 start in 30; this test starts the daemon 12 times.)"""
    for i in range(12):
        d = env.daemon(start=False, recovery_interval_ms=600000)
        t0 = time.monotonic()
        d.start()                                      # waits for ready (15 s at most)
        assert time.monotonic() - t0 < 10
        d.stop()
    check_invariants(env.pg, env.psp, answers={})
