"""``dkv backup`` and ``dkv restore``: copy every shard's data to a directory, and load it back.

**Backup** (``dkv backup (ADDR | --zk HOSTS/chroot) DIR``): asks each shard's
writer (a standalone node is one shard owning every slot) to open a store
snapshot at its applied, committed LSN (``backup_open``, :mod:`dkv.node.backup`),
checks that the snapshots agree on who owns what (one slot map version, every
slot exactly once; while a slot migration is under way the writers refuse, and
the backup waits for it up to ``--migration-wait`` seconds, then fails and
says so), and pages each snapshot into one data file per shard. The files are
written first and the manifest last, so a directory without ``manifest.json``
is not a backup.

Entries keep their revision and expiry deadline. Entries already expired when a
shard's snapshot is taken are left out (no read can see them), and so are, at
restore, entries whose deadline has passed by then.

**Data file** (``SHARD.dkvb``): the 8 bytes ``DKVBAK01``, then one frame per
key, in storage order (slot, then key)::

    u32 key length | key | u32 entry length | entry        (big-endian)

where *entry* is the stored entry of :mod:`dkv.storage.entry` (``u8 flags | u64
revision | [u64 deadline, ms since the Unix epoch] | value``).

**Manifest** (``manifest.json``): ``format`` ("dkv-backup"), ``version`` (1),
``created`` (UTC, ISO 8601) and ``created_ms``, ``source`` (what was backed
up), ``mode``, ``slot_map_version``, ``keys``, ``bytes``, ``max_rev``, and per
shard: ``id``, ``slots`` (``[[start, end], ...]``), ``lsn``, ``epoch``, ``rev``
(the applied revision at the snapshot), ``keys``, ``bytes``,
``skipped_expired`` and ``files`` (``[{"name", "bytes", "sha256"}]``).

**Restore** (``dkv restore (ADDR | --zk ...) DIR``): verifies every file
against the manifest first (size, SHA-256, framing, key count): a damaged
backup is refused before anything is written. It refuses a target that holds
any key unless ``--force`` (then the backup's keys overwrite, other keys
stay). Each key goes to the writer of its slot in the *target's* slot map (the
target may have another number of shards than the source), which writes it
through its replicated log (``restore_write``: ``IMPORT`` writes keep revision
and deadline; a node refuses keys of slots it does not own). Finally every
writer raises its revision floor above the backup's revisions
(``restore_floor``), so later writes get higher revisions. Restore writes are
idempotent: a batch that failed or timed out is sent again.

Both need the cluster key when the cluster runs with auth (``--auth``: the
``cluster.key`` file, or the directory holding it).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, BinaryIO, Callable, Iterator

import gevent
import gevent.pool

from dkv import __version__
from dkv.auth import CLUSTER_KEY, Credentials, load_key
from dkv.client.connection import Connection, TransportError
from dkv.client.routing import SlotMap
from dkv.errors import AuthError, DKVError, InvalidArgument, Moved, TryAgain, Unavailable, WriteTimeout
from dkv.keys import ITEM_OVERHEAD
from dkv.slots import NUM_SLOTS, slot_of
from dkv.storage import entry as entries
from dkv.storage.entry import now_ms

FORMAT = "dkv-backup"
VERSION = 1
MAGIC = b"DKVBAK01"
MANIFEST = "manifest.json"
SUFFIX = ".dkvb"
_LEN = struct.Struct(">I")
#: pairs asked per backup page (the node also cuts pages at its page_bytes)
PAGE = 5000
#: one restore call carries at most this many pairs and bytes
RESTORE_PAIRS = 5000
RESTORE_BYTES = 4 * 1024 * 1024
#: restore calls in flight at once
RESTORE_INFLIGHT = 4
#: seconds between progress lines
PROGRESS_EVERY = 1.0
_RETRY = (Moved, TryAgain, Unavailable, WriteTimeout)
_READ = 1024 * 1024


def load_cluster_key(path: str) -> Credentials | None:
    """The cluster key from ``--auth`` (the ``cluster.key`` file or its directory); None without auth."""
    if not path:
        return None
    creds = load_key(os.path.join(path, CLUSTER_KEY) if os.path.isdir(path) else path)
    if not creds.is_peer:
        raise AuthError(f"{creds.path} is a client key; backup and restore need the cluster key ({CLUSTER_KEY})")
    return creds


# -- talking to the nodes ---------------------------------------------------------------


class Nodes:
    """Connections to the nodes (main thread, one gevent hub) and the cluster map."""

    def __init__(self, addrs: list[str], zk: str, timeout: float, creds: Credentials | None) -> None:
        if not addrs and not zk:
            raise InvalidArgument("give the node's ADDR (HOST:PORT) or --zk HOSTS[/chroot]")
        self.addrs, self.zk, self.timeout, self.creds = addrs, zk, timeout, creds
        self._conns: dict[str, Connection] = {}
        self._zkmap: Any = None

    def describe(self) -> str:
        return f"zk:{self.zk}" if self.zk else ",".join(self.addrs)

    def call(self, addr: str, method: str, *args: Any) -> Any:
        conn = self._conns.get(addr)
        if conn is None:
            conn = self._conns[addr] = Connection(addr, self.timeout, auth=self.creds)
        try:
            return conn.request(method, *args)
        except TransportError as e:
            raise Unavailable(str(e)) from None

    def cluster_info(self) -> dict[str, Any]:
        if self.zk:
            if self._zkmap is None:
                from dkv.client.zkmap import ZkClusterMap

                self._zkmap = ZkClusterMap(self.zk, self.timeout)
            self._zkmap.invalidate()
            return self._zkmap.cluster_info()
        errors = []
        for addr in self.addrs:
            try:
                return self.call(addr, "cluster_info")
            except DKVError as e:
                errors.append(f"{addr}: {e}")
        raise Unavailable("no node answered: " + "; ".join(errors))

    def writers(self) -> list[tuple[str, str]]:
        """``(shard id, writer address)`` of every shard that owns slots."""
        info = self.cluster_info()
        up = {n["id"]: n.get("addr") for n in info.get("nodes", []) if n.get("status", "up") == "up"}
        out = []
        for s in info.get("shards", []):
            if not s.get("slots"):
                continue
            addr = up.get(s.get("writer"))
            if not addr:
                raise Unavailable(f"{s.get('id')} has no live writer (failover in progress?); retry shortly")
            out.append((str(s["id"]), addr))
        if not out:
            raise Unavailable("no shard owns slots yet (has any node joined the cluster?)")
        return out

    def slot_map(self) -> SlotMap:
        return SlotMap.from_cluster_info(self.cluster_info())

    def close(self) -> None:
        for c in self._conns.values():
            c.close()
        self._conns.clear()
        if self._zkmap is not None:
            self._zkmap.close()
            self._zkmap = None


# -- progress ------------------------------------------------------------------------------


@dataclass
class Progress:
    """Keys and bytes per shard, printed to stderr at most every :data:`PROGRESS_EVERY` seconds."""

    verb: str
    quiet: bool = False
    keys: dict[str, int] = field(default_factory=dict)
    nbytes: dict[str, int] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    _last: float = field(default_factory=time.monotonic)

    def add(self, shard: str, keys: int, nbytes: int) -> None:
        self.keys[shard] = self.keys.get(shard, 0) + keys
        self.nbytes[shard] = self.nbytes.get(shard, 0) + nbytes
        now = time.monotonic()
        if now - self._last >= PROGRESS_EVERY:
            self._last = now
            self.show()

    def show(self, final: bool = False) -> None:
        if self.quiet:
            return
        parts = [f"{s} {k:,} keys {self.nbytes.get(s, 0) / 1e6:.1f} MB" for s, k in sorted(self.keys.items())]
        print(
            f"{self.verb}{' done' if final else ''}: {' | '.join(parts)} | {self.summary()}",
            file=sys.stderr,
            flush=True,
        )

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def summary(self) -> str:
        k, b, t = sum(self.keys.values()), sum(self.nbytes.values()), max(self.elapsed, 1e-6)
        return f"{k:,} keys, {b / 1e6:.1f} MB in {t:.1f}s ({k / t:,.0f} keys/s, {b / 1e6 / t:.1f} MB/s)"


# -- backup --------------------------------------------------------------------------------


def _check_dir(path: str) -> None:
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise InvalidArgument(f"{path} exists and is not a directory")
        if os.listdir(path):
            raise InvalidArgument(f"{path} is not empty: back up into a new or empty directory")
    else:
        try:
            os.makedirs(path)
        except OSError as e:
            raise InvalidArgument(f"cannot create {path}: {e}") from None


def _file_name(shard_id: str, i: int) -> str:
    return (shard_id if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,100}", shard_id) else f"shard{i}") + SUFFIX


def _open_snapshots(nodes: Nodes, wait: float) -> list[tuple[str, dict[str, Any]]]:
    """``(writer address, backup_open's answer)`` per shard: snapshots that agree on the slot map.

    Retries (a migration in progress, a failover, the map changing between two
    snapshots) for up to ``wait`` seconds."""
    deadline = time.monotonic() + wait
    delay = 0.2
    while True:
        opened: list[tuple[str, dict[str, Any]]] = []
        try:
            for _, addr in nodes.writers():
                opened.append((addr, nodes.call(addr, "backup_open")))
            _check_cover([info for _, info in opened])
            return opened
        except (TryAgain, Moved, Unavailable, _Disagree) as e:
            _close_snapshots(nodes, opened)
            if time.monotonic() + delay > deadline:
                if isinstance(e, TryAgain):
                    raise TryAgain(f"{e} (waited {wait:g}s; raise --migration-wait to wait longer)") from None
                raise Unavailable(f"could not take consistent snapshots within {wait:g}s: {e}") from None
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


class _Disagree(DKVError):
    """The snapshots of the shards do not describe one slot map (retry)."""


def _check_cover(infos: list[dict[str, Any]]) -> None:
    versions = {i.get("slot_version") for i in infos}
    if len(versions) > 1:
        raise _Disagree(f"the shards' writers saw different slot map versions {sorted(map(str, versions))}")
    owner: dict[int, str] = {}
    for i in infos:
        for a, b in i["slots"]:
            for s in range(a, b + 1):
                if s in owner:
                    raise _Disagree(f"slot {s} is owned by both {owner[s]} and {i['shard']}")
                owner[s] = i["shard"]
    if len(owner) != NUM_SLOTS:
        raise _Disagree(f"the snapshots cover {len(owner)} of {NUM_SLOTS} slots")


def _close_snapshots(nodes: Nodes, opened: list[tuple[str, dict[str, Any]]]) -> None:
    for addr, info in opened:
        try:
            nodes.call(addr, "backup_close", info["id"])
        except DKVError:
            pass  # it closes itself once idle


def _dump(nodes: Nodes, addr: str, info: dict[str, Any], path: str, progress: Progress) -> dict[str, Any]:
    """Page one snapshot into ``path``; the shard's manifest entry."""
    h = hashlib.sha256()
    keys = skipped = max_rev = 0
    shard = info["shard"]
    progress.add(shard, 0, 0)
    with open(path, "wb") as f:
        f.write(MAGIC)
        h.update(MAGIC)
        size = len(MAGIC)
        after: bytes | None = None
        while True:
            pairs, after, expired = nodes.call(addr, "backup_page", info["id"], after, PAGE)
            skipped += expired
            buf = bytearray()
            for k, blob in pairs:
                buf += _LEN.pack(len(k)) + k + _LEN.pack(len(blob)) + blob
                max_rev = max(max_rev, struct.unpack_from(">Q", blob, 1)[0])
            f.write(buf)
            h.update(buf)
            size += len(buf)
            keys += len(pairs)
            progress.add(shard, len(pairs), len(buf))
            if after is None:
                break
    nodes.call(addr, "backup_close", info["id"])
    return {
        "id": shard,
        "slots": info["slots"],
        "lsn": info["lsn"],
        "epoch": info["epoch"],
        "rev": max(info["rev"], max_rev),
        "keys": keys,
        "bytes": size,
        "skipped_expired": skipped,
        "snapshot_ms": info["time_ms"],
        "writer": addr,
        "files": [{"name": os.path.basename(path), "bytes": size, "sha256": h.hexdigest()}],
    }


def run_backup(
    addrs: list[str],
    zk: str,
    out_dir: str,
    *,
    timeout: float = 30.0,
    auth: str = "",
    quiet: bool = False,
    migration_wait: float = 60.0,
) -> int:
    if not out_dir:
        raise InvalidArgument("dkv backup needs a directory to write the backup into")
    if timeout <= 0 or migration_wait < 0:
        raise InvalidArgument("--timeout must be positive and --migration-wait not negative")
    creds = load_cluster_key(auth)
    nodes = Nodes(addrs, zk, timeout, creds)
    _check_dir(out_dir)
    written: list[str] = []
    try:
        info = nodes.cluster_info()
        opened = _open_snapshots(nodes, migration_wait)
        progress = Progress("backup", quiet)
        paths = [os.path.join(out_dir, _file_name(i["shard"], n)) for n, (_, i) in enumerate(opened)]
        written = paths
        jobs = [gevent.spawn(_dump, nodes, addr, i, p, progress) for (addr, i), p in zip(opened, paths)]
        gevent.joinall(jobs)
        failed = [j.exception for j in jobs if not j.successful()]
        if failed:
            _close_snapshots(nodes, opened)
            raise failed[0] if isinstance(failed[0], DKVError) else DKVError(str(failed[0]))
        shards = sorted((j.value for j in jobs), key=lambda s: min(a for a, _ in s["slots"]))
        created = time.time()
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "dkv_version": __version__,
            "created": datetime.fromtimestamp(created, timezone.utc).isoformat(timespec="seconds"),
            "created_ms": int(created * 1000),
            "source": nodes.describe(),
            "mode": info.get("mode", "cluster"),
            "slot_map_version": opened[0][1].get("slot_version"),
            "keys": sum(s["keys"] for s in shards),
            "bytes": sum(s["bytes"] for s in shards),
            "max_rev": max(s["rev"] for s in shards),
            "shards": shards,
        }
        tmp = os.path.join(out_dir, MANIFEST + ".tmp")
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(out_dir, MANIFEST))
        progress.show(final=True)
    except BaseException:
        for p in written:  # an unfinished backup leaves no data behind (and never a manifest)
            if os.path.exists(p):
                os.unlink(p)
        raise
    finally:
        nodes.close()
    at = ", ".join(f"{s['id']} at lsn {s['lsn']}" for s in shards)
    print(f"backed up {len(shards)} shard(s) ({at}): {progress.summary()} into {out_dir}")
    return 0


