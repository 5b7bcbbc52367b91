"""Benchmark of status webhooks: `python bench/webhook_events.py [--smoke] [--postgres]`.

Starts two instances of the service as the Procfile does (gunicorn with the repository's
gunicorn.conf.py, live mode, made-up credentials, fresh databases): one with status
webhooks on, sending to a local receiver (bench/webhook_receiver.py, a process of its own
that verifies every signature and notes when each event arrived), and one with them off
(STATUS_WEBHOOK_URL unset). Each round fires the same pre-signed status callbacks
(bench/webhooks.py's lifecycle load: queued, sent, then delivered or undelivered) with wrk
at each instance in turn, on then off or off then on, alternately. Beside wrk, a paced
Python probe posts a few callbacks a second of its own and notes when each got its 200.
After the load on the instance with webhooks, the benchmark waits for its outbox to drain.
Then a paced run: a Python client posts --paced-rate callbacks a second to it alone.

Reported, each round and as medians: callbacks stored per second, on and off, and the
median of the rounds' ratios; events delivered per second during the load; the time from
a callback's 200 to its event's arrival (the probe's callbacks), and from each event's
recording (inside the transaction, so before its 200) to its arrival, for every event;
the backlog of pending events when the load stops and how long it takes to drain; p50
and p99 from 200 to arrival at the paced rate; and what grows: the WAL, the pending
events, the service's memory (RSS of its master, workers and writer process).

Exits non-zero when an event is lost (a status change stored but its event never
delivered, or an acknowledged callback of the probe or the paced run never arriving), an
event arrives with a bad signature, the instance with webhooks off records events, an
acknowledged callback is not stored, the backlog does not drain, or any 5xx answer.
"""

import base64
import secrets
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import requests
from common import (
    BENCH,
    PostgresDatabases,
    argument_parser,
    cpu_seconds,
    database_rows,
    gunicorn_settings,
    live_settings,
    machine_summary,
    median,
    parse_bench_args,
    percentile,
    require_wrk,
    rss_mib,
    run_benchmark,
    run_wrk,
    service_env,
    service_summary,
    settled_count,
    verdict,
)
from webhooks import POOL_RATE, check_run, signed_callbacks, write_pool

from sms_status.storage.times import timestamp_of
from support import free_port, procfile_command

PROBE_RATE = 20  # the probe's callbacks per second, beside wrk's load
PROBE_THREADS = 4
PACED_THREADS = 16
# Targets on the 2-core machine of docs/performance.md.
TARGET_RATIO = 0.8  # callbacks stored per second, webhooks on / off
TARGET_DELIVERED = 500  # events delivered per second at full load
TARGET_PACED_P99 = 1.0  # seconds from a callback's 200 to its event's arrival, paced
SAMPLE_SECONDS = 0.5  # how often what grows is looked at


def parse_args():
    parser = argument_parser(__doc__.split("\n\n")[0], 32, "wrk's keep-alive connections")
    parser.set_defaults(duration=30)
    parser.add_argument("--compare", type=Path, metavar="REPO",
                        help="another checkout of the service (an older commit, say), with "
                             "webhooks on, on SQLite, measured in the same rounds")
    parser.add_argument("--paced-rate", type=int, default=200,
                        help="callbacks per second of the paced run (default 200)")
    parser.add_argument("--paced-duration", type=int, default=20,
                        help="seconds of the paced run, each round (default 20)")
    parser.add_argument("--drain-limit", type=int, default=300,
                        help="seconds to wait for the backlog to drain (default 300)")
    args = parse_bench_args(parser)
    if args.smoke:
        args.paced_duration = 2
    return args


def main():
    args = parse_args()
    require_wrk()
    run_benchmark("bench-webhook-events-", args, run)


def run(args, workdir, processes):
    with PostgresDatabases(args) as postgres:
        return measure(args, workdir, processes, postgres)


# --- the instances, the receiver and what they hold ----------------------------------------

