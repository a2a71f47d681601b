"""``dkv admin``: cluster administration through ZooKeeper.

``status`` prints the shards, migrations under way and nodes.
``drain SHARD`` marks a shard draining: the controller moves its slots, with
their data, to the other shards (one migration at a time, as when a shard
joins), and no new node joins it. ``undrain SHARD`` clears the mark; the
controller then balances slots back onto it. ``remove SHARD`` deletes a
drained shard from the map once its nodes are stopped (DESIGN §6: removing a
shard is the moves in reverse, then this). ``cancel MIGRATION`` abandons a
slot move (the source keeps the range and serves it; the controller plans
the move afresh): the way out of a move that cannot finish.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

from kazoo.client import KazooClient
from kazoo.exceptions import BadVersionError, NoAuthError, NoNodeError, RolledBackError

from dkv.auth import Credentials, kazoo_args, load_auth_dir
from dkv.cluster import layout
from dkv.errors import AuthError, InvalidArgument, Unavailable
from dkv.logs import ZK_LOGGER, LastWarning

#: seconds ``dkv admin`` waits for ZooKeeper by default (--timeout)
CONNECT_TIMEOUT = 3.0
#: the admin's ZooKeeper session timeout (it only lives for one command)
SESSION_TIMEOUT = 10.0


def _connect(zk: str, timeout: float, creds: Credentials | None) -> KazooClient:
    """A started kazoo client; :class:`Unavailable` with the cause after ``timeout`` seconds."""
    try:
        client = KazooClient(hosts=zk, timeout=SESSION_TIMEOUT, logger=ZK_LOGGER, **kazoo_args(creds))
    except ValueError as e:
        raise InvalidArgument(f"bad ZooKeeper address {zk!r}: {e}") from None
    last = LastWarning()  # kazoo's reason for each failed attempt ("Connection refused")
    ZK_LOGGER.addHandler(last)
    try:
        client.start(timeout=timeout)
    except Exception as e:
        cause = last.message or str(e)
        raise Unavailable(f"cannot reach ZooKeeper at {zk} within {timeout:g}s ({cause})") from None
    finally:
        ZK_LOGGER.removeHandler(last)
    return client


def status(zk: KazooClient, timeout: float = 2.0, creds: Credentials | None = None) -> str:
    """The map as ZooKeeper holds it (one read); each writer is asked for its replicas' lag."""
    from dkv.cli.repl import writer_infos
    from dkv.client import Client

    info = layout.read_cluster_info(zk)
    if not info["shards"]:
        return "no shards yet (no node has joined this cluster)"
    addrs = [n["addr"] for n in info["nodes"] if n.get("status") == "up" and n.get("addr")]
    infos = {}
    if addrs:
        with Client(addrs, timeout=timeout, auth=creds) as client:
            infos = writer_infos(client, info)
    return status_tables(info, infos)


def status_tables(info: Mapping[str, Any], infos: Mapping[str, Mapping[str, Any] | None]) -> str:
    """The shard table and the node table of one view: one ``cluster_info`` read and one round
    of writer ``info()`` answers, so they cannot contradict each other (a writer that did not
    answer is ``unreachable`` in both, though ZooKeeper still counts it up)."""
    from dkv.cli.repl import format_nodes, format_shards

    return f"{format_shards(info, infos)}\n\n{format_nodes(info, infos)}"


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
            others = [
                s for s in layout.read_view(zk).shards.values() if s.id != shard_id and s.writer and not s.draining
            ]
            if not others:
                raise InvalidArgument(f"cannot drain {shard_id}: no other shard could take its slots")
        try:
            zk.set(path, replace(shard, draining=draining).to_bytes(), version=stat.version)
        except BadVersionError:
            continue
        if draining:
            return (
                f"{shard_id} is draining: its slots move to the other shards "
                f"(watch with `dkv admin status`); stop its nodes once it owns no slot"
            )
        return f"{shard_id} takes slots again"


