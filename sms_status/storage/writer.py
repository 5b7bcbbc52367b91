"""The writer process: under gunicorn on SQLite, one process per server stores every write.

Why: a worker's request threads share one GIL. Each sqlite3 call gives it up and must win
it back from the other threads, so a write transaction of a few statements held SQLite's
one write lock for many times the CPU it used, with every other writer queued behind it.
This process has one thread for writes and nothing else to do: the workers hand it their
writes over a unix socket, and it commits all the writes that arrived meanwhile in one
transaction. (PostgreSQL has no such single lock: its writes stay in the request threads,
see gunicorn.conf.py.)

- Each write is one function of the storage room marked `@in_writer_process`, sent as its
  name and arguments and run here. One that fails is rolled back alone and its caller gets
  the error; the others in the batch still commit.
- A caller is answered only after the batch's COMMIT: a 200 still means committed. When the
  commit fails (a full disk), every caller in the batch gets the error, so nothing
  acknowledged is lost.
- gunicorn's master starts it before the workers and restarts it when it dies
  (`Supervisor`, from gunicorn.conf.py); meanwhile writes answer 503, never 200. It stops
  after the workers, when the server shuts down.
- Its commits leave their pages in the WAL; a second thread copies them into the database
  file (a checkpoint) every half second, and the writer itself rewinds the WAL between
  batches once it passes 16 MiB (`WalLimit`).
- Other processes that write the same file (a second server, `flask prune`) still take
  turns with it through sqlite.py's writers' queue, one batch at a time.
- The socket lives in a folder of its own under $TMPDIR (or /tmp, when $TMPDIR is too deep
  for a socket's path) that only the service's user can enter, named by gunicorn's master's
  pid so that a later start removes it if that master was killed. Its messages are JSON: a
  frame that is not one of those writes is refused, and only its connection is dropped; so
  is a connection whose answer cannot be sent. It keeps at most as many connections as its
  descriptors allow, less those SQLite needs, closing the one idle longest past that; when
  accept() still finds no descriptor, it pauses accepting briefly and serves the others.

Outside gunicorn (`python app.py`, the flask commands, tests with Flask's test client),
writes run in the calling thread.
"""

import errno
import json
import logging
import os
import resource
import selectors
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from typing import NamedTuple

from sms_status.serving import folders
from sms_status.storage import OutcomeUnknown

log = logging.getLogger("sms_status")

HEADER = struct.Struct("!I")
# How long a request thread waits for its batch to commit: a batch waits at most the busy
# timeout for SQLite's lock, plus the batch before it. Twilio gives up after 15 s.
ANSWER_TIMEOUT_SECONDS = 11
START_TIMEOUT_SECONDS = 15
GATHER_SECONDS = 0.002
CHECKPOINT_INTERVAL_SECONDS = 0.5
# Past this size the writer rewinds the WAL between two batches (see WalLimit).
WAL_LIMIT_BYTES = 16 * 1024 * 1024
WAL_RETRY_SECONDS = 0.05
WAL_MAX_RETRY_SECONDS = 5.0
# The planner's statistics follow the tables' growth (SQLiteEngine.migrate gathers
# them at start); SQLite recommends refreshing them periodically on long-lived connections.
STATISTICS_INTERVAL_SECONDS = 3600
RESTART_DELAY_SECONDS = 0.2
# A unix socket's path must fit in sockaddr_un: 107 bytes on Linux, 103 on macOS.
MAX_SOCKET_PATH_BYTES = 100
# The socket's folder: sms-status-writer-<gunicorn master's pid>-...
FOLDER_PREFIX = "sms-status-writer-"


# A write's arguments are a few short strings and numbers; nothing near this size is sent.
MAX_FRAME_BYTES = 1 << 20
# Of a write's name that no write has, the characters its warning repeats.
MAX_NAME_LOGGED = 60
# Descriptors kept out of the connections' reach: the database's files for the writer's and
# the checkpoints' connections, SQLite's temporary files, the listening socket, the logs.
RESERVED_DESCRIPTORS = 64
# How long the writer stops accepting when accept() finds no descriptor and no connection
# can be closed to make one: long enough not to spin, short enough to go unnoticed.
ACCEPT_PAUSE_SECONDS = 0.1
# accept()'s errors that say the process or the system is out of descriptors or memory.
OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
# Warnings about refused frames and connections: enough to see a fault, too few to flood.
FRAME_WARNINGS_PER_MINUTE = 30


