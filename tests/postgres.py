"""A throwaway PostgreSQL server for the tests, from the machine's PostgreSQL binaries.

`initdb` and `postgres` refuse to run as root, so as root (as in CI) they run as the
`postgres` system user. The server listens on a free 127.0.0.1 port, checks passwords
(so the tests see DATABASE_URLs with a real password in them), and keeps its files in a
temporary folder removed at the end. TEST_DATABASE_URL (a superuser's URL) uses an
existing server instead.
"""

import glob
import os
import secrets
import shutil
import subprocess
import tempfile
import uuid
from urllib.parse import urlsplit, urlunsplit

import psycopg

from support import free_port

SUPERUSER = "postgres"


class PostgresUnavailable(Exception):
    """No server could be started; the message says why."""


# util-linux's runuser lives in /usr/sbin, which a root shell's PATH may lack (`su` without -).
RUNUSER = shutil.which("runuser") or shutil.which("runuser", path="/usr/sbin:/sbin") or "runuser"


def find_binary(name):
    """A PostgreSQL server binary, from PATH or Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                        key=lambda path: int(path.split("/")[4]))
    if not candidates:
        raise PostgresUnavailable(
            f"{name} not found: install PostgreSQL's server (Debian: apt-get install postgresql)")
    return candidates[-1]


class PostgresServer:
    """One server in a temporary folder; start(), stop(), url(dbname), create_database()."""

    def __init__(self):
        self.port = free_port()
        self.password = secrets.token_urlsafe(12)
        self.folder = tempfile.mkdtemp(prefix="sms-status-pg-")
        self.data = os.path.join(self.folder, "data")
        self.as_root = os.geteuid() == 0
        if self.as_root:
            os.chmod(self.folder, 0o755)
            shutil.chown(self.folder, SUPERUSER)

    def _run(self, argv, timeout=60):
        if self.as_root:
            argv = [RUNUSER, "-u", SUPERUSER, "--", *argv]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                cwd=self.folder)
        if result.returncode != 0:
            raise PostgresUnavailable(f"{' '.join(argv)} failed: {result.stderr.strip()}")

    def initdb(self):
        password_file = os.path.join(self.folder, "password")
        with open(password_file, "w") as out:
            out.write(self.password)
        if self.as_root:
            shutil.chown(password_file, SUPERUSER)
        self._run([find_binary("initdb"), "-D", self.data, "-U", SUPERUSER, "-E", "UTF8",
                   "--auth-local=trust", "--auth-host=scram-sha-256",
                   f"--pwfile={password_file}", "--no-sync"])
        os.remove(password_file)
        return self

    def start(self, durable=False):
        """Starts the server. Not `durable` (for tests): fsync off, since a test server's
        data need not survive a power loss, and it is faster. `durable` (for benchmarks):
        PostgreSQL's own defaults, each commit flushed to disk before it is answered."""
        options = (f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 "
                   "-c max_connections=300")
        if not durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run([find_binary("pg_ctl"), "-D", self.data, "-l",
                   os.path.join(self.folder, "server.log"), "-w", "-t", "60",
                   "-o", options, "start"], timeout=90)
        return self

    def stop(self, mode="fast"):
        self._run([find_binary("pg_ctl"), "-D", self.data, "-m", mode, "-w", "stop"])

    def remove(self):
        try:
            self.stop("immediate")
        except PostgresUnavailable:
            pass
        shutil.rmtree(self.folder, ignore_errors=True)

    def url(self, dbname="postgres"):
        return f"postgresql://{SUPERUSER}:{self.password}@127.0.0.1:{self.port}/{dbname}"


def create_database(admin_url):
    """A new empty database on the server of `admin_url`; returns its URL."""
    name = "sms_test_" + uuid.uuid4().hex[:12]
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE template0")
    parts = urlsplit(admin_url)
    return urlunsplit(parts._replace(path="/" + name))


def drop_database(admin_url, url):
    name = urlsplit(url).path.lstrip("/")
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
