"""The Prometheus exposition of the recorder and the live routes: a collector on an injected
registry, turning plain counts into metric families at scrape time (docs/metrics.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from proxy.core.vocabulary import STATES
from proxy.dataplane.outcomes import DURATION_BUCKETS, Recorder, RouteView


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
            for name in STATES:
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
