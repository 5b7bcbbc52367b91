"""The writer process (writer.py): under gunicorn, SQLite's writes are batched into one
commit each, one failing write never takes the others of its batch with it, and a killed
writer is replaced while nothing acknowledged is lost."""

import os
import resource
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone

import pytest
import requests

from sms_status.services import get_db
from sms_status.storage import (
    OutcomeUnknown,
    SQLiteEngine,
    access,
    sends,
    statuses,
    times,
    writer,
    writes,
)
from sms_status.web import health
from support import (
    AUTH,
    ROOT,
    WEBHOOK_SECRET,
    CallbackLoad,
    app_database_url,
    callback,
    count_rows,
    count_rows_at,
    database_locked,
    fill_messages,
    post_to_service,
    sql_rows,
    sqlite_only,
    wait_until,
)

SID_A, SID_B = "SM" + "a" * 32, "SM" + "b" * 32
# A minute of callbacks as fast as the service takes them: enough to see whether the WAL keeps
# growing, which a burst of a few seconds hides.
SUSTAINED_LOAD_SECONDS = int(os.environ.get("SUSTAINED_LOAD_SECONDS", "60"))
WAL_BOUND_BYTES = 64 * 1024 * 1024
FORK_RACE_ROUNDS = 40


@contextmanager
def writer_batches(app, functions=writes.WRITES, **settings):
    """run(*writes) runs writes [(function name, args)] as one batch of the writer process,
    on one engine (as the writer's, with `settings`) for every batch of the block."""
    engine = access.open_storage(app.config["SERVICE"], checkpoints=False, **settings)
    try:
        yield lambda *writes: writer.run_batch(
            engine, [(name, args, {}) for name, args in writes], functions)
    finally:
        engine.close()


def batch(app, *writes):
    """Runs writes [(write function name, args)] as one batch of the writer process."""
    with writer_batches(app) as run:
        return run(*writes)


def every_write(now):
    """One call of each write the writer process may be asked to run, in an order in which
    each finds what it needs: [(name, args)]."""
    at = times.stored_time(now)
    return [
        ("record_sent_message", (SID_A, "AC" + "0" * 32, "+15558675309", "+15017122661",
                                 "Hello", "queued", at)),
        ("record_status", (SID_A, "delivered")),
        ("record_status", (SID_B, "sent")),
        ("reserve_idempotency_key", ("scope", "key", "fingerprint", now, now - 86400,
                                     now - 30)),
        ("save_idempotent_response", ("scope", "key", 201, "{}")),
        ("release_idempotency_key", ("scope", "key")),
        ("reserve_send", ("+15558675309", now, 5, 10)),
        ("release_send", (1,)),
        ("mark_checked", (SID_B, at)),
        ("mark_unknown_at_twilio", (SID_B,)),
        ("check_writable", ()),
        ("record_inbound", ("SM" + "c3" * 16, "+15558675309", "+15017122661", "STOP", 0, 1,
                            "STOP", "opt_out", "STOP")),
        ("record_opt_out", ("+15558675310", "api")),
        ("end_api_opt_out", ("+15558675310",)),
        ("claim_webhook_events", ("lease", now, 60, 0)),  # none: event ids are random
        ("settle_webhook_attempts", ([],)),
        ("release_webhook_events", (["lease"],)),
        ("queue_webhook_event_again", ("no-such-event", now)),
        ("queue_failed_webhook_events_again", (at, now)),
    ]


