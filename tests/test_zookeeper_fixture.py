"""The ZooKeeper fixture hands out a real, working ZooKeeper (checked through kazoo).

The testcontainers variant needs a Docker engine; its twin runs the same checks
on the local ZooKeeper from Debian's ``zookeeper`` package.
"""

from __future__ import annotations

import threading
from typing import Iterator

import pytest
from kazoo.client import KazooClient

from tests.conftest import _chroot
from tests.support import zookeeper


def check_kazoo_roundtrip(hosts: str) -> None:
    """Persistent + ephemeral nodes, a watch, and a multi-op transaction all work."""
    zk = KazooClient(hosts)
    zk.start(timeout=30)
    try:
        zk.create("/slots", b"v1")
        seen = threading.Event()
        values: list[bytes] = []

        def watch(data: bytes | None, stat: object) -> None:
            if data is not None:
                values.append(data)
                if data == b"v2":
                    seen.set()

        zk.DataWatch("/slots", watch)
        tx = zk.transaction()
        tx.set_data("/slots", b"v2", version=0)
        tx.create("/marker", b"")
        assert all(r is not Exception and not isinstance(r, Exception) for r in tx.commit())
        assert seen.wait(10), "data watch did not fire"
        assert zk.get("/slots")[0] == b"v2"

        other = KazooClient(hosts)
        other.start(timeout=30)
        other.create("/nodes/a", b"", ephemeral=True, makepath=True)
        assert zk.get_children("/nodes") == ["a"]
        other.stop()
        other.close()
        assert zk.get_children("/nodes") == []  # the ephemeral went with its session
    finally:
        zk.stop()
        zk.close()


@pytest.fixture
def local_zk() -> Iterator[str]:
    if not zookeeper.local_zookeeper_installed():
        pytest.fail("local ZooKeeper is not installed: run `make test`, which installs Debian's zookeeper")
    server = zookeeper.start_local()
    try:
        yield from _chroot(server.hosts)
    finally:
        server.stop()


@pytest.fixture
def docker_zk() -> Iterator[str]:
    if not zookeeper.docker_engine_answers():
        pytest.skip("no Docker engine answers (twin: test_local_zookeeper_through_kazoo)")
    server = zookeeper.start_docker()
    try:
        yield from _chroot(server.hosts)
    finally:
        server.stop()


def test_local_zookeeper_through_kazoo(local_zk: str) -> None:
    check_kazoo_roundtrip(local_zk)


def test_testcontainers_zookeeper_through_kazoo(docker_zk: str) -> None:
    check_kazoo_roundtrip(docker_zk)


def test_session_fixture_gives_isolated_chroot(zk: str) -> None:
    check_kazoo_roundtrip(zk)
