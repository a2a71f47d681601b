"""dkv against etcd on the same machine: the same load on both, one after the other, in one run.

Starts a 3-member etcd (Debian's ``etcd-server``, installed by
``scripts/ensure-etcd.sh`` when missing), a 1-shard x 3-member dkv cluster
(write quorum 2, fsync on) and a standalone dkv node, against a running
ZooKeeper (``make zk-up``). Then, for each workload and run, it drives etcd
with a Python gRPC client (``grpc.aio``, one channel, N requests in flight)
and dkv with ``dkv bench --duration --json`` (N greenlets sharing one
``dkv.Client``): 16-byte keys, 100-byte values, same concurrency, same
duration. It prints a table (medians over ``--runs``) with the dkv/etcd
ratios that issue 10's goals name, and stops every process it started, also
on Ctrl-C or an error. ``make bench-vs-etcd`` installs what it needs and runs
it.

    python benchmarks/vs_etcd.py [--zk 127.0.0.1:2181] [--runs 3] [--duration 10]
    python benchmarks/vs_etcd.py --runs 0 --profile DIR   # py-spy of the writer and a replica

The etcd client hand-encodes the two messages it needs (``PutRequest`` and
``RangeRequest``) and calls grpc's generic ``unary_unary`` with raw bytes:
about forty lines instead of the ``etcd3`` package, which is unmaintained,
pins an old protobuf and has no asyncio client.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cluster_bench import free_port, start_nodes, stop_all  # noqa: E402 (after the path set-up)

from dkv.cli.bench import LoadResult, bench_key, percentile  # noqa: E402

# --------------------------------------------------------------------------- protobuf, by hand


def varint(n: int) -> bytes:
    """Protobuf base-128 varint of a non-negative int."""
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field_bytes(number: int, data: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return varint(number << 3 | 2) + varint(len(data)) + data


def field_varint(number: int, value: int) -> bytes:
    """A varint field (wire type 0)."""
    return varint(number << 3) + varint(value)


def encode_put(key: bytes, value: bytes) -> bytes:
    """etcdserverpb.PutRequest{key: 1, value: 2}."""
    return field_bytes(1, key) + field_bytes(2, value)


def encode_range(key: bytes, serializable: bool = False) -> bytes:
    """etcdserverpb.RangeRequest{key: 1, serializable: 7} (one key; linearizable unless serializable)."""
    return field_bytes(1, key) + (field_varint(7, 1) if serializable else b"")


def decode_fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of each field of a protobuf message: ints for varints, bytes for the rest."""
    i = 0

    def read_varint() -> int:
        nonlocal i
        shift = result = 0
        while True:
            byte = buf[i]
            i += 1
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return result
            shift += 7

    while i < len(buf):
        tag = read_varint()
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            yield number, read_varint()
        elif wire == 2:
            size = read_varint()
            yield number, buf[i : i + size]
            i += size
        elif wire == 1:
            yield number, buf[i : i + 8]
            i += 8
        elif wire == 5:
            yield number, buf[i : i + 4]
            i += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def range_values(response: bytes) -> list[bytes]:
    """The values of a RangeResponse's kvs (field 2; KeyValue.value is field 5)."""
    return [
        v
        for n, kv in decode_fields(response)
        if n == 2 and isinstance(kv, bytes)
        for m, v in decode_fields(kv)
        if m == 5 and isinstance(v, bytes)
    ]


def status_is_leader(response: bytes) -> bool:
    """Whether a Maintenance StatusResponse comes from the leader (header.member_id == leader)."""
    fields = dict(decode_fields(response))
    header = fields.get(1, b"")
    member = dict(decode_fields(header)).get(2) if isinstance(header, bytes) else None
    return member is not None and member == fields.get(4)


PUT = "/etcdserverpb.KV/Put"
RANGE = "/etcdserverpb.KV/Range"
STATUS = "/etcdserverpb.Maintenance/Status"

# --------------------------------------------------------------------------- measurements


