"""Messages and their statuses: the status lifecycle's forward-only rule, in SQL.

Each write is one transaction, and the statements of concurrent writers of one message
touch its rows in the same order (the message row if missing, then the history, then the
message's latest status), so concurrent updates queue instead of deadlocking on PostgreSQL.
"""

from sms_status.rules import STATUS_RANK, is_e164
from sms_status.storage import opt_outs, outbox
from sms_status.storage.times import stored_time
from sms_status.storage.writes import in_writer_process

# this code does not know ranks below every known one, so any known status replaces it.
LATEST_STATUS_RANK = (
    "CASE latest_status "
    + " ".join(f"WHEN '{status}' THEN {rank}" for status, rank in STATUS_RANK.items())
    + " ELSE -1 END"
)
# An unknown new status never replaces anything (it still goes into the history).
UNKNOWN_STATUS_RANK = -2


# Twilio's error for a recipient who opted out (replied STOP): "Attempt to send to
# unsubscribed recipient".
OPTED_OUT_ERROR = 21610

# A history entry, once per (message, status).
INSERT_STATUS_EVENT = (
    "INSERT INTO status_events (message_sid, status, error_code, received_at)"
    " VALUES (?, ?, ?, ?) ON CONFLICT (message_sid, status) DO NOTHING")

def _apply_status(storage, tx, sid, status, error_code, at, from_=None):
    """Adds (sid, status) to the history once and moves latestStatus only forward.

    One UPDATE decides and writes, so concurrent callbacks for one message never lose an
    update: PostgreSQL re-evaluates it on the newest row once the row's lock is free. The
    `delivered` event also records the seconds since the message's creation, for /stats,
    and a callback's sender number replaces a Messaging Service's MG SID.

    Returns None for a repeat (the history has this status already), else the message's
    (latest status, previous status) after the update. The latest status is `status` only
    when this update moved it there: a status enters the history together with every move
    to it, so it cannot have been the latest before.
    """
    inserted = tx.execute(INSERT_STATUS_EVENT, (sid, status, error_code, at)).rowcount
    if not inserted:
        return None
    rank = STATUS_RANK.get(status, UNKNOWN_STATUS_RANK)
    # Every right-hand side reads the row as it was, so previous_status gets the old latest.
    row = tx.execute(
        f"UPDATE messages SET previous_status = CASE WHEN ? > {LATEST_STATUS_RANK}"
        " THEN latest_status ELSE previous_status END,"
        f" latest_status = CASE WHEN ? > {LATEST_STATUS_RANK} THEN ? ELSE latest_status END,"
        f" error_code = CASE WHEN ? > {LATEST_STATUS_RANK} THEN ? ELSE error_code END,"
        " updated_at = CASE WHEN updated_at < ? THEN ? ELSE updated_at END,"
        " seconds_to_delivered = CASE WHEN ? = 'delivered'"
        f" THEN {storage.ops.seconds_between('created_at', '?')} ELSE seconds_to_delivered END,"
        " from_number = CASE WHEN from_number LIKE 'MG%' AND ? NOT LIKE 'MG%'"
        " THEN ? ELSE from_number END"
        " WHERE sid = ? RETURNING latest_status, previous_status",
        (rank, rank, status, rank, error_code, at, at, status, at, from_, from_, sid),
    ).fetchone()
    return row["latest_status"], row["previous_status"]


@in_writer_process
def record_status(storage, sid, status, error_code=None, to=None, from_=None, account_sid=None,
                  at=None):
    """Stores one status update (callback or reconciliation); False when it was a repeat.

    A callback may arrive before /send-sms stored its message, or be about a message
    sent by other software: the message record is then created from the callback. With
    status webhooks on (`storage.records_events`), a move of the latest status adds its event
    to the outbox in the same transaction. A new status with Twilio's error 21610 (the
    recipient replied STOP to Twilio) opts the message's recipient out in it too.
    """
    at = at or stored_time()
    with storage.transaction() as tx:
        stored = _store_status(storage, tx, sid, status, error_code, to, from_, account_sid, at)
        if stored and error_code == OPTED_OUT_ERROR:
            recipient = tx.execute("SELECT to_number FROM messages WHERE sid = ?",
                                   (sid,)).fetchone()["to_number"]
            if is_e164(recipient):
                opt_outs.lock_number(tx, recipient)
                opt_outs.opt_out_in(storage, tx, recipient, "twilio", None, sid, at)
        return stored


def _store_status(storage, tx, sid, status, error_code, to, from_, account_sid, at):
    """record_status's status, inside its transaction."""
    created = tx.execute(
        "INSERT INTO messages (sid, account_sid, to_number, from_number, latest_status,"
        " error_code, created_at, updated_at, seconds_to_delivered, storage_order)"
        f" VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, {storage.ops.next_storage_order})"
        " ON CONFLICT (sid) DO NOTHING",
        (sid, account_sid, to, from_, status, error_code, at, at,
         0.0 if status == "delivered" else None),
    ).rowcount
    if created:
        # The new message already holds this status: only its history is missing.
        tx.execute(INSERT_STATUS_EVENT, (sid, status, error_code, at))
        if storage.records_events:
            outbox.record_event(tx, sid, None, at)
        return True
    applied = _apply_status(storage, tx, sid, status, error_code, at, from_)
    if applied is None:
        return False
    latest, previous = applied
    if storage.records_events and latest == status:
        outbox.record_event(tx, sid, previous, at)
    return True


@in_writer_process
def record_sent_message(storage, sid, account_sid, to, from_, body, status, created_at,
                        now=None, reservation=None, reference=None, sent_by=None):
    """Stores a message Twilio accepted; its create-time status is the first history entry.

    Callbacks may already have stored later statuses, which this never moves back.
    `sent_by`: the name of the key that sent it (None without API_KEY). The send's
    reservation under the per-recipient limit is replaced by the stored message.
    With status webhooks on, a move of the latest status adds its event to the outbox.
    """
    now = now or stored_time()
    with storage.transaction() as tx:
        if reservation is not None:
            tx.execute("DELETE FROM send_reservations WHERE id = ?", (reservation,))
        tx.execute(
            "INSERT INTO messages (sid, latest_status, created_at, updated_at, storage_order)"
            f" VALUES (?, ?, ?, ?, {storage.ops.next_storage_order}) ON CONFLICT (sid) DO NOTHING",
            (sid, status, created_at, now),
        )
        applied = _apply_status(storage, tx, sid, status, None, created_at)
        # A callback that came first may have stored the number a Messaging Service sent
        # from (the service's MG SID never replaces it), and created the message at its
        # own, later, time.
        tx.execute(
            "UPDATE messages SET account_sid = ?, to_number = ?,"
            " from_number = CASE WHEN ? LIKE 'MG%' AND from_number IS NOT NULL"
            " THEN from_number ELSE ? END, body = ?, initial_status = ?, sent_at = ?,"
            " reference = ?, sent_by = ?,"
            " seconds_to_delivered = CASE WHEN created_at > ? THEN seconds_to_delivered"
            f" + {storage.ops.seconds_between('?', 'created_at')} ELSE seconds_to_delivered END,"
            " created_at = CASE WHEN created_at > ? THEN ? ELSE created_at END WHERE sid = ?",
            (account_sid, to, from_, from_, body, status, now, reference, sent_by, created_at,
             created_at, created_at, created_at, sid),
        )
        if storage.records_events and applied is not None and applied[0] == status:
            # After the update above, so the event carries the number and the reference.
            outbox.record_event(tx, sid, applied[1], created_at)

