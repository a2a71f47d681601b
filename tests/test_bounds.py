"""Message budgets (DESIGN §10, G7), unit level: every producer of a batch or page stays within
``Limits.page_bytes`` (plus one item), so every message stays below ``max_message_bytes``.

In-process, under gevent, over the memory engine and log: the producers (group commit,
catch-up, snapshot chunks, migration pages, scan pages, batch replies, client requests and
coalescing) are driven with values of the maximum size, and each message they build is
msgpack-encoded as zerorpc would send it and measured. Real node processes are in
tests/test_node.py and tests/test_cluster.py.
"""

from __future__ import annotations

from typing import Any

import gevent
import gevent.event
import msgpack
import pytest

from dkv import protocol
from dkv.client.connection import MAX_BATCH_BYTES, MAX_BATCH_OPS, Connection
from dkv.client.core import CHUNK, _chunks, iter_scan
from dkv.cluster.follower import FollowerDriver, PromiseFile
from dkv.cluster.leader import ReplicatedWriter
from dkv.cluster.migrator import MigrationSource, delete_range
from dkv.cluster.replication import IN_SYNC, Prepare, Reply, record_bytes
from dkv.errors import Deferred, InvalidArgument
from dkv.keys import (
    DEFAULT_PAGE_BYTES,
    ITEM_OVERHEAD,
    MESSAGE_OVERHEAD,
    Limits,
    item_bytes,
    page_is_full,
    pair_bytes,
    quote,
    take_page,
)
from dkv.node.config import NodeConfig
from dkv.node.pipeline import LocalWriter, WritePipeline
from dkv.node.sequencer import put as put_w
from dkv.node.server import RPC
from dkv.node.service import NodeService
from dkv.slots import SlotRange
from dkv.storage import Store
from dkv.wal.memory import MemoryLog
from dkv.wal.record import Op, Record

LIMITS = Limits()
BUDGET = LIMITS.page_bytes
MAX_MESSAGE = LIMITS.max_message_bytes
BIG = b"v" * LIMITS.max_value_bytes  # a value of the largest legal size
N_BIG = 40


def wire_size(*message: Any) -> int:
    """Bytes of ``message`` as msgpack encodes it on the wire (zerorpc's encoding)."""
    return len(msgpack.packb(list(message), use_bin_type=True))


def big_records(n: int = N_BIG, first_lsn: int = 1, epoch: int = 1) -> list[Record]:
    return [Record(epoch, first_lsn + i, Op.PUT, f"big{i:03d}".encode(), BIG) for i in range(n)]


# -- the constants and helpers ------------------------------------------------------------


def test_the_largest_message_is_a_full_page_plus_one_item_plus_the_overhead() -> None:
    assert BUDGET == DEFAULT_PAGE_BYTES == 8 * 1024 * 1024
    assert MAX_MESSAGE == BUDGET + LIMITS.max_key_bytes + LIMITS.max_value_bytes + ITEM_OVERHEAD + MESSAGE_OVERHEAD
    bigger = Limits(max_value_bytes=4 * 1024 * 1024)
    assert bigger.max_message_bytes - MAX_MESSAGE == 3 * 1024 * 1024


def test_take_page_stops_at_the_budget_but_always_takes_one() -> None:
    items = iter([5, 5, 5, 5, 5])
    assert take_page(items, 10, int) == [5, 5]
    assert take_page(items, 7, int) == [5, 5]  # soft: the item that reaches the budget is in
    assert take_page(items, 0, int) == [5]  # at least one
    assert take_page(items, 10, int) == []  # the iterator was consumed only as far as taken
    assert take_page(range(10), 10**9, int, limit=3) == [0, 1, 2]
    assert take_page([100], 1, int) == [100]
    assert page_is_full([5, 5], 10, int) and not page_is_full([5], 10, int)
    assert page_is_full([1, 1, 1], 10**9, int, limit=3)


def test_quote_keeps_about_200_bytes_of_any_input() -> None:
    huge = b"x" * 5_000_000
    q = quote(huge)
    assert len(q) < 300 and "5000000 bytes" in q
    assert len(quote("é" * 10**6)) < 300
    assert len(quote(["set", huge, [list(range(10**5))]])) < 300
    nested: list[Any] = []
    for _ in range(10_000):
        nested = [nested]
    assert len(quote(nested)) < 300
    assert quote(b"key") == "b'key'" and quote(7) == "7"

    class Hostile:
        def __repr__(self) -> str:
            raise RuntimeError("no")

    assert quote(Hostile()) == "<Hostile>"


