"""Fixtures for the psp-sim tests: each test starts its own psp-sim on free
loopback ports (binary from $PSP_SIM) and, at the end, checks that it is
still alive and exits 0 on SIGTERM (so a crash or, under ASan, a leak fails
the test that caused it)."""

import http.client
import json
import os
import select
import signal
import subprocess
import time
import urllib.parse

import pytest

DEFAULT_BIN = "/work/main/build-sim/test/processor/psp-sim"


def sim_binary():
    return os.environ.get("PSP_SIM", DEFAULT_BIN)


class Sim:
    """A running psp-sim and small HTTP helpers around it."""

    def __init__(self, tmp_path, args=(), token=None, state=None):
        self.tmp_path = tmp_path
        self.token = token
        self.args = list(args)
        self.state = state
        self.proc = None
        self.port = None
        self.control_port = None
        self.stderr_path = tmp_path / f"psp-sim-{time.monotonic_ns()}.log"
        self.start()

    # -- process --------------------------------------------------------
    def start(self, extra=()):
        cmd = [sim_binary(), "--port", str(self.port or 0)]
        if self.token is not None:
            cmd += ["--token", self.token]
        if self.state is not None:
            cmd += ["--state", str(self.state)]
        cmd += self.args + list(extra)
        self.stopped = False
        self.stderr = open(self.stderr_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.stderr)
        line = read_line(self.proc, 10)
        fields = parse_ready(line)
        self.port, self.control_port = fields["port"], fields["control_port"]

    def stop(self, sig=signal.SIGTERM, timeout=10):
        """Sends sig and returns the exit code."""
        self.stopped = True
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        finally:
            self.stderr.close()
        self.proc.stdout.close()
        return rc

    def restart(self):
        assert self.stop() == 0, self.log()
        self.start()

    def log(self):
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    # -- HTTP -----------------------------------------------------------
    def headers(self, extra=None, auth=True):
        h = {"Content-Type": "application/json"}
        if auth and self.token is not None:
            h["Authorization"] = f"Bearer {self.token}"
        if extra:
            h.update(extra)
        return h

    def request(self, method, path, body=None, headers=None, port=None, timeout=10, conn=None, auth=True):
        """Returns (status, parsed JSON body or raw text, seconds)."""
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body)
        own = conn is None
        if own:
            conn = http.client.HTTPConnection("127.0.0.1", port or self.port, timeout=timeout)
        t0 = time.monotonic()
        try:
            conn.request(method, path, body=body, headers=self.headers(headers, auth))
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            if own:
                conn.close()
        elapsed = time.monotonic() - t0
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            data = raw.decode(errors="replace")
        return resp.status, data, elapsed

    def create(self, key, amount=1250, currency="EUR", account="acct-42", reference="ref-1",
               metadata=None, header_key=None, conn=None, timeout=10):
        body = {"idempotency_key": key, "amount": amount, "currency": currency, "account": account}
        if reference is not None:
            body["reference"] = reference
        if metadata is not None:
            body["metadata"] = metadata
        hk = key if header_key is None else header_key
        return self.request("POST", "/v1/payments", body, headers={"Idempotency-Key": hk}, conn=conn,
                            timeout=timeout)

    def get(self, key, conn=None):
        return self.request("GET", "/v1/payments/" + quote(key), conn=conn)

    def cancel(self, key):
        return self.request("POST", f"/v1/payments/{quote(key)}/cancel")

    def refund(self, key):
        return self.request("POST", f"/v1/payments/{quote(key)}/refund",
                            headers={"Idempotency-Key": "refund:" + key})

    def list(self, **params):
        qs = urllib.parse.urlencode(params)
        return self.request("GET", "/v1/payments" + ("?" + qs if qs else ""))

    # -- control --------------------------------------------------------
    def control(self, faults=None):
        if faults is None:
            status, data, _ = self.request("GET", "/control", port=self.control_port, auth=False)
        else:
            status, data, _ = self.request("POST", "/control", faults, port=self.control_port, auth=False)
        assert status == 200, data
        return data

    def counters(self):
        return self.control()["counters"]

    def reset(self, payments=False):
        path = "/control/reset" + ("?payments=1" if payments else "")
        status, data, _ = self.request("POST", path, port=self.control_port, auth=False)
        assert status == 200, data
        return data

    def wait_for(self, pred, timeout=5.0, what="condition"):
        deadline = time.monotonic() + timeout
        while True:
            value = self.control()
            if pred(value):
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {value}")
            time.sleep(0.02)


def quote(key):
    return urllib.parse.quote(key, safe="")


def read_line(proc, timeout):
    deadline = time.monotonic() + timeout
    buf = b""
    fd = proc.stdout.fileno()
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            proc.kill()
            raise AssertionError(f"psp-sim did not get ready: {buf!r}")
        r, _, _ = select.select([fd], [], [], left)
        if r:
            chunk = os.read(fd, 1)
            if not chunk:
                raise AssertionError(f"psp-sim exited early (rc={proc.wait()}): {buf!r}")
            buf += chunk
    return buf.decode()


def parse_ready(line):
    words = line.split()
    assert words[:2] == ["psp-sim", "listening"] and len(words) == 4, line
    fields = dict(w.split("=", 1) for w in words[2:])
    assert set(fields) == {"port", "control_port"}, line
    return {k: int(v) for k, v in fields.items()}


@pytest.fixture
def make_sim(tmp_path):
    sims = []

    def make(**kw):
        s = Sim(tmp_path, **kw)
        sims.append(s)
        return s

    yield make
    for s in sims:
        if not s.stopped:  # else the test stopped it and checked the code
            assert s.proc.poll() is None, f"psp-sim died during the test:\n{s.log()}"
            rc = s.stop()
            assert rc == 0, f"psp-sim exited {rc} on SIGTERM:\n{s.log()}"
        assert "ERROR: AddressSanitizer" not in s.log(), s.log()
        assert "runtime error:" not in s.log(), s.log()


@pytest.fixture
def sim(make_sim):
    return make_sim()
