"""Tests of the fault harness's history recorder, workload and checkers.

Synthetic histories (no cluster, fully deterministic) pin down what the
checkers accept and reject; one integration test runs the workload against a
real standalone ``dkv serve`` node and checks its history.
"""

from __future__ import annotations

import itertools
import random
import threading
from typing import Any

import pytest

import dkv
from dkv.client.connection import TransportError
from dkv.errors import InvalidArgument, QuorumNotReached, Unavailable, WriteTimeout
from tests.faults.checkers import CheckResult, check_acknowledged, check_converged, check_counters, check_linearizable
from tests.faults.history import History, Op
from tests.faults.workload import COORDINATION_MIX, MixedWorkload, Workload, WorkloadError
from tests.support.procs import NodeProcess

# -- building synthetic histories -------------------------------------------------------------------


class Builder:
    """Hand-written histories: ``b.set(p, key, value, invoke, complete, outcome)``."""

    def __init__(self) -> None:
        self.ops: list[Op] = []

    def _add(
        self,
        process: int,
        kind: str,
        key: str,
        value: str | None,
        invoke: float,
        complete: float | None,
        outcome: str | None,
    ) -> Op:
        op = Op(len(self.ops), process, kind, key, value, invoke, complete, outcome)  # type: ignore[arg-type]
        self.ops.append(op)
        return op

    def set(self, p: int, value: str, invoke: float, complete: float | None, outcome: str = "ok", key: str = "k") -> Op:
        return self._add(p, "set", key, value, invoke, complete, outcome)

    def get(
        self, p: int, value: str | None, invoke: float, complete: float | None, outcome: str = "ok", key: str = "k"
    ) -> Op:
        return self._add(p, "get", key, value, invoke, complete, outcome)

    def cas(
        self,
        p: int,
        expected: str | None,
        new: str,
        invoke: float,
        complete: float | None,
        outcome: str = "ok",
        result: bool = True,
        key: str = "k",
    ) -> Op:
        """A cas; ``result`` is what an ``ok`` one returned."""
        op = self._add(p, "cas", key, new, invoke, complete, outcome)
        op.expected = expected
        op.result = result if outcome == "ok" else None
        return op

    def incr(
        self,
        p: int,
        invoke: float,
        complete: float | None,
        result: int | None = None,
        outcome: str = "ok",
        key: str = "c",
    ) -> Op:
        op = self._add(p, "incr", key, None, invoke, complete, outcome)
        op.result = result if outcome == "ok" else None
        return op


def final(values: dict[str, str | None]) -> Any:
    """A ``final_read`` answering from a dict."""
    return lambda keys: [values.get(k) for k in keys]


def random_history(
    seed: int,
    n: int,
    keys: int = 1,
    width: float = 3.0,
    p_set: float = 0.5,
    p_fail: float = 0.05,
    p_info: float = 0.1,
    p_get_fail: float = 0.02,
    p_delete: float = 0.0,
    p_cas: float = 0.0,
) -> list[Op]:
    """A history produced by a real sequential register per key.

    Op ``k`` takes effect at time ``k``; its window is ``[k - U(0, width), k + U(0, width)]``
    (so about ``2 * width`` ops overlap), on the first process free at its invocation.
    Failed sets never take effect; info sets take effect (at ``k``, possibly after their
    recorded completion) or not, by a coin flip; failed gets read nothing. A fraction
    ``p_delete`` of the writes are deletes (writes of None), and a fraction ``p_cas`` are
    cas ops, expecting the current value (mostly) or an older value or None; an info
    cas is attempted or not by a coin flip and, if attempted, applies iff its condition holds.
    """
    rng = random.Random(seed)
    state: dict[str, str | None] = {}
    free_at: list[float] = []
    ops: list[Op] = []
    for k in range(n):
        key = f"k{rng.randrange(keys)}"
        invoke = k - rng.uniform(0, width)
        complete = k + rng.uniform(0, width)
        process = next((p for p, t in enumerate(free_at) if t < invoke), len(free_at))
        if process == len(free_at):
            free_at.append(0.0)
        if p_cas and rng.random() < p_set * p_cas:
            current = state.get(key)
            expected = current if rng.random() < 0.6 else rng.choice([None, f"v{rng.randrange(k)}" if k else None])
            r = rng.random()
            result: bool | None = None
            if r < p_fail:
                outcome = "fail"
            elif r < p_fail + p_info:
                outcome = "info"
                complete = invoke + rng.uniform(0, width)
                if rng.random() < 0.5 and current == expected:
                    state[key] = f"v{k}"
            else:
                outcome, result = "ok", current == expected
                if result:
                    state[key] = f"v{k}"
            op = Op(
                k,
                process,
                "cas",
                key,
                f"v{k}",
                invoke,
                complete,
                outcome,  # type: ignore[arg-type]
                expected=expected,
                result=result,
            )
        elif rng.random() < p_set:
            value: str | None = f"v{k}"
            kind = "set"
            if p_delete and rng.random() < p_delete:
                value, kind = None, "delete"
            r = rng.random()
            if r < p_fail:
                outcome = "fail"
            elif r < p_fail + p_info:
                outcome = "info"
                complete = invoke + rng.uniform(0, width)  # the timeout may come before the effect
                if rng.random() < 0.5:
                    state[key] = value
            else:
                outcome = "ok"
                state[key] = value
            op = Op(k, process, kind, key, value, invoke, complete, outcome)  # type: ignore[arg-type]
        elif rng.random() < p_get_fail:
            op = Op(k, process, "get", key, None, invoke, complete, "fail")
        else:
            op = Op(k, process, "get", key, state.get(key), invoke, complete, "ok")
        free_at[process] = op.complete or complete
        ops.append(op)
    return sorted(ops, key=lambda o: o.invoke)


# -- History --------------------------------------------------------------------------------------------------


def test_record_classifies_outcomes() -> None:
    h = History()

    def boom(e: BaseException) -> Any:
        def fn() -> None:
            raise e

        return fn

    assert h.record(0, "set", "a", "1", lambda: None) is None
    assert h.record(0, "get", "a", None, lambda: b"1") == b"1"
    for err in (WriteTimeout("t"), TransportError("gone"), QuorumNotReached("q"), InvalidArgument("bad")):
        with pytest.raises(type(err)):
            h.record(1, "set", "a", f"x-{type(err).__name__}", boom(err))
    for err in (Unavailable("u"), WriteTimeout("t")):
        with pytest.raises(type(err)):
            h.record(2, "get", "a", None, boom(err))
    ops = h.ops
    assert [(o.kind, o.outcome) for o in ops] == [
        ("set", "ok"),
        ("get", "ok"),
        ("set", "info"),
        ("set", "info"),
        ("set", "fail"),
        ("set", "fail"),
        ("get", "fail"),
        ("get", "fail"),
    ]
    assert ops[1].value == "1"  # bytes read are recorded as str
    assert ops[2].error == "WriteTimeout: t"
    assert all(o.complete is not None and o.complete >= o.invoke for o in ops)
    assert h.summary() == {
        "ops": 8,
        "sets_ok": 1,
        "sets_fail": 2,
        "sets_info": 2,
        "gets_ok": 1,
        "gets_fail": 2,
        "pending": 0,
    }


