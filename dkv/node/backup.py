"""A shard writer's side of ``dkv backup`` and ``dkv restore``: store snapshots paged out, entries written in.

**Backup.** :meth:`BackupService.open` takes a store snapshot (LevelDB's) of
the slots this node's shard owns, at the LSN its store has applied (on a
writer: committed), and registers it under an id. :meth:`BackupService.page`
returns the snapshot's next ``(key, stored entry)`` pairs after a cursor (the
last storage key returned), bounded by ``limit`` and ``page_bytes``
(:func:`dkv.keys.take_page`): the caller holds the cursor, so a page lost in
transit is asked again. Entries whose deadline had passed when the snapshot
was opened are skipped (no read sees them). A snapshot pins LevelDB files, so
at most :data:`MAX_SNAPSHOTS` may be open at once and one left idle for
:data:`IDLE_TIMEOUT` seconds is closed (G7: bounded for any caller).

In cluster mode a snapshot is opened only by the shard's ready writer, and
refused (``TRYAGAIN``) while a slot migration into or out of the shard is under
way: the slots the shard owns must not move between the snapshots of two
shards. The owned ranges and the slot map version are read with no yield
between them and the snapshot, and returned, so the caller can check that the
snapshots of all shards agree (one slot map version, every slot once).

**Restore.** :meth:`BackupService.restore` writes ``(key, stored entry)``
pairs through the normal write pipeline as ``IMPORT`` writes, which keep each
entry's revision and deadline and replicate like any write. Every key is routed
first (``MOVED``/``TRYAGAIN`` for a slot this node may not write now: then
nothing of the batch is written); entries already expired are skipped.
:meth:`BackupService.floor` raises the revision floor (a ``FLOOR`` write), so
later revisions go above the restored ones.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import gevent

from dkv import protocol
from dkv.errors import InvalidArgument, TryAgain, Unavailable
from dkv.keys import Limits, quote
from dkv.node.pipeline import WritePipeline, offloaded
from dkv.node.sequencer import Kind, Write
from dkv.slots import ALL_SLOTS, SLOT_PREFIX_LEN, SlotRange
from dkv.storage import Store
from dkv.storage import entry as entries
from dkv.storage.entry import now_ms
from dkv.storage.store import StoreSnapshot

logger = logging.getLogger(__name__)

#: Most store snapshots a node holds open for backups at once.
MAX_SNAPSHOTS = 4
#: Seconds a backup snapshot may stay unused before it is closed.
IDLE_TIMEOUT = 60.0
#: Most pairs one backup page or restore call carries.
MAX_PAGE = 10_000
_INT64 = 2**63


@dataclass
class _Session:
    id: str
    snap: StoreSnapshot
    ranges: list[SlotRange]
    #: entries with a deadline at or before this (ms) are skipped
    now: int
    last_used: float
    busy: int = 0
    info: dict[str, Any] = field(default_factory=dict)


class BackupService:
    """Backup snapshots and restore writes of one node (see the module docstring).

    ``router`` is the node's cluster runtime (None standalone); ``offload`` runs
    bulk reads in gevent's threadpool (a durable store).
    """

    def __init__(
        self,
        store: Store,
        pipeline: WritePipeline,
        limits: Limits,
        offload: bool,
        max_snapshots: int = MAX_SNAPSHOTS,
        idle_timeout: float = IDLE_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store, self.pipeline, self.limits, self.offload = store, pipeline, limits, offload
        self.router: Any = None
        self.max_snapshots = max_snapshots
        self.idle_timeout = idle_timeout
        self._clock = clock
        self._sessions: dict[str, _Session] = {}
        self._ids = itertools.count(1)
        self._reaper: gevent.Greenlet | None = None
        self._closed = False

    # -- backup --------------------------------------------------------------------

    def open(self) -> dict[str, Any]:
        """Open a snapshot of our shard's slots: ``{id, shard, slots, slot_version, lsn, epoch, rev}``."""
        if self._closed:
            raise Unavailable("node is shutting down")
        self.reap()
        if len(self._sessions) >= self.max_snapshots:
            raise Unavailable(
                f"{len(self._sessions)} backup snapshots are open here (the most allowed); "
                f"retry once a backup ends (an abandoned one closes after {self.idle_timeout:g}s idle)"
            )
        shard, ranges, version = self._scope()
        # -- no yield from the scope to the snapshot: they describe one instant --
        snap = self.store.snapshot()
        sid = f"b{next(self._ids)}-{int(time.time())}"
        s = _Session(sid, snap, ranges, now_ms(), self._clock())
        s.info = {
            "id": sid,
            "shard": shard,
            "slots": [r.to_list() for r in ranges],
            "slot_version": version,
            "lsn": snap.applied_lsn,
            "epoch": snap.applied_epoch,
            "rev": snap.applied_rev,
            "time_ms": s.now,
        }
        self._sessions[sid] = s
        self._ensure_reaper()
        logger.info("backup snapshot %s opened at lsn %d (%s, slots %s)", sid, s.info["lsn"], shard, s.info["slots"])
        return dict(s.info)

    def _scope(self) -> tuple[str, list[SlotRange], int | None]:
        """Our shard, the ranges it owns and the slot map version; refuses unless we may back it up."""
        rt = self.router
        if rt is None:
            return "shard-0", [ALL_SLOTS], None
        ranges, _ = rt.watch_scope(None)  # the ready writer of a shard that owns slots, or why not
        own = rt.ownership()
        moving = sorted(m.id for m in own.migrations.values() if own.shard in (m.source, m.target))
        if moving or own.frozen:
            raise TryAgain(
                f"slot migration {', '.join(moving or sorted(own.frozen))} into or out of "
                f"{own.shard} is in progress; back up once it has finished (dkv admin status)"
            )
        return str(own.shard), sorted(ranges, key=lambda r: r.start), own.slot_version

    def page(self, sid: str, after: bytes | None, limit: int) -> list[Any]:
        """``[pairs, cursor, skipped]``: up to ``limit`` ``[key, stored entry]`` pairs (and ``page_bytes``)
        after storage key ``after`` (None: from the start), the cursor to pass next (None: the end),
        and how many expired entries the page left out."""
        if not 0 < limit <= MAX_PAGE:
            raise InvalidArgument(f"a backup page holds 1..{MAX_PAGE} pairs")
        if after is not None and not 0 < len(after) <= SLOT_PREFIX_LEN + self.limits.max_key_bytes:
            raise InvalidArgument(f"bad backup cursor {quote(after)}")
        s = self._session(sid)
        s.busy += 1
        try:
            raw = offloaded(self.offload, self._read_page, s, after, limit)
        finally:
            s.busy -= 1
            s.last_used = self._clock()
        if not raw:
            return [[], None, 0]
        pairs = [[k[SLOT_PREFIX_LEN:], blob] for k, blob in raw if not 0 < entries.deadline_of(blob) <= s.now]
        return [pairs, raw[-1][0], len(raw) - len(pairs)]

    def _read_page(self, s: _Session, after: bytes | None, limit: int) -> list[tuple[bytes, bytes]]:
        for r in s.ranges:
            page = s.snap.page_slots(r, after, limit, self.limits.page_bytes)
            if page:
                return page
        return []

    def close(self, sid: str) -> bool:
        """Close a backup snapshot; False if it was not open (closed already, or timed out)."""
        s = self._sessions.pop(sid, None) if isinstance(sid, str) else None
        if s is None:
            return False
        self._release(s)
        return True

    def _session(self, sid: Any) -> _Session:
        s = self._sessions.get(sid) if isinstance(sid, str) else None
        if s is None:
            raise Unavailable(
                f"no open backup snapshot {quote(sid)} (it was closed after {self.idle_timeout:g}s "
                "idle, or the node restarted): start the backup again"
            )
        return s

    def _release(self, s: _Session) -> None:
        if s.busy:  # a page is being read in a thread: the snapshot closes when it ends
            gevent.spawn(self._release_later, s)
            return
        s.snap.close()
        logger.info("backup snapshot %s closed", s.id)

    def _release_later(self, s: _Session) -> None:
        while s.busy:
            gevent.sleep(0.05)
        s.snap.close()

    def reap(self) -> int:
        """Close the snapshots idle for longer than ``idle_timeout``; how many."""
        now = self._clock()
        stale = [s for s in self._sessions.values() if not s.busy and now - s.last_used > self.idle_timeout]
        for s in stale:
            del self._sessions[s.id]
            logger.warning("backup snapshot %s closed after %.0fs idle", s.id, now - s.last_used)
            self._release(s)
        return len(stale)

    def _ensure_reaper(self) -> None:
        if self._reaper is None or self._reaper.dead:
            self._reaper = gevent.spawn(self._reap_loop)

    def _reap_loop(self) -> None:
        while self._sessions:
            gevent.sleep(min(5.0, self.idle_timeout / 2))
            self.reap()

    @property
    def open_snapshots(self) -> int:
        return len(self._sessions)

    def shutdown(self) -> None:
        """Close every snapshot (before the store closes)."""
        self._closed = True
        if self._reaper is not None:
            self._reaper.kill()
        for s in list(self._sessions.values()):
            del self._sessions[s.id]
            while s.busy:
                gevent.sleep(0.05)
            s.snap.close()

    # -- restore -------------------------------------------------------------------

    def restore(self, pairs: Any) -> list[int]:
        """Write ``[key, stored entry]`` pairs as ``IMPORT`` writes: ``[written, skipped_expired]``."""
        if not isinstance(pairs, (list, tuple)) or len(pairs) > MAX_PAGE:
            raise InvalidArgument(f"restore takes a list of at most {MAX_PAGE} [key, entry] pairs")
        checked: list[tuple[bytes, bytes]] = []
        for p in pairs:
            if not isinstance(p, (list, tuple)) or len(p) != 2 or not isinstance(p[1], bytes):
                raise InvalidArgument("restore takes [key, entry] pairs of bytes")
            key = self.limits.key(p[0])
            try:
                e = entries.decode(p[1])
            except ValueError as err:
                raise InvalidArgument(f"the entry of {quote(key)} is malformed: {err}") from None
            self.limits.value(e.value)
            checked.append((key, p[1]))
        now = now_ms()
        writes = [Write(Kind.IMPORT, k, blob) for k, blob in checked if not 0 < entries.deadline_of(blob) <= now]
        skipped = len(checked) - len(writes)
        if self.router is not None:
            own = self.router.ownership()
            for w in writes:  # every key first: a refused one writes nothing of the batch
                self.router.route(protocol.SET, w.key, None, own)
        # -- no yield from the routing to the queueing (see NodeService.batch) --
        if writes:
            self.pipeline.submit_all(writes)
        return [len(writes), skipped]

    def floor(self, rev: Any) -> int:
        """Raise the revision floor to ``rev``: later writes get higher revisions. The applied revision."""
        if not isinstance(rev, int) or isinstance(rev, bool) or not 0 <= rev < _INT64:
            raise InvalidArgument("a revision floor is an integer in 0..2**63-1")
        self.pipeline.submit_all([Write(Kind.FLOOR, b"", deadline=rev)])
        return self.store.applied_rev
