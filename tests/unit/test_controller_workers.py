"""The controller across processes: a follower (a worker) records into tallies and takes its
supervisor's decisions; the leader (the supervisor) adds the tallies to its windows, judges
them, and says when it decided something."""

from __future__ import annotations

from time import monotonic

from configs import guarded

from proxy.control.controller import RouteStates
from proxy.control.holder import RuntimeHolder
from proxy.core.config import Config, parse_config
from proxy.core.window import SlidingWindow, Tally, TallyCounts
from proxy.dataplane.runtime import RouteRuntime


def config(**route: object) -> Config:
    return guarded(**route)


def two_routes() -> Config:
    guarded = {
        "name": "shop",
        "match": {"path_prefix": "/shop"},
        "stable": {"upstreams": ["http://127.0.0.1:9001"]},
        "canary": {"upstreams": ["http://127.0.0.1:9002"], "revision": "v2"},
        "split": {"weight": 10},
        "guard": {"window": "10s", "min_requests": 20},
    }
    unguarded = {
        "name": "blog",
        "match": {"path_prefix": "/blog"},
        "stable": {"upstreams": ["http://127.0.0.1:9003"]},
        "canary": {"upstreams": ["http://127.0.0.1:9004"], "revision": "v2"},
        "split": {"weight": 10},
    }
    return parse_config({"routes": [guarded, unguarded]}, base_dir="/srv")


V3 = {"upstreams": ["http://127.0.0.1:9002"], "revision": "v3"}


def counts(requests: int, errors: int) -> TallyCounts:
    return TallyCounts(requests=requests, errors=errors, buckets=((20, requests),))


def tally(evidence: object) -> Tally:
    assert isinstance(evidence, Tally)
    return evidence


def window(evidence: SlidingWindow | None) -> SlidingWindow:
    assert evidence is not None
    return evidence


def shop(holder: RuntimeHolder) -> RouteRuntime:
    return holder.current.routes["shop"]


class Calls:
    """A callback that remembers, at each call, what the controller's route states were."""

    def __init__(self, holder: RuntimeHolder) -> None:
        self.holder = holder
        self.seen: list[RouteStates] = []

    def __call__(self) -> None:
        self.seen.append(self.holder.controller.route_states())


# -- a follower records into tallies -------------------------------------------------------------


def test_a_follower_records_a_guarded_routes_outcomes_into_tallies_and_keeps_no_window() -> None:
    holder = RuntimeHolder(two_routes(), follower=True)
    live = shop(holder).state
    assert live.stable_window is None
    assert live.canary_window is None
    assert isinstance(live.stable_evidence, Tally)
    assert isinstance(live.canary_evidence, Tally)
    assert live.stable_evidence is not live.canary_evidence
    assert live.windows(monotonic()) is None
    blog = holder.current.routes["blog"].state  # no guard: nothing to record into
    assert (blog.stable_evidence, blog.canary_evidence) == (None, None)


def test_a_leader_records_into_its_windows_themselves() -> None:
    holder = RuntimeHolder(config())
    live = shop(holder).state
    assert isinstance(live.canary_window, SlidingWindow)
    assert live.canary_evidence is live.canary_window
    assert live.stable_evidence is live.stable_window
    assert live.stable_window is not live.canary_window


def test_a_follower_never_judges_a_canary_error_it_asks_its_supervisor_to() -> None:
    holder = RuntimeHolder(config(), follower=True)
    asked: list[None] = []
    holder.controller.on_canary_error = lambda: asked.append(None)
    route = shop(holder)
    evidence = tally(route.state.canary_evidence)
    for _ in range(50):  # far more than a leader needs to trip
        evidence.record(monotonic(), error=True, latency=0.01)
        holder.controller.canary_failed(route.name, route.state)
    assert len(asked) == 50
    assert not route.state.aborted
    assert route.state.weight_bp == 1000
    assert route.state.assessment is None


