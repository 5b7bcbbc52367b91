"""The web room: routes (two blueprints), the dashboard (a third), the guards every request
passes, errors as JSON (pages on the dashboard), the health check and the log."""

from sms_status import metrics
from sms_status.web import dashboard, routes, send, webhook_events
from sms_status.web.errors import register_error_handlers
from sms_status.web.guards import read_whole_body, refuse_nul_characters


def register(app):
    """Adds the service's routes, request checks and error handlers to `app`."""
    metrics.register(app)  # first, so that its clock covers the other checks
    app.before_request(read_whole_body)
    app.before_request(refuse_nul_characters)
    register_error_handlers(app)
    app.register_blueprint(routes.blueprint)
    app.register_blueprint(send.blueprint)
    app.register_blueprint(webhook_events.blueprint)
    dashboard.init_app(app)
