"""Replicated PostgreSQL 15 for the high-availability tests: a primary and a
streaming standby made with pg_basebackup, on this machine only (Unix
sockets; TCP on loopback addresses when asked, e.g. inside a private network
namespace). As root, every server runs as the `postgres` OS user, as
test/pg.sh does.

    pair = Pair(workdir, sync=True)    # or sync=False; lag_ms: see lagproxy.py
    pair.start()                       # primary "a" + standby "b", streaming
    pair.primary / pair.standby        # Node objects
    pair.kill_primary()                # pg_ctl stop -m immediate
    pair.promote()                     # the standby becomes the primary (roles swap)
    pair.rebuild_standby()             # the dead one comes back as a standby of the new one
    pair.destroy()

Clusters are kept small (shared_buffers 32MB, max_connections 60), fsync is
off (an immediate stop is a crash of PostgreSQL, not of the machine: the
page cache survives it), and everything lives under workdir.
"""

import os
import shutil
import subprocess
import sys
import time

import psycopg

SRC = os.environ.get("PAYCOORD_SRC") or os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PG_BIN = os.environ.get("PC_PG_BIN", "/usr/lib/postgresql/15/bin")
DB = "paycoord"


def as_pg(cmd, **kw):
    """Run cmd as the postgres OS user when we are root."""
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--"] + cmd
    return subprocess.run(cmd, **kw)


def chown_pg(path):
    if os.geteuid() == 0:
        shutil.chown(path, "postgres", "postgres")


