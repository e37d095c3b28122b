"""psp-sim against the generic contract and the fault-injection contract in
docs/processor.md. Every test runs its own psp-sim (see conftest.py)."""

import errno
import http.client
import json
import random
import re
import socket
import struct
import subprocess
import time

import pytest

from conftest import parse_ready, quote, read_line, sim_binary

PAYMENT_FIELDS = {"id", "idempotency_key", "amount", "currency", "account", "reference", "status", "created"}


def assert_payment(p, key, status, amount=1250, currency="EUR", account="acct-42", reference="ref-1"):
    extra = set()
    if status == "declined":
        extra.add("decline_code")
    if p.get("refunded"):
        extra.add("refunded")
    assert set(p) == PAYMENT_FIELDS | extra, p
    assert re.fullmatch(r"psp_\d{12}", p["id"]), p
    assert p["idempotency_key"] == key
    assert p["amount"] == amount and p["currency"] == currency and p["account"] == account
    assert p["reference"] == reference
    assert p["status"] == status
    assert isinstance(p["created"], int) and abs(p["created"] - time.time()) < 3600


# ---- create / get -------------------------------------------------------

def test_create_is_idempotent(sim):
    st, first, _ = sim.create("gid-1")
    assert st == 201
    assert_payment(first, "gid-1", "succeeded")
    st, again, _ = sim.create("gid-1")
    assert st == 200 and again == first
    st, got, _ = sim.get("gid-1")
    assert st == 200 and got == first
    c = sim.counters()
    assert c["processed_creates"] == 1 and c["succeeded"] == 1 and c["replays"] == 1
    assert c["requests"]["create"] == 2 and c["requests"]["get"] == 1


def test_reference_may_be_absent(sim):
    st, p, _ = sim.create("no-ref", reference=None)
    assert st == 201 and p["reference"] is None
    assert sim.create("no-ref", reference=None)[0] == 200
    assert sim.create("no-ref", reference="now-one")[0] == 409


@pytest.mark.parametrize("change", [{"amount": 1251}, {"currency": "USD"}, {"account": "acct-43"},
                                    {"reference": "ref-2"}])
def test_create_conflict(sim, change):
    assert sim.create("gid-c")[0] == 201
    st, body, _ = sim.create("gid-c", **change)
    assert st == 409 and body == {"error": {"code": "idempotency_conflict"}}
    st, got, _ = sim.get("gid-c")
    assert_payment(got, "gid-c", "succeeded")  # unchanged
    c = sim.counters()
    assert c["processed_creates"] == 1 and c["conflicts"] == 1


def test_ids_follow_creation_order(sim):
    ids = [sim.create(f"k{i}")[1]["id"] for i in range(12)]
    assert ids == sorted(ids) and len(set(ids)) == 12


def test_get_unknown_is_404(sim):
    st, body, _ = sim.get("never-seen")
    assert st == 404 and body == {"error": {"code": "not_found"}}


def post_raw(sim, body, headers):
    conn = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=5)
    try:
        conn.request("POST", "/v1/payments", body=body, headers=headers)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


@pytest.mark.parametrize("body,headers", [
    ({"idempotency_key": "a", "amount": 1, "currency": "EUR", "account": "x"}, {}),  # no header
    ({"idempotency_key": "a", "amount": 1, "currency": "EUR", "account": "x"}, {"Idempotency-Key": "b"}),
    ({"amount": 1, "currency": "EUR", "account": "x"}, {"Idempotency-Key": "a"}),
    ("not json", {"Idempotency-Key": "a"}),
    ("[1,2]", {"Idempotency-Key": "a"}),
    ({"idempotency_key": "a", "amount": "1", "currency": "EUR", "account": "x"}, {"Idempotency-Key": "a"}),
    ({"idempotency_key": "a", "amount": 1.5, "currency": "EUR", "account": "x"}, {"Idempotency-Key": "a"}),
    ({"idempotency_key": "a", "amount": 0, "currency": "EUR", "account": "x"}, {"Idempotency-Key": "a"}),
    ({"idempotency_key": "a", "amount": 1, "currency": "eur", "account": "x"}, {"Idempotency-Key": "a"}),
    ({"idempotency_key": "a", "amount": 1, "currency": "EUR"}, {"Idempotency-Key": "a"}),
    ({"idempotency_key": "a", "amount": 1, "currency": "EUR", "account": "x", "reference": 5},
     {"Idempotency-Key": "a"}),
    ({"idempotency_key": "a", "amount": 1, "currency": "EUR", "account": "x", "metadata": {"sim": "nope"}},
     {"Idempotency-Key": "a"}),
    ({"idempotency_key": "a", "amount": 1, "currency": "EUR", "account": "x",
      "metadata": {"sim_latency_ms": "12ms"}}, {"Idempotency-Key": "a"}),
    ({"idempotency_key": "a" * 256, "amount": 1, "currency": "EUR", "account": "x"},
     {"Idempotency-Key": "a" * 256}),
])
def test_create_invalid_is_400(sim, body, headers):
    if not isinstance(body, str):
        body = json.dumps(body)
    status, raw = post_raw(sim, body, headers)
    assert status == 400, raw
    assert json.loads(raw)["error"]["code"] == "invalid_request"
    c = sim.counters()
    assert c["processed_creates"] == 0 and sim.control()["payments"] == 0


