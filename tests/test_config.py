import os
import re
import subprocess
import sys

import pytest

from sms_status.config import (
    DEFAULT_DATABASE_FILES,
    SETTINGS,
    SETTINGS_BY_NAME,
    VARIABLES,
    ConfigError,
    load_config,
    read_config,
)
from sms_status.storage import PostgresEngine, open_engine
from support import ROOT, free_port, live_env, procfile_command, service_environment


def problems(env):
    with pytest.raises(ConfigError) as caught:
        load_config(env)
    return caught.value.problems


def test_every_missing_variable_is_named_at_once():
    found = "\n".join(problems({}))
    for name in ("TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN", "TWILIO_PHONE_NUMBER",
                 "TWILIO_MESSAGING_SERVICE_SID", "BASE_URL", "API_KEY"):
        assert name in found


@pytest.mark.parametrize("overrides, name", [
    pytest.param({"TWILIO_ACCOUNT_SID": "AC123"}, "TWILIO_ACCOUNT_SID", id="short-sid"),
    pytest.param({"TWILIO_PHONE_NUMBER": "555-1234"}, "TWILIO_PHONE_NUMBER", id="bad-sender"),
    pytest.param({"TWILIO_MESSAGING_SERVICE_SID": "MG" + "0" * 32},
                 "only one of TWILIO_PHONE_NUMBER", id="two-senders"),
    pytest.param({"BASE_URL": "sms.example.com"}, "BASE_URL", id="no-scheme"),
    pytest.param({"BASE_URL": "https://x.com/?a=1"}, "BASE_URL", id="query"),
    pytest.param({"API_KEY": "short"}, "API_KEY", id="short-key"),
    pytest.param({"DATABASE_URL": "mysql://u:p@db/x"}, "DATABASE_URL", id="other-database"),
    pytest.param({"DATABASE_POOL_SIZE": "0"}, "DATABASE_POOL_SIZE", id="pool-size"),
    pytest.param({"TWILIO_TIMEOUT": "soon"}, "TWILIO_TIMEOUT", id="timeout-word"),
    pytest.param({"TWILIO_TIMEOUT": "0"}, "TWILIO_TIMEOUT", id="timeout-zero"),
    pytest.param({"STORE_MESSAGE_BODY": "maybe"}, "STORE_MESSAGE_BODY", id="flag"),
    pytest.param({"PORT": "70000"}, "PORT", id="port"),
    pytest.param({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL", id="log-level"),
    pytest.param({"BASE_URL": "https://sms.example.com:99999"}, "BASE_URL", id="port-range"),
    pytest.param({"BASE_URL": "https://sms.example.com:abc"}, "BASE_URL", id="port-word"),
    pytest.param({"TWILIO_TIMEOUT": "nan"}, "TWILIO_TIMEOUT", id="timeout-nan"),
    pytest.param({"API_KEY": "change-me-to-a-long-random-string"}, "placeholder",
                 id="placeholder-key"),
    pytest.param({"TWILIO_AUTH_TOKEN": "your_auth_token"}, "placeholder",
                 id="placeholder-token"),
    pytest.param({"TWILIO_PHONE_NUMBER": "+15551234567"}, "TWILIO_PHONE_NUMBER is still the "
                 "placeholder", id="placeholder-phone-number"),
    pytest.param({"BASE_URL": "https://your-subdomain.ngrok-free.app"}, "BASE_URL is still the "
                 "placeholder", id="placeholder-base-url"),
    pytest.param({"BASE_URL": "https://your-subdomain.ngrok-free.app/"}, "BASE_URL is still the "
                 "placeholder", id="placeholder-base-url-slash"),
])
def test_malformed_variables_are_named(tmp_path, overrides, name):
    assert any(name in problem for problem in problems(live_env(tmp_path, **overrides)))


def test_defaults_and_parsing(tmp_path):
    config = load_config(live_env(tmp_path, BASE_URL="https://sms.example.com/",
                                  DATABASE_URL=None))
    assert config.base_url == "https://sms.example.com"
    assert config.status_callback_url == "https://sms.example.com/message-status"
    assert config.twilio_timeout == 10.0
    assert config.store_message_body is False
    assert config.port == 3000
    assert config.database_url == "sqlite:///" + os.path.abspath("sms_status.db")


@pytest.mark.parametrize("url, path", [
    ("sqlite:///relative.db", "relative.db"),
    ("sqlite:////abs/dir/x.db", "/abs/dir/x.db"),
])
def test_database_url_forms(tmp_path, url, path):
    database_url = load_config(live_env(tmp_path, DATABASE_URL=url)).database_url
    assert database_url.startswith("sqlite:////") and database_url.endswith(path)


@pytest.mark.parametrize("url", [
    "postgres://app:s3cret-pw@db.example.com:5432/status?sslmode=require",
    "postgresql://app:s3cret-pw@db.example.com/status",
])
def test_postgres_urls_select_postgres_and_reach_libpq_unchanged(tmp_path, url):
    config = load_config(live_env(tmp_path, DATABASE_URL=url))
    assert config.database_url == url
    assert isinstance(open_engine(config.database_url), PostgresEngine)
    assert config.database_pool_size == 4
    assert "s3cret-pw" not in repr(config)


@pytest.mark.parametrize("url", [
    "mysql://app:s3cret-pw@db/x",
    "postgres://app:s3cret-pw@[::1/statusdb",
    "postgres://app:s3cret-pw%ZZ@db/statusdb",
    "postgres://app:s3cret-pw@db/statusdb?no_such_option=1",
])
def test_a_refused_database_url_is_never_repeated(tmp_path, url):
    found = problems(live_env(tmp_path, DATABASE_URL=url))
    assert any("DATABASE_URL" in problem for problem in found)
    assert not any("s3cret-pw" in problem for problem in found)


@pytest.mark.parametrize("url", [
    "postgres://app:s3cret@pw@db.example.com:5432/statusdb",
    "postgres://app:s3cret/pw@db.example.com:5432/statusdb",
    "postgres://app:s3cret/p:w@db.example.com/statusdb?sslmode=require",
])
def test_a_password_with_an_unescaped_character_is_told_to_be_percent_encoded(tmp_path, url):
    found = problems(live_env(tmp_path, DATABASE_URL=url))
    message = next(problem for problem in found if "DATABASE_URL" in problem)
    assert "percent-encode" in message and "%40" in message and "%2F" in message
    assert "s3cret" not in message


@pytest.mark.parametrize("url", [
    "postgres://app:s3cret%40pw@db.example.com:5432/statusdb",
    "postgres://app:s3cret%2Fpw@db.example.com:5432/statusdb",
    # libpq reads a ':' in the password right: the first one ends the user name.
    "postgres://app:s3cret:pw@db.example.com:5432/statusdb",
])
def test_a_percent_encoded_password_is_taken(tmp_path, url):
    assert load_config(live_env(tmp_path, DATABASE_URL=url)).database_url == url


def test_secrets_stay_strings(tmp_path):
    config = load_config(live_env(tmp_path, TWILIO_AUTH_TOKEN="1234e5678",
                                  API_KEY="1234e56781234567"))
    assert config.auth_token == "1234e5678" and config.api_key == "1234e56781234567"


def test_simulation_ignores_real_credentials(tmp_path):
    config = load_config({"TWILIO_SIMULATE": "true", "TWILIO_ACCOUNT_SID": "AC" + "9" * 32,
                          "TWILIO_AUTH_TOKEN": "real-token", "PORT": "4100"})
    assert config.auth_token != "real-token" and config.account_sid != "AC" + "9" * 32
    assert config.base_url == "http://127.0.0.1:4100"
    assert config.api_key is None and config.mode == "simulated"


@pytest.mark.parametrize("env, host, base_url", [
    pytest.param({"TWILIO_SIMULATE": "true"}, "127.0.0.1", "http://127.0.0.1:3001", id="sim"),
    pytest.param({"TWILIO_SIMULATE": "true"}, "0.0.0.0", "http://127.0.0.1:3001", id="any"),
    pytest.param({"TWILIO_SIMULATE": "true"}, "::", "http://[::1]:3001", id="any-ipv6"),
    pytest.param({"TWILIO_SIMULATE": "true", "BASE_URL": "https://tunnel.example.com"},
                 "127.0.0.1", "https://tunnel.example.com", id="explicit-base-url"),
    pytest.param({"TWILIO_ACCOUNT_SID": "AC" + "9" * 32, "TWILIO_AUTH_TOKEN": "token",
                  "TWILIO_PHONE_NUMBER": "+15017122661", "API_KEY": "k" * 16,
                  "BASE_URL": "https://sms.example.com"},
                 "127.0.0.1", "https://sms.example.com", id="live"),
])
def test_only_a_simulation_without_base_url_follows_the_address_listened_on(env, host,
                                                                           base_url):
    assert load_config(env).listening_at(host, 3001).base_url == base_url


def clean_env(tmp_path, **extra):
    """Every service variable set (empty means unset), so no .env can fill one in."""
    return service_environment(free_port(), f"sqlite:///{tmp_path}/x.db", **{
        "TWILIO_SIMULATE": "", "LOG_LEVEL": "", "PATH": "/usr/bin:/bin", "GUNICORN_THREADS": "4",
        **extra})


@pytest.mark.parametrize("command", [
    pytest.param("procfile", id="gunicorn"),
    pytest.param([sys.executable, "app.py"], id="python-app"),
])
def test_bad_configuration_stops_the_whole_server_with_one_message(tmp_path, command):
    argv = procfile_command() if command == "procfile" else command
    env = clean_env(tmp_path, TWILIO_ACCOUNT_SID="nonsense")
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Traceback" not in output
    assert output.count("Configuration error") == 1
    for name in ("TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN", "BASE_URL", "API_KEY"):
        assert name in output
    assert "Booting worker" not in output


@pytest.mark.parametrize("name, value", [
    pytest.param("PORT", "eighty", id="port"),
    pytest.param("WEB_CONCURRENCY", "0", id="workers"),
    pytest.param("GUNICORN_THREADS", "many", id="threads"),
    pytest.param("REQUEST_READ_TIMEOUT", "0", id="read-timeout"),
])
def test_a_bad_gunicorn_setting_is_named_with_every_other_problem(tmp_path, name, value):
    env = clean_env(tmp_path, TWILIO_ACCOUNT_SID="nonsense", **{name: value})
    result = subprocess.run(procfile_command(), cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert output.count("Configuration error") == 1 and "Traceback" not in output
    for named in (name, "TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN", "BASE_URL", "API_KEY"):
        assert named in output
    assert output.count("PORT") == (1 if name == "PORT" else 0)
    assert "Booting worker" not in output


def test_unusable_database_path_is_a_clear_start_error(tmp_path):
    env = clean_env(tmp_path, TWILIO_SIMULATE="true",
                    DATABASE_URL=f"sqlite:///{tmp_path}/missing/dir/x.db")
    result = subprocess.run([sys.executable, "app.py"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0
    assert "DATABASE_URL" in result.stderr and "Traceback" not in result.stderr


def test_dotenv_file_is_read_and_the_real_environment_wins(tmp_path):
    (tmp_path / ".env").write_text("TWILIO_SIMULATE=true\nPORT=4321\nLOG_LEVEL=DEBUG\n"
                                   f"DATABASE_URL=sqlite:///{tmp_path}/from-dotenv.db\n")
    probe = ("import app; c = app.app.config['SERVICE']; "
             "print(c.mode, c.port, c.log_level, c.database_url)")
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT),
                                 "LOG_LEVEL": "WARNING"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1].split() == [
        "simulated", "4321", "WARNING", f"sqlite:///{tmp_path}/from-dotenv.db"]


def test_gunicorn_reads_port_from_dotenv_too(tmp_path):
    """gunicorn.conf.py reads the same .env, so the server binds where the app thinks it is."""
    port = free_port()
    (tmp_path / ".env").write_text(f"PORT={port}\n")
    probe = f"import runpy; print(runpy.run_path({str(ROOT / 'gunicorn.conf.py')!r})['bind'])"
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"0.0.0.0:{port}"


def test_an_unfilled_copy_of_env_example_is_refused_for_each_placeholder(tmp_path):
    lines = (ROOT / ".env.example").read_text().splitlines()
    env = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    found = "\n".join(problems(env))
    for name in ("TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN", "TWILIO_PHONE_NUMBER", "BASE_URL",
                 "API_KEY"):
        assert name in found


def test_simulation_defaults_to_a_database_file_of_its_own(tmp_path):
    live = load_config(live_env(tmp_path, DATABASE_URL=None))
    simulated = load_config(live_env(tmp_path, DATABASE_URL=None, TWILIO_SIMULATE="true"))
    assert os.path.basename(live.database_url) == "sms_status.db"
    assert os.path.basename(simulated.database_url) == "sms_status_simulated.db"


def test_env_example_documents_exactly_the_variables_the_service_reads():
    text = (ROOT / ".env.example").read_text()
    documented = set(re.findall(r"^#? ?([A-Z][A-Z0-9_]+)=", text, flags=re.M))
    assert documented == set(VARIABLES)


def parsed(name, text):
    return SETTINGS_BY_NAME[name].parse(text, name)


def readme_configuration_rows():
    """(variable names, meaning) of each row of the README's configuration table."""
    table = (ROOT / "README.md").read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    return [(tuple(name for name in names if name), meaning) for *names, meaning in re.findall(
        r"^\| `([A-Z_]+)`(?: or `([A-Z_]+)`)? \| (.*) \|$", table, re.M)]


def test_defaults_stated_in_the_readme_are_the_settings_defaults():
    stated = {}
    for names, meaning in readme_configuration_rows():
        found = re.findall(r"default `([^`]+)`|default (\d[\d.]*)|`([^`]+)` \(default\)", meaning)
        if found:
            assert len(names) == 1 and len(found) == 1, (names, found)
            stated[names[0]] = "".join(found[0])
    assert len(stated) >= 15, stated
    for name, text in stated.items():
        if name == "DATABASE_URL":  # a file of each mode's own, read_config's
            assert text == DEFAULT_DATABASE_FILES[False]
            continue
        default = SETTINGS_BY_NAME[name].default
        assert default is not None and parsed(name, text) == parsed(name, default), name


def test_the_values_commented_out_in_env_example_are_the_defaults():
    """A line `# NAME=value` shows the default of a setting that has one."""
    text = (ROOT / ".env.example").read_text()
    shown = dict(re.findall(r"^# ([A-Z][A-Z0-9_]+)=(.*)$", text, flags=re.M))
    with_default = {name: value for name, value in shown.items()
                    if SETTINGS_BY_NAME[name].default is not None}
    assert len(with_default) >= 15, with_default
    for name, value in with_default.items():
        assert parsed(name, value) == parsed(name, SETTINGS_BY_NAME[name].default), name


@pytest.mark.parametrize("name", [setting.name for setting in SETTINGS if setting.secret])
@pytest.mark.parametrize("value", [
    "s3cret-Q9", "whsec_s3cret-Q9 s3cret-Q9 s3cret-Q9", "postgres://u:s3cret-Q9@[::1/x",
    "http://u:s3cret-Q9@example.com:99999/", "s3cret-Q9" * 8, "9999999",
])
def test_no_problem_repeats_a_secret(tmp_path, name, value):
    env = live_env(tmp_path, STATUS_WEBHOOK_URL="https://hooks.example.com/x", PORT="x")
    env[name] = value
    _, found = read_config(env)
    assert any(problem.variable == "PORT" for problem in found)
    shown = "\n".join(found)
    for part in ("s3cret-Q9", "9999999"):
        assert part not in shown, shown


def test_each_problem_knows_the_variable_it_is_about(tmp_path):
    wrong = {"TWILIO_SIMULATE": "maybe", "PORT": "x", "TWILIO_ACCOUNT_SID": "AC1",
             "TWILIO_AUTH_TOKEN": "your_auth_token", "TWILIO_PHONE_NUMBER": None,
             "TWILIO_MESSAGING_SERVICE_SID": "MG1", "BASE_URL": "example.com",
             "API_KEY": "short", "LOG_LEVEL": "database_url", "SQLITE_SYNCHRONOUS": "x",
             "BODY_RETENTION": "x", "DATABASE_URL": "x", "DATABASE_POOL_SIZE": "0",
             "TWILIO_TIMEOUT": "0", "STORE_MESSAGE_BODY": "x", "ALLOWED_DESTINATIONS": "1",
             "MAX_SENDS_PER_RECIPIENT_PER_HOUR": "-1", "MAX_SENDS_PER_HOUR": "-1",
             "TWILIO_SIMULATE_LATENCY_MS": "-1", "STATUS_WEBHOOK_URL": "ftp://x",
             "STATUS_WEBHOOK_SECRET": "x", "STATUS_WEBHOOK_RETRY_SCHEDULE": "x",
             "STATUS_WEBHOOK_TIMEOUT": "0"}
    _, found = read_config(live_env(tmp_path, **wrong))
    # One problem each, in the table's order; LOG_LEVEL's names DATABASE_URL in its text.
    assert [problem.variable for problem in found] == [name for name in VARIABLES
                                                       if wrong.get(name)]
    assert all(problem.startswith(problem.variable) for problem in found), found
