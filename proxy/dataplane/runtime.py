"""What the data plane serves from: one config generation (`Runtime`, with a `RouteRuntime`
per route), the live state of each route (`RouteState`), and the `DataPlane` that every
connection shares.

A reload builds a complete new `Runtime` and swaps one reference (`DataPlane.current`);
requests in flight keep the runtime (and the upstream instance) they started on. What must
outlive a generation is keyed by stable names: live route state by route name, upstream
instances (their idle connections and cool-downs) by URL, and the counters in the recorder.
"""

from __future__ import annotations

from collections.abc import Callable

from proxy.core.config import Config, Guard, Route, Upstream
from proxy.core.guard import Assessment
from proxy.core.rollout import RolloutState
from proxy.core.routing import RouteTable
from proxy.core.vocabulary import CANARY, STABLE
from proxy.core.window import Evidence, SlidingWindow, Tally, WindowCounts
from proxy.dataplane.outcomes import Recorder
from proxy.dataplane.upstream import Instance, VersionPool


class RouteState:
    """The live state of one route, shared by every config generation that has the route.

    The data plane reads `weight_bp` and `aborted` on every request; everything else is for
    the controller and the admin API.
    """

    __slots__ = (
        "aborted",
        "assessment",
        "canary_evidence",
        "canary_pool",
        "canary_window",
        "epoch",
        "fleet_window",
        "guard",
        "rollout",
        "route",
        "stable_evidence",
        "stable_pool",
        "stable_window",
        "weight_bp",
    )

    def __init__(self, route: Route, state: RolloutState) -> None:
        self.route = route
        self.rollout = state
        self.weight_bp = state.weight_bp
        self.aborted = state.state == "aborted"
        self.guard: Guard | None = None
        # The guard's windows (the process that judges: a single process, or the supervisor).
        self.stable_window: SlidingWindow | None = None
        self.canary_window: SlidingWindow | None = None
        # Where the data path records: the windows themselves, or a worker's tallies.
        self.stable_evidence: Evidence | None = None
        self.canary_evidence: Evidence | None = None
        # Set whenever the windows start afresh, from the controller's one counter (never
        # reused, even for a route removed and added again); a worker's tallies carry it.
        self.epoch = 0
        self.assessment: Assessment | None = None
        # In a fleet: what the replica counted since it last added to the fleet's window, and
        # the fleet's (stable, canary) window as last read.
        self.stable_pool: Tally | None = None
        self.canary_pool: Tally | None = None
        self.fleet_window: tuple[WindowCounts, WindowCounts] | None = None

    def adopt(self, state: RolloutState) -> None:
        self.rollout = state
        self.weight_bp = state.weight_bp
        self.aborted = state.state == "aborted"

    def windows(self, now: float) -> tuple[WindowCounts, WindowCounts] | None:
        if self.stable_window is None or self.canary_window is None:
            return None
        return self.stable_window.snapshot(now), self.canary_window.snapshot(now)


class RouteRuntime:
    """Everything the data plane needs for one route, pre-computed for the hot path."""

    __slots__ = (
        "canary",
        "canary_stats",
        "force_cookie",
        "force_header",
        "name",
        "route",
        "split",
        "stable",
        "stable_stats",
        "state",
        "sticky_cookie",
        "sticky_header",
        "uses_cookies",
    )

    def __init__(
        self,
        route: Route,
        state: RouteState,
        recorder: Recorder,
        instance: Callable[[Upstream], Instance],
    ) -> None:
        self.route = route
        self.name = route.name
        self.split = route.split
        self.state = state
        self.stable = VersionPool(tuple(instance(u) for u in route.stable.upstreams))
        self.canary = (
            VersionPool(tuple(instance(u) for u in route.canary.upstreams))
            if route.canary
            else None
        )
        # Pre-bound: the exchange bumps these directly, no label lookup per request.
        self.stable_stats = recorder.stats_for(route.name, STABLE)
        self.canary_stats = recorder.stats_for(route.name, CANARY)
        sticky, force = route.split.sticky, route.split.force
        self.sticky_header = sticky.header.encode("latin-1") if sticky.header else None
        self.force_header = force.header.encode("latin-1") if force.header else None
        self.sticky_cookie = sticky.cookie
        self.force_cookie = force.cookie
        self.uses_cookies = bool(sticky.cookie or force.cookie)

    def pools(self) -> tuple[VersionPool, ...]:
        return (self.stable,) if self.canary is None else (self.stable, self.canary)


class Runtime:
    """One immutable generation: a config and the pools built for it."""

    __slots__ = ("config", "generation", "routes", "table")

    def __init__(
        self,
        config: Config,
        states: dict[str, RouteState],
        recorder: Recorder,
        instance: Callable[[Upstream], Instance],
        generation: int,
    ) -> None:
        self.config = config
        self.generation = generation
        self.table = RouteTable(config.routes)
        self.routes = {
            route.name: RouteRuntime(route, states[route.name], recorder, instance)
            for route in config.routes
        }


class DataPlane:
    """What every connection of the data plane shares, passed to each one explicitly: the
    current generation, the outcome recorder, the guard's in-line hook, randomness for the
    split, the upstream instances, and whether the process is draining."""

    __slots__ = ("canary_failed", "current", "draining", "instances", "outcomes", "rng")

    def __init__(
        self,
        current: Runtime,
        outcomes: Recorder,
        *,
        rng: Callable[[], float],
        canary_failed: Callable[[str, RouteState], None],
    ) -> None:
        self.current = current  # swapped in one assignment by a reload
        self.outcomes = outcomes
        self.rng = rng
        # Called for every canary error on the request path: the guard judges it at once.
        self.canary_failed = canary_failed
        self.instances: dict[str, Instance] = {}  # by URL, across generations
        self.draining = False

    def close_idle(self) -> None:
        for instance in self.instances.values():
            instance.close_all_idle()
