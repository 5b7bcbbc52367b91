"""SQLite storage: connections, schema migrations, and the message and status records.

Connections are kept open, one per thread and database file, instead of one per
request: in WAL mode closing the last connection checkpoints and deletes the WAL, and
a connection per commit is many times slower. `get_db()` is the only way request
code reaches the database, so how connections are held can change in one place.
"""

import fcntl
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone

from flask import current_app

from rules import FINAL_STATUSES, status_moves_forward

BUSY_TIMEOUT_MS = 5000

# Each entry moves the schema from version N to N+1; PRAGMA user_version records
# how far a database has come, so a live database is migrated in place at start.
MIGRATIONS = [
    """
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
    """,
    """
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
    """,
    """
    ALTER TABLE messages ADD COLUMN checked_at TEXT;
    """,
    """
    CREATE TABLE send_reservations (
        id INTEGER PRIMARY KEY,
        to_number TEXT NOT NULL,
        reserved_at REAL NOT NULL
    );
    CREATE INDEX send_reservations_by_recipient ON send_reservations (to_number);
    """,
    """
    ALTER TABLE send_reservations ADD COLUMN counts_until REAL;
    UPDATE send_reservations SET counts_until = reserved_at + 3600;
    """,
    # GET /messages pages (newest first, by itself or per recipient, status or error code)
    # and the windows of GET /stats.
    """
    CREATE INDEX messages_by_creation ON messages (created_at, sid);
    CREATE INDEX messages_by_recipient_and_creation ON messages (to_number, created_at, sid);
    CREATE INDEX messages_by_status_and_creation ON messages (latest_status, created_at, sid);
    CREATE INDEX messages_by_error_and_creation ON messages (error_code, created_at, sid);
    """,
]

_local = threading.local()
_all_connections = []
_all_connections_lock = threading.Lock()


def utc_now_iso(timestamp=None):
    """UTC time as ISO 8601 with milliseconds, e.g. 2026-11-26T20:01:41.123Z."""
    moment = (
        datetime.now(timezone.utc)
        if timestamp is None
        else datetime.fromtimestamp(timestamp, timezone.utc)
    )
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def iso_to_timestamp(text):
    """The inverse of utc_now_iso: seconds since the epoch."""
    moment = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    return moment.timestamp()


class Connection(sqlite3.Connection):
    """A connection that knows its database file, for the writers' queue."""


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
                fd = os.open(path + "-lock", os.O_RDWR | os.O_CREAT, 0o666)
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


def _close_writer_queues():
    """Closes this process's lock-file descriptors; only when no write can be under way."""
    with _writer_queues_guard:
        for key in [k for k in _writer_queues if k[0] == os.getpid()]:
            os.close(_writer_queues.pop(key)[1])


def open_connection(path, synchronous="NORMAL"):
    """Opens a connection with the service's settings (autocommit; transactions are explicit)."""
    conn = sqlite3.connect(
        path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False,
        factory=Connection,
    )
    conn.path = path
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA foreign_keys = ON")
    # NORMAL in WAL mode: a commit survives a crash of the process, not a power loss.
    conn.execute(f"PRAGMA synchronous = {'FULL' if synchronous == 'FULL' else 'NORMAL'}")
    return conn


def connection_for(path, synchronous="NORMAL"):
    """This thread's kept connection to `path`, opened on first use."""
    connections = getattr(_local, "connections", None)
    if connections is None:
        connections = _local.connections = {}
    conn = connections.get(path)
    if conn is None:
        conn = connections[path] = open_connection(path, synchronous)
        with _all_connections_lock:
            _close_connections_of_finished_threads()
            _all_connections.append((threading.current_thread(), conn))
    return conn


def _close_connections_of_finished_threads():
    """A server that starts a thread per request (the development server) would leak one."""
    for entry in list(_all_connections):
        thread, conn = entry
        if not thread.is_alive():
            conn.close()
            _all_connections.remove(entry)


def get_db():
    """The current thread's connection to the app's database."""
    config = current_app.config["SERVICE"]
    return connection_for(config.database_path, config.sqlite_synchronous)


def close_all():
    """Closes every kept connection (at worker exit and between tests)."""
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


def migrate(path):
    """Creates or upgrades the schema in place and switches the database to WAL mode."""
    conn = open_connection(path)
    try:
        _switch_to_wal(conn)
        # The version is read under the write lock, so processes starting together
        # (gunicorn and a scheduled command) never apply one migration twice.
        with write_transaction(conn):
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise sqlite3.DatabaseError(
                    f"its schema (version {version}) is newer than this code's "
                    f"({len(MIGRATIONS)}); run the newer release"
                )
            # Statements are split on ';': the migrations hold no ';' inside a statement.
            for script in MIGRATIONS[version:]:
                for statement in script.split(";"):
                    if statement.strip():
                        conn.execute(statement)
            if version < len(MIGRATIONS):
                conn.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")
        return len(MIGRATIONS)
    finally:
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