@sqlite_only
def test_every_write_runs_in_the_writer_process_as_it_runs_in_place(make_app, tmp_path):
    """A write sees the engine's `ops` and `features` in the writer's batches as in place,
    and records status webhook events there when they are on: each one answers there what
    it answers in place, and stores the same rows."""
    now = time.time()
    calls = every_write(now)
    assert {name for name, _ in calls} == set(writes.WRITES), "a write without a call here"
    webhooks_on = {"STATUS_WEBHOOK_URL": "http://127.0.0.1:9/events",
                   "STATUS_WEBHOOK_SECRET": WEBHOOK_SECRET}
    in_place = make_app(**webhooks_on)
    through_writer = make_app(DATABASE_URL=f"sqlite:///{tmp_path / 'writer.db'}",
                              **webhooks_on)
    with in_place.app_context():
        engine = get_db()
        expected = [("ok", writes.WRITES[name](engine, *args)) for name, args in calls]
        in_batch = writer.BatchStorage(engine, tx=None)
        assert (in_batch.ops, in_batch.features) == (engine.ops, engine.features)
        assert in_batch.records_events is engine.records_events is True
    assert batch(through_writer, *calls) == expected
    # The message's three, the reply's and its opt-out's, and the API's opt-out and its end.
    assert count_rows_at(app_database_url(in_place), "webhook_events") == 7
    for table in ("messages", "status_events", "idempotency_keys", "send_reservations",
                  "health_checks", "webhook_events", "inbound_messages", "opt_outs",
                  "opt_out_changes"):
        assert count_rows_at(app_database_url(through_writer), table) == count_rows_at(
            app_database_url(in_place), table), table


@sqlite_only
def test_a_failing_write_is_rolled_back_alone_and_the_rest_of_its_batch_commits(make_app):
    app = make_app()
    url = app_database_url(app)
    now = time.time()
    with app.app_context():
        reservation = sends.reserve_send(get_db(), "+15558675309", now, 5, 0).reservation
    answers = batch(
        app,
        ("record_status", (SID_A, "sent")),
        # Deletes its reservation, then fails: a message needs a status (NOT NULL).
        ("record_sent_message", ("SM" + "c" * 32, "AC1", "+15558675309", "+15017122661",
                                 None, None, times.stored_time(now), None, reservation)),
        ("record_status", (SID_B, "delivered")),
    )
    assert answers[0] == ("ok", True) and answers[2] == ("ok", True)
    assert answers[1][0] == "error" and "null" in answers[1][1][1].lower(), answers[1]
    assert sql_rows(url, "SELECT message_sid, status FROM status_events ORDER BY 1") == [
        (SID_A, "sent"), (SID_B, "delivered")]
    assert sql_rows(url, "SELECT id FROM send_reservations") == [(reservation,)], \
        "the failed write's own changes are undone"


@sqlite_only
def test_a_batch_that_cannot_take_the_write_lock_answers_every_write_with_the_error(
        make_app, monkeypatch):
    app = make_app()
    with database_locked(app), writer_batches(app, busy_timeout=0.3) as run:
        answers = run(("record_status", (SID_A, "sent")), ("record_status", (SID_B, "sent")))
    assert answers[0][0] == "error" and "lock" in answers[0][1][1], answers
    assert answers[1] == answers[0]
    assert count_rows(app, "status_events") == 0


def fails_at_commit(storage):
    """A write whose statements succeed but whose COMMIT fails: a foreign key checked only
    at COMMIT (as a full disk fails the commit's own writes)."""
    with storage.transaction() as tx:
        tx.execute("PRAGMA defer_foreign_keys = ON")
        tx.execute("INSERT INTO status_events (message_sid, status, received_at)"
                   " VALUES ('SMnosuchmessage', 'sent', '2026-01-01T00:00:00.000Z')")


@sqlite_only
def test_a_batch_whose_commit_fails_answers_every_write_with_the_error_and_stores_none(
        make_app):
    app = make_app()
    with writer_batches(app, dict(writes.WRITES, fails_at_commit=fails_at_commit)) as run:
        answers = run(("record_status", (SID_A, "sent")), ("fails_at_commit", ()))
        assert [outcome for outcome, _ in answers] == ["error", "error"], answers
        assert "FOREIGN KEY" in answers[0][1][1] and answers[1] == answers[0]
        assert count_rows(app, "status_events") == 0
        # The failed commit was rolled back: the writer's connection takes the next batch.
        assert run(("record_status", (SID_B, "sent"))) == [("ok", True)]
    assert sql_rows(app_database_url(app), "SELECT message_sid FROM status_events") == [
        (SID_B,)]


