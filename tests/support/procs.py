"""Real ``dkv serve`` processes for integration and fault tests.

:class:`NodeProcess` starts a node as a child process, waits until it answers,
and can stop it (SIGTERM), kill it (SIGKILL), pause (SIGSTOP) and resume it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from dkv.auth import Credentials, load_auth_dir
from dkv.transport import secure_client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``cond`` until it returns a truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


class NodeProcess:
    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        *extra: str,
        node_id: str | None = None,
        log_level: str = "WARNING",
        host: str = "127.0.0.1",
        prefix: list[str] | None = None,
    ) -> None:
        self.port = port or free_port()
        self.host = host
        self.addr = f"{host}:{self.port}"
        #: runs the node inside another network namespace (tests/support/netns.py)
        self.prefix = prefix or []
        self.data_dir = Path(data_dir)
        self.node_id = node_id or f"node-{self.port}"
        self.extra = list(extra)
        self.log_level = log_level
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.data_dir.parent / f"{self.node_id}.log"

    def argv(self) -> list[str]:
        return [
            *self.prefix,
            sys.executable,
            "-m",
            "dkv.cli.main",
            "serve",
            "--node-id",
            self.node_id,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
            "--log-level",
            self.log_level,
            *self.extra,
            *self._protected_mode(),
        ]

    @property
    def auth(self) -> Credentials | None:
        """The cluster key of a node started with --auth-dir (to probe it)."""
        if "--auth-dir" not in self.extra:
            return None
        return load_auth_dir(self.extra[self.extra.index("--auth-dir") + 1])

    def _protected_mode(self) -> list[str]:
        """A node on a non-loopback address (a network-namespace test) needs auth or --insecure."""
        if self.host.startswith("127.") or "--auth-dir" in self.extra or "--insecure" in self.extra:
            return []
        return ["--insecure"]

    def start(self, wait: bool = True) -> "NodeProcess":
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT)
        log.close()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30) -> None:
        import zerorpc

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"node {self.node_id} exited with {self.proc.returncode}:\n{self.log()}")
            c = zerorpc.Client(timeout=0.5, heartbeat=None)
            if self.auth is not None:
                secure_client(c._events._socket, self.auth)
            try:
                c.connect(f"tcp://{self.addr}")
                return c.ping() == "pong"
            except Exception:
                return False
            finally:
                c.close()

        wait_until(up, timeout, f"node {self.node_id} to answer")

    def log(self, tail: int | None = 4000) -> str:
        """The node's log output (its last ``tail`` characters; None for all of it)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return text if tail is None else text[-tail:]

    def _signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL: no chance to flush or clean up."""
        if self.proc is not None and self.proc.poll() is None:
            self._signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM and wait for a clean exit; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise
        return self.proc.returncode

    def pause(self) -> None:
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None
