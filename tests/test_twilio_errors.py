import pytest

from sms_status.twilio_errors import ERRORS, description
from support import AUTH, callback


@pytest.mark.parametrize("code", sorted(ERRORS))
def test_each_code_has_twilios_shape_one_sentence_and_its_docs_link(code):
    # Twilio's error codes are five-digit integers: an answer's ErrorCode parses to one.
    assert isinstance(code, int) and 10000 <= code <= 99999
    sentence, link = ERRORS[code]
    assert link == f"https://www.twilio.com/docs/api/errors/{code}"
    assert sentence.endswith(".") and sentence.count(". ") == 0 and len(sentence) < 160
    assert description(code) == f"{sentence} {link}"


def test_the_codes_senders_meet_most_are_explained():
    # Unreachable handset, carrier filtering, unknown error: the top three on Twilio's list
    # of undelivered SMS.
    assert {30003, 30007, 30008} <= set(ERRORS)


@pytest.mark.parametrize("code", [
    pytest.param(None, id="none"),
    pytest.param(12345, id="unknown"),
    pytest.param("30003", id="text"),
])
def test_unknown_or_missing_codes_have_no_description(code):
    assert description(code) is None


@pytest.mark.parametrize("status, error_code, expected", [
    pytest.param("undelivered", "30007", "Carrier filtering", id="30007"),
    pytest.param("failed", "63016", "Outside WhatsApp", id="63016"),
    pytest.param("undelivered", "30999", None, id="unknown"),
    pytest.param("delivered", None, None, id="none"),
])
def test_get_status_describes_the_error(client, send, post_callback, status, error_code,
                                        expected):
    sid = send().get_json()["messageSid"]
    extra = {"ErrorCode": error_code} if error_code else {}
    post_callback(callback(sid, status, **extra))
    answer = client.get(f"/get-status/{sid}", headers=AUTH).get_json()
    if expected is None:
        assert answer["errorDescription"] is None
    else:
        assert answer["errorDescription"].startswith(expected)
