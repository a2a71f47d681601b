"""The sans-I/O replication core, driven deterministically (no sockets, no threads).

Members are real in-memory logs and stores (diskless mode); messages are
delivered by hand, so loss, duplication and reordering are exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from dkv.cluster.follower import FollowerDriver, PromiseFile, apply_actions, apply_log
from dkv.cluster.replication import (
    AHEAD,
    BEYOND_EPOCH,
    BEYOND_LOG,
    COMMITTED,
    DIVERGED,
    GAP,
    IN_SYNC,
    LOCAL,
    MATCH,
    MISMATCH,
    NOT_COMPARABLE,
    STALE_EPOCH,
    AppendLocal,
    BumpEpoch,
    CatchUp,
    Commit,
    CutTo,
    Deposed,
    DigestRequest,
    Fail,
    Follower,
    Leader,
    Prepare,
    ReadConfirmation,
    Reply,
    Rollback,
    Send,
    SendFrom,
    SendSnapshot,
    Synced,
    Truncate,
    compare_digest,
)
from dkv.errors import QuorumNotReached, Unavailable, WriteTimeout
from dkv.storage import Store, entry
from dkv.wal.memory import MemoryLog
from dkv.wal.record import Op, Record


@dataclass
class Member:
    log: MemoryLog = field(default_factory=MemoryLog)
    store: Store = field(default_factory=lambda: Store.open("memory"))
    promise: PromiseFile = field(default_factory=lambda: PromiseFile(None))

    def __post_init__(self) -> None:
        self.f = Follower(self.log, promised=self.promise.epoch, applied_lsn=self.store.applied_lsn)

    def prepare(self, m: Prepare) -> Reply:
        reply, actions = self.f.on_prepare(m)
        apply_actions(actions, self.log, self.store, self.promise)
        return reply

    def truncate(self, m: Truncate) -> Reply:
        reply, actions = self.f.on_truncate(m)
        apply_actions(actions, self.log, self.store, self.promise)
        return reply

    def keys(self) -> dict[bytes, bytes]:
        return dict(self.store.scan())


def recs(epoch: int, first: int, n: int, tag: str = "v") -> list[Record]:
    return [Record(epoch, lsn, Op.PUT, f"k{lsn}".encode(), f"{tag}{lsn}".encode()) for lsn in range(first, first + n)]


class Writer:
    """A writer: its own log/store plus the Leader state machine."""

    def __init__(
        self, epoch: int = 1, replicas: tuple[str, ...] = ("a", "b"), quorum: int = 2, log: MemoryLog | None = None
    ) -> None:
        self.log = log or MemoryLog()
        self.store = Store.open("memory")
        self.leader = Leader(epoch, self.log, quorum, commit_lsn=0)
        self.leader.set_replicas(list(replicas))

    def write(self, n: int, tag: str = "v") -> Prepare:
        prev = self.log.last_lsn
        batch = recs(self.leader.epoch, prev + 1, n, tag)
        m = self.leader.prepare(batch, prev, self.log.epochs.epoch_at(prev) or 0 if prev else 0)
        self.log.append(batch)
        return m

    def commit(self, lsn: int) -> None:
        assert len(self.leader.acked(lsn)) >= self.leader.needed
        self.leader.commit_lsn = lsn
        apply_log(self.log, self.store, lsn)

    def heartbeat(self, rid: str) -> Prepare:
        match = self.leader.replicas[rid].match_lsn or 0
        return self.leader.prepare([], match, self.log.epochs.epoch_at(match) or 0 if match else 0)


def prepare_tail(w: Writer, rid: str) -> Prepare:
    """What the writer sends an in-sync member: every record past its match point."""
    match = w.leader.replicas[rid].match_lsn or 0
    return w.leader.prepare(list(w.log.read_from(match + 1)), match, w.log.epochs.epoch_at(match) or 0 if match else 0)


def catch_up(w: Writer, rid: str, m: Member, max_steps: int = 20) -> list[object]:
    """Drive the leader's catch-up decisions for one member until it is in sync."""
    steps: list[object] = []
    for _ in range(max_steps):
        step = w.leader.catchup_step(rid)
        steps.append(step)
        if isinstance(step, Synced) or step is None:
            return steps
        if isinstance(step, SendFrom):
            batch = list(w.log.read_from(step.lsn))
            prev = step.lsn - 1
            reply = m.prepare(w.leader.prepare(batch, prev, w.log.epochs.epoch_at(prev) or 0 if prev else 0))
        elif isinstance(step, CutTo):
            reply = m.truncate(Truncate(w.leader.epoch, step.lsn))
        else:
            raise AssertionError(f"unexpected step {step}")
        w.leader.on_reply(rid, reply)
    raise AssertionError(f"no convergence: {steps}")


def test_happy_path_quorum_commit_and_apply() -> None:
    w, a, b = Writer(), Member(), Member()
    m = w.write(3)
    ra, rb = a.prepare(m), b.prepare(m)
    assert ra.ok and rb.ok and ra.match_lsn == rb.match_lsn == 3
    w.leader.on_reply("a", ra)
    w.commit(3)
    assert a.keys() == {}  # replicas learn the commit point with the next message
    w.leader.on_reply("a", a.prepare(w.heartbeat("a")))
    assert a.store.applied_lsn == 3 and a.keys() == dict(w.store.scan())
    assert a.store.digest() == w.store.digest()


def test_stale_epoch_prepare_is_refused_and_changes_nothing() -> None:
    a = Member()
    assert a.prepare(Prepare(5, 0, 0, tuple(recs(5, 1, 1)), 0)).ok
    reply = a.prepare(Prepare(4, 1, 5, tuple(recs(4, 2, 1)), 1))
    assert reply.reason == STALE_EPOCH and reply.promised == 5
    assert a.log.last_lsn == 1 and a.store.applied_lsn == 0
    w = Writer(epoch=4, replicas=("a",))
    w.leader.on_reply("a", reply)
    assert w.leader.deposed_by == 5


