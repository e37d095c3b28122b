"""A dead primary host over TCP (tcp_failover.py), in a private network
namespace so that dropping the primary's packets touches nothing else on the
machine. Needs root (unshare -n, nft); skipped with the reason otherwise.
The control run shows that without keepalives and tcp_user_timeout the
daemon would not notice the dead host at all within 15 s."""

import json
import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def netns_available():
    if os.geteuid() != 0:
        return "needs root for a network namespace"
    for tool in ("unshare", "nft", "ip", "ss"):
        if not shutil.which(tool):
            return f"{tool} not found (.ci/packages)"
    r = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True)
    return None if r.returncode == 0 else f"unshare -n fails here: {r.stderr.strip()}"


def run(capsys, *args):
    why = netns_available()
    if why:
        pytest.skip(why)
    r = subprocess.run(["unshare", "-n", sys.executable, os.path.join(HERE, "tcp_failover.py"), *args],
                       capture_output=True, text=True, timeout=240)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    result = json.loads(lines[-1]) if lines else {}
    with capsys.disabled():
        print(f"tcp failover{' ' + ' '.join(args) if args else ''}: {json.dumps(result)}", flush=True)
    assert r.returncode == 0 and result.get("ok"), f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return result


def test_dead_host_over_tcp_noticed_within_seconds(capsys):
    res = run(capsys)
    # keepalives (3 s idle, 1 s interval) and tcp_user_timeout (4 s): the
    # dead host is given up within about 5 s, the next host answers at once.
    assert res["death_to_first_ms"] < 15000, res


def test_without_keepalives_the_dead_host_is_not_noticed(capsys):
    res = run(capsys, "--no-keepalives")
    assert res["answered_within_15s"] is False, res


def test_tcp_user_timeout_must_stay_below_the_connect_timeout(tmp_path):
    """Otherwise a dead first host of a multi-host conninfo would use up the
    whole attempt and the next host would never be tried."""
    from harness import PAYCOORD_BIN
    token = tmp_path / "token"
    token.write_text("t\n")
    token.chmod(0o600)
    conf = tmp_path / "paycoord.conf"
    base = f"processor_token_file = {token}\nallow_root = true\n"
    conf.write_text(base + "db_connect_timeout_ms = 3000\ndb_tcp_user_timeout_ms = 3000\n")
    r = subprocess.run([PAYCOORD_BIN, "--config", str(conf), "--check-config"], capture_output=True, text=True)
    assert r.returncode == 1 and "db_tcp_user_timeout_ms: must be below db_connect_timeout_ms" in r.stderr, r.stderr
    conf.write_text(base + "db_connect_timeout_ms = 3000\ndb_tcp_user_timeout_ms = 2000\n")
    r = subprocess.run([PAYCOORD_BIN, "--config", str(conf), "--check-config"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
