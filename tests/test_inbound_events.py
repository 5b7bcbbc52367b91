"""The events of replies and opt-outs (`inbound.received`, `recipient.opted_out`,
`recipient.opted_in`): what they say, one per change, their signatures, and their order per
number, through the app and under real gunicorn processes (a kill and a restart, two
instances on one PostgreSQL)."""

import json
import time

import pytest
import requests
from standardwebhooks import Webhook

from sms_status.services import get_db
from sms_status.storage import outbox
from support import (
    AUTH,
    PERSON,
    SENDER,
    WEBHOOK_SECRET,
    callback,
    deliver_all,
    inbound,
    post_inbound,
    recorded_events,
    reply,
    sign,
    wait_until,
)

OTHER = "+15558675310"


def verified(receiver):
    """Every event the receiver got, in arrival order, each signature checked."""
    with receiver.lock:
        got = list(receiver.requests)
    return [Webhook(WEBHOOK_SECRET).verify(body, headers) for _, headers, body in got]


def kinds(events):
    return [(event["type"], event["data"].get("number") or event["data"].get("from"))
            for event in events]


def test_a_reply_its_opt_out_and_opt_in_make_one_event_each_in_order(
        webhook_app, webhook_client, receiver):
    stop = inbound("Stop")
    post_inbound(webhook_client, stop)
    post_inbound(webhook_client, stop)  # a repeat: no second event
    reply(webhook_client, "STOP")  # opted out already: only the reply's event
    reply(webhook_client, "see you soon")
    reply(webhook_client, "START")
    deliver_all(webhook_app)
    events = verified(receiver)
    assert [event["type"] for event in events] == [
        "inbound.received", "recipient.opted_out", "inbound.received", "inbound.received",
        "inbound.received", "recipient.opted_in"]
    received, opted_out, opted_in = events[0], events[1], events[5]
    assert received["data"] == {
        "sid": stop["MessageSid"], "from": PERSON, "to": SENDER, "body": "Stop", "numMedia": 0,
        "optOutType": "STOP", "receivedAt": received["data"]["receivedAt"]}
    assert received["timestamp"] == received["data"]["receivedAt"]
    assert opted_out["data"] == {"number": PERSON, "source": "keyword", "keyword": "STOP",
                                 "messageSid": stop["MessageSid"],
                                 "at": received["data"]["receivedAt"]}
    assert (opted_in["data"]["source"], opted_in["data"]["keyword"]) == ("keyword", "START")
    assert events[3]["data"]["body"] == "see you soon"  # even with bodies not kept at rest
    assert events[3]["data"]["optOutType"] is None
    listed = webhook_client.get("/webhook-events", headers=AUTH).get_json()["events"]
    assert [item["type"] for item in reversed(listed)] == [event["type"] for event in events]
    assert {item["sid"] for item in listed} == {None} and {item["state"] for item in listed} \
        == {"delivered"}


def test_the_api_and_twilios_21610_make_their_events(webhook_app, webhook_client, receiver):
    assert webhook_client.put("/opt-outs/%2B15558675310", headers=AUTH).status_code == 201
    webhook_client.put("/opt-outs/%2B15558675310", headers=AUTH)  # nothing changes
    webhook_client.delete("/opt-outs/%2B15558675310", headers=AUTH)
    sid = webhook_client.post("/send-sms", json={"to": PERSON, "body": "hi"},
                              headers=AUTH).get_json()["messageSid"]
    params = callback(sid, "undelivered", ErrorCode="21610")
    webhook_client.post("/message-status", data=params, headers={
        "X-Twilio-Signature": sign("https://sms.example.com/message-status", params)})
    assert [(kind, data["source"]) for kind, data in recorded_events(webhook_app, OTHER)] == [
        ("recipient.opted_out", "api"), ("recipient.opted_in", "api")]
    assert [(kind, data.get("source"), data.get("messageSid"))
            for kind, data in recorded_events(webhook_app, PERSON)] == [
        ("recipient.opted_out", "twilio", sid)]
    assert [kind for kind, _ in recorded_events(webhook_app, sid)] == [
        "message.queued", "message.undelivered"]


