"""Backup and restore (issue 12 item 2): real node processes, real ZooKeeper, real LevelDB, the real CLI.

* A standalone node backed up with no load and restored into another: the two
  stores' digests are equal (and equal the digest of the backup's data), revisions
  and deadlines survive (``get(with_meta=True)``), the target's next revision is
  above the backup's, a second restore is refused without ``--force``.
* A 1x3 cluster backed up under write load (threads writing) and restored into a
  fresh cluster of two shards: every write acknowledged before the backup started
  is there, and the backup equals the source's state at the manifest's LSN (its
  writer's WAL replayed up to that LSN), as do the target shards' digests.
* A damaged backup (a flipped byte, a cut file, a missing manifest) is refused
  before anything is written; bad arguments get one clear line; entries already
  expired are left out; with auth, only the cluster key may back up or restore.
* The writer's snapshot sessions: bounded in number, closed when idle, paged within
  the byte budget, expired entries left out (in-process, memory store).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

import dkv
from dkv.auth import CLIENT_KEY, CLUSTER_KEY, init_keys, load_auth_dir
from dkv.cli.backup import MAGIC, MANIFEST, _pairs, load_cluster_key, read_manifest
from dkv.client.connection import call_once
from dkv.errors import AuthError, InvalidArgument, Unavailable
from dkv.keys import Limits
from dkv.node.backup import BackupService
from dkv.node.pipeline import LocalWriter, WritePipeline
from dkv.slots import slot_of, storage_key
from dkv.storage import Store
from dkv.storage import entry as entries
from dkv.storage.entry import now_ms
from dkv.wal.log import WriteAheadLog
from dkv.wal.memory import MemoryLog
from tests.support.cluster import Cluster
from tests.support.procs import NodeProcess, wait_until

pytestmark = pytest.mark.integration

Factory = Callable[..., NodeProcess]


def dkv_cmd(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dkv.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, f"rc {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    return proc


def pairs_digest(pairs: list[tuple[bytes, bytes]]) -> str:
    """The digest a store's ``digest`` RPC gives of these ``(user key, stored entry)`` pairs."""
    h = hashlib.sha256()
    for key, value in sorted(pairs, key=lambda p: storage_key(p[0])):
        h.update(len(key).to_bytes(4, "big") + key + len(value).to_bytes(4, "big") + value)
    return h.hexdigest()


def backup_pairs(path: Path) -> list[tuple[bytes, bytes]]:
    return [(k, b) for _, k, b in _pairs(read_manifest(str(path)))]


def digest_of(addr: str, start: int = 0, end: int = 1023, auth: Any = None) -> str:
    return call_once(addr, "digest", start, end, timeout=10, auth=auth)[1]


def in_slots(pairs: list[tuple[bytes, bytes]], ranges: list[list[int]]) -> list[tuple[bytes, bytes]]:
    return [p for p in pairs if any(a <= slot_of(p[0]) <= b for a, b in ranges)]


# -- standalone ----------------------------------------------------------------------------


