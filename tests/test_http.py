"""The node's HTTP port against real node processes: Prometheus metrics (parsed with
prometheus_client's parser), /health, and the JSON key/value API driven by a real HTTP
client (http.client), standalone, with auth, and in a 2-shard cluster (forwarding)."""

from __future__ import annotations

import base64
import http.client
import json
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote_from_bytes

import pytest
from prometheus_client.parser import text_string_to_metric_families

import dkv
from dkv.auth import CLIENT_KEY, CLUSTER_KEY, init_keys, load_key
from tests.support.cluster import Cluster, rpc
from tests.support.procs import NodeProcess, free_port, wait_until

pytestmark = pytest.mark.integration


class Http:
    """A tiny JSON/HTTP client of one node's HTTP port."""

    def __init__(self, port: int, token: str | None = None) -> None:
        self.port, self.token = port, token

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        hdrs = dict(headers or {})
        if self.token is not None:
            hdrs.setdefault("Authorization", f"Bearer {self.token}")
        try:
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def json(self, method: str, path: str, body: bytes | None = None, **kw: Any) -> tuple[int, Any]:
        status, headers, data = self.request(method, path, body, **kw)
        assert headers["content-type"].startswith("application/json"), (status, data)
        return status, json.loads(data)

    def metrics(self) -> dict[str, list[Any]]:
        """name -> samples of one scrape, parsed by prometheus_client."""
        status, _, data = self.request("GET", "/metrics")
        assert status == 200
        out: dict[str, list[Any]] = {}
        for family in text_string_to_metric_families(data.decode()):
            for s in family.samples:
                out.setdefault(s.name, []).append(s)
        return out

    def value(self, name: str, **labels: str) -> float:
        """One sample's value (0 if the series is absent)."""
        for s in self.metrics().get(name, []):
            if all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
        return 0.0


def kv(key: bytes) -> str:
    return "/v1/kv/" + quote_from_bytes(key, safe="")


def http_node(node_factory: Callable[..., NodeProcess], *extra: str, name: str = "n1") -> tuple[NodeProcess, Http]:
    port = free_port()
    n = node_factory("--http-port", str(port), *extra, name=name)
    return n, Http(port)


# -- standalone --------------------------------------------------------------------------


def test_metrics_of_a_standalone_node_move_with_writes(node_factory: Callable[..., NodeProcess]) -> None:
    n, h = http_node(node_factory)
    before = h.metrics()
    names = set(before)
    for expected in (
        "dkv_node_info",
        "dkv_role",
        "dkv_epoch",
        "dkv_wal_bytes",
        "dkv_wal_segments",
        "dkv_group_commits_total",
        "dkv_expired_keys_total",
        "dkv_rpc_connections",
        "dkv_watch_streams",
        "dkv_applied_lsn",
        "process_resident_memory_bytes",
    ):
        assert expected in names, expected
    assert h.value("dkv_role", role="writer", shard="shard-0") == 1
    sets0 = h.value("dkv_ops_total", op="set", outcome="ok")
    commits0, fsyncs0 = h.value("dkv_group_commits_total"), h.value("dkv_wal_fsyncs_total")
    wal0 = h.value("dkv_wal_bytes")
    with dkv.Client(n.addr) as c:
        for i in range(20):
            c.set(f"k{i}", "v" * 100)
        assert c.get("k3") == b"v" * 100
        # the client's connection shows while it is open
        wait_until(lambda: h.value("dkv_rpc_connections") >= 1, 10, "the client's connection to count")
        # a bad op counts with its error code as outcome
        assert rpc(n.addr, "batch", [["set", b"", b"v"]])[0][0] == 1
    assert h.value("dkv_ops_total", op="set", outcome="ok") == sets0 + 20
    assert h.value("dkv_ops_total", op="get", outcome="ok") >= 1
    assert h.value("dkv_ops_total", op="set", outcome="key_empty") == 1
    assert h.value("dkv_op_duration_seconds_count", op="set", outcome="ok") == sets0 + 20
    assert h.value("dkv_group_commits_total") >= commits0 + 1
    assert h.value("dkv_group_commit_size_records_count") == h.value("dkv_group_commits_total")
    assert h.value("dkv_wal_fsyncs_total") > fsyncs0
    assert h.value("dkv_wal_fsync_duration_seconds_count") == h.value("dkv_wal_fsyncs_total")
    assert h.value("dkv_wal_bytes") > wal0
    assert h.value("dkv_applied_lsn") >= 20
    wait_until(lambda: h.value("dkv_rpc_connections") == 0, 10, "closed connections to be uncounted")
    assert h.value("dkv_http_requests_total", method="GET", route="metrics", status="200") >= 1


