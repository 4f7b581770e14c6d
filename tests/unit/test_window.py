"""Sliding windows: what falls inside the span, slot-by-slot expiry, clock jumps both ways, and a
p99 within the histogram's resolution; the structure never grows with traffic."""

from __future__ import annotations

import itertools
import math
import random
import tracemalloc
from bisect import bisect_left
from collections.abc import Callable
from typing import Final

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.core.window import (
    LATENCY_BOUNDS,
    Evidence,
    SlidingWindow,
    Tally,
    TallyCounts,
    Tee,
    WindowCounts,
)

SPAN: Final = 10.0
SLOTS: Final = 20
WIDTH: Final = SPAN / SLOTS  # 0.5 s: exact in binary, so slot edges are exact too
RESOLUTION: Final = max(b / a for a, b in itertools.pairwise(LATENCY_BOUNDS))


def exact_p99(latencies: list[float]) -> float:
    """Nearest-rank p99: the observation of rank ceil(0.99 n) in sorted order."""
    ordered = sorted(latencies)
    return ordered[math.ceil(0.99 * len(ordered)) - 1]


def window_with(latencies: list[float], *, now: float = 1.0) -> SlidingWindow:
    window = SlidingWindow(SPAN, slots=SLOTS)
    for latency in latencies:
        window.record(now, error=False, latency=latency)
    return window


def bucket_of(latency: float) -> float | None:
    """The upper bound of the bucket a lone request of this latency reports as the p99."""
    return window_with([latency]).snapshot(1.0).p99


def test_an_empty_window_has_no_requests_no_errors_no_p99_and_a_zero_error_rate() -> None:
    counts = SlidingWindow(SPAN).snapshot(123.0)
    assert counts == WindowCounts(requests=0, errors=0, p99=None)
    assert counts.error_rate == 0.0


def test_the_error_rate_is_errors_over_requests() -> None:
    assert WindowCounts(requests=200, errors=62, p99=0.1).error_rate == pytest.approx(0.31)


def test_every_request_and_error_recorded_inside_the_span_is_counted() -> None:
    window = SlidingWindow(SPAN, slots=SLOTS)
    now = 100.0
    for i in range(40):  # one request every 0.25 s for 10 s, every fourth an error
        window.record(now + i * 0.25, error=i % 4 == 0, latency=0.01)
    counts = window.snapshot(now + 9.75)
    assert (counts.requests, counts.errors) == (40, 10)


def test_slots_expire_one_at_a_time_as_the_window_slides_past_them() -> None:
    window = SlidingWindow(SPAN, slots=SLOTS)
    for slot in range(SLOTS):  # slot k gets k + 1 requests, all errors in even slots
        for _ in range(slot + 1):
            window.record(slot * WIDTH, error=slot % 2 == 0, latency=0.01)
    total = SLOTS * (SLOTS + 1) // 2
    assert window.snapshot(SPAN - WIDTH).requests == total
    for expired in range(SLOTS):
        counts = window.snapshot(SPAN + expired * WIDTH)  # enters tick SLOTS + expired
        assert counts.requests == total - sum(k + 1 for k in range(expired + 1))
        assert counts.errors == sum(k + 1 for k in range(expired + 1, SLOTS) if k % 2 == 0)
    assert window.snapshot(2 * SPAN).requests == 0


def test_a_request_stays_in_the_window_for_between_span_minus_one_slot_and_span() -> None:
    window = SlidingWindow(SPAN, slots=SLOTS)
    window.record(0.49, error=True, latency=0.01)  # late in the first slot [0, 0.5)
    assert window.snapshot(SPAN - 0.01).requests == 1
    assert window.snapshot(SPAN).requests == 0


def test_a_jump_further_than_the_span_forgets_everything() -> None:
    window = window_with([0.01] * 50, now=5.0)
    window.record(5.0, error=True, latency=0.2)
    assert window.snapshot(5.0 + SPAN + 0.75) == WindowCounts(requests=0, errors=0, p99=None)
    window.record(5.0 + SPAN + 1.0, error=False, latency=0.02)
    assert window.snapshot(5.0 + SPAN + 1.0).requests == 1


