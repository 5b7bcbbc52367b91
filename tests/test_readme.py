"""The README and the files a host reads, checked against what they describe."""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from sms_status.config import VARIABLES
from support import ROOT, accepts_connections, free_port, sqlite_only, wait_until

README = ROOT / "README.md"
# The section whose commands a reader runs in order, against the service it starts.
WALK_THROUGH = "## Quick start"
# Its subsection about the tests is not part of the walk-through.
NOT_WALKED = ("### Running the tests",)
START_COMMAND = ("python3 -m venv .venv && .venv/bin/pip install -r requirements.txt && "
                 "TWILIO_SIMULATE=true .venv/bin/gunicorn app:app")
TEST_COMMAND = ("python3 -m venv .venv && .venv/bin/pip install -r requirements-dev.txt && "
                ".venv/bin/python -m pytest")
README_URL = "http://127.0.0.1:3000"
SID = re.compile(r"SM[0-9a-f]{32}")
TIMESTAMP = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z")
# Numbers that differ from run to run: seconds measured on the reader's machine.
MEASURED = ("p50", "p90")
# How long a reader may wait for the callbacks the README says arrive "a second later".
SETTLE_SECONDS = 10
# The section whose first block's lines a reader runs in order, each in a terminal of its own.
WEBHOOKS_WALK_THROUGH = "## Status webhooks"
# The local ports the README's commands name; the tests use free ones in their place.
README_PORTS = (3000, 3001, 4000)


def headings_of(path):
    """The headings of a Markdown file, outside its fenced code blocks."""
    headings, fenced = [], False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            headings.append(line)
    return headings


def walk_through_blocks():
    """The fenced blocks of the README's quick start, in order, as (language, text)."""
    blocks, block, language, inside = [], None, None, False
    for line in README.read_text().splitlines():
        if block is not None:
            if line.startswith("```"):
                blocks.append((language, "\n".join(block)))
                block = None
            else:
                block.append(line)
        elif line.startswith("```"):
            if inside:
                language, block = line[3:].strip(), []
        elif line.startswith("#"):
            if line.startswith(WALK_THROUGH):
                inside = True
            elif inside and (line.startswith(NOT_WALKED) or line.startswith("## ")):
                inside = False
    return blocks


def section_blocks(heading):
    """The fenced blocks of the README's section under `heading`, in order, as (language,
    text)."""
    section = README.read_text().split("\n" + heading, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```(\w*)\n(.*?)\n```", section, re.M | re.S)


def steps():
    """The start command, then each command with the answer the README shows after it."""
    blocks = walk_through_blocks()
    assert blocks and blocks[0][0] == "sh", "the quick start begins with its start command"
    start, commands = blocks[0][1], []
    for language, text in blocks[1:]:
        if language == "sh":
            commands.append([text, None])
        elif language == "json":
            assert commands and commands[-1][1] is None, f"an answer without a command: {text}"
            commands[-1][1] = json.loads(text)
    return start, commands


def curl_request(command, base_url, sids, readme_url=README_URL):
    """(method, url, headers, data) of a README curl command, for the service at base_url
    where the README says readme_url (None: the command's own URL)."""
    for example, real in sids.items():
        command = command.replace(example, real)
    argv = shlex.split(command.replace("\\\n", " "))
    assert argv[0] == "curl", f"the walk-through runs curl commands only: {command}"
    method, url, headers, data = None, None, {}, None
    options = iter(argv[1:])
    for option in options:
        if option == "-s":
            continue
        elif option == "-X":
            method = next(options)
        elif option == "-H":
            name, value = next(options).split(":", 1)
            headers[name.strip()] = value.strip()
        elif option == "-d":
            data = next(options)
        elif option.startswith("http://") and readme_url is None:
            url = option
        elif option.startswith("http://"):
            assert option.startswith(readme_url), f"the README's service is at {readme_url}"
            url = base_url + option[len(readme_url):]
        else:
            pytest.fail(f"an option this test does not know: {option} in {command}")
    return method or ("POST" if data is not None else "GET"), url, headers, data


def run_curl(method, url, headers, data):
    """The answer's body, from a real curl when there is one (else the same request sent with
    requests), and its status code."""
    curl = shutil.which("curl")
    if curl is None:
        answer = requests.request(method, url, headers=headers, data=data, timeout=15)
        return answer.status_code, answer.text
    argv = [curl, "-s", "-X", method, "-w", "\n%{http_code}", url]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    if data is not None:
        argv += ["-d", data]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=15, check=True)
    body, _, status = result.stdout.rpartition("\n")
    return int(status), body


