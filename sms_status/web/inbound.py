"""POST /inbound-sms: Twilio's "a message comes in" webhook, guarded exactly as a status
callback is (guards.check_twilio_webhook: field count, Twilio's signature, NUL characters,
its refusals counted as inbound ones), answered with an empty TwiML document once the
message is committed."""

from flask import Blueprint, current_app, request

from sms_status import keywords, metrics, rules, webhooks
from sms_status.logs import log
from sms_status.rules import printable
from sms_status.services import get_db
from sms_status.storage import inbound
from sms_status.web import guards
from sms_status.web.errors import json_error

blueprint = Blueprint("inbound", __name__)
INBOUND_MESSAGE = guards.TwilioWebhook("inbound message", metrics.count_inbound_refused)


@blueprint.before_request
def guard_inbound():
    return guards.check_twilio_webhook(INBOUND_MESSAGE)


EMPTY_TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response/>'
# A reply's kind as the log says it.
LOGGED_KIND = {"message": "reply", "opt_out": "opt-out", "opt_in": "opt-in", "help": "help"}


@blueprint.post("/inbound-sms")
def inbound_sms():
    form = request.form
    sid = (form.get("MessageSid") or form.get("SmsMessageSid") or form.get("SmsSid")
           or "").strip()
    from_ = (form.get("From") or "").strip()
    if not sid or not from_:
        metrics.count_inbound_refused("invalid")
        return json_error(400, "An inbound message needs MessageSid (or SmsMessageSid) and "
                               "From")
    body = form.get("Body") or ""
    kind, keyword = keywords.kind_of(body, form.get("OptOutType"))
    # A sender without a phone number (a short code, a channel address) has no opt-out here:
    # the list and the sends it guards are E.164 numbers.
    changes_list = rules.is_e164(from_)
    outcome = inbound.record_inbound(
        get_db(), sid, from_, (form.get("To") or "").strip() or None, body,
        rules.whole_number(form.get("NumMedia")) or 0,
        rules.whole_number(form.get("NumSegments")),
        keywords.OPT_OUT_TYPE_OF_KIND.get(kind), kind, keyword,
        account_sid=form.get("AccountSid"),
        keep_body=current_app.config["SERVICE"].store_message_body, changes_list=changes_list)
    if outcome != "repeat":
        metrics.count_inbound(kind)
        webhooks.nudge(current_app)
    log.info("Inbound %s %s from %s%s", LOGGED_KIND[kind], printable(sid, 64),
             printable(rules.mask_phone(from_), 40),
             {"repeat": " (repeat, ignored)", "opted_out": ": opted out",
              "opted_in": ": opted back in"}.get(outcome, ""))
    return current_app.response_class(EMPTY_TWIML, mimetype="text/xml")