class Instance:
    """One running service: its process, URL and database; `events` says whether it sends
    status webhooks (then to `path` of the receiver). `group` names what it measures: the
    service on an engine, or the compared checkout."""

    def __init__(self, group, engine, events, process, port, database, path=None):
        self.group, self.engine, self.events = group, engine, events
        self.name = f"{group} {'on' if events else 'off'}"
        self.process, self.port, self.database, self.path = process, port, database, path
        self.url = f"http://127.0.0.1:{port}"

    def pending(self):
        return database_rows(self.database, "SELECT count(*) FROM webhook_events"
                                            " WHERE state = 'pending'")[0][0]

    def event_count(self):
        return database_rows(self.database, "SELECT count(*) FROM webhook_events")[0][0]

    def events_recorded(self):
        """{id: (state, recorded at, seconds since the epoch)} of every event."""
        rows = database_rows(self.database, "SELECT id, state, created_at FROM webhook_events")
        return {event_id: (state, timestamp_of(created)) for event_id, state, created in rows}

    def wal(self):
        return Path(self.database[len("sqlite:///"):] + "-wal") if self.engine == "sqlite" \
            else None


class Arrivals:
    """What the receiver noted, read from its output as it grows."""

    def __init__(self, path):
        self.path, self.offset = Path(path), 0
        self.by_id = defaultdict(dict)  # path -> webhook-id -> [arrival times]
        self.by_change = defaultdict(dict)  # path -> (sid, status) -> first arrival
        self.bad = []  # lines of events whose signature did not hold

    def read(self):
        with open(self.path, "rb") as output:
            output.seek(self.offset)
            chunk = output.read()
        chunk = chunk[:chunk.rfind(b"\n") + 1]  # whole lines only
        self.offset += len(chunk)
        for line in chunk.decode().splitlines():
            arrived, path, event_id, sid, status, verdict_ = line.split("\t")
            if verdict_ != "ok":
                self.bad.append(line)
                continue
            self.by_id[path].setdefault(event_id, []).append(float(arrived))
            self.by_change[path].setdefault((sid, status), float(arrived))

    def delivered_between(self, path, start, end):
        return sum(1 for times in self.by_id[path].values() if start <= times[0] < end)


class Growth:
    """Samples what grows, twice a second: each instance's RSS, each SQLite database's WAL,
    and the pending events of each instance with webhooks; keeps the peaks since reset()."""

    def __init__(self, instances):
        self.instances = instances
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.reset()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def reset(self):
        with self.lock:
            self.peaks = defaultdict(float)

    def peak(self, instance, what):
        with self.lock:
            return self.peaks[(instance.name, what)]

    def _sample(self):
        while not self.stopping.wait(SAMPLE_SECONDS):
            for instance in self.instances:
                sample = {"rss": rss_mib(instance.process)}
                if instance.wal() is not None and instance.wal().exists():
                    sample["wal"] = instance.wal().stat().st_size / 2**20
                if instance.events:
                    try:
                        sample["pending"] = instance.pending()
                    except Exception:  # a busy moment: the next sample counts
                        pass
                with self.lock:
                    for what, value in sample.items():
                        key = (instance.name, what)
                        self.peaks[key] = max(self.peaks[key], value)

    def stop(self):
        self.stopping.set()
        self.thread.join()


# --- the paced client ---------------------------------------------------------------------

