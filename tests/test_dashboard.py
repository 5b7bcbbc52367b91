"""The dashboard's pages through Flask's test client: signing in and its cookie, the numbers
against GET /stats and GET /messages, escaping, and errors as pages.
(tests/test_dashboard_browser.py drives the same pages in Chromium against gunicorn.)"""

import base64
import hashlib
import html
import itertools
import json
import re
import time
from datetime import datetime, timezone
from urllib.parse import parse_qs, quote, urlsplit

import pytest
from itsdangerous import URLSafeTimedSerializer

from sms_status import overview, rules
from sms_status.services import get_db, services
from sms_status.storage import times
from sms_status.web import chart, dashboard
from support import (
    API_KEY,
    AUTH,
    CALLBACK_URL,
    NOW,
    WEBHOOK_SECRET,
    WebhookReceiver,
    callback,
    fill_messages,
    reply,
    sign,
    sqlite_only,
)

pytestmark = pytest.mark.fixed_clock
OTHER_KEY = "another-api-key-9876543210"
PAGES = ("/dashboard", "/dashboard?window=7d", "/dashboard/messages", "/dashboard/inbound",
         "/dashboard/opt-outs", "/dashboard/opt-outs?number=%2B15558675309",
         "/dashboard/messages?to=%2B15558675309", "/dashboard/messages/SM123")


def log_in(client, key=API_KEY, **headers):
    return client.post("/dashboard/login", data={"api_key": key}, headers=headers)


@pytest.fixture
def signed_in(client):
    assert log_in(client).status_code == 303
    return client


def attributes(page, element, *names):
    """The named attributes of every `element` tag in the page that has all of them."""
    found = []
    for tag in re.findall(rf"<{element}\b[^>]*>", page):
        values = dict(re.findall(r'([\w-]+)="([^"]*)"', tag))
        if all(name in values for name in names):
            found.append(tuple(html.unescape(values[name]) for name in names))
    return found


def problem(page):
    """The text of the page's problem message."""
    found = re.search(r'<p class="problem"[^>]*>(.*?)</p>', page, re.S)
    return html.unescape(found.group(1)) if found else None


def session_cookie(client):
    cookie = client.get_cookie(dashboard.SESSION_COOKIE, path="/dashboard")
    return cookie.value if cookie else None


# --- signing in ---------------------------------------------------------------------------

@pytest.mark.parametrize("path", PAGES)
def test_pages_without_a_session_answer_303_to_the_login_and_open_after_it(client, path):
    response = client.get(path)
    assert response.status_code == 303
    login = urlsplit(response.headers["Location"])
    assert login.path == "/dashboard/login"
    if path == "/dashboard":
        assert not login.query
    else:
        assert parse_qs(login.query) == {"next": [path]}
    form = client.get(response.headers["Location"]).text
    carried = dict(attributes(form, "input", "name", "value")).get("next")
    assert carried == (None if path == "/dashboard" else path)
    answer = client.post("/dashboard/login", data={"api_key": API_KEY, "next": carried or ""})
    assert answer.status_code == 303 and answer.headers["Location"] == path


def test_the_page_asked_for_is_kept_through_a_wrong_key(client):
    wanted = "/dashboard/messages?to=%2B15558675309"
    response = client.post("/dashboard/login", data={"api_key": "wrong-key-but-long-enough",
                                                     "next": wanted})
    assert response.status_code == 401
    assert dict(attributes(response.text, "input", "name", "value"))["next"] == wanted
    assert client.get(f"/dashboard/login?next={quote(wanted)}").status_code == 200
    assert log_in(client).headers["Location"] == "/dashboard"
    # Signed in, the login form sends the browser straight on.
    assert client.get(f"/dashboard/login?next={quote(wanted)}").headers["Location"] == wanted


@pytest.mark.parametrize("wanted", [
    pytest.param("https://attacker.example/dashboard/messages", id="absolute-url"),
    pytest.param("//attacker.example/dashboard/messages", id="scheme-relative"),
    pytest.param("///attacker.example/dashboard", id="three-slashes"),
    pytest.param("/\\attacker.example/dashboard", id="backslashes"),
    pytest.param("\\/attacker.example", id="backslash-slash"),
    pytest.param("/\t/attacker.example", id="tab-between-slashes"),
    pytest.param(" //attacker.example", id="leading-space"),
    pytest.param("javascript:alert(1)//dashboard/", id="javascript-scheme"),
    pytest.param("https:/dashboard/messages", id="scheme-and-path"),
    pytest.param("/dashboard/../stats", id="dot-dot"),
    pytest.param("/dashboard/messages/../../x", id="dot-dot-deeper"),
    pytest.param("/dashboard/./messages", id="dot"),
    pytest.param("/dashboard/%2e%2e/stats", id="encoded-dots"),
    pytest.param("/dashboard/%2F%2Fattacker.example", id="encoded-slashes"),
    pytest.param("/dashboard/%5C%5Cattacker.example", id="encoded-backslashes"),
    pytest.param("/dashboard/messages%2F..%2F..%2Fstats", id="encoded-slash-dots"),
    pytest.param("/dashboard//attacker.example", id="double-slash-inside"),
    pytest.param("/dashboard/messages?to=\\attacker", id="backslash-in-query"),
    pytest.param("/dashboard/messages\r\nSet-Cookie: x=1", id="header-injection"),
    pytest.param("/dashboard/messages/\uff0f\uff0fattacker.example", id="fullwidth-slashes"),
    pytest.param("/dashboardx", id="prefix-of-another-path"),
    pytest.param("/stats", id="outside-the-dashboard"),
    pytest.param("/dashboard/login", id="the-login-itself"),
    pytest.param("/dashboard/messages?to=" + "1" * 2000, id="too-long"),
    pytest.param("", id="empty"),
])
def test_the_login_opens_only_pages_of_the_dashboard(client, wanted):
    form = client.get("/dashboard/login", query_string={"next": wanted}).text
    assert "next" not in dict(attributes(form, "input", "name", "value"))
    response = client.post("/dashboard/login", data={"api_key": API_KEY, "next": wanted})
    assert response.status_code == 303 and response.headers["Location"] == "/dashboard"


