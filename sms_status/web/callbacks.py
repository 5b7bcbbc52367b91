"""POST /message-status: Twilio's status callbacks, a blueprint whose guards
(guards.check_twilio_webhook: field count, signature, NUL characters) run before the view
stores the status."""

from flask import Blueprint, current_app, request

from sms_status import metrics, webhooks
from sms_status.logs import log
from sms_status.rules import printable, whole_number
from sms_status.services import get_db
from sms_status.storage import statuses
from sms_status.web import guards
from sms_status.web.errors import json_error

blueprint = Blueprint("callbacks", __name__)

STATUS_CALLBACK = guards.TwilioWebhook("status callback", metrics.count_callback)


@blueprint.before_request
def guard_callback():
    return guards.check_twilio_webhook(STATUS_CALLBACK)


@blueprint.post("/message-status")
def message_status():
    form = request.form
    # Older callbacks (and some Twilio products) send only SmsSid and SmsStatus.
    sid = (form.get("MessageSid") or form.get("SmsSid") or "").strip()
    status = (form.get("MessageStatus") or form.get("SmsStatus") or "").strip().lower()
    if not sid or not status:
        metrics.count_callback("invalid")
        return json_error(400, "A status callback needs MessageSid and MessageStatus "
                               "(or the older SmsSid and SmsStatus)")
    error_code = whole_number(form.get("ErrorCode"))
    stored = statuses.record_status(get_db(), sid, status, error_code, to=form.get("To"),
                                    from_=form.get("From"), account_sid=form.get("AccountSid"))
    metrics.count_callback("stored" if stored else "repeat")
    if stored:
        metrics.count_status_change(status)
        webhooks.nudge(current_app)
    log.info("Status callback %s %s error=%s%s", printable(sid, 64), printable(status, 32),
             error_code, "" if stored else " (repeat, ignored)")
    return {"received": True, "duplicate": not stored}
