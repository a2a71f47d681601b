"""Tests of the write-ahead log: the record codec, and WriteAheadLog's appends, recovery and maintenance."""

from __future__ import annotations

import logging
import os
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import pytest

from dkv.errors import CorruptLog, StorageClosed
from dkv.wal import Op, Record, WriteAheadLog
from dkv.wal import log as wal_log
from dkv.wal.codec import MAX_BODY_BYTES, decode_from, encode, encode_many, find_lsn, find_resync, iter_records


def recs(start: int, n: int, epoch: int = 1, tag: bytes = b"v") -> list[Record]:
    return [Record(epoch, lsn, Op.PUT, b"key-%d" % lsn, tag + b"-%d" % lsn) for lsn in range(start, start + n)]


def segments(d: Path) -> list[Path]:
    return sorted(d.glob("wal-*.log"))


def seg_name(first_lsn: int) -> str:
    return f"wal-{first_lsn:020d}.log"


def frame(body: bytes) -> bytes:
    """A frame with a correct length and CRC around an arbitrary body."""
    return struct.pack("<II", len(body), zlib.crc32(body)) + body


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def read_all(wal: WriteAheadLog) -> list[Record]:
    return list(wal.read_from(wal.first_lsn)) if wal.first_lsn else []


# -- codec -------------------------------------------------------------------


@pytest.mark.parametrize(
    "rec",
    [
        Record(3, 7, Op.PUT, b"k", b"value"),
        Record(0, 1, Op.DELETE, b"gone"),
        Record(1, 2, Op.PUT, b"k", b""),
        Record(2**64 - 1, 2**64 - 1, Op.PUT, b"", b""),
        Record(9, 10, Op.PUT, b"big", os.urandom(1024 * 1024)),
    ],
    ids=["put", "delete", "empty-value", "max-ints-empty-key", "1MiB-value"],
)
def test_codec_roundtrip(rec: Record) -> None:
    data = encode(rec)
    assert decode_from(data, 0) == (rec, len(data))
    assert decode_from(b"xx" + data, 2) == (rec, len(data) + 2)


def test_encode_many_and_iter_records_give_offsets() -> None:
    batch = recs(1, 3)
    data = encode_many(batch)
    assert data == b"".join(encode(r) for r in batch)
    out = list(iter_records(data))
    assert [r for r, _, _ in out] == batch
    assert out[0][1] == 0 and out[-1][2] == len(data)
    assert all(out[i][2] == out[i + 1][1] for i in range(len(out) - 1))


def test_encode_rejects_oversized_record_and_unknown_op() -> None:
    with pytest.raises(ValueError):
        encode(Record(1, 1, Op.PUT, b"k", bytes(MAX_BODY_BYTES)))
    with pytest.raises(ValueError):
        encode(Record(1, 1, 7, b"k"))  # type: ignore[arg-type]


def test_decode_from_returns_none_on_garbage_without_raising() -> None:
    good = encode(Record(1, 1, Op.PUT, b"key", b"value"))
    body = good[8:]
    bad = {
        "empty": b"",
        "short-header": good[:7],
        "short-body": good[:-1],
        "crc-mismatch": good[:-1] + bytes([good[-1] ^ 0xFF]),
        "len-too-small": frame(body[:20]),
        "len-too-big": struct.pack("<II", MAX_BODY_BYTES + 1, 0) + body,
        "unknown-op": frame(body[:16] + b"\x09" + body[17:]),
        "key-len-overflows": frame(body[:33] + struct.pack("<I", 999) + body[37:]),  # past op, rev, expires_at
        "value-len-short": frame(body[: -len(b"value") - 4] + struct.pack("<I", 4) + b"value"),
        "zeros": bytes(64),
    }
    for name, data in bad.items():
        assert decode_from(data, 0) is None, name
    assert decode_from(good, len(good)) is None
    assert decode_from(good, -1) is None
    for cut in range(len(good)):
        assert decode_from(good[:cut], 0) is None


def test_iter_records_stops_at_first_invalid_record() -> None:
    data = encode_many(recs(1, 3))
    out = list(iter_records(data + b"\x00garbage" + encode_many(recs(4, 2))))
    assert [r.lsn for r, _, _ in out] == [1, 2, 3]
    assert out[-1][2] == len(data)


def test_find_lsn_gives_offset_to_resume_iter_records() -> None:
    batch = recs(10, 5)
    data = encode_many(batch)
    for i, rec in enumerate(batch):
        offset = find_lsn(data, rec.lsn)
        assert offset == len(encode_many(batch[:i]))
        assert [r for r, _, _ in iter_records(data, offset)] == batch[i:]
    assert find_lsn(data, 1) == 0
    assert find_lsn(data, 15) == len(data)
    assert find_lsn(b"", 1) == 0


# -- append, reopen ----------------------------------------------------------


def test_fresh_log_is_empty_and_first_append_may_start_anywhere(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path / "wal")
    assert (wal.first_lsn, wal.last_lsn, wal.last_epoch) == (0, 0, 0)
    assert list(wal.read_from(1)) == []
    wal.append(recs(50, 3, epoch=4))
    assert (wal.first_lsn, wal.last_lsn, wal.last_epoch) == (50, 52, 4)
    assert [p.name for p in segments(tmp_path / "wal")] == [seg_name(50)]
    wal.close()


