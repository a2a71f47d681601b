"""The node's HTTP port (``dkv serve --http-port``): Prometheus metrics, health, and a JSON key/value API.

Served by gevent's WSGI server (:mod:`gevent.pywsgi`) in the node's own process and
hub, on the node's ``--host`` (so the same protected mode applies: loopback only
unless ``--auth-dir`` or ``--insecure``). At most :data:`MAX_CONCURRENT` requests
are served at once; more wait in the listen backlog; a connection silent for
:data:`IDLE_TIMEOUT` is closed.

Routes:

* ``GET /metrics``: Prometheus exposition (:mod:`dkv.node.metrics`); no key or value.
* ``GET /health``: ``200`` once the node serves its role (standalone: always, unless
  its log failed; a cluster writer: connected to ZooKeeper, done committing the log
  tail it took over, and with ``--write-quorum - 1`` replicas in sync; a replica: in
  touch with its writer and no more than ``--max-replica-lag`` behind), else ``503``; the JSON body ``{"status", "role",
  "shard", "reason"}`` says why. No data.
* ``GET /v1/kv/{key}[?consistency=sequential|linearizable|eventual]``: the key's
  value, revision and deadline; ``404`` if absent.
* ``PUT /v1/kv/{key}[?ex=SECONDS|px=MS][&nx|&xx]``: the request body is the value
  (raw bytes, at most ``--max-value-bytes``); answers the write's revision; ``412``
  when ``nx``/``xx`` is not met (nothing changed).
* ``DELETE /v1/kv/{key}``: ``{"deleted": true}``, or ``404`` if there was no key.
* ``GET /v1/kv?prefix=P&start=S&limit=N``: one page of the key-ordered scan (keys with
  prefix ``P`` from ``S`` on; ``N`` in 1..1000, default 100, and at most
  :data:`PAGE_BYTES` of keys and values), ``{"items": [...], "more": bool,
  "next_start": ...}``; pass ``next_start`` back as ``start`` for the next page.
* ``GET /v1/cluster``: the shard/node map (as ``dkv.Client.cluster_info()``).

**Encoding.** A key in the path and every query value are percent-encoded bytes
(RFC 3986; any byte may be written ``%XX``, and in the query ``+`` is a space): so
``/v1/kv/a%2Fb%00`` is the 4-byte key ``a/b\\x00``. Keys and values in responses are
base64 (RFC 4648, standard alphabet, padded) in ``key``/``value``, with a text copy
in ``key_text``/``value_text`` when the bytes are valid UTF-8 (else ``null``).
``next_start`` is percent-encoded, ready to paste into a query.

**Errors** are ``{"code", "message"}`` with dkv's error codes (:mod:`dkv.errors`):
``400`` ``INVALID``/``KEY_EMPTY`` (bad key, value, parameter: nothing changed),
``401`` ``AUTH``, ``404`` ``NOT_FOUND``, ``405``, ``412`` ``CONDITION_FAILED``,
``413`` (body over the value limit), ``503`` with ``Retry-After`` for
``UNAVAILABLE``/``TRYAGAIN``/``MOVED``/``QUORUM_NOT_REACHED`` (definite: retry), ``504``
``WRITE_TIMEOUT`` (the write may or may not be applied), ``500`` ``INTERNAL``.

**Routing.** Any node answers any key: it serves the op itself when it may (it owns
the slot; a fresh replica for an ``eventual`` get) and otherwise forwards it to the
owning shard's writer through the node's own client engine
(:class:`~dkv.client.core.ClientCore`, as ``dkv.Client`` would: following ``MOVED``,
retrying ``TRYAGAIN``), so an HTTP client needs no slot map. In cluster mode a scan
page is merged from every writer the same way.

**Auth.** With ``--auth-dir``, every ``/v1`` request needs ``Authorization: Bearer
TOKEN`` where TOKEN is the ``http_token`` of the client key (``client.key``; derived from the
cluster's secret by :func:`dkv.auth.http_token`, so it reveals no CURVE secret; the cluster
key's token works too). The node derives the tokens from its cluster key and compares, in
constant time. HTTP itself is not encrypted: the token crosses the network in clear (it
gives HTTP access, not the transport's keys), so put a TLS proxy in front of the port or
keep it on a trusted network, and use the client's token there. ``/metrics`` and ``/health`` need no token and
show no keys or values.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable
from urllib.parse import parse_qsl, quote_from_bytes

import gevent
import gevent.pool
import gevent.pywsgi
from prometheus_client import Counter
from prometheus_client.exposition import choose_encoder

from dkv import protocol
from dkv.errors import (
    AuthError,
    Deferred,
    DKVError,
    Internal,
    InvalidArgument,
    KeyIsEmpty,
    Moved,
    NotFound,
    QuorumNotReached,
    StorageClosed,
    TryAgain,
    Unavailable,
    WriteTimeout,
)
from dkv.keys import page_is_full, pair_bytes, take_page
from dkv.node.metrics import node_registry

logger = logging.getLogger(__name__)

#: Requests served at once (a pool of greenlets); more wait for a free one.
MAX_CONCURRENT = 64
#: Longest query string accepted (bytes); gevent bounds the request line at 8 KiB anyway.
MAX_QUERY_BYTES = 4096
#: Bytes of keys and values one scan page returns at most (at least one pair).
PAGE_BYTES = 1024 * 1024
#: Largest scan page (pairs).
MAX_SCAN_LIMIT = 1000
DEFAULT_SCAN_LIMIT = 100
#: Seconds an op forwarded to another node may take, retries included.
FORWARD_TIMEOUT = 5.0
#: Seconds a connection may stay silent (mid-request or idle between requests) before it is closed.
IDLE_TIMEOUT = 30.0

_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    412: "Precondition Failed",
    413: "Payload Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}

#: error class -> HTTP status (the first match in order; others: 500)
_STATUS: list[tuple[type[DKVError], int]] = [
    (InvalidArgument, 400),
    (AuthError, 401),
    (NotFound, 404),
    (WriteTimeout, 504),
    (Unavailable, 503),
    (TryAgain, 503),
    (Moved, 503),
    (QuorumNotReached, 503),
    (Deferred, 503),
    (StorageClosed, 503),
]

#: ops whose refusal says "ask elsewhere / later" (definite: the op was not applied)
_RETRY_CODES = frozenset({Moved.code, TryAgain.code, Unavailable.code, Deferred.code})

Response = tuple[int, list[tuple[str, str]], bytes]


class HttpError(Exception):
    """An answer other than 2xx that no DKVError describes (405, 412, 413, unknown route)."""

    def __init__(self, status: int, code: str, message: str, headers: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, list(headers)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def text_of(data: bytes) -> str | None:
    """``data`` as text if it is valid UTF-8, else None."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def encode_pair(key: bytes, value: bytes | None = None) -> dict[str, Any]:
    """The JSON form of a key (and value): base64 plus a UTF-8 copy when valid."""
    out: dict[str, Any] = {"key": b64(key), "key_text": text_of(key)}
    if value is not None:
        out.update(value=b64(value), value_text=text_of(value))
    return out


