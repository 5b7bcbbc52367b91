"""GET /messages and GET /stats: their parameters, their SQL and the shape of their answers.

The SQL is written once for SQLite and PostgreSQL, and reaches the database only through
`_rows` below. Timestamps are stored as text in one fixed format
(`2026-11-26T20:05:15.896Z`), so they compare correctly as strings; every instant a caller
gives is converted to that format first.
"""

import base64
import binascii
import heapq
import json
import math
import re
from datetime import datetime, timedelta, timezone

from flask import abort

from sms_status import rules, twilio_errors
from sms_status.storage import records as db


def _rows(sql, params):
    """Runs one query on the app's database; rows are read by column name."""
    return db.get_db().query(sql, params)




DEFAULT_LIMIT = 50
MAX_LIMIT = 200
DEFAULT_STATS_WINDOW = timedelta(hours=24)
# The longest /stats window: its cost grows with the messages in it.
MAX_STATS_WINDOW = timedelta(days=90)
STUCK_AFTER = timedelta(hours=1)
STORED_TIMESTAMP = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z")
# A storage order, as cursors carry it: a positive 64-bit integer.
MAX_STORAGE_ORDER = 2**63 - 1
MESSAGE_COLUMNS = ("sid, to_number, from_number, latest_status, error_code, created_at, updated_at,"
                   " storage_order")
# Statuses that end a message's delivery, for deliveryRate's denominator.
DELIVERY_OUTCOMES = ("delivered", "undelivered", "failed")


# --- parameters ---------------------------------------------------------------------------

def refuse(message):
    """Ends the request with 400 {"error": message}."""
    abort(400, description=message)


def single_values(args, known):
    """The query parameters as {name: value}; refuses unknown and repeated ones."""
    unknown = sorted(name for name in args if name not in known)
    if unknown:
        refuse(f"Unknown parameter '{unknown[0]}'; this endpoint takes "
               + ", ".join(known))
    values = {}
    for name in args:
        given = args.getlist(name)
        if len(given) > 1:
            refuse(f"Parameter '{name}' is given {len(given)} times; give it once"
                   + (" (several statuses go comma-separated in one)" if name == "status"
                      else ""))
        values[name] = given[0]
    return values


def parse_instant(name, text):
    """An ISO 8601 instant with a timezone, as a stored timestamp (rounded up to the ms)."""
    moment = None
    if text.isascii() and len(text) <= 64:
        try:
            moment = datetime.fromisoformat(text.upper())  # RFC 3339 allows t and z
        except ValueError:
            pass
    if moment is None or moment.tzinfo is None or moment.utcoffset() is None:
        refuse(f"Parameter '{name}' must be an ISO 8601 instant with a timezone, like "
               f"2026-11-26T20:05:15Z or 2026-11-26T21:05:15+01:00 (write + as %2B in a URL)")
    try:
        return format_instant(moment)
    except OverflowError:
        refuse(f"Parameter '{name}' is outside the years 0001 to 9999 in UTC")


def format_instant(moment):
    """A timezone-aware datetime in the stored format, rounded up to the next millisecond.

    Rounding up keeps the comparisons exact: a stored time (whole milliseconds) is at or
    after `since`, or before `until`, exactly when it is so against the rounded value.
    """
    moment = moment.astimezone(timezone.utc)
    if moment.microsecond % 1000:
        moment += timedelta(microseconds=1000 - moment.microsecond % 1000)
    return (f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}T{moment.hour:02d}:"
            f"{moment.minute:02d}:{moment.second:02d}.{moment.microsecond // 1000:03d}Z")


def parse_limit(text):
    if not (text.isascii() and text.isdigit() and len(text) <= 3
            and 1 <= int(text) <= MAX_LIMIT):
        refuse(f"Parameter 'limit' must be a whole number from 1 to {MAX_LIMIT}")
    return int(text)


def parse_error_code(text):
    if not (text.isascii() and text.isdigit() and len(text) <= 9):
        refuse("Parameter 'errorCode' must be a Twilio error code, a whole number like 30003")
    return int(text)


def parse_statuses(text):
    statuses = [part.strip() for part in text.split(",")]
    for status in statuses:
        if status not in rules.STATUS_RANK:
            refuse(f"Parameter 'status' takes comma-separated statuses among "
                   f"{', '.join(rules.STATUS_RANK)}; {status!r} is not one")
    return sorted(set(statuses))


