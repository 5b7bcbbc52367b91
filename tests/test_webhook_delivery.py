"""Status webhooks delivered by the service as it runs (`gunicorn app:app`, its workers'
delivery loops) to a real local receiver, on both engines: order, retries, outages,
crashes, restarts, two instances on one database, and callbacks unaffected by a bad
receiver."""

import os
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone

import pytest
import requests
from standardwebhooks import Webhook

from sms_status.config import SIMULATED_AUTH_TOKEN
from support import (
    AUTH,
    OTHER_WEBHOOK_SECRET,
    ROOT,
    WEBHOOK_SECRET,
    WebhookReceiver,
    accepts_connections,
    callback,
    free_port,
    post_to_service,
    sign,
    wait_until,
)

# Attempts retried after a fifth of a second: schedules of days, compressed.
FAST_SCHEDULE = "0.2,0.2"


def webhook_env(service_env, url, simulate=False, **settings):
    settings.setdefault("STATUS_WEBHOOK_RETRY_SCHEDULE", FAST_SCHEDULE)
    settings.setdefault("STATUS_WEBHOOK_TIMEOUT", "2")
    return service_env(simulate=simulate, STATUS_WEBHOOK_URL=url,
                       STATUS_WEBHOOK_SECRET=WEBHOOK_SECRET, **settings)


def post(service, env, sid, status, **extra):
    answer = post_to_service(service, env, callback(sid, status, **extra))
    assert answer.status_code == 200, answer.text
    return answer