def writer_pid(service):
    """The pid of the service's writer process (a child of a thread of gunicorn's master)."""
    master = service.process.pid
    for task in os.listdir(f"/proc/{master}/task"):
        with open(f"/proc/{master}/task/{task}/children") as children:
            for pid in children.read().split():
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                        if b"sms_status.storage.writer" in cmdline.read():
                            return int(pid)
                except FileNotFoundError:
                    pass
    return None


def live_service(service_env, start_service):
    env = service_env(simulate=False)
    return env, start_service(env)


@contextmanager
def stopped(pid):
    """The process is stopped (SIGSTOP) for the block, and runs again after it."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


@sqlite_only
def test_a_killed_writer_is_replaced_and_nothing_acknowledged_is_lost(
        service_env, start_service):
    env, service = live_service(service_env, start_service)
    first = writer_pid(service)
    assert first is not None
    with CallbackLoad(service, env["BASE_URL"] + "/message-status", threads=8,
                      per_thread=600) as load:
        load.wait_for(300)
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: writer_pid(service) not in (None, first), 15, "a new writer")
        load.wait_for(len(load.acknowledged) + 300)
    statuses = {status for _, status, _ in load.answers}
    assert statuses <= {200, 503}, statuses
    stored = {sid for (sid,) in sql_rows(env["DATABASE_URL"],
                                         "SELECT message_sid FROM status_events")}
    assert set(load.acknowledged) <= stored
    assert f"The database writer (pid {first}) stopped (killed by SIGKILL)" in service.logs()
    # Started as `python -m` from its package, it imports cleanly (no RuntimeWarning from runpy).
    assert "RuntimeWarning" not in service.logs()

    # Killed while idle: once the next writer listens, no write fails on a worker's
    # connection kept from the one before.
    second = writer_pid(service)
    os.kill(second, signal.SIGKILL)
    wait_until(lambda: writer_pid(service) not in (None, second), 15, "a new writer")
    wait_until(lambda: accepts(writer_socket(writer_pid(service))), 15,
               "the new writer to listen")
    with CallbackLoad(service, env["BASE_URL"] + "/message-status", status="sent",
                      threads=8, per_thread=100) as after:
        after.wait_for(800, timeout=30)
    assert len(after.answers) == 800
    assert {status for _, status, _ in after.answers} == {200}


def writer_socket(pid):
    """The socket path a writer process was started with."""
    with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
        argv = cmdline.read().split(b"\0")
    return argv[argv.index(b"sms_status.storage.writer") + 1].decode()


def accepts(path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
            return True
        except OSError:
            return False


@sqlite_only
def test_writes_wait_for_the_writer_and_sigterm_alone_does_not_stop_it(
        service_env, start_service):
    env, service = live_service(service_env, start_service)
    pid = writer_pid(service)
    params = callback(SID_A, "delivered")

    def post(timeout):
        return post_to_service(service, env, params, timeout=timeout)

    with stopped(pid), pytest.raises(requests.ReadTimeout):
        post(timeout=2)  # every write goes through the writer, which is stopped
    wait_until(lambda: count_rows_at(env["DATABASE_URL"], "status_events") == 1, 15,
               "the write to be stored")
    # A process manager's SIGTERM to every process: the writer stays for the workers,
    # until gunicorn's master stops it after them.
    os.kill(pid, signal.SIGTERM)
    time.sleep(1)
    assert writer_pid(service) == pid
    assert post(timeout=10).json() == {"received": True, "duplicate": True}


@sqlite_only
def test_a_writer_that_does_not_answer_in_time_gets_a_503_not_a_hung_request(
        service_env, start_service):
    env, service = live_service(service_env, start_service)
    pid = writer_pid(service)
    params = callback(SID_A, "delivered")
    send_headers = dict(AUTH, **{"Idempotency-Key": "order-1"})
    send = {"to": "+15558675309", "body": "Your code is 123456"}
    limit = writer.ANSWER_TIMEOUT_SECONDS + 10

    def timed(post):
        started = time.monotonic()
        return post(), time.monotonic() - started

    with stopped(pid), ThreadPoolExecutor(2) as pool:
        callback_post = pool.submit(timed, lambda: post_to_service(
            service, env, params, timeout=limit))
        send_post = pool.submit(timed, lambda: requests.post(
            service.url + "/send-sms", json=send, headers=send_headers, timeout=limit))
        (answer, waited), (sent, _) = callback_post.result(), send_post.result()
    assert answer.status_code == 503, answer.text
    assert "may or may not have been stored" in answer.json()["error"]
    assert answer.headers["Retry-After"]
    assert writer.ANSWER_TIMEOUT_SECONDS <= waited < writer.ANSWER_TIMEOUT_SECONDS + 5
    # The send stopped at its first write, before Twilio, and says so.
    assert sent.status_code == 503, sent.text
    assert "No SMS was sent" in sent.json()["error"] and sent.headers["Retry-After"]

    # The writer stored both writes once it ran again, though nobody heard: the callback's
    # retry reads as a repeat, and the send's key stays claimed, as its 503 warned.
    wait_until(lambda: count_rows_at(env["DATABASE_URL"], "status_events") == 1, 15,
               "the write to be stored")
    retried = post_to_service(service, env, params, timeout=10)
    assert retried.json() == {"received": True, "duplicate": True}
    resent = requests.post(service.url + "/send-sms", json=send, headers=send_headers,
                           timeout=10)
    assert resent.status_code == 409, resent.text


@sqlite_only
def test_a_temp_folder_too_deep_for_a_socket_path_still_gets_a_writer(
        service_env, start_service):
    env = service_env(simulate=False)
    deep = os.path.join(env["TMPDIR"], *["a-rather-long-folder-name"] * 5)
    os.makedirs(deep)
    env.update(TMPDIR=deep, BASE_URL=f"http://127.0.0.1:{env['PORT']}")
    service = start_service(env)
    answer = post_to_service(service, env, callback(SID_A, "delivered"), timeout=10)
    assert answer.status_code == 200, answer.text
    socket_path = writer_socket(writer_pid(service))
    assert len(os.fsencode(socket_path)) <= writer.MAX_SOCKET_PATH_BYTES
    assert os.stat(os.path.dirname(socket_path)).st_mode & 0o777 == 0o700
    service.process.send_signal(signal.SIGTERM)
    assert service.process.wait(timeout=30) == 0
    assert not os.path.exists(os.path.dirname(socket_path)), "removed at shutdown"


@sqlite_only
def test_a_start_removes_the_socket_folders_of_killed_servers_and_no_others(
        service_env, start_service):
    env = service_env(simulate=False)
    killed = start_service(env)
    left_behind = os.path.dirname(writer_socket(writer_pid(killed)))
    killed.kill()  # SIGKILL to master, workers and writer: no hook removes the folder
    assert os.path.isdir(left_behind)

    running = start_service(env)
    assert not os.path.exists(left_behind)
    in_use = os.path.dirname(writer_socket(writer_pid(running)))

    other_env = service_env(simulate=False)  # the same TMPDIR, another port
    another = start_service(other_env)
    assert os.path.isdir(in_use)
    assert os.path.dirname(writer_socket(writer_pid(another))) != in_use
    for service, its_env in ((running, env), (another, other_env)):
        answer = post_to_service(service, its_env, callback(SID_A, "sent"))
        assert answer.status_code == 200, answer.text


@sqlite_only
def test_sigterm_stops_the_workers_then_the_writer_and_removes_its_socket(
        service_env, start_service):
    env, service = live_service(service_env, start_service)
    pid = writer_pid(service)
    socket_path = writer_socket(pid)
    with CallbackLoad(service, env["BASE_URL"] + "/message-status", threads=4) as load:
        load.wait_for(100)
        service.process.send_signal(signal.SIGTERM)
        assert service.process.wait(timeout=30) == 0
    assert not os.path.exists(f"/proc/{pid}"), "the writer stopped with the server"
    assert not os.path.exists(os.path.dirname(socket_path))
    stored = {sid for (sid,) in sql_rows(env["DATABASE_URL"],
                                         "SELECT message_sid FROM status_events")}
    assert set(load.acknowledged) <= stored
    # The writer outlived the workers: every request they finished was answered 200.
    assert {status for _, status, _ in load.answers} == {200}


@sqlite_only
def test_the_writer_copies_the_wal_into_the_database_beside_its_commits(
        service_env, start_service):
    env, service = live_service(service_env, start_service)
    path = env["DATABASE_URL"][len("sqlite:///"):]
    size_before = os.path.getsize(path)
    with CallbackLoad(service, env["BASE_URL"] + "/message-status", threads=4,
                      per_thread=500) as load:
        load.wait_for(2000)
    # Its commits leave the pages in the WAL; its checkpoints move them into the file.
    wait_until(lambda: os.path.getsize(path) > size_before + 100_000, 5,
               "the database file to grow")
    assert len(load.acknowledged) >= 2000


@sqlite_only
def test_the_wal_stays_bounded_under_a_minute_of_sustained_callbacks(
        service_env, start_service):
    env, service = live_service(service_env, start_service)
    wal = env["DATABASE_URL"][len("sqlite:///"):] + "-wal"
    sizes = []
    with CallbackLoad(service, env["BASE_URL"] + "/message-status", threads=16,
                      per_thread=1_000_000) as load:
        deadline = time.monotonic() + SUSTAINED_LOAD_SECONDS
        while time.monotonic() < deadline and not load.others:
            sizes.append(os.path.getsize(wal) if os.path.exists(wal) else 0)
            time.sleep(0.2)
    assert not load.others, load.others[:5]
    assert len(load.acknowledged) > 1000
    # Without a checkpoint that can rewind it, the WAL grew by megabytes a second here.
    assert max(sizes) < WAL_BOUND_BYTES, (max(sizes), len(load.acknowledged))
    print("WAL max", max(sizes), "acknowledged", len(load.acknowledged))


# Messages of the month the readers below count: enough that counting it in one statement
# took seconds under the callbacks, as a million did on a quiet machine.
READ_WINDOW_MESSAGES = 300_000


@sqlite_only
def test_the_wal_stays_bounded_while_readers_count_a_month_back_to_back(
        service_env, start_service):
    """A minute of callbacks while three clients read /stats over 30 days of 300,000
    messages, each asking again as soon as it has its answer: no pattern of reads may keep
    the WAL from being rewound (it grew by about 3 MiB a second here, without bound)."""
    env = service_env(simulate=False)
    month_ago = datetime.now(timezone.utc) - timedelta(days=30)
    fill_messages(env["DATABASE_URL"], READ_WINDOW_MESSAGES,
                  first=month_ago.strftime("%Y-%m-%dT%H:%M:%SZ"),
                  every=29 * 86400 // READ_WINDOW_MESSAGES)
    service = start_service(env)
    wal = env["DATABASE_URL"][len("sqlite:///"):] + "-wal"
    since = (month_ago + timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    stopping, answers, sizes = threading.Event(), [], []

    def read_back_to_back():
        session = requests.Session()
        while not stopping.is_set():
            answer = session.get(service.url + "/stats", params={"since": since},
                                 headers=AUTH, timeout=60)
            answers.append((answer.status_code, answer.json().get("total")))

    readers = [threading.Thread(target=read_back_to_back) for _ in range(3)]
    with CallbackLoad(service, env["BASE_URL"] + "/message-status", threads=8,
                      per_thread=1_000_000) as load:
        for reader in readers:
            reader.start()
        deadline = time.monotonic() + SUSTAINED_LOAD_SECONDS
        while time.monotonic() < deadline and not load.others:
            sizes.append(os.path.getsize(wal) if os.path.exists(wal) else 0)
            time.sleep(0.2)
        stopping.set()
        for reader in readers:
            reader.join()
    assert not load.others, load.others[:5]
    assert len(load.acknowledged) > 1000
    assert len(answers) >= 6 and all(status == 200 for status, _ in answers), answers[:5]
    assert all(total >= READ_WINDOW_MESSAGES - 1000 for _, total in answers), answers[:5]
    assert max(sizes) < WAL_BOUND_BYTES, (max(sizes), len(load.acknowledged), len(answers))
    print("WAL max", max(sizes), "acknowledged", len(load.acknowledged), "reads", len(answers))


@sqlite_only
def test_a_writer_killed_while_the_server_forks_is_always_restarted(database_url, monkeypatch):
    """gunicorn's master forks workers while the supervisor may be starting a writer."""
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("TWILIO_SIMULATE", "true")
    SQLiteEngine(database_url[len("sqlite:///"):]).migrate()
    supervisor = writer.Supervisor()
    supervisor.start()
    done, children = threading.Event(), []

    def fork_like_a_master():
        # Children that live a while, as workers do: one that inherited the pipe Popen
        # waits on would hold the supervisor for its whole life.
        while not done.is_set():
            pid = os.fork()
            if pid == 0:
                time.sleep(20)
                os._exit(0)
            children.append(pid)
            time.sleep(0.01)

    forker = threading.Thread(target=fork_like_a_master)
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # let the two threads interleave often
    forker.start()
    try:
        for _ in range(FORK_RACE_ROUNDS):
            old = supervisor.process.pid
            os.kill(old, signal.SIGKILL)
            wait_until(lambda old=old: supervisor.process.pid != old
                       and accepts(supervisor.socket_path), 10, "the writer to be restarted")
    finally:
        done.set()
        forker.join()
        sys.setswitchinterval(switch_interval)
        for pid in children:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        supervisor.stop()


