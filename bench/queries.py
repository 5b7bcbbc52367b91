"""Benchmark of GET /messages and GET /stats at scale: `python bench/queries.py [--smoke]`.

Fills a fresh database with --messages messages (default 1,000,000) created over the last
30 days, each with its status events (mostly delivered; some undelivered, failed, or
still sent or queued; a few thousand recipients), then starts the service as the
Procfile does (gunicorn with the repository's gunicorn.conf.py) on a free 127.0.0.1 port
and measures, one request at a time over a kept-alive connection:

- /messages?to=<a recipient> (alone, with a status, with an error code), an unfiltered first
  page, and page 50 reached by cursor;
- /stats over the last 24 hours and over 30 days;
- the dashboard, side by side with them, logged in with its session cookie: the overview of
  24 hours and of 30 days, the search by recipient, its first page, and a message's page.

Targets: every /messages query p99 < 20 ms, /stats 24 h < 200 ms, /stats 30 days < 2 s;
the dashboard's overview of 24 hours p99 < 300 ms, of 30 days < 2 s, a search page p99
< 50 ms.

Then it measures status-callback ingestion (bench/webhooks.py's pre-signed callbacks,
fired with wrk) side by side on two copies of the filled database, one with the indexes
of GET /messages and /stats and one without, in interleaved rounds: the indexes must not
cost more than 5% of the callbacks per second (--queries-only leaves this out).

Exits non-zero on any answer other than 200 or a lost callback; timings never fail it.
"""

import http.client
import json
import random
import secrets
import shutil
import sqlite3
import sys
import time
from datetime import datetime, timedelta, timezone
from urllib.parse import quote, urlencode

import webhooks
from common import (
    ACCOUNT_SID,
    BENCH,
    SENDER,
    PostgresDatabases,
    argument_parser,
    count_rows,
    live_settings,
    machine_summary,
    median,
    ms,
    parse_bench_args,
    percentile,
    run_benchmark,
    run_wrk,
    service_env,
    settled_count,
    verdict,
)

from support import free_port, procfile_command

DAYS = 30
RECIPIENTS = 5000
BATCH = 50_000
# The indexes migration 6 added for these queries; the "without" copy drops them.
QUERY_INDEXES = ("messages_by_creation", "messages_by_recipient_and_creation",
                 "messages_by_status_and_creation", "messages_by_error_and_creation")
# (share of messages, the statuses after queued, error code choices)
OUTCOMES = [
    (0.86, ("sent", "delivered"), [None]),
    (0.06, ("sent", "undelivered"), [30003, 30003, 30005, 30006, 30007, 30007, 30008]),
    (0.03, ("failed",), [30007, 30008, 21610, 21211, 30034]),
    (0.04, ("sent",), [None]),
    (0.01, (), [None]),
]


def parse_args():
    parser = argument_parser(__doc__.split("\n\n")[0], 32,
                             "keep-alive connections of the ingestion measurement")
    parser.add_argument("--messages", type=int, default=1_000_000,
                        help="messages to fill the database with")
    parser.add_argument("--requests", type=int, default=200,
                        help="requests per /messages query and search page (/stats and "
                             "the 30-day overview: a tenth, at least 3; the 24-hour "
                             "overview: a quarter)")
    parser.add_argument("--queries-only", action="store_true",
                        help="measure the queries and pages only, not the ingestion")
    args = parse_bench_args(parser)
    if args.smoke:
        args.messages, args.requests = min(args.messages, 3000), 10
    return args


def open_database(repo, database_url):
    """The service's own engine for `database_url`, its schema created or migrated."""
    sys.path.insert(0, str(repo))
    from sms_status.storage import open_engine  # the service's own schema and migrations

    engine = open_engine(database_url, pool_size=1)
    engine.migrate()
    return engine


MESSAGE_COLUMNS = ("sid", "account_sid", "to_number", "from_number", "initial_status",
                   "latest_status", "error_code", "created_at", "updated_at", "sent_at",
                   "seconds_to_delivered", "storage_order")
EVENT_COLUMNS = ("message_sid", "status", "error_code", "received_at")