def mismatch(shown, real, sids, where="answer"):
    """Where the real answer differs from the one the README shows, or None.

    Keys and list lengths must be the same, and every value equal, except what differs from
    run to run: SIDs (the README's SID stands for the reader's own, the same one wherever it
    appears, recorded in `sids`), timestamps, measured seconds, and text the README cuts
    short with "...".
    """
    if isinstance(shown, dict):
        if not isinstance(real, dict) or set(shown) != set(real):
            return f"{where}: keys {sorted(shown)} shown, {sorted(real or ())} answered"
        for key in shown:
            problem = mismatch(shown[key], real[key], sids, f"{where}.{key}")
            if problem:
                return problem
        return None
    if isinstance(shown, list):
        if not isinstance(real, list) or len(shown) != len(real):
            return f"{where}: {len(shown)} items shown, answered {real!r}"
        for n, (item, real_item) in enumerate(zip(shown, real, strict=True)):
            problem = mismatch(item, real_item, sids, f"{where}[{n}]")
            if problem:
                return problem
        return None
    if isinstance(shown, str) and SID.fullmatch(shown):
        if not isinstance(real, str) or not SID.fullmatch(real):
            return f"{where}: a SID shown, {real!r} answered"
        if sids.setdefault(shown, real) != real:
            return f"{where}: {real} answered where the README's {shown} stands for {sids[shown]}"
        return None
    if isinstance(shown, str) and TIMESTAMP.fullmatch(shown):
        ok = isinstance(real, str) and TIMESTAMP.fullmatch(real)
        return None if ok else f"{where}: a timestamp shown, {real!r} answered"
    if isinstance(shown, str) and shown.endswith("..."):
        ok = isinstance(real, str) and real.startswith(shown[:-3])
        return None if ok else f"{where}: {shown!r} shown, {real!r} answered"
    if where.rsplit(".", 1)[-1] in MEASURED and isinstance(shown, float):
        ok = isinstance(real, (int, float)) and not isinstance(real, bool)
        return None if ok else f"{where}: a number shown, {real!r} answered"
    if type(shown) is not type(real) or shown != real:
        return f"{where}: {shown!r} shown, {real!r} answered"
    return None


def test_headings_are_plain_text():
    assert "## Quick start (no Twilio account needed)" in headings_of(README)
    assert "## GET /get-status/<sid>" in headings_of(ROOT / "docs" / "api.md")
    for path in [README, ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]:
        assert [h for h in headings_of(path) if re.search(r"&[a-z]+;|&#", h)] == [], path


def test_readme_is_a_page_a_user_can_finish():
    lines = len(README.read_text().splitlines())
    assert lines <= 310, f"the README has {lines} lines; move details to docs/"


def test_readme_links_lead_to_files_of_the_repository():
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README.read_text())
    local = [link for link in links if not link.startswith("http")]
    assert "docs/api.md" in local
    assert [link for link in local if not (ROOT / link).is_file()] == []


def test_readme_configuration_table_has_every_variable_the_service_reads():
    table = README.read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `([A-Z_]+)`(?: or `([A-Z_]+)`)?", table, re.M))
    names = {name for pair in listed for name in pair if name}
    assert names == set(VARIABLES)


def test_readme_test_command_is_the_one_ci_runs():
    blocks = re.findall(r"### Running the tests\n\n```sh\n(.*?)\n```", README.read_text())
    assert blocks == [TEST_COMMAND]
    ci_lines = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci_lines[-1] == TEST_COMMAND


def test_python_version_for_hosts_is_the_one_the_code_is_written_for():
    target = re.search(r'target-version = "py3(\d+)"', (ROOT / "pyproject.toml").read_text())
    assert (ROOT / ".python-version").read_text().strip() == f"3.{target.group(1)}"


