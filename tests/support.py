"""Helpers of the tests, the benchmarks and CI: importable (`from support import ...`),
unlike conftest.py, which holds the pytest fixtures built from them."""

import itertools
import json
import os
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psycopg
import pytest
import requests
from psycopg.rows import dict_row, tuple_row
from twilio.request_validator import RequestValidator

from sms_status.config import VARIABLES
from sms_status.services import services
from sms_status.storage import PostgresEngine, SQLiteEngine
from sms_status.storage.schema import MIGRATIONS

ROOT = Path(__file__).resolve().parent.parent

ACCOUNT_SID = "AC" + "a1" * 16
AUTH_TOKEN = "test-auth-token-5f2c9a"
API_KEY = "test-api-key-0123456789"
BASE_URL = "https://sms.example.com"
SENDER = "+15017122661"
CALLBACK_URL = BASE_URL + "/message-status"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
# The time of the tests whose app runs on a fixed clock (conftest.py's `clock`, `store`).
NOW = datetime(2026, 11, 26, 20, 0, tzinfo=timezone.utc).timestamp()


def live_env(tmp_path, **overrides):
    env = {
        "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
        "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "TWILIO_PHONE_NUMBER": SENDER,
        "BASE_URL": BASE_URL,
        "API_KEY": API_KEY,
        "DATABASE_URL": f"sqlite:///{tmp_path}/test.db",
        "LOG_LEVEL": "INFO",
    }
    env.update(overrides)
    return {key: value for key, value in env.items() if value is not None}


def app_database_url(app):
    config = app.config["SERVICE"]
    return config.database_url


def sql_rows(database_url, query, params=(), as_dicts=False):
    """Rows (tuples, or dicts) of a query with `?` placeholders, run on a connection of its
    own, not through the service's code."""
    if database_url.startswith("sqlite:///"):
        conn = sqlite3.connect(database_url[len("sqlite:///"):])
        conn.row_factory = sqlite3.Row
        try:
            cursor = conn.execute(query, params)
            rows = cursor.fetchall() if cursor.description else []
            conn.commit()
            return [dict(row) if as_dicts else tuple(row) for row in rows]
        finally:
            conn.close()
    with psycopg.connect(database_url, row_factory=dict_row if as_dicts else tuple_row) as conn:
        cursor = conn.execute(query.replace("?", "%s"), params)
        return cursor.fetchall() if cursor.description else []


def stored_message(app, sid):
    """The message's row as stored, or None."""
    rows = sql_rows(app_database_url(app), "SELECT * FROM messages WHERE sid = ?", (sid,),
                    as_dicts=True)
    return rows[0] if rows else None


TABLES = ("messages", "status_events", "idempotency_keys", "send_reservations", "health_checks")


@contextmanager
def database_locked(app):
    """Another connection holds every table of the app's database until the block ends, as
    a stuck writer would; give the app a short busy_timeout (storage_settings) to wait less."""
    url = app_database_url(app)
    if url.startswith("sqlite:///"):
        conn = sqlite3.connect(url[len("sqlite:///"):])
        conn.execute("BEGIN EXCLUSIVE")
    else:
        conn = psycopg.connect(url)
        conn.execute(f"LOCK TABLE {', '.join(TABLES)} IN ACCESS EXCLUSIVE MODE")
    try:
        yield
    finally:
        conn.rollback()
        conn.close()


def database_text(app):
    """Everything stored in the app's database, as one text."""
    url = app_database_url(app)
    return "\n".join(str(row) for table in TABLES
                     for row in sql_rows(url, f"SELECT * FROM {table}"))


def count_rows(app, table):
    """Rows in one table of the app's database, read through a connection of its own."""
    return count_rows_at(app_database_url(app), table)


def count_rows_at(database_url, table):
    """Rows in one table of the database at `database_url` (a running service's)."""
    return sql_rows(database_url, f"SELECT count(*) FROM {table}")[0][0]


def database_at_version(database_url, version):
    """Creates, in an empty database, the schema an older release left at `version`, with
    the service's own migrations up to it (PostgreSQL's baseline reaches version 5)."""
    if database_url.startswith("sqlite:///"):
        conn = sqlite3.connect(database_url[len("sqlite:///"):])
        for target, statements, _ in MIGRATIONS:
            if target <= version:
                for statement in statements:
                    conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {version}")
        conn.commit()
        conn.close()
        return
    for target, _, statements in MIGRATIONS:
        if target <= version and statements is not None:
            for statement in statements:
                sql_rows(database_url, statement)
    sql_rows(database_url, "CREATE TABLE schema_version (version INTEGER NOT NULL)")
    sql_rows(database_url, "INSERT INTO schema_version VALUES (?)", (version,))


