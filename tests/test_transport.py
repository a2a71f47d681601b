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

from dkv.client.connection import Connection, TransportError
from dkv.errors import Internal, InvalidArgument
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


# -- lean calls (dkv.transport.LeanClient) --------------------------------------------


class Failing(Methods):
    def boom(self) -> None:
        raise InvalidArgument("no such thing")

    def crash(self) -> None:
        raise RuntimeError("a bug")


@pytest.fixture
def lean_server() -> Any:
    srv = RPCServer(Failing(), access={"ping": "client", "slow": "client", "boom": "client", "crash": "client"})
    endpoint = f"127.0.0.1:{_free_port()}"
    srv.bind(f"tcp://{endpoint}")
    runner = gevent.spawn(srv.run)
    yield srv, endpoint
    runner.kill()
    srv.close()


def test_lean_calls_answer_results_and_typed_errors_without_channels(lean_server: Any) -> None:
    srv, addr = lean_server
    conn = Connection(addr, timeout=5)
    try:
        assert conn.request("ping") == "pong"
        assert [g.get() for g in [gevent.spawn(conn.request, "slow", 0.05) for _ in range(8)]] == ["done"] * 8
        with pytest.raises(InvalidArgument, match="no such thing"):
            conn.request("boom")
        with pytest.raises(Internal, match="internal error in 'crash'"):
            conn.request("crash")
        with pytest.raises(InvalidArgument, match="unknown method"):
            conn.request("_zerorpc_inspect")
        with pytest.raises(InvalidArgument, match="ping"):
            conn.request("ping", 1)
        assert srv._multiplexer._active_channels == {}  # no zerorpc channel was opened
        assert conn.request("ping") == "pong"
    finally:
        conn.close()


def test_a_dropped_connection_fails_lean_calls_in_flight_at_once(lean_server: Any) -> None:
    """A node that goes away fails the calls in flight with a transport error at once, not
    at the (long) timeout; the next call opens a fresh socket and works."""
    srv, addr = lean_server
    conn = Connection(addr, timeout=60)
    try:
        assert conn.request("ping") == "pong"
        call = gevent.spawn(conn.request, "slow", 30)
        with gevent.Timeout(10):  # a bound on the test: the request reaches the node at once
            while not srv._inflight:
                gevent.sleep(0.01)
        srv.close()  # the node's socket goes away: the peer sees the connection drop
        call.join(timeout=20)  # a bound on the test, not an assertion: 60 s would be the timeout
        assert call.ready(), "the call in flight was not failed when the connection dropped"
        assert isinstance(call.exception, TransportError)
        assert "lost the connection" in str(call.exception)
    finally:
        conn.close()


def test_classic_zerorpc_clients_still_work_beside_lean_ones(lean_server: Any) -> None:
    _, addr = lean_server
    classic = _client(f"tcp://{addr}")
    conn = Connection(addr, timeout=5)
    try:
        assert classic.ping() == "pong"
        assert conn.request("ping") == "pong"
        assert classic.slow(0.01) == "done"
    finally:
        classic.close()
        conn.close()


def test_a_lean_call_to_an_address_nobody_listens_on_fails_fast() -> None:
    """Nothing listening: the call fails once the connect wait is over (nothing was sent),
    not at its (long) timeout; the same Connection works once a node listens there."""
    addr = f"127.0.0.1:{_free_port()}"
    conn = Connection(addr, timeout=60)
    try:
        call = gevent.spawn(conn.request, "ping")
        call.join(timeout=20)  # a bound on the test, not an assertion: 60 s would be the timeout
        assert call.ready(), "the call waited for its timeout"
        assert isinstance(call.exception, TransportError)
        assert "cannot connect" in str(call.exception)
        srv = RPCServer(Failing(), access={"ping": "client"})
        srv.bind(f"tcp://{addr}")
        runner = gevent.spawn(srv.run)
        try:
            assert conn.request("ping") == "pong"
        finally:
            runner.kill()
            srv.close()
    finally:
        conn.close()


def test_a_silent_node_fails_lean_calls_in_flight_and_a_slow_live_one_does_not() -> None:
    """A node that accepts the connection but sends nothing (stopped, wedged) fails the calls
    in flight once it has been silent for the watchdog's limit, long before their timeout; a
    live node that takes longer than that to answer one call is pinged and not given up on."""
    import zmq

    from dkv.transport import LEAN_HEARTBEAT_TIMEOUT, GreenContext

    addr = f"127.0.0.1:{_free_port()}"
    mute = GreenContext.instance().socket(zmq.ROUTER)  # takes the connection, never answers
    mute.linger = 0
    mute.bind(f"tcp://{addr}")
    conn = Connection(addr, timeout=60)
    try:
        call = gevent.spawn(conn.request, "ping")
        call.join(timeout=20)  # a bound on the test: 60 s would be the call's timeout
        assert call.ready(), "a call to a silent node waited for its timeout"
        assert isinstance(call.exception, TransportError)
        assert "sent nothing" in str(call.exception)
    finally:
        conn.close()
        mute.close()

    srv = RPCServer(Failing(), access={"ping": "client", "slow": "client"})
    addr = f"127.0.0.1:{_free_port()}"
    srv.bind(f"tcp://{addr}")
    runner = gevent.spawn(srv.run)
    conn = Connection(addr, timeout=60)
    try:
        assert conn.request("slow", LEAN_HEARTBEAT_TIMEOUT + 1.5) == "done"
    finally:
        conn.close()
        runner.kill()
        srv.close()