def test_recording_after_a_long_silence_counts_only_the_new_request() -> None:
    window = window_with([0.01] * 50, now=5.0)
    window.record(1_000.0, error=True, latency=0.2)
    assert window.snapshot(1_000.0) == WindowCounts(requests=1, errors=1, p99=bucket_of(0.2))


def test_a_clock_that_steps_back_records_into_the_current_slot_without_crashing() -> None:
    window = SlidingWindow(SPAN, slots=SLOTS)
    window.record(50.0, error=False, latency=0.01)
    window.record(49.8, error=True, latency=0.01)  # jitter into the previous slot's time
    window.record(45.0, error=True, latency=0.01)  # even a big step back is only clamped
    assert window.snapshot(49.9) == window.snapshot(50.0)
    assert (window.snapshot(50.0).requests, window.snapshot(50.0).errors) == (3, 2)
    # All three live in the slot of t=50, so they expire together with it.
    assert window.snapshot(59.99).requests == 3
    assert window.snapshot(60.0).requests == 0


def test_clear_forgets_everything_and_the_window_works_afterwards() -> None:
    window = window_with([0.01, 0.5, 3.0], now=7.0)
    window.clear()
    assert window.snapshot(7.0) == WindowCounts(requests=0, errors=0, p99=None)
    window.record(7.0, error=True, latency=0.01)
    assert window.snapshot(7.0).errors == 1


def test_a_single_slot_window_empties_on_each_new_tick() -> None:
    window = SlidingWindow(1.0, slots=1)
    window.record(3.2, error=True, latency=0.01)
    window.record(3.9, error=False, latency=0.01)
    assert window.snapshot(3.99).requests == 2
    assert window.snapshot(4.0).requests == 0


@pytest.mark.parametrize(("span", "slots"), [(0.0, 20), (-1.0, 20), (math.nan, 20), (10.0, 0)])
def test_a_window_needs_a_positive_span_and_at_least_one_slot(span: float, slots: int) -> None:
    with pytest.raises(ValueError, match="must be"):
        SlidingWindow(span, slots=slots)


def test_latency_bounds_are_log_spaced_from_half_a_millisecond_to_a_minute() -> None:
    assert LATENCY_BOUNDS[0] == 0.0005
    assert LATENCY_BOUNDS[-1] == 60.0
    assert list(LATENCY_BOUNDS) == sorted(set(LATENCY_BOUNDS))
    assert RESOLUTION <= 1.15


@pytest.mark.parametrize(
    ("latency", "p99"),
    [
        (0.0, LATENCY_BOUNDS[0]),
        (-0.002, LATENCY_BOUNDS[0]),  # a clock stepping back mid-request: fastest bucket
        (LATENCY_BOUNDS[10], LATENCY_BOUNDS[10]),  # a bound is inside its own bucket (`le`)
        (LATENCY_BOUNDS[10] * 1.0001, LATENCY_BOUNDS[11]),
        (60.0, 60.0),
        (60.01, math.inf),  # the overflow bucket has no upper bound
    ],
)
def test_a_latency_lands_in_the_bucket_whose_upper_bound_is_the_first_at_or_above_it(
    latency: float, p99: float
) -> None:
    assert bucket_of(latency) == p99


def test_the_p99_is_the_nearest_rank_observation_not_an_outlier_beyond_it() -> None:
    one_slow = [0.01] * 99 + [5.0]  # rank ceil(99) = 99: still fast
    two_slow = [0.01] * 98 + [5.0] * 2  # rank 99 is slow
    assert window_with(one_slow).snapshot(1.0).p99 == bucket_of(0.01)
    assert window_with(two_slow).snapshot(1.0).p99 == bucket_of(5.0)


def _uniform(rng: random.Random) -> float:
    return rng.uniform(0.001, 2.0)


def _lognormal(rng: random.Random) -> float:
    return rng.lognormvariate(math.log(0.05), 0.8)


def _exponential(rng: random.Random) -> float:
    return rng.expovariate(1 / 0.03)


def _bimodal(rng: random.Random) -> float:  # a cache: mostly hits, 3 % slow misses
    return rng.gauss(0.4, 0.05) if rng.random() < 0.03 else rng.gauss(0.004, 0.001)


def _pareto(rng: random.Random) -> float:  # heavy tail
    return 0.002 * rng.paretovariate(1.5)


