"""Moving slots that hold data (DESIGN §6, G4) under load: real ZooKeeper, node processes, LevelDB, zerorpc.

A one-shard cluster holding data gets a second shard; the controller moves
half the slots to it while a recorded workload runs. Afterwards every
acknowledged write is readable from its new owner, deleted keys stay deleted,
the history is linearizable per key, each shard's members converge, and the
source holds nothing of the slots it gave away. The fault variants kill the
source's or the target's writer in the middle of the move.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
from kazoo.client import KazooClient

import dkv
from dkv.cluster import layout
from dkv.errors import TryAgain
from tests.faults.checkers import check_acknowledged, check_converged, check_linearizable
from tests.faults.history import History
from tests.faults.workload import Workload
from tests.support.cluster import Cluster
from tests.support.procs import wait_until

pytestmark = pytest.mark.integration

EMPTY_DIGEST = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"  # sha256 of nothing
N_KEYS = 3000


@pytest.fixture
def cluster(zk: str, tmp_path: Path) -> Iterator[Cluster]:
    # Small WAL segments: the source compacts while the target copies. A throttled
    # import keeps the move going for a few seconds, long enough to kill a writer in it.
    c = Cluster(
        zk,
        tmp_path,
        shards=1,
        replication_factor=3,
        write_quorum=2,
        session_timeout=4.0,
        extra=("--wal-segment-bytes", "65536", "--migration-rate", "400"),
    )
    try:
        yield c.start()
    finally:
        c.stop()


def _load(client: dkv.Client) -> set[str]:
    """N_KEYS keys written, then every tenth deleted: return the deleted ones."""
    for i in range(0, N_KEYS, 500):
        client.mset({f"bulk{j}": f"v{j}" for j in range(i, min(N_KEYS, i + 500))})
    deleted = {f"bulk{j}" for j in range(0, N_KEYS, 10)}
    for k in deleted:
        client.delete(k)
    return deleted


def _grow(cluster: Cluster) -> None:
    """Add a second shard's three members (the first becomes its writer)."""
    for i in (4, 5, 6):
        cluster.add_node(f"n{i}")


def _migrating(cluster: Cluster) -> bool:
    try:
        return bool(cluster.cluster_info().get("migrations"))
    except RuntimeError:
        return False


def _check(cluster: Cluster, client: dkv.Client, history: History, deleted: set[str]) -> None:
    wait_until(cluster.balanced, 120, "the slots to be balanced over both shards", interval=0.2)
    info = cluster.cluster_info()
    owned = {sh["id"]: sh["slots"] for sh in info["shards"]}
    assert set(owned) == {"shard-1", "shard-2"} and all(owned.values()), owned
    _check_data(cluster, client, history, deleted, owned)


def _check_data(
    cluster: Cluster, client: dkv.Client, history: History, deleted: set[str], owned: dict[str, list[list[int]]]
) -> None:
    # G1/G4: every acknowledged write is readable from its new owner; deletes stay deleted.
    acked = check_acknowledged(history, lambda keys: [None if v is None else v.decode() for v in client.mget(keys)])
    assert acked.ok, acked.format()
    lin = check_linearizable(history)
    assert lin.ok, lin.format()
    keys = [f"bulk{j}" for j in range(N_KEYS)]
    values = client.mget(keys)
    wrong = [(k, v) for k, v in zip(keys, values) if v != (None if k in deleted else f"v{k[4:]}".encode())]
    assert not wrong, f"{len(wrong)} bulk keys wrong after the move, e.g. {wrong[:5]}"
    # G3 per shard, and the source kept nothing of what it gave away.
    for sid in owned:
        if owned[sid]:
            wait_until(lambda: cluster.in_sync(sid), 60, f"{sid} in sync")
            conv = check_converged(cluster.wait_converged(sid, timeout=60))
            assert conv.ok, conv.format()
    for sid in owned:
        foreign = [r for other, ranges in owned.items() if other != sid for r in ranges]
        sh = cluster.shard_members()[sid]
        for member in [sh["writer"], *sh["replicas"]]:
            if cluster.nodes[member].running:
                wait_until(
                    lambda: all(
                        cluster.rpc(cluster.nodes[member].addr, "digest", a, b)[1] == EMPTY_DIGEST for a, b in foreign
                    ),
                    60,
                    f"{member} ({sid}) to hold nothing of other shards' slots",
                )


def _under_load(cluster: Cluster) -> tuple[dkv.Client, History, Workload, set[str]]:
    client = cluster.client(timeout=30)
    deleted = _load(client)
    history = History()
    wl = Workload(
        client,
        history,
        [f"reg{i}" for i in range(16)],
        threads=4,
        read_ratio=0.5,
        seed=7,
        max_ops=50_000,
        max_duration=120,
        pause=0.005,
    )
    wl.start()
    t0 = time.monotonic()
    wait_until(
        lambda: sum(1 for op in history.ops if op.outcome == "ok" and op.invoke > t0) >= 20,
        60,
        "the workload to make progress",
    )
    return client, history, wl, deleted


