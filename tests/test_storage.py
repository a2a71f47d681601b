"""One suite for the storage layer, run over both engines (LevelDB and memory)."""

from __future__ import annotations

import random
from typing import Iterator, Sequence

import pytest

from dkv.errors import CorruptLog, DKVError, InvalidArgument, KeyIsEmpty, KeyNotFound, StorageClosed
from dkv.slots import ALL_SLOTS, NUM_SLOTS, SlotRange, slot_of, storage_key
from dkv.storage import Engine, LevelDBEngine, MemoryEngine, Store, entry
from dkv.storage.engine import EngineSnapshot, WriteOp
from dkv.storage.store import META_PREFIX
from dkv.wal.record import Op, Record

KINDS = ["leveldb", "memory"]


class CountingEngine(Engine):
    """Delegates to ``inner``, counting iterated entries and recording writes."""

    def __init__(self, inner: Engine) -> None:
        self.inner = inner
        self.reads = 0
        self.writes: list[list[WriteOp]] = []

    def _get(self, key: bytes) -> bytes | None:
        return self.inner.get(key)

    def _iterate(self, start: bytes | None, stop: bytes | None, reverse: bool) -> Iterator[tuple[bytes, bytes]]:
        for kv in self.inner.iterate(start, stop, reverse):
            self.reads += 1
            yield kv

    def _write(self, ops: Sequence[WriteOp], sync: bool) -> None:
        self.writes.append(list(ops))
        self.inner.write(ops, sync)

    def _snapshot(self) -> EngineSnapshot:
        return self.inner.snapshot()

    def _release(self) -> None:
        self.inner.close()


def make_engine(kind: str, path) -> Engine:
    return LevelDBEngine(str(path)) if kind == "leveldb" else MemoryEngine()


@pytest.fixture(params=KINDS)
def engine(request, tmp_path) -> Iterator[Engine]:
    eng = make_engine(request.param, tmp_path / "db")
    yield eng
    eng.close()


@pytest.fixture
def counting(engine) -> CountingEngine:
    return CountingEngine(engine)


@pytest.fixture
def store(counting) -> Iterator[Store]:
    s = Store(counting)
    yield s
    s.close()


def recs(first: int, last: int, epoch: int = 1, prefix: bytes = b"k") -> list[Record]:
    return [Record(epoch, i, Op.PUT, prefix + str(i).encode(), b"v%d" % i) for i in range(first, last + 1)]


def fill(store: Store, n: int, seed: int = 7) -> dict[bytes, bytes]:
    rnd = random.Random(seed)
    model = {}
    for i in range(n):
        key = rnd.choice([b"user:", b"item:", b"a", b"\xff", b""]) + rnd.randbytes(rnd.randint(1, 6))
        model[key] = b"v" + key
    with store.batch() as b:
        for k, v in model.items():
            b.put(k, v)
    return model


# --- raw engines -------------------------------------------------------------


def test_engine_iterate_bounds_and_reverse(engine):
    engine.write([(bytes([i]) * 2, b"%d" % i) for i in range(0, 250, 3)])
    keys = [bytes([i]) * 2 for i in range(0, 250, 3)]
    assert [k for k, _ in engine.iterate()] == keys
    assert [k for k, _ in engine.iterate(reverse=True)] == keys[::-1]
    sub = [k for k in keys if b"\x10" <= k < b"\x80"]
    assert [k for k, _ in engine.iterate(b"\x10", b"\x80")] == sub
    assert [k for k, _ in engine.iterate(b"\x10", b"\x80", reverse=True)] == sub[::-1]
    assert list(engine.iterate(b"\x80", b"\x10")) == []
    # reverse ranges whose highest key equals start (plyvel needs a workaround here)
    assert list(engine.iterate(keys[5], keys[5] + b"\x00", reverse=True)) == [(keys[5], b"15")]
    assert [k for k, _ in engine.iterate(keys[5], keys[7] + b"\x00", reverse=True)] == keys[7:4:-1]
    assert [k for k, _ in engine.iterate(keys[-1], reverse=True)] == [keys[-1]]