def test_the_login_form_posts_api_key_and_the_pages_send_a_strict_policy(client):
    response = client.get("/dashboard/login")
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.status_code == 200 and response.mimetype == "text/html"
    assert attributes(response.text, "form", "method", "action") == [("post",
                                                                      "/dashboard/login")]
    assert ("api_key", "password") in attributes(response.text, "input", "name", "type")
    policy = response.headers["Content-Security-Policy"]
    assert "default-src 'self'" in policy and "unsafe-inline" not in policy
    assert "<script" not in response.text and "style=" not in response.text
    assert 'name="viewport"' in response.text


def test_a_wrong_key_is_told_on_the_form_and_logged_without_the_key(client, caplog):
    response = log_in(client, "wrong-key-but-long-enough")
    assert response.status_code == 401 and response.mimetype == "text/html"
    assert "not an active key of this service" in problem(response.text)
    assert session_cookie(client) is None
    assert client.get("/dashboard").status_code == 303
    assert "Refused dashboard login: wrong or revoked API key" in caplog.text
    assert "wrong-key-but-long-enough" not in caplog.text


def test_an_empty_key_is_asked_for(client):
    response = client.post("/dashboard/login", data={})
    assert response.status_code == 400 and "Enter an API key with the read scope" in problem(
        response.text)


def test_failed_logins_are_logged_within_the_refusals_budget(client, caplog):
    """Like every refusal: answered each time, logged up to the per-process budget of
    refusal warnings a minute (logs.LogBudget), the rest counted."""
    for _ in range(40):
        assert log_in(client, "wrong-key-but-long-enough").status_code == 401
    lines = [r for r in caplog.records if "Refused dashboard login" in r.getMessage()]
    assert len(lines) == 30


def test_login_sets_a_signed_httponly_strict_cookie_for_12_hours(client):
    response = log_in(client)
    assert response.status_code == 303 and response.headers["Location"] == "/dashboard"
    cookie = response.headers["Set-Cookie"]
    assert cookie.startswith(f"{dashboard.SESSION_COOKIE}=")
    for attribute in ("HttpOnly", "SameSite=Strict", "Secure", "Path=/dashboard"):
        assert attribute in cookie.split("; "), cookie
    expires = datetime.strptime(re.search(r"Expires=([^;]+)", cookie).group(1),
                                "%a, %d %b %Y %H:%M:%S GMT").replace(tzinfo=timezone.utc)
    assert abs((expires - datetime.now(timezone.utc)).total_seconds() - 12 * 3600) < 60
    value = session_cookie(client)
    payload = value.split(".")[0]
    assert API_KEY not in base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)).decode()
    assert client.get("/dashboard").status_code == 200


def test_the_cookie_is_not_secure_when_base_url_is_http(make_app):
    client = make_app(BASE_URL="http://127.0.0.1:3000").test_client()
    cookie = log_in(client).headers["Set-Cookie"]
    assert "Secure" not in cookie.split("; ") and "SameSite=Strict" in cookie


def test_a_session_from_before_an_api_key_change_is_refused(make_app):
    before = make_app().test_client()
    log_in(before)
    cookie = session_cookie(before)
    after = make_app(API_KEY=OTHER_KEY).test_client()
    after.set_cookie(dashboard.SESSION_COOKIE, cookie, path="/dashboard")
    assert after.get("/dashboard").status_code == 303
    # The same cookie still works with the key it was made under.
    again = make_app().test_client()
    again.set_cookie(dashboard.SESSION_COOKIE, cookie, path="/dashboard")
    assert again.get("/dashboard").status_code == 200


def forged(secret, payload):
    """A cookie signed as Flask signs its session, with `secret`."""
    return URLSafeTimedSerializer(secret, salt="cookie-session", signer_kwargs={
        "key_derivation": "hmac", "digest_method": hashlib.sha1}).dumps(payload)


@pytest.mark.parametrize("make_cookie", [
    pytest.param(lambda real: forged("guessed-secret", {"signed_in_at": NOW}),
                 id="other-secret"),
    pytest.param(lambda real: forged(API_KEY, {"signed_in_at": NOW}), id="key-as-secret"),
    pytest.param(lambda real: real[:-3] + ("AAA" if not real.endswith("AAA") else "BBB"),
                 id="tampered-signature"),
    pytest.param(lambda real: base64.urlsafe_b64encode(
        json.dumps({"signed_in_at": NOW}).encode()).decode(), id="unsigned"),
    pytest.param(lambda real: "", id="empty"),
])
def test_a_forged_cookie_is_refused(client, make_cookie):
    log_in(client)
    real = session_cookie(client)
    client.set_cookie(dashboard.SESSION_COOKIE, make_cookie(real), path="/dashboard")
    assert client.get("/dashboard").status_code == 303


def test_a_session_ends_12_hours_after_the_login(signed_in, clock):
    clock["now"] += 12 * 3600 - 1
    assert signed_in.get("/dashboard").status_code == 200
    clock["now"] += 2
    assert signed_in.get("/dashboard").status_code == 303


def test_logout_ends_the_session(signed_in):
    response = signed_in.post("/dashboard/logout")
    assert response.status_code == 303 and response.headers["Location"] == "/dashboard/login"
    assert session_cookie(signed_in) is None
    assert signed_in.get("/dashboard").status_code == 303


@pytest.mark.parametrize("path", ["/dashboard/login", "/dashboard/logout"])
@pytest.mark.parametrize("site", ["cross-site", "same-site"])
def test_forms_posted_from_another_site_are_refused(client, path, site):
    response = client.post(path, data={"api_key": API_KEY}, headers={"Sec-Fetch-Site": site})
    assert response.status_code == 403 and "another site" in problem(response.text)
    assert session_cookie(client) is None


