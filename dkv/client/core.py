"""The client's engine: route ops by slot, send them per node, retry what may be retried.

Runs on one gevent hub (see :mod:`dkv.client.client` for how threads reach
it). Ops go to the writer of their slot, per the slot map read from ZooKeeper
(:mod:`dkv.client.zkmap`) when the client was given one, else learned from any
node's ``cluster_info``; an ``eventual`` get goes first to a random up member of
its shard, and to the writer when retried. Ops refused with ``MOVED`` (map
refreshed) or ``TRYAGAIN``/``UNAVAILABLE`` (backoff) are retried until the
deadline; those answers are definite, so a retry never applies a write twice.
A node that does not answer makes a read ``Unavailable`` and a write
``WriteTimeout`` (indeterminate, G5): a write is never retried after it may
have arrived.

Budgets (:mod:`dkv.keys`): ops are sent to a node in requests of at most
:data:`CHUNK` ops and ``page_bytes`` (a larger ``mset`` becomes several legal
batches); gets a node answers ``DEFERRED`` (its reply was full) are resent at
once, without backoff, so an ``mget`` of large values takes as many round trips
as it needs. Scan pages are byte-bounded by each writer, so a merged page is cut
at the smallest last key of the writers' pages that may be incomplete.
"""

from __future__ import annotations

import copy
import logging
import random
import time
from collections import defaultdict
from typing import Any, Iterator

import gevent
import gevent.event

from dkv import protocol
from dkv.auth import Credentials
from dkv.client.connection import Connection, TransportError
from dkv.client.routing import SlotMap
from dkv.client.zkmap import ZkClusterMap
from dkv.errors import Deferred, DKVError, Moved, TryAgain, Unavailable, WriteTimeout
from dkv.keys import DEFAULT_PAGE_BYTES, page_is_full, pair_bytes
from dkv.slots import slot_of

logger = logging.getLogger(__name__)

RETRY_CODES = frozenset({Moved.code, TryAgain.code, Unavailable.code, Deferred.code})
BACKOFF_START = 0.01
#: Most ops one request carries (a node takes at most 10,000 per batch).
CHUNK = 1000
BACKOFF_MAX = 0.5


