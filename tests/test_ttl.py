"""TTL acceptance (issue 11): real node processes, real ZooKeeper, real LevelDB.

A key set with ``ex=1`` is gone about 1 s later on every member of its shard
(each member read directly, ``eventual``), also when its writer was killed
(``kill -9``) in between; the ``expire`` record that removed it is in every
member's log (read through the internal ``repl_read`` RPC), after the record
that set it; and the members' stores converge. On a standalone node: ex, px,
ttl, expire and persist as documented, scan skips expired keys, an expired
key's ``get(with_meta=True)`` is None, ``incr`` keeps the deadline and a plain
``set`` clears it.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator

import pytest

import dkv
from dkv.client.client import Meta
from dkv.wal.record import Op
from tests.support.cluster import Cluster
from tests.support.procs import NodeProcess, wait_until

pytestmark = pytest.mark.integration

SID = "shard-1"
#: records asked per repl_read page
PAGE = 500


# -- cluster --------------------------------------------------------------------------


@pytest.fixture
def cluster(cluster_1x3: Cluster) -> Cluster:
    return cluster_1x3


def members(cluster: Cluster) -> list[str]:
    sh = cluster.shard_members()[SID]
    return [sh["writer"], *sh["replicas"]]


def read_on(cluster: Cluster, member: str, key: str) -> list[Any]:
    """``[ok, value]``: ``key`` read on ``member`` alone (``eventual``: its own store); ok is False
    while the member may not serve reads (a lagging replica, a writer taking over)."""
    try:
        return [True, cluster.rpc(cluster.nodes[member].addr, "get", key, "eventual", timeout=2)]
    except Exception:
        return [False, None]


def log_of(cluster: Cluster, member: str) -> list[list[Any]]:
    """Every record of ``member``'s log, ``[epoch, lsn, op, key, value, rev, expires_at]``."""
    out: list[list[Any]] = []
    start = 1
    while True:
        page = cluster.rpc(cluster.nodes[member].addr, "repl_read", start, PAGE)
        if not page:
            return out
        out += page
        start = page[-1][1] + 1


def records_of(cluster: Cluster, member: str, key: str) -> list[list[Any]]:
    try:
        return [r for r in log_of(cluster, member) if r[3] == key.encode()]
    except Exception:  # not answering yet (restarting)
        return []


def wait_gone_everywhere(cluster: Cluster, key: str, ids: list[str]) -> None:
    wait_until(
        lambda: all(read_on(cluster, m, key) == [True, None] for m in ids), 30, f"{key} to read as absent on {ids}"
    )


def wait_expire_record_everywhere(cluster: Cluster, key: str, ids: list[str], set_rev: int) -> None:
    """Every member's log holds, for ``key``, the ``set`` (revision ``set_rev``, a deadline) and
    after it exactly one ``expire`` record, with a higher revision."""

    def logged() -> bool:
        return all(any(r[2] == Op.EXPIRE for r in records_of(cluster, m, key)) for m in ids)

    wait_until(logged, 30, f"the expire record of {key} in the logs of {ids}", interval=0.2)
    for m in ids:
        recs = records_of(cluster, m, key)
        assert [r[2] for r in recs] == [Op.PUT, Op.EXPIRE], (m, recs)
        put, expire = recs
        assert put[5] == set_rev and put[6] > 0, (m, put)
        assert expire[1] > put[1] and expire[5] > set_rev, (m, recs)


def test_key_with_ex_1_expires_on_every_member_through_an_expire_record(cluster: Cluster) -> None:
    ids = members(cluster)
    with cluster.client() as c:
        t0 = time.time()
        rev = c.set_revision("session", "alive", ex=1)
        t1 = time.time()
        assert rev is not None
        wait_gone_everywhere(cluster, "session", ids)
        assert c.get("session") is None and c.get("session", with_meta=True) is None and c.ttl("session") is None
    wait_expire_record_everywhere(cluster, "session", ids, rev)
    # The writer decided the deadline once, 1 s after the write (same machine, same clock).
    put = records_of(cluster, ids[0], "session")[0]
    assert int(t0 * 1000) + 1000 <= put[6] <= int(t1 * 1000) + 1001, (t0, t1, put)
    cluster.wait_converged(SID)


