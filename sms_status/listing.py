"""GET /messages, GET /stats, GET /get-status and GET /webhook-events: their parameters and
the shape of their answers (their SQL is storage/reads.py's), and the one mapping of a
message row (and of an event row) to JSON.

A parameter the caller must fix raises BadQuery; the web room answers it with 400.

Timestamps are stored as text in one fixed format (`2026-11-26T20:05:15.896Z`), so they
compare correctly as strings; every instant a caller gives is converted to that format first.
"""

import base64
import binascii
import heapq
import json
import math
from datetime import datetime, timedelta, timezone

from sms_status import api_keys, rules, twilio_errors
from sms_status.storage import inbound, opt_outs, reads
from sms_status.storage.times import STORED_TIME, stored_time_rounded_up

DEFAULT_LIMIT = 50
MAX_LIMIT = 200
DEFAULT_STATS_WINDOW = timedelta(hours=24)
# The longest /stats window: its cost grows with the messages in it.
MAX_STATS_WINDOW = timedelta(days=90)
STUCK_AFTER = timedelta(hours=1)
# A storage order, as cursors carry it: a positive 64-bit integer.
MAX_STORAGE_ORDER = 2**63 - 1
# Statuses that end a message's delivery, for deliveryRate's denominator.
DELIVERY_OUTCOMES = ("delivered", "undelivered", "failed")
# Said where a parameter may hold a +: a URL's query reads + as a space.
PLUS_IN_A_URL = " (write + as %2B in a URL)"


# --- parameters ---------------------------------------------------------------------------

class BadQuery(ValueError):
    """A query the caller must fix: the parameter at fault and a message saying how."""

    def __init__(self, parameter, message):
        super().__init__(message)
        self.parameter = parameter
        self.message = message


def single_values(args, known):
    """The query parameters as {name: value}; refuses unknown and repeated ones."""
    unknown = sorted(name for name in args if name not in known)
    if unknown:
        raise BadQuery(unknown[0], f"Unknown parameter '{unknown[0]}'; this endpoint takes "
                       + ", ".join(known))
    values = {}
    for name in args:
        given = args.getlist(name)
        if len(given) > 1:
            raise BadQuery(name, f"Parameter '{name}' is given {len(given)} times; give it "
                           "once" + (" (several statuses go comma-separated in one)"
                                     if name == "status" else ""))
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
        raise BadQuery(name, f"Parameter '{name}' must be an ISO 8601 instant with a "
                             "timezone, like 2026-11-26T20:05:15Z or "
                             f"2026-11-26T21:05:15+01:00{PLUS_IN_A_URL}")
    try:
        return stored_time_rounded_up(moment)
    except OverflowError:
        raise BadQuery(name, f"Parameter '{name}' is outside the years 0001 to 9999 in "
                             "UTC") from None


def parse_limit(text):
    if not (text.isascii() and text.isdigit() and len(text) <= 3
            and 1 <= int(text) <= MAX_LIMIT):
        raise BadQuery("limit", f"Parameter 'limit' must be a whole number from 1 to "
                                f"{MAX_LIMIT}")
    return int(text)


def parse_error_code(text):
    if not (text.isascii() and text.isdigit() and len(text) <= 9):
        raise BadQuery("errorCode", "Parameter 'errorCode' must be a Twilio error code, a "
                                    "whole number like 30003")
    return int(text)


def parse_statuses(text):
    statuses = [part.strip() for part in text.split(",")]
    for status in statuses:
        if status not in rules.STATUS_RANK:
            raise BadQuery("status", "Parameter 'status' takes comma-separated statuses among "
                                     f"{', '.join(rules.STATUS_RANK)}; {status!r} is not one")
    return sorted(set(statuses))


def parse_to(text, name="to"):
    """A phone number parameter (`to`, or `name`) in E.164 format."""
    if not rules.is_e164(text):
        raise BadQuery(name, f"Parameter '{name}' must be a phone number in E.164 format, "
                             "like +15558675309" + PLUS_IN_A_URL)
    return text


def parse_reference(text):
    if not rules.is_reference(text):
        raise BadQuery("reference", f"Parameter 'reference' {rules.REFERENCE_RULE}")
    return text


def parse_sent_by(text):
    if not api_keys.NAME_PATTERN.fullmatch(text):
        raise BadQuery("sentBy", "Parameter 'sentBy' must be the name of a key, "
                                 f"{api_keys.NAME_RULE}, like API_KEY")
    return text


