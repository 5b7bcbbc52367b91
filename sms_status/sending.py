"""The /send-sms flow: idempotency keys, abuse limits, the Twilio send, and storing it.

Plain inputs in, a SendOutcome out: the flow reads no request and builds no response, so it
runs the same without Flask. web/send.py reads the request and turns the outcome into the
HTTP answer.

Order matters: a replay of a keyed request is answered before any limit is checked, a
recipient who opted out is refused before the limits count the send, and limits are
checked before anything reaches Twilio.
"""

import dataclasses
import hashlib
import hmac
import json
import logging
import math
from typing import Any, Callable, NamedTuple

from sms_status import metrics, rules, twilio_api
from sms_status.storage import DATABASE_ERRORS, opt_outs, sends, statuses, times

log = logging.getLogger("sms_status")

MAX_IDEMPOTENCY_KEY_LENGTH = 255
IDEMPOTENCY_KEY_LIFETIME_SECONDS = 24 * 3600


@dataclasses.dataclass(frozen=True)
class SendOutcome:
    """What a send came to: the answer's status, its JSON body and extra headers.

    `replayable`: whether an Idempotency-Key keeps this answer for replays (answers that say
    "try again later" are not kept, so a retry with the key can go through).
    `twilio_called`: whether this request asked Twilio to send.
    `kept_text`: a replay's answer, exactly as it was kept.
    """

    status: int
    body: dict
    headers: dict = dataclasses.field(default_factory=dict)
    replayable: bool = True
    twilio_called: bool = False
    kept_text: str | None = None

    @property
    def text(self):
        """The body as it is answered: a replay's kept text, else the body as JSON."""
        return self.kept_text if self.kept_text is not None else json_text(self.body)


def json_text(body):
    """An answer's JSON text, as Flask's jsonify writes it: compact, keys sorted, ASCII,
    a final newline."""
    return json.dumps(body, separators=(",", ":"), sort_keys=True) + "\n"


def send_error(status, error, details=None, code=None, retry_after=None, replayable=True):
    """The /send-sms failure shape: {"success": false, "error", "details", "code"}."""
    headers = {"Retry-After": str(retry_after)} if retry_after else {}
    body = {"success": False, "error": error, "details": details, "code": code}
    return SendOutcome(status, body, headers, replayable)


@dataclasses.dataclass(frozen=True)
class SendContext:
    """What a send uses: the configuration, the storage engine, the Twilio client, the
    clock, the status webhooks' delivery loop (None while they are off), and the key of
    the caller (an api_keys.Key; None when the service runs without API_KEY)."""

    config: Any
    storage: Any
    twilio: Any
    clock: Callable[[], float]
    webhooks: Any = None
    sender: Any = None


class Ready(NamedTuple):
    """A send that passed every check, with its place under the hourly limits (or None)."""

    to: str
    body: str
    reference: str | None
    reservation: int | None


def send_sms(context, payload, raw_body=b"", idempotency_key=None):
    """Answers one POST /send-sms: `payload` is the parsed JSON body (None when it is not
    JSON), `raw_body` the body's bytes, `idempotency_key` the header's value or None.

    Raises the storage's DATABASE_ERRORS when the database fails before Twilio is asked.
    """
    if idempotency_key is None:
        return checked_send(context, payload)
    return send_with_idempotency_key(context, idempotency_key, payload, raw_body)


def send_with_idempotency_key(context, key, payload, raw_body=b""):
    """Answers a repeat of a keyed request from what was kept, and sends the first one once.

    The key is claimed in the database before anything is sent, so two requests with one
    key never both reach Twilio, whichever workers or threads they land on.
    """
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_LENGTH:
        return send_error(400, f"The Idempotency-Key header must be 1 to "
                               f"{MAX_IDEMPOTENCY_KEY_LENGTH} characters", replayable=False)
    config, storage = context.config, context.storage
    now = context.clock()
    scope = hashlib.sha256((config.api_key or "").encode()).hexdigest()[:32]
    state, kept = sends.reserve_idempotency_key(
        storage, scope, key, request_fingerprint(config, payload, raw_body), now,
        expire_before=now - IDEMPOTENCY_KEY_LIFETIME_SECONDS,
        stale_before=now - 2 * config.twilio_timeout,
    )
    if state == "replay":
        return replayed(*kept)
    if state == "mismatch":
        return send_error(422, "This Idempotency-Key was already used for a different request "
                               "(recipient or body); use a new key for a new message",
                          replayable=False)
    if state == "in_flight":
        return send_error(409, "A request with this Idempotency-Key is still being processed; "
                               "retry in a few seconds to get its answer", replayable=False)
    if state == "stale":
        unknown = send_error(
            504, "The first request with this Idempotency-Key did not finish",
            details="The message may or may not have been sent; it will not be sent again "
                    "under this key. Check GET /get-status or let reconciliation settle it.",
        )
        sends.save_idempotent_response(storage, scope, key, 504, unknown.text)
        return replayed(504, unknown.text)

    try:
        checked = check_send(context, payload)
    except Exception:
        # Nothing was sent (a database error, say): free the key so a retry can go ahead.
        try:
            sends.release_idempotency_key(storage, scope, key)
        except DATABASE_ERRORS as error:
            log.error("Could not release an Idempotency-Key: %s", storage.describe_error(error))
        raise
    # Past this point Twilio may have been asked: whatever happens, the key stays claimed.
    outcome = checked if isinstance(checked, SendOutcome) else send_and_record(context, checked)
    try:
        if outcome.replayable:
            sends.save_idempotent_response(storage, scope, key, outcome.status, outcome.text)
        else:
            sends.release_idempotency_key(storage, scope, key)
    except DATABASE_ERRORS as error:
        # The key stays claimed, so a retry is answered as an unknown outcome, never re-sent.
        log.error("Could not keep the answer for an Idempotency-Key: %s",
                  storage.describe_error(error))
    return outcome


