"""Benchmark of status-callback ingestion: `python bench/webhooks.py [--smoke]`.

Starts the service as the Procfile does (gunicorn with the repository's gunicorn.conf.py)
in live mode with made-up credentials on a free 127.0.0.1 port and a fresh database, the
fixed reference (bench/reference_app.py: Flask and RequestValidator, nothing stored, served
by gunicorn's gthread worker with the service's workers and threads) and a straightforward
receiver (bench/baseline_app.py) beside it. Pre-signs distinct Twilio
status callbacks (queued, sent, then delivered or undelivered, for thousands of SIDs) and
fires them with wrk over a fixed number of keep-alive connections, never one twice.

Two loads (--load): `lifecycle` (the default) sends each SID's callbacks as Twilio does,
and `new` sends one callback for each of as many SIDs, none known before (every callback
creates its message).

Each round measures, one after the other: the service storing callbacks (and the compared
checkout's, with --compare); the reference answering them; the service's no-storage floor
(bench/floor_app.py: the same app, handler, log line and JSON answer, nothing stored); the
service, the compared checkout and the reference rejecting them (a wrong signature: 403,
nothing stored); the baseline receiver; and SQLite's raw single-row commit rate with the
service's settings in the same directory. Medians over the rounds, and the median of each
round's ratios against the reference measured in that round, are printed at the end, with
the server's CPU time per answer (its processes' user and system time, the writer's
included, over the answers counted). --short measures only the service, the compared
checkout and the reference.

Exits non-zero if an acknowledged callback is missing from the database, a rejected one
was stored, the service answered any 5xx, or the pre-signed pool ran out.
"""

import os
import sqlite3
import sys
import threading
import time
import urllib.parse
from pathlib import Path

from common import (
    ACCOUNT_SID,
    AUTH_TOKEN,
    BENCH,
    SENDER,
    PostgresDatabases,
    argument_parser,
    count_rows,
    cpu_seconds,
    database_rows,
    gunicorn_settings,
    live_settings,
    machine_summary,
    median,
    ms,
    open_descriptors,
    parse_bench_args,
    require_wrk,
    rss_mib,
    run_benchmark,
    run_wrk,
    service_env,
    service_summary,
    settled_count,
    verdict,
)
from twilio.request_validator import RequestValidator

from support import free_port, procfile_command

POOL_RATE = 6000  # pre-signed callbacks per second of a run; above what the reference answers here
SIDS_PER_BLOCK = 500  # a block's callbacks go out as queued for all, then sent, then final
# Each load's callbacks per SID, in order ("final": delivered, or undelivered for one in 10).
LOAD_STEPS = {"lifecycle": ("queued", "sent", "final"), "new": ("final",)}


def parse_args():
    parser = argument_parser(__doc__.split("\n\n")[0], 32, "keep-alive connections")
    parser.add_argument("--compare", type=Path, metavar="REPO",
                        help="another checkout of the service (an older commit, say), "
                             "measured in the same rounds right after this one, on SQLite")
    parser.add_argument("--short", action="store_true",
                        help="only the service, the compared checkout and the reference, "
                             "stored and 403 (no floor, baseline, PostgreSQL or raw SQLite)")
    parser.add_argument("--timeline", action="store_true",
                        help="sample the service every second of its runs: stored callbacks "
                             "(the rate of each 10 s, and the last 10 s over the first), the "
                             "RSS of its processes and their open descriptors (with "
                             "--duration 60: the sustained run)")
    parser.add_argument("--load", choices=tuple(LOAD_STEPS), default="lifecycle",
                        help="lifecycle: queued, sent, then delivered or undelivered for each "
                             "SID; new: one callback for each SID, none known before")
    return parse_bench_args(parser)


def callback_params(sid, status, to):
    params = {"MessageSid": sid, "SmsSid": sid, "MessageStatus": status, "SmsStatus": status,
              "AccountSid": ACCOUNT_SID, "From": SENDER, "To": to, "ApiVersion": "2010-04-01"}
    if status == "undelivered":
        params["ErrorCode"] = "30003"
    return params


