"""psp-sim --mode stripe against the Stripe behaviours of docs/processors.md.
Webhook signatures are checked here with Python's hmac, independently of
the C code."""

import base64
import hashlib
import hmac
import http.client
import json
import socket
import threading
import time
import urllib.parse

import pytest

from webhook_sink import Sink

TOKEN = "sk_test_psp_sim"
SECRET = "whsec_test_secret_0123"


@pytest.fixture
def sink():
    s = Sink(status=200, body=b"{}")
    yield s
    s.close()


@pytest.fixture
def stripe(make_sim, sink):
    return make_sim(args=["--mode", "stripe", "--webhook-url", sink.url, "--webhook-secret", SECRET],
                    token=TOKEN)


def call(sim, method, path, form=None, key=None, raw=None, headers=None, auth=True, timeout=10):
    """Returns (status, parsed JSON, response headers)."""
    h = {}
    body = None
    if form is not None:
        body = urllib.parse.urlencode(form)
    if raw is not None:
        body = raw
    if body is not None:
        h["Content-Type"] = "application/x-www-form-urlencoded"
    if auth:
        h["Authorization"] = f"Bearer {TOKEN}"
    if key is not None:
        h["Idempotency-Key"] = key
    h.update(headers or {})
    conn = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=h)
        r = conn.getresponse()
        data = r.read()
        try:
            parsed = json.loads(data) if data else None
        except ValueError:
            parsed = data.decode(errors="replace")
        return r.status, parsed, {k.lower(): v for k, v in r.getheaders()}
    finally:
        conn.close()


def pi_form(gid="pc:t1:0001", amount=1250, **extra):
    f = {"amount": str(amount), "currency": "eur", "confirm": "true", "payment_method": "pm_card_visa",
         "metadata[gid]": gid}
    f.update(extra)
    return f


def create(sim, gid="pc:t1:0001", key=None, **extra):
    return call(sim, "POST", "/v1/payment_intents", pi_form(gid, **extra), key=gid if key is None else key)


def ctl_payments(sim):
    st, body, _ = sim.request("GET", "/control/payments?limit=1000", port=sim.control_port, auth=False)
    assert st == 200, body
    return body["data"]


def verify_stripe_signature(headers, raw, secret=SECRET):
    """Stripe's documented scheme: t=<ts>,v1=<hex HMAC-SHA256(secret, "<ts>.<payload>")>."""
    parts = dict(p.split("=", 1) for p in headers["Stripe-Signature"].split(","))
    signed = parts["t"].encode() + b"." + raw
    expected = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, parts["v1"]) and abs(int(parts["t"]) - time.time()) < 300


# ---- create, replay, idempotency -----------------------------------------

def test_create_succeeds_with_stripe_shape(stripe):
    st, pi, h = create(stripe, "pc:t1:a")
    assert st == 200, pi
    assert pi["object"] == "payment_intent" and pi["id"].startswith("pi_")
    assert pi["status"] == "succeeded" and pi["amount"] == 1250 and pi["amount_received"] == 1250
    assert pi["currency"] == "eur" and pi["metadata"] == {"gid": "pc:t1:a"}
    assert pi["last_payment_error"] is None and pi["payment_method"] == "pm_card_visa"
    assert h["idempotency-key"] == "pc:t1:a" and "idempotent-replayed" not in h
    st, got, _ = call(stripe, "GET", "/v1/payment_intents/" + pi["id"])
    assert st == 200 and got == pi
    [row] = ctl_payments(stripe)
    assert row == {"key": "pc:t1:a", "processor_id": pi["id"], "amount": 1250, "currency": "EUR",
                   "status": "succeeded", "refunded": False, "created": pi["created"]}


def test_replay_same_params_and_idempotency_error(stripe):
    st, first, _ = create(stripe, "pc:t1:r")
    st2, again, h = create(stripe, "pc:t1:r")
    assert st2 == 200 and again == first and h["idempotent-replayed"] == "true"
    st3, err, _ = create(stripe, "pc:t1:r", amount=999)
    assert st3 == 400 and err["error"]["type"] == "idempotency_error"
    assert "same parameters" in err["error"]["message"]
    # metadata is a parameter too
    st4, err, _ = call(stripe, "POST", "/v1/payment_intents", pi_form("pc:t1:r", **{"metadata[x]": "1"}),
                       key="pc:t1:r")
    assert st4 == 400 and err["error"]["type"] == "idempotency_error"
    assert len(ctl_payments(stripe)) == 1
    c = stripe.counters()
    assert c["processed_creates"] == 1 and c["replays"] == 1 and c["conflicts"] == 2


