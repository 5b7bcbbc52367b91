"""The two database engines behind db.py: SQLite, the embedded default, and PostgreSQL.

db.py writes every query once, in the SQL both engines agree on, with `?` placeholders.
What differs between them lives here and only here:

- connections: SQLite keeps one per thread; PostgreSQL borrows one from a pool per worker
  process for each transaction or read, opened after gunicorn forks;
- transactions and locking: SQLite's writers queue for its single write lock, so one
  write transaction serialises against every other; PostgreSQL's run side by side, and
  `tx.lock(name)` takes a transaction-scoped advisory lock where db.py needs one;
- placeholders (`?` becomes `%s`), time arithmetic, and the schema's DDL and version.

Both engines expose the same methods: `transaction()` (a context manager yielding `tx`
with `tx.execute(sql, params)` and `tx.lock(name)`), `query(sql, params)` for reads,
`migrate()`, `compact()` (after a bulk delete), `seconds_between(start, end)`,
`next_storage_order` (the SQL of a new message's storage order), `describe_error(error)`
and `close()`. SQLite's engine also has `checkpoint()` and a `writer`: under gunicorn, the
client of the writer process (writer.py) that db.py's writes go through.
"""

import fcntl
import functools
import hashlib
import itertools
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from urllib.parse import quote, unquote, urlsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from sms_status.config import SIMULATED_ACCOUNT_SID

# Every error either engine raises (a pool that cannot lend a connection in time included).
DATABASE_ERRORS = (sqlite3.Error, psycopg.Error)

# The schema version both engines reach: SQLite's PRAGMA user_version, PostgreSQL's
# schema_version table. A database with a newer version is refused, never downgraded.
SCHEMA_VERSION = 9

BUSY_TIMEOUT_MS = 5000
# The WAL is cut back to this size whenever a checkpoint empties it: without a limit, one
# large transaction (or a long read holding checkpoints back) leaves it that large forever.
JOURNAL_SIZE_LIMIT_BYTES = 16 * 1024 * 1024
# How long compact() waits for readers to leave the WAL; writers wait while it does.
CHECKPOINT_BUSY_TIMEOUT_MS = 200
POOL_TIMEOUT_SECONDS = 5
CONNECT_TIMEOUT_SECONDS = 5


def open_engine(config, checkpoints=True):
    """The engine the configuration names; nothing is connected until first use.

    `checkpoints=False`: SQLite's commits leave the WAL for checkpoint() to copy.
    """
    if config.database_engine == "postgres":
        return PostgresEngine(config.database_url, config.database_pool_size)
    return SQLiteEngine(config.database_path, config.sqlite_synchronous, checkpoints)


def sqlite_seconds_between(start, end):
    """SQL for the seconds from one stored timestamp to another, in SQLite."""
    return f"((julianday({end}) - julianday({start})) * 86400.0)"


def postgres_seconds_between(start, end):
    """SQL for the seconds from one stored timestamp to another, in PostgreSQL."""
    return f"extract(epoch FROM (({end})::timestamptz - ({start})::timestamptz))::float8"


# GET /messages pages (newest first, by itself or per recipient, status or error code) and
# the windows of GET /stats; the same statements on both engines. Each message also keeps
# the seconds from its creation to its `delivered` event, so that /stats reads the time to
# delivery from the messages of its window alone.
QUERY_INDEXES = """
    CREATE INDEX messages_by_creation ON messages (created_at, sid, seconds_to_delivered);
    CREATE INDEX messages_by_recipient_and_creation ON messages (to_number, created_at, sid);
    CREATE INDEX messages_by_status_and_creation ON messages (latest_status, created_at, sid);
    CREATE INDEX messages_by_error_and_creation ON messages (error_code, created_at, sid);
    UPDATE messages SET seconds_to_delivered = (
        SELECT {seconds} FROM status_events
        WHERE status_events.message_sid = messages.sid AND status_events.status = 'delivered')
    """