def _json(status: int, doc: Any, headers: Iterable[tuple[str, str]] = ()) -> Response:
    body = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"
    return status, [("Content-Type", "application/json; charset=utf-8"), *headers], body


def error_response(e: BaseException) -> Response:
    if isinstance(e, HttpError):
        return _json(e.status, {"code": e.code, "message": e.message}, e.headers)
    if not isinstance(e, DKVError):
        logger.error("HTTP request failed unexpectedly", exc_info=e)
        e = Internal("internal error (details in the node's log)")
    status = next((s for cls, s in _STATUS if isinstance(e, cls)), 500)
    headers = [("Retry-After", "1")] if status == 503 else []
    if status == 401:
        headers.append(("WWW-Authenticate", 'Bearer realm="dkv"'))
    doc: dict[str, Any] = {"code": e.code, "message": e.message}
    if isinstance(e, Moved) and isinstance(e.data.get("addr"), str):
        doc["addr"] = e.data["addr"]
    return _json(status, doc, headers)


@dataclass
class Query:
    """A request's query parameters: percent-decoded bytes, each name at most once, all known."""

    params: dict[str, bytes]

    @classmethod
    def parse(cls, raw: str, allowed: Iterable[str]) -> "Query":
        if len(raw) > MAX_QUERY_BYTES:
            raise InvalidArgument(f"the query string is {len(raw)} bytes; the limit is {MAX_QUERY_BYTES}")
        allowed = set(allowed)
        params: dict[str, bytes] = {}
        try:
            pairs = parse_qsl(
                raw.encode("latin-1"), keep_blank_values=True, strict_parsing=False, max_num_fields=len(allowed) or 1
            )
        except ValueError:
            raise InvalidArgument(
                f"too many query parameters (this route takes {', '.join(sorted(allowed)) or 'none'})"
            ) from None
        for name_b, value in pairs:
            name = name_b.decode("latin-1")
            if name not in allowed:
                raise InvalidArgument(
                    f"unknown query parameter {name[:40]!r} (this route takes {', '.join(sorted(allowed)) or 'none'})"
                )
            if name in params:
                raise InvalidArgument(f"query parameter {name!r} is given twice")
            params[name] = value
        return cls(params)

    def get(self, name: str) -> bytes | None:
        return self.params.get(name)

    def text(self, name: str) -> str | None:
        v = self.params.get(name)
        if v is None:
            return None
        try:
            return v.decode("ascii")
        except UnicodeDecodeError:
            raise InvalidArgument(f"query parameter {name!r} must be ASCII") from None

    def flag(self, name: str) -> bool:
        v = self.text(name)
        if v is None:
            return False
        if v.lower() in ("", "1", "true", "yes"):
            return True
        if v.lower() in ("0", "false", "no"):
            return False
        raise InvalidArgument(f"query parameter {name!r} is a flag: give it alone, or =1 / =0")

    def integer(self, name: str, lo: int, hi: int) -> int | None:
        v = self.text(name)
        if v is None:
            return None
        if not v.isdigit() or len(v) > 20 or not lo <= int(v) <= hi:
            raise InvalidArgument(f"query parameter {name!r} must be an integer in {lo}..{hi}")
        return int(v)

    def seconds(self, name: str) -> float | None:
        v = self.text(name)
        if v is None:
            return None
        try:
            x = float(v)
        except ValueError:
            x = -1.0
        if not 0 < x <= protocol.MAX_TTL_MS / 1000 or x != x:
            raise InvalidArgument(f"query parameter {name!r} must be a positive number of seconds")
        return x


