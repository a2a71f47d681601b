"""The write pipeline: group commit over a real WAL and LevelDB store, in-process under gevent."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator, Sequence

import gevent
import gevent.event
import pytest

from dkv.errors import InvalidArgument, Unavailable, WriteTimeout
from dkv.node.pipeline import CHECKPOINT_BYTES, LocalWriter, WritePipeline
from dkv.node.sequencer import Kind, Write
from dkv.node.sequencer import delete as del_w
from dkv.node.sequencer import put as put_w
from dkv.storage import Store
from dkv.storage.leveldb import LevelDBEngine
from dkv.storage.store import META_PREFIX
from dkv.wal.codec import encode
from dkv.wal.log import WriteAheadLog
from dkv.wal.memory import MemoryLog
from dkv.wal.record import Op, Record

APPLIED_LSN_KEY = META_PREFIX + b"applied_lsn"


@pytest.fixture
def durable(tmp_path: Path) -> Iterator[tuple[WriteAheadLog, Store]]:
    log = WriteAheadLog(tmp_path / "wal", segment_bytes=64 * 1024)
    store = Store.open("leveldb", str(tmp_path / "db"))
    yield log, store
    log.close()
    store.close()


def test_concurrent_writes_share_fsyncs(durable: tuple[WriteAheadLog, Store]) -> None:
    log, store = durable
    pipe = WritePipeline(log, store, LocalWriter(log, store, 3))
    jobs = [gevent.spawn(pipe.submit, [put_w(f"k{i}".encode(), b"v")]) for i in range(500)]
    gevent.joinall(jobs, raise_error=True)
    assert store.applied_lsn == log.last_lsn == 500
    assert log.stats["fsyncs"] == pipe.batches
    assert pipe.batches < 50, f"500 concurrent writes took {pipe.batches} fsyncs"
    assert {r.epoch for r in log.read_from(1)} == {3}
    pipe.close()


def test_acknowledged_means_durable_and_applied(durable: tuple[WriteAheadLog, Store]) -> None:
    log, store = durable
    pipe = WritePipeline(log, store, LocalWriter(log, store, 1))
    a, b = pipe.submit([put_w(b"a", b"1"), put_w(b"b", b"2")])
    assert 0 < a < b  # revisions
    # the moment submit returns, the record is in the log and in storage
    assert [r.key for r in log.read_from(1)] == [b"a", b"b"]
    assert store.get(b"a") == b"1"
    pipe.close()


def test_delete_reports_existence_within_and_across_batches(durable: tuple[WriteAheadLog, Store]) -> None:
    log, store = durable
    pipe = WritePipeline(log, store, LocalWriter(log, store, 1))
    pipe.submit([put_w(b"x", b"1")])
    first, second, rev, third = pipe.submit([del_w(b"x"), del_w(b"x"), put_w(b"y", b"1"), del_w(b"y")])
    assert (first, second, third) == (True, False, True) and isinstance(rev, int)
    assert not store.exists(b"x") and not store.exists(b"y")
    pipe.close()


def test_batches_respect_the_record_cap(durable: tuple[WriteAheadLog, Store]) -> None:
    log, store = durable
    pipe = WritePipeline(log, store, LocalWriter(log, store, 1), max_batch_records=10)
    jobs = [gevent.spawn(pipe.submit, [put_w(f"k{i}".encode(), b"v")] * 4) for i in range(20)]
    gevent.joinall(jobs, raise_error=True)
    assert store.applied_lsn == 80
    assert pipe.batches >= 8  # at most two 4-record requests fit under the cap of 10
    pipe.close()


def test_a_failed_log_fails_writes_honestly_and_refuses_more(durable: tuple[WriteAheadLog, Store]) -> None:
    log, store = durable
    pipe = WritePipeline(log, store, LocalWriter(log, store, 1))
    pipe.submit([put_w(b"before", b"1")])
    log.close()  # every later append fails, as on a dead disk
    with pytest.raises(WriteTimeout):  # it may have reached the disk: indeterminate
        pipe.submit([put_w(b"k", b"v")])
    with pytest.raises(Unavailable):  # refused up front: definite
        pipe.submit([put_w(b"k2", b"v")])
    assert store.get(b"k", None) is None and store.applied_lsn == 1
    pipe.close()


def test_checkpoint_compacts_old_segments(durable: tuple[WriteAheadLog, Store]) -> None:
    log, store = durable
    pipe = WritePipeline(log, store, LocalWriter(log, store, 1))
    for i in range(200):
        pipe.submit([put_w(f"k{i}".encode(), b"x" * 1000)])
    assert log.stats["segments"] <= 2, "segments below the checkpoint must be deleted"
    assert log.first_lsn > 1
    assert store.get(b"k0") == b"x" * 1000
    pipe.close()


def test_close_finishes_queued_writes_then_refuses(durable: tuple[WriteAheadLog, Store]) -> None:
    log, store = durable
    pipe = WritePipeline(log, store, LocalWriter(log, store, 1))
    jobs = [gevent.spawn(pipe.submit, [put_w(f"k{i}".encode(), b"v")]) for i in range(50)]
    gevent.sleep(0)  # let them queue
    pipe.close()
    assert all(j.successful() for j in jobs)
    assert store.applied_lsn == 50
    with pytest.raises(Unavailable):
        pipe.submit([put_w(b"late", b"v")])


def test_diskless_pipeline_runs_on_the_hub() -> None:
    store = Store.open("memory", None)
    pipe = WritePipeline(log := MemoryLog(), store, LocalWriter(log, store, 1, offload=False), offload=False)
    gevent.joinall([gevent.spawn(pipe.submit, [put_w(f"k{i}".encode(), b"v")]) for i in range(100)], raise_error=True)
    assert store.applied_lsn == 100 and store.get(b"k99") == b"v"
    pipe.close()


class SyncedLevelDB(LevelDBEngine):
    """The real LevelDB engine, noting the applied LSN that each synced write makes durable."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.durable_lsns: list[int] = []

    def _write(self, ops: Sequence[tuple[bytes, bytes | None]], sync: bool) -> None:
        super()._write(ops, sync)
        if sync:
            self.durable_lsns += [int.from_bytes(v, "big") for k, v in ops if k == APPLIED_LSN_KEY and v]


