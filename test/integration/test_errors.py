"""Every error code reachable without recovery, driven by real bad input over
the socket, and hostile clients. Each test ends with the money invariants:
bad input never charges anything nor half-writes anything."""

import os
import socket
import time

import pytest

from harness import Client, check_invariants, wait_for


def err(r):
    assert r["ok"] is False, r
    return r["error"]["code"]


BAD_PAY = [
    ({"amount": 1.5}, "amount"),
    ({"amount": 10.0}, "amount"),
    ({"amount": 0}, "amount"),
    ({"amount": -5}, "amount"),
    ({"amount": "100"}, "amount"),
    ({"amount": 10 ** 12 + 1}, "amount"),
    ({"amount": 10 ** 20}, "amount"),
    ({"currency": "eur"}, "currency"),
    ({"currency": "EURO"}, "currency"),
    ({"currency": 978}, "currency"),
    ({"account": ""}, "account"),
    ({"account": "a" * 65}, "account"),
    ({"account": "bad account"}, "account"),
    ({"idempotency_key": ""}, "idempotency_key"),
    ({"idempotency_key": "k" * 256}, "idempotency_key"),
    ({"idempotency_key": "has space"}, "idempotency_key"),
    ({"reference": "r" * 256}, "reference"),
    ({"metadata": {"k": 1}}, "metadata"),
    ({"metadata": {f"k{i}": "v" for i in range(21)}}, "metadata"),
    ({"metadata": "x"}, "metadata"),
    ({"wait_ms": -1}, "wait_ms"),
]


def test_invalid_fields(env):
    d = env.daemon()
    c = d.client()
    env.open_account(c, "acct-e", balance=1000)
    base = {"account": "acct-e", "amount": 100, "currency": "EUR"}
    for i, (change, field) in enumerate(BAD_PAY):
        req = dict(base, idempotency_key=f"bad-{i}")
        req.update(change)
        r = c.call("pay", **req)
        assert err(r) == "invalid_request", (change, r)
        assert field in r["error"]["message"], (field, r)
    for missing in ("account", "amount", "currency", "idempotency_key"):
        req = dict(base, idempotency_key="miss")
        del req[missing]
        r = c.call("pay", **req)
        assert err(r) == "invalid_request" and missing in r["error"]["message"], r
    # Exponent and fraction spellings on the raw wire.
    for raw in (b'{"id":1,"op":"pay","account":"acct-e","amount":1e2,"currency":"EUR","idempotency_key":"x1"}\n',
                b'{"id":2,"op":"pay","account":"acct-e","amount":100.0,"currency":"EUR","idempotency_key":"x2"}\n'):
        c.send_raw(raw)
        assert err(c.read_line()) == "invalid_request"
    assert env.pg.query("SELECT count(*) FROM payments")[0][0] == 0
    assert c.ok("balance", account="acct-e")["balance"] == 1000
    d.stop()
    check_invariants(env.pg, env.psp)


def test_framing_and_hostile_lines(env):
    d = env.daemon(max_request_bytes=1024)
    c = d.client()
    cases = [
        (b"not json\n", "invalid_request"),
        (b"[1,2]\n", "invalid_request"),
        (b'"x"\n', "invalid_request"),
        (b'{"id":7,"op":"fly"}\n', "unknown_op"),
        (b'{"id":8}\n', "invalid_request"),
        (b'{"id":9,"op":"ping"} trailing\n', "invalid_request"),
        (b'{"id":10,"op":"balance","account":"\xff\xfe"}\n', "invalid_request"),
        (b'{"id":11,"op":"balance","account":"\xc0\xaf"}\n', "invalid_request"),
        (b'{"id":12,"op":"ping","op":"ping"}\n', "invalid_request"),
        (b'{"id":{"a":1},"op":"ping"}\n', "invalid_request"),
        (b"[" * 500 + b"]" * 500 + b"\n", "invalid_request"),
    ]
    for raw, code in cases:
        c.send_raw(raw)
        r = c.read_line()
        assert err(r) == code, (raw[:40], r)
    # id echoed where it could be read
    c.send_raw(b'{"id":"abc","op":"fly"}\n')
    assert c.read_line()["id"] == "abc"
    # The connection is still sane.
    assert c.ok("ping")["protocol"] == 1
    # A line over the limit: request_too_large, then the connection closes.
    c.send_raw(b'{"id":1,"op":"ping","pad":"' + b"x" * 2000 + b'"}\n')
    assert err(c.read_line()) == "request_too_large"
    with pytest.raises((ConnectionError, OSError)):
        c.read_line()
    # Without a newline at all, too.
    c2 = d.client()
    c2.send_raw(b"x" * 5000)
    assert err(c2.read_line()) == "request_too_large"
    d.stop()
    check_invariants(env.pg, env.psp)


