"""A webhook receiver for the psp-sim tests: a loopback HTTP server in a
thread that records every POST (headers and raw body) and answers with a
configurable status and body."""

import http.server
import threading
import time


class Sink:
    def __init__(self, status=200, body=b"[accepted]"):
        self.status = status
        self.body = body
        self.requests = []
        self.lock = threading.Lock()
        sink = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                n = int(self.headers.get("Content-Length", "0"))
                raw = self.rfile.read(n)
                with sink.lock:
                    sink.requests.append((dict(self.headers), raw, time.monotonic()))
                    status, body = sink.status, sink.body
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hooks"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def answer(self, status, body=b"[accepted]"):
        with self.lock:
            self.status, self.body = status, body

    def received(self):
        with self.lock:
            return list(self.requests)

    def wait(self, n, timeout=10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.received()
            if len(got) >= n:
                return got
            time.sleep(0.02)
        raise AssertionError(f"expected {n} webhook deliveries, got {len(self.received())}")

    def close(self):
        self.server.shutdown()
        self.server.server_close()