def test_storage_checkpoints_every_few_mib_without_a_wal_rollover(tmp_path: Path) -> None:
    """The WAL must not be the only durable copy of a whole segment: storage syncs its applied LSN
    every CHECKPOINT_BYTES of records, long before the (64 MiB) segment rolls over."""
    log = WriteAheadLog(tmp_path / "wal")
    engine = SyncedLevelDB(str(tmp_path / "db"))
    store = Store(engine)
    pipe = WritePipeline(log, store, LocalWriter(log, store, 1))
    value = b"x" * 4096
    framed, crossed_at, lsn = 0, 0, 0
    while framed <= CHECKPOINT_BYTES + 2 * 1024 * 1024:
        ops = [put_w(f"k{lsn + i}".encode(), value) for i in range(256)]
        pipe.submit(ops)
        lsn += len(ops)
        framed += sum(len(encode(Record(1, 1, Op.PUT, w.key, w.value))) for w in ops)
        if not crossed_at and framed >= CHECKPOINT_BYTES:
            crossed_at = lsn
    assert log.segment_count == 1, "no rollover: this is the periodic checkpoint"
    assert engine.durable_lsns and max(engine.durable_lsns) >= crossed_at, engine.durable_lsns
    assert pipe.checkpoints >= 1
    pipe.close()
    log.close()
    store.close()


def test_an_idle_pipeline_checkpoints_what_it_committed_then_stays_quiet(tmp_path: Path) -> None:
    log = WriteAheadLog(tmp_path / "wal")
    engine = SyncedLevelDB(str(tmp_path / "db"))
    store = Store(engine)
    pipe = WritePipeline(log, store, LocalWriter(log, store, 1), checkpoint_seconds=0.2)
    pipe.submit([put_w(b"a", b"1"), put_w(b"b", b"2")])
    deadline = time.monotonic() + 10
    while 2 not in engine.durable_lsns:  # the pipeline's own timer, with no further write
        assert time.monotonic() < deadline, "no checkpoint of an idle pipeline's commits"
        gevent.sleep(0.02)
    pipe.barrier()  # no new records: nothing to checkpoint
    assert pipe._checkpoint_due_in() is None and engine.durable_lsns == [2]
    pipe.close()
    log.close()
    store.close()


