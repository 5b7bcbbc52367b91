"""The dashboard in a real browser: headless Chromium (Debian's chromium and chromium-driver
packages) driven by Selenium, against the service run by gunicorn as the Procfile runs it,
in simulation with an API key, its messages sent through /send-sms and settled by the
simulator's signed status callbacks.

Each page visited is saved as a PNG under tests/screenshots/ (git-ignored), desktop and
phone sized, for a person to look at.
"""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests

from sms_status import listing, simulator
from sms_status.config import SIMULATED_ACCOUNT_SID, SIMULATED_AUTH_TOKEN
from support import (
    API_KEY,
    AUTH,
    ROOT,
    WEBHOOK_SECRET,
    required_program,
    wait_until,
)

SCREENSHOTS = ROOT / "tests" / "screenshots"
DESKTOP, PHONE = (1280, 900), (390, 844)
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync")
# number -> (final status, error code), as the simulator settles them (simulator.py)
SENDS = {"+15558670001": ("delivered", None), "+15558670002": ("delivered", None),
         "+15558670003": ("delivered", None), "+15005551003": ("undelivered", 30003),
         "+15005551008": ("failed", 30008)}


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium, offline: Selenium Manager is told not to download anything, and
    the browser is Debian's, with a new empty profile."""
    binary = required_program("chromium", "chromium")
    driver_path = required_program("chromedriver", "chromium-driver")
    os.environ["SE_OFFLINE"] = "true"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=DriverService(executable_path=driver_path),
                              options=options)
    driver.set_window_size(*DESKTOP)
    yield driver
    driver.quit()


@pytest.fixture
def service(service_env, start_service, receiver):
    """The service, its status webhooks on, with a few settled messages: {number: sid} in
    `service.sids`."""
    env = service_env(API_KEY=API_KEY, GUNICORN_THREADS=8, STATUS_WEBHOOK_URL=receiver.url,
                      STATUS_WEBHOOK_SECRET=WEBHOOK_SECRET)
    env["GUNICORN_CMD_ARGS"] = f"--bind 127.0.0.1:{env['PORT']}"
    service = start_service(env)
    service.sids = {}
    for number in SENDS:
        answer = requests.post(service.url + "/send-sms", headers=AUTH, timeout=15,
                               json={"to": number, "body": "Your code is 123456"})
        assert answer.status_code == 200, answer.text
        service.sids[number] = answer.json()["messageSid"]

    def settled():
        stats = api(service, "/stats")
        return stats["total"] == len(SENDS) and sum(
            stats["byStatus"].get(s, 0) for s in listing.DELIVERY_OUTCOMES) == len(SENDS)

    wait_until(settled, 30, "the simulator's callbacks to settle every message")
    wait_until(lambda: api(service, "/stats")["webhooks"]["pending"] == 0, 30,
               "every status webhook delivered")
    return service


def api(service, path, **params):
    answer = requests.get(service.url + path, params=params, headers=AUTH, timeout=15)
    assert answer.status_code == 200, answer.text
    return answer.json()


def console_errors(driver, expected=()):
    """The browser console's errors since the last call (a page's failed load, a blocked
    style or script, a script error), less those naming one of `expected`."""
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"
            and not any(text in entry["message"] for text in expected)]


def screenshot(driver, request, name):
    """Saves the whole page, desktop and phone sized, under tests/screenshots/; on both the
    page fits the window's width (nothing to scroll sideways)."""
    SCREENSHOTS.mkdir(exist_ok=True)
    engine = request.node.callspec.params.get("database_url", "")
    for size, (width, height) in (("desktop", DESKTOP), ("phone", PHONE)):
        driver.set_window_size(width, height)
        overflow = driver.execute_script("return document.documentElement.scrollWidth"
                                         " - document.documentElement.clientWidth")
        assert overflow <= 0, f"{name} is {overflow} px wider than a {size} window"
        full = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(width, min(max(height, full + 140), 5000))
        path = SCREENSHOTS / f"{engine}-{name}-{size}.png"
        assert driver.save_screenshot(str(path)), path
        print(f"screenshot: {path}")
    driver.set_window_size(*DESKTOP)


