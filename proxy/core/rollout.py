"""Pure rollout state machine per route: steady, progressing, paused, promoted, aborted.

The states, the ramp and the admin verbs are documented in docs/semantics.md.

Each function takes the route's config, the current state and the time and returns the next state
with the Transition that explains it (actor and reason, as Argo Rollouts records them), or the
state itself and None when nothing changed. The shell persists states and audits transitions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Final, Literal, TypeVar

from proxy.core.config import BASIS_POINTS, Route
from proxy.core.vocabulary import STATES, State, Verdict

Actor = Literal["guard", "admin", "config"]
Action = Literal[
    "start",  # config: first state of a route (no saved state)
    "restore",  # config: state loaded from state_dir after a restart
    "new_revision",  # config: a new canary.revision starts afresh (and clears an abort)
    "reconfigure",  # config: a reload moved the state to fit the new config
    "advance",  # guard: a healthy interval moved the ramp one step (or to promoted)
    "hold",  # guard: an interval without enough traffic or with a breach; the dwell restarts
    "rollback",  # guard: a breach with action rollback
    # guard: a breach with action observe, counted when first seen in a step and again once
    # per guard window while it lasts (see on_breach)
    "observe_breach",
    "promote",
    "abort",
    "pause",
    "resume",
    "retry",
    "set_weight",
]
_STATE_NAMES: Final[dict[str, State]] = {name: name for name in STATES}
# A breach acts on these; a promoted canary is the new stable and an aborted one gets nothing.
_LIVE: Final[tuple[State, ...]] = ("steady", "progressing", "paused")

T = TypeVar("T")


class RolloutError(ValueError):
    """A verb that makes no sense in the route's current state (the admin API answers 409)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RolloutState:
    """Where one route's canary stands; persisted as JSON in state_dir between restarts."""

    state: State
    weight_bp: int  # the live canary weight
    step: int | None  # index of weight_bp in rollout.steps_bp, None when it is not on a step
    reason: str  # why the route is in this state
    revision: str | None  # the canary revision this state belongs to
    step_started: float  # when the current step (dwell) began
    step_base_requests: int  # the canary request counter when the step began
    breach_in_step: bool  # the guard (in observe mode) saw a breach during this step
    breach_counted_at: float | None  # when observe mode last counted a breach (None: never)
    updated: float  # when the state last changed
    # The config's split weight this state last followed: a steady route follows the config
    # only when the config's weight changes, so a reload that changes nothing keeps PUT weight.
    config_weight_bp: int

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: object) -> RolloutState:
        """The state saved by `to_dict`, or ValueError naming every problem of a corrupt record.

        Unknown keys are ignored, so the shell may store its own next to these.
        """
        if not isinstance(data, Mapping):
            raise ValueError(
                f"corrupt rollout state: expected a mapping, got {type(data).__name__}"
            )
        read = _Reader(data)
        state: State = read("state", _state_name, "steady")
        weight_bp = read("weight_bp", _integer(0, BASIS_POINTS), 0)
        loaded = cls(
            state=state,
            weight_bp=weight_bp,
            step=read("step", _optional(_integer(0, None)), None),
            reason=read("reason", _text, ""),
            revision=read("revision", _optional(_text), None),
            step_started=read("step_started", _time, 0.0),
            step_base_requests=read("step_base_requests", _integer(0, None), 0),
            breach_in_step=read("breach_in_step", _flag, False),
            # Records written before the field existed lack it: no breach counted yet.
            breach_counted_at=read("breach_counted_at", _optional(_time), None, required=False),
            updated=read("updated", _time, 0.0),
            config_weight_bp=read("config_weight_bp", _integer(0, BASIS_POINTS), 0),
        )
        if not read.problems:
            _check_weight_fits_state(read, state, weight_bp)
        if read.problems:
            raise ValueError("corrupt rollout state: " + "; ".join(read.problems))
        return loaded


