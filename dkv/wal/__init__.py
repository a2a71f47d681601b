"""The write-ahead log package: records, their byte codec, and the durable segmented log.

:class:`WriteAheadLog` (``dkv.wal.log``) is the disk log; :mod:`dkv.wal.codec`
frames records; :class:`Record` / :class:`Op` (``dkv.wal.record``) are the data.
"""

from __future__ import annotations

from dkv.wal.log import WriteAheadLog
from dkv.wal.record import Op, Record

__all__ = ("Op", "Record", "WriteAheadLog")