@dataclass(frozen=True)
class Measure:
    """One measured workload on one system: throughput, latency percentiles, failed ops."""

    ops_s: float
    p50_ms: float
    p99_ms: float
    errors: int = 0

    @classmethod
    def of(cls, result: LoadResult) -> Measure:
        lat = result.latencies
        return cls(
            result.throughput,
            percentile(lat, 50) * 1000 if lat else float("nan"),
            percentile(lat, 99) * 1000 if lat else float("nan"),
            result.failed,
        )

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Measure:
        """From ``dkv bench --json`` output."""
        nan = float("nan")
        return cls(
            float(doc["throughput_ops_s"]),
            nan if doc["p50_ms"] is None else float(doc["p50_ms"]),
            nan if doc["p99_ms"] is None else float(doc["p99_ms"]),
            int(doc["failed"]),
        )


def median_measure(measures: Sequence[Measure]) -> Measure:
    """Each figure's median over runs (taken separately per figure); errors are summed."""
    if not measures:
        raise ValueError("no measures")
    return Measure(
        statistics.median(m.ops_s for m in measures),
        statistics.median(m.p50_ms for m in measures),
        statistics.median(m.p99_ms for m in measures),
        sum(m.errors for m in measures),
    )


@dataclass(frozen=True)
class Workload:
    """One row of the table: what etcd runs (None: dkv only) and what dkv runs."""

    name: str
    title: str
    clients: int
    etcd: str | None  # "put", "range" (linearizable) or "range-serializable"
    dkv_target: str  # "cluster" or "standalone"
    dkv_ratio: str  # dkv bench --ratio
    dkv_consistency: str = "sequential"


WORKLOADS: tuple[Workload, ...] = (
    Workload("set1", "sets, 1 client", 1, "put", "cluster", "1:0"),
    Workload("set32", "sets, 32 in flight", 32, "put", "cluster", "1:0"),
    Workload(
        "lin32",
        "linearizable gets, 32 in flight (etcd: linearizable range)",
        32,
        "range",
        "cluster",
        "0:1",
        "linearizable",
    ),
    Workload(
        "seq32",
        "sequential gets, 32 in flight (etcd: serializable range)",
        32,
        "range-serializable",
        "cluster",
        "0:1",
        "sequential",
    ),
    Workload("standalone32", "standalone sets, 32 in flight", 32, None, "standalone", "1:0"),
)


