"""``dkv.Client``: the public, thread-safe Python client.

The engine (:class:`~dkv.client.core.ClientCore`) lives on one gevent hub, as
zerorpc requires. In an ordinary program that hub runs on a private daemon
thread: calls from any number of user threads are handed to it through a
thread-safe queue plus a hub wake-up, run as greenlets there, and coalesced
into batch RPCs. In a program that has gevent-monkey-patched ``threading``
(the benchmark, a gevent server) the engine runs inline on the caller's hub
instead, and concurrent greenlets are coalesced the same way.

With ``zk=`` the client reads the slot map from ZooKeeper and keeps it fresh
with watches (:mod:`dkv.client.zkmap`), on the same hub.

``watch`` streams run on the same hub and hand their events to the caller's
thread through a bounded queue (:mod:`dkv.client.watch`).

Thread-safety: one ``Client`` may be shared by every thread of a process; that
is the intended use (coalescing works across threads). Do not use it after
``close()`` or across ``fork()``.
"""

from __future__ import annotations

import atexit
import threading
import time
import weakref
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, Sequence, TypeVar, overload

import gevent
import gevent.event
import gevent.monkey

from dkv import protocol
from dkv.auth import Credentials, load_optional
from dkv.client.core import ClientCore, iter_scan
from dkv.client.lock import Lock, _Lease
from dkv.client.watch import Event, Watch  # noqa: F401  (Event: re-exported beside Meta)
from dkv.errors import DKVError, InvalidArgument, Unavailable, WriteTimeout
from dkv.keys import as_bytes
from dkv.slots import slot_of

T = TypeVar("T")
Job = Callable[[ClientCore], Any]

DEFAULT_ADDR = "127.0.0.1:7000"


@dataclass(frozen=True, slots=True)
class Meta:
    """A value with its metadata, from ``get(key, with_meta=True)``."""

    value: bytes
    #: the revision of the key's last write: it increases with every change of the key's
    #: shard, across failovers and migrations
    revision: int
    #: when the key expires (Unix time, seconds), or None
    expires_at: float | None


def ttl_ms(ex: float | None, px: int | None) -> int | None:
    """A time to live in milliseconds from ``ex`` (seconds) or ``px`` (milliseconds), checked."""
    if ex is not None and px is not None:
        raise InvalidArgument("give ex (seconds) or px (milliseconds), not both")
    if ex is not None:
        if isinstance(ex, bool) or not isinstance(ex, (int, float)) or not 0 < ex < float("inf"):
            raise InvalidArgument("ex must be a positive number of seconds")
        return max(1, round(ex * 1000))
    if px is not None:
        if isinstance(px, bool) or not isinstance(px, int) or px <= 0:
            raise InvalidArgument("px must be a positive whole number of milliseconds")
        return px
    return None


class _InlineRunner:
    """Runs jobs on the caller's own hub (gevent-patched programs)."""

    def __init__(self, core: ClientCore) -> None:
        self.core = core

    def run(self, job: Job) -> Any:
        return job(self.core)

    def close(self) -> None:
        self.core.close()


