"""The replication protocol of a shard, sans I/O: messages in, replies and actions out.

DESIGN §4. The writer (:class:`Leader`) sends :class:`Prepare` messages
``(epoch, prev_lsn, prev_epoch, records, commit_lsn)``; a replica
(:class:`Follower`) accepts one only if ``epoch`` is at least the highest epoch
it has promised and its own log holds ``prev_lsn`` with ``prev_epoch`` (log
matching, as in Raft), appends the records durably and acknowledges. Records
identified by the same ``(epoch, lsn)`` are identical everywhere, because an
LSN is never reused inside an epoch (a writer bumps its epoch after a rollback).

Neither class does I/O. A follower decides from its log's in-memory state
(``last_lsn``, ``last_epoch``, ``epochs``, ``first_lsn``) and the store's
``applied_lsn``, and returns :class:`Action` s for its adapter to execute, in
order, before the reply is sent and before the next message is handled. The
leader takes events (a batch proposed, the local append done, a replica's
answer, a timer, a truncate's answer, a replica down or lagging) and returns
:data:`Effect` s (send this prepare to this replica, append, commit up to an
LSN, roll back, fail batches definitely or not, bump the epoch, deposed); it
keeps several batches in flight (pipelining) and each replica's progress, and
decides catch-up steps. Its driver is :mod:`dkv.cluster.leader`.

Defence in depth (DESIGN §10): a follower also knows ``max_epoch``, the epoch
ZooKeeper records for its shard (fed by its adapter from the cluster view, or
read on demand). It takes a ``prepare``, ``truncate`` or snapshot only at that
epoch and a ``fence`` only up to it, so a forged message with a made-up epoch
can neither be accepted nor leave a promise behind. It installs a snapshot
only at an LSN the writer of its epoch has shown it (in a prepare or
heartbeat), so a snapshot cannot claim a log the writer does not hold. Writer
and replicas compare store digests at one LSN (:class:`DigestRequest`,
:func:`compare_digest`); a diverged replica is re-synced from a snapshot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from dkv.errors import DKVError, InvalidArgument, QuorumNotReached, Unavailable, WriteTimeout
from dkv.keys import item_bytes
from dkv.wal.epochs import EpochIndex
from dkv.wal.record import Op, Record

# -- messages ------------------------------------------------------------------


def records_to_wire(records: Sequence[Record]) -> list[list[Any]]:
    return [[r.epoch, r.lsn, int(r.op), r.key, r.value, r.rev, r.expires_at] for r in records]


def record_bytes(r: Record) -> int:
    """What one record counts against a message's page budget (:func:`dkv.keys.item_bytes`)."""
    return item_bytes(r.key, r.value)


def records_from_wire(wire: Sequence[Sequence[Any]]) -> tuple[Record, ...]:
    return tuple(
        Record(int(e), int(n), Op(o), bytes(k), bytes(v), int(rev), int(exp)) for e, n, o, k, v, rev, exp in wire
    )


@dataclass(frozen=True)
class Prepare:
    """Append ``records`` after ``(prev_lsn, prev_epoch)``; learn ``commit_lsn``.

    With no records it is a heartbeat that carries the commit point (a ``commit``).
    ``slot_version`` is the version of the writer's slot map when it sent this: a
    replica serves eventual reads only once its own map is at least as new (the
    writer deletes a range that moved away only after its map shows the move).
    """

    epoch: int
    prev_lsn: int
    prev_epoch: int
    records: tuple[Record, ...]
    commit_lsn: int
    slot_version: int = -1

    def to_wire(self) -> list[Any]:
        return [
            self.epoch,
            self.prev_lsn,
            self.prev_epoch,
            self.commit_lsn,
            records_to_wire(self.records),
            self.slot_version,
        ]

    @classmethod
    def from_wire(cls, w: Sequence[Any]) -> "Prepare":
        try:
            epoch, prev_lsn, prev_epoch, commit_lsn, recs, slot_version = w
            return cls(
                int(epoch), int(prev_lsn), int(prev_epoch), records_from_wire(recs), int(commit_lsn), int(slot_version)
            )
        except (TypeError, ValueError) as e:
            raise InvalidArgument(f"malformed prepare: {str(e)[:200]}") from None


@dataclass(frozen=True)
class Truncate:
    """Drop every record after ``after_lsn`` (a rollback, or the repair of a divergent tail)."""

    epoch: int
    after_lsn: int

    def to_wire(self) -> list[Any]:
        return [self.epoch, self.after_lsn]

    @classmethod
    def from_wire(cls, w: Sequence[Any]) -> "Truncate":
        try:
            epoch, after_lsn = w
            return cls(int(epoch), int(after_lsn))
        except (TypeError, ValueError) as e:
            raise InvalidArgument(f"malformed truncate: {str(e)[:200]}") from None


