"""The client side of ``watch``: one stream per shard writer, merged, resumed exactly once.

A key prefix may match keys in any slot, so a watch covers all 1024 slots. The
:class:`WatchDriver` runs on the client's gevent hub (zerorpc sockets belong to
one thread's greenlets): it groups the slots by their writer in the client's
slot map, opens one ``watch`` stream per writer (:mod:`dkv.watch` for the
format) through a zerorpc client secured like the client's other sockets, and
keeps a cursor per slot (:class:`Cursors`): the revision of the last event
delivered or of the last progress mark that covered the slot. When a stream
ends (failover, ``MOVED`` after a migration, a lost connection, a watcher cut
off for being slow) its slots are re-resolved (the slot map refreshed) and
reopened with ``since`` = the lowest cursor among them, and events at or below a
slot's cursor are dropped: every event once, in revision order per shard.

Events reach the user's thread through a :class:`Handoff`: a bounded FIFO (the
streams stop reading, so zerorpc's flow control holds the writer back, until the
user takes events) with revision markers between events, from which
:attr:`Watch.revision` is a safe resume point.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import gevent
import gevent.event
import zerorpc
import zmq

from dkv.errors import AuthError, Compacted, DKVError, InvalidArgument, Unavailable, from_remote, from_wire
from dkv.slots import NUM_SLOTS, SlotRange, merge_ranges, slot_of
from dkv.transport import (
    HEARTBEAT,
    GreenContext,
    HandshakeWatch,
    close_client,
    harden,
    quiet_lost_remote,
    secure_client,
)
from dkv.watch import END, EVENTS

if TYPE_CHECKING:
    from dkv.client.core import ClientCore

logger = logging.getLogger(__name__)

#: Events buffered for the user before the streams stop reading.
MAX_BUFFERED = 1000
#: Backoff between attempts to (re)open streams for slots that have none.
BACKOFF_START = 0.05
BACKOFF_MAX = 1.0
#: Errors a watch cannot get past by resuming elsewhere: the user gets them.
FATAL = (Compacted, InvalidArgument, AuthError)


@dataclass(frozen=True, slots=True)
class Event:
    """One committed change seen by :meth:`dkv.Client.watch`."""

    #: ``"set"``, ``"delete"`` or ``"expire"``
    type: str
    key: bytes
    #: the value written (``b""`` for a delete or an expiry)
    value: bytes
    #: the change's revision (increasing per shard, across failovers and migrations)
    revision: int


class Cursors:
    """Per slot, the revision up to which every event has been delivered (None: not known yet)."""

    def __init__(self, since: int | None) -> None:
        self._cur: list[int | None] = [since] * NUM_SLOTS

    def fresh(self, slot: int, rev: int) -> bool:
        """Whether an event of ``slot`` at ``rev`` is new (not delivered before)."""
        cur = self._cur[slot]
        return cur is None or rev > cur

    def deliver(self, slot: int, rev: int) -> None:
        self._cur[slot] = rev

    def mark(self, ranges: Iterable[SlotRange], rev: int, excluded: Iterable[Iterable[int]] = ()) -> None:
        """A progress mark: every event of ``ranges`` but ``excluded`` up to ``rev`` was sent."""
        skip = {s for a, b in excluded for s in range(a, b + 1)}
        for r in ranges:
            for s in r:
                cur = self._cur[s]
                if s not in skip and (cur is None or rev > cur):
                    self._cur[s] = rev

    def since(self, slots: Iterable[int]) -> int | None:
        """Where a stream for ``slots`` starts: their lowest known cursor (None: none known)."""
        known = [c for c in (self._cur[s] for s in slots) if c is not None]
        return min(known) if known else None

    def get(self, slot: int) -> int | None:
        return self._cur[slot]

    @property
    def revision(self) -> int | None:
        """Every event of every slot up to this revision was delivered (None: not known yet)."""
        if any(c is None for c in self._cur):
            return None
        return min(self._cur)  # type: ignore[type-var]


@dataclass(frozen=True, slots=True)
class _Revision:
    rev: int


_END = object()


class Handoff:
    """A bounded, thread-safe FIFO from the client's hub (producer) to the user's thread.

    The producer checks :meth:`has_room` before putting an event (and waits, on its
    hub, for ``room_notifier`` to be called by the consumer). Revision markers and the
    final error do not count: consecutive markers collapse into one.
    """

    def __init__(self, capacity: int = MAX_BUFFERED) -> None:
        self.capacity = capacity
        self._items: deque[Any] = deque()
        self._events = 0
        self._cond = threading.Condition()
        self._closed = False
        #: called (under the lock, from the consumer's thread) when room appears; thread-safe
        self.room_notifier: Callable[[], None] | None = None

    # -- producer (the hub) --

    def has_room(self) -> bool:
        return self._events < self.capacity

    def put(self, item: Any) -> None:
        with self._cond:
            if self._closed:
                return
            if isinstance(item, _Revision) and self._items and isinstance(self._items[-1], _Revision):
                self._items[-1] = item
            else:
                self._items.append(item)
                self._events += isinstance(item, Event)
            self._cond.notify()

    def close(self, final: Any = _END) -> None:
        """No more items; ``final`` (an exception) is raised to the consumer after the rest."""
        with self._cond:
            if not self._closed:
                self._closed = True
                self._items.append(final)
                self.room_notifier = None
                self._cond.notify_all()

    # -- consumer (the user's thread) --

    def get(self, timeout: float | None = None) -> Any:
        """The next item (an Event, a _Revision, an exception or _END); None on timeout."""
        with self._cond:
            if not self._items and not self._cond.wait_for(lambda: bool(self._items), timeout):
                return None
            item = self._items[0]
            if item is _END or isinstance(item, BaseException):
                return item  # stays: every later get returns it too
            self._items.popleft()
            if isinstance(item, Event):
                self._events -= 1
                if self._events == self.capacity - 1 and self.room_notifier is not None:
                    self.room_notifier()
            return item

    def peek_revision(self) -> int | None:
        """Take the revision markers at the head (no event behind them is skipped); the last one."""
        rev = None
        with self._cond:
            while self._items and isinstance(self._items[0], _Revision):
                rev = self._items.popleft().rev
        return rev


class _Lost(Exception):
    """The stream's connection dropped, or its handshake was refused."""


