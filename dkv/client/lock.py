"""Fenced locks built on the store's conditional writes: ``Client.lock(name, ttl, timeout)``.

A lock named ``NAME`` is the key ``__lock__/NAME`` (the prefix is reserved for
locks), whose value is the holder's *owner id*: random and unique per
acquisition (16 random bytes in hex, then ``@host:pid`` to help debugging).

- **Acquire** is ``set(key, owner, px=ttl, nx=True)``: the write's revision is
  the holder's **fencing token**. Revisions strictly increase along a shard's
  log, across writer failover, and a migration raises the target's revision
  floor above the source's; and a name's successive holders are successive
  ``nx`` writes of its key, so their tokens strictly increase.
- **Renew** is ``cas(key, owner, owner, px=ttl)``, every ``ttl / 3`` on a
  background thread (one per held lock) until release.
- **Release** is ``delete(key, if_value=owner)``: atomic, and a no-op for
  anyone but the owner (after the lease expired and someone else took it, a
  late release changes nothing).

**Waiting.** A busy lock is polled: each failed attempt sleeps a jittered,
doubling backoff from :data:`POLL_START` up to :data:`POLL_MAX` seconds (at
most a quarter of ``ttl``), until ``timeout`` passes; then
:class:`~dkv.errors.LockTimeout`. A request in flight at the deadline may take
up to the client's own timeout.

**Indeterminate acquires (G5).** An attempt that ends in ``WriteTimeout`` may
have been applied: the key is then re-read (``get(with_meta=True)``); if it
holds our owner id we own the lock, and its revision is our token (nothing
else writes our owner id before we start renewing). Giving up after such an
attempt deletes the key if it holds our owner id, so a late write does not
keep the lock busy for longer than ``ttl``.

**Validity.** ``Lock.valid`` is False once a renewal found the key taken or
gone, and once ``ttl`` passed since the last successful acquire or renewal was
*sent* (client's monotonic clock); once False it stays False (a renewal that
comes back after the lease lapsed on our clock ends it). The writer sets the
deadline when the request arrives, so the holder's view of the lease ends no
later than the store's, as long as the clocks of the client and the writers run at the same
rate and the writers' wall clocks agree (a new writer whose clock runs ahead
expires the key early by that much). A holder should check ``valid`` before
acting, and pass ``token`` to the resources it changes, which refuse a token
lower than the highest they have seen (see ``examples/locks.py``): that, not
the lease, is what protects them from a holder that stalled past its lease.

**Lifetime.** The renewal thread stops at release, when the lock is lost,
when the :class:`Lock` object is garbage-collected, and when the client is
closed (the lease then expires ``ttl`` later: release locks before closing).
"""

from __future__ import annotations

import logging
import math
import os
import random
import secrets
import socket
import threading
import time
import weakref
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

from dkv.errors import DKVError, InvalidArgument, LockTimeout, Moved, TryAgain, Unavailable
from dkv.keys import DEFAULT_MAX_KEY

if TYPE_CHECKING:
    from dkv.client.client import Client

logger = logging.getLogger(__name__)

#: Every lock's key starts with this (reserved for locks).
LOCK_PREFIX = b"__lock__/"
#: The longest lock name, in bytes (a key is at most DEFAULT_MAX_KEY bytes).
MAX_NAME_BYTES = DEFAULT_MAX_KEY - len(LOCK_PREFIX)
#: Shortest and longest lease, in seconds.
MIN_TTL = 0.1
MAX_TTL = 24 * 3600.0
#: First and longest sleep between two attempts at a busy lock (seconds; jittered).
POLL_START = 0.02
POLL_MAX = 0.5

#: Errors after which nothing was applied and a retry may succeed (no writer right now, a frozen
#: range, a map still catching up).
_TRANSIENT = (Unavailable, TryAgain, Moved)


def _retryable(e: DKVError) -> bool:
    """Whether a write that failed with ``e`` may be tried again: it was not applied but may
    succeed later, or its outcome is unknown (``WriteTimeout``, ``Internal``)."""
    return isinstance(e, _TRANSIENT) or not e.definite


def lock_key(name: bytes | str) -> bytes:
    """The key of the lock ``name``; ``InvalidArgument`` for a name that is not a
    non-empty str/bytes of at most :data:`MAX_NAME_BYTES` bytes."""
    if isinstance(name, str):
        raw = name.encode("utf-8")
    elif isinstance(name, bytes):
        raw = name
    else:
        raise InvalidArgument(f"lock name must be str or bytes, not {type(name).__name__}")
    if not raw:
        raise InvalidArgument("lock name must not be empty")
    if len(raw) > MAX_NAME_BYTES:
        raise InvalidArgument(f"lock name is {len(raw)} bytes; the limit is {MAX_NAME_BYTES}", limit=MAX_NAME_BYTES)
    return LOCK_PREFIX + raw


