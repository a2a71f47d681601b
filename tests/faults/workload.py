"""Generate contended client traffic: threads doing random sets and gets on a few keys, recorded in a History.

This module's single job is *driving load*. :class:`Workload` runs ``threads``
client threads; each one repeatedly picks one of a few ``keys`` (few, so the
threads contend on them) and either sets it to a value unique to that operation
(``f"{process}-{counter}"``) or gets it, recording every operation in a
:class:`~tests.faults.history.History`. The run is bounded twice, by a total op
count and by a duration, so the threads always stop by themselves; ``stop()``
ends it early (between operations) and joins the threads.

Errors that faults are expected to cause (dkv errors, transport errors) are
recorded and the thread carries on. Any other exception is a bug: the thread
stops and ``stop()`` / ``join()`` re-raise it.
"""
from __future__ import annotations

import random
import threading
import time
from typing import Protocol

from tests.faults.history import History, Op, is_expected_error


class KVClient(Protocol):
    """The part of ``dkv.Client`` the workload uses (thread-safe)."""

    def set(self, key: str, value: str) -> None: ...

    def get(self, key: str) -> bytes | None: ...


class WorkloadError(RuntimeError):
    """A workload thread died of an unexpected exception."""


class Workload:
    """``threads`` client threads doing random sets/gets on ``keys`` until a bound is reached.

    ``read_ratio`` is the probability that an op is a get. ``seed`` makes each
    thread's sequence of choices (key, get or set) reproducible; the
    interleaving of course is not. ``max_ops`` bounds the ops of all threads
    together, ``max_duration`` (seconds) the time after ``start()`` at which no
    thread starts a new op. ``pause`` (seconds, default 0) is pure *rate
    limiting*: each thread waits that long between two of its ops, to keep a
    long fault test from producing a history too large to check. It never
    stands in for a condition; ``stop()`` interrupts it. Process ids are
    ``first_process .. first_process + threads - 1`` (give workloads sharing a
    history distinct ranges so the written values stay unique).
    """

    def __init__(self, client: KVClient, history: History, keys: list[str], threads: int,
                 read_ratio: float, seed: int, *, max_ops: int, max_duration: float,
                 pause: float = 0.0, first_process: int = 0) -> None:
        if not keys:
            raise ValueError("keys must not be empty")
        if threads < 1:
            raise ValueError("threads must be >= 1")
        if not 0.0 <= read_ratio <= 1.0:
            raise ValueError("read_ratio must be within [0, 1]")
        if max_ops < 0 or max_duration <= 0 or pause < 0:
            raise ValueError("max_ops must be >= 0, max_duration > 0, pause >= 0")
        self.client = client
        self.history = history
        self.keys = list(keys)
        self.n_threads = threads
        self.read_ratio = read_ratio
        self.seed = seed
        self.max_ops = max_ops
        self.max_duration = max_duration
        self.pause = pause
        self.first_process = first_process
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._issued = 0
        self._deadline = 0.0
        self._threads: list[threading.Thread] = []
        self._errors: list[BaseException] = []

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> "Workload":
        """Start the threads (once)."""
        if self._threads:
            raise RuntimeError("workload already started")
        self._deadline = time.monotonic() + self.max_duration
        for i in range(self.n_threads):
            process = self.first_process + i
            t = threading.Thread(target=self._run, args=(process, random.Random(f"{self.seed}/{i}")),
                                 name=f"workload-p{process}", daemon=True)
            self._threads.append(t)
        for t in self._threads:
            t.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        """Wait until every thread has stopped by itself (a bound was reached).

        Raises ``TimeoutError`` if ``timeout`` passes first, and
        :class:`WorkloadError` if a thread died of an unexpected exception.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                raise TimeoutError(f"workload thread {t.name} still running after {timeout:g}s")
        if self._errors:
            raise WorkloadError(f"{len(self._errors)} workload thread(s) failed: {self._errors[0]!r}") \
                from self._errors[0]

    def stop(self, timeout: float | None = None) -> None:
        """Ask the threads to stop after their current op, and join them (see :meth:`join`)."""
        self._stop.set()
        self.join(timeout)

    def run(self, timeout: float | None = None) -> History:
        """``start()`` then ``join()``: run to a bound; returns the history."""
        self.start()
        self.join(timeout)
        return self.history

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    # -- results -----------------------------------------------------------------------

    def acked_writes(self) -> dict[str, list[Op]]:
        """key -> the acknowledged (``ok``) sets of that key, by completion time."""
        out: dict[str, list[Op]] = {k: [] for k in self.keys}
        for op in self.history.ops:
            if op.kind == "set" and op.outcome == "ok" and op.key in out:
                out[op.key].append(op)
        for ops in out.values():
            ops.sort(key=lambda o: o.complete or 0.0)
        return {k: v for k, v in out.items() if v}

    # -- the client threads ------------------------------------------------------------------

    def _claim(self) -> bool:
        """Take one op from the shared budget; False once a bound is reached."""
        if self._stop.is_set() or time.monotonic() >= self._deadline:
            return False
        with self._lock:
            if self._issued >= self.max_ops:
                return False
            self._issued += 1
            return True

    def _run(self, process: int, rng: random.Random) -> None:
        counter = 0
        try:
            while self._claim():
                key = rng.choice(self.keys)
                try:
                    if rng.random() < self.read_ratio:
                        self.history.record(process, "get", key, None, lambda: self.client.get(key))
                    else:
                        counter += 1
                        value = f"{process}-{counter}"
                        self.history.record(process, "set", key, value, lambda: self.client.set(key, value))
                except Exception as e:
                    if not is_expected_error(e):
                        raise
                if self.pause:
                    self._stop.wait(self.pause)  # rate limiting only; stop() cuts it short
        except BaseException as e:  # delivered by join()
            with self._lock:
                self._errors.append(e)