@dataclass(frozen=True, slots=True, kw_only=True)
class Transition:
    """One change of a route's rollout state: who did it, what, and why (one audit event)."""

    route: str
    actor: Actor
    action: Action
    before: State
    after: State
    weight_before_bp: int
    weight_after_bp: int
    reason: str
    at: float

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


Change = tuple[RolloutState, Transition | None]


# --- Start, restart and reload -------------------------------------------------------------------


def initial(route: Route, now: float, *, canary_requests: int = 0) -> RolloutState:
    """The state a route starts in: its static weight, or the first step of its ramp.

    `canary_requests` is the shell's canary request counter now (0 at process start).
    """
    steady = RolloutState(
        state="steady",
        weight_bp=route.split.weight_bp,  # 0 without a canary (the config enforces it)
        step=None,
        reason=_static_reason(route),
        revision=_revision(route),
        step_started=now,
        step_base_requests=canary_requests,
        breach_in_step=False,
        breach_counted_at=None,
        updated=now,
        config_weight_bp=route.split.weight_bp,
    )
    if route.rollout is None:
        return steady
    start = _ramp_at(route, steady, route.rollout.steps_bp[0], now, canary_requests)
    if start.state == "promoted":
        return replace(start, reason="promoted: the only rollout step is 100 %")
    return replace(start, reason=f"ramp starts at {_position(route, start)}")


def reconcile(
    route: Route, saved: RolloutState | None, now: float, *, canary_requests: int
) -> Change:
    """Fit a route's state to a (re)loaded config; an abort sticks to its canary revision."""
    if saved is None:
        fresh = initial(route, now, canary_requests=canary_requests)
        before = replace(fresh, state="steady", weight_bp=0)  # everything went to stable
        return _moved(
            route, before, fresh, actor="config", action="start", reason=fresh.reason, now=now
        )
    if saved.state == "aborted" and (route.canary is None or saved.revision == _revision(route)):
        return saved, None  # a rollback survives reloads and restarts (docs/semantics.md)
    if route.canary is None:
        return _without_canary(route, saved, now, canary_requests)
    if saved.revision != route.canary.revision:
        fresh = initial(route, now, canary_requests=canary_requests)
        reason = f"new canary revision {route.canary.revision or '(unnamed)'}: {fresh.reason}"
        return _moved(
            route, saved, fresh, actor="config", action="new_revision", reason=reason, now=now
        )
    if saved.state in ("paused", "promoted") or (
        saved.state == "progressing" and route.rollout is not None
    ):
        return _follow_steps(route, saved, now, canary_requests)
    return _follow_weight(route, saved, now, canary_requests)


def restore(
    route: Route, saved: RolloutState | None, now: float, *, canary_requests: int
) -> Change:
    """`reconcile` for process start: the dwell of a ramp restarts, and the restart is audited.

    The time the proxy was down saw no traffic and no guard, so it cannot count as healthy.
    """
    if saved is None:
        return reconcile(route, None, now, canary_requests=canary_requests)
    restarted = saved
    if saved.state == "progressing":
        restarted = replace(saved, step_started=now, step_base_requests=canary_requests)
    state, change = reconcile(route, restarted, now, canary_requests=canary_requests)
    if change is not None:
        return state, change
    reason = f"restored after a restart: {saved.reason}"
    return replace(state, updated=now), _transition(
        route, saved, state, actor="config", action="restore", reason=reason, now=now
    )


def _without_canary(route: Route, saved: RolloutState, now: float, canary_requests: int) -> Change:
    if (saved.state, saved.weight_bp, saved.revision) == ("steady", 0, None):
        return saved, None
    fresh = initial(route, now, canary_requests=canary_requests)
    return _moved(
        route, saved, fresh, actor="config", action="reconfigure", reason=fresh.reason, now=now
    )


