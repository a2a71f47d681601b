"""An in-memory log with the :class:`~dkv.wal.log.WriteAheadLog` interface.

Used by diskless mode (``--engine memory``): nothing touches the disk, so a
restart loses everything; a cluster relies on its replicas instead. Only the
newest ``retain`` records are kept (older ones are compacted away, as a disk
WAL's old segments are), so memory stays bounded.
"""

from __future__ import annotations

from typing import Iterator, Sequence

from dkv.errors import StorageClosed
from dkv.wal.epochs import EpochIndex
from dkv.wal.record import Record, check_continues


class MemoryLog:
    def __init__(self, retain: int = 100_000) -> None:
        self._retain = retain
        self._records: list[Record] = []
        self._base = 0  # lsn of the record before the first retained one
        self._base_rev = 0  # and its revision
        self._closed = False
        self._appends = 0
        #: keep records from this LSN on (a slot migration reads them), up to 10 x ``retain``
        self.retain_from: int | None = None
        self.epochs = EpochIndex()

    @property
    def first_lsn(self) -> int:
        return self._records[0].lsn if self._records else 0

    @property
    def last_lsn(self) -> int:
        return self._records[-1].lsn if self._records else self._base

    @property
    def last_epoch(self) -> int:
        return self._records[-1].epoch if self._records else 0

    @property
    def last_rev(self) -> int:
        return self._records[-1].rev if self._records else self._base_rev

    @property
    def base_rev(self) -> int:
        """Revision of the last record dropped (0 if none was): history is complete above it."""
        return self._base_rev

    @property
    def segment_count(self) -> int:
        return 0

    @property
    def stats(self) -> dict[str, int]:
        return {
            "segments": 0,
            "bytes": 0,
            "appends": self._appends,
            "fsyncs": 0,
            "first_lsn": self.first_lsn,
            "last_lsn": self.last_lsn,
        }

    def _check_open(self) -> None:
        if self._closed:
            raise StorageClosed("log is closed")

    def append(self, records: Sequence[Record]) -> None:
        self._check_open()
        check_continues(records, self.last_lsn + 1, self.last_epoch)
        self._records.extend(records)
        self.epochs.note_all(records)
        self._appends += 1
        if len(self._records) > 2 * self._retain:  # trim in chunks: amortised O(1)
            cut = len(self._records) - self._retain
            if self.retain_from is not None and len(self._records) <= 10 * self._retain:
                cut = min(cut, max(0, self.retain_from - self.first_lsn))
            if cut > 0:
                self._base, self._base_rev = self._records[cut - 1].lsn, self._records[cut - 1].rev
                del self._records[:cut]

    def read_from(self, lsn: int, limit: int | None = None) -> Iterator[Record]:
        self._check_open()
        if self._records and lsn < self.first_lsn:
            raise ValueError(f"lsn {lsn} was compacted; the log starts at {self.first_lsn}")
        start = max(0, lsn - self.first_lsn) if self._records else 0
        end = None if limit is None else start + limit
        return iter(self._records[start:end])

    def truncate_after(self, lsn: int) -> int:
        self._check_open()
        if lsn >= self.last_lsn:
            return 0
        keep = [r for r in self._records if r.lsn <= lsn]
        removed = len(self._records) - len(keep)
        self._records = keep
        self.epochs.truncate_after(lsn)
        return removed

    def compact(self, checkpoint_lsn: int) -> int:
        # The memory engine's applied state is not durable, so there is no
        # durable checkpoint to compact below: keep everything.
        return 0

    def reset_to(self, lsn: int, rev: int = 0) -> None:
        self._check_open()
        self._records = []
        self._base, self._base_rev = lsn, rev
        self.epochs.reset()

    def close(self) -> None:
        self._closed = True
