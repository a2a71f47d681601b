"""Watches (issue 11): the pure core, one stream in-process, and real processes (standalone, failover, migration).

The integration tests assert against the writes the client got acknowledged: each
one appears exactly once, with its value and revision, in revision order; a write
that timed out (indeterminate) may appear, at most once; nothing else appears.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import gevent
import pytest
import zerorpc

import dkv
from dkv.client import Event, Watch
from dkv.client.watch import Cursors, Handoff, _Revision
from dkv.cluster.layout import FROZEN, Migration, SlotRanges
from dkv.cluster.routing import Ownership
from dkv.errors import AuthError, Compacted, DKVError, InvalidArgument, WriteTimeout, from_wire, to_wire
from dkv.keys import Limits
from dkv.node.pipeline import LocalWriter, WritePipeline
from dkv.node.sequencer import Kind, Write
from dkv.node.sequencer import delete as del_w
from dkv.node.sequencer import put as put_w
from dkv.slots import SlotRange, slot_of
from dkv.storage import Store
from dkv.wal.memory import MemoryLog
from dkv.wal.record import Op, Record
from dkv.watch import END, EVENTS
from dkv.watch.feed import Feed, Scope, frozen_ranges, history_start, lost_slots, parse_slots
from dkv.watch.stream import WatchService
from tests.support.cluster import Cluster, rpc
from tests.support.procs import NodeProcess, wait_until

# -- the pure core ------------------------------------------------------------------------


def rec(lsn: int, op: Op = Op.PUT, key: bytes = b"k", value: bytes = b"v", rev: int | None = None) -> Record:
    return Record(1, lsn, op, key, value, rev=10 * lsn if rev is None else rev)


def test_history_starts_at_the_first_record_above_since() -> None:
    revs = {lsn: 10 * lsn for lsn in range(5, 21)}  # lsn 5..20, revisions 50..200
    start = lambda since: history_start(5, 20, since, revs.__getitem__)  # noqa: E731
    assert start(0) == 5 and start(49) == 5 and start(50) == 6
    assert start(125) == 13 and start(130) == 14
    assert start(199) == 20 and start(200) == 21 and start(10**9) == 21  # nothing above: after the end
    assert history_start(1, 0, 0, revs.__getitem__) == 1  # an empty range


def test_scope_keeps_events_of_its_prefix_and_slots_only() -> None:
    keys = [f"p{i}".encode() for i in range(200)]
    half = SlotRange(0, 511)
    scope = Scope(b"p", [half])
    records = [
        rec(1, Op.PUT, keys[0]),
        rec(2, Op.DELETE, keys[1], b""),
        rec(3, Op.EXPIRE, keys[2], b""),
        rec(4, Op.IMPORT, keys[3]),
        rec(5, Op.PURGE, keys[4]),
        rec(6, Op.NOOP, b""),
        rec(7, Op.PUT, b"other"),
        *[rec(8 + i, Op.PUT, k, b"x") for i, k in enumerate(keys[5:])],
    ]
    events = scope.events(records)
    expected = [
        r
        for r in records
        if r.op in (Op.PUT, Op.DELETE, Op.EXPIRE) and r.key.startswith(b"p") and slot_of(r.key) in half
    ]
    assert [e[3] for e in events] == [r.rev for r in expected]
    assert all(
        e[0] == {Op.PUT: "set", Op.DELETE: "delete", Op.EXPIRE: "expire"}[r.op] and e[1] == r.key
        for e, r in zip(events, expected)
    )
    assert all(e[2] == (r.value if r.op == Op.PUT else b"") for e, r in zip(events, expected))
    assert 0 < len(events) < len(records)


def test_subscription_skips_history_it_covers_and_detects_gaps() -> None:
    feed = Feed()
    woken: list[int] = []
    sub = feed.subscribe(3, lambda: woken.append(1))
    feed.publish([rec(2), rec(3), rec(4), rec(5)])
    assert [r.lsn for r in sub.take(10**6)] == [4, 5] and woken
    feed.publish([rec(7)])  # lsn 6 never came through the feed
    assert sub.error and "skipped" in sub.error and len(feed) == 0
    feed.publish([rec(8)])
    assert sub.take(10**6) == []


def test_a_subscription_that_falls_too_far_behind_is_cut_off() -> None:
    feed = Feed(max_records=100)
    slow, fast = feed.subscribe(0, lambda: None), feed.subscribe(0, lambda: None)
    for lsn in range(1, 101):
        feed.publish([rec(lsn)])
        fast.take(10**6)
    assert slow.error is None and slow.pending == 100
    feed.publish([rec(101)])
    assert slow.error and "cut off" in slow.error and slow.pending == 0
    assert fast.error is None and len(feed) == 1
    feed.close("shutting down")
    assert fast.error == "shutting down" and len(feed) == 0


def test_take_respects_the_byte_budget_but_always_moves() -> None:
    feed = Feed()
    sub = feed.subscribe(0, lambda: None)
    feed.publish([rec(i, value=b"x" * 1000) for i in range(1, 11)])
    first = sub.take(2500)
    assert 1 <= len(first) < 10
    assert len(sub.take(1)) == 1  # over budget alone: still one
    assert len(first) + 1 + len(sub.take(10**6)) == 10


@pytest.mark.parametrize(
    "bad", [[], "0-5", [[0]], [[5, 2]], [[0, 1024]], [[-1, 3]], [[True, 3]], [["0", 3]], [[0, 1]] * 1025]
)
def test_bad_slot_ranges_are_invalid_arguments(bad: Any) -> None:
    with pytest.raises(InvalidArgument):
        parse_slots(bad)


def test_parse_slots() -> None:
    assert parse_slots(None) is None
    assert parse_slots([[0, 9], (20, 20)]) == [SlotRange(0, 9), SlotRange(20, 20)]


def test_ownership_checks_frozen_and_lost_ranges() -> None:
    slots = SlotRanges([(0, 511, "shard-1"), (512, 1023, "shard-2")])
    moving = Migration("m-1", 500, 511, "shard-1", "shard-2", FROZEN)
    incoming = Migration("m-2", 600, 610, "shard-2", "shard-1", FROZEN)  # frozen out of the other shard
    own = Ownership(
        loaded=True,
        shard="shard-1",
        role="writer",
        slots=slots,
        migrations={"m-1": moving, "m-2": incoming},
        frozen={"m-0": SlotRange(10, 12)},
    )
    assert frozen_ranges(own) == [SlotRange(10, 12), SlotRange(500, 511)]
    assert lost_slots(own, [SlotRange(0, 511)]) == []
    assert lost_slots(own, [SlotRange(510, 514)]) == [512, 513, 514]


def test_cursors_are_per_slot_and_the_revision_is_their_minimum() -> None:
    c = Cursors(None)
    assert c.revision is None and c.since(range(10)) is None and c.fresh(3, 1)
    c.mark([SlotRange(0, 511)], 100)
    assert c.revision is None and c.since(range(0, 600)) == 100
    c.mark([SlotRange(512, 1023)], 90, excluded=[[600, 609]])
    assert c.revision is None  # 600..609 are still unknown
    c.mark([SlotRange(600, 609)], 95)
    assert c.revision == 90
    assert not c.fresh(0, 100) and c.fresh(0, 101)
    c.deliver(0, 150)
    assert not c.fresh(0, 120) and c.get(0) == 150
    c.mark([SlotRange(0, 511)], 120)  # a mark never moves a cursor back
    assert c.get(0) == 150 and c.get(1) == 120
    c.mark([SlotRange(0, 1023)], 200, excluded=[[0, 0]])
    assert c.get(0) == 150 and c.revision == 150 and c.since([0, 1]) == 150
    since = Cursors(42)
    assert since.revision == 42 and not since.fresh(7, 42) and since.fresh(7, 43)


def test_handoff_bounds_events_collapses_revisions_and_ends_with_the_error() -> None:
    h = Handoff(capacity=2)
    rooms: list[int] = []
    h.room_notifier = lambda: rooms.append(1)
    e1, e2 = Event("set", b"a", b"1", 5), Event("delete", b"b", b"", 6)
    h.put(e1)
    h.put(_Revision(5))
    h.put(_Revision(6))  # collapses with the previous marker
    h.put(e2)
    assert not h.has_room()
    assert h.get(0) == e1 and rooms == [1] and h.has_room()
    assert h.peek_revision() == 6
    assert h.get(0) == e2 and h.get(0.01) is None
    h.close(Compacted(3))
    h.put(e1)  # ignored once closed
    err = h.get(0)
    assert isinstance(err, Compacted) and err.revision == 3 and h.get(0) is err


def test_compacted_crosses_the_wire_with_its_revision() -> None:
    e = from_wire(to_wire(Compacted(1234)))
    assert isinstance(e, Compacted) and e.revision == 1234 and e.code == "COMPACTED" and "1234" in str(e)


# -- one stream in-process (memory log and engine, the real pipeline) -----------------------------


@pytest.fixture
def local() -> Iterator[tuple[WatchService, WritePipeline, MemoryLog]]:
    log, store = MemoryLog(retain=100_000), Store.open("memory", None)
    pipe = WritePipeline(log, store, LocalWriter(log, store, 1, offload=False), offload=False)
    svc = WatchService(log, store, pipe, Limits(), offload=False)
    yield svc, pipe, log
    pipe.close()


def events_of(messages: Iterator[list[Any]], n: int, timeout: float = 10) -> list[list[Any]]:
    """Read ``messages`` until ``n`` events came (or an end, raised)."""
    out: list[list[Any]] = []
    with gevent.Timeout(timeout):
        while len(out) < n:
            msg = next(messages)
            if msg[0] == END:
                raise from_wire(msg[1])
            assert msg[0] == EVENTS and msg[2] == []
            assert all(e[3] <= msg[1] for e in msg[3])  # the progress mark covers the events before it
            out.extend(msg[3])
    return out


def test_stream_replays_history_then_follows_live_writes_without_gap(
    local: tuple[WatchService, WritePipeline, MemoryLog],
) -> None:
    svc, pipe, _ = local
    revs = [pipe.submit([put_w(f"k{i}".encode(), b"v")])[0] for i in range(5000)]  # > 2 history pages
    stream = svc.open(b"", None, revs[99])  # from the 101st write on
    writer = gevent.spawn(lambda: [pipe.submit([put_w(f"live{i}".encode(), b"w")])[0] for i in range(500)])
    got = events_of(stream, 4900 + 500)
    live = writer.get()
    assert [e[3] for e in got] == revs[100:] + live  # every one, once, in order
    pipe.submit([del_w(b"k7")])
    assert events_of(stream, 1)[0][:3] == ["delete", b"k7", b""]
    assert len(svc.feed) == 1
    stream.close()
    assert len(svc.feed) == 0 and svc.streams == 0


def test_stream_from_now_sends_a_mark_then_only_new_events(
    local: tuple[WatchService, WritePipeline, MemoryLog],
) -> None:
    svc, pipe, _ = local
    old = pipe.submit([put_w(b"a", b"1")])[0]
    stream = svc.open(b"", [[0, 1023]], None)
    first = next(stream)
    assert first == [EVENTS, old, [], []]
    new = pipe.submit([Write(Kind.SET, b"a", b"2", px=60_000)])[0]
    assert events_of(stream, 1) == [["set", b"a", b"2", new]]
    stream.close()


def test_stream_raises_compacted_when_the_log_dropped_the_history() -> None:
    log, store = MemoryLog(retain=10), Store.open("memory", None)
    pipe = WritePipeline(log, store, LocalWriter(log, store, 1, offload=False), offload=False)
    svc = WatchService(log, store, pipe, Limits(), offload=False)
    try:
        revs = [pipe.submit([put_w(f"k{i}".encode(), b"v")])[0] for i in range(50)]
        assert log.base_rev > revs[0]
        with pytest.raises(Compacted) as e:
            events_of(svc.open(b"", None, revs[0]), 1)
        assert e.value.revision == log.base_rev
        got = events_of(svc.open(b"", None, e.value.revision), 50 - revs.index(log.base_rev) - 1)
        assert [g[3] for g in got] == revs[revs.index(log.base_rev) + 1 :]
    finally:
        pipe.close()


@pytest.mark.parametrize(
    "args",
    [
        (5, None, None),
        (b"", "all", None),
        (b"", None, -1),
        (b"", None, "1"),
        (b"", None, True),
        (b"x" * 2000, None, None),
    ],
)
def test_watch_arguments_are_checked(local: tuple[WatchService, WritePipeline, MemoryLog], args: Any) -> None:
    with pytest.raises(InvalidArgument):
        local[0].open(*args)
    assert local[0].streams == 0


# -- real processes: a standalone node ---------------------------------------------------------


def collect(w: Watch, n: int, timeout: float = 15) -> list[Event]:
    out: list[Event] = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        e = w.next(timeout=max(0.0, deadline - time.monotonic()))
        if e is None:
            raise AssertionError(f"only {len(out)} of {n} events within {timeout}s: {out}")
        out.append(e)
    return out


@pytest.mark.integration
def test_standalone_set_delete_expire_in_order_and_since_resumes(node: NodeProcess) -> None:
    with dkv.Client(node.addr, timeout=5) as c:
        c.set("other", "not watched")
        with c.watch("app/") as w:
            wait_until(lambda: w.revision is not None, 10, "the watch to start")
            r1 = c.set_revision("app/a", "1")
            r2 = c.set_revision("app/b", "2", px=200)  # expires: an expire event
            c.set("other2", "not watched")
            assert c.delete("app/a")
            got = collect(w, 4)
            start = w.revision
        assert [(e.type, e.key, e.value) for e in got] == [
            ("set", b"app/a", b"1"),
            ("set", b"app/b", b"2"),
            ("delete", b"app/a", b""),
            ("expire", b"app/b", b""),
        ]
        assert [e.revision for e in got[:2]] == [r1, r2]
        assert [e.revision for e in got] == sorted(e.revision for e in got)
        assert c.get("app/b") is None
        # Resumed from a revision: exactly the events after it.
        with c.watch("app/", since=r1) as again:
            assert collect(again, 3) == got[1:]
            assert again.next(timeout=1.5) is None  # nothing else ...
            assert again.revision is not None and again.revision >= got[-1].revision  # ... but progress marks
        assert start is not None and start >= got[-1].revision
        with c.watch("app/", since=start) as after:
            r3 = c.set_revision("app/c", "3")
            assert collect(after, 1) == [Event("set", b"app/c", b"3", r3)]
        with pytest.raises(InvalidArgument):
            c.watch(since=-1)


@pytest.mark.integration
def test_compacted_history_raises_with_the_revision_to_resume_from(node_factory: Callable[..., NodeProcess]) -> None:
    n = node_factory("--wal-segment-bytes", "4096")
    with dkv.Client(n.addr, timeout=5) as c:
        first = c.set_revision("h/0", "x" * 100)
        revs = [first] + [c.set_revision(f"h/{i}", "x" * 100) for i in range(1, 300)]
        wait_until(lambda: c.info()["wal"]["first_lsn"] > 1, 10, "the WAL to drop old segments")
        with c.watch("h/", since=first) as w:
            with pytest.raises(Compacted) as e:
                w.next(timeout=10)
        assert first < e.value.revision < revs[-1]
        with c.watch("h/", since=e.value.revision) as w:
            later = [r for r in revs if r > e.value.revision]
            assert [ev.revision for ev in collect(w, len(later))] == later


@pytest.mark.integration
def test_watch_rpc_refuses_bad_arguments_over_the_wire(node: NodeProcess) -> None:
    c = zerorpc.Client(timeout=5, heartbeat=None)
    c.connect(f"tcp://{node.addr}")
    try:
        for args in ((b"", [[0, 2000]], None), (b"", None, "soon"), (7, None, None)):
            with pytest.raises(zerorpc.RemoteError) as e:
                next(iter(c("watch", *args)))
            assert e.value.name == "InvalidArgument"
    finally:
        c.close()
    assert rpc(node.addr, "ping") == "pong"


@pytest.mark.integration
def test_watch_with_auth_needs_a_key(tmp_path: Path, node_factory: Callable[..., NodeProcess]) -> None:
    from dkv.auth import CLIENT_KEY, init_keys

    keys = tmp_path / "auth"
    init_keys(str(keys))
    n = node_factory("--auth-dir", str(keys))
    with dkv.Client(n.addr, timeout=5, auth=str(keys / CLIENT_KEY)) as c:
        start = c.set_revision("sec/a", "1")
        r = c.set_revision("sec/b", "2")
        with c.watch("sec/", since=start) as w:  # CURVE, with the client key
            assert collect(w, 1) == [Event("set", b"sec/b", b"2", r)]
    with dkv.Client(n.addr, timeout=5) as anonymous:
        with anonymous.watch("sec/", since=start) as w:
            with pytest.raises(AuthError):
                w.next(timeout=10)


@pytest.mark.integration
def test_cli_watch_prints_events_as_they_come(node: NodeProcess, capsys: pytest.CaptureFixture[str]) -> None:
    from dkv.cli.repl import execute

    with dkv.Client(node.addr, timeout=5) as c:
        result: list[tuple[bool, str]] = []
        t = threading.Thread(target=lambda: result.append(execute(c, "watch cli/ 3")), daemon=True)
        t.start()
        i = 0
        deadline = time.monotonic() + 20
        while t.is_alive() and time.monotonic() < deadline:  # the watch starts "now": write until it saw 3
            c.set(f"cli/{i}", f"v{i}")
            c.delete(f"cli/{i}")
            i += 1
            t.join(0.05)
        assert result and result[0][0], result
        lines = capsys.readouterr().out.splitlines()
        # the watch starts "now", between any two of the writes: three consecutive events of the
        # set, delete, set, ... sequence, in revision order
        assert len(lines) == 3 and all(" (rev " in line for line in lines), lines
        kinds = [line.split()[0] for line in lines]
        assert kinds in (["set", "delete", "set"], ["delete", "set", "delete"]), lines
        revs = [int(line.rsplit("(rev ", 1)[1].rstrip(")")) for line in lines]
        assert revs == sorted(set(revs)), lines
        assert result[0][1].startswith("(3 events; resume with since=")
        assert execute(c, "watch p x") == (False, "(error) usage: watch [PREFIX] [COUNT]")


# -- real processes: a cluster -------------------------------------------------------------------


class Writers:
    """Threads setting keys under a prefix, each value once: what was acknowledged, what may have been."""

    def __init__(self, client: dkv.Client, prefix: str, threads: int = 2, keys: int = 20) -> None:
        self.client, self.prefix, self.keys = client, prefix, keys
        self.acked: list[tuple[bytes, bytes, int]] = []
        self.maybe: set[tuple[bytes, bytes]] = set()
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(t,), daemon=True) for t in range(threads)]
        for th in self._threads:
            th.start()

    def _run(self, t: int) -> None:
        i = 0
        while not self._stop.is_set():
            key, value = f"{self.prefix}{t}-{i % self.keys}".encode(), f"{t}-{i}".encode()
            i += 1
            try:
                self.acked.append((key, value, self.client.set_revision(key, value)))
            except WriteTimeout:
                self.maybe.add((key, value))
            except DKVError as e:  # definite: not applied
                self.errors.append(repr(e))
            time.sleep(0.005)

    def stop(self) -> None:
        self._stop.set()
        for th in self._threads:
            th.join(30)


class Watcher:
    """A thread collecting a watch's events."""

    def __init__(self, client: dkv.Client, prefix: str, since: int) -> None:
        self.events: list[Event] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self.watch = client.watch(prefix, since=since)
        self.driver = self.watch._driver
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                e = self.watch.next(timeout=0.2)
                if e is not None:
                    self.events.append(e)
        except BaseException as e:  # reported by the test
            self.error = e

    def seen(self) -> set[int]:
        return {e.revision for e in self.events}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.watch.close()


