"""Status webhooks, through the app (Flask's test client, the real delivery code, a real
local receiver): which changes make events, what they say, their signatures, the API that
shows and retries them, and their configuration. The same under real gunicorn processes:
test_webhook_delivery.py."""

import base64
import hashlib
import hmac
import json
import time

import pytest
from standardwebhooks import Webhook
from twilio.http.response import Response

from sms_status.config import read_config
from sms_status.services import get_db, services
from sms_status.storage import outbox, statuses, times
from support import (
    AUTH,
    CALLBACK_URL,
    OTHER_WEBHOOK_SECRET,
    WEBHOOK_SECRET,
    app_database_url,
    callback,
    deliver_all,
    free_port,
    live_env,
    recorded_events,
    sign,
    sql_rows,
    wait_until,
)


def post(client, sid, status, **extra):
    params = callback(sid, status, **extra)
    answer = client.post("/message-status", data=params,
                         headers={"X-Twilio-Signature": sign(CALLBACK_URL, params)})
    assert answer.status_code == 200, answer.get_json()
    return answer.get_json()


# --- which changes make events ------------------------------------------------------------

def test_an_event_for_each_move_of_the_latest_status_and_none_for_repeats_or_late_ones(
        webhook_app, webhook_client):
    sid = "SM" + "e1" * 16
    post(webhook_client, sid, "sent")  # the first status stored: a change from nothing
    post(webhook_client, sid, "queued")  # late: latestStatus stays sent
    post(webhook_client, sid, "sent")  # a repeat
    post(webhook_client, sid, "undelivered", ErrorCode="30003")
    post(webhook_client, sid, "undelivered", ErrorCode="30003")  # a repeat
    post(webhook_client, sid, "sending")  # late
    assert [(kind, data["previousStatus"], data["errorCode"])
            for kind, data in recorded_events(webhook_app)] == [
        ("message.sent", None, None), ("message.undelivered", "sent", 30003)]


def test_a_send_and_its_callbacks_make_one_event_each_with_the_reference(
        webhook_app, webhook_client):
    answer = webhook_client.post("/send-sms", json={"to": "+15558675309", "body": "code 123456",
                                                    "reference": "order-42 ü"}, headers=AUTH)
    sid = answer.get_json()["messageSid"]
    assert answer.get_json()["reference"] == "order-42 ü"
    post(webhook_client, sid, "sent")
    post(webhook_client, sid, "delivered")
    events = recorded_events(webhook_app)
    assert [kind for kind, _ in events] == ["message.queued", "message.sent", "message.delivered"]
    assert [data["previousStatus"] for _, data in events] == [None, "queued", "sent"]
    assert {data["reference"] for _, data in events} == {"order-42 ü"}
    assert {data["to"] for _, data in events} == {"+15558675309"}


def test_a_callback_before_the_send_stored_its_message_makes_no_second_event(
        webhook_app, webhook_client, fake_twilio):
    """Twilio's `sent` may be stored before /send-sms stores `queued`: the late `queued`
    makes no event (it would tell the receiver the message went back), but the send still
    completes the message with the reference, which the next event carries."""
    sid = "SM" + "e2" * 16
    post(webhook_client, sid, "sent")
    fake_twilio.answer_next(Response(201, json.dumps({
        "sid": sid, "status": "queued", "date_created": "Thu, 26 Nov 2026 20:00:00 +0000"})))
    answer = webhook_client.post("/send-sms", json={"to": "+15558675309", "body": "hi",
                                                    "reference": "order-9"}, headers=AUTH)
    assert answer.get_json()["messageSid"] == sid
    post(webhook_client, sid, "delivered")
    assert [(kind, data["previousStatus"], data["reference"])
            for kind, data in recorded_events(webhook_app)] == [
        ("message.sent", None, None), ("message.delivered", "sent", "order-9")]