def test_append_then_reopen_returns_all_records(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path)
    batches = [recs(1, 1), recs(2, 10, epoch=2), [Record(2, 12, Op.DELETE, b"key-3")]]
    for batch in batches:
        wal.append(batch)
    wal.close()
    wal = WriteAheadLog(tmp_path)
    assert read_all(wal) == [r for b in batches for r in b]
    assert (wal.first_lsn, wal.last_lsn, wal.last_epoch) == (1, 12, 2)
    wal.append(recs(13, 1, epoch=2))
    assert wal.last_lsn == 13
    wal.close()


def test_append_rejects_an_epoch_going_backwards_and_writes_nothing(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path)
    wal.append(recs(1, 2, epoch=3))
    with pytest.raises(ValueError, match="epoch"):
        wal.append(recs(3, 1, epoch=2))
    with pytest.raises(ValueError, match="epoch"):
        wal.append([Record(4, 3, Op.PUT, b"a"), Record(3, 4, Op.PUT, b"b")])
    assert wal.last_lsn == 2
    wal.close()
    assert WriteAheadLog(tmp_path).last_lsn == 2


def test_append_rejects_non_contiguous_lsns_and_writes_nothing(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path)
    with pytest.raises(ValueError):
        wal.append(recs(0, 2))  # lsn 0 is "no record"
    wal.append(recs(1, 3))
    size = segments(tmp_path)[0].stat().st_size
    bad_batches = [recs(5, 2), recs(3, 2), recs(4, 2) + recs(7, 1), [recs(4, 1)[0]] * 2]
    for batch in bad_batches:
        with pytest.raises(ValueError):
            wal.append(batch)
    assert wal.last_lsn == 3
    assert wal.stats["appends"] == 1
    assert segments(tmp_path)[0].stat().st_size == size
    wal.close()
    wal = WriteAheadLog(tmp_path)
    assert read_all(wal) == recs(1, 3)
    wal.close()


# -- recovery ----------------------------------------------------------------


def test_torn_tail_at_every_offset_of_last_record_is_cut(tmp_path: Path) -> None:
    originals = recs(1, 5)
    wal = WriteAheadLog(tmp_path)
    wal.append(originals)
    wal.close()
    seg = segments(tmp_path)[0]
    data = seg.read_bytes()
    last_start = len(data) - len(encode(originals[-1]))
    replacement = Record(2, 5, Op.PUT, b"key-5", b"after-recovery")
    for cut in range(last_start, len(data)):
        seg.write_bytes(data[:cut])
        wal = WriteAheadLog(tmp_path)
        assert wal.last_lsn == 4, cut
        assert read_all(wal) == originals[:4], cut
        assert seg.stat().st_size == last_start, cut
        wal.append([replacement])
        wal.close()
        wal = WriteAheadLog(tmp_path)
        assert read_all(wal) == originals[:4] + [replacement], cut
        assert wal.last_epoch == 2
        wal.close()


def test_bit_flip_in_last_record_value_drops_that_record(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path)
    wal.append(recs(1, 5))
    wal.close()
    seg = segments(tmp_path)[0]
    flip(seg, seg.stat().st_size - 1)  # last byte of the last record's value
    wal = WriteAheadLog(tmp_path)
    assert wal.last_lsn == 4
    assert read_all(wal) == recs(1, 4)
    wal.close()