def select_workloads(names: Sequence[str] | None) -> list[Workload]:
    """The workloads named (all when None), in the table's order."""
    known = {w.name: w for w in WORKLOADS}
    if not names:
        return list(WORKLOADS)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown workload(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return [w for w in WORKLOADS if w.name in names]


# --------------------------------------------------------------------------- the table


def _num(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:,.0f}"


def _ms(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.2f}"


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else float("nan")


def _x(r: float) -> str:
    return "n/a" if math.isnan(r) else f"{r:.2f}x"


def format_table(rows: Sequence[tuple[Workload, Measure, Measure | None]]) -> str:
    """A Markdown table: each workload's dkv and etcd figures and the dkv/etcd ratios."""
    lines = [
        (
            "| workload | dkv ops/s | dkv p50 ms | dkv p99 ms | etcd ops/s | etcd p50 ms | etcd p99 ms "
            "| ops/s dkv/etcd | p50 dkv/etcd |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for w, d, e in rows:
        etcd = [_num(e.ops_s), _ms(e.p50_ms), _ms(e.p99_ms)] if e else ["", "", ""]
        ratios = [_x(_ratio(d.ops_s, e.ops_s)), _x(_ratio(d.p50_ms, e.p50_ms))] if e else ["", ""]
        lines.append("| " + " | ".join([w.title, _num(d.ops_s), _ms(d.p50_ms), _ms(d.p99_ms), *etcd, *ratios]) + " |")
    return "\n".join(lines)


def _verdict(value: float, goal: float, milestone: float | None, higher_is_better: bool) -> str:
    if math.isnan(value):
        return "not measured"

    def ok(limit: float) -> bool:
        return value >= limit if higher_is_better else value <= limit

    if ok(goal):
        return "goal met"
    if milestone is not None and ok(milestone):
        return "milestone met, goal not"
    return "not met"


def format_goals(results: dict[str, tuple[Measure, Measure | None]]) -> str:
    """Issue 10's goals, each with the measured ratio or figure and whether it is met."""
    out: list[str] = []
    if "set32" in results and results["set32"][1]:
        d, e = results["set32"]
        assert e is not None
        r = _ratio(d.ops_s, e.ops_s)
        out.append(
            f"- replicated sets, 32 in flight: dkv/etcd = {_x(r)} (goal >= 2.0x, milestone >= 1.0x): "
            f"{_verdict(r, 2.0, 1.0, True)}; dkv p99 {_ms(d.p99_ms)} ms (goal <= 15 ms): "
            f"{_verdict(d.p99_ms, 15.0, None, False)}"
        )
    if "set1" in results and results["set1"][1]:
        d, e = results["set1"]
        assert e is not None
        r = _ratio(d.p50_ms, e.p50_ms)
        out.append(
            f"- one client: dkv set p50 / etcd put p50 = {_x(r)} (goal <= 1.2x, milestone <= 2.0x): "
            f"{_verdict(r, 1.2, 2.0, False)}"
        )
    if "lin32" in results and results["lin32"][1]:
        d, e = results["lin32"]
        assert e is not None
        r = _ratio(d.ops_s, e.ops_s)
        out.append(
            f"- linearizable gets, 32 in flight: dkv/etcd = {_x(r)} (goal >= 2.0x): {_verdict(r, 2.0, None, True)}"
        )
    if "seq32" in results:
        d, e = results["seq32"]
        line = "- sequential gets, 32 in flight:"
        if e:
            line += f" dkv/etcd serializable = {_x(_ratio(d.ops_s, e.ops_s))};"
        if "lin32" in results:
            lin = results["lin32"][0].ops_s
            line += (
                f" {_x(_ratio(d.ops_s, lin))} dkv's linearizable gets (goal: higher): "
                f"{_verdict(d.ops_s, lin, None, True) if not math.isnan(lin) else 'not measured'}"
            )
        out.append(line.rstrip(";"))
    if "standalone32" in results:
        d = results["standalone32"][0]
        out.append(
            f"- standalone sets, 32 in flight: {_num(d.ops_s)} ops/s (goal >= 20,000): "
            f"{_verdict(d.ops_s, 20_000, None, True)}"
        )
    return "\n".join(out)


def summarize_collapsed(lines: Sequence[str], top: int = 15) -> list[tuple[str, float, float]]:
    """Top functions of py-spy ``--format raw`` (collapsed) stacks: (function, self %, total %).

    A frame ``name (file.py:12)`` counts as ``name (file.py)``; self = the
    stack's innermost frame, total = anywhere on the stack (once per stack).
    Percentages are of all samples in ``lines``; sorted by self, then total.
    """
    self_: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in lines:
        line = line.rstrip("\n")
        if not line.strip():
            continue
        stack, _, count_text = line.rpartition(" ")
        try:
            count = int(count_text)
        except ValueError:
            continue
        frames = [_function(f) for f in stack.split(";") if f]
        if not frames:
            continue
        samples += count
        self_[frames[-1]] += count
        for f in set(frames):
            total[f] += count
    if not samples:
        return []
    ranked = sorted(total, key=lambda f: (-self_[f], -total[f], f))[:top]
    return [(f, 100.0 * self_[f] / samples, 100.0 * total[f] / samples) for f in ranked]


def _function(frame: str) -> str:
    name, sep, where = frame.partition(" (")
    if not sep:
        return frame
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = Path(path).parts
    short = "/".join(parts[parts.index("dkv") :]) if "dkv" in parts else "/".join(parts[-2:])
    return f"{name} ({short})"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--zk", default="127.0.0.1:2181", help="ZooKeeper HOST:PORT for the dkv cluster")
    p.add_argument("--runs", type=int, default=1, help="runs of every workload; the table shows medians")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per workload and system")
    p.add_argument("--clients", type=int, default=32, help="requests in flight for the concurrent workloads")
    p.add_argument("--value-size", type=int, default=100)
    p.add_argument("--keys", type=int, default=10_000, help="key space (preloaded before the runs)")
    p.add_argument(
        "--workloads", nargs="+", metavar="NAME", help=f"only these ({', '.join(w.name for w in WORKLOADS)})"
    )
    p.add_argument("--etcd-bin", default="", help="etcd binary (default: scripts/ensure-etcd.sh finds or installs one)")
    p.add_argument("--json-out", default="", help="also write every run's figures to this JSON file")
    p.add_argument(
        "--profile",
        default="",
        metavar="DIR",
        help="after the runs, profile the dkv writer and one replica with py-spy under the "
        "32-in-flight set load; collapsed stacks and a summary go to DIR",
    )
    p.add_argument("--profile-seconds", type=float, default=20.0)
    args = p.parse_args(argv)
    if args.runs < 0 or args.duration <= 0 or args.clients < 1 or args.keys < 1 or args.value_size < 0:
        p.error("--runs >= 0, --duration > 0, --clients >= 1, --keys >= 1, --value-size >= 0")
    if args.runs == 0 and not args.profile:
        p.error("--runs 0 only makes sense with --profile")
    try:
        args.selected = select_workloads(args.workloads)
    except ValueError as e:
        p.error(str(e))
    if args.clients != 32:  # the concurrent rows take their concurrency from --clients
        args.selected = [
            w
            if w.clients == 1
            else Workload(
                w.name,
                w.title.replace("32", str(args.clients)),
                args.clients,
                w.etcd,
                w.dkv_target,
                w.dkv_ratio,
                w.dkv_consistency,
            )
            for w in args.selected
        ]
    return args


# --------------------------------------------------------------------------- processes (I/O below)


class Etcd:
    """A 3-member etcd cluster on loopback, each member with its own data dir under ``base``."""

    def __init__(self, binary: str, base: str, members: int = 3) -> None:
        self.base = base
        self.procs: list[subprocess.Popen[bytes]] = []
        self.endpoints: list[str] = []
        names = [f"e{i}" for i in range(1, members + 1)]
        peer = {n: f"http://127.0.0.1:{free_port()}" for n in names}
        client = {n: f"127.0.0.1:{free_port()}" for n in names}
        cluster = ",".join(f"{n}={peer[n]}" for n in names)
        token = f"dkv-vs-etcd-{uuid.uuid4().hex[:8]}"
        for n in names:
            log = open(os.path.join(base, f"{n}.log"), "wb")  # noqa: SIM115 (closed once the child has it)
            cmd = [
                binary,
                "--name",
                n,
                "--data-dir",
                os.path.join(base, n),
                "--listen-client-urls",
                f"http://{client[n]}",
                "--advertise-client-urls",
                f"http://{client[n]}",
                "--listen-peer-urls",
                peer[n],
                "--initial-advertise-peer-urls",
                peer[n],
                "--initial-cluster",
                cluster,
                "--initial-cluster-token",
                token,
                "--initial-cluster-state",
                "new",
                "--logger",
                "zap",
                "--log-outputs",
                "stderr",
                "--log-level",
                "warn",
            ]
            # Own session: a Ctrl-C reaches this script, which stops the members in order.
            self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True))
            log.close()
            self.endpoints.append(client[n])

    def logs(self) -> str:
        """The last lines of every member's log (they go with the temp dir when the run ends)."""
        tails = []
        for name in sorted(os.listdir(self.base)):
            if name.endswith(".log"):
                lines = Path(self.base, name).read_text(errors="replace").splitlines()[-10:]
                tails.append(f"--- {name}\n" + "\n".join(lines))
        return "\n".join(tails)

    def leader(self, timeout: float = 60) -> str:
        """The endpoint of the leader, once every member answers."""
        import grpc

        deadline = time.monotonic() + timeout
        while True:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise SystemExit(f"an etcd member exited ({proc.returncode}):\n{self.logs()}")
            leaders = []
            try:
                for ep in self.endpoints:
                    with grpc.insecure_channel(ep) as ch:
                        if status_is_leader(ch.unary_unary(STATUS)(b"", timeout=2)):
                            leaders.append(ep)
                if len(leaders) == 1:
                    return leaders[0]
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"etcd did not elect a leader within {timeout:.0f} s:\n{self.logs()}")
            time.sleep(0.3)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def _etcd_load(endpoint: str, kind: str, clients: int, duration: float, keys: int, value_size: int) -> LoadResult:
    """``clients`` coroutines sharing one grpc.aio channel, each with one request in flight."""
    import grpc

    rng = random.Random()
    buf = os.urandom(value_size + 1024)
    result = LoadResult(ops=0, elapsed=0.0)
    clock = time.perf_counter
    async with grpc.aio.insecure_channel(endpoint) as ch:
        await asyncio.wait_for(ch.channel_ready(), 10)
        call = ch.unary_unary(PUT if kind == "put" else RANGE)
        serializable = kind == "range-serializable"
        await call(
            encode_range(bench_key(0)) if kind != "put" else encode_put(bench_key(0), buf[:value_size]), timeout=10
        )  # connected and warm outside the timed run

        async def worker() -> None:
            while clock() < deadline:
                key = bench_key(rng.randrange(keys))
                if kind == "put":
                    at = rng.randrange(1024)
                    request = encode_put(key, buf[at : at + value_size])
                else:
                    request = encode_range(key, serializable)
                t0 = clock()
                try:
                    await call(request, timeout=10)
                except grpc.aio.AioRpcError as e:
                    result.errors[e.code().name] += 1
                else:
                    result.latencies.append(clock() - t0)

        start = clock()
        deadline = start + duration
        await asyncio.gather(*(worker() for _ in range(clients)))
        result.elapsed = clock() - start
    result.latencies.sort()
    result.ops = result.succeeded + result.failed
    return result