class WatchDriver:
    """The streams of one watch, on the client's hub."""

    def __init__(self, core: "ClientCore", prefix: bytes, since: int | None, handoff: Handoff) -> None:
        quiet_lost_remote(gevent.get_hub())
        self.core = core
        self.prefix = prefix
        self.cursors = Cursors(since)
        self.handoff = handoff
        self._covered = bytearray(NUM_SLOTS)
        self._streams: set[gevent.Greenlet] = set()
        self._changed = gevent.event.Event()
        self._room = gevent.event.Event()
        self._room_async = gevent.get_hub().loop.async_()
        self._room_async.start(self._room.set)
        handoff.room_notifier = self._room_async.send
        self._backoff = BACKOFF_START
        self._retry_at = 0.0
        self._published: int | None = None
        self._stopped = False
        #: streams opened so far, and why the last few ended (introspection, tests)
        self.opened = 0
        self.endings: deque[str] = deque(maxlen=100)
        core.watches.add(self)
        self._main = gevent.spawn(self._run)

    # -- the loop: every slot without a stream gets one ----------------------------------

    def _run(self) -> None:
        while not self._stopped:
            todo = [s for s in range(NUM_SLOTS) if not self._covered[s]]
            wait: float | None = None
            if todo:
                wait = self._retry_at - time.monotonic()
                if wait <= 0:
                    wait = self._open(todo)
            self._changed.clear()
            self._changed.wait(wait)

    def _open(self, todo: list[int]) -> float | None:
        """Open streams for ``todo`` per the slot map; how long to wait before trying the rest."""
        try:
            smap = self.core.slot_map()
        except FATAL as e:  # e.g. our key is refused
            self.stop(e)
            return None
        except DKVError as e:
            logger.debug("watch: no slot map (%s); retrying", e)
            return self._retry_later()
        groups: dict[str, list[int]] = defaultdict(list)
        for s in todo:
            addr = smap.writers[s]
            if addr is not None:
                groups[addr].append(s)
        for addr, slots in groups.items():
            for s in slots:
                self._covered[s] = 1
            g = gevent.spawn(self._stream, addr, merge_ranges(slots))
            self.opened += 1
            self._streams.add(g)
        if sum(len(v) for v in groups.values()) < len(todo):  # a shard has no writer (failover)
            self.core._invalidate_map()
            return self._retry_later()
        return None

    def _retry_later(self) -> float:
        wait = self._backoff
        self._retry_at = time.monotonic() + wait
        self._backoff = min(self._backoff * 2, BACKOFF_MAX)
        return wait

    # -- one stream ----------------------------------------------------------------------

    def _stream(self, addr: str, ranges: list[SlotRange]) -> None:
        error: BaseException | None = None
        me = gevent.getcurrent()
        creds = self.core.auth
        client = zerorpc.Client(context=GreenContext.instance(), timeout=self.core.timeout, heartbeat=HEARTBEAT)
        sock = client._events._socket
        sock.setsockopt(zmq.LINGER, 0)
        if creds is not None:
            secure_client(sock, creds)
        harden(client)
        watch = HandshakeWatch(sock, addr, creds is not None, on_lost=lambda why: me.kill(_Lost(why), block=False))
        it: Any = None
        try:
            client.connect(f"tcp://{addr}")
            since = self.cursors.since(s for r in ranges for s in r)
            it = client("watch", self.prefix, [r.to_list() for r in ranges], since)
            for msg in it:
                if msg[0] == END:
                    error = from_wire(msg[1])
                    break
                if msg[0] == EVENTS:
                    self._take(ranges, msg[1], msg[2], msg[3])
            else:
                error = Unavailable(f"{addr} ended the watch stream without saying why")
        except _Lost as e:
            error = AuthError(str(e)) if watch.failed.is_set() else Unavailable(str(e))
        except zerorpc.RemoteError as e:
            error = from_remote(e.name, e.msg) or DKVError(f"{e.name}: {e.msg}")
        except (zerorpc.LostRemote, zerorpc.TimeoutExpired) as e:
            error = Unavailable(f"{addr}: {e}")
        except gevent.GreenletExit:
            error = None  # stopped
        finally:
            for step in (getattr(it, "close", None), watch.close, lambda: close_client(client)):
                try:
                    if step is not None:
                        step()
                except (Exception, gevent.GreenletExit):
                    pass
            self._streams.discard(me)
            self._ended(ranges, error)

    def _take(self, ranges: list[SlotRange], rev: int, excluded: list[list[int]], events: list[list[Any]]) -> None:
        """Deliver one message's fresh events, then apply its progress mark."""
        for etype, key, value, erev in events:
            slot = slot_of(key)
            if not self.cursors.fresh(slot, erev):
                continue  # delivered before this stream began
            while not self.handoff.has_room():  # the user is behind: stop reading (flow control)
                self._room.clear()
                if not self.handoff.has_room():
                    self._room.wait()
            # -- no yield: the event is queued and counted together --
            self.handoff.put(Event(etype, key, value, erev))
            self.cursors.deliver(slot, erev)
        self.cursors.mark(ranges, rev, excluded)
        self._backoff = BACKOFF_START  # the stream works
        rev_now = self.cursors.revision
        if rev_now is not None and rev_now != self._published:
            self._published = rev_now
            self.handoff.put(_Revision(rev_now))

    def _ended(self, ranges: list[SlotRange], error: BaseException | None) -> None:
        for r in ranges:
            for s in r:
                self._covered[s] = 0
        if self._stopped:
            return
        self.endings.append(f"{ranges[0].start}..{ranges[-1].end}: {type(error).__name__}: {error}")
        if isinstance(error, FATAL):
            self.stop(error)
            return
        logger.debug("watch stream for %s ended: %s; resuming", ranges, error)
        self.core._invalidate_map()
        self._retry_later()
        self._changed.set()

    def stop(self, error: BaseException | None = None) -> None:
        """End the watch (on the hub): every stream closed; the user gets ``error`` if given."""
        if self._stopped:
            return
        self._stopped = True
        self.core.watches.discard(self)
        self.handoff.close(_END if error is None else error)
        self._room_async.close()
        me = gevent.getcurrent()
        others = [g for g in [self._main, *self._streams] if g is not me]
        gevent.killall(others, block=False)