def parse_to(text):
    if not rules.is_e164(text):
        refuse("Parameter 'to' must be a phone number in E.164 format, like +15558675309 "
               "(write + as %2B in a URL)")
    return text


def page_key(row):
    """A message's place in the listing order: its creation time, then its storage order."""
    return row["created_at"], row["storage_order"]


def encode_cursor(row):
    """The opaque position after `row`: its page_key."""
    raw = json.dumps(page_key(row), separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(text):
    """(created_at, storage_order) from a cursor this service gave out; refuses anything else
    (a cursor given out before messages had a storage order included)."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        created_at, order = json.loads(raw)
        if (isinstance(created_at, str) and STORED_TIMESTAMP.fullmatch(created_at)
                and type(order) is int and 0 < order <= MAX_STORAGE_ORDER):
            return created_at, order
    except (binascii.Error, ValueError, TypeError, RecursionError):
        pass
    refuse("Parameter 'cursor' is not a cursor from this endpoint; pass the nextCursor of "
           "the previous page unchanged, or leave it out for the first page")


def refuse_empty_window(since, until):
    if since is not None and until is not None and since >= until:
        refuse("Parameter 'since' must be before 'until'")


# --- GET /messages ------------------------------------------------------------------------

MESSAGES_PARAMETERS = ("to", "status", "errorCode", "since", "until", "limit", "cursor")


def list_messages(args):
    """One page of messages, newest first, with the cursor of the next page.

    Newest is the latest created, and of those created in the same millisecond the last
    stored."""
    values = single_values(args, MESSAGES_PARAMETERS)
    limit = parse_limit(values["limit"]) if "limit" in values else DEFAULT_LIMIT
    since = parse_instant("since", values["since"]) if "since" in values else None
    until = parse_instant("until", values["until"]) if "until" in values else None
    refuse_empty_window(since, until)
    conditions, params = [], []
    if "to" in values:
        conditions.append("to_number = ?")
        params.append(parse_to(values["to"]))
    if "errorCode" in values:
        conditions.append("error_code = ?")
        params.append(parse_error_code(values["errorCode"]))
    if since is not None:
        conditions.append("created_at >= ?")
        params.append(since)
    if until is not None:
        conditions.append("created_at < ?")
        params.append(until)
    if "cursor" in values:
        # A row-value comparison: the index on (created_at, storage_order) seeks straight to it.
        conditions.append("(created_at, storage_order) < (?, ?)")
        params += decode_cursor(values["cursor"])

    # One more row than asked tells whether there is a next page.
    if "status" in values:
        # One query per status, each walking its own index in page order, then merged:
        # a single `IN (...)` would have to sort every matching row before the first page.
        pages = [page_of_messages(conditions + ["latest_status = ?"], params + [status],
                                  limit + 1)
                 for status in parse_statuses(values["status"])]
        rows = list(heapq.merge(*pages, key=page_key, reverse=True))[:limit + 1]
    else:
        rows = page_of_messages(conditions, params, limit + 1)

    next_cursor = encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    return {"messages": [message_item(row) for row in rows[:limit]], "nextCursor": next_cursor}


def page_of_messages(conditions, params, limit):
    where = " WHERE " + " AND ".join(conditions) if conditions else ""
    return _rows(f"SELECT {MESSAGE_COLUMNS} FROM messages{where}"
                 " ORDER BY created_at DESC, storage_order DESC LIMIT ?", (*params, limit))


def message_item(row):
    return {
        "sid": row["sid"],
        "to": row["to_number"],
        "from": row["from_number"],
        "latestStatus": row["latest_status"],
        "errorCode": row["error_code"],
        "errorDescription": twilio_errors.description(row["error_code"]),
        "createdAt": row["created_at"],
        "updatedAt": row["updated_at"],
    }


# --- GET /stats ---------------------------------------------------------------------------

STATS_PARAMETERS = ("since", "until")


def delivery_stats(args, now):
    """Counts, delivery rate, errors, time to delivery and stuck messages of a window.

    The window holds the messages created from `since` (inclusive) to `until` (exclusive);
    by default the 24 hours up to `now` (seconds since the epoch).
    """
    values = single_values(args, STATS_PARAMETERS)
    now_moment = datetime.fromtimestamp(now, timezone.utc)
    if "until" in values:
        until = parse_instant("until", values["until"])
    else:
        until = format_instant(now_moment)
    if "since" in values:
        since = parse_instant("since", values["since"])
    else:
        try:
            since = format_instant(datetime.fromisoformat(until) - DEFAULT_STATS_WINDOW)
        except OverflowError:
            since = format_instant(datetime(1, 1, 1, tzinfo=timezone.utc))
    refuse_empty_window(since, until)
    if datetime.fromisoformat(until) - datetime.fromisoformat(since) > MAX_STATS_WINDOW:
        refuse(f"Parameters 'since' and 'until' (default: now) may be at most "
               f"{MAX_STATS_WINDOW.days} days apart; for a longer span, ask for several windows")
    idle_before = format_instant(now_moment - STUCK_AFTER)

    by_status, stuck = status_counts(since, until, idle_before)
    total = sum(by_status.values())
    outcomes = sum(by_status.get(status, 0) for status in DELIVERY_OUTCOMES)
    return {
        "since": since,
        "until": until,
        "total": total,
        "byStatus": by_status,
        "deliveryRate": round(by_status.get("delivered", 0) / outcomes, 4) if outcomes else None,
        "errors": [{"code": code, "count": count,
                    "description": twilio_errors.description(code)}
                   for code, count in error_counts(since, until)],
        "timeToDeliveredSeconds": time_to_delivered(since, until),
        "stuck": stuck,
    }


# Every latest status stored, one index seek each (a loose index scan: a plain DISTINCT
# would read the whole index).
DISTINCT_STATUSES = (
    "WITH RECURSIVE found (status) AS ("
    " SELECT min(latest_status) FROM messages"
    " UNION ALL SELECT (SELECT min(latest_status) FROM messages"
    " WHERE latest_status > found.status) FROM found WHERE found.status IS NOT NULL)"
    " SELECT status FROM found WHERE status IS NOT NULL"
)


def status_counts(since, until, idle_before):
    """({status: count}, stuck count) of the window.

    Each status is counted on its own stretch of the (latest_status, created_at) index, which
    needs no table row; only the messages not final yet are read for their last update.
    """
    by_status, stuck = {}, 0
    for row in _rows(DISTINCT_STATUSES, ()):
        status = row["status"]
        idle = "0" if status in rules.FINAL_STATUSES else (
            "sum(CASE WHEN updated_at < ? THEN 1 ELSE 0 END)")
        counts = _rows(
            f"SELECT count(*) AS messages, {idle} AS stuck FROM messages"
            " WHERE latest_status = ? AND created_at >= ? AND created_at < ?",
            ((idle_before,) if idle != "0" else ()) + (status, since, until),
        )[0]
        if counts["messages"]:
            by_status[status] = counts["messages"]
            stuck += counts["stuck"] or 0
    return dict(sorted(by_status.items())), stuck


def error_counts(since, until):
    """[(error code, count)] of the window, most frequent first."""
    rows = _rows(
        "SELECT error_code AS code, count(*) AS messages FROM messages"
        " WHERE created_at >= ? AND created_at < ? AND error_code IS NOT NULL"
        " GROUP BY error_code ORDER BY count(*) DESC, error_code",
        (since, until),
    )
    return [(row["code"], row["messages"]) for row in rows]


def time_to_delivered(since, until):
    """p50 and p90 (nearest rank) of the seconds from creation to the `delivered` event.

    The database counts each distinct time (millisecond steps, so far fewer values than
    messages) in order; the ranks are then found by walking the running count.
    """
    rows = _rows(
        "SELECT seconds_to_delivered AS seconds, count(*) AS messages FROM messages"
        " WHERE created_at >= ? AND created_at < ? AND seconds_to_delivered IS NOT NULL"
        " GROUP BY seconds_to_delivered ORDER BY seconds_to_delivered",
        (since, until),
    )
    count = sum(row["messages"] for row in rows)
    if not count:
        return None
    # Nearest rank: the smallest value with at least that fraction of all at or below it.
    wanted = {"p50": math.ceil(0.5 * count), "p90": math.ceil(0.9 * count)}
    percentiles, running = {}, 0
    for row in rows:
        running += row["messages"]
        for name, rank in wanted.items():
            if name not in percentiles and running >= rank:
                percentiles[name] = round(row["seconds"], 3)
    return percentiles