def events_of(service, **params):
    answer = requests.get(service.url + "/webhook-events", params=params, headers=AUTH,
                          timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()["events"]


def arrivals(receiver):
    """{sid: [status, ...]} in the order the receiver got them, every signature checked."""
    by_sid = defaultdict(list)
    with receiver.lock:
        requests_ = list(receiver.requests)
    for _, headers, body in requests_:
        event = Webhook(WEBHOOK_SECRET).verify(body, headers)
        by_sid[event["data"]["sid"]].append(event["data"]["status"])
    return by_sid


def test_a_send_in_simulation_reaches_the_receiver_in_order_signed(service_env, start_service,
                                                                  receiver):
    env = webhook_env(service_env, receiver.url, simulate=True)
    service = start_service(env)
    sent = requests.post(service.url + "/send-sms", timeout=10, json={
        "to": "+15558675309", "body": "Your code is 123456", "reference": "<script>x</script>"})
    sid = sent.json()["messageSid"]
    wait_until(lambda: len(receiver.requests) >= 3, 20, "the three events")
    time.sleep(0.3)
    events = [Webhook(WEBHOOK_SECRET).verify(body, headers)
              for _, headers, body in receiver.requests]
    assert [(e["type"], e["data"]["previousStatus"]) for e in events] == [
        ("message.queued", None), ("message.sent", "queued"), ("message.delivered", "sent")]
    assert {e["data"]["sid"] for e in events} == {sid}
    assert {e["data"]["reference"] for e in events} == {"<script>x</script>"}
    assert not any(b"123456" in body for _, _, body in receiver.requests)
    ids = [headers["webhook-id"] for _, headers, _ in receiver.requests]
    assert sorted(ids) == sorted(e["id"] for e in events_of(service))
    # A late callback and a repeat make no event.
    for status in ("sent", "delivered"):
        params = callback(sid, status)
        answer = requests.post(service.url + "/message-status", data=params, timeout=10,
                               headers={"X-Twilio-Signature": sign(
                                   service.url + "/message-status", params,
                                   SIMULATED_AUTH_TOKEN)})
        assert answer.json()["duplicate"] is True, answer.text
    time.sleep(1)
    assert len(receiver.requests) == 3


def test_retries_follow_the_schedule_then_give_up_and_can_be_retried(
        service_env, start_service, tmp_path):
    port = free_port()
    with WebhookReceiver(port=port) as receiver:
        env = webhook_env(service_env, receiver.url, STATUS_WEBHOOK_TIMEOUT="1")
        service = start_service(env)

        def settled(sid, attempts):
            wait_until(lambda: [e["state"] for e in events_of(service, sid=sid)] in (
                ["delivered"], ["failed"]) and events_of(service, sid=sid)[0]["attempts"]
                >= attempts, 30, f"the event of {sid} settled")
            return events_of(service, sid=sid)[0]

        receiver.answers = [500]  # then 204
        post(service, env, "SM" + "a1" * 16, "delivered")
        event = settled("SM" + "a1" * 16, 2)
        assert (event["state"], event["attempts"], event["lastError"]) == (
            "delivered", 2, "HTTP 500")

        receiver.answers = ["redirect"] * 3
        post(service, env, "SM" + "a2" * 16, "delivered")
        redirected = settled("SM" + "a2" * 16, 3)
        assert (redirected["state"], redirected["attempts"], redirected["lastError"]) == (
            "failed", 3, "HTTP 302 (redirects are not followed)")

        receiver.answers = ["hang"] * 3
        post(service, env, "SM" + "a3" * 16, "delivered")
        hung = settled("SM" + "a3" * 16, 3)
        assert (hung["state"], hung["lastError"]) == ("failed", "timed out after 1 s")
        receiver.release()
        assert len(receiver.requests) == 2 + 3 + 3  # never a redirect followed

    post(service, env, "SM" + "a4" * 16, "delivered")  # the receiver is gone: refused
    refused = settled("SM" + "a4" * 16, 3)
    assert (refused["state"], refused["lastError"]) == ("failed", "connection refused")
    logs = service.logs()
    assert f"Status webhook {refused['id']} for {'SM' + 'a4' * 16} failed (attempt 1): " \
           "connection refused" in logs
    assert f"ERROR Gave up on status webhook {refused['id']}" in logs

    with WebhookReceiver(port=port) as receiver:
        answer = requests.post(f"{service.url}/webhook-events/{redirected['id']}/retry",
                               headers=AUTH, timeout=10)
        assert answer.status_code == 202
        assert (answer.json()["state"], answer.json()["attempts"]) == ("pending", 3)
        wait_until(lambda: [(e["state"], e["attempts"]) for e in events_of(
            service, sid="SM" + "a2" * 16)] == [("delivered", 4)], 10,
            "the event queued again, delivered by the worker's loop")
        result = subprocess.run([sys.executable, "-m", "flask", "--app", "app",
                                 "retry-webhooks", "--since", "1h"],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "Queued 2 failed status webhook events again" in result.stdout
        wait_until(lambda: {e["state"] for e in events_of(service)} == {"delivered"}, 20,
                   "the two events queued again, delivered")
        assert len(receiver.requests) == 3
        assert sorted(headers["webhook-id"] for _, headers, _ in receiver.requests) == sorted(
            [redirected["id"], hung["id"], refused["id"]])


def test_a_receiver_that_trickles_its_answer_cannot_hold_an_attempt_past_the_timeout(
        service_env, start_service, receiver):
    env = webhook_env(service_env, receiver.url, STATUS_WEBHOOK_TIMEOUT="1",
                      STATUS_WEBHOOK_RETRY_SCHEDULE="30")
    service = start_service(env)
    receiver.answers = ["trickle"]  # each byte well within a socket timeout of 1 s
    post(service, env, "SM" + "b1" * 16, "delivered")
    wait_until(lambda: events_of(service)[0]["attempts"] == 1, 10, "the attempt's end")
    assert events_of(service)[0]["lastError"] == "timed out after 1 s"
    started, _, _ = receiver.requests[0]
    ended = time.time()
    assert ended - started < 5  # the trickle goes on for 20 s


def test_every_event_of_a_receiver_outage_arrives_once(service_env, start_service):
    port = free_port()
    env = webhook_env(service_env, f"http://127.0.0.1:{port}/events",
                      STATUS_WEBHOOK_RETRY_SCHEDULE=",".join(["1"] * 20))
    service = start_service(env)
    sids = [f"SM{n:032x}" for n in range(40)]
    for sid in sids:
        for status in ("sent", "delivered"):
            post(service, env, sid, status)
    wait_until(lambda: all(e["attempts"] >= 1 for e in events_of(service, limit=200)), 20,
               "a first, refused, attempt of every event")
    with WebhookReceiver(port=port) as receiver:
        wait_until(lambda: len(receiver.requests) >= 80, 40, "every event after the outage")
        time.sleep(1.5)  # nothing more arrives
        ids = [headers["webhook-id"] for _, headers, _ in receiver.requests]
        assert len(ids) == len(set(ids)) == 80
        assert {sid: sorted(statuses) for sid, statuses in arrivals(receiver).items()} == {
            sid: ["delivered", "sent"] for sid in sids}
    assert {e["state"] for e in events_of(service, limit=200)} == {"delivered"}


def test_an_attempt_cut_by_a_crash_is_delivered_again_with_the_same_id(
        service_env, start_service, receiver):
    env = webhook_env(service_env, receiver.url, STATUS_WEBHOOK_TIMEOUT="3")
    service = start_service(env)
    receiver.answers = ["hang"]
    post(service, env, "SM" + "c1" * 16, "delivered")
    wait_until(lambda: len(receiver.requests) == 1, 10, "the first attempt")
    service.kill()  # SIGKILL, mid-attempt
    again = start_service(env)
    # Once the lease (the timeout and 5 s) ends, the event is claimed again.
    wait_until(lambda: len(receiver.requests) == 2, 30, "the attempt after the crash")
    first, second = (headers["webhook-id"] for _, headers, _ in receiver.requests)
    assert first == second
    wait_until(lambda: events_of(again)[0]["state"] == "delivered", 10, "delivered")


def test_a_graceful_stop_gives_back_the_attempts_in_flight(service_env, start_service,
                                                         receiver):
    env = webhook_env(service_env, receiver.url, STATUS_WEBHOOK_TIMEOUT="60")
    service = start_service(env)
    receiver.answers = ["hang"]
    post(service, env, "SM" + "d1" * 16, "delivered")
    wait_until(lambda: len(receiver.requests) == 1, 10, "the first attempt")
    started = time.monotonic()
    assert service.stop() == 0
    assert time.monotonic() - started < 15
    assert "Gave back 1 status webhook event(s) still in flight" in service.logs()
    # Given back, it is attempted at once by the next start: its lease (65 s) is not waited.
    again = start_service(env)
    wait_until(lambda: len(receiver.requests) == 2, 15, "the event given back")
    assert receiver.requests[0][1]["webhook-id"] == receiver.requests[1][1]["webhook-id"]
    wait_until(lambda: events_of(again)[0]["state"] == "delivered", 10, "delivered")


def test_a_hanging_receiver_never_slows_the_callbacks(service_env, start_service, receiver):
    env = webhook_env(service_env, receiver.url, STATUS_WEBHOOK_TIMEOUT="30")
    service = start_service(env)

    def timed_callbacks(prefix, count=120, threads=6):
        times = []

        def worker(n):
            session = requests.Session()
            for i in range(n, count, threads):
                started = time.monotonic()
                answer = post_to_service(service, env, callback(f"SM{prefix}{i:030x}",
                                                                "delivered"), session=session)
                assert answer.status_code == 200
                times.append(time.monotonic() - started)

        workers = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join()
        assert len(times) == count
        return times

    usual = timed_callbacks("01")
    wait_until(lambda: len(receiver.requests) >= 120, 30, "the events of the usual callbacks")
    receiver.answers = ["hang"] * 1000  # every attempt slot of every worker now hangs
    hanging = timed_callbacks("02")
    wait_until(lambda: len(receiver.requests) >= 150, 30, "attempts hanging")
    # Generous bounds: the same order of speed, never a timeout or an error.
    assert statistics.median(hanging) < max(5 * statistics.median(usual), 0.25)
    assert max(hanging) < 5


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_two_instances_deliver_each_event_once_and_each_message_in_order(
        service_env, start_service, receiver):
    env = webhook_env(service_env, receiver.url)
    other_env = dict(env, PORT=str(free_port()))
    instances = [(start_service(env), env), (start_service(other_env), other_env)]
    sids = [f"SM{n:032x}" for n in range(30)]

    def lifecycle(n):
        for step, status in enumerate(("queued", "sent", "delivered")):
            service, service_env_ = instances[(n + step) % 2]  # alternate the instances
            post(service, service_env_, sids[n], status)

    workers = [threading.Thread(target=lifecycle, args=(n,)) for n in range(len(sids))]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    wait_until(lambda: len(receiver.requests) >= 90, 30, "every event")
    time.sleep(1.5)  # nothing more arrives
    ids = [headers["webhook-id"] for _, headers, _ in receiver.requests]
    assert len(ids) == len(set(ids)) == 90
    for service, _ in instances:
        assert "failed (attempt" not in service.logs()  # the receiver answered every time
    assert arrivals(receiver) == {sid: ["queued", "sent", "delivered"] for sid in sids}


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_bad_webhook_settings_stop_the_start_naming_the_variable(service_env):
    env = service_env(simulate=False, STATUS_WEBHOOK_URL="http://user:pa55word@hooks.example"
                      ".com/x", STATUS_WEBHOOK_SECRET="whsec_tooshort")
    result = subprocess.run([os.path.join(os.path.dirname(sys.executable), "gunicorn"),
                             "app:app"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0
    assert "STATUS_WEBHOOK_URL must be https:// when live" in result.stderr
    assert "STATUS_WEBHOOK_SECRET must be whsec_" in result.stderr
    assert "pa55word" not in result.stderr and "tooshort" not in result.stderr


@contextmanager
def receive_webhooks_command(env, port, out_path):
    """`flask --app app receive-webhooks --port PORT`, running until the block ends; its
    output goes to `out_path`."""
    with open(out_path, "w") as out:
        receiver = subprocess.Popen([sys.executable, "-m", "flask", "--app", "app",
                                     "receive-webhooks", "--port", str(port)], cwd=ROOT,
                                    env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: accepts_connections(port), 20, "the receiver")
        yield
    finally:
        receiver.terminate()
        receiver.wait(10)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_receive_webhooks_command_prints_what_a_simulated_send_makes(
        service_env, start_service, tmp_path):
    """The README's way to try the webhooks: the command receives, the service simulates."""
    port, out = free_port(), tmp_path / "receiver.out"
    env = service_env(simulate=True, STATUS_WEBHOOK_URL=f"http://127.0.0.1:{port}/",
                      STATUS_WEBHOOK_SECRET=WEBHOOK_SECRET)
    with receive_webhooks_command(env, port, out):
        service = start_service(env)
        sid = requests.post(service.url + "/send-sms", timeout=10, json={
            "to": "+15005551003", "body": "hi", "reference": "order-9"}).json()["messageSid"]
        wait_until(lambda: "-> undelivered" in out.read_text(), 20, "the last event printed")
    lines = out.read_text().splitlines()[1:]
    assert [line.split(" ", 1)[1].split(" reference=")[0].split(" ", 1)[1] for line in lines
            if "evt_" in line] == [f"message.queued {sid} (new) -> queued",
                                   f"message.sent {sid} queued -> sent",
                                   f"message.undelivered {sid} sent -> undelivered"]
    assert all("reference=order-9" in line for line in lines if "evt_" in line)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_receive_webhooks_command_says_why_it_refuses(service_env, tmp_path):
    """Signed with another secret: the line says to make the two secrets equal, and shows
    neither. Other refusals give the reason the standardwebhooks package found."""
    port, out = free_port(), tmp_path / "receiver.out"
    env = service_env(STATUS_WEBHOOK_SECRET=WEBHOOK_SECRET)
    body = '{"type": "message.sent", "data": {}}'
    now = datetime.now(timezone.utc)
    with receive_webhooks_command(env, port, out):
        for secret, signed_at in [(OTHER_WEBHOOK_SECRET, now),
                                  (WEBHOOK_SECRET, now - timedelta(hours=1))]:
            answer = requests.post(f"http://127.0.0.1:{port}/", data=body, timeout=10, headers={
                "webhook-id": "evt_1", "webhook-timestamp": str(int(signed_at.timestamp())),
                "webhook-signature": Webhook(secret).sign("evt_1", signed_at, body)})
            assert answer.status_code == 401
        wait_until(lambda: out.read_text().count("REFUSED") == 2, 10, "two refusals printed")
    printed = out.read_text()
    refusals = [line.split(" ", 1)[1] for line in printed.splitlines() if "REFUSED" in line]
    assert refusals == [
        "REFUSED: the signature did not verify: this receiver's STATUS_WEBHOOK_SECRET must "
        "equal the service's",
        "REFUSED: Message timestamp too old"]
    for secret in (WEBHOOK_SECRET, OTHER_WEBHOOK_SECRET):
        assert secret not in printed and secret.removeprefix("whsec_") not in printed
