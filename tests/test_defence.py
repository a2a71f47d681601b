"""Defence in depth in the replication protocol (issue 9 item 2, DESIGN §10), against real
processes and a real ZooKeeper.

Forged ``repl_*`` calls, sent with a plain zerorpc client (holding the cluster key when the
cluster runs with auth: these checks must hold even for a peer that has it) are refused when
ZooKeeper's record (epoch) or the writer's shown log (snapshot LSN) contradicts them;
what cannot be told from the writer's own messages without transport authentication (a
prepare at the current epoch and next LSN) is caught by anti-entropy, which re-syncs the
replica. Every test checks that the data and availability are unchanged: digests equal,
every acknowledged key readable, writes still succeed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import pytest

import dkv
from dkv.cluster.replication import Prepare, Reply
from dkv.storage import Store
from dkv.wal.record import Op, Record
from tests.support.cluster import Cluster
from tests.support.procs import wait_until

pytestmark = pytest.mark.integration

SID = "shard-1"


@pytest.fixture
def cluster(zk: str, tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(
        zk,
        tmp_path,
        shards=1,
        replication_factor=3,
        write_quorum=2,
        session_timeout=4.0,
        extra=("--anti-entropy-interval", "1"),
    )
    try:
        yield c.start()
    finally:
        c.stop()


def _acked(client: dkv.Client, n: int = 200, prefix: str = "k") -> dict[str, str]:
    acked = {f"{prefix}{i}": f"v{i}" for i in range(n)}
    client.mset(acked)
    return acked


def _readable(client: dkv.Client, acked: dict[str, str]) -> bool:
    keys = sorted(acked)
    try:
        return client.mget(keys) == [acked[k].encode() for k in keys]
    except dkv.errors.DKVError:
        return False


def _healthy(c: Cluster, client: dkv.Client, acked: dict[str, str], tag: str) -> None:
    """Every acknowledged key readable, a write succeeds, every member converged."""
    wait_until(lambda: _readable(client, acked), 60, "every acknowledged key readable")
    wait_until(lambda: _try_set(client, f"after-{tag}", "x"), 60, "a write to succeed")
    acked[f"after-{tag}"] = "x"
    assert _readable(client, acked)
    wait_until(lambda: c.in_sync(SID), 60, "every member in sync")
    c.wait_converged(SID)


def _try_set(client: dkv.Client, key: str, value: str) -> bool:
    try:
        client.set(key, value)
        return True
    except dkv.errors.DKVError:
        return False


def _replica(c: Cluster) -> tuple[str, str, int]:
    sh = c.shard_members()[SID]
    rid = sh["replicas"][0]
    return rid, c.nodes[rid].addr, sh["epoch"]


def _eventual(c: Cluster, addr: str, key: str) -> Any:
    try:
        return c.rpc(addr, "get", key.encode(), "eventual", timeout=2)
    except Exception:
        return "error"


def _failover(c: Cluster, client: dkv.Client) -> float:
    """kill -9 of the writer; seconds until a write is acknowledged again. The old writer
    then returns as a replica."""
    old = c.writer_of(SID)
    t0 = time.monotonic()
    c.nodes[old].kill()
    wait_until(lambda: _try_set(client, "failover", "1"), 60, "writes to resume after the failover")
    took = time.monotonic() - t0
    c.nodes[old].start()
    wait_until(lambda: c.role_of(old) == "replica", 60, f"{old} to rejoin as a replica")
    return took


def test_forged_fence_beyond_the_recorded_epoch_is_refused(cluster: Cluster) -> None:
    client = cluster.client(timeout=10)
    acked = _acked(client)
    rid, addr, epoch = _replica(cluster)
    reply = Reply.from_wire(cluster.rpc(addr, "repl_fence", 2**62))
    assert reply.reason == "beyond_epoch", reply
    assert cluster.info(rid)["promised_epoch"] == epoch  # nothing promised, nothing on disk

    def logged() -> bool:
        # Refusals are logged at most once a second per reason: one of a writer's first
        # messages, sent before this node read its shard's record, may have just been.
        log = cluster.nodes[rid].log(tail=None)
        if "refused a fence (beyond_epoch" in log and str(2**62) in log:
            return True
        assert Reply.from_wire(cluster.rpc(addr, "repl_fence", 2**62)).reason == "beyond_epoch"
        return False

    wait_until(logged, 10, "the forged fence's refusal in the log")
    assert cluster.info(rid)["promised_epoch"] == epoch
    acked.update(_acked(client, 20, "k2-"))  # writes still succeed
    _healthy(cluster, client, acked, "fence")
    # A restart of every node (the promise file is read back) changes nothing.
    for n in cluster.nodes.values():
        n.stop()
    for n in cluster.nodes.values():
        n.start()
    _healthy(cluster, client, acked, "restart")  # (nodes just started may not have read the map yet)
    assert cluster.info(rid)["promised_epoch"] <= cluster.shard_members()[SID]["epoch"]
    client.close()


def test_forged_prepare_at_the_current_epoch_is_repaired_by_anti_entropy(cluster: Cluster) -> None:
    """Without transport authentication the replica cannot tell this prepare from the writer's
    (same epoch, next lsn): it takes it, then skips the writer's real record at that lsn as
    "already held". Anti-entropy finds the digests differ at one lsn and re-syncs it."""
    client = cluster.client(timeout=10)
    acked = _acked(client)
    cluster.wait_converged(SID)
    rid, addr, epoch = _replica(cluster)
    pos = Reply.from_wire(cluster.rpc(addr, "repl_fence", epoch))  # its position (a fence at the current epoch)
    forged = Prepare(
        epoch, pos.last_lsn, pos.last_epoch, (Record(epoch, pos.last_lsn + 1, Op.PUT, b"k7", b"FORGED"),), pos.last_lsn
    )
    assert Reply.from_wire(cluster.rpc(addr, "repl_prepare", forged.to_wire())).ok
    client.set("real", "1")  # the writer's record at the same lsn, skipped by the replica
    acked["real"] = "1"
    writer = cluster.writer_of(SID)
    wait_until(
        lambda: f"replica {rid} DIVERGED" in cluster.nodes[writer].log(tail=None),
        30,
        "anti-entropy to find the replica diverged",
    )
    wait_until(lambda: _eventual(cluster, addr, "k7") == b"v7", 30, "the forged value to be gone from the replica")
    _healthy(cluster, client, acked, "repaired")
    assert _eventual(cluster, addr, "real") == b"1"
    # The forged record is gone from the replica's log too: a failover does not bring it back.
    took = _failover(cluster, client)
    acked["failover"] = "1"
    _healthy(cluster, client, acked, "failover")
    for n in cluster.nodes.values():
        assert _eventual(cluster, n.addr, "k7") == b"v7", n.node_id
    print(f"\nwrites resumed {took:.2f}s after the writer's kill -9")
    client.close()


def test_forged_snapshot_beyond_the_writers_log_is_refused(cluster: Cluster) -> None:
    client = cluster.client(timeout=10)
    acked = _acked(client, 220)
    before = cluster.wait_converged(SID)
    rid, addr, epoch = _replica(cluster)
    # The call from the issue (epoch 2, not recorded here), then at the recorded epoch.
    for at, why in ((epoch + 1, "beyond_epoch"), (epoch, "beyond_log")):
        reply = Reply.from_wire(cluster.rpc(addr, "repl_snapshot", at, True, [[b"k1", b"SNAP-EVIL"]], True, 10**9, at))
        assert reply.reason == why, reply
    assert cluster.digests(SID) == before  # nothing changed anywhere
    assert "refused a snapshot chunk (beyond_log" in cluster.nodes[rid].log(tail=None)
    assert cluster.in_sync(SID)
    # The replica must not win an election with a log end of 10**9: every key survives.
    took = _failover(cluster, client)
    acked["failover"] = "1"
    _healthy(cluster, client, acked, "snapshot")
    assert took < cluster.session_timeout + 2, f"writes resumed only {took:.2f}s after the kill"
    client.close()


def test_anti_entropy_repairs_a_replica_whose_store_diverged(cluster: Cluster) -> None:
    client = cluster.client(timeout=10)
    acked = _acked(client)
    cluster.wait_converged(SID)
    rid, addr, _ = _replica(cluster)
    node = cluster.nodes[rid]
    node.stop()
    store = Store.open("leveldb", str(node.data_dir / "db"))  # damage behind the log's back
    store.put(b"k3", b"ROT")
    store.delete(b"k4")
    store.put(b"ghost", b"never written")
    store.close()
    node.start()
    writer = cluster.writer_of(SID)
    wait_until(
        lambda: f"replica {rid} DIVERGED" in cluster.nodes[writer].log(tail=None),
        30,
        "anti-entropy to find the replica diverged",
    )
    wait_until(
        lambda: [_eventual(cluster, addr, k) for k in ("k3", "k4", "ghost")] == [b"v3", b"v4", None],
        30,
        "the replica to hold the writer's data again",
    )
    _healthy(cluster, client, acked, "rot")

    # Comparisons go on, and now find every replica equal to the writer.
    def stats() -> dict[str, Any]:
        return (cluster.info(writer) or {}).get("replication", {}).get("anti_entropy", {})

    matched = stats()["matched"]
    wait_until(lambda: stats()["matched"] >= matched + 2, 30, "anti-entropy to find the replicas equal")
    assert stats()["diverged"] == 1
    client.close()