def new_owner_id() -> bytes:
    """A fresh owner id: 16 random bytes in hex, ``@host:pid`` for whoever reads the key."""
    return f"{secrets.token_hex(16)}@{socket.gethostname()}:{os.getpid()}".encode()


def _check_ttl(ttl: Any) -> float:
    if (
        isinstance(ttl, bool)
        or not isinstance(ttl, (int, float))
        or not math.isfinite(ttl)
        or not MIN_TTL <= ttl <= MAX_TTL
    ):
        raise InvalidArgument(f"ttl must be a number of seconds from {MIN_TTL:g} to {MAX_TTL:g}")
    return float(ttl)


def _check_timeout(timeout: Any) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout < 0:
        raise InvalidArgument("timeout must be None (wait forever) or a number of seconds >= 0")
    return float(timeout)


@dataclass(eq=False)  # identity: held in a WeakSet
class _Lease:
    """What the holder and its renewal thread share about one acquisition."""

    owner: bytes
    #: the lease may be held until this instant (time.monotonic())
    valid_until: float
    #: a renewal found the key taken or gone
    lost: bool = False
    stop: threading.Event = field(default_factory=threading.Event)
    mutex: threading.Lock = field(default_factory=threading.Lock)

    def extend(self, sent: float, ttl: float) -> bool:
        """A renewal sent at ``sent`` succeeded: the lease now holds until ``sent + ttl``,
        unless it had already lapsed on our clock (then it is lost for good: ``valid``
        never turns True again). Whether it still holds."""
        with self.mutex:
            if self.lost or time.monotonic() >= self.valid_until:
                self.lost = True
                return False
            self.valid_until = max(self.valid_until, sent + ttl)
            return True

    def valid(self) -> bool:
        with self.mutex:
            return not self.lost and not self.stop.is_set() and time.monotonic() < self.valid_until


def _renew(client: "Client", key: bytes, ttl: float, lease: _Lease, first_delay: float) -> None:
    """The renewal thread: ``cas(key, owner, owner, px=ttl)`` every ``ttl / 3`` until ``lease.stop``.

    A failed attempt (no writer, a timeout) is retried sooner; a definite ``False``
    (the key holds another owner, or nothing) marks the lease lost and ends the thread.
    """
    interval = ttl / 3
    px = max(1, round(ttl * 1000))
    delay = first_delay
    while not lease.stop.wait(delay):
        sent = time.monotonic()
        try:
            renewed = client.cas(key, lease.owner, lease.owner, px=px)
        except DKVError as e:
            if _retryable(e):  # may be applied, or nothing could apply it now: try again
                if not lease.valid():  # lapsed meanwhile: a later success could not revive it
                    with lease.mutex:
                        lease.lost = True
                    logger.warning("lock %r lapsed: no renewal succeeded within its ttl (%s)", key, e)
                    return
                logger.debug("renewal of %r failed (%s); retrying", key, e)
                delay = min(interval, max(0.05, interval / 4))
                continue
            # the client is closed, or refuses: stop renewing
            logger.warning("renewal of %r stopped: %s", key, e)
            lease.stop.set()
            return
        if not renewed:
            with lease.mutex:
                lease.lost = True
            logger.warning("lock %r was lost: its key expired or has another owner", key)
            return
        if not lease.extend(sent, ttl):
            logger.warning("lock %r lapsed before a renewal came back; the holder must stop", key)
            return
        delay = max(0.0, sent + interval - time.monotonic())


