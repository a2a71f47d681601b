"""The pure parts of benchmarks/vs_etcd.py: protobuf by hand, arguments, medians, the table, profiles."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

from dkv.cli.bench import LoadResult

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def ve() -> ModuleType:
    spec = importlib.util.spec_from_file_location("vs_etcd", BENCHMARKS / "vs_etcd.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["vs_etcd"] = module
    spec.loader.exec_module(module)
    return module


def test_varint_and_messages_round_trip(ve: ModuleType) -> None:
    assert ve.varint(0) == b"\x00" and ve.varint(1) == b"\x01" and ve.varint(300) == b"\xac\x02"
    # PutRequest{key: "k", value: "vv"}: tags 0x0a and 0x12, as protoc encodes it.
    assert ve.encode_put(b"k", b"vv") == b"\x0a\x01k\x12\x02vv"
    assert list(ve.decode_fields(ve.encode_put(b"k" * 16, b"v" * 300))) == [(1, b"k" * 16), (2, b"v" * 300)]
    assert ve.encode_range(b"k") == b"\x0a\x01k"
    assert list(ve.decode_fields(ve.encode_range(b"k", serializable=True))) == [(1, b"k"), (7, 1)]


def test_range_values_and_leader_from_responses(ve: ModuleType) -> None:
    header = ve.field_varint(1, 99) + ve.field_varint(2, 7) + ve.field_varint(3, 12)
    kv = ve.field_bytes(1, b"key") + ve.field_varint(2, 5) + ve.field_varint(4, 1) + ve.field_bytes(5, b"val")
    response = ve.field_bytes(1, header) + ve.field_bytes(2, kv) + ve.field_varint(4, 1)
    assert ve.range_values(response) == [b"val"]
    assert ve.range_values(ve.field_bytes(1, header)) == []
    status = ve.field_bytes(1, header) + ve.field_bytes(2, b"3.4.23") + ve.field_varint(4, 7)
    assert ve.status_is_leader(status)
    assert not ve.status_is_leader(ve.field_bytes(1, header) + ve.field_varint(4, 8))
    assert not ve.status_is_leader(b"")


def test_arguments(ve: ModuleType) -> None:
    args = ve.parse_args([])
    assert (
        args.runs == 1
        and args.duration == 10.0
        and [w.name for w in args.selected] == ["set1", "set32", "lin32", "seq32", "standalone32"]
    )
    args = ve.parse_args(["--runs", "3", "--workloads", "seq32", "set1", "--clients", "8"])
    assert args.runs == 3 and [(w.name, w.clients) for w in args.selected] == [("set1", 1), ("seq32", 8)]
    for bad in (["--workloads", "nope"], ["--runs", "0"], ["--duration", "0"]):
        with pytest.raises(SystemExit):
            ve.parse_args(bad)
    assert ve.parse_args(["--runs", "0", "--profile", "/tmp/x"]).runs == 0


def test_measures_and_medians(ve: ModuleType) -> None:
    m = ve.Measure.of(LoadResult(ops=4, elapsed=2.0, latencies=[0.001, 0.002, 0.004, 0.010]))
    assert (m.ops_s, m.p50_ms, m.p99_ms, m.errors) == (2.0, 2.0, 10.0, 0)
    j = ve.Measure.from_json({"throughput_ops_s": 5.5, "p50_ms": None, "p99_ms": 3, "failed": 2})
    assert math.isnan(j.p50_ms) and j.p99_ms == 3.0 and j.errors == 2
    med = ve.median_measure([ve.Measure(1, 9, 30, 1), ve.Measure(3, 1, 10), ve.Measure(2, 5, 20)])
    assert med == ve.Measure(2, 5, 20, 1)  # each figure's own median; errors summed


def test_table_and_goals(ve: ModuleType) -> None:
    by_name = {w.name: w for w in ve.WORKLOADS}
    results = {
        "set1": (ve.Measure(250, 3.6, 7.0), ve.Measure(800, 1.2, 2.0)),
        "set32": (ve.Measure(5000, 5.0, 14.0), ve.Measure(4000, 7.0, 15.0)),
        "lin32": (ve.Measure(2400, 10.0, 20.0), ve.Measure(6000, 5.0, 9.0)),
        "seq32": (ve.Measure(6000, 5.0, 9.0), ve.Measure(8000, 4.0, 8.0)),
        "standalone32": (ve.Measure(21000, 1.0, 2.0), None),
    }
    table = ve.format_table([(by_name[n], *results[n]) for n in results])
    lines = table.splitlines()
    assert len(lines) == 7 and lines[0].startswith("| workload |")
    assert "| sets, 1 client | 250 | 3.60 | 7.00 | 800 | 1.20 | 2.00 | 0.31x | 3.00x |" in lines
    assert lines[-1].startswith("| standalone sets, 32 in flight | 21,000 |") and lines[-1].endswith("|  |  |")
    goals = ve.format_goals(results)
    assert "dkv/etcd = 1.25x (goal >= 2.0x, milestone >= 1.0x): milestone met, goal not" in goals
    assert "p99 14.00 ms (goal <= 15 ms): goal met" in goals
    assert "etcd put p50 = 3.00x (goal <= 1.2x, milestone <= 2.0x): not met" in goals
    assert "linearizable gets, 32 in flight: dkv/etcd = 0.40x (goal >= 2.0x): not met" in goals
    assert "dkv/etcd serializable = 0.75x; 2.50x dkv's linearizable gets (goal: higher): goal met" in goals
    assert "21,000 ops/s (goal >= 20,000): goal met" in goals
    nan = ve.Measure(0.0, float("nan"), float("nan"), 3)
    assert "n/a" in ve.format_table([(by_name["set1"], nan, nan)])
    assert ve.format_goals({}) == ""


def test_summarize_collapsed_stacks(ve: ModuleType) -> None:
    lines = [
        "<module> (/x/dkv/node/server.py:10);run (/x/site-packages/gevent/hub.py:5);fsync (/x/dkv/wal/log.py:3) 6\n",
        "<module> (/x/dkv/node/server.py:10);run (/x/site-packages/gevent/hub.py:5) 3\n",
        "<module> (/x/dkv/node/server.py:11);fsync (/x/dkv/wal/log.py:4) 1\n",
        "garbage\n",
        "\n",
    ]
    top = ve.summarize_collapsed(lines)
    assert top[0] == ("fsync (dkv/wal/log.py)", 70.0, 70.0)
    assert top[1] == ("run (gevent/hub.py)", 30.0, 90.0)
    assert top[2] == ("<module> (dkv/node/server.py)", 0.0, 100.0)
    assert ve.summarize_collapsed([]) == []
