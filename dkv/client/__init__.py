"""The Python client (:class:`Client`), and what its calls return."""

from dkv.client.client import Client, Meta
from dkv.client.watch import Event, Watch

__all__ = ["Client", "Event", "Meta", "Watch"]
