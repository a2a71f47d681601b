"""Replicated vs standalone write throughput, measured in one run with ``dkv bench``.

Starts a standalone node and a 1-shard x 3-member cluster (write quorum 2)
against a running ZooKeeper (``make zk-up``), runs ``dkv bench`` at each client
count against both, prints the reports, and stops every process it started.

    python benchmarks/cluster_bench.py [--zk 127.0.0.1:2181] [--clients 1 32] [--ops 20000] \
        [--op set cas incr] [--keys 1000]

Each ``--op`` is a ``dkv bench --op``: ``set`` (sets only), ``cas`` (every op one
successful ``cas`` on a key only it holds), ``incr`` (one increment of a random counter).
Per client count the ops run in turn against each target, in the same window.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any, Callable

import dkv


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.2)


def serve(data: str, node_id: str, *flags: str, new_session: bool = False) -> tuple[subprocess.Popen[bytes], str]:
    """Start a node (in its own session with ``new_session``, so a Ctrl-C reaches only the caller);
    its output goes to ``DATA/NODE_ID.log``, not the benchmark's terminal."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "dkv.cli.main",
        "serve",
        "--node-id",
        node_id,
        "--port",
        str(port),
        "--data-dir",
        os.path.join(data, node_id),
        "--log-level",
        "WARNING",
        *flags,
    ]
    os.makedirs(data, exist_ok=True)
    with open(os.path.join(data, f"{node_id}.log"), "ab") as log:
        proc = subprocess.Popen(cmd, start_new_session=new_session, stdout=log, stderr=subprocess.STDOUT)
    return proc, f"127.0.0.1:{port}"


def answers(addr: str, check: Callable[[dict[str, Any]], bool] = lambda i: True) -> bool:
    try:
        with dkv.Client(addr, timeout=1) as c:
            return check(c.info())
    except dkv.errors.DKVError:
        return False


def bench(addr: str, clients: int, ops: int, value_size: int, op: str = "set", keys: int = 100_000) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "dkv.cli.main",
            "bench",
            addr,
            "--clients",
            str(clients),
            "--ops",
            str(ops),
            "--value-size",
            str(value_size),
            "--op",
            op,
            "--keys",
            str(keys),
            "--no-progress",
        ],
        check=True,
    )


def start_nodes(data: str, zk: str, procs: list[subprocess.Popen[bytes]], new_session: bool = False) -> tuple[str, str]:
    """A standalone node and a 1x3 cluster (write_quorum 2) under ``zk``, each started process
    appended to ``procs`` (so the caller stops them whatever fails); (standalone, writer) addresses
    once both replicas are in sync."""
    proc, standalone = serve(data, "standalone", new_session=new_session)
    procs.append(proc)
    writer_addr = ""
    for i in (1, 2, 3):  # one at a time: n1 becomes the writer, n2 and n3 its replicas
        proc, addr = serve(
            data, f"n{i}", "--zk", zk, "--replication-factor", "3", "--write-quorum", "2", new_session=new_session
        )
        procs.append(proc)
        writer_addr = writer_addr or addr
        wait_for(lambda a=addr: answers(a, lambda info: info.get("role") in ("writer", "replica")), 60, f"n{i} to join")
    wait_for(
        lambda: answers(
            writer_addr,
            lambda info: (
                all(r["state"] == "in_sync" for r in info["replication"]["replicas"].values())
                and len(info["replication"]["replicas"]) == 2
            ),
        ),
        60,
        "both replicas in sync",
    )
    wait_for(lambda: answers(standalone), 30, "the standalone node")
    return standalone, writer_addr


def stop_all(procs: list[subprocess.Popen[bytes]], data: str) -> None:
    """SIGTERM every node (kill one that does not stop in 15 s), then delete their data."""
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
    shutil.rmtree(data, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zk", default="127.0.0.1:2181")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 32])
    p.add_argument("--ops", type=int, default=20000, help="ops at the highest client count (1 client: a quarter)")
    p.add_argument("--value-size", type=int, default=100)
    p.add_argument(
        "--op",
        nargs="+",
        default=["set"],
        choices=["set", "cas", "incr"],
        help="dkv bench --op of each run (default: set)",
    )
    p.add_argument("--keys", type=int, default=100_000, help="key space of each run")
    args = p.parse_args()
    data = tempfile.mkdtemp(prefix="dkv-bench-")
    zk = f"{args.zk}/dkv-bench-{uuid.uuid4().hex[:8]}"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        standalone, writer_addr = start_nodes(data, zk, procs)
        for clients in args.clients:
            ops = args.ops if clients == max(args.clients) else max(1000, args.ops // 4)
            for name, addr in (("standalone", standalone), ("cluster 1x3, write_quorum=2", writer_addr)):
                for op in args.op:
                    values = "" if op == "incr" else f", {args.value_size}-byte values"
                    print(f"== {name}: {clients} client(s), {ops} {op} ops{values}, {args.keys} keys", flush=True)
                    bench(addr, clients, ops, args.value_size, op, args.keys)
        return 0
    finally:
        stop_all(procs, data)


if __name__ == "__main__":
    sys.exit(main())