def test_health_of_a_standalone_node(node_factory: Callable[..., NodeProcess]) -> None:
    _, h = http_node(node_factory)
    status, doc = h.json("GET", "/health")
    assert status == 200 and doc["status"] == "ok" and doc["role"] == "writer" and doc["reason"] is None
    status, _, body = h.request("HEAD", "/health")
    assert status == 200 and body == b""


def test_json_kv_api_round_trip_and_encoding(node_factory: Callable[..., NodeProcess]) -> None:
    n, h = http_node(node_factory)
    key, value = b"a/b c\x00\xff", b"\x00\xffbinary"
    status, doc = h.json("PUT", kv(key), value)
    assert status == 200 and doc["revision"] > 0
    status, doc = h.json("GET", kv(key))
    assert status == 200
    assert base64.b64decode(doc["key"]) == key and doc["key_text"] is None  # not UTF-8
    assert base64.b64decode(doc["value"]) == value and doc["value_text"] is None
    assert doc["expires_at_ms"] is None
    with dkv.Client(n.addr) as c:
        assert c.get(key) == value  # the same bytes through the native client
        c.set("tëxt", "välue")
    status, doc = h.json("GET", kv("tëxt".encode()) + "?consistency=linearizable")
    assert status == 200 and doc["key_text"] == "tëxt" and doc["value_text"] == "välue"
    # an empty value is a value
    assert h.json("PUT", kv(b"empty"), b"")[0] == 200
    assert h.json("GET", kv(b"empty"))[1]["value"] == ""
    # ttl and conditions
    status, doc = h.json("PUT", kv(b"t") + "?ex=100", b"1")
    assert status == 200
    assert h.json("GET", kv(b"t"))[1]["expires_at_ms"] > 0
    assert h.json("PUT", kv(b"t") + "?nx", b"2")[0] == 412
    assert h.json("PUT", kv(b"t") + "?xx&px=50000", b"3")[0] == 200
    status, doc = h.json("PUT", kv(b"absent") + "?xx", b"4")
    assert status == 412 and doc["code"] == "CONDITION_FAILED"
    assert h.json("GET", kv(b"absent"))[0] == 404
    assert base64.b64decode(h.json("GET", kv(b"t"))[1]["value"]) == b"3"
    # delete
    status, doc = h.json("DELETE", kv(b"t"))
    assert status == 200 and doc["deleted"] is True
    status, doc = h.json("DELETE", kv(b"t"))
    assert status == 404 and doc["code"] == "NOT_FOUND"
    status, doc = h.json("GET", kv(b"t"))
    assert status == 404 and doc["code"] == "NOT_FOUND"


def test_json_scan_pages(node_factory: Callable[..., NodeProcess]) -> None:
    n, h = http_node(node_factory)
    with dkv.Client(n.addr) as c:
        c.mset({f"p/{i:03d}": f"v{i}" for i in range(25)})
        c.set("q", "other")
    seen: list[str] = []
    path = "/v1/kv?prefix=p%2F&limit=10"
    while True:
        status, doc = h.json("GET", path)
        assert status == 200
        seen += [item["key_text"] for item in doc["items"]]
        if not doc["more"]:
            break
        path = f"/v1/kv?prefix=p%2F&limit=10&start={doc['next_start']}"
    assert seen == [f"p/{i:03d}" for i in range(25)]
    status, doc = h.json("GET", "/v1/kv")
    assert status == 200 and len(doc["items"]) == 26 and doc["more"] is False
    status, doc = h.json("GET", "/v1/cluster")
    assert status == 200 and doc["mode"] == "standalone" and doc["nodes"][0]["addr"] == n.addr


