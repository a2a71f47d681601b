"""The durable write-ahead log: segmented, append-only record files in one directory.

Layout: ``wal-{first_lsn:020d}.log`` files, each holding contiguous records
(see :mod:`dkv.wal.codec`) starting at ``first_lsn``; LSNs continue from one
segment to the next. Only the last (active) segment is appended to. An empty
active segment is named by the next LSN to append, which is how an empty log
remembers its base LSN durably (see :meth:`WriteAheadLog.reset_to`).

Each segment has a sparse in-memory index (LSN -> byte offset), built by
recovery and kept up to date by every call that changes the log. It holds the
segment's first record (offset 0) and then a record whenever one starts at
least :data:`INDEX_EVERY_RECORDS` records *or* :data:`INDEX_EVERY_BYTES` bytes
after the previous entry, whichever comes first. :meth:`WriteAheadLog.read_from`
seeks to the nearest entry at or before the requested LSN and reads forward in
:data:`READ_CHUNK_BYTES` chunks, so a read touches the records it returns plus
less than one index stride and one chunk, never the whole segment.

Recovery tells a torn tail from corruption (DESIGN G6). Segments are read in
order; the valid run of a segment ends at the first frame that does not decode
(bad length, bad CRC, garbage) or does not continue the log (wrong LSN, epoch
going back). Then:

* in a segment that is not the last, or at a gap between segments, it is
  corruption: later segments hold acknowledged records;
* in the last segment, recovery looks past the bad spot for a frame that
  *continues* the log (:func:`~dkv.wal.codec.find_resync`): one that decodes
  with a correct CRC, an epoch no lower than the last good one, and an LSN above
  the last good LSN but by no more than the number of frames that could fit in
  the bytes skipped (``1 + gap // MIN_FRAME_BYTES``). If there is one, valid
  records follow the damage, so it is corruption, not a crash mid-append. If
  there is none (nothing, zeros, a partial frame, stale or foreign frames), it is
  a torn tail: it is cut off with a warning.

Corruption makes opening raise :class:`~dkv.errors.CorruptLog` naming the
segment, the byte offset and how many bytes follow, and changes nothing on
disk. The forward look decodes at most :data:`RESYNC_MAX_CANDIDATES` candidate
offsets (found at C speed; zero runs are skipped); if that budget runs out
without a verdict, recovery also refuses (never guess towards losing data).

Repair is an explicit act: :func:`repair` copies every byte from the bad offset
to the end of the log (later segments included) to ``quarantine-*.bin`` files
in the log's directory, makes them durable, and only then cuts the log there.

A crash that persists the pages of one unacknowledged append out of order (a
hole of zeros followed by later records of the same batch) is indistinguishable
from corruption by this rule, so it too needs an explicit repair; it is never
silently cut.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import os
import re
import struct
import time
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO, Generator, Iterator, Sequence

from dkv.errors import CorruptLog, StorageClosed
from dkv.stats import LATENCY_BOUNDS, Histogram
from dkv.wal.codec import MAX_BODY_BYTES, MIN_BODY_BYTES, decode_from, encode, find_resync, iter_records
from dkv.wal.epochs import EpochIndex
from dkv.wal.record import Record, check_continues

logger = logging.getLogger(__name__)

_SEGMENT_NAME = re.compile(r"wal-(\d{20})\.log")
_FRAME_LEN = struct.Struct("<I")  # a frame's leading body_len (see dkv.wal.codec)
_FRAME_HEADER_BYTES = 8  # body_len and crc32
#: The file that names a log directory's record format (:mod:`dkv.wal.codec`); a directory
#: with segments but another format (or none: written before formats were named) is refused.
FORMAT_FILE = "FORMAT"
FORMAT = "dkv-wal 2"
#: The file that remembers the revision of the last record compaction deleted (watch history).
BASE_REV_FILE = "base-rev"

#: A segment's sparse index gets an entry for a record that starts at least this
#: many records ...
INDEX_EVERY_RECORDS = 1000
#: ... or at least this many bytes after the previous entry, whichever comes first.
INDEX_EVERY_BYTES = 1024 * 1024
#: Reads go forward through a segment this many bytes at a time (more for a bigger record).
READ_CHUNK_BYTES = 1024 * 1024
#: Recovery decodes at most this many candidate offsets past a bad spot when it
#: looks for valid records (about a second of work on garbage).
RESYNC_MAX_CANDIDATES = 1_000_000
#: compaction keeps at most this many otherwise-deletable segments for a slot migration (1 GiB at 64 MiB)
MAX_RETAINED_SEGMENTS = 16


class _SparseIndex:
    """LSN -> byte offset of some records of one segment, both ascending.

    Always holds the segment's first LSN at offset 0 (also while the segment is
    empty: its first record will go there); see the module docstring for which
    other records get an entry.
    """

    __slots__ = ("lsns", "offsets")

    def __init__(self, first_lsn: int) -> None:
        self.lsns = [first_lsn]
        self.offsets = [0]

    def note(self, lsn: int, offset: int) -> None:
        """Record ``lsn`` starts at ``offset``; called for each record in order."""
        if lsn - self.lsns[-1] >= INDEX_EVERY_RECORDS or offset - self.offsets[-1] >= INDEX_EVERY_BYTES:
            self.lsns.append(lsn)
            self.offsets.append(offset)

    def floor(self, lsn: int) -> tuple[int, int]:
        """The ``(lsn, offset)`` entry with the highest LSN <= ``lsn`` (the first entry if none)."""
        i = max(bisect.bisect_right(self.lsns, lsn) - 1, 0)
        return self.lsns[i], self.offsets[i]

    def truncate_after(self, lsn: int) -> None:
        """Drop the entries above ``lsn`` (never the first)."""
        keep = max(bisect.bisect_right(self.lsns, lsn), 1)
        del self.lsns[keep:]
        del self.offsets[keep:]


class WriteAheadLog:
    """A segmented write-ahead log with group commit and crash recovery.

    Opening runs recovery: segments are scanned in order; a torn tail of the
    last segment is cut off (with a warning), while damage followed by valid
    records, or in an earlier segment, raises :class:`~dkv.errors.CorruptLog`
    and changes nothing (see the module docstring).

    Not thread-safe: the node calls it from gevent's threadpool one call at a
    time. :meth:`read_from` reads files lazily as it is iterated (a chunk at a
    time, starting from the segment's sparse index), so iterate it within the
    same call (e.g. ``list(log.read_from(...))``), before any other method runs.

    An OSError from a call that changes the log closes it (later calls raise
    StorageClosed): the on-disk state is then unknown, and reopening recovers.

    With ``fsync=False`` no call syncs anything (tests, benchmarks): a crash of
    the machine may then lose or tear any recent write.
    """

    def __init__(
        self, directory: str | os.PathLike[str], segment_bytes: int = 64 * 1024 * 1024, fsync: bool = True
    ) -> None:
        if segment_bytes < 1:
            raise ValueError(f"segment_bytes must be positive, got {segment_bytes}")
        self._dir = Path(directory)
        self._segment_bytes = segment_bytes
        self._fsync = fsync
        self._segments: list[int] = []  # first_lsn of each segment, ascending
        self._index: dict[int, _SparseIndex] = {}  # by first_lsn, one per segment
        self._fd: int | None = None  # the active (last) segment, O_APPEND
        self._active_bytes = 0
        self._last_lsn = 0
        self._last_epoch = 0
        self._last_rev = 0
        self._base_rev = 0
        self._appends = 0
        self._fsyncs = 0
        #: how long each append's fdatasync took (the metrics read it)
        self.fsync_seconds = Histogram(LATENCY_BOUNDS)
        self._closed = False
        #: compaction keeps every record from this LSN on (a slot migration reads them) ...
        self.retain_from: int | None = None
        #: ... in at most this many segments it could otherwise delete: a move that stalls must
        #: not fill the disk (past this it finds its records gone and starts over)
        self.max_retained_segments = MAX_RETAINED_SEGMENTS
        #: epoch boundaries of the retained records (for replication)
        self.epochs = EpochIndex()
        self._dir.mkdir(parents=True, exist_ok=True)
        self._check_format()
        self._recover()
        logger.info(
            "opened WAL %s: %d segment(s), lsn %d..%d", self._dir, len(self._segments), self.first_lsn, self._last_lsn
        )

    # -- state -------------------------------------------------------------

    @property
    def first_lsn(self) -> int:
        """The lowest LSN in the log; 0 if the log holds no record."""
        if self._segments and self._last_lsn >= self._segments[0]:
            return self._segments[0]
        return 0

    @property
    def last_lsn(self) -> int:
        """The highest LSN in the log; for an empty log its base (0 unless set by reset_to)."""
        return self._last_lsn

    @property
    def last_epoch(self) -> int:
        """The epoch of the last record; 0 if the log holds no record."""
        return self._last_epoch

    @property
    def last_rev(self) -> int:
        """The revision of the last record; ``base_rev`` if the log holds no record."""
        return self._last_rev if self.first_lsn else self._base_rev

    @property
    def base_rev(self) -> int:
        """The revision of the last record before the first one retained (compacted or reset
        away; 0 if none was): history from the log is complete for revisions above it."""
        return self._base_rev

    @property
    def segment_count(self) -> int:
        return len(self._segments)

    @property
    def stats(self) -> dict[str, int]:
        """Segment count, total bytes, append calls, data syncs (one per append) and LSN range."""
        return {
            "segments": len(self._segments),
            "bytes": sum(map(self._size, list(self._segments))),
            "appends": self._appends,
            "fsyncs": self._fsyncs,
            "first_lsn": self.first_lsn,
            "last_lsn": self._last_lsn,
        }

    def _size(self, first: int) -> int:
        """A segment file's size (0 if compaction deleted it meanwhile, off the hub)."""
        try:
            return self._path(first).stat().st_size
        except FileNotFoundError:
            return 0

    # -- operations --------------------------------------------------------

    def append(self, records: Sequence[Record]) -> None:
        """Durably append a batch: one write and one fdatasync (group commit).

        ``records[0].lsn`` must be ``last_lsn + 1`` (any LSN >= 1 for a new,
        empty log) and the rest must follow one by one; otherwise ValueError
        and nothing is written. A batch never spans two segments.

        If it raises OSError the batch may or may not be durable.
        """
        self._check_open()
        if not records:
            return
        expected = self._last_lsn + 1 if self._segments else max(records[0].lsn, 1)
        check_continues(records, expected, self._last_epoch)
        frames = [encode(rec) for rec in records]
        data = b"".join(frames)
        with self._close_on_error(f"append at lsn {expected}"):
            if not self._segments:
                self._new_segment(expected)
            elif self._active_bytes >= self._segment_bytes:
                self._roll()
            assert self._fd is not None
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            if self._fsync:
                t0 = time.perf_counter()
                os.fdatasync(self._fd)
                self.fsync_seconds.observe(time.perf_counter() - t0)
                self._fsyncs += 1
        index, offset = self._index[self._segments[-1]], self._active_bytes
        for rec, frame in zip(records, frames):
            index.note(rec.lsn, offset)
            offset += len(frame)
        self._active_bytes = offset
        self.epochs.note_all(records)
        self._last_lsn = records[-1].lsn
        self._last_epoch = records[-1].epoch
        self._last_rev = records[-1].rev
        self._appends += 1

    def read_from(self, lsn: int, limit: int | None = None) -> Iterator[Record]:
        """Records with ``record.lsn >= lsn`` in order, at most ``limit`` of them.

        Raises ValueError if ``lsn`` is below the lowest LSN the log retains
        (it was compacted away or reset past: the caller needs a snapshot).
        Reading past ``last_lsn`` yields nothing.

        Lazy: seeks to the sparse-index entry at or before ``lsn`` and reads
        forward a chunk at a time, on into later segments, only as far as the
        records taken; it never yields a record past the ``last_lsn`` of the call.
        """
        self._check_open()
        if self._segments and lsn < self._segments[0]:
            raise ValueError(f"lsn {lsn} is no longer in the log; it starts at {self._segments[0]}")
        if lsn > self._last_lsn:
            return iter(())
        start = bisect.bisect_right(self._segments, lsn) - 1
        return itertools.islice(self._records_from(lsn, self._segments[start:], self._last_lsn), limit)

    def truncate_after(self, lsn: int) -> int:
        """Durably remove every record with an LSN above ``lsn``; return how many.

        A no-op (0) if ``lsn >= last_lsn``. The next append must be ``lsn + 1``.
        Raises ValueError if ``lsn`` is below ``first_lsn - 1`` (those records
        are compacted; use :meth:`reset_to`).
        """
        self._check_open()
        if not self._segments or lsn >= self._last_lsn:
            return 0
        if lsn < self._segments[0] - 1:
            raise ValueError(f"cannot truncate to lsn {lsn}: the log starts at {self._segments[0]}")
        keep = max(bisect.bisect_right(self._segments, lsn) - 1, 0)
        with self._close_on_error(f"truncate after lsn {lsn}"):
            self._close_fd()
            self._delete(self._segments[keep + 1 :][::-1])  # newest first: a crash leaves a prefix
            for first in self._segments[keep + 1 :]:
                del self._index[first]
            del self._segments[keep + 1 :]
            index = self._index[self._segments[keep]]
            _, cut = index.floor(lsn)
            epoch, rev = 0, self._base_rev
            with closing(self._scan(self._segments[keep], cut)) as scan:
                for rec, _, end in scan:
                    if rec.lsn > lsn:
                        break
                    cut, epoch, rev = end, rec.epoch, rec.rev
            index.truncate_after(lsn)
            self._open(self._segments[-1])
            self._cut(cut)
        removed = self._last_lsn - lsn
        self.epochs.truncate_after(lsn)
        self._last_lsn = lsn
        self._last_epoch = epoch
        self._last_rev = rev
        logger.info("WAL truncated after lsn %d: %d record(s) removed", lsn, removed)
        return removed

    def _covered(self, lsn: int) -> int:
        """How many leading segments hold only records with LSN <= ``lsn`` (never the active one)."""
        n = 0
        while n + 1 < len(self._segments) and self._segments[n + 1] <= lsn + 1:
            n += 1
        return n

    def compact(self, checkpoint_lsn: int) -> int:
        """Delete the segments whose records all have LSN <= ``checkpoint_lsn``; return how many.

        The active (last) segment is never deleted, nor one holding ``retain_from`` or later
        (up to ``max_retained_segments`` of them).
        """
        self._check_open()
        n = self._covered(checkpoint_lsn)
        if self.retain_from is not None:
            kept = n - self._covered(min(checkpoint_lsn, self.retain_from - 1))
            if kept > self.max_retained_segments:
                logger.warning(
                    "WAL: a slot migration holds %d segment(s) from lsn %d; releasing the oldest "
                    "(the move restarts its copy)",
                    kept,
                    self.retain_from,
                )
            n -= min(kept, self.max_retained_segments)
        if n:
            with self._close_on_error(f"compact to lsn {checkpoint_lsn}"):
                last_deleted = list(self.read_from(self._segments[n] - 1, 1))
                if last_deleted:  # first, so a crash can only leave it ahead of the segments
                    self._write_base_rev(last_deleted[0].rev)
                self._delete(self._segments[:n])  # oldest first: a crash leaves a suffix
            for first in self._segments[:n]:
                del self._index[first]
            del self._segments[:n]
            logger.info("WAL compacted to checkpoint lsn %d: %d segment(s) deleted", checkpoint_lsn, n)
        return n

    def reset_to(self, lsn: int, rev: int = 0) -> None:
        """Durably drop the whole log so that the next append must be ``lsn + 1``.

        Used after installing a snapshot at ``lsn`` whose last record had revision
        ``rev``. A crash during the call leaves a prefix of the old log (or none);
        the caller redoes the reset.
        """
        self._check_open()
        if lsn < 0:
            raise ValueError(f"lsn must be >= 0, got {lsn}")
        with self._close_on_error(f"reset to lsn {lsn}"):
            self._write_base_rev(rev)
            self._close_fd()
            self._delete(self._segments[::-1])
            self._segments = []
            self._index = {}
            self._new_segment(lsn + 1)
        self.epochs.reset()
        self._last_lsn = lsn
        self._last_epoch = 0
        self._last_rev = rev
        logger.info("WAL reset: next lsn is %d", lsn + 1)

    def close(self) -> None:
        """Close the log; idempotent. Later calls other than properties raise StorageClosed."""
        if not self._closed:
            self._closed = True
            self._close_fd()

    # -- internals ---------------------------------------------------------

    def _check_format(self) -> None:
        """Refuse a directory whose segments are in another record format; name a new one's."""
        marker = self._dir / FORMAT_FILE
        has_segments = any(_SEGMENT_NAME.fullmatch(p.name) for p in self._dir.iterdir())
        if marker.exists():
            found = marker.read_text().strip()
            if found != FORMAT:
                raise CorruptLog(
                    f"WAL directory {self._dir} holds records in format {found!r}; this dkv reads {FORMAT!r}"
                )
        elif has_segments:
            raise CorruptLog(
                f"WAL directory {self._dir} was written by a dkv before revisions and TTL "
                f"(no {FORMAT_FILE} file); this dkv cannot read it: export its data with "
                "that version, or start this node with an empty data directory"
            )
        else:
            _write_durably(marker, FORMAT + "\n", self._fsync)
        base = self._dir / BASE_REV_FILE
        self._base_rev = int(base.read_text()) if base.exists() else 0

    def _write_base_rev(self, rev: int) -> None:
        self._base_rev = rev
        _write_durably(self._dir / BASE_REV_FILE, f"{rev}\n", self._fsync)

    def _recover(self) -> None:
        """Load the segment list and cut a torn tail of the last segment; raise CorruptLog on corruption."""
        self._segments = sorted(int(m.group(1)) for p in self._dir.iterdir() if (m := _SEGMENT_NAME.fullmatch(p.name)))
        self._index = {first: _SparseIndex(first) for first in self._segments}
        expected = 1  # the next LSN: where the following segment must start
        for i, first in enumerate(self._segments):
            path = self._path(first)
            if i and first != expected:
                raise self._corrupt(
                    i,
                    0,
                    expected - 1,
                    f"the segment starts at lsn {first} but the previous one ends at lsn {expected - 1}",
                )
            data = path.read_bytes()
            expected, good_end, index = first, 0, self._index[first]
            for rec, start, end in iter_records(data):
                if rec.lsn != expected or rec.epoch < self._last_epoch:
                    break
                self.epochs.note(rec.epoch, rec.lsn)
                index.note(rec.lsn, start)
                expected, good_end, self._last_epoch, self._last_rev = expected + 1, end, rec.epoch, rec.rev
            is_last = i == len(self._segments) - 1
            if good_end != len(data) and not is_last:
                raise self._corrupt(i, good_end, expected - 1, "later segments follow the damage")
            if good_end != len(data):
                found, exhausted = find_resync(data, good_end, expected - 1, self._last_epoch, RESYNC_MAX_CANDIDATES)
                if found is not None:
                    lsn = struct.unpack_from("<Q", data, found + _FRAME_HEADER_BYTES + 8)[0]
                    raise self._corrupt(
                        i, good_end, expected - 1, f"valid records follow the damage (lsn {lsn} at offset {found})"
                    )
                if exhausted:
                    raise self._corrupt(
                        i,
                        good_end,
                        expected - 1,
                        "the damage cannot be told from a torn tail (no valid record "
                        "was found after it within the scan limit)",
                    )
            if is_last:
                self._open(first)
                self._active_bytes = good_end
                if good_end != len(data):
                    self._cut(good_end)
                    logger.warning(
                        "WAL segment %s: dropped a torn tail of %d byte(s) at offset %d; the log now ends at lsn %d",
                        path,
                        len(data) - good_end,
                        good_end,
                        expected - 1,
                    )
        self._last_lsn = expected - 1

    def _corrupt(self, i: int, offset: int, last_good_lsn: int, why: str) -> CorruptLog:
        """The error for damage at ``offset`` of the ``i``-th segment (``why`` says what is wrong)."""
        path = self._path(self._segments[i])
        following = sum(self._path(first).stat().st_size for first in self._segments[i:]) - offset
        return CorruptLog(
            f"WAL segment {path} is corrupt at byte offset {offset}: {why}; {following} "
            f"byte(s) from there to the end of the log; the last good record is lsn "
            f"{last_good_lsn}",
            path=str(path),
            offset=offset,
            following_bytes=following,
            last_good_lsn=last_good_lsn,
        )

    @contextmanager
    def _close_on_error(self, what: str) -> Iterator[None]:
        """Close the log if the body raises OSError: its state is then unknown; reopening recovers."""
        try:
            yield
        except OSError:
            logger.exception("WAL %s failed; closing the log", what)
            self.close()
            raise

    def _records_from(self, lsn: int, segments: list[int], last_lsn: int) -> Iterator[Record]:
        """Records ``lsn..last_lsn`` from ``segments`` (the first holds ``lsn``), read lazily."""
        _, offset = self._index[segments[0]].floor(lsn)
        for first in segments:
            with closing(self._scan(first, offset)) as scan:
                for rec, _, _ in scan:
                    if rec.lsn > last_lsn:
                        return
                    if rec.lsn >= lsn:
                        yield rec
            offset = 0

    def _scan(self, first_lsn: int, offset: int) -> Generator[tuple[Record, int, int], None, None]:
        """Yield ``(record, start, end)`` (file offsets) from ``offset`` of segment ``first_lsn``.

        Reads :data:`READ_CHUNK_BYTES` at a time (or the rest of a record that
        is bigger); stops silently at end of file or at the first spot that is
        not a valid record, as :func:`~dkv.wal.codec.iter_records` does.
        """
        with self._open_segment(first_lsn) as f:
            f.seek(offset)
            buf, pos = b"", 0  # buf holds the file from offset - pos on
            while True:
                decoded = decode_from(buf, pos)
                if decoded is not None:
                    rec, end = decoded
                    yield rec, offset, offset + end - pos
                    offset += end - pos
                    pos = end
                    continue
                have, want = len(buf) - pos, READ_CHUNK_BYTES
                if have >= _FRAME_HEADER_BYTES:
                    body_len = _FRAME_LEN.unpack_from(buf, pos)[0]
                    if not MIN_BODY_BYTES <= body_len <= MAX_BODY_BYTES:
                        return  # garbage: more bytes cannot make it a record
                    missing = _FRAME_HEADER_BYTES + body_len - have
                    if missing <= 0:
                        return  # a complete frame that is not a valid record
                    want = max(want, missing)  # a record bigger than a chunk: read all of it
                chunk = f.read(want)
                if not chunk:
                    return
                buf, pos = buf[pos:] + chunk, 0

    def _open_segment(self, first_lsn: int) -> BinaryIO:
        """Open segment ``first_lsn`` for reading (unbuffered: :meth:`_scan` reads in chunks)."""
        return open(self._path(first_lsn), "rb", buffering=0)

    def _path(self, first_lsn: int) -> Path:
        return self._dir / f"wal-{first_lsn:020d}.log"

    def _open(self, first_lsn: int) -> None:
        """Open (creating if needed) segment ``first_lsn`` as the active one."""
        self._fd = os.open(self._path(first_lsn), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _new_segment(self, first_lsn: int) -> None:
        self._open(first_lsn)
        self._segments.append(first_lsn)
        self._index[first_lsn] = _SparseIndex(first_lsn)
        self._active_bytes = 0
        self._sync_dir()

    def _roll(self) -> None:
        assert self._fd is not None
        if self._fsync:
            os.fsync(self._fd)
        self._close_fd()
        self._new_segment(self._last_lsn + 1)
        logger.debug("WAL rolled over to segment %d", self._last_lsn + 1)

    def _cut(self, size: int) -> None:
        """Truncate the active segment to ``size`` bytes, durably."""
        assert self._fd is not None
        os.ftruncate(self._fd, size)
        if self._fsync:
            os.fsync(self._fd)
        self._active_bytes = size

    def _delete(self, firsts: list[int]) -> None:
        for first in firsts:
            self._path(first).unlink()
        if firsts:
            self._sync_dir()

    def _sync_dir(self) -> None:
        _fsync_dir(self._dir, self._fsync)

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _check_open(self) -> None:
        if self._closed:
            raise StorageClosed("the write-ahead log is closed")


@dataclass(frozen=True)
class Repair:
    """What :func:`repair` cut from a corrupt log."""

    #: the segment holding the damage, and its byte offset (where the log was cut)
    segment: str
    offset: int
    #: bytes cut: from ``offset`` to the end of the log, later segments included
    cut_bytes: int
    #: the last record kept
    last_good_lsn: int
    #: the quarantine files holding the cut bytes (one per segment, in order)
    quarantined: tuple[str, ...]
    #: valid records found in the cut bytes, and their lowest and highest LSN (0, 0 if none)
    records: int
    lsn_range: tuple[int, int]


def _valid_records(data: bytes, after_lsn: int) -> list[int]:
    """The LSNs of the valid frames in ``data`` (cut bytes), found as recovery would look for them."""
    lsns: list[int] = []
    pos, last = 0, after_lsn
    while True:
        for rec, _, end in iter_records(data, pos):
            lsns.append(rec.lsn)
            pos, last = end, rec.lsn
        found, _ = find_resync(data, pos, last, 0, RESYNC_MAX_CANDIDATES)
        if found is None:
            return lsns
        pos = found


def repair(directory: str | os.PathLike[str], fsync: bool = True) -> Repair | None:
    """Cut a corrupt log at its corruption, after quarantining the bytes cut; None if it is not corrupt.

    Copies every byte from the corruption to the end of the log to
    ``quarantine-<UTC time>-<segment>.bin`` files in ``directory`` (one per
    segment: the damaged one from the bad offset, later ones whole), syncs them,
    then deletes the later segments and truncates the damaged one at the bad
    offset. Logs what was lost. A torn tail is cut by opening, as always.
    The log must not be open elsewhere (the node holds its store's lock).
    """
    wal_dir = Path(directory)
    try:
        WriteAheadLog(wal_dir, fsync=fsync).close()
        return None
    except CorruptLog as e:
        damaged, offset, last_good = Path(e.data["path"]), int(e.data["offset"]), int(e.data["last_good_lsn"])
        logger.warning("WAL repair: %s", e)
    segments = sorted(p for p in wal_dir.iterdir() if _SEGMENT_NAME.fullmatch(p.name))
    affected = segments[segments.index(damaged) :]
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    quarantined: list[str] = []
    lsns: list[int] = []
    cut = 0
    for j, seg in enumerate(affected):
        data = seg.read_bytes()[offset if j == 0 else 0 :]
        lsns.extend(_valid_records(data, lsns[-1] if lsns else last_good))
        target = wal_dir / f"quarantine-{stamp}-{seg.stem}.bin"
        with open(target, "xb") as f:
            f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        quarantined.append(str(target))
        cut += len(data)
    _fsync_dir(wal_dir, fsync)
    # The cut bytes are durable in quarantine: now cut, newest first (a crash leaves a prefix).
    for seg in affected[:0:-1]:
        seg.unlink()
    if offset == 0 and damaged != segments[0]:
        damaged.unlink()  # an empty segment after the first would be a gap
    else:
        with open(damaged, "r+b") as f:
            f.truncate(offset)
            if fsync:
                os.fsync(f.fileno())
    _fsync_dir(wal_dir, fsync)
    report = Repair(
        str(damaged), offset, cut, last_good, tuple(quarantined), len(lsns), (min(lsns), max(lsns)) if lsns else (0, 0)
    )
    logger.warning(
        "WAL repair: cut %d byte(s) at offset %d of %s; the log now ends at lsn %d; %s; the cut bytes are in %s",
        cut,
        offset,
        damaged,
        last_good,
        f"{len(lsns)} valid record(s) in them (lsn {min(lsns)}..{max(lsns)}) are no longer in the log"
        if lsns
        else "no valid record was found in them",
        ", ".join(quarantined),
    )
    WriteAheadLog(wal_dir, fsync=fsync).close()  # it opens now (raises if it still does not)
    return report


def _write_durably(path: Path, text: str, fsync: bool) -> None:
    """Replace ``path`` with ``text`` atomically (write a temporary file, sync, rename, sync the dir)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent, fsync)


def _fsync_dir(directory: Path, fsync: bool) -> None:
    if not fsync:
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
