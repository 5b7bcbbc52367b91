"""gunicorn's gthread worker, with a deadline on reading each request.

gunicorn's threads read a request with blocking socket reads and no deadline: a client that
sends one byte, or one header line every few seconds, holds a thread for as long as it likes,
and a few hundred such clients hold every thread. No key is needed for that.

Here every read of one request (its request line, headers and body, the body being read by
the app) shares one deadline, REQUEST_READ_TIMEOUT seconds after the first read of that
request: before each read the socket's receive timeout (the kernel's, SO_RCVTIMEO) is set
to the time left. A request that has not fully arrived by then is given up on, and its
thread is freed. A timeout per read alone would not do: a client trickling a byte a second
never lets one read time out.

The trade-off: a legitimate client on a very slow link that needs longer than the deadline to
send a request (at most 64 KiB here) is cut off too. This bounds what each slow client costs;
it does not make the service immune to many of them, which a buffering proxy in front does
(deploy/nginx.conf).

Before a request's first byte gunicorn itself bounds the wait: a new connection waits at
most 5 s in a thread, then without one until the keep-alive timeout closes it; kept-alive
idle connections wait without a thread too.
"""

import socket
import struct
import time

from gunicorn.http.errors import NoMoreData
from gunicorn.workers.gthread import ThreadWorker as GthreadWorker


class RequestTooSlow(NoMoreData):
    """The request did not fully arrive before its deadline.

    A NoMoreData, so that gunicorn closes the connection quietly, as it does for a client
    that goes away; the app sees an OSError while reading the body.
    """

    def __init__(self, seconds):
        super().__init__()
        self.seconds = seconds

    def __str__(self):
        return f"the request did not arrive within {self.seconds:g} s"


class DeadlineSocket(socket.socket):
    """A client connection whose reads of one request share one deadline."""

    __slots__ = ("read_timeout", "deadline")

    @classmethod
    def adopt(cls, sock, read_timeout):
        """Takes over `sock`'s connection (the same file descriptor, the same timeout)."""
        timeout = sock.gettimeout()
        adopted = cls(fileno=sock.detach())
        adopted.settimeout(timeout)
        adopted.read_timeout = read_timeout
        adopted.deadline = None
        return adopted

    def start_request(self):
        """The next request's clock starts at its first read."""
        self.deadline = None

    def recv(self, size, flags=0):
        now = time.monotonic()
        if self.deadline is None:
            self.deadline = now + self.read_timeout
        remaining = self.deadline - now
        if remaining <= 0:
            raise RequestTooSlow(self.read_timeout)
        timeout = self.gettimeout()
        if timeout is not None:
            return self._recv_within(min(timeout, remaining), timeout, size, flags)
        # A blocking socket (every read of a request): the kernel's receive timeout bounds
        # the read. settimeout() would cost three more system calls that each give up the
        # GIL and must win it back from the worker's other threads (two ioctl()s and a
        # poll() before the read), on every request.
        while True:
            _receive_timeout(self, remaining)
            try:
                return super().recv(size, flags)
            except BlockingIOError:  # EAGAIN: the receive timeout passed
                remaining = self.deadline - time.monotonic()
                if remaining <= 0:
                    raise RequestTooSlow(self.read_timeout) from None

    def _recv_within(self, seconds, timeout, size, flags):
        """recv() within `seconds`, on a socket whose own `timeout` gunicorn set (draining a
        body it did not use, closing gracefully): the shorter of the two applies, and its
        own comes back."""
        self.settimeout(seconds)
        try:
            return super().recv(size, flags)
        except TimeoutError:
            if time.monotonic() >= self.deadline:
                raise RequestTooSlow(self.read_timeout) from None
            raise
        finally:
            self.settimeout(timeout)


def _receive_timeout(sock, seconds):
    """Sets the kernel's receive timeout (SO_RCVTIMEO) of a blocking socket: a recv() that
    waits longer fails with EAGAIN. At least a microsecond, since 0 means none."""
    microseconds = max(int(seconds * 1_000_000), 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                    struct.pack("ll", microseconds // 1_000_000, microseconds % 1_000_000))


class ThreadWorker(GthreadWorker):
    """gunicorn's gthread worker, whose threads give up on a request after `read_timeout`."""

    read_timeout = 5.0

    def handle(self, conn):
        # Runs in the thread that serves one request of the connection; gunicorn's main
        # loop does not touch the connection meanwhile.
        if not isinstance(conn.sock, DeadlineSocket):
            conn.sock = DeadlineSocket.adopt(conn.sock, self.read_timeout)
        conn.sock.start_request()
        return super().handle(conn)
