"""The writer's sequencer (dkv.node.sequencer), pure: every condition, increment and expiry
decision, the records it turns them into, and revisions. No store, no clock, no I/O: the
committed state is a dict and time is a number."""

from __future__ import annotations

import pytest

from dkv.errors import InvalidArgument, KeyIsEmpty
from dkv.node.sequencer import REV_SHIFT, Kind, Sequencer, Write, parse_int
from dkv.storage import entry as entries
from dkv.storage.entry import Entry
from dkv.wal.record import Op, Record

NOW = 1_700_000_000_000  # ms


class State:
    """Committed state: what the store holds (expired entries included)."""

    def __init__(self, **kv: Entry) -> None:
        self.d = {k.encode(): v for k, v in kv.items()}

    def read(self, key: bytes) -> Entry | None:
        if not key:  # as the store: a keyless write (a floor) must not read
            raise KeyIsEmpty("key must not be empty")
        return self.d.get(key)

    def apply(self, records: list[Record]) -> None:
        for r in records:
            if r.op == Op.PUT:
                self.d[r.key] = Entry(r.value, r.rev, r.expires_at)
            elif r.op == Op.IMPORT:
                self.d[r.key] = entries.decode(r.value)
            elif r.op in (Op.DELETE, Op.EXPIRE, Op.PURGE):
                self.d.pop(r.key, None)


def run(seq: Sequencer, *writes: Write, lsn: int = 1, now: int = NOW) -> tuple[list[Record], list]:
    records, [results] = seq.sequence([list(writes)], 3, lsn, now)
    return records, results


def W(kind: Kind, key: str, value: str = "", **kw) -> Write:  # type: ignore[no-untyped-def]
    if "expected" in kw and isinstance(kw["expected"], str):
        kw["expected"] = kw["expected"].encode()
    return Write(kind, key.encode(), value.encode(), **kw)


def test_plain_set_writes_a_put_with_a_fresh_revision_and_no_deadline() -> None:
    seq = Sequencer(State().read)
    records, results = run(seq, W(Kind.SET, "k", "v"))
    assert records == [Record(3, 1, Op.PUT, b"k", b"v", NOW << REV_SHIFT, 0)]
    assert results == [NOW << REV_SHIFT]


def test_set_nx_and_xx_decide_against_the_state_and_the_batch_in_progress() -> None:
    seq = Sequencer(State(old=Entry(b"1", 5)).read)
    records, results = run(
        seq,
        W(Kind.SET, "old", "2", cond="nx"),
        W(Kind.SET, "new", "1", cond="xx"),
        W(Kind.SET, "new", "1", cond="nx"),
        W(Kind.SET, "new", "2", cond="nx"),
        W(Kind.SET, "new", "3", cond="xx"),
    )
    assert results[0] is None and results[1] is None and results[3] is None  # conditions failed
    assert isinstance(results[2], int) and isinstance(results[4], int)
    assert [(r.key, r.value, r.lsn) for r in records] == [(b"new", b"1", 1), (b"new", b"3", 2)]


def test_a_set_with_px_gets_a_deadline_and_a_plain_set_clears_it() -> None:
    state = State()
    seq = Sequencer(state.read)
    records, _ = run(seq, W(Kind.SET, "k", "v", px=1500))
    assert records[0].expires_at == NOW + 1500
    state.apply(records)
    records, _ = run(seq, W(Kind.SET, "k", "w"), lsn=2)
    assert records[0].expires_at == 0


def test_an_expired_key_counts_as_absent_for_every_condition() -> None:
    state = State(gone=Entry(b"x", 1, NOW - 1), live=Entry(b"y", 2, NOW + 1))
    seq = Sequencer(state.read)
    _, results = run(
        seq,
        W(Kind.SET, "gone", "new", cond="xx"),
        W(Kind.CAS, "gone", "z", expected="x"),
        W(Kind.INCR, "gone", amount=1),
        W(Kind.SET, "live", "v", cond="nx"),
    )
    assert results[0] is None and results[1] is None and results[3] is None
    assert results[2] == 1  # incr of an expired key starts from 0