# Each message's place in the order of storage (`storage_order`, larger is stored later):
# GET /messages lists messages created in the same millisecond newest-stored first, so its
# pages follow (created_at, storage_order), as the indexes serving them do. Every insert of a
# message takes the engine's `next_storage_order`. The same DDL on both engines around each
# engine's own ALTER TABLE and numbering of the messages already stored: the indexes that
# change are dropped before the numbering, which then need not update them row by row.
DROP_QUERY_INDEXES = """
    DROP INDEX messages_by_creation;
    DROP INDEX messages_by_recipient_and_creation;
    DROP INDEX messages_by_status_and_creation;
    DROP INDEX messages_by_error_and_creation;
    """
STORAGE_ORDER_INDEXES = """
    CREATE UNIQUE INDEX messages_by_storage_order ON messages (storage_order);
    CREATE INDEX messages_by_creation
        ON messages (created_at, storage_order, seconds_to_delivered);
    CREATE INDEX messages_by_recipient_and_creation
        ON messages (to_number, created_at, storage_order);
    CREATE INDEX messages_by_status_and_creation
        ON messages (latest_status, created_at, storage_order);
    CREATE INDEX messages_by_error_and_creation ON messages (error_code, created_at, storage_order)
    """


# The mode ("live" or "simulated") a database was first used in, the same DDL on both
# engines; a database from before version 8 that holds messages of the simulated account
# was used in simulation (both modes then shared one default file).
SERVICE_MODE_TABLE = f"""
    CREATE TABLE service_mode (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        mode TEXT NOT NULL CHECK (mode IN ('live', 'simulated'))
    );
    INSERT INTO service_mode (id, mode) SELECT 1, 'simulated'
        WHERE EXISTS (SELECT 1 FROM messages WHERE account_sid = '{SIMULATED_ACCOUNT_SID}')
    """
RECORD_MODE = "INSERT INTO service_mode (id, mode) VALUES (1, ?) ON CONFLICT (id) DO NOTHING"


class ModeConflict(Exception):
    """The database was first used in the other mode (`recorded`)."""

    def __init__(self, recorded):
        super().__init__(recorded)
        self.recorded = recorded


# --- SQLite --------------------------------------------------------------------------------

# The indexes the service-wide hourly limit (MAX_SENDS_PER_HOUR) counts with; the same DDL
# on both engines.
SENDS_PER_HOUR_INDEXES = """
    CREATE INDEX IF NOT EXISTS messages_by_sent_at ON messages (sent_at);
    CREATE INDEX IF NOT EXISTS send_reservations_by_expiry ON send_reservations (counts_until);
    """

