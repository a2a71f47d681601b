"""Failover safety rule 1 against real processes: the candidate adopts the most advanced log.

Real ZooKeeper, node processes, LevelDB, zerorpc (DESIGN §5; issue 10, item 2). The unit
tests of both safety rules are in tests/test_safety_rules.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kazoo.client import KazooClient
from kazoo.exceptions import NoNodeError

import dkv
from dkv.cluster import layout
from tests.support.cluster import Cluster
from tests.support.procs import wait_until

pytestmark = pytest.mark.integration

SID = "shard-1"


@pytest.fixture
def cluster(zk: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    monkeypatch.setenv("DKV_FAULT_HOOKS", "1")  # debug_zk_session: to end the dead writer's session at once
    # A session timeout well above the time the test keeps B paused (while C starts); the
    # failover does not wait for it (the dead writer's session is closed by the test).
    c = Cluster(zk, tmp_path, shards=1, replication_factor=3, write_quorum=2, session_timeout=8.0, write_timeout=4.0)
    try:
        yield c.start()
    finally:
        c.stop()


@pytest.fixture
def zk_admin(cluster: Cluster) -> Iterator[KazooClient]:
    zk = KazooClient(hosts=cluster.zk, **cluster.kazoo_args)
    zk.start(timeout=30)
    try:
        yield zk
    finally:
        zk.stop()
        zk.close()


def close_session(zk_hosts: str, session: list[Any]) -> None:
    """End a (dead) node's ZooKeeper session now, from a second client holding its id."""
    session_id, password = session
    other = KazooClient(hosts=zk_hosts.split("/", 1)[0], client_id=(session_id, password))
    other.start(timeout=10)
    other.stop()
    other.close()


def shard(zk: KazooClient) -> layout.Shard:
    raw, _ = zk.get(layout.shard_path(SID))
    return layout.Shard.from_bytes(SID, raw)


def contending(zk: KazooClient, node_id: str) -> bool:
    """Has ``node_id`` entered the shard's promotion lock (kazoo Lock: one child per contender)?"""
    path = f"{layout.shard_path(SID)}/promotion"
    try:
        return any(zk.get(f"{path}/{child}")[0] == node_id.encode() for child in zk.get_children(path))
    except NoNodeError:
        return False


def read(client: dkv.Client, key: str) -> list[bytes | None] | None:
    """``[value]`` once the shard answers a read (None: not yet, e.g. during the failover)."""
    try:
        return [client.get(key)]
    except dkv.errors.DKVError:
        return None


def test_a_lagging_candidate_adopts_the_acknowledged_write_only_the_writer_and_one_replica_held(
    cluster: Cluster, zk_admin: KazooClient
) -> None:
    """1 shard x 3, write_quorum 2. With replica C stopped, a write is acknowledged by the
    writer A and replica B only. Then A is killed (kill -9, its session ended at once) while B
    is paused, and C is started: C, behind, is the only contender, so it is the candidate
    (B is resumed once C is in the promotion lock, in time to answer C's fence). C must fetch
    the write from B and adopt it before it publishes itself; after the failover the write is
    readable, and once A returns as a replica all three members converge.

    Mutations checked by hand (the candidate keeps its own log): ``decide`` in
    dkv/cluster/promotion.py returning ``Publish()`` whenever enough members answered, or
    ``Promoter._attempt`` skipping ``_adopt`` on a ``FetchFrom`` (which the unit tests cannot
    see). Either way C becomes the writer without the write, and the test fails on
    ``assert got == [b"held by A and B"]`` ("the acknowledged write was lost in the failover",
    ``[None] == [b'held by A and B']``).
    """
    sh = cluster.shard_members()[SID]
    a, (b, c) = sh["writer"], sorted(sh["replicas"])
    A, B, C = cluster.nodes[a], cluster.nodes[b], cluster.nodes[c]
    client = cluster.client(timeout=10)
    client.mset({f"base{i}": "0" for i in range(20)})
    session = cluster.rpc(A.addr, "debug_zk_session")
    old_epoch = shard(zk_admin).epoch

    C.stop()  # a clean stop ends its session: A sees it down
    client.set("acked", "held by A and B")  # acknowledged: A's copy and B's (write_quorum 2)
    B.pause()  # B must not contend: the lagging C is to be the candidate
    A.kill()
    close_session(cluster.zk, session)
    C.start()
    try:
        wait_until(lambda: contending(zk_admin, c), 30, f"{c} to contend for the promotion")
    finally:
        B.resume()  # in time to answer C's fence (C needs 2 answers: itself and B)
    wait_until(lambda: shard(zk_admin).writer not in (None, a), 30, "a new writer")
    promoted = shard(zk_admin)
    assert promoted.writer == c and promoted.epoch == old_epoch + 1, (
        f"expected the lagging {c} to be promoted in epoch {old_epoch + 1}: {promoted}"
    )

    with cluster.client(timeout=10) as fresh:
        got = wait_until(lambda: read(fresh, "acked"), 30, "the shard to answer reads")
        assert got == [b"held by A and B"], "the acknowledged write was lost in the failover"
        assert fresh.mget([f"base{i}" for i in range(20)]) == [b"0"] * 20
    log = C.log(tail=None)
    adopted = re.search(rf"adopted (\d+) record\(s\) from {b}", log)
    assert adopted and int(adopted.group(1)) >= 1, log[-3000:]
    assert adopted.start() < log.index(f"{c} promoted to writer"), "adopted before publishing itself"

    A.start()  # the old writer returns as a replica of the new epoch
    wait_until(lambda: cluster.role_of(a) == "replica", 30, f"{a} to rejoin as a replica")
    wait_until(lambda: cluster.in_sync(SID), 30, "all three members in sync")
    digests = cluster.wait_converged(SID)
    assert set(digests) == {a, b, c}
    client.close()