# -- restore -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Manifest:
    doc: dict[str, Any]
    dir: str

    @property
    def shards(self) -> list[dict[str, Any]]:
        return self.doc["shards"]

    def files(self) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        for s in self.shards:
            for f in s["files"]:
                yield s, f


def _corrupt(what: str) -> InvalidArgument:
    return InvalidArgument(f"the backup is damaged: {what}; nothing was restored")


def read_manifest(path: str) -> Manifest:
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise InvalidArgument(f"{path} is not a directory")
    try:
        with open(mpath) as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise InvalidArgument(f"{path} holds no {MANIFEST}: not a (complete) dkv backup") from None
    except (OSError, ValueError) as e:
        raise _corrupt(f"cannot read {MANIFEST} ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise InvalidArgument(f"{mpath} is not a dkv backup manifest")
    if doc.get("version") != VERSION:
        raise InvalidArgument(f"{mpath} is backup format version {doc.get('version')!r}; this dkv reads {VERSION}")
    try:
        for s in doc["shards"]:
            assert isinstance(s["id"], str) and isinstance(s["keys"], int) and isinstance(s["rev"], int)
            for f in s["files"]:
                name = f["name"]
                assert isinstance(name, str) and os.path.basename(name) == name and not name.startswith(".")
                assert isinstance(f["bytes"], int) and isinstance(f["sha256"], str)
        assert isinstance(doc["max_rev"], int)
    except (KeyError, TypeError, AssertionError):
        raise _corrupt(f"{MANIFEST} lacks or mangles a field") from None
    return Manifest(doc, path)


def _frames(f: BinaryIO, name: str) -> Iterator[tuple[bytes, bytes]]:
    """The ``(key, entry)`` frames of a data file (after its magic); InvalidArgument if malformed."""
    if f.read(len(MAGIC)) != MAGIC:
        raise _corrupt(f"{name} does not start with {MAGIC!r}")
    while True:
        head = f.read(4)
        if not head:
            return
        parts = []
        for what in ("key", "entry"):
            if len(head) != 4:
                raise _corrupt(f"{name} ends inside a frame")
            n = _LEN.unpack(head)[0]
            body = f.read(n)
            if len(body) != n:
                raise _corrupt(f"{name} ends inside a frame")
            parts.append(body)
            head = f.read(4) if what == "key" else b""
        yield parts[0], parts[1]


def verify(m: Manifest) -> None:
    """Check every data file against the manifest (size, SHA-256, framing, entries, key count)."""
    for s, fdesc in m.files():
        path = os.path.join(m.dir, fdesc["name"])
        try:
            size = os.path.getsize(path)
        except OSError:
            raise _corrupt(f"{fdesc['name']} is missing") from None
        if size != fdesc["bytes"]:
            raise _corrupt(f"{fdesc['name']} has {size} bytes; the manifest says {fdesc['bytes']}")
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_READ):
                h.update(chunk)
        if h.hexdigest() != fdesc["sha256"]:
            raise _corrupt(f"the SHA-256 of {fdesc['name']} is {h.hexdigest()}; the manifest says {fdesc['sha256']}")
        n = 0
        with open(path, "rb") as f:
            for key, blob in _frames(f, fdesc["name"]):
                try:
                    entries.decode(blob)
                except ValueError as e:
                    raise _corrupt(f"{fdesc['name']} holds a malformed entry ({e})") from None
                if not key:
                    raise _corrupt(f"{fdesc['name']} holds an empty key")
                n += 1
        if len(s["files"]) == 1 and n != s["keys"]:
            raise _corrupt(f"{fdesc['name']} holds {n} keys; the manifest says {s['keys']}")


