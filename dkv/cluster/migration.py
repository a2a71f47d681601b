"""Moving a slot range between shards (DESIGN §6), sans-I/O: the target writer's importer.

The target shard's writer drives the move; the source keeps serving the range
until the freeze. :class:`Importer` takes results and returns the next
:data:`Action`; :mod:`dkv.cluster.migrator` carries actions out (RPCs to the
source's writer, ZooKeeper writes, the target's own write pipeline).

1. **clear**: delete what the target holds in the range (a previous attempt's
   partial copy), through its own log.
2. **begin**: learn the source's applied LSN ``S``; every later write to the
   range is in the source's WAL after ``S``. ``S`` is recorded in the migration
   znode (``from_lsn``), so every member of the source keeps its WAL from there.
3. **copy**: page through the range on the source's writer and import each
   page through the target's log. The scan is live, not a snapshot: a value
   that changes meanwhile is written again by step 4.
4. **tail**: import the source's *committed* WAL records after ``S`` for the
   range, in LSN order. Replaying them over the copy converges to the source's
   state: the last write to each key wins, deletes included.
5. **freeze**: once the tail is short, mark the migration frozen in ZooKeeper
   and ask the source's writer to confirm: it refuses the range (``TRYAGAIN``)
   from then on, waits out the writes it already queued, and answers its
   applied LSN ``F`` with its shard znode's version.
6. **drain**: tail up to ``F``.
7. **flip**: one ZooKeeper multi-op checks the source shard's znode version
   (the writer that answered ``F`` is still the writer, in the same epoch),
   gives the range to the target in ``/slots`` and deletes the migration.

Every import goes through the target's log, so its replicas get it too. If the
source's WAL no longer holds the records after ``S`` (compacted), the move
starts again at step 1; if the flip's check fails (the source failed over or
bumped its epoch), it goes back to step 5 and asks the new writer.

**Reads and writes while a range moves (G4).** We chose *re-check, then read
without yielding* over a range guard that the delete would wait for. Every op is
routed (:mod:`dkv.cluster.routing`) after the last thing that yields on its way
(a linearizable read's quorum round), and between that check and the store read
(or the write being queued) nothing yields. The source's writer records each
freeze it confirms (range and the ZooKeeper views begun by then) and refuses the
range from that moment on, whatever its view says, until a view begun after the
confirmation shows the migration gone: then either the flip happened (that view
shows the new owner: ``MOVED``) or the move was cancelled (the range is served
again). A flip needs the source's writer to have confirmed the freeze in the
epoch it checks, so a read that passes the check on that writer reads a range
that has not moved, and the writer deletes a moved range only after its view
shows the move, when such checks fail. A linearizable read adds its quorum round:
if a newer writer took over the source and flipped the range, the round fails.
A write that passed the check before the freeze is queued before the freeze's
barrier, so it is settled (and below ``F``) before the flip. Replicas serve
``eventual`` reads only while their slot map is at least as new as the one the
writer sent with its last prepare: the deletes of a moved range reach a replica
after the writer's map shows the move, and with it. Scans read only the slots the
node owns, at the client's slot map version.

The frozen range is unavailable, so the freeze is bounded: if the move has not
flipped ``freeze_timeout`` seconds after step 5 began (the target lost its
quorum, cannot reach the source, ...), or if a new target writer inherits a
frozen migration (its predecessor died mid-freeze: re-copying while frozen
would keep the range down for the whole copy), the importer **cancels**: the
migration znode is deleted. The flip can no longer commit (its multi-op deletes
that same znode), the source serves the range again, and the controller plans
the move afresh.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from dkv.node.sequencer import Kind, Write
from dkv.storage import entry as entries
from dkv.wal.record import Op, Record

#: Freeze once the source's committed log is at most this many records ahead of our tail.
FREEZE_LAG = 500
#: Seconds a range may stay frozen before the move is cancelled (``--migration-freeze-timeout``).
FREEZE_TIMEOUT = 10.0

#: one write as the target's pipeline takes it (IMPORT, PURGE or FLOOR)
ImportOp = Write


def import_op(rec: Record) -> ImportOp | None:
    """What the target writes for one of the source's records: the entry as the source stored
    it (revision and deadline included), a delete without a watch event, or nothing."""
    if rec.op == Op.PUT:
        return Write(Kind.IMPORT, rec.key, entries.encode(rec.value, rec.rev, rec.expires_at))
    if rec.op == Op.IMPORT:
        return Write(Kind.IMPORT, rec.key, rec.value)
    if rec.op in (Op.DELETE, Op.EXPIRE, Op.PURGE):
        return Write(Kind.PURGE, rec.key)
    return None


@dataclass(frozen=True)
class Clear:
    """Delete one page of the target's own keys in the range after storage key ``after``;
    answer with the last storage key deleted (None: nothing left)."""

    after: bytes | None


@dataclass(frozen=True)
class Begin:
    """Ask the source's writer for its applied LSN."""


@dataclass(frozen=True)
class RecordStart:
    """Write ``from_lsn`` into the migration znode."""

    from_lsn: int


@dataclass(frozen=True)
class CopyPage:
    """Read one page of the range from the source's writer, after storage key ``after``;
    answer with a :class:`Page`."""

    after: bytes | None


@dataclass(frozen=True)
class Import:
    """Write ``ops`` through the target's log (answer with None)."""

    ops: list[ImportOp] = field(default_factory=list)


@dataclass(frozen=True)
class Tail:
    """Read the source's committed WAL records after ``after_lsn``; answer with a :class:`TailPage`."""

    after_lsn: int


