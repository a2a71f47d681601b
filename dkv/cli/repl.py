"""``dkv cli``: turn typed command lines into client calls and print their results.

:func:`execute` runs one command line against a :class:`~dkv.client.Client`
and returns ``(ok, text)``; it never raises for bad input or a failed
request, so every caller (the prompt loop, the stdin loop, tests) shares it.
:func:`run_cli` picks the front end: an interactive prompt_toolkit session when
stdin is a terminal, else one command per stdin line with plain output.
"""
from __future__ import annotations

import logging
import math
import os
import shlex
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

from dkv.errors import DKVError
from dkv.protocol import MAX_TTL_MS
from dkv.slots import slot_of

if TYPE_CHECKING:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import History

    from dkv.client import Client

#: ``(ok, text)``: whether the command succeeded, and what to print (may be empty).
Result = tuple[bool, str]
#: Where a front end sends each command's result.
Emit = Callable[[bool, str], None]

EXIT_WORDS = frozenset({"exit", "quit"})
DEFAULT_SCAN_LIMIT = 100
HISTORY_ENV = "DKV_HISTORY"
DEFAULT_HISTORY = "~/.dkv_history"


class UsageError(Exception):
    """The arguments do not fit the command's usage line."""


class CommandError(Exception):
    """A command refused its input; the message is shown as ``(error) MESSAGE``."""


def unknown_command(name: str) -> str:
    return f"unknown command '{name}'; type 'help'"


@dataclass(frozen=True)
class Command:
    name: str
    args: str  # usage after the name, e.g. "KEY VALUE"
    summary: str
    min_args: int
    max_args: int | None  # None: no upper bound
    #: ``run(client, args) -> text``; with ``streams``, ``run(client, args, emit)``, which may
    #: emit lines before it returns. None: handled by the front end.
    run: Callable[..., str] | None
    streams: bool = False

    @property
    def usage(self) -> str:
        return f"{self.name} {self.args}".rstrip()


# -- formatting ------------------------------------------------------------------


def format_value(value: bytes) -> str:
    """``value`` as UTF-8 text when it is valid UTF-8, else as a bytes literal."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return repr(value)


def _nil_or(value: bytes | None) -> str:
    return "(nil)" if value is None else format_value(value)


def _scalar(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bytes):
        return format_value(value)
    return str(value)


def format_mapping(data: Mapping[str, Any], indent: int = 0) -> str:
    """Aligned ``key: value`` lines; nested mappings indented below their key."""
    width = max((len(str(k)) for k in data), default=0) + 1
    pad = " " * indent
    lines = []
    for key, value in data.items():
        if isinstance(value, Mapping):
            lines.append(f"{pad}{key}:")
            if value:
                lines.append(format_mapping(value, indent + 2))
        else:
            lines.append(f"{pad}{f'{key}:':<{width}} {_scalar(value)}")
    return "\n".join(lines)


def format_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A plain text table with left-aligned, space-separated columns."""
    table = [list(headers), *[list(r) for r in rows]]
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table)


def format_slots(ranges: Iterable[Sequence[int]]) -> str:
    """Inclusive slot ranges as ``0-511, 700-703`` (``-`` when there are none)."""
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges) or "-"


def _lag(writer_info: Mapping[str, Any] | None, replica_id: str) -> str:
    try:
        lag = writer_info["replication"]["replicas"][replica_id]["lag"]  # type: ignore[index]
    except (KeyError, TypeError):
        return "?"
    return "?" if lag is None else str(lag)