# -- group commit ---------------------------------------------------------------------------


class _RecordingWriter(LocalWriter):
    def __init__(self, log: MemoryLog, store: Store) -> None:
        super().__init__(log, store, 1, offload=False)
        self.batches: list[list[Record]] = []

    def write(self, records: list[Record]) -> gevent.event.AsyncResult:
        self.batches.append(records)
        return super().write(records)


def test_group_commit_takes_submissions_up_to_the_page_budget() -> None:
    log, store = MemoryLog(), Store.open("memory")
    writer = _RecordingWriter(log, store)
    pipe = WritePipeline(log, store, writer, offload=False)
    big_alone = [put_w(f"alone{i}".encode(), BIG) for i in range(12)]  # one submission over the budget
    jobs = [gevent.spawn(pipe.submit, [put_w(f"k{i}".encode(), BIG)]) for i in range(N_BIG)]
    jobs.append(gevent.spawn(pipe.submit, big_alone))
    jobs += [gevent.spawn(pipe.submit, [put_w(f"small{i}".encode(), b"s")]) for i in range(100)]
    gevent.joinall(jobs, raise_error=True)
    pipe.close()
    assert store.applied_lsn == N_BIG + 12 + 100
    assert len(writer.batches) > N_BIG * len(BIG) // BUDGET
    for batch in writer.batches:
        size = sum(record_bytes(r) for r in batch)
        alone = {r.key for r in batch} == {w.key for w in big_alone}
        assert size <= BUDGET or alone, f"a batch of {len(batch)} records counts {size} bytes"
        # the replication prepare of that batch is a legal message
        prepare = Prepare(1, batch[0].lsn - 1, 1, tuple(batch), batch[0].lsn - 1)
        assert wire_size("repl_prepare", prepare.to_wire()) <= MAX_MESSAGE


# -- the writer's catch-up and snapshots -------------------------------------------------------


class _DirectWriter(ReplicatedWriter):
    """The replication driver with its RPCs measured, then delivered to in-process replicas."""

    replicas: dict[str, FollowerDriver]
    sizes: list[tuple[str, int]]

    def _deliver(self, rid: str, method: str, *args: Any) -> Any:
        self.sizes.append((method, wire_size(method, list(args))))
        f = self.replicas[rid]
        handler = {
            "repl_prepare": f.prepare,
            "repl_truncate": f.truncate,
            "repl_fence": f.fence,
            "repl_snapshot": f.snapshot_chunk,
        }[method]
        return handler(*args)

    def _call(self, rid: str, method: str, *args: Any) -> Reply:
        return Reply.from_wire(self._deliver(rid, method, *args))

    def _conn(self, rid: str) -> Any:
        writer = self

        class _Conn:
            def request(self, method: str, *args: Any) -> Any:
                return writer._deliver(rid, method, *args)

        return _Conn()


def _writer(log: MemoryLog, store: Store) -> _DirectWriter:
    config = NodeConfig(node_id="w", engine="memory", replication_factor=2, write_quorum=2, write_timeout=5.0)
    w = _DirectWriter(
        config, "shard-1", 2, log, store, addr_of=lambda rid: None, bump_epoch=lambda: 3, is_current=lambda: True
    )
    w.replicas = {"r": FollowerDriver(MemoryLog(), Store.open("memory"), PromiseFile(None), offload=False)}
    w.sizes = []
    w.leader.set_replicas(["r"])
    return w


@pytest.mark.parametrize("how", ["log", "snapshot"])
def test_catch_up_sends_page_bounded_messages(how: str) -> None:
    """A replica 40 MiB behind catches up from the log (prepares) or, when the log no longer
    holds its position, from a snapshot (chunks): every message is within the budget."""
    log, store = MemoryLog(), Store.open("memory")
    records = big_records(epoch=2)
    store.apply(records)
    if how == "log":
        log.append(records)
    else:  # the log holds only the last 5 records: the replica needs a snapshot
        log.reset_to(N_BIG - 5)
        log.append(records[-5:])
    w = _writer(log, store)
    try:
        w._catchup("r")
        assert w.leader.replicas["r"].state == IN_SYNC
    finally:
        w.stop()
    replica = w.replicas["r"].store
    assert replica.applied_lsn == N_BIG
    assert replica.digest() == store.digest()
    method = "repl_prepare" if how == "log" else "repl_snapshot"
    sent = [size for m, size in w.sizes if m == method]
    assert len(sent) >= N_BIG * len(BIG) // BUDGET, w.sizes
    assert max(size for _, size in w.sizes) <= MAX_MESSAGE