def test_reconcile_records_events_like_callbacks(webhook_app, webhook_client):
    sid = webhook_client.post("/send-sms", json={"to": "+15558675309", "body": "hi"},
                              headers=AUTH).get_json()["messageSid"]
    fake = services(webhook_app).twilio.http_client
    fake.answer_next(Response(200, json.dumps({
        "sid": sid, "status": "delivered", "error_code": None,
        "date_created": "Thu, 26 Nov 2026 20:00:00 +0000"})))
    result = webhook_app.test_cli_runner().invoke(args=["reconcile", "--older-than", "0s"])
    assert result.exit_code == 0, result.output
    assert [(kind, data["previousStatus"]) for kind, data in recorded_events(webhook_app)] == [
        ("message.queued", None), ("message.delivered", "queued")]


def refuse_new_events(url, refused=True):
    """Makes the database itself refuse (or accept again) every new webhook event."""
    sqlite = url.startswith("sqlite:///")
    if refused:
        sql_rows(url, "CREATE TRIGGER refuse_events BEFORE INSERT ON webhook_events"
                      " BEGIN SELECT RAISE(ABORT, 'events refused'); END" if sqlite else
                      "ALTER TABLE webhook_events ADD CONSTRAINT refuse_events"
                      " CHECK (false) NOT VALID")
    else:
        sql_rows(url, "DROP TRIGGER refuse_events" if sqlite else
                      "ALTER TABLE webhook_events DROP CONSTRAINT refuse_events")


@pytest.mark.parametrize("earlier", [[], ["sent"]], ids=["new message", "known message"])
def test_a_status_is_never_stored_without_its_event(webhook_app, webhook_client, earlier):
    """The status and its event commit together: when the event cannot be stored, neither
    is, the callback gets a 503, and Twilio's retry stores both."""
    sid, url = "SM" + "e4" * 16, app_database_url(webhook_app)
    for status in earlier:
        post(webhook_client, sid, status)
    refuse_new_events(url)
    params = callback(sid, "delivered")
    answer = webhook_client.post("/message-status", data=params,
                                 headers={"X-Twilio-Signature": sign(CALLBACK_URL, params)})
    assert answer.status_code == 503, answer.get_json()
    assert sql_rows(url, "SELECT latest_status FROM messages") == [(s,) for s in earlier]
    assert sql_rows(url, "SELECT status FROM status_events") == [(s,) for s in earlier]
    assert len(recorded_events(webhook_app)) == len(earlier)
    refuse_new_events(url, refused=False)
    post(webhook_client, sid, "delivered")
    assert [kind for kind, _ in recorded_events(webhook_app)][-1] == "message.delivered"


def test_without_a_webhook_url_nothing_is_recorded(app, client):
    post(client, "SM" + "e3" * 16, "delivered")
    assert recorded_events(app) == []


# --- what an event says, and its signature -------------------------------------------------

def test_the_request_body_headers_and_signatures(webhook_app, webhook_client, receiver):
    sid = webhook_client.post("/send-sms", json={"to": "+15558675309",
                                                 "body": "Your code is 917356",
                                                 "reference": "user-7"},
                              headers=AUTH).get_json()["messageSid"]
    post(webhook_client, sid, "undelivered", ErrorCode="30003")
    deliver_all(webhook_app)
    assert len(receiver.requests) == 2
    listed = webhook_client.get("/webhook-events", headers=AUTH).get_json()["events"]
    for (arrived, headers, body), item in zip(receiver.requests, reversed(listed), strict=True):
        assert headers["Content-Type"] == "application/json"
        assert headers["webhook-id"] == item["id"] and item["state"] == "delivered"
        assert abs(int(headers["webhook-timestamp"]) - arrived) < 5
        assert b"917356" not in body  # the message body never leaves
        # With the receivers' library...
        event = Webhook(WEBHOOK_SECRET).verify(body, headers)
        # ...and by hand: HMAC-SHA256 of "id.timestamp.body" with the secret's bytes.
        key = base64.b64decode(WEBHOOK_SECRET.removeprefix("whsec_"))
        signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
        expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
        assert headers["webhook-signature"] == f"v1,{expected}"
    assert event == {
        "type": "message.undelivered", "timestamp": event["timestamp"],
        "data": {"sid": sid, "status": "undelivered", "previousStatus": "queued",
                 "errorCode": 30003, "errorDescription": event["data"]["errorDescription"],
                 "to": "+15558675309", "from": "+15017122661", "reference": "user-7",
                 "sentBy": "API_KEY", "createdAt": event["data"]["createdAt"],
                 "updatedAt": event["timestamp"]}}
    assert event["data"]["errorDescription"].startswith("Unreachable handset")