def format_shards(cluster: Mapping[str, Any], writer_infos: Mapping[str, Mapping[str, Any] | None]) -> str:
    """The shard table of a ``cluster_info()`` answer: shard, epoch, writer, replicas with lag, slots.

    ``writer_infos`` maps a writer's id to its ``info()``, or to None when it
    did not answer. A member that is not up (:func:`node_status`, the node
    table's STATUS) shows its status instead of its details. A replica's lag is
    read from its writer's ``info()["replication"]["replicas"]``; ``?`` when the
    writer was not asked or does not report it.
    """
    status = node_status(cluster, writer_infos)

    def member(nid: str, detail: str) -> str:
        state = status.get(nid, "down")
        return f"{nid}{detail}" if state == "up" else f"{nid} ({state})"

    rows = []
    for s in cluster.get("shards", []):
        writer = s.get("writer")
        info = writer_infos.get(writer) if writer else None
        replicas = [member(r, f" (lag {_lag(info, r)})") for r in s.get("replicas") or []]
        name = str(s.get("id")) + (" (draining)" if s.get("draining") else "")
        rows.append([name, str(s.get("epoch")), member(writer, "") if writer else "-",
                     ", ".join(replicas) or "-", format_slots(s.get("slots") or [])])
    table = format_table(["SHARD", "EPOCH", "WRITER", "REPLICAS", "SLOTS"], rows)
    writer_of = {s.get("id"): s.get("writer") or "" for s in cluster.get("shards", [])}
    moving = [[str(m.get("id")), format_slots([m.get("slots")]), str(m.get("source")), str(m.get("target")),
               str(m.get("state")), _progress(writer_infos.get(writer_of.get(m.get("target"), "")), m.get("id"))]
              for m in cluster.get("migrations") or []]
    if moving:
        table += "\n\n" + format_table(["MIGRATION", "SLOTS", "FROM", "TO", "STATE", "PROGRESS"], moving)
    return table


def _progress(target_writer_info: Mapping[str, Any] | None, migration_id: Any) -> str:
    """A move's progress from its target writer's ``info()["migration"]``: phase, records imported."""
    p = (target_writer_info or {}).get("migration") or {}
    if p.get("id") != migration_id:
        return "-"
    out = f"{p.get('phase')}, {p.get('imported', 0)} imported"
    if p.get("restarts"):
        out += f", {p['restarts']} restart(s)"
    if p.get("frozen_ms") is not None:
        out += f", frozen {p['frozen_ms']} ms"
    return out


#: the status of a node ZooKeeper counts up that did not answer just now (killed or paused: its
#: session outlives it by up to the session timeout)
UNREACHABLE = "unreachable"


def node_status(cluster: Mapping[str, Any],
                writer_infos: Mapping[str, Mapping[str, Any] | None] | None = None) -> dict[str, str]:
    """Each node's status, the one both tables show: ZooKeeper's (``up``/``down``), or
    :data:`UNREACHABLE` for an up node whose ``info()`` was asked for and did not come."""
    status = {str(n.get("id")): str(n.get("status")) for n in cluster.get("nodes", [])}
    for nid, info in (writer_infos or {}).items():
        if info is None and status.get(nid) == "up":
            status[nid] = UNREACHABLE
    return status


def format_nodes(cluster: Mapping[str, Any],
                 writer_infos: Mapping[str, Mapping[str, Any] | None] | None = None) -> str:
    """The node table of a ``cluster_info()`` answer: id, addr, role, shard, status
    (:func:`node_status`: give the ``writer_infos`` the shard table was made with)."""
    status = node_status(cluster, writer_infos)
    return format_table(
        ["ID", "ADDR", "ROLE", "SHARD", "STATUS"],
        [[_scalar(n.get(f)) for f in ("id", "addr", "role", "shard")] + [status[str(n.get("id"))]]
         for n in cluster.get("nodes", [])])


# -- commands ----------------------------------------------------------------------


def _enc(text: str) -> bytes:
    return text.encode("utf-8")


def _get(client: "Client", args: list[str]) -> str:
    return _nil_or(client.get(_enc(args[0])))


#: ``cas``'s EXPECTED for "the key is absent" (what ``get`` prints for a missing key)
ABSENT = "(nil)"


def _seconds(word: str, text: str) -> float:
    """A positive, finite number of seconds (``EX``, ``expire``)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value * 1000 <= MAX_TTL_MS):
        raise CommandError(f"{word} must be a positive number of seconds (at most {MAX_TTL_MS // 1000}), "
                           f"not {text!r}")
    return value


def _millis(text: str) -> int:
    """A positive whole number of milliseconds (``PX``)."""
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) <= MAX_TTL_MS:
        raise CommandError(f"PX must be a whole number of milliseconds in 1..{MAX_TTL_MS}, not {text!r}")
    return int(text)


def _options(words: list[str], allowed: tuple[str, ...]) -> dict[str, Any]:
    """``EX seconds``, ``PX ms``, ``NX``, ``XX`` (any case, any order; each at most once) among
    ``allowed``, as keyword arguments of the client call. Raises before anything is sent."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(words):
        word = words[i].upper()
        if word not in allowed:
            raise CommandError(f"unknown option {words[i]!r} (expected {', '.join(allowed)})")
        if word.lower() in out:
            raise CommandError(f"{word} given twice")
        if word in ("EX", "PX"):
            if i + 1 >= len(words):
                raise CommandError(f"{word} needs a value")
            out[word.lower()] = _seconds("EX", words[i + 1]) if word == "EX" else _millis(words[i + 1])
            i += 2
        else:
            out[word.lower()] = True
            i += 1
    if "ex" in out and "px" in out:
        raise CommandError("give EX or PX, not both")
    if out.get("nx") and out.get("xx"):
        raise CommandError("NX and XX exclude each other")
    return out


