"""Node configuration: one validated dataclass built from flags / ``DKV_*`` variables."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field

from dkv.auth import Credentials, load_auth_dir
from dkv.errors import InvalidArgument
from dkv.keys import DEFAULT_MAX_KEY, DEFAULT_MAX_VALUE, Limits

ENGINES = ("leveldb", "memory")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass
class NodeConfig:
    node_id: str = ""
    host: str = "127.0.0.1"
    port: int = 7000
    #: port of the HTTP listener (/metrics, /health, /v1 JSON API) on ``host``; 0: none
    http_port: int = 0
    #: the HOST:PORT peers and clients use to reach this node (default host:port)
    advertise: str = ""
    data_dir: str = ""
    engine: str = "leveldb"
    log_level: str = "INFO"
    max_key_bytes: int = DEFAULT_MAX_KEY
    max_value_bytes: int = DEFAULT_MAX_VALUE
    wal_segment_bytes: int = 64 * 1024 * 1024
    #: at start, cut a corrupt WAL at the corruption after copying the cut bytes to a quarantine file
    wal_repair: bool = False
    #: most records one group commit takes from the queue
    max_batch_records: int = 8192
    # -- cluster mode (zk set) --
    #: ZooKeeper connection string, optionally with a chroot: "h1:2181,h2:2181/my-cluster"
    zk: str = ""
    replication_factor: int = 3
    write_quorum: int = 2
    #: ZooKeeper session timeout (s): how long a silent node keeps its role
    session_timeout: float = 10.0
    #: how long a write waits for its quorum before it is rolled back (s)
    write_timeout: float = 5.0
    #: a replica further behind than this many records refuses reads
    max_replica_lag: int = 1000
    #: records per second a slot migration imports at most (0: as fast as it can)
    migration_rate: int = 0
    #: seconds a migrating range may stay frozen (unavailable) before the move is cancelled
    migration_freeze_timeout: float = 10.0
    #: seconds between a writer's digest comparisons with its replicas (0: never)
    anti_entropy_interval: float = 30.0
    # -- security (DESIGN §10) --
    #: directory of cluster.key (see `dkv auth init`): CURVE on every socket, ZooKeeper ACLs
    auth_dir: str = ""
    #: allow a non-loopback --host without --auth-dir (anyone who reaches the port controls the node)
    insecure: bool = False
    #: the cluster key, loaded from auth_dir (None: no auth)
    credentials: Credentials | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.node_id:
            self.node_id = f"node-{self.port}"
        if not self.data_dir:
            self.data_dir = os.path.join("dkv-data", self.node_id)
        self.log_level = self.log_level.upper()
        self.validate()
        if self.auth_dir:
            self.credentials = load_auth_dir(self.auth_dir)

    def validate(self) -> None:
        if self.engine not in ENGINES:
            raise InvalidArgument(f"--engine must be one of {', '.join(ENGINES)}, not {self.engine!r}")
        if not 0 < self.port < 65536:
            raise InvalidArgument(f"--port must be 1..65535, not {self.port}")
        if not 0 <= self.http_port < 65536 or self.http_port == self.port:
            raise InvalidArgument(
                f"--http-port must be 1..65535 and not --port ({self.port}), or 0 for none, not {self.http_port}"
            )
        if self.log_level not in LOG_LEVELS:
            raise InvalidArgument(f"--log-level must be one of {', '.join(LOG_LEVELS)}")
        if self.max_key_bytes < 1 or self.max_value_bytes < 0:
            raise InvalidArgument("key/value limits must be positive")
        if self.wal_segment_bytes < 4096:
            raise InvalidArgument("--wal-segment-bytes must be at least 4096")
        if self.replication_factor < 1:
            raise InvalidArgument(f"--replication-factor must be at least 1, not {self.replication_factor}")
        if not 1 <= self.write_quorum <= self.replication_factor:
            raise InvalidArgument(
                f"--write-quorum must be between 1 and --replication-factor "
                f"({self.replication_factor}), not {self.write_quorum}"
            )
        if self.session_timeout <= 0 or self.write_timeout <= 0:
            raise InvalidArgument("--session-timeout and --write-timeout must be positive")
        if self.cluster and not self.advertise and self.host in ("0.0.0.0", "::", ""):
            raise InvalidArgument(
                f"--host {self.host} listens everywhere: give --advertise HOST:PORT, "
                "the address peers and clients should use"
            )
        if self.max_replica_lag < 0:
            raise InvalidArgument("--max-replica-lag must be >= 0")
        if self.migration_rate < 0:
            raise InvalidArgument("--migration-rate must be >= 0")
        if self.migration_freeze_timeout <= 0:
            raise InvalidArgument("--migration-freeze-timeout must be positive")
        if self.anti_entropy_interval < 0:
            raise InvalidArgument("--anti-entropy-interval must be >= 0 (0 disables it)")
        if not self.auth_dir and not self.insecure and not is_loopback(self.host):
            raise InvalidArgument(
                f"--host {self.host} is not a loopback address and the node has no --auth-dir: anyone who "
                "can reach the port could read, overwrite or wipe its data and its replicas. Make keys "
                "with `dkv auth init DIR` and give --auth-dir DIR, or, on a network you trust entirely, "
                "give --insecure"
            )

    @property
    def addr(self) -> str:
        return self.advertise or f"{self.host}:{self.port}"

    @property
    def endpoint(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    @property
    def limits(self) -> Limits:
        return Limits(self.max_key_bytes, self.max_value_bytes)

    @property
    def cluster(self) -> bool:
        return bool(self.zk)

    @property
    def durable(self) -> bool:
        return self.engine != "memory"


def is_loopback(host: str) -> bool:
    """Is ``host`` a loopback address (or ``localhost``)? Names other than localhost are not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
