"""``dkv admin``: cluster administration through ZooKeeper (status, drain, undrain).

``drain SHARD`` marks a shard draining: the controller moves its slots, with
their data, to the other shards (one migration at a time, as when a shard
joins), and no new node joins it. Once it owns no slot its nodes can be
stopped. ``undrain SHARD`` clears the mark; the controller then balances slots
back onto it. ``status`` prints the shards, migrations under way and nodes.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from kazoo.client import KazooClient
from kazoo.exceptions import BadVersionError, NoNodeError

from dkv.cluster import layout
from dkv.errors import InvalidArgument, Unavailable


def _connect(zk: str, timeout: float) -> KazooClient:
    client = KazooClient(hosts=zk, timeout=timeout)
    try:
        client.start(timeout=timeout)
    except Exception as e:
        raise Unavailable(f"cannot reach ZooKeeper at {zk}: {e}") from None
    return client


def status(zk: KazooClient) -> str:
    from dkv.cli.repl import format_nodes, format_shards

    info = layout.read_cluster_info(zk)
    if not info["shards"]:
        return "no shards yet (no node has joined this cluster)"
    return f"{format_shards(info, {})}\n\n{format_nodes(info)}"


def set_draining(zk: KazooClient, shard_id: str, draining: bool) -> str:
    """Mark or unmark a shard draining (a version-checked write); refuse to drain the last shard."""
    path = layout.shard_path(shard_id)
    while True:
        try:
            raw, stat = zk.get(path)
        except NoNodeError:
            raise InvalidArgument(f"no shard {shard_id!r}") from None
        shard = layout.Shard.from_bytes(shard_id, raw)
        if shard.draining == draining:
            return f"{shard_id} is already {'draining' if draining else 'not draining'}"
        if draining:
            others = [s for s in layout.read_view(zk).shards.values()
                      if s.id != shard_id and s.writer and not s.draining]
            if not others:
                raise InvalidArgument(f"cannot drain {shard_id}: no other shard could take its slots")
        try:
            zk.set(path, replace(shard, draining=draining).to_bytes(), version=stat.version)
        except BadVersionError:
            continue
        if draining:
            return (f"{shard_id} is draining: its slots move to the other shards "
                    f"(watch with `dkv admin status`); stop its nodes once it owns no slot")
        return f"{shard_id} takes slots again"


def run_admin(zk_hosts: str, action: str, shard: str | None, timeout: float = 10.0) -> int:
    if not zk_hosts:
        raise InvalidArgument("dkv admin needs --zk HOST:PORT[/chroot] (or DKV_ZK)")
    if action in ("drain", "undrain") and not shard:
        raise InvalidArgument(f"dkv admin {action} needs a SHARD")
    zk = _connect(zk_hosts, timeout)
    try:
        out: Any = status(zk) if action == "status" else set_draining(zk, str(shard), action == "drain")
    finally:
        zk.stop()
        zk.close()
    print(out)
    return 0
