"""A simulated Twilio: a transport for the real twilio library, and status callbacks.

`SimulatedTwilio` is a `twilio.http.HttpClient`, so every API call still goes through
the twilio library; only the HTTP exchange is answered here, the way Twilio's
Messages API answers it. After a create it delivers the message's status callbacks
over real HTTP to the given StatusCallback URL, signed with the configured auth
token like Twilio's, from a background thread that never holds up the request.

The recipient decides the outcome (see OUTCOMES and SEND_ERRORS). The outcome is also
written into the last character of the message SID, so that a fetch in another
process (reconciliation) can answer with the final status the recipient determined.
"""

import heapq
import itertools
import json
import logging
import os
import re
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from email.utils import format_datetime

import requests
from requests.adapters import HTTPAdapter
from twilio.http import HttpClient
from twilio.http.response import Response
from twilio.request_validator import RequestValidator

log = logging.getLogger("sms_status")

# Twilio's test-credential numbers that fail at send time, with Twilio's errors.
SEND_ERRORS = {
    "+15005550001": (21211, "The 'To' number +15005550001 is not a valid phone number."),
    "+15005550002": (21612, "The 'To' phone number is not currently reachable via SMS."),
    "+15005550003": (21408, "Permission to send an SMS has not been enabled for the region "
                            "indicated by the 'To' number: +15005550003."),
    "+15005550004": (21610, "Attempt to send to unsubscribed recipient"),
    "+15005550009": (21614, "'To' number is not a valid mobile number"),
}

# Final status and error code by recipient; every other number is delivered.
OUTCOMES = {
    "0": ("delivered", None),
    "1": ("undelivered", 30003),
    "2": ("failed", 30008),
}
OUTCOME_BY_NUMBER = {"+15005551003": "1", "+15005551008": "2"}

CALLBACK_STEP_SECONDS = 0.25
CALLBACK_TIMEOUT_SECONDS = 10
CALLBACK_SENDERS = 8  # threads per process posting due callbacks

# The number a simulated Messaging Service sends from: Twilio's status callbacks name the
# number the service chose, never the service itself.
SIMULATED_SERVICE_NUMBER = "+15005550006"

MESSAGES_PATH = re.compile(r"/Accounts/(AC[0-9a-fA-F]{32})/Messages(?:/(\w+))?\.json$")


def _rfc2822_now():
    return format_datetime(datetime.now(timezone.utc).replace(microsecond=0))


def _json_response(status, payload):
    return Response(status, json.dumps(payload), {"Content-Type": "application/json"})


def _error(status, code, message):
    return _json_response(status, {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    })


def _message_resource(account_sid, sid, status, to, from_, body, service_sid, error_code=None):
    now = _rfc2822_now()
    return {
        "account_sid": account_sid,
        "api_version": "2010-04-01",
        "body": body,
        "date_created": now,
        "date_sent": None,
        "date_updated": now,
        "direction": "outbound-api",
        "error_code": error_code,
        "error_message": None,
        "from": from_,
        "messaging_service_sid": service_sid,
        "num_media": "0",
        "num_segments": "1",
        "price": None,
        "price_unit": "USD",
        "sid": sid,
        "status": status,
        "subresource_uris": {
            "media": f"/2010-04-01/Accounts/{account_sid}/Messages/{sid}/Media.json"
        },
        "to": to,
        "uri": f"/2010-04-01/Accounts/{account_sid}/Messages/{sid}.json",
    }