def _follow_steps(route: Route, saved: RolloutState, now: float, canary_requests: int) -> Change:
    """Keep the live weight and relabel its step; a ramp below the first step moves up to it.

    Above the first step a reload never raises the weight that healthy intervals earned: a
    weight off the new steps stays, and the next healthy interval goes to the next step above.
    """
    steps = _steps(route)
    if saved.state == "progressing" and saved.weight_bp < steps[0]:
        after = _ramp_at(route, saved, steps[0], now, canary_requests)
        reason = f"the rollout steps changed: ramp moves up to {_position(route, after)}"
        return _moved(
            route, saved, after, actor="config", action="reconfigure", reason=reason, now=now
        )
    step = _step_at(steps, saved.weight_bp)
    if step == saved.step:
        return saved, None
    after = replace(saved, step=step)
    reason = f"the rollout steps changed: {saved.state} at {_position(route, after)}"
    return _moved(route, saved, after, actor="config", action="reconfigure", reason=reason, now=now)


def _follow_weight(route: Route, saved: RolloutState, now: float, canary_requests: int) -> Change:
    """A steady route follows a changed config weight; a route that gained a rollout ramps."""
    if route.rollout is not None:  # steady, and the config now has steps
        weight = max(saved.weight_bp, route.rollout.steps_bp[0])
        after = _ramp_at(route, saved, weight, now, canary_requests)
        reason = f"the config added a rollout: ramp at {_position(route, after)}"
        return _moved(
            route, saved, after, actor="config", action="reconfigure", reason=reason, now=now
        )
    weight = route.split.weight_bp
    if saved.state == "steady" and saved.config_weight_bp == weight:
        return saved, None  # the config did not change: a weight set by an admin stays
    cause = "the rollout was removed" if saved.state == "progressing" else "the weight changed"
    after = replace(
        _dwell(saved, now, canary_requests),
        state="steady",
        weight_bp=weight,
        step=None,
        config_weight_bp=weight,
    )
    reason = f"{cause} in the config: static weight {_pct(weight)}"
    return _moved(route, saved, after, actor="config", action="reconfigure", reason=reason, now=now)


# --- The guard's inputs --------------------------------------------------------------------------


def tick(
    route: Route,
    state: RolloutState,
    now: float,
    *,
    canary_requests: int,
    verdict: Verdict | None,
) -> Change:
    """The ramp: one step up after each full interval with enough canary traffic and no breach.

    `canary_requests` is the shell's running count of requests routed to the canary; a
    "breach" verdict at the end of an interval holds it like a breach seen during it. Only
    `on_breach` rolls back.
    """
    if state.state != "progressing" or route.rollout is None:
        return state, None
    interval = route.rollout.interval
    if now - state.step_started < interval:
        return state, None
    seen = _requests_in_step(state, canary_requests)
    needed = 1 if route.guard is None else route.guard.min_requests
    if state.breach_in_step or verdict == "breach":
        cause = f"the guard saw a breach during the {_secs(interval)} dwell"
        return _hold(route, state, now, canary_requests, cause)
    if seen < needed:
        cause = f"{seen} of {needed} canary requests in {_secs(interval)}"
        return _hold(route, state, now, canary_requests, cause)
    after = _ramp_at(
        route, state, _next_weight(route.rollout.steps_bp, state.weight_bp), now, canary_requests
    )
    verb = "promoted" if after.state == "promoted" else "advanced"
    reason = (
        f"{verb} to {_position(route, after)} after a healthy {_secs(interval)}"
        f" with {seen} canary requests"
    )
    return _moved(route, state, after, actor="guard", action="advance", reason=reason, now=now)