@pytest.mark.parametrize("draw", [_uniform, _lognormal, _exponential, _bimodal, _pareto])
@pytest.mark.parametrize("count", [100, 1_000, 20_000])
def test_the_p99_is_within_one_bucket_above_the_exact_p99(
    draw: Callable[[random.Random], float], count: int
) -> None:
    rng = random.Random(f"{draw.__name__}-{count}")
    latencies = [draw(rng) for _ in range(count)]
    exact = exact_p99(latencies)
    estimate = window_with(latencies).snapshot(1.0).p99
    assert estimate is not None
    assert exact <= estimate <= exact * RESOLUTION


@given(
    st.lists(
        st.floats(min_value=LATENCY_BOUNDS[0], max_value=LATENCY_BOUNDS[-1]),
        min_size=1,
        max_size=500,
    )
)
def test_any_latencies_in_range_give_a_p99_at_most_one_bucket_above_the_exact_one(
    latencies: list[float],
) -> None:
    exact = exact_p99(latencies)
    estimate = window_with(latencies).snapshot(1.0).p99
    assert estimate is not None
    assert exact <= estimate <= exact * RESOLUTION


def test_the_p99_forgets_expired_slow_requests() -> None:
    window = SlidingWindow(SPAN, slots=SLOTS)
    for _ in range(10):
        window.record(0.0, error=False, latency=2.0)
    for i in range(100):
        window.record(5.0 + i * 0.05, error=False, latency=0.01)
    assert window.snapshot(9.99).p99 == bucket_of(2.0)
    assert window.snapshot(10.0).p99 == bucket_of(0.01)


def _traffic(window: SlidingWindow, *, start: float, requests: int, rng: random.Random) -> float:
    # 2 000 requests per simulated second, so every slot of the ring is entered many times.
    now = start
    for _ in range(requests):
        now += 0.0005
        window.record(now, error=rng.random() < 0.01, latency=rng.expovariate(20.0))
    window.snapshot(now)
    return now


def test_the_memory_a_window_holds_does_not_grow_with_the_number_of_records() -> None:
    rng = random.Random(7)
    window = SlidingWindow(SPAN, slots=SLOTS)
    now = _traffic(window, start=0.0, requests=20_000, rng=rng)  # every code path warmed up
    tracemalloc.start()
    try:
        now = _traffic(window, start=now, requests=1_000, rng=rng)
        after_few = tracemalloc.get_traced_memory()[0]
        _traffic(window, start=now, requests=200_000, rng=rng)  # 100 s: five trips round
        after_many = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert after_many - after_few < 4_096  # a few boxed ints at most, never per record


# -- across processes: a worker's Tally, added to the supervisor's window -------------------------

Outcome = tuple[bool, float]  # error?, latency

OUTCOMES: Final = st.lists(
    st.tuples(st.booleans(), st.floats(min_value=-1.0, max_value=120.0)), max_size=300
)


def tally_of(outcomes: list[Outcome], *, now: float = 1.0) -> Tally:
    tally = Tally()
    for error, latency in outcomes:
        tally.record(now, error=error, latency=latency)
    return tally


def recorded(outcomes: list[Outcome], *, now: float) -> SlidingWindow:
    window = SlidingWindow(SPAN, slots=SLOTS)
    for error, latency in outcomes:
        window.record(now, error=error, latency=latency)
    return window


def added(outcomes: list[Outcome], *, now: float) -> SlidingWindow:
    window = SlidingWindow(SPAN, slots=SLOTS)
    counts = tally_of(outcomes).drain()
    if counts is not None:
        window.add(now, counts)
    return window


def test_evidence_is_only_an_interface_whose_record_must_be_overridden() -> None:
    with pytest.raises(NotImplementedError):
        Evidence().record(1.0, error=False, latency=0.01)
    assert isinstance(Tally(), Evidence)
    assert isinstance(SlidingWindow(SPAN), Evidence)


def test_a_tally_counts_requests_errors_and_the_latency_bucket_of_each_response() -> None:
    tally = Tally()
    tally.record(1.0, error=False, latency=0.0)  # at or below the fastest bound: bucket 0
    tally.record(2.0, error=True, latency=LATENCY_BOUNDS[10])  # a bound is in its own bucket
    tally.record(3.0, error=False, latency=LATENCY_BOUNDS[10] * 1.0001)
    tally.record(4.0, error=True, latency=LATENCY_BOUNDS[10])
    tally.record(5.0, error=False, latency=60.01)  # the overflow bucket, after the last bound
    assert tally.drain() == TallyCounts(
        requests=5, errors=2, buckets=((0, 1), (10, 2), (11, 1), (len(LATENCY_BOUNDS), 1))
    )


