import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
import requests
from twilio.http.response import Response

from sms_status import create_app
from sms_status.services import get_db, services
from sms_status.storage import open_engine, statuses, times
from support import (
    AUTH,
    CALLBACK_URL,
    ROOT,
    WEBHOOK_SECRET,
    CallbackLoad,
    app_database_url,
    callback,
    count_rows,
    count_rows_at,
    free_port,
    live_env,
    refused_as_opted_out,
    reply,
    sign,
    sql_rows,
    sqlite_only,
    stored_message,
)
from twilio_fakes import twilio_error

FETCH_ANSWER = ('{"sid": "%s", "status": "%s", "error_code": %s,'
                ' "date_created": "Thu, 26 Nov 2026 20:00:00 +0000"}')


def fetched(sid, status, error_code="null"):
    return Response(200, FETCH_ANSWER % (sid, status, error_code))


@pytest.fixture
def sleeps(app):
    recorded = []
    app.config["SLEEP"] = recorded.append
    return recorded


def run(app, *args):
    return app.test_cli_runner().invoke(args=list(args))


def sent_messages(send, count):
    return [send().get_json()["messageSid"] for _ in range(count)]


def latest(client, sid):
    return client.get(f"/get-status/{sid}", headers=AUTH).get_json()


def test_reconcile_records_what_twilio_says_through_the_forward_only_rules(
        app, client, send, fake_twilio, post_callback):
    delivered, undelivered, stuck = sent_messages(send, 3)
    post_callback(callback(stuck, "sent"))
    fake_twilio.answer_next(fetched(delivered, "delivered"),
                            fetched(undelivered, "undelivered", "30003"),
                            fetched(stuck, "queued"))
    result = run(app, "reconcile", "--older-than", "0s")
    assert result.exit_code == 0, result.output
    assert f"{delivered} queued -> delivered" in result.output
    assert f"{undelivered} queued -> undelivered (Twilio: undelivered, error 30003)" \
        in result.output
    assert "Checked 3 messages: 2 updated, 1 unchanged, 0 not found at Twilio, 0 failed." \
        in result.output
    fetches = [r["uri"] for r in fake_twilio.requests if r["method"] == "GET"]
    assert [uri.rsplit("/", 1)[1] for uri in fetches] == [
        f"{delivered}.json", f"{undelivered}.json", f"{stuck}.json"]
    assert latest(client, undelivered)["errorCode"] == 30003
    assert latest(client, stuck)["latestStatus"] == "sent", "a fetched 'queued' never moves back"

    post_callback(callback(delivered, "delivered"))
    assert [e["status"] for e in latest(client, delivered)["history"]] == ["queued", "delivered"]


def test_reconcile_skips_final_and_recent_messages_and_respects_limit(
        app, send, fake_twilio, post_callback):
    final, recent_a, recent_b = sent_messages(send, 3)
    post_callback(callback(final, "delivered"))
    result = run(app, "reconcile")  # default --older-than 10m: all are recent
    assert "Checked 0 messages" in result.output
    fake_twilio.answer_next(fetched(recent_a, "delivered"))
    result = run(app, "reconcile", "--older-than", "0s", "--limit", "1")
    assert "Checked 1 message: 1 updated" in result.output
    assert final not in result.output


def test_one_failed_fetch_does_not_stop_the_run(app, send, fake_twilio):
    first, second = sent_messages(send, 2)
    fake_twilio.answer_next(twilio_error(500, 20500, "Internal"), fetched(second, "delivered"))
    result = run(app, "reconcile", "--older-than", "0s")
    assert result.exit_code == 0
    assert f"{first} queued: fetch failed: Twilio failed to process the request (error 20500)" \
        in result.output
    assert "The message's status was not read; the next run asks again." in result.output
    assert "may or may not have been sent" not in result.output
    assert "1 updated, 0 unchanged, 0 not found at Twilio, 1 failed" in result.output


def test_a_message_twilio_does_not_have_is_reported_and_not_asked_for_again(app, send,
                                                                           fake_twilio):
    missing, other = sent_messages(send, 2)
    fake_twilio.answer_next(twilio_error(404, 20404, "not found"), fetched(other, "queued"))
    result = run(app, "reconcile", "--older-than", "0s")
    assert result.exit_code == 0, result.output
    assert f"{missing} queued: unknown at Twilio (error 20404): This account has no message" \
        in result.output
    assert "credentials" not in result.output
    assert "0 updated, 1 unchanged, 1 not found at Twilio, 0 failed" in result.output
    time.sleep(0.002)
    fake_twilio.answer_next(fetched(other, "queued"))
    result = run(app, "reconcile", "--older-than", "0s")
    assert "Checked 1 message:" in result.output and missing not in result.output
    fetched_sids = [r["uri"] for r in fake_twilio.requests if r["method"] == "GET"]
    assert sum(missing in uri for uri in fetched_sids) == 1


def test_a_run_that_could_check_nothing_exits_non_zero(app, send, fake_twilio):
    sent_messages(send, 2)
    fake_twilio.answer_next(requests.ConnectionError("refused"), twilio_error(401, 20003))
    result = run(app, "reconcile", "--older-than", "0s")
    assert result.exit_code == 1
    assert "0 updated, 0 unchanged, 0 not found at Twilio, 2 failed" in result.output
    assert "no message could be checked with Twilio" in result.output
    assert run(app, "reconcile", "--older-than", "1h").exit_code == 0, "nothing to check is fine"


def test_reconcile_backs_off_on_429(app, send, fake_twilio, sleeps):
    [sid] = sent_messages(send, 1)
    fake_twilio.answer_next(twilio_error(429, 20429), twilio_error(429, 20429),
                            fetched(sid, "delivered"))
    result = run(app, "reconcile", "--older-than", "0s")
    assert sleeps == [1.0, 2.0]
    assert "1 updated" in result.output


