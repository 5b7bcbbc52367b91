"""GET /inbound-messages and the /opt-outs endpoints: their parameters and the shape of
their answers, no Flask (their SQL is storage/inbound.py's and storage/opt_outs.py's).

Paging, windows and their 400s are listing.py's rules, the same as GET /messages': a
parameter the caller must fix raises BadQuery, which the web room answers with 400.
"""

from sms_status import rules
from sms_status.listing import (
    DEFAULT_LIMIT,
    PLUS_IN_A_URL,
    BadQuery,
    decode_cursor,
    encode_cursor,
    parse_instant,
    parse_limit,
    parse_to,
    refuse_empty_window,
    single_values,
)
from sms_status.storage import inbound, opt_outs

INBOUND_PARAMETERS = ("from", "to", "since", "until", "limit", "cursor")
OPT_OUTS_PARAMETERS = ("since", "until", "limit", "cursor")


def path_number(text):
    """The number of an /opt-outs/<number> path, E.164 (`+` written %2B)."""
    if not rules.is_e164(text):
        raise BadQuery("number", "The number in the path must be a phone number in E.164 "
                                 "format, like /opt-outs/%2B15558675309" + PLUS_IN_A_URL)
    return text


def paging(args, known):
    """(the other values, limit, since, until, before) of a listing's parameters."""
    values = single_values(args, known)
    limit = parse_limit(values["limit"]) if "limit" in values else DEFAULT_LIMIT
    since = parse_instant("since", values["since"]) if "since" in values else None
    until = parse_instant("until", values["until"]) if "until" in values else None
    refuse_empty_window(since, until)
    before = decode_cursor(values["cursor"]) if "cursor" in values else None
    return values, limit, since, until, before


def next_cursor(rows, limit, time_column):
    """The cursor after the last row of a page fetched with one row more than `limit`."""
    if len(rows) <= limit:
        return None
    return encode_cursor((rows[limit - 1][time_column], rows[limit - 1]["seq"]))


# --- GET /inbound-messages ------------------------------------------------------------------

def list_inbound(storage, args):
    """One page of inbound messages, newest first, with the cursor of the next page."""
    values, limit, since, until, before = paging(args, INBOUND_PARAMETERS)
    rows = inbound.inbound_page(
        storage, limit + 1,
        from_=parse_to(values["from"], "from") if "from" in values else None,
        to=parse_to(values["to"]) if "to" in values else None,
        since=since, until=until, before=before)
    return {"messages": [inbound_item(row) for row in rows[:limit]],
            "nextCursor": next_cursor(rows, limit, "received_at")}


def inbound_item(row):
    """An inbound message as the API shows it; `body` is null unless bodies are kept."""
    return {"sid": row["sid"], "from": row["from_number"], "to": row["to_number"],
            "body": row["body"], "numMedia": row["num_media"],
            "optOutType": row["opt_out_type"], "receivedAt": row["received_at"]}


# --- the opt-out list -----------------------------------------------------------------------

def list_opt_outs(storage, args):
    """One page of the numbers opted out now, newest first, with the next page's cursor."""
    _, limit, since, until, before = paging(args, OPT_OUTS_PARAMETERS)
    rows = opt_outs.opt_outs_page(storage, limit + 1, since=since, until=until, before=before)
    return {"optOuts": [{"number": row["number"], "optedOutAt": row["opted_out_at"],
                         "source": row["source"]} for row in rows[:limit]],
            "nextCursor": next_cursor(rows, limit, "opted_out_at")}


def opt_out_state(storage, number):
    """GET /opt-outs/<number>'s answer, or None when nothing was ever recorded for it."""
    changes = opt_outs.history_of(storage, number)
    if not changes:
        return None
    now = opt_outs.opt_out_of(storage, number)
    return {
        "number": number,
        "optedOut": now is not None,
        "optedOutAt": now["opted_out_at"] if now else None,
        "source": now["source"] if now else None,
        "history": [{"change": row["change"], "at": row["changed_at"], "source": row["source"],
                     "keyword": row["keyword"], "messageSid": row["message_sid"]}
                    for row in changes],
    }
