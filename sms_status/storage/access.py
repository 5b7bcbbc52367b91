"""The storage room's entry: opening the engine DATABASE_URL names and preparing its database.

Request code reaches the app's engine (sqlite.py or postgres.py) through services.py's
`get_db()`, never through this module. The records themselves are written once, in the SQL
both engines agree on, by job: statuses.py (messages and their statuses), sends.py
(idempotency keys and the hourly limits), maintenance.py (reconciliation, prune, the health
probe, the copy of a history), outbox.py (status webhooks' events).
"""

from sms_status.config import ConfigError, Problem
from sms_status.storage import DATABASE_ERRORS, ModeConflict, open_engine


def open_storage(config, **settings):
    """The engine DATABASE_URL names, created unconnected: it connects on first use.
    `settings` override the configuration's (storage.open_engine)."""
    return open_engine(config.database_url, **{**config.storage_settings, **settings})


def prepare(storage, mode=None):
    """Creates the database's schema or brings it up to date; raises ConfigError naming
    DATABASE_URL when the database cannot be opened.

    With `mode` ("live" or "simulated"), the database keeps the mode it is first used in,
    and a start in the other mode is refused: simulated messages never mix with live ones.
    """
    try:
        storage.migrate(mode)
    except DATABASE_ERRORS as error:
        raise ConfigError([Problem(
            "DATABASE_URL",
            f"DATABASE_URL: cannot open {storage.label}: {storage.describe_error(error)}")]
        ) from None
    except ModeConflict:
        fresh = storage.how_to_start_fresh
        if mode == "live":
            raise ConfigError([Problem(
                "DATABASE_URL",
                f"DATABASE_URL names {storage.label}, which was used in simulation: its "
                "messages are simulated ones, never mixed with live ones. Go live with "
                "another database (unset DATABASE_URL for sms_status.db, or name a new file "
                f"or PostgreSQL database), or {fresh} to start fresh")]) from None
        raise ConfigError([Problem(
            "DATABASE_URL",
            f"DATABASE_URL names {storage.label}, which is used live: simulation never "
            "writes made-up messages into it. Unset DATABASE_URL to simulate with "
            "sms_status_simulated.db, or name another database")]) from None


def recorded_mode(storage):
    """The mode ("live" or "simulated") a database at the current schema was first used
    in, or None when no service has used it yet."""
    rows = storage.query("SELECT mode FROM service_mode")
    return rows[0]["mode"] if rows else None