class _HeldWriter:
    """A batch writer whose batches the test settles by hand (as a replicated writer's)."""

    def __init__(self, log: MemoryLog, store: Store) -> None:
        self.log, self.store = log, store
        self.handles: list[tuple[list[Record], gevent.event.AsyncResult]] = []

    @property
    def epoch(self) -> int:
        return 1

    def check(self) -> None:
        pass

    def write(self, records: list[Record]) -> gevent.event.AsyncResult:
        done = gevent.event.AsyncResult()
        self.log.append(records)
        self.handles.append((records, done))
        return done

    def settle(self, i: int, error: Exception | None = None, apply: bool = True) -> None:
        records, done = self.handles[i]
        if error is None:
            if apply:
                self.store.apply(records)
            done.set(None)
        else:
            done.set_exception(error)


def _settle_soon() -> None:
    for _ in range(5):
        gevent.sleep(0)


def test_batches_are_pipelined_answered_in_order_and_deletes_see_the_batches_in_flight() -> None:
    log, store = MemoryLog(), Store.open("memory")
    w = _HeldWriter(log, store)
    pipe = WritePipeline(log, store, w, offload=False, window=3)  # type: ignore[arg-type]
    put = gevent.spawn(pipe.submit, [put_w(b"x", b"1")])
    _settle_soon()
    delete = gevent.spawn(pipe.submit, [del_w(b"x"), del_w(b"y")])
    _settle_soon()
    again = gevent.spawn(pipe.submit, [del_w(b"x"), put_w(b"w", b"1")])  # x: gone in flight, no record
    _settle_soon()
    late = gevent.spawn(pipe.submit, [put_w(b"z", b"1")])
    _settle_soon()
    # three batches in flight (the window), none applied yet: the fourth waits for room
    assert len(w.handles) == 3 and store.applied_lsn == 0
    w.settle(1, apply=False)  # the second settles first: answered only after the first
    _settle_soon()
    assert not put.ready() and not delete.ready()
    w.settle(0)
    store.apply(w.handles[1][0])
    _settle_soon()
    assert isinstance(put.value[0], int) and delete.value == [True, False]  # x existed in the batch in flight
    assert len(w.handles) == 4
    w.settle(2), w.settle(3)
    _settle_soon()
    assert again.value[0] is False and isinstance(late.value[0], int)
    assert [r.key for r in w.handles[2][0]] == [b"w"]
    pipe.close()


def test_a_failed_batch_fails_the_later_ones_and_the_next_starts_from_the_log() -> None:
    log, store = MemoryLog(), Store.open("memory")
    w = _HeldWriter(log, store)
    pipe = WritePipeline(log, store, w, offload=False)  # type: ignore[arg-type]
    jobs = []
    for i in range(3):
        jobs.append(gevent.spawn(pipe.submit, [put_w(b"k%d" % i, b"v")]))
        _settle_soon()
    w.settle(0)
    log.truncate_after(1)  # the writer rolled back batches 2 and 3
    w.settle(1, WriteTimeout("rolled back"))
    w.settle(2, WriteTimeout("rolled back"))
    _settle_soon()
    assert isinstance(jobs[0].value[0], int)
    assert all(isinstance(j.exception, WriteTimeout) for j in jobs[1:])
    nxt = gevent.spawn(pipe.submit, [del_w(b"k2"), put_w(b"k3", b"v")])
    _settle_soon()
    records, _ = w.handles[3]
    assert [(r.lsn, r.key) for r in records] == [(2, b"k3")]  # from the log's end, not after the failed batches
    w.settle(3)
    _settle_soon()
    assert nxt.value[0] is False  # k2 was never applied: nothing to delete
    pipe.close()


def test_submit_all_raises_the_error_of_a_write_refused_alone() -> None:
    log, store = MemoryLog(), Store.open("memory")
    pipe = WritePipeline(log, store, LocalWriter(log, store, 1, offload=False), offload=False)
    pipe.submit_all([put_w(b"text", b"abc")])
    with pytest.raises(InvalidArgument, match="not an integer"):
        pipe.submit_all([put_w(b"ok", b"1"), Write(Kind.INCR, b"text", amount=1)])
    assert store.get(b"ok") == b"1"  # the rest of the batch applied: the caller retries idempotent writes
    pipe.close()