# Each entry (version, script) moves the schema to that version; PRAGMA user_version records
# how far a database has come, so a live database is migrated in place at start.
SQLITE_MIGRATIONS = [
    (1, """
    CREATE TABLE messages (
        sid TEXT PRIMARY KEY,
        account_sid TEXT,
        to_number TEXT,
        from_number TEXT,
        body TEXT,
        initial_status TEXT,
        latest_status TEXT NOT NULL,
        error_code INTEGER,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        sent_at TEXT
    );
    CREATE TABLE status_events (
        id INTEGER PRIMARY KEY,
        message_sid TEXT NOT NULL REFERENCES messages(sid) ON DELETE CASCADE,
        status TEXT NOT NULL,
        error_code INTEGER,
        received_at TEXT NOT NULL,
        UNIQUE (message_sid, status)
    );
    CREATE INDEX messages_by_recipient ON messages (to_number, sent_at);
    CREATE INDEX messages_by_update ON messages (updated_at);
    CREATE TABLE health_checks (id INTEGER PRIMARY KEY CHECK (id = 1), checked_at TEXT);
    """),
    (2, """
    CREATE TABLE idempotency_keys (
        scope TEXT NOT NULL,
        key TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        created_at REAL NOT NULL,
        status_code INTEGER,
        response TEXT,
        PRIMARY KEY (scope, key)
    );
    CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at);
    """),
    (3, """
    ALTER TABLE messages ADD COLUMN checked_at TEXT;
    """),
    (4, """
    CREATE TABLE send_reservations (
        id INTEGER PRIMARY KEY,
        to_number TEXT NOT NULL,
        reserved_at REAL NOT NULL
    );
    CREATE INDEX send_reservations_by_recipient ON send_reservations (to_number);
    """),
    (5, """
    ALTER TABLE send_reservations ADD COLUMN counts_until REAL;
    UPDATE send_reservations SET counts_until = reserved_at + 3600;
    """),
    (6, "ALTER TABLE messages ADD COLUMN seconds_to_delivered REAL;" + QUERY_INDEXES.format(
        seconds=sqlite_seconds_between("messages.created_at", "status_events.received_at"))),
    # MAX_SENDS_PER_HOUR counts every recipient's sends of the last hour.
    (7, SENDS_PER_HOUR_INDEXES),
    (8, SERVICE_MODE_TABLE),
    # Messages already stored keep the order SQLite stored them in (their rowid).
    (9, DROP_QUERY_INDEXES + """
    ALTER TABLE messages ADD COLUMN storage_order INTEGER;
    UPDATE messages SET storage_order = rowid;
    """ + STORAGE_ORDER_INDEXES),
]

# The next message's storage order: SQLite runs one write at a time, so one more than the
# largest (an index seek) is larger than every stored message's.
SQLITE_NEXT_STORAGE_ORDER = "(SELECT coalesce(max(storage_order), 0) + 1 FROM messages)"

_local = threading.local()
_all_connections = []
_all_connections_lock = threading.Lock()


class SQLiteConnection(sqlite3.Connection):
    """A connection that knows its database file, for the writers' queue."""

    def lock(self, name):
        """Nothing to do: BEGIN IMMEDIATE already serialises every writer of the database."""


# Writers of one database queue before BEGIN IMMEDIATE: the threads of a process on a
# lock, the processes on an flock() of `<database>-lock`. Both are per process (gunicorn
# forks workers after the app is loaded), so they are keyed by the process id.
_writer_queues = {}
_writer_queues_guard = threading.Lock()
_held = threading.local()


def _writer_queue(path):
    """This process's (thread lock, lock-file descriptor) for `path`."""
    key = (os.getpid(), path)
    with _writer_queues_guard:
        if key not in _writer_queues:
            try:
                fd = os.open(path + "-lock", os.O_RDWR | os.O_CREAT, PRIVATE_FILE_MODE)
                _make_private(fd)
                if os.geteuid() == 0:  # like SQLite's own files: owned as the database is
                    stat = os.stat(path)
                    os.fchown(fd, stat.st_uid, stat.st_gid)
            except OSError as error:
                raise sqlite3.OperationalError(f"cannot open {path}-lock: {error}") from None
            _writer_queues[key] = (threading.Lock(), fd)
        return _writer_queues[key]


@contextmanager
def _writer_turn(path):
    """Waits for this database's write turn, for at most the busy timeout in all."""
    if path in getattr(_held, "paths", set()):
        raise sqlite3.OperationalError("cannot start a transaction within a transaction")
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    lock, fd = _writer_queue(path)
    if not lock.acquire(timeout=BUSY_TIMEOUT_MS / 1000):
        raise sqlite3.OperationalError("database is locked")
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise sqlite3.OperationalError("database is locked") from None
                time.sleep(0.0001)
        _held.paths = getattr(_held, "paths", set()) | {path}
        try:
            yield
        finally:
            _held.paths = _held.paths - {path}
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        lock.release()


# The database and every file beside it (its WAL, WAL index and lock file) are the service's
# user's alone, whatever the umask: anyone who can read them reads every message, and anyone
# who can lock them stops every write.
PRIVATE_FILE_MODE = 0o600
DATABASE_FILE_SUFFIXES = ("", "-wal", "-shm", "-lock")


