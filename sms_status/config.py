"""Reads the service's configuration from the environment and checks all of it at once.

Every problem is collected before anything fails, so one start-up message lists
every variable to fix instead of making the operator fix them one restart at a time.
"""

import base64
import binascii
import math
import os
import re
from dataclasses import dataclass, field, replace
from urllib.parse import urlparse

import psycopg
from psycopg.conninfo import conninfo_to_dict

from sms_status.rules import E164_PATTERN, parse_duration

ACCOUNT_SID_PATTERN = re.compile(r"AC[0-9a-fA-F]{32}")
MESSAGING_SERVICE_SID_PATTERN = re.compile(r"MG[0-9a-fA-F]{32}")
SHORT_CODE_PATTERN = re.compile(r"[0-9]{3,8}")
ALPHANUMERIC_SENDER_PATTERN = re.compile(r"(?=.*[A-Za-z])[A-Za-z0-9 ]{1,11}")
BASE_URL_PATTERN = re.compile(r"https?://[^/?#\s]+(/[^?#\s]*)?")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off", "")
MIN_API_KEY_LENGTH = 16
# The placeholders of .env.example: a copied but unfilled file must not start.
PLACEHOLDERS = {"your_auth_token", "change-me-to-a-long-random-string"}
PLACEHOLDER_PHONE_NUMBER = "+15551234567"
PLACEHOLDER_BASE_URL_HOST = "your-subdomain.ngrok-free.app"
PLACEHOLDER_WEBHOOK_HOST = "your-app.example.com"
PLACEHOLDER_WEBHOOK_SECRET = "whsec_change-me"

# Status webhooks: Svix's schedule, 8 attempts over about 27 hours.
DEFAULT_RETRY_SCHEDULE = (5, 300, 1800, 7200, 18000, 36000, 36000)
MAX_RETRY_DELAYS = 20
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")

# Credentials of the simulated Twilio: they only sign simulated callbacks.
SIMULATED_ACCOUNT_SID = "AC" + "0" * 32
SIMULATED_AUTH_TOKEN = "simulated-auth-token"


# Every environment variable the service reads, the app's and gunicorn's (gunicorn.conf.py);
# .env.example documents each one (a test checks both ways).
VARIABLES = (
    "TWILIO_SIMULATE", "TWILIO_SIMULATE_LATENCY_MS", "TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN",
    "TWILIO_PHONE_NUMBER", "TWILIO_MESSAGING_SERVICE_SID", "TWILIO_WEBHOOK_SIGNING_KEY",
    "TWILIO_TIMEOUT", "BASE_URL", "API_KEY", "DATABASE_URL", "DATABASE_POOL_SIZE",
    "SQLITE_SYNCHRONOUS", "STORE_MESSAGE_BODY", "BODY_RETENTION", "ALLOWED_DESTINATIONS",
    "MAX_SENDS_PER_RECIPIENT_PER_HOUR", "MAX_SENDS_PER_HOUR", "LOG_LEVEL", "PORT",
    "WEB_CONCURRENCY", "GUNICORN_THREADS", "REQUEST_READ_TIMEOUT", "STATUS_WEBHOOK_URL",
    "STATUS_WEBHOOK_SECRET", "STATUS_WEBHOOK_RETRY_SCHEDULE", "STATUS_WEBHOOK_TIMEOUT",
)


class ConfigError(Exception):
    """The configuration has one or more problems; str() lists all of them."""

    def __init__(self, problems):
        self.problems = problems
        super().__init__(
            "Configuration error; fix these environment variables (see .env.example):\n"
            + "\n".join(f"  - {problem}" for problem in problems)
        )


@dataclass(frozen=True)
class WebhookSettings:
    """Where status events go and how: STATUS_WEBHOOK_URL, _SECRET, _RETRY_SCHEDULE, _TIMEOUT."""

    url: str = field(repr=False)  # may hold user:password@ and a ?token=
    secrets: tuple = field(repr=False)  # one or two whsec_ secrets
    retry_schedule: tuple  # seconds between attempts: N delays make N + 1 attempts
    timeout: float

    @property
    def display_url(self):
        """The URL for logs: without the credentials it may hold, its user:password@ left
        out and its query's values masked (`?token=***`)."""
        parts = urlparse(self.url)
        host = parts.netloc.rpartition("@")[2]
        query = "&".join(name + "=***" if found else "***" for name, found, _ in (
            pair.partition("=") for pair in parts.query.split("&"))) if parts.query else ""
        return parts._replace(netloc=host, query=query).geturl()