def test_reconcile_stops_when_twilio_keeps_rate_limiting(app, send, fake_twilio, sleeps):
    sent_messages(send, 2)
    fake_twilio.answer_next(*[twilio_error(429, 20429)] * 4)
    result = run(app, "reconcile", "--older-than", "0s")
    assert result.exit_code == 1
    assert sleeps == [1.0, 2.0, 4.0]
    assert "the rest waits for the next run" in result.output
    assert "0 updated, 0 unchanged, 0 not found at Twilio, 1 failed" in result.output


def test_stuck_messages_take_turns(app, send, fake_twilio):
    first, second = sent_messages(send, 2)
    fake_twilio.answer_next(fetched(first, "queued"))
    assert first in run(app, "reconcile", "--older-than", "0s", "--limit", "1").output
    time.sleep(0.002)
    fake_twilio.answer_next(fetched(second, "queued"))
    assert second in run(app, "reconcile", "--older-than", "0s", "--limit", "1").output


@pytest.mark.parametrize("command", [
    ["reconcile", "--older-than", "10"],
    ["reconcile", "--older-than", "ten minutes"],
    ["prune", "--older-than", "90 days"],
    ["prune"],
])
def test_malformed_durations_are_refused(app, command):
    result = run(app, *command)
    assert result.exit_code != 0
    assert "<number><s|m|h|d>" in result.output or "Missing option" in result.output


def test_prune_deletes_old_messages_and_history(make_app, fake_twilio, post_callback):
    app = make_app()
    client = app.test_client()
    old = client.post("/send-sms", json={"to": "+15558675309", "body": "hi"},
                      headers=AUTH).get_json()["messageSid"]
    post_callback(callback(old, "delivered"))
    result = run(app, "prune", "--older-than", "90d")
    assert "Removed 0 messages and 0 status events" in result.output
    result = run(app, "prune", "--older-than", "0s")
    assert result.exit_code == 0
    assert "Removed 1 message and 2 status events not updated for 0s" in result.output
    assert client.get(f"/get-status/{old}", headers=AUTH).status_code == 404


def test_prune_removes_old_inbound_messages_but_never_opt_outs_and_says_so(make_app,
                                                                         database_url):
    app = make_app(STORE_MESSAGE_BODY="true", BODY_RETENTION="1h",
                   STATUS_WEBHOOK_URL="http://127.0.0.1:9/events",
                   STATUS_WEBHOOK_SECRET=WEBHOOK_SECRET)
    client = app.test_client()
    reply(client, "STOP")
    reply(client, "see you", from_="+15558675310")
    client.put("/opt-outs/%2B15558675311", headers=AUTH)
    sql_rows(database_url, "UPDATE webhook_events SET state = 'delivered',"
                           " created_at = '2026-01-01T00:00:00.000Z'")
    reply(client, "pending event kept", from_="+15558675312")
    sql_rows(database_url, "UPDATE inbound_messages SET received_at = '2026-01-01T00:00:00.000Z'"
                           " WHERE from_number = '+15558675309'")
    now = time.time()
    app.config["CLOCK"] = lambda: now + 2 * 3600
    dry = run(app, "prune", "--older-than", "3h", "--dry-run")
    assert dry.output.splitlines()[2] == (
        "Would remove 1 inbound message received over 3h ago; would clear 2 inbound bodies "
        "older than BODY_RETENTION. Opt-outs are never pruned: 2 numbers stay opted out, "
        "every change kept.")
    pruned = run(app, "prune", "--older-than", "3h")
    assert pruned.output.splitlines()[2] == (
        "Removed 1 inbound message received over 3h ago; cleared 2 inbound bodies older than "
        "BODY_RETENTION. Opt-outs are never pruned: 2 numbers stay opted out, every change "
        "kept.")
    assert sorted(sql_rows(database_url, "SELECT from_number, body FROM inbound_messages")) \
        == [("+15558675310", None), ("+15558675312", None)]
    assert count_rows(app, "opt_outs") == 2 and count_rows(app, "opt_out_changes") == 2
    refused_as_opted_out(client.post("/send-sms", json={"to": "+15558675309", "body": "hi"},
                                     headers=AUTH))
    # The settled events of numbers go with the replies; a pending one stays.
    assert sql_rows(database_url, "SELECT type, state FROM webhook_events") == [
        ("inbound.received", "pending")]


