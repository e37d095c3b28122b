"""pgproxy: a fault-injecting Unix-socket proxy for the PostgreSQL v3 wire
protocol, placed between the daemon and a throwaway cluster.

The daemon's db_conninfo says host=<proxy dir>; the proxy listens on
<proxy dir>/.s.PGSQL.5432 and forwards every connection to the real
cluster's socket. It understands just enough of the protocol to find message
boundaries (the startup packet, then a type byte and an int32 length both
ways), so a test can act on one statement:

    proxy = PgProxy(pg.sock)            # pg: harness.Postgres
    proxy.start()
    d = env.daemon(db_conninfo=proxy.conninfo)
    rule = proxy.add_rule("PREPARE TRANSACTION", "cut_before")
    ... pay ...
    rule.fired.wait(5)

Actions of a rule (matched against the SQL text of a client's Query 'Q' or
Parse 'P' message; `count` hits, then the rule is spent; count=None: always):

    cut_before   close both sides without forwarding the message ("not sent")
    lose_answer  forward it (and the rest of its batch up to Sync), let the
                 server finish, drop the whole answer, then close both sides
                 ("sent, executed, answer lost")
    cut_after    forward it, close the client side at once; the server side
                 stays open until the statement has finished (its answer is
                 swallowed): the daemon sees a broken connection while the
                 server may still be running the statement
    late         close the client side at once and forward the message only
                 `delay_s` later (the old backend's statement runs after the
                 daemon has moved on), swallowing the answer
    delay        forward it `delay_s` later, keep the connection
    call         run callback(sql_text) in the proxy thread, then forward

Other controls: cut_all() (every connection now), refuse(seconds) (new
connections are accepted and closed at once, as a server going away does),
delay_answers(ms) (server->client bytes held that long). Buffers are bounded
(a side's reads stop while the other side's queue is over its cap) and stop()
closes everything and joins every thread.
"""

import collections
import os
import select
import shutil
import socket
import struct
import tempfile
import threading
import time

PG_SOCKET = ".s.PGSQL.5432"
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102
MAX_STARTUP = 10000
MAX_MESSAGE = 1 << 26            # a protocol frame larger than this is an error
QUEUE_CAP = 4 << 20              # stop reading a side while the other queue holds more
RECV = 65536
DRAIN_TIMEOUT_S = 30.0


class Rule:
    ACTIONS = ("cut_before", "lose_answer", "cut_after", "late", "delay", "call")

    def __init__(self, substring, action, count=1, delay_s=0.0, callback=None):
        assert action in self.ACTIONS, action
        self.substring = substring
        self.action = action
        self.remaining = count
        self.delay_s = delay_s
        self.callback = callback
        self.hits = 0
        self.texts = []
        self.fired = threading.Event()

    def take(self, text):
        """Called under the proxy lock: does this rule act on text?"""
        if self.remaining is not None and self.remaining <= 0:
            return False
        if self.substring not in text:
            return False
        if self.remaining is not None:
            self.remaining -= 1
        self.hits += 1
        self.texts.append(text[:2000])
        return True


class _Queue:
    """Bytes to write to one side, each chunk released at a given time."""

    def __init__(self):
        self.chunks = collections.deque()    # [release_at, bytearray]
        self.size = 0
        self.last_release = 0.0

    def put(self, data, release_at=0.0):
        if not data:
            return
        release_at = max(release_at, self.last_release)     # keep the order
        self.last_release = release_at
        if self.chunks and self.chunks[-1][0] == release_at:
            self.chunks[-1][1].extend(data)
        else:
            self.chunks.append([release_at, bytearray(data)])
        self.size += len(data)

    def ready(self, now):
        return bool(self.chunks) and self.chunks[0][0] <= now

    def next_release(self):
        return self.chunks[0][0] if self.chunks else None

    def write_to(self, sock, now):
        """Write what is due; returns False when the peer is gone."""
        while self.chunks and self.chunks[0][0] <= now:
            buf = self.chunks[0][1]
            try:
                n = sock.send(buf)
            except BlockingIOError:
                return True
            except OSError:
                return False
            del buf[:n]
            self.size -= n
            if buf:
                return True
            self.chunks.popleft()
        return True