@pytest.mark.parametrize("origin", [
    pytest.param("https://attacker.example", id="other-host"),
    pytest.param("http://sms.example.com", id="other-scheme"),
    pytest.param("https://sms.example.com:8443", id="other-port"),
    pytest.param("https://sms.example.com.attacker.example", id="suffixed-host"),
    pytest.param("null", id="opaque"),
])
@pytest.mark.parametrize("path", ["/dashboard/login", "/dashboard/logout"])
def test_forms_from_another_origin_are_refused_without_sec_fetch_site(signed_in, path,
                                                                      origin):
    """Browsers that send no Sec-Fetch-Site (Safari before 16.4) still send Origin."""
    response = signed_in.post(path, data={"api_key": API_KEY}, headers={"Origin": origin})
    assert response.status_code == 403 and "another site" in problem(response.text)
    assert signed_in.get("/dashboard").status_code == 200  # not logged out


@pytest.mark.parametrize("origin", [
    pytest.param("https://sms.example.com", id="base-url"),
    pytest.param("HTTPS://SMS.EXAMPLE.COM", id="base-url-capitals"),
    pytest.param("http://localhost", id="request-host"),
    pytest.param(None, id="none"),
])
def test_forms_from_the_service_own_origin_are_taken(client, origin):
    headers = {"Origin": origin} if origin else {}
    assert log_in(client, **headers).status_code == 303
    assert client.get("/dashboard").status_code == 200
    assert client.post("/dashboard/logout", headers=headers).status_code == 303
    assert client.get("/dashboard").status_code == 303


def test_the_origin_of_base_url_leaves_out_a_default_port(make_app):
    client = make_app(BASE_URL="https://sms.example.com:443/prefix").test_client()
    assert log_in(client, Origin="https://sms.example.com").status_code == 303
    assert log_in(client, Origin="https://other.example.com").status_code == 403


def test_forms_posted_from_the_dashboard_itself_are_taken(client):
    assert log_in(client, **{"Sec-Fetch-Site": "same-origin"}).status_code == 303
    assert client.get("/dashboard").status_code == 200


def test_without_api_key_in_simulation_the_dashboard_is_open(make_app, tmp_path):
    client = make_app(TWILIO_SIMULATE="true", API_KEY=None,
                      DATABASE_URL=f"sqlite:///{tmp_path}/simulated.db").test_client()
    page = client.get("/dashboard")
    assert page.status_code == 200 and "Log out" not in page.text
    assert client.get("/dashboard/messages").status_code == 200
    assert client.get("/dashboard/login").headers["Location"] == "/dashboard"
    assert client.post("/dashboard/logout").headers["Location"] == "/dashboard"


# --- the overview -------------------------------------------------------------------------

def overview_numbers(page):
    """What the overview shows, in GET /stats' terms."""
    since, until = attributes(page, "p", "data-since", "data-until")[0]
    total = attributes(page, "span", "id", "data-value")
    values = {name: value for name, value in total}
    p50, p90 = attributes(page, "span", "data-p50", "data-p90")[0]
    return {
        "since": since, "until": until, "total": int(values["total"]),
        "byStatus": {s: int(c) for s, c in attributes(page, "tr", "data-status",
                                                      "data-count")},
        "deliveryRate": float(values["delivery-rate"]) if values["delivery-rate"] else None,
        "errors": [(int(code), int(count)) for code, count in attributes(
            page, "tr", "data-code", "data-count")],
        "timeToDeliveredSeconds": {"p50": float(p50), "p90": float(p90)} if p50 else None,
        "stuck": int(values["stuck"]),
        # Shown only while status webhooks are on; /stats counts them (as 0) regardless.
        "webhooks": {"pending": int(values.get("webhooks-pending", 0)),
                     "failed": int(values.get("webhooks-failed", 0))},
        "inbound": {"received": int(values["inbound-received"]),
                    "optedOut": int(values["inbound-opted-out"]),
                    "optedIn": int(values["inbound-opted-in"])},
    }


def stored_mix(store):
    """Messages over the last 30 days: delivered, undelivered, failed, still sent."""
    for n in range(12):
        store(n * 2 * 24 * 3600 + 600, ("sent", 1), ("delivered", 2 + n))
    store(1800, ("sent", 1), ("undelivered", 4, 30003))
    store(3 * 3600, ("sent", 1), ("undelivered", 4, 30003))
    store(5 * 3600, ("failed", 2, 30007))
    store(4 * 24 * 3600, ("failed", 2, 21610))
    store(2 * 3600, ("sent", 1))
    store(20 * 60, ("sent", 1))


@pytest.mark.parametrize("window", ["1h", "24h", "7d", "30d"])
def test_the_overview_shows_the_numbers_of_stats_for_its_window(signed_in, store, window):
    stored_mix(store)
    page = signed_in.get(f"/dashboard?window={window}")
    assert page.status_code == 200
    shown = overview_numbers(page.text)
    stats = signed_in.get("/stats", query_string={"since": shown["since"],
                                                  "until": shown["until"]},
                          headers=AUTH).get_json()
    assert shown == {**stats, "errors": [(e["code"], e["count"]) for e in stats["errors"]]}
    assert stats["total"] > 0
    # The chart's segments add up to the same counts.
    drawn = {}
    for status, count in attributes(page.text, "rect", "data-status", "data-count"):
        drawn[status] = drawn.get(status, 0) + int(count)
    assert drawn == stats["byStatus"]


def test_the_overview_defaults_to_24_hours(signed_in, store):
    store(23 * 3600, ("delivered", 1))
    store(25 * 3600, ("delivered", 1))
    shown = overview_numbers(signed_in.get("/dashboard").text)
    assert shown["total"] == 1
    assert shown["until"] == times.stored_time(NOW)
    assert shown["since"] == times.stored_time(NOW - 24 * 3600)


