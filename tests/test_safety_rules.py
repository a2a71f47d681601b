"""Two safety rules of failover, unit level (DESIGN §4.5, §5; issue 10, item 2).

In-process, under gevent, over the memory engine and log; messages go straight to real
:class:`~dkv.cluster.follower.FollowerDriver` s (no sockets, no ZooKeeper). Each rule has a
test that fails when the rule is broken on purpose (the mutation is named in its docstring);
the real processes' version of rule 1 is tests/test_safety_failover.py.

1. **Adopt the most advanced log.** A promotion candidate fetches and adopts the records it
   misses from the member whose log end ``(last_epoch, last_lsn)`` is highest, before it
   publishes itself as the writer (:func:`dkv.cluster.promotion.decide`, ``Promoter._adopt``).
2. **Bump the epoch after a rollback.** After a batch that missed its quorum is rolled back,
   the writer starts a new epoch before its next acknowledged write, so a record a replica
   kept at ``(e, n)`` (the rollback did not reach it) never passes for the writer's new
   record at ``n`` (``Leader._give_up`` sets ``need_bump``; ``ReplicatedWriter.check`` bumps).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import gevent
import pytest

from dkv.client.connection import TransportError
from dkv.cluster.follower import FollowerDriver, PromiseFile
from dkv.cluster.leader import ReplicatedWriter
from dkv.cluster.promotion import FetchFrom, GiveUp, Promoter, Publish, decide, needed, pick_source
from dkv.cluster.replication import IN_SYNC, Prepare, Reply
from dkv.errors import WriteTimeout
from dkv.node.config import NodeConfig
from dkv.node.pipeline import WritePipeline
from dkv.node.sequencer import put as put_w
from dkv.storage import Store
from dkv.wal.memory import MemoryLog
from dkv.wal.record import Op, Record

SID = "shard-1"


def pos(last_epoch: int, last_lsn: int, applied: int = 0) -> Reply:
    """A member's answer to a fence: its log end and applied lsn."""
    return Reply("", 9, last_lsn, last_epoch, 0, applied)


def recs(epoch: int, first: int, n: int, tag: str = "v") -> list[Record]:
    return [Record(epoch, lsn, Op.PUT, f"k{lsn}".encode(), f"{tag}{lsn}".encode()) for lsn in range(first, first + n)]


def driver() -> FollowerDriver:
    return FollowerDriver(MemoryLog(), Store.open("memory"), PromiseFile(None), offload=False)


# -- rule 1: adopt the most advanced log -------------------------------------------------------


def test_needed_members_meet_every_write_quorum() -> None:
    assert needed(3, 2) == 2 and needed(3, 3) == 1 and needed(5, 3) == 3 and needed(1, 1) == 1
    for rf in range(1, 8):
        for wq in range(1, rf + 1):
            assert needed(rf, wq) + wq > rf  # any answering set meets any write quorum


def test_a_candidate_behind_another_member_fetches_from_it() -> None:
    """The candidate ``c`` lacks the last acknowledged record, which ``b`` holds (the writer
    ``a`` is gone): it must fetch ``b``'s records past its own applied prefix, not publish.

    Mutation checked by hand: ``decide`` returning ``Publish()`` whenever enough
    members answered (the candidate keeps its own log) fails here on
    ``assert decide(...) == FetchFrom("b", 8, 10)`` (got ``Publish()``).
    """
    positions = {"c": pos(3, 9, applied=7), "b": pos(3, 10, applied=9)}
    assert pick_source(positions) == "b"
    assert decide("c", positions, need=2, applied_lsn=7) == FetchFrom("b", 8, 10)


def test_the_highest_epoch_wins_over_the_longest_log() -> None:
    """A longer log of an older epoch holds an uncommitted tail the newer epoch replaced:
    the candidate takes the newer epoch's log even though its own is longer."""
    positions = {"c": pos(2, 12, applied=5), "b": pos(3, 8, applied=5), "d": pos(1, 20, applied=5)}
    assert decide("c", positions, need=2, applied_lsn=5) == FetchFrom("b", 6, 8)


def test_the_most_advanced_candidate_publishes_as_it_is() -> None:
    positions = {"c": pos(3, 10, applied=9), "b": pos(3, 9, applied=9)}
    assert decide("c", positions, need=2, applied_lsn=9) == Publish()


def test_too_few_answers_give_up_even_for_the_most_advanced_candidate() -> None:
    assert decide("c", {"c": pos(4, 50)}, need=2, applied_lsn=0) == GiveUp(1, 2)
    assert decide("c", {}, need=1, applied_lsn=0) == GiveUp(0, 1)


