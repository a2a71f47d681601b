"""The replica side's I/O adapter: runs :class:`~dkv.cluster.replication.Follower` on real files.

Writer messages arrive as zerorpc calls (one greenlet each); they are handled
one at a time, in arrival order, and each message's actions (promise, truncate,
append, apply) are executed in gevent's threadpool, in order, before the reply
goes back. Prepares that queue up behind one being handled (a pipelining writer
sends several) and chain on one another (same epoch, each one's ``prev_lsn`` the
last record of the one before) are decided and appended as one: one write, one
fsync; each gets the reply it would have got alone.
Snapshots (when the writer's WAL no longer holds what this member needs) are
installed chunk by chunk: the first chunk clears the store, the last sets the
applied LSN and restarts the log after it.

A message whose epoch is above the one ZooKeeper records for the shard, as far
as the follower knows, makes the driver read the record on demand
(``recorded_epoch``; at most one read in flight) before deciding: a newly
promoted writer's first fence or prepare can beat this node's watch. Refusals
that only a forged or confused sender earns are logged with a bounded quote.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import replace
from functools import partial
from typing import Any, Callable, Sequence

import gevent
import gevent.event
import gevent.lock

from dkv.cluster.replication import (
    BEYOND_EPOCH,
    BEYOND_LOG,
    Action,
    AppendLog,
    ApplyUpTo,
    DigestRequest,
    Follower,
    PersistPromise,
    Prepare,
    Reply,
    Truncate,
    TruncateLog,
    record_bytes,
    records_to_wire,
)
from dkv.errors import Unavailable
from dkv.keys import DEFAULT_PAGE_BYTES, quote, take_page
from dkv.node.pipeline import checkpoint
from dkv.storage import Store
from dkv.wal.record import Record

logger = logging.getLogger(__name__)

#: Records applied per store batch when catching up the store from the log.
APPLY_CHUNK = 5000
#: Least seconds between two log lines about refused messages (per reason).
REFUSAL_LOG_INTERVAL = 1.0
#: Most queued prepares appended as one.
MAX_COALESCED = 32


class PromiseFile:
    """The highest epoch this member promised, kept durably (fencing survives restarts)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.epoch = 0
        if path and os.path.exists(path):
            with open(path) as f:
                self.epoch = int(f.read().strip() or 0)

    def save(self, epoch: int) -> None:
        self.epoch = epoch
        if not self.path:
            return
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(epoch))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dfd = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def apply_actions(
    actions: Sequence[Action], log: Any, store: Store, promise: PromiseFile, unapplied: deque[Record] | None = None
) -> None:
    """Execute a follower's actions in order (synchronous: call it off the hub).

    ``unapplied`` holds the records appended but not applied yet, so applying
    takes them from memory instead of reading the log back.
    """
    buf: deque[Record] = deque() if unapplied is None else unapplied
    for a in actions:
        if isinstance(a, PersistPromise):
            promise.save(a.epoch)
        elif isinstance(a, TruncateLog):
            log.truncate_after(a.after_lsn)
            while buf and buf[-1].lsn > a.after_lsn:
                buf.pop()
        elif isinstance(a, AppendLog):
            log.append(a.records)
            buf.extend(a.records)
        elif isinstance(a, ApplyUpTo):
            while buf and buf[0].lsn <= store.applied_lsn:
                buf.popleft()
            if buf and buf[0].lsn == store.applied_lsn + 1:
                chunk = []
                while buf and buf[0].lsn <= a.lsn:
                    chunk.append(buf.popleft())
                store.apply(chunk)
            apply_log(log, store, a.lsn)  # whatever memory did not cover (after a restart)


def chains(a: Prepare, b: Prepare) -> bool:
    """Does ``b`` continue ``a`` exactly (same epoch, ``b``'s prev is ``a``'s last record)?"""
    return (
        bool(a.records)
        and bool(b.records)
        and a.epoch == b.epoch
        and (b.prev_lsn, b.prev_epoch) == (a.records[-1].lsn, a.records[-1].epoch)
    )


def coalesce(ms: Sequence[Prepare]) -> Prepare:
    """One prepare equivalent to the chaining ``ms`` handled in order."""
    if len(ms) == 1:
        return ms[0]
    return Prepare(
        ms[0].epoch,
        ms[0].prev_lsn,
        ms[0].prev_epoch,
        tuple(r for m in ms for r in m.records),
        max(m.commit_lsn for m in ms),
        max(m.slot_version for m in ms),
    )


def apply_log(log: Any, store: Store, up_to: int) -> None:
    """Apply the log's records after the store's applied LSN, up to ``up_to``."""
    while store.applied_lsn < up_to:
        chunk = list(log.read_from(store.applied_lsn + 1, limit=min(APPLY_CHUNK, up_to - store.applied_lsn)))
        if not chunk:
            raise RuntimeError(f"log ends at {log.last_lsn}; cannot apply up to {up_to}")
        store.apply(chunk)


