"""Fenced locks (issue 11): ``Client.lock`` against real node processes (and a real cluster).

Standalone: mutual exclusion, ``LockTimeout``, a non-owner's release changes
nothing, a holder killed with ``kill -9`` stops renewing and its lease expires,
``valid`` turns False when the key is taken or the store stops answering, tokens
strictly increase, bad arguments are refused, the CLI's ``lock`` command.
Cluster: 8 threads contend for one lock while the writer of its shard is killed
with ``kill -9`` (a fenced resource checks that no two holders overlap); tokens
keep increasing when the lock's slot moves to a new shard.
"""

from __future__ import annotations

import gc
import logging
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

import dkv
from dkv.cli.repl import execute
from dkv.client.lock import LOCK_PREFIX, MAX_NAME_BYTES, Lock
from dkv.errors import DKVError, InvalidArgument, LockTimeout, from_wire, to_wire
from tests.support.cluster import Cluster
from tests.support.procs import NodeProcess, wait_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class FencedResource:
    """A resource guarded by a lock: it records each holder's entry and exit (token, who),
    refuses a token lower than the highest it has seen, and notes any overlap."""

    highest: int = 0
    inside: tuple[int, str] | None = None
    accepted: list[tuple[int, str, float]] = field(default_factory=list)  # (token, who, time of entry)
    refused: list[tuple[int, int, str]] = field(default_factory=list)  # (token, highest, who)
    violations: list[str] = field(default_factory=list)
    mutex: threading.Lock = field(default_factory=threading.Lock)

    def enter(self, token: int, who: str) -> bool:
        with self.mutex:
            if token < self.highest:
                self.refused.append((token, self.highest, who))
                return False
            if self.inside is not None:
                self.violations.append(f"{who} (token {token}) entered while {self.inside} was inside")
            self.highest, self.inside = token, (token, who)
            self.accepted.append((token, who, time.monotonic()))
            return True

    def exit(self, token: int, who: str) -> None:
        with self.mutex:
            if self.inside != (token, who):
                self.violations.append(f"{who} (token {token}) left, but {self.inside} was inside")
            self.inside = None

    def tokens(self) -> list[int]:
        with self.mutex:
            return [t for t, _, _ in self.accepted]


def strictly_increasing(xs: list[int]) -> bool:
    return all(a < b for a, b in zip(xs, xs[1:]))


class Contenders:
    """``n`` threads taking one lock in turn through one shared client; inside, each checks
    ``valid`` and passes its token to ``resource``."""

    def __init__(
        self, client: dkv.Client, name: str, resource: FencedResource, n: int, ttl: float, hold: float = 0.005
    ) -> None:
        self.client, self.name, self.resource, self.ttl, self.hold = client, name, resource, ttl, hold
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.lapsed = 0  # acquisitions whose lease had lapsed by the time the body ran
        self.threads = [threading.Thread(target=self._run, args=(f"t{i}",), daemon=True) for i in range(n)]

    def start(self) -> "Contenders":
        for t in self.threads:
            t.start()
        return self

    def _run(self, who: str) -> None:
        while not self.stop.is_set():
            try:
                with self.client.lock(self.name, ttl=self.ttl, timeout=2.0) as lock:
                    if not lock.valid:
                        self.lapsed += 1
                        continue
                    assert lock.token is not None
                    if self.resource.enter(lock.token, who):
                        time.sleep(self.hold)
                        self.resource.exit(lock.token, who)
            except LockTimeout:
                continue
            except DKVError as e:  # e.g. a request that outlived the client's timeout in the failover
                self.errors.append(f"{who}: {type(e).__name__}: {e}")
                time.sleep(0.05)

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)
        assert not any(t.is_alive() for t in self.threads), "a contender did not stop"


# -- standalone node -----------------------------------------------------------------------------


@pytest.fixture
def client(node: NodeProcess) -> Iterator[dkv.Client]:
    with dkv.Client(node.addr, timeout=5) as c:
        yield c


def test_lock_timeout_has_a_stable_wire_code() -> None:
    err = from_wire(to_wire(LockTimeout("lock 'x' not acquired within 1s")))
    assert type(err) is LockTimeout and err.code == "LOCK_TIMEOUT" and err.definite