def test_decline_is_402_card_error(stripe):
    st, body, _ = create(stripe, "pc:t1:d", **{"metadata[sim]": "decline"})
    assert st == 402, body
    e = body["error"]
    assert e["type"] == "card_error" and e["code"] == "card_declined" and e["decline_code"] == "generic_decline"
    assert e["payment_intent"]["status"] == "requires_payment_method"
    assert e["payment_intent"]["last_payment_error"]["code"] == "card_declined"
    st, again, h = create(stripe, "pc:t1:d", **{"metadata[sim]": "decline"})
    assert st == 402 and again == body and h["idempotent-replayed"] == "true"
    st, body, _ = call(stripe, "POST", "/v1/payment_intents",
                       pi_form("pc:t1:d2", payment_method="pm_card_chargeDeclinedInsufficientFunds"), key="pc:t1:d2")
    assert st == 402 and body["error"]["decline_code"] == "insufficient_funds"
    assert {r["key"]: r["status"] for r in ctl_payments(stripe)} == {"pc:t1:d": "declined", "pc:t1:d2": "declined"}


def test_500_after_execution_is_saved_and_replayed(stripe):
    stripe.control({"fail_after_rate": 1})
    st, body, _ = create(stripe, "pc:t1:f")
    assert st == 500 and body["error"]["type"] == "api_error"
    stripe.reset()
    st, again, h = create(stripe, "pc:t1:f")
    assert st == 500 and again == body and h["idempotent-replayed"] == "true"
    [row] = ctl_payments(stripe)
    assert row["status"] == "succeeded"  # charged all the same: find it by metadata
    st, found, _ = call(stripe, "GET", "/v1/payment_intents/search?" +
                        urllib.parse.urlencode({"query": "metadata['gid']:'pc:t1:f'"}))
    assert st == 200 and [p["id"] for p in found["data"]] == [row["processor_id"]]


def test_fail_before_is_not_saved(stripe):
    stripe.control({"fail_before_rate": 1})
    st, body, _ = create(stripe, "pc:t1:b")
    assert st == 503 and body["error"]["type"] == "api_error"
    stripe.reset()
    st, pi, h = create(stripe, "pc:t1:b")
    assert st == 200 and "idempotent-replayed" not in h and pi["status"] == "succeeded"
    assert stripe.counters()["processed_creates"] == 1


def test_drop_after_then_replay(stripe):
    stripe.control({"drop_after_rate": 1})
    with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
        create(stripe, "pc:t1:x")
    stripe.reset()
    st, pi, h = create(stripe, "pc:t1:x")
    assert st == 200 and h["idempotent-replayed"] == "true" and pi["status"] == "succeeded"


def test_key_pruned_after_retention_charges_again(stripe):
    stripe.control({"key_retention_ms": 200})
    st, first, _ = create(stripe, "pc:t1:p")
    assert st == 200
    time.sleep(0.35)
    st, second, h = create(stripe, "pc:t1:p")
    assert st == 200 and "idempotent-replayed" not in h and second["id"] != first["id"]
    rows = ctl_payments(stripe)
    assert [r["key"] for r in rows] == ["pc:t1:p", "pc:t1:p"]  # a double charge the checker must see
    assert stripe.counters()["keys_pruned"] == 1


def test_concurrent_request_gets_idempotency_key_in_use(stripe):
    out = {}
    t = threading.Thread(target=lambda: out.update(a=call(stripe, "POST", "/v1/payment_intents",
                                                          pi_form("pc:t1:u"), key="pc:t1:u")))
    stripe.control({"latency_ms": 800})
    t.start()
    stripe.wait_for(lambda c: c["held_requests"] == 1, what="the slow create held")
    stripe.control({"latency_ms": 0})
    # Executes at once, while the first request with the key is still executing.
    st, body, _ = call(stripe, "POST", "/v1/payment_intents", pi_form("pc:t1:u"), key="pc:t1:u")
    assert st == 409, body
    assert body["error"]["code"] == "idempotency_key_in_use"
    t.join()
    assert out["a"][0] == 200
    st, again, h = call(stripe, "POST", "/v1/payment_intents", pi_form("pc:t1:u"), key="pc:t1:u")
    assert st == 200 and h["idempotent-replayed"] == "true" and again == out["a"][1]
    c = stripe.counters()
    assert c["keys_in_use"] == 1 and c["processed_creates"] == 1