def test_the_chart_stacks_each_bucket_by_latest_status(signed_in, store):
    store(30 * 60, ("delivered", 1))
    store(35 * 60, ("delivered", 1))
    store(40 * 60, ("failed", 1, 30007))
    store(5 * 3600, ("undelivered", 1, 30003))
    page = signed_in.get("/dashboard?window=24h").text
    bars = {start: int(total) for start, total in attributes(page, "g", "data-start",
                                                              "data-total")}
    assert len(bars) in (24, 25) and sum(bars.values()) == 4
    assert bars["2026-11-26T19:00:00.000Z"] == 3 and bars["2026-11-26T15:00:00.000Z"] == 1
    rects = attributes(page, "rect", "class", "data-count", "y", "height")
    assert [(c, n) for c, n, _, _ in rects] == [
        ("status-undelivered", "1"), ("status-delivered", "2"), ("status-failed", "1")]
    # Stacked: the failures sit on the delivered ones, twice as tall as one.
    delivered, failed = rects[1], rects[2]
    assert float(failed[2]) + float(failed[3]) == pytest.approx(float(delivered[2]), abs=0.02)
    assert float(delivered[3]) == pytest.approx(2 * float(failed[3]), abs=0.02)


def test_the_overview_links_errors_to_twilio_and_to_their_messages(signed_in, store):
    store(600, ("undelivered", 1, 30003))
    store(700, ("failed", 1, 12345))
    page = signed_in.get("/dashboard").text
    assert 'href="https://www.twilio.com/docs/api/errors/30003"' in page
    assert 'href="https://www.twilio.com/docs/api/errors/12345"' in page
    assert "Unreachable handset" in page
    links = [html.unescape(h) for h in re.findall(r'href="(/dashboard/messages\?[^"]+)"', page)]
    assert any("errorCode=30003" in link for link in links)


def test_an_unknown_window_is_a_400_page_naming_the_windows(signed_in):
    response = signed_in.get("/dashboard?window=2d")
    assert response.status_code == 400 and response.mimetype == "text/html"
    assert all(f"window={name}" in problem(response.text) for name in ("1h", "24h", "7d",
                                                                       "30d"))


def test_an_empty_window_shows_no_chart_and_no_rate(signed_in):
    page = signed_in.get("/dashboard?window=1h").text
    assert overview_numbers(page)["total"] == 0 and "<rect" not in page
    assert "no messages in this window" in page


@sqlite_only
def test_the_overview_reads_through_indexes(app, signed_in, store):
    stored_mix(store)
    seen = []
    connection = services(app).storage.connection()
    connection.set_trace_callback(seen.append)
    try:
        assert signed_in.get("/dashboard?window=30d").status_code == 200
    finally:
        connection.set_trace_callback(None)
    seen = [sql for sql in seen if sql.lstrip().upper().startswith(("SELECT", "WITH"))]
    # The chart's counts: per status and day, beside GET /stats' own reads.
    per_bucket = [sql for sql in seen if "latest_status = " in sql and "stuck" not in sql]
    assert len(per_bucket) >= 31
    with app.app_context():
        for sql in seen:
            plan = [row["detail"] for row in get_db().query("EXPLAIN QUERY PLAN " + sql)]
            tables = [line for line in plan
                      if re.search(r"\b(messages|status_events|webhook_events|inbound_messages"
                                   r"|opt_out_changes)\b", line)]
            assert tables and all("USING" in line and "INDEX" in line for line in tables), plan


# --- the search ---------------------------------------------------------------------------

def listed_sids(page):
    return [sid for (sid,) in attributes(page, "tr", "data-sid")]


def test_the_search_lists_what_messages_lists(signed_in, store):
    first = store(600, ("delivered", 1), to="+15550000001")
    second = store(500, ("undelivered", 1, 30003), to="+15550000002")
    third = store(400, ("failed", 1, 30003), to="+15550000001")
    for params, expected in [
        ({}, [third, second, first]),
        ({"to": "+15550000001"}, [third, first]),
        ({"status": "undelivered,failed"}, [third, second]),
        ({"errorCode": "30003", "to": "+15550000002"}, [second]),
        ({"since": times.stored_time(NOW - 450), "until": times.stored_time(NOW)}, [third]),
    ]:
        page = signed_in.get("/dashboard/messages", query_string=params)
        api = signed_in.get("/messages", query_string=params, headers=AUTH).get_json()
        assert page.status_code == 200
        assert listed_sids(page.text) == [m["sid"] for m in api["messages"]] == expected


def test_the_search_leaves_out_the_fields_left_empty(signed_in, store):
    sid = store(600, ("delivered", 1))
    response = signed_in.get("/dashboard/messages?to=+%2B15558675309+&status=&errorCode=+"
                             "&reference=&since=&until=")
    assert response.status_code == 303
    assert response.headers["Location"] == "/dashboard/messages?to=%2B15558675309"
    page = signed_in.get(response.headers["Location"])
    assert page.status_code == 200 and listed_sids(page.text) == [sid]
    empty = signed_in.get("/dashboard/messages?to=&status=", follow_redirects=True)
    assert empty.request.path == "/dashboard/messages" and not empty.request.args
    assert listed_sids(empty.text) == [sid]


def selected_status(page):
    """The value of the status select's chosen option ('' for any)."""
    chosen = re.findall(r"<option(?: value=\"([^\"]*)\")? selected>([^<]*)</option>", page)
    assert len(chosen) <= 1, chosen
    return html.unescape(chosen[0][0] or chosen[0][1]) if chosen else ""


def test_the_search_keeps_what_was_asked_in_the_form(signed_in):
    page = signed_in.get("/dashboard/messages?to=%2B15550000001&errorCode=30003"
                         "&status=failed&since=2026-11-26T19:00Z").text
    values = dict(attributes(page, "input", "name", "value"))
    assert values["to"] == "+15550000001" and values["errorCode"] == "30003"
    assert values["reference"] == "" and values["sid"] == "" and values["until"] == ""
    assert values["since"] == "2026-11-26T19:00:00"  # as a datetime-local field takes it
    assert selected_status(page) == "failed"


def test_the_status_is_chosen_among_the_known_statuses(signed_in):
    page = signed_in.get("/dashboard/messages").text
    select = page[page.index('<select id="status"'):page.index("</select>")]
    options = re.findall(r"<option( value=\"[^\"]*\")?>([^<]*)</option>", select)
    assert options == [(' value=""', "any")] + [("", status) for status in rules.STATUS_RANK]
    assert selected_status(page) == ""
    # The overview links to several statuses at once: the form shows them as chosen.
    page = signed_in.get("/dashboard/messages?status=undelivered,failed").text
    assert selected_status(page) == "undelivered,failed"
    assert ">undelivered, failed</option>" in page


