"""A node's life in a cluster: its role from the ZooKeeper view, its replication drivers, routing.

The :class:`~dkv.cluster.coordinator.Coordinator` hands every new view here.
From it this node learns its shard and role: the *writer* runs a
:class:`~dkv.cluster.leader.ReplicatedWriter` as the pipeline's batch writer; a
*replica* answers the writer through its
:class:`~dkv.cluster.follower.FollowerDriver`; an *unassigned* node serves
nothing. A writer also drives a slot migration into its shard
(:class:`~dkv.cluster.migrator.Migrator`), answers one out of it
(:class:`~dkv.cluster.migrator.MigrationSource`), and deletes the ranges
that moved away. :meth:`ClusterRuntime.route` is the per-op check the
service runs before anything is read or queued: ``MOVED`` to the owning
shard's writer, ``TRYAGAIN`` while a migration has frozen the slot, replica
reads only when the replica is close enough to the writer.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import gevent
from kazoo.exceptions import NoNodeError

from dkv import protocol
from dkv.cluster import layout, routing
from dkv.cluster.controller import Controller
from dkv.cluster.coordinator import Coordinator
from dkv.cluster.follower import FollowerDriver, PromiseFile
from dkv.cluster.layout import FROZEN, ClusterView, Migration, Shard
from dkv.cluster.leader import ReplicatedWriter
from dkv.cluster.migrator import MigrationSource, Migrator, delete_range, frozen_error
from dkv.cluster.promotion import Promoter
from dkv.cluster.replication import STALE_EPOCH, Reply
from dkv.errors import DKVError, Moved, TryAgain, Unavailable
from dkv.node.config import NodeConfig
from dkv.node.pipeline import WritePipeline
from dkv.slots import SlotRange, merge_ranges, slot_of
from dkv.storage import Store
from dkv.wal.record import Record

logger = logging.getLogger(__name__)

WRITER, REPLICA, UNASSIGNED = routing.WRITER, routing.REPLICA, routing.UNASSIGNED


class _NotWriter:
    """The pipeline's batch writer on a node that is not a shard writer: refuses."""

    def __init__(self, runtime: "ClusterRuntime") -> None:
        self._rt = runtime

    @property
    def epoch(self) -> int:
        return 0

    def check(self) -> None:
        raise self._rt.not_writer_error()

    def write(self, records: list[Record]) -> None:
        raise self._rt.not_writer_error()


