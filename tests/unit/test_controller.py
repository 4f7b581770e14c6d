"""The controller: the guard acts in line, decisions are written before they are reported,
and what was written comes back after a restart."""

from __future__ import annotations

import json
from pathlib import Path
from time import monotonic
from typing import Final

import pytest
from configs import guarded

from proxy.control.controller import PersistError
from proxy.control.holder import RuntimeHolder
from proxy.control.store import StateStore
from proxy.core.config import Config
from proxy.core.vocabulary import ROLLBACK_REASONS
from proxy.dataplane.runtime import RouteRuntime


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def config(**route: object) -> Config:
    return guarded(**route)


def feed(route: RouteRuntime, holder: RuntimeHolder, *, ok: int, errors: int) -> None:
    """Record canary outcomes the way the data path does, errors last."""
    live = route.state
    assert live.canary_window is not None
    for _ in range(ok):
        live.canary_window.record(monotonic(), error=False, latency=0.01)
    for _ in range(errors):
        live.canary_window.record(monotonic(), error=True, latency=0.01)
        holder.controller.canary_failed(route.name, route.state)


def test_below_min_requests_even_all_errors_never_trip() -> None:
    holder = RuntimeHolder(config())
    route = holder.current.routes["shop"]
    feed(route, holder, ok=0, errors=19)
    assert route.state.weight_bp == 1000
    assert route.state.assessment is not None
    assert route.state.assessment.verdict == "inconclusive"


def test_the_first_error_that_makes_a_breach_sets_the_weight_to_0_at_once() -> None:
    holder = RuntimeHolder(config())
    route = holder.current.routes["shop"]
    feed(route, holder, ok=19, errors=0)
    feed(route, holder, ok=0, errors=1)  # 1/20 = 0.05: not above the limit
    assert route.state.weight_bp == 1000
    feed(route, holder, ok=0, errors=1)  # 2/21 > 0.05
    assert route.state.aborted
    assert route.state.rollout.state == "aborted"
    assert "canary error rate" in route.state.rollout.reason
    assert holder.outcomes.rollbacks == {("shop", "error_rate"): 1}


def test_a_rollback_is_in_the_state_file_and_audit_log_when_the_call_returns(
    tmp_path: Path,
) -> None:
    store = StateStore(str(tmp_path))
    holder = RuntimeHolder(config(), store=store)
    route = holder.current.routes["shop"]
    feed(route, holder, ok=20, errors=5)
    saved = json.loads((tmp_path / "state.json").read_text())
    assert saved["routes"]["shop"]["state"] == "aborted"
    events = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [e["action"] for e in events] == ["start", "rollback"]
    assert events[-1]["actor"] == "guard"


def test_a_restart_restores_an_aborted_canary_with_the_same_revision(tmp_path: Path) -> None:
    store = StateStore(str(tmp_path))
    first = RuntimeHolder(config(), store=store)
    feed(first.current.routes["shop"], first, ok=20, errors=5)

    again = RuntimeHolder(config(), store=StateStore(str(tmp_path)))
    assert again.current.routes["shop"].state.aborted
    assert again.current.routes["shop"].state.weight_bp == 0

    revised = RuntimeHolder(
        config(canary={"upstreams": ["http://127.0.0.1:9002"], "revision": "v3"}),
        store=StateStore(str(tmp_path)),
    )
    assert not revised.current.routes["shop"].state.aborted
    assert revised.current.routes["shop"].state.weight_bp == 1000


def test_observe_mode_records_the_breach_once_and_never_changes_the_weight() -> None:
    guard = {"window": "10s", "min_requests": 20, "max_error_rate": 0.05, "action": "observe"}
    holder = RuntimeHolder(config(guard=guard))
    route = holder.current.routes["shop"]
    feed(route, holder, ok=20, errors=30)
    assert route.state.weight_bp == 1000
    assert not route.state.aborted
    assert holder.outcomes.breaches == {("shop", "observe"): 1}
    assert [e["action"] for e in holder.controller.events].count("observe_breach") == 1


