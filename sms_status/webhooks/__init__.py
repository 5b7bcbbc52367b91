"""Status webhooks: each change of a message's latest status, pushed to the sender's own
application (STATUS_WEBHOOK_URL), signed as Standard Webhooks defines.

- events.py: an event's body and its signed headers;
- attempt.py: one HTTP attempt, bounded by STATUS_WEBHOOK_TIMEOUT from connecting to the
  end of the answer;
- delivery.py: the loop in each server process that claims due events from the outbox
  (storage/outbox.py), attempts them, and records what happened.
- retry.py: one event queued to be sent again, for the API's and the dashboard's retry.
"""

from sms_status.services import services


def recording(app):
    """Whether a status change adds its event to the outbox (STATUS_WEBHOOK_URL is set)."""
    return services(app).webhooks is not None


def nudge(app):
    """Wakes this process's delivery loop: an event may have been stored."""
    delivery = services(app).webhooks
    if delivery is not None:
        delivery.nudge()
