"""Instance selection: round-robin over a version's instances, skipping those cooling down."""

from __future__ import annotations

from collections import Counter

from proxy.core.config import Upstream
from proxy.dataplane.upstream import Instance, UpstreamConnection, VersionPool


def three_instances() -> VersionPool:
    return VersionPool(
        tuple(
            Instance(Upstream(url=f"http://10.0.0.{n}:80", host=f"10.0.0.{n}", port=80))
            for n in (1, 2, 3)
        )
    )


def test_round_robin_visits_every_instance_in_turn() -> None:
    pool = three_instances()
    picks = [pool.pick(now=0.0) for _ in range(6)]
    assert [p.host for p in picks if p] == [
        "10.0.0.1",
        "10.0.0.2",
        "10.0.0.3",
        "10.0.0.1",
        "10.0.0.2",
        "10.0.0.3",
    ]


def test_an_instance_in_its_cool_down_is_skipped_and_comes_back_after_it() -> None:
    pool = three_instances()
    pool.instances[1].down_until = 10.0
    during = Counter(p.host for p in (pool.pick(now=5.0) for _ in range(30)) if p)
    assert during == {"10.0.0.1": 15, "10.0.0.3": 15}
    after = Counter(p.host for p in (pool.pick(now=10.0) for _ in range(30)) if p)
    assert after == {"10.0.0.1": 10, "10.0.0.2": 10, "10.0.0.3": 10}


def test_no_instance_is_offered_when_all_are_cooling_down() -> None:
    pool = three_instances()
    for instance in pool.instances:
        instance.down_until = 3.0
    assert pool.pick(now=2.9) is None
    assert pool.pick(now=3.0) is not None


def test_idle_connections_are_taken_newest_first_and_closed_ones_skipped() -> None:
    pool = three_instances()
    instance = pool.instances[0]

    old, closed, new = (UpstreamConnection(instance) for _ in range(3))
    closed.closed = True
    instance.idle = [old, closed, new]
    assert instance.take_idle() is new
    assert instance.take_idle() is old  # the closed one in between is dropped
    assert instance.take_idle() is None
