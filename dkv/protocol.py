"""The client <-> node wire protocol: batched operations and their results.

A client sends ``batch(ops)`` where every op is a list ``[name, key, *args]``:

===========  =====================================  =============================================
name         args                                   result
===========  =====================================  =============================================
``get``      ``key[, consistency]``                 value bytes, or ``None``
``getm``     ``key[, consistency]``                 ``[value, revision, expires_at]`` or ``None``
``exists``   ``key[, consistency]``                 ``bool``
``ttl``      ``key[, consistency]``                 milliseconds left, or ``None`` (no deadline,
                                                    or no key)
``set``      ``key, value[, px[, cond]]``           the write's revision, or ``None``: ``cond``
                                                    (``"nx"``: only if absent, ``"xx"``: only if
                                                    present) failed and nothing changed
``cas``      ``key, expected, new[, px]``           revision, or ``None`` if the value was not
                                                    ``expected`` (``None``: absent)
``del``      ``key[, if_value]``                    ``bool``: the key existed (and had ``if_value``)
                                                    and is deleted
``incr``     ``key, amount``                        the new integer (the value is an ASCII decimal;
                                                    absent counts as 0; the deadline stays)
``expire``   ``key, px``                            ``bool``: the key exists and got the deadline
``persist``  ``key``                                ``bool``: the key had a deadline and lost it
===========  =====================================  =============================================

``px`` is a time to live in milliseconds (a positive integer, at most
:data:`MAX_TTL_MS`; ``None``: no deadline): the key expires that long after the
writer decides the write. ``set`` and ``cas`` replace the deadline (none unless
``px``); ``incr`` keeps it. ``expires_at`` is milliseconds since the Unix epoch
(0: none). A revision is an integer that increases with every change of a shard
(across failovers and migrations); a key's revision is that of its last write.
Every condition is decided by the shard's writer, once (DESIGN §11).

**Watches** are a separate RPC, a zerorpc *stream* (not a lean call):
``watch(prefix, slots, since)`` on a shard's writer, ``slots`` a list of
``[start, end]`` ranges (None: all it writes), ``since`` a revision (None: from
now). It yields ``["events", progress_rev, excluded, [[type, key, value, rev],
...]]`` (``type`` ``set``/``delete``/``expire``; every event of the covered slots
up to ``progress_rev`` was sent, except in the ``excluded`` ranges), a mark at
least every second when idle, and ends with ``["end", [code, message, data]]``:
``MOVED``/``UNAVAILABLE``/``TRYAGAIN`` (resume elsewhere from the cursor) or
``COMPACTED`` (``data["revision"]``: the oldest ``since`` still possible).
Details: :mod:`dkv.watch`.

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
GETM = "getm"
EXISTS = "exists"
TTL = "ttl"
SET = "set"
CAS = "cas"
DEL = "del"
INCR = "incr"
EXPIRE = "expire"
PERSIST = "persist"

READ_OPS = frozenset({GET, GETM, EXISTS, TTL})
WRITE_OPS = frozenset({SET, CAS, DEL, INCR, EXPIRE, PERSIST})
#: set's conditions
NX, XX = "nx", "xx"
#: the longest time to live (about 100 years), in milliseconds
MAX_TTL_MS = 100 * 365 * 24 * 3600 * 1000

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