def test_standalone_round_trip_keeps_data_revisions_and_deadlines(node_factory: Factory, tmp_path: Path) -> None:
    src = node_factory(name="src")
    with dkv.Client(src.addr) as c:
        c.mset({f"key:{i:05d}": f"value-{i}" * (i % 7) for i in range(3000)})
        for i in range(0, 3000, 60):
            c.set(f"key:{i:05d}", f"ttl-{i}", ex=3600)  # a deadline, a new revision
        c.set(b"bin\x00\xff", b"\x00\x01\xfe")
        c.delete("key:00001")
        c.incr("counter", 41)
        metas = {
            k: c.get(k, with_meta=True) for k in ("key:00000", "key:00002", "key:00060", "counter", b"bin\x00\xff")
        }
        applied = c.info()["applied_lsn"]
    bk = tmp_path / "bk"
    out = ok(dkv_cmd("backup", src.addr, str(bk)))
    assert "backed up 1 shard(s)" in out.stdout and "backup done: shard-0 3,001 keys" in out.stderr

    manifest = json.loads((bk / MANIFEST).read_text())
    (shard,) = manifest["shards"]
    assert manifest["format"] == "dkv-backup" and manifest["version"] == 1 and manifest["keys"] == 3001
    assert shard["slots"] == [[0, 1023]] and shard["lsn"] == applied and shard["keys"] == 3001
    (f,) = shard["files"]
    data = (bk / f["name"]).read_bytes()
    assert data.startswith(MAGIC) and f["bytes"] == len(data) == shard["bytes"]
    assert f["sha256"] == hashlib.sha256(data).hexdigest()
    pairs = backup_pairs(bk)
    assert len(pairs) == 3001 and manifest["max_rev"] == max(entries.decode(b).rev for _, b in pairs)

    dst = node_factory(name="dst")
    out = ok(dkv_cmd("restore", dst.addr, str(bk)))
    assert "restored 3,001 keys" in out.stdout and "restore done" in out.stderr
    assert digest_of(dst.addr) == digest_of(src.addr) == pairs_digest(pairs)
    with dkv.Client(dst.addr) as c:
        for k, meta in metas.items():
            assert c.get(k, with_meta=True) == meta, k
        assert c.get("key:00060", with_meta=True).expires_at is not None  # type: ignore[union-attr]
        assert c.get("key:00001") is None
        assert c.set_revision("after", "x") > manifest["max_rev"], "new revisions go above the restored ones"
        assert c.incr("counter") == 42

    # A second restore onto data: refused, nothing changed; with --force it writes over it.
    before = digest_of(dst.addr)
    out = dkv_cmd("restore", dst.addr, str(bk))
    assert out.returncode == 1 and "the target is not empty" in out.stderr and "--force" in out.stderr
    assert digest_of(dst.addr) == before
    with dkv.Client(dst.addr) as c:
        c.set("key:00002", "changed")
    ok(dkv_cmd("restore", dst.addr, str(bk), "--force", "--quiet"))
    with dkv.Client(dst.addr) as c:
        assert c.get("key:00002", with_meta=True) == metas["key:00002"]
        assert c.get("after") == b"x", "--force keeps the keys the backup does not hold"


def test_entries_expired_by_restore_time_are_left_out(node_factory: Factory, tmp_path: Path) -> None:
    src = node_factory(name="src")
    with dkv.Client(src.addr) as c:
        c.set("soon", "x", px=4000)
        c.set("stays", "y", ex=3600)
        deadline = c.get("soon", with_meta=True).expires_at  # type: ignore[union-attr]
    bk = tmp_path / "bk"
    ok(dkv_cmd("backup", src.addr, str(bk), "--quiet"))
    assert {k for k, _ in backup_pairs(bk)} == {b"soon", b"stays"}
    wait_until(lambda: time.time() > deadline + 0.05, 10, "soon's deadline to pass")
    dst = node_factory(name="dst")
    out = ok(dkv_cmd("restore", dst.addr, str(bk), "--quiet"))
    assert "restored 1 keys" in out.stdout and "(1 expired, skipped)" in out.stdout
    with dkv.Client(dst.addr) as c:
        assert c.get("soon") is None and c.get("stays") == b"y"
        assert list(c.scan()) == [(b"stays", b"y")]


