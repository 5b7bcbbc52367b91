"""Maintenance commands: `flask --app app reconcile`, `prune`, `copy-database`, `backup`
and `retry-webhooks`; `keys create`, `keys list` and `keys revoke` for named API keys; and
`receive-webhooks` and `simulate-reply`, to try the status webhooks and the replies out.

Status callbacks get lost (a deploy, a proxy, a network blip); reconciliation asks Twilio
for the status of every message still waiting for a final one. Pruning keeps the
database, and the message bodies kept at rest, from growing forever. Copying moves a
SQLite history into PostgreSQL (or any database DATABASE_URL names) without losing it.
"""


import os
import sys
import time
from contextlib import ExitStack
from dataclasses import replace
from typing import NamedTuple

import click
import requests
from flask import current_app
from flask.cli import with_appcontext

from sms_status import api_keys, rules, twilio_api
from sms_status.config import (
    DEFAULT_DATABASE_FILES,
    ConfigError,
    parse_database_url,
    parse_webhook_secrets,
)
from sms_status.sending import IDEMPOTENCY_KEY_LIFETIME_SECONDS
from sms_status.services import get_db, services
from sms_status.storage import (
    DATABASE_ERRORS,
    access,
    keys,
    maintenance,
    outbox,
    reads,
    statuses,
    times,
)

RATE_LIMIT_RETRIES = 3
FIRST_BACKOFF_SECONDS = 1.0
PROGRESS_EVERY_SECONDS = 5.0


class Duration(NamedTuple):
    """A duration option as given (`90d`) and in seconds."""

    text: str
    seconds: int


def parse_duration_option(ctx, param, value):
    """Click callback: `90d` -> Duration("90d", 7776000), with a clear error otherwise."""
    try:
        return Duration(value, rules.parse_duration(value))
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


def counted(number, singular, plural=None):
    """`1 message`, `2 messages`: a count with its noun in the right number."""
    return f"{number} {singular if number == 1 else plural or singular + 's'}"


class MessageCount(click.ParamType):
    """A whole number of messages, at least 1; anything else is refused saying so."""

    name = "N"

    def convert(self, value, param, ctx):
        text = str(value).strip()
        if not text.isascii() or not text.isdigit() or int(text) < 1:
            self.fail(f"{value!r}: give a whole number of messages, 1 or more, like 100",
                      param, ctx)
        return int(text)


# What the commands read from the configuration: each checks these variables alone, so a
# maintenance command needs no more than it uses (see create_app's `for_commands`).
DATABASE_VARIABLES = ("DATABASE_URL", "DATABASE_POOL_SIZE", "SQLITE_SYNCHRONOUS",
                      "TWILIO_SIMULATE")  # the default database depends on the mode
TWILIO_VARIABLES = ("TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN", "TWILIO_TIMEOUT",
                    "TWILIO_SIMULATE_LATENCY_MS")
# A command that changes statuses records their events as the service would.
WEBHOOK_VARIABLES = ("STATUS_WEBHOOK_URL", "STATUS_WEBHOOK_SECRET",
                     "STATUS_WEBHOOK_RETRY_SCHEDULE", "STATUS_WEBHOOK_TIMEOUT")


class ConfigurationProblem(click.ClickException):
    """Variables a command uses are missing or malformed; exits 2, like the service."""

    exit_code = 2


def database_line(storage, copying_from=None):
    """The command's first line: the database it uses, as the storage names it (never
    with a password), and why, when it is the default file of the mode."""
    config = current_app.config["SERVICE"]
    why = ""
    if config.database_url == parse_database_url(None, config.simulate):
        why = f" (the default file in {config.mode} mode)"
    source = f", copying from {copying_from}" if copying_from else ""
    return f"Database: {storage.label}{why}{source}"


