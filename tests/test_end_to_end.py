"""The service as it is deployed: the Procfile's gunicorn command, real HTTP, a real SQLite
file or PostgreSQL database."""

import re
import threading
import time

import gunicorn
import pytest
import requests

from postgres import create_database, drop_database
from sms_status.config import SIMULATED_AUTH_TOKEN
from sms_status.simulator import SEND_ERRORS, SIMULATED_SERVICE_NUMBER
from support import (
    API_KEY,
    CallbackLoad,
    Service,
    WebhookReceiver,
    callback,
    free_port,
    service_environment,
    sign,
    sql_rows,
    sqlite_only,
)


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def simulated_service(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("simulated")
    if request.param == "sqlite":
        database_url = f"sqlite:///{tmp}/service.db"
    else:
        database_url = create_database(request.getfixturevalue("postgres_admin_url"))
    # TMPDIR: the writer's socket, left behind by the SIGKILL below
    env = service_environment(free_port(), database_url, TMPDIR=tmp, GUNICORN_THREADS=32)
    service = Service(env, tmp / "service.log").start()
    yield service
    service.kill()
    if request.param == "postgres":
        drop_database(request.getfixturevalue("postgres_admin_url"), database_url)


def wait_for_final(service, sid, final, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = requests.get(f"{service.url}/get-status/{sid}", timeout=5).json()
        if answer.get("latestStatus") == final:
            return answer
        time.sleep(0.1)
    raise AssertionError(f"{sid} did not reach {final}: {answer}")


@pytest.mark.parametrize("to, final, error_code", [
    pytest.param("+15558675309", "delivered", None, id="delivered"),
    pytest.param("+15005551003", "undelivered", 30003, id="undelivered"),
    pytest.param("+15005551008", "failed", 30008, id="failed"),
])
def test_simulated_message_reaches_its_final_status_through_signed_callbacks(
        simulated_service, to, final, error_code):
    started = time.monotonic()
    response = requests.post(f"{simulated_service.url}/send-sms",
                             json={"to": to, "body": "Hello"}, timeout=10)
    assert response.status_code == 200, response.text
    assert time.monotonic() - started < 1, "callbacks never hold up the send"
    sid = response.json()["messageSid"]
    answer = wait_for_final(simulated_service, sid, final)
    assert [e["status"] for e in answer["history"]] == ["queued", "sent", final]
    assert answer["errorCode"] == error_code
    assert answer["history"][-1]["errorCode"] == error_code
    assert f"Simulated callback {sid}" not in simulated_service.logs(), "a callback was refused"


@pytest.mark.parametrize("to", sorted(SEND_ERRORS))
def test_simulated_send_time_failures_answer_400_with_twilio_code(simulated_service, to):
    response = requests.post(f"{simulated_service.url}/send-sms",
                             json={"to": to, "body": "Hello"}, timeout=10)
    assert response.status_code == 400
    assert response.json()["code"] == SEND_ERRORS[to][0]


def test_simulated_mode_is_reported_and_announced(simulated_service):
    assert requests.get(simulated_service.url + "/healthz", timeout=5).json()["mode"] == \
        "simulated"
    assert requests.get(simulated_service.url + "/", timeout=5).json()["mode"] == "simulated"
    assert "SIMULATION MODE" in simulated_service.logs()


def test_gunicorns_lines_and_the_services_share_one_format(simulated_service):
    lines = simulated_service.logs().splitlines()
    assert any(line.endswith("Starting gunicorn " + gunicorn.__version__) for line in lines)
    assert any("Ready (simulated mode)" in line for line in lines)  # the service's
    one_format = re.compile(
        r"[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2},[0-9]{3} "
        r"(DEBUG|INFO|WARNING|ERROR|CRITICAL) \S")
    assert [line for line in lines if not one_format.match(line)] == []


def test_simulated_callbacks_are_signed_like_twilio(simulated_service):
    params = callback("SM" + "e5" * 16, "sent")
    url = simulated_service.url + "/message-status"
    forged = requests.post(url, data=params, headers={"X-Twilio-Signature": sign(url, params)},
                           timeout=5)
    assert forged.status_code == 403, "the test token is not the simulator's"
    signed = requests.post(url, data=params, timeout=5, headers={
        "X-Twilio-Signature": sign(url, params, SIMULATED_AUTH_TOKEN)})
    assert signed.status_code == 200


def test_acknowledged_updates_survive_sigkill_and_restart(service_env, start_service, tmp_path):
    env = service_env(simulate=False, WEB_CONCURRENCY=3)
    service = start_service(env)
    with CallbackLoad(service, env["BASE_URL"] + "/message-status") as load:
        load.wait_for(300)
        service.kill()
    acknowledged, refused = load.acknowledged, load.others

    restarted = start_service(env)
    auth = {"Authorization": f"Bearer {API_KEY}"}
    if env["DATABASE_URL"].startswith("sqlite:///"):
        assert sql_rows(env["DATABASE_URL"], "PRAGMA integrity_check") == [("ok",)]
    stored = {sid for (sid,) in sql_rows(env["DATABASE_URL"],
                                         "SELECT message_sid FROM status_events")}
    assert len(acknowledged) >= 300
    assert refused == [], "every callback before the kill is stored, none locked out"
    assert set(acknowledged) <= stored
    sample = acknowledged[-1]
    answer = requests.get(f"{restarted.url}/get-status/{sample}", headers=auth, timeout=5)
    assert answer.json()["latestStatus"] == "delivered"


def test_one_key_from_many_threads_and_workers_sends_once_and_replays_after_restart(
        service_env, start_service):
    env = service_env(TWILIO_SIMULATE_LATENCY_MS=300, WEB_CONCURRENCY=3)
    service = start_service(env)
    barrier = threading.Barrier(16)
    answers = []

    def post():
        barrier.wait()
        answers.append(requests.post(
            f"{service.url}/send-sms", json={"to": "+15558675309", "body": "Your code is 4821"},
            headers={"Idempotency-Key": "signup-4821"}, timeout=10))

    threads = [threading.Thread(target=post) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    statuses = sorted(answer.status_code for answer in answers)
    assert set(statuses) <= {200, 409}, statuses
    originals = [a for a in answers if a.status_code == 200
                 and "Idempotent-Replayed" not in a.headers]
    assert len(originals) == 1
    sid = originals[0].json()["messageSid"]
    assert {a.json()["messageSid"] for a in answers if a.status_code == 200} == {sid}
    assert service.logs().count("Sent SM") == 1, "exactly one Twilio create"
    assert sql_rows(env["DATABASE_URL"],
                    "SELECT count(*) FROM messages WHERE sent_at IS NOT NULL") == [(1,)]

    service.kill()
    restarted = start_service(env)
    replay = requests.post(f"{restarted.url}/send-sms",
                           json={"to": "+15558675309", "body": "Your code is 4821"},
                           headers={"Idempotency-Key": "signup-4821"}, timeout=10)
    assert replay.status_code == 200
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.json()["messageSid"] == sid
    assert "Sent SM" not in restarted.logs()


def test_per_recipient_limit_holds_under_concurrent_sends(service_env, start_service):
    service = start_service(service_env(TWILIO_SIMULATE_LATENCY_MS=300,
                                        MAX_SENDS_PER_RECIPIENT_PER_HOUR=2, WEB_CONCURRENCY=3))
    barrier = threading.Barrier(12)
    statuses = []

    def post(n):
        barrier.wait()
        statuses.append(requests.post(f"{service.url}/send-sms", timeout=10,
                                      json={"to": "+15558675309", "body": f"alert {n}"}
                                      ).status_code)

    threads = [threading.Thread(target=post, args=(n,)) for n in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(statuses) == [200] * 2 + [429] * 10
    assert service.logs().count("Sent SM") == 2


def test_a_send_cut_off_by_sigkill_keeps_counting_after_restart(service_env, start_service):
    """The worker dies while Twilio is creating the message: the message may have gone out,
    so the recipient's place stays taken for the hour, well past twice TWILIO_TIMEOUT."""
    env = service_env(TWILIO_SIMULATE_LATENCY_MS=5000, TWILIO_TIMEOUT=1,
                      MAX_SENDS_PER_RECIPIENT_PER_HOUR=1)
    service = start_service(env)
    send = lambda url: requests.post(  # noqa: E731
        f"{url}/send-sms", json={"to": "+15558675309", "body": "alert"}, timeout=10)
    cut_off = threading.Thread(target=lambda: pytest.raises(requests.RequestException, send,
                                                            service.url))
    cut_off.start()
    deadline = time.monotonic() + 5
    while not sql_rows(env["DATABASE_URL"], "SELECT id FROM send_reservations"):
        assert time.monotonic() < deadline, "the send never reached Twilio"
        time.sleep(0.05)
    service.kill()
    cut_off.join(10)
    time.sleep(2.5)  # past twice TWILIO_TIMEOUT

    answer = send(start_service(env).url)
    assert answer.status_code == 429
    assert int(answer.headers["Retry-After"]) > 3500


def test_chunked_body_over_64_kib_is_413_and_sends_nothing(service_env, start_service):
    import http.client
    service = start_service(service_env())
    body = b'{"to": "+15558675309", "body": "hi"}' + b" " * 70000
    conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=10)
    conn.request("POST", "/send-sms", body=iter([body[i:i + 8192]
                                                 for i in range(0, len(body), 8192)]),
                 headers={"Content-Type": "application/json"}, encode_chunked=True)
    answer = conn.getresponse()
    assert answer.status == 413
    assert "64 KiB" in answer.read().decode()
    conn.close()
    assert "Sent SM" not in service.logs()


def test_development_server_keeps_a_bounded_number_of_connections(service_env, tmp_path):
    import os
    import subprocess
    import sys

    from support import ROOT
    env = service_env()
    process = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{env['PORT']}/healthz"
        for _ in range(100):
            try:
                requests.get(url, timeout=1)
                break
            except requests.ConnectionError:
                time.sleep(0.1)
        for _ in range(300):
            assert requests.get(url, timeout=5).status_code == 200
        open_files = len(os.listdir(f"/proc/{process.pid}/fd"))
        assert open_files < 40, f"{open_files} open files after 300 requests"
    finally:
        process.kill()
        process.wait()


def test_simulated_messaging_service_callbacks_name_the_number_it_sent_from(service_env,
                                                                           start_service):
    service = start_service(service_env(TWILIO_MESSAGING_SERVICE_SID="MG" + "4d" * 16))
    response = requests.post(f"{service.url}/send-sms",
                             json={"to": "+15558675309", "body": "Hello"}, timeout=10)
    assert response.json()["status"] == "accepted"
    answer = wait_for_final(service, response.json()["messageSid"], "delivered")
    assert [e["status"] for e in answer["history"]] == ["accepted", "queued", "sent",
                                                        "delivered"]
    assert answer["from"] == SIMULATED_SERVICE_NUMBER


def answers_at(host, port):
    try:
        return requests.get(f"http://{host}:{port}/healthz", timeout=5).status_code == 200
    except requests.ConnectionError:
        return False


@sqlite_only
def test_simulation_without_api_key_listens_on_loopback_alone(service_env, start_service):
    """127.0.0.2 is a loopback address too: a server bound to 0.0.0.0 answers there, one
    bound to 127.0.0.1 does not."""
    service = start_service(service_env())
    assert answers_at("127.0.0.1", service.port)
    assert not answers_at("127.0.0.2", service.port)
    assert "127.0.0.1 only" in service.logs()

    keyed = start_service(service_env(API_KEY=API_KEY))
    assert answers_at("127.0.0.2", keyed.port), "with a key, every interface"


@sqlite_only
def test_an_explicit_bind_still_wins(service_env, start_service):
    env = service_env()
    env["GUNICORN_CMD_ARGS"] = f"--bind 0.0.0.0:{env['PORT']}"
    service = start_service(env)
    assert answers_at("127.0.0.2", service.port)
    assert "open to anyone who reaches" in service.logs()


@sqlite_only
@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_simulated_callbacks_go_where_gunicorn_listens(service_env, start_service, host):
    """Bound elsewhere than PORT (--bind), without BASE_URL: the simulated callbacks reach
    the service itself, and what listens on PORT hears none of them."""
    with WebhookReceiver() as on_port:
        env = service_env(PORT=on_port.server.server_port)
        port = free_port()
        env["GUNICORN_CMD_ARGS"] = f"--bind {host}:{port}"
        service = start_service(env, port=port)
        sid = requests.post(f"{service.url}/send-sms", timeout=10, json={
            "to": "+15558675309", "body": "Hello"}).json()["messageSid"]
        answer = wait_for_final(service, sid, "delivered")
        assert [e["status"] for e in answer["history"]] == ["queued", "sent", "delivered"]
        assert on_port.requests == []
    assert f"callbacks go to http://127.0.0.1:{port}/message-status" in service.logs()
