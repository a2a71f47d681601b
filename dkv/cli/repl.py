r"""``dkv cli``: turn typed command lines into client calls and print their replies as redis-cli does.

:func:`execute` runs one command line against a :class:`~dkv.client.Client`
and returns ``(ok, text)``; it never raises for bad input or a failed
request, so every caller (the prompt loop, the stdin loop, one-shot mode, tests)
shares it. Lines are split as redis-cli splits them (:func:`split_args`:
``"\xNN"``, ``\n``, ``\t``, ``\"`` inside double quotes); replies print as
redis-cli prints them (:func:`render`: ``"quoted"`` strings with escaped
non-printable bytes, ``(nil)``, ``(integer) N``, numbered arrays), or raw with
``--raw``. :func:`run_cli` picks the front end: an interactive prompt_toolkit
session with completion (commands, options, keys seen) and argument hints when
stdin is a terminal, one command from the command line, else one command per
stdin line.

Bytes that are not UTF-8 travel inside ``str`` as lone surrogates
(``errors="surrogateescape"``), as the shell hands them to Python: ``\xff`` typed
or passed is the byte 0xff, never the text.
"""

from __future__ import annotations

import difflib
import fnmatch
import logging
import math
import os
import re
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence, Union

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
DEFAULT_SCAN_COUNT = 100
MAX_SCAN_COUNT = 10_000
#: keys remembered for completion (least recently seen dropped first)
MAX_SEEN_KEYS = 1000
HISTORY_ENV = "DKV_HISTORY"
DEFAULT_HISTORY = "~/.dkv_history"


class UsageError(Exception):
    """The arguments do not fit the command's usage line."""


class CommandError(Exception):
    """A command refused its input; the message is shown as ``(error) MESSAGE``."""


def suggest(name: str) -> str | None:
    """The command name closest to a mistyped ``name`` (difflib), if one is close."""
    close = difflib.get_close_matches(name.lower(), [c for c in COMMANDS if c != "quit"], n=1, cutoff=0.6)
    return close[0] if close else None


def unknown_command(name: str) -> str:
    near = suggest(name)
    hint = f"did you mean '{near}'?" if near else "type 'help'"
    return f"unknown command '{name}'; {hint}"


@dataclass(frozen=True)
class Command:
    name: str
    args: str  # usage after the name, e.g. "KEY VALUE"
    summary: str
    min_args: int
    max_args: int | None  # None: no upper bound
    #: ``run(client, args) -> Reply``; with ``streams``, ``run(client, args, emit)``, which may
    #: emit lines before it returns. None: handled by the front end or by :func:`execute`.
    run: Callable[..., "Reply"] | None
    streams: bool = False

    @property
    def usage(self) -> str:
        return f"{self.name} {self.args}".rstrip()


# -- replies and their printing ---------------------------------------------------------


@dataclass(frozen=True)
class Status:
    """A reply printed as it is (``OK``, tables, help); ``raw``: what ``--raw`` prints instead."""

    text: str
    raw: str | None = None


#: What a command returns: None prints ``(nil)``, an int ``(integer) N``, bytes a quoted
#: string, a list a numbered array (nested lists indent), a :class:`Status` its text.
Reply = Union[None, int, bytes, Status, list[Any]]

_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t", "\a": "\\a", "\b": "\\b"}


def _enc(text: str) -> bytes:
    """A typed word as bytes: UTF-8, with the surrogates of non-UTF-8 bytes turned back into them."""
    return text.encode("utf-8", "surrogateescape")


def _dec(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def format_value(value: bytes) -> str:
    r"""``value`` in double quotes as redis-cli shows it: ``\\``, ``\"``, ``\n``, ``\r``,
    ``\t``, ``\a``, ``\b`` escaped, and every byte that is not part of printable UTF-8 text as
    ``\xNN``; printable UTF-8 text (spaces included) as it is. ``""`` for an empty value."""
    out = ['"']
    for ch in _dec(value):
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif "\udc80" <= ch <= "\udcff":  # a byte that is not UTF-8
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        elif ch.isprintable():
            out.append(ch)
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode("utf-8"))
    out.append('"')
    return "".join(out)


def render(reply: Reply, raw: bool = False) -> str:
    """The text redis-cli prints for ``reply`` (``raw``: as ``redis-cli --raw`` prints it:
    strings as they are, nil as an empty line, integers bare, arrays one element a line)."""
    if reply is None:
        return "" if raw else "(nil)"
    if isinstance(reply, Status):
        return reply.raw if raw and reply.raw is not None else reply.text
    if isinstance(reply, bool):
        reply = int(reply)
    if isinstance(reply, int):
        return str(reply) if raw else f"(integer) {reply}"
    if isinstance(reply, bytes):
        return _dec(reply) if raw else format_value(reply)
    if raw:
        return "\n".join(render(item, raw) for item in reply)
    if not reply:
        return "(empty array)"
    width = len(str(len(reply)))
    lines = []
    for i, item in enumerate(reply, 1):
        label = f"{i:>{width}}) "
        sub = render(item).split("\n")
        lines.append(label + sub[0])
        lines.extend(" " * len(label) + rest for rest in sub[1:])
    return "\n".join(lines)


