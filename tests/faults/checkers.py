"""Judge histories and replica states against DESIGN §2: G1 (no lost acknowledged write), per-key
linearizability (registers with compare-and-set), counters, and G3 (convergence).

This module's single job is *checking*; it records nothing and touches no node
(the final read is a callable the caller provides). Every checker returns a
:class:`CheckResult`, whose :meth:`CheckResult.format` is meant for assertion
messages: ``assert r.ok, r.format()``.

Outcomes follow :mod:`tests.faults.history`: ``fail`` ops never happened;
``info`` (and still pending) writes may take effect at any time after their
invocation, or never; failed gets are ignored. A delete is a write of ``None``
(the register's initial value); a cas that may have written (``ok`` with result
True, ``info``, pending) is a write of its new value, and one that returned False
wrote nothing: "set" below means any of these writes.
"""

from __future__ import annotations

import bisect
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from tests.faults.history import REGISTER_KINDS, History, Op

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


def check_acknowledged(
    history: History | Iterable[Op], final_read: Callable[[list[str]], Sequence[str | bytes | None]]
) -> CheckResult:
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
        if op.writes_register:
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
        lost.append(
            {
                "key": key,
                "expected one of": sorted(v for v in allowed if v is not None)[:5],
                "actual": actual,
                "reason": reason,
            }
        )
    ok = not lost and not failed_applied
    messages = [
        f"lost {x['key']!r}: {x['reason']}: read {x['actual']!r}, expected one of {x['expected one of']}"
        for x in lost[:10]
    ]
    messages += [f"definitely failed write of {x['key']!r} applied: {x['actual']!r}" for x in failed_applied[:10]]
    return CheckResult(
        ok,
        {"keys": checked, "acked_sets": acked_sets, "lost": lost, "failed_applied": failed_applied},
        "check_acknowledged",
        messages,
    )


# -- linearizability of per-key registers -----------------------------------------------------------------

#: what a prepared call does to the register: becomes ``value``; holds ``value``; holds
#: ``expected`` and becomes ``value``; does not hold ``expected`` (a cas that found another value)
WRITE, READ, CAS, NOCAS = 0, 1, 2, 3


