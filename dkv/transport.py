"""The wire between dkv processes: lean calls, and zerorpc hardened (the one module that
reaches into zerorpc's internals).

**Lean calls** (:class:`LeanClient`, answered by :class:`RPCServer`) carry every
dkv RPC: one zerorpc-format event each way, without zerorpc's per-call channel,
buffered channel and heartbeat greenlets on both ends, which cost more than
ZeroMQ itself (benchmarks/README.md). Liveness comes from ZeroMQ's own heartbeat
and the socket monitor. All of dkv's sockets are pyzmq's green sockets
(:class:`GreenContext`). The node still serves classic zerorpc calls, made
robust as follows.

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

It is also where a node's socket is secured and bounded (DESIGN §10, G7):

* **CURVE** (:func:`secure_server`, :func:`secure_client`): with credentials
  (:mod:`dkv.auth`) traffic is encrypted and a :class:`ZapHandler` greenlet
  admits only the cluster and client public keys; ZeroMQ attaches the admitted
  role to every message, and :class:`RPCServer` lets internal RPCs through for
  the ``peer`` role only (:class:`~dkv.errors.AuthError` otherwise). A caller
  whose handshake is refused learns it at once (:class:`HandshakeWatch`).
* **Bounds:** ``ZMQ_MAXMSGSIZE`` drops a connection that sends an oversized
  message before any of it is buffered; high-water marks bound the queues per
  peer; a cap on requests in flight per connection, and on request bytes in
  flight per node, refuse the excess with ``Unavailable``; undecodable input is
  dropped and logged (at most ~200 bytes quoted, rate-limited); a call with the
  wrong arguments gets ``InvalidArgument``; any non-dkv exception is logged
  with its traceback and answered with a typed ``Internal`` error, no traceback.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import time
from typing import Any, Callable

import gevent
import gevent.event
import msgpack
import zerorpc
import zmq
import zmq.green
import zmq.utils.z85
from zerorpc.channel import BufferedChannel, Channel, ChannelMultiplexer
from zerorpc.events import Event, SequentialReceiver, get_pyzmq_frame_buffer
from zerorpc.heartbeat import HeartBeatOnChannel

from dkv.auth import PEER, Credentials
from dkv.errors import AuthError, DKVError, Internal, InvalidArgument, Unavailable
from dkv.keys import QUOTE_BYTES, quote

logger = logging.getLogger(__name__)

#: zerorpc heartbeat (s): a silent peer is declared lost after two missed beats.
#: Clients and nodes use the same value (zerorpc expects both ends to agree).
HEARTBEAT = 1.0

#: Events queued for one channel before it counts as abandoned. A live channel
#: holds one request or reply and a few heartbeats.
MAX_CHANNEL_BACKLOG = 1000

#: ZAP domain of dkv's server sockets, and the inproc endpoint ZeroMQ asks (RFC 27).
ZAP_DOMAIN = b"dkv"
ZAP_ENDPOINT = "inproc://zeromq.zap.01"

#: Messages queued per peer and direction in ZeroMQ. A client keeps at most a few
#: requests in flight; a peer that never reads its replies loses the excess.
SOCKET_HWM = 64
#: Requests one connection may have in flight; more are refused with Unavailable. Well
#: below SOCKET_HWM: each one's reply and heartbeats must fit the peer's send queue
#: (ZeroMQ drops, silently, what a ROUTER cannot queue). dkv's clients keep <= 8.
MAX_INFLIGHT_PER_CONNECTION = 16
#: Request bytes a node holds in flight, at least (several largest messages fit).
MIN_INFLIGHT_BYTES = 256 * 1024 * 1024
#: Undecodable input is logged at most once per this many seconds (with a count).
GARBAGE_LOG_INTERVAL = 10.0

#: A lean call's header flag (see :class:`LeanClient`).
LEAN = "dkv_lean"
#: A lean client fails the calls in flight to a node that sent nothing for this long (s; it
#: pings a quiet node meanwhile), and gives up a call when it could not connect for this
#: long (nothing was sent then).
LEAN_HEARTBEAT_TIMEOUT = 2 * HEARTBEAT
LEAN_CONNECT_TIMEOUT = 2 * HEARTBEAT

_ROLE = "dkv_role"  # set by the node on every request's header (a caller's value is overwritten)
_SIZE = "dkv_size"
_CONN = "dkv_conn"


# -- sockets ---------------------------------------------------------------------


class GreenContext(zerorpc.Context):
    """zerorpc's context, making pyzmq's own gevent sockets (``zmq.green``).

    zerorpc's sockets (``zerorpc.gevent_zmq``) poll the socket's state after
    every send and receive, raise and catch an ``EAGAIN`` each time one would
    block, and re-check on a one-second timer (logging "gevent_zeromq BUG"
    when that finds a missed event): about a third of a node's CPU under load.
    pyzmq's green sockets wait on the socket's edge-triggered FD directly.
    dkv's servers, their ZAP handler (which must share the servers' context)
    and lean clients all use this one context per process.
    """

    _green: "GreenContext | None" = None

    def socket(self, socket_type: int, **kwargs: Any) -> zmq.Socket:
        if self.closed:
            raise zmq.ZMQError(zmq.ENOTSUP)
        return zmq.green.Socket(self, socket_type)

    @classmethod
    def instance(cls) -> "GreenContext":  # type: ignore[override]
        if cls._green is None:
            cls._green = cls()
        return cls._green


# -- CURVE ---------------------------------------------------------------------


def secure_server(socket: zmq.Socket, creds: Credentials) -> None:
    """Serve with the cluster's CURVE key pair; the ZAP handler decides who gets in."""
    socket.curve_server = True
    socket.curve_secretkey = creds.server_secret()
    socket.curve_publickey = creds.server_public
    socket.zap_domain = ZAP_DOMAIN
    socket.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)  # no ZAP handler answering: nobody gets in