def etcd_load(endpoint: str, kind: str, clients: int, duration: float, keys: int, value_size: int) -> Measure:
    return Measure.of(asyncio.run(_etcd_load(endpoint, kind, clients, duration, keys, value_size)))


async def _etcd_preload(endpoint: str, keys: int, value_size: int) -> None:
    import grpc

    value = os.urandom(value_size)
    async with grpc.aio.insecure_channel(endpoint) as ch:
        put = ch.unary_unary(PUT)
        todo = iter(range(keys))

        async def worker() -> None:
            for i in todo:
                await put(encode_put(bench_key(i), value), timeout=30)

        await asyncio.gather(*(worker() for _ in range(32)))
        got = range_values(await ch.unary_unary(RANGE)(encode_range(bench_key(keys - 1)), timeout=10))
        if got != [value]:
            raise SystemExit(f"etcd preload check failed: range of the last key gave {got!r}")


def dkv_preload(addr: str, keys: int, value_size: int) -> None:
    import dkv

    value = os.urandom(value_size)
    with dkv.Client(addr, timeout=30) as c:
        for lo in range(0, keys, 500):
            c.mset({bench_key(i): value for i in range(lo, min(lo + 500, keys))})
        if c.get(bench_key(keys - 1)) != value:
            raise SystemExit("dkv preload check failed")