def remove_shard(zk: KazooClient, shard_id: str) -> str:
    """Delete a drained shard: draining, owning no slot, none of its members alive. One multi-op
    checks the shard's and the slot map's versions (no slot came back to it meanwhile)."""
    try:
        raw, stat = zk.get(layout.shard_path(shard_id))
    except NoNodeError:
        raise InvalidArgument(f"no shard {shard_id!r}") from None
    shard = layout.Shard.from_bytes(shard_id, raw)
    view = layout.read_view(zk)
    if not shard.draining:
        raise InvalidArgument(f"{shard_id} is not drained: `dkv admin drain {shard_id}` first")
    owned = view.slots.count(shard_id)
    if owned or any(shard_id in (m.source, m.target) for m in view.migrations.values()):
        raise InvalidArgument(
            f"{shard_id} still owns {owned} slot(s) or a move is under way: wait until "
            f"`dkv admin status` shows it with no slot"
        )
    alive = sorted(set(shard.members) & set(view.nodes))
    if alive:
        raise InvalidArgument(f"{shard_id} still has live members ({', '.join(alive)}): stop them first")
    tx = zk.transaction()
    tx.check(layout.SLOTS, view.slot_version)
    for path in _descendants(zk, layout.shard_path(shard_id)):  # e.g. its promotion lock
        tx.delete(path)
    tx.delete(layout.shard_path(shard_id), version=stat.version)
    failed = [r for r in tx.commit() if isinstance(r, Exception) and not isinstance(r, RolledBackError)]
    if failed:
        raise Unavailable(f"{shard_id} or the slot map changed meanwhile ({type(failed[0]).__name__}); try again")
    return (
        f"{shard_id} removed; to reuse its former members ({', '.join(shard.members) or 'none'}), "
        f"start them with empty data directories: they join as new nodes"
    )


def _descendants(zk: KazooClient, path: str) -> list[str]:
    """Every znode under ``path``, deepest first (the order a multi-op deletes them in)."""
    out: list[str] = []
    for child in zk.get_children(path):
        out += _descendants(zk, f"{path}/{child}") + [f"{path}/{child}"]
    return out


def cancel(zk: KazooClient, migration_id: str) -> str:
    try:
        m = layout.Migration.from_bytes(migration_id, zk.get(layout.migration_path(migration_id))[0])
    except NoNodeError:
        raise InvalidArgument(f"no migration {migration_id!r} (finished or cancelled already?)") from None
    if not layout.cancel_migration(zk, migration_id):
        return f"{migration_id} ended meanwhile"
    return (
        f"{migration_id} cancelled: slots {m.start}..{m.end} stay with {m.source}; the controller "
        f"will plan a move again (drain or undrain a shard to change where slots go)"
    )


#: action -> (what its argument names, or None for no argument)
ACTIONS = {"status": None, "drain": "SHARD", "undrain": "SHARD", "remove": "SHARD", "cancel": "MIGRATION"}


def run_admin(
    zk_hosts: str, action: str, name: str | None, timeout: float = CONNECT_TIMEOUT, auth_dir: str = ""
) -> int:
    if not zk_hosts:
        raise InvalidArgument("dkv admin needs --zk HOST:PORT[/chroot] (or DKV_ZK)")
    if action not in ACTIONS:
        raise InvalidArgument(f"unknown action {action!r}: one of {', '.join(ACTIONS)}")
    if ACTIONS[action] and not name:
        raise InvalidArgument(f"dkv admin {action} needs a {ACTIONS[action]}")
    creds = load_auth_dir(auth_dir) if auth_dir else None
    zk = _connect(zk_hosts, timeout, creds)
    try:
        out: Any
        if action == "status":
            out = status(zk, min(timeout, 2.0), creds)
        elif action in ("drain", "undrain"):
            out = set_draining(zk, str(name), action == "drain")
        elif action == "remove":
            out = remove_shard(zk, str(name))
        else:
            out = cancel(zk, str(name))
    except NoAuthError:
        raise AuthError(
            "ZooKeeper refused the change: this cluster's znodes need the cluster key "
            "(give --auth-dir DIR or DKV_AUTH_DIR)"
        ) from None
    finally:
        zk.stop()
        zk.close()
    print(out)
    return 0