def _make_private(file):
    """Takes group and other permissions off a file (a path or a descriptor) this process
    owns; one owned by another user is left as it is."""
    try:
        os.chmod(file, PRIVATE_FILE_MODE)
    except PermissionError:
        pass


def make_database_files_private(path):
    """Creates the database file as the service's user's alone when it is missing, and takes
    group and other permissions off it and off the files beside it that already exist.

    SQLite creates the WAL and its index with the database file's permissions, so these
    follow."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE_MODE))
    for suffix in DATABASE_FILE_SUFFIXES:
        if os.path.exists(path + suffix):
            _make_private(path + suffix)


def _close_writer_queues():
    """Closes this process's lock-file descriptors; only when no write can be under way."""
    with _writer_queues_guard:
        for key in [k for k in _writer_queues if k[0] == os.getpid()]:
            os.close(_writer_queues.pop(key)[1])


def open_sqlite(path, synchronous="NORMAL", create=True, checkpoints=True):
    """Opens a connection with the service's settings (autocommit; transactions are explicit).

    With `create=False` a missing file is an error instead of a new, empty database. With
    `checkpoints=False` its commits never copy the WAL into the database (writer.py does
    that beside its commits, with checkpoint()).
    """
    target = path if create else f"file:{quote(path)}?mode=rw"
    conn = sqlite3.connect(
        target, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False,
        factory=SQLiteConnection, uri=not create,
    )
    conn.path = path
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA foreign_keys = ON")
    # NORMAL in WAL mode: a commit survives a crash of the process, not a power loss.
    conn.execute(f"PRAGMA synchronous = {'FULL' if synchronous == 'FULL' else 'NORMAL'}")
    conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT_BYTES}")
    if not checkpoints:
        conn.execute("PRAGMA wal_autocheckpoint = 0")
    return conn


def _kept_connection(path, synchronous, checkpoints=True):
    """This thread's kept connection to `path`, opened on first use.

    Kept open instead of one per request: in WAL mode closing the last connection
    checkpoints and deletes the WAL, and a connection per commit is many times slower.
    """
    connections = getattr(_local, "connections", None)
    if connections is None:
        connections = _local.connections = {}
    conn = connections.get(path)
    if conn is not None and _file_id(path) != conn.file_ids[0]:  # one stat per use
        _retire(conn)
        conn = None
    if conn is None:
        _check_reopening(path)
        try:
            conn = open_sqlite(path, synchronous, create=False, checkpoints=checkpoints)
        except sqlite3.OperationalError:
            _check_reopening(path)  # gone in between: say so
            raise
        conn.execute("SELECT 1 FROM sqlite_master LIMIT 1")  # opens its WAL and index
        conn.file_ids = _file_ids(path)
        connections[path] = conn
        with _all_connections_lock:
            _close_connections_of_finished_threads()
            _all_connections.append((threading.current_thread(), conn))
    return conn


# A database file deleted, or replaced by another (a restored backup), while the service
# runs: connections opened on it keep writing into the old file, which nothing reads any
# more, and a new connection would create an empty database. So each use of a kept
# connection compares the file at the path with the one it opened (device and inode; an
# os.stat() costs a few microseconds). A connection whose file is gone is retired: kept
# open and unused until the process ends, because closing it would checkpoint its WAL and
# delete `<database>-wal` by name, which may by then be the new file's.
_retired = []


def _file_id(name):
    """(device, inode) of a file, or None when it is missing."""
    try:
        stat = os.stat(name)
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino


def _file_ids(path):
    """(device, inode) of the database file, its WAL and its WAL index; None where missing."""
    return tuple(_file_id(name) for name in (path, path + "-wal", path + "-shm"))


def _forget(conn):
    """Takes a kept connection out of use: its thread opens a new one on next use."""
    connections = getattr(_local, "connections", {})
    if connections.get(conn.path) is conn:
        del connections[conn.path]
    with _all_connections_lock:
        _all_connections[:] = [entry for entry in _all_connections if entry[1] is not conn]