def _set(client: "Client", args: list[str]) -> str:
    options = _options(args[2:], ("EX", "PX", "NX", "XX"))
    return "OK" if client.set(_enc(args[0]), _enc(args[1]), **options) else "(nil)"


def _cas(client: "Client", args: list[str]) -> str:
    options = _options(args[3:], ("EX", "PX"))
    expected = None if args[1] == ABSENT else _enc(args[1])
    return "OK" if client.cas(_enc(args[0]), expected, _enc(args[2]), **options) else "(nil)"


def _amount(args: list[str]) -> int:
    if len(args) < 2:
        return 1
    try:
        amount = int(args[1])
    except ValueError:
        amount = None
    if amount is None or not -2 ** 63 < amount < 2 ** 63:
        raise CommandError(f"the amount must be a 64-bit integer, not {args[1]!r}")
    return amount


def _incr(client: "Client", args: list[str]) -> str:
    return f"(integer) {client.incr(_enc(args[0]), _amount(args))}"


def _decr(client: "Client", args: list[str]) -> str:
    return f"(integer) {client.decr(_enc(args[0]), _amount(args))}"


def _ttl(client: "Client", args: list[str]) -> str:
    key = _enc(args[0])
    left = client.ttl(key)
    if left is not None:
        return f"{left:.3f} s"
    return "(no expiry)" if client.exists(key) else "(nil)"


def _expire(client: "Client", args: list[str]) -> str:
    return f"(integer) {int(client.expire(_enc(args[0]), _seconds('seconds', args[1])))}"


def _persist(client: "Client", args: list[str]) -> str:
    return f"(integer) {int(client.persist(_enc(args[0])))}"


def _getm(client: "Client", args: list[str]) -> str:
    meta = client.get(_enc(args[0]), with_meta=True)
    if meta is None:
        return "(nil)"
    assert not isinstance(meta, bytes)
    expires = "never"
    if meta.expires_at is not None:
        when = datetime.fromtimestamp(meta.expires_at, timezone.utc).isoformat(timespec="milliseconds")
        expires = f"{meta.expires_at:.3f} ({when})"
    return format_mapping({"value": format_value(meta.value), "revision": meta.revision, "expires_at": expires})


def _del(client: "Client", args: list[str]) -> str:
    deleted = sum(1 for key in args if client.delete(_enc(key)))
    return f"(integer) {deleted}"


def _exists(client: "Client", args: list[str]) -> str:
    return f"(integer) {int(client.exists(_enc(args[0])))}"


def _mget(client: "Client", args: list[str]) -> str:
    values = client.mget([_enc(k) for k in args])
    return "\n".join(f"{i}) {_nil_or(v)}" for i, v in enumerate(values, 1))


def _mset(client: "Client", args: list[str]) -> str:
    if len(args) % 2:
        raise UsageError
    client.mset({_enc(k): _enc(v) for k, v in zip(args[::2], args[1::2])})
    return "OK"


def _scan(client: "Client", args: list[str]) -> str:
    prefix = _enc(args[0]) if args else b""
    try:
        limit = int(args[1]) if len(args) > 1 else DEFAULT_SCAN_LIMIT
    except ValueError:
        raise UsageError from None
    lines = [f"{format_value(k)} {format_value(v)}" for k, v in client.scan(prefix, limit=limit)]
    n = len(lines)
    lines.append(f"({n} key{'' if n == 1 else 's'})")
    return "\n".join(lines)


def format_event(event: Any) -> str:
    """One watch event as a line: ``set KEY VALUE (rev N)``, ``delete KEY (rev N)``."""
    value = f" {format_value(event.value)}" if event.type == "set" else ""
    return f"{event.type} {format_value(event.key)}{value} (rev {event.revision})"


