"""Named API keys: their form, their scopes, their digests, and each process's short-lived
copy of the keys it has looked up (KeyRing).

A key is `sk_` and 43 URL-safe characters from `secrets` (256 random bits); only its SHA-256
digest is stored. A slow, salted hash (bcrypt, scrypt) protects passwords, which people
choose from a small space that can be searched; no search reaches a key drawn from 2^256,
so one unsalted SHA-256 is as strong, and it lets a request find its key by an index
lookup of the digest instead of trying a slow hash against every key.

`API_KEY`, the setting, is a key too: named `API_KEY`, with every scope, never stored.

Nothing here touches Flask; the storage functions are storage/keys.py's.
"""

import hashlib
import logging
import re
import secrets
import threading
import time
from typing import NamedTuple

from sms_status.storage import DATABASE_ERRORS, keys
from sms_status.storage.times import stored_time

log = logging.getLogger("sms_status")

SCOPES = ("send", "read", "admin")
DEFAULT_SCOPES = ("send", "read")
KEY_PREFIX = "sk_"
NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
NAME_RULE = "1 to 64 letters, digits, '-' and '_'"
SETTING_KEY_NAME = "API_KEY"
# How long a process answers from its copy of a key before reading it again: a key revoked
# is refused everywhere within this time (and the time of one read). A key that is not
# found is never kept, so a new key works at once.
CACHE_SECONDS = 0.5
# A key's last use is written at most this often (per key, across workers and instances).
LAST_USED_EVERY_SECONDS = 60


class Key(NamedTuple):
    """A key as a request uses it: its name, scopes and own hourly limit (None: none)."""

    name: str
    scopes: frozenset
    max_sends_per_hour: int | None = None
    last_used_at: str | None = None

    @classmethod
    def from_row(cls, row):
        return cls(row["name"], frozenset(row["scopes"].split()), row["max_sends_per_hour"],
                   row["last_used_at"])


SETTING_KEY = Key(SETTING_KEY_NAME, frozenset(SCOPES))


def new_key():
    """A new key's text: sk_ and 43 URL-safe random characters."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def could_be_named_key(text):
    """Whether `text` has the shape of new_key()'s keys: sk_ and 43 characters."""
    return len(text) == len(KEY_PREFIX) + 43 and text.startswith(KEY_PREFIX)


def digest(text):
    """The stored form of a key: the hex SHA-256 digest of its text."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def name_problem(name):
    """What is wrong with a key's name, or None."""
    if name == SETTING_KEY_NAME:
        return (f"{SETTING_KEY_NAME} is the name of the key the API_KEY setting holds; "
                "choose another name")
    if not NAME_PATTERN.fullmatch(name):
        return f"a key's name is {NAME_RULE}; got {name!r}"
    return None


def stored_scopes(scopes):
    """Scopes as stored: known ones, each once, space-separated in SCOPES' order."""
    return " ".join(scope for scope in SCOPES if scope in scopes)


class KeyRing:
    """This process's view of the named keys: each looked up in the database at most every
    CACHE_SECONDS, by digest (a request's key) or by name (a dashboard session's).

    `setting_key` is API_KEY's text (None when unset): it is compared in constant time and
    never looked up. A key's use is recorded as its last_used_at at most once a minute.
    """

    def __init__(self, setting_key, cache_seconds=CACHE_SECONDS, monotonic=time.monotonic):
        self.setting_key = setting_key
        self.cache_seconds, self.monotonic = cache_seconds, monotonic
        self.lock = threading.Lock()
        self.by_digest, self.by_name = {}, {}  # -> (Key, when it was read)
        self.marked = {}  # name -> the clock's time this process last marked it used

    def key_for(self, storage, text, now):
        """The active key whose text is `text`, or None (unknown or revoked). Raises the
        storage's DATABASE_ERRORS when a named key must be read and cannot be."""
        if self.setting_key is not None and secrets.compare_digest(
                text.encode("utf-8", "surrogatepass"), self.setting_key.encode()):
            return SETTING_KEY
        if not could_be_named_key(text):
            return None  # no read for text that no `keys create` ever made
        key = self._cached(self.by_digest, digest(text),
                           lambda hashed: keys.key_by_digest(storage, hashed))
        if key is not None:
            self._mark_used(storage, key, now)
        return key

    def key_named(self, storage, name):
        """The active key called `name` (API_KEY's when the setting is set), or None."""
        if name == SETTING_KEY_NAME:
            return SETTING_KEY if self.setting_key is not None else None
        return self._cached(self.by_name, name, lambda named: keys.key_by_name(storage, named))

    def _cached(self, cache, lookup, read):
        now = self.monotonic()
        with self.lock:
            kept = cache.get(lookup)
        if kept is not None and now - kept[1] < self.cache_seconds:
            return kept[0]
        row = read(lookup)  # the time read is `now`, taken before the read began
        with self.lock:
            if row is None or row["revoked_at"] is not None:
                cache.pop(lookup, None)
                return None
            key = Key.from_row(row)
            cache[lookup] = (key, now)
        return key

    def _mark_used(self, storage, key, now):
        since = now - LAST_USED_EVERY_SECONDS
        with self.lock:
            if self.marked.get(key.name, float("-inf")) > since or (
                    key.last_used_at is not None and key.last_used_at > stored_time(since)):
                return
            self.marked[key.name] = now
        try:
            keys.mark_used(storage, key.name, stored_time(now), stored_time(since))
        except DATABASE_ERRORS as error:
            # The request goes on: its key is valid, only the record of its use is late.
            log.warning("Could not record the use of key %s: %s", key.name,
                        storage.describe_error(error))