class Lock:
    """A fenced lock on a dkv store (see the module doc). Made by :meth:`Client.lock`.

    ``with client.lock("name", ttl=10.0, timeout=None) as lock: ... lock.token ...``,
    or ``lock.acquire()`` ... ``lock.release()``. One object holds at most one
    acquisition at a time (it is not reentrant); it may be acquired again after release.
    """

    def __init__(self, client: "Client", name: bytes | str, ttl: float = 10.0, timeout: float | None = None) -> None:
        self.key = lock_key(name)
        self.name = self.key[len(LOCK_PREFIX) :]
        self.ttl = _check_ttl(ttl)
        self.timeout = _check_timeout(timeout)
        self._client = client
        self._lease: _Lease | None = None
        self._renewer: threading.Thread | None = None
        self._token: int | None = None
        self._finalizer: weakref.finalize | None = None

    @property
    def label(self) -> str:
        """The name as text (for messages)."""
        return self.name.decode("utf-8", "replace")

    # -- state -----------------------------------------------------------------------

    @property
    def token(self) -> int | None:
        """The fencing token of the current (or last) acquisition; None before the first."""
        return self._token

    @property
    def owner(self) -> bytes | None:
        """The owner id written in the lock's key by the current acquisition (None when not held)."""
        return self._lease.owner if self._lease is not None else None

    @property
    def held(self) -> bool:
        """Acquired and not released (the lease itself may have lapsed: see :attr:`valid`)."""
        return self._lease is not None

    @property
    def valid(self) -> bool:
        """Whether the lease may still be held: acquired, not released, no renewal found
        the key taken or gone, and less than ``ttl`` since the last successful acquire or
        renewal was sent."""
        lease = self._lease
        return lease is not None and lease.valid()

    # -- acquire / release --------------------------------------------------------

    def acquire(self) -> "Lock":
        """Block until the lock is ours (at most ``timeout`` seconds: then ``LockTimeout``);
        start renewing it; return self."""
        if self._lease is not None:
            raise InvalidArgument(f"lock {self.label!r} is already held by this object (not reentrant)")
        client, key, ttl = self._client, self.key, self.ttl
        px = max(1, round(ttl * 1000))
        owner = new_owner_id()
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        first_unknown: float | None = None  # when the first attempt of unknown outcome was sent
        backoff = POLL_START
        cap = min(POLL_MAX, ttl / 4)
        rng = random.Random()
        try:
            while True:
                sent = time.monotonic()
                token: int | None = None
                try:
                    token = client.set_revision(key, owner, px=px, nx=True)
                except _TRANSIENT:
                    pass
                except DKVError as e:
                    if e.definite:
                        raise
                    logger.debug("acquire of %r: outcome unknown (%s); re-reading the key", key, e)
                    first_unknown = sent if first_unknown is None else first_unknown  # WriteTimeout
                if token is not None:
                    self._start(owner, token, valid_until=sent + ttl, renew_now=False)
                    return self
                if first_unknown is not None:  # one of our attempts may have taken it
                    rev = self._revision_if_ours(owner)
                    if rev is not None:
                        logger.debug("acquire of %r: an attempt of unknown outcome won it", key)
                        # its deadline is at least ttl after the earliest such attempt was
                        # sent; renew at once to learn a fresher one
                        self._start(owner, rev, valid_until=first_unknown + ttl, renew_now=True)
                        return self
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    raise LockTimeout(f"lock {self.label!r} not acquired within {self.timeout:g}s", name=self.label)
                pause = rng.uniform(backoff / 2, backoff)
                if deadline is not None:
                    pause = min(pause, deadline - now)
                time.sleep(pause)
                backoff = min(backoff * 2, cap)
        except LockTimeout:
            if first_unknown is not None:  # a late write of ours must not keep the lock busy for ttl
                self._delete_quietly(owner)
            raise
        except BaseException:  # e.g. KeyboardInterrupt while a write of ours was in flight
            self._delete_quietly(owner)
            raise

    def _revision_if_ours(self, owner: bytes) -> int | None:
        """The revision of the lock's key if it holds ``owner`` (None: it does not, or no answer)."""
        from dkv.client.client import Meta

        try:
            meta = self._client.get(self.key, with_meta=True)
        except _TRANSIENT:
            return None
        return meta.revision if isinstance(meta, Meta) and meta.value == owner else None

    def _start(self, owner: bytes, token: int, valid_until: float, renew_now: bool) -> None:
        lease = _Lease(owner, valid_until)
        self._lease, self._token = lease, token
        thread = threading.Thread(
            target=_renew,
            name=f"dkv-lock-renew-{self.label[:32]}",
            args=(self._client, self.key, self.ttl, lease, 0.0 if renew_now else self.ttl / 3),
            daemon=True,
        )
        self._renewer = thread
        self._finalizer = weakref.finalize(self, lease.stop.set)  # dropped without release: stop renewing
        self._client._track_lease(lease)  # the client's close stops it too
        thread.start()

    def release(self) -> bool:
        """Stop renewing and delete the key if it still holds our owner id; True if it did
        (False: the lease had already expired or been taken, or the store did not answer
        in time: then it expires by itself). Never raises for a store error; releasing a
        lock that is not held returns False."""
        lease, thread = self._lease, self._renewer
        if lease is None:
            return False
        self._lease = self._renewer = None
        lease.stop.set()
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        released = False
        while True:  # deleting if_value is safe to repeat: retry while the lease may still hold
            try:
                released = self._client.delete(self.key, if_value=lease.owner)
                break
            except DKVError as e:
                if _retryable(e) and time.monotonic() < lease.valid_until:
                    time.sleep(POLL_START)
                    continue
                logger.warning("release of %r failed: %s; the lease expires by itself", self.key, e)
                break
        if thread is not None and thread is not threading.current_thread():
            thread.join(0.5)  # it ends after its request in flight, if any
        return released

    def _delete_quietly(self, owner: bytes) -> None:
        try:
            self._client.delete(self.key, if_value=owner)
        except DKVError as e:
            logger.warning("could not clear a possible late acquire of %r: %s", self.key, e)

    def __enter__(self) -> "Lock":
        return self.acquire()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "valid" if self.valid else "held, lapsed" if self.held else "not held"
        return f"<dkv Lock {self.label!r} token={self._token} {state}>"