def _watch(client: "Client", args: list[str]) -> str:
    """Print the events of keys with PREFIX as they come (each line at once), until COUNT events
    or Ctrl-C; returns where it stopped (a ``since`` to resume from)."""
    prefix = _enc(args[0]) if args else b""
    try:
        count = int(args[1]) if len(args) > 1 else None
    except ValueError:
        raise UsageError from None
    if count is not None and count < 1:
        raise UsageError
    seen = 0
    with client.watch(prefix) as w:
        try:
            for event in w:
                print(format_event(event), flush=True)
                seen += 1
                if count is not None and seen >= count:
                    break
        except KeyboardInterrupt:
            pass
        return f"({seen} event{'' if seen == 1 else 's'}; resume with since={w.revision})"


def _slot(client: "Client", args: list[str]) -> str:
    return f"(integer) {slot_of(_enc(args[0]))}"


def writer_infos(client: "Client", cluster: Mapping[str, Any]) -> dict[str, Mapping[str, Any] | None]:
    """``info()`` of the writer of every shard with replicas (for their lag) or importing a slot
    range (for the move's progress); None if it does not answer."""
    addr_of = {n.get("id"): n.get("addr") for n in cluster.get("nodes", []) if n.get("status") == "up"}
    importing = {m.get("target") for m in cluster.get("migrations") or []}
    infos: dict[str, Mapping[str, Any] | None] = {}
    for s in cluster.get("shards", []):
        writer = s.get("writer")
        if (not writer or not (s.get("replicas") or s.get("id") in importing) or writer in infos
                or not addr_of.get(writer)):
            continue
        try:
            infos[writer] = client.info(addr_of[writer])
        except DKVError:
            infos[writer] = None
    return infos


def _info(client: "Client", args: list[str]) -> str:
    cluster = client.cluster_info()
    shards = format_shards(cluster, writer_infos(client, cluster))
    if cluster.get("mode") == "standalone":
        return f"{format_mapping(client.info())}\n\n{shards}"
    return shards


def _nodes(client: "Client", args: list[str]) -> str:
    return format_nodes(client.cluster_info())


#: How often a held ``lock`` checks that its lease is still valid (seconds).
LOCK_CHECK_INTERVAL = 0.2


def _lock(client: "Client", args: list[str], emit: Emit) -> str:
    """Acquire lock NAME (waiting as long as it takes), print its token, hold it (renewed in
    the background) until Ctrl-C, then release it."""
    import time

    try:
        ttl = float(args[1]) if len(args) > 1 else 10.0
    except ValueError:
        raise UsageError from None
    lock = client.lock(args[0], ttl=ttl)
    try:
        lock.acquire()
    except KeyboardInterrupt:
        return "(interrupted) not acquired"
    emit(True, f"(integer) {lock.token}\nholding {args[0]!r} (ttl {ttl:g}s, renewed); Ctrl-C releases it")
    try:
        while lock.valid:
            time.sleep(LOCK_CHECK_INTERVAL)
    except KeyboardInterrupt:
        return "released" if lock.release() else "released (its lease had already expired)"
    lock.release()
    raise CommandError(f"lost lock {args[0]!r}: its lease expired or another holder took it")


def _help(client: "Client", args: list[str]) -> str:
    if args:
        cmd = COMMANDS.get(args[0].lower())
        if cmd is None:
            raise CommandError(unknown_command(args[0]))
        return f"usage: {cmd.usage}\n  {cmd.summary}"
    width = max(len(c.usage) for c in COMMANDS.values())
    return "\n".join(f"{c.usage:<{width}}  {c.summary}" for c in COMMANDS.values())


