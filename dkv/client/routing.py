"""Slot -> node routing for the client, built from a ``cluster_info`` document (pure, no I/O)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from dkv.errors import Unavailable
from dkv.slots import NUM_SLOTS

#: The consistency level a read may be served by any up member of its shard at.
EVENTUAL = "eventual"


@dataclass(frozen=True)
class SlotMap:
    """For every slot, the node that takes its writes and the members that may serve eventual reads."""

    writers: tuple[str | None, ...]
    #: per slot: addresses of the shard's members whose status is ``up`` (writer first)
    members: tuple[tuple[str, ...], ...]
    #: every address of an up node (for requests any node can answer)
    nodes: tuple[str, ...]
    #: the slot map's version (the /slots znode's; None standalone)
    version: int | None = None
    #: a shard that owns slots has no live writer (a scan must wait for it)
    writerless: bool = False

    @classmethod
    def from_cluster_info(cls, info: dict[str, Any]) -> "SlotMap":
        up = {n["id"]: n["addr"] for n in info.get("nodes", []) if n.get("addr") and n.get("status", "up") == "up"}
        writers: list[str | None] = [None] * NUM_SLOTS
        members: list[tuple[str, ...]] = [()] * NUM_SLOTS
        for shard in info.get("shards", []):
            writer = up.get(shard.get("writer"))
            ids = [shard.get("writer"), *(shard.get("replicas") or [])]
            shard_members = tuple(dict.fromkeys(up[i] for i in ids if i in up))
            for start, end in shard.get("slots", []):
                for s in range(start, end + 1):
                    writers[s] = writer
                    members[s] = shard_members
        version = info.get("slot_map_version")
        return cls(
            tuple(writers),
            tuple(members),
            tuple(dict.fromkeys(up.values())),
            None if version is None else int(version),
            any(w is None for w in writers) and any(m for m in members),
        )

    def writer(self, slot: int) -> str:
        addr = self.writers[slot]
        if addr is None:
            raise Unavailable(f"slot {slot} has no writer")
        return addr

    def read_candidates(self, slot: int, consistency: str) -> tuple[str, ...]:
        """The nodes a read of ``slot`` at ``consistency`` may go to.

        ``eventual``: every up member of the slot's shard (the writer if none is
        known up); any other level: the writer only.
        """
        if consistency == EVENTUAL and self.members[slot]:
            return self.members[slot]
        return (self.writer(slot),)

    def reader(self, slot: int, consistency: str, rng: random.Random) -> str:
        """One node to read ``slot`` from at ``consistency``, chosen at random among the candidates."""
        return rng.choice(self.read_candidates(slot, consistency))
