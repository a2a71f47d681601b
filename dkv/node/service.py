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
from dkv.node.pipeline import WriteOp, WritePipeline, offloaded
from dkv.slots import ALL_SLOTS, SlotRange
from dkv.storage import Store
from dkv.wal.record import Op

logger = logging.getLogger(__name__)

#: Most ops one batch call may carry.
MAX_BATCH_OPS = 10_000
#: Most keys one scan page returns.
MAX_SCAN_PAGE = 10_000


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

    # -- key/value ops -------------------------------------------------------

    def batch(self, ops: Any) -> list[list[Any]]:
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
            raise InvalidArgument(f"a batch of {len(ops)} ops counts {size} bytes; the limit is {budget}: "
                                  "split it", limit=budget)
        replies: list[list[Any] | None] = [None] * len(ops)
        parsed: list[tuple[int, str, bytes, bytes, str | None]] = []
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
        writes: list[WriteOp] = []
        write_at: list[int] = []
        own = self.router.ownership() if self.router is not None else None
        read_any = False
        for i, name, key, value, consistency in parsed:
            try:
                if consistency in confirm and confirm_error is not None:
                    raise confirm_error
                if self.router is not None:
                    self.router.route(name, key, consistency, own)
                if name == protocol.GET:
                    if used >= budget and read_any:
                        raise Deferred("the reply is full; resend this get")
                    replies[i] = protocol.ok(self.store.get(key, None))
                    read_any = True
                elif name == protocol.EXISTS:
                    replies[i] = protocol.ok(self.store.exists(key))
                else:
                    writes.append((Op.PUT if name == protocol.SET else Op.DELETE, key, value))
                    write_at.append(i)
                    continue
            except DKVError as e:
                replies[i] = protocol.err(e)
            used += protocol.reply_bytes(replies[i])  # type: ignore[arg-type]
        if writes:
            try:
                results = self.pipeline.submit(writes)
                for i, r in zip(write_at, results):
                    replies[i] = protocol.ok(r)
            except DKVError as e:
                for i in write_at:
                    replies[i] = protocol.err(e)
        return replies  # type: ignore[return-value]

    def _parse(self, op: Any) -> tuple[str, bytes, bytes, str | None]:
        """Validate one op: (name, key, value, consistency of a read)."""
        if not isinstance(op, (list, tuple)) or not op:
            raise InvalidArgument("an op is a non-empty list [name, key, ...]")
        name, args = op[0], op[1:]
        arity = {protocol.GET: (1, 2), protocol.EXISTS: (1, 1), protocol.SET: (2, 2), protocol.DEL: (1, 1)}
        if not isinstance(name, str) or name not in arity:
            raise InvalidArgument(f"unknown op {quote(name)}")
        lo, hi = arity[name]
        if not lo <= len(args) <= hi:
            raise InvalidArgument(f"{name} takes {lo}..{hi} arguments, got {len(args)}")
        key = self.limits.key(args[0])
        if name == protocol.SET:
            return name, key, self.limits.value(args[1]), None
        if name == protocol.DEL:
            return name, key, b"", None
        consistency = args[1] if len(args) == 2 else "sequential"
        if consistency not in protocol.CONSISTENCY_LEVELS:
            raise InvalidArgument(f"consistency must be one of {', '.join(protocol.CONSISTENCY_LEVELS)}")
        return name, key, b"", consistency

    def scan(self, prefix: Any = b"", start: Any = None, limit: Any = 1000,
             slot_version: Any = None) -> list[list[bytes]]:
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
            "queued_writes": self.pipeline.queued,
            "group_commits": self.pipeline.batches,
            "records_written": self.pipeline.records,
            "uptime_s": round(time.time() - self.started, 1),
            "limits": {"max_key_bytes": self.limits.max_key_bytes,
                       "max_value_bytes": self.limits.max_value_bytes},
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
            "shards": [{"id": shard, "epoch": self.pipeline.epoch, "writer": self.config.node_id,
                        "replicas": [], "slots": [ALL_SLOTS.to_list()]}],
            "nodes": [{"id": self.config.node_id, "addr": self.config.addr, "role": "writer",
                       "shard": shard, "status": "up"}],
        }

    # -- single-key conveniences (for zerorpc users; the client uses batch) ---

    def one(self, op: Sequence[Any]) -> Any:
        return protocol.unwrap(self.batch([list(op)])[0])
