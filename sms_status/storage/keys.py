"""Named API keys' records: created, listed, looked up by digest or name, marked used, and
revoked. Only the SHA-256 digest of a key is stored (api_keys.py says why that is enough)."""

from sms_status.storage.writes import in_writer_process

KEY_COLUMNS = "name, scopes, max_sends_per_hour, created_at, last_used_at, revoked_at"


@in_writer_process
def create_key(storage, name, digest, scopes, max_sends_per_hour, created_at):
    """Stores a new key; False when a key (revoked or not) already has this name."""
    with storage.transaction() as tx:
        return tx.execute(
            "INSERT INTO api_keys (name, digest, scopes, max_sends_per_hour, created_at)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (name, digest, scopes, max_sends_per_hour, created_at)).rowcount == 1


@in_writer_process
def revoke_key(storage, name, revoked_at):
    """Marks the key revoked; "revoked", "already" (it was before) or "unknown"."""
    with storage.transaction() as tx:
        row = tx.execute("SELECT revoked_at FROM api_keys WHERE name = ?", (name,)).fetchone()
        if row is None:
            return "unknown"
        if row["revoked_at"] is not None:
            return "already"
        tx.execute("UPDATE api_keys SET revoked_at = ? WHERE name = ?", (revoked_at, name))
        return "revoked"


@in_writer_process
def mark_used(storage, name, used_at, unless_since):
    """Records that the key was used at `used_at`, unless it was recorded as used at or
    after `unless_since` already: across workers and instances, one write per interval."""
    with storage.transaction() as tx:
        tx.execute("UPDATE api_keys SET last_used_at = ? WHERE name = ?"
                   " AND (last_used_at IS NULL OR last_used_at < ?)",
                   (used_at, name, unless_since))


def key_by_digest(storage, digest):
    """The row of the key with this digest (revoked or not), or None."""
    rows = storage.query(f"SELECT {KEY_COLUMNS} FROM api_keys WHERE digest = ?", (digest,))
    return rows[0] if rows else None


def key_by_name(storage, name):
    """The row of the key with this name (revoked or not), or None."""
    rows = storage.query(f"SELECT {KEY_COLUMNS} FROM api_keys WHERE name = ?", (name,))
    return rows[0] if rows else None


def all_keys(storage):
    """Every key's row, by name; never a digest."""
    return storage.query(f"SELECT {KEY_COLUMNS} FROM api_keys ORDER BY name")