class SimulatedTwilio(HttpClient):
    """Answers the Messages API like Twilio and sends signed status callbacks."""

    def __init__(self, account_sid, auth_token, latency=0.0, step_seconds=CALLBACK_STEP_SECONDS,
                 send_callbacks=True):
        super().__init__(logging.getLogger("sms_status.simulator"), is_async=False)
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.latency = latency
        self.step_seconds = step_seconds
        self.send_callbacks = send_callbacks
        self.validator = RequestValidator(auth_token)
        # Callbacks wait in a schedule served by one thread and a few senders on one pooled
        # session, not a thread and a new connection each: the simulator runs in the worker,
        # sharing its CPU and GIL, while real Twilio sends callbacks from its own machines.
        # All of it is made on first use in each process, since gunicorn forks workers.
        self._due, self._order, self._due_changed = [], itertools.count(), threading.Condition()
        self._pid = None

    def request(self, method, uri, params=None, data=None, headers=None, auth=None,
                timeout=None, allow_redirects=False):
        if self.latency:
            time.sleep(self.latency)
        if auth != (self.account_sid, self.auth_token):
            return _error(401, 20003, "Authenticate")
        match = MESSAGES_PATH.search(uri)
        if match is None or match.group(1) != self.account_sid:
            return _error(404, 20404, "The requested resource was not found")
        if method.upper() == "POST" and match.group(2) is None:
            return self._create(data or {})
        if method.upper() == "GET" and match.group(2):
            return self._fetch(match.group(2))
        return _error(405, 20004, "Method not allowed")

    def _create(self, data):
        to = data.get("To")
        body = data.get("Body")
        from_ = data.get("From")
        service_sid = data.get("MessagingServiceSid")
        if not to:
            return _error(400, 21604, "A 'To' phone number is required.")
        if not body:
            return _error(400, 21602, "Message body is required.")
        if not from_ and not service_sid:
            return _error(400, 21603, "A 'From' phone number is required.")
        if to in SEND_ERRORS:
            code, message = SEND_ERRORS[to]
            return _error(400, code, message)
        outcome = OUTCOME_BY_NUMBER.get(to, "0")
        sid = "SM" + secrets.token_hex(16)[:31] + outcome
        initial = "accepted" if service_sid else "queued"
        resource = _message_resource(
            self.account_sid, sid, initial, to, from_, body, service_sid
        )
        callback_url = data.get("StatusCallback")
        if callback_url and self.send_callbacks:
            final_status, _ = OUTCOMES[outcome]
            steps = (["queued"] if initial == "accepted" else []) + ["sent", final_status]
            self._schedule((callback_url, sid, to, from_ or SIMULATED_SERVICE_NUMBER, outcome,
                            steps))
        return _json_response(201, resource)

    def _fetch(self, sid):
        outcome = OUTCOMES.get(sid[-1:])
        if not sid.startswith("SM") or len(sid) != 34 or outcome is None:
            return _error(404, 20404, f"The requested resource /Messages/{sid}.json was not found")
        status, error_code = outcome
        return _json_response(200, _message_resource(
            self.account_sid, sid, status, None, None, None, None, error_code
        ))

    def _schedule(self, delivery):
        """Queues the delivery's next callback to be posted in step_seconds."""
        with self._due_changed:
            if self._pid != os.getpid():  # first use in this process
                self._pid, self._due = os.getpid(), []
                self._session = requests.Session()
                self._session.trust_env = False  # no proxy or .netrc look-ups per callback
                self._session.mount("http://", HTTPAdapter(pool_maxsize=CALLBACK_SENDERS))
                self._session.mount("https://", HTTPAdapter(pool_maxsize=CALLBACK_SENDERS))
                self._senders = ThreadPoolExecutor(CALLBACK_SENDERS)
                threading.Thread(target=self._run_schedule, daemon=True).start()
            due = time.monotonic() + self.step_seconds
            heapq.heappush(self._due, (due, next(self._order), delivery))
            self._due_changed.notify()

    def _run_schedule(self):
        while True:
            with self._due_changed:
                while not self._due or self._due[0][0] > time.monotonic():
                    self._due_changed.wait(
                        self._due[0][0] - time.monotonic() if self._due else None)
                _, _, delivery = heapq.heappop(self._due)
            try:
                self._senders.submit(self._deliver_next, delivery)
            except RuntimeError:  # the interpreter is shutting down
                return

    def _deliver_next(self, delivery):
        url, sid, to, from_, outcome, steps = delivery
        try:
            self._post_callback(url, sid, to, from_, outcome, steps[0])
        except Exception:  # never lose the rest of a message's callbacks silently
            log.exception("Simulated callback %s %s could not be sent", sid, steps[0])
        if steps[1:]:
            self._schedule((url, sid, to, from_, outcome, steps[1:]))

    def _post_callback(self, url, sid, to, from_, outcome, status):
        final_status, error_code = OUTCOMES[outcome]
        params = {
            "MessageSid": sid,
            "SmsSid": sid,
            "MessageStatus": status,
            "SmsStatus": status,
            "AccountSid": self.account_sid,
            "From": from_,
            "To": to,
            "ApiVersion": "2010-04-01",
        }
        if status == final_status and error_code:
            params["ErrorCode"] = str(error_code)
        headers = {"X-Twilio-Signature": self.validator.compute_signature(url, params)}
        for attempt in (1, 2):
            try:
                answer = self._session.post(url, data=params, headers=headers,
                                            timeout=CALLBACK_TIMEOUT_SECONDS)
            except requests.ConnectionError as exc:
                # A kept-alive connection the server had just closed: try once more.
                if attempt == 1:
                    continue
                log.warning("Simulated callback %s %s failed: %s",
                            sid, status, exc.__class__.__name__)
                return
            except requests.RequestException as exc:
                log.warning("Simulated callback %s %s failed: %s",
                            sid, status, exc.__class__.__name__)
                return
            if answer.status_code != 200:
                log.warning("Simulated callback %s %s answered %s",
                            sid, status, answer.status_code)
            return


def post_reply(base_url, account_sid, auth_token, from_, to, body,
               timeout=CALLBACK_TIMEOUT_SECONDS):
    """Posts a message from `from_` to `to` to the service at `base_url`, as Twilio's
    incoming-message webhook does, signed with `auth_token`; returns (its SID, the answer)."""
    sid = "SM" + secrets.token_hex(16)
    params = {"MessageSid": sid, "SmsMessageSid": sid, "SmsSid": sid, "AccountSid": account_sid,
              "From": from_, "To": to, "Body": body, "NumMedia": "0", "NumSegments": "1",
              "SmsStatus": "received", "ApiVersion": "2010-04-01"}
    url = base_url + "/inbound-sms"
    headers = {"X-Twilio-Signature": RequestValidator(auth_token).compute_signature(url, params)}
    return sid, requests.post(url, data=params, headers=headers, timeout=timeout)