def snapshot_dir(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.mark.parametrize("where", [0, 2, 5, 20, 40], ids=["len-low", "len-high", "crc", "lsn", "value"])
def test_flipped_byte_mid_segment_followed_by_valid_records_is_corrupt_log(tmp_path: Path, where: int) -> None:
    """G6: damage followed by valid records is not a torn tail; opening refuses and changes nothing."""
    wal = WriteAheadLog(tmp_path)
    wal.append(recs(1, 10))
    wal.close()
    seg = segments(tmp_path)[0]
    size = seg.stat().st_size
    fifth = len(encode_many(recs(1, 4)))
    flip(seg, fifth + where)
    before = snapshot_dir(tmp_path)
    with pytest.raises(CorruptLog) as info:
        WriteAheadLog(tmp_path)
    message = str(info.value)
    assert str(seg) in message and f"offset {fifth}" in message and "\n" not in message
    assert info.value.data == {"path": str(seg), "offset": fifth, "following_bytes": size - fifth, "last_good_lsn": 4}
    assert snapshot_dir(tmp_path) == before, "a failed open must not touch the log"


def test_damage_spanning_several_records_then_valid_records_is_corrupt_log(tmp_path: Path) -> None:
    """A zeroed 512-byte stretch (several records) with records after it: still corruption."""
    wal = WriteAheadLog(tmp_path)
    wal.append(recs(1, 100))
    wal.close()
    seg = segments(tmp_path)[0]
    data = bytearray(seg.read_bytes())
    tenth = len(encode_many(recs(1, 9)))
    data[tenth + 3 : tenth + 515] = bytes(512)
    seg.write_bytes(bytes(data))
    with pytest.raises(CorruptLog) as info:
        WriteAheadLog(tmp_path)
    assert info.value.data["offset"] == tenth and info.value.data["last_good_lsn"] == 9
    assert seg.read_bytes() == bytes(data)


def test_partial_frame_followed_by_zeros_is_a_torn_tail(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A crash mid-append can leave part of a frame and then zeros (allocated, never written): torn, cut."""
    wal = WriteAheadLog(tmp_path)
    wal.append(recs(1, 5))
    wal.close()
    seg = segments(tmp_path)[0]
    size = seg.stat().st_size
    batch = encode_many(recs(6, 40))
    for torn in (batch[:50] + bytes(4096), batch[: len(batch) // 2] + bytes(10_000), bytes(8192)):
        with seg.open("ab") as f:
            f.write(torn)
        with caplog.at_level(logging.WARNING, logger="dkv.wal.log"):
            wal = WriteAheadLog(tmp_path)
        assert wal.last_lsn in (5, 5 + len(list(iter_records(torn)))), "only whole leading frames survive"
        wal.truncate_after(5)
        wal.close()
        assert seg.stat().st_size == size
    assert any("torn tail" in r.getMessage() for r in caplog.records)


def test_garbage_and_stale_frames_after_the_end_are_a_torn_tail(tmp_path: Path) -> None:
    """Valid frames that cannot continue the log (an old LSN, an LSN too far ahead) do not make it corrupt."""
    wal = WriteAheadLog(tmp_path)
    wal.append(recs(1, 20))
    wal.close()
    seg = segments(tmp_path)[0]
    size = seg.stat().st_size
    with seg.open("ab") as f:
        f.write(b"\x07" * 30 + encode_many(recs(3, 2)) + b"\x00" * 7 + encode(recs(5000, 1)[0]) + os.urandom(500))
    wal = WriteAheadLog(tmp_path)
    assert wal.last_lsn == 20 and seg.stat().st_size == size
    wal.close()


def test_resync_search_is_bounded_and_then_refuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past its budget the forward look gives no verdict, and recovery refuses rather than cut."""
    wal = WriteAheadLog(tmp_path)
    wal.append(recs(1, 3))
    wal.close()
    seg = segments(tmp_path)[0]
    # offsets that look like a frame header with a plausible LSN but are not frames
    fake = struct.pack("<IIQQ", 100, 0, 1, 4) * 50
    with seg.open("ab") as f:
        f.write(b"\x01" + fake)
    before = snapshot_dir(tmp_path)
    monkeypatch.setattr(wal_log, "RESYNC_MAX_CANDIDATES", 10)
    with pytest.raises(CorruptLog, match="scan limit"):
        WriteAheadLog(tmp_path)
    assert snapshot_dir(tmp_path) == before
    monkeypatch.setattr(wal_log, "RESYNC_MAX_CANDIDATES", 10_000)
    wal = WriteAheadLog(tmp_path)  # with the budget to look at them all: a torn tail
    assert wal.last_lsn == 3
    wal.close()


def test_find_resync_skips_zero_runs_and_finds_the_next_frame_after_a_damaged_length() -> None:
    data = bytearray(encode_many(recs(1, 30)))
    tenth = len(encode_many(recs(1, 9)))
    eleventh = len(encode_many(recs(1, 10)))
    data[tenth + 1] ^= 0x40  # body_len off by 16 KiB: the header no longer points at the next frame
    assert find_resync(bytes(data), tenth, 9, 1, 1000) == (eleventh, False)
    assert find_resync(bytes(data[:tenth]) + bytes(1 << 20), tenth, 9, 1, 1000) == (None, False)
    assert find_resync(bytes(data), tenth, 9, 2, 1000) == (None, False), "an epoch going back does not continue"


def test_garbage_after_valid_records_is_dropped(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path)
    wal.append(recs(1, 3))
    wal.close()
    seg = segments(tmp_path)[0]
    size = seg.stat().st_size
    with seg.open("ab") as f:
        f.write(b"\xff" * 5 + os.urandom(300))
    wal = WriteAheadLog(tmp_path)
    assert wal.last_lsn == 3
    assert seg.stat().st_size == size
    wal.append(recs(4, 1))
    wal.close()
    assert read_all(WriteAheadLog(tmp_path)) == recs(1, 4)


def test_lsn_discontinuity_in_last_segment_is_cut(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path)
    wal.append(recs(1, 3))
    wal.close()
    seg = segments(tmp_path)[0]
    size = seg.stat().st_size
    with seg.open("ab") as f:
        f.write(encode(recs(9, 1)[0]))  # valid frame, wrong lsn
    wal = WriteAheadLog(tmp_path)
    assert wal.last_lsn == 3
    assert seg.stat().st_size == size
    wal.close()


def test_corruption_in_non_last_segment_raises_corrupt_log(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path, segment_bytes=256)
    for lsn in range(1, 30, 2):
        wal.append(recs(lsn, 2))
    wal.close()
    assert len(segments(tmp_path)) >= 3
    flip(segments(tmp_path)[0], 30)
    with pytest.raises(CorruptLog) as info:
        WriteAheadLog(tmp_path)
    assert str(segments(tmp_path)[0]) in str(info.value)
    assert info.value.data["offset"] == 0 and info.value.data["last_good_lsn"] == 0


def test_missing_middle_segment_raises_corrupt_log(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path, segment_bytes=256)
    for lsn in range(1, 30, 2):
        wal.append(recs(lsn, 2))
    wal.close()
    segs = segments(tmp_path)
    segs[1].unlink()
    with pytest.raises(CorruptLog):
        WriteAheadLog(tmp_path)


# -- repair ------------------------------------------------------------------


def quarantine_files(d: Path) -> list[Path]:
    return sorted(d.glob("quarantine-*.bin"))


def test_repair_quarantines_exactly_the_cut_bytes_then_the_log_opens(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    wal = WriteAheadLog(tmp_path)
    wal.append(recs(1, 10))
    wal.close()
    seg = segments(tmp_path)[0]
    fifth = len(encode_many(recs(1, 4)))
    flip(seg, fifth + 30)
    damaged = seg.read_bytes()
    with caplog.at_level(logging.WARNING, logger="dkv.wal.log"):
        report = wal_log.repair(tmp_path)
    assert report is not None
    [q] = quarantine_files(tmp_path)
    assert q.read_bytes() == damaged[fifth:]
    assert seg.read_bytes() == damaged[:fifth]
    assert (report.segment, report.offset, report.cut_bytes, report.last_good_lsn) == (
        str(seg),
        fifth,
        len(damaged) - fifth,
        4,
    )
    assert report.quarantined == (str(q),)
    assert (report.records, report.lsn_range) == (5, (6, 10)), "lsn 5 is the damaged one"
    lost = [r.getMessage() for r in caplog.records if "cut" in r.getMessage()]
    assert lost and "5 valid record(s) in them (lsn 6..10)" in lost[-1] and str(q) in lost[-1]
    wal = WriteAheadLog(tmp_path)
    assert read_all(wal) == recs(1, 4)
    wal.append(recs(5, 1, epoch=2))
    wal.close()
    assert read_all(WriteAheadLog(tmp_path)) == recs(1, 4) + recs(5, 1, epoch=2)


def test_repair_of_an_earlier_segment_quarantines_the_later_ones_whole(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path, segment_bytes=256)
    for lsn in range(1, 30, 2):
        wal.append(recs(lsn, 2))
    wal.close()
    segs = segments(tmp_path)
    assert len(segs) >= 3
    contents = [p.read_bytes() for p in segs]
    second = len(encode(recs(1, 1)[0]))
    flip(segs[0], second + 10)
    damaged = segs[0].read_bytes()
    report = wal_log.repair(tmp_path, fsync=False)
    assert report is not None and report.offset == second and report.last_good_lsn == 1
    quarantined = quarantine_files(tmp_path)
    assert [q.read_bytes() for q in quarantined] == [damaged[second:], *contents[1:]]
    assert report.cut_bytes == sum(map(len, contents)) - second
    assert report.lsn_range == (3, 30)
    assert segments(tmp_path) == segs[:1]
    wal = WriteAheadLog(tmp_path)
    assert read_all(wal) == recs(1, 1)
    wal.close()


def test_repair_of_a_missing_middle_segment_quarantines_what_follows_the_gap(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path, segment_bytes=256)
    for lsn in range(1, 30, 2):
        wal.append(recs(lsn, 2))
    wal.close()
    segs = segments(tmp_path)
    segs[1].unlink()
    kept = segs[0].read_bytes()
    report = wal_log.repair(tmp_path, fsync=False)
    assert report is not None and report.offset == 0 and report.segment == str(segs[2])
    assert len(quarantine_files(tmp_path)) == len(segs) - 2
    assert segments(tmp_path) == segs[:1] and segs[0].read_bytes() == kept
    WriteAheadLog(tmp_path).close()


def test_repair_of_a_sound_log_changes_nothing(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path)
    wal.append(recs(1, 10))
    wal.close()
    before = snapshot_dir(tmp_path)
    assert wal_log.repair(tmp_path) is None
    assert snapshot_dir(tmp_path) == before


# -- truncate_after ----------------------------------------------------------


def test_truncate_after_within_segment_then_append_and_reopen(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path)
    wal.append(recs(1, 5, epoch=1))
    wal.append(recs(6, 5, epoch=2))
    assert wal.truncate_after(3) == 7
    assert (wal.last_lsn, wal.last_epoch) == (3, 1)
    with pytest.raises(ValueError):
        wal.append(recs(11, 1))
    wal.append(recs(4, 2, epoch=3, tag=b"new"))
    wal.close()
    wal = WriteAheadLog(tmp_path)
    assert read_all(wal) == recs(1, 3) + recs(4, 2, epoch=3, tag=b"new")
    assert (wal.last_lsn, wal.last_epoch) == (5, 3)
    wal.close()


def test_truncate_after_across_segments_then_append_and_reopen(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path, segment_bytes=256)
    for lsn in range(1, 41, 4):
        wal.append(recs(lsn, 4))
    before = segments(tmp_path)
    assert len(before) >= 4
    second_first = int(before[1].name[4:24])
    assert wal.truncate_after(second_first + 1) == 40 - (second_first + 1)
    assert segments(tmp_path) == before[:2]
    wal.append(recs(second_first + 2, 1, tag=b"new"))
    wal.close()
    wal = WriteAheadLog(tmp_path, segment_bytes=256)
    assert read_all(wal) == recs(1, second_first + 1) + recs(second_first + 2, 1, tag=b"new")
    wal.close()


def test_truncate_after_segment_boundary_and_to_empty(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path, segment_bytes=256)
    for lsn in range(1, 41, 4):
        wal.append(recs(lsn, 4))
    second_first = int(segments(tmp_path)[1].name[4:24])
    wal.truncate_after(second_first - 1)  # all of the second segment and later
    assert wal.last_lsn == second_first - 1
    assert read_all(wal) == recs(1, second_first - 1)
    assert wal.truncate_after(0) == second_first - 1
    assert (wal.first_lsn, wal.last_lsn, wal.last_epoch) == (0, 0, 0)
    wal.close()
    wal = WriteAheadLog(tmp_path, segment_bytes=256)
    assert wal.last_lsn == 0
    with pytest.raises(ValueError):
        wal.append(recs(5, 1))
    wal.append(recs(1, 1))
    wal.close()


def test_truncate_after_is_noop_at_or_past_end_and_rejects_compacted_lsn(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path)
    assert wal.truncate_after(10) == 0
    wal.append(recs(20, 5))
    assert wal.truncate_after(24) == 0
    assert wal.truncate_after(100) == 0
    assert wal.last_lsn == 24
    with pytest.raises(ValueError):
        wal.truncate_after(10)
    wal.close()


# -- segments, read_from, compact --------------------------------------------


def test_segment_rollover_creates_several_files_and_read_from_spans_them(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path, segment_bytes=256)
    for lsn in range(1, 61, 3):
        wal.append(recs(lsn, 3))
    segs = segments(tmp_path)
    assert len(segs) >= 4
    assert wal.stats["segments"] == len(segs)
    assert wal.stats["bytes"] == sum(p.stat().st_size for p in segs)
    for seg in segs:  # each file is named by its first record, and no batch is split
        contents = [r for r, _, _ in iter_records(seg.read_bytes())]
        assert seg.name == seg_name(contents[0].lsn)
        assert contents[0].lsn % 3 == 1 and contents[-1].lsn % 3 == 0
    assert list(wal.read_from(1)) == recs(1, 60)
    assert list(wal.read_from(31)) == recs(31, 30)
    assert list(wal.read_from(29, limit=5)) == recs(29, 5)
    assert list(wal.read_from(61)) == []
    assert list(wal.read_from(1, limit=0)) == []
    wal.close()


def test_batch_larger_than_a_segment_is_not_split(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path, segment_bytes=256)
    wal.append(recs(1, 2))
    wal.append(recs(3, 40))
    wal.append(recs(43, 1))
    assert [p.name for p in segments(tmp_path)] == [seg_name(1), seg_name(43)]
    wal.close()


def test_compact_deletes_only_fully_covered_segments_never_the_active(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path, segment_bytes=256)
    for lsn in range(1, 61, 3):
        wal.append(recs(lsn, 3))
    firsts = [int(p.name[4:24]) for p in segments(tmp_path)]
    assert wal.compact(firsts[1] - 2) == 0  # segment 0's last record is not covered
    assert wal.compact(firsts[1] - 1) == 1
    assert wal.first_lsn == firsts[1]
    assert wal.compact(firsts[2] - 2) == 0  # segment 1 is only partly covered
    with pytest.raises(ValueError):
        list(wal.read_from(firsts[1] - 1))
    assert list(wal.read_from(firsts[1])) == recs(firsts[1], 61 - firsts[1])
    assert wal.compact(10_000) == len(firsts) - 2
    assert [p.name for p in segments(tmp_path)] == [seg_name(firsts[-1])]
    assert wal.last_lsn == 60
    wal.close()
    wal = WriteAheadLog(tmp_path, segment_bytes=256)
    assert (wal.first_lsn, wal.last_lsn) == (firsts[-1], 60)
    assert read_all(wal) == recs(firsts[-1], 61 - firsts[-1])
    wal.close()


def test_compact_keeps_what_a_migration_reads_up_to_a_bound(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path, segment_bytes=256)
    for lsn in range(1, 61, 3):
        wal.append(recs(lsn, 3))
    firsts = [int(p.name[4:24]) for p in segments(tmp_path)]
    assert len(firsts) >= 6
    wal.retain_from = firsts[2] + 1  # a move reads from here: segment 2 on stays
    assert wal.compact(10_000) == 2
    assert wal.first_lsn == firsts[2]
    wal.max_retained_segments = 2  # a stalled move may hold no more than two deletable segments
    assert wal.compact(10_000) == len(firsts) - 5
    assert wal.first_lsn == firsts[-3]
    wal.retain_from = None
    assert wal.compact(10_000) == 2
    assert [p.name for p in segments(tmp_path)] == [seg_name(firsts[-1])]
    wal.close()


# -- reset_to, stats, close, failures ----------------------------------------


def test_reset_to_then_reopen(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path, segment_bytes=256)
    for lsn in range(1, 31, 3):
        wal.append(recs(lsn, 3))
    wal.reset_to(100)
    assert (wal.first_lsn, wal.last_lsn, wal.last_epoch) == (0, 100, 0)
    assert [p.name for p in segments(tmp_path)] == [seg_name(101)]
    wal.close()
    wal = WriteAheadLog(tmp_path, segment_bytes=256)
    assert (wal.first_lsn, wal.last_lsn) == (0, 100)
    with pytest.raises(ValueError):
        list(wal.read_from(50))
    assert list(wal.read_from(101)) == []
    with pytest.raises(ValueError):
        wal.append(recs(31, 1))
    wal.append(recs(101, 2))
    wal.close()
    wal = WriteAheadLog(tmp_path, segment_bytes=256)
    assert read_all(wal) == recs(101, 2)
    wal.close()


def test_stats_count_one_fsync_per_append_regardless_of_batch_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    syncs: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (syncs.append(fd), real(fd))[1])
    wal = WriteAheadLog(tmp_path)
    wal.append(recs(1, 1))
    wal.append(recs(2, 1000))
    wal.append(recs(1002, 10))
    stats = wal.stats
    assert (stats["appends"], stats["fsyncs"]) == (3, 3)
    assert len(syncs) == 3
    assert (stats["first_lsn"], stats["last_lsn"], stats["segments"]) == (1, 1011, 1)
    wal.close()
    nosync = WriteAheadLog(tmp_path / "nosync", fsync=False)
    nosync.append(recs(1, 5))
    assert (nosync.stats["appends"], nosync.stats["fsyncs"]) == (1, 0)
    nosync.close()


def test_close_is_idempotent_and_later_calls_raise_storage_closed(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path)
    wal.append(recs(1, 2))
    wal.close()
    wal.close()
    for call in (
        lambda: wal.append(recs(3, 1)),
        lambda: wal.read_from(1),
        lambda: wal.truncate_after(1),
        lambda: wal.compact(1),
        lambda: wal.reset_to(5),
    ):
        with pytest.raises(StorageClosed):
            call()
    assert wal.last_lsn == 2


def test_failed_write_closes_the_log_and_reopen_recovers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wal = WriteAheadLog(tmp_path)
    wal.append(recs(1, 3))
    real = os.write

    def torn_write(fd: int, data: bytes) -> int:
        real(fd, bytes(data)[:5])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", torn_write)
    with pytest.raises(OSError):
        wal.append(recs(4, 2))
    monkeypatch.undo()
    with pytest.raises(StorageClosed):
        wal.append(recs(4, 2))
    wal = WriteAheadLog(tmp_path)
    assert read_all(wal) == recs(1, 3)
    wal.append(recs(4, 2))
    wal.close()


# -- sparse index and bounded reads ------------------------------------------


def index_of(wal: WriteAheadLog) -> dict[int, list[tuple[int, int]]]:
    """The sparse index as {segment first_lsn: [(lsn, offset), ...]}."""
    return {first: list(zip(ix.lsns, ix.offsets)) for first, ix in wal._index.items()}


def check_index(wal: WriteAheadLog, d: Path, **kwargs: int) -> None:
    """Every entry points at its record, segments match, and recovery builds the very same index."""
    index = index_of(wal)
    assert sorted(index) == [int(p.name[4:24]) for p in segments(d)]
    for first, entries in index.items():
        data = (d / seg_name(first)).read_bytes()
        assert entries[0] == (first, 0)
        for lsn, offset in entries:
            if offset < len(data):
                decoded = decode_from(data, offset)
                assert decoded is not None and decoded[0].lsn == lsn
            else:  # only an empty segment's first entry points at the end
                assert (lsn, offset, len(data)) == (first, 0, 0)
    reopened = WriteAheadLog(d, **kwargs)
    assert index_of(reopened) == index
    reopened.close()


def check_reads(wal: WriteAheadLog, model: list[Record], lsns: list[int] | None = None) -> None:
    """read_from at each LSN (default: all) with several limits equals slicing the model."""
    first = model[0].lsn if model else wal.last_lsn + 1
    assert [r.lsn for r in model] == list(range(first, first + len(model)))
    for lsn in lsns if lsns is not None else range(first, first + len(model) + 2):
        tail = model[lsn - first :]
        for limit in (1, 3, 17):
            assert list(wal.read_from(lsn, limit=limit)) == tail[:limit], (lsn, limit)
    if model:
        assert list(wal.read_from(first)) == model


@pytest.fixture
def small_strides(monkeypatch: pytest.MonkeyPatch) -> None:
    """Index and read in tiny steps so that small logs cross many entries and chunk boundaries."""
    monkeypatch.setattr(wal_log, "INDEX_EVERY_RECORDS", 5)
    monkeypatch.setattr(wal_log, "INDEX_EVERY_BYTES", 300)
    monkeypatch.setattr(wal_log, "READ_CHUNK_BYTES", 64)


def test_sparse_index_follows_the_documented_rule(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path, fsync=False)
    wal.append(recs(1, 2500))  # small records: an entry every INDEX_EVERY_RECORDS records
    big = [Record(1, lsn, Op.PUT, b"k", bytes(400 * 1024)) for lsn in range(2501, 2511)]
    wal.append(big)  # 400 KiB records: an entry for each first one starting >= 1 MiB past the last entry
    wal.append(recs(2511, 10))
    [(first, entries)] = index_of(wal).items()
    # 2501 starts ~24 KiB past entry 2001, 2504 ~1.2 MiB past it; 2507 and 2510 are 1.2 MiB apart
    assert first == 1 and [lsn for lsn, _ in entries] == [1, 1001, 2001, 2504, 2507, 2510]
    gaps = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(entries, entries[1:])]
    assert all(n == 1000 or (n < 1000 and nbytes >= 1024 * 1024) for n, nbytes in gaps)
    check_index(wal, tmp_path)
    wal.close()


def test_read_from_equals_naive_slice_across_segments_and_index_entries(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path, segment_bytes=150_000, fsync=False)
    model = recs(1, 12_000)
    for i in range(0, len(model), 700):
        wal.append(model[i : i + 700])
    assert wal.segment_count >= 3
    check_index(wal, tmp_path, segment_bytes=150_000)
    entry_lsns = {lsn for entries in index_of(wal).values() for lsn, _ in entries}
    assert len(entry_lsns) > 12
    probes = sorted(
        {1, 2, 6000, 11_999, 12_000, 12_001, 12_002} | {lsn + d for lsn in entry_lsns for d in (-1, 0, 1)} - {0}
    )
    check_reads(wal, model, probes)
    for lsn in (1, 999, 1000, 1001, 5000, 10_500):
        assert list(wal.read_from(lsn, limit=2000)) == model[lsn - 1 : lsn - 1 + 2000]
    wal.close()
    wal = WriteAheadLog(tmp_path, segment_bytes=150_000)
    check_reads(wal, model, probes)
    wal.close()


@pytest.mark.usefixtures("small_strides")
def test_reads_straddle_chunk_boundaries_and_records_bigger_than_a_chunk(tmp_path: Path) -> None:
    model: list[Record] = []
    wal = WriteAheadLog(tmp_path, segment_bytes=2000, fsync=False)
    for lsn in range(1, 121, 4):
        batch = [
            Record(1, lsn + i, Op.PUT, b"k%d" % (lsn + i), bytes([lsn % 251]) * ((lsn + i) * 37 % 300))
            for i in range(4)
        ]
        wal.append(batch)
        model += batch
    assert wal.segment_count >= 4
    check_index(wal, tmp_path, segment_bytes=2000)
    check_reads(wal, model)
    wal.close()


@pytest.mark.usefixtures("small_strides")
def test_reads_stay_right_after_truncate_compact_reset_and_reopen(tmp_path: Path) -> None:
    kw = {"segment_bytes": 700, "fsync": False}
    wal = WriteAheadLog(tmp_path, **kw)
    model = recs(1, 150)
    for i in range(0, 150, 6):
        wal.append(model[i : i + 6])
    firsts = sorted(index_of(wal))
    assert len(firsts) >= 5
    check_index(wal, tmp_path, **kw)
    check_reads(wal, model)
    # into the middle of a segment, right at an index entry, just past one, at a segment boundary
    entry = index_of(wal)[firsts[-2]][2][0]
    for cut, tag in [(140, b"a"), (entry, b"b"), (entry + 1, b"c"), (firsts[-2] - 1, b"d")]:
        assert wal.truncate_after(cut) == len(model) - cut
        del model[cut:]
        check_index(wal, tmp_path, **kw)
        check_reads(wal, model, list(range(max(cut - 12, 1), cut + 3)))
        more = recs(cut + 1, 13, tag=tag)
        wal.append(more[:5])
        wal.append(more[5:])
        model += more
        check_index(wal, tmp_path, **kw)
        check_reads(wal, model, list(range(max(cut - 12, 1), len(model) + 2)))
    assert wal.compact(firsts[2] - 1) == 2
    model = model[firsts[2] - 1 :]
    check_index(wal, tmp_path, **kw)
    check_reads(wal, model)
    with pytest.raises(ValueError):
        wal.read_from(firsts[2] - 1)
    wal.close()
    wal = WriteAheadLog(tmp_path, **kw)
    check_reads(wal, model)
    wal.reset_to(500)
    assert index_of(wal) == {501: [(501, 0)]}
    check_reads(wal, [])
    model = recs(501, 40, tag=b"r")
    wal.append(model)
    check_index(wal, tmp_path, **kw)
    check_reads(wal, model)
    wal.close()


def test_truncate_to_before_the_first_record_empties_the_index(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path, fsync=False)
    wal.append(recs(1, 3000))
    assert len(index_of(wal)[1]) == 3
    assert wal.truncate_after(0) == 3000
    assert index_of(wal) == {1: [(1, 0)]}
    check_index(wal, tmp_path)
    wal.append(recs(1, 1500, tag=b"again"))
    check_reads(wal, recs(1, 1500, tag=b"again"), [1, 1000, 1001, 1500, 1501])
    check_index(wal, tmp_path)
    wal.close()


def test_read_from_never_yields_past_last_lsn_or_garbage(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path, fsync=False)
    wal.append(recs(1, 5))
    seg = segments(tmp_path)[0]
    with seg.open("ab") as f:  # bytes the log does not own: a valid frame past last_lsn, then a torn one
        f.write(encode(recs(6, 1)[0]) + encode(recs(7, 1)[0])[:-3])
    assert list(wal.read_from(1)) == recs(1, 5)
    assert list(wal.read_from(5)) == recs(5, 1)
    assert list(wal.read_from(6)) == []
    wal.close()


class CountingReads:
    """Wraps a real segment file and counts the bytes read from it."""

    def __init__(self, f: BinaryIO, counter: list[int]) -> None:
        self._f, self._counter = f, counter
        self.calls = 0

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._counter[0] += len(data)
        self.calls += 1
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def __enter__(self) -> "CountingReads":
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


def test_read_from_reads_a_bounded_part_of_a_big_segment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wal = WriteAheadLog(tmp_path, fsync=False)
    for lsn in range(1, 200_001, 10_000):
        wal.append(recs(lsn, 10_000))
    assert wal.segment_count == 1
    size = segments(tmp_path)[0].stat().st_size
    assert size > 6 * 1024 * 1024
    read = [0]
    real_open = WriteAheadLog._open_segment
    monkeypatch.setattr(WriteAheadLog, "_open_segment", lambda self, first: CountingReads(real_open(self, first), read))

    assert list(wal.read_from(150_000, limit=10)) == recs(150_000, 10)
    assert 0 < read[0] <= 2 * 1024 * 1024
    read[0] = 0
    assert list(wal.read_from(199_990, limit=2000)) == recs(199_990, 11)
    assert 0 < read[0] <= 2 * 1024 * 1024
    read[0] = 0
    assert len(list(wal.read_from(1))) == 200_000  # the counter does see whole-file reads
    assert read[0] == size
    wal.close()


def test_a_record_bigger_than_a_read_chunk_is_read_in_one_go(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wal = WriteAheadLog(tmp_path, fsync=False)
    model = [Record(1, lsn, Op.PUT, b"k", bytes([lsn]) * (5 * 1024 * 1024 + lsn)) for lsn in range(1, 4)]
    wal.append(model)
    opened: list[CountingReads] = []
    real_open = WriteAheadLog._open_segment
    monkeypatch.setattr(
        WriteAheadLog,
        "_open_segment",
        lambda self, first: opened.append(CountingReads(real_open(self, first), [0])) or opened[-1],
    )
    assert list(wal.read_from(2, limit=1)) == model[1:2]
    assert opened[-1].calls <= 3  # the chunk with its start, then the rest of it at once
    assert list(wal.read_from(1)) == model
    wal.close()


# -- format 2: revisions, deadlines, the compaction boundary ---------------------------------------


def test_records_keep_their_revision_and_deadline_across_a_reopen(tmp_path: Path) -> None:
    log = WriteAheadLog(tmp_path)
    log.append(
        [
            Record(1, 1, Op.PUT, b"k", b"v", 100, 1_700_000_000_000),
            Record(1, 2, Op.EXPIRE, b"k", b"", 101, 1_700_000_000_000),
        ]
    )
    log.close()
    again = WriteAheadLog(tmp_path)
    assert [(r.rev, r.expires_at) for r in again.read_from(1)] == [(100, 1_700_000_000_000), (101, 1_700_000_000_000)]
    assert again.last_rev == 101
    assert again.truncate_after(1) == 1 and again.last_rev == 100


def test_a_log_written_in_an_older_format_is_refused_not_cut(tmp_path: Path) -> None:
    (tmp_path / "wal-00000000000000000001.log").write_bytes(b"\x01" * 64)  # segments, no FORMAT file
    with pytest.raises(CorruptLog, match="before revisions and TTL"):
        WriteAheadLog(tmp_path)
    assert (tmp_path / "wal-00000000000000000001.log").read_bytes() == b"\x01" * 64
    (tmp_path / "FORMAT").write_text("dkv-wal 9\n")
    with pytest.raises(CorruptLog, match="format"):
        WriteAheadLog(tmp_path)


def test_compaction_remembers_the_revision_of_the_last_record_it_deleted(tmp_path: Path) -> None:
    log = WriteAheadLog(tmp_path, segment_bytes=200)
    for i in range(1, 21):
        log.append([Record(1, i, Op.PUT, b"k%d" % i, b"v" * 50, 1000 + i)])
    assert log.base_rev == 0 and log.segment_count > 2
    assert log.compact(15) > 0
    first = log.first_lsn
    assert log.base_rev == 1000 + first - 1  # the record just before the first one kept
    log.close()
    again = WriteAheadLog(tmp_path, segment_bytes=200)
    assert again.base_rev == 1000 + first - 1 and again.last_rev == 1020
    again.reset_to(50, rev=7777)
    assert again.base_rev == again.last_rev == 7777
    again.close()
    assert WriteAheadLog(tmp_path).base_rev == 7777
