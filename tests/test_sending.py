"""The send flow on its own: no Flask app and no request, with real storage (a SQLite file)
and the real Twilio client, whose HTTP transport alone is replaced."""

import pytest
from flask import has_app_context, has_request_context

from sms_status import sending, twilio_api
from sms_status.config import load_config
from sms_status.storage import access
from support import live_env, sql_rows
from twilio_fakes import twilio_error

PAYLOAD = {"to": "+15558675309", "body": "Your code is 123456"}


@pytest.fixture
def context(tmp_path, fake_twilio):
    config = load_config(live_env(tmp_path))
    storage = access.open_storage(config)
    access.prepare(storage, config.mode)
    yield sending.SendContext(config=config, storage=storage,
                              twilio=twilio_api.build_client(config, fake_twilio),
                              clock=lambda: 1_800_000_000.0)
    storage.close()


def test_a_send_is_sent_stored_and_answered(context, fake_twilio):
    outcome = sending.send_sms(context, PAYLOAD)
    assert not has_app_context() and not has_request_context()
    assert outcome.status == 200 and outcome.headers == {}
    assert outcome.replayable and outcome.twilio_called
    sid = outcome.body["messageSid"]
    assert outcome.body == {"success": True, "messageSid": sid, "status": "queued",
                            "reference": None}
    [create] = fake_twilio.creates
    assert create["data"]["To"] == "+15558675309"
    assert sql_rows(context.config.database_url,
                    "SELECT latest_status FROM messages WHERE sid = ?", (sid,)) == [("queued",)]


def test_a_twilio_refusal_is_an_outcome_kept_for_replays(context, fake_twilio):
    fake_twilio.answer_next(twilio_error(400, 21211, "The 'To' number is not valid"))
    outcome = sending.send_sms(context, PAYLOAD)
    assert outcome == sending.SendOutcome(
        400, {"success": False, "error": "Twilio rejected the message",
              "details": "Unable to create record: The 'To' number is not valid",
              "code": 21211},
        replayable=True, twilio_called=True)
    assert sql_rows(context.config.database_url, "SELECT count(*) FROM messages") == [(0,)]


def test_a_repeat_with_the_same_key_is_replayed_without_calling_twilio(context, fake_twilio):
    first = sending.send_sms(context, PAYLOAD, idempotency_key="order-1")
    again = sending.send_sms(context, PAYLOAD, idempotency_key="order-1")
    assert first.twilio_called and not again.twilio_called
    assert (again.status, again.body) == (first.status, first.body)
    assert again.text == first.text
    assert again.headers == {"Idempotent-Replayed": "true"} and first.headers == {}
    assert len(fake_twilio.creates) == 1


@pytest.mark.parametrize("wait, retry_after", [
    pytest.param(0.2, "1", id="under-a-second"),
    pytest.param(59.01, "60", id="rounded-up"),
    pytest.param(3600.0004, "3600", id="never-past-the-hour"),
])
def test_a_limit_says_when_to_retry_within_its_hour(wait, retry_after):
    outcome = sending.limit_reached("+15558675310", "total", 5, wait)
    assert outcome.status == 429
    assert outcome.headers["Retry-After"] == retry_after
    assert f"retry after {retry_after} seconds" in outcome.body["error"]
