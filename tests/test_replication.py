"""The sans-I/O replication core, driven deterministically (no sockets, no threads).

Members are real in-memory logs and stores (diskless mode); messages are
delivered by hand, so loss, duplication and reordering are exact.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from dkv.cluster.follower import FollowerDriver, PromiseFile, apply_actions, apply_log
from dkv.cluster.replication import (AHEAD, BEYOND_EPOCH, BEYOND_LOG, COMMITTED, DIVERGED, GAP, IN_SYNC, MATCH,
                                     MISMATCH, NOT_COMPARABLE, STALE_EPOCH, CutTo, DigestRequest, Follower,
                                     Leader, Prepare, ReadConfirmation, Reply, SendFrom, SendSnapshot, Synced,
                                     Truncate, compare_digest)
from dkv.storage import Store
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

    def __init__(self, epoch: int = 1, replicas: tuple[str, ...] = ("a", "b"), quorum: int = 2,
                 log: MemoryLog | None = None) -> None:
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
    return w.leader.prepare(list(w.log.read_from(match + 1)), match,
                            w.log.epochs.epoch_at(match) or 0 if match else 0)


def catch_up(w: Writer, rid: str, m: Member, busy: bool = False, max_steps: int = 20) -> list[object]:
    """Drive the leader's catch-up decisions for one member until it is in sync."""
    steps: list[object] = []
    for _ in range(max_steps):
        step = w.leader.catchup_step(rid, busy)
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
    assert w.leader.catchup_step("a", busy=False) == SendSnapshot()


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
    assert w.leader.catchup_step("a", busy=False) == SendSnapshot()


def test_busy_writer_delays_sync_until_the_batch_is_decided() -> None:
    w, a = Writer(replicas=("a",)), Member()
    w.write(2)
    w.leader.on_reply("a", Reply("", 1, 0, 0, 0, 0))
    assert catch_up(w, "a", a, busy=True)[-1] is None
    assert w.leader.replicas["a"].state != IN_SYNC
    assert w.leader.catchup_step("a", busy=False) == Synced()


def test_messages_survive_the_wire() -> None:
    m = Prepare(3, 10, 2, tuple(recs(3, 11, 2)) + (Record(3, 13, Op.DELETE, b"x"),), 9)
    assert Prepare.from_wire(m.to_wire()) == m
    assert Truncate.from_wire(Truncate(4, 8).to_wire()) == Truncate(4, 8)
    r = Reply(GAP, 4, 8, 3, 0, 7)
    assert Reply.from_wire(r.to_wire()) == r


@pytest.mark.parametrize("seed", range(20))
def test_random_loss_duplication_and_reordering_converge(seed: int) -> None:
    """Any delivery schedule ends with every member holding the writer's committed data."""
    import random

    rnd = random.Random(seed)
    w = Writer(replicas=("a", "b"))
    members = {"a": Member(), "b": Member()}
    sent: list[tuple[str, Prepare]] = []
    for _ in range(15):
        m = w.write(rnd.randint(1, 3))
        for rid in members:
            sent.append((rid, m))
        rnd.shuffle(sent)
        # deliver a random subset, some twice, in shuffled order
        for rid, msg in list(sent):
            if rnd.random() < 0.3:
                continue
            for _ in range(rnd.choice([1, 1, 2])):
                w.leader.on_reply(rid, members[rid].prepare(msg))
        sent = [x for x in sent if rnd.random() < 0.5]
        acked = w.leader.acked(w.log.last_lsn)
        if len(acked) >= w.leader.needed:
            w.commit(w.log.last_lsn)
    for rid, m in members.items():  # probe, catch up to the commit point, then the tail
        probe = m.prepare(w.leader.prepare([], w.log.last_lsn, w.leader.epoch))
        w.leader.on_reply(rid, probe)
        if not probe.ok:
            catch_up(w, rid, m)
            w.leader.on_reply(rid, m.prepare(prepare_tail(w, rid)))
    w.commit(w.log.last_lsn)
    for rid, m in members.items():
        w.leader.on_reply(rid, m.prepare(w.heartbeat(rid)))
        assert m.store.digest() == w.store.digest(), rid


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
    assert w.leader.catchup_step("a", busy=False) == SendSnapshot()
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
    assert w.leader.in_sync() == [] and w.leader.catchup_step("a", busy=False) == SendSnapshot()
    w.leader.snapshot_installed("a")
    w.leader.on_reply("a", Reply("", 1, 2, 1, 2, 2))
    assert w.leader.catchup_step("a", busy=False) == Synced()


@pytest.mark.parametrize("seed", range(10))
def test_forged_messages_are_refused_and_members_still_converge(seed: int) -> None:
    """Random delivery plus forged fences, prepares and snapshots beyond what ZooKeeper records
    and what the writer showed: none is taken, and every member ends with the writer's data."""
    import random

    rnd = random.Random(seed)
    w = Writer(replicas=("a", "b"))
    members = {"a": guarded(1), "b": guarded(1)}
    for _ in range(12):
        m = w.write(rnd.randint(1, 3))
        for rid, mem in members.items():
            if rnd.random() < 0.8:
                w.leader.on_reply(rid, mem.prepare(m))
            forged = rnd.choice(["fence", "prepare", "truncate", "snapshot"])
            big = rnd.choice([2, 2**62])
            if forged == "fence":
                reply, actions = mem.f.on_fence(big)
            elif forged == "prepare":
                reply, actions = mem.f.on_prepare(Prepare(big, 0, 0, tuple(recs(big, 1, 1, "EVIL")), 10**9))
            elif forged == "truncate":
                reply, actions = mem.f.on_truncate(Truncate(big, 0))
            else:
                refusal, actions = mem.f.on_snapshot(rnd.choice([1, big]), 10**9), []
                assert refusal is not None
                reply = refusal
            assert reply.reason in (BEYOND_EPOCH, BEYOND_LOG) and actions == []
        if len(w.leader.acked(w.log.last_lsn)) >= w.leader.needed:
            w.commit(w.log.last_lsn)
    for rid, m in members.items():
        probe = m.prepare(w.leader.prepare([], w.log.last_lsn, w.leader.epoch))
        w.leader.on_reply(rid, probe)
        if not probe.ok:
            catch_up(w, rid, m)
            w.leader.on_reply(rid, m.prepare(prepare_tail(w, rid)))
    w.commit(w.log.last_lsn)
    for rid, m in members.items():
        w.leader.on_reply(rid, m.prepare(w.heartbeat(rid)))
        assert m.f.promised == 1 and m.store.digest() == w.store.digest(), rid


# -- the replica's adapter: reading ZooKeeper's record on demand, refusing forged snapshots ------


def _driver(tmp_path, max_epoch: int, recorded: list[int | None]):  # type: ignore[no-untyped-def]
    promise = PromiseFile(str(tmp_path / "promise"))
    lookups: list[int] = []

    def recorded_epoch() -> int | None:
        lookups.append(1)
        return recorded[0]

    d = FollowerDriver(MemoryLog(), Store.open("memory"), promise, offload=False, max_epoch=max_epoch,
                       recorded_epoch=recorded_epoch)
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
    ok = Reply.from_wire(d.snapshot_chunk(2, True, [[b"k1", b"v"]], True, 5, 2))
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