@dataclass(frozen=True)
class Freeze:
    """Mark the migration frozen and get the source writer's final LSN; answer with a :class:`Frozen`."""


@dataclass(frozen=True)
class Flip:
    """The multi-op, checked against the source shard's znode version; answer True if it committed."""

    source_version: int


@dataclass(frozen=True)
class Cancel:
    """Delete the migration znode (the move is abandoned; the source keeps the range)."""


@dataclass(frozen=True)
class Done:
    pass


Action = Clear | Begin | RecordStart | CopyPage | Import | Tail | Freeze | Flip | Cancel | Done


@dataclass(frozen=True)
class Page:
    pairs: list[tuple[bytes, bytes]]
    #: storage key of the last pair; None once the range is exhausted
    next_after: bytes | None


@dataclass(frozen=True)
class TailPage:
    #: the range's records, in LSN order
    ops: list[ImportOp]
    #: every record up to here was read (and ``ops`` holds those of the range)
    scanned_to: int
    #: the source's applied (committed) LSN
    committed: int
    #: the source no longer holds the records after ``after_lsn``
    compacted: bool = False


@dataclass(frozen=True)
class Frozen:
    final_lsn: int
    source_version: int
    #: the source's applied revision at the freeze: the target's revisions go above it
    final_rev: int = 0


class Importer:
    """The target side of one slot-range move (see the module doc)."""

    def __init__(
        self,
        inherited_freeze: bool = False,
        freeze_timeout: float = FREEZE_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``inherited_freeze``: the migration is already frozen by a previous driver (cancel it)."""
        self._next: Action = Cancel() if inherited_freeze else Clear(None)
        self._after_import: Action | None = None
        self._import_phase = "copy"
        self._tail_at = 0
        self._final: Frozen | None = None
        self.freeze_timeout = freeze_timeout
        self._clock = clock
        #: when the freeze was first due (the range is unavailable from then on)
        self.frozen_at: float | None = None
        self.restarts = 0
        self.imported = 0
        self.cancelled = False

    @property
    def done(self) -> bool:
        return isinstance(self._next, Done)

    def frozen_for(self) -> float | None:
        """Seconds since the freeze was due (None: not yet)."""
        return None if self.frozen_at is None else self._clock() - self.frozen_at

    @property
    def phase(self) -> str:
        """What the move is doing, for operators: clear, copy, tail, freeze, drain, flip, cancel, done."""
        act = self._next
        if isinstance(act, Import):
            return self._import_phase
        if isinstance(act, Tail) and self._final is not None:
            return "drain"
        return {Begin: "copy", RecordStart: "copy", CopyPage: "copy"}.get(type(act), type(act).__name__.lower())

    def next(self) -> Action:
        """The action to carry out now (again, after a failure): :class:`Cancel` once the
        freeze has lasted ``freeze_timeout`` (unless the flip, which ends it too, is due)."""
        if isinstance(self._next, Freeze) and self.frozen_at is None:
            self.frozen_at = self._clock()
        elif not isinstance(self._next, (Cancel, Done, Flip)) and (self.frozen_for() or 0.0) > self.freeze_timeout:
            self._next = Cancel()
        return self._next

    def on(self, result: Any) -> Action:
        """The result of the action :meth:`next` returned; returns the next action."""
        act = self._next
        if isinstance(act, Cancel):
            self.cancelled = True
            self._next = Done()
            return self.next()
        if isinstance(act, Clear):
            self._next = Begin() if result is None else Clear(result)
        elif isinstance(act, Begin):
            self._tail_at = int(result)
            self._next = RecordStart(self._tail_at)
        elif isinstance(act, RecordStart):
            self._next = CopyPage(None)
        elif isinstance(act, CopyPage):
            page: Page = result
            then: Action = Tail(self._tail_at) if page.next_after is None else CopyPage(page.next_after)
            self._import([Write(Kind.IMPORT, k, v) for k, v in page.pairs], then, "copy")
        elif isinstance(act, Import):
            self.imported += len(act.ops)
            assert self._after_import is not None
            self._next, self._after_import = self._after_import, None
        elif isinstance(act, Tail):
            self._on_tail(result)
        elif isinstance(act, Freeze):
            self._final = result
            # every later revision of the target goes above the source's: the range's revisions
            # (lock tokens, watch positions) keep increasing across the move
            self._import([Write(Kind.FLOOR, b"", deadline=result.final_rev)], self._after_tail(), "drain")
        elif isinstance(act, Flip):
            if result:
                self._next = Done()
            else:  # the source changed writer or epoch since it answered: ask again
                self._final = None
                self._next = Freeze()
        return self.next()

    def _import(self, ops: list[ImportOp], then: Action, phase: str) -> None:
        if ops:
            self._next, self._after_import, self._import_phase = Import(ops), then, phase
        else:
            self._next = then

    def _on_tail(self, page: TailPage) -> None:
        if page.compacted:
            self.restarts += 1
            self._final = None
            self._next = Clear(None)
            return
        self._tail_at = max(self._tail_at, page.scanned_to)
        if self._final is None and page.committed - self._tail_at <= FREEZE_LAG:
            then: Action = Freeze()
        else:
            then = self._after_tail()
        self._import(page.ops, then, "tail" if self._final is None else "drain")

    def _after_tail(self) -> Action:
        if self._final is not None and self._tail_at >= self._final.final_lsn:
            return Flip(self._final.source_version)
        return Tail(self._tail_at)