def test_body_over_cap_is_rejected(sim):
    big = json.dumps({"idempotency_key": "big", "amount": 1, "currency": "EUR", "account": "x",
                      "metadata": {"pad": "x" * 70000}})
    status, _ = post_raw(sim, big, {"Idempotency-Key": "big"})
    assert status == 413
    assert sim.control()["payments"] == 0


def test_keys_are_any_printable_ascii(sim):
    key = 'a/b c%?#"\\{}|~+&=' + "".join(chr(c) for c in range(0x20, 0x7F))
    key = key[:255]
    st, p, _ = sim.create(key)
    assert st == 201 and p["idempotency_key"] == key
    st, got, _ = sim.get(key)
    assert st == 200 and got == p
    assert sim.request("GET", "/v1/payments/" + quote("x" * 256))[0] == 400
    assert sim.request("GET", "/v1/payments/%zz")[0] == 400
    assert sim.request("GET", "/v1/payments/%09tab")[0] == 400


def test_routes_and_methods(sim):
    assert sim.request("GET", "/v2/payments")[0] == 404
    assert sim.request("GET", "/v1/paymentsx")[0] == 404
    assert sim.request("DELETE", "/v1/payments/k")[0] == 405
    assert sim.request("GET", "/v1/payments/k/cancel")[0] == 405
    assert sim.request("POST", "/v1/payments/k/other")[0] == 404
    # The control listener serves /control only.
    assert sim.request("GET", "/v1/payments", port=sim.control_port)[0] == 404


# ---- auth ---------------------------------------------------------------

def test_auth_required_when_token_set(make_sim, tmp_path):
    tf = tmp_path / "token"
    tf.write_text("s3cret-token\n")
    sim = make_sim(args=["--token-file", str(tf)])
    sim.token = None
    st, body, _ = sim.create("a1")
    assert st == 401 and body["error"]["code"] == "unauthorized"
    for bad in ("Bearer wrong", "Bearer s3cret-toke", "Bearer s3cret-token2", "Basic s3cret-token", "s3cret-token"):
        st, _, _ = sim.request("GET", "/v1/payments/a1", headers={"Authorization": bad})
        assert st == 401, bad
    sim.token = "s3cret-token"
    assert sim.create("a1")[0] == 201
    st, _, _ = sim.request("GET", "/v1/payments/a1", headers={"Authorization": "bearer s3cret-token"})
    assert st == 200
    # /control needs no token, on either listener.
    sim.token = None
    assert sim.request("GET", "/control")[0] == 200
    assert sim.request("GET", "/control", port=sim.control_port)[0] == 200
    assert sim.counters()["processed_creates"] == 1


# ---- cancel / refund ----------------------------------------------------

def test_cancel_tombstone_refuses_late_create(sim):
    st, tomb, _ = sim.cancel("late-1")
    assert st == 200 and tomb["status"] == "canceled" and tomb["idempotency_key"] == "late-1"
    assert set(tomb) == PAYMENT_FIELDS and re.fullmatch(r"psp_\d{12}", tomb["id"])
    # A tombstone has no amount, currency, account or reference.
    assert tomb["amount"] is None and tomb["currency"] is None and tomb["account"] is None
    assert tomb["reference"] is None
    st, p, _ = sim.create("late-1")
    assert st == 200 and p["status"] == "canceled" and p["id"] == tomb["id"]
    st, p2, _ = sim.create("late-1", amount=999)  # any body: still nothing charged
    assert st == 200 and p2 == p
    c = sim.counters()
    assert c["processed_creates"] == 0 and c["succeeded"] == 0
    assert c["tombstones"] == 1 and c["tombstone_hits"] == 2 and c["canceled"] == 1
    st, again, _ = sim.cancel("late-1")
    assert st == 200 and again == tomb


def test_cancel_succeeded_is_409(sim):
    _, p, _ = sim.create("s-1")
    st, body, _ = sim.cancel("s-1")
    assert st == 409
    assert body["error"]["code"] == "already_succeeded" and body["payment"] == p


