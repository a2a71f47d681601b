"""Test hosts on one machine: a Linux bridge plus one network namespace per node.

Needs root and iproute2 (``ip netns``). The root namespace (ZooKeeper, the
tests' clients) is ``.1`` on the bridge; host ``i`` is ``.(10 + i)`` in its own
namespace. :meth:`NetLab.isolate` takes a host's link down (cut off from its
peers, its clients and ZooKeeper alike); :meth:`NetLab.heal` brings it back.
All addresses are private to this machine's own namespaces.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
from dataclasses import dataclass


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = (["ip", "netns", "exec", ns, "ip"] if ns else ["ip"]) + list(args)
    subprocess.run(cmd, check=True, capture_output=True)


@dataclass
class Host:
    ns: str
    ip: str
    link: str  # the interface inside the namespace

    def prefix(self) -> list[str]:
        """argv prefix that runs a command inside this host."""
        return ["ip", "netns", "exec", self.ns]


def _free_third_octet() -> int:
    """A 10.231.X.0/24 no interface on this host uses (a lab left by a killed run keeps its
    bridge: sharing its subnet would send our nodes' traffic to the wrong bridge)."""
    used = set(
        re.findall(
            r"inet 10\.231\.(\d+)\.",
            subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True, check=True).stdout,
        )
    )
    free = [x for x in range(1, 254) if str(x) not in used]
    if not free:
        raise RuntimeError("every 10.231.X.0/24 subnet is in use (remove stale dkv* bridges)")
    return random.choice(free)


class NetLab:
    def __init__(self) -> None:
        self.tag = f"{random.randrange(16**4):04x}"
        self.subnet = f"10.231.{_free_third_octet()}"
        self.bridge = f"dkvbr{self.tag}"
        self.gateway = f"{self.subnet}.1"
        self.hosts: list[Host] = []
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    @staticmethod
    def available() -> bool:
        if os.geteuid() != 0:
            return False
        probe = f"dkvprobe{random.randrange(10**6)}"
        try:
            _ip("netns", "add", probe)
            _ip("netns", "del", probe)
            return True
        except (OSError, subprocess.CalledProcessError):
            return False

    def add_host(self) -> Host:
        i = len(self.hosts) + 1
        ns, outer, inner = f"dkv{self.tag}h{i}", f"dkv{self.tag}a{i}", f"dkv{self.tag}b{i}"
        ip = f"{self.subnet}.{10 + i}"
        _ip("netns", "add", ns)
        _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        _ip("link", "set", outer, "master", self.bridge)
        _ip("link", "set", outer, "up")
        _ip("link", "set", inner, "netns", ns)
        _ip("addr", "add", f"{ip}/24", "dev", inner, ns=ns)
        _ip("link", "set", inner, "up", ns=ns)
        _ip("link", "set", "lo", "up", ns=ns)
        host = Host(ns, ip, inner)
        self.hosts.append(host)
        return host

    def isolate(self, host: Host) -> None:
        _ip("link", "set", host.link, "down", ns=host.ns)

    def heal(self, host: Host) -> None:
        _ip("link", "set", host.link, "up", ns=host.ns)

    def teardown(self) -> None:
        for h in self.hosts:
            subprocess.run(["ip", "netns", "del", h.ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
