"""What each real processor's adapter does where the APIs differ from the
generic contract (docs/processors.md): Stripe's replayed 500 found by a
metadata search, a search that is conclusive only after its lag, cancel by
the PaymentIntent's id where its status allows; Adyen's outcomes by webhook,
the technical cancel at the deadline, the charge that stands when it fails,
manual review when no webhook decides; the webhook listener (signatures,
duplicates); and answers that cannot be read, which are never a decline.

Each test runs only for the processor API it is about (PC_PROCESSOR), and
ends with the invariants against the processor's own list."""

import base64
import hashlib
import hmac
import json
import time
import urllib.request

from harness import PROCESSOR, check_invariants, only_processors, wait_for

FAST = {"recovery_interval_ms": 300, "processor_poll_ms": 50}
stripe_only = only_processors("stripe", why="about the Stripe adapter")
adyen_only = only_processors("adyen", why="about the Adyen adapter")
webhooks_only = only_processors("stripe", "adyen", why="the generic contract has no webhooks")


def post(url, body, headers=None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def stats(c):
    return c.ok("stats")


def events(env):
    return env.pg.query("SELECT event_id, gid, kind, status, success FROM processor_events ORDER BY received_at")


# ------------------------------------------------------------------ Stripe

@stripe_only
def test_stripe_replayed_500_is_found_by_search(env):
    """The create executes and Stripe stores its 500: every replay answers
    the same 500. The payment is found by its metadata gid once the search
    has caught up (search lag), retrieved by id, and committed."""
    env.psp.faults(search_lag_ms=1500, webhook_drop_rate=1.0)      # no webhook tells the pi_ id
    d = env.daemon(processor_retries=2, **FAST)
    c = d.client()
    env.open_account(c, "s5", balance=1000)
    r = c.ok("pay", account="s5", amount=100, currency="EUR", idempotency_key="k-s5", wait_ms=200,
             metadata={"sim": "fail_after"})
    assert r["status"] == "pending"
    wait_for(lambda: c.ok("status", idempotency_key="k-s5")["status"] == "succeeded", timeout=15)
    log = d.log_text()
    assert "replayed=1" in log and "call=search" in log and "call=retrieve" in log
    assert env.psp.counters()["processed_creates"] == 1
    d.stop()
    check_invariants(env.pg, env.psp, answers={"k-s5": "succeeded"})


@stripe_only
def test_stripe_search_finding_nothing_is_conclusive_only_after_the_lag(env):
    """Every create is lost before it reaches Stripe. At the deadline there
    is no pi_ id to cancel by; a search that finds nothing is conclusive only
    stripe_search_lag_s + processor_timeout_ms after the deadline: before
    that the payment stays pending, after it is declined (canceled)."""
    env.psp.faults(blackhole=True, fault_ops=["create"])
    d = env.daemon(processor_timeout_ms=300, processor_retries=0, payment_deadline_ms=1500, stripe_search_lag_s=3,
                   log_level="info",
                   circuit_failures=1000, **FAST)
    c = d.client()
    env.open_account(c, "sl", balance=1000)
    t0 = time.monotonic()
    r = c.ok("pay", account="sl", amount=100, currency="EUR", idempotency_key="k-sl", wait_ms=0)
    time.sleep(3.0)                 # past the deadline, inside the lag
    assert c.ok("status", idempotency_key="k-sl")["status"] == "pending"
    assert "event=search_inconclusive" in d.log_text()
    wait_for(lambda: c.ok("status", idempotency_key="k-sl")["status"] == "declined", timeout=15)
    assert time.monotonic() - t0 >= 1.5 + 3 + 0.3
    assert "event=search_conclusive" in d.log_text()
    st = c.ok("status", idempotency_key="k-sl")
    assert st["decline_code"] == "canceled" and r["gid"] == st["gid"]
    assert env.psp.counters()["processed_creates"] == 0
    env.psp.faults(blackhole=False)
    d.stop()
    check_invariants(env.pg, env.psp, answers={"k-sl": "declined"})


@stripe_only
def test_stripe_processing_cannot_be_canceled_and_settles(env):
    """A PaymentIntent in 'processing' at the deadline: Stripe refuses the
    cancel (payment_intent_unexpected_state); the payment stays pending and
    is asked again until the intent settles; then its outcome decides."""
    env.psp.faults(settle_ms=2500, settle_status="succeeded")
    d = env.daemon(payment_deadline_ms=1000, **FAST)
    c = d.client()
    env.open_account(c, "sp", balance=1000)
    r = c.ok("pay", account="sp", amount=100, currency="EUR", idempotency_key="k-sp", wait_ms=0,
             metadata={"sim": "pending"})
    assert r["status"] == "pending"
    wait_for(lambda: c.ok("status", idempotency_key="k-sp")["status"] == "succeeded", timeout=15)
    assert "payment_intent_unexpected_state" in d.log_text()
    d.stop()
    check_invariants(env.pg, env.psp, answers={"k-sp": "succeeded"})


@stripe_only
def test_stripe_requires_action_is_canceled_by_id_at_the_deadline(env):
    env.psp.faults(settle_ms=600000)
    d = env.daemon(payment_deadline_ms=1000, **FAST)
    c = d.client()
    env.open_account(c, "sa", balance=1000)
    c.ok("pay", account="sa", amount=100, currency="EUR", idempotency_key="k-sa", wait_ms=0,
         metadata={"sim": "requires_action"})
    wait_for(lambda: c.ok("status", idempotency_key="k-sa")["status"] == "declined", timeout=10)
    st = c.ok("status", idempotency_key="k-sa")
    assert st["decline_code"] == "canceled" and st["processor_ref"].startswith("pi_")
    assert env.psp.status(st["gid"]) == "canceled"
    assert c.ok("balance", account="sa")["balance"] == 1000
    d.stop()
    check_invariants(env.pg, env.psp, answers={"k-sa": "declined"})


@stripe_only
def test_stripe_unreadable_answers_are_unknown_never_declines(env):
    """A 200 that is not JSON, a 402 without its intent, a 200 for another
    gid: each is an unknown outcome (counted), and the payment is settled by
    what Stripe really did."""
    pp = env.pspproxy()
    d = env.daemon(processor_url=pp.url, processor_retries=3, circuit_failures=1000, **FAST)
    c = d.client()
    env.open_account(c, "sb", balance=1000)
    pp.add_rule("POST", "/v1/payment_intents", "forward_then", status=200, body=b"<html>oops</html>")
    pp.add_rule("POST", "/v1/payment_intents", "forward_then", status=402,
                body={"error": {"type": "card_error", "code": "card_declined"}})
    pp.add_rule("POST", "/v1/payment_intents", "forward_then", status=200,
                body={"id": "pi_000000000000000000000099", "object": "payment_intent", "amount": 100,
                      "currency": "eur", "status": "requires_payment_method", "metadata": {"gid": "pc:t1:someoneelse"}})
    r = c.ok("pay", account="sb", amount=100, currency="EUR", idempotency_key="k-sb")
    assert r["status"] != "declined", r
    wait_for(lambda: c.ok("status", idempotency_key="k-sb")["status"] == "succeeded", timeout=15)
    assert stats(c)["processor"]["bad_answers"] >= 3
    assert "event=bad_answer" in d.log_text()
    d.stop()
    check_invariants(env.pg, env.psp, answers={"k-sb": "succeeded"})


@stripe_only
def test_stripe_webhook_signature_and_duplicates(env):
    d = env.daemon(**FAST)
    c = d.client()
    body = json.dumps({"id": "evt_test_1", "object": "event", "type": "payment_intent.succeeded",
                       "data": {"object": {"id": "pi_000000000000000000000042", "object": "payment_intent",
                                           "amount": 5, "currency": "eur", "status": "succeeded",
                                           "metadata": {"gid": "pc:t1:nobody"}}}}).encode()
    secret = env.psp.webhook_secret
    t = int(time.time())

    def sig(key, ts, b):
        return hmac.new(key.encode(), f"{ts}.".encode() + b, hashlib.sha256).hexdigest()
    before = stats(c)["webhooks"]
    assert post(d.webhook_url, body)[0] == 401                                            # unsigned
    assert post(d.webhook_url, body, {"Stripe-Signature": f"t={t},v1={sig('whsec_wrong', t, body)}"})[0] == 401
    assert post(d.webhook_url, body, {"Stripe-Signature": f"t={t - 3600},v1={sig(secret, t - 3600, body)}"})[0] == 401
    assert events(env) == []
    st, text = post(d.webhook_url, body, {"Stripe-Signature": f"t={t},v1={sig(secret, t, body)}"})
    assert (st, text) == (200, "[accepted]")
    st, _ = post(d.webhook_url, body, {"Stripe-Signature": f"t={t},v1={sig(secret, t, body)}"})
    assert st == 200
    assert events(env) == [("evt_test_1", "pc:t1:nobody", "payment_intent.succeeded", "succeeded", True)]
    after = stats(c)["webhooks"]
    assert after["rejected"] - before["rejected"] == 3
    assert after["accepted"] - before["accepted"] == 1 and after["duplicates"] - before["duplicates"] == 1
    d.stop()
    check_invariants(env.pg, env.psp)


# ------------------------------------------------------------------ Adyen

@adyen_only
def test_adyen_pending_settles_by_webhook_only(env):
    """Pending answers; the outcome comes only as an AUTHORISATION webhook
    (Adyen has no read-back): no request is made while waiting."""
    env.psp.faults(settle_ms=800, settle_status="declined")
    d = env.daemon(**FAST)
    c = d.client()
    env.open_account(c, "ap", balance=1000)
    r = c.ok("pay", account="ap", amount=100, currency="EUR", idempotency_key="k-ap", wait_ms=0,
             metadata={"sim": "pending"})
    assert r["status"] == "pending"
    wait_for(lambda: c.ok("status", idempotency_key="k-ap")["status"] == "declined", timeout=10)
    assert env.psp.counters()["requests"]["create"] == 1 and env.psp.counters()["requests"]["cancel"] == 0
    assert any(e[2] == "AUTHORISATION" and e[4] is False for e in events(env))
    d.stop()
    check_invariants(env.pg, env.psp, answers={"k-ap": "declined"})


@adyen_only
def test_adyen_technical_cancel_at_the_deadline(env):
    env.psp.faults(settle_ms=600000)
    d = env.daemon(payment_deadline_ms=1500, **FAST)
    c = d.client()
    env.open_account(c, "at", balance=1000)
    c.ok("pay", account="at", amount=100, currency="EUR", idempotency_key="k-at", wait_ms=0,
         metadata={"sim": "received"})
    wait_for(lambda: c.ok("status", idempotency_key="k-at")["status"] == "declined", timeout=10)
    st = c.ok("status", idempotency_key="k-at")
    assert st["decline_code"] == "canceled"
    assert env.psp.counters()["cancels_received"] == 1                        # sent once, then awaited
    assert any(e[2] == "TECHNICAL_CANCEL" and e[4] is True for e in events(env))
    assert env.psp.status(st["gid"]) == "canceled"
    d.stop()
    check_invariants(env.pg, env.psp, answers={"k-at": "declined"})


@adyen_only
def test_adyen_failed_technical_cancel_leaves_the_charge_standing(env):
    """Every answer to the create (and to its replays) is lost until the
    deadline, and the webhooks are late; at the deadline the technical
    cancel fails (captured at once: autocapture); the AUTHORISATION then
    decides: the charge stands, the debit commits."""
    env.psp.faults(drop_after_rate=1.0, adyen_autocapture=True, webhook_delay_ms=2500)
    d = env.daemon(processor_retries=0, payment_deadline_ms=1500, adyen_webhook_timeout_s=20, circuit_failures=1000,
                   **FAST)
    c = d.client()
    env.open_account(c, "af", balance=1000)
    c.ok("pay", account="af", amount=100, currency="EUR", idempotency_key="k-af", wait_ms=0)
    time.sleep(2.0)                 # past the deadline: the cancel is sent (cancels are not dropped)
    env.psp.faults(drop_after_rate=0.0)
    wait_for(lambda: c.ok("status", idempotency_key="k-af")["status"] == "succeeded", timeout=20)
    kinds = {(e[2], e[4]) for e in events(env)}
    assert ("TECHNICAL_CANCEL", False) in kinds and ("AUTHORISATION", True) in kinds
    assert "the charge stands" in d.log_text()
    d.stop()
    check_invariants(env.pg, env.psp, answers={"k-af": "succeeded"})


@adyen_only
def test_adyen_without_a_deciding_webhook_goes_to_review(env):
    """Every webhook is lost: after the technical cancel, nothing decides
    within adyen_webhook_timeout_s: manual review, never a guess. The
    operator settles it by the processor's own record."""
    from harness import resolve_reviews
    env.psp.faults(settle_ms=600000, webhook_drop_rate=1.0)
    d = env.daemon(payment_deadline_ms=1500, adyen_webhook_timeout_s=2, **FAST)
    c = d.client()
    env.open_account(c, "ar", balance=1000)
    r = c.ok("pay", account="ar", amount=100, currency="EUR", idempotency_key="k-ar", wait_ms=0,
             metadata={"sim": "pending"})
    wait_for(lambda: [t for t in c.ok("prepared")["transactions"] if t["gid"] == r["gid"] and t["state"] == "review"],
             timeout=15, what="review")
    assert "no webhook decided the technical cancel" in d.log_text()
    assert c.ok("status", idempotency_key="k-ar")["status"] == "pending"
    assert resolve_reviews(c, env.psp) == {r["gid"]: ("canceled", "rolled_back")}
    d.stop()
    check_invariants(env.pg, env.psp, answers={"k-ar": "declined"})


@adyen_only
def test_adyen_forged_and_duplicate_notifications(env):
    """Forged copies (wrong HMAC) arrive first and are refused with nothing
    changed; every genuine notification arrives twice and is stored once."""
    env.psp.faults(webhook_bad_signature_rate=1.0, webhook_duplicate_rate=1.0)
    d = env.daemon(**FAST)
    c = d.client()
    env.open_account(c, "ah", balance=1000)
    r = c.ok("pay", account="ah", amount=100, currency="EUR", idempotency_key="k-ah")
    assert r["status"] == "succeeded"
    wait_for(lambda: stats(c)["webhooks"]["duplicates"] >= 1 and stats(c)["webhooks"]["rejected"] >= 1, timeout=10)
    ids = [e[0] for e in events(env)]
    assert len(ids) == len(set(ids)) == 1
    # unsigned, and signed with another key
    item = {"amount": {"currency": "EUR", "value": 100}, "eventCode": "AUTHORISATION",
            "merchantAccountCode": "PspSimMerchant", "merchantReference": r["gid"], "pspReference": "1234",
            "success": "false"}
    assert post(d.webhook_url, {"live": "false", "notificationItems": [{"NotificationRequestItem": item}]})[0] == 401
    key = bytes.fromhex("00" * 32)
    signing = "1234::PspSimMerchant:%s:100:EUR:AUTHORISATION:false" % r["gid"]
    item["additionalData"] = {"hmacSignature": base64.b64encode(hmac.new(key, signing.encode(),
                                                                          hashlib.sha256).digest()).decode()}
    assert post(d.webhook_url, {"live": "false", "notificationItems": [{"NotificationRequestItem": item}]})[0] == 401
    assert post(d.webhook_url, b"not json")[0] == 400
    assert [e[0] for e in events(env)] == ids
    assert c.ok("status", idempotency_key="k-ah")["status"] == "succeeded"
    d.stop()
    check_invariants(env.pg, env.psp, answers={"k-ah": "succeeded"})


@adyen_only
def test_adyen_stored_webhooks_survive_a_restart(env):
    """The AUTHORISATION arrives while the payment is undecided, then the
    daemon dies: at the next start the stored event is loaded and decides."""
    env.psp.faults(settle_ms=300, settle_status="succeeded")
    # pending at first; the AUTHORISATION webhook is stored, the next poll
    # decides, and the daemon dies right there (after_answer)
    d = env.daemon(env={"PAYCOORD_FAILPOINT": "after_answer", "PAYCOORD_FAILPOINT_KEY": "k-as"}, **FAST)
    c = d.client()
    env.open_account(c, "as", balance=1000)
    c.send("pay", account="as", amount=100, currency="EUR", idempotency_key="k-as", metadata={"sim": "pending"})
    assert d.proc.wait(10) == 99
    assert any(e[2] == "AUTHORISATION" and e[4] is True for e in events(env))
    d.start(env={})
    c = d.client()
    wait_for(lambda: c.ok("status", idempotency_key="k-as")["status"] == "succeeded", timeout=15)
    assert "event=stored_events_loaded count=1" in d.log_text()
    d.stop()
    check_invariants(env.pg, env.psp, answers={"k-as": "succeeded"})


def _crash_before_send_then_restart_late(env, key, **settings):
    """A daemon dies right after PREPARE (the create never sent) and comes
    back after the payment's deadline: no adapter may send the create now."""
    d = env.daemon(env={"PAYCOORD_FAILPOINT": "after_prepare", "PAYCOORD_FAILPOINT_KEY": key},
                   payment_deadline_ms=1000, **dict(FAST, **settings))
    c = d.client()
    env.open_account(c, "nr", balance=1000)
    c.send("pay", account="nr", amount=100, currency="EUR", idempotency_key=key)
    assert d.proc.wait(10) == 99
    gid = env.pg.query("SELECT gid FROM payments WHERE idempotency_key = %s", (key,))[0][0]
    time.sleep(1.5)
    d.start(env={})
    return d, d.client(), gid


@stripe_only
def test_stripe_never_reached_past_the_deadline_is_declined_by_a_conclusive_search(env):
    d, c, gid = _crash_before_send_then_restart_late(env, "k-snr", stripe_search_lag_s=1)
    wait_for(lambda: c.ok("status", idempotency_key="k-snr")["status"] == "declined", timeout=15)
    assert c.ok("status", idempotency_key="k-snr")["decline_code"] == "canceled"
    assert env.psp.counters()["requests"]["create"] == 0          # never replayed past the deadline
    assert "event=search_conclusive" in d.log_text()
    d.stop()
    check_invariants(env.pg, env.psp, answers={"k-snr": "declined"})


@adyen_only
def test_adyen_never_reached_past_the_deadline_goes_to_review(env):
    """Past the deadline the technical cancel finds no payment
    (TECHNICAL_CANCEL success=false) and no AUTHORISATION comes: that cannot
    be told from late webhooks, so it goes to manual review; the operator
    settles it by the processor's record (nothing there: roll back)."""
    from harness import resolve_reviews
    d, c, gid = _crash_before_send_then_restart_late(env, "k-anr", adyen_webhook_timeout_s=2)
    wait_for(lambda: [t for t in c.ok("prepared")["transactions"] if t["gid"] == gid and t["state"] == "review"],
             timeout=20, what="manual review")
    assert env.psp.counters()["requests"]["create"] == 0 and env.psp.counters()["cancels_received"] >= 1
    assert any(e[2] == "TECHNICAL_CANCEL" and e[4] is False for e in events(env))
    assert resolve_reviews(c, env.psp) == {gid: (None, "rolled_back")}
    assert c.ok("status", idempotency_key="k-anr")["status"] == "declined"
    d.stop()
    check_invariants(env.pg, env.psp, answers={"k-anr": "declined"})


@webhooks_only
def test_webhook_listener_is_loopback_and_post_only(env):
    d = env.daemon()
    assert d.settings["webhook_listen"].startswith("127.0.0.1:")
    req = urllib.request.Request(d.webhook_url, method="GET")
    try:
        urllib.request.urlopen(req, timeout=5)
        raise AssertionError("GET accepted")
    except urllib.error.HTTPError as e:
        assert e.code == 405
    d.stop()
    check_invariants(env.pg, env.psp)


def test_processor_api_is_reported(env):
    d = env.daemon()
    assert f"event=processor api={PROCESSOR}" in d.log_text()
    d.stop()
    check_invariants(env.pg, env.psp)
