"""Node configuration: one validated dataclass built from flags / ``DKV_*`` variables."""
from __future__ import annotations

import os
from dataclasses import dataclass

from dkv.errors import InvalidArgument
from dkv.keys import DEFAULT_MAX_KEY, DEFAULT_MAX_VALUE, Limits

ENGINES = ("leveldb", "memory")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass
class NodeConfig:
    node_id: str = ""
    host: str = "127.0.0.1"
    port: int = 7000
    data_dir: str = ""
    engine: str = "leveldb"
    log_level: str = "INFO"
    max_key_bytes: int = DEFAULT_MAX_KEY
    max_value_bytes: int = DEFAULT_MAX_VALUE
    wal_segment_bytes: int = 64 * 1024 * 1024
    #: most records one group commit takes from the queue
    max_batch_records: int = 8192

    def __post_init__(self) -> None:
        if not self.node_id:
            self.node_id = f"node-{self.port}"
        if not self.data_dir:
            self.data_dir = os.path.join("dkv-data", self.node_id)
        self.log_level = self.log_level.upper()
        self.validate()

    def validate(self) -> None:
        if self.engine not in ENGINES:
            raise InvalidArgument(f"--engine must be one of {', '.join(ENGINES)}, not {self.engine!r}")
        if not 0 < self.port < 65536:
            raise InvalidArgument(f"--port must be 1..65535, not {self.port}")
        if self.log_level not in LOG_LEVELS:
            raise InvalidArgument(f"--log-level must be one of {', '.join(LOG_LEVELS)}")
        if self.max_key_bytes < 1 or self.max_value_bytes < 0:
            raise InvalidArgument("key/value limits must be positive")
        if self.wal_segment_bytes < 4096:
            raise InvalidArgument("--wal-segment-bytes must be at least 4096")

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def endpoint(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    @property
    def limits(self) -> Limits:
        return Limits(self.max_key_bytes, self.max_value_bytes)

    @property
    def durable(self) -> bool:
        return self.engine != "memory"
