"""The Python client (:class:`Client`)."""
from dkv.client.client import Client

__all__ = ["Client"]