def test_a_tally_counts_responses_whatever_time_they_finished_at() -> None:
    # The supervisor places a tally in time when it arrives: `now` plays no part.
    tally = Tally()
    for now in (1.0, 1_000.0, -5.0, 1.0):
        tally.record(now, error=False, latency=0.01)
    counts = tally.drain()
    assert counts is not None
    assert counts.requests == 4


def test_an_empty_tally_drains_to_none() -> None:
    assert Tally().drain() is None


def test_draining_empties_the_tally_so_the_next_drain_has_only_what_came_after() -> None:
    tally = tally_of([(True, 0.01), (False, 2.0)])
    assert tally.drain() == TallyCounts(
        requests=2,
        errors=1,
        buckets=((bisect_left(LATENCY_BOUNDS, 0.01), 1), (bisect_left(LATENCY_BOUNDS, 2.0), 1)),
    )
    assert (tally.requests, tally.errors, tally.buckets) == (0, 0, {})
    assert tally.drain() is None
    tally.record(9.0, error=False, latency=0.5)
    assert tally.drain() == TallyCounts(
        requests=1, errors=0, buckets=((bisect_left(LATENCY_BOUNDS, 0.5), 1),)
    )
    assert tally.drain() is None


@given(OUTCOMES)
def test_a_drained_tally_lists_only_non_empty_buckets_in_order_and_adds_up(
    outcomes: list[Outcome],
) -> None:
    counts = tally_of(outcomes).drain()
    if not outcomes:
        assert counts is None
        return
    assert counts is not None
    assert counts.requests == len(outcomes)
    assert counts.errors == sum(error for error, _ in outcomes)
    indices = [bucket for bucket, _ in counts.buckets]
    assert indices == sorted(set(indices))
    assert all(0 <= bucket <= len(LATENCY_BOUNDS) for bucket in indices)
    assert all(count > 0 for _, count in counts.buckets)
    assert sum(count for _, count in counts.buckets) == len(outcomes)


@given(OUTCOMES, st.floats(min_value=0.0, max_value=1e6))
def test_a_tally_added_to_a_window_reads_as_the_same_responses_recorded_one_by_one(
    outcomes: list[Outcome], now: float
) -> None:
    by_one = recorded(outcomes, now=now).snapshot(now)
    assert added(outcomes, now=now).snapshot(now) == by_one
    assert by_one.requests == len(outcomes)  # not vacuous: the window kept them all


@pytest.mark.parametrize(
    "latencies",
    [
        [0.01] * 99 + [5.0],  # the p99 is the nearest rank: still fast
        [0.01] * 98 + [5.0] * 2,  # rank 99 is slow
        [0.01] * 50 + [61.0] * 50,  # overflow: no upper bound
        [LATENCY_BOUNDS[3]] * 10 + [LATENCY_BOUNDS[3] * 1.0001] * 1_000,
    ],
)
def test_an_added_tally_gives_the_p99_of_recording_one_by_one(latencies: list[float]) -> None:
    outcomes = [(False, latency) for latency in latencies]
    expected = recorded(outcomes, now=1.0).snapshot(1.0)
    assert expected.p99 is not None
    assert added(outcomes, now=1.0).snapshot(1.0) == expected


def test_tallies_added_one_after_another_sum_up_with_recorded_responses() -> None:
    window = SlidingWindow(SPAN, slots=SLOTS)
    window.record(3.0, error=True, latency=0.02)
    window.add(3.0, TallyCounts(requests=4, errors=1, buckets=((5, 3), (60, 1))))
    window.add(3.2, TallyCounts(requests=2, errors=2, buckets=((60, 2),)))
    counts = window.snapshot(3.2)
    assert (counts.requests, counts.errors) == (7, 4)
    assert counts.p99 == LATENCY_BOUNDS[60]


