"""The ownership decision (dkv.cluster.routing), sans-I/O: slot map, freezes, roles -> serve / MOVED / TRYAGAIN.

Every case is a pure function call: what a node knows at one instant, and the
op's slot, kind and consistency.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from dkv.cluster.layout import COPYING, FROZEN, Migration, SlotRanges
from dkv.cluster.routing import (
    REPLICA,
    SERVE,
    UNASSIGNED,
    WRITER,
    Freezes,
    Frozen,
    NoOwner,
    NotOwner,
    NotReady,
    NotWriter,
    Ownership,
    decide,
    scan_ranges,
)
from dkv.slots import SlotRange

MAP = SlotRanges([(0, 511, "shard-1"), (512, 1023, "shard-2")])
WRITER1 = Ownership(loaded=True, shard="shard-1", role=WRITER, slots=MAP, slot_version=7)
MOVE = Migration("m-0000000001", 100, 199, "shard-1", "shard-2", COPYING, 42)
LEVELS = ("sequential", "linearizable", "eventual")


@pytest.mark.parametrize("level", LEVELS)
def test_the_owning_writer_serves_reads_and_writes(level: str) -> None:
    assert decide(WRITER1, 5, write=False, consistency=level) == SERVE
    assert decide(WRITER1, 5, write=True, consistency=None) == SERVE


@pytest.mark.parametrize("write,level", [(True, None), *((False, lv) for lv in LEVELS)])
def test_a_slot_of_another_shard_is_moved_to_its_owner(write: bool, level: str | None) -> None:
    assert decide(WRITER1, 600, write, level) == NotOwner("shard-2")


def test_nothing_is_served_before_the_map_is_read_or_while_a_slot_has_no_owner() -> None:
    assert isinstance(decide(replace(WRITER1, loaded=False), 5, False, "sequential"), NoOwner)
    gap = replace(WRITER1, slots=SlotRanges([(0, 99, "shard-1")]))
    assert isinstance(decide(gap, 500, True, None), NoOwner)
    assert isinstance(scan_ranges(replace(WRITER1, loaded=False)), NoOwner)


def test_a_range_copying_away_is_still_served_by_its_source() -> None:
    copying = replace(WRITER1, migrations={MOVE.id: MOVE})
    assert decide(copying, 150, True, None) == SERVE
    assert decide(copying, 150, False, "linearizable") == SERVE


@pytest.mark.parametrize("write,level", [(True, None), *((False, lv) for lv in LEVELS)])
def test_a_frozen_range_gets_tryagain_for_reads_and_writes(write: bool, level: str | None) -> None:
    frozen = replace(WRITER1, migrations={MOVE.id: replace(MOVE, state=FROZEN)})
    assert decide(frozen, 150, write, level) == Frozen(MOVE.id)
    assert decide(frozen, 99, write, level) == SERVE  # just outside the moving range
    assert decide(frozen, 200, write, level) == SERVE


def test_a_freeze_the_writer_confirmed_holds_even_if_its_view_has_not_caught_up() -> None:
    # The source's view still shows the move copying, or not at all (an old view):
    # its own record of the confirmed freeze is what refuses the range.
    for migrations in ({MOVE.id: MOVE}, {}):
        o = replace(WRITER1, migrations=migrations, frozen={MOVE.id: SlotRange(100, 199)})
        assert decide(o, 100, False, "sequential") == Frozen(MOVE.id)
        assert decide(o, 199, True, None) == Frozen(MOVE.id)
        assert decide(o, 250, True, None) == SERVE


def test_after_the_flip_the_new_map_moves_the_range_to_the_target() -> None:
    flipped = replace(WRITER1, slots=MAP.moved(100, 199, "shard-2"), slot_version=8)
    assert decide(flipped, 150, False, "linearizable") == NotOwner("shard-2")
    target = replace(flipped, shard="shard-2")
    assert decide(target, 150, False, "linearizable") == SERVE


def test_a_migration_into_our_shard_does_not_freeze_us() -> None:
    target = replace(WRITER1, shard="shard-2", migrations={MOVE.id: replace(MOVE, state=FROZEN)})
    assert decide(target, 600, True, None) == SERVE
    assert decide(target, 150, False, "sequential") == NotOwner("shard-1")  # not ours until the flip


@pytest.mark.parametrize("level", ["sequential", "linearizable"])
def test_a_replica_sends_writes_and_strong_reads_to_its_writer(level: str) -> None:
    replica = replace(WRITER1, role=REPLICA, replica_fresh=True)
    assert decide(replica, 5, True, None) == NotWriter()
    assert decide(replica, 5, False, level) == NotWriter()
    assert decide(replace(WRITER1, role=UNASSIGNED), 5, False, level) == NotWriter()


def test_a_replica_serves_eventual_reads_only_when_fresh_and_its_map_is_as_new_as_its_writers() -> None:
    replica = replace(WRITER1, role=REPLICA, replica_fresh=True, writer_slot_version=7)
    assert decide(replica, 5, False, "eventual") == SERVE
    assert decide(replace(replica, replica_fresh=False), 5, False, "eventual") == NotWriter()
    # The writer has seen map 8 (say, our range moved away and its deletes are coming):
    # with map 7 the replica must not answer.
    assert decide(replace(replica, writer_slot_version=8), 5, False, "eventual") == NotWriter()
    assert decide(replace(replica, writer_slot_version=8, slot_version=8), 5, False, "eventual") == SERVE


def test_a_scan_reads_only_the_writers_own_ranges() -> None:
    assert scan_ranges(WRITER1) == [SlotRange(0, 511)]
    split = replace(WRITER1, slots=MAP.moved(100, 199, "shard-2"))
    assert scan_ranges(split) == [SlotRange(0, 99), SlotRange(200, 511)]
    assert scan_ranges(replace(WRITER1, shard="shard-3")) == []  # a shard that owns nothing (drained)


def test_a_scan_is_refused_while_any_of_its_ranges_is_frozen_or_off_the_writer() -> None:
    assert scan_ranges(replace(WRITER1, migrations={MOVE.id: replace(MOVE, state=FROZEN)})) == Frozen(MOVE.id)
    assert scan_ranges(replace(WRITER1, frozen={MOVE.id: SlotRange(100, 199)})) == Frozen(MOVE.id)
    assert scan_ranges(replace(WRITER1, migrations={MOVE.id: MOVE})) == [SlotRange(0, 511)]
    assert scan_ranges(replace(WRITER1, role=REPLICA)) == NotWriter()


def test_a_confirmed_freeze_outlives_views_read_before_it_and_ends_with_the_first_one_after() -> None:
    f = Freezes()
    f.confirmed(MOVE.id, SlotRange(100, 199), views_begun=5)
    # View 5 began before the confirmation: it may predate the migration itself.
    f.on_view({}, seq=5)
    assert f.ranges == {MOVE.id: SlotRange(100, 199)}
    # A later view that still lists the migration (frozen, not flipped yet) keeps it.
    f.on_view({MOVE.id: replace(MOVE, state=FROZEN)}, seq=6)
    assert f.ranges == {MOVE.id: SlotRange(100, 199)}
    # A view begun after it that no longer lists it: flipped or cancelled, either way settled.
    f.on_view({}, seq=7)
    assert f.ranges == {}


@pytest.mark.parametrize("write,level", [(True, None), *((False, lv) for lv in LEVELS)])
def test_a_new_writer_serves_nothing_until_the_log_tail_it_took_over_is_committed(
    write: bool, level: str | None
) -> None:
    # Found by the nemesis (seed 7): a writer promoted with an uncommitted tail answered a
    # linearizable get from its store before applying that tail, which held an acknowledged
    # write: a stale read.
    promoted = replace(WRITER1, writer_ready=False)
    assert decide(promoted, 5, write, level) == NotReady()
    assert scan_ranges(promoted) == NotReady()
    assert decide(promoted, 600, write, level) == NotOwner("shard-2")  # not ours anyway