def test_observe_mode_counts_a_canary_that_keeps_failing_again_each_guard_window() -> None:
    clock = Clock()
    guard = {"window": "10s", "min_requests": 20, "max_error_rate": 0.05, "action": "observe"}
    holder = RuntimeHolder(config(guard=guard), wall=clock)  # a route without a ramp
    route = holder.current.routes["shop"]
    feed(route, holder, ok=20, errors=30)
    assert holder.outcomes.breaches == {("shop", "observe"): 1}
    clock.now += 9.5
    feed(route, holder, ok=0, errors=5)  # the same breach, still going on
    holder.controller.tick(holder.canary_stats)
    assert holder.outcomes.breaches == {("shop", "observe"): 1}
    clock.now += 0.5  # a guard window after the first count, and still breached
    holder.controller.tick(holder.canary_stats)
    assert holder.outcomes.breaches == {("shop", "observe"): 2}
    clock.now += 10
    feed(route, holder, ok=0, errors=1)
    assert holder.outcomes.breaches == {("shop", "observe"): 3}
    assert [e["action"] for e in holder.controller.events].count("observe_breach") == 3
    assert (route.state.weight_bp, route.state.rollout.state) == (1000, "steady")


GUARD: Final = {"window": "10s", "min_requests": 20}


def record_stable(route: RouteRuntime, requests: int) -> None:
    window = route.state.stable_window
    assert window is not None
    for _ in range(requests):
        window.record(monotonic(), error=False, latency=0.01)


def slow_canary(route: RouteRuntime, requests: int) -> None:
    window = route.state.canary_window
    assert window is not None
    for _ in range(requests):
        window.record(monotonic(), error=False, latency=2.0)


@pytest.mark.parametrize(
    ("reason", "guard"),
    [
        ("error_rate", {**GUARD, "max_error_rate": 0.05}),
        ("error_rate_increase", {**GUARD, "max_error_rate": 0.5, "max_error_rate_increase": 0.02}),
        ("latency", {**GUARD, "max_p99_latency": "500ms"}),
        ("admin", GUARD),
    ],
)
def test_every_rollback_is_counted_under_a_reason_exported_from_0(
    reason: str, guard: dict[str, object]
) -> None:
    holder = RuntimeHolder(config(guard=guard))
    route = holder.current.routes["shop"]
    if reason == "error_rate":
        feed(route, holder, ok=20, errors=5)
    elif reason == "error_rate_increase":
        record_stable(route, 1000)
        feed(route, holder, ok=70, errors=30)  # 0.3: under 0.5, far above stable's 0
    elif reason == "latency":
        slow_canary(route, 30)
        holder.controller.tick(holder.canary_stats)  # latency breaches show on the tick
    else:
        holder.controller.act("shop", "abort", holder.canary_stats("shop"), reason="bad")
    assert route.state.aborted
    assert holder.outcomes.rollbacks == {("shop", reason): 1}
    assert reason in ROLLBACK_REASONS
    assert [key for key, _ in holder.outcomes.rollback_series()] == [
        ("shop", name) for name in sorted(ROLLBACK_REASONS)
    ]


def test_retry_starts_with_empty_windows_so_old_errors_do_not_trip_it_again() -> None:
    holder = RuntimeHolder(config())
    route = holder.current.routes["shop"]
    feed(route, holder, ok=20, errors=5)
    holder.controller.act("shop", "retry", holder.canary_stats("shop"))
    assert not route.state.aborted
    feed(route, holder, ok=0, errors=1)
    assert not route.state.aborted  # one error in a fresh window is no evidence
    assert route.state.assessment is not None
    assert route.state.assessment.verdict == "inconclusive"


