"""Time ``dkv backup`` and ``dkv restore`` of N keys: standalone -> standalone, and (with --zk) 1x3 -> 1x3.

    python benchmarks/backup_bench.py [--keys 100000] [--value-size 100] [--zk 127.0.0.1:2181]

Loads the keys with ``mset`` pages, then runs the real CLI (``dkv backup ADDR DIR``,
``dkv restore ADDR DIR``, or ``--zk`` for the clusters), prints each command's wall
time and its summary line, checks the restored digest equals the source's
(standalone), and stops every process it started.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid

from cluster_bench import answers, serve, start_nodes, stop_all, wait_for

import dkv


def load(addr: str, keys: int, value_size: int) -> None:
    value = b"v" * value_size
    with dkv.Client(addr, timeout=60) as c:
        for start in range(0, keys, 5000):
            c.mset({f"key:{i:08d}": value for i in range(start, min(keys, start + 5000))})


def timed(*args: str) -> float:
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "dkv.cli.main", *args, "--quiet"], capture_output=True, text=True, check=False
    )
    took = time.monotonic() - started
    if out.returncode:
        raise SystemExit(f"dkv {' '.join(args)} failed: {out.stderr}")
    print(f"  dkv {args[0]}: {took:.2f}s wall -- {out.stdout.strip()}", flush=True)
    return took


def digest(addr: str) -> str:
    from dkv.client.connection import call_once

    return call_once(addr, "digest", 0, 1023, timeout=60, auth=None)[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keys", type=int, default=100_000)
    p.add_argument("--value-size", type=int, default=100)
    p.add_argument("--zk", default="", help="ZooKeeper HOST:PORT: also a 1x3 cluster -> a fresh 1x3 cluster")
    args = p.parse_args()
    data = tempfile.mkdtemp(prefix="dkv-backup-bench-")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        print(f"== standalone -> standalone: {args.keys:,} keys of {args.value_size} bytes", flush=True)
        proc, dst = serve(data, "restored")
        procs.append(proc)
        zk = f"{args.zk}/dkv-backup-bench-{uuid.uuid4().hex[:8]}" if args.zk else ""
        if zk:
            src, writer = start_nodes(data, zk, procs)
        else:
            proc, src = serve(data, "standalone")
            procs.append(proc)
        wait_for(lambda: answers(src) and answers(dst), 30, "the standalone nodes")
        load(src, args.keys, args.value_size)
        timed("backup", src, os.path.join(data, "bk-standalone"))
        timed("restore", dst, os.path.join(data, "bk-standalone"))
        assert digest(src) == digest(dst), "the restored node's digest differs from the source's"
        print("  digests equal", flush=True)
        if zk:
            print(f"== cluster 1x3 -> fresh cluster 1x3 (write quorum 2): {args.keys:,} keys", flush=True)
            load(writer, args.keys, args.value_size)
            timed("backup", "--zk", zk, os.path.join(data, "bk-cluster"))
            target = f"{zk}-target"
            from kazoo.client import KazooClient

            zkc = KazooClient(args.zk)
            zkc.start(timeout=30)
            zkc.ensure_path(target[len(args.zk) :])
            zkc.ensure_path(zk[len(args.zk) :])
            zkc.stop()
            zkc.close()
            addrs = []
            for i in (1, 2, 3):
                proc, addr = serve(data, f"t{i}", "--zk", target, "--replication-factor", "3", "--write-quorum", "2")
                procs.append(proc)
                addrs.append(addr)
                wait_for(
                    lambda a=addr: answers(a, lambda info: info.get("role") in ("writer", "replica")),
                    60,
                    f"t{i} to join",
                )
            timed("restore", "--zk", target, os.path.join(data, "bk-cluster"))
        return 0
    finally:
        stop_all(procs, data)


if __name__ == "__main__":
    sys.exit(main())