@sqlite_only
def test_healthz_answers_503_within_a_second_while_the_writer_is_stuck(
        service_env, start_service):
    env, service = live_service(service_env, start_service)
    assert requests.get(service.url + "/healthz", timeout=3).status_code == 200
    with stopped(writer_pid(service)):
        time.sleep(2)  # a probe every second, failed once it has not come back in 0.8 s
        answers = [requests.get(service.url + "/healthz", timeout=2) for _ in range(4)]
    assert {answer.status_code for answer in answers} == {503}
    assert answers[0].json()["error"].endswith(health.DID_NOT_ANSWER)
    wait_until(lambda: requests.get(service.url + "/healthz", timeout=2).status_code == 200,
               15, "/healthz to answer 200 again")


@sqlite_only
def test_healthz_answers_at_once_while_every_request_thread_waits_on_the_writer(
        service_env, start_service):
    """Callbacks enough to hold every request thread of both workers, all waiting on a
    stopped writer process: /healthz must not queue behind them (it took 10.9 s)."""
    env = service_env(simulate=False, GUNICORN_THREADS=16)
    service = start_service(env)
    answers = []
    with CallbackLoad(service, env["BASE_URL"] + "/message-status", threads=64,
                      per_thread=1000) as load:
        load.wait_for(100)
        with stopped(writer_pid(service)):
            time.sleep(2)  # every request thread takes a callback and waits on the writer
            for _ in range(10):  # each on a new connection, so both workers answer
                started = time.monotonic()
                answer = requests.get(service.url + "/healthz", timeout=15)
                answers.append((answer.status_code, time.monotonic() - started))
                time.sleep(0.1)
    assert {status for status, _ in answers} == {503}, answers
    # The contract is 1 s; the bound leaves room for a busy test machine.
    assert max(seconds for _, seconds in answers) < 2, answers
    wait_until(lambda: requests.get(service.url + "/healthz", timeout=2).status_code == 200,
               15, "/healthz to answer 200 again")


