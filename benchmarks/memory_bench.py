"""Memory of a node holding many keys: load N keys of V bytes into a fresh standalone node
(``mset`` pages of 2,000) and report its resident set size (issue 10: 1M keys of 100 bytes
must fit in 150 MB)."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

from cluster_bench import answers, serve, stop_all, wait_for

import dkv


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) / 1024


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keys", type=int, default=1_000_000)
    p.add_argument("--value-size", type=int, default=100)
    args = p.parse_args()
    data = tempfile.mkdtemp(prefix="dkv-mem-")
    procs = []
    try:
        proc, addr = serve(data, "mem")
        procs.append(proc)
        wait_for(lambda: answers(addr), 30, "the node")
        start = rss_mb(proc.pid)
        client = dkv.Client([addr], timeout=30)
        value = b"x" * args.value_size
        t0 = time.monotonic()
        for i in range(0, args.keys, 2000):
            client.mset({b"key:%010d" % j: value for j in range(i, min(i + 2000, args.keys))})
        took = time.monotonic() - t0
        client.close()
        print(
            f"{args.keys} keys of {args.value_size} bytes loaded in {took:.1f} s ({args.keys / took:,.0f} keys/s); "
            f"node RSS {start:.0f} MB empty, {rss_mb(proc.pid):.0f} MB loaded"
        )
        return 0
    finally:
        stop_all(procs, data)


if __name__ == "__main__":
    sys.exit(main())
