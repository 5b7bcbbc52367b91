"""Named API keys: the keys commands, each route's scope, revocation, API_KEY as a key with
every scope, and what is stored and logged of a key (its digest only, never the key)."""

import hashlib
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from sms_status import api_keys
from sms_status.services import services
from sms_status.storage import keys, sends
from support import (
    API_KEY,
    AUTH,
    NOW,
    ROOT,
    app_database_url,
    sql_rows,
    sqlite_only,
)

# Every route behind a key, with the scope it needs.
ROUTES = [
    ("POST", "/send-sms", "send"),
    ("GET", "/get-status/SM0123", "read"),
    ("GET", "/messages", "read"),
    ("GET", "/stats", "read"),
    ("GET", "/webhook-events", "read"),
    ("GET", "/metrics", "read"),
    ("POST", "/webhook-events/evt_0123/retry", "admin"),
    ("GET", "/inbound-messages", "read"),
    ("GET", "/opt-outs", "read"),
    ("GET", "/opt-outs/%2B15558675309", "read"),
    ("PUT", "/opt-outs/%2B15558675309", "admin"),
    ("DELETE", "/opt-outs/%2B15558675309", "admin"),
]
KEY_TEXT = re.compile(r"sk_[A-Za-z0-9_-]{32,}")


def run(app, *args):
    return app.test_cli_runner().invoke(args=list(args))


def create_key(app, name, *options):
    """Creates a key with the real command; returns its text, from the line it is on."""
    result = run(app, "keys", "create", name, *options)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    key_lines = [line for line in lines if KEY_TEXT.fullmatch(line)]
    assert len(key_lines) == 1, result.output
    assert "will not be shown again" in lines[lines.index(key_lines[0]) + 1]
    return key_lines[0]


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


def call(client, method, path, key):
    if method == "POST" and path == "/send-sms":
        return client.post(path, json={"to": "+15558675309", "body": "Hi"}, headers=bearer(key))
    return client.open(path, method=method, headers=bearer(key))


def test_each_scope_opens_its_routes_and_no_other(app, client):
    keys = {scope: create_key(app, f"only-{scope}", "--scope", scope)
            for scope in api_keys.SCOPES}
    for method, path, needed in ROUTES:
        for scope, key in keys.items():
            answer = call(client, method, path, key)
            if scope == needed:
                assert answer.status_code not in (401, 403), (method, path, answer.get_json())
            else:
                assert answer.status_code == 403, (method, path, scope)
                body = answer.get_json()
                assert body["requiredScope"] == needed
                assert f"only-{scope}" in body["error"] and needed in body["error"]
        assert call(client, method, path, API_KEY).status_code not in (401, 403), \
            "API_KEY has every scope"


def test_the_default_scopes_are_send_and_read(app, client):
    key = create_key(app, "app-server")
    assert call(client, "POST", "/send-sms", key).status_code == 200
    assert call(client, "GET", "/messages", key).status_code == 200
    refused = call(client, "POST", "/webhook-events/evt_0123/retry", key)
    assert refused.status_code == 403 and refused.get_json()["requiredScope"] == "admin"


@pytest.mark.parametrize("header", [
    pytest.param("Bearer sk_" + "x" * 43, id="unknown-key"),
    pytest.param("Bearer ", id="empty"),
    pytest.param("Basic c2s6eA==", id="other-scheme"),
    pytest.param(None, id="missing"),
])
def test_a_wrong_or_missing_key_gets_401_on_every_route(client, header):
    for method, path, _ in ROUTES:
        answer = client.open(path, method=method,
                             headers={"Authorization": header} if header else {})
        assert answer.status_code == 401, (method, path)
        assert answer.headers["WWW-Authenticate"] == "Bearer"
        assert "Authorization: Bearer" in answer.get_json()["error"]


def fresh_ring(app, clock):
    """The app's key ring again, on a monotonic clock the test moves."""
    ring = api_keys.KeyRing(API_KEY, monotonic=lambda: clock["seconds"])
    services(app).keys = ring
    return ring