COMMANDS: Mapping[str, Command] = MappingProxyType({c.name: c for c in (
    Command("get", "KEY", "the value of KEY, or (nil)", 1, 1, _get),
    Command("set", "KEY VALUE [EX SECONDS|PX MS] [NX|XX]",
            "set KEY to VALUE, expiring after EX/PX; NX: only if absent, XX: only if present "
            "(else (nil))", 2, 6, _set),
    Command("cas", "KEY EXPECTED NEW [EX SECONDS|PX MS]",
            f"set KEY to NEW only if its value is EXPECTED (else (nil)); EXPECTED {ABSENT}: "
            "only if KEY is absent", 3, 5, _cas),
    Command("incr", "KEY [AMOUNT]", "add AMOUNT (default 1) to the integer at KEY (absent: 0); "
            "prints the result", 1, 2, _incr),
    Command("decr", "KEY [AMOUNT]", "subtract AMOUNT (default 1); see incr", 1, 2, _decr),
    Command("ttl", "KEY", "seconds until KEY expires, (no expiry), or (nil) if absent", 1, 1, _ttl),
    Command("expire", "KEY SECONDS", "make KEY expire SECONDS from now; 1, or 0 if absent", 2, 2, _expire),
    Command("persist", "KEY", "remove KEY's expiry; 1, or 0 if it had none or is absent", 1, 1, _persist),
    Command("getm", "KEY", "KEY's value, revision and expiry (Unix time), or (nil)", 1, 1, _getm),
    Command("del", "KEY [KEY ...]", "delete keys; prints how many existed", 1, None, _del),
    Command("exists", "KEY", "1 if KEY exists, else 0", 1, 1, _exists),
    Command("mget", "KEY [KEY ...]", "the values of many keys", 1, None, _mget),
    Command("mset", "KEY VALUE [KEY VALUE ...]", "set many keys", 2, None, _mset),
    Command("scan", "[PREFIX] [LIMIT]", f"keys with PREFIX in key order (LIMIT default {DEFAULT_SCAN_LIMIT})",
            0, 2, _scan),
    Command("watch", "[PREFIX] [COUNT]", "print changes of keys with PREFIX as they come (Ctrl-C stops; "
            "COUNT: stop after that many)", 0, 2, _watch),
    Command("slot", "KEY", "the slot (0..1023) that owns KEY", 1, 1, _slot),
    Command("lock", "NAME [TTL]", "acquire lock NAME, print its fencing token, hold it until Ctrl-C",
            1, 2, _lock, streams=True),
    Command("info", "", "the cluster's shards (and the node's status when standalone)", 0, 0, _info),
    Command("nodes", "", "the cluster's nodes: id, address, role, shard, status", 0, 0, _nodes),
    Command("help", "[COMMAND]", "list the commands, or show one command's usage", 0, 1, _help),
    Command("exit", "", "leave (also: quit, Ctrl-D)", 0, 0, None),
    Command("quit", "", "leave", 0, 0, None),
)})


def is_exit(line: str) -> bool:
    """Whether ``line`` is the ``exit``/``quit`` command."""
    words = line.split()
    return len(words) == 1 and words[0].lower() in EXIT_WORDS


def execute(client: "Client", line: str, emit: Emit | None = None) -> Result:
    """Run one command line; ``(ok, text to print)``. Never raises for a failing command.

    ``emit`` receives what a streaming command (``lock``) prints before it ends
    (default: printed to stdout)."""
    try:
        argv = shlex.split(line)
    except ValueError as e:  # e.g. "No closing quotation"
        return False, f"(error) {str(e).lower()}"
    if not argv:
        return True, ""
    cmd = COMMANDS.get(argv[0].lower())
    if cmd is None:
        return False, f"(error) {unknown_command(argv[0])}"
    args = argv[1:]
    if len(args) < cmd.min_args or (cmd.max_args is not None and len(args) > cmd.max_args):
        return False, f"(error) usage: {cmd.usage}"
    if cmd.run is None:  # exit/quit: the front end leaves before calling execute
        return True, ""
    try:
        if cmd.streams:
            return True, cmd.run(client, args, emit or _print_plain)
        return True, cmd.run(client, args)
    except UsageError:
        return False, f"(error) usage: {cmd.usage}"
    except CommandError as e:
        return False, f"(error) {e}"
    except Exception as e:  # a DKVError from the client (or, if ever, a bug): one line, no traceback
        return False, f"(error) {type(e).__name__}: {e}"


# -- front ends ------------------------------------------------------------------------


def run_lines(client: "Client", lines: Iterable[str], emit: Emit) -> int:
    """Run one command per line (blank and ``#`` lines skipped); 0 if all succeeded, else 1."""
    failed = False
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if is_exit(line):
            break
        ok, text = execute(client, line, emit)
        failed = failed or not ok
        emit(ok, text)
    return 1 if failed else 0


