"""The fault-injecting PostgreSQL proxy (pgproxy.py) on its own, against the
session's throwaway cluster: pass-through (simple and extended protocol,
large results), each rule action, cut_all, refusal, answer delay, and a clean
stop. Moves no money, so no invariant check."""

import threading
import time

import psycopg
import pytest

from pgproxy import PgProxy


@pytest.fixture
def proxy(pg, tmp_path):
    p = PgProxy(pg.sock, workdir=str(tmp_path)).start()
    with pg.connect() as c:
        c.execute("DROP TABLE IF EXISTS pgproxy_probe")
        c.execute("CREATE TABLE pgproxy_probe (v text)")
    yield p
    p.stop()
    assert p.connections() == 0
    assert p.errors == []
    with pg.connect() as c:
        c.execute("DROP TABLE IF EXISTS pgproxy_probe")


def via(proxy):
    return psycopg.connect(proxy.conninfo, autocommit=True, connect_timeout=5)


def probe(pg):
    return sorted(v for (v,) in pg.query("SELECT v FROM pgproxy_probe"))


def test_pass_through(pg, proxy):
    with via(proxy) as c:
        assert c.execute("SELECT 1").fetchone() == (1,)
        assert c.execute("SELECT %s::int + 1", (41,)).fetchone() == (42,)          # extended protocol
        rows = c.execute("SELECT repeat('x', 100) FROM generate_series(1, 100000)").fetchall()
        assert len(rows) == 100000                                                  # ~10 MB through bounded queues
        c.execute("INSERT INTO pgproxy_probe VALUES ('a'), ('b')")
    assert probe(pg) == ["a", "b"]
    assert proxy.accepted >= 1


def test_cut_before_is_not_sent(pg, proxy):
    rule = proxy.add_rule("'nope'", "cut_before")
    with via(proxy) as c:
        with pytest.raises(psycopg.OperationalError):
            c.execute("INSERT INTO pgproxy_probe VALUES ('nope')")
    assert rule.fired.is_set() and rule.hits == 1
    time.sleep(0.2)
    assert probe(pg) == []
    with via(proxy) as c:                                                           # spent: passes now
        c.execute("INSERT INTO pgproxy_probe VALUES ('nope')")
    assert probe(pg) == ["nope"]


def test_cut_before_extended_protocol(pg, proxy):
    proxy.add_rule("pgproxy_probe VALUES ($1", "cut_before")
    with via(proxy) as c:
        with pytest.raises(psycopg.OperationalError):
            c.execute("INSERT INTO pgproxy_probe VALUES (%s)", ("p1",))
    assert probe(pg) == []


def test_lose_answer_executes(pg, proxy):
    proxy.add_rule("'lost'", "lose_answer")
    with via(proxy) as c:
        with pytest.raises(psycopg.OperationalError):
            c.execute("INSERT INTO pgproxy_probe VALUES ('lost')")
    assert probe(pg) == ["lost"]


def test_cut_after_server_keeps_running(pg, proxy):
    proxy.add_rule("'slow'", "cut_after")
    with via(proxy) as c:
        t0 = time.monotonic()
        with pytest.raises(psycopg.OperationalError):
            c.execute("SELECT pg_sleep(0.8); INSERT INTO pgproxy_probe VALUES ('slow')")
        assert time.monotonic() - t0 < 0.7            # the client saw the cut before the statement ended
    assert probe(pg) == []
    time.sleep(1.5)
    assert probe(pg) == ["slow"]


def test_late_forwards_after_the_cut(pg, proxy):
    proxy.add_rule("'late'", "late", delay_s=0.8)
    with via(proxy) as c:
        with pytest.raises(psycopg.OperationalError):
            c.execute("INSERT INTO pgproxy_probe VALUES ('late')")
    time.sleep(0.3)
    assert probe(pg) == []
    time.sleep(1.2)
    assert probe(pg) == ["late"]


def test_delay_and_call(pg, proxy):
    seen = []
    proxy.add_rule("'slowed'", "delay", delay_s=0.5)
    proxy.add_rule("'called'", "call", callback=seen.append)
    with via(proxy) as c:
        t0 = time.monotonic()
        c.execute("INSERT INTO pgproxy_probe VALUES ('slowed')")
        assert time.monotonic() - t0 >= 0.45
        c.execute("INSERT INTO pgproxy_probe VALUES ('called')")
    assert len(seen) == 1 and "'called'" in seen[0]
    assert probe(pg) == ["called", "slowed"]


def test_cut_all_refuse_and_answer_delay(pg, proxy):
    c1, c2 = via(proxy), via(proxy)
    assert proxy.connections() == 2
    assert proxy.cut_all() == 2
    for c in (c1, c2):
        with pytest.raises(psycopg.OperationalError):
            c.execute("SELECT 1")
        c.close()
    proxy.refuse(0.8)
    with pytest.raises(psycopg.OperationalError):
        via(proxy)
    time.sleep(1.0)
    proxy.delay_answers(300)
    with via(proxy) as c:
        t0 = time.monotonic()
        c.execute("SELECT 1")
        assert time.monotonic() - t0 >= 0.28
    proxy.delay_answers(0)
    assert proxy.refused >= 1


def test_many_connections_and_stop(pg, proxy):
    errs = []

    def worker(i):
        try:
            with via(proxy) as c:
                for j in range(20):
                    c.execute("INSERT INTO pgproxy_probe VALUES (%s)", (f"{i}-{j}",))
        except Exception as e:          # noqa: BLE001
            errs.append(e)

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert errs == []
    assert len(probe(pg)) == 240
    idle = via(proxy)                   # left open: stop() must close it
    assert proxy.connections() >= 1
    proxy.stop()
    with pytest.raises(psycopg.OperationalError):
        idle.execute("SELECT 1")
    idle.close()
