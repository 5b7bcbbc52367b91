"""Benchmark of POST /send-sms with Twilio answering in 250 ms: `python bench/sends.py [--smoke]`.

Starts the service as the Procfile does (gunicorn with the repository's gunicorn.conf.py)
on a free 127.0.0.1 port with a fresh database and TWILIO_SIMULATE=true, so every Twilio
API call is answered by the local simulator after TWILIO_SIMULATE_LATENCY_MS (250 ms, the
order of Twilio's real API) and its signed status callbacks (sent, delivered) come back
to the service over HTTP, as Twilio's would.

It first fires a burst of workers x threads sends at once (the in-flight capacity: a
send holds a thread while Twilio answers) and reports how long they took. Then wrk keeps
--connections callers sending (each its own recipient) for --duration seconds per round,
while /healthz is polled every 100 ms. Afterwards every SID answered with a 200 must be
stored exactly once with its three statuses; the benchmark exits non-zero otherwise,
and on any 5xx.
"""

import http.client
import json
import secrets
import threading
import time

from common import (
    BENCH,
    PostgresDatabases,
    argument_parser,
    cpu_seconds,
    database_rows,
    gunicorn_settings,
    machine_summary,
    median,
    ms,
    parse_bench_args,
    percentile,
    run_benchmark,
    run_wrk,
    service_env,
    service_summary,
    verdict,
)

from support import free_port, procfile_command

HEALTH_INTERVAL = 0.1
SETTLE_LIMIT = 30  # seconds to wait for the last status callbacks of a round


def parse_args():
    parser = argument_parser(__doc__.split("\n\n")[0], 64, "concurrent callers")
    parser.add_argument("--latency-ms", type=int, default=250, help="simulated Twilio latency")
    return parse_bench_args(parser)


