"""Maintenance commands: `flask --app app reconcile` and `flask --app app prune`.

Status callbacks get lost (a deploy, a proxy, a network blip); reconciliation asks Twilio
for the status of every message still waiting for a final one. Pruning keeps the
database, and the message bodies kept at rest, from growing forever.
"""

import sqlite3

import click
from flask import current_app
from flask.cli import with_appcontext

import db
import rules
import twilio_api

RATE_LIMIT_RETRIES = 3
FIRST_BACKOFF_SECONDS = 1.0


def parse_duration_option(ctx, param, value):
    """Click callback: `90d` -> ("90d", 7776000), with a clear error for anything else."""
    try:
        return value, rules.parse_duration(value)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


def register_commands(app):
    app.cli.add_command(reconcile)
    app.cli.add_command(prune)


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


@click.command()
@click.option("--older-than", default="10m", show_default=True, callback=parse_duration_option,
              help="How long since a non-final message's last status update, e.g. 10m.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(min=1),
              help="At most this many messages per run.")
@with_appcontext
def reconcile(older_than, limit):
    """Fetch messages whose final status never arrived from Twilio and record what it says."""
    client = current_app.extensions["twilio"]
    clock, sleep = current_app.config["CLOCK"], current_app.config["SLEEP"]
    counts = {"updated": 0, "unchanged": 0, "failed": 0}
    try:
        conn = db.get_db()
        waiting = db.messages_to_reconcile(conn, db.utc_now_iso(clock() - older_than[1]), limit)
        for row in waiting:
            sid, before = row["sid"], row["latest_status"]
            try:
                message = fetch_with_backoff(client, sid, sleep)
            except twilio_api.TwilioFailure as failure:
                counts["failed"] += 1
                click.echo(f"{sid} {before}: fetch failed: {failure.error} ({failure.details})")
                if failure.retry_after is not None:
                    click.echo("Twilio keeps rate limiting; the rest waits for the next run.")
                    break
                continue
            now = db.utc_now_iso(clock())
            new = db.record_status(conn, sid, message.status, message.error_code or None, at=now)
            db.mark_checked(conn, sid, now)
            after = db.message_with_history(conn, sid)["latestStatus"]
            counts["updated" if new else "unchanged"] += 1
            click.echo(f"{sid} {before} -> {after} (Twilio: {message.status}"
                       f"{f', error {message.error_code}' if message.error_code else ''})")
    except sqlite3.Error as error:
        raise click.ClickException(f"database error: {error}") from None
    click.echo(f"Checked {sum(counts.values())} messages: {counts['updated']} updated, "
               f"{counts['unchanged']} unchanged, {counts['failed']} failed.")


@click.command()
@click.option("--older-than", required=True, callback=parse_duration_option,
              help="Delete messages not updated for this long, e.g. 90d (0s: all).")
@with_appcontext
def prune(older_than):
    """Delete old messages with their history, and clear bodies older than BODY_RETENTION."""
    config = current_app.config["SERVICE"]
    now = current_app.config["CLOCK"]()
    try:
        messages, events, bodies = db.prune(
            db.get_db(),
            updated_before=db.utc_now_iso(now - older_than[1]),
            body_before=db.utc_now_iso(now - config.body_retention_seconds),
        )
    except sqlite3.Error as error:
        raise click.ClickException(f"database error: {error}") from None
    click.echo(f"Removed {messages} messages and {events} status events not updated for "
               f"{older_than[0]}; cleared {bodies} message bodies older than BODY_RETENTION.")