def as_token(key: str) -> str:
    """``key`` as a word to type: bare when it is plain printable text, else quoted and escaped."""
    if key and all(ch.isprintable() and not ch.isspace() and ch not in "\"'\\" for ch in key):
        return key
    return format_value(_enc(key))


# -- splitting a command line (redis-cli's sdssplitargs) ----------------------------------

_HEX = "0123456789abcdefABCDEF"
_BACKSLASHED = {"n": "\n", "r": "\r", "t": "\t", "b": "\b", "a": "\a"}


def split_args(line: str) -> list[str]:
    r"""The words of ``line`` as redis-cli splits them.

    Words are separated by whitespace. In double quotes ``\xNN`` is the byte NN, ``\n``
    ``\r`` ``\t`` ``\b`` ``\a`` the control characters, and ``\`` before any other
    character that character (``\"``, ``\\``); in single quotes only ``\'`` is an
    escape. A closing quote must end the word. Raises :class:`CommandError` otherwise.
    """
    args: list[str] = []
    i, n = 0, len(line)
    while True:
        while i < n and line[i].isspace():
            i += 1
        if i >= n:
            return args
        cur: list[str] = []
        quote = ""
        while True:
            if not quote:
                if i >= n or line[i].isspace():
                    break
                if line[i] in "\"'":
                    quote = line[i]
                else:
                    cur.append(line[i])
                i += 1
                continue
            if i >= n:
                raise CommandError("unbalanced quotes")
            c = line[i]
            if c == quote:
                if i + 1 < n and not line[i + 1].isspace():
                    raise CommandError("a closing quote must be followed by a space")
                i += 1
                break
            if c == "\\" and quote == "'" and line[i + 1 : i + 2] == "'":
                cur.append("'")
                i += 2
                continue
            if c == "\\" and quote == '"' and i + 1 < n:
                hex_digits = line[i + 2 : i + 4]
                if line[i + 1] == "x" and len(hex_digits) == 2 and all(h in _HEX for h in hex_digits):
                    byte = int(hex_digits, 16)
                    cur.append(chr(byte) if byte < 0x80 else chr(0xDC00 + byte))  # surrogateescape
                    i += 4
                else:
                    cur.append(_BACKSLASHED.get(line[i + 1], line[i + 1]))
                    i += 2
                continue
            cur.append(c)
            i += 1
        args.append("".join(cur))


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
        rows.append(
            [
                name,
                str(s.get("epoch")),
                member(writer, "") if writer else "-",
                ", ".join(replicas) or "-",
                format_slots(s.get("slots") or []),
            ]
        )
    table = format_table(["SHARD", "EPOCH", "WRITER", "REPLICAS", "SLOTS"], rows)
    writer_of = {s.get("id"): s.get("writer") or "" for s in cluster.get("shards", [])}
    moving = [
        [
            str(m.get("id")),
            format_slots([m.get("slots")]),
            str(m.get("source")),
            str(m.get("target")),
            str(m.get("state")),
            _progress(writer_infos.get(writer_of.get(m.get("target"), "")), m.get("id")),
        ]
        for m in cluster.get("migrations") or []
    ]
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


def node_status(
    cluster: Mapping[str, Any], writer_infos: Mapping[str, Mapping[str, Any] | None] | None = None
) -> dict[str, str]:
    """Each node's status, the one both tables show: ZooKeeper's (``up``/``down``), or
    :data:`UNREACHABLE` for an up node whose ``info()`` was asked for and did not come."""
    status = {str(n.get("id")): str(n.get("status")) for n in cluster.get("nodes", [])}
    for nid, info in (writer_infos or {}).items():
        if info is None and status.get(nid) == "up":
            status[nid] = UNREACHABLE
    return status


def format_nodes(cluster: Mapping[str, Any], writer_infos: Mapping[str, Mapping[str, Any] | None] | None = None) -> str:
    """The node table of a ``cluster_info()`` answer: id, addr, role, shard, status
    (:func:`node_status`: give the ``writer_infos`` the shard table was made with)."""
    status = node_status(cluster, writer_infos)
    return format_table(
        ["ID", "ADDR", "ROLE", "SHARD", "STATUS"],
        [
            [_scalar(n.get(f)) for f in ("id", "addr", "role", "shard")] + [status[str(n.get("id"))]]
            for n in cluster.get("nodes", [])
        ],
    )


# -- commands ----------------------------------------------------------------------


def _get(client: "Client", args: list[str]) -> Reply:
    value = client.get(_enc(args[0]))
    assert value is None or isinstance(value, bytes)  # no with_meta: the value
    return value


#: ``cas``'s EXPECTED for "the key is absent" (what ``get`` prints for a missing key)
ABSENT = "(nil)"
OK = Status("OK")


