"""gunicorn's threaded worker (with read_deadline.py's deadline), where GET /healthz has
threads of its own.

gthread hands every request to one pool of GUNICORN_THREADS threads. When all of them wait
(on SQLite's writer process, a stopped PostgreSQL server, Twilio), /healthz waited in the
pool's queue behind them: 10.9 s, where a load balancer needs its 503 at once.

Here the worker's main loop looks at each request before giving it a thread: it peeks at
the bytes that have arrived on the connection, without reading them, and a complete
`GET /healthz` (or HEAD) goes to a small pool of its own, HEALTH_THREADS threads that run
the app as usual. The app answers /healthz from its health monitor, never waiting on the
database (web/health.py), so these threads are never held for long. Everything else goes to
the main pool, as before. A new connection whose first bytes have not arrived yet waits for
them on the main loop's poller, as kept-alive connections do, instead of in a thread, so
that its request can be looked at too; after gthread's 5 s it is handed on as gthread
would (it waits on the poller until the keep-alive timeout closes it).

Over TLS (gunicorn's certfile) nothing can be read before the handshake: every request
goes to the main pool.
"""

import re
import selectors
import socket
import time
from collections import deque
from concurrent import futures
from functools import partial

from gunicorn.workers.gthread import DEFAULT_WORKER_DATA_TIMEOUT

from sms_status.serving.read_deadline import ThreadWorker

HEALTH_THREADS = 4
# A request line and headers of a health probe fit in this; a longer one takes the main pool.
PEEK_BYTES = 4096
HEALTH_REQUEST = re.compile(rb"(GET|HEAD) /healthz(\?[^ \r\n]*)? HTTP/1\.[01]\r\n")


class HealthLaneWorker(ThreadWorker):
    """ThreadWorker whose complete /healthz requests are served by threads of their own."""

    def init_process(self):
        self.health_pool = futures.ThreadPoolExecutor(max_workers=HEALTH_THREADS,
                                                      thread_name_prefix="healthz")
        self.arriving = deque()  # new connections waiting for their first bytes, oldest first
        super().init_process()  # runs the worker's loop

    def run(self):
        try:
            super().run()
        finally:
            self.health_pool.shutdown(wait=False)

    def enqueue_req(self, conn):
        """Gives the connection's next request a thread of the health pool or the main one,
        or waits on the poller for a new connection's first bytes."""
        if self.cfg.is_ssl:
            super().enqueue_req(conn)
            return
        waiting_for_first_bytes = not conn.initialized and not conn.data_ready
        arrived = _peek(conn.sock)
        if arrived is None and waiting_for_first_bytes:
            self._wait_for_first_bytes(conn)
            return
        if waiting_for_first_bytes:
            conn.data_ready = True
        pool = self.health_pool if _health_probe(arrived) and not _buffered(conn) else self.tpool
        fs = pool.submit(self.handle, conn)
        fs.add_done_callback(
            lambda fut: self.method_queue.defer(self.finish_request, conn, fut))

    def _wait_for_first_bytes(self, conn):
        conn.sock.setblocking(False)
        conn.timeout = time.monotonic() + DEFAULT_WORKER_DATA_TIMEOUT
        self.arriving.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ,
                             partial(self._on_first_bytes, conn))

    def _on_first_bytes(self, conn, client):
        self.poller.unregister(client)
        self.arriving.remove(conn)
        conn.data_ready = True
        self.enqueue_req(conn)

    def murder_pending(self):
        # A new connection that sent nothing within gthread's wait in a thread (5 s) is
        # handed on as gthread hands it on: it waits until the keep-alive timeout.
        now = time.monotonic()
        while self.arriving and self.arriving[0].timeout <= now:
            conn = self.arriving.popleft()
            self.poller.unregister(conn.sock)
            conn.timeout = now + self.cfg.keepalive
            self.pending_conns.append(conn)
            self.poller.register(conn.sock, selectors.EVENT_READ,
                                 partial(self.on_pending_socket_readable, conn))
        super().murder_pending()


def _peek(sock):
    """The bytes that have arrived on `sock`, left unread; None when none have yet."""
    try:
        return socket.socket.recv(sock, PEEK_BYTES, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return None
    except OSError:
        return b""  # the thread that handles it meets the error and closes the connection


def _health_probe(arrived):
    """Whether `arrived` is a whole GET or HEAD /healthz without a body."""
    if not arrived or not HEALTH_REQUEST.match(arrived) or b"\r\n\r\n" not in arrived:
        return False
    headers = arrived[:arrived.index(b"\r\n\r\n")].lower()
    return b"\ncontent-length:" not in headers and b"\ntransfer-encoding:" not in headers


def _buffered(conn):
    """Whether the connection's parser already holds bytes of its next request (read ahead
    while draining a body): those, not the socket's, are the next request."""
    return conn.parser is not None and bool(conn.parser.unreader.buf.getvalue())
