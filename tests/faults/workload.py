"""Generate contended client traffic: threads doing random sets and gets on a few keys, recorded in a History.

This module's single job is *driving load*. :class:`Workload` runs ``threads``
client threads; each one repeatedly picks one of a few ``keys`` (few, so the
threads contend on them) and either sets it to a value unique to that operation
(``f"{process}-{counter}"``) or gets it, recording every operation in a
:class:`~tests.faults.history.History`. The run is bounded twice, by a total op
count and by a duration, so the threads always stop by themselves; ``stop()``
ends it early (between operations) and joins the threads.

:class:`MixedWorkload` adds deletes, multi-key calls (``mset``/``mget``),
compare-and-set on the same keys and increments of separate counter keys, and
reads with a chosen consistency level (one client per thread, or a shared one).

Errors that faults are expected to cause (dkv errors, transport errors) are
recorded and the thread carries on. Any other exception is a bug: the thread
stops and ``stop()`` / ``join()`` re-raise it.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Protocol, Sequence

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

    def __init__(
        self,
        client: KVClient,
        history: History,
        keys: list[str],
        threads: int,
        read_ratio: float,
        seed: int,
        *,
        max_ops: int,
        max_duration: float,
        pause: float = 0.0,
        first_process: int = 0,
    ) -> None:
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
            t = threading.Thread(
                target=self._run,
                args=(process, random.Random(f"{self.seed}/{i}")),
                name=f"workload-p{process}",
                daemon=True,
            )
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
            raise WorkloadError(
                f"{len(self._errors)} workload thread(s) failed: {self._errors[0]!r}"
            ) from self._errors[0]

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


class MultiKVClient(Protocol):
    """The part of ``dkv.Client`` :class:`MixedWorkload` uses (thread-safe)."""

    def set(self, key: str, value: str) -> None: ...

    def get(self, key: str, consistency: str = ...) -> bytes | None: ...

    def delete(self, key: str) -> bool: ...

    def mset(self, mapping: dict[str, str]) -> None: ...

    def mget(self, keys: list[str], consistency: str = ...) -> list[bytes | None]: ...

    def cas(self, key: str, expected: str | None, new: str) -> bool: ...

    def incr(self, key: str, amount: int = ...) -> int: ...


#: The default mix of :class:`MixedWorkload`: call kind -> weight.
DEFAULT_MIX = {"get": 0.40, "set": 0.30, "delete": 0.08, "mset": 0.10, "mget": 0.12}
#: Every kind :class:`MixedWorkload` knows (``incr`` needs counter keys).
KINDS = (*DEFAULT_MIX, "cas", "incr")
#: A mix with compare-and-set and counters too (the nemesis test's).
COORDINATION_MIX = {"get": 0.34, "set": 0.22, "delete": 0.06, "mset": 0.08, "mget": 0.10, "cas": 0.12, "incr": 0.08}
#: How often a cas expects absence (None) rather than the value its thread last saw
CAS_EXPECT_ABSENT = 0.15


class MixedWorkload(Workload):
    """Like :class:`Workload`, with every kind of call a register checker can judge.

    Each op is one *call* drawn from ``mix`` (kind -> weight): ``get`` (with
    ``consistency``), ``set`` (a value unique to the op), ``delete``, ``mset``
    and ``mget`` of 2..``max_multi`` distinct keys, ``cas`` (expecting the value
    the thread last read or wrote on the key, or absence; writing a value unique to
    the op), ``incr`` (by 1, of one of ``counters``: keys no other kind touches).
    Multi-key calls are recorded as one op per key sharing the call's window
    (:meth:`History.record_many`), deletes as writes of None. ``clients`` is one client shared by every thread
    or a list (thread ``i`` uses ``clients[i % len(clients)]``). ``max_ops``
    bounds the calls. Only ``consistency="linearizable"`` reads may be judged
    by :func:`~tests.faults.checkers.check_linearizable`.
    """

    def __init__(
        self,
        clients: MultiKVClient | Sequence[MultiKVClient],
        history: History,
        keys: list[str],
        threads: int,
        seed: int,
        *,
        max_ops: int,
        max_duration: float,
        pause: float = 0.0,
        first_process: int = 0,
        mix: dict[str, float] | None = None,
        consistency: str = "linearizable",
        max_multi: int = 4,
        counters: Sequence[str] = (),
    ) -> None:
        mix = dict(DEFAULT_MIX if mix is None else mix)
        unknown = set(mix) - set(KINDS)
        if unknown or not mix or min(mix.values()) < 0 or sum(mix.values()) <= 0:
            raise ValueError(f"mix must weigh some of {sorted(KINDS)}, got {mix}")
        if mix.get("incr", 0) > 0 and not counters:
            raise ValueError("incr needs counter keys")
        if set(counters) & set(keys):
            raise ValueError("counter keys must not be register keys")
        if max_multi < 2 or max_multi > len(keys):
            raise ValueError("max_multi must be within [2, len(keys)]")
        client_list: list[MultiKVClient] = list(clients) if isinstance(clients, (list, tuple)) else [clients]  # type: ignore[list-item]
        if not client_list:
            raise ValueError("clients must not be empty")
        reads = (mix.get("get", 0) + mix.get("mget", 0)) / sum(mix.values())
        super().__init__(
            client_list[0],
            history,
            keys,
            threads,
            reads,
            seed,
            max_ops=max_ops,  # type: ignore[arg-type]
            max_duration=max_duration,
            pause=pause,
            first_process=first_process,
        )
        self.clients = client_list
        self.mix = mix
        self.consistency = consistency
        self.max_multi = max_multi
        self.counters = list(counters)
        #: calls made, by kind (a multi-key call counts once)
        self.calls: dict[str, int] = {k: 0 for k in mix}

    def _run(self, process: int, rng: random.Random) -> None:
        client = self.clients[(process - self.first_process) % len(self.clients)]
        kinds, weights = list(self.mix), list(self.mix.values())
        h, level = self.history, self.consistency
        counter = 0
        known: dict[str, str | None] = {}  # key -> the value this thread last read or wrote there

        def text(v: bytes | str | None) -> str | None:
            return v.decode() if isinstance(v, bytes) else v

        try:
            while self._claim():
                kind = rng.choices(kinds, weights)[0]
                with self._lock:
                    self.calls[kind] += 1
                try:
                    if kind in ("mset", "mget"):
                        keys = rng.sample(self.keys, rng.randint(2, self.max_multi))
                        if kind == "mget":
                            got = h.record_many(
                                process, "get", [(k, None) for k in keys], lambda: client.mget(keys, consistency=level)
                            )
                            known.update(zip(keys, map(text, got)))
                        else:
                            items = []
                            for k in keys:
                                counter += 1
                                items.append((k, f"{process}-{counter}"))
                            h.record_many(process, "set", items, lambda: client.mset(dict(items)))
                            known.update(items)
                        continue
                    if kind == "incr":
                        ckey = rng.choice(self.counters)
                        h.record(process, "incr", ckey, None, lambda: client.incr(ckey, 1))
                        continue
                    key = rng.choice(self.keys)
                    if kind == "get":
                        known[key] = text(
                            h.record(process, "get", key, None, lambda: client.get(key, consistency=level))
                        )
                    elif kind == "delete":
                        h.record(process, "delete", key, None, lambda: client.delete(key))
                        known[key] = None
                    elif kind == "cas":
                        counter += 1
                        value = f"{process}-{counter}"
                        expected = None if rng.random() < CAS_EXPECT_ABSENT else known.get(key)
                        if h.record(
                            process, "cas", key, value, lambda: client.cas(key, expected, value), expected=expected
                        ):
                            known[key] = value
                    else:
                        counter += 1
                        value = f"{process}-{counter}"
                        h.record(process, "set", key, value, lambda: client.set(key, value))
                        known[key] = value
                except Exception as e:
                    if not is_expected_error(e):
                        raise
                finally:
                    if self.pause:
                        self._stop.wait(self.pause)  # rate limiting only; stop() cuts it short
        except BaseException as e:  # delivered by join()
            with self._lock:
                self._errors.append(e)
