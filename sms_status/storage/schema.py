"""The schema both engines reach, and the migrations that take a database there.

MIGRATIONS holds every version, one row each with both engines' statements. SQLite records
its version in PRAGMA user_version and walks every migration since; a new PostgreSQL
database starts at version 5 in one step. A database with a newer version than this code's
is refused, never downgraded.
"""

from sms_status.config import SIMULATED_ACCOUNT_SID


def sqlite_seconds_between(start, end):
    """SQL for the seconds from one stored timestamp to another, in SQLite."""
    return f"((julianday({end}) - julianday({start})) * 86400.0)"


def postgres_seconds_between(start, end):
    """SQL for the seconds from one stored timestamp to another, in PostgreSQL."""
    return f"extract(epoch FROM (({end})::timestamptz - ({start})::timestamptz))::float8"


def newer_schema(version):
    """The words for a database whose schema is newer than this code's, or None."""
    if version > SCHEMA_VERSION:
        return (f"its schema (version {version}) is newer than this code's "
                f"({SCHEMA_VERSION}); run the newer release")
    return None


# GET /messages pages (newest first, by itself or per recipient, status or error code) and
# the windows of GET /stats; the same statements on both engines. Each message also keeps
# the seconds from its creation to its `delivered` event, so that /stats reads the time to
# delivery from the messages of its window alone.
def query_indexes(seconds_between):
    """Version 6's indexes, and each stored message's seconds to delivery."""
    seconds = seconds_between("messages.created_at", "status_events.received_at")
    return [
        "CREATE INDEX messages_by_creation ON messages (created_at, sid, seconds_to_delivered)",
        "CREATE INDEX messages_by_recipient_and_creation ON messages (to_number, created_at, sid)",
        "CREATE INDEX messages_by_status_and_creation ON messages (latest_status, created_at, sid)",
        "CREATE INDEX messages_by_error_and_creation ON messages (error_code, created_at, sid)",
        f"""UPDATE messages SET seconds_to_delivered = (
        SELECT {seconds} FROM status_events
        WHERE status_events.message_sid = messages.sid AND status_events.status = 'delivered')""",
    ]


# Each message's place in the order of storage (`storage_order`, larger is stored later):
# GET /messages lists messages created in the same millisecond newest-stored first, so its
# pages follow (created_at, storage_order), as the indexes serving them do. Every insert of a
# message takes the engine's `next_storage_order`. The same DDL on both engines around each
# engine's own ALTER TABLE and numbering of the messages already stored: the indexes that
# change are dropped before the numbering, which then need not update them row by row.
DROP_QUERY_INDEXES = [
    "DROP INDEX messages_by_creation",
    "DROP INDEX messages_by_recipient_and_creation",
    "DROP INDEX messages_by_status_and_creation",
    "DROP INDEX messages_by_error_and_creation",
]
STORAGE_ORDER_INDEXES = [
    "CREATE UNIQUE INDEX messages_by_storage_order ON messages (storage_order)",
    """CREATE INDEX messages_by_creation
        ON messages (created_at, storage_order, seconds_to_delivered)""",
    """CREATE INDEX messages_by_recipient_and_creation
        ON messages (to_number, created_at, storage_order)""",
    """CREATE INDEX messages_by_status_and_creation
        ON messages (latest_status, created_at, storage_order)""",
    """CREATE INDEX messages_by_error_and_creation
        ON messages (error_code, created_at, storage_order)""",
]


# The mode ("live" or "simulated") a database was first used in, the same DDL on both
# engines; a database from before version 8 that holds messages of the simulated account
# was used in simulation (both modes then shared one default file).
SERVICE_MODE_TABLE = [
    """CREATE TABLE service_mode (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        mode TEXT NOT NULL CHECK (mode IN ('live', 'simulated'))
    )""",
    f"""INSERT INTO service_mode (id, mode) SELECT 1, 'simulated'
        WHERE EXISTS (SELECT 1 FROM messages WHERE account_sid = '{SIMULATED_ACCOUNT_SID}')""",
]
RECORD_MODE = "INSERT INTO service_mode (id, mode) VALUES (1, ?) ON CONFLICT (id) DO NOTHING"


class ModeConflict(Exception):
    """The database was first used in the other mode (`recorded`)."""

    def __init__(self, recorded):
        super().__init__(recorded)
        self.recorded = recorded