def signed_callbacks(round_no, count, url, load="lifecycle", sids_per_block=SIDS_PER_BLOCK):
    """Distinct callbacks signed for `url`, at least `count` (whole blocks), as (sid,
    status, signature, form body); the round's number is part of every SID."""
    validator = RequestValidator(AUTH_TOKEN)
    steps = LOAD_STEPS[load]
    made, block = 0, 0
    while made < count:
        sids = [(f"SM{round_no:02x}{block * sids_per_block + i:030x}", f"+1555{i:07d}")
                for i in range(sids_per_block)]
        for step in steps:
            for i, (sid, to) in enumerate(sids):
                status = step if step != "final" else (
                    "undelivered" if i % 10 == 9 else "delivered")
                params = callback_params(sid, status, to)
                yield (sid, status, validator.compute_signature(url, params),
                       urllib.parse.urlencode(params))
        made += len(steps) * sids_per_block
        block += 1


def write_pool(path, round_no, count, url, load="lifecycle"):
    """Writes `count` distinct signed callbacks (or a few more: whole blocks), one
    "<signature>\\t<form body>" per line; returns how many."""
    written = 0
    with open(path, "w") as out:
        for _, _, signature, body in signed_callbacks(round_no, count, url, load):
            out.write(f"{signature}\t{body}\n")
            written += 1
    return written


def sqlite_commit_rate(repo, directory, synchronous, seconds):
    """Single-row commits per second on one kept connection opened as the service opens it."""
    sys.path.insert(0, str(repo))
    # The service's own engine: the same PRAGMAs, the same BEGIN IMMEDIATE transactions.
    from sms_status.storage import SQLiteEngine, times

    path = Path(directory) / f"raw-{synchronous.lower()}.db"
    engine = SQLiteEngine(str(path), synchronous)
    sqlite3.connect(path).execute("PRAGMA journal_mode = WAL").close()
    engine.query("CREATE TABLE IF NOT EXISTS events (sid TEXT, status TEXT, at TEXT)")
    count, start = 0, time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        with engine.transaction() as tx:
            tx.execute("INSERT INTO events VALUES (?, 'sent', ?)",
                       (f"SM{count}", times.stored_time()))
        count += 1
    rate = count / (time.perf_counter() - start)
    engine.close()
    return rate


def describe(name, r, key="acked"):
    """One measurement on one line; `key` is the answer counted (acked, or rejected for 403)."""
    return (f"{name:<14} {rate(r, key):6.0f}/s  p50 {ms(r['p50_us']):>5}  p90 {ms(r['p90_us']):>6}"
            f"  p99 {ms(r['p99_us']):>6}  max {ms(r['max_us']):>6} ms  {r['cores']:.2f} cores  "
            f"{cpu_per_answer(r, key):.0f} us CPU each  "
            f"other answers {r['responses'] - r[key]}  5xx {r['server_errors']}  "
            f"socket errors {r['socket_errors']}  timeouts {r['timeouts']}")


def main():
    args = parse_args()
    require_wrk()
    run_benchmark("bench-webhooks-", args, run)


def run(args, workdir, processes):
    with PostgresDatabases(args) as postgres:
        return measure(args, workdir, processes, postgres)


def split_pool(pool):
    """The pool's lines in two files, alternately: one per instance of a pair."""
    halves = [pool.with_suffix(f".{half}.tsv") for half in "ab"]
    with open(pool) as lines, open(halves[0], "w") as a, open(halves[1], "w") as b:
        for n, line in enumerate(lines):
            (a, b)[n % 2].write(line)
    return halves


