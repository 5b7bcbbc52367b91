"""The service's log: one line per event on stdout, in one format for the whole log (gunicorn's
lines too, serving/log.py), and budgets that bound how many warnings of a kind are written.
"""

import logging
import re
import sys
import threading

log = logging.getLogger("sms_status")

# Every line of the log, the service's and gunicorn's (serving/log.py).
LINE_FORMAT = "%(asctime)s %(levelname)s %(message)s"

# What str.splitlines() splits on.
LINE_BREAKS = re.compile("[\n\r\v\f\x1c-\x1e\x85\u2028\u2029]")


class OneLineFormatter(logging.Formatter):
    """Writes each record as one line: the line breaks inside it (a traceback's, or libpq's
    messages, which continue on a line of their own) are escaped, like `\\n`."""

    def format(self, record):
        return LINE_BREAKS.sub(lambda found: found.group().encode("unicode_escape").decode(),
                               super().format(record))


def configure_logging(level):
    """One line per event to stdout; set up once however often create_app runs."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(OneLineFormatter(LINE_FORMAT))
        log.addHandler(handler)
        log.propagate = False
        # The PostgreSQL pool's warnings (a lost server, reconnection attempts), in the same form.
        pool_log = logging.getLogger("psycopg.pool")
        pool_log.addHandler(handler)
        pool_log.propagate = False
        pool_log.setLevel(logging.WARNING)
    log.setLevel(level)


class LogBudget:
    """At most `limit` lines per `window` seconds; the rest are counted, not written."""

    def __init__(self, limit, window=60):
        self.limit, self.window = limit, window
        self.lock = threading.Lock()
        self.window_start, self.used, self.dropped = float("-inf"), 0, 0

    def take(self, now):
        """None when this line must be dropped, else how many were dropped before it."""
        with self.lock:
            if now >= self.window_start + self.window:
                self.window_start, self.used = now, 0
            if self.used >= self.limit:
                self.dropped += 1
                return None
            self.used += 1
            dropped, self.dropped = self.dropped, 0
            return dropped

    def warn(self, now, left_out, message, *args):
        """A warning within the budget; the next one written says how many `left_out` (such
        as "refused requests") were not, so that nobody can flood the log."""
        dropped = self.take(now)
        if dropped is None:
            return
        if dropped:
            message += f" (%d more {left_out} were not logged before this one)"
            args += (dropped,)
        log.warning(message, *args)
