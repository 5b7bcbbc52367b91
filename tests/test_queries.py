import ast
import base64
import inspect
import itertools
import json
import math
import re
import time
from datetime import datetime, timedelta, timezone

import pytest
from twilio.http.response import Response
from werkzeug.datastructures import MultiDict

from sms_status import listing, overview
from sms_status.services import get_db, services
from sms_status.storage import SQLiteEngine, outbox, reads, statuses, times
from support import (
    AUTH,
    NOW,
    app_database_url,
    callback,
    fill_messages,
    sql_rows,
    sqlite_only,
)

pytestmark = pytest.mark.fixed_clock


def at(seconds_before_now):
    """The stored timestamp of NOW minus `seconds_before_now`."""
    return times.stored_time(NOW - seconds_before_now)


def get(client, path, **params):
    response = client.get(path, query_string=params, headers=AUTH)
    return response.status_code, response.get_json()


def sids(answer):
    return [message["sid"] for message in answer["messages"]]


# --- GET /messages ------------------------------------------------------------------------

def test_messages_are_newest_first_with_the_documented_shape(client, store):
    older = store(120, ("sent", 1), ("undelivered", 3, 30003))
    newer = store(60, ("sent", 1), ("delivered", 2))
    status, answer = get(client, "/messages")
    assert status == 200
    assert sids(answer) == [newer, older] and answer["nextCursor"] is None
    item = answer["messages"][1]
    assert item == {
        "sid": older, "to": "+15558675309", "from": "+15551234567",
        "latestStatus": "undelivered", "errorCode": 30003,
        "errorDescription": item["errorDescription"],
        "reference": None, "sentBy": None, "createdAt": at(120), "updatedAt": at(117),
    }
    assert item["errorDescription"].startswith("Unreachable handset")
    assert answer["messages"][0]["errorDescription"] is None


def walk(client, **params):
    """The SIDs of every page of /messages, one message per page, following the cursors."""
    seen, cursor = [], None
    while True:
        status, page = get(client, "/messages", limit=1, **params,
                           **({"cursor": cursor} if cursor else {}))
        assert status == 200, page
        seen += sids(page)
        cursor = page["nextCursor"]
        if cursor is None:
            return seen
        assert len(seen) < 50


def test_messages_created_in_the_same_millisecond_list_newest_stored_first(client, store):
    made = [store(60, sid="SM3"), store(60, ("sent", 0), sid="SM1"), store(60, sid="SM2")]
    newest_stored_first = made[::-1]
    store(61, sid="SM9")  # a millisecond older: after them whatever its SID
    assert sids(get(client, "/messages")[1]) == newest_stored_first + ["SM9"]
    assert walk(client) == newest_stored_first + ["SM9"]
    assert walk(client, to="+15558675309") == newest_stored_first + ["SM9"]
    assert walk(client, status="queued,sent") == newest_stored_first + ["SM9"]
    assert walk(client, since="2026-11-26T19:59:00Z") == newest_stored_first


def test_sends_one_after_the_other_list_in_that_order(client, send, fake_twilio, clock):
    """Twilio's date_created has whole seconds: the service's own clock gives createdAt its
    milliseconds, and sends in the same millisecond list newest-stored first."""
    whole_second = datetime.fromtimestamp(NOW, timezone.utc).strftime(
        "%a, %d %b %Y %H:%M:%S +0000")
    answers = [("SM" + "f" * 32, NOW + 0.25), ("SM" + "0" * 32, NOW + 0.251),
               ("SM" + "8" * 32, NOW + 0.251)]
    for sid, moment in answers:
        fake_twilio.answer_next(Response(201, json.dumps({
            "sid": sid, "status": "queued", "to": "+15558675309", "from": "+15551234567",
            "account_sid": "AC" + "a1" * 16, "date_created": whole_second})))
        clock["now"] = moment
        assert send().status_code == 200
    answer = get(client, "/messages")[1]
    assert sids(answer) == [sid for sid, _ in answers][::-1]
    assert [m["createdAt"] for m in answer["messages"]] == [
        "2026-11-26T20:00:00.251Z", "2026-11-26T20:00:00.251Z", "2026-11-26T20:00:00.250Z"]


def test_messages_filter_by_recipient(client, store):
    mine = store(60, to="+15550000001")
    store(50, to="+15550000002")
    store(40, to="+155500000011")
    assert sids(get(client, "/messages", to="+15550000001")[1]) == [mine]


