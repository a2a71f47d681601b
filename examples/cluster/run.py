#!/usr/bin/env python3
"""Run a dkv cluster on this machine: one ``dkv serve`` process per node, one ZooKeeper.

Usage (from the repository root, with a ZooKeeper running: ``make zk-up``)::

    .venv/bin/python examples/cluster/run.py            # 2 shards x 3 nodes, ports 7101-7106
                                                        # (HTTP /metrics, /health, /v1: 8101-8106)
    .venv/bin/python examples/cluster/run.py --shards 3 --replicas-per-shard 2 --fresh

Nodes ``node-1`` .. ``node-N`` (N = shards x replicas-per-shard) are started one
at a time, each only after the controller has given the previous one its place.
The controller fills a shard before it opens the next, so ``node-1``,
``node-(R+1)``, ... become the writers and the nodes after each of them its
replicas. Once every node answers and the cluster map shows every shard with a
live writer and all 1024 slots owned, the script prints the node table and the
command to connect with, then waits. Ctrl-C (SIGINT) or SIGTERM stops every node
with SIGTERM (SIGKILL for any still running after ``--stop-timeout``) and exits 0.

Each node keeps its data in ``DATA_DIR/node-K/`` and logs to ``DATA_DIR/node-K.log``.
The cluster lives under the ZooKeeper chroot ``--chroot``; running the script
again without ``--fresh`` restarts the same cluster with its data. ``--fresh``
deletes the nodes' data and logs and the chroot first.

Progress goes to stderr (logging); the table and the connect line go to stdout.
Exit status: 0 after a clean stop, 1 on any error (ZooKeeper unreachable, a node
that exits or never joins, ...), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Sequence

try:
    from dkv.slots import NUM_SLOTS
except ImportError:
    sys.exit(
        "examples/cluster/run.py: cannot import dkv; run it with the project's virtualenv "
        "(.venv/bin/python, set up by `make install`)"
    )

HERE = Path(__file__).resolve().parent
POLL_INTERVAL = 0.25
#: seconds one probe (info / cluster_info) of a node may take
PROBE_TIMEOUT = 2.0

log = logging.getLogger("cluster")


class ClusterError(Exception):
    """A failure that ends the run with one clear message (exit 1)."""


class Stopped(Exception):
    """SIGINT/SIGTERM arrived while starting up."""


# -- arguments -------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="examples/cluster/run.py",
        description="Start a local dkv cluster (one `dkv serve` process per node) against a running "
        "ZooKeeper; Ctrl-C stops it.",
    )
    p.add_argument(
        "--zk",
        default="127.0.0.1:2181",
        metavar="HOST:PORT[,HOST:PORT...]",
        help="ZooKeeper to use (default %(default)s; `make zk-up` starts one)",
    )
    p.add_argument(
        "--chroot", default="/dkv-example", help="ZooKeeper path the cluster lives under (default %(default)s)"
    )
    p.add_argument("--shards", type=int, default=2, help="number of shards (default %(default)s)")
    p.add_argument(
        "--replicas-per-shard",
        type=int,
        default=3,
        metavar="R",
        help="nodes per shard, writer included: the replication factor (default %(default)s)",
    )
    p.add_argument(
        "--write-quorum",
        type=int,
        default=None,
        metavar="Q",
        help="members that must hold a write before it is acknowledged, writer included "
        "(default 2, or 1 with --replicas-per-shard 1)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address the nodes listen on (default %(default)s)")
    p.add_argument(
        "--base-port", type=int, default=7101, help="port of node-1; node-K gets BASE_PORT+K-1 (default %(default)s)"
    )
    p.add_argument(
        "--http-base-port",
        type=int,
        default=None,
        metavar="PORT",
        help="HTTP port (/metrics, /health, /v1) of node-1; node-K gets PORT+K-1 (default BASE_PORT+1000; 0: no HTTP)",
    )
    p.add_argument(
        "--data-dir", type=Path, default=HERE / "data", help="nodes' data and logs (default examples/cluster/data)"
    )
    p.add_argument(
        "--session-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="nodes' ZooKeeper session timeout: how soon a dead writer is replaced (default %(default)s)",
    )
    p.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="nodes' log level (default %(default)s)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long each node may take to join, and the cluster to settle (default %(default)s)",
    )
    p.add_argument(
        "--stop-timeout",
        type=float,
        default=15.0,
        metavar="SECONDS",
        help="how long the nodes may take to stop before they are killed (default %(default)s)",
    )
    p.add_argument(
        "--fresh", action="store_true", help="delete the nodes' data and logs and the ZooKeeper chroot first"
    )
    p.add_argument(
        "--auth",
        action="store_true",
        help="run the nodes with auth (CURVE, ZooKeeper ACLs), with the keys in DATA_DIR/auth "
        "(made by `dkv auth init` on first use); needed for a non-loopback --host",
    )
    args = p.parse_args(argv)

    if args.write_quorum is None:
        args.write_quorum = min(2, args.replicas_per_shard)
    if args.shards < 1 or args.replicas_per_shard < 1:
        p.error("--shards and --replicas-per-shard must be at least 1")
    if not 1 <= args.write_quorum <= args.replicas_per_shard:
        p.error(f"--write-quorum must be between 1 and --replicas-per-shard ({args.replicas_per_shard})")
    if "/" in args.zk:
        p.error("give the ZooKeeper path with --chroot, not inside --zk")
    chroot = args.chroot.rstrip("/")
    if not chroot.startswith("/") or chroot in ("", "/zookeeper") or "//" in chroot:
        p.error(f"--chroot must be a ZooKeeper path below / such as /dkv-example, not {args.chroot!r}")
    args.chroot = chroot
    last_port = args.base_port + args.shards * args.replicas_per_shard - 1
    if not (0 < args.base_port and last_port < 65536):
        p.error(f"ports {args.base_port}..{last_port} are not all valid")
    if args.http_base_port is None:
        args.http_base_port = args.base_port + 1000
    n = args.shards * args.replicas_per_shard
    if args.http_base_port and not (0 < args.http_base_port and args.http_base_port + n - 1 < 65536):
        p.error(f"HTTP ports {args.http_base_port}..{args.http_base_port + n - 1} are not all valid")
    if args.http_base_port and abs(args.http_base_port - args.base_port) < n:
        p.error("--http-base-port's range overlaps --base-port's")
    if args.timeout <= 0 or args.stop_timeout <= 0 or args.session_timeout <= 0:
        p.error("--timeout, --stop-timeout and --session-timeout must be positive")
    args.data_dir = args.data_dir.resolve()
    args.auth_dir = args.data_dir / "auth" if args.auth else None
    return args


def ensure_keys(args: argparse.Namespace) -> Any:
    """The cluster key of an --auth run (made on first use), or None."""
    if args.auth_dir is None:
        return None
    from dkv.auth import CLUSTER_KEY, init_keys, load_auth_dir

    if not (args.auth_dir / CLUSTER_KEY).exists():
        init_keys(str(args.auth_dir))
        log.info("made keys in %s (dkv auth init)", display(args.auth_dir))
    return load_auth_dir(str(args.auth_dir))


def client_key(args: argparse.Namespace) -> str | None:
    return str(args.auth_dir / "client.key") if args.auth_dir is not None else None


# -- nodes ---------------------------------------------------------------------------------


@dataclass
class Node:
    """One ``dkv serve`` process of the cluster."""

    index: int
    host: str
    port: int
    data_root: Path
    #: HTTP port (/metrics, /health, /v1); 0: none
    http_port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    client: Any = None  # dkv.Client talking to this node only
    exit_reported: bool = False
    #: why the last probe failed (shown when a wait times out)
    last_error: str = ""

    @property
    def id(self) -> str:
        return f"node-{self.index}"

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def data_dir(self) -> Path:
        return self.data_root / self.id

    @property
    def log_path(self) -> Path:
        return self.data_root / f"{self.id}.log"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def argv(self, args: argparse.Namespace, zk: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "dkv.cli.main",
            "serve",
            "--node-id",
            self.id,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
            "--zk",
            zk,
            "--replication-factor",
            str(args.replicas_per_shard),
            "--write-quorum",
            str(args.write_quorum),
            "--session-timeout",
            f"{args.session_timeout:g}",
            "--log-level",
            args.log_level,
            *(["--http-port", str(self.http_port)] if self.http_port else []),
            *(["--auth-dir", str(args.auth_dir)] if args.auth_dir is not None else []),
        ]

    def start(self, args: argparse.Namespace, zk: str) -> None:
        import dkv

        argv = self.argv(args, zk)
        self.data_root.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            out.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
            out.flush()
            # Its own process group: a Ctrl-C at the terminal reaches only this
            # script, which then stops the nodes in order.
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, process_group=0
            )
        self.client = dkv.Client(self.addr, timeout=PROBE_TIMEOUT, auth=client_key(args))
        log.info("started %s on %s (pid %d, log %s)", self.id, self.addr, self.proc.pid, display(self.log_path))

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join("    " + line for line in text[-lines:])

    def probe(self, method: str) -> Any:
        """``info`` or ``cluster_info`` from this node; None when it does not answer."""
        try:
            return getattr(self.client, method)()
        except Exception as e:  # not up yet, or going down: the caller keeps polling
            self.last_error = f"{method}: {type(e).__name__}: {e}"
            log.debug("%s: %s", self.id, self.last_error)
            return None

    def close_client(self) -> None:
        if self.client is not None:
            try:
                self.client.close()
            except Exception:
                pass
            self.client = None


def display(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def check_ports_free(nodes: list[Node]) -> None:
    """Fail early when a node's port is taken (as the node binds: connections in TIME_WAIT are fine)."""
    for n in nodes:
        for port, flag in ((n.port, "--base-port"), (n.http_port, "--http-base-port")):
            if not port:
                continue
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind((n.host, port))
                except OSError as e:
                    raise ClusterError(
                        f"cannot use {n.host}:{port} for {n.id}: {e.strerror or e} "
                        f"(is a cluster already running? {flag} picks other ports)"
                    ) from None


