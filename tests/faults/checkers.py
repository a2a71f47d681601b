"""Judge histories and replica states against DESIGN §2: G1 (no lost acknowledged write), per-key
linearizability, and G3 (convergence).

This module's single job is *checking*; it records nothing and touches no node
(the final read is a callable the caller provides). Every checker returns a
:class:`CheckResult`, whose :meth:`CheckResult.format` is meant for assertion
messages: ``assert r.ok, r.format()``.

Outcomes follow :mod:`tests.faults.history`: ``fail`` ops never happened;
``info`` (and still pending) writes may take effect at any time after their
invocation, or never; failed gets are ignored. A delete is a write of ``None``
(the register's initial value): "set" below means "set or delete".
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from tests.faults.history import History, Op

INF = math.inf
#: Default bound on the memoized search states of one key (about 0.5 KB each for 2,000 ops).
DEFAULT_BUDGET = 1_000_000


@dataclass
class CheckResult:
    """A checker's verdict: ``ok``, machine-readable ``details``, human-readable ``messages``."""

    ok: bool
    details: dict[str, Any]
    name: str = "check"
    messages: list[str] = field(default_factory=list)
    #: the ops behind a failure, for reports (check_linearizable: key -> [the op that cannot
    #: take effect, then the ops around it]); not part of :meth:`format`
    evidence: dict[str, list[Op]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.ok

    def format(self, max_items: int = 10) -> str:
        """A multi-line report for an assertion message (long lists are cut to ``max_items``)."""
        lines = [f"{self.name}: {'OK' if self.ok else 'FAILED'}"]
        for k, v in self.details.items():
            if isinstance(v, (list, tuple)) and len(v) > max_items:
                v = [*v[:max_items], f"... {len(v) - max_items} more"]
            elif isinstance(v, dict) and len(v) > max_items:
                v = {**dict(list(v.items())[:max_items]), "...": f"{len(v) - max_items} more"}
            lines.append(f"  {k}: {v}")
        lines.extend(f"  {m}" for m in self.messages)
        return "\n".join(lines)


def _ops_of(history: History | Iterable[Op]) -> list[Op]:
    return history.ops if isinstance(history, History) else list(history)


def _text(value: str | bytes | None) -> str | None:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _effective_complete(op: Op) -> float:
    """When a set's window closes: its completion if acknowledged, never if indeterminate."""
    if op.outcome == "ok" and op.complete is not None:
        return op.complete
    return INF


# -- G1: no lost acknowledged write ---------------------------------------------------------------


def check_acknowledged(history: History | Iterable[Op],
                       final_read: Callable[[list[str]], Sequence[str | bytes | None]]) -> CheckResult:
    """G1: every acknowledged write is still readable (unless a later write replaced it).

    ``final_read(keys)`` must read the keys once the system is quiet (every op
    of the history completed), e.g. ``lambda ks: client.mget(ks)``.

    For a key with at least one ``ok`` set, the final value must be the value of
    some set S that is not definitely overwritten: S is ``ok`` or ``info`` (never
    a definite ``fail``) and no ``ok`` set T was invoked after S completed
    (``T.invoke > S.complete``; an ``info`` set never completes). Otherwise the
    key is *lost* (missing, overwritten, or unknown value). For every key, a
    final value written only by a definite-``fail`` set is reported as
    *failed_applied* (a G5 violation: "not applied" was a lie).
    """
    ops = _ops_of(history)
    sets: dict[str, list[Op]] = defaultdict(list)
    for op in ops:
        if op.is_write:
            sets[op.key].append(op)
    keys = sorted(sets)
    finals = [_text(v) for v in final_read(keys)] if keys else []
    if len(finals) != len(keys):
        raise ValueError(f"final_read returned {len(finals)} values for {len(keys)} keys")

    lost: list[dict[str, Any]] = []
    failed_applied: list[dict[str, Any]] = []
    acked_sets = checked = 0
    for key, actual in zip(keys, finals):
        key_sets = sets[key]
        acked = [s for s in key_sets if s.outcome == "ok"]
        live = [s for s in key_sets if s.outcome != "fail"]
        failed_values = {s.value for s in key_sets if s.outcome == "fail"}
        if actual is not None and actual in failed_values and all(s.value != actual for s in live):
            failed_applied.append({"key": key, "actual": actual})
        if not acked:
            continue
        checked += 1
        acked_sets += len(acked)
        horizon = max(t.invoke for t in acked)  # S survives iff no acked T has T.invoke > S.complete
        allowed = {s.value for s in live if _effective_complete(s) >= horizon}
        if actual in allowed:
            continue
        if actual is None:
            reason = "missing"
        elif any(s.value == actual for s in live):
            reason = "overwritten value"
        elif actual in failed_values:
            reason = "failed write applied"
        else:
            reason = "unknown value"
        lost.append({"key": key, "expected one of": sorted(v for v in allowed if v is not None)[:5],
                     "actual": actual, "reason": reason})
    ok = not lost and not failed_applied
    messages = [f"lost {x['key']!r}: {x['reason']}: read {x['actual']!r}, expected one of {x['expected one of']}"
                for x in lost[:10]]
    messages += [f"definitely failed write of {x['key']!r} applied: {x['actual']!r}" for x in failed_applied[:10]]
    return CheckResult(ok, {"keys": checked, "acked_sets": acked_sets, "lost": lost,
                            "failed_applied": failed_applied}, "check_acknowledged", messages)


# -- linearizability of per-key registers -----------------------------------------------------------------


@dataclass
class _Call:
    """One op prepared for the search: its window and effect."""

    op: Op
    is_set: bool
    value: str | None
    start: float
    end: float


@dataclass
class KeyVerdict:
    """The search's answer for one key: ``ok`` is None when the budget ran out."""

    ok: bool | None
    ops: int
    states: int
    stuck: Op | None = None
    linearized: int = 0


def _prepare(ops: list[Op]) -> list[_Call]:
    """The ops the search must place, with their windows tightened where that is sound.

    Definite failures and failed or pending gets are dropped. ``info`` sets get
    an endless window. When values are unique per key (the workload's are),
    every read of value v follows the one set S writing v, so S's window may end
    at the earliest completion of a read of v; an ``info`` set nobody read can
    always be placed after everything else, i.e. dropped.
    """
    sets = [o for o in ops if o.is_write and o.outcome != "fail"]
    gets = [o for o in ops if o.kind == "get" and o.outcome == "ok"]
    writers: dict[str | None, int] = defaultdict(int)
    for s in sets:
        writers[s.value] += 1
    first_read: dict[str | None, float] = {}
    for g in gets:
        assert g.complete is not None
        first_read[g.value] = min(first_read.get(g.value, INF), g.complete)
    calls: list[_Call] = []
    for s in sets:
        end = _effective_complete(s)
        # (None is also the initial value: a read of None need not follow a delete)
        if s.value is not None and writers[s.value] == 1:
            read_by = first_read.get(s.value)
            if read_by is None and end == INF:
                continue  # unread indeterminate write: equivalent to never applied
            if read_by is not None and s.invoke < read_by < end:
                end = read_by
        calls.append(_Call(s, True, s.value, s.invoke, end))
    for g in gets:
        assert g.complete is not None
        calls.append(_Call(g, False, g.value, g.invoke, g.complete))
    return calls


_DEAD = ("<no read can see this value>",)  # a hashable state equal to no value


def _memo(linearized: int, state: Any) -> tuple[int, int, Any]:
    """A configuration's memo key. Bits are ops in invocation order, so the linearized
    set is "every op below f" plus a few bits above: store ``f`` and those bits only."""
    f = ((linearized + 1) & ~linearized).bit_length() - 1  # the lowest op not linearized
    return f, linearized >> f, state


def _search(calls: list[_Call], budget: int) -> KeyVerdict:
    """Wing & Gong's search with Lowe's just-in-time linearization and memoization.

    Call and return events form a doubly linked list in time order (calls before
    returns at equal times: such ops count as concurrent). Only calls before the
    first pending return are eligible to be linearized next; meeting the return
    of an unlinearized op means backtracking. Configurations ``(linearized ops
    bitmask, register value)`` are memoized so none is explored twice. Two
    reductions, both exact for a register, keep the search near-linear:

    * *forced reads*: an eligible get that matches the register is linearized at
      once and never branched on (moving a read earlier, to a point where it is
      eligible and sees the same value, changes nothing else), so when the
      search backtracks over it, it backtracks further;
    * *dead values*: a value no remaining get reads is replaced by one
      sentinel, so configurations differing only in such values are one.
    """
    calls = sorted(calls, key=lambda c: (c.start, c.end))  # bit i = i-th invoked: memo keys stay small
    n = len(calls)
    events = sorted([(c.start, 0, i) for i, c in enumerate(calls)] + [(c.end, 1, i) for i, c in enumerate(calls)])
    # node 0 is the head sentinel; nodes 1..2n are the events; -1 ends the list
    size = 2 * n + 1
    nxt = [p + 1 if p + 1 < size else -1 for p in range(size)]
    prv = [p - 1 for p in range(size)]
    is_call = [False] * size
    op_of = [0] * size
    match = [0] * size
    call_node = [0] * n
    for pos, (_, kind, i) in enumerate(events, start=1):
        is_call[pos] = kind == 0
        op_of[pos] = i
        if kind == 0:
            call_node[i] = pos
        else:
            match[call_node[i]] = pos
    is_set = [c.is_set for c in calls]
    values: list[Any] = [c.value for c in calls]
    unread: dict[Any, int] = defaultdict(int)  # value -> gets of it not yet linearized
    for c in calls:
        if not c.is_set:
            unread[c.value] += 1

    def lift(node: int) -> None:
        ret = match[node]
        nxt[prv[node]] = nxt[node]
        if nxt[node] != -1:
            prv[nxt[node]] = prv[node]
        nxt[prv[ret]] = nxt[ret]
        if nxt[ret] != -1:
            prv[nxt[ret]] = prv[ret]

    def unlift(node: int) -> None:
        ret = match[node]
        nxt[prv[ret]] = ret
        if nxt[ret] != -1:
            prv[nxt[ret]] = ret
        nxt[prv[node]] = node
        if nxt[node] != -1:
            prv[nxt[node]] = node

    cache: set[tuple[int, int, Any]] = set()
    stack: list[tuple[int, Any, bool]] = []  # (call node, register before it, forced)
    state: Any = None if unread[None] else _DEAD
    linearized = 0
    best_depth, stuck = -1, -1
    entry = -1  # -1: a new configuration, start with its forced reads
    while True:
        backtrack = False
        if entry == -1:
            if nxt[0] == -1:
                return KeyVerdict(True, n, len(cache), linearized=n)
            node = nxt[0]
            while node != -1 and is_call[node]:  # an eligible get that sees the register?
                i = op_of[node]
                if not is_set[i] and values[i] == state:
                    break
                node = nxt[node]
            else:
                node = -1
            if node != -1:
                i = op_of[node]
                unread[state] -= 1
                new_state = state if unread[state] else _DEAD
                new_lin = linearized | (1 << i)
                memo = _memo(new_lin, new_state)
                if memo in cache:  # explored already, and it failed
                    unread[state] += 1
                    backtrack = True
                else:
                    cache.add(memo)
                    if len(cache) > budget:
                        return KeyVerdict(None, n, len(cache))
                    stack.append((node, state, True))
                    state, linearized = new_state, new_lin
                    lift(node)
                    continue
            else:
                entry = nxt[0]
        if not backtrack:
            if is_call[entry]:
                i = op_of[entry]
                if is_set[i]:
                    new_state = values[i] if unread.get(values[i]) else _DEAD
                    new_lin = linearized | (1 << i)
                    memo = _memo(new_lin, new_state)
                    if memo not in cache:
                        cache.add(memo)
                        if len(cache) > budget:
                            return KeyVerdict(None, n, len(cache))
                        stack.append((entry, state, False))
                        state, linearized = new_state, new_lin
                        lift(entry)
                        entry = -1
                        continue
                entry = nxt[entry]
                continue
            # the return of an op not yet linearized: this configuration is dead
            if len(stack) > best_depth:
                best_depth, stuck = len(stack), op_of[entry]
        while True:  # undo the last choice (and the forced reads after it)
            if not stack:
                if stuck == -1:  # failed at the very first configuration
                    stuck = op_of[entry] if entry > 0 else 0
                return KeyVerdict(False, n, len(cache), calls[stuck].op, max(best_depth, 0))
            node, state, forced = stack.pop()
            i = op_of[node]
            linearized &= ~(1 << i)
            unlift(node)
            if not is_set[i]:
                unread[values[i]] += 1
            if not forced:
                entry = nxt[node]
                break


def _window(ops: list[Op], stuck: Op, calls: list[_Call]) -> list[Op]:
    """Context for a failure: the ops overlapping the stuck op, the last sets before it,
    and the sets that wrote the value it read."""
    spans = {id(c.op): (c.start, c.end) for c in calls}
    s0, s1 = spans.get(id(stuck), (stuck.invoke, stuck.complete or INF))
    overlapping = [o for o in ops if id(o) in spans and spans[id(o)][0] <= s1 and spans[id(o)][1] >= s0]
    before = sorted((o for o in ops if o.is_write and id(o) in spans and spans[id(o)][1] < s0),
                    key=lambda o: spans[id(o)][1])[-2:]
    writers = [o for o in ops if o.is_write and stuck.kind == "get" and o.value == stuck.value
               and o.invoke <= s1][-3:]
    seen: dict[int, Op] = {}
    for o in [*before, *overlapping, *writers]:
        seen.setdefault(o.index, o)
    return sorted(seen.values(), key=lambda o: o.invoke)


def check_linearizable(history: History | Iterable[Op], budget: int = DEFAULT_BUDGET) -> CheckResult:
    """Per key, is the history of sets and gets linearizable as a register (initially None)?

    ``fail`` ops and failed gets are removed; ``info`` sets may take effect at
    any point after their invocation, or never. ``budget`` bounds the memoized
    states explored per key; a key that exhausts it is *inconclusive*, which
    fails the check (a history that was not checked never passes).
    """
    ops = _ops_of(history)
    by_key: dict[str, list[Op]] = defaultdict(list)
    for op in ops:
        by_key[op.key].append(op)
    per_key: dict[str, dict[str, Any]] = {}
    failures: list[str] = []
    inconclusive: list[str] = []
    messages: list[str] = []
    evidence: dict[str, list[Op]] = {}
    for key in sorted(by_key):
        key_ops = by_key[key]
        calls = _prepare(key_ops)
        verdict = _search(calls, budget)
        per_key[key] = {"ops": len(key_ops), "searched": verdict.ops, "states": verdict.states, "ok": verdict.ok}
        if verdict.ok is None:
            inconclusive.append(key)
            messages.append(f"key {key!r}: inconclusive, search budget of {budget} states exhausted "
                            f"({verdict.ops} ops)")
        elif not verdict.ok:
            failures.append(key)
            assert verdict.stuck is not None
            window = _window(key_ops, verdict.stuck, calls)
            evidence[key] = [verdict.stuck, *(o for o in window if o.index != verdict.stuck.index)]
            messages.append(f"key {key!r}: not linearizable ({verdict.ops} ops searched); the longest "
                            f"linearizable prefix found has {verdict.linearized} ops, and then this op cannot "
                            f"take effect within its window: {verdict.stuck}")
            messages.append("  the ops around it (overlapping it, the last sets before it, the writers of "
                            "the value it read):")
            messages.extend(f"    {o}" for o in window)
    ok = not failures and not inconclusive
    details = {"keys": len(by_key), "ops": len(ops), "failed_keys": failures, "inconclusive_keys": inconclusive,
               "states": sum(v["states"] for v in per_key.values())}
    result = CheckResult(ok, details, "check_linearizable", messages, evidence)
    result.details["per_key"] = per_key
    return result


# -- G3: convergence ----------------------------------------------------------------------------------


def check_converged(digests: dict[str, list[Any]], min_members: int = 1) -> CheckResult:
    """G3: every member's digest (e.g. ``Cluster.digests(shard)``: member -> per-range
    ``[applied_lsn, digest]``) is identical, and at least ``min_members`` answered."""
    groups: list[tuple[Any, list[str]]] = []
    for member in sorted(digests):
        for value, members in groups:
            if value == digests[member]:
                members.append(member)
                break
        else:
            groups.append((digests[member], [member]))
    ok = len(groups) == 1 and len(digests) >= min_members
    messages = []
    if len(digests) < min_members:
        messages.append(f"only {len(digests)} member(s) answered, expected at least {min_members}")
    if len(groups) > 1:
        messages.extend(f"{', '.join(members)}: {value}" for value, members in groups)
    return CheckResult(ok, {"members": sorted(digests), "distinct": len(groups)}, "check_converged", messages)
