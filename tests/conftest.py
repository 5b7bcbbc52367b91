import os
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
import requests
from psycopg.rows import dict_row, tuple_row
from twilio.request_validator import RequestValidator

ROOT = Path(__file__).resolve().parent.parent

# `app.py` builds an app from the environment when imported; give that one a throwaway
# database and the simulator, so importing it never needs credentials.
os.environ.setdefault("TWILIO_SIMULATE", "true")
os.environ.setdefault("DATABASE_URL", "sqlite:///" + os.path.join(tempfile.mkdtemp(), "import.db"))
os.environ.setdefault("LOG_LEVEL", "WARNING")

from postgres import (  # noqa: E402
    PostgresServer,
    PostgresUnavailable,
    create_database,
    drop_database,
)
from sms_status import create_app  # noqa: E402
from sms_status.storage import records as db  # noqa: E402
from sms_status.storage.engines import PostgresEngine  # noqa: E402
from twilio_fakes import FakeTwilio  # noqa: E402

ACCOUNT_SID = "AC" + "a1" * 16
AUTH_TOKEN = "test-auth-token-5f2c9a"
API_KEY = "test-api-key-0123456789"
BASE_URL = "https://sms.example.com"
SENDER = "+15017122661"
CALLBACK_URL = BASE_URL + "/message-status"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


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
    return config.database_url or "sqlite:///" + config.database_path


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
    a stuck writer would; lower engines.BUSY_TIMEOUT_MS and close_all() first to wait less."""
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


def fill_postgres_messages(database_url, count, first="2026-01-01T00:00:00Z", every=4):
    """Stores `count` messages (no history) in a PostgreSQL database, migrated first, in one
    statement, one each `every` seconds from `first`: mostly delivered, some undelivered,
    failed, sent or queued. Vacuumed and analysed after, as autovacuum would."""
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


@pytest.fixture
def fake_twilio():
    return FakeTwilio(ACCOUNT_SID, AUTH_TOKEN)


# --- the two database engines ----------------------------------------------------------

@pytest.fixture(scope="session")
def postgres_admin_url():
    """A superuser URL of a PostgreSQL server: TEST_DATABASE_URL, or a throwaway server.

    Without PostgreSQL's binaries the PostgreSQL tests are skipped, except in CI (CI set),
    where that fails the run.
    """
    if os.environ.get("TEST_DATABASE_URL"):
        yield os.environ["TEST_DATABASE_URL"]
        return
    server = PostgresServer()
    try:
        server.initdb().start()
    except PostgresUnavailable as error:
        server.remove()
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is required in CI: {error}")
        pytest.skip(f"no PostgreSQL server: {error}")
    yield server.url()
    server.remove()


@pytest.fixture
def postgres_url(request):
    """A fresh, empty PostgreSQL database for one test."""
    admin_url = request.getfixturevalue("postgres_admin_url")
    url = create_database(admin_url)
    yield url
    db.close_all()
    drop_database(admin_url, url)


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request, tmp_path):
    """Every test that stores anything runs on both engines, each with a fresh database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/test.db"
    return request.getfixturevalue("postgres_url")


# Tests of what only SQLite has (its file, its locks, its journal) run on SQLite alone.
sqlite_only = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@pytest.fixture
def make_app(tmp_path, fake_twilio, database_url):
    def make(**overrides):
        overrides.setdefault("DATABASE_URL", database_url)
        return create_app(live_env(tmp_path, **overrides), http_client=fake_twilio)

    yield make
    db.close_all()


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def post_callback(client):
    """Posts a status callback signed like Twilio's for the URL Twilio would call."""

    def post(params, url=CALLBACK_URL, token=AUTH_TOKEN, path="/message-status"):
        return client.post(path, data=params,
                           headers={"X-Twilio-Signature": sign(url, params, token)})

    return post


