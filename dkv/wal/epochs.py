"""Epoch boundaries of a log: which LSN each epoch starts at (pure, no I/O).

Replication needs the epoch of any retained record (to check a prepare's
``(prev_lsn, prev_epoch)``) and the last LSN a given epoch reached in this log
(to tell a member with a divergent tail where to cut it, as Kafka's leader
epochs do). Both logs keep one of these, updated on append/truncate/reset.
"""

from __future__ import annotations

import bisect
from typing import Iterable

from dkv.wal.record import Record


class EpochIndex:
    def __init__(self) -> None:
        self._epochs: list[int] = []  # ascending
        self._starts: list[int] = []  # first lsn of each epoch, ascending

    def note(self, epoch: int, lsn: int) -> None:
        """Record that ``lsn`` (the next record appended) has ``epoch``."""
        if not self._epochs or self._epochs[-1] != epoch:
            if self._epochs and epoch < self._epochs[-1]:
                raise ValueError(f"epoch went backwards at lsn {lsn}: {self._epochs[-1]} -> {epoch}")
            self._epochs.append(epoch)
            self._starts.append(lsn)

    def note_all(self, records: Iterable[Record]) -> None:
        for r in records:
            self.note(r.epoch, r.lsn)

    def epoch_at(self, lsn: int) -> int | None:
        """The epoch of record ``lsn`` (None if before the first known record).

        The caller checks ``lsn <= last_lsn``.
        """
        i = bisect.bisect_right(self._starts, lsn) - 1
        return self._epochs[i] if i >= 0 else None

    def end_of(self, epoch: int, last_lsn: int) -> int:
        """The last LSN whose epoch is <= ``epoch`` (``last_lsn`` if no later epoch).

        Returns one less than the first known LSN when every known record has a
        later epoch.
        """
        i = bisect.bisect_right(self._epochs, epoch)
        if i == len(self._epochs):
            return last_lsn
        return self._starts[i] - 1

    def truncate_after(self, lsn: int) -> None:
        while self._starts and self._starts[-1] > lsn:
            self._starts.pop()
            self._epochs.pop()

    def reset(self) -> None:
        self._epochs.clear()
        self._starts.clear()

    def as_list(self) -> list[tuple[int, int]]:
        return list(zip(self._epochs, self._starts))
