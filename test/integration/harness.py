"""Integration harness: a throwaway PostgreSQL, the test processor, the real
paycoord binary, a protocol client, and the invariant checker (I1-I7,
docs/architecture.md "Invariants") that every integration test ends with."""

import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request

import psycopg

SRC = os.environ.get("PAYCOORD_SRC") or os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BUILD = os.environ.get("PAYCOORD_BUILD") or os.path.join(SRC, "build")
PAYCOORD_BIN = os.environ.get("PAYCOORD_BIN") or os.path.join(BUILD, "coordinator", "paycoord")
PSP_SIM = os.environ.get("PSP_SIM") or os.path.join(BUILD, "test", "processor", "psp-sim")
PG_SH = os.path.join(SRC, "test", "pg.sh")
TOKEN = "test-token-0123456789"
# The processor API the suite runs against (psp-sim --mode and the daemon's
# processor_api): generic, stripe or adyen. test/run-tests.sh runs the suite
# once per value.
PROCESSOR = os.environ.get("PC_PROCESSOR", "generic")
# Webhook secrets the test processor signs with: Stripe's whsec_ string as
# given, Adyen's HMAC key in hex (the example key of Adyen's documentation).
WEBHOOK_SECRETS = {"stripe": "whsec_psp_sim_test_secret",
                   "adyen": "44782DEF547AAA06C910C43932B1EB0C71FC68D9D0C057550C48EC2ACF6BA056"}
ADYEN_MERCHANT = "PspSimMerchant"


# The processor's own id of a payment, per API (psp-sim's formats).
ID_PATTERN = {"generic": r"psp_\d{12}", "stripe": r"pi_\d{24}", "adyen": r"\d{16}"}[PROCESSOR]
# The decline code of a plain decline by the test processor, as paycoord reports it.
DECLINE_CODE = {"generic": "card_declined", "stripe": "generic_decline", "adyen": "Refused"}[PROCESSOR]
# What recovery makes of a prepared debit whose create never reached the
# processor, while its deadline is ahead (docs/processors.md): the generic
# contract cancels by key (a tombstone): declined; Stripe and Adyen replay
# the identical create with the same key, which performs it now: succeeded.
# (Past the deadline: generic declined; Stripe declined once its search is
# conclusive; Adyen manual review, as its technical cancel finds nothing.)
NEVER_SENT = {"generic": "declined", "stripe": "succeeded", "adyen": "succeeded"}[PROCESSOR]


# The path of a create, per API (pspproxy rules match on it).
CREATE_PATH = {"generic": "/v1/payments", "stripe": "/v1/payment_intents", "adyen": "/v71/payments"}[PROCESSOR]
# An answer that says our key was used with another request (manual review):
# generic 409 idempotency_conflict; Stripe 400 idempotency_error; Adyen
# documents none (its adapter never answers a conflict).
CONFLICT = {"generic": (409, None),
            "stripe": (400, {"error": {"type": "idempotency_error",
                                       "message": "Keys for idempotent requests can only be used with the same "
                                                  "parameters they were first used with."}}),
            "adyen": None}[PROCESSOR]


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def only_processors(*modes, why):
    """Mark a test that holds only for these processor APIs (a contract-
    specific behaviour); it is skipped, with the reason, for the others."""
    import pytest
    return pytest.mark.skipif(PROCESSOR not in modes, reason=f"{PROCESSOR}: {why}")


