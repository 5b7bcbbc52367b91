"""What requests pass before their route runs: the key and its scope (`@requires`, one line
on each route), the guards of Twilio's webhooks (their field count, Twilio's signature, NUL
characters; check_twilio_webhook runs them in that order), and checks of the body that
protect the rest (its size, its arrival, NUL characters).

Each is a plain function that does nothing or refuses. The body's checks raise an HTTP error
with a message for the caller, which errors.py answers; a webhook's guards and a key without
the scope return their refusal. Which run is web/__init__.py's, callbacks.py's and
inbound.py's.
"""

from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps

from flask import abort, current_app, g, jsonify, request
from twilio.request_validator import SIGNATURE_SETTINGS_HEADER, get_signature_algorithm
from werkzeug.datastructures import WWWAuthenticate
from werkzeug.exceptions import BadRequest, ClientDisconnected, Unauthorized

from sms_status import rules
from sms_status.rules import printable
from sms_status.services import get_db, services
from sms_status.web.logs import log, logged_path, warn_rejection

MAX_REQUEST_BYTES = 64 * 1024
# Twilio's webhooks (status callbacks, inbound messages) carry about 20 form fields.
MAX_CALLBACK_FIELDS = 100


def requires(scope):
    """The route needs a key with `scope` ("send", "read" or "admin"): callers send
    `Authorization: Bearer <key>`, API_KEY's or a named key's (api_keys.py).

    A missing, wrong or revoked key gets 401; a valid key without the scope, 403 naming
    it. The key is `g.api_key` for the route. Without API_KEY (allowed only when
    simulating) the route is open, whatever the request carries.
    """

    def decorate(view):
        @wraps(view)
        def checked(*args, **kwargs):
            if current_app.config["SERVICE"].api_key:
                key = caller_key()
                if scope not in key.scopes:
                    warn_rejection("Refused %s %s: key %s has no %r scope", request.method,
                                   logged_path(), key.name, scope)
                    return jsonify(error=f"The key {key.name!r} may not do this: it needs the "
                                         f"{scope!r} scope. Use a key that has it (flask --app "
                                         f"app keys create NAME --scope {scope} makes one)",
                                   requiredScope=scope), 403
                g.api_key = key
            return view(*args, **kwargs)

        return checked

    return decorate


def caller_key():
    """The active key of the request's `Authorization: Bearer <key>` header; else 401."""
    token = rules.bearer_token(request.headers.get("Authorization"))
    key = None
    if token:
        key = services().keys.key_for(get_db(), token, current_app.config["CLOCK"]())
    if key is None:
        raise Unauthorized("Missing, wrong or revoked API key: send the header "
                           "'Authorization: Bearer <key>' with API_KEY or a key from "
                           "'flask --app app keys create'",
                           www_authenticate=WWWAuthenticate("Bearer"))
    return key


@dataclass(frozen=True)
class TwilioWebhook:
    """One of Twilio's webhooks, as its guards speak of it: its `name` in the log ("status
    callback") and `count_refusal(reason)`, which counts a refusal ("bad_signature" or
    "invalid") in its own metric."""

    name: str
    count_refusal: Callable[[str], None]

    @property
    def article(self):
        return "An" if self.name[0] in "aeiou" else "A"


def check_twilio_webhook(webhook):
    """Runs a Twilio webhook's guards in order, before its view: returns the first refusal
    (a JSON error response), or None to let the request through.

    In this order: counting the fields costs nothing and bounds what the signature parses
    and signs; NUL characters only once the signature holds, so an unsigned request always
    gets 403. The refusals are answered as values, not raised: an unsigned flood is the
    path this runs most, and an exception through Flask's handlers cost a tenth of it
    (docs/performance.md).
    """
    if request.method == "OPTIONS":
        return None  # Flask answers it with the Allow header; nothing is read or stored
    for guard in (refuse_too_many_fields, require_twilio_signature,
                  refuse_nul_characters_in_webhook):
        refused = guard(webhook)
        if refused is not None:
            return refused
    return None


def refusal(status, message):
    return jsonify(error=message), status


def refuse_too_many_fields(webhook):
    """A webhook with more form fields than Twilio ever sends is refused with 400.

    They are counted without parsing them: parsing and signing thousands of fields is what
    an unsigned flood would cost otherwise.
    """
    if form_fields() > MAX_CALLBACK_FIELDS:
        webhook.count_refusal("invalid")
        return refusal(400, f"{webhook.article} {webhook.name} has at most "
                            f"{MAX_CALLBACK_FIELDS} form fields (Twilio sends about 20)")
    return None


