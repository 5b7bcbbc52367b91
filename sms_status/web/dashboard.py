"""The delivery dashboard: HTML pages under /dashboard for a person with the API key.

Its numbers and searches are the API's own (listing.py, overview.py), read through the same
storage functions as GET /stats and GET /messages; the pages are Jinja templates
(templates/dashboard/), the chart an SVG drawn on the server, the stylesheet a static file:
no script at all, so a strict Content-Security-Policy holds.

Signing in: a key with the read scope (API_KEY or a named one), typed into a form once,
gives a session cookie (Flask's own signed session) for 12 hours. Its signing secret is
derived from API_KEY, so a new API_KEY ends every session; the cookie holds the time of the
login and the key's name, never the key, and each request checks that key is still active
(api_keys.KeyRing: a revoke ends its sessions within a second). Actions that need the admin
scope are offered to sessions of keys that have it. docs/dashboard.md explains the choices
(cookies, cross-site forms, failed logins).
"""

import hashlib
import hmac
import re
from datetime import datetime, timedelta, timezone
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    current_app,
    g,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask.sessions import SecureCookieSessionInterface
from werkzeug.datastructures import MultiDict

from sms_status import api_keys, listing, overview, rules, twilio_errors, webhooks
from sms_status.services import get_db, services
from sms_status.storage import opt_outs, reads
from sms_status.web import chart
from sms_status.web.logs import log, warn_rejection
from sms_status.webhooks import retry

SESSION_LIFETIME = timedelta(hours=12)
SESSION_COOKIE = "dashboard_session"
# The Content-Security-Policy of every page: nothing but this service's own files, no
# inline script or style, no framing, forms posted only here.
CONTENT_SECURITY_POLICY = ("default-src 'self'; base-uri 'none'; form-action 'self'; "
                           "frame-ancestors 'none'")
SEARCH_FIELDS = ("to", "status", "errorCode", "reference", "sentBy", "sid", "since", "until")
# The search's time fields, by parameter, as the form names them: UTC unless a time says
# otherwise (the form's fields have no timezone; links from the overview carry a Z).
TIME_FIELDS = {"since": "Created from", "until": "Created before"}
# Twilio's SIDs are two letters and 32 hexadecimal digits; any letters and digits are looked up.
SID_PATTERN = re.compile(r"[A-Za-z0-9]{1,64}")
TWILIO_ERROR_PAGE = twilio_errors.DOCS_URL
# Where the login may send the browser on to: a page of the dashboard, by a path of plain
# segments (no dot segments, no percent-escapes, so nothing a browser or proxy would decode
# or normalise into another path) and a query of URL characters. Never a host or a scheme.
NEXT_PATH = re.compile(r"/dashboard(/[A-Za-z0-9_~-][A-Za-z0-9_.~-]*)*")
NEXT_QUERY = re.compile(r"[A-Za-z0-9_.~%+=&,:@!$'()*;/-]*")
MAX_NEXT_LENGTH = 2000

blueprint = Blueprint("dashboard", __name__, url_prefix="/dashboard",
                      template_folder="templates", static_folder="static")


def init_app(app):
    """The session cookie's settings: signed with a secret derived from API_KEY, HttpOnly,
    SameSite=Strict, Secure when BASE_URL is https, sent to /dashboard only, and valid for
    12 hours from the login (not renewed by use)."""
    config = app.config["SERVICE"]
    if config.api_key:
        app.secret_key = hmac.new(config.api_key.encode(), b"sms-status dashboard session",
                                  hashlib.sha256).hexdigest()
    app.session_interface = DashboardSessions()
    app.config.update(
        SESSION_COOKIE_NAME=SESSION_COOKIE,
        SESSION_COOKIE_PATH=blueprint.url_prefix,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        SESSION_COOKIE_SECURE=config.base_url.startswith("https://"),
        SESSION_REFRESH_EACH_REQUEST=False,
        PERMANENT_SESSION_LIFETIME=SESSION_LIFETIME,
    )
    app.register_blueprint(blueprint)