def test_key_with_ex_1_expires_on_every_member_across_a_writer_kill(cluster: Cluster) -> None:
    old = cluster.writer_of(SID)
    ids = members(cluster)
    with cluster.client(timeout=30) as c:
        c.set("other", "stays")
        rev = c.set_revision("session", "alive", ex=1)
        assert rev is not None
        # Acknowledged by a quorum, deadline 1 s away: the writer dies before deciding the expiry.
        cluster.nodes[old].kill()
        wait_until(lambda: cluster.writer_of(SID) not in (None, old), 60, "a replica to be promoted")
        new = cluster.writer_of(SID)
        survivors = [m for m in ids if m != old]
        assert new in survivors
        wait_gone_everywhere(cluster, "session", survivors)
        assert c.get("session") is None
        # The promoted writer decided the expiry and logged it; the old writer gets it on return.
        wait_expire_record_everywhere(cluster, "session", survivors, rev)
        cluster.nodes[old].start()
        wait_until(lambda: cluster.in_sync(SID), 60, "the old writer back in sync as a replica")
        wait_gone_everywhere(cluster, "session", ids)
        wait_expire_record_everywhere(cluster, "session", ids, rev)
        assert all(read_on(cluster, m, "other") == [True, b"stays"] for m in ids)
        put, expire = records_of(cluster, old, "session")
        assert expire[0] > put[0], (put, expire)  # decided in the promoted writer's epoch
    cluster.wait_converged(SID)


# -- standalone -------------------------------------------------------------------------


@pytest.fixture
def client(node: NodeProcess) -> Iterator[dkv.Client]:
    with dkv.Client(node.addr, timeout=5) as c:
        yield c


def gone(c: dkv.Client, key: str) -> Callable[[], bool]:
    return lambda: c.get(key) is None


def test_ex_px_and_ttl(client: dkv.Client) -> None:
    assert client.set("ex", "1", ex=100) and client.set("px", "1", px=50_000)
    ex, px = client.ttl("ex"), client.ttl("px")
    assert ex is not None and 99 < ex <= 100 and px is not None and 49 < px <= 50
    assert client.set("plain", "1") and client.ttl("plain") is None and client.ttl("missing") is None
    assert client.set("short", "1", px=100)
    wait_until(gone(client, "short"), 10, "the px=100 key to expire")
    assert client.ttl("short") is None and not client.exists("short")
    with pytest.raises(dkv.errors.InvalidArgument):
        client.set("bad", "1", ex=1, px=1000)
    for bad in ({"ex": 0}, {"ex": -1}, {"px": 0}, {"px": 1.5}):
        with pytest.raises(dkv.errors.InvalidArgument):
            client.set("bad", "1", **bad)  # type: ignore[arg-type]
    assert not client.exists("bad")


def test_expire_and_persist(client: dkv.Client) -> None:
    assert not client.expire("nope", 10) and not client.persist("nope")
    client.set("k", "v")
    assert not client.persist("k")  # no deadline to remove
    assert client.expire("k", 100)
    left = client.ttl("k")
    assert left is not None and 99 < left <= 100
    assert client.persist("k") and client.ttl("k") is None and not client.persist("k")
    assert client.expire("k", 0.05)
    wait_until(gone(client, "k"), 10, "the key to expire")
    assert not client.expire("k", 10) and not client.persist("k")  # expired: as if absent


def test_expired_key_is_hidden_from_get_with_meta_and_scan(client: dkv.Client) -> None:
    client.set("scan:b", "2")
    client.set("scan:c", "3", ex=100)
    client.set("scan:a", "1", px=200)
    wait_until(lambda: client.get("scan:a", with_meta=True) is None, 10, "scan:a to expire")
    assert client.get("scan:a") is None and not client.exists("scan:a")
    assert list(client.scan("scan:")) == [(b"scan:b", b"2"), (b"scan:c", b"3")]
    assert client.mget(["scan:a", "scan:b"]) == [None, b"2"]


def test_incr_keeps_the_deadline_and_a_plain_set_clears_it(client: dkv.Client) -> None:
    client.set("n", "5", ex=100)
    before = client.get("n", with_meta=True)
    assert isinstance(before, Meta) and before.expires_at is not None
    assert client.incr("n", 2) == 7 and client.decr("n") == 6
    after = client.get("n", with_meta=True)
    assert isinstance(after, Meta) and after.value == b"6"
    assert after.expires_at == before.expires_at and after.revision > before.revision
    assert client.set("n", "1")
    plain = client.get("n", with_meta=True)
    assert isinstance(plain, Meta) and plain.expires_at is None and client.ttl("n") is None
    assert client.incr("fresh") == 1 and client.ttl("fresh") is None  # a new counter has no deadline


def test_an_expired_counter_starts_again_from_zero(client: dkv.Client) -> None:
    client.set("c", "41", px=100)
    wait_until(gone(client, "c"), 10, "the counter to expire")
    assert client.incr("c") == 1 and client.ttl("c") is None


def test_set_nx_and_cas_treat_an_expired_key_as_absent(client: dkv.Client) -> None:
    client.set("lease", "holder-1", px=100)
    wait_until(gone(client, "lease"), 10, "the lease to expire")
    assert client.set("lease", "holder-2", nx=True, ex=100)
    client.set("slot", "x", px=100)
    wait_until(gone(client, "slot"), 10, "the key to expire")
    assert not client.cas("slot", "x", "y")  # expired: its old value is not there
    assert client.cas("slot", None, "y") and client.get("slot") == b"y"
