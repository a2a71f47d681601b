"""The log record: the unit of durability, replication and apply.

A :class:`Record` is stamped ``(epoch, lsn)`` (DESIGN §4). Its on-disk encoding
lives in :mod:`dkv.wal.codec`.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


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
