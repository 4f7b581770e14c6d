"""The recorder's verbs and views, the duration buckets, and the Prometheus exposition of
docs/metrics.md — each test on a fresh registry."""

from __future__ import annotations

import math
import shutil
import subprocess
from collections.abc import Iterable
from typing import Final, get_args

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy.control.exposition import ProxyCollector, build_registry
from proxy.control.holder import RuntimeHolder
from proxy.core.config import Config, parse_config
from proxy.core.vocabulary import (
    GUARD_ACTIONS,
    ROLLBACK_REASONS,
    UPSTREAM_ERROR_KINDS,
    RollbackReason,
)
from proxy.core.vocabulary import STATES as ROLLOUT_STATES
from proxy.dataplane.outcomes import DURATION_BUCKETS, Recorder, RouteView, VersionStats

PROMTOOL: Final = "/usr/bin/promtool"

# docs/metrics.md: family name as the text parser reports it (counters lose `_total`), its type,
# and its labels (a histogram's `le` aside).
CONTRACT: Final = {
    "canary_proxy_requests": ("counter", {"route", "version", "code"}),
    "canary_proxy_request_duration_seconds": ("histogram", {"route", "version"}),
    "canary_proxy_upstream_errors": ("counter", {"route", "version", "kind"}),
    "canary_proxy_canary_weight_ratio": ("gauge", {"route"}),
    "canary_proxy_rollout_state": ("gauge", {"route", "state"}),
    "canary_proxy_rollbacks": ("counter", {"route", "reason"}),
    "canary_proxy_guard_breaches": ("counter", {"route", "action"}),
    "canary_proxy_config_reloads": ("counter", {"result"}),
    "canary_proxy_config_last_reload_successful": ("gauge", set()),
    "canary_proxy_client_connections": ("gauge", set()),
}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# -- helpers -----------------------------------------------------------------------------------


def route(name: str, weight: float = 0, **extra: object) -> dict[str, object]:
    return {
        "name": name,
        "match": {"path_prefix": f"/{name}"},
        "stable": {"upstreams": ["http://127.0.0.1:8001"]},
        "canary": {"upstreams": ["http://127.0.0.1:8002"], "revision": "v2"},
        "split": {"weight": weight},
        **extra,
    }


def no_canary(name: str) -> dict[str, object]:
    return {
        "name": name,
        "match": {"path_prefix": f"/{name}"},
        "stable": {"upstreams": ["http://127.0.0.1:8001"]},
    }


def config(*routes: dict[str, object]) -> Config:
    return parse_config({"listen": "127.0.0.1:0", "routes": list(routes)}, base_dir="/srv/proxy")


def exposition(recorder: Recorder, routes: Iterable[RouteView] = (), connections: int = 0) -> str:
    """The text a scrape would get, from a registry made for this call alone."""
    views = list(routes)
    collector = ProxyCollector(recorder, lambda: views, lambda: connections)
    return generate_latest(build_registry(collector)).decode()


def holder_exposition(holder: RuntimeHolder) -> str:
    collector = ProxyCollector(holder.outcomes, holder.route_views, lambda: 0)
    return generate_latest(build_registry(collector)).decode()