def test_history_api_and_snapshot() -> None:
    h = History()
    s = h.invoke(0, "set", "k", b"v")
    g = h.invoke(1, "get", "k")
    snapshot = h.ops
    h.ok(s)
    h.info(g, "lost")  # a read has no effect: recorded as a failure
    assert snapshot[0].pending and snapshot[1].pending  # a snapshot does not change afterwards
    assert [(o.value, o.outcome) for o in h.ops] == [("v", "ok"), (None, "fail")]
    with pytest.raises(ValueError):
        h.ok(s)
    with pytest.raises(ValueError):
        h.invoke(0, "set", "k")
    assert h.summary()["pending"] == 0 and len(h) == 2


def test_history_is_thread_safe() -> None:
    h = History()
    start = threading.Barrier(8)

    def worker(p: int) -> None:
        start.wait()
        for i in range(500):
            h.record(p, "set", f"k{i % 3}", f"{p}-{i}", lambda: None)

    threads = [threading.Thread(target=worker, args=(p,)) for p in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ops = h.ops
    assert len(ops) == 4000 and sorted(o.index for o in ops) == list(range(4000))
    assert h.summary()["sets_ok"] == 4000


# -- check_linearizable: small histories -------------------------------------------------------------------------


def test_sequential_history_is_linearizable() -> None:
    b = Builder()
    b.get(0, None, 0, 1)
    b.set(0, "a", 2, 3)
    b.get(1, "a", 4, 5)
    b.set(1, "b", 6, 7)
    b.get(0, "b", 8, 9)
    r = check_linearizable(b.ops)
    assert r.ok, r.format()
    assert r.details["per_key"]["k"]["ok"] is True


def test_stale_read_after_acknowledged_write_is_not_linearizable() -> None:
    b = Builder()
    b.set(0, "a", 0, 1)
    b.set(0, "b", 2, 3)
    b.get(1, "a", 4, 5)  # "b" was acknowledged before this read began
    r = check_linearizable(b.ops)
    assert not r.ok
    assert r.details["failed_keys"] == ["k"]
    assert "key 'k'" in r.format() and "get('k', 'a')" in r.format()


def test_read_of_a_value_never_written_is_not_linearizable() -> None:
    b = Builder()
    b.set(0, "a", 0, 1)
    b.get(1, "zzz", 2, 3)
    assert not check_linearizable(b.ops).ok


@pytest.mark.parametrize("seen", ["a", "b"])
def test_concurrent_set_and_get_may_read_either_value(seen: str) -> None:
    b = Builder()
    b.set(0, "a", 0, 1)
    b.set(0, "b", 2, 6)
    b.get(1, seen, 3, 5)  # overlaps the set of "b"
    assert check_linearizable(b.ops).ok


def test_reads_cannot_go_back_in_time() -> None:
    b = Builder()
    b.set(0, "a", 0, 1)
    b.set(0, "b", 2, 10)
    b.get(1, "b", 3, 4)
    b.get(1, "a", 5, 6)  # "b" was already visible: "a" cannot come back
    assert not check_linearizable(b.ops).ok


def test_concurrent_sets_may_take_effect_in_either_order() -> None:
    b = Builder()
    b.set(0, "a", 0, 5)
    b.set(1, "b", 1, 4)
    b.get(2, "a", 6, 7)
    b.get(2, "a", 8, 9)
    assert check_linearizable(b.ops).ok


@pytest.mark.parametrize("later", [True, False])
def test_info_set_may_show_up_later_or_never(later: bool) -> None:
    b = Builder()
    b.set(0, "a", 0, 1)
    b.set(0, "b", 2, 3, outcome="info")  # timed out
    b.get(1, "a", 4, 5)
    b.get(1, "b" if later else "a", 6, 7)
    assert check_linearizable(b.ops).ok
    assert check_acknowledged(b.ops, final({"k": "b" if later else "a"})).ok


def test_info_set_once_seen_stays_applied() -> None:
    b = Builder()
    b.set(0, "a", 0, 1)
    b.set(0, "b", 2, 3, outcome="info")
    b.get(1, "b", 4, 5)
    b.get(1, "a", 6, 7)
    assert not check_linearizable(b.ops).ok


def test_pending_set_counts_as_info() -> None:
    b = Builder()
    b.set(0, "a", 0, None, outcome=None)  # type: ignore[arg-type]
    b.get(1, "a", 4, 5)
    b.get(2, None, 1, 2, outcome=None)  # type: ignore[arg-type]
    assert check_linearizable(b.ops).ok


def test_failed_set_whose_value_is_read_is_not_linearizable() -> None:
    b = Builder()
    b.set(0, "a", 0, 1)
    b.set(0, "b", 2, 3, outcome="fail")  # definite: "not applied"
    b.get(1, "b", 4, 5)
    r = check_linearizable(b.ops)
    assert not r.ok and r.details["failed_keys"] == ["k"]
    acked = check_acknowledged(b.ops, final({"k": "b"}))
    assert not acked.ok and acked.details["lost"][0]["reason"] == "failed write applied"


def test_failed_gets_are_ignored() -> None:
    b = Builder()
    b.set(0, "a", 0, 1)
    b.get(1, None, 2, 3, outcome="fail")
    assert check_linearizable(b.ops).ok


def test_keys_are_independent_registers() -> None:
    b = Builder()
    b.set(0, "a", 0, 1, key="x")
    b.get(0, None, 2, 3, key="y")
    b.get(0, "a", 4, 5, key="x")
    b.get(1, "a", 6, 7, key="y")  # never written to y
    r = check_linearizable(b.ops)
    assert r.details["failed_keys"] == ["y"] and r.details["per_key"]["x"]["ok"] is True


def test_budget_exhaustion_is_inconclusive_not_ok() -> None:
    ops = random_history(seed=7, n=200, width=4.0)
    r = check_linearizable(ops, budget=5)
    assert not r.ok and r.details["inconclusive_keys"] == ["k0"]
    assert "inconclusive" in r.format()


def brute_force_linearizable(ops: list[Op]) -> bool:
    """The definition, by exhaustion (tiny histories only): some subset of the info writes and
    some order of the remaining ops respects real time and register semantics (a cas
    that returned False saw another value than it expected; an info cas included applied)."""
    sets = [o for o in ops if o.writes_register and o.outcome != "fail"]
    must = (
        [o for o in sets if o.outcome == "ok"]
        + [o for o in ops if o.kind == "get" and o.outcome == "ok"]
        + [o for o in ops if o.kind == "cas" and o.outcome == "ok" and o.result is False]
    )
    maybe = [o for o in sets if o.outcome != "ok"]

    def end(o: Op) -> float:
        return o.complete if o.outcome == "ok" and o.complete is not None else float("inf")

    for r in range(len(maybe) + 1):
        for extra in itertools.combinations(maybe, r):
            for order in itertools.permutations(must + list(extra)):
                if any(end(b) < a.invoke for i, a in enumerate(order) for b in order[i + 1 :]):
                    continue  # b finished before a began, yet comes after it
                state: str | None = None
                for o in order:
                    if o.kind == "cas" and o.outcome == "ok" and o.result is False:
                        if o.expected == state:
                            break
                    elif o.kind == "cas":
                        if o.expected != state:
                            break
                        state = o.value
                    elif o.is_write:
                        state = o.value
                    elif o.value != state:
                        break
                else:
                    return True
    return False


def tiny_random_history(rng: random.Random, p_delete: float = 0.0, p_cas: float = 0.0) -> list[Op]:
    """Up to 6 arbitrary ops (not from a real register) on small integer times, so ties happen."""
    ops: list[Op] = []
    written: list[str] = []
    unique = rng.random() < 0.7
    for i in range(rng.randint(1, 6)):
        start = rng.randint(0, 10)
        complete = start + rng.randint(0, 5)
        outcome = rng.choices(["ok", "fail", "info"], [6, 1, 2])[0]
        if p_cas and rng.random() < p_cas:
            value = f"v{i}" if unique else rng.choice(["x", "y"])
            expected = rng.choice([*written, None])
            written.append(value)
            ops.append(
                Op(
                    i,
                    i,
                    "cas",
                    "k",
                    value,
                    float(start),
                    float(complete),
                    outcome,  # type: ignore[arg-type]
                    expected=expected,
                    result=rng.random() < 0.6 if outcome == "ok" else None,
                )
            )
        elif rng.random() < p_delete:
            ops.append(Op(i, i, "delete", "k", None, float(start), float(complete), outcome))  # type: ignore[arg-type]
        elif rng.random() < 0.5:
            value = f"v{i}" if unique else rng.choice(["x", "y"])
            written.append(value)
            ops.append(Op(i, i, "set", "k", value, float(start), float(complete), outcome))  # type: ignore[arg-type]
        else:
            value = rng.choice([*written, None])
            ops.append(
                Op(i, i, "get", "k", value, float(start), float(complete), "fail" if outcome == "fail" else "ok")
            )
    return ops


def test_search_agrees_with_brute_force_on_tiny_histories() -> None:
    rng = random.Random(2024)
    verdicts = {True: 0, False: 0}
    for _ in range(600):
        ops = tiny_random_history(rng)
        expected = brute_force_linearizable(ops)
        verdicts[expected] += 1
        assert check_linearizable(ops).ok == expected, "\n".join(map(str, ops))
    assert min(verdicts.values()) > 100  # both verdicts well exercised


def test_search_agrees_with_brute_force_on_tiny_histories_with_deletes() -> None:
    rng = random.Random(2025)
    verdicts = {True: 0, False: 0}
    for _ in range(1000):
        ops = tiny_random_history(rng, p_delete=0.25)
        expected = brute_force_linearizable(ops)
        verdicts[expected] += 1
        assert check_linearizable(ops).ok == expected, "\n".join(map(str, ops))
    assert min(verdicts.values()) > 100


# -- check_linearizable: large random histories ------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_large_random_history_is_linearizable(seed: int) -> None:
    ops = random_history(seed, n=2000)
    r = check_linearizable(ops)
    assert r.ok, r.format()
    # efficiency, deterministically: the memoized search stays close to one state per op
    assert r.details["states"] <= 2 * len(ops), r.details["states"]


def test_large_random_multi_key_history_is_linearizable() -> None:
    ops = random_history(11, n=5000, keys=10, width=8.0)
    r = check_linearizable(ops)
    assert r.ok, r.format()
    assert r.details["keys"] == 10


@pytest.mark.parametrize("seed", range(5))
def test_large_random_history_with_one_corrupted_read_is_caught(seed: int) -> None:
    ops = random_history(seed, n=2000)
    acked = [o for o in ops if o.kind == "set" and o.outcome == "ok"]
    first = acked[0]
    rng = random.Random(seed)
    gets = [o for o in ops if o.kind == "get" and o.outcome == "ok" and o.invoke > 1000 and o.value != first.value]
    victim = rng.choice(gets)
    # "first" was certainly overwritten before the victim began: some acked set came strictly between
    assert any(t.invoke > first.complete and t.complete < victim.invoke for t in acked)  # type: ignore[operator]
    victim.value = first.value
    r = check_linearizable(ops)
    assert not r.ok
    assert r.details["failed_keys"] == ["k0"]
    assert f"#{victim.index} " in r.format()


# -- check_acknowledged -------------------------------------------------------------------------------------------


def test_acknowledged_write_readable_passes() -> None:
    b = Builder()
    b.set(0, "a", 0, 1, key="x")
    b.set(0, "b", 2, 3, key="x")
    b.set(1, "c", 0, 1, key="y")
    b.set(1, "d", 2, 3, key="z", outcome="fail")
    r = check_acknowledged(b.ops, final({"x": "b", "y": "c"}))
    assert r.ok, r.format()
    assert r.details["keys"] == 2 and r.details["acked_sets"] == 3


def test_lost_acknowledged_write_is_caught() -> None:
    b = Builder()
    b.set(0, "a", 0, 1)
    r = check_acknowledged(b.ops, final({}))
    assert not r.ok
    assert r.details["lost"] == [{"key": "k", "expected one of": ["a"], "actual": None, "reason": "missing"}]
    assert "lost 'k'" in r.format()


def test_overwritten_value_as_final_is_caught() -> None:
    b = Builder()
    b.set(0, "a", 0, 1)
    b.set(0, "b", 2, 3)
    r = check_acknowledged(b.ops, final({"k": "a"}))
    assert not r.ok and r.details["lost"][0]["reason"] == "overwritten value"


def test_concurrent_acknowledged_sets_either_may_win() -> None:
    b = Builder()
    b.set(0, "a", 0, 5)
    b.set(1, "b", 1, 4)
    for winner in ("a", "b"):
        assert check_acknowledged(b.ops, final({"k": winner})).ok


def test_info_set_may_be_the_final_value_unless_overwritten() -> None:
    b = Builder()
    b.set(0, "a", 0, 1, outcome="info")
    b.set(1, "b", 2, 3)
    b.set(1, "c", 4, 5, outcome="info")
    assert check_acknowledged(b.ops, final({"k": "b"})).ok  # c never applied
    assert check_acknowledged(b.ops, final({"k": "c"})).ok  # c applied
    # a timed out, but it may still be applied after b was acknowledged
    assert check_acknowledged(b.ops, final({"k": "a"})).ok
    b2 = Builder()
    b2.set(0, "a", 0, 1)
    b2.set(0, "b", 2, 3, outcome="fail")
    b2.set(1, "c", 4, 5)
    assert not check_acknowledged(b2.ops, final({"k": "a"})).ok


def test_unknown_final_value_is_caught() -> None:
    b = Builder()
    b.set(0, "a", 0, 1)
    r = check_acknowledged(b.ops, final({"k": "nobody-wrote-this"}))
    assert not r.ok and r.details["lost"][0]["reason"] == "unknown value"


def test_final_read_may_return_bytes() -> None:
    b = Builder()
    b.set(0, "a", 0, 1)
    assert check_acknowledged(b.ops, lambda keys: [b"a" for _ in keys]).ok


# -- check_converged ---------------------------------------------------------------------------------------------


# -- deletes and multi-key ops ------------------------------------------------------------------------------


class BuilderD(Builder):
    def delete(self, p: int, invoke: float, complete: float | None, outcome: str = "ok", key: str = "k") -> Op:
        return self._add(p, "delete", key, None, invoke, complete, outcome)


def test_read_after_acknowledged_delete_sees_nothing() -> None:
    b = BuilderD()
    b.set(0, "a", 0, 1)
    b.delete(0, 2, 3)
    b.get(1, None, 4, 5)
    assert check_linearizable(b.ops).ok
    b.get(1, "a", 6, 7)  # the deleted value comes back: not linearizable
    r = check_linearizable(b.ops)
    assert not r.ok and r.evidence["k"][0].value == "a"


def test_read_of_none_may_be_the_initial_value_not_only_a_delete() -> None:
    """A delete's window is not cut at the first read of None (that read may see the initial
    value): here the delete takes effect after the set of "v"."""
    b = BuilderD()
    b.get(0, None, 0, 1)
    b.delete(1, 0.5, 5)
    b.set(2, "v", 2, 3)
    b.get(0, None, 6, 7)
    assert check_linearizable(b.ops).ok


def test_indeterminate_delete_may_apply_later_or_never() -> None:
    for seen in ("a", None):
        b = BuilderD()
        b.set(0, "a", 0, 1)
        b.delete(1, 2, 3, outcome="info")
        b.get(0, seen, 4, 5)
        assert check_linearizable(b.ops).ok


@pytest.mark.parametrize("seed", range(3))
def test_large_random_history_with_deletes_is_linearizable(seed: int) -> None:
    ops = random_history(seed, n=2000, p_delete=0.2)
    assert any(o.kind == "delete" for o in ops)
    r = check_linearizable(ops)
    assert r.ok, r.format()


def test_acknowledged_delete_is_a_write_of_nothing() -> None:
    b = BuilderD()
    b.set(0, "a", 0, 1)
    b.delete(0, 2, 3)
    assert check_acknowledged(b.ops, final({"k": None})).ok
    assert not check_acknowledged(b.ops, final({"k": "a"})).ok  # the delete was lost
    b.set(0, "b", 4, 5)
    r = check_acknowledged(b.ops, final({"k": None}))
    assert not r.ok and r.details["lost"][0]["reason"] == "missing"


def test_record_many_gives_each_key_the_call_s_window() -> None:
    h = History()
    h.record_many(0, "set", [("a", "1"), ("b", b"2")], lambda: None)
    got = h.record_many(1, "get", [("a", None), ("b", None), ("c", None)], lambda: [b"1", "2", None])
    assert got == [b"1", "2", None]
    with pytest.raises(WriteTimeout):
        h.record_many(2, "set", [("a", "3"), ("b", "4")], lambda: (_ for _ in ()).throw(WriteTimeout("t")))
    with pytest.raises(QuorumNotReached):  # one definite error for the call: which keys applied is unknown
        h.record_many(2, "set", [("a", "5"), ("c", "6")], lambda: (_ for _ in ()).throw(QuorumNotReached("no")))
    with pytest.raises(Unavailable):
        h.record_many(3, "get", [("a", None)], lambda: (_ for _ in ()).throw(Unavailable("x")))
    ops = h.ops
    assert [(o.kind, o.key, o.value, o.outcome) for o in ops] == [
        ("set", "a", "1", "ok"),
        ("set", "b", "2", "ok"),
        ("get", "a", "1", "ok"),
        ("get", "b", "2", "ok"),
        ("get", "c", None, "ok"),
        ("set", "a", "3", "info"),
        ("set", "b", "4", "info"),
        ("set", "a", "5", "info"),
        ("set", "c", "6", "info"),
        ("get", "a", None, "fail"),
    ]
    for group in ([0, 1], [2, 3, 4], [5, 6], [7, 8]):
        assert len({(ops[i].invoke, ops[i].complete) for i in group}) == 1
    assert check_linearizable(ops).ok


def test_history_records_deletes() -> None:
    h = History()
    d = h.record(0, "delete", "k", None, lambda: True)
    assert d is True
    with pytest.raises(WriteTimeout):
        h.record(0, "delete", "k", None, lambda: (_ for _ in ()).throw(WriteTimeout("t")))
    with pytest.raises(ValueError):
        h.invoke(0, "delete", "k", "v")
    assert [(o.kind, o.value, o.outcome) for o in h.ops] == [("delete", None, "ok"), ("delete", None, "info")]
    assert h.summary()["deletes_ok"] == 1 and h.summary()["deletes_info"] == 1


def test_check_converged() -> None:
    same = {"n1": [[10, "abc"]], "n2": [[10, "abc"]], "n3": [[10, "abc"]]}
    assert check_converged(same).ok
    r = check_converged({**same, "n3": [[9, "abd"]]})
    assert not r.ok and r.details["distinct"] == 2 and "n3: [[9, 'abd']]" in r.format()
    assert not check_converged({}).ok
    assert not check_converged({"n1": [[1, "x"]]}, min_members=2).ok


def test_check_result_format_cuts_long_lists() -> None:
    r = CheckResult(False, {"xs": list(range(100))}, "demo", ["why"])
    text = r.format(max_items=3)
    assert text.splitlines()[0] == "demo: FAILED" and "97 more" in text and "why" in text
    assert not r


# -- compare-and-set (registers) ------------------------------------------------------------------------------


def test_successful_cas_is_a_conditional_write() -> None:
    b = Builder()
    b.cas(0, None, "a", 0, 1)  # absent -> a
    b.cas(1, "a", "b", 2, 3)
    b.get(0, "b", 4, 5)
    r = check_linearizable(b.ops)
    assert r.ok, r.format()


def test_lost_cas_is_caught() -> None:
    """An acknowledged cas whose value a later read does not see."""
    b = Builder()
    b.set(0, "a", 0, 1)
    cas = b.cas(1, "a", "b", 2, 3)
    b.get(0, "a", 4, 5)
    r = check_linearizable(b.ops)
    assert not r.ok and r.details["failed_keys"] == ["k"]
    assert any(o.index == cas.index for o in r.evidence["k"])


def test_cas_that_succeeded_on_a_stale_value_is_caught() -> None:
    b = Builder()
    b.set(0, "a", 0, 1)
    b.set(0, "b", 2, 3)
    stuck = b.cas(1, "a", "c", 4, 5)  # the register holds b: this cas must fail
    r = check_linearizable(b.ops)
    assert not r.ok and r.evidence["k"][0].index == stuck.index
    assert "cas('k', 'a' -> 'c')" in r.format()


def test_two_cas_from_the_same_value_cannot_both_succeed() -> None:
    b = Builder()
    b.set(0, "a", 0, 1)
    b.cas(1, "a", "b", 2, 4)
    b.cas(2, "a", "c", 2, 4)
    assert not check_linearizable(b.ops).ok
    b.ops[-1].result = False  # one of them lost the race: fine
    assert check_linearizable(b.ops).ok


def test_failed_cas_is_a_read_of_another_value() -> None:
    b = Builder()
    b.set(0, "a", 0, 1)
    b.cas(1, "a", "b", 2, 3, result=False)  # nothing else wrote: it had to find a
    assert not check_linearizable(b.ops).ok
    b = Builder()
    b.set(0, "a", 0, 1)
    b.set(2, "c", 1.5, 5)  # concurrent: it may have found c
    b.cas(1, "a", "b", 2, 3, result=False)
    b.get(0, "c", 6, 7)
    assert check_linearizable(b.ops).ok
    b.ops[-1].value = "b"  # ... and then b was never written
    assert not check_linearizable(b.ops).ok


def test_failed_cas_expecting_absence() -> None:
    b = Builder()
    b.cas(0, None, "a", 0, 1, result=False)  # the key was absent all along
    assert not check_linearizable(b.ops).ok
    b = Builder()
    b.set(1, "x", 0, 1)
    b.cas(0, None, "a", 2, 3, result=False)
    assert check_linearizable(b.ops).ok


def test_cas_after_delete_expects_absence() -> None:
    b = BuilderD()
    b.set(0, "a", 0, 1)
    b.delete(0, 2, 3)
    b.cas(1, None, "b", 4, 5)
    b.get(0, "b", 6, 7)
    assert check_linearizable(b.ops).ok
    b.ops[2].expected = "a"  # a was deleted before this cas began
    assert not check_linearizable(b.ops).ok


def test_an_unread_indeterminate_write_may_explain_a_failed_cas() -> None:
    """Nobody read b, yet the info set of b may be what the failed cas found (an unread
    indeterminate write is not simply dropped when a failed cas follows it)."""
    b = Builder()
    b.set(0, "a", 0, 1)
    b.set(1, "b", 2, 3, outcome="info")
    b.cas(0, "a", "c", 4, 5, result=False)
    assert check_linearizable(b.ops).ok
    b.ops[1].outcome = "fail"  # ... not if it definitely failed
    assert not check_linearizable(b.ops).ok
    b = Builder()  # nor if it began after the cas ended
    b.set(0, "a", 0, 1)
    b.cas(0, "a", "c", 2, 3, result=False)
    b.set(1, "b", 4, 5, outcome="info")
    assert not check_linearizable(b.ops).ok


@pytest.mark.parametrize("seen", ["a", "b"])
def test_indeterminate_cas_may_apply_or_not(seen: str) -> None:
    b = Builder()
    b.set(0, "a", 0, 1)
    b.cas(1, "a", "b", 2, 3, outcome="info")
    b.get(0, seen, 4, 5)
    assert check_linearizable(b.ops).ok


def test_indeterminate_cas_needs_its_expected_value_to_apply() -> None:
    b = Builder()
    b.set(0, "a", 0, 1)
    b.cas(1, "x", "b", 2, None, outcome="info")  # x never held: it cannot have applied
    b.get(0, "b", 4, 5)
    assert not check_linearizable(b.ops).ok
    b = Builder()
    b.set(0, "a", 0, 1)
    b.cas(1, "a", "b", 2, 3, outcome="info")
    b.set(0, "c", 4, 5)
    b.get(0, "b", 6, 7)  # b could only apply before c, which then replaced it
    assert not check_linearizable(b.ops).ok


def test_indeterminate_cas_may_explain_a_failed_cas() -> None:
    b = Builder()
    b.set(0, "a", 0, 1)
    b.cas(1, "a", "b", 2, 3, outcome="info")
    b.cas(0, "a", "c", 4, 5, result=False)
    assert check_linearizable(b.ops).ok
    b.ops[1].expected = "x"  # ... only if it could apply
    assert not check_linearizable(b.ops).ok


def test_failed_cas_is_not_an_acknowledged_write() -> None:
    b = Builder()
    b.set(0, "a", 0, 1)
    b.cas(1, "a", "b", 2, 3, result=False)
    assert check_acknowledged(b.ops, final({"k": "a"})).ok
    b.cas(1, "a", "c", 4, 5)
    r = check_acknowledged(b.ops, final({"k": "a"}))  # the acknowledged cas was lost
    assert not r.ok and r.details["lost"][0]["reason"] == "overwritten value"
    assert check_acknowledged(b.ops, final({"k": "c"})).ok


def test_search_agrees_with_brute_force_on_tiny_histories_with_cas() -> None:
    rng = random.Random(2026)
    verdicts = {True: 0, False: 0}
    for _ in range(4000):
        ops = tiny_random_history(rng, p_delete=rng.choice([0.0, 0.2]), p_cas=rng.choice([0.3, 0.6, 0.9]))
        expected = brute_force_linearizable(ops)
        verdicts[expected] += 1
        assert check_linearizable(ops).ok == expected, "\n".join(map(str, ops))
    assert min(verdicts.values()) > 1000


@pytest.mark.parametrize("seed", range(4))
def test_large_random_history_with_cas_is_linearizable(seed: int) -> None:
    ops = random_history(seed, n=2000, p_delete=0.1, p_cas=0.5)
    assert sum(o.kind == "cas" and o.result is True for o in ops) > 50
    assert sum(o.kind == "cas" and o.result is False for o in ops) > 50
    r = check_linearizable(ops)
    assert r.ok, r.format()
    assert r.details["states"] <= 3 * len(ops), r.details["states"]  # the search stays near-linear


@pytest.mark.parametrize("seed", range(4))
def test_large_random_history_with_one_flipped_cas_is_caught(seed: int) -> None:
    """A cas that returned True turned False (a cas the store applied while saying it did
    not, or a stale read) or the other way round, in a long history, is caught. (Ops do not
    overlap here, so no flip is explicable by a concurrent write.)"""
    ops = random_history(seed, n=2000, p_cas=0.5, p_info=0.0, width=0.45)
    rng = random.Random(seed)
    victims = [o for o in ops if o.kind == "cas" and o.outcome == "ok" and o.invoke > 500]
    caught = 0
    for victim in rng.sample(victims, 10):
        victim.result = not victim.result
        caught += not check_linearizable(ops).ok
        victim.result = not victim.result
    assert check_linearizable(ops).ok
    assert caught == 10, caught


# -- counters ---------------------------------------------------------------------------------------------------


def test_counter_history_passes() -> None:
    b = Builder()
    b.incr(0, 0, 1, 1)
    b.incr(1, 0.5, 3, 3)
    b.incr(2, 0.6, 2, 2)
    b.incr(0, 4, 5, 4)
    r = check_counters(b.ops, final({"c": "4"}))
    assert r.ok, r.format()
    assert r.details["per_key"]["c"]["acked"] == 4


@pytest.mark.parametrize("value", ["2", "3"])
def test_indeterminate_increments_may_count_or_not(value: str) -> None:
    b = Builder()
    b.incr(0, 0, 1, 1)
    b.incr(1, 0.5, None, outcome="info")
    b.incr(0, 2, 3, int(value))
    b.incr(2, 0.2, 0.8, outcome="fail")  # definitely not applied
    assert check_counters(b.ops, final({"c": value})).ok


def test_lost_increment_is_caught() -> None:
    b = Builder()
    for i in range(3):
        b.incr(0, 2 * i, 2 * i + 1, i + 1)
    r = check_counters(b.ops, final({"c": "2"}))
    assert not r.ok and "lost increments" in r.format()
    assert not check_counters(b.ops, final({"c": None})).ok  # the counter vanished


def test_increment_applied_twice_or_after_a_definite_failure_is_caught() -> None:
    b = Builder()
    b.incr(0, 0, 1, 1)
    b.incr(0, 2, 3, outcome="info")
    b.incr(0, 4, 5, outcome="fail")
    assert check_counters(b.ops, final({"c": "2"})).ok
    r = check_counters(b.ops, final({"c": "3"}))
    assert not r.ok and "too many increments" in r.format()


def test_duplicate_increment_results_are_caught() -> None:
    b = Builder()
    b.incr(0, 0, 2, 1)
    b.incr(1, 0, 2, 1)
    b.incr(2, 0, None, outcome="info")
    r = check_counters(b.ops, final({"c": "2"}))  # two acks, and the count is right...
    assert not r.ok and "2 increments returned 1" in r.format()  # ... but they returned the same
    assert r.evidence["c"]


def test_increment_result_out_of_range_is_caught() -> None:
    b = Builder()
    b.incr(0, 0, 1, 1)
    b.incr(1, 0, 1, 7)
    r = check_counters(b.ops, final({"c": "2"}))
    assert not r.ok and "outside [1, 2]" in r.format()


def test_increment_results_respect_real_time() -> None:
    b = Builder()
    b.incr(0, 0, 1, 2)
    b.incr(1, 2, 3, 1)  # began after the one that returned 2 had ended
    r = check_counters(b.ops, final({"c": "2"}))
    assert not r.ok and "real-time order" in r.format()
    b.ops[1].invoke = 0.5  # concurrent: either order
    assert check_counters(b.ops, final({"c": "2"})).ok


def test_increment_cannot_count_increments_invoked_after_it() -> None:
    b = Builder()
    b.incr(0, 0, 1, 2)  # only one increment had begun by the time it returned 2
    b.incr(1, 2, 3, 3)
    b.incr(2, 2.5, None, outcome="info")
    r = check_counters(b.ops, final({"c": "3"}))
    assert not r.ok and "only 1 increments were invoked" in r.format()


def test_counter_final_value_must_be_an_integer() -> None:
    b = Builder()
    b.incr(0, 0, 1, 1)
    assert not check_counters(b.ops, final({"c": "one"})).ok
    assert check_counters(b.ops, lambda keys: [b"1" for _ in keys]).ok


def test_registers_and_counters_are_judged_apart() -> None:
    b = Builder()
    b.set(0, "a", 0, 1)
    b.incr(0, 2, 3, 1, key="c")
    b.get(1, "a", 4, 5)
    lin = check_linearizable(b.ops)
    assert lin.ok and lin.details["keys"] == 1
    acked = check_acknowledged(b.ops, final({"k": "a"}))
    assert acked.ok and acked.details["keys"] == 1
    counters = check_counters(b.ops, final({"c": "1"}))
    assert counters.ok and counters.details["keys"] == 1


def test_history_records_cas_and_incr() -> None:
    h = History()
    assert h.record(0, "cas", "k", "v1", lambda: True, expected=None) is True
    assert h.record(0, "cas", "k", b"v2", lambda: False, expected=b"zz") is False
    assert h.record(0, "incr", "c", None, lambda: 7) == 7
    for err in (WriteTimeout("t"), TransportError("gone"), QuorumNotReached("q")):
        with pytest.raises(type(err)):
            h.record(1, "cas", "k", f"x-{type(err).__name__}", lambda: (_ for _ in ()).throw(err), expected="v1")
        with pytest.raises(type(err)):
            h.record(1, "incr", "c", None, lambda: (_ for _ in ()).throw(err))
    for bad in (
        lambda: h.invoke(0, "cas", "k", None),
        lambda: h.invoke(0, "incr", "c", "1"),
        lambda: h.invoke(0, "set", "k", "1", expected="x"),
        lambda: h.record_many(0, "cas", [("k", "1")], lambda: None),
    ):  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            bad()
    ops = h.ops
    assert [(o.kind, o.expected, o.value, o.outcome, o.result) for o in ops] == [
        ("cas", None, "v1", "ok", True),
        ("cas", "zz", "v2", "ok", False),
        ("incr", None, None, "ok", 7),
        ("cas", "v1", "x-WriteTimeout", "info", None),
        ("incr", None, None, "info", None),
        ("cas", "v1", "x-TransportError", "info", None),
        ("incr", None, None, "info", None),
        ("cas", "v1", "x-QuorumNotReached", "fail", None),
        ("incr", None, None, "fail", None),
    ]
    assert [o.writes_register for o in ops[:3]] == [True, False, False]
    assert "cas('k', None -> 'v1')" in str(ops[0]) and "-> 7" in str(ops[2])
    s = h.summary()
    assert s["cass_ok"] == 2 and s["cass_info"] == 2 and s["cass_fail"] == 1 and s["incrs_ok"] == 1


# -- Workload ---------------------------------------------------------------------------------------------------


class MemoryClient:
    """A linearizable in-memory stand-in for ``dkv.Client``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.data: dict[str, bytes] = {}

    def set(self, key: str, value: str) -> None:
        with self._lock:
            self.data[key] = value.encode()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            return self.data.get(key)

    def mget(self, keys: list[str]) -> list[bytes | None]:
        with self._lock:
            return [self.data.get(k) for k in keys]


def test_workload_stops_at_max_ops_and_records_everything() -> None:
    client, h = MemoryClient(), History()
    w = Workload(
        client, h, [f"k{i}" for i in range(5)], threads=4, read_ratio=0.5, seed=1, max_ops=400, max_duration=60
    )
    w.run(timeout=30)
    s = h.summary()
    assert s["ops"] == 400 and s["pending"] == 0 and s["sets_ok"] + s["gets_ok"] == 400
    values = [o.value for o in h.ops if o.kind == "set"]
    assert len(values) == len(set(values))  # unique per op
    acked = w.acked_writes()
    assert sum(len(v) for v in acked.values()) == s["sets_ok"]
    assert check_linearizable(h).ok
    assert check_acknowledged(h, client.mget).ok


def test_workload_stops_at_max_duration() -> None:
    h = History()
    w = Workload(
        MemoryClient(), h, ["a"], threads=2, read_ratio=0.5, seed=2, max_ops=10**9, max_duration=0.2, pause=0.001
    )
    w.run(timeout=30)
    assert not w.running and 0 < len(h) < 10**9


def test_workload_stop_ends_it_early() -> None:
    h = History()
    w = Workload(
        MemoryClient(), h, ["a"], threads=2, read_ratio=0.5, seed=3, max_ops=10**9, max_duration=3600, pause=0.001
    ).start()
    w.stop(timeout=30)
    assert not w.running


def test_workload_records_expected_errors_and_carries_on() -> None:
    class Flaky(MemoryClient):
        def __init__(self) -> None:
            super().__init__()
            self.n = 0

        def set(self, key: str, value: str) -> None:
            with self._lock:
                self.n += 1
                n = self.n
            if n % 3 == 0:
                raise WriteTimeout("maybe")
            if n % 3 == 1:
                raise QuorumNotReached("no")
            super().set(key, value)

    h = History()
    Workload(Flaky(), h, ["a", "b"], threads=3, read_ratio=0.0, seed=4, max_ops=90, max_duration=60).run(30)
    s = h.summary()
    assert s["ops"] == 90 and s["sets_info"] == 30 and s["sets_fail"] == 30 and s["sets_ok"] == 30


def test_workload_surfaces_unexpected_errors() -> None:
    class Broken(MemoryClient):
        def get(self, key: str) -> bytes | None:
            raise ZeroDivisionError("bug")

    w = Workload(Broken(), History(), ["a"], threads=2, read_ratio=1.0, seed=5, max_ops=10, max_duration=60)
    with pytest.raises(WorkloadError, match="ZeroDivisionError"):
        w.run(timeout=30)


class MultiMemoryClient(MemoryClient):
    """Sets, gets (any consistency), deletes, msets and mgets on a dict; each call atomic."""

    def get(self, key: str, consistency: str = "sequential") -> bytes | None:
        return super().get(key)

    def delete(self, key: str) -> bool:
        with self._lock:
            return self.data.pop(key, None) is not None

    def mset(self, mapping: dict[str, str]) -> None:
        with self._lock:
            self.data.update({k: v.encode() for k, v in mapping.items()})

    def mget(self, keys: list[str], consistency: str = "sequential") -> list[bytes | None]:
        return super().mget(keys)


def test_mixed_workload_records_every_kind_per_key() -> None:
    clients = [MultiMemoryClient()]
    h = History()
    w = MixedWorkload(clients * 3, h, [f"k{i}" for i in range(6)], threads=3, seed=9, max_ops=600, max_duration=60)
    w.run(timeout=30)
    assert sum(w.calls.values()) == 600 and all(w.calls.values()), w.calls
    ops = h.ops
    assert {o.kind for o in ops} == {"set", "get", "delete"} and all(o.outcome == "ok" for o in ops)
    assert len(ops) > 600  # multi-key calls are one op per key
    written = [o.value for o in ops if o.kind == "set"]
    assert len(written) == len(set(written))
    r = check_linearizable(h)
    assert r.ok, r.format()
    assert check_acknowledged(h, clients[0].mget).ok


class CoordinationMemoryClient(MultiMemoryClient):
    """:class:`MultiMemoryClient` with an atomic cas and incr."""

    def cas(self, key: str, expected: str | None, new: str) -> bool:
        with self._lock:
            if self.data.get(key) != (None if expected is None else expected.encode()):
                return False
            self.data[key] = new.encode()
            return True

    def incr(self, key: str, amount: int = 1) -> int:
        with self._lock:
            n = int(self.data.get(key, b"0")) + amount
            self.data[key] = str(n).encode()
            return n


def run_coordination(client: Any, threads: int, seed: int, max_ops: int = 1500) -> tuple[History, MixedWorkload]:
    h = History()
    w = MixedWorkload(
        client,
        h,
        [f"k{i}" for i in range(4)],
        threads=threads,
        seed=seed,
        max_ops=max_ops,
        max_duration=60,
        mix=COORDINATION_MIX,
        counters=["c0", "c1"],
    )
    w.run(timeout=60)
    return h, w


def test_mixed_workload_with_cas_and_incr_passes_the_checkers() -> None:
    client = CoordinationMemoryClient()
    h, w = run_coordination([client] * 4, threads=4, seed=12)
    assert all(w.calls.values()), w.calls
    ops = h.ops
    assert {o.kind for o in ops} == {"set", "get", "delete", "cas", "incr"} and all(o.outcome == "ok" for o in ops)
    cas = [o for o in ops if o.kind == "cas"]
    assert sum(o.result is True for o in cas) > 20 and sum(o.result is False for o in cas) > 20
    assert sum(o.expected is None for o in cas) > 5
    written = [o.value for o in ops if o.kind in ("set", "cas")]
    assert len(written) == len(set(written))
    assert {o.key for o in ops if o.kind == "incr"} == {"c0", "c1"}
    r = check_linearizable(h)
    assert r.ok, r.format()
    assert r.details["keys"] == 4
    assert check_acknowledged(h, client.mget).ok
    counters = check_counters(h, client.mget)
    assert counters.ok, counters.format()
    assert sum(v["acked"] for v in counters.details["per_key"].values()) == w.calls["incr"]


def test_workload_catches_a_cas_that_ignores_its_condition() -> None:
    class Unconditional(CoordinationMemoryClient):
        def cas(self, key: str, expected: str | None, new: str) -> bool:
            with self._lock:
                self.data[key] = new.encode()
                return True

    h, _ = run_coordination(Unconditional(), threads=1, seed=13, max_ops=400)  # one thread: deterministic
    r = check_linearizable(h)
    assert not r.ok and r.evidence, r.format()
    assert any(o.kind == "cas" for ev in r.evidence.values() for o in ev)


def test_workload_catches_a_cas_that_reports_failure_but_writes() -> None:
    class Liar(CoordinationMemoryClient):
        def cas(self, key: str, expected: str | None, new: str) -> bool:
            with self._lock:
                ok = self.data.get(key) == (None if expected is None else expected.encode())
                self.data[key] = new.encode()
                return ok

    h, _ = run_coordination(Liar(), threads=1, seed=14, max_ops=400)
    assert not check_linearizable(h).ok


def test_workload_catches_lost_and_duplicated_increments() -> None:
    class Forgetful(CoordinationMemoryClient):
        n = 0

        def incr(self, key: str, amount: int = 1) -> int:
            self.n += 1
            if self.n % 7:
                return super().incr(key, amount)
            with self._lock:  # answered, never stored
                return int(self.data.get(key, b"0")) + amount

    client: CoordinationMemoryClient = Forgetful()
    h, _ = run_coordination(client, threads=1, seed=15, max_ops=400)
    r = check_counters(h, client.mget)
    assert not r.ok and "lost increments" in r.format() and "increments returned" in r.format(), r.format()


def test_mixed_workload_records_errors_of_multi_key_calls() -> None:
    class Flaky(MultiMemoryClient):
        def mset(self, mapping: dict[str, str]) -> None:
            raise WriteTimeout("maybe")

        def mget(self, keys: list[str], consistency: str = "sequential") -> list[bytes | None]:
            raise TransportError("gone")

    h = History()
    MixedWorkload(
        Flaky(),
        h,
        ["a", "b", "c"],
        threads=2,
        seed=3,
        max_ops=100,
        max_duration=60,
        mix={"mset": 1, "mget": 1},
        max_multi=3,
    ).run(30)
    ops = h.ops
    assert ops and {(o.kind, o.outcome) for o in ops} == {("set", "info"), ("get", "fail")}


@pytest.mark.integration
def test_workload_against_a_real_node_passes_both_checkers(node: NodeProcess) -> None:
    client = dkv.Client(node.addr, timeout=5)
    try:
        h = History()
        keys = [f"key-{i}" for i in range(8)]
        w = Workload(client, h, keys, threads=4, read_ratio=0.5, seed=42, max_ops=300, max_duration=120)
        w.run(timeout=180)
        s = h.summary()
        assert s["ops"] == 300 and s["sets_ok"] + s["gets_ok"] == 300, s
        acked = check_acknowledged(h, lambda ks: client.mget(ks))
        assert acked.ok, acked.format()
        assert acked.details["acked_sets"] == s["sets_ok"]
        lin = check_linearizable(h)
        assert lin.ok, lin.format()
        assert lin.details["keys"] == len(keys)
    finally:
        client.close()


@pytest.mark.integration
def test_mixed_workload_against_a_real_node_passes_both_checkers(node: NodeProcess) -> None:
    client = dkv.Client(node.addr, timeout=5)
    try:
        h = History()
        w = MixedWorkload(client, h, [f"key-{i}" for i in range(6)], threads=4, seed=43, max_ops=300, max_duration=120)
        w.run(timeout=180)
        s = h.summary()
        assert s["pending"] == 0 and s["deletes_ok"] > 0 and s["sets_fail"] == s["sets_info"] == 0, s
        acked = check_acknowledged(h, lambda ks: client.mget(ks))
        assert acked.ok, acked.format()
        lin = check_linearizable(h)
        assert lin.ok, lin.format()
    finally:
        client.close()


@pytest.mark.integration
def test_cas_and_incr_workload_against_a_real_node_passes_the_checkers(node: NodeProcess) -> None:
    client = dkv.Client(node.addr, timeout=5)
    try:
        h, w = run_coordination(client, threads=4, seed=44, max_ops=400)
        s = h.summary()
        assert s["pending"] == 0 and s["cass_ok"] > 0 and s["incrs_ok"] == w.calls["incr"] > 0, s
        assert s["sets_fail"] == s["sets_info"] == s["cass_fail"] == s["cass_info"] == 0, s
        lin = check_linearizable(h)
        assert lin.ok, lin.format()
        acked = check_acknowledged(h, lambda ks: client.mget(ks))
        assert acked.ok, acked.format()
        counters = check_counters(h, lambda ks: client.mget(ks))
        assert counters.ok, counters.format()
    finally:
        client.close()


# -- the nemesis's schedule and the report's timeline (no cluster) ----------------------------------------


class FakeNode:
    def __init__(self, cluster: "FakeCluster", nid: str) -> None:
        self.cluster, self.nid, self.running, self.paused = cluster, nid, True, False
        self.addr = f"127.0.0.1:{nid}"

    def kill(self) -> None:
        self.running = False
        self.cluster.count_down()

    def start(self) -> "FakeNode":
        self.running = True
        return self

    def pause(self) -> None:
        self.paused = True
        self.cluster.count_down()

    def resume(self) -> None:
        self.paused = False


class FakeCluster:
    """Two shards of three members whose roles never change."""

    shards, rf, session_timeout, lab, zk = 2, 3, 0.01, None, "unused"

    def __init__(self) -> None:
        self.nodes = {f"n{i}": FakeNode(self, f"n{i}") for i in range(1, 7)}
        self.members = {"shard-1": ["n1", "n2", "n3"], "shard-2": ["n4", "n5", "n6"]}
        self.worst = 0  # the most members of one shard down or paused at once

    def count_down(self) -> None:
        for ms in self.members.values():
            self.worst = max(self.worst, sum(not self.nodes[m].running or self.nodes[m].paused for m in ms))

    def shard_members(self) -> dict[str, dict[str, Any]]:
        return {sid: {"writer": ms[0], "replicas": ms[1:]} for sid, ms in self.members.items()}

    def in_sync(self, sid: str) -> bool:
        return all(self.nodes[m].running and not self.nodes[m].paused for m in self.members[sid])


def _fake_schedule(seed: int) -> tuple[list[tuple[str, str]], FakeCluster]:
    from tests.faults.nemesis import Nemesis

    c = FakeCluster()
    n = Nemesis(
        c,
        seed,
        weights={"kill-writer": 1, "kill-replica": 1, "pause-writer": 1, "pause-replica": 1},  # type: ignore[arg-type]
        interval=(0.01, 0.02),
        kill_downtime=(0.01, 0.02),
        pause_extra=(0.0, 0.01),
    )
    n.start(0.6)
    n.join(30)
    assert n.faults and all(f.error is None for f in n.faults), n.schedule()
    return [(f.kind, f.target) for f in n.faults], c


def test_nemesis_schedule_is_reproducible_from_its_seed_and_takes_one_member_down_at_a_time() -> None:
    a, ca = _fake_schedule(5)
    b, cb = _fake_schedule(5)
    k = min(len(a), len(b))
    assert k >= 5 and a[:k] == b[:k]  # the same faults on the same roles
    assert _fake_schedule(6)[0][:k] != a[:k]
    assert ca.worst == cb.worst == 1  # every fault healed before the next


def test_timeline_parses_node_logs_and_collapses_repeats(tmp_path: Any) -> None:
    from datetime import datetime

    from tests.faults.timeline import around, merged_logs

    wall0 = datetime(2030, 1, 2, 3, 4, 5).timestamp()
    (tmp_path / "n1.log").write_text(
        "2030-01-02 03:04:06,250 INFO [n1] x: prepare to n2 failed\n"
        "2030-01-02 03:04:06,500 INFO [n1] x: prepare to n2 failed\n"
        "2030-01-02 03:04:07,000 ERROR [n1] x: boom\nTraceback (most recent call last):\n"
    )
    (tmp_path / "n2.log").write_text("2030-01-02 03:04:06,750 INFO [n2] y: hello\n")
    lines = merged_logs({"n1": tmp_path / "n1.log", "n2": tmp_path / "n2.log"}, wall0)
    assert [(x.t, x.node) for x in lines] == [(1.25, "n1"), (1.5, "n1"), (1.75, "n2"), (2.0, "n1"), (2.0, "n1")]
    assert lines[-1].text.startswith("Traceback")  # an untimed line keeps the time of the line before
    shown = [str(x) for x in around(lines, 1.0, 1.9)]
    assert len(shown) == 2 and "[x2, the last at 1.500s]" in shown[0] and "hello" in shown[1]
