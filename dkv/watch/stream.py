"""Serving one ``watch`` stream on a writer: the log's history, then the live feed, with progress marks.

:class:`WatchService` hooks a :class:`~dkv.watch.feed.Feed` to the write
pipeline and serves the ``watch`` RPC (message format: :mod:`dkv.watch`). One
stream, as a generator the RPC server iterates (each yield is one zerorpc
stream message, flow-controlled by the client):

1. **Check** that this node is the ready writer of every slot asked (or take
   every slot its shard owns), else refuse (``MOVED``/``UNAVAILABLE``).
2. **History** (``since`` given): fail with ``COMPACTED`` if the log no longer
   holds every record above ``since`` (``log.base_rev``); find the first record
   above ``since`` (the log is ordered by revision: a binary search), and read
   committed records (up to the store's applied LSN) page by page, off the hub
   for a disk WAL. While more than a page behind, nothing is queued for the
   stream; once within a page of the applied LSN ``A`` it subscribes to the
   feed for the records after ``A`` (no yield in between), reads the rest of the
   history up to ``A``, then follows the feed: no gap, no duplicate.
3. **Live**: each batch of committed records becomes one message; an idle
   stream sends a progress mark every :data:`~dkv.watch.MARK_INTERVAL`.

Before each message the stream takes the node's ownership (no yield until the
message is built): a progress mark never covers a slot a migration has frozen
or moved away (the target's revisions after the move may be lower than ours).
In the live phase, once this node is no longer the writer it opened as, or no
longer owns a covered slot, the stream sends every record already queued (a
moved range was frozen and drained before its flip, so all its committed
records are in the queue) and ends with the error that says where to go.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Generator, Iterator

import gevent.event

from dkv.cluster.replication import record_bytes
from dkv.errors import Compacted, DKVError, InvalidArgument, Unavailable, to_wire
from dkv.keys import Limits, as_bytes, take_page
from dkv.node.pipeline import WritePipeline, offloaded
from dkv.slots import ALL_SLOTS, SlotRange
from dkv.storage import Store
from dkv.wal.record import Record
from dkv.watch import END, EVENTS, MARK_INTERVAL
from dkv.watch.feed import (
    Feed,
    Scope,
    Subscription,
    excluded_wire,
    frozen_ranges,
    history_start,
    lost_slots,
    parse_slots,
)

logger = logging.getLogger(__name__)

#: Most streams one node serves at once.
MAX_STREAMS = 1000
#: Records per history read.
HISTORY_PAGE = 2000


class WatchService:
    """The node's watch streams: one feed from the pipeline, one generator per stream."""

    def __init__(self, log: Any, store: Store, pipeline: WritePipeline, limits: Limits, offload: bool) -> None:
        self.log, self.store, self.limits, self.offload = log, store, limits, offload
        self.page_bytes = limits.page_bytes
        self.feed = Feed()
        pipeline.on_commit.append(self.feed.publish)
        #: cluster mode: the node's ClusterRuntime (ownership); None standalone
        self.router: Any = None
        self.streams = 0

    def open(self, prefix: Any, slots: Any, since: Any) -> Iterator[list[Any]]:
        """Check the arguments (``InvalidArgument`` at once) and return the stream's messages."""
        prefix_b = as_bytes(prefix, "prefix")
        if len(prefix_b) > self.limits.max_key_bytes:
            raise InvalidArgument(f"a prefix is at most {self.limits.max_key_bytes} bytes")
        ranges = parse_slots(slots)
        if since is not None and (not isinstance(since, int) or isinstance(since, bool) or not 0 <= since < 2**63):
            raise InvalidArgument("since must be a revision (an integer >= 0) or None")
        if self.streams >= MAX_STREAMS:
            raise Unavailable(f"this node serves {self.streams} watches already; retry later")
        return self._serve(prefix_b, ranges, since)

    def close(self) -> None:
        """End every live stream (the node shuts down)."""
        self.feed.close("the node is shutting down")

    def _serve(self, prefix: bytes, ranges: list[SlotRange] | None, since: int | None) -> Iterator[list[Any]]:
        self.streams += 1
        stream: _Stream | None = None
        try:
            stream = _Stream(self, prefix, ranges, since)
            yield from stream.run()
        except DKVError as e:
            logger.debug("watch stream ended: %s", e)
            yield [END, to_wire(e)]
        finally:
            self.streams -= 1
            if stream is not None:
                stream.close()