class PacedClient:
    """Posts pre-signed callbacks at `rate` a second from a few threads, the n-th at its due
    time (start + n / rate, or at once when behind), and notes when each got its answer."""

    def __init__(self, url, callbacks, rate, threads):
        self.url = url + "/message-status"
        self.callbacks, self.rate, self.threads = list(callbacks), rate, threads
        self.answers = []  # (sid, status, HTTP status or error, duplicate, answered at)
        self.lateness = 0.0  # the most a callback left after its due time, in seconds
        self.lock = threading.Lock()
        self.next = 0
        self.workers = []

    def start(self):
        self.started = time.monotonic() + 0.05
        self.workers = [threading.Thread(target=self._post, daemon=True)
                        for _ in range(self.threads)]
        for worker in self.workers:
            worker.start()
        return self

    def join(self):
        for worker in self.workers:
            worker.join()
        return self

    def _post(self):
        session = requests.Session()
        while True:
            with self.lock:
                n, self.next = self.next, self.next + 1
            if n >= len(self.callbacks):
                return
            due = self.started + n / self.rate
            if due > time.monotonic():
                time.sleep(due - time.monotonic())
            late = time.monotonic() - due
            sid, status, signature, body = self.callbacks[n]
            try:
                answer = session.post(self.url, data=body, timeout=30, headers={
                    "Content-Type": "application/x-www-form-urlencoded",
                    "X-Twilio-Signature": signature})
                code = answer.status_code
                duplicate = code == 200 and answer.json().get("duplicate", False)
            except (requests.RequestException, ValueError) as error:
                code, duplicate = type(error).__name__, False
            answered = time.time()
            with self.lock:
                self.answers.append((sid, status, code, duplicate, answered))
                self.lateness = max(self.lateness, late)

    def acknowledged(self):
        """(sid, status, answered at) of each callback answered 200 as new."""
        return [(sid, status, at) for sid, status, code, duplicate, at in self.answers
                if code == 200 and not duplicate]

    def problems(self, name):
        others = [code for _, _, code, duplicate, _ in self.answers if code != 200 or duplicate]
        if others:
            return [f"{name}: {len(others)} callbacks not acknowledged as new "
                    f"(first: {others[:5]})"]
        return []


def paced_callbacks(round_no, rate, seconds, url):
    """rate x seconds callbacks, SIDs in blocks of `rate`: a message's statuses 1 s apart."""
    made = signed_callbacks(round_no, rate * seconds, url, sids_per_block=max(1, rate))
    return [next(made) for _ in range(rate * seconds)]


def arrival_delays(arrivals, instance, acknowledged):
    """Seconds from each acknowledged callback's 200 to its event's arrival, and the
    acknowledged callbacks whose event never arrived."""
    delays, missing = [], []
    arrived = arrivals.by_change[instance.path]
    for sid, status, answered in acknowledged:
        if (sid, status) in arrived:
            delays.append(arrived[(sid, status)] - answered)
        else:
            missing.append((sid, status))
    return delays, missing


# --- the measurements ---------------------------------------------------------------------