@dataclass(frozen=True)
class DigestRequest:
    """Anti-entropy: apply up to ``lsn`` (committed; our record there has ``lsn_epoch``) and
    answer the store's digest at exactly ``lsn``."""

    epoch: int
    lsn: int
    lsn_epoch: int

    def to_wire(self) -> list[Any]:
        return [self.epoch, self.lsn, self.lsn_epoch]

    @classmethod
    def from_wire(cls, w: Sequence[Any]) -> "DigestRequest":
        epoch, lsn, lsn_epoch = w
        return cls(int(epoch), int(lsn), int(lsn_epoch))


OK = ""
STALE_EPOCH = "stale_epoch"  # the sender's epoch is below the one this member promised (or ZooKeeper records)
GAP = "gap"  # prev_lsn is past this member's log end
MISMATCH = "mismatch"  # this member's record at prev_lsn has another epoch
COMMITTED = "committed"  # asked to drop a committed record: refused
BEYOND_EPOCH = "beyond_epoch"  # the sender's epoch is above the one ZooKeeper records for the shard
BEYOND_LOG = "beyond_log"  # a snapshot's lsn is past every position the writer has shown
AHEAD = "ahead"  # digest: this member already applied past the asked lsn


@dataclass(frozen=True)
class Reply:
    """A member's answer: ``match_lsn`` on success, else its log end and the reason."""

    reason: str
    promised: int
    last_lsn: int
    last_epoch: int
    match_lsn: int = 0
    applied_lsn: int = 0

    @property
    def ok(self) -> bool:
        return self.reason == OK

    def to_wire(self) -> list[Any]:
        return [self.reason, self.promised, self.last_lsn, self.last_epoch, self.match_lsn, self.applied_lsn]

    @classmethod
    def from_wire(cls, w: Sequence[Any]) -> "Reply":
        return cls(str(w[0]), *(int(x) for x in w[1:6]))


# -- actions a follower's adapter executes -----------------------------------------


@dataclass(frozen=True)
class PersistPromise:
    """Durably remember ``epoch`` as the highest promised (before replying)."""

    epoch: int


@dataclass(frozen=True)
class TruncateLog:
    after_lsn: int


@dataclass(frozen=True)
class AppendLog:
    """Append durably (fsync) before replying."""

    records: tuple[Record, ...]


@dataclass(frozen=True)
class ApplyUpTo:
    """Apply committed records from the log to storage, up to ``lsn``."""

    lsn: int


Action = PersistPromise | TruncateLog | AppendLog | ApplyUpTo


class LogState(Protocol):
    """The in-memory state of a log the protocol reads (WriteAheadLog, MemoryLog)."""

    @property
    def first_lsn(self) -> int: ...
    @property
    def last_lsn(self) -> int: ...
    @property
    def last_epoch(self) -> int: ...

    epochs: EpochIndex


class ProtocolError(Exception):
    """A message that a correct peer can never send (e.g. dropping a committed record)."""


# -- replica side ----------------------------------------------------------------------


