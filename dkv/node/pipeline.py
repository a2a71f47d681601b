"""The write pipeline: group commit of client writes to the log, then apply.

One greenlet drains the queue of pending writes. Every turn takes everything
queued (up to ``max_batch_records``), stamps it with ``(epoch, lsn)`` and hands
the whole batch to *one* threadpool call that appends it to the WAL (one
``write``, one ``fdatasync``) and applies it to storage (one atomic batch). While
that call runs, new writes queue up and form the next batch: group commit with no
timer, so an idle node answers at once and a busy one spreads each fsync over
many writes. A write is acknowledged only after its record is durable and
applied (G1).

*How* a batch becomes durable is the :class:`BatchWriter`'s job: standalone,
:class:`LocalWriter` appends to the local WAL and applies; a shard writer
plugs in the replicated writer (:mod:`dkv.cluster.leader`), which also waits
for a quorum of replicas. The pipeline sequences, batches and answers.

Diskless mode (memory log + memory engine) does no I/O, so it runs on the hub:
the memory engine must not be mutated from another thread while the hub reads
it.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import gevent
import gevent.event

from dkv.errors import DKVError, Moved, QuorumNotReached, Unavailable, WriteTimeout
from dkv.storage import Store
from dkv.wal.record import Op, Record

logger = logging.getLogger(__name__)

#: One write as the pipeline takes it: (op, key, value).
WriteOp = tuple[Op, bytes, bytes]


class Log(Protocol):
    """What the pipeline needs of a log (WriteAheadLog or MemoryLog)."""

    last_lsn: int
    segment_count: int

    def append(self, records: Sequence[Record]) -> None: ...
    def compact(self, checkpoint_lsn: int) -> int: ...


class BatchWriter(Protocol):
    """Makes a stamped batch durable and applied (or raises a DKVError saying how it failed)."""

    @property
    def epoch(self) -> int: ...

    def check(self) -> None:
        """Raise a definite error if a write cannot succeed now (nothing is sequenced then)."""

    def write(self, records: list[Record]) -> None: ...


def offloaded(offload: bool, fn: Any, *args: Any) -> Any:
    """Run ``fn`` in gevent's threadpool (file and bulk LevelDB work) or inline."""
    return gevent.get_hub().threadpool.apply(fn, args) if offload else fn(*args)


def checkpoint(log: Log, store: Store, offload: bool) -> None:
    """Once the WAL has rolled over: make the applied state durable, drop segments below it."""
    if log.segment_count <= 1:
        return

    def work() -> int:
        return log.compact(store.checkpoint())

    try:
        deleted = offloaded(offload, work)
        if deleted:
            logger.info("checkpoint at lsn %d: deleted %d WAL segment(s)", store.applied_lsn, deleted)
    except Exception:  # compaction is an optimisation; never fail writes for it
        logger.exception("checkpoint/compaction failed")


class LocalWriter:
    """Standalone: durable in the local WAL (one write + one fdatasync), then applied."""

    def __init__(self, log: Log, store: Store, epoch: int, offload: bool = True) -> None:
        self._log, self._store, self._epoch, self._offload = log, store, epoch, offload

    @property
    def epoch(self) -> int:
        return self._epoch

    def check(self) -> None:
        pass

    def write(self, records: list[Record]) -> None:
        offloaded(self._offload, self._persist, records)

    def _persist(self, records: list[Record]) -> None:
        self._log.append(records)
        self._store.apply(records)


@dataclass
class _Pending:
    ops: Sequence[WriteOp]
    done: gevent.event.AsyncResult = field(default_factory=gevent.event.AsyncResult)