def _seconds(word: str, text: str) -> float:
    """A positive, finite number of seconds (``EX``, ``expire``)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value * 1000 <= MAX_TTL_MS):
        raise CommandError(f"{word} must be a positive number of seconds (at most {MAX_TTL_MS // 1000}), not {text!r}")
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


def _set(client: "Client", args: list[str]) -> Reply:
    options = _options(args[2:], ("EX", "PX", "NX", "XX"))
    return OK if client.set(_enc(args[0]), _enc(args[1]), **options) else None


def _cas(client: "Client", args: list[str]) -> Reply:
    options = _options(args[3:], ("EX", "PX"))
    expected = None if args[1] == ABSENT else _enc(args[1])
    return OK if client.cas(_enc(args[0]), expected, _enc(args[2]), **options) else None


def _amount(args: list[str]) -> int:
    if len(args) < 2:
        return 1
    try:
        amount = int(args[1])
    except ValueError:
        amount = None
    if amount is None or not -(2**63) < amount < 2**63:
        raise CommandError(f"the amount must be a 64-bit integer, not {args[1]!r}")
    return amount


def _incr(client: "Client", args: list[str]) -> Reply:
    return client.incr(_enc(args[0]), _amount(args))


def _decr(client: "Client", args: list[str]) -> Reply:
    return client.decr(_enc(args[0]), _amount(args))


def _ttl(client: "Client", args: list[str]) -> Reply:
    key = _enc(args[0])
    left = client.ttl(key)
    if left is not None:
        return Status(f"{left:.3f} s", raw=f"{left:.3f}")
    return Status("(no expiry)", raw="-1") if client.exists(key) else None


def _expire(client: "Client", args: list[str]) -> Reply:
    return int(client.expire(_enc(args[0]), _seconds("seconds", args[1])))


def _persist(client: "Client", args: list[str]) -> Reply:
    return int(client.persist(_enc(args[0])))


def _getm(client: "Client", args: list[str]) -> Reply:
    meta = client.get(_enc(args[0]), with_meta=True)
    if meta is None:
        return None
    assert not isinstance(meta, bytes)
    expires = "never"
    if meta.expires_at is not None:
        when = datetime.fromtimestamp(meta.expires_at, timezone.utc).isoformat(timespec="milliseconds")
        expires = f"{meta.expires_at:.3f} ({when})"
    return Status(format_mapping({"value": format_value(meta.value), "revision": meta.revision, "expires_at": expires}))


def _del(client: "Client", args: list[str]) -> Reply:
    return sum(1 for key in args if client.delete(_enc(key)))


def _exists(client: "Client", args: list[str]) -> Reply:
    """How many of the keys exist (a key given twice counts twice, as in Redis)."""
    return sum(1 for key in args if client.exists(_enc(key)))


def _mget(client: "Client", args: list[str]) -> Reply:
    return list(client.mget([_enc(k) for k in args]))


def _mset(client: "Client", args: list[str]) -> Reply:
    if len(args) % 2:
        raise UsageError
    client.mset({_enc(k): _enc(v) for k, v in zip(args[::2], args[1::2])})
    return OK


def encode_cursor(last_key: bytes) -> bytes:
    """The cursor of a scan that goes on after ``last_key``: its hex (never ``0``: keys are not empty)."""
    return last_key.hex().encode()


def decode_cursor(cursor: str) -> bytes | None:
    """Where a scan resumes (None: from the start, cursor ``0``)."""
    if cursor == "0":
        return None
    try:
        last = bytes.fromhex(cursor)
    except ValueError:
        last = b""
    if not last:
        raise CommandError(f"invalid cursor {cursor!r}: give 0 to start, then the cursor the last scan printed")
    return last + b"\x00"  # the smallest key after it


_GLOB = re.compile(r"[*?\[\\]")


def match_prefix(pattern: str) -> tuple[bytes, bytes | None]:
    """A MATCH argument as ``(prefix to scan, glob the keys must match or None)``: a plain
    word, or one ending in a single ``*``, is a prefix; any other glob (``*``, ``?``, ``[...]``)
    is matched against each key of the pages (as Redis does, a page may then show fewer keys)."""
    raw = _enc(pattern)
    m = _GLOB.search(pattern)
    if m is None:
        return raw, None
    head = _enc(pattern[: m.start()])
    if pattern[m.start() :] == "*":
        return head, None
    return head, raw


def _scan(client: "Client", args: list[str]) -> Reply:
    """``[next cursor, [keys]]``: up to COUNT keys in key order after CURSOR, with PREFIX;
    the next cursor is ``0`` once the keys are exhausted."""
    words = list(args)
    cursor = "0"
    if words and words[0].upper() not in ("MATCH", "COUNT"):
        cursor = words.pop(0)
    given: dict[str, str] = {}
    while words:
        if len(words) < 2 or words[0].upper() not in ("MATCH", "COUNT") or words[0].upper() in given:
            raise UsageError
        given[words[0].upper()] = words[1]
        words = words[2:]
    text = given.get("COUNT", str(DEFAULT_SCAN_COUNT))
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) <= MAX_SCAN_COUNT:
        raise CommandError(f"COUNT must be a whole number in 1..{MAX_SCAN_COUNT}, not {text!r}")
    count = int(text)
    start = decode_cursor(cursor)
    prefix, glob = match_prefix(given.get("MATCH", ""))
    page = [k for k, _ in client.scan(prefix, start=start, limit=count + 1, page_size=min(count + 1, 1000))]
    more = len(page) > count
    page = page[:count]
    keys: list[Reply] = [k for k in page if glob is None or fnmatch.fnmatchcase(k, glob)]
    return [encode_cursor(page[-1]) if more else b"0", keys]


def format_event(event: Any) -> str:
    """One watch event as a line: ``set "KEY" "VALUE" (rev N)``, ``delete "KEY" (rev N)``."""
    value = f" {format_value(event.value)}" if event.type == "set" else ""
    return f"{event.type} {format_value(event.key)}{value} (rev {event.revision})"


def _watch(client: "Client", args: list[str]) -> Reply:
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
        return Status(f"({seen} event{'' if seen == 1 else 's'}; resume with since={w.revision})")


def _slot(client: "Client", args: list[str]) -> Reply:
    return slot_of(_enc(args[0]))


def _ping(client: "Client", args: list[str]) -> Reply:
    seconds = client.ping(args[0] if args else None)
    return Status(f"PONG ({seconds * 1000:.2f} ms)")


def _dbsize(client: "Client", args: list[str]) -> Reply:
    """Live keys per shard (each counted by its writer) and in all; ``--raw``: the total."""
    counts = client.dbsize()
    total = sum(counts.values())
    rows = [[shard, str(n)] for shard, n in counts.items()] + [["total", str(total)]]
    return Status(format_table(["SHARD", "KEYS"], rows), raw=str(total))


def writer_infos(client: "Client", cluster: Mapping[str, Any]) -> dict[str, Mapping[str, Any] | None]:
    """``info()`` of the writer of every shard with replicas (for their lag) or importing a slot
    range (for the move's progress); None if it does not answer."""
    addr_of = {n.get("id"): n.get("addr") for n in cluster.get("nodes", []) if n.get("status") == "up"}
    importing = {m.get("target") for m in cluster.get("migrations") or []}
    infos: dict[str, Mapping[str, Any] | None] = {}
    for s in cluster.get("shards", []):
        writer = s.get("writer")
        if (
            not writer
            or not (s.get("replicas") or s.get("id") in importing)
            or writer in infos
            or not addr_of.get(writer)
        ):
            continue
        try:
            infos[writer] = client.info(addr_of[writer])
        except DKVError:
            infos[writer] = None
    return infos


def _info(client: "Client", args: list[str]) -> Reply:
    cluster = client.cluster_info()
    shards = format_shards(cluster, writer_infos(client, cluster))
    if cluster.get("mode") == "standalone":
        return Status(f"{format_mapping(client.info())}\n\n{shards}")
    return Status(shards)


def _nodes(client: "Client", args: list[str]) -> Reply:
    return Status(format_nodes(client.cluster_info()))


#: How often a held ``lock`` checks that its lease is still valid (seconds).
LOCK_CHECK_INTERVAL = 0.2


def _lock(client: "Client", args: list[str], emit: Emit) -> Reply:
    """Acquire lock NAME (waiting as long as it takes), print its token, hold it (renewed in
    the background) until Ctrl-C, then release it."""
    try:
        ttl = float(args[1]) if len(args) > 1 else 10.0
    except ValueError:
        raise UsageError from None
    lock = client.lock(_enc(args[0]), ttl=ttl)
    try:
        lock.acquire()
    except KeyboardInterrupt:
        return Status("(interrupted) not acquired")
    emit(True, f"(integer) {lock.token}\nholding {args[0]!r} (ttl {ttl:g}s, renewed); Ctrl-C releases it")
    try:
        while lock.valid:
            time.sleep(LOCK_CHECK_INTERVAL)
    except KeyboardInterrupt:
        return Status("released" if lock.release() else "released (its lease had already expired)")
    lock.release()
    raise CommandError(f"lost lock {args[0]!r}: its lease expired or another holder took it")


def _help(client: "Client", args: list[str]) -> Reply:
    if args:
        cmd = COMMANDS.get(args[0].lower())
        if cmd is None:
            raise CommandError(unknown_command(args[0]))
        return Status(f"usage: {cmd.usage}\n  {cmd.summary}")
    width = max(len(c.usage) for c in COMMANDS.values())
    lines = [f"{c.usage:<{width}}  {c.summary}" for c in COMMANDS.values()]
    lines.append('\nIn double quotes, "\\xNN" is a byte and \\n \\t \\" \\\\ escape as in redis-cli.')
    return Status("\n".join(lines))


COMMANDS: Mapping[str, Command] = MappingProxyType(
    {
        c.name: c
        for c in (
            Command("get", "KEY", "the value of KEY, or (nil)", 1, 1, _get),
            Command(
                "set",
                "KEY VALUE [EX SECONDS|PX MS] [NX|XX]",
                "set KEY to VALUE, expiring after EX/PX; NX: only if absent, XX: only if present (else (nil))",
                2,
                6,
                _set,
            ),
            Command(
                "cas",
                "KEY EXPECTED NEW [EX SECONDS|PX MS]",
                f"set KEY to NEW only if its value is EXPECTED (else (nil)); EXPECTED {ABSENT}: only if KEY is absent",
                3,
                5,
                _cas,
            ),
            Command(
                "incr",
                "KEY [AMOUNT]",
                "add AMOUNT (default 1) to the integer at KEY (absent: 0); prints the result",
                1,
                2,
                _incr,
            ),
            Command("decr", "KEY [AMOUNT]", "subtract AMOUNT (default 1); see incr", 1, 2, _decr),
            Command("ttl", "KEY", "seconds until KEY expires, (no expiry), or (nil) if absent", 1, 1, _ttl),
            Command("expire", "KEY SECONDS", "make KEY expire SECONDS from now; 1, or 0 if absent", 2, 2, _expire),
            Command("persist", "KEY", "remove KEY's expiry; 1, or 0 if it had none or is absent", 1, 1, _persist),
            Command("getm", "KEY", "KEY's value, revision and expiry (Unix time), or (nil)", 1, 1, _getm),
            Command("del", "KEY [KEY ...]", "delete keys; prints how many existed", 1, None, _del),
            Command("exists", "KEY [KEY ...]", "how many of the keys exist", 1, None, _exists),
            Command("mget", "KEY [KEY ...]", "the values of many keys", 1, None, _mget),
            Command("mset", "KEY VALUE [KEY VALUE ...]", "set many keys", 2, None, _mset),
            Command(
                "scan",
                "[CURSOR] [MATCH PATTERN] [COUNT N]",
                f"COUNT keys (default {DEFAULT_SCAN_COUNT}) in key order from CURSOR (0: the start), with "
                "PATTERN (a prefix, or a glob); prints the next cursor (0: done), then the keys",
                0,
                5,
                _scan,
            ),
            Command(
                "watch",
                "[PREFIX] [COUNT]",
                "print changes of keys with PREFIX as they come (Ctrl-C stops; COUNT: stop after that many)",
                0,
                2,
                _watch,
            ),
            Command("slot", "KEY", "the slot (0..1023) that owns KEY", 1, 1, _slot),
            Command(
                "lock",
                "NAME [TTL]",
                "acquire lock NAME, print its fencing token, hold it until Ctrl-C",
                1,
                2,
                _lock,
                streams=True,
            ),
            Command("ping", "[ADDR]", "PONG and the round trip to a node (any node, or ADDR)", 0, 1, _ping),
            Command("dbsize", "", "the number of keys, per shard and in all", 0, 0, _dbsize),
            Command("info", "", "the cluster's shards (and the node's status when standalone)", 0, 0, _info),
            Command("nodes", "", "the cluster's nodes: id, address, role, shard, status", 0, 0, _nodes),
            Command(
                "latency",
                "[ON|OFF]",
                "show each command's round trip after its reply (no argument: toggle)",
                0,
                1,
                None,
            ),
            Command("help", "[COMMAND]", "list the commands, or show one command's usage", 0, 1, _help),
            Command("exit", "", "leave (also: quit, Ctrl-D)", 0, 0, None),
            Command("quit", "", "leave", 0, 0, None),
        )
    }
)

#: option words (literals in the usage lines) of each command, completed and hinted as such
OPTION_WORDS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "set": ("EX", "PX", "NX", "XX"),
        "cas": ("EX", "PX"),
        "scan": ("MATCH", "COUNT"),
        "latency": ("ON", "OFF"),
    }
)
#: usage placeholders whose words are keys (completed from the keys seen)
KEY_PLACEHOLDERS = frozenset({"KEY", "PREFIX", "PATTERN"})


