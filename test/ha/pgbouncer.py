"""pgbouncer in front of a throwaway cluster, for the tests: Unix socket only
(no TCP port to collide with), trust authentication, one database
`paycoord`, pool_mode session or transaction. As root it runs as the
`postgres` OS user (pgbouncer refuses to run as root).

    b = PgBouncer(cluster_sock_dir, mode="session", workdir=dir).start()
    daemon conninfo: b.conninfo
    b.stop()

Session pooling is what paycoord needs (docs/ha.md): a client connection
keeps one server session for its whole life, so the node's advisory lock,
lock_timeout and the fence token (application_name) hold. With
server_reset_query = DISCARD ALL (the default) the lock is released when
paycoord's lock session disconnects."""

import os
import shutil
import subprocess
import tempfile
import time

PORT = 6432


def _as_pg(cmd, **kw):
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--"] + cmd
    return subprocess.run(cmd, **kw)


class PgBouncer:
    def __init__(self, upstream_sock, mode="session", workdir=None, upstream_port=5432, pool_size=40):
        assert mode in ("session", "transaction")
        self.mode = mode
        self.dir = tempfile.mkdtemp(prefix="pgbouncer-", dir=workdir)
        os.chmod(self.dir, 0o755)
        self.ini = os.path.join(self.dir, "pgbouncer.ini")
        self.log = os.path.join(self.dir, "pgbouncer.log")
        self.pidfile = os.path.join(self.dir, "pgbouncer.pid")
        users = os.path.join(self.dir, "users.txt")
        with open(users, "w") as f:
            f.write('"postgres" ""\n')
        with open(self.ini, "w") as f:
            f.write(f"""[databases]
paycoord = host={upstream_sock} port={upstream_port} dbname=paycoord user=postgres

[pgbouncer]
listen_addr =
listen_port = {PORT}
unix_socket_dir = {self.dir}
auth_type = trust
auth_file = {users}
pool_mode = {mode}
server_reset_query = DISCARD ALL
server_login_retry = 1
default_pool_size = {pool_size}
max_client_conn = 400
logfile = {self.log}
pidfile = {self.pidfile}
""")
        if os.geteuid() == 0:
            for p in (self.dir, self.ini, users):
                shutil.chown(p, "postgres", "postgres")

    @property
    def conninfo(self):
        return f"host={self.dir} port={PORT} dbname=paycoord user=postgres"

    def start(self):
        r = _as_pg(["pgbouncer", "-d", self.ini], capture_output=True, text=True)
        assert r.returncode == 0, f"pgbouncer did not start: {r.stdout}{r.stderr}{self.tail()}"
        sock = os.path.join(self.dir, f".s.PGSQL.{PORT}")
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            assert time.monotonic() < deadline, f"pgbouncer socket never appeared: {self.tail()}"
            time.sleep(0.05)
        return self

    def pid(self):
        try:
            with open(self.pidfile) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def stop(self):
        pid = self.pid()
        if pid:
            try:
                os.kill(pid, 15)
            except ProcessLookupError:
                pid = None
        deadline = time.monotonic() + 10
        while pid and time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        shutil.rmtree(self.dir, ignore_errors=True)

    def tail(self, n=20):
        try:
            with open(self.log, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""
