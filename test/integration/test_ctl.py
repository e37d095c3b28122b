"""paycoordctl, the admin CLI, against the real daemon, a real PostgreSQL and
stand-in daemons that misbehave on purpose: output layouts, --json, the exit
status contract (0 ok, 1 error answer, 2 usage, 3 unreachable), --db reading
prepared transactions with the daemon down, and resolve's confirmation."""

import json
import os
import pty
import re
import socket
import subprocess
import tempfile
import threading
import time
import uuid

import psycopg
import pytest

import harness
from harness import check_invariants, wait_for

CTL = os.environ.get("PAYCOORDCTL_BIN") or os.path.join(harness.BUILD, "coordinator", "ctl", "paycoordctl")

COMMANDS = ["ping", "health", "stats", "prepared", "show", "resolve", "recover", "account", "balance",
            "pay", "credit", "status", "reconcile", "discrepancies", "settle-discrepancy", "audit", "help"]


@pytest.fixture(scope="module", autouse=True)
def _binary():
    assert os.access(CTL, os.X_OK), f"paycoordctl not built: {CTL} (set PAYCOORD_BUILD)"


def ctl(*args, sock=None, stdin=subprocess.DEVNULL, extra_env=None, timeout=60):
    """Run paycoordctl; --socket first when given. stdin is not a tty by default."""
    cmd = [CTL] + (["--socket", sock] if sock else []) + [str(a) for a in args]
    e = dict(os.environ)
    e.pop("PAYCOORD_SOCKET", None)
    e.update(extra_env or {})
    return subprocess.run(cmd, stdin=stdin, capture_output=True, text=True, timeout=timeout, env=e)


def ok(res):
    assert res.returncode == 0, (res.returncode, res.stdout, res.stderr)
    return res.stdout


def error_code(res):
    """Exit 1 and the 'paycoordctl: <code>: <message>' line; returns the code."""
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    m = re.match(r"paycoordctl: ([a-z_]+): .+", res.stderr.splitlines()[0])
    assert m, res.stderr
    return m.group(1)


def skip_if_admin_op_missing(res):
    """The lead is adding prepared/resolve/recover to the daemon; until then it
    answers unknown_op, and only that makes these tests skip."""
    if res.returncode == 1 and "paycoordctl: unknown_op:" in res.stderr:
        pytest.skip("admin op not available yet")


def vertical(text):
    """psql's expanded layout 'key | value' -> dict."""
    out = {}
    for line in text.splitlines():
        if line.startswith("-["):
            continue
        k, sep, v = line.partition(" |")
        assert sep, f"not a key | value line: {line!r}"
        out[k.rstrip()] = v[1:] if v.startswith(" ") else v
    return out


def sections(text):
    """show's titled sections: {title: {key: value}}."""
    out, cur = {}, None
    for line in text.splitlines():
        m = re.match(r"-\[ (.+) \]-*\+-+$", line)
        if m:
            cur = out.setdefault(m.group(1), {})
            continue
        assert cur is not None, text
        cur.update(vertical(line))
    return out


def table(text):
    """psql's aligned table -> list of dicts, checking the layout on the way."""
    lines = text.splitlines()
    headers = [h.strip() for h in lines[0].split("|")]
    assert re.fullmatch(r"-+(\+-+)*", lines[1]), lines[1]
    assert [len(p) for p in lines[1].split("+")][:-1] == [len(p) for p in lines[0].split("|")][:-1], text
    m = re.fullmatch(r"\((\d+) rows?\)", lines[-1])
    assert m, lines[-1]
    rows = [dict(zip(headers, (c.strip() for c in line.split("|")))) for line in lines[2:-1]]
    assert len(rows) == int(m.group(1))
    assert lines[-1] == ("(1 row)" if len(rows) == 1 else f"({len(rows)} rows)")
    return rows


