"""Failover: promote a replica when its shard's writer is gone (DESIGN §5).

When the writer's registration vanishes, the shard's live replicas contend for
a ZooKeeper lock; the holder runs one attempt:

1. reserve the next epoch with a version-checked write (writer set to none),
   so the epoch is unique even if this candidate dies half way (a shard with
   no writer already carries such a reserved epoch, and it is reused);
2. *fence*: ask every member to promise to refuse any lower epoch, and report
   its log end ``(last_epoch, last_lsn)``; at least
   ``replication_factor - write_quorum + 1`` members (itself included) must
   answer, so the answers include every acknowledged write;
3. adopt the most advanced log (fetching the missing tail from that member);
4. publish itself as writer with a version-checked write. Its writer driver
   then commits the adopted tail before taking new writes, and members with a
   divergent uncommitted tail cut it when the new writer first contacts them.

If too few members answer, nobody is promoted: the shard stays unavailable
(never an unsafe promotion). :func:`needed`, :func:`pick_source` and
:func:`decide` (the fence's answers in, :class:`GiveUp`, :class:`FetchFrom` or
:class:`Publish` out) are the pure rules; :class:`Promoter` is the I/O around them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any

import gevent
from kazoo.exceptions import BadVersionError, KazooException, LockTimeout, NoNodeError

from dkv.client.connection import TransportError, call_once
from dkv.cluster import layout
from dkv.cluster.replication import Reply, records_from_wire
from dkv.errors import DKVError

logger = logging.getLogger(__name__)

#: Records fetched per call when adopting another member's log.
FETCH_CHUNK = 5000


def needed(replication_factor: int, write_quorum: int) -> int:
    """Members that must answer a promotion: any such set meets every write quorum."""
    return replication_factor - write_quorum + 1


def pick_source(positions: dict[str, Reply]) -> str:
    """The member whose log is the most advanced: highest (last_epoch, last_lsn); ties by id."""
    return max(positions, key=lambda m: (positions[m].last_epoch, positions[m].last_lsn, m))


@dataclass(frozen=True)
class GiveUp:
    """Too few members answered the fence: promote nobody (the shard stays without a writer)."""

    answered: int
    needed: int


@dataclass(frozen=True)
class FetchFrom:
    """Another member's log is more advanced: fetch its records ``start..end`` and adopt them
    (replacing ours past our applied prefix), then publish."""

    source: str
    start: int
    end: int


@dataclass(frozen=True)
class Publish:
    """Our own log is the most advanced one: publish ourselves as the writer as we are."""


Step = GiveUp | FetchFrom | Publish


def decide(me: str, positions: dict[str, Reply], need: int, applied_lsn: int) -> Step:
    """What a candidate does with its fence's answers (``positions``: member -> its reply).

    Safety rule: the candidate adopts the most advanced log before it publishes itself,
    since only that log is sure to hold every acknowledged write. ``applied_lsn`` is the
    candidate's applied (committed) prefix, which it keeps.
    """
    if len(positions) < need:
        return GiveUp(len(positions), need)
    source = pick_source(positions)
    if source == me:
        return Publish()
    return FetchFrom(source, applied_lsn + 1, positions[source].last_lsn)


class Promoter:
    """Runs promotion attempts for one shard while its writer is down and we are a replica."""

    def __init__(self, runtime: Any, shard_id: str, not_before: float = 0.0) -> None:
        self.rt = runtime
        self.shard_id = shard_id
        self.config = runtime.config
        #: monotonic time before which we do not contend (a writer that just stepped down)
        self.not_before = not_before
        self._greenlet = gevent.spawn(self._run)

    @property
    def dead(self) -> bool:
        return self._greenlet.dead

    def stop(self) -> None:
        self._greenlet.kill(block=False)

    def _writer_down(self) -> bool:
        sh = self.rt.view.shards.get(self.shard_id)
        return (
            sh is not None
            and self.config.node_id in sh.replicas
            and (sh.writer is None or sh.writer not in self.rt.view.nodes)
        )

    def _run(self) -> None:
        lock = self.rt.coord.zk.Lock(f"{layout.shard_path(self.shard_id)}/promotion", self.config.node_id)
        gevent.sleep(max(0.0, self.not_before - time.monotonic()))
        while self._writer_down() and self.rt.coord.connected:
            try:
                if lock.acquire(timeout=self.config.session_timeout):
                    try:
                        if self._writer_down() and self._attempt():
                            return
                    finally:
                        lock.release()
            except (LockTimeout, KazooException) as e:
                logger.debug("promotion of %s: %s", self.shard_id, e)
            gevent.sleep(0.5)

    def _attempt(self) -> bool:
        zk = self.rt.coord.zk
        me = self.config.node_id
        path = layout.shard_path(self.shard_id)
        try:
            raw, stat = zk.get(path)
        except NoNodeError:
            return False
        shard = layout.Shard.from_bytes(self.shard_id, raw)
        if shard.writer is not None and zk.exists(layout.node_path(shard.writer)):
            return True  # the writer is back (or someone else won): nothing to do
        members = shard.members
        if shard.writer is None:
            # Invariant: a shard without a writer carries an epoch reserved for the next one
            # (by an earlier attempt, or by a writer stepping down) that nobody wrote in.
            epoch = shard.epoch
        else:
            epoch = shard.epoch + 1
            reserved = replace(shard, epoch=epoch, writer=None, replicas=members)
            try:
                stat = zk.set(path, reserved.to_bytes(), version=stat.version)
            except BadVersionError:
                return False
        logger.warning(
            "%s: writer %s is gone; %s reserved epoch %d and fences the members", self.shard_id, shard.writer, me, epoch
        )
        positions = self._fence(members, epoch)
        step = decide(
            me, positions, needed(self.config.replication_factor, self.config.write_quorum), self.rt.store.applied_lsn
        )
        if isinstance(step, GiveUp):
            logger.error(
                "%s: only %d of %d members answered the promotion (need %d); no writer until more return",
                self.shard_id,
                step.answered,
                len(members),
                step.needed,
            )
            return False
        if isinstance(step, FetchFrom) and not self._adopt(step, positions[step.source]):
            return False
        new = replace(shard, epoch=epoch, writer=me, replicas=[m for m in members if m != me])
        try:
            zk.set(path, new.to_bytes(), version=stat.version)
        except BadVersionError:
            return False
        logger.warning(
            "%s: %s promoted to writer in epoch %d (log end %d, from %d answering members)",
            self.shard_id,
            me,
            epoch,
            self.rt.log.last_lsn,
            len(positions),
        )
        self.rt.coord.refresh()
        return True

    def _fence(self, members: list[str], epoch: int) -> dict[str, Reply]:
        """Every reachable member promises ``epoch`` and reports its log end."""

        def ask(member: str) -> Reply | None:
            try:
                if member == self.config.node_id:
                    raw = self.rt.follower.fence(epoch)
                else:
                    addr = self.rt.view.nodes.get(member)
                    if addr is None:
                        return None
                    raw = self._request(addr, "repl_fence", epoch)
                reply = Reply.from_wire(raw)
                return reply if reply.ok else None
            except (TransportError, DKVError):
                return None

        jobs = {m: gevent.spawn(ask, m) for m in members}
        gevent.joinall(list(jobs.values()), timeout=self.config.write_timeout)
        return {m: j.value for m, j in jobs.items() if j.successful() and j.value is not None}

    def _adopt(self, step: FetchFrom, pos: Reply) -> bool:
        """Replace our log past our applied (committed) prefix with ``step.source``'s."""
        source = step.source
        addr = self.rt.view.nodes.get(source)
        if addr is None:
            return False
        start = step.start
        records: list[Any] = []
        try:
            while start <= step.end:
                chunk = records_from_wire(self._request(addr, "repl_read", start, FETCH_CHUNK))
                if not chunk or chunk[0].lsn != start:
                    logger.error("%s: %s cannot serve its log from %d; not promoting", self.shard_id, source, start)
                    return False
                records.extend(chunk)
                start = chunk[-1].lsn + 1
        except (TransportError, DKVError) as e:
            logger.error("%s: fetching the log tail from %s failed: %s", self.shard_id, source, e)
            return False
        self.rt.follower.adopt(records)
        logger.info(
            "%s: adopted %d record(s) from %s (log end %d, epoch %d)",
            self.shard_id,
            len(records),
            source,
            pos.last_lsn,
            pos.last_epoch,
        )
        return True

    def _request(self, addr: str, method: str, *args: Any) -> Any:
        return call_once(addr, method, *args, timeout=self.config.write_timeout, auth=self.config.credentials)
