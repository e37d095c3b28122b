"""Operations: the systemd notify protocol (READY, RELOADING, STOPPING,
WATCHDOG) against a fake NOTIFY_SOCKET, socket activation (LISTEN_FDS),
SIGHUP reload (a broken file keeps the old configuration), start-up refusals
(root, world-writable socket directory, readable token file), and the
Prometheus endpoint, every line parsed."""

import os
import re
import signal
import socket
import subprocess
import time
import urllib.request

import pytest

from harness import PAYCOORD_BIN, Client, check_invariants, wait_for


class FakeNotify:
    def __init__(self, workdir):
        self.path = os.path.join(workdir, "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        self.messages = []

    def drain(self):
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return self.messages

    def wait_for(self, text, timeout=15):
        def seen():
            self.drain()
            return any(text in m for m in self.messages)
        wait_for(seen, timeout=timeout, what=f"notify message {text!r}")
        return self.messages


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def test_notify_ready_reload_stopping_and_watchdog(env):
    n = FakeNotify(env.workdir)
    d = env.daemon(env={"NOTIFY_SOCKET": n.path, "WATCHDOG_USEC": "200000"})
    n.wait_for("READY=1")
    ready_at = [i for i, m in enumerate(n.messages) if "READY=1" in m][0]
    assert "STATUS=serving" in n.messages[ready_at]
    # Watchdog pings every half interval.
    time.sleep(0.6)
    assert sum("WATCHDOG=1" in m for m in n.drain()) >= 2
    # SIGHUP: RELOADING=1 with MONOTONIC_USEC, then READY=1 again.
    before = len(n.messages)
    d.proc.send_signal(signal.SIGHUP)
    n.wait_for("reloaded")
    after = [m for m in n.messages[before:] if "WATCHDOG" not in m]
    assert re.match(r"RELOADING=1\nMONOTONIC_USEC=\d+$", after[0]), after
    assert after[1].startswith("READY=1"), after
    d.stop()
    n.drain()
    assert any(m.startswith("STOPPING=1") for m in n.messages)
    order = [m.split("\n")[0] for m in n.messages if "WATCHDOG" not in m]
    assert order.index("READY=1") < order.index("RELOADING=1") < order.index("STOPPING=1")
    check_invariants(env.pg, env.psp)


def test_reload_with_broken_config_keeps_serving(env):
    n = FakeNotify(env.workdir)
    d = env.daemon(env={"NOTIFY_SOCKET": n.path})
    c = d.client()
    env.open_account(c, "acct-rl", balance=1000)
    with open(d.config, "a") as f:
        f.write("no_such_key = 1\n")
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "event=reload_failed" in d.log_text(), what="reload failure logged")
    assert "no_such_key" in d.log_text()
    assert c.ok("ping")["node"] == "t1"
    n.wait_for("reload failed")
    # A good file with a new reloadable value takes effect.
    d.settings["max_amount"] = 500
    d.write_config()
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "event=reloaded" in d.log_text(), what="reloaded")
    r = c.call("pay", account="acct-rl", amount=501, currency="EUR", idempotency_key="rl-1")
    assert r["error"]["code"] == "invalid_request" and "500" in r["error"]["message"]
    d.stop()
    check_invariants(env.pg, env.psp)


def test_socket_activation_uses_passed_fd(env):
    d = env.daemon(start=False)
    d.write_config()
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(d.socket)
    lsock.listen(16)
    fd = lsock.fileno()

    def child():
        os.dup2(fd, 3)
        os.environ["LISTEN_PID"] = str(os.getpid())
        os.environ["LISTEN_FDS"] = "1"

    d.proc = subprocess.Popen([PAYCOORD_BIN, "--config", d.config], preexec_fn=child, pass_fds=(fd, 3),
                              stdout=subprocess.DEVNULL, stderr=open(d.log, "ab"))
    lsock.close()
    wait_for(lambda: d._ready(), timeout=15, what="ready on the passed socket")
    assert "event=listening source=systemd fd=3" in d.log_text()
    c = d.client()
    env.open_account(c, "acct-sa", balance=100)
    assert c.ok("pay", account="acct-sa", amount=10, currency="EUR", idempotency_key="sa-1")["status"] == "succeeded"
    d.stop()
    assert os.path.exists(d.socket)          # systemd's socket file is left alone
    check_invariants(env.pg, env.psp, answers={"sa-1": "succeeded"})