def test_duplicate_prepare_is_idempotent() -> None:
    w, a = Writer(), Member()
    m = w.write(2)
    first, again = a.prepare(m), a.prepare(m)
    assert first.ok and again.ok and again.match_lsn == 2
    assert [r.lsn for r in a.log.read_from(1)] == [1, 2]


def test_reordered_prepares_gap_then_catch_up() -> None:
    w, a = Writer(replicas=("a",)), Member()
    m1, m2 = w.write(2), w.write(2)
    r2 = a.prepare(m2)
    assert r2.reason == GAP and a.log.last_lsn == 0
    w.leader.on_reply("a", r2)
    r1 = a.prepare(m1)
    assert r1.ok
    w.leader.on_reply("a", r1)
    assert catch_up(w, "a", a) == [Synced()]  # it matches us up to the commit point (0)
    w.leader.on_reply("a", a.prepare(prepare_tail(w, "a")))  # the next prepare carries the rest
    w.commit(4)
    assert w.leader.replicas["a"].state == IN_SYNC and a.log.last_lsn == 4


def test_lost_prepare_quorum_still_reached_and_laggard_catches_up() -> None:
    w, a, b = Writer(), Member(), Member()
    m1 = w.write(2)
    w.leader.on_reply("a", a.prepare(m1))  # the prepare to b is lost
    assert w.leader.acked(2) == ["a"]
    w.commit(2)  # write_quorum=2: the writer and a
    m2 = w.write(1)
    rb = b.prepare(m2)
    assert rb.reason == GAP
    w.leader.on_reply("b", rb)
    w.leader.on_reply("a", a.prepare(m2))
    w.commit(3)
    assert catch_up(w, "b", b) == [SendFrom(1), Synced()]  # committed records only
    w.leader.on_reply("b", b.prepare(w.heartbeat("b")))
    assert b.log.last_lsn == 3 and b.store.applied_lsn == 3
    assert b.store.digest() == w.store.digest()


def test_divergent_uncommitted_tail_is_cut_and_replaced() -> None:
    # b accepted lsn 3-4 in epoch 1 that never committed; the writer rolled them
    # back, moved to epoch 2, and wrote other records at 3-5.
    w, b = Writer(replicas=("b",)), Member()
    w.leader.on_reply("b", b.prepare(w.write(2)))
    w.commit(2)
    b.prepare(Prepare(1, 2, 1, tuple(recs(1, 3, 2, tag="lost")), 2))
    w.leader.epoch = 2
    w.write(3, tag="new")
    gap = b.prepare(w.leader.prepare([], 5, 2))  # b is behind our log end: it reports its position
    assert gap.reason == GAP and (gap.last_lsn, gap.last_epoch, gap.applied_lsn) == (4, 1, 2)
    w.leader.on_reply("b", gap)
    steps = catch_up(w, "b", b)
    assert steps == [CutTo(2), Synced()]
    w.leader.on_reply("b", b.prepare(prepare_tail(w, "b")))
    assert [(r.epoch, r.value) for r in b.log.read_from(3)] == [(2, b"new3"), (2, b"new4"), (2, b"new5")]


def test_prepare_overwrites_conflicting_records_in_its_range() -> None:
    b = Member()
    b.prepare(Prepare(1, 0, 0, tuple(recs(1, 1, 4, tag="old")), 2))
    reply = b.prepare(Prepare(2, 2, 1, tuple(recs(2, 3, 2, tag="new")), 2))
    assert reply.ok and reply.last_epoch == 2
    assert [r.value for r in b.log.read_from(1)] == [b"old1", b"old2", b"new3", b"new4"]


def test_mismatch_at_prev_is_detected() -> None:
    b = Member()
    b.prepare(Prepare(1, 0, 0, tuple(recs(1, 1, 3)), 0))
    reply = b.prepare(Prepare(2, 3, 2, tuple(recs(2, 4, 1)), 0))
    assert reply.reason == MISMATCH and b.log.last_lsn == 3


def test_committed_records_are_never_dropped() -> None:
    b = Member()
    b.prepare(Prepare(1, 0, 0, tuple(recs(1, 1, 3)), 3))
    assert b.store.applied_lsn == 3
    reply = b.truncate(Truncate(1, 1))
    assert reply.reason == COMMITTED and b.log.last_lsn == 3


def test_rollback_truncates_uncommitted_tail() -> None:
    b = Member()
    b.prepare(Prepare(1, 0, 0, tuple(recs(1, 1, 3)), 1))
    reply = b.truncate(Truncate(1, 1))
    assert reply.ok and reply.last_lsn == 1 and b.log.last_lsn == 1


def test_fence_promises_durably_and_refuses_older_epochs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = str(tmp_path / "promise")
    a = Member(promise=PromiseFile(path))
    reply, actions = a.f.on_fence(7)
    apply_actions(actions, a.log, a.store, a.promise)
    assert reply.ok and PromiseFile(path).epoch == 7
    restarted = Member(promise=PromiseFile(path))
    assert restarted.prepare(Prepare(6, 0, 0, tuple(recs(6, 1, 1)), 0)).reason == STALE_EPOCH


def test_snapshot_needed_when_the_log_was_compacted() -> None:
    w = Writer(replicas=("a",), quorum=1, log=MemoryLog(retain=2))
    for _ in range(4):
        w.write(2)
    assert w.log.first_lsn > 1
    assert w.leader.catchup_step("a") == SendSnapshot()


def test_snapshot_needed_when_the_log_was_compacted_past_a_known_match() -> None:
    """A replica whose position the writer knows, but whose next record the writer's log no
    longer holds (compacted while it lagged), gets a snapshot, not a read of a missing lsn."""
    w = Writer(replicas=("a",), quorum=1, log=MemoryLog(retain=2))
    w.write(2)
    w.leader.on_reply("a", Reply("", 1, 1, 1, 1, 1))  # it matched us up to lsn 1
    for _ in range(4):
        w.write(2)
    w.leader.commit_lsn = w.log.last_lsn
    assert w.leader.replicas["a"].match_lsn == 1 and w.log.first_lsn > 2
    assert w.leader.catchup_step("a") == SendSnapshot()


