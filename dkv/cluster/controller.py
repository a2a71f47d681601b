"""The cluster controller: turns joining nodes into shard members and balances the slots.

One node at a time is the controller (kazoo ``Election`` on ``/election``).
:func:`plan` is pure: from a :class:`~dkv.cluster.layout.ClusterView` it
decides the changes (a new node joins the emptiest shard that lacks members,
or starts a new shard; the first slot map spreads the slots evenly over the
shards that have a writer; afterwards, one migration at a time moves a slot
range from the fullest shard to the emptiest until they are balanced).
:class:`Controller` applies them with version-checked writes and re-plans
whenever the view changes; after a cancelled move the next one waits
(:class:`MoveBackoff`). Moving the data is the migration protocol
(:mod:`dkv.cluster.migration`), driven by the target shard's writer.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import AbstractSet, Any

import gevent
from kazoo.exceptions import KazooException, NodeExistsError

from dkv.cluster import layout
from dkv.cluster.layout import ClusterView, Shard, SlotRanges
from dkv.slots import NUM_SLOTS, split_even

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
class CreateSlots:
    ranges: tuple[tuple[int, int, str], ...]


@dataclass(frozen=True)
class StartMigration:
    start: int
    end: int
    source: str
    target: str


Change = AddReplica | NewShard | CreateSlots | StartMigration


def plan_move(
    slots: SlotRanges, shard_ids: list[str], draining: AbstractSet[str] = frozenset()
) -> StartMigration | None:
    """The next move towards even slot counts over ``shard_ids`` (shards that can serve), if any.

    A draining shard's last range moves to the emptiest other shard (as much
    of it as that shard's fair share takes).
    Otherwise it moves the top of the fullest shard's last range to the
    emptiest shard, as many slots as neither passes its fair share.
    """
    counts = {sid: slots.count(sid) for sid in shard_ids}
    receivers = [s for s in shard_ids if s not in draining]
    donors = [s for s in shard_ids if s in draining and counts[s]]
    if donors and receivers:
        donor = min(donors, key=layout.shard_sort_key)
        receiver = min(receivers, key=lambda s: (counts[s], layout.shard_sort_key(s)))
        a, b = slots.of_shard(donor)[-1]
        k = min(b - a + 1, max(1, -(-NUM_SLOTS // len(receivers)) - counts[receiver]))
        return StartMigration(b - k + 1, b, donor, receiver)
    shard_ids = receivers
    if len(shard_ids) < 2:
        return None
    donor = max(shard_ids, key=lambda s: (counts[s], layout.shard_sort_key(s)))
    receiver = min(shard_ids, key=lambda s: (counts[s], layout.shard_sort_key(s)))
    low, high = NUM_SLOTS // len(shard_ids), -(-NUM_SLOTS // len(shard_ids))
    k = min(counts[donor] - low, high - counts[receiver])
    if counts[donor] - counts[receiver] <= 1 or k <= 0:
        return None
    a, b = slots.of_shard(donor)[-1]
    k = min(k, b - a + 1)
    return StartMigration(b - k + 1, b, donor, receiver)


def plan(view: ClusterView, replication_factor: int) -> list[Change]:
    """The changes that bring ``view`` to the target assignment (pure)."""
    shards = {sid: replace(sh, replicas=list(sh.replicas)) for sid, sh in view.shards.items()}
    assigned = {m for sh in shards.values() for m in sh.members}
    changes: list[Change] = []
    next_no = 1 + max((layout.shard_sort_key(s)[0] for s in shards if layout.shard_sort_key(s)[0] < 1 << 30), default=0)
    for nid in sorted(view.nodes):
        if nid in assigned:
            continue
        open_shards = [
            sh for sh in shards.values() if sh.writer and not sh.draining and len(sh.members) < replication_factor
        ]
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
    if view.slot_version < 0:
        if with_writer:
            changes.append(
                CreateSlots(tuple((r.start, r.end, sh.id) for r, sh in zip(split_even(len(with_writer)), with_writer)))
            )
    elif not view.migrations:
        serving = [sid for sid, sh in view.shards.items() if sh.writer and sh.writer in view.nodes]
        move = plan_move(view.slots, serving, {sid for sid, sh in view.shards.items() if sh.draining})
        if move is not None:
            changes.append(move)
    return changes


@dataclass
class MoveBackoff:
    """Spaces out the moves after one was cancelled (sans-I/O: the caller passes the time).

    A migration that leaves the view while the slot map kept its version was
    cancelled (a flip changes ``/slots`` in the same multi-op): the next move
    waits ``base`` seconds, doubling with each cancel in a row up to ``cap``;
    a flip resets it. A target that fails after freezing then costs a bounded
    freeze once per back-off, not once per re-copy.
    """

    base: float = 5.0
    cap: float = 300.0
    #: when the next move may start
    hold_until: float = 0.0
    cancels: int = 0
    _open: dict[str, int] = field(default_factory=dict)  # migration id -> slot-map version when first seen

    def observe(self, view: ClusterView, now: float) -> None:
        for mid, version in list(self._open.items()):
            if mid in view.migrations:
                continue
            del self._open[mid]
            if view.slot_version != version:  # flipped
                self.cancels, self.hold_until = 0, 0.0
            else:
                self.cancels += 1
                self.hold_until = now + min(self.cap, self.base * 2 ** (self.cancels - 1))
        for mid in view.migrations:
            self._open.setdefault(mid, view.slot_version)


class Controller:
    """Runs :func:`plan` while this node holds the controller election."""

    def __init__(self, coordinator: Any, replication_factor: int) -> None:
        self.coord = coordinator
        self.rf = replication_factor
        self.backoff = MoveBackoff()
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
        # The election is ours only while the session that won it lives: a session that
        # expired and was replaced (connected again, new id) lost the election's znode.
        session = self.coord.zk.client_id
        while self.coord.connected and self.coord.zk.client_id == session:
            changed, view, now = self.coord.view_changed, self.coord.view, time.monotonic()
            self.backoff.observe(view, now)
            changes = plan(view, self.rf)
            wait = self.coord.config.session_timeout
            if now < self.backoff.hold_until and any(isinstance(c, StartMigration) for c in changes):
                changes = [c for c in changes if not isinstance(c, StartMigration)]
                wait = min(wait, self.backoff.hold_until - now)
                logger.info(
                    "controller: the last move was cancelled (%d in a row); the next starts in %.1fs",
                    self.backoff.cancels,
                    wait,
                )
            try:
                self._apply(changes, view)
            except KazooException as e:  # a version conflict or a lost connection
                logger.info("controller: %s; re-planning", type(e).__name__)
                self.coord.refresh()
            changed.wait(timeout=wait)
        logger.info("%s stops being the controller (ZooKeeper connection or session lost)", self.coord.config.node_id)

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
                sh = replace(sh, replicas=sh.replicas + [ch.node_id])
                zk.set(layout.shard_path(sh.id), sh.to_bytes(), version=shard_versions[sh.id])
                shard_versions[sh.id] += 1
                view.shards[sh.id] = sh
                logger.info("controller: %s joins %s as a replica", ch.node_id, sh.id)
            elif isinstance(ch, CreateSlots):
                zk.create(layout.SLOTS, SlotRanges(list(ch.ranges)).to_bytes())
                logger.info("controller: slot map created: %s", ch.ranges)
            elif isinstance(ch, StartMigration):
                version, open_moves = layout.migrations_guard(zk)
                if open_moves:
                    return  # one move at a time (our view is behind)
                m = layout.Migration("", ch.start, ch.end, ch.source, ch.target)
                path = layout.create_migration(zk, m, version)
                if path is None:
                    logger.info("controller: another move was started meanwhile; re-planning")
                    self.coord.refresh()
                    return
                logger.info(
                    "controller: moving slots %d..%d from %s to %s (%s)",
                    ch.start,
                    ch.end,
                    ch.source,
                    ch.target,
                    path.rsplit("/", 1)[-1],
                )