def test_a_restarted_writer_commits_a_large_log_tail_in_bounded_prepares() -> None:
    log, store = MemoryLog(), Store.open("memory")
    log.append(big_records(epoch=2))  # nothing committed yet: the whole log is the tail
    w = _writer(log, store)
    try:
        p = w.leader.replicas["r"]
        p.state, p.match_lsn = IN_SYNC, 0
        with gevent.Timeout(30, AssertionError("the tail was not committed")):
            while not w.ready:
                gevent.sleep(0.01)
    finally:
        w.stop()
    assert store.applied_lsn == N_BIG and w.replicas["r"].log.last_lsn == N_BIG
    prepares = [size for m, size in w.sizes if m == "repl_prepare"]
    assert len(prepares) >= N_BIG * len(BIG) // BUDGET
    assert max(prepares) <= MAX_MESSAGE


def test_repl_read_is_page_bounded() -> None:
    f = FollowerDriver(MemoryLog(), Store.open("memory"), PromiseFile(None), offload=False)
    f.log.append(big_records())
    got, start = [], 1
    while start <= N_BIG:
        chunk = f.read(start, 2000)
        assert wire_size(chunk) <= MAX_MESSAGE and sum(item_bytes(r[3], r[4]) for r in chunk) < BUDGET + 2 * 2**20
        got += chunk
        start = chunk[-1][1] + 1
    assert [r[1] for r in got] == list(range(1, N_BIG + 1))


# -- migration pages ---------------------------------------------------------------------------


def _source() -> tuple[MigrationSource, Store, MemoryLog, WritePipeline]:
    log, store = MemoryLog(), Store.open("memory")
    pipe = WritePipeline(log, store, LocalWriter(log, store, 1, offload=False), offload=False)
    for r in big_records():
        pipe.submit([put_w(r.key, r.value)])
    return MigrationSource(log, store, pipe, False, confirm_frozen=lambda mid: (None, 0)), store, log, pipe  # type: ignore[arg-type,return-value]


def test_migration_scan_and_tail_pages_are_page_bounded() -> None:
    src, store, log, pipe = _source()
    try:
        pairs: list[Any] = []
        after = None
        while True:
            page, after = src.scan(0, 1023, after, 2000)
            assert wire_size(page, after) <= MAX_MESSAGE
            assert sum(pair_bytes(p) for p in page) < BUDGET + LIMITS.max_item_bytes
            pairs += page
            if after is None:
                break
        assert sorted(k for k, _ in pairs) == sorted(r.key for r in big_records())
        scanned, n_records = 0, 0
        while scanned < N_BIG:
            t = src.tail(0, 1023, scanned, 2000)
            assert wire_size(t) <= MAX_MESSAGE and t["records"]
            scanned, n_records = t["scanned_to"], n_records + len(t["records"])
        assert n_records == N_BIG
        # the range delete (a migration's clear, the janitor) goes through the log in bounded batches
        after = None
        while (after := delete_range(pipe, store, SlotRange(0, 1023), False, after)) is not None:
            pass
        assert not list(store.scan())
        deletes = list(log.read_from(N_BIG + 1))
        assert len(deletes) == N_BIG
    finally:
        pipe.close()


# -- the node's service: batch requests and replies, scan pages, odd input --------------------


@pytest.fixture
def service() -> Any:
    config = NodeConfig(node_id="n", engine="memory")
    log, store = MemoryLog(), Store.open("memory")
    pipe = WritePipeline(log, store, LocalWriter(log, store, 1, offload=False), offload=False)
    yield NodeService(config, store, log, pipe)
    pipe.close()


def _load(svc: NodeService, n: int = N_BIG) -> list[bytes]:
    keys = [f"big{i:03d}".encode() for i in range(n)]
    for k in keys:
        [[ok, rev]] = svc.batch([["set", k, BIG]])
        assert ok == 0 and isinstance(rev, int)
    return keys


