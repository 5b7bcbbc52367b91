"""The dashboard's overview of a window: GET /stats's numbers for it (listing.delivery_stats,
given the window's since and until, so both always agree) and its messages over time by
latest status, in buckets for the chart (storage/reads.py's messages_per_bucket).
"""

from datetime import datetime, timedelta, timezone
from itertools import pairwise

from sms_status import listing
from sms_status.storage import reads
from sms_status.storage.times import stored_time_rounded_up

# name -> (the window's length, the chart's bucket); buckets start on whole multiples of
# their length in UTC (whole hours, midnight), so the first and the last may be partial.
WINDOWS = {
    "1h": (timedelta(hours=1), timedelta(minutes=5)),
    "24h": (timedelta(hours=24), timedelta(hours=1)),
    "7d": (timedelta(days=7), timedelta(hours=6)),
    "30d": (timedelta(days=30), timedelta(days=1)),
}
DEFAULT_WINDOW = "24h"
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def window_bounds(window, now):
    """(since, until) as stored timestamps: the `window` up to `now` (epoch seconds)."""
    length, _ = WINDOWS[window]
    until = stored_time_rounded_up(datetime.fromtimestamp(now, timezone.utc))
    return stored_time_rounded_up(datetime.fromisoformat(until) - length), until


def bucket_boundaries(since, until, bucket):
    """[since, the whole multiples of `bucket` between them..., until], as stored timestamps."""
    start, stop = datetime.fromisoformat(since), datetime.fromisoformat(until)
    boundary = EPOCH + ((start - EPOCH) // bucket + 1) * bucket
    boundaries = [since]
    while boundary < stop:
        boundaries.append(stored_time_rounded_up(boundary))
        boundary += bucket
    return boundaries + [until]


def delivery_overview(storage, window, now):
    """The overview of `window` (a WINDOWS name) up to `now`: /stats's answer for the same
    since and until, and `buckets`, oldest first, each {start, stop, counts: {status: n},
    total}, which add up to the stats' total."""
    since, until = window_bounds(window, now)
    stats = listing.delivery_stats(storage, since, until, now)
    boundaries = bucket_boundaries(since, until, WINDOWS[window][1])
    buckets = {start: {"start": start, "stop": stop, "counts": {}, "total": 0}
               for start, stop in pairwise(boundaries)}
    for start, status, count in reads.messages_per_bucket(storage, boundaries):
        buckets[start]["counts"][status] = count
        buckets[start]["total"] += count
    return {"window": window, "stats": stats, "buckets": list(buckets.values())}
