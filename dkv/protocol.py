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

**Budgets** (:mod:`dkv.keys`): a batch whose ops count more than the page budget
(:func:`op_bytes`; one op alone is always allowed) is refused as a whole with
``InvalidArgument``: the client splits big batches. A reply holds the values of
gets until they reach the page budget (at least one); the gets after that are not
read and fail alone with the retryable :class:`~dkv.errors.Deferred`, which the
client resends in its next batch.

**Framing** (:mod:`dkv.transport`): every RPC, ``batch`` and the internal ones
alike, travels as a *lean call*: one zerorpc-format event each way over a
ZeroMQ DEALER -> ROUTER connection (CURVE-encrypted with auth). The request is
one frame, msgpack ``[{"message_id": id, "v": 3, "dkv_lean": 1}, method, args]``;
the answer is ``[{"response_to": id, "v": 3}, "OK", [result]]`` or
``[..., "ERR", [error class name, message, ""]]``. A node also answers classic
zerorpc clients (channels and heartbeats) on the same port, so ``zerorpc.Client``
works for debugging.
"""
from __future__ import annotations

from typing import Any

from dkv.errors import DKVError, from_wire, to_wire
from dkv.keys import ITEM_OVERHEAD

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


def op_bytes(op: Any) -> int:
    """What one op of a batch request counts against the page budget: its bytes and
    str arguments, plus the framing allowance (other arguments are small or invalid)."""
    if not isinstance(op, (list, tuple)):
        return ITEM_OVERHEAD
    return ITEM_OVERHEAD + sum(len(a) for a in op if isinstance(a, (bytes, str)))


def reply_bytes(reply: list[Any]) -> int:
    """What one entry of a batch reply counts against the page budget."""
    body = reply[1]
    if reply[0] == OK:
        return ITEM_OVERHEAD + (len(body) if isinstance(body, bytes) else 0)
    return ITEM_OVERHEAD + len(body[1])  # the error's message