def test_a_follower_does_not_ask_about_a_route_that_is_aborted_already() -> None:
    holder = RuntimeHolder(config(), follower=True)
    asked: list[None] = []
    holder.controller.on_canary_error = lambda: asked.append(None)
    holder.controller.follow({"shop": (0, True, shop(holder).state.epoch)})
    holder.controller.canary_failed("shop", shop(holder).state)
    assert asked == []


# -- route states and following them -------------------------------------------------------------


def test_route_states_are_each_live_routes_weight_abort_and_epoch() -> None:
    holder = RuntimeHolder(two_routes())
    shop_epoch = shop(holder).state.epoch
    blog_epoch = holder.current.routes["blog"].state.epoch
    assert holder.controller.route_states() == {
        "shop": (1000, False, shop_epoch),
        "blog": (1000, False, blog_epoch),
    }
    holder.controller.act("shop", "abort", holder.canary_stats("shop"), reason="bad")
    assert holder.controller.route_states()["shop"] == (0, True, shop_epoch)


def test_a_follower_adopts_its_leaders_weight_and_abort() -> None:
    leader = RuntimeHolder(config())
    follower = RuntimeHolder(config(), follower=True)
    leader.controller.act("shop", "set_weight", leader.canary_stats("shop"), weight_bp=2500)
    follower.controller.follow(leader.controller.route_states())
    assert (shop(follower).state.weight_bp, shop(follower).state.aborted) == (2500, False)
    leader.controller.act("shop", "abort", leader.canary_stats("shop"), reason="bad")
    follower.controller.follow(leader.controller.route_states())
    assert (shop(follower).state.weight_bp, shop(follower).state.aborted) == (0, True)
    assert follower.controller.route_states() == leader.controller.route_states()


def test_following_the_same_epoch_keeps_the_tallies_and_what_they_counted() -> None:
    holder = RuntimeHolder(config(), follower=True)
    live = shop(holder).state
    before = tally(live.canary_evidence)
    before.record(monotonic(), error=True, latency=0.01)
    holder.controller.follow({"shop": (500, False, live.epoch)})
    assert live.canary_evidence is before
    assert before.drain() == TallyCounts(requests=1, errors=1, buckets=((22, 1),))


def test_a_new_epoch_gives_a_follower_fresh_tallies_and_that_epoch() -> None:
    holder = RuntimeHolder(config(), follower=True)
    live = shop(holder).state
    old_stable, old_canary = tally(live.stable_evidence), tally(live.canary_evidence)
    old_stable.record(monotonic(), error=False, latency=0.01)
    old_canary.record(monotonic(), error=True, latency=0.01)
    epoch = live.epoch + 7  # whatever the leader's count is, the follower takes it
    holder.controller.follow({"shop": (1000, False, epoch)})
    assert live.epoch == epoch
    assert holder.controller.route_states()["shop"] == (1000, False, epoch)
    assert live.stable_evidence is not old_stable
    assert live.canary_evidence is not old_canary
    assert tally(live.stable_evidence).drain() is None
    assert tally(live.canary_evidence).drain() is None
    assert live.canary_window is None  # still a follower: tallies, not windows


def test_a_follower_ignores_states_of_routes_it_does_not_have() -> None:
    holder = RuntimeHolder(config(), follower=True)
    before = holder.controller.route_states()
    holder.controller.follow({"gone": (0, True, 99)})
    assert holder.controller.route_states() == before
    assert "gone" not in holder.controller.live


def test_a_follower_keeps_following_after_a_retry_with_fresh_tallies() -> None:
    leader = RuntimeHolder(config())
    follower = RuntimeHolder(config(), follower=True)
    leader.controller.act("shop", "abort", leader.canary_stats("shop"), reason="bad")
    follower.controller.follow(leader.controller.route_states())
    old = tally(shop(follower).state.canary_evidence)
    old.record(monotonic(), error=True, latency=0.01)  # evidence against the aborted canary
    leader.controller.act("shop", "retry", leader.canary_stats("shop"))
    follower.controller.follow(leader.controller.route_states())
    live = shop(follower).state
    assert (live.aborted, live.epoch) == (False, shop(leader).state.epoch)
    assert tally(live.canary_evidence).drain() is None