@dataclass(frozen=True)
class Config:
    """The checked configuration; secrets are left out of its repr."""

    simulate: bool
    account_sid: str
    auth_token: str = field(repr=False)
    phone_number: str | None
    messaging_service_sid: str | None
    base_url: str
    api_key: str | None = field(repr=False)
    database_url: str = field(repr=False)  # sqlite:////absolute/path.db, or PostgreSQL's
    database_pool_size: int
    twilio_timeout: float
    store_message_body: bool
    port: int
    log_level: str
    sqlite_synchronous: str
    allowed_destinations: tuple
    max_sends_per_recipient_per_hour: int
    max_sends_per_hour: int
    webhook_signing_key: str | None = field(repr=False)
    body_retention_seconds: float
    simulate_latency: float
    status_webhook: WebhookSettings | None = field(default=None, repr=False)  # None: off
    # Simulating without BASE_URL: base_url is this machine's, and follows the server's bind.
    base_url_is_local: bool = False

    @property
    def status_callback_url(self):
        return self.base_url + "/message-status"

    def listening_at(self, host, port):
        """This configuration for a server listening on (host, port): simulating without
        BASE_URL, status callbacks then go there; otherwise it is unchanged."""
        if not self.base_url_is_local:
            return self
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        return replace(self, base_url=f"http://[{host}]:{port}" if ":" in host
                       else f"http://{host}:{port}")

    @property
    def mode(self):
        return "simulated" if self.simulate else "live"

    @property
    def storage_settings(self):
        """The storage engines' settings (each takes its own: storage.open_engine); a status
        change records its event when status webhooks are on."""
        return {"synchronous": self.sqlite_synchronous, "pool_size": self.database_pool_size,
                "records_events": self.status_webhook is not None}


def _flag(env, name, problems, default=False):
    raw = env.get(name)
    if raw is None:
        return default
    word = raw.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    problems.append(f"{name} must be true or false, got {raw!r}")
    return default


# Without DATABASE_URL: one file per mode, so that simulated messages never mix with live ones.
DEFAULT_DATABASE_FILES = {False: "sms_status.db", True: "sms_status_simulated.db"}


def parse_database_url(raw, simulate=False):
    """A DATABASE_URL value as the storage opens it: a SQLite file's URL with an absolute
    path (the working directory's file by default), or the PostgreSQL URL as given.

    Raises ValueError with a message that never repeats the value: it may hold a password.
    """
    if raw is None or raw.strip() == "":
        return "sqlite:///" + os.path.abspath(DEFAULT_DATABASE_FILES[simulate])
    raw = raw.strip()
    if raw.startswith(("postgres://", "postgresql://")):
        if _unescaped_userinfo(raw):
            raise ValueError(
                "has a user name or password with an '@', '/' or ':' that is not "
                "percent-encoded, so libpq would read part of it as the host, port or "
                "database: percent-encode them (@ as %40, / as %2F, : as %3A; python3 -c "
                "'import urllib.parse; print(urllib.parse.quote(input(), safe=\"\"))' "
                "encodes a password)")
        try:
            conninfo_to_dict(raw)
        except psycopg.Error:
            # libpq's message quotes the URL, password included: not repeated here.
            raise ValueError(
                "is not a URL libpq can read: check its form, "
                "postgres://user:password@host:5432/dbname, its %-escapes and its parameters"
            ) from None
        return raw
    prefix = "sqlite:///"
    if not raw.startswith(prefix) or raw == prefix:
        raise ValueError(
            "must be sqlite:///relative.db, sqlite:////absolute/path.db, or a PostgreSQL URL "
            "like postgres://user:password@host:5432/dbname"
        )
    return prefix + os.path.abspath(raw[len(prefix):])


def _unescaped_userinfo(url):
    """True when a postgres:// URL's user name or password holds a bare '@' or '/'.

    libpq ends the user name and password at the first '@', and the host part at the first
    '/': `postgres://app:p@ss@db/x` would connect to host `ss@db`, and
    `postgres://app:p/ss@db/x` to host `app`, port `p`. A bare ':' in a password is read
    right (the first ':' ends the user name).
    """
    rest = url.split("://", 1)[1]
    authority = re.split("[/?]", rest, maxsplit=1)[0]  # up to the path, or the query
    path = rest[len(authority):]
    return authority.count("@") > 1 or ("@" not in authority and "@" in path.split("?")[0])


def _database(raw, problems, simulate):
    try:
        return parse_database_url(raw, simulate)
    except ValueError as error:
        problems.append(f"DATABASE_URL {error}")
        return ""


