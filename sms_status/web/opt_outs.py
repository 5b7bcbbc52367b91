"""The opt-out list and the replies received: GET /opt-outs, GET/PUT/DELETE
/opt-outs/<number> and GET /inbound-messages, behind a key (`read`; `admin` to change the
list)."""

from flask import Blueprint, current_app, request

from sms_status import replies, rules, webhooks
from sms_status.logs import log
from sms_status.services import get_db
from sms_status.storage import opt_outs
from sms_status.web.errors import json_error
from sms_status.web.guards import requires

blueprint = Blueprint("opt_outs", __name__)

# Why each source's opt-out is not ended by DELETE.
ENDED_ONLY_BY_START = {
    "keyword": "the person opted out by replying with a keyword (such as STOP)",
    "twilio": "Twilio reported that the person opted out (error 21610)",
}


@blueprint.get("/inbound-messages")
@requires("read")
def inbound_messages():
    return replies.list_inbound(get_db(), request.args)


@blueprint.get("/opt-outs")
@requires("read")
def list_opt_outs():
    return replies.list_opt_outs(get_db(), request.args)


@blueprint.get("/opt-outs/<number>")
@requires("read")
def opt_out(number):
    state = replies.opt_out_state(get_db(), replies.path_number(number))
    if state is None:
        return json_error(404, "This service has never recorded an opt-out or opt-in for "
                               "this number")
    return state


@blueprint.put("/opt-outs/<number>")
@requires("admin")
def add_opt_out(number):
    """Records an opt-out made elsewhere (source `api`): 201, or 200 when the number was
    opted out already, which changes nothing."""
    number = replies.path_number(number)
    storage = get_db()
    added = opt_outs.record_opt_out(storage, number, "api")
    if added:
        log.info("Opted %s out through the API", rules.mask_phone(number))
        webhooks.nudge(current_app)
    return replies.opt_out_state(storage, number), 201 if added else 200


@blueprint.delete("/opt-outs/<number>")
@requires("admin")
def end_opt_out(number):
    """Ends an opt-out recorded through the API; the person's own (STOP, or Twilio's 21610)
    only their START ends: 409."""
    number = replies.path_number(number)
    storage = get_db()
    outcome = opt_outs.end_api_opt_out(storage, number)
    if outcome is None:
        return json_error(404, "This number is not opted out")
    if outcome != "ended":
        return json_error(409, f"This opt-out cannot be ended through the API: "
                               f"{ENDED_ONLY_BY_START[outcome]}. Only their reply START (or "
                               "UNSTOP, YES) ends it.", source=outcome)
    log.info("Ended the API opt-out of %s", rules.mask_phone(number))
    webhooks.nudge(current_app)
    return replies.opt_out_state(storage, number)
