"""Helpers shared by the benchmarks: starting servers (live, with the run's made-up Twilio
credentials), running wrk, reading gunicorn settings, fresh databases and their row counts.

Every process is started in its own session, so stopping it also stops its children
(gunicorn's workers), and `Processes` stops all of them on exit, error or Ctrl-C.
"""

import argparse
import json
import os
import platform
import secrets
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
# The service's package and the tests' helpers (free ports, clean environments, the
# Procfile's command, throwaway PostgreSQL servers), shared with the tests and CI.
sys.path[1:1] = [str(ROOT), str(ROOT / "tests")]

from support import procfile_command, service_environment  # noqa: E402

WRK_INSTALL = "apt-get install -y wrk   (Debian/Ubuntu, as root; brew install wrk on macOS)"
# Settings a user may set to benchmark other values; everything else is set by the benchmark.
PASSED_THROUGH = ("WEB_CONCURRENCY", "GUNICORN_THREADS", "SQLITE_SYNCHRONOUS", "LOG_LEVEL")


def service_env(port, database, **settings):
    """A clean environment for the service (the tests' service_environment), with the
    passed-through settings of this shell, then `settings`.

    `database` is a SQLite file's path or a database URL.
    """
    url = database if isinstance(database, str) else f"sqlite:///{database}"
    passed = {name: os.environ[name] for name in PASSED_THROUGH if name in os.environ}
    return service_environment(port, url, simulate=False, **{
        "TWILIO_ACCOUNT_SID": "", "TWILIO_AUTH_TOKEN": "", "TWILIO_PHONE_NUMBER": "",
        "API_KEY": "", "BASE_URL": "", **passed, **settings})


# Made-up Twilio credentials, new for each run: the services run live (not simulated) and
# check the signatures the benchmarks compute with this token.
ACCOUNT_SID = "AC" + secrets.token_hex(16)
AUTH_TOKEN = secrets.token_hex(16)
SENDER = "+15017122661"


def live_settings(base_url, api_key=None):
    """The settings of a service in live mode with the run's made-up credentials, checking
    Twilio's signatures for `base_url`, with `api_key` (a new one by default)."""
    return {"TWILIO_SIMULATE": "false", "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
            "TWILIO_AUTH_TOKEN": AUTH_TOKEN, "TWILIO_PHONE_NUMBER": SENDER,
            "API_KEY": api_key or secrets.token_urlsafe(24), "BASE_URL": base_url}


def gunicorn_settings(repo, env):
    """workers, threads and worker_class (a class is named by its module and name) as the
    repository's gunicorn.conf.py sets them in `env`."""
    code = ("import json, runpy; c = runpy.run_path('gunicorn.conf.py'); "
            "print(json.dumps({k: c.get(k) for k in ('workers', 'threads', 'worker_class')}, "
            "default=lambda cls: f'{cls.__module__}.{cls.__qualname__}'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, check=True,
                         capture_output=True, text=True, timeout=30).stdout
    settings = json.loads(out)
    settings["threads"] = settings["threads"] or 1
    return settings


def service_summary(repo, gunicorn):
    """The line naming the service under load: its command, checkout and gunicorn settings."""
    return (f"service: {' '.join(procfile_command(repo)[1:])} in {repo}: "
            f"{gunicorn['worker_class']}, {gunicorn['workers']} workers x "
            f"{gunicorn['threads']} threads")


