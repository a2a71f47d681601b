"""Slot -> node routing for the client, built from a node's ``cluster_info`` (pure, no I/O)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dkv.errors import Unavailable
from dkv.slots import NUM_SLOTS


@dataclass(frozen=True)
class SlotMap:
    """For every slot, the address of the node that takes its writes."""

    writers: tuple[str | None, ...]
    #: every known node address (for requests any node can answer)
    nodes: tuple[str, ...]

    @classmethod
    def from_cluster_info(cls, info: dict[str, Any]) -> "SlotMap":
        addr_of = {n["id"]: n["addr"] for n in info.get("nodes", [])}
        writers: list[str | None] = [None] * NUM_SLOTS
        for shard in info.get("shards", []):
            addr = addr_of.get(shard.get("writer"))
            for start, end in shard.get("slots", []):
                for s in range(start, end + 1):
                    writers[s] = addr
        return cls(tuple(writers), tuple(addr_of.values()))

    def writer(self, slot: int) -> str:
        addr = self.writers[slot]
        if addr is None:
            raise Unavailable(f"slot {slot} has no writer")
        return addr