# -- argument hints ------------------------------------------------------------------------


@dataclass(frozen=True)
class Group:
    """One element of a usage line: ``KEY``, ``[AMOUNT]``, ``[EX SECONDS|PX MS]``, ``[KEY ...]``."""

    text: str
    optional: bool
    variadic: bool
    words: tuple[str, ...]  # inside the brackets, "..." dropped (first alternative)
    #: alternatives led by an option word, each as its words (``("EX", "SECONDS")``)
    options: tuple[tuple[str, ...], ...]


def usage_groups(cmd: Command) -> list[Group]:
    """``cmd``'s usage split into :class:`Group` s (brackets kept together)."""
    literals = OPTION_WORDS.get(cmd.name, ())
    groups: list[Group] = []
    depth, cur = 0, ""
    for ch in cmd.args + " ":
        depth += (ch == "[") - (ch == "]")
        if ch == " " and depth == 0:
            if cur:
                optional = cur.startswith("[")
                inner = cur[1:-1] if optional else cur
                variadic = inner.endswith("...")
                alts = [a.split() for a in inner.split("|")]
                options = tuple(tuple(a) for a in alts if a and a[0] in literals)
                words = tuple(w for w in alts[0] if w != "...")
                groups.append(Group(cur, optional, variadic, words, options))
            cur = ""
        else:
            cur += ch
    return groups