def test_cancel_pending(sim):
    st, p, _ = sim.create("p-1", metadata={"sim": "pending"})
    assert st == 201 and p["status"] == "pending"
    st, c, _ = sim.cancel("p-1")
    assert st == 200 and c["status"] == "canceled" and c["id"] == p["id"]
    assert sim.create("p-1")[1]["status"] == "canceled"


def test_cancel_declined_and_canceled_unchanged(sim):
    _, d, _ = sim.create("d-1", metadata={"sim": "decline"})
    assert d["status"] == "declined"
    st, body, _ = sim.cancel("d-1")
    assert st == 200 and body == d


def test_cancel_unsupported(sim):
    sim.control({"cancel_unsupported": True})
    st, body, _ = sim.cancel("x")
    assert st == 501 and body["error"]["code"] == "cancel_unsupported"
    assert sim.control()["payments"] == 0
    assert sim.create("x")[0] == 201
    sim.control({"cancel_unsupported": False})
    assert sim.cancel("x")[0] == 409


def test_refund(sim):
    _, p, _ = sim.create("r-1")
    st, r, _ = sim.refund("r-1")
    assert st == 200 and r["refunded"] is True and r["status"] == "succeeded" and r["id"] == p["id"]
    assert_payment(r, "r-1", "succeeded")
    st, r2, _ = sim.refund("r-1")
    assert st == 200 and r2 == r
    assert sim.get("r-1")[1] == r
    assert sim.counters()["refunds"] == 1
    st, body, _ = sim.refund("nobody")
    assert st == 404 and body["error"]["code"] == "not_found"
    sim.create("r-2", metadata={"sim": "decline"})
    st, body, _ = sim.refund("r-2")
    assert st == 409 and body == {"error": {"code": "not_succeeded"}}
    sim.cancel("r-3")
    assert sim.refund("r-3")[0] == 409


def test_control_amend(sim):
    """POST /control/amend changes a payment behind the merchant's back (reconciliation tests)."""
    _, p, _ = sim.create("am-1", amount=1000)
    st, r, _ = sim.request("POST", "/control/amend", {"key": "am-1", "amount": 1500}, port=sim.control_port,
                           auth=False)
    assert st == 200 and r["key"] == "am-1" and r["amount"] == 1500 and r["refunded"] is False, r
    assert sim.get("am-1")[1]["amount"] == 1500
    st, r, _ = sim.request("POST", "/control/amend", {"key": "am-1", "refunded": True}, port=sim.control_port,
                           auth=False)
    assert st == 200 and r["refunded"] is True and sim.get("am-1")[1]["refunded"] is True
    sim.create("am-2", metadata={"sim": "decline"})
    st, body, _ = sim.request("POST", "/control/amend", {"key": "am-2", "refunded": True}, port=sim.control_port,
                              auth=False)
    assert st == 409 and body["error"]["code"] == "not_succeeded"
    st, body, _ = sim.request("POST", "/control/amend", {"key": "nobody", "amount": 5}, port=sim.control_port,
                              auth=False)
    assert st == 404
    for bad in ({"amount": 5}, {"key": "am-1", "amount": 0}, {"key": "am-1", "amount": 1.5},
                {"key": "am-1", "refunded": "yes"}):
        st, body, _ = sim.request("POST", "/control/amend", bad, port=sim.control_port, auth=False)
        assert st == 400 and body["error"]["code"] == "invalid_request", (bad, body)


# ---- list ---------------------------------------------------------------

def test_list_paging_every_payment_once(sim):
    conn = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=10)
    created = []
    for i in range(250):
        if i % 50 == 7:
            st, p, _ = sim.request("POST", f"/v1/payments/tomb-{i}/cancel", conn=conn)
            assert st == 200
        else:
            st, p, _ = sim.create(f"list-{i:03d}", conn=conn)
            assert st == 201
        created.append(p)
    conn.close()
    seen, after, pages = [], None, 0
    while True:
        params = {"limit": 7}
        if after:
            params["starting_after"] = after
        st, page, _ = sim.list(**params)
        assert st == 200 and set(page) == {"data", "has_more"}
        pages += 1
        seen += page["data"]
        assert len(page["data"]) <= 7
        if not page["has_more"]:
            break
        assert len(page["data"]) == 7
        after = page["data"][-1]["id"]
    assert pages == 36
    assert [p["id"] for p in seen] == [p["id"] for p in created]
    assert seen == created
    assert sorted(seen, key=lambda p: (p["created"], p["id"])) == seen
    # default limit is 100
    st, page, _ = sim.list()
    assert len(page["data"]) == 100 and page["has_more"] is True


