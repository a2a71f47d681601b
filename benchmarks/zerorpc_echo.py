"""Baseline for ``dkv bench``: the cost of a bare zerorpc round trip.

``python benchmarks/zerorpc_echo.py --clients 32 --ops 50000 --value-size 100``
starts an ``echo(x) -> x`` zerorpc server in a child process on a free
127.0.0.1 port (this same script with ``--serve PORT``), then runs the load
from N greenlets sharing ONE ``zerorpc.Client`` (as dkv's client shares one
connection per node), measured and reported by the same functions as
``dkv bench`` (:mod:`dkv.cli.bench`). The server is killed at the end.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()  # before zerorpc/zmq: every client is a greenlet on one hub, as in dkv bench

import argparse  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import zerorpc  # noqa: E402

from dkv.cli.bench import format_report, progress_stream, run_load  # noqa: E402

#: Seconds to wait for the server to answer its first echo.
STARTUP_TIMEOUT = 15.0


class Echo:
    def echo(self, x: object) -> object:
        return x


def serve(port: int) -> None:
    server = zerorpc.Server(Echo())
    server.bind(f"tcp://127.0.0.1:{port}")
    server.run()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_answers(endpoint: str, server: subprocess.Popen[bytes]) -> None:
    """Echo with a short timeout until the server answers; fail if it exits or takes too long."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        if server.poll() is not None:
            raise SystemExit(f"echo server exited with status {server.returncode}")
        probe = zerorpc.Client(timeout=0.5, heartbeat=None)
        try:
            probe.connect(endpoint)
            if probe.echo(b"ping") == b"ping":
                return
        except (zerorpc.TimeoutExpired, zerorpc.LostRemote):
            pass
        finally:
            probe.close()
        if time.monotonic() > deadline:
            raise SystemExit(f"echo server did not answer within {STARTUP_TIMEOUT:g}s")


def bench(clients: int, ops: int, value_size: int, timeout: float, progress: bool) -> int:
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", str(port)])
    try:
        wait_until_answers(endpoint, server)
        rpc = zerorpc.Client(timeout=timeout, heartbeat=5)
        rpc.connect(endpoint)
        value = os.urandom(value_size)
        try:
            result = run_load(lambda i: rpc.echo(value), clients=clients, ops=ops, progress=progress_stream(progress))
        finally:
            rpc.close()
    finally:
        server.kill()
        server.wait()
    print(
        format_report(
            [
                ("target", f"zerorpc echo 127.0.0.1:{port}"),
                ("clients", str(clients)),
                ("ops", str(ops)),
                ("value size", f"{value_size} bytes"),
            ],
            result,
        ),
        flush=True,
    )
    return 1 if result.failed else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=32, help="concurrent greenlets")
    p.add_argument("--ops", type=int, default=100_000, help="total echo calls")
    p.add_argument("--value-size", type=int, default=100, help="bytes echoed per call")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per call")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve is not None:
        serve(args.serve)
        return 0
    if args.clients < 1 or args.ops < 1 or args.value_size < 0:
        p.error("--clients and --ops must be >= 1, --value-size >= 0")
    return bench(args.clients, args.ops, args.value_size, args.timeout, not args.no_progress)


if __name__ == "__main__":
    sys.exit(main())
