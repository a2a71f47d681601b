"""A real dkv cluster for tests: node processes against a real ZooKeeper chroot.

:class:`Cluster` starts nodes one at a time (so the controller's assignment is
deterministic: the first node of each group of ``replication_factor`` becomes a
shard writer), waits until every shard is formed and in sync, and offers the
probes the tests and the fault harness need: roles, per-member digests,
convergence, killing and restarting members.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import zerorpc

import dkv
from dkv.auth import CLIENT_KEY, Credentials, init_keys, kazoo_args, load_auth_dir
from dkv.transport import close_client, secure_client
from tests.support.procs import NodeProcess, wait_until


def auth_by_default() -> bool:
    """``DKV_TEST_AUTH=1``: every test cluster runs with auth (CURVE, ZooKeeper ACLs)."""
    return os.environ.get("DKV_TEST_AUTH", "") == "1"


def rpc(addr: str, method: str, *args: Any, timeout: float = 5, auth: Credentials | None = None) -> Any:
    """One raw zerorpc call to a node (no dkv client in between), with ``auth``'s key if given."""
    c = zerorpc.Client(timeout=timeout, heartbeat=None)
    if auth is not None:
        secure_client(c._events._socket, auth)
    c.connect(f"tcp://{addr}")
    try:
        return c(method, *args)
    finally:
        close_client(c)  # zerorpc's own close can hang after a refused handshake