class Follower:
    """The replica side. Call one ``on_*`` at a time; execute its actions before the next."""

    def __init__(self, log: LogState, *, promised: int, applied_lsn: int, max_epoch: int | None = None) -> None:
        self.log = log
        self.promised = promised
        self.applied_lsn = applied_lsn
        #: highest commit point learned from a writer (for replica lag)
        self.commit_lsn = applied_lsn
        #: highest slot map version a writer of our promised epoch has sent us
        self.slot_version = -1
        #: the epoch ZooKeeper records for our shard (None: no bound, as in tests)
        self.max_epoch = max_epoch
        #: highest lsn the writer of our promised epoch has shown us (the snapshot bound)
        self.shown_lsn = 0

    def learn_max_epoch(self, epoch: int) -> None:
        """ZooKeeper records ``epoch`` for our shard (epochs only grow there)."""
        if self.max_epoch is None or epoch > self.max_epoch:
            self.max_epoch = epoch

    def beyond(self, epoch: int) -> bool:
        """Is ``epoch`` above what we know ZooKeeper records? (the adapter may look again)"""
        return self.max_epoch is not None and epoch > self.max_epoch

    def _epoch_at(self, lsn: int) -> int | None:
        if lsn == 0:
            return 0
        if lsn > self.log.last_lsn:
            return None
        return self.log.epochs.epoch_at(lsn)

    def _reply(self, reason: str, match: int = 0) -> Reply:
        promised = self.promised
        if reason == STALE_EPOCH and self.max_epoch is not None:
            promised = max(promised, self.max_epoch)  # tells a deposed writer it is deposed
        return Reply(reason, promised, self.log.last_lsn, self.log.last_epoch, match, self.applied_lsn)

    def _epoch_refusal(self, epoch: int, exact: bool = True) -> str:
        """OK, or why a message at ``epoch`` is refused. ``exact``: only the recorded epoch
        itself is accepted (a writer of an older one is deposed, even if we never promised)."""
        if self.beyond(epoch):
            return BEYOND_EPOCH
        if epoch < self.promised or (exact and self.max_epoch is not None and epoch < self.max_epoch):
            return STALE_EPOCH
        return OK

    def _check_epoch(self, epoch: int, actions: list[Action], exact: bool = True) -> str:
        """:meth:`_epoch_refusal`; a newer epoch accepted is promised (durably, by the adapter)."""
        reason = self._epoch_refusal(epoch, exact)
        if reason != OK:
            return reason
        if epoch > self.promised:
            self.promised = epoch
            self.shown_lsn = 0
            actions.append(PersistPromise(epoch))
        return OK

    def on_fence(self, epoch: int) -> tuple[Reply, list[Action]]:
        """Promise to refuse every epoch below ``epoch``; report the log end (failover)."""
        actions: list[Action] = []
        reason = self._check_epoch(epoch, actions, exact=False)
        return self._reply(reason), actions

    def on_prepare(self, m: Prepare) -> tuple[Reply, list[Action]]:
        actions: list[Action] = []
        reason = self._check_epoch(m.epoch, actions)
        if reason != OK:
            return self._reply(reason), actions
        self.shown_lsn = max(self.shown_lsn, m.prev_lsn, m.commit_lsn, m.records[-1].lsn if m.records else 0)
        if m.prev_lsn > self.log.last_lsn:
            return self._reply(GAP), actions
        if m.prev_lsn > self.applied_lsn and self._epoch_at(m.prev_lsn) != m.prev_epoch:
            return self._reply(MISMATCH), actions
        last = self.log.last_lsn
        new: list[Record] = []
        for r in m.records:
            if new or r.lsn > last:
                new.append(r)
            elif r.lsn <= self.applied_lsn or self._epoch_at(r.lsn) == r.epoch:
                continue  # already held (a duplicate or re-sent record)
            else:  # a divergent uncommitted record: cut there, take the writer's
                actions.append(TruncateLog(r.lsn - 1))
                new.append(r)
        if new:
            actions.append(AppendLog(tuple(new)))
        match = m.records[-1].lsn if m.records else m.prev_lsn
        self.commit_lsn = max(self.commit_lsn, m.commit_lsn)
        self.slot_version = max(self.slot_version, m.slot_version)
        commit = min(m.commit_lsn, match)
        if commit > self.applied_lsn:
            actions.append(ApplyUpTo(commit))
            self.applied_lsn = commit
        return Reply(
            OK,
            self.promised,
            new[-1].lsn if new else last,
            new[-1].epoch if new else self.log.last_epoch,
            match,
            self.applied_lsn,
        ), actions

    def on_truncate(self, m: Truncate) -> tuple[Reply, list[Action]]:
        actions: list[Action] = []
        reason = self._check_epoch(m.epoch, actions)
        if reason != OK:
            return self._reply(reason), actions
        if m.after_lsn < self.applied_lsn:
            return self._reply(COMMITTED), actions
        if m.after_lsn >= self.log.last_lsn:
            return self._reply(OK, self.log.last_lsn), actions
        epoch = self._epoch_at(m.after_lsn) or 0
        actions.append(TruncateLog(m.after_lsn))
        return Reply(OK, self.promised, m.after_lsn, epoch, m.after_lsn, self.applied_lsn), actions

    def on_snapshot(self, epoch: int, lsn: int) -> Reply | None:
        """May a chunk of a snapshot taken at ``lsn`` be installed? None: yes (then
        :meth:`snapshot_installed` once the last chunk is in); else the refusal.

        The writer's log holds ``lsn`` only if the writer of our promised epoch has
        shown us a position at least that far (see ``shown_lsn``; it sends a heartbeat
        before a snapshot). A refusal changes nothing, not even the promise.
        """
        reason = self._epoch_refusal(epoch)
        if reason == OK and (epoch > self.promised or lsn > self.shown_lsn):  # a newer epoch showed nothing yet
            reason = BEYOND_LOG
        return None if reason == OK else self._reply(reason)

    def snapshot_installed(self, lsn: int) -> None:
        self.applied_lsn = lsn
        self.commit_lsn = max(self.commit_lsn, lsn)

    def on_digest(self, m: DigestRequest) -> tuple[Reply, list[Action]]:
        """Apply up to the committed ``m.lsn`` (as a heartbeat would); OK only if our store is
        then exactly at ``m.lsn``, so the adapter can take its digest there (AHEAD: it applied
        past it, the writer asks again at a later lsn)."""
        reply, actions = self.on_prepare(Prepare(m.epoch, m.lsn, m.lsn_epoch, (), m.lsn))
        if reply.ok and self.applied_lsn != m.lsn:
            reply = self._reply(AHEAD)
        return reply, actions