class HttpApi:
    """The WSGI application of one node (see the module doc)."""

    def __init__(self, node: Any) -> None:
        self.node = node
        self.config = node.config
        self.service = node.service
        self.registry = node_registry(node)
        self.requests = Counter(
            "dkv_http_requests",
            "HTTP requests, by method, route and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        creds = self.config.credentials
        #: the bearer tokens admitted (None: no auth), see :func:`dkv.auth.http_token`
        self._admitted: list[bytes] | None = None
        if creds is not None:
            self._admitted = [t.encode() for t in creds.http_tokens().values()]
        self._core: Any = None

    # -- WSGI ---------------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "")
        route = "other"
        try:
            route, handler = self._route(method, path)
            status, headers, body = handler(environ)
        except Exception as e:
            status, headers, body = error_response(e)
        self.requests.labels(
            method if method in ("GET", "HEAD", "PUT", "DELETE", "POST") else "other", route, str(status)
        ).inc()
        if method == "HEAD":
            body = b""
        start_response(f"{status} {_REASONS.get(status, 'Unknown')}", [*headers, ("Content-Length", str(len(body)))])
        return [body]

    def _route(self, method: str, path: str) -> tuple[str, Callable[[dict[str, Any]], Response]]:
        def only(route: str, handlers: dict[str, Callable[[dict[str, Any]], Response]]) -> tuple[str, Any]:
            if method == "HEAD" and "GET" in handlers:
                return route, handlers["GET"]
            if method not in handlers:
                raise HttpError(
                    405,
                    "METHOD_NOT_ALLOWED",
                    f"{path[:60]} takes {', '.join(handlers)}",
                    [("Allow", ", ".join(handlers))],
                )
            return route, handlers[method]

        if path == "/metrics":
            return only("metrics", {"GET": self.metrics})
        if path == "/health":
            return only("health", {"GET": self.health})
        if path == "/v1/kv":
            return only("kv_scan", {"GET": self._authed(self.scan)})
        if path.startswith("/v1/kv/"):
            return only(
                "kv",
                {"GET": self._authed(self.get), "PUT": self._authed(self.put), "DELETE": self._authed(self.delete)},
            )
        if path == "/v1/cluster":
            return only("cluster", {"GET": self._authed(self.cluster)})
        raise HttpError(404, "NOT_FOUND", "no such route (see /metrics, /health, /v1/kv/{key}, /v1/kv, /v1/cluster)")

    def _authed(self, handler: Callable[[dict[str, Any]], Response]) -> Callable[[dict[str, Any]], Response]:
        def checked(environ: dict[str, Any]) -> Response:
            self.check_token(environ.get("HTTP_AUTHORIZATION", ""))
            return handler(environ)

        return checked

    def check_token(self, header: str) -> None:
        """Admit a ``Bearer`` token: the client key's ``http_token`` (or the cluster key's)."""
        if self._admitted is None:
            return
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError(
                "this node has auth: send 'Authorization: Bearer TOKEN' with the http_token of "
                "the client key (client.key; `dkv auth token DIR` prints it)"
            )
        given = token.strip().encode("ascii", "replace")
        ok = False
        for admitted in self._admitted:  # no early exit: the same work for any token
            ok |= hmac.compare_digest(given, admitted)
        if not ok:
            raise AuthError("the bearer token is not this cluster's HTTP token")

    # -- metrics and health -------------------------------------------------------------

    def metrics(self, environ: dict[str, Any]) -> Response:
        encoder, content_type = choose_encoder(environ.get("HTTP_ACCEPT", ""))
        return 200, [("Content-Type", content_type)], encoder(self.registry)

    def health(self, environ: dict[str, Any]) -> Response:
        role, shard, reason = health_of(self.node)
        doc = {
            "status": "ok" if reason is None else "unavailable",
            "node_id": self.config.node_id,
            "role": role,
            "shard": shard,
            "reason": reason,
        }
        return _json(200 if reason is None else 503, doc, [("Cache-Control", "no-store")])

    # -- the key/value API --------------------------------------------------------------

    def _key(self, environ: dict[str, Any]) -> bytes:
        # PATH_INFO is percent-decoded by the server, as latin-1 text: its bytes are the key's
        raw = environ.get("PATH_INFO", "")[len("/v1/kv/") :].encode("latin-1")
        if not raw:
            raise KeyIsEmpty("the key is empty: use /v1/kv/{key} (percent-encoded)")
        return self.service.limits.key(raw)

    def get(self, environ: dict[str, Any]) -> Response:
        key = self._key(environ)
        q = Query.parse(environ.get("QUERY_STRING", ""), ["consistency"])
        consistency = q.text("consistency") or "sequential"
        if consistency not in protocol.CONSISTENCY_LEVELS:
            raise InvalidArgument(f"consistency must be one of {', '.join(protocol.CONSISTENCY_LEVELS)}")
        result = self.run([protocol.GETM, key, consistency])
        if result is None:
            raise NotFound(f"no key {key[:100]!r}")
        value, rev, expires_at = result
        return _json(200, {**encode_pair(key, value), "revision": rev, "expires_at_ms": expires_at or None})

    def put(self, environ: dict[str, Any]) -> Response:
        key = self._key(environ)
        q = Query.parse(environ.get("QUERY_STRING", ""), ["ex", "px", "nx", "xx"])
        ex, px = q.seconds("ex"), q.integer("px", 1, protocol.MAX_TTL_MS)
        if ex is not None and px is not None:
            raise InvalidArgument("give ex or px, not both")
        ttl = px if px is not None else (max(1, round(ex * 1000)) if ex is not None else None)
        nx, xx = q.flag("nx"), q.flag("xx")
        if nx and xx:
            raise InvalidArgument("give nx or xx, not both")
        value = self._body(environ)
        cond = protocol.NX if nx else protocol.XX if xx else None
        rev = self.run([protocol.SET, key, value, ttl, cond])
        if rev is None:
            raise HttpError(
                412,
                "CONDITION_FAILED",
                "nx: the key exists; nothing changed" if nx else "xx: the key does not exist; nothing changed",
            )
        return _json(200, {"key": b64(key), "key_text": text_of(key), "revision": rev})

    def _body(self, environ: dict[str, Any]) -> bytes:
        limit = self.service.limits.max_value_bytes
        too_big = HttpError(
            413,
            InvalidArgument.code,
            f"the value is over the limit of {limit} bytes; nothing changed",
            [("Connection", "close")],
        )
        length = environ.get("CONTENT_LENGTH") or ""
        if length:
            if not length.isdigit():
                raise InvalidArgument("bad Content-Length")
            if int(length) > limit:
                raise too_big
        body = environ["wsgi.input"].read(limit + 1)
        if len(body) > limit:
            raise too_big
        return body

    def delete(self, environ: dict[str, Any]) -> Response:
        key = self._key(environ)
        Query.parse(environ.get("QUERY_STRING", ""), [])
        if not self.run([protocol.DEL, key]):
            raise NotFound(f"no key {key[:100]!r}")
        return _json(200, {"key": b64(key), "key_text": text_of(key), "deleted": True})

    def scan(self, environ: dict[str, Any]) -> Response:
        q = Query.parse(environ.get("QUERY_STRING", ""), ["prefix", "start", "limit"])
        prefix, start = q.get("prefix") or b"", q.get("start")
        limit = q.integer("limit", 1, MAX_SCAN_LIMIT) or DEFAULT_SCAN_LIMIT
        if self.node.runtime is None:
            pairs = self.service.scan(prefix, start, limit)
            more = page_is_full(pairs, self.service.limits.page_bytes, pair_bytes, limit)
        else:
            pairs, more = self.core().scan_page(prefix, start, limit)
        page = take_page(pairs, PAGE_BYTES, pair_bytes)
        more = more or len(page) < len(pairs)
        doc: dict[str, Any] = {
            "items": [encode_pair(k, v) for k, v in page],
            "more": more,
            "next_start": quote_from_bytes(page[-1][0] + b"\x00", safe="") if more and page else None,
        }
        return _json(200, doc)

    def cluster(self, environ: dict[str, Any]) -> Response:
        Query.parse(environ.get("QUERY_STRING", ""), [])
        return _json(200, self.service.cluster_info())

    # -- running ops: here, or at the owner ----------------------------------------------

    def run(self, op: list[Any]) -> Any:
        """One op's result: served by this node if it may, else forwarded to the owner."""
        reply = self.service.batch([op])[0]
        if reply[0] == protocol.ERR and reply[1][0] in _RETRY_CODES and self.node.runtime is not None:
            reply = self.core().execute([op])[0]  # definite refusals: safe to send elsewhere
        return protocol.unwrap(reply)

    def core(self) -> Any:
        """The node's own client engine (for forwarding), made on first use, on this hub."""
        if self._core is None:
            from dkv.client.core import ClientCore

            self._core = ClientCore([self.config.addr], FORWARD_TIMEOUT, max_inflight=8, auth=self.config.credentials)
        return self._core

    def close(self) -> None:
        if self._core is not None:
            self._core.close()
            self._core = None


def health_of(node: Any) -> tuple[str, str | None, str | None]:
    """(role, shard, why the node does not serve its role now, or None if it does)."""
    failure = node.pipeline.failure
    rt = node.runtime
    if rt is None:
        return "writer", "shard-0", None if failure is None else f"writes refused: {failure}"
    shard = rt.shard.id if rt.shard is not None else None
    if not rt.coord.connected:
        return rt.role, shard, "not connected to ZooKeeper"
    if not rt.coord.loaded:
        return rt.role, shard, "has not read the cluster map from ZooKeeper yet"
    if rt.role == "writer":
        if failure is not None:
            return rt.role, shard, f"writes refused: {failure}"
        if rt.writer is None or not rt.writer.ready:
            return rt.role, shard, "new writer still committing the log tail it took over"
        needed = rt.config.write_quorum - 1
        in_sync = sum(r["state"] == "in_sync" for r in rt.writer.lag()["replicas"].values())
        if in_sync < needed:
            return (
                rt.role,
                shard,
                (
                    f"no write quorum: {in_sync} replica(s) in sync, {needed} needed "
                    f"(--write-quorum {rt.config.write_quorum})"
                ),
            )
        return rt.role, shard, None
    if rt.role == "replica":
        if not rt.ownership().replica_fresh:
            return (
                rt.role,
                shard,
                (
                    f"replica out of touch with its writer or behind by {rt.follower.lag()} "
                    f"records (limit {rt.config.max_replica_lag})"
                ),
            )
        return rt.role, shard, None
    return rt.role, shard, "not assigned to a shard yet"


class _Handler(gevent.pywsgi.WSGIHandler):
    """gevent's handler, with a socket timeout: a silent client cannot hold a request slot."""

    def __init__(self, sock: Any, address: Any, server: Any, rfile: Any = None) -> None:
        sock.settimeout(IDLE_TIMEOUT)
        super().__init__(sock, address, server, rfile)


class HttpServer:
    """The node's HTTP listener (a :class:`gevent.pywsgi.WSGIServer` on the node's hub)."""

    def __init__(self, node: Any) -> None:
        cfg = node.config
        self.api = HttpApi(node)
        self.server = gevent.pywsgi.WSGIServer(
            (cfg.host, cfg.http_port),
            self.api,
            spawn=gevent.pool.Pool(MAX_CONCURRENT),
            handler_class=_Handler,
            log=None,
            error_log=logging.getLogger(__name__ + ".server"),
        )

    def start(self) -> None:
        """Bind and serve (raises DKVError if the port is taken)."""
        try:
            self.server.start()
        except OSError as e:
            raise DKVError(f"cannot listen for HTTP on {self.server.address}: {e}") from e
        logger.info("HTTP on http://%s:%d (/metrics, /health, /v1)", self.server.address[0], self.server.server_port)

    def stop(self) -> None:
        self.server.stop(timeout=1)
        self.api.close()