class _Stream:
    def __init__(self, svc: WatchService, prefix: bytes, ranges: list[SlotRange] | None, since: int | None) -> None:
        self.svc = svc
        self.since = since
        if svc.router is None:
            ranges, self.token = ranges or [ALL_SLOTS], None
        else:
            ranges, self.token = svc.router.watch_scope(ranges)
        self.scope = Scope(prefix, ranges)
        self.sub: Subscription | None = None
        self._wake = gevent.event.Event()
        self.last_rev = 0

    def close(self) -> None:
        if self.sub is not None:
            self.sub.close()

    # -- the phases ----------------------------------------------------------

    def run(self) -> Iterator[list[Any]]:
        svc = self.svc
        if self.since is None:
            upto, self.last_rev = svc.store.applied_lsn, svc.store.applied_rev
            self.sub = svc.feed.subscribe(upto, self._wake.set)
        else:
            yield from self._history()
        yield self._message([], self.last_rev)[0]  # the cursor from which the live part goes on
        yield from self._live()

    def _history(self) -> Iterator[list[Any]]:
        svc, since = self.svc, self.since
        assert since is not None
        base = svc.log.base_rev
        if since < base:
            raise Compacted(base)
        upto, upto_rev = svc.store.applied_lsn, svc.store.applied_rev
        pos = self._read(lambda: self._start(since, upto))
        self.last_rev = max(since, 0)
        while True:  # far behind: read without queueing anything for this stream
            upto, upto_rev = svc.store.applied_lsn, svc.store.applied_rev
            if upto - pos < HISTORY_PAGE:
                self.sub = svc.feed.subscribe(upto, self._wake.set)  # no yield since reading upto
                break
            pos = yield from self._page(pos, HISTORY_PAGE)
        while pos <= upto:
            pos = yield from self._page(pos, upto - pos + 1)
        self.last_rev = max(self.last_rev, upto_rev)

    def _live(self) -> Iterator[list[Any]]:
        sub = self.sub
        assert sub is not None
        quiet_since = time.monotonic()
        while True:
            # -- no yield from the check until the message is built --
            if sub.error is not None:
                raise Unavailable(sub.error)
            ending = self._ending()
            if ending is not None:
                while sub.pending:
                    records = sub.take(self.svc.page_bytes)
                    yield self._message(self.scope.events(records), records[-1].rev)[0]
                raise ending
            records = sub.take(self.svc.page_bytes)
            if records:
                message, _ = self._message(self.scope.events(records), records[-1].rev)
                yield message
                quiet_since = time.monotonic()
                continue
            idle = time.monotonic() - quiet_since
            if idle >= MARK_INTERVAL:
                yield self._message([], self.last_rev)[0]
                quiet_since = time.monotonic()
                continue
            self._wake.clear()
            self._wake.wait(MARK_INTERVAL - idle)

    # -- helpers --------------------------------------------------------------

    def _ending(self) -> DKVError | None:
        """Why the live stream must end now (None: it goes on)."""
        router = self.svc.router
        if router is None:
            return None
        error, own = router.watch_check(self.token)
        if error is not None:
            return error
        lost = lost_slots(own, self.scope.ranges)
        if lost:
            return router.writer_of_shard(
                own.slots.owner(lost[0]), f"slot {lost[0]} moved to another shard", slot=lost[0]
            )
        return None

    def _message(self, events: list[Any], rev: int) -> tuple[list[Any], int]:
        """An events message whose progress mark is ``rev``, minus the slots frozen or moved away now."""
        self.last_rev = max(self.last_rev, rev)
        excluded: list[list[int]] = []
        router = self.svc.router
        if router is not None:
            _, own = router.watch_check(self.token)
            out = frozen_ranges(own) + [SlotRange(s, s) for s in lost_slots(own, self.scope.ranges)]
            excluded = excluded_wire(out, self.scope)
        return [EVENTS, self.last_rev, excluded, events], len(events)

    def _page(self, pos: int, limit: int) -> Generator[list[Any], None, int]:
        """Read (and send) one page of committed records from ``pos``; the next position."""
        records: list[Record] = self._read(
            lambda: take_page(self.svc.log.read_from(pos, limit=limit), self.svc.page_bytes, record_bytes)
        )
        if not records or records[0].lsn != pos:
            raise Compacted(max(self.svc.log.base_rev, self.since or 0))
        yield self._message(self.scope.events(records), records[-1].rev)[0]
        return records[-1].lsn + 1

    def _start(self, since: int, upto: int) -> int:
        """The LSN of the first record above ``since`` (at most ``upto + 1``)."""
        log = self.svc.log
        first = log.first_lsn
        if not first or first > upto:
            return upto + 1

        def rev_at(lsn: int) -> int:
            for r in log.read_from(lsn, 1):
                return r.rev
            raise ValueError(f"lsn {lsn} is not in the log")

        return history_start(first, upto, since, rev_at)

    def _read(self, fn: Any) -> Any:
        """``fn()`` reading the log (off the hub for a disk WAL); a compacted position: ``Compacted``."""
        try:
            return offloaded(self.svc.offload, fn)
        except ValueError:
            raise Compacted(max(self.svc.log.base_rev, self.since or 0)) from None