class WritePipeline:
    def __init__(self, log: Log, store: Store, writer: BatchWriter, *, max_batch_records: int = 8192,
                 offload: bool = True) -> None:
        self._log = log
        self._store = store
        self.writer = writer
        self._max = max_batch_records
        self._offload = offload
        self._next_lsn = log.last_lsn + 1
        self._queue: deque[_Pending] = deque()
        self._wake = gevent.event.Event()
        self._closing = False
        self._failed: DKVError | None = None
        self.batches = 0
        self.records = 0
        self._loop = gevent.spawn(self._run)

    # -- client side -------------------------------------------------------

    def submit(self, ops: Sequence[WriteOp]) -> list[Any]:
        """Make ``ops`` durable and applied; block this greenlet until then.

        Returns one result per op: ``None`` for a put, ``bool`` (the key
        existed) for a delete.
        """
        if self._failed is not None:
            raise self._failed
        if self._closing:
            raise Unavailable("node is shutting down")
        pending = _Pending(ops)
        self._queue.append(pending)
        self._wake.set()
        return pending.done.get()

    def barrier(self) -> None:
        """Return once every write queued before this call is settled (committed or failed)."""
        try:
            self.submit(())
        except DKVError:
            pass  # a failed turn settles the writes in it too

    @property
    def queued(self) -> int:
        return sum(len(p.ops) for p in self._queue)

    @property
    def epoch(self) -> int:
        return self.writer.epoch

    def close(self, timeout: float = 10.0) -> None:
        """Stop taking writes, finish those already queued."""
        self._closing = True
        self._wake.set()
        self._loop.join(timeout)
        self._loop.kill()
        self._fail_queued(Unavailable("node is shutting down"))

    # -- the loop ------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            while self._queue and self._failed is None:
                self._commit(self._take())
            if self._closing:
                return

    def _take(self) -> list[_Pending]:
        taken: list[_Pending] = []
        n = 0
        while self._queue and (not taken or n + len(self._queue[0].ops) <= self._max):
            p = self._queue.popleft()
            taken.append(p)
            n += len(p.ops)
        return taken

    def _sequence(self, batch: list[_Pending]) -> tuple[list[Record], list[list[Any]]]:
        """Stamp records and compute per-op results against the applied state."""
        records: list[Record] = []
        results: list[list[Any]] = []
        overlay: dict[bytes, bool] = {}  # key -> exists, within this batch
        lsn = self._next_lsn
        epoch = self.writer.epoch
        for p in batch:
            res: list[Any] = []
            for op, key, value in p.ops:
                if op is Op.DELETE:
                    res.append(overlay[key] if key in overlay else self._store.exists(key))
                    overlay[key] = False
                else:
                    res.append(None)
                    overlay[key] = True
                records.append(Record(epoch, lsn, op, key, value))
                lsn += 1
            results.append(res)
        return records, results

    def _commit(self, batch: list[_Pending]) -> None:
        try:
            self.writer.check()
        except DKVError as e:  # definite: nothing was sequenced
            for p in batch:
                p.done.set_exception(e)
            return
        self._next_lsn = self._log.last_lsn + 1  # a failed batch may have been rolled back
        records, results = self._sequence(batch)
        if not records:  # only barriers
            for p, res in zip(batch, results):
                p.done.set(res)
            return
        try:
            self.writer.write(records)
        except (QuorumNotReached, WriteTimeout, Unavailable, Moved) as e:
            # the replicated writer decided the outcome (definite or not) and cleaned up
            for p in batch:
                p.done.set_exception(e)
            return
        except Exception as exc:
            # An I/O error in append or fsync leaves the log's durable state
            # unknown (a failed fsync may have dropped dirty pages), so the node
            # stops taking writes instead of acknowledging on top of it.
            logger.critical("write-ahead log failed at lsn %d: %s; refusing writes until restart",
                            records[0].lsn, exc, exc_info=True)
            self._failed = Unavailable(f"write-ahead log failed ({exc}); restart the node")
            for p in batch:
                p.done.set_exception(WriteTimeout("the log failed while writing; outcome unknown"))
            self._fail_queued(self._failed)
            return
        self._next_lsn = records[-1].lsn + 1
        self.batches += 1
        self.records += len(records)
        for p, res in zip(batch, results):
            p.done.set(res)
        checkpoint(self._log, self._store, self._offload)

    def _fail_queued(self, error: DKVError) -> None:
        while self._queue:
            self._queue.popleft().done.set_exception(error)
