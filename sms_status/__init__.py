"""SMS delivery-status service: send through Twilio, verify its status callbacks, keep history.

Served by `gunicorn app:app` (see gunicorn.conf.py); `python app.py` runs the development
server. Configuration comes from the environment and an optional .env file (.env.example).
"""

import logging
import os
import re
import sys
import threading
import time
from functools import wraps

from dotenv import load_dotenv
from flask import Flask, abort, current_app, jsonify, request
from twilio.request_validator import (
    SIGNATURE_SETTINGS_HEADER,
    RequestValidator,
    get_signature_algorithm,
)
from werkzeug.exceptions import ClientDisconnected, HTTPException

from sms_status import listing as queries
from sms_status import rules, sending, twilio_api, twilio_errors
from sms_status.commands import register_commands
from sms_status.config import ConfigError, load_config
from sms_status.rules import printable
from sms_status.storage import records as db
from sms_status.storage import writer

log = logging.getLogger("sms_status")

MAX_REQUEST_BYTES = 64 * 1024
OPENAPI_DOCUMENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "openapi.json")
DATABASE_RETRY_AFTER_SECONDS = 2
# /healthz writes to the database at most this often per process, and reuses the outcome.
HEALTH_CHECK_INTERVAL_SECONDS = 1.0
# Warnings about refused requests, per process: enough to see an attack, too few to flood.
REJECTION_WARNINGS_PER_MINUTE = 30
HTTP_ERROR_MESSAGES = {
    404: "No such endpoint: {method} {path}. GET / lists the endpoints.",
    405: "{method} is not allowed on {path}; see the Allow header.",
    408: "The request body did not fully arrive in time (REQUEST_READ_TIMEOUT); nothing was "
         "done. Send it again.",
    413: f"The request body is larger than {MAX_REQUEST_BYTES // 1024} KiB.",
}


def create_app(test_config=None, http_client=None, clock=time.time):
    """Builds the app from the environment, or from `test_config` (a mapping like the environment).

    `http_client` replaces Twilio's HTTP transport; by default it is Twilio's own, or the
    simulator when TWILIO_SIMULATE=true. `clock` gives the time for rate limits and key expiry.
    """
    if test_config is None:
        load_dotenv(os.path.join(os.getcwd(), ".env"), override=False)
        test_config = os.environ
    config = load_config(test_config)
    configure_logging(config.log_level)

    app = Flask(__name__)
    # One byte over the limit, so that a chunked body's length can be checked (below).
    app.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES + 1
    app.config["SERVICE"] = config
    app.config["CLOCK"] = clock
    app.config["SLEEP"] = time.sleep
    app.extensions["rejection_log"] = LogBudget(REJECTION_WARNINGS_PER_MINUTE, 60)
    app.extensions["health"] = HealthCheck(HEALTH_CHECK_INTERVAL_SECONDS)
    app.extensions["twilio"] = twilio_api.build_client(config, http_client)
    app.extensions["validator"] = RequestValidator(config.auth_token)
    if config.webhook_signing_key:
        app.extensions["shared_key_validator"] = RequestValidator(config.webhook_signing_key)
    storage = app.extensions["storage"] = db.open_storage(config)
    try:
        storage.migrate()
    except db.DATABASE_ERRORS as error:
        raise ConfigError(
            [f"DATABASE_URL: cannot open {storage.label}: {storage.describe_error(error)}"]
        ) from None

    app.before_request(read_whole_body)
    app.before_request(refuse_nul_characters)
    register_error_handlers(app)
    register_routes(app)
    register_commands(app)

    if config.simulate:
        log.warning("SIMULATION MODE: Twilio is simulated, no SMS will be sent to any phone.")
    elif not config.allowed_destinations:
        log.warning("ALLOWED_DESTINATIONS is unset: /send-sms may send to any country, which "
                    "a leaked API key can use for SMS pumping; set it to the prefixes you "
                    "send to, like ALLOWED_DESTINATIONS=+1,+44")
    log.info("Ready (%s mode): database %s, status callbacks to %s",
             config.mode, storage.label, config.status_callback_url)
    return app


class OneLineFormatter(logging.Formatter):
    """Writes each record as one line: the line breaks inside it (a traceback's, or libpq's
    messages, which continue on a line of their own) are escaped, like `\\n`."""

    def format(self, record):
        return LINE_BREAKS.sub(lambda found: found.group().encode("unicode_escape").decode(),
                               super().format(record))


