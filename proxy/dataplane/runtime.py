"""The one swappable holder of config + route table + upstream pools + live route state.

A reload builds a complete new `Runtime` and swaps one reference; requests in flight keep the
runtime (and the upstream instance) they started on. What must outlive a config generation
lives in the holder, keyed by stable names: live route state by route name, upstream instances
(their idle connections and cool-downs) by URL, and the counters in the recorder.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

from proxy.control.controller import Controller, Plan, RouteState
from proxy.control.store import StateStore
from proxy.core.config import Config, Route, Upstream
from proxy.core.routing import RouteTable
from proxy.dataplane.outcomes import Recorder, RouteView, VersionStats
from proxy.dataplane.upstream import Instance, VersionPool

STABLE: Final = "stable"
CANARY: Final = "canary"


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


@dataclass(frozen=True, slots=True)
class Prepared:
    """A fully built next generation, not yet installed."""

    runtime: Runtime
    instances: dict[str, Instance]
    plans: list[Plan]


class RuntimeHolder:
    """Holds the current runtime; `swap` installs a new config in one assignment."""

    def __init__(
        self,
        config: Config,
        *,
        rng: Callable[[], float] = random.random,
        recorder: Recorder | None = None,
        store: StateStore | None = None,
        wall: Callable[[], float] = time.time,
        follower: bool = False,
    ) -> None:
        self.rng = rng
        self.outcomes = recorder or Recorder()
        self.controller = Controller(self.outcomes, store, wall=wall, follower=follower)
        self.instances: dict[str, Instance] = {}
        self._generation = 0
        self.current, instances, plans = self._build(config)
        self._adopt(self.current, instances, plans)

    @property
    def states(self) -> dict[str, RouteState]:
        return self.controller.live

    def canary_stats(self, route: str) -> VersionStats:
        return self.outcomes.stats_for(route, CANARY)

    def _build(self, config: Config) -> tuple[Runtime, dict[str, Instance], list[Plan]]:
        """The complete next generation, the instance registry and the route states it would
        leave behind; nothing is applied until `_adopt`."""
        instances = dict(self.instances)

        def instance(upstream: Upstream) -> Instance:
            found = instances.get(upstream.url)
            if found is None:
                found = instances[upstream.url] = Instance(upstream)
            return found

        plans = self.controller.plan(config.routes, self.canary_stats)
        states = {plan.route.name: plan.live for plan in plans}
        runtime = Runtime(config, states, self.outcomes, instance, self._generation + 1)
        return runtime, instances, plans

    def _adopt(self, runtime: Runtime, instances: dict[str, Instance], plans: list[Plan]) -> None:
        self._generation = runtime.generation
        self.controller.commit(plans)
        in_use = {i.url for r in runtime.routes.values() for p in r.pools() for i in p.instances}
        for url, instance in instances.items():
            if url not in in_use:
                instance.retire()  # in-flight exchanges finish; its connections then close
        self.instances = {u: i for u, i in instances.items() if u in in_use}
        self.outcomes.keep_routes(runtime.routes)

    def prepare(self, config: Config) -> Prepared:
        """Build the whole next generation; nothing live changes until `install`."""
        return Prepared(*self._build(config))

    def install(self, prepared: Prepared) -> Runtime:
        """Swap one reference to the prepared generation; returns the old runtime."""
        old, self.current = self.current, prepared.runtime
        self._adopt(prepared.runtime, prepared.instances, prepared.plans)
        return old

    def swap(self, config: Config) -> Runtime:
        """Build the whole new runtime first, then swap one reference; returns the old one."""
        return self.install(self.prepare(config))

    def all_instances(self) -> Iterator[Instance]:
        return iter(self.instances.values())

    def close_idle(self) -> None:
        for instance in self.instances.values():
            instance.close_all_idle()

    def route_views(self) -> Iterator[RouteView]:
        for route in self.current.routes.values():
            state = route.state
            yield RouteView(
                route.name, 0 if state.aborted else state.weight_bp, state.rollout.state
            )