def test_a_numbers_next_event_waits_for_the_one_before(webhook_app, webhook_client):
    """One event at a time per number, in the order recorded, as a message's status events
    go: the claim leases only the first of each number's events, and other numbers' alike."""
    reply(webhook_client, "STOP")
    reply(webhook_client, "START")
    reply(webhook_client, "hello", from_=OTHER)
    with webhook_app.app_context():
        storage = get_db()
        claimed = outbox.claim_webhook_events(storage, "lease-1", time.time(), 30, 10)
        assert [(json.loads(e["payload"])["type"], e["stream"]) for e in claimed] == [
            ("inbound.received", PERSON), ("inbound.received", OTHER)]
        assert outbox.claim_webhook_events(storage, "lease-2", time.time(), 30, 10) == []
        first = claimed[0]
        outbox.settle_webhook_attempts(storage, [[first["id"], "lease-1", "2026-01-01T00:00:00"
                                                  ".000Z", None, None]])
        following = outbox.claim_webhook_events(storage, "lease-3", time.time(), 30, 10)
    assert [json.loads(e["payload"])["type"] for e in following] == ["recipient.opted_out"]


def test_without_a_webhook_url_no_event_is_recorded(app, client):
    reply(client, "STOP")
    client.put("/opt-outs/%2B15558675310", headers=AUTH)
    assert recorded_events(app) == []


# --- under gunicorn ---------------------------------------------------------------------------

def webhook_env(service_env, url, **settings):
    return service_env(simulate=False, STATUS_WEBHOOK_URL=url,
                       STATUS_WEBHOOK_SECRET=WEBHOOK_SECRET,
                       STATUS_WEBHOOK_RETRY_SCHEDULE="0.2,0.2,0.2,0.2,0.2,0.2",
                       STATUS_WEBHOOK_TIMEOUT="2", **settings)


def post_reply(service, env, body, from_=PERSON):
    params = inbound(body, from_)
    answer = requests.post(service.url + "/inbound-sms", data=params, timeout=15, headers={
        "X-Twilio-Signature": sign(env["BASE_URL"] + "/inbound-sms", params)})
    assert answer.status_code == 200, answer.text
    return params


def test_events_survive_a_kill_and_a_restart_in_order(service_env, start_service, receiver):
    receiver.answers = ["hang"]  # the first attempt never ends: the service is killed in it
    env = webhook_env(service_env, receiver.url)
    service = start_service(env)
    for body in ("STOP", "START", "STOP"):
        post_reply(service, env, body)
    wait_until(lambda: len(receiver.requests) >= 1, 20, "the first attempt")
    service.kill()
    service = start_service(env)
    # The killed attempt's lease runs out (its timeout and a margin), then every event goes
    # out, the first again under its webhook-id.
    wait_until(lambda: len(receiver.requests) >= 7, 40, "the six events after the restart")
    time.sleep(0.5)
    events = verified(receiver)
    ids = [headers["webhook-id"] for _, headers, _ in receiver.requests]
    assert ids[0] == ids[1] and len(set(ids)) == 6 == len(ids) - 1
    assert [(e["type"], e["data"].get("keyword")) for e in events[1:]] == [
        ("inbound.received", None), ("recipient.opted_out", "STOP"),
        ("inbound.received", None), ("recipient.opted_in", "START"),
        ("inbound.received", None), ("recipient.opted_out", "STOP")]
    refused = requests.post(service.url + "/send-sms", json={"to": PERSON, "body": "hi"},
                            headers=AUTH, timeout=15)
    assert refused.status_code == 400 and refused.json()["code"] == 21610


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_two_instances_on_one_postgres_make_one_event_per_change_in_order(
        service_env, start_service, receiver):
    env_a = webhook_env(service_env, receiver.url)
    env_b = webhook_env(service_env, receiver.url)
    first, second = start_service(env_a), start_service(env_b)
    services = [(first, env_a), (second, env_b)]
    bodies = ["STOP", "START"] * 5
    for n, body in enumerate(bodies):
        service, env = services[n % 2]
        post_reply(service, env, body)
    # The same opt-out asked of both instances is recorded once.
    for service, _ in services:
        assert requests.put(service.url + "/opt-outs/%2B15558675310", headers=AUTH,
                            timeout=15).status_code in (200, 201)
    wait_until(lambda: len(verified(receiver)) >= 21, 30, "every event delivered")
    time.sleep(1)
    events = verified(receiver)
    mine = [(e["type"], e["data"].get("keyword")) for e in events
            if (e["data"].get("number") or e["data"].get("from")) == PERSON]
    expected = []
    for body in bodies:
        expected.append(("inbound.received", None))
        expected.append(("recipient.opted_out" if body == "STOP" else "recipient.opted_in",
                         body))
    assert mine == expected
    others = [e["type"] for e in events if e["data"].get("number") == OTHER]
    assert others == ["recipient.opted_out"]
    assert len({e["data"].get("sid") for e in events if e["type"] == "inbound.received"}) == 10
