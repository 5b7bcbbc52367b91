"""gunicorn's own log lines (its master's and its workers' starts, stops and errors) in the
service's form (sms_status/logs.py): one format, one line per event, in the whole log.

gunicorn writes `[2026-12-07 13:33:55 +0000] [4242] [INFO] Booting worker` by default, the
service `2026-12-07 13:33:55,969 INFO Ready`: two formats in one stream, which a log
pipeline must parse twice. Only the formatter changes: gunicorn still writes to its error
log (stderr, or --error-logfile) at its --log-level. Its access log, off by default, keeps
its own format, and a syslog handler its own.
"""

import logging

from gunicorn import glogging

from sms_status.logs import LINE_FORMAT, OneLineFormatter


class Logger(glogging.Logger):
    """gunicorn's logger, its error log's lines formatted as the service's."""

    def setup(self, cfg):
        super().setup(cfg)
        for handler in self.error_log.handlers:
            if type(handler) in (logging.StreamHandler, logging.FileHandler):
                handler.setFormatter(OneLineFormatter(LINE_FORMAT))
