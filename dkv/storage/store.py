"""The key-value store over a raw engine: slot-prefixed user keys, applied-LSN
metadata, batches, log apply, ordered scans, expiry and replica digests.

Storage keys are ``slot_prefix(slot_of(key)) + key``; each value is a stored
:mod:`~dkv.storage.entry` (user value, revision, deadline). Metadata lives under
:data:`META_PREFIX`, above every slot prefix (0x0000..0x03ff), so it never
collides with data and never shows up in slot scans.

**Expiry.** An entry whose deadline has passed is invisible to every read at
once (reads compare it with the clock); it is removed only through the log, by
an ``EXPIRE`` record the writer's expirer issues (:mod:`dkv.node.expiry`). To
find due entries without scanning, applying a record with a deadline also
writes an index row ``EXPIRY_PREFIX + u64 deadline + storage key``. Rows are
dropped when a record removes the entry they name (its ``expires_at`` says
which) and, when the entry was overwritten instead, once their deadline passed
(:meth:`Store.drop_due`), so the index is bounded by the live deadlines plus the
overwritten ones not yet due. Index rows are local: digests ignore them.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
from itertools import islice
from operator import itemgetter
from types import TracebackType
from typing import Any, Iterator, Self, Sequence

from dkv.errors import CorruptLog, InvalidArgument, KeyIsEmpty, KeyNotFound
from dkv.keys import pair_bytes, quote, take_page
from dkv.slots import ALL_SLOTS, SLOT_PREFIX_LEN, SlotRange, slot_prefix, storage_key
from dkv.storage import entry as entries
from dkv.storage.engine import Engine, Reader, WriteOp
from dkv.storage.entry import Entry, now_ms
from dkv.storage.leveldb import LevelDBEngine
from dkv.storage.memory import MemoryEngine
from dkv.wal.record import Op, Record

log = logging.getLogger(__name__)

META_PREFIX = b"\xff\xff" + b"meta:"
_APPLIED_LSN = META_PREFIX + b"applied_lsn"
_APPLIED_EPOCH = META_PREFIX + b"applied_epoch"
_APPLIED_REV = META_PREFIX + b"applied_rev"
_FORMAT = META_PREFIX + b"format"
#: the stored-entry format this code reads and writes (:mod:`dkv.storage.entry`)
FORMAT = b"2"
#: index rows of deadlines: EXPIRY_PREFIX + u64 deadline (big-endian) + storage key
EXPIRY_PREFIX = b"\xff\xfe"
_MISSING: Any = object()


def expiry_row(deadline: int, skey: bytes) -> bytes:
    return EXPIRY_PREFIX + deadline.to_bytes(8, "big") + skey


def _skey(key: bytes) -> bytes:
    if not key:
        raise KeyIsEmpty("key must not be empty")
    return storage_key(key)


def _successor(prefix: bytes) -> bytes | None:
    """The smallest string above every string starting with ``prefix`` (None if unbounded)."""
    stripped = prefix.rstrip(b"\xff")
    return stripped[:-1] + bytes([stripped[-1] + 1]) if stripped else None


class StoreView:
    """Read operations over an engine or over a snapshot of one.

    Reads hide expired entries by ``clock`` (milliseconds since the Unix epoch).
    """

    def __init__(self, src: Reader, clock: Any = now_ms) -> None:
        self._src = src
        self._clock = clock

    def _meta_int(self, key: bytes) -> int:
        raw = self._src.get(key)
        return int.from_bytes(raw, "big") if raw is not None else 0

    @property
    def applied_lsn(self) -> int:
        """LSN of the last applied log record (0 if none)."""
        return self._meta_int(_APPLIED_LSN)

    @property
    def applied_epoch(self) -> int:
        """Epoch of the last applied log record (0 if none)."""
        return self._meta_int(_APPLIED_EPOCH)

    @property
    def applied_rev(self) -> int:
        """Revision of the last applied log record (0 if none)."""
        return self._meta_int(_APPLIED_REV)

    def get(self, key: bytes, default: Any = _MISSING) -> bytes:
        """The value of ``key``; ``default`` if absent or expired, else ``KeyNotFound``."""
        blob = self._src.get(_skey(key))
        value = None if blob is None else entries.value_of(blob, self._clock())
        if value is not None:
            return value
        if default is _MISSING:
            raise KeyNotFound(f"key {quote(key)} not found")
        return default

    def exists(self, key: bytes) -> bool:
        return self.get(key, None) is not None

    def entry(self, key: bytes, now: int | None = None) -> Entry | None:
        """The entry of ``key`` (value, revision, deadline), or None if absent or expired at
        ``now`` (default: the clock)."""
        blob = self._src.get(_skey(key))
        if blob is None:
            return None
        e = entries.decode(blob)
        return None if e.expired(self._clock() if now is None else now) else e

    def raw_entry(self, key: bytes) -> Entry | None:
        """The stored entry of ``key``, expired or not (None: absent)."""
        blob = self._src.get(_skey(key))
        return None if blob is None else entries.decode(blob)

    def scan(
        self,
        prefix: bytes = b"",
        start: bytes | None = None,
        limit: int | None = None,
        slots: Sequence[SlotRange] | SlotRange = (ALL_SLOTS,),
        reverse: bool = False,
    ) -> Iterator[tuple[bytes, bytes]]:
        """Lazily yield ``(key, value)`` with ``key.startswith(prefix)`` and
        ``key >= start`` (``<=`` when ``reverse``), in user-key order across ``slots``,
        at most ``limit`` pairs."""
        if limit is not None and limit < 0:
            raise InvalidArgument("limit must not be negative")
        if isinstance(slots, SlotRange):
            slots = (slots,)
        per_slot = [self._scan_slot(s, prefix, start, reverse) for r in slots for s in r]
        return islice(heapq.merge(*per_slot, key=itemgetter(0), reverse=reverse), limit)

    def _scan_slot(self, slot: int, prefix: bytes, start: bytes | None, reverse: bool) -> Iterator[tuple[bytes, bytes]]:
        sp = slot_prefix(slot)
        succ = _successor(prefix)
        lo = sp + prefix
        hi = sp + succ if succ is not None else slot_prefix(slot + 1)
        if start is not None:
            if reverse:
                hi = min(hi, sp + start + b"\x00")
            else:
                lo = max(lo, sp + start)
        if lo >= hi:
            return iter(())
        now = self._clock()
        return (
            (k[SLOT_PREFIX_LEN:], value)
            for k, blob in self._src.iterate(lo, hi, reverse)
            if (value := entries.value_of(blob, now)) is not None
        )

    def ascend(self, prefix: bytes = b"", start: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        return self.scan(prefix, start)

    def descend(self, prefix: bytes = b"", start: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        return self.scan(prefix, start, reverse=True)

    def iter_slots(self, slots: SlotRange) -> Iterator[tuple[bytes, bytes]]:
        """``(key, stored entry)`` of a slot range in storage order (slot, then key), expired
        entries included (they are state until their ``EXPIRE`` record applies)."""
        lo, hi = slots.storage_bounds()
        return ((k[SLOT_PREFIX_LEN:], v) for k, v in self._src.iterate(lo, hi))

    def page_slots(
        self, slots: SlotRange, after: bytes | None, limit: int, budget: int | None = None
    ) -> list[tuple[bytes, bytes]]:
        """Up to ``limit`` ``(storage key, stored entry)`` pairs of a slot range, after storage key ``after``,
        and (with a ``budget``) no more once they count ``budget`` bytes (:func:`dkv.keys.take_page`)."""
        lo, hi = slots.storage_bounds()
        if after is not None:
            lo = max(lo, after + b"\x00")
        if lo >= hi:
            return []
        if budget is None:
            return list(islice(self._src.iterate(lo, hi), limit))
        return take_page(self._src.iterate(lo, hi), budget, pair_bytes, limit)

    def count_slot(self, slot: int) -> int:
        return sum(1 for _ in self.iter_slots(SlotRange(slot, slot)))

    def count_live(self, ranges: Sequence[SlotRange], after: bytes | None, budget: int) -> tuple[int, bytes | None]:
        """``(live keys, resume)`` of ``ranges`` in storage order after storage key ``after``,
        reading at most ``budget`` stored rows; ``resume`` is the last storage key read when
        the budget ran out (pass it as ``after``), None when the ranges are done."""
        now = self._clock()
        live = read = 0
        last: bytes | None = None
        for r in sorted(ranges, key=lambda r: r.start):
            lo, hi = r.storage_bounds()
            if after is not None:
                lo = max(lo, after + b"\x00")
            if lo >= hi:
                continue
            for k, blob in self._src.iterate(lo, hi):
                if read >= budget:
                    return live, last
                read += 1
                last = k
                if entries.value_of(blob, now) is not None:
                    live += 1
        return live, None

    def due(self, now: int, limit: int) -> list[tuple[int, bytes]]:
        """Up to ``limit`` index rows with a deadline at or before ``now``: ``(deadline, storage key)``."""
        lo, hi = EXPIRY_PREFIX, EXPIRY_PREFIX + (now + 1).to_bytes(8, "big")
        n = len(EXPIRY_PREFIX)
        return [(int.from_bytes(k[n : n + 8], "big"), k[n + 8 :]) for k, _ in islice(self._src.iterate(lo, hi), limit)]

    def digest(self, slots: SlotRange = ALL_SLOTS) -> str:
        """Hex SHA-256 of the length-prefixed pairs of ``slots`` (stored entries), to compare replicas."""
        h = hashlib.sha256()
        for key, value in self.iter_slots(slots):
            h.update(len(key).to_bytes(4, "big") + key + len(value).to_bytes(4, "big") + value)
        return h.hexdigest()

    def close(self) -> None:
        """Close the underlying engine or snapshot; idempotent."""
        self._src.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class StoreSnapshot(StoreView):
    """A consistent read-only view of a :class:`Store`; close it when done."""


class Batch:
    """Puts and deletes applied atomically, in order, by :meth:`commit`.

    As a context manager it commits on clean exit and discards on error.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._ops: list[WriteOp] = []

    def put(self, key: bytes, value: bytes, rev: int = 0) -> "Batch":
        self._ops.append((_skey(key), entries.encode(value, rev)))
        return self

    def delete(self, key: bytes) -> "Batch":
        self._ops.append((_skey(key), None))
        return self

    def commit(self, sync: bool = False) -> None:
        ops, self._ops = self._ops, []
        self._engine.write(ops, sync)

    def __enter__(self) -> "Batch":
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.commit()


