"""The budget of warnings about refused requests.

Refused requests are the caller's choice: past the budget they are counted, not written, so
that nobody can flood the log (or the disk under it) by sending garbage. The log itself is
sms_status/logs.py's.
"""

from flask import current_app, request

from sms_status.logs import log  # noqa: F401  (the web room's modules log through it)
from sms_status.rules import mask_phones_in, printable
from sms_status.services import services

# Warnings about refused requests, per process: enough to see an attack, too few to flood.
REJECTION_WARNINGS_PER_MINUTE = 30


def warn_rejection(message, *args):
    """Logs a refused request, within this process's budget of such warnings."""
    services().rejection_log.warn(current_app.config["CLOCK"](), "refused requests",
                                  message, *args)


def logged_path():
    """The request's path as the log shows it: short, escaped, its phone numbers masked."""
    return printable(mask_phones_in(request.path), 100)
