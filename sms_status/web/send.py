"""POST /send-sms, with the answer shape of its own that every one of its errors keeps:
{"success": false, "error", "details", "code"}.

The flow itself is in sending.py, without Flask: this module reads the request, gives the
flow what it uses, and turns its SendOutcome into the HTTP answer.
"""

from flask import Blueprint, current_app, g, request

from sms_status import sending
from sms_status.services import get_db, services
from sms_status.storage import DATABASE_ERRORS, OutcomeUnknown
from sms_status.web.errors import (
    DATABASE_RETRY_AFTER_SECONDS,
    http_error_message,
    log_database_error,
)
from sms_status.web.guards import requires

blueprint = Blueprint("send", __name__)


@blueprint.post("/send-sms")
@requires("send")
def send_sms():
    try:
        payload = request.get_json(force=True, silent=True)
    except RecursionError:  # nested too deeply for the JSON parser
        payload = None
    outcome = sending.send_sms(send_context(), payload, raw_body=request.get_data(),
                               idempotency_key=request.headers.get("Idempotency-Key"))
    return answer(outcome)


def send_context():
    """What the send flow uses, from this app."""
    return sending.SendContext(
        config=current_app.config["SERVICE"],
        storage=get_db(),
        twilio=services().twilio,
        clock=current_app.config["CLOCK"],
        webhooks=services().webhooks,
        sender=g.get("api_key"),
    )


def answer(outcome):
    """The HTTP answer of a send's outcome."""
    response = current_app.response_class(outcome.text, status=outcome.status,
                                          mimetype="application/json")
    for name, value in outcome.headers.items():
        response.headers[name] = value
    return response


@blueprint.errorhandler(413)
def too_large(error):
    return answer(sending.send_error(413, http_error_message(error)))


def database_error(error):
    """A send meets the database before Twilio (its key, its place under the limits), so no
    SMS was sent; once Twilio accepted, a storage failure is answered 200 with a warning."""
    log_database_error(error)
    if isinstance(error, OutcomeUnknown):
        message = ("No SMS was sent, but the database did not confirm this request (its "
                   "writer process gave no answer), so part of it may be stored. Try again; if "
                   "a retry with the same Idempotency-Key answers 409 or 504, send with a new "
                   "key.")
    else:
        message = "The database could not complete the request; no SMS was sent. Try again."
    return answer(sending.send_error(503, message, retry_after=DATABASE_RETRY_AFTER_SECONDS))


for _error_class in DATABASE_ERRORS:
    blueprint.register_error_handler(_error_class, database_error)
