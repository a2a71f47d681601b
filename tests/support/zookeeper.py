"""Provide a real ZooKeeper for tests (DESIGN §9).

Order: ``DKV_TEST_ZK=host:port`` when set (an explicit choice wins); else a
testcontainers ZooKeeper when a Docker engine answers; else a local ZooKeeper
from Debian's ``zookeeper`` package, started as a child process on a free port.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

from tests.support.procs import free_port, wait_until

ZK_JAR = "/usr/share/java/zookeeper.jar"
ZK_IMAGE = "zookeeper:3.8"
#: ZooKeeper tick; sessions may last 2..20 ticks, so tests can use short sessions.
TICK_MS = 500


@dataclass
class ZooKeeper:
    hosts: str
    kind: str  # "env" | "docker" | "local"
    _stop: Callable[[], None] = field(default=lambda: None, repr=False)

    def stop(self) -> None:
        self._stop()


def docker_engine_answers() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=3)
        client.ping()
        return True
    except Exception:
        return False


def local_zookeeper_installed() -> bool:
    return os.path.exists(ZK_JAR) and shutil.which("java") is not None


def ruok(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1) as s:
            s.sendall(b"ruok")
            return s.recv(4) == b"imok"
    except OSError:
        return False


def start_local() -> ZooKeeper:
    port = free_port()
    data = tempfile.mkdtemp(prefix="dkv-zk-")
    log = open(os.path.join(data, "zookeeper.log"), "wb")
    proc = subprocess.Popen(
        [
            "java",
            "-Xmx256m",
            "-Dzookeeper.admin.enableServer=false",
            "-Dzookeeper.4lw.commands.whitelist=*",
            "-cp",
            ZK_JAR,
            "org.apache.zookeeper.server.ZooKeeperServerMain",
            str(port),
            data,
            str(TICK_MS),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(data, ignore_errors=True)

    try:
        wait_until(lambda: proc.poll() is not None or ruok("127.0.0.1", port), 60, "local ZooKeeper to answer ruok")
        if proc.poll() is not None:
            raise RuntimeError(f"local ZooKeeper exited with {proc.returncode}; see {data}/zookeeper.log")
    except BaseException:
        stop()
        raise
    return ZooKeeper(f"127.0.0.1:{port}", "local", stop)


def start_docker() -> ZooKeeper:
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.waiting_utils import wait_for_logs

    container = DockerContainer(ZK_IMAGE).with_exposed_ports(2181).with_env("ZOO_TICK_TIME", str(TICK_MS))
    container.start()
    wait_for_logs(container, "binding to port", timeout=60)
    hosts = f"{container.get_container_host_ip()}:{container.get_exposed_port(2181)}"
    return ZooKeeper(hosts, "docker", container.stop)


def provide() -> ZooKeeper:
    """The ZooKeeper the test session uses, by the order in the module docstring."""
    env = os.environ.get("DKV_TEST_ZK")
    if env:
        return ZooKeeper(env, "env")
    if docker_engine_answers():
        return start_docker()
    if local_zookeeper_installed():
        return start_local()
    raise RuntimeError(
        "no ZooKeeper: no Docker engine, no local install (apt-get install zookeeper), and DKV_TEST_ZK is not set"
    )


def wait_ready(hosts: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    from kazoo.client import KazooClient

    while True:
        zk = KazooClient(hosts)
        try:
            zk.start(timeout=max(1.0, deadline - time.monotonic()))
            zk.stop()
            zk.close()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