def test_startup_refusals(env):
    d = env.daemon(start=False)
    # Root without allow_root.
    if os.geteuid() == 0:
        d.settings["allow_root"] = "false"
        d.write_config()
        r = subprocess.run([PAYCOORD_BIN, "--config", d.config], capture_output=True, text=True, timeout=10)
        assert r.returncode == 1 and "refusing to run as root" in r.stderr
        d.settings["allow_root"] = "true"
    # A socket directory others can write.
    open_dir = os.path.join(env.workdir, "open")
    os.mkdir(open_dir)
    os.chmod(open_dir, 0o777)
    d.settings["listen_socket"] = os.path.join(open_dir, "p.sock")
    d.write_config()
    r = subprocess.run([PAYCOORD_BIN, "--config", d.config], capture_output=True, text=True, timeout=10)
    assert r.returncode == 1 and "writable by others" in r.stderr
    # A token file others can read.
    d.settings["listen_socket"] = d.socket
    loose = os.path.join(env.workdir, "loose-token")
    with open(loose, "w") as f:
        f.write("t\n")
    os.chmod(loose, 0o644)
    d.settings["processor_token_file"] = loose
    d.write_config()
    r = subprocess.run([PAYCOORD_BIN, "--config", d.config], capture_output=True, text=True, timeout=10)
    assert r.returncode == 1 and "readable or writable by others" in r.stderr
    # A bad key names file and line.
    with open(d.config, "a") as f:
        f.write("pool_size = lots\n")
    r = subprocess.run([PAYCOORD_BIN, "--config", d.config, "--check-config"], capture_output=True, text=True)
    assert r.returncode == 1 and re.search(r"paycoord\.conf:\d+: pool_size: must be an integer", r.stderr), r.stderr
    check_invariants(env.pg, env.psp)


PROM_LINE = re.compile(
    r'^(# HELP [a-z_]+ .+|# TYPE [a-z_]+ (counter|gauge|histogram)|'
    r'[a-z_]+(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? -?[0-9.e+]+(\.[0-9]+)?)$')


def test_metrics_endpoint(env):
    port = free_port()
    d = env.daemon(metrics_listen=f"127.0.0.1:{port}")
    c = d.client()
    env.open_account(c, "acct-m", balance=1000)
    c.ok("pay", account="acct-m", amount=10, currency="EUR", idempotency_key="m-1")
    c.ok("pay", account="acct-m", amount=5000, currency="EUR", idempotency_key="m-2")
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values = {}
    for line in body.strip().split("\n"):
        assert PROM_LINE.match(line), f"not Prometheus text: {line!r}"
        if not line.startswith("#"):
            name, val = line.rsplit(" ", 1)
            values[name] = float(val)
    assert values['paycoord_payments_total{status="succeeded"}'] == 1
    assert values['paycoord_payments_total{status="insufficient_funds"}'] == 1
    assert values["paycoord_node_lock_held"] == 1 and values["paycoord_database_up"] == 1
    assert values['paycoord_processor_latency_ms_bucket{le="+Inf"}'] == values["paycoord_processor_latency_ms_count"] >= 1
    assert values["paycoord_circuit_state"] == 0
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=5)
    d.stop()
    check_invariants(env.pg, env.psp, answers={"m-1": "succeeded", "m-2": "insufficient_funds"})


def test_systemd_units_verify(env, tmp_path):
    """The unit files pass `systemd-analyze verify` (ExecStart pointed at the
    built binary, since verify checks that it exists)."""
    src = os.path.join(os.path.dirname(__file__), "..", "..", "coordinator", "systemd")
    for name in ("paycoord.service", "paycoord.socket"):
        with open(os.path.join(src, name)) as f:
            text = f.read().replace("/usr/sbin/paycoord", PAYCOORD_BIN)
        (tmp_path / name).write_text(text)
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / "paycoord.service"),
                        str(tmp_path / "paycoord.socket")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
    check_invariants(env.pg, env.psp)
