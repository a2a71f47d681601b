"""The watch core, sans-I/O: the writer's feed of committed records, and the pure decisions of a stream.

* :class:`Feed` fans every committed batch (``WritePipeline.on_commit``, in LSN
  order) out to its :class:`Subscription` s. A subscription is bounded: a watcher
  that falls :data:`MAX_QUEUED_RECORDS` records or :data:`MAX_QUEUED_BYTES` behind
  is cut off (its stream ends with a clear error and the client resumes from its
  cursor, reading the log), so a slow watcher never costs unbounded memory (G7).
* :func:`history_start` finds where a stream's history begins in a log ordered
  by revision; :class:`Scope` turns records into the events a stream covers;
  :func:`frozen_ranges` and :func:`lost_slots` are the ownership checks a stream
  makes before each message; :func:`parse_slots` validates the RPC's slot ranges.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Iterable, Sequence

from dkv.cluster.layout import FROZEN
from dkv.cluster.routing import Ownership
from dkv.errors import InvalidArgument
from dkv.keys import item_bytes
from dkv.slots import NUM_SLOTS, SlotRange, merge_ranges, slot_of
from dkv.wal.record import EVENT_TYPES, Op, Record

#: A subscriber this far behind the feed is cut off (records, bytes as item_bytes counts them).
MAX_QUEUED_RECORDS = 100_000
MAX_QUEUED_BYTES = 64 * 1024 * 1024

#: one event on the wire: [type, key, value, revision]
WireEvent = list[Any]


class Subscription:
    """One stream's queue of committed records past ``after`` (an LSN), bounded.

    ``wake`` is called (on the feed's side) whenever records arrive or the
    subscription fails; the stream then :meth:`take` s them.
    """

    def __init__(
        self,
        feed: "Feed",
        after: int,
        wake: Callable[[], None],
        max_records: int = MAX_QUEUED_RECORDS,
        max_bytes: int = MAX_QUEUED_BYTES,
    ) -> None:
        self._feed = feed
        #: the LSN of the last record this subscription has accounted for
        self.after = after
        self._wake = wake
        self._queue: deque[Record] = deque()
        self._bytes = 0
        self._max_records, self._max_bytes = max_records, max_bytes
        #: why the subscription ended (None while it lives)
        self.error: str | None = None

    def push(self, records: Sequence[Record]) -> None:
        if self.error is not None:
            return
        for r in records:
            if r.lsn <= self.after:  # already read from the log's history
                continue
            if r.lsn != self.after + 1:
                # Something committed outside the pipeline (it never does on a serving writer):
                # the stream cannot prove it saw everything, so it ends and the client resumes.
                self.fail(f"the feed skipped from lsn {self.after} to {r.lsn}; resume the watch")
                return
            self._queue.append(r)
            self._bytes += item_bytes(r.key, r.value)
            self.after = r.lsn
        if len(self._queue) > self._max_records or self._bytes > self._max_bytes:
            self.fail(
                f"the watcher fell more than {len(self._queue)} records ({self._bytes} bytes) behind "
                "and was cut off; resume from the last revision"
            )
            return
        self._wake()

    def fail(self, why: str) -> None:
        if self.error is None:
            self.error = why
            self._queue.clear()
            self._bytes = 0
            self._feed.unsubscribe(self)
            self._wake()

    def take(self, budget: int) -> list[Record]:
        """The oldest queued records, as many as fit ``budget`` bytes (at least one)."""
        out: list[Record] = []
        used = 0
        while self._queue:
            n = item_bytes(self._queue[0].key, self._queue[0].value)
            if out and used + n > budget:
                break
            out.append(self._queue.popleft())
            used += n
        self._bytes -= used
        return out

    @property
    def pending(self) -> int:
        return len(self._queue)

    def close(self) -> None:
        self._feed.unsubscribe(self)
        self._queue.clear()


class Feed:
    """The writer's hub: every committed batch, in LSN order, to every subscription."""

    def __init__(self, max_records: int = MAX_QUEUED_RECORDS, max_bytes: int = MAX_QUEUED_BYTES) -> None:
        self._subs: set[Subscription] = set()
        self._max_records, self._max_bytes = max_records, max_bytes

    def publish(self, records: Sequence[Record]) -> None:
        """A committed batch (``WritePipeline.on_commit``)."""
        if records:
            for sub in list(self._subs):
                sub.push(records)

    def subscribe(self, after: int, wake: Callable[[], None]) -> Subscription:
        """Records committed after LSN ``after`` from now on (the caller reads those up to
        ``after`` from the log: nothing is missed or repeated between the two)."""
        sub = Subscription(self, after, wake, self._max_records, self._max_bytes)
        self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs.discard(sub)

    def close(self, why: str) -> None:
        """End every subscription (the node shuts down)."""
        for sub in list(self._subs):
            sub.fail(why)

    def __len__(self) -> int:
        return len(self._subs)


def history_start(first_lsn: int, last_lsn: int, since: int, rev_at: Callable[[int], int]) -> int:
    """The LSN of the first record with a revision above ``since`` among ``first_lsn..last_lsn``
    (``last_lsn + 1`` if none): a binary search, as revisions increase along the log."""
    lo, hi = first_lsn, last_lsn + 1
    while lo < hi:
        mid = (lo + hi) // 2
        if rev_at(mid) > since:
            hi = mid
        else:
            lo = mid + 1
    return lo


class Scope:
    """What one stream covers: a key prefix and a set of slots."""

    def __init__(self, prefix: bytes, ranges: Iterable[SlotRange]) -> None:
        self.prefix = prefix
        self.ranges = merge_ranges({s for r in ranges for s in r})
        self._slots = bytearray(NUM_SLOTS)
        for r in self.ranges:
            self._slots[r.start : r.end + 1] = b"\x01" * len(r)

    def covers(self, key: bytes) -> bool:
        return key.startswith(self.prefix) and bool(self._slots[slot_of(key)])

    def events(self, records: Iterable[Record]) -> list[WireEvent]:
        """The events among ``records`` (PUT/DELETE/EXPIRE of covered keys), in order."""
        return [
            [EVENT_TYPES[r.op], r.key, r.value if r.op == Op.PUT else b"", r.rev]
            for r in records
            if r.op in EVENT_TYPES and self.covers(r.key)
        ]


def parse_slots(slots: Any) -> list[SlotRange] | None:
    """The ``slots`` argument of a watch: None, or a list of ``[start, end]`` ranges (checked)."""
    if slots is None:
        return None
    if not isinstance(slots, (list, tuple)) or not slots or len(slots) > NUM_SLOTS:
        raise InvalidArgument(f"slots must be a list of 1..{NUM_SLOTS} [start, end] ranges, or None")
    out = []
    for r in slots:
        if (
            not isinstance(r, (list, tuple))
            or len(r) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in r)
            or not 0 <= r[0] <= r[1] < NUM_SLOTS
        ):
            raise InvalidArgument(f"a slot range is [start, end] with 0 <= start <= end < {NUM_SLOTS}")
        out.append(SlotRange(r[0], r[1]))
    return out


def frozen_ranges(own: Ownership) -> list[SlotRange]:
    """The ranges a migration out of our shard has frozen (in our view, or confirmed by us)."""
    out = [SlotRange(m.start, m.end) for m in own.migrations.values() if m.source == own.shard and m.state == FROZEN]
    out.extend(own.frozen.values())
    return merge_ranges({s for r in out for s in r})


def lost_slots(own: Ownership, ranges: Iterable[SlotRange]) -> list[int]:
    """The slots of ``ranges`` our shard does not own in ``own``'s slot map (in order)."""
    mine = bytearray(NUM_SLOTS)
    if own.shard is not None:
        for a, b in own.slots.of_shard(own.shard):
            mine[a : b + 1] = b"\x01" * (b - a + 1)
    return [s for r in ranges for s in r if not mine[s]]


def excluded_wire(ranges: Sequence[SlotRange], scope: Scope) -> list[list[int]]:
    """The frozen ``ranges`` that overlap the scope, as wire ``[start, end]`` pairs."""
    covered = {s for r in scope.ranges for s in r}
    return [r.to_list() for r in merge_ranges({s for r in ranges for s in r if s in covered})]
