"""``dkv bench``: drive a node with concurrent clients and report throughput and latency.

The measurement itself (:func:`run_load`, :func:`percentile`,
:func:`format_report`) takes the operation as a callable, so other benchmarks
(``benchmarks/zerorpc_echo.py``) are measured and reported the same way.

Concurrency model: :func:`run_bench` monkey-patches the process with gevent
*before* importing the client, so :class:`~dkv.client.Client` runs inline on
the one hub and each simulated client is a greenlet. Concurrent greenlets'
requests are coalesced by the shared client into batch RPCs, as they would be
in a gevent application. This module imports nothing from gevent at import
time; only the functions that need it do.
"""
from __future__ import annotations

import itertools
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence, TextIO

#: Progress bar refreshes per second.
PROGRESS_HZ = 5
PROGRESS_WIDTH = 30


@dataclass
class LoadResult:
    """What :func:`run_load` measured."""

    ops: int
    elapsed: float  # seconds, wall clock of the whole run
    latencies: list[float] = field(default_factory=list)  # seconds per successful op, sorted
    errors: Counter[str] = field(default_factory=Counter)  # failed ops by exception class name

    @property
    def succeeded(self) -> int:
        return len(self.latencies)

    @property
    def failed(self) -> int:
        return sum(self.errors.values())

    @property
    def throughput(self) -> float:
        """Successful ops per second."""
        return self.succeeded / self.elapsed if self.elapsed > 0 else 0.0


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """The nearest-rank ``pct`` percentile (0 < pct <= 100) of an ascending, non-empty sequence."""
    if not sorted_values:
        raise ValueError("percentile of an empty sequence")
    if not 0 < pct <= 100:
        raise ValueError("pct must be in (0, 100]")
    rank = -(-pct * len(sorted_values) // 100)  # ceil(pct/100 * n)
    return sorted_values[max(int(rank), 1) - 1]


def progress_line(done: int, total: int, elapsed: float) -> str:
    """``[#####-----] 52% 52000/100000 ops 41230 ops/s``."""
    frac = done / total if total else 1.0
    filled = int(frac * PROGRESS_WIDTH)
    rate = done / elapsed if elapsed > 0 else 0.0
    return (f"[{'#' * filled}{'-' * (PROGRESS_WIDTH - filled)}] {int(frac * 100):3d}% "
            f"{done}/{total} ops {rate:.0f} ops/s")


def run_load(op: Callable[[int], object], *, clients: int, ops: int,
             progress: TextIO | None = None) -> LoadResult:
    """Call ``op(i)`` for i in 0..ops-1 from ``clients`` concurrent greenlets; time each call.

    Each greenlet takes the next index from a shared counter until ``ops`` are
    taken. An exception from ``op`` counts as a failed op (by class name). When
    ``progress`` is given, a progress line is redrawn on it while the load runs
    and erased at the end.
    """
    import gevent

    if clients < 1 or ops < 1:
        raise ValueError("clients and ops must be at least 1")
    counter = itertools.count()
    result = LoadResult(ops=ops, elapsed=0.0)
    clock = time.perf_counter

    def worker() -> None:
        for i in counter:
            if i >= ops:
                return
            t0 = clock()
            try:
                op(i)
            except Exception as e:  # counted, reported by class name
                result.errors[type(e).__name__] += 1
            else:
                result.latencies.append(clock() - t0)

    def show_progress(out: TextIO) -> None:
        while True:
            gevent.sleep(1 / PROGRESS_HZ)
            done = result.succeeded + result.failed
            out.write("\r" + progress_line(done, ops, clock() - start))
            out.flush()

    start = clock()
    bar = gevent.spawn(show_progress, progress) if progress is not None else None
    try:
        gevent.joinall([gevent.spawn(worker) for _ in range(min(clients, ops))], raise_error=True)
    finally:
        result.elapsed = clock() - start
        if bar is not None and progress is not None:
            bar.kill()
            progress.write("\r\x1b[K")
            progress.flush()
    result.latencies.sort()
    return result


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f} ms"


def format_report(params: Sequence[tuple[str, str]], result: LoadResult) -> str:
    """The benchmark report: ``params`` (label, value) lines, then what was measured."""
    lines = list(params) + [
        ("elapsed", f"{result.elapsed:.3f} s"),
        ("throughput", f"{result.throughput:.0f} ops/s"),
    ]
    lat = result.latencies
    for name, pct in (("p50", 50.0), ("p95", 95.0), ("p99", 99.0), ("max", 100.0)):
        lines.append((f"latency {name}", _ms(percentile(lat, pct)) if lat else "n/a"))
    errors = f"{result.failed}"
    if result.errors:
        errors += " (" + ", ".join(f"{name} {n}" for name, n in result.errors.most_common()) + ")"
    lines.append(("errors", errors))
    width = max(len(label) for label, _ in lines) + 1
    return "\n".join(f"{label + ':':<{width}} {value}" for label, value in lines)


def progress_stream(enabled: bool) -> TextIO | None:
    """stderr when a progress bar was asked for and stderr is a terminal, else None."""
    return sys.stderr if enabled and sys.stderr.isatty() else None


def bench_key(i: int) -> bytes:
    return f"bench:{i:08d}".encode()


def run_bench(addrs: list[str], clients: int, ops: int, value_size: int, ratio: tuple[int, int],
              keys: int, timeout: float, progress: bool, consistency: str = "sequential",
              auth: str | None = None) -> int:
    """``dkv bench``: run the load against ``addrs``, print the report; 1 if any op failed."""
    # Patch first: the client must see a gevent-patched `threading` when it is
    # imported and built, so it runs inline on this hub (not on a private hub
    # thread) and the greenlets below are coalesced into batch RPCs.
    from gevent import monkey

    monkey.patch_all()
    from dkv.client import Client
    from dkv.errors import InvalidArgument

    sets, gets = ratio
    if clients < 1 or ops < 1 or keys < 1 or value_size < 0 or sets < 0 or gets < 0 or sets + gets == 0:
        raise InvalidArgument("clients, ops and keys must be >= 1, value size >= 0, "
                              "and the ratio must have a set or a get")
    rng = random.Random()
    buf = os.urandom(value_size + 1024)  # one random buffer; values are slices of it
    period = sets + gets

    client = Client(addrs, timeout=timeout, auth=auth or None)
    try:
        client.get(bench_key(0))  # connect and learn the slot map outside the timed run

        def op(i: int) -> None:
            key = bench_key(rng.randrange(keys))
            if i % period < sets:
                at = rng.randrange(1024)
                client.set(key, buf[at:at + value_size])
            else:
                client.get(key, consistency=consistency)

        result = run_load(op, clients=clients, ops=ops, progress=progress_stream(progress))
    finally:
        client.close()
    print(format_report([
        ("target", ",".join(addrs)),
        ("clients", str(clients)),
        ("ops", str(ops)),
        ("value size", f"{value_size} bytes"),
        ("ratio", f"{sets}:{gets} (SET:GET)"),
        ("gets", consistency),
        ("keys", str(keys)),
    ], result), flush=True)
    return 1 if result.failed else 0
