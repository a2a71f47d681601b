"""The cluster's ZooKeeper layout: paths, znode codecs, and reading the whole map.

All paths are relative to the connection string's chroot
(``--zk host:port/my-cluster``), so one ZooKeeper can hold many clusters::

    /nodes/<node_id>      EPHEMERAL   {"addr": "host:port"}
                          present while the node's session lives: its loss is the node's death
    /election/...         kazoo Election recipe: the winner is the controller
    /shards/<shard_id>    PERSISTENT  {"epoch": int, "writer": node_id | null, "replicas": [node_id, ...]}
                          membership survives a member's death (it returns as the same member);
                          every change is a write checked against the znode's version
    /slots                PERSISTENT  {"ranges": [[start, end, shard_id], ...]}
                          the slot map; its znode version is the map's version

Rules: a change that must be atomic is one version-checked ``set`` or one
multi-op transaction; the controller is the only writer of ``/shards`` and
``/slots`` except for a writer bumping its own shard's epoch.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

NODES = "/nodes"
ELECTION = "/election"
SHARDS = "/shards"
SLOTS = "/slots"


def node_path(node_id: str) -> str:
    return f"{NODES}/{node_id}"


def shard_path(shard_id: str) -> str:
    return f"{SHARDS}/{shard_id}"


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

    @property
    def members(self) -> list[str]:
        return ([self.writer] if self.writer else []) + list(self.replicas)

    def to_bytes(self) -> bytes:
        return encode({"epoch": self.epoch, "writer": self.writer, "replicas": self.replicas})

    @classmethod
    def from_bytes(cls, shard_id: str, raw: bytes) -> "Shard":
        d = decode(raw) or {}
        return cls(shard_id, int(d.get("epoch", 1)), d.get("writer"), list(d.get("replicas", [])))


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


def cluster_info(shards: list[Shard], slots: SlotRanges, nodes: dict[str, str],
                 slot_map_version: int) -> dict[str, Any]:
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
        out_nodes.append({"id": nid, "addr": nodes.get(nid), "role": role, "shard": shard,
                          "status": "up" if nid in nodes else "down"})
    return {
        "mode": "cluster",
        "slot_map_version": slot_map_version,
        "shards": [{"id": sh.id, "epoch": sh.epoch, "writer": sh.writer, "replicas": list(sh.replicas),
                    "slots": slots.of_shard(sh.id)} for sh in sorted(shards, key=lambda s: shard_sort_key(s.id))],
        "nodes": out_nodes,
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

    def shard_of(self, node_id: str) -> Shard | None:
        for sh in self.shards.values():
            if node_id in sh.members:
                return sh
        return None

    def writer_addr(self, shard_id: str) -> str | None:
        sh = self.shards.get(shard_id)
        return self.nodes.get(sh.writer) if sh and sh.writer else None

    def info(self) -> dict[str, Any]:
        return cluster_info(list(self.shards.values()), self.slots, self.nodes, self.slot_version)


def read_view(zk: Any, watch: Any = None) -> ClusterView:
    """Read the whole map with a kazoo client (blocking calls), leaving ``watch`` on every znode read."""
    from kazoo.exceptions import NoNodeError

    view = ClusterView()
    for nid in _children(zk, NODES, watch):
        try:
            view.nodes[nid] = (decode(zk.get(node_path(nid))[0]) or {}).get("addr")
        except NoNodeError:
            pass
    for sid in _children(zk, SHARDS, watch):
        try:
            raw, stat = zk.get(shard_path(sid), watch=watch)
        except NoNodeError:
            continue
        view.shards[sid] = Shard.from_bytes(sid, raw)
        view.shard_versions[sid] = stat.version
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


def _children(zk: Any, path: str, watch: Any) -> list[str]:
    return _read(zk, lambda: zk.get_children(path, watch=watch), path, watch, [])


def read_cluster_info(zk: Any) -> dict[str, Any]:
    """The ``cluster_info`` document, read from ZooKeeper with a kazoo client."""
    return read_view(zk).info()
