"""PostgreSQL, for hosts whose disk does not survive a restart, or more than one instance.

- Each worker process borrows connections from pools of its own, opened after gunicorn
  forks: one for transactions (callbacks, sends, /healthz), a smaller one for reads, whose
  statements have a time limit, so that a flood of reads never holds up a callback.
- Transactions run side by side; `tx.lock(name)` takes a transaction-scoped advisory lock
  where the records need writers to take turns (the hourly limits, an idempotency key).
- Records are written once, with `?` placeholders; they become psycopg's `%s` here.
"""

import functools
import hashlib
import os
import re
import threading
import time
from contextlib import contextmanager

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from sms_status.storage.engine import Features, Operations
from sms_status.storage.schema import (
    MIGRATION_LOCK,
    RECORD_MODE,
    SCHEMA_VERSION,
    ModeConflict,
    migrations,
    newer_schema,
    postgres_seconds_between,
)

POOL_TIMEOUT_SECONDS = 5.0
CONNECT_TIMEOUT_SECONDS = 5
# Lock waits are bounded like SQLite's busy timeout: a stuck transaction elsewhere makes a
# request fail (503) instead of hanging.
LOCK_TIMEOUT_SECONDS = 5.0
# PostgreSQL stops a read's statement after this long (statement_timeout on the read pool's
# connections): a flood of long reads cannot keep the database busy at will.
READ_TIMEOUT_SECONDS = 5.0
# While PostgreSQL is known to be unreachable (the last attempt to connect failed, and
# nothing succeeded since), a request waits this long for a connection instead: during an
# outage every request, /healthz included, answers 503 at once, not after the pool timeout.
UNREACHABLE_WAIT_SECONDS = 0.25
# A request waiting for a connection looks this often whether the server has become known
# to be unreachable meanwhile.
POOL_WAIT_STEP_SECONDS = 0.25


class PostgresFeatures(Features):
    """What PostgreSQL lacks of SQLite's."""

    writer_process = False  # writes run side by side in the request threads
    online_backup = False  # pg_dump does that
    # A window's counts in one statement each (the default): a snapshot held meanwhile
    # grows nothing, and each statement would borrow a pooled connection again.


class PostgresOperations(Operations):
    """PostgreSQL's SQL where the engines differ."""

    seconds_between = staticmethod(postgres_seconds_between)
    # The next message's storage order: a sequence, so concurrent transactions never wait
    # for each other for it (a rolled-back one leaves a gap, which orders nothing wrongly).
    next_storage_order = "nextval('messages_storage_order')"
    # A claim passes over the rows another transaction is settling (storage/outbox.py).
    skip_locked = " FOR UPDATE SKIP LOCKED"


@functools.lru_cache(maxsize=256)
def _pyformat(sql):
    """`?` placeholders as psycopg's `%s` (a literal `%` is doubled first)."""
    return sql.replace("%", "%%").replace("?", "%s")


def _lock_key(name):
    """A stable signed 64-bit advisory-lock key for a name."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big",
                          signed=True)


# libpq's lead-in to a failed connection attempt: the host and port that `label` names.
_CONNECTION_ATTEMPT = re.compile(
    r'(connection (failed|is bad): )?connection to server (at|on socket) "[^"]*"( \([^)]*\))?'
    r'(, port [0-9]+)? failed: ')


class PostgresTransaction:
    """One transaction on a borrowed connection, with SQLite's `?` placeholders."""

    def __init__(self, conn):
        self.conn = conn

    def execute(self, sql, params=()):
        return self.conn.execute(_pyformat(sql), params)

    def lock(self, name):
        """Serialises the transactions that lock the same name, until they end."""
        self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key(name),))

    def plan_by_index(self):
        """Until the transaction ends, plans follow indexes in their order and probe them
        row by row, whatever the statistics say: without statistics (a new database, or a
        burst not analysed yet) the planner takes a table of thousands of rows for a few,
        and read every pending event once per candidate of a claim (seconds a claim)."""
        self.conn.execute("SELECT set_config('enable_bitmapscan', 'off', true),"
                          " set_config('enable_sort', 'off', true)")