# The indexes the service-wide hourly limit (MAX_SENDS_PER_HOUR) counts with; the same DDL
# on both engines.
SENDS_PER_HOUR_INDEXES = [
    "CREATE INDEX IF NOT EXISTS messages_by_sent_at ON messages (sent_at)",
    "CREATE INDEX IF NOT EXISTS send_reservations_by_expiry ON send_reservations (counts_until)",
]

# PostgreSQL databases start at version 5 in one step: this is the whole schema of version 5
# (SQLite's versions 1 to 5). Columns compared as text (SIDs, numbers and the fixed-width
# UTC timestamps) use the "C" collation, so they sort byte by byte, as in SQLite, whatever
# the database's locale.
POSTGRES_BASELINE = [
    """CREATE TABLE messages (
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
    )""",
    """CREATE TABLE status_events (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        message_sid TEXT COLLATE "C" NOT NULL REFERENCES messages(sid) ON DELETE CASCADE,
        status TEXT NOT NULL,
        error_code INTEGER,
        received_at TEXT COLLATE "C" NOT NULL,
        UNIQUE (message_sid, status)
    )""",
    "CREATE INDEX messages_by_recipient ON messages (to_number, sent_at)",
    "CREATE INDEX messages_by_update ON messages (updated_at)",
    "CREATE TABLE health_checks (id INTEGER PRIMARY KEY CHECK (id = 1), checked_at TEXT)",
    """CREATE TABLE idempotency_keys (
        scope TEXT COLLATE "C" NOT NULL,
        key TEXT COLLATE "C" NOT NULL,
        fingerprint TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        status_code INTEGER,
        response TEXT,
        PRIMARY KEY (scope, key)
    )""",
    "CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at)",
    """CREATE TABLE send_reservations (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        to_number TEXT COLLATE "C" NOT NULL,
        reserved_at DOUBLE PRECISION NOT NULL,
        counts_until DOUBLE PRECISION
    )""",
    "CREATE INDEX send_reservations_by_recipient ON send_reservations (to_number)",
]

# The indexes of webhook_events, made by version 10 and again by version 12's rebuild.
WEBHOOK_EVENT_INDEXES = [
    "CREATE INDEX webhook_events_of_message ON webhook_events (message_sid, created_at, seq)",
    """CREATE INDEX webhook_events_due ON webhook_events (next_attempt_at, seq)
        WHERE state = 'pending'""",
    "CREATE INDEX webhook_events_by_creation ON webhook_events (created_at, seq)",
    """CREATE INDEX webhook_events_pending ON webhook_events (created_at, seq)
        WHERE state = 'pending'""",
    """CREATE INDEX webhook_events_failed ON webhook_events (created_at, seq)
        WHERE state = 'failed'""",
]


# Version 10: a caller's own `reference` on each message, and the outbox of status webhooks.
# Each event is recorded in the transaction that moves its message's latest status (whose
# previous value `previous_status` keeps), and delivered from here by webhooks/delivery.py:
# `seq` is the order events were recorded in, `lease`/`lease_until` the claim of the
# instance attempting it. The same DDL on both engines but for `seq`'s numbering and the
# "C" collation PostgreSQL compares the text keys in. No index leads with `state`: the
# pending and failed events have partial indexes of their own, so that a claim's planner,
# with or without statistics, walks the due events and each message's own events, never
# every pending event (docs/performance.md, "Status webhooks").
def webhook_outbox(collate, seq, real):
    """Version 10's statements, with one engine's collation, numbering and float type."""
    return [statement.format(collate=collate, seq=seq, real=real) for statement in [
        "ALTER TABLE messages ADD COLUMN reference TEXT{collate}",
        "ALTER TABLE messages ADD COLUMN previous_status TEXT",
        """CREATE INDEX messages_by_reference_and_creation
        ON messages (reference, created_at, storage_order)""",
        """CREATE TABLE webhook_events (
        seq {seq},
        id TEXT{collate} NOT NULL UNIQUE,
        message_sid TEXT{collate} NOT NULL REFERENCES messages(sid) ON DELETE CASCADE,
        type TEXT NOT NULL,
        payload TEXT NOT NULL,
        state TEXT{collate} NOT NULL CHECK (state IN ('pending', 'delivered', 'failed')),
        attempts INTEGER NOT NULL DEFAULT 0,
        schedule_start INTEGER NOT NULL DEFAULT 0,
        created_at TEXT{collate} NOT NULL,
        next_attempt_at TEXT{collate} NOT NULL,
        last_attempt_at TEXT{collate},
        delivered_at TEXT{collate},
        last_error TEXT,
        lease TEXT,
        lease_until {real}
    )""",
    ]] + WEBHOOK_EVENT_INDEXES