def test_a_batch_over_the_budget_is_refused_whole_and_changes_nothing(service: NodeService) -> None:
    ops = [["set", f"k{i}".encode(), BIG] for i in range(9)]
    assert sum(protocol.op_bytes(op) for op in ops) > BUDGET
    with pytest.raises(InvalidArgument, match="split it"):
        service.batch(ops)
    assert service.store.applied_lsn == 0
    assert [r[0] for r in service.batch(ops[:7])] == [0] * 7  # within the budget


def test_gets_past_the_reply_budget_are_deferred_not_read(service: NodeService) -> None:
    keys = _load(service)
    reply = service.batch([["get", k] for k in keys] + [["exists", keys[0]], ["get", b"missing"]])
    assert wire_size(reply) <= MAX_MESSAGE
    served = [i for i, r in enumerate(reply[:N_BIG]) if r[0] == protocol.OK]
    deferred = [i for i, r in enumerate(reply[:N_BIG]) if r[0] == protocol.ERR]
    assert served == list(range(len(served))) and 0 < len(served) <= BUDGET // len(BIG) + 1
    assert all(reply[i][1][0] == Deferred.code for i in deferred) and len(served) + len(deferred) == N_BIG
    assert reply[N_BIG] == [0, True]  # not a get: never deferred
    assert reply[N_BIG + 1][1][0] == Deferred.code
    # one get is always read, whatever its size
    assert service.batch([["get", keys[-1]]]) == [[0, BIG]]


def test_scan_pages_are_page_bounded(service: NodeService) -> None:
    keys = _load(service)
    got: list[bytes] = []
    start = None
    while True:
        page = service.scan(b"big", start, 1000)
        assert wire_size(page) <= MAX_MESSAGE
        got += [k for k, _ in page]
        if not page_is_full(page, BUDGET, pair_bytes, 1000):
            break
        start = page[-1][0] + b"\x00"
    assert got == keys


HUGE_LIST = list(range(100_000))
ODD_OPS: list[Any] = [
    123,
    None,
    "get",
    b"get",
    [],
    [None],
    [123, b"k"],
    [["get"], b"k"],
    ["get"],
    ["get", None],
    ["get", 5],
    ["get", [b"k"]],
    ["get", b"k", "strong"],
    ["get", b"k", ["sequential"]],
    ["get", b"k", "sequential", 1],
    ["set", b"k"],
    ["set", b"k", None],
    ["set", b"k", 1.5],
    ["set", b"", b"v"],
    ["del"],
    ["del", b"k", 5],
    ["set", b"k", b"v", -1],
    ["set", b"k", b"v", 0],
    ["set", b"k", b"v", 1.5],
    ["set", b"k", b"v", None, "zz"],
    ["set", b"k", b"v", None, "nx", 1],
    ["cas", b"k"],
    ["cas", b"k", 5, b"v"],
    ["incr", b"k", "1"],
    ["incr", b"k", 2**63],
    ["incr", b"k", 1],
    ["expire", b"k", 0],
    ["expire", b"k", None],
    ["persist"],
    ["ttl", b"k", "bogus"],
    ["getm", b"k", 1],
    ["exists", {}],
    ["nope", b"k"],
    ["x" * 5_000_000, b"k"],
    HUGE_LIST,
    ["get", HUGE_LIST],
    ["set", b"k" * 2000, b"v"],
    ["set", b"k", b"v" * (LIMITS.max_value_bytes + 1)],
    [[[[[]]]]],
]


@pytest.mark.parametrize("bad", ODD_OPS, ids=[quote(op, 30) for op in ODD_OPS])
def test_each_odd_op_fails_alone_and_changes_nothing(service: NodeService, bad: Any) -> None:
    service.batch([["set", b"k", b"old"]])
    lsn = service.store.applied_lsn
    reply = service.batch([["get", b"k"], bad, ["set", b"other", b"1"], ["get", b"k"]])
    assert reply[0] == [0, b"old"] and reply[2][0] == 0 and reply[3] == [0, b"old"]
    assert reply[1][0] == protocol.ERR
    code, message, _ = reply[1][1]
    assert code in (InvalidArgument.code, "KEY_EMPTY")
    assert len(message) < 400  # quotes at most ~200 bytes of the input
    assert service.store.applied_lsn == lsn + 1  # only the good write
    assert service.store.get(b"k") == b"old"