def _promoter(candidate: FollowerDriver, sources: dict[str, FollowerDriver]) -> Promoter:
    """A Promoter (no election loop, no ZooKeeper) whose ``repl_read`` calls go straight to
    the in-process ``sources``."""
    p = Promoter.__new__(Promoter)
    p.shard_id = SID
    p.config = NodeConfig(node_id="c", engine="memory", replication_factor=3, write_quorum=2)
    p.rt = SimpleNamespace(
        view=SimpleNamespace(nodes={m: m for m in sources}),
        follower=candidate,
        store=candidate.store,
        log=candidate.log,
    )

    def request(addr: str, method: str, *args: Any) -> Any:
        assert method == "repl_read"
        return sources[addr].read(*args)

    p._request = request  # type: ignore[method-assign]
    return p


@pytest.mark.parametrize("chunk", [1000, 2])
def test_a_candidate_adopts_the_missing_and_replaces_its_divergent_records(
    chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``c`` applied 1-3; it also holds 4-5 of epoch 1 that never committed. ``b`` holds the
    acknowledged records of epoch 2 at 4-7. After adoption (in chunks), ``c``'s log is ``b``'s
    and the records past its applied prefix wait to be committed by its writer driver."""
    from dkv.cluster import promotion

    monkeypatch.setattr(promotion, "FETCH_CHUNK", chunk)
    b, c = driver(), driver()
    for d in (b, c):
        d.prepare(Prepare(1, 0, 0, tuple(recs(1, 1, 3)), 3).to_wire())
    c.prepare(Prepare(1, 3, 1, tuple(recs(1, 4, 2, tag="lost")), 3).to_wire())
    b.prepare(Prepare(2, 3, 1, tuple(recs(2, 4, 4, tag="acked")), 3).to_wire())
    positions = {"c": Reply.from_wire(c.fence(3)), "b": Reply.from_wire(b.fence(3))}
    step = decide("c", positions, needed(3, 2), c.store.applied_lsn)
    assert step == FetchFrom("b", 4, 7)
    assert _promoter(c, {"b": b})._adopt(step, positions["b"])
    assert list(c.log.read_from(1)) == list(b.log.read_from(1))
    assert (c.log.last_epoch, c.log.last_lsn, c.store.applied_lsn) == (2, 7, 3)
    assert c.store.get(b"k4", None) is None  # nothing past the applied prefix is applied yet


def test_adoption_fails_when_the_source_cannot_serve_its_log() -> None:
    """A source that no longer holds the records (compacted) makes the attempt fail: no
    promotion on a partial log."""
    b, c = driver(), driver()
    b.log.reset_to(5)
    b.log.append(recs(2, 6, 2))
    assert not _promoter(c, {"b": b})._adopt(FetchFrom("b", 1, 7), pos(2, 7))
    assert c.log.last_lsn == 0


# -- rule 2: bump the epoch after a rollback ----------------------------------------------------

UP, PREPARES_ONLY, DOWN = "up", "prepares_only", "down"


class _DirectWriter(ReplicatedWriter):
    """The writer's replication driver, its RPCs delivered straight to in-process replicas
    through links that can fail: ``up``; ``prepares_only`` (a prepare is delivered and taken
    durably, but its answer is lost; nothing else gets through); ``down``."""

    replicas: dict[str, FollowerDriver]
    links: dict[str, str]

    def _call(self, rid: str, method: str, *args: Any) -> Reply:
        link = self.links[rid]
        if link == DOWN or (link == PREPARES_ONLY and method != "repl_prepare"):
            raise TransportError(f"{rid} is unreachable ({method})")
        f = self.replicas[rid]
        handler = {
            "repl_prepare": f.prepare,
            "repl_truncate": f.truncate,
            "repl_fence": f.fence,
            "repl_snapshot": f.snapshot_chunk,
        }[method]
        reply = handler(*args)
        if link == PREPARES_ONLY:
            raise TransportError(f"the answer of {rid} was lost")
        return Reply.from_wire(reply)


def wait_for(cond: Any, what: str, timeout: float = 20) -> None:
    with gevent.Timeout(timeout, AssertionError(f"timed out waiting for {what}")):
        while not cond():
            gevent.sleep(0.01)


def test_a_rolled_back_record_kept_by_a_replica_never_passes_for_the_next_one() -> None:
    """rf 3, write_quorum 2, epoch 2. ``b`` durably takes the prepare of ``ghost`` at lsn 2
    but its answer is lost, and ``c`` is down: the batch misses its quorum and is rolled back;
    the truncate does not reach ``b``, which keeps ``ghost`` at (2, 2). The writer's next
    write (``fresh``, with ``c`` back) lands at lsn 2 too. It must carry a new epoch, bumped
    (once) before it was acknowledged; and once ``b`` returns and is caught up, it must hold
    the writer's record 2, not ``ghost``: same digest, ``ghost`` readable nowhere.

    Mutation checked by hand (``self.need_bump = True`` removed from
    ``replication.Leader._give_up``): fails on ``assert bumps == [3] and w.epoch == 3`` ("the
    epoch must rise before the next acknowledged write", ``[] == [3]``). With that assertion
    removed too: on ``assert records[1].epoch == 3`` (``fresh`` reuses (2, 2)); with that one
    removed: on ``b``'s log, ``[(2, 2, b'ghost')] == [(3, 2, b'fresh')]`` (the writer took
    ``b``'s kept record for its own and called ``b`` in sync); with that one removed: "the
    rolled-back record is readable on b" (``b`` applied ``ghost`` at the commit point).
    """
    # Anti-entropy off: it is a later, separate defence (it would re-sync a diverged ``b`` from
    # a snapshot some time after ``b`` served ``ghost``); this test is about the rule itself.
    config = NodeConfig(
        node_id="w", engine="memory", replication_factor=3, write_quorum=2, write_timeout=5.0, anti_entropy_interval=0
    )
    log, store = MemoryLog(), Store.open("memory")
    bumps: list[int] = []

    def bump_epoch() -> int:
        bumps.append(3)
        return 3

    w = _DirectWriter(
        config, SID, 2, log, store, addr_of=lambda rid: None, bump_epoch=bump_epoch, is_current=lambda: True
    )
    w.replicas = {"b": driver(), "c": driver()}
    w.links = {"b": UP, "c": UP}
    w.leader.set_replicas(["b", "c"])
    for p in w.leader.replicas.values():  # both in sync at lsn 0, as after a promotion
        p.state, p.match_lsn = IN_SYNC, 0
    pipe = WritePipeline(log, store, w, offload=False)
    b, c = w.replicas["b"], w.replicas["c"]
    try:
        with gevent.Timeout(30, AssertionError("the scenario hung")):
            pipe.submit([put_w(b"base", b"1")])
            assert store.applied_lsn == 1 and w.epoch == 2
            w.links.update(b=PREPARES_ONLY, c=DOWN)
            with pytest.raises(WriteTimeout):  # b may hold it: not a definite failure
                pipe.submit([put_w(b"ghost", b"rolled back")])
            assert log.last_lsn == 1 and store.applied_lsn == 1  # rolled back here
            kept = list(b.log.read_from(2))
            assert [(r.epoch, r.lsn, r.key) for r in kept] == [(2, 2, b"ghost")]  # ... not on b
            assert bumps == []  # the bump comes with the next write
            w.links.update(b=DOWN, c=UP)
            pipe.submit([put_w(b"fresh", b"2")])  # acknowledged: the writer and c
            assert bumps == [3] and w.epoch == 3, "the epoch must rise before the next acknowledged write"
            records = list(log.read_from(1))
            assert [(r.lsn, r.key) for r in records] == [(1, b"base"), (2, b"fresh")]
            assert records[1].epoch == 3, "the record after a rollback must not reuse (epoch, lsn) = (2, 2)"
            assert store.get(b"fresh") == b"2" and c.store.applied_lsn in (1, 2)
            w.links["b"] = UP  # b returns; it still holds ghost at (2, 2)
            w.set_replicas(["b", "c"], {"b", "c"})
            wait_for(
                lambda: w.leader.replicas["b"].state == IN_SYNC and w.leader.replicas["c"].state == IN_SYNC,
                "b and c in sync",
            )
            w._heartbeat_round()  # the commit point reaches both
            wait_for(lambda: b.store.applied_lsn == 2 and c.store.applied_lsn == 2, "b and c applied lsn 2")
    finally:
        pipe.close()
        w.stop()
    assert [(r.epoch, r.lsn, r.key) for r in b.log.read_from(2)] == [(3, 2, b"fresh")]
    for name, member in (("writer", store), ("b", b.store), ("c", c.store)):
        assert member.get(b"ghost", None) is None, f"the rolled-back record is readable on {name}"
        assert member.get(b"fresh", None) == b"2", name
    assert b.store.digest() == store.digest() == c.store.digest()