def request_fingerprint(config, payload, raw_body=b""):
    """A keyed hash of the request's shape, recipient and body: bodies (one-time codes) are
    not kept in clear.

    The shape (a JSON object and its field names, or the raw body) and the reference are
    part of it, so a raw
    body like `["+15558675309", "hi"]` never matches the object with those values. Keyed
    with the API key, whose change starts a new key scope anyway.
    """
    if isinstance(payload, dict):
        fields = ["object", sorted(payload), payload.get("to"), payload.get("body")]
        if "reference" in payload:  # so a key's fingerprint from before references holds
            fields.append(payload["reference"])
        material = json.dumps(fields)
    else:
        material = json.dumps(["raw", raw_body.decode(errors="replace")])
    secret = (config.api_key or config.auth_token).encode()
    return hmac.new(secret, material.encode(), hashlib.sha256).hexdigest()


def replayed(status, text):
    """The answer kept under an Idempotency-Key, answered again exactly as it was."""
    return SendOutcome(status, json.loads(text), {"Idempotent-Replayed": "true"},
                       kept_text=text)


def checked_send(context, payload):
    """Validates, applies the abuse limits, then sends; returns a SendOutcome."""
    checked = check_send(context, payload)
    if isinstance(checked, SendOutcome):
        return checked
    return send_and_record(context, checked)


def check_send(context, payload):
    """Validates and applies the abuse limits: a SendOutcome refusing the send, or Ready.

    Answers that say "try again later" are not kept under an idempotency key, so a later
    retry with the same key can go through.
    """
    problem = rules.send_request_problem(payload)
    if problem:
        metrics.count_send("invalid")
        return send_error(400, problem)
    config = context.config
    to = payload["to"]
    if not rules.destination_allowed(to, config.allowed_destinations):
        log.warning("Refused send to %s: outside ALLOWED_DESTINATIONS", rules.mask_phone(to))
        metrics.count_send("destination_refused")
        return send_error(403, "The recipient is outside this service's allowed destinations "
                               f"(ALLOWED_DESTINATIONS={','.join(config.allowed_destinations)})")
    opted_out = opt_outs.opt_out_of(context.storage, to)
    if opted_out is not None:
        metrics.count_send("opted_out")
        return opted_out_refusal(to, opted_out["source"], opted_out["opted_out_at"])
    reservation = None
    limit, total = config.max_sends_per_recipient_per_hour, config.max_sends_per_hour
    sender = context.sender
    own_limit = sender.max_sends_per_hour if sender is not None else None
    if limit or total or own_limit is not None:
        place = sends.reserve_send(context.storage, to, context.clock(), limit, total,
                                   sender=sender and sender.name, sender_limit=own_limit)
        if place.reservation is None:
            metrics.count_send("limited")
            reached = place.limit_reached
            return limit_reached(to, reached, {"recipient": limit, "total": total,
                                               "sender": own_limit}[reached],
                                 place.wait_seconds, sender)
        reservation = place.reservation
    return Ready(to, payload["body"], payload.get("reference"), reservation)


# How each source of an opt-out is told in a refusal.
OPT_OUT_HOW = {
    "keyword": "the recipient replied with an opt-out keyword such as STOP; only their START "
               "ends it",
    "twilio": "Twilio reported that the recipient unsubscribed (error 21610); only their START "
              "ends it",
    "api": "it was recorded through PUT /opt-outs; DELETE /opt-outs/<number> ends it",
}


def opted_out_refusal(to, source, opted_out_at):
    """The 400 of a send to a recipient who opted out, as Twilio's own refusal (21610), with
    when and how; Twilio is not asked. Kept under an Idempotency-Key, as Twilio's is."""
    log.info("Refused send to %s: opted out (%s) at %s", rules.mask_phone(to), source,
             opted_out_at)
    outcome = send_error(
        400, "Attempt to send to unsubscribed recipient: this number opted out",
        details=f"The recipient opted out at {opted_out_at}: {OPT_OUT_HOW[source]}. No SMS "
                "was sent. GET /opt-outs/<number> shows its history.",
        code=statuses.OPTED_OUT_ERROR)
    return dataclasses.replace(outcome, body={**outcome.body, "optedOutAt": opted_out_at})