def _retire(conn):
    _forget(conn)
    with _all_connections_lock:
        _retired.append(conn)
    _replaced_files.add((os.getpid(), conn.path, conn.file_ids))


# (process, path, file ids) of each database file this process had open and saw replaced.
_replaced_files = set()


def _check_reopening(path):
    """Raises when `path` must not be opened: the file is missing (it is never recreated
    while the service runs), or it replaced a file this process had open while that file's
    WAL and index are still there (SQLite would read them as the new file's)."""
    ids = _file_ids(path)
    if ids[0] is None:
        raise sqlite3.OperationalError(
            f"the database file {path} is missing (deleted or moved while the service ran); "
            "nothing is stored until it is back, and a new empty one is created only by a "
            "restart")
    for pid, old_path, old_ids in _replaced_files:
        if pid == os.getpid() and old_path == path and (
                (old_ids[1] and old_ids[1] == ids[1]) or (old_ids[2] and old_ids[2] == ids[2])):
            raise sqlite3.OperationalError(
                f"the database file {path} was replaced while the service ran, but the old "
                f"file's {path}-wal and {path}-shm are still there; remove them (or restart "
                "the service) to use the new file")


def _close_connections_of_finished_threads():
    """A server that starts a thread per request (the development server) would leak one."""
    for entry in list(_all_connections):
        thread, conn = entry
        if not thread.is_alive():
            conn.close()
            _all_connections.remove(entry)


def _close_sqlite_connections():
    with _all_connections_lock:
        connections = list(_all_connections)
        _all_connections.clear()
    for _, conn in connections:
        try:
            conn.close()
        except sqlite3.Error:
            pass
    _local.__dict__.clear()
    _close_writer_queues()


@contextmanager
def sqlite_write_transaction(conn):
    """One write transaction; BEGIN IMMEDIATE takes SQLite's write lock up front.

    Writers first take their turn in the queue above. Left to SQLite alone, waiting writers
    retry after sleeps of up to 100 ms: with dozens of threads that starved some for the
    whole busy timeout ("database is locked"). SQLite's lock still guards against any other
    writer. Waiting in the queue and for SQLite's lock are each bounded by the busy timeout.
    """
    with _writer_turn(conn.path):
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except sqlite3.Error:
                _discard(conn)  # stuck in its transaction: never use it again
            raise


def _discard(conn):
    """Closes a broken kept connection; its thread opens a new one on next use."""
    _forget(conn)
    conn.close()


def _switch_to_wal(conn, attempts=100):
    """Changing the journal mode ignores the busy timeout, so retry while another process
    starting at the same moment holds the database."""
    for attempt in range(attempts):
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or attempt == attempts - 1:
                raise
            time.sleep(0.05)


