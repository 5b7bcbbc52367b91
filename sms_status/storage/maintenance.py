"""Keeping the history: choosing what to reconcile with Twilio, pruning, the health
check's probe, and copying a history from one database to another."""

import time
from typing import NamedTuple

from sms_status.rules import FINAL_STATUSES
from sms_status.storage.times import stored_time
from sms_status.storage.writes import in_writer_process


def _marks_for(values):
    """The `?` placeholders of an `IN (...)` list of `values`: "?, ?, ?"."""
    return ", ".join("?" for _ in values)


def messages_to_reconcile(storage, idle_before, limit):
    """Non-final messages with no update since `idle_before`, least recently checked first."""
    return storage.query(
        "SELECT sid, latest_status FROM messages"
        f" WHERE latest_status NOT IN ({_marks_for(FINAL_STATUSES)}) AND updated_at <= ?"
        " AND (checked_at IS NULL OR checked_at <= ?)"
        " ORDER BY coalesce(checked_at, ''), updated_at LIMIT ?",
        (*FINAL_STATUSES, idle_before, idle_before, limit),
    )


# A checked_at later than any real time: reconciliation never picks the message again.
NEVER_AGAIN = "9999-12-31T23:59:59.999Z"


@in_writer_process
def mark_checked(storage, sid, at):
    """Records that Twilio was asked, so messages stuck in one status take turns."""
    with storage.transaction() as tx:
        tx.execute("UPDATE messages SET checked_at = ? WHERE sid = ?", (at, sid))


