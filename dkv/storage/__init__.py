"""The storage package: raw ordered engines and the slot-aware :class:`Store` over them."""

from dkv.storage.engine import Engine, EngineSnapshot
from dkv.storage.leveldb import LevelDBEngine
from dkv.storage.memory import MemoryEngine
from dkv.storage.store import Batch, Store, StoreSnapshot

__all__ = ["Batch", "Engine", "EngineSnapshot", "LevelDBEngine", "MemoryEngine", "Store", "StoreSnapshot"]
