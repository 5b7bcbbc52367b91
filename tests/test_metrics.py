"""GET /metrics: Prometheus' text format, behind the API key, and counts that rise by
exactly what was done, summed over gunicorn's workers."""

import contextlib
import glob
import math
import os
import signal
import threading
import time
from collections import Counter

import psycopg
import pytest
import requests
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from sms_status.services import services
from support import (
    AUTH,
    CALLBACK_URL,
    PERSON,
    ROOT,
    WEBHOOK_SECRET,
    WebhookReceiver,
    app_database_url,
    callback,
    inbound,
    post_inbound,
    post_to_service,
    refused_as_opted_out,
    reply,
    sign,
    sqlite_only,
    wait_until,
)
from twilio_fakes import twilio_error

METRICS = {
    "sms_status_callbacks": "counter",
    "sms_status_sends": "counter",
    "sms_status_status_changes": "counter",
    "sms_status_inbound": "counter",
    "sms_status_inbound_refused": "counter",
    "sms_status_twilio_request_duration_seconds": "histogram",
    "sms_status_database_write_duration_seconds": "histogram",
    "sms_status_http_requests": "counter",
    "sms_status_http_request_duration_seconds": "histogram",
}


def families(text):
    return {family.name: family for family in text_string_to_metric_families(text)}


