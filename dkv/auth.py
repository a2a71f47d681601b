"""Keys and roles: the cluster key and the client key, their files, and who may call what.

DESIGN §10. ``dkv auth init DIR`` writes two key files, mode 0600:

* ``DIR/cluster.key``: the **cluster key**, held by the nodes and ``dkv admin``
  (role ``peer``). It holds the cluster's CURVE key pair, which every node
  serves with, the client key's public half (so a node can admit clients), and
  the ZooKeeper secret behind the digest ACL of every znode dkv creates.
* ``DIR/client.key``: the **client key**, for applications (role ``client``):
  a CURVE key pair, and the cluster's public key to check the nodes with.

Sockets use ZeroMQ CURVE (:mod:`dkv.transport`): traffic is encrypted, and a
node's ZAP handler admits only the two public keys above and tells the node
which role a request comes from. Internal RPCs need the ``peer`` role.

A key file is plain text, ``name = value`` lines (``#`` comments); CURVE keys
are Z85 (40 characters), as ZeroMQ prints them.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from dataclasses import dataclass
from typing import Any, Sequence

from dkv.errors import AuthError, InvalidArgument

PEER = "peer"
CLIENT = "client"

CLUSTER_KEY = "cluster.key"
CLIENT_KEY = "client.key"

#: ZooKeeper digest ACL user of the nodes and ``dkv admin``.
ZK_USER = "dkv"

_Z85_LEN = 40


@dataclass(frozen=True)
class Credentials:
    """What one party holds: its CURVE key pair and role, and the cluster's public key."""

    role: str
    public: bytes
    secret: bytes
    #: the cluster's public key: every node serves with it; a caller checks it
    server_public: bytes
    #: (cluster key only) the client key's public half: nodes admit it as role ``client``
    client_public: bytes | None = None
    #: (cluster key only) the secret behind dkv's ZooKeeper digest ACL
    zk_secret: str | None = None
    path: str = ""
    #: (client key) the bearer token of the HTTP API (:func:`http_token`); None in a key file made
    #: before it existed (``dkv auth token DIR`` prints it)
    client_http_token: str | None = None

    def http_tokens(self) -> dict[str, str]:
        """(cluster key only) role -> the HTTP bearer token a node admits for it."""
        if not self.is_peer:
            raise AuthError(f"{self.path} is a client key; only the cluster key knows the HTTP tokens")
        return {CLIENT: http_token(self.secret, CLIENT), PEER: http_token(self.secret, PEER)}

    def bearer_token(self) -> str:
        """The token this key's holder sends to the HTTP API."""
        if self.is_peer:
            return http_token(self.secret, PEER)
        if self.client_http_token is None:
            raise AuthError(
                f"{self.path} has no http_token line: print it with `dkv auth token DIR` "
                "(DIR holds cluster.key) and add 'http_token = ...' to the file"
            )
        return self.client_http_token

    @property
    def is_peer(self) -> bool:
        return self.role == PEER

    def server_secret(self) -> bytes:
        """The secret a node serves with: the cluster's (only the cluster key has it)."""
        if not self.is_peer:
            raise AuthError(f"{self.path} is a client key; a node needs the cluster key ({CLUSTER_KEY})")
        return self.secret

    def roles(self) -> dict[bytes, str]:
        """Public key -> role, for a node's ZAP handler."""
        out = {self.server_public: PEER}
        if self.client_public is not None:
            out[self.client_public] = CLIENT
        return out

    # -- ZooKeeper digest ACLs (kazoo) -----------------------------------------

    def zk_password(self) -> str:
        if self.zk_secret is None:
            raise AuthError(f"{self.path} is a client key: it cannot write to dkv's ZooKeeper tree")
        return hmac.new(self.zk_secret.encode(), b"dkv zookeeper digest acl", hashlib.sha256).hexdigest()

    def zk_auth_data(self) -> list[tuple[str, str]]:
        """kazoo's ``auth_data``: authenticate the session as dkv's digest user."""
        return [("digest", f"{ZK_USER}:{self.zk_password()}")]

    def kazoo_args(self) -> dict[str, Any]:
        """KazooClient keyword arguments: authenticate, and give every znode we create our ACL."""
        return {"auth_data": self.zk_auth_data(), "default_acl": self.zk_acl()}

    def zk_acl(self) -> list[Any]:
        """kazoo's ``default_acl`` for every znode dkv creates: dkv's digest user may do
        everything, anyone may read (clients read the slot map with ``zk=``)."""
        from kazoo.security import make_acl, make_digest_acl

        return [make_digest_acl(ZK_USER, self.zk_password(), all=True), make_acl("world", "anyone", read=True)]


def http_token(cluster_secret: bytes, role: str) -> str:
    """The HTTP API's bearer token for ``role``, derived from the cluster's secret: a node checks it
    without holding anything new, and the token reveals nothing of the CURVE secrets (HTTP is not
    encrypted: a token seen on the wire gives HTTP access, not the cluster's transport keys)."""
    return hmac.new(cluster_secret, b"dkv http bearer token: " + role.encode(), hashlib.sha256).hexdigest()


def kazoo_args(creds: Credentials | None) -> dict[str, Any]:
    """KazooClient keyword arguments for ``creds`` (none without auth)."""
    return creds.kazoo_args() if creds is not None else {}


