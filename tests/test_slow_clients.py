"""Slow clients: the read deadline of gunicorn's threads (read_deadline.py), and the buffering
nginx front of deploy/nginx.conf, each against the service run as the Procfile runs it."""

import http.client
import selectors
import socket
import subprocess
import threading
import time
from urllib.parse import urlencode

import pytest
import requests

from sms_status.config import SIMULATED_AUTH_TOKEN
from support import (
    ROOT,
    callback,
    free_port,
    required_program,
    sign,
    sql_rows,
    sqlite_only,
)

pytestmark = sqlite_only


class SlowClients:
    """`count` connections that each send `first`, then `piece` every `interval` seconds,
    on one thread, for at most `limit` seconds; notes when the server closes each."""

    def __init__(self, port, count, first, piece=b"", interval=0.5, limit=15):
        self.piece, self.interval, self.limit = piece, interval, limit
        self.socks = []
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(first)
            sock.setblocking(False)
            self.socks.append(sock)
        self.started = time.monotonic()
        self.closed_after = {}  # connection index: seconds after the start
        self.received = [b""] * count
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run)
        self.thread.start()

    def run(self):
        selector = selectors.DefaultSelector()
        for index, sock in enumerate(self.socks):
            selector.register(sock, selectors.EVENT_READ, index)
        next_piece = self.started + self.interval
        while not self.stop.is_set() and len(self.closed_after) < len(self.socks):
            now = time.monotonic()
            if now > self.started + self.limit:
                break
            for key, _ in selector.select(timeout=0.05):
                self.read(key.data, selector)
            if self.piece and time.monotonic() >= next_piece:
                next_piece += self.interval
                for index, sock in enumerate(self.socks):
                    if index not in self.closed_after:
                        try:
                            sock.send(self.piece)
                        except OSError:
                            self.closed(index, selector)
        selector.close()

    def read(self, index, selector):
        try:
            data = self.socks[index].recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self.received[index] += data
        if not data:
            self.closed(index, selector)

    def closed(self, index, selector):
        self.closed_after[index] = time.monotonic() - self.started
        selector.unregister(self.socks[index])

    def still_open(self):
        return len(self.socks) - len(self.closed_after)

    def close(self):
        self.stop.set()
        self.thread.join()
        for sock in self.socks:
            sock.close()


def signed_callback_request(sid, base_url, token):
    """A status callback as raw HTTP/1.1 (headers, body), signed for `base_url`."""
    params = callback(sid, "delivered")
    body = urlencode(params).encode()
    signature = sign(base_url + "/message-status", params, token)
    headers = ("POST /message-status HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               "Content-Type: application/x-www-form-urlencoded\r\n"
               f"Content-Length: {len(body)}\r\nX-Twilio-Signature: {signature}\r\n\r\n")
    return headers.encode(), body


