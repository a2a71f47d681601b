"""The log record: the unit of durability, replication and apply.

A :class:`Record` is stamped ``(epoch, lsn)`` (DESIGN §4) and carries a
*revision*: the shard's monotonic change number that watches order events by
and ``get(with_meta=True)`` reports. Its on-disk encoding lives in
:mod:`dkv.wal.codec`.

Every decision (a condition, an increment, an expiry) is taken once, by the
writer's sequencer (:mod:`dkv.node.sequencer`); records are plain outcomes that
every member applies the same way, with no clock and no condition.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Sequence


class Op(IntEnum):
    #: write ``value`` (user bytes) with revision ``rev``, expiring at ``expires_at`` (0: never)
    PUT = 1
    #: delete ``key`` (a watch event); ``expires_at``: the deadline the deleted entry had (0: none)
    DELETE = 2
    #: delete ``key`` because its deadline ``expires_at`` passed (an ``expire`` watch event)
    EXPIRE = 3
    #: write an entry copied by a slot migration: ``value`` is the stored entry (user value,
    #: revision and deadline as the source had them, :mod:`dkv.storage.entry`); not an event
    IMPORT = 4
    #: delete ``key`` without an event (range deletes of a migration); ``expires_at`` as for DELETE
    PURGE = 5
    #: change nothing; its ``rev`` raises the shard's revision floor (a migration's last step)
    NOOP = 6


#: ops that watchers see, and the event type each becomes
EVENT_TYPES = {Op.PUT: "set", Op.DELETE: "delete", Op.EXPIRE: "expire"}


@dataclass(frozen=True, slots=True)
class Record:
    epoch: int
    lsn: int
    op: Op
    key: bytes
    value: bytes = b""
    #: the record's revision: strictly increasing along a shard's log, across failovers and
    #: (through NOOP floors) across migrations
    rev: int = 0
    #: milliseconds since the Unix epoch; 0: none (see :class:`Op` for what it means per op)
    expires_at: int = 0


def check_continues(records: Sequence[Record], next_lsn: int, last_epoch: int) -> None:
    """Raise ValueError unless ``records`` continue a log at ``next_lsn`` with non-decreasing epochs."""
    epoch = last_epoch
    for i, rec in enumerate(records):
        if rec.lsn != next_lsn + i:
            raise ValueError(f"non-contiguous append: got lsn {rec.lsn}, expected {next_lsn + i}")
        if rec.epoch < epoch:
            raise ValueError(f"epoch goes backwards at lsn {rec.lsn}: {epoch} -> {rec.epoch}")
        epoch = rec.epoch