class DashboardSessions(SecureCookieSessionInterface):
    """Flask's signed cookie sessions, except that a request without the cookie (every API
    request and status callback: the cookie goes to /dashboard only) gets its empty session
    without building the cookie's signer and parsing its cookies first, as Flask does for
    every request: a tenth of a status callback's time in the app (docs/performance.md)."""

    def open_session(self, app, request):
        # Without the cookie's name in the Cookie header, the cookie is not there.
        cookies = request.environ.get("HTTP_COOKIE", "")
        if app.secret_key and self.get_cookie_name(app) not in cookies:
            return self.session_class()
        return super().open_session(app, request)


def under_dashboard(path):
    return path == blueprint.url_prefix or path.startswith(blueprint.url_prefix + "/")


# --- signing in ---------------------------------------------------------------------------

def key_required():
    """False when the service runs without API_KEY (simulation only): the dashboard is then
    open, as the API is."""
    return bool(current_app.config["SERVICE"].api_key)


def signed_in():
    """True when the request's session is a live login: its signature holds (the current
    API_KEY's), it is less than 12 hours old by the service's clock, and its key is still
    active with the read scope."""
    return session_key() is not None


def session_key():
    """The key of the request's live session (api_keys.Key), or None; without API_KEY,
    a key with every scope. Looked up once per request."""
    if "session_key" in g:
        return g.session_key
    g.session_key = None
    if not key_required():
        g.session_key = api_keys.Key("", frozenset(api_keys.SCOPES))
        return g.session_key
    started = session.get("signed_in_at")
    now = current_app.config["CLOCK"]()
    if not (isinstance(started, (int, float)) and started <= now < started + (
            SESSION_LIFETIME.total_seconds())):
        return None
    # A session from before named keys was an API_KEY login: only it could sign one.
    name = session.get("key", api_keys.SETTING_KEY_NAME)
    key = services().keys.key_named(get_db(), name) if isinstance(name, str) else None
    if key is not None and "read" in key.scopes:
        g.session_key = key
    return g.session_key


def may(scope):
    """Whether the session's key has `scope` (for the pages: what to offer)."""
    key = session_key()
    return key is not None and scope in key.scopes


@blueprint.before_request
def require_session():
    if request.endpoint in ("dashboard.static", "dashboard.login", "dashboard.logout"):
        return None
    if not signed_in():
        here = request.path + (f"?{request.query_string.decode()}" if request.query_string
                               else "")
        following = page_after_login(here) if request.method == "GET" else None
        return redirect(url_for("dashboard.login", next=following), 303)
    return None


def page_after_login(wanted):
    """`wanted` when it is a page of the dashboard to open after the login (see NEXT_PATH),
    else None; the overview's plain address goes without saying."""
    if not isinstance(wanted, str) or len(wanted) > MAX_NEXT_LENGTH:
        return None
    path, _, query = wanted.partition("?")
    if (not NEXT_PATH.fullmatch(path) or not NEXT_QUERY.fullmatch(query)
            or wanted == blueprint.url_prefix or path == url_for("dashboard.login")):
        return None
    return wanted


@blueprint.before_request
def refuse_cross_site_posts():
    """A form posted from another site is refused, whatever its cookie (SameSite=Strict
    keeps the session away from it already)."""
    if request.method == "POST" and posted_from_another_site():
        warn_rejection("Refused %s %s: a form posted from another site", request.method,
                       rules.printable(request.path, 100))
        return error_page(403, "This form was posted from another site. Open the dashboard "
                               "at this service's own address and use its forms.")
    return None


def posted_from_another_site():
    """True when the browser says the request comes from another site: in Sec-Fetch-Site,
    or, from browsers that do not send that header (Safari before 16.4), in an Origin that
    is not this service's own."""
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if fetch_site is not None:
        return fetch_site in ("cross-site", "same-site")
    origin = request.headers.get("Origin")
    return origin is not None and origin.lower() not in own_origins()


