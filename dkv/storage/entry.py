"""How one key's entry is stored: the user value with its revision and deadline.

A stored value is ``u8 flags | u64 revision | [u64 expires_at] | value`` (big-endian;
``expires_at`` only when flag bit 0 is set: milliseconds since the Unix epoch).
Replicas hold byte-identical entries (the writer stamps revision and deadline into
the record), so digests compare them whole, and a migration copies them as they
are, revision and deadline included.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass

_HEAD = struct.Struct(">BQ")  # flags, revision
_DEADLINE = struct.Struct(">Q")
_HAS_DEADLINE = 0x01
#: bytes an entry adds to its value (without and with a deadline)
OVERHEAD = _HEAD.size
OVERHEAD_TTL = _HEAD.size + _DEADLINE.size


def now_ms() -> int:
    """The wall clock in milliseconds since the Unix epoch (expiry deadlines use it)."""
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class Entry:
    value: bytes
    rev: int
    #: milliseconds since the Unix epoch; 0: never expires
    expires_at: int = 0

    def expired(self, now: int) -> bool:
        return 0 < self.expires_at <= now


def encode(value: bytes, rev: int, expires_at: int = 0) -> bytes:
    if expires_at:
        return _HEAD.pack(_HAS_DEADLINE, rev) + _DEADLINE.pack(expires_at) + value
    return _HEAD.pack(0, rev) + value


def decode(blob: bytes) -> Entry:
    """The entry stored as ``blob``; ValueError if it is not one."""
    if len(blob) < _HEAD.size:
        raise ValueError(f"a stored entry has at least {_HEAD.size} bytes, got {len(blob)}")
    flags, rev = _HEAD.unpack_from(blob)
    if flags & ~_HAS_DEADLINE:
        raise ValueError(f"unknown entry flags {flags:#x}")
    if flags & _HAS_DEADLINE:
        if len(blob) < OVERHEAD_TTL:
            raise ValueError("a stored entry with a deadline is too short")
        return Entry(blob[OVERHEAD_TTL:], rev, _DEADLINE.unpack_from(blob, _HEAD.size)[0])
    return Entry(blob[_HEAD.size :], rev)


def value_of(blob: bytes, now: int) -> bytes | None:
    """The user value of a stored entry, or None if it has expired at ``now`` (fast path)."""
    if blob[0] & _HAS_DEADLINE:
        if _DEADLINE.unpack_from(blob, _HEAD.size)[0] <= now:
            return None
        return blob[OVERHEAD_TTL:]
    return blob[_HEAD.size :]


def deadline_of(blob: bytes) -> int:
    """The deadline of a stored entry (0: none)."""
    return _DEADLINE.unpack_from(blob, _HEAD.size)[0] if blob[0] & _HAS_DEADLINE else 0