def fill_messages(database_url, count, first="2026-01-01T00:00:00Z", every=4):
    """Stores `count` messages (no history), the database migrated first, in one statement,
    one each `every` seconds from `first`: mostly delivered, some undelivered, failed, sent
    or queued. Analysed after (vacuumed too on PostgreSQL, as autovacuum would)."""
    if database_url.startswith("sqlite:///"):
        fill_sqlite_messages(database_url[len("sqlite:///"):], count, first, every)
        return
    PostgresEngine(database_url, 1).migrate()
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO messages (sid, to_number, from_number, latest_status, error_code,"
            " created_at, updated_at, seconds_to_delivered)"
            " SELECT 'SM' || lpad(to_hex(n), 32, '0'), '+1555' || lpad((n %% 5000)::text, 7, '0'),"
            " '+15017122661', (ARRAY['delivered', 'delivered', 'delivered', 'undelivered',"
            " 'failed', 'sent', 'queued'])[1 + n %% 7], CASE WHEN n %% 7 IN (3, 4)"
            " THEN 30003 + n %% 5 END, stamp, stamp,"
            " CASE WHEN n %% 7 < 3 THEN (n %% 9000) / 1000.0 END"
            " FROM generate_series(1, %s) AS n, LATERAL (SELECT to_char((%s::timestamptz"
            " + n * %s * interval '1 second') AT TIME ZONE 'UTC',"
            " 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS stamp) AS created",
            (count, first, every))
        conn.execute("VACUUM ANALYZE messages")


def fill_sqlite_messages(path, count, first, every):
    """fill_messages on SQLite: the same messages, through the service's own migrations."""
    SQLiteEngine(path).migrate()
    conn = sqlite3.connect(path)
    try:
        with conn:
            conn.execute(
                "WITH RECURSIVE k (n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM k WHERE n < ?)"
                " INSERT INTO messages (sid, to_number, from_number, latest_status, error_code,"
                " created_at, updated_at, seconds_to_delivered, storage_order)"
                " SELECT printf('SM%032x', n), printf('+1555%07d', n % 5000), '+15017122661',"
                " CASE n % 7 WHEN 3 THEN 'undelivered' WHEN 4 THEN 'failed' WHEN 5 THEN 'sent'"
                " WHEN 6 THEN 'queued' ELSE 'delivered' END,"
                " CASE WHEN n % 7 IN (3, 4) THEN 30003 + n % 5 END, stamp, stamp,"
                " CASE WHEN n % 7 < 3 THEN (n % 9000) / 1000.0 END, n"
                " FROM (SELECT n, strftime('%Y-%m-%dT%H:%M:%fZ', ?, printf('+%d seconds',"
                " n * ?)) AS stamp FROM k)",
                (count, first, every))
        conn.execute("ANALYZE")
    finally:
        conn.close()


def sign(url, params, token=AUTH_TOKEN):
    return RequestValidator(token).compute_signature(url, params)


def post_to_service(service, env, params, timeout=15, session=requests):
    """Posts a status callback to a running service, signed for its BASE_URL."""
    return session.post(service.url + "/message-status", data=params, timeout=timeout,
                        headers={"X-Twilio-Signature": sign(env["BASE_URL"] + "/message-status",
                                                            params)})


def callback(sid, status, **extra):
    params = {
        "MessageSid": sid, "SmsSid": sid, "MessageStatus": status, "SmsStatus": status,
        "AccountSid": ACCOUNT_SID, "From": SENDER, "To": "+15558675309",
        "ApiVersion": "2010-04-01",
    }
    params.update(extra)
    return params


# --- inbound messages (Twilio's incoming-message webhook) -----------------------------------

INBOUND_URL = BASE_URL + "/inbound-sms"
PERSON = "+15558675309"
_inbound_sids = itertools.count(1)


def inbound(body, from_=PERSON, sid=None, **extra):
    """The form Twilio posts for a message that comes in."""
    sid = sid or f"SM{next(_inbound_sids):032x}"
    params = {"MessageSid": sid, "SmsMessageSid": sid, "SmsSid": sid, "AccountSid": ACCOUNT_SID,
              "From": from_, "To": SENDER, "Body": body, "NumMedia": "0", "NumSegments": "1",
              "ApiVersion": "2010-04-01"}
    params.update(extra)
    return {name: value for name, value in params.items() if value is not None}


