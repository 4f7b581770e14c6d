"""Sticky bucketing: the documented mmh3 formula, monotone ramps and an even spread of keys."""

from __future__ import annotations

import random
from typing import Final

import mmh3
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.core.bucketing import BUCKETS, bucket, in_canary

_MASK: Final = 0xFFFF_FFFF

keys = st.text(max_size=64)
salts = st.text(max_size=32)
weights = st.integers(min_value=0, max_value=BUCKETS)


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & _MASK


def _fmix(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EB_CA6B) & _MASK
    h ^= h >> 13
    h = (h * 0xC2B2_AE35) & _MASK
    return h ^ (h >> 16)


def _scramble(k: int) -> int:
    return (_rotl((k * 0xCC9E_2D51) & _MASK, 15) * 0x1B87_3593) & _MASK


def murmur3_x86_32(data: bytes, seed: int = 0) -> int:
    """MurmurHash3_x86_32 written out from Austin Appleby's reference, independent of mmh3."""
    h = seed
    body = len(data) - len(data) % 4
    for i in range(0, body, 4):
        h ^= _scramble(int.from_bytes(data[i : i + 4], "little"))
        h = (_rotl(h, 13) * 5 + 0xE654_6B64) & _MASK
    tail = data[body:]
    if tail:
        h ^= _scramble(int.from_bytes(tail, "little"))
    return _fmix(h ^ len(data))


def test_the_reference_murmur3_reproduces_published_test_vectors() -> None:
    assert murmur3_x86_32(b"") == 0
    assert murmur3_x86_32(b"", seed=1) == 0x514E_28B7
    assert murmur3_x86_32(b"hello") == 0x248B_FA47
    assert murmur3_x86_32(b"The quick brown fox jumps over the lazy dog") == 0x2E4F_F723


@given(salt=salts, key=keys)
def test_bucket_is_unsigned_seed_zero_murmur3_of_utf8_salt_colon_key_mod_10000(
    salt: str, key: str
) -> None:
    expected = murmur3_x86_32(f"{salt}:{key}".encode()) % 10_000
    assert bucket(salt, key) == expected
    assert bucket(salt, key) == mmh3.hash(f"{salt}:{key}", seed=0, signed=False) % 10_000


@pytest.mark.parametrize(
    ("salt", "key", "expected"),
    [
        ("shop", "42", 1691),
        ("shop", "user-1", 7657),
        ("checkout", "42", 5384),
        ("shop", "Zoë", 4924),
    ],
)
def test_bucket_of_known_keys_is_pinned_so_every_replica_and_release_agrees(
    salt: str, key: str, expected: int
) -> None:
    assert bucket(salt, key) == expected


@given(salt=salts, key=keys)
def test_the_same_key_and_salt_always_land_in_the_same_bucket_in_range(salt: str, key: str) -> None:
    first = bucket(salt, key)
    assert 0 <= first < BUCKETS
    assert bucket(salt, key) == first


def test_different_salts_give_independent_cohorts() -> None:
    users = [f"user-{i}" for i in range(10_000)]
    shop = {u for u in users if in_canary(bucket("shop", u), 5_000)}
    cart = {u for u in users if in_canary(bucket("cart", u), 5_000)}
    assert shop != cart
    # Independent halves overlap on about a quarter of all users, not on all or none.
    assert 0.23 < len(shop & cart) / len(users) < 0.27


@given(bucket_=st.integers(min_value=0, max_value=BUCKETS - 1), w1=weights, w2=weights)
def test_raising_the_weight_never_moves_a_bucket_from_canary_back_to_stable(
    bucket_: int, w1: int, w2: int
) -> None:
    low, high = sorted((w1, w2))
    if in_canary(bucket_, low):
        assert in_canary(bucket_, high)


@given(salt=salts, key=keys, w1=weights, w2=weights)
def test_raising_the_weight_never_moves_a_key_from_canary_back_to_stable(
    salt: str, key: str, w1: int, w2: int
) -> None:
    low, high = sorted((w1, w2))
    b = bucket(salt, key)
    if in_canary(b, low):
        assert in_canary(b, high)


@given(old=weights, new=weights)
def test_lowering_the_weight_evicts_exactly_the_buckets_at_or_above_the_new_weight(
    old: int, new: int
) -> None:
    new, old = sorted((new, old))
    evicted = {b for b in range(BUCKETS) if in_canary(b, old) and not in_canary(b, new)}
    assert evicted == set(range(new, old))
    assert not any(in_canary(b, new) and not in_canary(b, old) for b in range(BUCKETS))


def test_weight_zero_holds_no_bucket_and_full_weight_holds_every_bucket() -> None:
    assert not any(in_canary(b, 0) for b in range(BUCKETS))
    assert all(in_canary(b, BUCKETS) for b in range(BUCKETS))


@pytest.fixture(scope="module")
def random_key_buckets() -> list[int]:
    seeded = random.Random(20_240_501)  # fixed seed: the share test must be deterministic
    return [bucket("shop", f"{seeded.getrandbits(64):x}") for _ in range(100_000)]


@pytest.mark.parametrize("percent", [1, 5, 10, 37.5, 50, 99])
def test_the_canary_share_of_100k_random_keys_is_within_half_a_point_of_the_weight(
    random_key_buckets: list[int], percent: float
) -> None:
    weight_bp = round(percent * 100)
    in_canary_count = sum(in_canary(b, weight_bp) for b in random_key_buckets)
    share_percent = 100 * in_canary_count / len(random_key_buckets)
    assert abs(share_percent - percent) <= 0.5
