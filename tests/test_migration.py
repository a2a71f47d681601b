"""Unit tests of slot migration's pure parts: the controller's planning, the slot-map flip,
and the sans-I/O importer (dkv.cluster.migration), driven deterministically without sockets."""

from __future__ import annotations

from dataclasses import replace

import pytest

from dkv.cluster.controller import AddReplica, CreateSlots, MoveBackoff, NewShard, StartMigration, plan, plan_move
from dkv.cluster.layout import ClusterView, Migration, Shard, SlotRanges
from dkv.cluster.migration import (
    FREEZE_LAG,
    Begin,
    Cancel,
    Clear,
    CopyPage,
    Done,
    Flip,
    Freeze,
    Frozen,
    Import,
    Importer,
    Page,
    RecordStart,
    Tail,
    TailPage,
)
from dkv.node.sequencer import Kind, Write

FLOOR = Import([Write(Kind.FLOOR, b"", deadline=0)])  # the revision floor a freeze imports first


def view(
    shards: dict[str, tuple[str | None, list[str]]],
    slots: SlotRanges | None,
    migrations: dict[str, Migration] | None = None,
    down: tuple[str, ...] = (),
) -> ClusterView:
    v = ClusterView()
    for sid, (writer, replicas) in shards.items():
        v.shards[sid] = Shard(sid, 1, writer, replicas)
        v.shard_versions[sid] = 0
        for n in ([writer] if writer else []) + replicas:
            if n not in down:
                v.nodes[n] = f"{n}:1"
    if slots is not None:
        v.slots, v.slot_version = slots, 0
    v.migrations = migrations or {}
    return v


# -- planning -------------------------------------------------------------------------------


def test_first_map_spreads_slots_over_the_writers() -> None:
    v = view({"shard-1": ("n1", []), "shard-2": ("n4", [])}, None)
    (create,) = [c for c in plan(v, 3) if isinstance(c, CreateSlots)]
    assert create.ranges == ((0, 511, "shard-1"), (512, 1023, "shard-2"))


def test_a_new_empty_shard_gets_half_the_slots_by_migration() -> None:
    v = view({"shard-1": ("n1", ["n2", "n3"]), "shard-2": ("n4", [])}, SlotRanges([(0, 1023, "shard-1")]))
    changes = plan(v, 3)
    assert StartMigration(512, 1023, "shard-1", "shard-2") in changes
    assert not any(isinstance(c, CreateSlots) for c in changes)


def test_one_migration_at_a_time() -> None:
    m = Migration("m-1", 512, 1023, "shard-1", "shard-2")
    v = view(
        {"shard-1": ("n1", []), "shard-2": ("n4", []), "shard-3": ("n7", [])},
        SlotRanges([(0, 1023, "shard-1")]),
        {"m-1": m},
    )
    assert not [c for c in plan(v, 1) if isinstance(c, StartMigration)]


def test_no_move_from_or_to_a_shard_whose_writer_is_down() -> None:
    v = view({"shard-1": ("n1", ["n2"]), "shard-2": ("n4", [])}, SlotRanges([(0, 1023, "shard-1")]), down=("n1",))
    assert not [c for c in plan(v, 3) if isinstance(c, StartMigration)]


def test_new_nodes_still_join_while_slots_move() -> None:
    v = view({"shard-1": ("n1", [])}, SlotRanges([(0, 1023, "shard-1")]))
    v.nodes["n2"] = "n2:1"
    assert plan(v, 3) == [AddReplica("shard-1", "n2")]
    v.nodes["n9"] = "n9:1"
    assert NewShard("shard-2", "n2") in plan(v, 1)


@pytest.mark.parametrize("n_shards", [2, 3, 4, 5, 7])
def test_repeated_moves_balance_the_slots(n_shards: int) -> None:
    ids = [f"shard-{i}" for i in range(1, n_shards + 1)]
    slots = SlotRanges([(0, 1023, "shard-1")])
    moves = 0
    while (mv := plan_move(slots, ids)) is not None:
        assert slots.owner(mv.start) == mv.source and slots.owner(mv.end) == mv.source
        slots = slots.moved(mv.start, mv.end, mv.target)
        moves += 1
        assert moves < 3 * n_shards, "planning does not converge"
    counts = [slots.count(s) for s in ids]
    assert sum(counts) == 1024 and max(counts) - min(counts) <= 1, counts


def test_moved_rewrites_and_merges_the_slot_map() -> None:
    s = SlotRanges([(0, 511, "a"), (512, 1023, "b")])
    assert s.moved(256, 511, "b").ranges == [(0, 255, "a"), (256, 1023, "b")]
    assert s.moved(600, 700, "a").ranges == [(0, 511, "a"), (512, 599, "b"), (600, 700, "a"), (701, 1023, "b")]
    assert s.moved(0, 1023, "c").ranges == [(0, 1023, "c")]


