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
import json
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

    ops: int  # operations started (with --duration: however many fitted in the time)
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
    return (
        f"[{'#' * filled}{'-' * (PROGRESS_WIDTH - filled)}] {int(frac * 100):3d}% {done}/{total} ops {rate:.0f} ops/s"
    )


def duration_progress_line(elapsed: float, duration: float, done: int) -> str:
    """``[#####-----] 52% 5.2/10.0 s 41230 ops/s`` (a run bounded by time, not by ops)."""
    frac = min(elapsed / duration, 1.0) if duration > 0 else 1.0
    filled = int(frac * PROGRESS_WIDTH)
    rate = done / elapsed if elapsed > 0 else 0.0
    return (
        f"[{'#' * filled}{'-' * (PROGRESS_WIDTH - filled)}] {int(frac * 100):3d}% "
        f"{min(elapsed, duration):.1f}/{duration:.1f} s {rate:.0f} ops/s"
    )


def run_load(
    op: Callable[[int], object],
    *,
    clients: int,
    ops: int | None = None,
    duration: float | None = None,
    progress: TextIO | None = None,
) -> LoadResult:
    """Call ``op(i)`` for i = 0, 1, ... from ``clients`` concurrent greenlets; time each call.

    Exactly one of ``ops`` and ``duration`` says when to stop: after ``ops``
    calls (each greenlet takes the next index from a shared counter until
    ``ops`` are taken), or once ``duration`` seconds have passed (no greenlet
    starts a call after that; calls in flight finish and count). An exception
    from ``op`` counts as a failed op (by class name). When ``progress`` is
    given, a progress line is redrawn on it while the load runs and erased at
    the end.
    """
    import gevent

    if (ops is None) == (duration is None):
        raise ValueError("give exactly one of ops and duration")
    if clients < 1 or (ops is not None and ops < 1) or (duration is not None and not duration > 0):
        raise ValueError("clients and ops must be at least 1, duration more than 0")
    counter = itertools.count()
    result = LoadResult(ops=ops or 0, elapsed=0.0)
    clock = time.perf_counter
    limit = ops if ops is not None else sys.maxsize
    deadline = float("inf")  # set just before the workers start

    def worker() -> None:
        for i in counter:
            if i >= limit or clock() >= deadline:
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
            if duration is not None:
                out.write("\r" + duration_progress_line(clock() - start, duration, done))
            else:
                out.write("\r" + progress_line(done, limit, clock() - start))
            out.flush()

    start = clock()
    if duration is not None:
        deadline = start + duration
    bar = gevent.spawn(show_progress, progress) if progress is not None else None
    try:
        gevent.joinall([gevent.spawn(worker) for _ in range(min(clients, limit))], raise_error=True)
    finally:
        result.elapsed = clock() - start
        if duration is not None:
            result.ops = result.succeeded + result.failed
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


def report_json(params: Sequence[tuple[str, object]], result: LoadResult) -> str:
    """The benchmark report as one line of JSON, for scripts (``dkv bench --json``).

    ``params`` become top-level fields; latencies are in milliseconds (None
    when no op succeeded), errors map exception class names to counts.
    """
    lat = result.latencies
    doc: dict[str, object] = dict(params)
    doc.update(
        {
            "ops": result.ops,
            "succeeded": result.succeeded,
            "failed": result.failed,
            "elapsed_s": round(result.elapsed, 6),
            "throughput_ops_s": round(result.throughput, 3),
        }
    )
    for name, pct in (("p50", 50.0), ("p95", 95.0), ("p99", 99.0), ("max", 100.0)):
        doc[f"{name}_ms"] = round(percentile(lat, pct) * 1000, 6) if lat else None
    doc["errors"] = dict(result.errors.most_common())
    return json.dumps(doc, sort_keys=False)


def progress_stream(enabled: bool) -> TextIO | None:
    """stderr when a progress bar was asked for and stderr is a terminal, else None."""
    return sys.stderr if enabled and sys.stderr.isatty() else None


def bench_key(i: int) -> bytes:
    """The 16-byte key of index ``i`` (``bench:0000000042``); benchmarks/vs_etcd.py uses the same keys."""
    return f"bench:{i:010d}".encode()


#: ``dkv bench --op``: the SET:GET mix of ``--ratio``, only sets, only gets, counters, CAS loops
OPS = ("mix", "set", "get", "incr", "cas")


class CasMismatch(Exception):
    """A ``cas`` whose expected value (the last one this run wrote) was not the key's value."""


def cas_value(n: int, value_size: int) -> bytes:
    """The ``n``-th value of a CAS-benchmark key: ``n`` in decimal, padded with dots to ``value_size``."""
    return str(n).encode().ljust(value_size, b".")


class CasKeys:
    """The keys of ``dkv bench --op cas`` and the value this run last wrote to each.

    An op takes a key no other op holds (:meth:`take`), so it knows the key's value
    and its ``cas(expected=last, new=next)`` must succeed; it gives the key back
    with the new count (:meth:`give`), or with None when the outcome is unknown (an
    error, a mismatch): the next op on that key reads it first. Keys are taken in
    turn (FIFO), so with ``keys >= clients`` no op waits for one.
    """

    def __init__(self, prefix: str, keys: int) -> None:
        from gevent.queue import Queue

        self.prefix = prefix
        self._free: Queue[int] = Queue()
        for i in range(keys):
            self._free.put(i)
        #: per key: the count last written (-1: absent, the run's keys are new), None: unknown
        self.last: list[int | None] = [-1] * keys

    def key(self, i: int) -> bytes:
        return f"{self.prefix}{i:010d}".encode()

    def take(self) -> int:
        return self._free.get()

    def give(self, i: int, count: int | None) -> None:
        self.last[i] = count
        self._free.put(i)