# -- writer side -----------------------------------------------------------------------

IN_SYNC = "in_sync"  # holds our whole log: gets every prepare
CATCHING_UP = "catching_up"
DOWN = "down"  # not answering / not registered

#: The local copy, as a member that confirms a rollback (``Leader.on_truncated``).
LOCAL = ""


@dataclass
class Progress:
    state: str = CATCHING_UP
    #: highest lsn known to be identical to ours (None: not known yet)
    match_lsn: int | None = None
    #: the member's last reported log end
    last_lsn: int = 0
    last_epoch: int = 0
    applied_lsn: int = 0
    #: anti-entropy found its store diverged: re-sync it from a snapshot
    resync: bool = False


# -- catch-up steps (what a lagging member gets next) --


@dataclass(frozen=True)
class SendFrom:
    """Send our records from ``lsn`` (prev = lsn - 1)."""

    lsn: int


@dataclass(frozen=True)
class CutTo:
    """Tell the member to drop its records after ``lsn`` (divergent tail)."""

    lsn: int


@dataclass(frozen=True)
class SendSnapshot:
    """Our log no longer holds what the member needs: send a storage snapshot."""


# -- effects of the writer's events (its driver executes them) --


@dataclass(frozen=True)
class Send:
    """Send ``message`` to replica ``rid``; feed the answer (None: none) to
    :meth:`Leader.on_prepare_reply` with ``gen``. Sends to one replica must leave in
    the order they were emitted (the stream is ``prev_lsn``-chained)."""

    rid: str
    message: Prepare
    gen: int


@dataclass(frozen=True)
class Synced:
    """The member holds our log up to the commit point: it joins the prepares, and first gets
    ``sends``, the batches in flight it missed."""

    sends: tuple[Send, ...] = ()


Step = SendFrom | CutTo | SendSnapshot | Synced


@dataclass(frozen=True)
class AppendLocal:
    """Append ``records`` to the local log (durably), after every earlier local append; then
    :meth:`Leader.on_appended`."""

    records: tuple[Record, ...]


@dataclass(frozen=True)
class Commit:
    """Records up to ``lsn`` are committed: apply ``records`` (after every earlier local job)
    and answer the batches that end at or before ``lsn``."""

    lsn: int
    records: tuple[Record, ...]


@dataclass(frozen=True)
class Rollback:
    """Truncate the local log after ``after_lsn`` (after every earlier local append), then ask
    each of ``targets`` to do the same; feed every outcome to :meth:`Leader.on_truncated`
    (the local one as :data:`LOCAL`)."""

    after_lsn: int
    targets: tuple[str, ...]


@dataclass(frozen=True)
class Fail:
    """Answer the batches ending at ``lsns`` with ``error`` (definite or not, G5)."""

    lsns: tuple[int, ...]
    error: DKVError


@dataclass(frozen=True)
class CatchUp:
    """Replica ``rid`` fell behind: catch it up (:meth:`Leader.catchup_step`)."""

    rid: str


@dataclass(frozen=True)
class BumpEpoch:
    """Start a new epoch (record it in ZooKeeper) before the next write; then
    :meth:`Leader.on_epoch_bumped`."""


@dataclass(frozen=True)
class Deposed:
    """A member promised ``epoch``, above ours: this writer is fenced."""

    epoch: int


Effect = AppendLocal | Send | Commit | Rollback | Fail | CatchUp | BumpEpoch | Deposed


@dataclass
class Batch:
    """A batch in flight: sent, not yet committed nor failed."""

    records: tuple[Record, ...]
    #: the prepare every target got
    message: Prepare
    #: when its prepares left (a commit renews the read lease from then)
    sent: float
    deadline: float
    #: replicas that got its prepare (a rollback asks them all)
    targets: set[str]
    #: targets that may still acknowledge it
    waiting: set[str]
    appended: bool = False
    #: the log tail of a restart: already in our log, never rolled back (it may hold
    #: acknowledged writes): on timeout it is only retried
    tail: bool = False

    @property
    def last(self) -> int:
        return self.records[-1].lsn