class BadFrame(ValueError):
    """Bytes that are not a message of the writer's protocol."""


# What crosses between a worker and the writer, each frame a 4-byte length and that many
# bytes of JSON: a worker sends a `Write`, the writer answers with an `Answer`. Each type
# alone encodes and decodes itself, and checks what it decodes. A framing of its own, not
# multiprocessing.connection's, whose round trips cost both sides more CPU and whose
# accept() and recv_bytes() would hold the writer's one thread on a slow peer
# (docs/performance.md, "The writer's framing").

class Write(NamedTuple):
    """A worker asks the writer to run one write: a function of WRITES, by name, with its
    arguments. On the wire: [name, [args], {kwargs}]."""

    name: str
    args: list
    kwargs: dict

    def encode(self):
        return _json_bytes([self.name, list(self.args), self.kwargs])

    @classmethod
    def decode(cls, frame, functions):
        """The Write in a frame; raises BadFrame for a frame that is not one, or that names
        a write not in `functions` (what the writer may be asked to run)."""
        message = _json_value(frame)
        if not (isinstance(message, list) and len(message) == 3 and isinstance(message[0], str)
                and isinstance(message[1], list) and isinstance(message[2], dict)):
            raise BadFrame("a frame that is not a write: [name, [args], {kwargs}]")
        if message[0] not in functions:
            raise BadFrame("a frame that names no write of the storage room: %r"
                           % message[0][:MAX_NAME_LOGGED])
        return cls(*message)


class Failure(NamedTuple):
    """A write that failed in the writer: its error's class name and what it said."""

    kind: str
    text: str

    def error(self):
        """The error to raise in the worker: of its kind when that is one of sqlite3's, and
        an OperationalError (a 503) otherwise, such as a bug logged in the writer."""
        return ERROR_KINDS.get(self.kind, sqlite3.OperationalError)(self.text)


# The errors a failed write is raised as in the worker, by name.
ERROR_KINDS = {error.__name__: error for error in (
    sqlite3.Error, sqlite3.DatabaseError, sqlite3.OperationalError, sqlite3.IntegrityError,
    sqlite3.ProgrammingError, sqlite3.DataError, sqlite3.InternalError,
    sqlite3.NotSupportedError, sqlite3.InterfaceError)}


class Answer(NamedTuple):
    """The writer's answer to one Write, sent after its batch's commit: ("ok", the write's
    result) or ("error", a Failure). On the wire: ["ok", result] or ["error", [kind, text]]."""

    outcome: str
    value: object

    @classmethod
    def ok(cls, result):
        return cls("ok", result)

    @classmethod
    def failed(cls, engine, error):
        return cls("error", Failure(type(error).__name__, engine.describe_error(error)))

    def encode(self):
        return _json_bytes([self.outcome, self.value])

    @classmethod
    def decode(cls, frame, returns=None):
        """The Answer in a frame; raises BadFrame for anything else. JSON has no tuples: a
        result arrives as a list, rebuilt as `returns` when that is a named tuple (the
        write's return annotation)."""
        message = _json_value(frame)
        if not (isinstance(message, list) and len(message) == 2):
            raise BadFrame("an answer that is not [outcome, value]")
        outcome, value = message
        if outcome == "ok":
            if _is_named_tuple(returns) and value is not None:
                if not (isinstance(value, list) and len(value) == len(returns._fields)):
                    raise BadFrame(f"a result that is not a {returns.__name__}")
                value = returns(*value)
            return cls(outcome, value)
        if outcome == "error" and isinstance(value, list) and len(value) == 2 and all(
                isinstance(part, str) for part in value):
            return cls(outcome, Failure(*value))
        raise BadFrame("an answer that is neither [\"ok\", result] nor [\"error\", [kind, text]]")

    def result(self):
        """The write's result, or its error raised."""
        if self.outcome == "error":
            raise self.value.error()
        return self.value


