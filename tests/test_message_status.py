import base64
import hashlib
import hmac
import threading
import time

import pytest
from werkzeug.datastructures import MultiDict

from sms_status.rules import STATUS_RANK
from sms_status.services import get_db
from sms_status.storage import statuses, times
from support import (
    AUTH,
    AUTH_TOKEN,
    BASE_URL,
    CALLBACK_URL,
    callback,
    count_rows,
    database_locked,
    sign,
)

SID = "SM" + "d4" * 16


def history(client, sid=SID):
    answer = client.get(f"/get-status/{sid}", headers=AUTH)
    assert answer.status_code == 200, answer.get_json()
    return answer.get_json()


def twilio_documented_signature(url, params, token):
    """Twilio's documented algorithm, written out: HMAC-SHA1 over the URL followed by each
    parameter name and value, sorted by name, base64-encoded."""
    text = url + "".join(name + value for name, value in sorted(params.items()))
    digest = hmac.new(token.encode(), text.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def test_fixed_signature_matches_twilio_documented_algorithm():
    params = {"MessageSid": "SM123", "MessageStatus": "sent", "To": "+15558675309"}
    expected = "s+/n+v+G71rejTwyTHeaRVoF1ns="  # openssl dgst -sha1 -hmac 12345 -binary | base64
    assert twilio_documented_signature("https://sms.example.com/message-status", params,
                                       "12345") == expected
    assert sign("https://sms.example.com/message-status", params, "12345") == expected


QUERY = "tenant=7&b=2"


@pytest.mark.parametrize("path, params, signature, status", [
    pytest.param("/message-status", callback(SID, "sent"),
                 sign(CALLBACK_URL, callback(SID, "sent")), 200, id="valid"),
    pytest.param("/message-status", callback(SID, "sent"),
                 twilio_documented_signature(CALLBACK_URL, callback(SID, "sent"), AUTH_TOKEN),
                 200, id="valid-by-documented-algorithm"),
    pytest.param("/message-status", callback(SID, "sent"), None, 403, id="missing"),
    pytest.param("/message-status", callback(SID, "sent"), "", 403, id="empty"),
    pytest.param("/message-status", callback(SID, "sent"),
                 sign(CALLBACK_URL, callback(SID, "sent"), "another-token"), 403,
                 id="wrong-token"),
    pytest.param("/message-status", callback(SID, "sent"),
                 sign("https://evil.example.com/message-status", callback(SID, "sent")), 403,
                 id="other-url"),
    pytest.param("/message-status", callback(SID, "sent"),
                 sign(CALLBACK_URL, callback(SID, "delivered")), 403, id="tampered-status"),
    pytest.param(f"/message-status?{QUERY}", callback(SID, "sent"),
                 sign(f"{CALLBACK_URL}?{QUERY}", callback(SID, "sent")), 200,
                 id="query-string"),
    pytest.param(f"/message-status?{QUERY}", callback(SID, "sent"),
                 sign(CALLBACK_URL, callback(SID, "sent")), 403, id="query-string-not-signed"),
    pytest.param("/message-status", callback(SID, "sent", NewField="added by Twilio"),
                 sign(CALLBACK_URL, callback(SID, "sent", NewField="added by Twilio")), 200,
                 id="unknown-extra-field"),
    pytest.param("/message-status", callback(SID, "sent", NewField="x"),
                 sign(CALLBACK_URL, callback(SID, "sent")), 403, id="unsigned-extra-field"),
])
def test_signature_checks(client, app, path, params, signature, status):
    headers = {} if signature is None else {"X-Twilio-Signature": signature}
    response = client.post(path, data=params, headers=headers)
    assert response.status_code == status
    assert count_rows(app, "status_events") == (1 if status == 200 else 0)
    if status == 403:
        assert response.get_json() == {"error": "Invalid Twilio signature"}


def test_repeated_parameters_are_all_signed(client, app):
    params = MultiDict(list(callback(SID, "sent").items()) + [("Tag", "a"), ("Tag", "b")])
    signature = sign(CALLBACK_URL, params)
    assert client.post("/message-status", data=params,
                       headers={"X-Twilio-Signature": signature}).status_code == 200
    only_one = MultiDict(list(callback(SID, "sent").items()) + [("Tag", "a")])
    assert client.post("/message-status", data=only_one,
                       headers={"X-Twilio-Signature": signature}).status_code == 403


def test_base_url_with_trailing_slash_is_tolerated(make_app):
    app = make_app(BASE_URL=BASE_URL + "/")
    params = callback(SID, "sent")
    response = app.test_client().post("/message-status", data=params,
                                      headers={"X-Twilio-Signature": sign(CALLBACK_URL, params)})
    assert response.status_code == 200


def test_rejected_signature_is_logged_with_the_checked_url(client, caplog):
    client.post("/message-status?x=1", data=callback(SID, "sent"),
                headers={"X-Twilio-Signature": "bogus"})
    assert f"invalid Twilio signature for {CALLBACK_URL}?x=1" in caplog.text


def test_a_callback_with_thousands_of_fields_is_refused_before_its_signature(client, app):
    params = {f"f{n}": "x" for n in range(8300)}
    response = client.post("/message-status", data=params,
                           headers={"X-Twilio-Signature": "bogus"})
    # 400, not the signature's 403: the fields were counted, never parsed or signed.
    assert response.status_code == 400
    assert "at most 100 form fields" in response.get_json()["error"]
    assert count_rows(app, "status_events") == 0


NUL_CALLBACK = callback(SID, "sent\x00")
TOO_MANY_FIELDS = {f"f{n}": "x" for n in range(101)}


@pytest.mark.parametrize("method, path, params, signature, status, error", [
    pytest.param("POST", "/message-status", NUL_CALLBACK, "bogus", 403, "Invalid Twilio",
                 id="unsigned-with-nul-signature-first"),
    pytest.param("POST", "/message-status", NUL_CALLBACK, sign(CALLBACK_URL, NUL_CALLBACK), 400,
                 "NUL character", id="signed-with-nul"),
    pytest.param("POST", "/message-status?x=%00", callback(SID, "sent"), "bogus", 403,
                 "Invalid Twilio", id="unsigned-with-nul-in-query"),
    pytest.param("POST", "/message-status", TOO_MANY_FIELDS, "bogus", 400, "at most 100",
                 id="too-many-fields-unsigned"),
    pytest.param("POST", "/message-status", TOO_MANY_FIELDS, sign(CALLBACK_URL, TOO_MANY_FIELDS),
                 400, "at most 100", id="too-many-fields-signed"),
    pytest.param("GET", "/message-status?x=%00", {}, "bogus", 400, "NUL character",
                 id="wrong-method-with-nul"),
    pytest.param("OPTIONS", "/message-status?x=%00", {}, "bogus", 200, None, id="options"),
])
def test_callback_guards_run_in_order(client, app, caplog, method, path, params, signature,
                                      status, error):
    """Fields are counted before the signature is computed, and NUL characters are looked
    for only once it holds: an unsigned request gets 403 whatever else is wrong with it."""
    response = client.open(path, method=method, data=params,
                           headers={"X-Twilio-Signature": signature})
    assert response.status_code == status
    if error:
        assert error in response.get_json()["error"]
    if "at most 100" in (error or ""):
        assert "Rejected status callback" not in caplog.text  # never signed
    assert count_rows(app, "status_events") == 0


def test_a_signed_callback_with_a_hundred_fields_is_stored(post_callback, app):
    params = callback(SID, "sent") | {f"Extra{n}": "x" for n in range(100 - 8)}
    assert post_callback(params).status_code == 200
    assert count_rows(app, "status_events") == 1


@pytest.mark.parametrize("missing", [("MessageSid", "SmsSid"), ("MessageStatus", "SmsStatus")])
def test_signed_callback_without_sid_or_status_is_400_and_logged(post_callback, app, missing,
                                                                 caplog):
    params = callback(SID, "sent")
    for name in missing:
        del params[name]
    response = post_callback(params)
    assert response.status_code == 400
    assert "MessageSid and MessageStatus" in response.get_json()["error"]
    assert count_rows(app, "status_events") == 0
    assert "Refused POST /message-status with 400: A status callback needs" in caplog.text


def test_legacy_callback_with_only_smssid_and_smsstatus_is_stored(post_callback, client):
    params = {"SmsSid": SID, "SmsStatus": "delivered", "AccountSid": "AC" + "a1" * 16}
    response = post_callback(params)
    assert response.status_code == 200, response.get_json()
    assert history(client)["latestStatus"] == "delivered"


def test_rejections_cannot_flood_the_log(app, client, caplog):
    now = [1_800_000_000.0]
    app.config["CLOCK"] = lambda: now[0]
    headers = {"X-Twilio-Signature": "bogus",
               "X-Twilio-Webhooks-Signature-Settings": "key=" + "k" * 8000}
    for _ in range(200):
        assert client.post("/message-status?" + "q" * 4000, data=callback(SID, "sent"),
                           headers=headers).status_code == 403
    lines = [r.getMessage() for r in caplog.records if r.name == "sms_status"]
    assert 0 < len(lines) <= 30
    assert max(len(line) for line in lines) < 600
    assert "more characters" in lines[0]
    now[0] += 61
    client.post("/message-status", data=callback(SID, "sent"), headers=headers)
    assert "170 more refused requests were not logged" in caplog.records[-1].getMessage()


@pytest.mark.parametrize("character", ["\n", "\r", "\x85", "\u2028", "\u2029", "\x1b"])
def test_line_breaks_in_logged_values_are_escaped(make_app, caplog, character):
    app = make_app(TWILIO_WEBHOOK_SIGNING_KEY="a-shared-key-secret")
    forged = f"x{character}2026-01-01 00:00:00.000 INFO Sent SM1 to +*******0000: queued"
    raw = lambda text: text.encode().decode("latin-1")  # noqa: E731 (raw bytes, as WSGI has them)
    app.test_client().post("/message-status", data=callback(SID, "sent"), environ_overrides={
        "QUERY_STRING": raw(f"a={forged}"), "HTTP_X_TWILIO_SIGNATURE": "bogus",
        "HTTP_X_TWILIO_WEBHOOKS_SIGNATURE_SETTINGS": raw(f"key=k{forged}")})
    [line] = [r.getMessage() for r in caplog.records if "Rejected" in r.getMessage()]
    assert character not in line
    assert line.count("Sent SM1") == 2 and len(line.splitlines()) == 1


def test_callbacks_build_the_history_and_latest_status(post_callback, client):
    for status in ("sent", "delivered"):
        assert post_callback(callback(SID, status)).status_code == 200
    answer = history(client)
    assert answer["latestStatus"] == "delivered"
    assert [e["status"] for e in answer["history"]] == ["sent", "delivered"]
    assert answer["errorCode"] is None


def test_repeated_callback_is_a_no_op_answered_200(post_callback, client, app):
    first = post_callback(callback(SID, "sent"))
    again = post_callback(callback(SID, "sent"))
    assert first.status_code == again.status_code == 200
    assert again.get_json()["duplicate"] is True
    assert count_rows(app, "status_events") == 1
    assert [e["status"] for e in history(client)["history"]] == ["sent"]


def test_late_status_is_kept_in_history_but_never_moves_latest_back(post_callback, client):
    post_callback(callback(SID, "delivered"))
    post_callback(callback(SID, "sent"))
    post_callback(callback(SID, "queued"))
    answer = history(client)
    assert answer["latestStatus"] == "delivered"
    assert sorted(e["status"] for e in answer["history"]) == ["delivered", "queued", "sent"]


def test_error_code_is_kept_with_the_status_that_carried_it(post_callback, client):
    post_callback(callback(SID, "sent"))
    post_callback(callback(SID, "undelivered", ErrorCode="30003"))
    answer = history(client)
    assert answer["latestStatus"] == "undelivered"
    assert answer["errorCode"] == 30003
    assert {e["status"]: e["errorCode"] for e in answer["history"]} == {
        "sent": None, "undelivered": 30003}


def test_callback_for_an_unknown_message_creates_it(post_callback, client):
    post_callback(callback(SID, "delivered", To="+447700900123", From="+15550001111"))
    answer = history(client)
    assert answer["to"] == "+447700900123" and answer["from"] == "+15550001111"
    assert answer["latestStatus"] == "delivered"


def test_callback_before_send_then_send_keeps_latest(app, post_callback, send, fake_twilio,
                                                     client):
    """The delivered callback arrives while the send waits for Twilio's answer."""
    from twilio.http.response import Response
    started = time.time() - 0.5
    app.config["CLOCK"] = lambda: started  # the send began half a second ago
    post_callback(callback(SID, "delivered"))
    fake_twilio.answer_next(Response(201, '{"sid": "%s", "status": "queued",'
                                          ' "date_created": "Thu, 26 Nov 2026 20:00:00 +0000"}'
                                     % SID))
    assert send().status_code == 200
    answer = history(client)
    assert answer["latestStatus"] == "delivered"
    assert [e["status"] for e in answer["history"]] == ["queued", "delivered"]
    assert answer["history"][0]["timestamp"] == answer["createdAt"] == times.stored_time(started)
    assert answer["updatedAt"] == answer["history"][1]["timestamp"], "never moved back"


@pytest.mark.parametrize("late", ["sent", "read"])
def test_a_change_timed_before_the_stored_one_never_moves_updated_at_back(app, client, late):
    """Two callbacks timed in one order and stored in the other (two workers): whether the
    late one moves the latest status or not, updated_at stays at the later time."""
    with app.app_context():
        statuses.record_status(get_db(), SID, "delivered", at="2026-11-26T20:00:05.000Z")
        statuses.record_status(get_db(), SID, late, at="2026-11-26T20:00:01.000Z")
    answer = history(client)
    assert answer["latestStatus"] == max("delivered", late, key=STATUS_RANK.get)
    assert answer["updatedAt"] == "2026-11-26T20:00:05.000Z"


def test_concurrent_callbacks_lose_nothing(app):
    """Threads each with their own kept connection write at once; every update lands."""
    statuses = ["queued", "sending", "sent", "delivered"]
    sids = [f"SM{n:032x}" for n in range(25)]
    failures = []

    def post_all(sid):
        client = app.test_client()
        for status in statuses:
            params = callback(sid, status)
            response = client.post("/message-status", data=params,
                                   headers={"X-Twilio-Signature": sign(CALLBACK_URL, params)})
            if response.status_code != 200:
                failures.append(response.status_code)

    threads = [threading.Thread(target=post_all, args=(sid,)) for sid in sids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert count_rows(app, "status_events") == len(sids) * len(statuses)
    client = app.test_client()
    assert {history(client, sid)["latestStatus"] for sid in sids} == {"delivered"}


def test_storage_failure_answers_503_never_200(make_app):
    app = make_app(storage_settings={"busy_timeout": 0.1})
    client = app.test_client()

    def post_callback(params):
        return client.post("/message-status", data=params,
                           headers={"X-Twilio-Signature": sign(CALLBACK_URL, params)})

    with database_locked(app):  # another writer holds the database past the busy timeout
        response = post_callback(callback(SID, "sent"))
    assert response.status_code == 503
    assert "nothing was stored" in response.get_json()["error"]
    assert response.headers["Retry-After"]
    assert post_callback(callback(SID, "sent")).status_code == 200


SIGNING_KEY = "shared-key-secret-7d1e"
SETTINGS = "key=webhooks_sharedkey_1a2b,algorithm=HMAC_SHA256"


def shared_key_signature(params, secret=SIGNING_KEY, algorithm="HMAC_SHA256"):
    from twilio.request_validator import RequestValidator
    return RequestValidator(secret).compute_signature(CALLBACK_URL, params, algorithm=algorithm)


@pytest.mark.parametrize("configured, settings, signature, status", [
    pytest.param(True, SETTINGS, shared_key_signature(callback(SID, "sent")), 200,
                 id="valid-sha256"),
    pytest.param(True, "key=k1,algorithm=HMAC_SHA1",
                 shared_key_signature(callback(SID, "sent"), algorithm="HMAC_SHA1"), 200,
                 id="valid-sha1-shared-key"),
    pytest.param(True, SETTINGS, sign(CALLBACK_URL, callback(SID, "sent")), 403,
                 id="auth-token-signature-under-shared-key-header"),
    pytest.param(True, SETTINGS, shared_key_signature(callback(SID, "sent"), "wrong-secret"),
                 403, id="wrong-secret"),
    pytest.param(True, "key=k1,algorithm=HMAC_SHA512", shared_key_signature(
        callback(SID, "sent")), 403, id="unsupported-algorithm"),
    pytest.param(False, SETTINGS, shared_key_signature(callback(SID, "sent")), 403,
                 id="no-key-configured"),
    pytest.param(True, None, sign(CALLBACK_URL, callback(SID, "sent")), 200,
                 id="auth-token-still-works"),
])
def test_shared_key_signatures(make_app, configured, settings, signature, status):
    app = make_app(TWILIO_WEBHOOK_SIGNING_KEY=SIGNING_KEY if configured else None)
    headers = {"X-Twilio-Signature": signature}
    if settings:
        headers["X-Twilio-Webhooks-Signature-Settings"] = settings
    response = app.test_client().post("/message-status", data=callback(SID, "sent"),
                                      headers=headers)
    assert response.status_code == status
    assert count_rows(app, "status_events") == (1 if status == 200 else 0)


def test_shared_key_without_configuration_logs_what_to_set(client, caplog):
    client.post("/message-status", data=callback(SID, "sent"), headers={
        "X-Twilio-Signature": shared_key_signature(callback(SID, "sent")),
        "X-Twilio-Webhooks-Signature-Settings": SETTINGS})
    assert "shared key webhooks_sharedkey_1a2b" in caplog.text
    assert "set TWILIO_WEBHOOK_SIGNING_KEY" in caplog.text
    assert SIGNING_KEY not in caplog.text


@pytest.mark.parametrize("raw", ["²", "9" * 25, "30003x", "-1", ""])
def test_odd_error_codes_are_stored_as_null(post_callback, client, raw):
    assert post_callback(callback(SID, "failed", ErrorCode=raw)).status_code == 200
    assert history(client)["errorCode"] is None


def test_callbacks_are_logged_with_sid_status_and_error_code(post_callback, caplog):
    post_callback(callback(SID, "undelivered", ErrorCode="30003", To="+15558675309"))
    assert f"Status callback {SID} undelivered error=30003" in caplog.text
    assert "+15558675309" not in caplog.text


@pytest.mark.parametrize("field", ["MessageSid", "MessageStatus", "To", "From", "ErrorCode"])
def test_a_nul_character_in_a_callback_is_refused_on_both_engines(app, post_callback, field):
    """PostgreSQL's text cannot hold U+0000: refused with 400 everywhere, never a 503 that
    Twilio would retry forever."""
    params = callback(SID, "sent")
    params[field] = params.get(field, "30003") + "\x00"
    answer = post_callback(params)
    assert answer.status_code == 400 and "NUL" in answer.get_json()["error"]
    assert count_rows(app, "status_events") == 0