def measure(args, workdir, processes, postgres):
    first_port = free_port()
    base_url = f"http://127.0.0.1:{first_port}"
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    env = service_env(first_port, "", **live_settings(base_url))
    receiver_port = free_port()
    receiver_output = workdir / "arrivals.tsv"
    receiver_output.touch()
    receiver = processes.start_server(
        "receiver", [sys.executable, str(BENCH / "webhook_receiver.py"),
                     str(receiver_port), secret, str(receiver_output)],
        BENCH, {"PATH": env["PATH"]}, f"http://127.0.0.1:{receiver_port}/healthz")
    arrivals = Arrivals(receiver_output)

    # Each group: its checkout, its engine, and whether it has an instance with webhooks off
    # (the compared checkout's is set against this one's off instance).
    groups = {"sqlite": (args.repo, "sqlite", True)}
    if args.compare:
        groups["compared"] = (args.compare, "sqlite", False)
    if postgres:
        groups["postgres"] = (args.repo, "postgres", True)
    instances = {}  # group -> [its instance with webhooks on, and off]
    for group, (repo, engine, with_off) in groups.items():
        instances[group] = []
        for events in (True, False)[:2 if with_off else 1]:
            # The first instance's port is the one in BASE_URL, which every instance
            # checks signatures for: the same pre-signed callbacks serve them all.
            port = first_port if not instances["sqlite"] else free_port()
            name = f"{group}-{'on' if events else 'off'}"
            database = (f"sqlite:///{workdir / name}.db" if engine == "sqlite"
                        else postgres.new())
            path = f"/events/{group}" if events else None
            settings = dict(env, PORT=str(port), DATABASE_URL=database)
            if events:
                settings.update(STATUS_WEBHOOK_URL=f"http://127.0.0.1:{receiver_port}{path}",
                                STATUS_WEBHOOK_SECRET=secret)
            process = processes.start_server(name, procfile_command(repo), repo, settings,
                                             f"http://127.0.0.1:{port}/healthz")
            instances[group].append(Instance(group, engine, events, process, port, database,
                                             path))
    everyone = [instance for group in instances.values() for instance in group]

    gunicorn = gunicorn_settings(args.repo, dict(env, DATABASE_URL=everyone[0].database))
    print(machine_summary())
    print(f"{service_summary(args.repo, gunicorn)}, status webhooks on "
          f"(to bench/webhook_receiver.py, every signature verified) and off, on "
          f"{' and '.join(engine for _, engine, _ in groups.values())}")
    if args.compare:
        print(f"compared: the service in {args.compare}, webhooks on, on SQLite, in the same "
              "rounds (set against this one's instance with webhooks off)")
    if postgres:
        version = database_rows(instances["postgres"][0].database,
                                "SHOW server_version")[0][0]
        print(f"PostgreSQL {version}")
    print(f"load: wrk, {args.connections} keep-alive connections, {args.duration} s on each "
          f"instance, {args.rounds} rounds; a probe at {PROBE_RATE}/s beside it; then "
          f"{args.paced_rate}/s paced for {args.paced_duration} s on webhooks on")

    started = time.perf_counter()
    signed_url = base_url + "/message-status"
    pools = [workdir / f"pool-{r}.tsv" for r in range(args.rounds)]
    signed = sum(write_pool(pool, r, POOL_RATE * args.duration, signed_url)
                 for r, pool in enumerate(pools))
    probes = [paced_callbacks(0x40 + r, PROBE_RATE, args.duration, signed_url)
              for r in range(args.rounds)]
    paced = [paced_callbacks(0x80 + r, args.paced_rate, args.paced_duration, signed_url)
             for r in range(args.rounds)]
    print(f"pre-signed {signed} callbacks for wrk, {sum(map(len, probes))} for the probe, "
          f"{sum(map(len, paced))} for the paced runs in {time.perf_counter() - started:.1f} s")

    growth = Growth(everyone)
    bench = Bench(args, arrivals, receiver, growth)
    # Within an engine, webhooks on then off one round and off then on the next; the
    # compared checkout goes between them, next to this one's instance with webhooks on.
    sequences = [[instances["sqlite"][0], *instances.get("compared", []),
                  instances["sqlite"][1]]] + ([instances["postgres"]] if postgres else [])
    try:
        for r in range(args.rounds):
            print(f"\nround {r + 1} of {args.rounds}")
            for sequence in sequences:
                for instance in sequence if r % 2 == 0 else sequence[::-1]:
                    bench.load(instance, pools[r], probes[r])
            for group in instances.values():
                bench.paced(group[0], paced[r])
    finally:
        growth.stop()
    bench.final_checks(everyone)
    report(args, bench.results, list(instances))
    return bench.failures


