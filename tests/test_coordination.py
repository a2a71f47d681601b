"""The coordination API across a slot migration (real ZooKeeper, real node processes): a move
carries every entry's revision and deadline, keys keep expiring on their new shard, and the
revisions of a moved slot keep increasing (the target's floor goes above the source's)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dkv.slots import slot_of
from tests.faults.checkers import check_converged
from tests.support.cluster import Cluster
from tests.support.procs import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.zk]


def test_a_move_carries_revisions_and_deadlines_and_revisions_keep_increasing(zk: str, tmp_path: Path) -> None:
    cluster = Cluster(zk, tmp_path, shards=1, replication_factor=3, write_quorum=2, session_timeout=4.0).start()
    try:
        client = cluster.client()
        for i in range(200):
            assert client.set(f"long{i}", f"v{i}", ex=600)
            assert client.set(f"short{i}", f"s{i}", px=2500)
            assert client.set(f"plain{i}", f"p{i}")
        assert client.incr("counter", 41) == 41
        before = {k: client.get(k, with_meta=True) for i in range(200) for k in (f"long{i}", f"plain{i}")}
        before["counter"] = client.get("counter", with_meta=True)
        top = max(m.revision for m in before.values())
        for i in (4, 5, 6):
            cluster.add_node(f"n{i}")
        wait_until(cluster.balanced, 120, "the slots to be balanced over both shards", interval=0.2)
        owned = {sh["id"]: sh["slots"] for sh in cluster.cluster_info()["shards"]}
        moved = [k for k in before if any(a <= slot_of(k.encode()) <= b for a, b in owned["shard-2"])]
        assert len(moved) > 50, "the move should take about half the keys"
        # every entry arrived as the source had it: value, revision and deadline
        after = {k: client.get(k, with_meta=True) for k in before}
        assert after == before
        # short-lived keys expire on their new shard too, on every member
        wait_until(lambda: all(client.get(f"short{i}") is None for i in range(200)), 30, "the short keys to expire")
        for sid in ("shard-1", "shard-2"):
            wait_until(lambda: cluster.in_sync(sid), 60, f"{sid} in sync")
            check_converged(cluster.wait_converged(sid, timeout=60))  # byte-identical entries
        # a moved slot's revisions go on above every revision it had before the move
        for k in moved[:20]:
            assert client.set_revision(k, "new") > top
        assert client.incr("counter") == 42 and client.get("counter", with_meta=True).revision > top
        client.close()
    finally:
        cluster.stop()