class _Conn(threading.Thread):
    def __init__(self, proxy, csock):
        super().__init__(daemon=True, name="pgproxy-conn")
        self.proxy = proxy
        self.c = csock
        self.s = None
        self.to_c = _Queue()
        self.to_s = _Queue()
        self.cbuf = bytearray()
        self.phase = "startup"         # startup | framed | raw
        self.s_hdr = bytearray()        # server->client frame scanning
        self.s_left = 0
        self.s_type = None
        self.swallow = False            # server answer dropped until ReadyForQuery
        self.close_after_z = False      # then close the server side too
        self.close_client_at_sync = False
        self.hold_until = None          # late: client messages go to the server at this time
        self.drain_deadline = None
        self.dead = False

    # -- control from other threads
    def kill(self):
        self.dead = True
        for sk in (self.c, self.s):
            if sk is not None:
                try:
                    sk.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _close_client(self):
        if self.c is not None:
            try:
                self.c.close()
            except OSError:
                pass
            self.c = None
            self.to_c = _Queue()

    def _close_all(self):
        self._close_client()
        if self.s is not None:
            try:
                self.s.close()
            except OSError:
                pass
            self.s = None

    # -- client -> server
    def _client_messages(self):
        """Cut complete messages off cbuf and route them; False to stop."""
        while True:
            if self.phase == "raw":
                self._to_server(bytes(self.cbuf))
                self.cbuf.clear()
                return True
            if self.phase == "startup":
                if len(self.cbuf) < 8:
                    return True
                n, code = struct.unpack("!ii", self.cbuf[:8])
                if n < 8 or n > MAX_STARTUP:
                    return False
                if len(self.cbuf) < n:
                    return True
                msg = bytes(self.cbuf[:n])
                del self.cbuf[:n]
                if code in (SSL_REQUEST, GSSENC_REQUEST):
                    self.to_c.put(b"N")           # no encryption here; the client goes on in clear
                    continue
                self._to_server(msg)
                self.phase = "raw" if code == CANCEL_REQUEST else "framed"
                continue
            if len(self.cbuf) < 5:
                return True
            t = self.cbuf[0:1]
            n = struct.unpack("!i", self.cbuf[1:5])[0]
            if n < 4 or n > MAX_MESSAGE:
                return False
            if len(self.cbuf) < n + 1:
                return True
            msg = bytes(self.cbuf[:n + 1])
            del self.cbuf[:n + 1]
            if not self._route(t, msg):
                return False

    def _to_server(self, data, release_at=0.0):
        if self.hold_until is not None:
            release_at = max(release_at, self.hold_until)
        self.to_s.put(data, release_at)

    def _route(self, t, msg):
        if self.close_client_at_sync:
            self._to_server(msg)
            if t == b"S":
                self._close_client()
                self.close_client_at_sync = False
            return True
        rule = None
        if t in (b"Q", b"P"):
            body = msg[5:]
            if t == b"P":                 # statement name \0 query \0 ...
                body = body.split(b"\0", 1)[1] if b"\0" in body else b""
            text = body.split(b"\0", 1)[0].decode("utf-8", "replace")
            rule = self.proxy._match(text)
            if rule is not None and rule.action == "call" and rule.callback is not None:
                try:
                    rule.callback(text)
                except Exception as e:          # noqa: BLE001 - reported, never kills the proxy
                    self.proxy.errors.append(f"callback: {e!r}")
        if rule is None or rule.action == "call":
            self._to_server(msg)
            if rule is not None:
                rule.fired.set()
            return True
        a = rule.action
        now = time.monotonic()
        if a == "cut_before":
            rule.fired.set()
            return False
        if a == "delay":
            self._to_server(msg, now + rule.delay_s)
        elif a in ("lose_answer", "cut_after", "late"):
            if a == "late":
                self.hold_until = now + rule.delay_s
            self._to_server(msg)
            self.swallow = True
            self.close_after_z = True
            self.drain_deadline = now + rule.delay_s + DRAIN_TIMEOUT_S
            if a in ("cut_after", "late"):
                if t == b"Q":
                    self._close_client()
                else:
                    self.close_client_at_sync = True
        rule.fired.set()
        return True

    # -- server -> client
    def _server_data(self, data):
        """Track frame boundaries; drop what is swallowed; True when a
        swallowed answer has ended (ReadyForQuery) and we should close."""
        out = bytearray()
        i = 0
        done = False
        while i < len(data):
            if self.s_left == 0:
                need = 5 - len(self.s_hdr)
                take = data[i:i + need]
                self.s_hdr.extend(take)
                i += len(take)
                if len(self.s_hdr) < 5:
                    break
                self.s_type = self.s_hdr[0:1]
                n = struct.unpack("!i", self.s_hdr[1:5])[0]
                if not self.swallow:
                    out.extend(self.s_hdr)
                self.s_hdr.clear()
                self.s_left = max(n - 4, 0)
                if self.s_left == 0 and self.s_type == b"Z" and self.swallow:
                    done = True
                    break
                continue
            take = data[i:i + self.s_left]
            i += len(take)
            self.s_left -= len(take)
            if not self.swallow:
                out.extend(take)
            if self.s_left == 0 and self.s_type == b"Z" and self.swallow:
                done = True
                break
        if out and self.c is not None:
            self.to_c.put(out, time.monotonic() + self.proxy.answer_delay_s)
        return done

    def run(self):
        try:
            self._run()
        except Exception as e:               # noqa: BLE001
            self.proxy.errors.append(f"conn: {e!r}")
        finally:
            self._close_all()
            self.proxy._forget(self)

    def _run(self):
        try:
            self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.s.settimeout(5)
            self.s.connect(self.proxy.upstream)
        except OSError:
            return
        self.c.setblocking(False)
        self.s.setblocking(False)
        while not self.dead and not self.proxy.stopping:
            now = time.monotonic()
            if self.c is None and self.drain_deadline is None and not self.to_s.chunks:
                return
            if self.drain_deadline is not None and now > self.drain_deadline:
                return
            rd, wr = [], []
            if self.c is not None and self.to_s.size < QUEUE_CAP:
                rd.append(self.c)
            if self.s is not None and self.to_c.size < QUEUE_CAP:
                rd.append(self.s)
            if self.c is not None and self.to_c.ready(now):
                wr.append(self.c)
            if self.s is not None and self.to_s.ready(now):
                wr.append(self.s)
            timeout = 0.2
            for q in (self.to_c, self.to_s):
                r = q.next_release()
                if r is not None and r > now:
                    timeout = min(timeout, r - now)
            try:
                r_ok, w_ok, _ = select.select(rd, wr, [], max(timeout, 0.0))
            except (OSError, ValueError):
                return
            now = time.monotonic()
            if self.c is not None and self.c in w_ok and not self.to_c.write_to(self.c, now):
                self._close_client()
                if not self.swallow:
                    return
            if self.s is not None and self.s in w_ok and not self.to_s.write_to(self.s, now):
                return
            if self.c is not None and self.c in r_ok:
                try:
                    data = self.c.recv(RECV)
                except BlockingIOError:
                    data = None
                except OSError:
                    data = b""
                if data == b"":
                    self._close_client()
                    if not self.swallow:
                        # the client went away: let queued bytes reach the server, then stop
                        self.drain_deadline = time.monotonic() + 1.0 if self.to_s.chunks else None
                        if self.drain_deadline is None:
                            return
                elif data:
                    self.cbuf.extend(data)
                    if not self._client_messages():
                        return
            if self.s is not None and self.s in r_ok:
                try:
                    data = self.s.recv(RECV)
                except BlockingIOError:
                    data = None
                except OSError:
                    data = b""
                if data == b"":
                    # the server went away: hand the client what it has, then close
                    deadline = time.monotonic() + 2.0
                    while self.c is not None and self.to_c.chunks and time.monotonic() < deadline:
                        now = time.monotonic()
                        if not self.to_c.write_to(self.c, now):
                            break
                        time.sleep(0.005)
                    return
                if data:
                    if self._server_data(data) and self.close_after_z:
                        return


