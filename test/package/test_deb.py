#!/usr/bin/python3
"""The Debian package, end to end, as an operator would use it.

Builds paycoord_<version>_amd64.deb from a clean copy of the tree
(dpkg-buildpackage -b -us -uc), runs lintian on it (no error, no warning),
installs it with `apt-get install ./paycoord_*.deb`, checks every installed
file (the exact file list, owners, modes, contents), `systemd-analyze verify`s
the installed units, runs the installed paycoord-migrate against a throwaway
PostgreSQL (test/pg.sh), runs the installed daemon as the `paycoord` user with
the shipped /etc/paycoord/paycoord.conf edited as docs/operations.md says (its
database, the test processor, the token at /etc/paycoord/processor.token),
makes one payment with the installed paycoordctl and checks the invariants,
then removes and purges the package and checks what is left.

Run by test/run-tests.sh once (not per build variant). Needs root and a
machine without a paycoord package of its own: otherwise it prints why the
package stage is skipped and exits 0.

Environment: PSP_SIM (the test processor; default: the one the package build
compiles), PAYCOORD_BIN (a test build of the daemon, with fail points: the
check that the packaged daemon has none is shown to be able to fail on it),
PC_PKG_KEEP=1 keeps the build directory.
"""

import fcntl
import json
import os
import pwd
import grp
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time

SRC = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(SRC, "test", "integration"))

PKG = "paycoord"
MARKER = "/var/lib/paycoord-package-test.installed"   # this test installed the package
LOCK = "/run/lock/paycoord-package-test.lock"
CONF = "/etc/paycoord/paycoord.conf"
TOKEN_FILE = "/etc/paycoord/processor.token"
SOCK = "/run/paycoord/paycoord.sock"
T0 = time.monotonic()


