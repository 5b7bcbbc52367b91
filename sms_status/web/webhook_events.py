"""GET /webhook-events and POST /webhook-events/<id>/retry: what became of the status
webhooks, and queueing one to be sent again."""

from flask import Blueprint, current_app, request

from sms_status import listing
from sms_status.services import get_db, services
from sms_status.storage import outbox
from sms_status.web.errors import json_error
from sms_status.web.guards import requires

blueprint = Blueprint("webhook_events", __name__)


@blueprint.get("/webhook-events")
@requires("read")
def webhook_events():
    return listing.list_webhook_events(get_db(), request.args)


@blueprint.post("/webhook-events/<event_id>/retry")
@requires("admin")
def retry_webhook_event(event_id):
    """Makes the event due now, its retry schedule restarted (a delivered one is sent again
    under the same webhook-id), wakes this process's delivery loop, and answers 202 with the
    event: the attempt is the loop's, so no request thread waits on the receiver."""
    if listing.webhook_event(get_db(), event_id) is None:
        return json_error(404, f"No status webhook event with id {event_id} is known to this "
                               "service; GET /webhook-events lists them")
    delivery = services().webhooks
    if delivery is None:
        return json_error(409, "Status webhooks are off: set STATUS_WEBHOOK_URL and "
                               "STATUS_WEBHOOK_SECRET, then retry")
    outbox.queue_webhook_event_again(get_db(), event_id, current_app.config["CLOCK"]())
    delivery.nudge()
    return listing.webhook_event(get_db(), event_id), 202
