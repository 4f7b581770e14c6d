"""The one swappable holder of config + route table + upstream pools + live route state.

A reload builds a complete new `Runtime` and swaps one reference; requests in flight keep the
runtime they started on. Live state (weight, aborted) lives in `RouteState`, outside the
config and keyed by route name, so a reload keeps it.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from proxy.config import Config, Route
from proxy.routing import RouteTable
from proxy.upstream import VersionPool

STABLE: Final = "stable"
CANARY: Final = "canary"


@dataclass(slots=True)
class RouteState:
    """Live, mutable facts about a route that outlive any one config generation."""

    weight_bp: int
    configured_bp: int  # the config's start weight this state was derived from
    aborted: bool = False


@dataclass(slots=True)
class Outcomes:
    """Per route, version and status counts (the metrics recorder replaces this view later)."""

    requests: Counter[tuple[str, str, int]] = field(default_factory=Counter)
    upstream_errors: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    rejected: Counter[int] = field(default_factory=Counter)

    def record(self, route: str, version: str, status: int) -> None:
        self.requests[(route, version, status)] += 1

    def record_upstream_error(self, route: str, version: str, kind: str) -> None:
        self.upstream_errors[(route, version, kind)] += 1

    def record_rejected(self, status: int) -> None:
        self.rejected[status] += 1


class RouteRuntime:
    """Everything the data plane needs for one route, pre-computed for the hot path."""

    __slots__ = (
        "canary",
        "force_cookie",
        "force_header",
        "name",
        "route",
        "split",
        "stable",
        "state",
        "sticky_cookie",
        "sticky_header",
        "uses_cookies",
    )

    def __init__(self, route: Route, state: RouteState) -> None:
        self.route = route
        self.name = route.name
        self.split = route.split
        self.state = state
        self.stable = VersionPool(route.stable.upstreams)
        self.canary = VersionPool(route.canary.upstreams) if route.canary else None
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

    def __init__(self, config: Config, states: dict[str, RouteState], generation: int) -> None:
        self.config = config
        self.generation = generation
        self.table = RouteTable(config.routes)
        self.routes = {
            route.name: RouteRuntime(route, states[route.name]) for route in config.routes
        }

    def close_idle(self) -> None:
        for route in self.routes.values():
            for pool in route.pools():
                for instance in pool.instances:
                    instance.close_all_idle()


class RuntimeHolder:
    """Holds the current runtime; `swap` installs a new config in one assignment."""

    def __init__(self, config: Config, *, rng: Callable[[], float] = random.random) -> None:
        self.rng = rng
        self.outcomes = Outcomes()
        self.states: dict[str, RouteState] = {}
        self._generation = 0
        self.current = self._build(config)
        self.states = {name: route.state for name, route in self.current.routes.items()}

    def _build(self, config: Config) -> Runtime:
        states = {route.name: self._state_for(route) for route in config.routes}
        self._generation += 1
        return Runtime(config, states, self._generation)

    def _state_for(self, route: Route) -> RouteState:
        """Keep a route's live state across reloads unless its configured weight changed."""
        weight = start_weight(route)
        state = self.states.get(route.name)
        if state is not None and state.configured_bp == weight:
            return state
        return RouteState(weight_bp=weight, configured_bp=weight)

    def swap(self, config: Config) -> Runtime:
        """Build the whole new runtime first, then swap one reference; returns the old one."""
        new = self._build(config)
        old, self.current = self.current, new
        self.states = {name: route.state for name, route in new.routes.items()}
        return old


def start_weight(route: Route) -> int:
    if route.canary is None:
        return 0
    if route.rollout is not None:
        return route.rollout.steps_bp[0]
    return route.split.weight_bp
