"""A node's link to ZooKeeper: session, registration, the watched cluster view, epoch bumps.

The thin kazoo adapter (``SequentialGeventHandler``, on the node's hub). Any
watch firing marks the view dirty; one refresher greenlet re-reads the whole
(small) map, re-arming one-shot watches on every znode it reads, and hands the
new :class:`~dkv.cluster.layout.ClusterView` to the node. The connection
listener only sets flags and wakes greenlets: it never calls ZooKeeper or
blocks (kazoo's rule).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any, Callable

import gevent
import gevent.event
from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import (
    BadVersionError,
    ConnectionLoss,
    KazooException,
    NoAuthError,
    NodeExistsError,
    NoNodeError,
    OperationTimeoutError,
    SessionExpiredError,
)
from kazoo.handlers.gevent import SequentialGeventHandler
from kazoo.retry import KazooRetry

from dkv.auth import kazoo_args, secure_znodes
from dkv.cluster import layout
from dkv.errors import AuthError, DKVError, Unavailable
from dkv.logs import ZK_LOGGER
from dkv.node.config import NodeConfig

logger = logging.getLogger(__name__)


class Coordinator:
    def __init__(
        self,
        config: NodeConfig,
        on_view: Callable[[layout.ClusterView], None],
        on_connection: Callable[[bool], None],
        on_session_lost: Callable[[], None] = lambda: None,
    ) -> None:
        self.config = config
        self._on_view = on_view
        self._on_connection = on_connection
        self._on_session_lost = on_session_lost
        handler = SequentialGeventHandler()
        self.zk = KazooClient(
            hosts=config.zk,
            timeout=config.session_timeout,
            handler=handler,
            **kazoo_args(config.credentials),
            logger=ZK_LOGGER,
            connection_retry=KazooRetry(max_tries=-1, max_delay=1.0, sleep_func=handler.sleep_func),
            command_retry=KazooRetry(max_tries=3, max_delay=1.0, sleep_func=handler.sleep_func),
        )
        self.zk.add_listener(self._listener)
        self.connected = False
        self.view = layout.ClusterView()
        #: the view has been read from ZooKeeper at least once (until then it is empty)
        self.loaded = False
        #: views begun so far: a view with a higher ``seq`` than this count at some moment
        #: was read from ZooKeeper entirely after that moment
        self.reads_begun = 0
        #: bumped whenever a new view is published (waiters use view_changed)
        self.view_changed = gevent.event.Event()
        self._dirty = gevent.event.Event()
        self._session_lost = False
        self._refresher: gevent.Greenlet | None = None
        self._stopping = False

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        try:
            self.zk.start(timeout=max(self.config.session_timeout, 5.0))
        except Exception as e:
            raise Unavailable(f"cannot reach ZooKeeper at {self.config.zk}: {e}") from e
        try:
            for path in (layout.NODES, layout.SHARDS, layout.MIGRATIONS):
                self.zk.ensure_path(path)
            if self.config.credentials is not None:
                changed = secure_znodes(self.zk, self.config.credentials, layout.ROOTS)
                if changed:
                    logger.warning(
                        "gave %d znode(s) made without auth dkv's ZooKeeper ACL (only the "
                        "cluster key may change them now)",
                        changed,
                    )
        except NoAuthError:
            self.zk.stop()
            self.zk.close()
            raise AuthError(
                f"ZooKeeper at {self.config.zk} refused us: this cluster's znodes belong to "
                "another key (start with that cluster's --auth-dir)"
            ) from None
        self._register()
        self._refresher = gevent.spawn(self._refresh_loop)
        self._dirty.set()

    def stop(self) -> None:
        self._stopping = True
        if self._refresher is not None:
            self._refresher.kill()
        try:
            self.zk.stop()
            self.zk.close()
        except KazooException:
            pass

    def _register(self) -> None:
        """Create our ephemeral registration, waiting out a previous session's copy.

        A dropped connection (this process paused, ZooKeeper restarting) is retried: a
        node that gave up here would never join, or rejoin, the cluster.
        """
        path = layout.node_path(self.config.node_id)
        data = layout.encode({"addr": self.config.addr})
        deadline = time.monotonic() + 3 * self.config.session_timeout
        while not self._stopping:
            try:
                if self._register_once(path, data, deadline):
                    logger.info("registered as %s in ZooKeeper", path)
                    return
            except (ConnectionLoss, SessionExpiredError, OperationTimeoutError) as e:
                logger.info("registering %s: %s; retrying", path, type(e).__name__)
            gevent.sleep(0.5)

    def _register_once(self, path: str, data: bytes, deadline: float) -> bool:
        try:
            self.zk.create(path, data, ephemeral=True)
            return True
        except NodeExistsError:
            try:
                _, stat = self.zk.get(path)
            except NoNodeError:
                return False
            if stat.ephemeralOwner == self.zk.client_id[0]:
                return True
            if time.monotonic() > deadline:
                raise DKVError(
                    f"node id {self.config.node_id!r} is registered by another live "
                    f"process ({path}); pick another --node-id"
                ) from None
            logger.info("waiting for the previous session's %s to expire", path)
            return False

    # -- connection state (kazoo listener: flags only) ------------------------------

    def _listener(self, state: str) -> None:
        if state == KazooState.CONNECTED:
            self.connected = True
            gevent.spawn(self._on_reconnected)
        else:
            self.connected = False
            if state == KazooState.LOST:
                self._session_lost = True
        if not self._stopping:  # closing our own session at shutdown is no news
            gevent.spawn(self._on_connection, self.connected)

    def _on_reconnected(self) -> None:
        if self._session_lost and not self._stopping:
            self._session_lost = False
            logger.warning("ZooKeeper session was lost; registering again")
            try:
                self._on_session_lost()  # e.g. a writer steps down: its session did not survive
                self._register()
            except Exception:
                logger.exception("re-registration failed")
        self._dirty.set()

    # -- the view ------------------------------------------------------------------

    def _poke(self, event: Any = None) -> None:
        self._dirty.set()

    def _refresh_loop(self) -> None:
        while True:
            self._dirty.wait()
            self._dirty.clear()
            self.reads_begun += 1
            seq = self.reads_begun
            try:
                view = layout.read_view(self.zk, watch=self._poke)
                view.seq = seq
            except KazooException as e:
                logger.debug("view refresh failed (%s); retrying", e)
                gevent.sleep(0.2)
                self._dirty.set()
                continue
            self.view, self.loaded = view, True
            self.view_changed.set()
            self.view_changed = gevent.event.Event()
            try:
                self._on_view(view)
            except Exception:
                logger.exception("applying the cluster view failed")

    def refresh(self) -> None:
        """Ask for a fresh view soon."""
        self._dirty.set()

    # -- writes ----------------------------------------------------------------------

    def _update_shard(
        self, shard_id: str, change: Callable[[layout.Shard], layout.Shard | None]
    ) -> layout.Shard | None:
        """Read-modify-write the shard znode, checked against its version (retried on conflict).

        ``change`` returns the new shard, or None to leave it as it is.
        """
        path = layout.shard_path(shard_id)
        while True:
            raw, stat = self.zk.get(path)
            new = change(layout.Shard.from_bytes(shard_id, raw))
            if new is None:
                return None
            try:
                self.zk.set(path, new.to_bytes(), version=stat.version)
            except BadVersionError:
                continue
            self._dirty.set()
            return new

    def step_down(self, shard_id: str) -> None:
        """Give up the writer role of ``shard_id``: the replicas promote one of them.

        The next epoch is reserved with it: a shard without a writer never
        carries an epoch somebody wrote in (promotion reuses it).
        """
        me = self.config.node_id
        if self._update_shard(
            shard_id,
            lambda sh: replace(sh, epoch=sh.epoch + 1, writer=None, replicas=sh.members) if sh.writer == me else None,
        ):
            logger.warning("%s: stepped down as writer (our ZooKeeper session was lost)", shard_id)

    def bump_epoch(self, shard_id: str) -> int:
        """Raise the shard's epoch by one (after a rollback); return the new epoch."""
        me = self.config.node_id

        def bump(sh: layout.Shard) -> layout.Shard:
            if sh.writer != me:
                raise Unavailable(f"{me} is no longer the writer of {shard_id}")
            return replace(sh, epoch=sh.epoch + 1)

        shard = self._update_shard(shard_id, bump)
        assert shard is not None
        logger.info("%s epoch is now %d", shard_id, shard.epoch)
        return shard.epoch
