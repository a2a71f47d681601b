"""The cluster's ZooKeeper layout: paths, znode codecs, and reading the whole map.

All paths are relative to the connection string's chroot
(``--zk host:port/my-cluster``), so one ZooKeeper can hold many clusters::

    /nodes/<node_id>      EPHEMERAL   {"addr": "host:port"}
                          present while the node's session lives: its loss is the node's death
    /election/...         kazoo Election recipe: the winner is the controller
    /shards/<shard_id>    PERSISTENT  {"epoch": int, "writer": node_id | null, "replicas": [node_id, ...],
                                       "draining": bool}
                          membership survives a member's death (it returns as the same member);
                          every change is a write checked against the znode's version;
                          ``draining`` (set by ``dkv admin drain``): its slots move away, no node joins it
    /slots                PERSISTENT  {"ranges": [[start, end, shard_id], ...]}
                          the slot map; its znode version is the map's version
    /migrations/m-<seq>   PERSISTENT  {"start": int, "end": int, "source": shard_id, "target": shard_id,
                                       "state": "copying" | "frozen", "from_lsn": int | null}
                          a slot range moving between shards (DESIGN §6); created by the
                          controller, driven by the target's writer, deleted in the same
                          multi-op that flips the range's owner in /slots, or on its own to
                          cancel the move (a freeze that outlived its timeout, ``dkv admin cancel``);
                          a move is created in one multi-op with a version-checked write of
                          ``/migrations`` itself, so moves are started one at a time even by
                          two nodes that both believe they are the controller

Rules: a change that must be atomic is one version-checked ``set`` or one
multi-op transaction; the controller is the only writer of ``/shards`` and
``/slots`` except for a writer bumping its own shard's epoch, a migration's
target writer flipping its range, and ``dkv admin`` (drain flags; removing an
empty shard none of whose members is alive). :func:`read_view` reads ``/migrations``
before ``/slots``: a reader that finds a migration gone is sure to read the
slot map it flipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

NODES = "/nodes"
ELECTION = "/election"
SHARDS = "/shards"
SLOTS = "/slots"
MIGRATIONS = "/migrations"
#: every top-level znode dkv keeps (its ACLs are dkv's with --auth-dir)
ROOTS = (NODES, ELECTION, SHARDS, SLOTS, MIGRATIONS)

#: migration states: the target copies while the source serves; then the source refuses the range
COPYING, FROZEN = "copying", "frozen"


def node_path(node_id: str) -> str:
    return f"{NODES}/{node_id}"


def shard_path(shard_id: str) -> str:
    return f"{SHARDS}/{shard_id}"


def migration_path(migration_id: str) -> str:
    return f"{MIGRATIONS}/{migration_id}"


def shard_sort_key(shard_id: str) -> tuple[int, str]:
    """Sort ``shard-2`` before ``shard-10``."""
    tail = shard_id.rsplit("-", 1)[-1]
    return (int(tail), shard_id) if tail.isdigit() else (1 << 30, shard_id)


def encode(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def decode(raw: bytes | None) -> Any:
    return json.loads(raw) if raw else None


@dataclass
class Shard:
    id: str
    epoch: int = 1
    writer: str | None = None
    replicas: list[str] = field(default_factory=list)
    #: being emptied: its slots move to other shards, and no node joins it
    draining: bool = False

    @property
    def members(self) -> list[str]:
        return ([self.writer] if self.writer else []) + list(self.replicas)

    def to_bytes(self) -> bytes:
        return encode(
            {"epoch": self.epoch, "writer": self.writer, "replicas": self.replicas, "draining": self.draining}
        )

    @classmethod
    def from_bytes(cls, shard_id: str, raw: bytes) -> "Shard":
        d = decode(raw) or {}
        return cls(
            shard_id,
            int(d.get("epoch", 1)),
            d.get("writer"),
            list(d.get("replicas", [])),
            bool(d.get("draining", False)),
        )


@dataclass
class SlotRanges:
    """The slot map as stored in ``/slots``: ``[[start, end, shard_id], ...]``."""

    ranges: list[tuple[int, int, str]] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        return encode({"ranges": [list(r) for r in self.ranges]})

    @classmethod
    def from_bytes(cls, raw: bytes | None) -> "SlotRanges":
        d = decode(raw) or {}
        return cls([(int(a), int(b), str(s)) for a, b, s in d.get("ranges", [])])

    def of_shard(self, shard_id: str) -> list[list[int]]:
        return [[a, b] for a, b, s in self.ranges if s == shard_id]

    def owner(self, slot: int) -> str | None:
        for a, b, s in self.ranges:
            if a <= slot <= b:
                return s
        return None

    def count(self, shard_id: str) -> int:
        return sum(b - a + 1 for a, b, s in self.ranges if s == shard_id)

    def moved(self, start: int, end: int, shard_id: str) -> "SlotRanges":
        """The map with slots ``start..end`` owned by ``shard_id`` (neighbours of one owner merged)."""
        owner = {slot: s for a, b, s in self.ranges for slot in range(a, b + 1)}
        for slot in range(start, end + 1):
            owner[slot] = shard_id
        out: list[tuple[int, int, str]] = []
        for slot in sorted(owner):
            if out and out[-1][1] == slot - 1 and out[-1][2] == owner[slot]:
                out[-1] = (out[-1][0], slot, owner[slot])
            else:
                out.append((slot, slot, owner[slot]))
        return SlotRanges(out)


@dataclass(frozen=True)
class Migration:
    """A slot range moving from shard ``source`` to shard ``target`` (``/migrations/<id>``)."""

    id: str
    start: int
    end: int
    source: str
    target: str
    state: str = COPYING
    #: the source's applied LSN when the target began copying: its WAL is kept from here
    from_lsn: int | None = None

    def __contains__(self, slot: object) -> bool:
        return isinstance(slot, int) and self.start <= slot <= self.end

    def to_bytes(self) -> bytes:
        return encode(
            {
                "start": self.start,
                "end": self.end,
                "source": self.source,
                "target": self.target,
                "state": self.state,
                "from_lsn": self.from_lsn,
            }
        )

    @classmethod
    def from_bytes(cls, migration_id: str, raw: bytes) -> "Migration":
        d = decode(raw) or {}
        return cls(
            migration_id,
            int(d["start"]),
            int(d["end"]),
            str(d["source"]),
            str(d["target"]),
            str(d.get("state", COPYING)),
            d.get("from_lsn"),
        )


def cluster_info(
    shards: list[Shard],
    slots: SlotRanges,
    nodes: dict[str, str],
    slot_map_version: int,
    migrations: list[Migration] | None = None,
) -> dict[str, Any]:
    """The ``cluster_info`` document (as a node, the client and the CLI show it).

    ``nodes`` maps every *live* node id to its address. A shard member without
    a live registration is listed with status ``down`` (addr None).
    """
    member_role: dict[str, tuple[str, str]] = {}
    for sh in shards:
        if sh.writer:
            member_role[sh.writer] = ("writer", sh.id)
        for r in sh.replicas:
            member_role[r] = ("replica", sh.id)
    out_nodes = []
    for nid in sorted(set(nodes) | set(member_role)):
        role, shard = member_role.get(nid, ("unassigned", None))
        out_nodes.append(
            {
                "id": nid,
                "addr": nodes.get(nid),
                "role": role,
                "shard": shard,
                "status": "up" if nid in nodes else "down",
            }
        )
    return {
        "mode": "cluster",
        "slot_map_version": slot_map_version,
        "shards": [
            {
                "id": sh.id,
                "epoch": sh.epoch,
                "writer": sh.writer,
                "replicas": list(sh.replicas),
                "slots": slots.of_shard(sh.id),
                "draining": sh.draining,
            }
            for sh in sorted(shards, key=lambda s: shard_sort_key(s.id))
        ],
        "nodes": out_nodes,
        "migrations": [
            {"id": m.id, "slots": [m.start, m.end], "source": m.source, "target": m.target, "state": m.state}
            for m in migrations or []
        ],
    }


@dataclass
class ClusterView:
    """Everything the cluster's znodes say, read at one moment."""

    shards: dict[str, Shard] = field(default_factory=dict)
    slots: SlotRanges = field(default_factory=SlotRanges)
    slot_version: int = -1
    #: live nodes: id -> addr
    nodes: dict[str, str] = field(default_factory=dict)
    #: znode version of each shard (for version-checked updates)
    shard_versions: dict[str, int] = field(default_factory=dict)
    #: slot ranges being moved, by id; and each one's znode version
    migrations: dict[str, Migration] = field(default_factory=dict)
    migration_versions: dict[str, int] = field(default_factory=dict)
    #: the reader's count of views it began to read, this one included (see Coordinator.reads_begun)
    seq: int = 0

    def migration_of(self, slot: int) -> Migration | None:
        for m in self.migrations.values():
            if slot in m:
                return m
        return None

    def shard_of(self, node_id: str) -> Shard | None:
        for sh in self.shards.values():
            if node_id in sh.members:
                return sh
        return None

    def writer_addr(self, shard_id: str) -> str | None:
        sh = self.shards.get(shard_id)
        return self.nodes.get(sh.writer) if sh and sh.writer else None

    def info(self) -> dict[str, Any]:
        return cluster_info(
            list(self.shards.values()),
            self.slots,
            self.nodes,
            self.slot_version,
            sorted(self.migrations.values(), key=lambda m: m.id),
        )