def test_two_secrets_sign_every_attempt_twice(make_app, receiver):
    app = make_app(STATUS_WEBHOOK_URL=receiver.url,
                   STATUS_WEBHOOK_SECRET=f"{WEBHOOK_SECRET} {OTHER_WEBHOOK_SECRET}")
    post(app.test_client(), "SM" + "e4" * 16, "delivered")
    deliver_all(app)
    (_, headers, body), = receiver.requests
    signatures = headers["webhook-signature"].split(" ")
    assert len(signatures) == 2 and signatures[0] != signatures[1]
    for secret in (WEBHOOK_SECRET, OTHER_WEBHOOK_SECRET):
        Webhook(secret).verify(body, headers)  # raises when no signature matches
        only_this = {**headers, "webhook-signature": signatures[
            [WEBHOOK_SECRET, OTHER_WEBHOOK_SECRET].index(secret)]}
        Webhook(secret).verify(body, only_this)


def test_attempts_keep_their_connection_and_reconnect_when_the_receiver_closed_it(
        webhook_app, webhook_client, receiver):
    for n in range(3):
        post(webhook_client, "SM" + f"c{n}" * 16, "delivered")
    deliver_all(webhook_app)
    assert len(receiver.requests) == 3 and len(receiver.connections) == 1  # one, kept
    receiver.drop_connections()  # the receiver closes it while it is idle
    post(webhook_client, "SM" + "c9" * 16, "delivered")
    deliver_all(webhook_app)
    assert len(receiver.requests) == 4 and len(receiver.connections) == 2
    events = webhook_client.get("/webhook-events", headers=AUTH).get_json()["events"]
    assert [(e["state"], e["attempts"], e["lastError"]) for e in events] == [
        ("delivered", 1, None)] * 4  # the closed connection cost no failed attempt


# --- seeing and retrying -------------------------------------------------------------------

def test_webhook_events_are_listed_newest_first_filtered_and_paged(
        webhook_app, webhook_client, receiver):
    sids = ["SM" + f"{n:02x}" * 16 for n in range(3)]
    for sid in sids:
        post(webhook_client, sid, "sent")
        post(webhook_client, sid, "delivered")
    receiver.answers = [500]  # the oldest event's attempt fails
    deliver_all(webhook_app)

    def listed(**params):
        answer = webhook_client.get("/webhook-events", query_string=params, headers=AUTH)
        assert answer.status_code == 200, answer.get_json()
        return answer.get_json()

    everything = listed()
    assert [(e["sid"], e["type"]) for e in everything["events"]] == [
        (sid, f"message.{status}") for sid in reversed(sids)
        for status in ("delivered", "sent")]
    pending = listed(state="pending")["events"]
    assert [(e["sid"], e["attempts"], e["lastError"]) for e in pending] == [
        (sids[0], 1, "HTTP 500")]
    assert pending[0]["nextAttemptAt"] > pending[0]["lastAttemptAt"]
    assert all(e["state"] == "delivered" and e["deliveredAt"] and e["nextAttemptAt"] is None
               for e in listed(state="delivered")["events"])
    assert [e["type"] for e in listed(sid=sids[1])["events"]] == [
        "message.delivered", "message.sent"]
    pages, cursor = [], None
    while True:
        page = listed(limit=4, **({"cursor": cursor} if cursor else {}))
        pages.append([e["id"] for e in page["events"]])
        cursor = page["nextCursor"]
        if cursor is None:
            break
    assert sum(pages, []) == [e["id"] for e in everything["events"]]
    assert [len(page) for page in pages] == [4, 2]