@pytest.fixture
def send(client):
    def send_sms(to="+15558675309", body="Your code is 123456", headers=AUTH, **kwargs):
        return client.post("/send-sms", json={"to": to, "body": body}, headers=headers, **kwargs)

    return send_sms


# --- real gunicorn processes -------------------------------------------------------------

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
        """Waits until `count` callbacks were acknowledged (or `timeout` seconds passed)."""
        deadline = time.monotonic() + timeout
        while len(self.acknowledged) < count and time.monotonic() < deadline:
            time.sleep(0.005)

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for thread in self._threads:
            thread.join()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def procfile_command():
    """The Procfile's web command, with gunicorn taken from this Python's environment."""
    line = (ROOT / "Procfile").read_text().strip()
    argv = shlex.split(line.split(":", 1)[1])
    argv[0] = str(Path(sys.executable).parent / argv[0])
    return argv


class Service:
    """The service run as the Procfile runs it, on a free local port."""

    def __init__(self, env, log_path):
        self.env = env
        self.port = int(env["PORT"])
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.process = None

    def start(self, timeout=20):
        self.log = open(self.log_path, "ab")
        # its own session and process group, so a SIGKILL can reach the workers too
        self.process = subprocess.Popen(procfile_command(), cwd=ROOT, env=self.env,
                                        stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"service exited: {self.log_path.read_text()}")
            try:
                if requests.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"service did not start: {self.log_path.read_text()}")

    def kill(self):
        """SIGKILLs master and workers at once, as a crash or power cut of the host would."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        self.log.close()

    def logs(self):
        return self.log_path.read_text()


# Every variable the service reads. A service process gets each of them explicitly (empty
# means unset), so a developer's .env in the repository cannot leak into a test. PORT,
# WEB_CONCURRENCY and GUNICORN_THREADS are always given real values (gunicorn itself parses
# WEB_CONCURRENCY).
SERVICE_VARIABLES = [
    "TWILIO_SIMULATE", "TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN", "TWILIO_PHONE_NUMBER",
    "TWILIO_MESSAGING_SERVICE_SID", "BASE_URL", "API_KEY", "DATABASE_URL", "TWILIO_TIMEOUT",
    "STORE_MESSAGE_BODY", "LOG_LEVEL", "SQLITE_SYNCHRONOUS", "ALLOWED_DESTINATIONS",
    "MAX_SENDS_PER_RECIPIENT_PER_HOUR", "MAX_SENDS_PER_HOUR", "TWILIO_WEBHOOK_SIGNING_KEY",
    "BODY_RETENTION",
    "TWILIO_SIMULATE_LATENCY_MS", "DATABASE_POOL_SIZE", "REQUEST_READ_TIMEOUT",
]


@pytest.fixture
def service_env(tmp_path, database_url):
    """A clean environment for a service process (nothing inherited but PATH).

    Its TMPDIR, where the writer process's socket lives, is removed after the test: a
    service killed with SIGKILL leaves its socket behind.
    """
    temporary = tempfile.mkdtemp(prefix="service-")

    def make(simulate=True, **overrides):
        port = free_port()
        env = dict.fromkeys(SERVICE_VARIABLES, "")
        env.update({"PATH": os.environ.get("PATH", ""), "PORT": str(port), "LOG_LEVEL": "INFO",
                    "WEB_CONCURRENCY": "2", "GUNICORN_THREADS": "32", "TMPDIR": temporary})
        if simulate:
            env["TWILIO_SIMULATE"] = "true"
        else:
            env.update(live_env(tmp_path))
        env["DATABASE_URL"] = database_url
        env.update({key: str(value) for key, value in overrides.items()})
        return env

    yield make
    shutil.rmtree(temporary, ignore_errors=True)


@pytest.fixture
def start_service(tmp_path):
    services = []

    def start(env):
        service = Service(env, tmp_path / f"service-{len(services)}.log")
        services.append(service)
        return service.start()

    yield start
    for service in services:
        if service.process and service.process.poll() is None:
            service.kill()
