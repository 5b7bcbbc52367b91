import base64

import pytest
import requests
from twilio.http.response import Response

from sms_status.services import services
from support import (
    ACCOUNT_SID,
    API_KEY,
    AUTH,
    CALLBACK_URL,
    SENDER,
    app_database_url,
    count_rows,
    sql_rows,
    stored_message,
)
from twilio_fakes import twilio_error


@pytest.mark.parametrize("headers", [
    pytest.param({}, id="missing"),
    pytest.param({"Authorization": "Bearer wrong-key-wrong-key"}, id="wrong"),
    pytest.param({"Authorization": f"Basic {API_KEY}"}, id="other-scheme"),
    pytest.param({"Authorization": f"Bearer {API_KEY}x"}, id="longer"),
])
def test_send_needs_the_api_key(send, fake_twilio, headers):
    response = send(headers=headers)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert "Authorization: Bearer" in response.get_json()["error"]
    assert fake_twilio.requests == []


@pytest.mark.parametrize("body, fragment", [
    pytest.param(b"not json", "JSON object", id="not-json"),
    pytest.param(b"", "JSON object", id="empty"),
    pytest.param(b"[1, 2]", "JSON object", id="array"),
    pytest.param(b"[" * 30000 + b"]" * 30000, "JSON object", id="nested-too-deep"),
    pytest.param(b'{"body": "hi"}', "'to'", id="no-to"),
    pytest.param(b'{"to": "555", "body": "hi"}', "'to'", id="bad-to"),
    pytest.param(b'{"to": "+15558675309"}', "'body'", id="no-body"),
    pytest.param(b'{"to": "+15558675309", "body": "   "}', "'body'", id="blank-body"),
    pytest.param(b'{"to": "+15558675309", "body": ["hi"]}', "'body'", id="list-body"),
    pytest.param(('{"to": "+15558675309", "body": "%s"}' % ("x" * 1601)).encode(), "'body'",
                 id="long-body"),
    pytest.param(b'{"to": "+15558675309", "body": "\\ud800"}', "'body'", id="lone-surrogate"),
    pytest.param(b'{"to": "+15558675309", "body": "hi", "mediaUrl": "https://x.io/a.png"}',
                 "Unknown field 'mediaUrl'", id="media-url"),
    pytest.param(b'{"to": "+15558675309", "body": "hi", "sendAt": "2030-01-01T00:00:00Z"}',
                 "Unknown field 'sendAt'", id="send-at"),
    pytest.param(b'{"to": "+15558675309", "bdoy": "hi", "body": "hi"}',
                 "Unknown field 'bdoy'", id="typo"),
])
def test_invalid_sends_get_400_naming_the_field_and_reach_no_twilio(client, fake_twilio, body,
                                                                    fragment):
    response = client.post("/send-sms", data=body, headers=AUTH,
                           content_type="application/json")
    assert response.status_code == 400
    answer = response.get_json()
    assert answer["success"] is False and fragment in answer["error"]
    assert fake_twilio.requests == []


def test_body_over_64_kib_gets_413(client, fake_twilio):
    response = client.post("/send-sms", data=b"{" + b" " * 70000 + b"}", headers=AUTH,
                           content_type="application/json")
    assert response.status_code == 413
    answer = response.get_json()
    assert "64 KiB" in answer["error"]
    assert answer["success"] is False and answer["details"] is None and answer["code"] is None
    assert fake_twilio.requests == []


def test_send_creates_the_message_with_a_status_callback_and_stores_it(app, send, fake_twilio):
    response = send(to="+15558675309", body="Your code is 123456")
    assert response.status_code == 200
    answer = response.get_json()
    assert answer["success"] is True and answer["status"] == "queued"
    assert answer["messageSid"].startswith("SM") and len(answer["messageSid"]) == 34

    [create] = fake_twilio.creates
    assert create["uri"].endswith(f"/Accounts/{ACCOUNT_SID}/Messages.json")
    assert create["data"]["To"] == "+15558675309"
    assert create["data"]["From"] == SENDER
    assert create["data"]["Body"] == "Your code is 123456"
    assert create["data"]["StatusCallback"] == CALLBACK_URL

    row = stored_message(app, answer["messageSid"])
    assert row["to_number"] == "+15558675309"
    assert row["from_number"] == SENDER
    assert row["account_sid"] == ACCOUNT_SID
    assert row["initial_status"] == "queued" and row["latest_status"] == "queued"
    assert row["body"] is None, "bodies are not kept unless STORE_MESSAGE_BODY=true"