@in_writer_process
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
    the pending webhook events dropped with them; bodies cleared; the old messages kept
    for their pending webhook events, with those events; inbound messages removed and
    their bodies cleared; and the numbers opted out, which prune never removes."""

    messages: int
    events: int
    pending_dropped: int
    bodies: int
    kept: int
    kept_pending: int
    inbound: int = 0
    inbound_bodies: int = 0
    opted_out: int = 0


# The events of numbers (replies, opt-out changes) belong to no message, so no cascade
# removes them: prune removes those settled (delivered or given up on) with the replies.
OLD_NUMBER_EVENTS = ("FROM webhook_events WHERE message_sid IS NULL AND created_at < ?"
                     " AND state <> 'pending'")


def inbound_counts(storage, updated_before, body_before):
    """(inbound messages received before `updated_before`, bodies kept of the others older
    than `body_before`, numbers opted out now)."""
    def count(sql, params):
        return storage.query(sql, params)[0]["n"]

    return (count("SELECT count(*) AS n FROM inbound_messages WHERE received_at < ?",
                  (updated_before,)),
            count("SELECT count(*) AS n FROM inbound_messages WHERE received_at >= ?"
                  " AND received_at < ? AND body IS NOT NULL", (updated_before, body_before)),
            count("SELECT count(*) AS n FROM opt_outs", ()))


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
    return Pruned(old["messages"], int(old["events"]), int(old["pending"]), bodies, *kept,
                  *inbound_counts(storage, updated_before, body_before))


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
    removed = {"messages": 0, "events": 0, "pending": 0, "bodies": 0}

    def delete_old(tx):
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
                f"DELETE FROM messages WHERE sid IN ({_marks_for(counts_of)})"
                f" AND updated_at < ?{keep} RETURNING sid",
                (*counts_of, updated_before),
            ).fetchall()
            removed["messages"] += len(deleted)
            removed["events"] += sum(counts_of[row["sid"]][0] for row in deleted)
            removed["pending"] += sum(counts_of[row["sid"]][1] for row in deleted)
        return len(candidates)

    _in_batches(storage, "Deleting old messages", storage.query(
        f"SELECT count(*) AS n FROM messages WHERE updated_at < ?{keep}",
        (updated_before,))[0]["n"], batch, progress, delete_old)

    # Bodies are cleared by walking the messages in the order of their index on creation,
    # so no row is read twice.
    after = ("", 0)

    def clear_bodies(tx):
        nonlocal after
        page = tx.execute(
            "SELECT sid, created_at, storage_order FROM messages WHERE created_at < ?"
            " AND (created_at, storage_order) > (?, ?)"
            " ORDER BY created_at, storage_order LIMIT ?",
            (body_before, *after, batch),
        ).fetchall()
        if page:
            removed["bodies"] += tx.execute(
                "UPDATE messages SET body = NULL WHERE body IS NOT NULL"
                f" AND sid IN ({_marks_for(page)})",
                tuple(row["sid"] for row in page),
            ).rowcount
            after = (page[-1]["created_at"], page[-1]["storage_order"])
        return len(page)

    _in_batches(storage, "Clearing old message bodies", storage.query(
        "SELECT count(*) AS n FROM messages WHERE created_at < ?", (body_before,))[0]["n"],
        batch, progress, clear_bodies)
    inbound, inbound_bodies = prune_inbound(storage, updated_before, body_before, batch,
                                            progress)
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
    opted_out = storage.query("SELECT count(*) AS n FROM opt_outs")[0]["n"]
    return Pruned(removed["messages"], removed["events"], removed["pending"],
                  removed["bodies"], *kept, inbound, inbound_bodies, opted_out)


def prune_inbound(storage, received_before, body_before, batch=PRUNE_BATCH,
                  progress=no_progress):
    """Deletes the inbound messages received before `received_before`, and the settled
    events of numbers from then, and clears the other inbound bodies older than
    `body_before`, in batches; returns (messages deleted, bodies cleared). Opt-outs and
    their history are never deleted: a person's STOP holds until their START."""
    counts = {"inbound": 0, "bodies": 0}

    def delete_old(tx):
        rows = tx.execute("SELECT seq FROM inbound_messages WHERE received_at < ?"
                          " ORDER BY received_at, seq LIMIT ?",
                          (received_before, batch)).fetchall()
        if rows:
            counts["inbound"] += tx.execute(
                f"DELETE FROM inbound_messages WHERE seq IN ({_marks_for(rows)})",
                tuple(row["seq"] for row in rows)).rowcount
        return len(rows)

    _in_batches(storage, "Deleting old inbound messages", storage.query(
        "SELECT count(*) AS n FROM inbound_messages WHERE received_at < ?",
        (received_before,))[0]["n"], batch, progress, delete_old)

    def delete_events(tx):
        rows = tx.execute(f"SELECT seq {OLD_NUMBER_EVENTS} LIMIT ?",
                          (received_before, batch)).fetchall()
        if rows:
            tx.execute(f"DELETE FROM webhook_events WHERE seq IN ({_marks_for(rows)})",
                       tuple(row["seq"] for row in rows))
        return len(rows)

    _in_batches(storage, "Deleting old events of replies and opt-outs", storage.query(
        f"SELECT count(*) AS n {OLD_NUMBER_EVENTS}", (received_before,))[0]["n"], batch,
        progress, delete_events)

    def clear_bodies(tx):
        rows = tx.execute("SELECT seq FROM inbound_messages WHERE received_at < ?"
                          " AND body IS NOT NULL LIMIT ?", (body_before, batch)).fetchall()
        if rows:
            counts["bodies"] += tx.execute(
                "UPDATE inbound_messages SET body = NULL"
                f" WHERE seq IN ({_marks_for(rows)})",
                tuple(row["seq"] for row in rows)).rowcount
        return len(rows)

    _in_batches(storage, "Clearing old inbound bodies", storage.query(
        "SELECT count(*) AS n FROM inbound_messages WHERE received_at < ? AND body IS NOT NULL",
        (body_before,))[0]["n"], batch, progress, clear_bodies)
    return counts["inbound"], counts["bodies"]