def secure_client(socket: zmq.Socket, creds: Credentials) -> None:
    """Connect with our key pair, and accept only a server holding the cluster's secret."""
    socket.curve_serverkey = creds.server_public
    socket.curve_publickey = creds.public
    socket.curve_secretkey = creds.secret


class ZapHandler:
    """ZeroMQ's authentication hook (RFC 27 ZAP) as a greenlet of the node's hub.

    libzmq asks it about every CURVE handshake on a socket with our ZAP domain; it
    admits the known public keys and names their role, which ZeroMQ then attaches
    to every message of that connection as its ``User-Id``.
    """

    def __init__(self, roles: dict[bytes, str]) -> None:
        self.roles = roles
        self.refused = 0
        self._socket = GreenContext.instance().socket(zmq.REP)
        self._socket.linger = 0
        self._socket.bind(ZAP_ENDPOINT)
        self._task = gevent.spawn(self._run)

    def _run(self) -> None:
        while True:
            try:
                frames = self._socket.recv_multipart()
            except zmq.ZMQError:
                return  # closed
            try:
                answer = self._answer(frames)
            except Exception:  # never let the handler die: without it nobody gets in
                logger.exception("ZAP handler: refusing a malformed request")
                answer = [b"1.0", frames[1] if len(frames) > 1 else b"", b"500", b"error", b"", b""]
            try:
                self._socket.send_multipart(answer)
            except zmq.ZMQError:
                return

    def _answer(self, frames: list[bytes]) -> list[bytes]:
        if len(frames) < 6:
            return [b"1.0", b"", b"500", b"malformed ZAP request", b"", b""]
        version, request_id, domain, address, _identity, mechanism = frames[:6]
        role = None
        if mechanism == b"CURVE" and domain == ZAP_DOMAIN and len(frames) == 7 and len(frames[6]) == 32:
            role = self.roles.get(zmq.utils.z85.encode(frames[6]))
        if role is None:
            self.refused += 1
            logger.warning(
                "refused a connection from %s: %s",
                address.decode(errors="replace")[:64],
                "unknown key" if mechanism == b"CURVE" else f"mechanism {mechanism[:16]!r}",
            )
            return [version, request_id, b"400", b"unknown key", b"", b""]
        return [version, request_id, b"200", b"OK", role.encode(), b""]

    def close(self) -> None:
        self._task.kill(block=False)
        self._socket.close()


