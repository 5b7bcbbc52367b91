"""Round trips of a callback's write to a stand-in writer process: the writer's own framing
against `multiprocessing.connection`, side by side in the same rounds.

- `framing`: writer.py's `Client.call` in the clients, and in the stand-in the writer's
  own loop (`Connections`: selectors, `take_frames`, `Write.decode`, `Answer.encode`).
- `mp.connection`: `multiprocessing.connection.Client` and `Listener` with an `authkey`
  (its HMAC handshake on each new connection), `send_bytes` and `recv_bytes`, the same
  `Write` and `Answer` inside, the kernel's timeouts on the clients' sockets as writer.py
  sets them, and the stand-in waiting on its connections with `connection.wait`.

The stand-in's write does nothing, so the figures are the hand-over alone: an upper bound
of what the framing can change in the service, where a write's SQL and a commit come on
top. Each measurement prints round trips per second and the CPU each costs the clients
and the stand-in; the rounds alternate which of the two goes first, and the medians of
the rounds are printed at the end.

    .venv/bin/python bench/writer_framing.py                 # 5 rounds of 3 s per setting
    .venv/bin/python bench/writer_framing.py --threads 1,16 --rounds 7 --duration 5
"""

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing import connection as mp
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(1, str(ROOT))

from sms_status.logs import LogBudget  # noqa: E402
from sms_status.storage import writer  # noqa: E402

KEY = b"a key the clients and the stand-in share"
SID = "SM" + "0" * 32
# A status callback's write, as web/callbacks.py hands it over.
ARGS = [SID, "delivered", None]
KWARGS = {"to": "+15558675309", "from_": "+15017122661", "account_sid": "AC" + "0" * 32}
FUNCTIONS = {"record_status": lambda storage, *args, **kwargs: True}
VARIANTS = ("framing", "mp.connection")


# --- the stand-ins for the writer, each in a process of its own -----------------------------

def serve_framing(path):
    """The writer's loop (writer.serve) with a write that does nothing and no gather wait."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1024)
    connections = writer.Connections(listener, writer.connection_limit(),
                                     LogBudget(writer.FRAME_WARNINGS_PER_MINUTE))
    while True:
        batch = []
        for sock in connections.ready(timeout=0.5):
            if sock is listener:
                connections.accept()
            elif sock in connections.received:
                batch += [(sock, write) for write in connections.receive(sock, FUNCTIONS)]
        for sock, write in batch:
            if sock in connections.received:
                result = FUNCTIONS[write.name](None, *write.args, **write.kwargs)
                connections.answer(sock, writer.Answer.ok(result))


def serve_mp(path):
    """The same loop over multiprocessing.connection: accept() runs the authkey's handshake."""
    listener = mp.Listener(path, family="AF_UNIX", authkey=KEY)
    listening = listener._listener._socket  # waited on beside the connections
    conns = []
    while True:
        batch = []
        for ready in mp.wait([listening, *conns], timeout=0.5):
            if ready is listening:
                conns.append(listener.accept())
                continue
            try:
                batch.append((ready, writer.Write.decode(
                    ready.recv_bytes(writer.MAX_FRAME_BYTES), FUNCTIONS)))
            except (EOFError, OSError, writer.BadFrame):
                conns.remove(ready)
                ready.close()
        for conn, write in batch:
            result = FUNCTIONS[write.name](None, *write.args, **write.kwargs)
            conn.send_bytes(writer.Answer.ok(result).encode())


# --- the clients: threads of this process, a connection each --------------------------------

def framing_client(path):
    client = writer.Client(path)
    return lambda: client.call("record_status", ARGS, KWARGS)


def mp_client(path):
    conn = mp.Client(path, family="AF_UNIX", authkey=KEY)
    sock = socket.socket(fileno=conn.fileno())
    writer.set_timeouts(sock, writer.ANSWER_TIMEOUT_SECONDS)  # as Client._connection does
    sock.detach()

    def call():
        conn.send_bytes(writer.Write("record_status", ARGS, KWARGS).encode())
        return writer.Answer.decode(conn.recv_bytes(writer.MAX_FRAME_BYTES)).result()

    return call


