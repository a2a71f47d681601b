"""The on-disk :class:`~dkv.storage.engine.Engine`, backed by LevelDB via plyvel."""

from __future__ import annotations

import logging
import os
from itertools import takewhile
from typing import Any, Iterator, Sequence

import plyvel

from dkv.errors import DKVError, StorageClosed
from dkv.storage.engine import Engine, EngineSnapshot, Reader, WriteOp

log = logging.getLogger(__name__)

_OPTIONS: dict[str, Any] = {
    "lru_cache_size": 64 << 20,
    "bloom_filter_bits": 10,
    "write_buffer_size": 16 << 20,
    # LevelDB silently stores blocks uncompressed when built without snappy.
    "compression": "snappy",
}


class _PlyvelReader(Reader):
    """Reads through a plyvel ``DB`` or ``Snapshot`` (they share get/iterator)."""

    _src: Any

    def _get(self, key: bytes) -> bytes | None:
        try:
            return self._src.get(key)
        except RuntimeError as e:  # plyvel's "database or snapshot is closed"
            raise StorageClosed(str(e)) from None

    def _iterate(self, start: bytes | None, stop: bytes | None, reverse: bool) -> Iterator[tuple[bytes, bytes]]:
        try:
            if reverse and start is not None:
                # plyvel 1.5 yields nothing in reverse when the first key in range equals
                # ``start``, so bound the low end here instead.
                it = self._src.iterator(stop=stop, reverse=True)
                yield from takewhile(lambda kv: kv[0] >= start, it)
            else:
                yield from self._src.iterator(start=start, stop=stop, reverse=reverse)
        except RuntimeError as e:  # the database was closed mid-iteration
            raise StorageClosed(str(e)) from None


class _LevelDBSnapshot(_PlyvelReader, EngineSnapshot):
    def __init__(self, snap: Any) -> None:
        self._src = snap

    def _release(self) -> None:
        self._src.close()


class LevelDBEngine(_PlyvelReader, Engine):
    """A LevelDB database in directory ``path`` (exclusive to one process)."""

    def __init__(self, path: str, create_if_missing: bool = True) -> None:
        self.path = path
        if create_if_missing:
            os.makedirs(path, exist_ok=True)
        try:
            self._src = plyvel.DB(path, create_if_missing=create_if_missing, **_OPTIONS)
        except plyvel.IOError as e:
            detail = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
            if "lock" in detail.lower():
                raise DKVError(f"data directory {path} is in use by another process (LevelDB LOCK): {detail}") from None
            raise DKVError(f"cannot open data directory {path}: {detail}") from None
        except plyvel.Error as e:
            raise DKVError(f"cannot open data directory {path}: {e}") from None
        log.info("opened LevelDB at %s", path)

    def _write(self, ops: Sequence[WriteOp], sync: bool) -> None:
        with self._src.write_batch(transaction=True, sync=sync) as wb:
            for key, value in ops:
                if value is None:
                    wb.delete(key)
                else:
                    wb.put(key, value)

    def _snapshot(self) -> EngineSnapshot:
        return _LevelDBSnapshot(self._src.snapshot())

    def _release(self) -> None:
        self._src.close()
        log.info("closed LevelDB at %s", self.path)
