"""The write pipeline: group commit of client writes to the log, then apply.

One greenlet drains the queue of pending writes. Every turn takes everything
queued (up to ``max_batch_records`` records and ``page_bytes`` of them, counted by
:func:`dkv.keys.item_bytes`; a submission is never split, and one that is larger
alone forms a batch of its own), stamps it with ``(epoch, lsn)`` and hands
the whole batch to *one* threadpool call that appends it to the WAL (one
``write``, one ``fdatasync``) and applies it to storage (one atomic batch). While
that call runs, new writes queue up and form the next batch: group commit with no
timer, so an idle node answers at once and a busy one spreads each fsync over
many writes. A write is acknowledged only after its record is durable and
applied (G1).

*How* a batch becomes durable is the :class:`BatchWriter`'s job: standalone,
:class:`LocalWriter` appends to the local WAL and applies (before ``write``
returns); a shard writer plugs in the replicated writer
(:mod:`dkv.cluster.leader`), which returns at once with a handle that is set
once a quorum of replicas has the batch. Up to :data:`WINDOW` batches are in
flight at once: batch N+1 is stamped and handed over while batch N waits for its
quorum. The pipeline batches and answers, always in LSN order; the
:class:`~dkv.node.sequencer.Sequencer` decides every write (conditions,
increments, expiry, revisions) against the store and the batches in flight,
and stamps the records. When a batch
fails, every later one in flight fails too (the writer rolls them all back), and
the pipeline lets them all settle before it stamps the next batch, from the
log's end.

Diskless mode (memory log + memory engine) does no I/O, so it runs on the hub:
the memory engine must not be mutated from another thread while the hub reads
it.

Checkpoints: storage applies records without syncing, so until a checkpoint
(a synced ``applied_lsn``, :meth:`Store.checkpoint`) the WAL is the only durable
copy of them. The pipeline checkpoints once the WAL rolls over (then drops the
segments below it), and also every :data:`CHECKPOINT_BYTES` of records committed
or :data:`CHECKPOINT_SECONDS` after the first commit since the last checkpoint,
whichever comes first (also when the node has gone idle), so a damaged WAL
segment never holds more than that of records storage has not made durable.
Checkpoints run in the pipeline's greenlet between batches, off the hub, once
no batch is in flight.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import gevent
import gevent.event

from dkv.errors import DKVError, Moved, QuorumNotReached, Unavailable, WriteTimeout
from dkv.keys import DEFAULT_PAGE_BYTES, item_bytes
from dkv.node.sequencer import Sequencer, Write
from dkv.stats import BATCH_BOUNDS, LATENCY_BOUNDS, Histogram
from dkv.storage import Store
from dkv.storage.entry import now_ms
from dkv.wal.codec import MIN_FRAME_BYTES
from dkv.wal.record import Record

logger = logging.getLogger(__name__)

#: The pipeline checkpoints storage after this many bytes of records (as framed in the WAL) ...
CHECKPOINT_BYTES = 8 * 1024 * 1024
#: ... or this many seconds after the first commit since the last checkpoint, whichever comes first.
CHECKPOINT_SECONDS = 5.0
#: Batches in flight at once (handed to the writer, not yet answered).
WINDOW = 4


class Log(Protocol):
    """What the pipeline needs of a log (WriteAheadLog or MemoryLog)."""

    last_lsn: int
    last_rev: int
    segment_count: int

    def append(self, records: Sequence[Record]) -> None: ...
    def compact(self, checkpoint_lsn: int) -> int: ...


class BatchWriter(Protocol):
    """Makes a stamped batch durable and applied.

    ``write`` raises a definite DKVError if it cannot start the batch; else it returns a
    handle (an ``AsyncResult``) set once the batch is durable and applied, or failed with a
    DKVError saying how (any other exception: the log failed). Handles of consecutive
    batches settle in LSN order.
    """

    @property
    def epoch(self) -> int: ...

    def check(self) -> None:
        """Raise a definite error if a write cannot succeed now (nothing is sequenced then)."""

    def write(self, records: list[Record]) -> gevent.event.AsyncResult: ...


def offloaded(offload: bool, fn: Any, *args: Any) -> Any:
    """Run ``fn`` in gevent's threadpool (file and bulk LevelDB work) or inline."""
    return gevent.get_hub().threadpool.apply(fn, args) if offload else fn(*args)