class HandshakeWatch:
    """Watches a client socket's connection, so a caller whose key the node refuses (or a
    node without auth, or with other keys) gets :class:`AuthError` instead of a timeout,
    and (``on_lost``) a connection that drops fails its calls at once."""

    EVENTS = (
        zmq.EVENT_HANDSHAKE_SUCCEEDED
        | zmq.EVENT_HANDSHAKE_FAILED_AUTH
        | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
        | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
        | zmq.EVENT_DISCONNECTED
    )

    def __init__(
        self, socket: zmq.Socket, addr: str, secured: bool, on_lost: Callable[[str], None] | None = None
    ) -> None:
        self.addr = addr
        self.secured = secured
        self.failed = gevent.event.Event()
        #: set once a handshake has succeeded (calls wait for it before they send)
        self.up = gevent.event.Event()
        self.reason = ""
        self._on_lost = on_lost
        self._socket = socket
        self._monitor = socket.get_monitor_socket(self.EVENTS)
        self._task = gevent.spawn(self._run)

    def _run(self) -> None:
        from zmq.utils.monitor import recv_monitor_message

        while True:
            try:
                event = recv_monitor_message(self._monitor)["event"]
            except zmq.ZMQError:
                return
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.up.set()
                self.failed.clear()
            elif event == zmq.EVENT_DISCONNECTED:
                if self._on_lost is not None:
                    self._on_lost(self.reason if self.failed.is_set() else f"lost the connection to {self.addr}")
            elif not self.failed.is_set():
                if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    self.reason = f"{self.addr} refused our key (is it this cluster's client or cluster key?)"
                elif self.secured:
                    self.reason = (
                        f"{self.addr} did not accept an authenticated connection (does it run "
                        "without --auth-dir, or with other keys?)"
                    )
                else:
                    self.reason = (
                        f"{self.addr} requires authentication: give a key (--auth FILE, DKV_AUTH, or Client(auth=...))"
                    )
                self.failed.set()
                if self._on_lost is not None:
                    self._on_lost(self.reason)

    def close(self) -> None:
        self._task.kill(block=False)
        try:
            self._socket.disable_monitor()
        except zmq.ZMQError:
            pass
        self._monitor.linger = 0
        self._monitor.close()


# -- lean calls -------------------------------------------------------------------


