"""The dashboard's pages of what recipients send back: Inbound (the replies, newest first,
by number) and Opt-outs (the numbers opted out now, or one number's opt-out and history).

They are routes of dashboard.py's blueprint, behind its login and headers, and read what
GET /inbound-messages and GET /opt-outs/<number> answer (replies.py).
"""

from flask import current_app, url_for
from werkzeug.datastructures import MultiDict

from sms_status import listing, replies
from sms_status.services import get_db
from sms_status.web.dashboard import blueprint, filled_in_query, page

# A reply's kind as the pages name it, by its optOutType.
KIND_OF_OPT_OUT_TYPE = {"STOP": "opt-out", "START": "opt-in", "HELP": "help", None: "reply"}


@blueprint.get("/inbound", endpoint="inbound")
def inbound_page():
    args, short_address = filled_in_query("dashboard.inbound")
    if short_address is not None:
        return short_address
    number = args.get("number", "")
    query = MultiDict({"from": number} if number else {})
    if "cursor" in args:
        query["cursor"] = args["cursor"]
    try:
        found = replies.list_inbound(get_db(), query)
    except listing.BadQuery as refusal:
        message = refusal.message.replace(listing.PLUS_IN_A_URL, "")
        if refusal.parameter == "from":
            message = "The number must be in E.164 format, like +15558675309."
        return page("inbound.html", 400, title="Inbound", number=number, problem=message)
    older = (url_for("dashboard.inbound", **{**({"number": number} if number else {}),
                                             "cursor": found["nextCursor"]})
             if found["nextCursor"] else None)
    return page("inbound.html", title="Inbound", number=number,
                messages=[{**item, "kind": KIND_OF_OPT_OUT_TYPE.get(item["optOutType"], "reply")}
                          for item in found["messages"]],
                bodies_kept=current_app.config["SERVICE"].store_message_body,
                older=older, paged="cursor" in args,
                newest=url_for("dashboard.inbound", **({"number": number} if number else {})))


@blueprint.get("/opt-outs", endpoint="opt_outs")
def opt_outs_page():
    args, short_address = filled_in_query("dashboard.opt_outs")
    if short_address is not None:
        return short_address
    storage = get_db()
    number = args.get("number")
    if number:
        try:
            state = replies.opt_out_state(storage, replies.path_number(number))
        except listing.BadQuery:
            return page("opt_outs.html", 400, title="Opt-outs", number=number,
                        problem="The number must be in E.164 format, like +15558675309.")
        return page("opt_outs.html", title=f"Opt-outs of {number}", number=number,
                    state=state, searched=True)
    query = MultiDict({"cursor": args["cursor"]} if "cursor" in args else {})
    try:
        found = replies.list_opt_outs(storage, query)
    except listing.BadQuery as refusal:
        return page("opt_outs.html", 400, title="Opt-outs", number="", problem=refusal.message)
    older = (url_for("dashboard.opt_outs", cursor=found["nextCursor"])
             if found["nextCursor"] else None)
    return page("opt_outs.html", title="Opt-outs", number="", opt_outs=found["optOuts"],
                older=older, paged="cursor" in args, newest=url_for("dashboard.opt_outs"))