class PostgresEngine:
    name = "postgres"
    features = PostgresFeatures()
    ops = PostgresOperations()
    SETTINGS = ("pool_size", "pool_timeout", "lock_timeout", "read_timeout", "records_events")
    writer = None  # writes run in the calling thread

    def __init__(self, url, pool_size=4, pool_timeout=POOL_TIMEOUT_SECONDS,
                 lock_timeout=LOCK_TIMEOUT_SECONDS, read_timeout=READ_TIMEOUT_SECONDS,
                 records_events=False):
        self.url = url
        self.records_events = records_events
        self.pool_size = pool_size
        self.pool_timeout, self.lock_timeout = pool_timeout, lock_timeout
        self.read_timeout = read_timeout
        params = conninfo_to_dict(url)
        # What a message says about the database: never the URL, which holds the password.
        self.label = "PostgreSQL database {!r} at {}:{}{}".format(
            params.get("dbname", "?"), params.get("host", "localhost"),
            params.get("port", "5432"),
            f" as user {params['user']!r}" if params.get("user") else "")
        self._identity = ("postgres", params.get("host", ""), str(params.get("port", "5432")),
                          params.get("dbname", ""))
        # A missing connect_timeout would let an unreachable server hang the start.
        self.connect_options = {} if "connect_timeout" in params else {
            "connect_timeout": CONNECT_TIMEOUT_SECONDS}
        self._pools_of_process = None  # (process id, _Pools)
        self._pools_lock = threading.Lock()

    def identity(self):
        return self._identity

    how_to_start_fresh = "drop its tables"

    def exists(self):
        """A server's database is found by connecting to it: migrate() says if it is not."""
        return True

    def _pools(self):
        """This process's pools, created on first use: gunicorn forks workers after the app
        is loaded, and a pool's connections and threads must never cross a fork."""
        owned = self._pools_of_process
        if owned is None or owned[0] != os.getpid():
            with self._pools_lock:
                owned = self._pools_of_process
                if owned is None or owned[0] != os.getpid():
                    owned = self._pools_of_process = (
                        os.getpid(), _Pools(self, f"sms-status-{os.getpid()}-{id(self):x}"))
        return owned[1]

    def configure_writes(self, conn):
        """A connection for transactions: lock waits are bounded."""
        conn.execute(f"SET lock_timeout = {int(self.lock_timeout * 1000)}")

    def configure_reads(self, conn):
        """A read pool's connection: its statements are also stopped after a time limit."""
        self.configure_writes(conn)
        conn.execute(f"SET statement_timeout = {int(self.read_timeout * 1000)}")

    @contextmanager
    def _connection(self, pool_of):
        pools = self._pools()
        pool = pool_of(pools)
        conn = pools.borrow(pool)
        try:
            yield conn
        finally:
            pool.putconn(conn)

    @contextmanager
    def transaction(self, probe=False):
        """A write transaction; `probe`: the health check's, on a connection of its own."""
        connection = (self._pools().probe_connection() if probe
                      else self._connection(lambda pools: pools.writes))
        with connection as conn, conn.transaction():
            yield PostgresTransaction(conn)

    def query(self, sql, params=()):
        with self._connection(lambda pools: pools.reads) as conn:
            return conn.execute(_pyformat(sql), params).fetchall()

    def migrate(self, mode=None):
        """Creates or upgrades the schema, one instance at a time, in one transaction.

        With `mode`, records it as the database's when none is yet, and raises ModeConflict
        when the database was first used in the other one.
        """
        with psycopg.connect(self.url, autocommit=True, row_factory=dict_row,
                             **self.connect_options) as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key(MIGRATION_LOCK),))
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = conn.execute("SELECT max(version) AS version FROM schema_version").fetchone()
            version = row["version"] or 0
            if newer_schema(version):
                raise psycopg.DataError(newer_schema(version))
            for statement in migrations("postgres", version):
                conn.execute(statement)
            if version < SCHEMA_VERSION:
                conn.execute("DELETE FROM schema_version")
                conn.execute("INSERT INTO schema_version (version) VALUES (%s)",
                             (SCHEMA_VERSION,))
            if mode:
                conn.execute(_pyformat(RECORD_MODE), (mode,))
            recorded = conn.execute("SELECT mode FROM service_mode").fetchone()
        if mode and recorded["mode"] != mode:
            raise ModeConflict(recorded["mode"])
        return SCHEMA_VERSION

    def compact(self):
        """Nothing to do: PostgreSQL's autovacuum and its own WAL recycling reclaim space."""
        return True

    def columns(self, table):
        """The names of a table's columns, in their order."""
        return [row["name"] for row in self.query(
            "SELECT column_name AS name FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND table_name = ?"
            " ORDER BY ordinal_position", (table,))]

    @staticmethod
    def describe_error(error):
        """The error in the server's (or libpq's) own words, on one line.

        Never built from DATABASE_URL: where and as whom is `label`'s to say, and libpq's
        messages never quote the password.
        """
        text = ""
        # libpq continues a message on lines of its own (a hint, another host's attempt),
        # each a sentence: joined with a bare space they would read as one.
        for line in str(error).splitlines():
            line = " ".join(line.split())
            if line:
                text += line if not text else (
                    " " if text.endswith((".", "?", "!", ":")) else ". ") + line
        return _CONNECTION_ATTEMPT.sub("", text) or type(error).__name__

    def close(self):
        """Closes this engine's pools in this process."""
        with self._pools_lock:
            owned, self._pools_of_process = self._pools_of_process, None
        if owned is not None and owned[0] == os.getpid():
            owned[1].close(timeout=1)