class LeanClient:
    """Request/reply to one node over one DEALER socket, without zerorpc's per-call machinery.

    A zerorpc call opens a channel on both ends, each with its own greenlets and a
    heartbeat, and exchanges several events: that, not ZeroMQ, is most of its cost
    (benchmarks/README.md). A *lean* call is one zerorpc-format event each way: the
    request carries ``message_id`` and the :data:`LEAN` flag, the node answers with
    ``OK``/``ERR`` and ``response_to`` (the same events a zerorpc server sends), and a
    reader greenlet hands each answer to its caller. Requests on one socket reach the
    node in the order they were sent.

    Liveness, one watchdog per socket instead of a heartbeat per call: while calls
    are in flight and the node has sent nothing for :data:`HEARTBEAT` seconds, the
    client sends it a lean ``ping``; after :data:`LEAN_HEARTBEAT_TIMEOUT` of
    silence every call in flight fails (the node is stopped or unreachable), as
    zerorpc's heartbeats made them. (ZeroMQ's own ZMTP heartbeats would do this
    in the I/O thread, but libzmq 4.3 aborts the process on a heartbeat timeout
    under backpressure: "Assertion failed: !_io_error", zeromq/libzmq#4364,
    #3937; a replica resumed from SIGSTOP died of it.) The socket monitor fails
    every call in flight as soon as the connection drops (the node died) or a
    handshake is refused; the caller then opens a new socket, so nothing queued
    on this one reaches a node restarted on the address later. A
    call on a socket that has not connected waits at most
    :data:`LEAN_CONNECT_TIMEOUT` for the connection (a dead address fails fast,
    as it did with zerorpc's heartbeats), and sends nothing if it does not come.

    ``liveness`` replaces both limits (seconds; None: the defaults above): an
    interactive tool uses a shorter one, to report a stopped node sooner.
    """

    def __init__(self, addr: str, creds: Credentials | None = None, *, liveness: float | None = None) -> None:
        self.addr = addr
        #: seconds a call waits for the connection, and a node with calls in flight may stay silent
        self.connect_timeout = liveness or LEAN_CONNECT_TIMEOUT
        self.silence_timeout = liveness or LEAN_HEARTBEAT_TIMEOUT
        sock = GreenContext.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)  # unsent requests die with the socket
        sock.setsockopt(zmq.SNDHWM, SOCKET_HWM)
        sock.setsockopt(zmq.RCVHWM, SOCKET_HWM)
        if creds is not None:
            secure_client(sock, creds)
        self._socket = sock
        self._pending: dict[int, gevent.event.AsyncResult] = {}
        self._ids = itertools.count(1)
        #: why this socket is no longer usable ("" while it is)
        self.lost = ""
        self.watch = HandshakeWatch(sock, addr, creds is not None, on_lost=self._lost)
        sock.connect(f"tcp://{addr}")
        self._reader = gevent.spawn(self._read)
        #: monotonic time the node last sent us anything; the watchdog (while calls are in flight)
        self._heard = 0.0
        self._watchdog: gevent.Greenlet | None = None

    def call(self, method: str, args: Any, timeout: float) -> Any:
        """The call's result; raises ``zerorpc.RemoteError`` (the node's error),
        ``zerorpc.TimeoutExpired``, ``zerorpc.LostRemote`` or :class:`AuthError`."""
        if self.watch.failed.is_set():
            raise AuthError(self.watch.reason)
        if self.lost:
            raise zerorpc.LostRemote(self.lost)
        if not self.watch.up.is_set():  # not connected yet: wait for the handshake (or its refusal)
            gevent.wait([self.watch.up, self.watch.failed], timeout=min(timeout, self.connect_timeout), count=1)
            if self.watch.failed.is_set():
                raise AuthError(self.watch.reason)
        if not self.watch.up.is_set():
            self._lost(f"cannot connect to {self.addr}")  # nothing was sent: the next call starts afresh
            raise zerorpc.LostRemote(self.lost)
        mid = next(self._ids)
        result = gevent.event.AsyncResult()
        if not self._pending:
            self._heard = time.monotonic()  # silence counts from the first call in flight
        self._pending[mid] = result
        if self._watchdog is None:
            self._watchdog = gevent.spawn(self._watch)
        try:
            self._socket.send(self._request(mid, method, args))
            return result.get(timeout=timeout)
        except gevent.Timeout:
            raise zerorpc.TimeoutExpired(timeout) from None
        finally:
            self._pending.pop(mid, None)

    @staticmethod
    def _request(mid: int, method: str, args: Any) -> bytes:
        return msgpack.packb(({"message_id": mid, "v": 3, LEAN: 1}, method, args), use_bin_type=True)

    def _read(self) -> None:
        while True:
            try:
                frames = self._socket.recv_multipart()
            except zmq.ZMQError:
                return  # closed
            self._heard = time.monotonic()
            try:
                header, name, args = msgpack.unpackb(frames[-1], raw=False)
                result = self._pending.get(header["response_to"])
            except Exception:  # not an answer of ours: ignore (a node sends nothing else here)
                continue
            if result is None or name not in ("OK", "ERR"):
                continue  # its caller gave up, or a zerorpc heartbeat (a node without lean calls)
            if name == "OK":
                result.set(args[0])
            else:
                result.set_exception(zerorpc.RemoteError(*(list(args) + ["", "", ""])[:3]))

    def _watch(self) -> None:
        """While calls are in flight: ping a node that has gone quiet, and give up on it
        (fail every call in flight) once it has been silent for ``silence_timeout``."""
        tick = min(HEARTBEAT / 2, self.silence_timeout / 4)  # a node is pinged 3 times before it is given up
        try:
            while self._pending and not self.lost:
                gevent.sleep(tick)
                silent = time.monotonic() - self._heard
                if not self._pending or self.lost:
                    break
                if silent >= self.silence_timeout:
                    self._lost(f"{self.addr} sent nothing for {silent:.1f}s")
                    break
                if silent >= tick:  # any answer counts, even an error
                    try:
                        self._socket.send(self._request(next(self._ids), "ping", ()), zmq.NOBLOCK)
                    except zmq.Again:
                        pass  # the queue to the node is full: the silence decides
        except zmq.ZMQError:
            pass  # closed
        finally:
            self._watchdog = None

    def _lost(self, reason: str) -> None:
        self.lost = self.lost or reason
        pending, self._pending = self._pending, {}
        for result in pending.values():
            result.set_exception(AuthError(reason) if self.watch.failed.is_set() else zerorpc.LostRemote(reason))

    def close(self) -> None:
        self._lost("closed")
        self._reader.kill(block=False)
        if self._watchdog is not None:
            self._watchdog.kill(block=False)
        self.watch.close()
        self._socket.close()