def test_a_damaged_backup_is_refused_before_anything_is_written(node_factory: Factory, tmp_path: Path) -> None:
    src = node_factory(name="src")
    with dkv.Client(src.addr) as c:
        c.mset({f"k{i}": f"v{i}" for i in range(500)})
    good = tmp_path / "good"
    ok(dkv_cmd("backup", src.addr, str(good), "--quiet"))
    name = json.loads((good / MANIFEST).read_text())["shards"][0]["files"][0]["name"]
    dst = node_factory(name="dst")
    lsn = call_once(dst.addr, "info", timeout=5, auth=None)["applied_lsn"]

    def damaged(tag: str, harm: Callable[[Path], None], why: str) -> None:
        bad = tmp_path / tag
        shutil.copytree(good, bad)
        harm(bad)
        out = dkv_cmd("restore", dst.addr, str(bad))
        assert out.returncode == 1 and why in out.stderr, (tag, out.stderr)
        assert out.stderr.count("\n") == 1, "one clear line"

    def flip(d: Path) -> None:
        data = bytearray((d / name).read_bytes())
        data[len(data) // 2] ^= 0x01
        (d / name).write_bytes(bytes(data))

    def cut(d: Path) -> None:
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[:-3])

    def resum(d: Path) -> None:  # cut the file and make the manifest agree: the framing still catches it
        data = (d / name).read_bytes()[:-3]
        (d / name).write_bytes(data)
        m = json.loads((d / MANIFEST).read_text())
        m["shards"][0]["files"][0].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        (d / MANIFEST).write_text(json.dumps(m))

    damaged("flipped", flip, "the SHA-256 of")
    damaged("cut", cut, "bytes; the manifest says")
    damaged("reframed", resum, "ends inside a frame")
    damaged("no-manifest", lambda d: (d / MANIFEST).unlink(), "holds no manifest.json")
    damaged("no-data", lambda d: (d / name).unlink(), "is missing")
    damaged("not-json", lambda d: (d / MANIFEST).write_text("{"), "cannot read manifest.json")
    damaged(
        "traversal",
        lambda d: (d / MANIFEST).write_text(
            (d / MANIFEST).read_text().replace(f'"name": "{name}"', '"name": "../good/x"')
        ),
        "lacks or mangles a field",
    )
    info = call_once(dst.addr, "info", timeout=5, auth=None)
    assert info["applied_lsn"] == lsn, "nothing was written"
    with dkv.Client(dst.addr) as c:
        assert list(c.scan(limit=1)) == []


def test_bad_arguments_get_one_clear_line_and_change_nothing(node_factory: Factory, tmp_path: Path) -> None:
    node = node_factory(name="n1")
    with dkv.Client(node.addr) as c:
        c.set("a", "1")
    used = tmp_path / "used"
    used.mkdir()
    (used / "x").write_text("x")
    out = dkv_cmd("backup", node.addr, str(used))
    assert out.returncode == 1 and "is not empty" in out.stderr
    assert dkv_cmd("backup").returncode == 2 and dkv_cmd("restore", "--force").returncode == 2  # argparse: DIR

    empty = tmp_path / "nowhere"
    out = dkv_cmd("backup", "127.0.0.1:1", str(empty), "--timeout", "1")
    assert out.returncode == 1 and "Unavailable" in out.stderr
    assert list(empty.iterdir()) == [], "a failed backup leaves no files behind"
    out = dkv_cmd("restore", node.addr, str(tmp_path / "missing"))
    assert out.returncode == 1 and "is not a directory" in out.stderr
    out = dkv_cmd("backup", node.addr, str(tmp_path / "b"), "--timeout", "0")
    assert out.returncode == 1 and "--timeout must be positive" in out.stderr

    # The RPCs: typed errors, nothing written.
    lsn = call_once(node.addr, "info", timeout=5, auth=None)["applied_lsn"]
    for method, args, error in [
        ("backup_page", ("no-such-id", None, 10), Unavailable),
        ("backup_page", (["x"], None, 10), InvalidArgument),
        ("restore_write", ([[b"k", b"\x07bad"]],), InvalidArgument),
        ("restore_write", ([[b"k", entries.encode(b"v", 1)], [b"", entries.encode(b"v", 1)]],), InvalidArgument),
        ("restore_write", ("not a list",), InvalidArgument),
        ("restore_write", ([[b"k", "str"]],), InvalidArgument),
        ("restore_floor", (-1,), InvalidArgument),
        ("restore_floor", ("1",), InvalidArgument),
    ]:
        with pytest.raises(error):
            call_once(node.addr, method, *args, timeout=5, auth=None)
    sid = call_once(node.addr, "backup_open", timeout=5, auth=None)["id"]
    for args in ((sid, None, 0), (sid, None, 10_001), (sid, b"", 10), (sid, b"x" * 2000, 10)):
        with pytest.raises(InvalidArgument):
            call_once(node.addr, "backup_page", *args, timeout=5, auth=None)
    assert call_once(node.addr, "backup_close", sid, timeout=5, auth=None) is True
    assert call_once(node.addr, "backup_close", sid, timeout=5, auth=None) is False
    assert call_once(node.addr, "info", timeout=5, auth=None)["applied_lsn"] == lsn


