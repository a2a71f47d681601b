"""zerorpc, hardened: the one module that reaches into zerorpc's channel internals.

zerorpc reads each socket with one dispatcher greenlet, which hands every event
to its channel with a *blocking* put into a one-slot queue. A channel left
registered without a reader therefore stops the dispatcher at its second event,
and every other call on that socket with it: a server goes deaf (all RPCs time
out) while its hub sits idle. zerorpc leaves such channels behind itself: a
request's heartbeat kills the request greenlet with ``LostRemote`` when the
client goes quiet, and if that lands while the greenlet is closing its channel
stack (closing yields), the close stops half-way. A node restarted on the port
of a busy one, whose clients' old sockets deliver stale requests and heartbeats,
hit this about once in 20 restarts.

Two fixes, both local to the sockets dkv creates (no global patching):

* :func:`harden` replaces a socket's dispatcher with one that never blocks: a
  channel's queue grows instead, and an event for a channel whose backlog is
  beyond any live reader's (``MAX_CHANNEL_BACKLOG``) is dropped with a warning.
* :class:`RPCServer` closes each request's channel stack without yielding, so a
  late ``LostRemote`` cannot interrupt it.
"""
from __future__ import annotations

import logging
import sys
from typing import Any

import gevent
import zerorpc
from zerorpc.channel import BufferedChannel, Channel, ChannelMultiplexer
from zerorpc.heartbeat import HeartBeatOnChannel

from dkv.errors import DKVError

logger = logging.getLogger(__name__)

#: zerorpc heartbeat (s): a silent peer is declared lost after two missed beats.
#: Clients and nodes use the same value (zerorpc expects both ends to agree).
HEARTBEAT = 1.0

#: Events queued for one channel before it counts as abandoned. A live channel
#: holds one request or reply and a few heartbeats.
MAX_CHANNEL_BACKLOG = 1000


def quiet_lost_remote(hub: Any) -> None:
    """Don't print zerorpc's LostRemote from its internal greenlets: it is an expected
    outcome (a peer died), reported to the caller as a transport error."""
    if zerorpc.LostRemote not in hub.NOT_ERROR:
        hub.NOT_ERROR = (*hub.NOT_ERROR, zerorpc.LostRemote)


def harden(socket: zerorpc.Server | zerorpc.Client) -> None:
    """Give a zerorpc server or client a dispatcher that never blocks (see the module doc).

    Call it in the thread that owns the socket, before its first call or ``run``.
    """
    mux: ChannelMultiplexer = socket._multiplexer
    old = mux._channel_dispatcher_task
    if old is not None:
        old.kill(block=False)  # spawned but not started: it never reads an event
    mux._channel_dispatcher_task = gevent.spawn(_dispatch, mux)


def _dispatch(mux: ChannelMultiplexer) -> None:
    events = mux._events
    while True:
        try:
            event = events.recv()
        except Exception:
            logger.exception("zerorpc dispatcher: error on recv, ignored")
            continue
        channel_id = event.header.get("response_to")
        if channel_id is None:
            if mux._broadcast_queue is not None:
                mux._broadcast_queue.put(event)  # new request: the acceptor always takes it at once
            continue
        channel = mux._active_channels.get(channel_id)
        if channel is None:
            # A heartbeat or late reply for a call that has ended (its peer gave
            # up, or it was meant for the previous process on this port).
            continue
        queue = channel._queue
        if queue.maxsize is not None:
            queue.maxsize = None
        if queue.qsize() >= MAX_CHANNEL_BACKLOG:
            logger.warning("zerorpc channel %s has %d unread events: abandoned, dropping %s",
                           channel_id, queue.qsize(), event.name)
            continue
        queue.put_nowait(event)


def _close_now(bufchan: BufferedChannel, hbchan: HeartBeatOnChannel, channel: Channel) -> None:
    """Close a request's channel stack without yielding (zerorpc's own close yields at
    each greenlet kill, where a late LostRemote can cut it short)."""
    hbchan._closed = True  # its heartbeat must not kill us any more
    for holder, attr in ((bufchan, "_recv_task"), (hbchan, "_heartbeat_task"), (hbchan, "_recv_task")):
        task = getattr(holder, attr)
        if task is not None:
            task.kill(block=False)
            setattr(holder, attr, None)
    bufchan._channel = hbchan._channel = None
    channel.close()


class RPCServer(zerorpc.Server):
    """A zerorpc server with a non-blocking dispatcher and leak-free request tasks;
    it logs expected errors (:class:`DKVError`) quietly and real faults with a traceback."""

    def __init__(self, methods: Any, **kwargs: Any) -> None:
        super().__init__(methods, heartbeat=HEARTBEAT, **kwargs)
        quiet_lost_remote(gevent.get_hub())
        harden(self)

    def _print_traceback(self, protocol_v1: bool, exc_infos: list[Any]) -> tuple[str, ...]:
        exc_type, exc_value, _ = exc_infos
        if isinstance(exc_value, DKVError):
            logger.debug("request failed: %s: %s", exc_type.__name__, exc_value)
            return (exc_type.__name__, str(exc_value), "")
        return super()._print_traceback(protocol_v1, exc_infos)

    def _async_task(self, initial_event: Any) -> None:
        # zerorpc's ServerBase._async_task, with a close that cannot be cut short.
        protocol_v1 = initial_event.header.get("v", 1) < 2
        channel = self._multiplexer.channel(initial_event)
        hbchan = HeartBeatOnChannel(channel, freq=self._heartbeat_freq, passive=protocol_v1)
        bufchan = BufferedChannel(hbchan)
        try:
            event = bufchan.recv()
            try:
                self._context.hook_load_task_context(event.header)
                functor = self._methods.get(event.name, None)
                if functor is None:
                    raise NameError(event.name)
                functor.pattern.process_call(self._context, bufchan, event, functor)
            except zerorpc.LostRemote:
                logger.debug("client of %s went away before its answer", event.name)
            except Exception:
                exc_infos = list(sys.exc_info())
                reply = bufchan.new_event("ERR", self._print_traceback(protocol_v1, exc_infos),
                                          self._context.hook_get_task_context())
                self._context.hook_server_inspect_exception(event, reply, exc_infos)
                del exc_infos
                bufchan.emit_event(reply)
        except zerorpc.LostRemote:
            pass  # the client went away while we answered
        finally:
            _close_now(bufchan, hbchan, channel)