def _pairs(m: Manifest) -> Iterator[tuple[str, bytes, bytes]]:
    for s, fdesc in m.files():
        with open(os.path.join(m.dir, fdesc["name"]), "rb") as f:
            for key, blob in _frames(f, fdesc["name"]):
                yield s["id"], key, blob


class _Restorer:
    """Routes pairs to the target's writers by slot and sends them, a few calls in flight."""

    def __init__(self, nodes: Nodes, progress: Progress, deadline_s: float) -> None:
        self.nodes, self.progress, self.retry_for = nodes, progress, deadline_s
        self.smap = nodes.slot_map()
        self.pool = gevent.pool.Pool(RESTORE_INFLIGHT)
        self.skipped = 0
        self.written = 0
        self.error: BaseException | None = None
        self._buf: dict[str, list[tuple[bytes, bytes]]] = {}
        self._size: dict[str, int] = {}

    def add(self, key: bytes, blob: bytes) -> None:
        addr = self.smap.writer(slot_of(key))
        buf = self._buf.setdefault(addr, [])
        buf.append((key, blob))
        self._size[addr] = self._size.get(addr, 0) + len(key) + len(blob) + ITEM_OVERHEAD
        if len(buf) >= RESTORE_PAIRS or self._size[addr] >= RESTORE_BYTES:
            self._flush(addr)

    def _flush(self, addr: str) -> None:
        pairs = self._buf.pop(addr, [])
        self._size.pop(addr, None)
        if pairs:
            if self.error is not None:
                raise self.error
            self.pool.spawn(self._send, pairs)

    def finish(self) -> None:
        for addr in list(self._buf):
            self._flush(addr)
        self.pool.join()
        if self.error is not None:
            raise self.error

    def _send(self, pairs: list[tuple[bytes, bytes]]) -> None:
        """Write ``pairs`` (regrouped by the current map); retry what the target refuses for now."""
        deadline = time.monotonic() + self.retry_for
        delay = 0.05
        todo = pairs
        try:
            while todo:
                groups: dict[str, list[tuple[bytes, bytes]]] = {}
                for k, b in todo:
                    groups.setdefault(self.smap.writer(slot_of(k)), []).append((k, b))
                todo = []
                for addr, group in groups.items():
                    try:
                        written, skipped = self.nodes.call(addr, "restore_write", [[k, b] for k, b in group])
                    except _RETRY as e:
                        if time.monotonic() > deadline:
                            raise Unavailable(f"the target kept refusing writes ({e})") from None
                        todo += group
                        continue
                    self.written += written
                    self.skipped += skipped
                    self.progress.add(addr, len(group), sum(len(k) + len(b) for k, b in group))
                if todo:
                    gevent.sleep(delay)
                    delay = min(delay * 2, 1.0)
                    self.smap = self.nodes.slot_map()
        except BaseException as e:  # noqa: BLE001 -- handed to the main greenlet
            self.error = self.error or e