def _is_named_tuple(returns):
    return isinstance(returns, type) and issubclass(returns, tuple) and hasattr(
        returns, "_fields")


# One encoder for every message: json.dumps() with separators builds a new one per call,
# which doubles the time to encode a frame (docs/performance.md).
_encode = json.JSONEncoder(separators=(",", ":")).encode


def _json_bytes(message):
    return _encode(message).encode()


def _json_value(frame):
    try:
        return json.loads(frame)
    except ValueError:
        raise BadFrame("a frame that is not JSON") from None
    except RecursionError:  # arrays or objects nested thousands deep
        raise BadFrame("a frame nested too deep") from None


def send_frame(sock, data):
    sock.sendall(HEADER.pack(len(data)) + data)


def take_frames(data):
    """The complete frames at the start of `data`, and the bytes after them; raises
    BadFrame for a frame too large."""
    frames = []
    while len(data) >= HEADER.size:
        size = HEADER.unpack_from(data)[0]
        if size > MAX_FRAME_BYTES:
            raise BadFrame(f"a frame of {size} bytes, over {MAX_FRAME_BYTES}")
        end = HEADER.size + size
        if len(data) < end:
            break
        frames.append(data[HEADER.size:end])
        data = data[end:]
    return frames, data


def receive_frame(sock):
    """One frame, from a socket that carries one at a time (usually one recv() call)."""
    data = b""
    while True:
        chunk = sock.recv(1 << 16)
        if not chunk:
            raise EOFError
        data += chunk
        frames, _ = take_frames(data)
        if frames:
            return frames[0]


# --- in the workers: hand a write to the writer and wait for its answer --------------------

class Client:
    """Sends writes to the writer process over one connection per thread.

    Any failure to get an answer raises OutcomeUnknown, a sqlite3.OperationalError, which
    the app answers 503 with Retry-After, saying the write may or may not have been stored;
    Twilio retries, and a repeated callback is recognised and stored once.
    """

    def __init__(self, socket_path):
        self.socket_path = socket_path
        self._local = threading.local()

    def call(self, name, args, kwargs, timeout=None, returns=None):
        """Runs the write `name` in the writer and returns its result (as `returns`, when
        that is a named tuple); `timeout`, in seconds, shortens the wait for its answer
        (the health check's)."""
        frame = Write(name, args, kwargs).encode()
        sock = self._connection()
        if timeout is not None:
            set_timeouts(sock, timeout)
        try:
            try:
                send_frame(sock, frame)
            except ConnectionError:
                # A connection kept from a writer that has died since: nothing reached it,
                # so the write goes once more, to the writer that replaced it.
                self._drop()
                sock = self._connection()
                if timeout is not None:
                    set_timeouts(sock, timeout)
                send_frame(sock, frame)
            answer = Answer.decode(receive_frame(sock), returns)
        except (OSError, EOFError, BadFrame) as error:
            self._drop()
            # The kernel's timeout ends a recv or send with EAGAIN.
            if isinstance(error, BlockingIOError):
                reason = "no answer within %g s" % (timeout or ANSWER_TIMEOUT_SECONDS)
            elif isinstance(error, BadFrame):
                reason = f"it answered {error}"
            else:
                reason = "it stopped before answering"
            raise OutcomeUnknown(f"the database writer process failed ({reason}); the "
                                 "write may or may not be stored") from None
        if timeout is not None:
            set_timeouts(sock, ANSWER_TIMEOUT_SECONDS)
        return answer.result()

    def _connection(self):
        sock = getattr(self._local, "sock", None)
        if sock is not None and self._local.pid == os.getpid():
            return sock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # The kernel's timeouts, not settimeout(): with those, Python polls before each
        # send and recv, and the thread gives up the GIL and wins it back twice per call
        # instead of once, against the worker's other threads (docs/performance.md, "What
        # chose the design").
        set_timeouts(sock, ANSWER_TIMEOUT_SECONDS)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise sqlite3.OperationalError(
                "the database writer process is not running (it is restarted "
                "automatically); nothing was stored") from None
        self._local.sock, self._local.pid = sock, os.getpid()
        return sock

    def _drop(self):
        sock, self._local.sock = self._local.sock, None
        if sock is not None:
            sock.close()