def test_messages_filter_by_one_or_more_statuses(client, store):
    delivered = store(50, ("delivered", 1))
    failed = store(40, ("failed", 1, 30008))
    queued = store(30)
    undelivered = store(20, ("undelivered", 1, 30003))
    assert sids(get(client, "/messages", status="delivered")[1]) == [delivered]
    assert sids(get(client, "/messages", status="failed,undelivered")[1]) == [undelivered,
                                                                               failed]
    assert sids(get(client, "/messages", status="queued, delivered")[1]) == [queued, delivered]


def test_messages_with_several_statuses_page_in_one_order(client, store):
    made = [store(100 - n, ("delivered" if n % 3 else "failed", 1)) for n in range(10)]
    status, first = get(client, "/messages", status="delivered,failed", limit=4)
    assert status == 200 and sids(first) == made[::-1][:4]
    _, second = get(client, "/messages", status="delivered,failed", limit=4,
                    cursor=first["nextCursor"])
    _, third = get(client, "/messages", status="delivered,failed", limit=4,
                   cursor=second["nextCursor"])
    assert sids(second) == made[::-1][4:8] and sids(third) == made[::-1][8:]
    assert third["nextCursor"] is None


def test_messages_filter_by_error_code(client, store):
    filtered = store(50, ("undelivered", 1, 30007))
    store(40, ("undelivered", 1, 30003))
    store(30, ("delivered", 1))
    status, answer = get(client, "/messages", errorCode="30007")
    assert status == 200 and sids(answer) == [filtered]
    assert answer["messages"][0]["errorDescription"].startswith("Carrier filtering")


@pytest.mark.parametrize("params, expected", [
    pytest.param({"since": "2026-11-26T19:00:00Z"}, ["at", "after"], id="since-inclusive"),
    pytest.param({"until": "2026-11-26T19:00:00Z"}, ["before"], id="until-exclusive"),
    pytest.param({"since": "2026-11-26T20:00:00+01:00"}, ["at", "after"], id="since-offset"),
    pytest.param({"since": "2026-11-26t19:00:00z"}, ["at", "after"], id="since-lowercase"),
    pytest.param({"until": "2026-11-26T14:00:00-05:00"}, ["before"], id="until-offset"),
    pytest.param({"since": "2026-11-26T19:00:00.0001Z"}, ["after"], id="since-sub-ms"),
    pytest.param({"until": "2026-11-26T19:00:00.0001Z"}, ["before", "at"], id="until-sub-ms"),
    pytest.param({"since": "2026-11-26T19:00:00Z", "until": "2026-11-26T19:00:00.001Z"},
                 ["at"], id="one-millisecond"),
])
def test_messages_window_compares_created_at(client, store, params, expected):
    made = {"before": store(3600.001), "at": store(3600), "after": store(3599.999)}
    answer = get(client, "/messages", **params)[1]
    assert sorted(sids(answer)) == sorted(made[name] for name in expected)


@pytest.mark.parametrize("limit, status", [
    pytest.param("1", 200, id="1"), pytest.param("200", 200, id="200"),
    pytest.param("0", 400, id="0"), pytest.param("201", 400, id="201"),
    pytest.param("abc", 400, id="abc"), pytest.param("-1", 400, id="negative"),
    pytest.param("1.5", 400, id="fraction"), pytest.param("", 400, id="empty"),
])
def test_messages_limit_bounds(client, store, limit, status):
    for n in range(3):
        store(60 + n)
    code, answer = get(client, "/messages", limit=limit)
    assert code == status
    if status == 200:
        assert len(answer["messages"]) == min(int(limit), 3)
    else:
        assert "'limit'" in answer["error"]


def test_messages_default_to_pages_of_50(client, store):
    for n in range(51):
        store(600 - n)
    first = get(client, "/messages")[1]
    assert len(first["messages"]) == 50 and first["nextCursor"]
    last = get(client, "/messages", cursor=first["nextCursor"])[1]
    assert len(last["messages"]) == 1 and last["nextCursor"] is None


def test_the_last_full_page_has_no_next_cursor(client, store):
    for n in range(4):
        store(60 + n)
    answer = get(client, "/messages", limit=4)[1]
    assert len(answer["messages"]) == 4 and answer["nextCursor"] is None


def cursor_of(value):
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode()


