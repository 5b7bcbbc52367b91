"""Checks the service against its own OpenAPI document: `python .ci/contract.py [-n N]`.

Starts the service as the Procfile does (gunicorn with the repository's gunicorn.conf.py)
in simulation mode with an API key, a fresh database and a free 127.0.0.1 port, runs
schemathesis against the document it serves at /openapi.json, and stops it again. Exits
with schemathesis' exit code: any failed check fails CI.
"""

import argparse
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from common import ROOT, Processes, service_env  # noqa: E402

from support import free_port, procfile_command  # noqa: E402

# Every check except positive_data_acceptance, which expects each schema-valid request to
# succeed. Here some must not: /message-status refuses anything without Twilio's real
# signature (403), the simulated Twilio refuses its test numbers (400), and /messages and
# /stats refuse a `since` not before `until` or a `cursor` they did not issue (400): rules
# between values, or secrets, that a schema cannot express.
EXCLUDED_CHECKS = "positive_data_acceptance"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--max-examples", type=int, default=100,
                        help="test cases per operation and phase (default 100)")
    args = parser.parse_args()
    api_key = secrets.token_urlsafe(24)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    workdir = Path(tempfile.mkdtemp(prefix="contract-"))  # the database and the log
    with Processes(workdir) as processes:
        env = service_env(port, workdir / "contract.db", TWILIO_SIMULATE="true",
                          API_KEY=api_key, LOG_LEVEL="WARNING",
                          # No per-recipient limit: generated sends reuse a few numbers,
                          # and every one should go through the (simulated) Twilio path.
                          MAX_SENDS_PER_RECIPIENT_PER_HOUR="0")
        processes.start_server("service", procfile_command(ROOT), ROOT, env, url + "/healthz")
        command = [
            str(Path(sys.executable).parent / "schemathesis"), "run", url + "/openapi.json",
            "--checks", "all", "--exclude-checks", EXCLUDED_CHECKS,
            "--header", f"Authorization: Bearer {api_key}",
            "--max-examples", str(args.max_examples),
            # The stateful phase needs OpenAPI links between operations; there are none.
            "--phases", "examples,coverage,fuzzing",
            "--request-timeout", "10",
        ]
        result = subprocess.run(command, cwd=workdir, timeout=600)
    if result.returncode == 0:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"service log and database kept in {workdir}")
    sys.exit(result.returncode)


if __name__ == "__main__":
    main()
