"""Cluster mode end to end: real ZooKeeper, real node processes, real LevelDB and zerorpc.

Issue "Cluster mode" acceptance: routing with every consistency level,
redirects from replicas, a replica killed and caught up (digests compared per
slot range), both replicas of a shard down (honest errors, the other shard
unaffected, recovery with nothing half-applied), stale-epoch prepares refused,
and catch-up by snapshot once the WAL was compacted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import msgpack
import pytest

import dkv
from dkv.cluster.replication import STALE_EPOCH, Prepare, Reply
from dkv.errors import Moved, QuorumNotReached, WriteTimeout
from dkv.keys import Limits
from dkv.wal.record import Op, Record
from tests.support.cluster import Cluster
from tests.support.procs import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster(zk: str, tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(zk, tmp_path, shards=2, replication_factor=3, write_quorum=2)
    try:
        yield c.start()
    finally:
        c.stop()


def test_two_shards_route_every_key_with_every_consistency_level(cluster: Cluster) -> None:
    shards = cluster.shard_members()
    assert sorted(shards) == ["shard-1", "shard-2"]
    assert [s["slots"] for s in shards.values()] == [[[0, 511]], [[512, 1023]]]
    data = {f"key:{i}": f"value-{i}" for i in range(400)}
    # written through a client seeded with one replica only: it learns the map and routes
    replica = shards["shard-2"]["replicas"][0]
    with dkv.Client(cluster.nodes[replica].addr, timeout=10, auth=cluster.client_key) as c:
        c.mset(data)
        c.set("single", "one")
    with cluster.client() as c:
        keys = sorted(data)
        for level in ("sequential", "linearizable"):
            assert c.mget(keys, consistency=level) == [data[k].encode() for k in keys]
        assert c.get("single", consistency="linearizable") == b"one"
        # eventual reads may be served by replicas once they applied the commit point
        wait_until(
            lambda: c.mget(keys, consistency="eventual") == [data[k].encode() for k in keys],
            15,
            "eventual reads to see every write",
        )
        assert dict(c.scan("key:")) == {k.encode(): v.encode() for k, v in data.items()}
    for sid in shards:
        cluster.wait_converged(sid)


def test_a_write_sent_to_a_replica_is_redirected_not_lost(cluster: Cluster) -> None:
    sh = cluster.shard_members()["shard-1"]
    key = cluster.keys_of_shard("shard-1", 1)[0]
    replica_addr = cluster.nodes[sh["replicas"][0]].addr
    writer_addr = cluster.nodes[sh["writer"]].addr
    reply = cluster.rpc(replica_addr, "batch", [["set", key.encode(), b"v"]])[0]
    assert reply[0] == 1 and reply[1][0] == Moved.code
    assert reply[1][2]["addr"] == writer_addr, "MOVED names the shard's writer"
    # a key of the other shard sent to this shard's writer: MOVED to the other writer
    other = cluster.keys_of_shard("shard-2", 1)[0]
    reply = cluster.rpc(writer_addr, "batch", [["set", other.encode(), b"v"]])[0]
    assert reply[1][0] == Moved.code
    assert reply[1][2]["addr"] == cluster.nodes[cluster.writer_of("shard-2")].addr
    assert cluster.rpc(replica_addr, "info")["applied_lsn"] == 0, "the refused write changed nothing"
    with cluster.client() as c:  # the client follows MOVED and the write lands once
        c.set(key, "v")
        assert c.get(key) == b"v"


def test_replica_killed_writes_continue_and_it_catches_up(cluster: Cluster) -> None:
    sid = "shard-1"
    victim = cluster.shard_members()[sid]["replicas"][0]
    keys = cluster.keys_of_shard(sid, 600)
    with cluster.client() as c:
        c.mset({k: "before" for k in keys[:200]})
        cluster.nodes[victim].kill()
        for k in keys[200:]:  # write_quorum=2: the writer and the other replica suffice
            c.set(k, "during")
        c.delete(keys[0])
        cluster.nodes[victim].start()
        cluster.wait_converged(sid)
        assert c.get(keys[0]) is None and c.get(keys[-1]) == b"during"
    digests = cluster.digests(sid)
    assert len(digests) == 3 and len({str(v) for v in digests.values()}) == 1


def test_both_replicas_down_fails_honestly_and_recovers(cluster: Cluster) -> None:
    sid, other = "shard-1", "shard-2"
    sh = cluster.shard_members()[sid]
    keys = cluster.keys_of_shard(sid, 10)
    other_keys = cluster.keys_of_shard(other, 5)
    with cluster.client(timeout=15) as c:
        c.set(keys[0], "acked")
        for r in sh["replicas"]:
            cluster.nodes[r].kill()
        # Before ZooKeeper notices, the writer tries, times out and rolls back: it
        # cannot know whether the dead replicas got the prepare, so the error is
        # indeterminate (or definite if it already saw them go).
        with pytest.raises((WriteTimeout, QuorumNotReached)):
            c.set(keys[1], "maybe")
        for r in sh["replicas"]:
            cluster.wait_session_gone(r)
        # Known down: refused up front, definite, nothing written.
        with pytest.raises(QuorumNotReached):
            c.set(keys[2], "never")
        lsn_before = cluster.info(sh["writer"])["applied_lsn"]
        for k in other_keys:  # the other shard is unaffected
            c.set(k, "fine")
        assert c.mget(other_keys) == [b"fine"] * len(other_keys)
        for r in sh["replicas"]:
            cluster.nodes[r].start()
        wait_until(lambda: cluster.in_sync(sid), 30, f"{sid} replicas back in sync")
        c.set(keys[3], "after")
        assert c.get(keys[2]) is None, "a definite failure was not applied"
        assert c.get(keys[0]) == b"acked" and c.get(keys[3]) == b"after"
        assert cluster.info(sh["writer"])["applied_lsn"] >= lsn_before
    cluster.wait_converged(sid)


def test_prepare_from_a_stale_epoch_is_refused(cluster: Cluster) -> None:
    sid = "shard-1"
    sh = cluster.shard_members()[sid]
    replica = cluster.nodes[sh["replicas"][0]]
    with cluster.client() as c:
        c.set(cluster.keys_of_shard(sid, 1)[0], "x")
    cluster.wait_converged(sid)  # the write was acknowledged by a quorum: let this replica have it too
    before = cluster.rpc(replica.addr, "info")
    promised = before["promised_epoch"]
    assert promised >= 1
    stale = Prepare(
        promised - 1,
        before["wal"]["last_lsn"],
        0,
        (Record(promised - 1, before["wal"]["last_lsn"] + 1, Op.PUT, b"evil", b"x"),),
        0,
    )
    reply = Reply.from_wire(cluster.rpc(replica.addr, "repl_prepare", stale.to_wire()))
    assert reply.reason == STALE_EPOCH and reply.promised == promised
    after = cluster.rpc(replica.addr, "info")
    assert after["wal"]["last_lsn"] == before["wal"]["last_lsn"], "nothing appended"
    # and a writer takes no prepares at all, whatever the epoch
    writer = cluster.nodes[sh["writer"]]
    reply = Reply.from_wire(cluster.rpc(writer.addr, "repl_prepare", Prepare(99, 0, 0, (), 0).to_wire()))
    assert reply.reason == STALE_EPOCH


def test_restarted_replica_catches_up_by_snapshot_after_compaction(zk: str, tmp_path: Path) -> None:
    c = Cluster(zk, tmp_path, shards=1, replication_factor=3, write_quorum=2, extra=("--wal-segment-bytes", "4096"))
    try:
        c.start()
        sid = "shard-1"
        victim = c.shard_members()[sid]["replicas"][1]
        c.nodes[victim].kill()
        c.wait_session_gone(victim)  # down for real: the writer drops it (and its queued messages)
        with c.client() as cl:
            for i in range(60):  # ~60 batches of 20 x 200 bytes: many 4 KiB segments, compacted
                cl.mset({f"s{i}:{j}": "x" * 200 for j in range(20)})
        writer_info = c.info(c.writer_of(sid))
        assert writer_info["wal"]["first_lsn"] > 1, "the writer's WAL must have been compacted"
        live_replica = c.shard_members()[sid]["replicas"][0]
        wait_until(lambda: c.info(live_replica)["wal"]["first_lsn"] > 1, 15, "the live replica to compact its WAL too")
        c.nodes[victim].start()
        c.wait_converged(sid)
        assert "installed a snapshot" in c.nodes[victim].log(tail=None)
    finally:
        c.stop()


def test_values_of_the_maximum_size_replicate_snapshot_migrate_and_scan(zk: str, tmp_path: Path) -> None:
    """40 values of 1 MiB (five message budgets' worth): written while a replica is down, it
    catches up by snapshot chunks; half the slots then move to a new shard (migration pages);
    scans merge the writers' byte-bounded pages; the replies the test can see are legal."""
    limits = Limits()
    c = Cluster(
        zk,
        tmp_path,
        shards=1,
        replication_factor=2,
        write_quorum=1,
        extra=("--wal-segment-bytes", str(4 * 1024 * 1024)),
    )
    data = {f"big{i:02d}".encode(): bytes([i]) * limits.max_value_bytes for i in range(40)}
    keys = sorted(data)
    try:
        c.start()
        victim = c.shard_members()["shard-1"]["replicas"][0]
        c.nodes[victim].stop()  # a clean stop ends its session at once
        c.wait_session_gone(victim)
        with c.client(timeout=30) as cl:
            cl.mset(data)
            writer = c.writer_of("shard-1")
            wait_until(
                lambda: ((c.info(writer) or {}).get("wal") or {}).get("first_lsn", 0) > 1,
                15,
                "the writer to compact its WAL",
            )
            c.nodes[victim].start()
            c.wait_converged("shard-1")
            assert "installed a snapshot" in c.nodes[victim].log(tail=None)
            page = c.rpc(c.nodes[writer].addr, "mig_scan", 0, 1023, None, 2000)
            assert 0 < len(page[0]) < 10 and page[1] is not None
            assert len(msgpack.packb(page, use_bin_type=True)) <= limits.max_message_bytes
            for i in (3, 4):
                c.add_node(f"n{i}")
            wait_until(c.balanced, 60, "half the slots to move to shard-2", interval=0.2)
            for sid in ("shard-1", "shard-2"):
                c.wait_converged(sid)
            owners = {sid: sh["slots"] for sid, sh in c.shard_members().items()}
            assert all(
                any(dkv.Client.slot_of(k) in range(a, b + 1) for a, b in slots for k in keys)
                for slots in owners.values()
            ), "both shards hold some of the values"
            assert cl.mget(keys) == [data[k] for k in keys]
            assert [k for k, _ in cl.scan(b"big")] == keys
            assert dict(cl.scan(b"big", page_size=7)) == data
    finally:
        c.stop()


def test_every_node_killed_and_restarted_loses_no_acknowledged_write(zk: str, tmp_path: Path) -> None:
    """G1 across a restart of every node: kill -9 all members mid-stream, restart, read back."""
    import threading

    c = Cluster(zk, tmp_path, shards=1, replication_factor=3, write_quorum=2)
    try:
        c.start()
        acked: dict[str, str] = {}
        lock = threading.Lock()
        client = c.client(timeout=3)

        def writer(t: int) -> None:
            for i in range(5000):
                key, value = f"t{t}:{i}", f"v{i}"
                try:
                    client.set(key, value)
                except dkv.errors.DKVError:
                    return
                with lock:
                    acked[key] = value

        threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        wait_until(lambda: len(acked) >= 1500, 60, "1,500 acknowledged writes")
        for n in c.nodes.values():
            n.kill()
        for th in threads:
            th.join(30)
        client.close()
        for n in c.nodes.values():
            n.start()
        wait_until(lambda: c.in_sync("shard-1"), 60, "the shard to be back in sync")
        with c.client(timeout=20) as cl:
            keys = sorted(acked)
            got = cl.mget(keys)
        lost = [k for k, v in zip(keys, got) if v != acked[k].encode()]
        assert not lost, f"{len(lost)} of {len(acked)} acknowledged writes lost: {lost[:5]}"
        c.wait_converged("shard-1")
    finally:
        c.stop()


def test_a_controller_whose_session_expired_stops_controlling(
    zk: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The election is tied to the session that won it: once that session expires the node
    stops acting as controller, even though it reconnects (with a new session) at once;
    another node is elected. Two controllers once started the same move twice (lost writes)."""
    from tests.support.cluster import expire_session

    monkeypatch.setenv("DKV_FAULT_HOOKS", "1")
    c = Cluster(zk, tmp_path, shards=1, replication_factor=3, write_quorum=2)
    try:
        c.start()

        def controllers() -> list[str]:
            return [n for n, p in c.nodes.items() if "is the cluster controller" in p.log_path.read_text()]

        wait_until(lambda: len(controllers()) == 1, 30, "a controller")
        first = controllers()[0]
        expire_session(c.zk, c.nodes[first].addr, c.creds)
        wait_until(
            lambda: "stops being the controller" in c.nodes[first].log_path.read_text(),
            30,
            f"{first} to stop being the controller",
        )
        wait_until(lambda: len(controllers()) == 2, 30, "another controller")
        c.wait_formed()  # the cluster carries on (the expired node re-registered)
    finally:
        c.stop()
