"""SMS delivery-status service: send through Twilio, verify its status callbacks, keep history.

Served by `gunicorn app:app` (see gunicorn.conf.py); `python app.py` runs the development
server. Configuration comes from the environment and an optional .env file (.env.example).
"""

import logging
import os
import sqlite3
import sys
from functools import wraps

from dotenv import load_dotenv
from flask import Flask, current_app, jsonify, request
from twilio.request_validator import RequestValidator
from werkzeug.exceptions import HTTPException

import db
import rules
import twilio_api
from config import ConfigError, load_config

log = logging.getLogger("sms_status")

MAX_REQUEST_BYTES = 64 * 1024
DATABASE_RETRY_AFTER_SECONDS = 2
HTTP_ERROR_MESSAGES = {
    404: "No such endpoint: {method} {path}. GET / lists the endpoints.",
    405: "{method} is not allowed on {path}; see the Allow header.",
    413: f"The request body is larger than {MAX_REQUEST_BYTES // 1024} KiB.",
}


def create_app(test_config=None, http_client=None):
    """Builds the app from the environment, or from `test_config` (a mapping like the environment).

    `http_client` replaces Twilio's HTTP transport; by default it is Twilio's own, or the
    simulator when TWILIO_SIMULATE=true.
    """
    if test_config is None:
        load_dotenv(os.path.join(os.getcwd(), ".env"), override=False)
        test_config = os.environ
    config = load_config(test_config)
    configure_logging(config.log_level)

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES
    app.config["SERVICE"] = config
    app.extensions["twilio"] = twilio_api.build_client(config, http_client)
    app.extensions["validator"] = RequestValidator(config.auth_token)
    try:
        db.migrate(config.database_path)
    except sqlite3.Error as error:
        raise ConfigError(
            [f"DATABASE_URL: cannot open {config.database_path}: {error}"]
        ) from None

    register_error_handlers(app)
    register_routes(app)

    if config.simulate:
        log.warning("SIMULATION MODE: Twilio is simulated, no SMS will be sent to any phone.")
    log.info("Ready (%s mode): database %s, status callbacks to %s",
             config.mode, config.database_path, config.status_callback_url)
    return app


def configure_logging(level):
    """One line per event to stdout; set up once however often create_app runs."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(level)


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
        for name in ("Allow", "Retry-After", "WWW-Authenticate"):
            if name in error.get_response().headers:
                response.headers[name] = error.get_response().headers[name]
        return response

    @app.errorhandler(sqlite3.Error)
    def database_error(error):
        log.error("Database error on %s %s: %s", request.method, request.path, error)
        response = json_error(
            503, "The database could not complete the request; nothing was stored. Try again."
        )
        response.headers["Retry-After"] = str(DATABASE_RETRY_AFTER_SECONDS)
        return response

    @app.errorhandler(Exception)
    def unexpected_error(error):
        log.exception("Unexpected error on %s %s", request.method, request.path)
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
                "GET /healthz": "200 when statuses can be stored, 503 when not",
            },
        }

    @app.get("/healthz")
    def healthz():
        mode = current_app.config["SERVICE"].mode
        try:
            db.check_writable(db.get_db())
        except sqlite3.Error as error:
            log.error("Health check failed: the database cannot store updates: %s", error)
            return {"status": "unavailable", "mode": mode,
                    "error": "The database cannot store status updates."}, 503
        return {"status": "ok", "mode": mode}

    @app.post("/send-sms")
    @require_api_key
    def send_sms():
        payload = request.get_json(force=True, silent=True)
        problem = rules.send_request_problem(payload)
        if problem:
            return json_error(400, problem, success=False, code=None)
        return send_and_record(payload["to"], payload["body"])

    @app.post("/message-status")
    def message_status():
        config = current_app.config["SERVICE"]
        url = config.base_url + request.path
        if request.query_string:
            url += "?" + request.query_string.decode("utf-8", "replace")
        signature = request.headers.get("X-Twilio-Signature", "")
        if not current_app.extensions["validator"].validate(url, request.form, signature):
            log.warning("Rejected status callback: invalid Twilio signature for %s", url)
            return json_error(403, "Invalid Twilio signature")
        sid = request.form.get("MessageSid", "").strip()
        status = request.form.get("MessageStatus", "").strip().lower()
        if not sid or not status:
            return json_error(400, "A status callback needs MessageSid and MessageStatus")
        error_code = parse_error_code(request.form.get("ErrorCode"))
        stored = db.record_status(
            db.get_db(), sid, status, error_code,
            to=request.form.get("To"), from_=request.form.get("From"),
            account_sid=request.form.get("AccountSid"),
        )
        log.info("Status callback %s %s error=%s%s", sid, status, error_code,
                 "" if stored else " (repeat, ignored)")
        return {"received": True, "duplicate": not stored}

    @app.get("/get-status/<sid>")
    @require_api_key
    def get_status(sid):
        message = db.message_with_history(db.get_db(), sid)
        if message is None:
            return json_error(404, f"No message with SID {sid} is known to this service")
        return message


def parse_error_code(raw):
    """Twilio's ErrorCode as an integer, or None when absent or not a number."""
    raw = (raw or "").strip()
    return int(raw) if raw.isdigit() else None


def send_and_record(to, body):
    """Sends through Twilio, then stores the message; the JSON answer for /send-sms."""
    config = current_app.config["SERVICE"]
    try:
        message = twilio_api.send_message(current_app.extensions["twilio"], config, to, body)
    except twilio_api.TwilioFailure as failure:
        response = json_error(
            failure.http_status, failure.error,
            success=False, details=failure.details, code=failure.code,
        )
        if failure.retry_after:
            response.headers["Retry-After"] = str(failure.retry_after)
        return response

    created_at = (
        db.utc_now_iso(message.date_created.timestamp())
        if message.date_created else db.utc_now_iso()
    )
    answer = {"success": True, "messageSid": message.sid, "status": message.status}
    try:
        db.record_sent_message(
            db.get_db(), message.sid,
            account_sid=message.account_sid or config.account_sid,
            to=message.to or to,
            from_=message.from_ or config.phone_number or config.messaging_service_sid,
            body=body if config.store_message_body else None,
            status=message.status, created_at=created_at,
        )
    except sqlite3.Error as error:
        log.error("Message %s was sent but could not be stored: %s", message.sid, error)
        answer["warning"] = (
            "Twilio accepted the message but this service could not record it; do not send "
            "it again. Its status callbacks are stored once the database recovers."
        )
    log.info("Sent %s to %s: %s", message.sid, rules.mask_phone(to), message.status)
    return answer


def create_app_or_exit():
    """For gunicorn and `python app.py`: a configuration error ends the process with one message."""
    try:
        return create_app()
    except ConfigError as error:
        print(error, file=sys.stderr, flush=True)
        raise SystemExit(2) from None


app = create_app_or_exit()

if __name__ == "__main__":
    app.run(host="0.0.0.0", port=app.config["SERVICE"].port)