def limit_reached(to, reached, limit, wait, sender=None):
    """The 429 of an hourly limit, with the seconds until a place is free again."""
    # Never past the hour the limit counts: a send stored a fraction of a millisecond late
    # (stored times keep milliseconds) would otherwise read 3601.
    retry_after = min(max(1, math.ceil(wait)), 3600)
    if reached == "sender":
        log.warning("Refused send to %s: key %s reached its limit of %d sends per hour",
                    rules.mask_phone(to), sender.name, limit)
        message = (f"The key {sender.name!r} already has {limit} messages sent or being sent "
                   f"in the last hour, its own limit (keys create --max-sends-per-hour)")
    elif reached == "recipient":
        log.warning("Refused send to %s: MAX_SENDS_PER_RECIPIENT_PER_HOUR=%d reached",
                    rules.mask_phone(to), limit)
        message = (f"This recipient already has {limit} messages sent or being sent in the "
                   f"last hour, the limit (MAX_SENDS_PER_RECIPIENT_PER_HOUR={limit})")
    else:
        log.warning("Refused send to %s: MAX_SENDS_PER_HOUR=%d reached for the whole service",
                    rules.mask_phone(to), limit)
        message = (f"This service already has {limit} messages sent or being sent in the "
                   f"last hour, its limit for all recipients (MAX_SENDS_PER_HOUR={limit})")
    return send_error(429, f"{message}; retry after {retry_after} seconds",
                      retry_after=retry_after, replayable=False)


def release_reservation(storage, reservation):
    """Gives the place back after a send Twilio certainly did not make."""
    try:
        sends.release_send(storage, reservation)
    except DATABASE_ERRORS as error:
        # The answer about the send matters more; the reservation expires within the hour.
        log.error("Could not give back a reservation under the hourly limits: %s",
                  storage.describe_error(error))


def record_twilio_opt_out(storage, to):
    """Twilio refused a send with 21610 (the recipient replied STOP to Twilio): the number
    is opted out here too, so the next send is refused before Twilio."""
    try:
        if opt_outs.record_opt_out(storage, to, "twilio"):
            log.info("Opted %s out: Twilio refused a send with 21610", rules.mask_phone(to))
    except DATABASE_ERRORS as error:
        # Twilio's answer still reaches the caller; the next refusal records it again.
        log.error("Could not record the opt-out Twilio reported: %s",
                  storage.describe_error(error))


def send_and_record(context, ready):
    """Sends through Twilio, then stores the message; returns a SendOutcome.

    `ready.reservation` is this send's place under the hourly limits: replaced by the
    stored message on success, given back when Twilio certainly sent nothing, and otherwise
    left counting for the hour it was made for (the outcome is unknown).
    """
    config, storage = context.config, context.storage
    to, reservation = ready.to, ready.reservation
    # The message's creation time, to the millisecond, on the service's own clock, read as
    # the send starts (Twilio's date_created has whole seconds, on Twilio's clock): sends
    # one after the other list in that order, and the time to delivery is measured on the
    # clock that times the callbacks.
    now = times.stored_time(context.clock())
    try:
        message = twilio_api.send_message(context.twilio, config, to, ready.body)
    except twilio_api.TwilioFailure as failure:
        metrics.count_send("rejected_by_twilio" if failure.http_status == 400
                           else "twilio_failed")
        if reservation is not None and (failure.http_status == 400 or failure.safe_to_retry):
            release_reservation(storage, reservation)
        if failure.code == statuses.OPTED_OUT_ERROR:
            record_twilio_opt_out(storage, to)
        outcome = send_error(failure.http_status, failure.error, details=failure.details,
                             code=failure.code, retry_after=failure.retry_after,
                             replayable=not failure.safe_to_retry)
        return dataclasses.replace(outcome, twilio_called=True)

    metrics.count_send("sent")
    answer = {"success": True, "messageSid": message.sid, "status": message.status,
              "reference": ready.reference}
    try:
        statuses.record_sent_message(
            storage, message.sid,
            account_sid=message.account_sid or config.account_sid,
            # The number the caller asked for, as the per-recipient limit checked it: Twilio
            # may answer with another form of it, which the limit would not count.
            to=to,
            from_=message.from_ or config.phone_number or config.messaging_service_sid,
            body=ready.body if config.store_message_body else None,
            status=message.status, created_at=now, now=now, reservation=reservation,
            reference=ready.reference, sent_by=context.sender and context.sender.name,
        )
        if context.webhooks is not None:
            context.webhooks.nudge()
    except DATABASE_ERRORS as error:
        log.error("Message %s was sent but could not be stored: %s", message.sid,
                  storage.describe_error(error))
        answer["warning"] = (
            "Twilio accepted the message but this service could not confirm that it recorded "
            "it; do not send it again. Its status callbacks are stored once the database "
            "recovers."
        )
    log.info("Sent %s to %s: %s", message.sid, rules.mask_phone(to), message.status)
    return SendOutcome(200, answer, twilio_called=True)