def wait_for(pred, timeout=10.0, interval=0.02, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# --------------------------------------------------------------- PostgreSQL

class Postgres:
    """A private cluster made by test/pg.sh, Unix socket only. With
    PC_TEST_PGBOUNCER=session the daemons reach it through pgbouncer in that
    pooling mode (test/ha/pgbouncer.py; the tests' own connections stay
    direct): daemon_conninfo is what a daemon is given."""

    def __init__(self, max_prepared=1000):
        self.dir = tempfile.mkdtemp(prefix="pc-it-pg-")
        os.chmod(self.dir, 0o755)
        self.env = dict(os.environ, PC_PG_MAX_PREPARED=str(max_prepared), PC_PG_FSYNC="off")
        self.sock = os.path.join(self.dir, "sock")
        self.conninfo = f"host={self.sock} dbname=paycoord user=postgres"
        self.daemon_conninfo = self.conninfo
        self.bouncer = None

    def _pg(self, *args):
        subprocess.run([PG_SH, *args, self.dir], check=True, env=self.env,
                       stdout=subprocess.DEVNULL)

    def start(self):
        self._pg("start")
        mode = os.environ.get("PC_TEST_PGBOUNCER")
        if mode and self.bouncer is None:
            import sys
            sys.path.insert(0, os.path.join(SRC, "test", "ha"))
            from pgbouncer import PgBouncer
            self.bouncer = PgBouncer(self.sock, mode=mode, workdir=self.dir).start()
            self.daemon_conninfo = self.bouncer.conninfo

    def migrate(self):
        self._pg("migrate")

    def stop(self):
        self._pg("stop")

    def kill(self):
        self._pg("kill")

    def restart(self):
        self._pg("restart")

    def destroy(self):
        if self.bouncer:
            self.bouncer.stop()
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def connect(self):
        return psycopg.connect(self.conninfo, autocommit=True)

    def query(self, sql, params=None):
        with self.connect() as c:
            return c.execute(sql, params).fetchall()

    def reset(self):
        """Empty every table and drop leftover prepared transactions."""
        with self.connect() as c:
            for (gid,) in c.execute("SELECT gid FROM pg_prepared_xacts").fetchall():
                c.execute(f"ROLLBACK PREPARED '{gid}'")
            c.execute("TRUNCATE ledger, payments, credits, resolutions, accounts, processor_events, recovery_state, "
                      "discrepancy_settlements, discrepancies, recon_seen, recon_runs")


# --------------------------------------------------------------- processor

class Processor:
    """The test processor (psp-sim) and its control endpoint. mode: generic,
    stripe or adyen (docs/processor.md); webhook_url/webhook_secret for the
    latter two (also settable later with set_webhook)."""

    def __init__(self, workdir, mode=None, webhook_url=None, webhook_secret=None):
        mode = mode or PROCESSOR
        self.workdir = workdir
        self.mode = mode
        self.webhook_url = webhook_url
        self.webhook_secret = webhook_secret or WEBHOOK_SECRETS.get(mode)
        self.token_file = os.path.join(workdir, "psp-token")
        with open(self.token_file, "w") as f:
            f.write(TOKEN + "\n")
        os.chmod(self.token_file, 0o600)
        self.proc = None
        self.port = self.control_port = None

    def start(self, port=0):
        cmd = [PSP_SIM, "--port", str(port), "--control-port", "0", "--token-file", self.token_file, "--quiet",
               "--mode", self.mode]
        if self.webhook_url:
            cmd += ["--webhook-url", self.webhook_url]
        if self.webhook_secret:
            cmd += ["--webhook-secret", self.webhook_secret]
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE, stderr=open(os.path.join(self.workdir, "psp-sim.log"), "ab"), text=True)
        line = self.proc.stdout.readline()
        m = re.search(r"port=(\d+) control_port=(\d+)", line)
        assert m, f"psp-sim did not start: {line!r}"
        self.port, self.control_port = int(m.group(1)), int(m.group(2))

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def daemon_settings(self, workdir):
        """What a daemon needs to talk to this processor in its mode."""
        if self.mode == "generic":
            return {"processor_api": "generic"}
        secret = os.path.join(workdir, f"{self.mode}-webhook-secret")
        with open(secret, "w") as f:
            f.write(self.webhook_secret + "\n")
        os.chmod(secret, 0o600)
        out = {"processor_api": self.mode, "webhook_listen": f"127.0.0.1:{free_port()}"}
        if self.mode == "stripe":
            out.update(stripe_webhook_secret_file=secret, stripe_search_lag_s=1)
        else:
            out.update(processor_url=self.url + "/v71", adyen_merchant_account=ADYEN_MERCHANT,
                       adyen_hmac_key_file=secret, adyen_webhook_timeout_s=5)
        return out

    def status(self, gid):
        """The processor's own status of gid (its list), or None."""
        for p in self.all_payments():
            if p["idempotency_key"] == gid:
                return p["status"]
        return None

    def _req(self, method, path, body=None, port=None, auth=False):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"http://127.0.0.1:{port or self.control_port}{path}", data=data,
                                     method=method, headers={"Content-Type": "application/json"})
        if auth:
            req.add_header("Authorization", f"Bearer {TOKEN}")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def faults(self, **kw):
        st, body = self._req("POST", "/control", kw)
        assert st == 200, body
        return body

    def reset(self, payments=True):
        st, _ = self._req("POST", "/control/reset?payments=1" if payments else "/control/reset", {})
        assert st == 200

    def counters(self):
        return self._req("GET", "/control")[1]["counters"]

    def get(self, gid):
        return self._req("GET", "/v1/payments/" + urllib.request.quote(gid, safe=""), port=self.port, auth=True)

    def create(self, gid, amount, currency, account):
        body = {"idempotency_key": gid, "amount": amount, "currency": currency, "account": account}
        data = json.dumps(body).encode()
        req = urllib.request.Request(f"{self.url}/v1/payments", data=data, method="POST",
                                     headers={"Content-Type": "application/json", "Idempotency-Key": gid,
                                              "Authorization": f"Bearer {TOKEN}"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def set_webhook(self, url=None, secret=None):
        body = {k: v for k, v in (("url", url), ("secret", secret)) if v is not None}
        st, cfg = self._req("POST", "/control/webhook", body)
        assert st == 200, cfg
        return cfg

    def refund(self, gid):
        data = b"{}"
        req = urllib.request.Request(f"{self.url}/v1/payments/{urllib.request.quote(gid, safe='')}/refund", data=data,
                                     method="POST", headers={"Content-Type": "application/json",
                                                             "Authorization": f"Bearer {TOKEN}"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def all_payments(self):
        """Every payment the processor holds: through the contract's list call
        in generic mode, else through psp-sim's mode-independent
        /control/payments (key = Idempotency-Key or metadata gid for Stripe,
        merchant reference for Adyen), in the same shape."""
        if self.mode != "generic":
            return self._control_payments()
        out, after = [], None
        while True:
            q = "/v1/payments?created_gte=0&created_lt=9999999999&limit=1000"
            if after:
                q += "&starting_after=" + after
            st, body = self._req("GET", q, port=self.port, auth=True)
            assert st == 200, body
            out.extend(body["data"])
            if not body["has_more"]:
                return out
            after = body["data"][-1]["id"]

    def _control_payments(self):
        out, after = [], None
        while True:
            q = "/control/payments?limit=1000" + (f"&starting_after={after}" if after else "")
            st, body = self._req("GET", q)
            assert st == 200, body
            for p in body["data"]:
                out.append(dict(p, idempotency_key=p["key"], id=p["processor_id"]))
            if not body["has_more"]:
                return out
            after = body["data"][-1]["processor_id"]


# --------------------------------------------------------------- daemon

class Client:
    """One connection speaking NDJSON; responses matched by id."""

    _ids = itertools.count(1)

    def __init__(self, path, timeout=30.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""
        self.pending = {}

    def close(self):
        self.sock.close()

    def send_raw(self, data: bytes):
        self.sock.sendall(data)

    def read_line(self):
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("daemon closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def send(self, op, **fields):
        rid = next(self._ids)
        self.sock.sendall((json.dumps({"id": rid, "op": op, **fields}) + "\n").encode())
        return rid

    def wait(self, rid):
        while rid not in self.pending:
            msg = self.read_line()
            self.pending[msg["id"]] = msg
        return self.pending.pop(rid)

    def call(self, op, **fields):
        return self.wait(self.send(op, **fields))

    def ok(self, op, **fields):
        r = self.call(op, **fields)
        assert r.get("ok") is True, r
        return r["result"]


class Daemon:
    def __init__(self, workdir, pg, psp, **settings):
        self.workdir = workdir
        self.pg, self.psp = pg, psp
        self.socket = os.path.join(workdir, "paycoord.sock")
        self.config = os.path.join(workdir, "paycoord.conf")
        self.log = os.path.join(workdir, "paycoord.log")
        self.settings = {
            **(psp.daemon_settings(workdir) if psp else {}),
            "listen_socket": self.socket,
            "db_conninfo": getattr(pg, "daemon_conninfo", pg.conninfo),
            "pool_size": 4,
            "node_id": "t1",
            "processor_url": psp.url if psp else "http://127.0.0.1:9",
            "processor_token_file": psp.token_file if psp else "",
            "processor_timeout_ms": 2000,
            "processor_retry_base_ms": 20,
            "processor_poll_ms": 50,
            "pay_wait_ms": 10000,
            "payment_deadline_ms": 5000,
            "drain_timeout_ms": 3000,
            "log_level": "info",
            "allow_root": "true" if os.geteuid() == 0 else "false",
            # No scheduled reconciliation run unless a test asks for one.
            "recon_schedule": "",
        }
        self.settings.update(settings)
        if "processor_url" not in settings and psp and psp.mode == "adyen":
            self.settings["processor_url"] = psp.url + "/v71"
        self.proc = None
        self.env = {}
        self.bin = PAYCOORD_BIN          # a test may point one daemon at another build (e.g. ASan)

    def write_config(self):
        with open(self.config, "w") as f:
            for k, v in self.settings.items():
                f.write(f"{k} = {v}\n")

    @property
    def webhook_url(self):
        listen = self.settings.get("webhook_listen")
        return f"http://{listen}/webhook" if listen else None

    def start(self, wait_ready=True, env=None):
        self.write_config()
        if self.psp and self.psp.mode != "generic" and self.webhook_url:
            self.psp.set_webhook(url=self.webhook_url, secret=self.psp.webhook_secret)
        e = dict(os.environ)
        e.update(env or {})
        self.proc = subprocess.Popen([self.bin, "--config", self.config], env=e,
                                     stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"))
        wait_for(lambda: os.path.exists(self.socket) or self.proc.poll() is not None, what="daemon socket")
        assert self.proc.poll() is None, f"daemon exited: {self.tail()}"
        if wait_ready:
            wait_for(lambda: self._ready(), timeout=15, what="daemon ready")
        return self

    def _ready(self):
        try:
            c = Client(self.socket, timeout=5)
            try:
                return c.call("health")["result"]["ready"]
            finally:
                c.close()
        except (OSError, ConnectionError):
            return False

    def client(self, timeout=30.0):
        return Client(self.socket, timeout)

    def stop(self, expect_rc=0):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            rc = self.proc.wait(30)
            assert rc == expect_rc, f"daemon exit code {rc}: {self.tail()}"

    def kill9(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def tail(self, n=40):
        try:
            with open(self.log, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def log_text(self):
        with open(self.log, errors="replace") as f:
            return f.read()


# --------------------------------------------------------------- direct DB setups

def prepare_debit(pg, key, account, amount, node="t1", currency="EUR", deadline_ms=60000, payment_id=None,
                  legacy=False):
    """A prepared debit of `node` made by hand, as a daemon that died right
    after PREPARE leaves it: the intent row (pending) and the prepared
    transaction holding the debit. legacy: as paycoord 0.1 prepared it
    (pc_pay_debit, which also wrote the payment row inside the prepared
    transaction and so holds its row lock). Returns (payment_id, gid)."""
    import uuid
    pid = uuid.UUID(payment_id) if payment_id else uuid.uuid4()
    gid = f"pc:{node}:{pid.hex}"
    with pg.connect() as c:
        c.execute("SELECT pc_pay_intent(%s, %s, %s, %s, %s, NULL, NULL, %s, %s, %s)",
                  (pid, key, account, amount, currency, gid, node, deadline_ms))
        c.execute("BEGIN")
        c.execute(f"SELECT {'pc_pay_debit' if legacy else 'pc_pay_debit2'}(%s, %s, %s)", (pid, account, amount))
        c.execute(f"PREPARE TRANSACTION '{gid}'")
    return str(pid), gid


def pending_intent(pg, key, account, amount, node="t1", currency="EUR", deadline_ms=60000):
    """A 'pending' payment row with no debit (a daemon that died between the
    intent's commit and PREPARE). Returns (payment_id, gid)."""
    import uuid
    pid = uuid.uuid4()
    gid = f"pc:{node}:{pid.hex}"
    pg.query("SELECT pc_pay_intent(%s, %s, %s, %s, %s, NULL, NULL, %s, %s, %s)",
             (pid, key, account, amount, currency, gid, node, deadline_ms))
    return str(pid), gid


def timed_call(daemon, seconds, op, **fields):
    """One request on a fresh connection; the answer, or None if none came
    within `seconds` (the connection is then dropped)."""
    try:
        c = daemon.client(timeout=seconds)
    except OSError:
        return None
    try:
        return c.call(op, **fields)
    except (socket.timeout, TimeoutError):
        return None
    except (ConnectionError, OSError):
        return None
    finally:
        c.close()


def resolve_reviews(client, psp, reason="checked against the processor's own list (test operator)"):
    """Act as the operator for every gid in manual review: settle it as the
    processor's own list says (commit when it charged, roll back otherwise).
    Returns {gid: (processor status or None, outcome)}."""
    done = {}
    for t in client.ok("prepared")["transactions"]:
        if t["state"] != "review":
            continue
        st = psp.status(t["gid"])
        action = "commit" if st == "succeeded" else "rollback"
        r = client.ok("resolve", gid=t["gid"], action=action, reason=reason)
        done[t["gid"]] = (st, r["outcome"])
    return done


# --------------------------------------------------------------- invariants

FINAL = {"succeeded", "declined", "insufficient_funds"}


def check_invariants(pg, psp, answers=None, allow_pending=False, node="t1"):
    """I1-I7 (docs/architecture.md, "Invariants") against the database and
    the processor's own list.

    answers: {idempotency_key: final status a client was told} (I6).
    allow_pending: payments still legitimately unsettled (I2/I5 then checked
    only for the settled ones)."""
    with pg.connect() as c:
        accounts = c.execute("SELECT id, balance FROM accounts").fetchall()
        ledger = dict(c.execute("SELECT account_id, sum(amount) FROM ledger GROUP BY account_id").fetchall())
        credits = dict(c.execute(
            "SELECT account_id, sum(amount) FROM credits WHERE status = 'applied' GROUP BY account_id").fetchall())
        # A payment's status is derived: 'succeeded' exactly when its ledger
        # debit is committed (payments_view, docs/schema.md).
        debits = dict(c.execute(
            "SELECT account_id, sum(amount) FROM payments_view WHERE derived_status = 'succeeded' "
            "GROUP BY account_id").fetchall())
        payments = c.execute(
            "SELECT idempotency_key, gid, derived_status, amount, account_id FROM payments_view").fetchall()
        debit_rows = dict(c.execute(
            "SELECT p.gid, count(l.*) FROM payments p LEFT JOIN ledger l ON l.payment_id = p.payment_id "
            "GROUP BY p.gid").fetchall())
        prepared = [g for (g,) in c.execute("SELECT gid FROM pg_prepared_xacts WHERE gid LIKE 'pc:%'").fetchall()]
        # Compensating entries (a discrepancy settled by hand, docs/reconciliation.md)
        # and the gids an operator settled that way: for those the processor and
        # our payment rows disagree on purpose; the ledger entry makes up for it.
        compensations = dict(c.execute(
            "SELECT account_id, sum(amount) FROM ledger WHERE discrepancy_id IS NOT NULL GROUP BY account_id").fetchall())
        reconciled = {g for (g,) in c.execute(
            "SELECT d.gid FROM discrepancies d WHERE d.state = 'resolved' AND EXISTS "
            "(SELECT 1 FROM discrepancy_settlements s WHERE s.discrepancy_id = d.discrepancy_id "
            " AND s.outcome = 'settled')").fetchall()}
        bad_compensations = c.execute(
            "SELECT l.entry_id FROM ledger l JOIN discrepancies d USING (discrepancy_id) "
            "WHERE d.state <> 'resolved' OR (SELECT count(*) FROM ledger l2 WHERE l2.discrepancy_id = d.discrepancy_id) "
            "<> 1").fetchall()
        applied_credit_rows = c.execute(
            "SELECT count(*) FROM credits c WHERE status = 'applied' AND "
            "(SELECT count(*) FROM ledger l WHERE l.credit_id = c.credit_id) <> 1").fetchone()[0]

    # I4: no balance negative.
    for acct, bal in accounts:
        assert bal >= 0, f"I4: account {acct} balance {bal} < 0"
    # I1: conservation, ledger sums to balance.
    for acct, bal in accounts:
        assert ledger.get(acct, 0) == bal, f"I1: ledger of {acct} sums to {ledger.get(acct, 0)}, balance {bal}"
        assert credits.get(acct, 0) - debits.get(acct, 0) + compensations.get(acct, 0) == bal, \
            f"I1: {acct}: credits {credits.get(acct, 0)} - debits {debits.get(acct, 0)} + compensating entries " \
            f"{compensations.get(acct, 0)} != balance {bal}"
    assert not bad_compensations, f"I1: compensating entries not tied to one settled discrepancy: {bad_compensations}"
    assert applied_credit_rows == 0, "I1: an applied credit without exactly one ledger entry"

    psp_list = psp.all_payments() if psp else []
    by_gid = {}
    for p in psp_list:
        assert p["idempotency_key"] not in by_gid, f"I3: processor holds key {p['idempotency_key']} twice"
        by_gid[p["idempotency_key"]] = p
    ours = {gid: (key, status, amount) for key, gid, status, amount, _ in payments}
    keys_seen = {}
    for key, gid, status, amount, acct in payments:
        assert key not in keys_seen, f"I3: idempotency key {key} has two payments"
        keys_seen[key] = gid
        psp_p = by_gid.get(gid)
        charged = psp_p is not None and psp_p["status"] == "succeeded"
        if gid in reconciled:
            continue                # settled by hand with a compensating entry (or accepted)
        if status == "succeeded":
            # I2: committed debit <=> processor succeeded.
            assert charged, f"I2: {gid} committed but processor says {psp_p and psp_p['status']}"
            assert psp_p["amount"] == amount, f"I2: {gid} amount {amount} but processor charged {psp_p['amount']}"
            assert debit_rows.get(gid) == 1, f"I1: {gid} succeeded with {debit_rows.get(gid)} ledger debits"
        elif status in ("declined", "insufficient_funds"):
            assert not charged, f"I2: {gid} is {status} but the processor charged it (money lost)"
            assert debit_rows.get(gid, 0) == 0, f"I1: {gid} {status} but has a ledger debit"
            if status == "insufficient_funds":
                assert psp_p is None, f"insufficient_funds {gid} reached the processor"
        else:
            assert allow_pending, f"I5: payment {gid} ({key}) still pending"
    # I3 (no charge without a committed debit): every processor charge is one of our succeeded payments.
    for gid, p in by_gid.items():
        if gid in reconciled or not gid or not gid.startswith("pc:"):
            continue                # settled by hand, or not a key paycoord could have made
        if p["status"] == "succeeded" and not (p.get("refunded") and gid not in ours):
            # (a charge refunded at the processor with no payment row of ours is
            # an operator's reconciliation of a lost write, not a charge)
            assert gid in ours, f"I3: processor charged {gid}, which has no payment row"
            if not allow_pending:
                assert ours[gid][1] == "succeeded", f"I2: processor charged {gid} but payment is {ours[gid][1]}"
    # I5: no orphan prepared transactions left.
    if not allow_pending:
        assert prepared == [], f"I5: prepared transactions left: {prepared[:5]}"
    # The rows' own status column catches up with the derived status (the
    # daemon writes it after COMMIT PREPARED; recovery repairs a lost write).
    if not allow_pending:
        def stale():
            return pg.query("SELECT gid, status, derived_status FROM payments_view WHERE status <> derived_status")
        deadline = time.monotonic() + 5
        while stale() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not stale(), f"row status never caught up with the derived status: {stale()[:5]}"
    # I6: every final answer a client got is still the answer.
    if answers:
        stored = {key: status for key, _, status, _, _ in payments}
        for key, status in answers.items():
            assert stored.get(key) == status, f"I6: {key} was answered {status}, now {stored.get(key)}"
    return {"accounts": len(accounts), "payments": len(payments), "processor": len(psp_list)}
