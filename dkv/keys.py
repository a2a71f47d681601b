"""Validation and coercion of user keys and values (DESIGN §3 limits, G6).

Keys and values are ``bytes``; ``str`` is accepted and encoded as UTF-8.
Anything else, an empty key, or a key/value over the configured limits raises
:class:`~dkv.errors.InvalidArgument` before anything is changed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dkv.errors import InvalidArgument, KeyIsEmpty

DEFAULT_MAX_KEY = 1024
DEFAULT_MAX_VALUE = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    max_key_bytes: int = DEFAULT_MAX_KEY
    max_value_bytes: int = DEFAULT_MAX_VALUE

    @property
    def max_message_bytes(self) -> int:
        """The largest message a node accepts (ZMQ_MAXMSGSIZE): one page of 8 MiB plus one
        largest item plus 1 MiB of framing (provisional; the page budget lands separately)."""
        return 8 * 1024 * 1024 + self.max_key_bytes + self.max_value_bytes + 1024 * 1024

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
