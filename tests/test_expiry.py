"""The expirer (dkv.node.expiry) over a diskless node's real parts (memory log, memory engine,
write pipeline), with a clock the test moves: expired entries leave through EXPIRE records,
stale index rows are dropped, and a node that may not write a key leaves it alone."""

from __future__ import annotations

from typing import Any, Iterator

import pytest

from dkv.node import expiry
from dkv.node.expiry import Expirer
from dkv.node.pipeline import LocalWriter, WritePipeline
from dkv.node.sequencer import Kind, Write
from dkv.storage import Store
from dkv.storage.engine import Engine
from dkv.storage.memory import MemoryEngine
from dkv.wal.memory import MemoryLog
from dkv.wal.record import Op

T0 = 1_700_000_000_000


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def node() -> Iterator[tuple[Store, MemoryLog, WritePipeline, Clock]]:
    clock = Clock()
    engine: Engine = MemoryEngine()
    log, store = MemoryLog(), Store(engine, clock)
    pipe = WritePipeline(log, store, LocalWriter(log, store, 1, offload=False), offload=False, clock=clock)
    yield store, log, pipe, clock
    pipe.close()


def test_due_entries_leave_through_expire_records_and_stale_rows_are_dropped(node: Any) -> None:
    store, log, pipe, clock = node
    pipe.submit(
        [
            Write(Kind.SET, b"a", b"1", px=100),
            Write(Kind.SET, b"b", b"2", px=100),
            Write(Kind.SET, b"c", b"3", px=5_000),
        ]
    )
    pipe.submit([Write(Kind.SET, b"b", b"again")])  # b's row is stale now: the entry has no deadline
    exp = Expirer(store, pipe, lambda key: True, offload=False, clock=clock)
    assert exp.sweep() == exp.interval and log.last_lsn == 4  # nothing due yet
    clock.now = T0 + 100
    exp.sweep()
    expires = [r for r in log.read_from(1) if r.op == Op.EXPIRE]
    assert [(r.key, r.expires_at) for r in expires] == [(b"a", T0 + 100)]
    assert store.raw_entry(b"a") is None and store.get(b"b") == b"again" and store.get(b"c") == b"3"
    assert (exp.expired, exp.dropped) == (1, 1) and store.due(clock.now, 10) == []


def test_a_node_that_may_not_write_the_key_leaves_it_to_the_writer(node: Any) -> None:
    store, log, pipe, clock = node
    pipe.submit([Write(Kind.SET, b"k", b"v", px=10)])
    clock.now = T0 + 10
    exp = Expirer(store, pipe, lambda key: False, offload=False, clock=clock)
    assert exp.sweep() == expiry.IDLE_INTERVAL  # nothing it can do: it sweeps slowly
    assert log.last_lsn == 1 and store.raw_entry(b"k") is not None and store.get(b"k", None) is None
    assert len(store.due(clock.now, 10)) == 1  # the row stays for the record that will remove it


def test_a_full_sweep_asks_for_the_next_one_at_once(node: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    store, log, pipe, clock = node
    monkeypatch.setattr(expiry, "SWEEP_ROWS", 3)
    pipe.submit([Write(Kind.SET, b"k%d" % i, b"v", px=10) for i in range(5)])
    clock.now = T0 + 10
    exp = Expirer(store, pipe, lambda key: True, offload=False, clock=clock)
    assert exp.sweep() == 0.0 and exp.expired == 3
    assert exp.sweep() == exp.interval and exp.expired == 5
    assert [r.op for r in log.read_from(1)] == [Op.PUT] * 5 + [Op.EXPIRE] * 5
