"""Pure guard verdicts: healthy, breach or inconclusive, each with a reason (docs/semantics.md).

Like Argo Rollouts' analysis, too little evidence is its own outcome: an inconclusive window
holds the rollout where it is and never rolls it back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

from proxy.core.config import Guard
from proxy.core.vocabulary import Verdict
from proxy.core.window import LATENCY_BOUNDS, WindowCounts

# One-sided significance for "the canary fails more often than stable": for two equal rates,
# z >= 3 happens by chance in about one window in 740 (before the increase limit is applied).
SIGNIFICANT_Z: Final = 3.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Assessment:
    verdict: Verdict
    reason: str


def assess(guard: Guard, *, canary: WindowCounts, stable: WindowCounts) -> Assessment:
    """Judge the canary's window (and stable's, for the increase) against the guard's limits.

    Several limits breached: the reason names the first of error rate, increase, latency.
    """
    window = _seconds(guard.window)
    if canary.requests < guard.min_requests:
        return Assessment(
            verdict="inconclusive",
            reason=f"{canary.requests} canary requests in {window}, need {guard.min_requests}",
        )
    over = f"over {window}"
    rate = canary.error_rate
    if rate > guard.max_error_rate:
        return _breach(
            f"canary error rate {_rate(rate)} > {_rate(guard.max_error_rate)} {over} "
            f"({canary.errors}/{canary.requests})"
        )
    increase = _increase_breach(guard, canary=canary, stable=stable, over=over)
    if increase is not None:
        return _breach(increase)
    limit = guard.max_p99_latency
    if limit is not None and canary.p99 is not None and canary.p99 > limit:
        return _breach(f"canary p99 {_latency(canary.p99)} > {_latency(limit)} {over}")
    p99 = "n/a" if canary.p99 is None else _latency(canary.p99)
    return Assessment(
        verdict="healthy",
        reason=f"canary error rate {_rate(rate)} <= {_rate(guard.max_error_rate)}, "
        f"p99 {p99} {over} ({canary.requests} requests)",
    )


def _increase_breach(
    guard: Guard, *, canary: WindowCounts, stable: WindowCounts, over: str
) -> str | None:
    limit = guard.max_error_rate_increase
    if limit is None or stable.requests < guard.min_requests:
        return None  # stable's rate from a handful of requests is no baseline
    difference = canary.error_rate - stable.error_rate
    if difference <= limit:
        return None
    # Two noisy rates differ by chance all the time, and most at low traffic: 1 error in 20
    # canary requests against 1 in 100 on stable is "+0.04" with no evidence behind it. That is
    # where a comparing guard's false alarms come from, so the difference must also be
    # significant (one-sided two-proportion z-test, pooled proportion).
    z = _z_score(canary, stable)
    if z < SIGNIFICANT_Z:
        return None
    return (
        f"canary error rate {_rate(canary.error_rate)} exceeds stable "
        f"{_rate(stable.error_rate)} by {_rate(difference)} > {_rate(limit)} {over} (z={z:.1f})"
    )


def _z_score(canary: WindowCounts, stable: WindowCounts) -> float:
    """One-sided two-proportion z (pooled), with Yates' continuity correction.

    The normal approximation is at its worst with a handful of errors in the window, which is
    every rollout's first seconds: uncorrected, 1 error in 20 canary requests against 0 in 180
    on stable already scores z = 3.0. Corrected, it scores 1.3.
    """
    pooled = (canary.errors + stable.errors) / (canary.requests + stable.requests)
    spread = 1.0 / canary.requests + 1.0 / stable.requests
    variance = pooled * (1.0 - pooled) * spread
    difference = canary.error_rate - stable.error_rate - 0.5 * spread
    # A zero pooled variance means both rates are 0 or both are 1, so no positive difference;
    # should it ever meet one, the difference is as certain as it gets.
    return difference / math.sqrt(variance) if variance > 0.0 else math.inf


def _breach(reason: str) -> Assessment:
    return Assessment(verdict="breach", reason=reason)


def _seconds(value: float) -> str:
    return f"{value:g}s"  # "10s", "2.5s": no trailing zeros


def _rate(value: float) -> str:
    return f"{value:.3g}"  # "0.31", "0.0504": enough digits to see why it is above a limit


def _latency(value: float) -> str:
    # The overflow bucket has no upper bound: all we know is "slower than the last bound".
    return f"{value:.3g}s" if math.isfinite(value) else f">{LATENCY_BOUNDS[-1]:g}s"
