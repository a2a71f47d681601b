"""``dkv cli`` and ``dkv bench`` against a real node process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Iterator

import pytest
from kazoo.client import KazooClient

from dkv.cli.bench import LoadResult, bench_key, format_report, percentile, report_json, run_load
from dkv.cli.repl import CliState, execute, format_nodes, format_shards, make_session, open_history, repl_loop
from dkv.client import Client
from dkv.cluster import layout
from dkv.cluster.layout import Shard, SlotRanges
from tests.support.procs import NodeProcess, wait_until
from tests.test_client_zk import ALL, kz, publish  # noqa: F401 (kz: a fixture)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """One standalone node for the whole module, ready when ``Client.info()`` answers."""
    n = NodeProcess(tmp_path_factory.mktemp("cli") / "data")
    n.start(wait=False)
    probe = Client(n.addr, timeout=1)

    def answers() -> bool:
        if not n.running:
            raise RuntimeError(f"node exited:\n{n.log()}")
        try:
            return bool(probe.info())
        except Exception:
            return False

    try:
        wait_until(answers, 30, "the node to answer info()")
        yield n
    finally:
        probe.close()
        n.stop()


@pytest.fixture(scope="module")
def client(node: NodeProcess) -> Iterator[Client]:
    c = Client(node.addr, timeout=5)
    yield c
    c.close()


@pytest.fixture
def k() -> str:
    """A key prefix no other test uses."""
    return f"t{uuid.uuid4().hex[:8]}:"


def run(client: Client, line: str) -> str:
    ok, out = execute(client, line)
    assert ok, out
    return out


def test_set_get_del_exists(client: Client, k: str) -> None:
    assert run(client, f"set {k}a 1") == "OK"
    assert run(client, f"get {k}a") == '"1"'
    assert run(client, f"exists {k}a") == "(integer) 1"
    assert run(client, f"del {k}a {k}missing") == "(integer) 1"
    assert run(client, f"exists {k}a") == "(integer) 0"
    assert run(client, f"get {k}a") == "(nil)"


def test_get_missing_is_nil(client: Client, k: str) -> None:
    assert run(client, f"get {k}nope") == "(nil)"


def test_quoted_value_with_spaces(client: Client, k: str) -> None:
    assert run(client, f'set "{k}my key" "hello  world"') == "OK"
    assert run(client, f"get '{k}my key'") == '"hello  world"'
    assert client.get(f"{k}my key") == b"hello  world"


def test_binary_value_is_quoted_with_escapes_and_escapes_are_accepted(client: Client, k: str) -> None:
    client.set(f"{k}bin", b"\x00\xff")
    assert run(client, f"get {k}bin") == r'"\x00\xff"'
    assert run(client, rf'set {k}typed "\x00\xff"') == "OK"  # two bytes, not eight characters
    assert client.get(f"{k}typed") == b"\x00\xff"
    assert run(client, f"get {k}typed") == r'"\x00\xff"'
    assert run(client, rf'set {k}esc "a\"b\\c\nd\te\x41" ') == "OK"
    assert client.get(f"{k}esc") == b'a"b\\c\nd\teA'
    assert run(client, f"get {k}esc") == r'"a\"b\\c\nd\teA"'
    client.set(f"{k}utf8", "héllo wörld ✓")  # printable UTF-8 stays text
    assert run(client, f"get {k}utf8") == '"héllo wörld ✓"'
    client.set(f"{k}ctl", "é\x7f\u200b".encode() + b"\xc3")  # control, format char, cut UTF-8
    assert run(client, f"get {k}ctl") == r'"é\x7f\xe2\x80\x8b\xc3"'


def test_empty_value_prints_two_quotes(client: Client, k: str) -> None:
    assert run(client, f'set {k}e ""') == "OK"
    assert client.get(f"{k}e") == b""
    assert run(client, f"get {k}e") == '""'
    assert execute(client, f"get {k}e", state=CliState(raw=True)) == (True, "")


def test_mset_mget(client: Client, k: str) -> None:
    assert run(client, f"mset {k}x 1 {k}y 2") == "OK"
    assert run(client, f"mget {k}x {k}nope {k}y") == '1) "1"\n2) (nil)\n3) "2"'


def test_mset_odd_count_is_usage_error(client: Client, k: str) -> None:
    assert execute(client, f"mset {k}x 1 {k}y") == (False, "(error) usage: mset KEY VALUE [KEY VALUE ...]")


def test_scan(client: Client, k: str) -> None:
    run(client, f"mset {k}b 2 {k}a 1 {k}c 3")
    assert run(client, f"scan 0 MATCH {k}") == f'1) "0"\n2) 1) "{k}a"\n   2) "{k}b"\n   3) "{k}c"'
    assert run(client, f"scan match {k}*") == run(client, f"scan 0 MATCH {k}")  # cursor 0 implied; k* = prefix
    first = run(client, f"scan 0 MATCH {k} COUNT 2")
    cursor = first.splitlines()[0][len('1) "') : -1]
    assert cursor != "0" and first.splitlines()[1:] == [f'2) 1) "{k}a"', f'   2) "{k}b"']
    assert run(client, f"scan {cursor} MATCH {k} COUNT 2") == f'1) "0"\n2) 1) "{k}c"'
    assert run(client, f"scan 0 MATCH {k}zz") == '1) "0"\n2) (empty array)'
    assert run(client, f"scan 0 MATCH {k}[ac]") == f'1) "0"\n2) 1) "{k}a"\n   2) "{k}c"'  # a glob: filtered
    assert execute(client, f"scan 0 MATCH {k} COUNT many") == (
        False,
        "(error) COUNT must be a whole number in 1..10000, not 'many'",
    )
    assert execute(client, "scan nothex") == (
        False,
        "(error) invalid cursor 'nothex': give 0 to start, then the cursor the last scan printed",
    )
    assert execute(client, f"scan 0 MATCH {k} COUNT") == (
        False,
        "(error) usage: scan [CURSOR] [MATCH PATTERN] [COUNT N]",
    )


def test_slot(client: Client) -> None:
    assert run(client, "slot 123456789") == "(integer) 294"


def test_info(client: Client, node: NodeProcess) -> None:
    out = run(client, "info")
    lines = out.splitlines()
    assert any(line.split() == ["addr:", node.addr] for line in lines)
    assert any(line.startswith("  max_key_bytes:") for line in lines)  # nested, indented
    assert lines[-2].split() == ["SHARD", "EPOCH", "WRITER", "REPLICAS", "SLOTS"]
    assert lines[-1].split() == ["shard-0", "1", node.node_id, "-", "0-1023"]


def test_nodes(client: Client, node: NodeProcess) -> None:
    assert [line.split() for line in run(client, "nodes").splitlines()] == [
        ["ID", "ADDR", "ROLE", "SHARD", "STATUS"],
        [node.node_id, node.addr, "writer", "shard-0", "up"],
    ]


def example_cluster() -> dict[str, object]:
    return layout.cluster_info(
        [
            Shard("shard-1", 4, "w1", ["r1", "r2"]),
            Shard("shard-2", 2, "w2", ["r3"]),
            Shard("shard-10", 1, "gone", ["r4"]),
            Shard("shard-3", 1, None, []),
        ],
        SlotRanges(
            [
                (0, 511, "shard-1"),
                (700, 703, "shard-1"),
                (705, 705, "shard-1"),
                (512, 699, "shard-2"),
                (704, 704, "shard-10"),
                (706, 1023, "shard-10"),
            ]
        ),
        {"w1": "h:1", "r1": "h:2", "r2": "h:3", "w2": "h:4", "r3": "h:5"},
        9,
    )


def test_format_shards_lag_down_and_slot_ranges() -> None:
    # w1 knows r1's lag but not yet r2's; w2 did not answer (ZooKeeper still counts it up);
    # "gone" and r4 are not registered.
    infos = {"w1": {"replication": {"replicas": {"r1": {"lag": 3}, "r2": {"lag": None}}}}, "w2": None}
    assert format_shards(example_cluster(), infos).splitlines() == [
        "SHARD     EPOCH  WRITER            REPLICAS                SLOTS",
        "shard-1   4      w1                r1 (lag 3), r2 (lag ?)  0-511, 700-703, 705",
        "shard-2   2      w2 (unreachable)  r3 (lag ?)              512-699",
        "shard-3   1      -                 -                       -",
        "shard-10  1      gone (down)       r4 (down)               704, 706-1023",
    ]


def test_format_shards_lists_migrations_under_way() -> None:
    cluster = dict(example_cluster())
    cluster["migrations"] = [
        {"id": "m-0000000003", "slots": [512, 767], "source": "shard-1", "target": "shard-2", "state": "frozen"},
        {"id": "m-0000000004", "slots": [0, 9], "source": "shard-2", "target": "shard-3", "state": "copying"},
    ]
    lines = format_shards(cluster, {}).splitlines()
    assert lines[-3:] == [  # the target writers were not asked: no progress
        "MIGRATION     SLOTS    FROM     TO       STATE    PROGRESS",
        "m-0000000003  512-767  shard-1  shard-2  frozen   -",
        "m-0000000004  0-9      shard-2  shard-3  copying  -",
    ]
    w2 = {"migration": {"id": "m-0000000003", "phase": "drain", "imported": 1830, "restarts": 1, "frozen_ms": 42}}
    lines = format_shards(cluster, {"w2": w2}).splitlines()
    assert lines[-2].split(None, 5)[5] == "drain, 1830 imported, 1 restart(s), frozen 42 ms"
    w2["migration"]["id"] = "m-0000000002"  # an older move's progress is not this one's
    assert format_shards(cluster, {"w2": w2}).splitlines()[-2].endswith("frozen   -")
    assert "MIGRATION" not in format_shards(example_cluster(), {})


def test_writer_infos_asks_writers_with_replicas_or_importing_a_range(client: Client, node: NodeProcess) -> None:
    from dkv.cli.repl import writer_infos

    cluster = layout.cluster_info(
        [Shard("shard-1", 1, "w1", ["r1"]), Shard("shard-2", 1, "w2", [])],
        SlotRanges([(0, 1023, "shard-1")]),
        {"w1": node.addr, "w2": node.addr},
        1,
    )
    assert set(writer_infos(client, cluster)) == {"w1"}  # w2 has no replica to report on
    cluster["migrations"] = [
        {"id": "m-0000000001", "slots": [0, 9], "source": "shard-1", "target": "shard-2", "state": "copying"}
    ]
    infos = writer_infos(client, cluster)
    assert set(infos) == {"w1", "w2"} and infos["w2"] is not None  # w2 imports: asked for the progress


def test_format_nodes() -> None:
    assert format_nodes(example_cluster()).splitlines() == [
        "ID    ADDR  ROLE     SHARD     STATUS",
        "gone  -     writer   shard-10  down",
        "r1    h:2   replica  shard-1   up",
        "r2    h:3   replica  shard-1   up",
        "r3    h:5   replica  shard-2   up",
        "r4    -     replica  shard-10  down",
        "w1    h:1   writer   shard-1   up",
        "w2    h:4   writer   shard-2   up",
    ]


def test_admin_status_tables_agree_on_every_node() -> None:
    # 2 s after w2 was killed: ZooKeeper still holds its session (up), its info() failed. Both
    # tables come from that one view and say the same of it (they once said "down" and "up").
    from dkv.cli.admin import status_tables

    infos = {"w1": {"replication": {"replicas": {"r1": {"lag": 0}, "r2": {"lag": 0}}}}, "w2": None}
    shards, nodes = status_tables(example_cluster(), infos).split("\n\n")
    in_nodes = {row.split()[0]: row.split()[-1] for row in nodes.splitlines()[1:]}
    assert in_nodes["w2"] == "unreachable" and in_nodes["w1"] == "up" and in_nodes["r4"] == "down"
    in_shards: dict[str, str] = {}
    for row in shards.splitlines()[1:]:
        for member in re.findall(r"(\w+)(?: \((down|unreachable|lag [^)]*)\))?", row.split(None, 2)[2]):
            if member[0] in in_nodes:
                in_shards[member[0]] = member[1] if member[1] in ("down", "unreachable") else "up"
    assert in_shards == in_nodes  # every node appears in both, with the same status


@pytest.mark.zk
def test_info_and_nodes_through_zookeeper(zk: str, kz: KazooClient, node: NodeProcess, k: str) -> None:
    # A fake-but-real map: the standalone node is shard-1's writer and also answers as replica r1.
    publish(kz, {"w": node.addr, "r1": node.addr}, [Shard("shard-1", 5, "w", ["r1", "r2"])], ALL)
    with Client(zk=zk, timeout=5) as zc:
        assert run(zc, f"set {k}z 1") == "OK"
        assert run(zc, f"get {k}z") == '"1"'
        assert [line.split() for line in run(zc, "info").splitlines()] == [  # cluster mode: no node info
            ["SHARD", "EPOCH", "WRITER", "REPLICAS", "SLOTS"],
            ["shard-1", "5", "w", "r1", "(lag", "?),", "r2", "(down)", "0-1023"],
        ]  # no lag in a standalone's info
        assert [line.split() for line in run(zc, "nodes").splitlines()] == [
            ["ID", "ADDR", "ROLE", "SHARD", "STATUS"],
            ["r1", node.addr, "replica", "shard-1", "up"],
            ["r2", "-", "replica", "shard-1", "down"],
            ["w", node.addr, "writer", "shard-1", "up"],
        ]


@pytest.mark.zk
def test_stdin_mode_with_zk_from_env(zk: str, kz: KazooClient, node: NodeProcess, k: str) -> None:
    publish(kz, {"w": node.addr}, [Shard("shard-1", 1, "w")], ALL)
    proc = subprocess.run(
        [sys.executable, "-m", "dkv.cli.main", "cli"],
        env={**os.environ, "DKV_ZK": zk},
        input=f"set {k}a 1\nget {k}a\nnodes\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [line.split() for line in proc.stdout.splitlines()] == [
        ["OK"],
        ['"1"'],
        ["ID", "ADDR", "ROLE", "SHARD", "STATUS"],
        ["w", node.addr, "writer", "shard-1", "up"],
    ]


def test_cli_with_unreachable_zk_fails_cleanly() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "dkv.cli.main", "cli", "--zk", "127.0.0.1:1", "--timeout", "1"],
        input="get a\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "dkv cli: Unavailable: ZooKeeper at 127.0.0.1:1 did not answer within 1s" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def ttl_of(client: Client, key: str) -> float:
    out = run(client, f"ttl {key}")
    assert out.endswith(" s"), out
    return float(out[:-2])


def test_set_with_expiry_and_conditions_options_in_any_case(client: Client, k: str) -> None:
    assert run(client, f"set {k}a 1 EX 100 NX") == "OK"
    assert 99 < ttl_of(client, f"{k}a") <= 100
    assert run(client, f"set {k}a 2 nx") == "(nil)"  # present: not written
    assert run(client, f"set {k}b 2 Xx") == "(nil)"  # absent: not written
    assert run(client, f"get {k}a") == '"1"' and run(client, f"get {k}b") == "(nil)"
    assert run(client, f"set {k}a 3 px 50000 XX") == "OK"
    assert 49 < ttl_of(client, f"{k}a") <= 50
    assert run(client, f"set {k}a 4") == "OK"  # a plain set clears the deadline
    assert run(client, f"ttl {k}a") == "(no expiry)"
    assert run(client, f"ttl {k}nope") == "(nil)"


@pytest.mark.parametrize(
    "options, message",
    [
        ("EX", "EX needs a value"),
        ("EX 0", "EX must be a positive number of seconds (at most 3153600000), not '0'"),
        ("EX -1", "EX must be a positive number of seconds (at most 3153600000), not '-1'"),
        ("EX abc", "EX must be a positive number of seconds (at most 3153600000), not 'abc'"),
        ("EX inf", "EX must be a positive number of seconds (at most 3153600000), not 'inf'"),
        ("EX nan", "EX must be a positive number of seconds (at most 3153600000), not 'nan'"),
        ("PX 1.5", "PX must be a whole number of milliseconds in 1..3153600000000, not '1.5'"),
        ("PX 0", "PX must be a whole number of milliseconds in 1..3153600000000, not '0'"),
        ("PX 99999999999999", "PX must be a whole number of milliseconds in 1..3153600000000, not '99999999999999'"),
        ("EX 1 PX 100", "give EX or PX, not both"),
        ("NX XX", "NX and XX exclude each other"),
        ("EX 1 ex 2", "EX given twice"),
        ("KEEPTTL", "unknown option 'KEEPTTL' (expected EX, PX, NX, XX)"),
    ],
)
def test_set_refuses_bad_options_and_changes_nothing(client: Client, k: str, options: str, message: str) -> None:
    assert execute(client, f"set {k}a 1 {options}") == (False, f"(error) {message}")
    assert run(client, f"exists {k}a") == "(integer) 0"


def test_cas_with_the_absent_token_and_expiry(client: Client, k: str) -> None:
    assert run(client, f"cas {k}a (nil) 1") == "OK"  # (nil): only if absent
    assert run(client, f"cas {k}a (nil) 2") == "(nil)"
    assert run(client, f"cas {k}a 9 2") == "(nil)"
    assert run(client, f"get {k}a") == '"1"'
    assert run(client, f"cas {k}a 1 2 ex 100") == "OK"
    assert run(client, f"get {k}a") == '"2"' and 99 < ttl_of(client, f"{k}a") <= 100
    assert run(client, f"cas {k}a 2 3") == "OK"  # like set: no EX, no deadline
    assert run(client, f"ttl {k}a") == "(no expiry)"
    assert execute(client, f"cas {k}a 3 4 NX") == (False, "(error) unknown option 'NX' (expected EX, PX)")
    assert execute(client, f"cas {k}a 3") == (False, "(error) usage: cas KEY EXPECTED NEW [EX SECONDS|PX MS]")
    assert run(client, f"get {k}a") == '"3"'
    assert "(nil): only if KEY is absent" in run(client, "help cas")


def test_incr_decr(client: Client, k: str) -> None:
    assert run(client, f"incr {k}n") == "(integer) 1"
    assert run(client, f"incr {k}n 41") == "(integer) 42"
    assert run(client, f"decr {k}n") == "(integer) 41"
    assert run(client, f"DECR {k}n 50") == "(integer) -9"
    assert run(client, f"incr {k}n -1") == "(integer) -10"
    for bad in ("1.5", "x", str(2**63)):
        assert execute(client, f"incr {k}n {bad}") == (
            False,
            f"(error) the amount must be a 64-bit integer, not '{bad}'",
        )
    run(client, f"set {k}s abc")
    ok, out = execute(client, f"incr {k}s")
    assert not ok and out.startswith("(error) InvalidArgument: ")
    assert run(client, f"get {k}n") == '"-10"' and run(client, f"get {k}s") == '"abc"'


def test_incr_keeps_the_deadline(client: Client, k: str) -> None:
    run(client, f"set {k}n 5 EX 100")
    assert run(client, f"incr {k}n") == "(integer) 6"
    assert 99 < ttl_of(client, f"{k}n") <= 100


def test_expire_persist_ttl(client: Client, k: str) -> None:
    assert run(client, f"expire {k}a 10") == "(integer) 0"  # absent
    assert run(client, f"persist {k}a") == "(integer) 0"
    run(client, f"set {k}a 1")
    assert run(client, f"persist {k}a") == "(integer) 0"  # no deadline to remove
    assert run(client, f"expire {k}a 100") == "(integer) 1"
    assert 99 < ttl_of(client, f"{k}a") <= 100
    assert execute(client, f"expire {k}a 0") == (
        False,
        "(error) seconds must be a positive number of seconds (at most 3153600000), not '0'",
    )
    assert run(client, f"persist {k}a") == "(integer) 1"
    assert run(client, f"ttl {k}a") == "(no expiry)"
    assert run(client, f"expire {k}a 0.05") == "(integer) 1"
    wait_until(lambda: run(client, f"get {k}a") == "(nil)", 10, "the key to expire")
    assert run(client, f"ttl {k}a") == "(nil)"


def test_getm_shows_value_revision_and_expiry(client: Client, k: str) -> None:
    assert run(client, f"getm {k}a") == "(nil)"
    run(client, f"set {k}a hello")
    fields = dict(line.split(":", 1) for line in run(client, f"getm {k}a").splitlines())
    assert fields["value"].strip() == '"hello"' and fields["expires_at"].strip() == "never"
    rev = int(fields["revision"])
    run(client, f"set {k}a again EX 100")
    fields = dict(line.split(":", 1) for line in run(client, f"getm {k}a").splitlines())
    assert int(fields["revision"]) > rev
    meta = client.get(f"{k}a", with_meta=True)
    assert meta is not None and not isinstance(meta, bytes) and meta.expires_at is not None
    assert fields["expires_at"].split()[0] == f"{meta.expires_at:.3f}"


def test_completion_of_names_and_options() -> None:
    from prompt_toolkit.completion import CompleteEvent
    from prompt_toolkit.document import Document

    from dkv.cli.repl import command_completer

    completer = command_completer()

    def words(text: str) -> list[str]:
        return [c.text for c in completer.get_completions(Document(text), CompleteEvent())]

    assert {"incr", "decr"} <= set(words("")) and words("inc") == ["incr"]
    assert words("help pe") == ["persist"] and sorted(words("ex")) == ["exists", "exit", "expire"]
    assert words("set k") == [] and words("set k ") == []  # a key or a value comes next
    assert words("set k v ") == ["EX", "PX", "NX", "XX"]
    assert words("set k v e") == ["EX"] and words("set k v EX ") == []
    assert words("set k v EX 10 ") == ["PX", "NX", "XX"]
    assert words("cas k a b ") == ["EX", "PX"] and words("get k ") == []


def test_stdin_mode_coordination_commands(node: NodeProcess, k: str) -> None:
    script = (
        f"set {k}a 1 EX 100 NX\nset {k}a 2 NX\ncas {k}a 1 2\nincr {k}n 5\ndecr {k}n\n"
        f"persist {k}a\nttl {k}a\nset {k}a 3 EX\nget {k}a\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "dkv.cli.main", "cli", node.addr],
        input=script,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.stdout.splitlines() == [
        "OK",
        "(nil)",
        "OK",
        "(integer) 5",
        "(integer) 4",
        "(integer) 0",
        "(no expiry)",
        "(error) EX needs a value",
        '"2"',
    ]
    assert proc.returncode == 1  # one command failed


def test_help(client: Client) -> None:
    out = run(client, "help")
    assert "set KEY VALUE" in out and "scan [CURSOR] [MATCH PATTERN] [COUNT N]" in out
    assert run(client, "help get").startswith("usage: get KEY")


def test_unknown_command(client: Client) -> None:
    assert execute(client, "foo bar") == (False, "(error) unknown command 'foo'; type 'help'")
    assert execute(client, "sett a 1") == (False, "(error) unknown command 'sett'; did you mean 'set'?")
    assert execute(client, "DBSZE") == (False, "(error) unknown command 'DBSZE'; did you mean 'dbsize'?")


def test_wrong_arity(client: Client) -> None:
    assert execute(client, "set onlykey") == (False, "(error) usage: set KEY VALUE [EX SECONDS|PX MS] [NX|XX]")
    assert execute(client, "get") == (False, "(error) usage: get KEY")


def test_unbalanced_quote_is_an_error_line(client: Client) -> None:
    ok, out = execute(client, 'set a "b')
    assert not ok and out.startswith("(error) ") and "\n" not in out


def test_oversized_key_is_invalid_argument_and_node_keeps_serving(client: Client, k: str) -> None:
    ok, out = execute(client, f"set {'k' * 2000} v")
    assert not ok
    assert out == "(error) InvalidArgument: key is 2000 bytes; the limit is 1024"
    assert run(client, f"set {k}after 1") == "OK"
    assert run(client, f"get {k}after") == '"1"'


def test_stdin_mode_end_to_end(node: NodeProcess, k: str) -> None:
    script = f"# a comment\n\nset {k}a 1\nget {k}a\nget {k}nope\nfoo\n"
    proc = subprocess.run(
        [sys.executable, "-m", "dkv.cli.main", "cli", node.addr],
        input=script,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.stdout.splitlines() == ["OK", '"1"', "(nil)", "(error) unknown command 'foo'; type 'help'"]
    assert proc.returncode == 1
    assert "Traceback" not in proc.stdout + proc.stderr


def test_stdin_mode_exit_status_0_when_all_succeed(node: NodeProcess, k: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "dkv.cli.main", "cli", node.addr],
        input=f"set {k}a 1\nexit\nfoo\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (proc.returncode, proc.stdout) == (0, "OK\n")


def test_interactive_prompt(client: Client, k: str) -> None:
    from prompt_toolkit.application import create_app_session
    from prompt_toolkit.history import InMemoryHistory
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    results: list[tuple[bool, str]] = []
    with create_pipe_input() as inp, create_app_session(input=inp, output=DummyOutput()):
        # Ctrl-D after "exit" ends the loop even if "exit" were not honoured.
        inp.send_text(f"set {k}x 1\rget {k}x\rnope\rexit\r\x04")
        session = make_session("127.0.0.1:7000", InMemoryHistory())
        status = repl_loop(client, session, lambda ok, text: results.append((ok, text)))
    assert status == 0
    assert results == [(True, "OK"), (True, '"1"'), (False, "(error) unknown command 'nope'; did you mean 'nodes'?")]


def test_history_falls_back_to_memory_when_unwritable(tmp_path: Path) -> None:
    from prompt_toolkit.history import FileHistory, InMemoryHistory

    blocker = tmp_path / "file"
    blocker.write_text("")
    assert isinstance(open_history(blocker / "sub" / "history"), InMemoryHistory)
    assert isinstance(open_history(tmp_path / "new" / "history"), FileHistory)
    assert (tmp_path / "new" / "history").exists()


def test_percentile_nearest_rank() -> None:
    values = [float(i) for i in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([7.0], 50) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_format_report_lists_params_latencies_and_errors() -> None:
    from collections import Counter

    result = LoadResult(ops=4, elapsed=2.0, latencies=[0.001, 0.002, 0.003], errors=Counter({"WriteTimeout": 1}))
    report = format_report([("target", "x")], result)
    assert report.splitlines()[0].split() == ["target:", "x"]
    assert "throughput:  2 ops/s" in report
    assert "latency p99: 3.000 ms" in report
    assert "errors:      1 (WriteTimeout 1)" in report


def test_run_load_stops_after_ops_or_after_duration_and_refuses_both_or_neither() -> None:
    import gevent

    calls: list[int] = []

    def op(i: int) -> None:
        calls.append(i)
        gevent.sleep(0.001)

    by_ops = run_load(op, clients=3, ops=10)
    assert by_ops.ops == 10 and by_ops.succeeded == 10 and sorted(calls) == list(range(10))
    calls.clear()
    by_time = run_load(op, clients=3, duration=0.05)
    assert by_time.ops == by_time.succeeded == len(calls) > 0  # however many fitted; no timing asserted
    with pytest.raises(ValueError):
        run_load(op, clients=1, ops=1, duration=1.0)
    with pytest.raises(ValueError):
        run_load(op, clients=1)


def test_bench_ops_and_duration_exactly_one_decides_and_the_command_line_beats_the_environment() -> None:
    from dkv.cli.main import DEFAULT_BENCH_OPS, _bench_bound
    from dkv.errors import InvalidArgument

    assert _bench_bound(None, None) == (DEFAULT_BENCH_OPS, None)
    assert _bench_bound(500, None, ["--ops", "500"]) == (500, None)
    assert _bench_bound(None, 2.5) == (None, 2.5)
    # DKV_DURATION in the environment, --ops on the command line (and the other way round).
    assert _bench_bound(500, 10.0, ["x", "--ops=500"]) == (500, None)
    assert _bench_bound(500, 10.0, ["x", "--dur", "10"]) == (None, 10.0)
    with pytest.raises(InvalidArgument):
        _bench_bound(500, 10.0, ["--ops", "500", "--duration", "10"])
    with pytest.raises(InvalidArgument):
        _bench_bound(500, 10.0, [])  # both from the environment


def test_bench_refuses_ops_with_duration_with_a_clear_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from dkv.cli.main import build_parser, main

    monkeypatch.setenv("DKV_DURATION", "3")
    assert build_parser().parse_args(["bench"]).duration == 3.0
    assert main(["bench", "127.0.0.1:1", "--ops", "5", "--duration", "1"]) == 1
    assert "--ops or --duration, not both" in capsys.readouterr().err


def test_report_json_and_bench_keys() -> None:
    import json
    from collections import Counter

    result = LoadResult(ops=4, elapsed=2.0, latencies=[0.001, 0.002, 0.003], errors=Counter({"WriteTimeout": 1}))
    doc = json.loads(report_json([("target", "x"), ("clients", 2)], result))
    assert doc["target"] == "x" and doc["clients"] == 2 and doc["ops"] == 4
    assert doc["succeeded"] == 3 and doc["failed"] == 1 and doc["throughput_ops_s"] == 1.5
    assert doc["p50_ms"] == 2.0 and doc["p99_ms"] == 3.0 and doc["errors"] == {"WriteTimeout": 1}
    assert json.loads(report_json([], LoadResult(ops=0, elapsed=0.0)))["p99_ms"] is None
    assert len(bench_key(0)) == len(bench_key(10**9)) == 16


def test_bench_duration_json_smoke(node: NodeProcess) -> None:
    import json

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dkv.cli.main",
            "bench",
            node.addr,
            "--clients",
            "4",
            "--duration",
            "0.5",
            "--keys",
            "100",
            "--ratio",
            "1:1",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    assert doc["duration_s"] == 0.5 and doc["clients"] == 4 and doc["failed"] == 0
    assert doc["succeeded"] == doc["ops"] > 0 and doc["p50_ms"] is not None


def test_bench_smoke(node: NodeProcess) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dkv.cli.main",
            "bench",
            node.addr,
            "--clients",
            "4",
            "--ops",
            "400",
            "--keys",
            "1000",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("throughput:") and line.endswith("ops/s") for line in lines)
    assert any(line.startswith("latency p99:") and line.endswith("ms") for line in lines)
    assert any(line.split() == ["errors:", "0"] for line in lines)
    assert "Traceback" not in proc.stdout + proc.stderr


def bench_json(node: NodeProcess, *args: str) -> dict[str, object]:
    import json

    proc = subprocess.run(
        [sys.executable, "-m", "dkv.cli.main", "bench", node.addr, "--json", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_bench_incr_does_one_increment_per_op(node: NodeProcess, client: Client) -> None:
    doc = bench_json(node, "--op", "incr", "--clients", "8", "--ops", "600", "--keys", "7")
    assert doc["op"] == "incr" and doc["succeeded"] == doc["ops"] == 600 and doc["failed"] == 0
    counters = dict(client.scan("bench-incr:"))
    assert len(counters) <= 7 and sum(int(v) for v in counters.values()) == 600


def test_bench_cas_succeeds_every_time_and_counts_on_fresh_keys(node: NodeProcess, client: Client) -> None:
    from dkv.cli.bench import cas_value

    before = {k for k, _ in client.scan("bench-cas:")}
    doc = bench_json(node, "--op", "cas", "--clients", "8", "--ops", "500", "--keys", "20", "--value-size", "10")
    assert doc["op"] == "cas" and doc["succeeded"] == doc["ops"] == 500 and doc["errors"] == {}
    values = {k: v for k, v in client.scan("bench-cas:") if k not in before}
    assert len(values) == 20 and len({k.rsplit(b":", 1)[0] for k in values}) == 1  # this run's prefix
    # The first cas of a key writes 0 (expected: absent), the n-th writes n - 1.
    counts = [int(v.rstrip(b".")) for v in values.values()]
    assert all(cas_value(n, 10) == v for n, v in zip(counts, values.values()))
    assert sum(n + 1 for n in counts) == 500


def test_bench_refuses_cas_with_fewer_keys_than_clients(node: NodeProcess) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dkv.cli.main",
            "bench",
            node.addr,
            "--op",
            "cas",
            "--clients",
            "4",
            "--keys",
            "3",
            "--ops",
            "10",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1 and "--op cas needs --keys >= --clients" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_admin_refuses_bad_invocations_with_clear_errors(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from dkv.cli.main import main

    monkeypatch.delenv("DKV_ZK", raising=False)
    assert main(["admin", "status"]) == 1
    assert "needs --zk" in capsys.readouterr().err
    assert main(["admin", "drain", "--zk", "127.0.0.1:1"]) == 1
    assert "needs a SHARD" in capsys.readouterr().err
    assert main(["admin", "cancel", "--zk", "127.0.0.1:1"]) == 1
    assert "needs a MIGRATION" in capsys.readouterr().err


@pytest.mark.zk
def test_admin_status_and_drain_flag_through_zookeeper(zk: str, kz: KazooClient) -> None:  # noqa: F811
    from dkv.cli.main import main

    publish(kz, {"w": "h:1", "w2": "h:2"}, [Shard("shard-1", 1, "w", []), Shard("shard-2", 1, "w2", [])], ALL)
    out = subprocess.run(
        [sys.executable, "-m", "dkv.cli.main", "admin", "--zk", zk, "drain", "shard-2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and "shard-2 is draining" in out.stdout, out
    assert Shard.from_bytes("shard-2", kz.get(layout.shard_path("shard-2"))[0]).draining
    status = subprocess.run(
        [sys.executable, "-m", "dkv.cli.main", "admin", "--zk", zk, "status"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "shard-2 (draining)" in status.stdout and "shard-1 " in status.stdout, status
    assert main(["admin", "--zk", zk, "undrain", "shard-2"]) == 0
    assert not Shard.from_bytes("shard-2", kz.get(layout.shard_path("shard-2"))[0]).draining


@pytest.mark.zk
def test_admin_remove_takes_only_a_drained_empty_shard_with_no_live_member(
    zk: str,
    kz: KazooClient,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    from dkv.cli.main import main

    publish(
        kz,
        {"w": "h:1", "w2": "h:2"},
        [Shard("shard-1", 1, "w", []), Shard("shard-2", 1, "w2", ["r2"])],
        [(0, 1023, "shard-1")],
    )
    assert main(["admin", "--zk", zk, "remove", "shard-9"]) == 1
    assert "no shard 'shard-9'" in capsys.readouterr().err
    assert main(["admin", "--zk", zk, "remove", "shard-2"]) == 1
    assert "not drained" in capsys.readouterr().err
    assert main(["admin", "--zk", zk, "drain", "shard-2"]) == 0
    capsys.readouterr()
    assert main(["admin", "--zk", zk, "remove", "shard-2"]) == 1
    assert "live members (w2)" in capsys.readouterr().err
    kz.delete(layout.node_path("w2"))
    # Slots back on it (say an undrain raced): refused, and nothing changed.
    _, stat = kz.get(layout.SLOTS)
    kz.set(layout.SLOTS, SlotRanges([(0, 511, "shard-1"), (512, 1023, "shard-2")]).to_bytes(), version=stat.version)
    assert main(["admin", "--zk", zk, "remove", "shard-2"]) == 1
    assert "still owns 512 slot(s)" in capsys.readouterr().err
    assert kz.exists(layout.shard_path("shard-2"))
    kz.set(layout.SLOTS, SlotRanges([(0, 1023, "shard-1")]).to_bytes())
    kz.ensure_path(layout.shard_path("shard-2") + "/promotion")  # a past promotion's lock goes with it
    assert main(["admin", "--zk", zk, "remove", "shard-2"]) == 0
    assert "shard-2 removed" in capsys.readouterr().out
    assert kz.get_children(layout.SHARDS) == ["shard-1"]


@pytest.mark.zk
def test_admin_cancel_deletes_the_migration_and_nothing_else(
    zk: str,
    kz: KazooClient,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    from dkv.cli.main import main

    publish(
        kz,
        {"w": "h:1", "w2": "h:2"},
        [Shard("shard-1", 1, "w", []), Shard("shard-2", 1, "w2", [])],
        [(0, 1023, "shard-1")],
    )
    path = kz.create(
        layout.MIGRATIONS + "/m-",
        layout.Migration("", 768, 1023, "shard-1", "shard-2", layout.FROZEN, 42).to_bytes(),
        sequence=True,
        makepath=True,
    )
    mid = path.rsplit("/", 1)[-1]
    slots_before = kz.get(layout.SLOTS)[0]
    assert main(["admin", "--zk", zk, "status"]) == 0
    assert mid in capsys.readouterr().out
    assert main(["admin", "--zk", zk, "cancel", mid]) == 0
    assert "slots 768..1023 stay with shard-1" in capsys.readouterr().out
    assert kz.get_children(layout.MIGRATIONS) == [] and kz.get(layout.SLOTS)[0] == slots_before
    assert main(["admin", "--zk", zk, "cancel", mid]) == 1
    assert f"no migration '{mid}'" in capsys.readouterr().err


# -- issue 12: redis-cli-grade input, output and commands -----------------------------------------


def test_split_args_like_redis_cli() -> None:
    from dkv.cli.repl import CommandError, split_args

    assert split_args(r'set k "\x00\xff"') == ["set", "k", "\x00\udcff"]  # 0xff: a surrogateescape'd byte
    assert split_args(r'''a "b c" 'd "e' "\"\\\n\t\r\a\b\q"''') == ["a", "b c", 'd "e', '"\\\n\t\r\a\bq']
    assert split_args(r"'it\'s' x\y \x41") == ["it's", "x\\y", r"\x41"]  # outside quotes: as typed
    assert split_args("  \"\" ''  ") == ["", ""] and split_args("   ") == []
    assert split_args('a"b c"') == ["ab c"] and split_args("héllo wörld") == ["héllo", "wörld"]
    for bad in ('set a "b', "set a 'b", 'set "a"b', "set 'a'b"):
        with pytest.raises(CommandError):
            split_args(bad)


def test_render_like_redis_cli_and_raw() -> None:
    from dkv.cli.repl import Status, render

    assert render(None) == "(nil)" and render(None, raw=True) == ""
    assert render(7) == "(integer) 7" and render(-1, raw=True) == "-1"
    assert render(b"") == '""' and render(b"a b") == '"a b"' and render(b'q"\\') == r'"q\"\\"'
    assert render(b"\x00\xff", raw=True) == "\x00\udcff"  # written out as the two bytes
    assert render([b"0", [b"a", None, 3]]) == '1) "0"\n2) 1) "a"\n   2) (nil)\n   3) (integer) 3'
    assert render([b"0", [b"a", None]], raw=True) == "0\na\n"
    assert render([]) == "(empty array)"
    eleven = render([b"x"] * 11).splitlines()
    assert eleven[0] == ' 1) "x"' and eleven[-1] == '11) "x"'  # indexes right-aligned, as redis-cli
    assert render(Status("OK")) == "OK" and render(Status("table", raw="3"), raw=True) == "3"


def test_scan_cursor_walks_every_key_past_100_with_spaces_quoted(client: Client, k: str) -> None:
    import re

    from dkv.cli.repl import split_args

    keys = {f"{k}{i:03d}" for i in range(250)} | {f"{k}with space", f"{k}bin\x00"}
    client.mset({key: "v" for key in keys})
    state = CliState()
    seen: list[str] = []
    cursor, rounds = "0", 0
    while True:
        ok, out = execute(client, f"scan {cursor} MATCH {k}", state=state)
        assert ok, out
        lines = out.splitlines()
        cursor = split_args(lines[0].split(") ", 1)[1])[0]  # 1) "CURSOR"
        seen += [
            split_args(re.fullmatch(r'(?:\s*\d+\) )+(".*")', line).group(1))[0]  # type: ignore[union-attr]
            for line in lines[1:]
            if line != "2) (empty array)"
        ]
        rounds += 1
        if cursor == "0":
            break
    assert rounds == 3  # 100 + 100 + 52, then "0": never a silent stop at 100
    assert len(seen) == len(keys) and set(seen) == keys and seen == sorted(seen)
    assert f'"{k}with space"' in out and f'"{k}bin\\x00"' in out  # unambiguous in the output
    assert {f"{k}with space", f"{k}000"} <= set(state.keys.matching(k))  # scan results feed completion
    raw = CliState(raw=True)
    ok, out = execute(client, f"scan 0 MATCH {k} COUNT 300", state=raw)
    assert ok and out.splitlines()[0] == "0" and len(out.splitlines()) == 1 + len(keys)


def test_exists_counts_existing_keys_like_redis(client: Client, k: str) -> None:
    run(client, f"mset {k}a 1 {k}b 2")
    assert run(client, f"exists {k}a {k}b {k}nope") == "(integer) 2"
    assert run(client, f"exists {k}a {k}a") == "(integer) 2"  # counted each time, as Redis does
    assert run(client, f"exists {k}nope") == "(integer) 0"


def test_ping_reports_pong_and_a_round_trip(client: Client, node: NodeProcess) -> None:
    import re

    assert re.fullmatch(r"PONG \(\d+\.\d\d ms\)", run(client, "ping"))
    assert re.fullmatch(r"PONG \(\d+\.\d\d ms\)", run(client, f"ping {node.addr}"))
    ok, out = execute(client, "ping 127.0.0.1:1")
    assert not ok and out.startswith("(error) Unavailable")


def dbsize(client: Client) -> int:
    out = run(client, "dbsize").splitlines()
    assert out[0].split() == ["SHARD", "KEYS"] and out[1].split()[0] == "shard-0" and out[2].split()[0] == "total"
    assert out[1].split()[1] == out[2].split()[1]
    ok, raw = execute(client, "dbsize", state=CliState(raw=True))
    assert ok and raw == out[2].split()[1]
    return int(raw)


def test_dbsize_counts_live_keys_per_shard(client: Client, k: str) -> None:
    before = dbsize(client)
    run(client, f"mset {k}1 a {k}2 b {k}3 c")
    assert dbsize(client) == before + 3
    run(client, f"set {k}short x PX 50")
    wait_until(lambda: run(client, f"exists {k}short") == "(integer) 0", 10, "the key to expire")
    run(client, f"del {k}1")
    assert dbsize(client) == before + 2  # neither the deleted nor the expired key


def test_store_counts_live_keys_in_bounded_pages() -> None:
    from dkv.slots import ALL_SLOTS, SlotRange, slot_of
    from dkv.storage import Store

    store = Store.open("memory")
    with store.batch() as b:
        for i in range(25):
            b.put(f"key-{i}".encode(), b"v")
    total, after, pages = 0, None, 0
    while True:
        n, after = store.count_live([ALL_SLOTS], after, 4)
        total, pages = total + n, pages + 1
        if after is None:
            break
    assert total == 25 and pages == 7  # 4 rows a page
    some = [SlotRange(0, 511)]
    assert store.count_live(some, None, 1000)[0] == sum(1 for i in range(25) if slot_of(f"key-{i}".encode()) <= 511)


def test_latency_flag_and_command(client: Client, k: str) -> None:
    import re

    state = CliState(latency=True)
    ok, out = execute(client, f"set {k}a 1", state=state)
    assert ok and out.splitlines()[0] == "OK" and re.fullmatch(r"\(\d+\.\d ms\)", out.splitlines()[1])
    assert execute(client, "latency off", state=state) == (True, "latency display off")
    assert execute(client, f"get {k}a", state=state) == (True, '"1"')
    assert execute(client, "latency", state=state) == (True, "latency display on")  # toggles
    assert execute(client, "latency maybe", state=state) == (False, "(error) usage: latency [ON|OFF]")


def cli(node: NodeProcess, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "dkv.cli.main", "cli", node.addr, *args], input=stdin, capture_output=True, timeout=60
    )


def test_raw_output_for_scripts_in_stdin_and_one_shot_modes(node: NodeProcess, k: str) -> None:
    script = (
        f'set {k}bin "\\x00\\xff"\nset {k}e ""\nget {k}bin\nget {k}e\nget {k}nope\nincr {k}n\n'
        f"mget {k}e {k}n\nscan 0 MATCH {k}\nexists {k}e {k}n\n"
    ).encode()
    proc = cli(node, "--raw", stdin=script)
    assert proc.returncode == 0, proc
    assert proc.stdout.split(b"\n") == [
        b"OK",
        b"OK",
        b"\x00\xff",
        b"",
        b"",
        b"1",
        b"",
        b"1",
        b"0",
        f"{k}bin".encode(),
        f"{k}e".encode(),
        f"{k}n".encode(),
        b"2",
        b"",
    ]
    one = cli(node, "--raw", "get", f"{k}bin")  # one-shot: the words after the address are the command
    assert (one.returncode, one.stdout) == (0, b"\x00\xff\n")
    quoted = cli(node, "get", f"{k}bin")
    assert (quoted.returncode, quoted.stdout) == (0, b'"\\x00\\xff"\n')
    negative = cli(node, "--", "incr", f"{k}n", "-5")  # after --, a word may start with -
    assert (negative.returncode, negative.stdout) == (0, b"(integer) -4\n")
    bad = cli(node, "sett", "a", "1")
    assert (bad.returncode, bad.stdout) == (1, b"(error) unknown command 'sett'; did you mean 'set'?\n")


def test_split_command_tells_addresses_from_the_command() -> None:
    from dkv.cli.repl import split_command

    assert split_command(["127.0.0.1:7000", "h:1,h:2", "get", "a:1"]) == (["127.0.0.1:7000", "h:1,h:2"], ["get", "a:1"])
    assert split_command(["get", "k"]) == ([], ["get", "k"]) and split_command(["[::1]:7000"]) == (["[::1]:7000"], [])


# -- the interactive prompt in a pseudo-terminal (prompt_toolkit's pipe input) ------------------


def screen_text(app: object) -> str:
    """The rows prompt_toolkit last drew, as text (styles dropped), blank rows left out."""
    scr = app.renderer._last_screen  # type: ignore[attr-defined]
    rows = []
    for y in range(scr.height):
        row = scr.data_buffer[y]
        width = max(row.keys(), default=-1) + 1
        rows.append("".join(row[x].char if x in row else " " for x in range(width)).rstrip())
    return "\n".join(r for r in rows if r)


def type_into_prompt(steps: list[tuple[str, object]], state: CliState | None = None) -> tuple[str, str]:
    """Type each step's keys into a real prompt session, waiting after each until its condition on
    the buffer holds (completions arrive asynchronously), then draw the screen: (line, screen)."""
    import threading
    import time

    from prompt_toolkit.application import create_app_session
    from prompt_toolkit.history import InMemoryHistory
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.key_binding import KeyBindings
    from prompt_toolkit.output import DummyOutput

    kb = KeyBindings()
    shots: list[str] = []

    @kb.add("c-t")  # the test's "look at the screen now" key
    def _(event: object) -> None:
        app = event.app  # type: ignore[attr-defined]
        app.render_counter += 1
        app.renderer.render(app, app.layout)
        shots.append(screen_text(app))
        app.exit(result=app.current_buffer.text)

    with create_pipe_input() as inp, create_app_session(input=inp, output=DummyOutput()):
        session = make_session("127.0.0.1:7000", InMemoryHistory(), state)

        def typist() -> None:
            for keys, ready in steps:
                inp.send_text(keys)
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and not ready(session.default_buffer):  # type: ignore[operator]
                    time.sleep(0.01)
            inp.send_text("\x14")

        t = threading.Thread(target=typist, daemon=True)
        t.start()
        line = session.prompt(key_bindings=kb)
        t.join(10)
    return line, shots[0]


def _menu_open(buffer: object) -> bool:
    return buffer.complete_state is not None  # type: ignore[attr-defined]


def test_prompt_tab_completes_a_command_and_shows_its_usage() -> None:
    line, screen = type_into_prompt([("se", _menu_open)])
    rows = screen.splitlines()
    assert rows[0] == "dkv 127.0.0.1:7000> se" and rows[1].strip() == "set"  # the completion menu
    assert rows[-1].startswith("set KEY VALUE [EX SECONDS|PX MS] [NX|XX]  - set KEY to VALUE")  # toolbar
    line, screen = type_into_prompt([("se", _menu_open), ("\t", lambda b: b.text == "set")])
    assert line == "set"


def test_prompt_hints_the_rest_of_the_usage_after_set_k() -> None:
    line, screen = type_into_prompt([("set k", lambda b: True)])
    rows = screen.splitlines()
    assert line == "set k"
    assert rows[0] == "dkv 127.0.0.1:7000> set k VALUE [EX SECONDS|PX MS] [NX|XX]"  # grey, after the cursor
    assert rows[-1].startswith("set KEY VALUE [EX SECONDS|PX MS] [NX|XX]")
    _, screen = type_into_prompt([("set k v EX", lambda b: True)])
    assert screen.splitlines()[0] == "dkv 127.0.0.1:7000> set k v EX SECONDS [NX|XX]"


def test_prompt_says_did_you_mean_for_a_typo() -> None:
    line, screen = type_into_prompt([("sett ", lambda b: True)])
    assert screen.splitlines()[-1] == "unknown command 'sett'; did you mean 'set'?"


def test_prompt_completes_keys_seen_in_the_session(client: Client, k: str) -> None:
    client.mset({f"{k}user:1": "a", f"{k}user:2": "b", f"{k}my key": "c"})
    state = CliState()
    assert execute(client, f"scan 0 MATCH {k}", state=state)[0]  # the keys a scan shows are remembered
    _, screen = type_into_prompt([(f"get {k}u", _menu_open)], state)
    assert [r.strip() for r in screen.splitlines()[1:3]] == [f"{k}user:1", f"{k}user:2"]
    line, _ = type_into_prompt([(f"get {k}m", _menu_open), ("\t", lambda b: b.text != f"get {k}m")], state)
    assert line == f'get "{k}my key"'  # quoted, so it runs as one word
    assert execute(client, line) == (True, '"c"')
    execute(client, f"set {k}typed 1", state=state)  # keys typed are remembered too
    line, _ = type_into_prompt([(f"exists {k}ty", _menu_open), ("\t", lambda b: b.text.endswith("typed"))], state)
    assert line == f"exists {k}typed"


def test_prompt_session_round_trips_escapes_and_empty_values(client: Client, k: str) -> None:
    from prompt_toolkit.application import create_app_session
    from prompt_toolkit.history import InMemoryHistory
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    results: list[tuple[bool, str]] = []
    with create_pipe_input() as inp, create_app_session(input=inp, output=DummyOutput()):
        inp.send_text(
            f'set {k}bin "\\x00\\xff"\rget {k}bin\rset {k}e ""\rget {k}e\rexists {k}bin {k}e {k}no\rexit\r\x04'
        )
        state = CliState()
        status = repl_loop(
            client,
            make_session("127.0.0.1:7000", InMemoryHistory(), state),
            lambda ok, text: results.append((ok, text)),
            state,
        )
    assert status == 0
    assert results == [(True, "OK"), (True, '"\\x00\\xff"'), (True, "OK"), (True, '""'), (True, "(integer) 2")]
    assert client.get(f"{k}bin") == b"\x00\xff" and client.get(f"{k}e") == b""
    assert f"{k}bin" in state.keys and f"{k}e" in state.keys


@pytest.mark.zk
def test_dbsize_per_shard_and_scan_cursor_across_a_two_shard_cluster(zk: str, tmp_path: Path) -> None:
    from tests.support.cluster import Cluster

    cluster = Cluster(zk, tmp_path, shards=2, replication_factor=1, write_quorum=1)
    try:
        cluster.start()
        shards = sorted(cluster.shard_members())
        assert len(shards) == 2
        keys = {
            shards[0]: cluster.keys_of_shard(shards[0], 3, "a"),
            shards[1]: cluster.keys_of_shard(shards[1], 5, "b"),
        }
        with cluster.client() as c:
            c.mset({key: "v" for group in keys.values() for key in group})
            rows = [line.split() for line in run(c, "dbsize").splitlines()]
            assert rows == [["SHARD", "KEYS"], [shards[0], "3"], [shards[1], "5"], ["total", "8"]]
            state, cursor, seen = CliState(raw=True), "0", []
            while True:  # raw: the cursor, then one key a line
                cursor, *page = run_state(c, f"scan {cursor} COUNT 3", state).splitlines()
                seen += page
                if cursor == "0":
                    break
            assert sorted(seen) == seen and set(seen) == {key for group in keys.values() for key in group}
            assert len(seen) == 8
    finally:
        cluster.stop()


def run_state(client: Client, line: str, state: CliState) -> str:
    ok, out = execute(client, line, state=state)
    assert ok, out
    return out