@dataclass
class ArgState:
    """Where the arguments typed so far leave a command's usage line."""

    positional: int  # index into the positional groups of the next one
    used_options: set[int]  # indexes (into all groups) of the option groups given
    placeholder: str | None  # the placeholder the next word fills, if known
    pending: tuple[str, ...] = ()  # the value words an option given last still needs


def arg_state(cmd: Command, args: Sequence[str]) -> ArgState:
    """Walk ``args`` along ``cmd``'s usage: option words (any order, once each) take their
    group, other words the next positional group (a variadic group takes all that follow)."""
    groups = usage_groups(cmd)
    positional = [g for g in groups if not g.options]
    option_groups = [(i, g) for i, g in enumerate(groups) if g.options]
    pi, used, i, var_at = 0, set(), 0, None
    placeholder: str | None = None
    pending: tuple[str, ...] = ()
    while i < len(args):
        word = args[i].upper()
        hit = next(
            ((gi, alt) for gi, g in option_groups if gi not in used for alt in g.options if alt[0] == word), None
        )
        if hit is not None:
            used.add(hit[0])
            if i + len(hit[1]) > len(args):  # the option's value comes next
                pending = hit[1][len(args) - i :]
                placeholder = pending[0]
            i += len(hit[1])
            continue
        if pi < len(positional):
            if positional[pi].variadic:
                var_at = i if var_at is None else var_at
            else:
                pi += 1
        i += 1
    if placeholder is None and pi < len(positional):
        g = positional[pi]
        placeholder = (
            g.words[(len(args) - var_at) % len(g.words)]
            if g.variadic and var_at is not None
            else (g.words[0] if g.words else None)
        )
    if args and args[-1].upper() == "MATCH" and cmd.name == "scan":
        placeholder = "PATTERN"
    return ArgState(pi, used, placeholder, pending)