def on_breach(route: Route, state: RolloutState, now: float, reason: str) -> Change:
    """A breach verdict: roll back at once, or (observe) count it and change nothing else.

    Observe mode counts a breach (one audit event, one `canary_proxy_guard_breaches_total`)
    the first time the guard sees one in a step (a route without a ramp has one long step),
    and again each time a guard window has passed since the last one it counted: a canary that
    keeps failing keeps counting, about once per window, as long as it fails. The verdict is
    assessed on every canary error, so counting every breach verdict would count failed
    requests rather than breaches.

    A promoted canary is the new stable and an aborted one gets no traffic: both are left alone.
    """
    if route.guard is None or state.state not in _LIVE:
        return state, None
    if route.guard.action == "rollback":
        return _abort(
            route, state, now, actor="guard", action="rollback", reason=f"guard: {reason}"
        )
    if state.breach_in_step and _counted_within(state, now, route.guard.window):
        return state, None  # counted less than a window ago: the same breach, still going on
    after = replace(state, breach_in_step=True, breach_counted_at=now)
    return _moved(
        route,
        state,
        after,
        actor="guard",
        action="observe_breach",
        reason=f"guard (observe): {reason}",
        now=now,
    )


def _counted_within(state: RolloutState, now: float, window: float) -> bool:
    """Whether observe mode counted a breach less than `window` seconds before `now`.

    A count stamped later than `now` (the wall clock went back) does not hold the next one back.
    """
    counted = state.breach_counted_at
    return counted is not None and 0 <= now - counted < window


def _hold(
    route: Route, state: RolloutState, now: float, canary_requests: int, cause: str
) -> Change:
    after = _dwell(state, now, canary_requests)
    reason = f"held at {_position(route, state)}: {cause}; the dwell restarts"
    return _moved(route, state, after, actor="guard", action="hold", reason=reason, now=now)


def _requests_in_step(state: RolloutState, canary_requests: int) -> int:
    if canary_requests < state.step_base_requests:
        return canary_requests  # the counter started again with the process: count from zero
    return canary_requests - state.step_base_requests


# --- Admin verbs (docs/semantics.md, Admin verbs) ------------------------------------------------


def promote(
    route: Route, state: RolloutState, now: float, *, to_end: bool, canary_requests: int
) -> Change:
    """The next step now (a paused ramp resumes there), or 100 % and promoted with `to_end`."""
    _require(route, state, ("steady", "progressing", "paused"), "promote")
    steps = _steps(route)
    if not to_end and not steps:
        raise RolloutError(
            f"cannot promote route {route.name}: it has no rollout steps to go through"
            " (promote it to 100 % or set its weight)"
        )
    weight = BASIS_POINTS if to_end else _next_weight(steps, state.weight_bp)
    after = _ramp_at(route, state, weight, now, canary_requests)
    reason = f"promoted by admin to {_position(route, after)}"
    return _moved(route, state, after, actor="admin", action="promote", reason=reason, now=now)


def abort(route: Route, state: RolloutState, now: float, reason: str) -> Change:
    """Weight 0 and aborted, until `retry` or a new canary revision."""
    _require(route, state, ("steady", "progressing", "paused", "promoted"), "abort")
    return _abort(
        route, state, now, actor="admin", action="abort", reason=f"admin: {reason or 'aborted'}"
    )


def refuse_aborted_revision(route: Route, state: RolloutState, now: float) -> Change:
    """A config brings back a canary revision that was rolled back before (a revert): it
    stays aborted until `retry`, as if the abort had never been left."""
    revision = _revision(route) or "(unnamed)"
    reason = f"revision {revision} was rolled back before; retry it to send it traffic"
    return _abort(route, state, now, actor="config", action="restore", reason=reason)


def pause(route: Route, state: RolloutState, now: float) -> Change:
    """Freeze the weight: the ramp stops and a reload no longer moves it."""
    _require(route, state, ("steady", "progressing"), "pause")
    after = replace(state, state="paused")
    reason = f"paused by admin at {_position(route, state)}"
    return _moved(route, state, after, actor="admin", action="pause", reason=reason, now=now)


