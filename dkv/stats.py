"""Cheap in-process counters for the node's hot paths, read by the metrics collectors.

The write path is performance-sensitive, so nothing here takes a lock or calls into a
metrics library: a :class:`Histogram` is a list of bucket counts bumped with one
``bisect``, and :class:`OpStats` tallies a whole batch of ops in a dict before it
touches a histogram (once per distinct op and outcome of the batch). Every
recorder runs on the node's gevent hub, or (the WAL's fsync histogram) in the one
threadpool call that appends at a time, so plain increments are safe; a scrape may
see a histogram's sum one observation ahead of its counts, which Prometheus
tolerates. :mod:`dkv.node.metrics` turns these into Prometheus metric families at
scrape time.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any, Iterable, Sequence

#: Seconds: request and fsync latencies (100 µs .. 10 s).
LATENCY_BOUNDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Records per group commit.
BATCH_BOUNDS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class Histogram:
    """Counts of observations per bucket (``v <= bound``, Prometheus' ``le``) and their sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound (+Inf)
        self.total = 0.0

    def observe(self, value: float, n: int = 1) -> None:
        self.counts[bisect_left(self.bounds, value)] += n
        self.total += value * n

    def buckets(self) -> list[tuple[str, int]]:
        """Cumulative ``(le, count)`` pairs ending with ``+Inf`` (what a HistogramMetricFamily takes)."""
        counts = list(self.counts)  # one copy: the cumulative counts agree with each other
        out, acc = [], 0
        for bound, c in zip((*self.bounds, float("inf")), counts):
            acc += c
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), acc))
        return out


class OpStats:
    """Per (op name, outcome): how many ops a node answered and how long their request took.

    An op's latency is that of the batch request that carried it (what its caller
    waited for on the node: the ops of a batch are answered together). ``outcome``
    is ``ok`` or the error code in lower case (``moved``, ``tryagain``, ...).
    """

    def __init__(self, names: Iterable[str]) -> None:
        #: op names counted by name (anything else a client sends counts as ``invalid``)
        self.names = frozenset(names)
        self.by_key: dict[tuple[str, str], Histogram] = {}

    def record(self, ops: Any, replies: Sequence[Sequence[Any]], seconds: float) -> None:
        """Count one answered batch: ``replies[i]`` (``[0, result]`` or ``[1, [code, ...]]``) of ``ops[i]``."""
        if len(replies) == 1:  # the common request: no tally
            self._observe(self._key(ops[0], replies[0]), seconds, 1)
            return
        tally: dict[tuple[str, str], int] = {}
        for op, reply in zip(ops, replies):
            key = self._key(op, reply)
            tally[key] = tally.get(key, 0) + 1
        for key, n in tally.items():
            self._observe(key, seconds, n)

    def _key(self, op: Any, reply: Sequence[Any]) -> tuple[str, str]:
        try:
            name = op[0] if op[0] in self.names else "invalid"
        except (TypeError, IndexError, KeyError):  # not a list, empty, an unhashable name
            name = "invalid"
        return name, "ok" if reply[0] == 0 else str(reply[1][0]).lower()

    def _observe(self, key: tuple[str, str], seconds: float, n: int) -> None:
        h = self.by_key.get(key)
        if h is None:
            h = self.by_key[key] = Histogram(LATENCY_BOUNDS)
        h.counts[bisect_left(h.bounds, seconds)] += n
        h.total += seconds * n

    def one(self, name: str, outcome: str, seconds: float) -> None:
        """Count one op (or one whole refused request) by name and outcome."""
        self._observe((name, outcome.lower()), seconds, 1)
