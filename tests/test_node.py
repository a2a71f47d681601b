"""Integration tests of a standalone node: real `dkv serve` processes, LevelDB, zerorpc."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import msgpack
import pytest
import zerorpc

import dkv
from dkv.errors import InvalidArgument, KeyIsEmpty, Unavailable, WriteTimeout
from dkv.keys import Limits
from dkv.wal.codec import iter_records
from dkv.wal.log import WriteAheadLog
from dkv.wal.record import Op, Record
from tests.support.procs import NodeProcess, free_port, wait_until


def raw(node: NodeProcess) -> zerorpc.Client:
    c = zerorpc.Client(timeout=5)
    c.connect(f"tcp://{node.addr}")
    return c


def test_acknowledged_writes_survive_kill9(node_factory: Callable[..., NodeProcess]) -> None:
    """≥5,000 keys from several threads, kill -9 mid-stream: every acked write is there after restart."""
    node = node_factory()
    client = dkv.Client(node.addr, timeout=3)
    acked: dict[bytes, bytes] = {}
    lock = threading.Lock()
    threads_n, per_thread = 6, 4000

    def writer(t: int) -> None:
        for i in range(per_thread):
            key, value = f"t{t}:{i:05d}".encode(), f"value-{t}-{i}".encode()
            try:
                client.set(key, value)
            except (WriteTimeout, Unavailable):
                return  # the node is gone: this write's outcome is unknown
            with lock:
                acked[key] = value

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(threads_n)]
    for th in threads:
        th.start()
    wait_until(lambda: len(acked) >= 6000, 120, "6,000 acknowledged writes")
    node.kill()
    for th in threads:
        th.join(30)
    client.close()
    assert len(acked) < threads_n * per_thread, "the kill must land mid-stream"

    node.start()
    with dkv.Client(node.addr, timeout=10) as c:
        keys = sorted(acked)
        values = c.mget(keys)
    lost = [k for k, v in zip(keys, values) if v != acked[k]]
    assert not lost, f"{len(lost)} of {len(acked)} acknowledged writes lost, e.g. {lost[:5]}"


def test_bad_input_gets_clear_errors_and_changes_nothing(node: NodeProcess) -> None:
    c = raw(node)
    before = c.info()["applied_lsn"]
    replies = c.batch(
        [
            ["set", b"", b"v"],  # empty key
            ["set", b"k" * 1025, b"v"],  # key over the limit
            ["set", b"k", b"v" * (1024 * 1024 + 1)],  # value over the limit
            ["set", 42, b"v"],  # wrong key type
            ["set", b"k", {"a": 1}],  # wrong value type
            ["set", b"k"],  # wrong arity
            ["frobnicate", b"k"],  # unknown op
            "not-a-list",  # malformed op
            ["get", b"k", "strongest"],  # unknown consistency level
        ]
    )
    codes = [r[1][0] if r[0] == 1 else None for r in replies]
    assert codes == ["KEY_EMPTY"] + ["INVALID"] * 8, replies
    assert all(r[1][1] for r in replies), "every error carries a message"
    with pytest.raises(zerorpc.RemoteError) as e:
        c.batch("not a list")
    assert e.value.name == "InvalidArgument"
    assert c.info()["applied_lsn"] == before, "bad input must not reach the log"
    assert c.batch([["set", b"k", b"ok"], ["get", b"k"]])[0][0] == 0
    assert c.batch([["get", b"k"]]) == [[0, b"ok"]], "the node keeps serving"


def test_malformed_rpc_calls_get_invalid_argument_and_change_nothing(node: NodeProcess) -> None:
    """Wrong types or arity on any data RPC: a typed InvalidArgument (no Python TypeError or
    ValueError, no traceback), and the node keeps serving with its data unchanged."""
    c = raw(node)
    c.batch([["set", b"k", b"v"]])
    before = c.info()["applied_lsn"], c.digest(0, 1023)
    calls: list[tuple[str, tuple[Any, ...]]] = [
        ("mget", (123,)),
        ("mget", ([1, None],)),
        ("mset", ([1, 2],)),
        ("digest", ("a", "b")),
        ("digest", (0, 1023, 5)),
        ("get", (123,)),
        ("get", (b"k", ["x"])),
        ("set", (b"k",)),
        ("set", (b"k", 5)),
        ("delete", ({},)),
        ("scan", (5,)),
        ("scan", (b"", None, "10")),
        ("batch", (None,)),
        ("batch", ([[["get"]], [b"get", b"k"], [None] * 100_000, "x" * 1_000_000],)),
    ]
    for method, args in calls:
        try:
            result = c(method, *args)
        except zerorpc.RemoteError as e:
            assert e.name == "InvalidArgument", (method, args, e.name, e.msg)
            assert len(e.msg) < 500 and "Traceback" not in (e.traceback or ""), (method, e.msg)
        else:  # a batch answers per op: each odd op failed alone
            assert method == "batch" and all(r[0] == 1 and r[1][0] == "INVALID" for r in result), result
            assert all(len(r[1][1]) < 500 for r in result)
    assert (c.info()["applied_lsn"], c.digest(0, 1023)) == before
    assert c.get(b"k") == b"v"


def test_values_of_the_maximum_size_round_trip_in_legal_messages(node: NodeProcess) -> None:
    """100 values of 1 MiB: the client splits the mset into legal batches, the node refuses an
    over-budget batch and defers the gets that would overfill a reply, and the client's mget
    and scan page through them transparently."""
    limits = Limits()
    data = {f"big{i:03d}".encode(): bytes([i]) * limits.max_value_bytes for i in range(100)}
    keys = sorted(data)
    with dkv.Client(node.addr, timeout=30) as client:
        client.mset(data)
        assert client.mget(keys) == [data[k] for k in keys]
        assert [k for k, _ in client.scan(b"big")] == keys
        assert dict(client.scan(b"big", start=keys[50], limit=20)) == {k: data[k] for k in keys[50:70]}
    c = raw(node)
    with pytest.raises(zerorpc.RemoteError) as e:
        c.batch([["set", k, data[k]] for k in keys[:9]])  # 9 MiB of ops in one request
    assert e.value.name == "InvalidArgument" and "split it" in e.value.msg
    reply = c.batch([["get", k] for k in keys])
    served = [r for r in reply if r[0] == 0]
    assert 0 < len(served) <= limits.page_bytes // limits.max_value_bytes + 1
    assert all(r[1][0] == "DEFERRED" for r in reply[len(served) :])
    assert len(msgpack.packb(reply, use_bin_type=True)) <= limits.max_message_bytes
    page = c.scan(b"big", None, 1000)
    assert 0 < len(page) < 10 and len(msgpack.packb(page, use_bin_type=True)) <= limits.max_message_bytes


def test_client_raises_typed_errors(node: NodeProcess) -> None:
    with dkv.Client(node.addr, timeout=5) as c:
        with pytest.raises(KeyIsEmpty):
            c.set(b"", b"v")
        with pytest.raises(InvalidArgument, match="limit is 1024"):
            c.set(b"x" * 2000, b"v")
        with pytest.raises(InvalidArgument, match="must be bytes or str"):
            c.set(5, b"v")  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument):
            c.get(b"k", consistency="bogus")
        # mset is validated per key; the valid ones are written, the error is raised
        with pytest.raises(InvalidArgument):
            c.mset({b"good": b"1", b"": b"2"})
        assert c.get(b"good") == b"1"
        with pytest.raises(KeyIsEmpty):
            c.get(b"")


def test_configurable_limits(node_factory: Callable[..., NodeProcess]) -> None:
    node = node_factory("--max-key-bytes", "8", "--max-value-bytes", "16")
    with dkv.Client(node.addr, timeout=5) as c:
        c.set(b"12345678", b"x" * 16)
        with pytest.raises(InvalidArgument, match="limit is 8"):
            c.set(b"123456789", b"x")
        with pytest.raises(InvalidArgument, match="limit is 16"):
            c.set(b"k", b"x" * 17)
        assert c.get(b"12345678") == b"x" * 16


def test_api_roundtrip_and_str_keys(node: NodeProcess) -> None:
    with dkv.Client(node.addr, timeout=5) as c:
        c.set("clé", "välue")
        assert c.get("clé") == "välue".encode()
        assert c.get(b"missing") is None
        assert c.exists("clé") and not c.exists(b"missing")
        assert c.delete("clé") is True
        assert c.delete("clé") is False  # idempotent
        c.mset({f"user:{i:03d}": str(i) for i in range(250)} | {"other": "x"})
        assert c.mget(["user:007", "nope", "user:249"]) == [b"7", None, b"249"]
        got = list(c.scan("user:", limit=None, page_size=37))
        assert [k for k, _ in got] == [f"user:{i:03d}".encode() for i in range(250)]
        assert list(c.scan("user:", start="user:247")) == [
            (b"user:247", b"247"),
            (b"user:248", b"248"),
            (b"user:249", b"249"),
        ]
        assert len(list(c.scan(limit=10))) == 10
        assert c.slot_of("123456789") == 294
        info = c.cluster_info()
        assert info["shards"][0]["slots"] == [[0, 1023]]
        assert info["nodes"][0]["addr"] == node.addr


def test_client_is_thread_safe_and_coalesces(node: NodeProcess) -> None:
    """Many threads share one client; results stay per-thread correct; RPCs are batched."""
    errors: list[BaseException] = []
    with dkv.Client(node.addr, timeout=10) as c:

        def work(t: int) -> None:
            try:
                for i in range(150):
                    key = f"th{t}:{i}"
                    c.set(key, f"{t}/{i}")
                    assert c.get(key) == f"{t}/{i}".encode()
            except BaseException as e:  # surfaced below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(16)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        info = c.info()
    assert not errors, errors[:3]
    assert info["records_written"] == 16 * 150
    assert info["group_commits"] < info["records_written"], "concurrent writes must share group commits"


def test_unreachable_node_gives_typed_errors_within_timeout() -> None:
    addr = f"127.0.0.1:{free_port()}"  # nothing listens here
    with dkv.Client(addr, timeout=0.5) as c:
        with pytest.raises(Unavailable):
            c.get(b"k")
        with pytest.raises(Unavailable):  # the map can't be learned: nothing was sent
            c.set(b"k", b"v")


def test_sigterm_is_a_clean_shutdown(node_factory: Callable[..., NodeProcess]) -> None:
    node = node_factory(log_level="INFO")
    with dkv.Client(node.addr, timeout=5) as c:
        c.mset({f"k{i}": f"v{i}" for i in range(500)})
    assert node.stop() == 0
    assert "stopped" in node.log()
    node.start()
    with dkv.Client(node.addr, timeout=5) as c:
        assert c.get("k499") == b"v499"
        assert c.info()["applied_lsn"] == 500


def test_restart_replays_wal_records_missing_from_storage(tmp_path: Path) -> None:
    """Records durable in the WAL but never applied (crash between fsync and apply) are replayed."""
    data = tmp_path / "n1" / "data"
    log = WriteAheadLog(data / "wal")
    log.append([Record(1, i, Op.PUT, f"wal-{i}".encode(), f"v{i}".encode()) for i in range(1, 301)])
    log.append([Record(1, 301, Op.DELETE, b"wal-1")])
    log.close()
    node = NodeProcess(data, node_id="n1").start()
    try:
        with dkv.Client(node.addr, timeout=5) as c:
            assert c.get("wal-300") == b"v300"
            assert c.get("wal-1") is None
            assert c.info()["applied_lsn"] == 301
            c.set("after", "x")  # continues the log at 302
            assert c.info()["wal"]["last_lsn"] == 302
    finally:
        node.stop()


def test_diskless_mode_serves_and_keeps_nothing(node_factory: Callable[..., NodeProcess]) -> None:
    node = node_factory("--engine", "memory")
    with dkv.Client(node.addr, timeout=5) as c:
        c.set("k", "v")
        assert c.get("k") == b"v"
        info = c.info()
        assert info["durable"] is False and info["engine"] == "memory"
    node.stop()
    assert not node.data_dir.exists(), "diskless mode must not write to disk"
    node.start()
    with dkv.Client(node.addr, timeout=5) as c:
        assert c.get("k") is None


def test_data_dir_in_use_is_refused(node: NodeProcess, tmp_path: Path) -> None:
    second = NodeProcess(node.data_dir, node_id="n2")
    out = subprocess.run(second.argv(), capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert "in use" in out.stderr
    assert "Traceback" not in out.stderr


def test_port_in_use_is_refused(node: NodeProcess, tmp_path: Path) -> None:
    second = NodeProcess(tmp_path / "other", node.port, node_id="n2")
    out = subprocess.run(second.argv(), capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert f"cannot listen on {node.addr}" in out.stderr


def test_invalid_flags_are_refused() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "dkv.cli.main", "serve", "--engine", "rocks"], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 2 and "invalid choice" in out.stderr


def test_env_variables_configure_flags(tmp_path: Path) -> None:
    port = free_port()
    env = {
        "DKV_PORT": str(port),
        "DKV_DATA_DIR": str(tmp_path / "d"),
        "DKV_NODE_ID": "from-env",
        "DKV_LOG_LEVEL": "warning",
    }
    import os

    proc = subprocess.Popen([sys.executable, "-m", "dkv.cli.main", "serve"], env=os.environ | env)
    try:

        def answers() -> Any:
            try:
                with dkv.Client(f"127.0.0.1:{port}", timeout=0.5) as c:
                    return c.info()
            except dkv.errors.DKVError:
                return None

        info = wait_until(answers, 30, "the node configured from the environment")
        assert info["node_id"] == "from-env" and info["data_dir"] == str(tmp_path / "d")
    finally:
        proc.terminate()
        proc.wait(15)


def test_corrupt_wal_refuses_to_start_and_repair_quarantines_it(node_factory: Callable[..., NodeProcess]) -> None:
    """Issue 9: a flipped byte mid-segment must not silently cost acknowledged writes (DESIGN G6)."""
    node = node_factory()
    acked: dict[bytes, bytes] = {}
    with dkv.Client(node.addr, timeout=10) as c:
        for start in range(0, 2000, 100):
            chunk = {f"key-{i:04d}".encode(): f"value-{i}".encode() for i in range(start, start + 100)}
            c.mset(chunk)
            acked.update(chunk)
    node.kill()
    [seg] = sorted((node.data_dir / "wal").glob("wal-*.log"))
    data = seg.read_bytes()
    frames = list(iter_records(data))
    assert len(frames) == 2000
    middle = len(data) // 2
    bad_start = next(start for _, start, end in frames if end > middle)
    before = {rec.key: rec.value for rec, _, end in frames if end <= bad_start}
    assert 900 <= len(before) < 1100
    damaged = bytearray(data)
    damaged[middle] ^= 0x01
    seg.write_bytes(bytes(damaged))

    logged = len(node.log(None))
    node.start(wait=False)

    def answers() -> bool:
        c = zerorpc.Client(timeout=0.5, heartbeat=None)
        try:
            c.connect(f"tcp://{node.addr}")
            return bool(c.ping() == "pong")
        except Exception:
            return False
        finally:
            c.close()

    wait_until(lambda: not node.running or answers(), 60, "the node to exit or answer")
    assert not node.running, "dkv serve started on a corrupt WAL"
    assert node.proc is not None and node.proc.returncode == 1
    stderr = node.log(None)[logged:]
    assert "Traceback" not in stderr
    [line] = [ln for ln in stderr.splitlines() if ln.startswith("dkv serve:")]
    assert "CorruptLog" in line and str(seg) in line and f"offset {bad_start}" in line
    assert "--wal-repair" in line
    assert seg.read_bytes() == bytes(damaged), "refusing to start must not touch the log"

    node.extra.append("--wal-repair")
    node.start()
    [quarantine] = list((node.data_dir / "wal").glob("quarantine-*.bin"))
    assert quarantine.read_bytes() == bytes(damaged[bad_start:])
    with dkv.Client(node.addr, timeout=10) as c:
        keys = sorted(acked)
        got = dict(zip(keys, c.mget(keys)))
        lost = [k for k in before if got[k] != before[k]]
        assert not lost, f"{len(lost)} acknowledged key(s) from before the corruption lost, e.g. {lost[:3]}"
        wrong = [k for k, v in got.items() if v is not None and v != acked[k]]
        assert not wrong, f"keys with a value that was never acknowledged: {wrong[:3]}"
        applied = c.info()["applied_lsn"]
        c.set("after-repair", "x")  # continues after what storage holds: no LSN is reused
        assert c.info()["applied_lsn"] == applied + 1 and applied >= len(before)
        assert c.get("after-repair") == b"x"
