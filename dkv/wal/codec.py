"""Encode and decode WAL records to and from their on-disk byte format.

Every record is framed as (all integers little-endian)::

    u32 body_len | u32 crc32(body) | body

    body = u64 epoch | u64 lsn | u8 op | u64 rev | u64 expires_at | u32 key_len | key
           | u32 value_len | value

This is format 2 (revisions and deadlines); :mod:`dkv.wal.log` marks a log
directory with its format and refuses one written in another.

``crc32`` is :func:`zlib.crc32` over the body bytes. ``body_len`` is at least
:data:`MIN_BODY_BYTES` (a record with an empty key and value) and at most
:data:`MAX_BODY_BYTES`; anything outside that range is treated as garbage.

Decoding never raises on bad input: :func:`decode_from` answers ``None`` for
anything that is not one complete, valid record, and :func:`iter_records` stops
at the first such spot, so a caller finds a torn or corrupt tail by comparing
the last end offset with the buffer length. :func:`find_lsn` locates a record
in a known-good buffer by walking frame headers only. :func:`find_resync` looks
past a bad spot for a frame that continues the log (recovery uses it to tell a
torn tail from corruption, see :mod:`dkv.wal.log`).
"""

from __future__ import annotations

import re
import struct
import zlib
from types import MappingProxyType
from typing import Iterable, Iterator

from dkv.wal.record import Op, Record

_HEADER = struct.Struct("<II")  # body_len, crc32(body)
_BODY_HEAD = struct.Struct("<QQBQQI")  # epoch, lsn, op, rev, expires_at, key_len
_U32 = struct.Struct("<I")  # value_len
_LSN = struct.Struct("<Q")
_LSN_OFFSET = _HEADER.size + 8  # of the lsn in a frame: past the header and the epoch
_OPS = MappingProxyType({int(op): op for op in Op})  # a dict lookup is ~10x faster than Op(code)

#: Size of a body with an empty key and an empty value.
MIN_BODY_BYTES = _BODY_HEAD.size + _U32.size
#: Largest body accepted; a larger ``body_len`` is taken for garbage.
MAX_BODY_BYTES = 64 * 1024 * 1024
#: Size of the smallest frame (header plus an empty-key, empty-value body): a
#: frame's size is this plus its key and value lengths.
MIN_FRAME_BYTES = _HEADER.size + MIN_BODY_BYTES

_NONZERO = re.compile(rb"[^\x00]")
_ZERO_LEN = bytes(4)  # a body_len of 0: no frame starts here


def encode(rec: Record) -> bytes:
    """The framed bytes of one record.

    Raises ValueError if ``rec.op`` is not an :class:`Op` or the body would
    exceed :data:`MAX_BODY_BYTES` (it could never be decoded again).
    """
    body_len = MIN_BODY_BYTES + len(rec.key) + len(rec.value)
    if body_len > MAX_BODY_BYTES:
        raise ValueError(f"record lsn {rec.lsn} is {body_len} bytes; the limit is {MAX_BODY_BYTES}")
    body = b"".join(
        (
            _BODY_HEAD.pack(rec.epoch, rec.lsn, Op(rec.op), rec.rev, rec.expires_at, len(rec.key)),
            rec.key,
            _U32.pack(len(rec.value)),
            rec.value,
        )
    )
    return _HEADER.pack(body_len, zlib.crc32(body)) + body


def encode_many(records: Iterable[Record]) -> bytes:
    """The framed bytes of several records, back to back, as one bytes object."""
    return b"".join(encode(rec) for rec in records)


def decode_from(buf: bytes | memoryview, offset: int) -> tuple[Record, int] | None:
    """The record framed at ``offset`` and the offset just past it.

    ``None`` if ``buf[offset:]`` does not start with one complete, valid record
    (short header or body, implausible length, CRC mismatch, unknown op, or
    inner lengths that disagree with ``body_len``).
    """
    view = memoryview(buf)
    body_start = offset + _HEADER.size
    if offset < 0 or body_start > len(view):
        return None
    body_len, crc = _HEADER.unpack_from(view, offset)
    end = body_start + body_len
    if not MIN_BODY_BYTES <= body_len <= MAX_BODY_BYTES or end > len(view):
        return None
    if zlib.crc32(view[body_start:end]) != crc:
        return None
    epoch, lsn, op_code, rev, expires_at, key_len = _BODY_HEAD.unpack_from(view, body_start)
    key_start = body_start + _BODY_HEAD.size
    key_end = key_start + key_len
    if key_end + _U32.size > end:
        return None
    value_start = key_end + _U32.size
    if value_start + _U32.unpack_from(view, key_end)[0] != end:
        return None
    op = _OPS.get(op_code)
    if op is None:
        return None
    return Record(epoch, lsn, op, bytes(view[key_start:key_end]), bytes(view[value_start:end]), rev, expires_at), end


