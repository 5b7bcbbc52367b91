"""Reads the service's configuration from the environment and checks all of it at once.

Every variable is a row of SETTINGS, read the same way; the checks across variables follow.
Every problem is collected before anything fails, so one start-up message lists every
variable to fix instead of making the operator fix them one restart at a time.
"""

import base64
import binascii
import math
import os
import re
from collections.abc import Callable
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


class Problem(str):
    """A configuration problem: its text as the operator reads it, and `variable`, the
    environment variable to fix.

    A str, so that the start-up message and anything matching its words read it as text;
    code that needs to know which variable it is about reads `variable`.
    """

    def __new__(cls, variable, text):
        problem = super().__new__(cls, text)
        problem.variable = variable
        return problem

    @property
    def text(self):
        return str(self)


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



# How a setting's text is read: parse(raw, name) gives the value, or raises ValueError with
# the problem's text, which names the variable and never repeats a secret's value.


def _text(raw, name):
    return raw.strip()


def _flag(raw, name):
    word = raw.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(f"{name} must be true or false, got {raw!r}")


def _number(kind, raw, name):
    try:
        value = kind(raw.strip())
        if not math.isfinite(value):
            raise ValueError(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None
    return value


def _integer(raw, name):
    return _number(int, raw, name)


def _decimal(raw, name):
    return _number(float, raw, name)


def _choice(*words):
    """A parser of one of `words`, in any case."""
    listed = " or ".join(words) if len(words) == 2 else "one of " + ", ".join(words)

    def parse(raw, name):
        word = raw.strip().upper()
        if word not in words:
            raise ValueError(f"{name} must be {listed}, got {word!r}")
        return word
    return parse


def _duration(raw, name):
    try:
        return parse_duration(raw.strip())
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None


def _destinations(raw, name):
    prefixes = tuple(part.strip() for part in raw.split(",") if part.strip())
    if not prefixes or not all(re.fullmatch(r"\+[1-9][0-9]{0,14}", p) for p in prefixes):
        raise ValueError(f"{name} must be comma-separated E.164 prefixes like +1,+44, "
                         f"got {raw!r}")
    return prefixes


def _database_url(raw, name):
    try:
        return parse_database_url(raw)
    except ValueError as error:  # its message never repeats the URL
        raise ValueError(f"{name} {error}") from None


def _webhook_secrets(raw, name):
    """One Standard Webhooks secret, or two separated by one space."""
    raw = raw.strip()
    if PLACEHOLDER_WEBHOOK_SECRET in raw:
        raise ValueError(f"{name} is still the placeholder from .env.example; make a random one")
    secrets = raw.split(" ")
    if len(secrets) > 2:
        raise ValueError(f"{name} holds at most two secrets separated by one space (to rotate "
                         f"without a gap), got {len(secrets)} parts")
    for number, secret in enumerate(secrets, 1):
        try:
            key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
        except (binascii.Error, ValueError):
            key = b""
        if not secret.startswith("whsec_") or not 24 <= len(key) <= 64:
            which = f"its secret number {number}" if len(secrets) > 1 else "it"
            raise ValueError(f"{name} must be whsec_ followed by the base64 of 24 to 64 random "
                             f"bytes; {which} is not")
    return tuple(secrets)


def _retry_schedule(raw, name):
    delays = []
    for part in raw.split(","):
        try:
            delay = float(part.strip())
        except ValueError:
            delay = math.nan
        if not (math.isfinite(delay) and 0 <= delay <= 7 * 86400):
            raise ValueError(f"{name} must be comma-separated delays in seconds (each from 0 "
                             f"to 604800), like 5,300,1800; got {raw!r}")
        delays.append(delay)
    if len(delays) > MAX_RETRY_DELAYS:
        raise ValueError(f"{name} has {len(delays)} delays; at most {MAX_RETRY_DELAYS} are "
                         "allowed")
    return tuple(delays)


@dataclass(frozen=True)
class Setting:
    """One environment variable: how it is read, its default, its bounds and its meaning."""

    name: str
    parse: Callable  # (raw, name) -> value; ValueError(the problem's text) when malformed
    default: str | None = None  # as written in the environment; None: no value
    minimum: float | None = None
    maximum: float | None = None
    help: str = ""
    secret: bool = False  # its value is never repeated in a problem
    app: bool = True  # read by read_config
    gunicorn: bool = False  # read by server_settings, before gunicorn loads the app
    only_with: str | None = None  # read only when this variable is set


# Every environment variable the service reads, the app's and gunicorn's (gunicorn.conf.py).
# A problem's place in the start-up message is its variable's place here. The README's
# configuration table and .env.example document each one (tests/test_config.py checks them).
SETTINGS = (
    Setting("TWILIO_SIMULATE", _flag, "false",
            help="true runs against the built-in simulator; only this variable turns it on"),
    Setting("PORT", _integer, "3000", 1, 65535, gunicorn=True,
            help="the port of `python app.py` and gunicorn"),
    Setting("WEB_CONCURRENCY", _integer, "2", 1, app=False, gunicorn=True,
            help="gunicorn worker processes"),
    Setting("GUNICORN_THREADS", _integer, "64", 1, app=False, gunicorn=True,
            help="threads per worker, each able to wait on one Twilio call"),
    Setting("REQUEST_READ_TIMEOUT", _decimal, "5", 0.5, app=False, gunicorn=True,
            help="seconds a request may take to arrive once its first byte has"),
    Setting("TWILIO_ACCOUNT_SID", _text,
            help="required when live: AC followed by 32 hex characters"),
    Setting("TWILIO_AUTH_TOKEN", _text, secret=True,
            help="required when live; also the secret callbacks are verified with"),
    Setting("TWILIO_PHONE_NUMBER", _text,
            help="the sender; this or TWILIO_MESSAGING_SERVICE_SID is required when live"),
    Setting("TWILIO_MESSAGING_SERVICE_SID", _text,
            help="the sender; this or TWILIO_PHONE_NUMBER is required when live"),
    Setting("BASE_URL", _text,
            help="the public URL Twilio reaches this service at; required when live"),
    Setting("API_KEY", _text, secret=True,
            help="what callers send as `Authorization: Bearer <API_KEY>`; required when live"),
    Setting("LOG_LEVEL", _choice(*LOG_LEVELS), "INFO", help="the log's level"),
    Setting("SQLITE_SYNCHRONOUS", _choice("NORMAL", "FULL"), "NORMAL",
            help="NORMAL: a stored status survives a crash of the service; FULL: a power loss"),
    Setting("BODY_RETENTION", _duration, "7d",
            help="stored bodies older than this are cleared by `prune`"),
    Setting("DATABASE_URL", _database_url, secret=True,
            help="a SQLite file's URL or PostgreSQL's; without it, a file of the mode's own"),
    Setting("DATABASE_POOL_SIZE", _integer, "4", 1, 1000,
            help="PostgreSQL only: connections per worker process"),
    Setting("TWILIO_TIMEOUT", _decimal, "10", 0.001, 600,
            help="seconds allowed for each Twilio API call"),
    Setting("STORE_MESSAGE_BODY", _flag, "false", help="true keeps message bodies at rest"),
    Setting("ALLOWED_DESTINATIONS", _destinations,
            help="comma-separated E.164 prefixes recipients must start with; unset: any"),
    Setting("MAX_SENDS_PER_RECIPIENT_PER_HOUR", _integer, "10", 0,
            help="messages to one number per hour; 0 turns the limit off"),
    Setting("MAX_SENDS_PER_HOUR", _integer, "1000", 0,
            help="messages per hour for the whole service; 0 turns the limit off"),
    Setting("TWILIO_SIMULATE_LATENCY_MS", _integer, "0", 0, 60000,
            help="simulation only: milliseconds each simulated Twilio API call takes"),
    Setting("TWILIO_WEBHOOK_SIGNING_KEY", _text, secret=True,
            help="the secret of a Twilio shared key, for callbacks signed with one"),
    Setting("STATUS_WEBHOOK_URL", _text, secret=True,  # may hold user:password@
            help="where status webhooks go; unset: off"),
    Setting("STATUS_WEBHOOK_SECRET", _webhook_secrets, secret=True,
            only_with="STATUS_WEBHOOK_URL",
            help="required with the URL: whsec_ and the base64 of 24 to 64 random bytes"),
    Setting("STATUS_WEBHOOK_RETRY_SCHEDULE", _retry_schedule,
            ",".join(str(delay) for delay in DEFAULT_RETRY_SCHEDULE),
            only_with="STATUS_WEBHOOK_URL", help="seconds between attempts, comma-separated"),
    Setting("STATUS_WEBHOOK_TIMEOUT", _decimal, "15", 0.1, 600,
            only_with="STATUS_WEBHOOK_URL", help="seconds per attempt"),
)
SETTINGS_BY_NAME = {setting.name: setting for setting in SETTINGS}
VARIABLES = tuple(SETTINGS_BY_NAME)
SERVER_VARIABLES = tuple(setting.name for setting in SETTINGS if setting.gunicorn)


def _read(setting, env, problems):
    """A setting's value in `env`: its default when unset or blank, and its default too,
    with a problem added, when malformed or out of bounds."""
    raw = env.get(setting.name)
    if raw is None or raw.strip() == "":
        return _default(setting)
    try:
        value = setting.parse(raw, setting.name)
    except ValueError as error:
        problems.append(Problem(setting.name, str(error)))
        return _default(setting)
    low, high = setting.minimum, setting.maximum
    if (low is not None and value < low) or (high is not None and value > high):
        limits = f"at least {low}" if high is None else f"between {low} and {high}"
        problems.append(Problem(setting.name, f"{setting.name} must be {limits}, got {raw!r}"))
        return _default(setting)
    return value


def _default(setting):
    return None if setting.default is None else setting.parse(setting.default, setting.name)


def _found(problems, name):
    """True when one of `problems` is about the variable `name`."""
    return any(problem.variable == name for problem in problems)


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



def _port_is_valid(url):
    try:
        port = urlparse(url).port
    except ValueError:  # out of range or not a number
        return False
    return port is None or port > 0


# The checks across settings, run once the table is read.


def _twilio_account(values, problems):
    """(account SID, auth token): required and checked when live; the simulated account's
    when simulating, whatever is set, since the simulator must never use real credentials."""
    if values["TWILIO_SIMULATE"]:
        return SIMULATED_ACCOUNT_SID, SIMULATED_AUTH_TOKEN
    account_sid, auth_token = values["TWILIO_ACCOUNT_SID"], values["TWILIO_AUTH_TOKEN"]
    if not account_sid:
        problems.append(Problem("TWILIO_ACCOUNT_SID", "TWILIO_ACCOUNT_SID is required (AC "
                                "followed by 32 hex characters)"))
    elif not ACCOUNT_SID_PATTERN.fullmatch(account_sid):
        problems.append(Problem("TWILIO_ACCOUNT_SID", "TWILIO_ACCOUNT_SID must be AC followed "
                                "by 32 hex characters"))
    if not auth_token:
        problems.append(Problem("TWILIO_AUTH_TOKEN", "TWILIO_AUTH_TOKEN is required"))
    elif auth_token in PLACEHOLDERS:
        problems.append(Problem("TWILIO_AUTH_TOKEN", "TWILIO_AUTH_TOKEN is still the "
                                "placeholder from .env.example"))
    return account_sid or "", auth_token or ""


def _sender(values, problems):
    """(phone number, messaging service SID): exactly one of them, well formed; simulating
    with neither, the simulator's number."""
    phone_number = values["TWILIO_PHONE_NUMBER"]
    messaging_service_sid = values["TWILIO_MESSAGING_SERVICE_SID"]
    simulate = values["TWILIO_SIMULATE"]
    if simulate and not phone_number and not messaging_service_sid:
        return "+15005550006", None
    name = "TWILIO_PHONE_NUMBER"
    if phone_number and messaging_service_sid:
        problems.append(Problem(name, "set only one of TWILIO_PHONE_NUMBER and "
                                "TWILIO_MESSAGING_SERVICE_SID, not both"))
    elif not phone_number and not messaging_service_sid:
        problems.append(Problem(name, "TWILIO_PHONE_NUMBER (like +15017122661) or "
                                "TWILIO_MESSAGING_SERVICE_SID (MG...) is required"))
    elif phone_number and not (
        E164_PATTERN.fullmatch(phone_number)
        or SHORT_CODE_PATTERN.fullmatch(phone_number)
        or ALPHANUMERIC_SENDER_PATTERN.fullmatch(phone_number)
    ):
        problems.append(Problem(name, "TWILIO_PHONE_NUMBER must be an E.164 number like "
                                "+15017122661 (or a short code or alphanumeric sender ID)"))
    elif messaging_service_sid and not MESSAGING_SERVICE_SID_PATTERN.fullmatch(
        messaging_service_sid
    ):
        problems.append(Problem("TWILIO_MESSAGING_SERVICE_SID", "TWILIO_MESSAGING_SERVICE_SID "
                                "must be MG followed by 32 hex characters"))
    if not simulate and phone_number == PLACEHOLDER_PHONE_NUMBER:
        problems.append(Problem(name, "TWILIO_PHONE_NUMBER is still the placeholder from "
                                ".env.example; set your Twilio number"))
    return phone_number, messaging_service_sid


def _base_url(values, problems):
    """(base URL without its trailing slash, whether it is this machine's): required when
    live; simulating without it, the local address of PORT."""
    base_url = values["BASE_URL"]
    is_local = base_url is None and values["TWILIO_SIMULATE"]
    if is_local:
        base_url = f"http://127.0.0.1:{values['PORT']}"
    name = "BASE_URL"
    if base_url is None:
        problems.append(Problem(name, "BASE_URL is required: the public URL Twilio reaches "
                                "this service at"))
    elif not BASE_URL_PATTERN.fullmatch(base_url) or not _port_is_valid(base_url):
        problems.append(Problem(name, "BASE_URL must be an http(s) URL without query string, "
                                f"like https://example.com, got {base_url!r}"))
    elif urlparse(base_url).hostname == PLACEHOLDER_BASE_URL_HOST:
        problems.append(Problem(name, "BASE_URL is still the placeholder from .env.example; "
                                "set the public URL Twilio reaches this service at (your "
                                "ngrok URL, when local)"))
    return (base_url or "").rstrip("/"), is_local


def _api_key(values, problems):
    """API_KEY: required when live, long enough and not the placeholder when set."""
    api_key = values["API_KEY"]
    name = "API_KEY"
    if api_key is None and not values["TWILIO_SIMULATE"]:
        problems.append(Problem(name, "API_KEY is required (callers send it as "
                                "'Authorization: Bearer <API_KEY>'); make one with: python3 -c "
                                "'import secrets; print(secrets.token_urlsafe(32))'"))
    elif api_key is not None and len(api_key) < MIN_API_KEY_LENGTH:
        problems.append(Problem(name, f"API_KEY must be at least {MIN_API_KEY_LENGTH} "
                                "characters long"))
    elif api_key in PLACEHOLDERS:
        problems.append(Problem(name, "API_KEY is still the placeholder from .env.example; "
                                "make a random one"))
    return api_key


def _database(values, problems):
    """DATABASE_URL, or the mode's own file when it is unset; empty when it is malformed,
    so that no database is opened (create_app's for_commands)."""
    if values["DATABASE_URL"] is not None:
        return values["DATABASE_URL"]
    if _found(problems, "DATABASE_URL"):
        return ""
    return parse_database_url(None, values["TWILIO_SIMULATE"])


WEBHOOK_SECRET_REQUIRED = (
    "STATUS_WEBHOOK_SECRET is required with STATUS_WEBHOOK_URL: whsec_ followed by the base64 "
    "of 24 to 64 random bytes; make one with: python3 -c 'import base64, secrets; "
    "print(\"whsec_\" + base64.b64encode(secrets.token_bytes(32)).decode())'")


def _require_webhook_secrets(secrets, problems):
    """The secrets, with a problem added when they are unset (not when malformed)."""
    if secrets is None and not _found(problems, "STATUS_WEBHOOK_SECRET"):
        problems.append(Problem("STATUS_WEBHOOK_SECRET", WEBHOOK_SECRET_REQUIRED))
    return secrets or ()


def parse_webhook_secrets(raw):
    """(secrets, problems) of a STATUS_WEBHOOK_SECRET value, for a receiver of the events."""
    problems = []
    setting = SETTINGS_BY_NAME["STATUS_WEBHOOK_SECRET"]
    secrets = _read(setting, {setting.name: raw} if raw is not None else {}, problems)
    return _require_webhook_secrets(secrets, problems), problems


def _status_webhook(values, problems):
    """The status webhooks' settings, or None when STATUS_WEBHOOK_URL is unset (off)."""
    raw = values["STATUS_WEBHOOK_URL"]
    if raw is None:
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
        problems.append(Problem(name, f"{name} must be an http(s) URL like "
                                "https://example.com/sms-events, without a #fragment"))
    elif host == PLACEHOLDER_WEBHOOK_HOST:
        problems.append(Problem(name, f"{name} is still the placeholder from .env.example; "
                                "set the URL of your application's receiver"))
    elif (not values["TWILIO_SIMULATE"] and parts.scheme != "https"
          and host not in LOOPBACK_HOSTS):
        problems.append(Problem(name, f"{name} must be https:// when live (http:// only for "
                                "localhost, 127.0.0.1 and [::1])"))
    return WebhookSettings(
        url=raw,
        secrets=_require_webhook_secrets(values["STATUS_WEBHOOK_SECRET"], problems),
        retry_schedule=values["STATUS_WEBHOOK_RETRY_SCHEDULE"],
        timeout=values["STATUS_WEBHOOK_TIMEOUT"],
    )


def load_config(env):
    """Builds a Config from an environment mapping, or raises ConfigError listing every problem."""
    config, problems = read_config(env)
    if problems:
        raise ConfigError(problems)
    return config


def read_config(env):
    """(Config, problems): the Config with defaults in place of what is wrong, and every
    problem found, each naming the variable to fix, in the order of SETTINGS."""
    env = {key: value for key, value in env.items() if value is not None}
    problems = []
    values = {}
    for setting in SETTINGS:
        if setting.app:
            wanted = setting.only_with is None or values[setting.only_with] is not None
            values[setting.name] = _read(setting, env, problems) if wanted else None

    account_sid, auth_token = _twilio_account(values, problems)
    phone_number, messaging_service_sid = _sender(values, problems)
    base_url, base_url_is_local = _base_url(values, problems)
    config = Config(
        simulate=values["TWILIO_SIMULATE"],
        account_sid=account_sid,
        auth_token=auth_token,
        phone_number=phone_number,
        messaging_service_sid=messaging_service_sid,
        base_url=base_url,
        api_key=_api_key(values, problems),
        database_url=_database(values, problems),
        database_pool_size=values["DATABASE_POOL_SIZE"],
        twilio_timeout=values["TWILIO_TIMEOUT"],
        store_message_body=values["STORE_MESSAGE_BODY"],
        port=values["PORT"],
        log_level=values["LOG_LEVEL"],
        sqlite_synchronous=values["SQLITE_SYNCHRONOUS"],
        allowed_destinations=values["ALLOWED_DESTINATIONS"] or (),
        max_sends_per_recipient_per_hour=values["MAX_SENDS_PER_RECIPIENT_PER_HOUR"],
        max_sends_per_hour=values["MAX_SENDS_PER_HOUR"],
        webhook_signing_key=values["TWILIO_WEBHOOK_SIGNING_KEY"],
        body_retention_seconds=values["BODY_RETENTION"],
        simulate_latency=values["TWILIO_SIMULATE_LATENCY_MS"] / 1000,
        status_webhook=_status_webhook(values, problems),
        base_url_is_local=base_url_is_local,
    )
    problems.sort(key=lambda problem: VARIABLES.index(problem.variable))
    return config, problems


# Without API_KEY (allowed only when simulating) these need no key.
ENDPOINTS_OPEN_WITHOUT_KEY = ("/send-sms", "/get-status", "/messages", "/stats",
                              "/webhook-events", "/opt-outs", "/inbound-messages", "/metrics",
                              "/dashboard")


def serves_locally_only(env):
    """True when simulating without API_KEY: every endpoint is open then, so the service
    listens on 127.0.0.1 alone unless told otherwise."""
    return (_read(SETTINGS_BY_NAME["TWILIO_SIMULATE"], env, [])
            and not (env.get("API_KEY") or "").strip())


def server_settings(env):
    """(port, workers, threads, read timeout) for gunicorn from PORT, WEB_CONCURRENCY,
    GUNICORN_THREADS and REQUEST_READ_TIMEOUT.

    Raises ConfigError when one of them is malformed, listing every other configuration
    problem too: gunicorn reads these before it loads the app, and must not hide the rest.
    """
    problems = []
    port, workers, threads, read_timeout = (
        _read(SETTINGS_BY_NAME[name], env, problems) for name in SERVER_VARIABLES)
    if problems:
        try:
            load_config(env)
        except ConfigError as error:
            problems += [p for p in error.problems if p.variable != "PORT"]
        raise ConfigError(problems)
    return port, workers, threads, read_timeout