@pytest.mark.parametrize("params, named", [
    pytest.param({"stauts": "sent"}, "stauts", id="unknown-parameter"),
    pytest.param({"to": "15558675309"}, "to", id="to-without-plus"),
    pytest.param({"to": " 15558675309"}, "to", id="to-plus-as-space"),
    pytest.param({"to": "+0123"}, "to", id="to-leading-zero"),
    pytest.param({"status": "delivred"}, "status", id="status-typo"),
    pytest.param({"status": ""}, "status", id="status-empty"),
    pytest.param({"status": "sent,"}, "status", id="status-trailing-comma"),
    pytest.param({"errorCode": "abc"}, "errorCode", id="error-code-text"),
    pytest.param({"errorCode": "-30003"}, "errorCode", id="error-code-negative"),
    pytest.param({"errorCode": "9" * 10}, "errorCode", id="error-code-huge"),
    pytest.param({"since": "2026-11-26T19:00:00"}, "since", id="since-naive"),
    pytest.param({"since": "2026-11-26"}, "since", id="since-date-only"),
    pytest.param({"since": "yesterday"}, "since", id="since-text"),
    pytest.param({"until": "2026-11-26T19:00:00"}, "until", id="until-naive"),
    pytest.param({"until": "2026-13-01T00:00:00Z"}, "until", id="until-month-13"),
    pytest.param({"until": "0001-01-01T00:00:00+01:00"}, "until", id="until-before-year-1"),
    pytest.param({"since": "2026-11-26T20:00:00Z", "until": "2026-11-26T19:00:00Z"},
                 "since", id="since-after-until"),
    pytest.param({"cursor": "abc"}, "cursor", id="cursor-garbage"),
    pytest.param({"cursor": "é"}, "cursor", id="cursor-not-ascii"),
    pytest.param({"cursor": cursor_of({"a": 1})}, "cursor", id="cursor-object"),
    pytest.param({"cursor": cursor_of(["2026-11-26", "SM1"])}, "cursor", id="cursor-bad-time"),
    pytest.param({"cursor": cursor_of(["2026-11-26T19:00:00.000Z", "SM1"])}, "cursor",
                 id="cursor-with-a-sid-from-before-the-storage-order"),
    pytest.param({"cursor": cursor_of(["2026-11-26T19:00:00.000Z", 0])}, "cursor",
                 id="cursor-order-zero"),
    pytest.param({"cursor": cursor_of(["2026-11-26T19:00:00.000Z", -5])}, "cursor",
                 id="cursor-order-negative"),
    pytest.param({"cursor": cursor_of(["2026-11-26T19:00:00.000Z", 1.5])}, "cursor",
                 id="cursor-order-fraction"),
    pytest.param({"cursor": cursor_of(["2026-11-26T19:00:00.000Z", True])}, "cursor",
                 id="cursor-order-boolean"),
    pytest.param({"cursor": cursor_of(["2026-11-26T19:00:00.000Z", 2**63])}, "cursor",
                 id="cursor-order-too-large"),
    pytest.param({"cursor": cursor_of(["2026-11-26T19:00:00.000Z", "SM1", 3])}, "cursor",
                 id="cursor-three-items"),
    pytest.param({"cursor": base64.urlsafe_b64encode(b"[" * 5000).decode()}, "cursor",
                 id="cursor-deeply-nested"),
    pytest.param({"cursor": cursor_of(["2026-11-26T19:00:00.000Z", "\ud800"])}, "cursor",
                 id="cursor-lone-surrogate"),
    pytest.param({"limit": ["1", "2"]}, "limit", id="repeated-parameter"),
])
def test_messages_refuse_bad_parameters_naming_them(client, params, named):
    status, answer = get(client, "/messages", **params)
    assert status == 400
    assert set(answer) == {"error"} and f"'{named}'" in answer["error"]


def test_messages_need_the_api_key(client):
    response = client.get("/messages")
    assert response.status_code == 401 and response.headers["WWW-Authenticate"] == "Bearer"


