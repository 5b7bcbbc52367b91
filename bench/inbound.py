"""Benchmark of replies and the opt-out check: `python bench/inbound.py [--smoke]`.

1. Inbound messages beside status callbacks. Starts the service as the Procfile does
   (gunicorn with the repository's gunicorn.conf.py) in live mode with made-up credentials
   on a free 127.0.0.1 port and a fresh database, pre-signs distinct Twilio incoming
   messages (from distinct numbers; one in 20 is STOP and one in 20 START, which change the
   opt-out list) and as many distinct status callbacks (each creating its message), and
   fires each with wrk over the same keep-alive connections for --duration seconds (60 by
   default: sustained load), one after the other in each round, alternating which goes
   first, after 10 s of each unmeasured (a fresh service and database warm up). Inbound
   messages stored per second must reach 0.9 of callbacks stored per second (the median
   of the rounds' ratios).

2. The opt-out check's cost on POST /send-sms, with --compare REPO (a checkout of the
   service without the check: the commit before it, say). Both services run side by side
   in simulation with Twilio answering at once (TWILIO_SIMULATE_LATENCY_MS=0, so the check
   is as large a share of a send as it can be), each on a fresh database, and wrk sends
   for --sends-duration seconds to each in turn, alternating which goes first, with a pause
   after each for the simulator's status callbacks to end; this one's opt-out list holds
   10,000 numbers. The check must cost at most 3% of sends per second (the median of the
   rounds' ratios: each round's pair cancels the drift of a shared machine).

Exits non-zero if an acknowledged inbound message or callback is missing from the
database, the service answered any 5xx, a send was refused, or the pre-signed pool ran out.
"""

import secrets
import sys
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
    gunicorn_settings,
    live_settings,
    machine_summary,
    median,
    ms,
    parse_bench_args,
    require_wrk,
    run_benchmark,
    run_wrk,
    service_env,
    service_summary,
    settled_count,
    verdict,
)
from twilio.request_validator import RequestValidator

from support import free_port, procfile_command

POOL_RATE = 3000  # pre-signed requests per second of a measurement; above what is answered
WARM_UP_SECONDS = 10
# After a measurement of sends, the simulator's status callbacks go on for about half a
# second per send still in flight: the next measurement starts once they are over.
SETTLE_SECONDS = 3
OPTED_OUT_NUMBERS = 10_000
SEND_LATENCY_MS = 0


def parse_args():
    parser = argument_parser(__doc__.split("\n\n")[0], 32, "keep-alive connections")
    parser.set_defaults(duration=60, rounds=2)
    parser.add_argument("--compare", type=Path, metavar="REPO",
                        help="a checkout of the service without the opt-out check, for part "
                             "2 (skipped without it)")
    parser.add_argument("--sends-duration", type=int, default=20,
                        help="seconds per measurement of part 2")
    parser.add_argument("--sends-rounds", type=int, default=6, help="rounds of part 2")
    args = parse_bench_args(parser)
    if args.smoke:
        args.sends_duration, args.sends_rounds = 2, 1
    return args


def inbound_params(sid, number, body):
    return {"MessageSid": sid, "SmsMessageSid": sid, "SmsSid": sid, "AccountSid": ACCOUNT_SID,
            "From": number, "To": SENDER, "Body": body, "NumMedia": "0", "NumSegments": "1",
            "SmsStatus": "received", "ApiVersion": "2010-04-01"}


def callback_params(sid, number):
    return {"MessageSid": sid, "SmsSid": sid, "MessageStatus": "delivered",
            "SmsStatus": "delivered", "AccountSid": ACCOUNT_SID, "From": SENDER, "To": number,
            "ApiVersion": "2010-04-01"}


def write_pool(path, kind, round_no, count, url):
    """`count` distinct signed requests of `kind` ("inbound" or "callback") for `url`, one
    "<signature>\\t<form body>" per line."""
    validator = RequestValidator(AUTH_TOKEN)
    with open(path, "w") as out:
        for n in range(count):
            sid = f"SM{round_no:02x}{n:030x}"
            number = f"+1555{round_no % 10}{n:06d}"
            if kind == "inbound":
                body = "STOP" if n % 20 == 7 else "START" if n % 20 == 17 else "Thanks, see you"
                params = inbound_params(sid, number, body)
            else:
                params = callback_params(sid, number)
            out.write(f"{validator.compute_signature(url, params)}\t"
                      f"{urllib.parse.urlencode(params)}\n")
    return count


def main():
    args = parse_args()
    require_wrk()
    run_benchmark("bench-inbound-", args, run)


