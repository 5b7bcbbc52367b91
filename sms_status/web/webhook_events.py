"""GET /webhook-events and POST /webhook-events/<id>/retry: what became of the status
webhooks, and queueing one to be sent again."""

from flask import Blueprint, current_app, request

from sms_status import listing
from sms_status.services import get_db, services
from sms_status.web.errors import json_error
from sms_status.web.guards import requires
from sms_status.webhooks import retry

blueprint = Blueprint("webhook_events", __name__)


@blueprint.get("/webhook-events")
@requires("read")
def webhook_events():
    return listing.list_webhook_events(get_db(), request.args)


@blueprint.post("/webhook-events/<event_id>/retry")
@requires("admin")
def retry_webhook_event(event_id):
    """Queues the event again for this process's delivery loop (webhooks/retry.py) and
    answers 202 with the event, before any attempt."""
    outcome = retry.queue_again(get_db(), services().webhooks, event_id,
                                current_app.config["CLOCK"]())
    if outcome.result == "unknown":
        return json_error(404, f"No status webhook event with id {event_id} is known to this "
                               "service; GET /webhook-events lists them")
    if outcome.result == "off":
        return json_error(409, "Status webhooks are off: set STATUS_WEBHOOK_URL and "
                               "STATUS_WEBHOOK_SECRET, then retry")
    return outcome.event, 202