@sqlite_only
def command_lines(block):
    """The commands of a block, one a line (a line ending in a backslash goes on)."""
    return [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def flask_command(line):
    """A `flask --app app` line's variables set before it and its arguments, or None for
    any other line."""
    words = shlex.split(line)
    assigned = {}
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
        name, value = words.pop(0).split("=", 1)
        assigned[name] = value
    return (assigned, words[1:]) if words and words[0] == ".venv/bin/flask" else None


def run_walk_through_line(line, service, env, sids):
    """Runs one line of a block that has several: a `flask --app app` command in the
    service's folder, with the environment of a new terminal (the service's port, nothing
    the start command set) and the variables the line sets itself, or a curl command that
    must answer 200."""
    command = flask_command(line)
    if command is not None:
        assigned, arguments = command
        flask = str(Path(sys.executable).parent / "flask")
        result = subprocess.run([flask, *arguments], cwd=ROOT, env={**env, **assigned},
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{line}\n{result.stdout}{result.stderr}"
        return
    status, body = run_curl(*curl_request(line, service.url, sids))
    assert status == 200, f"{line}\nstatus {status}: {body}"


def test_the_quick_start_walk_through_gives_the_answers_it_shows(service_env, start_service):
    """Runs the README's quick start in order against a service started as its start command
    says (the Procfile's command, in simulation, on a free port instead of 3000), and checks
    each answer against the one the README shows after the command."""
    start, commands = steps()
    assert start == START_COMMAND
    words = shlex.split(start.rsplit("&&", 1)[1])
    assignments = dict(word.split("=", 1) for word in words if "=" in word)
    served = [word for word in words if "=" not in word]
    procfile = (ROOT / "Procfile").read_text().strip()
    assert procfile == "web: " + " ".join(["gunicorn", *served[1:]])
    assert served[0] == ".venv/bin/gunicorn"
    env = service_env()
    env["TWILIO_SIMULATE"] = ""  # only as the README's command sets it
    service = start_service({**env, **assignments})
    assert len(commands) >= 4, "the walk-through sends, reads, lists and counts"

    sids = {}
    for block, shown in commands:
        *before, command = command_lines(block)
        for line in before:
            run_walk_through_line(line, service, env, sids)
        if flask_command(command) is not None:
            assert shown is None, f"a flask command shows no JSON answer: {command}"
            run_walk_through_line(command, service, env, sids)
            continue
        deadline = time.monotonic() + SETTLE_SECONDS
        while True:
            method, url, headers, data = curl_request(command, service.url, sids)
            status, body = run_curl(method, url, headers, data)
            answered = sids.copy()
            # An error the README shows (a refused send) is an answer like any other.
            refused = shown is not None and shown.get("success") is False
            problem = (f"status {status}: {body}" if status != 200 and not refused
                       else mismatch(shown, json.loads(body), answered) if shown else None)
            # A read may need the status callbacks of a send to arrive first.
            if problem is None or method != "GET" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert problem is None, f"{command}\n{problem}"
        sids = answered
    assert len(sids) >= 2, "the walk-through's answers name the messages it sent"


def clone_of_the_service(tmp_path):
    """A folder laid out as the README's clone, its .venv this Python's: the README's commands
    run in it as written, and the .env and database they make stay in it."""
    folder = tmp_path / "clone"
    folder.mkdir()
    for name in ("app.py", "gunicorn.conf.py", "sms_status"):
        (folder / name).symlink_to(ROOT / name)
    (folder / ".venv").symlink_to(Path(sys.executable).parent.parent)
    return folder


def start_receiver(command, folder, env, printed):
    """The receive-webhooks command, once it listens on its --port; its output in `printed`."""
    with open(printed, "w") as out:
        receiver = subprocess.Popen(["bash", "-c", command], cwd=folder, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
    port = int(re.search(r"--port (\d+)", command)[1])
    wait_until(lambda: accepts_connections(port) or receiver.poll() is not None, 20,
               "the receiver")
    assert receiver.poll() is None, f"{command}\n{printed.read_text()}"
    return receiver


def test_the_status_webhooks_walk_through_runs_beside_the_quick_start(start_service, tmp_path):
    """Runs each line of the README's webhook walk-through in order, in a shell of its own as
    a reader's terminals would be, in a clone where the quick start's service still runs (the
    README's ports replaced by free ones); the receiver prints the events of the message sent."""
    folder = clone_of_the_service(tmp_path)
    ports = {port: free_port() for port in README_PORTS}
    env = {"PATH": os.environ.get("PATH", ""), "TMPDIR": str(tmp_path),
           "PORT": str(ports[3000])}  # nothing else: no variable the README leaves unset

    def local(text):
        return re.sub(r"\b(\d{4})\b", lambda m: str(ports.get(int(m[1]), m[1])), text)

    start = steps()[0].rsplit("&&", 1)[1].strip()
    quick_start = start_service(env, argv=["bash", "-c", start], cwd=folder)
    lines = next(text for language, text in section_blocks(WEBHOOKS_WALK_THROUGH)
                 if language == "sh").splitlines()
    printed, receiver, sid = tmp_path / "receiver.out", None, None
    try:
        for line in lines:
            command = local(line)
            if line.startswith("curl "):
                status, body = run_curl(*curl_request(command, None, {}, readme_url=None))
                assert status == 200, f"{line}\n{body}"
                sid = json.loads(body)["messageSid"]
            elif "receive-webhooks" in line:
                receiver = start_receiver(command, folder, env, printed)
            elif "gunicorn" in line:
                port = re.search(r"\bPORT=(\d+)", command)
                port = int(port[1]) if port else quick_start.port
                assert not accepts_connections(port), f"{line}\nits port is taken already"
                start_service(env, argv=["bash", "-c", command], cwd=folder, port=port)
            else:
                subprocess.run(["bash", "-c", command], cwd=folder, env=env, check=True,
                               timeout=30)
        assert sid is not None, "the walk-through sends a message"
        wait_until(lambda: "-> undelivered" in printed.read_text(), SETTLE_SECONDS,
                   "the receiver to print the message's last event")
    finally:
        if receiver is not None:
            os.killpg(receiver.pid, signal.SIGTERM)
            receiver.wait(10)
    events = [line.split() for line in printed.read_text().splitlines() if sid in line]
    assert [" ".join(words[4:7]) for words in events] == [
        "(new) -> queued", "queued -> sent", "sent -> undelivered"]
    assert "REFUSED" not in printed.read_text()
    assert requests.get(quick_start.url + "/healthz", timeout=5).status_code == 200