# ---- cancel ---------------------------------------------------------------

def cancel(sim, pi_id, key=None):
    return call(sim, "POST", f"/v1/payment_intents/{pi_id}/cancel", {}, key=key)


def test_cancel_status_rules(stripe):
    # succeeded: refused, with the intent in the error
    _, pi, _ = create(stripe, "pc:t1:s")
    st, body, _ = cancel(stripe, pi["id"])
    assert st == 400 and body["error"]["code"] == "payment_intent_unexpected_state"
    assert body["error"]["payment_intent"]["status"] == "succeeded"
    # declined (requires_payment_method): canceled
    _, body, _ = create(stripe, "pc:t1:dc", **{"metadata[sim]": "decline"})
    st, got, _ = cancel(stripe, body["error"]["payment_intent"]["id"])
    assert st == 200 and got["status"] == "canceled" and got["canceled_at"] is not None
    # canceled: refused
    st, body, _ = cancel(stripe, got["id"])
    assert st == 400 and body["error"]["code"] == "payment_intent_unexpected_state"
    # processing: refused unless the rare case is switched on
    _, pr, _ = create(stripe, "pc:t1:pr", **{"metadata[sim]": "pending"})
    assert pr["status"] == "processing"
    assert cancel(stripe, pr["id"])[0] == 400
    stripe.control({"stripe_cancel_processing": True})
    assert cancel(stripe, pr["id"])[1]["status"] == "canceled"
    # requires_action and requires_capture: canceled
    _, ra, _ = create(stripe, "pc:t1:ra", **{"metadata[sim]": "requires_action"})
    assert ra["status"] == "requires_action"
    assert cancel(stripe, ra["id"])[1]["status"] == "canceled"
    _, rc, _ = create(stripe, "pc:t1:rc", capture_method="manual")
    assert rc["status"] == "requires_capture" and rc["amount_capturable"] == 1250
    assert cancel(stripe, rc["id"])[1]["status"] == "canceled"
    # unknown id
    st, body, _ = cancel(stripe, "pi_" + "9" * 24)
    assert st == 404 and body["error"]["code"] == "resource_missing"
    statuses = {r["key"]: r["status"] for r in ctl_payments(stripe)}
    assert statuses == {"pc:t1:s": "succeeded", "pc:t1:dc": "canceled", "pc:t1:pr": "canceled",
                        "pc:t1:ra": "canceled", "pc:t1:rc": "canceled"}


def test_cancel_by_key_alone_is_not_possible(stripe):
    assert cancel(stripe, "pc:t1:nokey")[0] == 404


def test_pending_settles(stripe):
    stripe.control({"settle_ms": 200})
    _, pi, _ = create(stripe, "pc:t1:pe", **{"metadata[sim]": "pending"})
    assert pi["status"] == "processing" and pi["amount_received"] == 0
    time.sleep(0.3)
    assert call(stripe, "GET", "/v1/payment_intents/" + pi["id"])[1]["status"] == "succeeded"


# ---- search and list --------------------------------------------------------

def search(sim, query, **params):
    return call(sim, "GET", "/v1/payment_intents/search?" + urllib.parse.urlencode(dict(query=query, **params)))


def test_search_by_metadata_lags(stripe):
    stripe.control({"search_lag_ms": 400, "settle_ms": 100})
    _, pi, _ = create(stripe, "pc:t1:lag", **{"metadata[sim]": "pending"})
    st, res, _ = search(stripe, "metadata['gid']:'pc:t1:lag'")
    assert st == 200 and res["object"] == "search_result" and res["data"] == []
    time.sleep(0.45)
    st, res, _ = search(stripe, "metadata['gid']:'pc:t1:lag'")
    # indexed now, but the change to succeeded (100 ms after the create) is 400 ms late too
    assert [p["id"] for p in res["data"]] == [pi["id"]]
    time.sleep(0.1)
    st, res, _ = search(stripe, "metadata['gid']:'pc:t1:lag' AND status:'succeeded'")
    assert [p["status"] for p in res["data"]] == ["succeeded"]
    assert res["has_more"] is False and res["next_page"] is None
    assert search(stripe, 'metadata["gid"]:"pc:t1:lag"')[1]["data"][0]["id"] == pi["id"]
    assert search(stripe, "metadata['gid']:'nope'")[1]["data"] == []
    for bad in ("amount>1000", "metadata['gid']:'x' OR status:'succeeded'", "metadata['gid']:x"):
        st, body, _ = search(stripe, bad)
        assert st == 400 and body["error"]["type"] == "invalid_request_error", bad