def say(msg):
    print(f"[package {time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def skip(why):
    print(f"=== package stage SKIPPED: {why}", flush=True)
    sys.exit(0)


def run(cmd, check=True, timeout=600, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {r.returncode}\n"
                             f"stdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}")
    return r


def pkg_status():
    """dpkg's status of paycoord: '' when unknown or not installed."""
    r = run(["dpkg-query", "-W", "-f=${db:Status-Abbrev}|${Version}", PKG], check=False)
    if r.returncode != 0:
        return "", ""
    abbrev, _, version = r.stdout.partition("|")
    return abbrev.strip(), version


def apt(*args, cwd=None):
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    return run(["apt-get", "-y", "-q", "-o", "DPkg::Lock::Timeout=300", *args], env=env, timeout=900, cwd=cwd)


def mode_owner(path):
    st = os.lstat(path)
    return (stat.S_IMODE(st.st_mode), pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def project_version():
    with open(os.path.join(SRC, "CMakeLists.txt")) as f:
        m = re.search(r"project\(paycoord VERSION ([0-9.]+)", f.read())
    assert m, "no project VERSION in CMakeLists.txt"
    return m.group(1)


# ------------------------------------------------------------------ stages

def copy_tree(dst):
    """A clean copy: the files git knows (tracked, or new and not ignored)."""
    git = run(["git", "-C", SRC, "ls-files", "-z", "--cached", "--others", "--exclude-standard"], check=False)
    os.makedirs(dst)
    if git.returncode == 0:
        names = [n for n in git.stdout.split("\0") if n and os.path.lexists(os.path.join(SRC, n))]
        for n in names:
            os.makedirs(os.path.dirname(os.path.join(dst, n)), exist_ok=True)
            shutil.copy2(os.path.join(SRC, n), os.path.join(dst, n), follow_symlinks=False)
    else:       # not a git checkout: everything but build trees
        shutil.rmtree(dst)
        shutil.copytree(SRC, dst, symlinks=True,
                        ignore=shutil.ignore_patterns("build*", "__pycache__", ".pytest_cache", "tmp"))


def build(work):
    src = os.path.join(work, "src")
    copy_tree(src)
    say("dpkg-buildpackage -b -us -uc (clean copy in %s)" % src)
    t = time.monotonic()
    r = subprocess.run(["dpkg-buildpackage", "-b", "-us", "-uc"], cwd=src, capture_output=True, text=True,
                       timeout=1200)
    with open(os.path.join(work, "build.log"), "w") as f:
        f.write(r.stdout + r.stderr)
    assert r.returncode == 0, f"dpkg-buildpackage failed ({r.returncode}); end of {work}/build.log:\n" + \
        (r.stdout + r.stderr)[-4000:]
    version = project_version()
    deb = os.path.join(work, f"paycoord_{version}_amd64.deb")
    assert os.path.exists(deb), f"expected {deb}; have {os.listdir(work)}"
    fields = run(["dpkg-deb", "-f", deb, "Package", "Version", "Architecture"]).stdout
    assert fields.split() == ["Package:", "paycoord", "Version:", version, "Architecture:", "amd64"], fields
    say(f"built {os.path.basename(deb)} in {time.monotonic() - t:.1f}s")
    return src, deb


def lint(deb):
    r = run(["lintian", "--fail-on", "error,warning", "--pedantic", "--display-info", deb], check=False,
            timeout=600)
    tags = [l for l in (r.stdout + r.stderr).splitlines() if re.match(r"^[EWIPX]: ", l)]
    for l in tags:
        say("lintian: " + l)
    assert r.returncode == 0 and not [l for l in tags if l[0] in "EW"], \
        f"lintian reports errors or warnings:\n{r.stdout}{r.stderr}"
    say(f"lintian: no error, no warning ({len(tags)} info/pedantic tags above)")


EXPECTED_FILES = {
    # path: (mode, owner, group)
    "/usr/sbin/paycoord": (0o755, "root", "root"),
    "/usr/bin/paycoordctl": (0o755, "root", "root"),
    "/usr/bin/paycoord-migrate": (0o755, "root", "root"),
    "/lib/systemd/system/paycoord.service": (0o644, "root", "root"),
    "/lib/systemd/system/paycoord.socket": (0o644, "root", "root"),
    "/usr/lib/sysusers.d/paycoord.conf": (0o644, "root", "root"),
    "/usr/lib/tmpfiles.d/paycoord.conf": (0o644, "root", "root"),
    CONF: (0o640, "root", "paycoord"),
    "/usr/share/man/man8/paycoord.8.gz": (0o644, "root", "root"),
    "/usr/share/man/man5/paycoord.conf.5.gz": (0o644, "root", "root"),
    "/usr/share/man/man1/paycoordctl.1.gz": (0o644, "root", "root"),
    "/usr/share/man/man1/paycoord-migrate.1.gz": (0o644, "root", "root"),
    "/usr/share/doc/paycoord/copyright": (0o644, "root", "root"),
    "/usr/share/doc/paycoord/changelog.gz": (0o644, "root", "root"),
    "/usr/share/lintian/overrides/paycoord": (0o644, "root", "root"),
}


def expected_files():
    exp = dict(EXPECTED_FILES)
    for f in sorted(os.listdir(os.path.join(SRC, "sql"))):
        if re.fullmatch(r"[0-9]{3}_.*\.sql", f):
            exp[f"/usr/share/paycoord/sql/{f}"] = (0o644, "root", "root")
    for f in sorted(os.listdir(os.path.join(SRC, "docs"))):
        if f.endswith(".md"):
            # dh_compress gzips documentation larger than 4 kB
            small = os.path.getsize(os.path.join(SRC, "docs", f)) < 4096
            exp[f"/usr/share/doc/paycoord/{f}{'' if small else '.gz'}"] = (0o644, "root", "root")
    return exp


def check_installed(version, test_bin):
    listed = run(["dpkg-query", "-L", PKG]).stdout.split()
    files = sorted(p for p in listed if not os.path.isdir(p))
    exp = expected_files()
    assert files == sorted(exp), "installed files differ from the expected list:\n" \
        f"  missing: {sorted(set(exp) - set(files))}\n  extra: {sorted(set(files) - set(exp))}"
    for path, want in exp.items():
        assert mode_owner(path) == want, f"{path}: mode/owner {mode_owner(path)}, want {want}"
    assert mode_owner("/etc/paycoord") == (0o750, "root", "paycoord"), mode_owner("/etc/paycoord")
    conffiles = run(["dpkg-query", "-W", "-f=${Conffiles}", PKG]).stdout.split()
    assert conffiles[::2] == [CONF], f"conffiles: {conffiles}"

    # Contents: the installed files are the repository's (for prefix /usr the
    # units are not rewritten), the configuration is --config-sample's output.
    same = {
        "/lib/systemd/system/paycoord.service": "coordinator/systemd/paycoord.service",
        "/lib/systemd/system/paycoord.socket": "coordinator/systemd/paycoord.socket",
        "/usr/lib/sysusers.d/paycoord.conf": "dist/paycoord.sysusers",
        "/usr/lib/tmpfiles.d/paycoord.conf": "dist/paycoord.tmpfiles",
        CONF: "dist/paycoord.conf",
    }
    for f in os.listdir("/usr/share/paycoord/sql"):
        same[f"/usr/share/paycoord/sql/{f}"] = f"sql/{f}"
    for inst, src in same.items():
        assert read(inst) == read(os.path.join(SRC, src)), f"{inst} differs from {src}"
    assert run(["/usr/sbin/paycoord", "--config-sample"]).stdout.encode() == read(CONF)
    diff = run(["diff", os.path.join(SRC, "sql", "migrate.sh"), "/usr/bin/paycoord-migrate"], check=False).stdout
    assert [l for l in diff.splitlines() if l[:1] in "<>"] == [
        "< sql_dir=${PAYCOORD_SQL_DIR:-$here}",
        "> sql_dir=${PAYCOORD_SQL_DIR:-/usr/share/paycoord/sql}"], diff
    out = run(["/usr/sbin/paycoord", "--version"]).stdout
    assert out.startswith(f"paycoord {version} "), out
    for page in ("paycoord.8", "paycoord.conf.5", "paycoordctl.1", "paycoord-migrate.1"):
        name, sec = page.rsplit(".", 1)
        assert run(["man", "-w", sec, name]).stdout.strip() == f"/usr/share/man/man{sec}/{page}.gz"

    # A release daemon: none of the crash-test fail points.
    marks = [b"PAYCOORD_FAILPOINT", b"event=failpoint"]
    packaged = read("/usr/sbin/paycoord")
    assert not [m for m in marks if m in packaged], "the packaged daemon has fail points compiled in"
    if test_bin and os.path.exists(test_bin):
        assert all(m in read(test_bin) for m in marks), \
            f"{test_bin} (a test build) shows no fail points: this check would not see them"
        say(f"no fail points in /usr/sbin/paycoord (the test build {test_bin} has them)")

    # The user (sysusers.d) and /run/paycoord (tmpfiles.d), made by postinst.
    pw = pwd.getpwnam("paycoord")
    assert (pw.pw_dir, pw.pw_shell) == ("/nonexistent", "/usr/sbin/nologin"), pw
    assert grp.getgrgid(pw.pw_gid).gr_name == "paycoord"
    assert pw.pw_uid < 1000, f"paycoord uid {pw.pw_uid} is not a system uid"
    assert mode_owner("/run/paycoord") == (0o750, "paycoord", "paycoord"), mode_owner("/run/paycoord")
    # Nothing enabled on install (no [Install] symlinks anywhere).
    wants = [os.path.join(d, f) for d, _, fs in os.walk("/etc/systemd/system") for f in fs if "paycoord" in f]
    assert wants == [], f"units enabled on install: {wants}"
    say(f"{len(exp)} files as expected; user paycoord uid {pw.pw_uid}; /run/paycoord 0750; nothing enabled")


def verify_units():
    r = run(["systemd-analyze", "verify", "/lib/systemd/system/paycoord.socket",
             "/lib/systemd/system/paycoord.service"], check=False, timeout=120)
    assert r.returncode == 0 and r.stderr.strip() == "", f"systemd-analyze verify: {r.returncode} {r.stderr}"
    say("systemd-analyze verify: clean (ExecStart and the Documentation= man pages exist)")


def set_key(text, key, value):
    """Uncomment the shipped `#key = default` line and set it."""
    new, n = re.subn(rf"^#{key} =.*$", f"{key} = {value}", text, flags=re.M)
    assert n == 1, f"{key}: no single '#{key} =' line in {CONF}"
    return new


def as_paycoord(cmd, **kw):
    return subprocess.run(cmd, user="paycoord", group="paycoord", extra_groups=[], capture_output=True,
                          text=True, timeout=120, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/nonexistent"},
                          cwd="/", **kw)


def ctl(*args):
    r = run(["/usr/bin/paycoordctl", "--json", *map(str, args)], check=False, timeout=60)
    assert r.returncode == 0, f"paycoordctl {' '.join(map(str, args))}: {r.returncode} {r.stderr}"
    return json.loads(r.stdout)


def serve_and_pay(work, harness):
    pg = harness.Postgres()
    psp = harness.Processor(work)
    daemon = None
    try:
        pg.start()
        # As docs/operations.md sets up a local PostgreSQL: a role named like the
        # daemon's user owns the database; migrations and daemon connect as it
        # (no user= in the conninfo: libpq takes the OS user's name).
        with pg.connect() as c:
            c.execute("CREATE ROLE paycoord LOGIN")
            c.execute("ALTER DATABASE paycoord OWNER TO paycoord")
        conninfo = f"host={pg.sock} dbname=paycoord"
        r = as_paycoord(["paycoord-migrate", conninfo])
        assert r.returncode == 0, r.stderr
        sqls = sorted(f[:-4] for f in os.listdir("/usr/share/paycoord/sql"))
        assert r.stdout.splitlines() == [f"migrate: applied {v}" for v in sqls] + \
            [f"migrate: done ({len(sqls)} applied)"], r.stdout
        r = as_paycoord(["paycoord-migrate", conninfo])
        assert r.returncode == 0 and r.stdout.strip() == "migrate: done (0 applied)", r.stdout + r.stderr
        assert [v for (v,) in pg.query("SELECT version FROM schema_migrations ORDER BY 1")] == sqls
        owners = pg.query("SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'public'")
        assert owners == [("paycoord",)], f"tables owned by {owners}, want the daemon's role"
        say(f"paycoord-migrate as paycoord: applied {', '.join(sqls)} (tables owned by role paycoord); "
            "a second run applied nothing")

        psp.start()
        # The shipped configuration, before anything is set up: the token is missing.
        r = as_paycoord(["/usr/sbin/paycoord", "--config", CONF, "--check-config"])
        assert r.returncode == 1 and \
            f"processor_token_file: {TOKEN_FILE}: No such file or directory" in r.stderr, r.stderr
        # Set up as docs/operations.md says: the token, then the database and processor keys.
        with open(TOKEN_FILE, "w") as f:
            f.write(harness.TOKEN + "\n")
        os.chown(TOKEN_FILE, pwd.getpwnam("paycoord").pw_uid, grp.getgrnam("paycoord").gr_gid)
        os.chmod(TOKEN_FILE, 0o600)
        text = read(CONF).decode()
        text = set_key(text, "db_conninfo", conninfo)
        text = set_key(text, "processor_url", psp.url)
        text = set_key(text, "node_id", "pkg1")
        with open(CONF, "w") as f:      # keeps the file's root:paycoord 0640
            f.write(text)
        r = as_paycoord(["/usr/sbin/paycoord", "--config", CONF, "--check-config"])
        assert r.returncode == 0 and "is valid" in r.stdout, r.stdout + r.stderr
        assert run(["/usr/sbin/paycoord", "--config", CONF, "--check-config"], check=False).returncode == 1

        log_path = os.path.join(work, "paycoord.log")
        log = open(log_path, "ab")
        daemon = subprocess.Popen(["/usr/sbin/paycoord", "--config", CONF], user="paycoord", group="paycoord",
                                  extra_groups=[], env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"},
                                  cwd="/", stdout=subprocess.DEVNULL, stderr=log)
        log.close()

        def ready():
            assert daemon.poll() is None, f"the daemon exited {daemon.returncode}:\n{read(log_path).decode()[-3000:]}"
            r = run(["/usr/bin/paycoordctl", "--json", "--timeout", "2", "health"], check=False, timeout=30)
            return r.returncode == 0 and json.loads(r.stdout)["ready"]
        harness.wait_for(ready, timeout=60, interval=0.2, what="the installed daemon to be ready")
        st = os.stat(SOCK)
        assert stat.S_ISSOCK(st.st_mode) and pwd.getpwuid(st.st_uid).pw_name == "paycoord" and \
            stat.S_IMODE(st.st_mode) == 0o660, f"{SOCK}: {oct(st.st_mode)} uid {st.st_uid}"
        say(f"daemon ready as user paycoord on {SOCK} (pid {daemon.pid})")

        # One payment through the installed paycoordctl.
        acct = "pkg-acct-1"
        assert ctl("account", "open", acct, "EUR")["balance"] == 0
        assert ctl("credit", acct, 10000, "EUR", "pkg-topup-1")["status"] == "applied"
        paid = ctl("pay", acct, 1250, "EUR", "pkg-order-1", "--reference", "package test")
        assert paid["status"] == "succeeded", paid
        bal = ctl("balance", acct)
        assert (bal["balance"], bal["held"], bal["pending_credits"]) == (8750, 0, 0), bal
        assert ctl("status", "pkg-order-1")["status"] == "succeeded"
        # balance = credits - succeeded debits; the processor holds exactly that charge.
        charges = psp.all_payments()
        assert len(charges) == 1 and charges[0]["status"] == "succeeded" and charges[0]["amount"] == 1250, charges
        (gid,) = pg.query("SELECT gid FROM payments WHERE idempotency_key = 'pkg-order-1'")[0]
        assert charges[0]["idempotency_key"] == gid and gid.startswith("pc:pkg1:"), (charges, gid)
        harness.check_invariants(pg, psp, answers={"pkg-order-1": "succeeded"}, node="pkg1")
        say(f"paid 1250 EUR from {acct} ({gid}): balance 8750, processor holds that one charge; invariants hold")

        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(60) == 0, read(log_path).decode()[-3000:]
        text = read(log_path).decode()
        assert "event=ready" in text and "event=stopped left_in_flight=0" in text, text[-3000:]
        assert "failpoint" not in text
        daemon = None
        say("daemon stopped cleanly (SIGTERM, exit 0)")
        return pg, psp
    except BaseException:
        if daemon and daemon.poll() is None:
            daemon.kill()
            daemon.wait(10)
        psp.stop()
        pg.destroy()
        raise


def db_snapshot(pg):
    return (pg.query("SELECT id, balance FROM accounts ORDER BY id"),
            pg.query("SELECT idempotency_key, status, amount FROM payments ORDER BY 1"),
            pg.query("SELECT version FROM schema_migrations ORDER BY 1"))


def remove_and_purge(pg):
    before = db_snapshot(pg)
    conf_text = read(CONF)
    apt("remove", PKG)
    abbrev, _ = pkg_status()
    assert abbrev == "rc", f"after remove: dpkg status {abbrev!r}, want rc (config-files)"
    for path in ("/usr/sbin/paycoord", "/usr/bin/paycoordctl", "/usr/bin/paycoord-migrate",
                 "/lib/systemd/system/paycoord.service", "/usr/share/paycoord"):
        assert not os.path.lexists(path), f"{path} left after remove"
    assert read(CONF) == conf_text, "remove changed the edited configuration"
    assert mode_owner(CONF) == (0o640, "root", "paycoord")
    assert os.path.exists(TOKEN_FILE)
    assert db_snapshot(pg) == before, "remove touched the database"
    say("remove: programs and units gone; the edited configuration, the token and the database stay")

    apt("purge", PKG)
    abbrev, _ = pkg_status()
    assert abbrev in ("", "un", "pn"), f"after purge: dpkg status {abbrev!r}"
    assert not os.path.exists(CONF), "purge left the configuration"
    for path in ("/etc/paycoord", CONF):
        assert run(["dpkg-statoverride", "--list", path], check=False).stdout == "", f"statoverride left: {path}"
    assert db_snapshot(pg) == before, "purge touched the database"
    # Left behind, by design (docs/operations.md, "Remove and purge"):
    left = []
    if os.path.exists(TOKEN_FILE):
        left.append(f"{TOKEN_FILE} (the administrator's file; so /etc/paycoord stays)")
    assert os.listdir("/etc/paycoord") == ["processor.token"], os.listdir("/etc/paycoord")
    pwd.getpwnam("paycoord")
    left.append("user and group paycoord")
    if os.path.isdir("/run/paycoord"):
        left.append("/run/paycoord (a tmpfs directory: gone at the next boot)")
    left.append("the database (never touched)")
    say("purge: configuration gone; left: " + "; ".join(left))


def main():
    if os.geteuid() != 0:
        skip("not root: building is fine, but installing and purging a .deb and running the "
             "daemon as the paycoord user need root (CI runs as root)")
    for tool in ("dpkg-buildpackage", "apt-get", "lintian", "dh", "systemd-analyze"):
        if not shutil.which(tool):
            raise SystemExit(f"package stage: {tool} not found: run .ci/install-deps (.ci/packages lists it)")
    os.makedirs(os.path.dirname(LOCK), exist_ok=True)
    lock = open(LOCK, "w")
    deadline = time.monotonic() + 900
    while True:     # one package test per machine at a time (it installs a system package)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise SystemExit("package stage: another package test held the lock for 15 minutes")
            time.sleep(2)
    abbrev, version = pkg_status()
    if abbrev not in ("", "un", "pn"):
        if not os.path.exists(MARKER):
            skip(f"a paycoord package ({version}, dpkg status {abbrev!r}) is on this machine and was not "
                 f"installed by this test: not touching it (purge it, or run the test elsewhere)")
        say(f"purging the package an interrupted run left ({version})")
        apt("purge", PKG)
    if os.path.exists(TOKEN_FILE) and os.path.exists(MARKER):
        os.unlink(TOKEN_FILE)
    if os.path.exists("/etc/paycoord"):
        if not os.path.exists(MARKER):
            skip("/etc/paycoord exists without a paycoord package: someone's configuration; not touching it")
        shutil.rmtree("/etc/paycoord")
    if os.path.exists(SOCK):
        import socket
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(SOCK)
            skip(f"a daemon listens on {SOCK}: not starting another")
        except OSError:
            pass            # a stale socket file: the daemon replaces it
        finally:
            probe.close()

    import harness
    work = tempfile.mkdtemp(prefix="pc-pkgtest-")
    os.chmod(work, 0o755)
    psp_sim = os.environ.get("PSP_SIM")
    installed = False
    pg = psp = None
    ok = False
    try:
        src, deb = build(work)
        if not (psp_sim and os.path.exists(psp_sim)):
            psp_sim = os.path.join(src, "build-deb", "test", "processor", "psp-sim")
        harness.PSP_SIM = psp_sim
        lint(deb)
        with open(MARKER, "w") as f:
            f.write(f"{deb}\n")
        installed = True
        t = time.monotonic()
        apt("install", "./" + os.path.basename(deb), cwd=work)
        say(f"apt-get install ./{os.path.basename(deb)}: {time.monotonic() - t:.1f}s")
        check_installed(project_version(), os.environ.get("PAYCOORD_BIN"))
        verify_units()
        pg, psp = serve_and_pay(work, harness)
        remove_and_purge(pg)
        installed = False
        ok = True
    finally:
        if psp:
            psp.stop()
        if pg:
            pg.destroy()
        if installed:
            say("cleaning up: purging the package")
            apt("purge", PKG)
        if os.path.exists(TOKEN_FILE):
            os.unlink(TOKEN_FILE)
        if os.path.isdir("/etc/paycoord") and not os.listdir("/etc/paycoord"):
            os.rmdir("/etc/paycoord")
        if os.path.exists(MARKER) and pkg_status()[0] in ("", "un", "pn"):
            os.unlink(MARKER)
        if ok and not os.environ.get("PC_PKG_KEEP"):
            shutil.rmtree(work, ignore_errors=True)
        else:
            say(f"kept {work} (build.log, paycoord.log)")
    print(f"=== package stage passed in {time.monotonic() - T0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