def test_mutual_exclusion_and_strictly_increasing_tokens(client: dkv.Client) -> None:
    resource = FencedResource()
    contenders = Contenders(client, "basic", resource, n=4, ttl=5.0, hold=0.002).start()
    wait_until(lambda: len(resource.accepted) >= 40, 60, "40 acquisitions")
    contenders.finish()
    assert not resource.violations, resource.violations
    assert not contenders.errors, contenders.errors
    assert strictly_increasing(resource.tokens()), resource.tokens()
    assert len({who for _, who, _ in resource.accepted}) > 1, "more than one thread got the lock"
    assert not resource.refused, resource.refused
    assert client.get(LOCK_PREFIX + b"basic") is None, "every holder released"


def test_acquire_release_and_reacquire_without_with(client: dkv.Client) -> None:
    lock = client.lock("manual", ttl=2.0)
    assert not lock.held and not lock.valid and lock.token is None
    assert lock.acquire() is lock
    first = lock.token
    assert isinstance(first, int) and lock.valid and lock.held
    meta = client.get(LOCK_PREFIX + b"manual", with_meta=True)
    assert meta is not None and meta.value == lock.owner and meta.revision >= first
    assert meta.expires_at is not None
    with pytest.raises(InvalidArgument):
        lock.acquire()  # not reentrant
    assert lock.release() is True
    assert not lock.valid and client.get(LOCK_PREFIX + b"manual") is None
    assert lock.release() is False  # not held: nothing to do
    lock.acquire()
    assert lock.token is not None and lock.token > first
    lock.release()


def test_timeout_raises_lock_timeout_and_leaves_nothing(client: dkv.Client) -> None:
    with client.lock("busy") as holder:
        before = client.get(LOCK_PREFIX + b"busy", with_meta=True)
        for timeout in (0, 0.3):
            with pytest.raises(LockTimeout):
                client.lock("busy", timeout=timeout).acquire()
        with pytest.raises(LockTimeout):
            with client.lock("busy", timeout=0.1):
                raise AssertionError("the body must not run")
        assert holder.valid
        after = client.get(LOCK_PREFIX + b"busy", with_meta=True)
        assert after is not None and before is not None and after.value == before.value == holder.owner


def test_release_by_a_non_owner_does_nothing(client: dkv.Client) -> None:
    key = LOCK_PREFIX + b"owned"
    with client.lock("owned") as holder:
        other = client.lock("owned")
        assert other.release() is False  # never acquired
        assert client.delete(key, if_value=b"someone-else") is False
        got = client.get(key)
        assert got == holder.owner and holder.valid
        # a second Lock object that did acquire after the first released cannot be released by the first
    assert client.get(key) is None
    stale = client.lock("owned")
    stale.acquire()
    stale_owner = stale.owner
    assert client.delete(key) is True  # the key vanishes under the holder (an operator, an expiry)
    with client.lock("owned", timeout=10) as newer:
        assert newer.token is not None and stale.token is not None and newer.token > stale.token
        wait_until(lambda: not stale.valid, 10, "the old holder to notice it lost the lock")
        assert stale.release() is False  # its conditional delete leaves the new holder's key alone
        assert client.get(key) == newer.owner != stale_owner and newer.valid


HOLDER = textwrap.dedent("""
    import sys, time, dkv
    c = dkv.Client(sys.argv[1], timeout=5)
    lock = c.lock("dies", ttl=float(sys.argv[2]))
    lock.acquire()
    print(lock.token, flush=True)
    time.sleep(600)
""")


def test_a_holder_killed_with_sigkill_stops_renewing_and_its_lease_expires(
    node: NodeProcess, client: dkv.Client
) -> None:
    ttl = 1.5
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, node.addr, str(ttl)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        dead_token = int(proc.stdout.readline())
        # it renews while alive: still held after several times its ttl
        seen = client.get(LOCK_PREFIX + b"dies", with_meta=True)
        with pytest.raises(LockTimeout):
            client.lock("dies", timeout=2 * ttl).acquire()
        renewed = client.get(LOCK_PREFIX + b"dies", with_meta=True)
        assert seen is not None and renewed is not None and renewed.value == seen.value
        assert renewed.revision > seen.revision, "the holder renewed its lease"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        with client.lock("dies", ttl=ttl, timeout=30) as lock:  # the lease expires: acquired
            assert lock.token is not None and lock.token > dead_token
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_valid_turns_false_when_the_store_stops_answering(node: NodeProcess) -> None:
    with dkv.Client(node.addr, timeout=1) as c:
        lock = c.lock("paused", ttl=1.0)
        lock.acquire()
        node.pause()  # renewals get no answer
        try:
            wait_until(lambda: not lock.valid, 10, "the lease to lapse on the holder's clock")
        finally:
            node.resume()
        # the store expired the key by then: the next renewal finds it gone, or someone takes it
        with c.lock("paused", ttl=1.0, timeout=10) as other:
            assert other.token is not None and lock.token is not None and other.token > lock.token
            assert not lock.valid
        lock.release()