def hint(cmd: Command, args: Sequence[str]) -> str:
    """What is left of ``cmd``'s usage after ``args``, as redis-cli hints it after the cursor."""
    groups = usage_groups(cmd)
    state = arg_state(cmd, args)
    positional = [g for g in groups if not g.options]
    rest_positional = {id(g) for g in positional[state.positional :]}
    left = list(state.pending) + [
        g.text for i, g in enumerate(groups) if (g.options and i not in state.used_options) or id(g) in rest_positional
    ]
    return " ".join(left)


def toolbar_text(line: str) -> str:
    """The bottom toolbar for the line typed so far: the usage and summary of its command,
    the commands its first word may start, or a did-you-mean for an unknown command."""
    words = line.split()
    typing = bool(line) and not line[-1].isspace()
    if not words:
        return "type a command ('help' lists them); Tab completes"
    name = words[0].lower()
    if len(words) == 1 and typing:
        names = [c for c in COMMANDS if c.startswith(name)]
        if len(names) == 1 or name in COMMANDS:
            only = COMMANDS[name if name in COMMANDS else names[0]]
            return f"{only.usage}  - {only.summary}"
        if names:
            return "  ".join(names)
    cmd = COMMANDS.get(name)
    if cmd is None:
        return unknown_command(words[0])
    return f"{cmd.usage}  - {cmd.summary}"


# -- session state -------------------------------------------------------------------------


class SeenKeys:
    """The keys this session typed or was shown, most recent last, at most ``limit``."""

    def __init__(self, limit: int = MAX_SEEN_KEYS) -> None:
        self.limit = limit
        self._keys: OrderedDict[str, None] = OrderedDict()

    def add(self, key: str) -> None:
        if not key:
            return
        self._keys[key] = None
        self._keys.move_to_end(key)
        while len(self._keys) > self.limit:
            self._keys.popitem(last=False)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def matching(self, typed: str) -> list[str]:
        """Keys whose typed form starts with ``typed`` (bare, or quoted when it opens a quote),
        sorted."""
        if typed.startswith('"'):
            return sorted(
                k for k in self._keys if as_token(k).startswith(typed) or format_value(_enc(k)).startswith(typed)
            )
        return sorted(k for k in self._keys if k.startswith(typed) or as_token(k).startswith(typed))


@dataclass
class CliState:
    """What one CLI session keeps between commands."""

    raw: bool = False
    latency: bool = False
    keys: SeenKeys = field(default_factory=SeenKeys)

    def note(self, cmd: Command, args: Sequence[str], reply: Reply) -> None:
        """Remember the keys among ``args`` and in ``reply`` (a scan's page) for completion."""
        for i in range(len(args)):
            if arg_state(cmd, args[:i]).placeholder in KEY_PLACEHOLDERS and cmd.name not in ("watch", "scan"):
                self.keys.add(args[i])
        if cmd.name == "scan" and isinstance(reply, list) and len(reply) == 2 and isinstance(reply[1], list):
            for key in reply[1]:
                if isinstance(key, bytes):
                    self.keys.add(_dec(key))


def is_exit(line: str) -> bool:
    """Whether ``line`` is the ``exit``/``quit`` command."""
    words = line.split()
    return len(words) == 1 and words[0].lower() in EXIT_WORDS


def execute(client: "Client", line: str, emit: Emit | None = None, state: CliState | None = None) -> Result:
    """Run one command line; ``(ok, text to print)``. Never raises for a failing command.

    ``emit`` receives what a streaming command (``lock``) prints before it ends
    (default: printed to stdout); ``state``: the session's options and keys seen."""
    try:
        argv = split_args(line)
    except CommandError as e:  # e.g. an unbalanced quote
        return False, f"(error) {e}"
    return execute_argv(client, argv, emit, state)