def test_a_revoked_key_gets_401_once_the_copies_of_it_are_older_than_the_cache(app, client):
    clock = {"seconds": 1000.0}
    fresh_ring(app, clock)
    key = create_key(app, "to-revoke", "--scope", "read")
    assert call(client, "GET", "/messages", key).status_code == 200
    result = run(app, "keys", "revoke", "to-revoke")
    assert result.exit_code == 0, result.output
    assert "Revoked key 'to-revoke'" in result.output
    clock["seconds"] += api_keys.CACHE_SECONDS
    answer = call(client, "GET", "/messages", key)
    assert answer.status_code == 401 and "revoked" in answer.get_json()["error"]
    again = run(app, "keys", "revoke", "to-revoke")
    assert again.exit_code == 0 and "revoked already" in again.output


def test_a_key_refused_once_works_as_soon_as_it_is_created_since_a_miss_is_never_kept(
        app, client):
    clock = {"seconds": 1000.0}
    fresh_ring(app, clock)
    text = api_keys.new_key()
    assert call(client, "GET", "/messages", text).status_code == 401
    with app.app_context():
        keys.create_key(services(app).storage, "late", api_keys.digest(text), "read", None,
                        "2026-11-26T20:00:00.000Z")
    assert call(client, "GET", "/messages", text).status_code == 200, \
        "no wait for a key created after a refusal, on the same clock"


def test_keys_list_shows_each_key_and_its_state_never_a_key_or_a_digest(app, client):
    first = create_key(app, "app-server", "--max-sends-per-hour", "500")
    second = create_key(app, "grafana", "--scope", "read")
    call(client, "GET", "/messages", second)
    run(app, "keys", "revoke", "app-server")
    result = run(app, "keys", "list")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[1].split() == ["name", "scopes", "sends/hour", "created", "last", "used",
                                "state"]
    assert lines[2].split()[:5] == ["API_KEY", "send,read,admin", "-", "-", "-"]
    app_server, grafana = lines[3].split(), lines[4].split()
    assert app_server[:3] == ["app-server", "send,read", "500"]
    assert app_server[4] == "never" and app_server[5] == "revoked"
    assert grafana[:3] == ["grafana", "read", "-"] and grafana[5] == "active"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", grafana[4]), "last used"
    for secret in (first, second, API_KEY):
        assert secret not in result.output
        assert api_keys.digest(secret) not in result.output


@pytest.mark.parametrize("args, exit_code, words", [
    pytest.param(["create", "dup"], 1, "a key named 'dup' exists already", id="duplicate"),
    pytest.param(["create", "x", "--scope", "write"], 2, "'send', 'read', 'admin'",
                 id="unknown-scope"),
    pytest.param(["create", "has space"], 2, "1 to 64 letters, digits, '-' and '_'",
                 id="bad-name"),
    pytest.param(["create", "x" * 65], 2, "1 to 64 letters", id="long-name"),
    pytest.param(["create", "API_KEY"], 2, "choose another name", id="setting-name"),
    pytest.param(["create", "x", "--max-sends-per-hour", "0"], 2, "--max-sends-per-hour",
                 id="zero-limit"),
    pytest.param(["revoke", "nobody"], 1, "no key is named 'nobody'", id="unknown-revoke"),
    pytest.param(["revoke", "API_KEY"], 1, "change the setting", id="revoke-setting"),
])
def test_bad_keys_commands_exit_non_zero_saying_what_to_fix(app, args, exit_code, words):
    create_key(app, "dup")
    result = run(app, "keys", *args)
    assert result.exit_code == exit_code, result.output
    assert words in result.output and "Traceback" not in result.output
    assert sql_rows(app_database_url(app), "SELECT name FROM api_keys") == [("dup",)]


def write_count(client, operation):
    """How many writes of this storage function this process made, from GET /metrics."""
    text = client.get("/metrics", headers=AUTH).get_data(as_text=True)
    found = re.search(r'sms_status_database_write_duration_seconds_count\{operation="'
                      + operation + r'"\} ([0-9.e+]+)', text)
    return float(found.group(1)) if found else 0.0


