"""Inbound messages and the opt-out list, through the app with signed requests on both
engines: POST /inbound-sms, its keywords, the opt-outs sends respect, and Twilio's 21610
from its API and from a status callback."""

import pytest

from sms_status import keywords
from sms_status.services import get_db
from sms_status.storage import opt_outs
from support import (
    AUTH,
    BASE_URL,
    INBOUND_URL,
    PERSON,
    SENDER,
    app_database_url,
    callback,
    count_rows,
    inbound,
    post_inbound,
    refused_as_opted_out,
    reply,
    sign,
    sql_rows,
)
from twilio_fakes import twilio_error


def opted_out(app, number=PERSON):
    with app.app_context():
        return opt_outs.opt_out_of(get_db(), number) is not None


def stored_inbound(app):
    return sql_rows(app_database_url(app), "SELECT sid, from_number, to_number, body, num_media,"
                    " opt_out_type, kind FROM inbound_messages ORDER BY seq", as_dicts=True)


def history(app, number=PERSON):
    with app.app_context():
        return [(row["change"], row["source"], row["keyword"])
                for row in opt_outs.history_of(get_db(), number)]


# --- the keywords, as pure rules ---------------------------------------------------------

# Twilio's default keywords, written out here (not read from the code under test).
OPT_OUT_WORDS = ("STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "OPTOUT", "REVOKE")
OPT_IN_WORDS = ("START", "YES", "UNSTOP")
HELP_WORDS = ("HELP", "INFO")

@pytest.mark.parametrize("body, opt_out_type, kind, keyword", [
    *[pytest.param(word, None, "opt_out", word, id=word) for word in OPT_OUT_WORDS],
    *[pytest.param(word, None, "opt_in", word, id=word) for word in OPT_IN_WORDS],
    *[pytest.param(word, None, "help", word, id=word) for word in HELP_WORDS],
    pytest.param("  stop \n", None, "opt_out", "STOP", id="trimmed-any-case"),
    pytest.param("Unstop", None, "opt_in", "UNSTOP", id="mixed-case"),
    pytest.param("please don't stop", None, "message", None, id="sentence-with-stop"),
    pytest.param("STOP.", None, "message", None, id="punctuation"),
    pytest.param("yes please", None, "message", None, id="sentence-with-yes"),
    pytest.param("", None, "message", None, id="empty-mms"),
    pytest.param("please don't text me", "STOP", "opt_out", "STOP", id="opt-out-type-stop"),
    pytest.param("STOP", "START", "opt_in", "START", id="opt-out-type-wins"),
    pytest.param("stop", "help", "help", "HELP", id="opt-out-type-any-case"),
    pytest.param("STOP", "SOMETHING", "opt_out", "STOP", id="unknown-opt-out-type-ignored"),
])
def test_a_reply_is_a_keyword_only_as_its_whole_trimmed_body(body, opt_out_type, kind, keyword):
    assert keywords.kind_of(body, opt_out_type) == (kind, keyword)


# --- POST /inbound-sms ------------------------------------------------------------------

def test_an_inbound_message_is_stored_once_and_answered_with_empty_twiml(app, client):
    params = inbound("Thanks, see you at 3", NumMedia="2")
    answer = post_inbound(client, params)
    assert answer.status_code == 200
    assert answer.mimetype == "text/xml"
    assert answer.get_data(as_text=True).endswith("<Response/>")
    repeat = post_inbound(client, params)
    assert repeat.status_code == 200 and repeat.get_data(as_text=True).endswith("<Response/>")
    assert stored_inbound(app) == [{
        "sid": params["MessageSid"], "from_number": PERSON, "to_number": SENDER, "body": None,
        "num_media": 2, "opt_out_type": None, "kind": "message"}]


@pytest.mark.parametrize("sid_field", ["MessageSid", "SmsMessageSid", "SmsSid"])
def test_any_of_twilios_sid_fields_names_the_message(app, client, sid_field):
    params = inbound("hi")
    sid = params["MessageSid"]
    for name in ("MessageSid", "SmsMessageSid", "SmsSid"):
        if name != sid_field:
            del params[name]
    assert post_inbound(client, params).status_code == 200
    assert [row["sid"] for row in stored_inbound(app)] == [sid]


@pytest.mark.parametrize("missing", [("MessageSid", "SmsMessageSid", "SmsSid"), ("From",)])
def test_an_inbound_message_without_sid_or_from_is_400_and_nothing_is_stored(app, client,
                                                                             missing):
    params = inbound("STOP")
    for name in missing:
        del params[name]
    answer = post_inbound(client, params)
    assert answer.status_code == 400
    assert "MessageSid" in answer.get_json()["error"] and "From" in answer.get_json()["error"]
    assert count_rows(app, "inbound_messages") == 0
    assert not opted_out(app)


@pytest.mark.parametrize("signature_url, token_ok", [
    pytest.param(INBOUND_URL, False, id="wrong-token"),
    pytest.param(BASE_URL + "/message-status", True, id="signed-for-another-url"),
    pytest.param(None, True, id="missing"),
])
def test_a_bad_signature_is_403_and_nothing_is_stored(app, client, signature_url, token_ok):
    params = inbound("STOP")
    headers = {}
    if signature_url:
        headers["X-Twilio-Signature"] = (sign(signature_url, params) if token_ok
                                         else sign(signature_url, params, "another-token"))
    answer = client.post("/inbound-sms", data=params, headers=headers)
    assert answer.status_code == 403
    assert answer.get_json() == {"error": "Invalid Twilio signature"}
    assert count_rows(app, "inbound_messages") == 0
    assert not opted_out(app)


def test_the_callback_guards_run_before_an_inbound_message_too(app, client):
    too_many = inbound("hi") | {f"Extra{n}": "x" for n in range(100)}
    assert post_inbound(client, too_many).status_code == 400
    with_nul = inbound("hi\x00")
    assert client.post("/inbound-sms", data=with_nul,
                       headers={"X-Twilio-Signature": "bogus"}).status_code == 403
    assert post_inbound(client, with_nul).status_code == 400
    assert count_rows(app, "inbound_messages") == 0


@pytest.mark.parametrize("word", [*OPT_OUT_WORDS, "  stop  ", "Quit"])
def test_each_opt_out_keyword_opts_the_sender_out(app, client, word):
    reply(client, word)
    assert opted_out(app)
    assert history(app) == [("opted_out", "keyword", word.strip().upper())]


@pytest.mark.parametrize("word", [*OPT_IN_WORDS, "start "])
def test_each_opt_in_keyword_ends_the_opt_out(app, client, word):
    reply(client, "STOP")
    reply(client, word)
    assert not opted_out(app)
    assert history(app) == [("opted_out", "keyword", "STOP"),
                            ("opted_in", "keyword", word.strip().upper())]


@pytest.mark.parametrize("body", ["please don't stop", "stop it", "STOP!", "HELP", "info",
                                  "yes I'll be there", ""])
def test_other_replies_change_no_opt_out(app, client, body):
    reply(client, body)
    assert not opted_out(app)
    reply(client, "STOP")
    reply(client, body)
    assert opted_out(app)
    assert len(history(app)) == 1


def test_twilios_opt_out_type_wins_over_the_words(app, client):
    reply(client, "please remove me", OptOutType="STOP")
    assert opted_out(app)
    reply(client, "STOP", OptOutType="HELP")
    assert opted_out(app)
    reply(client, "ok then", OptOutType="START")
    assert not opted_out(app)
    assert [row["opt_out_type"] for row in stored_inbound(app)] == ["STOP", "HELP", "START"]


def test_a_repeated_stop_or_start_changes_nothing_more(app, client):
    params = inbound("STOP")
    post_inbound(client, params)
    post_inbound(client, params)
    reply(client, "STOP")
    assert history(app) == [("opted_out", "keyword", "STOP")]
    start = inbound("START")
    post_inbound(client, start)
    reply(client, "STOP")
    post_inbound(client, start)  # Twilio's retry of the START: stored once, changes nothing
    assert opted_out(app)
    assert [change for change, _, _ in history(app)] == ["opted_out", "opted_in", "opted_out"]


def test_a_sender_without_a_phone_number_is_stored_but_never_opted_out(app, client):
    reply(client, "STOP", from_="whatsapp:+15558675309")
    assert [row["kind"] for row in stored_inbound(app)] == ["opt_out"]
    assert count_rows(app, "opt_outs") == 0


@pytest.mark.parametrize("store", ["true", "false"])
def test_bodies_at_rest_follow_store_message_body(make_app, store):
    app = make_app(STORE_MESSAGE_BODY=store)
    reply(app.test_client(), "Running 5 minutes late")
    assert stored_inbound(app)[0]["body"] == ("Running 5 minutes late" if store == "true"
                                              else None)


def test_inbound_logs_mask_the_number_and_never_the_body(client, caplog):
    reply(client, "my secret reply")
    assert "+*******5309" in caplog.text
    assert PERSON not in caplog.text and "my secret reply" not in caplog.text


# --- sends respect the list -----------------------------------------------------------------

def test_a_send_to_an_opted_out_number_is_refused_before_twilio(app, client, send,
                                                               fake_twilio):
    reply(client, "STOP")
    body = refused_as_opted_out(send(PERSON))
    assert "STOP" in body["details"] and "START" in body["details"]
    assert fake_twilio.creates == []
    assert send("+15558675310").status_code == 200  # another number is sent to
    reply(client, "START")
    assert send(PERSON).status_code == 200
    assert len(fake_twilio.creates) == 2


def test_a_refused_send_is_not_counted_against_the_limits(make_app, fake_twilio):
    app = make_app(MAX_SENDS_PER_RECIPIENT_PER_HOUR="1", MAX_SENDS_PER_HOUR="1")
    client = app.test_client()
    reply(client, "STOP")
    for _ in range(3):
        refused_as_opted_out(client.post("/send-sms", json={"to": PERSON, "body": "hi"},
                                         headers=AUTH))
    assert count_rows(app, "send_reservations") == 0
    reply(client, "START")
    assert client.post("/send-sms", json={"to": PERSON, "body": "hi"},
                       headers=AUTH).status_code == 200


def test_a_keyed_send_to_an_opted_out_number_is_refused_and_replayed(app, client, send,
                                                                      fake_twilio):
    reply(client, "STOP")
    keyed = {**AUTH, "Idempotency-Key": "order-1"}
    first = refused_as_opted_out(send(PERSON, headers=keyed))
    again = send(PERSON, headers=keyed)
    assert again.get_json() == first and again.headers["Idempotent-Replayed"] == "true"
    assert fake_twilio.creates == []
    # A key used before the opt-out replays its answer: nothing is sent again.
    reply(client, "START")
    sent = send(PERSON, headers={**AUTH, "Idempotency-Key": "order-2"})
    reply(client, "STOP")
    assert send(PERSON, headers={**AUTH, "Idempotency-Key": "order-2"}).get_json() == \
        sent.get_json()
    refused_as_opted_out(send(PERSON, headers={**AUTH, "Idempotency-Key": "order-3"}))
    assert len(fake_twilio.creates) == 1


def test_twilios_21610_on_a_send_opts_the_number_out(app, send, fake_twilio, client):
    fake_twilio.answer_next(twilio_error(400, 21610, "Attempt to send to unsubscribed "
                                                     "recipient"))
    answer = send(PERSON)
    assert answer.status_code == 400 and answer.get_json()["code"] == 21610
    assert history(app) == [("opted_out", "twilio", None)]
    body = refused_as_opted_out(send(PERSON))
    assert "21610" in body["details"]
    assert len(fake_twilio.creates) == 1
    reply(client, "START")  # only the person's START ends it
    assert send(PERSON).status_code == 200


def test_another_twilio_refusal_opts_nobody_out(app, send, fake_twilio):
    fake_twilio.answer_next(twilio_error(400, 21614, "'To' number is not a valid mobile "
                                                     "number"))
    assert send(PERSON).status_code == 400
    assert not opted_out(app)


def test_a_status_callback_with_error_21610_opts_the_recipient_out(app, client, send,
                                                                   post_callback, fake_twilio):
    sid = send(PERSON).get_json()["messageSid"]
    assert post_callback(callback(sid, "failed", ErrorCode="30004")).status_code == 200
    assert not opted_out(app)
    other = send("+15558675310").get_json()["messageSid"]
    assert post_callback(callback(other, "failed", ErrorCode="21610",
                                  To="+15558675310")).status_code == 200
    assert opted_out(app, "+15558675310")
    with app.app_context():
        change = opt_outs.history_of(get_db(), "+15558675310")[0]
    assert (change["source"], change["message_sid"]) == ("twilio", other)
    refused_as_opted_out(send("+15558675310"))
    assert len(fake_twilio.creates) == 2


def test_a_21610_callback_before_its_send_was_stored_opts_out_the_callbacks_recipient(
        app, post_callback, send):
    sid = "SM" + "e5" * 16
    assert post_callback(callback(sid, "undelivered", ErrorCode="21610",
                                  To=PERSON)).status_code == 200
    assert opted_out(app)
    refused_as_opted_out(send(PERSON))