def execute_argv(
    client: "Client", argv: Sequence[str], emit: Emit | None = None, state: CliState | None = None
) -> Result:
    """:func:`execute` of a line already split into words (one-shot mode: the shell split it)."""
    state = state if state is not None else CliState()
    if not argv:
        return True, ""
    cmd = COMMANDS.get(argv[0].lower())
    if cmd is None:
        return False, f"(error) {unknown_command(argv[0])}"
    args = list(argv[1:])
    if len(args) < cmd.min_args or (cmd.max_args is not None and len(args) > cmd.max_args):
        return False, f"(error) usage: {cmd.usage}"
    if cmd.name == "latency":
        if args and args[0].lower() not in ("on", "off"):
            return False, f"(error) usage: {cmd.usage}"
        state.latency = args[0].lower() == "on" if args else not state.latency
        return True, f"latency display {'on' if state.latency else 'off'}"
    if cmd.run is None:  # exit/quit: the front end leaves before calling execute
        return True, ""
    began = time.perf_counter()
    try:
        if cmd.streams:
            reply = cmd.run(client, args, emit or _print_plain)
        else:
            reply = cmd.run(client, args)
        ok, text = True, render(reply, state.raw)
        state.note(cmd, args, reply)
    except UsageError:
        ok, text = False, f"(error) usage: {cmd.usage}"
    except CommandError as e:
        ok, text = False, f"(error) {e}"
    except KeyboardInterrupt:
        raise
    except Exception as e:  # a DKVError from the client (or, if ever, a bug): one line, no traceback
        ok, text = False, f"(error) {type(e).__name__}: {e}"
    if state.latency:
        text += f"\n({(time.perf_counter() - began) * 1000:.1f} ms)"
    return ok, text


# -- front ends ------------------------------------------------------------------------


def run_lines(client: "Client", lines: Iterable[str], emit: Emit, state: CliState | None = None) -> int:
    """Run one command per line (blank and ``#`` lines skipped); 0 if all succeeded, else 1."""
    state = state if state is not None else CliState()
    failed = False
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if is_exit(line):
            break
        ok, text = execute(client, line, emit, state)
        failed = failed or not ok
        emit(ok, text)
    return 1 if failed else 0


def _print_plain(ok: bool, text: str) -> None:
    """One reply and a newline on stdout, bytes that are not UTF-8 (``--raw``) as they are.
    An empty reply (raw nil, raw empty value) still prints its line."""
    data = (text + "\n").encode("utf-8", "surrogateescape")
    out = getattr(sys.stdout, "buffer", None)
    if out is None:
        sys.stdout.write(data.decode("utf-8", "replace"))
        sys.stdout.flush()
        return
    sys.stdout.flush()
    out.write(data)
    out.flush()


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


def _line_parts(text: str) -> tuple[list[str], str] | None:
    """``(finished words, the word being typed)`` of a partial line, quotes honoured; None if
    the finished part does not split (an unbalanced quote before the last word)."""
    start, i, quote = len(text), 0, ""
    in_word = False
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\" and quote == '"':
                i += 1
            elif ch == quote:
                quote = ""
        elif ch.isspace():
            in_word = False
        else:
            if not in_word:
                start, in_word = i, True
            if ch in "\"'":
                quote = ch
        i += 1
    current = text[start:] if in_word or quote else ""
    try:
        return split_args(text[: len(text) - len(current)]), current
    except CommandError:
        return None


def make_session(addr: str, history: "History", state: CliState | None = None) -> "PromptSession[str]":
    """The interactive prompt: ``dkv ADDR> `` (ADDR: a node, or ``zk:HOSTS``) with completion of
    command names, options and keys seen (:func:`command_completer`), the rest of the command's
    usage hinted after the cursor, and its usage and summary (or a did-you-mean) in the bottom toolbar."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.application.current import get_app
    from prompt_toolkit.layout.processors import Processor, Transformation
    from prompt_toolkit.styles import Style

    state = state if state is not None else CliState()

    class _Hint(Processor):
        """redis-cli's hints: the rest of the usage line, grey, after the cursor at the end of the line."""

        def apply_transformation(self, ti: Any) -> Any:
            doc = ti.document
            if ti.lineno != doc.line_count - 1 or not doc.is_cursor_at_the_end:
                return Transformation(ti.fragments)
            text = inline_hint(doc.text)
            return Transformation(ti.fragments + [("class:hint", text)] if text else ti.fragments)

    def toolbar() -> str:
        return toolbar_text(get_app().current_buffer.document.text_before_cursor)

    style = Style.from_dict({"hint": "#888888", "bottom-toolbar": "noreverse bg:#303030 #d0d0d0"})
    return PromptSession(
        f"dkv {addr}> ",
        history=history,
        completer=command_completer(state.keys),
        complete_while_typing=True,
        bottom_toolbar=toolbar,
        input_processors=[_Hint()],
        style=style,
    )