def css(driver, selector):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def first(driver, selector, timeout=10):
    """The first element matching `selector`, waiting for it: a click's page may still be
    on its way."""
    wait_until(lambda: css(driver, selector), timeout, f"an element {selector!r}")
    return css(driver, selector)[0]


def log_in(driver, service, key=API_KEY):
    driver.get(service.url + "/dashboard/login")
    field = first(driver, "input[name=api_key]")
    field.clear()
    field.send_keys(key)
    first(driver, "section.login button[type=submit]").click()


def wait_for_page(driver, path):
    wait_until(lambda: driver.current_url.split("?")[0].endswith(path), 10,
               f"the browser to show {path} (it shows {driver.current_url})")


def test_log_in_read_the_overview_and_log_out(service, browser, request):
    # Without a session every page leads to the login form.
    browser.get(service.url + "/dashboard")
    wait_for_page(browser, "/dashboard/login")
    screenshot(browser, request, "login")

    log_in(browser, service, key="not-the-key-but-long-enough")
    assert "not an active key of this service" in first(browser, ".problem").text
    screenshot(browser, request, "login-wrong-key")
    assert console_errors(browser, expected=["/dashboard/login - Failed to load resource: "
                                             "the server responded with a status of 401"]) == []

    log_in(browser, service)
    wait_for_page(browser, "/dashboard")
    for window in ("24h", "30d"):
        first(browser, f"nav.windows a[href$='window={window}']").click()
        wait_until(lambda shown=f"window={window}": browser.current_url.endswith(shown), 10,
                   window)
        shown = first(browser, "#window")
        stats = api(service, "/stats", since=shown.get_attribute("data-since"),
                    until=shown.get_attribute("data-until"))
        assert int(first(browser, "#total").get_attribute("data-value")) == stats["total"]
        assert first(browser, "#total").text == str(stats["total"])
        rows = {row.get_attribute("data-status"): int(row.get_attribute("data-count"))
                for row in css(browser, "#by-status tbody tr")}
        assert rows == stats["byStatus"] == {"delivered": 3, "undelivered": 1, "failed": 1}
        assert first(browser, "#delivery-rate").text == "60.0%" and stats["deliveryRate"] == 0.6
        assert int(first(browser, "#stuck").get_attribute("data-value")) == stats["stuck"]
        assert {int(row.get_attribute("data-code")): int(row.get_attribute("data-count"))
                for row in css(browser, "#errors tbody tr")} == {
            e["code"]: e["count"] for e in stats["errors"]} == {30003: 1, 30008: 1}
        # The chart: an SVG of bars, each segment drawn with a height and the status colour.
        bars = css(browser, "svg#chart rect")
        assert bars and all(float(bar.get_attribute("height")) > 0 for bar in bars)
        assert sum(int(bar.get_attribute("data-count")) for bar in bars) == stats["total"]
        fill = bars[0].value_of_css_property("fill")
        assert fill not in ("", "none", "rgb(0, 0, 0)"), fill  # the stylesheet applied
        screenshot(browser, request, f"overview-{window}")

    first(browser, "form.logout button").click()
    wait_for_page(browser, "/dashboard/login")
    browser.get(service.url + "/dashboard")
    wait_for_page(browser, "/dashboard/login")
    assert console_errors(browser) == []


def search(driver, **fields):
    for name, value in fields.items():
        field = first(driver, f"form.search input[name={name}]")
        field.clear()
        field.send_keys(value)
    first(driver, "form.search button[type=submit]").click()


