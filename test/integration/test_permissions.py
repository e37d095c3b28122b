"""Least privilege on the socket (permission classes read/pay/credit/admin,
granted by uid and gid lists): every op run by peers of other uids and gids
(fork + setgid/setuid) is allowed or refused exactly as configured; a refused
request writes nothing; refusals are answered `forbidden` naming the op and
the missing class, logged (rate limited) and counted by op in /metrics and
stats; a SIGHUP that revokes a class applies to the next request while
requests admitted before it finish normally. Each test ends with the money
invariants."""

import json
import os
import signal
import urllib.request

from harness import Client, check_invariants, wait_for
from test_operations import free_port

ACCT = "acct-perm"
CLASS = {"ping": "read", "status": "read", "balance": "read", "pay": "pay", "credit": "credit",
         "account_open": "admin", "prepared": "admin", "resolve": "admin", "recover": "admin",
         "stats": "admin", "health": "admin", "reconcile_status": "admin", "discrepancies": "admin",
         "settle_discrepancy": "admin", "audit": "admin"}
PERM_KEYS = ("admin_uids", "admin_gids", "credit_uids", "credit_gids", "pay_uids", "pay_gids",
             "read_uids", "read_gids", "client_uids", "client_gids")
NO_GID = "pc:t1:" + "0" * 32          # a well-formed gid of this node that is not prepared


def all_ops(tag):
    """One request of every op; the writing ones use keys unique to tag."""
    return [
        ("ping", {}),
        ("status", {"idempotency_key": "seed-1"}),
        ("balance", {"account": ACCT}),
        ("pay", {"account": ACCT, "amount": 1, "currency": "EUR", "idempotency_key": f"pay-{tag}"}),
        ("credit", {"account": ACCT, "amount": 7, "currency": "EUR", "idempotency_key": f"credit-{tag}"}),
        ("account_open", {"account": f"acct-{tag}", "currency": "EUR"}),
        ("prepared", {}),
        ("resolve", {"gid": NO_GID, "action": "rollback", "reason": "permission test"}),
        ("recover", {}),
        ("stats", {}),
        ("health", {}),
        ("reconcile_status", {}),
        ("discrepancies", {}),
        ("settle_discrepancy", {"discrepancy_id": 999999, "action": "accept", "reason": "permission test"}),
        ("audit", {}),
    ]


def become(uid, gid):
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