def test_search_pages(stripe):
    ids = [create(stripe, f"pc:t1:sp{i}", **{"metadata[batch]": "b1"})[1]["id"] for i in range(5)]
    seen, page = [], None
    while True:
        params = {"limit": 2}
        if page:
            params["page"] = page
        _, res, _ = search(stripe, "metadata['batch']:'b1'", **params)
        seen += [p["id"] for p in res["data"]]
        if not res["has_more"]:
            break
        page = res["next_page"]
    assert seen == ids[::-1]  # newest first


def test_list_newest_first_with_created_bounds_and_paging(stripe):
    ids = [create(stripe, f"pc:t1:l{i}")[1]["id"] for i in range(12)]
    st, page, _ = call(stripe, "GET", "/v1/payment_intents")
    assert st == 200 and page["object"] == "list" and len(page["data"]) == 10 and page["has_more"] is True
    assert [p["id"] for p in page["data"]] == ids[::-1][:10]
    st, rest, _ = call(stripe, "GET", "/v1/payment_intents?limit=100&starting_after=" + page["data"][-1]["id"])
    assert [p["id"] for p in rest["data"]] == ids[::-1][10:] and rest["has_more"] is False
    created = page["data"][0]["created"]
    q = urllib.parse.urlencode({"created[gte]": created - 3600, "created[lt]": created + 1, "limit": 100})
    assert len(call(stripe, "GET", "/v1/payment_intents?" + q)[1]["data"]) == 12
    q = urllib.parse.urlencode({"created[gt]": created + 10})
    assert call(stripe, "GET", "/v1/payment_intents?" + q)[1]["data"] == []
    assert call(stripe, "GET", "/v1/payment_intents?limit=101")[0] == 400
    assert call(stripe, "GET", "/v1/payment_intents?created[foo]=1")[0] == 400


# ---- request parsing ---------------------------------------------------------

@pytest.mark.parametrize("raw,status,code", [
    ("amount=100&currency=eur&confirm=true&payment_method=pm_card_visa&metadata[gid]=lit", 200, None),
    ("amount=100&currency=EUR&confirm=true&payment_method=pm_card_visa&metadata%5Bgid%5D=pc%3At1%3Apct", 200, None),
    ("amount=100&currency=eur&confirm=true&payment_method=pm_card_visa&metadata[note]=a+b%2Bc", 200, None),
    ("amount=100&currency=eur&confirm=true&payment_method=pm_card_visa&metadata[gid]=%zz", 400, "parameter_invalid"),
    ("amount=100&currency=eur&confirm=true&payment_method=pm_card_visa&metadata[gid=x", 400, "parameter_invalid"),
    ("amount=100&currency=eur&confirm=true&payment_method=pm_card_visa&metadata[a][b][c][d]=x", 400,
     "parameter_invalid"),
    ("amount=100&amount=200&currency=eur&confirm=true&payment_method=pm_card_visa", 400, "parameter_invalid"),
    ("amount=100&currency=eur&confirm=true&payment_method=pm_card_visa&bogus=1", 400, "parameter_unknown"),
    ("currency=eur&confirm=true&payment_method=pm_card_visa", 400, "parameter_missing"),
    ("amount=1.5&currency=eur&confirm=true&payment_method=pm_card_visa", 400, "parameter_invalid_integer"),
    ("amount=100&currency=euro&confirm=true&payment_method=pm_card_visa", 400, "parameter_invalid"),
    ("amount=100&currency=eur&payment_method=pm_card_visa", 400, "parameter_invalid"),
    ("amount=100&currency=eur&confirm=true&payment_method=pm_card_visa&metadata[" + "k" * 41 + "]=v", 400,
     "parameter_invalid"),
    ("amount=100&currency=eur&confirm=true&payment_method=pm_card_visa&metadata[v]=" + "x" * 501, 400,
     "parameter_invalid"),
    ("amount=100&currency=eur&confirm=true&payment_method=pm_card_visa&metadata[x]=%00", 400, "parameter_invalid"),
])
def test_form_bodies(stripe, raw, status, code):
    st, body, _ = call(stripe, "POST", "/v1/payment_intents", raw=raw, key="k-" + str(abs(hash(raw))))
    assert st == status, body
    if code:
        assert body["error"]["code"] == code and body["error"]["type"] == "invalid_request_error"
        assert stripe.control()["payments"] == 0
    else:
        assert body["status"] == "succeeded"