class Bench:
    """The measurements of a run, their results and the failures found."""

    def __init__(self, args, arrivals, receiver, growth):
        self.args, self.arrivals, self.receiver, self.growth = args, arrivals, receiver, growth
        self.results = defaultdict(list)  # (instance name, "load" or "paced") -> [dict]
        self.acked = defaultdict(int)  # instance name -> callbacks acknowledged so far
        self.lost = set()  # events found lost so far
        self.failures = []

    def load(self, instance, pool, probe_callbacks):
        """wrk's full load and the probe on one instance; with webhooks, waits for the
        backlog to drain and checks that every event arrived."""
        args = self.args
        self.growth.reset()
        events_before = instance.event_count()
        started = time.time()
        cpu, receiver_cpu = cpu_seconds(instance.process), cpu_seconds(self.receiver)
        probe = PacedClient(instance.url, probe_callbacks, PROBE_RATE, PROBE_THREADS).start()
        result = run_wrk(instance.url, BENCH / "callbacks.lua", [pool, 2], args.connections,
                         args.duration, threads=2)[0]
        ended = time.time()
        backlog = instance.pending() if instance.events else 0
        probe.join()
        seconds = result["duration_us"] / 1e6
        result["cores"] = (cpu_seconds(instance.process) - cpu) / seconds
        result["rate"] = result["acked"] / seconds
        if instance.process.poll() is not None:
            raise SystemExit(f"FAILED: {instance.name} stopped; see {instance.process.log_path}")
        self.failures += check_run(instance.name, result) + probe.problems(
            f"{instance.name} probe")
        acknowledged = probe.acknowledged()
        self.acked[instance.name] += result["acked"] + len(acknowledged)
        stored = settled_count(instance.database)
        if stored < self.acked[instance.name]:
            self.failures.append(f"{instance.name}: {self.acked[instance.name] - stored} "
                                 "acknowledged callbacks not stored")
        line = (f"  {instance.name:<13} stored {result['rate']:6.0f}/s  p99 "
                f"{result['p99_us'] / 1000:6.1f} ms  {result['cores']:.2f} cores")
        if not instance.events:
            if instance.event_count():
                self.failures.append(f"{instance.name}: events recorded with webhooks off")
            print(f"{line}  peaks: {self.grown(instance, result)}")
            self.results[(instance.name, "load")].append(result)
            return

        result["backlog"] = backlog
        result["drain_s"] = self.drain(instance, ended)
        # The receiver's CPU from the load's start until drained.
        result["receiver_cores"] = (cpu_seconds(self.receiver) - receiver_cpu) / (
            time.time() - started)
        self.arrivals.read()
        result["delivered_rate"] = self.arrivals.delivered_between(
            instance.path, ended - seconds, ended) / seconds
        recorded = instance.events_recorded()
        new_events = instance.event_count() - events_before
        result["events"] = new_events
        acked_now = result["acked"] + len(acknowledged)
        if new_events < acked_now:
            self.failures.append(f"{instance.name}: {acked_now - new_events} acknowledged "
                                 "status changes recorded no event")
        from_recording = [self.arrivals.by_id[instance.path][event_id][0] - at
                          for event_id, (_, at) in recorded.items()
                          if ended - seconds <= at < ended
                          and event_id in self.arrivals.by_id[instance.path]]
        from_answer, missing = arrival_delays(self.arrivals, instance, acknowledged)
        self.check_delivered(instance, recorded, missing)
        result.update(probe=from_answer, recorded=from_recording)
        grown = self.grown(instance, result)  # until drained
        self.results[(instance.name, "load")].append(result)
        print(f"{line}  receiver {result['receiver_cores']:.2f} cores\n"
              f"  {'':<13} delivered {result['delivered_rate']:6.0f}/s during the load; "
              f"backlog {result['backlog']} at its end, drained in {result['drain_s']:.1f} s\n"
              f"  {'':<13} 200 -> arrival (probe, {len(from_answer)}) {quantiles(from_answer)};"
              f" recorded -> arrival ({len(from_recording)}) {quantiles(from_recording)}\n"
              f"  {'':<13} peaks: {grown}")

    def grown(self, instance, result):
        """Notes in `result` the peaks of what grows since the measurement began; returns
        them in words."""
        for what in ("wal", "rss", "pending"):
            result[what] = self.growth.peak(instance, what)
        return (f"RSS {result['rss']:.0f} MiB"
                + (f", WAL {result['wal']:.1f} MiB" if instance.engine == "sqlite" else "")
                + (f", pending events {result['pending']:.0f}" if instance.events else ""))

    def paced(self, instance, callbacks):
        """The paced run on an instance with webhooks: p50 and p99 from 200 to arrival."""
        args = self.args
        self.growth.reset()
        client = PacedClient(instance.url, callbacks, args.paced_rate, PACED_THREADS)
        client.start().join()
        ended = time.time()
        self.failures += client.problems(f"{instance.name} paced")
        acknowledged = client.acknowledged()
        self.acked[instance.name] += len(acknowledged)
        self.drain(instance, ended)
        self.arrivals.read()
        delays, missing = arrival_delays(self.arrivals, instance, acknowledged)
        self.check_delivered(instance, instance.events_recorded(), missing)
        result = {"delays": delays, "lateness": client.lateness}
        grown = self.grown(instance, result)
        self.results[(instance.name, "paced")].append(result)
        print(f"  {instance.name + ' paced':<13} {args.paced_rate}/s, {len(acknowledged)} "
              f"acknowledged: 200 -> arrival {quantiles(delays)}; the client at most "
              f"{client.lateness * 1000:.0f} ms behind its pace\n"
              f"  {'':<13} peaks: {grown}")

    def drain(self, instance, since):
        """Waits until no event is pending; returns the seconds since `since` (nan if never
        within --drain-limit, or once an event arrived with a bad signature: the receiver
        refuses it, so it waits for its retry)."""
        deadline = time.monotonic() + self.args.drain_limit
        while instance.pending():
            self.arrivals.read()
            if self.arrivals.bad or time.monotonic() > deadline:
                self.failures.append(f"{instance.name}: {instance.pending()} events still "
                                     f"pending {time.time() - since:.0f} s after the load")
                return float("nan")
            time.sleep(0.05)
        return time.time() - since

    def check_delivered(self, instance, recorded, missing):
        """Every event recorded so far was delivered and arrived; none arrived unrecorded
        or with a bad signature."""
        arrived = self.arrivals.by_id[instance.path]
        undelivered = [event_id for event_id, (state, _) in recorded.items()
                       if (state != "delivered" or event_id not in arrived)
                       and event_id not in self.lost]
        self.lost.update(undelivered)
        if undelivered:
            self.failures.append(f"{instance.name}: {len(undelivered)} events never arrived "
                                 f"(first: {undelivered[:3]})")
        if missing:
            self.failures.append(f"{instance.name}: {len(missing)} acknowledged callbacks "
                                 f"whose event never arrived (first: {missing[:3]})")
        unknown = [event_id for event_id in arrived if event_id not in recorded]
        if unknown:
            self.failures.append(f"{instance.name}: {len(unknown)} events arrived that were "
                                 "never recorded")
        if self.arrivals.bad:
            self.failures.append(f"{len(self.arrivals.bad)} events arrived with a bad "
                                 f"signature (first: {self.arrivals.bad[0]})")
            self.arrivals.bad.clear()

    def final_checks(self, instances):
        for instance in instances:
            if not instance.events:
                continue
            repeats = sum(len(times) - 1 for times in self.arrivals.by_id[instance.path].values())
            if repeats:
                print(f"{instance.name}: {repeats} events arrived more than once "
                      "(at least once, by design)")


