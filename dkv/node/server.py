"""The node process: open storage, recover, serve the service over zerorpc, stop cleanly.

This is the thin I/O adapter around :class:`~dkv.node.service.NodeService`:
it owns the files (WAL, LevelDB), the zerorpc socket and the signal handlers.
Every RPC is a lean request/reply call except ``watch``, a zerorpc stream served
by :class:`~dkv.watch.stream.WatchService` (format: :mod:`dkv.watch`).
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

import gevent
import gevent.event
import zerorpc
import zmq

from dkv.auth import CLIENT, PEER
from dkv.errors import CorruptLog, DKVError, InvalidArgument, Unavailable
from dkv.keys import as_bytes, quote
from dkv.node.backup import BackupService
from dkv.node.config import NodeConfig
from dkv.node.expiry import Expirer
from dkv.node.pipeline import LocalWriter, WritePipeline
from dkv.node.service import NodeService
from dkv.protocol import unwrap
from dkv.storage import Store
from dkv.transport import RPCServer
from dkv.wal.log import Repair, WriteAheadLog, repair
from dkv.wal.memory import MemoryLog
from dkv.watch.stream import WatchService

logger = logging.getLogger(__name__)

#: Records replayed per apply call at recovery.
REPLAY_CHUNK = 10_000


def _int(x: Any, what: str) -> int:
    """``x`` if it is an integer (not a bool), else ``InvalidArgument``."""
    if not isinstance(x, int) or isinstance(x, bool):
        raise InvalidArgument(f"{what} must be an integer, not {type(x).__name__}")
    return x


def _optional_bytes(x: Any, what: str) -> bytes | None:
    return None if x is None else as_bytes(x, what)


class RPC:
    """The methods a node exposes over zerorpc.

    Every argument is checked here or by the service: a malformed call gets a typed
    ``InvalidArgument`` (never a Python ``TypeError``/``ValueError``), and changes nothing.
    (The RPC server checks each call's arity against these signatures first.)
    """

    def __init__(
        self, service: NodeService, watches: WatchService | None = None, backups: BackupService | None = None
    ) -> None:
        self._svc = service
        self._watches = watches
        self._backups = backups

    def batch(self, ops: list[Any]) -> list[list[Any]]:
        """Run many ops (get, getm, exists, ttl, set, cas, del, incr, expire, persist: see
        :mod:`dkv.protocol`); one [0, result] or [1, error] per op."""
        return self._svc.batch(ops)

    def get(self, key: Any, consistency: str = "sequential") -> bytes | None:
        return self._svc.one(["get", key, consistency])

    def set(self, key: Any, value: Any) -> int:
        """Set ``key``; the write's revision."""
        return self._svc.one(["set", key, value])

    def delete(self, key: Any) -> bool:
        return self._svc.one(["del", key])

    def mset(self, mapping: dict[Any, Any]) -> None:
        if not isinstance(mapping, dict):
            raise InvalidArgument("mset takes a map of key -> value")
        for reply in self._svc.batch([["set", k, v] for k, v in mapping.items()]):
            unwrap(reply)

    def mget(self, keys: list[Any]) -> list[bytes | None]:
        """Values of ``keys``; a reply beyond the page budget raises ``Deferred`` (use batch)."""
        if not isinstance(keys, (list, tuple)):
            raise InvalidArgument("mget takes a list of keys")
        return [unwrap(r) for r in self._svc.batch([["get", k] for k in keys])]

    def scan(
        self, prefix: Any = b"", start: Any = None, limit: int = 1000, slot_version: int | None = None
    ) -> list[list[bytes]]:
        """One page of [key, value] pairs in key order, keys >= start (in cluster mode: of the
        slots this node owns, checked against the client's slot map version)."""
        return self._svc.scan(prefix, start, limit, slot_version)

    @zerorpc.stream
    def watch(self, prefix: Any = b"", slots: Any = None, since: Any = None) -> Any:
        """A stream of the committed changes of keys with ``prefix`` in ``slots`` (a list of
        ``[start, end]`` ranges; None: every slot this node writes) with a revision above
        ``since`` (None: from now on), from this node as their shard's writer.

        A zerorpc *stream* (not a lean call: call it through ``zerorpc.Client``): messages
        ``["events", progress_rev, excluded_ranges, [[type, key, value, rev], ...]]``, a
        progress mark at least every second, and a last ``["end", [code, message, data]]``
        (MOVED/UNAVAILABLE/TRYAGAIN: resume elsewhere from the cursor; COMPACTED: the
        history after ``since`` is gone). Format and guarantees: :mod:`dkv.watch`.
        """
        if self._watches is None:
            raise Unavailable("this node serves no watches")
        return self._watches.open(prefix, slots, since)

    def info(self) -> dict[str, Any]:
        return self._svc.info()

    def cluster_info(self) -> dict[str, Any]:
        return self._svc.cluster_info()

    def ping(self) -> str:
        return "pong"

    def dbsize(self, after: Any = None) -> list[Any]:
        """``[keys, resume]``: live keys this node serves as writer, counted in bounded pages
        (call again with ``after=resume`` until it is None)."""
        return self._svc.dbsize(after)

    def digest(self, start: int = 0, end: int = 1023) -> list[Any]:
        """[applied_lsn, sha256] of slots start..end, to compare the members of a shard."""
        return self._svc.digest(_int(start, "start"), _int(end, "end"))

    # -- backup and restore (``dkv backup``/``dkv restore``, :mod:`dkv.node.backup`) --

    def _bk(self) -> BackupService:
        if self._backups is None:
            raise Unavailable("this node serves no backups")
        return self._backups

    def backup_open(self) -> dict[str, Any]:
        """Open a store snapshot of our shard's slots at the applied LSN: {id, shard, slots,
        slot_version, lsn, epoch, rev, time_ms}."""
        return self._bk().open()

    def backup_page(self, snapshot_id: str, after: bytes | None, limit: int) -> list[Any]:
        """[[[key, stored entry], ...], cursor, expired]: the snapshot's next pairs after storage key
        ``after`` (cursor None at the end), and how many expired entries the page left out."""
        if not isinstance(snapshot_id, str):
            raise InvalidArgument("a backup snapshot id is a string")
        return self._bk().page(snapshot_id, _optional_bytes(after, "after"), _int(limit, "limit"))

    def backup_close(self, snapshot_id: str) -> bool:
        return self._bk().close(snapshot_id)

    def restore_write(self, pairs: list[list[bytes]]) -> list[int]:
        """Write [key, stored entry] pairs (revision and deadline kept): [written, skipped_expired]."""
        return self._bk().restore(pairs)

    def restore_floor(self, rev: int) -> int:
        """Raise the revision floor to ``rev``; the applied revision."""
        return self._bk().floor(rev)

    # -- replication (cluster mode): called by the shard's writer and the controller --

    def _rt(self) -> Any:
        if self._svc.router is None:
            raise Unavailable("this node runs standalone (no --zk)")
        return self._svc.router

    def repl_prepare(self, wire: list[Any]) -> list[Any]:
        return self._rt().repl_prepare(wire)

    def repl_truncate(self, wire: list[Any]) -> list[Any]:
        return self._rt().repl_truncate(wire)

    def repl_fence(self, epoch: int) -> list[Any]:
        epoch = _int(epoch, "epoch")
        return self._rt().repl_fence(epoch)

    def repl_snapshot(
        self, epoch: int, first: bool, pairs: list[list[bytes]], done: bool, lsn: int, last_epoch: int, rev: int = 0
    ) -> list[Any]:
        if not isinstance(pairs, (list, tuple)) or not all(
            isinstance(p, (list, tuple))
            and len(p) == 2
            and isinstance(p[0], bytes)
            and p[0]
            and isinstance(p[1], bytes)
            for p in pairs
        ):
            raise InvalidArgument("snapshot pairs must be a list of [key, value] bytes")
        args = (
            _int(epoch, "epoch"),
            bool(first),
            pairs,
            bool(done),
            _int(lsn, "lsn"),
            _int(last_epoch, "last_epoch"),
            _int(rev, "rev"),
        )
        return self._rt().repl_snapshot(*args)

    def repl_read(self, start: int, limit: int) -> list[list[Any]]:
        start, limit = _int(start, "start"), _int(limit, "limit")
        return self._rt().repl_read(start, limit)

    def repl_digest(self, wire: list[Any]) -> list[Any]:
        """Anti-entropy: [reply, sha256 of the store at the asked lsn, or None]."""
        return self._rt().repl_digest(wire)

    def debug_zk_session(self) -> list[Any]:
        """Test hook (only with DKV_FAULT_HOOKS=1): our ZooKeeper session id and password,
        so a fault test can expire the session by closing it from another client."""
        if os.environ.get("DKV_FAULT_HOOKS") != "1":
            raise Unavailable("fault hooks are disabled (set DKV_FAULT_HOOKS=1)")
        session_id, password = self._rt().coord.zk.client_id
        return [session_id, password]

    # -- slot migration: called by the writer of the shard a range moves to --

    def mig_position(self) -> int:
        return self._rt().migration_source().position()

    def mig_scan(self, start: int, end: int, after: bytes | None, limit: int) -> list[Any]:
        args = (_int(start, "start"), _int(end, "end"), _optional_bytes(after, "after"), _int(limit, "limit"))
        return self._rt().migration_source().scan(*args)

    def mig_tail(self, start: int, end: int, after_lsn: int, limit: int) -> dict[str, Any]:
        args = (_int(start, "start"), _int(end, "end"), _int(after_lsn, "after_lsn"), _int(limit, "limit"))
        return self._rt().migration_source().tail(*args)

    def mig_freeze(self, migration_id: str) -> list[int]:
        if not isinstance(migration_id, str) or not 0 < len(migration_id) <= 200:
            raise InvalidArgument(f"migration id must be a short string, not {quote(migration_id)}")
        return self._rt().migration_source().freeze(migration_id)


#: Who may call each RPC (DESIGN §10): data RPCs take the client or the cluster key,
#: internal ones (replication, migration, digests, test hooks) only the cluster key.
#: Anything not listed here is refused as an unknown method.
ACCESS: dict[str, str] = {
    **{
        name: CLIENT
        for name in (
            "batch",
            "get",
            "set",
            "delete",
            "mset",
            "mget",
            "scan",
            "watch",
            "info",
            "cluster_info",
            "ping",
            "dbsize",
        )
    },
    **{
        name: PEER
        for name in (
            "digest",
            "repl_prepare",
            "repl_truncate",
            "repl_fence",
            "repl_snapshot",
            "repl_read",
            "repl_digest",
            "debug_zk_session",
            "mig_position",
            "mig_scan",
            "mig_tail",
            "mig_freeze",
            "backup_open",
            "backup_page",
            "backup_close",
            "restore_write",
            "restore_floor",
        )
    },
}


class Node:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self._stopped = gevent.event.Event()
        self._server: RPCServer | None = None
        self.runtime: Any = None
        self.http: Any = None

    @property
    def rpc_server(self) -> RPCServer | None:
        return self._server

    def open(self) -> None:
        """Open (and recover) the log and the store, start the pipeline, bind the socket."""
        cfg = self.config
        if cfg.durable:
            os.makedirs(cfg.data_dir, exist_ok=True)
            self.store = Store.open("leveldb", os.path.join(cfg.data_dir, "db"))
            wal_dir = os.path.join(cfg.data_dir, "wal")
            try:
                if cfg.wal_repair:
                    repair(wal_dir)  # under the store's lock: no other node has this data directory
                self.log: Any = WriteAheadLog(wal_dir, segment_bytes=cfg.wal_segment_bytes)
            except CorruptLog as e:
                self.store.close()
                raise CorruptLog(
                    f"{e}. Refusing to start: to cut the log there, after copying the bytes "
                    f"that follow to a quarantine file, restart with --wal-repair (or run "
                    f"`dkv wal repair {cfg.data_dir}`)",
                    **e.data,
                ) from None
            self._recover(replay=not cfg.cluster)
        else:
            self.store = Store.open("memory", None)
            self.log = MemoryLog()
        epoch = max(self.log.last_epoch, self.store.applied_epoch, 1)
        self.pipeline = WritePipeline(
            self.log,
            self.store,
            LocalWriter(self.log, self.store, epoch, cfg.durable),
            max_batch_records=cfg.max_batch_records,
            page_bytes=cfg.limits.page_bytes,
            offload=cfg.durable,
        )
        self.service = NodeService(cfg, self.store, self.log, self.pipeline)
        self.watches = WatchService(self.log, self.store, self.pipeline, cfg.limits, offload=cfg.durable)
        self.expirer = self.service.expirer = Expirer(
            self.store, self.pipeline, self.service.may_write, offload=cfg.durable
        )
        self.backups = BackupService(self.store, self.pipeline, cfg.limits, offload=cfg.durable)
        if cfg.cluster:
            from dkv.cluster.follower import PromiseFile
            from dkv.cluster.runtime import ClusterRuntime

            promise = PromiseFile(os.path.join(cfg.data_dir, "promise") if cfg.durable else None)
            self.runtime = ClusterRuntime(cfg, self.log, self.store, self.pipeline, promise)
            self.service.router = self.watches.router = self.backups.router = self.runtime
        self._server = RPCServer(
            RPC(self.service, self.watches, self.backups),
            access=ACCESS,
            creds=cfg.credentials,
            max_message_bytes=cfg.limits.max_message_bytes,
        )
        try:
            self._server.bind(cfg.endpoint)
        except zmq.ZMQError as e:
            self._close_storage()
            raise DKVError(f"cannot listen on {cfg.addr}: {e}") from e
        logger.info(
            "node %s serving on %s (engine=%s, data=%s, applied_lsn=%d, %s, %s)",
            cfg.node_id,
            cfg.addr,
            cfg.engine,
            cfg.data_dir if cfg.durable else "-",
            self.store.applied_lsn,
            f"cluster via {cfg.zk}" if cfg.cluster else "standalone",
            f"auth: CURVE with the keys of {cfg.auth_dir}"
            if cfg.credentials
            else "auth: none (--insecure)"
            if cfg.insecure
            else "auth: none (loopback only)",
        )

    def _recover(self, replay: bool) -> None:
        """Replay WAL records past the store's applied_lsn (DESIGN §3).

        In cluster mode nothing is replayed: records past the applied LSN may
        be uncommitted, and the shard's writer says how far to apply.
        """
        applied = self.store.applied_lsn
        if applied > self.log.last_lsn:
            # The log lost records the store already holds (a damaged tail was
            # cut). The store is ahead, so restart the log after it.
            logger.warning(
                "WAL ends at lsn %d but storage applied %d; restarting the log at %d",
                self.log.last_lsn,
                applied,
                applied,
            )
            self.log.reset_to(applied, self.store.applied_rev)
            return
        if not replay:
            return
        replayed = 0
        while self.store.applied_lsn < self.log.last_lsn:
            chunk = list(self.log.read_from(self.store.applied_lsn + 1, limit=REPLAY_CHUNK))
            if not chunk:
                break
            self.store.apply(chunk)
            replayed += len(chunk)
        if replayed:
            logger.info("recovered %d WAL record(s); applied_lsn=%d", replayed, self.store.applied_lsn)

    def serve_forever(self) -> None:
        assert self._server is not None
        for sig in (signal.SIGTERM, signal.SIGINT):
            gevent.signal_handler(sig, self._on_signal, sig)
        gevent.signal_handler(signal.SIGUSR1, self._dump_stacks)
        runner = gevent.spawn(self._server.run)
        self.expirer.start()
        if self.config.http_port:
            from dkv.node.http import HttpServer

            self.http = HttpServer(self)
            try:
                self.http.start()
            except DKVError:
                self.http = None
                runner.kill()
                self._shutdown()
                raise
        if self.runtime is not None:
            try:
                self.runtime.start()
            except DKVError:
                runner.kill()
                self._shutdown()
                raise
        self._stopped.wait()
        runner.kill()
        self._shutdown()

    def _on_signal(self, sig: int) -> None:
        logger.info("received %s; shutting down", signal.Signals(sig).name)
        self._stopped.set()

    def _dump_stacks(self) -> None:
        """``kill -USR1 <pid>``: log every thread's and greenlet's stack, to see what a stuck node waits on."""
        from gevent.util import format_run_info

        logger.warning("stack dump on SIGUSR1:\n%s", "\n".join(format_run_info()))

    def stop(self) -> None:
        self._stopped.set()

    def _shutdown(self) -> None:
        if self.http is not None:
            self.http.stop()
        self.expirer.stop()
        self.watches.close()  # streams end with UNAVAILABLE: their clients resume elsewhere
        if self.runtime is not None:
            self.runtime.stop()  # leave ZooKeeper first: peers see us go at once
        if self._server is not None:
            self._server.stop()
        self.backups.shutdown()  # open snapshots pin the store: close them before it
        self.pipeline.close()
        if self._server is not None:
            self._server.close()
        self._close_storage()
        logger.info("node %s stopped", self.config.node_id)

    def _close_storage(self) -> None:
        try:
            if self.config.durable:
                self.log.compact(self.store.checkpoint())
        finally:
            self.log.close()
            self.store.close()


def repair_wal(data_dir: str) -> Repair | None:
    """``dkv wal repair``: repair a stopped node's WAL (see :func:`dkv.wal.log.repair`).

    Holds the node's store open meanwhile, so it refuses (store "in use") while a node runs there.
    """
    wal_dir = os.path.join(data_dir, "wal")
    if not os.path.isdir(wal_dir):
        raise InvalidArgument(f"{data_dir} has no WAL directory ({wal_dir})")
    db = os.path.join(data_dir, "db")
    store = Store.open("leveldb", db) if os.path.isdir(db) else None
    try:
        return repair(wal_dir)
    finally:
        if store is not None:
            store.close()


def serve(config: NodeConfig) -> None:
    """Run a node until SIGTERM/SIGINT."""
    node = Node(config)
    node.open()
    node.serve_forever()