def test_added_counts_expire_with_the_slot_of_the_time_they_were_added_at() -> None:
    by_one = SlidingWindow(SPAN, slots=SLOTS)
    by_tally = SlidingWindow(SPAN, slots=SLOTS)
    for slot in range(SLOTS):  # slot k: k + 1 requests, errors in even ones, slowest first
        outcomes = [(slot % 2 == 0, 0.001 * (SLOTS - slot))] * (slot + 1)
        for error, latency in outcomes:
            by_one.record(slot * WIDTH, error=error, latency=latency)
        counts = tally_of(outcomes).drain()
        assert counts is not None
        by_tally.add(slot * WIDTH, counts)
    total = SLOTS * (SLOTS + 1) // 2
    assert by_tally.snapshot(SPAN - WIDTH).requests == total
    for expired in range(SLOTS):
        now = SPAN + expired * WIDTH
        assert by_tally.snapshot(now) == by_one.snapshot(now)
        assert by_tally.snapshot(now).requests == total - sum(k + 1 for k in range(expired + 1))
    assert by_tally.snapshot(2 * SPAN) == WindowCounts(requests=0, errors=0, p99=None)


def test_the_p99_forgets_an_added_tallys_slow_requests_once_they_expire() -> None:
    window = SlidingWindow(SPAN, slots=SLOTS)
    slow = tally_of([(False, 2.0)] * 10).drain()
    assert slow is not None
    window.add(0.0, slow)
    window.add(5.0, TallyCounts(requests=100, errors=0, buckets=((22, 100),)))
    assert window.snapshot(9.99).p99 == bucket_of(2.0)
    assert window.snapshot(10.0) == WindowCounts(requests=100, errors=0, p99=LATENCY_BOUNDS[22])


def test_adding_moves_the_window_forward_and_expires_what_is_older_than_the_span() -> None:
    window = SlidingWindow(SPAN, slots=SLOTS)
    for _ in range(5):
        window.record(0.0, error=True, latency=3.0)
    window.add(SPAN, TallyCounts(requests=3, errors=0, buckets=((5, 3),)))
    # Read at a time before the add: the window has moved on already, and does not go back.
    assert window.snapshot(0.0) == WindowCounts(requests=3, errors=0, p99=LATENCY_BOUNDS[5])


def test_adding_after_a_long_silence_counts_only_the_added_tally() -> None:
    window = window_with([0.01] * 50, now=5.0)
    window.add(1_000.0, TallyCounts(requests=1, errors=1, buckets=((40, 1),)))
    assert window.snapshot(1_000.0) == WindowCounts(requests=1, errors=1, p99=LATENCY_BOUNDS[40])


def test_a_tally_added_with_a_clock_that_steps_back_lands_in_the_current_slot() -> None:
    window = SlidingWindow(SPAN, slots=SLOTS)
    window.record(50.0, error=False, latency=0.01)
    window.add(45.0, TallyCounts(requests=2, errors=1, buckets=((20, 2),)))
    window.add(50.0, TallyCounts(requests=1, errors=0, buckets=((20, 1),)))  # the same tick
    assert (window.snapshot(50.0).requests, window.snapshot(50.0).errors) == (4, 1)
    assert window.snapshot(59.99).requests == 4  # all of them live in the slot of t=50
    assert window.snapshot(60.0).requests == 0


def test_a_tee_records_each_response_in_the_window_and_in_the_fleets_tally() -> None:
    window = SlidingWindow(10.0)
    tally = Tally()
    tee = Tee(window, tally)
    tee.record(100.0, error=True, latency=0.02)
    tee.record(100.0, error=False, latency=0.02)
    assert window.snapshot(100.0).requests == 2
    assert window.snapshot(100.0).errors == 1
    assert tally.drain() == TallyCounts(
        requests=2, errors=1, buckets=((bisect_left(LATENCY_BOUNDS, 0.02), 2),)
    )


def test_a_tally_takes_another_tallys_drained_counts_on_top_of_its_own() -> None:
    worker, fleet = Tally(), Tally()
    worker.record(100.0, error=True, latency=0.001)
    fleet.record(100.0, error=False, latency=0.001)
    drained = worker.drain()
    assert drained is not None
    fleet.add(drained)
    assert fleet.drain() == TallyCounts(
        requests=2, errors=1, buckets=((bisect_left(LATENCY_BOUNDS, 0.001), 2),)
    )