@pytest.mark.parametrize("params, named", [
    pytest.param({"state": "lost"}, "state", id="state"),
    pytest.param({"sid": "SM<script>"}, "sid", id="sid"),
    pytest.param({"limit": "0"}, "limit", id="limit"),
    pytest.param({"cursor": "nonsense"}, "cursor", id="cursor"),
    pytest.param({"status": "sent"}, "status", id="unknown"),
])
def test_bad_webhook_event_parameters_are_a_400_naming_them(webhook_client, params, named):
    answer = webhook_client.get("/webhook-events", query_string=params, headers=AUTH)
    assert answer.status_code == 400 and f"'{named}'" in answer.get_json()["error"]


def test_webhook_events_need_the_api_key(webhook_client):
    assert webhook_client.get("/webhook-events").status_code == 401
    assert webhook_client.post("/webhook-events/evt_x/retry").status_code == 401


def test_retry_sends_a_failed_event_again_and_replays_a_delivered_one(
        webhook_app, webhook_client, receiver):
    sid = "SM" + "e5" * 16
    post(webhook_client, sid, "delivered")
    receiver.answers = [503, 503, 503]  # every attempt of the schedule (2 delays: 3 attempts)
    delivery = services(webhook_app).webhooks
    event_id = webhook_client.get("/webhook-events", headers=AUTH).get_json()["events"][0]["id"]
    with webhook_app.app_context():
        for _ in range(3):  # each made due at once
            sql_rows(app_database_url(webhook_app), "UPDATE webhook_events SET"
                     " next_attempt_at = '2000-01-01T00:00:00.000Z'")
            assert delivery.deliver_now(event_id)
    failed = webhook_client.get("/webhook-events", headers=AUTH).get_json()["events"][0]
    assert (failed["state"], failed["attempts"], failed["lastError"]) == ("failed", 3, "HTTP 503")

    def listed():
        return webhook_client.get("/webhook-events", headers=AUTH).get_json()["events"][0]

    delivery.start()  # the retry's attempt is the delivery loop's, as in a server process
    try:
        for attempts in (4, 5):  # the failed event sent again, then the delivered one replayed
            answer = webhook_client.post(f"/webhook-events/{event_id}/retry", headers=AUTH)
            assert answer.status_code == 202
            assert answer.get_json() == {**listed(), **answer.get_json()}  # an item's shape
            assert (answer.get_json()["state"], answer.get_json()["attempts"]) == (
                "pending", attempts - 1)
            assert answer.get_json()["nextAttemptAt"] >= answer.get_json()["lastAttemptAt"]
            wait_until(lambda: listed()["state"] == "delivered", 10,  # noqa: B023
                       "the event delivered by the loop")
            assert listed()["attempts"] == attempts
    finally:
        delivery.stop()
    ids = [headers["webhook-id"] for _, headers, _ in receiver.requests]
    assert ids == [event_id] * 5


def test_a_retry_answers_at_once_while_the_receiver_hangs(webhook_app, webhook_client,
                                                           receiver):
    """The request queues the attempt and returns: it never waits the webhook timeout (2 s
    here) on a receiver that does not answer."""
    post(webhook_client, "SM" + "e7" * 16, "delivered")
    event_id = webhook_client.get("/webhook-events", headers=AUTH).get_json()["events"][0]["id"]
    receiver.answers = ["hang"]
    delivery = services(webhook_app).webhooks
    delivery.start()
    try:
        started = time.monotonic()
        answer = webhook_client.post(f"/webhook-events/{event_id}/retry", headers=AUTH)
        assert answer.status_code == 202 and time.monotonic() - started < 1
        wait_until(lambda: len(receiver.requests) == 1, 10, "the loop's attempt")
    finally:
        receiver.release()
        delivery.stop()


def test_retrying_an_unknown_event_is_a_404(webhook_client):
    answer = webhook_client.post("/webhook-events/evt_unknown/retry", headers=AUTH)
    assert answer.status_code == 404 and "GET /webhook-events" in answer.get_json()["error"]


