"""Keys, CURVE and roles (dkv.auth, dkv.transport) on real ZeroMQ sockets in this process.

The attacks against real node processes and ZooKeeper are in tests/test_security.py.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import gevent
import pytest
import zerorpc

from dkv.auth import CLIENT, CLIENT_KEY, CLUSTER_KEY, PEER, init_keys, load_auth_dir, load_key
from dkv.client.connection import call_once
from dkv.errors import AuthError, Internal, InvalidArgument, Unavailable
from dkv.node.config import NodeConfig, is_loopback
from dkv.transport import MAX_INFLIGHT_PER_CONNECTION, RPCServer


class Methods:
    def ping(self) -> str:
        return "pong"

    def add(self, a: int, b: int) -> int:
        return a + b

    def boom(self) -> None:
        raise KeyError("/secret/install/path")

    def wait(self, seconds: float) -> str:
        gevent.sleep(seconds)
        return "done"

    def internal(self) -> str:
        return "internal"


ACCESS = {"ping": CLIENT, "add": CLIENT, "boom": CLIENT, "wait": CLIENT, "internal": PEER}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    init_keys(str(tmp_path / "auth"))
    return tmp_path / "auth"


def _serve(creds: Any) -> Iterator[str]:
    srv = RPCServer(Methods(), access=ACCESS, creds=creds, max_message_bytes=1024 * 1024)
    port = _free_port()
    srv.bind(f"tcp://127.0.0.1:{port}")
    runner = gevent.spawn(srv.run)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        runner.kill()
        srv.close()


@pytest.fixture
def secured(keys: Path) -> Iterator[str]:
    yield from _serve(load_auth_dir(str(keys)))


@pytest.fixture
def plain() -> Iterator[str]:
    yield from _serve(None)


# -- key files -------------------------------------------------------------------------------


def test_init_writes_private_key_files_and_never_overwrites(tmp_path: Path) -> None:
    d = tmp_path / "k"
    cluster, client = init_keys(str(d))
    for p in (cluster, client):
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    before = Path(cluster).read_bytes()
    with pytest.raises(InvalidArgument, match="refusing to overwrite"):
        init_keys(str(d))
    assert Path(cluster).read_bytes() == before
    peer, app = load_key(cluster), load_key(client)
    assert peer.role == PEER and app.role == CLIENT
    assert app.server_public == peer.server_public == peer.public
    assert peer.client_public == app.public
    assert peer.roles() == {peer.public: PEER, app.public: CLIENT}
    # the HTTP token: in the client key, derived from the cluster key, and printed by `dkv auth token`
    assert app.bearer_token() == peer.http_tokens()[CLIENT] != peer.bearer_token() == peer.http_tokens()[PEER]
    out = subprocess.run(
        [sys.executable, "-m", "dkv.cli.main", "auth", "token", str(d)], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0 and out.stdout.strip() == app.bearer_token()


def test_key_files_others_can_read_or_that_are_not_keys_are_refused(keys: Path, tmp_path: Path) -> None:
    os.chmod(keys / CLUSTER_KEY, 0o640)
    with pytest.raises(InvalidArgument, match="chmod 600"):
        load_key(str(keys / CLUSTER_KEY))
    junk = tmp_path / "junk.key"
    junk.write_text("hello\n")
    os.chmod(junk, 0o600)
    with pytest.raises(InvalidArgument, match="cannot parse"):
        load_key(str(junk))
    with pytest.raises(InvalidArgument, match="does not exist"):
        load_key(str(tmp_path / "missing.key"))
    # A node needs the cluster key: an auth dir holding only a client key is refused.
    only_client = tmp_path / "only-client"
    only_client.mkdir()
    os.replace(keys / CLIENT_KEY, only_client / CLUSTER_KEY)
    with pytest.raises(InvalidArgument, match="not a cluster key"):
        load_auth_dir(str(only_client))


def test_zookeeper_acl_lets_dkv_do_everything_and_anyone_read(keys: Path) -> None:
    creds = load_auth_dir(str(keys))
    digest, world = creds.zk_acl()
    assert digest.id.scheme == "digest" and digest.perms == 31  # ALL
    assert world.id.scheme == "world" and world.perms == 1  # READ
    assert creds.zk_auth_data()[0][1].startswith("dkv:")
    with pytest.raises(AuthError):
        load_key(str(keys / CLIENT_KEY)).zk_password()


# -- protected mode ----------------------------------------------------------------------------


def test_a_non_loopback_bind_needs_auth_or_insecure(keys: Path) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1") and not is_loopback("example.com")
    with pytest.raises(InvalidArgument, match="--insecure"):
        NodeConfig(host="0.0.0.0", engine="memory")
    assert NodeConfig(host="0.0.0.0", engine="memory", insecure=True).credentials is None
    cfg = NodeConfig(host="0.0.0.0", engine="memory", auth_dir=str(keys))
    assert cfg.credentials is not None and cfg.credentials.is_peer


# -- CURVE and roles -------------------------------------------------------------------------


def test_client_key_may_call_data_rpcs_but_not_internal_ones(secured: str, keys: Path) -> None:
    client, cluster = load_key(str(keys / CLIENT_KEY)), load_auth_dir(str(keys))
    assert call_once(secured, "add", 2, 3, timeout=3, auth=client) == 5
    with pytest.raises(AuthError, match="cluster key"):
        call_once(secured, "internal", timeout=3, auth=client)
    assert call_once(secured, "internal", timeout=3, auth=cluster) == "internal"


def test_callers_without_a_key_or_with_another_clusters_key_are_refused_at_once(secured: str, tmp_path: Path) -> None:
    init_keys(str(tmp_path / "other"))
    other = load_key(str(tmp_path / "other" / CLIENT_KEY))
    for auth in (None, other):
        t0 = time.monotonic()
        with pytest.raises(AuthError):
            call_once(secured, "ping", timeout=5, auth=auth)
        assert time.monotonic() - t0 < 4, "a refused handshake is reported, not waited out"


def test_a_keyed_caller_of_a_node_without_auth_is_told_so(plain: str, keys: Path) -> None:
    with pytest.raises(AuthError, match="without --auth-dir"):
        call_once(plain, "ping", timeout=5, auth=load_key(str(keys / CLIENT_KEY)))
    assert call_once(plain, "ping", timeout=3, auth=None) == "pong"


def test_plain_zerorpc_gets_nothing_from_a_secured_node(secured: str) -> None:
    c = zerorpc.Client(timeout=1, heartbeat=None)
    c.connect(f"tcp://{secured}")
    try:
        with pytest.raises(zerorpc.TimeoutExpired):
            c("ping")
    finally:
        c.close()


# -- typed errors, bounded work ---------------------------------------------------------------


def test_unknown_methods_bad_arguments_and_crashes_get_typed_errors_without_tracebacks(plain: str) -> None:
    with pytest.raises(InvalidArgument, match="unknown method"):
        call_once(plain, "_zerorpc_inspect", timeout=3, auth=None)
    with pytest.raises(InvalidArgument, match="add"):
        call_once(plain, "add", 1, timeout=3, auth=None)
    with pytest.raises(Internal) as e:
        call_once(plain, "boom", timeout=3, auth=None)
    assert "secret" not in str(e.value) and "Traceback" not in str(e.value)
    c = zerorpc.Client(timeout=3, heartbeat=None)
    c.connect(f"tcp://{plain}")
    try:
        with pytest.raises(zerorpc.RemoteError) as raw:
            c("boom")
        assert raw.value.name == "Internal" and not raw.value.traceback
    finally:
        c.close()


def test_requests_beyond_the_per_connection_cap_are_refused_not_run(plain: str) -> None:
    c = zerorpc.Client(timeout=10, heartbeat=None)
    c.connect(f"tcp://{plain}")
    try:
        calls = [gevent.spawn(c, "wait", 1.0) for _ in range(MAX_INFLIGHT_PER_CONNECTION + 8)]
        gevent.joinall(calls, timeout=15)
        done = [g.value for g in calls if g.successful()]
        refused = [g.exception for g in calls if not g.successful()]
        assert done.count("done") == MAX_INFLIGHT_PER_CONNECTION
        assert len(refused) == 8 and all(
            isinstance(e, zerorpc.RemoteError) and e.name == Unavailable.__name__ for e in refused
        )
        assert c("ping") == "pong"  # the connection still works once the burst is over
    finally:
        c.close()


def test_docker_compose_publishes_every_port_on_loopback_only() -> None:
    import re

    compose = (Path(__file__).parent.parent / "docker-compose.yml").read_text()
    published = re.findall(r'^\s*-\s*"([^"]+:\d+)"\s*$', compose, flags=re.M)
    assert len(published) == 7, published  # ZooKeeper, and three nodes' RPC and HTTP ports
    assert all(p.startswith("127.0.0.1:") for p in published), published


def test_rotated_keys_are_new_but_keep_the_zookeeper_secret(keys: Path, tmp_path: Path) -> None:
    init_keys(str(tmp_path / "new"), zookeeper_from=str(keys / CLUSTER_KEY))
    old, new = load_auth_dir(str(keys)), load_auth_dir(str(tmp_path / "new"))
    assert new.public != old.public and new.client_public != old.client_public
    assert new.zk_password() == old.zk_password()
    with pytest.raises(InvalidArgument, match="not a cluster key"):
        init_keys(str(tmp_path / "bad"), zookeeper_from=str(keys / CLIENT_KEY))
