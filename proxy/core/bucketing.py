"""Pure sticky bucketing: a key's mmh3 bucket in [0, 10000) and whether it is in the canary.

Every replica computes the same bucket for the same salt and key, so cohorts agree with no
coordination (docs/semantics.md, Monotone ramp).
"""

from __future__ import annotations

from typing import Final

import mmh3

BUCKETS: Final = 10_000  # one bucket per basis point of weight


def bucket(salt: str, key: str) -> int:
    """The key's bucket: `mmh3.hash(f"{salt}:{key}", seed=0, signed=False) % 10000`.

    mmh3 encodes a str as UTF-8 itself. Arguments are positional because keyword arguments
    cost mmh3 about 60 % more per call on the hot path.
    """
    return mmh3.hash(f"{salt}:{key}", 0, False) % BUCKETS


def in_canary(bucket: int, weight_bp: int) -> bool:
    """Whether a bucket is in the canary at a weight in basis points (0..10000).

    Comparing against a threshold makes the ramp monotone: raising the weight only adds buckets,
    lowering it removes exactly those at or above the new weight.
    """
    return bucket < weight_bp