def missing_database(storage):
    """Why a command will not create the SQLite file it was pointed at, and where the
    database it wants may be instead."""
    config = current_app.config["SERVICE"]
    problem = f"no database at {storage.label} (none was created)."
    if config.database_url != parse_database_url(None, config.simulate):
        return (f"{problem} Check DATABASE_URL: sqlite:///relative.db is read from the "
                f"working directory ({os.getcwd()}), sqlite:////absolute/path.db is not.")
    live, simulated = DEFAULT_DATABASE_FILES[False], DEFAULT_DATABASE_FILES[True]
    hint = (f" Without DATABASE_URL, the database is {live} in the working directory, or "
            f"{simulated} when TWILIO_SIMULATE=true.")
    other = parse_database_url(None, not config.simulate)[len("sqlite:///"):]
    if os.path.exists(other):
        switch = "unset TWILIO_SIMULATE" if config.simulate else "set TWILIO_SIMULATE=true"
        return (f"{problem}{hint} {os.path.basename(other)} is here: {switch} to use it, "
                "as the service that made it does.")
    return (f"{problem}{hint} Run the command in the service's folder (where its .env "
            "is), or set DATABASE_URL to the service's database.")


def command_storage(*variables, mode=None):
    """The app's database, named on the command's first line and refused when its SQLite
    file is not there (named_storage), with its schema created or brought up to date
    (prepared)."""
    return prepared(named_storage(*variables), mode)


def named_storage(*variables, create=False, copying_from=None):
    """The app's database, once every variable the command uses (the database's and
    `variables`) is valid; prints its name first. A SQLite file that is not there is
    refused, unless `create` (copy-database's destination): a command pointed at the wrong
    file would otherwise work on a new, empty database and report nothing to do."""
    problems = [problem for problem in current_app.config["CONFIG_PROBLEMS"]
                if problem.variable in DATABASE_VARIABLES + variables]
    if problems:
        raise ConfigurationProblem(str(ConfigError(problems)))
    storage = get_db()
    click.echo(database_line(storage, copying_from))
    if not create and not storage.exists():
        raise click.ClickException(missing_database(storage))
    return storage


def prepared(storage, mode=None):
    """`storage` with its schema created or brought up to date on first use; with `mode`,
    the database must not have been used in the other mode (access.prepare)."""
    if not services().storage_prepared:
        try:
            access.prepare(storage, mode)
        except ConfigError as error:
            raise ConfigurationProblem(str(error)) from None
        services().storage_prepared = True
    return storage


class Progress:
    """How far a long command has come, fed as it goes: `progress(label, done, total)`.

    On a terminal, click's progress bar (with a percentage); otherwise (a log, a pipe) a
    line with the counts every `every` seconds, so a long run is seen to be moving. Used in
    a `with` block, so that the bar ends before the command's summary.
    """

    def __init__(self, every):
        self.every = every
        self.terminal = sys.stdout.isatty()
        self.bars = ExitStack()
        self.bar = self.label = None
        self.due = time.monotonic() + every

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bars.close()

    def __call__(self, label, done, total):
        if not total:
            return
        if not self.terminal:
            if time.monotonic() >= self.due:
                self.due = time.monotonic() + self.every
                click.echo(f"{label}: {done} of {total} ({100 * done // total}%)")
            return
        if label != self.label:
            self.bars.close()
            self.label = label
            self.bar = self.bars.enter_context(
                click.progressbar(length=total, label=label, show_pos=True,
                                  show_percent=True))
        self.bar.update(min(done, total) - self.bar.pos)

    def echo(self, line):
        """Prints a line of the command's own above the bar (which the next update redraws)."""
        if self.terminal and self.bar is not None and not self.bar.finished:
            click.echo("\r\033[K", nl=False)
        click.echo(line)


def progress_option(command):
    return click.option(
        "--progress-every", default=PROGRESS_EVERY_SECONDS, show_default=True, metavar="SECONDS",
        type=click.FloatRange(min=0),
        help="Without a terminal, print how far the command has come this often (on a "
             "terminal a progress bar shows it).")(command)