def frame(body):
    return writer.HEADER.pack(len(body)) + body


@sqlite_only
@pytest.mark.parametrize("frame", [
    pytest.param(writer.HEADER.pack(5) + b"hello", id="not-json"),
    pytest.param(writer.HEADER.pack(2) + b"{}", id="not-a-write"),
    pytest.param(writer.HEADER.pack(23) + b'["os.system",["id"],{}]', id="unknown-function"),
    pytest.param(writer.HEADER.pack(11) + b'[[1],[],{}]', id="name-not-a-string"),
    pytest.param(writer.HEADER.pack(2**32 - 1) + b"x" * 100, id="too-large"),
    pytest.param(frame(b"[" * 200_000), id="nested-too-deep"),
    pytest.param(frame(b'["record_status",' + b"[" * 50_000 + b"]" * 50_000 + b",{}]"),
                 id="arguments-nested-too-deep"),
])
def test_a_bad_frame_drops_its_connection_and_the_writer_goes_on(
        service_env, start_service, frame):
    env, service = live_service(service_env, start_service)
    pid = writer_pid(service)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as intruder:
        intruder.settimeout(5)
        intruder.connect(writer_socket(pid))
        intruder.sendall(frame)
        assert intruder.recv(100) == b""  # closed, nothing answered
    assert writer_pid(service) == pid
    assert post_to_service(service, env, callback(SID_A, "sent")).status_code == 200
    assert "Database writer: dropped a connection that sent a frame" in service.logs()


