"""A send's records before Twilio is asked: its idempotency key and its place under the
hourly limits, each claimed atomically across workers, threads and instances."""

from typing import NamedTuple

from sms_status.storage.times import stored_time, timestamp_of
from sms_status.storage.writes import in_writer_process


@in_writer_process
def reserve_idempotency_key(storage, scope, key, fingerprint, now, expire_before, stale_before):
    """Claims `key` for one request, atomically across workers, threads and instances.

    Returns ("new", None) when this request may go ahead, or one of ("replay", (status,
    response)), ("mismatch", None), ("in_flight", None), ("stale", None). Expired keys are
    deleted as new ones arrive, so no separate clean-up job is needed.
    """
    with storage.transaction() as tx:
        tx.lock(f"idempotency-key {scope} {key}")
        tx.execute("DELETE FROM idempotency_keys WHERE scope = ? AND key = ? AND created_at < ?",
                   (scope, key, expire_before))
        row = tx.execute(
            "SELECT fingerprint, created_at, status_code, response FROM idempotency_keys"
            " WHERE scope = ? AND key = ?",
            (scope, key),
        ).fetchone()
        if row is None:
            tx.execute(
                "INSERT INTO idempotency_keys (scope, key, fingerprint, created_at)"
                " VALUES (?, ?, ?, ?)",
                (scope, key, fingerprint, now),
            )
    if row is None:
        # Other keys' expiry is housekeeping: its own short transaction, outside the claim.
        with storage.transaction() as tx:
            tx.execute("DELETE FROM idempotency_keys WHERE created_at < ?", (expire_before,))
        return "new", None
    if row["fingerprint"] != fingerprint:
        return "mismatch", None
    if row["status_code"] is not None:
        return "replay", (row["status_code"], row["response"])
    if row["created_at"] < stale_before:
        return "stale", None
    return "in_flight", None


@in_writer_process
def save_idempotent_response(storage, scope, key, status_code, response):
    """Keeps the answer under the key, for replays."""
    with storage.transaction() as tx:
        tx.execute(
            "UPDATE idempotency_keys SET status_code = ?, response = ? WHERE scope = ? AND key = ?",
            (status_code, response, scope, key),
        )


@in_writer_process
def release_idempotency_key(storage, scope, key):
    """Forgets a key whose answer said "try again later", so a retry can go through."""
    with storage.transaction() as tx:
        tx.execute("DELETE FROM idempotency_keys WHERE scope = ? AND key = ?", (scope, key))


class SendPlace(NamedTuple):
    """What reserve_send answers: the reservation's id, or None when `limit_reached`
    ("recipient", "sender" or "total"), with the seconds until a place is free again."""

    reservation: int | None
    limit_reached: str | None
    wait_seconds: float | None


@in_writer_process
def reserve_send(storage, to, now, recipient_limit, total_limit, sender=None,
                 sender_limit=None) -> SendPlace:
    """Claims one place under the hourly limits, for one recipient (`recipient_limit`), for
    the whole service (`total_limit`; 0 turns either off) and for the key sending
    (`sender`, its name, and `sender_limit`; None: no limit of its own), atomically across
    workers and instances: the locks serialise each count with its claim.

    Counts the messages this service sent in the last hour and the reservations still
    counting. A reservation counts for an hour from the start, as if its message went
    out: a request that dies mid-send (its worker killed) never settles it, and its
    message may have gone out. It is replaced by the stored message on success and given
    back when Twilio certainly sent nothing.

    Returns (reservation id, None, None), or (None, the limit reached: "recipient",
    "sender" or "total", seconds until the first of the sends it counted stops counting).
    """
    hour_ago = stored_time(now - 3600)
    with storage.transaction() as tx:
        # Always "all sends", then a key, then a recipient, so two sends never wait on each
        # other.
        # Messages and reservations are read in one statement: PostgreSQL gives each
        # statement its own snapshot, and a send stored in between (its reservation
        # replaced by its message) would otherwise be missed by both reads.
        if total_limit:
            tx.lock("all sends")
            tx.execute("DELETE FROM send_reservations WHERE counts_until < ?", (now,))
            counted = tx.execute(
                "SELECT (SELECT count(*) FROM messages WHERE sent_at > ?) AS sent,"
                " (SELECT min(sent_at) FROM messages WHERE sent_at > ?) AS first_sent,"
                " (SELECT count(*) FROM send_reservations) AS reserved,"
                " (SELECT min(counts_until) FROM send_reservations) AS first_reserved",
                (hour_ago, hour_ago),
            ).fetchone()
            if counted["sent"] + counted["reserved"] >= total_limit:
                return SendPlace(None, "total", first_to_stop_counting(counted) - now)
        if sender_limit is not None:
            tx.lock(f"sender {sender}")
            tx.execute("DELETE FROM send_reservations WHERE sent_by = ? AND counts_until < ?",
                       (sender, now))
            # Counted, not listed: a key may send thousands an hour. A sent message's
            # created_at is its sent_at (record_sent_message), so the index of
            # GET /messages?sentBy= counts them.
            counted = tx.execute(
                "SELECT (SELECT count(*) FROM messages WHERE sent_by = ? AND created_at > ?)"
                " AS sent, (SELECT min(created_at) FROM messages WHERE sent_by = ?"
                " AND created_at > ?) AS first_sent,"
                " (SELECT count(*) FROM send_reservations WHERE sent_by = ?) AS reserved,"
                " (SELECT min(counts_until) FROM send_reservations WHERE sent_by = ?)"
                " AS first_reserved",
                (sender, hour_ago, sender, hour_ago, sender, sender),
            ).fetchone()
            if counted["sent"] + counted["reserved"] >= sender_limit:
                return SendPlace(None, "sender", first_to_stop_counting(counted) - now)
        if recipient_limit:
            tx.lock(f"recipient {to}")
            tx.execute("DELETE FROM send_reservations WHERE to_number = ? AND counts_until < ?",
                       (to, now))
            rows = tx.execute(
                "SELECT sent_at, NULL AS counts_until FROM messages"
                " WHERE to_number = ? AND sent_at > ?"
                " UNION ALL SELECT NULL, counts_until FROM send_reservations WHERE to_number = ?",
                (to, hour_ago, to),
            ).fetchall()
            stop_counting = [timestamp_of(row["sent_at"]) + 3600 if row["sent_at"]
                             else row["counts_until"] for row in rows]
            if len(stop_counting) >= recipient_limit:
                return SendPlace(None, "recipient", min(stop_counting) - now)
        return SendPlace(tx.execute(
            "INSERT INTO send_reservations (to_number, reserved_at, counts_until, sent_by)"
            " VALUES (?, ?, ?, ?) RETURNING id",
            (to, now, now + 3600, sender),
        ).fetchone()["id"], None, None)


def first_to_stop_counting(counted):
    """When the first of the sends `counted` (messages sent, reservations) stops counting:
    an hour after the first message's sending, or the first reservation's counts_until."""
    firsts = [counted["first_reserved"]] if counted["reserved"] else []
    if counted["sent"]:
        firsts.append(timestamp_of(counted["first_sent"]) + 3600)
    return min(firsts)


@in_writer_process
def release_send(storage, reservation):
    """Gives a reservation back: Twilio certainly did not send the message."""
    with storage.transaction() as tx:
        tx.execute("DELETE FROM send_reservations WHERE id = ?", (reservation,))