def values(text):
    """{(sample name, ((label, value), ...)): value} of a /metrics text, the service's own
    (not the Python process's, which only a single process shows)."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples
            if sample.name.startswith("sms_status_")}


def scrape(client, headers=AUTH):
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.get_data(as_text=True)
    return values(response.get_data(as_text=True))


def rise(before, after):
    """What rose between two scrapes: counters, and how many observations each histogram
    took (not the sums or buckets); the samples that did not move are left out."""
    return {key: value - before.get(key, 0) for key, value in after.items()
            if value != before.get(key, 0) and not key[0].endswith(("_sum", "_bucket"))}


def sample(name, **labels):
    return name, tuple(sorted(labels.items()))


def callbacks(result):
    return sample("sms_status_callbacks_total", result=result)


def http_requests(route, code):
    return sample("sms_status_http_requests_total", route=route, code=str(code))


def observations(histogram, **labels):
    return sample(f"sms_status_{histogram}_count", **labels)


# --- in one process (Flask's test client) -----------------------------------------------

def test_inbound_messages_count_by_kind_and_refused_sends_as_opted_out(client, send):
    before = scrape(client)
    for body in ("STOP", "stop", "thanks!", "HELP", "START", "please don't stop"):
        reply(client, body)
    post_inbound(client, inbound("hi", sid="SM" + "c2" * 16))
    post_inbound(client, inbound("hi", sid="SM" + "c2" * 16))  # a repeat is not counted
    reply(client, "STOP")
    refused_as_opted_out(send(PERSON))
    grown = rise(before, scrape(client))
    assert {name: value for name, value in grown.items()
            if name[0] in ("sms_status_inbound_total", "sms_status_sends_total")} == {
        sample("sms_status_inbound_total", kind="opt_out"): 3,
        sample("sms_status_inbound_total", kind="message"): 3,
        sample("sms_status_inbound_total", kind="help"): 1,
        sample("sms_status_inbound_total", kind="opt_in"): 1,
        sample("sms_status_sends_total", outcome="opted_out"): 1,
    }


def test_refused_inbound_messages_count_as_inbound_and_never_as_status_callbacks(client,
                                                                                caplog):
    before = scrape(client)
    caplog.clear()
    assert client.post("/inbound-sms", data=inbound("hi"),
                       headers={"X-Twilio-Signature": "forged"}).status_code == 403
    assert post_inbound(client, inbound("hi") | {f"Extra{n}": "x" for n in range(100)}
                        ).status_code == 400
    assert post_inbound(client, inbound("hi\x00")).status_code == 400
    assert post_inbound(client, {"Body": "hi"}).status_code == 400  # no MessageSid or From
    grown = rise(before, scrape(client))
    assert {name: value for name, value in grown.items()
            if name[0] in ("sms_status_inbound_refused_total", "sms_status_callbacks_total",
                           "sms_status_inbound_total")} == {
        sample("sms_status_inbound_refused_total", reason="bad_signature"): 1,
        sample("sms_status_inbound_refused_total", reason="invalid"): 3,
    }
    assert "Rejected inbound message: invalid Twilio signature" in caplog.text
    assert "status callback" not in caplog.text


@sqlite_only
def test_metrics_are_prometheus_text_with_every_metric_named_by_convention(client):
    response = client.get("/metrics", headers=AUTH)
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    found = families(response.get_data(as_text=True))
    for name, kind in METRICS.items():
        assert found[name].type == kind, name
    # Known results and outcomes are there from the start, at 0.
    assert {s.labels["result"] for s in found["sms_status_callbacks"].samples} == {
        "stored", "repeat", "bad_signature", "invalid"}


@sqlite_only
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-key-wrong-key"}])
def test_metrics_need_the_api_key(client, headers):
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert "Authorization: Bearer" in response.get_json()["error"]


@sqlite_only
def test_metrics_are_open_when_simulating_without_a_key(make_app):
    client = make_app(TWILIO_SIMULATE="true", API_KEY=None).test_client()
    assert "sms_status_callbacks" in families(client.get("/metrics").get_data(as_text=True))


@sqlite_only
def test_callbacks_count_by_result_and_new_statuses_by_status(client, post_callback):
    before = scrape(client)
    sid = "SM" + "c1" * 16
    assert post_callback(callback(sid, "sent")).status_code == 200
    assert post_callback(callback(sid, "delivered")).status_code == 200
    assert post_callback(callback(sid, "delivered")).get_json()["duplicate"] is True
    assert post_callback(callback(sid, "no-such-status")).status_code == 200
    assert client.post("/message-status", data=callback(sid, "read"),
                       headers={"X-Twilio-Signature": "forged"}).status_code == 403
    assert post_callback({"MessageStatus": "sent"}).status_code == 400
    assert post_callback(callback(sid, "sent\x00")).status_code == 400
    assert post_callback({f"Field{n}": "x" for n in range(150)}).status_code == 400

    assert rise(before, scrape(client)) == {
        callbacks("stored"): 3, callbacks("repeat"): 1, callbacks("bad_signature"): 1,
        callbacks("invalid"): 3,
        sample("sms_status_status_changes_total", status="sent"): 1,
        sample("sms_status_status_changes_total", status="delivered"): 1,
        sample("sms_status_status_changes_total", status="other"): 1,
        # 8 callbacks, answered 200 four times, 403 once, 400 three times.
        http_requests("/message-status", 200): 4, http_requests("/message-status", 403): 1,
        http_requests("/message-status", 400): 3,
        observations("http_request_duration_seconds", route="/message-status"): 8,
        observations("database_write_duration_seconds", operation="record_status"): 4,
        # The scrape before this one.
        http_requests("/metrics", 200): 1,
        observations("http_request_duration_seconds", route="/metrics"): 1,
    }


@sqlite_only
def test_sends_count_by_outcome_and_time_twilio(make_app, fake_twilio):
    client = make_app(ALLOWED_DESTINATIONS="+1",
                      MAX_SENDS_PER_RECIPIENT_PER_HOUR="1").test_client()
    before = scrape(client)

    def send(to, status):
        response = client.post("/send-sms", json={"to": to, "body": "hi"}, headers=AUTH)
        assert response.status_code == status, response.get_json()

    send("+15558675309", 200)
    send("+15558675309", 429)  # its one send this hour is used
    send("+445558675309", 403)
    send("555", 400)
    fake_twilio.answer_next(twilio_error(400, 21211, "Invalid 'To' Phone Number"))
    send("+15558675310", 400)
    fake_twilio.answer_next(requests.ConnectionError("refused"))
    send("+15558675311", 502)

    rose = rise(before, scrape(client))
    assert {key[1][0][1]: value for key, value in rose.items()
            if key[0] == "sms_status_sends_total"} == {
        "sent": 1, "limited": 1, "destination_refused": 1, "invalid": 1,
        "rejected_by_twilio": 1, "twilio_failed": 1}
    # Three calls reached Twilio: the sent one and the two that failed.
    assert rose[observations("twilio_request_duration_seconds", operation="create")] == 3
    assert rose[http_requests("/send-sms", 200)] == 1
    assert rose[observations("database_write_duration_seconds",
                             operation="record_sent_message")] == 1


@sqlite_only
def test_requests_are_labelled_by_route_pattern_never_by_path(client):
    before = scrape(client)
    for n in range(50):
        assert client.get(f"/get-status/SM{n:032x}", headers=AUTH).status_code == 404
        assert client.get(f"/no-such-path/{n}").status_code == 404
    assert client.delete("/get-status/SM1", headers=AUTH).status_code == 405

    rose = rise(before, scrape(client))
    routes = {dict(labels)["route"] for name, labels in rose
              if name == "sms_status_http_requests_total"}
    assert routes == {"/get-status/<sid>", "unmatched", "/metrics"}
    assert rose[http_requests("/get-status/<sid>", 404)] == 50
    assert rose[http_requests("unmatched", 404)] == 50
    assert rose[http_requests("unmatched", 405)] == 1
    assert rose[observations("http_request_duration_seconds", route="/get-status/<sid>")] == 50


# --- under gunicorn, two workers ------------------------------------------------------

def metrics_folders(env):
    return glob.glob(os.path.join(env["TMPDIR"], "sms-status-metrics-*"))


def stored_callbacks_per_worker(folder):
    """{worker pid: stored callbacks it counted}, from each worker's own file."""
    counted = {}
    for path in glob.glob(os.path.join(folder, "counter_*.db")):
        pid = int(os.path.basename(path)[len("counter_"):-len(".db")])
        for family in MultiProcessCollector.merge([path]):
            for s in family.samples:
                if s.name == "sms_status_callbacks_total" and s.labels == {"result": "stored"}:
                    counted[pid] = counted.get(pid, 0) + s.value
    return counted