def test_list_filters(sim):
    for i in range(5):
        sim.create(f"f-{i}")
    st, all_, _ = sim.list(limit=1000)
    data = all_["data"]
    assert len(data) == 5 and all_["has_more"] is False
    lo, hi = data[0]["created"], data[-1]["created"]
    assert sim.list(created_gte=lo)[1]["data"] == data
    assert sim.list(created_gte=hi + 1)[1]["data"] == []
    assert sim.list(created_lt=lo)[1]["data"] == []
    assert sim.list(created_gte=lo, created_lt=hi + 1)[1]["data"] == data
    page = sim.list(created_lt=hi + 1, limit=5)[1]
    assert page["has_more"] is False
    page = sim.list(created_lt=hi + 1, limit=4)[1]
    assert page["has_more"] is True and page["data"] == data[:4]
    assert sim.list(starting_after=data[-1]["id"])[1] == {"data": [], "has_more": False}
    assert sim.list(starting_after="psp_000000000000")[1]["data"] == data


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 1001}, {"limit": "x"}, {"starting_after": "nope"},
                                    {"created_gte": "yesterday"}, {"created_lt": "1.5"}])
def test_list_invalid(sim, params):
    st, body, _ = sim.list(**params)
    assert st == 400 and body["error"]["code"] == "invalid_request"


# ---- faults -------------------------------------------------------------

def test_control_shape_and_validation(sim):
    c = sim.control()
    assert c["faults"] == {
        "latency_ms": 0, "jitter_ms": 0, "decline_rate": 0, "pending_rate": 0, "settle_ms": 1000,
        "settle_status": "succeeded", "fail_before_rate": 0, "fail_after_rate": 0, "drop_after_rate": 0,
        "blackhole": False, "refuse_connections": False, "cancel_unsupported": False,
        "fault_ops": ["create"], "seed": c["faults"]["seed"], "rate_limit_rate": 0, "retry_after_s": 1}
    assert set(c["counters"]["requests"]) == {"create", "get", "cancel", "refund", "list"}
    for k in ("processed_creates", "succeeded", "declined", "pending", "canceled", "failed_before",
              "failed_after", "dropped_after", "blackholed"):
        assert c["counters"][k] == 0
    assert c["payments"] == 0
    for bad in ({"decline_rate": 1.5}, {"latency_ms": -1}, {"latency_ms": 1.5}, {"blackhole": 1},
                {"latency_ms": 600001}, {"settle_ms": 86400001}, {"seed": -1}, {"decline_rate": None},
                {"fault_ops": ["create", "delete"]}, {"settle_status": "pending"}, {"no_such": 1}, [1]):
        st, body, _ = sim.request("POST", "/control", bad, port=sim.control_port)
        assert st == 400 and body["error"]["code"] == "invalid_request", bad
    # A failed update changes nothing, even the valid fields in it.
    st, _, _ = sim.request("POST", "/control", {"decline_rate": 1, "bogus": 2}, port=sim.control_port)
    assert st == 400 and sim.control()["faults"]["decline_rate"] == 0
    # Merge semantics.
    sim.control({"latency_ms": 5})
    f = sim.control({"jitter_ms": 3})["faults"]
    assert f["latency_ms"] == 5 and f["jitter_ms"] == 3
    # /control also answers on the /v1 port.
    assert sim.request("GET", "/control")[1]["faults"] == f


def test_sigterm_with_held_requests(make_sim, tmp_path):
    """Requests waiting out the latency or sitting in the blackhole when
    SIGTERM arrives: clean exit 0 (no crash, no leak under ASan), state
    saved; the delayed ones were never processed."""
    state = tmp_path / "held.jsonl"
    sim = make_sim(state=state)
    sim.create("before")
    sim.control({"latency_ms": 5000, "fault_ops": ["create", "get"]})
    socks = []
    for i in range(6):
        s = socket.create_connection(("127.0.0.1", sim.port))
        meta = {"sim": "blackhole"} if i % 2 else None
        s.sendall(create_bytes(f"held-{i}", meta) if i < 4 else raw_request("GET", "/v1/payments/before"))
        socks.append(s)
    sim.wait_for(lambda c: c["held_requests"] == 6, what="six held requests")
    assert sim.stop() == 0, sim.log()
    for s in socks:
        s.settimeout(5)
        assert s.recv(100) == b""  # closed without an answer
        s.close()
    keys = [json.loads(line)["idempotency_key"] for line in state.read_text().splitlines()[1:]]
    assert keys == ["before"]


def test_latency(sim):
    sim.control({"latency_ms": 300})
    st, _, t = sim.create("lat-1")
    assert st == 201 and 0.28 <= t < 2.0
    st, _, t = sim.get("lat-1")  # latency applies to every op
    assert st == 200 and 0.28 <= t < 2.0
    st, _, t = sim.request("GET", "/control")
    assert t < 0.25  # not to /control
    sim.control({"latency_ms": 0, "jitter_ms": 150})
    times = [sim.get("lat-1")[2] for _ in range(10)]
    assert max(times) < 1.0 and max(times) > 0.02