def _number(env, name, default, problems, kind, minimum, maximum=None):
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = kind(raw.strip())
        if not math.isfinite(value):
            raise ValueError(raw)
    except ValueError:
        problems.append(f"{name} must be a number, got {raw!r}")
        return default
    if value < minimum or (maximum is not None and value > maximum):
        limits = f"at least {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        problems.append(f"{name} must be {limits}, got {raw!r}")
        return default
    return value


def _port_is_valid(url):
    try:
        port = urlparse(url).port
    except ValueError:  # out of range or not a number
        return False
    return port is None or port > 0


def _destinations(raw, problems):
    if raw is None or raw.strip() == "":
        return ()
    prefixes = tuple(part.strip() for part in raw.split(",") if part.strip())
    bad = [p for p in prefixes if not re.fullmatch(r"\+[1-9][0-9]{0,14}", p)]
    if bad or not prefixes:
        problems.append(
            "ALLOWED_DESTINATIONS must be comma-separated E.164 prefixes like +1,+44, "
            f"got {raw!r}"
        )
        return ()
    return prefixes


def _sender(phone_number, messaging_service_sid, problems):
    if phone_number and messaging_service_sid:
        problems.append(
            "set only one of TWILIO_PHONE_NUMBER and TWILIO_MESSAGING_SERVICE_SID, not both"
        )
    elif not phone_number and not messaging_service_sid:
        problems.append(
            "TWILIO_PHONE_NUMBER (like +15017122661) or TWILIO_MESSAGING_SERVICE_SID "
            "(MG...) is required"
        )
    elif phone_number and not (
        E164_PATTERN.fullmatch(phone_number)
        or SHORT_CODE_PATTERN.fullmatch(phone_number)
        or ALPHANUMERIC_SENDER_PATTERN.fullmatch(phone_number)
    ):
        problems.append(
            "TWILIO_PHONE_NUMBER must be an E.164 number like +15017122661 "
            "(or a short code or alphanumeric sender ID)"
        )
    elif messaging_service_sid and not MESSAGING_SERVICE_SID_PATTERN.fullmatch(
        messaging_service_sid
    ):
        problems.append("TWILIO_MESSAGING_SERVICE_SID must be MG followed by 32 hex characters")


def parse_webhook_secrets(raw):
    """(secrets, problems) of a STATUS_WEBHOOK_SECRET value, for a receiver of the events."""
    problems = []
    return _webhook_secrets(raw, problems), problems


def _webhook_secrets(raw, problems):
    """STATUS_WEBHOOK_SECRET: one Standard Webhooks secret, or two separated by one space."""
    name = "STATUS_WEBHOOK_SECRET"
    if raw is None or raw.strip() == "":
        problems.append(f"{name} is required with STATUS_WEBHOOK_URL: whsec_ followed "
                        "by the base64 of 24 to 64 random bytes; make one with: python3 -c "
                        "'import base64, secrets; print(\"whsec_\" + "
                        "base64.b64encode(secrets.token_bytes(32)).decode())'")
        return ()
    raw = raw.strip()
    if PLACEHOLDER_WEBHOOK_SECRET in raw:
        problems.append(f"{name} is still the placeholder from .env.example; make a random one")
        return ()
    secrets = raw.split(" ")
    if len(secrets) > 2:
        problems.append(f"{name} holds at most two secrets separated by one space (to rotate "
                        f"without a gap), got {len(secrets)} parts")
        return ()
    for number, secret in enumerate(secrets, 1):
        try:
            key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
        except (binascii.Error, ValueError):
            key = b""
        if not secret.startswith("whsec_") or not 24 <= len(key) <= 64:
            which = f"its secret number {number}" if len(secrets) > 1 else "it"
            # The value itself is never repeated: it is a secret.
            problems.append(f"{name} must be whsec_ followed by the base64 of 24 to 64 random "
                            f"bytes; {which} is not")
            return ()
    return tuple(secrets)


def _retry_schedule(raw, problems):
    name = "STATUS_WEBHOOK_RETRY_SCHEDULE"
    if raw is None or raw.strip() == "":
        return DEFAULT_RETRY_SCHEDULE
    delays = []
    for part in raw.split(","):
        try:
            delay = float(part.strip())
        except ValueError:
            delay = math.nan
        if not (math.isfinite(delay) and 0 <= delay <= 7 * 86400):
            problems.append(f"{name} must be comma-separated delays in seconds (each from 0 to "
                            f"604800), like 5,300,1800; got {raw!r}")
            return DEFAULT_RETRY_SCHEDULE
        delays.append(delay)
    if len(delays) > MAX_RETRY_DELAYS:
        problems.append(f"{name} has {len(delays)} delays; at most {MAX_RETRY_DELAYS} are allowed")
        return DEFAULT_RETRY_SCHEDULE
    return tuple(delays)


