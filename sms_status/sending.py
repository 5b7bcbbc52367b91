"""The /send-sms flow: idempotency keys, abuse limits, the Twilio send, and storing it.

Order matters: a replay of a keyed request is answered before any limit is checked, and
limits are checked before anything reaches Twilio.
"""

import hashlib
import hmac
import json
import logging
import math
from typing import NamedTuple

from flask import Response, current_app, g, jsonify, request

from sms_status import metrics, rules, twilio_api, webhooks
from sms_status.storage import records as db

log = logging.getLogger("sms_status")

MAX_IDEMPOTENCY_KEY_LENGTH = 255
IDEMPOTENCY_KEY_LIFETIME_SECONDS = 24 * 3600


class SendAnswer(NamedTuple):
    """A send's HTTP answer, and whether an Idempotency-Key keeps it for replays (answers
    that say "try again later" are not kept, so a retry with the key can go through)."""

    response: Response
    keep_for_replay: bool


def send_error(status, message, details=None, code=None, retry_after=None):
    """The /send-sms failure shape: {"success": false, "error", "details", "code"}."""
    response = jsonify({"success": False, "error": message, "details": details, "code": code})
    response.status_code = status
    if retry_after:
        response.headers["Retry-After"] = str(retry_after)
    return response


def send_with_idempotency_key(key, payload):
    """Answers a repeat of a keyed request from what was kept, and sends the first one once.

    The key is claimed in SQLite before anything is sent, so two requests with one key
    never both reach Twilio, whichever workers or threads they land on.
    """
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_LENGTH:
        return send_error(400, f"The Idempotency-Key header must be 1 to "
                               f"{MAX_IDEMPOTENCY_KEY_LENGTH} characters")
    config = current_app.config["SERVICE"]
    now = current_app.config["CLOCK"]()
    storage = db.get_db()
    scope = hashlib.sha256((config.api_key or "").encode()).hexdigest()[:32]
    state, kept = db.reserve_idempotency_key(
        storage, scope, key, request_fingerprint(config, payload), now,
        expire_before=now - IDEMPOTENCY_KEY_LIFETIME_SECONDS,
        stale_before=now - 2 * config.twilio_timeout,
    )
    if state == "replay":
        return replayed(*kept)
    if state == "mismatch":
        return send_error(422, "This Idempotency-Key was already used for a different request "
                               "(recipient or body); use a new key for a new message")
    if state == "in_flight":
        return send_error(409, "A request with this Idempotency-Key is still being processed; "
                               "retry in a few seconds to get its answer")
    if state == "stale":
        response = send_error(
            504, "The first request with this Idempotency-Key did not finish",
            details="The message may or may not have been sent; it will not be sent again "
                    "under this key. Check GET /get-status or let reconciliation settle it.",
        )
        db.save_idempotent_response(storage, scope, key, 504, response.get_data(as_text=True))
        return replayed(504, response.get_data(as_text=True))

    try:
        answer = checked_send(payload)
    except Exception:
        if not g.get("twilio_called"):
            # Nothing was sent (a database error, say): free the key so a retry can go ahead.
            try:
                db.release_idempotency_key(storage, scope, key)
            except db.DATABASE_ERRORS as error:
                log.error("Could not release an Idempotency-Key: %s", db.describe_error(error))
        raise
    try:
        if answer.keep_for_replay:
            db.save_idempotent_response(storage, scope, key, answer.response.status_code,
                                        answer.response.get_data(as_text=True))
        else:
            db.release_idempotency_key(storage, scope, key)
    except db.DATABASE_ERRORS as error:
        # The key stays claimed, so a retry is answered as an unknown outcome, never re-sent.
        log.error("Could not keep the answer for an Idempotency-Key: %s",
                  db.describe_error(error))
    return answer.response


def request_fingerprint(config, payload):
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
        material = json.dumps(["raw", request.get_data(as_text=True)])
    secret = (config.api_key or config.auth_token).encode()
    return hmac.new(secret, material.encode(), hashlib.sha256).hexdigest()


def replayed(status_code, body):
    response = current_app.response_class(body, status=status_code, mimetype="application/json")
    response.headers["Idempotent-Replayed"] = "true"
    return response