def run(args, workdir, processes):
    with PostgresDatabases(args) as postgres:
        database = postgres.fresh(workdir / "service.db")
        failures = measure_inbound(args, workdir, processes, database)
        if args.compare:
            failures += measure_sends(args, workdir, processes, postgres)
        else:
            print("\npart 2 (the opt-out check's cost on /send-sms) needs --compare REPO: "
                  "skipped")
        return failures


def rate(result):
    return result["acked"] / (result["duration_us"] / 1e6)


def describe(name, r):
    return (f"{name:<10} {rate(r):6.0f}/s  p50 {ms(r['p50_us']):>5}  p90 {ms(r['p90_us']):>6}"
            f"  p99 {ms(r['p99_us']):>6}  max {ms(r['max_us']):>6} ms  {r['cores']:.2f} cores"
            f"  other answers {r['responses'] - r['acked']}  5xx {r['server_errors']}  "
            f"socket errors {r['socket_errors']}  timeouts {r['timeouts']}")


def measure_inbound(args, workdir, processes, database):
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    env = service_env(port, database, **live_settings(base_url))
    print(machine_summary())
    print(f"{service_summary(args.repo, gunicorn_settings(args.repo, env))}, "
          f"{'SQLite' if database.startswith('sqlite') else 'PostgreSQL'}")
    print(f"part 1: wrk, {args.connections} keep-alive connections, {args.duration} s per "
          f"measurement, {args.rounds} rounds, inbound messages and status callbacks in turn")
    count = POOL_RATE * args.duration
    started = time.perf_counter()
    pools = {(kind, r): write_pool(workdir / f"{kind}-{r}.tsv", kind, r, count,
                                   base_url + ("/inbound-sms" if kind == "inbound"
                                               else "/message-status"))
             for r in range(args.rounds) for kind in ("inbound", "callback")}
    warm_up = args.rounds  # the round number of the warm-up's own pools
    for kind in ("inbound", "callback"):
        write_pool(workdir / f"{kind}-{warm_up}.tsv", kind, warm_up,
                   POOL_RATE * WARM_UP_SECONDS,
                   base_url + ("/inbound-sms" if kind == "inbound" else "/message-status"))
    print(f"pre-signed {sum(pools.values())} distinct requests in "
          f"{time.perf_counter() - started:.1f} s")
    service = processes.start_server("service", procfile_command(args.repo), args.repo, env,
                                     base_url + "/healthz")
    script = BENCH / "callbacks.lua"
    results = {"inbound": [], "callback": []}
    acked = {"inbound": 0, "callback": 0}
    tables = {"inbound": "inbound_messages", "callback": "status_events"}
    failures = []
    for kind in ("inbound", "callback"):
        path = "/inbound-sms" if kind == "inbound" else "/message-status"
        warm = run_wrk(base_url, script, [workdir / f"{kind}-{warm_up}.tsv", 2, "", path],
                       args.connections, min(WARM_UP_SECONDS, args.duration))[0]
        acked[kind] += warm["acked"]
        print(f"warm-up: {warm['acked']} {kind} requests (not measured)")
    for r in range(args.rounds):
        print(f"\nround {r + 1} of {args.rounds}")
        order = ("inbound", "callback") if r % 2 == 0 else ("callback", "inbound")
        for kind in order:
            path = "/inbound-sms" if kind == "inbound" else "/message-status"
            cpu = cpu_seconds(service)
            result = run_wrk(base_url, script, [workdir / f"{kind}-{r}.tsv", 2, "", path],
                             args.connections, args.duration)[0]
            result["cores"] = (cpu_seconds(service) - cpu) / (result["duration_us"] / 1e6)
            if service.poll() is not None:
                raise SystemExit(f"FAILED: the service stopped; see {service.log_path}")
            results[kind].append(result)
            acked[kind] += result["acked"]
            print("  " + describe(kind, result))
            if result["exhausted"]:
                failures.append(f"{kind}: the pre-signed pool ran out; raise POOL_RATE")
            if result["server_errors"] or result["other"] or result["rejected"]:
                failures.append(f"{kind}: {result['server_errors']} 5xx, "
                                f"{result['other'] + result['rejected']} other answers")
            stored = settled_count(database, tables[kind])
            print(f"  {'':<10} stored {stored} in all, acknowledged {acked[kind]} in all: "
                  f"{'none missing' if stored >= acked[kind] else 'MISSING'}")
            if stored < acked[kind]:
                failures.append(f"{kind}: {acked[kind] - stored} acknowledged, not stored")
    pairs = sorted(rate(i) / rate(c)
                   for i, c in zip(results["inbound"], results["callback"], strict=True))
    opted_out = count_rows(database, "opt_outs")
    rates = {kind: median([rate(x) for x in runs]) for kind, runs in results.items()}
    print(f"\nmedians of {args.rounds} rounds: inbound {rates['inbound']:.0f}/s, callbacks "
          f"{rates['callback']:.0f}/s "
          f"(p99 {ms(median([x['p99_us'] for x in results['inbound']]))} and "
          f"{ms(median([x['p99_us'] for x in results['callback']]))} ms)")
    print(f"inbound / callbacks = {median(pairs):.3f} (median of the rounds' ratios; target "
          f">= 0.90: {verdict(median(pairs) >= 0.9)}; rounds "
          f"{' '.join(f'{x:.3f}' for x in pairs)}); {opted_out} numbers opted out at the end")
    return failures