def test_latency_processes_after_client_gave_up(sim):
    sim.control({"latency_ms": 500})
    with pytest.raises(TimeoutError):
        sim.create("slow-1", timeout=0.15)
    assert sim.control()["payments"] == 0  # not yet processed
    sim.wait_for(lambda c: c["payments"] == 1 and c["held_requests"] == 0, what="late processing")
    sim.control({"latency_ms": 0})
    st, p, _ = sim.get("slow-1")
    assert st == 200 and p["status"] == "succeeded"


def raw_request(method, path, body=b"", headers=None):
    h = {"Host": "127.0.0.1", "Content-Length": str(len(body))}
    h.update(headers or {})
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n"
    return head.encode() + body


def create_bytes(key, metadata=None):
    body = {"idempotency_key": key, "amount": 100, "currency": "EUR", "account": "a"}
    if metadata:
        body["metadata"] = metadata
    return raw_request("POST", "/v1/payments", json.dumps(body).encode(), {"Idempotency-Key": key})


def rst_close(s):
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def test_disconnect_mid_latency_is_safe(sim):
    """Clients that vanish (FIN or RST) while their request waits out the
    latency or sits in the blackhole must not crash psp-sim; delayed requests
    are still processed, blackholed ones never are."""
    sim.control({"latency_ms": 300, "fault_ops": ["create", "get"]})
    rng = random.Random(7)
    socks = []
    for i in range(40):
        s = socket.create_connection(("127.0.0.1", sim.port))
        if i % 4 == 0:
            s.sendall(raw_request("GET", f"/v1/payments/dc-{i}"))
        else:
            s.sendall(create_bytes(f"dc-{i}", {"sim": "blackhole"} if i % 4 == 3 else None))
        socks.append((i, s))
    time.sleep(0.05)
    for i, s in socks:
        time.sleep(rng.random() * 0.005)
        if i % 2:
            rst_close(s)
        else:
            s.close()
    c = sim.wait_for(lambda c: c["held_requests"] == 0, what="held requests to drain")
    creates = [i for i in range(40) if i % 4 in (1, 2)]
    assert c["payments"] == len(creates)
    assert c["counters"]["blackholed"] == 10
    sim.control({"latency_ms": 0})
    for i in creates:
        assert sim.get(f"dc-{i}")[0] == 200


def test_pipelined_requests_with_latency(sim):
    sim.control({"latency_ms": 100, "fault_ops": ["get"]})
    sim.create("pipe-1")
    s = socket.create_connection(("127.0.0.1", sim.port), timeout=5)
    s.sendall(raw_request("GET", "/v1/payments/pipe-1") + raw_request("GET", "/v1/payments/pipe-x"))
    data = b""
    deadline = time.monotonic() + 5
    while data.count(b"HTTP/1.1 ") < 2 and time.monotonic() < deadline:
        data += s.recv(65536)
    s.close()
    statuses = re.findall(rb"HTTP/1.1 (\d+)", data)
    assert statuses == [b"200", b"404"], data


def test_decline_rate(sim):
    sim.control({"decline_rate": 1})
    st, p, _ = sim.create("dec-1")
    assert st == 201
    assert_payment(p, "dec-1", "declined")
    assert p["decline_code"] == "card_declined"
    assert sim.create("dec-1")[1] == p  # replays are not re-decided
    st, p, _ = sim.create("dec-2", metadata={"sim_decline_code": "insufficient_funds"})
    assert p["status"] == "declined" and p["decline_code"] == "insufficient_funds"
    st, p, _ = sim.create("dec-3", metadata={"sim": "succeed"})
    assert p["status"] == "succeeded"
    c = sim.counters()
    assert c["declined"] == 2 and c["succeeded"] == 1 and c["processed_creates"] == 3


def test_pending_then_settle(sim):
    sim.control({"pending_rate": 1, "settle_ms": 300})
    st, p, _ = sim.create("pen-1")
    assert st == 201 and p["status"] == "pending"
    assert sim.get("pen-1")[1]["status"] == "pending"
    # The settle timer moves it without anyone asking.
    c = sim.wait_for(lambda c: c["counters"]["succeeded"] == 1, what="settlement")
    assert c["counters"]["pending"] == 1 and c["statuses"]["pending"] == 0
    st, p2, _ = sim.get("pen-1")
    assert p2["status"] == "succeeded" and p2["id"] == p["id"] and p2["created"] == p["created"]
    assert sim.cancel("pen-1")[0] == 409

    sim.control({"settle_status": "declined", "settle_ms": 200})
    _, p, _ = sim.create("pen-2")
    assert p["status"] == "pending"
    time.sleep(0.3)
    st, p, _ = sim.get("pen-2")
    assert p["status"] == "declined" and p["decline_code"] == "card_declined"

    # Canceled before its time: stays canceled.
    _, p, _ = sim.create("pen-3")
    assert sim.cancel("pen-3")[1]["status"] == "canceled"
    time.sleep(0.3)
    assert sim.get("pen-3")[1]["status"] == "canceled"
    assert sim.counters()["declined"] == 1