def test_page_walk_never_repeats_or_skips_while_messages_arrive(client, store, send):
    # Pairs created at the same moment, so that page boundaries fall between equal times.
    existing = {store(1000 - n // 2) for n in range(40)}
    seen, pages, cursor = [], 0, None
    while True:
        params = {"limit": 7} | ({"cursor": cursor} if cursor else {})
        status, page = get(client, "/messages", **params)
        assert status == 200
        seen += sids(page)
        pages += 1
        cursor = page["nextCursor"]
        if cursor is None:
            break
        # Newer messages arrive between pages: two sent now, one stored a moment ago.
        assert send(to=f"+1555000{pages:04d}").status_code == 200
        assert send(to=f"+1555100{pages:04d}").status_code == 200
        store(-pages)
        assert pages < 20
    assert len(seen) == len(set(seen)), "a message appeared on two pages"
    assert existing <= set(seen), "a message that existed at the first page was skipped"
    assert pages == 6


# --- GET /stats ---------------------------------------------------------------------------

def test_stats_arithmetic_over_a_window(client, store):
    for delay in (2, 4, 6, 8, 10, 12, 14, 16, 18, 20):
        store(7200, ("sent", 1), ("delivered", delay))
    for _ in range(3):
        store(7000, ("sent", 1), ("undelivered", 30, 30007))
    store(6000, ("failed", 5, 30003))
    store(5000, ("sent", 1))                      # stuck: sent, unchanged for over an hour
    store(5000)                                   # stuck: queued since it was created
    store(2000, ("sent", 1500))                   # not stuck: changed 500 s ago
    store(3000, ("sent", 1), ("undelivered", 30, 99999))
    store(90000, ("sent", 1), ("delivered", 1))   # created before the window

    status, answer = get(client, "/stats", since="2026-11-26T17:00:00Z",
                         until="2026-11-26T20:00:00Z")
    assert status == 200
    assert answer == {
        "since": "2026-11-26T17:00:00.000Z",
        "until": "2026-11-26T20:00:00.000Z",
        "total": 18,
        "byStatus": {"delivered": 10, "undelivered": 4, "failed": 1, "sent": 2, "queued": 1},
        "deliveryRate": 0.6667,  # 10 of 15, to 4 places
        "errors": [
            {"code": 30007, "count": 3, "description": answer["errors"][0]["description"]},
            {"code": 30003, "count": 1, "description": answer["errors"][1]["description"]},
            {"code": 99999, "count": 1, "description": None},
        ],
        "timeToDeliveredSeconds": {"p50": 10, "p90": 18},
        "stuck": 2,
        "webhooks": {"pending": 0, "failed": 0},
        "inbound": {"received": 0, "optedOut": 0, "optedIn": 0},
    }
    assert answer["errors"][0]["description"].startswith("Carrier filtering")
    assert answer["errors"][1]["description"].startswith("Unreachable handset")


@pytest.mark.parametrize("delays, p50, p90", [
    pytest.param([7.5], 7.5, 7.5, id="one"),
    pytest.param([1, 2], 1, 2, id="two"),
    pytest.param([5, 1, 4, 2, 3], 3, 5, id="five-unordered"),
    pytest.param([0.25 * n for n in range(1, 21)], 2.5, 4.5, id="twenty"),
])
def test_stats_time_to_delivered_percentiles_by_nearest_rank(client, store, delays, p50, p90):
    for delay in delays:
        store(600, ("sent", 0.1), ("delivered", delay))
    store(600, ("sent", 0.1), ("failed", 0.2, 30008))
    answer = get(client, "/stats")[1]
    assert answer["timeToDeliveredSeconds"] == {"p50": p50, "p90": p90}


def test_stats_time_to_delivered_counts_a_late_delivered_event(client, store):
    # latestStatus stays failed (final statuses never replace each other), but the
    # delivered event exists, and its time is what the percentile measures.
    store(600, ("failed", 1, 30008), ("delivered", 9))
    answer = get(client, "/stats")[1]
    assert answer["byStatus"] == {"failed": 1}
    assert answer["timeToDeliveredSeconds"] == {"p50": 9, "p90": 9}


def test_stats_of_an_empty_window(client, store):
    store(90000, ("delivered", 1))
    assert get(client, "/stats")[1] == {
        "since": "2026-11-25T20:00:00.000Z", "until": "2026-11-26T20:00:00.000Z",
        "total": 0, "byStatus": {}, "deliveryRate": None, "errors": [],
        "timeToDeliveredSeconds": None, "stuck": 0, "webhooks": {"pending": 0, "failed": 0},
        "inbound": {"received": 0, "optedOut": 0, "optedIn": 0},
    }


def test_stats_delivery_rate_is_null_when_nothing_finished(client, store):
    store(600, ("sent", 1))
    store(600)
    answer = get(client, "/stats")[1]
    assert answer["total"] == 2 and answer["deliveryRate"] is None
    assert answer["timeToDeliveredSeconds"] is None


def test_stats_default_window_is_the_last_24_hours_of_the_clock(client, store, clock):
    store(24 * 3600 - 1, ("delivered", 1))
    store(24 * 3600, ("delivered", 1))      # exactly 24 h ago: since is inclusive
    store(24 * 3600 + 1, ("delivered", 1))  # older: outside
    answer = get(client, "/stats")[1]
    assert answer["since"] == "2026-11-25T20:00:00.000Z"
    assert answer["until"] == "2026-11-26T20:00:00.000Z"
    assert answer["total"] == 2
    clock["now"] = NOW + 1  # the window moves with the clock
    assert get(client, "/stats")[1]["total"] == 1


def test_stats_with_only_until_covers_the_24_hours_before_it(client, store):
    store(48 * 3600 - 10, ("delivered", 1))
    store(10, ("delivered", 1))
    answer = get(client, "/stats", until="2026-11-25T21:00:00+01:00")[1]
    assert answer["since"] == "2026-11-24T20:00:00.000Z" and answer["total"] == 1


def test_stats_stuck_means_not_final_and_unchanged_for_over_an_hour(client, store, clock):
    store(4000, ("sent", 399))      # last change 3601 s ago: stuck
    store(4000, ("sent", 400))      # exactly an hour ago: not more than an hour
    store(4000, ("sent", 401))      # 3599 s ago: not yet
    store(9000, ("delivered", 1))   # final: never stuck
    store(9000, ("undelivered", 1, 30003))
    assert get(client, "/stats")[1]["stuck"] == 1
    clock["now"] = NOW + 2
    assert get(client, "/stats")[1]["stuck"] == 3


@pytest.mark.parametrize("params, named", [
    pytest.param({"from": "2026-11-26T19:00:00Z"}, "from", id="unknown-parameter"),
    pytest.param({"since": "2026-11-26T19:00:00"}, "since", id="since-naive"),
    pytest.param({"until": "now"}, "until", id="until-text"),
    pytest.param({"since": "2026-11-26T19:00:00Z", "until": "2026-11-26T19:00:00Z"}, "since",
                 id="empty-window"),
    pytest.param({"since": ["2026-11-26T19:00:00Z"] * 2}, "since", id="repeated"),
])
def test_stats_refuse_bad_parameters_naming_them(client, params, named):
    status, answer = get(client, "/stats", **params)
    assert status == 400 and f"'{named}'" in answer["error"]


@pytest.mark.parametrize("params", [
    pytest.param({"since": "2026-08-28T19:59:59Z"}, id="since-until-now"),
    pytest.param({"since": "2000-01-01T00:00:00Z", "until": "2026-01-01T00:00:00Z"},
                 id="since-and-until"),
    pytest.param({"since": "0001-01-01T00:00:00Z", "until": "9999-12-31T00:00:00Z"},
                 id="all-time"),
])
def test_stats_refuse_a_window_longer_than_90_days(client, params):
    status, answer = get(client, "/stats", **params)
    assert status == 400
    assert "'since'" in answer["error"] and "'until'" in answer["error"]
    assert "90 days" in answer["error"]


def test_stats_take_a_window_of_exactly_90_days(client, store):
    store(90 * 24 * 3600, ("delivered", 1))
    status, answer = get(client, "/stats", since="2026-08-28T20:00:00Z")
    assert status == 200 and answer["total"] == 1


@pytest.mark.parametrize("params, parameter", [
    pytest.param({"from": "2026-11-26T19:00:00Z"}, "from", id="unknown-parameter"),
    pytest.param({"since": "2026-11-26T19:00:00"}, "since", id="since-naive"),
    pytest.param({"until": "now"}, "until", id="until-text"),
    pytest.param({"until": "0001-01-01T00:00:00+01:00"}, "until", id="until-before-year-1"),
    pytest.param({"since": "2026-11-26T20:00:00Z"}, "since", id="empty-window"),
    pytest.param({"since": "2026-08-28T19:59:59Z"}, "since", id="longer-than-90-days"),
])
def test_stats_window_raises_bad_query_naming_the_parameter(params, parameter):
    with pytest.raises(listing.BadQuery) as refused:
        listing.stats_window(MultiDict(params), NOW)
    assert refused.value.parameter == parameter
    assert str(refused.value) == refused.value.message


def test_stats_window_defaults_to_the_24_hours_up_to_now():
    assert listing.stats_window(MultiDict(), NOW) == ("2026-11-25T20:00:00.000Z",
                                                      "2026-11-26T20:00:00.000Z")
    assert listing.stats_window(MultiDict({"until": "2026-11-26T12:00:00+01:00"}), NOW) == (
        "2026-11-25T11:00:00.000Z", "2026-11-26T11:00:00.000Z")


def test_delivery_stats_of_a_parsed_window_is_what_stats_answers(app, client, store):
    store(7200, ("sent", 1), ("delivered", 10))
    store(5000, ("sent", 1))  # stuck
    store(90000, ("delivered", 1))  # before the window
    status, answer = get(client, "/stats", since="2026-11-26T18:00:00+01:00",
                         until="2026-11-26T20:00:00Z")
    with app.app_context():
        direct = listing.delivery_stats(get_db(), "2026-11-26T17:00:00.000Z",
                                        "2026-11-26T20:00:00.000Z", NOW)
    assert status == 200 and answer == direct
    assert (direct["total"], direct["stuck"]) == (2, 1)


@pytest.mark.parametrize("module", [listing, overview])
def test_the_query_layer_imports_no_web_framework(module):
    """Its refusals are BadQuery, which the web room answers: it never speaks HTTP itself."""
    imported = set()
    for node in ast.walk(ast.parse(inspect.getsource(module))):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"flask", "werkzeug"}


def test_a_read_past_its_time_limit_answers_503_saying_what_to_do(make_app, database_url):
    client = make_app(storage_settings={"read_timeout": 0.001}).test_client()
    fill_messages(database_url, 50_000, first="2026-10-01T00:00:00Z", every=60)
    response = client.get("/stats", query_string={"since": "2026-10-01T00:00:00Z"},
                          headers=AUTH)
    assert response.status_code == 503 and response.headers["Retry-After"]
    error = response.get_json()["error"]
    assert "nothing was changed" in error and "shorter window" in error
    assert "stored" not in error


@pytest.mark.parametrize("per_minute", [
    pytest.param(1, id="quiet"),
    pytest.param(23, id="a-million-a-month"),
    pytest.param(20_000, id="a-burst"),
])
def test_a_window_is_read_in_contiguous_stretches_of_bounded_rows(per_minute):
    """Each statement of a window's counts reads a bounded number of rows, whatever the
    window's density, and the stretches cover the window exactly once."""
    since, until = "2026-10-01T00:00:00.000Z", "2026-10-31T00:00:00.123Z"
    stretches, covered = reads.Stretches(SQLiteEngine("unused.db"), since, until), []
    wanted = SQLiteEngine.features.rows_per_window_statement
    for start, stop in stretches:
        rows = (times.milliseconds_of(stop) - times.milliseconds_of(start)) * per_minute // 60_000
        assert rows <= 2 * wanted, (start, stop, rows)
        stretches.counted(rows)
        covered.append((start, stop))
    assert covered[0][0] == since and covered[-1][1] == until
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in itertools.pairwise(covered))
    assert len(covered) < 60 + 30 * 24 * 60 * per_minute // wanted