# -- epochs --------------------------------------------------------------------------------------


def test_the_epoch_moves_on_when_the_windows_start_afresh_and_only_then() -> None:
    holder = RuntimeHolder(config())
    live = shop(holder).state
    epoch = live.epoch
    holder.swap(config())  # nothing changed: the same windows
    assert live.epoch == epoch
    holder.controller.act("shop", "abort", holder.canary_stats("shop"), reason="bad")
    assert live.epoch == epoch  # an abort keeps the evidence that led to it
    seen = [epoch]
    holder.controller.act("shop", "retry", holder.canary_stats("shop"))
    seen.append(live.epoch)
    holder.swap(config(canary=V3))  # a new revision
    seen.append(live.epoch)
    holder.swap(config(canary=V3, guard={"window": "20s", "min_requests": 20}))  # a new guard
    seen.append(live.epoch)
    assert seen == sorted(set(seen))  # each fresh start a new, larger epoch
    assert window(live.canary_window).span == 20.0


def test_a_route_removed_and_added_again_never_reuses_an_epoch() -> None:
    """A late report from the first life of a route must not judge its second life."""
    two = RuntimeHolder(two_routes())
    old_epoch = two.current.routes["shop"].state.epoch
    blog_only = parse_config(
        {"routes": [{"name": "blog", "stable": {"upstreams": ["http://127.0.0.1:9003"]}}]},
        base_dir="/srv",
    )
    two.swap(blog_only)
    two.swap(two_routes())
    live = two.current.routes["shop"].state
    assert live.epoch != old_epoch
    two.controller.add_tally("shop", old_epoch, True, counts(40, 40))
    assert window(live.canary_window).snapshot(monotonic()).requests == 0


# -- a leader adds tallies and judges them -------------------------------------------------------


def test_a_tally_of_the_current_epoch_joins_the_window_of_its_version() -> None:
    holder = RuntimeHolder(config())
    live = shop(holder).state
    holder.controller.add_tally("shop", live.epoch, True, counts(5, 2))
    holder.controller.add_tally("shop", live.epoch, False, counts(7, 1))
    holder.controller.add_tally("shop", live.epoch, True, counts(3, 0))
    canary = window(live.canary_window).snapshot(monotonic())
    stable = window(live.stable_window).snapshot(monotonic())
    assert (canary.requests, canary.errors) == (8, 2)
    assert (stable.requests, stable.errors) == (7, 1)


def test_a_tally_of_another_epoch_is_dropped() -> None:
    holder = RuntimeHolder(config())
    live = shop(holder).state
    for epoch in (live.epoch - 1, live.epoch + 1):
        holder.controller.add_tally("shop", epoch, True, counts(30, 30))
        holder.controller.add_tally("shop", epoch, False, counts(30, 0))
    assert window(live.canary_window).snapshot(monotonic()).requests == 0
    assert window(live.stable_window).snapshot(monotonic()).requests == 0


def test_a_tally_from_before_a_retry_never_judges_the_retried_canary() -> None:
    holder = RuntimeHolder(config())
    live = shop(holder).state
    holder.controller.act("shop", "abort", holder.canary_stats("shop"), reason="bad")
    old = live.epoch
    holder.controller.act("shop", "retry", holder.canary_stats("shop"))
    holder.controller.add_tally("shop", old, True, counts(30, 30))
    holder.controller.assess_route("shop")
    assert not live.aborted
    assert window(live.canary_window).snapshot(monotonic()).requests == 0


