"""dkv's logging policy: who may print what.

* **The library** never configures logging. Its loggers live under ``dkv`` (which
  holds one ``NullHandler``, so Python's last-resort handler, which prints any
  WARNING of a program that configured nothing to stderr, stays out of it); an
  application that configures logging sees them as usual.
* **ZooKeeper:** every kazoo client dkv makes logs through :data:`ZK_LOGGER`
  (``dkv.zookeeper``, ``KazooClient(logger=...)``), not kazoo's own ``kazoo.client``:
  its reconnect messages ("Connection dropped: ...") are dkv's to show or not.
  A node's log holds them (``dkv serve`` logs everything at its ``--log-level``).
* **The command-line tools** (``dkv cli``, ``admin``, ``bench``) print results and
  one line per error themselves; logging prints nothing unless asked with ``-v``
  (:func:`setup_cli`).

This module imports nothing but the standard library (``dkv bench`` must patch
gevent before anything else loads it).
"""

from __future__ import annotations

import logging
import sys

#: the logger of every kazoo client dkv makes (``KazooClient(logger=ZK_LOGGER)``)
ZK_LOGGER = logging.getLogger("dkv.zookeeper")

#: ``-v`` count -> level of the command-line tools' log output on stderr
CLI_LEVELS = {1: logging.INFO, 2: logging.DEBUG}


def setup_cli(verbose: int) -> None:
    """Logging of a command-line tool: nothing at all (``verbose`` 0: a ``NullHandler`` on the
    root logger, so not even the last-resort handler prints), else INFO (``-v``) or DEBUG
    (``-vv``) records of every logger, kazoo's included, on stderr."""
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "dkv_cli", False)]:  # called again (in-process)
        root.removeHandler(h)
    handler: logging.Handler
    if verbose <= 0:
        handler = logging.NullHandler()
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.setLevel(CLI_LEVELS.get(verbose, logging.DEBUG))
    setattr(handler, "dkv_cli", True)  # ours: replaced if called again
    root.addHandler(handler)


class LastWarning(logging.Handler):
    """Remembers the last WARNING (or worse) a logger emitted: why a connection attempt that
    ends in a time-out failed ("Connection refused"), for a one-line error."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.message = ""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Connection dropped: "):  # kazoo's words for a failed attempt
            message = message[len("Connection dropped: ") :]
        elif "retry policy" in message:  # kazoo's summary when it gives up: keep the cause
            return
        self.message = message
