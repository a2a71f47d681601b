"""The shard writer's replication driver: the I/O around :class:`~dkv.cluster.replication.Leader`.

It is the pipeline's :class:`~dkv.node.pipeline.BatchWriter` on a writer. For
each batch it appends locally (threadpool) while sending one ``prepare`` to
every in-sync replica, in parallel; once the local copy and
``write_quorum - 1`` replica acks are in, the batch is committed: applied and
answered. If the quorum is not reached within ``write_timeout`` it rolls back
(DESIGN §4.5): truncates its own tail, asks every replica that got the prepare
to truncate, answers a *definite* ``QuorumNotReached`` only if they all
confirmed (else ``WriteTimeout``), and bumps the epoch before writing again.

Replicas that are behind get a catch-up greenlet each: committed records from
the WAL in chunks, a cut of a divergent tail, or a storage snapshot when the
WAL no longer holds what they need (or anti-entropy found the replica's store
diverged, see :mod:`dkv.cluster.antientropy`). The commit point reaches
replicas with the next prepare, or with a heartbeat once the writer is idle.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

import gevent
import gevent.event

from dkv.client.connection import Connection, TransportError
from dkv.cluster.antientropy import AntiEntropy
from dkv.cluster.follower import apply_log
from dkv.cluster.replication import (BEYOND_EPOCH, DOWN, IN_SYNC, CutTo, Leader, Prepare, ReadConfirmation, Reply,
                                     SendFrom, SendSnapshot, Synced, Truncate, record_bytes)
from dkv.errors import DKVError, QuorumNotReached, Unavailable, WriteTimeout
from dkv.keys import page_is_full, pair_bytes, take_page
from dkv.node.config import NodeConfig
from dkv.node.pipeline import offloaded
from dkv.slots import ALL_SLOTS
from dkv.storage import Store
from dkv.wal.record import Record

logger = logging.getLogger(__name__)

#: Records per catch-up prepare, pairs per snapshot chunk (both also bounded by ``page_bytes``).
CATCHUP_CHUNK = 2000
SNAPSHOT_CHUNK = 2000
#: An idle writer tells replicas the commit point after this long (s).
COMMIT_NOTICE_DELAY = 0.02
HEARTBEAT_INTERVAL = 1.0


class ReplicatedWriter:
    def __init__(self, config: NodeConfig, shard_id: str, epoch: int, log: Any, store: Store,
                 addr_of: Callable[[str], str | None], bump_epoch: Callable[[], int],
                 is_current: Callable[[], bool]) -> None:
        self.config = config
        self.shard_id = shard_id
        self.log = log
        self.store = store
        #: a replica's address (None: not registered)
        self.addr_of = addr_of
        self._bump_epoch = bump_epoch
        self._is_current = is_current
        self._offload = config.durable
        self.leader = Leader(epoch, log, config.write_quorum, commit_lsn=store.applied_lsn)
        self._conns: dict[str, Connection] = {}
        self._catchups: dict[str, gevent.Greenlet] = {}
        self._busy = False
        self._idle = gevent.event.Event()
        self._idle.set()
        #: set (and replaced) whenever a replica reaches sync
        self._synced = gevent.event.Event()
        self._need_bump = False
        self._notified_lsn = self.leader.commit_lsn
        self._notice: gevent.Greenlet | None = None
        self._confirm_next: gevent.event.AsyncResult | None = None
        #: monotonic send time of the latest round a write quorum accepted (see has_lease)
        self._lease_from = 0.0
        self._confirming = False
        self._active = True
        self._greenlets = [gevent.spawn(self._heartbeat_loop)]
        self.anti_entropy = AntiEntropy(self)
        if config.anti_entropy_interval > 0:
            self._greenlets.append(gevent.spawn(self.anti_entropy.run, config.anti_entropy_interval))
        #: records past the commit point after a restart: committed before any new write
        self._tail_pending = log.last_lsn > self.leader.commit_lsn
        if self._tail_pending:
            self._greenlets.append(gevent.spawn(self._commit_tail))

    @property
    def epoch(self) -> int:
        return self.leader.epoch

    @property
    def ready(self) -> bool:
        """Our store holds every committed write: false until the log tail we took over (after a
        promotion or a restart) is committed, since the tail may hold acknowledged writes."""
        return not self._tail_pending

    # -- membership --------------------------------------------------------------

    def set_replicas(self, replicas: list[str], live: set[str], slot_version: int = -1) -> None:
        """Follow the shard's replica list, which of them are registered (alive), and the
        slot map's version (every prepare carries it)."""
        self.leader.slot_version = max(self.leader.slot_version, slot_version)
        self.leader.set_replicas(replicas)
        for rid in replicas:
            p = self.leader.replicas[rid]
            if rid not in live:
                if p.state != DOWN:
                    logger.info("%s: replica %s is down", self.shard_id, rid)
                self.leader.mark_down(rid)
                self._drop_conn(rid)
            elif p.state == DOWN:
                self._lagging(rid)
            elif p.state != IN_SYNC:
                self._ensure_catchup(rid)

    def stop(self) -> None:
        self._active = False
        gevent.killall([g for g in [*self._greenlets, self._notice, *self._catchups.values()] if g],
                       block=False)
        for c in self._conns.values():
            c.close()
        self._conns.clear()

    # -- BatchWriter ------------------------------------------------------------------

    def check(self) -> None:
        """Refuse a write up front (definite) when it cannot reach a quorum now."""
        if not self._is_current():
            raise Unavailable(f"{self.config.node_id} cannot confirm it is the writer of {self.shard_id} "
                              "(ZooKeeper connection or role lost)")
        if self.leader.deposed:
            raise Unavailable(f"{self.shard_id} has a newer epoch {self.leader.deposed_by}; this writer is fenced")
        if self._tail_pending:
            raise Unavailable(f"{self.shard_id}: the writer is committing its log tail after a restart")
        if self._need_bump:
            try:
                self.leader.epoch = self._bump_epoch()
                self._need_bump = False
            except Exception as e:
                raise Unavailable(f"cannot start a new epoch after a rollback: {e}") from e
        # Replicas that are alive but still catching up get a moment to join.
        if len(self.leader.in_sync()) < self.leader.needed <= len(self.leader.alive()):
            self._synced.wait(timeout=self.config.write_timeout)
        n = len(self.leader.in_sync())
        if n < self.leader.needed:
            raise QuorumNotReached(f"{self.shard_id}: {n} replica(s) in sync, {self.leader.needed} "
                                   "needed; nothing was written")

    def write(self, records: list[Record]) -> None:
        self._busy = True
        self._idle.clear()
        try:
            prev = records[0].lsn - 1
            m = self.leader.prepare(records, prev, self._epoch_at(prev))
            targets = self.leader.in_sync()
            local = gevent.spawn(offloaded, self._offload, self.log.append, records)
            sent = time.monotonic()
            acked = self._replicate(m, targets, local)
            if len(acked) >= self.leader.needed:
                self._lease_from = max(self._lease_from, sent)
            if not local.successful():
                raise local.exception  # type: ignore[misc]  # the pipeline's log-failure path
            if len(acked) < self.leader.needed:
                self._rollback(m, targets, acked)
            self._commit(records[-1].lsn, records)
            if not self._is_current():
                raise WriteTimeout("committed, but this writer lost ZooKeeper meanwhile: "
                                   "the write may or may not survive a failover")
        finally:
            self._busy = False
            self._idle.set()

    def _commit(self, lsn: int, records: list[Record] | None = None) -> None:
        self.leader.commit_lsn = lsn
        if records is not None:
            offloaded(self._offload, self.store.apply, records)
        else:
            offloaded(self._offload, apply_log, self.log, self.store, lsn)
        if self._notice is None or self._notice.dead:
            self._notice = gevent.spawn_later(COMMIT_NOTICE_DELAY, self._send_notice)

    def _replicate(self, m: Prepare, targets: list[str], local: gevent.Greenlet | None) -> set[str]:
        """Send ``m`` to ``targets``; return who acked once the local append and a quorum
        are in, everyone answered, or ``write_timeout`` passed."""
        last = m.records[-1].lsn
        acked: set[str] = set()
        answered: set[str] = set()

        def on_reply(rid: str, reply: Reply | None) -> None:
            if reply is not None and reply.ok:
                self.leader.on_reply(rid, reply)
                if reply.match_lsn >= last:
                    acked.add(rid)
                else:
                    self._lagging(rid)
            answered.add(rid)

        def settled() -> bool:
            return ((local is None or local.ready())
                    and (len(acked) >= self.leader.needed or len(answered) == len(targets)))

        senders = self._fanout(m.to_wire(), targets, on_reply, settled, local)
        if local is not None:
            local.join()
        if len(acked) < self.leader.needed:
            gevent.killall(senders, block=False)
        return acked

    def _fanout(self, wire: list[Any], targets: list[str], on_reply: Callable[[str, Reply | None], None],
                settled: Callable[[], bool], local: gevent.Greenlet | None = None) -> list[gevent.Greenlet]:
        """Send the prepare ``wire`` (encoded once) to every target in parallel, feeding each
        answer to ``on_reply`` (None: no answer); return the senders once ``settled()`` (also
        checked when ``local`` finishes) or after ``write_timeout``. Slower senders run on."""
        done = gevent.event.Event()

        def check(_: Any = None) -> None:
            if settled():
                done.set()

        def send(rid: str) -> None:
            on_reply(rid, self._send_prepare(rid, wire))
            check()

        if local is not None:
            local.link(check)
        senders = [gevent.spawn(send, rid) for rid in targets]
        check()
        done.wait(timeout=self.config.write_timeout)
        return senders

    def _rollback(self, m: Prepare, targets: list[str], acked: set[str]) -> None:
        """The quorum was not reached: undo the batch everywhere it may be, then raise."""
        offloaded(self._offload, self.log.truncate_after, m.prev_lsn)
        confirmed = True
        for rid in targets:  # uncommitted records reach replicas only through prepares
            try:
                reply = self._call(rid, "repl_truncate", Truncate(self.epoch, m.prev_lsn).to_wire())
                confirmed = confirmed and reply.ok
            except (TransportError, DKVError):
                confirmed = False
            self._lagging(rid)
        self._need_bump = True  # never reuse an lsn with other content inside one epoch
        what = (f"{self.shard_id}: {len(acked)} of {self.leader.needed} replica acks within "
                f"{self.config.write_timeout:g}s")
        logger.warning("%s; batch %d..%d rolled back (%s)", what, m.records[0].lsn, m.records[-1].lsn,
                       "definite" if confirmed else "indeterminate")
        if confirmed:
            raise QuorumNotReached(f"{what}; the write was not applied")
        raise WriteTimeout(f"{what}; a replica that did not answer may still hold it")

    def _commit_tail(self) -> None:
        """After a restart: replicate and commit the records past our commit point (one
        page-bounded prepare at a time), then serve."""
        while self._active:
            if len(self.leader.in_sync()) >= self.leader.needed:
                records = offloaded(self._offload, self._read_page, self.leader.commit_lsn + 1, None)
                prev = records[0].lsn - 1
                m = self.leader.prepare(records, prev, self._epoch_at(prev))
                if len(self._replicate(m, self.leader.in_sync(), None)) >= self.leader.needed:
                    self._commit(records[-1].lsn)
                    if records[-1].lsn >= self.log.last_lsn:
                        self._tail_pending = False
                        logger.info("%s: committed the log tail up to lsn %d", self.shard_id, records[-1].lsn)
                        return
                    continue
            self._synced.wait(timeout=1.0)

    def _read_page(self, lsn: int, limit: int | None) -> list[Record]:
        """Log records from ``lsn``: at most ``limit``, and no more once they count ``page_bytes``."""
        return take_page(self.log.read_from(lsn, limit=limit), self.config.limits.page_bytes, record_bytes)

    # -- catch-up -----------------------------------------------------------------------

    def _lagging(self, rid: str) -> None:
        self.leader.mark_lagging(rid)
        self._ensure_catchup(rid)

    def _ensure_catchup(self, rid: str) -> None:
        g = self._catchups.get(rid)
        if self._active and (g is None or g.dead):
            self._catchups[rid] = gevent.spawn(self._catchup, rid)

    def _catchup(self, rid: str) -> None:
        backoff = 0.05
        while self._active and rid in self.leader.replicas:
            p = self.leader.replicas[rid]
            if p.state in (IN_SYNC, DOWN):
                return
            try:
                if p.match_lsn is None:
                    self._probe(rid)
                    if self.leader.deposed:
                        return
                step = self.leader.catchup_step(rid, self._busy)
                if step is None:
                    self._idle.wait()
                elif isinstance(step, Synced):
                    logger.info("%s: replica %s is in sync at lsn %s", self.shard_id, rid, p.match_lsn)
                    self._synced.set()
                    self._synced = gevent.event.Event()
                    return
                elif isinstance(step, SendFrom):
                    self._send_from(rid, step.lsn)
                elif isinstance(step, CutTo):
                    logger.info("%s: replica %s has a divergent tail; cutting it after lsn %d",
                                self.shard_id, rid, step.lsn)
                    self.leader.on_reply(rid, self._call(rid, "repl_truncate",
                                                         Truncate(self.epoch, step.lsn).to_wire()))
                elif isinstance(step, SendSnapshot):
                    self._send_snapshot(rid)
                backoff = 0.05
            except (TransportError, DKVError) as e:
                logger.debug("%s: catch-up of %s: %s", self.shard_id, rid, e)
                p.match_lsn = None
                gevent.sleep(backoff)
                backoff = min(backoff * 2, 1.0)

    def _probe(self, rid: str) -> None:
        """Learn the member's log position (a fence at our own epoch)."""
        self.leader.on_reply(rid, self._call(rid, "repl_fence", self.epoch), position_only=True)

    def _send_from(self, rid: str, lsn: int) -> None:
        upto = self.leader.commit_lsn
        try:
            records = offloaded(self._offload, self._read_page, lsn, min(CATCHUP_CHUNK, upto - lsn + 1))
        except ValueError as e:  # compacted since the step was chosen: probe again, then a snapshot
            raise Unavailable(f"{self.shard_id}: catch-up of {rid}: {e}") from None
        m = self.leader.prepare(records, lsn - 1, self._epoch_at(lsn - 1))
        self.leader.on_reply(rid, self._call(rid, "repl_prepare", m.to_wire()))

    def resync(self, rid: str) -> None:
        """Re-sync a replica from a snapshot (anti-entropy found its store diverged)."""
        self.leader.resync(rid)
        self._ensure_catchup(rid)

    def _send_snapshot(self, rid: str) -> None:
        snap = self.store.snapshot()
        try:
            lsn, epoch = snap.applied_lsn, snap.applied_epoch
            logger.info("%s: sending replica %s a snapshot at lsn %d", self.shard_id, rid, lsn)
            # A replica installs a snapshot only as far as we have shown it our log: a
            # heartbeat carrying the commit point (its reply may well be a gap: no matter).
            commit = self.leader.commit_lsn
            self.leader.on_reply(rid, self._call(rid, "repl_prepare",
                                                 self.leader.prepare([], commit, self._epoch_at(commit)).to_wire()),
                                 position_only=True)
            if self.leader.deposed:
                return
            pairs = snap.iter_slots(ALL_SLOTS)
            first = True
            while True:
                chunk = offloaded(self._offload, lambda: [[k, v] for k, v in take_page(
                    pairs, self.config.limits.page_bytes, pair_bytes, SNAPSHOT_CHUNK)])
                done = not page_is_full(chunk, self.config.limits.page_bytes, pair_bytes, SNAPSHOT_CHUNK)
                reply = self._call(rid, "repl_snapshot", self.epoch, first, chunk, done, lsn, epoch)
                first = False
                if done or not reply.ok:
                    self.leader.on_reply(rid, reply)
                    if done and reply.ok:
                        self.leader.snapshot_installed(rid)
                    return
        finally:
            snap.close()

    # -- commit notices, heartbeats, read confirmation --------------------------------------

    def _send_notice(self) -> None:
        if not self._busy and self.leader.commit_lsn > self._notified_lsn:
            self._notified_lsn = self.leader.commit_lsn
            self._heartbeat_round()

    def _heartbeat_loop(self) -> None:
        while self._active:
            gevent.sleep(HEARTBEAT_INTERVAL)
            if not self._busy:
                self._heartbeat_round()

    def _heartbeat_round(self) -> ReadConfirmation:
        """An empty prepare (carrying the commit point) to every in-sync replica; returns once
        ``write_quorum - 1`` accepted it or that can no longer happen (slower answers still
        update the replicas' progress)."""
        targets = self.leader.in_sync()
        round_ = ReadConfirmation(self.epoch, self.leader.needed, targets)
        commit = self.leader.commit_lsn
        wire = self.leader.prepare([], commit, self._epoch_at(commit)).to_wire()
        sent = time.monotonic()
        self._fanout(wire, targets, round_.on_reply, lambda: round_.settled)
        if round_.confirmed:
            self._lease_from = max(self._lease_from, sent)
        return round_

    def has_lease(self) -> bool:
        """May a sequential read be answered without a confirmation round?

        Yes while a write quorum accepted something we sent less than a third of the
        session timeout ago (with ZooKeeper connected): no newer writer can have been
        promoted since, as that needs our session to expire first. The clock is
        monotonic, so a writer that was paused (SIGSTOP, a VM freeze) finds its lease
        expired on waking, and confirms its epoch before it answers from its store.
        """
        if not self._is_current():
            return False
        return self.leader.needed == 0 or time.monotonic() - self._lease_from < self.config.session_timeout / 3

    def _send_prepare(self, rid: str, wire: list[Any]) -> Reply | None:
        """One prepare to a replica (None: no answer). A failed or refused prepare
        sends the replica back to catch-up."""
        try:
            reply = self._call(rid, "repl_prepare", wire)
        except (TransportError, DKVError) as e:
            logger.info("%s: prepare to %s failed: %s", self.shard_id, rid, e)
            self._lagging(rid)
            return None
        if not reply.ok:
            self.leader.on_reply(rid, reply)
            self._lagging(rid)
        return reply

    def confirm(self) -> None:
        """Linearizable reads: confirm with ``write_quorum - 1`` replicas that our epoch is current.

        Concurrent callers share one round that starts after they asked.
        """
        if self._confirm_next is None:
            self._confirm_next = gevent.event.AsyncResult()
        waiter = self._confirm_next
        if not self._confirming:
            gevent.spawn(self._confirm_rounds)
        waiter.get()

    def _confirm_rounds(self) -> None:
        self._confirming = True
        try:
            while self._confirm_next is not None:
                waiter, self._confirm_next = self._confirm_next, None
                try:
                    self._confirm_round()
                    waiter.set(True)
                except Unavailable as e:
                    waiter.set_exception(e)
        finally:
            self._confirming = False

    def _confirm_round(self) -> None:
        """One confirmation of our epoch (see :class:`ReadConfirmation`), or Unavailable."""
        round_ = None
        if self._is_current() and not self.leader.deposed and self.leader.needed > 0:
            round_ = self._heartbeat_round()
        deposed = self.leader.deposed_by if self.leader.deposed else round_.deposed_by if round_ else None
        if deposed is not None:
            raise Unavailable(f"{self.shard_id} has a newer epoch {deposed}; this writer is fenced")
        if not self._is_current():
            raise Unavailable(f"{self.config.node_id} cannot confirm it is the writer of {self.shard_id} "
                              "(ZooKeeper connection or role lost)")
        if round_ is not None and not round_.confirmed:
            raise Unavailable(f"{self.shard_id}: {len(round_.accepted)} of {round_.needed} replica(s) "
                              "confirmed the writer's epoch for a linearizable read")

    def lag(self) -> dict[str, Any]:
        return {"commit_lsn": self.leader.commit_lsn, "epoch": self.epoch, "replicas": self.leader.lag(),
                "anti_entropy": self.anti_entropy.stats()}

    # -- plumbing -------------------------------------------------------------------------

    def _epoch_at(self, lsn: int) -> int:
        return (self.log.epochs.epoch_at(lsn) or 0) if lsn > 0 else 0

    def _conn(self, rid: str) -> Connection:
        addr = self.addr_of(rid)
        if addr is None:
            raise TransportError(f"replica {rid} is not registered")
        c = self._conns.get(rid)
        if c is None or c.addr != addr:
            c = self._conns[rid] = Connection(addr, self.config.write_timeout, max_inflight=8,
                                                   auth=self.config.credentials)
        return c

    def _drop_conn(self, rid: str) -> None:
        c = self._conns.pop(rid, None)
        if c is not None:
            c.close()

    def _call(self, rid: str, method: str, *args: Any) -> Reply:
        reply = Reply.from_wire(self._conn(rid).request(method, *args))
        if reply.reason == BEYOND_EPOCH:  # ZooKeeper could not confirm our epoch to it (yet)
            raise Unavailable(f"{rid} does not see epoch {self.epoch} recorded in ZooKeeper")
        return reply
