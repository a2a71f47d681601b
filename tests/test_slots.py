"""Key -> slot mapping, storage-key layout and slot ranges."""

from __future__ import annotations

import random
import zlib

import pytest

from dkv.slots import (
    ALL_SLOTS,
    NUM_SLOTS,
    SLOT_PREFIX_LEN,
    SlotRange,
    merge_ranges,
    slot_of,
    slot_of_storage_key,
    slot_prefix,
    split_even,
    storage_key,
    user_key,
)


def test_slot_of_known_values():
    assert 0xCBF43926 % NUM_SLOTS == 294
    assert slot_of(b"123456789") == 294
    assert slot_of(b"") == 0


def test_slot_of_matches_zlib_crc32():
    rnd = random.Random(1)
    for _ in range(1000):
        key = rnd.randbytes(rnd.randint(1, 40))
        assert slot_of(key) == zlib.crc32(key) % NUM_SLOTS


def test_storage_key_roundtrip_and_order():
    rnd = random.Random(2)
    keys = [rnd.randbytes(rnd.randint(1, 12)) for _ in range(500)]
    for k in keys:
        sk = storage_key(k)
        assert len(sk) == len(k) + SLOT_PREFIX_LEN
        assert sk.startswith(slot_prefix(slot_of(k)))
        assert user_key(sk) == k and slot_of_storage_key(sk) == slot_of(k)
    # storage order is (slot, user key)
    assert sorted(keys, key=storage_key) == sorted(keys, key=lambda k: (slot_of(k), k))
    assert slot_prefix(0) == b"\x00\x00" and slot_prefix(1023) == b"\x03\xff"
    assert all(slot_prefix(s) < slot_prefix(s + 1) for s in range(NUM_SLOTS - 1))


def test_slot_range_validation_contains_len():
    for bad in ((-1, 3), (5, 4), (0, NUM_SLOTS)):
        with pytest.raises(ValueError):
            SlotRange(*bad)
    r = SlotRange(10, 20)
    assert len(r) == 11 and list(r) == list(range(10, 21)) and r.to_list() == [10, 20]
    assert 10 in r and 20 in r and 9 not in r and 21 not in r and "10" not in r
    assert len(ALL_SLOTS) == NUM_SLOTS


def test_slot_range_storage_bounds():
    lo, hi = SlotRange(10, 20).storage_bounds()
    assert (lo, hi) == (slot_prefix(10), slot_prefix(21))
    rnd = random.Random(3)
    for _ in range(500):
        k = rnd.randbytes(rnd.randint(1, 8))
        assert (lo <= storage_key(k) < hi) == (slot_of(k) in SlotRange(10, 20))
    lo, hi = ALL_SLOTS.storage_bounds()
    assert lo == b"\x00\x00" and storage_key(b"\xff" * 20) < hi


@pytest.mark.parametrize("n", range(1, 11))
def test_split_even(n):
    ranges = split_even(n)
    assert len(ranges) == n
    assert [s for r in ranges for s in r] == list(range(NUM_SLOTS))
    sizes = [len(r) for r in ranges]
    assert max(sizes) - min(sizes) <= 1


def test_split_even_rejects_zero():
    with pytest.raises(ValueError):
        split_even(0)


def test_merge_ranges():
    assert merge_ranges([]) == []
    assert merge_ranges([5, 3, 4, 4, 10, 0, 1, 1023]) == [
        SlotRange(0, 1),
        SlotRange(3, 5),
        SlotRange(10, 10),
        SlotRange(1023, 1023),
    ]
    assert merge_ranges(range(NUM_SLOTS)) == [ALL_SLOTS]
    assert merge_ranges(s for r in split_even(7) for s in r) == [ALL_SLOTS]