def set_timeouts(sock, seconds):
    """The kernel's send and receive timeouts of a socket (struct timeval)."""
    wait = struct.pack("ll", int(seconds), int(seconds % 1 * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, wait)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, wait)


# --- in the writer process: run the writes that arrived, one commit per batch --------------

class BatchStorage:
    """What a write function sees in the writer: its transactions are the batch's."""

    writer = None  # a write that calls another runs it here, in the same batch

    def __init__(self, engine, tx):
        self.tx = tx
        # Where the engine differs, whole, and whether status changes record events: a write
        # sees the same here as in place.
        self.ops, self.features = engine.ops, engine.features
        self.records_events = engine.records_events

    @contextmanager
    def transaction(self, probe=False):
        yield self.tx


class WriteFailed(Exception):
    """A write of a batch run without savepoints failed: the batch is run again."""


def run_batch(engine, writes, functions):
    """Runs writes [Write] in one transaction; returns an Answer for each.

    A write that fails is rolled back alone and answered with its error; the others still
    commit. Writes rarely fail, so the batch first runs without a savepoint per write (two
    statements fewer each); if one fails, that attempt is rolled back whole and the batch
    runs again with savepoints. If the transaction itself fails (its commit, or an error
    that ends it), every write gets that error: none of them is stored.
    """
    try:
        try:
            return _run_once(engine, writes, functions, savepoints=False)
        except WriteFailed:
            return _run_once(engine, writes, functions, savepoints=True)
    except sqlite3.Error as error:
        answer = Answer.failed(engine, error)
        log.error("Database writer: a batch of %d writes failed, none stored: %s",
                  len(writes), answer.value.text)
        return [answer] * len(writes)


def _run_once(engine, writes, functions, savepoints):
    answers = []
    with engine.transaction() as tx:
        storage = BatchStorage(engine, tx)
        for name, args, kwargs in writes:
            if savepoints:
                tx.execute("SAVEPOINT write")
            try:
                answers.append(Answer.ok(functions[name](storage, *args, **kwargs)))
            except Exception as error:
                if not savepoints:
                    raise WriteFailed from None  # rolls this attempt back
                if not isinstance(error, sqlite3.Error):
                    log.exception("Database writer: %s failed", name)
                # Raises, and so fails the whole batch, when the error ended the
                # transaction (SQLite rolls back by itself on a full disk, for one).
                tx.execute("ROLLBACK TO write")
                answers.append(Answer.failed(engine, error))
            if savepoints:
                tx.execute("RELEASE write")
    return answers


def checkpoint_continually(engine, stopping):
    """Copies the WAL into the database every half second, beside the commits.

    Left to SQLite, the commit that fills the WAL past 1000 pages does this copy, with its
    fsync, while every caller of its batch waits, which cost callbacks/s (docs/performance.md,
    "What chose the design"). A PASSIVE checkpoint waits for no one, and the sqlite3 module
    lets the committing thread run meanwhile.
    """
    last_problem = None
    while not stopping:
        time.sleep(CHECKPOINT_INTERVAL_SECONDS)
        try:
            engine.checkpoint()
            last_problem = None
        except sqlite3.Error as error:
            problem = engine.describe_error(error)
            if problem != last_problem:  # once, not twice a second
                log.warning("Database writer: checkpoint failed: %s", problem)
            last_problem = problem


