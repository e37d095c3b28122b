"""psp-sim --mode adyen against the Adyen behaviours of docs/processors.md.
HMAC signatures of the notifications are checked here with Python's hmac,
independently of the C code."""

import base64
import binascii
import hashlib
import hmac
import http.client
import json
import threading
import time

import pytest

from webhook_sink import Sink

API_KEY = "adyen-test-api-key"
HMAC_KEY = "44782DEF547AAA06C910C43932B1EB0C71FC68D9D0C057550C48EC2ACF6BA056"
MERCHANT = "PaycoordTest"


@pytest.fixture
def sink():
    s = Sink(status=200, body=b"[accepted]")
    yield s
    s.close()


@pytest.fixture
def adyen(make_sim, sink):
    sim = make_sim(args=["--mode", "adyen", "--webhook-url", sink.url, "--webhook-secret", HMAC_KEY],
                   token=API_KEY)
    sim.control({"cancel_delay_ms": 50})
    return sim


def call(sim, path, body, key=None, auth=True, raw=None, headers=None):
    h = {"Content-Type": "application/json"}
    if auth:
        h["X-API-Key"] = API_KEY
    if key is not None:
        h["Idempotency-Key"] = key
    h.update(headers or {})
    conn = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=10)
    try:
        conn.request("POST", path, body=raw if raw is not None else json.dumps(body), headers=h)
        r = conn.getresponse()
        data = r.read()
        try:
            parsed = json.loads(data) if data else None
        except ValueError:
            parsed = data.decode(errors="replace")
        return r.status, parsed, {k.lower(): v for k, v in r.getheaders()}
    finally:
        conn.close()


def payment(ref, value=1250, currency="EUR", metadata=None):
    b = {"amount": {"value": value, "currency": currency}, "reference": ref, "merchantAccount": MERCHANT,
         "paymentMethod": {"type": "scheme", "encryptedCardNumber": "test_4111111111111111"},
         "shopperReference": "acct-42"}
    if metadata:
        b["metadata"] = metadata
    return b


def pay(sim, ref, key=None, **kw):
    return call(sim, "/v71/payments", payment(ref, **kw), key=ref if key is None else key)


def items(sink):
    out = []
    for headers, raw, _ in sink.received():
        doc = json.loads(raw)
        for it in doc["notificationItems"]:
            out.append(it["NotificationRequestItem"])
    return out


def adyen_hmac_ok(item, key_hex=HMAC_KEY):
    """Adyen's documented signing string, Base64 HMAC-SHA256 with the hex key's bytes."""
    fields = [item.get("pspReference", ""), item.get("originalReference", ""), item.get("merchantAccountCode", ""),
              item.get("merchantReference", ""), str(item["amount"]["value"]), item["amount"]["currency"],
              item.get("eventCode", ""), item.get("success", "")]
    mac = hmac.new(binascii.a2b_hex(key_hex), ":".join(fields).encode(), hashlib.sha256).digest()
    return hmac.compare_digest(base64.b64encode(mac).decode(), item["additionalData"]["hmacSignature"])


def ctl_payments(sim):
    st, body, _ = sim.request("GET", "/control/payments?limit=1000", port=sim.control_port)
    assert st == 200
    return body["data"]


def test_authorised_with_signed_authorisation_webhook(adyen, sink):
    st, r, h = pay(adyen, "pc:t1:a")
    assert st == 200, r
    assert r["resultCode"] == "Authorised" and r["merchantReference"] == "pc:t1:a"
    assert len(r["pspReference"]) == 16 and r["amount"] == {"currency": "EUR", "value": 1250}
    assert h["idempotency-key"] == "pc:t1:a"
    sink.wait(1)
    [it] = items(sink)
    assert it["eventCode"] == "AUTHORISATION" and it["success"] == "true"
    assert it["pspReference"] == r["pspReference"] and it["merchantReference"] == "pc:t1:a"
    assert it["merchantAccountCode"] == MERCHANT and adyen_hmac_ok(it)
    assert not adyen_hmac_ok(it, key_hex="00" * 32)
    [row] = ctl_payments(adyen)
    assert row["key"] == "pc:t1:a" and row["processor_id"] == r["pspReference"] and row["status"] == "succeeded"


def test_refused_and_error(adyen, sink):
    st, r, _ = pay(adyen, "pc:t1:r", metadata={"sim": "decline"})
    assert st == 200 and r["resultCode"] == "Refused" and r["refusalReason"] == "Refused"
    assert r["refusalReasonCode"] == "2"
    st, r2, _ = pay(adyen, "pc:t1:nf", metadata={"sim": "decline", "sim_decline_code": "insufficient_funds"})
    assert r2["refusalReason"] == "Not enough balance" and r2["refusalReasonCode"] == "12"
    st, r3, _ = pay(adyen, "pc:t1:e", metadata={"sim": "error"})
    assert r3["resultCode"] == "Error"
    sink.wait(3)
    assert {(i["merchantReference"], i["success"]) for i in items(sink)} == {
        ("pc:t1:r", "false"), ("pc:t1:nf", "false"), ("pc:t1:e", "false")}
    assert all(adyen_hmac_ok(i) for i in items(sink))
    assert {r["status"] for r in ctl_payments(adyen)} == {"declined"}


