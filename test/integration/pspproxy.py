"""pspproxy: a small HTTP proxy in front of the test processor (psp-sim) that
answers chosen calls with what psp-sim cannot be told to send the daemon: a
4xx on a retried create, a 409 idempotency_conflict to the daemon's own
create, a 5xx after forwarding. Loopback only; every other call is passed
through unchanged.

    pp = PspProxy(env.psp).start()
    d = env.daemon(processor_url=pp.url)
    pp.add_rule("POST", "/v1/payments", "forward_then", status=500)   # charged, answer lost as a 500
    pp.add_rule("POST", "/v1/payments", "answer", status=422)         # the retry: 4xx, not forwarded

Actions (a body given as bytes is sent as is, else as JSON; by default an
error in the processor API's own shape): `answer` (status/body without
forwarding), `forward_then`
(forward, then answer status/body instead of the processor's answer),
`forward_drop` (forward, then close the connection without an answer).
Rules apply in order, each `count` times (None: always).
"""

import http.client
import http.server
import json
import threading

MAX_BODY = 1 << 20


class _Rule:
    def __init__(self, method, path_prefix, action, status=None, body=None, count=1):
        assert action in ("answer", "forward_then", "forward_drop"), action
        self.method, self.path_prefix, self.action = method, path_prefix, action
        self.status, self.body, self.remaining = status, body, count
        self.hits = 0
        self.fired = threading.Event()


def _default_body(status, mode="generic"):
    """An error body in the processor API's own shape."""
    codes = {400: "invalid_request", 404: "not_found", 409: "idempotency_conflict", 422: "invalid_request",
             500: "internal", 502: "bad_gateway", 503: "unavailable"}
    msg = f"injected by pspproxy ({status})"
    if mode == "stripe":
        return {"error": {"type": "api_error" if status >= 500 else "invalid_request_error",
                          "code": codes.get(status, "error"), "message": msg}}
    if mode == "adyen":
        return {"status": status, "errorCode": codes.get(status, "error"), "message": msg,
                "errorType": "internal" if status >= 500 else "validation"}
    return {"error": {"code": codes.get(status, "error"), "message": msg}}


class PspProxy:
    def __init__(self, psp):
        self.psp = psp
        self.rules = []
        self.lock = threading.Lock()
        self.log = []                   # (method, path, status or 'dropped', rule action or None)
        self.server = None
        self.thread = None

    @property
    def url(self):
        """The processor_url to give the daemon (Adyen's carries the API version)."""
        return f"http://127.0.0.1:{self.server.server_address[1]}" + ("/v71" if self.psp.mode == "adyen" else "")

    def add_rule(self, method, path_prefix, action, status=None, body=None, count=1):
        r = _Rule(method, path_prefix, action, status, body, count)
        with self.lock:
            self.rules.append(r)
        return r

    def _body(self, rule):
        """A rule's answer: bytes as given, else JSON (the API's error shape by default)."""
        if isinstance(rule.body, bytes):
            return rule.body
        return json.dumps(rule.body if rule.body is not None else _default_body(rule.status, self.psp.mode)).encode()

    def clear_rules(self):
        with self.lock:
            self.rules = []

    def _match(self, method, path):
        with self.lock:
            for r in self.rules:
                if r.method == method and path.startswith(r.path_prefix) and (r.remaining is None or r.remaining > 0):
                    if r.remaining is not None:
                        r.remaining -= 1
                    r.hits += 1
                    return r
        return None

    def start(self):
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _forward(self, body):
                conn = http.client.HTTPConnection("127.0.0.1", proxy.psp.port, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items()
                               if k.lower() not in ("host", "connection", "content-length")}
                    conn.request(self.command, self.path, body=body if body else None, headers=headers)
                    resp = conn.getresponse()
                    return resp.status, resp.getheader("Content-Type", "application/json"), resp.read()
                finally:
                    conn.close()

            def _send(self, status, ctype, data):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self):
                n = int(self.headers.get("Content-Length") or 0)
                if n < 0 or n > MAX_BODY:
                    self._send(413, "application/json", b"{}")
                    self.close_connection = True
                    return
                body = self.rfile.read(n) if n else b""
                rule = proxy._match(self.command, self.path)
                action = rule.action if rule else None
                if rule is None:
                    st, ctype, data = self._forward(body)
                elif rule.action == "answer":
                    st, ctype, data = rule.status, "application/json", proxy._body(rule)
                elif rule.action == "forward_then":
                    self._forward(body)
                    st, ctype, data = rule.status, "application/json", proxy._body(rule)
                else:                                   # forward_drop
                    self._forward(body)
                    proxy.log.append((self.command, self.path, "dropped", action))
                    rule.fired.set()
                    self.close_connection = True
                    return
                proxy.log.append((self.command, self.path, st, action))
                self._send(st, ctype, data)
                if rule:
                    rule.fired.set()

            do_GET = do_POST = _handle

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()
        return self

    def stop(self):
        if self.server:
            self.server.shutdown()
            self.server.server_close()
            self.thread.join(5)