class ClientCore:
    """Routing, connections and retries; ``zk`` (``HOST:PORT[/chroot]``) makes ZooKeeper the map source."""

    def __init__(
        self,
        seeds: list[str],
        timeout: float,
        max_inflight: int = 2,
        zk: str | None = None,
        auth: Credentials | None = None,
        liveness: float | None = None,
    ) -> None:
        self.seeds = seeds
        self.liveness = liveness
        self.auth = auth
        self.timeout = timeout
        self.max_inflight = max_inflight
        self._conns: dict[str, Connection] = {}
        #: nodes that stopped answering -> the greenlet pinging them back
        self._suspects: dict[str, gevent.Greenlet] = {}
        self._map: SlotMap | None = None
        self._map_doc: dict[str, Any] | None = None  # the document _map was built from
        self._rng = random.Random()
        self._zkmap = ZkClusterMap(zk, timeout) if zk else None
        #: open watches (:class:`~dkv.client.watch.WatchDriver`), ended when the client closes
        self.watches: set[Any] = set()

    def conn(self, addr: str) -> Connection:
        c = self._conns.get(addr)
        if c is None:
            c = self._conns[addr] = Connection(addr, self.timeout, self.max_inflight, self.auth, self.liveness)
        return c

    def request(self, addr: str, method: str, *args: Any) -> Any:
        """A plain RPC to one node; a node that does not answer raises ``Unavailable``."""
        try:
            return self.conn(addr).request(method, *args)
        except TransportError as e:
            raise Unavailable(str(e)) from None

    # -- slot map ------------------------------------------------------------

    def cluster_info(self) -> dict[str, Any]:
        """The cluster map: ZooKeeper's when configured (a copy), else a node's."""
        if self._zkmap is not None:
            return copy.deepcopy(self._zkmap.cluster_info())
        return self.request_any("cluster_info")

    def slot_map(self) -> SlotMap:
        if self._zkmap is not None:
            doc = self._zkmap.cluster_info()  # the cached document unless a watch fired
            if doc is not self._map_doc:
                self._map, self._map_doc = SlotMap.from_cluster_info(doc), doc
        elif self._map is None:
            self._map = SlotMap.from_cluster_info(self.request_any("cluster_info"))
        assert self._map is not None
        return self._map

    def _invalidate_map(self) -> None:
        """The map may be out of date: relearn it before the next request."""
        self._map = self._map_doc = None
        if self._zkmap is not None:
            self._zkmap.invalidate()

    def _known_nodes(self) -> list[str]:
        if self._zkmap is not None:
            try:
                return list(self.slot_map().nodes)
            except DKVError:  # ZooKeeper unreachable: the seeds may still answer
                return []
        return list(self._map.nodes) if self._map else []

    def request_any(self, method: str, *args: Any) -> Any:
        """The first answer from any node: known nodes and seeds are asked in parallel,
        so a dead node (likely in the map right after a failover) costs nothing."""
        addrs = list(dict.fromkeys(self._known_nodes() + self.seeds))
        if not addrs:
            raise Unavailable("no node known")
        first = gevent.event.AsyncResult()
        failed: list[str] = []

        def ask(addr: str) -> None:
            outcome = _outcome(self.conn(addr).request, method, *args)
            if first.ready():
                return
            if isinstance(outcome, (TransportError, Unavailable)):  # e.g. a node just starting
                failed.append(f"{addr}: {outcome}" if isinstance(outcome, Unavailable) else addr)
                if len(failed) == len(addrs):
                    first.set_exception(Unavailable(f"no node answered ({', '.join(failed)})"))
            elif isinstance(outcome, BaseException):
                first.set_exception(outcome)  # a node answered with an error
            else:
                first.set(outcome)

        for addr in addrs:
            gevent.spawn(ask, addr)  # the slower asks finish within their own timeout
        return first.get()

    # -- key/value ops ---------------------------------------------------------

    def execute(self, ops: list[list[Any]]) -> list[list[Any]]:
        """Run ops (routed, in parallel per node); one wire reply per op."""
        deadline = time.monotonic() + self.timeout
        replies: list[list[Any] | None] = [None] * len(ops)
        todo = list(range(len(ops)))
        backoff = BACKOFF_START
        spread = True
        while todo:
            retry, wait = self._round(ops, todo, replies, spread=spread, deadline=deadline)
            if not wait:  # only deferred gets: resend them at once
                if not retry or time.monotonic() > deadline:
                    break
                todo = retry
                continue
            spread = False
            if not retry or time.monotonic() + backoff > deadline:
                break
            gevent.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)
            todo = retry
        return replies  # type: ignore[return-value]

    def _route(self, smap: SlotMap, op: list[Any], spread: bool) -> str:
        """The node for ``op``: its slot's writer, or (``spread``) any candidate for an eventual read."""
        slot = slot_of(op[1])
        if spread and op[0] in protocol.READ_OPS and len(op) > 2:
            return smap.reader(slot, op[2], self._rng)
        return smap.writer(slot)

    def _round(
        self, ops: list[list[Any]], todo: list[int], replies: list[Any], spread: bool, deadline: float
    ) -> tuple[list[int], bool]:
        """Send ``todo`` once; return the ops to retry, and whether to back off first
        (False when every one of them was only deferred)."""
        try:
            smap = self.slot_map()
        except DKVError as e:
            for i in todo:
                replies[i] = protocol.err(e)
            return [], False
        by_addr: dict[str, list[int]] = defaultdict(list)
        retry: list[int] = []
        for i in todo:
            try:
                addr = self._route(smap, ops[i], spread)
                if addr in self._suspects:  # not sent: the error stays definite
                    raise Unavailable(f"{addr} is not answering; waiting for it or for a new writer")
                by_addr[addr].append(i)
            except Unavailable as e:  # no live writer right now (failover): retry
                replies[i] = protocol.err(e)
                retry.append(i)
        if retry:
            self._invalidate_map()
        deferred: list[int] = []
        # one request per node and chunk, all in parallel
        groups = [(addr, chunk) for addr, idxs in by_addr.items() for chunk in _chunks(ops, idxs)]
        jobs = [gevent.spawn(_outcome, self.conn(addr).call, [ops[i] for i in idxs]) for addr, idxs in groups]
        gevent.joinall(jobs, timeout=max(0.0, deadline - time.monotonic()))
        for (addr, idxs), job in zip(groups, jobs):
            if not job.ready() or isinstance(job.value, BaseException):
                exc = job.value if job.ready() else TransportError(f"no answer within {self.timeout:g}s")
                self._invalidate_map()  # the node may be gone: relearn the map next time
                self._suspect(addr)
                for i in idxs:
                    replies[i] = protocol.err(self._transport_error(ops[i], addr, exc))
                    if not protocol.is_write(ops[i]):
                        retry.append(i)  # reads are safe to repeat; a write may have arrived
                continue
            for i, reply in zip(idxs, job.value):
                replies[i] = reply
                if reply[0] == protocol.ERR and reply[1][0] in RETRY_CODES:
                    if reply[1][0] == Moved.code:
                        self._invalidate_map()
                    (deferred if reply[1][0] == Deferred.code else retry).append(i)
        return retry + deferred, bool(retry)

    def _suspect(self, addr: str) -> None:
        """Send nothing more to ``addr`` until it answers a ping (a dead writer is often
        still in the map until its session expires)."""
        if addr in self._suspects:
            return

        def probe() -> None:
            # zerorpc reports a lost peer by killing the calling greenlet, and that can
            # land after the call ended (here, in the sleep): tolerate anything, and
            # always clear the mark on the way out (a dead node is simply marked again).
            try:
                while True:
                    try:
                        if self.conn(addr).request("ping") == "pong":
                            return
                        gevent.sleep(0.2)
                    except Exception:
                        continue
            finally:
                self._suspects.pop(addr, None)

        self._suspects[addr] = gevent.spawn(probe)

    def _transport_error(self, op: list[Any], addr: str, exc: BaseException | None) -> DKVError:
        if not isinstance(exc, TransportError):
            logger.error("request to %s failed", addr, exc_info=exc)
        if protocol.is_write(op):
            return WriteTimeout(f"{addr} did not answer; the write may or may not be applied")
        return Unavailable(f"{addr} did not answer: {exc}")

    # -- scan ----------------------------------------------------------------------

    def scan_page(self, prefix: bytes, start: bytes | None, limit: int) -> tuple[list[list[bytes]], bool]:
        """One page of the key-ordered scan, merged over every writer, and whether more may follow.

        Each writer reads only the slots it owns, at the slot map version we send; a
        writer whose map differs (a range just moved), a frozen range or a shard with
        no writer is retried with backoff until the timeout, so the merged page never
        holds a range twice or misses one.
        """
        deadline = time.monotonic() + self.timeout
        backoff = BACKOFF_START
        while True:
            try:
                return self._scan_round(prefix, start, limit)
            except (Moved, TryAgain, Unavailable):
                self._invalidate_map()
                if time.monotonic() + backoff > deadline:
                    raise
                gevent.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)

    def _scan_round(self, prefix: bytes, start: bytes | None, limit: int) -> tuple[list[list[bytes]], bool]:
        smap = self.slot_map()
        if smap.writerless:
            raise Unavailable("a shard that owns slots has no live writer (failover in progress)")
        writers = sorted({a for a in smap.writers if a is not None})
        args: tuple[Any, ...] = (prefix, start, limit) if smap.version is None else (prefix, start, limit, smap.version)
        jobs = [gevent.spawn(_outcome, self.conn(a).request, "scan", *args) for a in writers]
        gevent.joinall(jobs)
        pairs: list[list[bytes]] = []
        cut: bytes | None = None  # the merged page is complete up to here
        for job in jobs:
            if isinstance(job.value, BaseException):
                exc = job.value
                raise exc if isinstance(exc, DKVError) else Unavailable(str(exc))
            page = job.value
            pairs.extend(page)
            if page_is_full(page, DEFAULT_PAGE_BYTES, pair_bytes, limit):  # that writer may hold more
                cut = page[-1][0] if cut is None else min(cut, page[-1][0])
        pairs.sort(key=lambda kv: kv[0])
        if cut is not None:
            pairs = [kv for kv in pairs if kv[0] <= cut]
        return pairs[:limit], cut is not None or len(pairs) > limit

    def close(self) -> None:
        for w in list(self.watches):
            w.stop(DKVError("the client is closed"))
        gevent.killall(list(self._suspects.values()), block=False)
        for c in self._conns.values():
            c.close()
        self._conns.clear()
        if self._zkmap is not None:
            self._zkmap.close()


