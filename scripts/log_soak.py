#!/usr/bin/env python3
"""A log soak: run a real 1x3 cluster under a light write load (and a writer kill or two), then
count the alarming lines in every node's log (issue 12, "quiet, honest logs").

Usage (from the repository root; ZooKeeper as the tests get it: DKV_TEST_ZK, Docker or the local
package)::

    .venv/bin/python scripts/log_soak.py --seconds 600 --kills 2
    .venv/bin/python scripts/log_soak.py --seconds 180 --green-check 1   # see below

It prints, per node log, the number of zerorpc ``gevent_zeromq BUG`` lines, of pyzmq's
``BUG: gevent may have missed`` lines, and of ERROR and WARNING lines (with the most frequent
WARNING/ERROR messages), plus the same count for this process (the load's ``dkv.Client`` and the
harness's probes) and the load's ops and errors. Exit 0 when no BUG line was found, 1 otherwise.

``--green-check S`` runs the nodes with pyzmq's own missed-event check switched on
(``zmq.green.Socket._debug_gevent``, re-checking after S seconds instead of 11.6): the check
zerorpc's sockets make every second. Read its lines as zerorpc's: a re-check that finds a
message prints one whether the message was missed or just arrived (or the hub was busy), so
with S = 1 a quiet cluster's ~1 s traffic prints some; a message truly missed would also
show as a late answer (the load's errors).

Why zerorpc's line appeared (tests/test_quiet.py shows it): its sockets re-check every second
while waiting and log at ERROR when a message is there, though nothing was missed or late.
dkv's sockets are pyzmq's green ones (dkv.transport.GreenContext), which do not.
"""

from __future__ import annotations

import argparse
import collections
import logging
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support import procs, zookeeper  # noqa: E402
from tests.support.cluster import Cluster  # noqa: E402
from tests.support.procs import wait_until  # noqa: E402

ZERORPC_BUG = "gevent_zeromq BUG"
PYZMQ_BUG = "BUG: gevent may have missed"
_LINE = re.compile(r"^\S+ \S+ (?P<level>[A-Z]+) \[[^]]*\] (?P<logger>\S+): (?P<msg>.*)$")

#: a node started through this stub checks for missed events on pyzmq's green sockets (--green-check)
_GREEN_CHECK = (
    "import sys, zmq.green as g; g.Socket._debug_gevent = True; "
    "g.Socket._gevent_bug_timeout = float(sys.argv[1]); "
    "from dkv.cli.main import main; sys.exit(main(sys.argv[5:]))"
)