def fill(engine, count, now, seed=10):
    """Stores `count` messages with their status events, in bulk, straight into the
    service's tables (executemany on SQLite, COPY on PostgreSQL). Returns the recipients."""
    rng = random.Random(seed)
    recipients = [f"+1555{n:07d}" for n in range(RECIPIENTS)]
    weights = [share for share, _, _ in OUTCOMES]
    start = now - timedelta(days=DAYS)
    span_ms = DAYS * 86400 * 1000
    for first in range(0, count, BATCH):
        messages, events = [], []
        for n in range(first, min(first + BATCH, count)):
            # Evenly spread over the 30 days, oldest first, with a little jitter.
            created = start + timedelta(milliseconds=n * span_ms // count
                                        + rng.randrange(1000))
            _, statuses, codes = rng.choices(OUTCOMES, weights)[0]
            code = rng.choice(codes) if statuses and statuses[-1] in (
                "undelivered", "failed") else None
            sid = f"SMf{n:031x}"  # never one of webhooks.write_pool's SIDs
            at, to_delivered = created, None
            events.append((sid, "queued", None, iso(at)))
            for status in statuses:
                at += timedelta(milliseconds=rng.randrange(200, 8000))
                events.append((sid, status, code if status == statuses[-1] else None,
                               iso(at)))
                if status == "delivered":  # as the service records it with the event
                    to_delivered = (at - created).total_seconds()
            latest = statuses[-1] if statuses else "queued"
            messages.append((sid, ACCOUNT_SID, rng.choice(recipients),
                             SENDER, "queued", latest, code, iso(created),
                             iso(at), iso(created), to_delivered, n + 1))
        bulk_insert(engine, "messages", MESSAGE_COLUMNS, messages)
        bulk_insert(engine, "status_events", EVENT_COLUMNS, events)
    if engine.name == "postgres" and count:  # new messages are numbered after these
        with engine.transaction() as tx:
            tx.execute("SELECT setval('messages_storage_order', ?)", (count,))
    return recipients


def bulk_insert(engine, table, columns, rows):
    """One transaction of many rows (executemany on SQLite, COPY on PostgreSQL)."""
    with engine.transaction() as tx:
        if engine.name == "sqlite":
            tx.executemany(f"INSERT INTO {table} ({', '.join(columns)})"
                           f" VALUES ({', '.join('?' for _ in columns)})", rows)
            return
        with tx.conn.cursor().copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)


def iso(moment):
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class Client:
    """GET requests on one kept-alive connection, timed, with `headers` (the API key, or
    the dashboard's session cookie)."""

    def __init__(self, port, headers):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.headers = headers

    def get(self, path):
        """(seconds, status, body)."""
        started = time.perf_counter()
        self.conn.request("GET", path, headers=self.headers)
        answer = self.conn.getresponse()
        body = answer.read()
        return time.perf_counter() - started, answer.status, body

    def close(self):
        self.conn.close()