def test_cas_compares_the_current_value_and_none_means_absent() -> None:
    state = State(k=Entry(b"a", 1))
    seq = Sequencer(state.read)
    records, results = run(
        seq,
        W(Kind.CAS, "k", "b", expected="x"),
        W(Kind.CAS, "k", "b", expected="a"),
        W(Kind.CAS, "k", "c", expected="a"),
        W(Kind.CAS, "n", "1", expected=None),
        W(Kind.CAS, "n", "2", expected=None),
        W(Kind.CAS, "k", "d", expected="b", px=10),
    )
    assert [r is not None for r in results] == [False, True, False, True, False, True]
    assert [(r.key, r.value, r.expires_at) for r in records] == [
        (b"k", b"b", 0),
        (b"n", b"1", 0),
        (b"k", b"d", NOW + 10),
    ]


def test_delete_if_value_and_the_existed_result() -> None:
    state = State(k=Entry(b"a", 1, NOW + 100), e=Entry(b"z", 1, NOW - 5))
    seq = Sequencer(state.read)
    records, results = run(
        seq,
        W(Kind.DELETE, "k", expected="b"),
        W(Kind.DELETE, "k", expected="a"),
        W(Kind.DELETE, "k"),
        W(Kind.DELETE, "missing"),
        W(Kind.DELETE, "e"),
    )
    assert results == [False, True, False, False, False]
    # the DELETE names the deadline it removes (so its index row goes); the expired key is removed
    # as an EXPIRE (what it is), with no "existed"
    assert [(r.op, r.key, r.expires_at) for r in records] == [(Op.DELETE, b"k", NOW + 100), (Op.EXPIRE, b"e", NOW - 5)]


def test_incr_counts_in_ascii_decimal_keeps_the_deadline_and_refuses_non_integers() -> None:
    state = State(c=Entry(b"41", 1, NOW + 60_000), s=Entry(b"abc", 1), big=Entry(str(2**63 - 1).encode(), 1))
    seq = Sequencer(state.read)
    records, results = run(
        seq,
        W(Kind.INCR, "c", amount=1),
        W(Kind.INCR, "c", amount=-50),
        W(Kind.INCR, "fresh", amount=7),
        W(Kind.INCR, "s", amount=1),
        W(Kind.INCR, "big", amount=1),
    )
    assert results[:3] == [42, -8, 7]
    assert isinstance(results[3], InvalidArgument) and isinstance(results[4], InvalidArgument)
    assert [(r.key, r.value, r.expires_at) for r in records] == [
        (b"c", b"42", NOW + 60_000),
        (b"c", b"-8", NOW + 60_000),
        (b"fresh", b"7", 0),
    ]
    assert [r.lsn for r in records] == [1, 2, 3]  # refused writes take no LSN


@pytest.mark.parametrize("text", [b"", b"-", b"+1", b" 1", b"1 ", b"01", b"1.0", b"1e3", b"\xff", b"9" * 21])
def test_parse_int_is_strict(text: bytes) -> None:
    with pytest.raises(InvalidArgument):
        parse_int(text)


def test_parse_int_accepts_the_range_of_a_64_bit_integer() -> None:
    assert parse_int(b"0") == 0 and parse_int(b"-12") == -12
    assert parse_int(str(2**63 - 1).encode()) == 2**63 - 1 and parse_int(str(-(2**63)).encode()) == -(2**63)
    with pytest.raises(InvalidArgument):
        parse_int(str(2**63).encode())


def test_expire_and_persist_rewrite_the_value_with_the_new_deadline() -> None:
    state = State(k=Entry(b"v", 1), t=Entry(b"w", 1, NOW + 9))
    seq = Sequencer(state.read)
    records, results = run(
        seq,
        W(Kind.EXPIRE, "k", px=500),
        W(Kind.EXPIRE, "missing", px=5),
        W(Kind.PERSIST, "t"),
        W(Kind.PERSIST, "t"),
        W(Kind.PERSIST, "missing"),
    )
    assert results == [True, False, True, False, False]
    assert [(r.key, r.value, r.expires_at) for r in records] == [(b"k", b"v", NOW + 500), (b"t", b"w", 0)]


def test_expire_due_removes_only_an_entry_that_still_has_that_deadline_and_is_due() -> None:
    state = State(due=Entry(b"v", 1, NOW - 1), later=Entry(b"v", 1, NOW + 1), moved=Entry(b"v", 1, NOW - 1))
    seq = Sequencer(state.read)
    records, results = run(
        seq,
        W(Kind.EXPIRE_DUE, "due", deadline=NOW - 1),
        W(Kind.EXPIRE_DUE, "later", deadline=NOW + 1),
        W(Kind.EXPIRE_DUE, "moved", deadline=NOW - 100),  # a stale index row
        W(Kind.EXPIRE_DUE, "missing", deadline=NOW - 1),
    )
    assert results == [True, False, False, False]
    assert [(r.op, r.key, r.expires_at) for r in records] == [(Op.EXPIRE, b"due", NOW - 1)]


