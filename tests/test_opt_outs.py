"""The opt-out list's API and the replies' listing, through the app on both engines:
GET/PUT/DELETE /opt-outs/<number>, GET /opt-outs and GET /inbound-messages, their paging
and their 400s."""

import threading

import psycopg
import pytest

from support import (
    AUTH,
    PERSON,
    WEBHOOK_SECRET,
    app_database_url,
    callback,
    inbound,
    post_inbound,
    recorded_events,
    refused_as_opted_out,
    reply,
    wait_until,
)

OTHER = "+15558675310"
PATH = "/opt-outs/%2B15558675309"


def state(client, path=PATH):
    answer = client.get(path, headers=AUTH)
    assert answer.status_code == 200, answer.get_json()
    return answer.get_json()


def test_a_number_never_recorded_is_a_404(client):
    answer = client.get(PATH, headers=AUTH)
    assert answer.status_code == 404
    assert "never recorded" in answer.get_json()["error"]


@pytest.mark.parametrize("path", ["/opt-outs/15558675309", "/opt-outs/%2B0123", "/opt-outs/abc",
                                  "/opt-outs/%2B1555867530912345"])
@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_a_number_that_is_not_e164_is_a_400(client, app, path, method):
    answer = client.open(path, method=method, headers=AUTH)
    assert answer.status_code == 400
    assert "E.164" in answer.get_json()["error"]


@pytest.mark.parametrize("method, path", [("GET", PATH), ("PUT", PATH), ("DELETE", PATH),
                                          ("GET", "/opt-outs"), ("GET", "/inbound-messages")])
