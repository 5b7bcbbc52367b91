"""What a storage engine is to its callers, and where engines differ.

An engine (sqlite.py, postgres.py) keeps its differences in two objects, as Django's
backends do: `ops`, the SQL that differs, which statements written once put where they
differ; and `features`, what one engine can do and another cannot, for the few callers
that must choose. Each engine subclasses Operations and Features; code that wraps an
engine (the writer process's batches) forwards the two objects whole.
"""

from typing import Any, Protocol, runtime_checkable


class Features:
    """What an engine can do: each engine's subclass says where it differs from these."""

    # Under gunicorn, one process makes every write (writer.py).
    writer_process = False
    # `flask backup` copies the database while the service runs.
    online_backup = False
    # Rows a statement of a window's counts reads at most, about (reads.Stretches); None:
    # the whole window in one statement.
    rows_per_window_statement = None


class Operations:
    """The SQL that differs between engines, for the statements written once."""

    # The next message's storage order (an expression).
    next_storage_order: str
    # Appended to a claim's SELECT: pass over the rows another transaction is settling.
    skip_locked: str

    @staticmethod
    def seconds_between(start, end):
        """The SQL of the seconds from `start` to `end`, two stored times (columns or `?`)."""
        raise NotImplementedError


@runtime_checkable
class Engine(Protocol):
    """Both engines, as their callers see them.

    - `transaction(probe=False)`: a context manager yielding `tx`, with `tx.execute(sql,
      params)` (`?` placeholders) and `tx.lock(name)` (writers of one name take turns);
      `probe`: the health check's, which PostgreSQL runs on a connection of its own;
    - `query(sql, params)`: rows of a read, read by column name;
    - `writer`: under gunicorn on SQLite, the client of the writer process that the
      functions marked `@in_writer_process` go through (writer.py); None otherwise;
    - `records_events`: whether a status change adds its event to the status webhooks'
      outbox (STATUS_WEBHOOK_URL is set), a setting given when the engine is opened;
    - `close()` closes this engine's connections in this process.
    """

    ops: Operations
    features: Features
    label: str
    writer: Any
    records_events: bool

    def transaction(self, probe=False): ...

    def query(self, sql, params=()): ...

    def migrate(self, mode=None): ...

    def compact(self): ...

    def describe_error(self, error): ...

    def identity(self): ...

    def close(self): ...