def read_view(zk: Any, watch: Any = None) -> ClusterView:
    """Read the whole map with a kazoo client (blocking calls), leaving ``watch`` on every znode read."""
    from kazoo.exceptions import NoNodeError

    view = ClusterView()
    for nid in _children(zk, NODES, watch):
        try:
            addr = (decode(zk.get(node_path(nid))[0]) or {}).get("addr")
            if isinstance(addr, str):  # a record without one is not a node we can reach
                view.nodes[nid] = addr
        except NoNodeError:
            pass
    for sid, raw, version in _entries(zk, SHARDS, watch):
        view.shards[sid] = Shard.from_bytes(sid, raw)
        view.shard_versions[sid] = version
    for mid, raw, version in _entries(zk, MIGRATIONS, watch):  # before /slots (see the module doc)
        view.migrations[mid] = Migration.from_bytes(mid, raw)
        view.migration_versions[mid] = version
    raw, stat = _read(zk, lambda: zk.get(SLOTS, watch=watch), SLOTS, watch, (None, None))
    if stat is not None:
        view.slots, view.slot_version = SlotRanges.from_bytes(raw), stat.version
    return view


def _read(zk: Any, read: Any, path: str, watch: Any, missing: Any) -> Any:
    """``read()``, or ``missing`` with an existence watch if ``path`` is absent.

    If the znode appears between the failed read and the watch, read again:
    otherwise its first data would go unseen until it changed.
    """
    from kazoo.exceptions import NoNodeError

    while True:
        try:
            return read()
        except NoNodeError:
            if watch is None or zk.exists(path, watch=watch) is None:
                return missing


