"""Guard verdicts: not enough evidence never trips, each limit trips with its reason, and two
equally failing versions never look like a regression over a long simulated run."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Final

from hypothesis import given
from hypothesis import strategies as st

from proxy.core.config import Guard
from proxy.core.guard import Assessment, assess
from proxy.core.window import SlidingWindow, WindowCounts

GUARD: Final = Guard(
    window=10.0, min_requests=20, max_error_rate=0.05, max_error_rate_increase=0.02
)
QUIET: Final = WindowCounts(requests=0, errors=0, p99=None)
BUSY_STABLE: Final = WindowCounts(requests=9_000, errors=90, p99=0.1)  # 1 %


def counts(requests: int, errors: int = 0, p99: float | None = 0.1) -> WindowCounts:
    return WindowCounts(requests=requests, errors=errors, p99=p99)


def test_one_request_short_of_min_requests_never_trips_even_if_every_request_failed() -> None:
    verdict = assess(GUARD, canary=counts(19, 19, p99=60.0), stable=counts(9_000))
    assert verdict == Assessment(
        verdict="inconclusive", reason="19 canary requests in 10s, need 20"
    )


@given(
    requests=st.integers(min_value=0, max_value=GUARD.min_requests - 1),
    errors=st.integers(min_value=0, max_value=GUARD.min_requests - 1),
    p99=st.none() | st.floats(min_value=0.0, allow_nan=False),
    stable_requests=st.integers(min_value=0, max_value=100_000),
)
def test_a_canary_below_min_requests_is_inconclusive_whatever_else_the_windows_say(
    requests: int, errors: int, p99: float | None, stable_requests: int
) -> None:
    guard = Guard(
        window=10.0,
        min_requests=20,
        max_error_rate=0.0,
        max_error_rate_increase=0.0,
        max_p99_latency=0.001,
    )
    canary = counts(requests, min(errors, requests), p99)
    assert assess(guard, canary=canary, stable=counts(stable_requests)).verdict == "inconclusive"


def test_the_first_window_with_enough_canary_requests_and_a_breach_trips() -> None:
    canary, stable = SlidingWindow(10.0), SlidingWindow(10.0)
    verdicts: list[Assessment] = []
    now = 1_000.0
    for _ in range(GUARD.min_requests):  # the canary fails everything, one request per 0.1 s
        now += 0.1
        canary.record(now, error=True, latency=0.02)
        for _ in range(9):
            stable.record(now, error=False, latency=0.02)
        verdicts.append(assess(GUARD, canary=canary.snapshot(now), stable=stable.snapshot(now)))
    assert [v.verdict for v in verdicts] == ["inconclusive"] * 19 + ["breach"]
    assert verdicts[-1].reason == "canary error rate 1 > 0.05 over 10s (20/20)"


def test_an_error_rate_above_the_limit_is_a_breach_naming_rate_limit_window_and_counts() -> None:
    verdict = assess(GUARD, canary=counts(200, 62), stable=QUIET)
    assert verdict == Assessment(
        verdict="breach", reason="canary error rate 0.31 > 0.05 over 10s (62/200)"
    )


def test_an_error_rate_exactly_at_the_limit_is_healthy() -> None:
    assert assess(GUARD, canary=counts(200, 10), stable=QUIET).verdict == "healthy"


def test_a_rate_just_above_the_limit_shows_enough_digits_to_see_why() -> None:
    verdict = assess(GUARD, canary=counts(1_000, 51), stable=QUIET)
    assert verdict.reason == "canary error rate 0.051 > 0.05 over 10s (51/1000)"


def test_a_p99_above_the_limit_is_a_breach() -> None:
    guard = Guard(window=10.0, max_p99_latency=0.5)
    verdict = assess(guard, canary=counts(1_000, 0, p99=0.8123), stable=QUIET)
    assert verdict == Assessment(verdict="breach", reason="canary p99 0.812s > 0.5s over 10s")


def test_a_p99_in_the_overflow_bucket_says_slower_than_the_last_bound() -> None:
    guard = Guard(window=10.0, max_p99_latency=2.0)
    verdict = assess(guard, canary=counts(1_000, 0, p99=float("inf")), stable=QUIET)
    assert verdict.reason == "canary p99 >60s > 2s over 10s"


def test_a_p99_at_the_limit_or_without_a_latency_limit_is_healthy() -> None:
    at_limit = Guard(window=10.0, max_p99_latency=0.5)
    assert assess(at_limit, canary=counts(1_000, p99=0.5), stable=QUIET).verdict == "healthy"
    assert assess(GUARD, canary=counts(1_000, p99=30.0), stable=QUIET).verdict == "healthy"


def test_a_significant_increase_over_stable_beyond_the_limit_is_a_breach() -> None:
    # 5 % is not above max_error_rate, but it is five times stable's 1 %.
    verdict = assess(GUARD, canary=counts(1_000, 50), stable=BUSY_STABLE)
    assert verdict == Assessment(
        verdict="breach",
        reason="canary error rate 0.05 exceeds stable 0.01 by 0.04 > 0.02 over 10s (z=10.1)",
    )


def test_an_increase_within_the_limit_is_healthy_however_significant() -> None:
    # +0.015 over stable from 9 000 canary requests is very significant, but allowed.
    verdict = assess(GUARD, canary=counts(9_000, 225), stable=BUSY_STABLE)
    assert verdict.verdict == "healthy"


def test_an_increase_beyond_the_limit_that_could_be_chance_is_not_a_breach() -> None:
    # One error in 20 canary requests is "+0.05" over a clean stable: z = 1.3 with the
    # continuity correction (3.0 without it), far too little evidence to roll back on.
    verdict = assess(GUARD, canary=counts(20, 1), stable=counts(180, 0))
    assert verdict.verdict == "healthy"


def test_the_increase_is_ignored_while_stable_has_fewer_than_min_requests() -> None:
    increase_only = Guard(
        window=10.0, min_requests=20, max_error_rate=1.0, max_error_rate_increase=0.02
    )
    canary = counts(1_000, 500)
    assert assess(increase_only, canary=canary, stable=counts(19, 0)).verdict == "healthy"
    assert assess(increase_only, canary=canary, stable=counts(20, 0)).verdict == "breach"


def test_without_an_increase_limit_only_the_absolute_rate_counts() -> None:
    guard = Guard(window=10.0, max_error_rate=0.05)
    assert assess(guard, canary=counts(1_000, 50), stable=BUSY_STABLE).verdict == "healthy"


def test_the_reason_names_the_error_rate_first_then_the_increase_then_latency() -> None:
    guard = Guard(
        window=10.0,
        max_error_rate=0.05,
        max_error_rate_increase=0.02,
        max_p99_latency=0.5,
    )
    all_three = assess(guard, canary=counts(1_000, 300, p99=5.0), stable=BUSY_STABLE)
    increase_and_latency = assess(guard, canary=counts(1_000, 50, p99=5.0), stable=BUSY_STABLE)
    assert all_three.reason.startswith("canary error rate 0.3 > 0.05")
    assert increase_and_latency.reason.startswith("canary error rate 0.05 exceeds stable")


def test_a_healthy_verdict_summarises_rate_p99_window_and_requests() -> None:
    verdict = assess(GUARD, canary=counts(1_000, 10, p99=0.12), stable=BUSY_STABLE)
    assert verdict == Assessment(
        verdict="healthy",
        reason="canary error rate 0.01 <= 0.05, p99 0.12s over 10s (1000 requests)",
    )


def test_window_seconds_are_written_without_trailing_zeros() -> None:
    guard = Guard(window=2.5, min_requests=20)
    assert assess(guard, canary=counts(3), stable=QUIET).reason == (
        "3 canary requests in 2.5s, need 20"
    )


def test_a_guard_needing_no_requests_is_healthy_on_an_empty_window() -> None:
    guard = Guard(window=10.0, min_requests=0)
    assert assess(guard, canary=QUIET, stable=QUIET).reason == (
        "canary error rate 0 <= 0.05, p99 n/a over 10s (0 requests)"
    )


def test_the_verdict_does_not_depend_on_the_action() -> None:
    # `observe` is the shell's business: it records the same verdict and changes nothing.
    observe = Guard(window=10.0, action="observe")
    rollback = Guard(window=10.0, action="rollback")
    canary = counts(200, 62)
    assert assess(observe, canary=canary, stable=QUIET) == assess(
        rollback, canary=canary, stable=QUIET
    )


# Simulations: 1 000 requests per simulated second, 10 % to the canary, evaluated every 250 ms.

RATE: Final = 1_000  # requests per simulated second
CANARY_SHARE: Final = 0.1
EVERY: Final = RATE // 4  # requests between evaluations: 250 ms


@dataclass(kw_only=True)
class Run:
    evaluations: int = 0
    breaches: list[tuple[float, str]] = field(default_factory=list)
    enough_at: float | None = None  # first evaluation with min_requests canary requests


def simulate(
    guard: Guard,
    *,
    seconds: float,
    seed: int,
    stable_rate: float,
    canary_rate: float,
    canary_rate_from: float = 0.0,
    stop_at_breach: bool = False,
) -> Run:
    rng = random.Random(seed)
    canary, stable = SlidingWindow(guard.window), SlidingWindow(guard.window)
    run = Run()
    for i in range(1, int(seconds * RATE) + 1):
        now = i / RATE
        if rng.random() < CANARY_SHARE:
            rate = canary_rate if now >= canary_rate_from else stable_rate
            canary.record(now, error=rng.random() < rate, latency=rng.expovariate(20.0))
        else:
            stable.record(now, error=rng.random() < stable_rate, latency=rng.expovariate(20.0))
        if i % EVERY == 0:
            _evaluate(guard, run, now, canary=canary.snapshot(now), stable=stable.snapshot(now))
            if stop_at_breach and run.breaches:
                break
    return run


def _evaluate(
    guard: Guard, run: Run, now: float, *, canary: WindowCounts, stable: WindowCounts
) -> None:
    run.evaluations += 1
    verdict = assess(guard, canary=canary, stable=stable)
    if verdict.verdict == "breach":
        run.breaches.append((now, verdict.reason))
    if run.enough_at is None and canary.requests >= guard.min_requests:
        run.enough_at = now


def test_two_versions_failing_at_the_same_one_percent_for_ten_minutes_never_breach() -> None:
    # With these settings about 1 rollout in 30 still sees a false alarm in its first seconds:
    # the absolute limit alone trips when 2 of the first 20-40 canary requests fail (measured
    # over 1 000 seeds: 2.6 % absolute, 1.0 % increase; none after the first 4 s). This seed is
    # one of the other 96 %; the steady state never comes near a limit.
    run = simulate(GUARD, seconds=600, seed=1, stable_rate=0.01, canary_rate=0.01)
    assert run.evaluations == 2_400
    assert run.breaches == []


def test_a_canary_failing_five_times_as_often_as_stable_trips_within_a_few_evaluations() -> None:
    run = simulate(
        GUARD, seconds=60, seed=1, stable_rate=0.01, canary_rate=0.05, stop_at_breach=True
    )
    assert run.enough_at is not None
    assert run.breaches
    breached_at, _ = run.breaches[0]
    assert breached_at - run.enough_at <= 2.0  # 8 evaluations of 250 ms


def test_the_increase_limit_alone_detects_a_canary_failing_five_times_as_often() -> None:
    # max_error_rate 1.0 can never trip, so this breach is the comparison with stable.
    increase_only = Guard(
        window=10.0, min_requests=20, max_error_rate=1.0, max_error_rate_increase=0.02
    )
    run = simulate(
        increase_only,
        seconds=60,
        seed=2,
        stable_rate=0.01,
        canary_rate=0.05,
        stop_at_breach=True,
    )
    assert run.enough_at is not None
    assert run.breaches
    breached_at, reason = run.breaches[0]
    assert "exceeds stable" in reason
    # The z-test wants ~100 canary requests for a 4-point difference, not just min_requests:
    # over 1 000 seeds the breach came 1 s after min_requests at the median, 4.5 s at the p99.
    assert breached_at - run.enough_at <= 5.0


def test_a_regression_in_mid_run_trips_once_it_fills_enough_of_the_window() -> None:
    # The window still holds up to 10 s of healthy canary traffic when the canary turns bad,
    # so the rate it sees climbs over the window; the increase limit is crossed about halfway.
    run = simulate(
        GUARD,
        seconds=60,
        seed=3,
        stable_rate=0.01,
        canary_rate=0.05,
        canary_rate_from=30.0,
        stop_at_breach=True,
    )
    assert run.breaches
    breached_at, _ = run.breaches[0]
    assert 30.0 < breached_at <= 30.0 + GUARD.window
