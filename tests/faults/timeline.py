"""Put node logs and client ops on one time axis, for failure reports.

This module's single job is *explaining* a failed run. Node logs (``dkv serve``
writes ``%(asctime)s %(levelname)s [node] logger: message``, local wall-clock
time with milliseconds) are parsed into :class:`LogLine` s whose ``t`` is
seconds since the run's start, given the wall-clock time ``wall0`` that
matches the monotonic ``t0`` of the history. Lines without a timestamp
(tracebacks) take the time of the line before them.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterable

from tests.faults.history import Op

_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


@dataclass
class LogLine:
    t: float  # seconds since the run's start
    node: str
    text: str

    def __str__(self) -> str:
        return f"{self.t:8.3f}s {self.node:>4} | {self.text}"


def parse_log(path: Path, node: str, wall0: float) -> list[LogLine]:
    """The lines of one node's log file, timed relative to ``wall0`` (``time.time()`` at t0)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    out: list[LogLine] = []
    t = float("-inf")
    for raw in text.splitlines():
        m = _STAMP.match(raw)
        if m:
            t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() - wall0
            raw = raw[m.end() :]
        out.append(LogLine(t, node, raw))
    return out


def merged_logs(paths: dict[str, Path], wall0: float) -> list[LogLine]:
    """Every node's lines (node id -> log path) merged in time order."""
    lines = [line for node, p in sorted(paths.items()) for line in parse_log(p, node, wall0)]
    return sorted(lines, key=lambda x: x.t)  # stable: a node's untimed lines stay after their line


def collapse(lines: list[LogLine]) -> list[LogLine]:
    """Runs of one node's identical message (e.g. a replica that does not answer) as one line."""
    out: list[LogLine] = []
    first: dict[tuple[str, str], int] = {}  # (node, text) -> index in out of its run's first line
    counts: dict[int, tuple[int, float]] = {}
    for x in lines:
        i = first.get((x.node, x.text))
        if i is not None and all(y.node != x.node for y in out[i + 1 :]):  # nothing else from that node since
            n, _ = counts.get(i, (1, x.t))
            counts[i] = (n + 1, x.t)
            continue
        first[(x.node, x.text)] = len(out)
        out.append(x)
    for i, (n, last) in counts.items():
        out[i] = LogLine(out[i].t, out[i].node, f"{out[i].text}  [x{n}, the last at {last:.3f}s]")
    return out


def around(lines: list[LogLine], start: float, end: float, limit: int = 60) -> list[LogLine]:
    """The lines within ``[start, end]`` (repeats collapsed); at most ``limit`` (the first fifth
    and the rest from the end)."""
    picked = collapse([x for x in lines if start <= x.t <= end])
    if len(picked) <= limit:
        return picked
    head = limit // 5
    return [
        *picked[:head],
        LogLine(picked[head].t, "...", f"({len(picked) - limit} lines left out)"),
        *picked[len(picked) - (limit - head) :],
    ]


def rebase(ops: Iterable[Op], t0: float) -> list[Op]:
    """Copies of ``ops`` with times in seconds since ``t0`` (for readable reports)."""
    return [
        dataclasses.replace(o, invoke=o.invoke - t0, complete=None if o.complete is None else o.complete - t0)
        for o in ops
    ]
