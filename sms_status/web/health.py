"""What GET /healthz answers: whether a status update can be stored right now.

Each process keeps a monitor thread that writes a health probe at most once a second, and
/healthz answers from the monitor's last outcome without ever waiting on the database:

- a probe that has not come back within HEALTH_CHECK_TIMEOUT_SECONDS counts as failed,
  and while it is still stuck (a server stopped, a network that drops everything, SQLite's
  writer process stopped) every answer is 503; a probe that succeeds too slowly fails too;
- the thread starts with the first /healthz of the process (after gunicorn forks), whose
  answer waits for its first outcome, at most HEALTH_CHECK_TIMEOUT_SECONDS; it stops after
  a minute without /healthz, so an idle service writes no probes;
- /healthz needs no key: a flood of it never becomes a flood of writes, and its answer says
  only what kind of failure it was; the details (the database's error, which may name the
  server or the user) go to the log.

Under gunicorn, /healthz requests are also served by threads of their own, never queued
behind busy request threads (sms_status/serving/health_lane.py).
"""

import os
import threading
import time

from sms_status.logs import log
from sms_status.services import get_db
from sms_status.storage import DATABASE_ERRORS, OutcomeUnknown, maintenance

# The monitor writes a probe at most this often per process.
HEALTH_CHECK_INTERVAL_SECONDS = 1.0
# A probe that has not committed within this long counts as failed, so /healthz answers 503
# within about a second whatever hangs.
HEALTH_CHECK_TIMEOUT_SECONDS = 0.8
# The monitor stops after this long without /healthz, and starts again with the next one.
HEALTH_CHECK_IDLE_SECONDS = 60.0

# What /healthz says about a failure: its kind only.
DID_NOT_ANSWER = f"it did not answer within {HEALTH_CHECK_TIMEOUT_SECONDS:g} s"
WRITE_FAILED = "the write failed (the service's log says why)"


class HealthMonitor:
    """The outcome of the latest health probe of this process, kept by a thread of its own.

    `problem()` never waits on the database: None when statuses can be stored, else the
    kind of failure (DID_NOT_ANSWER or WRITE_FAILED).
    """

    def __init__(self, app, interval=HEALTH_CHECK_INTERVAL_SECONDS,
                 timeout=HEALTH_CHECK_TIMEOUT_SECONDS, idle=HEALTH_CHECK_IDLE_SECONDS):
        self.app = app
        self.interval, self.timeout, self.idle = interval, timeout, idle
        self.changed = threading.Condition()
        self.running_in = None  # the process whose monitor thread runs
        self.asked_at = 0.0
        self.probing_since = None  # when the probe in flight started
        self.finished_at, self.last_problem = None, None
        self.overrun_logged = False
        self.stopped = False

    def stop(self):
        """Ends the monitor thread after its probe in flight (the app is being closed)."""
        with self.changed:
            self.stopped = True

    def problem(self):
        """None when statuses can be stored, else the kind of failure; waits only for the
        process's first outcome, at most `timeout` seconds."""
        with self.changed:
            self.asked_at = time.monotonic()
            if self.running_in != os.getpid():
                self.running_in = os.getpid()
                self.probing_since, self.finished_at = None, None
                threading.Thread(target=self._watch, name="health-monitor", daemon=True).start()
            self.changed.wait_for(lambda: self.finished_at is not None, timeout=self.timeout)
            problem, overrun = self._verdict(time.monotonic())
        if overrun:
            log.error("Health check failed: the database has not answered for %.1f s", overrun)
        return problem

    def _verdict(self, now):
        """(problem, seconds of a probe overrun to log once, else None); the lock is held."""
        if self.probing_since is not None and now - self.probing_since >= self.timeout:
            overrun = None if self.overrun_logged else now - self.probing_since
            self.overrun_logged = True
            return DID_NOT_ANSWER, overrun
        if self.finished_at is None:
            return DID_NOT_ANSWER, None
        return self.last_problem, None

    def _watch(self):
        """The monitor thread: a probe at most every `interval` seconds while /healthz is
        asked for."""
        while True:
            with self.changed:
                if self.stopped or time.monotonic() - self.asked_at > self.idle:
                    self.running_in = None
                    return
                started = self.probing_since = time.monotonic()
                self.overrun_logged = False
            problem = self._probe()
            took = time.monotonic() - started
            if problem is None and took >= self.timeout:
                log.error("Health check failed: the database took %.1f s to store a probe", took)
                problem = DID_NOT_ANSWER
            with self.changed:
                self.last_problem, self.finished_at = problem, time.monotonic()
                self.probing_since = None
                self.changed.notify_all()
            time.sleep(max(self.interval - took, 0))

    def _probe(self):
        with self.app.app_context():
            return storage_problem(self.timeout)


def storage_problem(timeout):
    """None when a write as large as a status update's commits, else the kind of failure
    (the error itself is logged)."""
    try:
        maintenance.check_writable(get_db(), writer_timeout=timeout)
        return None
    except OutcomeUnknown as error:
        log.error("Health check failed: the database cannot store updates: %s",
                  get_db().describe_error(error))
        return DID_NOT_ANSWER
    except DATABASE_ERRORS as error:
        log.error("Health check failed: the database cannot store updates: %s",
                  get_db().describe_error(error))
        return WRITE_FAILED
