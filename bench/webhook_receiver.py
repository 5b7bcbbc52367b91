"""The receiver of status webhooks that bench/webhook_events.py runs in a process of its own:
`python bench/webhook_receiver.py PORT SECRET OUTPUT`.

Verifies every request's signature with Standard Webhooks' own library (as a sender's
application would), answers 204 when it holds and 400 when it does not, and appends one
line per request to OUTPUT, written as it arrives:

    <arrival, seconds since the epoch>\\t<path>\\t<webhook-id>\\t<sid>\\t<status>\\t<verdict>

where the verdict is `ok`, or `bad: <why>`. GET /healthz answers 200 once it listens.
"""

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks import Webhook, WebhookVerificationError


def field(text):
    """A value fit for one tab-separated field of one line."""
    return " ".join(str(text).split())[:200] or "-"


def arrival_line(webhook, arrived, path, headers, body):
    """The line recorded for one request, and whether its signature holds."""
    try:
        data = webhook.verify(body, headers)["data"]
        sid, status, verdict = data["sid"], data["status"], "ok"
    except (WebhookVerificationError, ValueError, KeyError, TypeError) as error:
        verdict = f"bad: {type(error).__name__} {error}"
        try:
            data = json.loads(body)["data"]
            sid, status = data["sid"], data["status"]
        except (ValueError, KeyError, TypeError):
            sid = status = "-"
    line = "\t".join(field(value) for value in (
        path, headers.get("webhook-id", ""), sid, status, verdict))
    return f"{arrived:.6f}\t{line}\n", verdict == "ok"


def serve(port, secret, output):
    webhook = Webhook(secret)
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            arrived = time.time()
            headers = {name.lower(): value for name, value in self.headers.items()}
            line, ok = arrival_line(webhook, arrived, self.path, headers, body)
            with lock:
                output.write(line)
            self.send_response(204 if ok else 400)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self):
            self.send_response(200 if self.path == "/healthz" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        # The service opens a connection per attempt, up to 16 at once per worker: the
        # default backlog of 5 would drop connections (the sender retries after a second).
        request_queue_size = 1024

    Server(("127.0.0.1", port), Handler).serve_forever()


if __name__ == "__main__":
    with open(sys.argv[3], "a", buffering=1) as out:  # a line each: readable as it arrives
        serve(int(sys.argv[1]), sys.argv[2], out)
