"""The outbox of status webhooks: events written in the transaction of the status change
they report, then claimed, attempted and settled by webhooks/delivery.py.

An event is due when it is `pending` and its `next_attempt_at` has come. Claiming one puts
it under a lease (a random token and an end time): nobody else attempts it until the lease
ends, so an instance that dies mid-attempt leaves it to be claimed again, with the same id,
once its lease has run out. Only the holder of the lease may settle the attempt.

Events go out one at a time per stream, in the order they were recorded: an event is not
claimed while another event of its stream is leased, nor while an earlier one has never been
attempted or is due too. An earlier event that waits for a retry does not hold back the
later ones. A message's status events are its SID's stream; the replies and opt-out changes
of a number are that number's (their writers take the number's lock first, so that their
events are numbered in the order they commit).
"""

from sms_status.storage.times import stored_time
from sms_status.storage.writes import in_writer_process
from sms_status.webhooks.events import event_body, event_type, new_event_id, number_event_body

MESSAGE_OF_EVENT = ("SELECT sid, to_number, from_number, reference, sent_by, latest_status,"
                    " error_code, created_at, updated_at FROM messages WHERE sid = ?")


def record_event(tx, sid, previous_status, changed_at):
    """Adds the event of `sid`'s latest status, inside the transaction that stored it."""
    message = tx.execute(MESSAGE_OF_EVENT, (sid,)).fetchone()
    now = stored_time()
    tx.execute(
        "INSERT INTO webhook_events (id, message_sid, stream, type, payload, state, created_at,"
        " next_attempt_at) VALUES (?, ?, ?, ?, ?, 'pending', ?, ?)",
        (new_event_id(), sid, sid, event_type(message["latest_status"]),
         event_body(message, previous_status, changed_at), now, now),
    )


def record_number_event(tx, number, type_, data, at):
    """Adds an event about a number (a reply, an opt-out change) to the number's stream,
    inside the transaction that stored it, which holds the number's lock."""
    now = stored_time()
    tx.execute(
        "INSERT INTO webhook_events (id, message_sid, stream, type, payload, state, created_at,"
        " next_attempt_at) VALUES (?, NULL, ?, ?, ?, 'pending', ?, ?)",
        (new_event_id(), number, type_, number_event_body(type_, data, at), now, now),
    )


# The events that may be attempted now (see the module's docstring); `?`s: now (stored
# time), now (seconds), now (seconds), now (stored time), limit.
CLAIMABLE = """
    SELECT e.seq FROM webhook_events e
    WHERE e.state = 'pending' AND e.next_attempt_at <= ?
      AND (e.lease_until IS NULL OR e.lease_until < ?)
      AND NOT EXISTS (
        SELECT 1 FROM webhook_events o
        WHERE o.stream = e.stream AND o.state = 'pending' AND o.seq <> e.seq
          AND (o.lease_until >= ?
               OR (o.seq < e.seq AND (o.attempts = 0 OR o.next_attempt_at <= ?))))
    """
CLAIMED_COLUMNS = "id, message_sid, stream, payload, attempts, schedule_start, lease"


def claim_statement(storage, lease, now, lease_seconds, limit, event_id=None):
    """(SQL, parameters) of the UPDATE that leases the due events of a claim."""
    at = stored_time(now)
    only = " AND e.id = ?" if event_id is not None else ""
    return (
        f"UPDATE webhook_events SET lease = ?, lease_until = ? WHERE seq IN ({CLAIMABLE}"
        f"{only} ORDER BY e.next_attempt_at, e.seq LIMIT ?{storage.ops.skip_locked})"
        " RETURNING seq, " + CLAIMED_COLUMNS,
        (lease, now + lease_seconds, at, now, now, at,
         *([event_id] if event_id is not None else []), limit),
    )


@in_writer_process
def claim_webhook_events(storage, lease, now, lease_seconds, limit, event_id=None):
    """Leases up to `limit` due events (only `event_id`, when given) under the token
    `lease` for `lease_seconds`; returns them as [{id, message_sid, payload, attempts,
    schedule_start, lease}], longest due first.

    They are taken in the order of the index of due events (when due, then recorded), and
    each candidate is compared with its message's pending events alone, so a claim reads
    the few it takes, even with a large backlog and no planner statistics yet.

    Instances claim one at a time (a lock), so two never lease two events of one stream.
    """
    sql, params = claim_statement(storage, lease, now, lease_seconds, limit, event_id)
    with storage.transaction() as tx:
        tx.lock("webhook claims")
        tx.plan_by_index()
        rows = tx.execute(sql, params).fetchall()
    return [{name: row[name] for name in CLAIMED_COLUMNS.split(", ")}
            for row in sorted(rows, key=lambda row: row["seq"])]


@in_writer_process
def settle_webhook_attempts(storage, outcomes):
    """Records attempts that ended: each outcome is [event id, lease, attempted at (stored
    time), error (None when delivered), next attempt at (stored time, or None: give up)].
    Returns how many were recorded: an attempt whose lease was lost (it ran past its end
    and another instance claimed the event) is not."""
    recorded = 0
    with storage.transaction() as tx:
        for event_id, lease, at, error, next_attempt_at in outcomes:
            if error is None:
                changes = ("state = 'delivered', delivered_at = ?", (at,))
            elif next_attempt_at is None:
                changes = ("state = 'failed', last_error = ?", (error,))
            else:
                changes = ("next_attempt_at = ?, last_error = ?", (next_attempt_at, error))
            recorded += tx.execute(
                f"UPDATE webhook_events SET {changes[0]}, attempts = attempts + 1,"
                " last_attempt_at = ?, lease = NULL, lease_until = NULL"
                " WHERE id = ? AND lease = ?",
                (*changes[1], at, event_id, lease),
            ).rowcount
    return recorded


@in_writer_process
def release_webhook_events(storage, leases):
    """Gives events back unattempted (a stopping server's): due again at once."""
    with storage.transaction() as tx:
        for lease in leases:
            tx.execute("UPDATE webhook_events SET lease = NULL, lease_until = NULL"
                       " WHERE lease = ?", (lease,))


@in_writer_process
def queue_webhook_event_again(storage, event_id, now):
    """Makes one event due now with its schedule restarted, whatever its state (a delivered
    one is sent again: a replay under the same id). False when there is no such event."""
    at = stored_time(now)
    with storage.transaction() as tx:
        return bool(tx.execute(
            "UPDATE webhook_events SET state = 'pending', next_attempt_at = ?,"
            " schedule_start = attempts WHERE id = ?", (at, event_id)).rowcount)


@in_writer_process
def queue_failed_webhook_events_again(storage, failed_since, now):
    """Makes every event given up on since `failed_since` (stored time) due now, with its
    schedule restarted; returns how many."""
    at = stored_time(now)
    with storage.transaction() as tx:
        return tx.execute(
            "UPDATE webhook_events SET state = 'pending', next_attempt_at = ?,"
            " schedule_start = attempts WHERE state = 'failed' AND last_attempt_at >= ?",
            (at, failed_since)).rowcount
