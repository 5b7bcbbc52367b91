"""One attempt to deliver an event: an HTTP POST that ends within its deadline.

STATUS_WEBHOOK_TIMEOUT bounds the whole attempt, from connecting to the end of the answer.
A socket timeout alone would not: it bounds each read, and a receiver that trickles a byte
at a time could hold the attempt for ever. So the delivery loop calls `abort()` on an
attempt past its deadline, which shuts its connection down under the waiting read.

Redirects are never followed, and at most MAX_ANSWER_BYTES of an answer are read.
"""

import base64
import http.client
import socket
import ssl
import time
from urllib.parse import unquote, urlsplit

MAX_ANSWER_BYTES = 4096


class Attempt:
    """A POST of `body` with `headers` to `url`, within `timeout` seconds of `start()`."""

    def __init__(self, url, body, headers, timeout, clock=time.monotonic):
        self.url, self.body, self.headers = url, body, dict(headers)
        self.timeout = timeout
        self.clock = clock
        self.deadline = None
        self.connection = None
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
            if parts.scheme == "https":
                self.connection = http.client.HTTPSConnection(
                    parts.hostname, parts.port, timeout=self.timeout,
                    context=ssl.create_default_context())
            else:
                self.connection = http.client.HTTPConnection(
                    parts.hostname, parts.port, timeout=self.timeout)
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            self.connection.request("POST", path, self.body.encode(), self.headers)
            answer = self.connection.getresponse()
            answer.read(MAX_ANSWER_BYTES)
            status = answer.status
        except Exception as error:  # every failure of the attempt is a reason, never a crash
            return self.reason(error)
        finally:
            self.close()
        if 200 <= status < 300:
            return None
        if 300 <= status < 400:
            return f"HTTP {status} (redirects are not followed)"
        return f"HTTP {status}"

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
