"""The client's copy of the cluster map, read from ZooKeeper and kept fresh by watches.

:class:`ZkClusterMap` runs on the client's hub (kazoo with
``SequentialGeventHandler``). It reads the map with
:func:`dkv.cluster.layout.read_view`, which leaves a one-shot watch on every
znode it reads: ``/slots`` (data), ``/shards`` and ``/nodes`` (children) and
each shard znode (data), or the existence of any of them that is missing. Any
watch firing -- including kazoo's reset of every watch when the connection
drops -- only marks the copy stale; the next request re-reads it, which
re-arms the watches. A watch is armed by the very request that reads its
znode, so no change can slip in between.

While ZooKeeper is unreachable the last map read keeps serving (nodes answer
``MOVED`` if it is out of date) and a re-read is tried again once connected.
"""

from __future__ import annotations

import logging
from typing import Any

import gevent
import gevent.lock
from kazoo.client import KazooClient
from kazoo.exceptions import KazooException
from kazoo.handlers.gevent import SequentialGeventHandler
from kazoo.retry import KazooRetry

from dkv.cluster import layout
from dkv.errors import InvalidArgument, Unavailable
from dkv.logs import ZK_LOGGER

logger = logging.getLogger(__name__)

#: Longest pause between two attempts to reach ZooKeeper again after losing it (s).
RECONNECT_MAX_DELAY = 2.0


class ZkClusterMap:
    """The ``cluster_info`` document of the cluster at ``hosts`` (``HOST:PORT[,...][/chroot]``).

    Create, use and close it on one gevent hub. Raises :class:`Unavailable` if
    ZooKeeper does not answer within ``timeout`` seconds.
    """

    def __init__(self, hosts: str, timeout: float) -> None:
        self.hosts = hosts
        self.timeout = timeout
        self._doc: dict[str, Any] | None = None
        self._stale = True
        self._reading = gevent.lock.Semaphore()
        try:
            handler = SequentialGeventHandler()
            # keep trying to reconnect, at least every RECONNECT_MAX_DELAY (kazoo's default backs off to an hour)
            retry = KazooRetry(
                max_tries=-1, delay=0.1, backoff=2, max_delay=RECONNECT_MAX_DELAY, sleep_func=handler.sleep_func
            )
            self._zk = KazooClient(hosts=hosts, handler=handler, connection_retry=retry, logger=ZK_LOGGER)
        except ValueError as e:
            raise InvalidArgument(f"bad ZooKeeper address {hosts!r}: {e}") from None
        try:
            self._zk.start(timeout=timeout)
        except self._zk.handler.timeout_exception:
            # start() has already stopped and closed the kazoo client
            raise Unavailable(f"ZooKeeper at {hosts} did not answer within {timeout:g}s") from None

    @property
    def stale(self) -> bool:
        """True when a watch fired (or :meth:`invalidate` was called) since the last read."""
        return self._stale

    def invalidate(self) -> None:
        """Re-read the map on next use (a node said the map is out of date)."""
        self._stale = True

    def cluster_info(self) -> dict[str, Any]:
        """The map: the cached copy, re-read first if stale. Do not mutate the result."""
        with self._reading:  # concurrent callers share one read
            if self._stale and (self._doc is None or self._zk.connected):
                self._refresh()
        assert self._doc is not None
        return self._doc

    def _refresh(self) -> None:
        self._stale = False  # a watch firing from now on asks for another read
        try:
            with gevent.Timeout(self.timeout, TimeoutError(f"did not answer within {self.timeout:g}s")):
                self._doc = layout.read_view(self._zk, watch=self._on_watch).info()
        except (KazooException, TimeoutError) as e:
            self._stale = True
            if self._doc is None:
                raise Unavailable(f"cannot read the cluster map from ZooKeeper at {self.hosts}: {e}") from None
            logger.warning("keeping the last cluster map; reading ZooKeeper at %s failed: %r", self.hosts, e)

    def _on_watch(self, event: Any) -> None:  # kazoo callback greenlet: no I/O, no blocking
        self._stale = True

    def close(self) -> None:
        self._zk.stop()
        self._zk.close()