def test_messages_survive_the_wire() -> None:
    m = Prepare(3, 10, 2, tuple(recs(3, 11, 2)) + (Record(3, 13, Op.DELETE, b"x"),), 9)
    assert Prepare.from_wire(m.to_wire()) == m
    assert Truncate.from_wire(Truncate(4, 8).to_wire()) == Truncate(4, 8)
    r = Reply(GAP, 4, 8, 3, 0, 7)
    assert Reply.from_wire(r.to_wire()) == r


# -- the linearizable read's confirmation round -------------------------------------------


def _accept(epoch: int) -> Reply:
    return Reply("", epoch, 10, epoch, 10, 10)


def test_confirmation_needs_write_quorum_minus_one_replicas_and_not_the_dead_one() -> None:
    c = ReadConfirmation(epoch=3, needed=1, asked=["r1", "r2"])
    assert not c.settled
    c.on_reply("r1", _accept(3))
    assert c.confirmed and c.settled  # r2 (dead) is not waited for
    c2 = ReadConfirmation(epoch=3, needed=2, asked=["r1", "r2", "r3"])
    c2.on_reply("r3", None)  # no answer
    c2.on_reply("r1", _accept(3))
    assert not c2.settled
    c2.on_reply("r2", _accept(3))
    assert c2.confirmed


def test_replicas_answering_a_stale_epoch_make_the_confirmation_fail() -> None:
    # The replica promised epoch 4 to a newer writer: our epoch 3 is deposed, even if
    # another replica (not yet fenced) still accepts it.
    c = ReadConfirmation(epoch=3, needed=1, asked=["r1", "r2"])
    c.on_reply("r1", Reply(STALE_EPOCH, 4, 12, 4))
    assert c.failed and not c.confirmed and c.deposed_by == 4
    c.on_reply("r2", _accept(3))
    assert not c.confirmed
    # Through the real follower: a member fenced at a newer epoch refuses our heartbeat.
    m = Member()
    m.f.on_fence(4)
    c = ReadConfirmation(epoch=3, needed=1, asked=["m"])
    c.on_reply("m", m.prepare(Prepare(3, 0, 0, (), 0)))
    assert c.failed and c.deposed_by == 4


def test_confirmation_fails_as_soon_as_too_few_replicas_are_left() -> None:
    c = ReadConfirmation(epoch=3, needed=2, asked=["r1", "r2", "r3"])
    c.on_reply("r1", None)
    assert not c.settled
    c.on_reply("r2", Reply(GAP, 3, 0, 0))
    assert c.failed and c.deposed_by is None
    assert ReadConfirmation(epoch=3, needed=1, asked=[]).failed  # no replica in sync


def test_confirmation_ignores_unasked_and_repeated_answers() -> None:
    c = ReadConfirmation(epoch=3, needed=2, asked=["r1", "r2"])
    c.on_reply("r1", _accept(3))
    c.on_reply("r1", _accept(3))
    c.on_reply("intruder", _accept(3))
    assert not c.confirmed


def test_a_replica_learns_its_writers_slot_map_version_from_accepted_prepares_only() -> None:
    m = Member()
    wire = Prepare(2, 0, 0, tuple(recs(2, 1, 1)), 0, slot_version=9).to_wire()
    assert m.prepare(Prepare.from_wire(wire)).ok
    assert m.f.slot_version == 9
    assert not m.prepare(Prepare(1, 1, 2, (), 1, slot_version=12)).ok  # a deposed writer's
    assert m.f.slot_version == 9
    assert m.prepare(Prepare(2, 1, 2, (), 1, slot_version=8)).ok  # never goes back
    assert m.f.slot_version == 9


# -- defence in depth: epochs bounded by ZooKeeper's record, snapshots by the writer's log ---------


def guarded(max_epoch: int, promised: int = 0) -> Member:
    """A member whose follower knows ZooKeeper records ``max_epoch`` for its shard."""
    m = Member()
    m.promise.save(promised)
    m.f = Follower(m.log, promised=promised, applied_lsn=0, max_epoch=max_epoch)
    return m


def test_a_fence_beyond_the_recorded_epoch_is_refused_and_promises_nothing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    a = guarded(3, promised=2)
    a.promise = PromiseFile(str(tmp_path / "promise"))
    a.promise.save(2)
    reply, actions = a.f.on_fence(2**62)
    assert reply.reason == BEYOND_EPOCH and actions == [] and a.f.promised == 2
    assert PromiseFile(str(tmp_path / "promise")).epoch == 2  # nothing durable either
    reply, actions = a.f.on_fence(3)  # the recorded epoch (a promotion's reservation)
    apply_actions(actions, a.log, a.store, a.promise)
    assert reply.ok and PromiseFile(str(tmp_path / "promise")).epoch == 3


def test_prepare_and_truncate_only_at_the_recorded_epoch() -> None:
    a = guarded(3, promised=2)
    assert a.prepare(Prepare(4, 0, 0, tuple(recs(4, 1, 1)), 0)).reason == BEYOND_EPOCH
    assert a.truncate(Truncate(4, 0)).reason == BEYOND_EPOCH
    # Epoch 2 was promised, but ZooKeeper moved on to 3: its writer is deposed, and told so.
    old = a.prepare(Prepare(2, 0, 0, tuple(recs(2, 1, 1)), 0))
    assert old.reason == STALE_EPOCH and old.promised == 3
    assert a.log.last_lsn == 0 and a.f.promised == 2
    assert a.prepare(Prepare(3, 0, 0, tuple(recs(3, 1, 1)), 0)).ok and a.f.promised == 3
    w = Writer(epoch=2, replicas=("a",))
    w.leader.on_reply("a", old)
    assert w.leader.deposed


def test_a_newly_recorded_epoch_admits_its_writer_and_the_bound_never_falls() -> None:
    a = guarded(3)
    assert a.prepare(Prepare(4, 0, 0, tuple(recs(4, 1, 1)), 0)).reason == BEYOND_EPOCH
    a.f.learn_max_epoch(4)  # the view (or an on-demand read) shows the promotion
    assert a.prepare(Prepare(4, 0, 0, tuple(recs(4, 1, 1)), 0)).ok
    a.f.learn_max_epoch(2)
    assert a.f.max_epoch == 4