@pytest.mark.parametrize("typed", [
    pytest.param("2026-11-26T19:52:30", id="datetime-local"),
    pytest.param("2026-11-26T19:52:30.000", id="datetime-local-milliseconds"),
    pytest.param("2026-11-26 19:52:30", id="space"),
    pytest.param("2026-11-26T19:52:30Z", id="utc"),
    pytest.param("2026-11-26T20:52:30+01:00", id="offset"),
])
def test_the_search_reads_times_without_a_timezone_as_utc(signed_in, store, typed):
    store(600, ("delivered", 1))
    newer = store(400, ("delivered", 1))  # created 19:53:20 UTC
    page = signed_in.get("/dashboard/messages", query_string={"since": typed})
    assert page.status_code == 200 and listed_sids(page.text) == [newer]
    assert dict(attributes(page.text, "input", "name", "value"))["since"] == (
        "2026-11-26T19:52:30")
    until = signed_in.get("/dashboard/messages", query_string={"until": typed}).text
    assert newer not in listed_sids(until) and len(listed_sids(until)) == 1


def test_the_form_shows_times_from_the_overview_to_the_millisecond(signed_in):
    page = signed_in.get("/dashboard/messages?since=2026-11-25T20:00:00.123Z"
                         "&until=2026-11-26T21:00:00%2B01:00").text
    values = dict(attributes(page, "input", "name", "value"))
    assert values["since"] == "2026-11-25T20:00:00.123"
    assert values["until"] == "2026-11-26T20:00:00"
    assert ("since", "datetime-local", "any") in attributes(page, "input", "name", "type",
                                                            "step")


def test_a_sid_opens_its_message(signed_in, store):
    sid = store(600, ("delivered", 1))
    # From the form: every field sent, the others empty or not.
    response = signed_in.get(f"/dashboard/messages?to=&status=failed&sid=+{sid}+&since=",
                             follow_redirects=True)
    assert response.status_code == 200 and response.request.path == (
        f"/dashboard/messages/{sid}")
    assert [s for (s,) in attributes(response.text, "li", "data-status")] == [
        "queued", "delivered"]
    unknown = signed_in.get("/dashboard/messages?sid=SMnope", follow_redirects=True)
    assert unknown.status_code == 404 and "No message with SID SMnope" in problem(
        unknown.text)


def test_older_pages_follow_the_cursor_of_messages(signed_in, store):
    sids = [store(1000 - n) for n in range(55)]
    page = signed_in.get("/dashboard/messages?to=%2B15558675309").text
    assert listed_sids(page) == sids[::-1][:50]
    older = html.unescape(re.search(r'<a href="([^"]+)" rel="next"', page).group(1))
    api = signed_in.get("/messages?to=%2B15558675309", headers=AUTH).get_json()
    assert f"cursor={api['nextCursor']}" in older and "to=%2B15558675309" in older
    second = signed_in.get(older).text
    assert listed_sids(second) == sids[::-1][50:]
    assert 'rel="next"' not in second and 'id="newest"' in second


@pytest.mark.parametrize("params", [
    {"status": "delivered,lost"},
    {"errorCode": "E30003"},
    {"cursor": "not-a-cursor"},
    {"limit": "500"},
    {"nonsense": "1"},
])
def test_bad_search_input_shows_the_message_of_messages(signed_in, params):
    page = signed_in.get("/dashboard/messages", query_string=params)
    api = signed_in.get("/messages", query_string=params, headers=AUTH)
    assert page.status_code == api.status_code == 400
    assert problem(page.text) == api.get_json()["error"]


@pytest.mark.parametrize("params, message", [
    pytest.param({"to": "5558675309"}, "Parameter 'to' must be a phone number in E.164 "
                 "format, like +15558675309", id="number"),
    pytest.param({"since": "yesterday"}, "“Created from” must be a date and time in UTC, "
                 "like 2026-12-03 07:00.", id="since"),
    pytest.param({"until": "2026-13-01T00:00"}, "“Created before” must be a date and time "
                 "in UTC, like 2026-12-03 07:00.", id="until"),
    pytest.param({"since": "2026-11-26T10:00", "until": "2026-11-26T09:00:00Z"},
                 "“Created from” must be before “Created before”.", id="since-after-until"),
    pytest.param({"sid": "SM1/../x"}, "A message SID is letters and digits, like SM "
                 "followed by 32 characters.", id="sid"),
])
def test_bad_form_input_is_told_in_the_form_words(signed_in, params, message):
    """What the form sends is refused in its own words: no advice about writing + in a URL,
    which the form does by itself."""
    page = signed_in.get("/dashboard/messages", query_string=params)
    assert page.status_code == 400 and problem(page.text) == message
    assert "%2B" not in page.text


def test_reference_goes_to_the_search_of_messages(signed_in, store):
    """A reference is searched as GET /messages searches it (an exact match where messages
    have one): the same answer, message for message or refusal for refusal."""
    store(600, ("delivered", 1))
    page = signed_in.get("/dashboard/messages?reference=order-1234")
    api = signed_in.get("/messages?reference=order-1234", headers=AUTH)
    assert page.status_code == api.status_code
    if api.status_code == 200:
        assert listed_sids(page.text) == [m["sid"] for m in api.get_json()["messages"]]
    else:
        assert problem(page.text) == api.get_json()["error"]


# --- one message --------------------------------------------------------------------------

def test_a_message_page_shows_its_details_and_history(signed_in, store):
    sid = store(600, ("sent", 1), ("undelivered", 5, 30003))
    page = signed_in.get(f"/dashboard/messages/{sid}")
    assert page.status_code == 200
    assert [s for (s,) in attributes(page.text, "li", "data-status")] == [
        "queued", "sent", "undelivered"]
    assert [t for (t,) in attributes(page.text, "time", "datetime")] == [
        times.stored_time(NOW - 600), times.stored_time(NOW - 599), times.stored_time(NOW - 595)]
    assert f"{times.stored_time(NOW - 595)[11:23]} UTC" in page.text  # to the millisecond
    assert "+15558675309" in page.text and "Unreachable handset" in page.text
    assert 'href="https://www.twilio.com/docs/api/errors/30003"' in page.text