def samples(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(text: str, name: str, **labels: str) -> float:
    return samples(text)[(name, frozenset(labels.items()))]


def busy_recorder() -> Recorder:
    """A recorder with something in every series, so every family has samples."""
    recorder = Recorder()
    stable = recorder.stats_for("shop", "stable")
    canary = recorder.stats_for("shop", "canary")
    stable.observe(200, 0.004)
    stable.observe(404, 0.0002)
    canary.observe(503, 0.7)
    canary.observe(499, 12.0)
    canary.upstream_error("connect")
    stable.upstream_error("timeout")
    recorder.record_rejected(400)
    recorder.rolled_back("shop", "error_rate")
    recorder.set_canary_routes(["shop", "blog"])
    recorder.reload_succeeded()
    recorder.reload_failed()
    return recorder


SHOP_VIEW: Final = RouteView("shop", 1250, "steady")


# -- the recorder's verbs and views ------------------------------------------------------------


def test_each_route_and_version_gets_one_stats_object_that_is_handed_out_again() -> None:
    recorder = Recorder()
    stable = recorder.stats_for("shop", "stable")
    assert recorder.stats_for("shop", "stable") is stable
    assert recorder.stats_for("shop", "canary") is not stable
    assert recorder.stats_for("blog", "stable") is not stable


def test_responses_are_counted_by_route_version_and_status_code() -> None:
    recorder = Recorder()
    recorder.stats_for("shop", "stable").observe(200, 0.01)
    recorder.stats_for("shop", "stable").observe(200, 0.02)
    recorder.stats_for("shop", "canary").observe(502, 0.03)
    recorder.stats_for("blog", "stable").observe(404, 0.04)
    assert recorder.requests == {
        ("shop", "stable", 200): 2,
        ("shop", "canary", 502): 1,
        ("blog", "stable", 404): 1,
    }
    assert recorder.stats_for("shop", "stable").requests == 2


def test_the_upstream_errors_view_lists_only_the_kinds_that_happened() -> None:
    recorder = Recorder()
    canary = recorder.stats_for("shop", "canary")
    canary.upstream_error("connect")
    canary.upstream_error("connect")
    canary.upstream_error("reset")
    recorder.stats_for("shop", "stable")
    assert recorder.upstream_errors == {
        ("shop", "canary", "connect"): 2,
        ("shop", "canary", "reset"): 1,
    }


def test_requests_the_proxy_refused_itself_are_counted_by_code() -> None:
    recorder = Recorder()
    for status in (400, 400, 431, 404):
        recorder.record_rejected(status)
    assert recorder.rejected == {400: 2, 431: 1, 404: 1}
    assert recorder.requests == {}  # a refused request belongs to no route


def test_reloads_are_counted_by_outcome_and_the_last_outcome_is_remembered() -> None:
    recorder = Recorder()
    assert recorder.reloads == {"success": 0, "failure": 0}
    assert recorder.last_reload_successful  # no reload tried yet: nothing failed
    recorder.reload_failed()
    assert recorder.last_reload_successful is False
    recorder.reload_succeeded()
    recorder.reload_succeeded()
    assert recorder.last_reload_successful is True
    recorder.reload_failed()
    assert recorder.reloads == {"success": 2, "failure": 2}
    assert recorder.last_reload_successful is False


def test_rollbacks_are_counted_by_route_and_reason() -> None:
    recorder = Recorder()
    recorder.rolled_back("shop", "error_rate")
    recorder.rolled_back("shop", "error_rate")
    recorder.rolled_back("shop", "latency")
    recorder.rolled_back("blog", "error_rate")
    assert recorder.rollbacks == {
        ("shop", "error_rate"): 2,
        ("shop", "latency"): 1,
        ("blog", "error_rate"): 1,
    }


def test_keeping_some_routes_forgets_the_counts_and_rollbacks_of_the_others() -> None:
    recorder = Recorder()
    recorder.stats_for("shop", "stable").observe(200, 0.01)
    recorder.stats_for("blog", "canary").observe(200, 0.01)
    recorder.rolled_back("blog", "error_rate")
    recorder.keep_routes(["shop"])
    assert recorder.requests == {("shop", "stable", 200): 1}
    assert recorder.rollbacks == {}
    assert [name for name, _, _ in recorder.series()] == ["shop"]


# -- duration buckets --------------------------------------------------------------------------


@pytest.mark.parametrize("index", range(len(DURATION_BUCKETS)))
def test_a_duration_exactly_on_a_bucket_bound_is_counted_in_that_bucket(index: int) -> None:
    stats = VersionStats()
    stats.observe(200, DURATION_BUCKETS[index])  # Prometheus `le`: less than or equal
    assert stats.buckets[index] == 1
    assert sum(stats.buckets) == 1


@pytest.mark.parametrize("index", range(len(DURATION_BUCKETS)))
def test_a_duration_just_above_a_bound_is_counted_in_the_next_bucket(index: int) -> None:
    stats = VersionStats()
    stats.observe(200, math.nextafter(DURATION_BUCKETS[index], math.inf))
    assert stats.buckets[index + 1] == 1
    assert sum(stats.buckets) == 1


def test_a_duration_beyond_the_last_bound_is_counted_only_in_the_inf_bucket() -> None:
    stats = VersionStats()
    stats.observe(200, 3600.0)
    assert stats.buckets[-1] == 1
    assert sum(stats.buckets) == 1


def test_the_buckets_span_sub_millisecond_to_tens_of_seconds_in_ascending_order() -> None:
    assert list(DURATION_BUCKETS) == sorted(set(DURATION_BUCKETS))
    assert DURATION_BUCKETS[0] < 0.001
    assert DURATION_BUCKETS[-1] >= 30.0


def test_the_exposed_histogram_is_cumulative_with_less_or_equal_bounds() -> None:
    recorder = Recorder()
    stats = recorder.stats_for("shop", "stable")
    for duration in (0.001, 0.3, 0.5, 100.0):
        stats.observe(200, duration)
    text = exposition(recorder)

    def bucket(le: str) -> float:
        return value(
            text,
            "canary_proxy_request_duration_seconds_bucket",
            route="shop",
            version="stable",
            le=le,
        )

    assert bucket("0.0005") == 0
    assert bucket("0.001") == 1  # exactly on the bound: counted there
    assert bucket("0.25") == 1
    assert bucket("0.5") == 3
    assert bucket("60.0") == 3
    assert bucket("+Inf") == 4
    labels = {"route": "shop", "version": "stable"}
    assert value(text, "canary_proxy_request_duration_seconds_count", **labels) == 4
    assert value(text, "canary_proxy_request_duration_seconds_sum", **labels) == pytest.approx(
        100.801
    )


# -- the exposition ----------------------------------------------------------------------------


def test_every_metric_of_the_contract_is_exposed_with_its_type_and_labels() -> None:
    text = exposition(busy_recorder(), [SHOP_VIEW], connections=2)
    families = {family.name: family for family in text_string_to_metric_families(text)}
    for name, (kind, labels) in CONTRACT.items():
        assert name in families, f"{name} missing from the exposition"
        family = families[name]
        assert family.type == kind, name
        assert family.samples, f"{name} has no samples"
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == labels, sample


def test_counters_are_exposed_with_the_total_suffix() -> None:
    text = exposition(busy_recorder(), [SHOP_VIEW])
    names = {name for name, _ in samples(text)}
    for counter in ("requests", "upstream_errors", "rollbacks", "config_reloads"):
        assert f"canary_proxy_{counter}_total" in names


def test_request_counts_and_upstream_errors_are_exposed_per_route_version_and_label() -> None:
    text = exposition(busy_recorder(), [SHOP_VIEW])
    requests = "canary_proxy_requests_total"
    assert value(text, requests, route="shop", version="stable", code="200") == 1
    assert value(text, requests, route="shop", version="stable", code="404") == 1
    assert value(text, requests, route="shop", version="canary", code="503") == 1
    assert value(text, requests, route="shop", version="canary", code="499") == 1
    errors = "canary_proxy_upstream_errors_total"
    assert value(text, errors, route="shop", version="canary", kind="connect") == 1
    assert value(text, errors, route="shop", version="stable", kind="timeout") == 1
    for kind in ("connect", "timeout", "reset"):  # every kind of the contract is initialised
        assert (
            errors,
            frozenset({"route": "shop", "version": "canary", "kind": kind}.items()),
        ) in (samples(text))
    assert value(text, "canary_proxy_rollbacks_total", route="shop", reason="error_rate") == 1


@pytest.mark.parametrize(("weight", "ratio"), [(0, 0.0), (12.5, 0.125), (0.01, 0.0001), (100, 1.0)])
def test_the_canary_weight_is_exposed_as_a_ratio_between_0_and_1(
    weight: float, ratio: float
) -> None:
    holder = RuntimeHolder(config(route("shop", weight)))
    text = holder_exposition(holder)
    assert value(text, "canary_proxy_canary_weight_ratio", route="shop") == pytest.approx(ratio)


def test_an_aborted_route_exposes_a_canary_weight_of_0() -> None:
    holder = RuntimeHolder(config(route("shop", 40)))
    holder.controller.act("shop", "abort", holder.canary_stats("shop"), reason="test")
    text = holder_exposition(holder)
    assert value(text, "canary_proxy_canary_weight_ratio", route="shop") == 0


def test_the_rollout_state_gauge_is_1_for_exactly_one_state_of_every_route() -> None:
    holder = RuntimeHolder(
        config(
            route("shop", 10),
            route("blog", 5, rollout={"steps": [5, 50, 100], "interval": "1m"}),
            route("wiki", 20),
        )
    )
    holder.controller.act("wiki", "abort", holder.canary_stats("wiki"), reason="test")
    text = holder_exposition(holder)
    expected = {"shop": "steady", "blog": "progressing", "wiki": "aborted"}
    for name, current in expected.items():
        states = {
            state: value(text, "canary_proxy_rollout_state", route=name, state=state)
            for state in ROLLOUT_STATES
        }
        assert states == {state: 1.0 if state == current else 0.0 for state in ROLLOUT_STATES}


def test_both_reload_results_are_exposed_from_the_start_and_count_up() -> None:
    recorder = Recorder()
    fresh = exposition(recorder)
    assert value(fresh, "canary_proxy_config_reloads_total", result="success") == 0
    assert value(fresh, "canary_proxy_config_reloads_total", result="failure") == 0
    assert value(fresh, "canary_proxy_config_last_reload_successful") == 1
    recorder.reload_succeeded()
    recorder.reload_succeeded()
    recorder.reload_failed()
    after = exposition(recorder)
    assert value(after, "canary_proxy_config_reloads_total", result="success") == 2
    assert value(after, "canary_proxy_config_reloads_total", result="failure") == 1
    assert value(after, "canary_proxy_config_last_reload_successful") == 0
    recorder.reload_succeeded()
    assert value(exposition(recorder), "canary_proxy_config_last_reload_successful") == 1


def test_the_client_connections_gauge_reads_the_live_count_at_scrape_time() -> None:
    open_connections = [3]
    collector = ProxyCollector(Recorder(), list, lambda: open_connections[0])
    registry = build_registry(collector)
    assert value(generate_latest(registry).decode(), "canary_proxy_client_connections") == 3
    open_connections[0] = 7
    assert value(generate_latest(registry).decode(), "canary_proxy_client_connections") == 7


def test_each_registry_holds_only_the_proxys_own_families() -> None:
    text = exposition(busy_recorder(), [SHOP_VIEW])
    names = {family.name for family in text_string_to_metric_families(text)}
    assert all(name.startswith("canary_proxy_") for name in names), names


# -- across reloads ----------------------------------------------------------------------------


def test_counts_survive_config_swaps_without_being_reset_or_doubled() -> None:
    holder = RuntimeHolder(config(route("shop", 5)))
    first = holder.current.routes["shop"]
    for _ in range(3):
        first.stable_stats.observe(200, 0.002)
    first.canary_stats.observe(503, 0.2)
    first.canary_stats.upstream_error("reset")

    for weight in (10, 25, 50):
        holder.swap(config(route("shop", weight)))
    latest = holder.current.routes["shop"]
    for _ in range(4):
        latest.stable_stats.observe(200, 0.002)
    latest.canary_stats.observe(200, 0.02)
    # A request that began before the swaps finishes on the runtime it started on.
    first.canary_stats.observe(503, 0.2)

    text = holder_exposition(holder)
    requests = "canary_proxy_requests_total"
    assert value(text, requests, route="shop", version="stable", code="200") == 7
    assert value(text, requests, route="shop", version="canary", code="200") == 1
    assert value(text, requests, route="shop", version="canary", code="503") == 2
    histogram_count = "canary_proxy_request_duration_seconds_count"
    assert value(text, histogram_count, route="shop", version="stable") == 7
    assert value(text, histogram_count, route="shop", version="canary") == 3
    errors = "canary_proxy_upstream_errors_total"
    assert value(text, errors, route="shop", version="canary", kind="reset") == 1
    assert value(text, "canary_proxy_canary_weight_ratio", route="shop") == 0.5
    request_series = [key for key in samples(text) if key[0] == requests]
    assert len(request_series) == 3  # one series per (version, code), never one per generation


def test_a_deleted_routes_series_disappear_from_the_exposition() -> None:
    holder = RuntimeHolder(config(route("shop", 10), route("blog", 10)))
    for name in ("shop", "blog"):
        holder.current.routes[name].stable_stats.observe(200, 0.01)
        holder.current.routes[name].canary_stats.upstream_error("connect")
    holder.outcomes.rolled_back("blog", "error_rate")
    assert 'route="blog"' in holder_exposition(holder)

    holder.swap(config(route("shop", 10)))
    text = holder_exposition(holder)
    assert not [key for key in samples(text) if ("route", "blog") in key[1]]
    assert (
        value(text, "canary_proxy_requests_total", route="shop", version="stable", code="200") == 1
    )


def test_a_route_added_by_a_reload_is_exposed_at_once_with_zeroed_series() -> None:
    holder = RuntimeHolder(config(route("shop", 10)))
    holder.swap(config(route("shop", 10), route("blog", 30)))
    text = holder_exposition(holder)
    assert value(text, "canary_proxy_canary_weight_ratio", route="blog") == pytest.approx(0.3)
    for version in ("stable", "canary"):
        count = "canary_proxy_request_duration_seconds_count"
        assert value(text, count, route="blog", version=version) == 0


# -- zero series of the rollback and breach counters ---------------------------------------------

ROLLBACKS: Final = "canary_proxy_rollbacks_total"
BREACHES: Final = "canary_proxy_guard_breaches_total"


def counted(text: str, name: str, route: str, label: str) -> dict[str, float]:
    """The `name` samples of `route`, by their other label."""
    return {
        dict(labels)[label]: n
        for (sample, labels), n in samples(text).items()
        if sample == name and ("route", route) in labels
    }


def test_the_reasons_are_the_rollback_reason_type() -> None:
    assert set(ROLLBACK_REASONS) == set(get_args(RollbackReason))
    assert len(ROLLBACK_REASONS) == len(set(ROLLBACK_REASONS))
    assert GUARD_ACTIONS == ("rollback", "observe")


def test_a_route_with_a_canary_exports_every_rollback_reason_and_breach_action_from_0() -> None:
    # Prometheus' rate() and increase() cannot see the first event of a series born at 1.
    holder = RuntimeHolder(config(route("shop", 10), no_canary("blog")))
    text = holder_exposition(holder)
    assert counted(text, ROLLBACKS, "shop", "reason") == dict.fromkeys(ROLLBACK_REASONS, 0)
    assert counted(text, BREACHES, "shop", "action") == dict.fromkeys(GUARD_ACTIONS, 0)
    # A route without a canary has nothing to roll back.
    assert counted(text, ROLLBACKS, "blog", "reason") == {}
    assert counted(text, BREACHES, "blog", "action") == {}


def test_a_rollback_counts_up_from_the_zero_series_and_the_other_reasons_stay_at_0() -> None:
    holder = RuntimeHolder(config(route("shop", 10)))
    holder.controller.act("shop", "abort", holder.canary_stats("shop"), reason="bad")
    holder.outcomes.guard_breached("shop", "observe")
    text = holder_exposition(holder)
    expected = dict.fromkeys(ROLLBACK_REASONS, 0.0) | {"admin": 1.0}
    assert counted(text, ROLLBACKS, "shop", "reason") == expected
    assert counted(text, BREACHES, "shop", "action") == {"rollback": 0, "observe": 1}


def test_the_zero_series_follow_the_routes_that_have_a_canary_across_reloads() -> None:
    holder = RuntimeHolder(config(route("shop", 10)))
    holder.swap(config(route("shop", 10), route("blog", 5)))  # added: from 0 at once
    assert counted(holder_exposition(holder), ROLLBACKS, "blog", "reason") == dict.fromkeys(
        ROLLBACK_REASONS, 0
    )
    holder.outcomes.rolled_back("shop", "latency")
    holder.swap(config(no_canary("shop"), route("blog", 5)))  # shop lost its canary
    text = holder_exposition(holder)
    assert counted(text, ROLLBACKS, "shop", "reason") == {"latency": 1}  # what it counted stays
    assert counted(text, BREACHES, "shop", "action") == {}
    holder.swap(config(no_canary("shop")))  # blog deleted: its series go
    text = holder_exposition(holder)
    assert counted(text, ROLLBACKS, "blog", "reason") == {}
    assert counted(text, BREACHES, "blog", "action") == {}


def test_keeping_some_routes_forgets_the_zero_series_of_the_others() -> None:
    recorder = Recorder()
    recorder.set_canary_routes(["shop", "blog"])
    recorder.keep_routes(["shop"])
    assert recorder.canary_routes == {"shop"}
    assert [key for key, _ in recorder.rollback_series()] == [
        ("shop", reason) for reason in sorted(ROLLBACK_REASONS)
    ]
    assert recorder.breach_series() == [(("shop", "observe"), 0), (("shop", "rollback"), 0)]


# -- promtool ----------------------------------------------------------------------------------


def test_promtool_finds_nothing_to_complain_about_in_the_exposition() -> None:
    if shutil.which(PROMTOOL) is None:
        pytest.skip(f"{PROMTOOL} is not installed (Debian package prometheus; CI installs it)")
    text = exposition(busy_recorder(), [SHOP_VIEW, RouteView("blog", 0, "aborted")], 4)
    result = subprocess.run(
        [PROMTOOL, "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


# -- across processes: what changed since a copy, added up elsewhere ----------------------------


def fields(stats: VersionStats) -> tuple[object, ...]:
    return stats.codes, stats.buckets, stats.duration_sum, stats.upstream_errors


def test_a_copy_has_the_same_counts_and_shares_nothing_with_the_original() -> None:
    stats = busy_recorder().stats_for("shop", "canary")
    twin = stats.copy()
    assert fields(twin) == fields(stats)
    assert twin is not stats
    stats.observe(503, 0.7)
    stats.observe(201, 0.01)
    stats.upstream_error("connect")
    assert twin.codes == {503: 1, 499: 1}
    assert sum(twin.buckets) == 2
    assert twin.duration_sum == 12.7
    assert twin.upstream_errors == {"connect": 1, "timeout": 0, "reset": 0, "protocol": 0}


def test_nothing_counted_since_a_copy_is_no_change() -> None:
    assert VersionStats().since(VersionStats()) is None
    stats = busy_recorder().stats_for("shop", "canary")
    assert stats.since(stats.copy()) is None


def test_the_change_since_a_copy_holds_only_what_was_counted_after_it() -> None:
    stats = VersionStats()
    stats.observe(200, 0.25)
    stats.observe(503, 1.5)
    stats.upstream_error("reset")
    before = stats.copy()
    stats.observe(200, 0.5)
    stats.observe(200, 0.001)
    stats.observe(404, 70.0)
    stats.upstream_error("connect")
    stats.upstream_error("connect")
    buckets = [0] * (len(DURATION_BUCKETS) + 1)
    buckets[DURATION_BUCKETS.index(0.5)] = 1
    buckets[DURATION_BUCKETS.index(0.001)] = 1
    buckets[-1] = 1
    # Only the codes and error kinds that changed; every bucket, by position.
    assert stats.since(before) == ({200: 2, 404: 1}, buckets, 70.501, {"connect": 2})


def test_an_upstream_error_alone_is_a_change() -> None:
    stats = VersionStats()
    before = stats.copy()
    stats.upstream_error("timeout")
    assert stats.since(before) == ({}, [0] * (len(DURATION_BUCKETS) + 1), 0.0, {"timeout": 1})


def test_adding_the_change_since_a_copy_to_that_copy_gives_the_current_stats_exactly() -> None:
    stats = busy_recorder().stats_for("shop", "stable")
    before = stats.copy()
    for status, duration in ((200, 0.25), (200, 0.5), (502, 0.125), (404, 61.0), (200, 0.0)):
        stats.observe(status, duration)
    stats.upstream_error("protocol")
    stats.upstream_error("timeout")
    delta = stats.since(before)
    assert delta is not None
    before.add(delta)
    assert fields(before) == fields(stats)


Observation = tuple[int, float]
OBSERVATIONS: Final = st.lists(
    st.tuples(st.sampled_from([200, 201, 404, 499, 502, 503]), st.floats(0.0, 100.0)),
    max_size=30,
)
ERRORS: Final = st.lists(st.sampled_from(UPSTREAM_ERROR_KINDS), max_size=5)


def counted_stats(observations: list[Observation], errors: list[str]) -> VersionStats:
    stats = VersionStats()
    for status, duration in observations:
        stats.observe(status, duration)
    for kind in errors:
        stats.upstream_error(kind)
    return stats


@given(OBSERVATIONS, ERRORS, OBSERVATIONS, ERRORS)
def test_any_change_added_to_the_copy_it_was_taken_from_reproduces_the_stats(
    before_observed: list[Observation],
    before_errors: list[str],
    observed: list[Observation],
    errors: list[str],
) -> None:
    stats = counted_stats(before_observed, before_errors)
    before = stats.copy()
    for status, duration in observed:
        stats.observe(status, duration)
    for kind in errors:
        stats.upstream_error(kind)
    delta = stats.since(before)
    if not observed and not errors:
        assert delta is None
        return
    assert delta is not None
    before.add(delta)
    assert (before.codes, before.buckets, before.upstream_errors) == (
        stats.codes,
        stats.buckets,
        stats.upstream_errors,
    )
    # A float sum and a difference of two sums: exact up to rounding.
    assert before.duration_sum == pytest.approx(stats.duration_sum, rel=1e-12, abs=1e-12)


def test_changes_from_several_sources_add_up_to_their_total() -> None:
    workers = [VersionStats(), VersionStats()]
    sent = [VersionStats(), VersionStats()]
    total = VersionStats()
    for rounds in range(3):
        for index, stats in enumerate(workers):
            stats.observe(200, 0.25 * (index + 1))
            stats.observe(503 if rounds else 200, 0.5)
            stats.upstream_error("connect")
            delta = stats.since(sent[index])
            assert delta is not None
            total.add(delta)
            sent[index] = stats.copy()
    assert total.codes == {200: 8, 503: 4}
    assert total.requests == 12
    assert total.buckets == [a + b for a, b in zip(*(w.buckets for w in workers), strict=True)]
    assert total.duration_sum == sum(w.duration_sum for w in workers) == 5.25
    assert total.upstream_errors == {"connect": 6, "timeout": 0, "reset": 0, "protocol": 0}


def test_the_rejected_since_a_copy_are_only_the_codes_that_changed() -> None:
    recorder = Recorder()
    assert recorder.rejected_since({}) == {}
    for status in (400, 400, 431):
        recorder.record_rejected(status)
    assert recorder.rejected_since({}) == {400: 2, 431: 1}
    before = dict(recorder.rejected)
    assert recorder.rejected_since(before) == {}
    recorder.record_rejected(400)
    recorder.record_rejected(404)
    assert recorder.rejected_since(before) == {400: 1, 404: 1}


def test_rejected_counts_added_from_several_recorders_sum_up() -> None:
    total = Recorder()
    total.record_rejected(400)
    total.add_rejected({400: 2, 431: 1})
    total.add_rejected({})
    total.add_rejected({400: 1, 404: 3})
    assert total.rejected == {400: 4, 431: 1, 404: 3}
    assert value(exposition(total), "canary_proxy_rejected_requests_total", code="400") == 4