def test_retrying_while_webhooks_are_off_is_a_409(webhook_app, webhook_client, make_app):
    post(webhook_client, "SM" + "e6" * 16, "delivered")
    event_id = webhook_client.get("/webhook-events", headers=AUTH).get_json()["events"][0]["id"]
    turned_off = make_app().test_client()  # the same database, STATUS_WEBHOOK_URL unset
    answer = turned_off.post(f"/webhook-events/{event_id}/retry", headers=AUTH)
    assert answer.status_code == 409 and "STATUS_WEBHOOK_URL" in answer.get_json()["error"]


def test_retry_webhooks_queues_again_the_events_given_up_on_in_the_window(
        webhook_app, webhook_client, receiver):
    for n in range(3):
        post(webhook_client, "SM" + f"f{n}" * 16, "delivered")
    url = app_database_url(webhook_app)
    sql_rows(url, "UPDATE webhook_events SET state = 'failed', attempts = 8,"
             " last_error = 'HTTP 500', last_attempt_at = ?", (times.stored_time(time.time()),))
    sql_rows(url, "UPDATE webhook_events SET last_attempt_at = ? WHERE message_sid = ?",
             (times.stored_time(time.time() - 3 * 86400), "SM" + "f0" * 16))
    result = webhook_app.test_cli_runner().invoke(args=["retry-webhooks", "--since", "24h"])
    assert result.exit_code == 0, result.output
    assert "Queued 2 failed status webhook events again" in result.output
    deliver_all(webhook_app)
    states = dict(sql_rows(url, "SELECT message_sid, state FROM webhook_events"))
    assert states == {"SM" + "f0" * 16: "failed", "SM" + "f1" * 16: "delivered",
                      "SM" + "f2" * 16: "delivered"}


def test_stats_count_the_pending_and_failed_events_of_the_window(webhook_app, webhook_client):
    for n in range(3):
        post(webhook_client, "SM" + f"a{n}" * 16, "delivered")
    sql_rows(app_database_url(webhook_app), "UPDATE webhook_events SET state = 'failed'"
             " WHERE message_sid = ?", ("SM" + "a0" * 16,))
    stats = webhook_client.get("/stats", headers=AUTH).get_json()
    assert stats["webhooks"] == {"pending": 2, "failed": 1}


def test_prune_removes_events_with_their_message_but_never_pending_ones(
        webhook_app, webhook_client):
    for n in range(3):
        post(webhook_client, "SM" + f"b{n}" * 16, "delivered")
    url = app_database_url(webhook_app)
    sql_rows(url, "UPDATE webhook_events SET state = 'delivered' WHERE message_sid <> ?",
             ("SM" + "b0" * 16,))
    result = webhook_app.test_cli_runner().invoke(args=["prune", "--older-than", "0s"])
    assert result.exit_code == 0, result.output
    assert "Removed 2 messages" in result.output
    assert sql_rows(url, "SELECT message_sid, state FROM webhook_events") == [
        ("SM" + "b0" * 16, "pending")]
    assert [row[0] for row in sql_rows(url, "SELECT sid FROM messages")] == ["SM" + "b0" * 16]


# --- claims and leases ----------------------------------------------------------------------

def claim(lease, now):
    """The ids of the events a claim at `now` leases for 60 s under `lease`."""
    claimed = outbox.claim_webhook_events(get_db(), lease, now, 60, 16)
    return [event["id"] for event in claimed]


def settle(event_id, lease, at, error=None, next_at=None):
    """Records one attempt's outcome; how many were recorded (0 or 1)."""
    return outbox.settle_webhook_attempts(get_db(), [[
        event_id, lease, times.stored_time(at), error,
        None if next_at is None else times.stored_time(next_at)]])