def checkpoint(log: Log, store: Store, offload: bool, periodic: bool = False) -> bool:
    """Make the applied state durable and drop WAL segments below it; return whether it ran.

    Runs once the WAL has rolled over (there are segments to drop), or always if ``periodic``.
    """
    if log.segment_count <= 1 and not periodic:
        return False

    def work() -> int:
        lsn = store.checkpoint()
        return log.compact(lsn) if log.segment_count > 1 else 0

    try:
        deleted = offloaded(offload, work)
        if deleted:
            logger.info("checkpoint at lsn %d: deleted %d WAL segment(s)", store.applied_lsn, deleted)
    except Exception:  # compaction is an optimisation; never fail writes for it
        logger.exception("checkpoint/compaction failed")
    return True


class LocalWriter:
    """Standalone: durable in the local WAL (one write + one fdatasync), then applied."""

    def __init__(self, log: Log, store: Store, epoch: int, offload: bool = True) -> None:
        self._log, self._store, self._epoch, self._offload = log, store, epoch, offload

    @property
    def epoch(self) -> int:
        return self._epoch

    def check(self) -> None:
        pass

    def write(self, records: list[Record]) -> gevent.event.AsyncResult:
        """Durable and applied before it returns (one batch in flight at a time)."""
        done = gevent.event.AsyncResult()
        try:
            offloaded(self._offload, self._persist, records)
            done.set(None)
        except Exception as e:
            done.set_exception(e)
        return done

    def _persist(self, records: list[Record]) -> None:
        self._log.append(records)
        self._store.apply(records)


@dataclass
class _Pending:
    ops: Sequence[Write]
    done: gevent.event.AsyncResult = field(default_factory=gevent.event.AsyncResult)
    #: what the ops count against the batch's byte budget
    size: int = 0


@dataclass
class _InFlight:
    """A stamped batch handed to the writer: its submissions, their results, its handle."""

    batch: list[_Pending]
    results: list[list[Any]]
    records: list[Record]
    size: int
    done: gevent.event.AsyncResult
    #: the batch in flight before this one when it was sequenced: a batch that writes nothing
    #: (conditions that failed) was decided on its outcome, so it shares that batch's failure
    after: "_InFlight | None" = None
    #: how it failed, once answered
    error: DKVError | None = None
    #: perf_counter when it was handed to the writer
    started: float = 0.0


