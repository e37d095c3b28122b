"""pytest fixtures: one throwaway PostgreSQL per session; a fresh test
processor and a reset database per test; daemons started on demand."""

import os
import shutil
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from harness import Daemon, Postgres, Processor  # noqa: E402


@pytest.fixture(scope="session")
def pg():
    p = Postgres()
    p.start()
    p.migrate()
    yield p
    p.destroy()


class Env:
    def __init__(self, pg, workdir):
        self.pg = pg
        self.workdir = workdir
        self.psp = Processor(workdir)
        self.psp.start()
        self.daemons = []
        self.proxies = []

    def pgproxy(self):
        """A pgproxy (pgproxy.py) in front of the session cluster; pass
        db_conninfo=proxy.conninfo to the daemon."""
        from pgproxy import PgProxy
        p = PgProxy(self.pg.sock, workdir=self.workdir).start()
        self.proxies.append(p)
        return p

    def pspproxy(self):
        """A pspproxy (pspproxy.py) in front of the test processor; pass
        processor_url=proxy.url to the daemon."""
        from pspproxy import PspProxy
        p = PspProxy(self.psp).start()
        self.proxies.append(p)
        return p

    def daemon(self, start=True, env=None, **settings):
        d = Daemon(self.workdir, self.pg, self.psp, **settings)
        self.daemons.append(d)
        if start:
            d.start(env=env)
        return d

    def open_account(self, client, account, currency="EUR", balance=0):
        client.ok("account_open", account=account, currency=currency)
        if balance:
            client.ok("credit", account=account, amount=balance, currency=currency,
                      idempotency_key=f"open-{account}")

    def close(self):
        for d in self.daemons:
            d.kill9()
        for p in self.proxies:
            p.stop()
        self.psp.stop()


@pytest.fixture
def env(pg, request):
    pg.reset()
    workdir = tempfile.mkdtemp(prefix="pc-it-")
    e = Env(pg, workdir)
    yield e
    e.close()
    if request.node.rep_call.passed if hasattr(request.node, "rep_call") else False:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        for d in e.daemons:
            sys.stderr.write(f"\n--- daemon log ({d.log}) ---\n{d.tail(60)}\n")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
