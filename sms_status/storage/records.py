"""The storage API: the message and status records, the same on SQLite and PostgreSQL.

`get_db()` is the only way request code reaches the database: it returns the app's engine
(sqlite.py or postgres.py), whose `transaction()` and `query()` run the SQL written once
below. Every query here is in the SQL both engines agree on; what differs lives in the
engines.

Each write is one transaction, and the statements of concurrent writers of one message
touch its rows in the same order (the message row if missing, then the history, then the
message's latest status), so concurrent updates queue instead of deadlocking on PostgreSQL.
"""

import time
from typing import NamedTuple

from flask import current_app

from sms_status.config import ConfigError, Problem
from sms_status.rules import FINAL_STATUSES, STATUS_RANK
from sms_status.storage import (  # noqa: F401 (re-exported for the app)
    DATABASE_ERRORS,
    READ_TIME_LIMIT_ERRORS,
    ModeConflict,
    OutcomeUnknown,
    open_engine,
    outbox,
)
from sms_status.storage.times import stored_time, timestamp_of  # noqa: F401 (for callers)
from sms_status.storage.writes import WRITES, writes  # noqa: F401 (WRITES: for the writer)

# The rank of a message's stored latest status, for the forward-only rule in SQL; a status
# this code does not know ranks below every known one, so any known status replaces it.
LATEST_STATUS_RANK = (
    "CASE latest_status "
    + " ".join(f"WHEN '{status}' THEN {rank}" for status, rank in STATUS_RANK.items())
    + " ELSE -1 END"
)
# An unknown new status never replaces anything (it still goes into the history).
UNKNOWN_STATUS_RANK = -2


def get_db():
    """The app's storage engine (SQLite or PostgreSQL, as DATABASE_URL says)."""
    return current_app.extensions["storage"]


def describe_error(error):
    """A database error's text for logs and answers, never with DATABASE_URL's password."""
    return get_db().describe_error(error)


def open_storage(config, **settings):
    """The engine DATABASE_URL names, created unconnected: it connects on first use.
    `settings` override the configuration's (storage.open_engine)."""
    return open_engine(config.database_url, **{**config.storage_settings, **settings})


def prepare(storage, mode=None):
    """Creates the database's schema or brings it up to date; raises ConfigError naming
    DATABASE_URL when the database cannot be opened.

    With `mode` ("live" or "simulated"), the database keeps the mode it is first used in,
    and a start in the other mode is refused: simulated messages never mix with live ones.
    """
    try:
        storage.migrate(mode)
    except DATABASE_ERRORS as error:
        raise ConfigError([Problem(
            "DATABASE_URL",
            f"DATABASE_URL: cannot open {storage.label}: {storage.describe_error(error)}")]
        ) from None
    except ModeConflict:
        fresh = storage.how_to_start_fresh
        if mode == "live":
            raise ConfigError([Problem(
                "DATABASE_URL",
                f"DATABASE_URL names {storage.label}, which was used in simulation: its "
                "messages are simulated ones, never mixed with live ones. Go live with "
                "another database (unset DATABASE_URL for sms_status.db, or name a new file "
                f"or PostgreSQL database), or {fresh} to start fresh")]) from None
        raise ConfigError([Problem(
            "DATABASE_URL",
            f"DATABASE_URL names {storage.label}, which is used live: simulation never "
            "writes made-up messages into it. Unset DATABASE_URL to simulate with "
            "sms_status_simulated.db, or name another database")]) from None


def recorded_mode(storage):
    """The mode ("live" or "simulated") a database at the current schema was first used
    in, or None when no service has used it yet."""
    rows = storage.query("SELECT mode FROM service_mode")
    return rows[0]["mode"] if rows else None


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
        f" THEN {storage.seconds_between('created_at', '?')} ELSE seconds_to_delivered END,"
        " from_number = CASE WHEN from_number LIKE 'MG%' AND ? NOT LIKE 'MG%'"
        " THEN ? ELSE from_number END"
        " WHERE sid = ? RETURNING latest_status, previous_status",
        (rank, rank, status, rank, error_code, at, at, status, at, from_, from_, sid),
    ).fetchone()
    return row["latest_status"], row["previous_status"]


