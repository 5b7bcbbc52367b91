"""Several instances of the service on one PostgreSQL database, and PostgreSQL going away.

Each test runs real gunicorn processes as the Procfile does, on free local ports; two
services on one database stand for two hosts.
"""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import requests

from postgres import SUPERUSER, PostgresServer
from sms_status.services import services
from sms_status.storage.schema import SCHEMA_VERSION
from sms_status.web import health
from support import (
    API_KEY,
    AUTH,
    ROOT,
    CallbackLoad,
    callback,
    fill_messages,
    free_port,
    post_to_service,
    procfile_command,
    sign,
    sql_rows,
    wait_until,
)

# Every test here is about PostgreSQL: service_env's database is the test's PostgreSQL one.
pytestmark = pytest.mark.parametrize("database_url", ["postgres"], indirect=True)

STATUSES = ["queued", "sent", "delivered"]


def live_pair(service_env, start_service, postgres_url, **settings):
    """Two live services on one database; both check signatures for one public URL, as two
    hosts behind one load balancer would."""
    first = service_env(simulate=False, DATABASE_URL=postgres_url, **settings)
    second = dict(first, PORT=str(free_port()))
    first["BASE_URL"] = second["BASE_URL"] = "https://sms.example.com"
    return (start_service(first), first), (start_service(second), second)