def test_an_acquire_of_unknown_outcome_learns_whether_it_won(
    node: NodeProcess, caplog: pytest.LogCaptureFixture
) -> None:
    """The node is paused while an acquire is in flight: the write times out (WriteTimeout,
    may or may not be applied). Once the node answers again, the acquirer re-reads the key:
    the lock is ours, with a token, and the key holds our owner id."""
    key = LOCK_PREFIX + b"unknown"
    caplog.set_level(logging.DEBUG, logger="dkv.client.lock")
    with dkv.Client(node.addr, timeout=1) as c:
        core = c._runner._core  # type: ignore[attr-defined]
        assert c.get(key) is None  # connected, and the slot map known: the acquire's write is sent
        lock = c.lock("unknown", ttl=5.0, timeout=30)
        outcome: list[BaseException | None] = []

        def acquire() -> None:
            try:
                lock.acquire()
                outcome.append(None)
            except BaseException as e:
                outcome.append(e)

        node.pause()
        try:
            t = threading.Thread(target=acquire, daemon=True)
            t.start()
            # the write timed out: the client now waits for the node to answer a ping
            wait_until(lambda: node.addr in core._suspects, 10, "the acquire to time out")
        finally:
            node.resume()
        t.join(30)
        assert outcome == [None], outcome
        assert "an attempt of unknown outcome won it" in caplog.text, caplog.text
        assert lock.valid and lock.token is not None
        meta = c.get(key, with_meta=True)
        assert meta is not None and meta.value == lock.owner and meta.revision >= lock.token
        with pytest.raises(LockTimeout):
            c.lock("unknown", timeout=0).acquire()
        first = lock.token
        assert lock.release() is True
        with c.lock("unknown", timeout=0) as again:
            assert again.token is not None and again.token > first


def test_closing_the_client_stops_the_renewal(node: NodeProcess) -> None:
    c = dkv.Client(node.addr, timeout=5)
    lock = c.lock("closing", ttl=1.0)
    lock.acquire()
    renewer = lock._renewer
    assert renewer is not None and renewer.is_alive()
    c.close()
    assert not lock.valid
    wait_until(lambda: not renewer.is_alive(), 10, "the renewal thread to end")
    with dkv.Client(node.addr, timeout=5) as c2:
        with c2.lock("closing", timeout=10) as again:  # the unrenewed lease expired
            assert again.token is not None and lock.token is not None and again.token > lock.token


def test_a_lock_dropped_without_release_stops_renewing(client: dkv.Client) -> None:
    lock = client.lock("dropped", ttl=1.0)
    lock.acquire()
    token, renewer = lock.token, lock._renewer
    assert token is not None and renewer is not None and renewer.is_alive()
    del lock
    gc.collect()
    wait_until(lambda: not renewer.is_alive(), 10, "the renewal thread to end")
    with client.lock("dropped", timeout=10) as again:  # its lease expired
        assert again.token is not None and again.token > token


def test_bad_names_and_arguments_are_invalid_and_write_nothing(client: dkv.Client) -> None:
    for bad in ("", b"", 7, None, "x" * (MAX_NAME_BYTES + 1)):
        with pytest.raises(InvalidArgument):
            client.lock(bad)  # type: ignore[arg-type]
    for ttl in (0, -1, 0.01, float("nan"), float("inf"), True, "10"):
        with pytest.raises(InvalidArgument):
            client.lock("ok", ttl=ttl)  # type: ignore[arg-type]
    for timeout in (-1, float("nan"), "1", False):
        with pytest.raises(InvalidArgument):
            client.lock("ok", timeout=timeout)  # type: ignore[arg-type]
    assert list(client.scan(prefix=LOCK_PREFIX)) == []
    assert isinstance(client.lock("x" * MAX_NAME_BYTES), Lock)