class PgProxy:
    def __init__(self, upstream_dir, workdir=None):
        self.upstream = os.path.join(upstream_dir, PG_SOCKET)
        self.dir = tempfile.mkdtemp(prefix="pgproxy-", dir=workdir)
        os.chmod(self.dir, 0o755)
        self.path = os.path.join(self.dir, PG_SOCKET)
        self.lock = threading.Lock()
        self.rules = []
        self.conns = set()
        self.refuse_until = 0.0
        self.answer_delay_s = 0.0
        self.stopping = False
        self.accepted = 0
        self.refused = 0
        self.errors = []
        self.listener = None
        self.thread = None

    @property
    def conninfo(self):
        return f"host={self.dir} dbname=paycoord user=postgres"

    # -- lifecycle
    def start(self):
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        os.chmod(self.path, 0o777)
        self.listener.listen(128)
        self.thread = threading.Thread(target=self._accept_loop, daemon=True, name="pgproxy-accept")
        self.thread.start()
        return self

    def stop(self):
        self.stopping = True
        if self.listener is not None:
            try:
                self.listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.listener.close()
        self.cut_all()
        if self.thread is not None:
            self.thread.join(5)
        with self.lock:
            conns = list(self.conns)
        for c in conns:
            c.join(5)
        shutil.rmtree(self.dir, ignore_errors=True)

    def _accept_loop(self):
        while not self.stopping:
            try:
                r, _, _ = select.select([self.listener], [], [], 0.2)
                if not r:
                    continue
                cs, _ = self.listener.accept()
            except OSError:
                if self.stopping:
                    return
                time.sleep(0.05)
                continue
            if time.monotonic() < self.refuse_until:
                self.refused += 1
                cs.close()
                continue
            conn = _Conn(self, cs)
            with self.lock:
                self.conns.add(conn)
                self.accepted += 1
            conn.start()

    def _forget(self, conn):
        with self.lock:
            self.conns.discard(conn)

    def _match(self, text):
        with self.lock:
            for r in self.rules:
                if r.take(text):
                    return r
        return None

    # -- controls
    def add_rule(self, substring, action, count=1, delay_s=0.0, callback=None):
        r = Rule(substring, action, count, delay_s, callback)
        with self.lock:
            self.rules.append(r)
        return r

    def clear_rules(self):
        with self.lock:
            self.rules = []

    def cut_all(self):
        with self.lock:
            conns = list(self.conns)
        for c in conns:
            c.kill()
        return len(conns)

    def refuse(self, seconds):
        """New connections are closed at once for `seconds`."""
        self.refuse_until = time.monotonic() + seconds

    def delay_answers(self, ms):
        self.answer_delay_s = ms / 1000.0

    def connections(self):
        with self.lock:
            return len(self.conns)