class Processes:
    """Starts servers and stops every one of them (and their process groups) on exit."""

    def __init__(self, workdir):
        self.workdir = Path(workdir)
        self.running = []

    def __enter__(self):
        # SIGTERM ends the benchmark like Ctrl-C does, so the finally blocks stop everything.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        return self

    def __exit__(self, *exc):
        for process in reversed(self.running):
            stop(process)
        for process in self.running:
            process.log.close()

    def start_server(self, name, argv, cwd, env, ready_url, timeout=30):
        log_path = self.workdir / f"{name}.log"
        log = open(log_path, "ab")
        process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        process.log, process.log_path = log, log_path
        self.running.append(process)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SystemExit(f"{name} exited at start:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(ready_url, timeout=1) as answer:
                    if answer.status == 200:
                        return process
            except OSError:
                time.sleep(0.1)
        raise SystemExit(f"{name} did not answer {ready_url} within {timeout} s; see {log_path}")


def stop(process, timeout=15):
    """SIGTERM to the process group, SIGKILL if it has not ended after `timeout` seconds."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout)
    except ProcessLookupError:
        pass


def cpu_seconds(process):
    """CPU time used so far by a server: its own and its direct children's (the workers, and
    the writer process)."""
    ticks = os.sysconf("SC_CLK_TCK")
    pids = [process.pid]
    try:
        # The children of each of its threads (the writer process is started by one).
        for task in os.listdir(f"/proc/{process.pid}/task"):
            with open(f"/proc/{process.pid}/task/{task}/children") as children:
                pids += [int(pid) for pid in children.read().split()]
    except OSError:
        return float("nan")  # no /proc (macOS): the figure is left out
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total / ticks


def process_tree(pid):
    """The pid and those of all its descendants (gunicorn's workers, the writer process)."""
    pids, index = [pid], 0
    while index < len(pids):
        try:
            for task in Path(f"/proc/{pids[index]}/task").iterdir():
                pids += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            pass
        index += 1
    return pids


def rss_mib(process):
    """Resident memory of a server and its descendants, in MiB (nan without /proc)."""
    total = 0
    for pid in process_tree(process.pid):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        total += next((int(line.split()[1]) for line in status.splitlines()
                       if line.startswith("VmRSS:")), 0)
    return total / 1024 if total else float("nan")


def open_descriptors(process):
    """Open file descriptors of a server and its descendants: its connections, databases
    and logs (nan without /proc)."""
    total = None
    for pid in process_tree(process.pid):
        try:
            total = (total or 0) + len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            continue
    return float("nan") if total is None else total


def require_wrk():
    path = shutil.which("wrk")
    if path is None:
        raise SystemExit(f"These benchmarks need the load generator wrk. Install it with:\n"
                         f"  {WRK_INSTALL}")
    return path


def run_wrk(url, script, args, connections, duration, threads=2, timeout=10):
    """Runs wrk with a Lua script; returns the JSON its done() printed and its other lines.

    The scripts print one line `BENCH {...}` with the figures, and may print more lines.
    """
    threads = max(1, min(threads, connections))
    argv = [require_wrk(), f"-t{threads}", f"-c{connections}", f"-d{duration}s",
            f"--timeout={timeout}s", "-s", str(script), url, "--", *map(str, args)]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        out, err = process.communicate(timeout=duration + timeout + 60)
    finally:
        stop(process, timeout=5)
    lines = out.splitlines()
    result = next((line for line in lines if line.startswith("BENCH ")), None)
    if process.returncode != 0 or result is None:
        raise SystemExit(f"wrk failed ({process.returncode}): {err.strip()}\n{out[-2000:]}")
    return json.loads(result[6:]), lines


def machine_summary():
    """One line naming the machine and the tools, printed above the figures."""
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                  if line.startswith("model name")), platform.processor() or "?")
    wrk = subprocess.run([require_wrk(), "-v"], capture_output=True, text=True).stdout
    return (f"machine: {os.cpu_count()} cores ({model}), Python {platform.python_version()}, "
            f"SQLite {sqlite3.sqlite_version}, {wrk.splitlines()[0].split(' [')[0]}")


def database_rows(database_url, sql):
    """The rows of a read-only query, on SQLite or PostgreSQL."""
    if database_url.startswith("sqlite:///"):
        path = database_url[len("sqlite:///"):]
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10) as conn:
            return conn.execute(sql).fetchall()
    import psycopg
    with psycopg.connect(database_url) as conn:
        return conn.execute(sql).fetchall()


