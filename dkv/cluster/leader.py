"""The shard writer's replication driver: carries out :class:`~dkv.cluster.replication.Leader`'s effects.

It is the pipeline's :class:`~dkv.node.pipeline.BatchWriter` on a writer. Every
protocol decision (commit, rollback, definite or not, epoch bump, when a
replica joins) is the sans-I/O core's; this module feeds it events and executes
its effects: local appends (consecutive ones share one fsync) and the local
truncate run in one worker greenlet, in order, off the hub, and applies in
another (consecutive ones in one store batch); each ``Send``
is one prepare in its own greenlet (sends leave in emission order, so each
replica's stream stays ``prev_lsn``-chained); ``Commit``/``Fail`` answer the
handles the pipeline waits on, several batches being in flight.

Replicas that are behind get a catch-up greenlet each: committed records from
the WAL in chunks, a cut of a divergent tail, or a storage snapshot when the
WAL no longer holds what they need (or anti-entropy found the replica's store
diverged, see :mod:`dkv.cluster.antientropy`). The commit point reaches
replicas with the next prepare, or with a heartbeat once the writer is idle.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any, Callable, Sequence

import gevent
import gevent.event

from dkv.client.connection import Connection, TransportError
from dkv.cluster.antientropy import AntiEntropy
from dkv.cluster.replication import (
    BEYOND_EPOCH,
    DOWN,
    IN_SYNC,
    LOCAL,
    AppendLocal,
    CatchUp,
    Commit,
    CutTo,
    Deposed,
    Effect,
    Fail,
    Leader,
    Prepare,
    ReadConfirmation,
    Reply,
    Rollback,
    Send,
    SendFrom,
    SendSnapshot,
    Synced,
    Truncate,
    record_bytes,
)
from dkv.errors import DKVError, Unavailable, WriteTimeout
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
#: How often a waiting catch-up or write looks again while a rollback is under way (s).
POLL = 0.02


class ReplicatedWriter:
    def __init__(
        self,
        config: NodeConfig,
        shard_id: str,
        epoch: int,
        log: Any,
        store: Store,
        addr_of: Callable[[str], str | None],
        bump_epoch: Callable[[], int],
        is_current: Callable[[], bool],
    ) -> None:
        self.config = config
        self.shard_id = shard_id
        self.log = log
        self.store = store
        #: a replica's address (None: not registered)
        self.addr_of = addr_of
        self._bump_epoch = bump_epoch
        self._is_current = is_current
        self._offload = config.durable
        self.leader = Leader(
            epoch, log, config.write_quorum, commit_lsn=store.applied_lsn, write_timeout=config.write_timeout
        )
        self._conns: dict[str, Connection] = {}
        self._catchups: dict[str, gevent.Greenlet] = {}
        #: per batch in flight (by its last lsn): what its writer waits on
        self._handles: dict[int, gevent.event.AsyncResult] = {}
        self._log_jobs: deque[AppendLocal | Rollback] = deque()
        self._log_jobs_ready = gevent.event.Event()
        self._applies: deque[Commit] = deque()
        self._applies_ready = gevent.event.Event()
        #: set (and replaced) whenever a replica reaches sync
        self._synced = gevent.event.Event()
        self._notified_lsn = self.leader.commit_lsn
        self._notice: gevent.Greenlet | None = None
        self._wire: tuple[Prepare | None, list[Any]] = (None, [])
        self._confirm_next: gevent.event.AsyncResult | None = None
        self._confirming = False
        self._active = True
        self._greenlets = [gevent.spawn(g) for g in (self._heartbeat_loop, self._log_loop, self._apply_loop)]
        self.anti_entropy = AntiEntropy(self)
        if config.anti_entropy_interval > 0:
            self._greenlets.append(gevent.spawn(self.anti_entropy.run, config.anti_entropy_interval))
        if self.leader.tail_pending:
            self._greenlets.append(gevent.spawn(self._commit_tail))

    @property
    def epoch(self) -> int:
        return self.leader.epoch

    @property
    def ready(self) -> bool:
        """Our store holds every committed write: false until the log tail we took over (after a
        promotion or a restart) is committed, since the tail may hold acknowledged writes."""
        return not self.leader.tail_pending

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
                self._run(self.leader.mark_down(rid))
                self._drop_conn(rid)
            elif p.state == DOWN:
                self._lagging(rid)
            elif p.state != IN_SYNC:
                self._ensure_catchup(rid)

    def stop(self) -> None:
        self._active = False
        self._fail_handles(
            WriteTimeout(f"{self.shard_id}: the writer stopped with the write in flight; it may or may not survive")
        )
        gevent.killall([g for g in [*self._greenlets, self._notice, *self._catchups.values()] if g], block=False)
        for c in self._conns.values():
            c.close()
        self._conns.clear()

    # -- BatchWriter ------------------------------------------------------------------

    def check(self) -> None:
        """Refuse a write up front (definite) when it cannot reach a quorum now."""
        if not self._is_current():
            raise Unavailable(
                f"{self.config.node_id} cannot confirm it is the writer of {self.shard_id} "
                "(ZooKeeper connection or role lost)"
            )
        deadline = time.monotonic() + self.config.write_timeout
        while self.leader.rolling_back is not None and time.monotonic() < deadline:
            gevent.sleep(POLL)
        try:
            if self.leader.admit():  # a rollback happened: a new epoch first
                try:
                    self.leader.on_epoch_bumped(self._bump_epoch())
                except Exception as e:
                    raise Unavailable(f"cannot start a new epoch after a rollback: {e}") from e
            # Replicas that are alive but still catching up get a moment to join.
            if len(self.leader.in_sync()) < self.leader.needed <= len(self.leader.alive()):
                self._synced.wait(timeout=self.config.write_timeout)
            self.leader.check_quorum()
        except DKVError as e:
            raise type(e)(f"{self.shard_id}: {e}") from None

    def write(self, records: list[Record], tail: bool = False) -> gevent.event.AsyncResult:
        """Start replicating a stamped batch (``tail``: of our log tail); the result is set once it
        is committed and applied (or fails, definite or not)."""
        effects = self.leader.propose(records, time.monotonic(), tail)
        done = self._handles[records[-1].lsn] = gevent.event.AsyncResult()
        self._run(effects)
        gevent.spawn_later(self.config.write_timeout, self._tick)
        return done

    def _commit_tail(self) -> None:
        """After a restart: replicate and commit the records past our commit point (one
        page-bounded prepare at a time), then serve."""
        while self._active and self.leader.tail_pending:
            if len(self.leader.in_sync()) >= self.leader.needed:
                records = offloaded(self._offload, self._read_page, self.leader.commit_lsn + 1, None)
                try:
                    self.write(records, tail=True).get()
                    continue
                except DKVError as e:
                    logger.info("%s: log tail not committed yet: %s", self.shard_id, e)
            self._synced.wait(timeout=1.0)
        if self._active:
            logger.info("%s: committed the log tail up to lsn %d", self.shard_id, self.leader.commit_lsn)

    def _read_page(self, lsn: int, limit: int | None) -> list[Record]:
        """Log records from ``lsn``: at most ``limit``, and no more once they count ``page_bytes``."""
        return take_page(self.log.read_from(lsn, limit=limit), self.config.limits.page_bytes, record_bytes)

    # -- effects ---------------------------------------------------------------------------

    def _run(self, effects: Sequence[Effect]) -> None:
        """Carry out the core's effects, in order (none of them blocks this greenlet)."""
        for e in effects:
            if isinstance(e, Send):
                gevent.spawn(self._send, e)
            elif isinstance(e, Commit):
                self._applies.append(e)
                self._applies_ready.set()
            elif isinstance(e, (AppendLocal, Rollback)):
                self._log_jobs.append(e)
                self._log_jobs_ready.set()
                if isinstance(e, Rollback):
                    logger.warning("%s: rolling back the batches in flight after lsn %d", self.shard_id, e.after_lsn)
                    for rid in e.targets:
                        gevent.spawn(self._truncate, rid, e.after_lsn)
            elif isinstance(e, Fail):
                logger.warning("%s: batch(es) ending at lsn %s failed: %s", self.shard_id, list(e.lsns), e.error)
                for lsn in e.lsns:
                    h = self._handles.pop(lsn, None)
                    if h is not None:
                        h.set_exception(e.error)
            elif isinstance(e, CatchUp):
                self._ensure_catchup(e.rid)
            elif isinstance(e, Deposed):
                logger.warning(
                    "%s: a member promised epoch %d: this writer (epoch %d) is fenced",
                    self.shard_id,
                    e.epoch,
                    self.epoch,
                )

    def _log_loop(self) -> None:
        """The local log: appends (all those queued in one write and fsync) and truncates, in
        the order the core asked."""
        while True:
            while not self._log_jobs:
                self._log_jobs_ready.clear()
                self._log_jobs_ready.wait()
            job = self._log_jobs.popleft()
            if isinstance(job, AppendLocal):
                records = list(job.records)
                while self._log_jobs and isinstance(self._log_jobs[0], AppendLocal):
                    records += self._log_jobs.popleft().records  # type: ignore[union-attr]
                try:
                    offloaded(self._offload, self.log.append, records)
                except Exception as exc:
                    self._fail_handles(exc)
                    continue
                self._run(self.leader.on_appended(records[-1].lsn))
            else:
                try:
                    offloaded(self._offload, self.log.truncate_after, job.after_lsn)
                    ok = True
                except Exception:
                    logger.exception("%s: truncating the local log after lsn %d failed", self.shard_id, job.after_lsn)
                    ok = False
                self._run(self.leader.on_truncated(LOCAL, ok))

    def _apply_loop(self) -> None:
        """The store: committed records (all those queued in one batch), in commit order, beside
        the log's work; then their batches are answered."""
        while True:
            while not self._applies:
                self._applies_ready.clear()
                self._applies_ready.wait()
            commits = list(self._applies)
            self._applies.clear()
            try:
                offloaded(self._offload, self.store.apply, [r for c in commits for r in c.records])
            except Exception as exc:
                self._fail_handles(exc)
                continue
            self._answer(commits[-1].lsn)

    def _answer(self, lsn: int) -> None:
        """Batches up to ``lsn`` are committed and applied: answer them."""
        current = self._is_current()
        for last in sorted(k for k in self._handles if k <= lsn):
            h = self._handles.pop(last)
            if current:
                h.set(None)
            else:
                h.set_exception(
                    WriteTimeout(
                        "committed, but this writer lost ZooKeeper meanwhile: "
                        "the write may or may not survive a failover"
                    )
                )
        if self._notice is None or self._notice.dead:
            self._notice = gevent.spawn_later(COMMIT_NOTICE_DELAY, self._send_notice)

    def _fail_handles(self, exc: Exception) -> None:
        """Every batch in flight or committed but not answered yet gets ``exc`` (the writer stops,
        or the local log or store failed: the pipeline then stops taking writes)."""
        self.leader.fail_all(WriteTimeout(str(exc)))
        for h in self._handles.values():
            h.set_exception(exc)
        self._handles.clear()

    def _send(self, e: Send) -> None:
        if self._wire[0] is not e.message:  # encode a batch once for all its targets
            self._wire = (e.message, e.message.to_wire())
        reply = self._send_prepare(e.rid, self._wire[1])
        self._run(self.leader.on_prepare_reply(e.rid, e.gen, reply))

    def _truncate(self, rid: str, after: int) -> None:
        try:
            ok = self._call(rid, "repl_truncate", Truncate(self.epoch, after).to_wire()).ok
        except (TransportError, DKVError):
            ok = False
        self._run(self.leader.on_truncated(rid, ok))

    def _tick(self) -> None:
        self._run(self.leader.on_tick(time.monotonic()))

    # -- catch-up -----------------------------------------------------------------------

    def _lagging(self, rid: str) -> None:
        self._run(self.leader.mark_lagging(rid))

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
            if self.leader.rolling_back is not None:  # its truncate goes first
                gevent.sleep(POLL)
                continue
            try:
                if p.match_lsn is None:
                    self._probe(rid)
                    if self.leader.deposed:
                        return
                step = self.leader.catchup_step(rid)
                if step is None:
                    gevent.sleep(POLL)
                elif isinstance(step, Synced):
                    logger.info("%s: replica %s is in sync at lsn %s", self.shard_id, rid, p.match_lsn)
                    self._run(step.sends)
                    self._synced.set()
                    self._synced = gevent.event.Event()
                    return
                elif isinstance(step, SendFrom):
                    self._send_from(rid, step.lsn)
                elif isinstance(step, CutTo):
                    logger.info(
                        "%s: replica %s has a divergent tail; cutting it after lsn %d", self.shard_id, rid, step.lsn
                    )
                    self.leader.on_reply(
                        rid, self._call(rid, "repl_truncate", Truncate(self.epoch, step.lsn).to_wire())
                    )
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
        self._run(self.leader.resync(rid))

    def _send_snapshot(self, rid: str) -> None:
        snap = self.store.snapshot()
        try:
            lsn, epoch, rev = snap.applied_lsn, snap.applied_epoch, snap.applied_rev
            logger.info("%s: sending replica %s a snapshot at lsn %d", self.shard_id, rid, lsn)
            # A replica installs a snapshot only as far as we have shown it our log: a
            # heartbeat carrying the commit point (its reply may well be a gap: no matter).
            commit = self.leader.commit_lsn
            self.leader.on_reply(
                rid,
                self._call(rid, "repl_prepare", self.leader.prepare([], commit, self._epoch_at(commit)).to_wire()),
                position_only=True,
            )
            if self.leader.deposed:
                return
            pairs = snap.iter_slots(ALL_SLOTS)
            first = True
            while True:
                chunk = offloaded(
                    self._offload,
                    lambda: [
                        [k, v] for k, v in take_page(pairs, self.config.limits.page_bytes, pair_bytes, SNAPSHOT_CHUNK)
                    ],
                )
                done = not page_is_full(chunk, self.config.limits.page_bytes, pair_bytes, SNAPSHOT_CHUNK)
                reply = self._call(rid, "repl_snapshot", self.epoch, first, chunk, done, lsn, epoch, rev)
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
        if not self.leader.inflight and self.leader.commit_lsn > self._notified_lsn:
            self._notified_lsn = self.leader.commit_lsn
            self._heartbeat_round()

    def _heartbeat_loop(self) -> None:
        while self._active:
            gevent.sleep(HEARTBEAT_INTERVAL)
            if not self.leader.inflight:
                self._heartbeat_round()

    def _heartbeat_round(self) -> ReadConfirmation:
        """An empty prepare (carrying the commit point) to every in-sync replica; returns once
        ``write_quorum - 1`` accepted it or that can no longer happen, or after
        ``write_timeout`` (slower answers still update the replicas' progress). A replica
        that fails or refuses it goes back to catch-up."""
        targets = self.leader.in_sync()
        round_ = ReadConfirmation(self.epoch, self.leader.needed, targets)
        commit = self.leader.commit_lsn
        wire = self.leader.prepare([], commit, self._epoch_at(commit)).to_wire()
        sent = time.monotonic()
        done = gevent.event.Event()

        def send(rid: str) -> None:
            reply = self._send_prepare(rid, wire)
            if reply is None or not reply.ok:
                if reply is not None:
                    self.leader.on_reply(rid, reply)
                self._lagging(rid)
            round_.on_reply(rid, reply)
            if round_.settled:
                done.set()

        for rid in targets:
            gevent.spawn(send, rid)
        if not round_.settled:
            done.wait(timeout=self.config.write_timeout)
        if round_.confirmed:
            self.leader.renew_lease(sent)
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
        return self.leader.needed == 0 or time.monotonic() - self.leader.lease_from < self.config.session_timeout / 3

    def _send_prepare(self, rid: str, wire: list[Any]) -> Reply | None:
        """One prepare to a replica (None: no answer)."""
        try:
            return self._call(rid, "repl_prepare", wire)
        except (TransportError, DKVError) as e:
            logger.info("%s: prepare to %s failed: %s", self.shard_id, rid, e)
            return None

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
            raise Unavailable(
                f"{self.config.node_id} cannot confirm it is the writer of {self.shard_id} "
                "(ZooKeeper connection or role lost)"
            )
        if round_ is not None and not round_.confirmed:
            raise Unavailable(
                f"{self.shard_id}: {len(round_.accepted)} of {round_.needed} replica(s) "
                "confirmed the writer's epoch for a linearizable read"
            )

    def lag(self) -> dict[str, Any]:
        return {
            "commit_lsn": self.leader.commit_lsn,
            "epoch": self.epoch,
            "replicas": self.leader.lag(),
            "anti_entropy": self.anti_entropy.stats(),
        }

    # -- plumbing -------------------------------------------------------------------------

    def _epoch_at(self, lsn: int) -> int:
        return (self.log.epochs.epoch_at(lsn) or 0) if lsn > 0 else 0

    def _conn(self, rid: str) -> Connection:
        addr = self.addr_of(rid)
        if addr is None:
            raise TransportError(f"replica {rid} is not registered")
        c = self._conns.get(rid)
        if c is None or c.addr != addr:
            c = self._conns[rid] = Connection(
                addr, self.config.write_timeout, max_inflight=8, auth=self.config.credentials
            )
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