def register_commands(app):
    app.cli.add_command(reconcile)
    app.cli.add_command(prune)
    app.cli.add_command(copy_database)
    app.cli.add_command(backup)
    app.cli.add_command(retry_webhooks)
    app.cli.add_command(receive_webhooks)
    app.cli.add_command(simulate_reply)
    app.cli.add_command(keys_group)


def fetch_with_backoff(client, sid, sleep):
    """Fetches one message, waiting 1 s, 2 s, 4 s while Twilio answers 429."""
    delay = FIRST_BACKOFF_SECONDS
    for attempt in range(RATE_LIMIT_RETRIES + 1):
        try:
            return twilio_api.fetch_message(client, sid)
        except twilio_api.TwilioFailure as failure:
            if failure.retry_after is None or attempt == RATE_LIMIT_RETRIES:
                raise
            sleep(delay)
            delay *= 2


def check_with_twilio(storage, client, row, counts, echo):
    """Asks Twilio about one waiting message and records what it says; counts the outcome
    in `counts` and reports it with `echo`. Returns True when Twilio keeps rate limiting,
    so the rest waits for the next run."""
    clock, sleep = current_app.config["CLOCK"], current_app.config["SLEEP"]
    sid, before = row["sid"], row["latest_status"]
    try:
        message = fetch_with_backoff(client, sid, sleep)
    except twilio_api.TwilioFailure as failure:
        code = f" (error {failure.code})" if failure.code else ""
        if failure.not_found:
            counts["not found"] += 1
            maintenance.mark_unknown_at_twilio(storage, sid)
            echo(f"{sid} {before}: unknown at Twilio{code}: {failure.details}")
            return False
        counts["failed"] += 1
        echo(f"{sid} {before}: fetch failed: {failure.error}{code}. {failure.details}")
        if failure.retry_after is not None:
            echo("Twilio keeps rate limiting; the rest waits for the next run.")
            return True
        return False
    now = times.stored_time(clock())
    new = statuses.record_status(storage, sid, message.status, message.error_code or None,
                                 at=now)
    maintenance.mark_checked(storage, sid, now)
    after = reads.message_with_history(storage, sid)[0]["latest_status"]
    counts["updated" if new else "unchanged"] += 1
    echo(f"{sid} {before} -> {after} (Twilio: {message.status}"
         f"{f', error {message.error_code}' if message.error_code else ''})")
    return False


@click.command()
@click.option("--older-than", default="10m", show_default=True, callback=parse_duration_option,
              help="How long since a non-final message's last status update, e.g. 10m.")
@click.option("--limit", default=100, show_default=True, type=MessageCount(),
              help="At most this many messages per run.")
@progress_option
@with_appcontext
def reconcile(older_than, limit, progress_every):
    """Fetch messages whose final status never arrived from Twilio and record what it says."""
    # Twilio of one mode is asked about the messages of a database of the same mode.
    storage = command_storage(*TWILIO_VARIABLES, *WEBHOOK_VARIABLES,
                              mode=current_app.config["SERVICE"].mode)
    client = services().twilio
    clock = current_app.config["CLOCK"]
    counts = {"updated": 0, "unchanged": 0, "not found": 0, "failed": 0}
    try:
        idle_before = times.stored_time(clock() - older_than.seconds)
        waiting = maintenance.messages_to_reconcile(storage, idle_before, limit)
        with Progress(progress_every) as progress:
            for done, row in enumerate(waiting, 1):
                stop = check_with_twilio(storage, client, row, counts, progress.echo)
                progress("Checking messages with Twilio", done, len(waiting))
                if stop:
                    break
    except DATABASE_ERRORS as error:
        raise click.ClickException(f"database error: {get_db().describe_error(error)}") from None
    click.echo(f"Checked {counted(sum(counts.values()), 'message')}: {counts['updated']} updated, "
               f"{counts['unchanged']} unchanged, {counts['not found']} not found at Twilio, "
               f"{counts['failed']} failed.")
    if counts["failed"] and counts["failed"] == sum(counts.values()):
        # A scheduler notices only the exit code: a run that could check nothing must fail.
        raise click.ClickException(
            "no message could be checked with Twilio; see the failures above")