def dashboard_session(port, api_key):
    """The dashboard's session cookie, from its login form."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", "/dashboard/login", body=urlencode({"api_key": api_key}),
                     headers={"Content-Type": "application/x-www-form-urlencoded"})
        answer = conn.getresponse()
        answer.read()
        cookie = answer.getheader("Set-Cookie") or ""
        if answer.status != 303 or not cookie:
            raise RuntimeError(f"the dashboard's login answered {answer.status}")
        return cookie.split(";")[0]
    finally:
        conn.close()


def measure(client, name, paths, failures):
    """Requests each path in turn; prints p50/p99/max of the answer times in ms."""
    times = []
    for path in paths:
        seconds, status, body = client.get(path)
        if status != 200:
            failures.append(f"{name}: {status} {body[:200]!r}")
            return None
        times.append(seconds * 1e6)
    figures = {k: percentile(times, p) for k, p in (("p50", 50), ("p99", 99), ("max", 100))}
    print(f"  {name:<28} {len(times):5d} requests  p50 {ms(figures['p50']):>7}  "
          f"p99 {ms(figures['p99']):>7}  max {ms(figures['max']):>7} ms")
    figures["answer"] = json.loads(body) if body.startswith(b"{") else None
    return figures


def query_figures(client, args, recipients, now, failures):
    rng = random.Random(1)
    n = args.requests
    stats_n = max(3, n // 10)
    results = {}
    results["messages?to"] = measure(
        client, "/messages?to=<recipient>",
        [f"/messages?to={quote(rng.choice(recipients))}" for _ in range(n)], failures)
    # A recipient's messages of one status, or with one error: the planner must pick the
    # recipient's few messages, not every message of that status or error.
    results["messages?to&status"] = measure(
        client, "/messages?to=<recipient>&status=delivered",
        [f"/messages?to={quote(rng.choice(recipients))}&status=delivered" for _ in range(n)],
        failures)
    results["messages?to&errorCode"] = measure(
        client, "/messages?to=<recipient>&errorCode=30003",
        [f"/messages?to={quote(rng.choice(recipients))}&errorCode=30003" for _ in range(n)],
        failures)
    results["messages first page"] = measure(client, "/messages (first page)",
                                             ["/messages"] * n, failures)
    # Page 50 of 50 messages: follow the cursors there once, then ask for it repeatedly.
    path, page = "/messages", 1
    while page < 50:
        _, status, body = client.get(path)
        cursor = json.loads(body).get("nextCursor") if status == 200 else None
        if cursor is None:
            break
        path, page = f"/messages?cursor={cursor}", page + 1
    results["messages page 50"] = measure(client, f"/messages (page {page}, by cursor)",
                                          [path] * n, failures)
    results["stats 24h"] = measure(client, "/stats (24 hours)", ["/stats"] * stats_n, failures)
    since = quote(iso(now - timedelta(days=DAYS)))
    results["stats 30d"] = measure(client, "/stats (30 days)", [f"/stats?since={since}"]
                                   * stats_n, failures)
    return results


def page_figures(client, args, recipients, sid, failures):
    """The dashboard's pages, timed as the API's queries are."""
    rng = random.Random(1)
    n = args.requests
    results = {}
    results["search ?to"] = measure(
        client, "/dashboard/messages?to=...",
        [f"/dashboard/messages?to={quote(rng.choice(recipients))}" for _ in range(n)],
        failures)
    results["search first page"] = measure(client, "/dashboard/messages",
                                           ["/dashboard/messages"] * n, failures)
    results["message page"] = measure(client, "/dashboard/messages/<sid>",
                                      [f"/dashboard/messages/{sid}"] * n, failures)
    results["overview 24h"] = measure(client, "/dashboard?window=24h",
                                      ["/dashboard?window=24h"] * max(3, n // 4), failures)
    results["overview 30d"] = measure(client, "/dashboard?window=30d",
                                      ["/dashboard?window=30d"] * max(3, n // 10), failures)
    return results


def main():
    run_benchmark("bench-queries-", parse_args(), run)


def run(args, workdir, processes):
    """On a fresh SQLite file, or a fresh PostgreSQL database with --postgres/--database-url."""
    with PostgresDatabases(args) as postgres:
        return measure_on(args, workdir, processes, postgres.fresh(workdir / "queries.db"))


def measure_on(args, workdir, processes, database_url):
    failures = []
    print(machine_summary())
    now = datetime.now(timezone.utc)
    started = time.perf_counter()
    engine = open_database(args.repo, database_url)
    recipients = fill(engine, args.messages, now)
    if engine.name == "postgres":
        with engine.transaction() as tx:
            tx.execute("ANALYZE")  # what autovacuum would do by itself a little later
    events = engine.query("SELECT count(*) AS n FROM status_events")[0]["n"]
    engine.close()
    print(f"filled {args.messages} messages and {events} status events over {DAYS} days "
          f"in {time.perf_counter() - started:.1f} s")

    port, bare_port = free_port(), free_port()
    base_url = f"http://127.0.0.1:{port}"
    api_key = secrets.token_urlsafe(24)
    settings = live_settings(base_url, api_key)  # both check signatures for this URL
    service = processes.start_server(
        "service", procfile_command(args.repo), args.repo,
        service_env(port, None, DATABASE_URL=database_url, **settings), base_url + "/healthz")

    print(f"\nqueries, one at a time over a kept-alive connection ({args.messages} messages):")
    client = Client(port, {"Authorization": f"Bearer {api_key}"})
    try:
        results = query_figures(client, args, recipients, now, failures)
        sid = results["messages first page"]["answer"]["messages"][0]["sid"]
    finally:
        client.close()
    print("the dashboard's pages, the same way, with its session cookie:")
    client = Client(port, {"Cookie": dashboard_session(port, api_key)})
    try:
        results.update(page_figures(client, args, recipients, sid, failures))
    finally:
        client.close()
    if not failures:
        report_targets(results)

    if args.queries_only:
        return failures
    if engine.name != "sqlite":
        print("\n(the ingestion comparison with and without the query indexes runs on SQLite)")
        return failures
    # A copy without the query indexes, for the ingestion comparison.
    path = engine.path
    bare = workdir / "without-query-indexes.db"
    shutil.copyfile(path, bare)
    with sqlite3.connect(bare) as conn:
        for index in QUERY_INDEXES:
            conn.execute(f"DROP INDEX {index}")
    bare_service = processes.start_server(
        "service-without-indexes", procfile_command(args.repo), args.repo,
        service_env(bare_port, bare, **settings), f"http://127.0.0.1:{bare_port}/healthz")
    failures += ingestion(args, workdir, {"with query indexes": (service, port, path),
                                          "without": (bare_service, bare_port, bare)})
    return failures


def report_targets(results):
    worst = max(results[name]["p99"] for name in results if name.startswith("messages"))
    worst_page = max(results[name]["p99"] for name in ("search ?to", "search first page",
                                                       "message page"))
    overview_24h, overview_30d = results["overview 24h"]["p99"], results["overview 30d"]["max"]
    stats_24h, stats_30d = results["stats 24h"]["max"], results["stats 30d"]["max"]
    print(f"\n/messages p99, worst query = {worst / 1000:7.1f} ms  "
          f"(target < 20 ms: {verdict(worst < 20_000)})")
    print(f"/stats 24 hours, slowest   = {stats_24h / 1000:7.1f} ms  "
          f"(target < 200 ms: {verdict(stats_24h < 200_000)})")
    print(f"/stats 30 days, slowest    = {stats_30d / 1000:7.1f} ms  "
          f"(target < 2000 ms: {verdict(stats_30d < 2_000_000)})")
    print(f"dashboard search and message pages p99, worst = {worst_page / 1000:7.1f} ms  "
          f"(target < 50 ms: {verdict(worst_page < 50_000)})")
    print(f"dashboard overview 24 hours p99 = {overview_24h / 1000:7.1f} ms  "
          f"(target < 300 ms: {verdict(overview_24h < 300_000)})")
    print(f"dashboard overview 30 days, slowest = {overview_30d / 1000:7.1f} ms  "
          f"(target < 2000 ms: {verdict(overview_30d < 2_000_000)})")
    answer = results["stats 30d"]["answer"]
    print(f"(30 days: {answer['total']} messages, delivery rate {answer['deliveryRate']:.3f}, "
          f"time to delivered {answer['timeToDeliveredSeconds']}, {answer['stuck']} stuck)")


def ingestion(args, workdir, services):
    """Interleaved wrk rounds of distinct signed callbacks against each service."""
    failures = []
    print(f"\ncallback ingestion, wrk, {args.connections} connections, {args.duration} s, "
          f"{args.rounds} interleaved rounds:")
    base_url = f"http://127.0.0.1:{services['with query indexes'][1]}"
    rates = {name: [] for name in services}
    for r in range(args.rounds):
        pool = workdir / f"pool-{r}.tsv"
        webhooks.write_pool(pool, r, webhooks.POOL_RATE * args.duration,
                            base_url + "/message-status")
        order = list(services) if r % 2 == 0 else list(services)[::-1]
        for name in order:
            server, port, database = services[name]
            before = count_rows(database)
            result = run_wrk(f"http://127.0.0.1:{port}", BENCH / "callbacks.lua",
                             [pool, min(2, args.connections)], args.connections,
                             args.duration, threads=min(2, args.connections))[0]
            failures += webhooks.check_run(name, result)
            stored = settled_count(database) - before
            if stored < result["acked"]:
                failures.append(f"{name}: {result['acked'] - stored} acknowledged callbacks "
                                f"missing")
            rates[name].append(webhooks.rate(result))
            print(f"  round {r + 1} {name:<20} {rates[name][-1]:7.0f}/s  "
                  f"p50 {ms(result['p50_us']):>6}  p99 {ms(result['p99_us']):>6} ms")
    with_indexes, without = (median(rates[name]) for name in services)
    print(f"\nmedian callbacks/s: with query indexes {with_indexes:.0f}, without {without:.0f}:"
          f" {with_indexes / without:.3f} of it (target >= 0.95: "
          f"{verdict(with_indexes >= 0.95 * without)})")
    return failures


if __name__ == "__main__":
    main()
