"""The ``dkv`` console command: argument parsing and dispatch to subcommands.

Every flag also reads a ``DKV_<FLAG>`` environment variable (``--node-id`` ->
``DKV_NODE_ID``); a flag given on the command line wins. Subcommand modules are
imported only when chosen, so ``dkv bench`` can monkey-patch gevent first.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Callable, Sequence


def _env_flag(
    parser: argparse.ArgumentParser,
    flag: str,
    *,
    type: Callable[[str], Any] = str,
    default: Any = None,
    help: str = "",
    **kw: Any,
) -> None:
    """Add ``flag`` whose default comes from ``DKV_<FLAG>`` when set."""
    var = "DKV_" + flag.lstrip("-").replace("-", "_").upper()
    raw = os.environ.get(var)
    if kw.get("action") == "store_true":  # a switch: DKV_FLAG=1/true/yes/on turns it on
        if raw is not None and raw.strip().lower() not in _TRUE + _FALSE:
            parser.error(f"environment variable {var}={raw!r} is not a valid {flag} value (use 1 or 0)")
        default = raw is not None and raw.strip().lower() in _TRUE
        parser.add_argument(flag, default=default, help=f"{help} [env {var}=1]", **kw)
        return
    if raw is not None:
        try:
            default = type(raw)
        except ValueError:
            parser.error(f"environment variable {var}={raw!r} is not a valid {flag} value")
    parser.add_argument(flag, type=type, default=default, help=f"{help} [env {var}]", **kw)


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def _ratio(text: str) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in text.split(":"))
        if a < 0 or b < 0 or a + b == 0:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"ratio must look like SET:GET, e.g. 1:1 or 1:9, not {text!r}") from None
    return a, b


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dkv", description="dkv: a distributed key-value store")
    from dkv import __version__

    p.add_argument("--version", action="version", version=f"dkv {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    s = sub.add_parser("serve", help="run a node", description="Run a dkv node (standalone).")
    _env_flag(s, "--node-id", default="", help="node name (default node-PORT)")
    _env_flag(s, "--host", default="127.0.0.1", help="address to listen on")
    _env_flag(s, "--port", type=int, default=7000, help="port to listen on")
    _env_flag(
        s,
        "--http-port",
        type=int,
        default=0,
        help="serve HTTP on this port of --host: Prometheus /metrics, /health and the JSON API "
        "/v1/kv/KEY, /v1/kv?prefix=, /v1/cluster (0: off)",
    )
    _env_flag(
        s,
        "--advertise",
        default="",
        help="HOST:PORT peers and clients use to reach this node (default HOST:PORT; needed with --host 0.0.0.0)",
    )
    _env_flag(s, "--data-dir", default="", help="data directory (default dkv-data/NODE_ID)")
    _env_flag(
        s,
        "--engine",
        default="leveldb",
        choices=["leveldb", "memory"],
        help="storage engine; memory = diskless, nothing survives a restart",
    )
    _env_flag(
        s,
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level",
    )
    _env_flag(s, "--max-key-bytes", type=int, default=1024, help="largest key accepted")
    _env_flag(s, "--max-value-bytes", type=int, default=1024 * 1024, help="largest value accepted")
    _env_flag(s, "--wal-segment-bytes", type=int, default=64 * 1024 * 1024, help="WAL segment size")
    _env_flag(
        s,
        "--wal-repair",
        action="store_true",
        help="if the WAL is corrupt (damage followed by valid records), copy everything from the "
        "damage on to a quarantine file in the WAL directory, cut the log there and start; "
        "use once, after reading why the node refused to start",
    )
    _env_flag(
        s,
        "--zk",
        default="",
        help="ZooKeeper HOST:PORT[,HOST:PORT...][/chroot]: cluster mode (without it the node is standalone)",
    )
    _env_flag(s, "--replication-factor", type=int, default=3, help="members per shard (cluster mode)")
    _env_flag(
        s,
        "--write-quorum",
        type=int,
        default=2,
        help="members that must hold a write before it is acknowledged, writer included",
    )
    _env_flag(s, "--session-timeout", type=float, default=10.0, help="ZooKeeper session timeout, seconds")
    _env_flag(s, "--write-timeout", type=float, default=5.0, help="seconds a write waits for its quorum")
    _env_flag(
        s, "--max-replica-lag", type=int, default=1000, help="records a replica may lag and still serve eventual reads"
    )
    _env_flag(
        s,
        "--migration-rate",
        type=int,
        default=0,
        help="records per second a slot migration into this node's shard imports at most "
        "(0: unlimited); throttles resharding to spare foreground traffic",
    )
    _env_flag(
        s,
        "--migration-freeze-timeout",
        type=float,
        default=10.0,
        help="seconds a moving slot range may stay frozen (refusing writes) before the move "
        "is cancelled and the source serves it again",
    )
    _env_flag(
        s,
        "--anti-entropy-interval",
        type=float,
        default=30.0,
        help="seconds between a shard writer's store digest comparisons with its replicas; a "
        "diverged replica is re-synced from a snapshot (0: never)",
    )
    _env_flag(
        s,
        "--auth-dir",
        default="",
        help="directory holding cluster.key (see `dkv auth init`): "
        "encrypt and authenticate every connection (CURVE) and "
        "protect the cluster's znodes with a ZooKeeper ACL",
    )
    _env_flag(
        s,
        "--insecure",
        action="store_true",
        help="allow a non-loopback --host without --auth-dir: anyone who can reach the port can "
        "read, change or wipe the data (only on a network you trust entirely)",
    )

    c = sub.add_parser(
        "cli",
        help="interactive prompt (or run commands from stdin or the command line)",
        description="Interactive dkv prompt, printing replies as redis-cli does. Words "
        "after the addresses are one command to run (dkv cli 127.0.0.1:7000 "
        "get k; put -- before a word starting with -). When stdin is not a "
        "terminal, runs one command per line.",
    )
    c.add_argument(
        "addrs",
        nargs="*",
        metavar="ADDR",
        help="node HOST:PORT (default 127.0.0.1:7000 unless --zk) [env DKV_ADDR], then optionally COMMAND [ARG ...]",
    )
    _env_flag(c, "--timeout", type=float, default=5.0, help="seconds per command")
    _env_flag(
        c,
        "--zk",
        default="",
        help="ZooKeeper HOST:PORT[,HOST:PORT...][/chroot]: take the cluster map from ZooKeeper (ADDRs then optional)",
    )
    _env_flag(c, "--auth", default="", help="key file (client.key, or cluster.key) of a cluster with auth")
    _env_flag(
        c,
        "--raw",
        action="store_true",
        help="print replies as redis-cli --raw: values as they are "
        "(no quotes), nil as an empty line, integers bare, "
        "one array element a line",
    )
    _env_flag(
        c,
        "--latency",
        action="store_true",
        help="print each command's round trip, e.g. (0.4 ms), after its reply (the latency command toggles it)",
    )

    b = sub.add_parser(
        "bench",
        help="measure throughput and latency of a node",
        description="Benchmark a dkv node with concurrent clients.",
    )
    b.add_argument("addrs", nargs="*", metavar="ADDR", help="node HOST:PORT (default 127.0.0.1:7000) [env DKV_ADDR]")
    _env_flag(b, "--clients", type=int, default=32, help="concurrent clients")
    _env_flag(b, "--ops", type=int, default=None, help="total operations (default 100000 unless --duration)")
    _env_flag(
        b,
        "--duration",
        type=float,
        default=None,
        help="run for this many seconds instead of a number of ops (not with --ops)",
    )
    _env_flag(b, "--value-size", type=int, default=100, help="value size in bytes")
    _env_flag(
        b,
        "--op",
        default="mix",
        choices=["mix", "set", "get", "incr", "cas"],
        help="what each op does: mix = sets and gets in --ratio; set, get; incr = one incr of a "
        "random counter; cas = one cas(key, last value, next value) on a key no other op "
        "holds (every one should succeed; needs --keys >= --clients)",
    )
    _env_flag(b, "--ratio", type=_ratio, default=(1, 1), help="SET:GET mix of --op mix, e.g. 1:1, 1:0, 0:1")
    _env_flag(b, "--keys", type=int, default=100_000, help="size of the key space")
    _env_flag(b, "--timeout", type=float, default=10.0, help="seconds per request")
    _env_flag(
        b,
        "--consistency",
        choices=["sequential", "linearizable", "eventual"],
        default="sequential",
        help="consistency level of the gets",
    )
    _env_flag(b, "--auth", default="", help="key file (client.key, or cluster.key) of a cluster with auth")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("--json", action="store_true", help="print the report as one line of JSON (for scripts)")

    k = sub.add_parser(
        "auth",
        help="make keys: auth init DIR",
        description="init DIR writes DIR/cluster.key (for the nodes: dkv serve --auth-dir "
        "DIR; and dkv admin --auth-dir DIR) and DIR/client.key (for "
        "applications: dkv.Client(auth=...), dkv cli/bench --auth FILE), "
        "mode 0600. It never overwrites a key.",
    )
    k.add_argument(
        "action",
        choices=["init", "token"],
        help="init: make the keys; token: print the HTTP API's bearer token for clients (from DIR/cluster.key)",
    )
    k.add_argument("dir", metavar="DIR", help="directory for the keys (created, mode 0700, if missing)")
    k.add_argument(
        "--zookeeper-from",
        default="",
        metavar="CLUSTER_KEY",
        help="key rotation: keep this old cluster.key's ZooKeeper secret, so the new key may "
        "change the znodes the old one protects",
    )

    w = sub.add_parser(
        "wal",
        help="offline WAL maintenance: repair",
        description="Work on a stopped node's write-ahead log. repair DATA_DIR: if the "
        "WAL is corrupt, copy everything from the damage on to a "
        "quarantine-*.bin file in DATA_DIR/wal, then cut the log there "
        "(what dkv serve --wal-repair does at start).",
    )
    w.add_argument("action", choices=["repair"])
    w.add_argument("data_dir", metavar="DATA_DIR", help="the node's data directory (its --data-dir)")

    a = sub.add_parser(
        "admin",
        help="cluster administration: status, drain, undrain, remove, cancel",
        description="Administer a cluster through ZooKeeper. drain SHARD moves the "
        "shard's slots (with their data) to the other shards; undrain "
        "SHARD lets it take slots again; remove SHARD deletes a drained "
        "shard whose nodes are stopped; cancel MIGRATION abandons a slot "
        "move (the source keeps the range).",
    )
    a.add_argument("action", choices=["status", "drain", "undrain", "remove", "cancel"])
    a.add_argument(
        "name",
        nargs="?",
        metavar="SHARD|MIGRATION",
        help="the shard (e.g. shard-2) or migration (e.g. m-0000000003, see status)",
    )
    _env_flag(a, "--zk", default="", help="ZooKeeper HOST:PORT[,HOST:PORT...][/chroot] of the cluster")
    _env_flag(a, "--timeout", type=float, default=3.0, help="seconds to reach ZooKeeper")
    _env_flag(a, "--auth-dir", default="", help="directory holding the cluster key of a cluster with auth")

    for name, what in (
        ("backup", "copy every shard's data (at one committed LSN per shard) into DIR"),
        ("restore", "load a backup from DIR into an empty node or cluster"),
    ):
        r = sub.add_parser(
            name,
            help=what,
            description=f"{what[0].upper()}{what[1:]}. Format, manifest and "
            "guarantees: the docstring of dkv/cli/backup.py (README: Backup and restore).",
        )
        r.add_argument(
            "addr",
            nargs="?",
            metavar="ADDR",
            help="a node HOST:PORT (default 127.0.0.1:7000 unless --zk) [env DKV_ADDR]",
        )
        r.add_argument("dir", metavar="DIR", help="the backup directory")
        _env_flag(r, "--zk", default="", help="ZooKeeper HOST:PORT[,HOST:PORT...][/chroot] of the cluster")
        _env_flag(
            r,
            "--auth",
            default="",
            help="the cluster key (cluster.key, or the directory holding it) of a cluster with auth",
        )
        _env_flag(r, "--timeout", type=float, default=30.0, help="seconds per request to a node")
        _env_flag(r, "--quiet", action="store_true", help="no progress lines on stderr")
        if name == "backup":
            _env_flag(
                r,
                "--migration-wait",
                type=float,
                default=60.0,
                help="seconds to wait for a slot migration under way to finish before giving up",
            )
        else:
            _env_flag(
                r,
                "--force",
                action="store_true",
                help="restore into a target that holds data (the backup's keys overwrite, others stay)",
            )
    for tool in (c, b, a):
        tool.add_argument(
            "-v",
            "--verbose",
            action="count",
            default=0,
            help="log to stderr what happens underneath (ZooKeeper connection messages, "
            "retries): -v INFO, -vv DEBUG; without it only results and errors print",
        )
    return p


def _addrs(given: list[str]) -> list[str]:
    """Addresses from the arguments (each may be comma-separated), else DKV_ADDR."""
    return ",".join(given or [os.environ.get("DKV_ADDR", "127.0.0.1:7000")]).split(",")


#: ``dkv bench``'s run length when neither --ops nor --duration is given.
DEFAULT_BENCH_OPS = 100_000


def _on_command_line(flag: str, argv: Sequence[str]) -> bool:
    """Whether ``flag`` (or an abbreviation argparse accepts) is among ``argv``."""
    return any(
        len(name) > 2 and flag.startswith(name) for name in (t.split("=", 1)[0] for t in argv if t.startswith("--"))
    )


def _bench_bound(ops: int | None, duration: float | None, argv: Sequence[str] = ()) -> tuple[int | None, float | None]:
    """Which of --ops and --duration stops ``dkv bench``: exactly one (neither: the default ops).

    When both have a value and only one was given on the command line (the
    other came from DKV_OPS or DKV_DURATION), the command line wins.
    """
    from dkv.errors import InvalidArgument

    if ops is not None and duration is not None:
        ops_given, duration_given = _on_command_line("--ops", argv), _on_command_line("--duration", argv)
        if ops_given and not duration_given:
            return ops, None
        if duration_given and not ops_given:
            return None, duration
        raise InvalidArgument("give --ops or --duration, not both")
    if ops is None and duration is None:
        return DEFAULT_BENCH_OPS, None
    return ops, duration


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and (args.command != "cli" or any(w.startswith("--") and len(w) > 2 for w in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:  # dkv cli ADDR --raw get k: the command's words after a flag
        args.addrs = [*args.addrs, *(w for w in extra if w != "--")]
    from dkv.errors import DKVError

    if args.command in ("cli", "bench", "admin"):
        from dkv.logs import setup_cli

        setup_cli(args.verbose)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "cli":
            from dkv.cli.repl import run_cli, split_command

            given, command = split_command(args.addrs)
            addrs = _addrs(given) if given or not args.zk else []
            return run_cli(
                addrs,
                timeout=args.timeout,
                zk=args.zk,
                auth=args.auth,
                raw=args.raw,
                latency=args.latency,
                command=command,
            )
        if args.command == "bench":
            from dkv.cli.bench import run_bench

            ops, duration = _bench_bound(args.ops, args.duration, argv)
            return run_bench(
                _addrs(args.addrs),
                clients=args.clients,
                ops=ops,
                value_size=args.value_size,
                ratio=args.ratio,
                keys=args.keys,
                timeout=args.timeout,
                progress=not args.no_progress,
                consistency=args.consistency,
                auth=args.auth,
                duration=duration,
                as_json=args.json,
                op_kind=args.op,
            )
        if args.command == "wal":
            return _wal(args)
        if args.command == "admin":
            from dkv.cli.admin import run_admin

            return run_admin(args.zk, args.action, args.name, timeout=args.timeout, auth_dir=args.auth_dir)
        if args.command in ("backup", "restore"):
            return _backup(args)
        if args.command == "auth" and args.action == "token":
            from dkv.auth import CLIENT, load_auth_dir

            print(load_auth_dir(args.dir).http_tokens()[CLIENT])
            return 0
        if args.command == "auth":
            from dkv.auth import init_keys

            cluster_key, client_key = init_keys(args.dir, args.zookeeper_from)
            print(
                f"wrote {cluster_key} (nodes: dkv serve --auth-dir {args.dir}; dkv admin --auth-dir "
                f'{args.dir})\nwrote {client_key} (applications: dkv.Client(..., auth="{client_key}"), '
                f"dkv cli --auth {client_key})"
            )
            return 0
    except DKVError as e:
        print(f"dkv {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 2


def _serve(args: argparse.Namespace) -> int:
    from dkv.node.config import NodeConfig
    from dkv.node.server import serve

    config = NodeConfig(
        node_id=args.node_id,
        host=args.host,
        port=args.port,
        advertise=args.advertise,
        http_port=args.http_port,
        data_dir=args.data_dir,
        engine=args.engine,
        log_level=args.log_level,
        max_key_bytes=args.max_key_bytes,
        max_value_bytes=args.max_value_bytes,
        wal_segment_bytes=args.wal_segment_bytes,
        wal_repair=args.wal_repair,
        zk=args.zk,
        replication_factor=args.replication_factor,
        write_quorum=args.write_quorum,
        session_timeout=args.session_timeout,
        write_timeout=args.write_timeout,
        max_replica_lag=args.max_replica_lag,
        migration_rate=args.migration_rate,
        migration_freeze_timeout=args.migration_freeze_timeout,
        anti_entropy_interval=args.anti_entropy_interval,
        auth_dir=args.auth_dir,
        insecure=args.insecure,
    )
    logging.basicConfig(
        level=config.log_level, format="%(asctime)s %(levelname)s [" + config.node_id + "] %(name)s: %(message)s"
    )
    serve(config)
    return 0


def _backup(args: argparse.Namespace) -> int:
    from dkv.cli import backup

    addrs = [] if args.zk and not args.addr else _addrs([args.addr] if args.addr else [])
    directory = args.dir
    if args.command == "backup":
        return backup.run_backup(
            addrs,
            args.zk,
            directory,
            timeout=args.timeout,
            auth=args.auth,
            quiet=args.quiet,
            migration_wait=args.migration_wait,
        )
    return backup.run_restore(
        addrs, args.zk, directory, timeout=args.timeout, auth=args.auth, quiet=args.quiet, force=args.force
    )


def _wal(args: argparse.Namespace) -> int:
    from dkv.node.server import repair_wal

    logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
    report = repair_wal(args.data_dir)
    if report is None:
        print(f"the WAL in {args.data_dir} is not corrupt; nothing to repair")
    else:
        print(
            f"cut {report.cut_bytes} byte(s) at offset {report.offset} of {report.segment} "
            f"(the log now ends at lsn {report.last_good_lsn}; {report.records} valid record(s) cut"
            + (f", lsn {report.lsn_range[0]}..{report.lsn_range[1]}" if report.records else "")
            + f"); quarantined in {', '.join(report.quarantined)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
