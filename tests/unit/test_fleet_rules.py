"""The fleet's pure rules: records, which decision is newer, what waits for the store, what
wins on reconnect, the ramp lease, and the pooled window's arithmetic."""

from __future__ import annotations

from typing import Final

import pytest

from proxy.core import rollout
from proxy.core.config import Guard, Match, Rollout, Route, Split, Upstream, Version
from proxy.core.fleet import (
    Decision,
    decision,
    increments,
    is_newer,
    keep_own,
    lease_held,
    offline_refusal,
    pool,
    resolve,
    slot_of,
    slot_ttl_ms,
    slot_width,
    window_slots,
)
from proxy.core.window import LATENCY_BOUNDS, SlidingWindow

T0: Final = 1_000.0


def _route(revision: str = "v2") -> Route:
    upstream = Upstream(url="http://127.0.0.1:8001", host="127.0.0.1", port=8001)
    return Route(
        name="shop",
        match=Match(),
        stable=Version(upstreams=(upstream,)),
        canary=Version(upstreams=(upstream,), revision=revision),
        split=Split(weight_bp=500, salt="shop"),
        rollout=Rollout(steps_bp=(500, 2500, 10_000), interval=60.0),
        guard=Guard(),
    )


ROUTE: Final = _route()
START: Final = rollout.initial(ROUTE, T0)


def _decided(change: rollout.Change, at: float, origin: str = "a:8080") -> Decision:
    state, transition = change
    return decision(
        state, transition, ["v2"] if state.state == "aborted" else [], origin=origin, now=at
    )


def _abort(at: float = T0 + 5) -> Decision:
    return _decided(rollout.abort(ROUTE, START, at, "broken"), at)


def _promote(at: float = T0 + 5) -> Decision:
    return _decided(rollout.promote(ROUTE, START, at, to_end=False, canary_requests=0), at)


def _retry(aborted: Decision, at: float) -> Decision:
    return _decided(rollout.retry(ROUTE, aborted.state, at, canary_requests=0), at)


# -- records --------------------------------------------------------------------------------------


def test_a_record_reads_back_as_it_was_written() -> None:
    record = _abort()
    assert Decision.decode(record.encode()) == record
    assert Decision.decode(record.encode().encode()) == record
    assert record.aborted
    assert record.action == "abort"


def test_a_record_without_an_event_has_no_action() -> None:
    record = decision(START, None, (), origin="b", now=T0)
    assert Decision.decode(record.encode()) == record
    assert record.action is None
    assert not record.aborted


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "not JSON"),
        ("[]", "not format 1"),
        ('{"format": 2}', "not format 1"),
        ('{"format": 1, "aborted_revisions": [1]}', "aborted_revisions must be a list"),
        ('{"format": 1, "aborted_revisions": [], "event": 3}', "event must be a mapping"),
        ('{"format": 1, "aborted_revisions": [], "origin": 3}', "origin must be a string"),
        (
            '{"format": 1, "aborted_revisions": [], "origin": "a", "decided_at": true}',
            "decided_at must be a number",
        ),
        (
            '{"format": 1, "aborted_revisions": [], "origin": "a", "decided_at": 1, "state": 1}',
            "corrupt rollout state",
        ),
    ],
)
def test_a_broken_record_is_refused_with_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Decision.decode(text)


# -- which decision is newer ----------------------------------------------------------------------


def test_only_a_higher_version_is_news() -> None:
    assert is_newer(3, 4)
    assert not is_newer(4, 4)  # the same message twice
    assert not is_newer(5, 4)  # a message that came late


# -- offline: nothing raises a weight -------------------------------------------------------------


def test_offline_a_promote_or_a_retry_waits_for_the_store() -> None:
    _, promoted = rollout.promote(ROUTE, START, T0, to_end=False, canary_requests=0)
    assert promoted is not None
    refusal = offline_refusal(promoted)
    assert refusal is not None
    assert "unreachable" in refusal
    assert "from 5 % to 25 %" in refusal
    aborted, _ = rollout.abort(ROUTE, START, T0, "x")
    _, retried = rollout.retry(ROUTE, aborted, T0, canary_requests=0)
    assert retried is not None
    assert offline_refusal(retried) is not None


def test_offline_an_abort_a_pause_or_a_lower_weight_goes_ahead() -> None:
    for _, transition in (
        rollout.abort(ROUTE, START, T0, "x"),
        rollout.pause(ROUTE, START, T0),
        rollout.set_weight(ROUTE, START, T0, 100),
        rollout.on_breach(ROUTE, START, T0, "errors"),
    ):
        assert transition is not None
        assert offline_refusal(transition) is None


# -- reconcile: abort wins ------------------------------------------------------------------------


def test_with_nothing_pending_a_newer_fleet_record_is_adopted() -> None:
    assert resolve(pending=None, fleet=(4, _promote()), base=3) == "adopt"
    assert resolve(pending=None, fleet=(3, _promote()), base=3) == "keep"
    assert resolve(pending=None, fleet=None, base=0) == "keep"


