"""The client's engine: route ops by slot, send them per node, retry what may be retried.

Runs on one gevent hub (see :mod:`dkv.client.client` for how threads reach
it). Ops go to the writer of their slot, per the slot map learned from any
node's ``cluster_info``. Ops refused with ``MOVED`` (map refreshed) or
``TRYAGAIN``/``UNAVAILABLE`` (backoff) are retried until the deadline; those
answers are definite, so a retry never applies a write twice. A node that does
not answer makes a read ``Unavailable`` and a write ``WriteTimeout``
(indeterminate, G5): a write is never retried after it may have arrived.
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from typing import Any, Iterator

import gevent

from dkv import protocol
from dkv.client.connection import Connection, TransportError
from dkv.client.routing import SlotMap
from dkv.errors import DKVError, Moved, TryAgain, Unavailable, WriteTimeout
from dkv.slots import slot_of

logger = logging.getLogger(__name__)

RETRY_CODES = frozenset({Moved.code, TryAgain.code, Unavailable.code})
BACKOFF_START = 0.01
#: Most ops one request carries (a node takes at most 10,000 per batch).
CHUNK = 1000
BACKOFF_MAX = 0.5


class ClientCore:
    def __init__(self, seeds: list[str], timeout: float, max_inflight: int = 2) -> None:
        self.seeds = seeds
        self.timeout = timeout
        self.max_inflight = max_inflight
        self._conns: dict[str, Connection] = {}
        self._map: SlotMap | None = None

    def conn(self, addr: str) -> Connection:
        c = self._conns.get(addr)
        if c is None:
            c = self._conns[addr] = Connection(addr, self.timeout, self.max_inflight)
        return c

    # -- slot map ------------------------------------------------------------

    def slot_map(self) -> SlotMap:
        if self._map is None:
            self._map = SlotMap.from_cluster_info(self.request_any("cluster_info"))
        return self._map

    def request_any(self, method: str, *args: Any) -> Any:
        """Ask the first node that answers: known nodes first, then the seeds."""
        known = list(self._map.nodes) if self._map else []
        tried: list[str] = []
        for addr in dict.fromkeys(known + self.seeds):
            try:
                return self.conn(addr).request(method, *args)
            except TransportError:
                tried.append(addr)
        raise Unavailable(f"no node answered ({', '.join(tried)})")

    # -- key/value ops ---------------------------------------------------------

    def execute(self, ops: list[list[Any]]) -> list[list[Any]]:
        """Run ops (routed, in parallel per node); one wire reply per op."""
        deadline = time.monotonic() + self.timeout
        replies: list[list[Any] | None] = [None] * len(ops)
        todo = list(range(len(ops)))
        backoff = BACKOFF_START
        while todo:
            retry = self._round(ops, todo, replies)
            if not retry or time.monotonic() + backoff > deadline:
                break
            gevent.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)
            todo = retry
        return replies  # type: ignore[return-value]

    def _round(self, ops: list[list[Any]], todo: list[int], replies: list[Any]) -> list[int]:
        try:
            smap = self.slot_map()
        except DKVError as e:
            for i in todo:
                replies[i] = protocol.err(e)
            return []
        by_addr: dict[str, list[int]] = defaultdict(list)
        for i in todo:
            by_addr[smap.writer(slot_of(ops[i][1]))].append(i)
        # one request per node and chunk, all in parallel
        groups = [(addr, idxs[c:c + CHUNK]) for addr, idxs in by_addr.items()
                  for c in range(0, len(idxs), CHUNK)]
        jobs = [gevent.spawn(self.conn(addr).call, [ops[i] for i in idxs]) for addr, idxs in groups]
        gevent.joinall(jobs)
        retry: list[int] = []
        for (addr, idxs), job in zip(groups, jobs):
            if not job.successful():
                exc = job.exception
                self._map = None  # the node may be gone: relearn the map next time
                for i in idxs:
                    replies[i] = protocol.err(self._transport_error(ops[i], addr, exc))
                continue
            for i, reply in zip(idxs, job.value):
                replies[i] = reply
                if reply[0] == protocol.ERR and reply[1][0] in RETRY_CODES:
                    if reply[1][0] == Moved.code:
                        self._map = None
                    retry.append(i)
        return retry

    def _transport_error(self, op: list[Any], addr: str, exc: BaseException | None) -> DKVError:
        if not isinstance(exc, TransportError):
            logger.error("request to %s failed", addr, exc_info=exc)
        if protocol.is_write(op):
            return WriteTimeout(f"{addr} did not answer; the write may or may not be applied")
        return Unavailable(f"{addr} did not answer: {exc}")

    # -- scan ----------------------------------------------------------------------

    def scan_page(self, prefix: bytes, start: bytes | None, limit: int) -> list[list[bytes]]:
        """One page of the key-ordered scan, merged over every writer."""
        writers = sorted({a for a in self.slot_map().writers if a is not None})
        jobs = [gevent.spawn(self.conn(a).request, "scan", prefix, start, limit) for a in writers]
        gevent.joinall(jobs)
        pages: list[list[bytes]] = []
        for job in jobs:
            if not job.successful():
                self._map = None
                exc = job.exception
                raise exc if isinstance(exc, DKVError) else Unavailable(str(exc))
            pages.extend(job.value)
        pages.sort(key=lambda kv: kv[0])
        return pages[:limit]

    def close(self) -> None:
        for c in self._conns.values():
            c.close()
        self._conns.clear()


def iter_scan(page: Any, prefix: bytes, start: bytes | None, limit: int | None,
              page_size: int) -> Iterator[tuple[bytes, bytes]]:
    """Drive ``page(prefix, start, n)`` until ``limit`` pairs or the end."""
    remaining = limit
    while remaining is None or remaining > 0:
        n = page_size if remaining is None else min(page_size, remaining)
        items = page(prefix, start, n)
        for k, v in items:
            yield k, v
        if remaining is not None:
            remaining -= len(items)
        if len(items) < n:
            return
        start = items[-1][0] + b"\x00"  # the smallest key after the last one
