import re
import threading
import time

import pytest

from sms_status.web import health
from support import AUTH, app_database_url, callback, database_locked, sql_rows, wait_until

ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def test_get_status_returns_the_documented_shape(client, send, post_callback):
    sid = send().get_json()["messageSid"]
    post_callback(callback(sid, "sent"))
    post_callback(callback(sid, "undelivered", ErrorCode="30003"))
    answer = client.get(f"/get-status/{sid}", headers=AUTH).get_json()
    assert set(answer) == {"sid", "to", "from", "latestStatus", "errorCode",
                           "errorDescription", "reference", "sentBy", "createdAt",
                           "updatedAt", "history"}
    assert answer["sid"] == sid and answer["to"] == "+15558675309"
    assert answer["sentBy"] == "API_KEY"
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


def test_healthz_is_503_when_the_database_cannot_be_written(make_app):
    app = make_app(storage_settings={"busy_timeout": 0.05})
    client = app.test_client()
    with database_locked(app):
        started = time.monotonic()
        response = client.get("/healthz")
        assert time.monotonic() - started < 1.5, "the first check is waited for, briefly"
    assert response.status_code == 503
    assert response.get_json()["status"] == "unavailable"
    # The kind of failure only: the database's own words stay in the log.
    assert response.get_json()["error"] in (
        f"The database cannot store status updates: {reason}"
        for reason in (health.DID_NOT_ANSWER, health.WRITE_FAILED))
    # The monitor checks again about every second: the recovery shows.
    wait_until(lambda: client.get("/healthz").status_code == 200, 10, "/healthz 200 again")


def count_health_writes(app):
    """Makes the database count the health checks' writes, by a trigger of the test's own."""
    url = app_database_url(app)
    sql_rows(url, "CREATE TABLE health_writes (n INTEGER)")
    if url.startswith("sqlite:///"):
        for event in ("INSERT", "UPDATE"):
            sql_rows(url, f"CREATE TRIGGER count_health_{event} AFTER {event} ON health_checks"
                          " BEGIN INSERT INTO health_writes VALUES (1); END")
    else:
        sql_rows(url, "CREATE FUNCTION count_health_write() RETURNS trigger LANGUAGE plpgsql"
                      " AS $$BEGIN INSERT INTO health_writes VALUES (1); RETURN NEW; END$$")
        sql_rows(url, "CREATE TRIGGER count_health AFTER INSERT OR UPDATE ON health_checks"
                      " FOR EACH ROW EXECUTE FUNCTION count_health_write()")
    return lambda: sql_rows(url, "SELECT count(*) FROM health_writes")[0][0]


def test_a_flood_of_healthz_writes_to_the_database_about_once_a_second(app):
    writes = count_health_writes(app)
    answers = []

    def poll():
        client = app.test_client()
        for _ in range(25):
            answers.append(client.get("/healthz").status_code)

    started = time.monotonic()
    threads = [threading.Thread(target=poll) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    seconds = time.monotonic() - started
    assert answers == [200] * 200
    assert 1 <= writes() <= 2 + seconds / 1.0, (writes(), seconds)


def test_healthz_sees_a_failure_within_about_two_seconds(make_app):
    """A probe every second, which counts as failed once it has not come back within
    0.8 s: a failure shows within 1.8 s."""
    app = make_app(storage_settings={"busy_timeout": 0.05})
    client = app.test_client()
    assert client.get("/healthz").status_code == 200
    with database_locked(app):
        started = time.monotonic()
        while client.get("/healthz").status_code == 200:
            assert time.monotonic() - started < 2.5, "a failure went unseen for too long"
            time.sleep(0.05)


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
    assert response.get_json() == {"error": "The request body is larger than 64 KiB."}


def test_unexpected_exception_is_a_json_500_without_traceback(app):
    def broken():
        raise RuntimeError("secret internals")

    app.add_url_rule("/broken", view_func=broken)
    response = app.test_client().get("/broken")
    assert response.status_code == 500
    assert response.get_json() == {"error": "Internal server error; it has been logged."}
    assert b"secret internals" not in response.data and b"Traceback" not in response.data