def scrape_service(service):
    response = requests.get(service.url + "/metrics", headers=AUTH, timeout=10)
    assert response.status_code == 200
    return values(response.text)


def test_counts_are_summed_exactly_over_two_workers(service_env, start_service):
    env = service_env(simulate=False, WEB_CONCURRENCY=2, GUNICORN_THREADS=8)
    service = start_service(env)
    [folder] = metrics_folders(env)
    before = scrape_service(service)

    # New connections from several threads at once, batch after batch, until both workers
    # have taken some (each request is counted by the worker that answered it).
    answers, lock = Counter(), threading.Lock()

    def post(first):
        for n in range(first, first + 5):
            status = post_to_service(service, env, callback(f"SM{n:032x}", "delivered"))
            with lock:
                answers[status.status_code] += 1

    sent = 0
    for _ in range(20):
        threads = [threading.Thread(target=post, args=(sent + 5 * t,)) for t in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        sent += 40
        if len([n for n in stored_callbacks_per_worker(folder).values() if n]) >= 2:
            break
    assert answers == {200: sent}

    per_worker = stored_callbacks_per_worker(folder)
    assert len([n for n in per_worker.values() if n]) == 2, per_worker
    assert sum(per_worker.values()) == sent
    rose = rise(before, scrape_service(service))
    assert rose[callbacks("stored")] == sent
    assert rose[http_requests("/message-status", 200)] == sent
    assert rose[sample("sms_status_status_changes_total", status="delivered")] == sent
    assert rose[observations("http_request_duration_seconds", route="/message-status")] == sent
    # Each stored callback is one write, through SQLite's writer process or PostgreSQL's pool.
    assert rose[observations("database_write_duration_seconds", operation="record_status")] == sent


@sqlite_only
def test_each_start_counts_in_a_fresh_folder_removed_at_the_end(service_env, start_service):
    env = service_env(simulate=False, WEB_CONCURRENCY=2, GUNICORN_THREADS=8)
    killed = start_service(env)
    for n in range(5):
        assert post_to_service(killed, env, callback(f"SM{n:032x}", "sent")).status_code == 200
    assert scrape_service(killed)[callbacks("stored")] == 5
    [left_behind] = metrics_folders(env)
    killed.kill()  # SIGKILL: no hook runs, the folder stays
    assert os.path.isdir(left_behind)

    service = start_service(env)
    [folder] = metrics_folders(env)
    assert folder != left_behind  # the killed start's folder was removed at this start
    assert scrape_service(service)[callbacks("stored")] == 0
    assert post_to_service(service, env, callback("SM" + "e" * 32, "sent")).status_code == 200
    assert scrape_service(service)[callbacks("stored")] == 1

    os.killpg(service.process.pid, signal.SIGTERM)
    service.process.wait(timeout=30)
    wait_until(lambda: not metrics_folders(env), 5, "the metrics folder removed at exit")


@sqlite_only
def test_webhook_attempts_count_by_result_and_the_backlog_is_read_from_the_database(
        make_app):
    with WebhookReceiver() as receiver:
        app = make_app(STATUS_WEBHOOK_URL=receiver.url, STATUS_WEBHOOK_SECRET=WEBHOOK_SECRET,
                       STATUS_WEBHOOK_RETRY_SCHEDULE="60")
        client = app.test_client()
        before = scrape(client)
        for n in range(3):
            params = callback("SM" + f"d{n}" * 16, "delivered")
            client.post("/message-status", data=params,
                        headers={"X-Twilio-Signature": sign(CALLBACK_URL, params)})
        assert scrape(client)[sample("sms_status_webhook_backlog")] == 3
        receiver.answers = [500]
        delivery = services(app).webhooks
        with app.app_context():
            for item in client.get("/webhook-events", headers=AUTH).get_json()["events"]:
                delivery.deliver_now(item["id"])
        after = scrape(client)
    assert after[sample("sms_status_webhook_backlog")] == 1
    risen = rise(before, after)
    assert {key: value for key, value in risen.items() if "webhook_deliveries" in key[0]} == {
        sample("sms_status_webhook_deliveries_total", result="delivered"): 2,
        sample("sms_status_webhook_deliveries_total", result="retrying"): 1}


@sqlite_only
def test_the_operations_guide_lists_every_metric_served_with_its_labels(make_app):
    """docs/operations.md's table has a row for each metric /metrics serves (status webhooks
    on), naming each of its labels."""
    app = make_app(STATUS_WEBHOOK_URL="http://127.0.0.1:9/events",
                   STATUS_WEBHOOK_SECRET=WEBHOOK_SECRET)
    response = app.test_client().get("/metrics", headers=AUTH)
    guide = (ROOT / "docs" / "operations.md").read_text()
    rows = {line.split("|")[1].strip().strip("`"): line for line in guide.splitlines()
            if line.startswith("| `sms_status_")}
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        if not family.name.startswith("sms_status_"):
            continue
        name = family.name + ("_total" if family.type == "counter" else "")
        assert name in rows, f"{name} has no row in docs/operations.md"
        labels = {label for sample in family.samples for label in sample.labels
                  if label not in ("le", "quantile")}
        assert all(f"`{label}`" in rows[name] for label in labels), (name, labels)


@contextlib.contextmanager
def webhook_events_locked(url):
    with psycopg.connect(url) as conn:
        conn.execute("LOCK TABLE webhook_events IN ACCESS EXCLUSIVE MODE")
        yield
        conn.rollback()


def test_metrics_are_served_without_the_backlog_while_the_database_is_down(make_app, caplog):
    """With status webhooks on, a scrape reads the backlog from the database: when that
    read fails or hangs, every other metric is still served, the backlog as NaN, and the
    log says why."""
    with WebhookReceiver() as receiver:
        app = make_app(STATUS_WEBHOOK_URL=receiver.url, STATUS_WEBHOOK_SECRET=WEBHOOK_SECRET,
                       STATUS_WEBHOOK_RETRY_SCHEDULE="60")
        client = app.test_client()
        assert scrape(client)[sample("sms_status_webhook_backlog")] == 0
        url = app_database_url(app)
        if url.startswith("sqlite:///"):
            os.remove(url[len("sqlite:///"):])
            down = contextlib.nullcontext()
        else:
            down = webhook_events_locked(url)  # the count waits on the lock (up to 5 s)
        with down:
            started = time.monotonic()
            scraped = scrape(client)
            seconds = time.monotonic() - started
    assert math.isnan(scraped[sample("sms_status_webhook_backlog")])
    assert callbacks("stored") in scraped
    assert seconds < 3, seconds
    assert "Webhook backlog not read" in caplog.text


def test_recycled_workers_keep_the_folder_small_and_every_count_exact(
        service_env, start_service):
    # Each worker is replaced after 10 requests: about 40 workers come and go.
    env = service_env(simulate=False, WEB_CONCURRENCY=2, GUNICORN_THREADS=4,
                      GUNICORN_CMD_ARGS="--max-requests 10")
    service = start_service(env)
    [folder] = metrics_folders(env)
    route = "/openapi.json"
    made, scraped, failed, done = 0, [], [], threading.Event()

    def scrape_meanwhile():
        # Scrapes while workers start and ended ones are folded in: each answers, and no
        # count ever goes down.
        while not done.is_set():
            answer = requests.get(service.url + "/metrics", headers=AUTH, timeout=10)
            if answer.status_code != 200:
                failed.append(answer.status_code)
                continue
            scraped.append(values(answer.text).get(http_requests(route, 200), 0))

    scraper = threading.Thread(target=scrape_meanwhile)
    scraper.start()
    try:
        for _ in range(300):
            assert requests.get(service.url + route, timeout=10).status_code == 200
            made += 1
    finally:
        done.set()
        scraper.join()
    assert not failed and len(scraped) > 10
    assert scraped == sorted(scraped), "a count went down between two scrapes"

    # Three files per live worker (counters, histograms, the backlog's gauge), what the
    # ended ones counted and the scrapes' lock, however many workers came and went.
    wait_until(lambda: len(os.listdir(folder)) <= 3 * 2 + 3, 10,
               "at most 9 files in the metrics folder")
    after = scrape_service(service)
    assert after[http_requests(route, 200)] == made
    assert after[observations("http_request_duration_seconds", route=route)] == made