@pytest.mark.parametrize(
    "call",
    [
        lambda rpc: rpc.mget(123),
        lambda rpc: rpc.mget(None),
        lambda rpc: rpc.mget([1, 2]),
        lambda rpc: rpc.mset([1, 2]),
        lambda rpc: rpc.mset({1: 2}),
        lambda rpc: rpc.digest("a", "b"),
        lambda rpc: rpc.digest(0, 5000),
        lambda rpc: rpc.digest([], {}),
        lambda rpc: rpc.get(123),
        lambda rpc: rpc.get(b"k", "strong"),
        lambda rpc: rpc.set(b"k", 5),
        lambda rpc: rpc.set(None, b"v"),
        lambda rpc: rpc.delete([b"k"]),
        lambda rpc: rpc.scan(5),
        lambda rpc: rpc.scan(b"", 5),
        lambda rpc: rpc.scan(b"", None, "10"),
        lambda rpc: rpc.scan(b"", None, 10, "v"),
        lambda rpc: rpc.scan(b"", None, 10**9),
        lambda rpc: rpc.batch(b"ops"),
        lambda rpc: rpc.batch(None),
        lambda rpc: rpc.batch([["get", b"k"]] * 10_001),
        lambda rpc: rpc.repl_fence("x"),
        lambda rpc: rpc.repl_read("a", 1),
    ],
    ids=lambda f: "",
)
def test_rpc_methods_refuse_wrong_types_with_invalid_argument(service: NodeService, call: Any) -> None:
    rpc = RPC(service)
    with pytest.raises(InvalidArgument):
        call(rpc)
    assert service.store.applied_lsn == 0


def test_over_budget_mget_over_the_raw_rpc_raises_deferred(service: NodeService) -> None:
    keys = _load(service, 12)
    with pytest.raises(Deferred):
        RPC(service).mget(keys)
    assert RPC(service).mget(keys[:3]) == [BIG] * 3


# -- the client: requests split by bytes, coalescing, scan paging -------------------------------


def test_client_requests_are_split_by_op_count_and_bytes() -> None:
    ops = [["set", f"k{i}".encode(), BIG] for i in range(100)] + [["get", f"g{i}".encode()] for i in range(3000)]
    chunks = list(_chunks(ops, list(range(len(ops)))))
    assert [i for c in chunks for i in c] == list(range(len(ops)))
    for c in chunks:
        assert len(c) <= CHUNK and (len(c) == 1 or sum(protocol.op_bytes(ops[i]) for i in c) <= BUDGET)
    assert len(chunks) >= 100 * len(BIG) // BUDGET + 3


def test_coalescing_never_builds_a_request_a_node_refuses() -> None:
    """The connection coalesces concurrent calls up to MAX_BATCH_BYTES (by its own count):
    by the node's count that stays within the budget."""
    assert MAX_BATCH_BYTES + MAX_BATCH_OPS * (ITEM_OVERHEAD + len("linearizable") + len("exists")) <= BUDGET
    sent: list[list[list[Any]]] = []

    class _Recording(Connection):
        def _send(self, batch: list[tuple[list[list[Any]], gevent.event.AsyncResult]]) -> None:
            sent.append([op for ops, _ in batch for op in ops])
            for ops, done in batch:
                done.set([protocol.ok(None)] * len(ops))
            self._inflight -= 1
            self._kick()

    conn = _Recording("127.0.0.1:1", 1.0, max_inflight=1)
    calls = ([["set", f"k{i}".encode(), BIG]] for i in range(30))
    smalls = ([["get", f"s{i}".encode(), "linearizable"]] * 500 for i in range(20))
    jobs = [gevent.spawn(conn.call, ops) for pair in zip(calls, smalls) for ops in pair]
    gevent.joinall(jobs, raise_error=True)
    assert len(sent) > 1
    for request in sent:
        assert len(request) <= 10_000
        assert len(request) == 1 or sum(protocol.op_bytes(op) for op in request) <= BUDGET


def test_scan_paging_continues_after_a_short_but_full_page() -> None:
    data = [(f"k{i:02d}".encode(), b"v") for i in range(25)]

    def page(prefix: bytes, start: bytes | None, n: int) -> tuple[list[list[bytes]], bool]:
        rest = [list(kv) for kv in data if start is None or kv[0] >= start]
        out = rest[: min(n, 4)]  # pages shorter than asked, as byte-bounded pages are
        return out, len(rest) > len(out)

    assert list(iter_scan(page, b"", None, None, 10)) == data
    assert list(iter_scan(page, b"", None, 7, 10)) == data[:7]