def as_peer(d, uid, gid, requests):
    """Run requests (op, fields) one after the other on one connection as
    uid/gid; returns (pid, [reply, ...])."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        out = []
        try:
            os.close(r)
            become(uid, gid)
            c = Client(d.socket, timeout=30)
            for op, fields in requests:
                out.append(c.call(op, **fields))
        except BaseException as e:       # noqa: B902 - report anything to the parent
            out.append({"child_error": repr(e)})
        finally:
            os.write(w, json.dumps(out).encode())
            os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    replies = json.loads(data)
    assert not any("child_error" in x for x in replies), replies
    return pid, replies


def snapshot(pg):
    return dict(zip(("payments", "credits", "accounts", "ledger", "resolutions"), pg.query(
        "SELECT (SELECT count(*) FROM payments), (SELECT count(*) FROM credits), "
        "(SELECT count(*) FROM accounts), (SELECT count(*) FROM ledger), "
        "(SELECT count(*) FROM resolutions)")[0]))


def reload(d, **grants):
    """Rewrite the permission keys (others unchanged) and SIGHUP; wait until applied."""
    for k in PERM_KEYS:
        d.settings[k] = grants.get(k, "")
    d.write_config()
    n = d.log_text().count("event=reloaded")
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: d.log_text().count("event=reloaded") > n, what="reload applied")


def metrics(port):
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, val = line.rsplit(" ", 1)
            out[name] = float(val)
    return out


def permission_daemon(env, **settings):
    os.chmod(env.workdir, 0o755)               # let other uids reach the socket
    port = free_port()
    d = env.daemon(listen_mode="0666", metrics_listen=f"127.0.0.1:{port}",
                   recovery_interval_ms=86400000, **settings)
    return d, port


# (grants, [(uid, gid, classes held)]): R read, P pay, C credit, A admin.
MATRIX = [
    ({}, [(65534, 65534, "RP"), (40001, 40001, "RP")]),                        # 0.1 defaults, minus credit
    ({"credit_uids": "65534"}, [(65534, 65534, "RPC"), (40001, 40001, "RP")]),
    ({"pay_uids": "40001", "credit_uids": "65534"},
     [(65534, 65534, "RC"), (40001, 40001, "RP"), (40003, 40003, "")]),
    ({"read_gids": "65534", "pay_uids": "40001"},
     [(40002, 65534, "R"), (65534, 65534, "R"), (40003, 40003, "")]),
    ({"pay_gids": "65534", "credit_gids": "65534"},
     [(40002, 65534, "RPC"), (40001, 40001, ""), (65534, 40004, "")]),
    ({"admin_gids": "65534", "pay_uids": "40001"},
     [(40002, 65534, "RPCA"), (40001, 40001, "RP"), (40003, 40003, "")]),
    ({"admin_uids": "40003", "read_uids": "40001"},
     [(40003, 40003, "RPCA"), (40001, 40001, "R"), (40002, 65534, "")]),
    ({"client_uids": "40001", "client_gids": "65534"},                         # the 0.1 names: pay, not credit
     [(40001, 40001, "RP"), (40002, 65534, "RP"), (40003, 40003, "")]),
]


def test_every_op_allowed_or_refused_as_configured(env):
    d, port = permission_daemon(env)
    c = d.client()
    env.open_account(c, ACCT, balance=1_000_000)
    assert c.ok("pay", account=ACCT, amount=10, currency="EUR", idempotency_key="seed-1")["status"] == "succeeded"
    answers = {"seed-1": "succeeded"}
    refused = {op: 0 for op in CLASS}
    runs = 0
    for grants, peers in MATRIX:
        reload(d, **grants)
        for uid, gid, held in peers:
            runs += 1
            tag = f"u{uid}-g{gid}-{runs}"
            before, creates = snapshot(env.pg), env.psp.counters()["requests"]["create"]
            pid, replies = as_peer(d, uid, gid, all_ops(tag))
            allowed = {op for op, cls in CLASS.items() if cls[0].upper() in held}
            for (op, _), rep in zip(all_ops(tag), replies):
                where = (grants, uid, gid, op, rep)
                if op in allowed:
                    if op in ("resolve", "settle_discrepancy"):     # allowed, and there is nothing to settle
                        assert rep["ok"] is False and rep["error"]["code"] == "not_found", where
                    else:
                        assert rep["ok"] is True, where
                else:
                    assert rep["ok"] is False and rep["error"]["code"] == "forbidden", where
                    msg = rep["error"]["message"]
                    assert msg == (f"op {op} needs the {CLASS[op]} permission, "
                                   f"which uid {uid} (gid {gid}) does not hold"), where
                    refused[op] += 1
            if "pay" in allowed:
                assert replies[3]["result"]["status"] == "succeeded"
                answers[f"pay-{tag}"] = "succeeded"
            if "credit" in allowed:
                assert replies[4]["result"]["status"] == "applied"
            # Nothing written by a refused request: the database moved by exactly
            # what the allowed ones write, and the processor saw only allowed pays.
            after = snapshot(env.pg)
            want = {"payments": "pay" in allowed, "credits": "credit" in allowed,
                    "accounts": "account_open" in allowed,
                    "ledger": ("pay" in allowed) + ("credit" in allowed),
                    "resolutions": "resolve" in allowed}
            assert {k: after[k] - before[k] for k in after} == {k: int(v) for k, v in want.items()}, (grants, uid)
            assert env.psp.counters()["requests"]["create"] - creates == ("pay" in allowed)
            keys = env.pg.query("SELECT (SELECT count(*) FROM payments WHERE idempotency_key = %s), "
                                "(SELECT count(*) FROM credits WHERE idempotency_key = %s), "
                                "(SELECT count(*) FROM accounts WHERE id = %s)",
                                (f"pay-{tag}", f"credit-{tag}", f"acct-{tag}"))[0]
            assert keys == ("pay" in allowed, "credit" in allowed, "account_open" in allowed)
    # Root and the daemon's own uid hold every class whatever the lists say.
    reload(d, pay_uids="40001")
    root = d.client()
    assert root.ok("credit", account=ACCT, amount=1, currency="EUR", idempotency_key="root-credit")["status"] == "applied"
    assert root.ok("pay", account=ACCT, amount=1, currency="EUR", idempotency_key="root-pay")["status"] == "succeeded"
    answers["root-pay"] = "succeeded"
    # Every refusal counted by op, in /metrics and in stats.
    m = metrics(port)
    stats = root.ok("stats")
    total = 0
    for op in CLASS:
        assert m[f'paycoord_forbidden_total{{op="{op}"}}'] == refused[op], op
        assert stats["forbidden_by_op"][op] == refused[op], op
        total += refused[op]
    assert total > 0 and refused["credit"] > 0
    assert m['paycoord_errors_total{code="forbidden"}'] == total == stats["errors"]["forbidden"]
    d.stop()
    check_invariants(env.pg, env.psp, answers=answers)


def test_refusals_are_logged_with_a_rate_limit(env):
    d, port = permission_daemon(env, pay_uids="40001")
    c = d.client()
    env.open_account(c, ACCT, balance=1000)
    reqs = [("credit", {"account": ACCT, "amount": 5, "currency": "EUR", "idempotency_key": f"log-{i}"})
            for i in range(25)]
    pid, replies = as_peer(d, 40001, 40001, reqs + [("ping", {})])
    assert all(r["error"]["code"] == "forbidden" for r in replies[:25]) and replies[25]["ok"], replies[-2:]
    log = d.log_text()
    line = f"event=forbidden uid=40001 gid=40001 pid={pid} op=credit missing=credit"
    assert log.count(line) == 10, log[-2000:]                 # ACCESS_LOG_BURST per 10 s window
    assert "<4>" in [ln for ln in log.splitlines() if line in ln][0][:4]   # warning level
    assert log.count("event=forbidden_rate_limited") == 1
    assert metrics(port)['paycoord_forbidden_total{op="credit"}'] == 25   # the counter sees them all
    assert env.pg.query("SELECT count(*) FROM credits")[0][0] == 1         # only open_account's credit
    assert c.ok("balance", account=ACCT)["balance"] == 1000
    d.stop()
    check_invariants(env.pg, env.psp)


def test_reload_revokes_at_once_but_admitted_requests_finish(env):
    d, port = permission_daemon(env, pay_uids="65534", credit_uids="65534", processor_timeout_ms=15000,
                                payment_deadline_ms=30000, pay_wait_ms=30000)
    root = d.client()
    env.open_account(root, ACCT, balance=1000)
    env.psp.faults(latency_ms=4000)
    sent_r, sent_w = os.pipe()
    go_r, go_w = os.pipe()
    res_r, res_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        out = {}
        try:
            become(65534, 65534)
            c = Client(d.socket, timeout=60)
            out["credit1"] = c.call("credit", account=ACCT, amount=50, currency="EUR", idempotency_key="cr-1")
            p1 = c.send("pay", account=ACCT, amount=100, currency="EUR", idempotency_key="rl-pay-1")
            p1b = c.send("pay", account=ACCT, amount=30, currency="EUR", idempotency_key="rl-pay-1b")  # queued behind it
            c.call("ping")                              # both lines read (admitted) before going on
            os.write(sent_w, b"s")
            os.read(go_r, 1)                            # the reload has been applied
            out["credit2"] = c.call("credit", account=ACCT, amount=50, currency="EUR", idempotency_key="cr-2")
            out["pay2"] = c.call("pay", account=ACCT, amount=100, currency="EUR", idempotency_key="rl-pay-2")
            out["balance"] = c.call("balance", account=ACCT)
            out["pay1"] = c.wait(p1)
            out["pay1b"] = c.wait(p1b)
            out["fresh"] = Client(d.socket, timeout=10).call("credit", account=ACCT, amount=1, currency="EUR",
                                                             idempotency_key="cr-3")
        except BaseException as e:                      # noqa: B902
            out["child_error"] = repr(e)
        finally:
            os.write(res_w, json.dumps(out).encode())
            os._exit(0)
    for fd in (sent_w, go_r, res_w):
        os.close(fd)
    assert os.read(sent_r, 1) == b"s"
    wait_for(lambda: env.pg.query("SELECT count(*) FROM pg_prepared_xacts")[0][0] == 1, what="pay prepared")
    # Revoke pay and credit from 65534 (read stays) while its payments are in progress.
    reload(d, pay_uids="40001", read_uids="65534")
    assert env.pg.query("SELECT status FROM payments WHERE idempotency_key = 'rl-pay-1'")[0][0] == "pending"
    assert env.pg.query("SELECT count(*) FROM pg_prepared_xacts")[0][0] == 1   # still waiting on the processor
    os.write(go_w, b"g")
    data = b""
    while chunk := os.read(res_r, 65536):
        data += chunk
    os.waitpid(pid, 0)
    out = json.loads(data)
    assert "child_error" not in out, out
    assert out["credit1"]["result"]["status"] in ("applied", "accepted")
    # The next requests see the new permissions at once, on the same connection and on a new one.
    assert out["credit2"]["error"] == {"code": "forbidden", "message":
                                       "op credit needs the credit permission, which uid 65534 (gid 65534) does not hold"}
    assert out["pay2"]["error"]["code"] == "forbidden" and "needs the pay permission" in out["pay2"]["error"]["message"]
    assert out["fresh"]["error"]["code"] == "forbidden"
    assert out["balance"]["ok"] is True
    # The payments admitted before the reload finished normally.
    assert out["pay1"]["result"]["status"] == "succeeded", out["pay1"]
    assert out["pay1b"]["result"]["status"] == "succeeded", out["pay1b"]
    env.psp.faults(latency_ms=0)
    rows = dict(env.pg.query("SELECT idempotency_key, derived_status FROM payments_view"))
    assert rows == {"rl-pay-1": "succeeded", "rl-pay-1b": "succeeded"}
    credits = {k for (k,) in env.pg.query("SELECT idempotency_key FROM credits")}
    assert credits == {f"open-{ACCT}", "cr-1"}
    assert root.ok("balance", account=ACCT)["balance"] == 1000 + 50 - 100 - 30
    m = metrics(port)
    assert m['paycoord_forbidden_total{op="credit"}'] == 2 and m['paycoord_forbidden_total{op="pay"}'] == 1
    d.stop()
    check_invariants(env.pg, env.psp, answers={"rl-pay-1": "succeeded", "rl-pay-1b": "succeeded"})