def prepare(pg, gid, sql=(), params=()):
    """Leave a prepared transaction named gid that ran the given statements."""
    c = psycopg.connect(pg.conninfo, autocommit=False)
    try:
        # A prepared debit keeps its account row locked: fail, never hang, on a second one.
        c.execute("SET LOCAL lock_timeout = '5s'")
        for s, p in zip(sql, params):
            c.execute(s, p)
        if not sql:
            c.execute("SELECT 1")
        c.execute(f"PREPARE TRANSACTION '{gid}'")
    finally:
        c.close()


def execute(pg, sql, params=None):
    with pg.connect() as c:
        c.execute(sql, params)


def prepared_gids(pg):
    return {g for (g,) in pg.query("SELECT gid FROM pg_prepared_xacts")}


def in_doubt_payment(pg, account, amount, key, node="t1", review=False, attempts=0, last_error=None):
    """A payment exactly as the daemon leaves one in doubt: its row committed
    on its own, then the debit and ledger entry prepared under its gid; with
    attempts, recovery's bookkeeping row for it (sql/001_schema.sql)."""
    pid = uuid.uuid4()
    gid = f"pc:{node}:{pid.hex}"
    execute(pg, "INSERT INTO payments (payment_id, idempotency_key, account_id, amount, currency, gid, node, "
                "deadline) SELECT %s, %s, id, %s, currency, %s, %s, now() + interval '1 hour' "
                "FROM accounts WHERE id = %s", (pid, key, amount, gid, node, account))
    if attempts or review or last_error:
        execute(pg, "INSERT INTO recovery_state (gid, payment_id, attempts, last_error, review) "
                    "VALUES (%s, %s, %s, %s, %s)", (gid, pid, attempts, last_error, review))
    prepare(pg, gid, [
        "UPDATE accounts SET balance = balance - %s, updated_at = now() WHERE id = %s AND balance >= %s",
        "INSERT INTO ledger (account_id, amount, balance_after, payment_id) "
        "SELECT id, -%s, balance, %s FROM accounts WHERE id = %s",
    ], [(amount, account, amount), (amount, pid, account)])
    return str(pid), gid


def roll_back_as_declined(pg, gid):
    """What recovery does when the processor never saw the gid."""
    execute(pg, f"ROLLBACK PREPARED '{gid}'")
    execute(pg, "UPDATE payments SET status = 'declined', decline_code = 'canceled', updated_at = now() "
                "WHERE gid = %s", (gid,))
    execute(pg, "DELETE FROM recovery_state WHERE gid = %s", (gid,))


# --------------------------------------------------------------- no daemon needed

def test_help_for_every_command():
    overview = ok(ctl("help"))
    assert "exit status" in overview and "--socket PATH" in overview
    for name in COMMANDS:
        assert re.search(rf"^  {name} ", overview, re.M), f"{name} missing from the overview"
        for args in (["help", name], [name, "--help"], ["-h", name]):
            text = ok(ctl(*args))
            assert text.startswith("usage: paycoordctl [OPTIONS] "), text
            assert f" {name}" in text.splitlines()[0]
            assert "\nexample:\n  paycoordctl " in text, text
            assert len(text.split("\n\n")[1]) > 40, "a description"
    resolve_help = ok(ctl("help", "resolve"))
    assert "type yes" in resolve_help and "--yes" in resolve_help and "--reason" in resolve_help
    assert "--db" in ok(ctl("help", "prepared"))
    assert ok(ctl("help", "account", "open")).startswith("usage: paycoordctl [OPTIONS] account open ")
    assert ok(ctl("--help")) == overview
    r = ctl("help", "nosuch")
    assert r.returncode == 2 and "nosuch" in r.stderr
    assert re.fullmatch(r"paycoordctl \d+\.\d+\.\d+ \(protocol 1\)\n", ok(ctl("--version")))