@dataclass
class Leader:
    """The writer side, sans I/O: per-replica progress, batches in flight, commit and rollback.

    Events in (``propose``, ``on_appended``, ``on_prepare_reply``, ``on_tick``,
    ``on_truncated``, ``on_epoch_bumped``, ``mark_down``/``mark_lagging``, catch-up
    replies through ``on_reply``), :data:`Effect` s out, to be executed in order.

    Pipelining: up to any number of batches are in flight (the driver bounds the
    window); each is appended locally and sent to every in-sync replica at once.
    The commit point advances over the prefix of batches that are appended locally
    and acknowledged by ``write_quorum - 1`` replicas. A batch that cannot reach its
    quorum any more (its targets refused or fell behind) or is not committed within
    ``write_timeout`` rolls back *every* batch in flight: local truncate plus a
    truncate to every replica that got any of them; the batches then fail with a
    definite :class:`QuorumNotReached` only if every such replica confirmed,
    else :class:`WriteTimeout` (G5). The epoch is bumped before the next write, so
    an LSN is never reused inside an epoch. A member reporting a higher epoch
    deposes the writer: every batch in flight fails as indeterminate.

    A prepare's answer counts only if it answers the current generation (bumped by
    a rollback) and the replica is still in sync: a late answer from before a
    rollback or a catch-up never counts as an ack.
    """

    epoch: int
    log: LogState
    write_quorum: int
    commit_lsn: int
    write_timeout: float = 5.0
    replicas: dict[str, Progress] = field(default_factory=dict)
    #: set when a member reports a higher epoch: this writer is deposed
    deposed_by: int | None = None
    #: the version of the slot map the writer's driver last saw (sent with every prepare)
    slot_version: int = -1
    #: batches in flight, in lsn order
    inflight: list[Batch] = field(default_factory=list)
    #: a rollback happened: a new epoch before the next write
    need_bump: bool = False
    #: monotonic send time of the latest message a write quorum accepted (the read lease)
    lease_from: float = 0.0
    #: replicas (and LOCAL) whose answer to the rollback in progress is awaited
    rolling_back: dict[str, bool | None] | None = None
    _gen: int = 0
    _failing: tuple[int, ...] = ()
    #: records past the commit point after a restart: committed before any new write
    tail_pending: bool = False
    _last: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        self.tail_pending = self.log.last_lsn > self.commit_lsn
        self._last = (self.log.last_lsn, self.log.last_epoch)

    # -- membership and progress ----------------------------------------------------

    def set_replicas(self, ids: Sequence[str]) -> None:
        for rid in ids:
            self.replicas.setdefault(rid, Progress())
        for rid in list(self.replicas):
            if rid not in ids:
                del self.replicas[rid]
                self._forget(rid)

    @property
    def deposed(self) -> bool:
        """A member reported an epoch above ours (one reported while we moved to a newer
        epoch ourselves, after a rollback, no longer counts)."""
        return self.deposed_by is not None and self.deposed_by > self.epoch

    @property
    def needed(self) -> int:
        """Replica acks a write needs (the writer's own copy counts as one)."""
        return self.write_quorum - 1

    @property
    def last_lsn(self) -> int:
        """Our log's end, batches in flight included."""
        return self._last[0]

    def in_sync(self) -> list[str]:
        return [rid for rid, p in self.replicas.items() if p.state == IN_SYNC]

    def alive(self) -> list[str]:
        return [rid for rid, p in self.replicas.items() if p.state != DOWN]

    def acked(self, lsn: int) -> list[str]:
        return [rid for rid, p in self.replicas.items() if p.match_lsn is not None and p.match_lsn >= lsn]

    def prepare(self, records: Sequence[Record], prev_lsn: int, prev_epoch: int) -> Prepare:
        return Prepare(self.epoch, prev_lsn, prev_epoch, tuple(records), self.commit_lsn, self.slot_version)

    def on_reply(self, rid: str, reply: Reply, position_only: bool = False) -> None:
        """Take a member's reply to a catch-up message (``position_only``: a fence's reply,
        or a heartbeat's that only tells its position)."""
        p = self.replicas.get(rid)
        if p is None:
            return
        p.last_lsn, p.last_epoch, p.applied_lsn = reply.last_lsn, reply.last_epoch, reply.applied_lsn
        if reply.reason == STALE_EPOCH and reply.promised > self.epoch:
            self.deposed_by = reply.promised
        if reply.ok and not position_only:
            p.match_lsn = reply.match_lsn
        else:
            p.match_lsn = None
            p.state = CATCHING_UP if p.state != DOWN else DOWN

    def mark_down(self, rid: str) -> list[Effect]:
        """The member is gone (not registered): no prepares, no catch-up."""
        p = self.replicas.get(rid)
        if p is None:
            return []
        p.state, p.match_lsn = DOWN, None
        return self._forget(rid)

    def mark_lagging(self, rid: str) -> list[Effect]:
        """The member missed something (or came back): catch it up from its reported position."""
        p = self.replicas.get(rid)
        if p is None:
            return []
        p.state, p.match_lsn = CATCHING_UP, None
        return [*self._forget(rid), CatchUp(rid)]

    def resync(self, rid: str) -> list[Effect]:
        """Anti-entropy found the member's store diverged: catch it up from a snapshot."""
        p = self.replicas.get(rid)
        if p is None:
            return []
        p.resync = True
        return self.mark_lagging(rid)

    def snapshot_installed(self, rid: str) -> None:
        p = self.replicas.get(rid)
        if p is not None:
            p.resync = False

    def digest_request(self, lsn: int) -> DigestRequest:
        """Ask a member for its digest at our committed ``lsn``."""
        return DigestRequest(self.epoch, lsn, (self.log.epochs.epoch_at(lsn) or 0) if lsn > 0 else 0)

    # -- the write path ------------------------------------------------------------------

    def admit(self) -> list[Effect]:
        """Before a batch is stamped: raise a definite error if it cannot be written now,
        or ask for a new epoch first (after a rollback)."""
        if self.deposed:
            raise Unavailable(f"a member promised epoch {self.deposed_by}; this writer is fenced")
        if self.tail_pending:
            raise Unavailable("the writer is committing its log tail after a restart")
        if self.rolling_back is not None:
            raise Unavailable("the writer is rolling back a batch; nothing was written")
        return [BumpEpoch()] if self.need_bump else []

    def check_quorum(self) -> None:
        n = len(self.in_sync())
        if n < self.needed:
            raise QuorumNotReached(f"{n} replica(s) in sync, {self.needed} needed; nothing was written")

    def on_epoch_bumped(self, epoch: int) -> None:
        self.epoch, self.need_bump = epoch, False

    def renew_lease(self, sent: float) -> None:
        """A write quorum accepted a message we sent at ``sent`` (a heartbeat round)."""
        self.lease_from = max(self.lease_from, sent)

    def propose(self, records: Sequence[Record], now: float, tail: bool = False) -> list[Effect]:
        """Send a stamped batch: it must continue our log (in flight included) at our epoch.
        ``tail``: records already in our log past the commit point (after a restart), proposed
        one page at a time, in order, from ``commit_lsn + 1``."""
        recs = tuple(records)
        if tail:
            prev = self.inflight[-1].last if self.inflight else self.commit_lsn
            prev_epoch = self.inflight[-1].records[-1].epoch if self.inflight else self._epoch_at(prev)
        else:
            self.admit()
            prev, prev_epoch = self._last
            if self.need_bump or recs[0].lsn != prev + 1 or any(r.epoch != self.epoch for r in recs):
                raise Unavailable(
                    f"the batch at lsn {recs[0].lsn} epoch {recs[0].epoch} no longer continues "
                    f"the log (lsn {prev}, epoch {self.epoch}); nothing was written"
                )
        if not recs or recs[0].lsn != prev + 1:
            raise ValueError(f"batch at {recs[0].lsn if recs else None} does not follow lsn {prev}")
        m = self.prepare(recs, prev, prev_epoch)
        targets = self.in_sync()
        self.inflight.append(
            Batch(recs, m, now, now + self.write_timeout, set(targets), set(targets), appended=tail, tail=tail)
        )
        if not tail:
            self._last = (recs[-1].lsn, recs[-1].epoch)
        effects: list[Effect] = [] if tail else [AppendLocal(recs)]
        effects += [Send(rid, m, self._gen) for rid in targets]
        return effects + self._advance()

    def on_appended(self, lsn: int) -> list[Effect]:
        """The local log holds every record up to ``lsn`` durably."""
        for b in self.inflight:
            if b.last <= lsn:
                b.appended = True
        return self._advance()

    def on_prepare_reply(self, rid: str, gen: int, reply: Reply | None) -> list[Effect]:
        """A replica's answer to a :class:`Send` (None: no answer, or an error)."""
        p = self.replicas.get(rid)
        if reply is not None and reply.reason == STALE_EPOCH and reply.promised > self.epoch:
            self.deposed_by = reply.promised
            return self._depose()
        if p is None or gen != self._gen or p.state != IN_SYNC:
            return []  # an answer from before a rollback or a catch-up: it proves nothing now
        if reply is None or not reply.ok:
            if reply is not None:
                self.on_reply(rid, reply)
            return self.mark_lagging(rid)
        p.last_lsn, p.last_epoch, p.applied_lsn = reply.last_lsn, reply.last_epoch, reply.applied_lsn
        p.match_lsn = max(p.match_lsn or 0, reply.match_lsn)
        return self._advance()

    def on_tick(self, now: float) -> list[Effect]:
        """Time passed: a batch not committed within ``write_timeout`` fails."""
        if self.inflight and now >= self.inflight[0].deadline:
            return self._give_up(self.inflight[0], "not committed within the write timeout")
        return []

    def on_truncated(self, rid: str, confirmed: bool) -> list[Effect]:
        """A member's (or the local log's: :data:`LOCAL`) answer to the rollback in progress."""
        if self.rolling_back is None or rid not in self.rolling_back:
            return []
        self.rolling_back[rid] = confirmed
        if any(v is None for v in self.rolling_back.values()):
            return []
        definite = all(self.rolling_back.values())
        asked = len(self.rolling_back) - 1
        self.rolling_back = None
        lsns, self._failing = self._failing, ()
        what = f"{len(lsns)} batch(es) rolled back; {asked} replica(s) asked to drop them"
        error: DKVError = (
            QuorumNotReached(f"{what}, all confirmed: the write was not applied")
            if definite
            else WriteTimeout(f"{what}; one that did not confirm may still hold it")
        )
        return [Fail(lsns, error)]

    def _advance(self) -> list[Effect]:
        """Commit the acked contiguous prefix of the batches in flight; give up on the first
        one that can no longer reach its quorum."""
        done: list[Batch] = []
        for b in self.inflight:
            if not b.appended or len(self.acked(b.last)) < self.needed:
                break
            done.append(b)
        effects: list[Effect] = []
        if done:
            del self.inflight[: len(done)]
            self.commit_lsn = done[-1].last
            self.lease_from = max(self.lease_from, done[-1].sent)
            if self.tail_pending and not any(b.tail for b in self.inflight) and self.commit_lsn >= self.log.last_lsn:
                self.tail_pending = False
            effects.append(Commit(self.commit_lsn, tuple(r for b in done for r in b.records)))
        for b in self.inflight:
            if len(set(self.acked(b.last)) | b.waiting) < self.needed:
                return effects + self._give_up(b, "too few replicas can acknowledge it")
        return effects

    def _give_up(self, batch: Batch, why: str) -> list[Effect]:
        if batch.tail:  # never rolled back: the tail is retried once replicas are back in sync
            lost = [b for b in self.inflight if b.tail]
            self.inflight = [b for b in self.inflight if not b.tail]
            return [Fail(tuple(b.last for b in lost), WriteTimeout(f"log tail not committed: {why}"))]
        # Every batch in flight goes: later ones follow the failed one in every log.
        after = self.inflight[0].message.prev_lsn
        failing, self.inflight = self.inflight, []
        targets = sorted(set().union(*(b.targets for b in failing)))
        self._gen += 1
        self._failing = tuple(b.last for b in failing)
        self._last = (after, self._epoch_at(after))
        self.rolling_back = {LOCAL: None, **{rid: None for rid in targets}}
        self.need_bump = True  # never reuse an lsn with other content inside one epoch
        effects: list[Effect] = [Rollback(after, tuple(targets))]
        for rid in targets:  # they may hold the records: caught up again once rolled back
            p = self.replicas.get(rid)
            if p is not None and p.state == IN_SYNC:
                p.state, p.match_lsn = CATCHING_UP, None
                effects.append(CatchUp(rid))
        return effects

    def _depose(self) -> list[Effect]:
        failing, self.inflight = self.inflight, []
        self._gen += 1
        effects: list[Effect] = [Deposed(self.deposed_by or 0)]
        if failing:
            effects.append(
                Fail(
                    tuple(b.last for b in failing if not b.tail),
                    WriteTimeout(
                        f"this writer was deposed by epoch {self.deposed_by} while the "
                        "write was in flight: it may or may not survive"
                    ),
                )
            )
        return effects

    def fail_all(self, error: DKVError) -> list[Effect]:
        """The driver stops: every batch in flight gets ``error``."""
        failing, self.inflight = self.inflight, []
        self._gen += 1
        lsns = (*self._failing, *(b.last for b in failing))
        self._failing, self.rolling_back = (), None
        return [Fail(lsns, error)] if lsns else []

    def _forget(self, rid: str) -> list[Effect]:
        """``rid`` will not acknowledge anything in flight (it stays a target: it may hold it);
        a batch that cannot reach its quorum without it fails now."""
        for b in self.inflight:
            b.waiting.discard(rid)
        return self._advance()

    def _epoch_at(self, lsn: int) -> int:
        for b in reversed(self.inflight):
            if b.records[0].lsn <= lsn <= b.last:
                return b.records[lsn - b.records[0].lsn].epoch
        return (self.log.epochs.epoch_at(lsn) or 0) if lsn > 0 else 0

    # -- catch-up ------------------------------------------------------------------------

    def catchup_step(self, rid: str) -> Step | None:
        """What to send a lagging member next; None while it must wait (a rollback is under
        way, or it reports records our local log does not hold yet).

        Catch-up carries committed records only (up to ``commit_lsn``), so
        uncommitted records reach a member only through prepares, and a
        rollback knows exactly who may hold them. A member that matches us up
        to the commit point joins the prepares: it becomes a target of every
        batch in flight, whose prepares it gets first (:class:`Synced`).
        """
        p = self.replicas[rid]
        last = self.log.last_lsn
        if self.rolling_back is not None:
            return None
        if p.resync:
            return SendSnapshot()
        if p.match_lsn is not None:
            if p.match_lsn >= self.commit_lsn:
                p.state = IN_SYNC
                sends = []
                for b in self.inflight:
                    b.targets.add(rid)
                    b.waiting.add(rid)
                    if b.last > p.match_lsn:
                        sends.append(Send(rid, b.message, self._gen))
                return Synced(tuple(sends))
            if p.match_lsn < self.log.first_lsn - 1:
                return SendSnapshot()  # our log was compacted past what it needs next
            return SendFrom(p.match_lsn + 1)
        if p.last_lsn > last and self.last_lsn > last:
            return None  # it may hold records we are still appending: ask again once we hold them
        # Unknown match: place the member's reported log end against ours. Its
        # records up to its applied LSN are committed, hence identical to ours.
        if p.last_lsn <= p.applied_lsn and p.last_lsn <= last:
            if p.last_lsn < self.log.first_lsn - 1:
                return SendSnapshot()  # we no longer hold what follows its log
            p.match_lsn = p.last_lsn
            return self.catchup_step(rid)
        if p.last_lsn < self.log.first_lsn:
            return SendSnapshot()  # we can't check its records, nor send what follows them
        ours = self.log.epochs.epoch_at(p.last_lsn) if p.last_lsn <= last else None
        if ours == p.last_epoch:
            p.match_lsn = p.last_lsn
            return self.catchup_step(rid)
        # Divergent (or longer than ours): cut back to where its last epoch ends in
        # our log, never below what it has applied (committed).
        cut = max(min(self.log.epochs.end_of(p.last_epoch, last), p.last_lsn - 1), p.applied_lsn)
        if cut < self.log.first_lsn - 1:
            return SendSnapshot()
        return CutTo(cut)

    def lag(self) -> dict[str, dict[str, Any]]:
        """Per replica: state, match_lsn and lag in records behind our log end."""
        last = self.log.last_lsn
        return {
            rid: {
                "state": p.state,
                "match_lsn": p.match_lsn,
                "lag": None if p.match_lsn is None else max(0, last - p.match_lsn),
            }
            for rid, p in self.replicas.items()
        }


