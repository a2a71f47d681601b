"""``Client(zk=...)``: the slot map read from a real ZooKeeper and kept fresh by watches.

Cluster-mode nodes are not needed: the tests publish a cluster map with kazoo
(``dkv.cluster.layout``) whose members are real *standalone* nodes, which
serve every slot, so the routing the client derives from ZooKeeper is
observable by reading each node directly. Eventual-read routing is also unit
tested on :class:`~dkv.client.routing.SlotMap`.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import time
import uuid
from typing import Any, Callable, Iterator

import pytest
from kazoo.client import KazooClient

from dkv.client import Client
from dkv.client.routing import SlotMap
from dkv.cluster import layout
from dkv.cluster.layout import Shard, SlotRanges
from dkv.errors import Unavailable
from dkv.slots import NUM_SLOTS, slot_of
from tests.support import zookeeper
from tests.support.procs import NodeProcess, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.zk]

ALL = [(0, NUM_SLOTS - 1, "shard-1")]


# -- helpers (also used by tests/test_cli.py) ---------------------------------------


@pytest.fixture
def kz(zk: str) -> Iterator[KazooClient]:
    """A kazoo session on the test's chroot; the nodes it registers die with it."""
    client = KazooClient(zk)
    client.start(timeout=30)
    yield client
    client.stop()
    client.close()


def register(kz: KazooClient, node_id: str, addr: str) -> None:
    """Register a live node, as a node's ephemeral ``/nodes/<id>`` does."""
    kz.create(layout.node_path(node_id), layout.encode({"addr": addr}), ephemeral=True, makepath=True)


def publish(kz: KazooClient, nodes: dict[str, str], shards: list[Shard], ranges: list[tuple[int, int, str]]) -> None:
    """Write a whole cluster map: live nodes, shards, and ``/slots``."""
    for node_id, addr in nodes.items():
        register(kz, node_id, addr)
    for shard in shards:
        kz.create(layout.shard_path(shard.id), shard.to_bytes(), makepath=True)
    kz.create(layout.SLOTS, SlotRanges(ranges).to_bytes(), makepath=True)


def set_shard(kz: KazooClient, shard: Shard) -> None:
    """Replace a shard's znode (version-checked, as the controller does)."""
    _, stat = kz.get(layout.shard_path(shard.id))
    kz.set(layout.shard_path(shard.id), shard.to_bytes(), version=stat.version)


def key_in(slots: range, prefix: str) -> str:
    """A key (starting with ``prefix``) whose slot is in ``slots``."""
    return next(k for k in (f"{prefix}{i}" for i in itertools.count()) if slot_of(k.encode()) in slots)


@pytest.fixture
def start(node_factory: Callable[..., NodeProcess]) -> Callable[[str], NodeProcess]:
    """Start a diskless standalone node named ``name``."""
    return lambda name: node_factory("--engine", "memory", name=name)


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}:"


def direct(node: NodeProcess) -> Client:
    return Client(node.addr, timeout=5)


# -- through ZooKeeper ---------------------------------------------------------------


def test_set_get_mget_scan_through_zk(
    zk: str, kz: KazooClient, start: Callable[[str], NodeProcess], prefix: str
) -> None:
    n1 = start("n1")
    publish(kz, {"n1": n1.addr}, [Shard("shard-1", 3, "n1")], ALL)
    with Client(zk=zk, timeout=5) as c, direct(n1) as d:
        c.set(f"{prefix}a", "1")
        c.mset({f"{prefix}b": b"2", f"{prefix}c": "3"})
        assert c.get(f"{prefix}a") == b"1"
        assert c.mget([f"{prefix}a", f"{prefix}nope", f"{prefix}c"]) == [b"1", None, b"3"]
        assert c.mget([f"{prefix}b"], consistency="eventual") == [b"2"]
        assert list(c.scan(prefix)) == [
            (f"{prefix}{x}".encode(), v) for x, v in [("a", b"1"), ("b", b"2"), ("c", b"3")]
        ]
        assert c.exists(f"{prefix}a") and c.delete(f"{prefix}a") and not c.exists(f"{prefix}a")
        assert d.get(f"{prefix}b") == b"2"  # the writer ZooKeeper names got it
        assert c.info()["node_id"] == "n1"  # any node: learnt from the map, no seed given


def test_cluster_info_is_zookeepers_document(zk: str, kz: KazooClient, start: Callable[[str], NodeProcess]) -> None:
    n1 = start("n1")
    publish(kz, {"n1": n1.addr}, [Shard("shard-1", 3, "n1", ["n9"])], ALL)
    with Client(zk=zk, timeout=5) as c:
        info = c.cluster_info()
        assert info == layout.read_cluster_info(kz)
        assert info["mode"] == "cluster"
        assert info["shards"] == [
            {
                "id": "shard-1",
                "epoch": 3,
                "writer": "n1",
                "replicas": ["n9"],
                "slots": [[0, NUM_SLOTS - 1]],
                "draining": False,
            }
        ]
        assert {n["id"]: n["status"] for n in info["nodes"]} == {"n1": "up", "n9": "down"}
        info["shards"].clear()  # a copy: the client's own map is untouched
        assert c.cluster_info()["shards"]