@writes
def record_status(storage, sid, status, error_code=None, to=None, from_=None, account_sid=None,
                  at=None, events=False):
    """Stores one status update (callback or reconciliation); False when it was a repeat.

    A callback may arrive before /send-sms stored its message, or be about a message
    sent by other software: the message record is then created from the callback. With
    `events` (status webhooks on), a move of the latest status adds its event to the
    outbox in the same transaction.
    """
    at = at or stored_time()
    with storage.transaction() as tx:
        created = tx.execute(
            "INSERT INTO messages (sid, account_sid, to_number, from_number, latest_status,"
            " error_code, created_at, updated_at, seconds_to_delivered, storage_order)"
            f" VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, {storage.next_storage_order})"
            " ON CONFLICT (sid) DO NOTHING",
            (sid, account_sid, to, from_, status, error_code, at, at,
             0.0 if status == "delivered" else None),
        ).rowcount
        if created:
            # The new message already holds this status: only its history is missing.
            tx.execute(INSERT_STATUS_EVENT, (sid, status, error_code, at))
            if events:
                outbox.record_event(tx, sid, None, at)
            return True
        applied = _apply_status(storage, tx, sid, status, error_code, at, from_)
        if applied is None:
            return False
        latest, previous = applied
        if events and latest == status:
            outbox.record_event(tx, sid, previous, at)
        return True


@writes
def record_sent_message(storage, sid, account_sid, to, from_, body, status, created_at,
                        now=None, reservation=None, reference=None, events=False):
    """Stores a message Twilio accepted; its create-time status is the first history entry.

    Callbacks may already have stored later statuses, which this never moves back. The
    send's reservation under the per-recipient limit is replaced by the stored message.
    With `events`, a move of the latest status adds its event to the outbox.
    """
    now = now or stored_time()
    with storage.transaction() as tx:
        if reservation is not None:
            tx.execute("DELETE FROM send_reservations WHERE id = ?", (reservation,))
        tx.execute(
            "INSERT INTO messages (sid, latest_status, created_at, updated_at, storage_order)"
            f" VALUES (?, ?, ?, ?, {storage.next_storage_order}) ON CONFLICT (sid) DO NOTHING",
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
            " reference = ?,"
            " seconds_to_delivered = CASE WHEN created_at > ? THEN seconds_to_delivered"
            f" + {storage.seconds_between('?', 'created_at')} ELSE seconds_to_delivered END,"
            " created_at = CASE WHEN created_at > ? THEN ? ELSE created_at END WHERE sid = ?",
            (account_sid, to, from_, from_, body, status, now, reference, created_at,
             created_at, created_at, created_at, sid),
        )
        if events and applied is not None and applied[0] == status:
            # After the update above, so the event carries the number and the reference.
            outbox.record_event(tx, sid, applied[1], created_at)


@writes
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


@writes
def save_idempotent_response(storage, scope, key, status_code, response):
    """Keeps the answer under the key, for replays."""
    with storage.transaction() as tx:
        tx.execute(
            "UPDATE idempotency_keys SET status_code = ?, response = ? WHERE scope = ? AND key = ?",
            (status_code, response, scope, key),
        )


@writes
def release_idempotency_key(storage, scope, key):
    """Forgets a key whose answer said "try again later", so a retry can go through."""
    with storage.transaction() as tx:
        tx.execute("DELETE FROM idempotency_keys WHERE scope = ? AND key = ?", (scope, key))


class SendPlace(NamedTuple):
    """What reserve_send answers: the reservation's id, or None when `limit_reached`
    ("recipient" or "total"), with the seconds until a place is free again."""

    reservation: int | None
    limit_reached: str | None
    wait_seconds: float | None


@writes
def reserve_send(storage, to, now, recipient_limit, total_limit) -> SendPlace:
    """Claims one place under the hourly limits, for one recipient (`recipient_limit`) and
    for the whole service (`total_limit`; 0 turns either off), atomically across workers
    and instances: the locks serialise each count with its claim.

    Counts the messages this service sent in the last hour and the reservations still
    counting. A reservation counts for an hour from the start, as if its message went
    out: a request that dies mid-send (its worker killed) never settles it, and its
    message may have gone out. It is replaced by the stored message on success and given
    back when Twilio certainly sent nothing.

    Returns (reservation id, None, None), or (None, the limit reached: "recipient" or
    "total", seconds until the first of the sends it counted stops counting).
    """
    hour_ago = stored_time(now - 3600)
    with storage.transaction() as tx:
        # Always "all sends" before a recipient, so two sends never wait on each other.
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
                firsts = [counted["first_reserved"]] if counted["reserved"] else []
                if counted["sent"]:
                    firsts.append(timestamp_of(counted["first_sent"]) + 3600)
                return SendPlace(None, "total", min(firsts) - now)
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
            "INSERT INTO send_reservations (to_number, reserved_at, counts_until)"
            " VALUES (?, ?, ?) RETURNING id",
            (to, now, now + 3600),
        ).fetchone()["id"], None, None)