# Version 11: each message's pending events, for a claim to compare a candidate with its
# message's own (outbox.py), one index probe each. Without it PostgreSQL, planning without
# statistics, combined the index of every pending event with the message's: a claim read
# every pending event for each candidate (docs/performance.md, "Status webhooks").
PENDING_EVENTS_OF_MESSAGE = [
    """CREATE INDEX webhook_events_pending_of_message ON webhook_events (message_sid, seq)
        WHERE state = 'pending'""",
]

# Version 12: what recipients send back, and the opt-out list sends respect.
# - `inbound_messages`: each message Twilio's incoming-message webhook posted, once per SID;
#   `seq` orders those received in the same millisecond (GET /inbound-messages pages by
#   (received_at, seq)); `kind` is what its words (or Twilio's OptOutType) made of it.
# - `opt_outs`: the numbers opted out now, one row each; `seq` orders GET /opt-outs.
# - `opt_out_changes`: every change of a number's opt-out, oldest first by `id`; unique by
#   (number, time, change), which copy-database keeps a copied change once by.
# - `webhook_events` events are ordered per `stream`: a message's SID for its status events,
#   a number for the events of the replies and opt-outs of that number, which have no
#   message (`message_sid` NULL). SQLite cannot drop a NOT NULL, so it rebuilds the table
#   (with `stream` last, where PostgreSQL's ADD COLUMN puts it) and its indexes.
def replies_and_opt_outs(collate, seq):
    """Version 12's new tables, with one engine's collation and numbering."""
    return [statement.format(collate=collate, seq=seq) for statement in [
        """CREATE TABLE inbound_messages (
        seq {seq},
        sid TEXT{collate} NOT NULL UNIQUE,
        account_sid TEXT,
        from_number TEXT{collate} NOT NULL,
        to_number TEXT{collate},
        body TEXT,
        num_media INTEGER NOT NULL,
        num_segments INTEGER,
        opt_out_type TEXT,
        kind TEXT NOT NULL CHECK (kind IN ('message', 'opt_out', 'opt_in', 'help')),
        received_at TEXT{collate} NOT NULL
    )""",
        "CREATE INDEX inbound_messages_by_receipt ON inbound_messages (received_at, seq)",
        """CREATE INDEX inbound_messages_by_sender
        ON inbound_messages (from_number, received_at, seq)""",
        """CREATE INDEX inbound_messages_by_recipient
        ON inbound_messages (to_number, received_at, seq)""",
        """CREATE TABLE opt_outs (
        seq {seq},
        number TEXT{collate} NOT NULL UNIQUE,
        source TEXT NOT NULL CHECK (source IN ('keyword', 'twilio', 'api')),
        keyword TEXT,
        message_sid TEXT,
        opted_out_at TEXT{collate} NOT NULL
    )""",
        "CREATE INDEX opt_outs_by_time ON opt_outs (opted_out_at, seq)",
        """CREATE TABLE opt_out_changes (
        id {seq},
        number TEXT{collate} NOT NULL,
        change TEXT NOT NULL CHECK (change IN ('opted_out', 'opted_in')),
        source TEXT NOT NULL CHECK (source IN ('keyword', 'twilio', 'api')),
        keyword TEXT,
        message_sid TEXT,
        changed_at TEXT{collate} NOT NULL,
        UNIQUE (number, changed_at, change)
    )""",
        "CREATE INDEX opt_out_changes_of_number ON opt_out_changes (number, id)",
        "CREATE INDEX opt_out_changes_by_time ON opt_out_changes (change, changed_at)",
    ]]


PENDING_EVENTS_OF_STREAM = """CREATE INDEX webhook_events_pending_of_stream
        ON webhook_events (stream, seq) WHERE state = 'pending'"""
