"""SQLite, the embedded default: one file, one writer at a time, connections kept per thread.

- Each thread keeps one connection to the database (closing the last one in WAL mode
  checkpoints and deletes the WAL, and a connection per commit is many times slower).
- Writers queue for SQLite's single write lock before BEGIN IMMEDIATE: a process's threads
  on a lock, the processes on an flock() of `<database>-lock` (see `_WriterQueue`).
- Under gunicorn, writes go through the writer process instead (writer.py); `writer` is
  then its client.
- A database file deleted or replaced while the service runs is never written into, and a
  restored one is opened anew.
"""

import fcntl
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from urllib.parse import quote

from sms_status.storage.engine import Features, Operations
from sms_status.storage.schema import (
    RECORD_MODE,
    SCHEMA_VERSION,
    ModeConflict,
    migrations,
    newer_schema,
    sqlite_seconds_between,
)

BUSY_TIMEOUT_SECONDS = 5.0
# The WAL is cut back to this size whenever a checkpoint empties it: without a limit, one
# large transaction (or a long read holding checkpoints back) leaves it that large forever.
JOURNAL_SIZE_LIMIT_BYTES = 16 * 1024 * 1024
# How long a blocking checkpoint waits for readers to leave the WAL; writers wait meanwhile.
CHECKPOINT_BUSY_TIMEOUT_MS = 200
# A read's statement is stopped after this long, as PostgreSQL's statement_timeout stops
# one there: a statement holds its snapshot of the WAL, and one that never ends would keep
# the WAL from ever being rewound. 0: no limit (the maintenance commands).
READ_TIMEOUT_SECONDS = 5.0
# SQLite's virtual machine steps between two looks at a read's deadline.
DEADLINE_CHECK_STEPS = 10_000


class ReadTimeLimit(sqlite3.OperationalError):
    """A read stopped for taking longer than its time limit."""


class SQLiteFeatures(Features):
    """What SQLite has that PostgreSQL has not."""

    writer_process = True  # under gunicorn, one process makes every write (writer.py)
    online_backup = True  # `flask backup` copies the file while the service runs
    # A statement holds its snapshot of the WAL until it ends: a window's counts are read in
    # statements of about this many rows, so that readers never keep the WAL from being
    # rewound (storage/reads.py's Stretches).
    rows_per_window_statement = 50_000


class SQLiteOperations(Operations):
    """SQLite's SQL where the engines differ."""

    seconds_between = staticmethod(sqlite_seconds_between)
    # The next message's storage order: SQLite runs one write at a time, so one more than
    # the largest (an index seek) is larger than every stored message's.
    next_storage_order = "(SELECT coalesce(max(storage_order), 0) + 1 FROM messages)"
    # Claims need no row locks: one writer at a time.
    skip_locked = ""


class SQLiteConnection(sqlite3.Connection):
    """A connection with a transaction's `lock` and `plan_by_index`, which SQLite needs not."""

    def lock(self, name):
        """Nothing to do: BEGIN IMMEDIATE already serialises every writer of the database."""

    def plan_by_index(self):
        """Nothing to do: SQLite already follows an index that gives the order asked for."""


def open_sqlite(path, synchronous="NORMAL", create=True, checkpoints=True,
                busy_timeout=BUSY_TIMEOUT_SECONDS):
    """Opens a connection with the service's settings (autocommit; transactions are explicit).

    With `create=False` a missing file is an error instead of a new, empty database. With
    `checkpoints=False` its commits never copy the WAL into the database (writer.py does
    that beside its commits, with checkpoint()).
    """
    target = path if create else f"file:{quote(path)}?mode=rw"
    conn = sqlite3.connect(
        target, timeout=busy_timeout, isolation_level=None, check_same_thread=False,
        factory=SQLiteConnection, uri=not create,
    )
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
    conn.execute("PRAGMA foreign_keys = ON")
    # NORMAL in WAL mode: a commit survives a crash of the process, not a power loss.
    conn.execute(f"PRAGMA synchronous = {'FULL' if synchronous == 'FULL' else 'NORMAL'}")
    conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT_BYTES}")
    if not checkpoints:
        conn.execute("PRAGMA wal_autocheckpoint = 0")
    return conn


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