USAGE_ERRORS = [
    ([], "usage"),
    (["frobnicate"], "unknown command"),
    (["ping", "--frob"], "unknown option"),
    (["ping", "-x"], "unknown option"),
    (["ping", "extra"], "fewer"),
    (["ping", "--reason", "x"], "does not apply"),
    (["balance"], "more"),
    (["balance", "bad account"], "ACCOUNT"),
    (["balance", "a" * 65], "ACCOUNT"),
    (["account", "close", "a", "EUR"], "subcommand"),
    (["account", "open", "a", "eur"], "CURRENCY"),
    (["account", "open", "a", "EURO"], "CURRENCY"),
    (["pay", "a", "12.50", "EUR", "k"], "AMOUNT"),
    (["pay", "a", "-5", "EUR", "k"], "AMOUNT"),
    (["pay", "a", "0", "EUR", "k"], "AMOUNT"),
    (["pay", "a", "1e3", "EUR", "k"], "AMOUNT"),
    (["pay", "a", "+5", "EUR", "k"], "AMOUNT"),
    (["pay", "a", "99999999999999999999", "EUR", "k"], "AMOUNT"),
    (["pay", "a", "100", "EUR", "has space"], "KEY"),
    (["pay", "a", "100", "EUR", "k", "--wait-ms", "-1"], "--wait-ms"),
    (["pay", "a", "100", "EUR", "k", "--wait-ms"], "needs a value"),
    (["pay", "a", "100", "EUR", "k", "--reference", "r" * 256], "--reference"),
    (["pay", "a", "100", "EUR"], "more"),
    (["credit", "a", "1.0", "EUR", "k"], "AMOUNT"),
    (["credit", "a", "100", "EUR", "k", "--wait-ms", "5"], "does not apply"),
    (["status"], "either KEY or --payment-id"),
    (["status", "k", "--payment-id", "3f2a1c9e-0b7d-4e8a-9c1f-2d3e4f5a6b7c"], "either KEY"),
    (["status", "--payment-id", "not-a-uuid"], "UUID"),
    (["prepared", "--older-than", "5"], "duration"),
    (["prepared", "--older-than", "5d"], "duration"),
    (["prepared", "--older-than", "m"], "duration"),
    (["show"], "more"),
    (["show", "bad key"], "KEY"),
    (["resolve", "pc:t1:x", "commit"], "--reason"),
    (["resolve", "pc:t1:x", "maybe", "--reason", "r"], "commit or rollback"),
    (["resolve", "pc:t1:x", "commit", "--reason", "r" * 501], "--reason"),
    (["--timeout", "0", "ping"], "--timeout"),
    (["--timeout", "soon", "ping"], "--timeout"),
    (["--db", "dbname=x", "ping"], "--db works only with"),
    (["--json=yes", "ping"], "takes no value"),
]


@pytest.mark.parametrize("args,needle", USAGE_ERRORS, ids=[" ".join(a)[:40] or "(none)" for a, _ in USAGE_ERRORS])
def test_usage_errors_exit_2_before_connecting(args, needle):
    # A socket that does not exist: a usage error must be found first (2, not 3).
    r = ctl(*args, extra_env={"PAYCOORD_SOCKET": "/nonexistent/paycoord.sock"})
    assert r.returncode == 2, (args, r.returncode, r.stderr)
    assert needle in r.stderr, (args, r.stderr)
    assert r.stdout == ""