class WritePipeline:
    def __init__(
        self,
        log: Log,
        store: Store,
        writer: BatchWriter,
        *,
        max_batch_records: int = 8192,
        page_bytes: int = DEFAULT_PAGE_BYTES,
        offload: bool = True,
        checkpoint_bytes: int = CHECKPOINT_BYTES,
        checkpoint_seconds: float = CHECKPOINT_SECONDS,
        window: int = WINDOW,
        clock: Any = now_ms,
    ) -> None:
        self._log = log
        self._store = store
        self._writer = writer
        self._max = max_batch_records
        self._max_bytes = page_bytes
        self._offload = offload
        self._checkpoint_bytes = checkpoint_bytes
        self._checkpoint_seconds = checkpoint_seconds
        self._unchecked_bytes = 0  # framed bytes committed since the last checkpoint
        self._unchecked_since: float | None = None  # monotonic time of the first such commit
        #: checkpoints run by this pipeline (at rollover or periodic)
        self.checkpoints = 0
        self._next_lsn = log.last_lsn + 1
        self._queue: deque[_Pending] = deque()
        self._wake = gevent.event.Event()
        self._closing = False
        self._failed: DKVError | None = None
        self.batches = 0
        self.records = 0
        #: records per committed batch, and seconds from handing a batch over to its commit
        self.batch_sizes = Histogram(BATCH_BOUNDS)
        self.commit_seconds = Histogram(LATENCY_BOUNDS)
        self._window = window
        self._inflight: deque[_InFlight] = deque()
        self._more = gevent.event.Event()  # a batch was handed over
        self._settled = gevent.event.Event()  # a batch in flight was answered
        self._clock = clock
        self._seq = Sequencer(store.raw_entry, max(log.last_rev, store.applied_rev))
        #: called with the records of every batch once committed, in LSN order (watches)
        self.on_commit: list[Any] = []
        self._loop = gevent.spawn(self._run)
        self._answerer = gevent.spawn(self._answer_loop)

    @property
    def writer(self) -> BatchWriter:
        return self._writer

    @writer.setter
    def writer(self, writer: BatchWriter) -> None:
        """Swap the batch writer (cluster mode: on becoming or ceasing to be the shard's writer).

        Forgets the pending periodic checkpoint: once another role drives storage
        (a replica applies from its own threads), the pipeline must not checkpoint
        beside it.
        """
        self._writer = writer
        self._unchecked_bytes = 0
        self._unchecked_since = None

    # -- client side -------------------------------------------------------

    def submit(self, ops: Sequence[Write]) -> list[Any]:
        """Make ``ops`` durable and applied; block this greenlet until then.

        Returns one result per op, as the :class:`~dkv.node.sequencer.Sequencer`
        decided it (a :class:`DKVError` instance for a write refused alone).
        """
        if self._failed is not None:
            raise self._failed
        if self._closing:
            raise Unavailable("node is shutting down")
        pending = _Pending(ops, size=sum(item_bytes(w.key, w.value) + len(w.expected or b"") for w in ops))
        self._queue.append(pending)
        self._wake.set()
        return pending.done.get()

    def submit_all(self, ops: Sequence[Write]) -> list[Any]:
        """:meth:`submit` for writes that must all apply (imports, range deletes, floors): raises
        the first error a write got alone (the others of the batch may have applied)."""
        results = self.submit(ops)
        for r in results:
            if isinstance(r, DKVError):
                raise r
        return results

    def barrier(self) -> None:
        """Return once every write queued before this call is settled (committed or failed)."""
        try:
            self.submit(())
        except DKVError:
            pass  # a failed turn settles the writes in it too

    @property
    def page_bytes(self) -> int:
        """The byte budget of one batch; submissions that feed it (imports, range deletes)
        are built to it too."""
        return self._max_bytes

    @property
    def queued(self) -> int:
        return sum(len(p.ops) for p in self._queue)

    @property
    def epoch(self) -> int:
        return self.writer.epoch

    @property
    def failure(self) -> DKVError | None:
        """Why the pipeline refuses every write until a restart (its log failed), or None."""
        return self._failed

    def close(self, timeout: float = 10.0) -> None:
        """Stop taking writes, finish those already queued."""
        self._closing = True
        self._wake.set()
        self._loop.join(timeout)
        self._loop.kill()
        self._answerer.kill()
        error = Unavailable("node is shutting down")
        self._fail_queued(error)
        for f in self._inflight:  # not settled within the timeout: may or may not be applied
            for p in f.batch:
                if not p.done.ready():
                    p.done.set_exception(WriteTimeout("node shut down with the write in flight"))

    # -- the loop ------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._wake.wait(self._checkpoint_due_in())
            self._wake.clear()
            while self._queue and self._failed is None:
                self._maybe_checkpoint()
                self._commit(self._take())
            if self._closing:
                self._drain()
                return
            self._maybe_checkpoint()

    def _take(self) -> list[_Pending]:
        """The next batch: whole submissions while they fit ``max_batch_records`` and
        ``page_bytes``, and always the first (so one prepare stays within the message limit
        as long as each submission does: the node refuses larger client batches)."""
        taken: list[_Pending] = []
        n = size = 0
        while self._queue and (
            not taken or (n + len(self._queue[0].ops) <= self._max and size + self._queue[0].size <= self._max_bytes)
        ):
            p = self._queue.popleft()
            taken.append(p)
            n += len(p.ops)
            size += p.size
        return taken

    def _sequence(self, batch: list[_Pending]) -> tuple[list[Record], list[list[Any]], int]:
        """Records and per-op results (:class:`~dkv.node.sequencer.Sequencer`); also the framed size."""
        records, results = self._seq.sequence([p.ops for p in batch], self.writer.epoch, self._next_lsn, self._clock())
        return records, results, sum(MIN_FRAME_BYTES + len(r.key) + len(r.value) for r in records)

    def _commit(self, batch: list[_Pending]) -> None:
        """Hand one batch to the writer (once the window has room); its answer comes from
        :meth:`_answer_loop`."""
        while len(self._inflight) >= self._window:
            self._settled.clear()
            self._settled.wait()
        try:
            self.writer.check()
        except DKVError as e:  # definite: nothing was sequenced
            self._fail(batch, e)
            return
        if any(f.done.ready() and not f.done.successful() for f in self._inflight):
            self._drain()  # a failed batch takes every later one with it: start again from the log
        if self._failed is not None:
            self._fail(batch, self._failed)
            return
        if not self._inflight:
            self._next_lsn = self._log.last_lsn + 1  # a failed batch may have been rolled back
            self._seq.observe(max(self._log.last_rev, self._store.applied_rev))  # e.g. a new writer's log
        records, results, size = self._sequence(batch)
        done = gevent.event.AsyncResult()
        started = time.perf_counter()
        if not records:  # only barriers
            done.set(None)
        else:
            try:
                done = self.writer.write(records)
            except (QuorumNotReached, WriteTimeout, Unavailable, Moved) as e:
                self._fail(batch, e)  # the writer refused it up front
                return
            except Exception as e:
                done.set_exception(e)
            self._next_lsn = records[-1].lsn + 1
        self._inflight.append(
            _InFlight(
                batch, results, records, size, done, self._inflight[-1] if self._inflight else None, started=started
            )
        )
        self._more.set()

    def _answer_loop(self) -> None:
        """Answer the batches in flight in LSN order."""
        while True:
            while not self._inflight:
                self._more.clear()
                self._more.wait()
            f = self._inflight[0]
            try:
                f.done.get()
                if not f.records and f.after is not None and f.after.error is not None:
                    raise f.after.error
            except (QuorumNotReached, WriteTimeout, Unavailable, Moved) as e:
                # the replicated writer decided the outcome (definite or not) and cleaned up
                f.error = e
                self._fail(f.batch, e)
            except Exception as exc:
                # An I/O error in append or fsync leaves the log's durable state
                # unknown (a failed fsync may have dropped dirty pages), so the node
                # stops taking writes instead of acknowledging on top of it.
                logger.critical(
                    "write-ahead log failed at lsn %d: %s; refusing writes until restart",
                    f.records[0].lsn,
                    exc,
                    exc_info=True,
                )
                self._failed = Unavailable(f"write-ahead log failed ({exc}); restart the node")
                f.error = WriteTimeout("the log failed while writing; outcome unknown")
                self._fail(f.batch, f.error)
                self._fail_queued(self._failed)
            else:
                if f.records:
                    self.batches += 1
                    self.records += len(f.records)
                    self.batch_sizes.observe(len(f.records))
                    self.commit_seconds.observe(time.perf_counter() - f.started)
                    self._unchecked_bytes += f.size
                    if self._unchecked_since is None:
                        self._unchecked_since = time.monotonic()
                for p, res in zip(f.batch, f.results):
                    p.done.set(res)
                for listener in self.on_commit:
                    try:
                        listener(f.records)
                    except Exception:
                        logger.exception("a commit listener failed")
            self._inflight.popleft()
            f.after = None  # the chain must not keep every answered batch alive
            self._seq.settled(f.records)  # the store (or nothing, after a failure) now tells
            self._settled.set()
            self._wake.set()  # the loop re-arms its checkpoint timer

    def _drain(self) -> None:
        """Wait until every batch in flight is answered."""
        while self._inflight:
            self._settled.clear()
            self._settled.wait()

    def _fail(self, batch: list[_Pending], error: DKVError) -> None:
        for p in batch:
            p.done.set_exception(error)

    def _maybe_checkpoint(self) -> None:
        """Checkpoint (with no batch in flight) once the WAL rolled over or one is due."""
        if self._log.segment_count <= 1 and self._checkpoint_due_in() != 0.0:
            return
        self._drain()
        self._checkpoint(rolled=checkpoint(self._log, self._store, self._offload))

    def _checkpoint_due_in(self) -> float | None:
        """Seconds until a periodic checkpoint is due (0: now); None if nothing awaits one."""
        if self._unchecked_since is None or self._failed is not None:
            return None
        if self._unchecked_bytes >= self._checkpoint_bytes:
            return 0.0
        return max(0.0, self._unchecked_since + self._checkpoint_seconds - time.monotonic())

    def _checkpoint(self, rolled: bool = False) -> None:
        """Checkpoint storage if a periodic checkpoint is due (``rolled``: one just ran)."""
        if not rolled:
            if self._checkpoint_due_in() != 0.0:
                return
            checkpoint(self._log, self._store, self._offload, periodic=True)
        self.checkpoints += 1
        self._unchecked_bytes = 0
        self._unchecked_since = None

    def _fail_queued(self, error: DKVError) -> None:
        while self._queue:
            self._queue.popleft().done.set_exception(error)