def test_form_values_are_decoded(stripe):
    raw = ("amount=100&currency=eur&confirm=true&payment_method=pm_card_visa"
           "&metadata%5Bgid%5D=pc%3At1%3Aenc&metadata[note]=a+b%2Bc%26d")
    st, pi, _ = call(stripe, "POST", "/v1/payment_intents", raw=raw, key="enc")
    assert st == 200 and pi["metadata"] == {"gid": "pc:t1:enc", "note": "a b+c&d"}


def test_json_body_oversize_and_key_length(stripe):
    st, body, _ = call(stripe, "POST", "/v1/payment_intents", raw=json.dumps({"amount": 1}), key="j",
                       headers={"Content-Type": "application/json"})
    assert st == 400 and "x-www-form-urlencoded" in body["error"]["message"]
    st, _, _ = call(stripe, "POST", "/v1/payment_intents", pi_form("big", **{"metadata[pad]": "x" * 70000}),
                    key="big")
    assert st == 413
    st, body, _ = create(stripe, "pc:t1:long", key="k" * 256)
    assert st == 400
    assert stripe.control()["payments"] == 0


def test_auth_bearer_and_basic(stripe):
    st, body, _ = call(stripe, "GET", "/v1/payment_intents", auth=False)
    assert st == 401 and body["error"]["type"] == "invalid_request_error"
    basic = base64.b64encode((TOKEN + ":").encode()).decode()
    assert call(stripe, "GET", "/v1/payment_intents", auth=False, headers={"Authorization": "Basic " + basic})[0] == 200
    wrong = base64.b64encode(b"sk_test_wrong:").decode()
    assert call(stripe, "GET", "/v1/payment_intents", auth=False, headers={"Authorization": "Basic " + wrong})[0] == 401
    assert call(stripe, "GET", "/v1/payments", auth=True)[0] == 404


def test_rate_limit_429(stripe):
    stripe.control({"rate_limit_rate": 1, "retry_after_s": 3})
    st, body, h = create(stripe, "pc:t1:429")
    assert st == 429 and h["retry-after"] == "3" and body["error"]["code"] == "rate_limit"
    assert stripe.control()["payments"] == 0 and stripe.counters()["rate_limited"] == 1
    stripe.reset()
    assert create(stripe, "pc:t1:429")[0] == 200


# ---- webhooks ----------------------------------------------------------------

def events(sink):
    return [(json.loads(raw), headers, raw) for headers, raw, _ in sink.received()]


def test_webhooks_signed_and_typed(stripe, sink):
    stripe.control({"settle_ms": 100})
    _, pi, _ = create(stripe, "pc:t1:w1")
    _, pe, _ = create(stripe, "pc:t1:w2", **{"metadata[sim]": "pending"})
    sink.wait(5)
    time.sleep(0.2)
    # Deliveries run side by side, so they may arrive in any order (Stripe
    # does not promise one either): order them by event id, i.e. creation.
    got = sorted(events(sink), key=lambda e: e[0]["id"])
    for ev, headers, raw in got:
        assert verify_stripe_signature(headers, raw), headers
        assert not verify_stripe_signature(headers, raw, secret="whsec_other")
        assert ev["object"] == "event" and ev["data"]["object"]["object"] == "payment_intent"
    by_pi = {}
    for ev, _, _ in got:
        by_pi.setdefault(ev["data"]["object"]["id"], []).append(ev["type"])
    assert by_pi[pi["id"]] == ["payment_intent.created", "payment_intent.succeeded"]
    assert by_pi[pe["id"]] == ["payment_intent.created", "payment_intent.processing", "payment_intent.succeeded"]
    assert got[0][0]["request"]["idempotency_key"] == "pc:t1:w1"


def test_webhook_retries_until_2xx(stripe, sink):
    sink.answer(500, b"no")
    stripe.control({"webhook_retry_ms": 100})
    create(stripe, "pc:t1:wr")
    sink.wait(4)
    sink.answer(200, b"{}")
    stripe.wait_for(lambda c: c["webhooks_pending"] == 0, timeout=10, what="webhooks delivered")
    c = stripe.counters()
    assert c["webhooks_delivered"] == 2 and c["webhooks_failed"] >= 2
    # each attempt is signed afresh
    for headers, raw, _ in sink.received():
        assert verify_stripe_signature(headers, raw)


