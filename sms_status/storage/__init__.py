"""The storage room: the message history on SQLite (the embedded default) or PostgreSQL.

Request code reaches the database through access.py's `get_db()`, the record functions
(statuses.py, sends.py, maintenance.py, outbox.py: each written once in the SQL both engines
agree on) and the listings' queries (reads.py); what differs between the engines lives in
sqlite.py and postgres.py, and the schema both reach in schema.py.

Both engines are the same to their callers: engine.py's Engine protocol, with the SQL
that differs on `engine.ops` (`seconds_between`, `next_storage_order`, `skip_locked`) and
what one engine has and the other has not on `engine.features` (`writer_process`,
`online_backup`), for the callers that must know.
"""

import os
import sqlite3

import psycopg

from sms_status.storage.engine import Engine, Features, Operations
from sms_status.storage.postgres import PostgresEngine
from sms_status.storage.schema import ModeConflict
from sms_status.storage.sqlite import ReadTimeLimit, SQLiteEngine


class OutcomeUnknown(sqlite3.OperationalError):
    """SQLite's writer process (writer.py) was handed a write but gave no answer: it may or
    may not be committed."""


# Every error either engine raises (a pool that cannot lend a connection in time included,
# and the writer process's OutcomeUnknown).
DATABASE_ERRORS = (sqlite3.Error, psycopg.Error)
# A read stopped for taking longer than its engine's time limit.
READ_TIME_LIMIT_ERRORS = (psycopg.errors.QueryCanceled, ReadTimeLimit)

__all__ = ["DATABASE_ERRORS", "READ_TIME_LIMIT_ERRORS", "Engine", "Features", "ModeConflict",
           "Operations", "OutcomeUnknown", "PostgresEngine", "SQLiteEngine", "open_engine"]


def open_engine(url, **settings):
    """The engine a database URL names, unconnected: it connects on first use.

    `sqlite:///relative.db`, `sqlite:////absolute/path.db`, or `postgres://` and
    `postgresql://` URLs. Each engine takes the settings it knows (its SETTINGS) and leaves
    the other's: `synchronous`, `checkpoints` and `busy_timeout` for SQLite; `pool_size`,
    `pool_timeout` and `lock_timeout` for PostgreSQL; `read_timeout` for both (seconds), and
    `records_events` (whether a status change adds its event to the status webhooks' outbox).
    """
    if url.startswith(("postgres://", "postgresql://")):
        engine_class, location = PostgresEngine, url
    elif url.startswith("sqlite:///") and url != "sqlite:///":
        engine_class, location = SQLiteEngine, os.path.abspath(url[len("sqlite:///"):])
    else:
        raise ValueError("a database URL is sqlite:///path or postgres://...")
    unknown = set(settings) - set(SQLiteEngine.SETTINGS) - set(PostgresEngine.SETTINGS)
    if unknown:
        raise TypeError(f"no engine takes {sorted(unknown)}")
    return engine_class(location, **{name: value for name, value in settings.items()
                                     if name in engine_class.SETTINGS})