def test_the_endpoints_need_the_api_key(client, method, path):
    answer = client.open(path, method=method)
    assert answer.status_code == 401
    assert client.open(path, method=method,
                       headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_a_stop_and_a_start_show_in_the_history_oldest_first(client):
    reply(client, "Stop")
    reply(client, "START")
    shown = state(client)
    assert shown["number"] == PERSON and shown["optedOut"] is False
    assert shown["optedOutAt"] is None and shown["source"] is None
    assert [(h["change"], h["source"], h["keyword"]) for h in shown["history"]] == [
        ("opted_out", "keyword", "STOP"), ("opted_in", "keyword", "START")]
    assert all(h["messageSid"].startswith("SM") for h in shown["history"])
    assert shown["history"][0]["at"] <= shown["history"][1]["at"]


def test_put_opts_out_once_and_delete_ends_it(client, send, fake_twilio):
    first = client.put(PATH, headers=AUTH)
    assert first.status_code == 201
    assert first.get_json()["optedOut"] is True and first.get_json()["source"] == "api"
    again = client.put(PATH, headers=AUTH)
    assert again.status_code == 200 and again.get_json() == first.get_json()
    assert refused_as_opted_out(send(PERSON))["optedOutAt"] == first.get_json()["optedOutAt"]
    ended = client.delete(PATH, headers=AUTH)
    assert ended.status_code == 200 and ended.get_json()["optedOut"] is False
    assert [(h["change"], h["source"]) for h in ended.get_json()["history"]] == [
        ("opted_out", "api"), ("opted_in", "api")]
    assert client.delete(PATH, headers=AUTH).status_code == 404
    assert send(PERSON).status_code == 200
    assert len(fake_twilio.creates) == 1


def test_put_leaves_a_persons_own_opt_out_as_it_is(client):
    reply(client, "STOP")
    answer = client.put(PATH, headers=AUTH)
    assert answer.status_code == 200 and answer.get_json()["source"] == "keyword"
    assert len(answer.get_json()["history"]) == 1


@pytest.mark.parametrize("how, source", [("keyword", "keyword"), ("callback", "twilio")])
def test_delete_of_a_persons_own_opt_out_is_a_409_saying_only_start_ends_it(
        client, post_callback, send, how, source):
    if how == "keyword":
        reply(client, "STOP")
    else:
        sid = send(PERSON).get_json()["messageSid"]
        post_callback(callback(sid, "undelivered", ErrorCode="21610"))
    answer = client.delete(PATH, headers=AUTH)
    assert answer.status_code == 409
    assert "START" in answer.get_json()["error"] and answer.get_json()["source"] == source
    assert state(client)["optedOut"] is True
    reply(client, "start")
    assert state(client)["optedOut"] is False


def test_a_start_ends_an_api_opt_out_too(client):
    client.put(PATH, headers=AUTH)
    reply(client, "UNSTOP")
    assert state(client)["optedOut"] is False


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_two_instances_ending_one_opt_out_at_once_record_one_opt_in(make_app, receiver):
    """Two DELETEs of one opt-out on two instances: only the number's lock makes the second
    wait for the first, then find the opt-out ended (404), rather than read it before the
    first ends it and end it again, with a second opt-in and event. Another connection
    holds the opt-out's row until both wait: the first, holding the number's lock, to
    delete it; the second for that lock (or, without it, to delete the row too).

    PostgreSQL only: on SQLite the lock is nothing, since BEGIN IMMEDIATE already runs
    every writer of the database one at a time."""
    instances = [make_app(STATUS_WEBHOOK_URL=receiver.url, STATUS_WEBHOOK_SECRET=WEBHOOK_SECRET,
                          storage_settings={"lock_timeout": 60}) for _ in range(2)]
    assert instances[0].test_client().put(PATH, headers=AUTH).status_code == 201
    statuses = []

    def end(instance):
        statuses.append(instance.test_client().delete(PATH, headers=AUTH).status_code)

    threads = [threading.Thread(target=end, args=(instance,)) for instance in instances]
    waiting = ("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
               " AND wait_event_type = 'Lock'")
    url = app_database_url(instances[0])
    with psycopg.connect(url) as gate, psycopg.connect(url, autocommit=True) as watch:
        gate.execute("SELECT 1 FROM opt_outs WHERE number = %s FOR UPDATE", (PERSON,))
        for count, thread in enumerate(threads, 1):
            thread.start()
            wait_until(lambda: watch.execute(waiting).fetchone()[0] >= count, 30,  # noqa: B023
                       f"{count} of the DELETEs waiting")
    for thread in threads:
        thread.join(60)
    assert sorted(statuses) == [200, 404]
    assert [(h["change"], h["source"]) for h in state(instances[0].test_client())["history"]] == [
        ("opted_out", "api"), ("opted_in", "api")]
    assert [kind for kind, _ in recorded_events(instances[0], PERSON)] == [
        "recipient.opted_out", "recipient.opted_in"]


def test_the_list_holds_the_numbers_opted_out_now_newest_first_in_pages(client):
    numbers = [f"+1555000{n:04d}" for n in range(7)]
    for number in numbers:
        assert client.put(f"/opt-outs/{number.replace('+', '%2B')}", headers=AUTH).status_code \
            == 201
    reply(client, "STOP", from_=numbers[2])  # already opted out: nothing changes
    client.delete(f"/opt-outs/{numbers[3].replace('+', '%2B')}", headers=AUTH)
    listed, cursor = [], None
    while True:
        page = client.get("/opt-outs", query_string={"limit": 2, **(
            {"cursor": cursor} if cursor else {})}, headers=AUTH).get_json()
        assert len(page["optOuts"]) <= 2
        listed += page["optOuts"]
        cursor = page["nextCursor"]
        if cursor is None:
            break
    expected = [number for number in reversed(numbers) if number != numbers[3]]
    assert [item["number"] for item in listed] == expected
    assert {item["source"] for item in listed} == {"api"}
    times = [item["optedOutAt"] for item in listed]
    assert times == sorted(times, reverse=True)
    window = client.get("/opt-outs", query_string={"since": times[2], "until": times[0]},
                        headers=AUTH).get_json()["optOuts"]
    assert all(times[2] <= item["optedOutAt"] < times[0] for item in window)


@pytest.mark.parametrize("path", ["/opt-outs", "/inbound-messages"])
@pytest.mark.parametrize("params, named", [
    ({"limit": "0"}, "limit"), ({"limit": "201"}, "limit"), ({"since": "yesterday"}, "since"),
    ({"until": "2026-01-01T00:00:00"}, "until"), ({"cursor": "nope"}, "cursor"),
    ({"since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z"}, "since"),
    ({"color": "red"}, "color"),
])
def test_bad_listing_parameters_are_a_400_naming_them(client, path, params, named):
    answer = client.get(path, query_string=params, headers=AUTH)
    assert answer.status_code == 400
    assert f"'{named}'" in answer.get_json()["error"]


@pytest.mark.parametrize("params, named", [({"from": "15558675309"}, "from"),
                                           ({"to": "+0"}, "to")])
def test_bad_numbers_of_the_inbound_listing_are_a_400_naming_them(client, params, named):
    answer = client.get("/inbound-messages", query_string=params, headers=AUTH)
    assert answer.status_code == 400 and f"'{named}'" in answer.get_json()["error"]


def test_inbound_messages_are_listed_newest_first_filtered_and_paged(client):
    sent = []
    for n in range(5):
        params = inbound(f"reply {n}", from_=PERSON if n % 2 == 0 else OTHER,
                         NumMedia=str(n))
        post_inbound(client, params)
        sent.append(params)
    listed, cursor = [], None
    while True:
        page = client.get("/inbound-messages", query_string={"limit": 2, **(
            {"cursor": cursor} if cursor else {})}, headers=AUTH).get_json()
        listed += page["messages"]
        cursor = page["nextCursor"]
        if cursor is None:
            break
    assert [item["sid"] for item in listed] == [p["MessageSid"] for p in reversed(sent)]
    assert listed[0] == {"sid": sent[4]["MessageSid"], "from": PERSON, "to": "+15017122661",
                         "body": None, "numMedia": 4, "optOutType": None,
                         "receivedAt": listed[0]["receivedAt"]}
    mine = client.get("/inbound-messages", query_string={"from": PERSON},
                      headers=AUTH).get_json()["messages"]
    assert [item["sid"] for item in mine] == [sent[n]["MessageSid"] for n in (4, 2, 0)]
    assert client.get("/inbound-messages", query_string={"to": OTHER},
                      headers=AUTH).get_json()["messages"] == []


def test_a_kept_body_is_listed_and_the_opt_out_type_shown(make_app):
    client = make_app(STORE_MESSAGE_BODY="true").test_client()
    reply(client, "stop")
    reply(client, "HELP me", OptOutType="HELP")
    listed = client.get("/inbound-messages", headers=AUTH).get_json()["messages"]
    assert [(item["body"], item["optOutType"]) for item in listed] == [
        ("HELP me", "HELP"), ("stop", "STOP")]


def test_stats_count_the_windows_replies_opt_outs_and_opt_ins(client):
    reply(client, "STOP")
    reply(client, "hello")
    reply(client, "START")
    client.put("/opt-outs/%2B15558675310", headers=AUTH)
    stats = client.get("/stats", headers=AUTH).get_json()
    assert stats["inbound"] == {"received": 3, "optedOut": 2, "optedIn": 1}
    before = client.get("/stats", query_string={"until": "2026-01-01T00:00:00Z"},
                        headers=AUTH).get_json()
    assert before["inbound"] == {"received": 0, "optedOut": 0, "optedIn": 0}
