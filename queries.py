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

import db
import rules
import twilio_errors


def _rows(sql, params):
    """Runs one query on the app's database; rows are read by column name."""
    return db.get_db().query(sql, params)




DEFAULT_LIMIT = 50
MAX_LIMIT = 200
DEFAULT_STATS_WINDOW = timedelta(hours=24)
STUCK_AFTER = timedelta(hours=1)
STORED_TIMESTAMP = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z")
MAX_SID_LENGTH = 64
MESSAGE_COLUMNS = "sid, to_number, from_number, latest_status, error_code, created_at, updated_at"
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


def encode_cursor(row):
    """The opaque position after `row`: its creation time and SID."""
    raw = json.dumps([row["created_at"], row["sid"]], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(text):
    """(created_at, sid) from a cursor this service gave out; refuses anything else."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        created_at, sid = json.loads(raw)
        if (isinstance(created_at, str) and STORED_TIMESTAMP.fullmatch(created_at)
                and isinstance(sid, str) and 0 < len(sid) <= MAX_SID_LENGTH):
            return created_at, sid
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
    """One page of messages, newest first, with the cursor of the next page."""
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
        created_at, sid = decode_cursor(values["cursor"])
        # A row-value comparison: the index on (created_at, sid) seeks straight to it.
        conditions.append("(created_at, sid) < (?, ?)")
        params += [created_at, sid]

    # One more row than asked tells whether there is a next page.
    if "status" in values:
        # One query per status, each walking its own index in page order, then merged:
        # a single `IN (...)` would have to sort every matching row before the first page.
        pages = [page_of_messages(conditions + ["latest_status = ?"], params + [status],
                                  limit + 1)
                 for status in parse_statuses(values["status"])]
        rows = list(heapq.merge(*pages, key=lambda row: (row["created_at"], row["sid"]),
                                reverse=True))[:limit + 1]
    else:
        rows = page_of_messages(conditions, params, limit + 1)

    next_cursor = encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    return {"messages": [message_item(row) for row in rows[:limit]], "nextCursor": next_cursor}


def page_of_messages(conditions, params, limit):
    where = " WHERE " + " AND ".join(conditions) if conditions else ""
    return _rows(f"SELECT {MESSAGE_COLUMNS} FROM messages{where}"
                 " ORDER BY created_at DESC, sid DESC LIMIT ?", (*params, limit))


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
    idle_before = format_instant(now_moment - STUCK_AFTER)

    by_status, errors, stuck, delivered = status_counts(since, until, idle_before)
    total = sum(by_status.values())
    outcomes = sum(by_status.get(status, 0) for status in DELIVERY_OUTCOMES)
    return {
        "since": since,
        "until": until,
        "total": total,
        "byStatus": by_status,
        "deliveryRate": by_status.get("delivered", 0) / outcomes if outcomes else None,
        "errors": [{"code": code, "count": count,
                    "description": twilio_errors.description(code)}
                   for code, count in errors],
        "timeToDeliveredSeconds": time_to_delivered(since, until, delivered),
        "stuck": stuck,
    }


def status_counts(since, until, idle_before):
    """({status: count}, [(error code, count)] most frequent first, stuck count, count of
    messages with a `delivered` event)."""
    final = ", ".join("?" for _ in rules.FINAL_STATUSES)
    rows = _rows(
        "SELECT latest_status AS status, count(*) AS messages,"
        f" sum(CASE WHEN latest_status NOT IN ({final}) AND updated_at < ?"
        " THEN 1 ELSE 0 END) AS stuck, count(seconds_to_delivered) AS delivered"
        " FROM messages WHERE created_at >= ? AND created_at < ?"
        " GROUP BY latest_status ORDER BY latest_status",
        (*rules.FINAL_STATUSES, idle_before, since, until),
    )
    errors = _rows(
        "SELECT error_code AS code, count(*) AS messages FROM messages"
        " WHERE created_at >= ? AND created_at < ? AND error_code IS NOT NULL"
        " GROUP BY error_code ORDER BY count(*) DESC, error_code",
        (since, until),
    )
    return ({row["status"]: row["messages"] for row in rows},
            [(row["code"], row["messages"]) for row in errors],
            sum(row["stuck"] for row in rows), sum(row["delivered"] for row in rows))


def time_to_delivered(since, until, count):
    """p50 and p90 (nearest rank) of the seconds from creation to the `delivered` event of
    the `count` messages of the window that have one; one sort, in SQL."""
    if not count:
        return None
    # Nearest rank: the smallest value with at least that fraction of all at or below it.
    ranks = {name: max(1, math.ceil(fraction * count)) for name, fraction in
             (("p50", 0.5), ("p90", 0.9))}
    rows = _rows(
        "SELECT position, seconds FROM (SELECT seconds_to_delivered AS seconds,"
        " row_number() OVER (ORDER BY seconds_to_delivered) AS position FROM messages"
        " WHERE created_at >= ? AND created_at < ? AND seconds_to_delivered IS NOT NULL)"
        " AS ranked WHERE position IN (?, ?)",
        (since, until, ranks["p50"], ranks["p90"]),
    )
    seconds = {row["position"]: row["seconds"] for row in rows}
    return {name: round(seconds[rank], 3) for name, rank in ranks.items()}
