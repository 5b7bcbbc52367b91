"""A database keeps the mode it was first used in: simulated messages never mix with live
ones, in either direction."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sms_status.config import SIMULATED_ACCOUNT_SID, ConfigError
from support import ROOT, database_at_version, live_env, sql_rows


def test_a_live_start_on_a_database_used_in_simulation_is_refused(make_app):
    simulated = make_app(TWILIO_SIMULATE="true")
    simulated.test_client().post("/send-sms", json={"to": "+15558675309", "body": "hi"})
    with pytest.raises(ConfigError) as refused:
        make_app()
    message = str(refused.value)
    assert "DATABASE_URL" in message and "simulat" in message
    assert "another database" in message
    assert make_app(TWILIO_SIMULATE="true"), "the mode it was first used in still starts"


def test_a_simulated_start_on_a_live_database_is_refused(make_app):
    make_app()
    with pytest.raises(ConfigError) as refused:
        make_app(TWILIO_SIMULATE="true")
    message = str(refused.value)
    assert "DATABASE_URL" in message and "live" in message
    assert "sms_status_simulated.db" in message
    assert make_app(), "the mode it was first used in still starts"


def test_the_mode_is_recorded_at_the_first_start(make_app, database_url):
    make_app(TWILIO_SIMULATE="true")
    assert sql_rows(database_url, "SELECT mode FROM service_mode") == [("simulated",)]


def test_upgrading_a_database_that_holds_simulated_messages_records_simulation(
        make_app, database_url):
    """Before version 8 both modes shared one default file: a database already holding
    messages of the simulated account was used in simulation."""
    database_at_version(database_url, 7)
    sql_rows(database_url, "INSERT INTO messages (sid, account_sid, latest_status, created_at,"
             " updated_at) VALUES ('SM1', ?, 'delivered', '2026-01-01T00:00:00.000Z',"
             " '2026-01-01T00:00:00.000Z')", (SIMULATED_ACCOUNT_SID,))
    with pytest.raises(ConfigError, match="DATABASE_URL"):
        make_app()
    assert sql_rows(database_url, "SELECT mode FROM service_mode") == [("simulated",)]


def test_a_live_reconcile_on_a_database_used_in_simulation_is_refused(make_app, database_url,
                                                                       tmp_path):
    make_app(TWILIO_SIMULATE="true")
    env = {**live_env(tmp_path, DATABASE_URL=database_url), "PATH": os.environ["PATH"]}
    result = subprocess.run([str(Path(sys.executable).parent / "flask"), "--app",
                             str(ROOT / "app.py"), "reconcile"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "DATABASE_URL" in result.stderr and "used in simulation" in result.stderr
    assert "Checked" not in result.stdout and "Traceback" not in result.stderr
