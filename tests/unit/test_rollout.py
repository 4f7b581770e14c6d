"""The rollout state machine stepped on a fake clock: every transition, every refusal, and the
JSON record that carries the state across restarts."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Final, Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.core.config import Guard, Match, Rollout, Route, Split, Upstream, Version
from proxy.core.rollout import (
    Change,
    RolloutError,
    RolloutState,
    Transition,
    abort,
    initial,
    on_breach,
    pause,
    promote,
    reconcile,
    refuse_aborted_revision,
    restore,
    resume,
    retry,
    set_weight,
    tick,
)
from proxy.core.vocabulary import STATES, GuardAction, State

RAMP: Final = (500, 2500, 5000, 10_000)  # 5 → 25 → 50 → 100 %
INTERVAL: Final = 60.0
MIN_REQUESTS: Final = 20
T0: Final = 1_000.0
EPSILON: Final = 1e-6


def _upstream(port: int) -> Upstream:
    return Upstream(url=f"http://127.0.0.1:{port}", host="127.0.0.1", port=port)


def make_route(
    *,
    steps: tuple[int, ...] | None = RAMP,
    weight_bp: int | None = None,
    interval: float = INTERVAL,
    guard: GuardAction | None = "rollback",
    min_requests: int = MIN_REQUESTS,
    revision: str | None = "v1",
    canary: bool = True,
) -> Route:
    """A route as the config parser builds it (a ramp's split weight is its first step)."""
    if weight_bp is None:
        weight_bp = steps[0] if steps and canary else 0
    return Route(
        name="shop",
        match=Match(),
        stable=Version(upstreams=(_upstream(8001),)),
        canary=Version(upstreams=(_upstream(8002),), revision=revision) if canary else None,
        split=Split(weight_bp=weight_bp, salt="shop"),
        rollout=None if steps is None else Rollout(steps_bp=steps, interval=interval),
        guard=None if guard is None else Guard(min_requests=min_requests, action=guard),
    )


RAMP_ROUTE: Final = make_route()
STATIC_ROUTE: Final = make_route(steps=None, weight_bp=1000)
NO_CANARY: Final = make_route(steps=None, guard=None, canary=False)


class Clock:
    """Fake time and a fake canary request counter, stepped by the test."""

    def __init__(self) -> None:
        self.now = T0
        self.canary_requests = 0

    def advance(self, seconds: float, *, requests: int = 0) -> float:
        self.now += seconds
        self.canary_requests += requests
        return self.now


def start(route: Route, clock: Clock | None = None) -> RolloutState:
    clock = clock or Clock()
    return initial(route, clock.now, canary_requests=clock.canary_requests)


def changed(change: Change) -> tuple[RolloutState, Transition]:
    state, transition = change
    assert transition is not None
    return state, transition


def on_tick(
    route: Route,
    state: RolloutState,
    clock: Clock,
    verdict: Literal["healthy", "breach", "inconclusive"] | None = "healthy",
) -> Change:
    return tick(route, state, clock.now, canary_requests=clock.canary_requests, verdict=verdict)


def end_of_step(state: RolloutState, requests: int = MIN_REQUESTS) -> Clock:
    """A clock at the end of the state's dwell, with `requests` canary requests in it."""
    clock = Clock()
    clock.now = state.step_started + INTERVAL
    clock.canary_requests = state.step_base_requests + requests
    return clock


def step_to(route: Route, weight_bp: int) -> RolloutState:
    """A ramp that has reached `weight_bp` through healthy intervals."""
    clock = Clock()
    state = start(route, clock)
    while state.weight_bp < weight_bp:
        clock.advance(INTERVAL, requests=MIN_REQUESTS)
        state, _ = on_tick(route, state, clock)
    assert state.weight_bp == weight_bp
    return state


# --- Where a route starts ------------------------------------------------------------------------


def test_a_route_without_steps_starts_steady_at_its_configured_weight() -> None:
    state = initial(STATIC_ROUTE, T0)
    assert (state.state, state.weight_bp, state.step, state.revision) == (
        "steady",
        1000,
        None,
        "v1",
    )
    assert state.reason == "static weight 10 % from the config"
    assert (state.step_started, state.updated, state.config_weight_bp) == (T0, T0, 1000)


def test_a_route_with_steps_starts_progressing_at_the_first_step() -> None:
    state = initial(RAMP_ROUTE, T0, canary_requests=7)
    assert (state.state, state.weight_bp, state.step) == ("progressing", 500, 0)
    assert (state.step_started, state.step_base_requests, state.breach_in_step) == (T0, 7, False)
    assert state.reason == "ramp starts at step 1/4 (5 %)"


def test_a_ramp_whose_only_step_is_100_percent_starts_promoted() -> None:
    state = initial(make_route(steps=(10_000,)), T0)
    assert (state.state, state.weight_bp, state.step) == ("promoted", 10_000, 0)
    assert "only rollout step is 100 %" in state.reason


def test_a_route_without_a_canary_starts_steady_at_zero() -> None:
    state = initial(NO_CANARY, T0)
    assert (state.state, state.weight_bp, state.revision) == ("steady", 0, None)
    assert state.reason == "no canary in the config"


# --- The ramp ------------------------------------------------------------------------------------


def test_the_ramp_does_not_advance_a_moment_before_the_interval_is_over() -> None:
    clock = Clock()
    state = start(RAMP_ROUTE, clock)
    clock.advance(INTERVAL - EPSILON, requests=1_000)
    assert on_tick(RAMP_ROUTE, state, clock) == (state, None)


def test_the_ramp_advances_after_a_full_healthy_interval_with_enough_canary_traffic() -> None:
    clock = Clock()
    state = start(RAMP_ROUTE, clock)
    clock.advance(INTERVAL, requests=MIN_REQUESTS)
    after, transition = changed(on_tick(RAMP_ROUTE, state, clock))
    assert (after.state, after.weight_bp, after.step) == ("progressing", 2500, 1)
    assert (after.step_started, after.step_base_requests) == (clock.now, MIN_REQUESTS)
    assert transition == Transition(
        route="shop",
        actor="guard",
        action="advance",
        before="progressing",
        after="progressing",
        weight_before_bp=500,
        weight_after_bp=2500,
        reason="advanced to step 2/4 (25 %) after a healthy 60s with 20 canary requests",
        at=clock.now,
    )
    assert after.reason == transition.reason


def test_too_little_canary_traffic_holds_the_step_and_restarts_its_dwell() -> None:
    clock = Clock()
    state = start(RAMP_ROUTE, clock)
    clock.advance(INTERVAL, requests=MIN_REQUESTS - 1)
    held, transition = changed(on_tick(RAMP_ROUTE, state, clock))
    assert (held.state, held.weight_bp, held.step) == ("progressing", 500, 0)
    assert (held.step_started, held.step_base_requests) == (clock.now, MIN_REQUESTS - 1)
    assert (transition.action, transition.actor) == ("hold", "guard")
    assert "19 of 20 canary requests" in transition.reason
    # The requests of the held interval do not count towards the next one.
    clock.advance(INTERVAL, requests=1)
    again, transition = changed(on_tick(RAMP_ROUTE, held, clock))
    assert (again.weight_bp, transition.action) == (500, "hold")


def test_a_breach_observed_during_the_step_holds_it_in_observe_mode() -> None:
    route = make_route(guard="observe")
    clock = Clock()
    state = start(route, clock)
    clock.advance(10, requests=MIN_REQUESTS)
    state, _ = on_breach(route, state, clock.now, "canary error rate 0.5 > 0.05")
    clock.advance(INTERVAL, requests=MIN_REQUESTS)  # healthy again by the end of the step
    held, transition = changed(on_tick(route, state, clock))
    assert (held.weight_bp, held.breach_in_step, transition.action) == (500, False, "hold")
    assert "breach" in transition.reason
    clock.advance(INTERVAL, requests=MIN_REQUESTS)  # a clean interval advances again
    assert on_tick(route, held, clock)[0].weight_bp == 2500


def test_a_breach_verdict_at_the_end_of_the_interval_holds_the_step() -> None:
    clock = Clock()
    state = start(RAMP_ROUTE, clock)
    clock.advance(INTERVAL, requests=MIN_REQUESTS)
    held, transition = changed(on_tick(RAMP_ROUTE, state, clock, verdict="breach"))
    assert (held.weight_bp, transition.action) == (500, "hold")


@pytest.mark.parametrize("verdict", ["healthy", "inconclusive", None])
def test_only_a_breach_verdict_holds_a_step_with_enough_traffic(
    verdict: Literal["healthy", "inconclusive"] | None,
) -> None:
    # Inconclusive means the guard's short window is thin, not that the interval was.
    clock = Clock()
    state = start(RAMP_ROUTE, clock)
    clock.advance(INTERVAL, requests=MIN_REQUESTS)
    assert on_tick(RAMP_ROUTE, state, clock, verdict=verdict)[0].weight_bp == 2500


def test_without_a_guard_one_canary_request_per_interval_is_enough() -> None:
    route = make_route(guard=None)
    clock = Clock()
    state = start(route, clock)
    clock.advance(INTERVAL)
    held, _ = on_tick(route, state, clock, verdict=None)
    assert held.weight_bp == 500
    clock.advance(INTERVAL, requests=1)
    assert on_tick(route, held, clock, verdict=None)[0].weight_bp == 2500


def test_5_25_50_100_reaches_promoted_while_healthy() -> None:
    route = make_route(interval=0.25)
    clock = Clock()
    state = start(route, clock)
    seen = [(state.state, state.weight_bp)]
    for _ in range(40):
        clock.advance(0.05, requests=MIN_REQUESTS)
        state, transition = on_tick(route, state, clock)
        if transition is not None:
            assert transition.action == "advance"  # never held: every interval was healthy
            seen.append((state.state, state.weight_bp))
    assert seen == [
        ("progressing", 500),
        ("progressing", 2500),
        ("progressing", 5000),
        ("promoted", 10_000),
    ]
    assert state.step == 3
    assert state.reason.startswith("promoted to step 4/4 (100 %) after a healthy 0.25s")


def test_the_ramp_promotes_after_a_last_step_below_100_percent() -> None:
    route = make_route(steps=(1000, 5000))
    state = step_to(route, 5000)
    after, transition = changed(on_tick(route, state, end_of_step(state)))
    assert (after.state, after.weight_bp, after.step) == ("promoted", 10_000, None)
    assert (transition.before, transition.after) == ("progressing", "promoted")


def test_a_request_counter_that_went_backwards_counts_from_zero() -> None:
    # The shell's counter starts again with the process; the saved base is from the old one.
    state = replace(start(RAMP_ROUTE), step_base_requests=5_000)
    clock = Clock()
    clock.advance(INTERVAL, requests=MIN_REQUESTS)
    assert on_tick(RAMP_ROUTE, state, clock)[0].weight_bp == 2500


# --- The guard -----------------------------------------------------------------------------------


def test_a_breach_with_rollback_sets_the_weight_to_zero_at_once() -> None:
    state = step_to(RAMP_ROUTE, 2500)
    after, transition = changed(on_breach(RAMP_ROUTE, state, T0 + 5, "error rate 0.31 > 0.05"))
    assert (after.state, after.weight_bp, after.step) == ("aborted", 0, None)
    assert after.reason == "guard: error rate 0.31 > 0.05"
    assert transition == Transition(
        route="shop",
        actor="guard",
        action="rollback",
        before="progressing",
        after="aborted",
        weight_before_bp=2500,
        weight_after_bp=0,
        reason="guard: error rate 0.31 > 0.05",
        at=T0 + 5,
    )


def _live_states() -> dict[str, RolloutState]:
    ramp = step_to(RAMP_ROUTE, 2500)
    return {
        "steady": start(STATIC_ROUTE),
        "progressing": ramp,
        "paused": changed(pause(RAMP_ROUTE, ramp, T0))[0],
    }


@pytest.mark.parametrize("name", ["steady", "progressing", "paused"])
def test_rollback_applies_to_every_live_state(name: str) -> None:
    state = _live_states()[name]
    after, transition = changed(on_breach(RAMP_ROUTE, state, T0, "p99 0.9s > 0.5s"))
    assert (after.state, after.weight_bp, transition.before) == ("aborted", 0, name)


def test_a_breach_leaves_a_promoted_or_aborted_canary_alone() -> None:
    promoted = changed(promote(RAMP_ROUTE, start(RAMP_ROUTE), T0, to_end=True, canary_requests=0))
    aborted = changed(abort(RAMP_ROUTE, start(RAMP_ROUTE), T0, "bad"))
    for state, _ in (promoted, aborted):
        assert on_breach(RAMP_ROUTE, state, T0 + 1, "error rate") == (state, None)


def test_a_breach_on_a_route_without_a_guard_changes_nothing() -> None:
    route = make_route(guard=None)
    state = start(route)
    assert on_breach(route, state, T0, "error rate") == (state, None)


@pytest.mark.parametrize("name", ["steady", "progressing", "paused"])
def test_observe_mode_never_changes_the_weight_and_counts_a_breach_once_per_guard_window(
    name: str,
) -> None:
    route = replace(RAMP_ROUTE, guard=Guard(action="observe", window=10.0))
    state = _live_states()[name]
    after, transition = changed(on_breach(route, state, T0 + 1, "error rate 0.2 > 0.05"))
    assert (after.state, after.weight_bp, after.breach_in_step) == (name, state.weight_bp, True)
    assert after.breach_counted_at == T0 + 1
    assert (transition.action, transition.actor) == ("observe_breach", "guard")
    assert transition.weight_before_bp == transition.weight_after_bp == state.weight_bp
    assert transition.reason == "guard (observe): error rate 0.2 > 0.05"
    # The verdict is assessed on every canary error: within the window it is the same breach.
    assert on_breach(route, after, T0 + 2, "error rate 0.3 > 0.05") == (after, None)
    assert on_breach(route, after, T0 + 11 - EPSILON, "error rate 0.3 > 0.05") == (after, None)
    # A window later it still breaches: that is counted again, and the weight still stays.
    again, transition = changed(on_breach(route, after, T0 + 11, "error rate 0.3 > 0.05"))
    assert (again.state, again.weight_bp, again.breach_counted_at) == (
        name,
        state.weight_bp,
        T0 + 11,
    )
    assert (transition.action, transition.reason) == (
        "observe_breach",
        "guard (observe): error rate 0.3 > 0.05",
    )
    assert on_breach(route, again, T0 + 12, "error rate 0.3 > 0.05") == (again, None)


def test_a_canary_that_keeps_failing_in_observe_mode_keeps_being_counted_without_a_ramp() -> None:
    # A static route never restarts its dwell, so "once per step" would mean once for good:
    # ten minutes of a failing canary must not look like one blip.
    route = make_route(steps=None, weight_bp=1000, guard="observe")
    assert route.guard is not None
    state = start(route)
    counted = []
    for tenth in range(10 * 60 * 4):  # a breach verdict every 250 ms (the tick) for 10 minutes
        now = T0 + tenth * 0.25
        state, transition = on_breach(route, state, now, "error rate 0.5 > 0.05")
        if transition is not None:
            counted.append(now - T0)
    assert counted == [n * route.guard.window for n in range(60)]
    assert (state.state, state.weight_bp) == ("steady", 1000)


def test_observe_mode_counts_the_first_breach_of_each_step_even_within_a_window() -> None:
    route = make_route(guard="observe")
    clock = Clock()
    state, _ = changed(on_breach(route, start(route, clock), clock.now, "error rate"))
    clock.advance(INTERVAL, requests=MIN_REQUESTS)
    held, _ = changed(on_tick(route, state, clock))  # the breach held the step
    assert not held.breach_in_step
    after, transition = changed(on_breach(route, held, clock.now + 1, "error rate"))
    assert (after.breach_in_step, transition.action) == (True, "observe_breach")


def test_a_wall_clock_that_went_back_does_not_hold_back_the_next_breach_count() -> None:
    route = make_route(guard="observe")
    state, _ = changed(on_breach(route, start(route), T0 + 3600, "error rate"))
    after, transition = changed(on_breach(route, state, T0, "error rate"))
    assert (after.breach_counted_at, transition.action) == (T0, "observe_breach")


# --- Admin verbs, from each state ----------------------------------------------------------------

Verb = Callable[[Route, RolloutState, float], Change]

VERBS: Final[dict[str, Verb]] = {
    "promote": lambda r, s, now: promote(r, s, now, to_end=False, canary_requests=0),
    "promote to 100": lambda r, s, now: promote(r, s, now, to_end=True, canary_requests=0),
    "abort": lambda r, s, now: abort(r, s, now, "bad latency"),
    "pause": pause,
    "resume": lambda r, s, now: resume(r, s, now, canary_requests=0),
    "retry": lambda r, s, now: retry(r, s, now, canary_requests=0),
    "set weight 30": lambda r, s, now: set_weight(r, s, now, 3000),
}
ACTIONS: Final = {"promote to 100": "promote", "set weight 30": "set_weight"}


def from_state(name: State) -> tuple[Route, RolloutState]:
    """Each state as reached in use: steady on a static route; the others on the 5/25/50/100 ramp
    after one healthy step (25 %)."""
    if name == "steady":
        return STATIC_ROUTE, start(STATIC_ROUTE)
    ramp = step_to(RAMP_ROUTE, 2500)
    moves: dict[State, Callable[[], Change]] = {
        "progressing": lambda: (ramp, None),
        "paused": lambda: pause(RAMP_ROUTE, ramp, T0),
        "promoted": lambda: promote(RAMP_ROUTE, ramp, T0, to_end=True, canary_requests=0),
        "aborted": lambda: on_breach(RAMP_ROUTE, ramp, T0, "error rate 0.5 > 0.05"),
    }
    return RAMP_ROUTE, moves[name]()[0]


@dataclass(frozen=True, slots=True)
class Row:
    verb: str
    before: State
    after: State | None  # None: refused with RolloutError
    weight_bp: int = 0


TABLE: Final = (
    Row("promote", "steady", None),  # no steps to go to; see the test of its message
    Row("promote", "progressing", "progressing", 5000),
    Row("promote", "paused", "progressing", 5000),  # promoting a paused ramp resumes it
    Row("promote", "promoted", None),
    Row("promote", "aborted", None),
    Row("promote to 100", "steady", "promoted", 10_000),
    Row("promote to 100", "progressing", "promoted", 10_000),
    Row("promote to 100", "paused", "promoted", 10_000),
    Row("promote to 100", "promoted", None),
    Row("promote to 100", "aborted", None),
    Row("abort", "steady", "aborted", 0),
    Row("abort", "progressing", "aborted", 0),
    Row("abort", "paused", "aborted", 0),
    Row("abort", "promoted", "aborted", 0),
    Row("abort", "aborted", None),
    Row("pause", "steady", "paused", 1000),
    Row("pause", "progressing", "paused", 2500),
    Row("pause", "paused", None),
    Row("pause", "promoted", None),
    Row("pause", "aborted", None),
    Row("resume", "steady", None),
    Row("resume", "progressing", None),
    Row("resume", "paused", "progressing", 2500),
    Row("resume", "promoted", None),
    Row("resume", "aborted", None),
    Row("retry", "steady", None),
    Row("retry", "progressing", None),
    Row("retry", "paused", None),
    Row("retry", "promoted", None),
    Row("retry", "aborted", "progressing", 500),  # the config's initial state
    Row("set weight 30", "steady", "steady", 3000),
    Row("set weight 30", "progressing", "paused", 3000),  # PUT weight pauses the ramp
    Row("set weight 30", "paused", "paused", 3000),
    Row("set weight 30", "promoted", "paused", 3000),
    Row("set weight 30", "aborted", None),  # retry first
)


def test_the_table_covers_every_verb_from_every_state() -> None:
    assert {(row.verb, row.before) for row in TABLE} == {(v, s) for v in VERBS for s in STATES}


@pytest.mark.parametrize("row", TABLE, ids=lambda row: f"{row.verb} from {row.before}")
def test_each_admin_verb_from_each_state(row: Row) -> None:
    route, state = from_state(row.before)
    if row.after is None:
        with pytest.raises(RolloutError, match=f"route shop: it (is {row.before}|has no rollout)"):
            VERBS[row.verb](route, state, T0 + 1)
        return
    after, transition = changed(VERBS[row.verb](route, state, T0 + 1))
    assert (after.state, after.weight_bp) == (row.after, row.weight_bp)
    assert (transition.actor, transition.action) == ("admin", ACTIONS.get(row.verb, row.verb))
    assert (transition.before, transition.after) == (row.before, row.after)
    assert (transition.weight_before_bp, transition.weight_after_bp) == (
        state.weight_bp,
        row.weight_bp,
    )
    assert transition.reason
    assert transition.reason == after.reason
    assert after.updated == transition.at == T0 + 1


def test_a_refused_verb_on_an_aborted_route_says_to_retry_first() -> None:
    route, state = from_state("aborted")
    with pytest.raises(RolloutError, match=r"^cannot resume route shop: it is aborted \(retry it"):
        resume(route, state, T0, canary_requests=0)


def test_promoting_one_step_without_steps_is_refused_with_a_way_forward() -> None:
    paused = changed(pause(STATIC_ROUTE, start(STATIC_ROUTE), T0))[0]
    for state in (start(STATIC_ROUTE), paused):
        with pytest.raises(
            RolloutError, match=r"it has no rollout steps to go through \(promote it to 100 %"
        ):
            promote(STATIC_ROUTE, state, T0, to_end=False, canary_requests=0)


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_verb_on_a_route_without_a_canary_is_refused(verb: str) -> None:
    with pytest.raises(RolloutError, match="route shop: it has no canary"):
        VERBS[verb](NO_CANARY, start(NO_CANARY), T0)


def test_promoting_the_step_before_100_percent_promotes() -> None:
    state = step_to(RAMP_ROUTE, 5000)
    after, transition = changed(promote(RAMP_ROUTE, state, T0, to_end=False, canary_requests=0))
    assert (after.state, after.weight_bp, after.step) == ("promoted", 10_000, 3)
    assert transition.reason == "promoted by admin to step 4/4 (100 %)"


def test_promote_starts_a_fresh_dwell_at_the_next_step() -> None:
    state = replace(start(RAMP_ROUTE), breach_in_step=True)
    after, _ = promote(RAMP_ROUTE, state, T0 + 30, to_end=False, canary_requests=42)
    assert (after.step, after.step_started, after.step_base_requests) == (1, T0 + 30, 42)
    assert not after.breach_in_step


def test_admin_abort_records_the_admins_reason_or_a_default() -> None:
    state = start(RAMP_ROUTE)
    assert abort(RAMP_ROUTE, state, T0, "checkout broken")[0].reason == "admin: checkout broken"
    assert abort(RAMP_ROUTE, state, T0, "")[0].reason == "admin: aborted"


def test_resume_restarts_the_dwell_so_paused_time_never_counts_as_healthy() -> None:
    clock = Clock()
    state = start(RAMP_ROUTE, clock)
    paused = changed(pause(RAMP_ROUTE, state, clock.now))[0]
    clock.advance(10 * INTERVAL, requests=1_000)
    resumed = changed(resume(RAMP_ROUTE, paused, clock.now, canary_requests=1_000))[0]
    assert (resumed.step_started, resumed.step_base_requests) == (clock.now, 1_000)
    assert on_tick(RAMP_ROUTE, resumed, clock) == (resumed, None)


def test_resuming_a_ramp_paused_below_its_first_step_moves_up_to_it() -> None:
    # At 0 % the canary gets no traffic and the ramp could never earn its next step.
    paused = changed(set_weight(RAMP_ROUTE, start(RAMP_ROUTE), T0, 0))[0]
    resumed = changed(resume(RAMP_ROUTE, paused, T0, canary_requests=0))[0]
    assert (resumed.state, resumed.weight_bp, resumed.step) == ("progressing", 500, 0)


def test_resuming_a_ramp_paused_off_its_steps_keeps_the_weight_and_goes_on_from_there() -> None:
    paused = changed(set_weight(RAMP_ROUTE, start(RAMP_ROUTE), T0, 3000))[0]
    resumed = changed(resume(RAMP_ROUTE, paused, T0, canary_requests=0))[0]
    assert (resumed.state, resumed.weight_bp, resumed.step) == ("progressing", 3000, None)
    assert on_tick(RAMP_ROUTE, resumed, end_of_step(resumed))[0].weight_bp == 5000


def test_resuming_a_ramp_paused_at_100_percent_promotes() -> None:
    paused = changed(set_weight(RAMP_ROUTE, start(RAMP_ROUTE), T0, 10_000))[0]
    assert resume(RAMP_ROUTE, paused, T0, canary_requests=0)[0].state == "promoted"


def test_resuming_a_static_route_applies_a_config_weight_changed_while_paused() -> None:
    paused = changed(pause(STATIC_ROUTE, start(STATIC_ROUTE), T0))[0]
    assert resume(STATIC_ROUTE, paused, T0, canary_requests=0)[0].weight_bp == 1000
    reloaded = replace(STATIC_ROUTE, split=Split(weight_bp=2000))
    assert reconcile(reloaded, paused, T0, canary_requests=0) == (paused, None)
    resumed = changed(resume(reloaded, paused, T0, canary_requests=0))[0]
    assert (resumed.state, resumed.weight_bp, resumed.config_weight_bp) == ("steady", 2000, 2000)


def test_a_weight_set_after_a_config_change_wins_over_that_change_on_resume() -> None:
    paused = changed(pause(STATIC_ROUTE, start(STATIC_ROUTE), T0))[0]
    reloaded = replace(STATIC_ROUTE, split=Split(weight_bp=2000))
    chosen = changed(set_weight(reloaded, paused, T0 + 1, 3000))[0]
    resumed = changed(resume(reloaded, chosen, T0 + 2, canary_requests=0))[0]
    assert (resumed.state, resumed.weight_bp) == ("steady", 3000)
    assert reconcile(reloaded, resumed, T0 + 3, canary_requests=0) == (resumed, None)


def test_retry_starts_again_from_the_config_and_says_retry() -> None:
    _, aborted = from_state("aborted")
    after, transition = changed(retry(RAMP_ROUTE, aborted, T0 + 9, canary_requests=3))
    assert after == replace(
        initial(RAMP_ROUTE, T0 + 9, canary_requests=3), reason=transition.reason
    )
    assert transition.reason == "retry: ramp starts at step 1/4 (5 %)"


def test_setting_a_steady_route_to_the_weight_it_has_changes_nothing() -> None:
    state = start(STATIC_ROUTE)
    assert set_weight(STATIC_ROUTE, state, T0 + 1, 1000) == (state, None)


def test_setting_the_weight_of_a_promoted_static_route_makes_it_steady() -> None:
    promoted = changed(
        promote(STATIC_ROUTE, start(STATIC_ROUTE), T0, to_end=True, canary_requests=0)
    )
    after, transition = changed(set_weight(STATIC_ROUTE, promoted[0], T0, 2000))
    assert (after.state, after.weight_bp, transition.reason) == (
        "steady",
        2000,
        "weight set to 20 % by admin",
    )


def test_setting_the_weight_of_a_ramp_says_the_ramp_is_paused_and_labels_the_step() -> None:
    after, transition = changed(set_weight(RAMP_ROUTE, start(RAMP_ROUTE), T0, 5000))
    assert (after.state, after.step) == ("paused", 2)
    assert transition.reason == "weight set to 50 % by admin; the ramp is paused"


@pytest.mark.parametrize("weight_bp", [-1, 10_001])
def test_a_weight_outside_0_to_10000_is_bad_input_not_a_conflict(weight_bp: int) -> None:
    with pytest.raises(ValueError, match="between 0 and 10000 basis points") as raised:
        set_weight(RAMP_ROUTE, start(RAMP_ROUTE), T0, weight_bp)
    assert not isinstance(raised.value, RolloutError)


# --- Start, reload and restart -------------------------------------------------------------------


def test_the_first_reconcile_starts_the_route_and_says_so() -> None:
    state, transition = changed(reconcile(RAMP_ROUTE, None, T0, canary_requests=4))
    assert state == initial(RAMP_ROUTE, T0, canary_requests=4)
    assert transition == Transition(
        route="shop",
        actor="config",
        action="start",
        before="steady",
        after="progressing",
        weight_before_bp=0,
        weight_after_bp=500,
        reason="ramp starts at step 1/4 (5 %)",
        at=T0,
    )


@pytest.mark.parametrize("name", STATES)
def test_a_reload_that_changes_nothing_keeps_the_state(name: State) -> None:
    route, state = from_state(name)
    assert reconcile(route, state, T0 + 100, canary_requests=999) == (state, None)


def test_an_abort_survives_reloads_and_restarts_with_the_same_revision() -> None:
    _, aborted = from_state("aborted")
    for route in (RAMP_ROUTE, STATIC_ROUTE, make_route(steps=(1000, 10_000))):
        assert reconcile(route, aborted, T0, canary_requests=0) == (aborted, None)
    restored, transition = changed(restore(RAMP_ROUTE, aborted, T0 + 50, canary_requests=0))
    assert (restored.state, restored.weight_bp, restored.reason) == (
        "aborted",
        0,
        "guard: error rate 0.5 > 0.05",
    )
    assert (transition.action, transition.actor, transition.after) == (
        "restore",
        "config",
        "aborted",
    )
    assert transition.reason == "restored after a restart: guard: error rate 0.5 > 0.05"


def test_a_config_that_brings_back_a_rolled_back_revision_keeps_it_aborted() -> None:
    state = step_to(RAMP_ROUTE, 2500)
    after, transition = changed(refuse_aborted_revision(RAMP_ROUTE, state, T0 + 5))
    assert (after.state, after.weight_bp, after.step) == ("aborted", 0, None)
    assert (transition.actor, transition.action, transition.before) == (
        "config",
        "restore",
        "progressing",
    )
    assert transition.reason == "revision v1 was rolled back before; retry it to send it traffic"
    unnamed = make_route(revision=None)
    reason = changed(refuse_aborted_revision(unnamed, start(unnamed), T0))[1].reason
    assert reason.startswith("revision (unnamed) was rolled back before")


@pytest.mark.parametrize("name", STATES)
def test_a_new_revision_starts_afresh_and_clears_an_abort(name: State) -> None:
    route, state = from_state(name)
    route = replace(route, canary=Version(upstreams=(_upstream(8002),), revision="v2"))
    after, transition = changed(reconcile(route, state, T0 + 1, canary_requests=5))
    assert after == replace(initial(route, T0 + 1, canary_requests=5), reason=transition.reason)
    assert after.revision == "v2"
    assert (transition.action, transition.actor, transition.before) == (
        "new_revision",
        "config",
        name,
    )
    assert transition.reason.startswith("new canary revision v2: ")


def test_an_unnamed_revision_is_a_new_revision_too() -> None:
    _, aborted = from_state("aborted")
    route = make_route(revision=None)
    after, transition = changed(reconcile(route, aborted, T0, canary_requests=0))
    assert (after.state, transition.reason) == (
        "progressing",
        "new canary revision (unnamed): ramp starts at step 1/4 (5 %)",
    )


def test_an_abort_survives_its_canary_being_removed_and_put_back() -> None:
    _, aborted = from_state("aborted")
    assert reconcile(NO_CANARY, aborted, T0, canary_requests=0) == (aborted, None)
    assert reconcile(RAMP_ROUTE, aborted, T0, canary_requests=0) == (aborted, None)


def test_removing_the_canary_returns_a_route_to_steady_at_zero() -> None:
    state = step_to(RAMP_ROUTE, 2500)
    after, transition = changed(reconcile(NO_CANARY, state, T0, canary_requests=0))
    assert (after.state, after.weight_bp, after.revision) == ("steady", 0, None)
    assert (transition.action, transition.reason) == ("reconfigure", "no canary in the config")
    assert reconcile(NO_CANARY, after, T0 + 1, canary_requests=0) == (after, None)


def test_new_steps_relabel_a_ramp_whose_weight_is_one_of_them_and_keep_its_dwell() -> None:
    state = step_to(RAMP_ROUTE, 2500)
    route = make_route(steps=(1000, 2000, 2500, 10_000))
    after, transition = changed(reconcile(route, state, T0 + 1, canary_requests=0))
    assert (after.state, after.weight_bp, after.step) == ("progressing", 2500, 2)
    assert (after.step_started, after.step_base_requests) == (
        state.step_started,
        state.step_base_requests,
    )
    assert (transition.action, transition.actor) == ("reconfigure", "config")
    assert transition.reason == "the rollout steps changed: progressing at step 3/4 (25 %)"


def test_new_steps_never_raise_a_ramp_above_the_first_step_without_a_healthy_interval() -> None:
    state = step_to(RAMP_ROUTE, 2500)
    route = make_route(steps=(1000, 3000, 10_000))
    after, _ = changed(reconcile(route, state, T0 + 1, canary_requests=0))
    assert (after.state, after.weight_bp, after.step) == ("progressing", 2500, None)
    assert on_tick(route, after, end_of_step(after))[0].weight_bp == 3000  # the next step above


def test_a_ramp_below_the_new_first_step_moves_up_to_it() -> None:
    state = start(RAMP_ROUTE)
    route = make_route(steps=(1000, 10_000))
    after, transition = changed(reconcile(route, state, T0 + 1, canary_requests=8))
    assert (after.weight_bp, after.step, after.step_started, after.step_base_requests) == (
        1000,
        0,
        T0 + 1,
        8,
    )
    assert transition.reason == "the rollout steps changed: ramp moves up to step 1/2 (10 %)"


@pytest.mark.parametrize("name", ["paused", "promoted"])
def test_paused_and_promoted_routes_keep_their_weight_when_the_steps_change(name: State) -> None:
    _, state = from_state(name)
    route = make_route(steps=(1000, 2000, 2500, 5000))
    after, transition = changed(reconcile(route, state, T0, canary_requests=0))
    assert (after.state, after.weight_bp) == (name, state.weight_bp)
    assert after.step == (2 if name == "paused" else None)
    assert transition.action == "reconfigure"


def test_removing_the_rollout_returns_a_ramp_to_the_config_weight() -> None:
    state = step_to(RAMP_ROUTE, 5000)
    route = make_route(steps=None, weight_bp=300)
    after, transition = changed(reconcile(route, state, T0, canary_requests=0))
    assert (after.state, after.weight_bp, after.step, after.config_weight_bp) == (
        "steady",
        300,
        None,
        300,
    )
    assert transition.reason == "the rollout was removed in the config: static weight 3 %"


def test_a_steady_route_follows_a_changed_config_weight() -> None:
    route = make_route(steps=None, weight_bp=2000)
    after, transition = changed(reconcile(route, start(STATIC_ROUTE), T0, canary_requests=0))
    assert (after.state, after.weight_bp, transition.actor) == ("steady", 2000, "config")
    assert transition.reason == "the weight changed in the config: static weight 20 %"


def test_a_weight_set_by_an_admin_survives_reloads_until_the_config_weight_changes() -> None:
    state = changed(set_weight(STATIC_ROUTE, start(STATIC_ROUTE), T0, 4000))[0]
    assert reconcile(STATIC_ROUTE, state, T0 + 1, canary_requests=0) == (state, None)
    route = make_route(steps=None, weight_bp=2000)
    assert reconcile(route, state, T0 + 2, canary_requests=0)[0].weight_bp == 2000


def test_a_steady_route_that_gains_a_rollout_starts_ramping() -> None:
    after, transition = changed(reconcile(RAMP_ROUTE, start(STATIC_ROUTE), T0, canary_requests=6))
    assert (after.state, after.weight_bp, after.step, after.step_base_requests) == (
        "progressing",
        1000,
        None,
        6,
    )
    assert transition.reason == "the config added a rollout: ramp at 10 %"
    zero = start(make_route(steps=None, weight_bp=0))
    assert reconcile(RAMP_ROUTE, zero, T0, canary_requests=0)[0].weight_bp == 500


def test_a_steady_route_at_100_percent_that_gains_a_rollout_is_promoted() -> None:
    full = start(make_route(steps=None, weight_bp=10_000))
    after, _ = changed(reconcile(RAMP_ROUTE, full, T0, canary_requests=0))
    assert (after.state, after.weight_bp, after.step) == ("promoted", 10_000, 3)


def test_restore_without_a_saved_state_starts_the_route() -> None:
    _, transition = changed(restore(RAMP_ROUTE, None, T0, canary_requests=0))
    assert transition.action == "start"


def test_restore_restarts_the_dwell_because_downtime_saw_no_traffic() -> None:
    state = step_to(RAMP_ROUTE, 2500)
    restored, transition = changed(restore(RAMP_ROUTE, state, T0 + 3_600, canary_requests=0))
    assert (restored.state, restored.weight_bp, restored.reason) == (
        "progressing",
        2500,
        state.reason,
    )
    assert (restored.step_started, restored.step_base_requests) == (T0 + 3_600, 0)
    assert (transition.action, transition.weight_before_bp, transition.weight_after_bp) == (
        "restore",
        2500,
        2500,
    )


def test_restore_reports_a_config_change_made_while_the_proxy_was_down() -> None:
    _, aborted = from_state("aborted")
    route = replace(RAMP_ROUTE, canary=Version(upstreams=(_upstream(8002),), revision="v2"))
    after, transition = changed(restore(route, aborted, T0, canary_requests=0))
    assert (after.state, transition.action) == ("progressing", "new_revision")


# --- Persistence ---------------------------------------------------------------------------------


@st.composite
def rollout_states(draw: st.DrawFn) -> RolloutState:
    state = draw(st.sampled_from(STATES))
    any_weight = draw(st.integers(min_value=0, max_value=10_000))
    times = st.floats(allow_nan=False, allow_infinity=False)
    return RolloutState(
        state=state,
        weight_bp={"aborted": 0, "promoted": 10_000}.get(state, any_weight),
        step=draw(st.none() | st.integers(min_value=0, max_value=20)),
        reason=draw(st.text()),
        revision=draw(st.none() | st.text()),
        step_started=draw(times),
        step_base_requests=draw(st.integers(min_value=0, max_value=2**63)),
        breach_in_step=draw(st.booleans()),
        breach_counted_at=draw(st.none() | times),
        updated=draw(times),
        config_weight_bp=draw(st.integers(min_value=0, max_value=10_000)),
    )


@given(rollout_states())
def test_a_state_survives_a_json_round_trip(state: RolloutState) -> None:
    assert RolloutState.from_dict(json.loads(json.dumps(state.to_dict()))) == state


def test_a_record_may_carry_keys_of_the_shell_and_whole_second_times() -> None:
    record = {**start(RAMP_ROUTE).to_dict(), "route": "shop", "step_started": 1000, "updated": 1}
    loaded = RolloutState.from_dict(record)
    assert (loaded.step_started, loaded.updated) == (1000.0, 1.0)
    assert isinstance(loaded.updated, float)


def test_a_record_from_before_breach_counting_loads_as_never_counted() -> None:
    record = {**start(RAMP_ROUTE).to_dict(), "breach_in_step": True}
    del record["breach_counted_at"]
    loaded = RolloutState.from_dict(record)
    assert (loaded.breach_in_step, loaded.breach_counted_at) == (True, None)
    # Its breach was counted at some unknown time: the next one is counted.
    route = make_route(guard="observe")
    assert on_breach(route, loaded, T0, "error rate")[1] is not None


GOOD: Final = start(RAMP_ROUTE).to_dict()


@pytest.mark.parametrize(
    ("patch", "problem"),
    [
        ({"state": "running"}, "state must be one of steady, progressing, paused, promoted, abo"),
        ({"state": 3}, "state must be one of"),
        ({"weight_bp": "500"}, "weight_bp must be an integer from 0 to 10000, got '500'"),
        ({"weight_bp": 10_001}, "weight_bp must be an integer from 0 to 10000, got 10001"),
        ({"weight_bp": True}, "weight_bp must be an integer from 0 to 10000, got True"),
        ({"step": -1}, "step must be an integer from 0, got -1"),
        ({"step": 1.0}, "step must be an integer from 0, got 1.0"),
        ({"reason": None}, "reason must be a string, got None"),
        ({"revision": 2}, "revision must be a string, got 2"),
        ({"step_started": "now"}, "step_started must be a finite number of seconds, got 'now'"),
        ({"step_started": math.nan}, "step_started must be a finite number of seconds, got nan"),
        ({"updated": False}, "updated must be a finite number of seconds, got False"),
        ({"step_base_requests": -5}, "step_base_requests must be an integer from 0, got -5"),
        ({"breach_in_step": "no"}, "breach_in_step must be true or false, got 'no'"),
        ({"breach_counted_at": "then"}, "breach_counted_at must be a finite number of seconds"),
        ({"config_weight_bp": None}, "config_weight_bp must be an integer from 0 to 10000"),
        ({"state": "aborted"}, "weight_bp must be 0 when aborted, got 500"),
        ({"state": "promoted"}, "weight_bp must be 10000 when promoted, got 500"),
    ],
)
def test_a_corrupt_record_is_refused_with_the_field_and_what_is_wrong(
    patch: dict[str, object], problem: str
) -> None:
    with pytest.raises(ValueError, match=r"^corrupt rollout state: ") as raised:
        RolloutState.from_dict({**GOOD, **patch})
    assert problem in str(raised.value)


def test_a_corrupt_record_names_every_problem_at_once() -> None:
    record = {k: v for k, v in GOOD.items() if k not in ("reason", "updated")}
    with pytest.raises(ValueError, match=r"^corrupt rollout state: ") as raised:
        RolloutState.from_dict({**record, "weight_bp": -1})
    message = str(raised.value)
    assert "reason is missing" in message
    assert "updated is missing" in message
    assert "weight_bp must be an integer" in message


@pytest.mark.parametrize("record", [[], "steady", None, 3])
def test_a_record_that_is_not_a_mapping_is_refused(record: object) -> None:
    with pytest.raises(ValueError, match="corrupt rollout state: expected a mapping, got"):
        RolloutState.from_dict(record)


def test_a_transition_becomes_one_json_audit_event() -> None:
    _, transition = changed(on_breach(RAMP_ROUTE, start(RAMP_ROUTE), T0, "error rate"))
    assert json.loads(json.dumps(transition.to_dict())) == {
        "route": "shop",
        "actor": "guard",
        "action": "rollback",
        "before": "progressing",
        "after": "aborted",
        "weight_before_bp": 500,
        "weight_after_bp": 0,
        "reason": "guard: error rate",
        "at": T0,
    }


# --- Whatever happens ----------------------------------------------------------------------------

Event = tuple[str, float, int]
EVENTS: Final = st.tuples(
    st.sampled_from(
        [
            *("tick", "breach", "reload", "promote", "finish"),
            *("abort", "pause", "resume", "retry", "weight"),
        ]
    ),
    st.floats(min_value=0, max_value=2 * INTERVAL),
    st.integers(min_value=0, max_value=10_000),
)


def _apply(route: Route, state: RolloutState, event: Event, clock: Clock) -> Change:
    kind, seconds, number = event
    now = clock.advance(seconds, requests=number % 40)
    count = clock.canary_requests
    moves: dict[str, Callable[[], Change]] = {
        "tick": lambda: tick(route, state, now, canary_requests=count, verdict="healthy"),
        "breach": lambda: on_breach(route, state, now, "error rate"),
        "reload": lambda: reconcile(route, state, now, canary_requests=count),
        "promote": lambda: promote(route, state, now, to_end=False, canary_requests=count),
        "finish": lambda: promote(route, state, now, to_end=True, canary_requests=count),
        "abort": lambda: abort(route, state, now, "stop"),
        "pause": lambda: pause(route, state, now),
        "resume": lambda: resume(route, state, now, canary_requests=count),
        "retry": lambda: retry(route, state, now, canary_requests=count),
        "weight": lambda: set_weight(route, state, now, number),
    }
    try:
        return moves[kind]()
    except RolloutError:
        return state, None


@given(
    st.sampled_from([RAMP_ROUTE, STATIC_ROUTE, replace(RAMP_ROUTE, guard=Guard(action="observe"))]),
    st.lists(EVENTS, max_size=40),
)
def test_every_path_keeps_the_invariants_and_explains_every_change(
    route: Route, events: list[Event]
) -> None:
    clock = Clock()
    state = start(route, clock)
    for event in events:
        after, transition = _apply(route, state, event, clock)
        assert 0 <= after.weight_bp <= 10_000
        assert after.weight_bp == {"aborted": 0, "promoted": 10_000}.get(
            after.state, after.weight_bp
        )
        assert (transition is None) == (after is state)
        if transition is not None:
            assert transition.reason
            assert (transition.before, transition.weight_before_bp) == (
                state.state,
                state.weight_bp,
            )
            assert (transition.after, transition.weight_after_bp) == (after.state, after.weight_bp)
        assert RolloutState.from_dict(after.to_dict()) == after
        state = after
