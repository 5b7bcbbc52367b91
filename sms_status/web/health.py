"""What GET /healthz answers: whether a status update can be stored right now.

/healthz needs no key, so a flood of it must not become a flood of database writes that
slows the callbacks down: the outcome of the last check is reused for a second.
"""

import threading

from flask import current_app

from sms_status.storage import records as db
from sms_status.web.logs import log

# /healthz writes to the database at most this often per process, and reuses the outcome.
HEALTH_CHECK_INTERVAL_SECONDS = 1.0
# A health probe gets its answer within about a second: a write that takes longer counts as
# failed (SQLite's writer process stuck or stopped, say).
HEALTH_CHECK_TIMEOUT_SECONDS = 0.8


class HealthCheck:
    """The outcome of the last health write, reused for `interval` seconds. One thread at a
    time writes; the others reuse the previous outcome meanwhile (only the very first check
    is waited for)."""

    def __init__(self, interval=HEALTH_CHECK_INTERVAL_SECONDS):
        self.interval = interval
        self.lock = threading.Lock()
        self.checked_at, self.problem = None, None

    def current(self, clock, check):
        """None when statuses can be stored, else what is wrong, as of at most `interval`
        seconds ago; `check()` writes and returns the same."""
        if self.checked_at is not None and 0 <= clock() - self.checked_at < self.interval:
            return self.problem
        if not self.lock.acquire(blocking=self.checked_at is None):
            return self.problem
        try:
            if self.checked_at is None or not 0 <= clock() - self.checked_at < self.interval:
                self.problem = check()
                self.checked_at = clock()
            return self.problem
        finally:
            self.lock.release()


def storage_problem():
    """None when a write as large as a status update's commits, else what went wrong."""
    try:
        db.check_writable(db.get_db(), writer_timeout=HEALTH_CHECK_TIMEOUT_SECONDS)
        return None
    except db.DATABASE_ERRORS as error:
        storage = db.get_db()
        log.error("Health check failed: the database cannot store updates: %s",
                  db.describe_error(error))
        # /healthz answers anyone: why, but not where the database is or as whom.
        return (db.describe_error(error).replace(storage.label, "the database")
                or type(error).__name__)


def current_problem():
    """This process's latest outcome of the health check (see HealthCheck)."""
    return current_app.extensions["health"].current(current_app.config["CLOCK"],
                                                    storage_problem)