def require_twilio_signature(webhook):
    """The request must be signed by Twilio (see signed_by_twilio): else 403."""
    if signed_by_twilio(webhook):
        return None
    webhook.count_refusal("bad_signature")
    return refusal(403, "Invalid Twilio signature")


def refuse_nul_characters_in_webhook(webhook):
    """refuse_nul_characters for a webhook, counted as an invalid one."""
    try:
        refuse_nul_characters()
    except BadRequest as error:
        webhook.count_refusal("invalid")
        return refusal(400, error.description)
    return None


def form_fields():
    """How many fields the request's form has, counted without parsing it."""
    if request.mimetype == "application/x-www-form-urlencoded":
        body = request.get_data(cache=True)
        return body.count(b"&") + 1 if body else 0
    return 0  # other bodies are parsed with Flask's MAX_FORM_PARTS as the bound


def signed_by_twilio(webhook):
    """Checks X-Twilio-Signature for the exact URL Twilio called and every form parameter.

    Signed with the auth token, or, when X-Twilio-Webhooks-Signature-Settings is present,
    with the shared key in TWILIO_WEBHOOK_SIGNING_KEY and the algorithm the header names.
    Fails closed: no setting skips the check.
    """
    url = current_app.config["SERVICE"].base_url + request.path
    if request.query_string:
        url += "?" + request.query_string.decode("utf-8", "replace")
    signature = request.headers.get("X-Twilio-Signature", "")
    settings = request.headers.get(SIGNATURE_SETTINGS_HEADER, "")
    if not settings:
        if services().validator.validate(url, request.form, signature):
            return True
        warn_rejection("Rejected %s: invalid Twilio signature for %s", webhook.name,
                       printable(url))
        return False

    # The header is the caller's: only shortened and escaped copies of it reach the log.
    key_id = printable(next((part.strip()[4:] for part in settings.split(",")
                             if part.strip().startswith("key=")), "?"), 60)
    validator = services().shared_key_validator
    if validator is None:
        warn_rejection("Rejected %s signed with shared key %s: set "
                       "TWILIO_WEBHOOK_SIGNING_KEY to that key's secret to accept it",
                       webhook.name, key_id)
        return False
    algorithm = get_signature_algorithm(settings)
    if validator.validate(url, request.form, signature, algorithm=algorithm):
        log.debug("%s signed with shared key %s (%s)", webhook.name.capitalize(), key_id,
                  printable(algorithm, 30))
        return True
    warn_rejection("Rejected %s: invalid %s signature (shared key %s) for %s", webhook.name,
                   printable(algorithm, 30), key_id, printable(url))
    return False


def read_whole_body():
    """Reads the body before anything parses it: a chunked body has no Content-Length, and
    Werkzeug stops reading it at the limit without an error, which would cut it silently."""
    if request.method != "POST":
        return
    try:
        body = request.get_data(cache=True)
    except ClientDisconnected as error:
        # The body stopped short: the client went away, or under gunicorn the request's
        # read deadline passed (REQUEST_READ_TIMEOUT, serving/read_deadline.py), which
        # Werkzeug reports as this error caused by the failed read.
        warn_rejection("Gave up on %s %s: its body did not fully arrive (%s)", request.method,
                       printable(request.path, 100),
                       printable(str(error.__context__ or "the connection closed"), 100))
        abort(408)
    if len(body) > MAX_REQUEST_BYTES:
        abort(413)


def refuse_nul_characters():
    """No valid request has a NUL character (U+0000) in its path, query or form, and
    PostgreSQL's text cannot hold one: refused with 400, the same on both engines."""
    form = request.method == "POST" and request.mimetype == "application/x-www-form-urlencoded"
    if "\x00" in request.path:
        _refuse_nul()
    # The query and the form can only decode to a NUL from a NUL byte or "%00": without
    # either in their bytes, their parsed fields need no look, one by one.
    raw = request.query_string + (request.get_data(cache=True) if form else b"")
    if b"\x00" not in raw and b"%00" not in raw:
        return
    pairs = list(request.args.items(multi=True))
    if form:
        pairs += request.form.items(multi=True)
    if any("\x00" in key + value for key, value in pairs):
        _refuse_nul()


def _refuse_nul():
    abort(400, description="The request contains a NUL character (U+0000) in its path, "
                           "query or form; no valid request has one")
