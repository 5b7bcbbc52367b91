"""The service's one home for Twilio's REST API: the client, and its errors in our terms.

Every Twilio failure becomes a TwilioFailure carrying the HTTP status this service
answers with, so callers can tell whose fault it was: theirs (400), this server's
or Twilio's (502), a rate limit (503), or an unknown outcome (504).
"""

import logging
import time

import requests
from twilio.base.exceptions import TwilioException
from twilio.http.http_client import TwilioHttpClient
from twilio.rest import Client

from sms_status import metrics
from sms_status.rules import mask_phone
from sms_status.simulator import SimulatedTwilio

log = logging.getLogger("sms_status")

RETRY_AFTER_SECONDS = 5


class TwilioFailure(Exception):
    """A Twilio call that did not succeed, as this service reports it.

    `safe_to_retry` is True only when Twilio certainly sent nothing and a later retry
    may work (rate limits, this server's credentials); after a timeout or a 5xx the
    message may have gone out, so it is False.
    """

    def __init__(self, http_status, error, details, code=None, retry_after=None,
                 safe_to_retry=False, not_found=False):
        super().__init__(details)
        self.http_status = http_status
        self.error = error
        self.details = details
        self.code = code
        self.retry_after = retry_after
        self.safe_to_retry = safe_to_retry
        self.not_found = not_found


def build_client(config, http_client=None):
    """One Twilio client per process; the transport always has a timeout."""
    if http_client is None:
        if config.simulate:
            http_client = SimulatedTwilio(
                config.account_sid, config.auth_token, latency=config.simulate_latency
            )
        else:
            http_client = TwilioHttpClient(timeout=config.twilio_timeout)
    return Client(config.account_sid, config.auth_token, http_client=http_client)


def _twilio_message(exc):
    text = getattr(exc, "msg", None) or getattr(exc, "detail", None) or getattr(exc, "title", None)
    return str(text or exc.__class__.__name__)


def translate(exc, fetching=False):
    """Maps an exception from a Twilio call (a send, or with `fetching` a message fetch) to
    a TwilioFailure."""
    if fetching:
        unknown = " The message's status was not read; the next run asks again."
    else:
        unknown = " The message may or may not have been sent: check before sending again."
    if isinstance(exc, requests.Timeout):
        if not fetching:
            unknown = (" The message may or may not have been sent: check GET /get-status or "
                       "wait for its status callback before sending again.")
        return TwilioFailure(
            504, "Twilio did not answer in time", "No answer within TWILIO_TIMEOUT." + unknown,
        )
    if isinstance(exc, requests.RequestException):
        return TwilioFailure(
            502, "Could not reach Twilio", "The connection to Twilio's API failed." + unknown,
        )
    if isinstance(exc, (ValueError, TypeError, AttributeError)):
        return TwilioFailure(
            502, "Twilio's answer could not be read",
            "Twilio answered with a body that is not a message resource." + unknown,
        )
    status = getattr(exc, "status", None)
    code = getattr(exc, "code", None)
    # Twilio's error codes have five digits; for a non-JSON error the library puts the
    # HTTP status there instead, which is not a Twilio code.
    code = code if isinstance(code, int) and code >= 10000 else None
    message = _twilio_message(exc)
    if status == 404 and fetching:
        return TwilioFailure(
            404, "Twilio has no such message",
            "This account has no message with this SID (sent by another account?); it will "
            "not be asked for again.", code, not_found=True,
        )
    if status in (400, 422):
        return TwilioFailure(400, "Twilio rejected the message", message, code)
    if status in (401, 403, 404):
        return TwilioFailure(
            502, "Twilio rejected this service's credentials or account",
            "The request was fine; the service is misconfigured. The operator should check "
            "TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN and the sender.",
            code, safe_to_retry=True,
        )
    if status == 429:
        return TwilioFailure(
            503, "Twilio is rate limiting this account", message, code,
            retry_after=RETRY_AFTER_SECONDS, safe_to_retry=True,
        )
    return TwilioFailure(
        502, "Twilio failed to process the request", f"{message}.{unknown}", code,
    )


def _call(action, what, fetching=False):
    started = time.perf_counter()
    try:
        return action()
    except (TwilioException, requests.RequestException, ValueError, TypeError,
            AttributeError) as exc:
        failure = translate(exc, fetching)
        log.warning(
            "Twilio %s failed: status=%s code=%s answered=%s (%s): %s",
            what, getattr(exc, "status", None), failure.code, failure.http_status,
            exc.__class__.__name__, failure.error,
        )
        raise failure from exc
    finally:
        metrics.observe_twilio_call("fetch" if fetching else "create",
                                    time.perf_counter() - started)


def send_message(client, config, to, body):
    """Creates the message with a per-message status callback; raises TwilioFailure.

    Never retried here: after a timeout or 5xx Twilio may already have sent it.
    """
    sender = (
        {"messaging_service_sid": config.messaging_service_sid}
        if config.messaging_service_sid
        else {"from_": config.phone_number}
    )
    message = _call(
        lambda: client.messages.create(
            to=to, body=body, status_callback=config.status_callback_url, **sender
        ),
        f"message create to {mask_phone(to)}",
    )
    if not isinstance(message.sid, str) or not isinstance(message.status, str):
        raise translate(ValueError("no sid or status in Twilio's answer"))
    return message


def fetch_message(client, sid):
    """Fetches one message resource from Twilio; raises TwilioFailure."""
    message = _call(lambda: client.messages(sid).fetch(), "message fetch", fetching=True)
    if not isinstance(message.status, str):
        raise translate(ValueError("no status in Twilio's answer"), fetching=True)
    return message