def test_a_write_in_the_same_batch_wins_over_a_pending_expiry() -> None:
    seq = Sequencer(State(k=Entry(b"v", 1, NOW - 1)).read)
    records, results = run(seq, W(Kind.SET, "k", "new"), W(Kind.EXPIRE_DUE, "k", deadline=NOW - 1))
    assert results[1] is False and [r.op for r in records] == [Op.PUT]


def test_imports_keep_the_entry_purges_remove_without_an_event_and_the_floor_raises_revisions() -> None:
    state = State(old=Entry(b"x", 1))
    seq = Sequencer(state.read)
    blob = entries.encode(b"v", 12345, NOW + 7)
    records, results = run(
        seq,
        Write(Kind.IMPORT, b"k", blob),
        W(Kind.PURGE, "old"),
        W(Kind.PURGE, "missing"),
        Write(Kind.FLOOR, b"", deadline=(NOW + 10_000) << REV_SHIFT),
    )
    assert results == [None, None, None, None]
    imp, purge, floor = records
    assert (imp.op, imp.value, imp.expires_at) == (Op.IMPORT, blob, NOW + 7)
    assert (purge.op, purge.key) == (Op.PURGE, b"old")
    assert floor.op == Op.NOOP and floor.rev > (NOW + 10_000) << REV_SHIFT
    later, _ = run(seq, W(Kind.SET, "a", "1"), lsn=4)
    assert later[0].rev > floor.rev  # everything after the floor is above the source's revisions
    _, [bad] = run(seq, Write(Kind.IMPORT, b"k", b"\x07"), lsn=5)
    assert isinstance(bad, InvalidArgument)


def test_revisions_strictly_increase_when_the_clock_goes_back_and_above_an_observed_log_end() -> None:
    seq = Sequencer(State().read)
    a, _ = run(seq, W(Kind.SET, "k", "1"), W(Kind.SET, "k", "2"), now=NOW)
    b, _ = run(seq, W(Kind.SET, "k", "3"), lsn=3, now=NOW - 60_000)  # the clock stepped back
    revs = [r.rev for r in a + b]
    assert revs == sorted(set(revs))
    promoted = Sequencer(State().read, last_rev=(NOW + 3_600_000) << REV_SHIFT)  # a log from a fast clock
    c, _ = run(promoted, W(Kind.SET, "k", "4"))
    assert c[0].rev == ((NOW + 3_600_000) << REV_SHIFT) + 1
    promoted.observe(c[0].rev + 100)
    d, _ = run(promoted, W(Kind.SET, "k", "5"), lsn=2)
    assert d[0].rev == c[0].rev + 101


def test_batches_in_flight_are_seen_until_settled_then_the_store_tells() -> None:
    state = State()
    seq = Sequencer(state.read)
    first, _ = run(seq, W(Kind.SET, "k", "1", cond="nx"))  # in flight, not applied
    _, [again] = seq.sequence([[W(Kind.SET, "k", "2", cond="nx")]], 3, 2, NOW)
    assert again == [None]  # the batch in flight already holds k
    seq.settled(first)  # it failed (rolled back): nothing in the store
    second, [res] = seq.sequence([[W(Kind.SET, "k", "3", cond="nx")]], 3, 2, NOW)
    assert isinstance(res[0], int)
    state.apply(second)
    seq.settled(second)
    _, [res] = seq.sequence([[W(Kind.CAS, "k", "4", expected="3")]], 3, 3, NOW)
    assert isinstance(res[0], int)


def test_an_overlay_entry_stays_until_its_last_batch_settles() -> None:
    seq = Sequencer(State().read)
    one, _ = run(seq, W(Kind.SET, "k", "1"))
    two, _ = run(seq, W(Kind.SET, "k", "2"), lsn=2)
    seq.settled(one)  # the first batch settles: k still shows the second's value
    _, [res] = seq.sequence([[W(Kind.CAS, "k", "3", expected="2")]], 3, 3, NOW)
    assert isinstance(res[0], int)


def test_results_are_per_submission() -> None:
    seq = Sequencer(State().read)
    records, results = seq.sequence([[W(Kind.SET, "a", "1")], [W(Kind.DELETE, "a"), W(Kind.DELETE, "a")]], 3, 1, NOW)
    assert len(results) == 2 and results[1] == [True, False] and len(records) == 2
