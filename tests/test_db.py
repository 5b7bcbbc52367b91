import os
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from sms_status import create_app
from sms_status.config import ConfigError
from sms_status.services import get_db, services
from sms_status.storage import (
    DATABASE_ERRORS,
    READ_TIME_LIMIT_ERRORS,
    Engine,
    Features,
    Operations,
    SQLiteEngine,
    open_engine,
    statuses,
)
from sms_status.storage.postgres import PostgresEngine
from sms_status.storage.schema import MIGRATIONS, SCHEMA_VERSION
from support import (
    AUTH,
    callback,
    database_at_version,
    free_port,
    live_env,
    post_to_service,
    sql_rows,
    sqlite_only,
)


def engine_for(url, **settings):
    return open_engine(url, pool_size=2, **settings)


@pytest.mark.parametrize("url", ["sqlite:///{}/engine.db", "postgresql://localhost/engine"])
def test_each_engine_keeps_the_engine_contract(url, tmp_path):
    """Both engines are Engines, with their differences in subclasses of the bases, and
    every piece of SQL the base Operations names."""
    engine = open_engine(url.format(tmp_path))
    assert isinstance(engine, Engine)
    assert isinstance(engine.ops, Operations) and isinstance(engine.features, Features)
    for name in ("next_storage_order", "skip_locked"):
        assert isinstance(getattr(engine.ops, name), str), name
    assert isinstance(engine.ops.seconds_between("a", "b"), str)


def schema_version(url):
    if url.startswith("sqlite:///"):
        return sql_rows(url, "PRAGMA user_version")[0][0]
    return sql_rows(url, "SELECT version FROM schema_version")[0][0]


@sqlite_only
def test_older_database_is_migrated_in_place(database_url):
    path = database_url[len("sqlite:///"):]
    conn = sqlite3.connect(path)
    for statement in MIGRATIONS[0][1]:
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    conn.execute("INSERT INTO messages (sid, latest_status, created_at, updated_at)"
                 " VALUES ('SM1', 'sent', '2026-01-01T00:00:00.000Z', '2026-01-01T00:00:00.000Z')")
    conn.commit()
    conn.close()

    engine = engine_for(database_url)
    assert engine.migrate() == SCHEMA_VERSION
    assert schema_version(database_url) == SCHEMA_VERSION
    assert sql_rows(database_url, "SELECT sid, latest_status, checked_at FROM messages") == [
        ("SM1", "sent", None)]
    assert sql_rows(database_url, "PRAGMA journal_mode") == [("wal",)]
    assert engine.migrate() == SCHEMA_VERSION, "migrating again changes nothing"


@pytest.mark.parametrize("attempt", range(3))
def test_processes_starting_together_migrate_once(database_url, attempt):
    """gunicorn and a scheduled command, or several instances, may start at once on a new
    database: each migrates under a lock (SQLite's write lock, an advisory lock)."""
    barrier = threading.Barrier(8)
    errors = []

    def start():
        barrier.wait()
        try:
            engine_for(database_url).migrate()
        except DATABASE_ERRORS as error:
            errors.append(error)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert schema_version(database_url) == SCHEMA_VERSION


def test_a_newer_schema_is_refused_not_downgraded(database_url):
    engine_for(database_url).migrate()
    newer = SCHEMA_VERSION + 1
    if database_url.startswith("sqlite:///"):
        sql_rows(database_url, f"PRAGMA user_version = {newer}")
    else:
        sql_rows(database_url, "UPDATE schema_version SET version = ?", (newer,))
    with pytest.raises(DATABASE_ERRORS, match="newer than this code"):
        engine_for(database_url).migrate()
    assert schema_version(database_url) == newer


def test_postgres_errors_never_show_the_password(postgres_url):
    wrong = postgres_url.replace("@", "x@", 1)  # the right user with a wrong password
    engine = engine_for(wrong)
    with pytest.raises(DATABASE_ERRORS) as caught:
        engine.migrate()
    password = wrong.split(":")[2].split("@")[0]
    assert "password authentication failed" in str(caught.value)
    assert password not in engine.describe_error(caught.value)
    assert password not in engine.label