def test_body_is_kept_only_when_configured(make_app, fake_twilio):
    app = make_app(STORE_MESSAGE_BODY="true")
    response = app.test_client().post("/send-sms", json={"to": "+15558675309", "body": "Hi"},
                                      headers=AUTH)
    assert stored_message(app, response.get_json()["messageSid"])["body"] == "Hi"


def test_send_through_a_messaging_service(make_app, fake_twilio):
    service_sid = "MG" + "b2" * 16
    app = make_app(TWILIO_PHONE_NUMBER=None, TWILIO_MESSAGING_SERVICE_SID=service_sid)
    response = app.test_client().post("/send-sms", json={"to": "+15558675309", "body": "Hi"},
                                      headers=AUTH)
    assert response.get_json()["status"] == "accepted"
    [create] = fake_twilio.creates
    assert create["data"]["MessagingServiceSid"] == service_sid
    assert "From" not in create["data"]
    history = app.test_client().get(f"/get-status/{response.get_json()['messageSid']}",
                                    headers=AUTH).get_json()["history"]
    assert [entry["status"] for entry in history] == ["accepted"]


def test_a_messaging_service_send_stores_the_number_a_callback_names(make_app, fake_twilio):
    from support import callback, sign
    service_sid = "MG" + "b2" * 16
    app = make_app(TWILIO_PHONE_NUMBER=None, TWILIO_MESSAGING_SERVICE_SID=service_sid)
    client = app.test_client()

    def post_callback(sid, status, from_):
        params = callback(sid, status, From=from_)
        return client.post("/message-status", data=params,
                           headers={"X-Twilio-Signature": sign(CALLBACK_URL, params)})

    sid = client.post("/send-sms", json={"to": "+15558675309", "body": "Hi"},
                      headers=AUTH).get_json()["messageSid"]
    assert stored_message(app, sid)["from_number"] == service_sid, "all it knows at first"
    assert post_callback(sid, "sent", "+15017122661").status_code == 200
    assert client.get(f"/get-status/{sid}", headers=AUTH).get_json()["from"] == "+15017122661"

    # A callback may come before the send is stored: the MG SID never replaces the number.
    early = "SM" + "e5" * 16
    assert post_callback(early, "sent", "+15017122662").status_code == 200
    fake_twilio.answer_next(Response(201, (
        '{"sid": "%s", "status": "accepted", "to": "+15558675309", "from": null,'
        ' "messaging_service_sid": "%s", "account_sid": "%s",'
        ' "date_created": "Thu, 26 Nov 2026 20:00:00 +0000"}') % (early, service_sid,
                                                                  ACCOUNT_SID)))
    assert client.post("/send-sms", json={"to": "+15558675309", "body": "Hi"},
                       headers=AUTH).status_code == 200
    assert stored_message(app, early)["from_number"] == "+15017122662"
    assert stored_message(app, early)["initial_status"] == "accepted"


def test_default_transport_has_a_timeout(tmp_path):
    from sms_status import create_app
    from support import live_env
    app = create_app(live_env(tmp_path, TWILIO_TIMEOUT="3"))
    assert services(app).twilio.http_client.timeout == 3.0
    services(app).storage.close()


@pytest.mark.parametrize("answer, status, code, retry_after", [
    pytest.param(twilio_error(400, 21211, "The 'To' number is not valid"), 400, 21211, None,
                 id="invalid-to"),
    pytest.param(twilio_error(400, 21610, "Unsubscribed recipient"), 400, 21610, None,
                 id="unsubscribed"),
    pytest.param(twilio_error(400, 21608, "Unverified number on trial"), 400, 21608, None,
                 id="trial-unverified"),
    pytest.param(twilio_error(401, 20003, "Authenticate"), 502, 20003, None, id="credentials"),
    pytest.param(twilio_error(403, 20403, "Forbidden"), 502, 20403, None, id="forbidden"),
    pytest.param(twilio_error(404, 20404, "Not found"), 502, 20404, None, id="wrong-account"),
    pytest.param(twilio_error(429, 20429, "Too many requests"), 503, 20429, "5", id="rate-limit"),
    pytest.param(twilio_error(500, 20500, "Internal error"), 502, 20500, None, id="server-error"),
    pytest.param(twilio_error(503, 20503, "Unavailable"), 502, 20503, None, id="unavailable"),
    pytest.param(Response(502, "<html>Bad gateway</html>"), 502, None, None, id="html-error"),
    pytest.param(Response(201, "{not json"), 502, None, None, id="malformed-json"),
    pytest.param(Response(201, "[]"), 502, None, None, id="not-a-resource"),
    pytest.param(Response(201, "{}"), 502, None, None, id="no-sid"),
    pytest.param(requests.ReadTimeout("slow"), 504, None, None, id="timeout"),
    pytest.param(requests.ConnectTimeout("slow"), 504, None, None, id="connect-timeout"),
    pytest.param(requests.ConnectionError("refused"), 502, None, None, id="connection-failed"),
])
def test_twilio_failures_are_reported_with_whose_fault_it_is(app, send, fake_twilio, answer,
                                                              status, code, retry_after):
    fake_twilio.answer_next(answer)
    response = send()
    assert response.status_code == status
    body = response.get_json()
    assert body["success"] is False and body["error"] and body["details"]
    assert body["code"] == code
    assert response.headers.get("Retry-After") == retry_after
    assert len(fake_twilio.creates) == 1, "a failed create is never retried"
    assert count_rows(app, "messages") == 0


