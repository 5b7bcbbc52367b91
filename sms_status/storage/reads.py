"""The reads of GET /messages, GET /stats, GET /webhook-events and the dashboard's chart:
their SQL, written once for both engines, returning rows. Their parameters and the shape of
their answers are listing.py's (the chart's, overview.py's).

Every query walks one of schema.py's QUERY_INDEXES in the order it asks for, so a page or
a window costs what it returns, not the size of the table. On SQLite a window's counts are
read in stretches of a bounded number of rows, each its own short statement (Stretches).
"""

from collections import Counter
from itertools import pairwise

from sms_status.rules import FINAL_STATUSES
from sms_status.storage.times import milliseconds_of, stored_time_of_milliseconds

LISTED_COLUMNS = ("sid, to_number, from_number, latest_status, error_code, created_at,"
                   " updated_at, storage_order, reference, sent_by")


def messages_page(storage, limit, to=None, error_code=None, status=None, since=None,
                  until=None, before=None, reference=None, sent_by=None):
    """Up to `limit` messages newest first (creation, then storage order), matching every
    filter given; `before` is a (created_at, storage_order) position to start after."""
    conditions, params = [], []
    for condition, value in (("to_number = ?", to), ("error_code = ?", error_code),
                             ("latest_status = ?", status), ("created_at >= ?", since),
                             ("created_at < ?", until), ("reference = ?", reference),
                             ("sent_by = ?", sent_by)):
        if value is not None:
            conditions.append(condition)
            params.append(value)
    return newest_first(storage, f"SELECT {LISTED_COLUMNS} FROM messages", conditions,
                        params, ("created_at", "storage_order"), before, limit)


def newest_first(storage, select, conditions, params, order, before, limit):
    """A keyset page: up to `limit` rows of `select` meeting every condition, newest first
    in the order of the two `order` columns, after the position `before` (or from the top).

    The position is a row-value comparison, so the index on those columns seeks straight to
    it instead of counting an offset."""
    if before is not None:
        conditions = [*conditions, f"({order[0]}, {order[1]}) < (?, ?)"]
        params = [*params, *before]
    where = " WHERE " + " AND ".join(conditions) if conditions else ""
    return storage.query(f"{select}{where} ORDER BY {order[0]} DESC, {order[1]} DESC LIMIT ?",
                         (*params, limit))


# Every latest status stored, one index seek each (a loose index scan: a plain DISTINCT
# would read the whole index).
DISTINCT_STATUSES = (
    "WITH RECURSIVE found (status) AS ("
    " SELECT min(latest_status) FROM messages"
    " UNION ALL SELECT (SELECT min(latest_status) FROM messages"
    " WHERE latest_status > found.status) FROM found WHERE found.status IS NOT NULL)"
    " SELECT status FROM found WHERE status IS NOT NULL"
)


FIRST_STRETCH_MS = 60_000  # a minute: nothing is known of the window yet
SHORTEST_STRETCH_MS = 1_000


