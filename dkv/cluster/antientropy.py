"""Anti-entropy on a shard writer: compare store digests with the replicas, re-sync a diverged one.

Every ``anti_entropy_interval`` seconds the writer takes a snapshot of its store
at a committed LSN ``L`` (a moment when nothing is being applied, so no replica
has been told of a commit point past ``L``) and sends each in-sync replica a
``repl_digest`` request for ``L`` at once. The replica applies up to ``L`` if it
has not yet, takes its own snapshot there before it handles anything else, and
both sides hash their snapshot in gevent's threadpool. A replica that already
applied past ``L`` says so (the comparison is retried at a later LSN).

Equal LSN, different digest (:func:`~dkv.cluster.replication.compare_digest`)
means the replica's data diverged from the writer's (a forged message, a
damaged disk, a bug): it is logged as an error, with both digests, and the
replica is re-synced from a snapshot through the writer's catch-up path.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import gevent

from dkv.client.connection import TransportError, call_once
from dkv.cluster.replication import DIVERGED, MATCH, Reply, compare_digest
from dkv.errors import DKVError
from dkv.node.pipeline import offloaded

if TYPE_CHECKING:
    from dkv.cluster.leader import ReplicatedWriter

logger = logging.getLogger(__name__)

#: Comparisons tried per round while replicas report a store past the asked LSN.
ATTEMPTS = 5
#: Seconds a replica may take to hash its store.
DIGEST_TIMEOUT = 60.0


class AntiEntropy:
    """Periodic digest comparison between a writer and its in-sync replicas."""

    def __init__(self, writer: "ReplicatedWriter") -> None:
        self.w = writer
        #: rounds run; replicas found equal / diverged; the lsn of the last comparison made
        self.rounds = 0
        self.matched = 0
        self.diverged = 0
        self.last_lsn: int | None = None

    def stats(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "matched": self.matched, "diverged": self.diverged, "last_lsn": self.last_lsn}

    def run(self, interval: float) -> None:
        while True:
            gevent.sleep(interval)
            try:
                self.round()
            except Exception:
                logger.exception("%s: anti-entropy round failed", self.w.shard_id)

    def round(self) -> dict[str, str]:
        """Compare every in-sync replica once (retrying one that was not comparable);
        return each one's verdict (MATCH, DIVERGED or NOT_COMPARABLE)."""
        verdicts: dict[str, str] = {}
        for attempt in range(ATTEMPTS):
            if attempt:
                gevent.sleep(0.05 * attempt)
            pending = [rid for rid in self.w.leader.in_sync() if verdicts.get(rid) not in (MATCH, DIVERGED)]
            if not pending or self.w.leader.deposed or not self.w.ready:
                break
            verdicts.update(self._compare(pending))
        self.rounds += 1
        return verdicts

    def _compare(self, targets: list[str]) -> dict[str, str]:
        store, leader = self.w.store, self.w.leader
        if store.applied_lsn != leader.commit_lsn:
            return {}  # a commit is being applied: replicas may already know of a later point
        snap = store.snapshot()
        try:
            lsn = snap.applied_lsn
            wire = leader.digest_request(lsn).to_wire()
            asks = {rid: gevent.spawn(self._ask, rid, wire) for rid in targets}
            ours = offloaded(self.w.config.durable, snap.digest)
        finally:
            snap.close()
        gevent.joinall(list(asks.values()))
        out: dict[str, str] = {}
        for rid, job in asks.items():
            if not job.successful() or job.value is None:
                continue
            reply, theirs = job.value  # a refusal is left to the prepares to act on
            out[rid] = verdict = compare_digest(lsn, ours, reply, theirs)
            if verdict in (MATCH, DIVERGED):
                self.last_lsn = lsn
            if verdict == DIVERGED:
                self.diverged += 1
                logger.error(
                    "%s: replica %s DIVERGED from the writer at lsn %d (writer digest %s, replica "
                    "digest %s); re-syncing it from a snapshot",
                    self.w.shard_id,
                    rid,
                    lsn,
                    ours,
                    theirs,
                )
                self.w.resync(rid)
            elif verdict == MATCH:
                self.matched += 1
                logger.debug("%s: replica %s matches the writer at lsn %d", self.w.shard_id, rid, lsn)
        return out

    def _ask(self, rid: str, wire: list[Any]) -> tuple[Reply, str | None] | None:
        addr = self.w.addr_of(rid)
        if addr is None:
            return None
        try:
            raw_reply, theirs = call_once(
                addr,
                "repl_digest",
                wire,
                auth=self.w.config.credentials,
                timeout=max(self.w.config.write_timeout, DIGEST_TIMEOUT),
            )
            return Reply.from_wire(raw_reply), theirs
        except (TransportError, DKVError) as e:
            logger.info("%s: digest request to %s failed: %s", self.w.shard_id, rid, e)
            return None