def test_fail_before_leaves_no_record(sim):
    sim.control({"fail_before_rate": 1})
    st, body, _ = sim.create("fb-1")
    assert st == 503 and body["error"]["code"] == "simulated_failure"
    sim.reset()
    assert sim.get("fb-1")[0] == 404
    c = sim.counters()
    assert c["failed_before"] == 1 and c["processed_creates"] == 0


def test_fail_after_leaves_a_record(sim):
    sim.control({"fail_after_rate": 1})
    st, body, _ = sim.create("fa-1")
    assert st == 500 and body["error"]["code"] == "simulated_failure"
    assert sim.get("fa-1")[1]["status"] == "succeeded"  # get is not in fault_ops
    st, _, _ = sim.create("fa-1")  # the retry is a replay, still failed after
    assert st == 500
    sim.reset()
    assert sim.create("fa-1")[0] == 200
    c = sim.counters()
    assert c["failed_after"] == 2 and c["processed_creates"] == 1 and c["succeeded"] == 1


@pytest.mark.parametrize("latency", [0, 100])
def test_drop_after_leaves_a_record(sim, latency):
    sim.control({"drop_after_rate": 1, "latency_ms": latency})
    with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
        sim.create("da-1")
    sim.reset()
    st, p, _ = sim.get("da-1")
    assert st == 200 and p["status"] == "succeeded"
    c = sim.counters()
    assert c["dropped_after"] == 1 and c["processed_creates"] == 1
    assert sim.control()["held_requests"] == 0


def test_blackhole(sim):
    sim.control({"blackhole": True})
    conn = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=0.3)
    with pytest.raises(TimeoutError):
        sim.create("bh-1", conn=conn)
    c = sim.control()
    assert c["held_requests"] == 1 and c["counters"]["blackholed"] == 1
    # Other ops are not in fault_ops.
    assert sim.get("bh-1")[0] == 404
    conn.close()
    sim.wait_for(lambda c: c["held_requests"] == 0, what="blackholed request released")
    sim.control({"blackhole": False})
    assert sim.get("bh-1")[0] == 404
    c = sim.counters()
    assert c["processed_creates"] == 0 and c["blackholed"] == 1
    assert sim.create("bh-1")[0] == 201


def test_refuse_connections(sim):
    kept = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=5)
    assert sim.create("rc-0", conn=kept)[0] == 201
    sim.control({"refuse_connections": True})
    assert sim.control()["accepting"] is False
    with pytest.raises(ConnectionRefusedError):
        sim.create("rc-1")
    s = socket.socket()
    assert s.connect_ex(("127.0.0.1", sim.port)) == errno.ECONNREFUSED
    s.close()
    # A connection opened before is closed on its next request, unanswered.
    with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
        sim.create("rc-2", conn=kept)
    kept.close()
    # The control listener keeps working.
    c = sim.control({"refuse_connections": False})
    assert c["accepting"] is True and c["counters"]["refused"] == 1
    assert sim.create("rc-1")[0] == 201
    assert sim.get("rc-2")[0] == 404
    # Reset reopens too.
    sim.control({"refuse_connections": True})
    sim.reset()
    assert sim.get("rc-1")[0] == 200


def test_fault_ops_limit_to_get(sim):
    sim.control({"fault_ops": ["get"], "fail_before_rate": 1})
    assert sim.create("fo-1")[0] == 201
    assert sim.get("fo-1")[0] == 503
    assert sim.refund("fo-1")[0] == 200
    assert sim.list()[0] == 200
    sim.control({"fault_ops": ["list", "cancel"]})
    assert sim.get("fo-1")[0] == 200
    assert sim.list()[0] == 503
    assert sim.cancel("fo-2")[0] == 503
    assert sim.control()["payments"] == 1
    sim.control({"fault_ops": []})
    assert sim.list()[0] == 200