class WalLimit:
    """Keeps the WAL from growing without bound under sustained writes.

    The PASSIVE checkpoints beside the commits copy the WAL's pages into the database, but
    SQLite rewinds the WAL to its start only once a checkpoint has copied all of it while
    no write is under way, which commits every few milliseconds never allow: the WAL grew
    until the disk was full (docs/performance.md, "A bounded WAL"). So between two batches,
    once the WAL is past `limit` bytes, the writer runs a RESTART checkpoint itself
    (engine.rewind_wal()), which waits briefly for readers; the next commit then writes the
    WAL from its start. Writes wait meanwhile; most pages are already copied, so it is short.
    """

    def __init__(self, engine, limit=WAL_LIMIT_BYTES, clock=time.monotonic):
        self.engine, self.limit, self.clock = engine, limit, clock
        self.next_try = 0.0
        self.retry_after = WAL_RETRY_SECONDS
        self.last_problem = None

    def check(self):
        """Rewinds the WAL if it is past the limit; when readers or the other checkpoint
        keep it from finishing, tries again later, waiting twice as long after each failure
        (up to WAL_MAX_RETRY_SECONDS): a long read (a backup) must not make every batch
        wait for a checkpoint that cannot finish."""
        if self.clock() < self.next_try or self.engine.wal_size() <= self.limit:
            return
        try:
            if self.engine.rewind_wal():
                self.last_problem, self.retry_after = None, WAL_RETRY_SECONDS
                return
            problem = "readers or a checkpoint under way kept it from being rewound"
        except sqlite3.Error as error:
            problem = self.engine.describe_error(error)
        self.next_try = self.clock() + self.retry_after
        self.retry_after = min(2 * self.retry_after, WAL_MAX_RETRY_SECONDS)
        size = self.engine.wal_size()
        if size > 2 * self.limit and problem != self.last_problem:  # once, not every batch
            log.warning("Database writer: the WAL is %d MiB, past twice its limit of %d MiB: "
                        "%s", size >> 20, self.limit >> 20, problem)
            self.last_problem = problem


class Connections:
    """The workers' connections to the writer, the listening socket and what waits on them.

    A connection's troubles stay in it: a bad frame, or an answer that cannot be sent,
    closes that connection only. Each connection holds a descriptor that SQLite may need to
    open a file with, so past `limit` of them the one idle longest is closed (a worker's
    thread reconnects when it next writes, see Client.call); and when accept() finds no
    descriptor all the same, the writer closes the one idle longest, or with none to close
    stops accepting for ACCEPT_PAUSE_SECONDS, and goes on serving the others.
    """

    def __init__(self, listener, limit, warnings):
        self.listener, self.limit, self.warnings = listener, limit, warnings
        self.selector = selectors.DefaultSelector()
        self.selector.register(listener, selectors.EVENT_READ)
        # Per connection, least recently heard from first: the bytes of a frame not yet
        # complete.
        self.received = OrderedDict()
        self.paused_until = None

    def ready(self, timeout):
        """The sockets with something to read (the listener: a connection to accept)."""
        if self.paused_until is not None:
            left = self.paused_until - time.monotonic()
            if left > 0:
                timeout = min(timeout, left)
            else:
                self.paused_until = None
                self.selector.register(self.listener, selectors.EVENT_READ)
        return [key.fileobj for key, _ in self.selector.select(timeout=timeout)]

    def accept(self):
        try:
            conn, _ = self.listener.accept()
        except OSError as error:
            if error.errno not in OUT_OF_DESCRIPTORS:
                return  # that connection is gone already (ECONNABORTED); not ours to fix
            # The limit of open files may have been lowered since the start (prlimit):
            # SQLite's files need their share of what is left.
            self.limit = min(self.limit, connection_limit())
            if self.received:
                self.close_idlest("accept() found no descriptor (%s)" % errno.errorcode.get(
                    error.errno, error.errno), keep=min(self.limit, len(self.received) - 1))
            else:
                self.warn("Database writer: accept() found no descriptor (%s) and no "
                          "connection to close; not accepting for %g s",
                          errno.errorcode.get(error.errno, error.errno), ACCEPT_PAUSE_SECONDS)
                self.selector.unregister(self.listener)
                self.paused_until = time.monotonic() + ACCEPT_PAUSE_SECONDS
            return
        self.selector.register(conn, selectors.EVENT_READ)
        self.received[conn] = b""
        if len(self.received) > self.limit:
            self.close_idlest(f"{self.limit} connections, the most it keeps", keep=self.limit)

    def receive(self, sock, functions):
        """The writes that arrived on `sock`, as [Write]; [] when it was closed instead (by
        the worker, or here for what it sent)."""
        try:
            data = sock.recv(1 << 16)
        except OSError:
            data = b""
        if not data:  # the worker closed it (its thread gave up, or it exited)
            self.close(sock)
            return []
        self.received.move_to_end(sock)
        try:
            frames, self.received[sock] = take_frames(self.received[sock] + data)
            return [Write.decode(frame, functions) for frame in frames]
        except BadFrame as error:
            self.warn("Database writer: dropped a connection that sent %s", error)
        except Exception as error:  # whatever else a frame causes ends its connection only
            self.warn("Database writer: dropped a connection whose frame raised %s",
                      type(error).__name__)
        self.close(sock)
        return []

    def answer(self, sock, answer):
        """Sends a write's answer; False if that closed the connection."""
        try:
            send_frame(sock, answer.encode())
        except OSError:
            pass  # its thread gave up waiting, and answered 503 already; recv() sees the end
        except (TypeError, ValueError, RecursionError) as error:
            self.warn("Database writer: dropped a connection whose answer could not be sent "
                      "(%s)", type(error).__name__)
            self.close(sock)
            return False
        return True

    def close_idlest(self, reason, keep):
        """Closes the connections idle longest until `keep` are left."""
        closing = len(self.received) - keep
        self.warn("Database writer: %s; closed the %d connections idle longest", reason,
                  closing)
        for _ in range(closing):
            self.close(next(iter(self.received)))

    def close(self, sock):
        self.selector.unregister(sock)
        sock.close()
        del self.received[sock]

    def warn(self, message, *args):
        """A warning within the writer's budget: nobody can flood the log by connecting."""
        self.warnings.warn(time.monotonic(), "such warnings", message, *args)


