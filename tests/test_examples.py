"""The examples as a user runs them: ``examples/cluster/run.py``, ``scripts/zk.sh`` and ``examples/locks.py``."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import IO, Any, Iterator

import pytest

from tests.support import zookeeper
from tests.support.procs import NodeProcess, free_port

ROOT = Path(__file__).resolve().parent.parent
RUN_PY = ROOT / "examples" / "cluster" / "run.py"
ZK_SH = ROOT / "scripts" / "zk.sh"

#: how long the example may take to start 4 nodes and settle the map
START_DEADLINE = 180.0
#: how long it may take to stop after SIGINT (the brief's limit)
STOP_DEADLINE = 30.0


# -- helpers ------------------------------------------------------------------------------


def free_port_range(n: int) -> int:
    """A base port such that base .. base+n-1 are all free right now on 127.0.0.1."""
    for _ in range(200):
        base = free_port()
        if base + n >= 65536:
            continue
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"found no {n} consecutive free ports")


def is_dkv_node(pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) ``dkv serve`` process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except (OSError, IndexError):
        return False
    return state != "Z" and b"dkv.cli.main" in cmdline


def pump(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line.rstrip("\n"))
    lines.put(None)


def read_until_connect_line(lines: queue.Queue[str | None], deadline: float) -> list[str]:
    """stdout lines up to and including ``connect: ...``; fails on EOF or at the deadline."""
    seen: list[str] = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError("no connect line before the deadline; stdout so far:\n" + "\n".join(seen))
        try:
            line = lines.get(timeout=remaining)
        except queue.Empty:
            continue
        if line is None:
            raise AssertionError("run.py closed stdout before the connect line:\n" + "\n".join(seen))
        seen.append(line)
        if line.startswith("connect:"):
            return seen


def node_rows(stdout: list[str]) -> list[dict[str, str]]:
    """The node table: NODE ADDR ROLE SHARD STATUS PID LOG."""
    header = next(i for i, line in enumerate(stdout) if line.split()[:2] == ["NODE", "ADDR"])
    rows = []
    for line in stdout[header + 1 :]:
        if not line.strip():
            break
        cols = line.split(maxsplit=6)
        rows.append(dict(zip(["id", "addr", "role", "shard", "status", "pid", "log"], cols, strict=False)))
    return rows


def delete_zk_path(hosts: str, path: str, kazoo_args: dict[str, Any] | None = None) -> None:
    from kazoo.client import KazooClient

    zk = KazooClient(hosts, **(kazoo_args or {}))
    zk.start(timeout=30)
    try:
        zk.delete(path, recursive=True)
    except Exception:
        pass
    finally:
        zk.stop()
        zk.close()


# -- examples/cluster/run.py --------------------------------------------------------------


@pytest.fixture
def example_chroot(zk_server: zookeeper.ZooKeeper) -> Iterator[tuple[str, str]]:
    """(ZooKeeper hosts, a fresh chroot for the example); the chroot is deleted afterwards."""
    hosts, _, base = zk_server.hosts.partition("/")
    chroot = (f"/{base}" if base else "") + f"/dkv-example-test-{uuid.uuid4().hex[:10]}"
    yield hosts, chroot
    delete_zk_path(hosts, chroot)


@pytest.mark.integration
@pytest.mark.zk
@pytest.mark.parametrize("auth", [False, True], ids=["no-auth", "auth"])
def test_cluster_example_starts_two_shards_and_stops_on_sigint(
    example_chroot: tuple[str, str], tmp_path: Path, auth: bool
) -> None:
    hosts, chroot = example_chroot
    base_port = free_port_range(4)
    http_base = free_port_range(4)
    while abs(http_base - base_port) < 4:
        http_base = free_port_range(4)
    stderr_path = tmp_path / "run.stderr"
    argv = [
        sys.executable,
        str(RUN_PY),
        "--zk",
        hosts,
        "--chroot",
        chroot,
        "--shards",
        "2",
        "--replicas-per-shard",
        "2",
        "--base-port",
        str(base_port),
        "--data-dir",
        str(tmp_path / "data"),
        "--http-base-port",
        str(http_base),
        *(["--auth"] if auth else []),
    ]
    client_key = str(tmp_path / "data" / "auth" / "client.key") if auth else None
    pids: list[int] = []
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen(
            argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, text=True, bufsize=1
        )
    lines: queue.Queue[str | None] = queue.Queue()
    assert proc.stdout is not None
    threading.Thread(target=pump, args=(proc.stdout, lines), daemon=True).start()

    def context() -> str:
        return f"\n-- run.py stderr --\n{stderr_path.read_text(errors='replace')[-6000:]}"

    try:
        try:
            stdout = read_until_connect_line(lines, time.monotonic() + START_DEADLINE)
        except AssertionError as e:
            raise AssertionError(f"{e}{context()}") from None

        rows = node_rows(stdout)
        pids = [int(r["pid"]) for r in rows if r.get("pid", "-").isdigit()]
        assert [r["id"] for r in rows] == ["node-1", "node-2", "node-3", "node-4"], stdout
        assert {r["addr"] for r in rows} == {f"127.0.0.1:{base_port + i}" for i in range(4)}, stdout
        assert all(r["status"] == "up" for r in rows), stdout
        assert len(pids) == 4, stdout
        writers = [r for r in rows if r["role"] == "writer"]
        assert len(writers) == 2 and len({w["shard"] for w in writers}) == 2, stdout
        members: dict[str, int] = {}
        for r in rows:
            members[r["shard"]] = members.get(r["shard"], 0) + 1
        assert sorted(members.values()) == [2, 2], stdout
        assert all((ROOT / r["log"]).is_file() for r in rows), stdout  # relative paths are to ROOT
        assert stdout[-1].startswith("connect: "), stdout
        assert stdout[-1].endswith((f" cli --auth {client_key}" if auth else " cli") + f" --zk {hosts}{chroot}"), stdout

        # the cluster it started serves keys from both shards
        import dkv

        with dkv.Client([r["addr"] for r in rows], timeout=15, auth=client_key) as client:
            for i in range(20):
                client.set(f"example-key-{i}", f"v{i}")
            assert [client.get(f"example-key-{i}") for i in range(20)] == [f"v{i}".encode() for i in range(20)]

        # each node's metrics URL is printed after the connect lines, and serves
        urls = []
        while len(urls) < 4:
            line = lines.get(timeout=10)
            assert line is not None, stdout
            if "/metrics" in line:
                urls.append(line.split()[-2])
        assert urls == [f"http://127.0.0.1:{http_base + i}/metrics" for i in range(4)], urls
        import urllib.request

        with urllib.request.urlopen(urls[0], timeout=10) as resp:
            assert b"dkv_role{" in resp.read()

        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(STOP_DEADLINE)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"run.py did not exit within {STOP_DEADLINE:g}s of SIGINT{context()}") from None
        assert code == 0, f"run.py exited with {code}{context()}"
        left = [pid for pid in pids if is_dkv_node(pid)]
        assert not left, f"dkv node processes left running: {left}{context()}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in pids:  # never leak nodes, whatever failed above
            if is_dkv_node(pid):
                os.kill(pid, signal.SIGKILL)
        if auth:  # only the cluster key may delete the znodes the nodes made
            from dkv.auth import load_auth_dir

            delete_zk_path(hosts, chroot, load_auth_dir(str(tmp_path / "data" / "auth")).kazoo_args())


def test_cluster_example_reports_unreachable_zookeeper_in_one_line(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    r = subprocess.run(
        [
            sys.executable,
            str(RUN_PY),
            "--zk",
            f"127.0.0.1:{port}",
            "--data-dir",
            str(tmp_path / "data"),
            "--base-port",
            str(free_port_range(6)),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1, r
    assert r.stdout == ""
    errors = [line for line in r.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and f"not reachable at 127.0.0.1:{port}" in errors[0] and "make zk-up" in errors[0], (
        r.stderr
    )
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "data").exists()


# -- scripts/zk.sh -------------------------------------------------------------------------


def zk_sh_env(tmp_path: Path, port: int) -> dict[str, str]:
    """Environment that points zk.sh at a private port and state dir, and at no Docker engine."""
    return dict(
        os.environ, ZK_PORT=str(port), ZK_DIR=str(tmp_path / "zk"), DOCKER_HOST="unix:///nonexistent/docker.sock"
    )


def zk_sh(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(ZK_SH), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_zk_sh_status_when_nothing_runs(tmp_path: Path) -> None:
    port = free_port()
    r = zk_sh("status", env=zk_sh_env(tmp_path, port))
    assert r.returncode == 3, r
    assert f"not running on 127.0.0.1:{port}" in r.stdout and "make zk-up" in r.stdout, r
    assert not (tmp_path / "zk").exists(), "status must not create anything"


def test_zk_sh_usage(tmp_path: Path) -> None:
    r = zk_sh("bogus", env=zk_sh_env(tmp_path, free_port()))
    assert r.returncode == 2 and "usage: scripts/zk.sh up|down|status" in r.stderr, r


@pytest.mark.zk
@pytest.mark.skipif(
    not zookeeper.local_zookeeper_installed() or shutil.which("setsid") is None,
    reason="needs Debian's zookeeper package (java, /usr/share/java/zookeeper.jar)",
)
def test_zk_sh_up_status_down_local(tmp_path: Path) -> None:
    port = free_port()
    env = zk_sh_env(tmp_path, port)
    try:
        r = zk_sh("up", env=env)
        assert r.returncode == 0 and f"runs locally on 127.0.0.1:{port}" in r.stdout, r
        assert zookeeper.ruok("127.0.0.1", port)
        r = zk_sh("up", env=env)
        assert r.returncode == 0 and "already running" in r.stdout, r
        r = zk_sh("status", env=env)
        assert r.returncode == 0 and f"running locally on 127.0.0.1:{port}" in r.stdout, r
    finally:
        r = zk_sh("down", env=env)
    assert r.returncode == 0 and "stopped the local ZooKeeper" in r.stdout, r
    assert not zookeeper.ruok("127.0.0.1", port)
    r = zk_sh("status", env=env)
    assert r.returncode == 3, r
    assert (tmp_path / "zk" / "data").is_dir(), "down keeps the data"


# -- examples/locks.py ---------------------------------------------------------------------


@pytest.mark.integration
def test_locks_example_runs_against_a_standalone_node(node: NodeProcess) -> None:
    r = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "locks.py"), "--addr", node.addr, "--workers", "3", "--rounds", "3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # this checkout's dkv
    assert r.returncode == 0, r
    assert "9 holders, tokens strictly increasing" in r.stdout, r.stdout
    assert "stale holder refused: token" in r.stdout, r.stdout
    assert "another acquire times out" in r.stdout, r.stdout
