"""The app's services: the objects `create_app` builds once and requests use, typed.

One `Services` per app, kept on it by `create_app`; `services()` returns the current app's
(in a request or a command), `services(app)` a given app's. A new per-app object is a field
here, so that a reader sees every one of them, and their types, in one place.
"""

from dataclasses import dataclass
from typing import Any, Optional

from flask import current_app
from twilio.request_validator import RequestValidator

from sms_status.api_keys import KeyRing
from sms_status.logs import LogBudget

# The key under which an app keeps its Services (Flask's place for an extension's state).
EXTENSION = "sms_status"


@dataclass
class Services:
    """What requests, commands and the server's hooks use, built once per app."""

    # The storage engine DATABASE_URL names (storage/sqlite.py or storage/postgres.py);
    # None only for the commands when DATABASE_URL is malformed: they say so before use.
    storage: Any
    # Twilio's REST client (twilio_api.build_client), or the simulator's.
    twilio: Any
    # Checks X-Twilio-Signature with the auth token.
    validator: RequestValidator
    # What /healthz answers from (web/health.py's HealthMonitor).
    health: Any
    # The webhook backlog for GET /metrics (web/routes.py's BacklogRead).
    backlog: Any
    # The budget of warnings about refused requests.
    rejection_log: LogBudget
    # The named API keys this process has looked up, kept for at most a second, and
    # API_KEY's (api_keys.py).
    keys: KeyRing
    # Checks signatures made with WEBHOOK_SIGNING_KEY, when it is set.
    shared_key_validator: Optional[RequestValidator] = None
    # The status webhooks' delivery loop (webhooks/delivery.py), when STATUS_WEBHOOK_URL is set.
    webhooks: Any = None
    # Whether the database's schema is known to be up to date (create_app or a command).
    storage_prepared: bool = False

    def install(self, app):
        """Keeps these services on `app`."""
        app.extensions[EXTENSION] = self
        return self


def services(app=None) -> Services:
    """The services of `app`, or of the current app."""
    return (app if app is not None else current_app).extensions[EXTENSION]


def get_db():
    """The current app's storage engine (SQLite or PostgreSQL, as DATABASE_URL says): the
    only way request code reaches the database."""
    return services().storage
