"""One attempt to deliver an event: an HTTP POST that ends within its deadline.

STATUS_WEBHOOK_TIMEOUT bounds the whole attempt, from connecting to the end of the answer.
A socket timeout alone would not: it bounds each read, and a receiver that trickles a byte
at a time could hold the attempt for ever. So the delivery loop calls `abort()` on an
attempt past its deadline, which shuts its connection down under the waiting read.

Redirects are never followed, and at most MAX_ANSWER_BYTES of an answer are read.

Each attempt thread keeps its connection to the receiver open for the next attempt when
the answer allows it (HTTP/1.1 keep-alive, an answer read to its end): a new connection
(and TLS handshake) per event cost both sides more than the event itself. A kept
connection the receiver has closed meanwhile fails before any answer; the attempt is then
made once more on a new connection, at once.
"""

import base64
import http.client
import socket
import ssl
import threading
import time
from urllib.parse import unquote, urlsplit

MAX_ANSWER_BYTES = 4096
# An attempt thread's open connection: (scheme, host, port) -> HTTPConnection.
_kept = threading.local()
# What a kept connection that the receiver closed meanwhile fails with, before any answer.
STALE_CONNECTION_ERRORS = (http.client.RemoteDisconnected, ConnectionResetError,
                           BrokenPipeError)


class Attempt:
    """A POST of `body` with `headers` to `url`, within `timeout` seconds of `start()`."""

    def __init__(self, url, body, headers, timeout, clock=time.monotonic):
        self.url, self.body, self.headers = url, body, dict(headers)
        self.timeout = timeout
        self.clock = clock
        self.deadline = None
        self.connection = None
        self.reused = False
        self.aborted = False

    def run(self):
        """Makes the attempt; returns None when delivered (any 2xx), else a short reason
        such as `HTTP 500`, `timed out after 15 s` or `connection refused`."""
        self.deadline = self.clock() + self.timeout
        parts = urlsplit(self.url)
        if parts.username is not None:
            credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            self.headers["Authorization"] = "Basic " + base64.b64encode(
                credentials.encode()).decode()
        try:
            status = self.post(parts, reuse=True)
        except STALE_CONNECTION_ERRORS as error:
            if not self.reused or self.aborted:
                return self.reason(error)
            try:
                status = self.post(parts, reuse=False)
            except Exception as error:  # every failure of the attempt is a reason
                return self.reason(error)
        except Exception as error:  # every failure of the attempt is a reason, never a crash
            return self.reason(error)
        if 200 <= status < 300:
            return None
        if 300 <= status < 400:
            return f"HTTP {status} (redirects are not followed)"
        return f"HTTP {status}"

    def post(self, parts, reuse):
        """Sends the request and reads the answer; returns its status. The connection is
        kept for the thread's next attempt when the answer was read to its end."""
        key = (parts.scheme, parts.hostname, parts.port)
        kept = getattr(_kept, "connections", None)
        if kept is None:
            kept = _kept.connections = {}
        self.connection = kept.pop(key, None) if reuse else None
        self.reused = self.connection is not None
        if self.connection is None:
            if parts.scheme == "https":
                self.connection = http.client.HTTPSConnection(
                    parts.hostname, parts.port, timeout=self.timeout,
                    context=ssl.create_default_context())
            else:
                self.connection = http.client.HTTPConnection(
                    parts.hostname, parts.port, timeout=self.timeout)
        elif self.connection.sock is not None:
            self.connection.sock.settimeout(self.timeout)
        try:
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            self.connection.request("POST", path, self.body.encode(), self.headers)
            answer = self.connection.getresponse()
            answer.read(MAX_ANSWER_BYTES)
        except BaseException:
            self.close()
            raise
        if answer.isclosed() and not answer.will_close and not self.aborted:
            kept[key] = self.connection  # read to its end: the next attempt reuses it
        else:
            self.close()
        return answer.status

    def reason(self, error):
        """The words for why an attempt failed."""
        if self.aborted or isinstance(error, (TimeoutError, socket.timeout)):
            return f"timed out after {self.timeout:g} s"
        if isinstance(error, ConnectionRefusedError):
            return "connection refused"
        if isinstance(error, socket.gaierror):
            return f"cannot resolve host {urlsplit(self.url).hostname}"
        if isinstance(error, ssl.SSLCertVerificationError):
            return f"TLS error: {error.verify_message}"
        if isinstance(error, ssl.SSLError):
            return f"TLS error: {error.reason or error}"
        if isinstance(error, (ConnectionResetError, BrokenPipeError)):
            return "connection reset by the receiver"
        if isinstance(error, http.client.RemoteDisconnected):
            return "the receiver closed the connection without answering"
        if isinstance(error, (http.client.HTTPException, OSError)):
            return f"connection failed ({type(error).__name__})"
        return f"failed ({type(error).__name__})"

    def overdue(self, now):
        return self.deadline is not None and now >= self.deadline

    def abort(self):
        """Ends the attempt now, from another thread: its waiting read returns at once."""
        self.aborted = True
        sock = self.connection.sock if self.connection is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        if self.connection is not None:
            self.connection.close()