def test_two_instances_store_split_repeated_out_of_order_callbacks_once(
        postgres_url, service_env, start_service):
    (one, env), (two, _) = live_pair(service_env, start_service, postgres_url)
    sids = [f"SM{n:032x}" for n in range(40)]
    deliveries = [(sid, status) for sid in sids for status in STATUSES for _ in range(2)]
    random.Random(7).shuffle(deliveries)
    answers, lock = [], threading.Lock()

    def deliver(part):
        session = requests.Session()
        for n, (sid, status) in enumerate(part):
            service = (one, two)[n % 2]
            answer = post_to_service(service, env, callback(sid, status), session=session)
            with lock:
                answers.append(answer.status_code)

    threads = [threading.Thread(target=deliver, args=(deliveries[i::8],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert answers == [200] * len(deliveries)
    assert sql_rows(postgres_url, "SELECT count(*) FROM status_events") == [(len(sids) * 3,)]
    assert sql_rows(postgres_url, "SELECT DISTINCT latest_status FROM messages") == [
        ("delivered",)]
    history = requests.get(f"{two.url}/get-status/{sids[0]}", headers=AUTH, timeout=5).json()
    assert sorted(entry["status"] for entry in history["history"]) == sorted(STATUSES)


def test_one_idempotency_key_sent_to_both_instances_sends_once(
        postgres_url, service_env, start_service):
    env = service_env(DATABASE_URL=postgres_url, API_KEY=API_KEY,
                      TWILIO_SIMULATE_LATENCY_MS=300)
    one = start_service(env)
    two = start_service(dict(env, PORT=str(free_port())))
    barrier = threading.Barrier(16)
    answers = []

    def post(service):
        barrier.wait()
        answers.append(requests.post(
            f"{service.url}/send-sms", json={"to": "+15558675309", "body": "code 4821"},
            headers={**AUTH, "Idempotency-Key": "signup-4821"}, timeout=15))

    threads = [threading.Thread(target=post, args=((one, two)[n % 2],)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert {answer.status_code for answer in answers} <= {200, 409}
    assert one.logs().count("Sent SM") + two.logs().count("Sent SM") == 1
    sids = {answer.json()["messageSid"] for answer in answers if answer.status_code == 200}
    assert len(sids) == 1
    assert sql_rows(postgres_url, "SELECT count(*) FROM messages WHERE sent_at IS NOT NULL") \
        == [(1,)]


def test_the_per_recipient_limit_holds_across_instances(postgres_url, service_env,
                                                        start_service):
    env = service_env(DATABASE_URL=postgres_url, API_KEY=API_KEY,
                      MAX_SENDS_PER_RECIPIENT_PER_HOUR=2, TWILIO_SIMULATE_LATENCY_MS=200)
    one = start_service(env)
    two = start_service(dict(env, PORT=str(free_port())))
    barrier = threading.Barrier(12)
    statuses = []

    def post(service, n):
        barrier.wait()
        statuses.append(requests.post(
            f"{service.url}/send-sms", json={"to": "+15558675309", "body": f"alert {n}"},
            headers=AUTH, timeout=15).status_code)

    threads = [threading.Thread(target=post, args=((one, two)[n % 2], n)) for n in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(statuses) == [200] * 2 + [429] * 10


def test_what_a_killed_instance_acknowledged_is_read_through_the_other(
        postgres_url, service_env, start_service):
    (doomed, env), (survivor, _) = live_pair(service_env, start_service, postgres_url)
    with CallbackLoad(doomed, env["BASE_URL"] + "/message-status") as load:
        load.wait_for(200)
        doomed.kill()
    acknowledged = load.acknowledged

    assert len(acknowledged) >= 200
    for sid in acknowledged:
        answer = requests.get(f"{survivor.url}/get-status/{sid}", headers=AUTH, timeout=5)
        assert answer.status_code == 200 and answer.json()["latestStatus"] == "delivered"


@pytest.fixture
def own_postgres():
    """A PostgreSQL server of this test's own, to stop and start."""
    server = PostgresServer()
    server.initdb().start()
    yield server
    server.remove()


def test_a_postgres_outage_gives_503_never_200_and_the_service_recovers_by_itself(
        own_postgres, service_env, start_service):
    env = service_env(simulate=False, DATABASE_URL=own_postgres.url())
    service = start_service(env)
    with CallbackLoad(service, env["BASE_URL"] + "/message-status", status="sent", threads=4,
                      per_thread=100_000, pause=0.01) as load:
        time.sleep(1)
        own_postgres.stop()
        down_health = wait_for_health(service, 503, timeout=30)
        assert down_health.json()["status"] == "unavailable"
        assert down_health.headers.get("Retry-After")
        time.sleep(2)
        own_postgres.start()
        wait_for_health(service, 200, timeout=60)
        during = len(load.acknowledged)
        # Each worker's pool gets its connections back on its own: /healthz can answer 200
        # from one worker a moment (measured: up to about a second) before the other, which
        # may hold every connection of the load, stores again.
        load.wait_for(during + 1, timeout=15)
        assert len(load.acknowledged) > during, "callbacks are stored again, with no restart"
    acknowledged, others = load.acknowledged, load.others

    assert others and set(others) == {503}, "only 200 and 503 while the database was away"
    stored = {sid for (sid,) in sql_rows(env["DATABASE_URL"], "SELECT sid FROM messages")}
    assert set(acknowledged) <= stored, "nothing acknowledged is lost"
    assert "Traceback" not in service.logs()
    assert own_postgres.password not in service.logs()


def timed(method, url, **kwargs):
    """(status code, seconds, JSON answer) of one request on a new connection."""
    started = time.monotonic()
    answer = requests.request(method, url, timeout=15, **kwargs)
    return answer.status_code, time.monotonic() - started, answer.json()


def test_after_a_clean_restart_of_postgres_the_first_requests_succeed_at_once(
        own_postgres, service_env, start_service):
    env = service_env(simulate=False, DATABASE_URL=own_postgres.url(), API_KEY=API_KEY,
                      WEB_CONCURRENCY=1)
    service = start_service(env)
    # Callbacks and reads side by side: the worker's pools grow to all their connections,
    # which stay open and idle.
    with CallbackLoad(service, env["BASE_URL"] + "/message-status", threads=8,
                      per_thread=40) as load:
        load.wait_for(320)
    sid = load.acknowledged[0]
    readers = [threading.Thread(target=timed, args=("GET", f"{service.url}/get-status/{sid}"),
                                kwargs={"headers": AUTH}) for _ in range(8)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join()

    own_postgres.stop()
    # The health check's probes meet the outage, as a load balancer's would make them.
    wait_for_health(service, 503, timeout=30)
    own_postgres.start()
    answers = [timed("POST", service.url + "/message-status", data=params,
                     headers={"X-Twilio-Signature": sign(env["BASE_URL"] + "/message-status",
                                                         params)})
               for params in (callback(f"SMe{n:031x}", "sent") for n in range(3))]
    answers += [timed("GET", f"{service.url}/get-status/{sid}", headers=AUTH)
                for _ in range(3)]
    assert [status for status, _, _ in answers] == [200] * 6, answers
    # Stale connections are replaced at once: no request waits for them one by one.
    assert max(seconds for _, seconds, _ in answers) < 2, answers
    # /healthz answers from its latest probe, of at most about a second ago.
    wait_for_health(service, 200, timeout=3)


def test_while_postgres_is_down_requests_fail_fast_and_recover_by_themselves(
        own_postgres, service_env, start_service):
    env = service_env(simulate=False, DATABASE_URL=own_postgres.url(), API_KEY=API_KEY)
    service = start_service(env)
    own_postgres.stop()
    wait_for_health(service, 503, timeout=30)
    time.sleep(2)  # each worker's /healthz answers from a probe of at most about 1.8 s ago

    answers = []
    for n in range(4):  # each on a new connection, so both workers answer
        answers.append(("healthz", *timed("GET", service.url + "/healthz")))
        params = callback(f"SMd{n:031x}", "sent")
        answers.append(("callback", *timed(
            "POST", service.url + "/message-status", data=params,
            headers={"X-Twilio-Signature": sign(env["BASE_URL"] + "/message-status", params)})))
        answers.append(("messages", *timed("GET", service.url + "/messages", headers=AUTH)))
        time.sleep(0.3)
    assert {status for _, status, _, _ in answers} == {503}, answers
    assert max(seconds for _, _, seconds, _ in answers) < 1, answers
    reads = [answer["error"] for path, _, _, answer in answers if path == "messages"]
    assert all("nothing was changed" in error and "stored" not in error for error in reads)
    # /healthz answers anyone: it says why, never where the database is or as whom.
    health = [answer["error"] for path, _, _, answer in answers if path == "healthz"]
    assert all(f":{own_postgres.port}" not in error and "postgres'" not in error
               for error in health), health

    own_postgres.start()
    # Each worker's pools reconnect on their own (within a few seconds: their attempts back
    # off); every kind of request is answered again, with no restart.
    deadline = time.monotonic() + 30
    recovered = set()
    while recovered != {"healthz", "callback", "messages"} and time.monotonic() < deadline:
        params = callback("SMd" + "f" * 31, "sent")
        for path, answer in (
                ("healthz", requests.get(service.url + "/healthz", timeout=15)),
                ("callback", post_to_service(service, env, params)),
                ("messages", requests.get(service.url + "/messages", headers=AUTH,
                                          timeout=15))):
            if answer.status_code == 200:
                recovered.add(path)
        time.sleep(0.2)
    assert recovered == {"healthz", "callback", "messages"}
    assert own_postgres.password not in service.logs()


def test_every_log_line_stays_one_line_while_postgres_is_away(
        own_postgres, service_env, start_service):
    env = service_env(DATABASE_URL=own_postgres.url())
    service = start_service(env)
    own_postgres.stop()
    deadline = time.monotonic() + 30
    while "error connecting" not in service.logs() and time.monotonic() < deadline:
        requests.get(service.url + "/healthz", timeout=15)
        time.sleep(0.2)
    # The pool's warning quotes libpq's message, which spans several lines ("Is the server
    # running", or "server closed the connection unexpectedly" for an attempt cut short).
    warnings = [line for line in service.logs().splitlines() if "error connecting" in line]
    assert warnings and "\\n" in warnings[0]
    # Every line is one event, gunicorn's and the service's alike starting with the date.
    assert [line for line in service.logs().splitlines() if not line[:4].isdigit()] == []


def wait_for_health(service, status, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = requests.get(service.url + "/healthz", timeout=15)
        if answer.status_code == status:
            return answer
        time.sleep(0.2)
    raise AssertionError(f"/healthz never answered {status}")


def test_two_instances_starting_together_on_an_empty_database_migrate_once(
        postgres_url, service_env, start_service):
    env = service_env(DATABASE_URL=postgres_url)
    results = []

    def start(env):
        results.append(start_service(env))

    threads = [threading.Thread(target=start, args=(dict(env, PORT=str(free_port())),))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 2
    assert sql_rows(postgres_url, "SELECT version FROM schema_version") == [
        (SCHEMA_VERSION,)]


@pytest.mark.parametrize("problem", ["unreachable", "wrong-password"])
def test_a_database_that_cannot_be_reached_at_start_stops_with_one_clear_message(
        postgres_url, service_env, problem):
    if problem == "unreachable":
        url = f"postgres://app:s3cret-pw@127.0.0.1:{free_port()}/statusdb"
    else:
        url = postgres_url.replace("@", "s3cret-pw@", 1)
    env = service_env(DATABASE_URL=url)
    result = subprocess.run(procfile_command(), cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "DATABASE_URL" in output and "Traceback" not in output
    assert "s3cret-pw" not in output
    assert "127.0.0.1" in output
    assert ("statusdb" if problem == "unreachable" else postgres_url.rsplit("/", 1)[1]) in output
    assert "Booting worker" not in output


def test_copy_database_moves_a_sqlite_history_into_postgres(
        tmp_path, database_url, service_env, start_service):
    old_env = service_env(DATABASE_URL=f"sqlite:///{tmp_path}/old.db", API_KEY=API_KEY)
    old = start_service(old_env)
    sids = [requests.post(f"{old.url}/send-sms", json={"to": "+15558675309", "body": "hi"},
                          headers=AUTH, timeout=10).json()["messageSid"] for _ in range(3)]
    histories = {sid: wait_for_status(old, sid, "delivered") for sid in sids}
    old.kill()

    env = dict(old_env, DATABASE_URL=database_url, PORT=str(free_port()))
    flask = [str(Path(sys.executable).parent / "flask"), "--app", "app"]
    for expected in ("Copied 3 messages, 9 status events", "Copied 0 messages, 0 status events"):
        result = subprocess.run([*flask, "copy-database", "--from", old_env["DATABASE_URL"]],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert expected in result.stdout
        assert database_url.split(":")[2].split("@")[0] not in result.stdout  # the password

    new = start_service(env)
    for sid, history in histories.items():
        assert requests.get(f"{new.url}/get-status/{sid}", headers=AUTH,
                            timeout=5).json() == history


def wait_for_status(service, sid, status, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = requests.get(f"{service.url}/get-status/{sid}", headers=AUTH, timeout=5).json()
        if answer.get("latestStatus") == status:
            return answer
        time.sleep(0.1)
    raise AssertionError(f"{sid} never reached {status}")


def test_the_database_password_never_shows(database_url, service_env, start_service):
    password = database_url.split(":")[2].split("@")[0]
    env = service_env(DATABASE_URL=database_url)
    service = start_service(env)
    seen = [requests.get(service.url + path, timeout=5).text for path in ("/", "/healthz")]
    flask = [str(Path(sys.executable).parent / "flask"), "--app", "app"]
    for command in (["reconcile", "--older-than", "0s"], ["prune", "--older-than", "90d"]):
        result = subprocess.run([*flask, *command], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        seen += [result.stdout, result.stderr]
    seen.append(service.logs())
    assert "PostgreSQL database" in service.logs()
    assert not [text for text in seen if password in text]


def test_a_flood_of_stats_reads_never_holds_up_status_callbacks(
        postgres_url, service_env, start_service):
    # About two weeks of messages: each /stats over them takes a while, as on a large
    # history. One worker with one connection to share makes a flood easy to see.
    fill_messages(postgres_url, 300_000)
    env = service_env(simulate=False, DATABASE_URL=postgres_url, WEB_CONCURRENCY=1,
                      GUNICORN_THREADS=64, DATABASE_POOL_SIZE=1)
    service = start_service(env)
    stop, reads = threading.Event(), []

    def read_stats():
        session = requests.Session()
        while not stop.is_set():
            reads.append(session.get(
                service.url + "/stats?since=2026-01-01T00:00:00Z&until=2026-01-20T00:00:00Z",
                headers=AUTH, timeout=30).status_code)

    readers = [threading.Thread(target=read_stats) for _ in range(40)]
    for reader in readers:
        reader.start()
    try:
        time.sleep(1)
        answers, session = [], requests.Session()
        for n in range(10):
            started = time.monotonic()
            answer = post_to_service(service, env, callback(f"SMf{n:031x}", "sent"),
                                     session=session)
            answers.append((answer.status_code, round(time.monotonic() - started, 2)))
            time.sleep(0.1)
    finally:
        stop.set()
        for reader in readers:
            reader.join()

    assert len(reads) >= 40 and set(reads) <= {200, 503}, "the reads really ran"
    assert [status for status, _ in answers] == [200] * 10, answers
    # Behind 40 queued reads a callback waited seconds; on connections of its own, moments.
    assert max(seconds for _, seconds in answers) < 1, answers


def postgres_processes(server):
    """The pids of a server's postmaster and of its children."""
    with open(os.path.join(server.data, "postmaster.pid")) as pid_file:
        postmaster = int(pid_file.readline())
    children = []
    for task in os.listdir(f"/proc/{postmaster}/task"):
        with open(f"/proc/{postmaster}/task/{task}/children") as listed:
            children += [int(pid) for pid in listed.read().split()]
    return [postmaster, *children]


def test_healthz_answers_503_within_a_second_while_postgres_hangs(
        own_postgres, service_env, start_service):
    """A server that takes connections and never answers (stopped, or a network that drops
    everything): /healthz must say so within a second, not repeat its last 200."""
    env = service_env(simulate=False, DATABASE_URL=own_postgres.url())
    service = start_service(env)
    assert requests.get(service.url + "/healthz", timeout=5).status_code == 200
    processes = postgres_processes(own_postgres)
    answers = []
    for pid in processes:
        os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(2)  # a probe every second, failed once it has not come back in 0.8 s
        for _ in range(20):  # each on a new connection, so both workers answer
            started = time.monotonic()
            answer = requests.get(service.url + "/healthz", timeout=15)
            answers.append((answer.status_code, time.monotonic() - started,
                            answer.json().get("error")))
            time.sleep(0.05)
    finally:
        for pid in processes:
            os.kill(pid, signal.SIGCONT)
    assert {status for status, _, _ in answers} == {503}, answers
    # A probe still waiting says it did not answer; one whose wait for a connection ran out
    # first says the write failed: either way the kind of failure only.
    assert {error for _, _, error in answers} <= {
        f"The database cannot store status updates: {health.DID_NOT_ANSWER}",
        f"The database cannot store status updates: {health.WRITE_FAILED}"}, answers
    # The contract is 1 s; the bound leaves room for a busy test machine.
    assert max(seconds for _, seconds, _ in answers) < 2, answers
    wait_until(lambda: requests.get(service.url + "/healthz", timeout=5).status_code == 200,
               30, "/healthz to answer 200 again")


def test_healthz_says_what_failed_but_not_as_whom(postgres_admin_url, postgres_url, make_app,
                                                   caplog):
    """A failed probe's answer names the kind of failure only; the server's words (which
    name the database user) go to the log."""
    role, password = "sms_healthz_" + uuid.uuid4().hex[:8], uuid.uuid4().hex
    name = urlsplit(postgres_url).path.lstrip("/")
    sql_rows(postgres_admin_url, f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
    try:
        sql_rows(postgres_admin_url, f"ALTER DATABASE {name} OWNER TO {role}")
        sql_rows(postgres_url, f"GRANT ALL ON SCHEMA public TO {role}")
        parts = urlsplit(postgres_url)
        url = urlunsplit(parts._replace(
            netloc=f"{role}:{password}@{parts.hostname}:{parts.port}"))
        app = make_app(DATABASE_URL=url)
        client = app.test_client()
        assert client.get("/healthz").status_code == 200
        sql_rows(postgres_admin_url, f"ALTER ROLE {role} PASSWORD 'changed-{password}'")
        sql_rows(postgres_admin_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                                     " WHERE usename = %s", (role,))
        answers = []

        def refused():
            answers.append(client.get("/healthz").get_json())
            return answers[-1].get("error") == (
                f"The database cannot store status updates: {health.WRITE_FAILED}")

        # A probe that first waits for the pool's reconnection says it did not answer.
        wait_until(refused, 15, "/healthz to say the write failed")
        assert not any(role in json.dumps(answer) for answer in answers), answers
        wait_until(lambda: f'password authentication failed for user "{role}"' in caplog.text,
                   15, "the log to say why")
        answers.append(client.get("/healthz").get_json())
        assert not any(role in json.dumps(answer) for answer in answers), answers
        services(app).health.stop()
        services(app).storage.close()
        assert password not in caplog.text
    finally:
        sql_rows(postgres_admin_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                                     " WHERE usename = %s", (role,))
        sql_rows(postgres_admin_url, f"ALTER DATABASE {name} OWNER TO {SUPERUSER}")
        sql_rows(postgres_url, f"REASSIGN OWNED BY {role} TO {SUPERUSER}")
        sql_rows(postgres_url, f"DROP OWNED BY {role}")
        sql_rows(postgres_admin_url, f"DROP ROLE {role}")
