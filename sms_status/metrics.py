"""The service's Prometheus metrics: every definition, the calls that record them, and the
text GET /metrics answers (prometheus_client).

Under gunicorn every worker process writes its numbers to files in a folder of its own
server start, and GET /metrics, whichever worker answers it, sums all workers' files:
prometheus_client's multiprocess mode. gunicorn.conf.py makes the folder before the first
worker starts (`start_folder`), names it in PROMETHEUS_MULTIPROC_DIR, folds the files of
each worker that ends into those of the workers that ended before it (`worker_gone`), and
removes the folder when the server stops. Outside gunicorn (`python app.py`, Flask's test
client, the commands) the numbers live in the process.

prometheus_client chooses between the two when it is first imported, from the
environment. gunicorn's master loads the app before any hook runs, so the library is not
imported with this module: the metrics are made by the first call that records one, in a
worker, after the folder is named.
"""

import fcntl
import glob
import os
import shutil
import sys
import threading
import time
from contextlib import contextmanager

from flask import g, request

from sms_status.keywords import KINDS
from sms_status.rules import STATUS_RANK
from sms_status.serving import folders

PREFIX = "sms_status_"
FOLDER_PREFIX = "sms-status-metrics-"
# Each histogram's bucket bounds, in seconds: around what each duration usually is.
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
TWILIO_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
WRITE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)
CALLBACK_RESULTS = ("stored", "repeat", "bad_signature", "invalid")
SEND_OUTCOMES = ("sent", "invalid", "destination_refused", "limited", "rejected_by_twilio",
                 "twilio_failed", "opted_out")
# What an inbound message was: "message" is an ordinary reply.
INBOUND_KINDS = KINDS
# Why an inbound message was refused, as a status callback's refusals are counted.
INBOUND_REFUSALS = ("bad_signature", "invalid")
WEBHOOK_RESULTS = ("delivered", "retrying", "gave_up")
# The route label of a request that matched no route (404, or 405 for a wrong method).
UNMATCHED = "unmatched"
# In a start's folder: what the workers that ended counted (counter_ended.db, ...), and the
# lock that keeps scrapes from reading while those files change (not *.db: not a metric's).
FOLDED = "ended"
LOCK_FILE = "scrapes.lock"
# How long a worker's end waits for the scrapes under way before its files are folded.
FOLD_WAIT_SECONDS = 1.0


class Metrics:
    """Every metric of the service. Label values are fixed sets (a callback's status that is
    not one of Twilio's known ones counts as "other"), and HTTP requests are labelled by
    their route's pattern, so callers cannot grow the number of series."""

    def __init__(self):
        from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

        # The *_created series: only in a single process, and Prometheus does not need them.
        disable_created_metrics()

        def counter(name, documentation, label):
            return Counter(PREFIX + name, documentation, [label])

        def histogram(name, documentation, labels, buckets):
            return Histogram(PREFIX + name, documentation, labels, buckets=buckets)

        self.callbacks = counter("callbacks_total", "Status callbacks by result", "result")
        self.sends = counter("sends_total", "POST /send-sms attempts by outcome", "outcome")
        self.inbound = counter("inbound_total", "Inbound messages stored, by kind: message, "
                               "opt_out, opt_in or help (a keyword, or Twilio's OptOutType)",
                               "kind")
        self.inbound_refused = counter("inbound_refused_total", "Inbound messages refused, "
                                       "by reason: bad_signature or invalid", "reason")
        self.status_changes = counter("status_changes_total", "New message statuses stored "
                                      "from Twilio's callbacks, by status", "status")
        self.twilio_seconds = histogram("twilio_request_duration_seconds",
                                        "Calls to Twilio's API", ["operation"], TWILIO_BUCKETS)
        self.write_seconds = histogram("database_write_duration_seconds", "Database writes, "
                                       "by the storage function", ["operation"], WRITE_BUCKETS)
        self.http_requests = Counter(PREFIX + "http_requests_total",
                                     "HTTP requests by route and status code", ["route", "code"])
        self.http_seconds = histogram("http_request_duration_seconds",
                                      "HTTP requests by route", ["route"], HTTP_BUCKETS)
        self.webhook_deliveries = counter(
            "webhook_deliveries_total", "Status webhook attempts by result: delivered, "
            "retrying (failed, attempted again later) or gave_up (failed, the last one)", "result")
        # Set by the process that answers a scrape, from the database: the most recent counts.
        self.webhook_backlog = Gauge(PREFIX + "webhook_backlog", "Status webhook events still "
                                     "to be delivered (pending)",
                                     multiprocess_mode="livemostrecent")
        # The label sets known in advance count from 0, so that rate() sees their first rise.
        for result in CALLBACK_RESULTS:
            self.callbacks.labels(result)
        for outcome in SEND_OUTCOMES:
            self.sends.labels(outcome)
        for result in WEBHOOK_RESULTS:
            self.webhook_deliveries.labels(result)
        for kind in INBOUND_KINDS:
            self.inbound.labels(kind)
        for reason in INBOUND_REFUSALS:
            self.inbound_refused.labels(reason)
        # One request's labelled children, kept: labels() costs a lock and a lookup each time.
        self.children = {}

    def child(self, metric, *labels):
        key = (id(metric), labels)
        found = self.children.get(key)
        if found is None:
            found = self.children[key] = metric.labels(*labels)
        return found