@click.command()
@click.option("--older-than", required=True, callback=parse_duration_option,
              help="Delete messages not updated for this long, e.g. 90d (0s: all).")
@click.option("--dry-run", is_flag=True,
              help="Say what would be removed, cleared and kept; change nothing.")
@click.option("--drop-pending-webhooks", is_flag=True,
              help="Also delete old messages whose status webhook events are still pending, "
                   "with those events, which are then never delivered (for status webhooks "
                   "turned off for good).")
@progress_option
@with_appcontext
def prune(older_than, dry_run, drop_pending_webhooks, progress_every):
    """Delete old messages with their history and old inbound messages, and clear bodies
    older than BODY_RETENTION; opt-outs and their history are never deleted."""
    storage = command_storage("BODY_RETENTION")
    config = current_app.config["SERVICE"]
    now = current_app.config["CLOCK"]()
    limits = {"updated_before": times.stored_time(now - older_than.seconds),
              "body_before": times.stored_time(now - config.body_retention_seconds),
              "drop_pending": drop_pending_webhooks}
    try:
        if dry_run:
            pruned = maintenance.prune_preview(storage, **limits)
        else:
            with Progress(progress_every) as progress:
                pruned = maintenance.prune(storage, now=now, progress=progress, **limits)
    except DATABASE_ERRORS as error:
        raise click.ClickException(f"database error: {get_db().describe_error(error)}") from None
    for line in pruned_lines(pruned, older_than, dry_run, drop_pending_webhooks):
        click.echo(line)


def pruned_lines(pruned, older_than, dry_run, drop_pending):
    """prune's summary: what it removed and cleared (or would), and what it kept and why."""
    remove, clear, keep, drop = (("Would remove", "would clear", "Would keep", "Would drop")
                                 if dry_run else ("Removed", "cleared", "Kept", "Dropped"))
    lines = [f"{'Dry run, nothing changed. ' if dry_run else ''}"
             f"{remove} {counted(pruned.messages, 'message')} and "
             f"{counted(pruned.events, 'status event')} not updated for {older_than.text}; "
             f"{clear} {counted(pruned.bodies, 'message body', 'message bodies')} older than "
             "BODY_RETENTION."]
    bodies = counted(pruned.inbound_bodies, "inbound body", "inbound bodies")
    lines.append(f"{remove} {counted(pruned.inbound, 'inbound message')} received over "
                 f"{older_than.text} ago; {clear} {bodies} older than BODY_RETENTION. "
                 "Opt-outs are never pruned: "
                 f"{counted(pruned.opted_out, 'number stays', 'numbers stay')} opted out, every "
                 "change kept.")
    if drop_pending:
        lines.append(f"{drop} {counted(pruned.pending_dropped, 'pending status webhook event')}"
                     " with them: those are never delivered.")
    if pruned.kept:
        lines.append(
            f"{keep} {counted(pruned.kept, 'message')} not updated for {older_than.text} for "
            f"their {counted(pruned.kept_pending, 'status webhook event')} still pending: a "
            "service running with status webhooks on delivers them (while webhooks are off "
            "they wait). If status webhooks are off for good, prune --older-than "
            f"{older_than.text} --drop-pending-webhooks removes them too.")
    return lines