@pytest.mark.parametrize("url", [
    pytest.param("postgresql://someone:secret@127.0.0.1:{port}/x", id="tcp"),
    pytest.param("postgresql://someone@/x?host={socket_dir}", id="socket"),
    pytest.param("postgresql://someone@127.0.0.1:{port},127.0.0.1:{port}/x", id="two-hosts"),
])
def test_postgres_errors_read_as_separate_sentences(url, tmp_path):
    """libpq's message and its hint, on two lines, become two sentences on one."""
    with pytest.raises(psycopg.OperationalError) as caught:
        psycopg.connect(url.format(port=free_port(), socket_dir=tmp_path), connect_timeout=2)
    described = PostgresEngine.describe_error(caught.value)
    assert "\n" in str(caught.value) and "\n" not in described
    assert (described.startswith("Connection refused. Is the server running")
            or described.startswith("No such file or directory. Is the server running"))
    assert described.endswith("?") and ". . " not in described


def test_a_refused_login_is_told_in_the_servers_words_with_where_and_who(
        postgres_url, tmp_path):
    # A wrong password that is also part of the server's answer ("password authentication").
    parts = urlsplit(postgres_url)
    wrong = urlunsplit(parts._replace(netloc=f"{parts.username}:pass@{parts.hostname}:"
                                             f"{parts.port}"))
    with pytest.raises(ConfigError) as caught:
        create_app(live_env(tmp_path, DATABASE_URL=wrong))
    message = str(caught.value)
    assert 'password authentication failed for user "postgres"' in message
    assert "***" not in message and ":pass@" not in message
    database = parts.path.lstrip("/")
    assert f"'{database}' at {parts.hostname}:{parts.port}" in message
    assert "user 'postgres'" in message
    assert len(message.strip().splitlines()) == 2  # the heading and this one problem


@sqlite_only
def test_nested_write_transactions_fail_instead_of_hanging(database_url):
    path = database_url[len("sqlite:///"):]
    engine_for(database_url).migrate()
    outer, inner = SQLiteEngine(path), SQLiteEngine(path)
    try:
        with outer.transaction():
            with pytest.raises(sqlite3.OperationalError, match="within a transaction"):
                with inner.transaction():
                    pass
    finally:
        outer.close()
        inner.close()


@sqlite_only
def test_a_stuck_writer_process_gives_locked_after_the_busy_timeout(database_url, monkeypatch):
    """Another process holding the writers' turn (suspended, say) cannot block us forever."""
    path = database_url[len("sqlite:///"):]
    engine = engine_for(database_url, busy_timeout=0.3)
    engine.migrate()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; "
         f"fd = os.open({path + '-lock'!r}, os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX); "
         "print('held', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            statuses.record_status(engine, "SM1", "sent")
        assert time.monotonic() - started < 5
    finally:
        holder.kill()
        holder.wait()
        engine.close()


def test_concurrent_updates_of_one_message_lose_nothing(database_url):
    """Callbacks for one message from many threads at once: each status stored once, the
    latest status the furthest one, no deadlock."""
    engine = engine_for(database_url)
    engine.migrate()
    updates = ["queued", "sending", "sent", "delivered", "read"] * 4
    barrier = threading.Barrier(len(updates))
    results, errors = [], []

    def deliver(status):
        barrier.wait()
        try:
            results.append(statuses.record_status(engine, "SM1", status, to="+15558675309"))
        except DATABASE_ERRORS as error:
            errors.append(error)

    threads = [threading.Thread(target=deliver, args=(s,)) for s in updates]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    engine.close()
    assert errors == []
    assert sorted(results) == [False] * 15 + [True] * 5
    assert sql_rows(database_url, "SELECT latest_status FROM messages") == [("read",)]
    assert sql_rows(database_url, "SELECT count(*) FROM status_events") == [(5,)]