class FakeDaemon:
    """A Unix socket server that misbehaves in one chosen way."""

    def __init__(self, mode):
        self.dir = tempfile.mkdtemp(prefix="pc-ctl-")
        self.path = os.path.join(self.dir, "fake.sock")
        self.mode = mode
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(self.path)
        self.srv.listen(4)
        self.conns = []
        self.t = threading.Thread(target=self._serve, daemon=True)
        self.t.start()

    def _serve(self):
        try:
            conn, _ = self.srv.accept()
        except OSError:
            return
        self.conns.append(conn)
        buf = b""
        while b"\n" not in buf:
            chunk = conn.recv(65536)
            if not chunk:
                return
            buf += chunk
        req = json.loads(buf.split(b"\n", 1)[0])
        if self.mode == "close":
            conn.close()
        elif self.mode == "huge":
            try:
                conn.sendall(b'{"id": ' + json.dumps(req["id"]).encode() + b', "x": "' + b"a" * (17 << 20))
            except OSError:
                pass
        elif self.mode == "garbage":
            conn.sendall(b"this is not json\n")
        elif self.mode == "out_of_order":
            # Someone else's answer first, then ours split across writes.
            other = {"id": "not-yours", "ok": True, "result": {"node": "wrong"}}
            conn.sendall((json.dumps(other) + "\n").encode())
            mine = json.dumps({"id": req["id"], "ok": True,
                               "result": {"version": "9.9.9", "protocol": 1, "node": "fake"}}) + "\r\n"
            conn.sendall(mine[:10].encode())
            time.sleep(0.05)
            conn.sendall(mine[10:].encode())
        elif self.mode == "error":
            conn.sendall((json.dumps({"id": req["id"], "ok": False, "error": {
                "code": "overloaded", "message": "too busy\x1b[2J"}}) + "\n").encode())
        # "silent": keep the connection open, answer nothing.

    def close(self):
        self.srv.close()
        for c in self.conns:
            c.close()


@pytest.mark.parametrize("mode,needle", [("silent", "within"), ("close", "closed the connection"),
                                          ("huge", "longer than"), ("garbage", "unreadable")])
def test_unusable_daemon_exits_3(mode, needle):
    f = FakeDaemon(mode)
    try:
        t0 = time.monotonic()
        r = ctl("--timeout", "0.5", "ping", sock=f.path)
        assert r.returncode == 3, (r.returncode, r.stderr)
        assert needle in r.stderr, r.stderr
        assert r.stdout == ""
        if mode == "silent":
            assert 0.4 < time.monotonic() - t0 < 5
    finally:
        f.close()


def test_answer_matched_by_id_and_error_text_sanitised():
    f = FakeDaemon("out_of_order")
    try:
        out = ok(ctl("--json", "ping", sock=f.path))
        assert json.loads(out) == {"version": "9.9.9", "protocol": 1, "node": "fake"}
    finally:
        f.close()
    f = FakeDaemon("error")
    try:
        r = ctl("ping", sock=f.path)
        assert error_code(r) == "overloaded"
        assert "\x1b" not in r.stderr and "too busy\\x1b[2J" in r.stderr
    finally:
        f.close()