def test_an_unknown_message_is_a_404_page(signed_in):
    response = signed_in.get("/dashboard/messages/SMnope")
    assert response.status_code == 404 and response.mimetype == "text/html"
    assert "No message with SID SMnope" in problem(response.text)


def test_what_a_caller_chose_is_shown_as_text(signed_in, post_callback):
    """A status callback may carry any To (it is signed by Twilio, not checked as E.164);
    a search may carry anything: both are escaped, never markup."""
    script = "<script>alert(1)</script>"
    sid = "SM" + "c" * 32
    assert post_callback(callback(sid, "delivered", To=script)).status_code == 200
    for path in (f"/dashboard/messages/{sid}", "/dashboard/messages"):
        page = signed_in.get(path).text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and script not in page
    for field in ("reference", "to", "status", "since"):
        page = signed_in.get("/dashboard/messages", query_string={field: script}).text
        assert script not in page and "&lt;script&gt;" in page
    page = signed_in.get("/dashboard/messages/" + script).text
    assert script not in page and "&lt;script&gt;" in page


# --- errors under /dashboard are pages --------------------------------------------------

def test_an_unknown_dashboard_path_is_a_404_page(signed_in):
    response = signed_in.get("/dashboard/nowhere")
    assert response.status_code == 404 and response.mimetype == "text/html"
    assert "No such page: /dashboard/nowhere" in problem(response.text)
    assert response.headers["Content-Security-Policy"] == dashboard.CONTENT_SECURITY_POLICY
    assert response.headers["X-Frame-Options"] == "DENY"
    assert signed_in.get("/nowhere").get_json()["error"].startswith("No such endpoint")


def test_a_wrong_method_is_a_405_page(signed_in):
    response = signed_in.get("/dashboard/logout")
    assert response.status_code == 405 and response.mimetype == "text/html"
    assert response.headers["Allow"] and "GET is not allowed" in problem(response.text)


def test_a_nul_character_is_refused_with_a_page(signed_in):
    response = signed_in.get("/dashboard/messages?to=%00")
    assert response.status_code == 400 and "NUL character" in problem(response.text)


def test_a_refused_search_is_logged_with_its_message(signed_in, caplog):
    signed_in.get("/dashboard/messages?errorCode=abc")
    assert "Refused GET /dashboard/messages with 400: Parameter 'errorCode'" in caplog.text


def test_a_read_past_its_time_limit_is_a_503_page(make_app, database_url):
    at_the_end = datetime(2026, 11, 4, tzinfo=timezone.utc).timestamp()
    client = make_app(storage_settings={"read_timeout": 0.001},
                      clock=lambda: at_the_end).test_client()
    fill_messages(database_url, 50_000, first="2026-10-01T00:00:00Z", every=60)
    log_in(client)
    response = client.get("/dashboard?window=30d")
    assert response.status_code == 503 and response.mimetype == "text/html"
    assert response.headers["Retry-After"] and "shorter window" in problem(response.text)


def test_the_stylesheet_is_served_without_a_session(client):
    response = client.get("/dashboard/static/dashboard.css")
    assert response.status_code == 200 and response.mimetype == "text/css"
    assert "status-delivered" in response.text



# --- the chart's arithmetic ---------------------------------------------------------------

def test_buckets_start_on_round_times_and_cover_the_window_exactly():
    since, until = "2026-11-26T09:44:16.123Z", "2026-11-27T09:44:16.123Z"
    boundaries = overview.bucket_boundaries(since, until, overview.WINDOWS["24h"][1])
    assert boundaries[0] == since and boundaries[-1] == until and len(boundaries) == 26
    assert boundaries[1:3] == ["2026-11-26T10:00:00.000Z", "2026-11-26T11:00:00.000Z"]
    days = overview.bucket_boundaries("2026-11-01T00:00:00.000Z", "2026-11-03T00:00:00.000Z",
                                      overview.WINDOWS["30d"][1])
    assert days == ["2026-11-01T00:00:00.000Z", "2026-11-02T00:00:00.000Z",
                    "2026-11-03T00:00:00.000Z"]


@pytest.mark.parametrize("value, top", [(0, 1), (1, 1), (3, 3), (7, 8), (9, 10), (270, 300),
                                        (33_001, 40_000)])
def test_the_axis_ends_on_a_round_number(value, top):
    assert chart.nice_ceiling(value) == top


# The chart's text on a phone (dashboard.css) and a generous width per character: Chromium
# draws "Nov 27" there 60 units wide, "00:00" 49.
PHONE_FONT_SIZE, EM_PER_CHARACTER = 17, 0.6


@pytest.mark.parametrize("window", list(overview.WINDOWS))
def test_the_last_x_label_fits_the_chart_on_a_phone(window):
    """The window ends just after a round time, so the last bucket has a label."""
    length, bucket = overview.WINDOWS[window]
    until = datetime(2026, 11, 27, 0, 0, 30, tzinfo=timezone.utc)
    boundaries = overview.bucket_boundaries(times.stored_time((until - length).timestamp()),
                                            times.stored_time(until.timestamp()), bucket)
    buckets = [{"start": start, "stop": stop, "total": 0, "counts": {}}
               for start, stop in itertools.pairwise(boundaries)]
    labels = chart.stacked_bars(buckets, bucket.total_seconds())["x_labels"]
    slot = (chart.WIDTH - chart.LEFT - chart.RIGHT) / len(buckets)
    assert labels[-1]["x"] == pytest.approx(chart.WIDTH - chart.RIGHT - slot / 2, abs=0.01)
    for label in labels:
        half = len(label["text"]) * EM_PER_CHARACTER * PHONE_FONT_SIZE / 2
        assert chart.LEFT <= label["x"] - half and label["x"] + half <= chart.WIDTH, label


@pytest.mark.parametrize("count, text", [(950, "950"), (1500, "1.5k"), (40_000, "40k"),
                                         (1_200_000, "1.2M")])