def copy_within_one_mode(source, target, config):
    """Refuses a copy between a simulated and a live database, naming both modes; else
    records the copy's mode in `target` (created now, once the source is known to be
    there), so that a start in the other mode refuses it as it would the source.

    A database no service has used yet has the mode the command runs in (TWILIO_SIMULATE),
    as a start of the service in this configuration would record."""
    source_mode = access.recorded_mode(source)
    target_mode = None
    if target.exists():
        target_mode = access.recorded_mode(prepared(target))
    why = ""
    if target_mode is None:
        target_mode = config.mode
        why = (f", new to {target_mode} mode since "
               f"TWILIO_SIMULATE is {'true' if config.simulate else 'not true'}")
    if source_mode and source_mode != target_mode:
        switch = "TWILIO_SIMULATE=true" if source_mode == "simulated" else "TWILIO_SIMULATE unset"
        raise click.ClickException(
            f"--from names {source.label}, a {source_mode} database, and DATABASE_URL names "
            f"{target.label}, a {target_mode} database{why}: simulated messages are never "
            "mixed with live ones, so nothing was copied. Copy it into a "
            f"{source_mode} database, or into a new one with {switch}.")
    try:
        access.prepare(target, target_mode)
    except ConfigError as error:
        raise ConfigurationProblem(str(error)) from None


@click.command("copy-database")
@click.option("--from", "source_url", required=True, metavar="URL",
              help="The database to copy from, e.g. sqlite:///path/to/old.db.")
@progress_option
@with_appcontext
def copy_database(source_url, progress_every):
    """Copy messages, their status history, replies, opt-outs, unexpired idempotency keys
    and API keys from another database into the one DATABASE_URL names, never between a
    simulated and a live one.
    Running it again copies nothing twice."""
    try:
        source_url = parse_database_url(source_url)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--from") from None
    config = current_app.config["SERVICE"]
    source = access.open_storage(replace(config, database_url=source_url))
    target = named_storage(create=True, copying_from=source.label)
    if source.identity() == target.identity():
        raise click.ClickException(
            f"--from names the database DATABASE_URL names ({target.label}); "
            "nothing to copy onto itself")
    if not source.exists():
        raise click.ClickException(f"--from: no database file at {source.label}")
    try:
        source.migrate()  # an older file is brought to the current schema first
        copy_within_one_mode(source, target, config)
        now = current_app.config["CLOCK"]()
        with Progress(progress_every) as progress:
            copied = maintenance.copy_history(
                source, target, keys_created_after=now - IDEMPOTENCY_KEY_LIFETIME_SECONDS,
                progress=progress)
    except maintenance.ColumnsMissing as error:
        raise click.ClickException(str(error)) from None
    except DATABASE_ERRORS as error:
        raise click.ClickException(
            f"database error: {target.describe_error(source.describe_error(error))}") from None
    finally:
        source.close()
    click.echo(f"Copied {counted(copied['messages'], 'message')}, "
               f"{counted(copied['events'], 'status event')}, "
               f"{counted(copied['webhookEvents'], 'webhook event')}, "
               f"{counted(copied['inbound'], 'inbound message')}, "
               f"{counted(copied['optOuts'], 'opt-out')} with "
               f"{counted(copied['optOutChanges'], 'change')} of their history, "
               f"{counted(copied['keys'], 'idempotency key')} and "
               f"{counted(copied['apiKeys'], 'API key')} from {source.label} to "
               f"{target.label} (what was there already was left as it was).")


@click.command()
@click.option("--to", "target", required=True, metavar="FILE",
              type=click.Path(dir_okay=False, writable=True),
              help="The file to write the copy to (replaced once the copy is complete).")
@with_appcontext
def backup(target):
    """Copy the SQLite database into FILE, safely while the service runs."""
    storage = command_storage()
    if not storage.features.online_backup:
        raise click.ClickException(
            f"DATABASE_URL names {storage.label}: back up PostgreSQL with its own pg_dump, "
            "for example: pg_dump --format=custom --file=FILE \"$DATABASE_URL\"")
    target = os.path.abspath(target)
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):
        raise click.ClickException(
            f"--to: the folder {folder} does not exist; create it first (mkdir -p {folder})")
    try:
        messages = storage.backup(target)
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    except (OSError, *DATABASE_ERRORS) as error:
        raise click.ClickException(f"backup failed: {error}") from None
    click.echo(f"Backed up {storage.label} to {target}: {counted(messages, 'message')}, "
               f"{os.path.getsize(target)} bytes.")


