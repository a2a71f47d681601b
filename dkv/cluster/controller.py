"""The cluster controller: turns joining nodes into shard members and spreads the slots.

One node at a time is the controller (kazoo ``Election`` on ``/election``).
:func:`plan` is pure: from a :class:`~dkv.cluster.layout.ClusterView` it
decides the changes (a new node joins the emptiest shard that lacks members,
or starts a new shard; slots are spread evenly over the shards that have a
writer). :class:`Controller` applies them with version-checked writes and
re-plans whenever the view changes.

Spreading slots moves ownership, so it is only done while the cluster holds no
data: before it flips the map, the controller asks every writer that would lose
slots to *release* them, which a writer grants only if it has never written and
has nothing queued, and then refuses writes (``TRYAGAIN``) until it sees the
new map. Moving slots that hold data is the migration protocol (DESIGN §6),
not this.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import gevent
from kazoo.exceptions import KazooException, NodeExistsError

from dkv.cluster import layout
from dkv.cluster.layout import ClusterView, Shard, SlotRanges
from dkv.slots import split_even

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AddReplica:
    shard_id: str
    node_id: str


@dataclass(frozen=True)
class NewShard:
    shard_id: str
    writer: str


@dataclass(frozen=True)
class SetSlots:
    ranges: tuple[tuple[int, int, str], ...]
    #: writers that lose slots and must release them first (empty on first assignment)
    releasing: tuple[str, ...]


Change = AddReplica | NewShard | SetSlots


def plan(view: ClusterView, replication_factor: int) -> list[Change]:
    """The changes that bring ``view`` to the target assignment (pure)."""
    shards = {sid: Shard(sh.id, sh.epoch, sh.writer, list(sh.replicas)) for sid, sh in view.shards.items()}
    assigned = {m for sh in shards.values() for m in sh.members}
    changes: list[Change] = []
    next_no = 1 + max((layout.shard_sort_key(s)[0] for s in shards if layout.shard_sort_key(s)[0] < 1 << 30),
                      default=0)
    for nid in sorted(view.nodes):
        if nid in assigned:
            continue
        open_shards = [sh for sh in shards.values() if sh.writer and len(sh.members) < replication_factor]
        if open_shards:
            sh = min(open_shards, key=lambda s: (len(s.members), layout.shard_sort_key(s.id)))
            sh.replicas.append(nid)
            changes.append(AddReplica(sh.id, nid))
        else:
            sid = f"shard-{next_no}"
            next_no += 1
            shards[sid] = Shard(sid, 1, nid, [])
            changes.append(NewShard(sid, nid))
    with_writer = sorted((s for s in shards.values() if s.writer), key=lambda s: layout.shard_sort_key(s.id))
    owners = {s for _, _, s in view.slots.ranges}
    if with_writer and (view.slot_version < 0 or any(s.id not in owners for s in with_writer)):
        ranges = tuple((r.start, r.end, sh.id) for r, sh in zip(split_even(len(with_writer)), with_writer))
        releasing = {shards[s].writer for a, b, s in view.slots.ranges
                     if (a, b, s) not in ranges and s in shards and shards[s].writer}
        changes.append(SetSlots(ranges, tuple(sorted(releasing))))  # type: ignore[arg-type]
    return changes


class Controller:
    """Runs :func:`plan` while this node holds the controller election."""

    def __init__(self, coordinator: Any, replication_factor: int,
                 release: Callable[[str, int], bool]) -> None:
        self.coord = coordinator
        self.rf = replication_factor
        #: ask writer ``node_id`` to release its slots until map version ``v``: granted?
        self.release = release
        self._greenlet: gevent.Greenlet | None = None

    def start(self) -> None:
        self._greenlet = gevent.spawn(self._campaign)

    def _campaign(self) -> None:
        election = self.coord.zk.Election(layout.ELECTION, self.coord.config.node_id)
        while True:
            try:
                election.run(self._lead)
            except KazooException as e:
                logger.info("controller election interrupted (%s); rejoining", e)
            gevent.sleep(0.5)

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill()

    def _lead(self) -> None:
        """Plan and apply on every view change, while our session (hence our election) lives."""
        logger.info("%s is the cluster controller", self.coord.config.node_id)
        while self.coord.connected:
            changed = self.coord.view_changed
            try:
                self._apply(plan(self.coord.view, self.rf), self.coord.view)
            except KazooException as e:  # a version conflict or a lost connection
                logger.info("controller: %s; re-planning", type(e).__name__)
                self.coord.refresh()
            changed.wait(timeout=self.coord.config.session_timeout)
        logger.info("%s stops being the controller (ZooKeeper connection lost)", self.coord.config.node_id)

    def _apply(self, changes: list[Change], view: ClusterView) -> None:
        zk = self.coord.zk
        shard_versions = dict(view.shard_versions)
        for ch in changes:
            if isinstance(ch, NewShard):
                try:
                    zk.create(layout.shard_path(ch.shard_id), Shard(ch.shard_id, 1, ch.writer, []).to_bytes())
                    logger.info("controller: %s starts %s as its writer", ch.writer, ch.shard_id)
                except NodeExistsError:
                    self.coord.refresh()
                    return
            elif isinstance(ch, AddReplica):
                sh = view.shards[ch.shard_id]
                sh = Shard(sh.id, sh.epoch, sh.writer, sh.replicas + [ch.node_id])
                zk.set(layout.shard_path(sh.id), sh.to_bytes(), version=shard_versions[sh.id])
                shard_versions[sh.id] += 1
                view.shards[sh.id] = sh
                logger.info("controller: %s joins %s as a replica", ch.node_id, sh.id)
            elif isinstance(ch, SetSlots):
                self._set_slots(ch, view)

    def _set_slots(self, ch: SetSlots, view: ClusterView) -> None:
        zk = self.coord.zk
        data = SlotRanges(list(ch.ranges)).to_bytes()
        if view.slot_version < 0:
            zk.create(layout.SLOTS, data)
            logger.info("controller: slot map created: %s", ch.ranges)
            return
        for writer in ch.releasing:
            if not self.release(writer, view.slot_version + 1):
                logger.info("controller: %s holds data; its slots stay (slot migration moves data)", writer)
                return
        zk.set(layout.SLOTS, data, version=view.slot_version)
        logger.info("controller: slots spread over %d shard(s): %s", len(ch.ranges), ch.ranges)
