"""The benchmarks' own servers run the service's code, not a copy that drifts from it."""

import json
import subprocess
import sys
import time

import requests

from sms_status.webhooks.events import signed_headers
from support import (
    OTHER_WEBHOOK_SECRET,
    ROOT,
    WEBHOOK_SECRET,
    Service,
    free_port,
    procfile_command,
    service_environment,
    sign,
    wait_until,
)

BENCH = ROOT / "bench"


def test_the_no_storage_floor_serves_the_services_own_routes(tmp_path):
    """bench/webhooks.py serves the floor with bench/ on the path: the service's modules must
    still be its own (a bench module once shadowed one, and GET /messages answered 500)."""
    port = free_port()
    env = service_environment(port, f"sqlite:///{tmp_path}/floor.db", simulate=False,
                              GUNICORN_THREADS=4)
    argv = [procfile_command()[0], "-c", "gunicorn.conf.py", "--pythonpath", str(BENCH),
            "floor_app:app"]
    floor = Service(env, tmp_path / "floor.log", argv).start()
    try:
        auth = {"Authorization": f"Bearer {env['API_KEY']}"}
        listing = requests.get(floor.url + "/messages", headers=auth, timeout=10)
        assert listing.status_code == 200, listing.text
        assert listing.json() == {"messages": [], "nextCursor": None}
        params = {"MessageSid": "SM" + "f" * 32, "MessageStatus": "delivered"}
        callback = requests.post(floor.url + "/message-status", data=params, timeout=10,
                                 headers={"X-Twilio-Signature": sign(
                                     env["BASE_URL"] + "/message-status", params)})
        assert callback.json() == {"received": True, "duplicate": False}
    finally:
        floor.kill()


def test_the_webhook_benchmarks_receiver_verifies_every_signature(tmp_path):
    """bench/webhook_events.py fails on an event with a bad signature only if its receiver
    really checks them: one signed as the service signs is noted `ok` and answered 204,
    one signed with another secret is noted `bad` and answered 400."""
    port, output = free_port(), tmp_path / "arrivals.tsv"
    receiver = subprocess.Popen([sys.executable, str(BENCH / "webhook_receiver.py"), str(port),
                                 WEBHOOK_SECRET, str(output)])
    try:
        wait_until(lambda: receiver_ready(port), 20, "the receiver listening")
        body = json.dumps({"type": "message.sent", "data": {"sid": "SM" + "1" * 32,
                                                             "status": "sent"}})
        answers = [
            requests.post(f"http://127.0.0.1:{port}/events/sqlite", data=body, timeout=10,
                          headers=signed_headers(event_id, body, [secret], time.time()))
            for event_id, secret in (("evt_good", WEBHOOK_SECRET),
                                     ("evt_bad", OTHER_WEBHOOK_SECRET))]
        assert [answer.status_code for answer in answers] == [204, 400]
        lines = [line.split("\t") for line in output.read_text().splitlines()]
        assert [line[1:5] for line in lines] == [
            ["/events/sqlite", "evt_good", "SM" + "1" * 32, "sent"],
            ["/events/sqlite", "evt_bad", "SM" + "1" * 32, "sent"]]
        assert lines[0][5] == "ok"
        assert lines[1][5].startswith("bad: WebhookVerificationError")
    finally:
        receiver.terminate()
        receiver.wait(timeout=10)


def receiver_ready(port):
    try:
        return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except requests.ConnectionError:
        return False
