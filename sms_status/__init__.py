"""SMS delivery-status service: send through Twilio, verify its status callbacks, keep history.

`create_app()` builds the service; app.py, the entry, builds it once for `gunicorn app:app`,
`flask --app app` and `python app.py`. Importing the package builds nothing. Configuration
comes from the environment and an optional .env file (.env.example).

The rooms: web/ (routes, guards, errors, health, logs), storage/ (SQLite and PostgreSQL,
the records, the webhooks' outbox and the writer process), webhooks/ (status events pushed
to the sender's application), serving/ (gunicorn's worker), and beside them the
configuration, the send flow, the listings, Twilio's client and its simulator.
"""

import os
import sys
import time

import click
from dotenv import load_dotenv
from flask import Flask
from twilio.request_validator import RequestValidator

from sms_status import twilio_api, web
from sms_status.api_keys import KeyRing
from sms_status.commands import register_commands
from sms_status.config import ConfigError, read_config
from sms_status.logs import LogBudget, configure_logging, log
from sms_status.services import Services
from sms_status.storage import access
from sms_status.web.guards import MAX_CALLBACK_FIELDS, MAX_REQUEST_BYTES
from sms_status.web.health import HealthMonitor
from sms_status.web.logs import REJECTION_WARNINGS_PER_MINUTE
from sms_status.web.routes import BacklogRead
from sms_status.webhooks.delivery import Delivery


def create_app(test_config=None, http_client=None, clock=time.time, for_commands=False,
               storage_settings=None):
    """Builds the app from the environment, or from `test_config` (a mapping like the environment).

    `http_client` replaces Twilio's HTTP transport; by default it is Twilio's own, or the
    simulator when TWILIO_SIMULATE=true. `clock` gives the time for rate limits and key expiry.

    `storage_settings` override the storage engine's (storage.open_engine: its timeouts).

    `for_commands`: for the flask command line, which loads the app to find its commands
    (and their --help). The configuration's problems are kept instead of raised, and the
    database is not opened: each command checks the variables it uses and opens the
    database when it runs (commands.py).
    """
    if test_config is None:
        load_dotenv(os.path.join(os.getcwd(), ".env"), override=False)
        test_config = os.environ
    config, problems = read_config(test_config)
    if problems and not for_commands:
        raise ConfigError(problems)
    configure_logging(config.log_level)

    app = Flask(__name__)
    # One byte over the limit, so that a chunked body's length can be checked (below).
    app.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES + 1
    app.config["MAX_FORM_PARTS"] = MAX_CALLBACK_FIELDS
    app.config["SERVICE"] = config
    app.config["CLOCK"] = clock
    app.config["SLEEP"] = time.sleep
    app.config["CONFIG_PROBLEMS"] = problems
    if for_commands:
        # A maintenance command's reads (counting a million messages) may take their time.
        storage_settings = {"read_timeout": 0, **(storage_settings or {})}
    # None only for the commands, when DATABASE_URL is malformed: they say so before use.
    storage = (access.open_storage(config, **(storage_settings or {}))
               if config.database_url else None)
    app_services = Services(
        storage=storage,
        twilio=twilio_api.build_client(config, http_client),
        validator=RequestValidator(config.auth_token),
        shared_key_validator=(RequestValidator(config.webhook_signing_key)
                              if config.webhook_signing_key else None),
        health=HealthMonitor(app),
        backlog=BacklogRead(),
        rejection_log=LogBudget(REJECTION_WARNINGS_PER_MINUTE),
        keys=KeyRing(config.api_key),
        # Started in each server process (gunicorn.conf.py, app.py), never here.
        webhooks=(Delivery(config.status_webhook, storage, clock)
                  if config.status_webhook is not None and storage is not None else None),
    ).install(app)
    web.register(app)
    register_commands(app)
    if for_commands:
        return app

    access.prepare(storage, config.mode)
    app_services.storage_prepared = True

    if config.simulate:
        log.warning("SIMULATION MODE: Twilio is simulated, no SMS will be sent to any phone.")
    elif not config.allowed_destinations:
        log.warning("ALLOWED_DESTINATIONS is unset: /send-sms may send to any country, which "
                    "a leaked API key can use for SMS pumping; set it to the prefixes you "
                    "send to, like ALLOWED_DESTINATIONS=+1,+44")
    log.info("Ready (%s mode): database %s, status callbacks to %s, status webhooks %s",
             config.mode, storage.label, config.status_callback_url,
             f"to {config.status_webhook.display_url}" if config.status_webhook else "off")
    return app


def create_app_or_exit():
    """For gunicorn and `python app.py`: a configuration error ends the process with one message.

    The flask command line loads the app while it is still choosing the command to run (its
    group's context is the current one; `flask run` and other built-in commands load it
    later, from their own): the app is then built for the commands, which check what each
    uses, so that `--help` and `prune` need neither Twilio's credentials nor an API key.
    """
    context = click.get_current_context(silent=True)
    if context is not None and isinstance(context.command, click.Group):
        return create_app(for_commands=True)
    try:
        return create_app()
    except ConfigError as error:
        print(error, file=sys.stderr, flush=True)
        raise SystemExit(2) from None