def test_axis_numbers_are_short(count, text):
    assert chart.compact(count) == text


# --- status webhooks ----------------------------------------------------------------------

def test_the_status_webhooks_show_on_the_overview_and_each_message_when_on(make_app):
    with WebhookReceiver() as receiver:
        # The real clock: events are stamped with the time they are recorded.
        app = make_app(clock=time.time, STATUS_WEBHOOK_URL=receiver.url,
                       STATUS_WEBHOOK_SECRET=WEBHOOK_SECRET, STATUS_WEBHOOK_RETRY_SCHEDULE="0")
        client = app.test_client()
        assert log_in(client).status_code == 303
        sids = ["SM" + f"{n}a" * 16 for n in range(3)]
        for sid in sids:
            params = callback(sid, "delivered")
            client.post("/message-status", data=params,
                        headers={"X-Twilio-Signature": sign(CALLBACK_URL, params)})
        receiver.answers = [500, 500]  # both attempts of the first event
        delivery = services(app).webhooks
        with app.app_context():
            for sid in sids:
                event = client.get(f"/webhook-events?sid={sid}", headers=AUTH).get_json()
                while delivery.deliver_now(event["events"][0]["id"]):
                    pass
        stats = client.get("/stats", headers=AUTH).get_json()["webhooks"]
        page = client.get("/dashboard").get_data(as_text=True)
    assert stats == {"pending": 0, "failed": 1}
    assert attributes(page, "span", "id", "data-value")[-3:] == [
        ("webhook-backlog", "0"), ("webhooks-pending", "0"), ("webhooks-failed", "1")]
    failures = page[page.index('id="webhook-failures"'):]
    assert sids[0] in failures and "HTTP 500" in failures and sids[1] not in failures
    message = client.get(f"/dashboard/messages/{sids[0]}").get_data(as_text=True)
    assert attributes(message, "tr", "data-state") == [("failed",)]
    assert "message.delivered" in message and "HTTP 500" in message


def test_without_status_webhooks_their_sections_are_left_out(signed_in, store):
    sid = store(60, ("delivered", 5))
    assert 'id="status-webhooks"' not in signed_in.get("/dashboard").get_data(as_text=True)
    page = signed_in.get(f"/dashboard/messages/{sid}").get_data(as_text=True)
    assert 'id="status-webhooks"' not in page


# --- replies and opt-outs ----------------------------------------------------------------------

def test_the_inbound_page_lists_replies_newest_first_by_number(signed_in):
    reply(signed_in, "STOP")
    reply(signed_in, "<b>see you</b>", from_="+15558675310")
    reply(signed_in, "HELP")
    page = signed_in.get("/dashboard/inbound").get_data(as_text=True)
    rows = re.findall(r'<tr data-sid="(SM\w+)">.*?data-label="from"><a [^>]*>([^<]+)</a>.*?'
                      r'class="badge kind-([\w-]+)"', page, re.S)
    assert [(number, kind) for _, number, kind in rows] == [
        ("+15558675309", "help"), ("+15558675310", "reply"), ("+15558675309", "opt-out")]
    assert "not kept" in page and "see you" not in page  # bodies not kept at rest
    mine = signed_in.get("/dashboard/inbound?number=%2B15558675310").get_data(as_text=True)
    assert len(re.findall(r"<tr data-sid=", mine)) == 1
    bad = signed_in.get("/dashboard/inbound?number=5558675310")
    assert bad.status_code == 400 and "E.164" in problem(bad.get_data(as_text=True))
    assert signed_in.get("/dashboard/inbound?number=+").status_code == 303


def test_the_inbound_page_shows_kept_bodies_escaped(make_app):
    client = make_app(STORE_MESSAGE_BODY="true").test_client()
    assert log_in(client).status_code == 303
    reply(client, "<b>see you</b>")
    page = client.get("/dashboard/inbound").get_data(as_text=True)
    assert "&lt;b&gt;see you&lt;/b&gt;" in page and "<b>see you" not in page


def test_the_opt_outs_page_lists_them_and_a_search_shows_a_numbers_history(signed_in):
    reply(signed_in, "STOP")
    reply(signed_in, "START")
    signed_in.put("/opt-outs/%2B15558675310", headers=AUTH)
    reply(signed_in, "quit", from_="+15558675311")
    listed = signed_in.get("/dashboard/opt-outs").get_data(as_text=True)
    assert re.findall(r'<tr data-number="([^"]+)">', listed) == ["+15558675311", "+15558675310"]
    page = signed_in.get("/dashboard/opt-outs?number=%2B15558675309").get_data(as_text=True)
    assert re.findall(r'<li data-change="(\w+)">', page) == ["opted_out", "opted_in"]
    assert 'id="opted-out"><span class="badge status-delivered">no' in page
    assert "keyword · STOP" in page and "keyword · START" in page
    never = signed_in.get("/dashboard/opt-outs?number=%2B15550001111").get_data(as_text=True)
    assert 'id="never"' in never
    bad = signed_in.get("/dashboard/opt-outs?number=abc")
    assert bad.status_code == 400 and "E.164" in problem(bad.get_data(as_text=True))


def test_a_messages_page_shows_that_its_recipient_opted_out(signed_in, store):
    sid = store(60, ("delivered", 5))
    assert 'id="recipient-opted-out"' not in signed_in.get(
        f"/dashboard/messages/{sid}").get_data(as_text=True)
    reply(signed_in, "STOP")
    page = signed_in.get(f"/dashboard/messages/{sid}").get_data(as_text=True)
    badge = re.search(r'<a class="badge status-failed" id="recipient-opted-out"[^>]*>([^<]+)</a>',
                      page)
    assert badge and badge.group(1).startswith("opted out ") and "(keyword)" in badge.group(1)
# --- named keys ---------------------------------------------------------------------------

def new_key(app, name, *options):
    """A key made with the real command; its text."""
    result = app.test_cli_runner().invoke(args=["keys", "create", name, *options])
    assert result.exit_code == 0, result.output
    return next(line for line in result.output.splitlines() if line.startswith("sk_"))