def own_origins():
    """The origins this service's pages have: BASE_URL's, and the one the request was
    addressed to (the same unless a proxy in front changes the scheme or the host)."""
    base = urlsplit(current_app.config["SERVICE"].base_url)
    host = f"[{base.hostname}]" if ":" in (base.hostname or "") else base.hostname
    default_port = {"http": 80, "https": 443}.get(base.scheme)
    port = f":{base.port}" if base.port not in (None, default_port) else ""
    return {f"{base.scheme}://{host}{port}".lower(),
            f"{request.scheme}://{request.host}".lower()}


@blueprint.route("/login", methods=["GET", "POST"])
def login():
    # The page asked for before the login, carried through the form as `next`.
    following = page_after_login(request.values.get("next"))
    after = following or url_for("dashboard.overview")
    if not key_required():
        return redirect(after, 303)
    if request.method == "GET":
        if signed_in():
            return redirect(after, 303)
        return page("login.html", title="Log in", next=following)
    given = request.form.get("api_key", "")
    if not given.strip():
        return page("login.html", 400, title="Log in", next=following,
                    problem="Enter an API key with the read scope to log in.")
    key = services().keys.key_for(get_db(), given.strip(), current_app.config["CLOCK"]())
    if key is None:
        # Counted like every refusal: a line each, within the log's budget (logs.py).
        warn_rejection("Refused dashboard login: wrong or revoked API key")
        return page("login.html", 401, title="Log in", next=following,
                    problem="That is not an active key of this service. Enter API_KEY's "
                            "value, or a key from 'flask --app app keys create', exactly as "
                            "it was given.")
    if "read" not in key.scopes:
        warn_rejection("Refused dashboard login: key %s has no 'read' scope", key.name)
        return page("login.html", 403, title="Log in", next=following,
                    problem=f"The key {key.name!r} may not read, so it cannot open the "
                            "dashboard: log in with a key that has the read scope.")
    session.clear()
    session.permanent = True
    session["signed_in_at"] = current_app.config["CLOCK"]()
    session["key"] = key.name
    log.info("Dashboard login with key %s", key.name)
    return redirect(after, 303)


@blueprint.post("/logout")
def logout():
    if not key_required():
        return redirect(url_for("dashboard.overview"), 303)
    session.clear()
    return redirect(url_for("dashboard.login"), 303)


# --- pages --------------------------------------------------------------------------------

@blueprint.get("", endpoint="overview")
def overview_page():
    window = request.args.get("window", overview.DEFAULT_WINDOW)
    if window not in overview.WINDOWS:
        return error_page(400, "The overview shows one of these windows: "
                               + ", ".join(f"window={name}" for name in overview.WINDOWS)
                               + f" (default {overview.DEFAULT_WINDOW}).",
                          windows=overview.WINDOWS)
    found = overview.delivery_overview(get_db(), window, current_app.config["CLOCK"]())
    stats = found["stats"]
    return page("overview.html", title="Overview", window=window, windows=overview.WINDOWS,
                stats=stats, statuses=chart.ordered_statuses(stats["byStatus"]),
                chart=chart.stacked_bars(
                    found["buckets"], overview.WINDOWS[window][1].total_seconds()),
                errors=[error_row(entry) for entry in stats["errors"]],
                outcomes=listing.DELIVERY_OUTCOMES,
                pending=",".join(s for s in rules.STATUS_RANK if s not in rules.FINAL_STATUSES),
                status_webhooks=status_webhooks_overview(stats))


def status_webhooks_overview(stats):
    """The status webhooks' section of the overview: the events of the window still pending
    and given up on (as /stats counts them), the whole backlog, and the latest failures;
    None when webhooks are off."""
    if not webhooks.recording(current_app):
        return None
    storage = get_db()
    return {**stats["webhooks"], "backlog": reads.pending_webhook_events(storage),
            "latestFailures": webhook_events(storage, 10, state="failed")}


def message_webhook_events(sid):
    """A message's status webhook events, newest first, with their attempts; None when
    webhooks are off and it has none."""
    events = webhook_events(get_db(), MAX_EVENTS_OF_A_MESSAGE, sid=sid)
    if not events and not webhooks.recording(current_app):
        return None
    return events


# More than a message's statuses and replays ever make.
MAX_EVENTS_OF_A_MESSAGE = 200