def post_send(port, api_key, to, timeout=30):
    """One POST /send-sms on a new connection: (status, seconds, SID or None)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    started = time.perf_counter()
    try:
        conn.request("POST", "/send-sms", json.dumps({"to": to, "body": "Burst message"}),
                     {"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"})
        answer = conn.getresponse()
        body = answer.read()
        sid = json.loads(body).get("messageSid") if answer.status == 200 else None
        return answer.status, time.perf_counter() - started, sid
    finally:
        conn.close()


def burst(port, api_key, count):
    """`count` sends started at the same moment; returns their (status, seconds, SID)."""
    results = [None] * count
    gate = threading.Barrier(count)

    def one(i):
        gate.wait()
        results[i] = post_send(port, api_key, f"+1555990{i:06d}")

    workers = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    return [r for r in results if r is not None]


class HealthPoller(threading.Thread):
    """GET /healthz on a new connection every 100 ms until stopped; keeps (status, seconds)."""

    def __init__(self, port):
        super().__init__(daemon=True)
        self.port, self.samples, self.stopped = port, [], threading.Event()

    def run(self):
        while not self.stopped.wait(HEALTH_INTERVAL):
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            started = time.perf_counter()
            try:
                conn.request("GET", "/healthz")
                status = conn.getresponse().status
            except OSError:
                status = 0
            finally:
                conn.close()
            self.samples.append((status, time.perf_counter() - started))


def stored(database):
    """{sid: number of status events} for every message stored as sent by this service."""
    return dict(database_rows(
        database, "SELECT m.sid, count(e.id) FROM messages m LEFT JOIN status_events e"
        " ON e.message_sid = m.sid WHERE m.sent_at IS NOT NULL GROUP BY m.sid"))


def settle(database):
    """Waits until every stored message has its three statuses (or SETTLE_LIMIT passed)."""
    deadline = time.monotonic() + SETTLE_LIMIT
    while time.monotonic() < deadline:
        if all(events >= 3 for events in stored(database).values()):
            return
        time.sleep(0.25)


def main():
    run_benchmark("bench-sends-", parse_args(), run)


def run(args, workdir, processes):
    """On a fresh SQLite file, or a fresh PostgreSQL database with --postgres/--database-url."""
    with PostgresDatabases(args) as postgres:
        return measure(args, processes, postgres.fresh(workdir / "service.db"))


def measure(args, processes, database):
    port, api_key = free_port(), secrets.token_urlsafe(24)
    # Thousands of sends a round: the service-wide hourly limit would refuse most of them.
    env = service_env(port, database, TWILIO_SIMULATE="true",
                      TWILIO_SIMULATE_LATENCY_MS=args.latency_ms, API_KEY=api_key,
                      MAX_SENDS_PER_HOUR=0)
    g = gunicorn_settings(args.repo, env)
    capacity = g["workers"] * g["threads"]
    latency = args.latency_ms / 1000
    print(machine_summary())
    print(f"{service_summary(args.repo, g)}, simulated Twilio latency {args.latency_ms} ms, "
          f"{'SQLite' if database.startswith('sqlite') else 'PostgreSQL'}")
    print(f"load: wrk, {args.connections} concurrent callers, {args.duration} s per round, "
          f"{args.rounds} rounds; /healthz polled every {HEALTH_INTERVAL * 1000:.0f} ms")
    service = processes.start_server("service", procfile_command(args.repo), args.repo, env,
                                     f"http://127.0.0.1:{port}/healthz")
    failures, answered = [], []

    # A send that waits for a free thread waits out another send's Twilio call first.
    probe = burst(port, api_key, min(capacity, 128))
    answered += [sid for status, _, sid in probe if status == 200]
    seconds = [s for _, s, _ in probe]
    print(f"\nin-flight capacity: {g['workers']} workers x {g['threads']} threads = {capacity}"
          f" sends at once (at most {capacity / latency:.0f} sends/s at {args.latency_ms} ms)."
          f"\nburst of {len(probe)} sends at once: p50 {percentile(seconds, 50) * 1000:.0f} ms, "
          f"slowest {max(seconds) * 1000:.0f} ms, {sum(1 for s in seconds if s < 2 * latency)} "
          f"within {2 * latency * 1000:.0f} ms; {sum(1 for s, _, _ in probe if s >= 500)} 5xx\n")
    failures += [f"burst: {s} answer" for s, _, _ in probe if s >= 500][:1]
    settle(database)

    runs, health = [], []
    for r in range(args.rounds):
        poller = HealthPoller(port)
        poller.start()
        cpu = cpu_seconds(service)
        try:
            result, lines = run_wrk(f"http://127.0.0.1:{port}", BENCH / "sends.lua",
                                    [api_key, r + 1], args.connections, args.duration)
        finally:
            poller.stopped.set()
            poller.join(15)
        if service.poll() is not None:
            raise SystemExit(f"FAILED: the service stopped during the run; see {service.log_path}")
        cores = (cpu_seconds(service) - cpu) / (result["duration_us"] / 1e6)
        runs.append(result)
        answered += [line[4:] for line in lines if line.startswith("SID ")]
        samples = [seconds for _, seconds in poller.samples]
        health.append(samples)
        sick = sum(1 for status, _ in poller.samples if status != 200)
        rate = result["ok"] / (result["duration_us"] / 1e6)
        print(f"round {r + 1}: {rate:6.1f} sends/s  p50 {ms(result['p50_us'])}  p90 "
              f"{ms(result['p90_us'])}  p99 {ms(result['p99_us'])}  max {ms(result['max_us'])} ms"
              f"  in flight {rate * result['mean_us'] / 1e6:.0f}  {cores:.2f} cores"
              f"  4xx {result['client_errors']}"
              f"  5xx {result['server_errors']}  socket errors {result['socket_errors']}  "
              f"timeouts {result['timeouts']} | /healthz p50 {percentile(samples, 50) * 1000:.1f}"
              f"  p99 {percentile(samples, 99) * 1000:.1f}  max {max(samples) * 1000:.1f} ms, "
              f"{len(samples)} polls, {sick} not 200")
        if result["server_errors"] or result["client_errors"] or sick:
            failures.append(f"round {r + 1}: {result['server_errors']} 5xx, "
                            f"{result['client_errors']} 4xx, {sick} failed health checks")
        settle(database)

    failures += verify(answered, stored(database))
    rates = [r["ok"] / (r["duration_us"] / 1e6) for r in runs]
    p99 = median([r["p99_us"] for r in runs]) / 1e6
    health_max = median([max(samples) for samples in health])
    print(f"\nmedians of {args.rounds} rounds: {median(rates):.1f} sends/s (target >= 100: "
          f"{verdict(median(rates) >= 100)}), p50 {median([r['p50_us'] for r in runs]) / 1e3:.0f}"
          f" ms, p99 {p99 * 1000:.0f} ms (target < 1000: {verdict(p99 < 1)}), /healthz p99 "
          f"{median([percentile(s, 99) for s in health]) * 1000:.1f} ms, max "
          f"{health_max * 1000:.1f} ms (target < 100: {verdict(health_max < 0.1)})")
    return failures


def verify(answered, messages):
    """Every SID answered with a 200 is stored once, with queued, sent and delivered."""
    distinct = set(answered)
    missing = distinct - messages.keys()
    incomplete = [sid for sid, events in messages.items() if events != 3]
    print(f"stored {len(messages)} sent messages for {len(answered)} answered sends "
          f"({len(distinct)} distinct SIDs; {len(messages.keys() - distinct)} finished after "
          f"their caller was cut off at the end of a round); missing {len(missing)}; "
          f"with other than 3 statuses: {len(incomplete)}")
    problems = []
    if len(distinct) != len(answered):
        problems.append(f"{len(answered) - len(distinct)} SIDs answered twice")
    if missing:
        problems.append(f"{len(missing)} answered sends not stored")
    if incomplete:
        problems.append(f"{len(incomplete)} messages without exactly 3 statuses")
    return problems


if __name__ == "__main__":
    main()
