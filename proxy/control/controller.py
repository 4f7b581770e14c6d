"""The rollout controller: feeds guard windows from the data path, trips the guard in line,
ticks the ramp, runs the admin verbs, and persists every decision before it is reported.

Decisions come from the pure modules (`window`, `guard`, `rollout`); this is the shell around
them. A canary error is assessed the moment it is recorded, so a breach sets the weight to 0
for the very next request; a tick every `TICK_SECONDS` catches latency breaches and moves the
ramp. Rollout times are wall-clock (they must survive a restart); window times are monotonic.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from time import monotonic
from typing import Final

from proxy.control.store import StateStore
from proxy.core import rollout
from proxy.core.config import Guard, Route
from proxy.core.fleet import raises_weight
from proxy.core.guard import Assessment, assess
from proxy.core.rollout import RolloutState, Transition
from proxy.core.vocabulary import CANARY, RollbackReason
from proxy.core.window import SlidingWindow, Tally, TallyCounts, Tee, WindowCounts
from proxy.dataplane.outcomes import Recorder, VersionStats
from proxy.dataplane.runtime import RouteState

log = logging.getLogger("canary_proxy")

TICK_SECONDS: Final = 0.25  # well inside the one-second reaction the guard promises
RECENT_EVENTS: Final = 200


@dataclass(slots=True)
class Plan:
    """A route's state in a config being built, applied only if the build is swapped in."""

    live: RouteState
    route: Route
    change: rollout.Change
    fresh_windows: bool


class PersistError(Exception):
    """An admin decision could not be written to state_dir, so it was not applied."""


class DecisionRefused(Exception):
    """An admin decision the fleet cannot take now (its store is unreachable and the decision
    would raise a weight); nothing changed."""


ABORTED_REVISIONS_KEY: Final = "aborted_revisions"  # stored beside RolloutState's own fields


RouteStates = dict[str, tuple[int, bool, int]]  # name: weight_bp, aborted, epoch