class FollowerDriver:
    """Serialises a shard writer's messages to this replica and executes them.

    ``max_epoch``: the epoch ZooKeeper records for our shard as known so far (None:
    unbounded); ``recorded_epoch`` reads it from ZooKeeper now (None if it cannot).
    """

    def __init__(
        self,
        log: Any,
        store: Store,
        promise: PromiseFile,
        offload: bool = True,
        page_bytes: int = DEFAULT_PAGE_BYTES,
        max_epoch: int | None = None,
        recorded_epoch: Callable[[], int | None] | None = None,
    ) -> None:
        self.log = log
        self.page_bytes = page_bytes
        self.store = store
        self.promise = promise
        self.offload = offload
        self.state = Follower(log, promised=promise.epoch, applied_lsn=store.applied_lsn, max_epoch=max_epoch)
        self._recorded_epoch = recorded_epoch
        self._lookup: gevent.Greenlet | None = None
        self._unapplied: deque[Record] = deque()
        self._lock = gevent.lock.Semaphore()
        #: prepares waiting to be handled, in arrival order (see :meth:`prepare`)
        self._prepares: deque[tuple[Prepare, list[Any], gevent.event.AsyncResult]] = deque()
        self._draining = False
        #: monotonic time of the last message from a writer in the current epoch
        self.last_contact = 0.0
        #: per refusal reason: when it was last logged, and how many went unlogged since
        self._refusals: dict[str, tuple[float, int]] = {}

    def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return gevent.get_hub().threadpool.apply(fn, args) if self.offload else fn(*args)

    def _check_recorded(self, epoch: int) -> None:
        """If ``epoch`` is above what we know ZooKeeper records, read the record now (one read
        in flight, shared): our watch may not have shown a promotion or epoch bump yet."""
        if self._recorded_epoch is None or not self.state.beyond(epoch):
            return
        if self._lookup is None or self._lookup.ready():
            self._lookup = gevent.spawn(self._recorded_epoch)
        lookup = self._lookup
        lookup.join()
        if lookup.successful() and lookup.value is not None:
            self.state.learn_max_epoch(lookup.value)

    def _handle(
        self,
        epoch: int,
        decide: Callable[[], tuple[Reply, list[Action]]],
        what: str,
        quoted: Any,
        inside: Callable[[Reply], Any] | None = None,
    ) -> tuple[Reply, Any]:
        """Decide and execute one message; ``inside(reply)`` runs before the next message is
        handled (e.g. to take a store snapshot at exactly this point)."""
        self._check_recorded(epoch)
        with self._lock:
            reply, extra = self._execute(decide, inside)
        self._log_refusal(reply, what, quoted)
        return reply, extra

    def _execute(
        self, decide: Callable[[], tuple[Reply, list[Action]]], inside: Callable[[Reply], Any] | None = None
    ) -> tuple[Reply, Any]:
        """Decide and execute one message (holding the lock)."""
        reply, actions = decide()
        if actions:
            self._run(apply_actions, actions, self.log, self.store, self.promise, self._unapplied)
            checkpoint(self.log, self.store, self.offload)
        if reply.ok:
            self.last_contact = time.monotonic()
        return reply, inside(reply) if inside is not None else None

    def _log_refusal(self, reply: Reply, what: str, quoted: Any) -> None:
        """Log a refusal only a forged or confused sender earns, at most once a second per reason
        (INFO while this node has not read its shard's record yet: e.g. a writer's prepares
        reaching a node just restarted)."""
        if reply.reason not in (BEYOND_EPOCH, BEYOND_LOG):
            return
        now, (last, unlogged) = time.monotonic(), self._refusals.get(reply.reason, (-REFUSAL_LOG_INTERVAL, 0))
        if now - last < REFUSAL_LOG_INTERVAL:
            self._refusals[reply.reason] = (last, unlogged + 1)
            return
        self._refusals[reply.reason] = (now, 0)
        more = f" (and {unlogged} more refused since)" if unlogged else ""
        level = logging.WARNING if self.state.max_epoch else logging.INFO
        logger.log(
            level,
            "refused %s (%s; the highest epoch seen recorded in ZooKeeper is %s, the writer "
            "of epoch %d showed lsn %d): %s%s",
            what,
            reply.reason,
            self.state.max_epoch,
            self.state.promised,
            self.state.shown_lsn,
            quote(quoted),
            more,
        )

    def prepare(self, wire: list[Any]) -> list[Any]:
        """Queue the prepare; the first greenlet to find no one handling the queue handles it
        (chaining prepares coalesced, see :func:`coalesce`) until it is empty."""
        m = Prepare.from_wire(wire)
        self._check_recorded(m.epoch)
        mine = gevent.event.AsyncResult()
        self._prepares.append((m, wire, mine))
        if not self._draining:
            self._draining = True
            group: list[tuple[Prepare, list[Any], gevent.event.AsyncResult]] = []
            try:
                while self._prepares:
                    group = [self._prepares.popleft()]
                    while self._prepares and len(group) < MAX_COALESCED and chains(group[-1][0], self._prepares[0][0]):
                        group.append(self._prepares.popleft())
                    merged = coalesce([g[0] for g in group])
                    with self._lock:
                        reply, _ = self._execute(partial(self.state.on_prepare, merged))
                    self._log_refusal(reply, "a prepare", group[0][1])
                    for one, _, done in group:
                        done.set(
                            reply if not reply.ok or not one.records else replace(reply, match_lsn=one.records[-1].lsn)
                        )
            except BaseException as e:  # every unanswered one gets it (the queue stays usable)
                for _, _, done in [*group, *self._prepares]:
                    if not done.ready():
                        done.set_exception(e)
                self._prepares.clear()
                raise
            finally:
                self._draining = False
        return mine.get().to_wire()

    def truncate(self, wire: list[Any]) -> list[Any]:
        m = Truncate.from_wire(wire)
        return self._handle(m.epoch, lambda: self.state.on_truncate(m), "a truncate", wire)[0].to_wire()

    def fence(self, epoch: int) -> list[Any]:
        e = int(epoch)
        return self._handle(e, lambda: self.state.on_fence(e), "a fence", epoch)[0].to_wire()

    def digest(self, wire: list[Any]) -> list[Any]:
        """Anti-entropy: ``[reply, sha256 | None]``; the digest of the whole store at exactly the
        asked lsn (snapshotted before any other message is handled, hashed off the hub)."""
        m = DigestRequest.from_wire(wire)
        reply, snap = self._handle(
            m.epoch,
            lambda: self.state.on_digest(m),
            "a digest request",
            wire,
            inside=lambda r: self.store.snapshot() if r.ok else None,
        )
        if snap is None:
            return [reply.to_wire(), None]
        try:
            return [reply.to_wire(), self._run(snap.digest)]
        finally:
            snap.close()

    def snapshot_chunk(
        self, epoch: int, first: bool, pairs: list[list[bytes]], done: bool, lsn: int, last_epoch: int, rev: int = 0
    ) -> list[Any]:
        """Install one chunk of the writer's storage snapshot taken at ``lsn``."""
        epoch, lsn = int(epoch), int(lsn)
        self._check_recorded(epoch)
        with self._lock:
            refusal = self.state.on_snapshot(epoch, lsn)
            if refusal is None:
                self._run(self._install, first, pairs, done, lsn, last_epoch, rev)
                if done:
                    self.state.snapshot_installed(lsn)
                    logger.info("installed a snapshot at lsn %d", lsn)
                self.last_contact = time.monotonic()
        if refusal is not None:
            self._log_refusal(refusal, "a snapshot chunk", [epoch, first, pairs, done, lsn, last_epoch])
            return refusal.to_wire()
        return Reply(
            "",
            self.state.promised,
            self.log.last_lsn,
            self.log.last_epoch,
            self.log.last_lsn if done else 0,
            self.store.applied_lsn,
        ).to_wire()

    def _install(self, first: bool, pairs: list[list[bytes]], done: bool, lsn: int, last_epoch: int, rev: int) -> None:
        if first:
            self._unapplied.clear()
            self.store.clear()
        self.store.install(pairs)
        if done:
            self.store.set_applied(lsn, last_epoch, rev)
            self.store.checkpoint()
            self.log.reset_to(lsn, rev)

    def track_shard(self, epoch: int, same_shard: bool) -> None:
        """The cluster view shows our shard at ``epoch`` (``same_shard``: the shard we
        followed so far; a new shard's epoch replaces the bound)."""
        if same_shard:
            self.state.learn_max_epoch(epoch)
        else:
            self.state.max_epoch = epoch

    def adopt(self, records: list[Record]) -> None:
        """Failover: replace our log past the applied (committed) prefix with ``records``."""

        def work() -> None:
            self.log.truncate_after(self.store.applied_lsn)
            self.log.append(records)

        with self._lock:
            self._run(work)
            self._unapplied.clear()
            self._unapplied.extend(records)

    def read(self, start: int, limit: int) -> list[list[Any]]:
        """Our log from ``start`` (committed or not), for a candidate adopting it."""
        if self.log.last_lsn and start < self.log.first_lsn:
            raise Unavailable(f"lsn {start} was compacted; this log starts at {self.log.first_lsn}")
        return records_to_wire(
            self._run(lambda: take_page(self.log.read_from(start, limit=limit), self.page_bytes, record_bytes))
        )

    def reset(self) -> None:
        """Become a replica again (after being the writer): take the store's state as ours."""
        self.state.applied_lsn = self.store.applied_lsn
        self.state.commit_lsn = max(self.state.commit_lsn, self.store.applied_lsn)
        self._unapplied.clear()

    def lag(self) -> int:
        """Committed records this replica has not applied, as far as it knows."""
        return max(0, self.state.commit_lsn - self.store.applied_lsn)