def check_exactly_once(watcher: Watcher, writers: Writers) -> None:
    """Every acknowledged write once, with its value and revision; only writes that may have
    happened; no duplicate; each key's events in revision order."""
    assert watcher.error is None, repr(watcher.error)
    events = watcher.events
    assert all(e.type == "set" for e in events)
    got = [(e.key, e.value, e.revision) for e in events]
    assert len(set(got)) == len(got), "duplicate events"
    missing = set(writers.acked) - set(got)
    assert not missing, f"{len(missing)} acknowledged writes never seen, e.g. {sorted(missing)[:3]}"
    possible = {(k, v) for k, v, _ in writers.acked} | writers.maybe
    unexpected = [(k, v) for k, v, _ in got if (k, v) not in possible]
    assert not unexpected, f"events of writes that never happened: {unexpected[:3]}"
    by_key: dict[bytes, list[int]] = {}
    for k, _, rev in got:
        by_key.setdefault(k, []).append(rev)
    assert all(revs == sorted(revs) for revs in by_key.values()), "a key's events out of revision order"
    by_slot: dict[int, list[int]] = {}
    for k, _, rev in got:
        by_slot.setdefault(slot_of(k), []).append(rev)
    assert all(revs == sorted(revs) for revs in by_slot.values()), "a slot's events out of revision order"