def page_key(row):
    """A message's place in the listing order: its creation time, then its storage order."""
    return row["created_at"], row["storage_order"]


def encode_cursor(key):
    """The opaque position after a row whose place in the order is `key` (a page_key)."""
    raw = json.dumps(key, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(text):
    """(created_at, storage_order) from a cursor this service gave out (for webhook events:
    (created_at, seq)); refuses anything else (a cursor given out before messages had a
    storage order included)."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        created_at, order = json.loads(raw)
        if (isinstance(created_at, str) and STORED_TIME.fullmatch(created_at)
                and type(order) is int and 0 < order <= MAX_STORAGE_ORDER):
            return created_at, order
    except (binascii.Error, ValueError, TypeError, RecursionError):
        pass
    raise BadQuery("cursor", "Parameter 'cursor' is not a cursor from this endpoint; pass the "
                             "nextCursor of the previous page unchanged, or leave it out for "
                             "the first page")


def refuse_empty_window(since, until):
    if since is not None and until is not None and since >= until:
        raise BadQuery("since", "Parameter 'since' must be before 'until'")


# --- GET /messages ------------------------------------------------------------------------

MESSAGES_PARAMETERS = ("to", "status", "errorCode", "reference", "sentBy", "since", "until",
                       "limit", "cursor")


def list_messages(storage, args):
    """One page of messages, newest first, with the cursor of the next page.

    Newest is the latest created, and of those created in the same millisecond the last
    stored."""
    values = single_values(args, MESSAGES_PARAMETERS)
    limit = parse_limit(values["limit"]) if "limit" in values else DEFAULT_LIMIT
    since = parse_instant("since", values["since"]) if "since" in values else None
    until = parse_instant("until", values["until"]) if "until" in values else None
    refuse_empty_window(since, until)
    filters = {
        "to": parse_to(values["to"]) if "to" in values else None,
        "error_code": (parse_error_code(values["errorCode"]) if "errorCode" in values
                       else None),
        "reference": parse_reference(values["reference"]) if "reference" in values else None,
        "sent_by": parse_sent_by(values["sentBy"]) if "sentBy" in values else None,
        "since": since, "until": until,
        "before": decode_cursor(values["cursor"]) if "cursor" in values else None,
    }
    # One more row than asked tells whether there is a next page.
    if "status" in values:
        # One query per status, each walking its own index in page order, then merged:
        # a single `IN (...)` would have to sort every matching row before the first page.
        pages = [reads.messages_page(storage, limit + 1, status=status, **filters)
                 for status in parse_statuses(values["status"])]
        rows = list(heapq.merge(*pages, key=page_key, reverse=True))[:limit + 1]
    else:
        rows = reads.messages_page(storage, limit + 1, **filters)

    next_cursor = encode_cursor(page_key(rows[limit - 1])) if len(rows) > limit else None
    return {"messages": [message_item(row) for row in rows[:limit]], "nextCursor": next_cursor}


def message_item(row):
    """A message as every answer shows it, from its stored row."""
    return {
        "sid": row["sid"],
        "to": row["to_number"],
        "from": row["from_number"],
        "latestStatus": row["latest_status"],
        "errorCode": row["error_code"],
        "errorDescription": twilio_errors.description(row["error_code"]),
        "reference": row["reference"],
        "sentBy": row["sent_by"],
        "createdAt": row["created_at"],
        "updatedAt": row["updated_at"],
    }


# --- GET /stats ---------------------------------------------------------------------------

STATS_PARAMETERS = ("since", "until")


def stats_window(args, now):
    """(since, until) of GET /stats' parameters, as stored timestamps: by default the 24
    hours up to `now` (seconds since the epoch); at most 90 days apart."""
    values = single_values(args, STATS_PARAMETERS)
    if "until" in values:
        until = parse_instant("until", values["until"])
    else:
        until = stored_time_rounded_up(datetime.fromtimestamp(now, timezone.utc))
    if "since" in values:
        since = parse_instant("since", values["since"])
    else:
        try:
            since = stored_time_rounded_up(datetime.fromisoformat(until) - DEFAULT_STATS_WINDOW)
        except OverflowError:
            since = stored_time_rounded_up(datetime(1, 1, 1, tzinfo=timezone.utc))
    refuse_empty_window(since, until)
    if datetime.fromisoformat(until) - datetime.fromisoformat(since) > MAX_STATS_WINDOW:
        raise BadQuery("since", f"Parameters 'since' and 'until' (default: now) may be at most "
                                f"{MAX_STATS_WINDOW.days} days apart; for a longer span, ask "
                                "for several windows")
    return since, until


def delivery_stats(storage, since, until, now):
    """Counts, delivery rate, errors, time to delivery and stuck messages of a window.

    The window holds the messages created from `since` (inclusive) to `until` (exclusive),
    both stored timestamps; stuck ones are judged at `now` (seconds since the epoch).
    """
    idle_before = stored_time_rounded_up(
        datetime.fromtimestamp(now, timezone.utc) - STUCK_AFTER)
    by_status, stuck = reads.status_counts(storage, since, until, idle_before)
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
                   for code, count in reads.error_counts(storage, since, until)],
        "timeToDeliveredSeconds": time_to_delivered(storage, since, until),
        "stuck": stuck,
        "webhooks": reads.webhook_event_counts(storage, since, until),
        "inbound": inbound_counts(storage, since, until),
    }


def inbound_counts(storage, since, until):
    """The window's inbound messages received, and opt-outs and opt-ins recorded."""
    changes = opt_outs.change_counts(storage, since, until)
    return {"received": inbound.received_count(storage, since, until),
            "optedOut": changes["opted_out"], "optedIn": changes["opted_in"]}


def time_to_delivered(storage, since, until):
    """p50 and p90 (nearest rank) of the seconds from creation to the `delivered` event,
    found by walking the running count of each distinct time."""
    rows = reads.delivery_times(storage, since, until)
    count = sum(messages for _, messages in rows)
    if not count:
        return None
    # Nearest rank: the smallest value with at least that fraction of all at or below it.
    wanted = {"p50": math.ceil(0.5 * count), "p90": math.ceil(0.9 * count)}
    percentiles, running = {}, 0
    for seconds, messages in rows:
        running += messages
        for name, rank in wanted.items():
            if name not in percentiles and running >= rank:
                percentiles[name] = round(seconds, 3)
    return percentiles


def message_with_history(storage, sid):
    """GET /get-status's answer for a message, or None when it is unknown."""
    found = reads.message_with_history(storage, sid)
    if found is None:
        return None
    message, events = found
    return {**message_item(message), "history": [
        {"status": e["status"], "errorCode": e["error_code"], "timestamp": e["received_at"]}
        for e in events]}


# --- GET /webhook-events ------------------------------------------------------------------

WEBHOOK_EVENTS_PARAMETERS = ("state", "sid", "limit", "cursor")
WEBHOOK_EVENT_STATES = reads.WEBHOOK_EVENT_STATES
MAX_SID_LENGTH = 64


def list_webhook_events(storage, args):
    """One page of status webhook events, newest first, with the cursor of the next page."""
    values = single_values(args, WEBHOOK_EVENTS_PARAMETERS)
    limit = parse_limit(values["limit"]) if "limit" in values else DEFAULT_LIMIT
    state = values.get("state")
    if state is not None and state not in WEBHOOK_EVENT_STATES:
        raise BadQuery("state", "Parameter 'state' must be one of "
                                + ", ".join(WEBHOOK_EVENT_STATES))
    sid = values.get("sid")
    if sid is not None and not (sid.isascii() and sid.isalnum() and len(sid) <= MAX_SID_LENGTH):
        raise BadQuery("sid", "Parameter 'sid' must be a message SID, like SM followed by 32 "
                              "hex characters")
    before = decode_cursor(values["cursor"]) if "cursor" in values else None
    rows = reads.webhook_events_page(storage, limit + 1, state=state, sid=sid,
                                     before=before)
    next_cursor = (encode_cursor((rows[limit - 1]["created_at"], rows[limit - 1]["seq"]))
                   if len(rows) > limit else None)
    return {"events": [webhook_event_item(row) for row in rows[:limit]],
            "nextCursor": next_cursor}


def webhook_event_item(row):
    """A status webhook event as the API shows it, from its stored row."""
    return {
        "id": row["id"],
        "type": row["type"],
        "sid": row["message_sid"],
        "state": row["state"],
        "attempts": row["attempts"],
        "createdAt": row["created_at"],
        "lastAttemptAt": row["last_attempt_at"],
        "nextAttemptAt": row["next_attempt_at"] if row["state"] == "pending" else None,
        "deliveredAt": row["delivered_at"],
        "lastError": row["last_error"],
    }


def webhook_event(storage, event_id):
    """One event's item, or None when it is unknown."""
    row = reads.webhook_event(storage, event_id)
    return webhook_event_item(row) if row is not None else None