def test_writer_change_in_zookeeper_moves_writes(
    zk: str, kz: KazooClient, start: Callable[[str], NodeProcess], prefix: str
) -> None:
    n1, n2 = start("n1"), start("n2")
    publish(kz, {"n1": n1.addr}, [Shard("shard-1", 1, "n1")], ALL)
    with Client(zk=zk, timeout=5) as c, direct(n1) as d1, direct(n2) as d2:
        c.set(f"{prefix}before", "1")
        assert d1.get(f"{prefix}before") == b"1"
        register(kz, "n2", n2.addr)
        set_shard(kz, Shard("shard-1", 2, "n2", ["n1"]))
        counter = itertools.count()

        def writes_reach_n2() -> bool:
            key = f"{prefix}probe{next(counter)}"
            c.set(key, "x")
            return d2.get(key) == b"x"

        wait_until(writes_reach_n2, 10, "writes to follow the new writer")
        c.set(f"{prefix}after", "2")
        assert (d2.get(f"{prefix}after"), d1.get(f"{prefix}after")) == (b"2", None)
        assert c.get(f"{prefix}after") == b"2"


def test_slot_map_change_in_zookeeper_moves_slots(
    zk: str, kz: KazooClient, start: Callable[[str], NodeProcess], prefix: str
) -> None:
    n1, n2 = start("n1"), start("n2")
    publish(kz, {"n1": n1.addr, "n2": n2.addr}, [Shard("shard-1", 1, "n1"), Shard("shard-2", 1, "n2")], ALL)
    low, high = key_in(range(512), prefix), key_in(range(512, NUM_SLOTS), prefix)
    with Client(zk=zk, timeout=5) as c, direct(n1) as d1, direct(n2) as d2:
        c.set(high, "old")
        assert d1.get(high) == b"old"
        _, stat = kz.get(layout.SLOTS)
        kz.set(
            layout.SLOTS,
            SlotRanges([(0, 511, "shard-1"), (512, NUM_SLOTS - 1, "shard-2")]).to_bytes(),
            version=stat.version,
        )
        wait_until(
            lambda: c.cluster_info()["slot_map_version"] == stat.version + 1, 10, "the client to see the new slot map"
        )
        c.mset({high: "new", low: "low"})
        assert (d2.get(high), d1.get(high)) == (b"new", b"old")
        assert (d1.get(low), d2.get(low)) == (b"low", None)
        assert c.get(high) == b"new"


def test_map_published_after_the_client_started_is_noticed(
    zk: str, kz: KazooClient, start: Callable[[str], NodeProcess], prefix: str
) -> None:
    n1 = start("n1")
    with Client(zk=zk, timeout=5) as c:
        assert c.cluster_info()["shards"] == []  # nothing there yet: every path is missing
        publish(kz, {"n1": n1.addr}, [Shard("shard-1", 1, "n1")], ALL)
        wait_until(
            lambda: c.cluster_info()["shards"] and c.cluster_info()["slot_map_version"] == 0,
            10,
            "the client to see the published map",
        )
        c.set(f"{prefix}a", "1")
        assert c.get(f"{prefix}a") == b"1"


def test_slot_without_live_writer_is_unavailable_within_the_timeout(zk: str, kz: KazooClient) -> None:
    publish(kz, {}, [Shard("shard-1", 1, "gone")], ALL)  # the writer is not registered: down
    with Client(zk=zk, timeout=0.5) as c:
        t0 = time.monotonic()
        with pytest.raises(Unavailable, match="has no writer"):
            c.get("k")
        assert time.monotonic() - t0 < 3


@pytest.fixture
def private_zk() -> Iterator[zookeeper.ZooKeeper]:
    """A ZooKeeper server of this test's own, which it may stop."""
    if zookeeper.local_zookeeper_installed():
        server = zookeeper.start_local()
    elif zookeeper.docker_engine_answers():
        server = zookeeper.start_docker()
    else:
        pytest.skip("no ZooKeeper this test may stop (needs a local install or a Docker engine)")
    try:
        yield server
    finally:
        with contextlib.suppress(Exception):
            server.stop()