def wipe(data_root: Path) -> None:
    """Delete the nodes' data directories and logs (only ``node-*`` entries)."""
    if not data_root.is_dir():
        return
    for entry in sorted(data_root.glob("node-*")):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    log.info("--fresh: deleted the node data and logs in %s", display(data_root))


# -- ZooKeeper --------------------------------------------------------------------------


def zookeeper_port_open(hosts: str) -> bool:
    """Whether any server of the connection string accepts a TCP connection (a quick first check)."""
    for server in hosts.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port or 2181)), timeout=2):
                return True
        except (OSError, ValueError):
            continue
    return False


def prepare_zookeeper(hosts: str, chroot: str, fresh: bool, timeout: float = 5.0, creds: Any = None) -> None:
    """Check that ZooKeeper answers, then create ``chroot`` (deleting it first when ``fresh``)."""
    from kazoo.client import KazooClient

    unreachable = ClusterError(
        f"ZooKeeper is not reachable at {hosts} (start one with `make zk-up`, or give another with --zk)"
    )
    if not zookeeper_port_open(hosts):
        raise unreachable

    quiet = logging.getLogger("kazoo")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # one clear line instead of kazoo's retry warnings
    zk: Any = None
    try:
        try:
            from dkv.auth import kazoo_args

            zk = KazooClient(hosts=hosts, timeout=timeout, **kazoo_args(creds))
            zk.start(timeout=timeout)
        except Exception:
            raise unreachable from None
        if fresh and zk.exists(chroot):
            from kazoo.exceptions import NoAuthError

            try:
                zk.delete(chroot, recursive=True)
            except NoAuthError:
                raise ClusterError(
                    f"ZooKeeper refused to delete {chroot}: its znodes are protected by a "
                    "cluster key (run with --auth to use the keys in DATA_DIR/auth)"
                ) from None
            log.info("--fresh: deleted ZooKeeper path %s", chroot)
        zk.ensure_path(chroot)
    finally:
        if zk is not None:
            zk.stop()
            zk.close()
        quiet.setLevel(level)