class Controller:
    """Owns every route's RouteState and the decisions that change it.

    A worker process (`follower=True`) decides nothing: it records into tallies, which it
    reports, and takes weights and window epochs from its supervisor's controller (`follow`).
    """

    def __init__(
        self,
        recorder: Recorder,
        store: StateStore | None = None,
        *,
        wall: Callable[[], float] = time.time,
        follower: bool = False,
        pooled: bool = False,
    ) -> None:
        self.recorder = recorder
        self.store = store
        self.wall = wall
        self.follower = follower
        self.pooled = pooled  # in a fleet: guarded routes also count for the fleet's window
        # Told after every decision (the supervisor sends the new states to its workers).
        self.on_change: Callable[[], None] | None = None
        # A follower's canary error: the supervisor must hear of it now, not at the next report.
        self.on_canary_error: Callable[[], None] | None = None
        # In a fleet (proxy/control/fleet.py): told of every decision of ours (to publish it),
        # asked before an admin decision (may refuse it), asked before a ramp step (the lease),
        # and told of canary errors (to pool the evidence now).
        self.on_decision: Callable[[str, RolloutState, Transition], None] | None = None
        self.check_decision: Callable[[Transition], None] | None = None
        self.may_ramp: Callable[[], bool] | None = None
        self.on_evidence: Callable[[], None] | None = None
        # In a fleet: a decision that raises a weight is written to the fleet first (this
        # raises DecisionRefused if it could not be) and applied here only then.
        self.write_first: Callable[[str, RolloutState, Transition], Awaitable[None]] | None = None
        self._writing: set[str] = set()  # routes whose ramp step is being written first
        # In a fleet: a rollback of ours is counted once the fleet took it (`count_rollback`),
        # so that one breach every replica trips on counts once across the fleet.
        self.rollbacks_counted_by_fleet = False
        self._background: set[asyncio.Task[None]] = set()
        self.live: dict[str, RouteState] = {}
        self.events: deque[dict[str, object]] = deque(maxlen=RECENT_EVENTS)
        # Routes not in the current config keep their record (an abort must survive a reload
        # that drops the route and one that brings it back).
        self._saved: dict[str, RolloutState] = {}
        # Canary revisions rolled back per route: a config that reverts to one stays aborted.
        self.aborted_revisions: dict[str, set[str]] = {}
        # In a fleet: its latest record of a live route about a canary revision this config
        # does not run yet; a reload to that revision takes it rather than starting afresh.
        self._fleet_ahead: dict[str, RolloutState] = {}
        self._unwritten: list[dict[str, object]] = []  # decided, not yet on disk
        self._epochs = itertools.count(1)
        self._dirty = False
        self._started = False
        self._task: asyncio.Task[None] | None = None
        if store is not None:
            self._load(store)
            self.events.extend(store.recent(RECENT_EVENTS))

    def _load(self, store: StateStore) -> None:
        for name, record in store.load().items():
            try:
                self._saved[name] = RolloutState.from_dict(record)
            except ValueError as error:
                log.error("ignoring the saved state of route %s: %s", name, error)
                continue
            revisions = record.get(ABORTED_REVISIONS_KEY)
            if isinstance(revisions, list):
                self.aborted_revisions[name] = {str(r) for r in revisions}

    # -- config generations ------------------------------------------------------------------

    def plan(self, routes: Iterable[Route], stats: Callable[[str], VersionStats]) -> list[Plan]:
        """Reconcile every route of a config being built with its live or saved state."""
        now = self.wall()
        plans = []
        for route in routes:
            live = self.live.get(route.name)
            canary_requests = stats(route.name).requests
            if live is None:
                saved = self._saved.get(route.name)
                # After a restart the dwell restarts (restore); a route re-added by a reload
                # picks up its record as it was (reconcile).
                bring_back = rollout.reconcile if self._started else rollout.restore
                change = bring_back(route, saved, now, canary_requests=canary_requests)
                live = RouteState(route, change[0])
            else:
                change = rollout.reconcile(
                    route, live.rollout, now, canary_requests=canary_requests
                )
            ahead = self._fleet_ahead.get(route.name)
            taken = ahead is not None and ahead.revision == _revision(route)
            if ahead is not None and taken:
                change = _taken_from_fleet(route, live.rollout, ahead, now, canary_requests)
            change = self._refuse_reverts(route, change, now)
            fresh = (
                taken
                or live.guard != route.guard
                or (change[1] is not None and _restarts(change[1]))
            )
            plans.append(Plan(live=live, route=route, change=change, fresh_windows=fresh))
        return plans

    def _refuse_reverts(self, route: Route, change: rollout.Change, now: float) -> rollout.Change:
        state, transition = change
        revision = route.canary.revision if route.canary else None
        if state.state == "aborted" or revision not in self.aborted_revisions.get(route.name, ()):
            return change
        refused, refusal = rollout.refuse_aborted_revision(route, state, now)
        if transition is not None and refusal is not None:
            # One event from where the route really was, not from the state just planned.
            refusal = replace(
                refusal, before=transition.before, weight_before_bp=transition.weight_before_bp
            )
        return refused, refusal

    def commit(self, plans: list[Plan]) -> None:
        """The new config is in: apply its planned states, then persist and audit them."""
        transitions = []
        names = {plan.route.name for plan in plans}
        left = {name: live.rollout for name, live in self.live.items() if name not in names}
        self._saved = {n: s for n, s in self._saved.items() if n not in names} | left
        routes = {plan.route.name: plan.route for plan in plans}
        self._fleet_ahead = {
            name: state
            for name, state in self._fleet_ahead.items()
            if name in routes and state.revision != _revision(routes[name])
        }
        self._started = True
        self.live = {}
        for plan in plans:
            live = plan.live
            state, transition = plan.change
            live.route = plan.route
            live.adopt(state)
            if plan.fresh_windows:
                self._reset_windows(live, plan.route.guard)
            self.live[plan.route.name] = live
            if transition is not None:
                self._note_revisions(plan.route.name, transition, state)
                transitions.append(transition)
        # Their rollback and breach counters are exported from 0 (a deleted route's go away).
        self.recorder.set_canary_routes([p.route.name for p in plans if p.route.canary is not None])
        # Best effort: the config is in already; a failed write is retried on every tick.
        self._write(transitions, {})
        self._changed()

    def _reset_windows(self, live: RouteState, guard: Guard | None) -> None:
        live.guard = guard
        live.assessment = None
        live.epoch = next(self._epochs)
        live.stable_window = live.canary_window = None
        live.stable_evidence = live.canary_evidence = None
        live.stable_pool = live.canary_pool = None
        live.fleet_window = None
        if guard is None:
            return
        if self.follower:
            live.stable_evidence, live.canary_evidence = Tally(), Tally()
            return
        live.stable_window = SlidingWindow(guard.window)
        live.canary_window = SlidingWindow(guard.window)
        live.stable_evidence, live.canary_evidence = live.stable_window, live.canary_window
        if self.pooled:
            live.stable_pool, live.canary_pool = Tally(), Tally()
            live.stable_evidence = Tee(live.stable_window, live.stable_pool)
            live.canary_evidence = Tee(live.canary_window, live.canary_pool)

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    # -- workers -----------------------------------------------------------------------------

    def route_states(self) -> RouteStates:
        """What a worker needs of each live route: its weight, whether it is aborted, and the
        epoch its tallies belong to."""
        return {
            name: (live.weight_bp, live.aborted, live.epoch) for name, live in self.live.items()
        }

    def follow(self, states: RouteStates) -> None:
        """A worker adopts its supervisor's decisions; a new epoch starts fresh tallies (what
        in-flight requests still record in the old ones is never reported: old evidence)."""
        for name, (weight_bp, aborted, epoch) in states.items():
            live = self.live.get(name)
            if live is None:
                continue
            live.weight_bp = weight_bp
            live.aborted = aborted
            if live.epoch != epoch:
                self._reset_windows(live, live.guard)
                live.epoch = epoch

    def add_tally(self, name: str, epoch: int, canary: bool, counts: TallyCounts) -> None:
        """A worker's report: its tally joins the route's window if it is of the current
        epoch (otherwise it judged a canary that is gone, or a retried one)."""
        live = self.live.get(name)
        if live is None or live.epoch != epoch:
            return
        window = live.canary_window if canary else live.stable_window
        if window is not None:
            window.add(monotonic(), counts)
        pool = live.canary_pool if canary else live.stable_pool
        if pool is not None:
            pool.add(counts)

    def assess_route(self, name: str) -> None:
        """A worker reported canary errors: judge the route now rather than at the tick."""
        live = self.live.get(name)
        if live is not None and live.guard is not None and not live.aborted:
            self._assess(name, live, monotonic())
            self._evidence()

    # -- the guard, in line ------------------------------------------------------------------

    def canary_failed(self, name: str, live: RouteState) -> None:
        """Called by the data path for every canary error: assess now, act now (a worker:
        have its supervisor assess now)."""
        if live.guard is not None and not live.aborted and self.live.get(name) is live:
            if self.on_canary_error is not None:
                self.on_canary_error()
            else:
                self._assess(name, live, monotonic())
                self._evidence()

    def _evidence(self) -> None:
        if self.on_evidence is not None:
            self.on_evidence()

    def _assess(self, name: str, live: RouteState, now: float) -> Assessment | None:
        windows = live.windows(now)
        if windows is None or live.guard is None:
            return None
        stable, canary = windows
        live.assessment = assessment = assess(live.guard, canary=canary, stable=stable)
        if assessment.verdict == "breach":
            # rollout decides what a breach means here: rollback, or (observe) a note.
            change = rollout.on_breach(live.route, live.rollout, self.wall(), assessment.reason)
            self._apply(name, live, change)
        return assessment

    def tick(self, stats: Callable[[str], VersionStats]) -> None:
        """Assess every guarded route (latency breaches need no error to show) and move ramps."""
        if self._dirty:
            self._write([], {})  # a state_dir write failed earlier: try again
        now = monotonic()
        for name, live in list(self.live.items()):
            if live.aborted or live.rollout.state == "promoted":
                continue
            assessment = self._assess(name, live, now)
            if live.aborted or (self.may_ramp is not None and not self.may_ramp()):
                continue  # in a fleet, only the ramp lease's holder moves ramps
            if name in self._writing:
                continue  # a step is being written to the fleet
            change = rollout.tick(
                live.route,
                live.rollout,
                self.wall(),
                canary_requests=stats(name).requests,
                verdict=assessment.verdict if assessment is not None else None,
            )
            if change[1] is not None and self.write_first is not None and raises_weight(change[1]):
                self._step_written_first(name, live, change)
                continue
            self._apply(name, live, change)

    def _step_written_first(self, name: str, live: RouteState, change: rollout.Change) -> None:
        self._writing.add(name)
        task = asyncio.get_running_loop().create_task(self._write_step(name, live, change))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _write_step(self, name: str, live: RouteState, change: rollout.Change) -> None:
        try:
            await self._written_first(name, live, change)
        except DecisionRefused as error:
            log.info("route %s: the ramp holds: %s", name, error)
        except Exception:  # a bug here must not stop the ramp for good
            log.exception("route %s: a ramp step failed", name)
        finally:
            self._writing.discard(name)

    # -- admin verbs -------------------------------------------------------------------------

    def act(self, name: str, verb: str, stats: VersionStats, **arguments: object) -> RouteState:
        """Run an admin verb; raises KeyError (unknown route), rollout.RolloutError (409) or
        ValueError (400)."""
        live = self.live[name]
        self._apply(name, live, self._decide(live, verb, stats, arguments))
        return live

    async def act_written(
        self, name: str, verb: str, stats: VersionStats, **arguments: object
    ) -> RouteState:
        """`act`, for the admin API: in a fleet a decision that raises a weight is written to
        the fleet first and applied here only once written (DecisionRefused if it was not)."""
        live = self.live[name]
        change = self._decide(live, verb, stats, arguments)
        if change[1] is not None and self.write_first is not None and raises_weight(change[1]):
            await self._written_first(name, live, change)
        else:
            self._apply(name, live, change)
        return live

    async def _written_first(self, name: str, live: RouteState, change: rollout.Change) -> None:
        state, transition = change
        assert transition is not None
        assert self.write_first is not None
        before = live.rollout
        await self.write_first(name, state, transition)
        now = live.rollout
        if self.live.get(name) is not live or (now.state, now.weight_bp, now.revision) != (
            before.state,
            before.weight_bp,
            before.revision,
        ):
            raise DecisionRefused(
                f"route {name} changed while the decision was being written ({now.reason});"
                " the later decision stands"
            )
        self._apply(name, live, change, in_fleet=True)

    def _decide(
        self, live: RouteState, verb: str, stats: VersionStats, arguments: Mapping[str, object]
    ) -> rollout.Change:
        route, state, now = live.route, live.rollout, self.wall()
        requests = stats.requests
        if verb == "promote":
            change = rollout.promote(
                route, state, now, to_end=bool(arguments.get("to_end")), canary_requests=requests
            )
        elif verb == "abort":
            change = rollout.abort(route, state, now, str(arguments.get("reason") or ""))
        elif verb == "pause":
            change = rollout.pause(route, state, now)
        elif verb == "resume":
            change = rollout.resume(route, state, now, canary_requests=requests)
        elif verb == "retry":
            change = rollout.retry(route, state, now, canary_requests=requests)
        elif verb == "set_weight":
            weight = arguments.get("weight_bp")
            assert isinstance(weight, int)
            change = rollout.set_weight(route, state, now, weight)
        else:
            raise ValueError(f"unknown verb {verb!r}")
        if change[1] is not None and self.check_decision is not None:
            self.check_decision(change[1])
        return change

    # -- applying a decision -----------------------------------------------------------------

    def _apply(
        self, name: str, live: RouteState, change: rollout.Change, *, in_fleet: bool = False
    ) -> None:
        state, transition = change
        if transition is None:
            live.rollout = state  # bookkeeping only (e.g. a restarted dwell): no event
            return
        # Written before it is applied or reported. An admin decision that cannot be written
        # is refused (PersistError); the guard's rollback applies all the same, because
        # stopping traffic to a failing canary matters more, and its write is retried.
        before = set(self.aborted_revisions.get(name, ()))
        self._note_revisions(name, transition, state)
        written = self._write([transition], {name: state})
        if not written:
            if transition.actor == "admin":
                self.aborted_revisions[name] = before
                raise PersistError(f"cannot write the rollout state to {self._state_dir()}")
            self._unwritten.append(_event(transition))  # retried, and reported, on the tick
        live.adopt(state)  # the data path sees the new weight from the next request on
        if _restarts(transition):
            self._reset_windows(live, live.route.guard)
        self._changed()
        if self.on_decision is not None and transition.actor != "config" and not in_fleet:
            self.on_decision(name, state, transition)
        if transition.action in ("rollback", "abort") and not self.rollbacks_counted_by_fleet:
            self.count_rollback(name, transition)
        if transition.action in ("rollback", "observe_breach"):
            action = "rollback" if transition.action == "rollback" else "observe"
            self.recorder.guard_breached(name, action)
        (log.warning if transition.action == "rollback" else log.info)(
            "route %s: %s -> %s, weight %s%%: %s",
            name,
            transition.before,
            transition.after,
            f"{transition.weight_after_bp / 100:g}",
            transition.reason,
        )

    # -- the fleet ---------------------------------------------------------------------------

    def count_rollback(self, name: str, transition: Transition) -> None:
        """canary_proxy_rollbacks_total: a rollback or an abort (in a fleet, ours, once the
        fleet took it)."""
        self.recorder.rolled_back(name, _rollback_reason(transition))

    def follow_fleet(
        self,
        name: str,
        state: RolloutState,
        aborted_revisions: Iterable[str],
        event: Mapping[str, object] | None,
        replica: str,
    ) -> bool:
        """Another replica's decision: applied and written here like one of ours, its event
        naming the `replica` that decided (a record without an event, a state a replica wrote
        back into the fleet, is audited as taken from it). False if it is about a route or a
        canary revision this config does not run (a fleet in the middle of a config change):
        this replica follows its own config until a reload brings that revision, which then
        starts from the fleet's record; the revisions the fleet rolled back count here at once
        (a reload to one of them is refused).

        A ramp's dwell counts canary requests from here on, on this process's counter: the
        deciding replica's counter means nothing here.
        """
        live = self.live.get(name)
        if live is None or state.revision != _revision(live.route):
            self.aborted_revisions.setdefault(name, set()).update(aborted_revisions)
            if live is None:
                self._saved[name] = state  # a reload that adds the route picks it up
            else:
                self._fleet_ahead[name] = state
            self._write([], {})
            return False
        self._fleet_ahead.pop(name, None)
        canary_requests = self.recorder.stats_for(name, CANARY).requests
        state = replace(state, step_base_requests=canary_requests)
        self.aborted_revisions[name] = set(aborted_revisions)
        if event is None and (state.state, state.weight_bp) != (
            live.rollout.state,
            live.rollout.weight_bp,
        ):
            taken = Transition(
                route=name,
                actor="config",
                action="restore",
                before=live.rollout.state,
                after=state.state,
                weight_before_bp=live.rollout.weight_bp,
                weight_after_bp=state.weight_bp,
                reason=f"taken from the fleet: {state.reason}",
                at=state.updated,
            )
            event = taken.to_dict()
        if event is not None:
            # `at` and `time` say when it was decided; `applied_at`, when it took effect here.
            applied = {"time": _timestamp(state.updated), "applied_at": self.wall()}
            self._unwritten.append({**event, "replica": replica, **applied})
        # Like the guard's rollback: applied even if state_dir refuses it (retried each tick).
        self._write([], {name: state})
        restarts = live.rollout.state == "aborted" and state.state != "aborted"
        live.adopt(state)
        if restarts or (event is not None and event.get("action") in _RESTARTS):
            self._reset_windows(live, live.route.guard)
        self._changed()
        return True

    def judge_pooled(self, name: str, stable: WindowCounts, canary: WindowCounts) -> None:
        """The fleet's window (every replica's counts): kept for status, and judged like the
        local one, so `min_requests` counts the whole fleet's traffic."""
        live = self.live.get(name)
        if live is None or live.guard is None:
            return
        live.fleet_window = (stable, canary)
        if live.aborted:
            return
        assessment = assess(live.guard, canary=canary, stable=stable)
        if assessment.verdict == "breach":
            live.assessment = assessment
            reason = f"fleet: {assessment.reason}"
            self._apply(
                name, live, rollout.on_breach(live.route, live.rollout, self.wall(), reason)
            )

    def _note_revisions(self, name: str, transition: Transition, state: RolloutState) -> None:
        self.aborted_revisions[name] = self.revisions_after(name, transition, state)

    def revisions_after(self, name: str, transition: Transition, state: RolloutState) -> set[str]:
        """The route's rolled-back canary revisions once `transition` is applied."""
        revisions = set(self.aborted_revisions.get(name, ()))
        if state.state == "aborted" and state.revision is not None:
            revisions.add(state.revision)
        elif transition.action == "retry" and state.revision is not None:
            revisions.discard(state.revision)
        return revisions

    def _state_dir(self) -> str:
        return self.store.state_dir if self.store is not None else "(no state_dir)"

    def _write(self, transitions: list[Transition], pending: dict[str, RolloutState]) -> bool:
        """State file first, then the audit log; events are reported (in `events`) only once
        written. `pending` are states about to be adopted. Returns False if the disk refused."""
        self._unwritten.extend(_event(t) for t in transitions)
        if self.store is not None:
            records = self._records(pending)
            try:
                self.store.save(records)
                self.store.append(self._unwritten)
            except OSError as error:
                log.error("cannot write rollout state to %s: %s", self.store.state_dir, error)
                self._dirty = True
                if pending:  # not adopted: the caller decides what becomes of its events
                    del self._unwritten[len(self._unwritten) - len(transitions) :]
                return False
        self._dirty = False
        self.events.extend(self._unwritten)
        self._unwritten = []
        return True

    def _records(self, pending: dict[str, RolloutState]) -> dict[str, dict[str, object]]:
        states = dict(self._saved)
        states.update({name: live.rollout for name, live in self.live.items()})
        states.update(pending)
        records = {}
        for name, state in states.items():
            record = state.to_dict()
            aborted = self.aborted_revisions.get(name)
            if aborted:
                record[ABORTED_REVISIONS_KEY] = sorted(aborted)
            records[name] = record
        return records

    # -- the periodic tick -------------------------------------------------------------------

    def start(self, stats: Callable[[str], VersionStats]) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(stats))

    async def _run(self, stats: Callable[[str], VersionStats]) -> None:
        while True:
            await asyncio.sleep(TICK_SECONDS)
            try:
                self.tick(stats)
            except Exception:  # a bug here must not stop the guard for good
                log.exception("rollout tick failed")

    async def stop(self) -> None:
        task, self._task = self._task, None
        tasks = [*([task] if task is not None else []), *self._background]
        for each in tasks:
            each.cancel()
        for each in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await each