MATCH = "match"
DIVERGED = "diverged"
NOT_COMPARABLE = "not_comparable"


def compare_digest(lsn: int, ours: str, reply: Reply, theirs: str | None) -> str:
    """Anti-entropy's verdict on a member's answer to :class:`DigestRequest` at ``lsn``:
    MATCH, DIVERGED (same applied lsn, other data), or NOT_COMPARABLE (not at ``lsn``: ask
    again later)."""
    if not reply.ok or theirs is None or reply.applied_lsn != lsn:
        return NOT_COMPARABLE
    return MATCH if theirs == ours else DIVERGED


class ReadConfirmation:
    """One round confirming that the writer's epoch is still current (linearizable reads, DESIGN §7).

    The writer sends a heartbeat (an empty prepare at its epoch) to ``asked``
    and feeds each answer here (None: no answer). The round is **confirmed**
    once ``needed`` replicas accepted it: with the writer's own copy that is a
    write quorum, which intersects every promotion's fence set, so no newer
    writer had been promoted when they answered. It **fails** as soon as a
    member reports a higher promised epoch (we are deposed), or when too few
    members are left unanswered to reach ``needed``. It never waits for the
    slowest member: a dead replica does not stall reads while a quorum answers.
    """

    def __init__(self, epoch: int, needed: int, asked: Sequence[str]) -> None:
        self.epoch = epoch
        self.needed = needed
        self.asked = set(asked)
        self.accepted: set[str] = set()
        self.refused: set[str] = set()
        #: a member promised this higher epoch: we are deposed
        self.deposed_by: int | None = None

    def on_reply(self, rid: str, reply: Reply | None) -> None:
        if rid not in self.asked or rid in self.accepted or rid in self.refused:
            return
        if reply is not None and reply.ok and reply.promised == self.epoch:
            self.accepted.add(rid)
            return
        self.refused.add(rid)
        if reply is not None and reply.promised > self.epoch:
            self.deposed_by = reply.promised

    @property
    def confirmed(self) -> bool:
        return self.deposed_by is None and len(self.accepted) >= self.needed

    @property
    def failed(self) -> bool:
        return self.deposed_by is not None or len(self.asked) - len(self.refused) < self.needed

    @property
    def settled(self) -> bool:
        return self.confirmed or self.failed