def test_search_by_number_and_read_a_message_history(service, browser, request):
    log_in(browser, service)
    wait_for_page(browser, "/dashboard")
    first(browser, "header nav a[href='/dashboard/messages']").click()
    wait_for_page(browser, "/dashboard/messages")
    assert len(css(browser, "#messages tbody tr")) == len(SENDS)
    screenshot(browser, request, "messages")

    search(browser, to="+15005551003")
    wait_until(lambda: "to=%2B15005551003" in browser.current_url, 10, "the search")
    rows = css(browser, "#messages tbody tr")
    assert [row.get_attribute("data-sid") for row in rows] == [service.sids["+15005551003"]]
    screenshot(browser, request, "messages-search")

    search(browser, to="5005551003")
    wait_until(lambda: "to=5005551003" in browser.current_url, 10, "the search")
    assert "E.164" in first(browser, ".problem").text
    assert console_errors(browser, expected=["/dashboard/messages?to=5005551003 - Failed "
                                             "to load resource: the server responded with "
                                             "a status of 400"]) == []

    browser.get(service.url + "/dashboard/messages?to=%2B15005551003")
    first(browser, "#messages tbody tr td.sid a").click()
    wait_for_page(browser, f"/dashboard/messages/{service.sids['+15005551003']}")
    history = [item.get_attribute("data-status") for item in css(browser, "#history li")]
    assert history == [event["status"] for event in api(
        service, f"/get-status/{service.sids['+15005551003']}")["history"]]
    assert history[0] == "queued" and history[-1] == "undelivered"
    assert "30003" in first(browser, "#details").text
    delivered = [row.get_attribute("data-state") for row in css(browser, "#webhook-events tr")
                 if row.get_attribute("data-state")]
    assert delivered == ["delivered"] * len(history)  # one event per status, each delivered
    screenshot(browser, request, "message")
    assert console_errors(browser) == []


def test_search_by_reference(service, browser):
    reference = f"order-{time.time_ns()}"
    answer = requests.post(service.url + "/send-sms", headers=AUTH, timeout=15, json={
        "to": "+15558670009", "body": "Your order shipped", "reference": reference})
    assert answer.status_code == 200, answer.text
    log_in(browser, service)
    wait_for_page(browser, "/dashboard")
    browser.get(service.url + "/dashboard/messages")
    search(browser, reference=reference)
    wait_until(lambda: "reference=" in browser.current_url, 10, "the search")
    assert [row.get_attribute("data-sid") for row in css(browser, "#messages tbody tr")] == [
        answer.json()["messageSid"]]
    assert console_errors(browser) == []


def test_a_message_opened_before_the_login_opens_after_it(service, browser, request):
    sid = service.sids["+15005551008"]
    browser.get(service.url + f"/dashboard/messages/{sid}")
    wait_for_page(browser, "/dashboard/login")
    field = first(browser, "input[name=api_key]")
    field.send_keys(API_KEY)
    first(browser, "section.login button[type=submit]").click()
    wait_for_page(browser, f"/dashboard/messages/{sid}")
    assert "30008" in first(browser, "#details").text
    assert console_errors(browser) == []


def test_search_by_status_time_and_sid_with_the_form(service, browser, request):
    from selenium.webdriver.support.ui import Select

    log_in(browser, service)
    wait_for_page(browser, "/dashboard")
    # The overview's link carries its window (times with a Z, to the millisecond): the form
    # shows them in its date and time fields, and sends them again as they are shown.
    first(browser, "#by-status a.status-delivered").click()
    wait_for_page(browser, "/dashboard/messages")
    since = first(browser, "input[name=since]").get_attribute("value")
    assert since and "Z" not in since and since[10] == "T"
    assert Select(first(browser, "select[name=status]")).first_selected_option.text == (
        "delivered")
    linked = browser.current_url
    first(browser, "form.search button[type=submit]").click()
    wait_until(lambda: browser.current_url != linked, 10, "the search to be sent")
    assert "since=" in browser.current_url and "status=delivered" in browser.current_url
    delivered = [sid for number, sid in service.sids.items()
                 if SENDS[number][0] == "delivered"]
    assert sorted(row.get_attribute("data-sid") for row in css(
        browser, "#messages tbody tr")) == sorted(delivered)
    screenshot(browser, request, "messages-form")

    Select(first(browser, "select[name=status]")).select_by_visible_text("undelivered")
    first(browser, "form.search button[type=submit]").click()
    wait_until(lambda: "status=undelivered" in browser.current_url, 10, "the search")
    assert [row.get_attribute("data-sid") for row in css(browser, "#messages tbody tr")] == [
        service.sids["+15005551003"]]

    browser.get(service.url + "/dashboard/messages")
    search(browser, sid=service.sids["+15005551008"])
    wait_for_page(browser, f"/dashboard/messages/{service.sids['+15005551008']}")
    assert "30008" in first(browser, "#details").text
    assert console_errors(browser) == []


