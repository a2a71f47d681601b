"""Who may answer an op, sans-I/O: a cluster node's per-op ownership decision (DESIGN §6, §7, G4).

:func:`decide` takes what a node knows at one instant (an :class:`Ownership`)
and one op's slot, kind and consistency, and returns :class:`Serve` or why not:
:class:`NotOwner` (``MOVED`` to the owner's writer), :class:`Frozen`
(``TRYAGAIN``: a migration froze the slot), :class:`NotWriter` (``MOVED`` to our
own shard's writer), :class:`NotReady` (``UNAVAILABLE``: we are the writer but
still committing the log tail we took over) or :class:`NoOwner`
(``UNAVAILABLE``: the map is not read yet, or the slot has no owner). :func:`scan_ranges` is the same decision for a
scan page, which reads every slot the node owns.

The decision is only as good as the instant it describes, so the caller
(:meth:`dkv.cluster.runtime.ClusterRuntime.route`) takes it *after* anything
that yields (a linearizable read's quorum round) and reads its store or queues
its writes *before* the next yield. :mod:`dkv.cluster.migration` explains why
that, with the writer's own record of the freezes it confirmed (``frozen``
here), is enough for a read never to see a range that moved away.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from dkv.cluster.layout import FROZEN, Migration, SlotRanges
from dkv.slots import SlotRange

WRITER, REPLICA, UNASSIGNED = "writer", "replica", "unassigned"


@dataclass(frozen=True)
class Ownership:
    """What a node knows about the slots at one instant."""

    #: the cluster map has been read from ZooKeeper at least once
    loaded: bool
    #: our shard (None: unassigned) and our role in it
    shard: str | None
    role: str
    #: the slot map of our current view, and its version (the /slots znode's)
    slots: SlotRanges
    slot_version: int = -1
    #: migrations in our current view
    migrations: Mapping[str, Migration] = field(default_factory=dict)
    #: ranges this node, as its shard's writer, confirmed frozen to a migration's target
    #: (kept until a view read after the confirmation shows the migration gone)
    frozen: Mapping[str, SlotRange] = field(default_factory=dict)
    #: a writer: its store holds every committed write (the log tail it took over, after a
    #: promotion or a restart, is committed; until then that tail may hold acknowledged writes)
    writer_ready: bool = True
    #: a replica: in touch with its writer and within ``max_replica_lag`` of it
    replica_fresh: bool = False
    #: a replica: the highest slot map version its writer has sent it (its view must be
    #: at least as new before it serves: the writer deletes a moved range only once its
    #: own view shows the move, and every prepare carries that view's version)
    writer_slot_version: int = -1


@dataclass(frozen=True)
class Serve:
    pass


@dataclass(frozen=True)
class NoOwner:
    why: str


@dataclass(frozen=True)
class NotOwner:
    """Another shard owns the slot."""

    owner: str


@dataclass(frozen=True)
class Frozen:
    """The slot is frozen by a migration out of our shard."""

    migration: str


@dataclass(frozen=True)
class NotReady:
    """We are the writer, but not ready to serve yet (committing the log tail we took over)."""


@dataclass(frozen=True)
class NotWriter:
    """Only our shard's writer may answer (a write, or a read above ``eventual``)."""


Decision = Serve | NoOwner | NotOwner | Frozen | NotReady | NotWriter

SERVE = Serve()


def decide(o: Ownership, slot: int, write: bool, consistency: str | None) -> Decision:
    """May this node answer an op on ``slot`` now? ``write``: a set/delete; else a read at
    ``consistency`` (``sequential``, ``linearizable`` or ``eventual``)."""
    if not o.loaded:
        return NoOwner("this node has not read the cluster map yet")
    owner = o.slots.owner(slot)
    if owner is None:
        return NoOwner(f"slot {slot} has no owner yet (the cluster is forming)")
    if owner != o.shard:
        return NotOwner(owner)
    frozen = _frozen(o, [SlotRange(slot, slot)])
    if frozen is not None:
        return frozen
    if o.role == WRITER and not o.writer_ready:
        return NotReady()
    if write or consistency != "eventual":
        return SERVE if o.role == WRITER else NotWriter()
    if o.role == REPLICA and not (o.replica_fresh and o.slot_version >= o.writer_slot_version):
        return NotWriter()
    return SERVE


def scan_ranges(o: Ownership) -> list[SlotRange] | Decision:
    """The slot ranges a scan page may read here (only a writer scans), or why it may not."""
    if not o.loaded:
        return NoOwner("this node has not read the cluster map yet")
    if o.role != WRITER:
        return NotWriter()
    if not o.writer_ready:
        return NotReady()
    ours = [SlotRange(a, b) for a, b in o.slots.of_shard(o.shard)] if o.shard else []
    frozen = _frozen(o, ours)
    return frozen if frozen is not None else ours


class Freezes:
    """The freezes a source writer confirmed to a migration's target, kept past its view.

    A confirmed freeze refuses its range from the moment of confirmation, even
    while this node's view of ZooKeeper lags behind (it may not even show the
    migration yet). It is dropped only by a view whose reading *began* after the
    confirmation and which no longer lists the migration: the move flipped (that
    view shows the new owner) or was cancelled (the range is ours again).
    """

    def __init__(self) -> None:
        self._held: dict[str, tuple[SlotRange, int]] = {}

    def confirmed(self, migration_id: str, slots: SlotRange, views_begun: int) -> None:
        """We confirmed the freeze when ``views_begun`` views had begun to be read."""
        self._held[migration_id] = (slots, views_begun)

    def on_view(self, migrations: Mapping[str, Migration], seq: int) -> None:
        """A new view, the ``seq``-th begun."""
        self._held = {mid: (r, begun) for mid, (r, begun) in self._held.items() if mid in migrations or seq <= begun}

    @property
    def ranges(self) -> dict[str, SlotRange]:
        return {mid: r for mid, (r, _) in self._held.items()}


def _frozen(o: Ownership, ranges: list[SlotRange]) -> Frozen | None:
    for m in o.migrations.values():
        if m.source == o.shard and m.state == FROZEN and any(_overlap(r, m.start, m.end) for r in ranges):
            return Frozen(m.id)
    for mid, f in o.frozen.items():
        if any(_overlap(r, f.start, f.end) for r in ranges):
            return Frozen(mid)
    return None


def _overlap(r: SlotRange, start: int, end: int) -> bool:
    return r.start <= end and start <= r.end