def wait_all_seen(watcher: Watcher, writers: Writers, timeout: float = 30) -> None:
    def done() -> bool:
        if watcher.error is not None:
            raise AssertionError(f"the watch failed: {watcher.error!r}")
        return {rev for _, _, rev in writers.acked} <= watcher.seen()

    wait_until(done, timeout, "every acknowledged write to reach the watcher", interval=0.1)


@pytest.fixture
def failover_cluster(cluster_1x3: Cluster) -> Cluster:
    return cluster_1x3


@pytest.mark.integration
def test_watch_sees_every_acknowledged_write_once_across_a_writer_kill(failover_cluster: Cluster) -> None:
    cluster = failover_cluster
    client, wclient = cluster.client(timeout=15), cluster.client(timeout=15)
    try:
        start = client.set_revision("w/start", "0")
        watcher = Watcher(wclient, "w/", since=start)
        writers = Writers(client, "w/")
        wait_until(lambda: len(writers.acked) >= 30 and len(watcher.events) >= 10, 30, "writes seen live")
        old = cluster.writer_of("shard-1")
        before = len(writers.acked)
        cluster.nodes[old].kill()
        wait_until(lambda: cluster.writer_of("shard-1") not in (None, old), 60, "a replica to be promoted")
        wait_until(lambda: len(writers.acked) >= before + 30, 60, "writes to resume after the failover")
        writers.stop()
        wait_all_seen(watcher, writers)
        watcher.stop()
        check_exactly_once(watcher, writers)
        print(
            f"\n{len(watcher.events)} events, {len(writers.acked)} acknowledged, {len(writers.maybe)} "
            f"indeterminate; streams ended: {list(watcher.driver.endings)}"
        )
        assert watcher.driver.opened >= 2, "the stream was never resumed"
    finally:
        client.close()
        wclient.close()