@click.command("retry-webhooks")
@click.option("--since", default="24h", show_default=True, callback=parse_duration_option,
              help="Queue again the status webhook events given up on in this window, e.g. 24h.")
@with_appcontext
def retry_webhooks(since):
    """Queue again every status webhook event given up on (failed) recently, after the
    receiver's outage; the service delivers them at once, each with its schedule restarted."""
    storage = command_storage()
    now = current_app.config["CLOCK"]()
    try:
        queued = outbox.queue_failed_webhook_events_again(
            storage, failed_since=times.stored_time(now - since.seconds), now=now)
    except DATABASE_ERRORS as error:
        raise click.ClickException(f"database error: {get_db().describe_error(error)}") from None
    click.echo(f"Queued {counted(queued, 'failed status webhook event')} again (given up on "
               f"in the last {since.text}).")
    if queued:
        # This command delivers nothing itself, and cannot know the running service's settings.
        click.echo("They are due now: a running service with status webhooks on delivers "
                   "them at once (one with them off, once they are turned on).")


@click.command("receive-webhooks")
@click.option("--port", default=4000, show_default=True, type=click.IntRange(1, 65535),
              help="The port to listen on, on 127.0.0.1.")
def receive_webhooks(port):
    """Receive status webhooks on this machine and print each event whose signature
    verifies with STATUS_WEBHOOK_SECRET; point STATUS_WEBHOOK_URL at
    http://127.0.0.1:PORT/ to try them out."""
    from sms_status.webhooks import receiver

    secrets, problems = parse_webhook_secrets(os.environ.get("STATUS_WEBHOOK_SECRET"))
    if problems:
        raise ConfigurationProblem(str(ConfigError(problems)))
    click.echo(f"Receiving status webhooks at http://127.0.0.1:{port}/ (Ctrl-C stops)")
    receiver.serve(secrets, "127.0.0.1", port)


@click.command("simulate-reply")
@click.option("--from", "from_", required=True, metavar="NUMBER",
              help="The number replying, E.164, like +15558675309.")
@click.option("--body", required=True, metavar="TEXT",
              help="What they reply: STOP, START, HELP, or any text.")
@with_appcontext
def simulate_reply(from_, body):
    """In simulation, post a reply from NUMBER to the running service, signed as Twilio's
    incoming-message webhook is (to BASE_URL, by default the local PORT's address)."""
    from sms_status import simulator

    config = current_app.config["SERVICE"]
    if not config.simulate:
        raise click.ClickException(
            "simulate-reply runs in simulation only (TWILIO_SIMULATE=true): live, replies come "
            "from Twilio, and nothing here may post one in a person's name")
    if not rules.is_e164(from_):
        raise click.BadParameter("must be a phone number in E.164 format, like +15558675309",
                                 param_hint="--from")
    to = config.phone_number or simulator.SIMULATED_SERVICE_NUMBER
    try:
        sid, answer = simulator.post_reply(config.base_url, config.account_sid,
                                           config.auth_token, from_, to, body)
    except requests.RequestException as error:
        raise click.ClickException(
            f"could not reach the service at {config.base_url} ({type(error).__name__}): start "
            "it with TWILIO_SIMULATE=true, and give this command the same PORT or BASE_URL"
        ) from None
    if answer.status_code != 200:
        raise click.ClickException(
            f"the service at {config.base_url} answered {answer.status_code}: "
            f"{answer.text.strip()[:300]}")
    click.echo(f"Replied {body!r} from {from_} to {to} as {sid}: stored "
               f"by {config.base_url}/inbound-sms.")

# --- named API keys ---------------------------------------------------------------------