def test_no_event_is_claimed_while_another_of_its_message_is_leased(webhook_app):
    """An event waiting for its retry lets the next event of its message go; once due
    again, it still waits until that event's attempt has ended."""
    sid, now = "SM" + "e5" * 16, time.time() + 1
    with webhook_app.app_context():
        for status in ("sent", "delivered"):
            statuses.record_status(get_db(), sid, status)
        [first] = claim("a", now)
        assert claim("b", now + 1) == []
        assert settle(first, "a", now + 2, error="HTTP 503", next_at=now + 10) == 1
        [second] = claim("b", now + 3)
        assert claim("c", now + 20) == [], "the first is due, but the second is leased"
        assert settle(second, "b", now + 21) == 1
        assert claim("c", now + 22) == [first]


@pytest.mark.parametrize("error, next_at", [(None, None), ("HTTP 503", None),
                                            ("HTTP 503", 600)],
                         ids=["delivered", "given up", "retry"])
def test_an_attempt_whose_lease_ran_out_records_nothing(webhook_app, error, next_at):
    """The first claimer's attempt outlived its lease and another claimed the event: its
    late outcome is ignored, and the new holder's is recorded."""
    sid, now = "SM" + "e6" * 16, time.time() + 1
    url = app_database_url(webhook_app)
    state = "SELECT state, attempts, lease, last_error FROM webhook_events"
    with webhook_app.app_context():
        statuses.record_status(get_db(), sid, "sent")
        [event] = claim("slow", now)
        assert claim("next", now + 61) == [event]
        assert settle(event, "slow", now + 62, error, next_at and now + next_at) == 0
        assert sql_rows(url, state) == [("pending", 0, "next", None)]
        assert settle(event, "next", now + 63) == 1
    assert sql_rows(url, state) == [("delivered", 1, None, None)]


# --- the log ---------------------------------------------------------------------------------

def test_failed_attempts_are_logged_within_a_budget_and_summarised_each_minute(
        make_app, caplog):
    """A receiver that is down: 100 events fail, then are given up on, in moments; at most
    30 lines a minute of each kind are written, and a summary a minute counts them all."""
    now = [time.time()]
    app = make_app(clock=lambda: now[0], STATUS_WEBHOOK_SECRET=WEBHOOK_SECRET,
                   STATUS_WEBHOOK_URL=f"http://127.0.0.1:{free_port()}/events",
                   STATUS_WEBHOOK_RETRY_SCHEDULE="120", STATUS_WEBHOOK_TIMEOUT="2")
    client = app.test_client()
    for n in range(100):
        post(client, f"SM{n:032x}", "delivered")
    url = app_database_url(app)

    def settled(attempts):
        return sql_rows(url, "SELECT count(*) FROM webhook_events WHERE attempts = ?"
                        " AND lease IS NULL", (attempts,))[0][0] == 100

    def lines(containing):
        return [record.getMessage() for record in caplog.records
                if record.name == "sms_status" and containing in record.getMessage()]

    def summary():
        wait_until(lambda: lines("Status webhooks in the last"), 10, "a summary")
        [line] = lines("Status webhooks in the last")
        caplog.clear()
        return line

    delivery = services(app).webhooks
    now[0] = time.time() + 1  # every event is due
    caplog.clear()
    delivery.start()
    try:
        wait_until(lambda: settled(1), 30, "a failed attempt of each event")
        assert len(lines("failed (attempt 1): connection refused")) == 30
        assert lines("Status webhooks in the last") == []  # not before a minute
        now[0] += 61
        assert summary() == (
            "Status webhooks in the last 61 s: 100 attempts failed, 0 of them the last of"
            " their event's schedule (given up on); 70 of these were not logged one by one;"
            " 100 events pending")

        now[0] += 120  # each event's second and last attempt is due
        wait_until(lambda: settled(2), 30, "a second failed attempt of each event")
        assert len(lines("Gave up on status webhook")) == 30
        assert lines("failed (attempt 2)") == []
        now[0] += 61
        assert summary() == (
            "Status webhooks in the last 61 s: 100 attempts failed, 100 of them the last of"
            " their event's schedule (given up on); 70 of these were not logged one by one;"
            " 0 events pending")
        now[0] += 61
        time.sleep(0.5)  # a few turns of the loop
        assert lines("Status webhooks in the last") == []  # no summary without failures
    finally:
        delivery.stop()