def resume(route: Route, state: RolloutState, now: float, *, canary_requests: int) -> Change:
    """Back to the ramp (its dwell restarts) or, without steps, to steady."""
    _require(route, state, ("paused",), "resume")
    if route.rollout is not None:
        weight = max(state.weight_bp, route.rollout.steps_bp[0])  # 0 % would never get traffic
        after = _ramp_at(route, state, weight, now, canary_requests)
    else:
        # A config weight that changed while paused applies now, as a reload would have applied it.
        weight = route.split.weight_bp
        if weight == state.config_weight_bp:
            weight = state.weight_bp
        after = replace(
            _dwell(state, now, canary_requests),
            state="steady",
            weight_bp=weight,
            config_weight_bp=route.split.weight_bp,
        )
    reason = f"resumed by admin: {after.state} at {_position(route, after)}"
    return _moved(route, state, after, actor="admin", action="resume", reason=reason, now=now)


def retry(route: Route, state: RolloutState, now: float, *, canary_requests: int) -> Change:
    """An aborted canary starts again from the config's initial state."""
    _require(route, state, ("aborted",), "retry")
    fresh = initial(route, now, canary_requests=canary_requests)
    return _moved(
        route, state, fresh, actor="admin", action="retry", reason=f"retry: {fresh.reason}", now=now
    )


def set_weight(route: Route, state: RolloutState, now: float, weight_bp: int) -> Change:
    """An admin's weight: it pauses a ramp (PUT weight), and a steady route stays steady.

    Raises plain ValueError (bad input, 400) for a weight outside 0..10000.
    """
    if not 0 <= weight_bp <= BASIS_POINTS:
        raise ValueError(f"weight must be between 0 and {BASIS_POINTS} basis points: {weight_bp}")
    _require(route, state, ("steady", "progressing", "paused", "promoted"), "set the weight of")
    steady = state.state == "steady" or (state.state == "promoted" and route.rollout is None)
    after = replace(
        state,
        state="steady" if steady else "paused",
        weight_bp=weight_bp,
        step=_step_at(_steps(route), weight_bp),
        config_weight_bp=route.split.weight_bp,  # overrides this config until the next change
    )
    if after == state:
        return state, None
    paused = "; the ramp is paused" if state.state == "progressing" else ""
    reason = f"weight set to {_pct(weight_bp)} by admin{paused}"
    return _moved(route, state, after, actor="admin", action="set_weight", reason=reason, now=now)


def _require(route: Route, state: RolloutState, allowed: tuple[State, ...], verb: str) -> None:
    if route.canary is None:
        raise RolloutError(f"cannot {verb} route {route.name}: it has no canary")
    if state.state not in allowed:
        hint = " (retry it first)" if state.state == "aborted" else ""
        raise RolloutError(f"cannot {verb} route {route.name}: it is {state.state}{hint}")


# --- Shared moves --------------------------------------------------------------------------------


def _abort(
    route: Route, state: RolloutState, now: float, *, actor: Actor, action: Action, reason: str
) -> Change:
    after = replace(
        state, state="aborted", weight_bp=0, step=None, step_started=now, breach_in_step=False
    )
    return _moved(route, state, after, actor=actor, action=action, reason=reason, now=now)


def _ramp_at(
    route: Route, state: RolloutState, weight: int, now: float, canary_requests: int
) -> RolloutState:
    """On the ramp at `weight` with a fresh dwell; 100 % ends the ramp as promoted."""
    return replace(
        _dwell(state, now, canary_requests),
        state="promoted" if weight == BASIS_POINTS else "progressing",
        weight_bp=weight,
        step=_step_at(_steps(route), weight),
    )


def _dwell(state: RolloutState, now: float, canary_requests: int) -> RolloutState:
    return replace(
        state, step_started=now, step_base_requests=canary_requests, breach_in_step=False
    )