class _ThreadRunner:
    """Runs jobs as greenlets on a private hub thread; callers block on a Future."""

    def __init__(self, core_factory: Callable[[], ClientCore]) -> None:
        self._jobs: deque[tuple[Job, Future[Any]]] = deque()
        self._ready = threading.Event()
        self._closed = False
        self._start_error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, args=(core_factory,), name="dkv-client-io", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:  # the engine could not start (e.g. ZooKeeper unreachable)
            self._closed = True
            self._thread.join(5)
            raise self._start_error
        atexit.register(self.close)  # a client left open still closes its sessions cleanly

    def _main(self, core_factory: Callable[[], ClientCore]) -> None:
        hub = gevent.get_hub()
        self._stop = gevent.event.Event()
        self._wakeup = hub.loop.async_()
        self._wakeup.start(self._drain)
        try:
            self._core = core_factory()
        except BaseException as e:  # delivered to the constructing thread
            self._start_error = e
        else:
            self._ready.set()
            self._stop.wait()
            self._core.close()
        finally:
            self._wakeup.stop()
            self._wakeup.close()
            self._ready.set()
            hub.destroy(destroy_loop=True)

    def _drain(self) -> None:  # hub callback: keep it short
        while self._jobs:
            gevent.spawn(self._run_job, *self._jobs.popleft())

    def _run_job(self, job: Job, fut: Future[Any]) -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(job(self._core))
        except BaseException as e:  # delivered to the calling thread
            fut.set_exception(e)

    def run(self, job: Job) -> Any:
        if self._closed:
            raise DKVError("client is closed")
        fut: Future[Any] = Future()
        self._jobs.append((job, fut))
        self._wakeup.send()  # thread-safe
        return fut.result()

    def close(self) -> None:
        if self._closed:
            return
        atexit.unregister(self.close)
        self.run(lambda core: self._stop.set())
        self._closed = True
        self._thread.join(5)


def _parse_addrs(addrs: str | Sequence[str] | None) -> list[str]:
    if addrs is None:
        return [DEFAULT_ADDR]
    items = addrs.split(",") if isinstance(addrs, str) else list(addrs)
    out = [a.strip() for a in items if a and a.strip()]
    for a in out:
        host, _, port = a.rpartition(":")
        if not host or not port.isdigit():
            raise InvalidArgument(f"bad node address {a!r}: expected HOST:PORT")
    if not out:
        raise InvalidArgument("no node address given")
    return out


