"""Record what clients did: a thread-safe log of operations with their real-time windows and outcomes.

This module's single job is *recording*. Every operation is an :class:`Op`
invoked at ``time.monotonic()`` and completed with one of three outcomes:

``"ok"``
    The operation took effect (a set or delete was acknowledged; a get returned ``value``;
    a cas returned ``result``, True or False; an incr returned ``result``, the new count).
``"fail"``
    Definite: the operation had no effect. A set that got a *definite* ``DKVError``
    (DESIGN G5: "not applied") and every get that failed, whatever the error
    (a read has no effect either way).
``"info"``
    Indeterminate, writes only: the write may or may not have been applied, now or
    later (``WriteTimeout``, a transport error, or anything unexpected). For the
    checkers an ``info`` write's window never closes.

Kinds: ``"set"`` writes ``value``; ``"delete"`` is a write of ``None`` (the key
is absent afterwards: its ``value`` is always ``None``); ``"get"`` reads;
``"cas"`` writes ``value`` if the key holds ``expected`` (``None``: absent) and
its ``result`` says whether it did (an ``ok`` cas whose result is False is a
read that saw something other than ``expected``); ``"incr"`` adds 1 to a
counter key (never a register key) and its ``result`` is the new count. A
multi-key call is recorded as one op per key sharing its window (see
:meth:`History.record_many`), which is exactly what a per-key register checker
needs: each key's effect happened somewhere inside the call.

The checkers (:mod:`tests.faults.checkers`) judge a history; this module only
records it.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence, TypeVar

import zerorpc

from dkv.client.connection import TransportError
from dkv.errors import DKVError

Kind = Literal["set", "delete", "get", "cas", "incr"]
KINDS = ("set", "delete", "get", "cas", "incr")
#: the kinds that may change state (a delete writes None; a cas may not, see Op.writes_register)
WRITE_KINDS = ("set", "delete", "cas", "incr")
#: the kinds of a register (per-key linearizability); incr works on separate counter keys
REGISTER_KINDS = ("set", "delete", "get", "cas")
Outcome = Literal["ok", "fail", "info"]
T = TypeVar("T")

#: Errors a client may legitimately see while nodes crash, pause or are cut off.
#: Anything else raised by a client call is a bug in the harness or the client.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    DKVError,
    TransportError,
    OSError,
    zerorpc.TimeoutExpired,
    zerorpc.LostRemote,
)


def is_expected_error(error: BaseException) -> bool:
    """True for the errors faults are expected to cause (dkv errors and transport errors)."""
    return isinstance(error, EXPECTED_ERRORS)


def _text(value: str | bytes | None) -> str | None:
    """Values are recorded as ``str``; the client returns ``bytes`` (UTF-8)."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return value


@dataclass
class Op:
    """One client operation on one key.

    ``value`` is the written value for a set or a cas (``None`` for a delete and an
    incr), and the value read (filled at completion; ``None`` for an absent key) for a
    get. ``expected`` is a cas's expected value (``None``: absent). ``result`` is what an
    ``ok`` cas (True/False) or incr (the new count) returned. ``complete`` and
    ``outcome`` are ``None`` while the operation is in flight.
    """

    index: int
    process: int
    kind: Kind
    key: str
    value: str | None
    invoke: float
    complete: float | None = None
    outcome: Outcome | None = None
    error: str | None = None
    expected: str | None = None
    result: bool | int | None = None

    @property
    def pending(self) -> bool:
        return self.outcome is None

    @property
    def is_write(self) -> bool:
        """A set, delete (a write of ``None``), cas or incr: an op whose failure may be indeterminate."""
        return self.kind in WRITE_KINDS

    @property
    def writes_register(self) -> bool:
        """A register write that may have taken effect, or definitely failed: a set, a delete, a
        cas (not one known to have found another value: that is a read)."""
        if self.kind == "cas":
            return not (self.outcome == "ok" and self.result is False)
        return self.kind in ("set", "delete")

    def __str__(self) -> str:
        done = "…" if self.complete is None else f"{self.complete:.6f}"
        err = f" ({self.error})" if self.error else ""
        if self.kind == "cas":
            call = f"cas({self.key!r}, {self.expected!r} -> {self.value!r})"
        elif self.kind == "incr":
            call = f"incr({self.key!r})"
        else:
            call = f"{self.kind}({self.key!r}, {self.value!r})"
        res = f" -> {self.result}" if self.outcome == "ok" and self.kind in ("cas", "incr") else ""
        return f"#{self.index} p{self.process} {call} [{self.invoke:.6f}, {done}] {self.outcome or 'pending'}{res}{err}"