def _status_webhook(env, simulate, problems):
    """The status webhooks' settings, or None when STATUS_WEBHOOK_URL is unset (off)."""
    raw = (env.get("STATUS_WEBHOOK_URL") or "").strip()
    if not raw:
        return None
    name = "STATUS_WEBHOOK_URL"
    try:
        parts = urlparse(raw)
        host = parts.hostname
        parts.port  # noqa: B018 (raises ValueError when out of range)
    except ValueError:
        parts, host = None, None
    # Never repeated in a message: it may hold a user name and password.
    if parts is None or parts.scheme not in ("http", "https") or not host or parts.fragment:
        problems.append(f"{name} must be an http(s) URL like https://example.com/sms-events, "
                        "without a #fragment")
    elif host == PLACEHOLDER_WEBHOOK_HOST:
        problems.append(f"{name} is still the placeholder from .env.example; set the URL of "
                        "your application's receiver")
    elif not simulate and parts.scheme != "https" and host not in LOOPBACK_HOSTS:
        problems.append(f"{name} must be https:// when live (http:// only for localhost, "
                        "127.0.0.1 and [::1])")
    return WebhookSettings(
        url=raw,
        secrets=_webhook_secrets(env.get("STATUS_WEBHOOK_SECRET"), problems),
        retry_schedule=_retry_schedule(env.get("STATUS_WEBHOOK_RETRY_SCHEDULE"), problems),
        timeout=_number(env, "STATUS_WEBHOOK_TIMEOUT", 15.0, problems, float, 0.1, 600),
    )


def load_config(env):
    """Builds a Config from an environment mapping, or raises ConfigError listing every problem."""
    config, problems = read_config(env)
    if problems:
        raise ConfigError(problems)
    return config