@contextmanager
def write_transaction(conn):
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
    connections = getattr(_local, "connections", {})
    if connections.get(conn.path) is conn:
        del connections[conn.path]
    with _all_connections_lock:
        _all_connections[:] = [entry for entry in _all_connections if entry[1] is not conn]
    conn.close()


def _apply_status(conn, sid, status, error_code, at):
    """Adds (sid, status) to the history once and moves latestStatus only forward."""
    inserted = conn.execute(
        "INSERT OR IGNORE INTO status_events (message_sid, status, error_code, received_at)"
        " VALUES (?, ?, ?, ?)",
        (sid, status, error_code, at),
    ).rowcount
    if not inserted:
        return False
    current = conn.execute("SELECT latest_status FROM messages WHERE sid = ?", (sid,)).fetchone()
    if status_moves_forward(current["latest_status"], status):
        conn.execute(
            "UPDATE messages SET latest_status = ?, error_code = ?,"
            " updated_at = max(updated_at, ?) WHERE sid = ?",
            (status, error_code, at, sid),
        )
    else:
        conn.execute("UPDATE messages SET updated_at = max(updated_at, ?) WHERE sid = ?",
                     (at, sid))
    return True


def record_status(conn, sid, status, error_code=None, to=None, from_=None, account_sid=None,
                  at=None):
    """Stores one status update (callback or reconciliation); False when it was a repeat.

    A callback may arrive before /send-sms stored its message, or be about a message
    sent by other software: the message record is then created from the callback.
    """
    at = at or utc_now_iso()
    with write_transaction(conn):
        conn.execute(
            "INSERT INTO messages (sid, account_sid, to_number, from_number, latest_status,"
            " error_code, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (sid) DO NOTHING",
            (sid, account_sid, to, from_, status, error_code, at, at),
        )
        return _apply_status(conn, sid, status, error_code, at)


def record_sent_message(conn, sid, account_sid, to, from_, body, status, created_at, now=None,
                        reservation=None):
    """Stores a message Twilio accepted; its create-time status is the first history entry.

    Callbacks may already have stored later statuses, which this never moves back. The
    send's reservation under the per-recipient limit is replaced by the stored message.
    """
    now = now or utc_now_iso()
    with write_transaction(conn):
        if reservation is not None:
            conn.execute("DELETE FROM send_reservations WHERE id = ?", (reservation,))
        conn.execute(
            "INSERT INTO messages (sid, account_sid, to_number, from_number, body,"
            " initial_status, latest_status, created_at, updated_at, sent_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (sid) DO UPDATE SET account_sid = excluded.account_sid,"
            " to_number = excluded.to_number, from_number = excluded.from_number,"
            " body = excluded.body, initial_status = excluded.initial_status,"
            " created_at = min(created_at, excluded.created_at), sent_at = excluded.sent_at",
            (sid, account_sid, to, from_, body, status, status, created_at, now, now),
        )
        _apply_status(conn, sid, status, None, created_at)


def message_with_history(conn, sid):
    """The message and its history (oldest first) as the API shows them, or None."""
    message = conn.execute("SELECT * FROM messages WHERE sid = ?", (sid,)).fetchone()
    if message is None:
        return None
    events = conn.execute(
        "SELECT status, error_code, received_at FROM status_events WHERE message_sid = ?"
        " ORDER BY received_at, id",
        (sid,),
    ).fetchall()
    return {
        "sid": message["sid"],
        "to": message["to_number"],
        "from": message["from_number"],
        "latestStatus": message["latest_status"],
        "errorCode": message["error_code"],
        "createdAt": message["created_at"],
        "updatedAt": message["updated_at"],
        "history": [
            {"status": e["status"], "errorCode": e["error_code"], "timestamp": e["received_at"]}
            for e in events
        ],
    }


def reserve_idempotency_key(conn, scope, key, fingerprint, now, expire_before, stale_before):
    """Claims `key` for one request, atomically across workers and threads.

    Returns ("new", None) when this request may go ahead, or one of ("replay", (status,
    response)), ("mismatch", None), ("in_flight", None), ("stale", None). Expired keys are
    deleted on the way, so no separate clean-up job is needed.
    """
    with write_transaction(conn):
        conn.execute("DELETE FROM idempotency_keys WHERE created_at < ?", (expire_before,))
        row = conn.execute(
            "SELECT fingerprint, created_at, status_code, response FROM idempotency_keys"
            " WHERE scope = ? AND key = ?",
            (scope, key),
        ).fetchone()
        if row is None:
            conn.execute(
                "INSERT INTO idempotency_keys (scope, key, fingerprint, created_at)"
                " VALUES (?, ?, ?, ?)",
                (scope, key, fingerprint, now),
            )
            return "new", None
    if row["fingerprint"] != fingerprint:
        return "mismatch", None
    if row["status_code"] is not None:
        return "replay", (row["status_code"], row["response"])
    if row["created_at"] < stale_before:
        return "stale", None
    return "in_flight", None


