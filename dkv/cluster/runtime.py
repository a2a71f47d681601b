"""A node's life in a cluster: its role from the ZooKeeper view, its replication drivers, routing.

The :class:`~dkv.cluster.coordinator.Coordinator` hands every new view here.
From it this node learns its shard and role: the *writer* runs a
:class:`~dkv.cluster.leader.ReplicatedWriter` as the pipeline's batch writer; a
*replica* answers the writer through its
:class:`~dkv.cluster.follower.FollowerDriver`; an *unassigned* node serves
nothing. :meth:`ClusterRuntime.route` is the per-op check the service runs
before anything is read or queued: ``MOVED`` to the owning shard's writer,
``TRYAGAIN`` while the controller moves an empty slot, replica reads only when
the replica is close enough to the writer.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from dkv import protocol
from dkv.client.connection import Connection, TransportError
from dkv.cluster.controller import Controller
from dkv.cluster.coordinator import Coordinator
from dkv.cluster.follower import FollowerDriver, PromiseFile
from dkv.cluster.layout import ClusterView, Shard
from dkv.cluster.leader import ReplicatedWriter
from dkv.cluster.promotion import Promoter
from dkv.cluster.replication import STALE_EPOCH, Reply
from dkv.errors import DKVError, Moved, TryAgain, Unavailable
from dkv.node.config import NodeConfig
from dkv.node.pipeline import WritePipeline
from dkv.slots import slot_of
from dkv.storage import Store
from dkv.wal.record import Record

logger = logging.getLogger(__name__)

WRITER, REPLICA, UNASSIGNED = "writer", "replica", "unassigned"


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
    def __init__(self, config: NodeConfig, log: Any, store: Store, pipeline: WritePipeline,
                 promise: PromiseFile) -> None:
        self.config = config
        self.log = log
        self.store = store
        self.pipeline = pipeline
        self.promise = promise
        self.follower = FollowerDriver(log, store, promise, offload=config.durable)
        self.coord = Coordinator(config, self._on_view, self._on_connection, self._on_session_lost)
        self.controller = Controller(self.coord, config.replication_factor, self._release_on)
        self.role = UNASSIGNED
        self.shard: Shard | None = None
        self.writer: ReplicatedWriter | None = None
        self._not_writer = _NotWriter(self)
        self.promoter: Promoter | None = None
        self._no_promotion_until = 0.0
        pipeline.writer = self._not_writer
        #: the controller is moving our (empty) slots: refuse writes until this map version
        self._frozen_until: tuple[int, float] | None = None

    def start(self) -> None:
        self.coord.start()
        self.controller.start()

    def stop(self) -> None:
        self.controller.stop()
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
        if role != self.role or (shard and self.shard and shard.id != self.shard.id):
            logger.info("role: %s of %s (epoch %s)", role, shard.id if shard else "-", shard.epoch if shard else "-")
        if role == WRITER:
            assert shard is not None
            if self.writer is None or self.writer.shard_id != shard.id or shard.epoch > self.writer.epoch:
                self._start_writer(shard)
            assert self.writer is not None
            self.writer.set_replicas(shard.replicas, set(view.nodes))
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
        if self._frozen_until and view.slot_version >= self._frozen_until[0]:
            self._frozen_until = None

    def _start_writer(self, shard: Shard) -> None:
        self._stop_writer()
        if shard.epoch > self.promise.epoch:
            self.promise.save(shard.epoch)
            self.follower.state.promised = shard.epoch
        self.writer = ReplicatedWriter(
            self.config, shard.id, shard.epoch, self.log, self.store,
            addr_of=lambda rid: self.coord.view.nodes.get(rid),
            bump_epoch=lambda sid=shard.id: self.coord.bump_epoch(sid),
            is_current=lambda: self.coord.connected and self.role == WRITER)
        self.pipeline.writer = self.writer

    def _stop_writer(self) -> None:
        if self.writer is not None:
            self.writer.stop()
            self.writer = None
        self.pipeline.writer = self._not_writer

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
            logger.warning("ZooKeeper connection %s: not acknowledging writes until it is back",
                           "suspended" if not self.coord.connected else "lost")

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

    def route(self, op: str, key: bytes, consistency: str | None) -> None:
        view = self.view
        slot = slot_of(key)
        owner = view.slots.owner(slot)
        if owner is None:
            raise Unavailable(f"slot {slot} has no owner yet (the cluster is forming)")
        if self.shard is None or owner != self.shard.id:
            raise self._to_writer_of(owner, f"slot {slot} is served by {owner}", slot=slot)
        if op in protocol.WRITE_OPS or consistency != "eventual":
            if self.role != WRITER:
                raise self.not_writer_error()
            if op in protocol.WRITE_OPS and self._frozen_until and time.monotonic() < self._frozen_until[1]:
                raise TryAgain(f"slot {slot} is being moved; retry shortly", slot=slot)
            return
        if self.role == REPLICA:  # an eventual read on a replica
            fresh = time.monotonic() - self.follower.last_contact < 2 * self.config.session_timeout
            if not fresh or self.follower.lag() > self.config.max_replica_lag:
                raise self.not_writer_error()

    def confirm_linearizable(self) -> None:
        if self.writer is None:
            raise self.not_writer_error()
        self.writer.confirm()

    # -- replication RPCs (this node as a replica) --------------------------------------------

    def _as_replica(self, handle: Any, *args: Any) -> list[Any]:
        if self.role == WRITER and self.writer is not None:
            # A writer takes no orders from another writer of its shard (one writer per epoch).
            return Reply(STALE_EPOCH, self.writer.epoch, self.log.last_lsn, self.log.last_epoch,
                         0, self.store.applied_lsn).to_wire()
        return handle(*args)

    def repl_prepare(self, wire: list[Any]) -> list[Any]:
        return self._as_replica(self.follower.prepare, wire)

    def repl_truncate(self, wire: list[Any]) -> list[Any]:
        return self._as_replica(self.follower.truncate, wire)

    def repl_fence(self, epoch: int) -> list[Any]:
        return self._as_replica(self.follower.fence, epoch)

    def repl_snapshot(self, *args: Any) -> list[Any]:
        return self._as_replica(self.follower.snapshot_chunk, *args)

    def repl_read(self, start: int, limit: int) -> list[list[Any]]:
        return self.follower.read(int(start), int(limit))

    # -- slot release (the controller spreading slots over an empty cluster) -----------------

    def release_slots(self, version: int) -> bool:
        """Grant the controller our slots if we never wrote anything; then refuse writes until
        the slot map reaches ``version`` (or a deadline passes)."""
        empty = self.log.last_lsn == 0 and self.store.applied_lsn == 0 and self.pipeline.queued == 0
        if self.role != WRITER or not empty:
            return False
        self._frozen_until = (version, time.monotonic() + 2 * self.config.session_timeout)
        return True

    def _release_on(self, node_id: str, version: int) -> bool:
        if node_id == self.config.node_id:
            return self.release_slots(version)
        addr = self.view.nodes.get(node_id)
        if addr is None:
            return False
        conn = Connection(addr, self.config.write_timeout)
        try:
            return bool(conn.request("repl_release", version))
        except (TransportError, DKVError):
            return False
        finally:
            conn.close()

    # -- introspection ---------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": "cluster", "role": self.role,
                               "shard": self.shard.id if self.shard else None,
                               "zk_connected": self.coord.connected,
                               "promised_epoch": self.follower.state.promised}
        if self.writer is not None:
            out["replication"] = self.writer.lag()
        elif self.role == REPLICA:
            out["replication"] = {"lag": self.follower.lag(), "commit_lsn": self.follower.state.commit_lsn}
        return out

    def cluster_info(self) -> dict[str, Any]:
        return self.view.info()