def test_bad_http_input_gets_typed_errors_and_changes_nothing(node_factory: Callable[..., NodeProcess]) -> None:
    n, h = http_node(node_factory, "--max-value-bytes", "1000", "--max-key-bytes", "64")
    bad = [
        ("GET", kv(b"k") + "?consistency=strong", None, 400, "INVALID"),
        ("GET", kv(b"k") + "?bogus=1", None, 400, "INVALID"),
        ("GET", kv(b"k") + "?consistency=eventual&consistency=sequential", None, 400, "INVALID"),
        ("PUT", kv(b"k") + "?ex=-1", b"v", 400, "INVALID"),
        ("PUT", kv(b"k") + "?px=abc", b"v", 400, "INVALID"),
        ("PUT", kv(b"k") + "?ex=1&px=1000", b"v", 400, "INVALID"),
        ("PUT", kv(b"k") + "?nx&xx", b"v", 400, "INVALID"),
        ("PUT", kv(b"k") + "?nx=maybe", b"v", 400, "INVALID"),
        ("PUT", kv(b"k"), b"x" * 1001, 413, "INVALID"),
        ("PUT", kv(b"k" * 65), b"v", 400, "INVALID"),
        ("PUT", "/v1/kv/", b"v", 400, "KEY_EMPTY"),
        ("GET", "/v1/kv?limit=0", None, 400, "INVALID"),
        ("GET", "/v1/kv?limit=100000", None, 400, "INVALID"),
        ("GET", "/v1/kv?" + "a=1&" * 2000, None, 400, "INVALID"),
        ("POST", kv(b"k"), b"v", 405, "METHOD_NOT_ALLOWED"),
        ("GET", "/v2/nothing", None, 404, "NOT_FOUND"),
    ]
    for method, path, body, status, code in bad:
        got, doc = h.json(method, path, body)
        assert (got, doc["code"]) == (status, code), (method, path[:60], doc)
        assert doc["message"]
    # the largest value is accepted; nothing of the refused requests was written
    assert h.json("PUT", kv(b"k"), b"x" * 1000)[0] == 200
    with dkv.Client(n.addr) as c:
        assert c.get("k") == b"x" * 1000
        assert list(c.scan()) == [(b"k", b"x" * 1000)]


def test_auth_requires_the_http_token_as_bearer_token(tmp_path: Path, node_factory: Callable[..., NodeProcess]) -> None:
    auth_dir = tmp_path / "auth"
    init_keys(str(auth_dir))
    client_key, cluster_key = load_key(str(auth_dir / CLIENT_KEY)), load_key(str(auth_dir / CLUSTER_KEY))
    client_secret = client_key.bearer_token()
    cluster_secret = cluster_key.bearer_token()
    assert client_secret == cluster_key.http_tokens()["client"] and client_secret != cluster_secret
    assert client_key.secret.decode() not in (client_secret, cluster_secret)  # no CURVE secret on the wire
    n, h = http_node(node_factory, "--auth-dir", str(auth_dir))
    for headers in (
        {},
        {"Authorization": "Bearer " + "x" * 64},
        {"Authorization": "Basic Zm9vOmJhcg=="},
        {"Authorization": "Bearer " + client_secret[:-1]},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer " + client_key.secret.decode()},
    ):
        status, hdrs, body = h.request("PUT", kv(b"k"), b"v", headers=headers)
        assert status == 401 and json.loads(body)["code"] == "AUTH", headers
        assert hdrs["www-authenticate"].startswith("Bearer")
        assert h.request("GET", "/v1/cluster", headers=headers)[0] == 401
    # metrics and health need no token
    assert h.request("GET", "/metrics")[0] == 200
    assert h.request("GET", "/health")[0] == 200
    assert Http(h.port, client_secret).json("PUT", kv(b"k"), b"v")[0] == 200
    status, doc = Http(h.port, cluster_secret).json("GET", kv(b"k"))
    assert status == 200 and doc["value_text"] == "v"
    with dkv.Client(n.addr, auth=str(auth_dir / CLIENT_KEY)) as c:
        assert c.get("k") == b"v"  # the refused requests changed nothing else
        assert list(c.scan()) == [(b"k", b"v")]


# -- cluster -----------------------------------------------------------------------------


