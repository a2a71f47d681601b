"""The log record: the unit of durability, replication and apply.

A :class:`Record` is stamped ``(epoch, lsn)`` (DESIGN §4). Its on-disk encoding
lives in :mod:`dkv.wal.codec`.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Sequence


class Op(IntEnum):
    PUT = 1
    DELETE = 2


@dataclass(frozen=True, slots=True)
class Record:
    epoch: int
    lsn: int
    op: Op
    key: bytes
    value: bytes = b""


def check_continues(records: Sequence[Record], next_lsn: int, last_epoch: int) -> None:
    """Raise ValueError unless ``records`` continue a log at ``next_lsn`` with non-decreasing epochs."""
    epoch = last_epoch
    for i, rec in enumerate(records):
        if rec.lsn != next_lsn + i:
            raise ValueError(f"non-contiguous append: got lsn {rec.lsn}, expected {next_lsn + i}")
        if rec.epoch < epoch:
            raise ValueError(f"epoch goes backwards at lsn {rec.lsn}: {epoch} -> {rec.epoch}")
        epoch = rec.epoch