def count_rows(database, table="status_events"):
    """Rows in a table of a SQLite file (a path) or of any database (a URL)."""
    url = database if "://" in str(database) else f"sqlite:///{database}"
    return database_rows(url, f"SELECT count(*) FROM {table}")[0][0]


def settled_count(database, table="status_events", limit=15):
    """The row count once requests cut off when wrk stopped have finished (stable for 0.5 s)."""
    count, deadline = count_rows(database, table), time.monotonic() + limit
    while time.monotonic() < deadline:
        time.sleep(0.5)
        count, previous = count_rows(database, table), count
        if count == previous:
            break
    return count


class PostgresDatabases:
    """Fresh PostgreSQL databases for a run, dropped at its end (its `with` block's): on the
    server of --database-url (or DATABASE_URL; its user needs the CREATEDB privilege), or,
    with --postgres, on a throwaway server started from the machine's PostgreSQL binaries."""

    def __init__(self, args):
        self.admin_url = args.database_url or os.environ.get("DATABASE_URL", "")
        if not self.admin_url.startswith(("postgres://", "postgresql://")):
            self.admin_url = ""
        self.server = None
        if args.postgres and not self.admin_url:
            from postgres import PostgresServer  # the tests' throwaway server

            # With PostgreSQL's durability defaults, as a real server runs.
            self.server = PostgresServer().initdb().start(durable=True)
            self.admin_url = self.server.url()
        self.created = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __bool__(self):
        return bool(self.admin_url)

    def fresh(self, sqlite_path):
        """A fresh database's URL: a new PostgreSQL database when the run has a server, else
        the SQLite file `sqlite_path`."""
        return self.new() if self else f"sqlite:///{sqlite_path}"

    def new(self):
        from postgres import create_database

        self.created.append(create_database(self.admin_url))
        return self.created[-1]

    def close(self):
        from postgres import drop_database

        for url in self.created:
            drop_database(self.admin_url, url)
        if self.server:
            self.server.remove()


def median(values):
    return statistics.median(values) if values else float("nan")


def percentile(values, p):
    """The p-th percentile (nearest rank) of a list of numbers."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


def ms(microseconds):
    return f"{microseconds / 1000:.1f}"


def verdict(ok):
    return "met" if ok else "MISSED"


def run_benchmark(prefix, args, run):
    """Calls run(args, workdir, processes) in a fresh work folder; exits 1 if it failed.

    The folder (logs, databases) is kept when the run failed or with --keep.
    """
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    failures = ["interrupted"]
    try:
        with Processes(workdir) as processes:
            failures = run(args, workdir, processes)
    finally:
        if failures or args.keep:
            print(f"logs and databases kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if failures:
        print("FAILED: " + "; ".join(failures))
        sys.exit(1)


def argument_parser(description, connections, connections_help):
    """The options both benchmarks take; each adds its own before calling parse_args()."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--duration", type=int, default=10, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (medians)")
    parser.add_argument("--connections", type=int, default=connections, help=connections_help)
    parser.add_argument("--smoke", action="store_true",
                        help="1 round of 2 s measurements: checks that it works, not how fast")
    parser.add_argument("--keep", action="store_true", help="keep logs and databases")
    parser.add_argument("--repo", type=Path, default=ROOT,
                        help="benchmark the service in another checkout (default: this one)")
    parser.add_argument("--database-url", default=None,
                        help="a PostgreSQL server to measure on as well (default: DATABASE_URL "
                             "when it names one); fresh databases are made on it and dropped")
    parser.add_argument("--postgres", action="store_true",
                        help="measure on PostgreSQL as well, on a throwaway server started "
                             "from the machine's PostgreSQL binaries")
    return parser


def parse_bench_args(parser):
    args = parser.parse_args()
    if args.smoke:
        args.duration, args.rounds = 2, 1
    return args