def test_twilio_service_exception_is_handled(send, fake_twilio):
    problem = ('{"type": "https://www.twilio.com/docs/errors/20429", "title": "Too many",'
               ' "status": 429, "code": 20429, "detail": "Slow down"}')
    fake_twilio.answer_next(Response(429, problem))
    response = send()
    assert response.status_code == 503
    assert response.get_json()["code"] == 20429
    assert response.get_json()["details"] == "Slow down"


def test_send_logs_masked_numbers_and_never_the_body_or_secrets(make_app, caplog):
    app = make_app()
    caplog.set_level("DEBUG")
    app.test_client().post("/send-sms", json={"to": "+15558675309", "body": "code 918273"},
                           headers=AUTH)
    out = caplog.text
    assert "+*******5309" in out
    assert "+15558675309" not in out
    assert "918273" not in out
    assert API_KEY not in out and "test-auth-token" not in out


def test_send_is_stored_even_if_a_callback_already_moved_it_forward(app, send, fake_twilio,
                                                                     post_callback):
    """Twilio may call back before the create call returns."""
    from support import callback
    sid = "SM" + "c3" * 16
    assert post_callback(callback(sid, "sent")).status_code == 200
    fake_twilio.answer_next(Response(201, (
        '{"sid": "%s", "status": "queued", "to": "+15558675309", "from": "%s",'
        ' "account_sid": "%s", "date_created": "Thu, 26 Nov 2026 20:00:00 +0000"}'
    ) % (sid, SENDER, ACCOUNT_SID)))
    assert send().status_code == 200
    row = stored_message(app, sid)
    assert row["latest_status"] == "sent"
    assert row["initial_status"] == "queued"


def test_message_sent_but_not_stored_says_so_and_must_not_be_resent(app, send, caplog):
    # the store fails after Twilio accepted
    sql_rows(app_database_url(app), "ALTER TABLE status_events RENAME TO away")
    response = send()
    assert response.status_code == 200
    answer = response.get_json()
    assert answer["success"] is True and answer["messageSid"].startswith("SM")
    assert "do not send it again" in answer["warning"]
    assert f"Message {answer['messageSid']} was sent but could not be stored" in caplog.text


def test_twilio_errors_are_logged_with_code_and_status(send, fake_twilio, caplog):
    fake_twilio.answer_next(twilio_error(401, 20003, "Authenticate"))
    send(to="+15558675309")
    assert "status=401 code=20003 answered=502" in caplog.text
    assert "credentials" in caplog.text
    assert "message create to +*******5309 failed" in caplog.text
    assert "+15558675309" not in caplog.text


def test_nul_characters_are_refused_wherever_they_come(app, send, fake_twilio):
    client = app.test_client()
    answer = send(body="code \x00 1234")
    assert answer.status_code == 400 and "'body'" in answer.get_json()["error"]
    assert client.get("/get-status/SM%00", headers=AUTH).status_code == 400
    assert client.get("/messages?to=%2B1555%00", headers=AUTH).status_code == 400
    cursor = base64.urlsafe_b64encode(b'["2026-11-26T19:00:00.000Z","SM\\u0000"]').decode()
    answer = client.get(f"/messages?cursor={cursor}", headers=AUTH)
    assert answer.status_code == 400 and "'cursor'" in answer.get_json()["error"]
    assert fake_twilio.creates == []
