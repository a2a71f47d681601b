"""Validation and coercion of user keys and values (DESIGN §3 limits, G6), and message budgets (G7).

Keys and values are ``bytes``; ``str`` is accepted and encoded as UTF-8.
Anything else, an empty key, or a key/value over the configured limits raises
:class:`~dkv.errors.InvalidArgument` before anything is changed.

**Budgets.** Every batch or page a dkv party sends (a replication prepare, a
catch-up chunk, a snapshot chunk, a migration page, a scan page, a client batch
and its reply) is filled up to :attr:`Limits.page_bytes`, a *soft* budget: its
producer stops adding items once the budget is reached, but always takes at
least one, so progress is guaranteed (:func:`take_page`). An item counts
:func:`item_bytes` (key, value and :data:`ITEM_OVERHEAD` for its framing), and one
item is at most ``max_key_bytes + max_value_bytes`` plus that overhead. So no
legal message exceeds :attr:`Limits.max_message_bytes`, the size nodes accept at
most (``ZMQ_MAXMSGSIZE`` of their server socket).

**Log quotes.** Log lines and error messages quote caller input through
:func:`quote`, which keeps at most ~200 bytes of it.
"""

from __future__ import annotations

import reprlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from dkv.errors import InvalidArgument, KeyIsEmpty

T = TypeVar("T")

DEFAULT_MAX_KEY = 1024
DEFAULT_MAX_VALUE = 1024 * 1024
#: The soft byte budget of every batch and page (see the module doc).
DEFAULT_PAGE_BYTES = 8 * 1024 * 1024
#: Bytes counted per item on top of its key and value: its msgpack framing and, for a log
#: record, its epoch, LSN and op (about 30 bytes in all).
ITEM_OVERHEAD = 64
#: Allowance of a message beyond its items: the zerorpc/msgpack envelope (headers, method
#: name, small arguments) and, in a batch's reply, one short entry per op that is not a
#: value (a result, or an error whose message quotes at most ~200 bytes of input) for up to
#: 10,000 ops.
MESSAGE_OVERHEAD = 4 * 1024 * 1024
#: Most bytes of caller input one log line or error message quotes.
QUOTE_BYTES = 200


@dataclass(frozen=True)
class Limits:
    max_key_bytes: int = DEFAULT_MAX_KEY
    max_value_bytes: int = DEFAULT_MAX_VALUE
    #: soft byte budget of every batch and page (see the module doc)
    page_bytes: int = DEFAULT_PAGE_BYTES

    @property
    def max_item_bytes(self) -> int:
        """The most one item (a key and its value, framed) counts."""
        return self.max_key_bytes + self.max_value_bytes + ITEM_OVERHEAD

    @property
    def max_message_bytes(self) -> int:
        """The largest legal message: a full page, plus the one item that may overshoot it,
        plus :data:`MESSAGE_OVERHEAD` (envelope, framing, the short entries of a batch reply).
        Nodes refuse larger ones at the socket (``ZMQ_MAXMSGSIZE``)."""
        return self.page_bytes + self.max_item_bytes + MESSAGE_OVERHEAD

    def key(self, key: Any) -> bytes:
        """Return ``key`` as bytes or raise ``InvalidArgument``."""
        k = as_bytes(key, "key")
        if not k:
            raise KeyIsEmpty("key must not be empty")
        if len(k) > self.max_key_bytes:
            raise InvalidArgument(
                f"key is {len(k)} bytes; the limit is {self.max_key_bytes}",
                limit=self.max_key_bytes,
            )
        return k

    def value(self, value: Any) -> bytes:
        """Return ``value`` as bytes or raise ``InvalidArgument``."""
        v = as_bytes(value, "value")
        if len(v) > self.max_value_bytes:
            raise InvalidArgument(
                f"value is {len(v)} bytes; the limit is {self.max_value_bytes}",
                limit=self.max_value_bytes,
            )
        return v


def as_bytes(x: Any, what: str) -> bytes:
    if isinstance(x, bytes):
        return x
    if isinstance(x, str):
        return x.encode("utf-8")
    if isinstance(x, (bytearray, memoryview)):
        return bytes(x)
    raise InvalidArgument(f"{what} must be bytes or str, not {type(x).__name__}")


def item_bytes(key: bytes, value: bytes | None = b"") -> int:
    """What one ``(key, value)`` item counts against a page budget."""
    return len(key) + (len(value) if value is not None else 0) + ITEM_OVERHEAD


def pair_bytes(pair: Any) -> int:
    """:func:`item_bytes` of a ``(key, value)`` pair (tuple or list)."""
    return item_bytes(pair[0], pair[1])


def take_page(items: Iterable[T], budget: int, size: Callable[[T], int], limit: int | None = None) -> list[T]:
    """Items from ``items`` until ``limit`` items are taken or their ``size`` reaches
    ``budget`` (soft: the last item may overshoot it); always at least one, if any.

    An iterator is consumed only as far as taken: the next call continues after the page.
    """
    out: list[T] = []
    used = 0
    it = iter(items)
    while (not out or used < budget) and (limit is None or len(out) < limit):
        try:
            item = next(it)
        except StopIteration:
            break
        out.append(item)
        used += size(item)
    return out


def page_is_full(items: Iterable[T], budget: int, size: Callable[[T], int], limit: int | None = None) -> bool:
    """Whether a page :func:`take_page` made may have stopped before the end of its source
    (it holds ``limit`` items or reached ``budget``); False means the source was exhausted."""
    n, used = 0, 0
    for item in items:
        n += 1
        used += size(item)
    return (limit is not None and n >= limit) or used >= budget


def quote(x: Any, limit: int = QUOTE_BYTES) -> str:
    """A ``repr`` of ``x`` of at most about ``limit`` characters, for log lines and error
    messages that quote caller input (which may be megabytes, or deeply nested): it never
    builds the whole repr of a large value."""
    r = _Quoter(limit).repr(x)
    return r if len(r) <= limit + 40 else f"{r[:limit]}..."


class _Quoter(reprlib.Repr):
    """reprlib, with bytes cut before they are repr'd and a length note on what was cut."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.maxstring = self.maxother = limit
        self.maxlevel = 3

    def repr_str(self, x: str, level: int) -> str:
        return _cut(x, self.maxstring, "chars")

    def repr_bytes(self, x: bytes, level: int) -> str:
        return _cut(x, self.maxstring, "bytes")

    def repr_bytearray(self, x: bytearray, level: int) -> str:
        return _cut(bytes(x[: self.maxstring + 1]), self.maxstring, "bytes", len(x))

    def repr_instance(self, x: Any, level: int) -> str:
        try:
            return _cut(repr(x), self.maxother, "chars")
        except Exception:  # noqa: BLE001 -- a hostile __repr__ must not break logging
            return f"<{type(x).__name__}>"


def _cut(x: str | bytes, limit: int, unit: str, size: int | None = None) -> str:
    size = len(x) if size is None else size
    if size <= limit:
        return repr(x)
    return f"{x[:limit]!r}...({size} {unit})"