class Watch:
    """The iterator :meth:`dkv.Client.watch` returns: :class:`Event` s as they are committed.

    ``revision`` is a resume point: every event with a revision at or below it, of every
    shard, has been yielded (``watch(prefix, since=w.revision)`` misses nothing; it may
    repeat events above it). None while some shard's stream has not started yet (only
    without ``since``). Close it (``close()`` or ``with``) to release its streams.
    """

    def __init__(self, runner: Any, prefix: bytes, since: int | None) -> None:
        self._runner = runner
        self._handoff = Handoff()
        self._revision = since
        self._closed = False
        self._driver: WatchDriver = runner.run(lambda core: WatchDriver(core, prefix, since, self._handoff))

    @property
    def revision(self) -> int | None:
        rev = self._handoff.peek_revision()
        if rev is not None:
            self._revision = rev
        return self._revision

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        while True:
            event = self.next(timeout=0.5)  # wakes up now and then: Ctrl-C gets through
            if event is not None:
                return event

    def next(self, timeout: float | None = None) -> Event | None:
        """The next event, or None if none came within ``timeout`` seconds (None: wait).
        Raises the error that ended the watch (e.g. :class:`~dkv.errors.Compacted`), or
        ``StopIteration`` once it is closed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            item = self._handoff.get(timeout=left)
            if item is None:
                return None
            if isinstance(item, Event):
                return item
            if isinstance(item, _Revision):
                self._revision = item.rev
                continue
            self.close()
            if isinstance(item, BaseException):
                raise item
            raise StopIteration

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._runner.run(lambda core: self._driver.stop())
        except DKVError:
            pass  # the client is closed: so is the watch
        self._handoff.close()

    def __enter__(self) -> "Watch":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