def connection_limit():
    """How many connections the writer keeps: its descriptors, less RESERVED_DESCRIPTORS."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return max(soft - RESERVED_DESCRIPTORS, 16)


def serve(engine, listener, functions, master):
    """Answers the workers until SIGUSR1 (from Supervisor.stop), or until gunicorn's master
    (the process `master`) is gone."""
    from sms_status.logs import LogBudget

    stopping = []
    signal.signal(signal.SIGUSR1, lambda *_: stopping.append(True))
    # A process manager may send SIGTERM to every process of the service at once (systemd
    # does): the workers then finish their requests, which need this process.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    checkpointer = threading.Thread(target=checkpoint_continually, args=(engine, stopping),
                                    name="checkpoints", daemon=True)
    checkpointer.start()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the master, which stops us
    connections = Connections(listener, connection_limit(),
                              LogBudget(FRAME_WARNINGS_PER_MINUTE))
    wal_limit = WalLimit(engine)
    statistics_due = time.monotonic() + STATISTICS_INTERVAL_SECONDS
    while not stopping and os.getppid() == master:
        batch = []
        ready = connections.ready(timeout=0.5)
        if len(ready) > 1:
            # Writes are arriving together: wait a moment for more, so that one commit
            # (and one wake-up of this process) serves more of them. A lone write is not
            # kept waiting. PostgreSQL's commit_delay and commit_siblings do the same.
            time.sleep(GATHER_SECONDS)
            ready = connections.ready(timeout=0)
        for sock in ready:
            if sock is listener:
                connections.accept()
            elif sock in connections.received:  # not closed meanwhile to make room
                batch += [(sock, write) for write in connections.receive(sock, functions)]
        # The writes of connections closed this round go too: they could not be answered.
        batch = [(sock, write) for sock, write in batch if sock in connections.received]
        if batch:
            answers = run_batch(engine, [write for _, write in batch], functions)
            for (sock, _), answer in zip(batch, answers, strict=True):
                if sock in connections.received:
                    connections.answer(sock, answer)
            wal_limit.check()
        if time.monotonic() >= statistics_due:
            statistics_due += STATISTICS_INTERVAL_SECONDS
            try:
                engine.refresh_statistics()
            except sqlite3.Error as error:
                log.warning("Database writer: could not refresh the planner's statistics: %s",
                            engine.describe_error(error))
    stopping.append(True)
    checkpointer.join()  # before closing its connection under it
    engine.close()


def main(argv):
    """`python -m sms_status.storage.writer <socket> <master pid>`, run by Supervisor in
    gunicorn's folder and environment, so that DATABASE_URL names the same database as the
    app's (the password never appears in a command line)."""
    from sms_status.logs import OneLineFormatter

    socket_path, master = argv[0], int(argv[1])
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)

    from sms_status.config import load_config
    from sms_status.storage import (  # noqa: F401 (their writes)
        access,
        inbound,
        keys,
        maintenance,
        opt_outs,
        outbox,
        sends,
        statuses,
    )
    from sms_status.storage.writes import WRITES

    config = load_config(os.environ)
    # As the app opens it: the same database, and status changes record their events when
    # STATUS_WEBHOOK_URL is set.
    engine = access.open_storage(config, checkpoints=False)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if os.path.exists(socket_path):
        os.unlink(socket_path)  # left by a writer that was killed
    listener.bind(socket_path)
    listener.listen(1024)
    log.info("Database writer %d ready for %s", os.getpid(), engine.label)
    serve(engine, listener, WRITES, master)


