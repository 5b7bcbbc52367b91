"""Careless operation of a running service: a long prune, a database file deleted or
replaced under it, too few file descriptors, a flood of health checks."""

import os
import shutil
import sqlite3
import subprocess
import threading
import time

import requests

import support
from sms_status.config import SIMULATED_AUTH_TOKEN
from support import CallbackLoad, callback, required_program, sign, sql_rows, sqlite_only

OLD = "2020-01-01T00:00:00.000Z"


def live_service(service_env, start_service, **overrides):
    """A live-mode service whose callbacks the test can sign for its local URL."""
    env = service_env(simulate=False, **overrides)
    return env, start_service(env)


def insert_old_messages(database_url, count):
    """`count` messages last updated in 2020, each with one status event, inserted in bulk."""
    sql_rows(database_url,
             "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)"
             " INSERT INTO messages (sid, to_number, latest_status, created_at, updated_at)"
             " SELECT 'SMold' || i, '+15558675309', 'delivered', ?, ? FROM n",
             (count, OLD, OLD))
    sql_rows(database_url,
             "INSERT INTO status_events (message_sid, status, received_at)"
             " SELECT sid, 'delivered', created_at FROM messages WHERE created_at = ?", (OLD,))


# --- prune: batches, so that callbacks keep landing --------------------------------------

def test_prune_of_a_large_table_lets_callbacks_through(
        database_url, service_env, start_service, make_app):
    # On SQLite, enough that one transaction would hold the write lock for seconds; on
    # PostgreSQL, whose writers do not wait for each other, enough to check the counts.
    count = 200_000 if database_url.startswith("sqlite:///") else 20_000
    app = make_app()  # creates the schema
    insert_old_messages(database_url, count)
    env, service = live_service(service_env, start_service)
    with CallbackLoad(service, env["BASE_URL"] + "/message-status", threads=4,
                      per_thread=5000) as load:
        time.sleep(0.3)
        started = time.monotonic()
        result = app.test_cli_runner().invoke(args=["prune", "--older-than", "90d"])
        prune_seconds = time.monotonic() - started
    assert result.exit_code == 0, result.output
    assert f"Removed {count} messages and {count} status events" in result.output
    statuses = [status for _, status, _ in load.answers]
    assert statuses and set(statuses) == {200}, statuses.count(503)
    slowest = max(seconds for _, _, seconds in load.answers)
    assert slowest < 2, f"slowest callback {slowest:.2f} s during a {prune_seconds:.1f} s prune"
    stored = {row[0] for row in sql_rows(database_url, "SELECT sid FROM messages")}
    assert stored == {sid for sid, _, _ in load.answers}
    if database_url.startswith("sqlite:///"):
        wal = database_url[len("sqlite:///"):] + "-wal"
        assert os.path.getsize(wal) < 1024 * 1024, "the WAL must be cut back after a prune"


# --- the database file deleted or replaced under the running service ---------------------

@sqlite_only
def test_a_deleted_database_file_is_never_written_and_a_restored_one_is_reopened(
        database_url, service_env, start_service, tmp_path):
    path = database_url[len("sqlite:///"):]
    env = service_env()
    service = start_service(env)
    # A new connection per request: the test waits past gunicorn's 2 s keep-alive between
    # requests, and a kept connection may be closed by the server as the next one goes out.
    session = requests
    url = service.url + "/message-status"

    def post(sid):
        params = callback(sid, "delivered")
        return session.post(url, data=params, timeout=10, headers={
            "X-Twilio-Signature": sign(url, params, SIMULATED_AUTH_TOKEN)}).status_code

    def health():
        time.sleep(2)  # /healthz answers from a probe of at most about 1.8 s ago
        return {session.get(service.url + "/healthz", timeout=10).status_code for _ in range(4)}

    assert {post(f"SMbackedup{n}") for n in range(4)} == {200}
    backup = tmp_path / "backup.db"
    with sqlite3.connect(path) as live, sqlite3.connect(backup) as copy:
        live.backup(copy)
    assert post("SMafterbackup") == 200

    os.remove(path)
    assert health() == {503}
    assert {post(f"SMlost{n}") for n in range(4)} == {503}
    send = session.post(service.url + "/send-sms", timeout=10,
                        json={"to": "+15558675309", "body": "hi"})
    assert send.status_code == 503
    assert not os.path.exists(path), "a deleted database must not be recreated empty"
    assert "is missing" in service.logs()

    # Moved into place while the old file's WAL is still there: not opened, said why.
    shutil.copy(backup, path + ".new")
    os.replace(path + ".new", path)
    assert health() == {503}
    assert post("SMstillrefused") == 503
    assert f"{path}-wal and {path}-shm are still there" in service.logs()

    for leftover in (path + "-wal", path + "-shm"):
        os.remove(leftover)
    assert health() == {200}
    for n in range(4):
        answer = session.get(f"{service.url}/get-status/SMbackedup{n}", timeout=10)
        assert answer.status_code == 200 and answer.json()["latestStatus"] == "delivered"
    assert post("SMafterrestore") == 200
    stored = {row[0] for row in sql_rows(database_url, "SELECT sid FROM messages")}
    assert {f"SMbackedup{n}" for n in range(4)} | {"SMafterrestore"} <= stored
    assert not {sid for sid in stored if sid.startswith(("SMlost", "SMstill"))}
    assert "Traceback" not in service.logs()


# --- descriptors: more connections than a worker may open files ---------------------------

def test_2000_connections_under_a_1024_file_limit_break_nothing(
        database_url, service_env, start_service, monkeypatch):
    wrk_binary = required_program("wrk", "wrk")
    # Soft and hard limit both 1024: the service can raise neither.
    command = support.procfile_command()
    monkeypatch.setattr(support, "procfile_command",
                        lambda: ["sh", "-c", 'ulimit -n 1024 && exec "$@"', "sh", *command])
    env = service_env()
    service = start_service(env)
    url = service.url + "/message-status"
    acknowledged = []

    def post_callbacks(stop):
        session, n = requests.Session(), 0
        while not stop.is_set() and n < 2000:
            params = callback(f"SMfiles{n}", "delivered")
            n += 1
            try:
                answer = session.post(url, data=params, timeout=10, headers={
                    "X-Twilio-Signature": sign(url, params, SIMULATED_AUTH_TOKEN)})
            except requests.RequestException:
                continue  # not accepted in time: not acknowledged either
            assert answer.status_code in (200, 503), answer.text
            if answer.status_code == 200:
                acknowledged.append(params["MessageSid"])

    stop = threading.Event()
    poster = threading.Thread(target=post_callbacks, args=(stop,))
    poster.start()
    try:
        wrk = subprocess.run([wrk_binary, "-t2", "-c2000", "-d5s", "--timeout", "5s",
                              service.url + "/healthz"], capture_output=True, text=True,
                             timeout=60)
    finally:
        stop.set()
        poster.join(timeout=30)
    assert wrk.returncode == 0, wrk.stderr
    assert "Non-2xx" not in wrk.stdout, wrk.stdout
    assert requests.get(service.url + "/healthz", timeout=10).status_code == 200
    logs = service.logs()
    for sign_of_trouble in ("Worker exiting", "WORKER TIMEOUT", "SIGSEGV", "signal 11",
                            "Too many open files", "Traceback", "Bad file descriptor",
                            "closed database"):
        assert sign_of_trouble not in logs, logs[-3000:]
    assert logs.count("Booting worker") == 2
    assert acknowledged
    stored = {row[0] for row in sql_rows(database_url, "SELECT message_sid FROM status_events")}
    assert set(acknowledged) <= stored
