"""What a status event says and how it is signed: the body is built once, when its status
change is stored, and sent unchanged on every attempt under the same `webhook-id`."""

import json
import secrets
from datetime import datetime, timezone

from standardwebhooks import Webhook

from sms_status import twilio_errors


def new_event_id():
    """A `webhook-id`: unique per event, safe in a URL path."""
    return "evt_" + secrets.token_hex(16)


def event_type(status):
    return f"message.{status}"


def event_body(message, previous_status, changed_at):
    """The JSON body of the event for `message` (a stored row) moving to its latest status
    from `previous_status` (None for the first status stored) at `changed_at`. Never the
    message's body."""
    status = message["latest_status"]
    return json.dumps({
        "type": event_type(status),
        "timestamp": changed_at,
        "data": {
            "sid": message["sid"],
            "status": status,
            "previousStatus": previous_status,
            "errorCode": message["error_code"],
            "errorDescription": twilio_errors.description(message["error_code"]),
            "to": message["to_number"],
            "from": message["from_number"],
            "reference": message["reference"],
            "sentBy": message["sent_by"],
            "createdAt": message["created_at"],
            "updatedAt": message["updated_at"],
        },
    }, separators=(",", ":"))


def number_event_body(type_, data, at):
    """The JSON body of an event about a number: a reply received (`inbound.received`) or a
    change of its opt-out (`recipient.opted_out`, `recipient.opted_in`)."""
    return json.dumps({"type": type_, "timestamp": at, "data": data}, separators=(",", ":"))


def signed_headers(event_id, body, secrets_, now):
    """The headers of one attempt: `webhook-signature` holds one `v1,` signature per secret
    (two while a secret is being rotated), over "id.timestamp.body"."""
    moment = datetime.fromtimestamp(int(now), timezone.utc)
    return {
        "Content-Type": "application/json",
        "webhook-id": event_id,
        "webhook-timestamp": str(int(now)),
        "webhook-signature": " ".join(Webhook(secret).sign(event_id, moment, body)
                                      for secret in secrets_),
    }
