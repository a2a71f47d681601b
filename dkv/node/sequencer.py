"""The writer's sequencer: every decision a write needs, taken once, turned into plain records.

Pure (no I/O, no clock of its own): the write pipeline (:mod:`dkv.node.pipeline`)
hands it the commands of a batch, the batch's ``(epoch, first lsn)`` and the
time, and gets back the records to log and one result per command. Conditions
(``nx``/``xx``, ``cas``, ``delete(if_value=)``), increments and expiry
decisions are evaluated here, against the committed state (``read``) overlaid
with the batches in flight and the batch in progress, and the outcome is a
plain ``PUT``/``DELETE``/``EXPIRE`` record: replicas and a promoted writer apply
it without re-evaluating a condition or reading a clock, so members converge
(G3) and failover changes nothing (DESIGN §11). A condition that fails writes
nothing.

**Revisions.** Every record gets a revision, strictly increasing along the log:
``max(last + 1, now_ms << REV_SHIFT)``. Hybrid: it never goes back (a new
writer starts above the last revision of its log, whatever its clock says),
and it stays close to wall time, so revisions of different shards are roughly
comparable (a watch over several shards resumes from one revision). A
migration raises the target's floor above every revision the source gave
(:attr:`Write.floor`), so the revisions of a slot keep increasing when it moves:
lock tokens, which are revisions, too.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Iterable, Sequence

from dkv.errors import DKVError, InvalidArgument
from dkv.storage import entry as entries
from dkv.storage.entry import Entry
from dkv.wal.record import Op, Record

#: revisions are ``ms << REV_SHIFT`` plus a counter: about a million writes per millisecond
REV_SHIFT = 20
#: the range of an ``incr`` result (a signed 64-bit integer, as Redis)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class Kind(Enum):
    SET = "set"  # value, px, cond ("nx" | "xx" | None) -> revision | None
    CAS = "cas"  # expected (None: absent), value, px -> revision | None
    DELETE = "del"  # expected: if_value (None: unconditional) -> bool
    INCR = "incr"  # amount -> the new integer
    EXPIRE = "expire"  # px -> bool (the key exists and got the deadline)
    PERSIST = "persist"  # -> bool (the key existed and had a deadline)
    EXPIRE_DUE = "expire_due"  # deadline -> bool (the expirer: the entry expired and is removed)
    IMPORT = "import"  # value: a stored entry (migration copy) -> None
    PURGE = "purge"  # -> None (migration range delete; no watch event)
    FLOOR = "floor"  # floor: raise the revision floor -> None


@dataclass(frozen=True, slots=True)
class Write:
    """One write command as the pipeline takes it."""

    kind: Kind
    key: bytes
    value: bytes = b""
    #: CAS: the value expected (None: the key must be absent); DELETE: ``if_value``
    expected: bytes | None = None
    #: SET/CAS/EXPIRE: time to live in milliseconds (None: no deadline)
    px: int | None = None
    #: SET: "nx" (only if absent) or "xx" (only if present)
    cond: str | None = None
    #: INCR: the amount
    amount: int = 0
    #: EXPIRE_DUE: the deadline the expiry index showed; FLOOR: the revision floor
    deadline: int = 0

    @property
    def size(self) -> int:
        """Bytes of key and values (what the write counts against a batch's budget)."""
        return len(self.key) + len(self.value) + len(self.expected or b"")


def put(key: bytes, value: bytes) -> Write:
    return Write(Kind.SET, key, value)


def delete(key: bytes) -> Write:
    return Write(Kind.DELETE, key)


def parse_int(value: bytes) -> int:
    """The integer an ``incr`` reads: ASCII decimal, optional leading ``-``, as Redis."""
    text = value.decode("ascii", "replace")
    body = text[1:] if text.startswith("-") else text
    if not body.isascii() or not body.isdigit() or (len(body) > 1 and body[0] == "0") or len(text) > 20:
        raise InvalidArgument("the value is not an integer (incr/decr need an ASCII decimal)")
    n = int(text)
    if not INT64_MIN <= n <= INT64_MAX:
        raise InvalidArgument("the value is out of the 64-bit integer range")
    return n


class Sequencer:
    """Turns batches of :class:`Write` into records and results (see the module docstring).

    ``read(key)`` is the committed entry of a key, expired or not (None: absent).
    Keys written by batches in flight are overlaid until :meth:`settled` says
    their batch was answered (committed or failed: after a failure every later
    batch fails too, and the store tells again).
    """

    def __init__(self, read: Callable[[bytes], Entry | None], last_rev: int = 0) -> None:
        self._read = read
        self.last_rev = last_rev
        #: key -> (entry as the batches in flight leave it, last lsn of its batch)
        #: (a PUT Record stands for the entry it writes)
        self._overlay: dict[bytes, tuple[Entry | Record | None, int]] = {}

    def observe(self, rev: int) -> None:
        """A revision exists in the log (a new writer's log end): never stamp at or below it."""
        self.last_rev = max(self.last_rev, rev)

    def _next_rev(self, now: int) -> int:
        self.last_rev = max(self.last_rev + 1, now << REV_SHIFT)
        return self.last_rev

    def _current(self, key: bytes) -> Entry | Record | None:
        got = self._overlay.get(key)
        return got[0] if got is not None else self._read(key)

    def sequence(
        self, batches: Sequence[Sequence[Write]], epoch: int, lsn: int, now: int
    ) -> tuple[list[Record], list[list[Any]]]:
        """Records for ``batches`` (stamped from ``lsn`` on) and, per submission, one result per
        write (a :class:`DKVError` for a write refused alone; it writes nothing)."""
        records: list[Record] = []
        results: list[list[Any]] = []
        changed: dict[bytes, Entry | Record | None] = {}
        for cmds in batches:
            res: list[Any] = []
            for w in cmds:
                try:
                    rec, result = self._decide(w, changed, epoch, lsn + len(records), now)
                except DKVError as e:
                    res.append(e)
                    continue
                if rec is not None:
                    records.append(rec)
                res.append(result)
            results.append(res)
        if records:
            last = records[-1].lsn
            for key, ent in changed.items():
                self._overlay[key] = (ent, last)
        return records, results

    def settled(self, records: Iterable[Record]) -> None:
        """The batch of ``records`` was answered: its keys are read from the store again."""
        recs = list(records)
        if not recs:
            return
        last = recs[-1].lsn
        for r in recs:
            got = self._overlay.get(r.key)
            if got is not None and got[1] <= last:
                del self._overlay[r.key]

    def _decide(
        self, w: Write, changed: dict[bytes, Entry | Record | None], epoch: int, lsn: int, now: int
    ) -> tuple[Record | None, Any]:
        key = w.key
        kind = w.kind
        if kind is Kind.SET and w.cond is None:  # the hot path: a blind write reads nothing
            rev = self._next_rev(now)
            expires_at = now + w.px if w.px else 0
            rec = Record(epoch, lsn, Op.PUT, key, w.value, rev, expires_at)
            changed[key] = rec  # the record stands for the entry (an Entry is built only if read)
            return rec, rev
        if kind is Kind.FLOOR:  # keyless: reads nothing (a store refuses the empty key)
            self.observe(w.deadline)
            return Record(epoch, lsn, Op.NOOP, b"", b"", self._next_rev(now)), None
        got = changed[key] if key in changed else self._current(key)
        cur = Entry(got.value, got.rev, got.expires_at) if isinstance(got, Record) else got
        live = cur if cur is not None and not cur.expired(now) else None

        def write(value: bytes, expires_at: int) -> tuple[Record, int]:
            rev = self._next_rev(now)
            changed[key] = Entry(value, rev, expires_at)
            return Record(epoch, lsn, Op.PUT, key, value, rev, expires_at), rev

        def remove(op: Op) -> Record:
            assert cur is not None
            changed[key] = None
            return Record(epoch, lsn, op, key, b"", self._next_rev(now), cur.expires_at)

        if kind is Kind.SET:
            if (w.cond == "nx" and live is not None) or (w.cond == "xx" and live is None):
                return None, None
            return write(w.value, now + w.px if w.px else 0)
        if kind is Kind.CAS:
            if (live.value if live is not None else None) != w.expected:
                return None, None
            return write(w.value, now + w.px if w.px else 0)
        if kind is Kind.DELETE:
            if cur is None:
                return None, False
            if live is None:  # expired, not yet removed: remove it as what it is
                return remove(Op.EXPIRE), False
            if w.expected is not None and live.value != w.expected:
                return None, False
            return remove(Op.DELETE), True
        if kind is Kind.INCR:
            n = (parse_int(live.value) if live is not None else 0) + w.amount
            if not INT64_MIN <= n <= INT64_MAX:
                raise InvalidArgument("incr would overflow a 64-bit integer")
            rec, _ = write(str(n).encode("ascii"), live.expires_at if live is not None else 0)
            return rec, n
        if kind is Kind.EXPIRE:
            if live is None:
                return None, False
            assert w.px is not None
            return write(live.value, now + w.px)[0], True
        if kind is Kind.PERSIST:
            if live is None or not live.expires_at:
                return None, False
            return write(live.value, 0)[0], True
        if kind is Kind.EXPIRE_DUE:
            if cur is None or cur.expires_at != w.deadline or not cur.expired(now):
                return None, False
            return remove(Op.EXPIRE), True
        if kind is Kind.IMPORT:
            try:
                e = entries.decode(w.value)
            except ValueError as err:
                raise InvalidArgument(f"an imported entry is malformed: {err}") from None
            changed[key] = e
            return Record(epoch, lsn, Op.IMPORT, key, w.value, self._next_rev(now), e.expires_at), None
        if kind is Kind.PURGE:
            return (remove(Op.PURGE) if cur is not None else None), None
        raise InvalidArgument(f"unknown write {kind!r}")