@writes
def release_send(storage, reservation):
    """Gives a reservation back: Twilio certainly did not send the message."""
    with storage.transaction() as tx:
        tx.execute("DELETE FROM send_reservations WHERE id = ?", (reservation,))


def messages_to_reconcile(storage, idle_before, limit):
    """Non-final messages with no update since `idle_before`, least recently checked first."""
    placeholders = ", ".join("?" for _ in FINAL_STATUSES)
    return storage.query(
        "SELECT sid, latest_status FROM messages"
        f" WHERE latest_status NOT IN ({placeholders}) AND updated_at <= ?"
        " AND (checked_at IS NULL OR checked_at <= ?)"
        " ORDER BY coalesce(checked_at, ''), updated_at LIMIT ?",
        (*FINAL_STATUSES, idle_before, idle_before, limit),
    )


# A checked_at later than any real time: reconciliation never picks the message again.
NEVER_AGAIN = "9999-12-31T23:59:59.999Z"


@writes
def mark_checked(storage, sid, at):
    """Records that Twilio was asked, so messages stuck in one status take turns."""
    with storage.transaction() as tx:
        tx.execute("UPDATE messages SET checked_at = ? WHERE sid = ?", (at, sid))


@writes
def mark_unknown_at_twilio(storage, sid):
    """Records that Twilio has no such message (404): asking again would never help."""
    mark_checked(storage, sid, NEVER_AGAIN)


COMPACT_ATTEMPTS = 20
# Messages pruned per transaction: each batch is one short write, so callbacks keep landing
# between batches instead of waiting (or failing) behind one long delete.
PRUNE_BATCH = 500


def no_progress(label, done, total):
    """A progress callback that shows nothing."""


# A message whose status webhooks are still to be delivered is kept, however old, unless
# the operator drops them (prune --drop-pending-webhooks).
NO_PENDING_EVENT = (" AND NOT EXISTS (SELECT 1 FROM webhook_events w"
                    " WHERE w.message_sid = messages.sid AND w.state = 'pending')")
PENDING_EVENTS_OF_MESSAGE = ("(SELECT count(*) FROM webhook_events w"
                             " WHERE w.message_sid = messages.sid AND w.state = 'pending')")


class Pruned(NamedTuple):
    """What prune removed, or would remove (a dry run): messages, their status events and
    the pending webhook events dropped with them; bodies cleared; and the old messages kept
    for their pending webhook events, with those events."""

    messages: int
    events: int
    pending_dropped: int
    bodies: int
    kept: int
    kept_pending: int


def kept_for_pending_events(storage, updated_before):
    """(messages, events): the messages idle since `updated_before` that have status webhook
    events pending, and those events."""
    row = storage.query(
        "SELECT count(DISTINCT m.sid) AS messages, count(*) AS events FROM messages m"
        " JOIN webhook_events w ON w.message_sid = m.sid AND w.state = 'pending'"
        " WHERE m.updated_at < ?", (updated_before,))[0]
    return row["messages"], row["events"]


def prune_preview(storage, updated_before, body_before, drop_pending=False):
    """What prune would do now with the same arguments (Pruned), changing nothing."""
    keep = "" if drop_pending else NO_PENDING_EVENT
    old = storage.query(
        "SELECT count(*) AS messages, coalesce(sum((SELECT count(*) FROM status_events"
        " WHERE status_events.message_sid = messages.sid)), 0) AS events,"
        f" coalesce(sum({PENDING_EVENTS_OF_MESSAGE}), 0) AS pending"
        f" FROM messages WHERE updated_at < ?{keep}", (updated_before,))[0]
    # Bodies are cleared after the deletion, so only the remaining messages' count.
    bodies = storage.query(
        "SELECT count(*) AS n FROM messages WHERE created_at < ? AND body IS NOT NULL"
        f" AND NOT (updated_at < ?{keep})", (body_before, updated_before))[0]["n"]
    kept = (0, 0) if drop_pending else kept_for_pending_events(storage, updated_before)
    return Pruned(old["messages"], int(old["events"]), int(old["pending"]), bodies, *kept)


