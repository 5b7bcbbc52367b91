"""Faults: a disk that stops taking writes, and Twilio's API failing at the socket level."""

import socket
import sqlite3
import struct
import subprocess
import threading
import time

import pytest
import requests
from twilio.http.http_client import TwilioHttpClient

from support import AUTH, callback, count_rows, sign, sqlite_only

# --- the disk under the database fills up --------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs for the database, so the test can fill it and free it again."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"needs permission to mount a tmpfs: {result.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def fill(directory):
    """Writes a filler file until the disk is full."""
    filler = directory / "filler"
    with open(filler, "wb") as out:
        try:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        except OSError:
            pass
    try:
        with open(directory / "filler2", "wb") as out:
            while True:
                out.write(b"\0" * 512)
                out.flush()
    except OSError:
        pass
    return [filler, directory / "filler2"]


@sqlite_only
def test_full_disk_answers_503_never_200_and_recovers_without_restart(
        small_disk, service_env, start_service):
    env = service_env(simulate=False, DATABASE_URL=f"sqlite:///{small_disk}/status.db")
    service = start_service(env)
    url = service.url + "/message-status"
    # A new connection per request: the test waits past gunicorn's 2 s keep-alive between
    # requests, and a kept connection may be closed by the server as the next one goes out.
    session = requests

    def post(n):
        params = callback(f"SM{n:032x}", "delivered")
        return session.post(url, data=params, timeout=10, headers={
            "X-Twilio-Signature": sign(env["BASE_URL"] + "/message-status", params)})

    acknowledged = [n for n in range(20) if post(n).status_code == 200]
    assert len(acknowledged) == 20
    fillers = fill(small_disk)

    answers = {}
    for n in range(20, 1020):
        answers[n] = post(n).status_code
        if answers[n] != 200:
            break
    assert set(answers.values()) <= {200, 503}, answers
    assert 503 in answers.values(), "a full disk must not be answered 200"
    acknowledged += [n for n, status in answers.items() if status == 200]
    # /healthz answers from a probe of at most about 1.8 s ago; past that, it must agree
    # with the callbacks every time: its write is as large as theirs, never a tiny one that
    # still fits where a status update does not.
    rounds = []
    for n in range(2000, 2005):
        time.sleep(2)
        health = [session.get(service.url + "/healthz", timeout=10) for _ in range(4)]
        rounds.append(([h.status_code for h in health], post(n).status_code))
        acknowledged += [n] if rounds[-1][1] == 200 else []
    assert not [r for r in rounds if 200 in r[0] and r[1] == 503], rounds
    # While the disk stays full, a write can still succeed where a checkpoint let SQLite
    # reuse the WAL's space: such a 200 is stored like any other (checked below).
    assert {r[1] for r in rounds} <= {200, 503}, rounds

    for filler in fillers:
        filler.unlink()
    recovered = post(5000)
    assert recovered.status_code == 200
    acknowledged.append(5000)
    time.sleep(2)
    assert session.get(service.url + "/healthz", timeout=10).status_code == 200

    conn = sqlite3.connect(f"{small_disk}/status.db")
    stored = {row[0] for row in conn.execute("SELECT message_sid FROM status_events")}
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    assert {f"SM{n:032x}" for n in acknowledged} <= stored
    assert f"SM{[n for n, s in answers.items() if s == 503][0]:032x}" not in stored
    assert "Traceback" not in service.logs()


# --- Twilio's API failing at the transport ---------------------------------------------------

class MisbehavingTwilio:
    """A local server in place of api.twilio.com that fails in one way, on real sockets."""

    def __init__(self, mode):
        self.mode = mode
        self.stop = threading.Event()
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        if mode == "refused":
            self.server.close()  # nothing listens on the port
            return
        self.server.listen(16)
        self.server.settimeout(0.2)
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                continue
            threading.Thread(target=self.answer, args=(conn,), daemon=True).start()

    def answer(self, conn):
        conn.recv(65536)
        if self.mode == "reset":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif self.mode == "timeout":
            self.stop.wait(10)
        elif self.mode == "500":
            body = b'{"code": 20500, "message": "Internal Server Error", "status": 500}'
            conn.sendall(b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json"
                         b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        elif self.mode == "malformed":
            body = b'{"sid": "SM1", "status": '
            conn.sendall(b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        conn.close()

    def close(self):
        self.stop.set()
        self.server.close()


class RedirectedTwilioHttpClient(TwilioHttpClient):
    """Twilio's own transport, pointed at a local server instead of api.twilio.com."""

    def __init__(self, base, timeout):
        super().__init__(timeout=timeout)
        self.base = base

    def request(self, method, uri, *args, **kwargs):
        return super().request(method, uri.replace("https://api.twilio.com", self.base),
                               *args, **kwargs)


MODES = [
    pytest.param("refused", 502, id="connection-refused"),
    pytest.param("reset", 502, id="connection-reset"),
    pytest.param("timeout", 504, id="timeout"),
    pytest.param("500", 502, id="http-500"),
    pytest.param("malformed", 502, id="malformed-json"),
]


@pytest.fixture
def broken_twilio_app(request, make_app):
    twilio = MisbehavingTwilio(request.param)
    transport = RedirectedTwilioHttpClient(f"http://127.0.0.1:{twilio.port}", timeout=0.5)
    yield make_app(http_client=transport, TWILIO_TIMEOUT="0.5")
    twilio.close()


@pytest.mark.parametrize("broken_twilio_app, status", MODES, indirect=["broken_twilio_app"])
def test_sends_fail_clearly_and_store_nothing(broken_twilio_app, status):
    client = broken_twilio_app.test_client()
    started = time.monotonic()
    response = client.post("/send-sms", json={"to": "+15558675309", "body": "hi"}, headers=AUTH)
    assert time.monotonic() - started < 5
    assert response.status_code == status
    answer = response.get_json()
    assert answer["success"] is False and answer["error"] and answer["details"]
    assert count_rows(broken_twilio_app, "messages") == 0
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize("broken_twilio_app, status", MODES, indirect=["broken_twilio_app"])
def test_reconciliation_survives_each_failure(broken_twilio_app, status):
    from support import CALLBACK_URL
    client = broken_twilio_app.test_client()
    sid = "SM" + "ab" * 16
    params = callback(sid, "queued")
    client.post("/message-status", data=params,
                headers={"X-Twilio-Signature": sign(CALLBACK_URL, params)})
    result = broken_twilio_app.test_cli_runner().invoke(
        args=["reconcile", "--older-than", "0s"])
    assert result.exit_code == 1, result.output
    assert f"{sid} queued: fetch failed" in result.output
    assert "may or may not have been sent" not in result.output
    assert "0 updated, 0 unchanged, 0 not found at Twilio, 1 failed" in result.output
    assert count_rows(broken_twilio_app, "status_events") == 1
    status_now = client.get(f"/get-status/{sid}", headers=AUTH).get_json()["latestStatus"]
    assert status_now == "queued"


def test_misbehaving_server_really_is_reached():
    """Guards the fixtures above: the redirect reaches the local server (no network use)."""
    twilio = MisbehavingTwilio("500")
    try:
        answer = RedirectedTwilioHttpClient(f"http://127.0.0.1:{twilio.port}", 1).request(
            "GET", "https://api.twilio.com/2010-04-01/Accounts.json")
        assert answer.status_code == 500
    finally:
        twilio.close()