@dataclass
class _Call:
    """One op prepared for the search: its effect (WRITE, READ, CAS, NOCAS) and window.

    ``end`` is INF for an *optional* op: one that may take effect at any point after
    ``start``, or never (an ``info`` or pending write nobody is known to have observed).
    """

    op: Op
    effect: int
    value: str | None
    start: float
    end: float
    expected: str | None = None


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

    Definite failures, failed or pending gets and non-register ops (incr) are
    dropped. An ``ok`` cas that returned False is a read that saw something other
    than its ``expected`` (NOCAS). ``info`` (and pending) writes are optional: they
    may take effect at any point after their invocation, or never.

    When values are unique per key (the workload's are), every *observation* of
    value v (a get of v, an acknowledged successful cas expecting v) follows the one
    write W of v, so W's window may end at the earliest completion of such an
    observation, and an optional W that was observed did take effect: it becomes
    required. An optional W nobody observed can only leave the register holding a
    value nobody sees; that may matter to a failed cas completing after W's
    invocation (it may be what that cas found) or to an indeterminate cas
    expecting W's value (it may have applied), so W is dropped when there is no
    such cas.
    """
    regs = [o for o in ops if o.kind in REGISTER_KINDS]
    writes = [o for o in regs if o.writes_register and o.outcome != "fail"]
    gets = [o for o in regs if o.kind == "get" and o.outcome == "ok"]
    nocas = [o for o in regs if o.kind == "cas" and o.outcome == "ok" and o.result is False]
    writers: dict[str | None, int] = defaultdict(int)
    for w in writes:
        writers[w.value] += 1
    first_seen: dict[str | None, float] = {}
    for o in regs:
        if o.outcome == "ok" and (o.kind == "get" or (o.kind == "cas" and o.result is True)):
            assert o.complete is not None
            seen = o.value if o.kind == "get" else o.expected
            first_seen[seen] = min(first_seen.get(seen, INF), o.complete)
    last_nocas = max((o.complete or INF for o in nocas), default=-INF)
    # values an indeterminate cas expects: if it applied, it saw them
    maybe_seen = {o.expected for o in writes if o.kind == "cas" and o.outcome != "ok"}
    calls: list[_Call] = []
    for w in writes:
        end = _effective_complete(w)
        # (None is also the initial value: a read of None need not follow a delete)
        if w.value is not None and writers[w.value] == 1:
            seen = first_seen.get(w.value)
            if seen is None and end == INF and last_nocas < w.invoke and w.value not in maybe_seen:
                continue  # unobserved indeterminate write nothing can tell from never applied
            if seen is not None and w.invoke < seen < end:
                end = seen
        calls.append(_Call(w, CAS if w.kind == "cas" else WRITE, w.value, w.invoke, end, w.expected))
    for g in gets:
        assert g.complete is not None
        calls.append(_Call(g, READ, g.value, g.invoke, g.complete))
    for c in nocas:
        assert c.complete is not None
        calls.append(_Call(c, NOCAS, None, c.invoke, c.complete, c.expected))
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
    of an unlinearized op means backtracking. An optional op has no return event:
    it stays eligible until it is linearized, or forever (it never took effect),
    and the search succeeds once every required op is linearized.
    Configurations ``(linearized ops bitmask, register value)`` are memoized so
    none is explored twice. Two reductions, both exact for a register with CAS,
    keep the search near-linear:

    * *forced reads*: an eligible op without effect (a get, a failed cas) whose
      condition holds (the register holds the value read; it does not hold the
      value the cas expected) is linearized at once and never branched on (moving
      such an op earlier, to a point where it is eligible and its condition holds,
      changes nothing else), so when the search backtracks over it, it backtracks
      further;
    * *dead values*: a value no remaining op reads or expects is replaced by one
      sentinel, so configurations differing only in such values are one (the
      sentinel equals no value: a failed cas expecting any remaining value holds
      on it, a get or a successful cas does not).
    """
    calls = sorted(calls, key=lambda c: (c.start, c.end))  # bit i = i-th invoked: memo keys stay small
    n = len(calls)
    events = sorted(
        [(c.start, 0, i) for i, c in enumerate(calls)] + [(c.end, 1, i) for i, c in enumerate(calls) if c.end != INF]
    )
    # node 0 is the head sentinel; then the events; -1 ends the list
    size = len(events) + 1
    nxt = [p + 1 if p + 1 < size else -1 for p in range(size)]
    prv = [p - 1 for p in range(size)]
    is_call = [False] * size
    op_of = [0] * size
    match = [0] * size  # call node -> its return node (0: optional, none)
    call_node = [0] * n
    for pos, (_, kind, i) in enumerate(events, start=1):
        is_call[pos] = kind == 0
        op_of[pos] = i
        if kind == 0:
            call_node[i] = pos
        else:
            match[call_node[i]] = pos
    effect = [c.effect for c in calls]
    values: list[Any] = [c.value for c in calls]
    expected: list[Any] = [c.expected for c in calls]
    required = [c.end != INF for c in calls]
    required_left = sum(required)
    unread: dict[Any, int] = defaultdict(int)  # value -> remaining ops that read or expect it
    for c in calls:
        if c.effect == READ:
            unread[c.value] += 1
        elif c.effect in (CAS, NOCAS):
            unread[c.expected] += 1

    def unlink(p: int) -> None:
        nxt[prv[p]] = nxt[p]
        if nxt[p] != -1:
            prv[nxt[p]] = prv[p]

    def relink(p: int) -> None:
        nxt[prv[p]] = p
        if nxt[p] != -1:
            prv[nxt[p]] = p

    def lift(node: int) -> None:
        unlink(node)
        if match[node]:
            unlink(match[node])

    def unlift(node: int) -> None:
        if match[node]:
            relink(match[node])
        relink(node)

    def apply(i: int, state: Any) -> Any:
        """Take op i's reads off ``unread``; the register after it."""
        e = effect[i]
        if e == READ:
            unread[state] -= 1
            return state if unread[state] else _DEAD
        if e == NOCAS:
            unread[expected[i]] -= 1
            return state
        if e == CAS:
            unread[expected[i]] -= 1
        return values[i] if unread.get(values[i]) else _DEAD

    def unapply(i: int) -> None:
        e = effect[i]
        if e == READ:
            unread[values[i]] += 1
        elif e != WRITE:
            unread[expected[i]] += 1

    cache: set[tuple[int, int, Any]] = set()
    stack: list[tuple[int, Any, bool]] = []  # (call node, register before it, forced)
    state: Any = None if unread[None] else _DEAD
    linearized = 0
    best_depth, stuck = -1, -1
    entry = -1  # -1: a new configuration, start with its forced reads
    while True:
        backtrack = False
        if entry == -1:
            if required_left == 0:
                return KeyVerdict(True, n, len(cache), linearized=len(stack))
            node = nxt[0]
            while node != -1 and is_call[node]:  # an eligible op without effect whose condition holds?
                i = op_of[node]
                if (effect[i] == READ and values[i] == state) or (effect[i] == NOCAS and expected[i] != state):
                    break
                node = nxt[node]
            else:
                node = -1
            if node != -1:
                i = op_of[node]
                new_state = apply(i, state)
                new_lin = linearized | (1 << i)
                memo = _memo(new_lin, new_state)
                if memo in cache:  # explored already, and it failed
                    unapply(i)
                    backtrack = True
                else:
                    cache.add(memo)
                    if len(cache) > budget:
                        return KeyVerdict(None, n, len(cache))
                    stack.append((node, state, True))
                    state, linearized = new_state, new_lin
                    required_left -= required[i]
                    lift(node)
                    continue
            else:
                entry = nxt[0]
        if not backtrack:
            if entry != -1 and is_call[entry]:
                i = op_of[entry]
                if effect[i] == WRITE or (effect[i] == CAS and expected[i] == state):
                    new_state = apply(i, state)
                    new_lin = linearized | (1 << i)
                    memo = _memo(new_lin, new_state)
                    if memo not in cache:
                        cache.add(memo)
                        if len(cache) > budget:
                            return KeyVerdict(None, n, len(cache))
                        stack.append((entry, state, False))
                        state, linearized = new_state, new_lin
                        required_left -= required[i]
                        lift(entry)
                        entry = -1
                        continue
                    unapply(i)
                entry = nxt[entry]
                continue
            # the return of an op not yet linearized (or, impossibly, the end): this configuration is dead
            if entry != -1 and len(stack) > best_depth:
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
            unapply(i)
            required_left += required[i]
            if not forced:
                entry = nxt[node]
                break


def _observed(op: Op) -> tuple[bool, str | None]:
    """Whether ``op`` depends on the register's value, and the value it read or expected."""
    if op.kind == "get":
        return True, op.value
    if op.kind == "cas":
        return True, op.expected
    return False, None


def _window(ops: list[Op], stuck: Op, calls: list[_Call]) -> list[Op]:
    """Context for a failure: the ops overlapping the stuck op, the last writes before it,
    and the writes of the value it read (or, for a cas, expected)."""
    spans = {id(c.op): (c.start, c.end) for c in calls}
    s0, s1 = spans.get(id(stuck), (stuck.invoke, stuck.complete or INF))
    overlapping = [o for o in ops if id(o) in spans and spans[id(o)][0] <= s1 and spans[id(o)][1] >= s0]
    before = sorted(
        (o for o in ops if o.writes_register and id(o) in spans and spans[id(o)][1] < s0), key=lambda o: spans[id(o)][1]
    )[-2:]
    observes, seen_value = _observed(stuck)
    writers = [o for o in ops if o.writes_register and observes and o.value == seen_value and o.invoke <= s1][-3:]
    seen: dict[int, Op] = {}
    for o in [*before, *overlapping, *writers]:
        seen.setdefault(o.index, o)
    return sorted(seen.values(), key=lambda o: o.invoke)


def check_linearizable(history: History | Iterable[Op], budget: int = DEFAULT_BUDGET) -> CheckResult:
    """Per key, is the history of sets, deletes, cas and gets linearizable as a register
    (initially None) with compare-and-set?

    ``fail`` ops and failed gets are removed; ``info`` writes may take effect at
    any point after their invocation, or never; a cas that returned False is a
    read that found another value than it expected. Incr ops (counter keys) are
    not registers: :func:`check_counters` judges them. ``budget`` bounds the
    memoized states explored per key; a key that exhausts it is *inconclusive*,
    which fails the check (a history that was not checked never passes).
    """
    ops = _ops_of(history)
    by_key: dict[str, list[Op]] = defaultdict(list)
    for op in ops:
        if op.kind in REGISTER_KINDS:
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
            messages.append(
                f"key {key!r}: inconclusive, search budget of {budget} states exhausted ({verdict.ops} ops)"
            )
        elif not verdict.ok:
            failures.append(key)
            assert verdict.stuck is not None
            window = _window(key_ops, verdict.stuck, calls)
            evidence[key] = [verdict.stuck, *(o for o in window if o.index != verdict.stuck.index)]
            messages.append(
                f"key {key!r}: not linearizable ({verdict.ops} ops searched); the longest "
                f"linearizable prefix found has {verdict.linearized} ops, and then this op cannot "
                f"take effect within its window: {verdict.stuck}"
            )
            messages.append(
                "  the ops around it (overlapping it, the last writes before it, the writers "
                "of the value it read or expected):"
            )
            messages.extend(f"    {o}" for o in window)
    ok = not failures and not inconclusive
    details = {
        "keys": len(by_key),
        "ops": len(ops),
        "failed_keys": failures,
        "inconclusive_keys": inconclusive,
        "states": sum(v["states"] for v in per_key.values()),
    }
    result = CheckResult(ok, details, "check_linearizable", messages, evidence)
    result.details["per_key"] = per_key
    return result


# -- counters -----------------------------------------------------------------------------------------


def check_counters(
    history: History | Iterable[Op], final_read: Callable[[list[str]], Sequence[str | bytes | None]]
) -> CheckResult:
    """Counters: keys only ever changed by ``incr(key, 1)``, from absent (0).

    ``final_read(keys)`` reads the counter keys once the system is quiet (a
    linearizable read after healing). For each key with incr ops, with ``acked``
    the ``ok`` increments and ``maybe`` the ``info`` (or pending) ones:

    * the final value is an integer and ``acked <= final <= acked + maybe``: no
      acknowledged increment was lost, no increment applied twice, none applied
      that definitely failed;
    * the acknowledged increments returned distinct values (two never returned
      the same count), each within ``[1, final]``;
    * real time: an increment that completed before another was invoked returned
      less than it, and no increment returned more than the increments (``ok`` or
      ``info``) invoked before it completed.
    """
    ops = _ops_of(history)
    incrs: dict[str, list[Op]] = defaultdict(list)
    for op in ops:
        if op.kind == "incr":
            incrs[op.key].append(op)
    keys = sorted(incrs)
    finals = [_text(v) for v in final_read(keys)] if keys else []
    if len(finals) != len(keys):
        raise ValueError(f"final_read returned {len(finals)} values for {len(keys)} keys")
    problems: list[dict[str, Any]] = []
    per_key: dict[str, dict[str, Any]] = {}
    evidence: dict[str, list[Op]] = {}

    def problem(key: str, what: str, culprits: Sequence[Op] = ()) -> None:
        problems.append({"key": key, "problem": what, "ops": [str(o) for o in culprits[:6]]})
        evidence.setdefault(key, list(culprits[:6]))

    for key, text in zip(keys, finals):
        acked = [o for o in incrs[key] if o.outcome == "ok"]
        maybe = [o for o in incrs[key] if o.outcome in ("info", None)]
        per_key[key] = {
            "final": text,
            "acked": len(acked),
            "indeterminate": len(maybe),
            "failed": sum(1 for o in incrs[key] if o.outcome == "fail"),
        }
        try:
            final = 0 if text is None else int(text)
        except ValueError:
            problem(key, f"final value {text!r} is not an integer")
            continue
        if final < len(acked):
            problem(key, f"lost increments: final value {final} < {len(acked)} acknowledged")
        elif final > len(acked) + len(maybe):
            problem(
                key,
                f"too many increments: final value {final} > {len(acked)} acknowledged + {len(maybe)} indeterminate",
            )
        by_result: dict[int, list[Op]] = defaultdict(list)
        for o in acked:
            by_result[int(o.result or 0)].append(o)
        for r, same in sorted(by_result.items()):
            if len(same) > 1:
                problem(key, f"{len(same)} increments returned {r}", same)
            if not 1 <= r <= final:
                problem(key, f"an increment returned {r}, outside [1, {final}]", same)
        # an acked incr A that completed before acked B was invoked returned less than B
        by_complete = sorted(acked, key=lambda o: o.complete or 0.0)
        best: Op | None = None  # among those completed before the current invocation, the largest result
        j = 0
        for b in sorted(acked, key=lambda o: o.invoke):
            while j < len(by_complete) and (by_complete[j].complete or 0.0) < b.invoke:
                a = by_complete[j]
                if best is None or int(a.result or 0) > int(best.result or 0):
                    best = a
                j += 1
            if best is not None and int(best.result or 0) >= int(b.result or 0):
                problem(
                    key,
                    f"real-time order: returned {b.result} after an increment that completed "
                    f"before it was invoked returned {best.result}",
                    [best, b],
                )
        invoked = sorted(o.invoke for o in acked + maybe)
        for b in acked:
            can = bisect.bisect_right(invoked, b.complete if b.complete is not None else INF)
            if int(b.result or 0) > can:
                problem(key, f"returned {b.result} but only {can} increments were invoked before it completed", [b])
    ok = not problems
    messages = [
        f"counter {p['key']!r}: {p['problem']}" + (f": {'; '.join(p['ops'])}" if p["ops"] else "")
        for p in problems[:20]
    ]
    return CheckResult(
        ok, {"keys": len(keys), "problems": problems, "per_key": per_key}, "check_counters", messages, evidence
    )


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