def test_stats_read_a_window_in_short_statements_and_count_it_whole(make_app, database_url):
    """A month of 45,000 messages is counted whole, on SQLite in stretches, each its own
    statement (seen on this thread's connection)."""
    app = make_app()
    fill_messages(database_url, 45_000, first="2026-10-01T00:00:00Z", every=57)
    storage, statements = services(app).storage, []
    if storage.name == "sqlite":
        storage.connection().set_trace_callback(statements.append)
    status, answer = get(app.test_client(), "/stats", since="2026-10-01T00:00:00Z",
                         until="2026-10-31T00:00:00Z")
    assert status == 200 and answer["total"] == 45_000
    whole = {row["latest_status"]: row["n"] for row in storage.query(
        "SELECT latest_status, count(*) AS n FROM messages GROUP BY latest_status")}
    assert answer["byStatus"] == whole
    errors = storage.query("SELECT count(*) AS n FROM messages WHERE error_code IS NOT NULL")
    assert sum(error["count"] for error in answer["errors"]) == errors[0]["n"]
    assert answer["timeToDeliveredSeconds"] is not None
    if storage.name == "sqlite":
        storage.connection().set_trace_callback(None)
        windows = [sql for sql in statements if "seconds_to_delivered AS value" in sql]
        assert len(windows) > 3  # the time to delivery read in stretches, not in one


