"""The demo's pure parts: its plan, the live view and status line drawn from a snapshot, and the
verdict on the story drawn from what the proxy recorded."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import replace

import pytest

from proxy.core.window import WindowCounts
from proxy.demo import (
    RECENT_LINES,
    Plan,
    RateMeter,
    Record,
    Snapshot,
    VersionNumbers,
    format_event,
    judge,
    new_events,
    plan_story,
    ramp_weights,
    render_live,
    render_status,
    version_numbers,
)

T0 = 1_700_000_000.0


def snapshot(**changes: object) -> Snapshot:
    view = Snapshot(
        scenario="failing",
        elapsed=12.4,
        duration=30.0,
        route="shop",
        state="progressing",
        weight_bp=5000,
        step=2,
        steps=3,
        window=3.0,
        canary_failing=False,
        stable=VersionNumbers(rate=101.3, requests=300, error_rate=0.0, p99=0.00851),
        canary=VersionNumbers(rate=99.1, requests=297, error_rate=0.081, p99=0.00996),
        recent=("+8.130s guard/advance: progressing 25% -> progressing 50%: advanced",),
    )
    return replace(view, **changes)  # type: ignore[arg-type]


def event(
    action: str, before: str, after: str, weights: tuple[int, int], at: float
) -> dict[str, object]:
    return {
        "route": "shop",
        "actor": "config" if action == "start" else "guard",
        "action": action,
        "before": before,
        "after": after,
        "weight_before_bp": weights[0],
        "weight_after_bp": weights[1],
        "reason": f"{action} reason",
        "at": T0 + at,
    }


RAMP = (
    event("start", "steady", "progressing", (0, 500), 0.0),
    event("advance", "progressing", "progressing", (500, 2500), 8.1),
    event("advance", "progressing", "progressing", (2500, 5000), 16.2),
)
ROLLBACK = event("rollback", "progressing", "aborted", (5000, 0), 19.75)
PROMOTED = event("advance", "progressing", "promoted", (5000, 10000), 24.3)


def record(plan: Plan, events: tuple[Mapping[str, object], ...], **changes: object) -> Record:
    base = Record(
        plan=plan,
        t0=T0,
        events=events,
        state="aborted",
        weight_bp=0,
        failure_started=T0 + 19.5,
        exposed_requests=16,
        exposed_users=14,
        users_seen_errors=16,
        cohort_users=151,
        stable_requests=5000,
        canary_requests=900,
        sent=5900,
        skipped=0,
        unanswered=0,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


FAILING = plan_story("failing", duration=30, rate=200)
HEALTHY = plan_story("healthy", duration=30, rate=200)


# -- the plan ------------------------------------------------------------------------------------


def test_the_ramp_interval_is_derived_from_the_duration_so_the_story_fits() -> None:
    assert FAILING.interval == 8.0
    assert plan_story("failing", duration=8, rate=200).interval == pytest.approx(8 / 3.75, 0.01)
    assert FAILING.steps == (5, 25, 50)
    assert HEALTHY.steps == (5, 25, 50, 100)
    assert FAILING.fail_after < FAILING.interval  # it fails before the 50 % step would end


def test_the_guard_asks_for_fewer_requests_than_the_first_step_will_see() -> None:
    plan = plan_story("failing", duration=8, rate=200)
    first_step = plan.rate * plan.steps[0] / 100 * plan.interval
    assert 3 <= plan.min_requests < first_step / 2
    assert FAILING.min_requests == 20  # capped, however much traffic there is


@pytest.mark.parametrize(
    ("duration", "rate", "complaint"),
    [
        (2.0, 200.0, "--duration must be at least"),
        (8.0, 0.0, "--rate must be more than 0"),
        (8.0, 5000.0, "--rate must be more than 0 and at most"),
        (8.0, 10.0, "too little traffic"),
    ],
)
def test_a_story_that_cannot_fit_is_refused_with_the_option_to_change(
    duration: float, rate: float, complaint: str
) -> None:
    with pytest.raises(ValueError, match=complaint):
        plan_story("failing", duration=duration, rate=rate)


# -- the live view and the status line ----------------------------------------------------------


def test_the_live_view_shows_weight_state_step_rates_errors_p99_and_events() -> None:
    text = "\n".join(render_live(snapshot(), width=200))
    assert "state progressing" in text
    assert "step 3/3" in text
    assert "canary weight  50.0 %" in text
    assert "[##########----------]" in text
    assert "101.3" in text
    assert "99.1" in text
    assert "8.10%" in text
    assert "9.96ms" in text
    assert "the guard's last 3 s" in text
    assert "+8.130s guard/advance" in text


def test_the_live_view_keeps_its_height_so_a_redraw_overwrites_it() -> None:
    empty = render_live(snapshot(recent=()), width=200)
    full = render_live(snapshot(recent=tuple(f"line {n}" for n in range(20))), width=200)
    assert len(empty) == len(full)
    assert "line 19" in full[-1]  # the newest lines are the ones shown
    assert not any("line 0" in line for line in full[-RECENT_LINES:])


def test_no_live_view_line_wraps_on_a_narrow_terminal() -> None:
    lines = render_live(snapshot(canary_failing=True), width=40)
    assert all(len(line) < 40 for line in lines)


def test_the_live_view_flags_a_failing_canary_and_an_aborted_route() -> None:
    calm = render_live(snapshot(), width=200)
    assert "FAILING" not in calm[0]
    failing = render_live(
        snapshot(canary_failing=True, state="aborted", weight_bp=0, step=None), width=200
    )
    assert "canary upstream FAILING" in failing[0]
    assert "state aborted" in failing[1]
    assert "step -" in failing[1]
    assert "[--------------------]" in failing[1]


def test_versions_without_traffic_show_dashes_not_zeros() -> None:
    quiet = VersionNumbers(rate=None, requests=0, error_rate=None, p99=None)
    status = render_status(snapshot(stable=quiet, canary=quiet))
    assert "stable - req/s, errors -, p99 -" in status


def test_the_status_line_is_one_line_with_the_route_and_both_versions() -> None:
    status = render_status(snapshot(elapsed=5.04))
    assert "\n" not in status
    assert status.startswith("+5.0s status shop: progressing 50% (step 3/3) | stable 101.3 req/s")
    assert "canary 99.1 req/s, errors 8.10%, p99 9.96ms" in status


def test_an_event_line_says_when_who_what_and_why() -> None:
    line = format_event(ROLLBACK, T0)
    assert line == "+19.750s guard/rollback: progressing 50% -> aborted 0%: rollback reason"


def test_version_numbers_come_from_the_guard_window() -> None:
    counts = WindowCounts(requests=200, errors=10, p99=0.0123)
    numbers = version_numbers(42.0, counts)
    assert numbers == VersionNumbers(rate=42.0, requests=200, error_rate=0.05, p99=0.0123)
    assert version_numbers(None, WindowCounts(requests=0, errors=0, p99=None)).error_rate is None
    assert version_numbers(1.0, None).requests == 0


# -- reading the proxy --------------------------------------------------------------------------


def test_new_events_are_found_by_identity_even_once_the_deque_is_full() -> None:
    events: deque[dict[str, object]] = deque(maxlen=3)
    events.extend([{"n": 1}, {"n": 2}, {"n": 3}])
    last = events[-1]
    assert new_events(events, None) == [{"n": 1}, {"n": 2}, {"n": 3}]
    events.extend([{"n": 4}, {"n": 5}])  # 1 and 2 fall off the left
    assert new_events(events, last) == [{"n": 4}, {"n": 5}]
    assert new_events(events, events[-1]) == []


def test_the_rate_meter_turns_the_proxys_counters_into_requests_per_second() -> None:
    meter = RateMeter(span=2.0)
    assert meter.sample(10.0, 0, 0) == (None, None)
    assert meter.sample(11.0, 100, 10) == (100.0, 10.0)
    assert meter.sample(13.0, 500, 10) == (200.0, 0.0)  # only the last two seconds count


def test_ramp_weights_are_the_steps_reached_in_order() -> None:
    assert ramp_weights((*RAMP, ROLLBACK)) == [500, 2500, 5000]
    assert ramp_weights((*RAMP, PROMOTED)) == [500, 2500, 5000, 10000]


# -- the verdict -------------------------------------------------------------------------------


def test_a_rollback_after_the_failure_is_the_failing_story_told() -> None:
    outcome = judge(record(FAILING, (*RAMP, ROLLBACK)))
    assert outcome.ok
    text = "\n".join(outcome.lines)
    assert "ramp:     5% -> 25% -> 50%" in text
    assert "failure:  the canary began failing at +19.500s" in text
    # 19.75 (the controller's event) - 19.5 (the canary's first 500), not a guess.
    assert "weight 50% -> 0% at +19.750s, 0.250 s after the canary began failing" in text
    assert "exposed:  16 requests got an error from the failing canary, from 14 distinct" in text
    assert "the users counted" not in text
    assert outcome.verdict.startswith("OK: the guard rolled the failing canary back")


def test_users_counting_other_errors_than_the_proxy_is_pointed_out() -> None:
    outcome = judge(record(FAILING, (*RAMP, ROLLBACK), users_seen_errors=15))
    assert "(the users counted 15 errors)" in "\n".join(outcome.lines)


def test_no_rollback_within_the_duration_fails_the_story() -> None:
    outcome = judge(record(FAILING, RAMP, state="progressing", weight_bp=5000))
    assert not outcome.ok
    assert outcome.verdict == "FAILED: no rollback within 30 s: route shop is progressing at 50%"


def test_a_rollback_before_the_canary_failed_fails_the_story() -> None:
    outcome = judge(record(FAILING, (*RAMP, ROLLBACK), failure_started=T0 + 20.0))
    assert not outcome.ok
    assert outcome.verdict.startswith("FAILED: the guard rolled back the canary before it failed")


def test_a_ramp_that_stalls_before_50_percent_fails_the_story() -> None:
    outcome = judge(
        record(FAILING, RAMP[:2], state="progressing", weight_bp=2500, failure_started=None)
    )
    assert not outcome.ok
    assert "the ramp reached only 25% in 30 s" in outcome.verdict


def test_a_promoted_canary_is_the_healthy_story_told() -> None:
    outcome = judge(
        record(HEALTHY, (*RAMP, PROMOTED), state="promoted", weight_bp=10000, exposed_requests=0)
    )
    assert outcome.ok
    text = "\n".join(outcome.lines)
    assert "ramp:     5% -> 25% -> 50% -> 100%" in text
    assert "promoted: at +24.300s" in text
    assert outcome.verdict == "OK: the canary was promoted; route shop is promoted at 100%"


def test_a_healthy_canary_rolled_back_or_not_promoted_fails_the_story() -> None:
    rolled_back = judge(record(HEALTHY, (*RAMP, ROLLBACK)))
    assert not rolled_back.ok
    assert rolled_back.verdict.startswith("FAILED: the guard rolled back a healthy canary")
    stalled = judge(record(HEALTHY, RAMP, state="progressing", weight_bp=5000))
    assert not stalled.ok
    assert "did not finish within 30 s" in stalled.verdict
