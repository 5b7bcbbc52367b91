"""What a named API key costs a request, against API_KEY: `python bench/keys.py [--smoke]`.

Starts the service as the Procfile does, simulating Twilio with no latency and with the
hourly limits too high to be reached, creates named keys with `flask --app app keys
create`, then times POST /send-sms and GET /messages side by side: each round sends one
request with API_KEY, one with a named key and one with a named key that has an hourly
limit of its own (whose count is a send's extra work), in turn first, each on a
new connection, so that all see the same machine at the same moment.
It prints each one's median and the median of each round's ratio to API_KEY, and first
the in-process cost of each check without HTTP.

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
    verdict,
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
    """Requests with one key, each on a new connection (so that each lands on either worker,
    as the others' do, and no key keeps a worker of its own), timed in microseconds."""

    def __init__(self, port, key):
        self.port = port
        self.headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}",
                        "Connection": "close"}
        self.times = []

    def request(self, method, path, record=True):
        body = None
        if method == "POST":
            body = json.dumps({"to": f"+1555{secrets.randbelow(10**7):07d}", "body": "Hi"})
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            started = time.perf_counter()
            conn.request(method, path, body, self.headers)
            answer = conn.getresponse()
            answer.read()
            elapsed = (time.perf_counter() - started) * 1e6
        finally:
            conn.close()
        if answer.status != 200:
            raise SystemExit(f"{method} {path} answered {answer.status}")
        if record:
            self.times.append(elapsed)


def in_process_costs(rounds=200_000):
    """Microseconds one check takes in this process, without HTTP: API_KEY's constant-time
    comparison, and a named key found in the ring's copy (its SHA-256 and a lookup)."""
    import timeit

    from sms_status.api_keys import Key, KeyRing, digest

    setting, named = secrets.token_urlsafe(32), "sk_" + secrets.token_urlsafe(32)
    ring = KeyRing(setting, cache_seconds=3600)
    ring.by_digest[digest(named)] = (Key("bench", frozenset({"read"}), None,
                                         "9999-12-31T00:00:00.000Z"), ring.monotonic())
    ring.marked["bench"] = float("inf")
    costs = []
    for text in (setting, named):
        seconds = min(timeit.repeat(lambda text=text: ring.key_for(None, text, 0.0),
                                    number=rounds, repeat=5))
        costs.append(seconds / rounds * 1e6)
    return costs


def measure(args, processes, database):
    port, api_key = free_port(), secrets.token_urlsafe(24)
    # The service's hourly limits on, as by default, but never reached: every send takes
    # its place under them, and a key's own limit adds only its own count.
    env = service_env(port, database, TWILIO_SIMULATE="true", TWILIO_SIMULATE_LATENCY_MS=0,
                      API_KEY=api_key, MAX_SENDS_PER_HOUR=10**9,
                      MAX_SENDS_PER_RECIPIENT_PER_HOUR=10**9)
    processes.start_server("service", procfile_command(args.repo), args.repo, env,
                           f"http://127.0.0.1:{port}/healthz")
    named = create_key(args.repo, env, "bench", "--scope", "send", "--scope", "read")
    limited = create_key(args.repo, env, "bench-limited", "--max-sends-per-hour", "1000000")
    print(f"\n{'SQLite' if database.startswith('sqlite') else 'PostgreSQL'}: "
          f"{args.requests} requests per key, medians in microseconds")
    print(f"{'':16}{'API_KEY':>10}{'named key':>11}{'extra':>8}{'with a limit':>14}{'extra':>8}"
          f"   (extra: the median of each round's ratio; at most {MAX_EXTRA:.0%} wanted)")
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
        # Each round's ratio to API_KEY's request of the same round: the machine's drift
        # between rounds cancels out.
        extra, capped_extra = (median([t / b for t, b in zip(caller.times, callers[0].times,
                                                              strict=True)]) - 1
                               for caller in callers[1:])
        print(f"{method + ' ' + path.split('?')[0]:16}{base:10.0f}{key:11.0f}"
              f"{extra:+8.1%}{capped:14.0f}{capped_extra:+8.1%}   "
              f"{verdict(extra <= MAX_EXTRA)}")
    return failures


def run(args, workdir, processes):
    print(machine_summary())
    setting, named = in_process_costs(20_000 if args.smoke else 200_000)
    print(f"in process, without HTTP: API_KEY {setting:.2f} us, a named key found in the "
          f"process's copy {named:.2f} us")
    with PostgresDatabases(args) as postgres:
        failures = measure(args, processes, f"sqlite:///{workdir / 'service.db'}")
        if postgres:
            failures += measure(args, processes, postgres.new())
        return failures


if __name__ == "__main__":
    run_benchmark("bench-keys-", parse_args(), run)