def webhook_events(storage, limit, **filters):
    """Events newest first as GET /webhook-events shows them."""
    return [listing.webhook_event_item(row)
            for row in reads.webhook_events_page(storage, limit, **filters)]


def explained(code):
    """(what a Twilio error code means, or None when this service does not know it, and
    Twilio's page for it)."""
    sentence, link = twilio_errors.ERRORS.get(code, (None, None))
    return sentence, link or TWILIO_ERROR_PAGE.format(code=code)


def error_row(entry):
    """An error of the overview: code, count, what it means and Twilio's page for it."""
    sentence, link = explained(entry["code"])
    return {"code": entry["code"], "count": entry["count"], "description": sentence,
            "link": link}


def filled_in_query(endpoint):
    """A search page's query: its fields trimmed, and None; or, when the address had empty
    fields (the form sends them too) or spaces around a value, None and the redirect to
    `endpoint`'s short address, which is the one to share and the one "older" pages
    extend."""
    args = MultiDict([(name, value.strip()) for name, value in request.args.items(multi=True)
                      if value.strip()])
    if list(args.items(multi=True)) != list(request.args.items(multi=True)):
        return None, redirect(url_for(endpoint, **args.to_dict(flat=False)), 303)
    return args, None


@blueprint.get("/messages", endpoint="messages")
def messages_page():
    # Only the fields filled in are parameters, named and checked as GET /messages names
    # and checks them.
    args, short_address = filled_in_query("dashboard.messages")
    if short_address is not None:
        return short_address
    form = {name: args.get(name, "") for name in SEARCH_FIELDS}
    form.update({name: time_field_value(form[name]) for name in TIME_FIELDS})
    if "sid" in args:
        # GET /messages has no SID filter: a SID names one message, whose page opens.
        if SID_PATTERN.fullmatch(args["sid"]):
            return redirect(url_for("dashboard.message", sid=args["sid"]), 303)
        return search_page(400, form, problem="A message SID is letters and digits, like "
                                              "SM followed by 32 characters.")
    try:
        found = listing.list_messages(get_db(), searched(args))
    except listing.BadQuery as refusal:
        # The form sends a + as it should: the API's advice about URLs does not apply.
        return search_page(400, form,
                           problem=refusal.message.replace(listing.PLUS_IN_A_URL, ""))
    older = None
    if found["nextCursor"]:
        older = url_for("dashboard.messages",
                        **{**args.to_dict(flat=True), "cursor": found["nextCursor"]})
    return search_page(200, form, messages=found["messages"], older=older,
                       paged="cursor" in args,
                       newest=url_for("dashboard.messages",
                                      **{k: v for k, v in args.to_dict(flat=True).items()
                                         if k != "cursor"}))


def search_page(status, form, **context):
    return page("messages.html", status, title="Messages", form=form,
                statuses=rules.STATUS_RANK, **context)


def searched(args):
    """The search's parameters for GET /messages' parsing, its times as ISO 8601 instants
    (UTC unless they say otherwise); a time that cannot be read is refused (BadQuery) in the
    form's words."""
    query = MultiDict(args)
    moments = {}
    for name, label in TIME_FIELDS.items():
        if name not in args:
            continue
        values = []
        for text in args.getlist(name):
            moment = typed_time(text)
            if moment is None:
                raise listing.BadQuery(name, f"“{label}” must be a date and time in UTC, "
                                             "like 2026-12-03 07:00.")
            moments[name] = moment
            values.append(moment.isoformat())
        query.setlist(name, values)
    if (all(len(args.getlist(name)) == 1 for name in TIME_FIELDS)
            and moments["since"] >= moments["until"]):
        raise listing.BadQuery("since", "“Created from” must be before “Created before”.")
    return query


