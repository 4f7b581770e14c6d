"""Pure sliding-window counters for the guard: requests, errors and a latency histogram per
version over the last `guard.window` seconds, with time passed in (docs/semantics.md, Windows).
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass
from math import floor
from typing import Final

_FASTEST: Final = 0.0005  # seconds; everything at or below shares the first bucket
_SLOWEST: Final = 60.0  # seconds; everything above goes to the overflow bucket
_BOUND_COUNT: Final = 85


def _log_spaced(low: float, high: float, count: int) -> tuple[float, ...]:
    # Rounded to 4 significant digits so the bounds read well in reasons and status output.
    return tuple(float(f"{low * (high / low) ** (i / (count - 1)):.4g}") for i in range(count))


# Upper bounds of the latency buckets (Prometheus `le` semantics: a bucket holds values in
# (previous bound, bound]). Each is 1.149 times the one before, so the p99 reported as its bucket's
# upper bound is at most ~15 % above the exact p99.
LATENCY_BOUNDS: Final[tuple[float, ...]] = _log_spaced(_FASTEST, _SLOWEST, _BOUND_COUNT)
_UPPER: Final[tuple[float, ...]] = (*LATENCY_BOUNDS, math.inf)  # the overflow bucket is +inf
_BUCKETS: Final = len(_UPPER)
LATENCY_BUCKETS: Final = _BUCKETS  # histogram length: LATENCY_BOUNDS and the overflow bucket
_NEVER: Final = -(2**62)  # the tick of a window that has seen no time yet


@dataclass(frozen=True, slots=True, kw_only=True)
class WindowCounts:
    """What one version did inside the window."""

    requests: int
    errors: int
    p99: float | None  # upper bound of the p99's bucket, seconds; None without requests

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


class Evidence:
    """Where the data path records a response for the guard: a route's `SlidingWindow` in a
    single process, or a worker's `Tally` that goes to the supervisor's window."""

    __slots__ = ()

    def record(self, now: float, *, error: bool, latency: float) -> None:
        raise NotImplementedError


@dataclass(frozen=True, slots=True, kw_only=True)
class TallyCounts:
    """A worker's outcomes for one version since its last report; buckets are (index into
    LATENCY_BOUNDS plus overflow, count) pairs, only the non-empty ones."""

    requests: int
    errors: int
    buckets: tuple[tuple[int, int], ...]


class Tally(Evidence):
    """Outcomes since the last `drain`: a worker process counts here, and its supervisor adds
    the drained counts to the route's one SlidingWindow (`SlidingWindow.add`)."""

    __slots__ = ("buckets", "errors", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.buckets: dict[int, int] = {}

    def record(self, now: float, *, error: bool, latency: float) -> None:
        del now  # the supervisor places the counts in time when they arrive
        self.requests += 1
        if error:
            self.errors += 1
        bucket = bisect_left(LATENCY_BOUNDS, latency)
        self.buckets[bucket] = self.buckets.get(bucket, 0) + 1

    def add(self, counts: TallyCounts) -> None:
        """Count another tally's drained counts too (a worker's, passed on to the fleet)."""
        self.requests += counts.requests
        self.errors += counts.errors
        for bucket, count in counts.buckets:
            self.buckets[bucket] = self.buckets.get(bucket, 0) + count

    def drain(self) -> TallyCounts | None:
        """The counts so far (None if there are none), leaving the tally empty."""
        if not self.requests:
            return None
        counts = TallyCounts(
            requests=self.requests, errors=self.errors, buckets=tuple(sorted(self.buckets.items()))
        )
        self.requests = 0
        self.errors = 0
        self.buckets = {}
        return counts


class Tee(Evidence):
    """Records into the route's window (the in-line guard) and into a tally the fleet drains
    into its pooled window."""

    __slots__ = ("tally", "window")

    def __init__(self, window: Evidence, tally: Tally) -> None:
        self.window = window
        self.tally = tally

    def record(self, now: float, *, error: bool, latency: float) -> None:
        self.window.record(now, error=error, latency=latency)
        self.tally.record(now, error=error, latency=latency)


class SlidingWindow(Evidence):
    """A ring of `slots` time slots, each `span / slots` seconds wide, with running totals.

    Time is cut into ticks of one slot width; the window holds the current tick and the
    `slots - 1` before it, so it covers between `span - width` and `span` seconds of the past.
    Entering a new tick empties the slot it reuses and takes that slot's counts out of the
    totals: one pass over its buckets, once per tick rather than per request. So `record` is a
    few list increments and one bisect, and `snapshot` reads the totals, finding the p99 by
    scanning from the slow end (a few buckets, since 1 % of requests lie above it).
    """

    __slots__ = (
        "_errors",
        "_histograms",
        "_per_second",
        "_requests",
        "_slot",
        "_slot_base",
        "_tick",
        "_total_errors",
        "_total_histogram",
        "_total_requests",
        "slots",
        "span",
    )

    def __init__(self, span: float, *, slots: int = 20) -> None:
        if not span > 0:
            raise ValueError(f"span must be positive, got {span!r}")
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots!r}")
        self.span = span
        self.slots = slots
        self._per_second = slots / span  # ticks per second: multiply, never divide, per request
        self._requests = [0] * slots
        self._errors = [0] * slots
        self._histograms = [0] * (slots * _BUCKETS)  # slot s owns [s * _BUCKETS, (s+1) * ...)
        self._total_histogram = [0] * _BUCKETS
        self._total_requests = 0
        self._total_errors = 0
        self._tick = _NEVER
        self._slot = 0
        self._slot_base = 0

    def record(self, now: float, *, error: bool, latency: float) -> None:
        """Count one response that finished at `now` after `latency` seconds."""
        tick = floor(now * self._per_second)
        if tick > self._tick:
            self._advance(tick)
        # A clock that steps back a little (tick < self._tick) lands in the current slot.
        slot = self._slot
        self._requests[slot] += 1
        self._total_requests += 1
        if error:
            self._errors[slot] += 1
            self._total_errors += 1
        bucket = bisect_left(LATENCY_BOUNDS, latency)
        self._histograms[self._slot_base + bucket] += 1
        self._total_histogram[bucket] += 1

    def add(self, now: float, counts: TallyCounts) -> None:
        """Count a worker's drained tally as if its responses had finished at `now`."""
        tick = floor(now * self._per_second)
        if tick > self._tick:
            self._advance(tick)
        slot = self._slot
        self._requests[slot] += counts.requests
        self._total_requests += counts.requests
        self._errors[slot] += counts.errors
        self._total_errors += counts.errors
        base = self._slot_base
        for bucket, count in counts.buckets:
            self._histograms[base + bucket] += count
            self._total_histogram[bucket] += count

    def snapshot(self, now: float) -> WindowCounts:
        """The counts over the window ending at `now` (moving the window forward first)."""
        tick = floor(now * self._per_second)
        if tick > self._tick:
            self._advance(tick)
        requests = self._total_requests
        return WindowCounts(requests=requests, errors=self._total_errors, p99=self._p99(requests))

    def clear(self) -> None:
        """Forget everything, as if no request had been recorded."""
        self._requests = [0] * self.slots
        self._errors = [0] * self.slots
        self._histograms = [0] * (self.slots * _BUCKETS)
        self._total_histogram = [0] * _BUCKETS
        self._total_requests = 0
        self._total_errors = 0
        self._tick = _NEVER
        self._slot = 0
        self._slot_base = 0

    def _advance(self, tick: int) -> None:
        if tick - self._tick >= self.slots:
            self.clear()  # a jump past the whole span: everything has expired
        else:
            for passed in range(self._tick + 1, tick + 1):
                self._empty(passed % self.slots)
        self._tick = tick
        self._slot = tick % self.slots
        self._slot_base = self._slot * _BUCKETS

    def _empty(self, slot: int) -> None:
        requests = self._requests[slot]
        if not requests:
            return
        self._total_requests -= requests
        self._total_errors -= self._errors[slot]
        self._requests[slot] = 0
        self._errors[slot] = 0
        histograms, totals = self._histograms, self._total_histogram
        base = slot * _BUCKETS
        for bucket in range(_BUCKETS):
            count = histograms[base + bucket]
            if count:
                totals[bucket] -= count
                histograms[base + bucket] = 0

    def _p99(self, requests: int) -> float | None:
        return p99_of(self._total_histogram, requests)


def p99_of(histogram: Sequence[int], requests: int) -> float | None:
    """The p99 of `requests` observations counted in `histogram` (LATENCY_BUCKETS counts): the
    upper bound of its bucket, or None without requests."""
    if not requests:
        return None
    # The p99 is the observation of rank ceil(0.99 n) (nearest rank); `above` of them lie
    # above it. Scanning from the slow end finds its bucket in a few steps.
    above = requests - (99 * requests + 99) // 100
    bucket = _BUCKETS - 1
    seen = histogram[bucket]
    while seen <= above:
        bucket -= 1
        seen += histogram[bucket]
    return _UPPER[bucket]
