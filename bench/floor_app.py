"""The service with nothing stored: the no-storage floor that webhooks.py measures.

webhooks.py serves it as `gunicorn -c gunicorn.conf.py floor_app:app` in the service's
folder, with this folder on the path: the service's own app, request handling, signature
check, log line and JSON answer, but a storage engine whose writes do nothing (every
callback reads as new). What the service costs above this floor is what storing costs.
"""

from contextlib import contextmanager

from app import app


class NothingStored:
    name = "nothing stored"
    label = "nothing (the no-storage floor)"

    class features:
        writer_process = False  # it is its own writer (below): nothing to start
        online_backup = False

    @property
    def writer(self):
        return self

    def call(self, name, args, kwargs, timeout=None, returns=None):
        """Every write "succeeds" at once, and every callback reads as new."""
        return True

    @contextmanager
    def transaction(self, probe=False):
        """For checkouts whose writes open transactions themselves (--repo)."""
        yield self

    def execute(self, sql, params=()):
        return self

    def query(self, sql, params=()):
        """Reads find nothing: nothing was stored."""
        return []

    rowcount = 1
    seconds_between = staticmethod(lambda start, end: "0")  # checkouts before `ops`

    class ops:
        seconds_between = staticmethod(lambda start, end: "0")
        next_storage_order = "0"
        skip_locked = ""


try:
    from sms_status.services import services
except ImportError:  # a checkout from before the services object (--compare)
    app.extensions["storage"] = NothingStored()
else:
    services(app).storage = NothingStored()