def test_the_ramp_advances_on_the_tick_after_a_healthy_interval_with_enough_traffic() -> None:
    clock = Clock()
    ramp = {"steps": [5, 25, 50, 100], "interval": "60s"}
    holder = RuntimeHolder(config(split={}, rollout=ramp), wall=clock)
    route = holder.current.routes["shop"]
    assert route.state.weight_bp == 500
    stats = holder.canary_stats("shop")
    for _ in range(25):
        stats.observe(200, 0.01)
    feed(route, holder, ok=25, errors=0)

    clock.now += 59
    holder.controller.tick(holder.canary_stats)
    assert route.state.weight_bp == 500  # the interval is not over yet

    clock.now += 1
    holder.controller.tick(holder.canary_stats)
    assert route.state.weight_bp == 2500
    assert route.state.rollout.state == "progressing"


def test_a_reload_that_changes_nothing_about_a_route_keeps_its_windows() -> None:
    holder = RuntimeHolder(config())
    route = holder.current.routes["shop"]
    feed(route, holder, ok=7, errors=0)
    window = route.state.canary_window
    holder.swap(config())
    kept = holder.current.routes["shop"].state
    assert kept.canary_window is window
    assert window is not None
    assert window.snapshot(monotonic()).requests == 7


def test_a_config_that_reverts_to_a_rolled_back_revision_stays_aborted(tmp_path: Path) -> None:
    holder = RuntimeHolder(config(), store=StateStore(str(tmp_path)))
    feed(holder.current.routes["shop"], holder, ok=20, errors=5)  # v2 rolled back
    v3 = {"upstreams": ["http://127.0.0.1:9002"], "revision": "v3"}
    holder.swap(config(canary=v3))
    assert not holder.current.routes["shop"].state.aborted
    holder.swap(config())  # back to v2
    assert holder.current.routes["shop"].state.aborted
    again = RuntimeHolder(config(), store=StateStore(str(tmp_path)))  # and after a restart
    assert again.current.routes["shop"].state.aborted
    again.controller.act("shop", "retry", again.canary_stats("shop"))
    assert not again.current.routes["shop"].state.aborted
    restarted = RuntimeHolder(config(), store=StateStore(str(tmp_path)))
    assert not restarted.current.routes["shop"].state.aborted  # retry is remembered too


def test_an_abort_survives_a_restart_with_a_config_that_lacks_the_route(tmp_path: Path) -> None:
    holder = RuntimeHolder(config(), store=StateStore(str(tmp_path)))
    holder.controller.act("shop", "abort", holder.canary_stats("shop"), reason="bad")
    other = config(name="blog")
    RuntimeHolder(other, store=StateStore(str(tmp_path)))  # restart without shop
    back = RuntimeHolder(config(), store=StateStore(str(tmp_path)))
    assert back.current.routes["shop"].state.aborted


def test_an_admin_decision_that_cannot_be_written_is_refused_and_changes_nothing(
    tmp_path: Path,
) -> None:
    holder = RuntimeHolder(config(), store=StateStore(str(tmp_path)))
    (tmp_path / "state.json").unlink()
    (tmp_path / "state.json").mkdir()  # the rename over it will fail
    route = holder.current.routes["shop"]
    with pytest.raises(PersistError):
        holder.controller.act("shop", "abort", holder.canary_stats("shop"), reason="bad")
    assert not route.state.aborted
    assert [e["action"] for e in holder.controller.events] == ["start"]


def test_a_guard_rollback_applies_even_when_the_disk_fails_and_is_written_later(
    tmp_path: Path,
) -> None:
    holder = RuntimeHolder(config(), store=StateStore(str(tmp_path)))
    (tmp_path / "state.json").unlink()
    (tmp_path / "state.json").mkdir()
    route = holder.current.routes["shop"]
    feed(route, holder, ok=20, errors=5)
    assert route.state.aborted  # traffic left the failing canary regardless
    assert "rollback" not in [e["action"] for e in holder.controller.events]  # not reported yet
    (tmp_path / "state.json").rmdir()
    holder.controller.tick(holder.canary_stats)
    assert json.loads((tmp_path / "state.json").read_text())["routes"]["shop"]["state"] == (
        "aborted"
    )
    assert "rollback" in [e["action"] for e in holder.controller.events]
