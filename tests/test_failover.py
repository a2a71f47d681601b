"""Failover under real faults (DESIGN §5, G1-G3): real ZooKeeper, node processes, LevelDB, zerorpc.

Every scenario runs a concurrent workload through ``dkv.Client`` whose history
is recorded, then checks that every acknowledged write survived, that the
history is linearizable per key, and that the shard's members converged.
"""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

import dkv
from dkv.cli.repl import execute
from dkv.wal.log import WriteAheadLog
from dkv.wal.record import Op, Record
from tests.faults.checkers import check_acknowledged, check_converged, check_linearizable
from tests.faults.history import History
from tests.faults.workload import Workload
from tests.support.cluster import Cluster, expire_session
from tests.support.procs import wait_until

pytestmark = pytest.mark.integration

SID = "shard-1"
KEYS = [f"reg{i}" for i in range(8)]


@pytest.fixture
def cluster(zk: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    monkeypatch.setenv("DKV_FAULT_HOOKS", "1")
    c = Cluster(zk, tmp_path, shards=1, replication_factor=3, write_quorum=2, session_timeout=4.0)
    try:
        yield c.start()
    finally:
        c.stop()


def workload(client: dkv.Client, history: History, seed: int) -> Workload:
    return Workload(
        client,
        history,
        KEYS,
        threads=4,
        read_ratio=0.5,
        seed=seed,
        max_ops=20_000,
        max_duration=90,
        pause=0.005,
        first_process=seed * 10,
    )


def under_load(cluster: Cluster, seed: int) -> tuple[dkv.Client, History, Workload]:
    """A recorded workload running against the cluster, past its first acknowledged writes."""
    history = History()
    client = cluster.client(timeout=15)
    wl = workload(client, history, seed)
    wl.start()
    t0 = time.monotonic()
    wait_until(lambda: acked_after(history, t0) >= 20, 60, "acknowledged writes")
    return client, history, wl


def acked_after(history: History, t: float) -> int:
    return sum(1 for op in history.ops if op.kind == "set" and op.outcome == "ok" and op.invoke > t)


def verify(c: Cluster, client: dkv.Client, history: History) -> dict[str, Any]:
    """G1 (acknowledged writes readable), per-key linearizability, G3 (convergence)."""
    acked = check_acknowledged(history, lambda keys: [None if v is None else v.decode() for v in client.mget(keys)])
    assert acked.ok, acked.format()
    lin = check_linearizable(history)
    assert lin.ok, lin.format()
    wait_until(lambda: c.in_sync(SID), 60, "every live member in sync")
    conv = check_converged(c.wait_converged(SID))
    assert conv.ok, conv.format()
    return history.summary()


def new_writer(c: Cluster, old: str) -> str | None:
    try:
        w = c.shard_members()[SID]["writer"]
    except (RuntimeError, KeyError):
        return None
    return w if w and w != old else None


@pytest.mark.parametrize("rounds", [5, pytest.param(20, marks=pytest.mark.soak)])
def test_writer_kill9_promotes_a_replica_repeatedly_without_losing_writes(cluster: Cluster, rounds: int) -> None:
    """kill -9 of the writer under load, ``rounds`` times in a row (20: `make test-soak`);
    each time the old writer is restarted and must rejoin as a replica."""
    history = History()
    client = cluster.client(timeout=15)
    failovers: list[float] = []
    epochs = []
    for round_no in range(rounds):
        wl = workload(client, history, round_no)
        wl.start()
        t0 = time.monotonic()
        wait_until(lambda: acked_after(history, t0) >= 20, 60, "acknowledged writes before the kill")
        old = cluster.writer_of(SID)
        t_kill = time.monotonic()
        cluster.nodes[old].kill()
        wait_until(lambda: new_writer(cluster, old), 60, "a replica to be promoted")
        try:
            wait_until(lambda: acked_after(history, t_kill) >= 20, 60, "writes to resume")
        except TimeoutError:
            recent = [f"{op.kind} {op.outcome} {op.error}" for op in history.ops[-6:]]
            core = client._runner._core  # type: ignore[attr-defined]
            pingers = {a: (g.dead, repr(g.exception)) for a, g in core._suspects.items()}
            conns = {a: (c._inflight, len(c._pending), c._rpc is not None) for a, c in core._conns.items()}
            raise AssertionError(
                f"writes did not resume after killing {old}; pingers {pingers}, conns {conns}, nodes "
                f"{ {n: p.addr for n, p in cluster.nodes.items()} }, last ops {recent}"
            )
        resumed = min(
            op.complete for op in history.ops if op.kind == "set" and op.outcome == "ok" and op.invoke > t_kill
        )
        failovers.append(resumed - t_kill)
        wl.stop()
        epochs.append(cluster.shard_members()[SID]["epoch"])
        cluster.nodes[old].start()  # the old writer returns as a replica
        try:
            wait_until(lambda: cluster.role_of(old) == "replica", 60, f"{old} to rejoin as a replica")
        except TimeoutError:
            raise AssertionError(
                f"{old} did not rejoin as a replica (role {cluster.role_of(old)!r}); "
                f"its log:\n{cluster.nodes[old].log(tail=3000)}"
            ) from None
        wait_until(lambda: cluster.in_sync(SID), 60, "the shard back in sync")
    assert epochs == sorted(set(epochs)), f"each failover starts a new epoch: {epochs}"
    # The CLI's `info` (through ZooKeeper, as an operator runs it) shows the latest epoch and writer.
    with dkv.Client(zk=cluster.zk, timeout=5, auth=cluster.client_key) as zc:
        ok, out = execute(zc, "info")
    row = next(line.split() for line in out.splitlines() if line.startswith(SID + " "))
    assert ok and row[1:3] == [str(epochs[-1]), cluster.writer_of(SID)], out
    summary = verify(cluster, client, history)
    client.close()
    print(
        f"\nfailover (kill -9 -> first acknowledged write) over {len(failovers)} runs: "
        f"median {statistics.median(failovers):.2f}s, max {max(failovers):.2f}s "
        f"(each: {', '.join(f'{x:.2f}' for x in failovers)}) "
        f"(session timeout {cluster.session_timeout:g}s); history {summary}"
    )


def _stale_writer_scenario(cluster: Cluster, isolate: Any, heal: Any) -> None:
    """The writer is cut off past its session; it must not get one write acknowledged."""
    client, history, wl = under_load(cluster, 1)
    old = cluster.writer_of(SID)
    old_addr = cluster.nodes[old].addr
    old_epoch = cluster.shard_members()[SID]["epoch"]
    isolate(old)
    # Requests sent straight to the old writer while it is cut off.
    stale_replies: list[Any] = []

    def stale_write(i: int) -> None:
        try:
            stale_replies.append(cluster.rpc(old_addr, "batch", [["set", f"stale{i}".encode(), b"stale"]], timeout=60))
        except Exception as e:  # no answer at all is fine too
            stale_replies.append(e)

    senders = [threading.Thread(target=stale_write, args=(i,)) for i in range(3)]
    for s in senders:
        s.start()
    wait_until(lambda: new_writer(cluster, old), 60, "a replica to be promoted")
    heal(old)
    for s in senders:
        s.join(90)
    acknowledged = [r for r in stale_replies if isinstance(r, list) and r[0][0] == 0]
    assert not acknowledged, f"the deposed writer acknowledged a write: {stale_replies}"
    wait_until(lambda: cluster.role_of(old) == "replica", 60, f"{old} to rejoin as a replica")
    assert cluster.shard_members()[SID]["epoch"] > old_epoch
    t1 = time.monotonic()
    wait_until(lambda: acked_after(history, t1) >= 20, 60, "writes after the old writer returned")
    wl.stop()
    verify(cluster, client, history)
    assert client.mget([f"stale{i}" for i in range(3)]) == [None] * 3
    client.close()


def test_paused_writer_cannot_acknowledge_in_its_old_epoch(cluster: Cluster) -> None:
    """SIGSTOP past the session timeout, then SIGCONT."""
    _stale_writer_scenario(cluster, lambda n: cluster.nodes[n].pause(), lambda n: cluster.nodes[n].resume())


def test_forced_session_expiry_of_the_writer(cluster: Cluster) -> None:
    """The writer's ZooKeeper session is closed under it (it keeps running)."""
    _stale_writer_scenario(
        cluster, lambda n: expire_session(cluster.zk, cluster.nodes[n].addr, cluster.creds), lambda n: None
    )


def test_no_promotion_without_enough_members_then_recovery(cluster: Cluster) -> None:
    """Writer and one replica killed (rf=3, wq=2): nobody may be promoted until one returns."""
    client = cluster.client(timeout=5)
    acked = {f"k{i}": f"v{i}" for i in range(200)}
    client.mset(acked)
    sh = cluster.shard_members()[SID]
    writer, (victim, survivor) = sh["writer"], sh["replicas"]
    cluster.nodes[writer].kill()
    cluster.nodes[victim].kill()
    cluster.wait_session_gone(writer)
    cluster.wait_session_gone(victim)
    deadline = time.monotonic() + 3 * cluster.session_timeout
    while time.monotonic() < deadline:  # watch the shard for a while: it must stay writerless
        assert cluster.shard_members()[SID]["writer"] in (None, writer), "unsafe promotion"
        assert cluster.role_of(survivor) == "replica"
        time.sleep(0.2)
    with cluster.client(timeout=3) as fresh:  # knows the shard has no writer: definite, nothing sent
        with pytest.raises(dkv.errors.Unavailable):
            fresh.set("during", "x")
    cluster.nodes[victim].start()
    wait_until(
        lambda: cluster.shard_members()[SID]["writer"] in (victim, survivor),
        60,
        "a promotion once enough members answer",
    )
    keys = sorted(acked)
    wait_until(lambda: _readable(client, keys, acked), 60, "every acknowledged write readable")
    client.set("after", "x")
    assert client.get("after") == b"x"
    cluster.nodes[writer].start()
    wait_until(lambda: cluster.in_sync(SID), 60, "all three members in sync")
    cluster.wait_converged(SID)
    client.close()


def _readable(client: dkv.Client, keys: list[str], acked: dict[str, str]) -> bool:
    try:
        return client.mget(keys) == [acked[k].encode() for k in keys]
    except dkv.errors.DKVError:
        return False


def test_divergent_uncommitted_tail_is_cut_on_rejoin(cluster: Cluster) -> None:
    """A member holding records of an old epoch that never committed drops them on rejoin."""
    client = cluster.client(timeout=15)
    client.mset({f"a{i}": "1" for i in range(100)})
    old = cluster.writer_of(SID)
    cluster.nodes[old].kill()
    wait_until(lambda: new_writer(cluster, old), 60, "a promotion")
    cluster.nodes[old].start()
    wait_until(lambda: cluster.in_sync(SID), 60, "the shard in sync")
    sh = cluster.shard_members()[SID]
    member = next(r for r in sh["replicas"] if r != old) if sh["writer"] != old else sh["replicas"][0]
    cluster.wait_converged(SID)
    cluster.nodes[member].stop()
    # As if the epoch-1 writer had sent this member a batch that never committed:
    wal = WriteAheadLog(cluster.nodes[member].data_dir / "wal")
    end, epoch = wal.last_lsn, wal.last_epoch
    assert epoch < sh["epoch"]
    wal.append([Record(epoch, end + i, Op.PUT, f"ghost{i}".encode(), b"never committed") for i in range(1, 6)])
    wal.close()
    client.mset({f"b{i}": "2" for i in range(50)})  # the new epoch writes over those lsns
    cluster.nodes[member].start()
    wait_until(lambda: cluster.in_sync(SID), 60, "the member back in sync")
    cluster.wait_converged(SID)
    assert "divergent tail" in cluster.nodes[sh["writer"]].log(tail=None)
    assert client.mget([f"ghost{i}" for i in range(1, 6)]) == [None] * 5
    assert client.get("b49") == b"2"
    client.close()
