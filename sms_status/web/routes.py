"""The API's routes (POST /send-sms and POST /message-status have blueprints of their own,
send.py and callbacks.py): each checks what the caller may do, asks the module that does the
work, and shapes the answer."""

import os
import threading

from flask import Blueprint, current_app, request

from sms_status import listing, metrics, webhooks
from sms_status.logs import log
from sms_status.services import get_db, services
from sms_status.storage import DATABASE_ERRORS, reads
from sms_status.web.errors import DATABASE_RETRY_AFTER_SECONDS, json_error
from sms_status.web.guards import requires

OPENAPI_DOCUMENT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "openapi.json")

blueprint = Blueprint("api", __name__)


@blueprint.get("/")
def index():
    return {
        "service": "SMS delivery-status service",
        "mode": current_app.config["SERVICE"].mode,
        "endpoints": {
            "POST /send-sms": "send an SMS: {\"to\": \"+15558675309\", \"body\": \"Hello\"} "
                              "(Authorization: Bearer <key>, scope send)",
            "POST /message-status": "Twilio's status callbacks (signed by Twilio)",
            "GET /get-status/<sid>": "a message's latest status and history "
                                     "(Authorization: Bearer <key>, scope read)",
            "GET /messages": "messages newest first, filtered by to, status, errorCode, "
                             "reference, since, until; paged by cursor "
                             "(Authorization: Bearer <key>, scope read)",
            "GET /stats": "delivery statistics of a time window, by default the last 24 "
                          "hours (Authorization: Bearer <key>, scope read)",
            "GET /webhook-events": "status webhook events newest first, filtered by state "
                                   "and sid; paged by cursor (Authorization: Bearer <key>, "
                                   "scope read)",
            "POST /webhook-events/<id>/retry": "queue a status webhook event to be attempted "
                                               "again now; answers 202 (Authorization: "
                                               "Bearer <key>, scope admin)",
            "POST /inbound-sms": "Twilio's incoming-message webhook (signed by Twilio): "
                                 "replies, and the STOP and START keywords",
            "GET /inbound-messages": "replies received newest first, filtered by from, to, "
                                     "since, until; paged by cursor (Authorization: Bearer "
                                     "<key>, scope read)",
            "GET /opt-outs": "the numbers opted out now, newest first; paged by cursor "
                             "(Authorization: Bearer <key>, scope read)",
            "GET /opt-outs/<number>": "a number's opt-out and its history (Authorization: "
                                      "Bearer <key>, scope read)",
            "PUT /opt-outs/<number>": "opt a number out (Authorization: Bearer <key>, scope "
                                      "admin)",
            "DELETE /opt-outs/<number>": "end an opt-out made through the API "
                                         "(Authorization: Bearer <key>, scope admin)",
            "GET /healthz": "200 when statuses can be stored, 503 when not",
            "GET /openapi.json": "the OpenAPI 3.1 description of this API",
            "GET /metrics": "Prometheus metrics (Authorization: Bearer <key>, scope read)",
            "GET /dashboard": "the delivery dashboard, for a browser (log in with a key "
                                             "with the read scope)",
        },
    }


@blueprint.get("/openapi.json")
def openapi():
    with open(OPENAPI_DOCUMENT, "rb") as document:
        return current_app.response_class(document.read(), mimetype="application/json")


@blueprint.get("/healthz")
def healthz():
    mode = current_app.config["SERVICE"].mode
    problem = services().health.problem()
    if problem:
        return {"status": "unavailable", "mode": mode,
                "error": f"The database cannot store status updates: {problem}"}, 503, {
                    "Retry-After": str(DATABASE_RETRY_AFTER_SECONDS)}
    return {"status": "ok", "mode": mode}


@blueprint.get("/metrics")
@requires("read")
def prometheus_metrics():
    if webhooks.recording(current_app):
        backlog = services().backlog.read(current_app._get_current_object())
        # Not a number when it could not be read: the other metrics are served all the same.
        metrics.set_webhook_backlog(float("nan") if backlog is None else backlog)
    body, content_type = metrics.exposition()
    return current_app.response_class(body, content_type=content_type)


@blueprint.get("/get-status/<sid>")
@requires("read")
def get_status(sid):
    message = listing.message_with_history(get_db(), sid)
    if message is None:
        return json_error(404, f"No message with SID {sid} is known to this service")
    return message


@blueprint.get("/messages")
@requires("read")
def messages():
    return listing.list_messages(get_db(), request.args)


@blueprint.get("/stats")
@requires("read")
def stats():
    now = current_app.config["CLOCK"]()
    since, until = listing.stats_window(request.args, now)
    return listing.delivery_stats(get_db(), since, until, now)


class BacklogRead:
    """The webhook backlog for GET /metrics, read within `timeout` seconds, or None.

    The read runs in a thread of its own, so a database that hangs holds that thread, never
    the scrape; while such a read is still stuck, scrapes do not start another one.
    """

    def __init__(self, timeout=1.0):
        self.timeout = timeout
        self.lock = threading.Lock()
        self.stuck = None  # the thread of a read that has not come back in time

    def read(self, app):
        with self.lock:
            if self.stuck is not None and self.stuck.is_alive():
                log.warning("Webhook backlog not read: an earlier read has not come back")
                return None
        outcome = {}
        thread = threading.Thread(target=self._read, args=(app, outcome), daemon=True,
                                  name="backlog-read")
        thread.start()
        thread.join(self.timeout)
        if thread.is_alive():
            with self.lock:
                self.stuck = thread
            log.warning("Webhook backlog not read: the database did not answer within %g s",
                        self.timeout)
            return None
        if "error" in outcome:
            log.warning("Webhook backlog not read: %s", outcome["error"])
        return outcome.get("count")

    @staticmethod
    def _read(app, outcome):
        with app.app_context():
            try:
                outcome["count"] = reads.pending_webhook_events(get_db())
            except DATABASE_ERRORS as error:
                outcome["error"] = get_db().describe_error(error)

