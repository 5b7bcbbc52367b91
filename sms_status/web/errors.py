"""Every error as a JSON body with a message that tells the caller what to fix, or, under
/dashboard, as an HTML page with that message (dashboard.error_page).

Routes with an answer shape of their own (POST /send-sms) register their own handlers on
their blueprint; these are the app's defaults.
"""

from flask import g, jsonify, request
from werkzeug.datastructures import Headers
from werkzeug.exceptions import HTTPException

from sms_status.listing import BadQuery
from sms_status.rules import printable
from sms_status.services import get_db
from sms_status.storage import DATABASE_ERRORS, READ_TIME_LIMIT_ERRORS, OutcomeUnknown
from sms_status.web import dashboard
from sms_status.web.guards import MAX_REQUEST_BYTES
from sms_status.web.logs import log, logged_path, warn_rejection

DATABASE_RETRY_AFTER_SECONDS = 2
HTTP_ERROR_MESSAGES = {
    404: "No such endpoint: {method} {path}. GET / lists the endpoints.",
    405: "{method} is not allowed on {path}; see the Allow header.",
    408: "The request body did not fully arrive in time (REQUEST_READ_TIMEOUT); nothing was "
         "done. Send it again.",
    413: f"The request body is larger than {MAX_REQUEST_BYTES // 1024} KiB.",
}


def json_error(status, message, **extra):
    response = jsonify({"error": message, **extra})
    response.status_code = status
    return response


def error_answer(status, message):
    """An error as its caller reads it: a page of the dashboard's under /dashboard, else
    JSON."""
    if dashboard.under_dashboard(request.path):
        return dashboard.error_page(status, message)
    return json_error(status, message)


def http_error_message(error):
    """The message of an HTTP error: a fixed one for the generic errors, else its own."""
    if error.code == 404 and dashboard.under_dashboard(request.path):
        return f"No such page: {request.path}. The dashboard starts at /dashboard."
    template = HTTP_ERROR_MESSAGES.get(error.code)
    return (template.format(method=request.method, path=request.path) if template
            else error.description)


def log_database_error(error):
    """One line for a database error met by a request: its route and the database's words."""
    log.error("Database error on %s %s: %s", request.method, logged_path(),
              get_db().describe_error(error))


def database_unavailable(message):
    """503 with Retry-After: the database could not do what the request needed."""
    response = error_answer(503, message)
    response.headers["Retry-After"] = str(DATABASE_RETRY_AFTER_SECONDS)
    return response


def register_error_handlers(app):
    @app.errorhandler(HTTPException)
    def http_error(error):
        response = error_answer(error.code, http_error_message(error))
        # The headers the error would answer with, without the HTML page get_response()
        # renders around them, only to be dropped.
        original_headers = (error.response.headers if error.response is not None
                            else Headers(error.get_headers(request.environ)))
        for name in ("Allow", "Retry-After", "WWW-Authenticate"):
            if name in original_headers:
                response.headers[name] = original_headers[name]
        return response

    @app.errorhandler(BadQuery)
    def bad_query(error):
        return error_answer(400, error.message)

    @app.after_request
    def log_bad_request(response):
        """Every 400 leaves a line saying what was wrong with the request."""
        if response.status_code == 400:
            answer = response.get_json(silent=True) or {}
            warn_rejection("Refused %s %s with 400: %s", request.method,
                           logged_path(),
                           printable(g.get("refusal") or answer.get("error"), 300))
        return response

    def database_error(error):
        log_database_error(error)
        if isinstance(error, READ_TIME_LIMIT_ERRORS):
            return database_unavailable(
                "The query took longer than reads are allowed and was stopped; nothing was "
                "changed. Ask for a shorter window (since, until), or try again later.")
        if request.method == "GET":
            return database_unavailable("The database could not answer (it is unreachable or "
                                        "busy); nothing was changed. Try again in a few "
                                        "seconds.")
        if isinstance(error, OutcomeUnknown):
            return database_unavailable(
                "The database did not confirm this request (its writer process gave no "
                "answer): it may or may not have been stored. Try again; a repeated status "
                "callback or inbound message is stored once.")
        return database_unavailable("The database could not complete the request; nothing "
                                    "was stored. Try again.")

    for error_class in DATABASE_ERRORS:
        app.register_error_handler(error_class, database_error)

    @app.errorhandler(Exception)
    def unexpected_error(error):
        log.exception("Unexpected error on %s %s", request.method, logged_path())
        return error_answer(500, "Internal server error; it has been logged.")
