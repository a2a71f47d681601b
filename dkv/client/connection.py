"""One node's connection (lean calls, :class:`~dkv.transport.LeanClient`), shared by the greenlets of one hub.

Concurrent :meth:`Connection.call` s are coalesced: up to ``max_inflight``
batch RPCs are in flight at once, and everything that arrives meanwhile is
sent together in the next one, so many concurrent requests cost one round trip
and the server one group commit.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

import gevent
import gevent.event
import zerorpc

from dkv import protocol
from dkv.auth import Credentials
from dkv.errors import AuthError, DKVError, from_remote
from dkv.transport import LeanClient, quiet_lost_remote

logger = logging.getLogger(__name__)

#: Coalescing stops adding requests to a batch past these sizes.
MAX_BATCH_OPS = 5_000
MAX_BATCH_BYTES = 4 * 1024 * 1024


class TransportError(Exception):
    """The node did not answer (timeout, lost connection): the outcome is unknown."""


def _op_size(op: list[Any]) -> int:
    return sum(len(a) for a in op[1:] if isinstance(a, bytes)) + 16


class Connection:
    def __init__(
        self,
        addr: str,
        timeout: float,
        max_inflight: int = 2,
        auth: Credentials | None = None,
        liveness: float | None = None,
    ) -> None:
        quiet_lost_remote(gevent.get_hub())
        self.addr = addr
        self.liveness = liveness
        self.timeout = timeout
        self.max_inflight = max_inflight
        self.auth = auth
        self._rpc: LeanClient | None = None
        #: calls in flight per socket; a retired socket closes when its count is 0
        self._users: dict[LeanClient, int] = {}
        self._retired: set[LeanClient] = set()
        self._pending: deque[tuple[list[list[Any]], gevent.event.AsyncResult]] = deque()
        self._inflight = 0

    def _client(self) -> LeanClient:
        if self._rpc is not None and self._rpc.lost:  # dropped while idle: start afresh
            self._reset()
        if self._rpc is None:
            self._rpc = LeanClient(self.addr, self.auth, liveness=self.liveness)
        return self._rpc

    def _reset(self) -> None:
        """Retire the current socket: new requests get a fresh one.

        Other requests may still be in flight on the old one; closing it under
        them would fail them for nothing. It is closed when the last one ends,
        so nothing queued on it reaches the node later (e.g. once restarted).
        """
        rpc, self._rpc = self._rpc, None
        if rpc is not None:
            self._retired.add(rpc)
            self._release(rpc, 0)

    def _release(self, rpc: LeanClient, n: int) -> None:
        left = self._users.get(rpc, 0) - n
        self._users[rpc] = left
        if left <= 0 and rpc in self._retired:
            self._retired.discard(rpc)
            self._users.pop(rpc, None)
            rpc.close()

    def call(self, ops: list[list[Any]]) -> list[list[Any]]:
        """Send ``ops`` (coalesced with concurrent calls); one wire reply per op."""
        done = gevent.event.AsyncResult()
        self._pending.append((ops, done))
        self._kick()
        return done.get()

    def request(self, method: str, *args: Any) -> Any:
        """A plain (non-batched) RPC; node errors re-raised as their DKVError class."""
        rpc = self._client()
        self._users[rpc] = self._users.get(rpc, 0) + 1
        try:
            return rpc.call(method, args, self.timeout)
        except zerorpc.RemoteError as e:
            raise from_remote(e.name, e.msg) or DKVError(f"{e.name}: {e.msg}") from None
        except AuthError:  # the node refused our handshake: the request was never delivered
            if rpc is self._rpc:
                self._reset()
            raise
        except (zerorpc.TimeoutExpired, zerorpc.LostRemote) as e:
            if rpc is self._rpc:
                self._reset()
            if isinstance(e, zerorpc.LostRemote):
                raise TransportError(f"{self.addr}: {e} during {method}") from None
            raise TransportError(f"{self.addr} did not answer {method} within {self.timeout:g}s") from e
        finally:
            self._release(rpc, 1)

    def _kick(self) -> None:
        while self._pending and self._inflight < self.max_inflight:
            batch: list[Any] = []
            n_ops, n_bytes = 0, 0
            while self._pending:
                ops = self._pending[0][0]
                size = sum(_op_size(op) for op in ops)
                if batch and (n_ops + len(ops) > MAX_BATCH_OPS or n_bytes + size > MAX_BATCH_BYTES):
                    break
                batch.append(self._pending.popleft())
                n_ops += len(ops)
                n_bytes += size
            self._inflight += 1
            gevent.spawn(self._send, batch)

    def _send(self, batch: list[tuple[list[list[Any]], gevent.event.AsyncResult]]) -> None:
        try:
            flat = [op for ops, _ in batch for op in ops]
            try:
                replies = self.request("batch", flat)
            except TransportError as e:
                for _, done in batch:
                    done.set_exception(e)
                return
            except DKVError as e:  # the node refused the whole batch: a definite answer
                replies = [protocol.err(e)] * len(flat)
            at = 0
            for ops, done in batch:
                done.set(replies[at : at + len(ops)])
                at += len(ops)
        finally:
            self._inflight -= 1
            self._kick()

    def close(self) -> None:
        for rpc in [self._rpc, *self._retired]:
            if rpc is not None:
                rpc.close()
        self._rpc = None
        self._retired.clear()
        self._users.clear()


def call_once(addr: str, method: str, *args: Any, timeout: float, auth: Credentials | None) -> Any:
    """One plain RPC on a connection of its own, closed after it (a peer call made rarely)."""
    conn = Connection(addr, timeout, auth=auth)
    try:
        return conn.request(method, *args)
    finally:
        conn.close()