def test_pending_reported_only_by_webhook(adyen, sink):
    adyen.control({"settle_ms": 200})
    st, r, _ = pay(adyen, "pc:t1:p", metadata={"sim": "pending"})
    assert st == 200 and r["resultCode"] == "Pending"
    st, r2, _ = pay(adyen, "pc:t1:rc", metadata={"sim": "received"})
    assert r2["resultCode"] == "Received"
    time.sleep(0.1)
    assert sink.received() == []
    sink.wait(2)
    assert {(i["merchantReference"], i["eventCode"], i["success"]) for i in items(sink)} == {
        ("pc:t1:p", "AUTHORISATION", "true"), ("pc:t1:rc", "AUTHORISATION", "true")}
    # There is no call to read a payment back.
    conn = http.client.HTTPConnection("127.0.0.1", adyen.port, timeout=5)
    conn.request("GET", "/v71/payments/" + r["pspReference"], headers={"X-API-Key": API_KEY})
    assert conn.getresponse().status == 404
    conn.close()


def test_idempotency_key(adyen):
    st, r, _ = pay(adyen, "pc:t1:k", key="k" * 64)
    assert st == 200
    st, again, h = pay(adyen, "pc:t1:k", key="k" * 64)
    assert st == 200 and again == r and h["idempotency-key"] == "k" * 64
    st, body, _ = pay(adyen, "pc:t1:k", key="k" * 65)
    assert st == 400 and set(body) == {"status", "errorCode", "message", "errorType"}
    st, body, _ = pay(adyen, "pc:t1:k2", key="k" * 64)  # same key, another payment
    assert st == 422 and body["errorType"] == "validation"
    assert len(ctl_payments(adyen)) == 1
    adyen.control({"key_retention_ms": 1})
    time.sleep(0.01)
    st, fresh, _ = pay(adyen, "pc:t1:k", key="k" * 64)
    assert st == 200 and fresh["pspReference"] != r["pspReference"]


def test_in_progress_key(adyen):
    out = {}
    adyen.control({"latency_ms": 800})
    t = threading.Thread(target=lambda: out.update(a=pay(adyen, "pc:t1:ip")))
    t.start()
    adyen.wait_for(lambda c: c["held_requests"] == 1, what="held payment")
    adyen.control({"latency_ms": 0})
    st, body, _ = pay(adyen, "pc:t1:ip")
    assert st == 422 and "still being processed" in body["message"]
    t.join()
    assert out["a"][0] == 200
    assert pay(adyen, "pc:t1:ip")[1] == out["a"][1]


def test_fail_after_retry_with_key_gets_the_answer(adyen):
    adyen.control({"fail_after_rate": 1})
    st, body, _ = pay(adyen, "pc:t1:fa")
    assert st == 500 and body["errorType"] == "internal" and body["status"] == 500
    adyen.reset()
    st, r, _ = pay(adyen, "pc:t1:fa")
    assert st == 200 and r["resultCode"] == "Authorised"
    assert adyen.counters()["processed_creates"] == 1


def test_technical_cancel_outcomes(adyen, sink):
    _, auth, _ = pay(adyen, "pc:t1:c1")
    st, r, _ = call(adyen, "/v71/cancels", {"merchantAccount": MERCHANT, "paymentReference": "pc:t1:c1",
                                            "reference": "cancel-1"})
    assert st == 201 and r["status"] == "received" and r["paymentReference"] == "pc:t1:c1"
    assert len(r["pspReference"]) == 16
    st, r2, _ = call(adyen, "/v71/cancels", {"merchantAccount": MERCHANT, "paymentReference": "pc:t1:never"})
    assert st == 201 and r2["status"] == "received"
    sink.wait(3)
    tc = {i["merchantReference"]: i for i in items(sink) if i["eventCode"] == "TECHNICAL_CANCEL"}
    assert tc["pc:t1:c1"]["success"] == "true" and tc["pc:t1:c1"]["originalReference"] == auth["pspReference"]
    assert tc["pc:t1:c1"]["pspReference"] == r["pspReference"]
    assert tc["pc:t1:never"]["success"] == "false" and "originalReference" not in tc["pc:t1:never"]
    assert all(adyen_hmac_ok(i) for i in items(sink))
    assert {x["key"]: x["status"] for x in ctl_payments(adyen)} == {"pc:t1:c1": "canceled"}
    # Captured at once: the technical cancel fails and the charge stands.
    adyen.control({"adyen_autocapture": True})
    pay(adyen, "pc:t1:c2")
    call(adyen, "/v71/cancels", {"merchantAccount": MERCHANT, "paymentReference": "pc:t1:c2"})
    sink.wait(5)
    tc = {i["merchantReference"]: i for i in items(sink) if i["eventCode"] == "TECHNICAL_CANCEL"}
    assert tc["pc:t1:c2"]["success"] == "false"
    assert {x["key"]: x["status"] for x in ctl_payments(adyen)}["pc:t1:c2"] == "succeeded"
    # A pending payment is canceled before it settles.
    adyen.control({"settle_ms": 5000, "adyen_autocapture": False})
    pay(adyen, "pc:t1:c3", metadata={"sim": "pending"})
    call(adyen, "/v71/cancels", {"merchantAccount": MERCHANT, "paymentReference": "pc:t1:c3"})
    sink.wait(6)
    assert {x["key"]: x["status"] for x in ctl_payments(adyen)}["pc:t1:c3"] == "canceled"