def prune(storage, updated_before, body_before, now, batch=PRUNE_BATCH, progress=no_progress,
          drop_pending=False):
    """Deletes messages (their history and webhook events with them) idle since
    `updated_before`, but none with an event still pending unless `drop_pending`; clears
    old bodies.

    Works in batches of `batch` messages, one short transaction each, and calls
    `progress(label, done, total)` after each. Also drops the per-recipient reservations
    that stopped counting (each send clears only its own recipient's). Returns the counts
    (Pruned).
    """
    keep = "" if drop_pending else NO_PENDING_EVENT
    messages = events = pending = bodies = 0
    total = storage.query(
        f"SELECT count(*) AS n FROM messages WHERE updated_at < ?{keep}",
        (updated_before,))[0]["n"]
    done = 0
    while True:
        with storage.transaction() as tx:
            candidates = tx.execute(
                "SELECT sid, (SELECT count(*) FROM status_events"
                " WHERE status_events.message_sid = messages.sid) AS events,"
                f" {PENDING_EVENTS_OF_MESSAGE} AS pending"
                f" FROM messages WHERE updated_at < ?{keep}"
                " ORDER BY updated_at LIMIT ?",
                (updated_before, batch),
            ).fetchall()
            counts_of = {row["sid"]: (row["events"], row["pending"]) for row in candidates}
            if counts_of:
                # updated_at is checked again: a callback may have revived a message since
                # (PostgreSQL), and it must then keep its history. Events go by cascade.
                deleted = tx.execute(
                    f"DELETE FROM messages WHERE sid IN ({', '.join('?' for _ in counts_of)})"
                    f" AND updated_at < ?{keep} RETURNING sid",
                    (*counts_of, updated_before),
                ).fetchall()
                messages += len(deleted)
                events += sum(counts_of[row["sid"]][0] for row in deleted)
                pending += sum(counts_of[row["sid"]][1] for row in deleted)
        if candidates:
            done += len(candidates)
            progress("Deleting old messages", done, total)
        if len(candidates) < batch:
            break
    # Bodies are cleared by walking the messages in the order of their index on creation,
    # so no row is read twice.
    after = ("", 0)
    total = storage.query("SELECT count(*) AS n FROM messages WHERE created_at < ?",
                          (body_before,))[0]["n"]
    done = 0
    while True:
        with storage.transaction() as tx:
            page = tx.execute(
                "SELECT sid, created_at, storage_order FROM messages WHERE created_at < ?"
                " AND (created_at, storage_order) > (?, ?)"
                " ORDER BY created_at, storage_order LIMIT ?",
                (body_before, *after, batch),
            ).fetchall()
            if page:
                bodies += tx.execute(
                    "UPDATE messages SET body = NULL WHERE body IS NOT NULL"
                    f" AND sid IN ({', '.join('?' for _ in page)})",
                    tuple(row["sid"] for row in page),
                ).rowcount
                after = (page[-1]["created_at"], page[-1]["storage_order"])
        if page:
            done += len(page)
            progress("Clearing old message bodies", done, total)
        if len(page) < batch:
            break
    with storage.transaction() as tx:
        tx.execute("DELETE FROM send_reservations WHERE counts_until < ?", (now,))
    # Give the space of the deleted rows' journal back (SQLite's WAL; nothing on PostgreSQL).
    # A checkpoint under way elsewhere (the writer process's) makes an attempt give up at
    # once, so it is tried a few times.
    for _ in range(COMPACT_ATTEMPTS):
        if storage.compact():
            break
        time.sleep(0.1)
    kept = (0, 0) if drop_pending else kept_for_pending_events(storage, updated_before)
    return Pruned(messages, events, pending, bodies, *kept)


# The message the health check writes and deletes again: not a Twilio SID (those are
# hexadecimal), so no callback ever names it, and readers never see it (one transaction).
HEALTH_CHECK_SID = "health-check-probe-000000000000000"


@writes
def check_writable(storage):
    """Commits a write as large as a status update's, so a health check fails whenever a
    status could not be stored.

    A one-row write can still fit in pages the database has already (a full disk) while a
    status update, which touches the messages, their indexes and the history, cannot: so
    this inserts a message of the usual size with one event, deletes both, and records the
    time of the check.
    """
    at = stored_time()
    with storage.transaction(probe=True) as tx:
        tx.execute(
            "INSERT INTO messages (sid, account_sid, to_number, from_number, latest_status,"
            " error_code, created_at, updated_at, sent_at, storage_order)"
            f" VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, {storage.next_storage_order})",
            (HEALTH_CHECK_SID, "AC" + "0" * 32, "+15550000000", "+15550000000", "delivered",
             None, at, at, at),
        )
        tx.execute(
            "INSERT INTO status_events (message_sid, status, error_code, received_at)"
            " VALUES (?, ?, ?, ?)",
            (HEALTH_CHECK_SID, "delivered", None, at),
        )
        tx.execute("DELETE FROM messages WHERE sid = ?", (HEALTH_CHECK_SID,))
        tx.execute(
            "INSERT INTO health_checks (id, checked_at) VALUES (1, ?)"
            " ON CONFLICT (id) DO UPDATE SET checked_at = excluded.checked_at",
            (at,),
        )