class Client:
    """A dkv client: ``Client("127.0.0.1:7000")``, ``Client(["h1:7000", "h2:7000"])``,
    or ``Client(zk="zk1:2181,zk2:2181/my-cluster")``.

    Without ``zk`` the slot map is learned from the nodes ``addrs``. With
    ``zk`` (``HOST:PORT[,HOST:PORT...][/chroot]``) it is read from ZooKeeper
    and kept fresh by watches; ``addrs`` are then optional extra nodes to ask
    for :meth:`info`. Raises ``Unavailable`` if ZooKeeper does not answer
    within ``timeout``.

    Keys and values are ``bytes``, or ``str`` (encoded as UTF-8). ``timeout``
    bounds each call, retries included.

    ``auth`` is the path of a key file (``client.key``, or ``cluster.key``) for a
    cluster whose nodes run with ``--auth-dir``: connections are then encrypted and
    authenticated (CURVE). A node that refuses the key (or needs one) raises
    :class:`~dkv.errors.AuthError`.

    ``liveness`` (seconds, default 2): how long a node may stay silent while a
    request to it is in flight (the client pings it meanwhile), or take to accept
    a connection, before it counts as not answering (``Unavailable``, or
    ``WriteTimeout`` for a write it may have received). Shorter reports a stopped
    node sooner but gives up on a node that is merely stalled (a long fsync, a
    busy host) as well; the interactive ``dkv cli`` uses 1.
    """

    def __init__(
        self,
        addrs: str | Sequence[str] | None = None,
        *,
        zk: str | None = None,
        timeout: float = 10.0,
        max_inflight: int = 2,
        auth: "str | Credentials | None" = None,
        liveness: float | None = None,
    ) -> None:
        if timeout <= 0:
            raise InvalidArgument("timeout must be positive")
        if liveness is not None and (
            isinstance(liveness, bool) or not isinstance(liveness, (int, float)) or not 0 < liveness < float("inf")
        ):
            raise InvalidArgument("liveness must be a positive number of seconds")
        if zk is not None and not zk.strip():
            raise InvalidArgument("zk must be HOST:PORT[,HOST:PORT...][/chroot]")
        seeds = _parse_addrs(addrs) if addrs or not zk else []
        creds = load_optional(auth)
        factory = lambda: ClientCore(seeds, timeout, max_inflight, zk=zk, auth=creds, liveness=liveness)  # noqa: E731
        #: the leases of this client's held locks (their renewal stops when the client closes)
        self._leases: "weakref.WeakSet[_Lease]" = weakref.WeakSet()
        if gevent.monkey.is_module_patched("threading"):
            self._runner: _InlineRunner | _ThreadRunner = _InlineRunner(factory())
        else:
            self._runner = _ThreadRunner(factory)

    # -- single keys ----------------------------------------------------------

    def set(
        self,
        key: bytes | str,
        value: bytes | str,
        *,
        ex: float | None = None,
        px: int | None = None,
        nx: bool = False,
        xx: bool = False,
    ) -> bool:
        """Set ``key``; True if written. ``ex`` (seconds) or ``px`` (milliseconds): the key
        expires that long after the write (without either it never does, whatever it had).
        ``nx``: only if the key is absent; ``xx``: only if it is present. False means the
        condition failed and nothing changed; a plain ``set`` always returns True."""
        return self.set_revision(key, value, ex=ex, px=px, nx=nx, xx=xx) is not None

    def set_revision(
        self,
        key: bytes | str,
        value: bytes | str,
        *,
        ex: float | None = None,
        px: int | None = None,
        nx: bool = False,
        xx: bool = False,
    ) -> int | None:
        """:meth:`set`, returning the write's revision (None: the condition failed)."""
        if nx and xx:
            raise InvalidArgument("nx and xx exclude each other")
        op: list[Any] = [protocol.SET, _key(key), as_bytes(value, "value")]
        ttl, cond = ttl_ms(ex, px), protocol.NX if nx else protocol.XX if xx else None
        if ttl is not None or cond is not None:
            op += [ttl, cond]
        return self._one(op)

    def cas(
        self,
        key: bytes | str,
        expected: bytes | str | None,
        new: bytes | str,
        *,
        ex: float | None = None,
        px: int | None = None,
    ) -> bool:
        """Set ``key`` to ``new`` only if its value is ``expected`` (None: only if absent);
        True if written. ``ex``/``px`` as for :meth:`set`."""
        op: list[Any] = [
            protocol.CAS,
            _key(key),
            None if expected is None else as_bytes(expected, "expected"),
            as_bytes(new, "value"),
        ]
        ttl = ttl_ms(ex, px)
        if ttl is not None:
            op.append(ttl)
        return self._one(op) is not None

    @overload
    def get(self, key: bytes | str, consistency: str = ..., *, with_meta: Literal[False] = ...) -> bytes | None: ...

    @overload
    def get(self, key: bytes | str, consistency: str = ..., *, with_meta: Literal[True]) -> "Meta | None": ...

    def get(
        self, key: bytes | str, consistency: str = "sequential", *, with_meta: bool = False
    ) -> "bytes | Meta | None":
        """The value of ``key`` or None (also once it expired). ``consistency="eventual"`` may
        read from any up member of the key's shard (a replica may lag);
        ``sequential``/``linearizable`` read the writer. ``with_meta``: a :class:`Meta`."""
        if not with_meta:
            return self._one([protocol.GET, _key(key), consistency])
        got = self._one([protocol.GETM, _key(key), consistency])
        if got is None:
            return None
        value, rev, expires_at = got
        return Meta(value, rev, expires_at / 1000 if expires_at else None)

    def exists(self, key: bytes | str) -> bool:
        return self._one([protocol.EXISTS, _key(key)])

    def delete(self, key: bytes | str, *, if_value: bytes | str | None = None) -> bool:
        """Delete ``key``; True if it existed (and, with ``if_value``, had that value: else
        nothing changes). Deleting a missing key is not an error."""
        if if_value is None:
            return self._one([protocol.DEL, _key(key)])
        return self._one([protocol.DEL, _key(key), as_bytes(if_value, "if_value")])

    def incr(self, key: bytes | str, amount: int = 1) -> int:
        """Add ``amount`` to the integer stored at ``key`` (an ASCII decimal; absent counts as
        0) and return the result. A value that is not an integer: ``InvalidArgument``."""
        if isinstance(amount, bool) or not isinstance(amount, int):
            raise InvalidArgument("amount must be an integer")
        return self._one([protocol.INCR, _key(key), amount])

    def decr(self, key: bytes | str, amount: int = 1) -> int:
        """Subtract ``amount``; see :meth:`incr`."""
        if isinstance(amount, bool) or not isinstance(amount, int):
            raise InvalidArgument("amount must be an integer")
        return self.incr(key, -amount)

    def ttl(self, key: bytes | str) -> float | None:
        """Seconds until ``key`` expires; None if it has no deadline or does not exist."""
        ms = self._one([protocol.TTL, _key(key)])
        return None if ms is None else max(0.0, ms / 1000)

    def expire(self, key: bytes | str, seconds: float) -> bool:
        """Make ``key`` expire ``seconds`` from now; False if it does not exist."""
        ttl = ttl_ms(seconds, None)
        return self._one([protocol.EXPIRE, _key(key), ttl])

    def persist(self, key: bytes | str) -> bool:
        """Remove ``key``'s deadline; False if it has none or does not exist."""
        return self._one([protocol.PERSIST, _key(key)])

    # -- locks ----------------------------------------------------------------------

    def lock(self, name: bytes | str, ttl: float = 10.0, timeout: float | None = None) -> Lock:
        """A fenced lock (:class:`~dkv.client.lock.Lock`, not yet acquired):
        ``with client.lock("name") as lock: ... lock.token ...``.

        Acquiring blocks up to ``timeout`` seconds (None: forever), then raises
        :class:`~dkv.errors.LockTimeout`. The holder renews its ``ttl``-second lease
        in the background until release; ``lock.valid`` says whether it may still
        hold it. ``lock.token`` (the fencing token) strictly increases from one holder
        of ``name`` to the next, across failover and resharding: give it to the
        resources the lock protects so they refuse a stale holder. A bad name, ttl or
        timeout raises ``InvalidArgument``."""
        return Lock(self, name, ttl, timeout)

    def _track_lease(self, lease: _Lease) -> None:
        self._leases.add(lease)

    # -- many keys ------------------------------------------------------------

    def mset(self, mapping: Mapping[bytes | str, bytes | str]) -> None:
        """Set many keys. Each key is set atomically; the call is not a transaction (a large
        one is sent as several batches, each within the nodes' message budget).

        On failure raises the first indeterminate error (``WriteTimeout``) if any
        op had one, else the first definite error.
        """
        ops = [[protocol.SET, _key(k), as_bytes(v, "value")] for k, v in mapping.items()]
        errors = [e for e in self._many(ops) if isinstance(e, DKVError)]
        if errors:
            raise next((e for e in errors if isinstance(e, WriteTimeout)), errors[0])

    def mget(self, keys: Iterable[bytes | str], consistency: str = "sequential") -> list[bytes | None]:
        out = self._many([[protocol.GET, _key(k), consistency] for k in keys])
        for r in out:
            if isinstance(r, DKVError):
                raise r
        return out

    def scan(
        self,
        prefix: bytes | str = b"",
        start: bytes | str | None = None,
        limit: int | None = None,
        page_size: int = 1000,
    ) -> Iterator[tuple[bytes, bytes]]:
        """Iterate ``(key, value)`` in key order over keys with ``prefix`` and ``>= start``.

        Fetched lazily in pages (of at most ``page_size`` pairs, fewer when their values are
        large); not a snapshot (concurrent writes may or may not show).
        """
        if limit is not None and limit < 0:
            raise InvalidArgument("limit must be >= 0")
        if not 0 < page_size <= 10_000:
            raise InvalidArgument("page_size must be 1..10000")

        def page(p: bytes, s: bytes | None, n: int) -> tuple[list[list[bytes]], bool]:
            return self._runner.run(lambda core: core.scan_page(p, s, n))

        return iter_scan(
            page, as_bytes(prefix, "prefix"), None if start is None else as_bytes(start, "start"), limit, page_size
        )

    # -- watch --------------------------------------------------------------------

    def watch(self, prefix: bytes | str = b"", since: int | None = None) -> Watch:
        """Iterate the committed changes (:class:`Event`: ``set``, ``delete``, ``expire``) of keys
        with ``prefix``, as they happen: in revision order per shard, each once, across writer
        failovers and slot migrations.

        ``since``: start after that revision (e.g. a ``Meta.revision``, or a previous watch's
        ``revision``): the events the shards' logs still hold are replayed first; if they no
        longer hold them all, :class:`~dkv.errors.Compacted` is raised (its ``revision`` is the
        oldest ``since`` possible now: re-read the keys, then watch again). None: from now on.

        The iterator's ``revision`` is a resume point (every event up to it was yielded); close it
        (``close()`` or ``with``) when done. Events wait in a bounded buffer for the caller: a
        caller that falls far behind makes the stream catch up from the log.
        """
        if since is not None and (isinstance(since, bool) or not isinstance(since, int) or not 0 <= since < 2**63):
            raise InvalidArgument("since must be a revision (an integer >= 0) or None")
        return Watch(self._runner, as_bytes(prefix, "prefix"), since)

    # -- cluster -----------------------------------------------------------------

    @staticmethod
    def slot_of(key: bytes | str) -> int:
        return slot_of(_key(key))

    def cluster_info(self) -> dict[str, Any]:
        """The shard/node map: ZooKeeper's in ``zk`` mode, else any node's."""
        return self._runner.run(lambda core: core.cluster_info())

    def info(self, addr: str | None = None) -> dict[str, Any]:
        """One node's ``info`` (any node when ``addr`` is None); ``Unavailable`` if it does not answer."""
        if addr is None:
            return self._runner.run(lambda core: core.request_any("info"))
        return self._runner.run(lambda core: core.request(addr, "info"))

    def ping(self, addr: str | None = None) -> float:
        """The round trip of one ``ping`` to the node at ``addr`` (any node when None), in seconds."""

        def job(core: ClientCore) -> float:
            began = time.perf_counter()
            if addr is None:
                core.request_any("ping")
            else:
                core.request(addr, "ping")
            return time.perf_counter() - began

        return self._runner.run(job)

    def dbsize(self) -> dict[str, int]:
        """Live keys per shard (``{shard id: count}``), each counted by its writer in bounded
        pages; ``Unavailable`` if a shard has no writer that answers. Not a snapshot: keys
        written meanwhile, or a slot range moving, make it an estimate."""
        cluster = self.cluster_info()
        addr_of = {n.get("id"): n.get("addr") for n in cluster.get("nodes", [])}
        counts: dict[str, int] = {}
        for shard in cluster.get("shards", []):
            if not shard.get("slots"):
                continue
            addr = addr_of.get(shard.get("writer"))
            if not addr:
                raise Unavailable(f"{shard.get('id')} has no writer (failover in progress)")
            total, after = 0, None
            while True:
                n, after = self._runner.run(lambda core: core.request(addr, "dbsize", after))
                total += n
                if after is None:
                    break
            counts[str(shard.get("id"))] = total
        return counts

    def close(self) -> None:
        """Close the connections. Held locks stop being renewed (their leases expire
        ``ttl`` later): release them first."""
        for lease in list(self._leases):
            lease.stop.set()
        self._runner.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- plumbing ------------------------------------------------------------------

    def _one(self, op: list[Any]) -> Any:
        return protocol.unwrap(self._runner.run(lambda core: core.execute([op]))[0])

    def _many(self, ops: list[list[Any]]) -> list[Any]:
        """Results per op, with errors as DKVError values (not raised)."""
        replies = self._runner.run(lambda core: core.execute(ops))
        out: list[Any] = []
        for r in replies:
            try:
                out.append(protocol.unwrap(r))
            except DKVError as e:
                out.append(e)
        return out


def _key(key: Any) -> bytes:
    return as_bytes(key, "key")