def test_webhook_retried_until_accepted(adyen, sink):
    sink.answer(200, b"ok")  # a 2xx without [accepted]
    adyen.control({"webhook_retry_ms": 100})
    pay(adyen, "pc:t1:w")
    sink.wait(3)
    sink.answer(200, b"[accepted]")
    adyen.wait_for(lambda c: c["webhooks_pending"] == 0, timeout=10, what="webhook accepted")
    c = adyen.counters()
    assert c["webhooks_delivered"] == 1 and c["webhooks_failed"] >= 2
    adyen.control({"webhook_require_accepted": False})
    sink.answer(204, b"")
    pay(adyen, "pc:t1:w2")
    adyen.wait_for(lambda c: c["counters"]["webhooks_delivered"] == 2, timeout=10, what="2xx accepted")


def test_webhook_gives_up_and_bad_signature(adyen, sink):
    sink.answer(500, b"down")
    adyen.control({"webhook_retry_ms": 50, "webhook_max_attempts": 3})
    pay(adyen, "pc:t1:g")
    adyen.wait_for(lambda c: c["counters"]["webhooks_given_up"] == 1, timeout=10, what="given up")
    assert len(sink.received()) == 3
    sink.answer(200, b"[accepted]")
    adyen.control({"webhook_bad_signature_rate": 1})
    pay(adyen, "pc:t1:bs")
    sink.wait(5)
    new = [i for i in items(sink) if i["merchantReference"] == "pc:t1:bs"]
    assert sorted(adyen_hmac_ok(i) for i in new) == [False, True]


def test_errors_auth_and_429(adyen):
    st, body, _ = call(adyen, "/v71/payments", payment("x"), auth=False)
    assert st == 401 and body["errorType"] == "security"
    for broken in ({"amount": {"value": 1, "currency": "EUR"}, "merchantAccount": MERCHANT,
                    "paymentMethod": {"type": "scheme"}},
                   dict(payment("x"), amount={"value": 1.5, "currency": "EUR"}),
                   dict(payment("x"), amount={"value": 100, "currency": "eur"}),
                   dict(payment("x"), reference="r" * 81),
                   dict(payment("x"), merchantAccount=""),
                   dict(payment("x"), paymentMethod="visa")):
        st, body, _ = call(adyen, "/v71/payments", broken, key="b")
        assert st == 422 and set(body) == {"status", "errorCode", "message", "errorType"}, broken
    st, body, _ = call(adyen, "/v71/payments", None, raw="{not json", key="b")
    assert st == 400 and body["errorType"] == "validation"
    st, body, _ = call(adyen, "/v71/cancels", {"merchantAccount": MERCHANT})
    assert st == 422
    assert adyen.control()["payments"] == 0
    adyen.control({"rate_limit_rate": 1})
    st, body, h = pay(adyen, "pc:t1:429")
    assert st == 429 and h["retry-after"] == "1" and body["status"] == 429
    assert adyen.control()["payments"] == 0


def test_settlement_csv(adyen):
    pay(adyen, "pc:t1:s1", value=1234)
    pay(adyen, "pc:t1:s2", value=500, currency="JPY")
    pay(adyen, "pc:t1:s3", metadata={"sim": "decline"})
    conn = http.client.HTTPConnection("127.0.0.1", adyen.control_port, timeout=5)
    conn.request("GET", "/control/settlement.csv")
    text = conn.getresponse().read().decode()
    conn.close()
    import csv
    import io
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["Merchant Reference"] for r in rows] == ["pc:t1:s1", "pc:t1:s2"]
    assert rows[0]["Type"] == "Settled" and rows[0]["Gross Currency"] == "EUR"
    assert rows[0]["Gross Credit (GC)"] == "12.34" and rows[0]["Gross Debit (GC)"] == ""
    assert rows[1]["Gross Credit (GC)"] == "500" and len(rows[0]["Psp Reference"]) == 16
    assert rows[0]["Creation Date"][:2] == "20"