def test_a_writer_is_not_deposed_by_a_refusal_that_names_its_own_new_epoch() -> None:
    # A heartbeat in epoch 3 refused by a member that already saw our bump to 4 recorded.
    w = Writer(epoch=3, replicas=("a",))
    w.leader.on_reply("a", Reply(STALE_EPOCH, 4, 0, 0))
    assert w.leader.deposed
    w.leader.epoch = 4  # our own bump completed
    assert not w.leader.deposed


def test_a_snapshot_beyond_what_the_writer_showed_is_refused() -> None:
    a = guarded(2, promised=2)
    a.prepare(Prepare(2, 0, 0, tuple(recs(2, 1, 5)), 5))
    refusal = a.f.on_snapshot(2, 10**9)
    assert refusal is not None and refusal.reason == BEYOND_LOG
    assert a.f.on_snapshot(2, 5) is None
    refusal = a.f.on_snapshot(3, 5)
    assert refusal is not None and refusal.reason == BEYOND_EPOCH
    # A new epoch's writer has shown nothing yet: what the old one showed does not count.
    a.f.learn_max_epoch(3)
    a.f.on_fence(3)
    refusal = a.f.on_snapshot(3, 5)
    assert refusal is not None and refusal.reason == BEYOND_LOG


def test_catch_up_by_snapshot_still_works_after_the_writer_shows_its_position() -> None:
    """The writer's path (leader.py _send_snapshot): a heartbeat at its commit point, which a
    member far behind answers with a gap, then the snapshot at the writer's applied lsn."""
    w = Writer(replicas=("a",), quorum=1, log=MemoryLog(retain=2))
    for _ in range(4):
        w.write(2)
    w.leader.commit_lsn = 8
    w.store.apply(recs(1, 1, 8))  # what it wrote (its log no longer holds the start)
    a = guarded(1)
    assert w.leader.catchup_step("a") == SendSnapshot()
    gap = a.prepare(w.leader.prepare([], 8, 1))
    assert gap.reason == GAP
    assert a.f.on_snapshot(1, w.store.applied_lsn) is None


def test_a_digest_request_applies_up_to_the_committed_lsn_or_reports_ahead() -> None:
    w, a = Writer(replicas=("a",), quorum=2), Member()
    w.leader.on_reply("a", a.prepare(w.write(4)))
    w.commit(4)
    assert a.store.applied_lsn == 0
    reply, actions = a.f.on_digest(w.leader.digest_request(3))
    apply_actions(actions, a.log, a.store, a.promise)
    assert reply.ok and reply.applied_lsn == 3 == a.store.applied_lsn  # exactly the asked point
    reply, _ = a.f.on_digest(w.leader.digest_request(2))
    assert reply.reason == AHEAD  # applied past it: not comparable
    reply, _ = a.f.on_digest(w.leader.digest_request(9))
    assert reply.reason == GAP


def test_compare_digest_and_a_diverged_replica_is_resynced_from_a_snapshot() -> None:
    ok = Reply("", 1, 4, 1, 4, 4)
    assert compare_digest(4, "x", ok, "x") == MATCH
    assert compare_digest(4, "x", ok, "y") == DIVERGED
    assert compare_digest(5, "x", ok, "y") == NOT_COMPARABLE  # not at the same lsn
    assert compare_digest(4, "x", Reply(AHEAD, 1, 6, 1, 0, 6), None) == NOT_COMPARABLE
    w, a = Writer(replicas=("a",)), Member()
    w.leader.on_reply("a", a.prepare(w.write(2)))
    w.commit(2)
    assert catch_up(w, "a", a)[-1] == Synced()
    w.leader.resync("a")
    assert w.leader.in_sync() == [] and w.leader.catchup_step("a") == SendSnapshot()
    w.leader.snapshot_installed("a")
    w.leader.on_reply("a", Reply("", 1, 2, 1, 2, 2))
    assert w.leader.catchup_step("a") == Synced()


@pytest.mark.parametrize("seed", range(10))
def test_forged_messages_are_refused_and_members_still_converge(seed: int) -> None:
    """Random delivery plus forged fences, prepares and snapshots beyond what ZooKeeper records
    and what the writer showed: none is taken, and every member ends with the writer's data
    (the real :class:`Leader`, see :class:`Harness` below)."""
    import random

    rnd = random.Random(seed)
    h = Harness()
    h.members = {"a": guarded(1), "b": guarded(1)}
    for _ in range(12):
        h.write(rnd.randint(1, 3))
        h.do_local()
        for rid, mem in h.members.items():
            while h.net[rid]:
                if rnd.random() < 0.8:
                    h.deliver(rid)
                else:
                    h.drop(rid)
            forged = rnd.choice(["fence", "prepare", "truncate", "snapshot"])
            big = rnd.choice([h.leader.epoch + 1, 2**62])
            if forged == "fence":
                reply, actions = mem.f.on_fence(big)
            elif forged == "prepare":
                reply, actions = mem.f.on_prepare(Prepare(big, 0, 0, tuple(recs(big, 1, 1, "EVIL")), 10**9))
            elif forged == "truncate":
                reply, actions = mem.f.on_truncate(Truncate(big, 0))
            else:
                refusal, actions = mem.f.on_snapshot(rnd.choice([h.leader.epoch, big]), 10**9), []
                assert refusal is not None
                reply = refusal
            assert reply.reason in (BEYOND_EPOCH, BEYOND_LOG) and actions == []
        h.settle()
    for rid, m in h.members.items():
        m.prepare(h.leader.prepare([], h.leader.commit_lsn, h.epoch_at(h.leader.commit_lsn)))
        assert m.f.promised == h.leader.epoch and m.store.digest() == h.store.digest(), rid


# -- the replica's adapter: reading ZooKeeper's record on demand, refusing forged snapshots ------