@pytest.mark.integration
def test_watch_sees_every_acknowledged_write_once_across_a_migration(zk: str, tmp_path: Path) -> None:
    cluster = Cluster(
        zk,
        tmp_path,
        shards=1,
        replication_factor=1,
        write_quorum=1,
        session_timeout=4.0,
        extra=("--migration-rate", "2000"),
    )
    try:
        cluster.start()
        client, wclient = cluster.client(timeout=15), cluster.client(timeout=15)
        try:
            for i in range(0, 4000, 500):  # data to copy: the move lasts a few seconds
                client.mset({f"bulk{j}": "x" * 50 for j in range(i, i + 500)})
            start = client.set_revision("m/start", "0")
            watcher = Watcher(wclient, "m/", since=start)
            writers = Writers(client, "m/", keys=50)
            wait_until(lambda: len(writers.acked) >= 20, 30, "writes before the move")
            cluster.add_node("n2")  # a second shard: the controller moves half the slots to it
            wait_until(lambda: cluster.cluster_info().get("migrations"), 30, "the move to start", interval=0.05)
            wait_until(cluster.balanced, 120, "the move to finish", interval=0.2)
            moved = cluster.shard_members()["shard-2"]["slots"]
            after = len(writers.acked)
            wait_until(lambda: len(writers.acked) >= after + 40, 60, "writes after the move")
            writers.stop()
            wait_all_seen(watcher, writers)
            watcher.stop()
            check_exactly_once(watcher, writers)
            print(
                f"\n{len(watcher.events)} events, {len(writers.acked)} acknowledged; streams ended: "
                f"{list(watcher.driver.endings)}"
            )
            assert any("MOVED" in e or "Moved" in e for e in watcher.driver.endings), watcher.driver.endings
            on_new_shard = [k for k, _, rev in writers.acked[after:] if any(a <= slot_of(k) <= b for a, b in moved)]
            assert on_new_shard, "no write after the move went to the new shard"
        finally:
            client.close()
            wclient.close()
    finally:
        cluster.stop()
