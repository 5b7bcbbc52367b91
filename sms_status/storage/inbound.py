"""Inbound messages: each reply Twilio posts, stored once per SID with the opt-out change its
keyword makes and their events, in one transaction; and the reads of them."""

from sms_status.storage import opt_outs, outbox
from sms_status.storage.reads import newest_first
from sms_status.storage.times import stored_time
from sms_status.storage.writes import in_writer_process

INBOUND_COLUMNS = ("seq, sid, from_number, to_number, body, num_media, opt_out_type, kind,"
                   " received_at")


@in_writer_process
def record_inbound(storage, sid, from_, to, body, num_media, num_segments, opt_out_type,
                   kind, keyword, account_sid=None, at=None, keep_body=False,
                   changes_list=True):
    """Stores one inbound message; returns "repeat" for a SID stored already (nothing is
    stored or queued again), else "opted_out" or "opted_in" when its keyword changed the
    sender's opt-out, or "stored".

    The body is kept at rest only with `keep_body` (STORE_MESSAGE_BODY); its event carries
    it always, since the event is how the sender's application gets the reply. With
    `changes_list` (a sender with an E.164 number), an opt-out or opt-in keyword changes
    the sender's opt-out; the reply's event comes before the change's.
    """
    at = at or stored_time()
    with storage.transaction() as tx:
        opt_outs.lock_number(tx, from_)
        stored = tx.execute(
            "INSERT INTO inbound_messages (sid, account_sid, from_number, to_number, body,"
            " num_media, num_segments, opt_out_type, kind, received_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (sid) DO NOTHING",
            (sid, account_sid, from_, to, body if keep_body else None, num_media,
             num_segments, opt_out_type, kind, at)).rowcount
        if not stored:
            return "repeat"
        if storage.records_events:
            outbox.record_number_event(tx, from_, "inbound.received", {
                "sid": sid, "from": from_, "to": to, "body": body, "numMedia": num_media,
                "optOutType": opt_out_type, "receivedAt": at}, at)
        if changes_list and kind == "opt_out":
            if opt_outs.opt_out_in(storage, tx, from_, "keyword", keyword, sid, at):
                return "opted_out"
        elif changes_list and kind == "opt_in":
            if opt_outs.opt_in_in(storage, tx, from_, "keyword", keyword, sid, at) == "ended":
                return "opted_in"
        return "stored"


def inbound_page(storage, limit, from_=None, to=None, since=None, until=None, before=None):
    """Up to `limit` inbound messages newest first (receipt, then order of storage), matching
    every filter given; `before` is a (received_at, seq) position to start after."""
    conditions, params = [], []
    for condition, value in (("from_number = ?", from_), ("to_number = ?", to),
                             ("received_at >= ?", since), ("received_at < ?", until)):
        if value is not None:
            conditions.append(condition)
            params.append(value)
    return newest_first(storage, f"SELECT {INBOUND_COLUMNS} FROM inbound_messages",
                        conditions, params, ("received_at", "seq"), before, limit)


def received_count(storage, since, until):
    """How many inbound messages were received in [since, until)."""
    return storage.query("SELECT count(*) AS n FROM inbound_messages WHERE received_at >= ?"
                         " AND received_at < ?", (since, until))[0]["n"]