class ClusterRuntime:
    def __init__(
        self, config: NodeConfig, log: Any, store: Store, pipeline: WritePipeline, promise: PromiseFile
    ) -> None:
        self.config = config
        self.log = log
        self.store = store
        self.pipeline = pipeline
        self.promise = promise
        # Until the first view, no epoch is known to be recorded: the follower asks ZooKeeper.
        self.follower = FollowerDriver(
            log,
            store,
            promise,
            offload=config.durable,
            page_bytes=config.limits.page_bytes,
            max_epoch=0,
            recorded_epoch=self._recorded_epoch,
        )
        self.coord = Coordinator(config, self._on_view, self._on_connection, self._on_session_lost)
        self.controller = Controller(self.coord, config.replication_factor)
        self.role = UNASSIGNED
        self.shard: Shard | None = None
        self.writer: ReplicatedWriter | None = None
        self._not_writer = _NotWriter(self)
        self.promoter: Promoter | None = None
        self._no_promotion_until = 0.0
        pipeline.writer = self._not_writer
        self.source = MigrationSource(log, store, pipeline, config.durable, self._confirm_frozen)
        #: migrations out of our shard that we confirmed frozen (kept past our view)
        self._frozen_here = routing.Freezes()
        self.migrator: Migrator | None = None
        self._migrated: set[str] = set()
        self._janitor: gevent.Greenlet | None = None

    def start(self) -> None:
        self.coord.start()
        self.controller.start()

    def stop(self) -> None:
        self.controller.stop()
        self._stop_migrator()
        if self._janitor is not None:
            self._janitor.kill()
        if self.promoter is not None:
            self.promoter.stop()
        if self.writer is not None:
            self.writer.stop()
        self.coord.stop()

    @property
    def view(self) -> ClusterView:
        return self.coord.view

    # -- role ----------------------------------------------------------------------

    def _on_view(self, view: ClusterView) -> None:
        me = self.config.node_id
        shard = view.shard_of(me)
        role = UNASSIGNED if shard is None else WRITER if shard.writer == me else REPLICA
        if shard is not None:
            self.follower.track_shard(shard.epoch, same_shard=self.shard is not None and self.shard.id == shard.id)
        if role != self.role or (shard and self.shard and shard.id != self.shard.id):
            logger.info("role: %s of %s (epoch %s)", role, shard.id if shard else "-", shard.epoch if shard else "-")
        if role == WRITER:
            assert shard is not None
            if self.writer is None or self.writer.shard_id != shard.id or shard.epoch > self.writer.epoch:
                self._start_writer(shard)
            assert self.writer is not None
            self.writer.set_replicas(shard.replicas, set(view.nodes), view.slot_version)
        elif self.writer is not None:
            self._stop_writer()
            self.follower.reset()  # our log may hold an uncommitted tail: the new writer cuts it
        if self.promoter is not None and self.promoter.dead:
            self.promoter = None
        writer_gone = shard is not None and (shard.writer is None or shard.writer not in view.nodes)
        if role == REPLICA and writer_gone and self.promoter is None:
            assert shard is not None
            self.promoter = Promoter(self, shard.id, not_before=self._no_promotion_until)
        self.role, self.shard = role, shard
        self._frozen_here.on_view(view.migrations, view.seq)
        self.log.retain_from = min(
            (
                m.from_lsn + 1
                for m in view.migrations.values()
                if shard and m.source == shard.id and m.from_lsn is not None
            ),
            default=None,
        )
        if role == WRITER:
            self._drive_migration(view)
            self._tidy(view)
        else:
            self._stop_migrator()

    def _start_writer(self, shard: Shard) -> None:
        self._stop_writer()
        if shard.epoch > self.promise.epoch:
            self.promise.save(shard.epoch)
            self.follower.state.promised = shard.epoch
        self.writer = ReplicatedWriter(
            self.config,
            shard.id,
            shard.epoch,
            self.log,
            self.store,
            addr_of=lambda rid: self.coord.view.nodes.get(rid),
            bump_epoch=lambda: self.coord.bump_epoch(shard.id),
            is_current=lambda: self.coord.connected and self.role == WRITER,
        )
        self.pipeline.writer = self.writer

    def _stop_writer(self) -> None:
        if self.writer is not None:
            self.writer.stop()
            self.writer = None
        self.pipeline.writer = self._not_writer

    def _recorded_epoch(self) -> int | None:
        """The epoch ZooKeeper records for our shard now (a promotion's reservation included),
        read on demand by the follower; None if it cannot be read promptly."""
        shard = self.shard
        if shard is None or not self.coord.connected:
            return None
        result = self.coord.zk.get_async(layout.shard_path(shard.id))
        result.wait(timeout=min(self.config.write_timeout, self.config.session_timeout) / 2)
        try:
            if not result.ready():
                raise TimeoutError("no answer")
            raw, _ = result.get()
        except Exception as e:  # kazoo errors, no answer, no such shard: the sender retries
            logger.debug("reading %s's epoch from ZooKeeper failed: %r", shard.id, e)
            return None
        if self.shard is None or self.shard.id != shard.id:
            return None
        return Shard.from_bytes(shard.id, raw).epoch

    def _on_session_lost(self) -> None:
        """A writer whose session expired must not resume (another may have been promoted):
        step down, and sit out the next election so a replica takes over."""
        if self.role == WRITER and self.shard is not None:
            self._stop_writer()
            self.follower.reset()
            self._no_promotion_until = time.monotonic() + 2 * self.config.session_timeout
            try:
                self.coord.step_down(self.shard.id)
            except Exception:
                logger.exception("stepping down failed")

    def _on_connection(self, connected: bool) -> None:
        if not connected:
            logger.warning(
                "ZooKeeper connection %s: not acknowledging writes until it is back",
                "suspended" if not self.coord.connected else "lost",
            )

    def not_writer_error(self) -> DKVError:
        if self.role == REPLICA and self.shard is not None:
            return self._to_writer_of(self.shard.id, f"{self.config.node_id} is a replica of {self.shard.id}")
        return Unavailable(f"{self.config.node_id} is not a shard writer ({self.role})")

    def _to_writer_of(self, shard_id: str, why: str, **data: Any) -> DKVError:
        """MOVED to the shard's writer, or Unavailable while it has none (failover)."""
        addr = self.view.writer_addr(shard_id)
        if addr is None:
            return Unavailable(f"{why}; {shard_id} has no live writer (failover in progress)", **data)
        return Moved(why, addr=addr, **data)

    # -- routing (before anything is read or queued) -----------------------------------------

    def ownership(self) -> routing.Ownership:
        """What this node knows about the slots right now (the input of every routing decision)."""
        view = self.view
        fresh = False
        if self.role == REPLICA:
            fresh = (
                time.monotonic() - self.follower.last_contact < 2 * self.config.session_timeout
                and self.follower.lag() <= self.config.max_replica_lag
            )
        return routing.Ownership(
            loaded=self.coord.loaded,
            shard=self.shard.id if self.shard else None,
            role=self.role,
            slots=view.slots,
            slot_version=view.slot_version,
            migrations=view.migrations,
            frozen=self._frozen_here.ranges,
            replica_fresh=fresh,
            writer_ready=self.writer is not None and self.writer.ready,
            writer_slot_version=self.follower.state.slot_version,
        )

    def route(self, op: str, key: bytes, consistency: str | None, own: routing.Ownership | None = None) -> None:
        """Raise unless this node may answer ``op`` on ``key`` now (``own``: :meth:`ownership`, taken
        since the last yield). The caller reads its store or queues the write before it next
        yields (see :mod:`dkv.cluster.routing`)."""
        slot = slot_of(key)
        decision = routing.decide(own or self.ownership(), slot, op in protocol.WRITE_OPS, consistency)
        if not isinstance(decision, routing.Serve):
            raise self._refusal(decision, slot)

    def scan_ranges(self, slot_version: int | None) -> list[SlotRange]:
        """The slot ranges a scan page reads here; ``slot_version`` is the client's slot map version,
        which must be ours (else the pages of two writers could both hold, or both miss, a range)."""
        own = self.ownership()
        if slot_version is not None and own.loaded and slot_version != own.slot_version:
            if slot_version > own.slot_version:
                raise TryAgain(
                    f"{self.config.node_id} has slot map version {own.slot_version}, "
                    f"older than the client's {slot_version}; retry shortly"
                )
            raise Moved(f"the slot map changed (version {own.slot_version}, the client has {slot_version})")
        decision = routing.scan_ranges(own)
        if isinstance(decision, list):
            return decision
        raise self._refusal(decision, None)

    # -- watches (:mod:`dkv.watch.stream`) -------------------------------------------------

    def watch_scope(self, ranges: list[SlotRange] | None) -> tuple[list[SlotRange], Any]:
        """The slots a watch stream covers here (every slot of our shard when ``ranges`` is None)
        and a token of our term as the writer; raises where to go instead unless we are the ready
        writer of a shard owning them all (frozen slots included: nothing commits in them)."""
        own = self.ownership()
        if not own.loaded:
            raise Unavailable(f"{self.config.node_id} has not read the cluster map yet")
        if own.role != WRITER or self.writer is None:
            raise self.not_writer_error()
        if not own.writer_ready:
            raise self._refusal(routing.NotReady(), None)
        if ranges is None:
            ranges = [SlotRange(a, b) for a, b in own.slots.of_shard(own.shard)] if own.shard else []
            if not ranges:
                raise Unavailable(f"{own.shard} owns no slot yet")
        for r in ranges:
            for slot in r:
                owner = own.slots.owner(slot)
                if owner != own.shard:
                    raise self._refusal(routing.NotOwner(owner) if owner else routing.NoOwner("no owner"), slot)
        return ranges, self.writer

    def watch_check(self, token: Any) -> tuple[DKVError | None, routing.Ownership]:
        """Whether a watch stream opened in the writer term ``token`` may go on: None, or the error
        that ends it (we stopped being that writer); with what we know of the slots now."""
        own = self.ownership()
        if self.role != WRITER or self.writer is not token:
            return self.not_writer_error(), own
        return None, own

    def writer_of_shard(self, shard_id: str | None, why: str, **data: Any) -> DKVError:
        """MOVED to the writer of ``shard_id`` (Unavailable while it has none, or no shard)."""
        if shard_id is None:
            return Unavailable(why, **data)
        return self._to_writer_of(shard_id, why, **data)

    def _refusal(self, decision: routing.Decision, slot: int | None) -> DKVError:
        """The error that tells the client where to go instead (``slot``: None for a scan)."""
        if isinstance(decision, routing.NoOwner):
            return Unavailable(f"{self.config.node_id}: {decision.why}")
        if isinstance(decision, routing.NotOwner):
            return self._to_writer_of(decision.owner, f"slot {slot} is served by {decision.owner}", slot=slot)
        if isinstance(decision, routing.Frozen):
            return frozen_error(slot, decision.migration)
        if isinstance(decision, routing.NotReady):
            return Unavailable(
                f"{self.config.node_id} is the new writer of {self.shard.id if self.shard else '-'} "
                "and is committing the log tail it took over; retry shortly"
            )
        return self.not_writer_error()

    def needs_confirmation(self, consistency: str | None) -> bool:
        """Does a read at ``consistency`` need the writer's epoch confirmed first? Linearizable
        reads always; sequential ones when the writer's lease lapsed (it may have been paused
        while a newer writer took over: read-your-writes must not see its stale store)."""
        if consistency == "linearizable":
            return True
        return consistency == "sequential" and self.writer is not None and not self.writer.has_lease()

    def confirm_linearizable(self) -> None:
        if self.writer is None:
            raise self.not_writer_error()
        self.writer.confirm()

    # -- replication RPCs (this node as a replica) --------------------------------------------

    def _writer_refusal(self) -> list[Any] | None:
        if self.role == WRITER and self.writer is not None:
            # A writer takes no orders from another writer of its shard (one writer per epoch).
            return Reply(
                STALE_EPOCH, self.writer.epoch, self.log.last_lsn, self.log.last_epoch, 0, self.store.applied_lsn
            ).to_wire()
        return None

    def _as_replica(self, handle: Any, *args: Any) -> list[Any]:
        refusal = self._writer_refusal()
        return refusal if refusal is not None else handle(*args)

    def repl_prepare(self, wire: list[Any]) -> list[Any]:
        return self._as_replica(self.follower.prepare, wire)

    def repl_truncate(self, wire: list[Any]) -> list[Any]:
        return self._as_replica(self.follower.truncate, wire)

    def repl_fence(self, epoch: int) -> list[Any]:
        return self._as_replica(self.follower.fence, epoch)

    def repl_snapshot(self, *args: Any) -> list[Any]:
        return self._as_replica(self.follower.snapshot_chunk, *args)

    def repl_digest(self, wire: list[Any]) -> list[Any]:
        """Anti-entropy: ``[reply, digest | None]`` (see FollowerDriver.digest)."""
        refusal = self._writer_refusal()
        return [refusal, None] if refusal is not None else self.follower.digest(wire)

    def repl_read(self, start: int, limit: int) -> list[list[Any]]:
        return self.follower.read(int(start), int(limit))

    # -- slot migration ------------------------------------------------------------------

    def migration_source(self) -> MigrationSource:
        """The source side's RPCs, served only by the writer."""
        if self.role != WRITER:
            raise self.not_writer_error()
        return self.source

    def _confirm_frozen(self, migration_id: str) -> tuple[Migration, int]:
        zk = self.coord.zk
        try:
            m = Migration.from_bytes(migration_id, zk.get(layout.migration_path(migration_id))[0])
        except NoNodeError:
            raise Unavailable(f"no migration {migration_id}") from None
        if m.state != FROZEN or self.shard is None or m.source != self.shard.id:
            raise Unavailable(f"migration {migration_id} is not frozen out of our shard")
        self._frozen_here.confirmed(migration_id, SlotRange(m.start, m.end), self.coord.reads_begun)
        raw, stat = zk.get(layout.shard_path(m.source))
        shard = Shard.from_bytes(m.source, raw)
        if self.writer is None or shard.writer != self.config.node_id or shard.epoch != self.writer.epoch:
            raise Unavailable(f"{self.config.node_id} no longer writes {m.source}")
        return m, stat.version

    def _drive_migration(self, view: ClusterView) -> None:
        assert self.shard is not None and self.writer is not None
        mine = [m for m in view.migrations.values() if m.target == self.shard.id and m.id not in self._migrated]
        cur = self.migrator
        if cur is not None and (
            cur.dead or not mine or cur.migration.id != mine[0].id or cur.epoch != self.writer.epoch
        ):
            if cur.dead and cur.importer.done:
                self._migrated.add(cur.migration.id)
            self._stop_migrator()
            mine = [m for m in mine if m.id not in self._migrated]
        if self.migrator is None and mine:
            m = mine[0]
            if self._janitor is not None:
                # It may be about to delete keys of this range that it read as foreign. Its
                # deletes already queued commit before any import (the pipeline is FIFO).
                self._janitor.kill()
                self._janitor = None
            self.migrator = Migrator(
                m,
                self.coord.zk,
                self.pipeline,
                self.store,
                self.config.durable,
                source_addr=lambda: self.view.writer_addr(m.source),
                node_id=self.config.node_id,
                epoch=self.writer.epoch,
                rate=self.config.migration_rate,
                freeze_timeout=self.config.migration_freeze_timeout,
                auth=self.config.credentials,
            )

    def _stop_migrator(self) -> None:
        if self.migrator is not None:
            self.migrator.stop()
            self.migrator = None

    def _tidy(self, view: ClusterView) -> None:
        """Delete what we hold of slots another shard owns (a range that moved away), unless
        we are importing them."""
        if self._janitor is not None and not self._janitor.dead:
            return
        assert self.shard is not None
        me = self.shard.id
        foreign = {slot for a, b, owner in view.slots.ranges if owner != me for slot in range(a, b + 1)}
        foreign -= {slot for m in view.migrations.values() if m.target == me for slot in range(m.start, m.end + 1)}
        if foreign:
            self._janitor = gevent.spawn(self._delete_foreign, merge_ranges(foreign))

    def _delete_foreign(self, ranges: list[SlotRange]) -> None:
        for r in ranges:
            try:
                after = delete_range(self.pipeline, self.store, r, self.config.durable)
                if after is None:
                    continue
                while after is not None:
                    after = delete_range(self.pipeline, self.store, r, self.config.durable, after)
                logger.info("deleted our copy of slots %d..%d (they moved to another shard)", r.start, r.end)
            except DKVError as e:
                logger.info("deleting moved-away slots %d..%d failed (%s); the next view retries", r.start, r.end, e)
                return

    # -- introspection ---------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mode": "cluster",
            "role": self.role,
            "shard": self.shard.id if self.shard else None,
            "zk_connected": self.coord.connected,
            "promised_epoch": self.follower.state.promised,
        }
        if self.writer is not None:
            out["replication"] = self.writer.lag()
        elif self.role == REPLICA:
            out["replication"] = {"lag": self.follower.lag(), "commit_lsn": self.follower.state.commit_lsn}
        if self.migrator is not None and not self.migrator.dead:
            out["migration"] = self.migrator.progress()
        return out

    def cluster_info(self) -> dict[str, Any]:
        self._check_loaded()  # an empty map would tell a client the cluster has no shard
        return self.view.info()

    def _check_loaded(self) -> None:
        if not self.coord.loaded:
            raise Unavailable(f"{self.config.node_id} has not read the cluster map from ZooKeeper yet")
