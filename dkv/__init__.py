"""dkv: a distributed key-value store.

``dkv.Client`` is the Python client; ``dkv.errors`` holds the typed errors.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Client", "errors", "slot_of", "__version__"]

from dkv import errors
from dkv.slots import slot_of


def __getattr__(name: str) -> Any:
    # Imported lazily so that `import dkv` does not pull in gevent/zerorpc
    # (the CLI's bench monkey-patches before importing them).
    if name == "Client":
        from dkv.client import Client

        return Client
    raise AttributeError(name)
