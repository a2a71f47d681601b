"""The expirer: removes expired entries through the log, and keeps the expiry index bounded.

Reads hide an entry the moment its deadline passes (:mod:`dkv.storage.store`);
storage converges through the log. Every :data:`INTERVAL` seconds the expirer
reads the due rows of the store's expiry index. On a node that may write the
key (the shard's writer, for a slot it owns and that is not frozen by a
migration) it submits ``EXPIRE_DUE`` writes: the sequencer checks, against the
state the batch sees, that the entry still has that deadline and that it has
passed, and logs an ``EXPIRE`` record (replicated like any write; watchers see
an ``expire`` event). A row whose entry was overwritten or removed since is
stale: every member drops its own stale rows locally. A row whose entry still
awaits its ``EXPIRE`` record stays (the record's apply removes it).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import gevent

from dkv.errors import DKVError
from dkv.node.pipeline import WritePipeline, offloaded
from dkv.node.sequencer import Kind, Write
from dkv.slots import user_key
from dkv.storage import Store
from dkv.storage.entry import now_ms

logger = logging.getLogger(__name__)

#: seconds between sweeps
INTERVAL = 0.1
#: seconds between sweeps while every due row awaits another node's expiry (a replica, a range
#: frozen by a migration): only stale rows are dropped then, so there is no hurry
IDLE_INTERVAL = 1.0
#: due rows handled per sweep (more wait for the next one, which comes at once)
SWEEP_ROWS = 1000


class Expirer:
    def __init__(
        self,
        store: Store,
        pipeline: WritePipeline,
        may_write: Callable[[bytes], bool],
        offload: bool,
        interval: float = INTERVAL,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self.store, self.pipeline, self.offload = store, pipeline, offload
        #: may this node write ``key`` now (checked right before the expiry is queued)?
        self._may_write = may_write
        self.interval = interval
        self._clock = clock
        #: entries removed by this node's EXPIRE records, stale rows dropped
        self.expired = 0
        self.dropped = 0
        self._greenlet: Any = None

    def start(self) -> None:
        self._greenlet = gevent.spawn(self._run)

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill()

    def _run(self) -> None:
        while True:
            try:
                delay = self.sweep()
            except Exception:  # housekeeping: never let it die; the next sweep tries again
                logger.exception("expiry sweep failed")
                delay = self.interval
            gevent.sleep(delay)

    def sweep(self) -> float:
        """One pass over the due rows; the seconds to wait before the next (0: more are due now)."""
        found, stale, mine = offloaded(self.offload, self._classify, self._clock())
        if not found:
            return self.interval
        writes = [Write(Kind.EXPIRE_DUE, key, deadline=d) for d, key in mine if self._may_write(key)]
        if writes:  # no yield between the routing checks and the queueing inside submit (the
            # sequencer checks the deadline again against the state the batch sees)
            try:
                results = self.pipeline.submit(writes)
                self.expired += sum(1 for r in results if r is True)
            except DKVError as e:
                logger.debug("expiring %d key(s) failed (%s); retrying", len(writes), e)
                return self.interval
        if stale:
            offloaded(self.offload, self.store.drop_due, stale)
            self.dropped += len(stale)
        if not writes and not stale:
            return IDLE_INTERVAL * self.interval / INTERVAL  # nothing this node can do yet
        return 0.0 if found == SWEEP_ROWS else self.interval

    def _classify(self, now: int) -> tuple[int, list[tuple[int, bytes]], list[tuple[int, bytes]]]:
        """The due rows (read off the hub with a disk store): how many, the stale ones
        ``(deadline, storage key)`` and the live ones ``(deadline, user key)``."""
        rows = self.store.due(now, SWEEP_ROWS)
        stale, mine = [], []
        for deadline, skey in rows:
            e = self.store.raw_entry(user_key(skey))
            if e is None or e.expires_at != deadline:
                stale.append((deadline, skey))
            else:
                mine.append((deadline, user_key(skey)))
        return len(rows), stale, mine
