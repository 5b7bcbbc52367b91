"""Pure rules of the service: phone numbers, the status lifecycle, durations, API keys.

Nothing here touches Flask, SQLite or the network, so each rule is tested directly.
"""

import re

E164_PATTERN = re.compile(r"\+[1-9][0-9]{1,14}")
MAX_BODY_LENGTH = 1600
SEND_FIELDS = ("to", "body", "reference")
MAX_REFERENCE_LENGTH = 128

# Twilio's outbound message lifecycle. A status may only move latestStatus forward;
# the final ones share a rank, so a late final status never replaces an earlier one.
STATUS_RANK = {
    "accepted": 0,
    "scheduled": 0,
    "queued": 1,
    "sending": 2,
    "sent": 3,
    "delivered": 4,
    "undelivered": 4,
    "failed": 4,
    "canceled": 4,
    "read": 5,
}
FINAL_STATUSES = ("delivered", "undelivered", "failed", "canceled", "read")

DURATION_PATTERN = re.compile(r"([0-9]+)([smhd])")
DURATION_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_DURATION_SECONDS = 100 * 365 * 86400


def is_e164(number):
    """True when `number` is +, then 2 to 15 digits, the first not 0."""
    return isinstance(number, str) and E164_PATTERN.fullmatch(number) is not None


def send_request_problem(payload):
    """Returns what is wrong with a /send-sms body, or None when it can be sent."""
    if not isinstance(payload, dict):
        return 'The request body must be a JSON object like {"to": "+15558675309", "body": "Hello"}'
    unknown = sorted(set(payload) - set(SEND_FIELDS))
    if unknown:
        # Refused rather than ignored: a caller who sends mediaUrl or sendAt must not be
        # told that a plain SMS, sent now, was what they asked for.
        return (f"Unknown field {printable(unknown[0], 40)!r}: /send-sms takes only "
                "'to', 'body' and 'reference'")
    to = payload.get("to")
    if to is None:
        return "Field 'to' is required: the recipient in E.164 format, like +15558675309"
    if not is_e164(to):
        return (
            "Field 'to' must be a phone number in E.164 format: +, country code and number, "
            "2 to 15 digits, like +15558675309"
        )
    body = payload.get("body")
    if body is None:
        return "Field 'body' is required: the text of the message"
    if not isinstance(body, str):
        return "Field 'body' must be a string"
    if not body.strip():
        return "Field 'body' must not be blank"
    if len(body) > MAX_BODY_LENGTH:
        return f"Field 'body' is {len(body)} characters; at most {MAX_BODY_LENGTH} are allowed"
    if "\x00" in body:
        return "Field 'body' contains a NUL character (U+0000), which no SMS can carry"
    try:
        body.encode("utf-8")
    except UnicodeEncodeError as error:
        return (f"Field 'body' has an unpaired UTF-16 surrogate at character {error.start}, "
                "which no SMS can carry; send the whole character (a \\ud83d\\ude00 pair, "
                "or the character itself)")
    reference = payload.get("reference")
    if reference is not None and not is_reference(reference):
        return f"Field 'reference' {REFERENCE_RULE}, or null for none"
    return None


REFERENCE_RULE = (f"must be a string of 1 to {MAX_REFERENCE_LENGTH} printable characters "
                  "(letters of any language, digits, punctuation, spaces; no control "
                  "characters), your own id such as an order number")


def is_reference(value):
    """A caller's own reference for a message: 1 to 128 printable characters."""
    return (isinstance(value, str) and 1 <= len(value) <= MAX_REFERENCE_LENGTH
            and value.isprintable())


def printable(value, limit=200):
    """`value` as one safe line of at most about `limit` characters, for logs and messages.

    Control and line-break characters (U+0085 and U+2028 included, which some log tools
    split lines on) are escaped, so an attacker-controlled value can neither forge a log
    line nor flood the log.
    """
    text = str(value)
    if len(text) <= limit and text.isprintable():
        return text  # the usual case, without a look at each character
    cut = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                  for c in text[:limit])
    if len(text) > limit:
        cut += f"...({len(text) - limit} more characters)"
    return cut


def mask_phone(number):
    """Hides all but the last four digits: +15558675309 -> +*******5309."""
    if not number:
        return "-"
    text = str(number)
    if len(text) <= 4:
        return "*" * len(text)
    head = "+" if text.startswith("+") else ""
    return head + "*" * (len(text) - len(head) - 4) + text[-4:]


# A phone number inside a longer text (a request's path, /opt-outs/+15558675309).
NUMBER_IN_TEXT = re.compile(r"\+[0-9]{5,15}")


def mask_phones_in(text):
    """`text` with each phone number in it masked as mask_phone does."""
    return NUMBER_IN_TEXT.sub(lambda found: mask_phone(found.group()), text)


def parse_duration(text):
    """Seconds in a duration written <number><s|m|h|d>, like 90d or 10m; ValueError otherwise."""
    match = DURATION_PATTERN.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(
            f"durations are written <number><s|m|h|d>, like 90d, 10m or 0s; got {text!r}"
        )
    seconds = int(match.group(1)) * DURATION_SECONDS[match.group(2)]
    if seconds > MAX_DURATION_SECONDS:
        raise ValueError(f"durations are at most 100 years; got {text!r}")
    return seconds


def whole_number(raw):
    """A number Twilio sends as text (ErrorCode, NumMedia, NumSegments) as an integer, or
    None when absent or not a plain number of at most 9 digits."""
    raw = (raw or "").strip()
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 9 else None


def bearer_token(authorization_header):
    """The key of an `Authorization: Bearer <key>` header, or None."""
    scheme, _, token = (authorization_header or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def destination_allowed(number, allowed_prefixes):
    """True when no prefixes are configured or `number` starts with one of them."""
    return not allowed_prefixes or any(number.startswith(p) for p in allowed_prefixes)
