"""A seeded nemesis: inject random faults into a running :class:`~tests.support.cluster.Cluster`.

This module's single job is *breaking things on a schedule*. :class:`Nemesis`
runs one thread that, every ``interval`` seconds (drawn at random, counted
from the previous fault's start), waits until the cluster is healthy again,
then injects one fault chosen by a ``random.Random(seed)``:

``kill-writer`` / ``kill-replica``
    ``kill -9`` of a shard's writer or of one of its replicas; restarted
    ``kill_downtime`` seconds later (0.5-3 s).
``pause-writer`` / ``pause-replica``
    ``SIGSTOP`` for just over the session timeout (+0.5-1.5 s), then ``SIGCONT``.
``expire-writer`` / ``expire-replica``
    The node's ZooKeeper session is closed under it (``expire_session``; the
    nodes need ``DKV_FAULT_HOOKS=1``); the node keeps running.
``migrate``
    ``dkv admin drain shard-2``, or ``undrain`` if the last one was a drain:
    the same code (:func:`dkv.cli.admin.set_draining`), so the controller
    moves a slot range between the shards.
``migrate-kill-source``
    The sharpened trigger: ``kill -9`` of a replica of the shard the slots
    will leave, then at once ``drain``/``undrain``; restarted 1-3 s later.
``partition-writer`` / ``partition-replica``
    Only with a :class:`~tests.support.netns.NetLab` cluster (``partitions=True``):
    the node's link goes down for just over the session timeout.

Safety: faults run one after another and each heals (restart, ``SIGCONT``,
link up) before the next; the next waits until every shard has its writer,
``replication_factor - 1`` replicas, every member running, and every replica
in sync. So at most one member of any shard is down, paused or cut off at a
time (with rf=3, wq=2 a quorum stays possible) and the cluster is expected to
stay available. If it is not healthy within ``health_timeout`` the nemesis
stops and says so (:attr:`Nemesis.unhealthy`).

The schedule is reproducible from the seed: every random draw is made in the
same order whatever the cluster does (targets are drawn as roles, "the writer
of shard-1" or "replica 0 of shard-2", resolved when the fault is injected);
the interleaving with the clients of course is not. :attr:`Nemesis.faults`
records what was done, when (seconds since ``t0``).
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from tests.support.cluster import Cluster, expire_session

#: fault kind -> default weight (partitions are added only when the cluster can be cut)
DEFAULT_WEIGHTS: dict[str, float] = {
    "kill-writer": 2.0,
    "kill-replica": 2.0,
    "pause-writer": 1.5,
    "pause-replica": 1.0,
    "expire-writer": 1.0,
    "expire-replica": 0.5,
    "migrate": 1.5,
    "migrate-kill-source": 2.0,
}
PARTITION_WEIGHTS: dict[str, float] = {"partition-writer": 1.0, "partition-replica": 0.5}
#: the shard drain/undrain moves slots off and back onto
DRAIN_SHARD = "shard-2"


@dataclass
class Fault:
    """One fault: what, on which node (or shard), from ``start`` until ``end`` (seconds since
    the run's start; ``end`` is None for an instantaneous fault such as a session expiry)."""

    index: int
    kind: str
    target: str
    start: float
    end: float | None = None
    detail: str = ""
    error: str | None = None

    def __str__(self) -> str:
        span = f"{self.start:7.2f}s" + (f" .. {self.end:7.2f}s" if self.end is not None else "           ")
        err = f" ERROR: {self.error}" if self.error else ""
        return f"[{self.index:2d}] {span}  {self.kind:<20} {self.target:<8} {self.detail}{err}"


class NemesisError(RuntimeError):
    """The nemesis thread died of an unexpected exception (a harness bug)."""


class Nemesis:
    """Faults on ``cluster`` driven by ``random.Random(seed)``; see the module docstring.

    ``t0`` (``time.monotonic()``) is the run's start, to which :class:`Fault` times are
    relative. ``weights`` maps fault kinds to weights (default :data:`DEFAULT_WEIGHTS`,
    plus :data:`PARTITION_WEIGHTS` when ``partitions``; partition kinds need ``partitions``).
    ``log`` gets one line per fault.
    """

    def __init__(
        self,
        cluster: Cluster,
        seed: int,
        *,
        t0: float | None = None,
        weights: dict[str, float] | None = None,
        partitions: bool = False,
        interval: tuple[float, float] = (2.0, 5.0),
        kill_downtime: tuple[float, float] = (0.5, 3.0),
        sharp_downtime: tuple[float, float] = (1.0, 3.0),
        pause_extra: tuple[float, float] = (0.5, 1.5),
        health_timeout: float = 120.0,
        log: Callable[[str], None] | None = None,
    ) -> None:
        if partitions and cluster.lab is None:
            raise ValueError("partitions need a cluster started with a NetLab")
        self.cluster = cluster
        self.seed = seed
        self.rng = random.Random(seed)
        self.t0 = time.monotonic() if t0 is None else t0
        w = dict(weights) if weights is not None else {**DEFAULT_WEIGHTS, **(PARTITION_WEIGHTS if partitions else {})}
        if not partitions and any(k in PARTITION_WEIGHTS for k in w):
            raise ValueError("partition faults need partitions=True")
        unknown = set(w) - set(DEFAULT_WEIGHTS) - set(PARTITION_WEIGHTS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}")
        self.weights = {k: v for k, v in sorted(w.items()) if v > 0}
        if not self.weights:
            raise ValueError("no fault kind to choose from")
        self.interval = interval
        self.kill_downtime = kill_downtime
        self.sharp_downtime = sharp_downtime
        self.pause_extra = pause_extra
        self.health_timeout = health_timeout
        self._log = log or (lambda line: None)
        self.faults: list[Fault] = []
        #: set when the cluster was not healthy within health_timeout (the nemesis stopped there)
        self.unhealthy: str | None = None
        #: whether our last drain/undrain was a drain
        self.draining = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._zk: Any = None

    # -- lifecycle ------------------------------------------------------------------------

    def now(self) -> float:
        return time.monotonic() - self.t0

    def start(self, duration: float) -> "Nemesis":
        """Inject faults until ``duration`` seconds after ``t0`` (or :meth:`stop`)."""
        from kazoo.client import KazooClient

        if self._thread is not None:
            raise RuntimeError("nemesis already started")
        if any(k.startswith("migrate") for k in self.weights):
            self._zk = KazooClient(hosts=self.cluster.zk, timeout=10, **self.cluster.kazoo_args)
            self._zk.start(timeout=30)
        self._thread = threading.Thread(target=self._run, args=(duration,), name="nemesis", daemon=True)
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        """Wait for the last fault to be healed; re-raise a harness error as :class:`NemesisError`."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"the nemesis did not stop within {timeout:g}s")
        if self._zk is not None:
            self._zk.stop()
            self._zk.close()
            self._zk = None
        if self._error is not None:
            raise NemesisError(f"the nemesis failed: {self._error!r}") from self._error

    def stop(self, timeout: float | None = None) -> None:
        """No new fault; the current one is healed as planned (:meth:`join`)."""
        self._stop.set()
        self.join(timeout)

    def heal(self, timeout: float = 60) -> list[str]:
        """After :meth:`stop`: resume every paused node, heal every cut link, start every
        stopped node, and undrain :data:`DRAIN_SHARD` so the slots balance again. Returns what
        it did."""
        from dkv.cli import admin

        done: list[str] = []
        c = self.cluster
        for nid, n in c.nodes.items():
            if n.running:
                n.resume()  # harmless when not paused
            if c.lab is not None:
                c.lab.heal(c.hosts[nid])
        for nid, n in c.nodes.items():
            if not n.running:
                n.start(wait=False)
                done.append(f"started {nid}")
        for nid, n in c.nodes.items():
            n.wait_ready(timeout)
        from kazoo.client import KazooClient

        zk = KazooClient(hosts=c.zk, timeout=10, **c.kazoo_args)
        zk.start(timeout=30)
        try:
            done.append(admin.set_draining(zk, DRAIN_SHARD, False))
        finally:
            zk.stop()
            zk.close()
        return done

    # -- health ------------------------------------------------------------------------------

    def healthy(self) -> bool:
        """Every shard has a writer and rf-1 replicas, all running, every replica in sync."""
        c = self.cluster
        try:
            shards = c.shard_members()
            if len(shards) != c.shards:
                return False
            for sid, sh in shards.items():
                members = [sh["writer"], *sh["replicas"]]
                if not sh["writer"] or len(sh["replicas"]) != c.rf - 1:
                    return False
                if not all(m in c.nodes and c.nodes[m].running for m in members):
                    return False
                if not c.in_sync(sid):
                    return False
            return True
        except Exception:
            return False

    def health(self) -> str:
        """What :meth:`healthy` sees, for a report: each shard's members and its writer's replicas."""
        c = self.cluster
        try:
            out = []
            for sid, sh in c.shard_members().items():
                running = {m: c.nodes[m].running for m in [sh["writer"], *sh["replicas"]] if m in c.nodes}
                info = c.info(sh["writer"]) if sh["writer"] else None
                reps = (info or {}).get("replication", {}).get("replicas") if info else None
                out.append(
                    f"{sid}: writer {sh['writer']}, replicas {sh['replicas']}, running {running}, "
                    f"writer's view of its replicas {reps}"
                )
            return "; ".join(out)
        except Exception as e:
            return f"(cluster map unreadable: {e!r})"

    def _wait_healthy(self) -> bool:
        deadline = time.monotonic() + self.health_timeout
        while not self.healthy():
            if time.monotonic() > deadline:
                return False
            if self._stop.wait(0.2):
                return True  # stopping anyway
        return True

    # -- the schedule ------------------------------------------------------------------------

    def _run(self, duration: float) -> None:
        kinds, weights = list(self.weights), list(self.weights.values())
        try:
            last_start = self.now()
            while not self._stop.is_set():
                gap = self.rng.uniform(*self.interval)
                # pacing between faults (the schedule's rate), not a condition
                if self._stop.wait(max(0.0, last_start + gap - self.now())):
                    break
                if self.now() >= duration:
                    break
                if not self._wait_healthy():
                    self.unhealthy = (
                        f"the cluster was not healthy {self.health_timeout:g}s after fault "
                        f"{self.faults[-1] if self.faults else '(none)'}; the nemesis stopped; "
                        f"then: {self.health()}"
                    )
                    self._log(f"nemesis: {self.unhealthy}")
                    break
                if self._stop.is_set() or self.now() >= duration:
                    break
                last_start = self.now()
                self._inject(self.rng.choices(kinds, weights)[0])
        except BaseException as e:  # delivered by join()
            self._error = e

    def _inject(self, kind: str) -> None:
        # Draw everything this kind could need first, in a fixed order (reproducible schedules).
        shard = self.rng.choice(["shard-1", "shard-2"])
        replica_no = self.rng.randrange(self.cluster.rf - 1)
        if kind.startswith("kill"):
            downtime = self.rng.uniform(*self.kill_downtime)
        elif kind.startswith(("pause", "partition")):
            downtime = self.cluster.session_timeout + self.rng.uniform(*self.pause_extra)
        elif kind == "migrate-kill-source":
            downtime = self.rng.uniform(*self.sharp_downtime)
        else:
            downtime = 0.0
        fault = Fault(len(self.faults) + 1, kind, "?", self.now())
        self.faults.append(fault)
        try:
            if kind in ("migrate", "migrate-kill-source"):
                self._migrate(fault, replica_no, downtime, sharp=kind == "migrate-kill-source")
            else:
                role = kind.split("-", 1)[1]
                node = self._resolve(shard, role, replica_no)
                fault.target = node
                fault.detail = f"{role} of {shard}"
                action = kind.split("-", 1)[0]
                if action == "kill":
                    self._down(
                        fault,
                        node,
                        downtime,
                        lambda: self.cluster.nodes[node].kill(),
                        lambda: self.cluster.nodes[node].start(),
                    )
                elif action == "pause":
                    self._down(
                        fault,
                        node,
                        downtime,
                        lambda: self.cluster.nodes[node].pause(),
                        lambda: self.cluster.nodes[node].resume(),
                    )
                elif action == "partition":
                    host = self.cluster.hosts[node]
                    self._down(
                        fault,
                        node,
                        downtime,
                        lambda: self.cluster.lab.isolate(host),
                        lambda: self.cluster.lab.heal(host),
                    )
                else:
                    expire_session(self.cluster.zk, self.cluster.nodes[node].addr, self.cluster.creds)
        except Exception as e:  # a fault that could not be injected is reported, not fatal
            fault.error = f"{type(e).__name__}: {e}"
        self._log(f"nemesis: {fault}")

    def _resolve(self, shard: str, role: str, replica_no: int) -> str:
        sh = self.cluster.shard_members()[shard]
        if role == "writer":
            return str(sh["writer"])
        replicas = sorted(sh["replicas"])
        return str(replicas[replica_no % len(replicas)])

    def _down(
        self, fault: Fault, node: str, downtime: float, fail: Callable[[], Any], recover: Callable[[], Any]
    ) -> None:
        fail()
        # the fault's planned duration (part of the schedule), not a condition
        time.sleep(downtime)
        recover()
        fault.end = self.now()
        fault.detail += f", down {downtime:.1f}s"

    def _migrate(self, fault: Fault, replica_no: int, downtime: float, sharp: bool) -> None:
        from dkv.cli import admin

        drain = not self.draining
        source = DRAIN_SHARD if drain else "shard-1"  # the shard the slots leave
        fault.target = DRAIN_SHARD
        fault.detail = "drain" if drain else "undrain"
        victim = None
        if sharp:
            victim = self._resolve(source, "replica", replica_no)
            self.cluster.nodes[victim].kill()
            fault.detail += f" after kill -9 of {victim} (replica of {source}, the source)"
        try:
            out = admin.set_draining(self._zk, DRAIN_SHARD, drain)
            self.draining = drain
            fault.detail += f": {out.split(':')[0]}"
        finally:
            if victim is not None:
                time.sleep(downtime)  # the planned downtime, not a condition
                self.cluster.nodes[victim].start()
                fault.end = self.now()
                fault.detail += f"; {victim} down {downtime:.1f}s"

    # -- reporting -----------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Faults injected (without error), by kind."""
        out: dict[str, int] = {}
        for f in self.faults:
            if f.error is None:
                out[f.kind] = out.get(f.kind, 0) + 1
        return out

    def schedule(self) -> str:
        return "\n".join(str(f) for f in self.faults) or "(no fault injected)"