def test_sim_metadata_overrides_rates(sim):
    sim.control({"decline_rate": 1, "fail_before_rate": 1})
    st, p, _ = sim.create("m-ok", metadata={"sim": "succeed"})
    assert st == 201 and p["status"] == "succeeded"
    st, p, _ = sim.create("m-pen", metadata={"sim": "pending"})
    assert st == 201 and p["status"] == "pending"
    assert sim.create("m-fb", metadata={"sim": "fail_before"})[0] == 503
    assert sim.create("m-fa", metadata={"sim": "fail_after"})[0] == 500
    with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
        sim.create("m-da", metadata={"sim": "drop_after"})
    with pytest.raises(TimeoutError):
        sim.create("m-bh", metadata={"sim": "blackhole"}, timeout=0.2)
    st, p, t = sim.create("m-lat", metadata={"sim": "succeed", "sim_latency_ms": "250"})
    assert st == 201 and t >= 0.23
    sim.reset()
    assert sim.get("m-fb")[0] == 404 and sim.get("m-bh")[0] == 404
    assert sim.get("m-fa")[1]["status"] == "succeeded"
    assert sim.get("m-da")[1]["status"] == "succeeded"
    c = sim.counters()
    assert c["failed_before"] == 1 and c["failed_after"] == 1 and c["dropped_after"] == 1
    assert c["blackholed"] == 1


def test_seed_makes_runs_reproducible(sim):
    def run():
        sim.reset(payments=True)
        sim.control({"seed": 42, "decline_rate": 0.5, "jitter_ms": 3})
        return [sim.create(f"seed-{i}")[1]["status"] for i in range(30)]
    a, b = run(), run()
    assert a == b and "declined" in a and "succeeded" in a


def test_reset(sim):
    sim.create("keep-1")
    sim.control({"decline_rate": 1, "latency_ms": 10, "fault_ops": ["get"]})
    c = sim.reset()
    assert c["faults"]["decline_rate"] == 0 and c["faults"]["fault_ops"] == ["create"]
    assert c["payments"] == 1 and c["counters"]["processed_creates"] == 1
    old_id = sim.get("keep-1")[1]["id"]
    c = sim.reset(payments=True)
    assert c["payments"] == 0 and c["counters"]["processed_creates"] == 0
    assert c["counters"]["requests"]["get"] == 0
    assert sim.get("keep-1")[0] == 404
    _, p, _ = sim.create("keep-1")
    assert p["id"] > old_id  # ids are never handed out twice


# ---- state file ---------------------------------------------------------

def test_restart_with_state_keeps_payments(make_sim, tmp_path):
    state = tmp_path / "state.jsonl"
    sim = make_sim(state=state)
    _, a, _ = sim.create("st-a", reference=None)
    _, b, _ = sim.create("st-b", metadata={"sim": "decline", "sim_decline_code": "do_not_honor"})
    sim.control({"pending_rate": 1, "settle_ms": 1200})
    _, c, _ = sim.create("st-c")
    _, t, _ = sim.cancel("st-t")
    sim.refund("st-a")
    a = sim.get("st-a")[1]
    before = sim.counters()
    assert c["status"] == "pending"
    sim.restart()
    assert state.exists() and not (tmp_path / "state.jsonl.tmp").exists()
    assert sim.get("st-a")[1] == a and a["refunded"] is True and a["reference"] is None
    assert sim.get("st-b")[1] == b and b["decline_code"] == "do_not_honor"
    assert sim.get("st-t")[1] == t
    assert sim.create("st-t")[1]["status"] == "canceled"
    assert sim.counters()["processed_creates"] == before["processed_creates"]
    # The pending one keeps its settle time across the restart.
    assert sim.get("st-c")[1]["status"] == "pending"
    sim.wait_for(lambda c: c["statuses"]["pending"] == 0, timeout=3, what="settlement after restart")
    assert sim.get("st-c")[1]["status"] == "succeeded"
    _, d, _ = sim.create("st-d")
    assert d["id"] > t["id"]
    st, page, _ = sim.list()
    assert [p["idempotency_key"] for p in page["data"]] == ["st-a", "st-b", "st-c", "st-t", "st-d"]


def test_control_save(make_sim, tmp_path):
    state = tmp_path / "s.jsonl"
    sim = make_sim(state=state)
    sim.create("sv-1")
    st, body, _ = sim.request("POST", "/control/save", port=sim.control_port)
    assert st == 200 and body == {"saved": True, "payments": 1}
    lines = state.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["idempotency_key"] == "sv-1"
    # SIGINT saves too.
    sim.create("sv-2")
    assert sim.stop(signal_int()) == 0
    assert len(state.read_text().splitlines()) == 3


def test_save_without_state_file(sim):
    st, body, _ = sim.request("POST", "/control/save", port=sim.control_port)
    assert st == 409 and body["error"]["code"] == "no_state_file"


def test_corrupt_state_file_refuses_to_start(tmp_path):
    state = tmp_path / "bad.jsonl"
    state.write_text("{not json\n")
    p = subprocess.run([sim_binary(), "--port", "0", "--state", str(state)], capture_output=True, timeout=10)
    assert p.returncode != 0 and b"load state" in p.stderr


