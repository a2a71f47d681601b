"""The I/O side of slot migration: the target writer's driver, the source writer's RPCs, range deletes.

:class:`Migrator` runs on the target shard's writer and carries out the
actions of the sans-I/O :class:`~dkv.cluster.migration.Importer`: RPCs to
the source shard's writer, ZooKeeper writes, imports through the local write
pipeline. :class:`MigrationSource` answers those RPCs on the source's writer.
:func:`delete_range` deletes a slot range through the log (so replicas follow):
the importer's clear step, and the janitor that drops a range once it moved away.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import gevent
from kazoo.exceptions import BadVersionError, KazooException, NoNodeError

from dkv.auth import Credentials
from dkv.client.connection import TransportError, call_once
from dkv.cluster import layout
from dkv.cluster.layout import FROZEN, Migration, SlotRanges, cancel_migration
from dkv.cluster.migration import (
    FREEZE_TIMEOUT,
    Begin,
    Cancel,
    Clear,
    CopyPage,
    Flip,
    Freeze,
    Frozen,
    Import,
    Importer,
    Page,
    RecordStart,
    Tail,
    TailPage,
    import_op,
)
from dkv.cluster.replication import record_bytes, records_from_wire, records_to_wire
from dkv.errors import DKVError, InvalidArgument, TryAgain, Unavailable
from dkv.keys import page_is_full, pair_bytes, quote, take_page
from dkv.node.pipeline import WritePipeline, offloaded
from dkv.node.sequencer import Kind, Write
from dkv.slots import SlotRange, slot_of, user_key
from dkv.storage import Store

logger = logging.getLogger(__name__)

#: pairs per copy page, records scanned per tail page, keys deleted per turn (each also bounded by
#: the pipeline's ``page_bytes``, so an import is one legal batch)
PAGE = 2000
#: RPC timeout of the driver's calls to the source
RPC_TIMEOUT = 10.0


def delete_range(
    pipeline: WritePipeline, store: Store, slots: SlotRange, offload: bool, after: bytes | None = None
) -> bytes | None:
    """Delete one page of ``slots``' keys through the log; the last storage key deleted (None: none left)."""
    page = offloaded(offload, lambda: store.page_slots(slots, after, PAGE, pipeline.page_bytes))
    if not page:
        return None
    pipeline.submit_all([Write(Kind.PURGE, user_key(k)) for k, _ in page])
    return page[-1][0]


class MigrationSource:
    """The source writer's side: scan, tail and freeze a range for the target's driver."""

    def __init__(
        self,
        log: Any,
        store: Store,
        pipeline: WritePipeline,
        offload: bool,
        confirm_frozen: Callable[[str], tuple[Migration, int]],
    ) -> None:
        self.log, self.store, self.pipeline, self.offload = log, store, pipeline, offload
        #: read the migration from ZooKeeper, check it is frozen and we still write its
        #: source; mark it frozen here; return it with the source shard znode's version
        self._confirm_frozen = confirm_frozen

    def position(self) -> int:
        return self.store.applied_lsn

    def scan(self, start: int, end: int, after: bytes | None, limit: int) -> list[Any]:
        """[[key, value], ...] of the range after storage key ``after`` (at most ``limit`` pairs
        and ``page_bytes`` of them), and the next cursor (None: the range is exhausted)."""
        slots = _range(start, end)
        lim, budget = max(1, min(int(limit), PAGE)), self.pipeline.page_bytes
        page = offloaded(self.offload, lambda: self.store.page_slots(slots, after, lim, budget))
        more = page_is_full(page, budget, pair_bytes, lim)
        return [[[user_key(k), v] for k, v in page], page[-1][0] if more else None]

    def tail(self, start: int, end: int, after_lsn: int, limit: int) -> dict[str, Any]:
        """The range's committed records after ``after_lsn`` (scanning at most ``limit``, and no
        more once they count ``page_bytes``)."""
        committed = self.store.applied_lsn
        upto = min(committed, after_lsn + max(1, min(int(limit), PAGE)))
        out: dict[str, Any] = {"records": [], "scanned_to": after_lsn, "committed": committed, "compacted": False}
        if upto <= after_lsn:
            return out
        try:
            records = offloaded(
                self.offload,
                lambda: take_page(
                    self.log.read_from(after_lsn + 1, limit=upto - after_lsn), self.pipeline.page_bytes, record_bytes
                ),
            )
        except ValueError:
            records = []
        if not records or records[0].lsn != after_lsn + 1:
            out["compacted"] = True  # the log no longer holds them (compacted, or reset by a snapshot)
            return out
        records = [r for r in records if r.lsn <= upto]
        out["records"] = records_to_wire([r for r in records if start <= slot_of(r.key) <= end])
        out["scanned_to"] = records[-1].lsn
        return out

    def freeze(self, migration_id: str) -> list[int]:
        """Refuse the range from now on, settle the writes already queued: [final_lsn, shard version,
        final revision]."""
        _, version = self._confirm_frozen(migration_id)
        self.pipeline.barrier()
        return [self.store.applied_lsn, version, self.store.applied_rev]


