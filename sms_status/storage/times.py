"""The one format instants are stored in: UTC ISO 8601 with milliseconds, like
2026-11-26T20:05:15.896Z. Fixed-width, so stored times compare correctly as text on both
engines (PostgreSQL's columns sort them byte by byte, in the "C" collation)."""

import re
from datetime import datetime, timedelta, timezone

STORED_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z")


def stored_time(timestamp=None):
    """The stored text of an instant given in seconds since the epoch (now when None),
    cut to the millisecond."""
    moment = (datetime.now(timezone.utc) if timestamp is None
              else datetime.fromtimestamp(timestamp, timezone.utc))
    return _text(moment)


def stored_time_rounded_up(moment):
    """The stored text of a timezone-aware datetime, rounded up to the next millisecond.

    Rounding up keeps comparisons exact: a stored time (whole milliseconds) is at or after
    `since`, or before `until`, exactly when it is so against the rounded value.
    """
    moment = moment.astimezone(timezone.utc)
    if moment.microsecond % 1000:
        moment += timedelta(microseconds=1000 - moment.microsecond % 1000)
    return _text(moment)


def timestamp_of(text):
    """The inverse of stored_time: seconds since the epoch."""
    moment = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    return moment.timestamp()


def _text(moment):
    return (f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}T{moment.hour:02d}:"
            f"{moment.minute:02d}:{moment.second:02d}.{moment.microsecond // 1000:03d}Z")


EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
ONE_MILLISECOND = timedelta(milliseconds=1)


def milliseconds_of(text):
    """A stored time as whole milliseconds since the epoch (exact, unlike timestamp_of)."""
    moment = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    return (moment - EPOCH) // ONE_MILLISECOND


def stored_time_of_milliseconds(milliseconds):
    """The inverse of milliseconds_of."""
    return _text(EPOCH + milliseconds * ONE_MILLISECOND)