# -- the cluster map ----------------------------------------------------------------------


def covered_slots(info: dict[str, Any]) -> int:
    owned: set[int] = set()
    for shard in info.get("shards", []):
        for start, end in shard.get("slots", []):
            owned.update(range(max(0, start), min(end, NUM_SLOTS - 1) + 1))
    return len(owned)


def node_problem(info: dict[str, Any] | None, node: Node) -> str | None:
    """Why ``node`` is not yet a live member of a shard in the map ``info`` (None when it is)."""
    if info is None:
        return "no cluster map yet"
    entry = next((e for e in info.get("nodes", []) if e.get("id") == node.id), None)
    if entry is None:
        return f"{node.id} is not in the cluster map"
    if entry.get("status") != "up":
        return f"{node.id} is {entry.get('status')}"
    if not entry.get("shard") or entry.get("role") not in ("writer", "replica"):
        return f"{node.id} has no shard yet (role {entry.get('role')})"
    return None


def cluster_problem(info: dict[str, Any], nodes: list[Node], shards: int) -> str | None:
    """Why the map ``info`` is not yet the finished cluster (None when it is): every node a
    live shard member, at least ``shards`` shards, each with a live writer, all slots owned."""
    for node in nodes:
        problem = node_problem(info, node)
        if problem:
            return problem
    status = {e.get("id"): e.get("status") for e in info.get("nodes", [])}
    all_shards = info.get("shards", [])
    if len(all_shards) < shards:
        return f"{len(all_shards)} of {shards} shards exist"
    for shard in all_shards:
        writer = shard.get("writer")
        if not writer:
            return f"{shard.get('id')} has no writer"
        if status.get(writer) != "up":
            return (
                f"{shard.get('id')}'s writer {writer} is down (left from an earlier run with other "
                f"options? --fresh starts over)"
            )
    covered = covered_slots(info)
    if covered < NUM_SLOTS:
        return f"the slot map covers {covered} of {NUM_SLOTS} slots"
    return None