@click.group("keys")
def keys_group():
    """Create, list and revoke named API keys; each takes effect within a second on every
    worker and instance, without a restart."""


def database_problem(error):
    return click.ClickException(f"database error: {get_db().describe_error(error)}")


@keys_group.command("create")
@click.argument("name")
@click.option("--scope", "scopes", multiple=True, type=click.Choice(api_keys.SCOPES),
              help="What the key may do: send (POST /send-sms), read (the GET endpoints and "
                   "the dashboard), admin (retrying webhook events); repeat for several. "
                   "Default: send and read.")
@click.option("--max-sends-per-hour", type=click.IntRange(min=1), metavar="N",
              help="At most N messages sent with this key in any hour, on top of the "
                   "service's own limits. Default: none of its own.")
@with_appcontext
def keys_create(name, scopes, max_sends_per_hour):
    """Create the key NAME and print it, once."""
    problem = api_keys.name_problem(name)
    if problem:
        raise click.BadParameter(problem, param_hint="NAME")
    storage = command_storage()
    text = api_keys.new_key()
    try:
        created = keys.create_key(
            storage, name, api_keys.digest(text),
            api_keys.stored_scopes(scopes or api_keys.DEFAULT_SCOPES), max_sends_per_hour,
            times.stored_time(current_app.config["CLOCK"]()))
    except DATABASE_ERRORS as error:
        raise database_problem(error) from None
    if not created:
        raise click.ClickException(
            f"a key named {name!r} exists already (names stay taken after a revoke, so that "
            "sentBy always names one key); choose another name")
    click.echo(text)
    click.echo(f"This is key {name!r}: keep it now, it will not be shown again (only its "
               "SHA-256 digest is stored).")


@keys_group.command("list")
@with_appcontext
def keys_list():
    """One line per key: name, scopes, hourly limit, created, last used, state. Never a key
    or its digest."""
    storage = command_storage()
    try:
        rows = keys.all_keys(storage)
    except DATABASE_ERRORS as error:
        raise database_problem(error) from None
    lines = [("name", "scopes", "sends/hour", "created", "last used", "state")]
    if current_app.config["SERVICE"].api_key:
        lines.append((api_keys.SETTING_KEY_NAME, ",".join(api_keys.SCOPES), "-", "-", "-",
                      "active (the API_KEY setting)"))
    for row in rows:
        lines.append((row["name"], ",".join(row["scopes"].split()),
                      str(row["max_sends_per_hour"] or "-"), row["created_at"],
                      row["last_used_at"] or "never",
                      f"revoked {row['revoked_at']}" if row["revoked_at"] else "active"))
    widths = [max(len(line[column]) for line in lines) for column in range(5)]
    for line in lines:
        click.echo("  ".join([value.ljust(width) for value, width in zip(line[:5], widths,
                                                                          strict=True)]
                             + [line[5]]))


@keys_group.command("revoke")
@click.argument("name")
@with_appcontext
def keys_revoke(name):
    """Revoke the key NAME: refused within a second everywhere, its messages still say
    they were sent by it."""
    if name == api_keys.SETTING_KEY_NAME:
        raise click.ClickException(
            "API_KEY is the key of the API_KEY setting: change the setting and restart to "
            "replace it (docs/operations.md, rotating a key without downtime)")
    storage = command_storage()
    try:
        outcome = keys.revoke_key(storage, name,
                                  times.stored_time(current_app.config["CLOCK"]()))
    except DATABASE_ERRORS as error:
        raise database_problem(error) from None
    if outcome == "unknown":
        raise click.ClickException(f"no key is named {name!r}; flask --app app keys list "
                                   "shows them")
    if outcome == "already":
        click.echo(f"Key {name!r} was revoked already.")
        return
    click.echo(f"Revoked key {name!r}: every worker and instance refuses it within "
               f"{api_keys.CACHE_SECONDS:g} s.")