# -- the importer -----------------------------------------------------------------------------


def run_to_freeze(imp: Importer, pairs: list[tuple[bytes, bytes]]) -> None:
    assert imp.next() == Clear(None)
    assert imp.on(b"\x00\x01k") == Clear(b"\x00\x01k")  # one page deleted: clear on
    assert imp.on(None) == Begin()
    assert imp.on(100) == RecordStart(100)
    assert imp.on(None) == CopyPage(None)
    act = imp.on(Page(pairs, None))
    if pairs:
        assert act == Import([Write(Kind.IMPORT, k, v) for k, v in pairs])
        act = imp.on(None)
    assert act == Tail(100)  # an empty page imports nothing


def test_importer_happy_path() -> None:
    imp = Importer()
    assert imp.phase == "clear"
    run_to_freeze(imp, [(b"k1", b"v1"), (b"k2", b"v2")])
    assert imp.phase == "tail"
    ops = [Write(Kind.IMPORT, b"k1", b"v9"), Write(Kind.PURGE, b"k2")]
    assert imp.on(TailPage(ops, 150, 150)) == Import(ops)  # caught up: import, then freeze
    assert imp.phase == "tail"
    assert imp.on(None) == Freeze()
    assert imp.phase == "freeze"
    assert imp.on(Frozen(160, 7)) == FLOOR and imp.on(None) == Tail(150)  # the source settled up to 160
    assert imp.phase == "drain"
    assert imp.on(TailPage([], 160, 160)) == Flip(7)
    assert imp.phase == "flip"
    assert imp.on(True) == Done()
    assert imp.done and imp.imported == 5 and imp.phase == "done"  # 2 copied, 2 tailed, the floor


def test_importer_phase_while_importing_a_copy_page() -> None:
    imp = Importer()
    imp.on(None), imp.on(100), imp.on(None)
    assert imp.phase == "copy"
    assert imp.on(Page([(b"k", b"v")], None)) == Import([Write(Kind.IMPORT, b"k", b"v")])
    assert imp.phase == "copy"  # the last page is still the copy, though the tail comes next


def test_importer_keeps_tailing_while_far_behind() -> None:
    imp = Importer()
    run_to_freeze(imp, [])
    assert imp.on(TailPage([], 2100, 100 + 2000 + FREEZE_LAG + 1)) == Tail(2100)
    assert imp.on(TailPage([], 4100, 4100)) == Freeze()


def test_importer_starts_over_when_the_source_compacted_its_log() -> None:
    imp = Importer()
    run_to_freeze(imp, [(b"k", b"v")])
    assert imp.on(TailPage([], 100, 5000, compacted=True)) == Clear(None)
    assert imp.restarts == 1


def test_importer_asks_again_when_the_flip_is_refused() -> None:
    imp = Importer()
    run_to_freeze(imp, [])
    assert imp.on(TailPage([], 120, 120)) == Freeze()
    assert imp.on(Frozen(120, 3)) == FLOOR and imp.on(None) == Flip(3)  # already at the final lsn
    assert imp.on(False) == Freeze()  # the source failed over meanwhile
    assert imp.on(Frozen(130, 5)) == FLOOR and imp.on(None) == Tail(120)
    assert imp.on(TailPage([Write(Kind.IMPORT, b"x", b"1")], 130, 130)) == Import([Write(Kind.IMPORT, b"x", b"1")])
    assert imp.on(None) == Flip(5)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_importer_cancels_a_freeze_that_outlasts_its_timeout() -> None:
    clock = Clock()
    imp = Importer(freeze_timeout=5.0, clock=clock)
    run_to_freeze(imp, [])
    clock.now += 60  # copying and tailing take as long as they take: no deadline before the freeze
    assert imp.next() == Tail(100)
    ops = [Write(Kind.IMPORT, b"k", b"v")]
    assert imp.on(TailPage(ops, 120, 120)) == Import(ops)  # the last page before the freeze...
    clock.now += 60  # ... takes long (the target's quorum is slow): nothing is frozen yet
    assert imp.on(None) == Freeze()
    clock.now += 4.0
    assert imp.next() == Freeze()  # e.g. the source's writer did not answer: asked again
    assert imp.on(Frozen(130, 3)) == FLOOR and imp.on(None) == Tail(120)
    clock.now += 1.5  # the drain's imports fail (the target lost its quorum) past the timeout
    assert imp.next() == Cancel()
    assert imp.on(True) == Done()
    assert imp.done and imp.cancelled


def test_importer_flips_rather_than_cancels_when_the_flip_is_due() -> None:
    clock = Clock()
    imp = Importer(freeze_timeout=5.0, clock=clock)
    run_to_freeze(imp, [])
    assert imp.on(TailPage([], 120, 120)) == Freeze()
    assert imp.on(Frozen(120, 3)) == FLOOR and imp.on(None) == Flip(3)
    clock.now += 30  # ZooKeeper was slow to take the multi-op: it still ends the freeze
    assert imp.next() == Flip(3)
    assert imp.on(True) == Done() and not imp.cancelled