def trickle(sock, data, pieces, seconds):
    """Sends `data` in `pieces` pieces spread over `seconds`."""
    step = -(-len(data) // pieces)
    for start in range(0, len(data), step):
        sock.sendall(data[start:start + step])
        time.sleep(seconds / pieces)


def response_of(sock):
    answer = http.client.HTTPResponse(sock)
    answer.begin()
    return answer.status, answer.read()


# --- (a) in process: the read deadline ------------------------------------------------------

READ_TIMEOUT = 1.5
SLOW_REQUESTS = {
    "one-byte": (b"P", b""),
    "header-lines": (b"POST /message-status HTTP/1.1\r\nHost: 127.0.0.1\r\n", b"X-Slow: 1\r\n"),
    "body": (b"POST /message-status HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n"
             b"Content-Type: application/x-www-form-urlencoded\r\n\r\nMessageSid=SM", b"1"),
}


@pytest.mark.parametrize("kind", SLOW_REQUESTS)
def test_slow_clients_are_cut_off_at_the_deadline_and_the_service_answers_again(
        service_env, start_service, kind):
    # Twice as many slow clients as threads: today they hold every thread for good.
    service = start_service(service_env(WEB_CONCURRENCY=1, GUNICORN_THREADS=4,
                                        REQUEST_READ_TIMEOUT=READ_TIMEOUT))
    first, piece = SLOW_REQUESTS[kind]
    slow = SlowClients(service.port, 8, first, piece, interval=0.5, limit=15)
    try:
        time.sleep(0.2)  # every slow client is accepted before the health check
        health = requests.get(service.url + "/healthz", timeout=10)
        answered_after = time.monotonic() - slow.started
        assert health.status_code == 200
        # Two rounds of four slow clients, each given up on after READ_TIMEOUT.
        assert answered_after < 2 * READ_TIMEOUT + 3
        deadline = time.monotonic() + 10
        while slow.still_open() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert slow.still_open() == 0, "every slow client is cut off"
        assert min(slow.closed_after.values()) >= READ_TIMEOUT * 0.9
        if kind == "body":
            assert all(received.startswith(b"HTTP/1.1 408 ") for received in slow.received), \
                (slow.received, service.logs())
            assert "did not arrive within 1.5 s" in service.logs()
        else:
            assert slow.received == [b""] * 8, "a request never begun is closed unanswered"
        assert "Traceback" not in service.logs()
    finally:
        slow.close()


def test_slow_but_complete_requests_and_slow_answers_are_served(service_env, start_service):
    env = service_env(REQUEST_READ_TIMEOUT=2, TWILIO_SIMULATE_LATENCY_MS=2500,
                      GUNICORN_THREADS=4)
    service = start_service(env)
    sock = socket.create_connection(("127.0.0.1", service.port), timeout=10)
    try:
        # Two requests on one kept-alive connection, each sent in pieces over 1.2 s: the
        # deadline is per request, not per connection.
        for sid in ("SM" + "a1" * 16, "SM" + "b2" * 16):
            headers, body = signed_callback_request(sid, service.url, SIMULATED_AUTH_TOKEN)
            trickle(sock, headers, 4, 0.6)
            trickle(sock, body, 4, 0.6)
            status, answer = response_of(sock)
            assert status == 200, answer
    finally:
        sock.close()
    stored = sql_rows(env["DATABASE_URL"], "SELECT message_sid FROM status_events")
    assert {"SM" + "a1" * 16, "SM" + "b2" * 16} <= {sid for (sid,) in stored}

    # An answer that takes longer than the deadline (Twilio's API takes 2.5 s here) is not
    # cut off, and the connection serves the next request.
    session = requests.Session()
    for _ in range(2):
        sent = session.post(service.url + "/send-sms", timeout=10,
                            json={"to": "+15558675309", "body": "Hello"})
        assert sent.status_code == 200, sent.text


# --- (b) the buffering front: deploy/nginx.conf ---------------------------------------------

NGINX_CONF = ROOT / "deploy" / "nginx.conf"


@pytest.fixture
def nginx_front(tmp_path):
    """deploy/nginx.conf in front of a gunicorn port, run by nginx as our own child process
    on a free local port, with every path in a temporary folder; nginx's URL."""
    binary = required_program("nginx", "nginx", ("/usr/sbin/nginx", "/usr/local/sbin/nginx"))
    processes = []

    def start(upstream_port):
        port = free_port()
        prefix = tmp_path / "nginx"
        prefix.mkdir()
        site = NGINX_CONF.read_text()
        assert site.count("listen 80;") == 1 and site.count("server 127.0.0.1:3000;") == 1
        site = site.replace("listen 80;", f"listen 127.0.0.1:{port};")
        site = site.replace("server 127.0.0.1:3000;", f"server 127.0.0.1:{upstream_port};")
        (prefix / "site.conf").write_text(site)
        temp_paths = "\n".join(f"    {name}_temp_path {prefix}/{name};"
                               for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (prefix / "nginx.conf").write_text(f"""\
# One process, a child of the test run, as the user running it.
daemon off;
master_process off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
{temp_paths}
    include {prefix}/site.conf;
}}
""")
        process = subprocess.Popen(
            [binary, "-p", str(prefix), "-e", str(prefix / "error.log"),
             "-c", str(prefix / "nginx.conf")],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        processes.append(process)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if requests.get(url + "/healthz", timeout=1).status_code == 200:
                    return url
            except requests.ConnectionError:
                time.sleep(0.1)
        error_log = prefix / "error.log"
        raise RuntimeError("nginx did not start: "
                           + (error_log.read_text() if error_log.exists() else "no log"))

    yield start
    for process in processes:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_nginx_front_keeps_the_service_answering_under_300_slow_clients(
        service_env, start_service, nginx_front):
    # Few threads and no deadline of its own to speak of: only the front can save it here.
    env = service_env(simulate=False, WEB_CONCURRENCY=1, GUNICORN_THREADS=8,
                      REQUEST_READ_TIMEOUT=60)
    service = start_service(env)
    front = nginx_front(service.port)
    port = int(front.rsplit(":", 1)[1])
    # One byte; a header line every 2 s; whole headers, then a byte of the body every 2 s.
    groups = [
        SlowClients(port, 100, b"P", limit=12),
        SlowClients(port, 100, b"POST /message-status HTTP/1.1\r\nHost: x\r\n", b"X-Slow: 1\r\n",
                    interval=2, limit=12),
        SlowClients(port, 100, SLOW_REQUESTS["body"][0], b"1", interval=2, limit=12),
    ]
    try:
        time.sleep(0.5)
        session = requests.Session()
        sids = []
        for n in range(8):
            started = time.monotonic()
            health = session.get(front + "/healthz", timeout=1)
            assert health.status_code == 200
            params = callback(f"SM{n:032x}", "delivered")
            # Signed for BASE_URL, whatever host and port the front is reached at.
            answer = session.post(front + "/message-status", data=params, timeout=1, headers={
                "X-Twilio-Signature": sign(env["BASE_URL"] + "/message-status", params)})
            assert answer.status_code == 200, answer.text
            assert time.monotonic() - started < 1
            sids.append(params["MessageSid"])
            time.sleep(0.5)
        assert sum(group.still_open() for group in groups) >= 290, \
            "the slow clients were still connected while the checks ran"
    finally:
        for group in groups:
            group.close()
    stored = {sid for (sid,) in sql_rows(env["DATABASE_URL"],
                                         "SELECT message_sid FROM status_events")}
    assert set(sids) <= stored