def quiet_lost_remote(hub: Any) -> None:
    """Don't print zerorpc's LostRemote from its internal greenlets: it is an expected
    outcome (a peer died), reported to the caller as a transport error."""
    if zerorpc.LostRemote not in hub.NOT_ERROR:
        hub.NOT_ERROR = (*hub.NOT_ERROR, zerorpc.LostRemote)


def harden(
    socket: zerorpc.Server | zerorpc.Client,
    recv: Callable[[], Event | None] | None = None,
    lean: Callable[[Event], None] | None = None,
) -> None:
    """Give a zerorpc server or client a dispatcher that never blocks (see the module doc).

    ``recv`` reads the next event (None: nothing usable, read on); default the socket's own.
    ``lean`` takes the new requests flagged :data:`LEAN` (a server's). Call it in the thread
    that owns the socket, before its first call or ``run``.
    """
    mux: ChannelMultiplexer = socket._multiplexer
    old = mux._channel_dispatcher_task
    if old is not None:
        old.kill(block=False)  # spawned but not started: it never reads an event
    mux._channel_dispatcher_task = gevent.spawn(_dispatch, mux, recv or mux._events.recv, lean)


def close_client(client: zerorpc.Client) -> None:
    """Close a zerorpc client without hanging.

    zerorpc's close kills the socket's sender greenlet and waits for it to die. If
    that greenlet is between the two frames of a request when its connection goes
    away for good (a CURVE handshake the node refused terminates the pipe), it
    catches the GreenletExit, retries the last frame, and blocks for ever: no peer
    will take it. ``close`` then never returns (a caller with a wrong key hung in
    about one call in a few hundred). Throw again until it dies.
    """
    task = getattr(getattr(client._events, "_send", None), "_send_task", None)
    for _ in range(10):
        if task is None or task.dead:
            break
        task.kill(block=True, timeout=0.1)
    client.close()


def _dispatch(mux: ChannelMultiplexer, recv: Callable[[], Event | None], lean: Callable[[Event], None] | None) -> None:
    while True:
        try:
            event = recv()
        except Exception:
            logger.exception("zerorpc dispatcher: error on recv, ignored")
            continue
        if event is None:
            continue
        channel_id = event.header.get("response_to")
        if channel_id is None:
            if lean is not None and event.header.get(LEAN):
                lean(event)
            elif mux._broadcast_queue is not None:
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
            logger.warning(
                "zerorpc channel %s has %d unread events: abandoned, dropping %s",
                quote(channel_id),
                queue.qsize(),
                quote(event.name),
            )
            continue
        queue.put_nowait(event)