def test_webhook_faults(stripe, sink):
    stripe.control({"webhook_bad_signature_rate": 1})
    create(stripe, "pc:t1:wf")
    got = sink.wait(4)
    time.sleep(0.2)
    verdicts = sorted(verify_stripe_signature(h, raw) for h, raw, _ in sink.received())
    assert verdicts == [False, False, True, True]
    stripe.control({"webhook_bad_signature_rate": 0, "webhook_duplicate_rate": 1})
    n = len(sink.received())
    create(stripe, "pc:t1:wd")
    sink.wait(n + 4)
    stripe.control({"webhook_duplicate_rate": 0, "webhook_drop_rate": 1})
    create(stripe, "pc:t1:wx")
    time.sleep(0.3)
    assert len(sink.received()) == n + 4
    c = stripe.counters()
    assert c["webhooks_forged"] == 2 and c["webhooks_dropped"] == 2
    stripe.control({"webhook_drop_rate": 0, "webhook_delay_ms": 400})
    t0 = time.monotonic()
    create(stripe, "pc:t1:wl")
    sink.wait(n + 6)
    assert time.monotonic() - t0 >= 0.38


def test_webhook_url_set_by_control(make_sim, sink):
    sim = make_sim(args=["--mode", "stripe"], token=TOKEN)
    create(sim, "pc:t1:nohook")  # no URL: nothing queued
    st, cfg, _ = sim.request("POST", "/control/webhook", {"url": sink.url, "secret": SECRET}, port=sim.control_port)
    assert st == 200 and cfg["url"] == sink.url and cfg["secret_set"] is True
    st, body, _ = sim.request("POST", "/control/webhook", {"url": "http://10.0.0.1:80/x"}, port=sim.control_port)
    assert st == 400 and "loopback" in body["error"]["message"]
    create(sim, "pc:t1:hook")
    [(h, raw, _), _] = sink.wait(2)
    assert verify_stripe_signature(h, raw)


def test_control_payments_and_csv(stripe):
    for i in range(7):
        create(stripe, f"pc:t1:cp{i}", **({"metadata[sim]": "decline"} if i == 3 else {}))
    rows, after = [], None
    while True:
        q = "/control/payments?limit=3" + (f"&starting_after={after}" if after else "")
        st, page, _ = stripe.request("GET", q, port=stripe.control_port)
        assert st == 200 and page["mode"] == "stripe"
        rows += page["data"]
        if not page["has_more"]:
            break
        after = page["data"][-1]["processor_id"]
    assert [r["key"] for r in rows] == [f"pc:t1:cp{i}" for i in range(7)]
    assert rows[3]["status"] == "declined" and rows[3]["decline_code"] == "generic_decline"
    conn = http.client.HTTPConnection("127.0.0.1", stripe.control_port, timeout=5)
    conn.request("GET", "/control/settlement.csv")
    r = conn.getresponse()
    text = r.read().decode()
    conn.close()
    assert r.status == 200 and r.getheader("Content-Type") == "text/csv"
    lines = text.strip().split("\r\n")
    assert lines[0].startswith("Company Account,Merchant Account,Psp Reference,Merchant Reference")
    assert len(lines) == 1 + 6  # the declined one is not settled
    assert all(",Settled," in line and ",EUR,,12.50," in line for line in lines[1:])


def test_shared_faults_latency_and_blackhole(stripe):
    stripe.control({"latency_ms": 300})
    t0 = time.monotonic()
    assert create(stripe, "pc:t1:lat")[0] == 200
    assert time.monotonic() - t0 >= 0.28
    stripe.control({"latency_ms": 0, "blackhole": True})
    with pytest.raises((TimeoutError, socket.timeout)):
        call(stripe, "POST", "/v1/payment_intents", pi_form("pc:t1:bh"), key="pc:t1:bh", timeout=0.3)
    assert stripe.counters()["blackholed"] == 1
    stripe.reset()
    assert [r["key"] for r in ctl_payments(stripe)] == ["pc:t1:lat"]
    # Never executed, so the key was not saved: this is a first execution.
    st, pi, h = create(stripe, "pc:t1:bh")
    assert st == 200 and "idempotent-replayed" not in h