def test_a_decision_nobody_raced_is_published() -> None:
    assert resolve(pending=_promote(), fleet=(3, _abort()), base=3) == "publish"
    assert resolve(pending=_promote(), fleet=None, base=0) == "publish"


def test_a_decision_that_lost_a_race_gives_way_unless_it_is_an_abort() -> None:
    assert resolve(pending=_promote(), fleet=(4, _abort()), base=3) == "adopt"
    assert resolve(pending=_abort(), fleet=(4, _promote()), base=3) == "publish"


def test_an_abort_made_offline_beats_a_ramp_step_made_meanwhile() -> None:
    step = _decided(
        rollout.tick(ROUTE, START, T0 + 61, canary_requests=100, verdict="healthy"), T0 + 61
    )
    assert step.state.weight_bp > START.weight_bp
    assert resolve(pending=_abort(T0 + 30), fleet=(9, step), base=2) == "publish"


def test_an_abort_meets_the_fleets_own_abort_and_takes_it() -> None:
    assert resolve(pending=_abort(T0 + 5), fleet=(4, _abort(T0 + 6)), base=3) == "adopt"


def test_a_retry_made_after_the_abort_wins_and_one_made_before_does_not() -> None:
    earlier = _abort(T0 + 1)
    later_retry = _retry(earlier, T0 + 50)
    assert resolve(pending=_abort(T0 + 20), fleet=(6, later_retry), base=3) == "adopt"
    assert resolve(pending=_abort(T0 + 60), fleet=(6, later_retry), base=3) == "publish"


def test_an_abort_of_one_revision_does_not_touch_a_record_about_another() -> None:
    other = _route(revision="v3")
    record = _decided(rollout.pause(other, rollout.initial(other, T0), T0 + 9), T0 + 9)
    assert resolve(pending=_abort(), fleet=(4, record), base=3) == "adopt"


# -- start-up: the fleet's record, or our own? ---------------------------------------------------


def test_a_replica_that_aborted_while_cut_off_keeps_its_abort_at_start_up() -> None:
    step = _promote(T0 + 5)
    mine = _abort(T0 + 30).state
    assert keep_own(mine, step)


def test_otherwise_a_starting_replica_takes_the_fleets_record() -> None:
    assert not keep_own(_abort(T0 + 1).state, _promote(T0 + 5))  # the fleet decided after it
    assert not keep_own(_abort(T0 + 30).state, _abort(T0 + 5))  # aborted there too
    assert not keep_own(START, _abort(T0 + 5))  # ours is no abort
    other = _route(revision="v3")
    theirs = _decided(rollout.pause(other, rollout.initial(other, T0), T0 + 2), T0 + 2)
    assert not keep_own(_abort(T0 + 30).state, theirs)  # about another canary


# -- the ramp lease -------------------------------------------------------------------------------


def test_a_lease_is_counted_on_for_most_of_its_ttl_only() -> None:
    assert not lease_held(None, 3.0, 10.0)
    assert lease_held(10.0, 3.0, 10.0)
    assert lease_held(10.0, 3.0, 12.3)
    assert not lease_held(10.0, 3.0, 12.4)  # 80 % of 3 s: the rest is the safety margin
    assert not lease_held(10.0, 3.0, 9.0)  # a renewal "from the future": not trusted


# -- the pooled window ----------------------------------------------------------------------------


def test_a_window_is_cut_into_tenths_of_at_most_a_second() -> None:
    assert slot_width(10.0) == 1.0
    assert slot_width(2.0) == pytest.approx(0.2)
    assert slot_of(12.5, 1.0) == 12
    assert list(window_slots(100.5, 10.0)) == list(range(91, 101))
    assert len(window_slots(100.5, 2.0)) == 10
    assert len(window_slots(100.0, 0.3)) == 10
    assert len(window_slots(100.0, 25.0)) == 25
    assert slot_ttl_ms(10.0) == 12_000


def test_pooled_counts_are_the_sum_of_every_replicas_counts() -> None:
    slow = LATENCY_BOUNDS.index(next(b for b in LATENCY_BOUNDS if b >= 0.5))
    one = increments(True, 10, 3, [(0, 9), (slow, 1)])
    two = increments(True, 5, 0, [(0, 5)])
    three = increments(False, 100, 1, [(0, 100)])
    assert "ce" not in two  # no errors, no field
    stable, canary = pool([one, {**three, "xr": 7, "sq": 1, "sbx": 1, "sb999": 1}, two])
    assert (canary.requests, canary.errors) == (15, 3)
    assert (stable.requests, stable.errors) == (100, 1)
    # The same 15 latencies in one local window give the same p99.
    window = SlidingWindow(10.0)
    for latency in [0.0001] * 14 + [0.5]:
        window.record(T0, error=False, latency=latency)
    assert canary.p99 == window.snapshot(T0).p99


def test_an_empty_pool_has_no_requests_and_no_p99() -> None:
    stable, canary = pool([])
    assert stable.requests == canary.requests == 0
    assert canary.p99 is None
