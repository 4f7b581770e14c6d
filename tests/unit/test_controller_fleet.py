"""The controller's side of a fleet: it tells the fleet of its decisions, lets it refuse an
admin decision before anything changes, applies the fleet's decisions like its own, judges the
pooled window, and moves ramps only with the lease."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path

import pytest
from configs import guarded

from proxy.control.controller import DecisionRefused
from proxy.control.holder import RuntimeHolder
from proxy.control.store import StateStore
from proxy.core import rollout
from proxy.core.rollout import RolloutState, Transition
from proxy.core.window import Tee, WindowCounts
from proxy.dataplane.outcomes import VersionStats


def counts(requests: int, errors: int) -> WindowCounts:
    return WindowCounts(requests=requests, errors=errors, p99=0.01)


def test_a_decision_of_ours_is_handed_to_the_fleet_once_applied() -> None:
    holder = RuntimeHolder(guarded(), pooled=True)
    told: list[tuple[str, RolloutState, Transition]] = []
    holder.controller.on_decision = lambda *decided: told.append(decided)
    holder.controller.act("shop", "pause", holder.canary_stats("shop"))
    ((name, state, transition),) = told
    assert (name, state.state, transition.action) == ("shop", "paused", "pause")
    assert holder.current.routes["shop"].state.rollout is state


def test_a_refused_admin_decision_changes_nothing() -> None:
    holder = RuntimeHolder(guarded())

    def refuse(transition: Transition) -> None:
        raise DecisionRefused(f"no {transition.action}")

    holder.controller.check_decision = refuse
    before = holder.current.routes["shop"].state.rollout
    with pytest.raises(DecisionRefused, match="no set_weight"):
        holder.controller.act("shop", "set_weight", holder.canary_stats("shop"), weight_bp=2000)
    assert holder.current.routes["shop"].state.rollout is before
    assert holder.current.routes["shop"].state.weight_bp == 1000


def test_a_pooled_route_records_for_its_window_and_for_the_fleet() -> None:
    holder = RuntimeHolder(guarded(), pooled=True)
    live = holder.current.routes["shop"].state
    assert isinstance(live.canary_evidence, Tee)
    live.canary_evidence.record(1.0, error=True, latency=0.01)
    assert live.canary_pool is not None
    drained = live.canary_pool.drain()
    assert drained is not None
    assert drained.errors == 1
    assert RuntimeHolder(guarded()).current.routes["shop"].state.canary_pool is None


def test_the_fleets_decision_is_applied_and_written_with_the_replica_that_made_it(
    tmp_path: Path,
) -> None:
    holder = RuntimeHolder(
        guarded(), store=StateStore(str(tmp_path)), wall=lambda: 1_800_000_000.25
    )
    live = holder.current.routes["shop"].state
    state, transition = rollout.abort(live.route, live.rollout, 1_800_000_000.0, "elsewhere")
    assert transition is not None
    assert holder.controller.follow_fleet("shop", state, ["v2"], transition.to_dict(), "b")
    assert live.aborted
    assert live.weight_bp == 0
    saved = json.loads((tmp_path / "state.json").read_text())["routes"]["shop"]
    assert (saved["state"], saved["aborted_revisions"]) == ("aborted", ["v2"])
    last = json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[-1])
    assert (last["action"], last["replica"], last["time"]) == (
        "abort",
        "b",
        "2027-01-15T08:00:00Z",
    )
    assert last["applied_at"] == 1_800_000_000.25  # decided at `at`, applied here then


def test_a_fleet_decision_about_another_revision_or_route_is_not_applied() -> None:
    holder = RuntimeHolder(guarded())
    live = holder.current.routes["shop"].state
    other = replace(live.rollout, revision="v9", weight_bp=5000)
    assert not holder.controller.follow_fleet("shop", other, [], None, "b")
    assert not holder.controller.follow_fleet("cart", live.rollout, [], None, "b")
    assert live.weight_bp == 1000


def test_a_retry_from_the_fleet_starts_the_windows_afresh() -> None:
    holder = RuntimeHolder(guarded())
    live = holder.current.routes["shop"].state
    aborted, _ = rollout.abort(live.route, live.rollout, 1.0, "x")
    holder.controller.follow_fleet("shop", aborted, ["v2"], None, "b")
    epoch = live.epoch
    retried, transition = rollout.retry(live.route, aborted, 2.0, canary_requests=0)
    assert transition is not None
    holder.controller.follow_fleet("shop", retried, [], transition.to_dict(), "b")
    assert live.epoch != epoch
    assert (live.weight_bp, live.aborted) == (1000, False)


def test_the_pooled_window_trips_on_the_fleets_traffic_and_shows_in_the_route() -> None:
    holder = RuntimeHolder(guarded())
    live = holder.current.routes["shop"].state
    holder.controller.judge_pooled("shop", counts(100, 0), counts(19, 19))  # < min_requests
    assert live.fleet_window == (counts(100, 0), counts(19, 19))
    assert not live.aborted
    holder.controller.judge_pooled("shop", counts(100, 0), counts(25, 5))
    assert live.aborted
    assert live.rollout.reason.startswith("guard: fleet: canary error rate 0.2")
    holder.controller.judge_pooled("shop", counts(100, 0), counts(40, 40))  # aborted: kept only
    assert live.fleet_window == (counts(100, 0), counts(40, 40))
    holder.controller.judge_pooled("cart", counts(1, 1), counts(1, 1))  # no such route


def test_without_the_lease_a_ramp_holds_and_the_guard_still_judges() -> None:
    config = guarded(rollout={"steps": [10, 50], "interval": "1s"}, split={})
    clock = [1_800_000_000.0]
    holder = RuntimeHolder(config, wall=lambda: clock[0])
    holder.controller.may_ramp = lambda: False
    clock[0] += 5
    holder.controller.tick(holder.canary_stats)
    live = holder.current.routes["shop"].state
    assert (live.rollout.state, live.weight_bp) == ("progressing", 1000)
    assert live.rollout.reason.startswith("ramp starts")
    holder.controller.may_ramp = lambda: True
    holder.controller.tick(holder.canary_stats)  # its interval is over: the holder decides
    assert live.rollout.reason.startswith("held at step 1/2")  # (no canary traffic yet)


def test_a_state_written_back_into_the_fleet_is_audited_as_taken_from_it(tmp_path: Path) -> None:
    holder = RuntimeHolder(guarded(), store=StateStore(str(tmp_path)))
    live = holder.current.routes["shop"].state
    aborted, _ = rollout.abort(live.route, live.rollout, 1_800_000_000.0, "cut off")
    assert holder.controller.follow_fleet("shop", aborted, ["v2"], None, "b")
    last = json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[-1])
    assert (last["action"], last["after"], last["replica"]) == ("restore", "aborted", "b")
    assert last["reason"] == "taken from the fleet: admin: cut off"
    lines = len((tmp_path / "audit.jsonl").read_text().splitlines())
    assert holder.controller.follow_fleet("shop", aborted, ["v2"], None, "c")  # no change
    assert len((tmp_path / "audit.jsonl").read_text().splitlines()) == lines


V3 = {"upstreams": ["http://127.0.0.1:9002"], "revision": "v3"}


def test_the_fleets_abort_of_a_revision_this_config_does_not_run_yet_sticks_to_it() -> None:
    """Finding 2: a config change reaches replicas seconds apart. The fleet aborts v3 while
    this replica still runs v2; its reload to v3 must not serve v3 (nor, holding the ramp
    lease, publish a v3 decision over the abort)."""
    ahead = RuntimeHolder(guarded(canary=V3))
    there = ahead.current.routes["shop"].state
    aborted, _ = rollout.abort(there.route, there.rollout, 1.0, "broken v3")
    holder = RuntimeHolder(guarded())
    assert not holder.controller.follow_fleet("shop", aborted, ["v3"], None, "a")
    live = holder.current.routes["shop"].state
    assert live.weight_bp == 1000  # still v2 here, at its own weight
    assert holder.controller.aborted_revisions["shop"] == {"v3"}
    holder.install(holder.prepare(guarded(canary=V3)))
    live = holder.current.routes["shop"].state
    assert (live.rollout.state, live.rollout.revision, live.weight_bp) == ("aborted", "v3", 0)


def test_a_reload_to_the_revision_the_fleet_runs_starts_from_the_fleets_record(
    tmp_path: Path,
) -> None:
    ahead = RuntimeHolder(guarded(canary=V3))
    there = ahead.current.routes["shop"].state
    raised, _ = rollout.set_weight(there.route, there.rollout, 1.0, 3000)
    holder = RuntimeHolder(guarded(), store=StateStore(str(tmp_path)))
    assert not holder.controller.follow_fleet("shop", raised, [], None, "a")
    holder.install(holder.prepare(guarded(canary=V3)))
    live = holder.current.routes["shop"].state
    assert (live.rollout.revision, live.weight_bp) == ("v3", 3000)
    last = json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[-1])
    assert (last["action"], last["weight_after_bp"]) == ("restore", 3000)
    assert last["reason"].startswith("taken from the fleet")
    # Taken once: a later reload of the same config changes nothing.
    holder.install(holder.prepare(guarded(canary=V3, split={"weight": 10})))
    assert holder.current.routes["shop"].state.weight_bp == 3000


def test_the_fleets_record_of_a_route_this_config_lacks_is_kept_for_when_it_comes() -> None:
    holder = RuntimeHolder(guarded())
    live = holder.current.routes["shop"].state
    aborted, _ = rollout.abort(live.route, live.rollout, 1.0, "elsewhere")
    holder.install(holder.prepare(guarded(name="cart")))
    assert not holder.controller.follow_fleet("shop", aborted, ["v2"], None, "a")
    holder.install(holder.prepare(guarded()))
    assert holder.current.routes["shop"].state.rollout.state == "aborted"


async def test_a_raise_is_written_to_the_fleet_first_and_applied_only_once_written() -> None:
    """Finding 5: nothing raises a weight here before the fleet has it."""
    holder = RuntimeHolder(guarded())
    controller = holder.controller
    live = holder.current.routes["shop"].state
    told: list[str] = []
    controller.on_decision = lambda name, state, transition: told.append(transition.action)
    seen: list[int] = []

    async def refuse(name: str, state: RolloutState, transition: Transition) -> None:
        seen.append(live.weight_bp)
        raise DecisionRefused("not written")

    controller.write_first = refuse
    with pytest.raises(DecisionRefused, match="not written"):
        await controller.act_written(
            "shop", "set_weight", holder.canary_stats("shop"), weight_bp=4000
        )
    assert (seen, live.weight_bp) == ([1000], 1000)

    async def write(name: str, state: RolloutState, transition: Transition) -> None:
        seen.append(live.weight_bp)

    controller.write_first = write
    await controller.act_written("shop", "set_weight", holder.canary_stats("shop"), weight_bp=4000)
    assert (seen[-1], live.weight_bp) == (1000, 4000)
    assert told == []  # written already: not handed over to be written again
    # Lowering is applied at once, and handed over to be written.
    await controller.act_written("shop", "set_weight", holder.canary_stats("shop"), weight_bp=500)
    assert (live.weight_bp, told) == (500, ["set_weight"])


async def test_a_raise_whose_route_changed_while_it_was_written_is_not_applied() -> None:
    holder = RuntimeHolder(guarded())
    controller = holder.controller
    live = holder.current.routes["shop"].state

    async def guard_trips_meanwhile(name: str, state: RolloutState, transition: Transition) -> None:
        controller.act("shop", "abort", holder.canary_stats("shop"), reason="guard")

    controller.write_first = guard_trips_meanwhile
    with pytest.raises(DecisionRefused, match="changed while"):
        await controller.act_written(
            "shop", "set_weight", holder.canary_stats("shop"), weight_bp=4000
        )
    assert (live.rollout.state, live.weight_bp) == ("aborted", 0)


async def test_a_ramp_step_is_written_to_the_fleet_first_and_holds_if_it_is_not() -> None:
    config = guarded(rollout={"steps": [10, 50], "interval": "1s"}, split={}, guard=None)
    clock = [1_800_000_000.0]
    holder = RuntimeHolder(config, wall=lambda: clock[0])
    controller = holder.controller
    live = holder.current.routes["shop"].state
    release = asyncio.Event()
    writes: list[int] = []

    async def write(name: str, state: RolloutState, transition: Transition) -> None:
        writes.append(transition.weight_after_bp)
        await release.wait()
        if len(writes) == 1:
            raise DecisionRefused("Redis is slow")

    controller.write_first = write
    served = VersionStats()
    served.counts[0] = 5  # canary requests in the step

    def stats(name: str) -> VersionStats:
        return served

    clock[0] += 5
    controller.tick(stats)
    await asyncio.sleep(0)
    controller.tick(stats)  # one write at a time
    await asyncio.sleep(0)
    assert (writes, live.weight_bp) == ([5000], 1000)
    release.set()
    await asyncio.sleep(0.01)
    assert live.weight_bp == 1000  # not written: the ramp holds
    controller.tick(stats)
    await asyncio.sleep(0.01)
    assert (writes, live.weight_bp) == ([5000, 5000], 5000)
    await controller.stop()
