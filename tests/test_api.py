import re

import pytest

import db
import engines
from conftest import AUTH, callback, database_locked

ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def test_get_status_returns_the_documented_shape(client, send, post_callback):
    sid = send().get_json()["messageSid"]
    post_callback(callback(sid, "sent"))
    post_callback(callback(sid, "undelivered", ErrorCode="30003"))
    answer = client.get(f"/get-status/{sid}", headers=AUTH).get_json()
    assert set(answer) == {"sid", "to", "from", "latestStatus", "errorCode",
                           "errorDescription", "createdAt", "updatedAt", "history"}
    assert answer["sid"] == sid and answer["to"] == "+15558675309"
    assert answer["latestStatus"] == "undelivered" and answer["errorCode"] == 30003
    assert answer["errorDescription"].startswith("Unreachable handset")
    assert answer["errorDescription"].endswith("https://www.twilio.com/docs/api/errors/30003")
    assert [e["status"] for e in answer["history"]] == ["queued", "sent", "undelivered"]
    for stamp in [answer["createdAt"], answer["updatedAt"]] + [
            e["timestamp"] for e in answer["history"]]:
        assert ISO_UTC.fullmatch(stamp), stamp
    stamps = [e["timestamp"] for e in answer["history"]]
    assert stamps == sorted(stamps)


def test_get_status_of_unknown_sid_is_404_json(client):
    response = client.get("/get-status/SMnope", headers=AUTH)
    assert response.status_code == 404
    assert "SMnope" in response.get_json()["error"]


def test_get_status_needs_the_api_key(client, send):
    sid = send().get_json()["messageSid"]
    response = client.get(f"/get-status/{sid}")
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"


def test_healthz_needs_no_key_and_reports_the_mode(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok", "mode": "live"}


def test_healthz_is_503_when_the_database_cannot_be_written(app, client, monkeypatch):
    monkeypatch.setattr(engines, "BUSY_TIMEOUT_MS", 50)
    db.close_all()
    with database_locked(app):
        response = client.get("/healthz")
    assert response.status_code == 503
    assert response.get_json()["status"] == "unavailable"
    db.close_all()
    assert client.get("/healthz").status_code == 200


def test_index_describes_the_service(client):
    answer = client.get("/").get_json()
    assert answer["mode"] == "live"
    assert "POST /send-sms" in answer["endpoints"]


@pytest.mark.parametrize("method, path, status, allow", [
    pytest.param("get", "/nowhere", 404, None, id="404"),
    pytest.param("get", "/send-sms", 405, "POST", id="405-send"),
    pytest.param("put", "/get-status/SM1", 405, "GET", id="405-status"),
    pytest.param("get", "/message-status", 405, "POST", id="405-callback"),
])
def test_http_errors_are_json(client, method, path, status, allow):
    response = getattr(client, method)(path)
    assert response.status_code == status
    assert response.is_json and response.get_json()["error"]
    if allow:
        assert allow in response.headers["Allow"]


def test_oversized_callback_is_413_json(client):
    response = client.post("/message-status", data={"Body": "x" * 70000})
    assert response.status_code == 413
    assert response.get_json()["error"]


def test_unexpected_exception_is_a_json_500_without_traceback(app):
    def broken():
        raise RuntimeError("secret internals")

    app.add_url_rule("/broken", view_func=broken)
    response = app.test_client().get("/broken")
    assert response.status_code == 500
    assert response.get_json() == {"error": "Internal server error; it has been logged."}
    assert b"secret internals" not in response.data and b"Traceback" not in response.data