def _range(start: int, end: int) -> SlotRange:
    try:
        return SlotRange(int(start), int(end))
    except (TypeError, ValueError) as e:
        raise InvalidArgument(f"bad slot range {quote(start)}..{quote(end)}: {str(e)[:200]}") from None


class Migrator:
    """Drives one migration into this node's shard while it is the shard's writer."""

    def __init__(
        self,
        migration: Migration,
        zk: Any,
        pipeline: WritePipeline,
        store: Store,
        offload: bool,
        source_addr: Callable[[], str | None],
        node_id: str,
        epoch: int,
        rate: int = 0,
        freeze_timeout: float = FREEZE_TIMEOUT,
        auth: Credentials | None = None,
    ) -> None:
        self.migration = migration
        self.auth = auth
        self.zk = zk
        #: we drive the move only while we are the target's writer in this epoch
        self.node_id, self.epoch = node_id, epoch
        self.pipeline, self.store, self.offload = pipeline, store, offload
        self._source_addr = source_addr
        self.freeze_timeout = freeze_timeout
        self.importer = Importer()
        #: records per second at most (0: unlimited)
        self.rate = rate
        self.slots = SlotRange(migration.start, migration.end)
        self._greenlet = gevent.spawn(self._run)

    @property
    def dead(self) -> bool:
        return self._greenlet.dead

    def progress(self) -> dict[str, Any]:
        """The move as this driver sees it (``info()["migration"]`` on the target's writer)."""
        imp, frozen = self.importer, self.importer.frozen_for()
        return {
            "id": self.migration.id,
            "slots": [self.migration.start, self.migration.end],
            "source": self.migration.source,
            "phase": imp.phase,
            "imported": imp.imported,
            "restarts": imp.restarts,
            "frozen_ms": None if frozen is None else round(1000 * frozen),
        }

    def stop(self) -> None:
        self._greenlet.kill()

    def _run(self) -> None:
        m = self.migration
        t0 = time.monotonic()
        backoff = 0.05
        while True:
            try:
                # The znode, not our view: a frozen move we did not freeze ourselves is cancelled.
                m = Migration.from_bytes(m.id, self.zk.get(layout.migration_path(m.id))[0])
                break
            except NoNodeError:
                return
            except KazooException as e:
                logger.info("migration %s: reading it failed (%s); retrying", m.id, type(e).__name__)
                gevent.sleep(1.0)
        self.importer = Importer(inherited_freeze=m.state == FROZEN, freeze_timeout=self.freeze_timeout)
        logger.info("migration %s: importing slots %d..%d from %s", m.id, m.start, m.end, m.source)
        while not self.importer.done:
            act = self.importer.next()
            started = time.monotonic()
            try:
                result = self._do(act)
            except (TransportError, DKVError, KazooException) as e:
                if isinstance(e, NoNodeError):
                    logger.info("migration %s: stopping (%s)", m.id, e)
                    return
                logger.info("migration %s: %s failed (%s: %s); retrying", m.id, type(act).__name__, type(e).__name__, e)
                gevent.sleep(backoff)
                backoff = min(1.0, backoff * 2)
                continue
            backoff = 0.05
            self.importer.on(result)
            if isinstance(act, Import) and self.rate and self.importer.frozen_at is None:
                # --migration-rate; once frozen, the drain goes at full speed
                gevent.sleep(max(0.0, len(act.ops) / self.rate - (time.monotonic() - started)))
        if self.importer.cancelled:
            logger.warning(
                "migration %s: cancelled after %.1fs (%s); slots %d..%d stay with %s, which serves "
                "them again, and the controller will plan the move afresh",
                m.id,
                time.monotonic() - t0,
                "it was frozen by a previous writer of " + m.target
                if self.importer.frozen_at is None
                else f"frozen for over {self.freeze_timeout:g}s without finishing",
                m.start,
                m.end,
                m.source,
            )
            return
        frozen = self.importer.frozen_for() or 0.0
        logger.info(
            "migration %s: slots %d..%d now belong to %s (%d records imported, %d restart(s), %.1fs, "
            "frozen for the last %.0f ms)",
            m.id,
            m.start,
            m.end,
            m.target,
            self.importer.imported,
            self.importer.restarts,
            time.monotonic() - t0,
            1000 * frozen,
        )

    def _call(self, method: str, *args: Any) -> Any:
        addr = self._source_addr()
        if addr is None:
            raise Unavailable(f"{self.migration.source} has no live writer")
        return call_once(addr, method, *args, timeout=RPC_TIMEOUT, auth=self.auth)

    def _do(self, act: Any) -> Any:
        m = self.migration
        if isinstance(act, Clear):
            if act.after is None:
                self._target_version()  # never clear a range that is already ours
            return delete_range(self.pipeline, self.store, self.slots, self.offload, act.after)
        if isinstance(act, Begin):
            return int(self._call("mig_position"))
        if isinstance(act, RecordStart):
            self._update(
                lambda cur: Migration(cur.id, cur.start, cur.end, cur.source, cur.target, cur.state, act.from_lsn)
            )
            return None
        if isinstance(act, CopyPage):
            pairs, nxt = self._call("mig_scan", m.start, m.end, act.after, PAGE)
            return Page([(bytes(k), bytes(v)) for k, v in pairs], None if nxt is None else bytes(nxt))
        if isinstance(act, Import):
            self.pipeline.submit_all(act.ops)  # a write refused alone fails the import: it is retried
            return None
        if isinstance(act, Tail):
            t = self._call("mig_tail", m.start, m.end, act.after_lsn, PAGE)
            ops = [op for r in records_from_wire(t["records"]) if (op := import_op(r)) is not None]
            return TailPage(ops, int(t["scanned_to"]), int(t["committed"]), bool(t["compacted"]))
        if isinstance(act, Freeze):
            self._update(
                lambda cur: (
                    None
                    if cur.state == FROZEN
                    else Migration(cur.id, cur.start, cur.end, cur.source, cur.target, FROZEN, cur.from_lsn)
                )
            )
            final, version, rev = self._call("mig_freeze", m.id)
            return Frozen(int(final), int(version), int(rev))
        if isinstance(act, Flip):
            return self._flip(act.source_version)
        if isinstance(act, Cancel):
            return cancel_migration(self.zk, m.id)
        raise AssertionError(f"unknown action {act!r}")

    def _update(self, change: Callable[[Migration], Migration | None]) -> None:
        path = layout.migration_path(self.migration.id)
        while True:
            raw, stat = self.zk.get(path)
            new = change(Migration.from_bytes(self.migration.id, raw))
            if new is None:
                return
            try:
                self.zk.set(path, new.to_bytes(), version=stat.version)
                return
            except BadVersionError:
                continue

    def _target_version(self) -> int:
        """Check the migration is still open and we still write its target in our epoch;
        return the target shard znode's version (the flip is checked against it)."""
        m = self.migration
        raw, _ = self.zk.get(layout.migration_path(m.id))  # NoNodeError: flipped or cancelled
        if Migration.from_bytes(m.id, raw).target != m.target:
            raise NoNodeError(layout.migration_path(m.id))
        slots = SlotRanges.from_bytes(self.zk.get(layout.SLOTS)[0])
        if any(slots.owner(s) != m.source for s in range(m.start, m.end + 1)):
            # A stale move (its range no longer all the source's): clearing or flipping it
            # could wipe what the target already owns. Abandon it.
            logger.warning(
                "migration %s: slots %d..%d are no longer all %s's; cancelling it", m.id, m.start, m.end, m.source
            )
            cancel_migration(self.zk, m.id)
            raise NoNodeError(layout.migration_path(m.id))
        raw, stat = self.zk.get(layout.shard_path(m.target))
        shard = layout.Shard.from_bytes(m.target, raw)
        if shard.writer != self.node_id or shard.epoch != self.epoch:
            raise NoNodeError(f"{self.node_id} no longer writes {m.target} in epoch {self.epoch}")
        return stat.version

    def _flip(self, source_version: int) -> bool:
        m = self.migration
        target_version = self._target_version()
        raw, stat = self.zk.get(layout.SLOTS)
        slots = SlotRanges.from_bytes(raw).moved(m.start, m.end, m.target)
        tx = self.zk.transaction()
        tx.check(layout.shard_path(m.source), source_version)
        tx.check(layout.shard_path(m.target), target_version)
        tx.set_data(layout.SLOTS, slots.to_bytes(), version=stat.version)
        tx.delete(layout.migration_path(m.id))
        results = tx.commit()
        failed = [r for r in results if isinstance(r, Exception)]
        if failed:
            logger.info(
                "migration %s: flip refused (%s); confirming the freeze again",
                m.id,
                ", ".join(type(r).__name__ for r in failed),
            )
            return False
        return True


def frozen_error(slot: int | None, migration_id: str) -> TryAgain:
    if slot is None:
        return TryAgain(f"a slot range of this shard is moving ({migration_id}); retry shortly")
    return TryAgain(f"slot {slot} is moving ({migration_id}); retry shortly", slot=slot)