class Scanner:
    """Full scans of the bulk keys in a loop, each checked: every live key exactly once, with its value."""

    def __init__(self, cluster: Cluster, deleted: set[str]) -> None:
        self.client = cluster.client(timeout=30)
        self.expected = {f"bulk{j}".encode(): f"v{j}".encode() for j in range(N_KEYS) if f"bulk{j}" not in deleted}
        self.cluster = cluster
        self.scans = self.during_moves = 0
        self.wrong: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            moving = _migrating(self.cluster)
            try:
                pairs = list(self.client.scan(prefix="bulk", limit=None))
            except dkv.errors.DKVError:
                continue  # a scan may time out while a range is frozen; it must never be wrong
            keys = [k for k, _ in pairs]
            got = dict(pairs)
            if len(keys) != len(got) or keys != sorted(keys) or got != self.expected:
                dup = len(keys) - len(got)
                missing = sorted(set(self.expected) - set(got))[:3]
                bad = [k for k in got if self.expected.get(k) != got[k]][:3]
                self.wrong.append(f"scan {self.scans}: {dup} duplicate(s), missing {missing}, wrong {bad}")
            self.scans += 1
            self.during_moves += moving and _migrating(self.cluster)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)
        self.client.close()


def test_a_new_shard_takes_half_the_slots_with_their_data_under_load(cluster: Cluster) -> None:
    client, history, wl, deleted = _under_load(cluster)
    scanner = Scanner(cluster, deleted)  # G4 for scans: never a range twice or not at all
    _grow(cluster)
    wait_until(cluster.balanced, 120, "the move to finish", interval=0.2)
    wl.stop()
    scanner.stop()
    assert not scanner.wrong, "\n".join(scanner.wrong[:10])
    assert scanner.during_moves >= 1, f"no scan ran during the move ({scanner.scans} in all)"
    _check(cluster, client, history, deleted)
    assert any(op.outcome == "ok" and op.kind == "set" for op in history.ops)
    client.close()


@pytest.mark.parametrize("side", ["source", "target"])
def test_writer_killed_in_the_middle_of_a_move(cluster: Cluster, side: str) -> None:
    client, history, wl, deleted = _under_load(cluster)
    _grow(cluster)
    target = cluster.writer_of("shard-2")
    # Mid-move: the target has committed a first page of imports, the flip is still ahead.
    wait_until(
        lambda: (cluster.info(target) or {}).get("applied_lsn", 0) > 0,
        60,
        "the target to import a first page",
        interval=0.05,
    )
    progress = (cluster.info(target) or {}).get("migration") or {}  # what `info`/`admin status` show
    assert _migrating(cluster), "the move ended before the kill: raise N_KEYS or lower --migration-rate"
    assert progress.get("imported", 0) > 0 and progress.get("phase") in ("copy", "tail"), progress
    victim = cluster.writer_of("shard-1") if side == "source" else target
    cluster.nodes[victim].kill()
    wait_until(cluster.balanced, 120, "the move to finish after the writer's death", interval=0.2)
    cluster.nodes[victim].start()
    wl.stop()
    _check(cluster, client, history, deleted)
    client.close()