@pytest.mark.fixed_clock
def test_last_used_is_written_at_most_once_a_minute(make_app, clock):
    app = make_app(clock=lambda: clock["now"])
    client = app.test_client()
    key = create_key(app, "reader", "--scope", "read")

    def last_used():
        return sql_rows(app_database_url(app), "SELECT last_used_at FROM api_keys")[0][0]

    writes = write_count(client, "mark_used")
    for _ in range(5):
        assert call(client, "GET", "/stats", key).status_code == 200
    assert last_used() == "2026-11-26T20:00:00.000Z"
    clock["now"] = NOW + 59
    for _ in range(5):
        call(client, "GET", "/stats", key)
    assert last_used() == "2026-11-26T20:00:00.000Z"
    assert write_count(client, "mark_used") == writes + 1, "one write in the minute"
    clock["now"] = NOW + 61
    call(client, "GET", "/stats", key)
    assert last_used() == "2026-11-26T20:01:01.000Z"


def test_of_two_processes_marking_a_key_used_in_one_minute_one_write_lands(app):
    """Each process knows only its own marks: the write itself keeps to one a minute."""
    create_key(app, "reader", "--scope", "read")
    with app.app_context():
        storage = services(app).storage
        keys.mark_used(storage, "reader", "2026-11-26T20:00:00.000Z", "2026-11-26T19:59:00.000Z")
        keys.mark_used(storage, "reader", "2026-11-26T20:00:30.000Z", "2026-11-26T19:59:30.000Z")
        assert keys.key_by_name(storage, "reader")["last_used_at"] == "2026-11-26T20:00:00.000Z"
        keys.mark_used(storage, "reader", "2026-11-26T20:01:01.000Z", "2026-11-26T20:00:01.000Z")
        assert keys.key_by_name(storage, "reader")["last_used_at"] == "2026-11-26T20:01:01.000Z"


def test_only_the_digest_is_stored_and_neither_the_database_nor_the_log_holds_a_key(
        app, client, caplog):
    key = create_key(app, "app-server", "--scope", "send", "--scope", "read")
    assert call(client, "POST", "/send-sms", key).status_code == 200
    call(client, "GET", "/webhook-events/evt_0123/retry", key)
    call(client, "GET", "/messages", key + "x")
    stored = sql_rows(app_database_url(app), "SELECT * FROM api_keys", as_dicts=True)
    assert stored[0]["digest"] == hashlib.sha256(key.encode()).hexdigest()
    everything = "\n".join(str(row) for table in ("api_keys", "messages", "send_reservations",
                                                  "idempotency_keys")
                           for row in sql_rows(app_database_url(app), f"SELECT * FROM {table}"))
    assert key not in everything and API_KEY not in everything
    assert key[3:20] not in caplog.text and API_KEY not in caplog.text


@sqlite_only
def test_the_database_files_never_hold_a_key(app, client, tmp_path):
    key = create_key(app, "app-server")
    for _ in range(3):
        call(client, "POST", "/send-sms", key)
    for path in tmp_path.glob("test.db*"):
        data = path.read_bytes()
        assert key.encode() not in data and key[3:20].encode() not in data, path
        assert API_KEY.encode() not in data, path


# --- who sent what ---------------------------------------------------------------------------

def send_with(client, key, to="+15558675309", reference=None):
    answer = client.post("/send-sms", json={"to": to, "body": "Hi", "reference": reference},
                         headers=bearer(key))
    assert answer.status_code == 200, answer.get_json()
    return answer.get_json()["messageSid"]