def check_cluster_mode(node: Node, info: dict[str, Any] | None) -> None:
    if info is not None and info.get("mode") != "cluster":
        raise ClusterError(
            f"{node.id} runs in {info.get('mode')!r} mode although it was started with --zk: "
            f"this dkv has no cluster mode"
        )


def slot_ranges(shard: dict[str, Any]) -> str:
    return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in shard.get("slots", [])) or "-"


def render_table(info: dict[str, Any], nodes: list[Node], zk: str) -> str:
    """The node and shard tables printed once the cluster is up."""
    ours = {n.id: n for n in nodes}
    rows = [("NODE", "ADDR", "ROLE", "SHARD", "STATUS", "PID", "LOG")]
    entries = sorted(
        info.get("nodes", []), key=lambda e: (ours[e["id"]].index if e["id"] in ours else 1 << 30, e["id"])
    )
    for e in entries:
        node = ours.get(e["id"])
        rows.append(
            (
                e["id"],
                e.get("addr") or "-",
                e.get("role") or "-",
                e.get("shard") or "-",
                e.get("status") or "-",
                str(node.pid) if node else "-",
                display(node.log_path) if node else "-",
            )
        )
    shard_rows = [("SHARD", "EPOCH", "WRITER", "REPLICAS", "SLOTS")]
    for s in info.get("shards", []):
        shard_rows.append(
            (
                s["id"],
                str(s.get("epoch", "-")),
                s.get("writer") or "-",
                ",".join(s.get("replicas", [])) or "-",
                slot_ranges(s),
            )
        )
    writers = sum(1 for s in info.get("shards", []) if s.get("writer"))
    head = (
        f"dkv cluster up: {plural(len(info.get('shards', [])), 'shard')} ({writers} with a writer), "
        f"{plural(len(entries), 'node')}, ZooKeeper {zk}"
    )
    return "\n".join([head, "", _columns(rows), "", _columns(shard_rows)])


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _columns(rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns, two spaces apart."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def dkv_command() -> str:
    """How to run the ``dkv`` console script of this interpreter's environment."""
    script = Path(sys.executable).parent / "dkv"
    return display(script) if script.exists() else "dkv"


# -- the run -----------------------------------------------------------------------------


class ClusterRun:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.zk = args.zk + args.chroot
        n = args.shards * args.replicas_per_shard
        self.nodes = [
            Node(
                k,
                args.host,
                args.base_port + k - 1,
                args.data_dir,
                args.http_base_port + k - 1 if args.http_base_port else 0,
            )
            for k in range(1, n + 1)
        ]
        self.signals = 0

    # signals: the handler only counts; the loops below look at the count
    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signals += 1
        if self.signals == 1:
            log.info("received %s; stopping the cluster", signal.Signals(signum).name)
        else:
            log.warning("received %s again; killing the nodes", signal.Signals(signum).name)

    def sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.signals and time.monotonic() < end:
            time.sleep(min(0.05, max(0.0, end - time.monotonic())))

    def wait_for(self, what: str, cond: Callable[[], str | None]) -> None:
        """Poll ``cond`` (None = done, else why not) until done; fail at the deadline."""
        deadline = time.monotonic() + self.args.timeout
        while True:
            if self.signals:
                raise Stopped
            self.check_alive()
            reason = cond()
            if reason is None:
                return
            if time.monotonic() > deadline:
                raise ClusterError(f"timed out after {self.args.timeout:g}s waiting for {what}: {reason}")
            self.sleep(POLL_INTERVAL)

    def check_alive(self) -> None:
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is not None:
                raise ClusterError(
                    f"{node.id} exited with code {node.proc.returncode}; the end of "
                    f"{display(node.log_path)}:\n{node.log_tail()}"
                )

    def start(self) -> dict[str, Any]:
        args = self.args
        if args.fresh:
            wipe(args.data_dir)
        check_ports_free(self.nodes)
        prepare_zookeeper(args.zk, args.chroot, args.fresh, creds=ensure_keys(args))
        log.info(
            "starting %d nodes (%d shards x %d) under ZooKeeper %s, data in %s",
            len(self.nodes),
            args.shards,
            args.replicas_per_shard,
            self.zk,
            display(args.data_dir),
        )
        for node in self.nodes:
            if self.signals:
                raise Stopped
            node.start(args, self.zk)

            def answers(node: Node = node) -> str | None:
                return None if node.probe("info") else f"no answer yet ({node.last_error})"

            self.wait_for(f"{node.id} to answer", answers)
            place: dict[str, Any] = {}

            def joined(node: Node = node, place: dict[str, Any] = place) -> str | None:
                info = node.probe("cluster_info")
                if info is None:
                    return f"no cluster map yet ({node.last_error})"
                check_cluster_mode(node, info)
                problem = node_problem(info, node)
                if problem is None:
                    place.update(next(e for e in info["nodes"] if e.get("id") == node.id))
                return problem

            self.wait_for(f"{node.id} to join a shard", joined)
            log.info("%s joined %s as %s", node.id, place.get("shard"), place.get("role"))

        last: dict[str, Any] = {}

        def settled() -> str | None:
            for node in self.nodes:
                if node.probe("info") is None:
                    return f"{node.id} does not answer ({node.last_error})"
            info = self.nodes[0].probe("cluster_info")
            if info is None:
                return f"{self.nodes[0].id} does not answer ({self.nodes[0].last_error})"
            last.clear()
            last.update(info)
            return cluster_problem(info, self.nodes, args.shards)

        self.wait_for("the cluster map to be complete", settled)
        return last

    def report(self, info: dict[str, Any]) -> None:
        dkv = dkv_command()
        writers = " ".join(n.addr for n in self.nodes if any(s.get("writer") == n.id for s in info.get("shards", [])))
        print(render_table(info, self.nodes, self.zk), flush=True)
        auth = f" --auth {display(Path(key))}" if (key := client_key(self.args)) else ""
        print(f"\nconnect: {dkv} cli{auth} --zk {self.zk}", flush=True)
        print(f"     or: {dkv} cli{auth} {writers}", flush=True)
        for i, node in enumerate(n for n in self.nodes if n.http_port):
            print(
                f"{'metrics:' if i == 0 else '':9}http://{node.host}:{node.http_port}/metrics ({node.id})", flush=True
            )

    def wait(self) -> None:
        """Until a signal; a node that exits meanwhile is reported (and left down)."""
        log.info("cluster is up; Ctrl-C stops it")
        while not self.signals:
            for node in self.nodes:
                if node.proc is not None and node.proc.poll() is not None and not node.exit_reported:
                    node.exit_reported = True
                    log.warning(
                        "%s (pid %d) exited with code %s; see %s",
                        node.id,
                        node.proc.pid,
                        node.proc.returncode,
                        display(node.log_path),
                    )
            self.sleep(0.5)

    def stop(self) -> None:
        """SIGTERM every node, wait for them, SIGKILL what is left after --stop-timeout."""
        for node in self.nodes:
            node.close_client()
        running = [n for n in self.nodes if n.running()]
        if not running:
            return
        log.info("stopping %d node(s) with SIGTERM", len(running))
        for node in running:
            assert node.proc is not None
            node.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.args.stop_timeout
        signals_before = self.signals  # one more signal while stopping: kill at once
        while any(n.running() for n in running):
            if time.monotonic() > deadline or self.signals > signals_before:
                for node in running:
                    if node.running():
                        assert node.proc is not None
                        why = "asked twice" if self.signals > signals_before else "did not stop in time"
                        log.warning("%s (pid %d): %s; killing it", node.id, node.proc.pid, why)
                        node.proc.kill()
                break
            time.sleep(0.05)
        for node in running:
            assert node.proc is not None
            code = node.proc.wait()
            log.info("%s stopped (exit code %d)", node.id, code)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    run = ClusterRun(args)
    previous = {sig: signal.signal(sig, run.on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        info = run.start()
        run.report(info)
        run.wait()
    except Stopped:
        pass
    except ClusterError as e:
        log.error("%s", e)
        code = 1
    finally:
        run.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code


if __name__ == "__main__":
    sys.exit(main())
