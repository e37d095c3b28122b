"""The demo's client: a few payments through the Unix socket, each outcome printed."""
import json
import socket
import sys
import time
import urllib.request

sock_path, control_port = sys.argv[1], int(sys.argv[2])
api = sys.argv[3] if len(sys.argv) > 3 else "generic"


class Conn:
    def __init__(self, path):
        for _ in range(200):
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(path)
                break
            except OSError:
                time.sleep(0.05)
        else:
            sys.exit("demo: daemon did not come up")
        self.f = self.s.makefile("rb")
        self.n = 0

    def call(self, op, **kw):
        self.n += 1
        self.s.sendall((json.dumps({"id": self.n, "op": op, **kw}) + "\n").encode())
        return json.loads(self.f.readline())


def faults(**kw):
    req = urllib.request.Request(f"http://127.0.0.1:{control_port}/control", data=json.dumps(kw).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=5).read()


c = Conn(sock_path)
for _ in range(100):
    if c.call("health")["result"]["ready"]:
        break
    time.sleep(0.1)


def show(title, r):
    if r["ok"]:
        res = r["result"]
        extra = ""
        if "status" in res and "payment_id" in res:
            extra = f" processor_ref={res['processor_ref']} decline_code={res['decline_code']}"
            if res.get("replayed"):
                extra += " replayed=true"
        line = f"status={res.get('status', '-')}" if "status" in res else json.dumps(res)
        print(f"  {title:<48} -> {line}{extra}")
    else:
        print(f"  {title:<48} -> error {r['error']['code']}: {r['error']['message']}")


print(f"== demo (processor: {api})")
show("open account alice (EUR)", c.call("account_open", account="alice", currency="EUR"))
show("credit alice 100.00 EUR", c.call("credit", account="alice", amount=10000, currency="EUR",
                                       idempotency_key="deposit-1"))
show("pay 12.50 from alice (order-1)", c.call("pay", account="alice", amount=1250, currency="EUR",
                                              idempotency_key="order-1", reference="order 1"))
show("retry order-1 (same key)", c.call("pay", account="alice", amount=1250, currency="EUR",
                                        idempotency_key="order-1"))
show("order-1 again with another amount", c.call("pay", account="alice", amount=999, currency="EUR",
                                                 idempotency_key="order-1"))
show("pay 20.00, processor declines (order-2)", c.call("pay", account="alice", amount=2000, currency="EUR",
                                                        idempotency_key="order-2", metadata={"sim": "decline"}))
show("pay 500.00, more than alice has (order-3)", c.call("pay", account="alice", amount=50000, currency="EUR",
                                                          idempotency_key="order-3"))
faults(settle_ms=700)
show("pay 5.00, processor says pending (order-4)", c.call("pay", account="alice", amount=500, currency="EUR",
                                                          idempotency_key="order-4", wait_ms=0,
                                                          metadata={"sim": "pending"}))
show("balance while order-4 is pending", c.call("balance", account="alice"))
time.sleep(1.5)
show("status of order-4 a moment later", c.call("status", idempotency_key="order-4"))
show("pay with amount 1.5 (bad input)", c.call("pay", account="alice", amount=1.5, currency="EUR",
                                               idempotency_key="bad"))
show("final balance of alice", c.call("balance", account="alice"))
with urllib.request.urlopen(f"http://127.0.0.1:{control_port}/control/payments", timeout=5) as r:
    charges = json.loads(r.read())["data"]
print(f"== the processor's own list ({api}):")
for p in charges:
    print(f"  {p['key']:<34} {p['processor_id']:<28} {p['status']:<10} {p['amount']:>6} {p['currency']}")
if api != "generic":
    st = c.call("stats")["result"]
    print(f"== webhooks received by the daemon: {st['webhooks']}")