def measure(args, workdir, processes, postgres):
    port, baseline_port = free_port(), free_port()
    base_url = f"http://127.0.0.1:{port}"
    service_db, baseline_db = workdir / "service.db", workdir / "baseline.db"
    env = service_env(port, service_db, **live_settings(base_url))
    synchronous = (env.get("SQLITE_SYNCHRONOUS") or "NORMAL").upper()
    gunicorn = gunicorn_settings(args.repo, env)
    print(machine_summary())
    print(f"{service_summary(args.repo, gunicorn)}, SQLite WAL synchronous={synchronous}")
    print(f"load: wrk, {args.connections} keep-alive connections, {args.duration} s per "
          f"measurement, {args.rounds} interleaved rounds")

    per_round = POOL_RATE * args.duration
    started = time.perf_counter()
    pools = [workdir / f"pool-{r}.tsv" for r in range(args.rounds)]
    signed = sum(write_pool(pool, r, per_round, base_url + "/message-status", args.load)
                 for r, pool in enumerate(pools))
    per_sid = len(LOAD_STEPS[args.load])
    print(f"pre-signed {signed} distinct callbacks ({signed // per_sid} SIDs x {per_sid} "
          f"status{'es' if per_sid > 1 else ''}, load '{args.load}') "
          f"in {time.perf_counter() - started:.1f} s")
    wrong_signature = RequestValidator("not-" + AUTH_TOKEN).compute_signature(base_url, {})

    service = processes.start_server("service", procfile_command(args.repo), args.repo, env,
                                     base_url + "/healthz")
    gunicorn_bin = Path(sys.executable).parent / "gunicorn"
    # The reference: Flask and RequestValidator alone, in gunicorn's own gthread worker with
    # the service's workers and threads. It checks signatures for the service's URL, so the
    # same pre-signed callbacks serve it.
    reference_port = free_port()
    reference = processes.start_server(
        "reference",
        [str(gunicorn_bin), "-k", "gthread", "-w", str(gunicorn["workers"]), "--threads",
         str(gunicorn["threads"]), "-b", f"127.0.0.1:{reference_port}", "reference_app:app"],
        BENCH, {"PATH": env["PATH"], "REFERENCE_URL": base_url + "/message-status",
                "REFERENCE_TOKEN": AUTH_TOKEN},
        f"http://127.0.0.1:{reference_port}/healthz")
    floor = None
    if not args.short:
        # The floor: the same gunicorn settings and app, nothing stored. It checks
        # signatures for base_url too, so the same pre-signed callbacks serve it.
        floor_port = free_port()
        floor = processes.start_server(
            "floor", [procfile_command(args.repo)[0], "-c", "gunicorn.conf.py", "--pythonpath",
                      str(BENCH), "floor_app:app"], args.repo,
            dict(env, PORT=str(floor_port), DATABASE_URL=f"sqlite:///{workdir / 'floor.db'}"),
            f"http://127.0.0.1:{floor_port}/healthz")
    # On PostgreSQL: one instance, and a pair of instances on one database (two hosts).
    # All check signatures for base_url, so the same pre-signed callbacks serve every one.
    on_postgres = {}
    if postgres and not args.short:
        single, shared = postgres.new(), postgres.new()
        for name, url, count in (("postgres", single, 1), ("postgres x2", shared, 2)):
            servers = []
            for n in range(count):
                server_port = free_port()
                servers.append((processes.start_server(
                    f"{name} {n}".replace(" ", "-"), procfile_command(args.repo), args.repo,
                    dict(env, PORT=str(server_port), DATABASE_URL=url),
                    f"http://127.0.0.1:{server_port}/healthz"), server_port))
            on_postgres[name] = (servers, url)
        print(f"also on PostgreSQL ({database_rows(single, 'SHOW server_version')[0][0]}): one "
              "instance, and two instances on one database")
    compared = None
    if args.compare:
        compared_port, compared_db = free_port(), workdir / "compared.db"
        compared = processes.start_server(
            "compared", procfile_command(args.compare), args.compare,
            dict(env, PORT=str(compared_port), DATABASE_URL=f"sqlite:///{compared_db}"),
            f"http://127.0.0.1:{compared_port}/healthz")
        print(f"compared with the service in {args.compare}, on SQLite, in the same rounds")
    baseline = None
    if not args.short:
        with sqlite3.connect(baseline_db) as conn:
            conn.execute("CREATE TABLE status_events (message_sid TEXT, status TEXT,"
                         " received_at TEXT)")
        baseline = processes.start_server(
            "baseline",
            [str(gunicorn_bin), "-k", "sync", "-w", "2", "-b", f"127.0.0.1:{baseline_port}",
             "baseline_app:app"],
            BENCH, {"PATH": env["PATH"], "BASELINE_DB": str(baseline_db),
                    "BASELINE_URL": base_url + "/message-status", "BASELINE_TOKEN": AUTH_TOKEN},
            f"http://127.0.0.1:{baseline_port}/healthz")

    other_sync = "FULL" if synchronous == "NORMAL" else "NORMAL"
    raw_seconds = min(args.duration, 3)
    results = {"service": [], **({"compared": []} if compared else {}), "reference": [],
               **({} if args.short else {"floor": []}), "service 403": [],
               **({"compared 403": []} if compared else {}), "reference 403": [],
               **({} if args.short else {"baseline": []}), **{name: [] for name in on_postgres}}
    loads = []  # the load average (1 minute) at the start of each round
    # What grows: the largest size each SQLite database's WAL reached during the run.
    wal_peaks = WalPeaks([service_db] + ([compared_db] if compared else []))
    acked_on = dict.fromkeys(on_postgres, 0)
    raw = {synchronous: [], other_sync: []}
    failures = []
    acked_total = sent_upper_bound = baseline_acked = 0
    script = BENCH / "callbacks.lua"

    def wrk(server, url, pool, *extra):
        """One measurement; adds the cores the server used to wrk's figures."""
        cpu = cpu_seconds(server)
        threads = min(2, args.connections)
        result = run_wrk(url, script, [pool, threads, *extra], args.connections, args.duration,
                         threads=threads)[0]
        result["cpu_seconds"] = cpu_seconds(server) - cpu
        result["cores"] = result["cpu_seconds"] / (result["duration_us"] / 1e6)
        if server.poll() is not None:
            raise SystemExit(f"FAILED: a server stopped during the run; see {server.log_path}")
        return result

    def wrk_on_instances(servers, pool):
        """One wrk per instance, at once, each with its share of connections and callbacks;
        rates and counts add up, latencies are the worse instance's."""
        if len(servers) == 1:
            return wrk(servers[0][0], f"http://127.0.0.1:{servers[0][1]}", pool)
        results = [None] * len(servers)
        shares = split_pool(pool)

        def one(n):
            server, server_port = servers[n]
            results[n] = run_wrk(f"http://127.0.0.1:{server_port}", script, [shares[n], 2],
                                 args.connections // 2, args.duration, threads=2)[0]

        cpu = sum(cpu_seconds(server) for server, _ in servers)
        threads = [threading.Thread(target=one, args=(n,)) for n in range(len(servers))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        combined = {key: max(r[key] for r in results) if key.endswith("_us")
                    else sum(r[key] for r in results) for key in results[0]}
        combined["duration_us"] = max(r["duration_us"] for r in results)
        combined["cpu_seconds"] = sum(cpu_seconds(s) for s, _ in servers) - cpu
        combined["cores"] = combined["cpu_seconds"] / (combined["duration_us"] / 1e6)
        return combined

    for r, pool in enumerate(pools):
        loads.append(os.getloadavg()[0])
        print(f"\nround {r + 1} of {args.rounds} (load average {loads[-1]:.2f})")
        timeline = Timeline(service_db, service) if args.timeline else None
        result = wrk(service, base_url, pool)
        results["service"].append(result)
        print("  " + describe("service", result))
        if timeline:
            timeline.stop()
            print(f"  {'':<14} " + timeline.describe())
        acked_total += result["acked"]
        sent_upper_bound += result["issued"] - result["exhausted"]
        failures += check_run("service", result)
        stored = settled_count(service_db)
        missing = acked_total - stored
        print(f"  {'':<14} stored {stored} in all, acknowledged {acked_total} in all: "
              f"{'none missing' if missing <= 0 else f'MISSING {missing}'}")
        if missing > 0:
            failures.append(f"{missing} acknowledged callbacks missing")
        if stored > sent_upper_bound:
            failures.append(f"{stored} rows stored but at most {sent_upper_bound} sent")

        if compared:
            result = wrk(compared, f"http://127.0.0.1:{compared_port}", pool)
            results["compared"].append(result)
            print("  " + describe("compared", result))
            failures += check_run("compared", result)
        print(f"  {'':<14} WAL peak so far: " + wal_peaks.describe())

        result = wrk(reference, f"http://127.0.0.1:{reference_port}", pool)
        results["reference"].append(result)
        print("  " + describe("reference", result))
        failures += check_run("reference", result)

        if floor:
            result = wrk(floor, f"http://127.0.0.1:{floor_port}", pool)
            results["floor"].append(result)
            print("  " + describe("floor", result))
            failures += check_run("floor", result)

        for name, server, url in (
                ("service 403", service, base_url),
                *((("compared 403", compared, f"http://127.0.0.1:{compared_port}"),)
                  if compared else ()),
                ("reference 403", reference, f"http://127.0.0.1:{reference_port}")):
            result = wrk(server, url, pool, wrong_signature)
            results[name].append(result)
            print("  " + describe(name, result, "rejected"))
            failures += check_run(name, result, expect=403)
        if settled_count(service_db) != stored:
            failures.append("callbacks with a wrong signature were stored")

        for name, (servers, url) in on_postgres.items():
            result = wrk_on_instances(servers, pool)
            results[name].append(result)
            print("  " + describe(name, result))
            failures += check_run(name, result)
            acked_on[name] += result["acked"]
            stored_there = settled_count(url)
            if stored_there < acked_on[name]:
                failures.append(f"{name}: {acked_on[name] - stored_there} acknowledged "
                                "callbacks missing")

        if args.short:
            continue
        result = wrk(baseline, f"http://127.0.0.1:{baseline_port}", pool)
        results["baseline"].append(result)
        baseline_acked += result["acked"]
        print("  " + describe("baseline", result))

        for level in raw:
            raw[level].append(sqlite_commit_rate(args.repo, workdir, level, raw_seconds))
            print(f"  {'sqlite ' + level:<14} {raw[level][-1]:6.0f} commits/s "
                  f"(one kept connection, WAL, synchronous={level})")

    wal_peaks.stop()
    if baseline:
        baseline_stored = settled_count(baseline_db)
        if baseline_stored < baseline_acked:
            failures.append(f"baseline lost {baseline_acked - baseline_stored} callbacks")
    print(f"\nWAL peak: {wal_peaks.describe()}")
    report(args, results, raw, synchronous, other_sync, count_rows(service_db), acked_total,
           loads)
    return failures


class Timeline:
    """Counts the stored callbacks every second while it runs, with the server's memory
    (RSS of its processes) and open descriptors: the rate of each 10 s, and whether the
    memory or the descriptors grow from the first 10 s to the last."""

    def __init__(self, database, server, every=1.0):
        self.database, self.server, self.every = database, server, every
        self.counts = [self._sample_now()]
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample_now(self):
        return (time.monotonic(), count_rows(self.database), rss_mib(self.server),
                open_descriptors(self.server))

    def _sample(self):
        while not self.stopping.wait(self.every):
            self.counts.append(self._sample_now())

    def stop(self):
        self.stopping.set()
        self.thread.join()
        return self

    def windows(self, seconds=10):
        """Per window of `seconds`, from the last count before the first callback was
        stored (wrk reads its pool before it sends anything): (stored per second, peak RSS
        in MiB, peak open descriptors)."""
        first = next((i for i, (_, n, *_) in enumerate(self.counts) if n > self.counts[0][1]),
                     1)
        start = self.counts[first - 1][0]
        windows, edge = [], 0
        while True:
            inside = [c for c in self.counts if edge <= c[0] - start <= edge + seconds]
            if not inside or inside[-1][0] - start < edge + seconds - self.every:
                return windows
            (t0, n0, *_), (t1, n1, *_) = inside[0], inside[-1]
            windows.append(((n1 - n0) / (t1 - t0), max(c[2] for c in inside),
                            max(c[3] for c in inside)))
            edge += seconds

    def describe(self):
        windows = self.windows()
        if len(windows) < 2:
            return "timeline: too short for two windows of 10 s"
        rates = [rate for rate, _, _ in windows]
        seconds = [round((n1 - n0) / (t1 - t0)) for (t0, n0, *_), (t1, n1, *_)
                   in zip(self.counts, self.counts[1:], strict=False)]
        (_, rss_first, fds_first), (_, rss_last, fds_last) = windows[0], windows[-1]
        return (f"stored per s in each 10 s: {' '.join(f'{x:.0f}' for x in rates)}; last / "
                f"first = {rates[-1] / rates[0]:.3f}\n{'':<17}each second: {seconds}\n"
                f"{'':<17}peak RSS of the server's processes, first 10 s / last: "
                f"{rss_first:.0f} / {rss_last:.0f} MiB; open descriptors (connections, "
                f"files): {fds_first} / {fds_last}")


class WalPeaks:
    """Samples the size of each database's WAL five times a second, keeping the largest."""

    def __init__(self, databases):
        self.paths = [Path(f"{database}-wal") for database in databases]
        self.peaks = dict.fromkeys(self.paths, 0)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self):
        while not self.stopping.wait(0.2):
            for path in self.paths:
                try:
                    self.peaks[path] = max(self.peaks[path], path.stat().st_size)
                except FileNotFoundError:
                    pass

    def describe(self):
        return ", ".join(f"{path.name} {size / 2**20:.1f} MiB"
                         for path, size in self.peaks.items())

    def stop(self):
        self.stopping.set()
        self.thread.join()


def check_run(name, result, expect=200):
    problems = []
    if result["exhausted"]:
        problems.append(f"{name}: the pre-signed pool ran out ({result['exhausted']} requests "
                        f"over); raise POOL_RATE")
    if result["server_errors"]:
        problems.append(f"{name}: {result['server_errors']} answers 5xx")
    if result["duplicates"]:
        problems.append(f"{name}: {result['duplicates']} callbacks answered as repeats")
    wrong = result["other"] + (result["rejected"] if expect == 200 else result["acked"])
    if wrong:
        problems.append(f"{name}: {wrong} unexpected answers (expected {expect})")
    return problems


def rate(result, key="acked"):
    return result[key] / (result["duration_us"] / 1e6)


def cpu_per_answer(result, key="acked"):
    """Microseconds of the server's CPU (user and system, every process of it) per answer."""
    return 1e6 * result["cpu_seconds"] / max(result[key], 1)


def answered(name):
    """The answer a measurement counts: 403 for the runs with a wrong signature."""
    return "rejected" if name.endswith(" 403") else "acked"


def round_ratios(results, name, other):
    """Each round's rate of `name` over that of `other` in the same round, sorted."""
    return sorted(rate(r, answered(name)) / rate(o, answered(other))
                  for r, o in zip(results[name], results[other], strict=True))


def report(args, results, raw, synchronous, other_sync, stored, acked, loads):
    rates = {name: median([rate(r, answered(name)) for r in runs])
             for name, runs in results.items()}
    print(f"\nmedians of {args.rounds} rounds, {args.connections} connections, "
          f"{args.duration} s each; load average at the rounds' start "
          f"{' '.join(f'{load:.2f}' for load in loads)}")
    print(f"{'':<30} {'per s':>7} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'max ms':>7}"
          f" {'cores':>6} {'CPU us':>7}")
    labels = {"service": "service (stored)", "compared": "compared service (stored)",
              "reference": "reference (nothing stored)", "floor": "no-storage floor",
              "service 403": "service 403", "compared 403": "compared service 403",
              "reference 403": "reference 403",
              "baseline": "baseline receiver", "postgres": "service on PostgreSQL",
              "postgres x2": "2 instances, one PostgreSQL"}
    for name, runs in results.items():
        print(f"{labels[name]:<30} {rates[name]:7.0f}" + "".join(
            f" {ms(median([r[k] for r in runs])):>7}" for k in ("p50_us", "p90_us", "p99_us",
                                                               "max_us"))
            + f" {median([r['cores'] for r in runs]):6.2f}"
            + f" {median([cpu_per_answer(r, answered(name)) for r in runs]):7.0f}")
    for level in raw if raw[synchronous] else ():
        label = f"sqlite commits, sync={level}" + (" *" if level == synchronous else "")
        print(f"{label:<30} {median(raw[level]):7.0f}")
    if raw[synchronous]:
        print("(* the service's setting; one kept connection, WAL, one row per commit)")
    print("(CPU us: the server's CPU time, all its processes, per answer counted)")

    # Each ratio is the median of the rounds' ratios: the two were measured one right after
    # the other, which cancels the drift of a shared machine better than two medians do.
    def line(label, name, other, target=None):
        pairs = round_ratios(results, name, other)
        goal = (f"target >= {target:.2f}: {verdict(median(pairs) >= target)}; "
                if target else "")
        # CPU time per answer, inverted: the rate's ratio on a machine whose cores are the limit.
        cpu = median([cpu_per_answer(o, answered(other)) / cpu_per_answer(r, answered(name))
                      for r, o in zip(results[name], results[other], strict=True)])
        print(f"{label:<32} = {median(pairs):6.3f}   ({goal}rounds "
              f"{' '.join(f'{x:.3f}' for x in pairs)}; CPU per answer {cpu:.3f})")

    print("\nmedians of the rounds' ratios:")
    line("service / reference", "service", "reference", 0.8)
    line("service 403 / reference 403", "service 403", "reference 403", 0.95)
    if "compared" in results:
        line("service / compared", "service", "compared")
        line("service 403 / compared 403", "service 403", "compared 403")
        line("compared / reference", "compared", "reference")
    if "floor" in results:
        line("floor / reference", "floor", "reference")
        line("service / floor", "service", "floor")
    p99 = median([r["p99_us"] for r in results["service"]]) / 1000
    print(f"service p99                      = {p99:5.1f} ms (target < 100 ms: "
          f"{verdict(p99 < 100)})")
    if "baseline" in results:
        print(f"service / baseline               = {rates['service'] / rates['baseline']:6.3f}")
        print(f"service / sqlite commit          = "
              f"{rates['service'] / median(raw[synchronous]):6.3f}")
    if "postgres" in rates:
        p99_pg = median([r["p99_us"] for r in results["postgres"]]) / 1000
        print(f"PostgreSQL / SQLite              = {rates['postgres'] / rates['service']:6.3f}"
              f"   (target >= 0.80: {verdict(rates['postgres'] >= 0.8 * rates['service'])})")
        print(f"PostgreSQL p99                   = {p99_pg:5.1f} ms (target < 100 ms: "
              f"{verdict(p99_pg < 100)})")
        print(f"2 instances / 1, on PostgreSQL   = "
              f"{rates['postgres x2'] / rates['postgres']:6.3f}")
    print(f"stored {stored} status events for {acked} acknowledged callbacks: "
          f"{'none lost' if stored >= acked else 'LOST ' + str(acked - stored)}")


if __name__ == "__main__":
    main()
