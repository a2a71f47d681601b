"""The key-value store over a raw engine: slot-prefixed user keys, applied-LSN
metadata, batches, log apply, ordered scans and replica digests.

Storage keys are ``slot_prefix(slot_of(key)) + key``. Metadata lives under
:data:`META_PREFIX`, above every slot prefix (0x0000..0x03ff), so it never
collides with data and never shows up in slot scans.
"""
from __future__ import annotations

import hashlib
import heapq
import logging
from itertools import islice
from operator import itemgetter
from types import TracebackType
from typing import Any, Iterator, Self, Sequence

from dkv.errors import InvalidArgument, KeyIsEmpty, KeyNotFound
from dkv.keys import pair_bytes, quote, take_page
from dkv.slots import ALL_SLOTS, SLOT_PREFIX_LEN, SlotRange, slot_prefix, storage_key
from dkv.storage.engine import Engine, Reader, WriteOp
from dkv.storage.leveldb import LevelDBEngine
from dkv.storage.memory import MemoryEngine
from dkv.wal.record import Op, Record

log = logging.getLogger(__name__)

META_PREFIX = b"\xff\xff" + b"meta:"
_APPLIED_LSN = META_PREFIX + b"applied_lsn"
_APPLIED_EPOCH = META_PREFIX + b"applied_epoch"
_MISSING: Any = object()


def _skey(key: bytes) -> bytes:
    if not key:
        raise KeyIsEmpty("key must not be empty")
    return storage_key(key)


def _successor(prefix: bytes) -> bytes | None:
    """The smallest string above every string starting with ``prefix`` (None if unbounded)."""
    stripped = prefix.rstrip(b"\xff")
    return stripped[:-1] + bytes([stripped[-1] + 1]) if stripped else None


class StoreView:
    """Read operations over an engine or over a snapshot of one."""

    def __init__(self, src: Reader) -> None:
        self._src = src

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

    def get(self, key: bytes, default: Any = _MISSING) -> bytes:
        """The value of ``key``; ``default`` if absent, else ``KeyNotFound``."""
        value = self._src.get(_skey(key))
        if value is not None:
            return value
        if default is _MISSING:
            raise KeyNotFound(f"key {quote(key)} not found")
        return default

    def exists(self, key: bytes) -> bool:
        return self._src.get(_skey(key)) is not None

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

    def _scan_slot(
        self, slot: int, prefix: bytes, start: bytes | None, reverse: bool
    ) -> Iterator[tuple[bytes, bytes]]:
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
        return ((k[SLOT_PREFIX_LEN:], v) for k, v in self._src.iterate(lo, hi, reverse))

    def ascend(self, prefix: bytes = b"", start: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        return self.scan(prefix, start)

    def descend(self, prefix: bytes = b"", start: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        return self.scan(prefix, start, reverse=True)

    def iter_slots(self, slots: SlotRange) -> Iterator[tuple[bytes, bytes]]:
        """``(key, value)`` of a slot range in storage order (slot, then key)."""
        lo, hi = slots.storage_bounds()
        return ((k[SLOT_PREFIX_LEN:], v) for k, v in self._src.iterate(lo, hi))

    def page_slots(self, slots: SlotRange, after: bytes | None, limit: int,
                   budget: int | None = None) -> list[tuple[bytes, bytes]]:
        """Up to ``limit`` ``(storage key, value)`` pairs of a slot range, after storage key ``after``,
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

    def digest(self, slots: SlotRange = ALL_SLOTS) -> str:
        """Hex SHA-256 of the length-prefixed pairs of ``slots``, to compare replicas."""
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

    def put(self, key: bytes, value: bytes) -> "Batch":
        self._ops.append((_skey(key), value))
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

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        self._engine = engine
        self._lsn = super().applied_lsn
        self._epoch = super().applied_epoch

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

    def put(self, key: bytes, value: bytes) -> None:
        """Write directly (not logged)."""
        self._engine.write([(_skey(key), value)])

    def delete(self, key: bytes) -> None:
        """Delete directly (not logged); deleting an absent key is a no-op."""
        self._engine.write([(_skey(key), None)])

    def batch(self) -> Batch:
        return Batch(self._engine)

    def _meta_ops(self, lsn: int, epoch: int) -> list[WriteOp]:
        return [(_APPLIED_LSN, lsn.to_bytes(8, "big")), (_APPLIED_EPOCH, epoch.to_bytes(8, "big"))]

    def apply(self, records: Sequence[Record]) -> int:
        """Apply committed log records and return the new applied LSN.

        Records at or below the applied LSN are skipped (idempotent replay); the
        rest must continue contiguously from it, else ``ValueError`` and nothing
        changes. Data and applied LSN/epoch are written in one atomic batch.
        """
        lsn, epoch = self._lsn, self._epoch
        ops: list[WriteOp] = []
        for r in records:
            if r.lsn <= self._lsn:
                continue
            if r.lsn != lsn + 1:
                raise ValueError(f"log gap: expected lsn {lsn + 1}, got {r.lsn}")
            if r.op == Op.PUT:
                ops.append((_skey(r.key), r.value))
            elif r.op == Op.DELETE:
                ops.append((_skey(r.key), None))
            else:
                raise ValueError(f"unknown op {r.op!r} at lsn {r.lsn}")
            lsn, epoch = r.lsn, r.epoch
        if ops:
            self._engine.write(ops + self._meta_ops(lsn, epoch))
            self._lsn, self._epoch = lsn, epoch
        return lsn

    def set_applied(self, lsn: int, epoch: int) -> None:
        """Set the applied LSN/epoch directly (after installing a snapshot taken at ``lsn``)."""
        self._engine.write(self._meta_ops(lsn, epoch))
        self._lsn, self._epoch = lsn, epoch

    def clear(self) -> int:
        """Delete every key of every slot (metadata stays); return how many. Bulk: call off the hub."""
        lo, hi = ALL_SLOTS.storage_bounds()
        n = 0
        while True:
            keys = [k for k, _ in islice(self._engine.iterate(lo, hi), 10_000)]
            if not keys:
                return n
            self._engine.write([(k, None) for k in keys])
            n += len(keys)

    def checkpoint(self) -> int:
        """Make everything applied so far durable; return the durable applied LSN."""
        lsn = self._lsn
        self._engine.write(self._meta_ops(lsn, self._epoch), sync=True)
        log.debug("checkpoint at lsn %d", lsn)
        return lsn

    def snapshot(self) -> StoreSnapshot:
        return StoreSnapshot(self._engine.snapshot())