def test_with_auth_only_the_cluster_key_backs_up_and_restores(node_factory: Factory, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    init_keys(str(keys))
    src = node_factory("--auth-dir", str(keys), name="src")
    dst = node_factory("--auth-dir", str(keys), name="dst")
    with dkv.Client(src.addr, auth=str(keys / CLIENT_KEY)) as c:
        c.mset({f"k{i}": "v" for i in range(100)})
    with pytest.raises(AuthError):
        load_cluster_key(str(keys / CLIENT_KEY))
    out = dkv_cmd("backup", src.addr, str(tmp_path / "x"), "--auth", str(keys / CLIENT_KEY))
    assert out.returncode == 1 and "need the cluster key" in out.stderr
    with pytest.raises(AuthError):  # the internal RPC itself refuses the client key
        call_once(src.addr, "backup_open", timeout=5, auth=dkv.auth.load_key(str(keys / CLIENT_KEY)))
    bk = tmp_path / "bk"
    ok(dkv_cmd("backup", src.addr, str(bk), "--auth", str(keys), "--quiet"))
    ok(dkv_cmd("restore", dst.addr, str(bk), "--quiet", env={"DKV_AUTH": str(keys / CLUSTER_KEY)}))
    creds = load_auth_dir(str(keys))
    assert digest_of(dst.addr, auth=creds) == digest_of(src.addr, auth=creds)


# -- cluster -------------------------------------------------------------------------------


def test_cluster_backup_under_load_restores_into_two_shards(cluster_1x3: Cluster, zk: str, tmp_path: Path) -> None:
    source = cluster_1x3
    acked: list[tuple[str, str, float]] = []  # key, value, when acknowledged
    stop = threading.Event()
    errors: list[BaseException] = []

    def load(t: int) -> None:
        try:
            with source.client() as c:
                i = 0
                while not stop.is_set():
                    key, value = f"t{t}-{i}", f"v{t}-{i}"
                    c.set(key, value)
                    acked.append((key, value, time.monotonic()))
                    i += 1
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=load, args=(t,), daemon=True) for t in range(3)]
    for th in threads:
        th.start()
    try:
        wait_until(lambda: len(acked) >= 300 or errors, 60, "300 acknowledged writes")
        started = time.monotonic()
        bk = tmp_path / "bk"
        out = ok(dkv_cmd("backup", "--zk", source.zk, str(bk)))
        wait_until(
            lambda: any(t > time.monotonic() - 0.5 for *_, t in acked[-3:]) or errors,
            10,
            "writes to go on after the backup",
        )
    finally:
        stop.set()
        for th in threads:
            th.join(30)
    assert not errors, errors
    assert "backup done: shard-1" in out.stderr
    before = {k: v for k, v, t in acked if t < started}
    after = [k for k, _, t in acked if t > started]
    assert len(before) >= 300 and after, "the backup ran under load"

    manifest = json.loads((bk / MANIFEST).read_text())
    (shard,) = manifest["shards"]
    assert shard["id"] == "shard-1" and shard["slots"] == [[0, 1023]]
    pairs = backup_pairs(bk)
    held = dict(pairs)
    missing = [k for k in before if k.encode() not in held]
    assert not missing, f"{len(missing)} writes acknowledged before the backup are not in it: {missing[:5]}"
    assert all(entries.decode(held[k.encode()]).value == v.encode() for k, v in before.items())

    # The backup is the source's state at the manifest's LSN: replay the writer's WAL up to it.
    writer = source.writer_of("shard-1")
    for n in source.nodes.values():
        n.kill()
    truth = Store.open("memory")
    log = WriteAheadLog(source.nodes[writer].data_dir / "wal")
    try:
        records = [r for r in log.read_from(1) if r.lsn <= shard["lsn"]]
    finally:
        log.close()
    assert records and records[0].lsn == 1 and records[-1].lsn == shard["lsn"]
    truth.apply(records)
    truth_pairs = list(truth.iter_slots(dkv.slots.ALL_SLOTS))
    assert pairs_digest(pairs) == truth.digest() == pairs_digest(truth_pairs)

    # Restore into a fresh cluster of two shards (one member each): routed by the target's map.
    from kazoo.client import KazooClient

    admin = KazooClient(zk)
    admin.start(timeout=30)
    admin.ensure_path("/target")
    admin.stop()
    admin.close()
    target = Cluster(f"{zk}/target", tmp_path / "target", shards=2, replication_factor=1, write_quorum=1)
    try:
        target.start()
        out = ok(dkv_cmd("restore", "--zk", target.zk, str(bk), env={"DKV_QUIET": "1"}))
        assert out.stderr == "" and f"restored {len(pairs):,} keys" in out.stdout
        for sid, sh in target.shard_members().items():
            addr = target.nodes[sh["writer"]].addr
            for a, b in sh["slots"]:
                assert digest_of(addr, a, b) == pairs_digest(in_slots(truth_pairs, [[a, b]])), (sid, a, b)
        with target.client() as c:
            keys = sorted(before)
            assert c.mget(keys) == [before[k].encode() for k in keys]
            assert c.set_revision("fresh", "1") > manifest["max_rev"]
    finally:
        target.stop()


