"""Fenced locks with dkv: workers share a resource, and a stale holder is refused.

A lease-based lock alone cannot protect a resource: a holder can stall (a GC
pause, a slow network) past its lease while another process takes the lock, and
then act as if it still held it. The cure is a *fencing token*: every holder of
``client.lock(name)`` gets ``lock.token``, which strictly increases from one holder
to the next (across writer failover and resharding too). The resource remembers
the highest token it has seen and refuses any request that carries a lower one.

Run it against a standalone node (``dkv serve``, 127.0.0.1:7000 by default)::

    .venv/bin/python examples/locks.py [--addr HOST:PORT | --zk HOSTS/chroot] [--workers 4] [--rounds 5]

It prints each holder's token, then shows a late write from an old holder being refused;
it exits 0 when every check held.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field

import dkv


class StaleToken(Exception):
    """The request carries a token lower than one the resource has already seen."""


@dataclass
class FencedResource:
    """A stand-in for a storage service: it accepts a write only with a token at least as
    high as every token it has seen (a holder may write several times with its token)."""

    highest: int = 0
    log: list[tuple[int, str]] = field(default_factory=list)
    mutex: threading.Lock = field(default_factory=threading.Lock)

    def write(self, token: int, data: str) -> None:
        with self.mutex:
            if token < self.highest:
                raise StaleToken(f"token {token} < {self.highest}: refused {data!r}")
            self.highest = token
            self.log.append((token, data))


def worker(client: dkv.Client, name: str, resource: FencedResource, rounds: int, me: str, tokens: list[int]) -> None:
    for i in range(rounds):
        with client.lock(name, ttl=5.0, timeout=30) as lock:
            if not lock.valid:  # check before acting: the lease may have lapsed already
                continue
            resource.write(lock.token, f"{me} round {i}")
            tokens.append(lock.token)
            print(f"{me}: holds {name!r} with token {lock.token}", flush=True)
            time.sleep(0.01)  # the critical section


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--addr", default="127.0.0.1:7000", help="a node (default 127.0.0.1:7000)")
    p.add_argument("--zk", default=None, help="ZooKeeper HOSTS[/chroot] of a cluster (instead of --addr)")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)

    name = f"example-{uuid.uuid4().hex[:8]}"
    resource = FencedResource()
    tokens: list[int] = []  # in the order the holders wrote
    with dkv.Client(None if args.zk else args.addr, zk=args.zk) as client:
        # 1. Workers take turns; each writes to the resource with its token.
        threads = [
            threading.Thread(target=worker, args=(client, name, resource, args.rounds, f"worker-{w}", tokens))
            for w in range(args.workers)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if any(b <= a for a, b in zip(tokens, tokens[1:])):
            print(f"tokens did not strictly increase: {tokens}", file=sys.stderr)
            return 1
        print(f"{len(tokens)} holders, tokens strictly increasing", flush=True)

        # 2. A stale holder: A's write is delayed until after B took the lock.
        with client.lock(name) as a:
            late = (a.token, "A's delayed write")  # sent while A held the lock, delivered late
        with client.lock(name) as b:
            resource.write(b.token, "B's write")
        try:
            resource.write(*late)
        except StaleToken as e:
            print(f"stale holder refused: {e}", flush=True)
        else:
            print("the stale write was accepted: fencing failed", file=sys.stderr)
            return 1

        # 3. While the lock is held, another acquire gives up after its timeout.
        with client.lock(name) as held:
            try:
                client.lock(name, timeout=0.2).acquire()
            except dkv.errors.LockTimeout:
                print(f"while token {held.token} holds {name!r}, another acquire times out", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