def _print_plain(ok: bool, text: str) -> None:
    if text:
        print(text, flush=True)


def history_path() -> Path:
    return Path(os.path.expanduser(os.environ.get(HISTORY_ENV) or DEFAULT_HISTORY))


def open_history(path: Path) -> "History":
    """A ``FileHistory`` at ``path`` (parent created), or in-memory if it cannot be written."""
    from prompt_toolkit.history import FileHistory, InMemoryHistory

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError:
        return InMemoryHistory()
    return FileHistory(str(path))


def make_session(addr: str, history: "History") -> "PromptSession[str]":
    """The interactive prompt: ``dkv ADDR> `` (ADDR: a node, or ``zk:HOSTS``) with command-name completion."""
    from prompt_toolkit import PromptSession

    return PromptSession(f"dkv {addr}> ", history=history, completer=command_completer(),
                         complete_while_typing=True)


#: option words completed after a command's required arguments
OPTION_WORDS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "set": ("EX", "PX", "NX", "XX"),
    "cas": ("EX", "PX"),
})


def command_completer() -> Any:
    """Completes command names (first word, and after ``help``), and the option words of
    ``set``/``cas`` (:data:`OPTION_WORDS`) once their required arguments are typed."""
    from prompt_toolkit.completion import Completer, Completion, WordCompleter

    names = WordCompleter(list(COMMANDS), ignore_case=True)

    class _Completer(Completer):
        def get_completions(self, document: Any, complete_event: Any) -> Any:
            before = document.text_before_cursor
            words = before.split()
            typing = bool(before) and not before[-1].isspace()
            done = words[:-1] if typing else words  # the finished words
            if not done or (len(done) == 1 and done[0].lower() == "help"):
                yield from names.get_completions(document, complete_event)
                return
            cmd = COMMANDS.get(done[0].lower())
            options = OPTION_WORDS.get(done[0].lower(), ())
            if cmd is None or not options or len(done) - 1 < cmd.min_args:
                return
            if done[-1].upper() in ("EX", "PX"):  # a value comes next
                return
            word = words[-1] if typing else ""
            used = {w.upper() for w in done[1 + cmd.min_args:]}
            for option in options:
                if option not in used and option.startswith(word.upper()):
                    yield Completion(option, start_position=-len(word))

    return _Completer()


def repl_loop(client: "Client", session: "PromptSession[str]", emit: Emit) -> int:
    """Prompt until exit/quit/Ctrl-D; Ctrl-C clears the line (or abandons a running command)."""
    while True:
        try:
            line = session.prompt()
        except KeyboardInterrupt:
            continue
        except EOFError:
            return 0
        if is_exit(line):
            return 0
        try:
            ok, text = execute(client, line, emit)
        except KeyboardInterrupt:
            ok, text = False, "(interrupted)"
        emit(ok, text)


def _print_styled(ok: bool, text: str) -> None:
    from prompt_toolkit import print_formatted_text
    from prompt_toolkit.formatted_text import FormattedText

    if text:
        print_formatted_text(FormattedText([("" if ok else "ansired", text)]))


#: ``dkv cli``'s liveness (:class:`dkv.Client`): a stopped or paused node is reported after
#: about this many seconds of silence, not the library's 2 (a person is waiting on the prompt)
INTERACTIVE_LIVENESS = 1.0


def run_cli(addrs: list[str], timeout: float, zk: str = "", auth: str | None = None) -> int:
    """``dkv cli``: interactive on a terminal, else run commands from stdin.

    With ``zk`` the client takes the cluster map from ZooKeeper (``addrs`` may be empty).
    """
    from dkv.client.client import DEFAULT_ADDR, Client

    # kazoo reports reconnects as warnings; the CLI reports failed commands itself.
    logging.getLogger("kazoo").setLevel(logging.ERROR)
    client = Client(addrs, zk=zk or None, timeout=timeout, auth=auth or None, liveness=INTERACTIVE_LIVENESS)
    try:
        if not sys.stdin.isatty():
            return run_lines(client, sys.stdin, _print_plain)
        target = f"zk:{zk}" if zk else (addrs[0] if addrs else DEFAULT_ADDR)
        print(f"dkv {target}: type 'help' for commands, 'exit' or Ctrl-D to leave")
        return repl_loop(client, make_session(target, open_history(history_path())), _print_styled)
    finally:
        client.close()