def checked_send(payload):
    """Validates, applies the abuse limits, then sends; returns a SendAnswer.

    Answers that say "try again later" are not kept under an idempotency key, so a later
    retry with the same key can go through.
    """
    problem = rules.send_request_problem(payload)
    if problem:
        metrics.count_send("invalid")
        return SendAnswer(send_error(400, problem), True)
    config = current_app.config["SERVICE"]
    to = payload["to"]
    if not rules.destination_allowed(to, config.allowed_destinations):
        log.warning("Refused send to %s: outside ALLOWED_DESTINATIONS", rules.mask_phone(to))
        metrics.count_send("destination_refused")
        return SendAnswer(send_error(
            403, "The recipient is outside this service's allowed destinations "
                 f"(ALLOWED_DESTINATIONS={','.join(config.allowed_destinations)})",
        ), True)
    reservation = None
    limit, total = config.max_sends_per_recipient_per_hour, config.max_sends_per_hour
    if limit or total:
        now = current_app.config["CLOCK"]()
        place = db.reserve_send(db.get_db(), to, now, limit, total)
        if place.reservation is None:
            metrics.count_send("limited")
            reached = place.limit_reached
            return SendAnswer(limit_reached(to, reached, limit if reached == "recipient"
                                            else total, place.wait_seconds), False)
        reservation = place.reservation
    return send_and_record(to, payload["body"], reservation, payload.get("reference"))


def limit_reached(to, reached, limit, wait):
    """The 429 of an hourly limit, with the seconds until a place is free again."""
    retry_after = max(1, math.ceil(wait))
    if reached == "recipient":
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
                      retry_after=retry_after)


def release_reservation(reservation):
    """Gives the place back after a send Twilio certainly did not make."""
    try:
        db.release_send(db.get_db(), reservation)
    except db.DATABASE_ERRORS as error:
        # The answer about the send matters more; the reservation expires within the hour.
        log.error("Could not give back a reservation under the hourly limits: %s",
                  db.describe_error(error))


def send_and_record(to, body, reservation=None, reference=None):
    """Sends through Twilio, then stores the message; returns a SendAnswer.

    `reservation` is this send's place under the hourly limits: replaced by the stored
    message on success, given back when Twilio certainly sent nothing, and otherwise
    left counting for the hour it was made for (the outcome is unknown).
    """
    config = current_app.config["SERVICE"]
    # The message's creation time, to the millisecond, on the service's own clock, read as
    # the send starts (Twilio's date_created has whole seconds, on Twilio's clock): sends
    # one after the other list in that order, and the time to delivery is measured on the
    # clock that times the callbacks.
    now = db.stored_time(current_app.config["CLOCK"]())
    g.twilio_called = True
    try:
        message = twilio_api.send_message(current_app.extensions["twilio"], config, to, body)
    except twilio_api.TwilioFailure as failure:
        metrics.count_send("rejected_by_twilio" if failure.http_status == 400
                           else "twilio_failed")
        if reservation is not None and (failure.http_status == 400 or failure.safe_to_retry):
            release_reservation(reservation)
        response = send_error(failure.http_status, failure.error, details=failure.details,
                              code=failure.code, retry_after=failure.retry_after)
        return SendAnswer(response, not failure.safe_to_retry)

    metrics.count_send("sent")
    answer = {"success": True, "messageSid": message.sid, "status": message.status,
              "reference": reference}
    try:
        db.record_sent_message(
            db.get_db(), message.sid,
            account_sid=message.account_sid or config.account_sid,
            # The number the caller asked for, as the per-recipient limit checked it: Twilio
            # may answer with another form of it, which the limit would not count.
            to=to,
            from_=message.from_ or config.phone_number or config.messaging_service_sid,
            body=body if config.store_message_body else None,
            status=message.status, created_at=now, now=now, reservation=reservation,
            reference=reference, events=webhooks.recording(current_app),
        )
        webhooks.nudge(current_app)
    except db.DATABASE_ERRORS as error:
        log.error("Message %s was sent but could not be stored: %s", message.sid,
                  db.describe_error(error))
        answer["warning"] = (
            "Twilio accepted the message but this service could not confirm that it recorded "
            "it; do not send it again. Its status callbacks are stored once the database "
            "recovers."
        )
    log.info("Sent %s to %s: %s", message.sid, rules.mask_phone(to), message.status)
    return SendAnswer(jsonify(answer), True)