class Counter(logging.Handler):
    """Counts this process's log records that carry zerorpc's BUG message."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.bug = 0

    def emit(self, record: logging.LogRecord) -> None:
        if ZERORPC_BUG in record.getMessage():
            self.bug += 1


def load(cluster: Cluster, rate: float, stop: threading.Event, stats: collections.Counter[str]) -> None:
    """Sets and gets at about ``rate`` ops/s until ``stop``; errors are counted, not raised."""
    client = cluster.client(timeout=5)
    try:
        i = 0
        while not stop.is_set():
            key = f"soak-{i % 500}"
            try:
                if i % 2:
                    client.get(key)
                else:
                    client.set(key, str(i).encode())
                stats["ok"] += 1
            except Exception as e:  # a failover makes a few fail: count them
                stats[f"error {type(e).__name__}"] += 1
            i += 1
            stop.wait(1 / rate)
    finally:
        client.close()


def kill_writer(cluster: Cluster) -> str:
    shard = next(iter(cluster.shard_members()))
    old = cluster.writer_of(shard)
    cluster.nodes[old].kill()
    wait_until(lambda: _writer(cluster, shard) not in (None, "", old), 60, "a new writer", interval=0.5)
    cluster.nodes[old].start()
    wait_until(lambda: cluster.in_sync(shard), 60, f"{old} back in sync", interval=0.5)
    return old


def _writer(cluster: Cluster, shard: str) -> str | None:
    try:
        return cluster.writer_of(shard)
    except Exception:
        return None


def summarize(path: Path) -> dict[str, object]:
    zerorpc_bug = pyzmq_bug = 0
    levels: collections.Counter[str] = collections.Counter()
    messages: collections.Counter[str] = collections.Counter()
    for line in path.read_text(errors="replace").splitlines():
        zerorpc_bug += ZERORPC_BUG in line
        pyzmq_bug += PYZMQ_BUG in line
        m = _LINE.match(line)
        if m:
            levels[m["level"]] += 1
            if m["level"] in ("WARNING", "ERROR", "CRITICAL"):
                messages[f"{m['level']} {m['logger']}: {re.sub(r'[0-9]+', 'N', m['msg'])[:110]}"] += 1
    return {"zerorpc_bug": zerorpc_bug, "pyzmq_bug": pyzmq_bug, "levels": dict(levels), "top": messages.most_common(4)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=180, help="length of the soak")
    p.add_argument("--kills", type=int, default=1, help="writer kills (kill -9, then restart), evenly spaced")
    p.add_argument("--rate", type=float, default=10, help="load: ops per second (half sets, half gets)")
    p.add_argument("--log-level", default="INFO", help="the nodes' --log-level")
    p.add_argument(
        "--green-check",
        type=float,
        default=0,
        metavar="S",
        help="print pyzmq's missed-event BUG line after S seconds (0: off)",
    )
    p.add_argument("--keep", action="store_true", help="keep the logs' directory")
    args = p.parse_args()

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    counter = Counter()
    logging.getLogger().addHandler(counter)
    if args.green_check:
        argv = procs.NodeProcess.argv

        def checked(self: procs.NodeProcess) -> list[str]:
            return [sys.executable, "-c", _GREEN_CHECK, str(args.green_check), *argv(self)]

        procs.NodeProcess.argv = checked  # type: ignore[method-assign]

    root = Path(tempfile.mkdtemp(prefix="dkv-log-soak-"))
    server = zookeeper.provide()
    from kazoo.client import KazooClient

    chroot = f"/dkv-soak-{uuid.uuid4().hex[:8]}"
    kz = KazooClient(server.hosts)
    kz.start(timeout=30)
    kz.ensure_path(chroot)
    cluster = Cluster(server.hosts + chroot, root, shards=1, replication_factor=3, write_quorum=2, session_timeout=4.0)
    orig_init = procs.NodeProcess.__init__  # the harness starts nodes at WARNING; the soak reads INFO too

    def init(self: procs.NodeProcess, *a: object, **kw: object) -> None:
        kw["log_level"] = args.log_level
        orig_init(self, *a, **kw)  # type: ignore[arg-type]

    procs.NodeProcess.__init__ = init  # type: ignore[method-assign]

    stats: collections.Counter[str] = collections.Counter()
    stop = threading.Event()
    started = time.monotonic()
    killed: list[str] = []
    try:
        cluster.start()
        print(
            f"cluster up in {time.monotonic() - started:.1f}s; soaking {args.seconds:g}s "
            f"(load {args.rate:g} ops/s, {args.kills} writer kill(s)); logs in {root}",
            flush=True,
        )
        t = threading.Thread(target=load, args=(cluster, args.rate, stop, stats), daemon=True)
        t0 = time.monotonic()
        t.start()
        for k in range(args.kills):
            at = t0 + args.seconds * (k + 1) / (args.kills + 1)
            stop.wait(max(0.0, at - time.monotonic()))
            killed.append(kill_writer(cluster))
            print(
                f"  {time.monotonic() - t0:5.0f}s killed writer {killed[-1]}; new writer elected, "
                f"{killed[-1]} restarted and in sync",
                flush=True,
            )
        stop.wait(max(0.0, t0 + args.seconds - time.monotonic()))
        stop.set()
        t.join(15)
    finally:
        stop.set()
        cluster.stop()
        try:
            kz.delete(chroot, recursive=True)
        finally:
            kz.stop()
            kz.close()
            server.stop()

    total = 0
    for log in sorted({n.log_path for n in cluster.nodes.values()}):
        s = summarize(log)
        total += int(s["zerorpc_bug"]) + int(s["pyzmq_bug"])  # type: ignore[call-overload]
        print(
            f"{log.name}: zerorpc BUG lines {s['zerorpc_bug']}, pyzmq BUG lines {s['pyzmq_bug']}, "
            f"lines by level {s['levels']}"
        )
        for msg, count in s["top"]:  # type: ignore[attr-defined]
            print(f"    {count:4d} x {msg}")
    total += counter.bug
    print(f"this process (load client + harness probes): zerorpc BUG lines {counter.bug}")
    print(f"load: {dict(stats)}; writers killed: {killed or 'none'}")
    print(f"TOTAL BUG lines: {total}")
    if args.keep:
        print(f"logs kept in {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if total == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
