"""Shared fixtures: real node processes and a real ZooKeeper (see tests/support)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.support import zookeeper
from tests.support.cluster import Cluster
from tests.support.procs import NodeProcess


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    """Start real ``dkv serve`` processes; all are stopped after the test."""
    nodes: list[NodeProcess] = []

    def make(*extra: str, name: str = "n1", start: bool = True, **kw: object) -> NodeProcess:
        n = NodeProcess(tmp_path / name / "data", None, *extra, node_id=name, **kw)  # type: ignore[arg-type]
        nodes.append(n)
        return n.start() if start else n

    yield make
    for n in nodes:
        if n.running:
            try:
                n.stop()
            except Exception:
                n.kill()


@pytest.fixture
def node(node_factory: Callable[..., NodeProcess]) -> NodeProcess:
    """One standalone node on LevelDB."""
    return node_factory()


@pytest.fixture(scope="session")
def zk_server() -> Iterator[zookeeper.ZooKeeper]:
    try:
        server = zookeeper.provide()
    except RuntimeError as e:
        pytest.fail(str(e))
    yield server
    server.stop()


def _chroot(hosts: str) -> Iterator[str]:
    from kazoo.client import KazooClient

    root = f"/dkv-test-{uuid.uuid4().hex[:12]}"
    zk = KazooClient(hosts)
    zk.start(timeout=30)
    zk.ensure_path(root)
    try:
        yield hosts + root
    finally:
        zk.delete(root, recursive=True)
        zk.stop()
        zk.close()


@pytest.fixture
def zk(zk_server: zookeeper.ZooKeeper) -> Iterator[str]:
    """A connection string with a fresh chroot for this test."""
    yield from _chroot(zk_server.hosts)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Soak tests run only with DKV_SOAK=1 (`make test-soak`)."""
    if os.environ.get("DKV_SOAK") == "1":
        return
    skip = pytest.mark.skip(reason="soak test: run with DKV_SOAK=1 (make test-soak)")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def cluster_1x3(zk: str, tmp_path: Path) -> Iterator[Cluster]:
    """One shard of three members (rf 3, write quorum 2, session timeout 4 s), started."""
    c = Cluster(zk, tmp_path, shards=1, replication_factor=3, write_quorum=2, session_timeout=4.0)
    try:
        yield c.start()
    finally:
        c.stop()  # resumes paused nodes first