def read_config(env):
    """(Config, problems): the Config with defaults in place of what is wrong, and every
    problem found, each naming the variable to fix."""
    env = {key: value for key, value in env.items() if value is not None}
    problems = []

    def text(name):
        value = env.get(name, "").strip()
        return value or None

    simulate = _flag(env, "TWILIO_SIMULATE", problems)
    port = _number(env, "PORT", 3000, problems, int, 1, 65535)

    if simulate:
        # Real credentials are deliberately ignored: the simulator must never use them.
        account_sid, auth_token = SIMULATED_ACCOUNT_SID, SIMULATED_AUTH_TOKEN
        phone_number = text("TWILIO_PHONE_NUMBER")
        messaging_service_sid = text("TWILIO_MESSAGING_SERVICE_SID")
        if not phone_number and not messaging_service_sid:
            phone_number = "+15005550006"
        else:
            _sender(phone_number, messaging_service_sid, problems)
    else:
        account_sid = text("TWILIO_ACCOUNT_SID")
        auth_token = text("TWILIO_AUTH_TOKEN")
        phone_number = text("TWILIO_PHONE_NUMBER")
        messaging_service_sid = text("TWILIO_MESSAGING_SERVICE_SID")
        if not account_sid:
            problems.append("TWILIO_ACCOUNT_SID is required (AC followed by 32 hex characters)")
        elif not ACCOUNT_SID_PATTERN.fullmatch(account_sid):
            problems.append("TWILIO_ACCOUNT_SID must be AC followed by 32 hex characters")
        if not auth_token:
            problems.append("TWILIO_AUTH_TOKEN is required")
        elif auth_token in PLACEHOLDERS:
            problems.append("TWILIO_AUTH_TOKEN is still the placeholder from .env.example")
        _sender(phone_number, messaging_service_sid, problems)
        if phone_number == PLACEHOLDER_PHONE_NUMBER:
            problems.append("TWILIO_PHONE_NUMBER is still the placeholder from .env.example; "
                            "set your Twilio number")

    base_url = text("BASE_URL")
    base_url_is_local = base_url is None and simulate
    if base_url_is_local:
        base_url = f"http://127.0.0.1:{port}"
    if base_url is None:
        problems.append("BASE_URL is required: the public URL Twilio reaches this service at")
    elif not BASE_URL_PATTERN.fullmatch(base_url) or not _port_is_valid(base_url):
        problems.append(
            f"BASE_URL must be an http(s) URL without query string, like https://example.com, "
            f"got {base_url!r}"
        )
    elif urlparse(base_url).hostname == PLACEHOLDER_BASE_URL_HOST:
        problems.append("BASE_URL is still the placeholder from .env.example; set the public "
                        "URL Twilio reaches this service at (your ngrok URL, when local)")
    base_url = (base_url or "").rstrip("/")

    api_key = text("API_KEY")
    if api_key is None and not simulate:
        problems.append(
            "API_KEY is required (callers send it as 'Authorization: Bearer <API_KEY>'); "
            "make one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    elif api_key is not None and len(api_key) < MIN_API_KEY_LENGTH:
        problems.append(f"API_KEY must be at least {MIN_API_KEY_LENGTH} characters long")
    elif api_key in PLACEHOLDERS:
        problems.append("API_KEY is still the placeholder from .env.example; make a random one")

    log_level = (text("LOG_LEVEL") or "INFO").upper()
    if log_level not in LOG_LEVELS:
        problems.append(f"LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}")
        log_level = "INFO"

    synchronous = (text("SQLITE_SYNCHRONOUS") or "NORMAL").upper()
    if synchronous not in ("NORMAL", "FULL"):
        problems.append(f"SQLITE_SYNCHRONOUS must be NORMAL or FULL, got {synchronous!r}")
        synchronous = "NORMAL"

    body_retention = text("BODY_RETENTION") or "7d"
    try:
        body_retention_seconds = parse_duration(body_retention)
    except ValueError as error:
        problems.append(f"BODY_RETENTION: {error}")
        body_retention_seconds = 0.0

    database_url = _database(env.get("DATABASE_URL"), problems, simulate)

    config = Config(
        simulate=simulate,
        account_sid=account_sid or "",
        auth_token=auth_token or "",
        phone_number=phone_number,
        messaging_service_sid=messaging_service_sid,
        base_url=base_url,
        api_key=api_key,
        database_url=database_url,
        database_pool_size=_number(env, "DATABASE_POOL_SIZE", 4, problems, int, 1, 1000),
        twilio_timeout=_number(env, "TWILIO_TIMEOUT", 10.0, problems, float, 0.001, 600),
        store_message_body=_flag(env, "STORE_MESSAGE_BODY", problems),
        port=port,
        log_level=log_level,
        sqlite_synchronous=synchronous,
        allowed_destinations=_destinations(env.get("ALLOWED_DESTINATIONS"), problems),
        max_sends_per_recipient_per_hour=_number(
            env, "MAX_SENDS_PER_RECIPIENT_PER_HOUR", 10, problems, int, 0
        ),
        max_sends_per_hour=_number(env, "MAX_SENDS_PER_HOUR", 1000, problems, int, 0),
        webhook_signing_key=text("TWILIO_WEBHOOK_SIGNING_KEY"),
        body_retention_seconds=body_retention_seconds,
        simulate_latency=_number(env, "TWILIO_SIMULATE_LATENCY_MS", 0, problems, int, 0, 60000)
        / 1000,
        status_webhook=_status_webhook(env, simulate, problems),
        base_url_is_local=base_url_is_local,
    )
    return config, problems


def problems_with(problems, variables):
    """The problems that name one of `variables`."""
    return [problem for problem in problems
            if any(re.search(rf"(?<![A-Z_]){name}(?![A-Z_])", problem) for name in variables)]


# Without API_KEY (allowed only when simulating) these need no key.
ENDPOINTS_OPEN_WITHOUT_KEY = ("/send-sms", "/get-status", "/messages", "/stats",
                              "/webhook-events", "/metrics", "/dashboard")


def serves_locally_only(env):
    """True when simulating without API_KEY: every endpoint is open then, so the service
    listens on 127.0.0.1 alone unless told otherwise."""
    return _flag(env, "TWILIO_SIMULATE", []) and not (env.get("API_KEY") or "").strip()


def server_settings(env):
    """(port, workers, threads, read timeout) for gunicorn from PORT, WEB_CONCURRENCY,
    GUNICORN_THREADS and REQUEST_READ_TIMEOUT.

    Raises ConfigError when one of them is malformed, listing every other configuration
    problem too: gunicorn reads these before it loads the app, and must not hide the rest.
    """
    problems = []
    port = _number(env, "PORT", 3000, problems, int, 1, 65535)
    workers = _number(env, "WEB_CONCURRENCY", 2, problems, int, 1)
    threads = _number(env, "GUNICORN_THREADS", 64, problems, int, 1)
    read_timeout = _number(env, "REQUEST_READ_TIMEOUT", 5.0, problems, float, 0.5)
    if problems:
        try:
            load_config(env)
        except ConfigError as error:
            problems += [p for p in error.problems if not p.startswith("PORT ")]
        raise ConfigError(problems)
    return port, workers, threads, read_timeout