def test_upgrading_to_version_6_records_the_time_to_delivered_of_stored_messages(database_url):
    """Version 6 keeps each message's seconds to its `delivered` event; an older database
    gets them computed from the history it has."""
    database_at_version(database_url, 5)
    sql_rows(database_url, "INSERT INTO messages (sid, latest_status, created_at, updated_at)"
             " VALUES ('SM1', 'delivered', '2026-01-01T23:59:58.000Z', '2026-01-02T00:00:05.250Z')")
    sql_rows(database_url, "INSERT INTO status_events (message_sid, status, received_at) VALUES"
             " ('SM1', 'sent', '2026-01-02T00:00:01.000Z'),"
             " ('SM1', 'delivered', '2026-01-02T00:00:05.250Z')")
    engine_for(database_url).migrate()
    [(seconds,)] = sql_rows(database_url, "SELECT seconds_to_delivered FROM messages")
    assert seconds == pytest.approx(7.25, abs=0.001)


def test_upgrading_to_version_9_gives_stored_messages_a_storage_order(database_url):
    """Version 9 orders messages created in the same millisecond by storage: SQLite numbers
    those it has in the order it stored them; PostgreSQL, which keeps no such order, in
    the order they were listed until then (creation, then SID). New ones come after."""
    database_at_version(database_url, 8)
    for sid, created in (("SM2", "2026-01-01T00:00:01.000Z"), ("SM3", "2026-01-01T00:00:00.000Z"),
                         ("SM1", "2026-01-01T00:00:01.000Z")):
        sql_rows(database_url, "INSERT INTO messages (sid, latest_status, created_at, updated_at)"
                 " VALUES (?, 'sent', ?, ?)", (sid, created, created))
    engine = engine_for(database_url)
    assert engine.migrate() == SCHEMA_VERSION
    statuses.record_status(engine, "SM0", "queued", at="2026-01-01T00:00:01.000Z")
    order = [sid for (sid,) in sql_rows(database_url,
                                         "SELECT sid FROM messages ORDER BY storage_order")]
    if database_url.startswith("sqlite:///"):
        assert order == ["SM2", "SM3", "SM1", "SM0"]
    else:
        assert order == ["SM3", "SM1", "SM2", "SM0"]
    engine.close()


def test_migrations_are_one_row_per_version_with_lists_of_statements():
    """A row's statements are lists (a bare string would run letter by letter), and
    PostgreSQL's are missing only before its baseline, the first row it has."""
    assert [row[0] for row in MIGRATIONS] == list(range(1, SCHEMA_VERSION + 1))
    baseline = next(version for version, _, postgres in MIGRATIONS if postgres is not None)
    for version, sqlite, postgres in MIGRATIONS:
        assert isinstance(sqlite, list) and all(isinstance(s, str) for s in sqlite), version
        if version >= baseline:
            assert isinstance(postgres, list) and all(isinstance(s, str) for s in postgres), \
                version
        else:
            assert postgres is None, version


# What each engine's declared types mean, for comparing the schemas.
SQLITE_KINDS = {"TEXT": "text", "INTEGER": "integer", "REAL": "real"}
POSTGRES_KINDS = {"text": "text", "integer": "integer", "bigint": "integer",
                  "double precision": "real"}


def sqlite_schema(url):
    """A SQLite database's tables, {table: [(column, kind, not null, place in the primary
    key)]}, and its indexes: by name, or a unique constraint's by its table and columns."""
    tables, indexes = {}, {}
    for (table,) in sql_rows(url, "SELECT name FROM sqlite_master"
                                  " WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"):
        # A primary key is never null on PostgreSQL; SQLite's are never stored null either.
        tables[table] = [
            (name, SQLITE_KINDS.get(kind, kind), bool(notnull or pk), pk)
            for name, kind, notnull, pk in sql_rows(
                url, 'SELECT name, type, "notnull", pk FROM pragma_table_info(?) ORDER BY cid',
                (table,))]
        for index, unique, origin, partial in sql_rows(
                url, 'SELECT name, "unique", origin, partial FROM pragma_index_list(?)',
                (table,)):
            if origin == "pk":  # compared as the columns' place in the primary key
                continue
            columns = tuple(name for (name,) in sql_rows(
                url, "SELECT name FROM pragma_index_info(?) ORDER BY seqno", (index,)))
            key = index if origin == "c" else ("unique constraint", table, columns)
            indexes[key] = (table, columns, bool(unique), bool(partial))
    return tables, indexes


