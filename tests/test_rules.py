import pytest

from sms_status import rules
from sms_status.services import services
from sms_status.storage import reads, statuses


@pytest.mark.parametrize("number, valid", [
    pytest.param("+15558675309", True, id="us"),
    pytest.param("+447700900123", True, id="uk"),
    pytest.param("+12", True, id="two-digits"),
    pytest.param("+123456789012345", True, id="fifteen-digits"),
    pytest.param("+1234567890123456", False, id="sixteen-digits"),
    pytest.param("+1", False, id="one-digit"),
    pytest.param("+05558675309", False, id="leading-zero"),
    pytest.param("15558675309", False, id="no-plus"),
    pytest.param("+1 555 867 5309", False, id="spaces"),
    pytest.param("+1555867530x", False, id="letter"),
    pytest.param("+15558675309\n", False, id="trailing-newline"),
    pytest.param(15558675309, False, id="not-a-string"),
    pytest.param(None, False, id="none"),
])
def test_is_e164(number, valid):
    assert rules.is_e164(number) is valid


@pytest.mark.parametrize("payload, fragment", [
    pytest.param([], "JSON object", id="list"),
    pytest.param("hi", "JSON object", id="string"),
    pytest.param(None, "JSON object", id="none"),
    pytest.param({"body": "x"}, "'to' is required", id="no-to"),
    pytest.param({"to": "5558675309", "body": "x"}, "'to' must be", id="bad-to"),
    pytest.param({"to": 15558675309, "body": "x"}, "'to' must be", id="numeric-to"),
    pytest.param({"to": "+15558675309"}, "'body' is required", id="no-body"),
    pytest.param({"to": "+15558675309", "body": 5}, "'body' must be a string", id="numeric-body"),
    pytest.param({"to": "+15558675309", "body": " \n\t"}, "must not be blank", id="blank-body"),
    pytest.param({"to": "+15558675309", "body": "x" * 1601}, "at most 1600", id="long-body"),
])
def test_send_request_problem_names_the_field(payload, fragment):
    assert fragment in rules.send_request_problem(payload)


def test_send_request_problem_accepts_a_good_request():
    assert rules.send_request_problem({"to": "+15558675309", "body": "x" * 1600}) is None


@pytest.mark.parametrize("current, new, latest", [
    pytest.param("queued", "sent", "sent", id="queued-sent"),
    pytest.param("accepted", "queued", "queued", id="accepted-queued"),
    pytest.param("sent", "delivered", "delivered", id="sent-delivered"),
    pytest.param("delivered", "sent", "delivered", id="late-sent"),
    pytest.param("delivered", "queued", "delivered", id="late-queued"),
    pytest.param("delivered", "undelivered", "delivered", id="final-after-final"),
    pytest.param("failed", "delivered", "failed", id="other-final-after-final"),
    pytest.param("delivered", "read", "read", id="read"),
    pytest.param("sent", "sent", "sent", id="same"),
    pytest.param("sent", "receiving", "sent", id="unknown-new"),
    pytest.param("delivered", "receiving", "delivered", id="unknown-after-final"),
    pytest.param(None, "receiving", "receiving", id="unknown-first"),
    pytest.param("mystery", "queued", "queued", id="unknown-current"),
    pytest.param("mystery", "receiving", "mystery", id="unknown-after-unknown"),
])
def test_the_latest_status_only_moves_forward_where_it_is_stored(app, current, new, latest):
    """The lifecycle rule as it runs: the stored update of record_status, on both engines."""
    storage = services(app).storage
    sid = "SM" + "7" * 32
    if current is not None:
        assert statuses.record_status(storage, sid, current)
    statuses.record_status(storage, sid, new)
    message, history = reads.message_with_history(storage, sid)
    assert message["latest_status"] == latest
    # Every status is kept in the history, whether or not it moved the latest one.
    assert {event["status"] for event in history} == {current, new} - {None}


@pytest.mark.parametrize("number, masked", [
    ("+15558675309", "+*******5309"),
    ("15558675309", "*******5309"),
    ("+123", "****"),
    (None, "-"),
])
def test_mask_phone_keeps_only_last_four_digits(number, masked):
    assert rules.mask_phone(number) == masked


@pytest.mark.parametrize("text, seconds", [
    ("0s", 0), ("45s", 45), ("10m", 600), ("2h", 7200), ("90d", 90 * 86400),
])
def test_parse_duration(text, seconds):
    assert rules.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "10", "m", "-1d", "1.5h", "10 m", "1w", None, "10mm"])
def test_parse_duration_refuses_malformed(text):
    with pytest.raises(ValueError, match="<number><s\\|m\\|h\\|d>"):
        rules.parse_duration(text)


@pytest.mark.parametrize("header, token", [
    pytest.param("Bearer secret-key-123456", "secret-key-123456", id="bearer"),
    pytest.param("bearer secret-key-123456", "secret-key-123456", id="scheme-case"),
    pytest.param("Bearer  secret-key-123456 ", "secret-key-123456", id="spaces"),
    pytest.param("Bearer sécret", "sécret", id="non-ascii"),
    pytest.param("Bearer ", None, id="no-key"),
    pytest.param("Basic secret-key-123456", None, id="other-scheme"),
    pytest.param("secret-key-123456", None, id="no-scheme"),
    pytest.param("", None, id="empty"),
    pytest.param(None, None, id="missing"),
])
def test_bearer_token(header, token):
    assert rules.bearer_token(header) == token


@pytest.mark.parametrize("number, prefixes, allowed", [
    ("+15558675309", (), True),
    ("+15558675309", ("+1", "+44"), True),
    ("+447700900123", ("+1", "+44"), True),
    ("+2348012345678", ("+1", "+44"), False),
])
def test_destination_allowed(number, prefixes, allowed):
    assert rules.destination_allowed(number, prefixes) is allowed


@pytest.mark.parametrize("value, expected", [
    pytest.param("plain key_1", "plain key_1", id="plain"),
    pytest.param("a\nb", "a\\nb", id="newline"),
    pytest.param("a\x85b", "a\\x85b", id="next-line"),
    pytest.param("a\u2028b\u2029c", "a\\u2028b\\u2029c", id="line-and-paragraph-separator"),
    pytest.param("\ud800", "\\ud800", id="lone-surrogate"),
    pytest.param("é✓", "é✓", id="printable-unicode"),
])
def test_printable_escapes_what_could_break_a_log_line(value, expected):
    assert rules.printable(value) == expected


def test_printable_shortens_and_says_by_how_much():
    assert rules.printable("k" * 30, 10) == "k" * 10 + "...(20 more characters)"
    assert rules.printable("\n" * 30, 10) == "\\n" * 10 + "...(20 more characters)"