def test_cli_lock_prints_the_token_holds_until_ctrl_c_then_releases(node: NodeProcess, client: dkv.Client) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "dkv.cli.main", "cli", node.addr],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("lock cli-held 1\n")
        proc.stdin.flush()
        first = proc.stdout.readline()
        assert first.startswith("(integer) "), first
        token = int(first.split()[1])
        assert "Ctrl-C releases it" in proc.stdout.readline()
        # held and renewed past its ttl
        with pytest.raises(LockTimeout):
            client.lock("cli-held", timeout=2.0).acquire()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, (out, err)
        assert out.strip() == "released", (out, err)
        assert client.get(LOCK_PREFIX + b"cli-held") is None
        with client.lock("cli-held", timeout=0) as lock:
            assert lock.token is not None and lock.token > token
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_lock_usage_errors(client: dkv.Client) -> None:
    assert execute(client, "lock") == (False, "(error) usage: lock NAME [TTL]")
    assert execute(client, "lock a ten") == (False, "(error) usage: lock NAME [TTL]")
    ok, text = execute(client, "lock a 0")
    assert not ok and "InvalidArgument" in text, text
    assert list(client.scan(prefix=LOCK_PREFIX)) == []


# -- cluster -------------------------------------------------------------------------------------


@pytest.mark.parametrize("ttl", [3.0, 10.0], ids=["lease-shorter-than-failover", "lease-outlives-failover"])
def test_contended_lock_while_the_writer_is_killed(zk: str, tmp_path: Path, ttl: float) -> None:
    """Acceptance: 8 threads contend for one lock while its shard's writer is killed with
    kill -9; no two holders overlap, tokens strictly increase, and holders keep coming after
    the failover. With a short ttl the lease held at the kill lapses (the next holder gets
    the lock once the new writer expired the key); with a long one the holder renews it
    with the new writer and releases it."""
    cluster = Cluster(zk, tmp_path, shards=1, replication_factor=3, write_quorum=2, session_timeout=4.0)
    try:
        cluster.start()
        client = cluster.client(timeout=10)
        resource = FencedResource()
        contenders = Contenders(client, "acceptance", resource, n=8, ttl=ttl).start()
        try:
            wait_until(lambda: len(resource.accepted) >= 20, 60, "acquisitions before the kill")
            old = cluster.writer_of("shard-1")
            t_kill = time.monotonic()
            cluster.nodes[old].kill()
            wait_until(
                lambda: sum(1 for _, _, t in resource.accepted if t > t_kill) >= 10, 60, "acquisitions after the kill"
            )
        finally:
            contenders.finish()
        new = cluster.writer_of("shard-1")
        assert new and new != old, "a replica was promoted"
        assert not resource.violations, resource.violations
        tokens = resource.tokens()
        assert strictly_increasing(tokens), tokens
        print(
            f"\n{len(tokens)} holders ({sum(1 for _, _, t in resource.accepted if t > t_kill)} after the kill), "
            f"{len(resource.refused)} stale entries refused, {contenders.lapsed} lapsed leases, "
            f"{len(contenders.errors)} errors: {contenders.errors[:3]}"
        )
        client.close()
    finally:
        cluster.stop()


def test_tokens_keep_increasing_when_the_locks_slot_moves(zk: str, tmp_path: Path) -> None:
    """Locks taken on a one-shard cluster, then a second shard takes half the slots: the
    next holder of every lock, moved or not, gets a higher token."""
    cluster = Cluster(zk, tmp_path, shards=1, replication_factor=1, write_quorum=1, session_timeout=4.0)
    try:
        cluster.start()
        client = cluster.client(timeout=10)
        names = [f"mig{i}" for i in range(16)]
        before: dict[str, int] = {}
        for name in names:
            with client.lock(name, timeout=10) as lock:
                assert lock.token is not None
                before[name] = lock.token
        cluster.add_node("n2")
        wait_until(
            lambda: len(cluster.shard_members()) == 2 and cluster.balanced(),
            120,
            "the second shard to take half the slots",
            interval=0.2,
        )
        moved_slots = cluster.shard_members()["shard-2"]["slots"]
        moved = [n for n in names if any(a <= dkv.slot_of(LOCK_PREFIX + n.encode()) <= b for a, b in moved_slots)]
        assert moved and len(moved) < len(names), f"some locks moved, some stayed: {moved}"
        for name in names:
            with client.lock(name, timeout=10) as lock:
                assert lock.token is not None and lock.token > before[name], name
        client.close()
    finally:
        cluster.stop()