WEBHOOK_EVENT_COLUMNS = ("seq, id, message_sid, type, payload, state, attempts, schedule_start,"
                         " created_at, next_attempt_at, last_attempt_at, delivered_at,"
                         " last_error, lease, lease_until")
SQLITE_EVENT_STREAMS = [
    "ALTER TABLE webhook_events RENAME TO webhook_events_before_streams",
    """CREATE TABLE webhook_events (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        message_sid TEXT REFERENCES messages(sid) ON DELETE CASCADE,
        type TEXT NOT NULL,
        payload TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'failed')),
        attempts INTEGER NOT NULL DEFAULT 0,
        schedule_start INTEGER NOT NULL DEFAULT 0,
        created_at TEXT NOT NULL,
        next_attempt_at TEXT NOT NULL,
        last_attempt_at TEXT,
        delivered_at TEXT,
        last_error TEXT,
        lease TEXT,
        lease_until REAL,
        stream TEXT NOT NULL
    )""",
    f"""INSERT INTO webhook_events ({WEBHOOK_EVENT_COLUMNS}, stream)
        SELECT {WEBHOOK_EVENT_COLUMNS}, message_sid FROM webhook_events_before_streams""",
    "DROP TABLE webhook_events_before_streams",
    *WEBHOOK_EVENT_INDEXES,
    PENDING_EVENTS_OF_STREAM,
]
POSTGRES_EVENT_STREAMS = [
    "ALTER TABLE webhook_events ALTER COLUMN message_sid DROP NOT NULL",
    'ALTER TABLE webhook_events ADD COLUMN stream TEXT COLLATE "C"',
    "UPDATE webhook_events SET stream = message_sid",
    "ALTER TABLE webhook_events ALTER COLUMN stream SET NOT NULL",
    "DROP INDEX webhook_events_pending_of_message",
    PENDING_EVENTS_OF_STREAM,
]

# Version 13: named API keys and who sent each message. A key is kept as the SHA-256
# digest of its text only; `scopes` is a space-separated list of its scopes (api_keys.py).
# Each message sent through /send-sms records the key's name (`sent_by`), and so does its
# reservation under the hourly limits: GET /messages?sentBy= and a key's own hourly limit
# walk the new indexes. The same DDL on both engines but for the "C" collation.
def named_api_keys(collate):
    """Version 13's statements, with one engine's collation of the text keys."""
    return [statement.format(collate=collate) for statement in [
        """CREATE TABLE api_keys (
        name TEXT{collate} PRIMARY KEY,
        digest TEXT{collate} NOT NULL UNIQUE,
        scopes TEXT NOT NULL,
        max_sends_per_hour INTEGER,
        created_at TEXT{collate} NOT NULL,
        last_used_at TEXT{collate},
        revoked_at TEXT{collate}
    )""",
        "ALTER TABLE messages ADD COLUMN sent_by TEXT{collate}",
        """CREATE INDEX messages_by_sender_and_creation
        ON messages (sent_by, created_at, storage_order)""",
        "ALTER TABLE send_reservations ADD COLUMN sent_by TEXT{collate}",
        "CREATE INDEX send_reservations_by_sender ON send_reservations (sent_by)",
    ]]


