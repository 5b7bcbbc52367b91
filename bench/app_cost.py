"""The app's own CPU time per status callback: `python bench/app_cost.py [--profile]`.

Calls each app's WSGI callable directly, on one thread, with distinct signed callbacks
(and with a wrong signature: 403), without gunicorn, sockets or other threads: what the
request path of the app itself costs, free of the GIL's contention and of a shared
machine's noise, which move bench/webhooks.py's rates by 15% or more. Measured:

- the reference (bench/reference_app.py: Flask and RequestValidator, nothing stored);
- the service's app with nothing stored (bench/floor_app.py's storage): its request hooks,
  guards, metrics, log line (written to /dev/null) and answer;
- with --repo DIR, the same app of another checkout (the commit before, say).

Each figure is the best of --runs runs of --requests callbacks (thread CPU time). With
--profile, cProfile's 25 costliest functions of each, by cumulative time, instead.
"""

import argparse
import cProfile
import io
import logging
import os
import pstats
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

BENCH = Path(__file__).resolve().parent
TOKEN = "0123456789abcdef0123456789abcdef"
BASE_URL = "http://127.0.0.1:3000"
URL = BASE_URL + "/message-status"


def load_app(kind, repo):
    """The WSGI app to measure, built in this process."""
    if kind == "reference":
        os.environ.update(REFERENCE_URL=URL, REFERENCE_TOKEN=TOKEN)
        sys.path.insert(0, str(BENCH))
        import reference_app

        return reference_app.app
    sys.path[:0] = [str(repo), str(repo / "tests"), str(BENCH)]
    from support import service_environment

    env = service_environment(3000, f"sqlite:///{tempfile.mkdtemp()}/app-cost.db",
                              simulate=False, TWILIO_AUTH_TOKEN=TOKEN, BASE_URL=BASE_URL)
    os.environ.update(env)  # for floor_app's own app, built at its import
    from floor_app import NothingStored

    from sms_status import create_app

    app = create_app(env)
    for handler in logging.getLogger("sms_status").handlers:
        handler.setStream(open(os.devnull, "w"))  # the line is formatted and written
    try:
        from sms_status.services import services
    except ImportError:  # a checkout from before the services object (--repo)
        app.extensions["storage"] = NothingStored()
    else:
        services(app).storage = NothingStored()
    return app


def environ(n, signed):
    """A WSGI environ of one status callback, distinct by `n`."""
    from twilio.request_validator import RequestValidator

    sid = f"SM{n:032x}"
    params = {"MessageSid": sid, "SmsSid": sid, "MessageStatus": "delivered",
              "SmsStatus": "delivered", "AccountSid": "AC" + "1" * 32, "From": "+15017122661",
              "To": "+15551234567", "ApiVersion": "2010-04-01"}
    body = urllib.parse.urlencode(params).encode()
    signature = RequestValidator(TOKEN if signed else "not-" + TOKEN).compute_signature(
        URL, params)
    return {"REQUEST_METHOD": "POST", "PATH_INFO": "/message-status", "SCRIPT_NAME": "",
            "QUERY_STRING": "", "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "3000",
            "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "127.0.0.1",
            "CONTENT_TYPE": "application/x-www-form-urlencoded",
            "CONTENT_LENGTH": str(len(body)), "HTTP_HOST": "127.0.0.1:3000",
            "HTTP_X_TWILIO_SIGNATURE": signature, "wsgi.input": io.BytesIO(body),
            "wsgi.url_scheme": "http", "wsgi.errors": sys.stderr, "wsgi.version": (1, 0),
            "wsgi.multithread": True, "wsgi.multiprocess": True, "wsgi.run_once": False}


def measure(kind, repo, signed, requests, runs, profile):
    """Prints one line: the best run's CPU microseconds per callback (or a profile)."""
    app = load_app(kind, repo)
    answers = []

    def start_response(status, headers, exc_info=None):
        answers.append(status.split()[0])

    def run(environs):
        for env in environs:
            for _ in app(env, start_response):
                pass

    run([environ(10**9 + n, signed) for n in range(100)])  # warm up
    expected = "200" if signed else "403"
    if profile:
        profiler = cProfile.Profile()
        environs = [environ(n, signed) for n in range(requests)]
        profiler.enable()
        run(environs)
        profiler.disable()
        pstats.Stats(profiler, stream=sys.stdout).sort_stats("cumulative").print_stats(25)
        return
    best = float("inf")
    for r in range(runs):
        environs = [environ(r * requests + n, signed) for n in range(requests)]
        answers.clear()
        started = time.thread_time()
        run(environs)
        best = min(best, time.thread_time() - started)
        if set(answers) != {expected}:
            raise SystemExit(f"{kind}: answered {sorted(set(answers))}, expected {expected}")
    print(f"{kind:<10} {expected}  {1e6 * best / requests:6.0f} us CPU per callback")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, help="also the app of another checkout")
    parser.add_argument("--requests", type=int, default=300, help="callbacks per run")
    parser.add_argument("--runs", type=int, default=40, help="runs; the best one counts")
    parser.add_argument("--profile", action="store_true", help="cProfile instead of timing")
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # kind, repo, signed
    args = parser.parse_args()
    if args.one:
        kind, repo, signed = args.one
        measure(kind, Path(repo), signed == "signed", args.requests, args.runs, args.profile)
        return
    # Each in a process of its own: two checkouts' packages share a name.
    kinds = [("reference", BENCH.parent), ("service", BENCH.parent)]
    if args.repo:
        kinds.append(("compared", args.repo.resolve()))
    print(f"best of {args.runs} runs of {args.requests} callbacks, one thread, no server")
    for signed in ("signed", "unsigned"):
        for kind, repo in kinds:
            argv = [sys.executable, __file__, "--one", kind, str(repo), signed,
                    "--requests", str(args.requests), "--runs", str(args.runs)]
            out = subprocess.run(argv + (["--profile"] if args.profile else []),
                                 capture_output=True, text=True, check=True).stdout
            # Without the service's start lines (they begin with the date).
            print("\n".join(line for line in out.splitlines() if not line[:4].isdigit()))


if __name__ == "__main__":
    main()