def postgres_schema(url):
    """sqlite_schema's description of a PostgreSQL database, but for schema_version, the
    table PostgreSQL keeps the version in (SQLite keeps it in PRAGMA user_version)."""
    tables = {}
    for table, name, kind, notnull, pk in sql_rows(url, """
            SELECT c.table_name, c.column_name, c.data_type, c.is_nullable = 'NO',
                   coalesce(k.ordinal_position, 0)
            FROM information_schema.columns c
            LEFT JOIN information_schema.table_constraints t
                ON t.table_schema = c.table_schema AND t.table_name = c.table_name
                AND t.constraint_type = 'PRIMARY KEY'
            LEFT JOIN information_schema.key_column_usage k
                ON k.constraint_schema = t.constraint_schema
                AND k.constraint_name = t.constraint_name AND k.column_name = c.column_name
            WHERE c.table_schema = current_schema() AND c.table_name <> 'schema_version'
            ORDER BY c.table_name, c.ordinal_position"""):
        tables.setdefault(table, []).append((name, POSTGRES_KINDS.get(kind, kind), notnull, pk))
    indexes = {}
    for index, table, columns, unique, partial, constraint in sql_rows(url, """
            SELECT ic.relname, t.relname,
                   ARRAY(SELECT a.attname
                         FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k (attnum, n)
                         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                         ORDER BY k.n),
                   i.indisunique, i.indpred IS NOT NULL, con.contype
            FROM pg_index i
            JOIN pg_class ic ON ic.oid = i.indexrelid
            JOIN pg_class t ON t.oid = i.indrelid
            LEFT JOIN pg_constraint con
                ON con.conindid = i.indexrelid AND con.contype IN ('p', 'u')
            WHERE t.relnamespace = current_schema()::regnamespace
                AND t.relname <> 'schema_version'"""):
        if constraint == "p":
            continue
        key = index if constraint is None else ("unique constraint", table, tuple(columns))
        indexes[key] = (table, tuple(columns), unique, partial)
    return tables, indexes


def test_both_engines_reach_the_same_tables_columns_and_indexes(tmp_path, postgres_url):
    """A version that gives one engine a column, a type or an index the other lacks fails
    here: both engines' statements are written by hand, side by side in MIGRATIONS."""
    sqlite_url = f"sqlite:///{tmp_path}/new.db"
    engine_for(sqlite_url).migrate()
    engine_for(postgres_url).migrate()
    sqlite_tables, sqlite_indexes = sqlite_schema(sqlite_url)
    postgres_tables, postgres_indexes = postgres_schema(postgres_url)
    assert sorted(sqlite_tables) == sorted(postgres_tables)
    for table, columns in sqlite_tables.items():
        assert columns == postgres_tables[table], table
    assert sqlite_indexes == postgres_indexes
    assert "messages_by_storage_order" in sqlite_indexes  # the description sees indexes


@pytest.mark.parametrize("version", range(SCHEMA_VERSION))
def test_a_database_of_every_older_version_reaches_the_schema_of_a_new_one(
        database_url, tmp_path, version):
    """Each engine's migrations from any version a database was left at, as an older
    release left it (PostgreSQL's first version is 5), end at a new database's schema."""
    new_url = f"sqlite:///{tmp_path}/new.db"
    engine_for(new_url).migrate()
    if database_url.startswith("postgres") and 0 < version < 5:
        pytest.skip("no PostgreSQL database was at a version before 5")
    database_at_version(database_url, version)
    assert engine_for(database_url).migrate() == SCHEMA_VERSION
    describe = sqlite_schema if database_url.startswith("sqlite:///") else postgres_schema
    assert describe(database_url) == sqlite_schema(new_url)