# --- a caller's reference -----------------------------------------------------------------

def test_a_reference_is_stored_returned_and_found(webhook_client):
    sids = [webhook_client.post("/send-sms", json={"to": "+15558675309", "body": "hi",
                                                   "reference": reference},
                                headers=AUTH).get_json()["messageSid"]
            for reference in ("order-1", "order-2", "order-1", None)]
    status = webhook_client.get(f"/get-status/{sids[0]}", headers=AUTH).get_json()
    assert status["reference"] == "order-1"
    found = webhook_client.get("/messages", query_string={"reference": "order-1"},
                               headers=AUTH).get_json()["messages"]
    assert [m["sid"] for m in found] == [sids[2], sids[0]]
    assert all(m["reference"] == "order-1" for m in found)
    every = webhook_client.get("/messages", headers=AUTH).get_json()["messages"]
    assert [m["reference"] for m in every] == [None, "order-1", "order-2", "order-1"]


@pytest.mark.parametrize("reference", [
    pytest.param("", id="empty"), pytest.param("x" * 129, id="too-long"),
    pytest.param("a\nb", id="control"), pytest.param(42, id="number"),
    pytest.param(["a"], id="list"), pytest.param("\u200b", id="format-character"),
])
def test_a_bad_reference_is_a_400_naming_it(webhook_client, reference):
    answer = webhook_client.post("/send-sms", json={"to": "+15558675309", "body": "hi",
                                                    "reference": reference}, headers=AUTH)
    assert answer.status_code == 400 and "'reference'" in answer.get_json()["error"]
    if isinstance(reference, str):
        search = webhook_client.get("/messages", query_string={"reference": reference},
                                    headers=AUTH)
        assert search.status_code == 400 and "'reference'" in search.get_json()["error"]


def test_the_reference_is_part_of_the_idempotency_fingerprint(webhook_client):
    def keyed(reference):
        return webhook_client.post("/send-sms", headers={**AUTH, "Idempotency-Key": "k-7"},
                                   json={"to": "+15558675309", "body": "hi",
                                         "reference": reference})

    assert keyed("order-1").status_code == 200
    assert keyed("order-1").headers.get("Idempotent-Replayed") == "true"
    assert keyed("order-2").status_code == 422


# --- configuration ------------------------------------------------------------------------

SECRET_24 = WEBHOOK_SECRET


@pytest.mark.parametrize("settings, named, simulate", [
    pytest.param({"STATUS_WEBHOOK_URL": "ftp://127.0.0.1/x"}, "STATUS_WEBHOOK_URL", False,
                 id="not-http"),
    pytest.param({"STATUS_WEBHOOK_URL": "http://hooks.example.com/x"}, "STATUS_WEBHOOK_URL",
                 False, id="http-when-live"),
    pytest.param({"STATUS_WEBHOOK_URL": "https://your-app.example.com/sms-events"},
                 "STATUS_WEBHOOK_URL", False, id="placeholder-url"),
    pytest.param({"STATUS_WEBHOOK_SECRET": None}, "STATUS_WEBHOOK_SECRET", False,
                 id="no-secret"),
    pytest.param({"STATUS_WEBHOOK_SECRET": "whsec_change-me"}, "STATUS_WEBHOOK_SECRET", False,
                 id="placeholder-secret"),
    pytest.param({"STATUS_WEBHOOK_SECRET": "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"},
                 "STATUS_WEBHOOK_SECRET", False, id="no-prefix"),
    pytest.param({"STATUS_WEBHOOK_SECRET": "whsec_" + base64.b64encode(b"x" * 16).decode()},
                 "STATUS_WEBHOOK_SECRET", False, id="too-short"),
    pytest.param({"STATUS_WEBHOOK_SECRET": "whsec_not*base64"}, "STATUS_WEBHOOK_SECRET",
                 False, id="not-base64"),
    pytest.param({"STATUS_WEBHOOK_SECRET": f"{SECRET_24}  {SECRET_24}"},
                 "STATUS_WEBHOOK_SECRET", False, id="two-spaces"),
    pytest.param({"STATUS_WEBHOOK_SECRET": f"{SECRET_24} {SECRET_24} {SECRET_24}"},
                 "STATUS_WEBHOOK_SECRET", False, id="three-secrets"),
    pytest.param({"STATUS_WEBHOOK_RETRY_SCHEDULE": "5,soon"}, "STATUS_WEBHOOK_RETRY_SCHEDULE",
                 False, id="schedule-word"),
    pytest.param({"STATUS_WEBHOOK_RETRY_SCHEDULE": "5,-1"}, "STATUS_WEBHOOK_RETRY_SCHEDULE",
                 False, id="schedule-negative"),
    pytest.param({"STATUS_WEBHOOK_TIMEOUT": "0"}, "STATUS_WEBHOOK_TIMEOUT", False,
                 id="timeout-zero"),
    pytest.param({"STATUS_WEBHOOK_TIMEOUT": "nan"}, "STATUS_WEBHOOK_TIMEOUT", False,
                 id="timeout-nan"),
])
def test_bad_webhook_settings_are_refused_naming_the_variable(tmp_path, settings, named,
                                                             simulate):
    env = live_env(tmp_path, STATUS_WEBHOOK_URL="https://hooks.example.com/sms?x=1",
                   STATUS_WEBHOOK_SECRET=WEBHOOK_SECRET)
    env.update(settings)
    env = {key: value for key, value in env.items() if value is not None}
    _, problems = read_config(env)
    assert len(problems) == 1 and problems[0].startswith(named), problems
    assert WEBHOOK_SECRET.removeprefix("whsec_") not in problems[0]