def _moved(
    route: Route,
    before: RolloutState,
    after: RolloutState,
    *,
    actor: Actor,
    action: Action,
    reason: str,
    now: float,
) -> tuple[RolloutState, Transition]:
    after = replace(after, reason=reason, updated=now)
    return after, _transition(
        route, before, after, actor=actor, action=action, reason=reason, now=now
    )


def _transition(
    route: Route,
    before: RolloutState,
    after: RolloutState,
    *,
    actor: Actor,
    action: Action,
    reason: str,
    now: float,
) -> Transition:
    return Transition(
        route=route.name,
        actor=actor,
        action=action,
        before=before.state,
        after=after.state,
        weight_before_bp=before.weight_bp,
        weight_after_bp=after.weight_bp,
        reason=reason,
        at=now,
    )


# --- Small facts ---------------------------------------------------------------------------------


def _steps(route: Route) -> tuple[int, ...]:
    return () if route.rollout is None else route.rollout.steps_bp


def _revision(route: Route) -> str | None:
    return None if route.canary is None else route.canary.revision


def _step_at(steps: tuple[int, ...], weight: int) -> int | None:
    return steps.index(weight) if weight in steps else None


def _next_weight(steps: tuple[int, ...], weight: int) -> int:
    """The first step above the weight; past the last step the ramp ends at 100 %."""
    return next((step for step in steps if step > weight), BASIS_POINTS)


def _static_reason(route: Route) -> str:
    if route.canary is None:
        return "no canary in the config"
    return f"static weight {_pct(route.split.weight_bp)} from the config"


def _position(route: Route, state: RolloutState) -> str:
    if state.step is None:
        return _pct(state.weight_bp)
    return f"step {state.step + 1}/{len(_steps(route))} ({_pct(state.weight_bp)})"


def _pct(weight_bp: int) -> str:
    return f"{weight_bp / 100:g} %"


def _secs(seconds: float) -> str:
    return f"{seconds:g}s"


# --- Reading a saved record ----------------------------------------------------------------------


class _Reader:
    """Reads typed fields out of a record, collecting every problem instead of stopping."""

    def __init__(self, data: Mapping[object, object]) -> None:
        self.data = data
        self.problems: list[str] = []

    def __call__(
        self, key: str, parse: Callable[[object], T], default: T, *, required: bool = True
    ) -> T:
        if key not in self.data:
            if required:
                self.problems.append(f"{key} is missing")
            return default
        try:
            return parse(self.data[key])
        except ValueError as error:
            self.problems.append(f"{key} {error}, got {self.data[key]!r:.60}")
            return default


def _state_name(raw: object) -> State:
    state = _STATE_NAMES.get(raw) if isinstance(raw, str) else None
    if state is None:
        raise ValueError("must be one of " + ", ".join(STATES))
    return state


def _integer(low: int, high: int | None) -> Callable[[object], int]:
    expected = f"an integer from {low}" + ("" if high is None else f" to {high}")

    def parse(raw: object) -> int:
        # bool is an int to Python but never one in our records.
        if (
            isinstance(raw, bool)
            or not isinstance(raw, int)
            or raw < low
            or (high is not None and raw > high)
        ):
            raise ValueError(f"must be {expected}")
        return raw

    return parse


def _optional(parse: Callable[[object], T]) -> Callable[[object], T | None]:
    return lambda raw: None if raw is None else parse(raw)


def _text(raw: object) -> str:
    if not isinstance(raw, str):
        raise ValueError("must be a string")
    return raw


def _time(raw: object) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
        raise ValueError("must be a finite number of seconds")
    return float(raw)


def _flag(raw: object) -> bool:
    if not isinstance(raw, bool):
        raise ValueError("must be true or false")
    return raw


def _check_weight_fits_state(read: _Reader, state: State, weight_bp: int) -> None:
    required = {"aborted": 0, "promoted": BASIS_POINTS}.get(state)
    if required is not None and weight_bp != required:
        read.problems.append(f"weight_bp must be {required} when {state}, got {weight_bp}")