def test_a_tally_for_a_route_that_is_not_live_or_has_no_guard_is_ignored() -> None:
    holder = RuntimeHolder(two_routes())
    blog = holder.current.routes["blog"].state
    holder.controller.add_tally("gone", 1, True, counts(30, 30))
    holder.controller.add_tally("blog", blog.epoch, True, counts(30, 30))
    holder.controller.assess_route("gone")
    holder.controller.assess_route("blog")
    assert (blog.canary_window, blog.assessment, blog.aborted) == (None, None, False)
    assert "gone" not in holder.controller.live


def test_enough_canary_errors_added_from_tallies_trip_the_guard_when_the_route_is_assessed() -> (
    None
):
    holder = RuntimeHolder(config())
    live = shop(holder).state
    holder.controller.add_tally("shop", live.epoch, True, counts(20, 5))
    assert not live.aborted  # adding judges nothing: assess_route does
    holder.controller.assess_route("shop")
    assert live.aborted
    assert live.weight_bp == 0
    assert live.rollout.state == "aborted"
    assert "canary error rate" in live.rollout.reason
    assert holder.outcomes.rollbacks == {("shop", "error_rate"): 1}
    assert holder.controller.route_states()["shop"] == (0, True, live.epoch)


def test_canary_errors_below_min_requests_are_inconclusive() -> None:
    holder = RuntimeHolder(config())
    live = shop(holder).state
    holder.controller.add_tally("shop", live.epoch, True, counts(19, 19))
    holder.controller.assess_route("shop")
    assert not live.aborted
    assert live.assessment is not None
    assert live.assessment.verdict == "inconclusive"
    holder.controller.add_tally("shop", live.epoch, True, counts(1, 1))
    holder.controller.assess_route("shop")
    assert live.aborted


def test_an_aborted_route_is_not_assessed_again() -> None:
    holder = RuntimeHolder(config())
    live = shop(holder).state
    holder.controller.add_tally("shop", live.epoch, True, counts(20, 20))
    holder.controller.assess_route("shop")
    assessment = live.assessment
    holder.controller.add_tally("shop", live.epoch, True, counts(20, 20))
    holder.controller.assess_route("shop")
    assert live.assessment is assessment
    assert holder.outcomes.rollbacks == {("shop", "error_rate"): 1}


# -- on_change: the leader tells its workers -----------------------------------------------------


def test_on_change_is_called_after_a_config_is_committed_with_its_states() -> None:
    holder = RuntimeHolder(config())
    calls = Calls(holder)
    holder.controller.on_change = calls
    holder.swap(config(canary=V3))
    assert calls.seen == [{"shop": (1000, False, shop(holder).state.epoch)}]
    holder.swap(config(name="blog"))
    assert calls.seen[-1] == {"blog": (1000, False, holder.current.routes["blog"].state.epoch)}


def test_on_change_is_called_after_an_admin_decision_is_applied() -> None:
    holder = RuntimeHolder(config())
    calls = Calls(holder)
    holder.controller.on_change = calls
    epoch = shop(holder).state.epoch
    holder.controller.act("shop", "abort", holder.canary_stats("shop"), reason="bad")
    assert calls.seen == [{"shop": (0, True, epoch)}]
    holder.controller.act("shop", "retry", holder.canary_stats("shop"))
    assert calls.seen[-1] == {"shop": (1000, False, epoch + 1)}


def test_on_change_is_called_after_a_guard_trip_and_not_for_an_inconclusive_assessment() -> None:
    holder = RuntimeHolder(config())
    calls = Calls(holder)
    holder.controller.on_change = calls
    live = shop(holder).state
    holder.controller.add_tally("shop", live.epoch, True, counts(10, 10))
    holder.controller.assess_route("shop")
    holder.controller.tick(holder.canary_stats)  # a steady route, healthy so far: no decision
    assert calls.seen == []
    holder.controller.add_tally("shop", live.epoch, True, counts(10, 10))
    holder.controller.assess_route("shop")
    assert calls.seen == [{"shop": (0, True, live.epoch)}]
