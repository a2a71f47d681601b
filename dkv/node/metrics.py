"""A node's Prometheus metrics: one registry per node, read from the node's live state at scrape time.

Nothing here is touched on the request path. The hot paths keep plain counters and
:class:`~dkv.stats.Histogram` bucket lists (:mod:`dkv.stats`: ops by name and
outcome in :class:`~dkv.node.service.NodeService`, group commits in the
:class:`~dkv.node.pipeline.WritePipeline`, fsyncs in the WAL); at each scrape
:class:`NodeCollector` reads them, and the node's role, replication, migration and
ZooKeeper state, into ``prometheus_client`` metric families (which render the
exposition format). Every metric is named ``dkv_*``; the ``process_*`` ones come
from ``prometheus_client``'s process collector.

The families (``{labels}``):

* identity: ``dkv_node_info{node_id,version,mode,engine}``, ``dkv_role{role,shard}``
  (1; ``standalone`` nodes are the ``writer`` of ``shard-0``), ``dkv_epoch``,
  ``dkv_uptime_seconds``;
* requests: ``dkv_ops_total{op,outcome}`` and ``dkv_op_duration_seconds{op,outcome}``
  (the latency of the batch request that carried the op; outcome ``ok`` or an error
  code such as ``moved``; ``op="batch"`` counts requests refused whole),
  ``dkv_rpc_connections`` (TCP connections open to the RPC port: clients and peers),
  ``dkv_watch_streams``;
* writes: ``dkv_group_commits_total``, ``dkv_group_commit_records_total``,
  ``dkv_group_commit_size_records`` and ``dkv_group_commit_duration_seconds``
  (handed to the writer -> committed: WAL fsync, plus the quorum in a cluster),
  ``dkv_write_queue_ops``, ``dkv_checkpoints_total``, ``dkv_write_pipeline_failed``;
* storage: ``dkv_wal_bytes``, ``dkv_wal_segments``, ``dkv_wal_appends_total``,
  ``dkv_wal_fsyncs_total``, ``dkv_wal_fsync_duration_seconds``, ``dkv_wal_first_lsn``,
  ``dkv_wal_last_lsn``, ``dkv_applied_lsn``, ``dkv_applied_revision``,
  ``dkv_expired_keys_total``;
* cluster mode: ``dkv_zk_connected``, ``dkv_zk_state{state}`` (kazoo's ``CONNECTED``,
  ``SUSPENDED``, ``LOST``), ``dkv_cluster_map_loaded``, ``dkv_slot_map_version``,
  ``dkv_cluster_migrations`` (moves recorded in ZooKeeper), ``dkv_promised_epoch``;
  on a writer ``dkv_commit_lsn``, per replica ``dkv_replica_lag_records{replica}``,
  ``dkv_replica_match_lsn{replica}``, ``dkv_replica_in_sync{replica}``, and
  ``dkv_anti_entropy_rounds_total`` / ``dkv_anti_entropy_diverged_total``; on a
  replica ``dkv_replication_lag_records`` and ``dkv_replication_last_contact_seconds``;
  on the writer importing a slot range ``dkv_migration_imported_records{migration,source}``,
  ``dkv_migration_phase{migration,phase}`` (1) and ``dkv_migration_frozen_seconds``.
"""

from __future__ import annotations

import time
from typing import Any, Iterator

from prometheus_client import ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from dkv import __version__
from dkv.stats import Histogram

#: kazoo's connection states (dkv_zk_state)
ZK_STATES = ("CONNECTED", "SUSPENDED", "LOST")


def _histogram(name: str, doc: str, labels: list[str] | None = None) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, doc, labels=labels)


def _add(family: HistogramMetricFamily, labels: list[str], h: Histogram) -> None:
    family.add_metric(labels, h.buckets(), h.total)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


