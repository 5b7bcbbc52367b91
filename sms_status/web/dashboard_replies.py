"""The dashboard's pages of what recipients send back: Inbound (the replies, newest first,
by number) and Opt-outs (the numbers opted out now, or one number's opt-out and history).

They are routes of dashboard.py's blueprint, behind its login and headers, and read what
GET /inbound-messages and GET /opt-outs/<number> answer (replies.py).
"""

from flask import current_app, redirect, request, url_for
from werkzeug.datastructures import MultiDict

from sms_status import listing, replies
from sms_status.services import get_db
from sms_status.web.dashboard import blueprint, page

# A reply's kind as the pages name it, by its optOutType.
KIND_OF_OPT_OUT_TYPE = {"STOP": "opt-out", "START": "opt-in", "HELP": "help", None: "reply"}


def filled_in():
    """The query's fields, trimmed; None when the address had empty ones or spaces around
    a value (the caller then redirects to the short address, the one to share)."""
    args = MultiDict([(name, value.strip()) for name, value in request.args.items(multi=True)
                      if value.strip()])
    if list(args.items(multi=True)) != list(request.args.items(multi=True)):
        return None
    return args


@blueprint.get("/inbound", endpoint="inbound")
def inbound_page():
    args = filled_in()
    if args is None:
        return redirect(url_for("dashboard.inbound", **{
            name: value.strip() for name, value in request.args.items() if value.strip()}), 303)
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
    args = filled_in()
    if args is None:
        return redirect(url_for("dashboard.opt_outs", **{
            name: value.strip() for name, value in request.args.items() if value.strip()}), 303)
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