# --- copying a history from one database to another ---------------------------------------

COPY_BATCH = 1000
# The columns of each copied table that the target gives each row itself: its numbering
# (a message's order of storage, an event's id or seq) and a webhook event's lease (the
# copy is attempted afresh). Every other column is copied, as the target's schema has it.
NOT_COPIED = {
    "messages": ("storage_order",),
    "status_events": ("id",),
    "webhook_events": ("seq", "lease", "lease_until"),
    "idempotency_keys": (),
}


class ColumnsMissing(Exception):
    """The source database lacks columns the target has: nothing is copied."""


def copied_columns(source, target):
    """Each copied table's columns: the target's, but those it numbers itself, in its
    order. Raises ColumnsMissing, naming them, when the source lacks any."""
    columns, missing = {}, []
    for table, not_copied in NOT_COPIED.items():
        columns[table] = [c for c in target.columns(table) if c not in not_copied]
        there = set(source.columns(table))
        missing += [f"{table}.{c}" for c in columns[table] if c not in there]
    if missing:
        raise ColumnsMissing(
            f"{source.label} has no column {', '.join(missing)}, which {target.label} has: "
            "nothing was copied")
    return columns


def _insert_new(tx, table, columns, rows, computed=()):
    """Inserts the rows not there yet; returns how many were new. `computed`: (column, SQL)
    pairs of values the target database gives each row."""
    statement = (f"INSERT INTO {table} ({', '.join((*columns, *(c for c, _ in computed)))})"
                 f" VALUES ({', '.join((*('?' for _ in columns), *(v for _, v in computed)))})"
                 " ON CONFLICT DO NOTHING")
    return sum(tx.execute(statement, tuple(row[c] for c in columns)).rowcount for row in rows)


def copy_history(source, target, keys_created_after, progress=no_progress):
    """Copies messages with their status events and webhook events, and the idempotency
    keys created after `keys_created_after`, from `source` into `target`, every column the
    target has (copied_columns). What `target` has already is left as it is, so copying
    twice copies nothing twice. Calls `progress(label, done, total)` after each batch of
    messages. Returns the counts copied.

    Messages are copied in the order `source` stored them, so `target` lists those created
    in the same millisecond in the same order."""
    columns = copied_columns(source, target)

    def listed(table, alias=""):
        return ", ".join(alias + c for c in columns[table])

    copied = {"messages": 0, "events": 0, "webhookEvents": 0, "keys": 0}
    total = source.query("SELECT count(*) AS n FROM messages")[0]["n"]
    done = last = 0
    while True:
        messages = source.query(
            f"SELECT {listed('messages')}, storage_order FROM messages"
            " WHERE storage_order > ? ORDER BY storage_order LIMIT ?", (last, COPY_BATCH))
        if not messages:
            break
        first, last = messages[0]["storage_order"], messages[-1]["storage_order"]
        events = source.query(
            f"SELECT {listed('status_events', 'e.')} FROM status_events e"
            " JOIN messages m ON m.sid = e.message_sid"
            " WHERE m.storage_order >= ? AND m.storage_order <= ? ORDER BY e.received_at, e.id",
            (first, last))
        # Webhook events in the order they were recorded, without their leases.
        webhook_events = source.query(
            f"SELECT {listed('webhook_events', 'w.')} FROM webhook_events w"
            " JOIN messages m ON m.sid = w.message_sid"
            " WHERE m.storage_order >= ? AND m.storage_order <= ? ORDER BY w.seq",
            (first, last))
        with target.transaction() as tx:
            copied["messages"] += _insert_new(
                tx, "messages", columns["messages"], messages,
                computed=[("storage_order", target.next_storage_order)])
            copied["events"] += _insert_new(tx, "status_events", columns["status_events"],
                                            events)
            copied["webhookEvents"] += _insert_new(
                tx, "webhook_events", columns["webhook_events"], webhook_events)
        done += len(messages)
        progress("Copying messages", done, total)
    keys = source.query(f"SELECT {listed('idempotency_keys')} FROM idempotency_keys"
                        " WHERE created_at >= ?", (keys_created_after,))
    with target.transaction() as tx:
        copied["keys"] = _insert_new(tx, "idempotency_keys", columns["idempotency_keys"], keys)
    return copied