class NodeCollector(Collector):
    """Reads a :class:`~dkv.node.server.Node` into metric families at each scrape (on the hub)."""

    def __init__(self, node: Any) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        node = self.node
        cfg, svc, pipeline, log, store = node.config, node.service, node.pipeline, node.log, node.store
        rt = node.runtime
        info = GaugeMetricFamily(
            "dkv_node_info", "This node (value 1).", labels=["node_id", "version", "mode", "engine"]
        )
        info.add_metric([cfg.node_id, __version__, "cluster" if rt is not None else "standalone", cfg.engine], 1)
        yield info
        role = GaugeMetricFamily("dkv_role", "The node's role and shard (value 1).", labels=["role", "shard"])
        if rt is None:
            role.add_metric(["writer", "shard-0"], 1)
        else:
            role.add_metric([rt.role, rt.shard.id if rt.shard else ""], 1)
        yield role
        yield _gauge("dkv_epoch", "The epoch this node writes in (writer) or its shard's epoch.", self._epoch())
        yield _gauge("dkv_uptime_seconds", "Seconds since the node started.", time.time() - svc.started)

        ops = CounterMetricFamily("dkv_ops", "Ops answered, by op and outcome.", labels=["op", "outcome"])
        latency = _histogram(
            "dkv_op_duration_seconds", "Latency of the request that carried each op.", ["op", "outcome"]
        )
        for (op, outcome), h in sorted(svc.op_stats.by_key.items()):
            counts = h.buckets()
            ops.add_metric([op, outcome], counts[-1][1])
            latency.add_metric([op, outcome], counts, h.total)
        yield ops
        yield latency
        server = node.rpc_server
        yield _gauge(
            "dkv_rpc_connections",
            "TCP connections open to the RPC port (clients and peers).",
            server.connections if server is not None else 0,
        )
        yield _gauge("dkv_watch_streams", "Watch streams open.", node.watches.streams)

        yield _counter("dkv_group_commits", "Batches of writes committed (group commits).", pipeline.batches)
        yield _counter("dkv_group_commit_records", "Records committed.", pipeline.records)
        sizes = _histogram("dkv_group_commit_size_records", "Records per group commit.")
        _add(sizes, [], pipeline.batch_sizes)
        yield sizes
        commit = _histogram(
            "dkv_group_commit_duration_seconds",
            "Seconds from handing a batch to the writer to its commit (fsync; quorum).",
        )
        _add(commit, [], pipeline.commit_seconds)
        yield commit
        yield _gauge("dkv_write_queue_ops", "Write ops queued for the next group commit.", pipeline.queued)
        yield _counter("dkv_checkpoints", "Storage checkpoints run by the write pipeline.", pipeline.checkpoints)
        yield _gauge(
            "dkv_write_pipeline_failed",
            "1 if the log failed and the node refuses writes until restart.",
            1 if pipeline.failure is not None else 0,
        )

        wal = log.stats
        yield _gauge("dkv_wal_bytes", "Bytes of WAL segment files.", wal["bytes"])
        yield _gauge("dkv_wal_segments", "WAL segment files.", wal["segments"])
        yield _counter("dkv_wal_appends", "WAL appends (one write each).", wal["appends"])
        yield _counter("dkv_wal_fsyncs", "WAL data syncs.", wal["fsyncs"])
        fsync = _histogram("dkv_wal_fsync_duration_seconds", "Seconds each WAL fdatasync took.")
        fsync_h = getattr(log, "fsync_seconds", None)
        if fsync_h is not None:
            _add(fsync, [], fsync_h)
            yield fsync
        yield _gauge("dkv_wal_first_lsn", "Lowest LSN the WAL retains.", wal["first_lsn"])
        yield _gauge("dkv_wal_last_lsn", "Last LSN in the WAL.", wal["last_lsn"])
        yield _gauge("dkv_applied_lsn", "Last LSN applied to storage.", store.applied_lsn)
        yield _gauge("dkv_applied_revision", "Last revision applied to storage.", store.applied_rev)
        yield _counter(
            "dkv_expired_keys",
            "Keys this node expired through the log.",
            node.expirer.expired if node.expirer is not None else 0,
        )
        if rt is not None:
            yield from self._cluster(rt)

    def _epoch(self) -> int:
        rt = self.node.runtime
        if rt is None:
            return int(self.node.pipeline.epoch)
        if rt.writer is not None:
            return int(rt.writer.epoch)
        return int(rt.shard.epoch) if rt.shard is not None else 0

    def _cluster(self, rt: Any) -> Iterator[Metric]:
        coord = rt.coord
        yield _gauge("dkv_zk_connected", "1 while the ZooKeeper session is connected.", 1 if coord.connected else 0)
        state = GaugeMetricFamily(
            "dkv_zk_state", "The ZooKeeper connection state (1 for the current one).", labels=["state"]
        )
        current = str(coord.zk.state)
        for s in ZK_STATES:
            state.add_metric([s], 1 if current == s else 0)
        yield state
        yield _gauge("dkv_cluster_map_loaded", "1 once the node has read the cluster map.", 1 if coord.loaded else 0)
        view = rt.view
        yield _gauge("dkv_slot_map_version", "Version of the slot map this node follows.", view.slot_version)
        yield _gauge("dkv_cluster_migrations", "Slot range moves recorded in ZooKeeper.", len(view.migrations))
        yield _gauge("dkv_promised_epoch", "Highest epoch this node promised.", rt.follower.state.promised)
        if rt.writer is not None:
            lag = rt.writer.lag()
            yield _gauge("dkv_commit_lsn", "The shard's commit point (on its writer).", lag["commit_lsn"])
            behind = GaugeMetricFamily(
                "dkv_replica_lag_records", "Records a replica's log is behind ours.", labels=["replica"]
            )
            match = GaugeMetricFamily(
                "dkv_replica_match_lsn", "Last LSN known to match in a replica's log.", labels=["replica"]
            )
            in_sync = GaugeMetricFamily(
                "dkv_replica_in_sync", "1 if the replica gets every prepare.", labels=["replica"]
            )
            for rid, r in sorted(lag["replicas"].items()):
                in_sync.add_metric([rid], 1 if r["state"] == "in_sync" else 0)
                if r["match_lsn"] is not None:
                    match.add_metric([rid], r["match_lsn"])
                    behind.add_metric([rid], r["lag"])
            yield behind
            yield match
            yield in_sync
            ae = lag["anti_entropy"]
            yield _counter("dkv_anti_entropy_rounds", "Digest comparisons with the replicas.", ae["rounds"])
            yield _counter("dkv_anti_entropy_diverged", "Replicas found diverged (and re-synced).", ae["diverged"])
        elif rt.role == "replica":
            yield _gauge(
                "dkv_replication_lag_records", "Committed records this replica has not applied.", rt.follower.lag()
            )
            contact = rt.follower.last_contact
            if contact:
                yield _gauge(
                    "dkv_replication_last_contact_seconds",
                    "Seconds since the writer last reached us.",
                    time.monotonic() - contact,
                )
        migrator = rt.migrator
        if migrator is not None and not migrator.dead:
            p = migrator.progress()
            imported = GaugeMetricFamily(
                "dkv_migration_imported_records",
                "Records the slot range move into our shard imported.",
                labels=["migration", "source", "slots"],
            )
            slots = f"{p['slots'][0]}-{p['slots'][1]}"
            imported.add_metric([p["id"], p["source"], slots], p["imported"])
            yield imported
            phase = GaugeMetricFamily(
                "dkv_migration_phase", "The move's phase (value 1).", labels=["migration", "phase"]
            )
            phase.add_metric([p["id"], str(p["phase"])], 1)
            yield phase
            if p["frozen_ms"] is not None:
                yield _gauge(
                    "dkv_migration_frozen_seconds", "Seconds the moving range has been frozen.", p["frozen_ms"] / 1000
                )


def node_registry(node: Any) -> CollectorRegistry:
    """A registry of its own for ``node`` (never the process-global default one)."""
    registry = CollectorRegistry()
    registry.register(NodeCollector(node))
    ProcessCollector(registry=registry)
    return registry