def _arity(sig: inspect.Signature) -> tuple[int, float]:
    """How many positional arguments a method takes: (at least, at most)."""
    low, high = 0, 0.0
    for p in sig.parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            high = float("inf")
        elif p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            high += 1
            low += p.default is p.empty
    return low, high


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
    """A zerorpc server with a non-blocking dispatcher and leak-free request tasks.

    ``access`` names every method callers may use and the role it needs
    (:data:`dkv.auth.PEER` for internal RPCs, :data:`dkv.auth.CLIENT` for data
    RPCs); anything else, zerorpc's built-ins included, is unknown. With ``creds``
    the socket is CURVE-secured and roles are enforced; without, every caller may
    call everything (a node without auth binds loopback only, or runs --insecure).
    Expected errors (:class:`DKVError`) are logged quietly; others become ``Internal``.
    """

    def __init__(
        self,
        methods: Any,
        *,
        access: dict[str, str],
        creds: Credentials | None = None,
        max_message_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        super().__init__(methods, heartbeat=HEARTBEAT, context=GreenContext.instance())
        quiet_lost_remote(gevent.get_hub())
        self.access = access
        self.creds = creds
        self.max_message_bytes = max_message_bytes
        self.max_inflight_bytes = max(MIN_INFLIGHT_BYTES, 4 * max_message_bytes)
        self._signatures = {
            name: inspect.signature(self._methods[name]._functor) for name in access if name in self._methods
        }
        self._arity = {name: _arity(sig) for name, sig in self._signatures.items()}
        missing = set(access) - set(self._signatures)
        if missing:
            raise TypeError(f"access names methods the server lacks: {sorted(missing)}")
        self._inflight: dict[bytes, int] = {}
        self._inflight_bytes = 0
        self._garbage = 0
        self._garbage_logged = 0.0
        sock = self._events._socket
        sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        sock.setsockopt(zmq.RCVHWM, SOCKET_HWM)
        sock.setsockopt(zmq.SNDHWM, SOCKET_HWM)
        sock.setsockopt(zmq.LINGER, 0)
        self._zap: ZapHandler | None = None
        if creds is not None:
            self._zap = ZapHandler(creds.roles())
            secure_server(sock, creds)
        #: TCP connections open to the socket now (clients, peers, probes), from its monitor
        self.connections = 0
        self._monitor = sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self._counter = gevent.spawn(self._count_connections)
        # Read the socket in the dispatcher itself: zerorpc's reader greenlet (spawned, not
        # started) would hand every message over through a channel, a switch each.
        receiver = self._events._recv
        receiver._recv_task.kill(block=False)
        self._read_frames = lambda: SequentialReceiver._recv(receiver)
        harden(self, self._recv_request, self._lean)

    def close(self) -> None:
        self._counter.kill(block=False)
        try:
            self._events._socket.disable_monitor()
        except zmq.ZMQError:
            pass
        if not self._monitor.closed:  # close() may run twice (a test, a shutdown after a stop)
            self._monitor.linger = 0
            self._monitor.close()
        super().close()
        if self._zap is not None:
            self._zap.close()
            self._zap = None

    def _count_connections(self) -> None:
        """Every accepted connection is disconnected exactly once (ZeroMQ reports a refused
        handshake as a disconnect too): their difference is what is open."""
        from zmq.utils.monitor import recv_monitor_message

        while True:
            try:
                event = recv_monitor_message(self._monitor)["event"]
            except zmq.ZMQError:
                return
            if event == zmq.EVENT_ACCEPTED:
                self.connections += 1
            elif event == zmq.EVENT_DISCONNECTED:
                self.connections = max(0, self.connections - 1)

    # -- reading requests --------------------------------------------------------

    def _recv_request(self) -> Event | None:
        """The next event, checked; None (and a rate-limited warning) for undecodable input."""
        parts = self._read_frames()
        blob = parts[-1]
        try:
            event = Event.unpack(get_pyzmq_frame_buffer(blob))
            header = event.header
            if not isinstance(header, dict) or not isinstance(event.name, str):
                raise ValueError("not a zerorpc event")
            reply_to = header.get("response_to")
            if reply_to is not None and not isinstance(reply_to, (str, bytes, int)):
                raise ValueError("bad response_to")
            if reply_to is None and not isinstance(header.get("message_id"), (str, bytes, int)):
                raise ValueError("bad message_id")
        except Exception as e:  # any failure to decode is garbage: zerorpc's Event.unpack raises a
            # bare Exception whose message quotes the whole input (a 5 MB string went to the log whole)
            self._log_garbage(bytes(blob.buffer[:QUOTE_BYTES]), len(blob), e)
            return None
        event.identity = parts[:-2] if len(parts) > 2 else parts[:-1]
        if header.get("response_to") is None:  # a new request: who is calling, how big, on which connection
            header[_ROLE] = blob.get("User-Id") if self.creds is not None else None
            header[_SIZE] = len(blob)
            header[_CONN] = bytes(event.identity[0]) if event.identity else b""
        return event

    def _log_garbage(self, head: bytes, size: int, error: Exception) -> None:
        self._garbage += 1
        now = time.monotonic()
        if now - self._garbage_logged >= GARBAGE_LOG_INTERVAL:
            self._garbage_logged = now
            logger.warning(
                "dropped an undecodable message of %d bytes (%s; %d dropped so far): %s",
                size,
                type(error).__name__,
                self._garbage,
                quote(head),
            )

    # -- serving one request -----------------------------------------------------

    def _admit(self, event: Event) -> Callable[[], None]:
        """Check who calls what, and the caps; returns the release of what it took."""
        name, header = event.name, event.header
        required = self.access.get(name)
        if required is None:
            raise InvalidArgument(f"unknown method {quote(name, 64)}")
        if self.creds is not None and required == PEER and header.get(_ROLE) != PEER:
            raise AuthError(f"{name} is an internal RPC: it needs the cluster key")
        conn, size = header.get(_CONN, b""), int(header.get(_SIZE, 0))
        if self._inflight.get(conn, 0) >= MAX_INFLIGHT_PER_CONNECTION:
            raise Unavailable(
                f"too many requests in flight on this connection (at most {MAX_INFLIGHT_PER_CONNECTION}); not run"
            )
        if self._inflight_bytes + size > self.max_inflight_bytes:
            raise Unavailable(f"node busy: {self._inflight_bytes} request bytes in flight; not run")
        args = event.args
        if not isinstance(args, (list, tuple)):
            raise InvalidArgument(f"{name}: arguments must be a list")
        low, high = self._arity[name]
        if not low <= len(args) <= high:
            try:  # the precise message
                self._signatures[name].bind(*args)
            except TypeError as e:
                raise InvalidArgument(f"{name}: {e}") from None
            raise InvalidArgument(f"{name}: takes {low} to {high} arguments")
        self._inflight[conn] = self._inflight.get(conn, 0) + 1
        self._inflight_bytes += size

        def release() -> None:
            self._inflight_bytes -= size
            left = self._inflight[conn] - 1
            if left:
                self._inflight[conn] = left
            else:
                del self._inflight[conn]

        return release

    def _error_reply(self, event: Event, exc: BaseException) -> tuple[str, str, str]:
        if isinstance(exc, DKVError):
            logger.debug("%s failed: %s: %s", quote(event.name, 64), type(exc).__name__, exc)
            return (type(exc).__name__, str(exc), "")
        logger.error("%s%s failed unexpectedly", quote(event.name, 64), quote(event.args), exc_info=exc)
        return (Internal.__name__, f"internal error in {quote(event.name, 64)} (details in the node's log)", "")

    def _lean(self, event: Event) -> None:
        gevent.spawn(self._serve_lean, event)

    def _serve_lean(self, event: Event) -> None:
        """Answer a lean request (:class:`LeanClient`): the same checks and errors as a
        zerorpc call, one event back."""
        release: Callable[[], None] | None = None
        args: tuple[Any, ...]
        try:
            release = self._admit(event)
            functor = self._methods[event.name]
            if not isinstance(functor.pattern, zerorpc.patterns.ReqRep):
                raise InvalidArgument(f"{quote(event.name, 64)} streams: call it through zerorpc")
            name, args = "OK", (functor(*event.args),)
        except Exception as e:
            name, args = "ERR", self._error_reply(event, e)
        finally:
            if release is not None:
                release()
        blob = msgpack.packb(({"response_to": event.header["message_id"], "v": 3}, name, args), use_bin_type=True)
        try:
            self._events._socket.send_multipart([*event.identity, b"", blob])  # a ROUTER never blocks
        except zmq.ZMQError as e:
            logger.debug("could not answer %s: %s", quote(event.name, 64), e)

    def _async_task(self, initial_event: Any) -> None:
        # zerorpc's ServerBase._async_task, with checks first and a close that cannot be cut short.
        channel = self._multiplexer.channel(initial_event)
        hbchan = HeartBeatOnChannel(channel, freq=self._heartbeat_freq, passive=initial_event.header.get("v", 1) < 2)
        bufchan = BufferedChannel(hbchan)
        release: Callable[[], None] | None = None
        try:
            event = bufchan.recv()
            try:
                release = self._admit(event)
                functor = self._methods[event.name]
                functor.pattern.process_call(self._context, bufchan, event, functor)
            except zerorpc.LostRemote:
                logger.debug("client of %s went away before its answer", quote(event.name, 64))
            except Exception as e:
                reply = bufchan.new_event("ERR", self._error_reply(event, e), self._context.hook_get_task_context())
                bufchan.emit_event(reply)
        except zerorpc.LostRemote:
            pass  # the client went away while we answered
        finally:
            if release is not None:
                release()
            _close_now(bufchan, hbchan, channel)