def test_stats_need_the_api_key(client):
    assert client.get("/stats").status_code == 401


def test_stats_count_messages_sent_through_the_service(client, send, post_callback, clock):
    clock["now"] = datetime.now(timezone.utc).timestamp()
    sid = send().get_json()["messageSid"]
    post_callback(callback(sid, "sent"))
    post_callback(callback(sid, "delivered"))
    answer = get(client, "/stats")[1]
    assert answer["total"] == 1 and answer["byStatus"] == {"delivered": 1}
    assert answer["deliveryRate"] == 1


def test_time_to_delivered_counts_from_the_send_even_when_callbacks_came_first(
        client, fake_twilio, post_callback, clock):
    """Twilio may call back before the create call returns: the message is then first
    stored at the callback's time, and the send moves its creation back to its start, to
    the millisecond on the service's clock (Twilio's date_created has whole seconds)."""
    started = math.floor(time.time()) - 42 + 0.789  # a send that started 42 s ago
    sid = "SM" + "d4" * 16
    assert post_callback(callback(sid, "delivered")).status_code == 200
    fake_twilio.answer_next(Response(201, json.dumps({
        "sid": sid, "status": "queued", "to": "+15558675309", "from": "+15551234567",
        "account_sid": "AC" + "a1" * 16,
        "date_created": datetime.fromtimestamp(started, timezone.utc).strftime(
            "%a, %d %b %Y %H:%M:%S +0000")})))
    clock["now"] = started
    assert client.post("/send-sms", json={"to": "+15558675309", "body": "hi"},
                       headers=AUTH).status_code == 200
    history = client.get(f"/get-status/{sid}", headers=AUTH).get_json()
    assert history["createdAt"] == times.stored_time(started)
    delivered_at = next(e["timestamp"] for e in history["history"] if e["status"] == "delivered")
    expected = round((datetime.fromisoformat(delivered_at) - datetime.fromisoformat(
        history["createdAt"])).total_seconds(), 3)
    assert expected > 40
    clock["now"] = time.time()
    answer = get(client, "/stats")[1]
    assert answer["timeToDeliveredSeconds"] == {"p50": expected, "p90": expected}