_made = None
_making = threading.Lock()


def metrics():
    """This process's metrics, made on first use."""
    global _made
    if _made is None:
        with _making:
            if _made is None:
                _made = Metrics()
    return _made


def count_callback(result):
    """One status callback: stored, repeat, bad_signature or invalid."""
    found = metrics()
    found.child(found.callbacks, result).inc()


def count_status_change(status):
    found = metrics()
    found.child(found.status_changes, status if status in STATUS_RANK else "other").inc()


def count_send(outcome):
    found = metrics()
    found.child(found.sends, outcome).inc()


def count_inbound_refused(reason):
    """One inbound message refused: bad_signature or invalid."""
    found = metrics()
    found.child(found.inbound_refused, reason).inc()


def count_inbound(kind):
    """One inbound message stored (not a repeat), by its kind."""
    found = metrics()
    found.child(found.inbound, kind if kind in INBOUND_KINDS else "other").inc()


def observe_twilio_call(operation, seconds):
    found = metrics()
    found.child(found.twilio_seconds, operation).observe(seconds)


def observe_write(operation, seconds):
    found = metrics()
    found.child(found.write_seconds, operation).observe(seconds)


def count_webhook_attempt(result):
    """One status webhook attempt: delivered, retrying or gave_up."""
    found = metrics()
    found.child(found.webhook_deliveries, result).inc()


def set_webhook_backlog(pending):
    metrics().webhook_backlog.set(pending)


def request_started():
    """Flask before_request hook: the request's clock starts."""
    g.metrics_started = time.perf_counter()


def request_finished(response):
    """Flask after_request hook: counts the request by its route's pattern and code."""
    started = g.get("metrics_started")
    rule = request.url_rule
    route = rule.rule if rule is not None else UNMATCHED
    found = metrics()
    found.child(found.http_requests, route, str(response.status_code)).inc()
    if started is not None:
        found.child(found.http_seconds, route).observe(time.perf_counter() - started)
    return response


def register(app):
    """Times and counts every request of `app`; call before the other request hooks."""
    app.before_request(request_started)
    app.after_request(request_finished)


def exposition():
    """(body, content type) of GET /metrics: every worker's numbers summed under gunicorn,
    this process's otherwise."""
    from prometheus_client import (
        CONTENT_TYPE_PLAIN_0_0_4,
        REGISTRY,
        CollectorRegistry,
        generate_latest,
    )

    metrics()  # so that a scrape before any request shows the metrics at 0
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not folder:
        return generate_latest(REGISTRY), CONTENT_TYPE_PLAIN_0_0_4
    registry = CollectorRegistry()
    registry.register(WorkersCollector(folder))
    with folder_lock(folder, exclusive=False):  # never halfway through a fold
        return generate_latest(registry), CONTENT_TYPE_PLAIN_0_0_4