def read_pool_size(pool_size):
    """The connections of DATABASE_POOL_SIZE that serve reads: a quarter, at least one."""
    return max(1, pool_size // 4)


class _Pools:
    """One process's pools for one engine, and what it knows of the server.

    Transactions (callbacks, sends, /healthz) borrow from `writes`, reads (`query()`) from
    `reads`, whose statements have a time limit: a flood of long reads (/stats over a
    large window) waits for its own connections, never holding up a callback.

    `failure` is the error of the last attempt to connect when no attempt or check has
    succeeded since: the server is then known to be unreachable, and requests fail fast.
    """

    def __init__(self, engine, name):
        self.label = engine.label
        self.timeout = engine.pool_timeout
        self.failure = None
        reads = read_pool_size(engine.pool_size)
        self.writes = self._open(engine, f"{name}-writes", max(1, engine.pool_size - reads),
                                 engine.configure_writes)
        self.reads = self._open(engine, f"{name}-reads", reads, engine.configure_reads)
        self.engine = engine
        self.probe_lock, self.probe_conn = threading.Lock(), None

    def _open(self, engine, name, size, configure):
        pool = ConnectionPool(
            engine.url, min_size=1, max_size=size, open=False, timeout=engine.pool_timeout,
            connection_class=_watched_connections(self),
            # No `check`: borrow() checks each connection it lends.
            configure=configure,
            # Give up reconnecting soon: the next request that needs a connection starts a
            # new attempt, so recovery follows the server.
            reconnect_timeout=engine.pool_timeout,
            kwargs={"autocommit": True, "row_factory": dict_row, **engine.connect_options},
            name=name,
        )
        pool.open(wait=False)
        return pool

    def borrow(self, pool):
        """A working connection of `pool`, within the pool timeout (else PoolTimeout),
        or at once while the server is known to be unreachable.

        Each connection is checked before it is lent (an empty statement, one round trip).
        One that fails was broken by a restart or loss of the server, and so, most likely,
        are the other idle ones: it goes back to the pool, which discards and replaces it,
        the others are checked at once (pool.check(), which replaces the broken ones), and
        another is borrowed. psycopg_pool's own `check` tried the stale connections one at
        a time, waiting a second, then two, between them: after a restart of the server,
        the first request of each worker waited 5 s and failed.
        """
        deadline = time.monotonic() + self.timeout
        while True:
            step = UNREACHABLE_WAIT_SECONDS if self.failure else POOL_WAIT_STEP_SECONDS
            try:
                conn = pool.getconn(min(step, deadline - time.monotonic()))
            except PoolTimeout:
                if self.failure:
                    raise PoolTimeout(f"cannot connect to {self.label}: "
                                      f"{PostgresEngine.describe_error(self.failure)}") from None
                if time.monotonic() >= deadline:
                    raise PoolTimeout(f"no connection of the pool {pool.name!r} was free "
                                      f"within {self.timeout:g} s") from None
                continue
            try:
                conn.execute("")
            except psycopg.OperationalError:
                pool.putconn(conn)
                pool.check()
                continue
            self.failure = None
            return conn

    @contextmanager
    def probe_connection(self):
        """The health check's connection, kept while it works and made anew after an error.

        The probe runs once a second while /healthz is asked for, outside the pools: one
        that met an outage would leave a pool waiting out its reconnection's backoff, and
        the first callbacks after the server came back answered 503. Made anew, it follows
        the server at once.
        """
        with self.probe_lock:
            if self.probe_conn is None or self.probe_conn.closed:
                self.probe_conn = psycopg.connect(
                    self.engine.url, autocommit=True, row_factory=dict_row,
                    **self.engine.connect_options)
                self.engine.configure_writes(self.probe_conn)
            try:
                yield self.probe_conn
            except psycopg.OperationalError:
                self.probe_conn.close()
                raise

    def close(self, timeout):
        self.writes.close(timeout=timeout)
        self.reads.close(timeout=timeout)
        with self.probe_lock:
            if self.probe_conn is not None:
                self.probe_conn.close()


def _watched_connections(pools):
    """The connection class of `pools`: each attempt to connect tells it how it went."""

    class WatchedConnection(psycopg.Connection):
        @classmethod
        def connect(cls, *args, **kwargs):
            try:
                conn = super().connect(*args, **kwargs)
            except psycopg.OperationalError as error:
                pools.failure = error
                raise
            pools.failure = None
            return conn

    WatchedConnection.__qualname__ = "WatchedConnection"  # as the pool's log lines name it
    return WatchedConnection