# Every version of the schema, one row each: (version, SQLite's statements, PostgreSQL's
# statements), each a list of single statements run in order, in the one transaction that
# migrates a database. A database runs the rows after its version (SQLite's PRAGMA
# user_version, PostgreSQL's schema_version table), so a live database is migrated in place
# at start. PostgreSQL's None: versions no PostgreSQL database was ever at, which its
# baseline at version 5 covers. A new version is one more row, with both engines'
# statements; tests/test_db.py checks that both engines then reach the same tables.
MIGRATIONS = [
    (1, [
        """CREATE TABLE messages (
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
    )""",
        """CREATE TABLE status_events (
        id INTEGER PRIMARY KEY,
        message_sid TEXT NOT NULL REFERENCES messages(sid) ON DELETE CASCADE,
        status TEXT NOT NULL,
        error_code INTEGER,
        received_at TEXT NOT NULL,
        UNIQUE (message_sid, status)
    )""",
        "CREATE INDEX messages_by_recipient ON messages (to_number, sent_at)",
        "CREATE INDEX messages_by_update ON messages (updated_at)",
        "CREATE TABLE health_checks (id INTEGER PRIMARY KEY CHECK (id = 1), checked_at TEXT)",
    ], None),
    (2, [
        """CREATE TABLE idempotency_keys (
        scope TEXT NOT NULL,
        key TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        created_at REAL NOT NULL,
        status_code INTEGER,
        response TEXT,
        PRIMARY KEY (scope, key)
    )""",
        "CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at)",
    ], None),
    (3, ["ALTER TABLE messages ADD COLUMN checked_at TEXT"], None),
    (4, [
        """CREATE TABLE send_reservations (
        id INTEGER PRIMARY KEY,
        to_number TEXT NOT NULL,
        reserved_at REAL NOT NULL
    )""",
        "CREATE INDEX send_reservations_by_recipient ON send_reservations (to_number)",
    ], None),
    (5, [
        "ALTER TABLE send_reservations ADD COLUMN counts_until REAL",
        "UPDATE send_reservations SET counts_until = reserved_at + 3600",
    ], POSTGRES_BASELINE),
    (6, ["ALTER TABLE messages ADD COLUMN seconds_to_delivered REAL",
         *query_indexes(sqlite_seconds_between)],
        ["ALTER TABLE messages ADD COLUMN seconds_to_delivered DOUBLE PRECISION",
         *query_indexes(postgres_seconds_between)]),
    # MAX_SENDS_PER_HOUR counts every recipient's sends of the last hour.
    (7, SENDS_PER_HOUR_INDEXES, SENDS_PER_HOUR_INDEXES),
    (8, SERVICE_MODE_TABLE, SERVICE_MODE_TABLE),
    # SQLite: messages already stored keep the order SQLite stored them in (their rowid).
    # PostgreSQL keeps no order of storage: messages already stored are numbered in the
    # order GET /messages listed them until then (creation, then SID); a sequence numbers
    # new ones.
    (9, [
        *DROP_QUERY_INDEXES,
        "ALTER TABLE messages ADD COLUMN storage_order INTEGER",
        "UPDATE messages SET storage_order = rowid",
        *STORAGE_ORDER_INDEXES,
    ], [
        *DROP_QUERY_INDEXES,
        "ALTER TABLE messages ADD COLUMN storage_order BIGINT",
        "CREATE SEQUENCE messages_storage_order OWNED BY messages.storage_order",
        """UPDATE messages SET storage_order = numbered.n FROM (
        SELECT sid, row_number() OVER (ORDER BY created_at, sid) AS n FROM messages
    ) AS numbered WHERE messages.sid = numbered.sid""",
        """SELECT setval('messages_storage_order',
                  (SELECT coalesce(max(storage_order), 0) + 1 FROM messages), false)""",
        """ALTER TABLE messages ALTER COLUMN storage_order
        SET DEFAULT nextval('messages_storage_order')""",
        *STORAGE_ORDER_INDEXES,
    ]),
    (10, webhook_outbox(collate="", seq="INTEGER PRIMARY KEY", real="REAL"),
     webhook_outbox(collate=' COLLATE "C"',
                    seq="BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
                    real="DOUBLE PRECISION")),
    (11, PENDING_EVENTS_OF_MESSAGE, PENDING_EVENTS_OF_MESSAGE),
    (12, [*replies_and_opt_outs(collate="", seq="INTEGER PRIMARY KEY"), *SQLITE_EVENT_STREAMS],
     [*replies_and_opt_outs(collate=' COLLATE "C"',
                            seq="BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"),
      *POSTGRES_EVENT_STREAMS]),
    (13, named_api_keys(collate=""), named_api_keys(collate=' COLLATE "C"')),
]

SCHEMA_VERSION = MIGRATIONS[-1][0]


def migrations(engine, version):
    """The statements that take a database of `engine` ("sqlite" or "postgres") from
    `version` to SCHEMA_VERSION, in order: a new database's version is 0."""
    column = {"sqlite": 1, "postgres": 2}[engine]
    return [statement for row in MIGRATIONS if row[0] > version and row[column] is not None
            for statement in row[column]]


# Key of the advisory lock under which instances starting together migrate one at a time.
MIGRATION_LOCK = "sms-status schema migration"