def test_inbound_and_opt_outs_pages_and_a_recipient_who_opted_out(service, browser, request):
    number = "+15558670001"
    for body in ("Thanks!", "STOP"):
        _, answer = simulator.post_reply(service.url, SIMULATED_ACCOUNT_SID,
                                         SIMULATED_AUTH_TOKEN, number, "+15005550006", body)
        assert answer.status_code == 200, answer.text
    log_in(browser, service)
    wait_for_page(browser, "/dashboard")
    first(browser, "header nav a[href='/dashboard/inbound']").click()
    wait_for_page(browser, "/dashboard/inbound")
    kinds = [cell.text for cell in css(browser, "#inbound td[data-label=kind]")]
    assert kinds == ["opt-out", "reply"]
    screenshot(browser, request, "inbound")

    first(browser, "header nav a[href='/dashboard/opt-outs']").click()
    wait_for_page(browser, "/dashboard/opt-outs")
    assert [row.get_attribute("data-number") for row in css(browser, "#opt-outs tbody tr")] \
        == [number]
    screenshot(browser, request, "opt-outs")
    search(browser, number=number)
    wait_until(lambda: "number=%2B15558670001" in browser.current_url, 10, "the search")
    assert [item.get_attribute("data-change") for item in css(browser, "#opt-out-history li")] \
        == [h["change"] for h in api(service, "/opt-outs/%2B15558670001")["history"]] \
        == ["opted_out"]
    assert first(browser, "#opted-out").text.startswith("yes since")
    screenshot(browser, request, "opt-out")

    browser.get(service.url + f"/dashboard/messages/{service.sids[number]}")
    badge = first(browser, "#recipient-opted-out")
    assert badge.text.startswith("opted out") and "(keyword)" in badge.text
    screenshot(browser, request, "message-opted-out")
    assert console_errors(browser) == []


def test_a_session_ends_once_its_key_is_revoked(service, browser, request):
    """A support person's key, with read alone: the header names it, the admin's retry is
    not offered, its messages are found by the key that sent them; once the key is revoked
    with the real command, the next page leads to the login form."""
    env = service.env
    flask = [str(Path(sys.executable).parent / "flask"), "--app", str(ROOT / "app.py"), "keys"]
    created = subprocess.run([*flask, "create", "support-desk", "--scope", "read"], env=env,
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert created.returncode == 0, created.stderr
    key = next(line for line in created.stdout.splitlines() if line.startswith("sk_"))
    log_in(browser, service, key=key)
    wait_for_page(browser, "/dashboard")
    assert first(browser, "#key-name").text == "support-desk"
    browser.get(service.url + f"/dashboard/messages/{service.sids['+15005551003']}")
    assert first(browser, "#sent-by").text == "API_KEY"
    assert css(browser, "form.retry") == [], "retrying needs the admin scope"
    first(browser, "#sent-by a").click()
    wait_until(lambda: "sentBy=API_KEY" in browser.current_url, 10, "the search by key")
    assert len(css(browser, "#messages tbody tr")) == len(SENDS)
    screenshot(browser, request, "messages-by-key")

    revoked = subprocess.run([*flask, "revoke", "support-desk"], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert revoked.returncode == 0, revoked.stderr
    time.sleep(1.0)  # the contract's bound
    browser.get(service.url + "/dashboard/messages")
    wait_for_page(browser, "/dashboard/login")
    log_in(browser, service, key=key)
    assert "not an active key of this service" in first(browser, ".problem").text
    assert console_errors(browser, expected=["/dashboard/login - Failed to load resource: "
                                             "the server responded with a status of 401"]) == []