CLIENTS = {"framing": framing_client, "mp.connection": mp_client}


def cpu_seconds(pid):
    """User and system CPU a process has used, from /proc."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(variant, path, server_pid, threads, duration):
    """Round trips per second, and the clients' and the stand-in's CPU per round trip (µs)."""
    calls = [CLIENTS[variant](path) for _ in range(threads)]
    for call in calls:
        assert call() is True  # connected, and the answer understood
    counts = [0] * threads
    stop = threading.Event()

    def run(index):
        call, done = calls[index], 0
        while not stop.is_set():
            call()
            done += 1
        counts[index] = done

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    server_cpu, client_cpu = cpu_seconds(server_pid), time.process_time()
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    time.sleep(duration)
    stop.set()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - started
    server_cpu, client_cpu = cpu_seconds(server_pid) - server_cpu, time.process_time() - client_cpu
    total = sum(counts)
    return total / elapsed, 1e6 * client_cpu / total, 1e6 * server_cpu / total


def connect_cost(variant, path, connections=200):
    """Microseconds to open a connection and make its first round trip."""
    started = time.perf_counter()
    for _ in range(connections):
        CLIENTS[variant](path)()
    return 1e6 * (time.perf_counter() - started) / connections


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", default="1,16",
                        help="client threads (a connection each), comma-separated settings")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    parser.add_argument("--serve", nargs=2, metavar=("VARIANT", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        variant, path = args.serve
        (serve_framing if variant == "framing" else serve_mp)(path)
        return

    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    folder = tempfile.mkdtemp(prefix="writer-framing-")
    servers, paths = {}, {}
    try:
        for variant in VARIANTS:
            paths[variant] = os.path.join(folder, variant)
            servers[variant] = subprocess.Popen(
                [sys.executable, __file__, "--serve", variant, paths[variant]])
            while not os.path.exists(paths[variant]):
                time.sleep(0.05)
        settings = [int(threads) for threads in args.threads.split(",")]
        results = {(variant, threads): [] for variant in VARIANTS for threads in settings}
        connects = {variant: [] for variant in VARIANTS}
        for round_ in range(args.rounds):
            order = VARIANTS if round_ % 2 == 0 else VARIANTS[::-1]
            for threads in settings:
                for variant in order:
                    figures = measure(variant, paths[variant], servers[variant].pid, threads,
                                      args.duration)
                    results[variant, threads].append(figures)
                    print(f"round {round_ + 1}, {threads:>2} threads, {variant:<13} "
                          f"{figures[0]:>8,.0f} round trips/s, CPU per round trip: clients "
                          f"{figures[1]:.1f} µs, stand-in {figures[2]:.1f} µs", flush=True)
            for variant in order:
                connects[variant].append(connect_cost(variant, paths[variant]))
        print("\nmedians of", args.rounds, "rounds; uptime:",
              subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
        print("| client threads | | round trips/s | clients' CPU µs | stand-in's CPU µs |"
              " framing / mp (median of the rounds' ratios) |")
        print("| --- | --- | ---: | ---: | ---: | ---: |")
        for threads in settings:
            ratios = [framing[0] / other[0] for framing, other in zip(
                results["framing", threads], results["mp.connection", threads], strict=True)]
            for variant in VARIANTS:
                rate, client_us, server_us = (statistics.median(column) for column in zip(
                    *results[variant, threads], strict=True))
                ratio = f"{statistics.median(ratios):.2f}" if variant == "framing" else ""
                print(f"| {threads} | {variant} | {rate:,.0f} | {client_us:.1f} | "
                      f"{server_us:.1f} | {ratio} |")
        for variant in VARIANTS:
            print(f"a new connection and its first round trip, {variant}: "
                  f"{statistics.median(connects[variant]):.0f} µs")
    finally:
        for server in servers.values():
            server.kill()
            server.wait()
        for path in paths.values():
            if os.path.exists(path):
                os.unlink(path)
        os.rmdir(folder)


if __name__ == "__main__":
    main()