# --- the queries use the indexes ----------------------------------------------------------

@pytest.mark.parametrize("path, params", [
    pytest.param("/messages", {}, id="first-page"),
    pytest.param("/messages", {"cursor": cursor_of(["2026-11-26T19:00:00.000Z", 5])},
                 id="deep-page"),
    pytest.param("/messages", {"to": "+15558675309"}, id="to"),
    pytest.param("/messages", {"status": "failed,undelivered"}, id="status"),
    pytest.param("/messages", {"errorCode": "30007"}, id="error-code"),
    pytest.param("/messages", {"since": "2026-11-26T19:00:00Z"}, id="since"),
    pytest.param("/messages", {"reference": "order-1"}, id="reference"),
    pytest.param("/stats", {}, id="stats"),
    pytest.param("/webhook-events", {}, id="events"),
    pytest.param("/webhook-events", {"state": "failed"}, id="events-state"),
    pytest.param("/webhook-events", {"sid": "SM" + "0" * 32}, id="events-sid"),
    pytest.param("/opt-outs", {}, id="opt-outs"),
    pytest.param("/opt-outs", {"since": "2026-11-26T19:00:00Z"}, id="opt-outs-since"),
    pytest.param("/opt-outs/%2B15558675309", {}, id="opt-out"),
    pytest.param("/inbound-messages", {}, id="inbound"),
    pytest.param("/inbound-messages", {"from": "+15558675309"}, id="inbound-from"),
    pytest.param("/inbound-messages", {"to": "+15558675309"}, id="inbound-to"),
])
@sqlite_only
def test_queries_read_through_indexes_without_sorting(app, client, store, monkeypatch, path,
                                                      params):
    store(60, ("delivered", 1))
    client.put("/opt-outs/%2B15558675309", headers=AUTH)
    seen = []
    # SQLite reports every statement its connection runs, values in place: the test client
    # serves the request in this thread, on this thread's connection.
    connection = services(app).storage.connection()
    connection.set_trace_callback(seen.append)
    try:
        assert get(client, path, **params)[0] == 200
    finally:
        connection.set_trace_callback(None)
    seen = [sql for sql in seen if sql.lstrip().upper().startswith(("SELECT", "WITH"))]
    assert seen
    with app.app_context():
        for sql in seen:
            plan = [row["detail"] for row in get_db().query("EXPLAIN QUERY PLAN " + sql)]
            tables = [line for line in plan
                      if re.search(r"\b(messages|status_events|webhook_events|inbound_messages"
                                   r"|opt_outs|opt_out_changes)\b", line)]
            assert tables and all("USING" in line and "INDEX" in line for line in tables), plan
            if path in ("/messages", "/webhook-events", "/opt-outs", "/inbound-messages"):
                assert not any("TEMP B-TREE" in line for line in plan), plan
            if "state" in params:  # the partial index of that state's events alone
                assert plan[0].startswith(f"SCAN webhook_events USING INDEX webhook_events_"
                                          f"{params['state']}"), plan
            elif params:  # a filter or a cursor seeks into the index instead of scanning it
                assert plan[0].startswith("SEARCH"), plan