def wait_for(pred, timeout, what, interval=0.05):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Node:
    """One cluster: data directory, Unix socket directory, optional TCP address."""

    def __init__(self, workdir, name, tcp_host=None, port=5432):
        self.name = name
        self.dir = os.path.join(workdir, name)
        self.data = os.path.join(self.dir, "data")
        self.sock = os.path.join(self.dir, "sock")
        self.log = os.path.join(self.dir, "postgres.log")
        self.tcp_host = tcp_host
        self.port = port
        os.makedirs(self.sock, exist_ok=True)
        os.chmod(self.dir, 0o755)
        chown_pg(self.dir)
        chown_pg(self.sock)

    @property
    def conninfo(self):
        return f"host={self.sock} port={self.port} dbname={DB} user=postgres"

    @property
    def host_entry(self):
        """(host, port) for a multi-host conninfo: TCP when the node has an address."""
        return (self.tcp_host or self.sock, self.port)

    def conf(self):
        listen = self.tcp_host or ""
        return f"""
# paycoord HA test cluster ({self.name})
listen_addresses = '{listen}'
port = {self.port}
unix_socket_directories = '{self.sock}'
max_prepared_transactions = 200
max_connections = 60
shared_buffers = 32MB
fsync = off
wal_level = replica
max_wal_senders = 6
max_replication_slots = 4
wal_keep_size = 256MB
hot_standby = on
wal_receiver_status_interval = 1s
wal_sender_timeout = 10s
wal_receiver_timeout = 10s
checkpoint_timeout = 30min
max_wal_size = 1GB
log_min_messages = warning
log_line_prefix = '%m [%p] '
"""

    def initdb(self):
        r = as_pg([f"{PG_BIN}/initdb", "-D", self.data, "-U", "postgres", "-A", "trust", "-E", "UTF8",
                   "--locale=C.UTF-8", "--no-sync"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        with open(os.path.join(self.data, "postgresql.conf"), "a") as f:
            f.write(self.conf())
        with open(os.path.join(self.data, "pg_hba.conf"), "a") as f:
            f.write("local replication all trust\nhost all all 127.0.0.0/8 trust\n"
                    "host replication all 127.0.0.0/8 trust\n")

    def start(self, timeout=60):
        r = as_pg([f"{PG_BIN}/pg_ctl", "-D", self.data, "-l", self.log, "-w", "-t", str(timeout), "start"],
                  capture_output=True, text=True)
        assert r.returncode == 0, f"{self.name}: start failed: {r.stderr}\n{self.tail()}"

    def kill(self):
        """Immediate stop: a crash of PostgreSQL (no shutdown checkpoint, clients cut)."""
        as_pg([f"{PG_BIN}/pg_ctl", "-D", self.data, "-m", "immediate", "-w", "-t", "60", "stop"],
              capture_output=True)

    def stop(self):
        if self.running():
            as_pg([f"{PG_BIN}/pg_ctl", "-D", self.data, "-m", "fast", "-w", "-t", "60", "stop"], capture_output=True)

    def running(self):
        if not os.path.exists(os.path.join(self.data, "postmaster.pid")):
            return False
        return as_pg([f"{PG_BIN}/pg_ctl", "-D", self.data, "status"], capture_output=True).returncode == 0

    def promote(self):
        r = as_pg([f"{PG_BIN}/pg_ctl", "-D", self.data, "-w", "-t", "60", "promote"], capture_output=True, text=True)
        assert r.returncode == 0, f"{self.name}: promote failed: {r.stderr}"

    def connect(self, dbname=DB):
        return psycopg.connect(f"host={self.sock} port={self.port} dbname={dbname} user=postgres", autocommit=True,
                               connect_timeout=5)

    def query(self, sql, params=None, dbname=DB):
        with self.connect(dbname) as c:
            cur = c.execute(sql, params)
            return cur.fetchall() if cur.description is not None else []

    def in_recovery(self):
        return self.query("SELECT pg_is_in_recovery()", dbname="postgres")[0][0]

    def tail(self, n=30):
        try:
            with open(self.log, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def wipe(self):
        shutil.rmtree(self.data, ignore_errors=True)

    def basebackup(self, primary, app_name, upstream=None):
        """A fresh standby of primary: pg_basebackup -R, named app_name for
        synchronous_standby_names. upstream: (host, port) to stream from
        instead of the primary's socket (e.g. a lagging proxy)."""
        self.wipe()
        r = as_pg([f"{PG_BIN}/pg_basebackup", "-D", self.data, "-h", primary.sock, "-p", str(primary.port),
                   "-U", "postgres", "-X", "stream", "-c", "fast", "--no-sync"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        host, port = upstream or (primary.sock, primary.port)
        auto = os.path.join(self.data, "postgresql.auto.conf")
        # The primary's own synchronous_standby_names (ALTER SYSTEM) stays with
        # the primary: a promoted standby starts without, as Patroni does.
        with open(auto) as f:
            lines = [ln for ln in f if not ln.startswith("synchronous_standby_names")]
        lines.append(f"primary_conninfo = 'host={host} port={port} user=postgres application_name={app_name}'\n")
        with open(auto, "w") as f:
            f.writelines(lines)
        with open(os.path.join(self.data, "postgresql.conf"), "a") as f:
            f.write(f"\nlisten_addresses = '{self.tcp_host or ''}'\nport = {self.port}\n"
                    f"unix_socket_directories = '{self.sock}'\n")
        open(os.path.join(self.data, "standby.signal"), "w").close()
        if os.geteuid() == 0:
            subprocess.run(["chown", "-R", "postgres:postgres", self.data], check=True)


class Pair:
    """A primary and one streaming standby; roles swap at each promotion."""

    def __init__(self, workdir, sync=True, tcp_hosts=(None, None), upstream_of=None):
        self.workdir = workdir
        self.sync = sync
        self.nodes = [Node(workdir, "a", tcp_hosts[0]), Node(workdir, "b", tcp_hosts[1])]
        self.primary, self.standby = self.nodes
        # upstream_of(primary) -> (host, port) the standby streams from (default: the primary itself)
        self.upstream_of = upstream_of

    def conninfo(self, extra="target_session_attrs=read-write"):
        """The daemon's multi-host conninfo over both nodes (fixed order a,b)."""
        hosts = ",".join(n.host_entry[0] for n in self.nodes)
        ports = ",".join(str(n.host_entry[1]) for n in self.nodes)
        return f"host={hosts} port={ports} dbname={DB} user=postgres {extra}".strip()

    def start(self):
        p = self.primary
        p.initdb()
        p.start()
        p.query(f"CREATE DATABASE {DB}", dbname="postgres")
        env = dict(os.environ, PGHOST=p.sock, PGPORT=str(p.port), PGUSER="postgres", PGDATABASE=DB)
        r = subprocess.run([os.path.join(SRC, "sql", "migrate.sh")], env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        self.attach_standby()

    def set_sync(self, on):
        """synchronous_standby_names on the primary: '*' (any standby) or ''."""
        self.primary.query(f"ALTER SYSTEM SET synchronous_standby_names = '{'*' if on else ''}'", dbname="postgres")
        self.primary.query("SELECT pg_reload_conf()", dbname="postgres")

    def attach_standby(self):
        s, p = self.standby, self.primary
        s.basebackup(p, s.name, self.upstream_of(p) if self.upstream_of else None)
        s.start()
        wait_for(lambda: p.query("SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
                                 dbname="postgres")[0][0] == 1, 60, f"{s.name} streaming from {p.name}")
        if self.sync:
            self.set_sync(True)
            wait_for(lambda: p.query("SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'",
                                     dbname="postgres")[0][0] == 1, 30, f"{s.name} synchronous")

    def kill_primary(self):
        self.primary.kill()

    def promote(self):
        self.standby.promote()
        self.primary, self.standby = self.standby, self.primary

    def rebuild_standby(self):
        """The old primary (dead) comes back as a standby of the new one."""
        self.standby.kill()
        self.attach_standby()

    def destroy(self):
        for n in self.nodes:
            try:
                n.kill()
            except Exception as e:  # noqa: BLE001 - teardown goes on
                sys.stderr.write(f"cluster {n.name}: {e}\n")
        shutil.rmtree(self.workdir, ignore_errors=True)