class Store(StoreView):
    """The node's key-value state machine over one :class:`Engine`."""

    def __init__(self, engine: Engine, clock: Any = now_ms) -> None:
        super().__init__(engine, clock)
        self._engine = engine
        self._check_format()
        self._lsn = super().applied_lsn
        self._epoch = super().applied_epoch
        self._rev = super().applied_rev

    def _check_format(self) -> None:
        found = self._engine.get(_FORMAT)
        if found == FORMAT:
            return
        if found is not None:
            raise CorruptLog(f"the store holds entries in format {found!r}; this dkv reads {FORMAT!r}")
        lo, hi = ALL_SLOTS.storage_bounds()
        if super().applied_lsn or next(iter(self._engine.iterate(lo, hi)), None) is not None:
            raise CorruptLog(
                "the store was written by a dkv before revisions and TTL; this dkv cannot "
                "read it: export its data with that version, or start with an empty data directory"
            )
        self._engine.write([(_FORMAT, FORMAT)], sync=True)

    @classmethod
    def open(cls, kind: str, path: str | None = None) -> "Store":
        """Open a ``"leveldb"`` store at ``path`` or a ``"memory"`` store."""
        if kind == "leveldb":
            if not path:
                raise InvalidArgument("the leveldb engine needs a data directory")
            return cls(LevelDBEngine(path))
        if kind == "memory":
            return cls(MemoryEngine())
        raise InvalidArgument(f"unknown storage engine {kind!r} (expected 'leveldb' or 'memory')")

    @property
    def applied_lsn(self) -> int:
        return self._lsn

    @property
    def applied_epoch(self) -> int:
        return self._epoch

    @property
    def applied_rev(self) -> int:
        return self._rev

    def put(self, key: bytes, value: bytes, rev: int = 0) -> None:
        """Write directly (not logged), with no deadline."""
        self._engine.write([(_skey(key), entries.encode(value, rev))])

    def delete(self, key: bytes) -> None:
        """Delete directly (not logged); deleting an absent key is a no-op."""
        self._engine.write([(_skey(key), None)])

    def batch(self) -> Batch:
        return Batch(self._engine)

    def _meta_ops(self, lsn: int, epoch: int, rev: int) -> list[WriteOp]:
        return [
            (_APPLIED_LSN, lsn.to_bytes(8, "big")),
            (_APPLIED_EPOCH, epoch.to_bytes(8, "big")),
            (_APPLIED_REV, rev.to_bytes(8, "big")),
        ]

    def apply(self, records: Sequence[Record]) -> int:
        """Apply committed log records and return the new applied LSN.

        Records at or below the applied LSN are skipped (idempotent replay); the
        rest must continue contiguously from it, else ``ValueError`` and nothing
        changes. Data, expiry index rows and applied LSN/epoch/revision are written
        in one atomic batch. Applying involves no clock and no condition.
        """
        lsn, epoch, rev = self._lsn, self._epoch, self._rev
        ops: list[WriteOp] = []
        for r in records:
            if r.lsn <= self._lsn:
                continue
            if r.lsn != lsn + 1:
                raise ValueError(f"log gap: expected lsn {lsn + 1}, got {r.lsn}")
            op = r.op
            if op == Op.PUT:
                sk = _skey(r.key)
                ops.append((sk, entries.encode(r.value, r.rev, r.expires_at)))
                if r.expires_at:
                    ops.append((expiry_row(r.expires_at, sk), b""))
            elif op == Op.DELETE or op == Op.EXPIRE or op == Op.PURGE:
                sk = _skey(r.key)
                ops.append((sk, None))
                if r.expires_at:
                    ops.append((expiry_row(r.expires_at, sk), None))
            elif op == Op.IMPORT:
                sk = _skey(r.key)
                ops.append((sk, r.value))
                if r.expires_at:
                    ops.append((expiry_row(r.expires_at, sk), b""))
            elif op != Op.NOOP:
                raise ValueError(f"unknown op {op!r} at lsn {r.lsn}")
            lsn, epoch, rev = r.lsn, r.epoch, max(rev, r.rev)
        if lsn != self._lsn:
            self._engine.write(ops + self._meta_ops(lsn, epoch, rev))
            self._lsn, self._epoch, self._rev = lsn, epoch, rev
        return lsn

    def set_applied(self, lsn: int, epoch: int, rev: int = 0) -> None:
        """Set the applied LSN/epoch/revision directly (after installing a snapshot taken at ``lsn``)."""
        rev = max(rev, self._rev)
        self._engine.write(self._meta_ops(lsn, epoch, rev))
        self._lsn, self._epoch, self._rev = lsn, epoch, rev

    def install(self, pairs: Sequence[tuple[bytes, bytes]] | Sequence[list[bytes]]) -> None:
        """Write a chunk of a storage snapshot: ``(user key, stored entry)`` pairs, with their
        expiry index rows (not logged)."""
        ops: list[WriteOp] = []
        for k, blob in pairs:
            try:
                entries.decode(blob)  # a malformed entry is refused before anything is written
            except ValueError as e:
                raise InvalidArgument(f"snapshot entry of {quote(k)}: {e}") from None
            sk = _skey(k)
            ops.append((sk, blob))
            if deadline := entries.deadline_of(blob):
                ops.append((expiry_row(deadline, sk), b""))
        self._engine.write(ops)

    def drop_due(self, rows: Sequence[tuple[int, bytes]]) -> None:
        """Delete expiry index rows (local housekeeping, not logged)."""
        self._engine.write([(expiry_row(d, sk), None) for d, sk in rows])

    def clear(self) -> int:
        """Delete every key of every slot and every expiry index row (metadata stays); return
        how many keys. Bulk: call off the hub."""
        n = 0
        lo, hi = ALL_SLOTS.storage_bounds()
        for lo, hi, counts in ((lo, hi, True), (EXPIRY_PREFIX, META_PREFIX, False)):
            while True:
                keys = [k for k, _ in islice(self._engine.iterate(lo, hi), 10_000)]
                if not keys:
                    break
                self._engine.write([(k, None) for k in keys])
                n += len(keys) if counts else 0
        return n

    def checkpoint(self) -> int:
        """Make everything applied so far durable; return the durable applied LSN."""
        lsn = self._lsn
        self._engine.write(self._meta_ops(lsn, self._epoch, self._rev), sync=True)
        log.debug("checkpoint at lsn %d", lsn)
        return lsn

    def snapshot(self) -> StoreSnapshot:
        return StoreSnapshot(self._engine.snapshot(), self._clock)