def test_importer_cancels_a_freeze_it_inherited() -> None:
    # A previous target writer froze the range and died: re-copying while frozen would keep the
    # range down for the whole copy, so the move is cancelled (and planned again) at once.
    imp = Importer(inherited_freeze=True)
    assert imp.next() == Cancel()
    assert imp.on(False) == Done() and imp.cancelled  # already gone (flipped or cancelled): done too


def test_a_draining_shard_gives_all_its_slots_away_spread_over_the_others() -> None:
    ids = ["shard-1", "shard-2", "shard-3"]
    slots = SlotRanges([(0, 340, "shard-1"), (341, 681, "shard-2"), (682, 1023, "shard-3")])
    moves = 0
    while (mv := plan_move(slots, ids, {"shard-2"})) is not None:
        assert mv.source == "shard-2" and mv.target != "shard-2"
        slots = slots.moved(mv.start, mv.end, mv.target)
        moves += 1
        assert moves < 10
    assert slots.count("shard-2") == 0
    assert abs(slots.count("shard-1") - slots.count("shard-3")) <= 1


def test_nobody_joins_a_draining_shard_and_the_last_shard_keeps_its_slots() -> None:
    v = view({"shard-1": ("n1", []), "shard-2": ("n4", [])}, SlotRanges([(0, 1023, "shard-1")]))
    v.shards["shard-2"].draining = True
    v.nodes["n9"] = "n9:1"
    changes = plan(v, 3)
    assert AddReplica("shard-1", "n9") in changes and not any(isinstance(c, StartMigration) for c in changes)
    assert plan_move(SlotRanges([(0, 1023, "shard-1")]), ["shard-1"], {"shard-1"}) is None


def test_move_backoff_after_cancels_and_reset_by_a_flip() -> None:
    slots = SlotRanges([(0, 1023, "a")])
    m = Migration("m-1", 512, 1023, "a", "b")
    b = MoveBackoff(base=5, cap=12)
    b.observe(view({"a": ("w1", []), "b": ("w2", [])}, slots, {"m-1": m}), now=100)
    assert b.hold_until == 0  # a move under way holds nothing
    cancelled = view({"a": ("w1", []), "b": ("w2", [])}, slots)  # gone, slot map unchanged
    b.observe(cancelled, now=101)
    assert (b.cancels, b.hold_until) == (1, 106)
    b.observe(cancelled, now=102)  # the same view again changes nothing
    assert (b.cancels, b.hold_until) == (1, 106)
    for i, hold in [(2, 10), (3, 12), (4, 12)]:  # doubling, up to the cap
        mid = f"m-{i}"
        b.observe(view({"a": ("w1", []), "b": ("w2", [])}, slots, {mid: replace(m, id=mid)}), now=200)
        b.observe(cancelled, now=200)
        assert (b.cancels, b.hold_until) == (i, 200 + hold)
    b.observe(view({"a": ("w1", []), "b": ("w2", [])}, slots, {"m-9": replace(m, id="m-9")}), now=300)
    flipped = view({"a": ("w1", []), "b": ("w2", [])}, slots.moved(512, 1023, "b"))
    flipped.slot_version = 1
    b.observe(flipped, now=301)
    assert (b.cancels, b.hold_until) == (0, 0)


# -- one move at a time, even with two controllers (real ZooKeeper) ------------------------


@pytest.mark.integration
def test_two_controllers_reading_the_same_state_cannot_both_start_a_move(zk: str) -> None:
    """A controller whose session expired and came back can still run next to the newly elected
    one; a move is created only if /migrations is unchanged since its reader looked."""
    from kazoo.client import KazooClient

    from dkv.cluster import layout

    a, b = KazooClient(zk), KazooClient(zk)
    for c in (a, b):
        c.start(timeout=30)
    try:
        a.ensure_path(layout.MIGRATIONS)
        m = Migration("", 512, 1023, "shard-1", "shard-2")
        va, open_a = layout.migrations_guard(a)
        vb, open_b = layout.migrations_guard(b)
        assert open_a == open_b == [] and va == vb
        first = layout.create_migration(a, m, va)
        assert first is not None and first.startswith(layout.MIGRATIONS + "/m-")
        assert layout.create_migration(b, m, vb) is None  # b read before a's move: refused
        assert len(a.get_children(layout.MIGRATIONS)) == 1
        # Even once a's move is gone (flipped), b's old reading stays refused.
        a.delete(first)
        assert layout.create_migration(b, m, vb) is None
        v, moves = layout.migrations_guard(b)
        assert moves == [] and layout.create_migration(b, m, v) is not None
    finally:
        for c in (a, b):
            c.stop()
            c.close()
