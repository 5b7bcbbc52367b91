"""The tests' fixtures; the helpers they are built from are in support.py."""

import itertools
import os
import shutil
import tempfile

import pytest

from postgres import PostgresServer, PostgresUnavailable, create_database, drop_database
from sms_status import create_app
from sms_status.logs import configure_logging
from sms_status.services import get_db, services
from sms_status.storage import statuses, times
from support import (
    ACCOUNT_SID,
    AUTH,
    AUTH_TOKEN,
    CALLBACK_URL,
    NOW,
    WEBHOOK_SECRET,
    Service,
    WebhookReceiver,
    free_port,
    live_env,
    service_environment,
    sign,
)
from twilio_fakes import FakeTwilio


@pytest.fixture(scope="session", autouse=True)
def service_logger():
    """Sets the service's logger up before the first test: caplog reaches a logger that does
    not propagate only if it exists when the test starts, so a test that builds the first
    app of the run would otherwise see none of its lines."""
    configure_logging("INFO")


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
    drop_database(admin_url, url)


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request, tmp_path):
    """Every test that stores anything runs on both engines, each with a fresh database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/test.db"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def make_app(tmp_path, fake_twilio, database_url):
    """make(**variables): the app, live, on the test's database, with Twilio's HTTP API
    replaced by `fake_twilio` (or `http_client`); `clock` and `storage_settings` go to
    create_app. Each app's health monitor is stopped and its database connections closed
    after the test."""
    apps = []

    def make(http_client=None, clock=None, storage_settings=None, **variables):
        variables.setdefault("DATABASE_URL", database_url)
        extra = {"clock": clock} if clock else {}
        apps.append(create_app(live_env(tmp_path, **variables),
                               http_client=http_client or fake_twilio,
                               storage_settings=storage_settings, **extra))
        return apps[-1]

    yield make
    for app in apps:
        services(app).health.stop()
        services(app).storage.close()


@pytest.fixture
def clock():
    """The time the app of a module marked `fixed_clock` reads, as {"now": seconds}: NOW
    until a test moves it."""
    return {"now": NOW}


@pytest.fixture
def app(request, make_app):
    """The app, live; in a module marked `fixed_clock`, its clock is the `clock` fixture."""
    if request.node.get_closest_marker("fixed_clock") is None:
        return make_app()
    clock = request.getfixturevalue("clock")
    return make_app(clock=lambda: clock["now"])


_sids = itertools.count(1)


@pytest.fixture
def store(app):
    """Stores a message through the service's own storage, with explicit event times.

    store(created, ("sent", 5), ("undelivered", 10, 30003), to=...) creates it `created`
    seconds before NOW as queued, then adds each (status, seconds after creation[, code]).
    """

    def add(created, *events, to="+15558675309", sid=None):
        sid = sid or f"SM{next(_sids):032x}"
        with app.app_context():
            conn = get_db()
            statuses.record_status(conn, sid, "queued", to=to, from_="+15551234567",
                             at=times.stored_time(NOW - created))
            for status, after, *code in events:
                statuses.record_status(conn, sid, status, code[0] if code else None,
                                 at=times.stored_time(NOW - created + after))
        return sid

    return add


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


# --- status webhooks ----------------------------------------------------------------------

@pytest.fixture
def receiver():
    """A local receiver of status webhooks (support.WebhookReceiver), stopped after the test."""
    with WebhookReceiver() as receiver:
        yield receiver


@pytest.fixture
def webhook_app(make_app, receiver):
    """The app with status webhooks on, sent to `receiver`: retried after a minute, twice."""
    return make_app(STATUS_WEBHOOK_URL=receiver.url, STATUS_WEBHOOK_SECRET=WEBHOOK_SECRET,
                    STATUS_WEBHOOK_RETRY_SCHEDULE="60,60", STATUS_WEBHOOK_TIMEOUT="2")


@pytest.fixture
def webhook_client(webhook_app):
    return webhook_app.test_client()


# --- real gunicorn processes -------------------------------------------------------------

@pytest.fixture
def service_env(database_url):
    """make(simulate=True, **settings): a clean environment for a service process on a free
    port (support.service_environment), with a TMPDIR of its own for the writer's socket,
    removed after the test: a service killed with SIGKILL leaves its socket behind."""
    temporary = tempfile.mkdtemp(prefix="service-")

    def make(simulate=True, **settings):
        settings.setdefault("TMPDIR", temporary)
        settings.setdefault("GUNICORN_THREADS", 32)
        return service_environment(free_port(), database_url, simulate, **settings)

    yield make
    shutil.rmtree(temporary, ignore_errors=True)


@pytest.fixture
def start_service(tmp_path):
    services = []

    def start(env, **options):
        service = Service(env, tmp_path / f"service-{len(services)}.log", **options)
        services.append(service)
        return service.start()

    yield start
    for service in services:
        if service.process and service.process.poll() is None:
            service.kill()
