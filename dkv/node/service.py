"""Request handling of one node: validate ops, serve reads, hand writes to the pipeline.

Transport-free: :mod:`dkv.node.server` exposes these methods over zerorpc.
Every op is validated before anything is queued, so bad input changes nothing
(G6); one bad op in a batch fails alone.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

from dkv import __version__, protocol
from dkv.errors import Deferred, DKVError, InvalidArgument
from dkv.keys import as_bytes, pair_bytes, quote, take_page
from dkv.node.config import NodeConfig
from dkv.node.pipeline import WritePipeline, offloaded
from dkv.node.sequencer import Kind, Write
from dkv.slots import ALL_SLOTS, SlotRange
from dkv.stats import OpStats
from dkv.storage import Store
from dkv.storage.entry import now_ms

logger = logging.getLogger(__name__)

#: Most ops one batch call may carry.
MAX_BATCH_OPS = 10_000
#: Most keys one scan page returns.
MAX_SCAN_PAGE = 10_000
#: stored rows one ``dbsize`` request reads at most (the client asks again from where it stopped)
DBSIZE_ROWS = 100_000


#: op -> (fewest, most) arguments after the name
_ARITY = {
    protocol.GET: (1, 2),
    protocol.GETM: (1, 2),
    protocol.EXISTS: (1, 2),
    protocol.TTL: (1, 2),
    protocol.SET: (2, 4),
    protocol.CAS: (3, 4),
    protocol.DEL: (1, 2),
    protocol.INCR: (2, 2),
    protocol.EXPIRE: (2, 2),
    protocol.PERSIST: (1, 1),
}


def _ttl(px: Any) -> int | None:
    """A time to live in milliseconds (None: none), checked."""
    if px is None:
        return None
    if not isinstance(px, int) or isinstance(px, bool) or not 0 < px <= protocol.MAX_TTL_MS:
        raise InvalidArgument(f"a time to live is a whole number of milliseconds in 1..{protocol.MAX_TTL_MS}")
    return px


class NodeService:
    def __init__(self, config: NodeConfig, store: Store, log: Any, pipeline: WritePipeline) -> None:
        self.config = config
        self.limits = config.limits
        self.store = store
        self.log = log
        self.pipeline = pipeline
        self.started = time.time()
        #: cluster mode: the node's ClusterRuntime (routing, replication); None standalone
        self.router: Any = None
        #: the node's Expirer (its counters show in info)
        self.expirer: Any = None
        #: ops answered, by name and outcome, with their request latency (the metrics read it)
        self.op_stats = OpStats([*_ARITY, "batch", "scan"])

    # -- key/value ops -------------------------------------------------------

    def batch(self, ops: Any) -> list[list[Any]]:
        """Run many ops (:meth:`_batch`), counted in :attr:`op_stats` (a batch refused whole
        counts as one op ``batch``)."""
        t0 = time.perf_counter()
        try:
            replies = self._batch(ops)
        except DKVError as e:
            self.op_stats.one("batch", e.code, time.perf_counter() - t0)
            raise
        self.op_stats.record(ops, replies, time.perf_counter() - t0)
        return replies

    def _batch(self, ops: Any) -> list[list[Any]]:
        """Run many ops; one ``[0, result]`` or ``[1, error]`` per op (a bad op fails alone).

        In cluster mode every op is routed (may this node answer it *now*?) after the one
        yield of a batch (a linearizable read's quorum round), and from the routing on
        nothing yields until the reads are read and the writes queued: a read sees the
        store of a node that owned its slot when it read, a write is queued ahead of any
        freeze's barrier (see :mod:`dkv.cluster.migration`).

        Budgets (:mod:`dkv.protocol`): a batch of more than ``page_bytes`` of ops is
        refused whole; the gets after the reply reached ``page_bytes`` are not read and
        fail alone with the retryable ``Deferred``.
        """
        if not isinstance(ops, (list, tuple)):
            raise InvalidArgument("batch takes a list of ops")
        if len(ops) > MAX_BATCH_OPS:
            raise InvalidArgument(f"a batch carries at most {MAX_BATCH_OPS} ops, got {len(ops)}")
        budget = self.limits.page_bytes
        size = sum(protocol.op_bytes(op) for op in ops)
        if size > budget and len(ops) > 1:
            raise InvalidArgument(
                f"a batch of {len(ops)} ops counts {size} bytes; the limit is {budget}: split it", limit=budget
            )
        replies: list[list[Any] | None] = [None] * len(ops)
        parsed: list[tuple[int, str, bytes, Write | None, str | None]] = []
        used = 0  # bytes of the reply so far
        for i, op in enumerate(ops):
            try:
                parsed.append((i, *self._parse(op)))
            except DKVError as e:
                replies[i] = protocol.err(e)
                used += protocol.reply_bytes(replies[i])  # type: ignore[arg-type]
        confirm_error: DKVError | None = None
        confirm = {c for *_, c in parsed if self.router is not None and self.router.needs_confirmation(c)}
        if confirm:
            try:
                self.router.confirm_linearizable()  # one round for the whole batch (yields)
            except DKVError as e:
                confirm_error = e
        # -- no yield from here until the reads are read and the writes queued --
        writes: list[Write] = []
        write_at: list[int] = []
        own = self.router.ownership() if self.router is not None else None
        read_any = False
        now = now_ms()
        for i, name, key, write, consistency in parsed:
            try:
                if consistency in confirm and confirm_error is not None:
                    raise confirm_error
                if self.router is not None:
                    self.router.route(name, key, consistency, own)
                if write is not None:
                    writes.append(write)
                    write_at.append(i)
                    continue
                if name in (protocol.GET, protocol.GETM) and used >= budget and read_any:
                    raise Deferred("the reply is full; resend this get")
                replies[i] = protocol.ok(self._read(name, key, now))
                read_any = True
            except DKVError as e:
                replies[i] = protocol.err(e)
            used += protocol.reply_bytes(replies[i])  # type: ignore[arg-type]
        if writes:
            try:
                results = self.pipeline.submit(writes)
                for i, r in zip(write_at, results):
                    replies[i] = protocol.err(r) if isinstance(r, DKVError) else protocol.ok(r)
            except DKVError as e:
                for i in write_at:
                    replies[i] = protocol.err(e)
        return replies  # type: ignore[return-value]

    def may_write(self, key: bytes) -> bool:
        """May this node write ``key`` now (the expirer's check; no yield)?"""
        if self.router is None:
            return True
        try:
            self.router.route(protocol.DEL, key, None)
            return True
        except DKVError:
            return False

    def _read(self, name: str, key: bytes, now: int) -> Any:
        """The result of one read op (expired entries are absent)."""
        if name == protocol.GET:
            return self.store.get(key, None)
        e = self.store.entry(key, now)
        if name == protocol.EXISTS:
            return e is not None
        if name == protocol.TTL:
            return None if e is None or not e.expires_at else e.expires_at - now
        return None if e is None else [e.value, e.rev, e.expires_at]

    def _parse(self, op: Any) -> tuple[str, bytes, Write | None, str | None]:
        """Validate one op: (name, key, the write of a write op, consistency of a read)."""
        if not isinstance(op, (list, tuple)) or not op:
            raise InvalidArgument("an op is a non-empty list [name, key, ...]")
        name, args = op[0], op[1:]
        if not isinstance(name, str) or name not in _ARITY:
            raise InvalidArgument(f"unknown op {quote(name)}")
        lo, hi = _ARITY[name]
        if not lo <= len(args) <= hi:
            raise InvalidArgument(f"{name} takes {lo}..{hi} arguments, got {len(args)}")
        key = self.limits.key(args[0])
        args = list(args) + [None] * (hi - len(args))
        if name in protocol.READ_OPS:
            consistency = args[1] if args[1] is not None else "sequential"
            if consistency not in protocol.CONSISTENCY_LEVELS:
                raise InvalidArgument(f"consistency must be one of {', '.join(protocol.CONSISTENCY_LEVELS)}")
            return name, key, None, consistency
        value = self.limits.value
        if name == protocol.SET:
            cond = args[3]
            if cond not in (None, protocol.NX, protocol.XX):
                raise InvalidArgument(f"set's condition is {protocol.NX!r}, {protocol.XX!r} or none")
            return name, key, Write(Kind.SET, key, value(args[1]), px=_ttl(args[2]), cond=cond), None
        if name == protocol.CAS:
            expected = None if args[1] is None else value(args[1])
            return name, key, Write(Kind.CAS, key, value(args[2]), expected=expected, px=_ttl(args[3])), None
        if name == protocol.DEL:
            return name, key, Write(Kind.DELETE, key, expected=None if args[1] is None else value(args[1])), None
        if name == protocol.INCR:
            amount = args[1]
            if not isinstance(amount, int) or isinstance(amount, bool) or not -(2**63) <= amount < 2**63:
                raise InvalidArgument("incr's amount must be a 64-bit integer")
            return name, key, Write(Kind.INCR, key, amount=amount), None
        if name == protocol.EXPIRE:
            px = _ttl(args[1])
            if px is None:
                raise InvalidArgument("expire needs a time to live")
            return name, key, Write(Kind.EXPIRE, key, px=px), None
        return name, key, Write(Kind.PERSIST, key), None

    def scan(
        self, prefix: Any = b"", start: Any = None, limit: Any = 1000, slot_version: Any = None
    ) -> list[list[bytes]]:
        """:meth:`_scan`, counted in :attr:`op_stats` as op ``scan``."""
        t0 = time.perf_counter()
        try:
            page = self._scan(prefix, start, limit, slot_version)
        except DKVError as e:
            self.op_stats.one("scan", e.code, time.perf_counter() - t0)
            raise
        self.op_stats.one("scan", "ok", time.perf_counter() - t0)
        return page

    def _scan(
        self, prefix: Any = b"", start: Any = None, limit: Any = 1000, slot_version: Any = None
    ) -> list[list[bytes]]:
        """One page of ``(key, value)`` pairs in key order, keys >= ``start``: at most ``limit``
        pairs, and no more once they count ``page_bytes`` (:func:`dkv.keys.take_page`).

        In cluster mode only the slots this node's shard owns are read (its store may
        also hold a range being imported, or one that moved away and is being deleted),
        and ``slot_version``, the client's slot map version, must be this node's: the
        client merges the pages of every writer, which must agree on who owns what.
        """
        prefix_b = as_bytes(prefix, "prefix")
        start_b = None if start is None else as_bytes(start, "start")
        if not isinstance(limit, int) or isinstance(limit, bool) or not 0 < limit <= MAX_SCAN_PAGE:
            raise InvalidArgument(f"scan limit must be an integer in 1..{MAX_SCAN_PAGE}")
        if slot_version is not None and (not isinstance(slot_version, int) or isinstance(slot_version, bool)):
            raise InvalidArgument("slot_version must be an integer")
        if self.router is None:
            pairs = self.store.scan(prefix=prefix_b, start=start_b)
        else:  # route and read with no yield in between
            pairs = self.store.scan(prefix=prefix_b, start=start_b, slots=self.router.scan_ranges(slot_version))
        return [[k, v] for k, v in take_page(pairs, self.limits.page_bytes, pair_bytes, limit)]

    def dbsize(self, after: Any = None) -> list[Any]:
        """``[live keys, resume]`` of the slots this node serves as writer (standalone: all), counted
        off the hub over at most :data:`DBSIZE_ROWS` stored rows after storage key ``after``;
        ``resume`` is where to go on (None: done). Pages of a moving range may count twice or
        not at all, like a scan's: an estimate while slots move."""
        after_b = None if after is None else as_bytes(after, "after")
        ranges = [ALL_SLOTS] if self.router is None else self.router.scan_ranges(None)

        def work() -> list[Any]:
            with self.store.snapshot() as snap:
                return list(snap.count_live(ranges, after_b, DBSIZE_ROWS))

        return offloaded(self.config.durable, work)  # bulk read: off the hub

    # -- introspection ---------------------------------------------------------

    def digest(self, start: int, end: int) -> list[Any]:
        """[applied_lsn, sha256] of a slot range, read from one consistent snapshot."""
        try:
            slots = SlotRange(start, end)
        except ValueError as e:
            raise InvalidArgument(str(e)) from None

        def work() -> list[Any]:
            with self.store.snapshot() as snap:
                return [snap.applied_lsn, snap.digest(slots)]

        return offloaded(self.config.durable, work)  # bulk read: off the hub

    def info(self) -> dict[str, Any]:
        out = {
            "node_id": self.config.node_id,
            "addr": self.config.addr,
            "mode": "standalone",
            "version": __version__,
            "engine": self.config.engine,
            "durable": self.config.durable,
            "data_dir": self.config.data_dir if self.config.durable else None,
            "epoch": self.pipeline.epoch,
            "applied_lsn": self.store.applied_lsn,
            "wal": self.log.stats,
            "applied_rev": self.store.applied_rev,
            "expired_keys": self.expirer.expired if self.expirer is not None else 0,
            "queued_writes": self.pipeline.queued,
            "group_commits": self.pipeline.batches,
            "records_written": self.pipeline.records,
            "uptime_s": round(time.time() - self.started, 1),
            "limits": {"max_key_bytes": self.limits.max_key_bytes, "max_value_bytes": self.limits.max_value_bytes},
        }
        if self.router is not None:
            out.update(self.router.info())
        return out

    def cluster_info(self) -> dict[str, Any]:
        """The shard/node map; a standalone node is one shard owning every slot."""
        if self.router is not None:
            return self.router.cluster_info()
        shard = "shard-0"
        return {
            "mode": "standalone",
            "shards": [
                {
                    "id": shard,
                    "epoch": self.pipeline.epoch,
                    "writer": self.config.node_id,
                    "replicas": [],
                    "slots": [ALL_SLOTS.to_list()],
                }
            ],
            "nodes": [
                {"id": self.config.node_id, "addr": self.config.addr, "role": "writer", "shard": shard, "status": "up"}
            ],
        }

    # -- single-key conveniences (for zerorpc users; the client uses batch) ---

    def one(self, op: Sequence[Any]) -> Any:
        return protocol.unwrap(self.batch([list(op)])[0])