def test_prune_keeps_messages_with_pending_webhook_events_and_says_so(
        make_app, database_url):
    """Events recorded while status webhooks were on stay pending after they are turned off:
    prune keeps their messages and says why, a dry run changes nothing, and
    --drop-pending-webhooks removes them."""
    with_webhooks = make_app(STATUS_WEBHOOK_URL="http://127.0.0.1:9/events",
                             STATUS_WEBHOOK_SECRET=WEBHOOK_SECRET)
    client = with_webhooks.test_client()
    delivered, pending = (client.post("/send-sms", json={"to": "+15558675309", "body": "hi"},
                                      headers=AUTH).get_json()["messageSid"] for _ in range(2))
    params = callback(pending, "delivered")
    client.post("/message-status", data=params,
                headers={"X-Twilio-Signature": sign(CALLBACK_URL, params)})
    sql_rows(database_url, "UPDATE webhook_events SET state = 'delivered' WHERE message_sid = ?",
             (delivered,))
    time.sleep(0.01)
    app = make_app()  # status webhooks off
    everything = {table: count_rows(app, table)
                  for table in ("messages", "status_events", "webhook_events")}

    dry = run(app, "prune", "--older-than", "0s", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert dry.output.splitlines()[1:] == [
        "Dry run, nothing changed. Would remove 1 message and 1 status event not updated for "
        "0s; would clear 0 message bodies older than BODY_RETENTION.",
        "Would remove 0 inbound messages received over 0s ago; would clear 0 inbound bodies "
        "older than BODY_RETENTION. Opt-outs are never pruned: 0 numbers stay opted out, "
        "every change kept.",
        "Would keep 1 message not updated for 0s for their 2 status webhook events still "
        "pending: a service running with status webhooks on delivers them (while webhooks "
        "are off they wait). If status webhooks are off for good, prune --older-than 0s "
        "--drop-pending-webhooks removes them too."]
    assert {table: count_rows(app, table) for table in everything} == everything

    pruned = run(app, "prune", "--older-than", "0s")
    assert pruned.exit_code == 0, pruned.output
    assert pruned.output.splitlines()[1:] == [
        line.replace("Dry run, nothing changed. Would remove", "Removed")
            .replace("Would remove", "Removed")
            .replace("would clear", "cleared").replace("Would keep", "Kept")
        for line in dry.output.splitlines()[1:]]
    assert latest(client, pending)["latestStatus"] == "delivered"
    assert client.get(f"/get-status/{delivered}", headers=AUTH).status_code == 404

    dropping = run(app, "prune", "--older-than", "0s", "--drop-pending-webhooks", "--dry-run")
    assert "Would remove 1 message and 2 status events" in dropping.output
    assert "Would drop 2 pending status webhook events with them" in dropping.output
    assert "Would keep" not in dropping.output and count_rows(app, "messages") == 1
    dropped = run(app, "prune", "--older-than", "0s", "--drop-pending-webhooks")
    assert dropped.exit_code == 0, dropped.output
    assert "Removed 1 message and 2 status events" in dropped.output
    assert "Dropped 2 pending status webhook events with them" in dropped.output
    assert count_rows(app, "messages") == count_rows(app, "webhook_events") == 0


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_dry_run_counts_what_prune_then_does(make_app, database_url):
    app = make_app(STORE_MESSAGE_BODY="true", BODY_RETENTION="1h")
    fill_old_history(database_url, 1200)
    client = app.test_client()
    client.post("/send-sms", json={"to": "+15558675309", "body": "kept, cleared"},
                headers=AUTH)
    sql_rows(database_url, "UPDATE messages SET body = 'old' WHERE storage_order <= 3")
    app.config["CLOCK"] = lambda: time.time() + 3601
    dry = run(app, "prune", "--older-than", "2h", "--dry-run").output.splitlines()[1]
    done = run(app, "prune", "--older-than", "2h").output.splitlines()[1]
    assert dry == ("Dry run, nothing changed. Would remove 1200 messages and 1200 status "
                   "events not updated for 2h; would clear 1 message body older than "
                   "BODY_RETENTION.")
    assert done == ("Removed 1200 messages and 1200 status events not updated for 2h; "
                    "cleared 1 message body older than BODY_RETENTION.")


def test_prune_clears_bodies_after_body_retention(make_app, fake_twilio):
    app = make_app(STORE_MESSAGE_BODY="true", BODY_RETENTION="1h")
    client = app.test_client()
    sid = client.post("/send-sms", json={"to": "+15558675309", "body": "code 5521"},
                      headers=AUTH).get_json()["messageSid"]
    body = lambda: stored_message(app, sid)["body"]  # noqa: E731
    assert "cleared 0 message bodies" in run(app, "prune", "--older-than", "90d").output
    assert body() == "code 5521"
    app.config["CLOCK"] = lambda: time.time() + 3601
    assert "cleared 1 message body " in run(app, "prune", "--older-than", "90d").output
    assert body() is None
    assert client.get(f"/get-status/{sid}", headers=AUTH).status_code == 200


def test_body_retention_is_checked_at_start(make_app):
    from sms_status.config import ConfigError
    with pytest.raises(ConfigError, match="BODY_RETENTION"):
        make_app(BODY_RETENTION="a week")


def test_reconcile_command_in_simulation_settles_lost_callbacks(service_env, start_service,
                                                                 tmp_path):
    """Callbacks go to a port nobody listens on, so they are lost; reconciliation repairs it."""
    from support import free_port
    env = service_env(BASE_URL=f"http://127.0.0.1:{free_port()}")
    service = start_service(env)
    sids = {}
    for to in ("+15558675309", "+15005551003"):
        answer = requests.post(f"{service.url}/send-sms", json={"to": to, "body": "hi"},
                               timeout=10)
        sids[to] = answer.json()["messageSid"]
    time.sleep(1)
    flask = str(Path(sys.executable).parent / "flask")
    result = subprocess.run([flask, "--app", "app", "reconcile", "--older-than", "0s"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"{sids['+15558675309']} queued -> delivered" in result.stdout
    assert f"{sids['+15005551003']} queued -> undelivered" in result.stdout
    status = requests.get(f"{service.url}/get-status/{sids['+15005551003']}", timeout=5).json()
    assert status["latestStatus"] == "undelivered" and status["errorCode"] == 30003


def test_prune_command_refuses_a_malformed_duration_with_exit_code(service_env):
    flask = str(Path(sys.executable).parent / "flask")
    result = subprocess.run([flask, "--app", "app", "prune", "--older-than", "3 months"],
                            cwd=ROOT, env=service_env(), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0
    assert "<number><s|m|h|d>" in result.stderr and "Traceback" not in result.stderr


@pytest.fixture
def old_history(make_app, tmp_path, post_callback):
    """A SQLite database with sent messages (with references), their callbacks, their
    status webhook events and a kept idempotency key."""
    url = f"sqlite:///{tmp_path}/old.db"
    old = make_app(DATABASE_URL=url, STATUS_WEBHOOK_URL="http://127.0.0.1:9/events",
                   STATUS_WEBHOOK_SECRET=WEBHOOK_SECRET)
    client = old.test_client()
    sids = [client.post("/send-sms", json={"to": "+15558675309", "body": f"alert {n}",
                                           "reference": f"order-{n}"},
                        headers=AUTH).get_json()["messageSid"] for n in range(3)]
    client.post("/send-sms", json={"to": "+15558675309", "body": "code 1"},
                headers={**AUTH, "Idempotency-Key": "k-1"})
    for sid in sids:
        for status in ("sent", "delivered"):
            params = callback(sid, status)
            client.post("/message-status", data=params,
                        headers={"X-Twilio-Signature": sign(CALLBACK_URL, params)})
    histories = {sid: latest(client, sid) for sid in sids}
    reply(client, "STOP", from_="+15558675310")
    reply(client, "running late")
    client.put("/opt-outs/%2B15558675311", headers=AUTH)
    # Delivered, as a running service would have done (pending ones would stop prune).
    sql_rows(url, "UPDATE webhook_events SET state = 'delivered', attempts = 1")
    return url, histories


def test_copy_database_copies_the_history_once(app, old_history):
    url, histories = old_history
    first = run(app, "copy-database", "--from", url)
    assert first.exit_code == 0, first.output
    assert ("Copied 4 messages, 10 status events, 14 webhook events, 2 inbound messages, "
            "2 opt-outs with 2 changes of their history, 1 idempotency key and 0 API keys from"
            ) in first.output
    client = app.test_client()
    for sid, history in histories.items():
        assert latest(client, sid) == history
    source_events = sql_rows(url, "SELECT id, message_sid, payload, state FROM webhook_events"
                                  " ORDER BY seq")
    assert sql_rows(app_database_url(app), "SELECT id, message_sid, payload, state"
                    " FROM webhook_events ORDER BY seq") == source_events
    replay = client.post("/send-sms", json={"to": "+15558675309", "body": "code 1"},
                         headers={**AUTH, "Idempotency-Key": "k-1"})
    assert replay.headers["Idempotent-Replayed"] == "true"
    for table, order in (("inbound_messages", "seq"), ("opt_outs", "seq"),
                         ("opt_out_changes", "id")):
        columns = "*" if table == "inbound_messages" else "number, source, keyword"
        assert sql_rows(app_database_url(app), f"SELECT {columns} FROM {table} ORDER BY"
                        f" {order}") == sql_rows(url, f"SELECT {columns} FROM {table}"
                                                      f" ORDER BY {order}"), table
    refused_as_opted_out(client.post("/send-sms", json={"to": "+15558675310", "body": "hi"},
                                     headers=AUTH))

    again = run(app, "copy-database", "--from", url)
    assert again.exit_code == 0, again.output
    assert ("Copied 0 messages, 0 status events, 0 webhook events, 0 inbound messages, "
            "0 opt-outs with 0 changes of their history, 0 idempotency keys and 0 API keys"
            in again.output)
    assert count_rows(app, "status_events") == 10


def test_copy_database_keeps_the_order_messages_were_stored_in(app, make_app, tmp_path):
    """Messages created in the same millisecond list newest-stored first, in the copy too."""
    url = f"sqlite:///{tmp_path}/old.db"
    old = make_app(DATABASE_URL=url)
    with old.app_context():
        for sid in ("SM3", "SM1", "SM2"):
            statuses.record_status(get_db(), sid, "queued", at="2026-11-26T20:00:00.000Z")

    def listed(service):
        answer = service.test_client().get("/messages", headers=AUTH).get_json()
        return [message["sid"] for message in answer["messages"]]

    assert listed(old) == ["SM2", "SM1", "SM3"]
    assert run(app, "copy-database", "--from", url).exit_code == 0
    assert listed(app) == ["SM2", "SM1", "SM3"]


def test_copy_database_copies_every_column_of_the_destination(app, make_app, tmp_path):
    """A column a later version adds to messages is copied with the rest, without a list of
    columns to keep up to date."""
    url = f"sqlite:///{tmp_path}/old.db"
    old = make_app(DATABASE_URL=url)
    with old.app_context():
        statuses.record_status(get_db(), "SM1", "queued", at="2026-11-26T20:00:00.000Z")
    for database in (url, app_database_url(app)):
        sql_rows(database, "ALTER TABLE messages ADD COLUMN carrier TEXT")
    sql_rows(url, "UPDATE messages SET carrier = 'acme' WHERE sid = 'SM1'")

    result = run(app, "copy-database", "--from", url)
    assert result.exit_code == 0, result.output
    assert sql_rows(app_database_url(app), "SELECT sid, carrier FROM messages") == [
        ("SM1", "acme")]


def test_copy_database_refuses_a_source_without_a_column_of_the_destination(
        app, make_app, tmp_path):
    url = f"sqlite:///{tmp_path}/old.db"
    old = make_app(DATABASE_URL=url)
    with old.app_context():
        statuses.record_status(get_db(), "SM1", "queued", at="2026-11-26T20:00:00.000Z")
    sql_rows(app_database_url(app), "ALTER TABLE messages ADD COLUMN carrier TEXT")

    result = run(app, "copy-database", "--from", url)
    assert result.exit_code == 1, result.output
    assert f"{tmp_path}/old.db has no column messages.carrier, which " in result.output
    assert "nothing was copied" in result.output and "Traceback" not in result.output
    assert count_rows(app, "messages") == 0


def test_copy_database_refuses_to_copy_a_database_onto_itself(app):
    config = app.config["SERVICE"]
    itself = config.database_url
    result = run(app, "copy-database", "--from", itself)
    assert result.exit_code != 0
    assert "onto itself" in result.output


@pytest.mark.parametrize("source, expected", [
    pytest.param("mysql://app:s3cret-pw@db/x", "--from", id="other-engine"),
    pytest.param("sqlite:////nowhere/old.db", "no database file", id="missing-file"),
])
def test_copy_database_refuses_a_bad_source_clearly(app, source, expected):
    result = run(app, "copy-database", "--from", source)
    assert result.exit_code != 0
    assert expected in result.output and "s3cret-pw" not in result.output
    assert "Traceback" not in result.output


def simulated_history(tmp_path):
    """A SQLite database the service used in simulation, holding one message."""
    url = f"sqlite:///{tmp_path}/simulated.db"
    simulated = create_app({"TWILIO_SIMULATE": "true", "DATABASE_URL": url})
    with simulated.app_context():
        statuses.record_status(get_db(), "SM" + "5" * 32, "delivered",
                               at="2026-11-26T20:00:00.000Z")
    services(simulated).storage.close()
    return url


def test_copy_database_refuses_simulated_messages_into_a_live_database(app, tmp_path):
    result = run(app, "copy-database", "--from", simulated_history(tmp_path))
    assert result.exit_code == 1
    assert (f"--from names {tmp_path}/simulated.db, a simulated database, and DATABASE_URL "
            "names ") in result.output
    assert ", a live database: simulated messages are never mixed with live ones, so " \
        "nothing was copied" in result.output
    assert count_rows(app, "messages") == 0


def test_copy_database_into_a_new_database_takes_the_mode_of_the_command(
        database_url, tmp_path):
    source = simulated_history(tmp_path)
    live = flask_command(tmp_path, {"DATABASE_URL": database_url}, "copy-database",
                         "--from", source)
    assert live.returncode == 1, live.stdout
    assert ("a simulated database, and DATABASE_URL names" in live.stderr
            and "a live database, new to live mode since TWILIO_SIMULATE is not true"
            in live.stderr), live.stderr
    assert "into a new one with TWILIO_SIMULATE=true" in live.stderr
    if database_url.startswith("sqlite:///"):
        assert not os.path.exists(database_url[len("sqlite:///"):]), "nothing was created"

    simulated = flask_command(tmp_path, {"DATABASE_URL": database_url, "TWILIO_SIMULATE": "true"},
                              "copy-database", "--from", source)
    assert simulated.returncode == 0, simulated.stderr
    assert "Copied 1 message" in simulated.stdout
    from sms_status.config import ConfigError
    with pytest.raises(ConfigError, match="which was used in simulation"):
        create_app(live_env(tmp_path, DATABASE_URL=database_url))


@pytest.mark.parametrize("webhooks_here", [
    pytest.param({}, id="url-unset-here"),
    pytest.param({"STATUS_WEBHOOK_URL": "http://127.0.0.1:9/events",
                  "STATUS_WEBHOOK_SECRET": WEBHOOK_SECRET}, id="url-set-here"),
])
def test_retry_webhooks_says_the_events_are_due_now_whatever_its_own_settings(
        make_app, database_url, tmp_path, webhooks_here):
    """The command cannot know whether the running service has status webhooks on: its
    message is true either way."""
    app = make_app(STATUS_WEBHOOK_URL="http://127.0.0.1:9/events",
                   STATUS_WEBHOOK_SECRET=WEBHOOK_SECRET)
    app.test_client().post("/send-sms", json={"to": "+15558675309", "body": "hi"}, headers=AUTH)
    sql_rows(database_url, "UPDATE webhook_events SET state = 'failed', attempts = 8,"
             " last_attempt_at = ?", (times.stored_time(time.time()),))
    result = flask_command(tmp_path, {"DATABASE_URL": database_url, **webhooks_here},
                           "retry-webhooks", "--since", "1h")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1:] == [
        "Queued 1 failed status webhook event again (given up on in the last 1h).",
        "They are due now: a running service with status webhooks on delivers them at once "
        "(one with them off, once they are turned on)."]
    assert sql_rows(database_url, "SELECT state FROM webhook_events") == [("pending",)]


@pytest.mark.parametrize("limit", ["abc", "0", "-3"])
def test_a_malformed_limit_says_what_to_give(app, limit):
    result = run(app, "reconcile", "--limit", limit)
    assert result.exit_code == 2
    assert "integer range" not in result.output
    assert "a whole number of messages, 1 or more" in result.output, result.output


def flask_command(cwd, env, *args):
    """`flask --app app ...` run as an operator runs it, in `cwd`, with `env` alone."""
    flask = str(Path(sys.executable).parent / "flask")
    return subprocess.run([flask, "--app", str(ROOT / "app.py"), *args], cwd=cwd,
                          env={"PATH": os.environ["PATH"], **env}, capture_output=True,
                          text=True, timeout=60)


def test_help_needs_no_configuration_and_touches_no_database(tmp_path):
    listing = flask_command(tmp_path, {}, "--help")
    assert listing.returncode == 0, listing.stderr
    for command in ("reconcile", "prune", "copy-database", "backup"):
        assert command in listing.stdout
    for command in ("reconcile", "prune", "copy-database", "backup"):
        result = flask_command(tmp_path, {}, command, "--help")
        assert result.returncode == 0, result.stderr
        assert "Usage:" in result.stdout and "Configuration error" not in result.stderr
    assert list(tmp_path.iterdir()) == [], "--help created or opened no database"


def test_database_commands_need_only_the_database(database_url, old_history, tmp_path):
    url, histories = old_history
    env = {"DATABASE_URL": database_url}
    copied = flask_command(tmp_path, env, "copy-database", "--from", url)
    assert copied.returncode == 0, copied.stderr
    assert "Copied 4 messages, 10 status events" in copied.stdout
    pruned = flask_command(tmp_path, env, "prune", "--older-than", "0s")
    assert pruned.returncode == 0, pruned.stderr
    assert "Removed 4 messages and 10 status events" in pruned.stdout


def test_reconcile_asks_for_twilio_credentials_alone(tmp_path):
    result = flask_command(tmp_path, {"DATABASE_URL": "sqlite:///history.db"}, "reconcile")
    assert result.returncode == 2
    assert "TWILIO_ACCOUNT_SID is required" in result.stderr
    assert "TWILIO_AUTH_TOKEN is required" in result.stderr
    for unused in ("API_KEY", "BASE_URL", "TWILIO_PHONE_NUMBER"):
        assert unused not in result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == [], "nothing was opened before the check"


def test_a_command_names_a_malformed_variable_it_uses(tmp_path):
    result = flask_command(tmp_path, {"DATABASE_URL": "mysql://db/x", "BODY_RETENTION": "a week"},
                           "prune", "--older-than", "90d")
    assert result.returncode == 2
    assert "DATABASE_URL must be" in result.stderr and "BODY_RETENTION" in result.stderr
    assert "TWILIO_ACCOUNT_SID" not in result.stderr and "Traceback" not in result.stderr


def test_a_command_checks_the_variables_it_uses_not_words_in_other_problems(tmp_path):
    """LOG_LEVEL's problem quotes DATABASE_URL, but prune does not use LOG_LEVEL."""
    env = {"DATABASE_URL": "sqlite:///history.db", "TWILIO_SIMULATE": "true"}
    services(create_app({**env, "DATABASE_URL": f"sqlite:///{tmp_path}/history.db"}
               )).storage.close()
    result = flask_command(tmp_path, {**env, "LOG_LEVEL": "database_url"},
                           "prune", "--older-than", "90d")
    assert result.returncode == 0, result.stderr
    assert "Removed 0 messages" in result.stdout


@pytest.mark.parametrize("command", [
    pytest.param(["reconcile"], id="reconcile"),
    pytest.param(["prune", "--older-than", "90d"], id="prune"),
    pytest.param(["backup", "--to", "copy.db"], id="backup"),
    pytest.param(["retry-webhooks"], id="retry-webhooks"),
    pytest.param(["copy-database", "--from", "sqlite:///old.db"], id="copy-database"),
])
def test_every_command_names_its_database_first_without_its_password(
        app, database_url, tmp_path, command, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = run(app, *command).output.splitlines()[0]
    if database_url.startswith("sqlite:///"):
        assert first.startswith(f"Database: {tmp_path}/test.db"), first
    else:
        parts = psycopg.conninfo.conninfo_to_dict(database_url)
        assert first.startswith(f"Database: PostgreSQL database '{parts['dbname']}' at "), first
        assert not parts.get("password") or parts["password"] not in first
    if command[0] == "copy-database":
        assert first.endswith(f", copying from {tmp_path}/old.db")


@pytest.fixture
def simulated_database(tmp_path):
    """The quick start's database: sms_status_simulated.db in tmp_path, made by the service
    started in simulation."""
    services(create_app({"TWILIO_SIMULATE": "true", "DATABASE_URL":
                f"sqlite:///{tmp_path}/sms_status_simulated.db"})).storage.close()
    return tmp_path / "sms_status_simulated.db"


@pytest.mark.parametrize("command", [
    pytest.param(["prune", "--older-than", "90d"], id="prune"),
    pytest.param(["backup", "--to", "copy.db"], id="backup"),
    pytest.param(["retry-webhooks"], id="retry-webhooks"),
])
def test_a_command_without_the_mode_of_the_quick_start_creates_no_database(
        simulated_database, tmp_path, command):
    before = sorted(p.name for p in tmp_path.iterdir())
    result = flask_command(tmp_path, {}, *command)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.splitlines()[0] == (
        f"Database: {tmp_path}/sms_status.db (the default file in live mode)")
    assert f"no database at {tmp_path}/sms_status.db (none was created)" in result.stderr
    assert ("sms_status_simulated.db is here: set TWILIO_SIMULATE=true to use it"
            in result.stderr)
    assert "Queued" not in result.stdout and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_command_pointed_at_a_missing_file_says_how_to_name_the_right_one(tmp_path):
    result = flask_command(tmp_path, {"DATABASE_URL": "sqlite:///sms-status.db"},
                           "prune", "--older-than", "90d")
    assert result.returncode == 1
    assert f"no database at {tmp_path}/sms-status.db (none was created)" in result.stderr
    assert "Check DATABASE_URL" in result.stderr
    live = flask_command(tmp_path, {"TWILIO_SIMULATE": "true"}, "retry-webhooks")
    assert live.returncode == 1
    assert "Run the command in the service's folder" in live.stderr
    assert list(tmp_path.iterdir()) == []


@sqlite_only
def test_backup_while_the_service_takes_callbacks_holds_every_acknowledged_one(
        service_env, start_service, tmp_path):
    env = service_env(simulate=False)
    service = start_service(env)
    copy = tmp_path / "backup" / "copy.db"
    copy.parent.mkdir()
    with CallbackLoad(service, env["BASE_URL"] + "/message-status", threads=4) as load:
        load.wait_for(200)
        acknowledged = list(load.acknowledged)
        result = flask_command(tmp_path, {"DATABASE_URL": env["DATABASE_URL"]},
                               "backup", "--to", str(copy))
        load.wait_for(len(acknowledged) + 100)
    assert result.returncode == 0, result.stderr
    assert f"Backed up {env['DATABASE_URL'][len('sqlite:///'):]} to {copy}" in result.stdout
    assert load.others == [], "callbacks went on being stored during the backup"
    url = f"sqlite:///{copy}"
    assert sql_rows(url, "PRAGMA integrity_check") == [("ok",)]
    assert sql_rows(url, "PRAGMA journal_mode") == [("delete",)], "one self-contained file"
    stored = {sid for (sid,) in sql_rows(url, "SELECT message_sid FROM status_events")}
    assert set(acknowledged) <= stored
    assert sorted(p.name for p in copy.parent.iterdir()) == ["copy.db"]


@sqlite_only
def test_a_backup_is_as_private_as_the_database_under_a_permissive_umask(app, send, tmp_path):
    sent_messages(send, 2)
    copy = tmp_path / "copies" / "copy.db"
    copy.parent.mkdir()
    copy.write_bytes(b"")  # an earlier, world-readable copy is replaced by a private one
    copy.chmod(0o644)
    previous = os.umask(0o022)
    try:
        result = run(app, "backup", "--to", str(copy))
    finally:
        os.umask(previous)
    assert result.exit_code == 0, result.output
    assert "2 messages" in result.output
    assert copy.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in copy.parent.iterdir()) == ["copy.db"]


@sqlite_only
def test_a_backup_carries_the_replies_and_the_opt_outs(app, client, tmp_path):
    reply(client, "STOP")
    reply(client, "thanks")
    copy = tmp_path / "copy.db"
    assert run(app, "backup", "--to", str(copy)).exit_code == 0
    assert count_rows_at(f"sqlite:///{copy}", "inbound_messages") == 2
    assert sql_rows(f"sqlite:///{copy}", "SELECT number, source FROM opt_outs") == [
        ("+15558675309", "keyword")]
    assert count_rows_at(f"sqlite:///{copy}", "opt_out_changes") == 1


@sqlite_only
def test_a_backup_into_a_missing_folder_names_the_folder(app, tmp_path):
    folder = tmp_path / "no-such-folder"
    result = run(app, "backup", "--to", str(folder / "copy.db"))
    assert result.exit_code == 1
    assert f"the folder {folder} does not exist" in result.output
    assert not folder.exists()


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_backup_on_postgresql_points_to_pg_dump(database_url, tmp_path):
    result = flask_command(tmp_path, {"DATABASE_URL": database_url}, "backup", "--to", "x.db")
    assert result.returncode == 1
    assert "pg_dump" in result.stderr and "Traceback" not in result.stderr
    password = psycopg.conninfo.conninfo_to_dict(database_url).get("password")
    assert not password or password not in result.stderr + result.stdout
    assert list(tmp_path.iterdir()) == []


# --- progress of long commands ------------------------------------------------------------

OLD = "2020-01-01T00:00:00.000Z"


def fill_old_history(database_url, count, sid_end=""):
    """`count` messages last updated in 2020, each with one status event, in bulk into a
    database at the current schema, numbered in storage order as the service numbers them."""
    engine = open_engine(database_url, pool_size=1)
    engine.migrate()
    engine.close()
    sql_rows(database_url,
             "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)"
             " INSERT INTO messages (sid, to_number, latest_status, created_at, updated_at,"
             " storage_order) SELECT 'SM' || substr(z, length(z) - 30) || ?, '+15558675309',"
             " 'queued', ?, ?, i FROM (SELECT i, '0000000000000000000000000000000' || i AS z"
             " FROM n) AS numbered",
             (count, sid_end or "f", OLD, OLD))
    sql_rows(database_url, "INSERT INTO status_events (message_sid, status, received_at)"
             " SELECT sid, 'queued', created_at FROM messages")
    if not database_url.startswith("sqlite:///"):
        sql_rows(database_url, "SELECT setval('messages_storage_order', ?)", (count,))


def progress_lines(output, label):
    """(done, total, percent) of each line `<label>: <done> of <total> (<percent>%)`."""
    found = re.findall(rf"^{label}: (\d+) of (\d+) \((\d+)%\)$", output, re.MULTILINE)
    return [tuple(map(int, line)) for line in found]


def test_prune_prints_its_progress_at_the_interval_without_a_terminal(database_url, tmp_path):
    fill_old_history(database_url, 3000)  # six batches of 500
    result = flask_command(tmp_path, {"DATABASE_URL": database_url},
                           "prune", "--older-than", "1d", "--progress-every", "0.001")
    assert result.returncode == 0, result.stderr
    lines = progress_lines(result.stdout, "Deleting old messages")
    assert len(lines) >= 2, result.stdout
    assert [done for done, _, _ in lines] == sorted({done for done, _, _ in lines})
    assert all(total == 3000 and percent == 100 * done // 3000 for done, total, percent in lines)
    assert result.stdout.splitlines()[-2].startswith("Removed 3000 messages and 3000 status")


def test_copy_database_prints_its_progress_at_the_interval_without_a_terminal(
        database_url, tmp_path):
    source = f"sqlite:///{tmp_path}/old.db"
    fill_old_history(source, 3000)  # three batches of 1000
    env = {"DATABASE_URL": database_url}
    quiet = flask_command(tmp_path, env, "copy-database", "--from", source,
                          "--progress-every", "600")
    assert quiet.returncode == 0, quiet.stderr
    first, summary = quiet.stdout.splitlines()
    assert first.startswith("Database: ") and summary.startswith("Copied 3000 messages")
    again = flask_command(tmp_path, env, "copy-database", "--from", source,
                          "--progress-every", "0.001")
    assert again.returncode == 0, again.stderr
    lines = progress_lines(again.stdout, "Copying messages")
    assert len(lines) >= 2 and lines[-1] == (3000, 3000, 100), again.stdout
    assert again.stdout.splitlines()[-1].startswith("Copied 0 messages")


def test_reconcile_prints_its_progress_at_the_interval_without_a_terminal(
        database_url, tmp_path):
    """Each fetch from the simulated Twilio takes 50 ms, so ten take half a second at least."""
    fill_old_history(database_url, 10, sid_end="0")  # SIDs the simulator says are delivered
    env = {"DATABASE_URL": database_url, "TWILIO_SIMULATE": "true",
           "TWILIO_SIMULATE_LATENCY_MS": "50"}
    result = flask_command(tmp_path, env, "reconcile", "--older-than", "0s",
                           "--progress-every", "0.1")
    assert result.returncode == 0, result.stderr
    lines = progress_lines(result.stdout, "Checking messages with Twilio")
    assert len(lines) >= 2 and all(total == 10 for _, total, _ in lines), result.stdout
    assert result.stdout.count(" queued -> delivered (Twilio: delivered)") == 10
    assert result.stdout.splitlines()[-1].startswith("Checked 10 messages: 10 updated")


def on_a_terminal(cwd, env, *args, timeout=60):
    """(exit code, output) of `flask --app app ...` run with a terminal (a pty) as its
    standard input, output and error."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "flask"), "--app", str(ROOT / "app.py"), *args],
        cwd=cwd, env={"PATH": os.environ["PATH"], "COLUMNS": "100", **env},
        stdin=terminal, stdout=terminal, stderr=terminal)
    os.close(terminal)
    output, deadline = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not select.select([controller], [], [], 1)[0]:
                continue
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the command ended and closed the terminal
                break
            if not chunk:
                break
            output += chunk
        return process.wait(timeout=10), output.decode(errors="replace")
    finally:
        os.close(controller)
        if process.poll() is None:
            process.kill()


def test_prune_on_a_terminal_shows_a_progress_bar(database_url, tmp_path):
    fill_old_history(database_url, 3000)
    code, output = on_a_terminal(tmp_path, {"DATABASE_URL": database_url},
                                 "prune", "--older-than", "1d")
    assert code == 0, output
    # Each redraw starts at the line's start (and hides the cursor while the bar shows).
    bar = re.findall(r"\r(?:\x1b\[\?25l)?Deleting old messages +\[[#-]+\] +(\d+)/3000 +(\d+)%",
                     output)
    assert bar and bar[-1] == ("3000", "100"), output
    assert "Deleting old messages: " not in output, "no periodic lines on a terminal"
    assert "Removed 3000 messages and 3000 status events" in output


def test_reconcile_on_a_terminal_prints_its_lines_above_the_bar(database_url, tmp_path):
    fill_old_history(database_url, 4, sid_end="0")
    code, output = on_a_terminal(tmp_path, {"DATABASE_URL": database_url,
                                            "TWILIO_SIMULATE": "true"},
                                 "reconcile", "--older-than", "0s")
    assert code == 0, output
    # A line printed while the bar shows first clears the bar's line; the bar is redrawn.
    assert output.count("\r\x1b[KSM") == 3, output
    assert re.search(r"Checking messages with Twilio +\[#+\] +4/4 +100%", output), output
    assert output.endswith("Checked 4 messages: 4 updated, 0 unchanged, 0 not found at "
                           "Twilio, 0 failed.\r\n")


def test_simulate_reply_stops_and_starts_sends_to_a_number_of_the_running_service(
        service_env, start_service, tmp_path):
    env = service_env()  # simulation without API_KEY, as in the quick start
    service = start_service(env)

    def send():
        return requests.post(service.url + "/send-sms", timeout=15,
                             json={"to": "+15558675309", "body": "Your code is 123456"})

    assert send().status_code == 200
    stop = flask_command(tmp_path, env, "simulate-reply", "--from", "+15558675309",
                         "--body", "STOP")
    assert stop.returncode == 0, stop.stderr
    assert "'STOP' from +15558675309" in stop.stdout
    refused = send()
    assert refused.status_code == 400 and refused.json()["code"] == 21610
    state = requests.get(service.url + "/opt-outs/%2B15558675309", timeout=15).json()
    assert [(h["change"], h["source"]) for h in state["history"]] == [("opted_out", "keyword")]
    assert flask_command(tmp_path, env, "simulate-reply", "--from", "+15558675309",
                         "--body", "start").returncode == 0
    assert send().status_code == 200
    inbound = requests.get(service.url + "/inbound-messages", timeout=15).json()["messages"]
    assert [(m["from"], m["to"], m["optOutType"]) for m in inbound] == [
        ("+15558675309", "+15005550006", "START"), ("+15558675309", "+15005550006", "STOP")]


@pytest.mark.parametrize("simulate, problem", [
    pytest.param(False, "simulation only", id="live"),
    pytest.param(True, "could not reach the service", id="no-service"),
])
def test_simulate_reply_is_refused_live_and_says_when_no_service_answers(tmp_path, simulate,
                                                                         problem):
    env = ({"TWILIO_SIMULATE": "true", "PORT": str(free_port())} if simulate
           else live_env(tmp_path))
    result = flask_command(tmp_path, env, "simulate-reply", "--from", "+15558675309",
                           "--body", "STOP")
    assert result.returncode == 1, result.stdout
    assert problem in result.stderr and "Traceback" not in result.stderr


def test_simulate_reply_needs_an_e164_number(tmp_path):
    result = flask_command(tmp_path, {"TWILIO_SIMULATE": "true"}, "simulate-reply",
                           "--from", "5558675309", "--body", "STOP")
    assert result.returncode == 2 and "E.164" in result.stderr