def iter_records(buf: bytes | memoryview, offset: int = 0) -> Iterator[tuple[Record, int, int]]:
    """Yield ``(record, start_offset, end_offset)`` from ``offset`` (default: the start) of ``buf``.

    Stops silently at the first spot that is not a valid record; the last
    ``end_offset`` (``offset`` if nothing was yielded) is where the valid run ends.
    """
    view = memoryview(buf)
    while (decoded := decode_from(view, offset)) is not None:
        rec, end = decoded
        yield rec, offset, end
        offset = end


def find_lsn(buf: bytes | memoryview, lsn: int) -> int:
    """The offset of the first record in ``buf`` whose LSN is >= ``lsn`` (``len(buf)`` if none).

    Walks the frame headers only, without checking CRCs or building records,
    so ``buf`` must be a run of valid records (e.g. a recovered log segment).
    """
    offset = 0
    while offset + _LSN_OFFSET + _LSN.size <= len(buf):
        if _LSN.unpack_from(buf, offset + _LSN_OFFSET)[0] >= lsn:
            return offset
        offset += _HEADER.size + _HEADER.unpack_from(buf, offset)[0]
    return len(buf)


def _candidates(lo: int, hi: int) -> re.Pattern[bytes]:
    """Offsets where a frame with ``lo <= lsn <= hi`` could start: ``body_len``'s top byte is at
    most 4 (``MAX_BODY_BYTES`` is 0x04000000) and the LSN has the high bytes that ``lo`` and ``hi``
    share (a zero-width match at each such offset)."""
    a, b = _LSN.pack(lo), _LSN.pack(hi)
    k = 0
    while k < _LSN.size and a[-1 - k] == b[-1 - k]:
        k += 1
    top = a[_LSN.size - k :]
    return re.compile(rb"(?s)(?=.{3}[\x00-\x04].{%d}%s)" % (_LSN_OFFSET - 4 + _LSN.size - k, re.escape(top)))


def find_resync(
    buf: bytes | memoryview, bad: int, last_lsn: int, last_epoch: int, max_candidates: int
) -> tuple[int | None, bool]:
    """Look past the bad spot at ``bad`` for a frame that continues the log; ``(offset, exhausted)``.

    The log's valid run ends at ``bad`` with ``last_lsn`` / ``last_epoch``. A
    frame at ``p > bad`` *continues* it if it decodes (length, CRC, op, inner
    lengths) with ``epoch >= last_epoch`` and ``last_lsn < lsn <= last_lsn + 1 +
    (p - bad) // MIN_FRAME_BYTES``: no more records could fit between ``bad`` and
    ``p`` than the LSNs it skips. Stale or foreign frames (an LSN from elsewhere)
    and zero-filled space do not count.

    Candidates: first the offset the frame header at ``bad`` points to (its
    length may be intact: a damaged body), then, in order, every offset after
    ``bad`` whose bytes could be such a frame's length and LSN (found by a regular
    expression, at C speed; zero runs are skipped). At most ``max_candidates`` are
    decoded. ``offset`` is the first continuing frame found, else ``None``;
    ``exhausted`` says the budget ran out first (undecided).
    """
    view = memoryview(buf)
    n = len(view)
    last_start = n - MIN_FRAME_BYTES  # no frame can start after this
    if bad > last_start:
        return None, False
    hi = last_lsn + 1 + (n - bad) // MIN_FRAME_BYTES

    def continues(p: int) -> bool:
        body_len = _U32.unpack_from(view, p)[0]
        if not MIN_BODY_BYTES <= body_len <= MAX_BODY_BYTES or p + _HEADER.size + body_len > n:
            return False
        if not last_lsn < _LSN.unpack_from(view, p + _LSN_OFFSET)[0] <= last_lsn + 1 + (p - bad) // MIN_FRAME_BYTES:
            return False
        decoded = decode_from(view, p)
        return decoded is not None and decoded[0].epoch >= last_epoch

    skip = bad + _HEADER.size + _U32.unpack_from(view, bad)[0]
    if bad < skip <= last_start and continues(skip):
        return skip, False
    pattern, p, budget = _candidates(last_lsn + 1, hi), bad + 1, max_candidates
    while p <= last_start and (m := pattern.search(view, p, last_start + MIN_FRAME_BYTES)) is not None:
        p = m.start()
        if view[p : p + 4] == _ZERO_LEN:  # inside a run of zeros: jump to its end
            if (z := _NONZERO.search(view, p)) is None:
                break
            p = max(p + 1, z.start() - 3)  # a body_len's low bytes may be zero
            continue
        if continues(p):
            return p, False
        budget -= 1
        if budget <= 0:
            return None, True
        p += 1
    return None, False