def test_a_frozen_move_whose_target_writer_died_is_cancelled_and_the_source_serves_again(
    zk: str, tmp_path: Path
) -> None:
    """The target's writer froze a move and died before the flip (the frozen range refuses
    writes): the replica promoted in its place cancels the move instead of re-copying the range
    while it stays frozen; the source serves the range again, nothing of it is lost, and the
    target's members drop their partial copy. (The same cancel ends a freeze that outlasts
    --migration-freeze-timeout; ``dkv admin cancel`` is the operator's.)"""
    # The target's session timeout is how long the freeze lasts before its successor cancels it.
    cluster = Cluster(zk, tmp_path, shards=2, replication_factor=3, write_quorum=2, session_timeout=6.0)
    kz = KazooClient(cluster.zk, **cluster.kazoo_args)
    try:
        cluster.start()
        kz.start(timeout=30)
        client = cluster.client(timeout=30)
        slots_before = cluster.shard_members()["shard-1"]["slots"]
        hi = slots_before[-1][1]
        lo = hi - 31
        moving = [k for k in (f"m{i}" for i in range(5000)) if lo <= dkv.slot_of(k.encode()) <= hi][:40]
        staying = cluster.keys_of_shard("shard-1", 1, prefix="s")[0]
        assert len(moving) == 40 and not lo <= dkv.slot_of(staying.encode()) <= hi
        client.mset({k: f"v-{k}" for k in moving})
        target = cluster.writer_of("shard-2")
        cluster.nodes[target].kill()
        kz.create(
            layout.MIGRATIONS + "/m-",
            layout.Migration("", lo, hi, "shard-1", "shard-2", layout.FROZEN).to_bytes(),
            sequence=True,
        )
        source = cluster.nodes[cluster.writer_of("shard-1")].addr
        # (A real freeze is confirmed by the source's writer itself; this one it learns from its view.)
        wait_until(
            lambda: bool(cluster.rpc(source, "cluster_info").get("migrations")), 10, "the source to see the freeze"
        )
        with dkv.Client(
            [n.addr for n in cluster.nodes.values() if n.running], timeout=1, auth=cluster.client_key
        ) as quick:
            with pytest.raises(TryAgain):
                quick.set(moving[0], "during the freeze")
            quick.set(staying, "the rest of the shard serves")
        # shard-2 promotes a replica (session timeout); it finds the move frozen and cancels it.
        wait_until(
            lambda: cluster.writer_of("shard-2") not in (None, target) and not cluster.cluster_info().get("migrations"),
            60,
            "the frozen move to be cancelled",
            interval=0.2,
        )
        client.set(moving[0], "after the cancel")
        assert client.mget(moving) == [b"after the cancel"] + [f"v-{k}".encode() for k in moving[1:]]
        assert cluster.shard_members()["shard-1"]["slots"] == slots_before and cluster.balanced()
        cluster.nodes[target].start()
        wait_until(lambda: cluster.in_sync("shard-2"), 60, "shard-2 in sync with its old writer back")
        sh = cluster.shard_members()["shard-2"]
        for member in [sh["writer"], *sh["replicas"]]:
            assert cluster.rpc(cluster.nodes[member].addr, "digest", lo, hi)[1] == EMPTY_DIGEST, member
        for sid in ("shard-1", "shard-2"):
            conv = check_converged(cluster.wait_converged(sid, timeout=60))
            assert conv.ok, conv.format()
        client.close()
    finally:
        kz.stop()
        kz.close()
        cluster.stop()


def admin(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dkv.cli.main", "admin", "--zk", cluster.zk, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_drained_shard_hands_its_slots_and_data_to_the_others_under_load(zk: str, tmp_path: Path) -> None:
    cluster = Cluster(zk, tmp_path, shards=2, replication_factor=3, write_quorum=2, session_timeout=4.0)
    try:
        cluster.start()
        client, history, wl, deleted = _under_load(cluster)
        assert "no other shard" not in admin(cluster, "drain", "shard-2").stdout
        wait_until(
            lambda: not cluster.cluster_info().get("migrations") and not cluster.shard_members()["shard-2"]["slots"],
            120,
            "shard-2 to be drained",
            interval=0.2,
        )
        status = admin(cluster, "status")
        assert status.returncode == 0 and "shard-2 (draining)" in status.stdout, status
        assert "(lag ?)" not in status.stdout and re.search(r"\(lag \d+\)", status.stdout), status.stdout
        # The last shard taking slots cannot be drained; an unknown shard is a clear error.
        last = admin(cluster, "drain", "shard-1")
        assert last.returncode == 1 and "InvalidArgument" in last.stderr and "no other shard" in last.stderr
        unknown = admin(cluster, "drain", "shard-9")
        assert unknown.returncode == 1 and "no shard 'shard-9'" in unknown.stderr
        wl.stop()
        owned = {sh["id"]: sh["slots"] for sh in cluster.cluster_info()["shards"]}
        assert sum(b - a + 1 for a, b in owned["shard-1"]) == 1024, owned
        _check_data(cluster, client, history, deleted, owned)
        # Undrained, it takes its share back.
        assert admin(cluster, "undrain", "shard-2").returncode == 0
        wait_until(cluster.balanced, 120, "slots balanced again", interval=0.2)
        _check_data(
            cluster, client, history, deleted, {sh["id"]: sh["slots"] for sh in cluster.cluster_info()["shards"]}
        )
        # Removed for good: drained again, its nodes stopped, then deleted from the map.
        members = ["n4", "n5", "n6"]
        assert set(members) == {cluster.writer_of("shard-2"), *cluster.shard_members()["shard-2"]["replicas"]}
        assert admin(cluster, "drain", "shard-2").returncode == 0
        wait_until(
            lambda: not cluster.cluster_info().get("migrations") and not cluster.shard_members()["shard-2"]["slots"],
            120,
            "shard-2 drained again",
            interval=0.2,
        )
        live = admin(cluster, "remove", "shard-2")
        assert live.returncode == 1 and "live members" in live.stderr, live
        for m in members:
            cluster.nodes[m].stop()
            cluster.wait_session_gone(m)
        removed = admin(cluster, "remove", "shard-2")
        assert removed.returncode == 0 and "shard-2 removed" in removed.stdout, removed
        assert [sh["id"] for sh in cluster.cluster_info()["shards"]] == ["shard-1"]
        assert sorted(n["id"] for n in cluster.cluster_info()["nodes"]) == ["n1", "n2", "n3"]
        _check_data(cluster, client, history, deleted, {"shard-1": [[0, 1023]]})
        client.close()
    finally:
        cluster.stop()
