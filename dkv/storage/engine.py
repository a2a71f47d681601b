"""The raw ordered-engine interface: a dumb, sorted byte-key store.

Engines know nothing about slots, user keys or metadata (that is
:mod:`dkv.storage.store`). Concrete engines implement the underscore hooks;
the public methods here add the shared closed-check so every engine and every
snapshot raises :class:`~dkv.errors.StorageClosed` the same way.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from types import TracebackType
from typing import Iterator, Self, Sequence

from dkv.errors import StorageClosed

#: One write operation: ``(key, value)``; ``value is None`` deletes ``key``.
WriteOp = tuple[bytes, bytes | None]


class Reader(ABC):
    """Point and range reads, shared by engines and their snapshots."""

    _closed: bool = False
    _what = "storage engine"

    def get(self, key: bytes) -> bytes | None:
        """The value of ``key``, or ``None`` if absent."""
        self._check()
        return self._get(key)

    def iterate(
        self, start: bytes | None = None, stop: bytes | None = None, reverse: bool = False
    ) -> Iterator[tuple[bytes, bytes]]:
        """Lazily yield ``(key, value)`` for keys in ``[start, stop)``, ascending or descending."""
        self._check()
        return self._iterate(start, stop, reverse)

    def close(self) -> None:
        """Release resources; idempotent. Later operations raise ``StorageClosed``."""
        if not self._closed:
            self._closed = True
            self._release()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _check(self) -> None:
        if self._closed:
            raise StorageClosed(f"{self._what} is closed")

    @abstractmethod
    def _get(self, key: bytes) -> bytes | None: ...

    @abstractmethod
    def _iterate(self, start: bytes | None, stop: bytes | None, reverse: bool) -> Iterator[tuple[bytes, bytes]]: ...

    @abstractmethod
    def _release(self) -> None: ...


class EngineSnapshot(Reader):
    """A consistent, read-only view of an engine at one instant."""

    _what = "storage snapshot"


class Engine(Reader):
    """An ordered byte-key store with atomic batched writes."""

    def write(self, ops: Sequence[WriteOp], sync: bool = False) -> None:
        """Apply ``ops`` atomically and in order; ``sync`` makes them durable before returning."""
        self._check()
        if ops:
            self._write(ops, sync)

    def snapshot(self) -> EngineSnapshot:
        """A consistent read-only view; close it when done."""
        self._check()
        return self._snapshot()

    @abstractmethod
    def _write(self, ops: Sequence[WriteOp], sync: bool) -> None: ...

    @abstractmethod
    def _snapshot(self) -> EngineSnapshot: ...
