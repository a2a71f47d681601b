"""A writer cut off by a network partition (network namespaces; needs root and ``ip netns``).

Unlike SIGSTOP, the partitioned writer keeps running: it must stop acknowledging
as soon as its ZooKeeper connection is suspended, a replica is promoted once its
session expires, and after the partition heals it rejoins as a replica. (The
SIGSTOP and forced-expiry tests in test_failover.py cover the same guarantees
on machines without network namespaces.)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.support.cluster import Cluster
from tests.support.netns import NetLab
from tests.support.procs import wait_until
from tests.test_failover import SID, acked_after, new_writer, under_load, verify

pytestmark = [pytest.mark.integration, pytest.mark.skipif(not NetLab.available(), reason="needs root and ip netns")]


@pytest.fixture
def lab_cluster(zk: str, tmp_path: Path) -> Iterator[Cluster]:
    if not zk.startswith("127.0.0.1:"):
        pytest.skip("namespaced nodes reach only a ZooKeeper on this machine (through the bridge)")
    lab = NetLab()
    c = Cluster(zk, tmp_path, shards=1, replication_factor=3, write_quorum=2, session_timeout=4.0, lab=lab)
    try:
        yield c.start()
    finally:
        c.stop()
        lab.teardown()


def test_partitioned_writer_is_replaced_and_rejoins(lab_cluster: Cluster) -> None:
    c = lab_cluster
    client, history, wl = under_load(c, 7)
    old = c.writer_of(SID)
    old_epoch = c.shard_members()[SID]["epoch"]
    c.lab.isolate(c.hosts[old])
    t_cut = time.monotonic()
    wait_until(lambda: new_writer(c, old), 60, "a replica to be promoted")
    wait_until(lambda: acked_after(history, t_cut) >= 20, 60, "writes to resume on the new writer")
    c.lab.heal(c.hosts[old])
    wait_until(lambda: c.role_of(old) == "replica", 60, f"{old} to rejoin as a replica")
    assert c.shard_members()[SID]["epoch"] > old_epoch
    wl.stop()
    verify(c, client, history)
    client.close()