class History:
    """A thread-safe, append-only list of :class:`Op` s.

    Any number of threads may invoke and complete operations concurrently. One
    ``process`` must have at most one operation in flight at a time (the usual
    history model: a process is a sequential client thread).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._ops: list[Op] = []

    # -- recording -----------------------------------------------------------------

    def invoke(
        self,
        process: int,
        kind: Kind,
        key: str,
        value: str | bytes | None = None,
        *,
        expected: str | bytes | None = None,
    ) -> Op:
        """Record the start of an operation; ``value`` is the value a set or cas writes,
        ``expected`` the value a cas expects (None: absent)."""
        if kind not in KINDS:
            raise ValueError(f"unknown op kind {kind!r}")
        if kind in ("set", "cas") and value is None:
            raise ValueError(f"a {kind} needs a value")
        if kind in ("delete", "incr") and value is not None:
            raise ValueError(f"a {kind} writes no value")
        if kind != "cas" and expected is not None:
            raise ValueError("only a cas expects a value")
        with self._lock:
            op = Op(
                len(self._ops),
                process,
                kind,
                key,
                _text(value) if kind in ("set", "cas") else None,
                self._clock(),
                expected=_text(expected),
            )
            self._ops.append(op)
            return op

    def ok(self, op: Op, value: Any = None) -> None:
        """The operation took effect; for a get, ``value`` is what it read; for a cas or an
        incr, what it returned."""
        self._complete(op, "ok", None, value)

    def fail(self, op: Op, error: BaseException | str | None = None) -> None:
        """The operation certainly had no effect (a definite error)."""
        self._complete(op, "fail", error)

    def info(self, op: Op, error: BaseException | str | None = None) -> None:
        """The outcome is unknown (a write that may or may not be applied).

        A get has no effect either way, so a get recorded here becomes ``"fail"``.
        """
        self._complete(op, "info" if op.is_write else "fail", error)

    def _complete(
        self, op: Op, outcome: Outcome, error: BaseException | str | None, value: str | bytes | None = None
    ) -> None:
        with self._lock:
            if op.outcome is not None:
                raise ValueError(f"op #{op.index} already completed: {op}")
            op.complete = self._clock()
            op.outcome = outcome
            if error is not None:
                op.error = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
            if outcome == "ok" and op.kind == "get":
                op.value = _text(value)
            elif outcome == "ok" and op.kind == "cas":
                op.result = bool(value)
            elif outcome == "ok" and op.kind == "incr":
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"an incr returns an int, got {value!r}")
                op.result = value

    def record(
        self,
        process: int,
        kind: Kind,
        key: str,
        value: str | bytes | None,
        fn: Callable[[], T],
        *,
        expected: str | bytes | None = None,
    ) -> T:
        """Invoke, run ``fn()``, complete with the classified outcome, return ``fn``'s result.

        A get's result is recorded as the value read, a cas's or an incr's as its
        ``result``. On an exception the outcome is classified, then the exception is
        re-raised for the caller to judge: a write (set, delete, cas, incr) gets
        ``"fail"`` only for a *definite* ``DKVError``; ``WriteTimeout``, transport
        errors and any other exception make it ``"info"`` (it may have been
        applied). Any error on a get makes it ``"fail"``.
        """
        op = self.invoke(process, kind, key, value, expected=expected)
        try:
            result = fn()
        except BaseException as e:
            if op.is_write and isinstance(e, DKVError) and e.definite:
                self.fail(op, e)
            else:
                self.info(op, e)  # a get becomes "fail"
            raise
        self.ok(op, result if kind in ("get", "cas", "incr") else None)
        return result

    def record_many(
        self, process: int, kind: Kind, items: Sequence[tuple[str, str | bytes | None]], fn: Callable[[], T]
    ) -> T:
        """A multi-key call (``mset``: kind ``"set"``; ``mget``: kind ``"get"``) as one op per
        key, all invoked before ``fn()`` and completed after it, so they share its window.

        ``items`` are ``(key, value written)`` pairs (value None for gets). For a get,
        ``fn()`` must return the values read, in ``items``' order. On an exception every
        write of the call is ``"info"`` (the client reports one error for the call, so
        which keys were applied is unknown) and every get ``"fail"``; it is re-raised.
        """
        if kind not in ("set", "get"):
            raise ValueError("a multi-key call is a set or a get")
        with self._lock:  # one invocation instant for the whole call
            now = self._clock()
            ops = []
            for key, value in items:
                if kind == "set" and value is None:
                    raise ValueError("a set needs a value")
                op = Op(len(self._ops), process, kind, key, _text(value) if kind == "set" else None, now)
                self._ops.append(op)
                ops.append(op)
        try:
            result = fn()
        except BaseException as e:
            self._complete_many(ops, "info" if kind in WRITE_KINDS else "fail", e, None)
            raise
        values = list(result) if kind == "get" else None  # type: ignore[call-overload]
        if values is not None and len(values) != len(ops):
            self._complete_many(ops, "fail", f"{len(values)} values for {len(ops)} keys", None)
            raise ValueError(f"a multi-key get returned {len(values)} values for {len(ops)} keys")
        self._complete_many(ops, "ok", None, values)
        return result

    def _complete_many(
        self, ops: list[Op], outcome: Outcome, error: BaseException | str | None, values: list[Any] | None
    ) -> None:
        with self._lock:  # one completion instant for the whole call
            now = self._clock()
            for i, op in enumerate(ops):
                op.complete = now
                op.outcome = outcome
                if error is not None:
                    op.error = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
                if values is not None and op.kind == "get":
                    op.value = _text(values[i])

    # -- reading ---------------------------------------------------------------------

    @property
    def ops(self) -> list[Op]:
        """A consistent snapshot: copies of every op, in invocation order."""
        with self._lock:
            return [dataclasses.replace(op) for op in self._ops]

    def __len__(self) -> int:
        with self._lock:
            return len(self._ops)

    def summary(self) -> dict[str, Any]:
        """Counts: ops, sets_ok, sets_fail, sets_info, gets_ok, gets_fail, pending
        (and deletes_/cass_/incrs_ ok, fail, info once such an op was recorded)."""
        counts = {"ops": 0, "sets_ok": 0, "sets_fail": 0, "sets_info": 0, "gets_ok": 0, "gets_fail": 0, "pending": 0}
        for op in self.ops:
            counts["ops"] += 1
            if op.outcome is None:
                counts["pending"] += 1
            else:
                if op.kind in ("delete", "cas", "incr") and f"{op.kind}s_ok" not in counts:
                    counts.update({f"{op.kind}s_{o}": 0 for o in ("ok", "fail", "info")})
                counts[f"{op.kind}s_{op.outcome}"] += 1
        return counts
