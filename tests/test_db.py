import sqlite3
import subprocess
import sys
import threading
import time

import pytest

import db


def test_older_database_is_migrated_in_place(tmp_path):
    path = str(tmp_path / "old.db")
    conn = sqlite3.connect(path)
    conn.executescript(db.MIGRATIONS[0])
    conn.execute("PRAGMA user_version = 1")
    conn.execute("INSERT INTO messages (sid, latest_status, created_at, updated_at)"
                 " VALUES ('SM1', 'sent', '2026-01-01T00:00:00.000Z', '2026-01-01T00:00:00.000Z')")
    conn.commit()
    conn.close()

    assert db.migrate(path) == len(db.MIGRATIONS)
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(db.MIGRATIONS)
    assert conn.execute("SELECT sid, latest_status, checked_at FROM messages").fetchall() == [
        ("SM1", "sent", None)]
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    assert db.migrate(path) == len(db.MIGRATIONS), "migrating again changes nothing"


@pytest.mark.parametrize("attempt", range(5))
def test_processes_starting_together_migrate_once(tmp_path, attempt):
    """gunicorn and a scheduled command may start at once on a new database."""
    path = str(tmp_path / "race.db")
    barrier = threading.Barrier(8)
    errors = []

    def start():
        barrier.wait()
        try:
            db.migrate(path)
        except sqlite3.Error as error:
            errors.append(error)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(db.MIGRATIONS)
    conn.close()


def test_a_newer_schema_is_refused_not_downgraded(tmp_path):
    path = str(tmp_path / "newer.db")
    db.migrate(path)
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {len(db.MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(sqlite3.DatabaseError, match="newer than this code"):
        db.migrate(path)
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(db.MIGRATIONS) + 1
    conn.close()


def test_nested_write_transactions_fail_instead_of_hanging(tmp_path):
    path = str(tmp_path / "nested.db")
    db.migrate(path)
    outer, inner = db.open_connection(path), db.open_connection(path)
    try:
        with db.write_transaction(outer):
            with pytest.raises(sqlite3.OperationalError, match="within a transaction"):
                with db.write_transaction(inner):
                    pass
    finally:
        outer.close()
        inner.close()
        db.close_all()


def test_a_stuck_writer_process_gives_locked_after_the_busy_timeout(tmp_path, monkeypatch):
    """Another process holding the writers' turn (suspended, say) cannot block us forever."""
    path = str(tmp_path / "stuck.db")
    db.migrate(path)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; "
         f"fd = os.open({path + '-lock'!r}, os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX); "
         "print('held', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setattr(db, "BUSY_TIMEOUT_MS", 300)
        conn = db.open_connection(path)
        started = time.monotonic()
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            db.record_status(conn, "SM1", "sent")
        assert time.monotonic() - started < 5
        conn.close()
    finally:
        holder.kill()
        holder.wait()
        db.close_all()