def test_unreachable_exits_3():
    d = tempfile.mkdtemp(prefix="pc-ctl-")
    missing = os.path.join(d, "missing.sock")
    r = ctl("ping", sock=missing)
    assert r.returncode == 3 and missing in r.stderr and r.stdout == ""
    # The default socket comes from $PAYCOORD_SOCKET.
    r = ctl("health", extra_env={"PAYCOORD_SOCKET": missing})
    assert r.returncode == 3 and missing in r.stderr
    # A socket file nobody listens on: connection refused.
    dead = os.path.join(d, "dead.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(dead)
    s.close()
    r = ctl("stats", sock=dead)
    assert r.returncode == 3 and "refused" in r.stderr.lower(), r.stderr
    # prepared hints at --db when the daemon is down.
    r = ctl("prepared", sock=missing)
    assert r.returncode == 3 and "--db" in r.stderr


# --------------------------------------------------------------- against the daemon

def test_ping_health_stats_people_and_json(env):
    d = env.daemon()
    c = d.client()
    v = vertical(ok(ctl("ping", sock=d.socket)))
    assert v == {"version": c.ok("ping")["version"], "protocol": "1", "node": "t1"}
    assert json.loads(ok(ctl("--json", "ping", sock=d.socket))) == c.ok("ping")
    # Global options may also follow the command.
    assert json.loads(ok(ctl("ping", "--json", sock=d.socket)))["node"] == "t1"
    assert json.loads(ok(ctl("ping", "--json", extra_env={"PAYCOORD_SOCKET": d.socket})))["node"] == "t1"

    text = ok(ctl("health", sock=d.socket))
    lines = text.splitlines()
    assert len({line.index(" |") for line in lines}) == 1, "keys padded to one width"
    h = vertical(text)
    assert h["ready"] == "true" and h["database"] == "up" and h["processor"] == "up"
    hj = json.loads(ok(ctl("--json", "health", sock=d.socket)))
    assert hj["ready"] is True and set(hj) >= {"ready", "database", "processor", "prepared", "max_prepared"}
    assert text.count("\n") == len(hj)

    s = vertical(ok(ctl("stats", sock=d.socket)))
    assert "payments.succeeded" in s and "pool.size" in s and "errors.invalid_request" in s
    sj = json.loads(ok(ctl("stats", "--json", sock=d.socket)))
    assert isinstance(sj["payments"], dict) and s["pool.size"] == str(sj["pool"]["size"])
    out = ok(ctl("--json", "stats", sock=d.socket))
    assert out.count("\n") == 1 and out.endswith("}\n"), "one JSON line"
    d.stop()
    check_invariants(env.pg, env.psp)


def test_money_round_trip(env):
    d = env.daemon()
    s = d.socket
    acct = vertical(ok(ctl("account", "open", "acct-cli", "EUR", sock=s)))
    assert acct == {"account": "acct-cli", "currency": "EUR", "balance": "0"}
    cr = json.loads(ok(ctl("--json", "credit", "acct-cli", 10000, "EUR", "top-1", "--reference", "top up", sock=s)))
    assert cr["status"] == "applied" and cr["amount"] == 10000 and cr["idempotency_key"] == "top-1"

    p = vertical(ok(ctl("pay", "acct-cli", 1250, "EUR", "order-1", "--reference", "order 1", sock=s)))
    assert p["status"] == "succeeded" and p["amount"] == "1250" and p["reference"] == "order 1"
    assert p["gid"].startswith("pc:t1:") and p["decline_code"] == ""
    # A replay through the CLI: the stored payment, never a second charge.
    again = json.loads(ok(ctl("--json", "pay", "acct-cli", 1250, "EUR", "order-1", sock=s)))
    assert again["replayed"] is True and again["payment_id"] == p["payment_id"]

    b = vertical(ok(ctl("balance", "acct-cli", sock=s)))
    assert b == {"account": "acct-cli", "currency": "EUR", "balance": "8750", "held": "0", "pending_credits": "0"}
    assert json.loads(ok(ctl("--json", "balance", "acct-cli", sock=s)))["balance"] == 8750

    st = json.loads(ok(ctl("--json", "status", "order-1", sock=s)))
    assert st["status"] == "succeeded" and st["payment_id"] == p["payment_id"]
    by_id = vertical(ok(ctl("status", "--payment-id", p["payment_id"], sock=s)))
    assert by_id["idempotency_key"] == "order-1" and by_id["status"] == "succeeded"

    # show by key and by gid (the gid holds the payment id).
    for arg in ("order-1", p["gid"]):
        sec = sections(ok(ctl("show", arg, sock=s)))
        assert sec["payment"]["payment_id"] == p["payment_id"] and "prepared transaction" not in sec
        sj = json.loads(ok(ctl("--json", "show", arg, sock=s)))
        assert sj["payment"]["status"] == "succeeded" and sj["prepared"] is None

    # Declined and insufficient funds are answers too: exit 0.
    env.psp.faults(decline_rate=1.0)
    dec = vertical(ok(ctl("pay", "acct-cli", 500, "EUR", "order-2", sock=s)))
    assert dec["status"] == "declined" and dec["decline_code"] != ""
    env.psp.faults(decline_rate=0.0)
    poor = json.loads(ok(ctl("--json", "pay", "acct-cli", 10 ** 6, "EUR", "order-3", sock=s)))
    assert poor["status"] == "insufficient_funds"
    assert json.loads(ok(ctl("--json", "balance", "acct-cli", sock=s)))["balance"] == 8750
    wait_for(lambda: env.pg.query("SELECT status FROM payments WHERE idempotency_key = 'order-2'")[0][0]
             == "declined", what="declined row written")
    d.stop()
    check_invariants(env.pg, env.psp, answers={"order-1": "succeeded", "order-2": "declined",
                                               "order-3": "insufficient_funds"})


def test_error_answers_exit_1(env):
    d = env.daemon()
    s = d.socket
    ok(ctl("account", "open", "acct-e", "EUR", sock=s))
    ok(ctl("credit", "acct-e", 1000, "EUR", "e-top", sock=s))
    assert error_code(ctl("balance", "nosuch", sock=s)) == "unknown_account"
    assert error_code(ctl("--json", "balance", "nosuch", sock=s)) == "unknown_account"
    assert error_code(ctl("pay", "nosuch", 100, "EUR", "e-1", sock=s)) == "unknown_account"
    assert error_code(ctl("account", "open", "acct-e", "EUR", sock=s)) == "account_exists"
    assert error_code(ctl("status", "never-seen", sock=s)) == "not_found"
    assert error_code(ctl("status", "--payment-id", str(uuid.uuid4()), sock=s)) == "not_found"
    assert error_code(ctl("show", "never-seen", sock=s)) == "not_found"
    assert error_code(ctl("show", f"pc:t1:{uuid.uuid4().hex}", sock=s)) == "not_found"
    assert error_code(ctl("pay", "acct-e", 100, "USD", "e-2", sock=s)) == "currency_mismatch"
    ok(ctl("pay", "acct-e", 100, "EUR", "e-3", sock=s))
    assert error_code(ctl("pay", "acct-e", 101, "EUR", "e-3", sock=s)) == "idempotency_conflict"
    # Beyond the daemon's max_amount: the daemon's check, not ours.
    assert error_code(ctl("pay", "acct-e", 10 ** 12 + 1, "EUR", "e-4", sock=s)) == "invalid_request"
    r = ctl("--json", "balance", "nosuch", sock=s)
    assert r.stdout == "", "errors go to stderr only"
    d.stop()
    check_invariants(env.pg, env.psp, answers={"e-3": "succeeded"})


def test_db_prepared_with_daemon_down(env):
    d = env.daemon()
    # One account per prepared debit: each holds its account's row lock.
    for acct in ("acct-db", "acct-db2"):
        ok(ctl("account", "open", acct, "EUR", sock=d.socket))
        ok(ctl("credit", acct, 5000, "EUR", f"top-{acct}", sock=d.socket))
    d.stop()
    assert ctl("prepared", sock=d.socket).returncode == 3

    pid1, gid1 = in_doubt_payment(env.pg, "acct-db", 700, "db-1", attempts=3, last_error="processor timeout")
    time.sleep(0.05)
    pid2, gid2 = in_doubt_payment(env.pg, "acct-db2", 300, "db-2", review=True, attempts=9,
                                  last_error="gave up\nafter 9 tries")
    time.sleep(0.05)
    prepare(env.pg, "ext-foreign-1")
    assert prepared_gids(env.pg) == {gid1, gid2, "ext-foreign-1"}
    try:
        rows = table(ok(ctl("--db", env.pg.conninfo, "prepared")))
        assert [r["gid"] for r in rows] == [gid1, gid2, "ext-foreign-1"], "oldest first"
        assert rows[0]["state"] == "in_doubt" and rows[0]["account"] == "acct-db" and rows[0]["amount"] == "700"
        assert rows[0]["currency"] == "EUR" and rows[0]["attempts"] == "3"
        assert rows[0]["last_error"] == "processor timeout"
        assert rows[1]["state"] == "review" and rows[1]["last_error"] == "gave up\\nafter 9 tries"
        assert rows[2]["state"] == "unknown" and rows[2]["account"] == "" and rows[2]["amount"] == ""
        assert all(re.fullmatch(r"\d+(ms|s)", r["age"]) for r in rows), rows

        out = ok(ctl("--db", env.pg.conninfo, "--json", "prepared"))
        assert out.count("\n") == 1
        txs = json.loads(out)["transactions"]
        assert [set(t) for t in txs] == [{"gid", "payment_id", "account", "amount", "currency", "prepared_at",
                                          "age_ms", "state", "node", "attempts", "last_error"}] * 3
        t1 = txs[0]
        assert t1["payment_id"] == pid1 and t1["amount"] == 700 and t1["node"] == "t1"
        assert t1["attempts"] == 3 and isinstance(t1["age_ms"], int) and t1["age_ms"] >= 0
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", t1["prepared_at"])
        assert txs[1]["payment_id"] == pid2 and txs[1]["state"] == "review"
        assert txs[2] == dict(txs[2], payment_id=None, account=None, amount=None, state="unknown", node=None,
                              attempts=0, last_error=None)

        assert table(ok(ctl("--db", env.pg.conninfo, "prepared", "--older-than", "1h"))) == []
        assert len(table(ok(ctl("--db", env.pg.conninfo, "prepared", "--older-than=0ms")))) == 3
        # A database that cannot be reached is "unreachable" too.
        r = ctl("--db", "host=/nonexistent dbname=paycoord connect_timeout=2", "prepared")
        assert r.returncode == 3 and "database" in r.stderr
        # A database without paycoord's tables answers an error.
        r = ctl("--db", env.pg.conninfo.replace("dbname=paycoord", "dbname=postgres"), "prepared")
        assert r.returncode == 1 and "payments" in r.stderr
    finally:
        if "ext-foreign-1" in prepared_gids(env.pg):
            execute(env.pg, "ROLLBACK PREPARED 'ext-foreign-1'")
        for gid in (gid1, gid2):
            roll_back_as_declined(env.pg, gid)
    assert prepared_gids(env.pg) == set()
    assert table(ok(ctl("--db", env.pg.conninfo, "prepared"))) == []
    check_invariants(env.pg, env.psp)


def test_resolve_refuses_without_tty_or_confirmation(env):
    d = env.daemon()
    prepare(env.pg, "ext-resolve-1")
    try:
        for args in (["resolve", "ext-resolve-1", "rollback", "--reason", "test"],
                     ["--json", "resolve", "ext-resolve-1", "commit", "--reason", "test"]):
            r = ctl(*args, sock=d.socket)
            assert r.returncode == 2, (r.returncode, r.stderr)
            assert "--yes" in r.stderr and "terminal" in r.stderr and r.stdout == ""
        # On a terminal, anything but "yes" changes nothing.
        master, slave = pty.openpty()
        try:
            p = subprocess.Popen([CTL, "--socket", d.socket, "resolve", "ext-resolve-1", "rollback",
                                  "--reason", "test"], stdin=slave, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
            os.close(slave)
            os.write(master, b"y\n")
            out, err = p.communicate(timeout=30)
        finally:
            os.close(master)
        assert p.returncode == 2, err
        assert "Type yes to confirm" in err and "not confirmed" in err and out == ""
        assert "ext-resolve-1" in prepared_gids(env.pg)
    finally:
        execute(env.pg, "ROLLBACK PREPARED 'ext-resolve-1'")
    d.stop()
    check_invariants(env.pg, env.psp)


# --------------------------------------------------------------- admin ops (being added to the daemon)

def test_prepared_through_daemon(env):
    d = env.daemon()
    prepare(env.pg, "ext-list-1")
    try:
        r = ctl("prepared", sock=d.socket)
        skip_if_admin_op_missing(r)
        rows = table(ok(r))
        assert [(x["gid"], x["state"]) for x in rows] == [("ext-list-1", "unknown")]
        txs = json.loads(ok(ctl("--json", "prepared", sock=d.socket)))["transactions"]
        assert len(txs) == 1 and set(txs[0]) >= {"gid", "payment_id", "account", "amount", "currency",
                                                 "prepared_at", "age_ms", "state", "node", "attempts",
                                                 "last_error"}
        assert table(ok(ctl("prepared", "--older-than", "1h", sock=d.socket))) == []
        # The daemon and --db agree.
        via_db = json.loads(ok(ctl("--db", env.pg.conninfo, "--json", "prepared")))["transactions"]
        assert [(t["gid"], t["state"], t["prepared_at"]) for t in via_db] == \
               [(t["gid"], t["state"], t["prepared_at"]) for t in txs]
    finally:
        execute(env.pg, "ROLLBACK PREPARED 'ext-list-1'")
    d.stop()
    check_invariants(env.pg, env.psp)


def test_show_pending_payment_with_its_prepared_transaction(env):
    d = env.daemon()
    c = d.client()
    env.open_account(c, "acct-sp", balance=3000)
    env.psp.faults(pending_rate=1.0, settle_ms=1500)
    p = json.loads(ok(ctl("--json", "pay", "acct-sp", 1000, "EUR", "sp-1", "--wait-ms", "0",
                          sock=d.socket)))
    assert p["status"] == "pending"
    r = ctl("show", "sp-1", sock=d.socket)
    skip_if_admin_op_missing(r)
    assert p["gid"] in prepared_gids(env.pg), "the processor holds it pending for 1.5 s"
    sec = sections(ok(r))
    assert sec["payment"]["gid"] == p["gid"] and sec["payment"]["status"] == "pending"
    assert sec["prepared transaction"]["gid"] == p["gid"]
    assert sec["prepared transaction"]["state"] in ("in_flight", "in_doubt")
    assert sec["prepared transaction"]["amount"] == "1000"
    for arg in ("sp-1", p["gid"]):
        sj = json.loads(ok(ctl("--json", "show", arg, sock=d.socket)))
        assert sj["payment"]["payment_id"] == p["payment_id"]
        assert sj["prepared"]["gid"] == p["gid"] and sj["prepared"]["payment_id"] == p["payment_id"]
    rows = table(ok(ctl("prepared", sock=d.socket)))
    assert [(x["gid"], x["account"], x["amount"]) for x in rows] == [(p["gid"], "acct-sp", "1000")]
    wait_for(lambda: c.ok("status", idempotency_key="sp-1")["status"] != "pending", timeout=20,
             what="payment settled")
    d.stop()
    check_invariants(env.pg, env.psp)


def test_resolve_with_yes(env):
    d = env.daemon()
    prepare(env.pg, "ext-resolve-2")
    try:
        r = ctl("--json", "resolve", "ext-resolve-2", "rollback", "--reason", "ticket OPS-1: not ours",
                "--yes", sock=d.socket)
        skip_if_admin_op_missing(r)
        assert json.loads(ok(r)) == {"gid": "ext-resolve-2", "outcome": "rolled_back"}
        assert "ext-resolve-2" not in prepared_gids(env.pg)
        assert env.pg.query("SELECT action, reason FROM resolutions WHERE gid = 'ext-resolve-2'") == \
               [("rollback", "ticket OPS-1: not ours")]
        # Gone now: resolving it again is an error answer.
        r = ctl("resolve", "ext-resolve-2", "rollback", "--reason", "again", "--yes", sock=d.socket)
        assert r.returncode == 1
    finally:
        if "ext-resolve-2" in prepared_gids(env.pg):
            execute(env.pg, "ROLLBACK PREPARED 'ext-resolve-2'")
    d.stop()
    check_invariants(env.pg, env.psp)


def test_recover(env):
    d = env.daemon()
    r = ctl("recover", sock=d.socket)
    skip_if_admin_op_missing(r)
    v = vertical(ok(r))
    assert set(v) >= {"checked", "committed", "rolled_back", "left"}
    j = json.loads(ok(ctl("--json", "recover", sock=d.socket)))
    assert j["committed"] == 0 and j["rolled_back"] == 0
    d.stop()
    check_invariants(env.pg, env.psp)