def test_zookeeper_outage_keeps_serving_with_the_last_map(
    private_zk: zookeeper.ZooKeeper, start: Callable[[str], NodeProcess], prefix: str
) -> None:
    n1 = start("n1")
    kz = KazooClient(private_zk.hosts)
    kz.start(timeout=30)
    publish(kz, {"n1": n1.addr}, [Shard("shard-1", 1, "n1")], ALL)
    with Client(zk=private_zk.hosts, timeout=2) as c:
        c.set(f"{prefix}a", "1")
        private_zk.stop()
        zkmap = c._runner._core._zkmap  # type: ignore[union-attr]  # white box: wait until the outage is seen
        assert zkmap is not None
        wait_until(lambda: zkmap.stale and not zkmap._zk.connected, 10, "the client to see ZooKeeper go")
        for i in range(5):
            t0 = time.monotonic()
            c.set(f"{prefix}{i}", "v")
            assert c.get(f"{prefix}{i}") == b"v"
            assert time.monotonic() - t0 < 1  # no waiting on ZooKeeper
        assert c.cluster_info()["shards"][0]["writer"] == "n1"
    kz.stop()
    kz.close()


def test_unreachable_zookeeper_raises_unavailable_quickly() -> None:
    t0 = time.monotonic()
    with pytest.raises(Unavailable, match="ZooKeeper at 127.0.0.1:1/x did not answer within 1s"):
        Client(zk="127.0.0.1:1/x", timeout=1)
    assert time.monotonic() - t0 < 5


def test_eventual_reads_spread_over_up_members(
    zk: str, kz: KazooClient, start: Callable[[str], NodeProcess], prefix: str
) -> None:
    # Two standalone nodes hold different values for one key, so each read shows who served it.
    n1, n2 = start("n1"), start("n2")
    publish(kz, {"n1": n1.addr, "n2": n2.addr}, [Shard("shard-1", 1, "n1", ["n2", "n3"])], ALL)
    key = f"{prefix}k"
    with Client(zk=zk, timeout=5) as c, direct(n1) as d1, direct(n2) as d2:
        d1.set(key, "writer")
        d2.set(key, "replica")
        assert set(c.mget([key] * 20)) == {b"writer"}  # sequential: the writer only
        assert set(c.mget([key] * 20, consistency="linearizable")) == {b"writer"}
        seen: set[bytes | None] = set()

        def both_members_served() -> bool:
            seen.update(c.mget([key] * 10, consistency="eventual"))
            return len(seen) == 2

        wait_until(both_members_served, 10, "eventual reads from both up members")
        assert seen == {b"writer", b"replica"}  # n3 is down: never tried (it would fail)


# -- SlotMap (pure) ---------------------------------------------------------------------------


def cluster_doc() -> dict[str, Any]:
    shards = [
        Shard("shard-1", 4, "w1", ["r1", "r2"]),
        Shard("shard-2", 1, "w2", ["r3"]),
        Shard("shard-3", 1, "gone", ["r4"]),
    ]
    slots = SlotRanges([(0, 99, "shard-1"), (100, 199, "shard-2"), (200, 1023, "shard-3")])
    live = {"w1": "h:1", "r1": "h:2", "w2": "h:3", "r4": "h:5"}  # r2, r3 and "gone" are down
    return layout.cluster_info(shards, slots, live, 7)


def test_slot_map_candidates_are_the_up_members() -> None:
    smap = SlotMap.from_cluster_info(cluster_doc())
    assert smap.read_candidates(5, "eventual") == ("h:1", "h:2")  # writer first, r2 down
    assert smap.read_candidates(150, "eventual") == ("h:3",)  # r3 down: the writer
    assert smap.read_candidates(500, "eventual") == ("h:5",)  # writer down: its live replica
    for level in ("sequential", "linearizable"):
        assert smap.read_candidates(5, level) == ("h:1",)
        with pytest.raises(Unavailable, match="slot 500 has no writer"):
            smap.read_candidates(500, level)
    assert smap.writer(150) == "h:3"
    assert set(smap.nodes) == {"h:1", "h:2", "h:3", "h:5"}


def test_slot_map_reader_picks_randomly_among_candidates() -> None:
    smap = SlotMap.from_cluster_info(cluster_doc())
    rng = random.Random(42)
    picks = [smap.reader(7, "eventual", rng) for _ in range(200)]
    assert set(picks) == {"h:1", "h:2"}
    assert 50 < picks.count("h:1") < 150
    assert {smap.reader(7, "sequential", rng) for _ in range(20)} == {"h:1"}


def test_slot_map_from_standalone_info() -> None:
    doc = {
        "mode": "standalone",
        "shards": [{"id": "shard-0", "epoch": 1, "writer": "n", "replicas": [], "slots": [[0, 1023]]}],
        "nodes": [{"id": "n", "addr": "h:9", "role": "writer", "shard": "shard-0", "status": "up"}],
    }
    smap = SlotMap.from_cluster_info(doc)
    assert smap.writers == ("h:9",) * NUM_SLOTS
    assert smap.read_candidates(1023, "eventual") == ("h:9",)
