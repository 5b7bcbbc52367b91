"""What a named API key costs a request, against API_KEY: `python bench/keys.py [--smoke]`.

Starts the service as the Procfile does, simulating Twilio with no latency and without the
hourly limits, creates a named key with `flask --app app keys create`, then times
POST /send-sms and GET /messages side by side: each round sends one request with API_KEY
and one with the named key (in turn first), each on a kept-alive connection of its own,
so that both see the same machine at the same moment. It prints each one's median and
the difference; a third column times a key with an hourly limit of its own, whose count
is a send's extra work.

API_KEY is compared in constant time with no read; a named key is hashed (SHA-256) and
found in the process's copy of the keys, read again from the database every 0.5 s.
"""

import http.client
import json
import secrets
import subprocess
import sys
import time

from common import (
    PostgresDatabases,
    argument_parser,
    machine_summary,
    median,
    parse_bench_args,
    run_benchmark,
    service_env,
)

from support import free_port, procfile_command

WARM_UP = 50
# The contract: a named key costs /send-sms and /messages at most this much over API_KEY.
MAX_EXTRA = 0.03


def parse_args():
    parser = argument_parser(__doc__.split("\n\n")[0], 1, "unused: one caller at a time")
    parser.add_argument("--requests", type=int, default=2000,
                        help="requests per key and endpoint (medians)")
    args = parse_bench_args(parser)
    if args.smoke:
        args.requests = 100
    return args


def create_key(repo, env, name, *options):
    flask = [sys.executable, "-m", "flask", "--app", "app", "keys", "create", name, *options]
    out = subprocess.run(flask, cwd=repo, env=env, check=True, capture_output=True,
                         text=True, timeout=60).stdout
    return next(line for line in out.splitlines() if line.startswith("sk_"))


class Caller:
    """One kept-alive connection and the key it sends; times each request in microseconds."""

    def __init__(self, port, key):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
        self.times, self.sent = [], 0

    def request(self, method, path, record=True):
        body = None
        if method == "POST":
            self.sent += 1
            body = json.dumps({"to": f"+1555{secrets.randbelow(10**7):07d}", "body": "Hi"})
        try:
            started = time.perf_counter()
            self.conn.request(method, path, body, self.headers)
            answer = self.conn.getresponse()
        except (ConnectionError, http.client.RemoteDisconnected):
            # gunicorn closed it, idle past its keep-alive: again on a new one, not timed.
            self.conn.close()
            self.conn.connect()
            self.request(method, path, record=False)
            return self.request(method, path, record)
        answer.read()
        elapsed = (time.perf_counter() - started) * 1e6
        if answer.status != 200:
            raise SystemExit(f"{method} {path} answered {answer.status}")
        if record:
            self.times.append(elapsed)


def measure(args, processes, database):
    port, api_key = free_port(), secrets.token_urlsafe(24)
    env = service_env(port, database, TWILIO_SIMULATE="true", TWILIO_SIMULATE_LATENCY_MS=0,
                      API_KEY=api_key, MAX_SENDS_PER_HOUR=0,
                      MAX_SENDS_PER_RECIPIENT_PER_HOUR=0)
    processes.start_server("service", procfile_command(args.repo), args.repo, env,
                           f"http://127.0.0.1:{port}/healthz")
    named = create_key(args.repo, env, "bench", "--scope", "send", "--scope", "read")
    limited = create_key(args.repo, env, "bench-limited", "--max-sends-per-hour", "1000000")
    print(f"\n{'SQLite' if database.startswith('sqlite') else 'PostgreSQL'}: "
          f"{args.requests} requests per key, medians in microseconds")
    print(f"{'':16}{'API_KEY':>10}{'named key':>11}{'extra':>8}{'with a limit':>14}{'extra':>8}")
    failures = []
    for method, path in (("POST", "/send-sms"), ("GET", "/messages?limit=50")):
        callers = [Caller(port, key) for key in (api_key, named, limited)]
        for caller in callers:
            for _ in range(WARM_UP):
                caller.request(method, path, record=False)
        for n in range(args.requests):
            # Each in turn first, so that neither always meets a warmer cache.
            for caller in callers[n % 3:] + callers[:n % 3]:
                caller.request(method, path)
        base, key, capped = (median(caller.times) for caller in callers)
        extra, capped_extra = key / base - 1, capped / base - 1
        print(f"{method + ' ' + path.split('?')[0]:16}{base:10.0f}{key:11.0f}"
              f"{extra:+8.1%}{capped:14.0f}{capped_extra:+8.1%}")
        if extra > MAX_EXTRA and not args.smoke:
            failures.append(f"a named key cost {method} {path} {extra:+.1%}")
    return failures


def run(args, workdir, processes):
    print(machine_summary())
    postgres = PostgresDatabases(args)
    try:
        failures = measure(args, processes, f"sqlite:///{workdir / 'service.db'}")
        if postgres:
            failures += measure(args, processes, postgres.new())
        return failures
    finally:
        postgres.close()


if __name__ == "__main__":
    run_benchmark("bench-keys-", parse_args(), run)
