"""dkv: a distributed key-value store.

``dkv.Client`` is the Python client; ``dkv.errors`` holds the typed errors.
"""

from __future__ import annotations

import logging
from typing import Any

__version__ = "0.1.0"
__all__ = ["Client", "errors", "slot_of", "__version__"]

from dkv import errors
from dkv.slots import slot_of

# A library configures no logging: without this, Python's last-resort handler would print the
# library's warnings to the stderr of a program that configured none (see dkv.logs).
logging.getLogger(__name__).addHandler(logging.NullHandler())


def __getattr__(name: str) -> Any:
    # Imported lazily so that `import dkv` does not pull in gevent/zerorpc
    # (the CLI's bench monkey-patches before importing them).
    if name == "Client":
        from dkv.client import Client

        return Client
    raise AttributeError(name)