@sqlite_only
def test_a_new_messages_storage_order_is_read_from_an_index(database_url):
    """SQLite numbers a new message after the largest storage order: one index seek, not a
    scan of every message, in each insert."""
    engine = engine_for(database_url)
    engine.migrate()
    plan = [row["detail"] for row in engine.query(
        "EXPLAIN QUERY PLAN INSERT INTO messages (sid, latest_status, created_at, updated_at,"
        f" storage_order) VALUES ('SM1', 'sent', '', '', {engine.ops.next_storage_order})")]
    assert "SEARCH messages USING COVERING INDEX messages_by_storage_order" in plan, plan
    engine.close()


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_a_request_that_cannot_get_a_connection_in_time_gets_503(postgres_url, make_app,
                                                                 monkeypatch):
    """The pool lends a connection for a bounded wait; past it: 503 with Retry-After."""
    app = make_app(DATABASE_URL=postgres_url, DATABASE_POOL_SIZE="1",
                   storage_settings={"pool_timeout": 0.3})
    client = app.test_client()
    lookup = lambda: client.get("/get-status/SM1", headers=AUTH)  # noqa: E731
    assert lookup().status_code == 404
    with app.app_context():
        # the read pool's only connection, busy elsewhere
        held = get_db()._pools().reads.getconn()
    try:
        started = time.monotonic()
        answer = lookup()
        assert answer.status_code == 503 and answer.headers["Retry-After"]
        assert time.monotonic() - started < 3
    finally:
        with app.app_context():
            get_db()._pools().reads.putconn(held)
    assert lookup().status_code == 404


@sqlite_only
@pytest.mark.parametrize("umask", [0o022, 0o000], ids=["umask-022", "umask-000"])
def test_the_database_and_the_files_beside_it_are_the_service_users_alone(
        database_url, service_env, start_service, umask):
    path = database_url[len("sqlite:///"):]
    # A lock file left world-writable by an older release is made private too.
    with open(path + "-lock", "w"):
        pass
    os.chmod(path + "-lock", 0o666)
    previous = os.umask(umask)
    try:
        env = service_env(simulate=False)
        service = start_service(env)
    finally:
        os.umask(previous)
    assert post_to_service(service, env, callback("SM" + "c" * 32, "sent")).status_code == 200
    modes = {suffix: stat.S_IMODE(os.stat(path + suffix).st_mode)
             for suffix in ("", "-wal", "-shm", "-lock")}
    assert modes == dict.fromkeys(modes, 0o600), {k: oct(v) for k, v in modes.items()}


@sqlite_only
def test_sqlite_plans_a_recipients_messages_of_one_status_on_the_recipient_index(database_url):
    engine_for(database_url).migrate()
    path = database_url[len("sqlite:///"):]
    with sqlite3.connect(path) as conn:  # many messages per status, few per recipient
        conn.executemany(
            "INSERT INTO messages (sid, to_number, latest_status, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?)",
            [(f"SM{n:032x}", f"+1555{n % 500:07d}", ("delivered", "sent")[n % 2],
              f"2026-11-26T19:{n // 60 % 60:02d}:{n % 60:02d}.000Z", "2026-11-26T20:00:00.000Z")
             for n in range(5000)])
    engine_for(database_url).migrate()  # as at the next start
    plan = sql_rows(database_url, "EXPLAIN QUERY PLAN SELECT sid FROM messages"
                    " WHERE to_number = ? AND latest_status = ?"
                    " ORDER BY created_at DESC, sid DESC LIMIT 51", ("+15550000007", "sent"))
    assert "messages_by_recipient_and_creation" in str(plan), plan


# Counts to a hundred million: seconds of work in one statement.
LONG_READ = ("WITH RECURSIVE c (x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 100000000)"
             " SELECT count(*) FROM c")


def test_a_sqlite_read_is_stopped_at_its_time_limit_and_the_connection_reads_on(tmp_path):
    engine = SQLiteEngine(str(tmp_path / "limit.db"), read_timeout=0.2)
    engine.migrate()
    started = time.monotonic()
    with pytest.raises(READ_TIME_LIMIT_ERRORS, match="longer than 0.2 s"):
        engine.query(LONG_READ)
    assert time.monotonic() - started < 3
    assert engine.query("SELECT count(*) AS n FROM messages")[0]["n"] == 0
    engine.close()


def test_the_commands_reads_have_no_time_limit(tmp_path):
    app = create_app(live_env(tmp_path, DATABASE_URL=f"sqlite:///{tmp_path}/commands.db"),
                     for_commands=True)
    assert services(app).storage.read_timeout == 0
    services(app).storage.close()