def quantiles(seconds):
    if not seconds:
        return "p50 - p99 -"
    return (f"p50 {percentile(seconds, 50) * 1000:.0f} ms, p99 "
            f"{percentile(seconds, 99) * 1000:.0f} ms")


# --- the report ---------------------------------------------------------------------------

def report(args, results, groups):
    print(f"\nmedians of {args.rounds} rounds ({args.duration} s of wrk at "
          f"{args.connections} connections; paced {args.paced_rate}/s for "
          f"{args.paced_duration} s)")
    print(f"{'':<46}" + "".join(f"{group:>14}" for group in groups))

    def row(label, values):
        print(f"{label:<46}" + "".join(f"{value:>14}" for value in values))

    def of(group, events, kind="load"):
        """A group's results; the compared checkout's "off" are this one's on SQLite."""
        if not events and group == "compared":
            group = "sqlite"
        return results[(f"{group} {'on' if events else 'off'}", kind)]

    def middle(engine, key, events=True, kind="load"):
        return median([r[key] for r in of(engine, events, kind)])

    ratios = {group: sorted(on["rate"] / off["rate"] for on, off in zip(
        of(group, True), of(group, False), strict=True)) for group in groups}
    row("callbacks stored/s, webhooks on", [f"{middle(e, 'rate'):.0f}" for e in groups])
    row("callbacks stored/s, webhooks off",
        [f"{middle(e, 'rate', events=False):.0f}" for e in groups])
    row("on / off (median of the rounds' ratios)",
        [f"{median(ratios[e]):.3f}" for e in groups])
    row("callback p99 ms, on / off", [
        f"{middle(e, 'p99_us') / 1000:.0f} / {middle(e, 'p99_us', False) / 1000:.0f}"
        for e in groups])
    row("events delivered/s during the load", [f"{middle(e, 'delivered_rate'):.0f}"
                                               for e in groups])
    row("200 -> arrival, probe, p50 / p99 ms", [
        "{:.0f} / {:.0f}".format(*(median([percentile(r["probe"], p) * 1000
                                           for r in of(e, True)]) for p in (50, 99)))
        for e in groups])
    row("recorded -> arrival, all, p50 / p99 ms", [
        "{:.0f} / {:.0f}".format(*(median([percentile(r["recorded"], p) * 1000
                                           for r in of(e, True)]) for p in (50, 99)))
        for e in groups])
    row("backlog when the load stops (events)", [f"{middle(e, 'backlog'):.0f}"
                                                 for e in groups])
    row("drained in (s)", [f"{middle(e, 'drain_s'):.1f}" for e in groups])
    row("peak pending events, full load / paced", [
        f"{middle(e, 'pending'):.0f} / {middle(e, 'pending', kind='paced'):.0f}"
        for e in groups])
    paced_p99 = {e: median([percentile(r["delays"], 99) for r in of(e, True, "paced")])
                 for e in groups}
    row(f"paced {args.paced_rate}/s: 200 -> arrival p50 / p99 ms", [
        f"{median([percentile(r['delays'], 50) for r in of(e, True, 'paced')]) * 1000:.0f} / "
        f"{paced_p99[e] * 1000:.0f}" for e in groups])
    for events in (True, False):
        row(f"RSS peak MiB, {'on' if events else 'off'}: first round / last", [
            f"{of(e, events)[0]['rss']:.0f} / {of(e, events)[-1]['rss']:.0f}"
            for e in groups])
        row(f"WAL peak MiB, {'on' if events else 'off'}: first round / last", [
            f"{of(e, events)[0]['wal']:.1f} / {of(e, events)[-1]['wal']:.1f}"
            if e != "postgres" else "-" for e in groups])
    for group in groups:
        print(f"{group}: on / off rounds {' '.join(f'{x:.3f}' for x in ratios[group])}")
    if "compared" in groups:
        for key, what in (("rate", "callbacks stored/s"), ("delivered_rate", "delivered/s")):
            pairs = sorted(mine[key] / theirs[key] for mine, theirs in zip(
                of("sqlite", True), of("compared", True), strict=True))
            print(f"this / compared, {what}: {median(pairs):.3f} (median of the rounds' "
                  f"ratios: {' '.join(f'{x:.3f}' for x in pairs)})")
    sqlite = "sqlite"
    delivered = middle(sqlite, "delivered_rate")
    print(f"\ntargets on SQLite: on / off {median(ratios[sqlite]):.3f} (>= {TARGET_RATIO}: "
          f"{verdict(median(ratios[sqlite]) >= TARGET_RATIO)}); delivered {delivered:.0f}/s "
          f"(>= {TARGET_DELIVERED}: {verdict(delivered >= TARGET_DELIVERED)}); paced p99 "
          f"{paced_p99[sqlite] * 1000:.0f} ms (< {TARGET_PACED_P99 * 1000:.0f} ms: "
          f"{verdict(paced_p99[sqlite] < TARGET_PACED_P99)})")


if __name__ == "__main__":
    main()