def _empty(nodes: Nodes) -> bytes | None:
    """None if no writer of the target holds a (live) key; else one key it holds."""
    for _, addr in nodes.writers():
        page = nodes.call(addr, "scan", b"", None, 1, None)
        if page:
            return page[0][0]
    return None


def run_restore(
    addrs: list[str],
    zk: str,
    in_dir: str,
    *,
    timeout: float = 30.0,
    auth: str = "",
    quiet: bool = False,
    force: bool = False,
) -> int:
    if not in_dir:
        raise InvalidArgument("dkv restore needs the directory of a backup")
    if timeout <= 0:
        raise InvalidArgument("--timeout must be positive")
    creds = load_cluster_key(auth)
    m = read_manifest(in_dir)
    verify(m)
    nodes = Nodes(addrs, zk, timeout, creds)
    try:
        held = _empty(nodes)
        if held is not None and not force:
            from dkv.keys import quote

            raise InvalidArgument(
                f"the target is not empty (it holds {quote(held)}, for one): restore into an "
                "empty node or cluster, or give --force to write the backup over its data"
            )
        progress = Progress("restore", quiet)
        r = _Restorer(nodes, progress, deadline_s=max(timeout, 30.0))
        now = now_ms()
        expired = 0
        for _, key, blob in _pairs(m):
            if 0 < entries.deadline_of(blob) <= now:
                expired += 1
                continue
            r.add(key, blob)
        r.finish()
        floor = m.doc["max_rev"]
        for _, addr in nodes.writers():
            _retry(nodes.call, max(timeout, 30.0), addr, "restore_floor", floor)
        progress.show(final=True)
    finally:
        nodes.close()
    print(f"restored {r.written:,} keys from {in_dir} ({expired + r.skipped:,} expired, skipped): {progress.summary()}")
    return 0


def _retry(fn: Callable[..., Any], for_s: float, *args: Any) -> Any:
    deadline, delay = time.monotonic() + for_s, 0.05
    while True:
        try:
            return fn(*args)
        except _RETRY:
            if time.monotonic() > deadline:
                raise
            gevent.sleep(delay)
            delay = min(delay * 2, 1.0)