def signal_int():
    import signal
    return signal.SIGINT


# ---- CLI ----------------------------------------------------------------

@pytest.mark.parametrize("addr", ["0.0.0.0", "10.1.2.3", "::", "localhost"])
def test_refuses_non_loopback_bind(addr):
    p = subprocess.run([sim_binary(), "--port", "0", "--bind", addr], capture_output=True, timeout=10)
    assert p.returncode == 2 and b"loopback" in p.stderr and p.stdout == b""


def test_fixed_control_port_and_other_loopback(make_sim):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    free = s.getsockname()[1]
    s.close()
    sim = make_sim(args=["--control-port", str(free), "--bind", "127.0.0.2", "--quiet"])
    assert sim.control_port == free
    conn = http.client.HTTPConnection("127.0.0.2", sim.port, timeout=5)
    conn.request("GET", "/control")
    assert conn.getresponse().status == 200
    conn.close()


def test_usage_errors():
    for args in ([], ["--port", "70000"], ["--port", "0", "--token", "a", "--token-file", "f"],
                 ["--port", "0", "extra"]):
        p = subprocess.run([sim_binary()] + args, capture_output=True, timeout=10)
        assert p.returncode == 2, args


def test_ready_line_is_the_only_stdout(tmp_path):
    p = subprocess.Popen([sim_binary(), "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        line = read_line(p, 10)
        assert re.fullmatch(r"psp-sim listening port=\d+ control_port=\d+\n", line)
        parse_ready(line)
    finally:
        p.terminate()
        out, _ = p.communicate(timeout=10)
    assert p.returncode == 0 and out == b""


# ---- mode-independent control endpoints ---------------------------------

def test_control_payments_matches_the_contract_list(sim):
    sim.create("cp-1")
    sim.create("cp-2", metadata={"sim": "decline"})
    sim.cancel("cp-3")
    sim.refund("cp-1")
    st, page, _ = sim.request("GET", "/control/payments", port=sim.control_port)
    assert st == 200 and page["mode"] == "generic" and page["has_more"] is False
    listed = sim.list(limit=1000)[1]["data"]
    projected = [{k: v for k, v in {
        "key": p["idempotency_key"], "processor_id": p["id"], "amount": p["amount"], "currency": p["currency"],
        "status": p["status"], "decline_code": p.get("decline_code"), "refunded": p.get("refunded", False),
        "created": p["created"]}.items() if not (k == "decline_code" and v is None)} for p in listed]
    assert page["data"] == projected
    st, body, _ = sim.request("GET", "/control/payments?limit=0", port=sim.control_port)
    assert st == 400
    st, body, _ = sim.request("GET", "/control/payments?starting_after=pi_1", port=sim.control_port)
    assert st == 400


def test_rate_limit_in_generic_mode(sim):
    sim.control({"rate_limit_rate": 1, "retry_after_s": 2})
    conn = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=5)
    body = json.dumps({"idempotency_key": "rl", "amount": 1, "currency": "EUR", "account": "a"})
    conn.request("POST", "/v1/payments", body=body, headers={"Idempotency-Key": "rl"})
    r = conn.getresponse()
    data = json.loads(r.read())
    conn.close()
    assert r.status == 429 and r.getheader("Retry-After") == "2" and data["error"]["code"] == "rate_limited"
    assert sim.control()["payments"] == 0 and sim.counters()["rate_limited"] == 1
    st, p, _ = sim.create("rl2", metadata={"sim": "rate_limit"})
    assert st == 429


def test_mode_options():
    for args in (["--mode", "paypal"], ["--mode", "stripe", "--state", "/tmp/x"],
                 ["--webhook-url", "http://127.0.0.1:1/x"],
                 ["--mode", "stripe", "--webhook-url", "http://192.168.1.1:80/x"],
                 ["--mode", "adyen", "--webhook-secret", "nothex"]):
        p = subprocess.run([sim_binary(), "--port", "0"] + args, capture_output=True, timeout=10)
        assert p.returncode == 2, (args, p.stderr)


def test_mode_specific_faults_are_refused_elsewhere(make_sim):
    sim = make_sim()
    for f in ({"search_lag_ms": 1}, {"webhook_drop_rate": 0.5}, {"adyen_autocapture": True}):
        st, body, _ = sim.request("POST", "/control", f, port=sim.control_port)
        assert st == 400 and "does not apply" in body["error"]["message"]
    stripe = make_sim(args=["--mode", "stripe"])
    assert "search_lag_ms" in stripe.control()["faults"] and "cancel_unsupported" not in stripe.control()["faults"]
    st, _, _ = stripe.request("POST", "/control", {"adyen_autocapture": True}, port=stripe.control_port)
    assert st == 400