def test_business_errors(env):
    d = env.daemon()
    c = d.client()
    env.open_account(c, "acct-b", balance=1000)
    assert err(c.call("pay", account="nobody", amount=5, currency="EUR", idempotency_key="u1")) == "unknown_account"
    assert err(c.call("pay", account="acct-b", amount=5, currency="USD", idempotency_key="u2")) == "currency_mismatch"
    assert err(c.call("credit", account="nobody", amount=5, currency="EUR", idempotency_key="u3")) == "unknown_account"
    assert err(c.call("balance", account="nobody")) == "unknown_account"
    assert err(c.call("account_open", account="acct-b", currency="EUR")) == "account_exists"
    assert err(c.call("status", idempotency_key="never")) == "not_found"
    assert err(c.call("status", payment_id="00000000-0000-0000-0000-000000000000")) == "not_found"
    c.ok("pay", account="acct-b", amount=5, currency="EUR", idempotency_key="k-1")
    assert err(c.call("pay", account="acct-b", amount=6, currency="EUR", idempotency_key="k-1")) == "idempotency_conflict"
    # Errors wrote nothing: the failed intents are not in the table.
    assert env.pg.query("SELECT count(*) FROM payments")[0][0] == 1
    d.stop()
    check_invariants(env.pg, env.psp)


def test_forbidden_for_other_uid(env):
    os.chmod(env.workdir, 0o755)        # let uid 65534 reach the socket
    d = env.daemon(listen_mode="0666")
    pid = os.fork()
    if pid == 0:   # child: become nobody and try an admin op and a client op
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            c = Client(d.socket, timeout=5)
            a = c.call("account_open", account="x", currency="EUR")
            b = c.call("ping")
            code = 0 if (a["error"]["code"] == "forbidden" and b["ok"]) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    d.stop()
    check_invariants(env.pg, env.psp)


def test_stalled_and_slow_clients(env):
    d = env.daemon(client_partial_timeout_ms=300, max_clients=5)
    stalled = d.client()
    stalled.send_raw(b'{"id":1,"op":"pi')          # half a line, then nothing
    with pytest.raises((ConnectionError, OSError)):
        stalled.read_line()                           # closed after the timeout
    # Too many clients: the 6th is told politely and closed.
    held = [d.client() for _ in range(5)]
    for h in held:
        assert h.ok("ping")
    extra = d.client()
    assert err(extra.read_line()) == "overloaded"
    for h in held:
        h.close()

    def ping_once():
        try:
            return d.client().ok("ping")
        except (OSError, ConnectionError, AssertionError):
            return None                  # refused until the daemon has seen the closes
    wait_for(ping_once, what="slot freed")
    d.stop()
    check_invariants(env.pg, env.psp)


def test_disconnect_mid_payment_neither_stops_nor_duplicates(env):
    d = env.daemon()
    c = d.client()
    env.open_account(c, "acct-x", balance=1000)
    env.psp.faults(latency_ms=300)
    c.send("pay", account="acct-x", amount=100, currency="EUR", idempotency_key="gone-1")
    time.sleep(0.1)
    c.close()
    c2 = d.client()
    wait_for(lambda: c2.ok("status", idempotency_key="gone-1")["status"] == "succeeded", timeout=10)
    r = c2.ok("pay", account="acct-x", amount=100, currency="EUR", idempotency_key="gone-1")
    assert r["replayed"] is True and r["status"] == "succeeded"
    assert env.psp.counters()["processed_creates"] == 1
    d.stop()
    check_invariants(env.pg, env.psp, answers={"gone-1": "succeeded"})


def test_database_down_is_unavailable(env):
    d = env.daemon()
    c = d.client()
    env.open_account(c, "acct-u", balance=1000)
    env.pg.stop()
    try:
        wait_for(lambda: c.call("pay", account="acct-u", amount=5, currency="EUR",
                                idempotency_key="u-down")["error"]["code"] == "unavailable", timeout=15)
        assert env.psp.counters()["requests"]["create"] == 0
    finally:
        env.pg.start()
    wait_for(lambda: c.call("health")["result"]["ready"], timeout=20, what="ready again")
    r = c.ok("pay", account="acct-u", amount=5, currency="EUR", idempotency_key="u-after")
    assert r["status"] == "succeeded"
    d.stop()
    check_invariants(env.pg, env.psp, answers={"u-after": "succeeded"})


def test_half_closed_client_still_gets_its_answers(env):
    d = env.daemon()
    c = d.client()
    env.open_account(c, "acct-hc", balance=1000)
    env.psp.faults(latency_ms=200)
    import socket as s
    c.send("pay", account="acct-hc", amount=10, currency="EUR", idempotency_key="hc-1")
    c.send("ping")
    c.sock.shutdown(s.SHUT_WR)               # like `echo ... | socat`
    got = sorted([c.read_line(), c.read_line()], key=lambda m: m["id"])
    assert got[0]["result"]["status"] == "succeeded" and got[1]["result"]["protocol"] == 1
    with pytest.raises((ConnectionError, OSError)):
        c.read_line()                        # then the daemon closes
    d.stop()
    check_invariants(env.pg, env.psp, answers={"hc-1": "succeeded"})