def typed_time(text):
    """A date and time as the search takes it (ISO 8601, UTC without a timezone), or None."""
    if not (text.isascii() and len(text) <= 64):
        return None
    try:
        moment = datetime.fromisoformat(text.upper())  # RFC 3339 allows t and z
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def time_field_value(text):
    """A searched time as the form's datetime-local field shows it (UTC, to the second or
    the millisecond); what cannot be read is shown as it came."""
    moment = typed_time(text)
    try:
        moment = moment and moment.astimezone(timezone.utc)
    except OverflowError:
        moment = None
    if moment is None:
        return text
    shown = moment.strftime("%Y-%m-%dT%H:%M:%S")
    return shown + f".{moment.microsecond // 1000:03d}" if moment.microsecond else shown


@blueprint.get("/messages/<sid>", endpoint="message")
def message_page(sid):
    message = listing.message_with_history(get_db(), sid)
    if message is None:
        return error_page(404, f"No message with SID {sid} is known to this service.")
    sentence, link = explained(message["errorCode"])
    recipient_opt_out = (opt_outs.opt_out_of(get_db(), message["to"])
                         if message["to"] else None)
    return page("message.html", title=f"Message {sid}", message=message,
                error_sentence=sentence, error_link=link,
                webhook_events=message_webhook_events(sid),
                recipient_opt_out=recipient_opt_out)


@blueprint.post("/webhook-events/<event_id>/retry", endpoint="retry_webhook_event")
def retry_webhook_event_page(event_id):
    """POST /webhook-events/<id>/retry from the message's page, for a key with admin: the
    event is queued again and the page shown again."""
    if not may("admin"):
        warn_rejection("Refused a dashboard retry: key %s has no 'admin' scope",
                       session_key().name)
        return error_page(403, "Retrying a status webhook needs a key with the admin scope: "
                               "log in with one.")
    outcome = retry.queue_again(get_db(), services().webhooks, event_id,
                                current_app.config["CLOCK"]())
    if outcome.result == "unknown":
        return error_page(404, f"No status webhook event with id {event_id} is known to "
                               "this service.")
    if outcome.result == "off":
        return error_page(409, "Status webhooks are off: set STATUS_WEBHOOK_URL and "
                               "STATUS_WEBHOOK_SECRET, then retry.")
    log.info("Dashboard: status webhook event %s queued again by key %s", event_id,
             session_key().name or "-")
    if outcome.event["sid"] is None:  # an event of a number's replies or opt-outs
        return redirect(url_for("dashboard.overview"), 303)
    return redirect(url_for("dashboard.message", sid=outcome.event["sid"]) + "#status-webhooks",
                    303)


# --- how the pages write numbers and times -------------------------------------------------

@blueprint.app_template_filter("when")
def when(stored, milliseconds=False):
    """A stored timestamp as people read it: 2026-12-03 07:21:55 UTC (or 07:21:55.412)."""
    return f"{stored[:10]} {stored[11:23 if milliseconds else 19]} UTC" if stored else ""


@blueprint.app_template_filter("number")
def number(value):
    return f"{value:,}"


@blueprint.app_template_filter("percent")
def percent(share):
    return "–" if share is None else f"{share * 100:.1f}%"


@blueprint.app_template_filter("seconds")
def seconds(value):
    if value < 60:
        return f"{value:.1f} s"
    minutes, rest = divmod(round(value), 60)
    if minutes < 60:
        return f"{minutes} min {rest} s"
    return f"{minutes // 60} h {minutes % 60} min"


blueprint.add_app_template_filter(chart.status_class, "status_class")


# --- answers ------------------------------------------------------------------------------

def page(template, status=200, **context):
    """A page of templates/dashboard/, with the dashboard's headers. Its `problem`, if
    any, is what a 400 is logged with (errors.py's log_bad_request reads it from g)."""
    if context.get("problem"):
        g.refusal = context["problem"]
    response = current_app.make_response((render_template(
        f"dashboard/{template}", signed_in_nav=key_required() and signed_in(),
        key_required=key_required(), key_name=key_required() and signed_in()
        and session_key().name, may_admin=may("admin"), **context), status))
    return with_headers(response)


def with_headers(response):
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    # frame-ancestors' older equivalent, for browsers that do not read it from the CSP.
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "no-store"
    return response


def error_page(status, message, **context):
    """An HTML error page saying what to do."""
    return page("error.html", status, title=f"Error {status}", problem=message, **context)
