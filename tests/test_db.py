import sqlite3
import threading

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