def dkv_bench_cmd(addr: str, w: Workload, duration: float, keys: int, value_size: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "dkv.cli.main",
        "bench",
        addr,
        "--clients",
        str(w.clients),
        "--duration",
        f"{duration:g}",
        "--value-size",
        str(value_size),
        "--ratio",
        w.dkv_ratio,
        "--consistency",
        w.dkv_consistency,
        "--keys",
        str(keys),
        "--json",
        "--no-progress",
    ]


def _bench_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DKV_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return env


def dkv_load(addr: str, w: Workload, duration: float, keys: int, value_size: int) -> Measure:
    # Own session: a Ctrl-C interrupts this script, and subprocess.run kills the bench.
    proc = subprocess.run(
        dkv_bench_cmd(addr, w, duration, keys, value_size),
        capture_output=True,
        text=True,
        env=_bench_env(),
        timeout=duration + 120,
        start_new_session=True,
        check=False,
    )
    lines = proc.stdout.strip().splitlines()
    if not lines or not lines[-1].startswith("{"):
        raise SystemExit(f"dkv bench failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return Measure.from_json(json.loads(lines[-1]))


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process (all its threads) has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


#: py-spy's sampling rate (per second).
PROFILE_HZ = 100


def profile(
    out_dir: str,
    writer: subprocess.Popen[bytes],
    replicas: list[subprocess.Popen[bytes]],
    writer_addr: str,
    w: Workload,
    seconds: float,
    keys: int,
    value_size: int,
) -> str:
    """py-spy record the writer and the first replica under ``w``'s load; returns a text summary."""
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not os.path.exists(pyspy):
        raise SystemExit("py-spy is missing: pip install py-spy (or make bench-vs-etcd installs it)")
    os.makedirs(out_dir, exist_ok=True)
    bench = subprocess.Popen(
        dkv_bench_cmd(writer_addr, w, seconds + 4, keys, value_size),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_bench_env(),
        start_new_session=True,
    )
    try:
        time.sleep(2)  # connected, load running
        watched = {
            "writer": writer.pid,
            **{f"replica {i + 1}": r.pid for i, r in enumerate(replicas)},
            "dkv bench (client)": bench.pid,
        }
        before = {name: cpu_seconds(pid) for name, pid in watched.items()}
        t0 = time.monotonic()
        spies = {
            name: subprocess.Popen(
                [
                    pyspy,
                    "record",
                    "--pid",
                    str(pid),
                    "--duration",
                    f"{seconds:g}",
                    "--rate",
                    str(PROFILE_HZ),
                    "--format",
                    "raw",
                    "--nonblocking",
                    "--gil",
                    "--output",
                    os.path.join(out_dir, f"{name.replace(' ', '-')}.txt"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
            for name, pid in (("writer", writer.pid), ("replica", replicas[0].pid))
        }
        for spy in spies.values():
            spy.wait(seconds + 60)
        elapsed = time.monotonic() - t0
        after = {name: cpu_seconds(pid) for name, pid in watched.items()}
        stdout, _ = bench.communicate(timeout=120)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
    measure = Measure.from_json(json.loads(stdout.strip().splitlines()[-1]))
    report = [
        (
            f"profile: {w.title} on the 1x3 cluster, {seconds:g} s of py-spy ({PROFILE_HZ} Hz, --gil: "
            f"only the thread holding the GIL is sampled, so a sample is Python CPU time; --nonblocking) "
            f"on the writer and one replica; the load meanwhile: {_num(measure.ops_s)} ops/s, "
            f"p50 {_ms(measure.p50_ms)} ms, p99 {_ms(measure.p99_ms)} ms (py-spy costs CPU too)"
        ),
        "CPU used during the window (cores; 1.00 = one core busy all the time):",
    ]
    report += [f"  {name}: {(after[name] - before[name]) / elapsed:.2f}" for name in watched]
    for name, spy in spies.items():
        path = os.path.join(out_dir, f"{name}.txt")
        if spy.returncode != 0 or not os.path.exists(path):
            report.append(f"{name}: py-spy failed ({spy.returncode}): {spy.stderr.read() if spy.stderr else ''}")
            continue
        with open(path) as f:
            lines = f.readlines()
        held = sum(int(c) for c in (ln.rstrip().rpartition(" ")[2] for ln in lines) if c.isdigit())
        report.append(
            f"{name}: GIL held {100.0 * held / (PROFILE_HZ * seconds):.0f}% of the window; top "
            f"functions (self % / total % of its GIL samples), {path}"
        )
        for func, self_pct, total_pct in summarize_collapsed(lines, top=20):
            report.append(f"  {self_pct:5.1f}% {total_pct:5.1f}%  {func}")
    text = "\n".join(report)
    Path(out_dir, "summary.txt").write_text(text + "\n")
    return text


def ensure_etcd(given: str) -> str:
    if given:
        return given
    proc = subprocess.run([str(ROOT / "scripts" / "ensure-etcd.sh")], stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit("no etcd (see scripts/ensure-etcd.sh's message above)")
    return proc.stdout.strip().splitlines()[-1]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    etcd_bin = ensure_etcd(args.etcd_bin)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop everything below on a kill too
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C even if started with SIGINT ignored
    base = tempfile.mkdtemp(prefix="dkv-vs-etcd-")
    zk = f"{args.zk}/dkv-vs-etcd-{uuid.uuid4().hex[:8]}"
    dkv_procs: list[subprocess.Popen[bytes]] = []
    etcd: Etcd | None = None
    try:
        print(
            f"starting 3 etcd members ({etcd_bin}), a 1x3 dkv cluster and a standalone dkv node "
            f"(data under {base}) ...",
            flush=True,
        )
        os.makedirs(os.path.join(base, "etcd"))
        etcd = Etcd(etcd_bin, os.path.join(base, "etcd"))
        standalone, writer_addr = start_nodes(os.path.join(base, "dkv"), zk, dkv_procs, new_session=True)
        leader = etcd.leader()
        print(
            f"etcd leader {leader}; dkv writer {writer_addr}; preloading {args.keys} keys of "
            f"{args.value_size} bytes into each ...",
            flush=True,
        )
        asyncio.run(_etcd_preload(leader, args.keys, args.value_size))
        dkv_preload(writer_addr, args.keys, args.value_size)
        dkv_preload(standalone, args.keys, args.value_size)
        addr_of = {"cluster": writer_addr, "standalone": standalone}
        runs: list[dict[str, dict[str, Measure]]] = []
        for run in range(1, args.runs + 1):
            got: dict[str, dict[str, Measure]] = {}
            for w in args.selected:
                got[w.name] = {}
                if w.etcd:
                    got[w.name]["etcd"] = m = etcd_load(
                        leader, w.etcd, w.clients, args.duration, args.keys, args.value_size
                    )
                    print(
                        f"run {run} {w.name} etcd: {_num(m.ops_s)} ops/s p50 {_ms(m.p50_ms)} "
                        f"p99 {_ms(m.p99_ms)} errors {m.errors}",
                        flush=True,
                    )
                got[w.name]["dkv"] = m = dkv_load(addr_of[w.dkv_target], w, args.duration, args.keys, args.value_size)
                print(
                    f"run {run} {w.name} dkv:  {_num(m.ops_s)} ops/s p50 {_ms(m.p50_ms)} "
                    f"p99 {_ms(m.p99_ms)} errors {m.errors}",
                    flush=True,
                )
            runs.append(got)
        if runs:
            medians: dict[str, tuple[Measure, Measure | None]] = {}
            for w in args.selected:
                d = median_measure([r[w.name]["dkv"] for r in runs])
                e = median_measure([r[w.name]["etcd"] for r in runs]) if w.etcd else None
                medians[w.name] = (d, e)
            print(
                f"\n{'median of ' + str(len(runs)) + ' runs' if len(runs) > 1 else 'one run'}, "
                f"{args.duration:g} s per workload and system, {args.value_size}-byte values, 16-byte keys, "
                f"{args.keys} keys preloaded; dkv 1x3 write_quorum 2 (fsync on) vs etcd 3 members "
                f"(leader endpoint):\n"
            )
            print(format_table([(w, *medians[w.name]) for w in args.selected]))
            print("\n" + format_goals(medians), flush=True)
            errors = sum(m.errors for r in runs for per in r.values() for m in per.values())
            if errors:
                print(f"\nWARNING: {errors} failed ops in total (see the per-run lines)")
            if args.json_out:
                Path(args.json_out).write_text(
                    json.dumps(
                        {
                            "args": {k: v for k, v in vars(args).items() if k != "selected"},
                            "runs": [
                                {w: {s: m.__dict__ for s, m in per.items()} for w, per in r.items()} for r in runs
                            ],
                        },
                        indent=1,
                    )
                )
        if args.profile:
            w = next(w for w in WORKLOADS if w.name == "set32")
            w = Workload(w.name, w.title, args.clients, w.etcd, w.dkv_target, w.dkv_ratio)
            print(
                "\n"
                + profile(
                    args.profile,
                    dkv_procs[1],
                    dkv_procs[2:],
                    writer_addr,
                    w,
                    args.profile_seconds,
                    args.keys,
                    args.value_size,
                ),
                flush=True,
            )
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted; stopping everything", file=sys.stderr)
        return 130
    finally:
        if etcd is not None:
            etcd.stop()
        stop_all(dkv_procs, base)


if __name__ == "__main__":
    sys.exit(main())