def test_any_key_with_read_logs_in_and_the_header_names_it(app, client):
    key = new_key(app, "support-desk", "--scope", "read")
    response = log_in(client, key)
    assert response.status_code == 303
    page = client.get("/dashboard").get_data(as_text=True)
    assert re.search(r'id="key-name"[^>]*>support-desk<', page)
    payload = session_cookie(client).split(".")[0]
    decoded = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)).decode()
    assert json.loads(decoded)["key"] == "support-desk" and key not in decoded
    assert re.search(r'id="key-name"[^>]*>API_KEY<', (log_in(client) and client.get(
        "/dashboard")).get_data(as_text=True))


def test_a_key_without_read_is_refused_on_the_login_form(app, client, caplog):
    key = new_key(app, "sender-only", "--scope", "send")
    response = log_in(client, key)
    assert response.status_code == 403 and "may not read" in problem(response.text)
    assert session_cookie(client) is None
    assert "key sender-only has no 'read' scope" in caplog.text and key not in caplog.text


def test_a_revoke_ends_the_keys_sessions(app, client):
    ticks = {"seconds": 0.0}
    services(app).keys = type(services(app).keys)(API_KEY, monotonic=lambda: ticks["seconds"])
    key = new_key(app, "temp", "--scope", "read")
    assert log_in(client, key).status_code == 303
    assert client.get("/dashboard/messages").status_code == 200
    assert app.test_cli_runner().invoke(args=["keys", "revoke", "temp"]).exit_code == 0
    ticks["seconds"] += 1.0
    response = client.get("/dashboard/messages")
    assert response.status_code == 303 and response.headers["Location"].startswith(
        "/dashboard/login")
    assert log_in(client, key).status_code == 401


def test_a_session_of_a_named_key_still_ends_when_api_key_changes(make_app):
    before = make_app()
    client = before.test_client()
    log_in(client, new_key(before, "reader", "--scope", "read"))
    cookie = session_cookie(client)
    after = make_app(API_KEY=OTHER_KEY).test_client()
    after.set_cookie(dashboard.SESSION_COOKIE, cookie, path="/dashboard")
    assert after.get("/dashboard").status_code == 303


def test_the_search_finds_messages_by_the_key_that_sent_them(app, signed_in):
    key = new_key(app, "alerts")
    sent = signed_in.post("/send-sms", json={"to": "+15558675309", "body": "Hi"},
                          headers={"Authorization": f"Bearer {key}"}).get_json()["messageSid"]
    signed_in.post("/send-sms", json={"to": "+15558675309", "body": "Hi"}, headers=AUTH)
    page = signed_in.get("/dashboard/messages?sentBy=alerts").get_data(as_text=True)
    assert ("sentBy", "alerts") in attributes(page, "input", "name", "value")
    assert attributes(page, "tr", "data-sid") == [(sent,)]
    message = signed_in.get(f"/dashboard/messages/{sent}").get_data(as_text=True)
    assert re.search(r'id="sent-by"><a href="/dashboard/messages\?sentBy=alerts">alerts<', message)
    refused = signed_in.get("/dashboard/messages?sentBy=no+spaces")
    assert refused.status_code == 400 and "sentBy" in problem(refused.text)


def test_the_retry_of_a_status_webhook_is_offered_to_admin_keys_only(make_app):
    with WebhookReceiver() as receiver:
        app = make_app(clock=time.time, STATUS_WEBHOOK_URL=receiver.url,
                       STATUS_WEBHOOK_SECRET=WEBHOOK_SECRET, STATUS_WEBHOOK_RETRY_SCHEDULE="0")
        sid = "SM" + "7b" * 16
        client = app.test_client()
        params = callback(sid, "delivered")
        client.post("/message-status", data=params,
                    headers={"X-Twilio-Signature": sign(CALLBACK_URL, params)})
        receiver.answers = [500, 500]  # both attempts: the event fails
        event = client.get(f"/webhook-events?sid={sid}", headers=AUTH).get_json()["events"][0]
        with app.app_context():
            while services(app).webhooks.deliver_now(event["id"]):
                pass
        retry = f"/dashboard/webhook-events/{event['id']}/retry"

        reader = app.test_client()
        log_in(reader, new_key(app, "reader", "--scope", "read"))
        page = reader.get(f"/dashboard/messages/{sid}").get_data(as_text=True)
        assert "HTTP 500" in page and retry not in page and "Retry now" not in page
        refused = reader.post(retry)
        assert refused.status_code == 403 and "admin scope" in problem(refused.text)

        admin = app.test_client()
        log_in(admin, new_key(app, "operator", "--scope", "read", "--scope", "admin"))
        page = admin.get(f"/dashboard/messages/{sid}").get_data(as_text=True)
        assert ("post", retry) in attributes(page, "form", "method", "action")
        answer = admin.post(retry)
        assert answer.status_code == 303
        assert answer.headers["Location"] == f"/dashboard/messages/{sid}#status-webhooks"
        queued = client.get(f"/webhook-events?sid={sid}", headers=AUTH).get_json()["events"]
        assert queued[0]["state"] == "pending", "queued again, for the delivery loop"


def test_the_retry_of_a_numbers_event_leads_back_to_the_overview(make_app):
    """A reply's event belongs to no message: its retry cannot lead to a message's page."""
    with WebhookReceiver() as receiver:
        app = make_app(clock=time.time, STATUS_WEBHOOK_URL=receiver.url,
                       STATUS_WEBHOOK_SECRET=WEBHOOK_SECRET)
        client = app.test_client()
        reply(client, "thanks")
        events = client.get("/webhook-events", headers=AUTH).get_json()["events"]
        event = next(e for e in events if e["type"] == "inbound.received")
        assert event["sid"] is None
        admin = app.test_client()
        log_in(admin, new_key(app, "operator", "--scope", "read", "--scope", "admin"))
        answer = admin.post(f"/dashboard/webhook-events/{event['id']}/retry")
        assert answer.status_code == 303 and answer.headers["Location"] == "/dashboard"
        queued = client.get("/webhook-events", headers=AUTH).get_json()["events"]
        assert next(e for e in queued if e["id"] == event["id"])["state"] == "pending"