def fill_opt_outs(database, count):
    """`count` numbers opted out, as PUT /opt-outs would have (source api)."""
    import sqlite3

    rows = [(f"+1444{n:07d}", "api", f"2026-01-01T00:00:{n % 60:02d}.000Z") for n in range(count)]
    if database.startswith("sqlite:///"):
        with sqlite3.connect(database[len("sqlite:///"):]) as conn:
            conn.executemany("INSERT INTO opt_outs (number, source, opted_out_at)"
                             " VALUES (?, ?, ?)", rows)
        return
    import psycopg
    with psycopg.connect(database) as conn, conn.cursor() as cursor:
        cursor.executemany("INSERT INTO opt_outs (number, source, opted_out_at)"
                           " VALUES (%s, %s, %s)", rows)


def measure_sends(args, workdir, processes, postgres):
    print(f"\npart 2: /send-sms here and in {args.compare}, side by side, simulated Twilio "
          f"latency {SEND_LATENCY_MS} ms, {args.connections} callers, {args.sends_duration} s "
          f"per measurement, {args.sends_rounds} rounds")
    servers = {}
    for name, repo in (("this", args.repo), ("compared", args.compare)):
        port, key = free_port(), secrets.token_urlsafe(24)
        database = postgres.fresh(workdir / f"sends-{name}.db")
        env = service_env(port, database, TWILIO_SIMULATE="true", API_KEY=key,
                          TWILIO_SIMULATE_LATENCY_MS=SEND_LATENCY_MS, MAX_SENDS_PER_HOUR=0)
        process = processes.start_server(f"sends-{name}", procfile_command(repo), repo, env,
                                         f"http://127.0.0.1:{port}/healthz")
        servers[name] = (process, port, key)
        if name == "this":
            fill_opt_outs(database, OPTED_OUT_NUMBERS)
    results = {"this": [], "compared": []}
    failures = []
    for r in range(args.sends_rounds):
        order = ("this", "compared") if r % 2 == 0 else ("compared", "this")
        for name in order:
            process, port, key = servers[name]
            result = run_wrk(f"http://127.0.0.1:{port}", BENCH / "sends.lua",
                             [key, 10 * r + (1 if name == "this" else 2)], args.connections,
                             args.sends_duration)[0]
            if process.poll() is not None:
                raise SystemExit(f"FAILED: {name} stopped; see {process.log_path}")
            results[name].append(result)
            per_second = result["ok"] / (result["duration_us"] / 1e6)
            print(f"  round {r + 1} {name:<9} {per_second:6.1f} sends/s  p50 "
                  f"{ms(result['p50_us'])}  p99 {ms(result['p99_us'])} ms  4xx "
                  f"{result['client_errors']}  5xx {result['server_errors']}")
            if result["client_errors"] or result["server_errors"]:
                failures.append(f"{name}: {result['client_errors']} 4xx, "
                                f"{result['server_errors']} 5xx")
            time.sleep(SETTLE_SECONDS)
    rates = {name: median([x["ok"] / (x["duration_us"] / 1e6) for x in runs])
             for name, runs in results.items()}
    p50s = {name: median([x["p50_us"] for x in runs]) for name, runs in results.items()}
    pairs = sorted(t["ok"] / t["duration_us"] / (c["ok"] / c["duration_us"])
                   for t, c in zip(results["this"], results["compared"], strict=True))
    cost = 1 - median(pairs)
    print(f"\nsends/s: {rates['this']:.1f} with the check ({OPTED_OUT_NUMBERS} numbers opted "
          f"out), {rates['compared']:.1f} without; p50 {ms(p50s['this'])} and "
          f"{ms(p50s['compared'])} ms")
    print(f"the check's cost = {cost * 100:.1f}% of sends/s (1 - the median of the rounds' "
          f"ratios; target <= 3%: {verdict(cost <= 0.03)}; rounds "
          f"{' '.join(f'{x:.3f}' for x in pairs)})")
    return failures


if __name__ == "__main__":
    sys.exit(main())
