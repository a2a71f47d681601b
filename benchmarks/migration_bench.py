"""How long a new shard takes to receive its half of the slots with their data, and what
foreground writes see meanwhile.

Starts a 1-shard x 3-member cluster (write quorum 2) against a running
ZooKeeper (``make zk-up``), loads ``--keys`` keys, then runs a foreground
writer (``--clients`` threads of sets through one ``dkv.Client``) while a
second shard of three members joins and the controller moves 512 slots to it.
Prints the move's duration and rate, and the foreground throughput and worst
latency before and during the move. Stops every process it started.

    python benchmarks/migration_bench.py [--zk 127.0.0.1:2181] [--keys 100000] [--clients 8]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cluster_bench import answers, serve, stop_all, wait_for  # noqa: E402

import dkv  # noqa: E402


class Foreground:
    """Threads of sets; per-second windows of (ops, worst latency)."""

    def __init__(self, client: dkv.Client, threads: int) -> None:
        self.client = client
        self.samples: list[tuple[float, float]] = []  # (completion time, latency)
        self.errors = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(t,), daemon=True) for t in range(threads)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def _run(self, t: int) -> None:
        i = 0
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                self.client.set(f"fg{t}:{i % 5000}", b"x" * 100)
            except dkv.errors.DKVError:
                with self._lock:
                    self.errors += 1
                continue
            done = time.monotonic()
            with self._lock:
                self.samples.append((done, done - t0))
            i += 1

    def window(self, start: float, end: float) -> dict[str, Any]:
        with self._lock:
            lat = [lt for at, lt in self.samples if start <= at < end]
        return {
            "ops_per_s": round(len(lat) / max(1e-9, end - start)),
            "max_latency_ms": round(1000 * max(lat, default=0.0), 1),
            "p50_ms": round(1000 * sorted(lat)[len(lat) // 2], 2) if lat else None,
        }


def cluster_info(zk: str) -> dict[str, Any]:
    with dkv.Client(zk=zk, timeout=5) as c:
        return c.cluster_info()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zk", default="127.0.0.1:2181")
    p.add_argument("--keys", type=int, default=100_000)
    p.add_argument("--value-size", type=int, default=100)
    p.add_argument("--clients", type=int, default=8, help="foreground writer threads")
    args = p.parse_args()
    data = tempfile.mkdtemp(prefix="dkv-migbench-")
    zk = f"{args.zk}/dkv-migbench-{uuid.uuid4().hex[:8]}"
    flags = ("--zk", zk, "--replication-factor", "3", "--write-quorum", "2")
    procs: list[subprocess.Popen[bytes]] = []

    def add(i: int) -> None:
        proc, addr = serve(data, f"n{i}", *flags)
        procs.append(proc)
        wait_for(lambda: answers(addr, lambda info: info.get("role") in ("writer", "replica")), 60, f"n{i} to join")

    try:
        for i in (1, 2, 3):
            add(i)
        client = dkv.Client(zk=zk, timeout=30)
        value = b"v" * args.value_size
        t0 = time.monotonic()
        for start in range(0, args.keys, 1000):
            client.mset({f"key{j}": value for j in range(start, min(args.keys, start + 1000))})
        print(f"loaded {args.keys} keys of {args.value_size} bytes in {time.monotonic() - t0:.1f}s", flush=True)
        fg = Foreground(client, args.clients)
        fg.start()
        time.sleep(5)  # a baseline window of foreground writes
        t_grow = time.monotonic()
        first_seen: list[float] = []

        def watch() -> None:
            while not first_seen:
                if cluster_info(zk).get("migrations"):
                    first_seen.append(time.monotonic())
                time.sleep(0.05)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        for i in (4, 5, 6):
            add(i)

        def balanced() -> bool:
            info = cluster_info(zk)
            return not info.get("migrations") and all(sh["slots"] for sh in info["shards"]) and len(info["shards"]) == 2

        wait_for(balanced, 600, "the move to finish")
        t_done = time.monotonic()
        fg.stop()
        before, during = fg.window(t_grow - 5, t_grow), fg.window(t_grow, t_done)
        moving = t_done - (first_seen[0] if first_seen else t_grow)
        print(
            f"second shard joined and received 512 slots (~{args.keys // 2} keys): {t_done - t_grow:.1f}s "
            f"from the first new node's start, {moving:.1f}s from the migration's creation "
            f"(~{round(args.keys / 2 / moving)} keys/s)"
        )
        print(f"foreground sets, {args.clients} threads: before {before}; during {during}; errors {fg.errors}")
        client.close()
        return 0
    finally:
        stop_all(procs, data)


if __name__ == "__main__":
    sys.exit(main())