@contextmanager
def writer_process(database_url, socket_path, open_files, log_path):
    """A writer process on `socket_path` started as Supervisor starts one, with its limit of
    open files lowered to `open_files`, its output in `log_path`; yields its Popen."""
    SQLiteEngine(database_url[len("sqlite:///"):]).migrate()
    env = dict(os.environ, DATABASE_URL=database_url, TWILIO_SIMULATE="true",
               PYTHONPATH=str(ROOT))
    log = open(log_path, "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "sms_status.storage.writer", socket_path, str(os.getpid())],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files)))
    try:
        wait_until(lambda: accepts(socket_path), 15, "the writer to listen")
        yield process
    finally:
        process.send_signal(signal.SIGUSR1)
        process.wait(timeout=15)
        log.close()


@sqlite_only
@pytest.mark.parametrize("lowered", [
    pytest.param(False, id="limit-at-start"),
    # Lowered under a running writer, the limit it sized itself by no longer holds:
    # accept() itself fails with EMFILE.
    pytest.param(True, id="limit-lowered-while-running"),
])
def test_idle_connections_past_the_open_files_limit_never_stop_the_writer(
        database_url, tmp_path, lowered):
    socket_path, log_path = str(tmp_path / "socket"), tmp_path / "writer.log"
    with writer_process(database_url, socket_path, 128, log_path) as process:
        client = writer.Client(socket_path)
        assert client.call("record_status", [SID_A, "sent"], {}, timeout=10) is True
        if lowered:
            in_use = len(os.listdir(f"/proc/{process.pid}/fd"))
            resource.prlimit(process.pid, resource.RLIMIT_NOFILE, (in_use + 40, 128))
        idle = []
        try:
            for _ in range(300):
                idle.append(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
                idle[-1].connect(socket_path)
            # A new connection, queued behind the idle ones, is accepted and answered.
            late = writer.Client(socket_path)
            assert late.call("record_status", [SID_B, "sent"], {}, timeout=10) is True
            # The first connection was closed as the one idle longest: its next write
            # goes over a new one.
            assert client.call("record_status", [SID_A, "delivered"], {}, timeout=10) is True
            assert process.poll() is None
        finally:
            for sock in idle:
                sock.close()
    assert sql_rows(database_url, "SELECT message_sid, status FROM status_events ORDER BY 1, 2"
                    ) == [(SID_A, "delivered"), (SID_A, "sent"), (SID_B, "sent")]
    logs = log_path.read_text()
    assert ("accept() found no descriptor (EMFILE)" in logs) == lowered, logs
    assert "closed the" in logs and "Traceback" not in logs
    # Within the budget of warnings, however many connections came.
    assert logs.count("WARNING") <= 30


# --- the messages between a worker and the writer ---------------------------------------------

@contextmanager
def storage_through_writer(database_url, tmp_path):
    """An engine whose writes go to a real writer process, as a gunicorn worker's do."""
    socket_path = str(tmp_path / "socket")
    with writer_process(database_url, socket_path, 1024, tmp_path / "writer.log"):
        engine = SQLiteEngine(database_url[len("sqlite:///"):])
        engine.writer = writer.Client(socket_path)
        try:
            yield engine
        finally:
            engine.close()


def test_a_write_that_names_no_write_is_refused_by_its_name():
    with pytest.raises(writer.BadFrame, match="a frame that names no write .*'os.system'"):
        writer.Write.decode(b'["os.system",["id"],{}]', writes.WRITES)
    assert writer.Write.decode(b'["release_send",[1],{}]', writes.WRITES) == (
        "release_send", [1], {})


@sqlite_only
def test_a_named_tuple_answered_by_the_writer_arrives_as_that_type(database_url, tmp_path):
    with storage_through_writer(database_url, tmp_path) as engine:
        place = sends.reserve_send(engine, "+15558675309", time.time(), 5, 10)
        assert type(place) is sends.SendPlace, place
        assert place.reservation is not None and place.limit_reached is None
        # A result that is not a named tuple arrives as itself.
        assert sends.release_send(engine, place.reservation) is None


@sqlite_only
def test_a_write_failing_in_the_writer_raises_its_error_class_in_the_worker(
        database_url, tmp_path):
    at = times.stored_time(time.time())
    with storage_through_writer(database_url, tmp_path) as engine:
        with pytest.raises(sqlite3.IntegrityError, match="(?i)null"):
            # A message needs a status (NOT NULL).
            statuses.record_sent_message(engine, SID_A, "AC1", "+15558675309", "+15017122661",
                                         "Hello", None, at)
        assert statuses.record_status(engine, SID_B, "sent") is True


@contextmanager
def writer_answering(tmp_path, reply):
    """A stand-in for the writer on a socket: it reads one frame per connection and sends
    `reply` (bytes) back; yields the socket's path."""
    path = str(tmp_path / "socket")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    listener.settimeout(10)

    def answer():
        try:
            while True:
                conn, _ = listener.accept()
                with conn:
                    writer.receive_frame(conn)
                    conn.sendall(writer.HEADER.pack(len(reply)) + reply)
        except OSError:
            pass  # the listener was closed

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(timeout=10)


@pytest.mark.parametrize("reply, error, text", [
    pytest.param(b'["error",["IntegrityError","UNIQUE failed"]]', sqlite3.IntegrityError,
                 "UNIQUE failed", id="sqlite3-error"),
    # A kind that is not one of sqlite3's (a bug logged in the writer) is still a 503.
    pytest.param(b'["error",["SystemExit","a bug"]]', sqlite3.OperationalError, "a bug",
                 id="unknown-kind"),
    pytest.param(b'["maybe",1]', OutcomeUnknown, "it answered an answer that is neither",
                 id="unknown-outcome"),
    pytest.param(b'["ok"]', OutcomeUnknown, "not \\[outcome, value\\]", id="not-an-answer"),
    pytest.param(b'["ok",[1,2]]', OutcomeUnknown, "not a SendPlace", id="not-the-named-tuple"),
    pytest.param(b"[" * 100_000, OutcomeUnknown, "nested too deep", id="nested-too-deep"),
])
def test_each_answer_of_the_writer_is_a_result_its_error_or_an_unknown_outcome(
        tmp_path, reply, error, text):
    with writer_answering(tmp_path, reply) as path:
        client = writer.Client(path)
        with pytest.raises(error, match=text) as raised:
            client.call("reserve_send", ["+15558675309", 0, 5, 10], {}, timeout=5,
                        returns=sends.SendPlace)
        assert type(raised.value) is error
        dropped = error is OutcomeUnknown
        assert (getattr(client._local, "sock", None) is None) == dropped, \
            "only an answer not understood drops the connection"