def iter_scan(
    page: Any, prefix: bytes, start: bytes | None, limit: int | None, page_size: int
) -> Iterator[tuple[bytes, bytes]]:
    """Drive ``page(prefix, start, n)`` (returning ``(pairs, more)``) until ``limit`` pairs or the end."""
    remaining = limit
    while remaining is None or remaining > 0:
        n = page_size if remaining is None else min(page_size, remaining)
        items, more = page(prefix, start, n)
        for k, v in items:
            yield k, v
        if remaining is not None:
            remaining -= len(items)
        if not more or not items:
            return
        start = items[-1][0] + b"\x00"  # the smallest key after the last one


def _chunks(ops: list[list[Any]], idxs: list[int]) -> Iterator[list[int]]:
    """``idxs`` in requests of at most :data:`CHUNK` ops and ``page_bytes`` of them by
    :func:`dkv.protocol.op_bytes` (an op larger than that alone): what a node accepts."""
    chunk: list[int] = []
    used = 0
    for i in idxs:
        n = protocol.op_bytes(ops[i])
        if chunk and (len(chunk) >= CHUNK or used + n > DEFAULT_PAGE_BYTES):
            yield chunk
            chunk, used = [], 0
        chunk.append(i)
        used += n
    if chunk:
        yield chunk


def _outcome(fn: Any, *args: Any) -> Any:
    """``fn(*args)``, or the exception it raised as the value (a greenlet that dies
    with an exception gets its traceback printed by gevent)."""
    try:
        return fn(*args)
    except Exception as e:
        return e