def _driver(tmp_path, max_epoch: int, recorded: list[int | None]):  # type: ignore[no-untyped-def]
    promise = PromiseFile(str(tmp_path / "promise"))
    lookups: list[int] = []

    def recorded_epoch() -> int | None:
        lookups.append(1)
        return recorded[0]

    d = FollowerDriver(
        MemoryLog(), Store.open("memory"), promise, offload=False, max_epoch=max_epoch, recorded_epoch=recorded_epoch
    )
    return d, lookups


def test_the_driver_reads_the_recorded_epoch_when_a_message_is_beyond_its_view(tmp_path) -> None:  # type: ignore[no-untyped-def]
    recorded: list[int | None] = [4]
    d, lookups = _driver(tmp_path, 3, recorded)
    assert Reply.from_wire(d.fence(3)).ok and lookups == []  # within the view: no read
    assert Reply.from_wire(d.fence(4)).ok and lookups == [1]  # a promotion the watch has not shown yet
    assert PromiseFile(str(tmp_path / "promise")).epoch == 4
    assert Reply.from_wire(d.fence(2**62)).reason == BEYOND_EPOCH
    recorded[0] = None  # ZooKeeper unreachable: refused, the sender retries
    assert Reply.from_wire(d.fence(5)).reason == BEYOND_EPOCH
    assert PromiseFile(str(tmp_path / "promise")).epoch == 4 and d.state.promised == 4


