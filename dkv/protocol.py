"""The client <-> node wire protocol: batched operations and their results.

A client sends ``batch(ops)`` where every op is a list ``[name, key, *args]``:

=========  ==========================  =================================
name       args                        result
=========  ==========================  =================================
``get``    ``key[, consistency]``      value bytes, or ``None``
``exists`` ``key``                     ``bool``
``set``    ``key, value``              ``None``
``del``    ``key``                     ``bool`` (the key existed)
=========  ==========================  =================================

The reply is one entry per op, in order: ``[0, result]`` on success or
``[1, [code, message, data]]`` on failure (see :func:`dkv.errors.to_wire`).
One failing op never fails the others.
"""
from __future__ import annotations

from typing import Any

from dkv.errors import DKVError, from_wire, to_wire

GET = "get"
EXISTS = "exists"
SET = "set"
DEL = "del"

READ_OPS = frozenset({GET, EXISTS})
WRITE_OPS = frozenset({SET, DEL})

CONSISTENCY_LEVELS = ("sequential", "linearizable", "eventual")

OK = 0
ERR = 1


def ok(result: Any) -> list[Any]:
    return [OK, result]


def err(error: DKVError) -> list[Any]:
    return [ERR, to_wire(error)]


def unwrap(reply: list[Any]) -> Any:
    """Return the result of one op reply, or raise its error."""
    if reply[0] == OK:
        return reply[1]
    raise from_wire(reply[1])


def is_write(op: list[Any]) -> bool:
    return bool(op) and op[0] in WRITE_OPS
