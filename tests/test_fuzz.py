"""Property tests: whatever arrives, the answer is JSON, never a 5xx, and nothing unsafe happens."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sms_status import rules
from support import (
    AUTH,
    BASE_URL,
    CALLBACK_URL,
    count_rows,
    sign,
)

FUZZ = settings(max_examples=100, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
phone_like = st.one_of(st.from_regex(r"\+[0-9]{0,17}", fullmatch=True), st.text(max_size=20))
send_bodies = st.one_of(
    json_values,
    st.fixed_dictionaries({"to": phone_like, "body": st.text(max_size=1700)}),
    st.fixed_dictionaries({"to": st.just("+15558675309")},
                          optional={"body": st.one_of(st.text(), json_values)}),
)
# Bodies around the 64 KiB limit, built from a repeated chunk to keep generation cheap.
large_bodies = st.builds(lambda chunk, times: chunk * times,
                         st.binary(min_size=60, max_size=80), st.integers(800, 1200))
header_text = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40)
# A query string as Twilio could call it ('#' would start a fragment, which is never sent).
query_text = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126,
                                            exclude_characters="#"), max_size=40)
SIGNING_KEY = "fuzz-shared-key-secret"


@pytest.fixture
def fuzz_app(make_app, fake_twilio):
    app = make_app(LOG_LEVEL="ERROR", MAX_SENDS_PER_RECIPIENT_PER_HOUR="0",
                   TWILIO_WEBHOOK_SIGNING_KEY=SIGNING_KEY)
    return app, fake_twilio


def assert_json_and_no_5xx(response):
    assert response.status_code < 500, response.data
    assert response.is_json, response.data
    json.loads(response.data)


@FUZZ
@given(payload=send_bodies, key=st.none() | header_text, auth=st.booleans(),
       content_type=st.sampled_from(["application/json", "text/plain", None]))
def test_send_sms_json_bodies(fuzz_app, payload, key, auth, content_type):
    app, twilio = fuzz_app
    creates = len(twilio.creates)
    headers = dict(AUTH) if auth else {}
    if key is not None:
        headers["Idempotency-Key"] = key
    response = app.test_client().post("/send-sms", data=json.dumps(payload), headers=headers,
                                      content_type=content_type)
    assert_json_and_no_5xx(response)
    if not auth or rules.send_request_problem(payload) is not None:
        assert len(twilio.creates) == creates, "no Twilio call for an invalid send"
        assert response.status_code in (400, 401, 409, 422)


@FUZZ
@given(raw=st.binary(max_size=2000) | large_bodies,
       headers=st.dictionaries(st.sampled_from(["Content-Type", "Idempotency-Key",
                                                "Authorization", "X-Extra"]),
                               header_text, max_size=3))
def test_send_sms_arbitrary_bytes(fuzz_app, raw, headers):
    app, twilio = fuzz_app
    creates = len(twilio.creates)
    response = app.test_client().post("/send-sms", data=raw, headers={**AUTH, **headers})
    assert_json_and_no_5xx(response)
    try:
        payload = json.loads(raw)
    except ValueError:
        payload = None
    if rules.send_request_problem(payload) is not None or headers.get("Authorization"):
        assert len(twilio.creates) == creates


form_params = st.dictionaries(
    st.sampled_from(["MessageSid", "MessageStatus", "ErrorCode", "To", "From", "AccountSid",
                     "SmsSid", "SmsStatus", "Other"]) | st.text(max_size=10),
    st.text(max_size=40), max_size=8)


@FUZZ
@given(params=form_params, query=st.none() | query_text, signature=st.none() | header_text,
       settings_header=st.none() | header_text,
       signed_with=st.sampled_from(["auth-token", "shared-key", "nothing"]))
def test_message_status_never_stores_without_a_valid_signature(fuzz_app, params, query,
                                                               signature, settings_header,
                                                               signed_with):
    from twilio.request_validator import RequestValidator
    app, _ = fuzz_app
    before = count_rows(app, "status_events")
    url = CALLBACK_URL + (f"?{query}" if query else "")
    headers = {}
    if signed_with == "auth-token":
        headers["X-Twilio-Signature"] = sign(url, params)
        if settings_header:
            headers["X-Twilio-Webhooks-Signature-Settings"] = settings_header
    elif signed_with == "shared-key":
        headers["X-Twilio-Signature"] = RequestValidator(SIGNING_KEY).compute_signature(
            url, params, algorithm="HMAC_SHA256")
        headers["X-Twilio-Webhooks-Signature-Settings"] = "key=k1,algorithm=HMAC_SHA256"
    elif signature is not None:
        headers["X-Twilio-Signature"] = signature
    response = app.test_client().post(url[len(BASE_URL):], data=params, headers=headers)
    assert_json_and_no_5xx(response)
    validly_signed = signed_with == "shared-key" or (
        signed_with == "auth-token" and not settings_header)
    if not validly_signed:
        assert response.status_code == 403
        assert count_rows(app, "status_events") == before
    else:
        # SmsSid and SmsStatus stand in for absent (or empty) MessageSid and MessageStatus.
        sid = (params.get("MessageSid") or params.get("SmsSid") or "").strip()
        status = (params.get("MessageStatus") or params.get("SmsStatus") or "").strip()
        complete = sid and status
        nul = any("\x00" in key + value for key, value in params.items())
        assert response.status_code == (200 if complete and not nul else 400)


@FUZZ
@given(raw=st.binary(max_size=3000), content_type=header_text | st.none())
def test_message_status_arbitrary_bodies(fuzz_app, raw, content_type):
    app, _ = fuzz_app
    before = count_rows(app, "status_events")
    response = app.test_client().post("/message-status", data=raw, content_type=content_type,
                                      headers={"X-Twilio-Signature": "x"})
    assert_json_and_no_5xx(response)
    assert count_rows(app, "status_events") == before