def _in_batches(storage, label, total, batch, progress, step):
    """Runs `step(tx)`, which handles up to `batch` rows and returns how many, in one
    transaction after another until it handles fewer; calls `progress(label, done, total)`
    after each transaction that handled any."""
    done = 0
    while True:
        with storage.transaction() as tx:
            handled = step(tx)
        if handled:
            done += handled
            progress(label, done, total)
        if handled < batch:
            return


# The message the health check writes and deletes again: not a Twilio SID (those are
# hexadecimal), so no callback ever names it, and readers never see it (one transaction).
HEALTH_CHECK_SID = "health-check-probe-000000000000000"


@in_writer_process
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
            f" VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, {storage.ops.next_storage_order})",
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
    "inbound_messages": ("seq",),
    "opt_outs": ("seq",),
    "opt_out_changes": ("id",),
    "api_keys": (),
}
# The tables copied after the messages, each in its order of storage (a batch at a time),
# with what makes a row already there (a unique key) skipped: replies, the opt-out list and
# its history, and the events of numbers, which belong to no message.
COPIED_BY_ORDER = (
    ("opt_out_changes", "id", "", "optOutChanges"),
    ("opt_outs", "seq", "", "optOuts"),
    ("inbound_messages", "seq", "", "inbound"),
    ("webhook_events", "seq", " AND message_sid IS NULL", "webhookEvents"),
)


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


def _copy_in_order(source, target, table, columns, order, only=""):
    """Copies `table`'s rows (those matching `only`, an SQL condition after AND) in the
    order of the column `order`, a batch at a time; returns how many were new."""
    copied, last = 0, 0
    while True:
        rows = source.query(f"SELECT {', '.join(columns)}, {order} FROM {table}"
                            f" WHERE {order} > ?{only} ORDER BY {order} LIMIT ?",
                            (last, COPY_BATCH))
        if not rows:
            return copied
        last = rows[-1][order]
        with target.transaction() as tx:
            copied += _insert_new(tx, table, columns, rows)


def copy_history(source, target, keys_created_after, progress=no_progress):
    """Copies messages with their status events and webhook events, the replies and the
    opt-out list with its history (and their events), the idempotency keys created after
    `keys_created_after` and the API keys (their digests), from `source` into `target`, every
    column the target has (copied_columns). What `target` has already is left as it is, so
    copying twice copies nothing twice. Calls `progress(label, done, total)` after each batch
    of messages. Returns the counts copied.

    Messages are copied in the order `source` stored them, so `target` lists those created
    in the same millisecond in the same order."""
    columns = copied_columns(source, target)

    def listed(table, alias=""):
        return ", ".join(alias + c for c in columns[table])

    copied = {"messages": 0, "events": 0, "webhookEvents": 0, "keys": 0, "apiKeys": 0,
              "inbound": 0, "optOuts": 0, "optOutChanges": 0}
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
                computed=[("storage_order", target.ops.next_storage_order)])
            copied["events"] += _insert_new(tx, "status_events", columns["status_events"],
                                            events)
            copied["webhookEvents"] += _insert_new(
                tx, "webhook_events", columns["webhook_events"], webhook_events)
        done += len(messages)
        progress("Copying messages", done, total)
    for table, order, only, counted_as in COPIED_BY_ORDER:
        copied[counted_as] = copied.get(counted_as, 0) + _copy_in_order(
            source, target, table, columns[table], order, only)
    keys = source.query(f"SELECT {listed('idempotency_keys')} FROM idempotency_keys"
                        " WHERE created_at >= ?", (keys_created_after,))
    api_keys = source.query(f"SELECT {listed('api_keys')} FROM api_keys ORDER BY name")
    with target.transaction() as tx:
        copied["keys"] = _insert_new(tx, "idempotency_keys", columns["idempotency_keys"], keys)
        # Revoked keys too: their names stay taken, as the messages they sent name them.
        copied["apiKeys"] = _insert_new(tx, "api_keys", columns["api_keys"], api_keys)
    return copied