# --- in gunicorn's master: start the writer, restart it when it dies -----------------------

def socket_directory():
    """A new folder (mode 0700) for the writer's socket, named after gunicorn's master: under
    $TMPDIR, or under /tmp when $TMPDIR is too deep for a socket's path. The folders of
    killed masters there are removed first."""
    directory = folders.make_folder(FOLDER_PREFIX)
    if len(os.fsencode(os.path.join(directory, "socket"))) <= MAX_SOCKET_PATH_BYTES:
        return directory
    os.rmdir(directory)
    log.warning("TMPDIR (%s) is too deep for a unix socket's path; the database writer's "
                "socket goes under /tmp instead", tempfile.gettempdir())
    return folders.make_folder(FOLDER_PREFIX, "/tmp")


def wait_for_end(process):
    """Waits for a child process to end; returns how it ended, in words.

    gunicorn's master collects any child that ends (waitpid(-1)), often before Popen.wait()
    can, which then sees no status at all. waitid(WNOWAIT) reads the status as soon as the
    child ends, without collecting it.
    """
    try:
        info = os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)
    except ChildProcessError:
        info = None
    process.wait()
    if info is None:
        return "its exit status was collected elsewhere"
    if info.si_code == os.CLD_EXITED:
        return f"exit status {info.si_status}"
    try:
        return f"killed by {signal.Signals(info.si_status).name}"
    except ValueError:
        return f"killed by signal {info.si_status}"


class Supervisor:
    """Keeps one writer process running for a SQLite database while gunicorn runs."""

    def __init__(self):
        self.directory = socket_directory()
        self.socket_path = os.path.join(self.directory, "socket")
        self.argv = [sys.executable, "-m", __name__, self.socket_path, str(os.getpid())]
        self.folder = os.getcwd()
        # The package's parent folder on the path, wherever gunicorn was started from.
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            filter(None, [root, os.environ.get("PYTHONPATH")])))
        self.process = None
        self.stopping = False
        self.lock = threading.Lock()  # no new writer is started once stop() has begun
        # No fork of this process while a writer is being started: a child forked during
        # Popen (a gunicorn worker) would inherit Popen's pipe that reports a failed exec,
        # and Popen would wait on that pipe until the child exits, while no dead writer
        # is restarted. (Popen's own fork does not run these handlers.)
        self.starting = threading.Lock()
        os.register_at_fork(before=self.starting.acquire,
                            after_in_parent=self.starting.release,
                            after_in_child=self.starting.release)
        self.thread = threading.Thread(target=self._keep_running, name="writer supervisor",
                                       daemon=True)

    def start(self):
        """Starts the writer and waits until it takes connections."""
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(self.socket_path)
                    return
                except OSError:
                    time.sleep(0.05)
        log.error("The database writer did not start within %d s; writes answer 503 until "
                  "it does", START_TIMEOUT_SECONDS)

    def _keep_running(self):
        while True:
            with self.lock:
                if self.stopping:
                    break
                with self.starting:
                    self.process = subprocess.Popen(self.argv, cwd=self.folder,
                                                    env=self.env)
            ended = wait_for_end(self.process)
            if self.stopping:
                break
            log.error("The database writer (pid %d) stopped (%s); starting a new one. Writes "
                      "answer 503 meanwhile.", self.process.pid, ended)
            time.sleep(RESTART_DELAY_SECONDS)

    def stop(self):
        """Stops the writer once the workers are gone: it finishes the batch it is on."""
        with self.lock:
            self.stopping = True
            process = self.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGUSR1)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(self.directory, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
