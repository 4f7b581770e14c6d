"""The recorder: per route and version outcome counts with domain verbs, and their Prometheus
exposition (DESIGN.md §8) through a collector on an injected registry.

The hot path only bumps plain ints on a `VersionStats` that the route's runtime holds directly
(pre-bound: no label lookup, no lock, no allocation per request). prometheus_client turns them
into metric families at scrape time. Stats are keyed by route name and version and outlive
config generations, so a reload never resets or double-counts a counter.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Final, Literal

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

UPSTREAM_ERROR_KINDS: Final = ("connect", "timeout", "reset", "protocol")
ROLLOUT_STATES: Final = ("steady", "progressing", "paused", "promoted", "aborted")
# `canary_proxy_rollbacks_total{reason}`: the guard's limit that was breached, or an admin's
# abort (proxy/controller.py derives it from the transition).
RollbackReason = Literal["error_rate", "error_rate_increase", "latency", "admin"]
ROLLBACK_REASONS: Final[tuple[RollbackReason, ...]] = (
    "error_rate",
    "error_rate_increase",
    "latency",
    "admin",
)
# `canary_proxy_guard_breaches_total{action}`: the guard's configured action.
GUARD_ACTIONS: Final = ("rollback", "observe")

# Edge-proxy latencies: sub-millisecond cache hits up to minute-long streams (seconds).
DURATION_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


class VersionStats:
    """Cumulative outcomes of one version of one route."""

    __slots__ = ("buckets", "codes", "duration_sum", "upstream_errors")

    def __init__(self) -> None:
        self.codes: dict[int, int] = {}
        self.buckets = [0] * (len(DURATION_BUCKETS) + 1)  # the last one is +Inf
        self.duration_sum = 0.0
        self.upstream_errors = dict.fromkeys(UPSTREAM_ERROR_KINDS, 0)

    def observe(self, status: int, duration: float) -> None:
        codes = self.codes
        codes[status] = codes.get(status, 0) + 1
        self.buckets[bisect_left(DURATION_BUCKETS, duration)] += 1
        self.duration_sum += duration

    def upstream_error(self, kind: str) -> None:
        self.upstream_errors[kind] = self.upstream_errors.get(kind, 0) + 1

    @property
    def requests(self) -> int:
        return sum(self.codes.values())

    # -- across processes: a worker reports what changed, its supervisor adds it up ----------

    def copy(self) -> VersionStats:
        twin = VersionStats()
        twin.codes = dict(self.codes)
        twin.buckets = list(self.buckets)
        twin.duration_sum = self.duration_sum
        twin.upstream_errors = dict(self.upstream_errors)
        return twin

    def since(self, before: VersionStats) -> StatsDelta | None:
        """What was counted after `before` (a copy taken earlier), or None if nothing was."""
        codes = {
            code: n - before.codes.get(code, 0)
            for code, n in self.codes.items()
            if n != before.codes.get(code, 0)
        }
        errors = {
            kind: n - before.upstream_errors.get(kind, 0)
            for kind, n in self.upstream_errors.items()
            if n != before.upstream_errors.get(kind, 0)
        }
        if not codes and not errors:
            return None
        buckets = [now - then for now, then in zip(self.buckets, before.buckets, strict=True)]
        return codes, buckets, self.duration_sum - before.duration_sum, errors

    def add(self, delta: StatsDelta) -> None:
        codes, buckets, duration_sum, errors = delta
        for code, n in codes.items():
            self.codes[code] = self.codes.get(code, 0) + n
        for index, n in enumerate(buckets):
            self.buckets[index] += n
        self.duration_sum += duration_sum
        for kind, n in errors.items():
            self.upstream_errors[kind] = self.upstream_errors.get(kind, 0) + n


# A worker's report of one version's stats (plain builtins: it crosses a process boundary):
# status code counts, duration bucket counts, duration sum, upstream errors by kind.
StatsDelta = tuple[dict[int, int], list[int], float, dict[str, int]]


class Recorder:
    """Everything the proxy counts, with verbs named after what happened."""

    def __init__(self) -> None:
        self._stats: dict[tuple[str, str], VersionStats] = {}
        self._rejected: dict[int, int] = {}
        self.reloads = {"success": 0, "failure": 0}
        self.last_reload_successful = True
        self.rollbacks: dict[tuple[str, str], int] = {}
        self.breaches: dict[tuple[str, str], int] = {}
        # Live routes with a canary: their rollback and breach counters are exported from 0.
        self.canary_routes: frozenset[str] = frozenset()

    def stats_for(self, route: str, version: str) -> VersionStats:
        stats = self._stats.get((route, version))
        if stats is None:
            stats = self._stats[(route, version)] = VersionStats()
        return stats

    def keep_routes(self, names: Iterable[str]) -> None:
        """Drop the series of routes a new config no longer has."""
        keep = set(names)
        self._stats = {key: s for key, s in self._stats.items() if key[0] in keep}
        self.rollbacks = {key: n for key, n in self.rollbacks.items() if key[0] in keep}
        self.breaches = {key: n for key, n in self.breaches.items() if key[0] in keep}
        self.canary_routes = self.canary_routes & keep

    def set_canary_routes(self, names: Iterable[str]) -> None:
        """The live routes that have a canary (the controller's, at every config swap).

        Each gets every `reason` of `canary_proxy_rollbacks_total` and every `action` of
        `canary_proxy_guard_breaches_total` exported from 0, so that rate() and increase() see
        the first rollback or breach too (a series born at 1 looks like no increase).
        """
        self.canary_routes = frozenset(names)

    def record_rejected(self, status: int) -> None:
        self._rejected[status] = self._rejected.get(status, 0) + 1

    def rejected_since(self, before: dict[int, int]) -> dict[int, int]:
        return {
            code: n - before.get(code, 0)
            for code, n in self._rejected.items()
            if n != before.get(code, 0)
        }

    def add_rejected(self, counts: dict[int, int]) -> None:
        for code, n in counts.items():
            self._rejected[code] = self._rejected.get(code, 0) + n

    def reload_succeeded(self) -> None:
        self.reloads["success"] += 1
        self.last_reload_successful = True

    def reload_failed(self) -> None:
        self.reloads["failure"] += 1
        self.last_reload_successful = False

    def rolled_back(self, route: str, reason: RollbackReason) -> None:
        self.rollbacks[(route, reason)] = self.rollbacks.get((route, reason), 0) + 1

    def guard_breached(self, route: str, action: str) -> None:
        """A breach the guard acted on (`rollback`) or only recorded (`observe`)."""
        self.breaches[(route, action)] = self.breaches.get((route, action), 0) + 1

    # -- views (tests and the admin API read these) ----------------------------------------

    @property
    def requests(self) -> Counter[tuple[str, str, int]]:
        return Counter(
            {
                (route, version, code): n
                for (route, version), stats in self._stats.items()
                for code, n in stats.codes.items()
            }
        )

    @property
    def upstream_errors(self) -> Counter[tuple[str, str, str]]:
        return Counter(
            {
                (route, version, kind): n
                for (route, version), stats in self._stats.items()
                for kind, n in stats.upstream_errors.items()
                if n
            }
        )

    @property
    def rejected(self) -> Counter[int]:
        return Counter(self._rejected)

    def rollback_series(self) -> list[tuple[tuple[str, str], int]]:
        """Every (route, reason) to export, sorted: those counted, and 0 for the rest of each
        canary route's reasons."""
        return _with_zeros(self.rollbacks, self.canary_routes, ROLLBACK_REASONS)

    def breach_series(self) -> list[tuple[tuple[str, str], int]]:
        """Every (route, action) to export, sorted, like `rollback_series`."""
        return _with_zeros(self.breaches, self.canary_routes, GUARD_ACTIONS)

    def series(self) -> Iterator[tuple[str, str, VersionStats]]:
        for (route, version), stats in sorted(self._stats.items()):
            yield route, version, stats


class RouteView:
    """What the collector needs to know about a live route, read at scrape time."""

    __slots__ = ("name", "state", "weight_bp")

    def __init__(self, name: str, weight_bp: int, state: str) -> None:
        self.name = name
        self.weight_bp = weight_bp
        self.state = state


class ProxyCollector(Collector):
    """Turns the recorder and the live routes into Prometheus metric families."""

    def __init__(
        self,
        recorder: Recorder,
        routes: Callable[[], Iterable[RouteView]],
        client_connections: Callable[[], int],
    ) -> None:
        self._recorder = recorder
        self._routes = routes
        self._client_connections = client_connections

    def collect(self) -> Iterator[Metric]:
        recorder = self._recorder
        routes = list(self._routes())
        yield from self._traffic(recorder)
        yield self._rejected(recorder)
        yield from self._route_state(routes)
        rollbacks = CounterMetricFamily(
            "canary_proxy_rollbacks",
            "Automatic and manual rollbacks of a route's canary.",
            labels=["route", "reason"],
        )
        for (route, reason), n in recorder.rollback_series():
            rollbacks.add_metric([route, reason], n)
        yield rollbacks
        breaches = CounterMetricFamily(
            "canary_proxy_guard_breaches",
            "Guard breaches: acted on (action=rollback) or only recorded (action=observe: "
            "counted when first seen in a ramp step, then again once per guard window while "
            "the canary stays breached).",
            labels=["route", "action"],
        )
        for (route, action), n in recorder.breach_series():
            breaches.add_metric([route, action], n)
        yield breaches
        yield from self._reloads(recorder)
        connections = GaugeMetricFamily(
            "canary_proxy_client_connections", "Open client connections on the data plane."
        )
        connections.add_metric([], self._client_connections())
        yield connections

    @staticmethod
    def _traffic(recorder: Recorder) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "canary_proxy_requests",
            "Requests answered, by route, version and status code (499: client went away).",
            labels=["route", "version", "code"],
        )
        durations = HistogramMetricFamily(
            "canary_proxy_request_duration_seconds",
            "Time from request head to the end of the response.",
            labels=["route", "version"],
        )
        errors = CounterMetricFamily(
            "canary_proxy_upstream_errors",
            "Upstream failures by kind (connect, timeout, reset, protocol).",
            labels=["route", "version", "kind"],
        )
        for route, version, stats in recorder.series():
            for code, n in sorted(stats.codes.items()):
                requests.add_metric([route, version, str(code)], n)
            durations.add_metric(
                [route, version], _cumulative_buckets(stats.buckets), stats.duration_sum
            )
            for kind, n in stats.upstream_errors.items():
                errors.add_metric([route, version, kind], n)
        yield requests
        yield durations
        yield errors

    @staticmethod
    def _rejected(recorder: Recorder) -> Metric:
        rejected = CounterMetricFamily(
            "canary_proxy_rejected_requests",
            "Requests the proxy refused itself (malformed, over a limit, no route), by code; "
            "a refused request that was already routed is also in canary_proxy_requests_total.",
            labels=["code"],
        )
        for code, n in sorted(recorder.rejected.items()):
            rejected.add_metric([str(code)], n)
        return rejected

    @staticmethod
    def _route_state(routes: list[RouteView]) -> Iterator[Metric]:
        weight = GaugeMetricFamily(
            "canary_proxy_canary_weight_ratio",
            "Share of a route's traffic sent to the canary (0-1).",
            labels=["route"],
        )
        state = GaugeMetricFamily(
            "canary_proxy_rollout_state",
            "1 for the route's current rollout state, 0 for the others.",
            labels=["route", "state"],
        )
        for route in routes:
            weight.add_metric([route.name], route.weight_bp / 10_000)
            for name in ROLLOUT_STATES:
                state.add_metric([route.name, name], 1.0 if name == route.state else 0.0)
        yield weight
        yield state

    @staticmethod
    def _reloads(recorder: Recorder) -> Iterator[Metric]:
        reloads = CounterMetricFamily(
            "canary_proxy_config_reloads",
            "Config reloads by result (success, failure).",
            labels=["result"],
        )
        for result in ("success", "failure"):
            reloads.add_metric([result], recorder.reloads[result])
        yield reloads
        last = GaugeMetricFamily(
            "canary_proxy_config_last_reload_successful",
            "1 if the last config reload succeeded (or none was tried), else 0.",
        )
        last.add_metric([], 1.0 if recorder.last_reload_successful else 0.0)
        yield last


def _with_zeros(
    counts: dict[tuple[str, str], int], routes: frozenset[str], values: tuple[str, ...]
) -> list[tuple[tuple[str, str], int]]:
    series = {(route, value): 0 for route in routes for value in values}
    series.update(counts)
    return sorted(series.items())


def _cumulative_buckets(counts: list[int]) -> list[tuple[str, float]]:
    total = 0
    buckets = []
    for bound, count in zip((*DURATION_BUCKETS, float("inf")), counts, strict=True):
        total += count
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), float(total)))
    return buckets


def build_registry(collector: ProxyCollector) -> CollectorRegistry:
    """A fresh registry holding only the proxy's collector (no process/platform defaults)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry
