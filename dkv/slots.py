"""Key -> slot mapping, slot ranges, and the slot-prefixed storage key layout.

A key's slot is ``crc32(key) % 1024`` with crcmod's predefined ``crc-32``
(DESIGN §1). Storage keys are ``slot (2 bytes, big-endian) + user key``, so one
slot, or a contiguous range of slots, is one contiguous range of the storage
engine's keyspace (DESIGN §3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import crcmod.predefined

NUM_SLOTS = 1024
SLOT_PREFIX_LEN = 2

_crc32 = crcmod.predefined.mkPredefinedCrcFun("crc-32")


def slot_of(key: bytes) -> int:
    """The slot (0..1023) that owns ``key``."""
    return _crc32(key) % NUM_SLOTS


def slot_prefix(slot: int) -> bytes:
    """The 2-byte big-endian prefix of every storage key in ``slot``."""
    return slot.to_bytes(SLOT_PREFIX_LEN, "big")


def storage_key(key: bytes) -> bytes:
    """The storage-engine key of user ``key``: slot prefix + key."""
    return slot_prefix(slot_of(key)) + key


def user_key(skey: bytes) -> bytes:
    """Inverse of :func:`storage_key`."""
    return skey[SLOT_PREFIX_LEN:]


def slot_of_storage_key(skey: bytes) -> int:
    return int.from_bytes(skey[:SLOT_PREFIX_LEN], "big")


@dataclass(frozen=True, order=True)
class SlotRange:
    """An inclusive range of slots ``[start, end]``."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if not (0 <= self.start <= self.end < NUM_SLOTS):
            raise ValueError(f"invalid slot range [{self.start}, {self.end}]")

    def __contains__(self, slot: object) -> bool:
        return isinstance(slot, int) and self.start <= slot <= self.end

    def __len__(self) -> int:
        return self.end - self.start + 1

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.end + 1))

    def storage_bounds(self) -> tuple[bytes, bytes]:
        """``[lo, hi)`` storage-key bounds covering every key of the range."""
        # slot_prefix(1024) == b"\x04\x00": past every slot, below the meta keys
        return slot_prefix(self.start), slot_prefix(self.end + 1)

    def to_list(self) -> list[int]:
        return [self.start, self.end]


ALL_SLOTS = SlotRange(0, NUM_SLOTS - 1)


def split_even(n: int) -> list[SlotRange]:
    """Split the 1024 slots into ``n`` contiguous ranges whose sizes differ by at most one."""
    if n < 1:
        raise ValueError("need at least one range")
    base, extra = divmod(NUM_SLOTS, n)
    out, start = [], 0
    for i in range(n):
        size = base + (1 if i < extra else 0)
        out.append(SlotRange(start, start + size - 1))
        start += size
    return out


def merge_ranges(slots: Iterable[int]) -> list[SlotRange]:
    """Collapse a set of slots into sorted maximal ranges."""
    out: list[SlotRange] = []
    for s in sorted(set(slots)):
        if out and out[-1].end == s - 1:
            out[-1] = SlotRange(out[-1].start, s)
        else:
            out.append(SlotRange(s, s))
    return out