_RESTARTS: Final = ("start", "new_revision", "retry")


def _revision(route: Route) -> str | None:
    return route.canary.revision if route.canary else None


def _taken_from_fleet(
    route: Route, live: RolloutState, fleet: RolloutState, now: float, canary_requests: int
) -> rollout.Change:
    """A reload to the canary revision the fleet's record is about: the fleet's state, fitted
    to this config, audited as taken from the fleet."""
    base = replace(fleet, step_base_requests=canary_requests)
    state, transition = rollout.reconcile(route, base, now, canary_requests=canary_requests)
    if transition is None:
        transition = Transition(
            route=route.name,
            actor="config",
            action="restore",
            before=live.state,
            after=state.state,
            weight_before_bp=live.weight_bp,
            weight_after_bp=state.weight_bp,
            reason=f"taken from the fleet: {state.reason}",
            at=now,
        )
    return state, transition


def _restarts(transition: Transition) -> bool:
    """A fresh start of the canary: old evidence in the windows must not judge it."""
    return transition.action in _RESTARTS


def _rollback_reason(transition: Transition) -> RollbackReason:
    """A bounded label for `canary_proxy_rollbacks_total{reason}`: one of ROLLBACK_REASONS,
    which the exposition initialises to 0 for every route with a canary."""
    if transition.actor == "admin":
        return "admin"
    text = transition.reason
    if "p99" in text:
        return "latency"
    if "exceeds stable" in text:
        return "error_rate_increase"
    return "error_rate"


def _event(transition: Transition) -> dict[str, object]:
    event = transition.to_dict()
    event["time"] = _timestamp(transition.at)
    return event


def _timestamp(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))