# What str.splitlines() splits on.
LINE_BREAKS = re.compile("[\n\r\v\f\x1c-\x1e\x85\u2028\u2029]")


def configure_logging(level):
    """One line per event to stdout; set up once however often create_app runs."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.propagate = False
        # The PostgreSQL pool's warnings (a lost server, reconnection attempts), in the same form.
        pool_log = logging.getLogger("psycopg.pool")
        pool_log.addHandler(handler)
        pool_log.propagate = False
        pool_log.setLevel(logging.WARNING)
    log.setLevel(level)


class LogBudget:
    """At most `limit` lines per `window` seconds; the rest are counted, not written."""

    def __init__(self, limit, window):
        self.limit, self.window = limit, window
        self.lock = threading.Lock()
        self.window_start, self.used, self.dropped = float("-inf"), 0, 0

    def take(self, now):
        """None when this line must be dropped, else how many were dropped before it."""
        with self.lock:
            if now >= self.window_start + self.window:
                self.window_start, self.used = now, 0
            if self.used >= self.limit:
                self.dropped += 1
                return None
            self.used += 1
            dropped, self.dropped = self.dropped, 0
            return dropped


class HealthCheck:
    """The outcome of the last health write, reused for `interval` seconds.

    /healthz needs no key: a flood of it must not become a flood of database writes that
    slows the callbacks down. One thread at a time writes; the others reuse the previous
    outcome meanwhile (only the very first check is waited for).
    """

    def __init__(self, interval):
        self.interval = interval
        self.lock = threading.Lock()
        self.checked_at, self.problem = None, None

    def current(self, clock, check):
        """None when statuses can be stored, else what is wrong, as of at most `interval`
        seconds ago; `check()` writes and returns the same."""
        if self.checked_at is not None and 0 <= clock() - self.checked_at < self.interval:
            return self.problem
        if not self.lock.acquire(blocking=self.checked_at is None):
            return self.problem
        try:
            if self.checked_at is None or not 0 <= clock() - self.checked_at < self.interval:
                self.problem = check()
                self.checked_at = clock()
            return self.problem
        finally:
            self.lock.release()


def warn_rejection(message, *args):
    """Logs a refused request, within this process's budget of such warnings.

    Unauthenticated callers choose how many of these there are: past the budget they are
    counted, and the next warning written says how many were left out.
    """
    dropped = current_app.extensions["rejection_log"].take(current_app.config["CLOCK"]())
    if dropped is None:
        return
    if dropped:
        message += " (%d more refused requests were not logged before this one)"
        args += (dropped,)
    log.warning(message, *args)


def json_error(status, message, **extra):
    response = jsonify({"error": message, **extra})
    response.status_code = status
    return response


def require_api_key(view):
    """Callers send `Authorization: Bearer <API_KEY>`.

    Without API_KEY (allowed only when simulating) the endpoint is open.
    """

    @wraps(view)
    def checked(*args, **kwargs):
        api_key = current_app.config["SERVICE"].api_key
        header = request.headers.get("Authorization")
        if api_key and not rules.bearer_token_matches(header, api_key):
            response = json_error(
                401, "Missing or wrong API key: send the header 'Authorization: Bearer <API_KEY>'"
            )
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        return view(*args, **kwargs)

    return checked


def read_whole_body():
    """Reads the body before anything parses it: a chunked body has no Content-Length, and
    Werkzeug stops reading it at the limit without an error, which would cut it silently."""
    if request.method != "POST":
        return
    try:
        body = request.get_data(cache=True)
    except ClientDisconnected as error:
        # The body stopped short: the client went away, or under gunicorn the request's
        # read deadline passed (REQUEST_READ_TIMEOUT, read_deadline.py), which Werkzeug
        # reports as this error caused by the failed read.
        warn_rejection("Gave up on %s %s: its body did not fully arrive (%s)", request.method,
                       printable(request.path, 100),
                       printable(str(error.__context__ or "the connection closed"), 100))
        abort(408)
    if len(body) > MAX_REQUEST_BYTES:
        abort(413)


def refuse_nul_characters():
    """No valid request has a NUL character (U+0000) in its path, query or form, and
    PostgreSQL's text cannot hold one: refused with 400, the same on both engines.

    Status callbacks are checked after their signature, so an unsigned one still gets 403.
    """
    if request.endpoint == "message_status" and not request.environ.get("sms.signed"):
        return
    pairs = list(request.args.items(multi=True))
    if request.method == "POST" and request.mimetype == "application/x-www-form-urlencoded":
        pairs += request.form.items(multi=True)
    if "\x00" in request.path or any("\x00" in key + value for key, value in pairs):
        abort(400, description="The request contains a NUL character (U+0000) in its path, "
                               "query or form; no valid request has one")


def register_error_handlers(app):
    @app.errorhandler(HTTPException)
    def http_error(error):
        template = HTTP_ERROR_MESSAGES.get(error.code)
        message = (
            template.format(method=request.method, path=request.path)
            if template
            else error.description
        )
        response = json_error(error.code, message)
        original_headers = error.get_response().headers
        for name in ("Allow", "Retry-After", "WWW-Authenticate"):
            if name in original_headers:
                response.headers[name] = original_headers[name]
        return response

    @app.after_request
    def log_bad_request(response):
        """Every 400 leaves a line saying what was wrong with the request."""
        if response.status_code == 400:
            answer = response.get_json(silent=True) or {}
            warn_rejection("Refused %s %s with 400: %s", request.method,
                           printable(request.path, 100), printable(answer.get("error"), 300))
        return response

    def database_error(error):
        log.error("Database error on %s %s: %s", request.method, printable(request.path, 100),
                  db.describe_error(error))
        if isinstance(error, db.READ_TIME_LIMIT_ERRORS):
            message = (f"The query took longer than {db.READ_STATEMENT_TIMEOUT_MS / 1000:g} s "
                       "and was stopped; nothing was changed. Ask for a shorter window "
                       "(since, until), or try again later.")
        elif request.method == "GET":
            message = ("The database could not answer (it is unreachable or busy); nothing "
                       "was changed. Try again in a few seconds.")
        elif not isinstance(error, writer.OutcomeUnknown):
            message = ("The database could not complete the request; nothing was stored. "
                       "Try again.")
        elif request.path == "/send-sms":
            # A send meets the writer before Twilio: once Twilio accepted, it answers 200.
            message = ("No SMS was sent, but the database did not confirm this request (its "
                       "writer process gave no answer), so part of it may be stored. Try "
                       "again; if a retry with the same Idempotency-Key answers 409 or 504, "
                       "send with a new key.")
        else:
            message = ("The database did not confirm this request (its writer process gave no "
                       "answer): it may or may not have been stored. Try again; a repeated "
                       "status callback is stored once.")
        response = json_error(503, message)
        response.headers["Retry-After"] = str(DATABASE_RETRY_AFTER_SECONDS)
        return response

    for error_class in db.DATABASE_ERRORS:
        app.register_error_handler(error_class, database_error)

    @app.errorhandler(Exception)
    def unexpected_error(error):
        log.exception("Unexpected error on %s %s", request.method, printable(request.path, 100))
        return json_error(500, "Internal server error; it has been logged.")


def register_routes(app):
    @app.get("/")
    def index():
        return {
            "service": "SMS delivery-status service",
            "mode": current_app.config["SERVICE"].mode,
            "endpoints": {
                "POST /send-sms": "send an SMS: {\"to\": \"+15558675309\", \"body\": \"Hello\"} "
                                  "(Authorization: Bearer <API_KEY>)",
                "POST /message-status": "Twilio's status callbacks (signed by Twilio)",
                "GET /get-status/<sid>": "a message's latest status and history "
                                         "(Authorization: Bearer <API_KEY>)",
                "GET /messages": "messages newest first, filtered by to, status, errorCode, "
                                 "since, until; paged by cursor (Authorization: Bearer <API_KEY>)",
                "GET /stats": "delivery statistics of a time window, by default the last 24 "
                              "hours (Authorization: Bearer <API_KEY>)",
                "GET /healthz": "200 when statuses can be stored, 503 when not",
                "GET /openapi.json": "the OpenAPI 3.1 description of this API",
            },
        }

    @app.get("/openapi.json")
    def openapi():
        with open(OPENAPI_DOCUMENT, "rb") as document:
            return current_app.response_class(document.read(), mimetype="application/json")

    def storage_problem():
        try:
            db.check_writable(db.get_db())
            return None
        except db.DATABASE_ERRORS as error:
            log.error("Health check failed: the database cannot store updates: %s",
                      db.describe_error(error))
            return db.describe_error(error) or type(error).__name__

    @app.get("/healthz")
    def healthz():
        mode = current_app.config["SERVICE"].mode
        if current_app.extensions["health"].current(current_app.config["CLOCK"],
                                                    storage_problem):
            return {"status": "unavailable", "mode": mode,
                    "error": "The database cannot store status updates."}, 503, {
                        "Retry-After": str(DATABASE_RETRY_AFTER_SECONDS)}
        return {"status": "ok", "mode": mode}

    @app.post("/send-sms")
    @require_api_key
    def send_sms():
        try:
            payload = request.get_json(force=True, silent=True)
        except RecursionError:  # nested too deeply for the JSON parser
            payload = None
        key = request.headers.get("Idempotency-Key")
        if key is None:
            response, _ = sending.checked_send(payload)
            return response
        return sending.send_with_idempotency_key(key, payload)

    @app.post("/message-status")
    def message_status():
        if not signed_by_twilio():
            return json_error(403, "Invalid Twilio signature")
        request.environ["sms.signed"] = True
        refuse_nul_characters()
        form = request.form
        # Older callbacks (and some Twilio products) send only SmsSid and SmsStatus.
        sid = (form.get("MessageSid") or form.get("SmsSid") or "").strip()
        status = (form.get("MessageStatus") or form.get("SmsStatus") or "").strip().lower()
        if not sid or not status:
            return json_error(400, "A status callback needs MessageSid and MessageStatus "
                                   "(or the older SmsSid and SmsStatus)")
        error_code = parse_error_code(request.form.get("ErrorCode"))
        stored = db.record_status(
            db.get_db(), sid, status, error_code,
            to=request.form.get("To"), from_=request.form.get("From"),
            account_sid=request.form.get("AccountSid"),
        )
        log.info("Status callback %s %s error=%s%s", printable(sid, 64), printable(status, 32),
                 error_code, "" if stored else " (repeat, ignored)")
        return {"received": True, "duplicate": not stored}

    @app.get("/get-status/<sid>")
    @require_api_key
    def get_status(sid):
        message = db.message_with_history(db.get_db(), sid)
        if message is None:
            return json_error(404, f"No message with SID {sid} is known to this service")
        message["errorDescription"] = twilio_errors.description(message["errorCode"])
        return message

    @app.get("/messages")
    @require_api_key
    def messages():
        return queries.list_messages(request.args)

    @app.get("/stats")
    @require_api_key
    def stats():
        return queries.delivery_stats(request.args, current_app.config["CLOCK"]())


def signed_by_twilio():
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
        if current_app.extensions["validator"].validate(url, request.form, signature):
            return True
        warn_rejection("Rejected status callback: invalid Twilio signature for %s",
                       printable(url))
        return False

    # The header is the caller's: only shortened and escaped copies of it reach the log.
    key_id = printable(next((part.strip()[4:] for part in settings.split(",")
                             if part.strip().startswith("key=")), "?"), 60)
    validator = current_app.extensions.get("shared_key_validator")
    if validator is None:
        warn_rejection("Rejected status callback signed with shared key %s: set "
                       "TWILIO_WEBHOOK_SIGNING_KEY to that key's secret to accept it", key_id)
        return False
    algorithm = get_signature_algorithm(settings)
    if validator.validate(url, request.form, signature, algorithm=algorithm):
        log.debug("Status callback signed with shared key %s (%s)", key_id,
                  printable(algorithm, 30))
        return True
    warn_rejection("Rejected status callback: invalid %s signature (shared key %s) for %s",
                   printable(algorithm, 30), key_id, printable(url))
    return False


def parse_error_code(raw):
    """Twilio's ErrorCode as an integer, or None when absent or not a plain number."""
    raw = (raw or "").strip()
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 9 else None


def create_app_or_exit():
    """For gunicorn and `python app.py`: a configuration error ends the process with one message."""
    try:
        return create_app()
    except ConfigError as error:
        print(error, file=sys.stderr, flush=True)
        raise SystemExit(2) from None

