"""gunicorn settings for `gunicorn app:app` (read automatically from the working directory)."""

import os
import resource
import socket
import sys

from dotenv import load_dotenv

# The same .env the app reads, so PORT and the worker settings in it apply here too.
load_dotenv(os.path.join(os.getcwd(), ".env"), override=False)

from sms_status import metrics  # noqa: E402
from sms_status.config import (  # noqa: E402
    ENDPOINTS_OPEN_WITHOUT_KEY,
    ConfigError,
    server_settings,
    serves_locally_only,
)
from sms_status.services import services  # noqa: E402
from sms_status.serving.health_lane import HealthLaneWorker  # noqa: E402
from sms_status.serving.log import Logger  # noqa: E402
from sms_status.storage import writer  # noqa: E402

try:
    _port, _workers, _threads, _read_timeout = server_settings(os.environ)
except ConfigError as error:
    # One message with every problem, the app's included, as the app itself would print.
    print(error, file=sys.stderr, flush=True)
    sys.exit(2)

# Heroku-style hosts give the port in $PORT; 3000 matches `python app.py`. Simulating without
# API_KEY, every endpoint is open: then only this machine may reach it. An explicit bind
# (--bind, GUNICORN_CMD_ARGS) wins over this one.
_local_bind = f"127.0.0.1:{_port}"
bind = _local_bind if serves_locally_only(os.environ) else f"0.0.0.0:{_port}"
# Threaded workers: /send-sms waits on Twilio's API, and a waiting thread must not block a worker.
# gunicorn's gthread worker, except that a request not fully arrived within
# REQUEST_READ_TIMEOUT seconds is given up on, so slow clients cannot hold every thread, and
# that /healthz has threads of its own, so busy request threads never hold it up.
worker_class = HealthLaneWorker
HealthLaneWorker.read_timeout = _read_timeout
# Heroku sets WEB_CONCURRENCY from the dyno size.
workers = _workers
# Threads per worker: how many Twilio calls one worker can wait on at once. A client's
# kept-alive connections can all land on one worker, so one worker alone must be able to
# wait on every send a busy client has in flight (bench/sends.py: 64 callers).
threads = _threads
# Load the app in the master, so a configuration error stops the whole server once,
# instead of every worker failing to boot and being restarted forever.
preload_app = True
# Below the 30 s a Heroku-style host waits between SIGTERM and SIGKILL.
timeout = 25
graceful_timeout = 20
# No control socket: one default path would be shared by every instance on the host.
control_socket_disable = True
# No access log: the app already logs one line per send and per callback, and a second
# line per request cost callbacks/s (docs/performance.md, "Earlier choices").
# GUNICORN_CMD_ARGS="--access-logfile -" turns it back on.
accesslog = None
# gunicorn's own lines in the service's format, so that the log has one (serving/log.py).
logger_class = Logger


def _open_files_limit():
    """Raises this process's soft limit on open files to the hard one (workers inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


_files = _open_files_limit()
# Connections a worker holds at once (gthread counts kept-alive ones too), bounded by its
# descriptors: past the limit, accept() failing with "Too many open files" killed workers.
# Each thread needs up to five more (SQLite's database, WAL and index, or a pooled
# PostgreSQL connection; its connection to the writer process; one to Twilio), plus a
# margin for logs, the listening socket and the lock file. Connections beyond it wait in
# the listen backlog.
worker_connections = max(_files - 5 * _threads - 64, 16)


def on_starting(server):
    # Before the first worker: each writes its metrics into this start's folder, and
    # GET /metrics sums them (sms_status/metrics.py).
    server.metrics_folder = metrics.start_folder()
    server.log.info("Open files limit %d per process: up to %d connections per worker",
                    _files, worker_connections)
    if serves_locally_only(os.environ):
        open_endpoints = ", ".join(ENDPOINTS_OPEN_WITHOUT_KEY)
        if server.cfg.bind == [_local_bind]:
            server.log.info("Simulating without API_KEY: %s need no key, so the service "
                            "listens on 127.0.0.1 only; set API_KEY (or --bind) to serve "
                            "other interfaces", open_endpoints)
        else:
            server.log.warning("Simulating without API_KEY: %s need no key and are open to "
                               "anyone who reaches %s", open_endpoints,
                               ", ".join(server.cfg.bind))


# worker_exit (below) closes no database connections: gthread's threads may still be
# inside a request when it runs, and closing a SQLite connection under a running query
# answered 500 or crashed the worker (SIGSEGV). The process ends right after; its
# descriptors close with it, committed data is already in SQLite's WAL (or PostgreSQL),
# and an uncommitted transaction is rolled back as after any crash.


def when_ready(server):
    """Before the first worker: sends simulated callbacks where gunicorn listens (below).

    On SQLite, starts the writer process (writer.py) before the first worker: every write
    goes through it, batched into one commit, off the workers' request threads.

    Not on PostgreSQL: there, writes run side by side on pooled connections, and one writer
    would make each write's round trips to the server wait for the writes before it
    (measured and reasoned in docs/architecture.md and docs/performance.md).
    """
    app = server.app.wsgi()
    _callbacks_where_listening(server, app)
    storage = services(app).storage
    if not storage.features.writer_process:
        return
    server.database_writer = writer.Supervisor()
    server.database_writer.start()
    storage.writer = writer.Client(server.database_writer.socket_path)


def _callbacks_where_listening(server, app):
    """Simulating without BASE_URL, the simulated status callbacks go to the address gunicorn
    listens on, which --bind or GUNICORN_CMD_ARGS may have set apart from PORT. The workers,
    forked after this, inherit it."""
    addresses = [listener.getsockname()[:2] for listener in server.LISTENERS
                 if listener.FAMILY in (socket.AF_INET, socket.AF_INET6)]
    config = app.config["SERVICE"]
    listening = config.listening_at(*addresses[0]) if addresses else config
    if listening != config:
        app.config["SERVICE"] = listening
        server.log.info("Simulated status callbacks go to %s, where gunicorn listens",
                        listening.status_callback_url)


def post_worker_init(worker):
    """Starts this worker's delivery of status webhooks (when STATUS_WEBHOOK_URL is set):
    after the fork, since threads do not survive one."""
    delivery = services(worker.wsgi).webhooks
    if delivery is not None:
        delivery.start()


def worker_exit(server, worker):
    """Lets the worker's webhook attempts in flight end for a few seconds, then gives back
    the events still in flight, for another worker, instance or the next start."""
    delivery = services(worker.wsgi).webhooks
    if delivery is not None:
        delivery.stop()


def child_exit(server, worker):
    """Drops a worker's live gauges, as prometheus_client's multiprocess mode asks, and
    folds its counters and histograms into those of the workers that ended before it."""
    if getattr(server, "metrics_folder", None) is not None:
        metrics.worker_gone(worker.pid, server.metrics_folder)


def on_exit(server):
    """Stops the writer process after the workers, so their last writes are answered, and
    removes this start's metrics folder."""
    if getattr(server, "database_writer", None) is not None:
        server.database_writer.stop()
    if getattr(server, "metrics_folder", None) is not None:
        metrics.remove_folder(server.metrics_folder)
