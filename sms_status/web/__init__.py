"""The web room: routes (blueprints for the API, sends, status callbacks and webhook events),
the dashboard (another), the guards every request passes, errors as JSON (pages on the
dashboard), the health check and the log."""

from flask import request

from sms_status import metrics
from sms_status.web import (
    callbacks,
    dashboard,
    dashboard_replies,  # noqa: F401 (its pages, on the dashboard's blueprint)
    inbound,
    opt_outs,
    routes,
    send,
    webhook_events,
)
from sms_status.web.errors import register_error_handlers
from sms_status.web.guards import read_whole_body, refuse_nul_characters


def register(app):
    """Adds the service's routes, request checks and error handlers to `app`.

    Every request is timed, then passes guard_request, then its blueprint's own guards
    (Twilio's webhooks run guards.check_twilio_webhook); Flask runs the app's before its
    blueprints'.
    """
    metrics.register(app)  # first, so that its clock covers the guards
    app.before_request(guard_request)
    register_error_handlers(app)
    app.register_blueprint(routes.blueprint)
    app.register_blueprint(callbacks.blueprint)
    app.register_blueprint(inbound.blueprint)
    app.register_blueprint(send.blueprint)
    app.register_blueprint(webhook_events.blueprint)
    app.register_blueprint(opt_outs.blueprint)
    dashboard.init_app(app)


def guard_request():
    """What every request passes first: its body read whole, then NUL characters refused,
    except in Twilio's webhooks, whose guards refuse them once the signature holds."""
    read_whole_body()
    if request.blueprint not in (callbacks.blueprint.name, inbound.blueprint.name):
        refuse_nul_characters()