class Stretches:
    """The window [since, until) (stored times) as consecutive stretches, each to be read by
    a statement of its own; `counted(rows)` after each says how many rows it read, and the
    next stretch is sized to hold about the engine's `rows_per_window_statement` of them
    (None: the whole window in one).

    Why: on SQLite a statement holds its snapshot of the WAL until it ends, and the WAL is
    rewound to its start only when no reader holds an older one. A month of a million
    messages read as one statement held one for the whole count; readers polling it back to
    back always held one, and the WAL grew under the callbacks until the disk was full. Short
    statements leave gaps the writer's checkpoint gets through (writer.py's WalLimit; the
    figures: docs/performance.md, "A month's counts read in short statements").
    """

    def __init__(self, storage, since, until):
        self.since, self.until = since, until
        self.rows_per_statement = storage.features.rows_per_window_statement
        self.rows = 0

    def counted(self, rows):
        self.rows = rows

    def __iter__(self):
        if self.rows_per_statement is None:
            yield self.since, self.until
            return
        start, end = milliseconds_of(self.since), milliseconds_of(self.until)
        span = FIRST_STRETCH_MS
        while start < end:
            stop = min(start + span, end)
            self.rows = 0
            yield (stored_time_of_milliseconds(start),
                   self.until if stop == end else stored_time_of_milliseconds(stop))
            # As many milliseconds as held about the rows wanted, growing at most fourfold.
            span = max(SHORTEST_STRETCH_MS,
                       min(4 * span, span * self.rows_per_statement // max(self.rows, 1)))
            start = stop


def count_in_stretches(storage, sql, params, since, until):
    """(messages, idle) summed over [since, until), a statement per stretch: `sql` selects
    the columns `messages` (the rows it read) and `idle`, and ends with `created_at >= ? AND
    created_at < ?`."""
    stretches, messages, idle = Stretches(storage, since, until), 0, 0
    for start, stop in stretches:
        row = storage.query(sql, (*params, start, stop))[0]
        stretches.counted(row["messages"])
        messages, idle = messages + row["messages"], idle + (row["idle"] or 0)
    return messages, idle


def grouped_in_stretches(storage, column, since, until):
    """{value of `column`: how many messages} of the messages created in [since, until),
    a statement per stretch; NULL is counted too (under None), so that each stretch's rows
    read are known."""
    stretches, counts = Stretches(storage, since, until), Counter()
    for start, stop in stretches:
        rows = storage.query(
            f"SELECT {column} AS value, count(*) AS messages FROM messages"
            f" WHERE created_at >= ? AND created_at < ? GROUP BY {column}", (start, stop))
        stretches.counted(sum(row["messages"] for row in rows))
        counts.update({row["value"]: row["messages"] for row in rows})
    return counts


def status_counts(storage, since, until, idle_before):
    """({status: count}, stuck count) of the messages created in [since, until).

    Each status is counted on its own stretch of the (latest_status, created_at) index, which
    needs no table row; only the messages not final yet are read for their last update.
    """
    by_status, stuck = {}, 0
    for row in storage.query(DISTINCT_STATUSES, ()):
        status = row["status"]
        idle = "0" if status in FINAL_STATUSES else (
            "sum(CASE WHEN updated_at < ? THEN 1 ELSE 0 END)")
        messages, idle_messages = count_in_stretches(
            storage, f"SELECT count(*) AS messages, {idle} AS idle FROM messages"
            " WHERE latest_status = ? AND created_at >= ? AND created_at < ?",
            ((idle_before,) if idle != "0" else ()) + (status,), since, until)
        if messages:
            by_status[status] = messages
            stuck += idle_messages
    return dict(sorted(by_status.items())), stuck


def messages_per_bucket(storage, boundaries):
    """[(bucket start, latest status, count)] of the messages created in each stretch
    [boundaries[i], boundaries[i + 1]) (stored timestamps, ascending), leaving out zeros.

    One count per status and bucket, each on its own stretch of the (latest_status,
    created_at) index, which needs no table row: the cost is the window's index entries.
    (Separate statements, each with its own values: as one statement, PostgreSQL planned
    the counts blind and compiled it with JIT, which took far longer than the counts:
    docs/performance.md, "The dashboard".)
    """
    statuses = [row["status"] for row in storage.query(DISTINCT_STATUSES, ())]
    counts = []
    for start, stop in pairwise(boundaries):
        for status in statuses:
            messages, _ = count_in_stretches(
                storage, "SELECT count(*) AS messages, 0 AS idle FROM messages"
                " WHERE latest_status = ? AND created_at >= ? AND created_at < ?",
                (status,), start, stop)
            if messages:
                counts.append((start, status, messages))
    return counts


def error_counts(storage, since, until):
    """[(error code, count)] of the window, most frequent first."""
    counts = grouped_in_stretches(storage, "error_code", since, until)
    counts.pop(None, None)
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


def delivery_times(storage, since, until):
    """[(seconds from creation to `delivered`, how many messages)] of the window, in order
    (millisecond steps, so far fewer values than messages)."""
    counts = grouped_in_stretches(storage, "seconds_to_delivered", since, until)
    counts.pop(None, None)
    return sorted(counts.items())


def message_with_history(storage, sid):
    """(the message's row, its history's rows oldest first), or None when it is unknown."""
    messages = storage.query("SELECT * FROM messages WHERE sid = ?", (sid,))
    if not messages:
        return None
    events = storage.query(
        "SELECT status, error_code, received_at FROM status_events WHERE message_sid = ?"
        " ORDER BY received_at, id",
        (sid,),
    )
    return messages[0], events


# --- the outbox of status webhooks -------------------------------------------------------

EVENT_COLUMNS = ("seq, id, message_sid, type, state, attempts, created_at, next_attempt_at,"
                 " last_attempt_at, delivered_at, last_error")
WEBHOOK_EVENT_STATES = ("pending", "delivered", "failed")


def state_is(state):
    """The condition on an event's state, written out so that the partial index of pending
    or failed events serves it (a `?` would hide which state it is from the planner)."""
    if state not in WEBHOOK_EVENT_STATES:
        raise ValueError(f"not an event state: {state!r}")
    return f"state = '{state}'"


def webhook_events_page(storage, limit, state=None, sid=None, before=None):
    """Up to `limit` events newest first (creation, then recording order), of one state or
    message when given; `before` is a (created_at, seq) position to start after."""
    conditions, params = [], []
    if state is not None:
        conditions.append(state_is(state))
    if sid is not None:
        conditions.append("message_sid = ?")
        params.append(sid)
    return newest_first(storage, f"SELECT {EVENT_COLUMNS} FROM webhook_events", conditions,
                        params, ("created_at", "seq"), before, limit)


def webhook_event(storage, event_id):
    """One event's row, or None."""
    rows = storage.query(f"SELECT {EVENT_COLUMNS} FROM webhook_events WHERE id = ?",
                         (event_id,))
    return rows[0] if rows else None


def webhook_event_counts(storage, since, until):
    """{"pending": n, "failed": n}: the events created in [since, until) in those states."""
    return {state: storage.query(
        f"SELECT count(*) AS n FROM webhook_events WHERE {state_is(state)} AND created_at >= ?"
        " AND created_at < ?", (since, until))[0]["n"]
        for state in ("pending", "failed")}


def pending_webhook_events(storage):
    """How many events are still to be delivered (the webhooks' backlog)."""
    return storage.query("SELECT count(*) AS n FROM webhook_events WHERE state = 'pending'",
                         ())[0]["n"]