def post_inbound(client, params, url=INBOUND_URL):
    return client.post("/inbound-sms", data=params,
                       headers={"X-Twilio-Signature": sign(url, params)})


def reply(client, body, from_=PERSON, **extra):
    answer = post_inbound(client, inbound(body, from_, **extra))
    assert answer.status_code == 200, answer.get_data(as_text=True)
    return answer


def refused_as_opted_out(answer):
    assert answer.status_code == 400, answer.get_json()
    body = answer.get_json()
    assert body["code"] == 21610 and body["success"] is False
    assert body["optedOutAt"] in body["details"]
    return body


# Tests of what only SQLite has (its file, its locks, its journal) run on SQLite alone.
sqlite_only = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def wait_until(condition, timeout, what):
    """Polls `condition()` until it is true; fails the test, naming `what`, after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def service_environment(port, database_url, simulate=True, **settings):
    """A clean environment for a service process: every variable it reads is set (empty
    means unset), so no .env can fill one in; nothing is inherited but PATH.

    Live mode (`simulate=False`) gets the tests' made-up credentials, with BASE_URL on the
    service's own local port so that its callbacks can be signed for it. WEB_CONCURRENCY
    and GUNICORN_THREADS always get real values (the service's defaults unless given):
    gunicorn itself parses WEB_CONCURRENCY.
    """
    env = dict.fromkeys(VARIABLES, "")
    env.update({"PATH": os.environ.get("PATH", ""), "PORT": str(port), "LOG_LEVEL": "INFO",
                "WEB_CONCURRENCY": "2", "GUNICORN_THREADS": "64",
                "DATABASE_URL": database_url})
    if simulate:
        env["TWILIO_SIMULATE"] = "true"
    else:
        env.update({"TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
                    "TWILIO_PHONE_NUMBER": SENDER, "API_KEY": API_KEY,
                    "BASE_URL": f"http://127.0.0.1:{port}"})
    env.update({key: str(value) for key, value in settings.items()})
    return env


class CallbackLoad:
    """Threads posting distinct signed status callbacks to a service, until the block ends or
    each has posted `per_thread`; keeps the SIDs answered 200, every other answer, and each
    answer as (sid, status code, seconds).

    A thread stops at its first failed request (the service was killed, say), and answers
    that arrive once the block is ending are not counted as refusals.
    """

    def __init__(self, service, signed_url, status="delivered", threads=8, per_thread=400,
                 pause=0.0):
        self.url = service.url + "/message-status"
        self.signed_url, self.status = signed_url, status
        self.per_thread, self.pause = per_thread, pause
        self.acknowledged, self.others, self.answers = [], [], []
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._threads = [threading.Thread(target=self._post, args=(n,)) for n in range(threads)]

    def _post(self, worker):
        session = requests.Session()
        for n in range(self.per_thread):
            if self._stop.is_set():
                return
            params = callback(f"SM{worker:02x}{n:030x}", self.status)
            started = time.monotonic()
            try:
                answer = session.post(self.url, data=params, timeout=15, headers={
                    "X-Twilio-Signature": sign(self.signed_url, params)})
            except requests.RequestException:
                return
            with self._lock:
                self.answers.append((params["MessageSid"], answer.status_code,
                                     time.monotonic() - started))
                if answer.status_code == 200:
                    self.acknowledged.append(params["MessageSid"])
                elif not self._stop.is_set():
                    self.others.append(answer.status_code)
            time.sleep(self.pause)

    def wait_for(self, count, timeout=60):
        """Waits until `count` callbacks were acknowledged; fails the test after `timeout` s."""
        wait_until(lambda: len(self.acknowledged) >= count, timeout,
                   f"{count} acknowledged callbacks (got {len(self.acknowledged)}, "
                   f"other answers {self.others[:5]})")

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for thread in self._threads:
            thread.join()


def required_program(name, package, places=()):
    """The path of a program some tests need: outside CI they are skipped without it, with
    the Debian package to install; in CI (CI set), where .ci/run installs it, they fail."""
    found = shutil.which(name) or next(
        (path for path in places if os.access(path, os.X_OK)), None)
    if found is None:
        message = f"{name} is not installed (Debian: apt-get install {package})"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI needs it")
        pytest.skip(message)
    return found


def accepts_connections(port):
    """True when something listens on 127.0.0.1:port."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def procfile_command(repo=ROOT):
    """The Procfile's web command, with gunicorn taken from this Python's environment."""
    line = next(line for line in (Path(repo) / "Procfile").read_text().splitlines()
                if line.startswith("web:"))
    argv = shlex.split(line.split(":", 1)[1])
    argv[0] = str(Path(sys.executable).parent / argv[0])
    return argv


class Service:
    """The service run as the Procfile runs it (or as `argv` says), on a free local port
    (`port`, when it listens elsewhere than PORT)."""

    def __init__(self, env, log_path, argv=None, port=None, cwd=ROOT):
        self.env, self.argv, self.cwd = env, argv, cwd
        self.port = port or int(env["PORT"])
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.process = None

    def start(self, timeout=20):
        self.log = open(self.log_path, "ab")
        # its own session and process group, so a SIGKILL can reach the workers too
        self.process = subprocess.Popen(self.argv or procfile_command(), cwd=self.cwd,
                                        env=self.env, stdout=self.log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"service exited: {self.log_path.read_text()}")
            try:
                if requests.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except (requests.ConnectionError, requests.Timeout):
                pass  # not listening yet, or still starting on a busy machine
            time.sleep(0.1)
        raise RuntimeError(f"service did not start: {self.log_path.read_text()}")

    def stop(self, timeout=30):
        """SIGTERM to gunicorn's master, as a deploy or a host's shutdown sends; waits for the
        end and returns the exit status."""
        self.process.terminate()
        status = self.process.wait(timeout=timeout)
        self.log.close()
        return status

    def kill(self):
        """SIGKILLs master and workers at once, as a crash or power cut of the host would."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        self.log.close()

    def logs(self):
        return self.log_path.read_text()




WEBHOOK_SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # 24 bytes, for tests only
OTHER_WEBHOOK_SECRET = "whsec_" + "QmF0dGVyeSBzdGFwbGUgY29ycmVjdCBob3JzZQ=="


class WebhookReceiver:
    """A local HTTP server standing in for the sender's application: keeps every request it
    gets (arrival time, headers, body) and answers as told.

    `answers` is a list consumed one request at a time, each an HTTP status, "hang" (never
    answer until `release()`), "trickle" (an answer a byte at a time, never finished) or
    "redirect" (a 302 to itself); once it is empty, every
    request gets `default` (204).
    """

    def __init__(self, default=204, port=0):
        self.requests, self.answers, self.default = [], [], default
        self.connections = []  # kept alive between requests, like any HTTP/1.1 server's
        self.lock = threading.Lock()
        self.released = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()
                with receiver.lock:
                    receiver.connections.append(self.connection)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    receiver.requests.append((time.time(), dict(self.headers), body))
                    answer = receiver.answers.pop(0) if receiver.answers else receiver.default
                if answer == "hang":
                    receiver.released.wait(120)
                    return
                if answer == "trickle":  # a byte of its headers every 0.2 s, for 20 s
                    try:
                        for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"x" * 100:
                            self.wfile.write(bytes([byte]))
                            self.wfile.flush()
                            if receiver.released.wait(0.2):
                                return
                    except OSError:
                        return
                    return
                status = 302 if answer == "redirect" else answer
                self.send_response(status)
                if answer == "redirect":
                    self.send_header("Location", "/elsewhere")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            request_queue_size = 256  # every attempt of several services at once
            daemon_threads = True

        self.server = Server(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/events"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.release()
        self.server.shutdown()
        self.server.server_close()
        self.drop_connections()  # a server that stops closes its connections too

    def drop_connections(self):
        """Closes every connection kept alive, as a receiver that times idle ones out does."""
        with self.lock:
            for connection in self.connections:
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def release(self):
        self.released.set()

    def events(self):
        """[(webhook-id, the JSON body)] of every request so far, in arrival order."""
        with self.lock:
            return [(headers.get("webhook-id"), json.loads(body))
                    for _, headers, body in self.requests]


def recorded_events(app, stream=None):
    """(type, data) of every stored event (of one stream: a message's SID or a number), in
    the order they were recorded."""
    where, params = (" WHERE stream = ?", (stream,)) if stream else ("", ())
    return [(row["type"], json.loads(row["payload"])["data"]) for row in sql_rows(
        app_database_url(app), f"SELECT type, payload FROM webhook_events{where} ORDER BY seq",
        params, as_dicts=True)]


def deliver_all(app):
    """Attempts every due event once, oldest first, as the delivery loop would."""
    delivery = services(app).webhooks
    with app.app_context():
        for row in sql_rows(app_database_url(app), "SELECT id FROM webhook_events WHERE"
                            " state = 'pending' ORDER BY seq", as_dicts=True):
            delivery.deliver_now(row["id"])