class HttpCluster(Cluster):
    """A test cluster whose every node also serves HTTP (on a port of its own)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.http: dict[str, Http] = {}

    def add_node(self, node_id: str) -> NodeProcess:
        port = free_port()
        token = load_key(self.client_key).bearer_token() if self.client_key else None  # DKV_TEST_AUTH=1
        self.http[node_id] = Http(port, token)
        flags = self.flags
        self.flags = (*flags, "--http-port", str(port))
        try:
            return super().add_node(node_id)
        finally:
            self.flags = flags


@pytest.mark.zk
def test_cluster_metrics_health_and_forwarding(zk: str, tmp_path: Path) -> None:
    cluster = HttpCluster(zk, tmp_path, shards=2, replication_factor=2, write_quorum=2)
    try:
        cluster.start()
        shards = cluster.shard_members()
        (s1, m1), (s2, m2) = sorted(shards.items())
        w1, r1, w2 = m1["writer"], m1["replicas"][0], m2["writer"]
        for node_id, h in cluster.http.items():
            wait_until(lambda: h.request("GET", "/health")[0] == 200, 30, f"{node_id} to be healthy")
        _, doc = cluster.http[r1].json("GET", "/health")
        assert doc["role"] == "replica" and doc["shard"] == s1
        hw1 = cluster.http[w1]
        assert hw1.value("dkv_role", role="writer", shard=s1) == 1
        assert hw1.value("dkv_zk_connected") == 1
        assert hw1.value("dkv_zk_state", state="CONNECTED") == 1
        assert hw1.value("dkv_replica_in_sync", replica=r1) == 1
        assert "dkv_replica_lag_records" in hw1.metrics()
        assert hw1.value("dkv_epoch") >= 1
        assert cluster.http[r1].value("dkv_role", role="replica", shard=s1) == 1

        # keys of both shards, written through nodes that own none of them (forwarded)
        with dkv.Client(zk=zk, auth=cluster.client_key) as c:
            keys1 = [k for k in (f"key-{i}".encode() for i in range(200)) if _shard_of(c, k) == s1][:10]
            keys2 = [k for k in (f"key-{i}".encode() for i in range(200)) if _shard_of(c, k) == s2][:10]
            sets_w1 = hw1.value("dkv_ops_total", op="set", outcome="ok")
            commits_w1 = hw1.value("dkv_group_commits_total")
            for k in keys1:  # shard-1 keys through shard-2's writer
                status, doc = cluster.http[w2].json("PUT", kv(k), b"via-" + k)
                assert status == 200, doc
            for k in keys2:  # shard-2 keys through shard-1's replica
                assert cluster.http[r1].json("PUT", kv(k), b"via-" + k)[0] == 200
            for k in keys1 + keys2:
                assert c.get(k) == b"via-" + k
            # the owner did the writes; reads are forwarded too
            assert hw1.value("dkv_ops_total", op="set", outcome="ok") >= sets_w1 + len(keys1)
            assert hw1.value("dkv_group_commits_total") > commits_w1
            status, doc = cluster.http[w2].json("GET", kv(keys1[0]))
            assert status == 200 and base64.b64decode(doc["value"]) == b"via-" + keys1[0]
            assert cluster.http[w1].json("DELETE", kv(keys2[0]))[0] == 200
            assert c.get(keys2[0]) is None
            assert cluster.http[r1].json("GET", kv(keys2[0]))[0] == 404
        # a scan through any node merges every shard
        status, doc = cluster.http[r1].json("GET", "/v1/kv?prefix=key-&limit=1000")
        assert status == 200
        assert sorted(base64.b64decode(i["key"]) for i in doc["items"]) == sorted(keys1 + keys2[1:])
        status, doc = cluster.http[w2].json("GET", "/v1/cluster")
        assert status == 200 and {s["id"] for s in doc["shards"]} == {s1, s2}

        # the writer loses its write quorum when its replica stops: 503 with the reason, then 200 again
        cluster.nodes[r1].stop()
        wait_until(lambda: hw1.request("GET", "/health")[0] == 503, 30, f"{w1} to report no quorum")
        _, doc = hw1.json("GET", "/health")
        assert doc["status"] == "unavailable" and "quorum" in doc["reason"]
        assert hw1.value("dkv_replica_in_sync", replica=r1) == 0
        cluster.nodes[r1].start()
        wait_until(lambda: hw1.request("GET", "/health")[0] == 200, 60, f"{w1} to be healthy again")
        wait_until(lambda: cluster.http[r1].request("GET", "/health")[0] == 200, 60, f"{r1} to be healthy again")
    finally:
        cluster.stop()


def _shard_of(c: dkv.Client, key: bytes) -> str:
    slot = c.slot_of(key)
    for s in c.cluster_info()["shards"]:
        if any(a <= slot <= b for a, b in s["slots"]):
            return s["id"]
    raise AssertionError(f"no shard owns slot {slot}")


def test_http_port_flag_env_and_refusals(tmp_path: Path, node_factory: Callable[..., NodeProcess]) -> None:
    import os
    import subprocess
    import sys

    def serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dkv.cli.main", "serve", "--data-dir", str(tmp_path / "x"), *args],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **(env or {})},
        )

    r = serve("--port", "7123", "--http-port", "7123")
    assert r.returncode == 1 and "--http-port" in r.stderr, r.stderr
    r = serve("--http-port", "70000")
    assert r.returncode == 1 and "--http-port" in r.stderr, r.stderr
    # DKV_HTTP_PORT turns it on
    port = free_port()
    n = NodeProcess(tmp_path / "env" / "data", None, node_id="env")
    os.environ["DKV_HTTP_PORT"] = str(port)
    try:
        n.start()
    finally:
        del os.environ["DKV_HTTP_PORT"]
    try:
        assert Http(port).json("GET", "/health")[0] == 200
        # a taken HTTP port: the second node says so and exits
        r = serve("--port", str(free_port()), "--http-port", str(port))
        assert r.returncode == 1 and "cannot listen for HTTP" in r.stderr, r.stderr
    finally:
        n.stop()
