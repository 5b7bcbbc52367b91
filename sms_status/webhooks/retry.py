"""Queueing one status webhook event to be sent again, as POST /webhook-events/<id>/retry
and the dashboard's retry button ask: plain inputs in, a RetryOutcome out, which the API
answers as JSON and the dashboard as a page."""

import dataclasses

from sms_status import listing
from sms_status.storage import outbox


@dataclasses.dataclass(frozen=True)
class RetryOutcome:
    """What a retry came to: `result` is "queued" (the event is due now), "unknown" (no
    such event) or "off" (status webhooks are off: nothing would deliver it); `event` is the
    event's item as it is after the retry, when queued."""

    result: str
    event: dict | None = None


def queue_again(storage, delivery, event_id, now):
    """Makes the event due now, its retry schedule restarted (a delivered one is sent again
    under the same webhook-id), and wakes `delivery`, this process's loop (None while
    status webhooks are off): the attempt is the loop's, so no caller waits on the receiver."""
    event = listing.webhook_event(storage, event_id)
    if event is None:
        return RetryOutcome("unknown")
    if delivery is None:
        return RetryOutcome("off")
    if not outbox.queue_webhook_event_again(storage, event_id, now):
        return RetryOutcome("unknown")  # pruned since it was read
    delivery.nudge()
    return RetryOutcome("queued", listing.webhook_event(storage, event_id))
