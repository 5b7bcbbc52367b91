"""The opt-out list: the numbers opted out now (`opt_outs`) and every change of each
number's opt-out (`opt_out_changes`), written once for both engines.

Every change of a number takes the number's lock first (PostgreSQL's advisory lock; SQLite
has one writer anyway), then changes the list, its history and, with status webhooks on,
adds its event to the number's stream in the outbox, in one transaction: two instances
never both record one change, and a number's events are numbered in the order they commit.
"""

from sms_status.storage import outbox
from sms_status.storage.reads import newest_first
from sms_status.storage.times import stored_time
from sms_status.storage.writes import in_writer_process

OPT_OUT_COLUMNS = "number, source, keyword, message_sid, opted_out_at, seq"


def lock_number(tx, number):
    """Serialises the writers of one number's replies and opt-out, until the transaction
    ends."""
    tx.lock(f"number {number}")


def _changed(storage, tx, number, change, source, keyword, message_sid, at):
    """Records a change in the history and, with webhooks on, its event."""
    tx.execute(
        "INSERT INTO opt_out_changes (number, change, source, keyword, message_sid,"
        " changed_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
        (number, change, source, keyword, message_sid, at))
    if storage.records_events:
        outbox.record_number_event(tx, number, f"recipient.{change}", {
            "number": number, "source": source, "keyword": keyword, "messageSid": message_sid,
            "at": at}, at)


def opt_out_in(storage, tx, number, source, keyword=None, message_sid=None, at=None):
    """Opts `number` out inside `tx` (which holds the number's lock); False when it was
    opted out already, which changes nothing."""
    at = at or stored_time()
    added = tx.execute(
        "INSERT INTO opt_outs (number, source, keyword, message_sid, opted_out_at)"
        " VALUES (?, ?, ?, ?, ?) ON CONFLICT (number) DO NOTHING",
        (number, source, keyword, message_sid, at)).rowcount
    if added:
        _changed(storage, tx, number, "opted_out", source, keyword, message_sid, at)
    return bool(added)


def opt_in_in(storage, tx, number, source, keyword=None, message_sid=None, at=None,
              only_source=None):
    """Ends `number`'s opt-out inside `tx` (which holds the number's lock), whatever its
    source, or only one of `only_source`. Returns None when it was not opted out, the
    source of its opt-out when that is not `only_source` (nothing changed), else "ended"."""
    row = tx.execute("SELECT source FROM opt_outs WHERE number = ?", (number,)).fetchone()
    if row is None:
        return None
    if only_source is not None and row["source"] != only_source:
        return row["source"]
    tx.execute("DELETE FROM opt_outs WHERE number = ?", (number,))
    _changed(storage, tx, number, "opted_in", source, keyword, message_sid, at or stored_time())
    return "ended"


@in_writer_process
def record_opt_out(storage, number, source, keyword=None, message_sid=None, at=None):
    """Opts `number` out (from Twilio's refusal, or the API); False when it was already."""
    with storage.transaction() as tx:
        lock_number(tx, number)
        return opt_out_in(storage, tx, number, source, keyword, message_sid, at)


@in_writer_process
def end_api_opt_out(storage, number, at=None):
    """Ends an opt-out recorded through the API: None when the number is not opted out,
    "ended", or the opt-out's other source ("keyword", "twilio"), which only the person's
    START ends."""
    with storage.transaction() as tx:
        lock_number(tx, number)
        return opt_in_in(storage, tx, number, "api", at=at, only_source="api")


# --- reads ---------------------------------------------------------------------------------

def opt_out_of(storage, number):
    """The number's opt-out row, or None when it is not opted out: what a send checks."""
    rows = storage.query("SELECT source, opted_out_at FROM opt_outs WHERE number = ?",
                         (number,))
    return rows[0] if rows else None


def history_of(storage, number):
    """Every change of the number's opt-out, oldest first."""
    return storage.query(
        "SELECT change, source, keyword, message_sid, changed_at FROM opt_out_changes"
        " WHERE number = ? ORDER BY id", (number,))


def opt_outs_page(storage, limit, since=None, until=None, before=None):
    """Up to `limit` numbers opted out now, newest first (opt-out time, then order of
    storage); `before` is an (opted_out_at, seq) position to start after."""
    conditions, params = [], []
    for condition, value in (("opted_out_at >= ?", since), ("opted_out_at < ?", until)):
        if value is not None:
            conditions.append(condition)
            params.append(value)
    return newest_first(storage, f"SELECT {OPT_OUT_COLUMNS} FROM opt_outs", conditions,
                        params, ("opted_out_at", "seq"), before, limit)


def change_counts(storage, since, until):
    """{"opted_out": n, "opted_in": n}: the changes made in [since, until)."""
    return {change: storage.query(
        "SELECT count(*) AS n FROM opt_out_changes WHERE changed_at >= ? AND changed_at < ?"
        " AND change = ?", (since, until, change))[0]["n"]
        for change in ("opted_out", "opted_in")}