class SQLiteEngine:
    name = "sqlite"

    def __init__(self, path, synchronous="NORMAL", checkpoints=True):
        self.path = path
        self.synchronous = synchronous
        self.checkpoints = checkpoints  # False: checkpoint() is called from elsewhere
        self.label = path
        # Under gunicorn, the writer process's client (gunicorn.conf.py sets it before the
        # workers start); None runs writes in the calling thread.
        self.writer = None

    def identity(self):
        return ("sqlite", os.path.realpath(self.path))

    def connection(self):
        return _kept_connection(self.path, self.synchronous, self.checkpoints)

    def checkpoint(self):
        """Copies the WAL's committed pages into the database, without waiting for readers
        or writers, for an engine whose commits do not (`checkpoints=False`)."""
        self.connection().execute("PRAGMA wal_checkpoint(PASSIVE)")

    @contextmanager
    def transaction(self):
        with sqlite_write_transaction(self.connection()) as tx:
            yield tx

    def query(self, sql, params=()):
        return self.connection().execute(sql, params).fetchall()

    def migrate(self, mode=None):
        """Creates or upgrades the schema in place and switches the database to WAL mode.

        With `mode`, records it as the database's when none is yet, and raises ModeConflict
        when the database was first used in the other one.
        """
        try:
            make_database_files_private(self.path)
        except OSError as error:
            raise sqlite3.OperationalError(f"cannot create {self.path}: {error}") from None
        conn = open_sqlite(self.path)
        try:
            _switch_to_wal(conn)
            # The version is read under the write lock, so processes starting together
            # (gunicorn and a scheduled command) never apply one migration twice.
            with sqlite_write_transaction(conn):
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                _refuse_newer(version)
                # Statements are split on ';': the migrations hold no ';' inside a statement.
                for target, script in SQLITE_MIGRATIONS:
                    if target > version:
                        for statement in script.split(";"):
                            if statement.strip():
                                conn.execute(statement)
                if version < SCHEMA_VERSION:
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                if mode:
                    conn.execute(RECORD_MODE, (mode,))
                recorded = conn.execute("SELECT mode FROM service_mode").fetchone()
        finally:
            conn.close()
        if mode and recorded[0] != mode:
            raise ModeConflict(recorded[0])
        return SCHEMA_VERSION

    def wal_size(self):
        """The WAL file's size in bytes (0 when there is none)."""
        try:
            return os.path.getsize(self.path + "-wal")
        except FileNotFoundError:
            return 0

    def compact(self):
        """After a bulk delete: copies the WAL into the database and truncates it to zero
        bytes. Returns False when readers kept it from finishing (it shrinks at a later
        checkpoint instead); waits for them only briefly, since writers wait meanwhile."""
        return self._checkpoint_waiting_briefly("TRUNCATE")

    def rewind_wal(self):
        """Copies the WAL into the database so that the next commit writes the WAL from its
        start again; the file keeps its size, so its space is reused rather than given
        back and taken again. Returns False when readers kept it from finishing."""
        return self._checkpoint_waiting_briefly("RESTART")

    def _checkpoint_waiting_briefly(self, mode):
        conn = self.connection()
        with _writer_turn(self.path):
            conn.execute(f"PRAGMA busy_timeout = {CHECKPOINT_BUSY_TIMEOUT_MS}")
            try:
                busy = conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()[0]
            finally:
                conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        return not busy

    def backup(self, target):
        """Copies the database into the file `target`, as it was at one moment, while the
        service goes on writing: SQLite's online backup in one step, within one read
        transaction, which in WAL mode holds no writer back. The copy is written beside
        `target` and renamed over it once complete, in rollback-journal mode (one file)."""
        partial = target + ".partial"
        if os.path.exists(partial):
            os.remove(partial)
        source = open_sqlite(self.path, self.synchronous, create=False)
        try:
            copy = sqlite3.connect(partial)
            try:
                source.backup(copy)
                copy.execute("PRAGMA journal_mode = DELETE")
            finally:
                copy.close()
        finally:
            source.close()
        os.replace(partial, target)
        directory = os.open(os.path.dirname(target), os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a power loss
        finally:
            os.close(directory)

    seconds_between = staticmethod(sqlite_seconds_between)
    next_storage_order = SQLITE_NEXT_STORAGE_ORDER

    @staticmethod
    def describe_error(error):
        return str(error)

    def close(self):
        _close_sqlite_connections()


def _refuse_newer(version):
    if version > SCHEMA_VERSION:
        raise sqlite3.DatabaseError(
            f"its schema (version {version}) is newer than this code's ({SCHEMA_VERSION}); "
            "run the newer release"
        )


# --- PostgreSQL ----------------------------------------------------------------------------

# PostgreSQL databases start at the current version in one step. Columns compared as text
# (SIDs, numbers and the fixed-width UTC timestamps) use the "C" collation, so they sort
# byte by byte, as in SQLite, whatever the database's locale.
POSTGRES_MIGRATIONS = [
    (5, """
    CREATE TABLE messages (
        sid TEXT COLLATE "C" PRIMARY KEY,
        account_sid TEXT,
        to_number TEXT COLLATE "C",
        from_number TEXT,
        body TEXT,
        initial_status TEXT,
        latest_status TEXT NOT NULL,
        error_code INTEGER,
        created_at TEXT COLLATE "C" NOT NULL,
        updated_at TEXT COLLATE "C" NOT NULL,
        sent_at TEXT COLLATE "C",
        checked_at TEXT COLLATE "C"
    );
    CREATE TABLE status_events (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        message_sid TEXT COLLATE "C" NOT NULL REFERENCES messages(sid) ON DELETE CASCADE,
        status TEXT NOT NULL,
        error_code INTEGER,
        received_at TEXT COLLATE "C" NOT NULL,
        UNIQUE (message_sid, status)
    );
    CREATE INDEX messages_by_recipient ON messages (to_number, sent_at);
    CREATE INDEX messages_by_update ON messages (updated_at);
    CREATE TABLE health_checks (id INTEGER PRIMARY KEY CHECK (id = 1), checked_at TEXT);
    CREATE TABLE idempotency_keys (
        scope TEXT COLLATE "C" NOT NULL,
        key TEXT COLLATE "C" NOT NULL,
        fingerprint TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        status_code INTEGER,
        response TEXT,
        PRIMARY KEY (scope, key)
    );
    CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at);
    CREATE TABLE send_reservations (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        to_number TEXT COLLATE "C" NOT NULL,
        reserved_at DOUBLE PRECISION NOT NULL,
        counts_until DOUBLE PRECISION
    );
    CREATE INDEX send_reservations_by_recipient ON send_reservations (to_number);
    """),
    (6, "ALTER TABLE messages ADD COLUMN seconds_to_delivered DOUBLE PRECISION;"
        + QUERY_INDEXES.format(seconds=postgres_seconds_between(
            "messages.created_at", "status_events.received_at"))),
    # MAX_SENDS_PER_HOUR counts every recipient's sends of the last hour.
    (7, SENDS_PER_HOUR_INDEXES),
    (8, SERVICE_MODE_TABLE),
    # PostgreSQL keeps no order of storage: messages already stored are numbered in the order
    # GET /messages listed them until then (creation, then SID); a sequence numbers new ones.
    (9, DROP_QUERY_INDEXES + """
    ALTER TABLE messages ADD COLUMN storage_order BIGINT;
    CREATE SEQUENCE messages_storage_order OWNED BY messages.storage_order;
    UPDATE messages SET storage_order = numbered.n FROM (
        SELECT sid, row_number() OVER (ORDER BY created_at, sid) AS n FROM messages
    ) AS numbered WHERE messages.sid = numbered.sid;
    SELECT setval('messages_storage_order',
                  (SELECT coalesce(max(storage_order), 0) + 1 FROM messages), false);
    ALTER TABLE messages ALTER COLUMN storage_order SET DEFAULT nextval('messages_storage_order');
    """ + STORAGE_ORDER_INDEXES),
]

# The next message's storage order: a sequence, so concurrent transactions never wait for
# each other for it (and a rolled-back one leaves a gap, which orders nothing wrongly).
POSTGRES_NEXT_STORAGE_ORDER = "nextval('messages_storage_order')"

# Key of the advisory lock under which instances starting together migrate one at a time.
MIGRATION_LOCK = "sms-status schema migration"


@functools.lru_cache(maxsize=256)
def _pyformat(sql):
    """`?` placeholders as psycopg's `%s` (a literal `%` is doubled first)."""
    return sql.replace("%", "%%").replace("?", "%s")


def _lock_key(name):
    """A stable signed 64-bit advisory-lock key for a name."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big",
                          signed=True)


def _configure_postgres(conn):
    """Lock waits are bounded like SQLite's busy timeout: a stuck transaction elsewhere makes
    a request fail (503) instead of hanging."""
    conn.execute(f"SET lock_timeout = {int(BUSY_TIMEOUT_MS)}")


class PostgresTransaction:
    """One transaction on a borrowed connection, with SQLite's `?` placeholders."""

    def __init__(self, conn):
        self.conn = conn

    def execute(self, sql, params=()):
        return self.conn.execute(_pyformat(sql), params)

    def lock(self, name):
        """Serialises the transactions that lock the same name, until they end."""
        self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key(name),))