@pytest.mark.parametrize("url", ["http://localhost:4000/x", "http://127.0.0.1/x",
                                 "http://[::1]:8080/x", "https://hooks.example.com/x"])
def test_live_webhook_urls_are_https_or_this_machine(tmp_path, url):
    config, problems = read_config(live_env(tmp_path, STATUS_WEBHOOK_URL=url,
                                            STATUS_WEBHOOK_SECRET=WEBHOOK_SECRET))
    assert problems == [] and config.status_webhook.url == url


def test_webhook_settings_defaults_and_what_is_never_shown(tmp_path):
    config, problems = read_config(live_env(
        tmp_path, STATUS_WEBHOOK_URL="https://hook-user:hook-pass@hooks.example.com/x",
        STATUS_WEBHOOK_SECRET=WEBHOOK_SECRET))
    settings = config.status_webhook
    assert problems == []
    assert settings.retry_schedule == (5, 300, 1800, 7200, 18000, 36000, 36000)
    assert settings.timeout == 15
    assert settings.display_url == "https://hooks.example.com/x"
    assert "hook-pass" not in repr(config) and WEBHOOK_SECRET not in repr(config)


@pytest.mark.parametrize("url, shown", [
    pytest.param("https://hooks.example.com/x?token=s3cret", "https://hooks.example.com/x?token=***",
                 id="token"),
    pytest.param("https://u:p@hooks.example.com/x?a=s3cret&b=&s3cret",
                 "https://hooks.example.com/x?a=***&b=***&***", id="credentials-and-query"),
    pytest.param("https://hooks.example.com/x?", "https://hooks.example.com/x", id="empty"),
])
def test_the_logged_webhook_url_masks_its_query(tmp_path, url, shown):
    config, problems = read_config(live_env(tmp_path, STATUS_WEBHOOK_URL=url,
                                            STATUS_WEBHOOK_SECRET=WEBHOOK_SECRET))
    assert problems == [] and config.status_webhook.display_url == shown


def test_the_webhook_urls_query_is_never_logged(make_app, receiver, caplog):
    app = make_app(STATUS_WEBHOOK_URL=receiver.url + "?token=s3cret",
                   STATUS_WEBHOOK_SECRET=WEBHOOK_SECRET)
    services(app).webhooks.start()
    services(app).webhooks.stop()
    assert "token=***" in caplog.text and "s3cret" not in caplog.text