def test_each_message_says_which_key_sent_it_and_messages_are_found_by_it(app, client):
    alerts = create_key(app, "alerts")
    billing = create_key(app, "billing_2")
    sent = {"alerts": [send_with(client, alerts), send_with(client, alerts)],
            "billing_2": [send_with(client, billing)], "API_KEY": [send_with(client, API_KEY)]}
    run(app, "keys", "revoke", "alerts")
    for name, sids in sent.items():
        found = client.get(f"/messages?sentBy={name}", headers=AUTH).get_json()["messages"]
        assert [message["sid"] for message in found] == sids[::-1]
        assert {message["sentBy"] for message in found} == {name}
        for sid in sids:
            assert client.get(f"/get-status/{sid}", headers=AUTH).get_json()["sentBy"] == name
    both = client.get("/messages?sentBy=alerts&status=queued", headers=AUTH).get_json()
    assert [message["sid"] for message in both["messages"]] == sent["alerts"][::-1]
    assert client.get("/messages?sentBy=nobody", headers=AUTH).get_json()["messages"] == []


@pytest.mark.parametrize("value", ["has space", "x" * 65, "", "API_KEY'--"])
def test_a_malformed_sent_by_filter_is_refused_saying_what_a_name_is(client, value):
    answer = client.get("/messages", query_string={"sentBy": value}, headers=AUTH)
    assert answer.status_code == 400
    assert "Parameter 'sentBy' must be the name of a key" in answer.get_json()["error"]


@pytest.mark.fixed_clock
def test_a_keys_own_limit_answers_429_until_its_first_send_is_an_hour_old(make_app, clock):
    app = make_app(clock=lambda: clock["now"])
    client = app.test_client()
    key = create_key(app, "capped", "--max-sends-per-hour", "2")
    with app.app_context():  # a send of this key in flight: its place is taken, not settled
        sends.reserve_send(services(app).storage, "+15558670001", NOW, 0, 0, sender="capped",
                           sender_limit=2)
    clock["now"] = NOW + 600
    send_with(client, key, to="+15558670002")
    clock["now"] = NOW + 900
    refused = client.post("/send-sms", json={"to": "+15558670003", "body": "Hi"},
                          headers=bearer(key))
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "2700"
    assert refused.get_json()["success"] is False
    assert "'capped' already has 2 messages" in refused.get_json()["error"]
    send_with(client, API_KEY, to="+15558670003")
    clock["now"] = NOW + 3601
    send_with(client, key, to="+15558670003")


def test_a_keys_own_limit_comes_on_top_of_the_services_limits(make_app):
    app = make_app(MAX_SENDS_PER_RECIPIENT_PER_HOUR="2")
    client = app.test_client()
    key = create_key(app, "generous", "--max-sends-per-hour", "100")
    send_with(client, key)
    send_with(client, key)
    refused = client.post("/send-sms", json={"to": "+15558675309", "body": "Hi"},
                          headers=bearer(key))
    assert refused.status_code == 429
    assert "MAX_SENDS_PER_RECIPIENT_PER_HOUR=2" in refused.get_json()["error"]


# --- under gunicorn: two workers, and two instances on one PostgreSQL -----------------------

