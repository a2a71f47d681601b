"""Watches: the committed changes of a shard, streamed from its writer (DESIGN §11).

The writer's :class:`~dkv.watch.feed.Feed` takes every committed batch from the
write pipeline; each ``watch`` RPC (:mod:`dkv.watch.stream`) reads the log's
history from the asked revision, then follows the feed live, and ends when this
node stops writing (part of) the slots it covers. The client
(:mod:`dkv.client.watch`) opens one stream per writer and merges them.

**The stream** (a zerorpc stream: ``watch(prefix, slots, since)``; ``slots`` is a
list of ``[start, end]`` slot ranges, None for every slot this node's shard owns;
``since`` is a revision, None for "from now") yields messages:

* ``["events", rev, excluded, [[type, key, value, revision], ...]]``: events in
  revision order (``type`` is ``"set"``, ``"delete"`` or ``"expire"``; ``value`` is
  ``b""`` but for a set), then a *progress mark*: every event of the covered
  slots with a revision ``<= rev`` has now been sent, except in the ``excluded``
  ``[start, end]`` ranges (frozen by a migration out of the shard: the target's
  revisions after the move may be below ``rev``). The list may be empty: an idle
  stream sends a mark every :data:`MARK_INTERVAL` seconds.
* ``["end", [code, message, data]]``: the last message (:func:`dkv.errors.to_wire`).
  ``MOVED``/``UNAVAILABLE``/``TRYAGAIN``: this node no longer writes (part of)
  the slots, or cut the watcher off (too slow, shutting down); everything
  committed in the covered slots up to the last mark (and, for a range that
  moved, up to the move) was sent, so the client resumes elsewhere from its
  cursor. ``COMPACTED`` (``data["revision"]``): the log no longer holds the
  history after ``since``.

Only PUT/DELETE/EXPIRE records are events; a migration's IMPORT/PURGE and the
revision floors (NOOP) are not, but still advance the progress mark.
"""

from __future__ import annotations

#: the tag of an events/progress message, and of the last message
EVENTS = "events"
END = "end"
#: an idle stream sends a progress mark this often (s)
MARK_INTERVAL = 1.0