def secure_znodes(zk: Any, creds: Credentials, roots: Sequence[str]) -> int:
    """Give every znode under ``roots`` (made before auth was enabled) dkv's ACL; returns
    how many changed. Cheap: dkv's tree holds tens of znodes."""
    from kazoo.exceptions import NoNodeError

    acl, changed = creds.zk_acl(), 0
    todo = list(roots)
    while todo:
        path = todo.pop()
        try:
            current, stat = zk.get_acls(path)
            if sorted(map(str, current)) != sorted(map(str, acl)):
                zk.set_acls(path, acl, version=stat.aversion)
                changed += 1
            todo.extend(f"{path}/{child}" for child in zk.get_children(path))
        except NoNodeError:
            continue  # gone meanwhile (an ephemeral node, a finished migration)
    return changed


def _write_key_file(path: str, kind: str, fields: dict[str, str], comment: str) -> None:
    body = f"# {comment}\n# Keep it secret: anyone who has it can act as a {kind}.\nkind = {kind}\n"
    body += "".join(f"{k} = {v}\n" for k, v in fields.items())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(body)
        f.flush()
        os.fsync(f.fileno())


def init_keys(directory: str, zookeeper_from: str = "") -> tuple[str, str]:
    """``dkv auth init DIR``: write a new cluster key and client key; never overwrite.

    ``zookeeper_from`` (a cluster.key) keeps its ZooKeeper secret, for a key rotation:
    the znodes the old key protects stay writable by the new one.
    """
    import zmq

    zk_secret = secrets.token_hex(32)
    if zookeeper_from:
        old = load_key(zookeeper_from)
        if old.zk_secret is None:
            raise InvalidArgument(f"{zookeeper_from} is not a cluster key (it has no zookeeper secret)")
        zk_secret = old.zk_secret

    cluster_path, client_path = os.path.join(directory, CLUSTER_KEY), os.path.join(directory, CLIENT_KEY)
    for p in (cluster_path, client_path):
        if os.path.exists(p):
            raise InvalidArgument(
                f"{p} exists: refusing to overwrite a key (remove it first to make "
                "new keys, then restart every node and client with them)"
            )
    os.makedirs(directory, mode=0o700, exist_ok=True)
    server_pub, server_sec = zmq.curve_keypair()
    client_pub, client_sec = zmq.curve_keypair()
    _write_key_file(
        cluster_path,
        "cluster",
        {
            "public": server_pub.decode(),
            "secret": server_sec.decode(),
            "client_public": client_pub.decode(),
            "zookeeper": zk_secret,
        },
        "dkv cluster key: for the nodes (dkv serve --auth-dir) and dkv admin (--auth-dir).",
    )
    _write_key_file(
        client_path,
        "client",
        {
            "public": client_pub.decode(),
            "secret": client_sec.decode(),
            "server": server_pub.decode(),
            "http_token": http_token(server_sec, CLIENT),
        },
        "dkv client key: for applications (dkv.Client(auth=...), dkv cli/bench --auth); http_token: the "
        "bearer token of the nodes' HTTP API.",
    )
    return cluster_path, client_path


def _z85(fields: dict[str, str], name: str, path: str) -> bytes:
    value = fields.get(name)
    if value is None:
        raise InvalidArgument(f"{path}: missing '{name} = ...' (is it a dkv key file? see `dkv auth init`)")
    if len(value) != _Z85_LEN:
        raise InvalidArgument(f"{path}: '{name}' is not a {_Z85_LEN}-character Z85 CURVE key")
    return value.encode()


def load_key(path: str) -> Credentials:
    """Read a key file (cluster.key or client.key); refuse one that others can read."""
    try:
        st = os.stat(path)
        with open(path, encoding="ascii") as f:
            text = f.read(64 * 1024)
    except FileNotFoundError:
        raise InvalidArgument(f"key file {path} does not exist (make keys with `dkv auth init DIR`)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"cannot read key file {path}: {e}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise InvalidArgument(
            f"key file {path} is accessible by other users (mode "
            f"{stat.S_IMODE(st.st_mode):04o}): run `chmod 600 {path}`"
        )
    fields: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        if not sep:
            raise InvalidArgument(f"{path}: cannot parse line {line[:40]!r} (expected 'name = value')")
        fields[name.strip()] = value.strip()
    kind = fields.get("kind")
    public, secret = _z85(fields, "public", path), _z85(fields, "secret", path)
    if kind == "cluster":
        zk = fields.get("zookeeper", "")
        if len(zk) < 32:
            raise InvalidArgument(f"{path}: missing or short 'zookeeper = ...' secret")
        return Credentials(
            PEER,
            public,
            secret,
            server_public=public,
            client_public=_z85(fields, "client_public", path),
            zk_secret=zk,
            path=path,
        )
    if kind == "client":
        return Credentials(
            CLIENT,
            public,
            secret,
            server_public=_z85(fields, "server", path),
            path=path,
            client_http_token=fields.get("http_token") or None,
        )
    raise InvalidArgument(f"{path}: 'kind' must be cluster or client (is it a dkv key file?)")


def load_auth_dir(directory: str) -> Credentials:
    """The cluster key of an auth directory (``--auth-dir``): what nodes and ``dkv admin`` use."""
    creds = load_key(os.path.join(directory, CLUSTER_KEY))
    if not creds.is_peer:
        raise InvalidArgument(f"{creds.path} is not a cluster key")
    return creds


def load_optional(auth: "str | Credentials | None") -> Credentials | None:
    """A caller's credentials from a key file path, already-loaded credentials, or None."""
    if auth is None or isinstance(auth, Credentials):
        return auth
    if not isinstance(auth, (str, os.PathLike)) or not str(auth):
        raise InvalidArgument("auth must be the path of a key file (client.key or cluster.key)")
    return load_key(os.fspath(auth))