def save_idempotent_response(conn, scope, key, status_code, response):
    """Keeps the answer under the key, for replays."""
    with write_transaction(conn):
        conn.execute(
            "UPDATE idempotency_keys SET status_code = ?, response = ? WHERE scope = ? AND key = ?",
            (status_code, response, scope, key),
        )


def release_idempotency_key(conn, scope, key):
    """Forgets a key whose answer said "try again later", so a retry can go through."""
    with write_transaction(conn):
        conn.execute("DELETE FROM idempotency_keys WHERE scope = ? AND key = ?", (scope, key))


def reserve_send(conn, to, now, limit, in_flight_seconds):
    """Claims one of the `limit` sends to `to` allowed per hour, atomically across workers.

    Counts the messages sent in the last hour and the reservations still counting: sends
    waiting on Twilio (for `in_flight_seconds` at most; a longer one belonged to a request
    that died) and sends whose outcome is unknown. Returns (reservation id, None), or
    (None, seconds until the first of those stops counting).
    """
    with write_transaction(conn):
        conn.execute("DELETE FROM send_reservations WHERE counts_until < ?", (now,))
        sent = conn.execute(
            "SELECT sent_at FROM messages WHERE to_number = ? AND sent_at > ?",
            (to, utc_now_iso(now - 3600)),
        ).fetchall()
        reserved = conn.execute(
            "SELECT counts_until FROM send_reservations WHERE to_number = ?", (to,)
        ).fetchall()
        stop_counting = [iso_to_timestamp(row[0]) + 3600 for row in sent]
        stop_counting += [row[0] for row in reserved]
        if len(stop_counting) >= limit:
            return None, min(stop_counting) - now
        reservation = conn.execute(
            "INSERT INTO send_reservations (to_number, reserved_at, counts_until)"
            " VALUES (?, ?, ?)",
            (to, now, now + in_flight_seconds),
        ).lastrowid
        return reservation, None


def release_send(conn, reservation):
    """Gives a reservation back: Twilio certainly did not send the message."""
    with write_transaction(conn):
        conn.execute("DELETE FROM send_reservations WHERE id = ?", (reservation,))


def keep_reservation(conn, reservation, until):
    """Keeps counting a send whose outcome is unknown, as if it had gone out."""
    with write_transaction(conn):
        conn.execute("UPDATE send_reservations SET counts_until = ? WHERE id = ?",
                     (until, reservation))


def messages_to_reconcile(conn, idle_before, limit):
    """Non-final messages with no update since `idle_before`, least recently checked first."""
    placeholders = ", ".join("?" for _ in FINAL_STATUSES)
    return conn.execute(
        "SELECT sid, latest_status FROM messages"
        f" WHERE latest_status NOT IN ({placeholders}) AND updated_at <= ?"
        " AND (checked_at IS NULL OR checked_at <= ?)"
        " ORDER BY coalesce(checked_at, ''), updated_at LIMIT ?",
        (*FINAL_STATUSES, idle_before, idle_before, limit),
    ).fetchall()


def mark_checked(conn, sid, at):
    """Records that Twilio was asked, so messages stuck in one status take turns."""
    with write_transaction(conn):
        conn.execute("UPDATE messages SET checked_at = ? WHERE sid = ?", (at, sid))


def prune(conn, updated_before, body_before):
    """Deletes messages (and their history) idle since `updated_before`; clears old bodies."""
    with write_transaction(conn):
        events = conn.execute(
            "SELECT count(*) FROM status_events WHERE message_sid IN"
            " (SELECT sid FROM messages WHERE updated_at < ?)",
            (updated_before,),
        ).fetchone()[0]
        messages = conn.execute(
            "DELETE FROM messages WHERE updated_at < ?", (updated_before,)
        ).rowcount
        bodies = conn.execute(
            "UPDATE messages SET body = NULL WHERE body IS NOT NULL AND created_at < ?",
            (body_before,),
        ).rowcount
    return messages, events, bodies


def check_writable(conn):
    """Commits a one-row write, so a health check fails when statuses could not be stored."""
    with write_transaction(conn):
        conn.execute(
            "INSERT INTO health_checks (id, checked_at) VALUES (1, ?)"
            " ON CONFLICT (id) DO UPDATE SET checked_at = excluded.checked_at",
            (utc_now_iso(),),
        )