class WorkersCollector:
    """Reads every worker's files, as prometheus_client's MultiProcessCollector does, except
    those a starting worker has just created and not yet sized: read then, they are empty,
    and the library failed the whole scrape (a 500 whenever a worker started meanwhile)."""

    def __init__(self, folder):
        self.folder = folder

    def collect(self):
        from prometheus_client.multiprocess import MultiProcessCollector

        files = []
        for path in glob.glob(os.path.join(self.folder, "*.db")):
            try:
                if os.path.getsize(path) > 0:
                    files.append(path)
            except FileNotFoundError:
                pass  # a live gauge of a worker that has just ended
        return MultiProcessCollector.merge(files, accumulate=True)


# --- gunicorn: the folder of one server start (gunicorn.conf.py) -----------------------

def start_folder():
    """Makes this server start's empty folder, private to this user, in the temporary
    directory ($TMPDIR), names it in PROMETHEUS_MULTIPROC_DIR for the workers to come, and
    removes the folders of earlier starts that ended without removing theirs (killed).

    Run by gunicorn's master before its first worker, and before prometheus_client is
    imported in it: the library reads the variable once, at its import.
    """
    if "prometheus_client" in sys.modules:
        raise RuntimeError("prometheus_client was imported before PROMETHEUS_MULTIPROC_DIR was "
                           "set: the workers' metrics would not be summed")
    folder = folders.make_folder(FOLDER_PREFIX)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    return folder


def worker_gone(pid, folder):
    """A worker ended: its live gauges stop counting, and its counters and histograms are
    added to those of the workers that ended before it (`fold_ended_workers`)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, folder)
    fold_ended_workers(folder)


def fold_ended_workers(folder, wait=FOLD_WAIT_SECONDS):
    """Adds the counters and histograms of every worker that has ended into one file per
    type (`counter_ended.db`, `histogram_ended.db`) and removes the workers' own, so that the
    folder keeps a few files per live worker however many came and went (a worker replaced
    every few requests left two files each, and scrapes slowed as they piled up), while
    every total stays exact.

    Scrapes wait meanwhile (`folder_lock`), so none reads a worker's numbers twice or not
    at all. If scrapes hold the folder for longer than `wait` seconds, the files stay,
    still counted, until the next worker ends; returns whether it folded.
    """
    from prometheus_client.mmap_dict import MmapedDict

    with folder_lock(folder, exclusive=True, wait=wait) as locked:
        if not locked:
            return False
        for kind in ("counter", "histogram"):
            ended = [path for path in glob.glob(os.path.join(folder, f"{kind}_*.db"))
                     if _has_ended(path, kind)]
            if not ended:
                continue
            into = os.path.join(folder, f"{kind}_{FOLDED}.db")
            totals = {}  # a series' key, as the library writes it: its value over every file
            for path in [into, *ended] if os.path.exists(into) else ended:
                for key, value, _, _ in MmapedDict.read_all_values_from_file(path):
                    totals[key] = totals.get(key, 0.0) + value
            # Written aside under a name scrapes do not read, then put in place at once.
            new = into + ".new"
            if os.path.exists(new):
                os.remove(new)
            written = MmapedDict(new)
            try:
                for key, value in totals.items():
                    written.write_value(key, value, 0.0)
            finally:
                written.close()
            os.replace(new, into)
            for path in ended:
                os.remove(path)
    return True


def _has_ended(path, kind):
    """Whether the process that wrote `path` (`<kind>_<pid>.db`) is gone."""
    try:
        pid = int(os.path.basename(path)[len(kind) + 1:-len(".db")])
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (ValueError, OSError):
        pass  # not a worker's file (the folded one), or its worker still runs
    return False


@contextmanager
def folder_lock(folder, exclusive, wait=None):
    """Holds the folder's lock for the block, shared (scrapes) or exclusive (a fold); yields
    False when an exclusive lock could not be had within `wait` seconds."""
    descriptor = os.open(os.path.join(folder, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if not exclusive:
            fcntl.flock(descriptor, fcntl.LOCK_SH)
            yield True
            return
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(0.005)
        yield True
    finally:
        os.close(descriptor)  # and with it the lock


def remove_folder(folder):
    shutil.rmtree(folder, ignore_errors=True)