class Cluster:
    def __init__(
        self,
        zk: str,
        root: Path,
        *,
        shards: int = 2,
        replication_factor: int = 3,
        write_quorum: int = 2,
        session_timeout: float = 4.0,
        write_timeout: float = 2.0,
        extra: tuple[str, ...] = (),
        lab: Any = None,
        auth: bool | None = None,
    ) -> None:
        #: with a NetLab, each node runs in its own network namespace (partition tests)
        self.lab = lab
        self.hosts: dict[str, Any] = {}
        if lab is not None:  # the nodes reach ZooKeeper through the bridge
            zk = zk.replace("127.0.0.1", lab.gateway)
        self.zk = zk
        self.root = root
        self.shards = shards
        self.rf = replication_factor
        self.wq = write_quorum
        self.session_timeout = session_timeout
        #: with auth: the cluster key (nodes, internal RPCs, ZooKeeper) and the client key's path
        self.creds: Credentials | None = None
        self.client_key: str | None = None
        if auth_by_default() if auth is None else auth:
            auth_dir = root / "auth"
            init_keys(str(auth_dir))
            self.creds = load_auth_dir(str(auth_dir))
            self.client_key = str(auth_dir / CLIENT_KEY)
            extra = ("--auth-dir", str(auth_dir), *extra)
        self.flags = (
            "--zk",
            zk,
            "--replication-factor",
            str(replication_factor),
            "--write-quorum",
            str(write_quorum),
            "--session-timeout",
            str(session_timeout),
            "--write-timeout",
            str(write_timeout),
            *extra,
        )
        self.nodes: dict[str, NodeProcess] = {}

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> "Cluster":
        for i in range(1, self.shards * self.rf + 1):
            self.add_node(f"n{i}")
        self.wait_formed()
        return self

    def add_node(self, node_id: str) -> NodeProcess:
        if self.lab is not None:
            host = self.hosts[node_id] = self.lab.add_host()
            n = NodeProcess(
                self.root / node_id / "data",
                None,
                *self.flags,
                node_id=node_id,
                log_level="INFO",
                host=host.ip,
                prefix=host.prefix(),
            )
        else:
            n = NodeProcess(self.root / node_id / "data", None, *self.flags, node_id=node_id, log_level="INFO")
        self.nodes[node_id] = n
        n.start()
        wait_until(lambda: self.role_of(node_id) not in (None, "unassigned"), 30, f"{node_id} to be assigned")
        return n

    def stop(self) -> None:
        for n in self.nodes.values():
            if n.running:
                try:
                    n.resume()
                    n.stop()
                except Exception:
                    n.kill()
        if self.creds is not None:  # only the cluster key may delete its znodes (the chroot's teardown)
            from kazoo.client import KazooClient

            from dkv.cluster.layout import ROOTS

            zk = KazooClient(hosts=self.zk, **self.kazoo_args)
            zk.start(timeout=30)
            try:
                for path in ROOTS:
                    zk.delete(path, recursive=True)
            finally:
                zk.stop()
                zk.close()

    # -- probes ----------------------------------------------------------------------

    def rpc(self, addr: str, method: str, *args: Any, timeout: float = 5) -> Any:
        """A raw call to a node with the cluster key (when the cluster has auth)."""
        return rpc(addr, method, *args, timeout=timeout, auth=self.creds)

    @property
    def kazoo_args(self) -> dict[str, Any]:
        """KazooClient arguments of a test's own ZooKeeper client: dkv admin's rights."""
        return kazoo_args(self.creds)

    def info(self, node_id: str) -> dict[str, Any] | None:
        try:
            return self.rpc(self.nodes[node_id].addr, "info", timeout=2)
        except Exception:
            return None

    def cluster_info(self) -> dict[str, Any]:
        for n in self.nodes.values():
            if n.running:
                try:
                    return self.rpc(n.addr, "cluster_info", timeout=2)
                except Exception:
                    continue
        raise RuntimeError("no node answers")

    def role_of(self, node_id: str) -> str | None:
        info = self.info(node_id)
        return info.get("role") if info else None

    def shard_members(self) -> dict[str, dict[str, Any]]:
        """shard id -> {"writer": id, "replicas": [ids], "slots": [[a, b], ...]}."""
        return {s["id"]: s for s in self.cluster_info()["shards"]}

    def writer_of(self, shard_id: str) -> str:
        return self.shard_members()[shard_id]["writer"]

    def in_sync(self, shard_id: str) -> bool:
        try:
            sh = self.shard_members().get(shard_id)  # absent while a restarted node loads its view
        except RuntimeError:  # every node still loading its view (just restarted)
            return False
        if sh is None or not sh["writer"]:
            return False
        info = self.info(sh["writer"])
        if not info or "replication" not in info:
            return False
        reps = info["replication"]["replicas"]
        return all(reps.get(r, {}).get("state") == "in_sync" for r in sh["replicas"])

    def wait_formed(self, timeout: float = 60) -> None:
        def formed() -> bool:
            try:
                shards = self.shard_members()
            except RuntimeError:
                return False
            covered = sum(b - a + 1 for s in shards.values() for a, b in s["slots"])
            return (
                len(shards) == self.shards
                and covered == 1024
                and self.balanced()
                and all(len(s["replicas"]) == self.rf - 1 for s in shards.values())
                and all(self.in_sync(sid) for sid in shards)
            )

        wait_until(formed, timeout, "the cluster to form with every replica in sync", interval=0.2)

    def balanced(self) -> bool:
        """No migration under way, and every shard owns its share of the slots (within one)."""
        try:
            info = self.cluster_info()
        except RuntimeError:
            return False
        counts = [sum(b - a + 1 for a, b in sh["slots"]) for sh in info["shards"] if sh["writer"]]
        return not info.get("migrations") and bool(counts) and max(counts) - min(counts) <= 1

    def digests(self, shard_id: str) -> dict[str, list[Any]]:
        """member id -> [applied_lsn, digest] over the shard's slots, for live members."""
        sh = self.shard_members()[shard_id]
        out = {}
        for member in [sh["writer"], *sh["replicas"]]:
            n = self.nodes[member]
            if n.running:
                out[member] = [self.rpc(n.addr, "digest", a, b) for a, b in sh["slots"]]
        return out

    def wait_converged(self, shard_id: str, timeout: float = 30) -> dict[str, list[Any]]:
        """Poll until every live member has the same applied lsn and digest per slot range."""
        last: dict[str, Any] = {}

        def same() -> bool:
            nonlocal last
            last = self.digests(shard_id)
            values = list(last.values())
            return len(values) > 1 and all(v == values[0] for v in values)

        try:
            wait_until(same, timeout, f"{shard_id} to converge", interval=0.2)
        except TimeoutError as e:
            raise AssertionError(f"{shard_id} did not converge: {last}") from e
        return last

    def client(self, timeout: float = 10) -> dkv.Client:
        return dkv.Client([n.addr for n in self.nodes.values()], timeout=timeout, auth=self.client_key)

    def keys_of_shard(self, shard_id: str, n: int, prefix: str = "k") -> list[str]:
        """``n`` keys whose slots the shard owns."""
        ranges = self.shard_members()[shard_id]["slots"]
        out, i = [], 0
        while len(out) < n:
            key = f"{prefix}{i}"
            slot = dkv.slot_of(key.encode())
            if any(a <= slot <= b for a, b in ranges):
                out.append(key)
            i += 1
        return out

    def wait_session_gone(self, node_id: str) -> None:
        """Wait until ZooKeeper reports the node down (its session expired)."""

        def gone() -> bool:
            for n in self.cluster_info()["nodes"]:
                if n["id"] == node_id:
                    return n["status"] == "down"
            return True

        wait_until(gone, 4 * self.session_timeout, f"{node_id}'s session to expire", interval=0.2)


def expire_session(zk_hosts: str, addr: str, auth: Credentials | None = None) -> None:
    """Expire a node's ZooKeeper session for real: close it from a second client.

    Needs the node started with DKV_FAULT_HOOKS=1 (it reveals its session id).
    """
    from kazoo.client import KazooClient

    session_id, password = rpc(addr, "debug_zk_session", auth=auth)
    other = KazooClient(hosts=zk_hosts.split("/", 1)[0], client_id=(session_id, password))
    other.start(timeout=10)
    other.stop()  # closing a session ends it for every client holding it
    other.close()