def test_engine_iterate_spans_chunks_and_tolerates_writes(engine):
    keys = [b"%05d" % i for i in range(1000)]
    engine.write([(k, k) for k in keys])
    assert [k for k, _ in engine.iterate()] == keys
    assert [k for k, _ in engine.iterate(reverse=True)] == keys[::-1]
    seen = []
    for i, (k, _) in enumerate(engine.iterate()):
        seen.append(k)
        if i % 100 == 0:
            engine.write([(b"%05d" % (2000 + i), b"x"), (keys[-1 - i // 100], None)])
    assert seen == sorted(seen) and len(set(seen)) == len(seen)


def test_engine_write_order_and_snapshot(engine):
    engine.write([(b"a", b"1"), (b"a", None), (b"b", b"1"), (b"b", b"2")])
    assert engine.get(b"a") is None and engine.get(b"b") == b"2"
    with engine.snapshot() as snap:
        engine.write([(b"b", b"3"), (b"c", b"1")])
        assert snap.get(b"b") == b"2" and list(snap.iterate()) == [(b"b", b"2")]
    with pytest.raises(StorageClosed):
        snap.get(b"b")
    engine.close()
    engine.close()
    for call in (
        lambda: engine.get(b"a"),
        lambda: engine.iterate(),
        lambda: engine.write([(b"a", b"1")]),
        engine.snapshot,
    ):
        with pytest.raises(StorageClosed):
            call()


# --- point operations --------------------------------------------------------


def test_put_get_exists_delete(store):
    assert not store.exists(b"k")
    store.put(b"k", b"v")
    assert store.get(b"k") == b"v" and store.exists(b"k")
    store.put(b"k", b"")
    assert store.get(b"k") == b"" and store.exists(b"k")
    store.delete(b"k")
    store.delete(b"k")
    assert not store.exists(b"k")


def test_empty_key_and_missing(store):
    for call in (
        lambda: store.get(b""),
        lambda: store.exists(b""),
        lambda: store.put(b"", b"v"),
        lambda: store.delete(b""),
        lambda: store.batch().put(b"", b"v"),
        lambda: store.batch().delete(b""),
    ):
        with pytest.raises(KeyIsEmpty):
            call()
    with pytest.raises(KeyNotFound):
        store.get(b"nope")
    assert store.get(b"nope", None) is None
    assert store.get(b"nope", b"d") == b"d"


def test_batch_applies_atomically_in_order(store, counting):
    store.put(b"b", b"old")
    with store.batch() as b:
        b.put(b"a", b"1").delete(b"a").delete(b"b").put(b"b", b"new").put(b"c", b"1")
    assert not store.exists(b"a") and store.get(b"b") == b"new" and store.get(b"c") == b"1"
    assert len(counting.writes) == 3  # the format mark at open, the put, the batch
    with pytest.raises(RuntimeError):
        with store.batch() as b:
            b.put(b"d", b"1")
            raise RuntimeError
    assert not store.exists(b"d")
    b = store.batch().put(b"e", b"1")
    b.commit(sync=True)
    assert store.get(b"e") == b"1"


# --- apply / applied_lsn -----------------------------------------------------


def test_apply_and_replay(store, counting):
    assert store.applied_lsn == 0 and store.applied_epoch == 0
    assert store.apply(recs(1, 3)) == 3
    assert store.get(b"k2") == b"v2"
    writes = len(counting.writes)
    assert store.apply(recs(1, 3)) == 3  # pure replay writes nothing
    assert len(counting.writes) == writes
    more = recs(1, 5, epoch=2) + [Record(2, 6, Op.DELETE, b"k1")]
    assert store.apply(more) == 6
    assert store.applied_lsn == 6 and store.applied_epoch == 2
    assert not store.exists(b"k1") and store.get(b"k5") == b"v5"
    # data and metadata went in one engine write
    last = counting.writes[-1]
    assert len(counting.writes) == writes + 1
    assert {k for k, _ in last} >= {META_PREFIX + b"applied_lsn", META_PREFIX + b"applied_epoch"}
    assert len(last) == 3 + 3  # data, applied lsn, epoch, revision
    # a fresh Store over the same engine reads the persisted metadata
    again = Store(counting)
    assert (again.applied_lsn, again.applied_epoch) == (6, 2)
    assert store.checkpoint() == 6


def test_apply_rejects_gaps(store, counting):
    store.apply(recs(1, 2))
    before = store.digest()
    for bad in (recs(4, 5), recs(3, 3) + recs(5, 5), recs(1, 1) + recs(4, 4)):
        with pytest.raises(ValueError):
            store.apply(bad)
        assert store.applied_lsn == 2 and store.digest() == before
        assert Store(counting).applied_lsn == 2
    assert store.apply([]) == 2


def test_applied_lsn_survives_reopen(tmp_path):
    path = str(tmp_path / "db")
    s = Store.open("leveldb", path)
    s.apply(recs(1, 4, epoch=3))
    assert s.checkpoint() == 4
    s.close()
    s = Store.open("leveldb", path)
    try:
        assert (s.applied_lsn, s.applied_epoch) == (4, 3)
        assert s.get(b"k4") == b"v4"
        assert s.apply(recs(1, 5, epoch=3)) == 5
    finally:
        s.close()


def test_open_kinds(tmp_path):
    with pytest.raises(InvalidArgument):
        Store.open("rocksdb", str(tmp_path))
    with pytest.raises(InvalidArgument):
        Store.open("leveldb", None)
    with Store.open("memory", None) as s:
        s.put(b"a", b"b")
        assert s.get(b"a") == b"b"


def test_leveldb_second_open_is_refused(tmp_path):
    path = str(tmp_path / "db")
    s = Store.open("leveldb", path)
    try:
        with pytest.raises(DKVError, match="in use"):
            Store.open("leveldb", path)
    finally:
        s.close()
    Store.open("leveldb", path).close()


# --- scans -------------------------------------------------------------------


def test_scan_order_and_filters(store):
    model = fill(store, 2000)
    assert len({slot_of(k) for k in model}) > 500
    ordered = sorted(model.items())
    assert list(store.scan()) == ordered
    assert list(store.ascend()) == ordered
    assert list(store.scan(reverse=True)) == ordered[::-1]
    assert list(store.descend()) == ordered[::-1]
    keys = [k for k, _ in ordered]
    starts = [None, b"", b"a", b"item:", keys[100], keys[100] + b"\x00", b"\xff", b"\xff\xff\xff\xff"]
    for prefix in (b"", b"a", b"item:", b"user:", b"\xff", b"zzz"):
        for start in starts:
            for reverse in (False, True):
                want = [
                    kv
                    for kv in (ordered[::-1] if reverse else ordered)
                    if kv[0].startswith(prefix) and (start is None or (kv[0] <= start if reverse else kv[0] >= start))
                ]
                got = list(store.scan(prefix, start, reverse=reverse))
                assert got == want, (prefix, start, reverse)
                assert list(store.scan(prefix, start, limit=7, reverse=reverse)) == want[:7]
    assert list(store.scan(limit=0)) == []
    with pytest.raises(InvalidArgument):
        store.scan(limit=-1)


def test_scan_is_lazy(store, counting):
    fill(store, 5000)
    counting.reads = 0
    assert len(list(store.scan(limit=10))) == 10
    assert counting.reads <= NUM_SLOTS + 10  # one primed entry per slot, then one per result
    counting.reads = 0
    assert len(list(store.scan(limit=10, slots=[SlotRange(0, 3)], reverse=True))) == 10
    assert counting.reads <= 4 + 10


def test_scan_restricted_to_slot_ranges(store):
    model = fill(store, 2000)
    ranges = [SlotRange(0, 99), SlotRange(500, 511)]
    want = sorted(kv for kv in model.items() if any(slot_of(kv[0]) in r for r in ranges))
    assert want and list(store.scan(slots=ranges)) == want
    assert list(store.scan(slots=ranges[0])) == [kv for kv in want if slot_of(kv[0]) in ranges[0]]


def test_iter_slots_and_count_slot(store):
    model = fill(store, 2000)
    r = SlotRange(100, 300)
    want = sorted((kv for kv in model.items() if slot_of(kv[0]) in r), key=lambda kv: (slot_of(kv[0]), kv[0]))
    assert [(k, entry.decode(v).value) for k, v in store.iter_slots(r)] == want
    assert len(list(store.iter_slots(ALL_SLOTS))) == len(model)
    for slot in (0, 100, 1023):
        assert store.count_slot(slot) == sum(1 for k in model if slot_of(k) == slot)
    assert sum(store.count_slot(s) for s in range(NUM_SLOTS)) == len(model)


def test_meta_keys_never_appear_in_scans(store, counting):
    store.apply(recs(1, 3))
    store.put(b"\xff\xffmeta:applied_lsn", b"user data")  # a user key, stored in its own slot
    assert store.applied_lsn == 3 and Store(counting).applied_lsn == 3
    data = {b"k1", b"k2", b"k3", b"\xff\xffmeta:applied_lsn"}
    assert {k for k, _ in store.scan()} == data
    assert {k for k, _ in store.scan(reverse=True)} == data
    assert {k for k, _ in store.iter_slots(ALL_SLOTS)} == data
    assert {k for k, _ in store.iter_slots(SlotRange(1023, 1023))} <= data
    assert [k for k, _ in store.scan(b"\xff")] == [b"\xff\xffmeta:applied_lsn"]


# --- digest / snapshots / close ----------------------------------------------


def test_digest_compares_replicas(tmp_path):
    a, b = Store.open("leveldb", str(tmp_path / "a")), Store.open("memory", None)
    try:
        assert a.digest() == b.digest()
        fill(a, 500)
        fill(b, 500)
        assert a.digest() == b.digest()
        assert a.digest(SlotRange(0, 511)) == b.digest(SlotRange(0, 511)) != a.digest()
        b.put(b"extra", b"1")
        assert a.digest() != b.digest()
        assert a.digest(SlotRange(slot_of(b"extra"), slot_of(b"extra"))) != b.digest(
            SlotRange(slot_of(b"extra"), slot_of(b"extra"))
        )
        a.put(b"extra", b"2")
        assert a.digest() != b.digest()
        a.put(b"extra", b"1")
        assert a.digest() == b.digest()
        # length prefixes: moving a byte from key to value changes the digest
        a.put(b"ab", b"c")
        b.put(b"a", b"bc")
        assert a.digest() != b.digest()
    finally:
        a.close()
        b.close()


def test_snapshot_isolation(store):
    model = fill(store, 300)
    store.apply(recs(1, 2))
    model.update({b"k1": b"v1", b"k2": b"v2"})
    digest = store.digest()
    some = next(iter(model))
    with store.snapshot() as snap:
        store.put(b"new", b"1")
        store.delete(some)
        store.apply(recs(3, 3))
        assert snap.applied_lsn == 2 and store.applied_lsn == 3
        assert snap.get(some) == model[some] and not snap.exists(b"new")
        assert snap.get(b"new", None) is None
        assert list(snap.scan()) == sorted(model.items())
        assert len(list(snap.iter_slots(ALL_SLOTS))) == len(model)
        assert snap.digest() == digest != store.digest()
    with pytest.raises(StorageClosed):
        snap.get(some)


def test_closed_store_raises(store):
    store.put(b"a", b"1")
    it = store.scan()
    store.close()
    store.close()
    for call in (
        lambda: store.get(b"a"),
        lambda: store.exists(b"a"),
        lambda: store.put(b"a", b"1"),
        lambda: store.delete(b"a"),
        lambda: store.batch().put(b"a", b"1").commit(),
        lambda: store.apply(recs(1, 1)),
        store.checkpoint,
        store.snapshot,
        lambda: list(store.scan()),
        lambda: list(it),
        lambda: store.digest(),
    ):
        with pytest.raises(StorageClosed):
            call()


# --- entries: revisions, deadlines, the expiry index --------------------------------------------


class Clock:
    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def test_entries_round_trip_and_garbage_is_refused() -> None:
    for value, rev, exp in ((b"", 0, 0), (b"v" * 100, 2**63, 0), (b"x", 5, 1_700_000_000_000)):
        e = entry.decode(entry.encode(value, rev, exp))
        assert (e.value, e.rev, e.expires_at) == (value, rev, exp)
    for bad in (b"", b"\x00" * 8, b"\x01" + b"\x00" * 12, b"\x80" + b"\x00" * 8):
        with pytest.raises(ValueError):
            entry.decode(bad)


def test_reads_hide_an_expired_entry_at_once_and_apply_removes_it_with_its_index_row(engine) -> None:
    clock = Clock(1_000_000)
    store = Store(engine, clock)
    store.apply([Record(1, 1, Op.PUT, b"t", b"v", 10, 1_000_500), Record(1, 2, Op.PUT, b"p", b"w", 11, 0)])
    assert store.get(b"t") == b"v" and store.entry(b"t") == entry.Entry(b"v", 10, 1_000_500)
    assert store.applied_rev == 11 and store.due(clock.now, 10) == []
    clock.now = 1_000_500  # the deadline: gone for every read, still stored until its EXPIRE record
    assert store.get(b"t", None) is None and not store.exists(b"t") and store.entry(b"t") is None
    assert dict(store.scan()) == {b"p": b"w"} and store.raw_entry(b"t") is not None
    [(deadline, skey)] = store.due(clock.now, 10)
    assert deadline == 1_000_500 and skey.endswith(b"t")
    store.apply([Record(1, 3, Op.EXPIRE, b"t", b"", 12, 1_000_500)])
    assert store.raw_entry(b"t") is None and store.due(clock.now, 10) == []


def test_stale_index_rows_are_dropped_locally(engine) -> None:
    store = Store(engine, Clock(5_000))
    store.apply([Record(1, 1, Op.PUT, b"k", b"v", 1, 4_000)])
    store.apply([Record(1, 2, Op.PUT, b"k", b"v2", 2, 0)])  # overwritten without a deadline: the row is stale
    rows = store.due(5_000, 10)
    assert len(rows) == 1 and store.get(b"k") == b"v2"
    store.drop_due(rows)
    assert store.due(5_000, 10) == []


def test_install_writes_entries_with_their_index_rows_and_refuses_garbage(engine) -> None:
    store = Store(engine, Clock(0))
    store.install([(b"a", entry.encode(b"1", 3, 77)), (b"b", entry.encode(b"2", 4))])
    assert store.entry(b"a") == entry.Entry(b"1", 3, 77) and len(store.due(100, 10)) == 1
    with pytest.raises(InvalidArgument):
        store.install([(b"c", b"\x09")])
    assert store.raw_entry(b"c") is None
    assert store.clear() == 2 and store.due(100, 10) == []


def test_a_store_written_before_entries_is_refused_not_misread(tmp_path) -> None:
    engine = make_engine("leveldb", str(tmp_path / "db"))
    engine.write([(storage_key(b"k"), b"raw old value")])
    with pytest.raises(CorruptLog, match="before revisions and TTL"):
        Store(engine)
    engine.close()