@sqlite_only
def test_a_claim_of_webhook_events_seeks_each_message_and_stops_at_its_limit(app):
    """Claiming status webhook events looks each candidate's earlier events up by its
    stream (its message's SID), and walks the pending events oldest first without sorting
    them all.
    Without statistics, SQLite once looked them up through the state index instead: every
    pending event walked for each candidate, and a backlog of 4,000 took 8 s a claim."""
    with app.app_context():
        storage = get_db()
        storage.records_events = True
        for n in range(20):
            for status in ("queued", "sent"):
                statuses.record_status(storage, f"SM{n:032x}", status)
        connection = services(app).storage.connection()
        seen = []
        connection.set_trace_callback(seen.append)
        try:
            claimed = outbox.claim_webhook_events(storage, "lease", time.time(), 20, 16)
        finally:
            connection.set_trace_callback(None)
        claim = next(sql for sql in seen if sql.lstrip().startswith("UPDATE webhook_events"))
        plan = [row["detail"] for row in storage.query("EXPLAIN QUERY PLAN " + claim)]
    assert "SEARCH o USING INDEX webhook_events_pending_of_stream (stream=?)" in plan, plan
    assert not any("TEMP B-TREE" in line for line in plan), plan
    # The oldest 16 messages' first events: a message's later event waits for its first.
    assert [event["message_sid"] for event in claimed] == [f"SM{n:032x}" for n in range(16)]
    assert all(json.loads(event["payload"])["type"] == "message.queued" for event in claimed)


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_a_claim_on_a_fresh_postgres_database_walks_the_due_events_in_order(app):
    """On a database without planner statistics (new, or not analysed since a burst) a
    claim over 10,000 pending events compared each candidate with every pending event:
    seconds a claim, and lock timeouts for the other instances waiting on it. Its plan must
    walk the index of due events in order and look up each candidate's message's own
    pending events, whatever the statistics say."""
    url = app_database_url(app)
    sql_rows(url, "ALTER TABLE webhook_events SET (autovacuum_enabled = false)")
    sql_rows(url, "INSERT INTO messages (sid, to_number, from_number, latest_status,"
                  " created_at, updated_at) SELECT 'SM' || lpad(to_hex(n), 32, '0'),"
                  " '+15550000000', '+15550000001', 'sent', '2026-01-01T00:00:00.000Z',"
                  " '2026-01-01T00:00:00.000Z' FROM generate_series(0, 2999) AS n")
    sql_rows(url, "INSERT INTO webhook_events (id, message_sid, stream, type, payload, state,"
                  " created_at, next_attempt_at) SELECT 'evt_' || n,"
                  " 'SM' || lpad(to_hex(mod(n, 3000)), 32, '0'),"
                  " 'SM' || lpad(to_hex(mod(n, 3000)), 32, '0'), 'message.sent', '{}', 'pending',"
                  " '2026-01-01T00:00:00.000Z', '2026-01-01T00:00:00.000Z'"
                  " FROM generate_series(1, 10000) AS n")
    assert sql_rows(url, "SELECT last_analyze, last_autoanalyze FROM pg_stat_user_tables"
                         " WHERE relname = 'webhook_events'") in ([], [(None, None)])

    now = time.time()
    storage = services(app).storage
    sql, params = outbox.claim_statement(storage, "lease", now, 60, 16)
    with app.app_context(), storage.transaction() as tx:
        tx.plan_by_index()
        plan = "\n".join(row["QUERY PLAN"] for row in tx.execute("EXPLAIN " + sql, params))
    assert "Index Scan using webhook_events_due on webhook_events e" in plan, plan
    assert "Index Scan using webhook_events_pending_of_stream on webhook_events o" in plan, plan
    assert not any(step in plan for step in ("Sort", "Bitmap", "Seq Scan", "Materialize")), plan

    # The claim itself (the same statement and settings): 8.5 to 19 s before, under 1 ms after.
    started = time.monotonic()
    with app.app_context():
        claimed = outbox.claim_webhook_events(get_db(), "lease", now, 60, 16)
    assert len(claimed) == 16
    assert time.monotonic() - started < 1.0


def test_timestamps_are_stored_in_the_format_the_queries_compare(app, store):
    sid = store(60)
    with app.app_context():
        row = get_db().query("SELECT created_at FROM messages WHERE sid = ?", (sid,))[0]
    assert times.STORED_TIME.fullmatch(row["created_at"])
    assert times.stored_time_rounded_up(
        datetime.fromisoformat("2026-11-26T21:05:15.8961+01:00")) == "2026-11-26T20:05:15.897Z"
    assert times.stored_time_rounded_up(datetime(5, 1, 1, tzinfo=timezone.utc)
                                  + timedelta(microseconds=5)) == "0005-01-01T00:00:00.001Z"
