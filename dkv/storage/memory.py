"""The diskless :class:`~dkv.storage.engine.Engine`: a lock-guarded SortedDict."""

from __future__ import annotations

import threading
from itertools import islice
from typing import Iterator, Sequence

from sortedcontainers import SortedDict

from dkv.storage.engine import Engine, EngineSnapshot, Reader, WriteOp

#: Keys fetched per lock acquisition while iterating.
_CHUNK = 256


class _SortedReader(Reader):
    """Reads over ``self._data`` under ``self._lock``.

    Iteration is lazy and safe against concurrent writes: it copies out one
    chunk at a time under the lock and resumes after the last key it yielded.
    """

    def __init__(self, data: SortedDict) -> None:
        self._data = data
        self._lock = threading.Lock()

    def _get(self, key: bytes) -> bytes | None:
        with self._lock:
            return self._data.get(key)

    def _iterate(self, start: bytes | None, stop: bytes | None, reverse: bool) -> Iterator[tuple[bytes, bytes]]:
        lo, hi, inclusive = start, stop, (True, False)
        while True:
            self._check()
            with self._lock:
                keys = list(islice(self._data.irange(lo, hi, inclusive, reverse), _CHUNK))
                chunk = [(k, self._data[k]) for k in keys]
            yield from chunk
            if len(keys) < _CHUNK:
                return
            if reverse:
                hi, inclusive = keys[-1], (inclusive[0], False)
            else:
                lo, inclusive = keys[-1], (False, inclusive[1])


class _MemorySnapshot(_SortedReader, EngineSnapshot):
    def _release(self) -> None:
        self._data = SortedDict()


class MemoryEngine(_SortedReader, Engine):
    """An in-memory ordered store; contents are lost on close.

    :meth:`snapshot` copies the whole dict: O(n) time and memory per snapshot.
    """

    def __init__(self) -> None:
        super().__init__(SortedDict())

    def _write(self, ops: Sequence[WriteOp], sync: bool) -> None:
        with self._lock:
            for key, value in ops:
                if value is None:
                    self._data.pop(key, None)
                else:
                    self._data[key] = value

    def _snapshot(self) -> EngineSnapshot:
        with self._lock:
            return _MemorySnapshot(self._data.copy())

    def _release(self) -> None:
        with self._lock:
            self._data = SortedDict()