# The databases each thread is inside a write transaction of, whatever the engine or
# connection: a second one would wait for the first forever.
_held = threading.local()


class _WriterQueue:
    """Writers of one database take turns before BEGIN IMMEDIATE: the threads of a process
    on a lock, the processes on an flock() of `<database>-lock`.

    Left to SQLite alone, waiting writers retry after sleeps of up to 100 ms: with dozens
    of threads that starved some for the whole busy timeout ("database is locked").
    SQLite's lock still guards against any other writer. Both are per process (gunicorn
    forks workers after the app is loaded), so the lock file is opened after a fork.
    """

    def __init__(self, path, timeout):
        self.path, self.timeout = path, timeout
        self.lock = threading.Lock()
        self.guard = threading.Lock()
        self.fd, self.pid = None, None

    def _lock_file(self):
        with self.guard:
            if self.pid != os.getpid():
                try:
                    fd = os.open(self.path + "-lock", os.O_RDWR | os.O_CREAT, PRIVATE_FILE_MODE)
                    _make_private(fd)
                    if os.geteuid() == 0:  # like SQLite's own files: owned as the database is
                        stat = os.stat(self.path)
                        os.fchown(fd, stat.st_uid, stat.st_gid)
                except OSError as error:
                    raise sqlite3.OperationalError(
                        f"cannot open {self.path}-lock: {error}") from None
                self.lock = threading.Lock()  # one held across the fork is not ours
                self.fd, self.pid = fd, os.getpid()
            return self.fd

    @contextmanager
    def turn(self):
        """Waits for this database's write turn, for at most the busy timeout in all."""
        if self.path in getattr(_held, "paths", set()):
            raise sqlite3.OperationalError("cannot start a transaction within a transaction")
        deadline = time.monotonic() + self.timeout
        fd = self._lock_file()
        if not self.lock.acquire(timeout=self.timeout):
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
            _held.paths = getattr(_held, "paths", set()) | {self.path}
            try:
                yield
            finally:
                _held.paths = _held.paths - {self.path}
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            self.lock.release()

    def close(self):
        with self.guard:
            if self.pid == os.getpid():
                os.close(self.fd)
            self.fd, self.pid = None, None


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
    features = SQLiteFeatures()
    ops = SQLiteOperations()
    SETTINGS = ("synchronous", "checkpoints", "busy_timeout", "read_timeout", "records_events")

    def __init__(self, path, synchronous="NORMAL", checkpoints=True,
                 busy_timeout=BUSY_TIMEOUT_SECONDS, read_timeout=READ_TIMEOUT_SECONDS,
                 records_events=False):
        self.path = path
        self.records_events = records_events
        self.read_timeout = read_timeout
        self.synchronous = synchronous
        self.checkpoints = checkpoints  # False: checkpoint() is called from elsewhere
        self.busy_timeout = busy_timeout
        self.label = path
        # Under gunicorn, the writer process's client (gunicorn.conf.py sets it before the
        # workers start); None runs writes in the calling thread.
        self.writer = None
        self._queue = _WriterQueue(path, busy_timeout)
        self._local = threading.local()  # this thread's kept connection
        self._kept = []  # (thread, connection) of every kept connection
        self._kept_lock = threading.Lock()
        # A database file deleted, or replaced by another (a restored backup), while the
        # service runs: connections opened on it keep writing into the old file, which
        # nothing reads any more, and a new connection would create an empty database. So
        # each use of a kept connection compares the file at the path with the one it
        # opened (device and inode; an os.stat() costs a few microseconds). A connection
        # whose file is gone is retired: kept open and unused until the process ends,
        # because closing it would checkpoint its WAL and delete `<database>-wal` by name,
        # which may by then be the new file's.
        self._retired = []
        self._replaced = set()  # (process, file ids) of each file seen replaced

    def identity(self):
        return ("sqlite", os.path.realpath(self.path))

    def exists(self):
        """Whether the database file is there (a missing one is never created here)."""
        return os.path.exists(self.path)

    @property
    def how_to_start_fresh(self):
        return f"delete {self.path} (and its -wal, -shm and -lock files)"

    def connection(self):
        """This thread's kept connection, opened on first use."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and (conn.pid != os.getpid()
                                 or _file_id(self.path) != conn.file_ids[0]):
            if conn.pid == os.getpid():
                self._retire(conn)
            conn = None
        if conn is None:
            self._check_reopening()
            try:
                conn = open_sqlite(self.path, self.synchronous, create=False,
                                   checkpoints=self.checkpoints, busy_timeout=self.busy_timeout)
            except sqlite3.OperationalError:
                self._check_reopening()  # gone in between: say so
                raise
            conn.execute("SELECT 1 FROM sqlite_master LIMIT 1")  # opens its WAL and index
            conn.file_ids, conn.pid = _file_ids(self.path), os.getpid()
            self._local.conn = conn
            with self._kept_lock:
                self._close_connections_of_finished_threads()
                self._kept.append((threading.current_thread(), conn))
        return conn

    def _forget(self, conn):
        """Takes a kept connection out of use: its thread opens a new one on next use."""
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None
        with self._kept_lock:
            self._kept[:] = [entry for entry in self._kept if entry[1] is not conn]

    def _retire(self, conn):
        self._forget(conn)
        self._retired.append(conn)
        self._replaced.add((os.getpid(), conn.file_ids))

    def _check_reopening(self):
        """Raises when the file must not be opened: it is missing (it is never recreated
        while the service runs), or it replaced a file this process had open while that
        file's WAL and index are still there (SQLite would read them as the new file's)."""
        path, ids = self.path, _file_ids(self.path)
        if ids[0] is None:
            raise sqlite3.OperationalError(
                f"the database file {path} is missing (deleted or moved while the service "
                "ran); nothing is stored until it is back, and a new empty one is created only "
                "by a restart")
        for pid, old_ids in self._replaced:
            if pid == os.getpid() and ((old_ids[1] and old_ids[1] == ids[1])
                                       or (old_ids[2] and old_ids[2] == ids[2])):
                raise sqlite3.OperationalError(
                    f"the database file {path} was replaced while the service ran, but the "
                    f"old file's {path}-wal and {path}-shm are still there; remove them (or "
                    "restart the service) to use the new file")

    def _close_connections_of_finished_threads(self):
        """A server that starts a thread per request (the development server) would leak one."""
        for entry in list(self._kept):
            thread, conn = entry
            if not thread.is_alive():
                conn.close()
                self._kept.remove(entry)

    @contextmanager
    def write_transaction(self, conn):
        """One write transaction on `conn`, after this database's turn in the writers' queue;
        BEGIN IMMEDIATE takes SQLite's write lock up front. Waiting in the queue and for
        SQLite's lock are each bounded by the busy timeout."""
        with self._queue.turn():
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                try:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                except sqlite3.Error:
                    self._forget(conn)  # stuck in its transaction: never use it again
                    conn.close()
                raise

    @contextmanager
    def transaction(self, probe=False):
        """A write transaction; a health probe (`probe`) takes its turn like any write."""
        with self.write_transaction(self.connection()) as tx:
            yield tx

    def query(self, sql, params=()):
        """The rows of a read, stopped (ReadTimeLimit) once it takes `read_timeout` seconds."""
        conn = self.connection()
        if not self.read_timeout:
            return conn.execute(sql, params).fetchall()
        deadline = time.monotonic() + self.read_timeout
        conn.set_progress_handler(lambda: time.monotonic() > deadline, DEADLINE_CHECK_STEPS)
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.OperationalError as error:
            if str(error) == "interrupted":
                raise ReadTimeLimit(f"the read took longer than {self.read_timeout:g} s "
                                    "and was stopped") from None
            raise
        finally:
            conn.set_progress_handler(None, 0)

    def checkpoint(self):
        """Copies the WAL's committed pages into the database, without waiting for readers
        or writers, for an engine whose commits do not (`checkpoints=False`)."""
        self.connection().execute("PRAGMA wal_checkpoint(PASSIVE)")

    def migrate(self, mode=None):
        """Creates or upgrades the schema in place and switches the database to WAL mode.

        With `mode`, records it as the database's when none is yet, and raises ModeConflict
        when the database was first used in the other one.
        """
        try:
            make_database_files_private(self.path)
        except OSError as error:
            raise sqlite3.OperationalError(f"cannot create {self.path}: {error}") from None
        conn = open_sqlite(self.path, busy_timeout=self.busy_timeout)
        try:
            _switch_to_wal(conn)
            # The version is read under the write lock, so processes starting together
            # (gunicorn and a scheduled command) never apply one migration twice.
            with self.write_transaction(conn):
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if newer_schema(version):
                    raise sqlite3.DatabaseError(newer_schema(version))
                for statement in migrations("sqlite", version):
                    conn.execute(statement)
                if version < SCHEMA_VERSION:
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                _analyze(conn)
                if mode:
                    conn.execute(RECORD_MODE, (mode,))
                recorded = conn.execute("SELECT mode FROM service_mode").fetchone()
        finally:
            conn.close()
        if mode and recorded[0] != mode:
            raise ModeConflict(recorded[0])
        return SCHEMA_VERSION

    def refresh_statistics(self):
        """Brings the query planner's statistics up to date (a few milliseconds)."""
        with self.transaction() as tx:
            _analyze(tx)

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
        with self._queue.turn():
            conn.execute(f"PRAGMA busy_timeout = {CHECKPOINT_BUSY_TIMEOUT_MS}")
            try:
                busy = conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()[0]
            finally:
                conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
        return not busy

    def backup(self, target):
        """Copies the database into the file `target`, as it was at one moment, while the
        service goes on writing: SQLite's online backup in one step, within one read
        transaction, which in WAL mode holds no writer back. The copy is written beside
        `target` and renamed over it once complete, in rollback-journal mode (one file).
        Returns how many messages the copy holds; ValueError when `target` is the database
        itself."""
        if os.path.exists(target) and os.path.samefile(target, self.path):
            raise ValueError("--to names the database itself; choose another file")
        partial = target + ".partial"
        if os.path.exists(partial):
            os.remove(partial)
        # Created private before a byte is written, like the database itself (an empty file
        # is an empty database to SQLite, and its journal takes the file's permissions).
        os.close(os.open(partial, os.O_RDWR | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE))
        source = open_sqlite(self.path, self.synchronous, create=False)
        try:
            copy = sqlite3.connect(partial)
            try:
                source.backup(copy)
                copy.execute("PRAGMA journal_mode = DELETE")
                [(messages,)] = copy.execute("SELECT count(*) FROM messages").fetchall()
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
        return messages

    def columns(self, table):
        """The names of a table's columns, in their order."""
        return [row["name"] for row in self.query(
            "SELECT name FROM pragma_table_info(?) ORDER BY cid", (table,))]

    @staticmethod
    def describe_error(error):
        return str(error)

    def close(self):
        """Closes this engine's connections in this process (only when none is in use)."""
        with self._kept_lock:
            kept, self._kept = self._kept, []
        for _, conn in kept:
            if conn.pid == os.getpid():
                try:
                    conn.close()
                except sqlite3.Error:
                    pass
        self._local = threading.local()
        self._queue.close()


# Rows ANALYZE reads per index: estimates good enough to choose an index, in milliseconds
# whatever the table's size.
ANALYSIS_LIMIT = 1000


def _analyze(conn):
    """Gathers the statistics SQLite's query planner chooses indexes with. Without them it
    guessed: /messages?to=X&status=Y walked every message of that status instead of the
    recipient's few (docs/performance.md, "The planner's statistics")."""
    conn.execute(f"PRAGMA analysis_limit = {ANALYSIS_LIMIT}")
    conn.execute("ANALYZE")
