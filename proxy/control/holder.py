"""The one swappable holder of config, route table, upstream pools and live route state: it
builds each generation with the controller's plan, then installs it in one assignment.

A reload builds a complete new `Runtime` and swaps one reference (the data plane's `current`);
nothing live changes if the build fails. Requests in flight keep the generation they started on.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from proxy.control.controller import Controller, Plan
from proxy.control.store import StateStore
from proxy.core.config import Config, Upstream
from proxy.core.vocabulary import CANARY
from proxy.dataplane.outcomes import Recorder, RouteView, VersionStats
from proxy.dataplane.runtime import DataPlane, RouteState, Runtime
from proxy.dataplane.upstream import Instance


@dataclass(frozen=True, slots=True)
class Prepared:
    """A fully built next generation, not yet installed."""

    runtime: Runtime
    instances: dict[str, Instance]
    plans: list[Plan]


class RuntimeHolder:
    """Holds the data plane's current runtime; `swap` installs a new config in one
    assignment. It owns the controller and hands the data plane its hook."""

    def __init__(
        self,
        config: Config,
        *,
        rng: Callable[[], float] = random.random,
        recorder: Recorder | None = None,
        store: StateStore | None = None,
        wall: Callable[[], float] = time.time,
        follower: bool = False,
        pooled: bool = False,
    ) -> None:
        self.outcomes = recorder or Recorder()
        self.controller = Controller(
            self.outcomes, store, wall=wall, follower=follower, pooled=pooled
        )
        self._generation = 0
        self._instances: dict[str, Instance] = {}
        current, instances, plans = self._build(config)
        self.plane = DataPlane(
            current, self.outcomes, rng=rng, canary_failed=self.controller.canary_failed
        )
        self._adopt(current, instances, plans)

    @property
    def current(self) -> Runtime:
        return self.plane.current

    @property
    def instances(self) -> dict[str, Instance]:
        return self._instances

    @property
    def states(self) -> dict[str, RouteState]:
        return self.controller.live

    def canary_stats(self, route: str) -> VersionStats:
        return self.outcomes.stats_for(route, CANARY)

    def _build(self, config: Config) -> tuple[Runtime, dict[str, Instance], list[Plan]]:
        """The complete next generation, the instance registry and the route states it would
        leave behind; nothing is applied until `_adopt`."""
        instances = dict(self._instances)

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
        self._instances = {u: i for u, i in instances.items() if u in in_use}
        self.plane.instances = self._instances
        self.outcomes.keep_routes(runtime.routes)

    def prepare(self, config: Config) -> Prepared:
        """Build the whole next generation; nothing live changes until `install`."""
        return Prepared(*self._build(config))

    def install(self, prepared: Prepared) -> Runtime:
        """Swap one reference to the prepared generation; returns the old runtime."""
        old, self.plane.current = self.plane.current, prepared.runtime
        self._adopt(prepared.runtime, prepared.instances, prepared.plans)
        return old

    def swap(self, config: Config) -> Runtime:
        """Build the whole new runtime first, then swap one reference; returns the old one."""
        return self.install(self.prepare(config))

    def all_instances(self) -> Iterator[Instance]:
        return iter(self._instances.values())

    def close_idle(self) -> None:
        self.plane.close_idle()

    def route_views(self) -> Iterator[RouteView]:
        for route in self.current.routes.values():
            state = route.state
            yield RouteView(
                route.name, 0 if state.aborted else state.weight_bp, state.rollout.state
            )