def test_the_driver_refuses_a_forged_snapshot_and_keeps_its_data(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    d, _ = _driver(tmp_path, 2, [2])
    assert Reply.from_wire(d.prepare(Prepare(2, 0, 0, tuple(recs(2, 1, 5)), 5).to_wire())).ok
    before = d.store.digest()
    evil = b"SNAP-EVIL" * 1000
    reply = Reply.from_wire(d.snapshot_chunk(2, True, [[b"k1", evil]], True, 10**9, 2))
    assert reply.reason == BEYOND_LOG and d.store.digest() == before and d.store.applied_lsn == 5
    assert "refused a snapshot chunk (beyond_log" in caplog.text
    assert max(len(r.getMessage()) for r in caplog.records) < 600  # the input is quoted, bounded
    # The writer's own catch-up: a snapshot at a position it has shown is installed.
    ok = Reply.from_wire(d.snapshot_chunk(2, True, [[b"k1", entry.encode(b"v", 7)]], True, 5, 2))
    assert ok.ok and d.store.applied_lsn == 5 and dict(d.store.scan()) == {b"k1": b"v"}


def test_the_driver_answers_a_digest_at_exactly_the_asked_lsn(tmp_path) -> None:  # type: ignore[no-untyped-def]
    d, _ = _driver(tmp_path, 2, [2])
    d.prepare(Prepare(2, 0, 0, tuple(recs(2, 1, 5)), 0).to_wire())
    raw, digest = d.digest(DigestRequest(2, 3, 2).to_wire())
    assert Reply.from_wire(raw).applied_lsn == 3 and digest == d.store.digest()
    raw, digest = d.digest(DigestRequest(2, 2, 2).to_wire())
    assert Reply.from_wire(raw).reason == AHEAD and digest is None


def test_the_driver_logs_a_flood_of_refusals_once_a_second(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    d, _ = _driver(tmp_path, 2, [2])
    for _ in range(50):
        d.fence(2**62)
    lines = [r.getMessage() for r in caplog.records if "refused a fence" in r.getMessage()]
    assert len(lines) == 1 and all(r.levelname == "WARNING" for r in caplog.records)


# -- the pipelined writer core, driven through its events and effects ---------------------------


class Harness:
    """The real :class:`Leader`, its effects executed by hand: a local log and store, one
    :class:`Member` per replica, and per replica a channel of messages in flight that the
    test delivers, drops, duplicates or reorders.

    The channel models the transport: prepares to one replica may be reordered among
    themselves, duplicated or lost (with or without the replica having taken them), but a
    truncate is a barrier, as on the real ordered connection: it is delivered only after
    every message sent to that replica before it.
    """

    def __init__(self, replicas: tuple[str, ...] = ("a", "b"), quorum: int = 2) -> None:
        self.log = MemoryLog()
        self.store = Store.open("memory")
        self.leader = Leader(1, self.log, quorum, commit_lsn=0, write_timeout=5.0)
        self.leader.set_replicas(list(replicas))
        for p in self.leader.replicas.values():  # in sync at lsn 0, as after a promotion
            p.state, p.match_lsn = IN_SYNC, 0
        self.members = {rid: Member() for rid in replicas}
        self.net: dict[str, list[object]] = {rid: [] for rid in replicas}
        self.local: list[object] = []
        self.now = 0.0
        #: batch (by last lsn) -> its records, its outcome ("ok", an error, or None: pending)
        self.batches: dict[int, tuple[tuple[Record, ...], object]] = {}
        self.committed: dict[int, Record] = {}
        self.lagging: set[str] = set()
        self.definite: list[tuple[Record, ...]] = []
        self.effects: list[object] = []

    # -- executing effects --

    def run(self, effects: list[object]) -> None:
        for e in effects:
            self.effects.append(e)
            if isinstance(e, Send):
                self.net[e.rid].append(e)
            elif isinstance(e, (AppendLocal, Commit, Rollback)):
                self.local.append(e)
                if isinstance(e, Rollback):
                    for rid in e.targets:
                        self.net[rid].append(Truncate(self.leader.epoch, e.after_lsn))
                if isinstance(e, Commit):
                    self.check_quorum_holds(e)
            elif isinstance(e, Fail):
                for lsn in e.lsns:
                    records, outcome = self.batches[lsn]
                    assert outcome is None, f"batch {lsn} answered twice"
                    self.batches[lsn] = (records, e.error)
                    if isinstance(e.error, QuorumNotReached):
                        self.definite.append(records)
                        self.check_nowhere(records)
            elif isinstance(e, CatchUp):
                self.lagging.add(e.rid)

    def check_quorum_holds(self, c: Commit) -> None:
        """G1: at the commit, write_quorum - 1 replicas hold every record up to it, as we do."""
        for r in c.records:
            self.committed[r.lsn] = r
        ours = [self.committed[n] for n in range(1, c.lsn + 1)]
        holders = [
            rid
            for rid, m in self.members.items()
            if [(r.epoch, r.value) for r in m.log.read_from(1, limit=c.lsn)] == [(r.epoch, r.value) for r in ours]
        ]
        assert len(holders) >= self.leader.needed, f"commit of lsn {c.lsn} held by {holders} only"

    def check_nowhere(self, records: tuple[Record, ...]) -> None:
        """G5: a definite failure only if no member (nor we) holds any of the records."""
        ids = {(r.epoch, r.lsn) for r in records}
        for rid, m in [*self.members.items(), ("writer", self)]:
            held = {(r.epoch, r.lsn) for r in m.log.read_from(max(m.log.first_lsn, 1))} & ids
            assert not held, f"definitely failed records {sorted(held)} are on {rid}"

    def do_local(self) -> None:
        job = self.local.pop(0)
        if isinstance(job, AppendLocal):
            self.log.append(job.records)
            self.run(self.leader.on_appended(job.records[-1].lsn))
        elif isinstance(job, Commit):
            apply_log(self.log, self.store, job.lsn) if self.store.applied_lsn < job.lsn else None
            for last, (records, outcome) in self.batches.items():
                if last <= job.lsn and outcome is None:
                    self.batches[last] = (records, "ok")
        else:
            assert isinstance(job, Rollback)
            self.log.truncate_after(job.after_lsn)
            self.run(self.leader.on_truncated(LOCAL, True))

    # -- events --

    def write(self, n: int, tag: str = "v") -> int:
        for e in self.leader.admit():
            assert isinstance(e, BumpEpoch)
            self.leader.on_epoch_bumped(self.leader.epoch + 1)
            for m in self.members.values():  # as recorded in ZooKeeper
                m.f.learn_max_epoch(self.leader.epoch)
        first = self.leader.last_lsn + 1
        batch = tuple(
            Record(self.leader.epoch, lsn, Op.PUT, f"k{lsn}".encode(), f"{tag}{lsn}".encode())
            for lsn in range(first, first + n)
        )
        self.batches[batch[-1].lsn] = (batch, None)
        self.run(self.leader.propose(batch, self.now))
        return batch[-1].lsn

    def deliver(self, rid: str, i: int = 0, keep: bool = False, reply_lost: bool = False) -> None:
        """Deliver message ``i`` of ``rid``'s channel (``keep``: a duplicate stays in flight)."""
        msg = self.net[rid][i] if keep else self.net[rid].pop(i)
        if isinstance(msg, Truncate):
            assert i == 0, "a truncate is a barrier"
            reply = self.members[rid].truncate(msg)
            self.run(self.leader.on_truncated(rid, reply.ok and not reply_lost))
            return
        assert isinstance(msg, Send)
        reply = self.members[rid].prepare(msg.message)
        self.run(self.leader.on_prepare_reply(rid, msg.gen, None if reply_lost else reply))

    def drop(self, rid: str, i: int = 0) -> None:
        msg = self.net[rid].pop(i)
        if isinstance(msg, Truncate):
            self.run(self.leader.on_truncated(rid, False))
        else:
            assert isinstance(msg, Send)
            self.run(self.leader.on_prepare_reply(rid, msg.gen, None))

    def tick(self, dt: float) -> None:
        self.now += dt
        self.run(self.leader.on_tick(self.now))

    def catch_up(self, rid: str) -> bool:
        """Run the catch-up of a lagging replica (its channel empty, as the real probe follows
        every earlier message); True once it is in sync."""
        if self.net[rid]:
            return False
        m, w = self.members[rid], self.leader
        reply, actions = m.f.on_fence(w.epoch)
        apply_actions(actions, m.log, m.store, m.promise)
        w.on_reply(rid, reply, position_only=True)
        for _ in range(20):
            step = w.catchup_step(rid)
            if step is None:
                return False
            if isinstance(step, Synced):
                self.lagging.discard(rid)
                self.run(list(step.sends))
                return True
            if isinstance(step, SendFrom):
                upto = w.commit_lsn
                batch = list(self.log.read_from(step.lsn, limit=upto - step.lsn + 1))
                w.on_reply(rid, m.prepare(w.prepare(batch, step.lsn - 1, self.epoch_at(step.lsn - 1))))
            elif isinstance(step, CutTo):
                w.on_reply(rid, m.truncate(Truncate(w.epoch, step.lsn)))
            else:
                raise AssertionError(f"unexpected step {step}")
        raise AssertionError("catch-up did not converge")

    def epoch_at(self, lsn: int) -> int:
        return (self.log.epochs.epoch_at(lsn) or 0) if lsn > 0 else 0

    def settle(self) -> None:
        """Deliver everything, run every local job, let every timeout fire, catch everyone up."""
        for _ in range(200):
            if self.local:
                self.do_local()
            elif any(self.net.values()):
                rid = next(r for r, q in self.net.items() if q)
                self.deliver(rid)
            elif self.leader.inflight:
                self.tick(10.0)
            elif self.lagging:
                for rid in sorted(self.lagging):
                    self.catch_up(rid)
            else:
                return
        raise AssertionError("no quiescence")


def test_commit_advances_over_the_contiguous_acked_prefix_only() -> None:
    h = Harness(replicas=("a", "b", "c"), quorum=3)  # needs 2 replica acks
    b1, b2, b3 = h.write(2), h.write(1), h.write(3)
    assert len(h.leader.inflight) == 3 and h.leader.commit_lsn == 0
    h.do_local(), h.do_local(), h.do_local()  # every local append done
    for _ in range(3):
        h.deliver("a")  # a acks all three
    assert h.leader.commit_lsn == 0  # one replica ack: nothing is committed
    h.deliver("c", 1)  # batch 2 reaches c before batch 1: a gap, never counted
    assert h.lagging == {"c"} and h.leader.commit_lsn == 0
    h.deliver("b")
    assert h.leader.commit_lsn == b1  # batch 1: a and b
    h.deliver("b")
    assert h.leader.commit_lsn == b2
    h.deliver("b")
    assert h.leader.commit_lsn == b3
    assert [e.lsn for e in h.effects if isinstance(e, Commit)] == [b1, b2, b3]
    assert h.committed == {r.lsn: r for lsn in (b1, b2, b3) for r in h.batches[lsn][0]}


def test_a_batch_commits_only_once_appended_locally() -> None:
    h = Harness()
    b1, b2 = h.write(1), h.write(1)
    h.deliver("a"), h.deliver("a")
    assert h.leader.commit_lsn == 0  # acked by a, but our own copy is not durable yet
    h.do_local()
    assert h.leader.commit_lsn == b1
    h.do_local()
    assert h.leader.commit_lsn == b2


def test_rollback_with_batches_in_flight_fails_all_of_them_definitely_when_all_confirm() -> None:
    h = Harness()
    done = h.write(1)
    h.deliver("a"), h.do_local()
    assert h.leader.commit_lsn == done
    lost = [h.write(2), h.write(1), h.write(3)]
    for _ in range(3):
        h.do_local()
    h.drop("a"), h.drop("b")  # the first batch in flight can no longer reach its quorum
    rollback = [e for e in h.effects if isinstance(e, Rollback)]
    assert rollback == [Rollback(done, ("a", "b"))] and h.leader.inflight == []
    assert all(h.batches[lsn][1] is None for lsn in lost)  # answered once the truncates are
    h.settle()
    assert all(isinstance(h.batches[lsn][1], QuorumNotReached) for lsn in lost)
    assert h.log.last_lsn == done and h.store.applied_lsn == done and h.batches[done][1] == "ok"


def test_rollback_is_indeterminate_when_a_replica_that_may_hold_it_does_not_confirm() -> None:
    h = Harness()
    lost = [h.write(1), h.write(1)]
    h.deliver("a", reply_lost=True)  # a took batch 1 but its answer was lost
    h.drop("b")
    h.deliver("b")  # b refuses batch 2 with a gap
    h.deliver("a")  # a's answer to batch 2 comes after the rollback started: ignored
    trunc = h.net["a"].pop(0)  # the truncate to a is lost
    assert isinstance(trunc, Truncate)
    h.run(h.leader.on_truncated("a", False))
    assert [r.lsn for r in h.members["a"].log.read_from(1)] == [1, 2]  # it may well hold them
    h.settle()
    assert all(isinstance(h.batches[lsn][1], WriteTimeout) for lsn in lost)
    assert h.members["a"].log.last_lsn == 0  # its catch-up cut them later


def test_timeout_of_the_oldest_batch_rolls_back_everything_in_flight() -> None:
    h = Harness()
    first = h.write(1)
    h.tick(1.0)
    second = h.write(1)
    h.tick(3.9)
    assert not any(isinstance(e, Rollback) for e in h.effects)
    h.tick(0.2)  # the first batch is 5.1 s old
    assert [e for e in h.effects if isinstance(e, Rollback)] == [Rollback(0, ("a", "b"))]
    h.settle()
    assert isinstance(h.batches[first][1], QuorumNotReached) and isinstance(h.batches[second][1], QuorumNotReached)


def test_the_epoch_is_bumped_after_a_rollback_before_the_next_write() -> None:
    h = Harness()
    h.write(1)
    h.drop("a"), h.drop("b")
    with pytest.raises(Unavailable):  # while the rollback is under way nothing is stamped
        h.leader.admit()
    h.settle()
    assert h.leader.admit() == [BumpEpoch()]
    stale = (Record(1, 1, Op.PUT, b"k", b"v"),)
    with pytest.raises(Unavailable):  # a batch stamped with the old epoch is refused
        h.leader.propose(stale, h.now)
    h.leader.on_epoch_bumped(2)
    assert h.leader.admit() == []
    assert h.write(1) == 1 and h.leader.inflight[0].records[0].epoch == 2  # lsn 1 again, in a new epoch
    h.settle()
    assert h.leader.commit_lsn == 1 and h.store.get(b"k1") == b"v1"
    assert [(r.epoch, r.lsn) for r in h.members["a"].log.read_from(1)] == [(2, 1)]


def test_a_late_answer_from_before_a_rollback_never_counts() -> None:
    h = Harness(replicas=("a",), quorum=2)
    h.write(1)
    h.do_local()
    sent = h.net["a"].pop(0)
    h.tick(6.0)  # timed out: rolled back everywhere (a's truncate comes after the prepare)
    h.settle()
    h.leader.on_epoch_bumped(2)
    h.catch_up("a")
    h.write(1)
    h.do_local()
    assert isinstance(sent, Send)
    h.run(h.leader.on_prepare_reply("a", sent.gen, Reply("", 1, 1, 1, 1, 0)))  # the old ack, late
    assert h.leader.commit_lsn == 0


def test_a_deposed_writer_fails_every_batch_in_flight_as_indeterminate() -> None:
    h = Harness()
    lsns = [h.write(1), h.write(1)]
    h.members["b"].f.on_fence(7)
    h.deliver("b")
    assert h.leader.deposed and h.leader.inflight == []
    assert any(isinstance(e, Deposed) and e.epoch == 7 for e in h.effects)
    assert all(isinstance(h.batches[lsn][1], WriteTimeout) for lsn in lsns)
    with pytest.raises(Unavailable):
        h.leader.admit()


def test_a_replica_that_catches_up_joins_the_batches_in_flight() -> None:
    h = Harness()
    h.leader.mark_lagging("b")
    b1 = h.write(2)
    assert [type(m) for m in h.net["b"]] == []  # not in sync: no prepare
    assert h.catch_up("b")  # matches the commit point: joins, and gets batch 1 resent
    assert [m.message.records[-1].lsn for m in h.net["b"]] == [b1]  # type: ignore[attr-defined]
    h.do_local()
    h.drop("a")  # a is gone: b's ack alone makes the quorum
    h.deliver("b")
    assert h.leader.commit_lsn == b1


def test_a_replica_reporting_records_we_are_still_appending_waits() -> None:
    h = Harness()
    h.write(2)
    h.deliver("b")
    h.leader.mark_lagging("b")  # (e.g. a later prepare failed)
    m = h.members["b"]
    h.leader.on_reply("b", m.f.on_fence(1)[0], position_only=True)
    assert h.leader.catchup_step("b") is None  # its log end (2) is past our appended log (0)
    h.do_local()
    assert isinstance(h.leader.catchup_step("b"), Synced)


def test_a_restart_tail_is_committed_and_never_rolled_back() -> None:
    log = MemoryLog()
    log.append(recs(1, 1, 3))
    leader = Leader(1, log, 2, commit_lsn=0, write_timeout=5.0)
    leader.set_replicas(["a"])
    leader.replicas["a"].state, leader.replicas["a"].match_lsn = IN_SYNC, 0
    assert leader.tail_pending
    with pytest.raises(Unavailable):
        leader.admit()
    effects = leader.propose(list(log.read_from(1)), 0.0, tail=True)
    assert not any(isinstance(e, AppendLocal) for e in effects)
    failed = leader.on_tick(6.0)
    assert [type(e) for e in failed] == [Fail] and not leader.need_bump and leader.tail_pending
    leader.propose(list(log.read_from(1)), 7.0, tail=True)
    effects = leader.on_prepare_reply("a", 0, Reply("", 1, 3, 1, 3, 0))
    assert effects == [Commit(3, tuple(recs(1, 1, 3)))] and not leader.tail_pending


@pytest.mark.parametrize("seed", range(40))
def test_pipelined_leader_under_random_loss_duplication_and_reordering(seed: int) -> None:
    """Several batches in flight; prepares lost, duplicated, reordered; answers lost; local
    appends late; timeouts; rollbacks; catch-ups. Checked throughout: every commit is held by
    a write quorum (G1), a definite failure only when no member holds any of its records
    (G5); at the end every member holds the writer's committed data (G3) and every
    acknowledged batch is in it."""
    import random

    rnd = random.Random(seed)
    h = Harness(replicas=("a", "b", "c"), quorum=rnd.choice([2, 3]))
    for _ in range(300):
        roll = rnd.random()
        queued = [rid for rid, q in h.net.items() if q]
        if roll < 0.15 and len(h.leader.inflight) < 4 and h.leader.rolling_back is None:
            h.write(rnd.randint(1, 3))
        elif roll < 0.55 and queued:
            rid = rnd.choice(queued)
            q = h.net[rid]
            barrier = next((i for i, m in enumerate(q) if isinstance(m, Truncate)), len(q))
            i = rnd.randrange(barrier) if barrier else 0  # reorder prepares up to a truncate
            what = rnd.random()
            if what < 0.1:
                h.drop(rid, i)
            elif what < 0.2 and not isinstance(q[i], Truncate):
                h.deliver(rid, i, keep=True)  # duplicated: delivered now and again later
            else:
                h.deliver(rid, i, reply_lost=rnd.random() < 0.05)
        elif roll < 0.75 and h.local:
            h.do_local()
        elif roll < 0.8:
            h.tick(rnd.choice([0.5, 2.0, 6.0]))
        elif h.lagging and h.leader.rolling_back is None:
            h.catch_up(rnd.choice(sorted(h.lagging)))
    h.settle()
    assert not h.leader.inflight and h.leader.rolling_back is None
    # acknowledged batches are all in the writer's committed data, which every member holds
    for last, (records, outcome) in h.batches.items():
        assert outcome is not None, f"batch {last} was never answered"
        if outcome == "ok":
            assert all(h.committed.get(r.lsn) == r for r in records)
            assert all(h.store.get(r.key) == r.value for r in records if h.committed[r.lsn] == r)
    for records in h.definite:
        h.check_nowhere(records)
    for rid, m in h.members.items():
        m.prepare(h.leader.prepare([], h.leader.commit_lsn, h.epoch_at(h.leader.commit_lsn)))
        assert m.store.applied_lsn == h.store.applied_lsn == h.leader.commit_lsn, rid
        assert m.store.digest() == h.store.digest(), rid
    assert sum(1 for _, o in h.batches.values() if o == "ok") > 0


class _SlowLog(MemoryLog):
    """A memory log whose appends take a while (as an fsync does), counted."""

    def __init__(self) -> None:
        super().__init__()
        self.appends: list[int] = []

    def append(self, records) -> None:  # type: ignore[no-untyped-def]
        import gevent

        gevent.sleep(0.01)
        self.appends.append(len(records))
        super().append(records)


def test_the_driver_appends_queued_chaining_prepares_as_one() -> None:
    import gevent

    log = _SlowLog()
    d = FollowerDriver(log, Store.open("memory"), PromiseFile(None), offload=False)
    batches = [tuple(recs(1, 1 + 2 * i, 2)) for i in range(5)]
    msgs = [Prepare(1, b[0].lsn - 1, 1 if i else 0, b, 0) for i, b in enumerate(batches)]
    msgs.insert(3, Prepare(1, 40, 1, tuple(recs(1, 41, 1)), 0))  # does not chain: a gap
    jobs = [gevent.spawn(d.prepare, m.to_wire()) for m in msgs]
    gevent.joinall(jobs, raise_error=True)
    replies = [Reply.from_wire(j.value) for j in jobs]
    assert [(r.reason, r.match_lsn) for r in replies] == [("", 2), ("", 4), ("", 6), (GAP, 0), ("", 8), ("", 10)]
    assert log.appends == [2, 4, 4]  # the first alone; then two groups split by the gap
    assert [r.lsn for r in log.read_from(1)] == list(range(1, 11))


def test_a_replica_going_down_fails_a_batch_that_needed_it_at_once() -> None:
    h = Harness(replicas=("a", "b"), quorum=3)  # both acks needed
    h.write(1)
    h.deliver("a")
    assert h.leader.rolling_back is None
    h.run(h.leader.mark_down("b"))
    assert [e for e in h.effects if isinstance(e, Rollback)] == [Rollback(0, ("a", "b"))]