class PostgresEngine:
    name = "postgres"

    def __init__(self, url, pool_size):
        self.url = url
        self.pool_size = pool_size
        self.password = unquote(urlsplit(url).password or "")
        params = conninfo_to_dict(url)
        self.label = "PostgreSQL database {!r} at {}:{}".format(
            params.get("dbname", "?"), params.get("host", "localhost"),
            params.get("port", "5432"))
        self._identity = ("postgres", params.get("host", ""), str(params.get("port", "5432")),
                          params.get("dbname", ""))
        # A missing connect_timeout would let an unreachable server hang the start.
        self.connect_options = {} if "connect_timeout" in params else {
            "connect_timeout": CONNECT_TIMEOUT_SECONDS}
        self._key = next(_engine_numbers)

    def identity(self):
        return self._identity

    def _pool(self):
        """This process's pool, created on first use: gunicorn forks workers after the app
        is loaded, and a pool's connections and threads must never cross a fork."""
        key = (os.getpid(), self._key)
        pool = _pools.get(key)
        if pool is None:
            with _pools_lock:
                pool = _pools.get(key)
                if pool is None:
                    pool = ConnectionPool(
                        self.url, min_size=1, max_size=self.pool_size, open=False,
                        timeout=POOL_TIMEOUT_SECONDS,
                        # Connections broken by a restart of the server are replaced.
                        check=ConnectionPool.check_connection,
                        configure=_configure_postgres,
                        # Give up reconnecting soon: the next request that needs a
                        # connection starts a new attempt, so recovery follows the server.
                        reconnect_timeout=POOL_TIMEOUT_SECONDS,
                        kwargs={"autocommit": True, "row_factory": dict_row,
                                **self.connect_options},
                        name=f"sms-status-{key[0]}-{key[1]}",
                    )
                    pool.open(wait=False)
                    _pools[key] = pool
        return pool

    @contextmanager
    def transaction(self):
        with self._pool().connection() as conn, conn.transaction():
            yield PostgresTransaction(conn)

    def query(self, sql, params=()):
        with self._pool().connection() as conn:
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
            if version > SCHEMA_VERSION:
                raise psycopg.DataError(
                    f"its schema (version {version}) is newer than this code's "
                    f"({SCHEMA_VERSION}); run the newer release")
            for target, script in POSTGRES_MIGRATIONS:
                if target > version:
                    conn.execute(script)
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

    seconds_between = staticmethod(postgres_seconds_between)
    next_storage_order = POSTGRES_NEXT_STORAGE_ORDER

    def describe_error(self, error):
        """The error's text, never with the password of DATABASE_URL in it."""
        text = str(error).strip()
        return text.replace(self.password, "***") if self.password else text

    def close(self):
        _close_pools(lambda key: key == (os.getpid(), self._key))


# This process's pools by (process id, engine number), kept here rather than on the engines
# so that close_all() reaches every one of them, whatever became of its engine.
_pools = {}
_pools_lock = threading.Lock()
_engine_numbers = itertools.count()


def _close_pools(which):
    with _pools_lock:
        pools = [_pools.pop(key) for key in list(_pools) if which(key)]
    for pool in pools:
        pool.close(timeout=1)


def close_all():
    """Closes this process's connections: kept SQLite ones and PostgreSQL pools alike."""
    _close_sqlite_connections()
    _close_pools(lambda key: key[0] == os.getpid())