# -- the writer's snapshot sessions (in-process) ------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_snapshot_sessions_are_bounded_paged_and_closed_when_idle() -> None:
    log, store = MemoryLog(), Store.open("memory")
    pipe = WritePipeline(log, store, LocalWriter(log, store, 1, offload=False), offload=False)
    clock = _Clock()
    svc = BackupService(
        store, pipe, Limits(page_bytes=4096), offload=False, max_snapshots=2, idle_timeout=10, clock=clock
    )
    try:
        assert svc.restore([[f"k{i:04d}".encode(), entries.encode(b"v" * 100, i + 1)] for i in range(300)]) == [300, 0]
        # an entry expired but not yet removed (no expirer here) is state, but no backup holds it
        past = now_ms() - 1000
        assert svc.restore([[b"dead", entries.encode(b"x", 5, past)]]) == [0, 1], "restore skips it too"
        store.install([(b"dead", entries.encode(b"x", 5, past))])
        a = svc.open()
        assert a["slots"] == [[0, 1023]] and a["lsn"] == store.applied_lsn and a["shard"] == "shard-0"
        svc.restore([[b"later", entries.encode(b"y", 999)]])  # after the snapshot: not in it
        got: list[bytes] = []
        skipped, after, pages = 0, None, 0
        while True:
            pairs, after, expired = svc.page(a["id"], after, 10_000)
            assert sum(len(k) + len(v) + 64 for k, v in pairs) <= 4096 + 200, "one page within the budget"
            got += [k for k, _ in pairs]
            skipped += expired
            pages += 1
            if after is None:
                break
        assert sorted(got) == sorted(f"k{i:04d}".encode() for i in range(300)) and len(got) == len(set(got))
        assert got == sorted(got, key=storage_key) and skipped == 1 and pages > 10
        svc.open()
        with pytest.raises(Unavailable, match="the most allowed"):
            svc.open()
        clock.t = 11
        assert svc.reap() == 2 and svc.open_snapshots == 0
        with pytest.raises(Unavailable, match="start the backup again"):
            svc.page(a["id"], None, 10)
        b = svc.open()
        assert svc.close(b["id"]) and not svc.close(b["id"])
        assert svc.floor(2**62) == store.applied_rev >= 2**62
        assert svc.restore([[b"next", entries.encode(b"z", 1)]]) == [1, 0]
        assert store.applied_rev > 2**62, "revisions continue above the floor"
    finally:
        svc.shutdown()
        pipe.close()