def flask_command(cwd, env, *args):
    """`flask --app app ...` run as an operator runs it, beside the service, with its env."""
    flask = str(Path(sys.executable).parent / "flask")
    return subprocess.run([flask, "--app", str(ROOT / "app.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def created_key(cwd, env, *args):
    result = flask_command(cwd, env, "keys", "create", *args)
    assert result.returncode == 0, result.stderr
    return next(line for line in result.stdout.splitlines() if KEY_TEXT.fullmatch(line))


def answers_from_every_worker(urls, method, path, key, requests_each=24, json=None):
    """The status codes of `requests_each` requests to each service, from 8 threads at once,
    each on a new connection, so that every worker of every service takes some."""
    def one(url):
        answer = requests.request(method, url + path, json=json, timeout=30,
                                  headers=bearer(key))
        return answer

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, [url for url in urls for _ in range(requests_each)]))


@pytest.fixture
def services_on_one_database(service_env, start_service, database_url):
    """start(**settings): the service under gunicorn with 2 workers; on PostgreSQL, a
    second instance of it on the same database (SQLite's file is one machine's)."""

    def start(**settings):
        env = service_env(API_KEY=API_KEY, GUNICORN_THREADS=8, **settings)
        started = [start_service(env)]
        if database_url.startswith("postgres"):
            started.append(start_service(service_env(API_KEY=API_KEY, GUNICORN_THREADS=8,
                                                     **settings)))
        return env, started

    return start


def test_a_revocation_is_seen_by_every_worker_and_instance_within_a_second(
        services_on_one_database, tmp_path):
    env, started = services_on_one_database()
    urls = [service.url for service in started]
    key = created_key(tmp_path, env, "rotating", "--scope", "read")
    before = answers_from_every_worker(urls, "GET", "/messages", key)
    assert [answer.status_code for answer in before] == [200] * len(before)
    for method, path, needed in (("POST", "/send-sms", "send"),
                                 ("POST", "/webhook-events/evt_0123/retry", "admin")):
        refused = answers_from_every_worker(urls, method, path, key, requests_each=4,
                                            json={"to": "+15558675309", "body": "Hi"})
        assert {(answer.status_code, answer.json()["requiredScope"])
                for answer in refused} == {(403, needed)}
    revoked = flask_command(tmp_path, env, "keys", "revoke", "rotating")
    assert revoked.returncode == 0, revoked.stderr
    time.sleep(1.0)  # the contract's bound, no restart
    after = answers_from_every_worker(urls, "GET", "/messages", key)
    assert [answer.status_code for answer in after] == [401] * len(after)
    assert all(answer.json()["error"].startswith("Missing, wrong or revoked") for answer in after)
    for service in started:
        assert key[3:20] not in service.logs() and API_KEY not in service.logs()


def test_a_keys_hourly_limit_holds_across_workers_and_instances(
        services_on_one_database, tmp_path):
    # Without the service-wide limit, whose lock would serialise every send anyway.
    env, started = services_on_one_database(MAX_SENDS_PER_HOUR=0)
    urls = [service.url for service in started]
    key = created_key(tmp_path, env, "batch", "--scope", "send", "--max-sends-per-hour", "3")
    numbers = iter(range(100))

    def send(url):
        return requests.post(url + "/send-sms", headers=bearer(key), timeout=30,
                             json={"to": f"+1555867{next(numbers):04d}", "body": "Hi"})

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, [url for url in urls for _ in range(8)]))
    codes = sorted(answer.status_code for answer in answers)
    assert codes == [200] * 3 + [429] * (len(answers) - 3)
    for answer in answers:
        if answer.status_code == 429:
            assert 3500 <= int(answer.headers["Retry-After"]) <= 3602  # read before the lock
            assert "'batch' already has 3 messages" in answer.json()["error"]
    other = requests.post(urls[0] + "/send-sms", headers=AUTH, timeout=30,
                          json={"to": "+15558670999", "body": "Hi"})
    assert other.status_code == 200, "another key's sends are not counted"
    assert sql_rows(env["DATABASE_URL"], "SELECT sent_by, count(*) FROM messages"
                    " GROUP BY sent_by ORDER BY sent_by") == [("API_KEY", 1), ("batch", 3)]


def test_a_refusal_for_a_missing_scope_masks_the_number_in_its_log_line(app, client,
                                                                        caplog):
    key = create_key(app, "reader", "--scope", "read")
    assert call(client, "PUT", "/opt-outs/+15558675309", key).status_code == 403
    assert "has no 'admin' scope" in caplog.text
    assert "+15558675309" not in caplog.text and "8675309" not in caplog.text


@pytest.mark.parametrize("text", ["wrong-key-wrong-key", "sk_" + "x" * 42, "pk_" + "x" * 43])
def test_text_no_keys_create_could_make_is_refused_without_reading_the_database(text):
    """A flood of made-up keys costs no query: only text of a named key's shape is looked up
    (here the storage is None, so a lookup would fail)."""
    ring = api_keys.KeyRing(setting_key="the-api-key-setting")
    assert ring.key_for(None, text, NOW) is None
    assert len(api_keys.new_key()) == len("sk_" + "x" * 43)
    with pytest.raises(AttributeError):
        ring.key_for(None, "sk_" + "x" * 43, NOW)  # the right shape is looked up