def _entries(zk: Any, parent: str, watch: Any) -> list[tuple[str, bytes, int]]:
    """(name, data, version) of each child of ``parent`` (children deleted meanwhile left out)."""
    from kazoo.exceptions import NoNodeError

    out = []
    for name in _children(zk, parent, watch):
        try:
            raw, stat = zk.get(f"{parent}/{name}", watch=watch)
        except NoNodeError:
            continue
        out.append((name, raw, stat.version))
    return out


def _children(zk: Any, path: str, watch: Any) -> list[str]:
    return _read(zk, lambda: zk.get_children(path, watch=watch), path, watch, [])


def read_cluster_info(zk: Any) -> dict[str, Any]:
    """The ``cluster_info`` document, read from ZooKeeper with a kazoo client."""
    return read_view(zk).info()


def migrations_guard(zk: Any) -> tuple[int, list[str]]:
    """The ``/migrations`` znode's data version, then its children: pass the version to
    :func:`create_migration` so that a move created by anyone since makes ours fail."""
    _, stat = zk.get(MIGRATIONS)
    return stat.version, zk.get_children(MIGRATIONS)


def create_migration(zk: Any, m: "Migration", guard_version: int) -> str | None:
    """Create migration ``m`` (its id is assigned) if ``/migrations`` is unchanged since
    :func:`migrations_guard` returned ``guard_version``; its path, or None if another move
    was created meanwhile. One multi-op bumps ``/migrations``' own version with the
    create, so two controllers (say, one whose session expired and one newly elected)
    can never both start a move from the same reading."""
    tx = zk.transaction()
    tx.set_data(MIGRATIONS, b"", version=guard_version)
    tx.create(MIGRATIONS + "/m-", m.to_bytes(), sequence=True)
    results = tx.commit()
    if any(isinstance(r, Exception) for r in results):
        return None
    return str(results[1])


def cancel_migration(zk: Any, migration_id: str) -> bool:
    """Abandon a move: delete its znode. Its flip (a multi-op that deletes the same znode) can
    no longer commit; the source serves the range again. False if it was already gone."""
    from kazoo.exceptions import NoNodeError

    try:
        zk.delete(migration_path(migration_id))
        return True
    except NoNodeError:
        return False