def inline_hint(text: str) -> str:
    """The hint shown after the cursor at the end of ``text`` (empty when there is none)."""
    parts = _line_parts(text)
    if parts is None:
        return ""
    done, current = parts
    words = done + ([current] if current else [])
    if not words:
        return ""
    cmd = COMMANDS.get(words[0].lower())
    if cmd is None or (len(words) == 1 and current and current.lower() != cmd.name):  # typing its name
        return ""
    rest = hint(cmd, words[1:])
    return (" " + rest if current else rest) if rest else ""


def command_completer(keys: SeenKeys | None = None) -> Any:
    """Completes command names (first word, and after ``help``), the option words of
    ``set``/``cas``/``scan``/``latency`` (:data:`OPTION_WORDS`) once their required arguments
    are typed, and keys seen in this session (``keys``) where the usage expects a key."""
    from prompt_toolkit.completion import Completer, Completion, WordCompleter

    names = WordCompleter(list(COMMANDS), ignore_case=True)

    class _Completer(Completer):
        def get_completions(self, document: Any, complete_event: Any) -> Any:
            parts = _line_parts(document.text_before_cursor)
            if parts is None:
                return
            done, word = parts
            if not done or (len(done) == 1 and done[0].lower() == "help"):
                yield from names.get_completions(document, complete_event)
                return
            cmd = COMMANDS.get(done[0].lower())
            if cmd is None:
                return
            args = done[1:]
            state = arg_state(cmd, args)
            if keys is not None and state.placeholder in KEY_PLACEHOLDERS:
                for key in keys.matching(word):
                    yield Completion(as_token(key), start_position=-len(word), display=as_token(key))
            options = OPTION_WORDS.get(cmd.name, ())
            if not options or len(args) < cmd.min_args or state.pending:
                return
            used = {w.upper() for w in args}
            for option in options:
                if option not in used and option.startswith(word.upper()):
                    yield Completion(option, start_position=-len(word))

    return _Completer()


def repl_loop(client: "Client", session: "PromptSession[str]", emit: Emit, state: CliState | None = None) -> int:
    """Prompt until exit/quit/Ctrl-D; Ctrl-C clears the line (or abandons a running command)."""
    state = state if state is not None else CliState()
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
            ok, text = execute(client, line, emit, state)
        except KeyboardInterrupt:
            ok, text = False, "(interrupted)"
        emit(ok, text)


def _print_styled(ok: bool, text: str) -> None:
    from prompt_toolkit import print_formatted_text
    from prompt_toolkit.formatted_text import FormattedText

    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")  # --raw bytes
    print_formatted_text(FormattedText([("" if ok else "ansired", text)]))


#: ``dkv cli``'s liveness (:class:`dkv.Client`): a stopped or paused node is reported after
#: about this many seconds of silence, not the library's 2 (a person is waiting on the prompt)
INTERACTIVE_LIVENESS = 1.0


_ADDR = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[^\s:\[\]]+):\d+(,(\[[0-9a-fA-F:.]+\]|[^\s:\[\]]+):\d+)*$")


def split_command(words: Sequence[str]) -> tuple[list[str], list[str]]:
    """``dkv cli`` positional words as ``(addresses, command)``: the leading ``HOST:PORT`` words
    (each may be a comma-separated list) are addresses, the rest one command to run."""
    i = 0
    while i < len(words) and _ADDR.match(words[i]):
        i += 1
    return list(words[:i]), list(words[i:])


def run_cli(
    addrs: list[str],
    timeout: float,
    zk: str = "",
    auth: str | None = None,
    *,
    raw: bool = False,
    latency: bool = False,
    command: Sequence[str] = (),
) -> int:
    """``dkv cli``: run ``command`` and exit (one-shot), else interactive on a terminal, else run
    commands from stdin; exit status 0 if every command succeeded, else 1.

    With ``zk`` the client takes the cluster map from ZooKeeper (``addrs`` may be empty).
    ``raw``: print replies as ``redis-cli --raw`` does; ``latency``: print each command's round trip.
    """
    from dkv.client.client import DEFAULT_ADDR, Client

    # kazoo reports reconnects as warnings; the CLI reports failed commands itself.
    logging.getLogger("kazoo").setLevel(logging.ERROR)
    state = CliState(raw=raw, latency=latency)
    client = Client(addrs, zk=zk or None, timeout=timeout, auth=auth or None, liveness=INTERACTIVE_LIVENESS)
    try:
        if command:
            ok, text = execute_argv(client, command, _print_plain, state)
            _print_plain(ok, text)
            return 0 if ok else 1
        if not sys.stdin.isatty():
            if hasattr(sys.stdin, "reconfigure"):
                sys.stdin.reconfigure(errors="surrogateescape")  # non-UTF-8 bytes pass through
            return run_lines(client, sys.stdin, _print_plain, state)
        target = f"zk:{zk}" if zk else (addrs[0] if addrs else DEFAULT_ADDR)
        print(f"dkv {target}: type 'help' for commands, 'exit' or Ctrl-D to leave")
        session = make_session(target, open_history(history_path()), state)
        return repl_loop(client, session, _print_styled, state)
    finally:
        client.close()