def run_bench(
    addrs: list[str],
    clients: int,
    ops: int | None,
    value_size: int,
    ratio: tuple[int, int],
    keys: int,
    timeout: float,
    progress: bool,
    consistency: str = "sequential",
    auth: str | None = None,
    duration: float | None = None,
    as_json: bool = False,
    op_kind: str = "mix",
) -> int:
    """``dkv bench``: run the load against ``addrs``, print the report; 1 if any op failed.

    Exactly one of ``ops`` and ``duration`` (seconds) bounds the run. With
    ``as_json`` the report is one line of JSON (:func:`report_json`).

    ``op_kind`` (:data:`OPS`): ``mix`` sets and gets ``bench:`` keys in the
    ``ratio``; ``set`` and ``get`` do only that; ``incr`` increments a random
    ``bench-incr:`` counter per op; ``cas`` gives every op a key no other op holds
    (keys named for this run, so they start absent) and does one
    ``cas(key, last value written, next value)``: every one must succeed, a
    mismatch is counted as a ``CasMismatch`` error (and the key is re-read).
    """
    # Patch first: the client must see a gevent-patched `threading` when it is
    # imported and built, so it runs inline on this hub (not on a private hub
    # thread) and the greenlets below are coalesced into batch RPCs.
    from gevent import monkey

    monkey.patch_all()
    from dkv.client import Client
    from dkv.errors import InvalidArgument

    if op_kind not in OPS:
        raise InvalidArgument(f"--op must be one of {', '.join(OPS)}, not {op_kind!r}")
    sets, gets = {"mix": ratio, "set": (1, 0), "get": (0, 1)}.get(op_kind, ratio)
    if op_kind == "cas" and keys < clients:
        raise InvalidArgument("--op cas needs --keys >= --clients (each op holds a key of its own)")
    if (ops is None) == (duration is None):
        raise InvalidArgument("give exactly one of --ops and --duration")
    if duration is not None and not duration > 0:
        raise InvalidArgument("--duration must be more than 0 seconds")
    if (
        clients < 1
        or (ops is not None and ops < 1)
        or keys < 1
        or value_size < 0
        or sets < 0
        or gets < 0
        or sets + gets == 0
    ):
        raise InvalidArgument(
            "clients, ops and keys must be >= 1, value size >= 0, and the ratio must have a set or a get"
        )
    rng = random.Random()
    buf = os.urandom(value_size + 1024)  # one random buffer; values are slices of it
    period = sets + gets

    client = Client(addrs, timeout=timeout, auth=auth or None)
    try:
        client.get(bench_key(0))  # connect and learn the slot map outside the timed run

        cas_keys = CasKeys(f"bench-cas:{os.urandom(4).hex()}:", keys) if op_kind == "cas" else None

        def op(i: int) -> None:
            if op_kind == "incr":
                client.incr(f"bench-incr:{rng.randrange(keys):010d}")
                return
            if cas_keys is not None:
                cas_op()
                return
            key = bench_key(rng.randrange(keys))
            if i % period < sets:
                at = rng.randrange(1024)
                client.set(key, buf[at : at + value_size])
            else:
                client.get(key, consistency=consistency)

        def cas_op() -> None:
            assert cas_keys is not None
            k = cas_keys.take()
            key, last = cas_keys.key(k), cas_keys.last[k]
            count: int | None = None
            try:
                if last is None:  # unknown after an error: read it (part of this op's time)
                    value = client.get(key)
                    last = -1 if value is None else int(value.split(b".", 1)[0])
                expected = None if last == -1 else cas_value(last, value_size)
                if not client.cas(key, expected, cas_value(last + 1, value_size)):
                    raise CasMismatch(f"{key!r} did not hold {expected!r}")
                count = last + 1
            finally:
                cas_keys.give(k, count)

        result = run_load(
            op, clients=clients, ops=ops, duration=duration, progress=None if as_json else progress_stream(progress)
        )
    finally:
        client.close()
    if as_json:
        print(
            report_json(
                [
                    ("target", ",".join(addrs)),
                    ("op", op_kind),
                    ("clients", clients),
                    ("duration_s", duration),
                    ("value_size", value_size),
                    ("ratio", [sets, gets] if op_kind in ("mix", "set", "get") else None),
                    ("consistency", consistency),
                    ("keys", keys),
                ],
                result,
            ),
            flush=True,
        )
        return 1 if result.failed else 0
    params = [
        ("target", ",".join(addrs)),
        ("op", op_kind),
        ("clients", str(clients)),
        ("ops", str(result.ops) if duration is None else f"{result.ops} in {duration:g} s"),
        ("value size", f"{value_size} bytes" if op_kind != "incr" else "-"),
    ]
    if op_kind in ("mix", "set", "get"):
        params += [("ratio", f"{sets}:{gets} (SET:GET)"), ("gets", consistency)]
    if op_kind == "cas":
        params.append(("cas", f"{result.succeeded} of {result.ops} succeeded"))
    params.append(("keys", str(keys)))
    print(format_report(params, result), flush=True)
    return 1 if result.failed else 0
