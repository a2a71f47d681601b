"""The hardened zerorpc transport (dkv.transport), on real zerorpc sockets in this process.

A channel left registered without a reader used to stop a server's only
dispatcher at its second event, so the whole server stopped answering.
"""
from __future__ import annotations

import socket
from typing import Any

import gevent
import pytest
import zerorpc
from zerorpc.channel import Channel

from dkv.transport import HEARTBEAT, RPCServer, harden


class Methods:
    def ping(self) -> str:
        return "pong"

    def slow(self, seconds: float) -> str:
        gevent.sleep(seconds)
        return "done"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server() -> Any:
    srv = RPCServer(Methods(), access={"ping": "client", "slow": "client"})
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    srv.bind(endpoint)
    runner = gevent.spawn(srv.run)
    yield srv, endpoint
    runner.kill()
    srv.close()


def _client(endpoint: str, timeout: float = 2) -> zerorpc.Client:
    c = zerorpc.Client(timeout=timeout, heartbeat=HEARTBEAT)
    harden(c)
    c.connect(endpoint)
    return c


def _orphan_channel(srv: RPCServer, channel_id: str) -> Channel:
    """Register a channel nobody reads, as an interrupted request task leaves behind."""
    mux = srv._multiplexer
    first = mux.new_event("ping", ())
    first.header["message_id"] = channel_id
    return Channel(mux, from_event=first)


def test_server_keeps_answering_past_a_channel_nobody_reads(server: Any) -> None:
    srv, endpoint = server
    orphan = _orphan_channel(srv, "orphan-1")
    peer = _client(endpoint)
    try:
        # Heartbeats for the orphan: the first fills zerorpc's one-slot queue,
        # the second would block its dispatcher for good.
        for _ in range(5):
            hb = peer._multiplexer.new_event("_zpc_hb", (0,), {"response_to": "orphan-1"})
            peer._multiplexer.emit_event(hb)
        assert peer.ping() == "pong"
        assert peer.ping() == "pong"
        assert orphan._queue.qsize() == 6  # queued for the (absent) reader, not blocking anyone
    finally:
        peer.close()


def test_unroutable_events_are_dropped_and_calls_go_on(server: Any) -> None:
    srv, endpoint = server
    peer = _client(endpoint)
    try:
        for i in range(50):
            hb = peer._multiplexer.new_event("_zpc_hb", (0,), {"response_to": f"gone-{i}"})
            peer._multiplexer.emit_event(hb)
        assert peer.ping() == "pong"
        assert srv._multiplexer.active_channels == {}
    finally:
        peer.close()


def test_request_channels_are_closed_when_calls_end_or_clients_vanish(server: Any) -> None:
    srv, endpoint = server
    peer = _client(endpoint, timeout=0.3)
    with pytest.raises(zerorpc.TimeoutExpired):
        peer.slow(0.6)  # we give up first: the server's task outlives our call
    peer.close()  # no more heartbeats: the server's side must notice and let go
    deadline = gevent.get_hub().loop.now() + 10
    while srv._multiplexer.active_channels and gevent.get_hub().loop.now() < deadline:
        gevent.sleep(0.05)
    assert srv._multiplexer.active_channels == {}
    other = _client(endpoint)
    try:
        assert other.slow(0.01) == "done"
        assert srv._multiplexer.active_channels == {}
    finally:
        other.close()
